//! Durable write throughput as the stored data grows, Quiver side by side
//! with Redis (`appendonly yes`, `appendfsync always`), in the same run.
//!
//! For each system, each stored size (0, 100k, 1M keys; 10M with
//! `QUIVER_BENCH_MAX_KEYS=10000000`) and each workload: start a fresh server
//! on loopback, load that many keys with 1000-key bulk sets (MSET for
//! Redis), then measure the workload as the median of `QUIVER_BENCH_RUNS`
//! runs of `QUIVER_BENCH_SECONDS` seconds (the runs add keys as they go):
//! - `set` at 1 and at 64 requests in flight (throughput, p50, p99);
//! - `bulk_set` of 1000 keys, 4 and 16 in flight (keys/s);
//! - `get` of stored keys at 64 in flight.
//!
//! Both systems are driven the same way: one connection per system, shared by
//! N tasks, so N requests are in flight on it. The tasks run on a tokio
//! runtime of `QUIVER_BENCH_CLIENT_THREADS` threads, 1 by default (as
//! `redis-benchmark` runs by default): the client shares the machine's two
//! cores with the server it measures, and a multi-threaded runtime spends
//! them waking its idle workers (README, Performance, has both). Values are
//! `QUIVER_BENCH_VALUE_BYTES` (100) bytes. `QUIVER_BENCH_SKIP_REDIS=1` runs
//! Quiver alone; `QUIVER_BENCH_WORKLOADS=set1,set64,bulk,bulk16,get64` picks
//! workloads (all by default); `QUIVER_BENCH_NODE_ARGS` passes flags to
//! `quiverd` (e.g. `--memtable-bytes-max=16777216`);
//! `QUIVER_BENCH_QUIVERD=path` runs that `quiverd` binary instead of building
//! one (to compare two builds in one session); `QUIVER_BENCH_PLOT_ONLY=1`
//! re-draws the plot from the CSV of the last run without measuring.
//!
//! Output: a markdown table on stdout, `target/quiver-bench/write_throughput.csv`
//! and `target/quiver-bench/write_throughput.svg`.
//!
//! `QUIVER_BENCH_MIN_KEYS` skips the smaller sizes (`=1000000`: only 1M).
//! `QUIVER_BENCH_WARM=1` reads every stored key once before `get` is
//! measured (both systems), so the runs show a warmed server rather than
//! one whose caches fill as the runs go.
//!
//! Run: `cargo bench -p quiver-benches --bench write_throughput`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use quiver_benches::{build_quiverd, drive, env_or, median, run_setup_script, workspace, Figure, Keys};
use quiver_chaos::node::{NodeProcess, NodeSpec};
use redis::AsyncCommands;

/// The allocator `quiverd` uses (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Threads of the runtime the benchmark's client tasks run on.
fn client_threads() -> usize {
    env_or("QUIVER_BENCH_CLIENT_THREADS", 1).max(1) as usize
}

/// One connection to a system under test, shared by every task.
#[derive(Clone)]
enum Conn {
    Quiver(Arc<quiver_client::Client>),
    Redis(redis::aio::MultiplexedConnection),
}

impl Conn {
    async fn set(&mut self, key: &str, value: &[u8]) {
        match self {
            Conn::Quiver(c) => c.set(key, value).await.expect("quiver set"),
            Conn::Redis(c) => c.set::<_, _, ()>(key, value).await.expect("redis set"),
        }
    }

    /// Sets `keys` (each to `value`) in one bulk set (MSET for Redis).
    async fn bulk_set(&mut self, keys: &Keys, value: &[u8]) {
        let entries: Vec<(&str, &[u8])> = keys.iter().map(|key| (key, value)).collect();
        match self {
            Conn::Quiver(c) => c.bulk_set(entries).await.expect("quiver bulk_set"),
            Conn::Redis(c) => c.mset::<_, _, ()>(&entries).await.expect("redis mset"),
        }
    }

    /// Reads `keys` in one request (MGET for Redis); how many were found.
    async fn get_many(&mut self, keys: &Keys) -> usize {
        match self {
            Conn::Quiver(c) => c.get_many(keys.iter()).await.expect("quiver get_many").iter().flatten().count(),
            Conn::Redis(c) => {
                let keys: Vec<&str> = keys.iter().collect();
                let found: Vec<Option<Vec<u8>>> = c.mget(&keys).await.expect("redis mget");
                found.iter().flatten().count()
            }
        }
    }

