//! Property tests of the version merge over random histories.
//!
//! A history runs on 3 to 5 replicas that all hold the same few keys: blind
//! writes and deletes, bulk sets over every key (one stamp), reads of a
//! key's context from one or two replicas, and causal writes made later
//! with such a context through a random coordinator, which merges the new
//! version into its own siblings and sends the whole resulting set. Every
//! message is delivered in random order; some are duplicated, some lost and
//! redelivered at the end, then anti-entropy merges everything everywhere.
//!
//! Checked: replicas that received the same versions hold the same siblings
//! and winner, and that is the merge of every version ever made (the order
//! of arrival does not matter); merge is commutative, associative and
//! idempotent, and decoding a whole set at once keeps what merging its
//! versions one at a time keeps; dominance is transitive; a causal write covers only versions
//! its reader knew (or that something it knew dominates); two bulk sets are
//! never end mixed on any replica.
//!
//! More and longer histories: `PROPTEST_CASES=2000
//! QUIVER_HISTORY_STEPS=200 QUIVER_HISTORY_NODES=7 cargo test -p
//! quiver-ring --test versions` (defaults: 256 cases, 80 steps, 5 nodes).

use std::collections::BTreeSet;

use proptest::prelude::*;
use quiver_ring::{Context, Hlc, NodeId, Order, Siblings, Stamper, Version};

const KEYS: usize = 2;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One step of a history; the numbers pick among what exists at that step.
#[derive(Clone, Debug)]
enum Step {
    Blind { coordinator: usize, key: usize, delete: bool, lost: u8, duplicated: u8 },
    Bulk { coordinator: usize, lost: u8, duplicated: u8 },
    Read { first: usize, second: Option<usize>, key: usize },
    Causal { context: usize, coordinator: usize, lost: u8, duplicated: u8 },
    Deliver { message: usize },
    Tick { node: usize },
}

fn step() -> impl Strategy<Value = Step> {
    let n = 16usize;
    prop_oneof![
        2 => (0..n, 0..KEYS, any::<bool>(), any::<u8>(), any::<u8>()).prop_map(|(coordinator, key, delete, lost, duplicated)| {
            Step::Blind { coordinator, key, delete, lost, duplicated }
        }),
        1 => (0..n, any::<u8>(), any::<u8>()).prop_map(|(coordinator, lost, duplicated)| Step::Bulk { coordinator, lost, duplicated }),
        3 => (0..n, proptest::option::of(0..n), 0..KEYS).prop_map(|(first, second, key)| Step::Read { first, second, key }),
        3 => (0..n, 0..n, any::<u8>(), any::<u8>()).prop_map(|(context, coordinator, lost, duplicated)| {
            Step::Causal { context, coordinator, lost, duplicated }
        }),
        4 => (0..64usize).prop_map(|message| Step::Deliver { message }),
        1 => (0..n).prop_map(|node| Step::Tick { node }),
    ]
}

/// Whole sibling sets on their way to a replica: of one key, or of every
/// key of a bulk set (one record, applied at once).
#[derive(Clone, Debug)]
struct Message {
    to: usize,
    sets: Vec<(usize, Siblings)>,
}

/// A context read by a client, with everything the replicas it read from
/// had ever received (what the reader could have known).
#[derive(Clone, Debug)]
struct Read {
    key: usize,
    context: Context,
    known: BTreeSet<Order>,
}

#[derive(Debug)]
struct History {
    nodes: usize,
    state: Vec<Vec<Siblings>>,
    /// Per replica, the orders of every version it ever received, per key.
    received: Vec<Vec<BTreeSet<Order>>>,
    stampers: Vec<Stamper>,
    /// Wall clocks: a shared time plus a skew per node.
    now: u64,
    skew: Vec<u64>,
    inbox: Vec<Message>,
    lost: Vec<Message>,
    reads: Vec<Read>,
    /// Every version made, per key.
    made: Vec<Vec<Version>>,
    /// Causal writes made, with what their reader knew.
    causal_checks: Vec<(usize, Version, BTreeSet<Order>)>,
    /// Orders of bulk sets, and which of them each replica has received.
    bulk_orders: BTreeSet<Order>,
}

impl History {
    fn new(nodes: usize) -> History {
        History {
            nodes,
            state: vec![vec![Siblings::default(); KEYS]; nodes],
            received: vec![vec![BTreeSet::new(); KEYS]; nodes],
            stampers: (0..nodes).map(|n| Stamper::new(NodeId(n as u64 + 1), Hlc::ZERO, u64::MAX)).collect(),
            now: 1,
            skew: (0..nodes).map(|n| (n as u64 * 7) % 3).collect(),
            inbox: Vec::new(),
            lost: Vec::new(),
            reads: Vec::new(),
            made: vec![Vec::new(); KEYS],
            causal_checks: Vec::new(),
            bulk_orders: BTreeSet::new(),
        }
    }

    fn wall(&self, node: usize) -> u64 {
        self.now + self.skew[node]
    }

