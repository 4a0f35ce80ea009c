//! The batch log: bulk sets all or nothing across nodes.
//!
//! - Owns: a [`SetLog`] in the batch log keyspace, one entry per pending
//!   batch, under its coordinator's id and its stamp (every key of a batch
//!   shares that one stamp).
//! - Receives: batches to log, from their coordinator (this node, or a
//!   peer's `LogBatch`); word that a batch is applied (`BatchDone`).
//! - Does: nothing by itself; [`super::store::ClusterStore`] logs a batch
//!   on two nodes before it sends any replica its part, removes it once
//!   the write reached its quorum, and replays, as its coordinator, every
//!   batch it holds that is older than [`REPLAY_AFTER_MS`] (its coordinator
//!   died or failed to finish it).
//! - Hands on: the batches due for replay.

use std::sync::Arc;

use quiver_ring::wire::ServerError;
use quiver_ring::{Hlc, NodeId};

use super::setlog::SetLog;
pub use super::setlog::{Entry, Sets};
use crate::stamping::NodeClock;
use crate::storage::keys::Keyspace;
use crate::storage::{self, Engine};

/// A batch older than this is replayed by whoever holds it: twice the time
/// its coordinator gives its write ([`super::store::OP_TIMEOUT`]).
pub const REPLAY_AFTER_MS: u64 = 10_000;

/// The batches a node holds until they are applied.
#[derive(Debug)]
pub struct BatchLog {
    log: SetLog,
}

impl BatchLog {
    /// The batch log in `engine`, counted.
    pub fn open(engine: Arc<Engine>, clock: Arc<NodeClock>) -> storage::Result<BatchLog> {
        Ok(BatchLog { log: SetLog::open(engine, clock, Keyspace::BatchLog)? })
    }

    /// The engine op that logs batch `(coordinator, id)`; count it with
    /// [`BatchLog::logged`] once written.
    pub fn log_op(&self, coordinator: NodeId, id: Hlc, sets: &Sets) -> Result<(storage::Op, u64), ServerError> {
        self.log.keep_op(coordinator, id, sets)
    }

    pub fn logged(&self, coordinator: NodeId, bytes: u64) {
        self.log.kept(coordinator, bytes);
    }

    /// Batch `(coordinator, id)` is applied: removed, durably (its count
    /// follows at the next [`BatchLog::due`]).
    pub async fn done(&self, coordinator: NodeId, id: Hlc) -> Result<(), ServerError> {
        self.log.remove_ids(&[(coordinator, id)]).await
    }

    /// Batches held, not yet known applied.
    pub fn pending(&self) -> u64 {
        self.log.queues().values().map(|q| q.entries).sum()
    }

    /// Every batch held that was stamped before `before_ms`; the counts
    /// become what this scan found. Reads files: not for an async worker.
    pub fn due(&self, before_ms: u64) -> storage::Result<Vec<Entry>> {
        let all = self.log.entries(None, u64::MAX)?;
        self.log.recount(None, &all);
        Ok(all.into_iter().filter(|batch| batch.seq.physical_ms() < before_ms).collect())
    }

    /// Removes replayed (or dropped) batches, durably.
    pub async fn remove(&self, batches: &[Entry]) -> Result<(), ServerError> {
        self.log.remove(batches).await
    }
}
