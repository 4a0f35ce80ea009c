//! A whole cluster in one process, deterministic: five nodes, three
//! replicas per key, a network that drops and delays messages by a seeded
//! generator, time passed in, and partway either one node that stops
//! answering, or (in half the histories, with no other fault) one node cut
//! off from its peers while clients still reach it. Clients follow the
//! smart client's retry rule (`quiver_client::retry`): a call goes to the
//! key's replicas in ring order (some clients try another node first, and
//! only some know which node to avoid), on to the next after an attempt
//! that applied nothing (the node is down, its clock refused, it saw too
//! few replicas up) and, except for a causal write, after one that may
//! have (`Unconfirmed`). Blind writes go through any coordinator;
//! causal writes, with the context of an earlier (perhaps stale) read, are
//! coordinated by a replica of the key, which writes against its own
//! siblings and sends the resulting set. Every replica
//! adopts the timestamps it receives, and quorum reads repair the replicas
//! that answered stale.
//!
//! Each node's clock is off by up to half the maximum offset, and some
//! clients' clocks are ahead of their coordinator's by up to all of it: a
//! coordinator waits before stamping as the clock rule says, and a replica
//! refuses a write with a timestamp too far ahead of its clock (a refusal
//! is hinted like a replica that is down). In half the histories the
//! stand-ins have no room for hints: every hint is dropped, and the
//! replica's own part is taken all the same. Hints are handed on by the
//! node's own rule (`hints::handoff`): every 20 ms each holder sends an
//! owner it sees up what it holds for it, over the same network, and drops
//! it once the owner has it; in a quarter of the histories hints expire
//! after 150 ms. The node that stopped comes back, or the cut heals, at
//! 2 s; in the histories with a cut no hint is left at the end. Every failure prints its seed;
//! `QUIVER_SIM_SEED=N` replays one history, `QUIVER_SIM_HISTORIES=N` runs
//! more.
//!
//! Searches run as a cluster's do (`quiver_node::cluster::scatter`): the
//! coordinator plans which node searches which token ranges, each part
//! answers over the same network, the merged hits are checked against
//! quorum reads of their keys. Here a search looks for a digit in the
//! values, scored by how often it occurs.
//!
//! Checked: no replica refuses a timestamp its coordinator stamped (the
//! clock rules agree); with a node cut off from its peers, every call that
//! starts after the cut succeeds, and none has an attempt that waited for
//! its deadline (the cut-off node answers at once that too few replicas are
//! up); a quorum read that starts after a quorum write was acknowledged
//! returns that write or a later one (R + W > N); an operation that cannot
//! reach its quorum before its deadline fails as unavailable, with the
//! counts, and never hangs; once every message is delivered and replicas
//! exchange what they hold, all replicas of a key hold the same siblings,
//! and every acknowledged causal write is among them or made obsolete by
//! one of them (a later write whose context covered it). A search answers
//! at most k hits, one per key, best first, none older than a write of its
//! key acknowledged before the search began, or fails as unavailable by
//! its deadline; after convergence a search through any node returns
//! exactly the best k over every key.

use std::collections::BTreeMap;

use quiver_client::retry::{self, Attempts, Failure, Retries};
use quiver_node::cluster::quorum::{
    self, outcome_error, replica_handle, Consistency, DataMessage, Ending, Hinted, OpId, Outcome, Placement, Quorum,
    Refusal, ReplicaStore,
};
use quiver_node::cluster::scatter;
use quiver_node::cluster::{hints, placement};
use quiver_ring::rand::SplitMix64;
use quiver_ring::ring::{Member, Ring, RingView, TokenRange};
use quiver_ring::wire::SearchHit;
use quiver_ring::{Context, Hlc, NodeId, Order, Siblings, Stamper, Version};

const NODES: u64 = 5;
const N: usize = 3;
const KEYS: u64 = 6;
const DEADLINE_MS: u64 = 40;
/// The largest distance between clocks a node accepts. Each node's clock
/// is off by less than half of it: what the clock rules promise to cope
/// with (a timestamp one node accepts, no other refuses).
const MAX_OFFSET_MS: u64 = 20;
/// Hits a search asks for: fewer than the keys, so the cut matters.
const SEARCH_K: usize = 3;
/// How long a client's call may take, all its attempts together.
const CALL_DEADLINE_MS: u64 = 4 * DEADLINE_MS;
/// How often each node hands on the hints it holds.
const HINT_TICK_MS: u64 = 20;
/// A hint's age bound in the histories where hints expire (in the others,
/// none does).
const HINT_AGE_SHORT_MS: u64 = 150;
/// When the node that stopped comes back, or the cut heals.
const RECOVER_AT: u64 = 2_000;

/// What a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    Blind(Consistency),
    /// With the context of the key's last read.
    Causal,
    Read,
}

/// A client's call, tried at its targets in turn as the retry rule says.
#[derive(Debug)]
struct Call {
    key: Vec<u8>,
    kind: CallKind,
    targets: Vec<NodeId>,
    /// The next target to try.
    next: usize,
    attempts: Attempts,
    started: u64,
}

/// What the client learns of an operation that failed with `outcome`: the
/// node's error for it, classified by the client's own rule.
fn failure_of(outcome: Outcome, ending: Ending) -> Failure {
    let error = outcome_error(outcome, "operation", ending);
    quiver_client::Error::Server { kind: error.kind, message: error.message }.failure()
}

/// A replica's sets, and the hints it holds for others (each owner's at
/// most `hint_bytes_max` bytes of values), each with when it was taken
/// (its holder's wall clock), oldest first.
#[derive(Default)]
struct MapStore {
    sets: BTreeMap<Vec<u8>, Siblings>,
    hints: Vec<HeldHint>,
    next_hint: u64,
    hint_bytes_max: u64,
    hints_dropped: usize,
    /// Hints dropped past their age.
    hints_expired: usize,
    /// Hints their owner took.
    hints_delivered: usize,
}

/// A hint a node holds: its number there, when it was taken (the holder's
/// wall clock), and what it holds.
struct HeldHint {
    id: u64,
    taken_ms: u64,
    hinted: Hinted,
}

/// The bytes a hint counts for here: its values.
fn hint_bytes(sets: &[(Vec<u8>, Siblings)]) -> u64 {
    sets.iter().flat_map(|(_, s)| s.versions()).map(|v| v.value.as_ref().map_or(1, Vec::len) as u64).sum()
}