    /// A replica merges versions in, and adopts their timestamps, as a
    /// replica does with what it receives. One record: every key at once.
    fn apply(&mut self, to: usize, sets: &[(usize, Siblings)]) {
        for (key, versions) in sets {
            for version in versions.versions() {
                self.received[to][*key].insert(version.order());
                let now = self.wall(to);
                self.stampers[to].observe(version.hlc, now).unwrap();
            }
            self.state[to][*key].merge(versions.clone());
        }
    }

    fn send(&mut self, from: usize, sets: Vec<(usize, Siblings)>, lost: u8, duplicated: u8) {
        for to in (0..self.nodes).filter(|&to| to != from) {
            let message = Message { to, sets: sets.clone() };
            if lost & (1 << to) != 0 {
                self.lost.push(message);
                continue;
            }
            if duplicated & (1 << to) != 0 {
                self.inbox.push(message.clone());
            }
            self.inbox.push(message);
        }
    }

    fn stamp(&mut self, node: usize) -> quiver_ring::Stamp {
        self.now += 1;
        let now = self.wall(node);
        self.stampers[node].next(now).unwrap()
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Blind { coordinator, key, delete, lost, duplicated } => {
                let c = coordinator % self.nodes;
                let version = self.stamp(c).blind((!delete).then(|| vec![key as u8]));
                self.made[key].push(version.clone());
                let sets = vec![(key, Siblings::one(version))];
                self.apply(c, &sets);
                self.send(c, sets, lost, duplicated);
            }
            Step::Bulk { coordinator, lost, duplicated } => {
                let c = coordinator % self.nodes;
                let stamp = self.stamp(c);
                self.bulk_orders.insert((stamp.hlc, stamp.origin()));
                let mut sets = Vec::new();
                for key in 0..KEYS {
                    let version = stamp.blind(Some(vec![b'b', key as u8]));
                    self.made[key].push(version.clone());
                    sets.push((key, Siblings::one(version)));
                }
                self.apply(c, &sets);
                self.send(c, sets, lost, duplicated);
            }
            Step::Read { first, second, key } => {
                let replicas: BTreeSet<usize> =
                    std::iter::once(first % self.nodes).chain(second.map(|s| s % self.nodes)).collect();
                let mut seen = Siblings::default();
                let mut known = BTreeSet::new();
                for &r in &replicas {
                    seen.merge(self.state[r][key].clone());
                    known.extend(self.received[r][key].iter().copied());
                }
                self.reads.push(Read { key, context: seen.context(), known });
            }
            Step::Causal { context, coordinator, lost, duplicated } => {
                if self.reads.is_empty() {
                    return;
                }
                let read = self.reads.remove(context % self.reads.len());
                let c = coordinator % self.nodes;
                // Stamped above the context, as the node does.
                let now = self.wall(c);
                self.stampers[c].observe(read.context.max_hlc, now).unwrap();
                let version = self.stamp(c).causal(read.context.clone(), Some(vec![b'c']));
                self.made[read.key].push(version.clone());
                self.causal_checks.push((read.key, version.clone(), read.known));
                self.apply(c, &[(read.key, Siblings::one(version))]);
                // The whole resulting sibling set goes out.
                let whole = self.state[c][read.key].clone();
                self.send(c, vec![(read.key, whole)], lost, duplicated);
            }
            Step::Deliver { message } => {
                if !self.inbox.is_empty() {
                    let m = self.inbox.remove(message % self.inbox.len());
                    self.apply(m.to, &m.sets);
                }
            }
            Step::Tick { node } => self.skew[node % self.nodes] += 1,
        }
    }

    /// A replica that has received bulk set Y shows no key of an earlier
    /// bulk set X: X and Y do not end mixed. (Before the end they may:
    /// whole sibling sets of one key, sent by a causal write or read
    /// repair, carry a bulk set's version of that key alone.)
    fn check_bulk_sets_unmixed(&self, replica: usize) {
        let received: BTreeSet<Order> =
            self.received[replica].iter().flatten().filter(|o| self.bulk_orders.contains(o)).copied().collect();
        let Some(&newest) = received.iter().next_back() else { return };
        for (key, siblings) in self.state[replica].iter().enumerate() {
            for version in siblings.versions() {
                assert!(
                    !(self.bulk_orders.contains(&version.order()) && version.order() < newest),
                    "replica {replica} shows bulk set {:?} on key {key} after receiving bulk set {newest:?}",
                    version.order()
                );
            }
        }
    }

    /// Redelivers everything (the inbox in a shuffled order, then what was
    /// lost), then anti-entropy: every replica merges every other's set.
    fn finish(&mut self, shuffle: u64) {
        let mut pending: Vec<Message> = std::mem::take(&mut self.inbox);
        pending.append(&mut self.lost);
        let mut rng = quiver_ring::rand::SplitMix64::new(shuffle);
        while !pending.is_empty() {
            let m = pending.swap_remove((rng.next_u64() % pending.len() as u64) as usize);
            self.apply(m.to, &m.sets);
        }
        for key in 0..KEYS {
            for from in 0..self.nodes {
                for to in 0..self.nodes {
                    let versions = self.state[from][key].clone();
                    self.apply(to, &[(key, versions)]);
                }
            }
        }
        for replica in 0..self.nodes {
            self.check_bulk_sets_unmixed(replica);
        }
    }
}

