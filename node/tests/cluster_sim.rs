//! A whole cluster in one process, deterministic: five nodes, three
//! replicas per key, the node's own rules (`quorum`, `placement`, `hints`,
//! `batchlog`, `scatter`, the clock's `Stamper`) driven over a network that
//! delays, reorders, drops and duplicates messages by a seeded generator,
//! with time passed in.
//!
//! Each node has a disk: what a replica takes (sets, hints, batches) is
//! durable only at its next sync, one to three milliseconds later, and the
//! answer that acknowledges it goes out only then. A crash loses what was
//! not durable and everything the node was doing (its clients see their
//! connection drop; messages to it, and some already sent by it, are lost);
//! it comes back with its disk and its clock's high-water mark.
//!
//! Half the histories are lossy: 10 % of messages lost, 5 % sent twice,
//! one node crashing at 1 s and back at 2 s, and a third of the bulk sets
//! crashing their coordinator (back 20 to 60 ms later) at a step chosen at
//! random: its own log written, durable, logged on two nodes, parts sent,
//! quorum reached, client answered. In the other half, nothing is lost
//! and from 1 s to 2 s one node is cut off from its peers while clients
//! still reach it, or (a third of them) two nodes are cut off from the
//! other three.
//!
//! Clients follow the
//! smart client's retry rule (`quiver_client::retry`): a call goes to the
//! key's replicas in ring order (some clients try another node first, and
//! only some know which node to avoid), on to the next after an attempt
//! that applied nothing (the node is down, its clock refused, it saw too
//! few replicas up) and, except for a causal write, after one that may
//! have (`Unconfirmed`). Blind writes go through any coordinator;
//! causal writes, with the context of an earlier (perhaps stale) read, are
//! coordinated by a replica of the key, which writes against its own
//! siblings and sends the resulting set; bulk sets of two or three keys
//! (out of four, so that they overlap) go through any node, are logged on
//! it and one other node (`batchlog::Logging`) before any replica gets its
//! part, and are replayed by a holder that still has them 100 ms later
//! (`batchlog::replay`). Every replica
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
//! after 150 ms. The cut heals at 2 s; in the histories with a cut no hint
//! is left at the end. After the clients stop, the cluster runs one more
//! second: no batch may be left in any log. Every failure prints its seed;
//! `QUIVER_SIM_SEED=N` replays one history, `QUIVER_SIM_HISTORIES=N` runs
//! more (from `QUIVER_SIM_FIRST`, default 0).
//!
//! Searches run as a cluster's do (`quiver_node::cluster::scatter`): the
//! coordinator plans which node searches which token ranges, each part
//! answers over the same network, the merged hits are checked against
//! quorum reads of their keys. Here a search looks for a digit in the
//! values, scored by how often it occurs.
//!
//! Checked: no replica refuses a timestamp its coordinator stamped (the
//! clock rules agree); every bulk set that any replica received a part of
//! is applied whole once the replicas converge (every key holds it or a
//! later write; so no two bulk sets end mixed), whether or not it was
//! acknowledged; with one node cut off from its peers, every call that
//! starts after the cut succeeds, and none has an attempt that waited for
//! its deadline (the cut-off node answers at once that too few replicas are
//! up); a quorum read that starts after a quorum write was acknowledged
//! returns that write or a later one (R + W > N); an operation that cannot
//! reach its quorum before its deadline fails as unavailable, with the
//! counts, and never hangs; once every message is delivered and the
//! nodes run anti-entropy rounds by the node's rule (`antientropy`: each
//! node's hash trees, kept as sets are merged, compared with each other
//! replica's, differing keys merged both ways), all replicas of a key hold
//! the same siblings and the same trees, a second round repairs nothing,
//! and each node's trees equal trees built afresh from its data;
//! and every acknowledged causal write is among them or made obsolete by
//! one of them (a later write whose context covered it). A search answers
//! at most k hits, one per key, best first, none older than a write of its
//! key acknowledged before the search began, or fails as unavailable by
//! its deadline; after convergence a search through any node returns
//! exactly the best k over every key.

use std::collections::{BTreeMap, BTreeSet};

use quiver_client::retry::{self, Attempts, Failure, Retries};
use quiver_node::cluster::antientropy::{self, leaf, Exchange, Step, Tree};
use quiver_node::cluster::batchlog::{self, Logged, Logging, Replay};
use quiver_node::cluster::quorum::{
    self, outcome_error, replica_handle, Consistency, DataMessage, Ending, Hinted, OpId, Outcome, Placement, Quorum,
    Refusal, ReplicaStore,
};
use quiver_node::cluster::scatter;
use quiver_node::cluster::{hints, placement};
use quiver_node::horizon::{self, Carried};
use quiver_ring::rand::SplitMix64;
use quiver_ring::ring::{Member, Ring, RingView, TokenRange};
use quiver_ring::wire::{SearchHit, ServerError};
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
/// A holder replays a batch still in its log this long after its stamp.
const BATCH_REPLAY_AFTER_MS: u64 = 100;
/// A coordinator logging a batch asks the next node too after this.
const LOG_HEDGE_AFTER_MS: u64 = 10;
/// How long the cluster runs on after its clients stop: batches replayed,
/// hints handed on.
const QUIET_MS: u64 = 1_000;
/// No batch is ever too old to replay here.
const GC_GRACE_MS: u64 = 1 << 40;
/// Keys a bulk set picks from (so that bulk sets overlap).
const BULK_KEYS: u64 = 4;

/// A safeguard of the cluster's rules that a history may run without, to
/// show that it matters ([`each_safeguard_matters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Safeguard {
    /// A replica answers a write only once it is durable.
    AckWhenDurable,
    /// A bulk set is logged on two nodes before any replica gets it.
    BatchLog,
    /// A holder replays a batch whose coordinator did not finish it.
    BatchReplay,
    /// Reads and writes at quorum overlap (R + W > N): without it, reads
    /// are at `one`.
    QuorumOverlap,
    /// A coordinator waits before stamping while a timestamp it saw is
    /// ahead of its clock.
    WaitBeforeStamp,
    /// A search keeps only hits whose value a quorum read finds current.
    StaleHits,
}

/// Sibling sets by key, as a write carries them.
type Sets = Vec<(Vec<u8>, Siblings)>;

/// The ring of the simulated nodes `n1`..`n{NODES}`.
fn ring_of_nodes() -> Ring {
    let member = |id: u64| Member {
        id: NodeId(id),
        name: format!("n{id}"),
        client_addr: String::new(),
        peer_addr: String::new(),
    };
    Ring::new(RingView { epoch: 1, members: (1..=NODES).map(member).collect() })
}

/// What a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    Blind(Consistency),
    /// With the context of the key's last read.
    Causal,
    Read,
    /// A bulk set of a few keys (each attempt picks its own).
    Bulk,
}

/// The steps of a bulk set at its coordinator, where it may crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum BulkStep {
    /// Its own log written (not yet durable), the first holder asked.
    Logging,
    /// Its own log durable.
    LoggedHere,
    /// Logged on two nodes, nothing sent to the replicas.
    Logged,
    /// The replicas' parts sent.
    Writing,
    /// The quorum reached, the client not answered.
    Written,
    /// The client answered, the holders told to remove it.
    Done,
}

impl BulkStep {
    const ALL: [BulkStep; 6] = [
        BulkStep::Logging,
        BulkStep::LoggedHere,
        BulkStep::Logged,
        BulkStep::Writing,
        BulkStep::Written,
        BulkStep::Done,
    ];
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
    failure_of_error(outcome_error(outcome, "operation", ending))
}

/// The client's classification of a node's `error`.
fn failure_of_error(error: ServerError) -> Failure {
    quiver_client::Error::Server { kind: error.kind, message: error.message }.failure()
}

