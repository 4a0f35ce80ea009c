//! The `quiver` command-line tool against a real `quiverd`.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{quiver_bin, start_node};

fn quiver(addr: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(quiver_bin())
        .args(args)
        .env("QUIVER_ADDR", addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[test]
fn set_get_delete_and_absent_keys() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let out = quiver(&node.addr, &["set", "greeting", "hello world"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "OK\n");

    let out = quiver(&node.addr, &["get", "greeting"], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "hello world\n");

    let out = quiver(&node.addr, &["get", "nope"], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = quiver(&node.addr, &["delete", "greeting"], None);
    assert!(out.status.success());
    assert_eq!(quiver(&node.addr, &["get", "greeting"], None).status.code(), Some(1));
}

#[test]
fn bulk_set_from_arguments_file_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let out = quiver(&node.addr, &["bulk-set", "a=1", "b=2=two"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&quiver(&node.addr, &["get", "b"], None)), "2=two\n");

    let file = dir.path().join("entries.tsv");
    std::fs::write(&file, "x\t10\ny\tvalue with spaces\n").unwrap();
    let out = quiver(&node.addr, &["bulk-set", "--file", file.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&quiver(&node.addr, &["get", "y"], None)), "value with spaces\n");

    let out = quiver(&node.addr, &["bulk-set", "--file", "-"], Some("s1\tone\ns2\ttwo\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&quiver(&node.addr, &["get", "s2"], None)), "two\n");

    // Bad input: a clear message, a non-zero status, nothing written.
    let out = quiver(&node.addr, &["bulk-set", "--file", "-"], Some("ok\t1\nno-tab-here\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
    assert_eq!(quiver(&node.addr, &["get", "ok"], None).status.code(), Some(1));
    let out = quiver(&node.addr, &["bulk-set", "novalue"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEY=VALUE"));
}

#[test]
fn status_errors_and_addr_flag() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    quiver(&node.addr, &["set", "k", "v"], None);
    let out = quiver(&node.addr, &["status"], None);
    assert!(out.status.success());
    let text = stdout(&out);
    for field in ["node id:", "client addr:", "keys:", "bytes on disk:", "uptime:", "bounds:"] {
        assert!(text.contains(field), "{field} missing from {text}");
    }
    for bound in ["connections_max", "connection_answer_bytes_max", "idle_timeout_ms", "disk_reserve_bytes"] {
        assert!(text.lines().any(|line| line.trim_start().starts_with(bound)), "{bound} missing from {text}");
    }
    assert!(text.contains(&node.addr));

    let out = quiver(&node.addr, &["status", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["client_addr"], node.addr.as_str());
    assert_eq!(json["keys"], 1);
    assert!(json["peers"].as_array().unwrap().is_empty());

    // --addr overrides QUIVER_ADDR.
    let out = quiver("127.0.0.1:1", &["--addr", &node.addr, "get", "k"], None);
    assert_eq!(stdout(&out), "v\n");

    let out = quiver(&node.addr, &["set", "", "v"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("at least one byte"), "{}", stderr(&out));

    let out = quiver("127.0.0.1:1", &["get", "k"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("could not connect"), "{}", stderr(&out));
}

#[test]
fn a_file_over_the_bulk_limits_is_refused_clearly_and_load_stores_it_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--bulk-entries-max", "100"]);
    let file = dir.path().join("big.tsv");
    let lines: String = (1..=1000).map(|i| format!("k{i:04}\tv{i}\n")).collect();
    std::fs::write(&file, &lines).unwrap();
    let path = file.to_str().unwrap();

    // Refused by the client, with the node's limit and the way out.
    let out = quiver(&node.addr, &["bulk-set", "--file", path], None);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("BulkTooLarge") && err.contains("limit of 100"), "{err}");
    assert!(err.contains("quiver load"), "{err}");
    assert_eq!(quiver(&node.addr, &["get", "k0001"], None).status.code(), Some(1));

    // Loaded in batches of 30 (the node would take 100).
    let out = quiver(&node.addr, &["load", path, "--batch", "30"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "OK (1000 entries in 34 batches, through line 1000)\n");
    assert_eq!(stdout(&quiver(&node.addr, &["get", "k0777"], None)), "v777\n");
    // A batch larger than the node allows is cut to its limit.
    let out = quiver(&node.addr, &["load", "-"], Some(&lines));
    assert_eq!(stdout(&out), "OK (1000 entries in 10 batches, through line 1000)\n");

    // A bad line stops the load: what is stored and what is not is said.
    let mut damaged: Vec<String> = (1..=100).map(|i| format!("d{i:03}\tw{i}")).collect();
    damaged[49] = "no tab on line fifty".into();
    let out = quiver(&node.addr, &["load", "-", "--batch", "20"], Some(&damaged.join("\n")));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("line 50: expected KEY<TAB>VALUE"), "{err}");
    assert!(err.contains("lines 1-40 are stored (40 entries in 2 batches)"), "{err}");
    assert!(err.contains("no line after 40 was stored"), "{err}");
    assert_eq!(stdout(&quiver(&node.addr, &["get", "d040"], None)), "w40\n");
    assert_eq!(quiver(&node.addr, &["get", "d041"], None).status.code(), Some(1));

    let out = quiver(&node.addr, &["load", "-"], Some("first line has no tab\nk\tv\n"));
    let err = stderr(&out);
    assert!(err.contains("line 1: expected KEY<TAB>VALUE") && err.contains("nothing was stored"), "{err}");

    // A batch the node refuses: its lines are named.
    let mut refused: Vec<String> = (1..=30).map(|i| format!("e{i:02}\tx")).collect();
    refused[24] = "\tan empty key".into();
    let out = quiver(&node.addr, &["load", "-", "--batch", "10"], Some(&refused.join("\n")));
    let err = stderr(&out);
    assert!(err.contains("lines 21-30 (batch 3) failed: EmptyKey"), "{err}");
    assert!(err.contains("lines 1-20 are stored"), "{err}");
    assert_eq!(stdout(&quiver(&node.addr, &["get", "e20"], None)), "x\n");
    assert_eq!(quiver(&node.addr, &["get", "e21"], None).status.code(), Some(1));
}

#[test]
fn search_and_similar_print_hits_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--index"]);
    let addr = node.addr.as_str();
    let loaded = quiver(
        addr,
        &["bulk-set", "--file", "-"],
        Some(
            "crown\tthe queen was crowned on the throne\nwine\tfrench wine from bordeaux\ncode\tprogrammers fix bugs\n",
        ),
    );
    assert!(loaded.status.success(), "{}", stderr(&loaded));
    let found = quiver(addr, &["search", "wine"], None);
    assert!(found.status.success(), "{}", stderr(&found));
    assert!(stdout(&found).starts_with("  1. wine  (score "), "{}", stdout(&found));
    assert!(stdout(&found).contains("french wine from bordeaux"), "{}", stdout(&found));
    let json = quiver(addr, &["similar", "king", "-k", "1", "--json"], None);
    let hits: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(hits[0]["key"], "crown", "{hits}");
    assert!(hits[0]["score"].as_f64().unwrap() > 0.0);
    let none = quiver(addr, &["search", "zebra"], None);
    assert_eq!(stdout(&none), "no match\n");
    let bad = quiver(addr, &["similar", "--vector", "1,2,3"], None);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("BadQuery") && stderr(&bad).contains("50"), "{}", stderr(&bad));
    let bad = quiver(addr, &["search", "the", "-k", "5"], None);
    assert!(stderr(&bad).contains("no word to search for"), "{}", stderr(&bad));
}

#[test]
fn shutdown_reads_the_admin_token_from_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    let out = quiver(&node.addr, &["shutdown"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--data-dir"), "{}", stderr(&out));
    let out = quiver(&node.addr, &["shutdown", "--token", "wrong"], None);
    assert!(stderr(&out).contains("Forbidden"), "{}", stderr(&out));
    let out = quiver(&node.addr, &["shutdown", "--data-dir", dir.path().to_str().unwrap()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(node.wait().unwrap().success());
}

/// The context printed by `quiver versions KEY`.
fn printed_context(output: &Output) -> String {
    let text = stdout(output);
    let line = text.lines().find_map(|l| l.strip_prefix("context: ")).unwrap_or_else(|| panic!("no context in {text}"));
    line.to_owned()
}

/// The values `quiver versions KEY` prints, oldest first.
fn printed_values(output: &Output) -> Vec<String> {
    stdout(output)
        .lines()
        .filter(|l| !l.starts_with("context: "))
        .map(|l| l.split_once('\t').expect("HLC<TAB>VALUE").1.to_owned())
        .collect()
}

/// Two writers read the same context and write with it: two siblings. A
/// write with the context of both resolves them; a causal delete too; a
/// context of another key is refused.
#[test]
fn versions_and_context_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let ok = |args: &[&str]| {
        let out = quiver(&node.addr, args, None);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    };
    ok(&["set", "doc", "draft"]);
    let first_read = printed_context(&ok(&["versions", "doc"]));
    let second_read = printed_context(&ok(&["versions", "doc"]));
    ok(&["set", "doc", "from alice", "--context", &first_read]);
    ok(&["set", "doc", "from bob", "--context", &second_read]);
    let both = ok(&["versions", "doc"]);
    assert_eq!(printed_values(&both), ["from alice", "from bob"]);
    assert_eq!(stdout(&ok(&["get", "doc"])), "from bob\n");

    ok(&["set", "doc", "merged", "--context", &printed_context(&both)]);
    let merged = ok(&["versions", "doc"]);
    assert_eq!(printed_values(&merged), ["merged"]);

    let out = quiver(&node.addr, &["set", "other", "x", "--context", &printed_context(&merged)], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("InvalidContext"), "{}", stderr(&out));
    let out = quiver(&node.addr, &["set", "doc", "x", "--context", "not hex"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--context"), "{}", stderr(&out));

    ok(&["delete", "doc", "--context", &printed_context(&merged)]);
    assert_eq!(printed_values(&ok(&["versions", "doc"])), ["(deleted)"]);
    let out = quiver(&node.addr, &["versions", "never"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no versions"), "{}", stderr(&out));
}

/// `quiver certs`: a cluster CA once, then node certificates it signs,
/// each in the node's own directory (never with the CA's key), which a
/// node loads.
#[test]
fn certs_make_a_cluster_ca_and_node_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_arg = ca.to_str().unwrap();
    let out = quiver("127.0.0.1:1", &["certs", "init-ca", "--dir", ca_arg], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = quiver("127.0.0.1:1", &["certs", "init-ca", "--dir", ca_arg], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already holds a cluster CA"), "{}", stderr(&out));
    for name in ["n1", "n2"] {
        let own = dir.path().join(name);
        let args = ["certs", "node", "--name", name, "--ip", "127.0.0.1", "--ca-dir", ca_arg, "--dir"];
        let out = quiver("127.0.0.1:1", &[&args[..], &[own.to_str().unwrap()]].concat(), None);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!own.join("ca.key").exists());
        let tls = quiver_node::net::tls::NodeTls::load(&own, name).unwrap();
        tls.quic_server().unwrap();
    }
    let empty = dir.path().join("empty");
    let args = ["certs", "node", "--name", "n3", "--ca-dir", empty.to_str().unwrap(), "--dir"];
    let out = quiver("127.0.0.1:1", &[&args[..], &[dir.path().join("n3").to_str().unwrap()]].concat(), None);
    assert_eq!(out.status.code(), Some(2), "no CA in that directory");
    let out = quiver("127.0.0.1:1", &["certs", "node", "--name", "n3", "--ca-dir", ca_arg, "--dir", ca_arg], None);
    assert_eq!(out.status.code(), Some(2), "not in the CA's own directory");
}

/// Held by each test that runs `local-cluster`: it picks the first free
/// ports from 7700, and two starting at once could pick the same.
static ONE_LOCAL_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_local_cluster() -> std::sync::MutexGuard<'static, ()> {
    ONE_LOCAL_CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running `quiver local-cluster`: its nodes as it printed them.
struct LocalCluster {
    child: std::process::Child,
    /// `(name, client address, pid)` of each node.
    nodes: Vec<(String, String, u32)>,
    /// What it prints after `ready`.
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl LocalCluster {
    /// Starts `quiver local-cluster --nodes 3 --dir DIR` and reads its
    /// lines up to `ready`.
    fn start(dir: &std::path::Path) -> LocalCluster {
        use std::io::BufRead;
        let mut child = Command::new(quiver_bin())
            .args(["local-cluster", "--nodes", "3", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut nodes = Vec::new();
        while let Some(Ok(line)) = lines.next() {
            if line == "ready" {
                return LocalCluster { child, nodes, lines };
            }
            // node NAME client=HOST:PORT peer=HOST:PORT pid=PID
            let words: Vec<&str> = line.split_whitespace().collect();
            let field = |name: &str| words.iter().find_map(|w| w.strip_prefix(name)).unwrap().to_owned();
            assert_eq!(words[0], "node", "{line}");
            nodes.push((words[1].to_owned(), field("client="), field("pid=").parse().unwrap()));
        }
        panic!("local-cluster ended before it was ready: {:?}", child.wait());
    }

    /// SIGKILLs node `i` and reads the line saying it was restarted: its
    /// new pid.
    fn kill_node(&mut self, i: usize) -> u32 {
        let pid = self.nodes[i].2.to_string();
        assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
        let line = self.lines.next().expect("a line after the kill").unwrap();
        // node NAME restarted pid=PID (it exited: ...)
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..3], ["node", self.nodes[i].0.as_str(), "restarted"], "{line}");
        let pid = words[3].strip_prefix("pid=").unwrap().parse().unwrap();
        self.nodes[i].2 = pid;
        pid
    }

    /// SIGTERM, as Ctrl-C would: it stops every node and exits.
    fn stop(mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        assert!(self.child.wait().unwrap().success());
        for (name, _, pid) in &self.nodes {
            let alive = Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status().unwrap();
            assert!(!alive.success(), "{name} (pid {pid}) still runs after local-cluster stopped");
        }
    }
}

/// `quiver local-cluster` starts three nodes that form one cluster (a
/// write through one is read through another, and `status` shows the ring
/// of three, each up), stops them all on SIGTERM, and run again on the same
/// directory starts the same cluster with its data.
#[test]
fn local_cluster_starts_stops_and_restarts_with_its_data() {
    let _alone = one_local_cluster();
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(dir.path());
    let names: Vec<&str> = cluster.nodes.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    let addr = |i: usize| cluster.nodes[i].1.clone();
    assert!(quiver(&addr(0), &["set", "greeting", "hello"], None).status.success());
    assert_eq!(stdout(&quiver(&addr(2), &["get", "greeting"], None)), "hello\n");
    let status = stdout(&quiver(&addr(1), &["status", "--json"], None));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let ring = status["ring"].as_array().unwrap();
    assert_eq!(ring.len(), 3, "{status}");
    assert!(ring.iter().all(|m| m["up"] == true), "{status}");
    let shares: u64 = ring.iter().map(|m| m["share_ppm"].as_u64().unwrap()).sum();
    assert!((999_990..=1_000_010).contains(&shares), "the shares add up to the whole ring: {status}");
    let first = cluster.nodes.clone();
    cluster.stop();

    let again = LocalCluster::start(dir.path());
    let addrs = |nodes: &[(String, String, u32)]| nodes.iter().map(|(_, a, _)| a.clone()).collect::<Vec<_>>();
    assert_eq!(addrs(&again.nodes), addrs(&first), "the same nodes on the same ports");
    assert_eq!(stdout(&quiver(&again.nodes[1].1, &["get", "greeting"], None)), "hello\n");
    again.stop();
}

/// `quiver local-cluster` starts a node that dies again, saying so with its
/// new pid, and that node serves; a node that keeps dying at start (its
/// settings broken) makes it stop the others and exit with an error naming
/// the node and its log.
#[test]
fn local_cluster_restarts_a_node_that_dies_and_gives_up_on_one_that_cannot_start() {
    let _alone = one_local_cluster();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(dir.path());
    let old = cluster.nodes[1].2;
    let new = cluster.kill_node(1);
    assert_ne!(new, old);
    let started = std::time::Instant::now();
    while !quiver(&cluster.nodes[1].1, &["set", "after", "restart"], None).status.success() {
        assert!(started.elapsed() < common::WAIT_MAX, "n2 never served again");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(stdout(&quiver(&cluster.nodes[0].1, &["get", "after"], None)), "restart\n");

    let settings = dir.path().join("n3.toml");
    let mut broken = std::fs::read_to_string(&settings).unwrap();
    broken.push_str("\nthis is not a setting\n");
    std::fs::write(&settings, broken).unwrap();
    let pid = cluster.nodes[2].2.to_string();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let out = cluster.child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "it gives up");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("node n3 exited 3 times within 10s of starting") && said.contains("n3.log"), "{said}");
    for (name, _, pid) in &cluster.nodes {
        let alive = Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status().unwrap();
        assert!(!alive.success(), "{name} (pid {pid}) still runs after local-cluster gave up");
    }
}