impl MapStore {
    /// This replica's hits for the digit `digit` among its keys in
    /// `ranges`: each key's winning value, scored by how often the digit
    /// occurs in it.
    fn search(&self, digit: u8, ranges: &[TokenRange]) -> Vec<SearchHit> {
        let in_ranges = |key: &[u8]| ranges.iter().any(|range| range.holds(key));
        let winners = self.sets.iter().filter(|(key, _)| in_ranges(key));
        let winners = winners.filter_map(|(key, set)| Some((key, set.winner()?.value.clone()?)));
        winners
            .filter_map(|(key, value)| {
                let score = value.iter().filter(|&&b| b == digit).count();
                (score > 0).then(|| SearchHit { key: key.clone(), score: score as f64, value })
            })
            .collect()
    }
}

impl MapStore {
    /// Merges `sets` in (no refusal: the converged state, and a causal
    /// write's coordinator's own part).
    fn merge_sets(&mut self, sets: Vec<(Vec<u8>, Siblings)>) {
        for (key, siblings) in sets {
            self.sets.entry(key).or_default().merge(siblings);
        }
    }

    fn get(&self, key: &[u8]) -> Option<Siblings> {
        self.sets.get(key).cloned()
    }
}

/// A node as the replica of a write: its store, and its clock, which
/// adopts every timestamp it takes and refuses the write (all of it) if
/// one is too far ahead of its wall clock.
struct Replica<'a> {
    store: &'a mut MapStore,
    stamper: &'a mut Stamper,
    wall_ms: u64,
    skew_refused: &'a mut usize,
}

impl Replica<'_> {
    /// `node` as the replica of what arrives at `now`.
    fn of<'a>(node: &'a mut Node, now: u64, skew_refused: &'a mut usize) -> Replica<'a> {
        let wall_ms = now + node.offset_ms;
        Replica { store: &mut node.store, stamper: &mut node.stamper, wall_ms, skew_refused }
    }
}

impl ReplicaStore for Replica<'_> {
    fn merge(&mut self, sets: Vec<(Vec<u8>, Siblings)>, hinted: Vec<Hinted>) -> Result<Vec<NodeId>, Refusal> {
        let versions = sets.iter().chain(hinted.iter().flat_map(|h| &h.sets)).flat_map(|(_, s)| s.versions());
        for version in versions {
            if self.stamper.observe(version.hlc, self.wall_ms).is_err() {
                *self.skew_refused += 1;
                return Err(Refusal);
            }
        }
        self.store.merge_sets(sets);
        let mut dropped = Vec::new();
        for hint in hinted {
            let held = self.store.hints.iter().map(|h| &h.hinted).filter(|h| h.owner == hint.owner);
            let queued: u64 = held.map(|h| hint_bytes(&h.sets)).sum();
            if hints::fits(queued, hint_bytes(&hint.sets), self.store.hint_bytes_max) {
                self.store.next_hint += 1;
                let id = self.store.next_hint;
                self.store.hints.push(HeldHint { id, taken_ms: self.wall_ms, hinted: hint });
            } else {
                self.store.hints_dropped += 1;
                dropped.push(hint.owner);
            }
        }
        Ok(dropped)
    }

    fn get(&self, key: &[u8]) -> Option<Siblings> {
        self.store.get(key)
    }
}

struct Node {
    quorum: Quorum,
    store: MapStore,
    stamper: Stamper,
    /// How far this node's wall clock is ahead of the simulation's time.
    offset_ms: u64,
    /// Operations this node coordinates: what each was.
    ops: BTreeMap<OpId, Op>,
    /// Searches this node coordinates, by number.
    searches: BTreeMap<u64, Search>,
    /// Per owner, until when the answer to the hints sent to it is waited
    /// for (then they are sent again).
    handing_off: BTreeMap<NodeId, u64>,
}

/// A search in progress at its coordinator.
struct Search {
    digit: u8,
    deadline: u64,
    /// Parts not answered yet, then hits whose keys are being read.
    waiting: usize,
    /// The parts' hits, then the merged best k.
    hits: Vec<SearchHit>,
    /// Per merged hit, the value a quorum read found (once all answered).
    current: Vec<Option<Option<Vec<u8>>>>,
    /// Per key, the highest order acknowledged before the search began.
    acked_before: BTreeMap<Vec<u8>, Order>,
    checking: bool,
}

/// What travels besides the quorum logic's messages: search parts.
enum Message {
    Data(DataMessage),
    SearchPart {
        search: u64,
        digit: u8,
        ranges: Vec<TokenRange>,
    },
    SearchHits {
        search: u64,
        hits: Vec<SearchHit>,
    },
    /// A holder's hints `ids` for the receiver: their sets.
    Handoff {
        sets: Vec<(Vec<u8>, Siblings)>,
        ids: Vec<u64>,
    },
    /// The owner has them durable.
    HandedOff {
        ids: Vec<u64>,
    },
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        key: Vec<u8>,
        order: Order,
        consistency: Consistency,
        call: u64,
    },
    /// A causal write coordinated by a replica: the version it made.
    Causal {
        key: Vec<u8>,
        version: Version,
        call: u64,
    },
    /// A read, and the highest order of a write acknowledged before it began.
    Read {
        key: Vec<u8>,
        acked_before: Option<Order>,
        call: u64,
    },
    /// A read of a search's `hit`-th merged hit.
    SearchRead {
        search: u64,
        hit: usize,
    },
}

/// A write to start at `at`: its coordinator waits for its clock before
/// stamping it ([`Stamper::wait_before_stamp_ms`]).
struct Deferred {
    at: u64,
    coordinator: NodeId,
    key: Vec<u8>,
    /// `None`: a causal write, with the context of the key's last read.
    consistency: Option<Consistency>,
    call: u64,
}

struct InFlight {
    at: u64,
    from: NodeId,
    to: NodeId,
    message: Message,
}

