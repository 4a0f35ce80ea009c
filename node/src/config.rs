//! `quiverd`'s settings: defaults, an optional TOML file, then flags.
//!
//! ```toml
//! data_dir = "./quiver-data"
//! client_addr = "127.0.0.1:7700"
//! peer_addr = "127.0.0.1:7701"
//! max_clock_offset_ms = 500  # a timestamp further ahead is refused
//! gc_grace_secs = 864000      # tombstones are kept at least this long (10 days)
//! index = false               # index values for search (full text, similar)
//! word_vectors = "glove.6B.300d.txt"  # embed with these (default: the GloVe 50-d shipped)
//! debug_skip_write_probability = 0.0
//!
//! # In a cluster (all three, or none):
//! name = "n1"                 # this node's name, as in its certificate
//! tls_dir = "tls/n1"          # ca.pem, n1.pem, n1.key, cluster.secret; never ca.key (`quiver certs`)
//! peers = ["n2=127.0.0.1:7711", "n3=127.0.0.1:7721"]
//! deny_nodes = []             # members whose certificates are no longer trusted (a lost machine)
//! hint_bytes_max = 1073741824 # hints held for one node that is down, at most
//! hint_age_max_secs = 10800   # a hint older than this is dropped (3 hours)
//! heartbeat_ms = 1000         # peers are pinged this often; one that misses a ping is down
//! op_timeout_ms = 5000        # a quorum operation, or a call to a peer, waits this long
//! hint_tick_ms = 1000         # hints go to their owners, the batch log is looked at, this often
//! batch_replay_after_ms = 10000  # a bulk set logged this long ago is replayed (at least op_timeout_ms)
//! anti_entropy_ms = 600000    # replicas compare their hash trees this often (0: only on `quiver repair`)
//! repair_bytes_per_sec = 16777216  # what anti-entropy repairs send and pull, at most
//! repair_keys_per_sec = 50000
//!
//! [limits]
//! key_bytes_max = 4096
//! value_bytes_max = 4194304
//! bulk_entries_max = 100000
//! bulk_bytes_max = 67108864
//! frame_bytes_max = 75497472
//! requests_in_flight_max = 4096
//! connections_max = 4096            # more client connections are refused (TooManyConnections)
//! connection_answer_bytes_max = 33554432  # answers not yet written; past it the node stops reading
//! idle_timeout_secs = 300           # a connection with nothing to do, or whose client stopped reading
//! hello_timeout_ms = 5000           # a connection must open with Hello within this
//! shutdown_grace_ms = 5000          # at shutdown, answers a client does not read are dropped after this
//! peer_requests_in_flight_max = 262144   # per peer link (a get_many sends one per key); past it a part is hinted
//! peer_queued_bytes_max = 268435456      # per peer link; past it a replica's part is hinted instead
//! peer_socket_buffer_bytes = 4194304     # the peer UDP socket's kernel buffers (capped by net.core.rmem_max)
//! tree_feed_keys_max = 1048576  # written keys waiting to reach the hash trees; past it they are rebuilt by a scan
//!
//! [storage]
//! memtable_bytes_max = 67108864
//! wal_segment_bytes = 67108864
//! block_cache_bytes = 0
//! value_cache_bytes = 268435456
//! warm_value_cache = true   # flushes put what they wrote in the value cache's free room
//! read_threads = 0          # 0: one per core, at least 2
//! repair = false
//! disk_reserve_bytes = 1073741824   # below it client writes get DiskFull (default: max(1 GiB, 5 %))
//! disk_reserve_peer_bytes = 268435456  # below it peers' writes too (default: a quarter of the above)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// More reader threads than this only add context switches.
const READ_THREADS_MAX: usize = 256;

