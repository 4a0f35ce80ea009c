//! Hinted handoff: the writes this node holds for replicas that are down.
//!
//! - Owns: the hints keyspace of the node's engine and a count of what it
//!   holds for each owner (rebuilt by a scan when the node starts).
//! - Receives: hints to hold, from a coordinator's write
//!   ([`HintStore::hold`] gives the engine ops, which go into the same WAL
//!   record as this node's own part of that write); the owner's
//!   acknowledgement of a delivery.
//! - Does: bounds each owner's queue in bytes (a hint past it is refused,
//!   and the write with it) and in age (an older hint is dropped when its
//!   turn to be delivered comes: a hint must never outlive `gc_grace`, or a
//!   purged tombstone's key could come back).
//! - Hands on: the oldest hints of an owner ([`HintStore::oldest`]);
//!   removal once the owner has them durable ([`HintStore::remove_ops`]).
//!
//! Layout: `Hints | owner (u64, big-endian) | seq (u64, big-endian)` holds
//! one blind version stamped `seq` by this node's clock (unique, rising,
//! its age in its milliseconds) whose value is the hinted sibling sets,
//! encoded. A delivered or dropped hint is covered by a tombstone, which
//! compaction drops (a local keyspace has no grace period).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{Hlc, NodeId, Siblings};

use crate::lock;
use crate::net::peer::Hinted;
use crate::stamping::NodeClock;
use crate::storage::keys::{keyspace_start, Keyspace};
use crate::storage::{self, Engine};

/// A hint's key.
fn hint_key(owner: NodeId, seq: Hlc) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(Keyspace::Hints as u8);
    key.extend_from_slice(&owner.0.to_be_bytes());
    key.extend_from_slice(&seq.0.to_be_bytes());
    key
}

/// The owner and seq of a hint's key.
fn parse_key(key: &[u8]) -> Option<(NodeId, Hlc)> {
    let (&space, rest) = key.split_first()?;
    let (owner, seq) = rest.split_at_checked(8)?;
    if space != Keyspace::Hints as u8 || seq.len() != 8 {
        return None;
    }
    Some((NodeId(u64::from_be_bytes(owner.try_into().ok()?)), Hlc(u64::from_be_bytes(seq.try_into().ok()?))))
}

/// What this node holds for one owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub hints: u64,
    pub bytes: u64,
}

/// One hint read back for delivery.
#[derive(Debug)]
pub struct Hint {
    pub key: Vec<u8>,
    /// When it was taken (its stamp's milliseconds).
    pub taken_ms: u64,
    pub bytes: u64,
    pub sets: Vec<(Vec<u8>, Siblings)>,
}

/// The hints a node holds.
#[derive(Debug)]
pub struct HintStore {
    engine: Arc<Engine>,
    clock: Arc<NodeClock>,
    /// Bound of each owner's queue.
    bytes_max: u64,
    queues: Mutex<BTreeMap<NodeId, Queue>>,
    dropped: AtomicU64,
}

impl HintStore {
    /// The hints in `engine`, counted (a scan of the hints keyspace).
    pub fn open(engine: Arc<Engine>, clock: Arc<NodeClock>, bytes_max: u64) -> storage::Result<HintStore> {
        let mut queues: BTreeMap<NodeId, Queue> = BTreeMap::new();
        let end = keyspace_start(Keyspace::BatchLog);
        for entry in engine.scan(&keyspace_start(Keyspace::Hints), Some(&end)) {
            let (key, siblings) = entry?;
            let (Some((owner, _)), Some(value)) = (parse_key(&key), siblings.value()) else { continue };
            let queue = queues.entry(owner).or_default();
            queue.hints += 1;
            queue.bytes += value.len() as u64;
        }
        Ok(HintStore { engine, clock, bytes_max, queues: Mutex::new(queues), dropped: AtomicU64::new(0) })
    }

