//! `quiver`: the command-line client.

#[path = "quiver/load.rs"]
mod load;
#[path = "quiver/local_cluster.rs"]
mod local_cluster;
#[path = "quiver/repair.rs"]
mod repair;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use quiver_client::blocking::Client;
use quiver_client::ContextToken;

/// Talks to a Quiver node.
#[derive(Debug, Parser)]
#[command(name = "quiver", version)]
struct Args {
    /// Node address (HOST:PORT); several, comma-separated, are tried in turn.
    #[arg(long, env = "QUIVER_ADDR", default_value = "127.0.0.1:7700", global = true)]
    addr: String,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    /// In a cluster, how many of a key's replicas must answer: one, quorum
    /// or all; any (writes): any node, a hint for a replica that is down
    /// included [default: the node's, quorum].
    #[arg(long, global = true, value_name = "one|quorum|all|any")]
    consistency: Option<quiver_client::Consistency>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stores VALUE under KEY (durable when it prints OK). Without
    /// --context the write is blind: the latest write wins.
    Set {
        key: String,
        value: String,
        /// A causal write: replaces exactly the versions this context (from
        /// `quiver versions KEY`) covers; others stay as siblings.
        #[arg(long, value_name = "TOKEN", conflicts_with = "vector")]
        context: Option<String>,
        /// The value's own vector for similarity search ("0.1,0.2,..."),
        /// instead of its text's embedding (nodes started with --index).
        #[arg(long, value_name = "NUMBERS")]
        vector: Option<String>,
    },
    /// Prints the value of KEY; exits with status 1 if it is absent.
    Get { key: String },
    /// Deletes KEY.
    Delete {
        key: String,
        /// A causal delete: replaces exactly the versions this context
        /// covers with a tombstone.
        #[arg(long, value_name = "TOKEN")]
        context: Option<String>,
    },
    /// Prints every version (sibling) of KEY, oldest first, and the context
    /// to write back with (`quiver set KEY VALUE --context TOKEN`).
    Versions { key: String },
    /// Stores several entries at once, all or nothing (at most the node's
    /// bulk limits: 100,000 entries and 64 MiB by default; for more, use
    /// `quiver load`).
    BulkSet {
        /// Entries as KEY=VALUE.
        entries: Vec<String>,
        /// Read entries from a file (`-` for stdin), one KEY<TAB>VALUE a line.
        #[arg(long, value_name = "FILE")]
        file: Option<String>,
    },
    /// Loads a file of any size (`-` for stdin), one KEY<TAB>VALUE a line,
    /// in batches that are each stored all or nothing.
    Load {
        file: String,
        /// Entries per batch (fewer when the node's byte limit needs it).
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
    },
    /// Full-text search (nodes started with --index): prints the K keys
    /// whose values best match QUERY, best first, with their BM25 scores and
    /// values. QUERY holds words (any of them matches), "quoted phrases"
    /// and prefix* terms.
    Search {
        query: String,
        /// How many hits, 1 to 1000.
        #[arg(short, default_value_t = 10)]
        k: u32,
        /// A value must match every word, phrase and prefix, not just one.
        #[arg(long)]
        all: bool,
        /// In a cluster, score with term statistics over every node's values
        /// (one more round trip) instead of each node's own.
        #[arg(long)]
        global_stats: bool,
        /// The hits as a JSON array of {key, score, value} (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Similar values (nodes started with --index): prints the K values
    /// about the same things as TEXT, nearest first, with their cosine
    /// similarity. With --vector, TEXT is a vector instead: numbers
    /// separated by commas or spaces.
    Similar {
        text: String,
        /// How many hits, 1 to 1000.
        #[arg(short, default_value_t = 10)]
        k: u32,
        /// TEXT is a vector ("0.1,0.2,...").
        #[arg(long)]
        vector: bool,
        /// The hits as a JSON array of {key, score, value} (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Prints the node's id, addresses, keys, bytes on disk, uptime, clock
    /// and, in a cluster, its peers and the ring (each node up or down, its
    /// share of the ring and its keys).
    Status {
        /// The same, as one JSON object (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// In a cluster: the node at --addr compares its hash trees with each
    /// other replica's now and repairs every difference both ways (a bar
    /// shows the exchanges done). It covers the keys that node replicates:
    /// run it on every node to cover every key.
    Repair {
        /// Wait at most this long for the round to end, in seconds.
        #[arg(long, default_value_t = 3600)]
        wait_secs: u64,
    },
    /// In a cluster: the node at --addr compares its hash trees with a
    /// fresh scan of its data (while writes go on) and names the keys whose
    /// leaves differ; exit status 1 if any does.
    CheckTrees {
        /// Wait at most this long, in seconds.
        #[arg(long, default_value_t = 3600)]
        wait_secs: u64,
    },
    /// Merges every table of the node at --addr into one now, dropping
    /// overwritten versions and the tombstones that may go (in a cluster,
    /// those a full anti-entropy exchange covered); waits for it.
    Compact {
        /// Wait at most this long, in seconds.
        #[arg(long, default_value_t = 3600)]
        wait_secs: u64,
    },
    /// Makes the cluster's TLS material: `init-ca` once, then `node` for
    /// each node.
    #[command(subcommand)]
    Certs(Certs),
    /// Runs a cluster of NODES `quiverd` processes on 127.0.0.1 (needs
    /// `quiverd` beside `quiver` or on PATH). The first run in DIR makes
    /// the certificates, ports and settings; later runs start the same
    /// cluster with its data. Prints each node's addresses and pid, then
    /// `ready`; Ctrl-C or SIGTERM stops every node.
    LocalCluster {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, value_name = "DIR", default_value = "quiver-cluster")]
        dir: PathBuf,
    },
    /// Asks the node to shut down gracefully. Needs the node's admin token:
    /// from `--data-dir` (the node's data directory), `--token`, or
    /// `QUIVER_ADMIN_TOKEN`.
    Shutdown {
        /// The node's data directory, to read its ADMIN_TOKEN file from.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The admin token itself.
        #[arg(long, env = "QUIVER_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Certs {
    /// Makes a new cluster CA (ca.pem, and ca.key readable by its owner
    /// only) and the cluster's shared secret (cluster.secret, which every
    /// node needs a copy of) in DIR. Refuses to replace a CA.
    InitCa {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Makes node NAME's certificate (NAME.pem) and key (NAME.key), signed
    /// by the CA in --ca-dir, for its name and each --ip, in the node's own
    /// DIR, with copies of ca.pem and cluster.secret: the node's --tls-dir.
    /// DIR never gets the CA's key (a node refuses a directory that has it).
    Node {
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "IP")]
        ip: Vec<std::net::IpAddr>,
        /// Where the CA is (`init-ca --dir`).
        #[arg(long, value_name = "CA_DIR")]
        ca_dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Makes the cluster's shared secret (cluster.secret) in DIR, if it
    /// has none: `init-ca` makes it too. It seals the context tokens of
    /// `versions`; every node needs the same one.
    Secret {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("quiver: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Splits `line` (number `n`, counting from 1) of `file` at its first tab.
pub(crate) fn split_entry(file: &str, n: u64, line: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = line.split_once('\t').with_context(|| format!("{file}, line {n}: expected KEY<TAB>VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// `FILE`, or stdin for `-`, as lines.
pub(crate) fn open_input(file: &str) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).with_context(|| file.to_owned())?))
    })
}

fn parse_entries(args: &[String], file: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
    let mut entries = Vec::new();
    for arg in args {
        let (key, value) = arg.split_once('=').with_context(|| format!("{arg:?} is not KEY=VALUE"))?;
        entries.push((key.to_owned(), value.to_owned()));
    }
    if let Some(file) = file {
        for (n, line) in open_input(file)?.lines().enumerate() {
            let line = line.with_context(|| file.to_owned())?;
            if !line.is_empty() {
                entries.push(split_entry(file, n as u64 + 1, &line)?);
            }
        }
    }
    if entries.is_empty() {
        bail!("bulk-set needs at least one entry (KEY=VALUE or --file)");
    }
    Ok(entries)
}

/// A vector given as numbers separated by commas or spaces.
fn parse_vector(text: &str) -> anyhow::Result<Vec<f32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<f32>().map_err(|_| anyhow!("{part:?} in the vector is not a number")))
        .collect()
}

