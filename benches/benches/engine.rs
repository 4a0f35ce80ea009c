//! Engine-only durable write throughput (every write fsynced before it is
//! acknowledged), 100-byte values:
//! - `set` with 1 and with 64 writers in flight (tokio tasks);
//! - 1000-key batches, 4 and 16 in flight (a bulk load keeps several batches
//!   in flight so that each group commit carries more of them);
//!
//! each on a fresh engine that is empty or already holds 1M keys when its
//! first run starts. Each figure is the median of `QUIVER_BENCH_RUNS`
//! (default 5) runs of `QUIVER_BENCH_SECONDS` (default 4) seconds, one after
//! the other on that engine, so the store grows and the flushing and
//! compaction of the earlier runs weigh on the later ones.
//! `QUIVER_BENCH_KEYS` sets the pre-populated size (default 1,000,000; 0
//! runs the empty engine only); `QUIVER_BENCH_WORKLOADS` picks workloads by
//! id (`set1,set64,batch,batch16`).
//!
//! Run: `cargo bench -p quiver-benches --bench engine`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quiver_node::storage::{Engine, Op, Options};
use quiver_ring::{NodeId, Stamper};

/// The allocator `quiverd` uses (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

struct Bench {
    engine: Arc<Engine>,
    stamper: Arc<Mutex<Stamper>>,
    value: Vec<u8>,
    /// Removed when the bench is dropped, after the engine (fields drop in
    /// order).
    _dir: tempfile::TempDir,
}

impl Bench {
    /// An engine in a fresh directory, loaded with keys `0..stored` in
    /// 1000-key batches and flushed.
    async fn open(stored: u64) -> Arc<Bench> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let engine = Arc::new(Engine::open(dir.path(), Options::default()).unwrap());
        let bench = Arc::new(Bench {
            engine,
            stamper: Arc::new(Mutex::new(Stamper::new(NodeId(1), Default::default(), u64::MAX))),
            value: vec![b'v'; 100],
            _dir: dir,
        });
        if stored > 0 {
            let started = Instant::now();
            for chunk in (0..stored).step_by(1000) {
                bench.engine.write(bench.ops(chunk..(chunk + 1000).min(stored))).await.unwrap();
            }
            let engine = bench.engine.clone();
            tokio::task::spawn_blocking(move || engine.flush()).await.unwrap().unwrap();
            eprintln!("  loaded {stored} keys in {:.1}s", started.elapsed().as_secs_f64());
        }
        bench
    }

    fn ops(&self, keys: impl Iterator<Item = u64>) -> Vec<Op> {
        let stamp = self.stamper.lock().unwrap().next(now_ms()).expect("a test clock never refuses");
        keys.map(|k| Op { key: format!("key-{k:012}").into_bytes(), version: stamp.blind(Some(self.value.clone())) })
            .collect()
    }

    /// Keys written per second by `in_flight` tasks each writing
    /// `keys_per_write` keys per write, for `seconds`.
    async fn measure(self: &Arc<Self>, in_flight: u64, keys_per_write: u64, seconds: u64, key_base: u64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let start = Instant::now();
        let tasks: Vec<_> = (0..in_flight)
            .map(|task| {
                let bench = self.clone();
                tokio::spawn(async move {
                    let mut written = 0u64;
                    let mut next = key_base + task * 1_000_000_000;
                    while Instant::now() < deadline {
                        let ops = bench.ops(next..next + keys_per_write);
                        next += keys_per_write;
                        bench.engine.write(ops).await.expect("durable write");
                        written += keys_per_write;
                    }
                    written
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        total as f64 / start.elapsed().as_secs_f64()
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let runs = env_or("QUIVER_BENCH_RUNS", 5).max(1);
    let seconds = env_or("QUIVER_BENCH_SECONDS", 4).max(1);
    let prepopulated = env_or("QUIVER_BENCH_KEYS", 1_000_000);
    let all: [(&str, &str, u64, u64); 4] = [
        ("set1", "set, 1 in flight", 1, 1),
        ("set64", "set, 64 in flight", 64, 1),
        ("batch", "batch of 1000, 4 in flight", 4, 1000),
        ("batch16", "batch of 1000, 16 in flight", 16, 1000),
    ];
    let wanted = std::env::var("QUIVER_BENCH_WORKLOADS").unwrap_or_default();
    let cases: Vec<(&str, u64, u64)> = all
        .iter()
        .filter(|c| wanted.is_empty() || wanted.split(',').any(|w| w == c.0))
        .map(|&(_, name, in_flight, keys)| (name, in_flight, keys))
        .collect();
    let sizes: Vec<u64> = if prepopulated == 0 { vec![0] } else { vec![0, prepopulated] };

    let mut rows = Vec::new();
    for stored in sizes {
        for (i, &(name, in_flight, keys_per_write)) in cases.iter().enumerate() {
            // A fresh engine for each workload, holding exactly `stored`
            // keys when its first run starts (the runs then add to it).
            let bench = Bench::open(stored).await;
            let mut results = Vec::new();
            for run in 0..runs {
                // New keys each run (beyond the pre-populated ones).
                let base = 10_000_000_000 + (i as u64 * 100 + run) * 10_000_000_000_000;
                results.push(bench.measure(in_flight, keys_per_write, seconds, base).await);
            }
            eprintln!(
                "{stored:>9} keys | {name:<28} | runs: {:?}",
                results.iter().map(|r| *r as u64).collect::<Vec<_>>()
            );
            eprintln!("  engine after the runs: {:?}", bench.engine.stats());
            rows.push((stored, name, median(results)));
        }
    }

    println!("\n| stored keys | workload | durable keys/s (median of {runs} x {seconds}s) | vs. empty |");
    println!("|---:|---|---:|---:|");
    for &(stored, name, rate) in &rows {
        let empty = rows.iter().find(|r| r.0 == 0 && r.1 == name).map_or(rate, |r| r.2);
        println!("| {stored} | {name} | {rate:.0} | {:.0}% |", 100.0 * rate / empty);
    }
}
