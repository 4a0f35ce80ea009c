//! The coordinator's quorum logic, without I/O: what to send to which
//! replica, and when an operation is done.
//!
//! - Owns: the operations in flight at this coordinator, each with the
//!   nodes asked, those that answered, the groups that must each reach
//!   their quorum (one per key: its [`Placement`]) and its deadline.
//! - Receives: operations to start (a write of whole sibling sets, each
//!   key with its replicas and the stand-ins holding hints for those that
//!   are down; or a read of a key) and their consistency; replies; the
//!   time, passed in.
//! - Does: a write is acknowledged once, for each of its keys, enough of
//!   that key's replicas have merged it (durably, in production), a hint
//!   counting only at `Any` (sloppy quorum); a read
//!   once enough replicas answered, with the merge of what they hold. A
//!   read then waits for the other replicas' answers (until its deadline)
//!   and sends the merge of all of them to each replica whose answer
//!   differed (read repair). An operation whose deadline passes first
//!   fails with [`Outcome::Unavailable`], naming how many answered of how
//!   many were needed. An operation whose replicas are too few up, as the
//!   coordinator's failure detector sees them, ends before anything is
//!   sent ([`Outcome::TooFewUp`]). Nothing here waits: the caller delivers
//!   messages (the QUIC links in production, a seeded in-memory network in
//!   tests) and calls [`Quorum::expire`] as time goes by, so every
//!   operation ends. [`outcome_error`] says what an outcome means to the
//!   client: nothing written (`Unavailable`) or perhaps written
//!   (`Unconfirmed`).
//! - Hands on: the messages to send, each operation's outcome once, and
//!   what to send that nobody waits for ([`Quorum::take_repairs`]): read
//!   repairs, and hints for the replicas that refused a write or never
//!   answered it.
//!
//! A replica that refuses its part of a write (for any reason: a full
//! disk, a failed engine, a timestamp it finds too far ahead) or does not
//! answer by the deadline is treated like one that is down: the
//! coordinator holds a hint of its part, delivered once it takes writes
//! again. A write stays in flight after its outcome until every node asked
//! answered, so a late refusal is hinted too.
//!
//! A replica applies what it receives with [`replica_handle`], over any
//! [`ReplicaStore`]: merging is the one merge of versions v2, so replicas
//! that received the same sets hold the same siblings whatever the order.

use std::collections::BTreeMap;

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{NodeId, Siblings};

pub use crate::messages::Hinted;

/// A coordinator's id for one operation.
pub type OpId = u64;

pub use quiver_ring::wire::Consistency;

/// What replicas and coordinators send each other about data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataMessage {
    /// Merge these sibling sets and hold these hints, all as one record.
    Write {
        op: OpId,
        sets: Vec<(Vec<u8>, Siblings)>,
        hints: Vec<Hinted>,
    },
    WriteAck {
        op: OpId,
    },
    /// Written, except the hints for `owners`, which the node had no room
    /// for: its own part counts, its hints for them do not.
    WrittenWithoutHints {
        op: OpId,
        owners: Vec<NodeId>,
    },
    Read {
        op: OpId,
        key: Vec<u8>,
    },
    ReadReply {
        op: OpId,
        found: Option<Siblings>,
    },
    /// The replica did not do its part (an error, or no link to it).
    Refused {
        op: OpId,
    },
}

/// What an operation that ends without its quorum may leave behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A read: nothing.
    Read,
    /// A write of which no copy is durable before the quorum logic sends
    /// it: nothing if it ends before anything is sent.
    Write,
    /// A write already durable somewhere (the coordinator's own copy of a
    /// causal write, a logged bulk set): it may be applied.
    Written,
}

/// The error of an operation that did not reach its quorum: `Unavailable`
/// when nothing was written (or it was a read), `Unconfirmed` when it may
/// have been.
pub fn outcome_error(outcome: Outcome, what: &str, ending: Ending) -> ServerError {
    let unconfirmed = |answered: usize, needed: usize, asked: usize| {
        ServerError::new(
            ErrorKind::Unconfirmed,
            format!(
                "{what}: {answered} of {asked} replicas confirmed it in time, {needed} were needed; it may be \
                 applied on some of them"
            ),
        )
    };
    match (outcome, ending) {
        (Outcome::TooFewUp { up, needed, replicas }, Ending::Written) => unconfirmed(up, needed, replicas),
        (Outcome::TooFewUp { up, needed, replicas }, _) => {
            let nothing = if ending == Ending::Read { "nothing was read" } else { "nothing was written" };
            ServerError::new(
                ErrorKind::Unavailable,
                format!(
                    "{what}: {up} of {replicas} replicas are up as this node sees them, {needed} are needed; {nothing}"
                ),
            )
        }
        (Outcome::Unavailable { answered, needed, asked }, Ending::Read) => ServerError::new(
            ErrorKind::Unavailable,
            format!("{what}: {answered} of {asked} replicas answered in time, {needed} were needed"),
        ),
        (Outcome::Unavailable { answered, needed, asked }, _) => unconfirmed(answered, needed, asked),
        (other, _) => ServerError::new(ErrorKind::Internal, format!("{what} ended as {other:?}")),
    }
}

