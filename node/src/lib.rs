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

use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Locks a mutex, going on after a panic elsewhere poisoned it: every value
/// behind these locks stays consistent between statements, so a panicking
/// holder leaves nothing half-changed.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
