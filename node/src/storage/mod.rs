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
//!   simulated disk that can crash;
//! - [`frame`]: checksummed record framing shared by the WAL and manifest;
//! - [`wal`]: write-ahead log segments, group commit writer, recovery;
//! - [`memtable`]: the in-memory sorted table;
//! - [`sstable`]: table files (blocks, index, bloom filter, footer);
//! - [`manifest`]: the log of which tables make up the store;
//! - [`compaction`]: the merge policy and the merging iterator;
//! - [`Engine`]: the threads and the state that tie them together.

pub mod compaction;
pub mod disk;
mod engine;
pub mod error;
pub mod frame;
pub mod manifest;
pub mod memtable;
pub mod sstable;
pub mod wal;

pub use engine::{Engine, Options, Stats};
pub use error::{Error, Result};

use quiver_ring::Version;
use serde::{Deserialize, Serialize};

/// One change to one key: a new version to merge into its siblings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub key: Vec<u8>,
    pub version: Version,
}
