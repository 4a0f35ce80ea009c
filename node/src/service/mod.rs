//! The request front: what a node does with each client request before any
//! data is touched. It checks the request against the limits, answers the
//! handshake, status, ring and admin requests, and hands every read and
//! write to a [`Store`]: the node's own engine ([`LocalStore`]) or, in a
//! cluster, the coordinator
//! (the cluster's store, which it sees as a [`Cluster`]). It never knows
//! which, and it reads no clock of its own (time comes from the [`Clock`]
//! it is given).

mod causal;
mod local;
mod reads;
pub mod token;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quiver_ring::ring::{Member, RingView};
use quiver_ring::wire::{
    self, BudgetInfo, ErrorKind, NodeInfo, NodeStatus, Op, Reply, RingInfo, SearchHit, ServerError, VersionInfo,
    Versions,
};
use quiver_ring::{Context, Hlc, NodeId, Siblings};
use tokio::sync::watch;

pub use crate::storage::storage_error;
pub use local::{not_indexed, HeldWrite, LocalStore, WriteHook, GC_GRACE_MS};
pub use reads::ReadHook;
pub use token::TokenSeal;

use crate::clock::Clock;
use crate::config::Limits;
use crate::disk_space::{DiskSpace, Writer};
use crate::index::query::Match;
use crate::index::Search;
use crate::stamping::NodeClock;

/// Keys and values of one write; `None` deletes.
pub type Entries = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Called once with a request's outcome. It may run on any thread (an
/// engine or reader thread), so it must be quick: send a message, wake a
/// task.
pub type Done<T> = Box<dyn FnOnce(Result<T, ServerError>) + Send>;

/// What a [`Store`] reports for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// Approximate: entries before merging.
    pub keys: u64,
    pub bytes_on_disk: u64,
    /// Causal writes refused for leaving too many siblings.
    pub too_many_siblings_refused: u64,
    /// `Some`: the node indexes its values, and this many vector changes
    /// are not yet in its similarity graph.
    pub graph_backlog: Option<u64>,
    /// Why its storage engine stopped taking writes, if it did.
    pub storage_failure: Option<String>,
}

/// What a request carries besides its operation: the highest timestamp
/// its client has seen, its deadline (a write is not stamped after it), and
/// the consistency it asks for (`None`: the node's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub hlc_seen: Hlc,
    pub deadline: Hlc,
    pub consistency: Option<wire::Consistency>,
}

/// Where the front hands requests that passed its checks. Every call
/// returns at once; the answer comes through `done`, never on the caller's
/// thread for anything that touches the disk, so an async worker is never
/// held by a read or a write.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Writes every entry as one unit, all stamped alike (all or nothing),
    /// blind (last writer wins); `done` once it is durable.
    fn write(&self, entries: Entries, timing: Timing, done: Done<()>);

    /// The current values of `keys`, in order (`None`: absent or deleted).
    /// Answers [`ErrorKind::ResponseTooLarge`] once the values pass
    /// `response_bytes_max`, without reading further.
    fn read(&self, keys: Vec<Vec<u8>>, timing: Timing, response_bytes_max: usize, done: Done<Vec<Option<Vec<u8>>>>);

    /// Every live version of `key` (`None`: never written).
    fn read_versions(&self, key: Vec<u8>, timing: Timing, done: Done<Option<Siblings>>);

    /// A causal write: `value` (`None` deletes) replaces what `context`
    /// covers; `done` once it is durable.
    fn write_causal(&self, key: Vec<u8>, value: Option<Vec<u8>>, context: Context, timing: Timing, done: Done<()>);

    /// The hits of a search (full text or similar values), best first,
    /// with their values (see [`crate::index`]).
    fn search(&self, search: Search, timing: Timing, done: Done<Vec<SearchHit>>);

    /// Sizes for `status`.
    fn status(&self) -> Result<StoreStatus, ServerError>;

    /// Flushes the node's memtables and merges every table into one
    /// (`quiver compact`); a caller that asks while one runs waits for
    /// that one.
    fn compact(&self, done: Done<()>);

    /// The highest timestamp stamped or seen, sent back with every answer.
    fn hlc(&self) -> Hlc;
}

