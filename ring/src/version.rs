//! Versions of a key and the rule for merging them.
//!
//! A key maps to its live versions, the *siblings*. Every version carries:
//! - a [`Dot`]: the node that stamped it and that node's counter, unique
//!   cluster-wide;
//! - a causal context: `None` for a *blind* write (`set`, `delete`,
//!   `bulk_set`), `Some(vector)` for a *causal* write made with the context
//!   returned by a read of all versions;
//! - an [`Hlc`] timestamp and the [`BatchId`] of the write or batch that made
//!   it, which together order versions totally;
//! - the value, or `None` for a tombstone.
//!
//! One version *supersedes* another when:
//! - it is blind and its `(hlc, origin)` is higher: last writer wins, with the
//!   same winner on every replica, so a bulk set stamped with one
//!   `(hlc, origin)` wins or loses on all its keys together;
//! - it is causal and its context covers the other's dot.
//!
//! [`Siblings::merge`] keeps every version that no other version in the union
//! supersedes. It does not depend on the order in which versions arrive,
//! which lets the memtable, every SSTable and every replica apply it
//! independently and still agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::Hlc;

/// A node's identity on the ring and in version vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// One event: the node that stamped a version and its counter there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub counter: u64,
}

/// The id of the write or batch that made a version. All keys of one bulk set
/// share it. Ties on `hlc` are broken by it, so it is unique per write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchId {
    /// The node that coordinated the write.
    pub node: NodeId,
    /// That node's counter of writes and batches.
    pub counter: u64,
}

/// A version vector: for each node, the highest counter seen from it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<NodeId, u64>);

impl VersionVector {
    /// Whether this vector has seen `dot`.
    pub fn covers(&self, dot: Dot) -> bool {
        self.0.get(&dot.node).is_some_and(|&seen| seen >= dot.counter)
    }

    /// Adds one event.
    pub fn add(&mut self, dot: Dot) {
        let seen = self.0.entry(dot.node).or_insert(0);
        *seen = (*seen).max(dot.counter);
    }

    /// Pointwise maximum with `other`.
    pub fn join(&mut self, other: &VersionVector) {
        for (&node, &counter) in &other.0 {
            self.add(Dot { node, counter });
        }
    }
}

/// One version of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub dot: Dot,
    /// `None`: a blind write (last writer wins by `(hlc, origin)`).
    /// `Some`: a causal write that supersedes exactly what this covers.
    pub context: Option<VersionVector>,
    pub hlc: Hlc,
    pub origin: BatchId,
    /// `None` is a tombstone.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl Version {
    /// The total order used by last-writer-wins and by [`Siblings::winner`].
    pub fn order_key(&self) -> (Hlc, BatchId) {
        (self.hlc, self.origin)
    }

    /// Whether `self` makes `other` obsolete (never true for the same dot).
    pub fn supersedes(&self, other: &Version) -> bool {
        if self.dot == other.dot {
            return false;
        }
        match &self.context {
            None => other.order_key() < self.order_key(),
            Some(context) => context.covers(other.dot),
        }
    }

    /// Whether this version is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// The live versions of one key, ordered by `(hlc, origin)`, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Siblings(Vec<Version>);

impl Siblings {
    /// A single version.
    pub fn one(version: Version) -> Siblings {
        Siblings(vec![version])
    }

    /// Builds a sibling set from any versions, applying the merge rule.
    pub fn from_versions(versions: Vec<Version>) -> Siblings {
        let mut siblings = Siblings(Vec::with_capacity(versions.len()));
        for version in versions {
            siblings.insert(version);
        }
        siblings
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

    /// Whether every live version is a tombstone.
    pub fn all_tombstones(&self) -> bool {
        self.0.iter().all(Version::is_tombstone)
    }

    /// The lowest and highest timestamp of the versions (`(u64::MAX, 0)`
    /// when there are none, so folding more bounds in stays right).
    pub fn hlc_bounds(&self) -> (u64, u64) {
        self.0.iter().fold((u64::MAX, 0), |(min, max), v| (min.min(v.hlc.0), max.max(v.hlc.0)))
    }

    /// The causal context to write back with: every sibling's dot and context.
    pub fn context(&self) -> VersionVector {
        let mut context = VersionVector::default();
        for version in &self.0 {
            context.add(version.dot);
            if let Some(seen) = &version.context {
                context.join(seen);
            }
        }
        context
    }

    /// Adds one version: drops it if a live version supersedes it or has its
    /// dot, otherwise drops what it supersedes and keeps the set ordered.
    pub fn insert(&mut self, version: Version) {
        if self.0.iter().any(|v| v.dot == version.dot || v.supersedes(&version)) {
            return;
        }
        self.0.retain(|v| !version.supersedes(v));
        let at = self.0.partition_point(|v| v.order_key() <= version.order_key());
        self.0.insert(at, version);
    }

    /// Merges another sibling set into this one.
    pub fn merge(&mut self, other: Siblings) {
        for version in other.0 {
            self.insert(version);
        }
    }

    /// Keeps at most `max` versions, dropping the lowest `(hlc, origin)`.
    /// Returns how many were dropped.
    pub fn truncate_oldest(&mut self, max: usize) -> usize {
        let excess = self.0.len().saturating_sub(max.max(1));
        self.0.drain(..excess);
        excess
    }
}

/// Stamps writes on one node: one [`Hlc`] per write or batch, used for the
/// dot, the timestamp and the batch id alike. Dots stay unique across
/// restarts because the clock starts above every timestamp in the store.
#[derive(Clone, Debug)]
pub struct Stamper {
    node: NodeId,
    clock: crate::clock::HlcClock,
}

/// The identity of one write or batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub dot: Dot,
    pub hlc: Hlc,
    pub origin: BatchId,
}

