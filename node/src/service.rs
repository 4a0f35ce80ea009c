//! What a node does with each client request, on one node: validate it
//! against the limits, stamp writes, write them through the engine (durable
//! when it returns), and read.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quiver_ring::rand::{threshold, AtomicSplitMix64};
use quiver_ring::wire::{ErrorKind, NodeStatus, Op, Reply, ServerError};
use quiver_ring::{Hlc, NodeId, Stamper};
use tokio::sync::watch;

use crate::config::Limits;
use crate::storage::{self, Engine};
use crate::{lock, now_ms};

/// Keys and values of one write; `None` deletes.
type Entries = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The request handler shared by every connection.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    stamper: Mutex<Stamper>,
    limits: Limits,
    node_id: NodeId,
    client_addr: String,
    peer_addr: String,
    started: Instant,
    shutdown: watch::Sender<bool>,
    /// Test-only fault: the fraction of writes acknowledged but not written,
    /// scaled to `u64::MAX`, and the generator that picks them.
    drop_threshold: u64,
    drop_rng: AtomicSplitMix64,
}

fn invalid(kind: ErrorKind, message: String) -> ServerError {
    ServerError::new(kind, message)
}

impl Service {
    /// A service over an open engine. Its clock starts above every timestamp
    /// already stored.
    pub fn new(
        engine: Arc<Engine>,
        node_id: NodeId,
        limits: Limits,
        client_addr: String,
        peer_addr: String,
    ) -> Service {
        let stamper = Mutex::new(Stamper::new(node_id, engine.max_hlc()));
        let (shutdown, _) = watch::channel(false);
        Service {
            engine,
            stamper,
            limits,
            node_id,
            client_addr,
            peer_addr,
            started: Instant::now(),
            shutdown,
            drop_threshold: 0,
            drop_rng: AtomicSplitMix64::new(now_ms()),
        }
    }

    /// Test-only: acknowledges `probability` of writes without writing them,
    /// so tests can prove that the chaos checker reports lost writes.
    pub fn with_dropped_writes(mut self, probability: f64) -> Service {
        self.drop_threshold = threshold(probability);
        self
    }