/// A node's disk: a replica's sets, the hints it holds for others (each
/// owner's at most `hint_bytes_max` bytes of values), each with when it
/// was taken (its holder's wall clock), oldest first, and the batches it
/// holds. What is written goes first to `unsynced`, lost in a crash; a
/// sync makes it durable and only then sends the answers that acknowledge
/// it.
#[derive(Default)]
struct MapStore {
    sets: BTreeMap<Vec<u8>, Siblings>,
    hints: Vec<HeldHint>,
    /// Per `(coordinator, id)`, a batch held until it is applied.
    batches: BTreeMap<(NodeId, Hlc), Sets>,
    /// Written, not yet durable.
    unsynced: Vec<Record>,
    /// Answers waiting for the next sync.
    held: Vec<(NodeId, Message)>,
    next_hint: u64,
    hint_bytes_max: u64,
    hints_dropped: usize,
    /// Hints dropped past their age.
    hints_expired: usize,
    /// Hints their owner took.
    hints_delivered: usize,
    /// The ring its keys' replica sets come from, and per replica set the
    /// hash tree anti-entropy compares, kept as sets are merged (the node's
    /// rule: `antientropy::Tree`).
    ring: Option<Ring>,
    trees: BTreeMap<Vec<NodeId>, Tree>,
    /// Merges so far (the engine's sequence), and each key's last.
    seq: u64,
    written_seq: BTreeMap<Vec<u8>, u64>,
    /// The tombstone horizon peers' versions are held to (0: none is
    /// refused), and per replica set the sequence full exchanges covered.
    horizon_ms: u64,
    covered: BTreeMap<Vec<NodeId>, u64>,
}

/// A write not yet durable.
enum Record {
    Sets(Sets),
    Hint(HeldHint),
    Batch((NodeId, Hlc), Sets),
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
    /// What was written is durable: the answers that wait for it go out.
    fn sync(&mut self) -> Vec<(NodeId, Message)> {
        for record in std::mem::take(&mut self.unsynced) {
            match record {
                Record::Sets(sets) => self.merge_sets(sets),
                Record::Hint(hint) => self.hints.push(hint),
                Record::Batch(id, sets) => {
                    self.batches.insert(id, sets);
                }
            }
        }
        std::mem::take(&mut self.held)
    }

    /// The bytes of hints held for `owner`, durable or not.
    fn hint_bytes_for(&self, owner: NodeId) -> u64 {
        let unsynced = self.unsynced.iter().filter_map(|record| match record {
            Record::Hint(hint) => Some(hint),
            _ => None,
        });
        let held = self.hints.iter().chain(unsynced).map(|h| &h.hinted).filter(|h| h.owner == owner);
        held.map(|h| hint_bytes(&h.sets)).sum()
    }

    /// Merges `sets` in, durably (no refusal: the converged state, and a
    /// causal write's coordinator's own part, durable before it is sent).
    fn merge_sets(&mut self, sets: Sets) {
        self.seq += 1;
        for (key, siblings) in sets {
            let old = leaf(&key, self.sets.get(&key));
            let merged = self.sets.entry(key.clone()).or_default();
            merged.merge(siblings);
            let new = leaf(&key, Some(merged));
            let set = self.replica_set(&key);
            self.trees.entry(set).or_default().change(&key, old, new);
            self.written_seq.insert(key, self.seq);
        }
    }

    /// Merges a peer's `sets`, carried so, as the node does
    /// (`LocalStore::apply_replicated` and `apply_streamed`): versions past
    /// the horizon only as `horizon::takes` allows. Without `RefuseOld`, a
    /// message's are taken as a stream's; without `TakeOldTombstone`, an
    /// old tombstone never is.
    fn merge_replicated(&mut self, sets: Sets, carried: Carried, without: Option<PurgeSafeguard>) {
        let mut taken = Vec::new();
        for (key, siblings) in sets {
            let held = self.sets.get(&key);
            let carried = match without {
                Some(PurgeSafeguard::RefuseOld) => Carried::Stream,
                _ => carried,
            };
            let kept: Vec<Version> = siblings
                .into_versions()
                .into_iter()
                .filter(|v| match without {
                    Some(PurgeSafeguard::TakeOldTombstone)
                        if v.is_tombstone() && horizon::below(v, self.horizon_ms) =>
                    {
                        false
                    }
                    _ => horizon::takes(v, self.horizon_ms, carried, held),
                })
                .collect();
            if !kept.is_empty() {
                taken.push((key, Siblings::from_versions(kept)));
            }
        }
        if !taken.is_empty() {
            self.merge_sets(taken);
        }
    }

    /// Compaction's purge: every deleted key past the horizon whose replica
    /// set full exchanges covered (without `Covered`: past the horizon
    /// alone). Returns the tombstones purged.
    fn purge(&mut self, without: Option<PurgeSafeguard>) -> Vec<(Vec<u8>, Version)> {
        let mut purged = Vec::new();
        let keys: Vec<Vec<u8>> = self.sets.keys().cloned().collect();
        for key in keys {
            let siblings = &self.sets[&key];
            let covered = self.covered.get(&self.replica_set(&key)).copied();
            let covered = without == Some(PurgeSafeguard::Covered)
                || horizon::covered(self.written_seq.get(&key).copied().unwrap_or(0), covered);
            if horizon::expired(siblings, self.horizon_ms) && covered {
                let siblings = self.sets.remove(&key).expect("a key held");
                let set = self.replica_set(&key);
                self.trees.entry(set).or_default().change(&key, leaf(&key, Some(&siblings)), 0);
                purged.extend(siblings.into_versions().into_iter().map(|v| (key.clone(), v)));
            }
        }
        purged
    }

    /// The nodes that replicate `key`, in id order.
    fn replica_set(&self, key: &[u8]) -> Vec<NodeId> {
        let mut set = self.ring.as_ref().expect("a store knows its ring").preference_list(key, N);
        set.sort_unstable();
        set
    }

    /// Its tree of `set`'s keys.
    fn tree(&self, set: &[NodeId]) -> Tree {
        self.trees.get(set).cloned().unwrap_or_default()
    }

    /// Its keys of `set` in `segments`, with their leaves.
    fn list(&self, set: &[NodeId], segments: &[antientropy::Segment]) -> Vec<(Vec<u8>, u64)> {
        let listed = self.sets.iter().filter(|(key, _)| segments.contains(&antientropy::segment_of(key)));
        let listed = listed.filter(|(key, _)| self.replica_set(key) == set);
        listed.map(|(key, siblings)| (key.clone(), leaf(key, Some(siblings)))).filter(|(_, l)| *l != 0).collect()
    }

    /// Its trees, built afresh from what it holds.
    fn rebuilt_trees(&self) -> BTreeMap<Vec<NodeId>, Tree> {
        let mut trees: BTreeMap<Vec<NodeId>, Tree> = BTreeMap::new();
        for (key, siblings) in &self.sets {
            trees.entry(self.replica_set(key)).or_default().change(key, 0, leaf(key, Some(siblings)));
        }
        trees
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
    tally: &'a mut Tally,
}

/// What replicas saw, for the checks.
#[derive(Default)]
struct Tally {
    /// Writes a replica refused as too far ahead of its clock.
    skew_refused: usize,
    /// Bulk sets some replica received a part of (by number).
    bulk_reached: BTreeSet<u64>,
}

impl Replica<'_> {
    /// `node` as the replica of what arrives at `now`.
    fn of<'a>(node: &'a mut Node, now: u64, tally: &'a mut Tally) -> Replica<'a> {
        let wall_ms = now + node.offset_ms;
        Replica { store: &mut node.store, stamper: &mut node.stamper, wall_ms, tally }
    }
}

