//! The batch log: bulk sets all or nothing across nodes.
//!
//! - Owns: a [`SetLog`] in the batch log keyspace, one entry per pending
//!   batch, under its coordinator's id and its stamp (every key of a batch
//!   shares that one stamp), and the ids of the pending ones in memory (a
//!   scan of the keyspace when the node starts), so that finding the
//!   batches due reads none of those already applied.
//! - Receives: batches to log, from their coordinator (this node, or a
//!   peer's `LogBatch`); word that a batch is applied (`BatchDone`).
//! - Does: nothing by itself; [`super::store::ClusterStore`] logs a batch
//!   on two nodes before it sends any replica its part, removes it once
//!   the write reached its quorum, and replays, as its coordinator, every
//!   batch it holds that is older than `batch_replay_after_ms` (its coordinator
//!   died or failed to finish it).
//! - Hands on: the batches due for replay.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use quiver_ring::wire::ServerError;
use quiver_ring::{Hlc, NodeId, Siblings};

pub use super::setlog::Entry;
use super::setlog::SetLog;
use crate::lock;
use crate::stamping::NodeClock;
use crate::storage::keys::Keyspace;
use crate::storage::{self, Engine};

/// The batches a node holds until they are applied.
#[derive(Debug)]
pub struct BatchLog {
    log: SetLog,
    /// `(coordinator, id)` of every batch held.
    pending: Mutex<BTreeSet<(NodeId, Hlc)>>,
}

impl BatchLog {
    /// The batch log in `engine` (a scan of it).
    pub fn open(engine: Arc<Engine>, clock: Arc<NodeClock>) -> storage::Result<BatchLog> {
        let log = SetLog::new(engine, clock, Keyspace::BatchLog);
        let pending = log.entries(None, u64::MAX)?.into_iter().map(|e| (e.node, e.seq)).collect();
        Ok(BatchLog { log, pending: Mutex::new(pending) })
    }

    /// Logs batch `(coordinator, id)`, all of its `sets`, as one record;
    /// returns once it is durable.
    pub async fn log(&self, coordinator: NodeId, id: Hlc, sets: &[(Vec<u8>, Siblings)]) -> Result<(), ServerError> {
        let (op, _) = self.log.keep_op(coordinator, id, sets)?;
        self.log.write(vec![op]).await?;
        lock(&self.pending).insert((coordinator, id));
        Ok(())
    }

    /// Batch `(coordinator, id)` is applied: removed, durably.
    pub async fn done(&self, coordinator: NodeId, id: Hlc) -> Result<(), ServerError> {
        self.log.remove_ids(&[(coordinator, id)]).await?;
        lock(&self.pending).remove(&(coordinator, id));
        Ok(())
    }

    /// Batches held, not yet known applied.
    pub fn pending(&self) -> u64 {
        lock(&self.pending).len() as u64
    }

    /// Every batch held that was stamped before `before_ms`. Reads files:
    /// not for an async worker.
    pub fn due(&self, before_ms: u64) -> storage::Result<Vec<Entry>> {
        let due: Vec<(NodeId, Hlc)> =
            lock(&self.pending).iter().filter(|(_, id)| id.physical_ms() < before_ms).copied().collect();
        let mut batches = Vec::with_capacity(due.len());
        for (coordinator, id) in due {
            match self.log.entry(coordinator, id)? {
                Some(batch) => batches.push(batch),
                None => {
                    lock(&self.pending).remove(&(coordinator, id));
                }
            }
        }
        Ok(batches)
    }
}