/// What the client listener counts, for `status`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections refused at `connections_max`.
    pub refused: AtomicU64,
    /// Connections not reading now because their answers not yet written
    /// are over `connection_answer_bytes_max`, and how often one stopped.
    pub paused_now: AtomicU64,
    pub paused: AtomicU64,
    /// Times a connection waited for one of its request slots.
    pub waited_for_slot: AtomicU64,
    /// Connections closed for sending no `Hello` in time.
    pub closed_before_hello: AtomicU64,
    /// Connections closed for being idle, or for a client that read
    /// nothing for as long.
    pub closed_idle: AtomicU64,
    /// Connections dropped at shutdown with answers their client did not
    /// read.
    pub dropped_at_shutdown: AtomicU64,
}

impl ConnectionStats {
    /// Adds one to `counter`.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A bound for `status`.
pub(crate) fn budget(name: &str, max: u64, used: u64, reached: u64, at_bound: &str) -> BudgetInfo {
    BudgetInfo { name: name.to_owned(), max, used, reached, at_bound: at_bound.to_owned() }
}

/// The request front shared by every connection.
#[derive(Debug)]
pub struct Service {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    node_clock: Arc<NodeClock>,
    limits: Limits,
    /// `limits` as clients learn them, which every request is checked with.
    wire_limits: wire::Limits,
    node_id: NodeId,
    client_addr: String,
    peer_addr: String,
    started_ms: u64,
    /// Admin requests must carry this.
    admin_token: String,
    /// Seals the context tokens this node hands out and opens those it is
    /// given (the cluster's secret, or this node's).
    seal: TokenSeal,
    /// The node's cluster (its store is `store`), when it is part of one:
    /// its name, peers and ring, for `status` and `Ring`.
    cluster: Option<Arc<dyn Cluster>>,
    /// The dimension of this node's index's vectors, which a vector written
    /// with a value must have (`None`: no index here to say).
    vector_dim: Option<usize>,
    shutdown: watch::Sender<bool>,
    connections: ConnectionStats,
    /// The free-space reserve client writes are held to (`None`: none).
    disk: Option<Arc<DiskSpace>>,
}

/// What a node's front shows of the cluster it is part of: the cluster's
/// store implements it, and the front never needs to know more.
pub trait Cluster: Send + Sync + std::fmt::Debug {
    fn status(&self) -> ClusterStatus;
    /// The ring clients route by.
    fn ring_info(&self) -> Result<RingInfo, ServerError>;
    /// Runs an anti-entropy round now; `done` gets what it did.
    fn repair(&self, done: Done<wire::RepairReport>);
    /// Checks the hash trees against the data now.
    fn check_trees(&self, done: Done<wire::TreesCheck>);
}

/// A cluster's part of `status`.
#[derive(Clone, Debug, Default)]
pub struct ClusterStatus {
    pub name: String,
    pub peers: Vec<wire::PeerInfo>,
    /// Copies of each key.
    pub replicas: u32,
    pub ring: Vec<wire::RingMember>,
    pub hints_dropped: u64,
    pub batches_pending: u64,
    pub budgets: Vec<wire::BudgetInfo>,
    /// Why this node is cut off from its peers, when it is.
    pub cut_off: Option<String>,
    pub anti_entropy: Option<wire::AntiEntropyInfo>,
}

/// Bytes of a `Values` answer besides the values: the frame header, the
/// response's id, timestamp and variant tags, and per value its length and
/// option tag (at most 10 + 1 bytes as varints).
fn response_overhead(values: usize) -> usize {
    wire::LEN_BYTES + 32 + values * 11
}

impl Service {
    /// A front over `store`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        node_clock: Arc<NodeClock>,
        node_id: NodeId,
        limits: Limits,
        admin_token: String,
        seal: TokenSeal,
        client_addr: String,
        peer_addr: String,
    ) -> Service {
        let (shutdown, _) = watch::channel(false);
        Service {
            started_ms: clock.now_ms(),
            store,
            clock,
            node_clock,
            wire_limits: limits.wire(),
            limits,
            node_id,
            client_addr,
            peer_addr,
            admin_token,
            seal,
            cluster: None,
            vector_dim: None,
            shutdown,
            connections: ConnectionStats::default(),
            disk: None,
        }
    }

