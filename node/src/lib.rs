//! A Quiver node.
//!
//! - [`storage`]: the per-node engine (WAL, memtables, SSTables, manifest,
//!   compaction).

pub mod storage;
