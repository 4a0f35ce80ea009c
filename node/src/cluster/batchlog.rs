//! The batch log: bulk sets all or nothing across nodes.
//!
//! The rule, without I/O (the node and `tests/cluster_sim.rs` both run
//! it): a bulk set's coordinator logs the whole batch durably on itself
//! and on one other node before any replica gets its part ([`Logging`]);
//! applies it as one quorum write; then has every node it asked remove it.
//! A holder replays, as coordinator, a batch still held once it is older
//! than the replay delay, and drops one too old to apply ([`replay`]).
//!
//! The store, [`BatchLog`]:
//! - Owns: a [`SetLog`] in the batch log keyspace, one entry per pending
//!   batch, under its coordinator's id and its stamp (every key of a batch
//!   shares that one stamp), and the ids of the pending ones in memory (a
//!   scan of the keyspace when the node starts), so that finding the
//!   batches due reads none of those already applied.
//! - Receives: batches to log, from their coordinator (this node, or a
//!   peer's `LogBatch`); word that a batch is applied (`BatchDone`).
//! - Does: nothing by itself; [`super::store::ClusterStore`] drives the
//!   rule above with it.
//! - Hands on: the batches due for replay.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{Hlc, NodeId, Siblings};

pub use super::setlog::Entry;
use super::setlog::SetLog;
use crate::lock;
use crate::stamping::NodeClock;
use crate::storage::keys::Keyspace;
use crate::storage::{self, Engine};

/// A coordinator logging one batch: on itself, and on the first other
/// node up in ring order after the batch's first key; if that one fails,
/// or has not answered `hedge_after_ms` after it was asked (a node killed
/// a moment ago still looks up until a heartbeat misses), on the next as
/// well, and so on. Events in ([`Logging::logged_here`],
/// [`Logging::answered`], [`Logging::tick`]); nodes to ask and the end
/// out.
#[derive(Debug)]
pub struct Logging {
    /// The other nodes not asked yet, in the order they are asked.
    others: std::vec::IntoIter<NodeId>,
    /// Every node asked, this one first: each may hold the batch.
    asked: Vec<NodeId>,
    /// Other nodes asked that have not answered.
    waiting: BTreeSet<NodeId>,
    /// This node's own log: not done yet, done, or failed.
    here: Option<Result<(), ServerError>>,
    /// Another node has it durable.
    there: bool,
    /// The last refusal from another node.
    refused: Option<ServerError>,
    /// When the next node is asked if none answered by then.
    hedge_at: u64,
    hedge_after_ms: u64,
    /// After it, a node that has not answered counts as refused.
    deadline_ms: u64,
    ended: bool,
}

/// How logging a batch ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logged {
    /// Durable here and on another node: apply it, then have `holders`
    /// remove it.
    Both { holders: Vec<NodeId> },
    /// Not durable on two nodes: the write fails with this error
    /// (`Unconfirmed` where a node may hold it, and replay it later).
    Failed(ServerError),
}

impl Logging {
    /// Logging batch of coordinator `me` starts at `now_ms`: `order` is
    /// every node in ring order after the batch's first key, `down` those
    /// seen down; a node that has not answered by `deadline_ms` counts as
    /// refused. Returns the first other node to ask (with the log here,
    /// which the caller starts at once).
    pub fn start(
        me: NodeId,
        order: Vec<NodeId>,
        down: &[NodeId],
        now_ms: u64,
        hedge_after_ms: u64,
        deadline_ms: u64,
    ) -> (Logging, Vec<NodeId>) {
        let others: Vec<NodeId> = order.into_iter().filter(|&id| id != me && !down.contains(&id)).collect();
        let mut logging = Logging {
            others: others.into_iter(),
            asked: vec![me],
            waiting: BTreeSet::new(),
            here: None,
            there: false,
            refused: None,
            hedge_at: now_ms,
            hedge_after_ms,
            deadline_ms,
            ended: false,
        };
        let ask = logging.ask_next(now_ms);
        (logging, ask)
    }

    /// The batch is durable in this node's log, or failed to be.
    pub fn logged_here(&mut self, result: Result<(), ServerError>) -> Option<Logged> {
        self.here = Some(result);
        self.end()
    }