/// The op id of a message whose answer nobody waits for (a hint the
/// coordinator holds for a replica that refused).
pub const UNAWAITED: OpId = 0;

/// Where one key's copies go: its replicas, and for each replica known to
/// be down, the healthy node that holds a hint for it instead (sloppy
/// quorum). A replica that is down is sent nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The key's replicas (its preference list), those down included.
    pub replicas: Vec<NodeId>,
    /// `(replica that is down, the node holding its hint)`.
    pub stand_ins: Vec<(NodeId, NodeId)>,
}

impl From<Vec<NodeId>> for Placement {
    fn from(replicas: Vec<NodeId>) -> Placement {
        Placement { replicas, stand_ins: Vec::new() }
    }
}

impl Placement {
    /// The replicas this coordinator sees up, in order.
    fn replicas_up(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas.iter().copied().filter(|&id| !self.is_down(id))
    }

    fn is_down(&self, node: NodeId) -> bool {
        self.stand_ins.iter().any(|&(down, _)| down == node)
    }

    /// `(answered, needed, asked)`: a hint counts only at `Any`, and only
    /// if its holder kept it (`(holder, owner)` pairs in `dropped` did not).
    fn count(
        &self,
        answered: &[NodeId],
        dropped: &[(NodeId, NodeId)],
        consistency: Consistency,
    ) -> (usize, usize, usize) {
        let real = self.replicas.iter().filter(|id| answered.contains(id)).count();
        let asked = self.replicas.len();
        if consistency == Consistency::Any {
            let kept = |&&(owner, holder): &&(NodeId, NodeId)| {
                answered.contains(&holder) && !dropped.contains(&(holder, owner))
            };
            let holders = self.stand_ins.iter().filter(kept).count();
            return (real + holders, 1.min(asked), asked);
        }
        (real, consistency.needed(asked), asked)
    }
}

/// What one node is sent of a write.
#[derive(Default)]
struct Part {
    sets: Vec<(Vec<u8>, Siblings)>,
    hints: Vec<Hinted>,
}

