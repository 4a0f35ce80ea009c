//! Sibling sets a node keeps for later, in a keyspace of its own: the hints
//! it holds for replicas that are down ([`super::hints`]) and the batch log
//! ([`super::batchlog`]).
//!
//! - Owns: its keyspace of the node's engine, and a count of the entries
//!   under each node id (what [`SetLog::kept`], [`SetLog::remove`] and
//!   [`SetLog::recount`] tell it).
//! - Receives: entries to keep, as engine ops for the caller to write (so
//!   they can share a WAL record with other ops); entries to remove.
//! - Hands on: the oldest entries, decoded.
//!
//! Layout: `space | node (u64, big-endian) | seq (u64, big-endian)` holds
//! one blind version stamped by this node's clock whose value is the sets,
//! encoded. The node and seq are the user's: a hint's owner and the stamp
//! it was taken at; a batch's coordinator and its stamp. A removed entry is
//! covered by a tombstone, which compaction drops (a local keyspace has no
//! grace period).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{Hlc, NodeId, Siblings};

use crate::lock;
use crate::stamping::NodeClock;
use crate::storage::keys::{keyspace_start, Keyspace};
use crate::storage::storage_error;
use crate::storage::{self, Engine};

/// Sibling sets of several keys.
pub type Sets = Vec<(Vec<u8>, Siblings)>;

/// What is kept under one node id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub entries: u64,
    pub bytes: u64,
}

/// One entry read back.
#[derive(Debug)]
pub struct Entry {
    pub node: NodeId,
    pub seq: Hlc,
    pub bytes: u64,
    pub sets: Sets,
}

impl Entry {
    /// An entry that does not decode can only come from a bug; it is
    /// handed on empty, so it is removed and blocks nothing.
    fn decode(node: NodeId, seq: Hlc, value: &[u8]) -> Entry {
        let sets = postcard::from_bytes(value).unwrap_or_else(|error| {
            tracing::error!(%error, node = node.0, "a kept entry does not decode; it is dropped");
            Vec::new()
        });
        Entry { node, seq, bytes: value.len() as u64, sets }
    }
}

/// A keyspace of sibling sets kept for later.
#[derive(Debug)]
pub struct SetLog {
    engine: Arc<Engine>,
    clock: Arc<NodeClock>,
    space: Keyspace,
    queues: Mutex<BTreeMap<NodeId, Queue>>,
}

impl SetLog {
    /// The entries of `space` in `engine`, uncounted until
    /// [`SetLog::recount`].
    pub fn new(engine: Arc<Engine>, clock: Arc<NodeClock>, space: Keyspace) -> SetLog {
        SetLog { engine, clock, space, queues: Mutex::default() }
    }

    fn key(&self, node: NodeId, seq: Hlc) -> Vec<u8> {
        let mut key = Vec::with_capacity(17);
        key.push(self.space as u8);
        key.extend_from_slice(&node.0.to_be_bytes());
        key.extend_from_slice(&seq.0.to_be_bytes());
        key
    }

    /// The node and seq of one of this log's keys.
    fn parse(&self, key: &[u8]) -> Option<(NodeId, Hlc)> {
        let (&space, rest) = key.split_first()?;
        let (node, seq) = rest.split_at_checked(8)?;
        if space != self.space as u8 || seq.len() != 8 {
            return None;
        }
        Some((NodeId(u64::from_be_bytes(node.try_into().ok()?)), Hlc(u64::from_be_bytes(seq.try_into().ok()?))))
    }

    /// The op that keeps `sets` under `(node, seq)`, and its bytes; count
    /// it with [`SetLog::kept`] once it is written.
    pub fn keep_op(
        &self,
        node: NodeId,
        seq: Hlc,
        sets: &[(Vec<u8>, Siblings)],
    ) -> Result<(storage::Op, u64), ServerError> {
        let value = postcard::to_stdvec(sets)
            .map_err(|e| ServerError::new(ErrorKind::Internal, format!("encoding sibling sets: {e}")))?;
        let bytes = value.len() as u64;
        let stamp = self.clock.stamp(Hlc::ZERO, Hlc::ZERO, None)?;
        Ok((storage::Op { key: self.key(node, seq), version: stamp.blind(Some(value)) }, bytes))
    }

    /// Counts an entry of `bytes` kept under `node`.
    pub fn kept(&self, node: NodeId, bytes: u64) {
        let mut queues = lock(&self.queues);
        let queue = queues.entry(node).or_default();
        queue.entries += 1;
        queue.bytes += bytes;
    }

    /// What is kept under `node`.
    pub fn queue(&self, node: NodeId) -> Queue {
        lock(&self.queues).get(&node).copied().unwrap_or_default()
    }

    /// What is kept under each node id that has entries.
    pub fn queues(&self) -> BTreeMap<NodeId, Queue> {
        lock(&self.queues).iter().filter(|(_, q)| q.entries > 0).map(|(&node, &q)| (node, q)).collect()
    }