struct Sim {
    rng: SplitMix64,
    now: u64,
    nodes: BTreeMap<NodeId, Node>,
    ring: Ring,
    network: Vec<InFlight>,
    dropped: Vec<InFlight>,
    down: Option<NodeId>,
    /// The node cut off from its peers (clients still reach it), and when.
    cut: Option<(NodeId, u64)>,
    /// Messages are lost at random (not in the histories with a cut).
    lossy: bool,
    /// A node was cut off from its peers in this history.
    had_cut: bool,
    /// A hint taken this long ago is dropped undelivered.
    hint_age_ms: u64,
    /// Clients start calls (not once they stopped, at the end).
    clients_on: bool,
    calls: BTreeMap<u64, Call>,
    next_call: u64,
    retries: Retries,
    calls_failed: usize,
    /// Calls started after the cut that failed or waited for a deadline.
    cut_violations: Vec<String>,
    /// Per key, the highest order of an acknowledged write.
    acked: BTreeMap<Vec<u8>, Order>,
    /// The same for writes at `any`.
    acked_any: BTreeMap<Vec<u8>, Order>,
    /// The causal writes acknowledged.
    causal_acked: Vec<(Vec<u8>, Version)>,
    /// Per key, the context of the last read that completed.
    contexts: BTreeMap<Vec<u8>, Context>,
    /// The highest timestamp any client saw: every write carries it (or
    /// its own clock, when that is ahead).
    client_hlc: Hlc,
    /// Writes whose coordinator waits before stamping them.
    deferred: Vec<Deferred>,
    /// Writes a replica refused as too far ahead of its clock.
    skew_refused: usize,
    /// Writes a coordinator refused: the client's timestamp too far ahead.
    clock_refused: usize,
    /// Writes whose coordinator waited before stamping them.
    waited: usize,
    unavailable: usize,
    reads_checked: usize,
    /// Every value written, and its version's order.
    written: BTreeMap<Vec<u8>, Order>,
    next_search: u64,
    searches_checked: usize,
    searches_unavailable: usize,
    seed: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let members = (1..=NODES)
            .map(|id| Member {
                id: NodeId(id),
                name: format!("n{id}"),
                client_addr: String::new(),
                peer_addr: String::new(),
            })
            .collect();
        let mut rng = SplitMix64::new(seed);
        // Half the histories keep no hints at all: every hint is dropped.
        let hint_bytes_max = if rng.chance(0.5) { 0 } else { 1 << 20 };
        let lossy = rng.chance(0.5);
        let hint_age_ms = if rng.chance(0.25) { HINT_AGE_SHORT_MS } else { u64::MAX };
        let nodes = (1..=NODES)
            .map(|id| {
                let node = Node {
                    quorum: Quorum::new(NodeId(id)),
                    store: MapStore { hint_bytes_max, ..MapStore::default() },
                    stamper: Stamper::new(NodeId(id), Hlc::ZERO, MAX_OFFSET_MS),
                    offset_ms: rng.between(0, MAX_OFFSET_MS / 2 - 1),
                    ops: BTreeMap::new(),
                    searches: BTreeMap::new(),
                    handing_off: BTreeMap::new(),
                };
                (NodeId(id), node)
            })
            .collect();
        Sim {
            rng,
            now: 1_000,
            nodes,
            ring: Ring::new(RingView { epoch: 1, members }),
            network: Vec::new(),
            dropped: Vec::new(),
            down: None,
            cut: None,
            lossy,
            had_cut: false,
            hint_age_ms,
            clients_on: true,
            calls: BTreeMap::new(),
            next_call: 0,
            retries: Retries::default(),
            calls_failed: 0,
            cut_violations: Vec::new(),
            acked: BTreeMap::new(),
            acked_any: BTreeMap::new(),
            causal_acked: Vec::new(),
            contexts: BTreeMap::new(),
            client_hlc: Hlc::ZERO,
            deferred: Vec::new(),
            skew_refused: 0,
            clock_refused: 0,
            waited: 0,
            unavailable: 0,
            reads_checked: 0,
            written: BTreeMap::new(),
            next_search: 0,
            searches_checked: 0,
            searches_unavailable: 0,
            seed,
        }
    }

    fn send(&mut self, from: NodeId, messages: Vec<(NodeId, DataMessage)>) {
        let messages = messages.into_iter().map(|(to, message)| (to, Message::Data(message))).collect();
        self.send_messages(from, messages);
    }

    fn send_messages(&mut self, from: NodeId, messages: Vec<(NodeId, Message)>) {
        for (to, message) in messages {
            let delay = self.rng.between(0, 15);
            let flight = InFlight { at: self.now + delay, from, to, message };
            if from != to && self.lossy && self.rng.chance(0.1) {
                self.dropped.push(flight);
            } else {
                self.network.push(flight);
            }
        }
    }

    fn finish(&mut self, coordinator: NodeId, op: OpId, outcome: Outcome) {
        let seed = self.seed;
        let Some(done) = self.nodes.get_mut(&coordinator).and_then(|n| n.ops.remove(&op)) else { return };
        let call = match &done {
            Op::Write { call, .. } => Some((*call, Ending::Write)),
            // Its coordinator's own copy was written before any was sent.
            Op::Causal { call, .. } => Some((*call, Ending::Written)),
            Op::Read { call, .. } => Some((*call, Ending::Read)),
            Op::SearchRead { .. } => None,
        };
        let failed = match &outcome {
            Outcome::Written | Outcome::Read(_) => None,
            other => Some(other.clone()),
        };
        let seen = match (&done, &outcome) {
            (Op::Write { order, .. }, Outcome::Written) => Some(order.0),
            (Op::Causal { version, .. }, Outcome::Written) => Some(version.hlc),
            (_, Outcome::Read(found)) => found.as_ref().and_then(Siblings::winner).map(|v| v.hlc),
            _ => None,
        };
        self.client_hlc = self.client_hlc.max(seen.unwrap_or_default());
        match (done, outcome) {
            (Op::Write { key, order, consistency, .. }, Outcome::Written) => {
                // A write at `any` may be held by a hint only: quorum reads
                // need not see it, but it must survive to the end.
                let acked = if consistency == Consistency::Any { &mut self.acked_any } else { &mut self.acked };
                let best = acked.entry(key).or_insert(order);
                *best = (*best).max(order);
            }
            (Op::Causal { key, version, .. }, Outcome::Written) => self.causal_acked.push((key, version)),
            (Op::Read { key, acked_before, .. }, Outcome::Read(found)) => {
                if let Some(found) = &found {
                    self.contexts.insert(key.clone(), found.context());
                }
                let got = found.as_ref().and_then(Siblings::winner).map(|v| v.order());
                if let Some(acked) = acked_before {
                    assert!(
                        got.is_some_and(|got| got >= acked),
                        "seed {seed}: a quorum read of {key:?} returned {got:?}, older than the write acknowledged before it ({acked:?})"
                    );
                }
                self.reads_checked += 1;
            }
            (Op::SearchRead { search, hit }, outcome) => {
                let Some(node) = self.nodes.get_mut(&coordinator) else { return };
                let Some(running) = node.searches.get_mut(&search) else { return };
                let found = match outcome {
                    Outcome::Read(found) => found,
                    Outcome::Unavailable { .. } | Outcome::TooFewUp { .. } => {
                        node.searches.remove(&search);
                        self.searches_unavailable += 1;
                        return;
                    }
                    other => panic!("seed {seed}: a search's read ended as {other:?}"),
                };
                running.current[hit] = Some(found.as_ref().and_then(Siblings::winner).and_then(|v| v.value.clone()));
                running.waiting -= 1;
                if running.waiting == 0 {
                    self.search_done(coordinator, search);
                }
            }
            (_, Outcome::Unavailable { answered, needed, asked }) => {
                assert!(answered < needed && needed <= asked, "seed {seed}: unavailable with {answered} of {needed}");
                self.unavailable += 1;
            }
            (_, Outcome::TooFewUp { up, needed, replicas }) => {
                assert!(up < needed && needed <= replicas, "seed {seed}: too few up with {up} of {needed}");
            }
            (op, outcome) => panic!("seed {seed}: {op:?} ended as {outcome:?}"),
        }
        match (call, failed) {
            (Some((call, _)), None) => self.call_ended(call, true),
            (Some((call, ending)), Some(outcome)) => self.call_failed(call, failure_of(outcome, ending)),
            (None, _) => {}
        }
    }

    /// The nodes `node` sees down: the one that stopped, and the one cut
    /// off; all the others, for the one cut off.
    fn down_seen_by(&self, node: NodeId) -> Vec<NodeId> {
        match self.cut {
            Some((cut, _)) if cut == node => self.nodes.keys().copied().filter(|&id| id != node).collect(),
            cut => self.down.into_iter().chain(cut.map(|(cut, _)| cut)).collect(),
        }
    }

    /// A client's call: to the key's replicas in ring order, those its
    /// ring says to avoid last (half the clients know the node cut off),
    /// and for half the blind writes and reads `first` before them (a
    /// client sending to the node it is connected to); a causal write
    /// starts at a random replica.
    fn start_call(&mut self, first: NodeId, key: Vec<u8>, kind: CallKind) {
        let avoid: Vec<NodeId> = self.cut.filter(|_| self.rng.chance(0.5)).map(|(cut, _)| cut).into_iter().collect();
        let mut targets = retry::order(self.ring.preference_list(&key, N), &avoid);
        match kind {
            // Clients that chose another replica first.
            CallKind::Causal => targets.rotate_left(self.rng.between(0, N as u64 - 1) as usize),
            _ if self.rng.chance(0.5) => {
                targets.retain(|&id| id != first);
                targets.insert(0, first);
            }
            _ => {}
        }
        let call = self.next_call;
        self.next_call += 1;
        let attempts = Attempts::new(kind == CallKind::Causal);
        self.calls.insert(call, Call { key, kind, targets, next: 0, attempts, started: self.now });
        self.attempt(call);
    }

    /// The call's next attempt, at its next target.
    fn attempt(&mut self, call: u64) {
        let Some(this) = self.calls.get_mut(&call) else { return };
        let Some(&target) = this.targets.get(this.next) else { return self.call_ended(call, false) };
        this.next += 1;
        let (key, kind) = (this.key.clone(), this.kind);
        if Some(target) == self.down {
            // The client cannot connect.
            return self.call_failed(call, Failure::NotApplied);
        }
        let at = self.now;
        match kind {
            CallKind::Blind(consistency) => {
                let consistency = Some(consistency);
                self.start_write(Deferred { at, coordinator: target, key, consistency, call })
            }
            CallKind::Causal => self.start_write(Deferred { at, coordinator: target, key, consistency: None, call }),
            CallKind::Read => {
                let acked_before = self.acked.get(&key).copied();
                let placement = self.placement(&key, target, false);
                let node = self.nodes.get_mut(&target).expect("a target is a node");
                let started = node.quorum.start_read(&key, &placement, Consistency::Quorum, at + DEADLINE_MS);
                let (op, messages, done) = started;
                node.ops.insert(op, Op::Read { key, acked_before, call });
                self.send(target, messages);
                if let Some(outcome) = done {
                    self.finish(target, op, outcome);
                }
            }
        }
    }

    /// An attempt of `call` failed so: on to its next target if the retry
    /// rule says so and the call has time left.
    fn call_failed(&mut self, call: u64, failure: Failure) {
        let Some(this) = self.calls.get_mut(&call) else { return };
        let go_on = this.attempts.go_on(failure);
        let time_left = self.now < this.started + CALL_DEADLINE_MS;
        if go_on && time_left && self.clients_on && this.next < this.targets.len() {
            self.retries.count(failure);
            return self.attempt(call);
        }
        self.call_ended(call, false);
    }

    fn call_ended(&mut self, call: u64, ok: bool) {
        let Some(this) = self.calls.remove(&call) else { return };
        self.calls_failed += usize::from(!ok);
        let after_cut = self.cut.is_some_and(|(_, at)| this.started > at);
        // At `any`, the node cut off takes the write as hints for the
        // replicas: where it has no room for them, that attempt waits.
        let checked = this.kind != CallKind::Blind(Consistency::Any);
        if after_cut && checked && self.clients_on && (!ok || this.attempts.in_doubt()) {
            self.cut_violations.push(format!("{this:?}: succeeded {ok}"));
        }
    }

    /// One millisecond: what is due is delivered in a seeded order, what
    /// passed its deadline ends, and (with `new_ops`) a client may start an
    /// operation at a coordinator that is up.
    fn step(&mut self, new_ops: bool) {
        self.now += 1;
        self.clients_on = new_ops;
        // Deferred writes whose wait is over start (once the clients stop,
        // they give up).
        let now = self.now;
        let (due, later): (Vec<Deferred>, Vec<Deferred>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|d| d.at <= now);
        self.deferred = later;
        for write in due {
            match new_ops && Some(write.coordinator) != self.down {
                true => self.start_write(write),
                // The connection to it is lost: the client cannot know
                // whether it was applied.
                false => self.call_failed(write.call, Failure::InDoubt),
            }
        }
        if !new_ops {
            for write in std::mem::take(&mut self.deferred) {
                self.call_ended(write.call, false);
            }
        }
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.network.len() {
            if self.network[i].at <= self.now {
                due.push(self.network.swap_remove(i));
            } else {
                i += 1;
            }
        }
        while !due.is_empty() {
            let flight = due.swap_remove(self.rng.between(0, due.len() as u64 - 1) as usize);
            self.deliver(flight);
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(node) = self.nodes.get_mut(&id) else { continue };
            let expired = node.quorum.expire(self.now);
            let repairs = node.quorum.take_repairs();
            // A search whose parts have not all answered by its deadline
            // fails (its reads end through the quorum logic's deadline).
            let now = self.now;
            let before = node.searches.len();
            node.searches.retain(|_, search| search.checking || search.deadline >= now);
            self.searches_unavailable += before - node.searches.len();
            self.send(id, repairs);
            for (op, outcome) in expired {
                self.finish(id, op, outcome);
            }
        }
        if self.now.is_multiple_of(HINT_TICK_MS) {
            for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                self.hand_off(id);
            }
        }
        if new_ops && self.rng.chance(0.5) {
            let coordinator = NodeId(self.rng.between(1, NODES));
            if Some(coordinator) != self.down {
                self.start_op(coordinator);
            }
        }
    }

    /// A hint tick at `holder`: for each owner, what [`hints::handoff`]
    /// says, as the node does it (hints past their age dropped, the others
    /// sent to an owner that is up and removed once it has them).
    fn hand_off(&mut self, holder: NodeId) {
        if Some(holder) == self.down {
            return;
        }
        let (now, down) = (self.now, self.down_seen_by(holder));
        let node = self.nodes.get_mut(&holder).expect("a holder is a node");
        let cutoff_ms = (now + node.offset_ms).saturating_sub(self.hint_age_ms);
        node.handing_off.retain(|_, until| *until >= now);
        let mut owners: Vec<NodeId> = node.store.hints.iter().map(|h| h.hinted.owner).collect();
        owners.sort();
        owners.dedup();
        owners.retain(|owner| !node.handing_off.contains_key(owner));
        let mut sends = Vec::new();
        for owner in owners {
            let taken: Vec<u64> =
                node.store.hints.iter().filter(|h| h.hinted.owner == owner).map(|h| h.taken_ms).collect();
            let expired = match hints::handoff(&taken, !down.contains(&owner), cutoff_ms) {
                hints::Handoff::Keep => continue,
                hints::Handoff::Expire { expired } | hints::Handoff::Deliver { expired } => expired,
            };
            let expired_ids: Vec<u64> =
                node.store.hints.iter().filter(|h| h.hinted.owner == owner).take(expired).map(|h| h.id).collect();
            node.store.hints.retain(|h| !expired_ids.contains(&h.id));
            node.store.hints_expired += expired;
            if down.contains(&owner) {
                continue;
            }
            let held = node.store.hints.iter().filter(|h| h.hinted.owner == owner);
            let (ids, sets) = held.map(|h| (h.id, h.hinted.sets.clone())).unzip::<_, _, Vec<_>, Vec<_>>();
            if !ids.is_empty() {
                node.handing_off.insert(owner, now + DEADLINE_MS);
                sends.push((owner, Message::Handoff { sets: sets.concat(), ids }));
            }
        }
        self.send_messages(holder, sends);
    }

    fn deliver(&mut self, flight: InFlight) {
        if Some(flight.to) == self.down {
            return;
        }
        let across_the_cut = self.cut.is_some_and(|(cut, _)| (flight.from == cut) != (flight.to == cut));
        if across_the_cut {
            return self.dropped.push(flight);
        }
        let Some(node) = self.nodes.get_mut(&flight.to) else { return };
        let message = match flight.message {
            Message::Data(message) => message,
            Message::SearchPart { search, digit, ranges } => {
                let hits = node.store.search(digit, &ranges);
                return self.send_messages(flight.to, vec![(flight.from, Message::SearchHits { search, hits })]);
            }
            Message::SearchHits { search, hits } => return self.search_part_answered(flight.to, search, hits),
            Message::Handoff { sets, ids } => {
                let mut replica = Replica::of(node, self.now, &mut self.skew_refused);
                if replica.merge(sets, Vec::new()).is_ok() {
                    self.send_messages(flight.to, vec![(flight.from, Message::HandedOff { ids })]);
                }
                return;
            }
            Message::HandedOff { ids } => {
                let before = node.store.hints.len();
                node.store.hints.retain(|h| !ids.contains(&h.id));
                node.store.hints_delivered += before - node.store.hints.len();
                node.handing_off.remove(&flight.from);
                return;
            }
        };
        match message {
            message @ (DataMessage::Write { .. } | DataMessage::Read { .. }) => {
                let mut replica = Replica::of(node, self.now, &mut self.skew_refused);
                if let Some(reply) = replica_handle(&mut replica, message) {
                    let to = flight.to;
                    self.send(to, vec![(flight.from, reply)]);
                }
            }
            reply => {
                let done = node.quorum.on_reply(flight.from, reply);
                let repairs = node.quorum.take_repairs();
                self.send(flight.to, repairs);
                if let Some((op, outcome)) = done {
                    self.finish(flight.to, op, outcome);
                }
            }
        }
    }

    /// A client's operation: a search through `coordinator`, or a call
    /// about a random key (`coordinator` is the node some clients try
    /// first).
    fn start_op(&mut self, coordinator: NodeId) {
        let key = format!("key-{}", self.rng.between(0, KEYS - 1)).into_bytes();
        if self.rng.chance(0.1) {
            return self.start_search(coordinator);
        }
        let kind = match self.rng.between(0, 4) {
            // Some writes at `any`: a hint may be all that holds them.
            0 | 1 if self.rng.chance(0.2) => CallKind::Blind(Consistency::Any),
            0 | 1 => CallKind::Blind(Consistency::Quorum),
            2 => CallKind::Causal,
            _ => CallKind::Read,
        };
        self.start_call(coordinator, key, kind);
    }

    /// A write of `write.key` through `write.coordinator`, carrying the
    /// highest timestamp the client saw (and a causal write, the context of
    /// the key's last read): the coordinator checks it, and waits before
    /// stamping as long as the clock rule says ([`Self::deferred`]).
    fn start_write(&mut self, write: Deferred) {
        let context = self.contexts.get(&write.key).cloned().unwrap_or_default();
        let Some(node) = self.nodes.get_mut(&write.coordinator) else { return };
        let wall_ms = self.now + node.offset_ms;
        // Some clients' clocks are ahead of the coordinator's, by up to the
        // maximum offset.
        let client_clock = Hlc::from_physical_ms(wall_ms + self.rng.between(0, MAX_OFFSET_MS));
        let seen = match self.lossy && self.rng.chance(0.2) {
            true => self.client_hlc.max(client_clock),
            false => self.client_hlc,
        };
        let seen = if write.consistency.is_none() { seen.max(context.max_hlc) } else { seen };
        if node.stamper.check(seen, wall_ms).is_err() {
            self.clock_refused += 1;
            return self.call_failed(write.call, Failure::NotApplied);
        }
        let wait_ms = node.stamper.wait_before_stamp_ms(seen, wall_ms);
        if wait_ms > 0 {
            self.waited += 1;
            return self.deferred.push(Deferred { at: self.now + wait_ms, ..write });
        }
        node.stamper.observe(seen, wall_ms).expect("checked");
        let stamp = node.stamper.next(wall_ms).expect("within the offset after the wait");
        let deadline = self.now + DEADLINE_MS;
        let Some(consistency) = write.consistency else {
            let version = stamp.causal(context, None);
            return self.start_causal(write.coordinator, write.key, version, deadline, write.call);
        };
        // Unique: two nodes may stamp the same hlc.
        let version = stamp.blind(Some(format!("{} n{}", stamp.hlc, stamp.node.0).into_bytes()));
        let order = version.order();
        self.written.insert(version.value.clone().unwrap_or_default(), order);
        let placement = self.placement(&write.key, write.coordinator, false);
        let Some(node) = self.nodes.get_mut(&write.coordinator) else { return };
        let sets = vec![(write.key.clone(), Siblings::one(version))];
        let (op, messages, done) = node.quorum.start_write(sets, vec![placement], consistency, deadline);
        node.ops.insert(op, Op::Write { key: write.key, order, consistency, call: write.call });
        self.send(write.coordinator, messages);
        if let Some(outcome) = done {
            self.finish(write.coordinator, op, outcome);
        }
    }

    /// A causal write of `key` through `coordinator`, a replica that is
    /// up: `version` (stamped above its context; its value is made here),
    /// merged into the replica's own siblings, and the resulting set sent
    /// to the others.
    fn start_causal(&mut self, coordinator: NodeId, key: Vec<u8>, mut version: Version, deadline: u64, call: u64) {
        let placement = self.placement(&key, coordinator, true);
        // Before its own copy is written, as the node checks: then nothing was.
        if let Some(outcome) = quorum::unreachable(std::slice::from_ref(&placement), Consistency::Quorum) {
            return self.call_failed(call, failure_of(outcome, Ending::Write));
        }
        version.value = Some(format!("causal {} n{}", version.hlc, coordinator.0).into_bytes());
        self.written.insert(version.value.clone().unwrap_or_default(), version.order());
        let Some(node) = self.nodes.get_mut(&coordinator) else { return };
        let mut set = node.store.get(&key).unwrap_or_default();
        set.merge(Siblings::one(version.clone()));
        node.store.merge_sets(vec![(key.clone(), set.clone())]);
        let (op, messages, done) = node.quorum.start_write_held(
            vec![(key.clone(), set)],
            vec![placement],
            Consistency::Quorum,
            deadline,
            coordinator,
        );
        node.ops.insert(op, Op::Causal { key, version, call });
        self.send(coordinator, messages);
        if let Some(outcome) = done {
            self.finish(coordinator, op, outcome);
        }
    }

    /// A search for a random digit through `coordinator`: its plan (as a
    /// coordinator that knows which node is down sees it) sends each part
    /// over the network, its own too (the real one calls itself directly;
    /// here it only takes a message's delay).
    fn start_search(&mut self, coordinator: NodeId) {
        let digit = b'0' + self.rng.between(0, 9) as u8;
        let down = self.down_seen_by(coordinator);
        let parts = match scatter::plan(&self.ring, N, coordinator, &down) {
            Ok(parts) => parts,
            Err(_) => {
                self.searches_unavailable += 1;
                return;
            }
        };
        let search = self.next_search;
        self.next_search += 1;
        let running = Search {
            digit,
            deadline: self.now + DEADLINE_MS,
            waiting: parts.len(),
            hits: Vec::new(),
            current: Vec::new(),
            acked_before: self.acked.clone(),
            checking: false,
        };
        let Some(node) = self.nodes.get_mut(&coordinator) else { return };
        node.searches.insert(search, running);
        let asks = parts.into_iter().map(|(to, ranges)| (to, Message::SearchPart { search, digit, ranges }));
        self.send_messages(coordinator, asks.collect());
    }

    /// A part's hits arrived; with the last part, the best k are merged and
    /// their keys read at quorum.
    fn search_part_answered(&mut self, coordinator: NodeId, search: u64, hits: Vec<SearchHit>) {
        let Some(node) = self.nodes.get_mut(&coordinator) else { return };
        // One that ended (its deadline passed) is answered no more.
        let Some(running) = node.searches.get_mut(&search) else { return };
        running.hits.extend(hits);
        running.waiting -= 1;
        if running.waiting > 0 {
            return;
        }
        running.hits = scatter::merge([std::mem::take(&mut running.hits)], SEARCH_K);
        running.current = vec![None; running.hits.len()];
        running.waiting = running.hits.len();
        running.checking = true;
        if running.hits.is_empty() {
            return self.search_done(coordinator, search);
        }
        // The reads share the search's deadline, as a request's do.
        let deadline = running.deadline;
        let keys: Vec<Vec<u8>> = running.hits.iter().map(|hit| hit.key.clone()).collect();
        for (hit, key) in keys.into_iter().enumerate() {
            let placement = self.placement(&key, coordinator, false);
            let node = self.nodes.get_mut(&coordinator).expect("the coordinator is a node");
            let (op, messages, done) = node.quorum.start_read(&key, &placement, Consistency::Quorum, deadline);
            node.ops.insert(op, Op::SearchRead { search, hit });
            self.send(coordinator, messages);
            if let Some(outcome) = done {
                self.finish(coordinator, op, outcome);
            }
        }
    }

    /// Every read of a search's hits answered: the hits whose value is
    /// current are its answer, checked here.
    fn search_done(&mut self, coordinator: NodeId, search: u64) {
        let seed = self.seed;
        let Some(running) = self.nodes.get_mut(&coordinator).and_then(|node| node.searches.remove(&search)) else {
            return;
        };
        let current = running.current.into_iter().map(|found| found.expect("every read answered")).collect();
        let answer = scatter::keep_current(running.hits, current);
        assert!(answer.len() <= SEARCH_K, "seed {seed}: {} hits of {SEARCH_K} asked", answer.len());
        for (i, hit) in answer.iter().enumerate() {
            assert!(hit.value.contains(&running.digit), "seed {seed}: a hit without the digit: {hit:?}");
            assert!(answer[..i].iter().all(|h| h.key != hit.key), "seed {seed}: a key twice in one answer");
            assert!(answer[..i].iter().all(|h| h.score >= hit.score), "seed {seed}: hits out of order");
            let order = self.written.get(&hit.value).expect("every value was written");
            if let Some(acked) = running.acked_before.get(&hit.key) {
                assert!(
                    order >= acked,
                    "seed {seed}: a search returned {:?} of {:?}, older than a write acknowledged before it",
                    hit.value,
                    hit.key
                );
            }
        }
        self.searches_checked += 1;
    }

    /// Once every replica holds the same: a search through each node
    /// returns exactly the best k over every key's value.
    fn search_converged(&mut self) {
        for digit in b'0'..=b'9' {
            let mut expected: Vec<(Vec<u8>, usize)> = (0..KEYS)
                .filter_map(|k| {
                    let key = format!("key-{k}").into_bytes();
                    let replica = self.ring.preference_list(&key, N)[0];
                    let value = self.nodes[&replica].store.get(&key)?.winner()?.value.clone()?;
                    let score = value.iter().filter(|&&b| b == digit).count();
                    (score > 0).then_some((key, score))
                })
                .collect();
            expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            expected.truncate(SEARCH_K);
            for coordinator in self.nodes.keys().copied().collect::<Vec<_>>() {
                let parts = scatter::plan(&self.ring, N, coordinator, &[]).expect("every node is up");
                let answers = parts.iter().map(|(node, ranges)| self.nodes[node].store.search(digit, ranges));
                let got: Vec<(Vec<u8>, usize)> =
                    scatter::merge(answers, SEARCH_K).into_iter().map(|hit| (hit.key, hit.score as usize)).collect();
                assert_eq!(got, expected, "seed {}: search for {} through {coordinator:?}", self.seed, digit as char);
            }
        }
    }

    /// Where `key`'s copies go, as `coordinator` sees which nodes are down
    /// (the node's own rule; `causal`: it holds the write already).
    fn placement(&self, key: &[u8], coordinator: NodeId, causal: bool) -> Placement {
        let down = self.down_seen_by(coordinator);
        placement::place(&self.ring, key, N, &down, causal.then_some(coordinator))
    }

    /// The node that was down is back and gets its hints; everything else
    /// is delivered (the dropped messages too, as retries will), then every
    /// replica of every key merges the others'.
    fn converge(&mut self) {
        let mut rest: Vec<InFlight> = std::mem::take(&mut self.network);
        rest.append(&mut self.dropped);
        self.down = None;
        self.cut = None;
        let hints: Vec<HeldHint> =
            self.nodes.values_mut().flat_map(|node| std::mem::take(&mut node.store.hints)).collect();
        for HeldHint { hinted: Hinted { owner, sets }, .. } in hints {
            self.nodes.get_mut(&owner).expect("a hint's owner is a node").store.merge_sets(sets);
        }
        for flight in rest {
            let Message::Data(message) = flight.message else { continue };
            if let (DataMessage::Write { sets, .. }, Some(node)) = (message, self.nodes.get_mut(&flight.to)) {
                node.store.merge_sets(sets);
            }
        }
        for k in 0..KEYS {
            let key = format!("key-{k}").into_bytes();
            let replicas = self.ring.preference_list(&key, N);
            let mut all = Siblings::default();
            for id in &replicas {
                if let Some(found) = self.nodes[id].store.get(&key) {
                    all.merge(found);
                }
            }
            for id in &replicas {
                let node = self.nodes.get_mut(id).expect("a replica is a node");
                node.store.merge_sets(vec![(key.clone(), all.clone())]);
            }
            let first = self.nodes[&replicas[0]].store.get(&key);
            for id in &replicas {
                assert_eq!(self.nodes[id].store.get(&key), first, "seed {}: replicas of {key:?} differ", self.seed);
            }
            for (_, version) in self.causal_acked.iter().filter(|(k, _)| *k == key) {
                // Gone only under a later blind write, or a causal write
                // whose reader knew it (contexts are causally closed, so
                // knowing it through another version counts).
                let kept = first.as_ref().is_some_and(|set| {
                    set.versions().iter().any(|v| match &v.causal {
                        _ if v == version => true,
                        None => v.order() > version.order(),
                        Some(causal) => causal.context.covers(version),
                    })
                });
                assert!(kept, "seed {}: an acknowledged causal write of {key:?} is gone: {version:?}", self.seed);
            }
            // A write at `any` that only a hint held is gone once the hint
            // expired: checked only where none expires.
            let any = self.acked_any.get(&key).filter(|_| self.hint_age_ms == u64::MAX);
            let acked = self.acked.get(&key).into_iter().chain(any).max();
            if let Some(acked) = acked {
                let winner = first.as_ref().and_then(Siblings::winner).map(|v| v.order());
                assert!(
                    winner.is_some_and(|w| w >= *acked),
                    "seed {}: an acknowledged write of {key:?} is gone",
                    self.seed
                );
            }
        }
    }
}

