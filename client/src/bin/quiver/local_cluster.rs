//! `quiver local-cluster`: a cluster of `quiverd` processes on this
//! machine, on 127.0.0.1, for trying Quiver out and for local tests.
//!
//! The first run in a directory makes the cluster CA (`ca/`) and each
//! node's certificate in a directory of its own (`tls/nN/`, without the
//! CA's key), picks free ports, and writes each node's
//! settings (`nN.toml`, which `quiverd --config` reads) and the list of
//! nodes (`cluster.txt`); later runs start the same nodes on the same ports
//! with their data (`nN/`). Each node logs to `nN.log`. Once every node
//! sees the whole ring, it prints one line per node and `ready`; Ctrl-C or
//! SIGTERM stops them all gracefully. A node that exits is started again
//! (a `node NAME restarted pid=PID ...` line); one that keeps exiting right
//! after it starts makes `local-cluster` stop the others and exit with an
//! error naming it and its log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use quiver_client::Client;

/// The list of nodes in a cluster directory.
const MANIFEST: &str = "cluster.txt";

/// How long the nodes may take to find each other.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// A node that exits within this time of its start died at start.
const START_GRACE: Duration = Duration::from_secs(10);

/// A node that dies at start this many times in a row is given up on.
const START_FAILURES_MAX: u32 = 3;

/// Whether a node that exited is started again: a rule without I/O.
#[derive(Debug)]
struct Keeper {
    started: Instant,
    /// Exits in a row that came within [`START_GRACE`] of a start.
    failed_starts: u32,
}

impl Keeper {
    fn new(started: Instant) -> Keeper {
        Keeper { started, failed_starts: 0 }
    }

    /// The node exited at `now`: `true` to start it again (then
    /// [`Keeper::restarted`]), `false` once it keeps dying at start.
    fn exited(&mut self, now: Instant) -> bool {
        match now.saturating_duration_since(self.started) < START_GRACE {
            true => self.failed_starts += 1,
            false => self.failed_starts = 0,
        }
        self.failed_starts < START_FAILURES_MAX
    }

    fn restarted(&mut self, now: Instant) {
        self.started = now;
    }
}

/// One node of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalNode {
    name: String,
    client_addr: String,
    peer_addr: String,
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Reads the nodes of the cluster in `dir`, if one was made there.
fn read_manifest(dir: &Path) -> anyhow::Result<Option<Vec<LocalNode>>> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let nodes = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [name, client, peer] => {
                Ok(LocalNode { name: (*name).into(), client_addr: (*client).into(), peer_addr: (*peer).into() })
            }
            _ => Err(anyhow!("{}: cannot read the line {line:?}", path.display())),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(nodes))
}

/// Makes a new cluster of `count` nodes in `dir`: certificates, ports,
/// settings and the manifest.
fn create(dir: &Path, count: usize) -> anyhow::Result<Vec<LocalNode>> {
    use quiver_certs as tls;
    let ca = dir.join("ca");
    tls::init_ca(&ca)?;
    let ports = pick_ports(count)?;
    let nodes: Vec<LocalNode> = (0..count)
        .map(|i| LocalNode {
            name: format!("n{}", i + 1),
            client_addr: format!("127.0.0.1:{}", ports.get(2 * i).copied().unwrap_or(0)),
            peer_addr: format!("127.0.0.1:{}", ports.get(2 * i + 1).copied().unwrap_or(0)),
        })
        .collect();
    let loopback = ["127.0.0.1".parse()?];
    for node in &nodes {
        let certs = dir.join("tls").join(&node.name);
        tls::issue_node(&ca, &certs, &node.name, &loopback)?;
        let peers: Vec<String> = nodes
            .iter()
            .filter(|other| other.name != node.name)
            .map(|other| toml_string(&format!("{}={}", other.name, other.peer_addr)))
            .collect();
        let settings = format!(
            "# Written by `quiver local-cluster`.\ndata_dir = {}\nclient_addr = {}\npeer_addr = {}\nname = {}\n\
             tls_dir = {}\npeers = [{}]\n",
            toml_string(&dir.join(&node.name).display().to_string()),
            toml_string(&node.client_addr),
            toml_string(&node.peer_addr),
            toml_string(&node.name),
            toml_string(&certs.display().to_string()),
            peers.join(", "),
        );
        let path = dir.join(format!("{}.toml", node.name));
        std::fs::write(&path, settings).with_context(|| format!("{}", path.display()))?;
    }
    let manifest: String = nodes.iter().map(|n| format!("{} {} {}\n", n.name, n.client_addr, n.peer_addr)).collect();
    let path = dir.join(MANIFEST);
    std::fs::write(&path, manifest).with_context(|| format!("{}", path.display()))?;
    Ok(nodes)
}

