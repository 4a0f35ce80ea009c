//! One chaos run: a node (or a cluster of nodes), writer threads, a killer
//! that SIGKILLs and restarts a node on a seeded schedule, a progress line,
//! and the report.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use quiver_client::blocking::Client;
use quiver_client::Consistency;
use quiver_ring::rand::SplitMix64;
use quiver_ring::ring::{Member, Ring, RingView};
use quiver_ring::NodeId;
use serde::Serialize;

use crate::lock;
use crate::node::{NodeProcess, NodeSpec};
use crate::workload;

/// How long the final check waits for hints to be delivered and bulk sets
/// replayed (the batch log replays a batch after 10 s).
const DRAIN_MAX: Duration = Duration::from_secs(120);

/// Each node's client address and id, their ring, and replicas per key.
type ClusterRing = (Vec<(String, NodeId)>, Ring, usize);

/// Rounds of the replicas' convergence check.
const CONVERGE_ROUNDS: usize = 5;

/// How long the final anti-entropy round on a node may take; how long a
/// node's rounds are tried again while it sees a peer down, and replicas'
/// trees then have to agree.
const REPAIR_MAX: Duration = Duration::from_secs(600);
const TREES_AGREE_MAX: Duration = Duration::from_secs(30);

/// How a run is set up.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub seed: u64,
    pub duration: Duration,
    /// Milliseconds between kills, drawn uniformly from this range.
    pub kill_interval_ms: (u64, u64),
    pub kills: bool,
    /// Writers go on past `duration` until this many kills happened (at most
    /// until five times `duration`), so a short run still has its kills on a
    /// slow machine.
    pub min_kills: u64,
    pub writers: usize,
    pub debug_skip_write_probability: f64,
    /// Extra `quiverd` flags.
    pub node_args: Vec<String>,
    /// Nodes: 1, or a cluster of this many (three replicas per key).
    pub nodes: usize,
    /// In a cluster, how many nodes one kill takes down at once.
    pub max_down: usize,
    #[serde(skip)]
    pub quiverd: PathBuf,
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// Print a progress line every second.
    pub progress: bool,
}

/// What happened to one write, as its writer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// The node said it is durable.
    Acked,
    /// The connection broke or timed out: it may or may not have happened.
    InDoubt,
    /// It certainly did not happen (no node to send it to, or refused).
    Failed,
}

impl Outcome {
    pub fn of<T>(result: &quiver_client::Result<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Acked,
            // `Unconfirmed` (ambiguous): too few replicas confirmed it in
            // time, but some may have it. `Unavailable`: too few were up,
            // nothing was written (checked: such a write must never show).
            Err(e) if e.is_ambiguous() || e.kind() == Some(quiver_client::ErrorKind::StorageFailed) => Outcome::InDoubt,
            Err(_) => Outcome::Failed,
        }
    }
}

/// Counts shared by writers, killer and progress line.
#[derive(Debug, Default)]
pub struct Counters {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub in_doubt: AtomicU64,
    pub kills: AtomicU64,
    pub checkpoints: AtomicU64,
}

