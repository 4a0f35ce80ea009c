//! Anti-entropy without I/O: hash trees of what a node holds, and the
//! exchange that finds the keys two replicas hold differently. `quiverd`
//! and the deterministic simulation run this one rule.
//!
//! - Owns: a [`Tree`] per group of keys two replicas compare (the node
//!   keeps one per replica set). Each key has a *leaf*: a hash of the key
//!   and of its live versions' identities (their `(hlc, origin)`, which no
//!   two versions share; never the value bytes). A key falls in one of
//!   [`SEGMENTS`] segments by its token's first 12 bits, so that a
//!   segment's keys are one span of tokens, which a node's storage keeps
//!   together (listing them is a range scan); a segment is the XOR of
//!   its keys' leaves, a branch the XOR of [`SEGMENTS_PER_BRANCH`]
//!   segments, the root the XOR of the branches. A write changes a key's
//!   leaf from `old` to `new`: three XORs, no rebuild.
//! - Receives, for an exchange ([`Exchange`], the side that starts it):
//!   the other replica's answers ([`Told`]) and this node's own keys of the
//!   segments asked ([`Exchange::listed`]).
//! - Does: compares roots first, then branches, then segments, and lists
//!   only the keys of segments that differ, a bounded number of segments
//!   at a time; a key whose leaves differ (or that one side lacks) is to be
//!   repaired.
//! - Hands on: [`Step`]s: what to ask the other replica, which of this
//!   node's keys to list, which keys to repair (each side sends the other
//!   its whole sibling sets, merged there by the one merge: repair is
//!   idempotent and order-free), and the outcome.
//!
//! What the other replica tells is checked: a wrong count of branches, a
//! segment or key from outside what was asked, fails the exchange or is
//! left out; nothing it says can make this node ask for more than it
//! bounded.

use std::collections::{BTreeMap, VecDeque};

use quiver_ring::ring::key_token;
use quiver_ring::Siblings;
use xxhash_rust::xxh3::Xxh3;

pub use crate::messages::{Ask, Told};

/// Segments of a tree: a key's segment is a hash of the key modulo this.
pub const SEGMENTS: usize = 4096;
/// Segments under one branch; branches are `SEGMENTS / SEGMENTS_PER_BRANCH`.
pub const SEGMENTS_PER_BRANCH: usize = 64;
pub const BRANCHES: usize = SEGMENTS / SEGMENTS_PER_BRANCH;

/// A seed that keeps a key's leaf independent of its token.
const LEAF_SEED: u64 = 0x1eaf_1eaf;

/// The bits of a token below its segment number.
const SEGMENT_SHIFT: u32 = 64 - SEGMENTS.trailing_zeros();

/// A segment's number, `0..SEGMENTS`.
pub type Segment = u16;

/// The segment `key` falls in: its token's first bits.
pub fn segment_of(key: &[u8]) -> Segment {
    segment_of_token(key_token(key))
}

/// The segment of keys whose token is `token`.
pub fn segment_of_token(token: u64) -> Segment {
    (token >> SEGMENT_SHIFT) as Segment
}

/// The tokens of `segment`'s keys: from the first to the last, inclusive.
pub fn segment_tokens(segment: Segment) -> (u64, u64) {
    let first = (segment as u64) << SEGMENT_SHIFT;
    (first, first | (u64::MAX >> SEGMENTS.trailing_zeros()))
}

/// The leaf of `key` holding `siblings`: a hash of the key and each live
/// version's `(hlc, origin)`; 0 for a key with no version (it adds nothing
/// to the tree).
pub fn leaf(key: &[u8], siblings: Option<&Siblings>) -> u64 {
    let Some(siblings) = siblings.filter(|s| !s.is_empty()) else { return 0 };
    let mut hasher = Xxh3::with_seed(LEAF_SEED);
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    for version in siblings.versions() {
        let (hlc, origin) = version.order();
        hasher.update(&hlc.0.to_le_bytes());
        hasher.update(&origin.node.0.to_le_bytes());
        hasher.update(&origin.counter.to_le_bytes());
    }
    // 0 is kept for "no key": a hash of 0 would be lost in the XORs.
    hasher.digest().max(1)
}

