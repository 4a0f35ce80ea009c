//! [`ClusterStore`]: the [`Store`] of a node in a cluster. Any node
//! coordinates: a write goes to each key's N replicas on the ring and is
//! acknowledged once W of them have it durable; a read asks the N replicas
//! and answers with the merge of the first R answers. Defaults N=3,
//! R=W=quorum (2 of 3).
//!
//! - Owns: the ring, computed once every configured member's node id is
//!   known from heartbeats (until then requests are `Unavailable`).
//! - Receives: requests from the front; the replicas' answers over the
//!   peer links (this node's own part goes straight to its [`LocalStore`]).
//! - Does: stamps blind writes (the node's clock, above the client's
//!   timestamp, never past the deadline); the quorum logic of
//!   [`super::quorum`], the same code the deterministic simulation runs,
//!   sends every replica its keys as one record and counts answers per key;
//!   an operation that does not reach its quorum within `op_timeout`
//!   fails with `Unavailable`, naming how many answered of how many were
//!   needed.
//! - Hands on: the answer to the front; replicas still being written after
//!   the answer get their part all the same.
//!
//! A causal write is coordinated by a replica of its key: it makes the
//! write against its own siblings and sends the key's
//! whole resulting set to the other replicas; any other node refuses it
//! with `NotReplica`. A read sends the merge of every replica's answer to
//! those that answered stale or nothing ([`Quorum::take_repairs`]).
//!
//! Sloppy quorum: a replica that heartbeats find down is sent nothing; its
//! copy goes as a hint to the next healthy node on the ring past the key's
//! replicas (else to another replica, the coordinator last), in the same
//! message, so the same WAL record, as that node's own part. A hint counts
//! toward the write's acknowledgement only at consistency `any`. Every
//! `hint_tick` this node delivers what it holds to each owner that is up,
//! oldest first, and removes a hint once its owner has it durable
//! ([`super::hints`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_ring::ring::{Ring, TokenRange};
use quiver_ring::wire::{self, ErrorKind, RingInfo, RingMember, SearchHit, ServerError};
use quiver_ring::{Context, Hlc, NodeId, Siblings};

use super::antientropy;
use super::batchlog::{BatchLog, Logged, Logging, Replay};
use super::calls::{answer_of, off_worker, reply_of, stopping, written};
use super::hints::{self, Handoff, HintStore};
use super::membership::Membership;
use super::placement;
use super::quorum::{
    self, outcome_error, Consistency, DataMessage, Ending, Hinted, OpId, Outcome, Placement, Quorum, Started,
};
use super::repair::{self, Repairer};
use super::scatter;
use super::trees::TreeKeeper;
use crate::clock::Clock;
use crate::config::ClusterTimers;
use crate::index::query::Match;
use crate::index::text::TermStats;
use crate::index::Search;
use crate::lock;
use crate::messages::{Ask, PeerReply, PeerRequest};
use crate::net::peer::PeerError;
use crate::service::{Cluster, ClusterStatus, Done, Entries, LocalStore, Store, StoreStatus, Timing};
use crate::stamping::NodeClock;

/// Replicas per key.
pub const REPLICAS: usize = 3;

/// A replica's own read: no client timestamp, no consistency of its own.
const REPLICA_READ: Timing = Timing { hlc_seen: Hlc::ZERO, deadline: Hlc(u64::MAX), consistency: None };

/// How often operations past their deadline are ended.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// A bulk set is logged on one more node when the first asked has not
/// answered within this.
const LOG_HEDGE_AFTER: Duration = Duration::from_millis(300);

/// Hints sent to their owner in one message, about.
const HINT_BATCH_BYTES: u64 = 1 << 20;

/// Called once with an operation's outcome.
type Then = Box<dyn FnOnce(Outcome) + Send>;

/// The operations this node coordinates: the quorum logic (the same code
/// the deterministic simulation runs) and whom to tell when each ends.
struct Coordinating {
    quorum: Quorum,
    waiting: BTreeMap<OpId, Then>,
}

/// A node's store in a cluster.
pub struct ClusterStore {
    me: NodeId,
    name: String,
    local: Arc<LocalStore>,
    hints: Arc<HintStore>,
    /// A hint older than this is dropped undelivered.
    hint_age_max_ms: u64,
    batches: Arc<BatchLog>,
    membership: Arc<Membership>,
    clock: Arc<NodeClock>,
    wall: Arc<dyn Clock>,
    consistency: Consistency,
    coordinating: Mutex<Coordinating>,
    /// Where the peer calls run: answers arrive on engine threads too (a
    /// causal write's own part), which are not the runtime's.
    runtime: tokio::runtime::Handle,
    /// Test-only: the process exits right after logging a bulk set.
    exit_after_batch_log: bool,
    timers: ClusterTimers,
    repairer: Arc<Repairer>,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterStore({}, {} operations in flight)", self.name, lock(&self.coordinating).quorum.in_flight())
    }
}

impl ClusterStore {
    /// A node's store in a cluster; must be made inside the tokio runtime
    /// its peer links run on.
    pub fn new(
        me: NodeId,
        name: String,
        NodeData { local, hints, batches, trees }: NodeData,
        hint_age_max_ms: u64,
        membership: Arc<Membership>,
        clock: Arc<NodeClock>,
        wall: Arc<dyn Clock>,
    ) -> ClusterStore {
        let timers = ClusterTimers::default();
        let repairer = Repairer::new(
            trees,
            membership.clone(),
            local.clone(),
            wall.clone(),
            repair::RepairSettings::default(),
            timers.op_timeout,
        );
        ClusterStore {
            repairer: Arc::new(repairer),
            me,
            name,
            local,
            hints,
            hint_age_max_ms,
            batches,
            membership,
            clock,
            wall,
            consistency: Consistency::Quorum,
            coordinating: Mutex::new(Coordinating { quorum: Quorum::new(me), waiting: BTreeMap::new() }),
            runtime: tokio::runtime::Handle::current(),
            exit_after_batch_log: false,
            timers,
        }
    }

    /// Its anti-entropy settings.
    pub fn with_repair(mut self, settings: repair::RepairSettings) -> ClusterStore {
        self.repairer = self.repairer_with(settings);
        self
    }

    /// A repairer of its trees with `settings`, its calls waiting
    /// `op_timeout` (the store's builders make it again when either
    /// changes).
    fn repairer_with(&self, settings: repair::RepairSettings) -> Arc<Repairer> {
        let (trees, membership, local) = (self.repairer.trees().clone(), self.membership.clone(), self.local.clone());
        Arc::new(Repairer::new(trees, membership, local, self.wall.clone(), settings, self.timers.op_timeout))
    }

    /// Its anti-entropy.
    pub fn repairer(&self) -> &Arc<Repairer> {
        &self.repairer
    }

    /// Its timers: how long an operation waits, how often hints and the
    /// batch log are looked at, when a bulk set is replayed.
    pub fn with_timers(mut self, timers: ClusterTimers) -> ClusterStore {
        self.timers = timers;
        self.repairer = self.repairer_with(self.repairer.settings());
        self
    }

    /// Test-only: exit the process right after logging a bulk set on two
    /// nodes, before any replica gets its part, as a coordinator that dies
    /// there.
    pub fn with_exit_after_batch_log(mut self, exit: bool) -> ClusterStore {
        self.exit_after_batch_log = exit;
        self
    }

    /// The ring, once every member's id is known.
    fn ring(&self) -> Result<Arc<Ring>, ServerError> {
        self.membership.ring()
    }

    /// This node's name in the cluster.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What its heartbeats know of its peers.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The hints it holds.
    pub fn hints(&self) -> &HintStore {
        &self.hints
    }

