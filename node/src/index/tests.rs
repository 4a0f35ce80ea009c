//! The index over a real engine: BM25 against hand-computed scores, the
//! query forms, overwrites and deletes, rebuilds, and crashes at any moment
//! (a simulated disk) leaving an index that matches the data.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use super::analyzer::Analyzer;
use super::embed::Embedder;
use quiver_ring::rand::SplitMix64;
use quiver_ring::wire::ErrorKind;
use quiver_ring::{Hlc, NodeId, Stamper};

use super::embed::WordVectors;
use super::*;
use crate::storage::disk::SimFs;
use crate::storage::keys::data_key;
use crate::storage::Options;

fn options() -> Options {
    Options { memtable_bytes_max: 64 << 10, wal_segment_bytes: 1 << 20, ..Options::default() }
}

/// The shipped word vectors, loaded once.
fn glove() -> Arc<WordVectors> {
    static VECTORS: std::sync::OnceLock<Arc<WordVectors>> = std::sync::OnceLock::new();
    VECTORS.get_or_init(|| Arc::new(WordVectors::shipped().unwrap())).clone()
}

fn open_index(engine: Arc<Engine>) -> Index {
    Index::open(engine, glove()).unwrap()
}

fn check(engine: &Engine) -> Vec<String> {
    verify(engine, glove().as_ref(), 5).unwrap()
}

fn engine_on(sim: &SimFs) -> Arc<Engine> {
    Arc::new(Engine::open_with(Arc::new(sim.clone()), Path::new("/db"), options()).unwrap())
}

/// Writes through the index and waits until durable.
fn write(index: &Index, ops: Vec<Op>) -> storage::Result<u64> {
    let (sender, receiver) = mpsc::channel();
    index.write_then(
        ops,
        Box::new(move |result| {
            let _ = sender.send(result);
        }),
    );
    receiver.recv().unwrap()
}

struct Writes {
    stamper: Stamper,
}

impl Writes {
    fn new() -> Writes {
        Writes { stamper: Stamper::new(NodeId(1), Hlc::ZERO, 500) }
    }

    fn op(&mut self, key: &str, value: Option<&str>) -> Op {
        let stamp = self.stamper.next(crate::now_ms()).unwrap();
        Op { key: data_key(key.as_bytes()), version: stamp.blind(value.map(|v| v.as_bytes().to_vec())) }
    }
}

fn set(index: &Index, writes: &mut Writes, key: &str, value: Option<&str>) {
    write(index, vec![writes.op(key, value)]).unwrap();
}

fn search(index: &Index, query: &str, matching: Match) -> Vec<(String, f64)> {
    let hits = index.search_text(query, 10, matching).unwrap();
    hits.into_iter().map(|h| (String::from_utf8(h.key).unwrap(), h.score)).collect()
}

fn keys(index: &Index, query: &str, matching: Match) -> Vec<String> {
    search(index, query, matching).into_iter().map(|(key, _)| key).collect()
}

/// Four documents: "the" is a stop word, so their lengths are 3, 3, 4 and
/// 1 terms (11 in all, 2.75 on average).
fn corpus() -> (SimFs, Index, Writes) {
    let sim = SimFs::new();
    let index = open_index(engine_on(&sim));
    let mut writes = Writes::new();
    for (key, value) in
        [("d1", "The quick brown fox"), ("d2", "the lazy brown dog"), ("d3", "quick quick fox jumps"), ("d4", "dog")]
    {
        set(&index, &mut writes, key, Some(value));
    }
    (sim, index, writes)
}

fn close_to(got: &[(String, f64)], want: &[(&str, f64)]) {
    assert_eq!(got.len(), want.len(), "{got:?}");
    for ((key, score), (want_key, want_score)) in got.iter().zip(want) {
        assert_eq!(key, want_key, "{got:?}");
        assert!((score - want_score).abs() < 1e-9, "{key}: {score} != {want_score}");
    }
}

/// idf(df = 2 of 4) = ln(1 + 2.5 / 2.5) = ln 2; each term's score is
/// idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / 2.75)), summed over
/// the query's terms. The numbers were worked out by hand from that.
#[test]
fn bm25_scores_equal_hand_computed_values() {
    let (_sim, index, _) = corpus();
    // fox: d1 (tf 1, dl 3) and d3 (tf 1, dl 4).
    close_to(&search(&index, "fox", Match::Any), &[("d1", 0.668_293_297_591_660_3), ("d3", 0.584_465_566_883_298_9)]);
    // quick fox: d3 has quick twice (dl 4), d1 each once (dl 3).
    close_to(
        &search(&index, "Quick FOXES", Match::Any),
        &[("d3", 1.429_511_499_858_144), ("d1", 1.336_586_595_183_320_7)],
    );
    // dog: the one-word d4 ranks above d2.
    close_to(&search(&index, "dogs", Match::Any), &[("d4", 0.937_104_009_472_104_8), ("d2", 0.668_293_297_591_660_3)]);
    let hits = index.search_text("fox", 1, Match::Any).unwrap();
    assert_eq!(hits.len(), 1, "k bounds the hits");
    assert_eq!(hits[0].value, b"The quick brown fox", "a hit carries its value");
}

