//! The index over a real engine: BM25 against hand-computed scores, the
//! query forms, overwrites and deletes, rebuilds, and crashes at any moment
//! (a simulated disk) leaving an index that matches the data.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use quiver_ring::rand::SplitMix64;
use quiver_ring::wire::ErrorKind;
use quiver_ring::{Hlc, NodeId, Stamper};

use super::*;
use crate::storage::disk::SimFs;
use crate::storage::keys::data_key;
use crate::storage::Options;

fn options() -> Options {
    Options { memtable_bytes_max: 64 << 10, wal_segment_bytes: 1 << 20, ..Options::default() }
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
    let index = Index::open(engine_on(&sim)).unwrap();
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
    assert_eq!(verify(&index.engine, 10).unwrap(), Vec::<String>::new());
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
    assert_eq!(verify(&index.engine, 10).unwrap(), Vec::<String>::new());
}

#[test]
fn an_index_is_built_from_data_written_without_it_and_rebuilt_after_running_without_it() {
    let sim = SimFs::new();
    let engine = engine_on(&sim);
    let mut writes = Writes::new();
    for i in 0..2500 {
        engine.write_blocking(vec![writes.op(&format!("k{i}"), Some(&format!("word{} common", i % 7)))]).unwrap();
    }
    let index = Index::open(engine.clone()).unwrap();
    assert_eq!(verify(&engine, 10).unwrap(), Vec::<String>::new());
    assert_eq!(index.search_text("word3", 1000, Match::Any).unwrap().len(), 357);
    index.stop();
    drop(index);
    // Without the index, writes leave it behind; the next start with it
    // rebuilds.
    Index::forget(&engine).unwrap();
    engine.write_blocking(vec![writes.op("k3", Some("changed"))]).unwrap();
    assert_ne!(verify(&engine, 10).unwrap(), Vec::<String>::new());
    let index = Index::open(engine.clone()).unwrap();
    assert_eq!(verify(&engine, 10).unwrap(), Vec::<String>::new());
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
    let index = Arc::new(Index::open(engine_on(&sim)).unwrap());
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
        let wrong = verify(&engine, 5).unwrap();
        assert!(wrong.is_empty(), "seed {seed}, image {n}: {wrong:?}");
        let reopened = Index::open(engine.clone()).unwrap();
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
    let index = Index::open(open(&sim)).unwrap();
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
        let wrong = verify(&engine, 5).unwrap();
        assert!(wrong.is_empty(), "cut at {cut}: {wrong:?}");
        let stats = text::read_stats(&engine).unwrap();
        seen.insert((stats.docs, stats.words));
    }
    assert!(seen.len() >= 4, "the cuts went through several states: {seen:?}");
}