    /// Its bounds for `status`: the hint queues' and the peer links'.
    pub fn budgets(&self) -> Vec<wire::BudgetInfo> {
        use crate::net::peer::LinkStats;
        use crate::service::budget;
        let (bounds, links, in_flight, queued) = self.membership.links();
        let get = LinkStats::get;
        let largest = self.hints.queues().values().map(|q| q.bytes).max().unwrap_or(0);
        let (socket_queued, socket_dropped) = links.socket_buffer().unwrap_or((0, 0));
        let trees = self.repairer.trees().status();
        vec![
            budget(
                "hint_bytes_max",
                self.hints.bytes_max(),
                largest,
                self.hints.dropped_on_arrival(),
                "a hint for that node is dropped and counted; the write goes on (in use: the largest queue)",
            ),
            budget(
                "peer_requests_in_flight_max",
                bounds.requests_in_flight_max as u64,
                in_flight,
                get(&links.refused_in_flight) + get(&links.serving_paused),
                "a request to that peer fails at once, a write's part is hinted; a peer's requests past it wait",
            ),
            budget(
                "peer_queued_bytes_max",
                bounds.queued_bytes_max,
                queued,
                get(&links.refused_queued),
                "a request to that peer fails at once, a write's part is hinted (in use: over every link)",
            ),
            budget(
                "peer_socket_buffer_bytes",
                get(&links.socket_buffer_granted),
                socket_queued,
                socket_dropped,
                "the kernel drops a datagram to a full buffer, QUIC sends it again (max: what the kernel granted)",
            ),
            budget(
                "tree_feed_keys_max",
                trees.feed_keys_max,
                trees.queued,
                trees.dropped,
                "a write's keys are dropped (counted) and the hash trees rebuilt by a scan",
            ),
            budget(
                "peer_frame_bytes_max",
                bounds.frame_bytes_max as u64,
                0,
                get(&links.answers_too_large),
                "a larger request fails; a larger answer becomes a ResponseTooLarge error",
            ),
        ]
    }

    /// The bulk sets it holds until they are applied.
    pub fn batches(&self) -> &BatchLog {
        &self.batches
    }

