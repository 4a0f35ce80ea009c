//! `quiver-chaos`: see the crate docs and the README.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quiver_chaos::run::{run, Settings, Workload};
use quiver_chaos::workload::{BulkAtomicity, Durability, Isolation};

/// Runs real quiverd processes, SIGKILLs them at random, and checks that
/// nothing acknowledged was lost, no bulk set was half-applied and no two
/// concurrent bulk sets were mixed. Exits 1 on any violation.
#[derive(Debug, Parser)]
#[command(name = "quiver-chaos", version)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
    /// Seed of the schedule of operations and kills.
    #[arg(long, global = true, default_value_t = 1)]
    seed: u64,
    /// How long writers run: `30s`, `10m`, `500ms` or plain seconds.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Milliseconds between kills, as MIN..MAX.
    #[arg(long, global = true, default_value = "300..1500", value_parser = parse_range)]
    kill_interval: (u64, u64),
    /// Do not kill the node.
    #[arg(long, global = true)]
    no_kill: bool,
    /// Keep writing past --duration until this many kills happened (bounded
    /// by five times --duration).
    #[arg(long, global = true, default_value_t = 0)]
    min_kills: u64,
    /// Writer threads, each with its own client.
    #[arg(long, global = true, default_value_t = 4)]
    writers: usize,
    /// Passed to quiverd: drop this fraction of data-file writes.
    #[arg(long, global = true, default_value_t = 0.0, value_name = "P")]
    debug_skip_write_probability: f64,
    /// Write the report as JSON to this file.
    #[arg(long, global = true, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// The quiverd binary [default: next to this one, else on PATH].
    #[arg(long, global = true)]
    quiverd: Option<PathBuf>,
    /// Data directory [default: a new temporary one, removed after a clean run].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// An extra quiverd flag (repeatable), e.g. --node-arg=--memtable-bytes-max=1048576.
    #[arg(long = "node-arg", global = true, allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// No progress lines.
    #[arg(long, global = true)]
    quiet: bool,
    /// Run a cluster of this many nodes (three replicas per key, quorum
    /// reads and writes through the smart client); the killer takes down a
    /// random node each time.
    #[arg(long, global = true, default_value_t = 1)]
    nodes: usize,
    /// In a cluster, kill up to this many nodes at once.
    #[arg(long, global = true, default_value_t = 1)]
    max_down: usize,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Sets and overwrites; every acknowledged write must survive.
    Durability,
    /// Bulk sets of 10-1000 keys; each entirely present or entirely absent.
    BulkAtomicity,
    /// Concurrent bulk sets over one key set; they must never mix.
    Isolation {
        /// Keys in the shared set.
        #[arg(long, default_value_t = 64)]
        keys: u64,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((text, ""), |i| text.split_at(i));
    let n: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30s, 10m or 500ms"))?;
    let seconds = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (low, high) = text.split_once("..").ok_or_else(|| format!("{text:?} is not MIN..MAX"))?;
    let low: u64 = low.trim().parse().map_err(|_| format!("{low:?} is not a number"))?;
    let high: u64 = high.trim().parse().map_err(|_| format!("{high:?} is not a number"))?;
    if low > high || high == 0 {
        return Err(format!("{text:?}: MIN must not exceed MAX, and MAX must be positive"));
    }
    Ok((low, high))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(quiverd) = args.quiverd.clone().or_else(quiver_chaos::node::find_quiverd) else {
        eprintln!("quiver-chaos: quiverd not found next to this binary or on PATH; build it or pass --quiverd");
        return ExitCode::from(2);
    };
    let temp = args
        .data_dir
        .is_none()
        .then(|| std::env::temp_dir().join(format!("quiver-chaos-{}-{}", std::process::id(), args.seed)));
    let data_dir = args.data_dir.clone().or_else(|| temp.clone()).unwrap_or_default();
    if let Err(e) = std::fs::create_dir_all(&data_dir) {
        eprintln!("quiver-chaos: creating {}: {e}", data_dir.display());
        return ExitCode::from(2);
    }
    let settings = Settings {
        seed: args.seed,
        duration: args.duration,
        kill_interval_ms: args.kill_interval,
        kills: !args.no_kill,
        min_kills: args.min_kills,
        writers: args.writers.max(1),
        debug_skip_write_probability: args.debug_skip_write_probability,
        node_args: args.node_args.clone(),
        nodes: args.nodes.max(1),
        max_down: args.max_down.max(1),
        quiverd,
        data_dir: data_dir.clone(),
        progress: !args.quiet,
    };
    let (name, workload): (&str, Arc<dyn Workload>) = match args.mode {
        Mode::Durability => ("durability", Arc::new(Durability::default())),
        Mode::BulkAtomicity => ("bulk-atomicity", Arc::new(BulkAtomicity::default())),
        Mode::Isolation { keys } => ("isolation", Arc::new(Isolation::new(keys.max(2)))),
    };
    let report = match run(name, settings, workload) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("quiver-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("quiver-chaos: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.ok {
        if let Some(dir) = temp {
            let _ = std::fs::remove_dir_all(dir);
        }
        ExitCode::SUCCESS
    } else {
        println!("data kept in {}", data_dir.display());
        ExitCode::from(1)
    }
}