/// The bulk set a value was written by: its number, from `bulk#N key`.
fn bulk_of(value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(b"bulk#")?;
    let end = rest.iter().position(|&b| b == b' ')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

impl ReplicaStore for Replica<'_> {
    fn merge(&mut self, sets: Sets, hinted: Vec<Hinted>) -> Result<Vec<NodeId>, Refusal> {
        let versions = sets.iter().chain(hinted.iter().flat_map(|h| &h.sets)).flat_map(|(_, s)| s.versions());
        for version in versions {
            if self.stamper.observe(version.hlc, self.wall_ms).is_err() {
                self.tally.skew_refused += 1;
                return Err(Refusal);
            }
        }
        let all = sets.iter().chain(hinted.iter().flat_map(|h| &h.sets));
        let values = all.flat_map(|(_, s)| s.versions()).filter_map(|v| v.value.as_deref());
        self.tally.bulk_reached.extend(values.filter_map(bulk_of));
        self.store.unsynced.push(Record::Sets(sets));
        let mut dropped = Vec::new();
        for hint in hinted {
            let queued = self.store.hint_bytes_for(hint.owner);
            if hints::fits(queued, hint_bytes(&hint.sets), self.store.hint_bytes_max) {
                self.store.next_hint += 1;
                let id = self.store.next_hint;
                self.store.unsynced.push(Record::Hint(HeldHint { id, taken_ms: self.wall_ms, hinted: hint }));
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
    /// Bulk sets this node coordinates that are being logged, by id.
    bulks: BTreeMap<Hlc, Bulk>,
    /// Batches this node is replaying.
    replaying: BTreeSet<(NodeId, Hlc)>,
    /// Rises at every crash: messages to or from an earlier one are lost
    /// (its connections are gone).
    incarnation: u32,
    /// When its disk next syncs what was written.
    next_sync: u64,
}

/// A bulk set being logged at its coordinator.
struct Bulk {
    logging: Logging,
    sets: Sets,
    call: u64,
    /// Its number, in its values.
    no: u64,
    /// Where its coordinator crashes, if it does.
    crash_at: Option<BulkStep>,
}

/// A search in progress at its coordinator.
struct Search {
    digit: u8,
    deadline: u64,
    /// Parts not answered yet, then hits whose keys are being read.
    waiting: usize,
    /// The nodes whose part answered (a duplicate counts once).
    answered: Vec<NodeId>,
    /// The parts' hits, then the merged best k.
    hits: Vec<SearchHit>,
    /// Per merged hit, the value a quorum read found (once all answered).
    current: Vec<Option<Option<Vec<u8>>>>,
    /// Per key, the highest order acknowledged before the search began.
    acked_before: BTreeMap<Vec<u8>, Order>,
    checking: bool,
}

/// What travels besides the quorum logic's messages: search parts, hints
/// handed on, the batch log.
#[derive(Clone)]
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
        sets: Sets,
        ids: Vec<u64>,
    },
    /// The owner has them durable.
    HandedOff {
        ids: Vec<u64>,
    },
    /// Log the sender's batch `id`.
    LogBatch {
        id: Hlc,
        sets: Sets,
    },
    /// The sender has batch `id` durable in its log.
    BatchLogged {
        id: Hlc,
    },
    /// The sender's batch `id` is applied.
    BatchDone {
        id: Hlc,
    },
}

/// A bulk set made: its keys and its version's order.
struct BulkMade {
    keys: Vec<Vec<u8>>,
    order: Order,
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
    /// A bulk set's quorum write: number `no`, logged on `holders`.
    Bulk {
        no: u64,
        holders: Vec<NodeId>,
        call: u64,
        crash_at: Option<BulkStep>,
    },
    /// A holder's replay of `batch`.
    Replay {
        batch: (NodeId, Hlc),
    },
}

/// A write to start at `at`: its coordinator waits for its clock before
/// stamping it ([`Stamper::wait_before_stamp_ms`]).
struct Deferred {
    at: u64,
    coordinator: NodeId,
    key: Vec<u8>,
    /// Blind, causal (with the context of the key's last read) or bulk.
    kind: CallKind,
    call: u64,
}

struct InFlight {
    at: u64,
    from: NodeId,
    to: NodeId,
    /// The incarnations of sender and receiver when it was sent.
    incarnations: (u32, u32),
    message: Message,
}

struct Sim {
    rng: SplitMix64,
    now: u64,
    nodes: BTreeMap<NodeId, Node>,
    ring: Ring,
    network: Vec<InFlight>,
    dropped: Vec<InFlight>,
    /// The nodes crashed, and when each comes back.
    down: BTreeMap<NodeId, u64>,
    /// Nodes cut off from the others (clients still reach them), and when.
    cut: Option<(Vec<NodeId>, u64)>,
    /// Messages are lost and duplicated at random, nodes crash (not in the
    /// histories with a cut).
    lossy: bool,
    /// A node was cut off from its peers in this history.
    had_cut: bool,
    /// The cut has one node on its side, and there is no other fault:
    /// every call must go around it.
    single_cut: bool,
    /// Bulk sets' coordinators crash at a chosen step.
    bulk_crashes: bool,
    /// Crashes of a bulk set's coordinator, per step.
    crashed_at: BTreeMap<BulkStep, usize>,
    /// Every bulk set made, by number.
    bulks: BTreeMap<u64, BulkMade>,
    next_bulk: u64,
    bulks_acked: usize,
    /// Batches replayed by a holder.
    replayed: usize,
    /// Keys anti-entropy repaired once the cluster converged.
    anti_entropy_repaired: usize,
    /// Replays start (not once the cluster stops, at the very end).
    replays_on: bool,
    crashes: usize,
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
    tally: Tally,
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
    /// The safeguard this history runs without, if any.
    without: Option<Safeguard>,
}

impl Sim {
    fn new(seed: u64, without: Option<Safeguard>) -> Sim {
        let mut rng = SplitMix64::new(seed);
        // Half the histories keep no hints at all: every hint is dropped.
        let hint_bytes_max = if rng.chance(0.5) { 0 } else { 1 << 20 };
        let lossy = rng.chance(0.5);
        let ring = ring_of_nodes();
        let hint_age_ms = if rng.chance(0.25) { HINT_AGE_SHORT_MS } else { u64::MAX };
        let nodes = (1..=NODES)
            .map(|id| {
                let node = Node {
                    quorum: Quorum::new(NodeId(id)),
                    store: MapStore { hint_bytes_max, ring: Some(ring.clone()), ..MapStore::default() },
                    stamper: Stamper::new(NodeId(id), Hlc::ZERO, MAX_OFFSET_MS),
                    offset_ms: rng.between(0, MAX_OFFSET_MS / 2 - 1),
                    ops: BTreeMap::new(),
                    searches: BTreeMap::new(),
                    handing_off: BTreeMap::new(),
                    bulks: BTreeMap::new(),
                    replaying: BTreeSet::new(),
                    incarnation: 0,
                    next_sync: 0,
                };
                (NodeId(id), node)
            })
            .collect();
        Sim {
            rng,
            now: 1_000,
            nodes,
            ring,
            network: Vec::new(),
            dropped: Vec::new(),
            down: BTreeMap::new(),
            cut: None,
            lossy,
            had_cut: false,
            single_cut: false,
            bulk_crashes: lossy,
            crashed_at: BTreeMap::new(),
            bulks: BTreeMap::new(),
            next_bulk: 0,
            bulks_acked: 0,
            replayed: 0,
            anti_entropy_repaired: 0,
            replays_on: true,
            crashes: 0,
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
            tally: Tally::default(),
            clock_refused: 0,
            waited: 0,
            unavailable: 0,
            reads_checked: 0,
            written: BTreeMap::new(),
            next_search: 0,
            searches_checked: 0,
            searches_unavailable: 0,
            seed,
            without,
        }
    }

    fn send(&mut self, from: NodeId, messages: Vec<(NodeId, DataMessage)>) {
        let messages = messages.into_iter().map(|(to, message)| (to, Message::Data(message))).collect();
        self.send_messages(from, messages);
    }

    fn send_messages(&mut self, from: NodeId, messages: Vec<(NodeId, Message)>) {
        for (to, message) in messages {
            let incarnation = |id: NodeId| self.nodes.get(&id).map_or(0, |node| node.incarnation);
            let incarnations = (incarnation(from), incarnation(to));
            if from != to && self.lossy && self.rng.chance(0.05) {
                // Sent twice.
                let at = self.now + self.rng.between(0, 15);
                self.network.push(InFlight { at, from, to, incarnations, message: message.clone() });
            }
            let at = self.now + self.rng.between(0, 15);
            let flight = InFlight { at, from, to, incarnations, message };
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
        let done = match done {
            Op::Bulk { no, holders, call, crash_at, .. } => {
                return self.bulk_applied(coordinator, no, holders, call, crash_at, outcome)
            }
            Op::Replay { batch } => return self.replay_ended(coordinator, batch, outcome),
            other => other,
        };
        let call = match &done {
            Op::Write { call, .. } => Some((*call, Ending::Write)),
            // Its coordinator's own copy was written before any was sent.
            Op::Causal { call, .. } => Some((*call, Ending::Written)),
            Op::Read { call, .. } => Some((*call, Ending::Read)),
            Op::SearchRead { .. } | Op::Bulk { .. } | Op::Replay { .. } => None,
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

    /// The nodes `node` sees down: those crashed, and those cut off from
    /// it.
    fn down_seen_by(&self, node: NodeId) -> Vec<NodeId> {
        let crashed = self.down.keys().copied();
        match &self.cut {
            Some((side, _)) => {
                let across = self.nodes.keys().copied().filter(|id| side.contains(id) != side.contains(&node));
                let mut down: Vec<NodeId> = crashed.chain(across).collect();
                down.sort();
                down.dedup();
                down
            }
            None => crashed.collect(),
        }
    }

    fn is_down(&self, node: NodeId) -> bool {
        self.down.contains_key(&node)
    }

    /// `node` crashes: what it had not made durable is lost, and all it
    /// was doing (its clients see their connection drop); it comes back
    /// at `back_at` with what is on its disk.
    fn crash(&mut self, id: NodeId, back_at: u64) {
        self.crashes += 1;
        self.down.insert(id, back_at);
        let node = self.nodes.get_mut(&id).expect("a node");
        node.incarnation += 1;
        node.store.unsynced.clear();
        node.store.held.clear();
        node.quorum = Quorum::new(id);
        // The clock starts above its persisted high-water mark.
        node.stamper = Stamper::new(id, node.stamper.last(), MAX_OFFSET_MS);
        node.searches.clear();
        node.handing_off.clear();
        node.replaying.clear();
        let ops = std::mem::take(&mut node.ops);
        let bulks = std::mem::take(&mut node.bulks);
        for op in ops.into_values() {
            match op {
                Op::Write { call, .. } | Op::Causal { call, .. } | Op::Bulk { call, .. } => {
                    self.call_failed(call, Failure::InDoubt)
                }
                Op::Read { call, .. } => self.call_failed(call, Failure::NotApplied),
                Op::SearchRead { .. } | Op::Replay { .. } => {}
            }
        }
        for bulk in bulks.into_values() {
            self.call_failed(bulk.call, Failure::InDoubt);
        }
    }

    /// A bulk set's coordinator reached `step`: it crashes there if that
    /// is where it was to (back 20 to 60 ms later).
    fn crash_at(&mut self, coordinator: NodeId, crash_at: Option<BulkStep>, step: BulkStep) -> bool {
        if crash_at != Some(step) || self.is_down(coordinator) {
            return false;
        }
        *self.crashed_at.entry(step).or_default() += 1;
        let back_at = self.now + self.rng.between(20, 60);
        self.crash(coordinator, back_at);
        true
    }

    /// A client's call: to the key's replicas in ring order, those its
    /// ring says to avoid last (half the clients know the node cut off),
    /// and for half the blind writes and reads `first` before them (a
    /// client sending to the node it is connected to); a causal write
    /// starts at a random replica.
    fn start_call(&mut self, first: NodeId, key: Vec<u8>, kind: CallKind) {
        let cut = self.cut.as_ref().map(|(side, _)| side.clone()).unwrap_or_default();
        let avoid: Vec<NodeId> = if self.rng.chance(0.5) { cut } else { Vec::new() };
        let mut targets = retry::order(self.ring.preference_list(&key, N), &avoid);
        match kind {
            // Any node coordinates a bulk set: a random one first.
            CallKind::Bulk => {
                targets = retry::order(self.nodes.keys().copied().collect(), &avoid);
                targets.rotate_left(self.rng.between(0, NODES - 1) as usize);
            }
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
        if self.is_down(target) {
            // The client cannot connect.
            return self.call_failed(call, Failure::NotApplied);
        }
        let at = self.now;
        match kind {
            CallKind::Blind(_) | CallKind::Causal | CallKind::Bulk => {
                self.start_write(Deferred { at, coordinator: target, key, kind, call })
            }
            CallKind::Read => {
                let acked_before = self.acked.get(&key).copied();
                let placement = self.placement(&key, target, false);
                let node = self.nodes.get_mut(&target).expect("a target is a node");
                let consistency = match self.without {
                    Some(Safeguard::QuorumOverlap) => Consistency::One,
                    _ => Consistency::Quorum,
                };
                let started = node.quorum.start_read(&key, &placement, consistency, at + DEADLINE_MS);
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
        let after_cut = self.single_cut && self.cut.as_ref().is_some_and(|(_, at)| this.started > *at);
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
        let now = self.now;
        self.down.retain(|_, back_at| *back_at > now);
        // Each node syncs every one to three steps.
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            let node = &self.nodes[&id];
            if !self.is_down(id) && node.next_sync <= now {
                let next_sync = now + self.rng.between(1, 3);
                let node = self.nodes.get_mut(&id).expect("a node");
                node.next_sync = next_sync;
                let answers = node.store.sync();
                self.send_messages(id, answers);
            }
        }
        // Deferred writes whose wait is over start (once the clients stop,
        // they give up).
        let now = self.now;
        let (due, later): (Vec<Deferred>, Vec<Deferred>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|d| d.at <= now);
        self.deferred = later;
        for write in due {
            match new_ops && !self.is_down(write.coordinator) {
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
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            let due: Vec<Hlc> = self.nodes[&id]
                .bulks
                .iter()
                .filter(|(_, b)| b.logging.timer().is_some_and(|at| at <= now))
                .map(|(&id, _)| id)
                .collect();
            for bulk in due {
                let Some(running) = self.nodes.get_mut(&id).and_then(|node| node.bulks.get_mut(&bulk)) else {
                    continue;
                };
                let (ask, ended) = running.logging.tick(now);
                self.bulk_logging(id, bulk, ask, ended);
            }
        }
        if self.now.is_multiple_of(HINT_TICK_MS) {
            for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                self.hand_off(id);
                self.replay_batches(id);
            }
        }
        if new_ops && self.rng.chance(0.5) {
            let coordinator = NodeId(self.rng.between(1, NODES));
            if !self.is_down(coordinator) {
                self.start_op(coordinator);
            }
        }
    }

    /// A hint tick at `holder`: for each owner, what [`hints::handoff`]
    /// says, as the node does it (hints past their age dropped, the others
    /// sent to an owner that is up and removed once it has them).
    fn hand_off(&mut self, holder: NodeId) {
        if self.is_down(holder) {
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
        let incarnation = |id: NodeId| self.nodes.get(&id).map_or(0, |node| node.incarnation);
        let (from, to) = (incarnation(flight.from), incarnation(flight.to));
        // Lost with the connection of a node that crashed; from one that
        // crashed after sending it, it may have left already.
        if self.is_down(flight.to) || flight.incarnations.1 != to {
            return;
        }
        if flight.incarnations.0 != from && self.rng.chance(0.5) {
            return;
        }
        let across_the_cut =
            self.cut.as_ref().is_some_and(|(side, _)| side.contains(&flight.from) != side.contains(&flight.to));
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
            Message::SearchHits { search, hits } => {
                return self.search_part_answered(flight.to, flight.from, search, hits)
            }
            Message::Handoff { sets, ids } => {
                let mut replica = Replica::of(node, self.now, &mut self.tally);
                if replica.merge(sets, Vec::new()).is_ok() {
                    node.store.held.push((flight.from, Message::HandedOff { ids }));
                }
                return;
            }
            Message::LogBatch { id, sets } => {
                node.store.unsynced.push(Record::Batch((flight.from, id), sets));
                node.store.held.push((flight.from, Message::BatchLogged { id }));
                return;
            }
            Message::BatchLogged { id } => {
                let Some(bulk) = node.bulks.get_mut(&id) else { return };
                let (ask, ended) = match flight.from == flight.to {
                    true => {
                        let ended = bulk.logging.logged_here(Ok(()));
                        let crash_at = bulk.crash_at;
                        if self.crash_at(flight.to, crash_at, BulkStep::LoggedHere) {
                            return;
                        }
                        (Vec::new(), ended)
                    }
                    false => bulk.logging.answered(flight.from, Ok(()), self.now),
                };
                return self.bulk_logging(flight.to, id, ask, ended);
            }
            Message::BatchDone { id } => {
                node.store.batches.remove(&(flight.from, id));
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
                let write = matches!(message, DataMessage::Write { .. });
                let mut replica = Replica::of(node, self.now, &mut self.tally);
                match replica_handle(&mut replica, message) {
                    // A write's answer waits until it is durable.
                    Some(reply) if write && self.without != Some(Safeguard::AckWhenDurable) => {
                        node.store.held.push((flight.from, Message::Data(reply)))
                    }
                    Some(reply) => self.send(flight.to, vec![(flight.from, reply)]),
                    None => {}
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
        let kind = match self.rng.between(0, 5) {
            // Some writes at `any`: a hint may be all that holds them.
            0 | 1 if self.rng.chance(0.2) => CallKind::Blind(Consistency::Any),
            0 | 1 => CallKind::Blind(Consistency::Quorum),
            2 => CallKind::Causal,
            3 => CallKind::Bulk,
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
        let seen = if write.kind == CallKind::Causal { seen.max(context.max_hlc) } else { seen };
        if node.stamper.check(seen, wall_ms).is_err() {
            self.clock_refused += 1;
            return self.call_failed(write.call, Failure::NotApplied);
        }
        let wait_ms = node.stamper.wait_before_stamp_ms(seen, wall_ms);
        if wait_ms > 0 && self.without != Some(Safeguard::WaitBeforeStamp) {
            self.waited += 1;
            return self.deferred.push(Deferred { at: self.now + wait_ms, ..write });
        }
        node.stamper.observe(seen, wall_ms).expect("checked");
        let stamp = node.stamper.next(wall_ms).expect("within the offset after the wait");
        let deadline = self.now + DEADLINE_MS;
        let consistency = match write.kind {
            CallKind::Blind(consistency) => consistency,
            CallKind::Causal => {
                let version = stamp.causal(context, None);
                return self.start_causal(write.coordinator, write.key, version, deadline, write.call);
            }
            CallKind::Bulk => return self.start_bulk(write.coordinator, stamp, write.call),
            CallKind::Read => unreachable!("a read is not written"),
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

    /// A bulk set of a few keys through `coordinator`, stamped `stamp`:
    /// logged on two nodes as [`batchlog::Logging`] says (its own log
    /// durable at its next sync), then written at quorum. In the histories
    /// with crashes, a third of them crash their coordinator at a step
    /// chosen at random.
    fn start_bulk(&mut self, coordinator: NodeId, stamp: quiver_ring::Stamp, call: u64) {
        let no = self.next_bulk;
        self.next_bulk += 1;
        let mut keys: Vec<Vec<u8>> = (0..BULK_KEYS).map(|k| format!("key-{k}").into_bytes()).collect();
        keys.rotate_left(self.rng.between(0, BULK_KEYS - 1) as usize);
        keys.truncate(self.rng.between(2, 3) as usize);
        let sets: Sets = keys
            .iter()
            .map(|key| {
                let value = format!("bulk#{no} {}", String::from_utf8_lossy(key)).into_bytes();
                (key.clone(), Siblings::one(stamp.blind(Some(value))))
            })
            .collect();
        let order = sets[0].1.winner().expect("one version").order();
        for (_, set) in &sets {
            self.written.insert(set.winner().and_then(|v| v.value.clone()).unwrap_or_default(), order);
        }
        self.bulks.insert(no, BulkMade { keys: keys.clone(), order });
        let placements: Vec<Placement> = keys.iter().map(|key| self.placement(key, coordinator, false)).collect();
        // Before a bulk set is logged: then nothing was written.
        if let Some(outcome) = quorum::unreachable(&placements, Consistency::Quorum) {
            return self.call_failed(call, failure_of(outcome, Ending::Write));
        }
        let crash_at = (self.bulk_crashes && self.rng.chance(0.3))
            .then(|| BulkStep::ALL[self.rng.between(0, BulkStep::ALL.len() as u64 - 1) as usize]);
        let id = stamp.hlc;
        let (now, down) = (self.now, self.down_seen_by(coordinator));
        let ring_order = self.ring.preference_list(&keys[0], NODES as usize);
        let deadline = now + DEADLINE_MS;
        let (logging, ask) = Logging::start(coordinator, ring_order, &down, now, LOG_HEDGE_AFTER_MS, deadline);
        let node = self.nodes.get_mut(&coordinator).expect("a coordinator is a node");
        if self.without == Some(Safeguard::BatchLog) {
            // Straight to the replicas.
            node.bulks.insert(id, Bulk { logging, sets, call, no, crash_at });
            return self.bulk_logging(coordinator, id, Vec::new(), Some(Logged::Both { holders: vec![] }));
        }
        node.store.unsynced.push(Record::Batch((coordinator, id), sets.clone()));
        node.store.held.push((coordinator, Message::BatchLogged { id }));
        node.bulks.insert(id, Bulk { logging, sets, call, no, crash_at });
        self.bulk_logging(coordinator, id, ask, None);
        self.crash_at(coordinator, crash_at, BulkStep::Logging);
    }

    /// What logging bulk set `id` at `coordinator` said to do: ask other
    /// nodes; once it ended, fail the call or apply the batch at quorum.
    fn bulk_logging(&mut self, coordinator: NodeId, id: Hlc, ask: Vec<NodeId>, ended: Option<Logged>) {
        let Some(node) = self.nodes.get_mut(&coordinator) else { return };
        let Some(bulk) = node.bulks.get(&id) else { return };
        let asks = ask.into_iter().map(|to| (to, Message::LogBatch { id, sets: bulk.sets.clone() })).collect();
        self.send_messages(coordinator, asks);
        let holders = match ended {
            None => return,
            Some(Logged::Both { holders }) => holders,
            Some(Logged::Failed(error)) => {
                let bulk = self.nodes.get_mut(&coordinator).and_then(|node| node.bulks.remove(&id)).expect("running");
                return self.call_failed(bulk.call, failure_of_error(error));
            }
        };
        let Bulk { sets, call, no, crash_at, .. } =
            self.nodes.get_mut(&coordinator).and_then(|node| node.bulks.remove(&id)).expect("running");
        if self.crash_at(coordinator, crash_at, BulkStep::Logged) {
            return self.call_failed(call, Failure::InDoubt);
        }
        let placements: Vec<Placement> = sets.iter().map(|(key, _)| self.placement(key, coordinator, false)).collect();
        let node = self.nodes.get_mut(&coordinator).expect("a coordinator is a node");
        let deadline = self.now + DEADLINE_MS;
        let (op, messages, done) = node.quorum.start_write(sets, placements, Consistency::Quorum, deadline);
        node.ops.insert(op, Op::Bulk { no, holders, call, crash_at });
        self.send(coordinator, messages);
        if self.crash_at(coordinator, crash_at, BulkStep::Writing) {
            return;
        }
        if let Some(outcome) = done {
            self.finish(coordinator, op, outcome);
        }
    }

    /// Bulk set `no`'s quorum write ended: once written, the client is
    /// answered and every holder removes it from its log.
    fn bulk_applied(
        &mut self,
        coordinator: NodeId,
        no: u64,
        holders: Vec<NodeId>,
        call: u64,
        crash_at: Option<BulkStep>,
        outcome: Outcome,
    ) {
        if outcome != Outcome::Written {
            // In its holders' logs: it may still be applied.
            return self.call_failed(call, failure_of(outcome, Ending::Written));
        }
        if self.crash_at(coordinator, crash_at, BulkStep::Written) {
            return self.call_failed(call, Failure::InDoubt);
        }
        let made = &self.bulks[&no];
        for key in &made.keys {
            let best = self.acked.entry(key.clone()).or_insert(made.order);
            *best = (*best).max(made.order);
        }
        self.client_hlc = self.client_hlc.max(made.order.0);
        let id = made.order.0;
        self.bulks_acked += 1;
        self.call_ended(call, true);
        let node = self.nodes.get_mut(&coordinator).expect("a coordinator is a node");
        node.store.batches.remove(&(coordinator, id));
        let others = holders.into_iter().filter(|&holder| holder != coordinator);
        self.send_messages(coordinator, others.map(|holder| (holder, Message::BatchDone { id })).collect());
        self.crash_at(coordinator, crash_at, BulkStep::Done);
    }

    /// A hint tick at `holder`: each batch in its log that [`batchlog::replay`]
    /// says is due, and is not being replayed already, is written at quorum
    /// again as its coordinator would.
    fn replay_batches(&mut self, holder: NodeId) {
        if self.is_down(holder) || !self.replays_on || self.without == Some(Safeguard::BatchReplay) {
            return;
        }
        let node = &self.nodes[&holder];
        let wall_ms = self.now + node.offset_ms;
        let due: Vec<((NodeId, Hlc), Sets)> = node
            .store
            .batches
            .iter()
            .filter(|(batch, _)| !node.replaying.contains(batch))
            .filter(|((_, id), _)| {
                batchlog::replay(id.physical_ms(), wall_ms, BATCH_REPLAY_AFTER_MS, GC_GRACE_MS) == Replay::Apply
            })
            .map(|(batch, sets)| (*batch, sets.clone()))
            .collect();
        for (batch, sets) in due {
            let placements: Vec<Placement> = sets.iter().map(|(key, _)| self.placement(key, holder, false)).collect();
            let node = self.nodes.get_mut(&holder).expect("a holder is a node");
            node.replaying.insert(batch);
            let deadline = self.now + DEADLINE_MS;
            let (op, messages, done) = node.quorum.start_write(sets, placements, Consistency::Quorum, deadline);
            node.ops.insert(op, Op::Replay { batch });
            self.send(holder, messages);
            if let Some(outcome) = done {
                self.finish(holder, op, outcome);
            }
        }
    }

    /// A replay ended: once written, the batch leaves the holder's log.
    fn replay_ended(&mut self, holder: NodeId, batch: (NodeId, Hlc), outcome: Outcome) {
        let node = self.nodes.get_mut(&holder).expect("a holder is a node");
        node.replaying.remove(&batch);
        if outcome == Outcome::Written {
            node.store.batches.remove(&batch);
            self.replayed += 1;
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
            answered: Vec::new(),
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
    fn search_part_answered(&mut self, coordinator: NodeId, from: NodeId, search: u64, hits: Vec<SearchHit>) {
        let Some(node) = self.nodes.get_mut(&coordinator) else { return };
        // One that ended (its deadline passed) is answered no more.
        let Some(running) = node.searches.get_mut(&search) else { return };
        if running.checking || running.answered.contains(&from) {
            return;
        }
        running.answered.push(from);
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
        let answer = match self.without {
            Some(Safeguard::StaleHits) => running.hits,
            _ => scatter::keep_current(running.hits, current),
        };
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

    /// One anti-entropy round, run to its end with the network healed:
    /// each node, with each other replica of each set it holds keys of, an
    /// exchange (`antientropy::Exchange`), the other side answering by the
    /// node's rule (`antientropy::answer`), each differing key's sibling
    /// sets merged both ways.
    fn anti_entropy_round(&mut self) -> Round {
        let mut stores: BTreeMap<NodeId, MapStore> =
            self.nodes.iter_mut().map(|(&id, node)| (id, std::mem::take(&mut node.store))).collect();
        let ids: Vec<NodeId> = stores.keys().copied().collect();
        let mut round = Round::default();
        for a in ids {
            let one = node_round(&mut stores, a, &[], None);
            round.keys += one.keys;
            round.failed += one.failed;
        }
        for (id, store) in stores {
            self.nodes.get_mut(&id).expect("a node").store = store;
        }
        round
    }

    /// The node that was down is back and gets its hints; everything else
    /// is delivered (the dropped messages too, as retries will), then
    /// anti-entropy rounds bring every replica of every key to the same
    /// siblings.
    fn converge(&mut self) {
        let mut rest: Vec<InFlight> = std::mem::take(&mut self.network);
        rest.append(&mut self.dropped);
        self.down.clear();
        self.cut = None;
        for node in self.nodes.values_mut() {
            node.store.sync();
        }
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
        // Anti-entropy, by the node's rule: every node exchanges with each
        // other replica of each set it holds keys of; a second round then
        // repairs nothing, and the trees kept as sets were merged are
        // those of the data.
        let repaired = self.anti_entropy_round();
        assert!(repaired.failed == 0, "seed {}: an exchange failed", self.seed);
        let again = self.anti_entropy_round();
        assert_eq!(again.keys, 0, "seed {}: a second anti-entropy round repaired keys", self.seed);
        self.anti_entropy_repaired = repaired.keys;
        for (id, node) in &self.nodes {
            let kept: BTreeMap<_, _> = node.store.trees.iter().filter(|(_, t)| t.keys() > 0).collect();
            let rebuilt = node.store.rebuilt_trees();
            let rebuilt: BTreeMap<_, _> = rebuilt.iter().filter(|(_, t)| t.keys() > 0).collect();
            assert_eq!(kept, rebuilt, "seed {}: node {}'s trees are not those of its data", self.seed, id.0);
        }
        for k in 0..KEYS {
            let key = format!("key-{k}").into_bytes();
            let replicas = self.ring.preference_list(&key, N);
            let set = self.nodes[&replicas[0]].store.replica_set(&key);
            let tree = self.nodes[&replicas[0]].store.tree(&set);
            for id in &replicas {
                assert_eq!(self.nodes[id].store.tree(&set), tree, "seed {}: trees of {set:?} differ", self.seed);
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
            // Every bulk set some replica got a part of is applied whole:
            // every key holds it or a later write (so no two are mixed).
            for (no, made) in
                self.bulks.iter().filter(|(no, made)| self.tally.bulk_reached.contains(no) && made.keys.contains(&key))
            {
                let winner = first.as_ref().and_then(Siblings::winner).map(|v| v.order());
                assert!(
                    winner.is_some_and(|w| w >= made.order),
                    "seed {}: bulk set {no} is half applied: {key:?} holds {winner:?}",
                    self.seed
                );
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
    bulks_acked: usize,
    /// Bulk sets some replica got a part of (each checked all or nothing).
    bulks_reached: usize,
    /// Batches a holder replayed.
    replayed: usize,
    /// Keys anti-entropy found different and repaired.
    anti_entropy_repaired: usize,
    crashes: usize,
    /// Crashes of a bulk set's coordinator, per step.
    crashed_at: BTreeMap<BulkStep, usize>,
    /// Histories with a node cut off, and the retries their clients made.
    cut: usize,
    retried_around_cut: u64,
}

impl Checked {
    fn add(&mut self, one: Checked) {
        self.reads += one.reads;
        self.unavailable += one.unavailable;
        self.causal += one.causal;
        self.searches += one.searches;
        self.searches_unavailable += one.searches_unavailable;
        self.waited += one.waited;
        self.hints_dropped += one.hints_dropped;
        self.hints_delivered += one.hints_delivered;
        self.hints_expired += one.hints_expired;
        self.bulks_acked += one.bulks_acked;
        self.bulks_reached += one.bulks_reached;
        self.replayed += one.replayed;
        self.anti_entropy_repaired += one.anti_entropy_repaired;
        self.crashes += one.crashes;
        for (step, n) in one.crashed_at {
            *self.crashed_at.entry(step).or_default() += n;
        }
        self.cut += one.cut;
        self.retried_around_cut += one.retried_around_cut;
    }

    fn report(&self) {
        eprintln!(
            "checked: {} quorum reads, {} causal writes, {} searches; {} operations unavailable; {} bulk sets \
             acknowledged, {} reached a replica, {} replayed; {} crashes ({:?} at bulk steps); hints {} dropped, {} \
             delivered, {} expired; {} histories with a cut, {} calls retried around it; {} keys repaired by \
             anti-entropy",
            self.reads,
            self.causal,
            self.searches,
            self.unavailable,
            self.bulks_acked,
            self.bulks_reached,
            self.replayed,
            self.crashes,
            self.crashed_at,
            self.hints_dropped,
            self.hints_delivered,
            self.hints_expired,
            self.cut,
            self.retried_around_cut,
            self.anti_entropy_repaired
        );
    }

    /// The histories met what they are there for.
    fn assert_met(&self) {
        assert!(self.reads > 0, "some reads completed and were checked");
        assert!(self.unavailable > 0, "some operations hit their deadline (messages dropped, a node down)");
        assert!(self.causal > 0, "some causal writes were acknowledged and checked");
        assert!(self.searches > 0, "some searches completed and were checked");
        assert!(self.searches_unavailable > 0, "some searches lost a part and failed by their deadline");
        assert!(self.waited > 0, "some coordinators waited for their clock before stamping");
        assert!(self.hints_dropped > 0, "some stand-ins had no room for a hint");
        assert!(self.hints_delivered > 0, "some hints were handed on to their owner once it was back");
        assert!(self.hints_expired > 0, "some hints passed their age while their owner was down");
        assert!(self.cut > 0 && self.retried_around_cut > 0, "some calls went around a node cut off from its peers");
        assert!(self.bulks_acked > 0 && self.bulks_reached > self.bulks_acked, "some bulk sets acknowledged, some not");
        assert!(self.replayed > 0, "some batches were replayed by a holder");
        assert!(self.anti_entropy_repaired > 0, "anti-entropy found keys whose replicas differed, and repaired them");
        for step in BulkStep::ALL {
            assert!(
                self.crashed_at.get(&step).is_some_and(|&n| n > 0),
                "no bulk set's coordinator crashed at {step:?}"
            );
        }
    }
}

/// One history.
/// What an anti-entropy round did.
#[derive(Default)]
struct Round {
    keys: usize,
    failed: usize,
}

/// Node `a`'s anti-entropy round, by the node's rule (`Repairer::round`):
/// with each other replica of each set it holds keys of that is not
/// `down`, an exchange; a set whose every exchange ended in sync is
/// covered up to what `a` held when the round began.
fn node_round(
    stores: &mut BTreeMap<NodeId, MapStore>,
    a: NodeId,
    down: &[NodeId],
    without: Option<PurgeSafeguard>,
) -> Round {
    let held = stores[&a].seq;
    let sets: Vec<Vec<NodeId>> = stores[&a].trees.keys().cloned().collect();
    let mut round = Round::default();
    for set in sets {
        let mut full = true;
        for &b in set.iter().filter(|&&b| b != a) {
            if down.contains(&b) {
                full = false;
                continue;
            }
            let mut ours = std::mem::take(stores.get_mut(&a).expect("a node"));
            let theirs = stores.get_mut(&b).expect("a replica is a node");
            match exchange(&mut ours, theirs, &set, without) {
                Some(keys) => round.keys += keys,
                None => {
                    full = false;
                    round.failed += 1;
                }
            }
            *stores.get_mut(&a).expect("a node") = ours;
        }
        if full {
            let covered = stores.get_mut(&a).expect("a node").covered.entry(set).or_default();
            *covered = (*covered).max(held);
        }
    }
    round
}

/// An exchange from `ours` with `theirs` over `set`'s keys, to its end,
/// its repairs merged as a replica merges an exchange's versions
/// ([`MapStore::merge_replicated`]): the keys repaired (`None` if it
/// failed).
fn exchange(
    ours: &mut MapStore,
    theirs: &mut MapStore,
    set: &[NodeId],
    without: Option<PurgeSafeguard>,
) -> Option<usize> {
    let mut exchange = Exchange::start(8);
    for _ in 0..10_000 {
        match exchange.poll()? {
            Step::Ask(ask) => {
                let told = antientropy::answer(&theirs.tree(set), &ask, 8, |segments| theirs.list(set, segments))?;
                exchange.told(told, &ours.tree(set));
            }
            Step::List(segments) => exchange.listed(ours.list(set, &segments)),
            Step::Repair(keys) => {
                for key in keys {
                    if let Some(mine) = ours.get(&key) {
                        theirs.merge_replicated(vec![(key.clone(), mine)], Carried::Stream, without);
                    }
                    if let Some(other) = theirs.get(&key) {
                        ours.merge_replicated(vec![(key, other)], Carried::Stream, without);
                    }
                }
                exchange.repaired();
            }
            Step::Done(antientropy::Outcome::Synced(summary)) => return Some(summary.keys_repaired),
            Step::Done(antientropy::Outcome::Failed(_)) => return None,
        }
    }
    None
}

fn run(seed: u64) -> Checked {
    run_without(seed, None)
}

/// One history, without `safeguard`.
fn run_without(seed: u64, without: Option<Safeguard>) -> Checked {
    let mut sim = Sim::new(seed, without);
    for step in 0..3_000 {
        if step == 1_000 {
            let mut pick = SplitMix64::new(seed);
            let node = NodeId(pick.between(1, NODES));
            match sim.lossy {
                // One node crashes: back at `RECOVER_AT` with what it made
                // durable.
                true => sim.crash(node, sim.now + RECOVER_AT - step),
                // One node's peers cannot reach it, nor it them; or in a
                // third of these histories, two nodes are cut off from the
                // other three.
                false => {
                    let mut side = vec![node];
                    if pick.chance(1.0 / 3.0) {
                        side.push(NodeId(node.0 % NODES + 1));
                    }
                    sim.single_cut = side.len() == 1;
                    sim.cut = Some((side, sim.now));
                    sim.had_cut = true;
                }
            }
        }
        if step == RECOVER_AT {
            // The cut heals: hints go to their owners.
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
    // The clients stop; batches left in logs are replayed, hints handed
    // on. Then every operation ends: what is still in flight passes its
    // deadline.
    for _ in 0..QUIET_MS {
        sim.step(false);
    }
    sim.replays_on = false;
    for _ in 0..=DEADLINE_MS + 1 {
        sim.step(false);
    }
    let left: usize = sim.nodes.values().map(|n| n.quorum.in_flight() + n.searches.len() + n.bulks.len()).sum();
    assert_eq!(left, 0, "seed {seed}: operations never ended");
    let logged: Vec<(NodeId, Hlc)> = sim.nodes.values().flat_map(|n| n.store.batches.keys().copied()).collect();
    // (Without replays they stay: what that leaves half applied shows below.)
    let replays = without != Some(Safeguard::BatchReplay);
    assert!(
        !replays || logged.is_empty(),
        "seed {seed}: batches still logged long after every node is back: {logged:?}"
    );
    assert_eq!(
        sim.tally.skew_refused, 0,
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
        bulks_acked: sim.bulks_acked,
        bulks_reached: sim.tally.bulk_reached.len(),
        replayed: sim.replayed,
        anti_entropy_repaired: sim.anti_entropy_repaired,
        crashes: sim.crashes,
        crashed_at: sim.crashed_at.clone(),
        cut: usize::from(cut),
        retried_around_cut: if cut { sim.retries.not_applied } else { 0 },
    }
}

#[test]
fn quorum_reads_see_acknowledged_writes_and_replicas_converge() {
    let replay: Option<u64> = std::env::var("QUIVER_SIM_SEED").ok().and_then(|s| s.parse().ok());
    let seeds: Vec<u64> = match replay {
        Some(seed) => vec![seed],
        None => {
            let number = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
            let first = number("QUIVER_SIM_FIRST").unwrap_or(0);
            (first..first + number("QUIVER_SIM_HISTORIES").unwrap_or(300)).collect()
        }
    };
    let mut total = Checked::default();
    for seed in seeds {
        total.add(run(seed));
    }
    total.report();
    // What the histories together must have met (not one replayed alone).
    if replay.is_none() {
        total.assert_met();
    }
}

/// The long run: 100,000 histories, seeds 0 to 99,999, on every core
/// (`cargo test --release -p quiver-node --test cluster_sim -- --ignored`;
/// its figures are in docs/cluster.md).
#[test]
#[ignore = "the long run: about half an hour on two cores"]
fn a_hundred_thousand_histories() {
    const HISTORIES: u64 = 100_000;
    let next = std::sync::atomic::AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let started = std::time::Instant::now();
    let total = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut total = Checked::default();
                    loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= HISTORIES {
                            return total;
                        }
                        total.add(run(seed));
                    }
                })
            })
            .collect();
        let mut total = Checked::default();
        for worker in workers {
            total.add(worker.join().expect("a history failed: its seed is above"));
        }
        total
    });
    eprintln!("{HISTORIES} histories on {threads} threads in {:?}", started.elapsed());
    total.report();
    total.assert_met();
}

/// With two of a key's three replicas down, a quorum write is unavailable
/// (one answer of two needed) and a write at `one` succeeds.
#[test]
fn two_replicas_down_quorum_is_unavailable_and_one_succeeds() {
    let mut quorum = Quorum::new(NodeId(1));
    let mut store = MapStore::default();
    let mut stamper = Stamper::new(NodeId(1), Hlc::ZERO, MAX_OFFSET_MS);
    let mut tally = Tally::default();
    let mut replica = Replica { store: &mut store, stamper: &mut stamper, wall_ms: 1, tally: &mut tally };
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

/// Each safeguard, removed, makes some history fail (the first such seed,
/// as found when this was written; the test finds it again and prints it):
/// - `AckWhenDurable`: seed 101: a replica that answered a write before it
///   was durable crashed, and a quorum read returned an older value than a
///   write acknowledged before it;
/// - `BatchLog`: seed 88: a bulk set's coordinator crashed while its parts
///   were on their way, and the set is left half applied;
/// - `BatchReplay`: seed 51: the same, though the batch was logged on two
///   nodes;
/// - `QuorumOverlap`: seed 0: a read at `one` missed a write acknowledged
///   before it;
/// - `WaitBeforeStamp`: seed 0: replicas refused timestamps their
///   coordinators stamped (too far ahead of their clocks);
/// - `StaleHits`: seed 5: a search returned a value older than a write of
///   its key acknowledged before the search began.
///
/// A causal write's coordinator sends its whole resulting sibling set:
/// `quiver-ring`'s `tests/versions.rs` fails at once without it.
#[test]
fn each_safeguard_matters() {
    let safeguards = [
        Safeguard::AckWhenDurable,
        Safeguard::BatchLog,
        Safeguard::BatchReplay,
        Safeguard::QuorumOverlap,
        Safeguard::WaitBeforeStamp,
        Safeguard::StaleHits,
    ];
    each_fails_a_seed(&safeguards, 200, |seed, safeguard| {
        run_without(seed, Some(safeguard));
    });
}

/// For each of `safeguards`, the first of `seeds` histories that `run`
/// without it fails; asserts that each has one.
fn each_fails_a_seed<S: Copy + std::fmt::Debug + std::panic::RefUnwindSafe>(
    safeguards: &[S],
    seeds: u64,
    run: impl Fn(u64, S) + std::panic::RefUnwindSafe,
) {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = Vec::new();
    for &safeguard in safeguards {
        let failing = (0..seeds).find_map(|seed| {
            let failed = std::panic::catch_unwind(|| run(seed, safeguard)).err()?;
            let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
            Some((seed, message.chars().take(300).collect::<String>()))
        });
        found.push((safeguard, failing));
    }
    std::panic::set_hook(quiet);
    eprintln!("{found:#?}");
    for (safeguard, failing) in found {
        assert!(failing.is_some(), "without {safeguard:?}, none of {seeds} histories failed");
    }
}

/// A safeguard of the tombstone rules ([`horizon`]) that a purge history
/// may run without ([`each_purge_safeguard_matters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PurgeSafeguard {
    /// A deleted key goes only where a full exchange covered it (without:
    /// past the horizon alone, as a quorum-based purge would).
    Covered,
    /// A replica refuses a message's versions past the horizon (without:
    /// takes them as an exchange's).
    RefuseOld,
    /// A replica takes a tombstone past the horizon that deletes a live
    /// version it holds (without: refuses it).
    TakeOldTombstone,
}

/// `gc_grace` in the purge histories.
const PURGE_GRACE_MS: u64 = 200;

/// A purge history: five nodes, three replicas per key, writes and deletes
/// that reach some replicas only (the rest get a copy late, or never),
/// nodes down for a while, and, at random points, a node's anti-entropy
/// round, a node's purge, a late copy delivered; all by the node's rules
/// (`antientropy`, `horizon`). After every step no replica holds a live
/// version that a purged tombstone deleted; at the end, with everyone up,
/// rounds and purges leave the replicas of every key identical, their
/// trees too, and a further round repairs nothing. Returns the tombstones
/// purged.
fn purge_history(seed: u64, without: Option<PurgeSafeguard>) -> usize {
    let ring = ring_of_nodes();
    let mut rng = SplitMix64::new(seed ^ 0x9e37_79b9);
    let ids: Vec<NodeId> = (1..=NODES).map(NodeId).collect();
    let mut stores: BTreeMap<NodeId, MapStore> =
        ids.iter().map(|&id| (id, MapStore { ring: Some(ring.clone()), ..MapStore::default() })).collect();
    let mut stamper = Stamper::new(NodeId(1), Hlc::ZERO, u64::MAX);
    let mut now: u64 = 1_000_000;
    let mut down: Vec<NodeId> = Vec::new();
    // Copies on their way: (to, key, versions).
    let mut late: Vec<(NodeId, Vec<u8>, Siblings)> = Vec::new();
    let mut purged: Vec<(Vec<u8>, Version)> = Vec::new();
    let set_horizons = |stores: &mut BTreeMap<NodeId, MapStore>, now: u64| {
        for store in stores.values_mut() {
            store.horizon_ms = horizon::horizon_ms(now, PURGE_GRACE_MS);
        }
    };
    let round =
        |stores: &mut BTreeMap<NodeId, MapStore>, a: NodeId, down: &[NodeId]| node_round(stores, a, down, without).keys;
    let resurrected = |stores: &BTreeMap<NodeId, MapStore>, purged: &[(Vec<u8>, Version)]| {
        for (id, store) in stores {
            for (key, tombstone) in purged {
                let live = store.sets.get(key).into_iter().flat_map(|s| s.versions()).filter(|v| !v.is_tombstone());
                if let Some(back) = live.into_iter().find(|v| tombstone.dominates(v)) {
                    return Some(format!("{key:?} on node {}: {back:?}, deleted by purged {tombstone:?}", id.0));
                }
            }
        }
        None
    };

    for step in 0..400 {
        now += rng.between(1, 10);
        set_horizons(&mut stores, now);
        let r = rng.next_u64() % 100;
        if r < 40 {
            // A write or a delete of one key, at some of its replicas.
            let key = format!("key-{}", rng.next_u64() % KEYS).into_bytes();
            let value = (!rng.chance(0.4)).then(|| format!("v{step}").into_bytes());
            let version = stamper.next(now).expect("a test clock").blind(value);
            let replicas = ring.preference_list(&key, N);
            let reached = rng.between(0, N as u64 - 1) as usize;
            for (i, &to) in replicas.iter().enumerate() {
                let siblings = Siblings::one(version.clone());
                if (i == reached || rng.chance(0.5)) && !down.contains(&to) {
                    stores.get_mut(&to).expect("a replica").merge_sets(vec![(key.clone(), siblings)]);
                } else if rng.chance(0.5) {
                    late.push((to, key.clone(), siblings));
                }
            }
        } else if r < 55 && !late.is_empty() {
            let at = (rng.next_u64() % late.len() as u64) as usize;
            if !down.contains(&late[at].0) {
                let (to, key, siblings) = late.swap_remove(at);
                let store = stores.get_mut(&to).expect("a replica");
                store.merge_replicated(vec![(key, siblings)], Carried::Message, without);
            }
        } else if r < 70 {
            let a = ids[(rng.next_u64() % NODES) as usize];
            if !down.contains(&a) {
                round(&mut stores, a, &down);
            }
        } else if r < 85 {
            let a = ids[(rng.next_u64() % NODES) as usize];
            purged.extend(stores.get_mut(&a).expect("a node").purge(without));
        } else if r < 90 {
            // A node goes down, or the one down comes back.
            match down.pop() {
                Some(_) => {}
                None => down.push(ids[(rng.next_u64() % NODES) as usize]),
            }
        } else {
            now += rng.between(0, PURGE_GRACE_MS);
        }
        if let Some(back) = resurrected(&stores, &purged) {
            panic!("seed {seed}: a deleted version is back at step {step}: {back}");
        }
    }

    // Everyone up; every late copy arrives; rounds and purges past the
    // horizon until nothing changes.
    down.clear();
    for (to, key, siblings) in std::mem::take(&mut late) {
        stores.get_mut(&to).expect("a replica").merge_replicated(vec![(key, siblings)], Carried::Message, without);
    }
    now += 2 * PURGE_GRACE_MS;
    set_horizons(&mut stores, now);
    for _ in 0..3 {
        for &a in &ids {
            round(&mut stores, a, &down);
        }
        for &a in &ids {
            purged.extend(stores.get_mut(&a).expect("a node").purge(without));
        }
        if let Some(back) = resurrected(&stores, &purged) {
            panic!("seed {seed}: a deleted version is back at the end: {back}");
        }
    }
    let again: usize = ids.iter().map(|&a| round(&mut stores, a, &down)).sum();
    assert_eq!(again, 0, "seed {seed}: a round after the purges repaired keys");
    for k in 0..KEYS {
        let key = format!("key-{k}").into_bytes();
        let replicas = ring.preference_list(&key, N);
        let first = stores[&replicas[0]].get(&key);
        assert!(first.as_ref().is_none_or(|s| !s.all_tombstones()), "seed {seed}: {key:?} kept its tombstones");
        for id in &replicas {
            assert_eq!(stores[id].get(&key), first, "seed {seed}: replicas of {key:?} differ");
        }
    }
    for store in stores.values() {
        let kept: BTreeMap<_, _> = store.trees.iter().filter(|(_, t)| t.keys() > 0).collect();
        let rebuilt = store.rebuilt_trees();
        let rebuilt: BTreeMap<_, _> = rebuilt.iter().filter(|(_, t)| t.keys() > 0).collect();
        assert_eq!(kept, rebuilt, "seed {seed}: trees are not those of the data after purges");
    }
    purged.len()
}

#[test]
fn deletes_stay_deleted_with_purges_at_random_points() {
    let purged: usize = (0..300).map(|seed| purge_history(seed, None)).sum();
    eprintln!("300 purge histories: {purged} tombstones purged");
    assert!(purged > 300, "the histories purge tombstones: {purged}");
}

#[test]
fn each_purge_safeguard_matters() {
    let safeguards = [PurgeSafeguard::Covered, PurgeSafeguard::RefuseOld, PurgeSafeguard::TakeOldTombstone];
    each_fails_a_seed(&safeguards, 300, |seed, safeguard| {
        purge_history(seed, Some(safeguard));
    });
}