/// Each node's client and peer ports: 7700 and 7701 for n1, 7710 and 7711
/// for n2, and so on, when they are all free (so `quiver` reaches n1
/// without `--addr`); else any free ports. Every port is held until all
/// are picked, so none is picked twice.
fn pick_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    use std::net::{TcpListener, UdpSocket};
    // Client ports are TCP, peer ports UDP (QUIC).
    let hold = |i: usize, port: u16| -> std::io::Result<(u16, Box<dyn std::any::Any>)> {
        if i.is_multiple_of(2) {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            Ok((listener.local_addr()?.port(), Box::new(listener)))
        } else {
            let socket = UdpSocket::bind(("127.0.0.1", port))?;
            Ok((socket.local_addr()?.port(), Box::new(socket)))
        }
    };
    let usual = (0..count * 2).map(|i| hold(i, 7700 + 10 * (i / 2) as u16 + (i % 2) as u16));
    if count <= 20 {
        if let Ok(held) = usual.collect::<std::io::Result<Vec<_>>>() {
            return Ok(held.into_iter().map(|(port, _)| port).collect());
        }
    }
    let held = (0..count * 2).map(|i| hold(i, 0)).collect::<std::io::Result<Vec<_>>>();
    Ok(held.context("picking a free port")?.into_iter().map(|(port, _)| port).collect())
}

/// `quiverd`: beside this program, else on `PATH`.
fn find_quiverd() -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("quiverd")));
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|p| p.join("quiverd")).find(|p| p.is_file()));
    beside
        .filter(|p| p.is_file())
        .or(on_path)
        .context("quiverd was not found beside quiver or on PATH: build both with `cargo build --release --bins`")
}