    /// Where each key's copies go, as this node sees who is down
    /// ([`placement::place`]).
    fn placements<'a>(
        &self,
        ring: &Ring,
        keys: impl Iterator<Item = &'a [u8]>,
        coordinator: Option<NodeId>,
    ) -> Vec<Placement> {
        let down = self.membership.down();
        keys.map(|key| placement::place(ring, key, REPLICAS, &down, coordinator)).collect()
    }

    /// The ring as clients see it: the members with the client addresses
    /// known now (a peer's once it answered a heartbeat), and those to
    /// avoid.
    pub fn ring_info(&self) -> Result<RingInfo, ServerError> {
        let ring = self.ring()?;
        let peers = self.membership.peers();
        let mut view = ring.view().clone();
        for member in view.members.iter_mut().filter(|m| m.id != self.me) {
            if let Some(peer) = peers.iter().find(|p| p.node_id == Some(member.id.0)) {
                member.client_addr = peer.client_addr.clone();
            }
        }
        // A node cut off from its peers tells clients to avoid it (it
        // would answer `Unavailable`); else, to avoid the peers it sees down.
        let avoid = match self.membership.cut_off() {
            Some(_) => vec![self.me],
            None => self.membership.down(),
        };
        Ok(RingInfo { replicas: REPLICAS as u32, view, avoid })
    }

    /// The ring for `status`: each member, up or not, its share as first
    /// replica and its keys (empty until the ring is known).
    pub fn ring_members(&self) -> Vec<RingMember> {
        let Ok(ring) = self.ring() else { return Vec::new() };
        let peers = self.membership.peers();
        let hints = self.hints.queues();
        let members = ring.view().members.iter().zip(ring.primary_shares());
        members
            .map(|(member, share)| {
                let peer = peers.iter().find(|p| p.node_id == Some(member.id.0));
                let keys = match peer {
                    Some(peer) => peer.keys,
                    None => self.local.status().ok().map(|s| s.keys),
                };
                RingMember {
                    name: member.name.clone(),
                    node_id: member.id.0,
                    up: peer.is_none_or(|p| p.up),
                    share_ppm: (share * 1e6).round() as u32,
                    keys,
                    hints: hints.get(&member.id).map_or(0, |q| q.entries),
                    hint_bytes: hints.get(&member.id).map_or(0, |q| q.bytes),
                }
            })
            .collect()
    }

    /// Starts an operation: `start` makes its messages with the quorum
    /// logic (and its outcome, if it is done at once), `then` gets its
    /// outcome. It ends by `op_timeout` (and an [`EXPIRY_TICK`]) at most,
    /// once [`ClusterStore::run_in_background`] runs.
    fn run(self: &Arc<Self>, start: impl FnOnce(&mut Quorum, u64) -> Started, then: Then) {
        let deadline = self.wall.now_ms().saturating_add(self.timers.op_timeout.as_millis() as u64);
        let (messages, finished) = {
            let mut coordinating = lock(&self.coordinating);
            let (op, messages, done) = start(&mut coordinating.quorum, deadline);
            match done {
                Some(outcome) => (messages, Some((then, outcome))),
                None => {
                    coordinating.waiting.insert(op, then);
                    (messages, None)
                }
            }
        };
        if let Some((then, outcome)) = finished {
            then(outcome);
        }
        for (to, message) in messages {
            self.send(to, message);
        }
    }

    /// Starts what runs in the background until the store is dropped:
    /// every [`EXPIRY_TICK`], operations past their deadline end (as
    /// `Unavailable`); every `hint_tick`, hints go to their owners that
    /// are up, and bulk sets left in the batch log are replayed.
    pub fn run_in_background(self: &Arc<Self>) {
        self.repairer.run_in_background();
        self.every(EXPIRY_TICK, |store| async move { store.expire() });
        self.every(self.timers.hint_tick, |store| async move {
            let held = store.hints.queues();
            let peers = store.membership.peers().into_iter();
            let taking_writes = peers.filter(|p| p.up && p.storage_failure.is_none());
            let up: Vec<NodeId> = taking_writes.filter_map(|p| p.node_id.map(NodeId)).collect();
            for &owner in held.keys() {
                if let Err(error) = store.hand_off(owner, up.contains(&owner)).await {
                    tracing::debug!(owner = owner.0, %error, "hints not delivered yet");
                }
            }
        });
        self.every(self.timers.hint_tick, |store| async move {
            if let Err(error) = store.replay_batches().await {
                tracing::debug!(%error, "bulk sets not replayed yet");
            }
        });
    }

    /// Runs `tick` every `period` until the store is dropped.
    fn every<F, Fut>(self: &Arc<Self>, period: Duration, tick: F)
    where
        F: Fn(Arc<ClusterStore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            loop {
                every.tick().await;
                let Some(store) = this.upgrade() else { return };
                tick(store).await;
            }
        });
    }

    /// Sends one message to replica `to` (this node's own part straight to
    /// its local store); its answer goes back to the quorum logic.
    fn send(self: &Arc<Self>, to: NodeId, message: DataMessage) {
        let (op, request) = match message {
            DataMessage::Write { op, sets, hints } => (op, PeerRequest::Write { sets, hints }),
            DataMessage::Read { op, key } => (op, PeerRequest::Read { key }),
            DataMessage::WriteAck { .. }
            | DataMessage::WrittenWithoutHints { .. }
            | DataMessage::ReadReply { .. }
            | DataMessage::Refused { .. } => return,
        };
        let this = self.clone();
        let answer = move |reply: Result<PeerReply, ServerError>| {
            let message = match reply {
                Ok(PeerReply::Written) => DataMessage::WriteAck { op },
                Ok(PeerReply::WrittenWithoutHints(owners)) => DataMessage::WrittenWithoutHints { op, owners },
                Ok(PeerReply::Found(found)) => {
                    // What a replica answers is checked as what it sends.
                    let latest = this.clock.latest_accepted();
                    match found.as_ref().map(|set| check_claims(set, latest)).unwrap_or(Ok(())) {
                        Ok(()) => DataMessage::ReadReply { op, found },
                        Err(error) => {
                            tracing::warn!(replica = to.0, %error, "a replica's answer was refused");
                            DataMessage::Refused { op }
                        }
                    }
                }
                // A failure is no answer (the deadline ends the operation
                // if too few others answer), and a write's part is hinted.
                Ok(PeerReply::Failed(error)) | Err(error) => {
                    log_refusal(to, &error);
                    DataMessage::Refused { op }
                }
                Ok(other) => {
                    tracing::warn!(replica = to.0, ?other, "a replica answered with something else");
                    DataMessage::Refused { op }
                }
            };
            this.on_reply(to, message);
        };
        if to == self.me {
            match request {
                PeerRequest::Write { sets, hints } => {
                    let done = Box::new(move |r: Result<Vec<NodeId>, ServerError>| answer(r.map(written_reply)));
                    apply_write(&self.local, &self.hints, sets, hints, done)
                }
                PeerRequest::Read { key } => {
                    self.local.read_versions(key, REPLICA_READ, Box::new(move |r| answer(r.map(PeerReply::Found))))
                }
                PeerRequest::Ping { .. }
                | PeerRequest::LogBatch { .. }
                | PeerRequest::BatchDone { .. }
                | PeerRequest::Search { .. }
                | PeerRequest::TermStats { .. }
                | PeerRequest::Exchange { .. }
                | PeerRequest::Pull { .. }
                | PeerRequest::Repair { .. } => {}
            }
            return;
        }
        let Some(link) = self.membership.link_to(to) else {
            return answer(Err(ServerError::new(ErrorKind::Unavailable, format!("no link to node {:016x}", to.0))));
        };
        let unavailable = |e: PeerError| ServerError::new(ErrorKind::Unavailable, e.to_string());
        // Sent at once on a live link; the answer comes on its reader task.
        let sent = link.try_send(request, Box::new(move |reply| answer(reply.map_err(unavailable))));
        if let Err((request, answer)) = sent {
            // No live link: dial it, on the runtime (this may be an engine
            // thread).
            let (membership, timeout) = (self.membership.clone(), self.timers.op_timeout);
            self.runtime.spawn(async move {
                match membership.link_to(to) {
                    Some(link) => answer(link.call(request, timeout).await),
                    None => answer(Err(PeerError::Unknown(to))),
                }
            });
        }
    }

    fn on_reply(self: &Arc<Self>, from: NodeId, message: DataMessage) {
        let (finished, repairs) = {
            let mut coordinating = lock(&self.coordinating);
            let done = coordinating.quorum.on_reply(from, message);
            let finished = done.and_then(|(op, outcome)| coordinating.waiting.remove(&op).map(|then| (then, outcome)));
            (finished, coordinating.quorum.take_repairs())
        };
        if let Some((then, outcome)) = finished {
            then(outcome);
        }
        self.repair(repairs);
    }

    fn expire(self: &Arc<Self>) {
        let (finished, repairs): (Vec<(Then, Outcome)>, _) = {
            let mut coordinating = lock(&self.coordinating);
            let expired = coordinating.quorum.expire(self.wall.now_ms());
            let finished =
                expired.into_iter().filter_map(|(op, outcome)| Some((coordinating.waiting.remove(&op)?, outcome)));
            (finished.collect(), coordinating.quorum.take_repairs())
        };
        for (then, outcome) in finished {
            then(outcome);
        }
        self.repair(repairs);
    }

    /// Sends read repairs: nobody waits for them.
    fn repair(self: &Arc<Self>, repairs: Vec<(NodeId, DataMessage)>) {
        for (to, message) in repairs {
            tracing::debug!(replica = to.0, "read repair");
            self.send(to, message);
        }
    }

    /// The statistics of a full-text query's terms over the whole cluster:
    /// each node's over the keys of the ranges it was given, added up.
    async fn term_stats(
        self: &Arc<Self>,
        query: &str,
        matching: Match,
        parts: &BTreeMap<NodeId, Vec<TokenRange>>,
    ) -> Result<TermStats, ServerError> {
        let asks: Vec<_> = parts
            .iter()
            .map(|(&node, ranges)| {
                let (this, query, ranges) = (self.clone(), query.to_owned(), ranges.clone());
                tokio::spawn(async move {
                    if node == this.me {
                        return answer_of(|done| this.local.term_stats_within(query, matching, ranges, done)).await;
                    }
                    let link = this.membership.link(node)?;
                    let reply =
                        link.call(PeerRequest::TermStats { query, matching, ranges }, this.timers.op_timeout).await;
                    reply_of(reply, "term statistics", |reply| match reply {
                        PeerReply::TermStats(stats) => Ok(stats),
                        other => Err(other),
                    })
                })
            })
            .collect();
        let mut total = TermStats::default();
        for ask in asks {
            total.add(ask.await.unwrap_or_else(|_| Err(stopping()))?);
        }
        Ok(total)
    }

    /// Node `node`'s hits for `search` among its keys in `ranges`.
    async fn search_part(
        self: &Arc<Self>,
        node: NodeId,
        search: Search,
        ranges: Vec<TokenRange>,
    ) -> Result<Vec<SearchHit>, ServerError> {
        if node == self.me {
            return answer_of(|done| self.local.search_within(search, Some(ranges), done)).await;
        }
        let link = self.membership.link(node)?;
        let reply = link.call(PeerRequest::Search { search, ranges }, self.timers.op_timeout).await;
        reply_of(reply, "a search part", |reply| match reply {
            PeerReply::Hits(hits) => Ok(hits),
            other => Err(other),
        })
    }

    /// Reads `key` from its replicas (those in `down` seen down): the
    /// merge of the first R answers.
    fn read_key(
        self: &Arc<Self>,
        key: Vec<u8>,
        consistency: Consistency,
        down: &[NodeId],
        done: Done<Option<Siblings>>,
    ) {
        let ring = match self.ring() {
            Ok(ring) => ring,
            Err(error) => return done(Err(error)),
        };
        let placement = placement::place(&ring, &key, REPLICAS, down, None);
        let clock = self.clock.clone();
        self.run(
            move |quorum, deadline| quorum.start_read(&key, &placement, consistency, deadline),
            Box::new(move |outcome| match outcome {
                Outcome::Read(found) => {
                    // Adopt the timestamps read (one too far ahead is not
                    // adopted; the version is still returned).
                    if let Some(hlc) = found.as_ref().and_then(|f| f.versions().iter().map(|v| v.hlc).max()) {
                        let _ = clock.observe(hlc);
                    }
                    done(Ok(found))
                }
                other => done(Err(outcome_error(other, "read", Ending::Read))),
            }),
        );
    }
}

/// The answers of a multi-key read, gathered in order as each key's
/// replicas answer. Their bytes are counted as they come: once past what
/// one response can carry the read ends with `ResponseTooLarge` and what
/// was gathered is dropped, rather than holding every value until the last
/// key answered.
struct Gather {
    values: Vec<Option<Option<Vec<u8>>>>,
    left: usize,
    bytes: usize,
    bytes_max: usize,
    done: Option<Done<Values>>,
}

/// The values of a multi-key read, in key order.
type Values = Vec<Option<Vec<u8>>>;

/// A multi-key read that is over: its callback and what to call it with.
type Over = Option<(Done<Values>, Result<Values, ServerError>)>;

impl Gather {
    fn new(keys: usize, bytes_max: usize, done: Done<Values>) -> Gather {
        Gather { values: vec![None; keys], left: keys, bytes: 0, bytes_max, done: Some(done) }
    }