/// Everything `quiverd` can be told.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub client_addr: String,
    /// The node-to-node (QUIC) address; announced in `status`, used by the
    /// cluster layer.
    pub peer_addr: String,
    /// The largest distance between clocks the node accepts: a client's or
    /// peer's timestamp further ahead of its wall clock is refused, and the
    /// node refuses to stamp while its own clock is further ahead.
    pub max_clock_offset_ms: u64,
    /// The node's name in its cluster (its certificate's name).
    pub name: Option<String>,
    /// Where the cluster CA's certificate and this node's certificate and
    /// key are.
    pub tls_dir: Option<PathBuf>,
    /// The other nodes, as `NAME=HOST:PORT` (their peer addresses).
    pub peers: Vec<String>,
    /// Members refused cluster-wide (set on every node): their connections
    /// are closed and they are never dialled, so a lost machine's
    /// certificate is no longer trusted without a new CA. They stay in the
    /// ring, down: their writes are hinted.
    pub deny_nodes: Vec<String>,
    /// A tombstone is kept at least this long; a version from a peer older
    /// than now minus this is refused (its tombstone may be gone). A node
    /// in a cluster keeps every tombstone (no anti-entropy repair yet).
    pub gc_grace_secs: u64,
    /// The bytes of hints a node holds for one peer that is down, at most.
    pub hint_bytes_max: u64,
    /// A hint older than this is dropped undelivered: well within
    /// `gc_grace_secs` (at most half of it).
    pub hint_age_max_secs: u64,
    /// Each peer is pinged this often, and a ping waits this long: a peer
    /// that misses one is down.
    pub heartbeat_ms: u64,
    /// How long a quorum operation waits for its replicas, and a call to a
    /// peer for its answer.
    pub op_timeout_ms: u64,
    /// How often hints go to their owners that are up, and the batch log
    /// is looked at for bulk sets to replay.
    pub hint_tick_ms: u64,
    /// A bulk set logged this long ago is replayed by whoever holds it (its
    /// coordinator died, or did not reach its quorum): at least
    /// `op_timeout_ms`.
    pub batch_replay_after_ms: u64,
    /// Replicas compare their hash trees and repair what differs this
    /// often (0: only when asked, `quiver repair`).
    pub anti_entropy_ms: u64,
    /// What anti-entropy's repairs send and pull, per second, at most.
    pub repair_bytes_per_sec: u64,
    pub repair_keys_per_sec: u64,
    /// Index the values for search: full text (BM25) and embeddings
    /// (HNSW). Every data write then also updates the index, in the same
    /// WAL record.
    pub index: bool,
    /// The word vectors values are embedded with (a GloVe, word2vec or
    /// fastText text file); `None`: the GloVe 6B 50-d words shipped.
    pub word_vectors: Option<PathBuf>,
    /// Test-only (a hidden `quiverd` flag): this node's wall clock reads
    /// this many ms ahead of the system's (negative: behind).
    #[serde(skip)]
    pub debug_clock_offset_ms: i64,
    pub debug_skip_write_probability: f64,
    /// Test-only (a hidden `quiverd` flag): acknowledge this fraction of
    /// writes without writing them. Never read from the file.
    #[serde(skip)]
    pub debug_drop_acked_writes: f64,
    /// Test-only (a hidden `quiverd` flag): exit right after logging the
    /// first bulk set. Never read from the file.
    #[serde(skip)]
    pub debug_exit_after_batch_log: bool,
    pub limits: Limits,
    pub storage: Storage,
}

/// Request limits, enforced by the node with a clear error for each.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub bulk_entries_max: usize,
    pub bulk_bytes_max: usize,
    pub frame_bytes_max: usize,
    /// Requests one connection may have in flight; more wait.
    pub requests_in_flight_max: usize,
    /// Client connections served at once; one more is refused with
    /// `TooManyConnections`.
    pub connections_max: usize,
    /// Bytes of answers a connection may have waiting to be written: past
    /// it the node reads no more of that connection's requests until its
    /// client has read enough (backpressure, no error).
    pub connection_answer_bytes_max: usize,
    /// A connection with nothing in flight that sends nothing for this
    /// long, or whose client takes no answer byte for this long, is closed
    /// (0: never).
    pub idle_timeout_secs: u64,
    /// A connection that has not sent its `Hello` within this is closed.
    pub hello_timeout_ms: u64,
    /// At shutdown, a connection whose client does not take its last
    /// answers is dropped after this.
    pub shutdown_grace_ms: u64,
    /// Requests sent on one peer link and not yet answered, at most (and
    /// requests from one peer answered at once): past it a request fails
    /// at once and a write's part for that peer is hinted.
    pub peer_requests_in_flight_max: usize,
    /// Bytes queued on one peer link and not yet sent, at most: past it
    /// as above.
    pub peer_queued_bytes_max: u64,
    /// The kernel's receive and send buffers asked for the peer UDP
    /// socket (the kernel grants at most `net.core.rmem_max`): datagrams
    /// arriving to a full buffer are dropped and sent again by QUIC.
    pub peer_socket_buffer_bytes: usize,
    /// Written keys waiting to be read back into the hash trees, at most:
    /// past it a write's keys are dropped (counted) and the trees rebuilt
    /// by a scan.
    pub tree_feed_keys_max: u64,
}

