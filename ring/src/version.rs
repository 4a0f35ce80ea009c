//! Versions of a key and the one rule for merging them (versions v2;
//! docs/versions.md).
//!
//! A key maps to its live versions, the *siblings*. Every version has an
//! `order = (hlc, origin)`: its [`Hlc`] and the [`BatchId`] of the write or
//! bulk set that made it, total and unique per key. Two kinds of write make
//! versions:
//! - a *blind* write (`set`, `delete`, `bulk_set`) reads nothing: last
//!   writer wins by `order`, and a bulk set shares one `order` on all its
//!   keys, so it wins or loses on all of them together;
//! - a *causal* write (`set_with_context`) carries the [`Context`] its
//!   writer read, and a [`Dot`]: the node that stamped it and that node's
//!   [`Hlc`] stamp, unique to that node for ever.
//!
//! `w` *dominates* `v` when `v`'s dot is covered by `w`'s context's version
//! vector, or `v.order` is at most `w`'s context's floor, or `w` is blind
//! and `v.order < w.order`. The merge of any versions keeps those that
//! nothing among them dominates. With the rules of the design (contexts are
//! causally closed, a causal write is stamped above its context, dots are
//! HLC stamps, causal writes replicate whole sibling sets) dominance is
//! transitive, so the merge is commutative, associative and idempotent:
//! whatever order versions arrive in, through memtables, tables,
//! compaction, decoding or replicas, the same versions leave the same
//! siblings. `docs/versions.md` gives the argument; the property tests
//! in `tests/versions.rs` check it over random histories.
//!
//! Every [`Siblings`] is built by that merge, decoding included: there is
//! no way to make one that skips it. No merge drops a version to bound the
//! set: siblings are bounded where causal writes make them
//! ([`SIBLINGS_MAX`], enforced by the node that stamps the write).

// This module decodes bytes from disk and the network.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::clock::{ClockError, Hlc, HlcClock};

/// Most siblings a causal write may leave at the node that stamps it; one
/// that would leave more is refused (`TooManySiblings`).
pub const SIBLINGS_MAX: usize = 64;

/// A node's identity on the ring and in version vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// The id of the write or batch that made a version: the node that stamped
/// it and its stamp there. All keys of one bulk set share it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchId {
    pub node: NodeId,
    pub counter: u64,
}

/// A version's place in the total order: last writer wins by it.
pub type Order = (Hlc, BatchId);

/// One causal event: the node that stamped a causal write and its stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub hlc: Hlc,
}

/// For each node, the highest causal dot seen from it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, Hlc>);

impl VersionVector {
    /// Whether this vector has seen `dot`.
    pub fn covers(&self, dot: Dot) -> bool {
        self.0.get(&dot.node).is_some_and(|&seen| seen >= dot.hlc)
    }

    /// Adds one event.
    pub fn add(&mut self, dot: Dot) {
        let seen = self.0.entry(dot.node).or_insert(dot.hlc);
        *seen = (*seen).max(dot.hlc);
    }

    /// Pointwise maximum with `other`.
    pub fn join(&mut self, other: &VersionVector) {
        for (&node, &hlc) in &other.0 {
            self.add(Dot { node, hlc });
        }
    }

    /// Every node and its highest dot.
    pub fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        self.0.iter().map(|(&node, &hlc)| Dot { node, hlc })
    }
}

/// What a reader saw: the context a causal write carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Context {
    /// The causal dots seen, and the dots those versions had seen.
    pub vv: VersionVector,
    /// The highest `order` of a blind version seen (or that a version seen
    /// had seen): everything at or below it is covered.
    pub floor: Option<Order>,
    /// The highest hlc of anything seen; a write with this context is
    /// stamped above it.
    pub max_hlc: Hlc,
}

impl Context {
    /// Whether a writer holding this context saw `version` (or something
    /// that dominates it).
    pub fn covers(&self, version: &Version) -> bool {
        version.causal.as_ref().is_some_and(|causal| self.vv.covers(causal.dot))
            || self.floor.is_some_and(|floor| version.order() <= floor)
    }
}

/// What a causal write has besides what every version has.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Causal {
    pub dot: Dot,
    pub context: Context,
}

