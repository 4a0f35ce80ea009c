//! What search costs and what it answers at: one node, values of about
//! 100 bytes of English words (12 words drawn from the 5,000 most frequent
//! of the shipped GloVe vocabulary, favouring the frequent ones).
//!
//! 1. Write throughput with indexing off and on, in the same run: `set` at
//!    64 in flight and `bulk_set` of 1000 keys at 4 in flight, each the
//!    median of `QUIVER_BENCH_RUNS` runs of `QUIVER_BENCH_SECONDS` seconds
//!    on a fresh node.
//! 2. Queries against `QUIVER_BENCH_SEARCH_DOCS` (100,000) indexed values:
//!    full text (one word; two words, any; a two-word phrase) and similar
//!    values (two words), k = 10, at 1 and 16 in flight: queries/s, p50
//!    and p99.
//!
//! Output: a markdown table on stdout and `target/quiver-bench/search.csv`.
//!
//! Run: `cargo bench -p quiver-benches --bench search`

use std::path::PathBuf;
use std::sync::Arc;

use quiver_benches::{build_quiverd, drive, env_or, median, workspace, Figure, Keys};
use quiver_chaos::node::{NodeProcess, NodeSpec};
use quiver_client::Client;
use quiver_node::index::embed::WordVectors;
use quiver_ring::rand::SplitMix64;

/// The allocator `quiverd` uses (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Words a value is drawn from, the most frequent first.
const VOCABULARY: usize = 5000;

/// Makes one query from the words: its text, and whether it is a search
/// for similar values (else full text).
type MakeQuery = Arc<dyn Fn(&Texts, &mut SplitMix64) -> (String, bool) + Send + Sync>;

/// A node on a fresh directory, and a client of it.
async fn start(quiverd: &PathBuf, index: bool) -> (NodeProcess, tempfile::TempDir, Arc<Client>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let mut spec = NodeSpec::new(quiverd, dir.path());
    if index {
        spec.args.push("--index".into());
    }
    let node = NodeProcess::start(&spec).expect("quiverd starts");
    let client = Client::connect([node.addr.clone()]).await.expect("connect");
    (node, dir, Arc::new(client))
}

/// Values made of words, deterministic for a seed.
#[derive(Clone)]
struct Texts {
    words: Arc<Vec<String>>,
}

impl Texts {
    fn new() -> Texts {
        let vectors = WordVectors::shipped().expect("the shipped word vectors");
        let words = (0..VOCABULARY).filter_map(|i| vectors.word_at(i)).map(str::to_owned).collect();
        Texts { words: Arc::new(words) }
    }

    /// A word, frequent ones more often (the square of a uniform draw
    /// leans towards the low ranks).
    fn word(&self, rng: &mut SplitMix64) -> &str {
        let u = (rng.next_u64() % 1_000_000) as f64 / 1_000_000.0;
        &self.words[((u * u) * self.words.len() as f64) as usize]
    }

    fn value(&self, seed: u64) -> String {
        let mut rng = SplitMix64::new(seed);
        (0..12).map(|_| self.word(&mut rng)).collect::<Vec<_>>().join(" ")
    }
}