    /// Node `from` answered: it holds the batch durably, or refused.
    /// Returns the next node to ask (after a refusal), and the end.
    pub fn answered(
        &mut self,
        from: NodeId,
        result: Result<(), ServerError>,
        now_ms: u64,
    ) -> (Vec<NodeId>, Option<Logged>) {
        if !self.waiting.remove(&from) {
            // Not asked, or answered already: a duplicate.
            return (Vec::new(), None);
        }
        let ask = match result {
            Ok(()) => {
                self.there = true;
                Vec::new()
            }
            Err(error) => {
                self.refused = Some(error);
                self.ask_next(now_ms)
            }
        };
        (ask, self.end())
    }

    /// Time passed: past the hedge, the next node is asked too; past the
    /// deadline, no other node is waited for.
    pub fn tick(&mut self, now_ms: u64) -> (Vec<NodeId>, Option<Logged>) {
        if self.ended || self.there {
            return (Vec::new(), None);
        }
        if now_ms >= self.deadline_ms {
            self.others = Vec::new().into_iter();
            if !self.waiting.is_empty() {
                self.waiting.clear();
                self.refused = Some(ServerError::new(ErrorKind::Timeout, "no other node logged the bulk set in time"));
            }
            return (Vec::new(), self.end());
        }
        if now_ms < self.hedge_at {
            return (Vec::new(), None);
        }
        let ask = self.ask_next(now_ms);
        (ask, self.end())
    }

    /// When [`Logging::tick`] has something to do: `None` once nothing
    /// waits on time.
    pub fn timer(&self) -> Option<u64> {
        let hedge = (self.others.len() > 0).then_some(self.hedge_at);
        (!self.ended && !self.there).then(|| hedge.unwrap_or(self.deadline_ms).min(self.deadline_ms))
    }

    fn ask_next(&mut self, now_ms: u64) -> Vec<NodeId> {
        self.hedge_at = now_ms.saturating_add(self.hedge_after_ms);
        match self.others.next() {
            Some(next) => {
                self.asked.push(next);
                self.waiting.insert(next);
                vec![next]
            }
            None => Vec::new(),
        }
    }

    /// The end, once it is known (and only once).
    fn end(&mut self) -> Option<Logged> {
        if self.ended {
            return None;
        }
        let no_other = !self.there && self.waiting.is_empty() && self.others.len() == 0;
        let ended = match &self.here {
            Some(Ok(())) if self.there => Logged::Both { holders: self.asked.clone() },
            // Logged here: this node replays it later, so it may be applied.
            Some(Ok(())) if no_other => Logged::Failed(ServerError::new(
                ErrorKind::Unconfirmed,
                format!(
                    "the bulk set is logged on this node only ({}); it may still be applied from its log",
                    self.other_error()
                ),
            )),
            // Another node may hold it and replay it.
            Some(Err(error)) if self.there || !self.waiting.is_empty() => Logged::Failed(ServerError::new(
                ErrorKind::Unconfirmed,
                format!("logging the bulk set on this node failed ({error}); another node may still apply it"),
            )),
            Some(Err(error)) => Logged::Failed(error.clone()),
            _ => return None,
        };
        self.ended = true;
        Some(ended)
    }

    fn other_error(&self) -> String {
        match &self.refused {
            Some(error) => error.to_string(),
            None => "a bulk set is logged on two nodes before any replica gets it, and no other node is up".into(),
        }
    }
}

/// What a holder does with a batch stamped at `id_ms`, at `now_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Younger than the replay delay: its coordinator may still apply it.
    Wait,
    /// Apply it as its coordinator would (a quorum write of the same
    /// versions, which changes nothing where they are), then remove it.
    Apply,
    /// Older than half of `gc_grace`: its versions would be refused.
    /// Removed, with an error in the log.
    Drop,
}

