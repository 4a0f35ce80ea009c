//! `quiver-chaos`: proves with real processes and SIGKILL that Quiver loses
//! nothing it acknowledged, applies every bulk set entirely or not at all,
//! and never mixes two concurrent bulk sets.
//!
//! - [`node`]: starting and killing `quiverd` processes (also used by the
//!   node's end-to-end tests);
//! - [`run`]: one run: the node, the killer, writers, checkpoints, the report;
//! - [`workload`]: the three workloads and what each one checks.

pub mod node;
pub mod run;
pub mod workload;

/// Locks a mutex, going on after a panic elsewhere poisoned it (a writer
/// thread that panicked must not stop the report).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
