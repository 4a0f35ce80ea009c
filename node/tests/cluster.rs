//! Three real `quiverd` processes on loopback, configured as one cluster:
//! their heartbeats over QUIC with mutual TLS find each other up; a node
//! whose wall clock is 2 s off from the others refuses to stamp writes and
//! says why; a node killed with SIGKILL is seen down.

use std::path::Path;
use std::time::{Duration, Instant};

use quiver_chaos::node::{free_port, NodeProcess, NodeSpec};
use quiver_client::blocking::Client;
use quiver_client::{ErrorKind, NodeStatus};
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