/// Storage engine knobs exposed to operators.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub memtable_bytes_max: usize,
    pub wal_segment_bytes: u64,
    /// Memory for the cache of table blocks that reads found (0: none).
    pub block_cache_bytes: usize,
    /// Memory for the cache of what reads found in the tables (0: none).
    pub value_cache_bytes: usize,
    /// Whether a flush puts what it wrote into the value cache's free room
    /// (never evicting what reads put there), so that a key just written
    /// is read from memory after its flush too.
    pub warm_value_cache: bool,
    /// Threads that serve reads (0: one per core, at least 2).
    pub read_threads: usize,
    /// Open a damaged WAL or manifest by keeping its valid prefix.
    pub repair: bool,
    /// Below this many free bytes on the data directory's file system,
    /// client writes get `DiskFull` (reads go on). Unset: the larger of
    /// 1 GiB and 5 % of the volume.
    pub disk_reserve_bytes: Option<u64>,
    /// Below this, other nodes' writes (replication, hints, repair) are
    /// refused too. Unset: a quarter of `disk_reserve_bytes`.
    pub disk_reserve_peer_bytes: Option<u64>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./quiver-data"),
            client_addr: "127.0.0.1:7700".into(),
            peer_addr: "127.0.0.1:7701".into(),
            max_clock_offset_ms: quiver_ring::MAX_OFFSET_MS,
            name: None,
            tls_dir: None,
            peers: Vec::new(),
            deny_nodes: Vec::new(),
            gc_grace_secs: 10 * 24 * 3600,
            hint_bytes_max: 1 << 30,
            hint_age_max_secs: 3 * 3600,
            heartbeat_ms: 1000,
            op_timeout_ms: 5000,
            hint_tick_ms: 1000,
            batch_replay_after_ms: 10_000,
            anti_entropy_ms: 600_000,
            repair_bytes_per_sec: 16 << 20,
            repair_keys_per_sec: 50_000,
            index: false,
            word_vectors: None,
            debug_clock_offset_ms: 0,
            debug_skip_write_probability: 0.0,
            debug_drop_acked_writes: 0.0,
            debug_exit_after_batch_log: false,
            limits: Limits::default(),
            storage: Storage::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        let wire = quiver_ring::wire::Limits::default();
        Limits {
            key_bytes_max: wire.key_bytes_max as usize,
            value_bytes_max: wire.value_bytes_max as usize,
            bulk_entries_max: wire.bulk_entries_max as usize,
            bulk_bytes_max: wire.bulk_bytes_max as usize,
            frame_bytes_max: wire.frame_bytes_max as usize,
            requests_in_flight_max: 4096,
            connections_max: 4096,
            connection_answer_bytes_max: 32 << 20,
            idle_timeout_secs: 300,
            hello_timeout_ms: 5000,
            shutdown_grace_ms: 5000,
            peer_requests_in_flight_max: 1 << 18,
            peer_queued_bytes_max: 256 << 20,
            peer_socket_buffer_bytes: 4 << 20,
            tree_feed_keys_max: 1 << 20,
        }
    }
}

impl Limits {
    /// The bounds of peer links. A peer frame carries a client's largest
    /// frame and the versions' metadata beside it.
    pub fn peer_links(&self) -> crate::net::peer::LinkBounds {
        crate::net::peer::LinkBounds {
            requests_in_flight_max: self.peer_requests_in_flight_max,
            queued_bytes_max: self.peer_queued_bytes_max,
            frame_bytes_max: self.frame_bytes_max.saturating_add(8 << 20),
            socket_buffer_bytes: self.peer_socket_buffer_bytes,
        }
    }

    /// How long a connection may do nothing (`None`: for ever).
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        (self.idle_timeout_secs > 0).then(|| std::time::Duration::from_secs(self.idle_timeout_secs))
    }

    /// The limits a client learns when it connects.
    pub fn wire(&self) -> quiver_ring::wire::Limits {
        quiver_ring::wire::Limits {
            key_bytes_max: self.key_bytes_max as u64,
            value_bytes_max: self.value_bytes_max as u64,
            bulk_entries_max: self.bulk_entries_max as u64,
            bulk_bytes_max: self.bulk_bytes_max as u64,
            frame_bytes_max: self.frame_bytes_max as u64,
        }
    }
}