    /// Key `i`'s answer. Returns the callback to call and what to call it
    /// with once the read is over (all keys answered, one failed, or the
    /// values passed the limit); nothing before, and nothing after.
    fn answer(&mut self, i: usize, result: Result<Option<Siblings>, ServerError>) -> Over {
        self.done.as_ref()?;
        let value = match result {
            Ok(found) => found.and_then(Siblings::into_value),
            Err(error) => return self.end(Err(error)),
        };
        self.bytes += value.as_ref().map_or(0, Vec::len);
        if self.bytes > self.bytes_max {
            let max = self.bytes_max;
            return self.end(Err(ServerError::new(
                ErrorKind::ResponseTooLarge,
                format!("the values exceed the {max} bytes one response can carry; ask for fewer keys"),
            )));
        }
        if let Some(slot) = self.values.get_mut(i) {
            if slot.replace(value).is_none() {
                self.left -= 1;
            }
        }
        if self.left > 0 {
            return None;
        }
        let values = self.values.drain(..).map(Option::flatten).collect();
        self.end(Ok(values))
    }

    fn end(&mut self, result: Result<Values, ServerError>) -> Over {
        self.values = Vec::new();
        self.done.take().map(|done| (done, result))
    }
}

impl Store for Arc<ClusterStore> {
    /// A write of one key goes to its replicas at once. A bulk set is
    /// first logged on two nodes (this one and the next one up on the
    /// ring), so that if this node dies while its parts are sent, the other
    /// completes it ([`ClusterStore::run_in_background`]); then
    /// each replica gets all of its keys as one record, and the log entry
    /// goes once the write reached its quorum.
    fn write(&self, entries: Entries, timing: Timing, done: Done<()>) {
        let this = self.clone();
        self.when_stampable(timing.hlc_seen, move || this.write_now(entries, timing, done));
    }

    fn read(&self, keys: Vec<Vec<u8>>, timing: Timing, response_bytes_max: usize, done: Done<Vec<Option<Vec<u8>>>>) {
        if let Err(error) = self.clock.observe(timing.hlc_seen) {
            return done(Err(error));
        }
        if keys.is_empty() {
            return done(Ok(Vec::new()));
        }
        let gather = Arc::new(Mutex::new(Gather::new(keys.len(), response_bytes_max, done)));
        let consistency = timing.consistency.unwrap_or(self.consistency);
        let down = self.membership.down();
        for (i, key) in keys.into_iter().enumerate() {
            let gather = gather.clone();
            self.read_key(
                key,
                consistency,
                &down,
                Box::new(move |result| {
                    // Called outside the lock: it may run anything.
                    let over = lock(&gather).answer(i, result);
                    if let Some((done, result)) = over {
                        done(result);
                    }
                }),
            );
        }
    }

    fn read_versions(&self, key: Vec<u8>, timing: Timing, done: Done<Option<Siblings>>) {
        if let Err(error) = self.clock.observe(timing.hlc_seen) {
            return done(Err(error));
        }
        let down = self.membership.down();
        self.read_key(key, timing.consistency.unwrap_or(self.consistency), &down, done);
    }

    /// Coordinated by a replica of the key (any other refuses it with
    /// `NotReplica`): its own causal write, then the key's whole resulting
    /// sibling set to the other replicas, acknowledged once W of them,
    /// itself included, have it durable.
    fn write_causal(&self, key: Vec<u8>, value: Option<Vec<u8>>, context: Context, timing: Timing, done: Done<()>) {
        let ring = match self.ring() {
            Ok(ring) => ring,
            Err(error) => return done(Err(error)),
        };
        let replicas = ring.preference_list(&key, REPLICAS);
        if !replicas.contains(&self.me) {
            let names: Vec<&str> = replicas.iter().filter_map(|id| ring.member(*id)).map(|m| m.name.as_str()).collect();
            return done(Err(ServerError::new(
                ErrorKind::NotReplica,
                format!(
                    "node {} does not replicate this key, so it cannot coordinate a write with a context; send it \
                     to one of its replicas: {}",
                    self.name,
                    names.join(", ")
                ),
            )));
        }
        let consistency = timing.consistency.unwrap_or(self.consistency);
        let placements = self.placements(&ring, std::iter::once(key.as_slice()), Some(self.me));
        // Before its own copy is written: then nothing was.
        if let Some(outcome) = quorum::unreachable(&placements, consistency) {
            return done(Err(outcome_error(outcome, "write", Ending::Write)));
        }
        let this = self.clone();
        let replicated_key = key.clone();
        let replicate = move |result: Result<Siblings, ServerError>| {
            let set = match result {
                Ok(set) => set,
                Err(error) => return done(Err(error)),
            };
            let me = this.me;
            this.run(
                move |quorum, deadline| {
                    let sets = vec![(replicated_key, set)];
                    quorum.start_write_held(sets, placements, consistency, deadline, me)
                },
                Box::new(move |outcome| match outcome {
                    Outcome::Written => done(Ok(())),
                    other => done(Err(outcome_error(other, "write", Ending::Written))),
                }),
            );
        };
        let local = self.local.clone();
        let seen = timing.hlc_seen.max(context.max_hlc);
        self.when_stampable(seen, move || local.write_causal_set(key, value, context, timing, Box::new(replicate)));
    }

    /// Scatter-gather: each token range is searched on one of its
    /// replicas (this node where it is one, else the first that is up), so
    /// every key is looked at once; the hits are merged, and the best `k`
    /// are checked against the keys' current values (read at the request's
    /// consistency): a hit whose replica was behind is left out.
    fn search(&self, search: Search, timing: Timing, done: Done<Vec<SearchHit>>) {
        if let Err(error) = self.clock.observe(timing.hlc_seen) {
            return done(Err(error));
        }
        let ring = match self.ring() {
            Ok(ring) => ring,
            Err(error) => return done(Err(error)),
        };
        let parts = match scatter::plan(&ring, REPLICAS, self.me, &self.membership.down()) {
            Ok(parts) => parts,
            Err(unplannable) => return done(Err(unplannable.into())),
        };
        let this = self.clone();
        self.runtime.spawn(async move {
            let mut search = search;
            if let Search::Text { query, matching, global: true, stats, .. } = &mut search {
                match this.term_stats(query, *matching, &parts).await {
                    Ok(gathered) => *stats = Some(gathered),
                    Err(error) => return done(Err(error)),
                }
            }
            let k = search.k() as usize;
            // Every part asked at once, then awaited in turn.
            let asks: Vec<_> = parts
                .into_iter()
                .map(|(node, ranges)| {
                    let (this, search) = (this.clone(), search.clone());
                    tokio::spawn(async move { this.search_part(node, search, ranges).await })
                })
                .collect();
            let mut parts = Vec::new();
            for ask in asks {
                match ask.await.unwrap_or_else(|_| Err(stopping())) {
                    Ok(part) => parts.push(part),
                    Err(error) => return done(Err(error)),
                }
            }
            let hits = scatter::merge(parts, k);
            let keys: Vec<Vec<u8>> = hits.iter().map(|hit| hit.key.clone()).collect();
            match answer_of(|read_done| this.read(keys, timing, usize::MAX, read_done)).await {
                Ok(current) => done(Ok(scatter::keep_current(hits, current))),
                Err(error) => done(Err(error)),
            }
        });
    }

    fn status(&self) -> Result<StoreStatus, ServerError> {
        self.local.status()
    }

    fn compact(&self, done: Done<()>) {
        self.local.compact(done)
    }

    fn hlc(&self) -> Hlc {
        self.local.hlc()
    }
}