    /// Vectors written with values must have `dim` components (the
    /// dimension of this node's index).
    pub fn with_vector_dim(mut self, dim: usize) -> Service {
        self.vector_dim = Some(dim);
        self
    }

    /// Client writes are refused (`DiskFull`) while the disk is below its
    /// reserve; its reserves show in `status`.
    pub fn with_disk_space(mut self, disk: Arc<DiskSpace>) -> Service {
        self.disk = Some(disk);
        self
    }

    /// This front for a node of a cluster: `cluster` is also its store.
    pub fn with_cluster(mut self, cluster: Arc<dyn Cluster>) -> Service {
        self.cluster = Some(cluster);
        self
    }

    /// Becomes `true` when an admin asked the node to stop.
    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks the node to stop (signal handlers and the admin request).
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// The highest timestamp stamped or seen, sent back with every response.
    pub fn hlc(&self) -> Hlc {
        self.store.hlc()
    }

    /// The per-request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the client listener counts.
    pub fn connection_stats(&self) -> &ConnectionStats {
        &self.connections
    }

    /// The bounds of the client listener, for `status`.
    fn connection_budgets(&self) -> Vec<BudgetInfo> {
        let (l, c) = (&self.limits, &self.connections);
        let get = ConnectionStats::get;
        vec![
            budget(
                "connections_max",
                l.connections_max as u64,
                get(&c.open),
                get(&c.refused),
                "a new connection is refused (TooManyConnections)",
            ),
            budget(
                "connection_answer_bytes_max",
                l.connection_answer_bytes_max as u64,
                get(&c.paused_now),
                get(&c.paused),
                "the connection is not read until its client reads (in use: connections paused now)",
            ),
            budget(
                "requests_in_flight_max",
                l.requests_in_flight_max as u64,
                0,
                get(&c.waited_for_slot),
                "the connection is not read until a request ends",
            ),
            budget(
                "idle_timeout_ms",
                l.idle_timeout_secs.saturating_mul(1000),
                0,
                get(&c.closed_idle),
                "an idle connection, or one whose client reads nothing, is closed (0: never)",
            ),
            budget(
                "hello_timeout_ms",
                l.hello_timeout_ms,
                0,
                get(&c.closed_before_hello),
                "a connection without its Hello is closed",
            ),
            budget(
                "shutdown_grace_ms",
                l.shutdown_grace_ms,
                0,
                get(&c.dropped_at_shutdown),
                "at shutdown, answers a client does not read are dropped",
            ),
        ]
    }

