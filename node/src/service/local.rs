//! [`LocalStore`]: the [`Store`] of a single node, over its own engine.
//! Writes are stamped here and go to the engine's commit thread; reads go
//! to the reader threads.

use std::sync::{Arc, Mutex};

use quiver_ring::rand::{threshold, AtomicSplitMix64};
use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{Hlc, NodeId, Stamper};

use super::reads::{ReadHook, ReadJob, ReadPool};
use super::{Done, Entries, Store, StoreStatus};
use crate::clock::Clock;
use crate::lock;
use crate::storage::{self, Engine};

/// Keys a read may have to be tried in memory on the caller's thread: each
/// costs about a microsecond, and the caller is an async worker.
const IN_MEMORY_KEYS_MAX: usize = 16;

/// A node's own engine as a [`Store`].
#[derive(Debug)]
pub struct LocalStore {
    engine: Arc<Engine>,
    stamper: Mutex<Stamper>,
    clock: Arc<dyn Clock>,
    reads: ReadPool,
    /// Test-only fault: the fraction of writes acknowledged but not written,
    /// scaled to `u64::MAX`, and the generator that picks them.
    drop_threshold: u64,
    drop_rng: AtomicSplitMix64,
}

impl LocalStore {
    /// A store over an open engine, with `read_threads` reader threads. Its
    /// clock starts above every timestamp already stored.
    pub fn new(
        engine: Arc<Engine>,
        node_id: NodeId,
        clock: Arc<dyn Clock>,
        read_threads: usize,
    ) -> std::io::Result<LocalStore> {
        LocalStore::with_read_hook(engine, node_id, clock, read_threads, None)
    }

    /// [`LocalStore::new`] with a test hook that every reader thread calls
    /// before it reads a chunk of keys.
    pub fn with_read_hook(
        engine: Arc<Engine>,
        node_id: NodeId,
        clock: Arc<dyn Clock>,
        read_threads: usize,
        hook: Option<ReadHook>,
    ) -> std::io::Result<LocalStore> {
        Ok(LocalStore {
            stamper: Mutex::new(Stamper::new(node_id, engine.max_hlc())),
            reads: ReadPool::new(engine.clone(), read_threads, hook)?,
            drop_rng: AtomicSplitMix64::new(clock.now_ms()),
            drop_threshold: 0,
            engine,
            clock,
        })
    }

    /// Test-only: acknowledges `probability` of writes without writing them,
    /// so tests can prove that the chaos checker reports lost writes.
    pub fn with_dropped_writes(mut self, probability: f64) -> LocalStore {
        self.drop_threshold = threshold(probability);
        self
    }

    fn drop_this_write(&self) -> bool {
        self.drop_threshold > 0 && self.drop_rng.next_u64() < self.drop_threshold
    }
}

impl Store for LocalStore {
    /// Stamps every entry with one `(hlc, origin)` and writes them as one
    /// WAL record (all or nothing); `done` once it is durable.
    fn write(&self, entries: Entries, hlc_seen: Hlc, done: Done<()>) {
        let stamp = {
            let mut stamper = lock(&self.stamper);
            stamper.observe(hlc_seen);
            stamper.next(self.clock.now_ms())
        };
        if self.drop_this_write() {
            return done(Ok(()));
        }
        let ops = entries.into_iter().map(|(key, value)| storage::Op { key, version: stamp.blind(value) }).collect();
        self.engine.write_then(ops, move |result| done(result.map(drop).map_err(storage_error)));
    }

    /// A small read that memory alone answers (the value cache, or no table
    /// whose key range and bloom filter admit its keys: see
    /// [`Engine::get_in_memory`]) is answered right here. Anything else goes
    /// to the reader threads, from the first key that may need a file read.
    fn read(&self, keys: Vec<Vec<u8>>, hlc_seen: Hlc, response_bytes_max: usize, done: Done<Vec<Option<Vec<u8>>>>) {
        lock(&self.stamper).observe(hlc_seen);
        let mut job =
            ReadJob { values: Vec::with_capacity(keys.len()), keys, bytes: 0, bytes_max: response_bytes_max, done };
        if job.keys.len() <= IN_MEMORY_KEYS_MAX {
            while let Some(key) = job.keys.get(job.values.len()) {
                let Some(found) = self.engine.get_in_memory(key) else { break };
                if let Err(error) = job.push(found.and_then(|s| s.value().map(<[u8]>::to_vec))) {
                    return (job.done)(Err(error));
                }
            }
            if job.values.len() == job.keys.len() {
                return job.answer();
            }
        }
        self.reads.submit(job);
    }

    fn status(&self) -> Result<StoreStatus, ServerError> {
        let stats = self.engine.stats();
        Ok(StoreStatus {
            keys: stats.table_entries + stats.memtable_entries as u64,
            bytes_on_disk: self.engine.disk_bytes().map_err(storage_error)?,
        })
    }

    fn hlc(&self) -> Hlc {
        lock(&self.stamper).last()
    }
}

/// The error a client sees for a storage failure.
pub(super) fn storage_error(error: storage::Error) -> ServerError {
    let kind = match &error {
        storage::Error::Closed => ErrorKind::ShuttingDown,
        storage::Error::TooLarge { .. } => ErrorKind::BulkTooLarge,
        storage::Error::Failed(_) | storage::Error::Io { .. } => ErrorKind::StorageFailed,
        _ => ErrorKind::Internal,
    };
    ServerError::new(kind, error.to_string())
}