    /// The oldest entries under `node` (every node: `None`), about
    /// `bytes_max` of them (at least one). Reads files: not for an async
    /// worker.
    pub fn entries(&self, node: Option<NodeId>, bytes_max: u64) -> storage::Result<Vec<Entry>> {
        let (start, end) = match node {
            Some(node) => {
                let end = node.0.checked_add(1).map(|next| self.key(NodeId(next), Hlc::ZERO));
                (self.key(node, Hlc::ZERO), end.unwrap_or_else(|| keyspace_start(self.space_after())))
            }
            None => (keyspace_start(self.space), keyspace_start(self.space_after())),
        };
        let mut entries = Vec::new();
        let mut bytes = 0;
        for found in self.engine.scan(&start, Some(&end)) {
            let (key, siblings) = found?;
            let (Some((node, seq)), Some(value)) = (self.parse(&key), siblings.value()) else { continue };
            bytes += value.len() as u64;
            entries.push(Entry::decode(node, seq, value));
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(entries)
    }

    /// The entry `(node, seq)`, if it is there. Reads files: not for an
    /// async worker.
    pub fn entry(&self, node: NodeId, seq: Hlc) -> storage::Result<Option<Entry>> {
        let found = self.engine.get(&self.key(node, seq))?;
        Ok(found.as_ref().and_then(Siblings::value).map(|value| Entry::decode(node, seq, value)))
    }

    /// The keyspace after this one (the end of a scan of it).
    fn space_after(&self) -> Keyspace {
        match self.space {
            Keyspace::Data => Keyspace::Hints,
            Keyspace::Hints => Keyspace::BatchLog,
            Keyspace::BatchLog => Keyspace::Postings,
            Keyspace::Postings | Keyspace::Vectors => Keyspace::Vectors,
        }
    }

    /// Removes `entries` durably, then uncounts them.
    pub async fn remove(&self, entries: &[Entry]) -> Result<(), ServerError> {
        let ids: Vec<(NodeId, Hlc)> = entries.iter().map(|e| (e.node, e.seq)).collect();
        self.remove_ids(&ids).await?;
        let mut queues = lock(&self.queues);
        for entry in entries {
            let queue = queues.entry(entry.node).or_default();
            queue.entries = queue.entries.saturating_sub(1);
            queue.bytes = queue.bytes.saturating_sub(entry.bytes);
        }
        Ok(())
    }

    /// Covers the entries `ids` with tombstones, durably (whether they
    /// exist or not; the counts are not changed).
    pub async fn remove_ids(&self, ids: &[(NodeId, Hlc)]) -> Result<(), ServerError> {
        let ops = ids
            .iter()
            .map(|&(node, seq)| {
                let stamp = self.clock.stamp(Hlc::ZERO, Hlc::ZERO, None)?;
                Ok(storage::Op { key: self.key(node, seq), version: stamp.blind(None) })
            })
            .collect::<Result<Vec<_>, ServerError>>()?;
        self.write(ops).await
    }

    /// Writes `ops` (of this log) as one record; returns once durable.
    pub async fn write(&self, ops: Vec<storage::Op>) -> Result<(), ServerError> {
        self.engine.write(ops).await.map(drop).map_err(storage_error)
    }

    /// The counts are what a scan found: `found` under each node id of
    /// `nodes` (every node id: `None`).
    pub fn recount(&self, nodes: Option<&[NodeId]>, found: &[Entry]) {
        let mut queues = lock(&self.queues);
        if nodes.is_none() {
            queues.clear();
        }
        for &node in nodes.unwrap_or_default() {
            queues.remove(&node);
        }
        for entry in found {
            let queue = queues.entry(entry.node).or_default();
            queue.entries += 1;
            queue.bytes += entry.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    /// Entries kept under two nodes come back oldest first, by node;
    /// removed ones do not; the counts follow, and a recount of a new log
    /// over the same engine finds the same.
    #[test]
    fn entries_are_kept_found_by_node_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), storage::Options::default()).unwrap());
        let clock = Arc::new(NodeClock::unpersisted(NodeId(9), Hlc::ZERO, 500, Arc::new(SystemClock)));
        let log = SetLog::new(engine.clone(), clock.clone(), Keyspace::Hints);
        let sets = |v: u8| {
            vec![(vec![v], Siblings::one(clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap().blind(Some(vec![v]))))]
        };
        let mut ops = Vec::new();
        for (node, seq, v) in [(2, 20, 1), (1, 10, 2), (2, 5, 3)] {
            let (op, bytes) = log.keep_op(NodeId(node), Hlc(seq), &sets(v)).unwrap();
            ops.push(op);
            log.kept(NodeId(node), bytes);
        }
        engine.write_blocking(ops).unwrap();
        let seqs = |entries: &[Entry]| entries.iter().map(|e| (e.node.0, e.seq.0)).collect::<Vec<_>>();
        assert_eq!(seqs(&log.entries(Some(NodeId(2)), u64::MAX).unwrap()), [(2, 5), (2, 20)]);
        assert_eq!(seqs(&log.entries(None, u64::MAX).unwrap()), [(1, 10), (2, 5), (2, 20)]);
        assert_eq!(seqs(&log.entries(None, 1).unwrap()), [(1, 10)], "at least one, about the bytes asked");
        assert_eq!(log.entries(Some(NodeId(1)), u64::MAX).unwrap()[0].sets[0].0, [2], "the sets decode");
        assert_eq!(log.queue(NodeId(2)).entries, 2);

        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let two = log.entries(Some(NodeId(2)), u64::MAX).unwrap();
        runtime.block_on(log.remove(&two[..1])).unwrap();
        assert_eq!(seqs(&log.entries(None, u64::MAX).unwrap()), [(1, 10), (2, 20)]);
        assert_eq!(log.queue(NodeId(2)).entries, 1);
        let reopened = SetLog::new(engine, clock, Keyspace::Hints);
        reopened.recount(None, &reopened.entries(None, u64::MAX).unwrap());
        assert_eq!(reopened.queues(), log.queues());
    }
}
