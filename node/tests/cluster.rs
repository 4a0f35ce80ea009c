//! Three real `quiverd` processes on loopback, configured as one cluster:
//! their heartbeats over QUIC with mutual TLS find each other up; a node
//! whose wall clock is 2 s off from the others refuses to stamp writes and
//! says why; a node killed with SIGKILL is seen down.

use std::path::Path;
use std::time::{Duration, Instant};

use quiver_chaos::node::{free_port, NodeProcess, NodeSpec};
use quiver_client::blocking::Client;
use quiver_client::{Consistency, ErrorKind, NodeStatus};
use quiver_node::net::tls::{init_ca, issue_node};

/// How long a condition on the cluster may take before the test fails
/// (a bound, not a timing assertion: heartbeats run every second).
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Polls `status` of `client` until `done` holds; fails after [`WAIT_MAX`].
fn wait_for(client: &Client, what: &str, done: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
    let started = Instant::now();
    loop {
        let status = client.status().unwrap();
        if done(&status) {
            return status;
        }
        assert!(started.elapsed() < WAIT_MAX, "{what}: never happened; last status {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start(dir: &Path, certs: &Path, name: &str, peer_ports: &[(&str, u16)], extra: &[&str]) -> NodeProcess {
    let own = peer_ports.iter().find(|(n, _)| *n == name).unwrap().1;
    let mut args = vec!["--name".to_owned(), name.to_owned(), "--tls-dir".to_owned(), certs.display().to_string()];
    for (peer, port) in peer_ports.iter().filter(|(n, _)| *n != name) {
        args.push(format!("--peer={peer}=127.0.0.1:{port}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut spec = NodeSpec::new(env!("CARGO_BIN_EXE_quiverd"), &dir.join(name)).args(args);
    spec.peer_addr = format!("127.0.0.1:{own}");
    spec.env.push(("QUIVER_UNSAFE_TEST_MODES".into(), "1".into()));
    NodeProcess::start(&spec).unwrap()
}

#[test]
fn heartbeats_see_peers_up_and_down_and_a_node_out_of_step_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    init_ca(&certs).unwrap();
    let ports: Vec<(&str, u16)> = ["n1", "n2", "n3"].into_iter().map(|n| (n, free_port().unwrap())).collect();
    for (name, _) in &ports {
        issue_node(&certs, name, &["127.0.0.1".parse().unwrap()]).unwrap();
    }
    let n1 = start(dir.path(), &certs, "n1", &ports, &[]);
    let mut n2 = start(dir.path(), &certs, "n2", &ports, &[]);
    let n3 = start(dir.path(), &certs, "n3", &ports, &["--debug-clock-offset-ms", "2000"]);
    let clients: Vec<Client> = [&n1, &n2, &n3].iter().map(|n| Client::connect([n.addr.clone()]).unwrap()).collect();

    for client in &clients {
        let status = wait_for(client, "every peer up", |s| s.peers.len() == 2 && s.peers.iter().all(|p| p.up));
        assert!(status.peers.iter().all(|p| p.node_id.is_some()));
    }
    // n1 sees n3 2 s ahead, and n2 in step: one peer of two is off, so n1
    // goes on stamping.
    let status = clients[0].status().unwrap();
    let offset = |name: &str| status.peers.iter().find(|p| p.name == name).unwrap().clock_offset_ms.unwrap();
    assert!(offset("n3") > 500, "n3 is seen ahead: {status:?}");
    assert!(offset("n2").abs() < 500, "n2 is seen in step: {status:?}");
    clients[0].set("k", "from n1").unwrap();
    clients[1].set("k", "from n2").unwrap();

    // n3 is off from both of its peers: it refuses to stamp, and says why.
    let status = wait_for(&clients[2], "n3 refuses", |s| s.clock_refusal.is_some());
    assert!(status.clock_refusal.unwrap().contains("most of its peers"));
    let error = clients[2].set("k", "from n3").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::ClockSkew), "{error}");

    n2.kill();
    let status = wait_for(&clients[0], "n2 seen down", |s| s.peers.iter().any(|p| p.name == "n2" && !p.up));
    assert!(status.peers.iter().any(|p| p.name == "n3" && p.up));
}

fn cluster_of_three(dir: &Path) -> (Vec<(&'static str, u16)>, std::path::PathBuf) {
    let certs = dir.join("certs");
    init_ca(&certs).unwrap();
    let ports: Vec<(&str, u16)> = ["n1", "n2", "n3"].into_iter().map(|n| (n, free_port().unwrap())).collect();
    for (name, _) in &ports {
        issue_node(&certs, name, &["127.0.0.1".parse().unwrap()]).unwrap();
    }
    (ports, certs)
}

/// Writes through any node reach a quorum of each key's replicas and are
/// read through any other; with one node SIGKILLed, quorum reads and writes
/// go on and nothing acknowledged is lost; with two down, a quorum write is
/// unavailable (naming the counts) while `one` succeeds; a restarted node
/// serves again.
#[test]
fn quorum_writes_and_reads_through_any_node_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let (ports, certs) = cluster_of_three(dir.path());
    let mut nodes: Vec<NodeProcess> =
        ["n1", "n2", "n3"].iter().map(|n| start(dir.path(), &certs, n, &ports, &[])).collect();
    let clients: Vec<Client> = nodes.iter().map(|n| Client::connect([n.addr.clone()]).unwrap()).collect();
    for client in &clients {
        wait_for(client, "every peer up", |s| s.peers.iter().all(|p| p.up));
    }
    let entries: Vec<(String, String)> = (0..60).map(|i| (format!("key-{i}"), format!("value-{i}"))).collect();
    for (i, (key, value)) in entries.iter().enumerate() {
        clients[i % 3].set(key, value).unwrap();
    }
    for client in &clients {
        for (key, value) in &entries {
            assert_eq!(client.get(key).unwrap().as_deref(), Some(value.as_bytes()), "{key}");
        }
    }

    nodes[2].kill();
    let more: Vec<(String, String)> = (60..100).map(|i| (format!("key-{i}"), format!("value-{i}"))).collect();
    for (i, (key, value)) in more.iter().enumerate() {
        clients[i % 2].set(key, value).unwrap();
    }
    for client in &clients[..2] {
        for (key, value) in entries.iter().chain(&more) {
            assert_eq!(client.get(key).unwrap().as_deref(), Some(value.as_bytes()), "{key} with n3 down");
        }
    }

    nodes[1].kill();
    let error = clients[0].set("key-0", "with two down").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::Unavailable), "{error}");
    assert!(error.to_string().contains("were needed"), "{error}");
    // At `one`, the node that is up is enough, for writes and reads.
    let one = Client::connect([nodes[0].addr.clone()]).unwrap().with_consistency(Consistency::One);
    one.set("key-one", "written at one").unwrap();
    assert_eq!(one.get("key-one").unwrap().as_deref(), Some(&b"written at one"[..]));
    let all = Client::connect([nodes[0].addr.clone()]).unwrap().with_consistency(Consistency::All);
    assert_eq!(all.get("key-one").unwrap_err().kind(), Some(ErrorKind::Unavailable));

    nodes[1] = start(dir.path(), &certs, "n2", &ports, &[]);
    let again = Client::connect([nodes[1].addr.clone()]).unwrap();
    wait_for(&clients[0], "n2 seen up again", |s| s.peers.iter().any(|p| p.name == "n2" && p.up));
    clients[0].set("key-0", "after the restart").unwrap();
    assert_eq!(again.get("key-0").unwrap().as_deref(), Some(&b"after the restart"[..]));
    for (key, value) in entries.iter().chain(&more).skip(1) {
        assert_eq!(again.get(key).unwrap().as_deref(), Some(value.as_bytes()), "{key} after the restart");
    }
}
