//! What the benchmarks share: settings from the environment, the release
//! `quiverd`, keys made without an allocation each, and how a run's
//! latencies become one figure.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub mod etcd;

/// The number in environment variable `name`, else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The workspace's root folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("benches/ is in the workspace").to_path_buf()
}

/// Runs a setup script of the workspace (`benches/setup-*.sh`, which
/// installs a peer from Debian's packages if it is missing).
pub fn run_setup_script(script: &str) -> Result<(), String> {
    let path = workspace().join(script);
    let ok = Command::new("bash").arg(&path).status().map_err(|e| e.to_string())?.success();
    if !ok {
        return Err(format!("{} failed", path.display()));
    }
    Ok(())
}

/// Builds the release `quiverd` and returns its path.
pub fn build_quiverd() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "--release", "-p", "quiver-node", "--bin", "quiverd"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the release quiverd failed");
    workspace().join("target/release/quiverd")
}

/// The keys of one bulk set, `{prefix}{n}` for a range of numbers, written
/// into one buffer: the harness's own work per key stays small next to the
/// systems it measures (it shares their two cores).
#[derive(Debug, Default)]
pub struct Keys {
    text: String,
    ends: Vec<usize>,
}

impl Keys {
    /// `{prefix}{n}` for each `n`, its decimal digits zero-padded to at
    /// least `width` (what `format!("{prefix}{n:0width$}")` gives, without
    /// an allocation per key).
    pub fn new(prefix: &str, numbers: std::ops::Range<u64>, width: usize) -> Keys {
        let mut keys = Keys {
            text: String::with_capacity((prefix.len() + 20) * (numbers.end - numbers.start) as usize),
            ends: Vec::new(),
        };
        let mut digits = [0u8; 20];
        for mut n in numbers {
            keys.text.push_str(prefix);
            let mut at = digits.len();
            while n > 0 || at == digits.len() || digits.len() - at < width {
                at -= 1;
                digits[at] = b'0' + (n % 10) as u8;
                n /= 10;
            }
            keys.text.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
            keys.ends.push(keys.text.len());
        }
        keys
    }

    pub fn len(&self) -> u64 {
        self.ends.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| &self.text[start..end])
    }
}

/// One measurement: keys per second and per-request latency percentiles.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figure {
    pub keys_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Figure {
    /// `keys` acknowledged in `elapsed`, with every request's latency.
    pub fn of(keys: u64, elapsed: Duration, mut latencies_us: Vec<u32>) -> Figure {
        latencies_us.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies_us.len() as f64 * q) as usize).min(latencies_us.len().saturating_sub(1));
            latencies_us.get(i).map_or(0.0, |&us| f64::from(us) / 1000.0)
        };
        Figure { keys_per_s: keys as f64 / elapsed.as_secs_f64(), p50_ms: at(0.50), p99_ms: at(0.99) }
    }

    /// The figure of a benchmark CSV line's last three fields (keys/s, p50
    /// and p99 in ms), as the benches write them.
    pub fn from_csv(keys_per_s: &str, p50_ms: &str, p99_ms: &str) -> Result<Figure, String> {
        let number = |s: &str| s.parse::<f64>().map_err(|e| format!("{s:?}: {e}"));
        Ok(Figure { keys_per_s: number(keys_per_s)?, p50_ms: number(p50_ms)?, p99_ms: number(p99_ms)? })
    }
}

/// The run with the median throughput.
pub fn median(mut xs: Vec<Figure>) -> Figure {
    xs.sort_by(|a, b| a.keys_per_s.total_cmp(&b.keys_per_s));
    xs[xs.len() / 2]
}

/// Runs `in_flight` tasks for `seconds`: task `t` calls `op(t, i)` for
/// `i` = 0, 1, ... one after another, each returning the keys it
/// acknowledged. The figure: keys per second over all tasks, and the
/// latency percentiles of every call.
pub async fn drive<F, Fut>(in_flight: u64, seconds: u64, op: F) -> Figure
where
    F: Fn(u64, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = u64> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let op = op.clone();
            tokio::spawn(async move {
                let (mut keys, mut latencies_us, mut i) = (0u64, Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    keys += op(task, i).await;
                    latencies_us.push(t.elapsed().as_micros() as u32);
                    i += 1;
                }
                (keys, latencies_us)
            })
        })
        .collect();
    let (mut keys, mut latencies) = (0, Vec::new());
    for task in tasks {
        let (k, l) = task.await.expect("bench task");
        keys += k;
        latencies.extend(l);
    }
    Figure::of(keys, started.elapsed(), latencies)
}
