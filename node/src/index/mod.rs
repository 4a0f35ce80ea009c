//! Search over the stored values: a full-text index with BM25 ranking,
//! and an embedding index for values about the same things.
//!
//! - [`analyzer`]: text to terms (Unicode words, lowercase, stop words,
//!   stemming), the same for documents and queries;
//! - [`query`]: what a user types, parsed into terms, phrases and prefixes;
//! - [`text`]: the postings' layout in the engine, and BM25 search over
//!   them;
//! - [`embed`]: text to vectors (the [`Embedder`](embed::Embedder) seam,
//!   and word vectors, GloVe by default);
//! - [`vectors`]: the vectors' layout in the engine, and the HNSW graph
//!   over them;
//! - [`writer`]: the stage every data write passes through, which adds the
//!   write's index changes to its own WAL record.
//!
//! The index is derived from the data and lives in the same engine: its
//! changes are written in the same records as the values they come from,
//! so after any crash it matches the data. A node started with indexing on
//! over data that was written without it (or by an index of another
//! format) first rebuilds it: [`Index::open`].

pub mod analyzer;
pub mod embed;
pub mod query;
pub mod text;
pub mod vectors;
pub mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_ring::ring::{vector_key_base, vector_key_of, TokenRange};
use quiver_ring::wire::{ErrorKind, SearchHit, ServerError};
use quiver_ring::Siblings;

use crate::storage::keys::{data_key, keyspace_start, user_key, Keyspace};
use crate::storage::{self, storage_error, Engine, Op};
use analyzer::Analyzer;
use embed::Embedder;
use query::{Match, Query};
use text::{posting_changes, Doc, Stats, TermStats};
use vectors::VectorIndex;
use writer::{Done, IndexStamp, Writer};

/// The index format: a node whose stored index has another rebuilds it.
/// 1: postings with positions and document lengths, stats. 2: vectors.
/// 3: document lengths by token, vectors written with values.
const FORMAT: u32 = 3;

/// Documents indexed per record while rebuilding.
const REBUILD_DOCS_PER_RECORD: usize = 1000;

/// The key that names the format of the index stored beside the data and
/// the embedder its vectors came from (absent: no index, or one that may
/// have missed writes).
fn marker_key() -> Vec<u8> {
    vec![Keyspace::Postings as u8, b'm']
}

/// A thread fed by a channel (the index stage, the graph's thread). It is
/// stopped by closing the channel, so it finishes what was queued, and
/// joining it: when asked, or when dropped.
pub(crate) struct Worker<T> {
    sender: std::sync::Mutex<Option<std::sync::mpsc::Sender<T>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Starts thread `name` running `body` over what is sent.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(std::sync::mpsc::Receiver<T>) + Send + 'static,
    ) -> std::io::Result<Worker<T>> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || body(receiver))?;
        Ok(Worker { sender: std::sync::Mutex::new(Some(sender)), thread: std::sync::Mutex::new(Some(thread)) })
    }
}

impl<T> Worker<T> {
    /// Queues `item`, or gives it back if the thread has stopped.
    pub fn send(&self, item: T) -> Result<(), T> {
        match crate::lock(&self.sender).as_ref() {
            Some(sender) => sender.send(item).map_err(|error| error.0),
            None => Err(item),
        }
    }

    /// Closes the channel and waits for the thread to finish.
    pub fn stop(&self) {
        crate::lock(&self.sender).take();
        if let Some(thread) = crate::lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<T> std::fmt::Debug for Worker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Worker")
    }
}

/// The marker's value for an index made by `embedder`.
fn marker(embedder: &dyn Embedder) -> Vec<u8> {
    postcard::to_stdvec(&(FORMAT, embedder.fingerprint())).expect("postcard encodes into a Vec")
}

/// The stored key a data key's index entries belong to: its own, or for a
/// vector key, its base key's.
pub(crate) fn base_of(stored: &[u8]) -> Vec<u8> {
    match user_key(stored).and_then(vector_key_base) {
        Some(base) => data_key(base),
        None => stored.to_vec(),
    }
}

