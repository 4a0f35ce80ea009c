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
//! One connection carries every concurrent call (answers are matched by id),
//! so a single `Client` shared by many tasks keeps many requests in flight.
//! If the connection breaks, the next call reconnects, trying each seed in
//! turn. A write that fails with [`Error::is_ambiguous`] may or may not have
//! been applied. [`blocking::Client`] offers the same calls to plain threads.

pub mod blocking;
mod connection;
mod error;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use error::{Error, Result};
pub use quiver_ring::wire::{Consistency, ContextToken, ErrorKind, Limits, NodeStatus, VersionInfo, Versions};
use quiver_ring::wire::{Op, Reply};
pub use quiver_ring::Hlc;
use tokio::sync::Mutex;

use connection::Connection;

/// Locks a mutex, going on after a panic elsewhere poisoned it: the values
/// behind these locks are replaced whole, never left half-changed.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Default time a call waits for its answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An async Quiver client.
#[derive(Debug)]
pub struct Client {
    seeds: Vec<String>,
    /// The live connection. A plain mutex held only to clone the `Arc`, so
    /// concurrent calls do not queue behind each other.
    current: std::sync::Mutex<Option<Arc<Connection>>>,
    /// Serialises reconnecting, which awaits.
    reconnecting: Mutex<()>,
    timeout: Duration,
    hlc: Arc<AtomicU64>,
    /// Asked of the node with every request (`None`: the node's default).
    consistency: Option<Consistency>,
}

impl Client {
    /// Connects to the first seed that answers.
    pub async fn connect<I, A>(seeds: I) -> Result<Client>
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        let client = Client {
            seeds: seeds.into_iter().map(Into::into).collect(),
            current: std::sync::Mutex::new(None),
            reconnecting: Mutex::new(()),
            timeout: DEFAULT_TIMEOUT,
            hlc: Arc::default(),
            consistency: None,
        };
        client.connection().await?;
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

    fn live(&self) -> Option<Arc<Connection>> {
        let current = lock(&self.current);
        current.as_ref().filter(|c| !c.is_broken()).cloned()
    }

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

    async fn call(&self, op: Op) -> Result<Reply> {
        self.connection().await?.call(op, self.timeout, self.consistency).await
    }

    async fn call_done(&self, op: Op) -> Result<()> {
        match self.call(op).await? {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!("expected Done, got {other:?}"))),
        }
    }

    /// The value of `key`, or `None` if it is absent or deleted.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        match self.call(Op::Get { key: key.as_ref().to_vec() }).await? {
            Reply::Value(value) => Ok(value.map(Bytes::from)),
            other => Err(Error::Protocol(format!("expected a value, got {other:?}"))),
        }
    }

    /// The values of several keys in one request, in the order asked (like
    /// Redis MGET). At most the node's bulk entry limit (100,000) per call.
    pub async fn get_many<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = K>) -> Result<Vec<Option<Bytes>>> {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|k| k.as_ref().to_vec()).collect();
        let asked = keys.len();
        match self.call(Op::GetMany { keys }).await? {
            Reply::Values(values) if values.len() == asked => {
                Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
            }
            other => Err(Error::Protocol(format!("expected {asked} values, got {other:?}"))),
        }
    }

    /// Stores `value` under `key`. Returns once it is durable (fsynced).
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        self.call_done(Op::Set { key: key.as_ref().to_vec(), value: value.as_ref().to_vec() }).await
    }

    /// Deletes `key`. Returns once the delete is durable. Deleting an absent
    /// key succeeds.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.call_done(Op::Delete { key: key.as_ref().to_vec() }).await
    }

    /// Stores every entry, all or nothing: after a crash either every entry
    /// is there or none is, and no reader ever sees part of it. A key given
    /// twice takes its last value. Returns once durable.
    pub async fn bulk_set<K, V>(&self, entries: impl IntoIterator<Item = (K, V)>) -> Result<()>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let entries = entries.into_iter().map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec())).collect();
        self.call_done(Op::BulkSet { entries }).await
    }

    /// Every live version of `key` (value or tombstone, and its timestamp),
    /// oldest first (the last is what [`Client::get`] returns), and the
    /// context to write back with. No versions: the key was never written.
    pub async fn get_versions(&self, key: impl AsRef<[u8]>) -> Result<Versions> {
        match self.call(Op::GetVersions { key: key.as_ref().to_vec() }).await? {
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
        let (key, value) = (key.as_ref().to_vec(), Some(value.as_ref().to_vec()));
        self.call_done(Op::SetWithContext { key, value, context: context.clone() }).await
    }

    /// A causal delete: replaces exactly the versions `context` covers with
    /// a tombstone. Returns once durable.
    pub async fn delete_with_context(&self, key: impl AsRef<[u8]>, context: &ContextToken) -> Result<()> {
        self.call_done(Op::SetWithContext { key: key.as_ref().to_vec(), value: None, context: context.clone() }).await
    }

    /// The node's id, addresses, key count, bytes on disk and uptime.
    pub async fn status(&self) -> Result<NodeStatus> {
        match self.call(Op::Status).await? {
            Reply::Status(status) => Ok(status),
            other => Err(Error::Protocol(format!("expected a status, got {other:?}"))),
        }
    }

    /// Admin: asks the connected node to shut down gracefully. `token` is
    /// the node's admin token (the `ADMIN_TOKEN` file in its data
    /// directory); without it the node answers [`ErrorKind::Forbidden`].
    pub async fn shutdown_node(&self, token: &str) -> Result<()> {
        self.call_done(Op::Shutdown { token: token.to_owned() }).await
    }

    /// The limits of the node this client is connected to, as it said when
    /// the connection opened. Requests over them fail before they are sent.
    pub async fn limits(&self) -> Result<Limits> {
        Ok(self.connection().await?.info().limits.clone())
    }
}
