//! The client for plain threads: the same calls as [`crate::Client`], each
//! blocking until its answer. Must not be used from inside an async runtime.

use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::NodeStatus;

/// A blocking Quiver client. It runs a small runtime of its own.
#[derive(Debug)]
pub struct Client {
    runtime: tokio::runtime::Runtime,
    inner: crate::Client,
}

impl Client {
    /// Connects to the first seed that answers.
    pub fn connect<I, A>(seeds: I) -> Result<Client>
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("quiver-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Connect { addrs: Vec::new(), last: format!("starting the client runtime: {e}") })?;
        let inner = runtime.block_on(crate::Client::connect(seeds))?;
        Ok(Client { runtime, inner })
    }

    /// Sets how long each call waits for its answer.
    pub fn with_timeout(self, timeout: Duration) -> Client {
        Client { inner: self.inner.with_timeout(timeout), runtime: self.runtime }
    }

    /// See [`crate::Client::with_consistency`].
    pub fn with_consistency(self, consistency: crate::Consistency) -> Client {
        Client { inner: self.inner.with_consistency(consistency), runtime: self.runtime }
    }

    /// See [`crate::Client::with_ring_refresh`].
    pub fn with_ring_refresh(self, every: Duration) -> Client {
        Client { inner: self.inner.with_ring_refresh(every), runtime: self.runtime }
    }

    /// See [`crate::Client::direct`].
    pub fn direct(self) -> Client {
        Client { inner: self.inner.direct(), runtime: self.runtime }
    }

    /// See [`crate::Client::get`].
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.runtime.block_on(self.inner.get(key))
    }

    /// See [`crate::Client::get_many`].
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: impl IntoIterator<Item = K>) -> Result<Vec<Option<Bytes>>> {
        self.runtime.block_on(self.inner.get_many(keys))
    }

    /// See [`crate::Client::set`].
    pub fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        self.runtime.block_on(self.inner.set(key, value))
    }

    /// See [`crate::Client::delete`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.runtime.block_on(self.inner.delete(key))
    }

    /// See [`crate::Client::node_for`].
    pub fn node_for(&self, key: impl AsRef<[u8]>) -> Option<String> {
        self.runtime.block_on(self.inner.node_for(key))
    }

    /// See [`crate::Client::bulk_set`].
    pub fn bulk_set<K, V>(&self, entries: impl IntoIterator<Item = (K, V)>) -> Result<()>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        self.runtime.block_on(self.inner.bulk_set(entries))
    }

    /// See [`crate::Client::get_versions`].
    pub fn get_versions(&self, key: impl AsRef<[u8]>) -> Result<crate::Versions> {
        self.runtime.block_on(self.inner.get_versions(key))
    }

    /// See [`crate::Client::set_with_context`].
    pub fn set_with_context(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        context: &crate::ContextToken,
    ) -> Result<()> {
        self.runtime.block_on(self.inner.set_with_context(key, value, context))
    }

    /// See [`crate::Client::delete_with_context`].
    pub fn delete_with_context(&self, key: impl AsRef<[u8]>, context: &crate::ContextToken) -> Result<()> {
        self.runtime.block_on(self.inner.delete_with_context(key, context))
    }

    /// See [`crate::Client::search_text`].
    pub fn search_text(&self, query: &str, k: u32) -> Result<Vec<crate::SearchHit>> {
        self.runtime.block_on(self.inner.search_text(query, k))
    }

    /// See [`crate::Client::search_text_all`].
    pub fn search_text_all(&self, query: &str, k: u32) -> Result<Vec<crate::SearchHit>> {
        self.runtime.block_on(self.inner.search_text_all(query, k))
    }

    /// See [`crate::Client::search_text_with`].
    pub fn search_text_with(&self, query: &str, k: u32, options: crate::TextSearch) -> Result<Vec<crate::SearchHit>> {
        self.runtime.block_on(self.inner.search_text_with(query, k, options))
    }

    /// See [`crate::Client::set_with_vector`].
    pub fn set_with_vector(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, vector: &[f32]) -> Result<()> {
        self.runtime.block_on(self.inner.set_with_vector(key, value, vector))
    }

    /// See [`crate::Client::search_similar`].
    pub fn search_similar(&self, text: &str, k: u32) -> Result<Vec<crate::SearchHit>> {
        self.runtime.block_on(self.inner.search_similar(text, k))
    }

    /// See [`crate::Client::search_vector`].
    pub fn search_vector(&self, vector: &[f32], k: u32) -> Result<Vec<crate::SearchHit>> {
        self.runtime.block_on(self.inner.search_vector(vector, k))
    }

    /// See [`crate::Client::retries`].
    pub fn retries(&self) -> crate::retry::Retries {
        self.inner.retries()
    }

    /// See [`crate::Client::status`].
    pub fn status(&self) -> Result<NodeStatus> {
        self.runtime.block_on(self.inner.status())
    }

    /// See [`crate::Client::repair`].
    pub fn repair(&self, timeout: std::time::Duration) -> Result<crate::RepairReport> {
        self.runtime.block_on(self.inner.repair(timeout))
    }

    /// See [`crate::Client::check_trees`].
    pub fn check_trees(&self, timeout: std::time::Duration) -> Result<crate::TreesCheck> {
        self.runtime.block_on(self.inner.check_trees(timeout))
    }

    /// See [`crate::Client::compact`].
    pub fn compact(&self, timeout: std::time::Duration) -> Result<()> {
        self.runtime.block_on(self.inner.compact(timeout))
    }

    /// See [`crate::Client::limits`].
    pub fn limits(&self) -> Result<crate::Limits> {
        self.runtime.block_on(self.inner.limits())
    }

    /// See [`crate::Client::shutdown_node`].
    pub fn shutdown_node(&self, token: &str) -> Result<()> {
        self.runtime.block_on(self.inner.shutdown_node(token))
    }
}