impl Part {
    fn hint(&mut self, owner: NodeId, set: (Vec<u8>, Siblings)) {
        match self.hints.iter_mut().find(|h| h.owner == owner) {
            Some(hinted) => hinted.sets.push(set),
            None => self.hints.push(Hinted { owner, sets: vec![set] }),
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// The merge of what the replicas that answered hold.
    Read(Option<Siblings>),
    /// Too few replicas answered by the deadline (or too many refused):
    /// a write was sent, and may be applied on some of them.
    Unavailable {
        answered: usize,
        needed: usize,
        asked: usize,
    },
    /// Too few of the replicas are up, as this coordinator's failure
    /// detector sees them, to reach the consistency asked: nothing was
    /// sent ([`unreachable`]).
    TooFewUp {
        up: usize,
        needed: usize,
        replicas: usize,
    },
}

/// What starting an operation gives: its id, the messages to send, and its
/// outcome if it already has one (then nothing waits for it).
pub type Started = (OpId, Vec<(NodeId, DataMessage)>, Option<Outcome>);

/// The outcome of an operation that cannot reach `consistency` with the
/// nodes its coordinator can send to (each key's replicas that are up, and
/// at `Any` the stand-ins holding hints): [`Outcome::TooFewUp`], naming the
/// counts of the key furthest from it. `None` when every key can.
///
/// Checked before anything is sent or written, so a node that sees its
/// peers down answers at once, and the client can go to another replica
/// knowing nothing was applied.
pub fn unreachable(placements: &[Placement], consistency: Consistency) -> Option<Outcome> {
    placements
        .iter()
        .map(|placement| {
            let holders = placement.stand_ins.iter().map(|&(_, holder)| holder);
            let up: Vec<NodeId> = placement.replicas_up().chain(holders).collect();
            placement.count(&up, &[], consistency)
        })
        .filter(|&(up, needed, _)| up < needed)
        .min_by_key(|&(up, needed, _)| up as i64 - needed as i64)
        .map(|(up, needed, replicas)| Outcome::TooFewUp { up, needed, replicas })
}

#[derive(Debug)]
struct Pending {
    asked: Vec<NodeId>,
    answered: Vec<NodeId>,
    /// Asked, and refused (or, once the deadline passed, never answered).
    refused: Vec<NodeId>,
    /// `(holder, owner)`: hints a node answered without keeping.
    hints_dropped: Vec<(NodeId, NodeId)>,
    /// For a write: its sets, each with the group of the same index.
    sets: Vec<(Vec<u8>, Siblings)>,
    /// Each must reach its quorum: where each key went.
    groups: Vec<Placement>,
    consistency: Consistency,
    deadline_ms: u64,
    /// For a read: its key and what each replica answered.
    read: Option<Read>,
    /// Its outcome was given; it waits only for the other answers.
    done: bool,
}

/// What a read has heard.
#[derive(Debug, Default)]
struct Read {
    key: Vec<u8>,
    answers: Vec<(NodeId, Option<Siblings>)>,
}

impl Read {
    /// The merge of every answer so far.
    fn merged(&self) -> Option<Siblings> {
        let mut sets = self.answers.iter().filter_map(|(_, found)| found.clone());
        let mut merged = sets.next()?;
        sets.for_each(|set| merged.merge(set));
        Some(merged)
    }

    /// Read repair: the merge of every answer, to each replica whose own
    /// answer differs from it.
    fn repairs(&self, op: OpId) -> Vec<(NodeId, DataMessage)> {
        let Some(merged) = self.merged() else { return Vec::new() };
        self.answers
            .iter()
            .filter(|(_, found)| found.as_ref() != Some(&merged))
            .map(|(node, _)| {
                let sets = vec![(self.key.clone(), merged.clone())];
                (*node, DataMessage::Write { op, sets, hints: Vec::new() })
            })
            .collect()
    }
}

impl Pending {
    /// `(answered, needed, asked)` of the group furthest from its quorum.
    fn worst(&self) -> (usize, usize, usize) {
        self.groups
            .iter()
            .map(|g| g.count(&self.answered, &self.hints_dropped, self.consistency))
            .min_by_key(|&(answered, needed, _)| answered as i64 - needed as i64)
            .unwrap_or((0, 0, 0))
    }

    fn reached(&self) -> bool {
        let (answered, needed, _) = self.worst();
        answered >= needed
    }

    /// Whether every group can still reach its quorum, if every node asked
    /// that has not refused answers.
    fn reachable(&self) -> bool {
        let may_answer: Vec<NodeId> = self.asked.iter().filter(|id| !self.refused.contains(id)).copied().collect();
        self.groups.iter().all(|g| {
            let (answered, needed, _) = g.count(&may_answer, &self.hints_dropped, self.consistency);
            answered >= needed
        })
    }

    /// Every node asked answered or refused.
    fn heard_all(&self) -> bool {
        self.answered.len() + self.refused.len() >= self.asked.len()
    }

    /// For a write: what `refuser` was to hold, as hints held by `holder`:
    /// its own part (for it), and the hints it stood in for (for their
    /// owners). Nothing for `holder` itself.
    fn hint_for(&self, refuser: NodeId, holder: NodeId) -> Option<(NodeId, DataMessage)> {
        let mut part = Part::default();
        for (set, group) in self.sets.iter().zip(&self.groups) {
            let own = (group.replicas.contains(&refuser) && !group.is_down(refuser)).then_some(refuser);
            let stood_in = group.stand_ins.iter().filter(|&&(_, h)| h == refuser).map(|&(owner, _)| owner);
            for owner in own.into_iter().chain(stood_in).filter(|&owner| owner != holder) {
                part.hint(owner, set.clone());
            }
        }
        (!part.hints.is_empty())
            .then(|| (holder, DataMessage::Write { op: UNAWAITED, sets: Vec::new(), hints: part.hints }))
    }
}

/// The operations in flight at one coordinator.
#[derive(Debug)]
pub struct Quorum {
    /// The coordinator: it holds the hints of replicas that refuse.
    me: NodeId,
    next: OpId,
    pending: BTreeMap<OpId, Pending>,
    repairs: Vec<(NodeId, DataMessage)>,
}

impl Quorum {
    /// The operations coordinated by node `me`.
    pub fn new(me: NodeId) -> Quorum {
        Quorum { me, next: UNAWAITED, pending: BTreeMap::new(), repairs: Vec::new() }
    }

    fn start(
        &mut self,
        groups: Vec<Placement>,
        sets: Vec<(Vec<u8>, Siblings)>,
        consistency: Consistency,
        deadline_ms: u64,
        read: Option<Read>,
    ) -> OpId {
        self.next += 1;
        let mut asked: Vec<NodeId> = groups
            .iter()
            .flat_map(|g| {
                let up = g.replicas_up();
                up.chain(g.stand_ins.iter().map(|&(_, holder)| holder))
            })
            .collect();
        asked.sort();
        asked.dedup();
        let pending = Pending {
            asked,
            answered: Vec::new(),
            refused: Vec::new(),
            hints_dropped: Vec::new(),
            sets,
            groups,
            consistency,
            deadline_ms,
            read,
            done: false,
        };
        self.pending.insert(self.next, pending);
        self.next
    }

    /// Starts a write of `sets` (keys and their sibling sets), each to its
    /// placement (in the same order): every node gets all of its keys and
    /// all the hints it holds in one message. Returns the messages to send;
    /// nothing, and [`Outcome::TooFewUp`], when too few replicas are up.
    pub fn start_write(
        &mut self,
        sets: Vec<(Vec<u8>, Siblings)>,
        placements: Vec<Placement>,
        consistency: Consistency,
        deadline_ms: u64,
    ) -> Started {
        if let Some(outcome) = unreachable(&placements, consistency) {
            return (self.skip(), Vec::new(), Some(outcome));
        }
        let mut parts: BTreeMap<NodeId, Part> = BTreeMap::new();
        for (set, placement) in sets.iter().zip(&placements) {
            for node in placement.replicas_up() {
                parts.entry(node).or_default().sets.push(set.clone());
            }
            for &(owner, holder) in &placement.stand_ins {
                parts.entry(holder).or_default().hint(owner, set.clone());
            }
        }
        let op = self.start(placements, sets, consistency, deadline_ms, None);
        let messages =
            parts.into_iter().map(|(to, Part { sets, hints })| (to, DataMessage::Write { op, sets, hints })).collect();
        (op, messages, None)
    }

    /// An id for an operation that ends before it starts.
    fn skip(&mut self) -> OpId {
        self.next += 1;
        self.next
    }

    /// Starts a write of `sets` that `holder`, one of the replicas, already
    /// has durable (a causal write it coordinated): it
    /// counts as answered and is sent only the hints it holds, if any.
    /// Returns the messages to send, and the outcome if that one answer is
    /// already enough (or, before anything is sent, if too few replicas
    /// are up).
    pub fn start_write_held(
        &mut self,
        sets: Vec<(Vec<u8>, Siblings)>,
        placements: Vec<Placement>,
        consistency: Consistency,
        deadline_ms: u64,
        holder: NodeId,
    ) -> Started {
        let (op, mut messages, outcome) = self.start_write(sets, placements, consistency, deadline_ms);
        if outcome.is_some() {
            return (op, messages, outcome);
        }
        messages.retain_mut(|(to, message)| match message {
            DataMessage::Write { sets, hints, .. } if *to == holder => {
                sets.clear();
                !hints.is_empty()
            }
            _ => true,
        });
        let done = self.on_reply(holder, DataMessage::WriteAck { op }).map(|(_, outcome)| outcome);
        (op, messages, done)
    }

    /// Starts a read of `key` from its replicas (`placement`: those down
    /// are asked too, in case they answer; its stand-ins play no part):
    /// the messages to send, or [`Outcome::TooFewUp`] at once when too few
    /// replicas are up.
    pub fn start_read(
        &mut self,
        key: &[u8],
        placement: &Placement,
        consistency: Consistency,
        deadline_ms: u64,
    ) -> Started {
        let down_only = Placement { replicas: placement.replicas.clone(), stand_ins: Vec::new() };
        let up: Vec<NodeId> = placement.replicas_up().collect();
        let (up, needed, replicas) = down_only.count(&up, &[], consistency);
        if up < needed {
            return (self.skip(), Vec::new(), Some(Outcome::TooFewUp { up, needed, replicas }));
        }
        let read = Read { key: key.to_vec(), answers: Vec::new() };
        let op = self.start(vec![down_only], Vec::new(), consistency, deadline_ms, Some(read));
        let messages = placement.replicas.iter().map(|&to| (to, DataMessage::Read { op, key: key.to_vec() })).collect();
        (op, messages, None)
    }

    /// A replica's reply. Returns the operation's outcome when this reply
    /// completes it; a reply to an operation that ended, from a replica not
    /// asked, or given twice, changes nothing. An operation stays after its
    /// outcome until every replica asked answered (or its deadline): then a
    /// read queues its read repairs ([`Quorum::take_repairs`]). A replica
    /// that refuses its part of a write gets a hint of it, held by this
    /// coordinator.
    pub fn on_reply(&mut self, from: NodeId, message: DataMessage) -> Option<(OpId, Outcome)> {
        let (op, found, dropped) = match message {
            DataMessage::WriteAck { op } => (op, None, Vec::new()),
            DataMessage::WrittenWithoutHints { op, owners } => (op, None, owners),
            DataMessage::ReadReply { op, found } => (op, Some(found), Vec::new()),
            DataMessage::Refused { op } => return self.on_refused(from, op),
            DataMessage::Write { .. } | DataMessage::Read { .. } => return None,
        };
        let pending = self.pending.get_mut(&op)?;
        if !pending.asked.contains(&from) || pending.answered.contains(&from) || pending.refused.contains(&from) {
            return None;
        }
        pending.hints_dropped.extend(dropped.into_iter().map(|owner| (from, owner)));
        match (&mut pending.read, found) {
            (Some(read), Some(found)) => read.answers.push((from, found)),
            (None, None) => {}
            // A read reply to a write or an ack to a read: not an answer.
            _ => return None,
        }
        pending.answered.push(from);
        let outcome = (!pending.done && pending.reached()).then(|| match &pending.read {
            Some(read) => Outcome::Read(read.merged()),
            None => Outcome::Written,
        });
        pending.done |= outcome.is_some();
        if pending.done && pending.heard_all() {
            self.end(op);
        }
        outcome.map(|outcome| (op, outcome))
    }

    /// Replica `from` did not do its part of `op`: a write's part is hinted
    /// (held by this coordinator); the operation is unavailable at once if
    /// its quorum can no longer be reached.
    fn on_refused(&mut self, from: NodeId, op: OpId) -> Option<(OpId, Outcome)> {
        let me = self.me;
        let pending = self.pending.get_mut(&op)?;
        if !pending.asked.contains(&from) || pending.answered.contains(&from) || pending.refused.contains(&from) {
            return None;
        }
        pending.refused.push(from);
        self.repairs.extend(pending.hint_for(from, me));
        // Too many refused to reach the quorum: unavailable now, not at
        // the deadline.
        let outcome = (!pending.done && !pending.reachable()).then(|| {
            let (answered, needed, asked) = pending.worst();
            Outcome::Unavailable { answered, needed, asked }
        });
        pending.done |= outcome.is_some();
        if pending.done && pending.heard_all() {
            self.end(op);
        }
        outcome.map(|outcome| (op, outcome))
    }

    /// Removes operation `op`, queueing a read's repairs.
    fn end(&mut self, op: OpId) -> Option<Pending> {
        let pending = self.pending.remove(&op)?;
        if let Some(read) = &pending.read {
            self.repairs.extend(read.repairs(op));
        }
        Some(pending)
    }

    /// Ends every operation whose deadline is before `now_ms`: those
    /// without an outcome yet as `Unavailable`, reads that had theirs with
    /// the repair of the replicas that answered; a write's replicas that
    /// never answered get a hint, as if they had refused.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(OpId, Outcome)> {
        let expired: Vec<OpId> =
            self.pending.iter().filter(|(_, p)| p.deadline_ms < now_ms).map(|(&op, _)| op).collect();
        expired
            .into_iter()
            .filter_map(|op| {
                let pending = self.end(op)?;
                let silent =
                    pending.asked.iter().filter(|id| !pending.answered.contains(id) && !pending.refused.contains(id));
                let hints: Vec<_> = silent.filter_map(|&id| pending.hint_for(id, self.me)).collect();
                self.repairs.extend(hints);
                let (answered, needed, asked) = pending.worst();
                (!pending.done).then_some((op, Outcome::Unavailable { answered, needed, asked }))
            })
            .collect()
    }

    /// What to send that nobody waits for: read repairs (the merged set
    /// of a read to each replica that answered it with something else) and
    /// hints for replicas that refused a write (to this coordinator).
    pub fn take_repairs(&mut self) -> Vec<(NodeId, DataMessage)> {
        std::mem::take(&mut self.repairs)
    }

    /// Operations still in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// A replica's refusal of a write: nothing of it was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal;

/// Where a replica keeps sibling sets.
pub trait ReplicaStore {
    /// Merges every set in and holds every hint that fits, as one record:
    /// the owners whose hints had no room; or refuses all of it (a
    /// timestamp too far ahead of its clock).
    fn merge(&mut self, sets: Vec<(Vec<u8>, Siblings)>, hints: Vec<Hinted>) -> Result<Vec<NodeId>, Refusal>;
    fn get(&self, key: &[u8]) -> Option<Siblings>;
}

/// What a replica does with a data message: the reply to send back, if any.
pub fn replica_handle(store: &mut impl ReplicaStore, message: DataMessage) -> Option<DataMessage> {
    match message {
        DataMessage::Write { op, sets, hints } => Some(match store.merge(sets, hints) {
            Ok(owners) if owners.is_empty() => DataMessage::WriteAck { op },
            Ok(owners) => DataMessage::WrittenWithoutHints { op, owners },
            Err(Refusal) => DataMessage::Refused { op },
        }),
        DataMessage::Read { op, key } => Some(DataMessage::ReadReply { op, found: store.get(&key) }),
        DataMessage::WriteAck { .. }
        | DataMessage::WrittenWithoutHints { .. }
        | DataMessage::ReadReply { .. }
        | DataMessage::Refused { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::{Hlc, Stamp};

    fn set(hlc: u64) -> Siblings {
        Siblings::one(Stamp { node: NodeId(1), hlc: Hlc(hlc) }.blind(Some(vec![1])))
    }

    #[test]
    fn a_write_is_done_at_the_needed_answers_and_only_once() {
        let mut quorum = Quorum::new(NodeId(1));
        let replicas = [NodeId(1), NodeId(2), NodeId(3)];
        let (op, messages, _) =
            quorum.start_write(vec![(b"k".to_vec(), set(5))], vec![replicas.to_vec().into()], Consistency::Quorum, 100);
        assert_eq!(messages.len(), 3);
        assert_eq!(quorum.on_reply(NodeId(2), DataMessage::WriteAck { op }), None);
        assert_eq!(quorum.on_reply(NodeId(2), DataMessage::WriteAck { op }), None, "the same replica twice");
        assert_eq!(quorum.on_reply(NodeId(9), DataMessage::WriteAck { op }), None, "a replica not asked");
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::WriteAck { op }), Some((op, Outcome::Written)));
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::WriteAck { op }), None, "already done");
        assert_eq!(quorum.in_flight(), 0);
    }

