//! Durable write throughput of a three-node cluster on this machine, with a
//! single node measured the same way in the same run as the baseline.
//!
//! The cluster: three `quiverd` processes on loopback, N=3 replicas per
//! key, writes acknowledged once W=2 replicas have them durable, reached
//! over QUIC with mutual TLS. The client is the smart client (one
//! connection per node, each key sent to one of its replicas, which
//! coordinates), shared by every task of a runtime of one thread. The
//! baseline: one `quiverd` alone, the same client. Beside them: a
//! three-member etcd cluster on the same machine (Debian's etcd 3.4,
//! installed by `benches/setup-etcd.sh`), driven from the same harness at
//! the same requests in flight by a minimal gRPC client
//! (`quiver_benches::etcd`): `Put` for `set`, and a `Txn` of the same 1000
//! puts for `bulk_set` (etcd started with `--max-txn-ops 1000`). etcd
//! acknowledges a put once a majority of members wrote it to their
//! fsynced logs, as Quiver does once W=2 replicas have it durable.
//!
//! Workloads, each the median of `QUIVER_BENCH_RUNS` (3) runs of
//! `QUIVER_BENCH_SECONDS` (5) seconds on fresh, empty servers:
//! - `set` at 64 in flight (keys/s, p50, p99);
//! - `bulk_set` of 1000 keys, 4 in flight (keys/s, p50, p99 per bulk set).
//!
//! Values are `QUIVER_BENCH_VALUE_BYTES` (100) bytes. Every process (the
//! nodes and the client) shares the machine's cores: on a 2-core machine
//! the cluster does three times the durable writes on the same two cores
//! and the same disk, so this shows the cost of replication, not the
//! capacity of three machines.
//!
//! A fourth setup bounds what any three-replica design could do here: three
//! `quiverd` nodes that know nothing of each other, and the client writes
//! every key to all three itself, counting it acknowledged once two have it
//! durable ("client fan-out"). It does the work a cluster write cannot do
//! without (three durable writes in three processes, three request/answer
//! exchanges, one of them the client's) over the cheapest path there is
//! (the client protocol, one pipelined TCP connection per node), and none
//! of the coordination: the cluster's figure cannot pass it on this machine.
//!
//! `QUIVER_BENCH_SETUPS=single,cluster,fanout,etcd` picks setups (all by
//! default); `QUIVER_BENCH_ETCD=0` leaves etcd out.
//!
//! Output: a markdown table on stdout, `target/quiver-bench/cluster_throughput.csv`
//! and `target/quiver-bench/cluster_throughput.svg`. `QUIVER_BENCH_PLOT_ONLY=1`
//! prints the table and draws the plot again from that CSV, measuring
//! nothing.
//!
//! Run: `cargo bench -p quiver-benches --bench cluster_throughput`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_benches::etcd::{Etcd, EtcdCluster};
use quiver_benches::{build_quiverd, drive, env_or, median, run_setup_script, workspace, Figure, Keys};
use quiver_chaos::node::{cluster_specs, NodeProcess, NodeSpec};
use quiver_client::Client;

/// The allocator `quiverd` uses (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long the cluster's nodes may take to find each other.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// etcd's members listen on this port plus 1 to 3 (clients) and 11 to 13
/// (peers), on loopback.
const ETCD_BASE_PORT: u16 = 23790;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Set64,
    Bulk,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::Set64, Workload::Bulk];

    fn short(self) -> &'static str {
        match self {
            Workload::Set64 => "set64",
            Workload::Bulk => "bulk",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Set64 => "set, 64 in flight",
            Workload::Bulk => "bulk_set 1000 keys, 4 in flight",
        }
    }

    fn in_flight(self) -> u64 {
        match self {
            Workload::Set64 => 64,
            Workload::Bulk => 4,
        }
    }
}

/// What is measured: one node alone, three in a cluster, three alone that
/// the client writes to (the ceiling), or etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Single,
    Cluster,
    Fanout,
    Etcd,
}

impl Setup {
    const ALL: [Setup; 4] = [Setup::Single, Setup::Cluster, Setup::Fanout, Setup::Etcd];

