//! Quiver's client library.
//!
//! ```no_run
//! # async fn demo() -> Result<(), quiver_client::Error> {
//! use quiver_client::Client;
//!
//! let client = Client::connect(["127.0.0.1:7700"]).await?;
//! client.set("greeting", "hello").await?;          // durable when Ok
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! client.bulk_set([("a", "1"), ("b", "2")]).await?; // all or nothing
//! client.delete("greeting").await?;
//! assert_eq!(client.get("greeting").await?, None);
//! # Ok(()) }
//! ```
//!
//! The client asks the seed node it connected to for the cluster's ring and
//! sends each call to a replica of its key, keeping one connection per node;
//! each connection carries every concurrent call (answers are matched by
//! id), so a single `Client` shared by many tasks keeps many requests in
//! flight. When a replica cannot be reached, is shutting down, sees too few
//! replicas up (`Unavailable`) or, for a blind write or a read, does not
//! answer in time, the call goes to the next replica within the call's one
//! timeout (and, when none is left, to the seed node, which coordinates any
//! key): [`retry`] is the rule, [`Client::retries`] counts them. A write
//! that fails with [`Error::is_ambiguous`] may or may not have been
//! applied.
//! [`blocking::Client`] offers the same calls to plain threads.

pub mod blocking;
mod connection;
mod error;
pub mod retry;
mod routing;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use error::{Error, Result};
pub use quiver_ring::wire::{
    AntiEntropyInfo, BudgetInfo, Consistency, ContextToken, ErrorKind, Limits, NodeStatus, RepairReport, SearchHit,
    TreesCheck, VersionInfo, Versions,
};
use quiver_ring::wire::{Op, Reply};
pub use quiver_ring::Hlc;

/// Options of a full-text search ([`Client::search_text_with`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextSearch {
    /// A value must match every word, phrase and prefix, not just one.
    pub all: bool,
    /// In a cluster, weigh terms (BM25's idf and average length) by
    /// statistics over the whole cluster's values, gathered in one more
    /// round trip, instead of each node's own: scores then equal one
    /// node's over the same data, whatever the number of nodes.
    pub global_stats: bool,
}
use tokio::sync::Mutex;

use connection::Connection;
use retry::{Attempts, Retries};
use routing::Routes;

/// Locks a mutex, going on after a panic elsewhere poisoned it: the values
/// behind these locks are replaced whole, never left half-changed.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Default time a call waits for its answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a client without a ring asks for one again, and the least
/// time between two asks after a node said it is not a key's replica or
/// sees too few replicas up.
const RING_RETRY: Duration = Duration::from_secs(1);

/// How often a client asks for the ring again, by default
/// ([`Client::with_ring_refresh`]).
const RING_REFRESH: Duration = Duration::from_secs(10);

/// An async Quiver client.
#[derive(Debug)]
pub struct Client {
    seeds: Vec<String>,
    /// The connection to the seed node that answered: `status`, `limits`
    /// and `shutdown_node` go there, and so does everything when there is
    /// no ring to route by. A plain mutex held only to clone the `Arc`, so
    /// concurrent calls do not queue behind each other.
    current: std::sync::Mutex<Option<Arc<Connection>>>,
    /// Connections to the cluster's nodes, by client address.
    nodes: std::sync::Mutex<HashMap<String, Arc<Connection>>>,
    /// Serialises connecting, which awaits.
    reconnecting: Mutex<()>,
    /// The ring, and when it was last asked for.
    routes: std::sync::Mutex<(Option<Arc<Routes>>, Option<Instant>)>,
    /// Route each key to its replicas (else: everything to the seed).
    routing: bool,
    timeout: Duration,
    hlc: Arc<AtomicU64>,
    /// Asked of the node with every request (`None`: the node's default).
    consistency: Option<Consistency>,
    retries: std::sync::Mutex<Retries>,
    /// How often the ring is asked for again.
    ring_refresh: Duration,
}

/// Awaits every future, concurrently, and returns their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