impl ClusterStore {
    /// Runs `then` once this node may stamp a write above `seen`: at once,
    /// or after the wait that keeps its stamp within what every replica
    /// accepts ([`NodeClock::wait_before_stamp`]).
    fn when_stampable(self: &Arc<Self>, seen: Hlc, then: impl FnOnce() + Send + 'static) {
        let wait = self.clock.wait_before_stamp(seen);
        if wait.is_zero() {
            return then();
        }
        self.runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            then()
        });
    }

    /// A blind write, stamped now ([`Store::write`]).
    fn write_now(self: &Arc<Self>, entries: Entries, timing: Timing, done: Done<()>) {
        let ring = match self.ring() {
            Ok(ring) => ring,
            Err(error) => return done(Err(error)),
        };
        let stamp = match self.clock.stamp(timing.hlc_seen, Hlc::ZERO, Some(timing.deadline)) {
            Ok(stamp) => stamp,
            Err(error) => return done(Err(error)),
        };
        let placements = self.placements(&ring, entries.iter().map(|(key, _)| key.as_slice()), None);
        let consistency = timing.consistency.unwrap_or(self.consistency);
        let sets: Vec<(Vec<u8>, Siblings)> =
            entries.into_iter().map(|(key, value)| (key, Siblings::one(stamp.blind(value)))).collect();
        if sets.len() < 2 {
            // `start_write` checks who is up before anything is sent.
            return self.write_sets(sets, placements, consistency, Ending::Write, done);
        }
        // Before a bulk set is logged: then nothing was written.
        if let Some(outcome) = quorum::unreachable(&placements, consistency) {
            return done(Err(outcome_error(outcome, "write", Ending::Write)));
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            let holders = match this.log_batch(&ring, stamp.hlc, &sets).await {
                Ok(holders) => holders,
                Err(error) => return done(Err(error)),
            };
            if this.exit_after_batch_log {
                tracing::warn!("TEST MODE: exiting after logging a bulk set");
                std::process::exit(9);
            }
            let applied = this.clone();
            let done: Done<()> = Box::new(move |result| {
                if result.is_ok() {
                    applied.batch_done(holders, stamp.hlc);
                }
                done(result)
            });
            this.write_sets(sets, placements, consistency, Ending::Written, done);
        });
    }

    /// Writes `sets` to their placements, through the quorum logic
    /// (`ending`: whether a copy is durable somewhere already).
    fn write_sets(
        self: &Arc<Self>,
        sets: Vec<(Vec<u8>, Siblings)>,
        placements: Vec<Placement>,
        consistency: Consistency,
        ending: Ending,
        done: Done<()>,
    ) {
        self.run(
            move |quorum, deadline| quorum.start_write(sets, placements, consistency, deadline),
            Box::new(move |outcome| match outcome {
                Outcome::Written => done(Ok(())),
                other => done(Err(outcome_error(other, "write", ending))),
            }),
        );
    }

    /// Logs batch `id` (this node's) durably here and on other nodes, as
    /// [`Logging`] says (hedged after [`LOG_HEDGE_AFTER`]).
    /// Returns every node asked: each may hold it.
    async fn log_batch(&self, ring: &Ring, id: Hlc, sets: &[(Vec<u8>, Siblings)]) -> Result<Vec<NodeId>, ServerError> {
        let first = sets.first().map_or(&[][..], |(key, _)| key.as_slice());
        let order = ring.preference_list(first, ring.view().members.len());
        let start = tokio::time::Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        let (hedge, timeout) = (LOG_HEDGE_AFTER.as_millis() as u64, self.timers.op_timeout.as_millis() as u64);
        let (mut logging, mut ask) = Logging::start(self.me, order, &self.membership.down(), 0, hedge, timeout);
        let mut calls = tokio::task::JoinSet::new();
        let here = self.batches.log(self.me, id, sets);
        tokio::pin!(here);
        let mut here_done = false;
        loop {
            for other in ask.drain(..) {
                let (membership, me, sets) = (self.membership.clone(), self.me, sets.to_vec());
                let timeout = self.timers.op_timeout;
                calls.spawn(async move {
                    let call = async {
                        let link = membership.link(other)?;
                        let request = PeerRequest::LogBatch { coordinator: me, id, sets };
                        written(link.call(request, timeout).await, "logging the bulk set")
                    };
                    (other, call.await)
                });
            }
            let timer = logging.timer().map(|at| start + Duration::from_millis(at));
            let ended = tokio::select! {
                result = &mut here, if !here_done => {
                    here_done = true;
                    logging.logged_here(result)
                }
                Some(answer) = calls.join_next(), if !calls.is_empty() => {
                    let (from, result) = answer.map_err(|error| ServerError::new(ErrorKind::Internal, error.to_string()))?;
                    let (next, ended) = logging.answered(from, result, now_ms());
                    ask = next;
                    ended
                }
                () = sleep_until_some(timer) => {
                    let (next, ended) = logging.tick(now_ms());
                    ask = next;
                    ended
                }
            };
            match ended {
                Some(Logged::Both { holders }) => return Ok(holders),
                Some(Logged::Failed(error)) => return Err(error),
                None => {}
            }
        }
    }

    /// Batch `(this node, id)` is applied: its holders remove it (in the
    /// background; one that does not will replay it, which changes
    /// nothing).
    fn batch_done(self: &Arc<Self>, holders: Vec<NodeId>, id: Hlc) {
        let this = self.clone();
        self.runtime.spawn(async move {
            for holder in holders {
                let removed = match holder == this.me {
                    true => this.batches.done(this.me, id).await,
                    false => match this.membership.link(holder) {
                        Ok(link) => {
                            let request = PeerRequest::BatchDone { coordinator: this.me, id };
                            written(
                                link.call(request, this.timers.op_timeout).await,
                                "removing a bulk set from the log",
                            )
                        }
                        Err(error) => Err(error),
                    },
                };
                if let Err(error) = removed {
                    log_refusal(holder, &error);
                    tracing::debug!(holder = holder.0, %error, "a batch log entry stays; it will be replayed");
                }
            }
        });
    }

    /// Replays each bulk set this node logged that is older than
    /// `batch_replay_after`: its coordinator died, or did not
    /// reach its quorum. The replay is a quorum write of the same versions
    /// (which changes nothing where they are); the entry goes once it
    /// succeeds. A batch older than half of `gc_grace` is dropped: its
    /// versions would be refused.
    async fn replay_batches(self: &Arc<Self>) -> Result<(), ServerError> {
        let now = self.wall.now_ms();
        let batches = self.batches.clone();
        let (after_ms, gc_grace_ms) = (self.timers.batch_replay_after.as_millis() as u64, self.local.gc_grace_ms());
        let due = off_worker(move || batches.due(now, after_ms, gc_grace_ms)).await?;
        let ring = match due.is_empty() {
            true => return Ok(()),
            false => self.ring()?,
        };
        for (decision, batch) in due {
            let (coordinator, id) = (batch.node, batch.seq);
            match decision {
                Replay::Wait => continue,
                Replay::Apply => {
                    let keys = batch.sets.iter().map(|(key, _)| key.as_slice());
                    let placements = self.placements(&ring, keys, None);
                    answer_of(|done| {
                        self.write_sets(batch.sets, placements, Consistency::Quorum, Ending::Written, done)
                    })
                    .await?;
                    tracing::info!(coordinator = coordinator.0, %id, "replayed a bulk set");
                }
                Replay::Drop => {
                    tracing::error!(coordinator = coordinator.0, %id, "a bulk set older than half of gc_grace was never applied; it is dropped");
                }
            }
            self.batches.done(coordinator, id).await?;
        }
        Ok(())
    }

    /// The oldest hint a node may still hand on was taken at or after this.
    fn hint_cutoff_ms(&self) -> u64 {
        self.wall.now_ms().saturating_sub(self.hint_age_max_ms)
    }

    /// Hands on what this node holds for `owner` (`up`: it takes writes),
    /// oldest first, a batch at a time, as [`hints::handoff`] says: to an
    /// owner that is up the batch is sent and removed once the owner has
    /// it durable; hints past their age are removed, not sent, whether the
    /// owner is up or not.
    async fn hand_off(&self, owner: NodeId, up: bool) -> Result<(), ServerError> {
        loop {
            let store = self.hints.clone();
            let batch = off_worker(move || store.oldest(owner, HINT_BATCH_BYTES)).await?;
            let taken: Vec<u64> = batch.iter().map(|hint| hint.seq.physical_ms()).collect();
            let expired = match hints::handoff(&taken, up, self.hint_cutoff_ms()) {
                Handoff::Keep => return Ok(()),
                Handoff::Expire { expired } => {
                    self.hints.remove(&batch[..expired], expired as u64).await?;
                    tracing::warn!(
                        owner = owner.0,
                        expired,
                        "hints past their age were dropped while their owner is down"
                    );
                    if expired < batch.len() {
                        return Ok(());
                    }
                    continue;
                }
                Handoff::Deliver { expired } => expired,
            };
            let sets: Vec<(Vec<u8>, Siblings)> = batch[expired..].iter().flat_map(|hint| hint.sets.clone()).collect();
            if !sets.is_empty() {
                let delivered = self
                    .membership
                    .link(owner)?
                    .call(PeerRequest::Write { sets, hints: Vec::new() }, self.timers.op_timeout);
                written(delivered.await, "delivering hints")?;
            }
            self.hints.remove(&batch, expired as u64).await?;
            if expired > 0 {
                tracing::warn!(owner = owner.0, expired, "hints past their age were dropped undelivered");
            }
        }
    }
}