/// The vector written with a key's current value, if there is one: the
/// winner of its vector key, when it was written together with the key's
/// winning value (the same stamp), is a vector of `dim` components, and the
/// value is not deleted. A later write of the key without a vector leaves
/// an older vector key behind, which then no longer counts.
pub(crate) fn supplied_vector(dim: usize, vector: Option<&Siblings>, base: Option<&Siblings>) -> Option<Vec<f32>> {
    let (vector, base) = (vector?.winner()?, base?.winner()?);
    base.value.as_ref()?;
    if vector.order() != base.order() {
        return None;
    }
    embed::unit(vectors::decode(vector.value.as_deref()?, dim)?)
}

/// Whether a user key is in one of `ranges` (`None`: every key is).
fn in_ranges(ranges: Option<&[TokenRange]>) -> impl Fn(&[u8]) -> bool + '_ {
    move |key| ranges.is_none_or(|ranges| ranges.iter().any(|range| range.holds(key)))
}

/// What the index holds of one value: its document (terms) and its vector.
#[derive(Debug, Default, PartialEq)]
pub struct Derived {
    pub doc: Option<Doc>,
    pub vector: Option<Vec<f32>>,
}

impl Derived {
    /// What a value (`None`: absent or deleted) puts in the index, with
    /// the vector written with it if there is one ([`supplied_vector`]),
    /// else its text's (the text is embedded only then).
    pub fn of(
        analyzer: &Analyzer,
        embedder: &dyn Embedder,
        value: Option<&[u8]>,
        supplied: Option<Vec<f32>>,
    ) -> Derived {
        let text = value.and_then(|v| std::str::from_utf8(v).ok());
        let vector = supplied.or_else(|| text.and_then(|text| embedder.embed(text)));
        Derived { doc: Doc::of(analyzer, value), vector }
    }

    /// These entries with the vector written with the value, if there is
    /// one ([`supplied_vector`]), in place of the text's.
    pub fn with_supplied(mut self, supplied: Option<Vec<f32>>) -> Derived {
        if supplied.is_some() {
            self.vector = supplied;
        }
        self
    }

    /// The ops that take `key`'s index entries from `before` to `self`.
    pub fn ops_from(&self, before: &Derived, key: &[u8], stamp: IndexStamp, ops: &mut Vec<Op>) {
        for (posting_key, posting) in posting_changes(key, before.doc.as_ref(), self.doc.as_ref()) {
            let value = posting.map(|p| postcard::to_stdvec(&p).expect("postcard encodes into a Vec"));
            ops.push(Op { key: posting_key, version: stamp.version(value) });
        }
        let (was, is) = (before.doc.as_ref().map(|d| d.words), self.doc.as_ref().map(|d| d.words));
        if was != is {
            let value = is.map(|words| postcard::to_stdvec(&words).expect("postcard encodes into a Vec"));
            ops.push(Op { key: text::length_key(key), version: stamp.version(value) });
        }
        if self.vector != before.vector {
            let value = self.vector.as_deref().map(vectors::encode);
            ops.push(Op { key: vectors::vector_key(key), version: stamp.version(value) });
        }
    }
}

/// A search, of any kind.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Search {
    /// Full text (BM25). `global`: weigh terms by the whole cluster's
    /// statistics, which the coordinator gathers first and passes on in
    /// `stats` (`None`: each node's own).
    Text { query: String, k: u32, matching: Match, global: bool, stats: Option<TermStats> },
    /// Values about the same things as `text` (embeddings).
    Similar { text: String, k: u32 },
    /// Values whose vectors are nearest `vector`.
    Vector { vector: Vec<f32>, k: u32 },
}

impl Search {
    /// How many hits it asks for.
    pub fn k(&self) -> u32 {
        match self {
            Search::Text { k, .. } | Search::Similar { k, .. } | Search::Vector { k, .. } => *k,
        }
    }
}

/// The indexes of one node.
#[derive(Debug)]
pub struct Index {
    engine: Arc<Engine>,
    analyzer: Arc<Analyzer>,
    embedder: Arc<dyn Embedder>,
    vectors: Arc<VectorIndex>,
    writer: Writer,
    /// The most bytes of values one search's hits may carry: past it the
    /// search stops reading values and answers `ResponseTooLarge`.
    hits_bytes_max: usize,
}

fn failed_to_start(error: std::io::Error) -> storage::Error {
    storage::Error::Failed(format!("cannot start an index thread: {error}"))
}

