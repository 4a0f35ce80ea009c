//! The in-memory table of recent writes.
//!
//! A sorted map from key to its [`Siblings`]. Inserting merges with the
//! versions already there by the same rule every storage level uses, so a
//! memtable never needs to read from disk. Only the commit thread writes to
//! the active memtable; when it grows past its budget it is frozen
//! (read-only) and flushed to an SSTable in the background.

use std::collections::BTreeMap;
use std::ops::RangeBounds;

use quiver_ring::{Hlc, Siblings};

use crate::storage::Op;

/// Rough per-entry overhead of the map and the version metadata, in bytes,
/// used to account memory without measuring allocations.
const ENTRY_OVERHEAD_BYTES: usize = 96;

/// A sorted, in-memory table of versions.
#[derive(Debug, Default)]
pub struct Memtable {
    map: BTreeMap<Vec<u8>, Siblings>,
    bytes: usize,
    min_seq: u64,
    max_seq: u64,
    max_hlc: Hlc,
    siblings_dropped: u64,
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

    /// Entries in key order within `range`.
    pub fn range<'a>(
        &'a self,
        range: impl RangeBounds<Vec<u8>> + 'a,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Siblings)> + 'a {
        self.map.range(range)
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Siblings)> {
        self.map.iter()
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
