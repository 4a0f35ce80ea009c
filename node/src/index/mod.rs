//! Search over the stored values: a full-text index with BM25 ranking.
//!
//! - [`analyzer`]: text to terms (Unicode words, lowercase, stop words,
//!   stemming), the same for documents and queries;
//! - [`query`]: what a user types, parsed into terms, phrases and prefixes;
//! - [`text`]: the postings' layout in the engine, and BM25 search over
//!   them;
//! - [`writer`]: the stage every data write passes through, which adds the
//!   write's index changes to its own WAL record.
//!
//! The index is derived from the data and lives in the same engine: its
//! changes are written in the same records as the values they come from,
//! so after any crash it matches the data. A node started with indexing on
//! over data that was written without it (or by an index of another
//! format) first rebuilds it: [`Index::open`].

pub mod analyzer;
pub mod query;
pub mod text;
pub mod writer;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use quiver_ring::wire::{SearchHit, ServerError};
use quiver_ring::Siblings;

use crate::storage::keys::{keyspace_start, user_key, Keyspace};
use crate::storage::{self, Engine, Op};
use analyzer::Analyzer;
use query::{Match, Query};
use text::{posting_changes, Doc, Stats};
use writer::{Done, IndexStamp, Writer};

/// The index format: a node whose stored index has another rebuilds it.
/// 1: postings with positions and document lengths, stats.
const FORMAT: u32 = 1;

/// Documents indexed per record while rebuilding.
const REBUILD_DOCS_PER_RECORD: usize = 1000;

/// The key that names the format of the index stored beside the data
/// (absent: no index, or one that may have missed writes).
fn marker_key() -> Vec<u8> {
    vec![Keyspace::Postings as u8, b'm']
}

/// The marker's value: the format.
fn format_marker() -> Vec<u8> {
    postcard::to_stdvec(&FORMAT).expect("postcard encodes into a Vec")
}

/// The indexes of one node.
#[derive(Debug)]
pub struct Index {
    engine: Arc<Engine>,
    analyzer: Arc<Analyzer>,
    writer: Writer,
}

impl Index {
    /// Opens the index over `engine`, rebuilding it first if the stored one
    /// is missing or of another format, and starts the index stage.
    pub fn open(engine: Arc<Engine>) -> storage::Result<Index> {
        let analyzer = Arc::new(Analyzer::default());
        let marker = engine.get(&marker_key())?.and_then(Siblings::into_value);
        if marker != Some(format_marker()) {
            rebuild(&engine, &analyzer)?;
        }
        let stats = text::read_stats(&engine)?;
        let writer = Writer::start(engine.clone(), analyzer.clone(), stats)
            .map_err(|error| storage::Error::Failed(format!("cannot start the index thread: {error}")))?;
        Ok(Index { engine, analyzer, writer })
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

    /// The `k` best documents for the full-text query `text`, with their
    /// current values. Reads the engine: call it on a reader thread.
    pub fn search_text(&self, text: &str, k: u32, matching: Match) -> Result<Vec<SearchHit>, ServerError> {
        quiver_ring::wire::check_search(text, k)?;
        let query = Query::parse(&self.analyzer, text, matching)?;
        let scored = text::search(&self.engine, &query, k as usize).map_err(crate::service::storage_error)?;
        let hits = text::with_values(&self.engine, scored).map_err(crate::service::storage_error)?;
        Ok(hits.into_iter().map(|(scored, value)| SearchHit { key: scored.key, score: scored.score, value }).collect())
    }

    /// The analyzer documents and queries go through.
    pub fn analyzer(&self) -> &Analyzer {
        &self.analyzer
    }

    /// Stops the index stage once the writes queued so far are handed on.
    pub fn stop(&self) {
        self.writer.stop();
    }
}

/// Checks that the stored index is exactly what the data makes: every
/// posting and the stats, as a rebuild would write them. Returns what
/// differs (at most `report_max` lines; empty: they match). Holds the whole
/// expected index in memory: a check for tests and operators, not for the
/// request path.
pub fn verify(engine: &Engine, report_max: usize) -> storage::Result<Vec<String>> {
    if engine.get(&marker_key())?.and_then(Siblings::into_value) != Some(format_marker()) {
        return Ok(vec![
            "no complete index here: the node last ran without --index (a start with it builds one)".into()
        ]);
    }
    let analyzer = Analyzer::default();
    let mut expected: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = std::collections::BTreeMap::new();
    let mut stats = Stats::default();
    for entry in engine.scan(&keyspace_start(Keyspace::Data), Some(&keyspace_start(Keyspace::Hints))) {
        let (stored, siblings) = entry?;
        let (Some(key), Some(doc)) = (user_key(&stored), Doc::of_siblings(&analyzer, Some(&siblings))) else {
            continue;
        };
        stats.replace(None, Some(&doc));
        for (posting_key, posting) in posting_changes(key, None, Some(&doc)) {
            if let Some(posting) = posting {
                expected.insert(posting_key, postcard::to_stdvec(&posting).expect("postcard encodes into a Vec"));
            }
        }
    }
    let mut wrong = Vec::new();
    let stored_stats = text::read_stats(engine)?;
    if stored_stats != stats {
        wrong.push(format!("stats: stored {stored_stats:?}, the data makes {stats:?}"));
    }
    let (start, end) = text::postings_range();
    for entry in engine.scan(&start, Some(&end)) {
        let (key, siblings) = entry?;
        let Some(value) = siblings.value() else { continue };
        match expected.remove(&key) {
            Some(want) if want == value => {}
            Some(_) => wrong.push(format!("posting {} differs from the data's", String::from_utf8_lossy(&key))),
            None => wrong.push(format!("posting {} has no data behind it", String::from_utf8_lossy(&key))),
        }
    }
    for key in expected.keys() {
        wrong.push(format!("posting {} is missing", String::from_utf8_lossy(key)));
    }
    wrong.truncate(report_max);
    Ok(wrong)
}

/// Rebuilds the index from the data: deletes every index key, indexes
/// every key's current value, then writes the marker. A crash part way
/// leaves no marker, so the next start begins again.
fn rebuild(engine: &Engine, analyzer: &Analyzer) -> storage::Result<()> {
    // Each record's ops above the last one's: a posting deleted in one
    // record and written again in a later one must end written.
    let mut last = engine.max_hlc();
    let mut next_stamp = move || {
        last = last.successor().unwrap_or(last);
        IndexStamp(last)
    };
    let index_start = keyspace_start(Keyspace::Postings);
    let index_end = vec![Keyspace::Postings as u8 + 1];
    let mut ops = Vec::new();
    let mut stamp = next_stamp();
    for entry in engine.scan(&index_start, Some(&index_end)) {
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
            let doc = Doc::of_siblings(analyzer, Some(siblings));
            if let (Some(key), Some(doc)) = (user_key(stored), doc.as_ref()) {
                stats.replace(None, Some(doc));
                for (posting_key, posting) in posting_changes(key, None, Some(doc)) {
                    let value = posting.map(|p| postcard::to_stdvec(&p).expect("postcard encodes into a Vec"));
                    ops.push(Op { key: posting_key, version: stamp.version(value) });
                }
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
    engine.write_blocking(vec![Op { key: marker_key(), version: stamp.version(Some(format_marker())) }])?;
    Ok(())
}