    async fn get(&mut self, key: &str) -> bool {
        match self {
            Conn::Quiver(c) => c.get(key).await.expect("quiver get").is_some(),
            Conn::Redis(c) => c.get::<_, Option<Vec<u8>>>(key).await.expect("redis get").is_some(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Set1,
    Set64,
    Bulk,
    Bulk16,
    Get64,
}

impl Workload {
    const ALL: [Workload; 5] = [Workload::Set1, Workload::Set64, Workload::Bulk, Workload::Bulk16, Workload::Get64];

    fn short(self) -> &'static str {
        match self {
            Workload::Set1 => "set1",
            Workload::Set64 => "set64",
            Workload::Bulk => "bulk",
            Workload::Bulk16 => "bulk16",
            Workload::Get64 => "get64",
        }
    }

    /// The workloads `QUIVER_BENCH_WORKLOADS` asks for (all by default).
    fn selected() -> Vec<Workload> {
        let wanted = std::env::var("QUIVER_BENCH_WORKLOADS").unwrap_or_default();
        Workload::ALL
            .into_iter()
            .filter(|w| wanted.is_empty() || wanted.split(',').any(|s| s.trim() == w.short()))
            .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Set1 => "set, 1 in flight",
            Workload::Set64 => "set, 64 in flight",
            Workload::Bulk => "bulk_set 1000 keys, 4 in flight",
            Workload::Bulk16 => "bulk_set 1000 keys, 16 in flight",
            Workload::Get64 => "get, 64 in flight",
        }
    }

    fn in_flight(self) -> u64 {
        match self {
            Workload::Set1 => 1,
            Workload::Set64 | Workload::Get64 => 64,
            Workload::Bulk => 4,
            Workload::Bulk16 => 16,
        }
    }
}

async fn measure(conn: &Conn, workload: Workload, seconds: u64, run: u64, stored: u64, value: &Arc<Vec<u8>>) -> Figure {
    let (conn, value) = (conn.clone(), value.clone());
    drive(workload.in_flight(), seconds, move |task, i| {
        let (mut conn, value) = (conn.clone(), value.clone());
        async move {
            match workload {
                Workload::Set1 | Workload::Set64 => {
                    conn.set(&format!("new-{stored}-{run}-{task}-{i}"), &value).await;
                    1
                }
                Workload::Bulk | Workload::Bulk16 => {
                    let batch = Keys::new(&format!("bulk-{stored}-{run}-{task}-{i}-"), 0..1000, 0);
                    conn.bulk_set(&batch, &value).await;
                    batch.len()
                }
                Workload::Get64 => {
                    // A uniform stored key, the same ones in every build.
                    let mut rng = quiver_ring::rand::SplitMix64::new((run * 1000 + task) << 32 | i);
                    let found = conn.get(&format!("pre-{:012}", rng.between(0, stored.max(1) - 1))).await;
                    assert!(found || stored == 0, "a pre-loaded key is missing");
                    1
                }
            }
        }
    })
    .await
}

/// Loads keys `pre-{from..to}` in 1000-key bulk sets, 4 in flight.
/// Whether `get` is measured warm (`QUIVER_BENCH_WARM=1`): after every
/// stored key was read once, so a server's caches hold what they can.
fn warm_reads() -> bool {
    env_or("QUIVER_BENCH_WARM", 0) != 0
}

/// Reads every stored key once, 1000 at a time.
async fn warm(conn: &Conn, stored: u64) {
    let mut conn = conn.clone();
    for start in (0..stored).step_by(1000) {
        let keys = Keys::new("pre-", start..(start + 1000).min(stored), 12);
        assert_eq!(conn.get_many(&keys).await as u64, keys.len(), "a pre-loaded key is missing");
    }
}

async fn load(conn: &Conn, from: u64, to: u64, value: &Arc<Vec<u8>>, label: &str) {
    if to <= from {
        return;
    }
    let bar = ProgressBar::new(to - from);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} keys ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("loading {label}"));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(from));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (mut conn, value, next, bar) = (conn.clone(), value.clone(), next.clone(), bar.clone());
            tokio::spawn(async move {
                loop {
                    let start = next.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
                    if start >= to {
                        return;
                    }
                    let end = (start + 1000).min(to);
                    conn.bulk_set(&Keys::new("pre-", start..end, 12), &value).await;
                    bar.inc(end - start);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("load task");
    }
    bar.finish_and_clear();
}

struct Redis {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis(port: u16) -> Result<Redis, String> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
        .args(["--appendfsync", "always", "--daemonize", "no", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting redis-server: {e}"))?;
    Ok(Redis { child, _dir: dir })
}

async fn connect_redis(port: u16) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for _ in 0..100 {
        match client.get_multiplexed_async_connection().await {
            Ok(conn) => return Ok(conn),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("redis did not answer: {last}"))
}

type Row = (&'static str, u64, Workload, Figure);

/// A system under test.
enum System {
    Quiver { quiverd: PathBuf, args: Vec<String> },
    Redis,
}

/// A running server; stopping it (drop) removes its data.
enum Server {
    // Fields drop in order: the node stops before its directory goes.
    Quiver { _node: NodeProcess, _dir: tempfile::TempDir },
    Redis { _redis: Redis },
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Quiver { .. } => "quiver",
            System::Redis => "redis",
        }
    }

    /// Starts a fresh, empty server and connects to it.
    async fn start(&self) -> Result<(Server, Conn), String> {
        match self {
            System::Quiver { quiverd, args } => {
                let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
                let mut spec = NodeSpec::new(quiverd, dir.path());
                spec.args = args.clone();
                let node = NodeProcess::start(&spec).map_err(|e| format!("start quiverd: {e}"))?;
                let client = quiver_client::Client::connect([node.addr.clone()]).await.map_err(|e| e.to_string())?;
                Ok((Server::Quiver { _node: node, _dir: dir }, Conn::Quiver(Arc::new(client))))
            }
            System::Redis => {
                let port = quiver_chaos::node::free_port().map_err(|e| e.to_string())?;
                let redis = start_redis(port)?;
                let conn = connect_redis(port).await?;
                Ok((Server::Redis { _redis: redis }, Conn::Redis(conn)))
            }
        }
    }
}

/// Every selected workload at every size, each on a fresh server that holds
/// exactly `stored` keys when its first run starts (the runs then add to
/// it, so later runs also carry the flushing and compaction of earlier ones).
async fn bench_system(system: &System, sizes: &[u64], runs: u64, seconds: u64, value: &Arc<Vec<u8>>) -> Vec<Row> {
    let name = system.name();
    let mut rows = Vec::new();
    for &stored in sizes {
        for workload in Workload::selected() {
            if workload == Workload::Get64 && stored == 0 {
                continue;
            }
            let (server, conn) = match system.start().await {
                Ok(started) => started,
                Err(e) => {
                    eprintln!("{name} skipped: {e}");
                    return rows;
                }
            };
            load(&conn, 0, stored, value, &format!("{name} to {stored} keys")).await;
            if workload == Workload::Get64 && warm_reads() {
                warm(&conn, stored).await;
            }
            let mut figures = Vec::new();
            for run in 0..runs {
                figures.push(measure(&conn, workload, seconds, run, stored, value).await);
            }
            let runs_text: Vec<String> = figures.iter().map(|f| format!("{:.0}", f.keys_per_s)).collect();
            eprintln!("{name:>6} | {stored:>9} keys | {:<32} | runs: {}", workload.name(), runs_text.join(" "));
            rows.push((name, stored, workload, median(figures)));
            drop(conn);
            drop(server);
        }
    }
    rows
}

fn report(rows: &[Row], sizes: &[u64], runs: u64, seconds: u64, value_bytes: usize) -> std::io::Result<()> {
    let out = workspace().join("target/quiver-bench");
    std::fs::create_dir_all(&out)?;
    let find = |system: &str, stored: u64, w: Workload| {
        rows.iter().find(|r| r.0 == system && r.1 == stored && r.2 == w).map(|r| r.3)
    };

    let threads = client_threads();
    println!(
        "\nDurable writes, {value_bytes}-byte values, one connection per system, client runtime of {threads} \
         thread(s); median of {runs} runs of {seconds}s.\n"
    );
    println!("| stored keys | workload | Quiver keys/s | p50 / p99 ms | Redis keys/s | p50 / p99 ms | Quiver / Redis | Quiver vs. empty |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut csv = String::from("system,stored_keys,workload,keys_per_s,p50_ms,p99_ms\n");
    for (system, stored, workload, f) in rows {
        csv += &format!("{system},{stored},{},{:.0},{:.3},{:.3}\n", workload.short(), f.keys_per_s, f.p50_ms, f.p99_ms);
    }
    for &stored in sizes {
        for w in Workload::ALL {
            let Some(q) = find("quiver", stored, w) else { continue };
            let r = find("redis", stored, w);
            let empty = find("quiver", 0, w).unwrap_or(q);
            println!(
                "| {stored} | {} | {:.0} | {:.2} / {:.2} | {} | {} | {} | {:.0}% |",
                w.name(),
                q.keys_per_s,
                q.p50_ms,
                q.p99_ms,
                r.map_or("-".into(), |r| format!("{:.0}", r.keys_per_s)),
                r.map_or("-".into(), |r| format!("{:.2} / {:.2}", r.p50_ms, r.p99_ms)),
                r.map_or("-".into(), |r| format!("{:.2}x", q.keys_per_s / r.keys_per_s)),
                100.0 * q.keys_per_s / empty.keys_per_s,
            );
        }
    }
    std::fs::write(out.join("write_throughput.csv"), csv)?;
    plot(rows, &out.join("write_throughput.svg")).map_err(std::io::Error::other)?;
    println!("\nCSV and plot: {}", out.display());
    Ok(())
}

fn plot(rows: &[Row], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max_y = rows.iter().filter(|r| r.2 != Workload::Get64).map(|r| r.3.keys_per_s).fold(1.0, f64::max) * 1.15;
    let max_x = rows.iter().map(|r| r.1).max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Durable write throughput vs. stored keys", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..max_x * 1.05, (1000f64..max_y).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("keys already stored")
        .y_desc("acknowledged keys/s (log)")
        .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(|e| e.to_string())?;
    let series = [
        ("quiver", Workload::Set64, RED),
        ("quiver", Workload::Bulk16, RGBColor(120, 0, 160)),
        ("quiver", Workload::Bulk, MAGENTA),
        ("quiver", Workload::Set1, RGBColor(200, 120, 0)),
        ("redis", Workload::Set64, BLUE),
        ("redis", Workload::Bulk16, RGBColor(0, 90, 160)),
        ("redis", Workload::Bulk, CYAN),
        ("redis", Workload::Set1, RGBColor(0, 120, 0)),
    ];
    for (system, workload, color) in series {
        let points: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.0 == system && r.2 == workload).map(|r| (r.1 as f64, r.3.keys_per_s)).collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(format!("{system}: {}", workload.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Reads the rows back from a CSV written by [`report`].
fn read_csv(path: &Path) -> Result<Vec<Row>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let [system, stored, workload, keys_per_s, p50_ms, p99_ms] = fields[..] else {
            return Err(format!("bad CSV line {line:?}"));
        };
        let system = if system == "quiver" { "quiver" } else { "redis" };
        let workload = Workload::ALL
            .into_iter()
            .find(|w| w.short() == workload)
            .ok_or(format!("unknown workload {workload:?}"))?;
        let figure = Figure::from_csv(keys_per_s, p50_ms, p99_ms)?;
        let stored = stored.parse::<u64>().map_err(|e| format!("{stored:?}: {e}"))?;
        rows.push((system, stored, workload, figure));
    }
    Ok(rows)
}

fn main() {
    let threads = client_threads();
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    };
    runtime.expect("the client runtime").block_on(bench());
}

async fn bench() {
    if std::env::var("QUIVER_BENCH_PLOT_ONLY").as_deref() == Ok("1") {
        let out = workspace().join("target/quiver-bench");
        let rows = read_csv(&out.join("write_throughput.csv")).expect("read the CSV");
        plot(&rows, &out.join("write_throughput.svg")).expect("plot");
        return;
    }
    let runs = env_or("QUIVER_BENCH_RUNS", 3).max(1);
    let seconds = env_or("QUIVER_BENCH_SECONDS", 3).max(1);
    let max_keys = env_or("QUIVER_BENCH_MAX_KEYS", 1_000_000);
    let min_keys = env_or("QUIVER_BENCH_MIN_KEYS", 0);
    let value_bytes = env_or("QUIVER_BENCH_VALUE_BYTES", 100) as usize;
    let sizes: Vec<u64> =
        [0, 100_000, 1_000_000, 10_000_000].into_iter().filter(|&s| (min_keys..=max_keys).contains(&s)).collect();
    let value = Arc::new(vec![b'v'; value_bytes]);

    let quiver = System::Quiver {
        quiverd: std::env::var("QUIVER_BENCH_QUIVERD").map(PathBuf::from).unwrap_or_else(|_| build_quiverd()),
        args: std::env::var("QUIVER_BENCH_NODE_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect(),
    };
    let mut rows = bench_system(&quiver, &sizes, runs, seconds, &value).await;
    if std::env::var("QUIVER_BENCH_SKIP_REDIS").as_deref() != Ok("1") {
        match run_setup_script("benches/setup-redis.sh") {
            Ok(()) => rows.extend(bench_system(&System::Redis, &sizes, runs, seconds, &value).await),
            Err(e) => eprintln!("Redis skipped: {e}"),
        }
    }
    report(&rows, &sizes, runs, seconds, value_bytes).expect("write the report");
}