impl Index {
    /// Opens the index over `engine`, with vectors from `embedder`:
    /// rebuilds it first if the stored one is missing, of another format or
    /// made by another embedder; starts the index stage and the vector
    /// graph's thread.
    pub fn open(engine: Arc<Engine>, embedder: Arc<dyn Embedder>) -> storage::Result<Index> {
        let analyzer = Arc::new(Analyzer::default());
        let stored = engine.get(&marker_key())?.and_then(Siblings::into_value);
        if stored != Some(marker(embedder.as_ref())) {
            rebuild(&engine, &analyzer, embedder.as_ref())?;
        }
        let stats = text::read_stats(&engine)?;
        let vectors = Arc::new(VectorIndex::start(engine.clone(), embedder.dim()).map_err(failed_to_start)?);
        let writer = Writer::start(engine.clone(), analyzer.clone(), embedder.clone(), vectors.clone(), stats)
            .map_err(failed_to_start)?;
        let hits_bytes_max = quiver_ring::wire::FRAME_BYTES_MAX;
        Ok(Index { engine, analyzer, embedder, vectors, writer, hits_bytes_max })
    }

    /// Hits of one search carry at most `bytes` of values (what one
    /// response frame can carry); a search past it answers
    /// `ResponseTooLarge`, having read no more values than that.
    pub fn with_hits_bytes_max(mut self, bytes: usize) -> Index {
        self.hits_bytes_max = bytes;
        self
    }

    /// For a node started without indexing: forgets that the stored index
    /// (if any) is complete, since writes from now on do not update it; a
    /// later start with indexing on rebuilds it.
    pub fn forget(engine: &Engine) -> storage::Result<()> {
        if engine.get(&marker_key())?.is_some_and(|s| s.value().is_some()) {
            let stamp = IndexStamp(engine.max_hlc().successor().unwrap_or(engine.max_hlc()));
            engine.write_blocking(vec![Op { key: marker_key(), version: stamp.version(None) }])?;
        }
        Ok(())
    }

    /// Writes `ops` as one record with their index changes; `done` once
    /// durable and visible.
    pub fn write_then(&self, ops: Vec<Op>, done: Done) {
        self.writer.write_then(ops, done);
    }

    /// Runs `search` (reads the engine: call it on a reader thread).
    pub fn search(&self, search: Search) -> Result<Vec<SearchHit>, ServerError> {
        self.search_within(search, None)
    }

    /// Runs `search` over the keys in `ranges` only (`None`: every key).
    pub fn search_within(&self, search: Search, ranges: Option<&[TokenRange]>) -> Result<Vec<SearchHit>, ServerError> {
        let keep = in_ranges(ranges);
        match search {
            Search::Text { query, k, matching, stats, .. } => {
                quiver_ring::wire::check_search(&query, k)?;
                let query = Query::parse(&self.analyzer, &query, matching)?;
                let scored =
                    text::search(&self.engine, &query, k as usize, &keep, stats.as_ref()).map_err(storage_error)?;
                self.with_values(scored.into_iter().map(|s| (s.key, s.score)))
            }
            Search::Similar { text, k } => {
                quiver_ring::wire::check_search(&text, k)?;
                let vector = self.embedder.embed(&text).ok_or_else(|| {
                    let message = format!("no word of {text:?} is in the embedder's vocabulary");
                    ServerError::new(ErrorKind::BadQuery, message)
                })?;
                self.nearest(&vector, k, &keep)
            }
            Search::Vector { vector, k } => {
                quiver_ring::wire::check_vector_search(&vector, self.embedder.dim(), k)?;
                let bad = || ServerError::new(ErrorKind::BadQuery, "the query vector has no direction (all zeros)");
                self.nearest(&embed::unit(vector).ok_or_else(bad)?, k, &keep)
            }
        }
    }

    /// The `k` best documents for the full-text query `text`, with their
    /// current values.
    pub fn search_text(&self, text: &str, k: u32, matching: Match) -> Result<Vec<SearchHit>, ServerError> {
        self.search(Search::Text { query: text.to_owned(), k, matching, global: false, stats: None })
    }