    fn drop_this_write(&self) -> bool {
        self.drop_threshold > 0 && self.drop_rng.next_u64() < self.drop_threshold
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
    pub fn hlc(&self) -> u64 {
        lock(&self.stamper).last().0
    }

    /// The per-request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ServerError> {
        if key.is_empty() {
            return Err(invalid(ErrorKind::EmptyKey, "keys must be at least one byte".into()));
        }
        if key.len() > self.limits.key_bytes_max {
            return Err(invalid(
                ErrorKind::KeyTooLarge,
                format!("key of {} bytes exceeds the limit of {} bytes", key.len(), self.limits.key_bytes_max),
            ));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), ServerError> {
        if value.len() > self.limits.value_bytes_max {
            return Err(invalid(
                ErrorKind::ValueTooLarge,
                format!("value of {} bytes exceeds the limit of {} bytes", value.len(), self.limits.value_bytes_max),
            ));
        }
        Ok(())
    }

    /// Handles one request and calls `reply` with the answer: at once for
    /// reads and refusals, and for writes once they are durable (then from
    /// one of the engine's threads, so `reply` must be quick).
    pub fn start(&self, hlc_seen: u64, op: Op, reply: impl FnOnce(Result<Reply, ServerError>) + Send + 'static) {
        match op {
            Op::Set { .. } | Op::Delete { .. } | Op::BulkSet { .. } => match self.entries(op) {
                Ok(entries) => self.write_then(hlc_seen, entries, reply),
                Err(error) => reply(Err(error)),
            },
            read => reply(self.read(hlc_seen, read)),
        }
    }

    /// Answers a request that writes nothing.
    fn read(&self, hlc_seen: u64, op: Op) -> Result<Reply, ServerError> {
        match op {
            Op::Get { key } => {
                self.check_key(&key)?;
                self.observe(hlc_seen);
                let siblings = self.engine.get(&key).map_err(storage_error)?;
                Ok(Reply::Value(siblings.and_then(|s| s.value().map(<[u8]>::to_vec))))
            }
            Op::GetMany { keys } => {
                if keys.len() > self.limits.bulk_entries_max {
                    return Err(invalid(
                        ErrorKind::BulkTooLarge,
                        format!("{} keys exceed the limit of {} per request", keys.len(), self.limits.bulk_entries_max),
                    ));
                }
                keys.iter().try_for_each(|key| self.check_key(key))?;
                self.observe(hlc_seen);
                let values = keys
                    .iter()
                    .map(|key| Ok(self.engine.get(key)?.and_then(|s| s.value().map(<[u8]>::to_vec))))
                    .collect::<Result<_, storage::Error>>()
                    .map_err(storage_error)?;
                Ok(Reply::Values(values))
            }
            Op::Status => {
                let stats = self.engine.stats();
                Ok(Reply::Status(NodeStatus {
                    node_id: self.node_id.0,
                    client_addr: self.client_addr.clone(),
                    peer_addr: self.peer_addr.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    keys: stats.table_entries + stats.memtable_entries as u64,
                    bytes_on_disk: self.engine.disk_bytes().map_err(storage_error)?,
                    uptime_ms: self.started.elapsed().as_millis() as u64,
                }))
            }
            Op::Shutdown => {
                tracing::info!("shutdown requested by a client");
                self.request_shutdown();
                Ok(Reply::Done)
            }
            Op::Set { .. } | Op::Delete { .. } | Op::BulkSet { .. } => {
                Err(ServerError::new(ErrorKind::Internal, "a write was routed to the read path"))
            }
        }
    }

    /// Checks a write against the limits; the keys and values to write.
    fn entries(&self, op: Op) -> Result<Entries, ServerError> {
        match op {
            Op::Set { key, value } => {
                self.check_key(&key)?;
                self.check_value(&value)?;
                Ok(vec![(key, Some(value))])
            }
            Op::Delete { key } => {
                self.check_key(&key)?;
                Ok(vec![(key, None)])
            }
            Op::BulkSet { entries } => {
                if entries.len() > self.limits.bulk_entries_max {
                    return Err(invalid(
                        ErrorKind::BulkTooLarge,
                        format!(
                            "bulk set of {} entries exceeds the limit of {}",
                            entries.len(),
                            self.limits.bulk_entries_max
                        ),
                    ));
                }
                let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
                if bytes > self.limits.bulk_bytes_max {
                    return Err(invalid(
                        ErrorKind::BulkTooLarge,
                        format!("bulk set of {bytes} bytes exceeds the limit of {} bytes", self.limits.bulk_bytes_max),
                    ));
                }
                for (key, value) in &entries {
                    self.check_key(key)?;
                    self.check_value(value)?;
                }
                // A key given twice takes its last value (as Redis MSET
                // does): reversed, a stable sort puts each key's last value
                // first among its equals, and `dedup` keeps the first.
                let mut entries = entries;
                entries.reverse();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                entries.dedup_by(|later, first| later.0 == first.0);
                Ok(entries.into_iter().map(|(k, v)| (k, Some(v))).collect())
            }
            other => Err(ServerError::new(ErrorKind::Internal, format!("{other:?} is not a write"))),
        }
    }

    fn observe(&self, hlc_seen: u64) {
        lock(&self.stamper).observe(Hlc(hlc_seen));
    }

    /// Stamps every entry with one `(hlc, origin)` and writes them as one WAL
    /// record (all or nothing); `reply` is called once it is durable.
    fn write_then(
        &self,
        hlc_seen: u64,
        entries: Entries,
        reply: impl FnOnce(Result<Reply, ServerError>) + Send + 'static,
    ) {
        let stamp = {
            let mut stamper = lock(&self.stamper);
            stamper.observe(Hlc(hlc_seen));
            stamper.next(now_ms())
        };
        if self.drop_this_write() {
            return reply(Ok(Reply::Done));
        }
        let ops = entries.into_iter().map(|(key, value)| storage::Op { key, version: stamp.blind(value) }).collect();
        self.engine.write_then(ops, move |result| reply(result.map(|_| Reply::Done).map_err(storage_error)));
    }
}

fn storage_error(error: storage::Error) -> ServerError {
    let kind = match &error {
        storage::Error::Closed => ErrorKind::ShuttingDown,
        storage::Error::TooLarge { .. } => ErrorKind::BulkTooLarge,
        storage::Error::Failed(_) | storage::Error::Io { .. } => ErrorKind::StorageFailed,
        _ => ErrorKind::Internal,
    };
    ServerError::new(kind, error.to_string())
}

/// Reads the node's id from `DIR/NODE_ID`, or makes one and stores it
/// (synced) on first start.
pub fn load_or_create_node_id(dir: &Path) -> std::io::Result<NodeId> {
    let path = dir.join("NODE_ID");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(NodeId)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = now_ms() ^ (u64::from(std::process::id()) << 32) ^ dir.as_os_str().len() as u64;
            let id = xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()).max(1);
            let tmp = dir.join("NODE_ID.tmp");
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, format!("{id}\n").as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(NodeId(id))
        }
        Err(e) => Err(e),
    }
}