impl Stamper {
    /// A stamper for `node` whose clock starts above `last`.
    pub fn new(node: NodeId, last: Hlc) -> Stamper {
        Stamper { node, clock: crate::clock::HlcClock::starting_after(last) }
    }

    /// Moves the clock past a timestamp seen elsewhere.
    pub fn observe(&mut self, seen: Hlc) {
        self.clock.observe(seen);
    }

    /// The highest timestamp stamped or observed.
    pub fn last(&self) -> Hlc {
        self.clock.last()
    }

    /// The stamp of the next write, given the wall clock.
    pub fn next(&mut self, now_physical_ms: u64) -> Stamp {
        let hlc = self.clock.tick(now_physical_ms);
        Stamp { dot: Dot { node: self.node, counter: hlc.0 }, hlc, origin: BatchId { node: self.node, counter: hlc.0 } }
    }
}

impl Stamp {
    /// A blind (last-writer-wins) version with this stamp.
    pub fn blind(&self, value: Option<Vec<u8>>) -> Version {
        Version { dot: self.dot, context: None, hlc: self.hlc, origin: self.origin, value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blind(node: u64, counter: u64, hlc: u64, value: Option<&str>) -> Version {
        Version {
            dot: Dot { node: NodeId(node), counter },
            context: None,
            hlc: Hlc(hlc),
            origin: BatchId { node: NodeId(node), counter },
            value: value.map(|s| s.as_bytes().to_vec()),
        }
    }

    #[test]
    fn blind_write_with_higher_stamp_wins_in_any_order() {
        let old = blind(1, 1, 10, Some("old"));
        let new = blind(2, 1, 20, Some("new"));
        let a = Siblings::from_versions(vec![old.clone(), new.clone()]);
        let b = Siblings::from_versions(vec![new, old]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
        assert_eq!(a.value(), Some(&b"new"[..]));
    }

    #[test]
    fn tombstone_hides_value_and_stays_as_a_version() {
        let set = Siblings::from_versions(vec![blind(1, 1, 10, Some("v")), blind(1, 2, 11, None)]);
        assert_eq!(set.value(), None);
        assert_eq!(set.len(), 1);
        assert!(set.all_tombstones());
    }

    #[test]
    fn causal_write_keeps_what_it_did_not_see() {
        let seen = blind(1, 1, 10, Some("seen"));
        let unseen = Version { context: Some(VersionVector::default()), ..blind(2, 1, 12, Some("unseen")) };
        let mut context = VersionVector::default();
        context.add(seen.dot);
        let write = Version { context: Some(context), ..blind(3, 1, 15, Some("write")) };
        let set = Siblings::from_versions(vec![seen, unseen, write]);
        let values: Vec<_> = set.versions().iter().map(|v| v.value.clone().unwrap()).collect();
        assert_eq!(values, vec![b"unseen".to_vec(), b"write".to_vec()]);
    }

    #[test]
    fn truncate_drops_lowest_stamps() {
        let mut set = Siblings::default();
        for i in 0..5 {
            set.insert(Version { context: Some(VersionVector::default()), ..blind(i, 1, 10 + i, Some("x")) });
        }
        assert_eq!(set.truncate_oldest(3), 2);
        let stamps: Vec<_> = set.versions().iter().map(|v| v.hlc.0).collect();
        assert_eq!(stamps, vec![12, 13, 14]);
    }

    proptest! {
        /// Blind writes merge to the same single winner whatever the order
        /// and grouping in which storage levels or replicas see them.
        #[test]
        fn blind_merge_is_order_independent(stamps in proptest::collection::vec((0u64..50, 0u64..4), 1..20), split in 0usize..20) {
            let versions: Vec<Version> = stamps.iter().enumerate()
                .map(|(i, &(hlc, node))| blind(node, i as u64, hlc, Some("v")))
                .collect();
            let whole = Siblings::from_versions(versions.clone());
            let split = split.min(versions.len());
            let mut left = Siblings::from_versions(versions[..split].to_vec());
            let right = Siblings::from_versions(versions[split..].iter().rev().cloned().collect());
            left.merge(right);
            prop_assert_eq!(&whole, &left);
            prop_assert_eq!(whole.len(), 1);
            let best = versions.iter().map(Version::order_key).max().unwrap();
            prop_assert_eq!(whole.winner().unwrap().order_key(), best);
        }

        #[test]
        fn siblings_roundtrip_through_postcard(stamps in proptest::collection::vec(0u64..50, 0..8)) {
            let set = Siblings::from_versions(stamps.iter().enumerate()
                .map(|(i, &h)| Version { context: Some(VersionVector::default()), ..blind(i as u64, 1, h, Some("v")) })
                .collect());
            let bytes = postcard::to_stdvec(&set).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Siblings>(&bytes).unwrap(), set);
        }
    }
}