/// The hash tree of one group of keys (see the module's doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    segments: Vec<u64>,
    branches: Vec<u64>,
    root: u64,
    /// Keys with a leaf in the tree.
    keys: u64,
}

impl Default for Tree {
    fn default() -> Tree {
        Tree { segments: vec![0; SEGMENTS], branches: vec![0; BRANCHES], root: 0, keys: 0 }
    }
}

impl Tree {
    /// `key`'s leaf changed from `old` to `new` (0: no key).
    pub fn change(&mut self, key: &[u8], old: u64, new: u64) {
        if old == new {
            return;
        }
        let delta = old ^ new;
        let segment = segment_of(key) as usize;
        if let Some(hash) = self.segments.get_mut(segment) {
            *hash ^= delta;
        }
        if let Some(hash) = self.branches.get_mut(segment / SEGMENTS_PER_BRANCH) {
            *hash ^= delta;
        }
        self.root ^= delta;
        match (old, new) {
            (0, _) => self.keys += 1,
            (_, 0) => self.keys = self.keys.saturating_sub(1),
            _ => {}
        }
    }

    pub fn root(&self) -> u64 {
        self.root
    }

    /// Keys with a leaf here.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// Every branch, in order.
    pub fn branches(&self) -> &[u64] {
        &self.branches
    }

    /// The segments under `branch` (empty for a branch that does not exist).
    pub fn segments_of(&self, branch: u16) -> &[u64] {
        let start = branch as usize * SEGMENTS_PER_BRANCH;
        self.segments.get(start..start + SEGMENTS_PER_BRANCH).unwrap_or(&[])
    }
}

/// The answer to `ask` from `tree`; `list` lists this node's keys in the
/// segments given, with their leaves (from its storage). `None` for an
/// ask past `segments_max` segments or naming what does not exist.
pub fn answer(
    tree: &Tree,
    ask: &Ask,
    segments_max: usize,
    list: impl FnOnce(&[Segment]) -> Vec<(Vec<u8>, u64)>,
) -> Option<Told> {
    match ask {
        Ask::Branches => Some(Told::Branches { root: tree.root, branches: tree.branches.clone() }),
        Ask::Segments(branches) => {
            let fits = branches.len() <= BRANCHES && branches.iter().all(|&b| (b as usize) < BRANCHES);
            fits.then(|| Told::Segments(branches.iter().map(|&b| (b, tree.segments_of(b).to_vec())).collect()))
        }
        Ask::Keys(segments) => {
            let fits = segments.len() <= segments_max && segments.iter().all(|&s| (s as usize) < SEGMENTS);
            fits.then(|| Told::Keys(list(segments)))
        }
    }
}

/// What an exchange wants done next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this to the other replica; its answer goes to
    /// [`Exchange::told`].
    Ask(Ask),
    /// List this node's keys in these segments with their leaves, to
    /// [`Exchange::listed`].
    List(Vec<Segment>),
    /// These keys differ: each side sends the other its sibling sets of
    /// them; then [`Exchange::repaired`].
    Repair(Vec<Vec<u8>>),
    /// The exchange is over.
    Done(Outcome),
}

/// How an exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every difference found was repaired (none, if the roots matched).
    Synced(Summary),
    /// The other replica answered what was not asked.
    Failed(String),
}

/// What an exchange compared and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Whether the roots differed at the start.
    pub roots_differed: bool,
    pub segments_differing: usize,
    /// Segments whose keys were compared so far.
    pub segments_compared: usize,
    pub keys_repaired: usize,
}

#[derive(Debug)]
enum Phase {
    Branches,
    Segments { asked: Vec<u16> },
    Keys { asked: Vec<Segment>, theirs: Option<Vec<(Vec<u8>, u64)>>, ours: Option<Vec<(Vec<u8>, u64)>> },
    Repairing,
    Over,
}

