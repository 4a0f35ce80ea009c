//! The per-node storage engine: a log-structured merge tree of versioned
//! records.
//!
//! ```text
//!  write ──► group commit ──► WAL segment (write + fdatasync) ──► memtable ──► ack
//!                                                                   │ full
//!                                                                   ▼
//!                               frozen memtable ──► SSTable (write, fsync, re-read, verify)
//!                                                     │ manifest edit (fsync)
//!                                                     ▼
//!                                 WAL segments covered by it are deleted
//!  SSTables ──► size-tiered compaction (merge, drop shadowed versions and old tombstones)
//! ```
//!
//! Modules, one per on-disk format plus the machinery around them:
//! - [`disk`]: the file trait, the real disk, the skip-write fault, and a
//!   simulated disk that can crash; [`exhaust`]: a disk that runs out of
//!   space or file descriptors;
//! - [`frame`]: checksummed record framing shared by the WAL and manifest;
//! - [`wal`]: write-ahead log segments, group commit writer, recovery;
//! - [`memtable`]: the in-memory sorted table;
//! - [`sstable`]: table files (blocks, index, bloom filter, footer);
//! - [`manifest`]: the log of which tables make up the store;
//! - [`compaction`]: the merge policy and the merging iterator;
//! - [`cache`]: the CLOCK cache behind the block cache and the value cache;
//! - [`keys`]: the key layout: keyspaces, and data ordered by ring token;
//! - [`Engine`]: the threads and the state that tie them together.

pub mod cache;
pub mod compaction;
pub mod disk;
mod engine;
pub mod error;
pub mod exhaust;
pub mod frame;
pub mod keys;
pub mod manifest;
pub mod memtable;
pub mod sstable;
pub mod wal;

pub use engine::{Engine, Options, Purge, Stats};
pub use error::{storage_error, Error, Result};

use std::ops::Range;

use quiver_ring::{Hlc, Version};
use serde::{Deserialize, Serialize};

/// The little-endian `u32` at `at` in `buf`, if `buf` holds four bytes
/// there: how every decoder here reads lengths and checksums.
pub(crate) fn u32_le_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// One change to one key: a new version to merge into its siblings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub version: Version,
}

/// Ops encoded once, exactly as a WAL record holds them
/// (`postcard(Vec<Op>)`), with where each op's key and version lie in the
/// bytes: the memtable copies them from there rather than encoding every
/// version again, and the ops themselves can be freed where they were made.
#[derive(Debug)]
pub struct EncodedOps {
    bytes: Vec<u8>,
    ops: Vec<OpRef>,
}

/// One op of an [`EncodedOps`].
#[derive(Debug, Clone)]
pub struct OpRef {
    key: Range<usize>,
    version: Range<usize>,
    pub hlc: Hlc,
    /// The version is a tombstone.
    pub tombstone: bool,
}

impl EncodedOps {
    /// Encodes `ops`.
    pub fn new(ops: &[Op]) -> EncodedOps {
        const ENCODE: &str = "postcard encodes into a Vec without failing";
        // Room for each op's key, value and the rest of its version (varint
        // lengths, dot, timestamp, batch id: at most 72 bytes without
        // a causal context), so that the buffer rarely has to grow (each
        // growth copies everything encoded so far).
        let size = ops.iter().map(|op| op.key.len() + op.version.value.as_ref().map_or(0, Vec::len) + 80).sum();
        // A sequence is its length, then its items; an `Op` is its fields in order.
        let mut bytes = postcard::to_extend(&ops.len(), Vec::with_capacity(size)).expect(ENCODE);
        let mut refs = Vec::with_capacity(ops.len());
        for op in ops {
            bytes = postcard::to_extend(serde_bytes::Bytes::new(&op.key), bytes).expect(ENCODE);
            let key_end = bytes.len();
            bytes = postcard::to_extend(&op.version, bytes).expect(ENCODE);
            refs.push(OpRef {
                key: key_end - op.key.len()..key_end,
                version: key_end..bytes.len(),
                hlc: op.version.hlc,
                tombstone: op.version.value.is_none(),
            });
        }
        EncodedOps { bytes, ops: refs }
    }

    /// `postcard(Vec<Op>)`.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The ops, in order.
    pub fn ops(&self) -> &[OpRef] {
        &self.ops
    }

    /// The key of `op`.
    pub fn key(&self, op: &OpRef) -> &[u8] {
        &self.bytes[op.key.clone()]
    }

    /// `postcard(Version)` of `op`.
    pub fn version(&self, op: &OpRef) -> &[u8] {
        &self.bytes[op.version.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::{BatchId, NodeId};

    #[test]
    fn encoded_ops_are_the_postcard_encoding_and_point_at_each_op() {
        let version = |hlc: u64, value: Option<Vec<u8>>| Version {
            hlc: Hlc(hlc),
            origin: BatchId { node: NodeId(3), counter: hlc },
            causal: None,
            value,
        };
        let ops = vec![
            Op { key: b"a".to_vec(), version: version(1, Some(vec![9; 300])) },
            Op { key: vec![7; 200], version: version(u64::MAX, None) },
            Op { key: Vec::new(), version: version(5, Some(Vec::new())) },
        ];
        let encoded = EncodedOps::new(&ops);
        assert_eq!(encoded.bytes(), postcard::to_stdvec(&ops).unwrap());
        for (op, at) in ops.iter().zip(encoded.ops()) {
            assert_eq!(encoded.key(at), op.key);
            assert_eq!(postcard::from_bytes::<Version>(encoded.version(at)).unwrap(), op.version);
            assert_eq!((at.hlc, at.tombstone), (op.version.hlc, op.version.value.is_none()));
        }
    }
}