/// Starts node `node` of the cluster in `dir`, its log appended to
/// `dir/NAME.log`.
fn spawn(quiverd: &Path, dir: &Path, node: &LocalNode) -> anyhow::Result<Child> {
    let log_path = dir.join(format!("{}.log", node.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}", log_path.display()))?;
    Command::new(quiverd)
        .arg("--config")
        .arg(dir.join(format!("{}.toml", node.name)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", quiverd.display()))
}

/// Waits until every node answers and sees every member of the ring up.
async fn wait_ready(nodes: &[LocalNode], children: &mut [Child], dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    for (node, child) in nodes.iter().zip(children.iter_mut()) {
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(anyhow!(
                    "{} exited ({status}); see {}",
                    node.name,
                    dir.join(format!("{}.log", node.name)).display()
                ));
            }
            let status = match Client::connect([node.client_addr.clone()]).await {
                Ok(client) => client.direct().status().await.ok(),
                Err(_) => None,
            };
            if status.is_some_and(|s| s.ring.len() == nodes.len() && s.ring.iter().all(|m| m.up)) {
                break;
            }
            if started.elapsed() > READY_WITHIN {
                return Err(anyhow!("{} did not see the whole cluster within {READY_WITHIN:?}", node.name));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Stops every node still running: SIGTERM, then SIGKILL after
/// [`STOP_WITHIN`].
fn stop(nodes: &[LocalNode], children: &mut [Child]) {
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
    }
    let deadline = Instant::now() + STOP_WITHIN;
    for (node, child) in nodes.iter().zip(children.iter_mut()) {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("quiver: {} did not stop within {STOP_WITHIN:?}; killing it", node.name);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A cluster made before nodes refused a directory holding the CA's key
/// shares one `certs/` with it: the CA moves to `ca/`, and each node gets
/// `tls/NAME/` with its own certificate and key, which its settings then
/// name. (A cluster made before clusters had a shared secret gets one.)
fn separate_the_ca(dir: &Path, nodes: &[LocalNode]) -> anyhow::Result<()> {
    use quiver_certs as tls;
    let (shared, ca) = (dir.join("certs"), dir.join("ca"));
    if !shared.join(tls::CA_KEY).exists() {
        return Ok(());
    }
    let at = |path: &Path| path.display().to_string();
    tls::init_cluster_secret(&shared)?;
    std::fs::create_dir_all(&ca).with_context(|| at(&ca))?;
    for file in [tls::CA_CERT, tls::CLUSTER_SECRET] {
        std::fs::copy(shared.join(file), ca.join(file)).with_context(|| at(&ca.join(file)))?;
    }
    for node in nodes {
        let own = dir.join("tls").join(&node.name);
        std::fs::create_dir_all(&own).with_context(|| at(&own))?;
        for file in [
            tls::CA_CERT.to_owned(),
            tls::CLUSTER_SECRET.into(),
            format!("{}.pem", node.name),
            format!("{}.key", node.name),
        ] {
            std::fs::copy(shared.join(&file), own.join(&file)).with_context(|| at(&own.join(&file)))?;
        }
        let path = dir.join(format!("{}.toml", node.name));
        let settings = std::fs::read_to_string(&path).with_context(|| at(&path))?;
        let moved = settings.replace(
            &format!("tls_dir = {}", toml_string(&shared.display().to_string())),
            &format!("tls_dir = {}", toml_string(&own.display().to_string())),
        );
        std::fs::write(&path, moved).with_context(|| at(&path))?;
    }
    std::fs::rename(shared.join(tls::CA_KEY), ca.join(tls::CA_KEY)).with_context(|| at(&ca))?;
    eprintln!("quiver: moved the cluster CA to {} and gave each node its own tls/NAME directory", ca.display());
    Ok(())
}

/// `quiver local-cluster --nodes N --dir DIR`.
pub fn run(count: usize, dir: &Path) -> anyhow::Result<ExitCode> {
    if count == 0 {
        bail!("a cluster needs at least one node");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let dir = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
    let nodes = match read_manifest(&dir)? {
        Some(nodes) if nodes.len() == count => nodes,
        Some(nodes) => {
            return Err(anyhow!(
                "{} holds a cluster of {} nodes: run with --nodes {} or use another --dir",
                dir.display(),
                nodes.len(),
                nodes.len()
            ))
        }
        None => create(&dir, count)?,
    };
    separate_the_ca(&dir, &nodes)?;
    let quiverd = find_quiverd()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let mut children = Vec::new();
    for node in &nodes {
        match spawn(&quiverd, &dir, node) {
            Ok(child) => children.push(child),
            Err(error) => {
                stop(&nodes, &mut children);
                return Err(error);
            }
        }
    }
    if let Err(error) = runtime.block_on(wait_ready(&nodes, &mut children, &dir)) {
        stop(&nodes, &mut children);
        return Err(error);
    }
    let mut out = std::io::stdout().lock();
    for (node, child) in nodes.iter().zip(&children) {
        writeln!(out, "node {} client={} peer={} pid={}", node.name, node.client_addr, node.peer_addr, child.id())?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    let ended = runtime.block_on(watch(&quiverd, &dir, &nodes, &mut children));
    stop(&nodes, &mut children);
    match ended {
        Ok(signal) => {
            eprintln!("quiver: {signal}: stopped the cluster");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => Err(error.context("stopped the cluster")),
    }
}

/// Waits for SIGINT or SIGTERM (which it names), starting again any node
/// that exits meanwhile (a line on stdout); `Err` once one keeps dying at
/// start ([`Keeper`]).
async fn watch(
    quiverd: &Path,
    dir: &Path,
    nodes: &[LocalNode],
    children: &mut [Child],
) -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        bail!("cannot wait for signals");
    };
    let mut keepers: Vec<Keeper> = nodes.iter().map(|_| Keeper::new(Instant::now())).collect();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok("SIGTERM"),
            _ = int.recv() => return Ok("SIGINT"),
            _ = every.tick() => {
                for ((node, child), keeper) in nodes.iter().zip(children.iter_mut()).zip(&mut keepers) {
                    let Ok(Some(status)) = child.try_wait() else { continue };
                    let log = dir.join(format!("{}.log", node.name));
                    if !keeper.exited(Instant::now()) {
                        return Err(anyhow!(
                            "node {} exited {START_FAILURES_MAX} times within {START_GRACE:?} of starting (last: \
                             {status}); see {}",
                            node.name,
                            log.display()
                        ));
                    }
                    *child = spawn(quiverd, dir, node)?;
                    keeper.restarted(Instant::now());
                    println!("node {} restarted pid={} (it exited: {status}; see {})", node.name, child.id(), log.display());
                    let _ = std::io::stdout().flush();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_restarted_unless_it_keeps_dying_at_start() {
        let t0 = Instant::now();
        let mut keeper = Keeper::new(t0);
        let later = t0 + START_GRACE * 10;
        assert!(keeper.exited(later), "after a long run: restarted");
        keeper.restarted(later);
        for i in 1..START_FAILURES_MAX {
            assert!(keeper.exited(later + Duration::from_secs(1)), "death {i} at start: restarted");
            keeper.restarted(later);
        }
        assert!(!keeper.exited(later + Duration::from_secs(1)), "the last one: given up");

        let mut keeper = Keeper::new(t0);
        assert!(keeper.exited(t0 + Duration::from_secs(1)));
        keeper.restarted(t0 + Duration::from_secs(1));
        assert!(keeper.exited(t0 + START_GRACE * 2), "a long run in between starts the count again");
        keeper.restarted(t0 + START_GRACE * 2);
        assert!(keeper.exited(t0 + START_GRACE * 2 + Duration::from_secs(1)));
    }
}