/// What one history checked.
#[derive(Default)]
struct Checked {
    reads: usize,
    unavailable: usize,
    causal: usize,
    searches: usize,
    searches_unavailable: usize,
    waited: usize,
    hints_dropped: usize,
    hints_delivered: usize,
    hints_expired: usize,
    /// Histories with a node cut off, and the retries their clients made.
    cut: usize,
    retried_around_cut: u64,
}

/// One history.
fn run(seed: u64) -> Checked {
    let mut sim = Sim::new(seed);
    for step in 0..3_000 {
        if step == 1_000 {
            let node = NodeId(SplitMix64::new(seed).between(1, NODES));
            match sim.lossy {
                // One node stops answering (its data stays).
                true => sim.down = Some(node),
                // One node's peers cannot reach it, nor it them.
                false => {
                    sim.cut = Some((node, sim.now));
                    sim.had_cut = true;
                }
            }
        }
        if step == RECOVER_AT {
            // The node is back, or the cut heals: hints go to their owners.
            sim.down = None;
            sim.cut = None;
        }
        sim.step(true);
    }
    let cut = sim.had_cut;
    assert!(
        sim.cut_violations.is_empty(),
        "seed {seed}: with one node cut off from its peers and no other fault, calls failed or waited for a \
         deadline: {:#?}",
        sim.cut_violations
    );
    // Every operation ends: what is still in flight passes its deadline.
    for _ in 0..=DEADLINE_MS + 1 {
        sim.step(false);
    }
    let left: usize = sim.nodes.values().map(|n| n.quorum.in_flight() + n.searches.len()).sum();
    assert_eq!(left, 0, "seed {seed}: operations never ended");
    assert_eq!(
        sim.skew_refused, 0,
        "seed {seed}: a replica refused a timestamp its coordinator stamped as too far ahead ({} refused by coordinators)",
        sim.clock_refused
    );
    let hints_dropped = sim.nodes.values().map(|n| n.store.hints_dropped).sum();
    let hints_delivered = sim.nodes.values().map(|n| n.store.hints_delivered).sum();
    let hints_expired = sim.nodes.values().map(|n| n.store.hints_expired).sum();
    if cut {
        // Nothing lost, and everyone up for a while: every hint was handed on.
        let held: usize = sim.nodes.values().map(|n| n.store.hints.len()).sum();
        assert_eq!(held, 0, "seed {seed}: hints still held long after the cut healed");
    }
    sim.converge();
    sim.search_converged();
    Checked {
        reads: sim.reads_checked,
        unavailable: sim.unavailable,
        causal: sim.causal_acked.len(),
        searches: sim.searches_checked,
        searches_unavailable: sim.searches_unavailable,
        waited: sim.waited,
        hints_dropped,
        hints_delivered,
        hints_expired,
        cut: usize::from(cut),
        retried_around_cut: if cut { sim.retries.not_applied } else { 0 },
    }
}