/// A search reads values only up to what one answer can carry: past it,
/// `ResponseTooLarge` (ask for fewer); under it, the hits as before.
#[test]
fn a_search_whose_values_pass_the_answer_limit_is_refused() {
    let (_sim, index, _) = corpus();
    // "fox": d1 (2 + 19 bytes), then d3 (2 + 21).
    let index = index.with_hits_bytes_max(30);
    let error = index.search_text("fox", 10, Match::Any).unwrap_err();
    assert_eq!(error.kind, ErrorKind::ResponseTooLarge, "{error}");
    assert!(error.message.contains("ask for fewer"), "{error}");
    assert_eq!(index.search_text("fox", 1, Match::Any).unwrap().len(), 1);
    let error = index.search_similar("fox", 10).unwrap_err();
    assert_eq!(error.kind, ErrorKind::ResponseTooLarge, "{error}");
}

#[test]
fn phrases_prefixes_and_all_terms() {
    let (_sim, index, mut writes) = corpus();
    assert_eq!(keys(&index, "\"quick brown\"", Match::Any), ["d1"]);
    assert_eq!(keys(&index, "\"brown quick\"", Match::Any), Vec::<String>::new(), "order counts");
    assert_eq!(keys(&index, "\"quick fox\"", Match::Any), ["d3"], "adjacent in d3 only");
    assert_eq!(keys(&index, "qui*", Match::Any), ["d3", "d1"]);
    assert_eq!(keys(&index, "do*", Match::Any), ["d4", "d2"]);
    assert_eq!(keys(&index, "brown dog", Match::All), ["d2"]);
    assert_eq!(keys(&index, "quick dog", Match::All), Vec::<String>::new());
    // d1's phrase scores as its two terms (1.34), above d4's dog (0.94).
    assert_eq!(keys(&index, "\"quick brown\" dog", Match::Any), ["d1", "d4", "d2"]);
    // A stop word keeps its place in a phrase.
    set(&index, &mut writes, "d5", Some("the King of France"));
    set(&index, &mut writes, "d6", Some("king France"));
    assert_eq!(keys(&index, "\"king of france\"", Match::Any), ["d5"]);
    assert_eq!(keys(&index, "\"king france\"", Match::Any), ["d6"]);
    let error = index.search_text("the of", 10, Match::Any).unwrap_err();
    assert_eq!(error.kind, ErrorKind::BadQuery, "{error}");
    assert_eq!(index.search_text("fox", 0, Match::Any).unwrap_err().kind, ErrorKind::BadQuery);
}

#[test]
fn overwrites_and_deletes_take_their_postings_with_them() {
    let (_sim, index, mut writes) = corpus();
    set(&index, &mut writes, "d1", Some("a slow turtle"));
    assert_eq!(keys(&index, "fox", Match::Any), ["d3"]);
    assert_eq!(keys(&index, "turtle", Match::Any), ["d1"]);
    set(&index, &mut writes, "d3", None);
    assert_eq!(keys(&index, "fox", Match::Any), Vec::<String>::new());
    // Two words: "ÿnot" and "text".
    set(&index, &mut writes, "d2", Some("\u{0}\u{ff}not text \u{fffd}"));
    let mut binary = writes.op("bin", Some("x"));
    binary.version.value = Some(vec![0xff, 0xfe, b'a']);
    write(&index, vec![binary]).unwrap();
    assert_eq!(check(&index.engine), Vec::<String>::new());
    assert_eq!(text::read_stats(&index.engine).unwrap(), Stats { docs: 3, words: 2 + 2 + 1 });
}

#[test]
fn a_bulk_write_and_older_versions_index_only_what_wins() {
    let (_sim, index, mut writes) = corpus();
    let older = writes.op("d1", Some("older words"));
    let newer = writes.op("d1", Some("newest words"));
    // The same key twice in one record, the newer first: the older loses.
    write(&index, vec![newer, writes.op("d9", Some("fresh")), older]).unwrap();
    assert_eq!(keys(&index, "newest", Match::Any), ["d1"]);
    assert_eq!(keys(&index, "older", Match::Any), Vec::<String>::new());
    assert_eq!(keys(&index, "fresh", Match::Any), ["d9"]);
    assert_eq!(check(&index.engine), Vec::<String>::new());
}