impl Client {
    /// Connects to the first seed that answers and asks it for the ring:
    /// from then on each key goes to one of its replicas.
    pub async fn connect<I, A>(seeds: I) -> Result<Client>
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        let client = Client {
            seeds: seeds.into_iter().map(Into::into).collect(),
            current: std::sync::Mutex::new(None),
            nodes: std::sync::Mutex::default(),
            reconnecting: Mutex::new(()),
            routes: std::sync::Mutex::new((None, None)),
            routing: true,
            timeout: DEFAULT_TIMEOUT,
            hlc: Arc::default(),
            consistency: None,
            retries: std::sync::Mutex::default(),
            ring_refresh: RING_REFRESH,
        };
        client.connection().await?;
        client.refresh_ring().await;
        Ok(client)
    }

    /// Sets how long each call waits for its answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Sets how many of a key's replicas must answer each call, in a
    /// cluster (one, quorum or all; by default the node's own default,
    /// quorum). A single node is its keys' only replica.
    pub fn with_consistency(mut self, consistency: Consistency) -> Client {
        self.consistency = Some(consistency);
        self
    }

    /// Sets how often the client asks for the ring again (10 s by default):
    /// which nodes to avoid changes as they lose and find their peers. It
    /// also asks after a node said it is not a key's replica or sees too
    /// few replicas up (at most once a second).
    pub fn with_ring_refresh(mut self, every: Duration) -> Client {
        self.ring_refresh = every;
        self
    }

    /// Sends every call to the seed node it connected to, which
    /// coordinates it, instead of to a replica of each key. Writes with a
    /// context then work only for keys that node replicates.
    pub fn direct(mut self) -> Client {
        self.routing = false;
        self
    }

    fn live(&self) -> Option<Arc<Connection>> {
        let current = lock(&self.current);
        current.as_ref().filter(|c| !c.is_broken()).cloned()
    }

    /// The seed connection, reconnecting (seed after seed) if it broke.
    async fn connection(&self) -> Result<Arc<Connection>> {
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        // Start with the seed after the one that just failed.
        let failed = lock(&self.current).clone();
        let start = failed.and_then(|c| self.seeds.iter().position(|s| s == c.addr())).map_or(0, |i| i + 1);
        let mut last = String::from("no seed addresses given");
        for i in 0..self.seeds.len() {
            let addr = &self.seeds[(start + i) % self.seeds.len()];
            match Connection::open(addr, self.hlc.clone(), self.timeout).await {
                Ok(connection) => {
                    let connection = Arc::new(connection);
                    *lock(&self.current) = Some(connection.clone());
                    return Ok(connection);
                }
                // A node that refuses this client will refuse it again.
                Err(e @ (Error::Server { .. } | Error::Protocol(_))) => return Err(e),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(Error::Connect { addrs: self.seeds.clone(), last })
    }

    /// The connection to the node at `addr`, opened if need be.
    async fn connection_to(&self, addr: &str) -> Result<Arc<Connection>> {
        let live = |nodes: &HashMap<String, Arc<Connection>>| nodes.get(addr).filter(|c| !c.is_broken()).cloned();
        if let Some(connection) = live(&lock(&self.nodes)) {
            return Ok(connection);
        }
        let _one_at_a_time = self.reconnecting.lock().await;
        if let Some(connection) = live(&lock(&self.nodes)) {
            return Ok(connection);
        }
        let connection = Connection::open(addr, self.hlc.clone(), self.timeout)
            .await
            .map_err(|e| Error::Connect { addrs: vec![addr.to_owned()], last: e.to_string() })?;
        let connection = Arc::new(connection);
        lock(&self.nodes).insert(addr.to_owned(), connection.clone());
        Ok(connection)
    }

    /// Asks the seed node for the ring. Without one (a cluster whose nodes
    /// have not all answered yet, or a node that failed to say), calls go
    /// to the seed until a later try succeeds.
    async fn refresh_ring(&self) {
        lock(&self.routes).1 = Some(Instant::now());
        if let Ok(Reply::Ring(info)) = self.call(Op::Ring).await {
            let routes = Routes::new(info);
            lock(&self.routes).0 = routes.is_cluster().then(|| Arc::new(routes));
        }
    }

    /// The ring to route by, if there is one (asked for again every
    /// `ring_refresh`, and every [`RING_RETRY`] while there is none).
    async fn routes(&self) -> Option<Arc<Routes>> {
        if !self.routing {
            return None;
        }
        let (routes, asked) = lock(&self.routes).clone();
        let every = if routes.is_none() { RING_RETRY } else { self.ring_refresh };
        if asked.is_none_or(|at| at.elapsed() >= every) {
            self.refresh_ring().await;
            return lock(&self.routes).0.clone();
        }
        routes
    }

    /// Asks for the ring again unless it was asked for within
    /// [`RING_RETRY`].
    async fn refresh_ring_soon(&self) {
        let asked = lock(&self.routes).1;
        if asked.is_none_or(|at| at.elapsed() >= RING_RETRY) {
            self.refresh_ring().await;
        }
    }

    /// The retries this client made: calls that went on to another replica
    /// after an attempt failed.
    pub fn retries(&self) -> Retries {
        *lock(&self.retries)
    }

    /// The node a call about `key` goes to first (its first replica on
    /// the ring), when the client routes by a ring.
    pub async fn node_for(&self, key: impl AsRef<[u8]>) -> Option<String> {
        self.routes().await?.replicas(key.as_ref()).into_iter().next()
    }

    /// A call to the seed node.
    async fn call(&self, op: Op) -> Result<Reply> {
        self.connection().await?.call(op, self.timeout, self.consistency).await
    }

    /// A call about `key`, sent to its replicas in turn (see
    /// [`Client::call_at`]).
    async fn call_key(&self, key: &[u8], op: Op, causal: bool) -> Result<Reply> {
        match self.routes().await {
            Some(routes) => self.call_at(&routes.replicas(key), op, causal).await,
            None => self.call(op).await,
        }
    }

    /// Sends `op` to the first of `targets`, and on to the next as the
    /// retry rule says ([`retry`]), then to the seed node (which
    /// coordinates any key) if it is not one of them; all within one
    /// timeout. A node that says it is not a replica of the key, or sees
    /// too few replicas up, makes the client ask for the ring again.
    async fn call_at(&self, targets: &[String], op: Op, causal: bool) -> Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let seed = self.live().map(|c| c.addr().to_owned());
        let seed_too = seed.is_none_or(|seed| !targets.contains(&seed));
        let mut attempts = Attempts::new(causal);
        let mut last: Option<Error> = None;
        for target in targets.iter().map(Some).chain(seed_too.then_some(None)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(error) = &last {
                if left.is_zero() {
                    break;
                }
                lock(&self.retries).count(error.failure());
                tracing::debug!(to = target.map_or("the seed", |t| t.as_str()), %error, "retrying");
            }
            let connection = match target {
                Some(addr) => self.connection_to(addr).await,
                None => self.connection().await,
            };
            let error = match connection {
                Ok(connection) => match connection.call(op.clone(), left, self.consistency).await {
                    Ok(reply) => return Ok(reply),
                    Err(error) => error,
                },
                Err(error) => error,
            };
            if matches!(error.kind(), Some(ErrorKind::NotReplica | ErrorKind::Unavailable)) {
                self.refresh_ring_soon().await;
            }
            let go_on = attempts.go_on(error.failure());
            // An error that says the request may be applied stands, and so
            // does a replica's over the seed's (which says less).
            let stands = last.as_ref().is_some_and(|last| last.is_ambiguous() && !error.is_ambiguous());
            if !stands && (target.is_some() || last.is_none()) {
                last = Some(error);
            }
            if !go_on {
                break;
            }
        }
        Err(last.unwrap_or_else(|| Error::Timeout { addr: targets.join(", "), timeout: self.timeout }))
    }

    async fn call_done(&self, key: &[u8], op: Op, causal: bool) -> Result<()> {
        match self.call_key(key, op, causal).await? {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected Done, got {other:?}"))),
        }
    }

    /// The value of `key`, or `None` if it is absent or deleted.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        let key = key.as_ref();
        match self.call_key(key, Op::Get { key: key.to_vec() }, false).await? {
            Reply::Value(value) => Ok(value.map(Bytes::from)),
            other => Err(Error::Protocol(format!("expected a value, got {other:?}"))),
        }
    }

    /// The values of several keys, in the order asked (like Redis MGET): one
    /// request per replica set, sent concurrently. At most the node's bulk
    /// entry limit (100,000) per call.
    pub async fn get_many<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = K>) -> Result<Vec<Option<Bytes>>> {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|k| k.as_ref().to_vec()).collect();
        let Some(routes) = self.routes().await else { return self.get_group(&[], keys).await };
        let groups = routes.split(keys.iter().map(Vec::as_slice));
        let mut values = vec![None; keys.len()];
        let parts = routing::deal(keys, &groups);
        let asks = groups.iter().zip(parts).map(|(group, keys)| self.get_group(&group.targets, keys));
        for (group, answer) in groups.iter().zip(join_all(asks.collect()).await) {
            for (&index, value) in group.indices.iter().zip(answer?) {
                if let Some(slot) = values.get_mut(index) {
                    *slot = value;
                }
            }
        }
        Ok(values)
    }

    /// One `GetMany` to `targets` (empty: the seed).
    async fn get_group(&self, targets: &[String], keys: Vec<Vec<u8>>) -> Result<Vec<Option<Bytes>>> {
        let asked = keys.len();
        match self.call_at(targets, Op::GetMany { keys }, false).await? {
            Reply::Values(values) if values.len() == asked => {
                Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
            }
            other => Err(Error::Protocol(format!("expected {asked} values, got {other:?}"))),
        }
    }

    /// Stores `value` under `key`. Returns once it is durable (fsynced).
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let key = key.as_ref();
        self.call_done(key, Op::Set { key: key.to_vec(), value: value.as_ref().to_vec() }, false).await
    }

    /// Stores `value` under `key` with its own vector (of the nodes'
    /// embedding dimension, 50 by default): similarity searches find the
    /// value at `vector` rather than at its text's embedding, until a later
    /// write of `key` without one. Returns once durable.
    pub async fn set_with_vector(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, vector: &[f32]) -> Result<()> {
        let (key, value) = (key.as_ref().to_vec(), value.as_ref().to_vec());
        let first = key.clone();
        self.call_done(&first, Op::SetWithVector { key, value, vector: vector.to_vec() }, false).await
    }

    /// Deletes `key`. Returns once the delete is durable. Deleting an absent
    /// key succeeds.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let key = key.as_ref();
        self.call_done(key, Op::Delete { key: key.to_vec() }, false).await
    }

    /// Stores every entry; returns once durable. A key given twice takes
    /// its last value. All or nothing: after any crash, either every entry
    /// is there or none is, and concurrent bulk sets over the same keys
    /// never mix. In a cluster it goes to a replica of its first key, which
    /// logs it on two nodes before any replica gets its part, so a batch
    /// whose coordinator dies is completed by the other; while it is being
    /// applied, a reader may see some of its keys and not others (see the
    /// README's "A cluster").
    pub async fn bulk_set<K, V>(&self, entries: impl IntoIterator<Item = (K, V)>) -> Result<()>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let entries: Vec<(Vec<u8>, Vec<u8>)> =
            entries.into_iter().map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec())).collect();
        let first = entries.first().map(|(key, _)| key.clone()).unwrap_or_default();
        match self.call_key(&first, Op::BulkSet { entries }, false).await? {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected Done, got {other:?}"))),
        }
    }

    /// Every live version of `key` (value or tombstone, and its timestamp),
    /// oldest first (the last is what [`Client::get`] returns), and the
    /// context to write back with. No versions: the key was never written.
    pub async fn get_versions(&self, key: impl AsRef<[u8]>) -> Result<Versions> {
        let key = key.as_ref();
        match self.call_key(key, Op::GetVersions { key: key.to_vec() }, false).await? {
            Reply::Versions(versions) => Ok(versions),
            other => Err(Error::Protocol(format!("expected versions, got {other:?}"))),
        }
    }

    /// A causal write: stores `value` under `key`, replacing exactly the
    /// versions `context` (from [`Client::get_versions`] of the same key)
    /// covers. Versions written meanwhile by others stay, as siblings.
    /// Returns once durable.
    pub async fn set_with_context(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        context: &ContextToken,
    ) -> Result<()> {
        let (key, value) = (key.as_ref(), Some(value.as_ref().to_vec()));
        self.call_done(key, Op::SetWithContext { key: key.to_vec(), value, context: context.clone() }, true).await
    }

    /// A causal delete: replaces exactly the versions `context` covers with
    /// a tombstone. Returns once durable.
    pub async fn delete_with_context(&self, key: impl AsRef<[u8]>, context: &ContextToken) -> Result<()> {
        let key = key.as_ref();
        self.call_done(key, Op::SetWithContext { key: key.to_vec(), value: None, context: context.clone() }, true).await
    }

    /// Full-text search: the `k` keys whose values best match `query`
    /// (BM25), best first, with their scores and values. A value matches
    /// when it holds any of the query's words, `"quoted phrases"` or
    /// `prefix*`es. Needs nodes started with `--index`; `k` is 1..=1000.
    pub async fn search_text(&self, query: &str, k: u32) -> Result<Vec<SearchHit>> {
        self.search_text_with(query, k, TextSearch::default()).await
    }

    /// [`Client::search_text`], where a value must match every word,
    /// phrase and prefix of the query.
    pub async fn search_text_all(&self, query: &str, k: u32) -> Result<Vec<SearchHit>> {
        self.search_text_with(query, k, TextSearch { all: true, ..TextSearch::default() }).await
    }

    /// [`Client::search_text`] with options.
    pub async fn search_text_with(&self, query: &str, k: u32, options: TextSearch) -> Result<Vec<SearchHit>> {
        let TextSearch { all, global_stats } = options;
        self.hits(Op::SearchText { query: query.to_owned(), k, all, global_stats }).await
    }

    /// The `k` values about the same things as `text`, nearest first, with
    /// their cosine similarity (1: the same direction): values are embedded
    /// with word vectors (GloVe by default), so "king" finds values about
    /// queens and thrones. Needs nodes started with `--index`.
    pub async fn search_similar(&self, text: &str, k: u32) -> Result<Vec<SearchHit>> {
        self.hits(Op::SearchSimilar { text: text.to_owned(), k }).await
    }

    /// The `k` values whose vectors are nearest `vector` (of the nodes'
    /// embedding dimension, 50 by default), nearest first.
    pub async fn search_vector(&self, vector: &[f32], k: u32) -> Result<Vec<SearchHit>> {
        self.hits(Op::SearchVector { vector: vector.to_vec(), k }).await
    }

    async fn hits(&self, op: Op) -> Result<Vec<SearchHit>> {
        match self.call(op).await? {
            Reply::Hits(hits) => Ok(hits),
            other => Err(Error::Protocol(format!("expected hits, got {other:?}"))),
        }
    }

    /// The node's id, addresses, key count, bytes on disk and uptime.
    pub async fn status(&self) -> Result<NodeStatus> {
        match self.call(Op::Status).await? {
            Reply::Status(status) => Ok(*status),
            other => Err(Error::Protocol(format!("expected a status, got {other:?}"))),
        }
    }

    /// In a cluster: runs an anti-entropy round on the connected node now
    /// (its hash trees against each other replica's, every difference
    /// repaired both ways) and waits at most `timeout` for what it did. A
    /// round covers the keys that node replicates: run it on every node to
    /// cover every key (in a cluster of as many nodes as replicas, one
    /// node's round covers all of them).
    pub async fn repair(&self, timeout: Duration) -> Result<RepairReport> {
        match self.connection().await?.call(Op::Repair, timeout, self.consistency).await? {
            Reply::Repaired(report) => Ok(report),
            other => Err(Error::Protocol(format!("expected a repair's report, got {other:?}"))),
        }
    }

    /// In a cluster: the connected node compares its hash trees with a
    /// fresh scan of its data (while writes go on) and says which keys'
    /// leaves differ (none, if the trees are right).
    pub async fn check_trees(&self, timeout: Duration) -> Result<TreesCheck> {
        match self.connection().await?.call(Op::CheckTrees, timeout, self.consistency).await? {
            Reply::TreesChecked(check) => Ok(check),
            other => Err(Error::Protocol(format!("expected a trees check, got {other:?}"))),
        }
    }

    /// Merges every table of the connected node's storage into one now
    /// (dropping overwritten versions, and the tombstones that may go), and
    /// waits at most `timeout` for it.
    pub async fn compact(&self, timeout: Duration) -> Result<()> {
        match self.connection().await?.call(Op::Compact, timeout, self.consistency).await? {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected Done, got {other:?}"))),
        }
    }

    /// Admin: asks the connected node to shut down gracefully. `token` is
    /// the node's admin token (the `ADMIN_TOKEN` file in its data
    /// directory); without it the node answers [`ErrorKind::Forbidden`].
    pub async fn shutdown_node(&self, token: &str) -> Result<()> {
        match self.call(Op::Shutdown { token: token.to_owned() }).await? {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected Done, got {other:?}"))),
        }
    }

    /// The limits of the node this client is connected to, as it said when
    /// the connection opened. Requests over them fail before they are sent.
    pub async fn limits(&self) -> Result<Limits> {
        Ok(self.connection().await?.info().limits.clone())
    }
}