    /// The engine ops that hold `hinted`, one entry per owner. Refused
    /// (nothing is held) when an owner's queue would pass its bound.
    pub fn hold(&self, hinted: Vec<Hinted>) -> Result<Vec<storage::Op>, ServerError> {
        let mut ops = Vec::with_capacity(hinted.len());
        let mut queues = lock(&self.queues);
        for Hinted { owner, sets } in hinted {
            let value = postcard::to_stdvec(&sets)
                .map_err(|e| ServerError::new(ErrorKind::Internal, format!("encoding a hint: {e}")))?;
            let queue = queues.get(&owner).copied().unwrap_or_default();
            if queue.bytes + value.len() as u64 > self.bytes_max {
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
            let stamp = self.clock.stamp(Hlc::ZERO, Hlc::ZERO, None)?;
            ops.push((
                owner,
                value.len() as u64,
                storage::Op { key: hint_key(owner, stamp.hlc), version: stamp.blind(Some(value)) },
            ));
        }
        // Counted once all fit: a refused write holds nothing.
        Ok(ops
            .into_iter()
            .map(|(owner, bytes, op)| {
                let queue = queues.entry(owner).or_default();
                queue.hints += 1;
                queue.bytes += bytes;
                op
            })
            .collect())
    }

    /// What is held for each owner that has hints.
    pub fn queues(&self) -> BTreeMap<NodeId, Queue> {
        lock(&self.queues).iter().filter(|(_, q)| q.hints > 0).map(|(&owner, &q)| (owner, q)).collect()
    }

    /// Hints dropped undelivered: refused at their bound, or too old.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The oldest hints held for `owner`, about `bytes_max` of them (at
    /// least one). Reads files: not for an async worker.
    pub fn oldest(&self, owner: NodeId, bytes_max: u64) -> storage::Result<Vec<Hint>> {
        let start = hint_key(owner, Hlc::ZERO);
        let end = hint_key(NodeId(owner.0.wrapping_add(1)), Hlc::ZERO);
        let end = (owner.0 < u64::MAX).then_some(end);
        let mut hints = Vec::new();
        let mut bytes = 0;
        for entry in self.engine.scan(&start, end.as_deref()) {
            let (key, siblings) = entry?;
            let (Some((_, seq)), Some(value)) = (parse_key(&key), siblings.value()) else { continue };
            // A hint that does not decode is dropped as delivered: it can
            // only have come from a bug, and must not block the queue.
            let sets = postcard::from_bytes(value).unwrap_or_else(|error| {
                tracing::error!(%error, owner = owner.0, "a hint does not decode; it is dropped");
                Vec::new()
            });
            bytes += value.len() as u64;
            hints.push(Hint { key, taken_ms: seq.physical_ms(), bytes: value.len() as u64, sets });
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(hints)
    }

    /// The engine ops that remove `hints` of `owner` (delivered, or
    /// `dropped` undelivered); count them gone with [`HintStore::removed`]
    /// once the ops are durable.
    pub fn remove_ops(&self, hints: &[Hint]) -> Result<Vec<storage::Op>, ServerError> {
        hints
            .iter()
            .map(|hint| {
                let stamp = self.clock.stamp(Hlc::ZERO, Hlc::ZERO, None)?;
                Ok(storage::Op { key: hint.key.clone(), version: stamp.blind(None) })
            })
            .collect()
    }

    /// Nothing is left for `owner`: its count starts again from zero.
    pub fn emptied(&self, owner: NodeId) {
        lock(&self.queues).remove(&owner);
    }

    /// `hints` of `owner` are removed for good; `dropped` of them were
    /// never delivered.
    pub fn removed(&self, owner: NodeId, hints: &[Hint], dropped: u64) {
        let mut queues = lock(&self.queues);
        let queue = queues.entry(owner).or_default();
        queue.hints = queue.hints.saturating_sub(hints.len() as u64);
        queue.bytes = queue.bytes.saturating_sub(hints.iter().map(|h| h.bytes).sum());
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_key_gives_back_its_owner_and_seq() {
        let key = hint_key(NodeId(7), Hlc(99));
        assert_eq!(parse_key(&key), Some((NodeId(7), Hlc(99))));
        assert!(key > keyspace_start(Keyspace::Hints) && key < keyspace_start(Keyspace::BatchLog));
        assert_eq!(parse_key(&key[..16]), None);
        assert_eq!(parse_key(&[Keyspace::Data as u8; 17]), None);
    }
}