/// Logs a peer's failure to do its part: a refusal of what this node sent
/// (it claimed more than the peer grants it, which should never happen
/// between nodes of one version) as a warning, the rest (a peer down,
/// busy, out of disk) at debug.
fn log_refusal(peer: NodeId, error: &ServerError) {
    match error.kind {
        ErrorKind::Forbidden | ErrorKind::NotReplica | ErrorKind::InvalidContext | ErrorKind::TooManySiblings => {
            tracing::warn!(peer = format_args!("{:016x}", peer.0), %error, "a peer refused what this node sent")
        }
        _ => tracing::debug!(peer = format_args!("{:016x}", peer.0), %error, "a peer did not do its part"),
    }
}

impl Cluster for ClusterStore {
    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            name: self.name.clone(),
            peers: self.membership.peers(),
            replicas: REPLICAS as u32,
            ring: self.ring_members(),
            hints_dropped: self.hints.dropped(),
            batches_pending: self.batches.pending(),
            budgets: self.budgets(),
            cut_off: self.membership.cut_off(),
            anti_entropy: Some(self.repairer.status()),
        }
    }

    fn ring_info(&self) -> Result<RingInfo, ServerError> {
        ClusterStore::ring_info(self)
    }

    fn repair(&self, done: Done<wire::RepairReport>) {
        let repairer = self.repairer.clone();
        self.runtime.spawn(async move { done(Ok(repairer.round().await)) });
    }

    fn check_trees(&self, done: Done<wire::TreesCheck>) {
        let trees = self.repairer.trees().clone();
        self.runtime.spawn(async move {
            let checked = trees.check().await.map(|(differing, keys)| wire::TreesCheck {
                keys,
                differing: differing.into_iter().map(wire::ByteBuf::from).collect(),
            });
            done(checked)
        });
    }
}

/// Sleeps until `at`; for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A node's part of a write: the sets it replicates and the hints it
/// holds for replicas that are down, as one record; `done` once durable,
/// with the owners whose hints were dropped. A hint whose queue is full is
/// dropped ([`HintStore::hold`]): the node's own part is written all the
/// same.
pub fn apply_write(
    local: &LocalStore,
    hints: &Arc<HintStore>,
    sets: Vec<(Vec<u8>, Siblings)>,
    hinted: Vec<Hinted>,
    done: Done<Vec<NodeId>>,
) {
    let mut held = hints.hold(hinted);
    let with = std::mem::take(&mut held.ops);
    let dropped = std::mem::take(&mut held.dropped);
    let hints = hints.clone();
    local.apply_replicated(
        sets,
        with,
        Box::new(move |result| {
            hints.written(held, result.is_ok());
            done(result.map(|()| dropped))
        }),
    )
}

/// The answer to a write whose hints for `dropped` were dropped.
fn written_reply(dropped: Vec<NodeId>) -> PeerReply {
    match dropped.is_empty() {
        true => PeerReply::Written,
        false => PeerReply::WrittenWithoutHints(dropped),
    }
}

/// What a node of a cluster holds: its own data, the hints it holds for
/// others, and its batch log.
#[derive(Clone, Debug)]
pub struct NodeData {
    pub local: Arc<LocalStore>,
    pub hints: Arc<HintStore>,
    pub batches: Arc<BatchLog>,
    /// The hash trees of its data, which anti-entropy compares.
    pub trees: Arc<TreeKeeper>,
}

impl NodeData {
    /// Opens the hints and the batch log in `local`'s engine (scans that
    /// count them: not for an async worker).
    pub fn open(
        local: Arc<LocalStore>,
        clock: Arc<NodeClock>,
        hint_bytes_max: u64,
        trees: Arc<TreeKeeper>,
    ) -> crate::storage::Result<NodeData> {
        let engine = local.engine().clone();
        let hints = Arc::new(HintStore::open(engine.clone(), clock.clone(), hint_bytes_max)?);
        let batches = Arc::new(BatchLog::open(engine, clock)?);
        Ok(NodeData { local, hints, batches, trees })
    }
}

/// What a node of a cluster does with its peers' requests: answers
/// heartbeats, and as a replica merges the sets it is sent and holds the
/// hints (answering once they are durable) and reads its own versions of a
/// key. A peer is trusted for what its certificate names and no more
/// ([`check_peer_identity`]); its keys and values are held to the same
/// limits as a client's, its versions to the same clock
/// ([`check_peer_versions`]).
#[derive(Debug)]
pub struct ReplicaHandler {
    pub membership: Arc<Membership>,
    pub data: NodeData,
    pub limits: wire::Limits,
    pub clock: Arc<NodeClock>,
}

/// Checks a peer's request against the node's limits, as a client's is.
pub fn check_peer_request(limits: &wire::Limits, request: &PeerRequest) -> Result<(), ServerError> {
    match request {
        PeerRequest::Ping { .. } => Ok(()),
        PeerRequest::Read { key } => limits.check_key(key),
        PeerRequest::BatchDone { .. } => Ok(()),
        PeerRequest::Write { sets, hints } => check_sets(limits, sets.iter().chain(hints.iter().flat_map(|h| &h.sets))),
        PeerRequest::Repair { sets } => {
            keys_at_most(sets.len(), "a repair")?;
            check_sets(limits, sets.iter())
        }
        PeerRequest::LogBatch { sets, .. } => check_sets(limits, sets.iter()),
        PeerRequest::Search { search: Search::Text { query: text, k, .. } | Search::Similar { text, k }, .. } => {
            wire::check_search(text, *k)
        }
        PeerRequest::Search { search: Search::Vector { vector, k }, .. } => wire::check_vector_search(vector, 0, *k),
        PeerRequest::TermStats { query, .. } => wire::check_search(query, 1),
        PeerRequest::Exchange { set, ask } => {
            // A replica set: at most N nodes, in id order, each once.
            let set_fits = set.len() <= REPLICAS && set.windows(2).all(|pair| pair[0] < pair[1]);
            let ask_fits = match ask {
                Ask::Branches => true,
                Ask::Segments(branches) => {
                    branches.len() <= antientropy::BRANCHES
                        && branches.iter().all(|&b| (b as usize) < antientropy::BRANCHES)
                }
                Ask::Keys(segments) => {
                    segments.len() <= repair::SEGMENTS_PER_ASK_MAX
                        && segments.iter().all(|&s| (s as usize) < antientropy::SEGMENTS)
                }
            };
            match set_fits && ask_fits {
                true => Ok(()),
                false => Err(ServerError::new(ErrorKind::Malformed, "an exchange step past its bounds")),
            }
        }
        PeerRequest::Pull { keys } => {
            keys_at_most(keys.len(), "a pull")?;
            keys.iter().try_for_each(|key| limits.check_key(key))
        }
    }
}

/// An exchange's repair or pull carries at most [`repair::PULL_KEYS_MAX`]
/// keys.
fn keys_at_most(keys: usize, what: &str) -> Result<(), ServerError> {
    match keys <= repair::PULL_KEYS_MAX {
        true => Ok(()),
        false => {
            let message = format!("{what} of {keys} keys, more than {}", repair::PULL_KEYS_MAX);
            Err(ServerError::new(ErrorKind::Malformed, message))
        }
    }
}

