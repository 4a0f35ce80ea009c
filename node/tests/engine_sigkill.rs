//! A real process writes through the engine and is killed with SIGKILL at a
//! random moment, many times over the same directory. After each kill the
//! engine is reopened here and every write the process acknowledged (printed)
//! must be there; no batch may be partly present.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use quiver_node::storage::{Engine, Options};
use quiver_ring::rand::SplitMix64;

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("QUIVER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = SplitMix64::new(seed);
    let mut sets = Vec::new();
    let mut batches = Vec::new();
    let mut hot: BTreeMap<String, u64> = BTreeMap::new();
    let runs = 12;
    let mut recycled = 0;
    for run in 0..runs {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quiver-engine-writer"))
            .args([dir.path().to_str().unwrap(), &run.to_string(), "4"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep the pipe open until the kill: the writer must die of SIGKILL,
        // not of a closed pipe.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // Kill after a random number of acknowledgements: somewhere in the
        // middle of writes, flushes and compactions.
        let kill_after = rng.between(200, 3200);
        let mut acked = 0;
        for line in stdout.by_ref().lines() {
            let line = line.unwrap();
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("ready"), _, _) => continue,
                (Some("set"), Some(key), _) => sets.push(key.to_owned()),
                (Some("batch"), Some(prefix), _) => batches.push(prefix.to_owned()),
                (Some("hot"), Some(name), Some(i)) => {
                    let i: u64 = i.parse().unwrap();
                    hot.entry(format!("hot-{name}")).and_modify(|v| *v = (*v).max(i)).or_insert(i);
                }
                _ => panic!("unexpected line {line:?}"),
            }
            acked += 1;
            if acked >= kill_after {
                break;
            }
        }
        assert!(acked >= kill_after, "run {run}: the writer stopped early after {acked} writes");
        // SIGKILL: no destructor, no flush.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "run {run}: {status}");
        drop(stdout);

        // As the writer opens it: small memtables and WAL segments.
        let opts = Options { memtable_bytes_max: 64 << 10, wal_segment_bytes: 64 << 10, ..Options::default() };
        let engine = Engine::open(dir.path(), opts).unwrap();
        // Reopening takes a retired segment, if the runs left one, for its
        // first.
        recycled += engine.stats().wal_segments_recycled;
        let value = |key: &str| engine.get(key.as_bytes()).unwrap().and_then(|s| s.value().map(<[u8]>::to_vec));
        for key in &sets {
            let i = key.rsplit('-').next().unwrap();
            assert_eq!(value(key), Some(format!("v{i}").into_bytes()), "run {run}: acknowledged {key} lost");
        }
        for prefix in &batches {
            let i = prefix.rsplit("-b").next().unwrap();
            for j in 0..10 {
                assert_eq!(
                    value(&format!("{prefix}-{j}")),
                    Some(format!("b{i}").into_bytes()),
                    "run {run}: batch {prefix}"
                );
            }
        }
        for (key, &min) in &hot {
            let got: u64 = String::from_utf8(value(key).unwrap()).unwrap().parse().unwrap();
            assert!(got >= min, "run {run}: {key} holds {got}, but {min} was acknowledged");
        }
        // No batch is partly present, acknowledged or not.
        let mut parts: BTreeMap<String, usize> = BTreeMap::new();
        for item in engine.scan(b"r", Some(b"s")) {
            let (key, _) = item.unwrap();
            let key = String::from_utf8(key).unwrap();
            if let Some((prefix, _j)) = key.rsplit_once('-').filter(|(p, _)| p.contains("-b")) {
                *parts.entry(prefix.to_owned()).or_default() += 1;
            }
        }
        for (prefix, count) in parts {
            assert_eq!(count, 10, "run {run}: batch {prefix} is partly present");
        }
        drop(engine);
    }
    assert!(sets.len() > 1000, "only {} writes were acknowledged in {runs} runs", sets.len());
    assert!(recycled >= runs / 2, "only {recycled} reopenings found a retired WAL segment to recycle");
}
