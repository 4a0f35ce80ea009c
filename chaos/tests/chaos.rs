//! Short chaos runs against real `quiverd` processes, as CI runs them: each
//! subcommand with at least 10 SIGKILLs (the skip-write fault on in one), on
//! one node and on a cluster of three, with indexing on and its check, isolation also without kills, and
//! proof that the checker reports losses when a node acknowledges writes it
//! never made.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// `quiverd`: next to the test binaries after `cargo test --workspace`,
/// built here when this crate's tests run alone.
fn quiverd() -> PathBuf {
    if let Some(path) = quiver_chaos::node::find_quiverd() {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(["build", "-p", "quiver-node", "--bin", "quiverd"]).status().unwrap();
    assert!(status.success(), "building quiverd failed");
    quiver_chaos::node::find_quiverd().expect("quiverd after building it")
}

/// Runs `quiver-chaos ARGS` and returns its exit code and JSON report.
fn chaos(args: &[&str], unsafe_modes: bool) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_quiver-chaos"));
    command
        .args(args)
        .args(["--quiet", "--quiverd", quiverd().to_str().unwrap()])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap(), "--report", report.to_str().unwrap()])
        // Small memtables and WAL segments: flushes, compactions and segment
        // roll-overs happen between the kills.
        .args(["--node-arg=--memtable-bytes-max=1048576", "--node-arg=--wal-segment-bytes=4194304"]);
    if unsafe_modes {
        command.env("QUIVER_UNSAFE_TEST_MODES", "1");
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&report)
            .unwrap_or_else(|e| panic!("no report ({e}); stderr:\n{}", String::from_utf8_lossy(&output.stderr))),
    )
    .unwrap();
    (output.status.code().unwrap_or(-1), report)
}

fn assert_clean(code: i32, report: &Value, min_kills: u64) {
    assert_eq!(report["violations"], 0, "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert!(report["acknowledged"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["kills"].as_u64().unwrap() >= min_kills, "{report:#}");
}

#[test]
fn durability_under_sigkill() {
    let (code, report) = chaos(&["durability", "--duration", "20s", "--seed", "11", "--min-kills", "10"], false);
    assert_clean(code, &report, 10);
}

#[test]
fn bulk_atomicity_under_sigkill_with_skip_write_fault() {
    let args = ["bulk-atomicity", "--duration", "20s", "--seed", "12", "--min-kills", "10", "--writers", "2"];
    let (code, report) = chaos(&[&args[..], &["--debug-skip-write-probability", "0.05"]].concat(), false);
    assert_clean(code, &report, 10);
}

/// Indexing on, one node and three: after the kills, every node's
/// postings and vectors match its current values (`quiverd --check-index`
/// at the end of the run reports any difference as a violation).
#[test]
fn indexes_match_the_data_after_sigkills() {
    let args = ["durability", "--duration", "15s", "--seed", "14", "--min-kills", "8", "--node-arg=--index"];
    let (code, report) = chaos(&args, false);
    assert_clean(code, &report, 8);
    let args = ["bulk-atomicity", "--nodes", "3", "--duration", "15s", "--seed", "24", "--min-kills", "6"];
    let (code, report) = chaos(&[&args[..], &["--writers", "2", "--node-arg=--index"]].concat(), false);
    assert_clean(code, &report, 6);
}

#[test]
fn isolation_under_sigkill() {
    let (code, report) = chaos(&["isolation", "--duration", "20s", "--seed", "13", "--min-kills", "10"], false);
    assert_clean(code, &report, 10);
    assert!(report["checkpoints"].as_u64().unwrap() >= 1, "{report:#}");
}

/// Three nodes, one SIGKILLed at a time: quorum writes through the smart
/// client lose nothing acknowledged, batches stay whole and unmixed, read
/// at `all` once every node is back.
#[test]
fn durability_on_three_nodes_under_sigkill() {
    let args = ["durability", "--nodes", "3", "--duration", "15s", "--seed", "21", "--min-kills", "8"];
    let (code, report) = chaos(&args, false);
    assert_clean(code, &report, 8);
}

#[test]
fn bulk_atomicity_on_three_nodes_under_sigkill() {
    let args = ["bulk-atomicity", "--nodes", "3", "--duration", "15s", "--seed", "22", "--min-kills", "8"];
    let (code, report) = chaos(&[&args[..], &["--writers", "2"]].concat(), false);
    assert_clean(code, &report, 8);
}

#[test]
fn isolation_on_three_nodes_under_sigkill() {
    let args = ["isolation", "--nodes", "3", "--duration", "15s", "--seed", "23", "--min-kills", "8"];
    let (code, report) = chaos(&args, false);
    assert_clean(code, &report, 8);
}

#[test]
fn isolation_without_kills() {
    let (code, report) = chaos(&["isolation", "--duration", "8s", "--seed", "14", "--no-kill"], false);
    assert_clean(code, &report, 0);
    assert!(report["checkpoints"].as_u64().unwrap() >= 1, "{report:#}");
}

#[test]
fn durability_checker_reports_writes_a_node_dropped() {
    let args = ["durability", "--duration", "4s", "--no-kill", "--node-arg=--debug-drop-acked-writes=0.02"];
    let (code, report) = chaos(&args, true);
    assert_eq!(code, 1, "{report:#}");
    assert!(report["violations"].as_u64().unwrap() > 0, "{report:#}");
    let first = report["violation_samples"][0].as_str().unwrap();
    assert!(first.starts_with("LOST"), "{first}");
}

/// In a cluster whose replicas each drop their part of some keys' writes
/// (acknowledging them all the same), the merge of all replicas still holds
/// every key, but reading each replica alone shows they did not converge;
/// and even after an anti-entropy round on every node (whose repairs those
/// replicas drop too) their hash trees differ.
#[test]
fn convergence_check_reports_replicas_that_dropped_writes() {
    let args =
        ["durability", "--nodes", "3", "--duration", "4s", "--no-kill", "--node-arg=--debug-drop-acked-writes=0.05"];
    let (code, report) = chaos(&args, true);
    assert_eq!(code, 1, "{report:#}");
    let samples = report["violation_samples"].as_array().unwrap();
    assert!(samples.iter().any(|v| v.as_str().unwrap().starts_with("DIVERGED")), "{report:#}");
    assert!(samples.iter().any(|v| v.as_str().unwrap().starts_with("TREES DIFFER")), "{report:#}");
}

#[test]
fn bulk_atomicity_checker_reports_batches_a_node_dropped() {
    let args = ["bulk-atomicity", "--duration", "4s", "--no-kill", "--node-arg=--debug-drop-acked-writes=0.05"];
    let (code, report) = chaos(&args, true);
    assert_eq!(code, 1, "{report:#}");
    let first = report["violation_samples"][0].as_str().unwrap();
    assert!(first.starts_with("LOST batch"), "{first}");
}