#[test]
fn an_index_is_built_from_data_written_without_it_and_rebuilt_after_running_without_it() {
    let sim = SimFs::new();
    let engine = engine_on(&sim);
    let mut writes = Writes::new();
    for i in 0..2500 {
        engine.write_blocking(vec![writes.op(&format!("k{i}"), Some(&format!("word{} common", i % 7)))]).unwrap();
    }
    let index = open_index(engine.clone());
    assert_eq!(check(&engine), Vec::<String>::new());
    assert_eq!(index.search_text("word3", 1000, Match::Any).unwrap().len(), 357);
    index.stop();
    drop(index);
    // Without the index, writes leave it behind; the next start with it
    // rebuilds.
    Index::forget(&engine).unwrap();
    engine.write_blocking(vec![writes.op("k3", Some("changed"))]).unwrap();
    assert_ne!(check(&engine), Vec::<String>::new());
    let index = open_index(engine.clone());
    assert_eq!(check(&engine), Vec::<String>::new());
    assert_eq!(keys(&index, "changed", Match::Any), ["k3"]);
}

/// Four writers overwrite and delete the same few hundred keys at once, so
/// a key often has a write in flight when its next one arrives (the index
/// stage must derive from the state the write before it leaves, not from
/// the engine's); the disk is cut at moments between, and each image opens
/// to an index that matches its data exactly.
#[test]
fn a_crash_at_any_moment_leaves_an_index_that_matches_the_data() {
    let seed = crate::now_ms();
    let sim = SimFs::new();
    let index = Arc::new(open_index(engine_on(&sim)));
    let words = ["alpha", "beta", "gamma", "delta", "the", "epsilon", "zeta", "eta"];
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (index, stop, acked) = (index.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(seed ^ w);
                let mut writes = Writes { stamper: Stamper::new(NodeId(w + 1), Hlc::ZERO, 500) };
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("k{}", rng.next_u64() % 300);
                    let value = (!rng.next_u64().is_multiple_of(5)).then(|| {
                        (0..1 + rng.next_u64() % 6)
                            .map(|_| words[(rng.next_u64() % 8) as usize])
                            .collect::<Vec<_>>()
                            .join(" ")
                    });
                    let op = writes.op(&key, value.as_deref());
                    if write(&index, vec![op]).is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut images = Vec::new();
    for _ in 0..20 {
        while acked.load(Ordering::Relaxed) < (images.len() + 1) * 100 {
            std::thread::yield_now();
        }
        images.push(sim.crash());
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    for (n, image) in images.into_iter().enumerate() {
        let engine = engine_on(&image);
        let wrong = check(&engine);
        assert!(wrong.is_empty(), "seed {seed}, image {n}: {wrong:?}");
        let reopened = open_index(engine.clone());
        assert!(reopened.search_text("alpha", 1000, Match::Any).is_ok());
    }
}

/// The WAL cut at every byte of its last records: each cut opens to an
/// index that matches its data (a record's postings never survive without
/// its values, nor the values without their postings).
#[test]
fn a_wal_cut_at_every_byte_leaves_an_index_that_matches_the_data() {
    use crate::storage::disk::Fs;
    use crate::storage::{frame, wal};
    let options = Options { memtable_bytes_max: 64 << 20, wal_segment_bytes: 1 << 20, ..Options::default() };
    let open =
        |fs: &SimFs| Arc::new(Engine::open_with(Arc::new(fs.clone()), Path::new("/db"), options.clone()).unwrap());
    let sim = SimFs::new();
    let index = open_index(open(&sim));
    let mut writes = Writes::new();
    set(&index, &mut writes, "a", Some("red apple"));
    set(&index, &mut writes, "b", Some("green apple pie"));
    set(&index, &mut writes, "a", Some("red cherry"));
    write(&index, vec![writes.op("c", Some("apple tart")), writes.op("d", Some("cherry pie"))]).unwrap();
    set(&index, &mut writes, "b", None);
    set(&index, &mut writes, "d", Some("plum"));
    let image = sim.crash();
    let dir = Path::new("/db");
    let (segment, number, ends) = image
        .list(dir)
        .unwrap()
        .into_iter()
        .filter_map(|name| {
            let number = wal::parse_segment_name(&name)?;
            let bytes = image.get(&dir.join(&name))?;
            let mut ends = Vec::new();
            frame::scan(&bytes, &wal::salt(number), wal::MAGIC.len(), |offset, payload| {
                ends.push(offset + frame::HEADER_LEN + payload.len());
                true
            });
            Some((dir.join(&name), number, ends))
        })
        .max_by_key(|(_, _, ends)| ends.len())
        .unwrap();
    let bytes = image.get(&segment).unwrap();
    assert!(ends.len() >= 6, "segment {number} has {} records", ends.len());
    let mut seen = std::collections::BTreeSet::new();
    for cut in ends[ends.len() - 6]..=ends[ends.len() - 1] {
        let fs = image.crash();
        fs.put(&segment, bytes[..cut].to_vec());
        let engine = open(&fs);
        let wrong = check(&engine);
        assert!(wrong.is_empty(), "cut at {cut}: {wrong:?}");
        let stats = text::read_stats(&engine).unwrap();
        seen.insert((stats.docs, stats.words));
    }
    assert!(seen.len() >= 4, "the cuts went through several states: {seen:?}");
}

/// Documents of three words each, drawn from the shipped vocabulary's
/// 10,000 most frequent words: realistic mean vectors, not random ones.
fn three_word_docs(seed: u64, count: usize) -> Vec<String> {
    let vectors = glove();
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            (0..3).map(|_| vectors.word_at(rng.between(100, 10_000) as usize).unwrap()).collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// The share of the exact 10 nearest that the graph finds, over queries.
fn recall_at_10(index: &Index, queries: &[Vec<f32>]) -> f64 {
    let mut found = 0;
    for query in queries {
        let exact: Vec<Vec<u8>> =
            index.vectors().search_exact(query, 10, &|_| true).unwrap().into_iter().map(|n| n.key).collect();
        let graph = index.vectors().search(query, 10, &|_| true).unwrap();
        found += graph.iter().filter(|n| exact.contains(&n.key)).count();
    }
    found as f64 / (queries.len() * 10) as f64
}

/// HNSW recall@10 against brute force, over 6,000 documents and 200
/// held-out queries: at least 0.95 when built, after 10 % of the documents
/// are deleted, and after a restart (the graph rebuilt from the stored
/// vectors).
#[test]
fn hnsw_recall_at_10_is_at_least_0_95_after_deletes_and_a_restart() {
    let sim = SimFs::new();
    let index = open_index(engine_on(&sim));
    let mut writes = Writes::new();
    let docs = three_word_docs(7, 6000);
    for (chunk, texts) in docs.chunks(500).enumerate() {
        let ops =
            texts.iter().enumerate().map(|(i, text)| writes.op(&format!("d{}", chunk * 500 + i), Some(text))).collect();
        write(&index, ops).unwrap();
    }
    let queries: Vec<Vec<f32>> =
        three_word_docs(8, 200).iter().map(|text| index.embedder().embed(text).unwrap()).collect();
    assert!(index.vectors().sync());
    let built = recall_at_10(&index, &queries);
    assert!(built >= 0.95, "recall@10 {built}");

    let deleted: Vec<Op> = (0..6000).step_by(10).map(|i| writes.op(&format!("d{i}"), None)).collect();
    write(&index, deleted).unwrap();
    assert!(index.vectors().sync());
    let after_deletes = recall_at_10(&index, &queries);
    assert!(after_deletes >= 0.95, "recall@10 after deleting 10 %: {after_deletes}");
    let hits = index.search_vector(queries[0].clone(), 50).unwrap();
    assert!(
        hits.iter().all(|h| String::from_utf8_lossy(&h.key)[1..].parse::<usize>().unwrap() % 10 != 0),
        "no deleted key"
    );

    index.stop();
    let reopened = open_index(engine_on(&sim.crash()));
    assert!(reopened.vectors().sync());
    let restarted = recall_at_10(&reopened, &queries);
    assert!(restarted >= 0.95, "recall@10 after a restart: {restarted}");
    assert_eq!(check(&reopened.engine), Vec::<String>::new());
}

/// Hashes each word to a random direction: an embedder that knows nothing.
#[derive(Debug)]
struct RandomEmbedder;

impl Embedder for RandomEmbedder {
    fn dim(&self) -> usize {
        50
    }

    fn embed(&self, text: &str) -> Option<Vec<f32>> {
        let mut sum = vec![0f32; 50];
        for word in Analyzer::words(text) {
            let mut rng = SplitMix64::new(xxhash_rust::xxh3::xxh3_64(word.as_bytes()));
            for x in &mut sum {
                *x += (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0;
            }
        }
        embed::unit(sum)
    }

    fn fingerprint(&self) -> String {
        "random".into()
    }
}

/// Whether, with `embedder`, the documents about royalty come first for
/// "king" and those about France first for "paris" (none of them holds
/// the query's word).
fn ranks_by_meaning(embedder: Arc<dyn Embedder>) -> bool {
    let index = Index::open(engine_on(&SimFs::new()), embedder).unwrap();
    let mut writes = Writes::new();
    let docs = [
        ("royal1", "the queen and the prince lived in the royal palace"),
        ("royal2", "the monarch was crowned and took the throne"),
        ("royal3", "an emperor ruled the empire with his royal court"),
        ("france1", "the eiffel tower stands tall over the french capital"),
        ("france2", "french wine and cheese from bordeaux and lyon"),
        ("france3", "the louvre museum holds the mona lisa"),
        ("sport1", "the football team won the championship match"),
        ("sport2", "the striker scored a goal in the final minute"),
        ("tech1", "the computer software runs on a fast processor"),
        ("tech2", "programmers write code and fix bugs"),
        ("food1", "bake the bread with flour sugar and butter"),
        ("nature1", "the river flows through the forest into the lake"),
    ];
    write(&index, docs.iter().map(|(key, text)| writes.op(key, Some(text))).collect()).unwrap();
    let top3 = |text: &str| -> Vec<String> {
        let hits = index.search_similar(text, 3).unwrap();
        let mut keys: Vec<String> = hits.into_iter().map(|h| String::from_utf8(h.key).unwrap()).collect();
        keys.sort();
        keys
    };
    top3("king") == ["royal1", "royal2", "royal3"] && top3("paris") == ["france1", "france2", "france3"]
}

#[test]
fn similar_values_rank_by_meaning_with_word_vectors_and_not_with_random_ones() {
    assert!(ranks_by_meaning(glove()), "GloVe: royalty first for king, France first for paris");
    assert!(!ranks_by_meaning(Arc::new(RandomEmbedder)), "a random embedder ranks the same by chance");
}

#[test]
fn vector_searches_say_what_is_wrong() {
    let (_sim, index, _) = corpus();
    for (vector, k) in
        [(vec![1.0; 3], 10), (vec![], 10), (vec![f32::NAN; 50], 10), (vec![0.0; 50], 10), (vec![1.0; 50], 0)]
    {
        let error = index.search_vector(vector.clone(), k).unwrap_err();
        assert_eq!(error.kind, ErrorKind::BadQuery, "{vector:?}: {error}");
    }
    assert!(index.search_vector(vec![1.0; 3], 10).unwrap_err().message.contains("50"));
    assert_eq!(index.search_similar("qwzxv", 10).unwrap_err().kind, ErrorKind::BadQuery);
    assert_eq!(index.search_similar("dog", 1).unwrap()[0].key, b"d4", "the one-word document about a dog");
}

/// A value written with its own vector is found at that vector, by the
/// graph and by `verify` and a rebuild alike, until a write of the key
/// without one brings back its text's embedding.
#[test]
fn a_vector_written_with_a_value_is_found_there_until_a_write_without_one() {
    let (_sim, index, mut writes) = corpus();
    // A vector from the same space as the values' (an outlier far from
    // every point may not be reachable through the graph's links).
    let axis = glove().word("volcano").unwrap().to_vec();
    let stamp = writes.stamper.next(crate::now_ms()).unwrap();
    let vector_key = data_key(&quiver_ring::ring::vector_key_of(b"d9"));
    write(
        &index,
        vec![
            Op { key: data_key(b"d9"), version: stamp.blind(Some(b"plain words".to_vec())) },
            Op { key: vector_key, version: stamp.blind(Some(vectors::encode(&axis))) },
        ],
    )
    .unwrap();
    let nearest = index.search_vector(axis.clone(), 1).unwrap();
    assert_eq!((nearest[0].key.as_slice(), nearest[0].value.as_slice()), (&b"d9"[..], &b"plain words"[..]));
    assert!((nearest[0].score - 1.0).abs() < 1e-5, "{}", nearest[0].score);
    assert_eq!(keys(&index, "plain", Match::Any), ["d9"], "its text is indexed as any other");
    assert_eq!(check(&index.engine), Vec::<String>::new());

    set(&index, &mut writes, "d9", Some("plain words again"));
    let nearest = index.search_vector(axis.clone(), 1).unwrap();
    assert!(nearest[0].key != b"d9" || nearest[0].score < 0.9, "back to its text's embedding: {nearest:?}");
    assert_eq!(check(&index.engine), Vec::<String>::new());
}
