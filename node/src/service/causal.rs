//! Causal writes on one node: the per-key read-modify-write, and reads of
//! every version of a key.
//!
//! - Owns: the per-key locks (a map from each key with a causal write in
//!   progress to the writes waiting for it) and the count of writes
//!   refused for too many siblings.
//! - Receives: causal writes from [`LocalStore`](super::LocalStore), on the
//!   async workers, which only queue them.
//! - Does: one causal write per key at a time, on a reader thread: reads
//!   the key's siblings, stamps the write (now, inside the lock: stamped on
//!   arrival, two writes in flight could commit out of stamp order and one
//!   be lost), above the client's timestamp and its context, never past its
//!   deadline; refuses it with `TooManySiblings` if it would leave more than
//!   [`SIBLINGS_MAX`]; else hands the version to the engine.
//! - Hands on: the answer once the write is durable, with the key's
//!   resulting sibling set (its local siblings merged with the new
//!   version), which a replica coordinating in a cluster sends to the other
//!   replicas; only then is the key's lock released and its next waiting
//!   write queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{Context, Siblings, SIBLINGS_MAX};

use super::local::Writes;
use super::reads::{Job, Jobs, Task};
use super::{Done, Timing};
use crate::lock;
use crate::stamping::NodeClock;
use crate::storage::storage_error;
use crate::storage::{self, Engine};

/// One causal write.
pub(super) struct CausalWrite {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub context: Context,
    pub timing: Timing,
    /// Gets the key's resulting sibling set once the write is durable.
    pub done: Done<Siblings>,
}

/// The causal writes of a node.
pub(super) struct CausalWrites {
    clock: Arc<NodeClock>,
    jobs: Jobs,
    writes: Writes,
    /// Keys with a causal write in progress, and the writes waiting for it.
    held: Mutex<HashMap<Vec<u8>, VecDeque<CausalWrite>>>,
    too_many_siblings: AtomicU64,
}

impl std::fmt::Debug for CausalWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CausalWrites({} keys held)", lock(&self.held).len())
    }
}

/// A causal write on its way through a reader thread.
struct Running {
    writes: Arc<CausalWrites>,
    write: CausalWrite,
}

impl CausalWrites {
    pub fn new(clock: Arc<NodeClock>, jobs: Jobs, writes: Writes) -> CausalWrites {
        CausalWrites { clock, jobs, writes, held: Mutex::default(), too_many_siblings: AtomicU64::new(0) }
    }

    /// Causal writes refused so far because they would have left more than
    /// [`SIBLINGS_MAX`] siblings.
    pub fn too_many_siblings_refused(&self) -> u64 {
        self.too_many_siblings.load(Ordering::Relaxed)
    }

    /// Runs `write` once no other causal write of its key is in progress.
    pub fn submit(self: &Arc<Self>, write: CausalWrite) {
        {
            let mut held = lock(&self.held);
            if let Some(waiting) = held.get_mut(&write.key) {
                waiting.push_back(write);
                return;
            }
            held.insert(write.key.clone(), VecDeque::new());
        }
        self.jobs.submit(Job::Task(Box::new(Running { writes: self.clone(), write })));
    }

    /// The write of `key` in progress has answered: the next one waiting
    /// for the key, if any, runs.
    fn release(self: &Arc<Self>, key: &[u8]) {
        let next = {
            let mut held = lock(&self.held);
            let next = held.get_mut(key).and_then(VecDeque::pop_front);
            if next.is_none() {
                held.remove(key);
            }
            next
        };
        if let Some(write) = next {
            self.jobs.submit(Job::Task(Box::new(Running { writes: self.clone(), write })));
        }
    }

    /// The version to write and the key's sibling set with it, or why not:
    /// stamped now, above what the writer saw, and within the sibling bound.
    fn version_of(&self, write: &mut CausalWrite, engine: &Engine) -> Result<(storage::Op, Siblings), ServerError> {
        let local = engine.get(&write.key).map_err(storage_error)?.unwrap_or_default();
        let timing = write.timing;
        let stamp = self.clock.stamp(timing.hlc_seen, write.context.max_hlc, Some(timing.deadline))?;
        let version = stamp.causal(std::mem::take(&mut write.context), write.value.take());
        let mut after = local;
        after.merge(Siblings::one(version.clone()));
        if after.len() > SIBLINGS_MAX {
            self.too_many_siblings.fetch_add(1, Ordering::Relaxed);
            return Err(ServerError::new(
                ErrorKind::TooManySiblings,
                format!(
                    "this write would leave {} versions of the key, more than the bound of {SIBLINGS_MAX}: read its \
                     versions and write with that context (it replaces them all), or set it without one",
                    after.len()
                ),
            ));
        }
        Ok((storage::Op { key: write.key.clone(), version }, after))
    }
}

impl Task for Running {
    fn run(self: Box<Self>, engine: &Engine) {
        let Running { writes, mut write } = *self;
        match writes.version_of(&mut write, engine) {
            Ok((op, after)) => {
                let (key, done, sink) = (write.key, write.done, writes.writes.clone());
                sink.write_then(vec![op], move |result| {
                    // Released only once the write is durable and visible:
                    // the next write of the key reads it.
                    writes.release(&key);
                    done(result.map(|_| after).map_err(storage_error));
                });
            }
            Err(error) => {
                writes.release(&write.key);
                (write.done)(Err(error));
            }
        }
    }

    fn cancel(self: Box<Self>, error: ServerError) {
        let Running { writes, write } = *self;
        writes.release(&write.key);
        (write.done)(Err(error));
    }
}

/// A read of every version of a key.
pub(super) struct VersionsRead {
    pub key: Vec<u8>,
    pub done: Done<Option<Siblings>>,
}

impl Task for VersionsRead {
    fn run(self: Box<Self>, engine: &Engine) {
        (self.done)(engine.get(&self.key).map_err(storage_error));
    }

    fn cancel(self: Box<Self>, error: ServerError) {
        (self.done)(Err(error));
    }
}
