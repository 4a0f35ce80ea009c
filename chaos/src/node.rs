//! Starting, killing and restarting real `quiverd` processes.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How to start one node; reused for every restart.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub quiverd: PathBuf,
    pub data_dir: PathBuf,
    /// `127.0.0.1:0` picks a free port at each start.
    pub client_addr: String,
    /// The node-to-node (QUIC) address; `127.0.0.1:0` by default.
    pub peer_addr: String,
    pub args: Vec<String>,
    /// Environment variables set for the node.
    pub env: Vec<(String, String)>,
    /// Copy the node's log lines to this process's stderr.
    pub echo_log: bool,
}

impl NodeSpec {
    /// A node on `data_dir` with a free port and no extra flags.
    pub fn new(quiverd: impl Into<PathBuf>, data_dir: &Path) -> NodeSpec {
        NodeSpec {
            quiverd: quiverd.into(),
            data_dir: data_dir.to_path_buf(),
            client_addr: "127.0.0.1:0".into(),
            peer_addr: "127.0.0.1:0".into(),
            args: Vec::new(),
            env: Vec::new(),
            echo_log: std::env::var_os("QUIVER_TEST_NODE_LOG").is_some(),
        }
    }

    /// The free-space reserve these nodes keep, unless their flags say:
    /// 1 GiB rather than the default 5 % of the disk, so that tests and
    /// chaos runs on a shared machine's disk do not meet `DiskFull` only
    /// because the disk is large and its other users fill it.
    fn reserve(&self) -> Vec<String> {
        match self.args.iter().any(|a| a.starts_with("--disk-reserve-bytes")) {
            true => Vec::new(),
            false => vec![format!("--disk-reserve-bytes={}", 1u64 << 30)],
        }
    }

    /// Adds flags.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> NodeSpec {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// How to start each node of a cluster of `count` nodes named `n1`, `n2`,
/// ... under `dir`: the cluster CA and each node's certificate in
/// `dir/certs`, data in `dir/nI`, a free client and peer port each on
/// 127.0.0.1 (kept across restarts), every node listing the others.
pub fn cluster_specs(quiverd: &Path, dir: &Path, count: usize) -> io::Result<Vec<NodeSpec>> {
    use quiver_node::net::tls::{init_ca, issue_node};
    let ca = dir.join("ca");
    init_ca(&ca).map_err(io::Error::other)?;
    let names: Vec<String> = (1..=count).map(|i| format!("n{i}")).collect();
    let peer_ports = names.iter().map(|_| free_port()).collect::<io::Result<Vec<u16>>>()?;
    let mut specs = Vec::new();
    for (name, peer_port) in names.iter().zip(&peer_ports) {
        let certs = dir.join("tls").join(name);
        issue_node(&ca, &certs, name, &[std::net::Ipv4Addr::LOCALHOST.into()]).map_err(io::Error::other)?;
        let mut spec = NodeSpec::new(quiverd, &dir.join(name)).args([
            "--name".to_owned(),
            name.clone(),
            "--tls-dir".to_owned(),
            certs.display().to_string(),
        ]);
        for (peer, port) in names.iter().zip(&peer_ports).filter(|(peer, _)| *peer != name) {
            spec.args.push(format!("--peer={peer}=127.0.0.1:{port}"));
        }
        spec.client_addr = format!("127.0.0.1:{}", free_port()?);
        spec.peer_addr = format!("127.0.0.1:{peer_port}");
        specs.push(spec);
    }
    Ok(specs)
}

/// A running `quiverd`. Dropping it kills the process.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// The address it listens on for clients.
    pub addr: String,
}

impl NodeProcess {
    /// Starts the node and waits (up to 60 s) for its `quiverd ready` line.
    pub fn start(spec: &NodeSpec) -> io::Result<NodeProcess> {
        let mut child = Command::new(&spec.quiverd)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--client-addr", &spec.client_addr, "--peer-addr", &spec.peer_addr])
            .args(spec.reserve())
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", spec.quiverd.display())))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (ready, addr) = mpsc::channel();
        let echo = spec.echo_log;
        // Drain the log for the node's whole life so it never blocks on it.
        std::thread::spawn(move || {
            let mut ready = Some(ready);
            let mut last_lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[quiverd] {line}");
                }
                if let Some(ready) = ready.as_ref() {
                    if let Some(addr) = line.contains("quiverd ready").then(|| field(&line, "clients=")).flatten() {
                        let _ = ready.send(Ok(addr));
                        continue;
                    }
                    last_lines.push(line);
                }
            }
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(last_lines.join("\n")));
            }
        });
        match addr.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(addr)) => Ok(NodeProcess { child, addr }),
            Ok(Err(log)) => {
                let status = child.wait()?;
                Err(io::Error::other(format!("quiverd exited ({status}) before it was ready:\n{log}")))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::new(io::ErrorKind::TimedOut, "quiverd was not ready within 60 s"))
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (at most two minutes) for a graceful exit.
    pub fn terminate(&mut self) -> io::Result<ExitStatus> {
        self.terminate_within(Duration::from_secs(120))?
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "quiverd did not exit within 2 minutes of SIGTERM"))
    }

    /// SIGTERM, then wait at most `limit` for the exit: `None` if the process
    /// is still running then (it is then killed), so a test fails instead of
    /// hanging.
    pub fn terminate_within(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        if !status.success() {
            return Err(io::Error::other("kill -TERM failed"));
        }
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Ok(None)
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(name)? + name.len();
    Some(line[start..].split_whitespace().next()?.to_owned())
}

/// Ports [`free_port`] hands out: below the kernel's ephemeral range
/// (32768 and up on Linux), so that no client socket is given one between
/// the check and the node's bind.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free right now for TCP and UDP (the node binds it a
/// moment later), and never handed out twice by this process: a
/// process-wide counter walks [`PORTS`] from an offset of the process id,
/// so tests running at once never pick the same one.
pub fn free_port() -> io::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end - PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(97) % span,
        std::sync::atomic::Ordering::Relaxed,
        std::sync::atomic::Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
        let port = PORTS.start + offset as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, format!("no free loopback port in {PORTS:?}")))
}

/// Finds `quiverd`: next to the running executable (also one folder up, for
/// test binaries in `target/*/deps/`), else on `PATH`.
pub fn find_quiverd() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    for candidate in [dir.join("quiverd"), dir.parent()?.join("quiverd")] {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|p| Path::new(p).join("quiverd")).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent callers never get the same port, and none from the range
    /// the kernel gives client sockets.
    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..50).map(|_| free_port().unwrap()).collect::<Vec<u16>>()))
            .collect();
        let mut ports: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert!(ports.iter().all(|p| PORTS.contains(p)), "{ports:?}");
        ports.sort_unstable();
        let all = ports.len();
        ports.dedup();
        assert_eq!(ports.len(), all, "a port was handed out twice");
    }
}