    /// The statistics of the terms of the full-text query `text` over this
    /// node's keys in `ranges` (`None`: all of them): its part of a search
    /// with cluster-wide statistics.
    pub fn term_stats_within(
        &self,
        text: &str,
        matching: Match,
        ranges: Option<&[TokenRange]>,
    ) -> Result<TermStats, ServerError> {
        quiver_ring::wire::check_search(text, 1)?;
        let query = Query::parse(&self.analyzer, text, matching)?;
        text::term_stats(&self.engine, &query, ranges, &in_ranges(ranges)).map_err(storage_error)
    }

    /// The `k` values about the same things as `text` (nearest by the
    /// embedder's vectors), with their cosine similarity.
    pub fn search_similar(&self, text: &str, k: u32) -> Result<Vec<SearchHit>, ServerError> {
        self.search(Search::Similar { text: text.to_owned(), k })
    }

    /// The `k` values whose vectors are nearest `vector` (any length but
    /// zero; the index's dimension), with their cosine similarity.
    pub fn search_vector(&self, vector: Vec<f32>, k: u32) -> Result<Vec<SearchHit>, ServerError> {
        self.search(Search::Vector { vector, k })
    }

    fn nearest(&self, vector: &[f32], k: u32, keep: &dyn Fn(&[u8]) -> bool) -> Result<Vec<SearchHit>, ServerError> {
        let near = self.vectors.search(vector, k as usize, keep).map_err(storage_error)?;
        self.with_values(near.into_iter().map(|near| (near.key, f64::from(near.similarity))))
    }

    /// The hits of the keys found, best first, with each one's current
    /// value (a key deleted since its postings or vector were read is left
    /// out); `ResponseTooLarge` as soon as the values pass
    /// `hits_bytes_max`, without reading further.
    fn with_values(&self, found: impl Iterator<Item = (Vec<u8>, f64)>) -> Result<Vec<SearchHit>, ServerError> {
        let mut hits = Vec::new();
        let mut bytes = 0usize;
        for (key, score) in found {
            let Some(value) = self.engine.get(&data_key(&key)).map_err(storage_error)?.and_then(Siblings::into_value)
            else {
                continue;
            };
            bytes += key.len() + value.len();
            if bytes > self.hits_bytes_max {
                return Err(ServerError::new(
                    ErrorKind::ResponseTooLarge,
                    format!(
                        "the hits' values exceed the {} bytes one response can carry; ask for fewer (k)",
                        self.hits_bytes_max
                    ),
                ));
            }
            hits.push(SearchHit { key, score, value });
        }
        Ok(hits)
    }

    /// The analyzer documents and queries go through.
    pub fn analyzer(&self) -> &Analyzer {
        &self.analyzer
    }

    /// The embedder values and similarity queries go through.
    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// The vector index (for tests: exact search, whether built).
    pub fn vectors(&self) -> &Arc<VectorIndex> {
        &self.vectors
    }

    /// Stops the index stage once the writes queued so far are handed on,
    /// then the vector graph's thread.
    pub fn stop(&self) {
        self.writer.stop();
        self.vectors.stop();
    }
}

/// Checks that the stored index is exactly what the data makes with
/// `embedder`: every posting, every vector and the stats, as a rebuild
/// would write them. Returns what differs (at most `report_max` lines;
/// empty: they match). Holds the whole expected index in memory: a check
/// for tests and operators, not for the request path.
pub fn verify(engine: &Engine, embedder: &dyn Embedder, report_max: usize) -> storage::Result<Vec<String>> {
    if engine.get(&marker_key())?.and_then(Siblings::into_value) != Some(marker(embedder)) {
        return Ok(vec![format!(
            "no complete index here for {}: the node last ran without --index or with other word vectors",
            embedder.fingerprint()
        )]);
    }
    let analyzer = Analyzer::default();
    let mut expected = BTreeMap::new();
    let mut stats = Stats::default();
    let stamp = IndexStamp(quiver_ring::Hlc::ZERO);
    for entry in engine.scan(&keyspace_start(Keyspace::Data), Some(&keyspace_start(Keyspace::Hints))) {
        let (stored, siblings) = entry?;
        let Some(key) = user_key(&stored).filter(|key| vector_key_base(key).is_none()) else { continue };
        let derived = derive_stored(engine, &analyzer, embedder, key, &siblings)?;
        stats.replace(None, derived.doc.as_ref());
        let mut ops = Vec::new();
        derived.ops_from(&Derived::default(), key, stamp, &mut ops);
        expected.extend(ops.into_iter().filter_map(|op| Some((op.key, op.version.value?))));
    }
    let mut wrong = Vec::new();
    let stored_stats = text::read_stats(engine)?;
    if stored_stats != stats {
        wrong.push(format!("stats: stored {stored_stats:?}, the data makes {stats:?}"));
    }
    let (start, end) = (keyspace_start(Keyspace::Postings), vec![Keyspace::Vectors as u8 + 1]);
    for entry in engine.scan(&start, Some(&end)) {
        let (key, siblings) = entry?;
        let Some(value) = siblings.value() else { continue };
        if key == marker_key() || key == text::stats_key() {
            continue;
        }
        let shown = String::from_utf8_lossy(&key).into_owned();
        match expected.remove(&key) {
            Some(want) if want == value => {}
            Some(_) => wrong.push(format!("{shown} differs from what the data makes")),
            None => wrong.push(format!("{shown} has no data behind it")),
        }
    }
    for key in expected.keys() {
        wrong.push(format!("{} is missing", String::from_utf8_lossy(key)));
    }
    wrong.truncate(report_max);
    Ok(wrong)
}