/// One version of one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: BatchId,
    /// `None`: a blind write. `Some`: a causal write, its dot and context
    /// (boxed: most versions are blind, and stay small in memory).
    pub causal: Option<Box<Causal>>,
    /// `None` is a tombstone.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl Version {
    /// The total order used by last-writer-wins and by [`Siblings::winner`].
    pub fn order(&self) -> Order {
        (self.hlc, self.origin)
    }

    /// Whether this version was made by a blind write.
    pub fn is_blind(&self) -> bool {
        self.causal.is_none()
    }

    /// Whether this version is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether `self` makes `other` obsolete. Never true of a version and
    /// itself (same order).
    pub fn dominates(&self, other: &Version) -> bool {
        if self.order() == other.order() {
            return false;
        }
        match &self.causal {
            None => other.order() < self.order(),
            Some(causal) => causal.context.covers(other),
        }
    }
}

/// The live versions of one key, ordered by `(hlc, origin)`, oldest first.
/// Serialized as the list of versions; decoded through the merge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Siblings(Vec<Version>);

impl<'de> Deserialize<'de> for Siblings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Siblings, D::Error> {
        Vec::<Version>::deserialize(deserializer).map(Siblings::from_versions)
    }
}

impl Siblings {
    /// A single version.
    pub fn one(version: Version) -> Siblings {
        Siblings(vec![version])
    }

    /// The merge of any versions: those that no other among them dominates
    /// (of several with one order, the first). In O(n log n) over the
    /// versions and their contexts' entries, whatever their number: a
    /// decoded set from the network or disk may be large, and inserting
    /// one at a time would be quadratic.
    pub fn from_versions(mut versions: Vec<Version>) -> Siblings {
        versions.sort_by_key(Version::order);
        versions.dedup_by(|later, first| later.order() == first.order());
        // The last blind version dominates everything ordered before it.
        let last_blind = versions.iter().rposition(Version::is_blind);
        // A causal version covers what its context's floor and version
        // vector reach: the two highest of each, so that a version is never
        // judged by its own context.
        let mut floors = Top2::default();
        let mut vvs: BTreeMap<NodeId, Top2<Hlc>> = BTreeMap::new();
        for (i, version) in versions.iter().enumerate() {
            if let Some(causal) = &version.causal {
                if let Some(floor) = causal.context.floor {
                    floors.offer(floor, i);
                }
                for dot in causal.context.vv.dots() {
                    vvs.entry(dot.node).or_default().offer(dot.hlc, i);
                }
            }
        }
        let mut kept = Vec::with_capacity(versions.len().min(SIBLINGS_MAX));
        for (i, version) in versions.into_iter().enumerate() {
            let by_blind = last_blind.is_some_and(|last| i < last);
            let by_floor = floors.best_besides(i).is_some_and(|floor| version.order() <= floor);
            let by_vv = version.causal.as_ref().is_some_and(|causal| {
                let reach = vvs.get(&causal.dot.node).and_then(|top| top.best_besides(i));
                reach.is_some_and(|hlc| causal.dot.hlc <= hlc)
            });
            if !(by_blind || by_floor || by_vv) {
                kept.push(version);
            }
        }
        Siblings(kept)
    }

    /// The versions, oldest `(hlc, origin)` first.
    pub fn versions(&self) -> &[Version] {
        &self.0
    }

    /// Consumes the set into its versions.
    pub fn into_versions(self) -> Vec<Version> {
        self.0
    }

    /// Number of live versions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no version at all (not even a tombstone).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The version `get` returns: the highest `(hlc, origin)`.
    pub fn winner(&self) -> Option<&Version> {
        self.0.last()
    }

    /// The winning value, `None` when absent or deleted.
    pub fn value(&self) -> Option<&[u8]> {
        self.winner().and_then(|v| v.value.as_deref())
    }

    /// The winning value, moved out.
    pub fn into_value(mut self) -> Option<Vec<u8>> {
        self.0.pop().and_then(|v| v.value)
    }

    /// Whether every live version is a tombstone.
    pub fn all_tombstones(&self) -> bool {
        self.0.iter().all(Version::is_tombstone)
    }

    /// The lowest and highest timestamp of the versions (`(u64::MAX, 0)`
    /// when there are none, so folding more bounds in stays right).
    pub fn hlc_bounds(&self) -> (u64, u64) {
        self.0.iter().fold((u64::MAX, 0), |(min, max), v| (min.min(v.hlc.0), max.max(v.hlc.0)))
    }