    /// Handles one request and calls `reply` once with the answer: at once
    /// for what the front answers itself, else when the store has done it
    /// (then from one of its threads, so `reply` must be quick).
    pub fn start(&self, timing: Timing, op: Op, reply: impl FnOnce(Result<Reply, ServerError>) + Send + 'static) {
        if let Err(error) = self.wire_limits.check(&op) {
            return reply(Err(error));
        }
        if let (true, Some(disk)) = (is_write(&op), &self.disk) {
            if let Err(error) = disk.check(Writer::Client) {
                return reply(Err(error));
            }
        }
        let response_max = (self.wire_limits.frame_bytes_max as usize).saturating_sub(response_overhead(0));
        match op {
            Op::Get { key } => self.store.read(
                vec![key],
                timing,
                response_max,
                Box::new(move |result| reply(result.map(|values| Reply::Value(values.into_iter().next().flatten())))),
            ),
            Op::GetMany { keys } => {
                let max = response_max.saturating_sub(response_overhead(keys.len()));
                self.store.read(keys, timing, max, Box::new(move |result| reply(result.map(Reply::Values))))
            }
            Op::Set { key, value } => self.write(vec![(key, Some(value))], timing, reply),
            Op::Delete { key } => self.write(vec![(key, None)], timing, reply),
            Op::BulkSet { entries } => self.write(last_value_of_each_key(entries), timing, reply),
            Op::GetVersions { key } => {
                let (for_key, seal) = (key.clone(), self.seal.clone());
                self.store.read_versions(
                    key,
                    timing,
                    Box::new(move |result| reply(result.map(|found| versions_reply(&seal, &for_key, found)))),
                )
            }
            Op::SetWithContext { key, value, context } => {
                match self.seal.open(&key, &context, self.node_clock.latest_accepted()) {
                    Ok(context) => self.store.write_causal(
                        key,
                        value,
                        context,
                        timing,
                        Box::new(move |result| reply(result.map(|()| Reply::Done))),
                    ),
                    Err(error) => reply(Err(error)),
                }
            }
            Op::Status => reply(self.status()),
            Op::Shutdown { token } => reply(self.shutdown(&token)),
            Op::Hello { protocol } => reply(self.hello(protocol)),
            Op::Ring => reply(self.ring()),
            Op::Repair => match &self.cluster {
                Some(cluster) => cluster.repair(Box::new(move |result| reply(result.map(Reply::Repaired)))),
                None => reply(Ok(Reply::Repaired(wire::RepairReport {
                    failed: vec!["this node runs alone: it has no replicas to compare with".into()],
                    ..wire::RepairReport::default()
                }))),
            },
            Op::Compact => self.store.compact(Box::new(move |result| reply(result.map(|()| Reply::Done)))),
            Op::CheckTrees => match &self.cluster {
                Some(cluster) => cluster.check_trees(Box::new(move |result| reply(result.map(Reply::TreesChecked)))),
                None => {
                    reply(Err(ServerError::new(ErrorKind::BadQuery, "this node runs alone: it keeps no hash trees")))
                }
            },
            Op::SearchText { query, k, all, global_stats } => {
                let matching = if all { Match::All } else { Match::Any };
                self.search(Search::Text { query, k, matching, global: global_stats, stats: None }, timing, reply)
            }
            Op::SearchSimilar { text, k } => self.search(Search::Similar { text, k }, timing, reply),
            Op::SearchVector { vector, k } => self.search(Search::Vector { vector, k }, timing, reply),
            Op::SetWithVector { key, value, vector } => {
                if let Err(error) = wire::check_vector(&vector, self.vector_dim.unwrap_or(0)) {
                    return reply(Err(error));
                }
                // The vector is a key of its own beside the value, written
                // with it as one unit (the same stamp): see `index`.
                let vector_key = quiver_ring::ring::vector_key_of(&key);
                let entries = vec![(key, Some(value)), (vector_key, Some(crate::index::vectors::encode(&vector)))];
                self.write(entries, timing, reply)
            }
        }
    }

    fn search(&self, search: Search, timing: Timing, reply: impl FnOnce(Result<Reply, ServerError>) + Send + 'static) {
        self.store.search(search, timing, Box::new(move |result| reply(result.map(Reply::Hits))));
    }

    fn write(&self, entries: Entries, timing: Timing, reply: impl FnOnce(Result<Reply, ServerError>) + Send + 'static) {
        self.store.write(entries, timing, Box::new(move |result| reply(result.map(|()| Reply::Done))));
    }

    fn hello(&self, protocol: u32) -> Result<Reply, ServerError> {
        if protocol != wire::PROTOCOL_VERSION {
            return Err(ServerError::new(
                ErrorKind::UnsupportedProtocol,
                format!("this node speaks protocol {}, the client {protocol}", wire::PROTOCOL_VERSION),
            ));
        }
        Ok(Reply::Hello(NodeInfo {
            protocol: wire::PROTOCOL_VERSION,
            node_id: self.node_id.0,
            limits: self.wire_limits.clone(),
        }))
    }