/// What the index holds of the stored key `key` with versions `siblings`:
/// its value's terms, and the vector written with it or else its text's.
fn derive_stored(
    engine: &Engine,
    analyzer: &Analyzer,
    embedder: &dyn Embedder,
    key: &[u8],
    siblings: &Siblings,
) -> storage::Result<Derived> {
    let companion = engine.get(&data_key(&vector_key_of(key)))?;
    let supplied = supplied_vector(embedder.dim(), companion.as_ref(), Some(siblings));
    Ok(Derived::of(analyzer, embedder, siblings.value(), supplied))
}

/// Rebuilds the index from the data: deletes every index key, indexes
/// every key's current value, then writes the marker. A crash part way
/// leaves no marker, so the next start begins again.
fn rebuild(engine: &Engine, analyzer: &Analyzer, embedder: &dyn Embedder) -> storage::Result<()> {
    // Each record's ops above the last one's: an entry deleted in one
    // record and written again in a later one must end written.
    let mut last = engine.max_hlc();
    let mut next_stamp = move || {
        last = last.successor().unwrap_or(last);
        IndexStamp(last)
    };
    let mut ops = Vec::new();
    let mut stamp = next_stamp();
    for entry in engine.scan(&keyspace_start(Keyspace::Postings), Some(&[Keyspace::Vectors as u8 + 1])) {
        let (key, siblings) = entry?;
        if !siblings.all_tombstones() {
            ops.push(Op { key, version: stamp.version(None) });
        }
        if ops.len() >= REBUILD_DOCS_PER_RECORD * 8 {
            engine.write_blocking(std::mem::take(&mut ops))?;
        }
    }
    if !ops.is_empty() {
        engine.write_blocking(std::mem::take(&mut ops))?;
    }
    let mut stats = Stats::default();
    stamp = next_stamp();
    let (mut docs, mut data) =
        (0, engine.scan(&keyspace_start(Keyspace::Data), Some(&keyspace_start(Keyspace::Hints))));
    loop {
        let entry = data.next().transpose()?;
        if let Some((stored, siblings)) = &entry {
            if let Some(key) = user_key(stored).filter(|key| vector_key_base(key).is_none()) {
                let derived = derive_stored(engine, analyzer, embedder, key, siblings)?;
                stats.replace(None, derived.doc.as_ref());
                derived.ops_from(&Derived::default(), key, stamp, &mut ops);
                docs += 1;
            }
        }
        if entry.is_none() || docs >= REBUILD_DOCS_PER_RECORD {
            let stats_value = postcard::to_stdvec(&stats).expect("postcard encodes into a Vec");
            ops.push(Op { key: text::stats_key(), version: stamp.version(Some(stats_value)) });
            engine.write_blocking(std::mem::take(&mut ops))?;
            docs = 0;
            stamp = next_stamp();
        }
        if entry.is_none() {
            break;
        }
    }
    engine.write_blocking(vec![Op { key: marker_key(), version: stamp.version(Some(marker(embedder))) }])?;
    Ok(())
}
