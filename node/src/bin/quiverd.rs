//! `quiverd`: one Quiver node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use quiver_node::clock::{Clock, OffsetClock, SystemClock};
use quiver_node::cluster::membership::Membership;
use quiver_node::cluster::store::{ClusterStore, NodeData, ReplicaHandler, REPLICAS};
use quiver_node::cluster::trees::{PurgeByExchanges, TreeKeeper};
use quiver_node::config::Config;
use quiver_node::disk_space::DiskSpace;
use quiver_node::identity::load_or_create_secret;
use quiver_node::identity::{
    load_or_create_admin_token, load_or_create_node_id, lock_data_dir, make_private_dir, CONTEXT_SECRET_FILE,
};
use quiver_node::index::Index;
use quiver_node::net::client::serve;
use quiver_node::net::peer::PeerEndpoint;
use quiver_node::net::tls::{read_cluster_secret, NodeTls};
use quiver_node::service::{LocalStore, Service, Store, TokenSeal};
use quiver_node::stamping::NodeClock;
use quiver_node::storage::Engine;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc instead of glibc's malloc: keys and values are allocated on one
/// thread and freed on another (commit, flush), which glibc's arenas handle
/// poorly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs one Quiver node: a durable, versioned key-value store that answers
/// clients over TCP.
///
/// Settings come from the defaults, then `--config FILE` (TOML), then flags.
#[derive(Debug, Parser)]
#[command(name = "quiverd", version)]
struct Args {
    /// TOML file with settings (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the node keeps its data [default: ./quiver-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address for clients [default: 127.0.0.1:7700]. Port 0 picks a free one.
    #[arg(long, value_name = "HOST:PORT")]
    client_addr: Option<String>,
    /// Address for other nodes [default: 127.0.0.1:7701].
    #[arg(long, value_name = "HOST:PORT")]
    peer_addr: Option<String>,
    /// Longest key, in bytes [default: 4096].
    #[arg(long)]
    key_bytes_max: Option<usize>,
    /// Longest value, in bytes [default: 4 MiB].
    #[arg(long)]
    value_bytes_max: Option<usize>,
    /// Most entries in one bulk set [default: 100000].
    #[arg(long)]
    bulk_entries_max: Option<usize>,
    /// Most bytes (keys + values) in one bulk set [default: 64 MiB].
    #[arg(long)]
    bulk_bytes_max: Option<usize>,
    /// Longest request frame, in bytes [default: 72 MiB].
    #[arg(long)]
    frame_bytes_max: Option<usize>,
    /// Client connections served at once; more are refused with
    /// TooManyConnections [default: 4096].
    #[arg(long)]
    connections_max: Option<usize>,
    /// Requests on one peer link awaiting answers, at most; past it a
    /// write's part for that peer is hinted; a get_many sends one per key
    /// [default: 262144].
    #[arg(long)]
    peer_requests_in_flight_max: Option<usize>,
    /// Bytes queued on one peer link, at most; past it a write's part for
    /// that peer is hinted [default: 256 MiB].
    #[arg(long)]
    peer_queued_bytes_max: Option<u64>,
    /// Bytes of answers a connection may have waiting to be written; past
    /// it the node stops reading that connection's requests until its
    /// client reads [default: 32 MiB].
    #[arg(long)]
    connection_answer_bytes_max: Option<usize>,
    /// Seconds after which a connection that does nothing, or whose client
    /// reads none of its answers, is closed [default: 300; 0: never].
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Milliseconds within which a connection must send its Hello
    /// [default: 5000].
    #[arg(long)]
    hello_timeout_ms: Option<u64>,
    /// At shutdown, milliseconds after which a connection whose client does
    /// not read its last answers is dropped [default: 5000].
    #[arg(long)]
    shutdown_grace_ms: Option<u64>,
    /// Memtable size before it is flushed, in bytes [default: 64 MiB].
    #[arg(long)]
    memtable_bytes_max: Option<usize>,
    /// Size of each pre-allocated WAL segment, in bytes [default: 64 MiB].
    #[arg(long)]
    wal_segment_bytes: Option<u64>,
    /// Memory for a cache of the table blocks reads found, in bytes; worth
    /// it when the data read often fits in it [default: 0, off].
    #[arg(long)]
    block_cache_bytes: Option<usize>,
    /// Memory for a cache of what reads found in the tables, in bytes; a
    /// read it answers reads no file [default: 256 MiB; 0: off].
    #[arg(long)]
    value_cache_bytes: Option<usize>,
    /// Whether a flush puts what it wrote into the value cache's free room
    /// [default: true].
    #[arg(long)]
    warm_value_cache: Option<bool>,
    /// Below this many free bytes on the data's file system, client writes
    /// get DiskFull (reads go on) [default: the larger of 1 GiB and 5 % of
    /// the volume].
    #[arg(long)]
    disk_reserve_bytes: Option<u64>,
    /// Below this many free bytes, other nodes' writes (replication, hints,
    /// repair) are refused too [default: a quarter of disk_reserve_bytes].
    #[arg(long)]
    disk_reserve_peer_bytes: Option<u64>,
    /// Threads that serve reads [default: one per core, at least 2].
    #[arg(long)]
    read_threads: Option<usize>,
    /// This node's name in its cluster (its certificate's name).
    #[arg(long)]
    name: Option<String>,
    /// The directory of the cluster CA and this node's certificate.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Another node of the cluster, as NAME=HOST:PORT (its peer address);
    /// once per peer.
    #[arg(long = "peer", value_name = "NAME=HOST:PORT")]
    peers: Vec<String>,
    /// A member whose certificate is no longer trusted (a lost machine):
    /// its connections are refused and it is never dialled; once per name,
    /// on every node.
    #[arg(long = "deny-node", value_name = "NAME")]
    deny_nodes: Vec<String>,
    /// Test-only: this node's wall clock reads this many ms ahead (negative:
    /// behind). Refused unless QUIVER_UNSAFE_TEST_MODES=1 is set.
    #[arg(long, value_name = "MS", hide = true, allow_hyphen_values = true)]
    debug_clock_offset_ms: Option<i64>,
    /// The largest distance between clocks the node accepts, in ms: a
    /// timestamp further ahead of its wall clock is refused [default: 500].
    #[arg(long)]
    max_clock_offset_ms: Option<u64>,
    /// Tombstones are kept at least this long, in seconds; versions from
    /// peers older than that are refused [default: 864000, 10 days].
    #[arg(long)]
    gc_grace_secs: Option<u64>,
    /// Bytes of hints held for one peer that is down, at most [default: 1 GiB].
    #[arg(long)]
    hint_bytes_max: Option<u64>,
    /// Hints older than this, in seconds, are dropped undelivered; at most
    /// half of gc_grace_secs [default: 10800, 3 hours].
    #[arg(long)]
    hint_age_max_secs: Option<u64>,
    /// In a cluster: ping every peer this often, in ms; a peer that does
    /// not answer within as long is down [default: 1000].
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// In a cluster: how long a quorum operation, or a call to a peer,
    /// waits, in ms [default: 5000].
    #[arg(long)]
    op_timeout_ms: Option<u64>,
    /// In a cluster: how often hints go to their owners and the batch log
    /// is looked at, in ms [default: 1000].
    #[arg(long)]
    hint_tick_ms: Option<u64>,
    /// In a cluster: a bulk set logged this long ago, in ms, is replayed
    /// by whoever holds it; at least op_timeout_ms [default: 10000].
    #[arg(long)]
    batch_replay_after_ms: Option<u64>,
    /// In a cluster: replicas compare their hash trees and repair what
    /// differs this often, in ms; 0: only on `quiver repair`
    /// [default: 600000].
    #[arg(long)]
    anti_entropy_ms: Option<u64>,
    /// Index the values for search: full text with BM25 (`quiver search`)
    /// and embeddings for similar values (`quiver similar`). A node started
    /// with it over data written without it first builds the index from the
    /// data.
    #[arg(long)]
    index: bool,
    /// Embed values with the word vectors of FILE (GloVe, word2vec or
    /// fastText, text form) [default: GloVe 6B 50-d, 30,000 words, shipped].
    #[arg(long, value_name = "FILE")]
    word_vectors: Option<PathBuf>,
    /// Checks that the index in the data directory matches its data
    /// exactly, prints what differs, and exits (0: it matches). The node
    /// must not be running.
    #[arg(long)]
    check_index: bool,
    /// Open a damaged WAL or manifest by keeping its valid prefix.
    #[arg(long)]
    repair: bool,
    /// Debug fault: silently drop each data-file write (SSTables, index
    /// snapshots) with this probability. Nothing acknowledged may be lost.
    #[arg(long, value_name = "P")]
    debug_skip_write_probability: Option<f64>,
    /// Test-only, loses data on purpose: acknowledge this fraction of writes
    /// without writing them, so tests can show the chaos checker catches
    /// lost writes. Refused unless QUIVER_UNSAFE_TEST_MODES=1 is set.
    #[arg(long, value_name = "P", hide = true)]
    debug_drop_acked_writes: Option<f64>,
    /// Test-only: exit at once after logging the first bulk set on two
    /// nodes, before any replica gets its part (a coordinator that dies
    /// there). Refused unless QUIVER_UNSAFE_TEST_MODES=1 is set.
    #[arg(long, hide = true)]
    debug_exit_after_batch_log: bool,
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.data_dir {
            config.data_dir = v
        }
        if let Some(v) = self.client_addr {
            config.client_addr = v
        }
        if let Some(v) = self.peer_addr {
            config.peer_addr = v
        }
        if let Some(v) = self.key_bytes_max {
            config.limits.key_bytes_max = v
        }
        if let Some(v) = self.value_bytes_max {
            config.limits.value_bytes_max = v
        }
        if let Some(v) = self.bulk_entries_max {
            config.limits.bulk_entries_max = v
        }
        if let Some(v) = self.bulk_bytes_max {
            config.limits.bulk_bytes_max = v
        }
        if let Some(v) = self.frame_bytes_max {
            config.limits.frame_bytes_max = v
        }
        if let Some(v) = self.connections_max {
            config.limits.connections_max = v
        }
        if let Some(v) = self.peer_requests_in_flight_max {
            config.limits.peer_requests_in_flight_max = v
        }
        if let Some(v) = self.peer_queued_bytes_max {
            config.limits.peer_queued_bytes_max = v
        }
        if let Some(v) = self.connection_answer_bytes_max {
            config.limits.connection_answer_bytes_max = v
        }
        if let Some(v) = self.idle_timeout_secs {
            config.limits.idle_timeout_secs = v
        }
        if let Some(v) = self.hello_timeout_ms {
            config.limits.hello_timeout_ms = v
        }
        if let Some(v) = self.shutdown_grace_ms {
            config.limits.shutdown_grace_ms = v
        }
        if let Some(v) = self.gc_grace_secs {
            config.gc_grace_secs = v
        }
        if let Some(v) = self.hint_bytes_max {
            config.hint_bytes_max = v
        }
        if let Some(v) = self.hint_age_max_secs {
            config.hint_age_max_secs = v
        }
        if let Some(v) = self.heartbeat_ms {
            config.heartbeat_ms = v
        }
        if let Some(v) = self.op_timeout_ms {
            config.op_timeout_ms = v
        }
        if let Some(v) = self.hint_tick_ms {
            config.hint_tick_ms = v
        }
        if let Some(v) = self.batch_replay_after_ms {
            config.batch_replay_after_ms = v
        }
        if let Some(v) = self.anti_entropy_ms {
            config.anti_entropy_ms = v
        }
        if let Some(v) = self.debug_skip_write_probability {
            config.debug_skip_write_probability = v
        }
        if let Some(v) = self.memtable_bytes_max {
            config.storage.memtable_bytes_max = v
        }
        if let Some(v) = self.wal_segment_bytes {
            config.storage.wal_segment_bytes = v
        }
        if let Some(v) = self.block_cache_bytes {
            config.storage.block_cache_bytes = v
        }
        if let Some(v) = self.value_cache_bytes {
            config.storage.value_cache_bytes = v
        }
        if let Some(v) = self.warm_value_cache {
            config.storage.warm_value_cache = v
        }
        if let Some(v) = self.disk_reserve_bytes {
            config.storage.disk_reserve_bytes = Some(v)
        }
        if let Some(v) = self.disk_reserve_peer_bytes {
            config.storage.disk_reserve_peer_bytes = Some(v)
        }
        if let Some(v) = self.read_threads {
            config.storage.read_threads = v
        }
        if let Some(v) = self.max_clock_offset_ms {
            config.max_clock_offset_ms = v
        }
        if let Some(v) = self.name {
            config.name = Some(v)
        }
        if let Some(v) = self.tls_dir {
            config.tls_dir = Some(v)
        }
        if !self.peers.is_empty() {
            config.peers = self.peers
        }
        if !self.deny_nodes.is_empty() {
            config.deny_nodes = self.deny_nodes
        }
        if let Some(ms) = self.debug_clock_offset_ms {
            if std::env::var("QUIVER_UNSAFE_TEST_MODES").as_deref() != Ok("1") {
                anyhow::bail!("--debug-clock-offset-ms is a test mode; it needs QUIVER_UNSAFE_TEST_MODES=1");
            }
            config.debug_clock_offset_ms = ms;
        }
        if let Some(p) = self.debug_drop_acked_writes {
            if std::env::var("QUIVER_UNSAFE_TEST_MODES").as_deref() != Ok("1") {
                anyhow::bail!("--debug-drop-acked-writes loses data on purpose; it needs QUIVER_UNSAFE_TEST_MODES=1");
            }
            config.debug_drop_acked_writes = p;
        }
        if self.debug_exit_after_batch_log {
            if std::env::var("QUIVER_UNSAFE_TEST_MODES").as_deref() != Ok("1") {
                anyhow::bail!("--debug-exit-after-batch-log is a test mode; it needs QUIVER_UNSAFE_TEST_MODES=1");
            }
            config.debug_exit_after_batch_log = true;
        }
        config.storage.repair |= self.repair;
        config.index |= self.index;
        if let Some(path) = self.word_vectors {
            config.word_vectors = Some(path);
        }
        config.validate()?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let check_index = args.check_index;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("quiverd: {error:#}");
            return ExitCode::from(2);
        }
    };
    if check_index {
        return match tokio::task::spawn_blocking(move || check_index_of(&config)).await {
            Ok(Ok(true)) => ExitCode::SUCCESS,
            Ok(Ok(false)) => ExitCode::FAILURE,
            Ok(Err(error)) => {
                eprintln!("quiverd: {error:#}");
                ExitCode::from(2)
            }
            Err(error) => {
                eprintln!("quiverd: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("quiverd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-index`: whether the stored index matches the data (printing
/// what differs if not).
fn check_index_of(config: &Config) -> anyhow::Result<bool> {
    let dir = &config.data_dir;
    let _lock = lock_data_dir(dir).with_context(|| format!("locking {}", dir.display()))?;
    let engine = Engine::open(dir, config.engine_options()).context("opening the storage engine")?;
    let embedder = config.embedder().map_err(anyhow::Error::msg)?;
    let wrong = quiver_node::index::verify(&engine, embedder.as_ref(), 20).context("reading the index")?;
    engine.close().context("closing")?;
    for line in &wrong {
        println!("{line}");
    }
    println!("{}", if wrong.is_empty() { "the index matches the data" } else { "the index differs from the data" });
    Ok(wrong.is_empty())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let dir = config.data_dir.clone();
    make_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    raise_open_files_limit(config.limits.connections_max);
    let _lock = lock_data_dir(&dir).with_context(|| format!("locking {}", dir.display()))?;
    let node_id = load_or_create_node_id(&dir).with_context(|| format!("node id in {}", dir.display()))?;
    let admin_token = load_or_create_admin_token(&dir).with_context(|| format!("admin token in {}", dir.display()))?;
    let seal = match &config.tls_dir {
        Some(tls_dir) => read_cluster_secret(tls_dir).context("the cluster's secret")?,
        None => match load_or_create_secret(&dir, CONTEXT_SECRET_FILE) {
            Ok(secret) => secret,
            // A node from before there were secrets, restarted on a full
            // disk: it still starts (and serves reads); its tokens last
            // until it restarts with room to keep a secret.
            Err(error) if quiver_node::storage::error::is_exhaustion(&error) => {
                tracing::warn!(%error, "no room to keep a context secret: this run's tokens end with it");
                quiver_node::identity::random_secret().context("a context secret")?
            }
            Err(error) => {
                return Err(anyhow::Error::new(error).context(format!("the context secret in {}", dir.display())))
            }
        },
    };
    let seal = TokenSeal::new(&seal);
    let mut options = config.engine_options();
    // In a cluster, deleted keys are purged only where anti-entropy allows
    // (asking the hash trees, made below).
    let purge = Arc::new(PurgeByExchanges::default());
    if config.name.is_some() {
        options.purge = Some(purge.clone());
    }
    let engine_dir = dir.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::open(&engine_dir, options))
        .await?
        .context("opening the storage engine")?;
    let engine = Arc::new(engine);

    let listener =
        TcpListener::bind(&config.client_addr).await.with_context(|| format!("listening on {}", config.client_addr))?;
    let client_addr = listener.local_addr()?.to_string();
    let clock: Arc<dyn Clock> = match config.debug_clock_offset_ms {
        0 => Arc::new(SystemClock),
        offset_ms => {
            tracing::warn!(offset_ms, "TEST MODE: this node's wall clock is shifted");
            Arc::new(OffsetClock { offset_ms })
        }
    };
    let node_clock = NodeClock::open(&dir, node_id, engine.max_hlc(), config.max_clock_offset_ms, clock.clone())
        .with_context(|| format!("the clock's high-water mark in {}", dir.display()))?;
    let node_clock = Arc::new(node_clock);
    if let Some(refusal) = node_clock.refusal() {
        tracing::error!(%refusal, "the clock refuses to stamp writes");
    }
    let disk = DiskSpace::new(&dir, config.storage.disk_reserve_bytes, config.storage.disk_reserve_peer_bytes)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    let disk = Arc::new(disk);
    let mut store = LocalStore::new(engine.clone(), node_clock.clone(), config.read_threads())
        .context("starting the reader threads")?
        .with_disk_space(disk.clone());
    let (index_engine, index_config) = (engine.clone(), config.clone());
    let index = tokio::task::spawn_blocking(move || match index_config.index {
        true => {
            let embedder = index_config.embedder().map_err(anyhow::Error::msg)?;
            let index = Index::open(index_engine, embedder).context("opening the index")?;
            let index = index.with_hits_bytes_max(index_config.limits.frame_bytes_max);
            Ok(Some(Arc::new(index)))
        }
        false => Index::forget(&index_engine).map(|()| None).context("opening the index"),
    })
    .await??;
    if let Some(index) = &index {
        store = store.with_index(index.clone());
    }
    if config.debug_drop_acked_writes > 0.0 {
        tracing::warn!(
            probability = config.debug_drop_acked_writes,
            "TEST MODE: acknowledging writes without writing them"
        );
        store = store.with_dropped_writes(config.debug_drop_acked_writes, node_id.0);
    }
    // In a cluster, the hash trees hear of every write; their ring comes
    // from the membership, made below.
    let members: Arc<std::sync::OnceLock<Arc<Membership>>> = Arc::default();
    let trees = match (&config.name, &config.tls_dir) {
        (Some(_), Some(_)) => {
            let members = members.clone();
            let ring = Box::new(move || members.get().and_then(|m| m.ring().ok()));
            let keeper = TreeKeeper::start(engine.clone(), ring, REPLICAS, config.limits.tree_feed_keys_max)
                .context("starting the hash trees' thread")?;
            let keeper = Arc::new(keeper);
            purge.attach(&keeper);
            let fed = keeper.clone();
            store = store.with_written_hook(Arc::new(move |keys| fed.written(keys)));
            Some(keeper)
        }
        _ => None,
    };
    let store = Arc::new(store.with_gc_grace_ms(config.gc_grace_secs.saturating_mul(1000)));
    let (peer_addr, cluster, store): (String, _, Arc<dyn Store>) = match (&config.name, &config.tls_dir, trees) {
        (Some(name), Some(tls_dir), Some(trees)) => {
            let (local, clock_of_data, hint_bytes_max) = (store, node_clock.clone(), config.hint_bytes_max);
            let data = tokio::task::spawn_blocking(move || NodeData::open(local, clock_of_data, hint_bytes_max, trees))
                .await?
                .context("counting the hints and bulk sets held")?;
            let joined = join_cluster(&config, name, tls_dir, node_id, &client_addr, &node_clock, &clock, &data)?;
            let (addr, membership) = joined;
            let _ = members.set(membership.clone());
            let hint_age_max_ms = config.hint_age_max_secs.saturating_mul(1000);
            let cluster = ClusterStore::new(
                node_id,
                name.clone(),
                data,
                hint_age_max_ms,
                membership,
                node_clock.clone(),
                clock.clone(),
            );
            let cluster = cluster.with_timers(config.cluster_timers()).with_repair(config.repair());
            let cluster = Arc::new(cluster.with_exit_after_batch_log(config.debug_exit_after_batch_log));
            cluster.run_in_background();
            (addr, Some(cluster.clone()), Arc::new(cluster) as Arc<dyn Store>)
        }
        _ => (config.peer_addr.clone(), None, store),
    };
    let mut service = Service::new(
        store,
        clock,
        node_clock,
        node_id,
        config.limits.clone(),
        admin_token,
        seal,
        client_addr.clone(),
        peer_addr.clone(),
    );
    service = service.with_disk_space(disk);
    if let Some(cluster) = cluster {
        service = service.with_cluster(cluster);
    }
    if let Some(index) = &index {
        service = service.with_vector_dim(index.embedder().dim());
    }
    let service = Arc::new(service);

    let stop = service.shutdown_requested();
    let signals = service.clone();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        signals.request_shutdown();
    });

    tracing::info!(
        node_id = %format_args!("{:016x}", node_id.0),
        clients = %client_addr,
        peers = %peer_addr,
        data_dir = %config.data_dir.display(),
        "quiverd ready"
    );
    serve(listener, service.clone(), stop).await;

    // Every connection has answered its in-flight requests: flush and close.
    if let Some(index) = &index {
        index.stop();
    }
    tokio::task::spawn_blocking(move || engine.shutdown()).await?.context("closing")?;
    tracing::info!("quiverd stopped");
    Ok(())
}

/// Raises the open-files limit to its hard limit: every client connection,
/// peer link, WAL segment and table holds a descriptor, and running out of
/// them should take thousands of connections, not the default 1,024. Says
/// so in the log when `connections_max` does not fit under it.
fn raise_open_files_limit(connections_max: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
    let current = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-files limit");
            limit.current
        }
    };
    // Files, peer links and the listener need some beside the connections.
    const OTHER_FILES: u64 = 256;
    if let Some(current) = current {
        if current < connections_max as u64 + OTHER_FILES {
            tracing::warn!(
                open_files_max = current,
                connections_max,
                "the open-files limit is below connections_max plus room for the node's own files: \
                 connections past it fail to be accepted, and are retried"
            );
        }
    }
}

/// Binds the peer endpoint with this node's certificate, answers peers'
/// heartbeats and starts its own. Returns the peer address bound.
#[allow(clippy::too_many_arguments)]
fn join_cluster(
    config: &Config,
    name: &str,
    tls_dir: &std::path::Path,
    node_id: quiver_ring::NodeId,
    client_addr: &str,
    node_clock: &Arc<NodeClock>,
    wall: &Arc<dyn Clock>,
    data: &NodeData,
) -> anyhow::Result<(String, Arc<Membership>)> {
    let tls = NodeTls::load(tls_dir, name).context("this node's certificate")?;
    let addr = config.peer_addr.parse().with_context(|| format!("peer address {}", config.peer_addr))?;
    let endpoint = PeerEndpoint::bind(addr, tls, config.limits.peer_links())?;
    let bound = endpoint.local_addr()?.to_string();
    let peers = config.peer_configs()?;
    let membership = Membership::new(
        &endpoint,
        node_id,
        name.to_owned(),
        client_addr.to_owned(),
        peers,
        node_clock.clone(),
        wall.clone(),
    );
    let membership = membership.with_heartbeat(config.cluster_timers().heartbeat);
    let membership = Arc::new(membership.with_denied(config.deny_nodes.clone()));
    let (limits, clock) = (config.limits.wire(), node_clock.clone());
    endpoint.serve(Arc::new(ReplicaHandler { membership: membership.clone(), data: data.clone(), limits, clock }));
    tokio::spawn(membership.clone().run());
    Ok((bound, membership))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_reaches_the_config() {
        let args = Args::try_parse_from([
            "quiverd",
            "--data-dir=/d",
            "--client-addr=127.0.0.1:1",
            "--peer-addr=127.0.0.1:2",
            "--key-bytes-max=10",
            "--value-bytes-max=20",
            "--bulk-entries-max=30",
            "--bulk-bytes-max=40",
            "--frame-bytes-max=5000",
            "--memtable-bytes-max=60",
            "--wal-segment-bytes=70",
            "--read-threads=3",
            "--value-cache-bytes=80",
            "--warm-value-cache=false",
            "--repair",
            "--debug-skip-write-probability=0.5",
            "--name=n1",
            "--tls-dir=/certs",
            "--peer=n2=127.0.0.1:3",
            "--peer=n3=127.0.0.1:4",
            "--gc-grace-secs=100",
            "--hint-bytes-max=90",
            "--hint-age-max-secs=50",
            "--connections-max=11",
            "--connection-answer-bytes-max=12",
            "--idle-timeout-secs=13",
            "--hello-timeout-ms=14",
            "--shutdown-grace-ms=15",
            "--disk-reserve-bytes=16",
            "--disk-reserve-peer-bytes=17",
            "--peer-requests-in-flight-max=18",
            "--peer-queued-bytes-max=19",
            "--heartbeat-ms=21",
            "--op-timeout-ms=22",
            "--hint-tick-ms=23",
            "--batch-replay-after-ms=24",
            "--anti-entropy-ms=25",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/d"));
        assert_eq!((config.client_addr.as_str(), config.peer_addr.as_str()), ("127.0.0.1:1", "127.0.0.1:2"));
        let l = &config.limits;
        assert_eq!(
            (l.key_bytes_max, l.value_bytes_max, l.bulk_entries_max, l.bulk_bytes_max, l.frame_bytes_max),
            (10, 20, 30, 40, 5000)
        );
        assert_eq!((config.storage.memtable_bytes_max, config.storage.wal_segment_bytes), (60, 70));
        assert_eq!(config.read_threads(), 3);
        assert_eq!(config.storage.value_cache_bytes, 80);
        assert!(!config.storage.warm_value_cache);
        assert!(config.storage.repair);
        assert_eq!(config.debug_skip_write_probability, 0.5);
        assert_eq!(
            (config.name.as_deref(), config.tls_dir.as_deref()),
            (Some("n1"), Some(std::path::Path::new("/certs")))
        );
        assert_eq!(config.peers, ["n2=127.0.0.1:3", "n3=127.0.0.1:4"]);
        assert_eq!((config.gc_grace_secs, config.hint_bytes_max, config.hint_age_max_secs), (100, 90, 50));
        assert_eq!(
            (l.connections_max, l.connection_answer_bytes_max, l.idle_timeout_secs, l.hello_timeout_ms),
            (11, 12, 13, 14)
        );
        assert_eq!(l.shutdown_grace_ms, 15);
        assert_eq!((l.peer_requests_in_flight_max, l.peer_queued_bytes_max), (18, 19));
        assert_eq!((config.storage.disk_reserve_bytes, config.storage.disk_reserve_peer_bytes), (Some(16), Some(17)));
        assert_eq!(config.peer_configs().unwrap()[1].peer_addr, "127.0.0.1:4".parse().unwrap());
        let t = config.cluster_timers();
        let ms = |d: std::time::Duration| d.as_millis();
        assert_eq!((ms(t.heartbeat), ms(t.op_timeout), ms(t.hint_tick), ms(t.batch_replay_after)), (21, 22, 23, 24));
        assert_eq!(config.repair().every, Some(std::time::Duration::from_millis(25)));
    }

    #[test]
    fn a_peer_must_be_name_and_address() {
        let args = Args::try_parse_from(["quiverd", "--name=n1", "--tls-dir=/c", "--peer=n2"]).unwrap();
        assert!(args.into_config().unwrap_err().to_string().contains("NAME=HOST:PORT"));
        let args = Args::try_parse_from(["quiverd", "--peer=n2=127.0.0.1:3"]).unwrap();
        assert!(args.into_config().unwrap_err().to_string().contains("name, tls_dir"));
    }

    #[test]
    fn unsafe_test_mode_needs_its_environment_variable() {
        // The variable is not set in the test environment.
        assert!(std::env::var_os("QUIVER_UNSAFE_TEST_MODES").is_none());
        let args = Args::try_parse_from(["quiverd", "--debug-drop-acked-writes=0.1"]).unwrap();
        let error = args.into_config().unwrap_err().to_string();
        assert!(error.contains("QUIVER_UNSAFE_TEST_MODES"), "{error}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let args = Args::try_parse_from(["quiverd", "--debug-skip-write-probability=2"]).unwrap();
        assert!(args.into_config().is_err());
        let args = Args::try_parse_from(["quiverd", "--gc-grace-secs=100", "--hint-age-max-secs=51"]).unwrap();
        assert!(args.into_config().unwrap_err().to_string().contains("at most half of gc_grace_secs"));
        let args = Args::try_parse_from(["quiverd", "--op-timeout-ms=500", "--batch-replay-after-ms=499"]).unwrap();
        assert!(args.into_config().unwrap_err().to_string().contains("at least op_timeout_ms"));
        let args = Args::try_parse_from(["quiverd", "--heartbeat-ms=0"]).unwrap();
        assert!(args.into_config().unwrap_err().to_string().contains("at least 1"));
    }
}