    fn name(self) -> &'static str {
        match self {
            Setup::Single => "1 node",
            Setup::Cluster => "3 nodes, N=3 W=2",
            Setup::Fanout => "client fan-out to 3 nodes, W=2",
            Setup::Etcd => "etcd, 3 members",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Setup::Single => "single",
            Setup::Cluster => "cluster",
            Setup::Fanout => "fanout",
            Setup::Etcd => "etcd",
        }
    }
}

/// Running servers; dropping it stops them, then removes their data.
struct Servers {
    nodes: Vec<NodeProcess>,
    _etcd: Option<EtcdCluster>,
    _dir: tempfile::TempDir,
}

/// How the bench talks to a setup.
enum Conn {
    Quiver(Box<Client>),
    /// One client per node; every write goes to all of them.
    Fanout(Fanout),
    /// One client per etcd member; task `t` uses member `t % 3`.
    Etcd(Vec<Etcd>),
}

impl Conn {
    /// Calls a Quiver client sent on to another node after a failed
    /// attempt (none for etcd).
    fn retries(&self) -> u64 {
        match self {
            Conn::Quiver(client) => client.retries().total(),
            Conn::Fanout(fanout) => fanout.nodes.iter().map(|node| node.retries().total()).sum(),
            Conn::Etcd(_) => 0,
        }
    }
}

/// Writes to every node and answers once two have it; the third write goes
/// on behind the answer, as a cluster's third replica write does.
struct Fanout {
    nodes: Vec<Arc<Client>>,
    /// Bounds the writes still running behind an answer, so a slower node
    /// cannot collect an ever longer queue.
    behind: Arc<tokio::sync::Semaphore>,
}

/// Writes acknowledged by this many nodes count as acknowledged.
const FANOUT_W: usize = 2;

impl Fanout {
    /// Runs `write` against every node; returns once `FANOUT_W` succeeded.
    async fn write<F, Fut>(&self, write: F)
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<(), quiver_client::Error>> + Send + 'static,
    {
        let permit = self.behind.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (done, mut answers) = tokio::sync::mpsc::unbounded_channel();
        for node in &self.nodes {
            let (write, done) = (write(node.clone()), done.clone());
            tokio::spawn(async move {
                let _ = done.send(write.await);
            });
        }
        drop(done);
        for _ in 0..FANOUT_W {
            answers.recv().await.expect("every write answers").expect("fan-out write");
        }
        // The permit goes with the last write still running.
        tokio::spawn(async move {
            while answers.recv().await.is_some() {}
            drop(permit);
        });
    }
}