/// Prints search hits: numbered, with score, key and value; or as JSON.
fn print_hits(out: &mut impl Write, hits: &[quiver_client::SearchHit], json: bool) -> anyhow::Result<()> {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if json {
        let hits: Vec<serde_json::Value> = hits
            .iter()
            .map(|hit| serde_json::json!({ "key": text(&hit.key), "score": hit.score, "value": text(&hit.value) }))
            .collect();
        let printed = serde_json::to_string_pretty(&hits)?;
        return Ok(writeln!(out, "{printed}")?);
    }
    if hits.is_empty() {
        return Ok(writeln!(out, "no match")?);
    }
    for (n, hit) in hits.iter().enumerate() {
        writeln!(out, "{:>3}. {}  (score {:.4})\n     {}", n + 1, text(&hit.key), hit.score, text(&hit.value))?;
    }
    Ok(())
}

/// The admin token from `--token` (or its variable), else from the node's
/// data directory.
fn admin_token(data_dir: Option<PathBuf>, token: Option<String>) -> anyhow::Result<String> {
    if let Some(token) = token {
        return Ok(token);
    }
    let dir =
        data_dir.context("shutdown needs the node's admin token: --data-dir DIR, --token or QUIVER_ADMIN_TOKEN")?;
    let path = dir.join(quiver_ring::wire::ADMIN_TOKEN_FILE);
    let token =
        std::fs::read_to_string(&path).with_context(|| format!("reading the admin token {}", path.display()))?;
    Ok(token.trim().to_owned())
}