fn check(steps: Vec<Step>, nodes: usize, shuffle: u64) -> Result<(), TestCaseError> {
    let mut history = History::new(nodes);
    for step in steps {
        history.run(step);
    }
    history.finish(shuffle);
    for key in 0..KEYS {
        let all = &history.made[key];
        let expected = Siblings::from_versions(all.clone());
        for replica in 0..nodes {
            prop_assert_eq!(&history.state[replica][key], &expected, "replica {} key {}", replica, key);
        }
        // The merge of every version made, in reverse order, is the same.
        prop_assert_eq!(&Siblings::from_versions(all.iter().rev().cloned().collect()), &expected);
        check_transitive(all)?;
        check_algebra(all, shuffle)?;
    }
    for (key, write, known) in &history.causal_checks {
        let Some(causal) = &write.causal else { continue };
        let knew: Vec<&Version> = history.made[*key].iter().filter(|v| known.contains(&v.order())).collect();
        for version in &history.made[*key] {
            let covered = version.causal.as_ref().is_some_and(|c| causal.context.vv.covers(c.dot));
            if covered && !known.contains(&version.order()) && !knew.iter().any(|k| k.dominates(version)) {
                return Err(TestCaseError::fail(format!(
                    "causal write {:?} covers {:?}, which its reader never knew",
                    write.order(),
                    version.order()
                )));
            }
        }
    }
    Ok(())
}

fn check_transitive(all: &[Version]) -> Result<(), TestCaseError> {
    for u in all {
        for w in all.iter().filter(|w| u.dominates(w)) {
            for v in all.iter().filter(|v| w.dominates(v) && v.order() != u.order()) {
                prop_assert!(u.dominates(v), "not transitive: {:?} > {:?} > {:?}", u.order(), w.order(), v.order());
            }
        }
    }
    Ok(())
}

/// Merge is commutative, associative and idempotent on subsets of what was
/// made.
fn check_algebra(all: &[Version], seed: u64) -> Result<(), TestCaseError> {
    // Decoding a set at once (sorted, O(n log n)) keeps what merging its
    // versions in one at a time keeps, in any order.
    let mut order: Vec<Version> = all.to_vec();
    for _ in 0..4 {
        let mut one_at_a_time = Siblings::default();
        order.iter().for_each(|version| one_at_a_time.insert(version.clone()));
        prop_assert_eq!(Siblings::from_versions(order.clone()), one_at_a_time);
        let turn = (seed as usize) % order.len().max(1);
        order.reverse();
        order.rotate_left(turn);
    }
    let mut rng = quiver_ring::rand::SplitMix64::new(seed);
    let mut subset = || {
        let picked: Vec<Version> = all.iter().filter(|_| rng.next_u64().is_multiple_of(2)).cloned().collect();
        Siblings::from_versions(picked)
    };
    let merged = |a: &Siblings, b: &Siblings| {
        let mut m = a.clone();
        m.merge(b.clone());
        m
    };
    for _ in 0..8 {
        let (a, b, c) = (subset(), subset(), subset());
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        prop_assert_eq!(merged(&a, &a), a.clone());
    }
    Ok(())
}

proptest! {
    #[test]
    fn replicas_converge_whatever_the_order_of_delivery(
        nodes in 3usize..=env_or("QUIVER_HISTORY_NODES", 5).max(3),
        steps in proptest::collection::vec(step(), 1..=env_or("QUIVER_HISTORY_STEPS", 80)),
        shuffle in any::<u64>(),
    ) {
        check(steps, nodes, shuffle)?;
    }
}

fn blind(node: u64, hlc: u64, value: &str) -> Version {
    quiver_ring::Stamp { node: NodeId(node), hlc: Hlc(hlc) }.blind(Some(value.as_bytes().to_vec()))
}

/// A blind write below a causal write that covers it, and that causal
/// write: the causal one wins in both orders (the first model let them
/// supersede each other).
#[test]
fn regression_a_causal_write_stamped_above_a_blind_one_it_covers_wins_in_both_orders() {
    let b = blind(1, 50, "blind");
    let mut stamper = Stamper::new(NodeId(2), Hlc(10), u64::MAX);
    let context = Siblings::one(b.clone()).context();
    stamper.observe(context.max_hlc, 0).unwrap();
    let c = stamper.next(0).unwrap().causal(context, Some(b"causal".to_vec()));
    assert!(c.hlc > b.hlc, "stamped above its context");
    for order in [vec![b.clone(), c.clone()], vec![c.clone(), b.clone()]] {
        assert_eq!(Siblings::from_versions(order).versions(), std::slice::from_ref(&c));
    }
}
