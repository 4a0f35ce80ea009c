//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use quiver_chaos::node::{NodeProcess, NodeSpec};

use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use quiver_node::clock::Clock;
use quiver_node::config::Limits;
use quiver_node::net::client::serve;
use quiver_node::service::{Service, Store};
use quiver_node::stamping::NodeClock;
use quiver_node::storage::{Op, Options};
use quiver_ring::wire;
use quiver_ring::{Hlc, NodeId, Stamper};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Options that make every mechanism run often on little data: tiny
/// memtables, segments and blocks, eager compaction, no tombstone grace, a
/// block cache that holds a few dozen blocks and a value cache of about a
/// hundred keys (so reads both hit and evict).
pub fn tiny_options() -> Options {
    Options {
        memtable_bytes_max: 4 << 10,
        block_cache_bytes: 16 << 10,
        value_cache_bytes: 16 << 10,
        frozen_memtables_max: 2,
        wal_segment_bytes: 16 << 10,
        block_bytes: 256,
        table_bytes_target: 8 << 10,
        compaction_min_tables: 3,
        tombstone_grace_ms: 0,
        manifest_edits_max: 8,
        ..Options::default()
    }
}

/// Stamps blind writes like a single node would.
pub struct Writer(pub Stamper);

impl Writer {
    pub fn new(after: Hlc) -> Writer {
        Writer(Stamper::new(NodeId(1), after, u64::MAX))
    }

    pub fn op(&mut self, key: &[u8], value: Option<&[u8]>) -> Op {
        let stamp = self.0.next(now_ms()).expect("a test clock never refuses");
        Op { key: key.to_vec(), version: stamp.blind(value.map(<[u8]>::to_vec)) }
    }

    /// One batch: every key gets the same stamp.
    pub fn batch(&mut self, entries: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<Op> {
        let stamp = self.0.next(now_ms()).expect("a test clock never refuses");
        entries.iter().map(|(key, value)| Op { key: key.clone(), version: stamp.blind(value.clone()) }).collect()
    }
}

/// The bound `name` as a node's `status`, asked through `client`, shows it.
pub fn budget_of(client: &quiver_client::blocking::Client, name: &str) -> quiver_client::BudgetInfo {
    let status = client.status().unwrap();
    status.budgets.into_iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no bound {name} in status"))
}

/// Starts this build's `quiverd` on `dir` (a free port) and waits until ready.
pub fn start_node(dir: &Path, extra: &[&str]) -> NodeProcess {
    NodeProcess::start(&NodeSpec::new(env!("CARGO_BIN_EXE_quiverd"), dir).args(extra.iter().copied()))
        .expect("quiverd starts")
}

/// A node served in this process on one async worker (a thread of its
/// own), over a store the test built (with its test hooks). Stops when
/// dropped.
pub struct InProcessNode {
    pub addr: String,
    service: Arc<Service>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl InProcessNode {
    pub fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>, node_clock: Arc<NodeClock>) -> InProcessNode {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = Arc::new(Service::new(
            store,
            clock,
            node_clock,
            NodeId(1),
            Limits::default(),
            "token".into(),
            quiver_node::service::TokenSeal::new(&[1; quiver_node::service::token::SECRET_BYTES]),
            addr.clone(),
            String::new(),
        ));
        let stop = service.shutdown_requested();
        let serving = service.clone();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                serve(tokio::net::TcpListener::from_std(listener).unwrap(), serving, stop).await;
            });
        });
        InProcessNode { addr, service, server: Some(server) }
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        self.service.request_shutdown();
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Sends one request on a fresh connection after the handshake.
pub fn raw_call(addr: &str, hlc_seen: Hlc, op: wire::Op) -> wire::Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    // A bound on the test, not a timing assertion.
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut frames = Vec::new();
    let hello = wire::Request {
        id: 1,
        hlc_seen: Hlc::ZERO,
        op: wire::Op::Hello { protocol: wire::PROTOCOL_VERSION },
        deadline: Hlc::ZERO,
        consistency: None,
    };
    wire::encode_frame(&mut frames, &hello, usize::MAX).unwrap();
    let request = wire::Request { id: 2, hlc_seen, op, deadline: Hlc(u64::MAX), consistency: None };
    wire::encode_frame(&mut frames, &request, usize::MAX).unwrap();
    stream.write_all(&frames).unwrap();
    let mut answer = || {
        let mut header = [0u8; wire::LEN_BYTES];
        stream.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; wire::frame_len(header)];
        stream.read_exact(&mut body).unwrap();
        postcard::from_bytes::<wire::Response>(&body).unwrap()
    };
    assert!(matches!(answer().result, Ok(wire::Reply::Hello(_))));
    answer()
}

/// How long a condition on a running node may take before a test fails (a
/// bound, not a timing assertion: heartbeats run every second).
pub const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Polls `status` of `client` until `done` holds; fails after [`WAIT_MAX`].
pub fn wait_for(
    client: &quiver_client::blocking::Client,
    what: &str,
    done: impl Fn(&quiver_client::NodeStatus) -> bool,
) -> quiver_client::NodeStatus {
    let started = std::time::Instant::now();
    loop {
        let status = client.status().unwrap();
        if done(&status) {
            return status;
        }
        assert!(started.elapsed() < WAIT_MAX, "{what}: never happened; last status {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hints the node of `status` holds for the member named `owner`.
pub fn hints_for(status: &quiver_client::NodeStatus, owner: &str) -> u64 {
    status.ring.iter().find(|m| m.name == owner).map_or(0, |m| m.hints)
}

/// The `quiver` binary, next to `quiverd`: cargo builds only this crate's
/// binaries for its tests, so it is built (or found up to date) here, once
/// per run, with the same profile. A stale one would speak an old protocol.
pub fn quiver_bin() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = std::path::PathBuf::from(env!("CARGO_BIN_EXE_quiverd")).with_file_name("quiver");
            // `target/<dir>/quiverd`: the dev profile builds into `debug`,
            // any other into a directory of its own name.
            let dir = path.parent().and_then(|d| d.file_name()).and_then(|d| d.to_str()).unwrap_or("debug");
            let profile = if dir == "debug" { "dev" } else { dir };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "--profile", profile, "-p", "quiver-client", "--bin", "quiver"])
                .status()
                .unwrap();
            assert!(status.success(), "building quiver failed");
            path
        })
        .clone()
}