/// The replay rule: `replay_after_ms` after its stamp, a batch still held
/// is replayed; past half of `gc_grace_ms`, dropped.
pub fn replay(id_ms: u64, now_ms: u64, replay_after_ms: u64, gc_grace_ms: u64) -> Replay {
    let age = now_ms.saturating_sub(id_ms);
    if age > gc_grace_ms / 2 {
        Replay::Drop
    } else if age > replay_after_ms {
        Replay::Apply
    } else {
        Replay::Wait
    }
}

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

    /// Every batch held that [`replay`] says not to wait for, at `now_ms`,
    /// with what it says to do. Reads files: not for an async worker.
    pub fn due(&self, now_ms: u64, replay_after_ms: u64, gc_grace_ms: u64) -> storage::Result<Vec<(Replay, Entry)>> {
        let decide = |id: &Hlc| replay(id.physical_ms(), now_ms, replay_after_ms, gc_grace_ms);
        let due: Vec<(Replay, NodeId, Hlc)> = lock(&self.pending)
            .iter()
            .map(|&(coordinator, id)| (decide(&id), coordinator, id))
            .filter(|(decision, _, _)| *decision != Replay::Wait)
            .collect();
        let mut batches = Vec::with_capacity(due.len());
        for (decision, coordinator, id) in due {
            match self.log.entry(coordinator, id)? {
                Some(batch) => batches.push((decision, batch)),
                None => {
                    lock(&self.pending).remove(&(coordinator, id));
                }
            }
        }
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = NodeId(1);

    fn refused() -> ServerError {
        ServerError::new(ErrorKind::Unavailable, "refused")
    }

    fn start(down: &[NodeId]) -> (Logging, Vec<NodeId>) {
        Logging::start(ME, (1..=4).map(NodeId).collect(), down, 0, 10, 100)
    }

    #[test]
    fn logged_here_and_on_the_next_node_up() {
        let (mut logging, ask) = start(&[NodeId(2)]);
        assert_eq!(ask, vec![NodeId(3)], "the first other node up, in ring order");
        assert_eq!(logging.answered(NodeId(3), Ok(()), 1), (vec![], None), "not yet here");
        let holders = vec![ME, NodeId(3)];
        assert_eq!(logging.logged_here(Ok(())), Some(Logged::Both { holders }));
        assert_eq!(logging.tick(1_000), (vec![], None), "ended once");
    }

    #[test]
    fn a_refusal_or_a_slow_node_asks_the_next_and_duplicates_count_once() {
        let (mut logging, _) = start(&[]);
        assert_eq!(logging.logged_here(Ok(())), None);
        assert_eq!(logging.answered(NodeId(2), Err(refused()), 1).0, vec![NodeId(3)]);
        assert_eq!(logging.answered(NodeId(2), Ok(()), 2), (vec![], None), "a duplicate answer is ignored");
        assert_eq!(logging.tick(5), (vec![], None), "before the hedge");
        assert_eq!(logging.tick(11).0, vec![NodeId(4)], "past the hedge");
        let (_, ended) = logging.answered(NodeId(4), Ok(()), 12);
        assert_eq!(ended, Some(Logged::Both { holders: vec![ME, NodeId(2), NodeId(3), NodeId(4)] }));
    }

    #[test]
    fn logged_here_only_is_unconfirmed_and_nothing_logged_is_the_error() {
        let (mut logging, _) = start(&[NodeId(3), NodeId(4)]);
        assert_eq!(logging.logged_here(Ok(())), None);
        let (_, ended) = logging.answered(NodeId(2), Err(refused()), 1);
        assert!(matches!(ended, Some(Logged::Failed(e)) if e.kind == ErrorKind::Unconfirmed));

        let (mut logging, _) = start(&[NodeId(3), NodeId(4)]);
        let (_, ended) = logging.tick(100);
        assert_eq!(ended, None, "waits for its own log");
        let ended = logging.logged_here(Ok(()));
        assert!(matches!(ended, Some(Logged::Failed(e)) if e.kind == ErrorKind::Unconfirmed), "timed out: unconfirmed");

        let (mut logging, _) = start(&[NodeId(3), NodeId(4)]);
        let ended = logging.logged_here(Err(refused()));
        assert!(matches!(ended, Some(Logged::Failed(e)) if e.kind == ErrorKind::Unconfirmed), "node 2 may hold it");
        let (mut logging, _) = start(&[NodeId(2), NodeId(3), NodeId(4)]);
        assert_eq!(logging.logged_here(Err(refused())), Some(Logged::Failed(refused())), "held nowhere");
    }

    #[test]
    fn replay_waits_applies_then_drops() {
        assert_eq!(replay(1_000, 1_500, 1_000, 10_000), Replay::Wait);
        assert_eq!(replay(1_000, 2_001, 1_000, 10_000), Replay::Apply);
        assert_eq!(replay(1_000, 6_001, 1_000, 10_000), Replay::Drop);
        assert_eq!(replay(5_000, 1_000, 1_000, 10_000), Replay::Wait, "a stamp ahead of the clock waits");
    }
}