    /// The context a reader of these siblings writes back with: every
    /// causal dot and context among them, and as floor the highest blind
    /// order or context floor. Causally closed: it covers what the versions
    /// read had seen.
    pub fn context(&self) -> Context {
        let mut context = Context::default();
        for version in &self.0 {
            context.max_hlc = context.max_hlc.max(version.hlc);
            let floor = match &version.causal {
                None => Some(version.order()),
                Some(causal) => {
                    context.vv.join(&causal.context.vv);
                    context.vv.add(causal.dot);
                    context.max_hlc = context.max_hlc.max(causal.context.max_hlc);
                    causal.context.floor
                }
            };
            context.floor = context.floor.max(floor);
        }
        context
    }

    /// Adds one version: drops it if a live version dominates it or is the
    /// same version, else drops what it dominates and keeps the set ordered.
    pub fn insert(&mut self, version: Version) {
        let order = version.order();
        if self.0.iter().any(|v| v.order() == order || v.dominates(&version)) {
            return;
        }
        self.0.retain(|v| !version.dominates(v));
        let at = self.0.partition_point(|v| v.order() < order);
        self.0.insert(at, version);
    }

    /// Merges another sibling set into this one.
    pub fn merge(&mut self, other: Siblings) {
        for version in other.0 {
            self.insert(version);
        }
    }
}

/// The two highest values offered, each with the index of the version it
/// came from (the higher first).
#[derive(Debug)]
struct Top2<T>([Option<(T, usize)>; 2]);

impl<T> Default for Top2<T> {
    fn default() -> Top2<T> {
        Top2([None, None])
    }
}

impl<T: Ord + Copy> Top2<T> {
    fn offer(&mut self, value: T, from: usize) {
        let [first, second] = &mut self.0;
        match *first {
            None => *first = Some((value, from)),
            Some((best, at)) if at == from => *first = Some((best.max(value), at)),
            Some((best, _)) if value > best => *second = first.replace((value, from)),
            Some(_) => {
                if second.is_none_or(|(other, _)| value > other) {
                    *second = Some((value, from));
                }
            }
        }
    }

    /// The highest value offered by a version other than `index`.
    fn best_besides(&self, index: usize) -> Option<T> {
        let [first, second] = self.0;
        match first {
            Some((value, at)) if at != index => Some(value),
            _ => second.map(|(value, _)| value),
        }
    }
}

/// Stamps writes on one node: one [`Hlc`] per write or batch, used for the
/// order, the batch id and, for a causal write, the dot.
#[derive(Clone, Debug)]
pub struct Stamper {
    node: NodeId,
    clock: HlcClock,
}

/// The identity of one write or batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub node: NodeId,
    pub hlc: Hlc,
}

impl Stamper {
    /// A stamper for `node` whose clock starts above `last` and accepts
    /// clocks at most `max_offset_ms` ahead of its wall clock.
    pub fn new(node: NodeId, last: Hlc, max_offset_ms: u64) -> Stamper {
        Stamper { node, clock: HlcClock::starting_after(last, max_offset_ms) }
    }

    /// Checks a timestamp seen elsewhere without adopting it.
    pub fn check(&self, seen: Hlc, now_ms: u64) -> Result<(), ClockError> {
        self.clock.check(seen, now_ms)
    }

    /// Moves the clock past a timestamp seen elsewhere (refused when too
    /// far ahead of the wall clock).
    pub fn observe(&mut self, seen: Hlc, now_ms: u64) -> Result<(), ClockError> {
        self.clock.observe(seen, now_ms)
    }

    /// The highest timestamp stamped or observed.
    pub fn last(&self) -> Hlc {
        self.clock.last()
    }

    /// See [`HlcClock::wait_before_stamp_ms`].
    pub fn wait_before_stamp_ms(&self, seen: Hlc, now_ms: u64) -> u64 {
        self.clock.wait_before_stamp_ms(seen, now_ms)
    }

    /// The stamp of the next write, given the wall clock.
    pub fn next(&mut self, now_ms: u64) -> Result<Stamp, ClockError> {
        Ok(Stamp { node: self.node, hlc: self.clock.tick(now_ms)? })
    }
}

impl Stamp {
    /// The write or batch id of this stamp.
    pub fn origin(&self) -> BatchId {
        BatchId { node: self.node, counter: self.hlc.0 }
    }

