//! The in-memory table of recent writes.
//!
//! A hash map from key to its [`Siblings`]. Inserting merges with the
//! versions already there by the same rule every storage level uses, so a
//! memtable never needs to read from disk. Only the commit thread writes to
//! the active memtable; when it grows past its budget it is frozen
//! (read-only) and flushed to an SSTable in the background.
//!
//! Why a hash map and not a sorted map: inserts run on the commit thread,
//! between one group's `fdatasync` and the next, so they are the serial part
//! of every write; a hash insert costs a fraction of a B-tree insert with its
//! key comparisons. Order is needed only when the memtable is flushed (once,
//! on the flush thread) and by range scans, which sort the keys they return.
//! The hash is seeded per memtable so clients cannot choose colliding keys.

use std::collections::HashMap;
use std::ops::Bound;

use quiver_ring::{Hlc, Siblings};
use xxhash_rust::xxh3::Xxh3Builder;

use crate::storage::Op;

/// Rough per-entry overhead of the map and the version metadata, in bytes,
/// used to account memory without measuring allocations.
const ENTRY_OVERHEAD_BYTES: usize = 96;

/// The first 16 bytes of `key`, zero-padded, as a big-endian integer: it
/// orders like the key wherever two prefixes differ.
fn key_prefix(key: &[u8]) -> u128 {
    let mut prefix = [0u8; 16];
    let n = key.len().min(16);
    prefix[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(prefix)
}

/// An in-memory table of versions.
#[derive(Debug)]
pub struct Memtable {
    map: HashMap<Vec<u8>, Siblings, Xxh3Builder>,
    bytes: usize,
    min_seq: u64,
    max_seq: u64,
    max_hlc: Hlc,
    siblings_dropped: u64,
}

impl Default for Memtable {
    fn default() -> Memtable {
        // std's RandomState is seeded from the operating system's randomness.
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u64);
        Memtable {
            map: HashMap::with_hasher(Xxh3Builder::new().with_seed(seed)),
            bytes: 0,
            min_seq: 0,
            max_seq: 0,
            max_hlc: Hlc::default(),
            siblings_dropped: 0,
        }
    }
}

impl Memtable {
    /// An empty memtable.
    pub fn new() -> Memtable {
        Memtable::default()
    }

    /// Applies one operation of WAL record `seq`, keeping at most
    /// `siblings_max` versions of its key.
    pub fn insert(&mut self, seq: u64, op: Op, siblings_max: usize) {
        if self.map.is_empty() && self.min_seq == 0 {
            self.min_seq = seq;
        }
        self.max_seq = self.max_seq.max(seq);
        self.max_hlc = self.max_hlc.max(op.version.hlc);
        self.bytes += op.key.len() + op.version.value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_BYTES;
        match self.map.get_mut(&op.key) {
            Some(siblings) => {
                siblings.insert(op.version);
                self.siblings_dropped += siblings.truncate_oldest(siblings_max) as u64;
            }
            None => {
                self.map.insert(op.key, Siblings::one(op.version));
            }
        }
    }

    /// The versions of `key` held here.
    pub fn get(&self, key: &[u8]) -> Option<&Siblings> {
        self.map.get(key)
    }

    /// Entries with `start <= key < end` (no end: to the last key), sorted.
    pub fn sorted_range(&self, start: &[u8], end: Bound<&[u8]>) -> Vec<(&Vec<u8>, &Siblings)> {
        let below_end = |key: &[u8]| match end {
            Bound::Included(end) => key <= end,
            Bound::Excluded(end) => key < end,
            Bound::Unbounded => true,
        };
        // Sort on each key's first 16 bytes held inline (zero-padded, as one
        // big-endian integer), falling back to the whole key only on a tie:
        // the comparisons stay in one contiguous array instead of chasing a
        // pointer to every key, which dominated flushing. Exact: keys whose
        // prefixes differ differ at the same byte.
        let mut entries: Vec<(u128, (&Vec<u8>, &Siblings))> = self
            .map
            .iter()
            .filter(|(key, _)| key.as_slice() >= start && below_end(key))
            .map(|entry| (key_prefix(entry.0), entry))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1 .0.cmp(b.1 .0)));
        entries.into_iter().map(|(_, entry)| entry).collect()
    }

    /// All entries, sorted by key.
    pub fn sorted(&self) -> Vec<(&Vec<u8>, &Siblings)> {
        self.sorted_range(&[], Bound::Unbounded)
    }

    /// Approximate memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Lowest and highest WAL sequence applied (both 0 when empty).
    pub fn seq_range(&self) -> (u64, u64) {
        (self.min_seq, self.max_seq)
    }

    /// Highest timestamp of any version applied.
    pub fn max_hlc(&self) -> Hlc {
        self.max_hlc
    }

    /// Versions dropped because a key had too many siblings.
    pub fn siblings_dropped(&self) -> u64 {
        self.siblings_dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_ring::{BatchId, Dot, NodeId, Version};

    fn op(key: Vec<u8>) -> Op {
        let dot = Dot { node: NodeId(1), counter: 1 };
        Op { key, version: Version { dot, context: None, hlc: Hlc(1), origin: BatchId::default(), value: None } }
    }

    proptest! {
        /// The prefix sort gives exactly the byte order of the keys,
        /// including keys that share long prefixes or end in zero bytes.
        #[test]
        fn sorted_is_byte_order(keys in proptest::collection::btree_set(
            proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..24), 0..200)) {
            let mut memtable = Memtable::new();
            for key in &keys {
                memtable.insert(1, op(key.clone()), 4);
            }
            let sorted: Vec<Vec<u8>> = memtable.sorted().into_iter().map(|(k, _)| k.clone()).collect();
            prop_assert_eq!(sorted, keys.into_iter().collect::<Vec<_>>());
        }
    }
}
