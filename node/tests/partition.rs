//! A node that clients reach but its peers do not: three real `quiverd`
//! processes, and an nftables rule (installed here, removed when the test
//! ends) that drops every UDP packet to and from n3's peer port, so its
//! QUIC links to n1 and n2 go silent while its client port still answers.
//! The smart client, connected to every node, writes keys whose first
//! replica is n3: n3 answers `Unavailable` at once (it sees too few
//! replicas up to reach a quorum) and the client goes on to the next
//! replica, so every write is acknowledged and none waits for a deadline.
//! n3 says it is cut off in `status` and in the ring it gives clients.
//! Once the rule is gone, every acknowledged write reads back at `all`.
//!
//! Needs root and `nft` (Debian's `nftables`; `.ci/run` installs it):
//! without them the test says why and passes without running.

mod common;

use std::path::Path;
use std::process::Command;

use common::{quiver_bin, wait_for};
use quiver_chaos::node::{cluster_specs, NodeProcess};
use quiver_client::blocking::Client;
use quiver_client::{Consistency, ErrorKind};

/// An nftables table that drops UDP to and from one port on this host;
/// removed on drop.
struct Cut {
    table: String,
}

fn nft(args: &[&str]) -> Result<(), String> {
    let out = Command::new("nft").args(args).output().map_err(|e| format!("nft: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
    }
}

impl Cut {
    /// Drops every UDP packet from or to `port`; `Err` with the reason
    /// when this host cannot (no `nft`, not root).
    fn udp_port(port: u16) -> Result<Cut, String> {
        let table = format!("quiver_cut_{port}");
        nft(&["add", "table", "inet", &table])?;
        let cut = Cut { table };
        let chain = "{ type filter hook output priority 0 ; }";
        nft(&["add", "chain", "inet", &cut.table, "out", chain])?;
        nft(&["add", "rule", "inet", &cut.table, "out", "udp", "sport", &port.to_string(), "drop"])?;
        nft(&["add", "rule", "inet", &cut.table, "out", "udp", "dport", &port.to_string(), "drop"])?;
        Ok(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        if let Err(error) = nft(&["delete", "table", "inet", &self.table]) {
            eprintln!("removing the test's nftables table: {error}");
        }
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("an address with a port")
}

#[test]
fn writes_go_around_a_node_its_peers_cannot_reach() {
    let dir = tempfile::tempdir().unwrap();
    let specs = cluster_specs(Path::new(env!("CARGO_BIN_EXE_quiverd")), dir.path(), 3).unwrap();
    let nodes: Vec<NodeProcess> = specs.iter().map(|spec| NodeProcess::start(spec).unwrap()).collect();
    let direct: Vec<Client> = nodes.iter().map(|n| Client::connect([n.addr.clone()]).unwrap().direct()).collect();
    for client in &direct {
        wait_for(client, "every peer up", |s| s.peers.len() == 2 && s.peers.iter().all(|p| p.up));
    }
    // A smart client with the ring from before the cut (which it would ask
    // for again only after an hour, or when a node answers `Unavailable`),
    // n3 first among its seeds.
    let seeds = [&nodes[2], &nodes[0], &nodes[1]].map(|n| n.addr.clone());
    let client = Client::connect(seeds).unwrap().with_consistency(Consistency::Quorum);
    let client = client.with_ring_refresh(std::time::Duration::from_secs(3600));
    let started = std::time::Instant::now();
    let cut = match Cut::udp_port(port_of(&specs[2].peer_addr)) {
        Ok(cut) => cut,
        Err(why) => return eprintln!("SKIPPED: cannot cut n3 off from its peers here: {why}"),
    };
    for client in &direct[..2] {
        wait_for(client, "n3 seen down", |s| s.peers.iter().any(|p| p.name == "n3" && !p.up));
    }
    let n3 = wait_for(&direct[2], "n3 sees every peer down", |s| s.peers.iter().all(|p| !p.up));
    eprintln!("the cut was seen after {:?}", started.elapsed());
    assert!(n3.cut_off.is_some(), "n3 says it is cut off: {n3:?}");
    let status = Command::new(quiver_bin()).arg("status").env("QUIVER_ADDR", &nodes[2].addr).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("cluster:       CUT OFF: none of its peers (n1, n2)"), "{status}");

    // n3 answers at once that it cannot reach a quorum: nothing written.
    let error = direct[2].set("through-n3", "v").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::Unavailable), "{error}");
    assert!(error.to_string().contains("1 of 3 replicas are up"), "{error}");

    let keys: Vec<String> = (0..100).map(|i| format!("around-{i}")).collect();
    assert!(keys.iter().any(|k| client.node_for(k).as_deref() == Some(&*nodes[2].addr)), "some keys start at n3");
    for key in &keys {
        client.set(key, key).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    let retries = client.retries();
    assert!(retries.not_applied > 0, "the client went around n3: {retries:?}");
    assert_eq!(retries.in_doubt, 0, "no attempt waited for a deadline or lost its answer: {retries:?}");

    // The ring n3 gives clients now marks it; a client that asks for it
    // sends nothing to n3 while the cut lasts.
    let fresh = Client::connect([nodes[2].addr.clone()]).unwrap();
    let keys_to_n3: Vec<&String> =
        keys.iter().filter(|k| fresh.node_for(k).as_deref() == Some(&*nodes[2].addr)).collect();
    assert!(keys_to_n3.is_empty(), "a client routes no key to n3 first while it is cut off: {keys_to_n3:?}");
    for key in &keys {
        fresh.set(key, key).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    assert_eq!(fresh.retries().total(), 0, "{:?}", fresh.retries());

    drop(cut);
    for client in &direct {
        wait_for(client, "every peer up again", |s| s.peers.iter().all(|p| p.up) && s.cut_off.is_none());
    }
    let all = Client::connect([nodes[0].addr.clone()]).unwrap().with_consistency(Consistency::All);
    for key in &keys {
        assert_eq!(all.get(key).unwrap().as_deref(), Some(key.as_bytes()), "{key} at all");
    }
}
