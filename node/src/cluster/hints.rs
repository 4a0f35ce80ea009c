//! Hinted handoff: the writes this node holds for replicas that are down.
//!
//! - Owns: a [`SetLog`] in the hints keyspace, one entry per hinted write
//!   and owner, under the owner's id and the stamp it was taken at.
//! - Receives: hints to hold, from a coordinator's write
//!   ([`HintStore::hold`] gives the engine ops, which go into the same WAL
//!   record as this node's own part of that write); the owner's
//!   acknowledgement of a delivery.
//! - Does: bounds each owner's queue in bytes (a hint past it is refused,
//!   and the write with it) and in age (an older hint is dropped when its
//!   turn to be delivered comes: a hint must never outlive `gc_grace`, or a
//!   purged tombstone's key could come back).
//! - Hands on: the oldest hints of an owner; their removal once the owner
//!   has them durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{Hlc, NodeId};

pub use super::setlog::Entry;
use super::setlog::{Queue, SetLog};
use crate::net::peer::Hinted;
use crate::stamping::NodeClock;
use crate::storage::keys::Keyspace;
use crate::storage::{self, Engine};

/// The hints a node holds.
#[derive(Debug)]
pub struct HintStore {
    log: SetLog,
    clock: Arc<NodeClock>,
    /// Bound of each owner's queue.
    bytes_max: u64,
    dropped: AtomicU64,
}

impl HintStore {
    /// The hints in `engine`, counted (a scan of the hints keyspace).
    pub fn open(engine: Arc<Engine>, clock: Arc<NodeClock>, bytes_max: u64) -> storage::Result<HintStore> {
        let log = SetLog::new(engine, clock.clone(), Keyspace::Hints);
        log.recount(None, &log.entries(None, u64::MAX)?);
        Ok(HintStore { log, clock, bytes_max, dropped: AtomicU64::new(0) })
    }

    /// The engine ops that hold `hinted`, one entry per owner. Refused
    /// (nothing is held) when an owner's queue would pass its bound.
    pub fn hold(&self, hinted: Vec<Hinted>) -> Result<Vec<storage::Op>, ServerError> {
        let mut ops = Vec::with_capacity(hinted.len());
        for Hinted { owner, sets } in hinted {
            let taken = self.clock.stamp(Hlc::ZERO, Hlc::ZERO, None)?;
            let (op, bytes) = self.log.keep_op(owner, taken.hlc, &sets)?;
            if self.log.queue(owner).bytes + bytes > self.bytes_max {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(ServerError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the hints held for node {:016x} would pass their bound of {} bytes; the write was not \
                         taken here",
                        owner.0, self.bytes_max
                    ),
                ));
            }
            ops.push((owner, bytes, op));
        }
        // Counted once all fit: a refused write holds nothing.
        Ok(ops
            .into_iter()
            .map(|(owner, bytes, op)| {
                self.log.kept(owner, bytes);
                op
            })
            .collect())
    }

    /// What is held for each owner that has hints.
    pub fn queues(&self) -> std::collections::BTreeMap<NodeId, Queue> {
        self.log.queues()
    }

    /// Hints dropped undelivered: refused at their bound, or too old.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The oldest hints held for `owner`, about `bytes_max` of them (at
    /// least one); when there are none, its count starts again from zero.
    /// Reads files: not for an async worker.
    pub fn oldest(&self, owner: NodeId, bytes_max: u64) -> storage::Result<Vec<Entry>> {
        let hints = self.log.entries(Some(owner), bytes_max)?;
        if hints.is_empty() {
            self.log.recount(Some(&[owner]), &[]);
        }
        Ok(hints)
    }

    /// Removes `hints` for good, once their owner has them durable or
    /// (`dropped` of them) past their age.
    pub async fn remove(&self, hints: &[Entry], dropped: u64) -> Result<(), ServerError> {
        self.log.remove(hints).await?;
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        Ok(())
    }
}