impl Counters {
    pub fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Acked => &self.acked,
            Outcome::InDoubt => &self.in_doubt,
            Outcome::Failed => &self.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets the main thread stop writers (and the killer) at a checkpoint.
#[derive(Debug, Default)]
pub struct Pause {
    paused: Mutex<bool>,
    changed: Condvar,
    idle: AtomicUsize,
}

impl Pause {
    /// Called by writers between operations: waits while paused.
    pub fn checkpoint(&self) {
        let mut paused = lock(&self.paused);
        if *paused {
            self.idle.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_all();
            while *paused {
                paused = self.changed.wait(paused).unwrap_or_else(|p| p.into_inner());
            }
            self.idle.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn set(&self, value: bool) {
        *lock(&self.paused) = value;
        self.changed.notify_all();
    }

    fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }

    /// Pauses and waits until `writers` writers are idle (or gone), at most
    /// `limit`. Returns whether they all stopped.
    fn pause_and_wait(&self, writers: usize, done: &AtomicUsize, limit: Duration) -> bool {
        self.set(true);
        let deadline = Instant::now() + limit;
        let mut paused = lock(&self.paused);
        while self.idle.load(Ordering::SeqCst) + done.load(Ordering::SeqCst) < writers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            paused = self
                .changed
                .wait_timeout(paused, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// What writers and checkers share.
#[derive(Debug)]
pub struct Context {
    pub settings: Settings,
    pub counters: Counters,
    pub pause: Pause,
    /// The nodes' fixed client addresses (kept across restarts).
    pub addrs: Vec<String>,
    pub deadline: Instant,
    hard_deadline: Instant,
    nodes: Mutex<Vec<Option<NodeProcess>>>,
    specs: Vec<NodeSpec>,
    /// The node (index) coordinating the latest writer request sent.
    coordinator: AtomicUsize,
    writers_done: AtomicUsize,
    stop: AtomicBool,
}

impl Context {
    /// A writer is about to send a request that the node at `addr`
    /// coordinates.
    pub fn coordinating(&self, addr: Option<String>) {
        if let Some(index) = addr.and_then(|addr| self.addrs.iter().position(|a| *a == addr)) {
            self.coordinator.store(index, Ordering::Relaxed);
        }
    }

    /// A seeded generator for stream `stream` (writer index, killer, ...).
    pub fn rng(&self, stream: u64) -> SplitMix64 {
        let mut base = SplitMix64::new(self.settings.seed);
        SplitMix64::new(base.next_u64() ^ stream.wrapping_mul(0xA076_1D64_78BD_642F))
    }

    /// A blocking client, retrying the connection until the deadline.
    pub fn client(&self) -> Option<Client> {
        loop {
            match Client::connect(self.addrs.clone()) {
                Ok(client) => return Some(client.with_timeout(Duration::from_secs(10))),
                Err(_) if Instant::now() < self.deadline + Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return None,
            }
        }
    }

    /// Whether writers (and the killer) should stop.
    pub fn over(&self) -> bool {
        let now = Instant::now();
        let enough_kills =
            !self.settings.kills || self.counters.kills.load(Ordering::Relaxed) >= self.settings.min_kills;
        self.stop.load(Ordering::Relaxed) || now >= self.deadline && enough_kills || now >= self.hard_deadline
    }

    /// SIGKILLs nodes `which` (those running), then starts them again.
    fn restart(&self, nodes: &mut [Option<NodeProcess>], which: &[usize]) -> Result<(), String> {
        for &index in which {
            if let Some(mut old) = nodes.get_mut(index).and_then(Option::take) {
                old.kill();
            }
        }
        for &index in which {
            let (Some(slot), Some(spec)) = (nodes.get_mut(index), self.specs.get(index)) else { continue };
            let mut last = String::new();
            for _ in 0..5 {
                match NodeProcess::start(spec) {
                    Ok(started) => {
                        *slot = Some(started);
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if slot.is_none() {
                return Err(format!("could not restart quiverd: {last}"));
            }
        }
        if self.specs.len() > 1 {
            self.wait_for_ring()?;
        }
        Ok(())
    }

    /// In a cluster: waits until every node knows the whole ring (a node
    /// that just started answers `Unavailable` until it does).
    fn wait_for_ring(&self) -> Result<(), String> {
        let started = Instant::now();
        for addr in &self.addrs {
            loop {
                let ring = Client::connect([addr.clone()]).and_then(|c| c.direct().status()).map(|s| s.ring);
                if ring.is_ok_and(|ring| ring.len() == self.addrs.len() && ring.iter().all(|m| m.up)) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(format!("the node at {addr} did not see the whole cluster within 60 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// In a cluster: waits until no node holds a hint or a pending bulk set
    /// (each delivered or replayed), so the final check sees what the
    /// cluster converges to.
    fn wait_until_drained(&self) -> Result<(), String> {
        let started = Instant::now();
        for addr in &self.addrs {
            loop {
                let status = Client::connect([addr.clone()]).and_then(|c| c.direct().status());
                let held = status.as_ref().map(|s| (s.ring.iter().map(|m| m.hints).sum::<u64>(), s.batches_pending));
                if held.as_ref().is_ok_and(|&(hints, batches)| hints == 0 && batches == 0) {
                    break;
                }
                if started.elapsed() > DRAIN_MAX {
                    return Err(format!(
                        "the node at {addr} still holds (hints, bulk sets) {held:?} after {DRAIN_MAX:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// In a cluster: reads every key from each of its replicas alone (the
    /// other nodes stopped with SIGSTOP, the read at `one` through that
    /// replica) and compares it with the merge of all of them (a read at
    /// `all`, which also repairs). A key whose replicas differ is read at
    /// `all` again, a few rounds (repairs are sent after the answer); what
    /// still differs is a violation.
    fn converged(&self, keys: &[Vec<u8>]) -> Vec<String> {
        let (members, ring, replicas) = match self.ring() {
            Ok(ring) => ring,
            Err(error) => return vec![error],
        };
        let mut pending: Vec<Vec<u8>> = keys.to_vec();
        for round in 1..=CONVERGE_ROUNDS {
            let merged = workload::read_all(self, &pending);
            let mut diverged = Vec::new();
            let mut again = std::collections::BTreeSet::new();
            for (index, (addr, id)) in members.iter().enumerate() {
                let theirs: Vec<usize> =
                    (0..pending.len()).filter(|&k| ring.preference_list(&pending[k], replicas).contains(id)).collect();
                let own_keys: Vec<Vec<u8>> = theirs.iter().map(|&k| pending[k].clone()).collect();
                let own = self.with_others_stopped(index, || {
                    workload::read_through(std::slice::from_ref(addr), true, Some(Consistency::One), &own_keys)
                });
                let own = match own {
                    Ok(own) => own,
                    Err(error) => return vec![error],
                };
                for (&k, got) in theirs.iter().zip(own) {
                    let all = merged.get(k).and_then(|m| m.as_ref().ok());
                    if got.as_ref().ok() != all {
                        again.insert(k);
                        let key = String::from_utf8_lossy(&pending[k]).into_owned();
                        diverged
                            .push(format!("DIVERGED {key}: the replica at {addr} alone holds {got:?}, all {all:?}"));
                    }
                }
            }
            if again.is_empty() {
                return Vec::new();
            }
            if round == CONVERGE_ROUNDS {
                return diverged;
            }
            pending = again.into_iter().map(|k| pending[k].clone()).collect();
            // Repairs go out after a read's answer: give them a moment.
            std::thread::sleep(Duration::from_millis(500));
        }
        Vec::new()
    }

    /// In a cluster: once every node sees the others up, an anti-entropy
    /// round on every node (`quiver repair`), which must end with every
    /// exchange in sync; then every
    /// replica of each replica set must show the same hash tree (waiting
    /// a little for each node's trees to read back what the round wrote),
    /// and each node's trees must be those of its data (`quiver
    /// check-trees`).
    fn repaired_trees_agree(&self) -> Vec<String> {
        // The convergence check stopped nodes for a while: each sees the
        // others up again first, or its round would skip them.
        if let Err(error) = self.wait_for_ring() {
            return vec![error];
        }
        for addr in &self.addrs {
            // A node may still see a peer down for a heartbeat or two after
            // the pause: its round then skips that peer, and runs again.
            let started = Instant::now();
            loop {
                let report = Client::connect([addr.clone()]).and_then(|c| c.direct().repair(REPAIR_MAX));
                match report {
                    Ok(report) if report.failed.is_empty() => break,
                    Ok(_) if started.elapsed() < TREES_AGREE_MAX => std::thread::sleep(Duration::from_millis(500)),
                    Ok(report) => return vec![format!("the repair on the node at {addr} did not finish: {report:?}")],
                    Err(error) => return vec![format!("the repair on the node at {addr} failed: {error}")],
                }
            }
        }
        let started = Instant::now();
        let differing = loop {
            let mut roots: std::collections::BTreeMap<Vec<u64>, Vec<(String, u64, u64)>> = Default::default();
            for addr in &self.addrs {
                let status = Client::connect([addr.clone()]).and_then(|c| c.direct().status());
                let Some(info) = status.ok().and_then(|s| s.anti_entropy) else {
                    return vec![format!("the node at {addr} shows no anti-entropy in its status")];
                };
                for root in info.roots {
                    roots.entry(root.set).or_default().push((addr.clone(), root.root, root.keys));
                }
            }
            let differing: Vec<String> = roots
                .iter()
                .filter(|(_, on)| on.iter().any(|(_, root, _)| *root != on[0].1))
                .map(|(set, on)| format!("TREES DIFFER for replica set {set:x?}: (node, root, keys) {on:x?}"))
                .collect();
            if differing.is_empty() || started.elapsed() > TREES_AGREE_MAX {
                break differing;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if !differing.is_empty() {
            return differing;
        }
        // And each node's trees are those of its data.
        let mut wrong = Vec::new();
        for addr in &self.addrs {
            match Client::connect([addr.clone()]).and_then(|c| c.direct().check_trees(REPAIR_MAX)) {
                Ok(check) if check.differing.is_empty() => {}
                Ok(check) => wrong.push(format!(
                    "TREES DIFFER from the data on the node at {addr}: {} keys, e.g. {:?}",
                    check.differing.len(),
                    String::from_utf8_lossy(&check.differing[0])
                )),
                Err(error) => wrong.push(format!("checking the trees of the node at {addr} failed: {error}")),
            }
        }
        wrong
    }

    /// Each node's client address and id, the ring they make, and the
    /// replicas per key.
    fn ring(&self) -> Result<ClusterRing, String> {
        let mut members = Vec::new();
        let mut replicas = 1;
        for addr in &self.addrs {
            let status = Client::connect([addr.clone()])
                .and_then(|c| c.direct().status())
                .map_err(|e| format!("status of the node at {addr}: {e}"))?;
            replicas = status.replicas as usize;
            members.push((addr.clone(), NodeId(status.node_id)));
        }
        let member = |&(_, id): &(String, NodeId)| Member {
            id,
            name: String::new(),
            client_addr: String::new(),
            peer_addr: String::new(),
        };
        let ring = Ring::new(RingView { epoch: 1, members: members.iter().map(member).collect() });
        Ok((members, ring, replicas))
    }

    /// Runs `f` while every node but `index` is stopped (SIGSTOP), then
    /// lets them go on (SIGCONT).
    fn with_others_stopped<T>(&self, index: usize, f: impl FnOnce() -> T) -> Result<T, String> {
        let nodes = lock(&self.nodes);
        let others: Vec<String> = nodes
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != index)
            .filter_map(|(_, n)| n.as_ref().map(|n| n.pid().to_string()))
            .collect();
        let signal = |name: &str| match std::process::Command::new("kill").arg(name).args(&others).status() {
            Ok(status) if status.success() => Ok(()),
            other => Err(format!("kill {name} {others:?}: {other:?}")),
        };
        signal("-STOP")?;
        let result = f();
        signal("-CONT")?;
        Ok(result)
    }

    /// SIGKILL and restart `which` now, unless a checkpoint has paused the
    /// run. Decided under the nodes' lock, so a checkpoint that took the
    /// lock after pausing knows the nodes are up and stay up.
    pub fn kill_and_restart(&self, which: &[usize]) -> Result<(), String> {
        let mut nodes = lock(&self.nodes);
        if self.pause.is_paused() {
            return Ok(());
        }
        self.restart(&mut nodes, which)?;
        self.counters.kills.fetch_add(which.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A workload: writer bodies and a checker.
pub trait Workload: Send + Sync {
    /// Runs writer `index` until `ctx.over()`.
    fn writer(&self, ctx: &Context, index: usize);
    /// Checks the node's state against what was recorded; returns violations.
    /// `final_check` is false at checkpoints taken while writers pause.
    fn check(&self, ctx: &Context, final_check: bool) -> Vec<String>;
    /// Workload-specific counts for the report.
    fn counts(&self) -> Vec<(&'static str, u64)>;
    /// Every key it wrote (the final check in a cluster reads each from
    /// each of its replicas alone).
    fn keys(&self) -> Vec<Vec<u8>>;
    /// How often to stop the writers and check, if ever.
    fn checkpoint_every(&self) -> Option<Duration> {
        None
    }
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: String,
    pub settings: Settings,
    pub elapsed_s: f64,
    pub acknowledged: u64,
    pub failed: u64,
    pub in_doubt: u64,
    pub kills: u64,
    pub checkpoints: u64,
    pub extra: Vec<(String, u64)>,
    pub violations: usize,
    /// The first violations found (at most 100; the first of each kind
    /// among them).
    pub violation_samples: Vec<String>,
    pub ok: bool,
}

/// Runs `workload` under `settings` and checks it.
pub fn run(mode: &str, settings: Settings, workload: Arc<dyn Workload>) -> Result<Report, String> {
    let mut specs = if settings.nodes > 1 {
        crate::node::cluster_specs(&settings.quiverd, &settings.data_dir, settings.nodes)
            .map_err(|e| format!("setting up the cluster: {e}"))?
    } else {
        let mut spec = NodeSpec::new(&settings.quiverd, &settings.data_dir);
        spec.client_addr = format!("127.0.0.1:{}", crate::node::free_port().map_err(|e| e.to_string())?);
        vec![spec]
    };
    for spec in &mut specs {
        spec.args.extend(settings.node_args.iter().cloned());
        if settings.debug_skip_write_probability > 0.0 {
            spec.args
                .extend(["--debug-skip-write-probability".into(), settings.debug_skip_write_probability.to_string()]);
        }
    }
    let started = Instant::now();
    let ctx = Arc::new(Context {
        counters: Counters::default(),
        pause: Pause::default(),
        addrs: specs.iter().map(|spec| spec.client_addr.clone()).collect(),
        deadline: started + settings.duration,
        hard_deadline: started + settings.duration * 5,
        nodes: Mutex::new(specs.iter().map(|_| None).collect()),
        specs,
        coordinator: AtomicUsize::new(0),
        writers_done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        settings,
    });
    {
        let mut nodes = lock(&ctx.nodes);
        let all: Vec<usize> = (0..ctx.specs.len()).collect();
        ctx.restart(&mut nodes, &all)?;
    }

    let writers: Vec<_> = (0..ctx.settings.writers)
        .map(|index| {
            let (ctx, workload) = (ctx.clone(), workload.clone());
            std::thread::spawn(move || {
                workload.writer(&ctx, index);
                ctx.writers_done.fetch_add(1, Ordering::SeqCst);
                ctx.pause.changed.notify_all();
            })
        })
        .collect();
    let killer = ctx.settings.kills.then(|| {
        let ctx = ctx.clone();
        std::thread::spawn(move || killer(&ctx))
    });

    let mut violations = Vec::new();
    let mut next_checkpoint = workload.checkpoint_every().map(|every| Instant::now() + every);
    let mut last_progress = Instant::now();
    while ctx.writers_done.load(Ordering::SeqCst) < ctx.settings.writers {
        std::thread::sleep(Duration::from_millis(50));
        if ctx.settings.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(mode, &ctx, started);
        }
        if let Some(at) = next_checkpoint.filter(|at| Instant::now() >= *at && !ctx.over()) {
            next_checkpoint = Some(at + workload.checkpoint_every().unwrap_or_default());
            // The pause also holds the killer, so the node is up while checked.
            let stopped = ctx.pause.pause_and_wait(ctx.settings.writers, &ctx.writers_done, Duration::from_secs(30));
            // Waits out a restart in progress; no new kill starts while paused.
            drop(lock(&ctx.nodes));
            if stopped {
                violations.extend(workload.check(&ctx, false));
                ctx.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            ctx.pause.set(false);
        }
    }
    ctx.stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.join();
    }
    if let Some(killer) = killer {
        killer.join().map_err(|_| "the killer thread panicked".to_owned())??;
        // One last SIGKILL (of every node): everything acknowledged must
        // survive it too.
        ctx.pause.set(false);
        let all: Vec<usize> = (0..ctx.specs.len()).collect();
        ctx.kill_and_restart(&all)?;
    }
    if ctx.specs.len() > 1 {
        if let Err(error) = ctx.wait_until_drained() {
            violations.push(error);
        }
    }
    violations.extend(workload.check(&ctx, true));
    if ctx.specs.len() > 1 {
        violations.extend(ctx.converged(&workload.keys()));
        violations.extend(ctx.repaired_trees_agree());
    }
    let clean_exits = {
        let mut nodes = lock(&ctx.nodes);
        nodes.iter_mut().all(|n| n.as_mut().is_some_and(|n| n.terminate().is_ok_and(|s| s.success())))
    };
    if !clean_exits {
        violations.push("a quiverd did not exit cleanly on SIGTERM".into());
    }
    if ctx.settings.node_args.iter().any(|arg| arg == "--index") {
        for spec in &ctx.specs {
            violations.extend(index_mismatches(spec, &ctx.settings.node_args));
        }
    }

    let c = &ctx.counters;
    let count = violations.len();
    let violations = samples_of(violations, 100);
    Ok(Report {
        mode: mode.to_owned(),
        settings: ctx.settings.clone(),
        elapsed_s: started.elapsed().as_secs_f64(),
        acknowledged: c.acked.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        in_doubt: c.in_doubt.load(Ordering::Relaxed),
        kills: c.kills.load(Ordering::Relaxed),
        checkpoints: c.checkpoints.load(Ordering::Relaxed),
        extra: workload.counts().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        violations: count,
        violation_samples: violations,
        ok: count == 0,
    })
}

/// At most `max` of `violations`, in order: the first of each kind (its
/// first word: `LOST`, `DIVERGED`, `TREES`, ...) always among them.
fn samples_of(violations: Vec<String>, max: usize) -> Vec<String> {
    let kind = |v: &str| v.split_whitespace().next().unwrap_or("").to_owned();
    let mut kinds = std::collections::BTreeSet::new();
    let firsts: Vec<bool> = violations.iter().map(|v| kinds.insert(kind(v))).collect();
    let mut room = max.saturating_sub(kinds.len());
    let keep = violations.into_iter().zip(firsts).filter(|(_, first)| {
        *first || {
            let fits = room > 0;
            room = room.saturating_sub(1);
            fits
        }
    });
    keep.map(|(v, _)| v).take(max).collect()
}

/// Runs `quiverd --check-index` on a stopped node's data: whether the
/// index (postings and vectors) matches every key's current value after all
/// the kills. Each line it prints about a difference is a violation.
fn index_mismatches(spec: &NodeSpec, node_args: &[String]) -> Vec<String> {
    let dir = spec.data_dir.display().to_string();
    let output = std::process::Command::new(&spec.quiverd)
        .args(["--check-index", "--data-dir", &dir])
        .args(node_args.iter().filter(|arg| *arg != "--index"))
        .output();
    match output {
        Ok(output) if output.status.success() => Vec::new(),
        Ok(output) => {
            let printed =
                String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            printed.lines().map(|line| format!("INDEX {dir}: {line}")).collect()
        }
        Err(error) => vec![format!("INDEX {dir}: cannot run quiverd --check-index: {error}")],
    }
}

fn killer(ctx: &Context) -> Result<(), String> {
    let mut rng = ctx.rng(u64::MAX);
    let (low, high) = ctx.settings.kill_interval_ms;
    loop {
        let wake = Instant::now() + Duration::from_millis(rng.between(low, high));
        while Instant::now() < wake && !ctx.over() {
            std::thread::sleep(Duration::from_millis(10).min(wake.saturating_duration_since(Instant::now())));
        }
        if ctx.over() {
            return Ok(());
        }
        // A random node, or up to `max_down` distinct ones at once; half
        // the time the first is the node coordinating a writer's request.
        let nodes = ctx.specs.len() as u64;
        let down = rng.between(1, ctx.settings.max_down.clamp(1, ctx.specs.len()) as u64);
        let mut which: Vec<usize> = Vec::new();
        if nodes > 1 && rng.chance(0.5) {
            which.push(ctx.coordinator.load(Ordering::Relaxed).min(ctx.specs.len() - 1));
        }
        while (which.len() as u64) < down {
            let index = rng.between(0, nodes - 1) as usize;
            if !which.contains(&index) {
                which.push(index);
            }
        }
        ctx.kill_and_restart(&which)?;
    }
}

fn progress(mode: &str, ctx: &Context, started: Instant) {
    let c = &ctx.counters;
    eprintln!(
        "[{mode} {:>4.0}s/{:.0}s] acknowledged {} failed {} in doubt {} kills {}",
        started.elapsed().as_secs_f64(),
        ctx.settings.duration.as_secs_f64(),
        c.acked.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
        c.in_doubt.load(Ordering::Relaxed),
        c.kills.load(Ordering::Relaxed),
    );
}

impl Report {
    /// The summary table.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut rows: Vec<(String, String)> = vec![
            ("acknowledged".into(), self.acknowledged.to_string()),
            ("failed".into(), self.failed.to_string()),
            ("in doubt".into(), self.in_doubt.to_string()),
        ];
        rows.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.to_string())));
        rows.push(("kills".into(), self.kills.to_string()));
        rows.push(("checkpoints".into(), self.checkpoints.to_string()));
        rows.push(("violations".into(), self.violations.to_string()));
        let mut out = format!(
            "quiver-chaos {}  nodes={}  seed={}  duration={:.0}s  writers={}  kill-interval={}  skip-write={}\n",
            self.mode,
            s.nodes,
            s.seed,
            self.elapsed_s,
            s.writers,
            if s.kills { format!("{}..{}ms", s.kill_interval_ms.0, s.kill_interval_ms.1) } else { "none".into() },
            s.debug_skip_write_probability,
        );
        out += "+------------------------+------------+\n";
        for (name, value) in rows {
            out += &format!("| {name:<22} | {value:>10} |\n");
        }
        out += "+------------------------+------------+\n";
        for violation in self.violation_samples.iter().take(20) {
            out += &format!("VIOLATION: {violation}\n");
        }
        out += if self.ok { "result: OK, no violations\n" } else { "result: FAILED\n" };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_keep_the_first_of_each_kind() {
        let mut violations: Vec<String> = (0..300).map(|i| format!("DIVERGED key{i}")).collect();
        violations.push("TREES DIFFER for a set".into());
        violations.push("LOST k".into());
        let samples = samples_of(violations, 100);
        assert_eq!(samples.len(), 100);
        assert_eq!(samples[0], "DIVERGED key0");
        assert_eq!(samples[97], "DIVERGED key97", "the others in order, with room left for the other kinds");
        assert_eq!(&samples[98..], ["TREES DIFFER for a set", "LOST k"]);
        assert_eq!(samples_of(vec!["a".into(), "b".into()], 100), ["a", "b"]);
    }
}