    fn status(&self) -> Result<Reply, ServerError> {
        let store = self.store.status()?;
        let cluster = self.cluster.as_ref().map(|cluster| cluster.status()).unwrap_or_default();
        Ok(Reply::Status(Box::new(NodeStatus {
            node_id: self.node_id.0,
            client_addr: self.client_addr.clone(),
            peer_addr: self.peer_addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            keys: store.keys,
            bytes_on_disk: store.bytes_on_disk,
            uptime_ms: self.clock.now_ms().saturating_sub(self.started_ms),
            max_clock_offset_ms: self.node_clock.max_offset_ms(),
            clock_refusal: self.node_clock.refusal(),
            storage_failure: store.storage_failure,
            too_many_siblings_refused: store.too_many_siblings_refused,
            name: cluster.name,
            peers: cluster.peers,
            replicas: cluster.replicas.max(1),
            ring: cluster.ring,
            hints_dropped: cluster.hints_dropped,
            batches_pending: cluster.batches_pending,
            indexed: store.graph_backlog.is_some(),
            graph_backlog: store.graph_backlog.unwrap_or(0),
            budgets: self
                .connection_budgets()
                .into_iter()
                .chain(self.disk.iter().flat_map(|disk| disk.budgets()))
                .chain(cluster.budgets)
                .collect(),
            cut_off: cluster.cut_off,
            anti_entropy: cluster.anti_entropy,
        })))
    }

    /// The ring clients route by: the cluster's, or this node alone.
    fn ring(&self) -> Result<Reply, ServerError> {
        if let Some(cluster) = &self.cluster {
            return cluster.ring_info().map(Reply::Ring);
        }
        let me = Member {
            id: self.node_id,
            name: String::new(),
            client_addr: self.client_addr.clone(),
            peer_addr: self.peer_addr.clone(),
        };
        Ok(Reply::Ring(RingInfo { replicas: 1, view: RingView { epoch: 0, members: vec![me] }, avoid: Vec::new() }))
    }

    fn shutdown(&self, token: &str) -> Result<Reply, ServerError> {
        if !crate::identity::same_token(token, &self.admin_token) {
            return Err(ServerError::new(
                ErrorKind::Forbidden,
                "shutdown needs the node's admin token (the ADMIN_TOKEN file in its data directory)",
            ));
        }
        tracing::info!("shutdown requested by an admin client");
        self.request_shutdown();
        Ok(Reply::Done)
    }
}

/// The answer to `GetVersions`: every sibling, and the context of them all
/// as a token sealed for `key`.
fn versions_reply(seal: &TokenSeal, key: &[u8], found: Option<Siblings>) -> Reply {
    let siblings = found.unwrap_or_default();
    let context = seal.seal(key, &siblings.context());
    let versions = siblings.into_versions().into_iter().map(|v| VersionInfo { hlc: v.hlc, value: v.value }).collect();
    Reply::Versions(Versions { versions, context })
}

/// Whether `op` writes data (and so needs room on the disk).
fn is_write(op: &Op) -> bool {
    match op {
        Op::Set { .. }
        | Op::Delete { .. }
        | Op::BulkSet { .. }
        | Op::SetWithContext { .. }
        | Op::SetWithVector { .. } => true,
        Op::Get { .. }
        | Op::GetMany { .. }
        | Op::Status
        | Op::Shutdown { .. }
        | Op::Hello { .. }
        | Op::GetVersions { .. }
        | Op::Ring
        | Op::Repair
        | Op::Compact
        | Op::CheckTrees
        | Op::SearchText { .. }
        | Op::SearchSimilar { .. }
        | Op::SearchVector { .. } => false,
    }
}

/// A key given twice in one bulk set takes its last value (as Redis MSET
/// does): reversed, a stable sort puts each key's last value first among
/// its equals, and `dedup` keeps the first.
fn last_value_of_each_key(mut entries: Vec<(Vec<u8>, Vec<u8>)>) -> Entries {
    entries.reverse();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.dedup_by(|later, first| later.0 == first.0);
    entries.into_iter().map(|(k, v)| (k, Some(v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_takes_its_last_value() {
        let entries =
            vec![(b"b".to_vec(), b"1".to_vec()), (b"a".to_vec(), b"2".to_vec()), (b"b".to_vec(), b"3".to_vec())];
        assert_eq!(
            last_value_of_each_key(entries),
            vec![(b"a".to_vec(), Some(b"2".to_vec())), (b"b".to_vec(), Some(b"3".to_vec()))]
        );
    }
}