/// Checks what a request from member `from` (the name its certificate
/// gives) says against what that member is and what the ring gives this
/// node: a heartbeat, a bulk set's log entry or its removal only in the
/// sender's own name; a write only of keys this node replicates, and hints
/// only for members that replicate their keys (and not for this node).
pub fn check_peer_identity(membership: &Membership, from: &str, request: &PeerRequest) -> Result<(), ServerError> {
    let forbidden = |what: String| ServerError::new(ErrorKind::Forbidden, what);
    let own_name = |claimed: NodeId, what: &str| match membership.id_of(from) {
        Some(id) if id == claimed => Ok(()),
        Some(_) => Err(forbidden(format!("{from} sent {what} in the name of node {:016x}, not its own", claimed.0))),
        None => Err(ServerError::new(ErrorKind::Unavailable, format!("the node id of {from} is not known yet"))),
    };
    match request {
        PeerRequest::Ping { from: id, .. } => match membership.id_of(from) {
            Some(known) if known != *id => Err(forbidden(format!("{from} pinged as node {:016x}", id.0))),
            _ => Ok(()),
        },
        PeerRequest::LogBatch { coordinator, .. } => own_name(*coordinator, "a bulk set to log"),
        PeerRequest::BatchDone { coordinator, .. } => own_name(*coordinator, "a bulk set's removal"),
        PeerRequest::Repair { sets } => check_replicated(membership, from, sets, &[]),
        PeerRequest::Write { sets, hints } => check_replicated(membership, from, sets, hints),
        PeerRequest::Exchange { set, .. } => match membership.id_of(from) {
            Some(id) if set.contains(&id) && set.contains(&membership.id()) => Ok(()),
            Some(_) => {
                Err(forbidden(format!("{from} asked for an exchange over keys it and this node do not both replicate")))
            }
            None => Err(ServerError::new(ErrorKind::Unavailable, format!("the node id of {from} is not known yet"))),
        },
        PeerRequest::Read { .. }
        | PeerRequest::Search { .. }
        | PeerRequest::TermStats { .. }
        | PeerRequest::Pull { .. } => Ok(()),
    }
}

/// A write's (or repair's) sets only of keys this node replicates, and
/// hints only for members that replicate their keys (and not for this
/// node).
fn check_replicated(
    membership: &Membership,
    from: &str,
    sets: &[(Vec<u8>, Siblings)],
    hints: &[Hinted],
) -> Result<(), ServerError> {
    let forbidden = |what: String| ServerError::new(ErrorKind::Forbidden, what);
    let ring = membership.ring()?;
    let me = membership.id();
    // With no more members than replicas, every member replicates
    // every key.
    let every_key = ring.view().members.len() <= REPLICAS;
    let replicates = |node: NodeId, key: &[u8]| every_key || ring.preference_list(key, REPLICAS).contains(&node);
    if let Some((key, _)) = sets.iter().find(|(key, _)| !replicates(me, key)) {
        return Err(ServerError::new(
            ErrorKind::NotReplica,
            format!("{from} sent a key this node does not replicate ({} bytes)", key.len()),
        ));
    }
    for hint in hints {
        if hint.owner == me || ring.member(hint.owner).is_none() {
            return Err(forbidden(format!(
                "{from} sent hints for node {:016x}, which is this node or no member",
                hint.owner.0
            )));
        }
        if hint.sets.iter().any(|(key, _)| !replicates(hint.owner, key)) {
            return Err(ServerError::new(
                ErrorKind::NotReplica,
                format!("{from} sent hints for node {:016x} of a key it does not replicate", hint.owner.0),
            ));
        }
    }
    Ok(())
}

/// Checks the versions a peer sends as a client's are checked: no
/// timestamp, and nothing a context claims, later than this node accepts
/// now; a bulk set's id too; no more siblings than the bound.
pub fn check_peer_versions(clock: &NodeClock, request: &PeerRequest) -> Result<(), ServerError> {
    let latest = clock.latest_accepted();
    let check = |mut sets: Box<dyn Iterator<Item = &(Vec<u8>, Siblings)> + '_>| -> Result<(), ServerError> {
        sets.try_for_each(|(_, siblings)| check_siblings(siblings, latest))
    };
    match request {
        PeerRequest::Write { sets, hints } => check(Box::new(sets.iter().chain(hints.iter().flat_map(|h| &h.sets)))),
        PeerRequest::Repair { sets } => check(Box::new(sets.iter())),
        PeerRequest::LogBatch { id, sets, .. } => {
            if *id > latest {
                return Err(ServerError::new(
                    ErrorKind::ClockSkew,
                    format!("a bulk set stamped {id}, later than this node accepts ({latest})"),
                ));
            }
            check(Box::new(sets.iter()))
        }
        _ => Ok(()),
    }
}

/// One key's siblings from elsewhere: at most [`quiver_ring::SIBLINGS_MAX`]
/// of them, and [`check_claims`].
pub fn check_siblings(siblings: &Siblings, latest: Hlc) -> Result<(), ServerError> {
    if siblings.len() > quiver_ring::SIBLINGS_MAX {
        return Err(ServerError::new(
            ErrorKind::TooManySiblings,
            format!("{} siblings, more than the bound of {}", siblings.len(), quiver_ring::SIBLINGS_MAX),
        ));
    }
    check_claims(siblings, latest)
}

