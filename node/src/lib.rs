//! A Quiver node.
//!
//! - [`storage`]: the per-node engine (WAL, memtables, SSTables, manifest,
//!   compaction).
//! - [`service`]: what the node does with each client request.
//! - [`net`]: the client listener.
//! - [`config`]: `quiverd`'s settings.

pub mod config;
pub mod net;
pub mod service;
pub mod storage;