/// Starts `setup` on fresh directories and returns it with its client.
async fn start(setup: Setup, quiverd: &Path) -> Result<(Servers, Conn), String> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
    let nodes = match setup {
        Setup::Single => {
            let spec = NodeSpec::new(quiverd, &dir.path().join("n1"));
            vec![NodeProcess::start(&spec).map_err(|e| format!("start quiverd: {e}"))?]
        }
        Setup::Cluster => start_cluster(dir.path(), quiverd)?,
        Setup::Fanout => {
            let mut nodes = Vec::new();
            let mut clients = Vec::new();
            for n in 1..=3 {
                let spec = NodeSpec::new(quiverd, &dir.path().join(format!("n{n}")));
                let node = NodeProcess::start(&spec).map_err(|e| format!("start quiverd: {e}"))?;
                clients.push(Arc::new(Client::connect([node.addr.clone()]).await.map_err(|e| e.to_string())?));
                nodes.push(node);
            }
            // A write holds a permit until its third node answered: each
            // task can have a write behind it, not a growing queue.
            let behind = Arc::new(tokio::sync::Semaphore::new(2 * Workload::Set64.in_flight() as usize));
            let fanout = Fanout { nodes: clients, behind };
            return Ok((Servers { nodes, _etcd: None, _dir: dir }, Conn::Fanout(fanout)));
        }
        Setup::Etcd => {
            let etcd = EtcdCluster::start(dir.path(), ETCD_BASE_PORT, 1000)?;
            let clients = etcd.ready().await?;
            return Ok((Servers { nodes: Vec::new(), _etcd: Some(etcd), _dir: dir }, Conn::Etcd(clients)));
        }
    };
    if setup == Setup::Cluster {
        // A node knows the ring once it has every member's id from the
        // heartbeats; until then it answers `Unavailable`.
        let started = Instant::now();
        for node in &nodes {
            let client = Client::connect([node.addr.clone()]).await.map_err(|e| e.to_string())?.direct();
            while client.status().await.map_err(|e| e.to_string())?.ring.len() < nodes.len() {
                if started.elapsed() > READY_WITHIN {
                    return Err("the cluster did not form".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let client = Client::connect([nodes[0].addr.clone()]).await.map_err(|e| e.to_string())?;
    Ok((Servers { nodes, _etcd: None, _dir: dir }, Conn::Quiver(Box::new(client))))
}

/// Three nodes with their certificates, each listing the others.
fn start_cluster(dir: &Path, quiverd: &Path) -> Result<Vec<NodeProcess>, String> {
    let specs = cluster_specs(quiverd, dir, 3).map_err(|e| e.to_string())?;
    specs.iter().map(|spec| NodeProcess::start(spec).map_err(|e| format!("start {}: {e}", spec.client_addr))).collect()
}

/// One run of `workload` for `seconds`, `run` keeping its keys apart.
async fn measure(conn: &Arc<Conn>, workload: Workload, seconds: u64, run: u64, value: &Arc<Vec<u8>>) -> Figure {
    let (conn, value) = (conn.clone(), value.clone());
    drive(workload.in_flight(), seconds, move |task, i| {
        let (conn, value) = (conn.clone(), value.clone());
        async move {
            let value = value.as_slice();
            match (workload, &*conn) {
                (Workload::Set64, Conn::Quiver(client)) => {
                    client.set(format!("set-{run}-{task}-{i}"), value).await.expect("set");
                    1
                }
                (Workload::Set64, Conn::Fanout(fanout)) => {
                    let (key, value) = (format!("set-{run}-{task}-{i}"), value.to_vec());
                    fanout
                        .write(|node| {
                            let (key, value) = (key.clone(), value.clone());
                            async move { node.set(key, value).await }
                        })
                        .await;
                    1
                }
                (Workload::Set64, Conn::Etcd(members)) => {
                    let member = &members[task as usize % members.len()];
                    member.put(format!("set-{run}-{task}-{i}").as_bytes(), value).await.expect("etcd put");
                    1
                }
                (Workload::Bulk, conn) => {
                    let batch = Keys::new(&format!("bulk-{run}-{task}-{i}-"), 0..1000, 0);
                    match conn {
                        Conn::Quiver(client) => {
                            client.bulk_set(batch.iter().map(|key| (key, value))).await.expect("bulk_set")
                        }
                        Conn::Fanout(fanout) => {
                            let entries: Arc<Vec<(String, Vec<u8>)>> =
                                Arc::new(batch.iter().map(|key| (key.to_owned(), value.to_vec())).collect());
                            fanout
                                .write(|node| {
                                    let entries = entries.clone();
                                    async move { node.bulk_set(entries.iter().map(|(k, v)| (k, v))).await }
                                })
                                .await;
                        }
                        Conn::Etcd(members) => {
                            let member = &members[task as usize % members.len()];
                            let entries = batch.iter().map(|key| (key.as_bytes(), value));
                            member.txn_puts(entries).await.expect("etcd txn");
                        }
                    }
                    batch.len()
                }
            }
        }
    })
    .await
}

/// A setup's figures for a workload, and the CPU time of every process
/// (its nodes and the client) per acknowledged key, in µs (`None` for
/// etcd, whose members' CPU is not read).
type Row = (Setup, Workload, Figure, Option<f64>);

/// CPU time (user and system) `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name, which may hold spaces, in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the file; USER_HZ is 100.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn report(rows: &[Row], runs: u64, seconds: u64, value_bytes: usize) -> std::io::Result<()> {
    let out = workspace().join("target/quiver-bench");
    std::fs::create_dir_all(&out)?;
    let find = |setup: Setup, w: Workload| rows.iter().find(|r| r.0 == setup && r.1 == w).map(|r| r.2);
    let cpu = |setup: Setup, w: Workload| rows.iter().find(|r| r.0 == setup && r.1 == w).and_then(|r| r.3);
    println!(
        "\nDurable writes, {value_bytes}-byte values, one smart client (runtime of 1 thread); median of {runs} runs \
         of {seconds}s; every process on this machine's {} cores.\n",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "| workload | 1 node keys/s | p50 / p99 ms | 3 nodes keys/s | p50 / p99 ms | client fan-out keys/s | p50 / \
         p99 ms | etcd, 3 members keys/s | p50 / p99 ms | 3 nodes / 1 node | Quiver 3 nodes / etcd | fan-out / etcd |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut csv = String::from("setup,workload,keys_per_s,p50_ms,p99_ms,cpu_us_per_key\n");
    for (setup, workload, f, cpu) in rows {
        let cpu = cpu.map_or_else(String::new, |cpu| format!("{cpu:.2}"));
        csv += &format!(
            "{},{},{:.0},{:.3},{:.3},{cpu}\n",
            setup.short(),
            workload.short(),
            f.keys_per_s,
            f.p50_ms,
            f.p99_ms
        );
    }
    let cell = |f: Option<Figure>| {
        f.map_or(("-".into(), "-".into()), |f| {
            (format!("{:.0}", f.keys_per_s), format!("{:.2} / {:.2}", f.p50_ms, f.p99_ms))
        })
    };
    let ratio = |a: Option<Figure>, b: Option<Figure>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a.keys_per_s / b.keys_per_s),
        _ => "-".into(),
    };
    for w in Workload::ALL {
        let [single, cluster, fanout, etcd] = Setup::ALL.map(|setup| find(setup, w));
        let ((s_rate, s_lat), (c_rate, c_lat)) = (cell(single), cell(cluster));
        let ((f_rate, f_lat), (e_rate, e_lat)) = (cell(fanout), cell(etcd));
        println!(
            "| {} | {s_rate} | {s_lat} | {c_rate} | {c_lat} | {f_rate} | {f_lat} | {e_rate} | {e_lat} | {} | {} | {} |",
            w.name(),
            ratio(cluster, single),
            ratio(cluster, etcd),
            ratio(fanout, etcd)
        );
    }
    println!(
        "\nThe cluster against its ceiling, the client fan-out (goal: at least 0.9x its writes/s, at most 1.15x its \
         CPU per write); CPU is every process's user and system time (nodes and client, from /proc) per \
         acknowledged key.\n"
    );
    println!("| workload | 3 nodes / fan-out | CPU µs/key, 3 nodes | CPU µs/key, fan-out | CPU 3 nodes / fan-out |");
    println!("|---|---:|---:|---:|---:|");
    for w in Workload::ALL {
        let (c, f) = (cpu(Setup::Cluster, w), cpu(Setup::Fanout, w));
        let us = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.1}"));
        let cpu_ratio = match (c, f) {
            (Some(c), Some(f)) if f > 0.0 => format!("{:.2}x", c / f),
            _ => "-".into(),
        };
        let rate = ratio(find(Setup::Cluster, w), find(Setup::Fanout, w));
        println!("| {} | {rate} | {} | {} | {cpu_ratio} |", w.name(), us(c), us(f));
    }
    std::fs::write(out.join("cluster_throughput.csv"), csv)?;
    plot(rows, &out.join("cluster_throughput.svg")).map_err(std::io::Error::other)?;
    println!("\nCSV and plot: {}", out.display());
    Ok(())
}

/// Keys/s of each workload (log scale), one line per setup.
fn plot(rows: &[Row], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max_y = rows.iter().map(|r| r.2.keys_per_s).fold(1.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption("Durable write throughput: one node, a three-node cluster, its ceiling, etcd", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..1.5, (1000f64..max_y).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(2)
        .x_label_formatter(&|x| {
            Workload::ALL.get(x.round().max(0.0) as usize).map_or_else(String::new, |w| w.name().to_owned())
        })
        .y_desc("acknowledged keys/s (log)")
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(|e| e.to_string())?;
    for (setup, color) in [(Setup::Single, BLUE), (Setup::Cluster, RED), (Setup::Fanout, MAGENTA), (Setup::Etcd, GREEN)]
    {
        let points: Vec<(f64, f64)> = Workload::ALL
            .iter()
            .enumerate()
            .filter_map(|(x, w)| rows.iter().find(|r| r.0 == setup && r.1 == *w).map(|r| (x as f64, r.2.keys_per_s)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(setup.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    runtime.expect("the client runtime").block_on(bench());
}

/// The rows of a CSV that [`report`] wrote.
fn read_csv(path: &Path) -> Result<Vec<Row>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let (&[setup, workload, keys_per_s, p50_ms, p99_ms], cpu) = (&fields[..fields.len().min(5)], fields.get(5))
        else {
            return Err(format!("bad CSV line {line:?}"));
        };
        let cpu = cpu.and_then(|cpu| cpu.parse::<f64>().ok());
        let setup = Setup::ALL.into_iter().find(|s| s.short() == setup).ok_or(format!("unknown setup {setup:?}"))?;
        let workload = Workload::ALL
            .into_iter()
            .find(|w| w.short() == workload)
            .ok_or(format!("unknown workload {workload:?}"))?;
        let figure = Figure::from_csv(keys_per_s, p50_ms, p99_ms)?;
        rows.push((setup, workload, figure, cpu));
    }
    Ok(rows)
}

async fn bench() {
    let runs = env_or("QUIVER_BENCH_RUNS", 3).max(1);
    let seconds = env_or("QUIVER_BENCH_SECONDS", 5).max(1);
    let value_bytes = env_or("QUIVER_BENCH_VALUE_BYTES", 100) as usize;
    if env_or("QUIVER_BENCH_PLOT_ONLY", 0) != 0 {
        let rows = read_csv(&workspace().join("target/quiver-bench/cluster_throughput.csv")).expect("read the CSV");
        return report(&rows, runs, seconds, value_bytes).expect("write the report");
    }
    let value = Arc::new(vec![b'v'; value_bytes]);
    let quiverd: PathBuf = std::env::var("QUIVER_BENCH_QUIVERD").map(PathBuf::from).unwrap_or_else(|_| build_quiverd());
    let wanted = std::env::var("QUIVER_BENCH_SETUPS").unwrap_or_default();
    let included = |setup: &Setup| {
        let asked = wanted.is_empty() || wanted.split(',').any(|s| s.trim() == setup.short());
        asked && (*setup != Setup::Etcd || env_or("QUIVER_BENCH_ETCD", 1) != 0)
    };
    let with_etcd = included(&Setup::Etcd);
    if with_etcd {
        run_setup_script("benches/setup-etcd.sh").expect("etcd");
    }
    let mut rows = Vec::new();
    for setup in Setup::ALL.into_iter().filter(included) {
        for workload in Workload::ALL {
            let (servers, conn) = match start(setup, &quiverd).await {
                Ok(started) => started,
                Err(e) => panic!("{}: {e}", setup.name()),
            };
            let conn = Arc::new(conn);
            let pids: Vec<u32> = servers.nodes.iter().map(NodeProcess::pid).chain([std::process::id()]).collect();
            let mut figures = Vec::new();
            let mut cpu_per_key = Vec::new();
            for run in 0..runs {
                let cpu_before: f64 = pids.iter().map(|&pid| cpu_seconds(pid)).sum();
                let started = Instant::now();
                let figure = measure(&conn, workload, seconds, run, &value).await;
                let cpu: f64 = pids.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>() - cpu_before;
                let keys = figure.keys_per_s * started.elapsed().as_secs_f64();
                cpu_per_key.push(cpu * 1e6 / keys.max(1.0));
                figures.push(figure);
            }
            cpu_per_key.sort_by(f64::total_cmp);
            let cpu = (setup != Setup::Etcd).then(|| cpu_per_key[cpu_per_key.len() / 2]);
            let text: Vec<String> = figures.iter().map(|f| format!("{:.0}", f.keys_per_s)).collect();
            let retries = conn.retries();
            eprintln!("{:>16} | {:<32} | runs: {} | retries: {retries}", setup.name(), workload.name(), text.join(" "));
            rows.push((setup, workload, median(figures), cpu));
            drop(conn);
            drop(servers);
        }
    }
    report(&rows, runs, seconds, value_bytes).expect("write the report");
}