/// No timestamp in `siblings` after `latest`, and no context claiming
/// anything after it.
pub fn check_claims(siblings: &Siblings, latest: Hlc) -> Result<(), ServerError> {
    for version in siblings.versions() {
        if version.hlc > latest {
            return Err(ServerError::new(
                ErrorKind::ClockSkew,
                format!("a version stamped {}, later than this node accepts ({latest})", version.hlc),
            ));
        }
        if let Some(causal) = &version.causal {
            let context = &causal.context;
            let claims = std::iter::once(causal.dot.hlc)
                .chain(std::iter::once(context.max_hlc))
                .chain(context.floor.map(|(hlc, _)| hlc))
                .chain(context.vv.dots().map(|dot| dot.hlc));
            if let Some(claim) = claims.into_iter().find(|&hlc| hlc > latest) {
                return Err(ServerError::new(
                    ErrorKind::InvalidContext,
                    format!("a version's context claims {claim}, later than this node accepts ({latest})"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks every key and value of `sets` against the node's limits.
fn check_sets<'a>(
    limits: &wire::Limits,
    mut sets: impl Iterator<Item = &'a (Vec<u8>, Siblings)>,
) -> Result<(), ServerError> {
    sets.try_for_each(|(key, siblings)| {
        limits.check_key(key)?;
        siblings.versions().iter().filter_map(|v| v.value.as_deref()).try_for_each(|value| limits.check_value(value))
    })
}

impl crate::net::peer::PeerHandler for ReplicaHandler {
    fn admitted(&self) -> Vec<String> {
        self.membership.admitted()
    }

    fn handle(&self, from: &str, request: PeerRequest, reply: crate::net::peer::Reply) {
        let answer = |result: Result<PeerReply, ServerError>| match result {
            Ok(answer) => answer,
            Err(error) => PeerReply::Failed(error),
        };
        let checked = check_peer_request(&self.limits, &request)
            .and_then(|()| check_peer_identity(&self.membership, from, &request))
            .and_then(|()| check_peer_versions(&self.clock, &request));
        if let Err(error) = checked {
            tracing::warn!(peer = from, %error, "a peer's request was refused");
            return reply(PeerReply::Failed(error));
        }
        match request {
            PeerRequest::Ping { .. } => {
                let (keys, failure) = match self.data.local.status() {
                    Ok(status) => (status.keys, status.storage_failure),
                    Err(error) => (0, Some(error.message)),
                };
                reply(self.membership.pong(keys, failure))
            }
            PeerRequest::Write { sets, hints } => {
                let done = Box::new(move |r: Result<Vec<NodeId>, ServerError>| reply(answer(r.map(written_reply))));
                apply_write(&self.data.local, &self.data.hints, sets, hints, done)
            }
            PeerRequest::LogBatch { coordinator, id, sets } => {
                if let Err(error) = self.data.local.room_for_peers() {
                    return reply(PeerReply::Failed(error));
                }
                let batches = self.data.batches.clone();
                tokio::spawn(async move {
                    reply(answer(batches.log(coordinator, id, &sets).await.map(|()| PeerReply::Written)))
                });
            }
            PeerRequest::BatchDone { coordinator, id } => {
                let batches = self.data.batches.clone();
                tokio::spawn(
                    async move { reply(answer(batches.done(coordinator, id).await.map(|()| PeerReply::Written))) },
                );
            }
            PeerRequest::Read { key } => self.data.local.read_versions(
                key,
                REPLICA_READ,
                Box::new(move |r| reply(answer(r.map(PeerReply::Found)))),
            ),
            PeerRequest::Search { search, ranges } => self.data.local.search_within(
                search,
                Some(ranges),
                Box::new(move |r| reply(answer(r.map(PeerReply::Hits)))),
            ),
            PeerRequest::Exchange { set, ask } => {
                let trees = self.data.trees.clone();
                tokio::spawn(async move { reply(answer(repair::answer(&trees, set, ask).await.map(PeerReply::Told))) });
            }
            PeerRequest::Repair { sets } => {
                let done = Box::new(move |r: Result<(), ServerError>| reply(answer(r.map(|()| PeerReply::Written))));
                self.data.local.apply_streamed(sets, done)
            }
            PeerRequest::Pull { keys } => {
                let trees = self.data.trees.clone();
                tokio::spawn(async move { reply(answer(repair::pull(&trees, keys).await.map(PeerReply::Sets))) });
            }
            PeerRequest::TermStats { query, matching, ranges } => self.data.local.term_stats_within(
                query,
                matching,
                ranges,
                Box::new(move |r| reply(answer(r.map(PeerReply::TermStats)))),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::Stamp;

    fn set(key: &[u8], value: Vec<u8>) -> (Vec<u8>, Siblings) {
        (key.to_vec(), Siblings::one(Stamp { node: NodeId(1), hlc: Hlc(1) }.blind(Some(value))))
    }

    /// A peer's empty or oversized key, or oversized value, is refused with
    /// the error a client would get, before anything is written.
    #[test]
    fn a_peers_request_is_held_to_the_clients_limits() {
        let limits = wire::Limits { key_bytes_max: 4, value_bytes_max: 8, ..wire::Limits::default() };
        let kind = |request: PeerRequest| check_peer_request(&limits, &request).err().map(|e| e.kind);
        assert_eq!(kind(PeerRequest::Write { sets: vec![set(b"k", vec![0; 8])], hints: vec![] }), None);
        assert_eq!(kind(PeerRequest::Write { sets: vec![set(b"", vec![])], hints: vec![] }), Some(ErrorKind::EmptyKey));
        assert_eq!(
            kind(PeerRequest::Write { sets: vec![set(b"kkkkk", vec![])], hints: vec![] }),
            Some(ErrorKind::KeyTooLarge)
        );
        assert_eq!(
            kind(PeerRequest::Write { sets: vec![set(b"k", vec![]), set(b"l", vec![0; 9])], hints: vec![] }),
            Some(ErrorKind::ValueTooLarge)
        );
        let hints = vec![Hinted { owner: NodeId(2), sets: vec![set(b"l", vec![0; 9])] }];
        assert_eq!(kind(PeerRequest::Write { sets: vec![], hints }), Some(ErrorKind::ValueTooLarge), "a hint too");
        assert_eq!(kind(PeerRequest::Read { key: vec![] }), Some(ErrorKind::EmptyKey));
        assert_eq!(kind(PeerRequest::Ping { from: NodeId(1), hlc: Hlc(1) }), None);
    }

    /// An anti-entropy step is checked before it is read: a replica set of
    /// at most N nodes in id order, branches and segments that exist, no
    /// more segments than an ask lists, no more keys than a pull takes.
    #[test]
    fn a_peers_exchange_steps_are_held_to_their_bounds() {
        let limits = wire::Limits::default();
        let kind = |request: PeerRequest| check_peer_request(&limits, &request).err().map(|e| e.kind);
        let exchange =
            |set: &[u64], ask: Ask| PeerRequest::Exchange { set: set.iter().map(|&i| NodeId(i)).collect(), ask };
        let malformed = Some(ErrorKind::Malformed);
        assert_eq!(kind(exchange(&[1, 2, 3], Ask::Branches)), None);
        assert_eq!(kind(exchange(&[2, 1, 3], Ask::Branches)), malformed, "not in id order");
        assert_eq!(kind(exchange(&[1, 1, 3], Ask::Branches)), malformed, "a node twice");
        assert_eq!(kind(exchange(&[1, 2, 3, 4], Ask::Branches)), malformed, "more than N");
        assert_eq!(kind(exchange(&[1, 2], Ask::Segments(vec![0, 63]))), None);
        assert_eq!(kind(exchange(&[1, 2], Ask::Segments(vec![64]))), malformed, "no such branch");
        assert_eq!(kind(exchange(&[1, 2], Ask::Keys((0..64).collect()))), None);
        assert_eq!(kind(exchange(&[1, 2], Ask::Keys((0..65).collect()))), malformed, "too many segments");
        assert_eq!(kind(exchange(&[1, 2], Ask::Keys(vec![4096]))), malformed, "no such segment");
        let pull = |n: usize| PeerRequest::Pull { keys: (0..n).map(|i| format!("k{i}").into_bytes()).collect() };
        assert_eq!(kind(pull(1000)), None);
        assert_eq!(kind(pull(1001)), malformed);
        assert_eq!(kind(PeerRequest::Pull { keys: vec![vec![]] }), Some(ErrorKind::EmptyKey));
        let repair =
            |n: usize| PeerRequest::Repair { sets: (0..n).map(|i| set(format!("k{i}").as_bytes(), vec![1])).collect() };
        assert_eq!(kind(repair(1000)), None);
        assert_eq!(kind(repair(1001)), malformed);
        assert_eq!(kind(PeerRequest::Repair { sets: vec![set(b"", vec![1])] }), Some(ErrorKind::EmptyKey));
    }

    /// A multi-key read ends as soon as the values gathered pass the
    /// limit, without waiting for the other keys, and calls back once;
    /// under the limit it answers in key order once every key has.
    #[test]
    fn a_gathered_read_stops_once_its_values_pass_the_limit() {
        type Answer = Result<Values, ServerError>;
        let answered: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let done = |answered: &Arc<Mutex<Vec<Answer>>>| -> Done<Values> {
            let answered = answered.clone();
            Box::new(move |result| lock(&answered).push(result))
        };
        let found = |value: &[u8]| Ok(Some(set(b"k", value.to_vec()).1));
        let finish = |over: Over| {
            if let Some((done, result)) = over {
                done(result);
            }
        };
        let mut gather = Gather::new(100, 10, done(&answered));
        finish(gather.answer(3, found(b"123456")));
        assert!(lock(&answered).is_empty());
        finish(gather.answer(7, found(b"12345")));
        let error = lock(&answered)[0].clone().unwrap_err();
        assert_eq!(error.kind, ErrorKind::ResponseTooLarge, "{error:?}");
        assert!(gather.values.is_empty(), "what was gathered is dropped at once");
        finish(gather.answer(8, found(b"1")));
        assert_eq!(lock(&answered).len(), 1, "called back once");

        let answered: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let mut gather = Gather::new(3, 10, done(&answered));
        finish(gather.answer(2, found(b"c")));
        finish(gather.answer(0, Ok(None)));
        finish(gather.answer(1, found(b"b")));
        assert_eq!(*lock(&answered), [Ok(vec![None, Some(b"b".to_vec()), Some(b"c".to_vec())])]);
    }
}