impl Default for Storage {
    fn default() -> Storage {
        let engine = crate::storage::Options::default();
        Storage {
            memtable_bytes_max: engine.memtable_bytes_max,
            wal_segment_bytes: engine.wal_segment_bytes,
            block_cache_bytes: engine.block_cache_bytes,
            value_cache_bytes: engine.value_cache_bytes,
            warm_value_cache: engine.warm_value_cache_on_flush,
            read_threads: 0,
            repair: false,
            disk_reserve_bytes: None,
            disk_reserve_peer_bytes: None,
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML for these settings.
    #[error("parsing {}: {source}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// A configured peer: its name and peer address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub peer_addr: std::net::SocketAddr,
}

/// The timers of a node in a cluster (`Config`'s `heartbeat_ms`,
/// `op_timeout_ms`, `hint_tick_ms`, `batch_replay_after_ms`); tests set them
/// short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterTimers {
    pub heartbeat: Duration,
    pub op_timeout: Duration,
    pub hint_tick: Duration,
    pub batch_replay_after: Duration,
}

/// Segments whose keys one anti-entropy ask lists, at most (and what a
/// node answers).
pub const SEGMENTS_PER_ASK_MAX: usize = 64;

/// The settings of anti-entropy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepairSettings {
    /// Rounds start this often (`None`: only on demand).
    pub every: Option<Duration>,
    /// What repairs may send and pull, per second, at most.
    pub bytes_per_sec: u64,
    pub keys_per_sec: u64,
    /// Segments listed per ask.
    pub segments_per_ask: usize,
}

impl Default for RepairSettings {
    fn default() -> RepairSettings {
        Config::default().repair()
    }
}

impl Default for ClusterTimers {
    fn default() -> ClusterTimers {
        Config::default().cluster_timers()
    }
}

impl Config {
    /// Reads a TOML file; unset fields keep their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }

    /// Checks ranges that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String| Err(ConfigError::Invalid(what));
        if !(0.0..=1.0).contains(&self.debug_skip_write_probability) {
            return invalid(format!(
                "debug_skip_write_probability {} is not within 0..=1",
                self.debug_skip_write_probability
            ));
        }
        if self.hint_age_max_secs.saturating_mul(2) > self.gc_grace_secs {
            return invalid(format!(
                "hint_age_max_secs {} must be at most half of gc_grace_secs {}: a hint delivered after a \
                 tombstone was purged would bring its key back",
                self.hint_age_max_secs, self.gc_grace_secs
            ));
        }
        let l = &self.limits;
        if l.key_bytes_max == 0
            || l.requests_in_flight_max == 0
            || l.bulk_entries_max == 0
            || l.connections_max == 0
            || l.connection_answer_bytes_max == 0
            || l.hello_timeout_ms == 0
            || l.peer_requests_in_flight_max == 0
            || l.peer_queued_bytes_max == 0
            || l.tree_feed_keys_max == 0
        {
            return invalid(
                "key_bytes_max, bulk_entries_max, requests_in_flight_max, connections_max, \
                 connection_answer_bytes_max, hello_timeout_ms, peer_requests_in_flight_max, \
                 peer_queued_bytes_max and tree_feed_keys_max must be at least 1"
                    .into(),
            );
        }
        if l.frame_bytes_max > u32::MAX as usize {
            return invalid(format!("frame_bytes_max {} does not fit the 4-byte frame length", l.frame_bytes_max));
        }
        if self.name.is_some() != self.tls_dir.is_some() || (!self.peers.is_empty() && self.name.is_none()) {
            return invalid("a cluster node needs name, tls_dir and its peers together".into());
        }
        let peers = self.peer_configs()?;
        if let Some(name) = self.deny_nodes.iter().find(|n| !peers.iter().any(|p| &&p.name == n)) {
            return invalid(format!("deny_nodes names {name:?}, which is not one of this node's peers"));
        }
        if self.max_clock_offset_ms == 0 {
            return invalid("max_clock_offset_ms must be at least 1".into());
        }
        if self.heartbeat_ms == 0 || self.op_timeout_ms == 0 || self.hint_tick_ms == 0 {
            return invalid("heartbeat_ms, op_timeout_ms and hint_tick_ms must be at least 1".into());
        }
        if self.batch_replay_after_ms < self.op_timeout_ms {
            return invalid(format!(
                "batch_replay_after_ms {} must be at least op_timeout_ms {}: a bulk set is replayed only once its \
                 coordinator's own write has had its time",
                self.batch_replay_after_ms, self.op_timeout_ms
            ));
        }
        if self.storage.read_threads > READ_THREADS_MAX {
            return invalid(format!("read_threads {} is above {READ_THREADS_MAX}", self.storage.read_threads));
        }
        if l.frame_bytes_max < l.value_bytes_max + l.key_bytes_max + 64 {
            return invalid("frame_bytes_max must leave room for the largest key and value".into());
        }
        Ok(())
    }

    /// The cluster's timers.
    pub fn cluster_timers(&self) -> ClusterTimers {
        let ms = Duration::from_millis;
        ClusterTimers {
            heartbeat: ms(self.heartbeat_ms),
            op_timeout: ms(self.op_timeout_ms),
            hint_tick: ms(self.hint_tick_ms),
            batch_replay_after: ms(self.batch_replay_after_ms),
        }
    }

    /// The settings of anti-entropy.
    pub fn repair(&self) -> RepairSettings {
        RepairSettings {
            every: (self.anti_entropy_ms > 0).then(|| Duration::from_millis(self.anti_entropy_ms)),
            bytes_per_sec: self.repair_bytes_per_sec.max(1),
            keys_per_sec: self.repair_keys_per_sec.max(1),
            segments_per_ask: SEGMENTS_PER_ASK_MAX,
        }
    }

    /// The peers, parsed.
    pub fn peer_configs(&self) -> Result<Vec<PeerConfig>, ConfigError> {
        self.peers
            .iter()
            .map(|peer| {
                let invalid = || ConfigError::Invalid(format!("peer {peer:?} is not NAME=HOST:PORT"));
                let (name, addr) = peer.split_once('=').ok_or_else(invalid)?;
                let peer_addr = addr.parse().map_err(|_| invalid())?;
                Ok(PeerConfig { name: name.to_owned(), peer_addr })
            })
            .collect()
    }

    /// Reader threads: as configured, or one per core (at least 2).
    pub fn read_threads(&self) -> usize {
        match self.storage.read_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
            n => n,
        }
    }

    /// The engine options these settings imply.
    pub fn engine_options(&self) -> crate::storage::Options {
        crate::storage::Options {
            memtable_bytes_max: self.storage.memtable_bytes_max,
            wal_segment_bytes: self.storage.wal_segment_bytes,
            block_cache_bytes: self.storage.block_cache_bytes,
            value_cache_bytes: self.storage.value_cache_bytes,
            warm_value_cache_on_flush: self.storage.warm_value_cache,
            record_bytes_max: self.limits.frame_bytes_max.max(self.limits.bulk_bytes_max * 2),
            repair: self.storage.repair,
            debug_skip_write_probability: self.debug_skip_write_probability,
            // A node of a cluster purges only what anti-entropy covered:
            // its `purge` is set where its trees are made.
            tombstone_grace_ms: self.gc_grace_secs.saturating_mul(1000),
            ..crate::storage::Options::default()
        }
    }
}