    /// A blind (last-writer-wins) version with this stamp.
    pub fn blind(&self, value: Option<Vec<u8>>) -> Version {
        Version { hlc: self.hlc, origin: self.origin(), causal: None, value }
    }

    /// A causal version with this stamp, written with `context`. The stamp
    /// must be above everything the context covers.
    pub fn causal(&self, context: Context, value: Option<Vec<u8>>) -> Version {
        debug_assert!(self.hlc > context.max_hlc, "a causal write is stamped above its context");
        let causal = Causal { dot: Dot { node: self.node, hlc: self.hlc }, context };
        Version { hlc: self.hlc, origin: self.origin(), causal: Some(Box::new(causal)), value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(node: u64, hlc: u64) -> Stamp {
        Stamp { node: NodeId(node), hlc: Hlc(hlc) }
    }

    fn blind(node: u64, hlc: u64, value: Option<&str>) -> Version {
        stamp(node, hlc).blind(value.map(|s| s.as_bytes().to_vec()))
    }

    fn causal(node: u64, hlc: u64, context: Context, value: &str) -> Version {
        stamp(node, hlc).causal(context, Some(value.as_bytes().to_vec()))
    }

    fn values(set: &Siblings) -> Vec<&[u8]> {
        set.versions().iter().filter_map(|v| v.value.as_deref()).collect()
    }

    #[test]
    fn blind_write_with_higher_stamp_wins_in_any_order() {
        let old = blind(1, 10, Some("old"));
        let new = blind(2, 20, Some("new"));
        let a = Siblings::from_versions(vec![old.clone(), new.clone()]);
        let b = Siblings::from_versions(vec![new, old]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
        assert_eq!(a.value(), Some(&b"new"[..]));
    }

    #[test]
    fn tombstone_hides_value_and_stays_as_a_version() {
        let set = Siblings::from_versions(vec![blind(1, 10, Some("v")), blind(1, 11, None)]);
        assert_eq!(set.value(), None);
        assert_eq!(set.len(), 1);
        assert!(set.all_tombstones());
    }

    #[test]
    fn causal_write_keeps_what_it_did_not_see() {
        let seen = blind(1, 10, Some("seen"));
        let unseen = causal(2, 12, Context::default(), "unseen");
        let context = Siblings::one(seen.clone()).context();
        let write = causal(3, 15, context, "write");
        let set = Siblings::from_versions(vec![seen, unseen, write]);
        assert_eq!(values(&set), vec![&b"unseen"[..], b"write"]);
    }

    /// The counterexample to the first model: C blind (node 1, hlc
    /// 10), B blind (node 2, hlc 20), A causal whose context covers B (hlc
    /// 30). The old rule left {A} in one order and {A, C} in another.
    #[test]
    fn regression_blind_blind_causal_merges_the_same_in_every_order() {
        let c = blind(1, 10, Some("C"));
        let b = blind(2, 20, Some("B"));
        let a = causal(3, 30, Siblings::one(b.clone()).context(), "A");
        let orders = [[&c, &b, &a], [&a, &c, &b], [&b, &a, &c], [&c, &a, &b], [&a, &b, &c], [&b, &c, &a]];
        for order in orders {
            let set = Siblings::from_versions(order.iter().map(|&v| v.clone()).collect());
            assert_eq!(values(&set), vec![&b"A"[..]], "order {:?}", order.map(|v| v.hlc));
        }
    }

    /// A context carries the highest hlc it covers, so a write made with it
    /// is stamped above what it supersedes, and a context's floor covers
    /// the blind versions below it.
    #[test]
    fn a_read_context_is_causally_closed() {
        let b1 = blind(1, 10, Some("b1"));
        let c1 = causal(2, 20, Siblings::one(b1.clone()).context(), "c1");
        let context = Siblings::one(c1.clone()).context();
        assert!(context.covers(&c1) && context.covers(&b1));
        assert_eq!(context.max_hlc, Hlc(20));
        assert!(!context.covers(&blind(3, 11, Some("later blind"))));
    }

    #[test]
    fn decoding_goes_through_the_merge() {
        let raw = vec![blind(2, 20, Some("new")), blind(1, 10, Some("old")), blind(2, 20, Some("new"))];
        let bytes = postcard::to_stdvec(&raw).unwrap();
        let set: Siblings = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(values(&set), vec![&b"new"[..]]);
    }
}