async fn measure_writes(quiverd: &PathBuf, index: bool, texts: &Texts, runs: u64, seconds: u64) -> (Figure, Figure) {
    let (mut sets, mut bulks) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let (_node, _dir, client) = start(quiverd, index).await;
        let (c, t) = (client.clone(), texts.clone());
        sets.push(
            drive(64, seconds, move |task, i| {
                let (c, t) = (c.clone(), t.clone());
                async move {
                    let n = (run << 40) | (task << 32) | i;
                    u64::from(c.set(format!("s{n}"), t.value(n)).await.is_ok())
                }
            })
            .await,
        );
        let (c, t) = (client.clone(), texts.clone());
        bulks.push(
            drive(4, seconds, move |task, i| {
                let (c, t) = (c.clone(), t.clone());
                async move {
                    let first = ((task << 32) | i) * 1000;
                    let keys = Keys::new("b", first..first + 1000, 0);
                    let entries: Vec<(&str, String)> = keys.iter().zip(first..).map(|(k, n)| (k, t.value(n))).collect();
                    if c.bulk_set(entries).await.is_ok() {
                        1000
                    } else {
                        0
                    }
                }
            })
            .await,
        );
    }
    (median(sets), median(bulks))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs = env_or("QUIVER_BENCH_RUNS", 3).max(1);
    let seconds = env_or("QUIVER_BENCH_SECONDS", 3).max(1);
    let docs = env_or("QUIVER_BENCH_SEARCH_DOCS", 100_000);
    let quiverd = std::env::var("QUIVER_BENCH_QUIVERD").map(PathBuf::from).unwrap_or_else(|_| build_quiverd());
    let texts = Texts::new();
    let mut rows: Vec<(String, Figure)> = Vec::new();

    for index in [false, true] {
        let (set, bulk) = measure_writes(&quiverd, index, &texts, runs, seconds).await;
        let label = if index { "indexing on" } else { "indexing off" };
        eprintln!("{label}: set64 {:.0}/s, bulk {:.0} keys/s", set.keys_per_s, bulk.keys_per_s);
        rows.push((format!("set, 64 in flight, {label}"), set));
        rows.push((format!("bulk_set of 1000, 4 in flight, {label}"), bulk));
    }

    let (_node, _dir, client) = start(&quiverd, true).await;
    for first in (0..docs).step_by(1000) {
        let keys = Keys::new("d", first..(first + 1000).min(docs), 0);
        let entries: Vec<(&str, String)> = keys.iter().zip(first..).map(|(k, n)| (k, texts.value(n))).collect();
        client.bulk_set(entries).await.expect("load the corpus");
    }
    // Queries measure the steady state: the similarity graph has every
    // value (while it catches up, searches compare the newest one by one).
    let waited = std::time::Instant::now();
    while client.status().await.expect("status").graph_backlog > 0 {
        assert!(waited.elapsed() < std::time::Duration::from_secs(600), "the graph never caught up");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!("the graph caught up in {:.1} s", waited.elapsed().as_secs_f64());
    eprintln!("{docs} values loaded and indexed, the graph caught up");
    let queries: [(&str, MakeQuery); 4] = [
        ("text: one word", Arc::new(|t, rng| (t.word(rng).to_owned(), false))),
        ("text: two words, any", Arc::new(|t, rng| (format!("{} {}", t.word(rng), t.word(rng)), false))),
        ("text: a two-word phrase", Arc::new(|t, rng| (format!("\"{} {}\"", t.word(rng), t.word(rng)), false))),
        ("similar: two words", Arc::new(|t, rng| (format!("{} {}", t.word(rng), t.word(rng)), true))),
    ];
    for (name, make) in queries {
        for in_flight in [1, 16] {
            let mut figures = Vec::new();
            for run in 0..runs {
                let (c, t, make) = (client.clone(), texts.clone(), make.clone());
                figures.push(
                    drive(in_flight, seconds, move |task, i| {
                        let (c, t, make) = (c.clone(), t.clone(), make.clone());
                        async move {
                            let mut rng = SplitMix64::new((run << 48) ^ (task << 32) ^ i);
                            let (query, similar) = make(&t, &mut rng);
                            let hits = if similar {
                                c.search_similar(&query, 10).await
                            } else {
                                c.search_text(&query, 10).await
                            };
                            u64::from(hits.is_ok())
                        }
                    })
                    .await,
                );
            }
            rows.push((format!("{name}, k=10, {in_flight} in flight"), median(figures)));
        }
    }

    println!("\nSearch on one node (median of {runs} runs of {seconds} s; 100-byte values of 12 words; {docs} values for the queries)\n");
    println!("| workload | per second | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    let mut csv = String::from("workload,per_second,p50_ms,p99_ms\n");
    for (name, figure) in &rows {
        println!("| {name} | {:.0} | {:.2} | {:.2} |", figure.keys_per_s, figure.p50_ms, figure.p99_ms);
        csv += &format!("{name},{:.0},{:.3},{:.3}\n", figure.keys_per_s, figure.p50_ms, figure.p99_ms);
    }
    let out = workspace().join("target/quiver-bench");
    std::fs::create_dir_all(&out).expect("the output folder");
    std::fs::write(out.join("search.csv"), csv).expect("write the CSV");
}
