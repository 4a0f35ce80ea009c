//! Starts real `quiverd` processes for end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `quiverd`.
pub struct NodeProcess {
    child: Child,
    pub addr: String,
    pub dir: PathBuf,
}

impl NodeProcess {
    /// Starts `quiverd` on `dir` with a free client port, waits for its ready
    /// line and returns the address it listens on.
    pub fn start(dir: &Path, extra: &[&str]) -> NodeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quiverd"))
            .args(["--data-dir", dir.to_str().unwrap(), "--client-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start quiverd");
        let stderr = child.stderr.take().unwrap();
        let (ready, addr) = mpsc::channel();
        // Keep draining stderr for the node's whole life.
        std::thread::spawn(move || {
            let mut ready = Some(ready);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.contains("quiverd ready").then(|| parse_field(&line, "clients=")).flatten() {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(addr);
                    }
                }
                if std::env::var_os("QUIVER_TEST_NODE_LOG").is_some() {
                    eprintln!("[quiverd] {line}");
                }
            }
        });
        let addr = match addr.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("quiverd did not become ready: {:?}", child.wait());
            }
        };
        NodeProcess { child, addr, dir: dir.to_path_buf() }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        self.wait()
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn parse_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(name)? + name.len();
    Some(line[start..].split_whitespace().next()?.to_owned())
}