impl Config {
    /// The embedder of this node's values: the word vectors of
    /// `word_vectors`, or those shipped.
    pub fn embedder(&self) -> Result<std::sync::Arc<dyn crate::index::embed::Embedder>, String> {
        use crate::index::embed::WordVectors;
        let vectors = match &self.word_vectors {
            Some(path) => WordVectors::from_text_file(path)?,
            None => WordVectors::shipped()?,
        };
        Ok(std::sync::Arc::new(vectors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_only_what_it_names() {
        let config: Config =
            toml::from_str("client_addr = \"127.0.0.1:9000\"\n[limits]\nkey_bytes_max = 100\n").unwrap();
        assert_eq!(config.client_addr, "127.0.0.1:9000");
        assert_eq!(config.limits.key_bytes_max, 100);
        assert_eq!(config.limits.value_bytes_max, 4 << 20);
        assert_eq!(config.peer_addr, "127.0.0.1:7701");
    }

    #[test]
    fn unknown_settings_are_rejected() {
        assert!(toml::from_str::<Config>("client_adr = \"x\"").is_err());
    }

    #[test]
    fn too_many_reader_threads_are_invalid() {
        let mut config = Config::default();
        config.storage.read_threads = 257;
        assert!(config.validate().unwrap_err().to_string().contains("read_threads"));
        config.storage.read_threads = 256;
        assert!(config.validate().is_ok());
        assert!(Config::default().read_threads() >= 2);
    }

    #[test]
    fn out_of_range_probability_is_invalid() {
        let config = Config { debug_skip_write_probability: 1.5, ..Config::default() };
        assert!(config.validate().is_err());
    }

    /// A feed of no keys would drop every write's keys and rebuild the
    /// trees by a scan every tick: refused at start instead.
    #[test]
    fn a_tree_feed_of_no_keys_is_invalid() {
        let mut config = Config::default();
        config.limits.tree_feed_keys_max = 0;
        assert!(config.validate().unwrap_err().to_string().contains("tree_feed_keys_max"));
        config.limits.tree_feed_keys_max = 1;
        assert!(config.validate().is_ok());
    }
}