    /// A read answers at its quorum, then, once every replica answered,
    /// sends the merge of all answers to each replica that answered
    /// something else; one that never answers is left out at the deadline.
    #[test]
    fn a_read_repairs_the_replicas_that_answered_stale_or_nothing() {
        let mut quorum = Quorum::new(NodeId(1));
        let replicas = [NodeId(1), NodeId(2), NodeId(3)];
        let (op, _, _) = quorum.start_read(b"k", &replicas.to_vec().into(), Consistency::Quorum, 100);
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::ReadReply { op, found: Some(set(9)) }), None);
        let done = quorum.on_reply(NodeId(2), DataMessage::ReadReply { op, found: Some(set(5)) });
        assert_eq!(done, Some((op, Outcome::Read(Some(set(9))))));
        assert!(quorum.take_repairs().is_empty(), "not before every replica answered");
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::ReadReply { op, found: None }), None, "answered already");
        let repair =
            |to: u64| (NodeId(to), DataMessage::Write { op, sets: vec![(b"k".to_vec(), set(9))], hints: vec![] });
        assert_eq!(quorum.take_repairs(), vec![repair(2), repair(3)]);
        assert_eq!(quorum.in_flight(), 0);

        let (op, _, _) = quorum.start_read(b"k", &replicas.to_vec().into(), Consistency::Quorum, 100);
        quorum.on_reply(NodeId(1), DataMessage::ReadReply { op, found: Some(set(9)) });
        quorum.on_reply(NodeId(2), DataMessage::ReadReply { op, found: None });
        assert!(quorum.expire(101).is_empty(), "it had its outcome: not unavailable");
        let repair = (NodeId(2), DataMessage::Write { op, sets: vec![(b"k".to_vec(), set(9))], hints: vec![] });
        assert_eq!(quorum.take_repairs(), vec![repair], "the silent replica is left out");
    }

    /// A write the coordinating replica already holds: it is sent to the
    /// others only, counts as one answer, and is done at once at `one`.
    #[test]
    fn a_write_held_by_its_coordinator_counts_it_as_answered() {
        let mut quorum = Quorum::new(NodeId(1));
        let replicas = vec![NodeId(1), NodeId(2), NodeId(3)];
        let sets = vec![(b"k".to_vec(), set(5))];
        let (op, messages, done) =
            quorum.start_write_held(sets.clone(), vec![replicas.clone().into()], Consistency::Quorum, 100, NodeId(2));
        let to: Vec<NodeId> = messages.iter().map(|(to, _)| *to).collect();
        assert_eq!((to, done), (vec![NodeId(1), NodeId(3)], None));
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::WriteAck { op }), Some((op, Outcome::Written)));

        let (op, _, done) = quorum.start_write_held(sets, vec![replicas.into()], Consistency::One, 100, NodeId(2));
        assert_eq!(done, Some(Outcome::Written));
        assert_eq!(quorum.in_flight(), 2, "both writes wait for their other replicas' answers");
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::WriteAck { op }), None);
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::WriteAck { op }), None);
        assert_eq!(quorum.in_flight(), 1);
    }

    /// A replica that refuses its part of a write, before or after the
    /// outcome, or never answers it, gets a hint held by the coordinator
    /// (node 1), which nobody waits for; refusals that leave the quorum
    /// out of reach end the write at once.
    #[test]
    fn a_replica_that_refuses_or_never_answers_a_write_is_hinted() {
        let replicas = vec![NodeId(1), NodeId(2), NodeId(3)];
        let k = || (b"k".to_vec(), set(5));
        let hint = |owner: u64| {
            let hints = vec![Hinted { owner: NodeId(owner), sets: vec![k()] }];
            (NodeId(1), DataMessage::Write { op: UNAWAITED, sets: vec![], hints })
        };
        let mut quorum = Quorum::new(NodeId(1));
        let (op, _, _) = quorum.start_write(vec![k()], vec![replicas.clone().into()], Consistency::Quorum, 100);
        assert_eq!(quorum.on_reply(NodeId(2), DataMessage::Refused { op }), None);
        assert_eq!(quorum.take_repairs(), vec![hint(2)]);
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::WriteAck { op }), None);
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::WriteAck { op }), Some((op, Outcome::Written)));
        assert_eq!(quorum.on_reply(NodeId(2), DataMessage::WriteAck { op }), None, "a refusal is final");
        assert_eq!(quorum.in_flight(), 0);

        let (op, _, _) = quorum.start_write(vec![k()], vec![replicas.clone().into()], Consistency::Quorum, 100);
        quorum.on_reply(NodeId(1), DataMessage::WriteAck { op });
        quorum.on_reply(NodeId(2), DataMessage::WriteAck { op });
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::Refused { op }), None, "after the outcome");
        assert_eq!(quorum.take_repairs(), vec![hint(3)]);

        let (op, _, _) = quorum.start_write(vec![k()], vec![replicas.clone().into()], Consistency::Quorum, 100);
        quorum.on_reply(NodeId(2), DataMessage::Refused { op });
        let unavailable = Outcome::Unavailable { answered: 0, needed: 2, asked: 3 };
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::Refused { op }), Some((op, unavailable)), "at once");
        assert_eq!(quorum.take_repairs(), vec![hint(2), hint(3)]);
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::Refused { op }), None, "no hint for itself");
        assert!(quorum.take_repairs().is_empty());

        let (op, _, _) = quorum.start_write(vec![k()], vec![replicas.into()], Consistency::Quorum, 100);
        quorum.on_reply(NodeId(1), DataMessage::WriteAck { op });
        quorum.on_reply(NodeId(2), DataMessage::WriteAck { op });
        assert!(quorum.expire(101).is_empty(), "it had its outcome");
        assert_eq!(quorum.take_repairs(), vec![hint(3)], "the silent replica");
        assert_eq!(quorum.in_flight(), 0);

        // Node 3 is down and node 4 stands in for it: when 4 refuses, the
        // coordinator holds 3's hint.
        let placement =
            Placement { replicas: vec![NodeId(1), NodeId(2), NodeId(3)], stand_ins: vec![(NodeId(3), NodeId(4))] };
        let (op, _, _) = quorum.start_write(vec![k()], vec![placement], Consistency::Quorum, 100);
        assert_eq!(quorum.on_reply(NodeId(4), DataMessage::Refused { op }), None);
        assert_eq!(quorum.take_repairs(), vec![hint(3)], "the stand-in's hint, now held by the coordinator");
    }

    /// A write of two keys with different replicas is done only when each
    /// key has its quorum.
    #[test]
    fn a_write_of_several_keys_needs_each_keys_quorum() {
        let mut quorum = Quorum::new(NodeId(1));
        let (a, b) = (vec![NodeId(1), NodeId(2), NodeId(3)], vec![NodeId(3), NodeId(4), NodeId(5)]);
        let sets = vec![(b"a".to_vec(), set(1)), (b"b".to_vec(), set(1))];
        let (op, messages, _) = quorum.start_write(sets, vec![a.into(), b.into()], Consistency::Quorum, 100);
        assert_eq!(messages.len(), 5, "one message per replica");
        let three = messages.iter().find(|(to, _)| *to == NodeId(3)).unwrap();
        assert!(
            matches!(&three.1, DataMessage::Write { sets, .. } if sets.len() == 2),
            "node 3 gets both keys at once"
        );
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::WriteAck { op }), None);
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::WriteAck { op }), None, "a has its quorum, b not yet");
        assert_eq!(quorum.expire(101), vec![(op, Outcome::Unavailable { answered: 1, needed: 2, asked: 3 })]);
    }

    /// With replica 3 down, its copy goes to node 4 as a hint, in the same
    /// message as nothing else; node 1 holds a hint for it too beside its
    /// own copy. Hints count only at `any`: at `quorum` two real replicas
    /// are needed, and a hint holder's answer is not one.
    #[test]
    fn a_hinted_copy_counts_only_at_any() {
        let k = || (b"k".to_vec(), set(5));
        let placement =
            || Placement { replicas: vec![NodeId(1), NodeId(2), NodeId(3)], stand_ins: vec![(NodeId(3), NodeId(4))] };
        let mut quorum = Quorum::new(NodeId(1));
        let (op, messages, _) = quorum.start_write(vec![k()], vec![placement()], Consistency::Quorum, 100);
        let hint = vec![Hinted { owner: NodeId(3), sets: vec![k()] }];
        let want = vec![
            (NodeId(1), DataMessage::Write { op, sets: vec![k()], hints: vec![] }),
            (NodeId(2), DataMessage::Write { op, sets: vec![k()], hints: vec![] }),
            (NodeId(4), DataMessage::Write { op, sets: vec![], hints: hint }),
        ];
        assert_eq!(messages, want, "the replica that is down is sent nothing");
        assert_eq!(quorum.on_reply(NodeId(3), DataMessage::WriteAck { op }), None, "not asked");
        assert_eq!(quorum.on_reply(NodeId(4), DataMessage::WriteAck { op }), None, "a hint is no replica");
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::WriteAck { op }), None);
        assert_eq!(quorum.expire(101), vec![(op, Outcome::Unavailable { answered: 1, needed: 2, asked: 3 })]);

        let (op, _, _) = quorum.start_write(vec![k()], vec![placement()], Consistency::One, 100);
        assert_eq!(quorum.on_reply(NodeId(4), DataMessage::WriteAck { op }), None, "one: a hint is no replica");
        let (op, _, _) = quorum.start_write(vec![k()], vec![placement()], Consistency::Any, 100);
        assert_eq!(quorum.on_reply(NodeId(4), DataMessage::WriteAck { op }), Some((op, Outcome::Written)));

        // A hint its holder had no room for does not count, at `any` too.
        let (op, _, _) = quorum.start_write(vec![k()], vec![placement()], Consistency::Any, 100);
        let without = DataMessage::WrittenWithoutHints { op, owners: vec![NodeId(3)] };
        assert_eq!(quorum.on_reply(NodeId(4), without), None);
        assert_eq!(quorum.on_reply(NodeId(2), DataMessage::WriteAck { op }), Some((op, Outcome::Written)));
    }

    /// A causal write's coordinator, which holds its own copy already, is
    /// still sent the hints it stands in for.
    #[test]
    fn a_coordinator_holding_the_write_is_sent_only_its_hints() {
        let mut quorum = Quorum::new(NodeId(1));
        let placement =
            Placement { replicas: vec![NodeId(1), NodeId(2), NodeId(3)], stand_ins: vec![(NodeId(3), NodeId(1))] };
        let sets = vec![(b"k".to_vec(), set(5))];
        let (op, messages, done) =
            quorum.start_write_held(sets.clone(), vec![placement], Consistency::Quorum, 100, NodeId(1));
        let hints = vec![Hinted { owner: NodeId(3), sets: sets.clone() }];
        let want = vec![
            (NodeId(1), DataMessage::Write { op, sets: vec![], hints }),
            (NodeId(2), DataMessage::Write { op, sets, hints: vec![] }),
        ];
        assert_eq!((messages, done), (want, None));
    }

    /// A coordinator that sees too few replicas up ends the operation at
    /// once, naming the counts, and sends nothing (a node cut off from its
    /// peers: the client goes to another replica); at `any` the hint its
    /// stand-in holds is enough.
    #[test]
    fn too_few_replicas_up_ends_an_operation_before_anything_is_sent() {
        let mut quorum = Quorum::new(NodeId(1));
        let k = || (b"k".to_vec(), set(5));
        let cut_off = || Placement {
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            stand_ins: vec![(NodeId(2), NodeId(1)), (NodeId(3), NodeId(1))],
        };
        let too_few = |up, needed| Some(Outcome::TooFewUp { up, needed, replicas: 3 });
        let (_, messages, done) = quorum.start_write(vec![k()], vec![cut_off()], Consistency::Quorum, 100);
        assert_eq!((messages, done), (vec![], too_few(1, 2)));
        let (_, messages, done) = quorum.start_write_held(vec![k()], vec![cut_off()], Consistency::All, 100, NodeId(1));
        assert_eq!((messages, done), (vec![], too_few(1, 3)));
        let (_, messages, done) = quorum.start_read(b"k", &cut_off(), Consistency::Quorum, 100);
        assert_eq!((messages, done), (vec![], too_few(1, 2)));
        assert_eq!(quorum.in_flight(), 0, "nothing waits");

        let (_, messages, done) = quorum.start_write(vec![k()], vec![cut_off()], Consistency::One, 100);
        assert_eq!((messages.len(), done), (1, None), "one: the coordinator's own copy may do");
        let (_, _, done) = quorum.start_read(b"k", &cut_off(), Consistency::One, 100);
        assert_eq!(done, None);

        // Two keys: the one furthest from its quorum is named.
        let one_down =
            Placement { replicas: vec![NodeId(1), NodeId(2), NodeId(4)], stand_ins: vec![(NodeId(4), NodeId(1))] };
        let sets = vec![k(), (b"j".to_vec(), set(5))];
        let (_, _, done) = quorum.start_write(sets, vec![one_down, cut_off()], Consistency::All, 100);
        assert_eq!(done, too_few(1, 3));
    }

    #[test]
    fn a_read_merges_the_answers_and_an_expired_one_names_the_counts() {
        let mut quorum = Quorum::new(NodeId(1));
        let replicas = [NodeId(1), NodeId(2), NodeId(3)];
        let (op, _, _) = quorum.start_read(b"k", &replicas.to_vec().into(), Consistency::Quorum, 100);
        assert_eq!(quorum.on_reply(NodeId(1), DataMessage::ReadReply { op, found: Some(set(5)) }), None);
        let (_, outcome) = quorum.on_reply(NodeId(3), DataMessage::ReadReply { op, found: Some(set(9)) }).unwrap();
        assert_eq!(outcome, Outcome::Read(Some(set(9))));

        let (op, _, _) = quorum.start_read(b"k", &replicas.to_vec().into(), Consistency::All, 100);
        quorum.on_reply(NodeId(1), DataMessage::ReadReply { op, found: None });
        assert!(quorum.expire(100).is_empty(), "not before its deadline");
        assert_eq!(quorum.expire(101), vec![(op, Outcome::Unavailable { answered: 1, needed: 3, asked: 3 })]);
    }
}