fn certs(command: Certs) -> anyhow::Result<ExitCode> {
    use quiver_certs as tls;
    let mut out = std::io::stdout().lock();
    match command {
        Certs::InitCa { dir } => {
            tls::init_ca(&dir)?;
            writeln!(out, "cluster CA: {}", dir.join(tls::CA_CERT).display())?;
        }
        Certs::Node { name, ip, ca_dir, dir } => {
            tls::issue_node(&ca_dir, &dir, &name, &ip)?;
            writeln!(out, "node {name}: {}", dir.join(format!("{name}.pem")).display())?;
        }
        Certs::Secret { dir } => {
            tls::init_cluster_secret(&dir)?;
            writeln!(out, "cluster secret: {}", dir.join(tls::CLUSTER_SECRET).display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Commands that need no node.
    let args = match args.command {
        Command::Certs(command) => return certs(command),
        Command::LocalCluster { nodes, dir } => return local_cluster::run(nodes, &dir),
        command => Args { command, ..args },
    };
    // Read input before connecting, so bad input fails fast.
    let entries = match &args.command {
        Command::BulkSet { entries, file } => Some(parse_entries(entries, file.as_deref())?),
        _ => None,
    };
    let token = match &args.command {
        Command::Shutdown { data_dir, token } => admin_token(data_dir.clone(), token.clone())?,
        _ => String::new(),
    };
    let context = match &args.command {
        Command::Set { context: Some(text), .. } | Command::Delete { context: Some(text), .. } => {
            Some(ContextToken::from_hex(text).map_err(|e| anyhow!("--context: {}", e.message))?)
        }
        _ => None,
    };
    let seeds: Vec<String> = args.addr.split(',').map(str::trim).map(str::to_owned).collect();
    let mut client = Client::connect(seeds.clone())?.with_timeout(Duration::from_secs(args.timeout));
    if let Some(consistency) = args.consistency {
        client = client.with_consistency(consistency);
    }
    let mut out = std::io::stdout().lock();
    match args.command {
        Command::Set { key, value, vector, .. } => {
            match (&context, vector) {
                (Some(context), _) => client.set_with_context(key, value, context),
                (None, Some(vector)) => client.set_with_vector(key, value, &parse_vector(&vector)?),
                (None, None) => client.set(key, value),
            }?;
            writeln!(out, "OK")?;
        }
        Command::Get { key } => match client.get(&key)? {
            Some(value) => {
                out.write_all(&value).and_then(|()| writeln!(out))?;
            }
            None => {
                eprintln!("quiver: key {key:?} not found");
                return Ok(ExitCode::from(1));
            }
        },
        Command::Delete { key, .. } => {
            match &context {
                Some(context) => client.delete_with_context(key, context),
                None => client.delete(key),
            }?;
            writeln!(out, "OK")?;
        }
        Command::Versions { key } => {
            let versions = client.get_versions(&key)?;
            for version in &versions.versions {
                match &version.value {
                    Some(value) => writeln!(out, "{}\t{}", version.hlc, String::from_utf8_lossy(value)),
                    None => writeln!(out, "{}\t(deleted)", version.hlc),
                }?;
            }
            writeln!(out, "context: {}", versions.context.to_hex())?;
            if versions.versions.is_empty() {
                eprintln!("quiver: key {key:?} has no versions");
                return Ok(ExitCode::from(1));
            }
        }
        Command::BulkSet { .. } => {
            let entries = entries.unwrap_or_default();
            let count = entries.len();
            client.bulk_set(entries).map_err(|e| match e.kind() {
                Some(quiver_client::ErrorKind::BulkTooLarge | quiver_client::ErrorKind::FrameTooLarge) => {
                    anyhow!("{e}\n(`quiver load FILE` stores a file of any size in batches)")
                }
                _ => e.into(),
            })?;
            writeln!(out, "OK ({count} entries)")?;
        }
        Command::Load { file, batch } => {
            let summary = load::load(&client, &file, batch)?;
            writeln!(out, "{summary}")?;
        }
        Command::Search { query, k, all, global_stats, json } => {
            let options = quiver_client::TextSearch { all, global_stats };
            print_hits(&mut out, &client.search_text_with(&query, k, options)?, json)?;
        }
        Command::Similar { text, k, vector: false, json } => {
            print_hits(&mut out, &client.search_similar(&text, k)?, json)?;
        }
        Command::Similar { text, k, vector: true, json } => {
            print_hits(&mut out, &client.search_vector(&parse_vector(&text)?, k)?, json)?;
        }
        Command::Status { json: true } => {
            let s = client.status()?;
            let text = serde_json::to_string_pretty(&s)?;
            writeln!(out, "{text}")?;
        }
        Command::Status { json: false } => {
            let s = client.status()?;
            let uptime = Duration::from_millis(s.uptime_ms);
            writeln!(
                out,
                "node id:       {:016x}\nclient addr:   {}\npeer addr:     {}\nversion:       {}\nkeys:          {} (approximate)\nbytes on disk: {}\nuptime:        {}s\nclock:         {}\ncausal writes refused for too many siblings: {}",
                s.node_id,
                s.client_addr,
                s.peer_addr,
                s.version,
                s.keys,
                s.bytes_on_disk,
                uptime.as_secs(),
                s.clock_refusal.as_deref().unwrap_or(&format!("ok (max offset {} ms)", s.max_clock_offset_ms)),
                s.too_many_siblings_refused,
            )
            ?;
            if let Some(failure) = &s.storage_failure {
                writeln!(out, "storage:       FAILED, takes no writes until restarted: {failure}")?;
            }
            if !s.name.is_empty() {
                writeln!(out, "name:          {}", s.name)?;
            }
            if let Some(reason) = &s.cut_off {
                writeln!(out, "cluster:       CUT OFF: {reason}")?;
            }
            for peer in &s.peers {
                let state = match (peer.up, &peer.storage_failure) {
                    (true, Some(failure)) => format!("up, storage FAILED ({failure}), its writes are hinted"),
                    (true, None) => "up".to_owned(),
                    (false, _) => "down".to_owned(),
                };
                let id = peer.node_id.map_or_else(|| "id unknown".to_owned(), |id| format!("id {id:016x}"));
                let clock = peer.clock_offset_ms.map_or_else(String::new, |ms| format!(", clock {ms:+} ms"));
                writeln!(out, "peer:          {} {} {state} ({id}{clock})", peer.name, peer.peer_addr)?;
            }
            if !s.ring.is_empty() {
                writeln!(out, "ring:          {} replicas per key; share = keys it is first replica of", s.replicas)?;
            }
            for member in &s.ring {
                let state = if member.up { "up" } else { "down" };
                let keys = member.keys.map_or_else(|| "keys unknown".to_owned(), |k| format!("{k} keys"));
                let share = f64::from(member.share_ppm) / 10_000.0;
                let hints = match member.hints {
                    0 => String::new(),
                    n => format!("  {n} hints held for it ({} bytes)", member.hint_bytes),
                };
                writeln!(out, "  {:<12} {:<4} share {share:>5.1} %  {keys}{hints}", member.name, state)?;
            }
            if s.indexed {
                writeln!(out, "index:         on; vectors not yet in the similarity graph: {}", s.graph_backlog)?;
            }
            if let Some(ae) = &s.anti_entropy {
                let trees = match ae.trees_built {
                    true => format!("hash trees of {} keys", ae.tree_keys),
                    false => "hash trees not built yet (the ring is not known)".to_owned(),
                };
                let oldest = match ae.oldest_full_exchange_ms {
                    0 => "a set has had none yet".to_owned(),
                    ms => format!("the oldest {}s ago", age_secs(ms)),
                };
                writeln!(
                    out,
                    "anti-entropy:  {trees}; replica sets in sync {} of {} (last full exchanges: {oldest}); {} keys repaired, {} bytes sent, {} exchanges ({} failed)",
                    ae.sets_synced, ae.sets, ae.keys_repaired, ae.bytes_sent, ae.exchanges, ae.exchanges_failed
                )?;
                if let Some((done, total)) = ae.round {
                    writeln!(out, "               a round is running: {done} of {total} exchanges done")?;
                }
                let name_of = |id: u64| match s.peers.iter().find(|p| p.node_id == Some(id)) {
                    Some(peer) => peer.name.clone(),
                    None if id == s.node_id => s.name.clone(),
                    None => format!("{id:016x}"),
                };
                for root in &ae.roots {
                    let set: Vec<String> = root.set.iter().map(|&id| name_of(id)).collect();
                    let full = match root.full_exchange_ms {
                        0 => "no full exchange yet".to_owned(),
                        ms => format!("last full exchange {}s ago", age_secs(ms)),
                    };
                    writeln!(out, "  {:<28} {:>10} keys, root {:016x}, {full}", set.join(","), root.keys, root.root)?;
                }
                writeln!(
                    out,
                    "tombstones:    {} in tables, waiting to be purged; {} purged",
                    ae.tombstones_waiting, ae.tombstones_purged
                )?;
            }
            if s.batches_pending > 0 {
                writeln!(out, "bulk sets in the batch log, not yet known applied: {}", s.batches_pending)?;
            }
            if s.hints_dropped > 0 {
                writeln!(out, "hints dropped: {} (too old, or their queue was full)", s.hints_dropped)?;
            }
            if !s.budgets.is_empty() {
                writeln!(out, "bounds:        setting, in use, times reached: what happens at it")?;
            }
            for b in &s.budgets {
                writeln!(out, "  {:<28} {:>12} {:>12} {:>6}  {}", b.name, b.max, b.used, b.reached, b.at_bound)?;
            }
        }
        Command::Repair { wait_secs } => {
            let report = repair::run(&client, &seeds, Duration::from_secs(wait_secs))?;
            writeln!(
                out,
                "exchanges: {}\nkeys repaired: {}\nreplica sets in sync: {} of {}",
                report.exchanges, report.keys_repaired, report.sets_synced, report.sets
            )?;
            for failed in &report.failed {
                writeln!(out, "not done: {failed}")?;
            }
            if !report.failed.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::CheckTrees { wait_secs } => {
            let check = client.check_trees(Duration::from_secs(wait_secs))?;
            if check.differing.is_empty() {
                writeln!(out, "the hash trees match the data ({} keys)", check.keys)?;
            } else {
                writeln!(out, "{} keys of {} differ from the hash trees:", check.differing.len(), check.keys)?;
                for key in &check.differing {
                    writeln!(out, "  {}", String::from_utf8_lossy(key))?;
                }
                return Ok(ExitCode::from(1));
            }
        }
        Command::Compact { wait_secs } => {
            client.compact(Duration::from_secs(wait_secs))?;
            writeln!(out, "OK")?;
        }
        Command::Shutdown { .. } => {
            client.shutdown_node(&token)?;
            writeln!(out, "OK")?;
        }
        Command::Certs(_) | Command::LocalCluster { .. } => unreachable!("answered before connecting"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Seconds from `ms` (since the epoch) to now, by this machine's clock.
fn age_secs(ms: u64) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (now.as_millis() as u64).saturating_sub(ms) / 1000
}