/// One exchange, on the side that starts it (see the module's doc).
#[derive(Debug)]
pub struct Exchange {
    phase: Phase,
    steps: VecDeque<Step>,
    /// Branches whose segments are still to be asked.
    branches: VecDeque<u16>,
    /// Differing segments whose keys are still to be compared.
    segments: VecDeque<Segment>,
    segments_per_ask: usize,
    summary: Summary,
}

impl Exchange {
    /// Starts an exchange that asks for the keys of at most
    /// `segments_per_ask` segments at a time.
    pub fn start(segments_per_ask: usize) -> Exchange {
        Exchange {
            phase: Phase::Branches,
            steps: VecDeque::from([Step::Ask(Ask::Branches)]),
            branches: VecDeque::new(),
            segments: VecDeque::new(),
            segments_per_ask: segments_per_ask.max(1),
            summary: Summary::default(),
        }
    }

    /// The next thing to do, if any (`None`: waiting for an answer).
    pub fn poll(&mut self) -> Option<Step> {
        self.steps.pop_front()
    }

    /// What the exchange found so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Whether it is over.
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Over)
    }

    /// The other replica's answer, compared with `ours` (this node's tree
    /// now).
    pub fn told(&mut self, told: Told, ours: &Tree) {
        match (std::mem::replace(&mut self.phase, Phase::Over), told) {
            (Phase::Branches, Told::Branches { root, branches }) => {
                if branches.len() != BRANCHES {
                    return self.fail(format!("{} branches told, {BRANCHES} expected", branches.len()));
                }
                if root == ours.root {
                    return self.end();
                }
                self.summary.roots_differed = true;
                let differing = branches.iter().zip(ours.branches()).enumerate().filter(|(_, (a, b))| a != b);
                self.branches = differing.map(|(i, _)| i as u16).collect();
                self.next_segments();
            }
            (Phase::Segments { asked }, Told::Segments(told)) => {
                for (branch, theirs) in told {
                    if !asked.contains(&branch) || theirs.len() != SEGMENTS_PER_BRANCH {
                        return self.fail(format!("segments of branch {branch} told, not as asked"));
                    }
                    let first = branch as usize * SEGMENTS_PER_BRANCH;
                    let differing =
                        theirs.iter().zip(ours.segments_of(branch)).enumerate().filter(|(_, (a, b))| a != b);
                    self.segments.extend(differing.map(|(i, _)| (first + i) as Segment));
                }
                self.summary.segments_differing = self.summary.segments_compared + self.segments.len();
                self.next_segments();
            }
            (Phase::Keys { asked, theirs: None, ours: listed }, Told::Keys(keys)) => {
                self.phase = Phase::Keys { asked, theirs: Some(keys), ours: listed };
                self.compare_keys();
            }
            (phase, told) => {
                self.phase = phase;
                let what = match told {
                    Told::Branches { .. } => "branches",
                    Told::Segments(_) => "segments",
                    Told::Keys(_) => "keys",
                };
                self.fail(format!("{what} told when not asked"))
            }
        }
    }

    /// This node's keys in the segments of the last [`Step::List`].
    pub fn listed(&mut self, keys: Vec<(Vec<u8>, u64)>) {
        if let Phase::Keys { ours: ours @ None, .. } = &mut self.phase {
            *ours = Some(keys);
            self.compare_keys();
        }
    }

    /// The keys of the last [`Step::Repair`] were sent both ways.
    pub fn repaired(&mut self) {
        if matches!(self.phase, Phase::Repairing) {
            self.next_segments();
        }
    }

    /// Asks for the next branches' segments, or the next segments' keys,
    /// or ends.
    fn next_segments(&mut self) {
        if !self.branches.is_empty() {
            let take = self.branches.len().min(BRANCHES);
            let asked: Vec<u16> = self.branches.drain(..take).collect();
            self.steps.push_back(Step::Ask(Ask::Segments(asked.clone())));
            self.phase = Phase::Segments { asked };
            return;
        }
        if self.segments.is_empty() {
            return self.end();
        }
        let take = self.segments.len().min(self.segments_per_ask);
        let asked: Vec<Segment> = self.segments.drain(..take).collect();
        self.steps.push_back(Step::Ask(Ask::Keys(asked.clone())));
        self.steps.push_back(Step::List(asked.clone()));
        self.phase = Phase::Keys { asked, theirs: None, ours: None };
    }

    /// Once both lists are in: the keys whose leaves differ.
    fn compare_keys(&mut self) {
        let Phase::Keys { asked, theirs: Some(theirs), ours: Some(ours) } = &mut self.phase else { return };
        let in_asked = |key: &[u8]| asked.contains(&segment_of(key));
        let mut leaves: BTreeMap<Vec<u8>, (u64, u64)> = BTreeMap::new();
        for (key, leaf) in std::mem::take(ours).into_iter().filter(|(key, _)| in_asked(key)) {
            leaves.entry(key).or_default().0 = leaf;
        }
        for (key, leaf) in std::mem::take(theirs).into_iter().filter(|(key, _)| in_asked(key)) {
            leaves.entry(key).or_default().1 = leaf;
        }
        self.summary.segments_compared += asked.len();
        let differing: Vec<Vec<u8>> = leaves.into_iter().filter(|(_, (a, b))| a != b).map(|(key, _)| key).collect();
        if differing.is_empty() {
            return self.next_segments();
        }
        self.summary.keys_repaired += differing.len();
        self.steps.push_back(Step::Repair(differing));
        self.phase = Phase::Repairing;
    }

    fn end(&mut self) {
        self.phase = Phase::Over;
        self.steps.push_back(Step::Done(Outcome::Synced(self.summary.clone())));
    }

    fn fail(&mut self, why: String) {
        self.phase = Phase::Over;
        self.steps.clear();
        self.steps.push_back(Step::Done(Outcome::Failed(why)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_ring::{BatchId, Hlc, NodeId, Version};

    /// One replica's keys, and its tree kept as writes come.
    #[derive(Clone, Debug, Default)]
    struct Replica {
        data: BTreeMap<Vec<u8>, Siblings>,
        tree: Tree,
    }

    impl Replica {
        fn write(&mut self, key: &[u8], siblings: Siblings) {
            let old = leaf(key, self.data.get(key));
            let merged = self.data.entry(key.to_vec()).or_default();
            merged.merge(siblings);
            let new = leaf(key, Some(merged));
            self.tree.change(key, old, new);
        }

        fn list(&self, segments: &[Segment]) -> Vec<(Vec<u8>, u64)> {
            let keys = self.data.iter().filter(|(key, _)| segments.contains(&segment_of(key)));
            keys.map(|(key, siblings)| (key.clone(), leaf(key, Some(siblings)))).collect()
        }

        /// A tree built from scratch over what it holds.
        fn rebuilt(&self) -> Tree {
            let mut tree = Tree::default();
            for (key, siblings) in &self.data {
                tree.change(key, 0, leaf(key, Some(siblings)));
            }
            tree
        }
    }

    fn version(hlc: u64, node: u64, value: Option<u8>) -> Version {
        Version {
            hlc: Hlc(hlc),
            origin: BatchId { node: NodeId(node), counter: hlc },
            causal: None,
            value: value.map(|v| vec![v]),
        }
    }

    /// Runs an exchange from `a` with `b` to its end, repairing both ways;
    /// the outcome, and the bytes the answers took.
    fn exchange(a: &mut Replica, b: &mut Replica, segments_per_ask: usize) -> (Outcome, usize) {
        let mut exchange = Exchange::start(segments_per_ask);
        let mut bytes = 0;
        for _ in 0..100_000 {
            let Some(step) = exchange.poll() else { panic!("an exchange waits for nothing") };
            match step {
                Step::Ask(ask) => {
                    let told = answer(&b.tree, &ask, segments_per_ask, |s| b.list(s)).unwrap();
                    bytes += postcard::to_allocvec(&told).unwrap().len();
                    exchange.told(told, &a.tree);
                }
                Step::List(segments) => exchange.listed(a.list(&segments)),
                Step::Repair(keys) => {
                    for key in keys {
                        let (ours, theirs) = (a.data.get(&key).cloned(), b.data.get(&key).cloned());
                        bytes += postcard::to_allocvec(&theirs).unwrap().len();
                        if let Some(ours) = ours {
                            b.write(&key, ours);
                        }
                        if let Some(theirs) = theirs {
                            a.write(&key, theirs);
                        }
                    }
                    exchange.repaired();
                }
                Step::Done(outcome) => return (outcome, bytes),
            }
        }
        panic!("an exchange that does not end")
    }

    fn keys_repaired(outcome: &Outcome) -> usize {
        match outcome {
            Outcome::Synced(summary) => summary.keys_repaired,
            Outcome::Failed(why) => panic!("failed: {why}"),
        }
    }

    #[test]
    fn a_segment_is_one_span_of_tokens() {
        assert_eq!(segment_tokens(0), (0, (1 << SEGMENT_SHIFT) - 1));
        assert_eq!(segment_tokens(SEGMENTS as u16 - 1).1, u64::MAX);
        for key in [&b"a"[..], b"bb", b"some key"] {
            let (first, last) = segment_tokens(segment_of(key));
            assert!((first..=last).contains(&key_token(key)));
        }
    }

    #[test]
    fn replicas_in_sync_compare_roots_only() {
        let (mut a, mut b) = (Replica::default(), Replica::default());
        for i in 0..100u64 {
            a.write(&i.to_be_bytes(), Siblings::one(version(i + 1, 1, Some(1))));
            b.write(&i.to_be_bytes(), Siblings::one(version(i + 1, 1, Some(1))));
        }
        let (outcome, bytes) = exchange(&mut a, &mut b, 64);
        assert_eq!(outcome, Outcome::Synced(Summary::default()));
        assert!(bytes < 600, "only the branches were sent: {bytes} bytes");
    }

    #[test]
    fn one_differing_key_among_many_costs_a_few_kilobytes() {
        let (mut a, mut b) = (Replica::default(), Replica::default());
        for i in 0..200_000u64 {
            let siblings = Siblings::one(version(i + 1, 1, Some(1)));
            a.write(&i.to_be_bytes(), siblings.clone());
            b.write(&i.to_be_bytes(), siblings);
        }
        b.write(&7u64.to_be_bytes(), Siblings::one(version(1_000_000, 2, Some(2))));
        let (outcome, bytes) = exchange(&mut a, &mut b, 64);
        assert_eq!(keys_repaired(&outcome), 1);
        assert_eq!(a.data, b.data);
        // Branches, one branch's segments, one segment's ~50 keys, one set.
        assert!(bytes < 8 << 10, "{bytes} bytes");
    }

    #[test]
    fn an_answer_that_was_not_asked_for_fails_the_exchange() {
        let tree = Tree::default();
        let mut exchange = Exchange::start(8);
        assert_eq!(exchange.poll(), Some(Step::Ask(Ask::Branches)));
        exchange.told(Told::Keys(vec![(b"k".to_vec(), 1)]), &tree);
        assert!(matches!(exchange.poll(), Some(Step::Done(Outcome::Failed(_)))));

        let mut exchange = Exchange::start(8);
        exchange.poll();
        exchange.told(Told::Branches { root: 1, branches: vec![0; 3] }, &tree);
        assert!(matches!(exchange.poll(), Some(Step::Done(Outcome::Failed(_)))));

        let mut exchange = Exchange::start(8);
        exchange.poll();
        let mut branches = vec![0; BRANCHES];
        branches[5] = 9;
        exchange.told(Told::Branches { root: 9, branches }, &tree);
        assert_eq!(exchange.poll(), Some(Step::Ask(Ask::Segments(vec![5]))));
        exchange.told(Told::Segments(vec![(6, vec![0; SEGMENTS_PER_BRANCH])]), &tree);
        assert!(matches!(exchange.poll(), Some(Step::Done(Outcome::Failed(_)))));
    }

    #[test]
    fn an_ask_past_its_bounds_gets_no_answer() {
        let tree = Tree::default();
        let none = |_: &[Segment]| Vec::new();
        assert_eq!(answer(&tree, &Ask::Keys((0..65).collect()), 64, none), None);
        assert_eq!(answer(&tree, &Ask::Keys(vec![SEGMENTS as u16]), 64, none), None);
        assert_eq!(answer(&tree, &Ask::Segments(vec![BRANCHES as u16]), 64, none), None);
        assert!(answer(&tree, &Ask::Keys((0..64).collect()), 64, none).is_some());
    }

    #[test]
    fn keys_listed_outside_the_segments_asked_are_left_out() {
        let (mut a, b) = (Replica::default(), Replica::default());
        a.write(b"k", Siblings::one(version(5, 1, Some(1))));
        let mut exchange = Exchange::start(64);
        exchange.poll();
        exchange.told(answer(&b.tree, &Ask::Branches, 64, |_| Vec::new()).unwrap(), &a.tree);
        let Some(Step::Ask(ask)) = exchange.poll() else { panic!() };
        exchange.told(answer(&b.tree, &ask, 64, |_| Vec::new()).unwrap(), &a.tree);
        let Some(Step::Ask(Ask::Keys(segments))) = exchange.poll() else { panic!() };
        assert_eq!(segments, vec![segment_of(b"k")]);
        let stranger = (0u32..).map(|i| i.to_be_bytes().to_vec()).find(|k| segment_of(k) != segments[0]).unwrap();
        exchange.told(Told::Keys(vec![(stranger, 77)]), &a.tree);
        assert_eq!(exchange.poll(), Some(Step::List(segments.clone())));
        exchange.listed(a.list(&segments));
        assert_eq!(exchange.poll(), Some(Step::Repair(vec![b"k".to_vec()])));
    }

    /// A key's write: which replicas get it (bits 0 and 1), the key, and
    /// its version's stamp and origin node (which make its value: one
    /// stamp is one version).
    fn writes() -> impl Strategy<Value = Vec<(u8, u8, u64, u64)>> {
        prop::collection::vec((1u8..4, 0u8..40, 1u64..1000, 1u64..4), 0..300)
    }

    proptest! {
        /// Replicas that diverged in any way end with the same data and
        /// the same tree after one exchange; a second repairs nothing; the
        /// trees kept by writes equal trees rebuilt from the data.
        #[test]
        fn replicas_that_diverged_converge_and_a_second_exchange_repairs_nothing(
            writes in writes(),
            segments_per_ask in 1usize..100,
        ) {
            let (mut a, mut b) = (Replica::default(), Replica::default());
            for (to, key, hlc, node) in writes {
                let key = format!("key{key}").into_bytes();
                let deletes = hlc % 5 == 0;
                let siblings = Siblings::one(version(hlc, node, (!deletes).then_some(node as u8)));
                if to & 1 != 0 {
                    a.write(&key, siblings.clone());
                }
                if to & 2 != 0 {
                    b.write(&key, siblings);
                }
            }
            let keys: std::collections::BTreeSet<_> = a.data.keys().chain(b.data.keys()).cloned().collect();
            let differing = keys.iter().filter(|k| a.data.get(*k) != b.data.get(*k)).count();
            let (outcome, _) = exchange(&mut a, &mut b, segments_per_ask);
            prop_assert_eq!(keys_repaired(&outcome), differing);
            prop_assert_eq!(&a.data, &b.data);
            prop_assert_eq!(&a.tree, &b.tree);
            prop_assert_eq!(&a.tree, &a.rebuilt());
            let (again, _) = exchange(&mut a, &mut b, segments_per_ask);
            prop_assert_eq!(again, Outcome::Synced(Summary::default()));
        }
    }
}