#[test]
fn quorum_reads_see_acknowledged_writes_and_replicas_converge() {
    let seeds: Vec<u64> = match std::env::var("QUIVER_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => {
            let histories = std::env::var("QUIVER_SIM_HISTORIES").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
            (0..histories).collect()
        }
    };
    let mut total = Checked::default();
    for seed in seeds {
        let one = run(seed);
        total.reads += one.reads;
        total.unavailable += one.unavailable;
        total.causal += one.causal;
        total.searches += one.searches;
        total.searches_unavailable += one.searches_unavailable;
        total.waited += one.waited;
        total.hints_dropped += one.hints_dropped;
        total.hints_delivered += one.hints_delivered;
        total.hints_expired += one.hints_expired;
        total.cut += one.cut;
        total.retried_around_cut += one.retried_around_cut;
    }
    assert!(total.reads > 0, "some reads completed and were checked");
    assert!(total.unavailable > 0, "some operations hit their deadline (messages dropped, a node down)");
    assert!(total.causal > 0, "some causal writes were acknowledged and checked");
    assert!(total.searches > 0, "some searches completed and were checked");
    assert!(total.searches_unavailable > 0, "some searches lost a part and failed by their deadline");
    assert!(total.waited > 0, "some coordinators waited for their clock before stamping");
    assert!(total.hints_dropped > 0, "some stand-ins had no room for a hint");
    assert!(total.hints_delivered > 0, "some hints were handed on to their owner once it was back");
    assert!(total.hints_expired > 0, "some hints passed their age while their owner was down");
    assert!(total.cut > 0 && total.retried_around_cut > 0, "some calls went around a node cut off from its peers");
}

