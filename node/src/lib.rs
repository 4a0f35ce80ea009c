//! A Quiver node.
//!
//! - [`storage`]: the per-node engine (WAL, memtables, SSTables, manifest,
//!   compaction).
//! - [`index`]: search over the stored values (full text, BM25), kept in
//!   the same engine and the same WAL records as the data.
//! - [`service`]: what the node does with each client request: the front
//!   that checks it, and the [`Store`](service::Store) that does it.
//! - [`messages`]: what nodes say to each other over their peer links.
//! - [`net`]: the client listener, peer links and their TLS material.
//! - [`cluster`]: membership and heartbeats, the quorum logic (read repair
//!   included), and the cluster's [`Store`](service::Store).
//! - [`config`]: `quiverd`'s settings.
//! - [`clock`]: where the request path gets the time.
//! - [`stamping`]: the node's hybrid logical clock, which stamps writes.
//! - [`identity`]: the node's id and admin token files.

pub mod clock;
pub mod cluster;
pub mod config;
pub mod disk_space;
pub mod fuzzing;
pub mod horizon;
pub mod identity;
pub mod index;
pub mod messages;
pub mod net;
pub mod service;
pub mod stamping;
pub mod storage;

use std::sync::{Mutex, MutexGuard};

use clock::Clock;

/// The system's wall-clock milliseconds, for the engine's own needs
/// (tombstone horizons, fault seeds); the request path takes a [`Clock`].
pub(crate) fn now_ms() -> u64 {
    clock::SystemClock.now_ms()
}

/// Locks a mutex, going on after a panic elsewhere poisoned it: every value
/// behind these locks stays consistent between statements, so a panicking
/// holder leaves nothing half-changed.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