/// With two of a key's three replicas down, a quorum write is unavailable
/// (one answer of two needed) and a write at `one` succeeds.
#[test]
fn two_replicas_down_quorum_is_unavailable_and_one_succeeds() {
    let mut quorum = Quorum::new(NodeId(1));
    let mut store = MapStore::default();
    let mut stamper = Stamper::new(NodeId(1), Hlc::ZERO, MAX_OFFSET_MS);
    let mut skew_refused = 0;
    let mut replica = Replica { store: &mut store, stamper: &mut stamper, wall_ms: 1, skew_refused: &mut skew_refused };
    let replicas = [NodeId(1), NodeId(2), NodeId(3)];
    let stamp = Stamper::new(NodeId(1), Hlc::ZERO, MAX_OFFSET_MS).next(1).unwrap();
    let sets = vec![(b"k".to_vec(), Siblings::one(stamp.blind(Some(b"v".to_vec()))))];
    for (consistency, expected) in [
        (Consistency::Quorum, Some(Outcome::Unavailable { answered: 1, needed: 2, asked: 3 })),
        (Consistency::One, None),
    ] {
        let (op, messages, _) = quorum.start_write(sets.clone(), vec![replicas.to_vec().into()], consistency, 10);
        let mut outcome = None;
        for (to, message) in messages {
            // Only node 1 is up.
            if to == NodeId(1) {
                let reply = replica_handle(&mut replica, message).unwrap();
                outcome = outcome.or(quorum.on_reply(to, reply).map(|(_, o)| o));
            }
        }
        let outcome = outcome.or_else(|| quorum.expire(11).into_iter().find(|(o, _)| *o == op).map(|(_, o)| o));
        assert_eq!(outcome, expected.or(Some(Outcome::Written)), "{consistency:?}");
    }
}
