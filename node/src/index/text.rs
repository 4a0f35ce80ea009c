//! The full-text index: postings kept in the engine's postings keyspace,
//! and BM25 ranking over them.
//!
//! ```text
//! posting: 0x03 | 'p' | term | 0x00 | user key  ->  postcard(Posting { words, positions })
//! stats:   0x03 | 's'                           ->  postcard(Stats { docs, words })
//! length:  0x03 | 'd' | token (u64, BE) | user key  ->  postcard(u32 terms)
//! ```
//!
//! A document is a key's current value (what `get` returns), when it is
//! UTF-8 text with at least one term. It has one posting per distinct
//! term, holding the term's positions in it and the document's length in
//! terms (BM25 needs it for every hit; keeping it in the posting saves a
//! read per hit). A term's postings are one contiguous range of keys, in
//! key order, so a query reads each of its terms with one scan, and a
//! prefix query reads every term that starts with the prefix the same way.
//! The stats key holds the number of documents and their total length; each
//! document's length is also kept by its key's ring token, so that the
//! documents of any token range can be counted (cluster-wide statistics,
//! [`TermStats`]).
//!
//! The postings of a key change in the same WAL record as its value (see
//! [`super::writer`]), so after any crash they match the data.
//!
//! Postings are read back from disk: nothing here may panic on bytes that
//! do not decode (a posting that does not is skipped).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap};

use quiver_ring::Siblings;
use serde::{Deserialize, Serialize};

use super::analyzer::Analyzer;
use super::query::{Clause, Match, Query};
use crate::storage::keys::Keyspace;
use crate::storage::{Engine, Result};
use quiver_ring::ring::{key_token, TokenRange};

/// BM25's term-frequency saturation.
pub const K1: f64 = 1.2;
/// BM25's document-length normalisation.
pub const B: f64 = 0.75;

/// Terms a prefix stands for at most: the first ones in byte order (as
/// Elasticsearch's `max_expansions`), so a one-letter prefix cannot make a
/// query read the whole index.
pub const PREFIX_TERMS_MAX: usize = 128;

const POSTING: u8 = b'p';
const STATS: u8 = b's';
const LENGTH: u8 = b'd';

/// What a posting holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    /// The document's length in terms.
    pub words: u32,
    /// Where the term stands in the document (word positions).
    pub positions: Vec<u32>,
}

/// Totals over every document, for BM25.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub docs: u64,
    /// The documents' lengths in terms, added up.
    pub words: u64,
}

impl Stats {
    /// The average document length (1 for an empty index, which has no
    /// document to score anyway).
    pub fn average_words(&self) -> f64 {
        if self.docs == 0 {
            1.0
        } else {
            self.words as f64 / self.docs as f64
        }
    }

    /// These totals with `before` taken out and `after` put in.
    pub fn replace(&mut self, before: Option<&Doc>, after: Option<&Doc>) {
        if let Some(doc) = before {
            self.docs = self.docs.saturating_sub(1);
            self.words = self.words.saturating_sub(u64::from(doc.words));
        }
        if let Some(doc) = after {
            self.docs += 1;
            self.words += u64::from(doc.words);
        }
    }
}

/// The key of a document's length, in terms: ordered by the key's ring
/// token, so the documents of a token range are one contiguous scan.
pub fn length_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(10 + key.len());
    stored.extend_from_slice(&[Keyspace::Postings as u8, LENGTH]);
    stored.extend_from_slice(&key_token(key).to_be_bytes());
    stored.extend_from_slice(key);
    stored
}

/// The first length key at token `token` (past the last token: the end of
/// the length keys).
fn length_bound(token: u128) -> Vec<u8> {
    match u64::try_from(token) {
        Ok(token) => [&[Keyspace::Postings as u8, LENGTH][..], &token.to_be_bytes()].concat(),
        Err(_) => vec![Keyspace::Postings as u8, LENGTH + 1],
    }
}

/// The documents and words of the documents whose tokens are in `ranges`.
pub fn range_stats(engine: &Engine, ranges: &[TokenRange]) -> Result<Stats> {
    let mut stats = Stats::default();
    for range in ranges {
        let (after, upto) = (u128::from(range.after), u128::from(range.upto));
        // Token bounds, start inclusive and end exclusive: a range that
        // wraps past the last token is two scans.
        let spans = match after.cmp(&upto) {
            std::cmp::Ordering::Less => vec![(after + 1, upto + 1)],
            std::cmp::Ordering::Greater => vec![(after + 1, 1 << 64), (0, upto + 1)],
            std::cmp::Ordering::Equal => vec![(0, 1 << 64)],
        };
        for (start, end) in spans {
            for entry in engine.scan(&length_bound(start), Some(&length_bound(end))) {
                let (_, siblings) = entry?;
                let Some(words) = siblings.value().and_then(|v| postcard::from_bytes::<u32>(v).ok()) else { continue };
                stats.docs += 1;
                stats.words += u64::from(words);
            }
        }
    }
    Ok(stats)
}

/// The key of the stats.
pub fn stats_key() -> Vec<u8> {
    vec![Keyspace::Postings as u8, STATS]
}

/// The key of `term`'s posting for the user key `key`.
pub fn posting_key(term: &str, key: &[u8]) -> Vec<u8> {
    let mut stored = term_start(term);
    stored.extend_from_slice(key);
    stored
}

/// The first key of `term`'s postings.
fn term_start(term: &str) -> Vec<u8> {
    let mut start = Vec::with_capacity(3 + term.len());
    start.extend_from_slice(&[Keyspace::Postings as u8, POSTING]);
    start.extend_from_slice(term.as_bytes());
    start.push(0);
    start
}

/// The range of the postings of every term that starts with `prefix`
/// (empty: of every term).
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![Keyspace::Postings as u8, POSTING];
    start.extend_from_slice(prefix.as_bytes());
    // Past every key that starts with `start`: a term is UTF-8, which has
    // no 0xff byte, and the prefix's last byte is followed by more term
    // bytes or the 0x00 that ends the term.
    let mut end = start.clone();
    end.push(0xff);
    (start, end)
}

/// The range of every posting.
pub fn postings_range() -> (Vec<u8>, Vec<u8>) {
    prefix_range("")
}

/// The term and user key of a posting key.
fn split_posting_key(stored: &[u8]) -> Option<(&str, &[u8])> {
    let rest = stored.strip_prefix(&[Keyspace::Postings as u8, POSTING])?;
    let end = rest.iter().position(|&b| b == 0)?;
    let (term, key) = rest.split_at(end);
    Some((std::str::from_utf8(term).ok()?, key.get(1..)?))
}

/// One document's terms: each distinct term's positions, and its length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Doc {
    pub terms: BTreeMap<String, Vec<u32>>,
    pub words: u32,
}

impl Doc {
    /// The document of a value: `None` when there is none to index
    /// (deleted, not UTF-8, or no term in it).
    pub fn of(analyzer: &Analyzer, value: Option<&[u8]>) -> Option<Doc> {
        let text = std::str::from_utf8(value?).ok()?;
        let mut doc = Doc::default();
        for token in analyzer.terms(text) {
            doc.terms.entry(token.term).or_default().push(token.position);
            doc.words += 1;
        }
        (doc.words > 0).then_some(doc)
    }

    /// The document of a key's versions (its winning value's).
    pub fn of_siblings(analyzer: &Analyzer, siblings: Option<&Siblings>) -> Option<Doc> {
        Doc::of(analyzer, siblings.and_then(Siblings::value))
    }
}

/// The posting keys to write for `key` going from `before` to `after`:
/// `(posting key, Some(posting))` to put, `(posting key, None)` to delete.
/// Postings that stay the same are left alone.
pub fn posting_changes(key: &[u8], before: Option<&Doc>, after: Option<&Doc>) -> Vec<(Vec<u8>, Option<Posting>)> {
    let mut changes = Vec::new();
    let empty = Doc::default();
    let (before, after) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    for term in before.terms.keys() {
        if !after.terms.contains_key(term) {
            changes.push((posting_key(term, key), None));
        }
    }
    for (term, positions) in &after.terms {
        let same = before.words == after.words && before.terms.get(term) == Some(positions);
        if !same {
            changes.push((posting_key(term, key), Some(Posting { words: after.words, positions: positions.clone() })));
        }
    }
    changes
}

/// The stats as the engine holds them.
pub fn read_stats(engine: &Engine) -> Result<Stats> {
    let stored = engine.get(&stats_key())?;
    Ok(stored.and_then(|s| s.value().and_then(|bytes| postcard::from_bytes(bytes).ok())).unwrap_or_default())
}

/// The BM25 weight of a term in `docs` documents, `df` of which hold it.
pub fn idf(docs: u64, df: u64) -> f64 {
    let (n, df) = (docs as f64, df as f64);
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// A term's BM25 score in one document.
pub fn bm25(idf: f64, tf: u32, words: u32, average_words: f64) -> f64 {
    let tf = f64::from(tf);
    let norm = 1.0 - B + B * f64::from(words) / average_words;
    idf * tf * (K1 + 1.0) / (tf + K1 * norm)
}

/// One term's postings: user key and posting, in key order.
type Postings = Vec<(Vec<u8>, Posting)>;

/// Every live posting in `start..end`, grouped by term.
fn postings_in(engine: &Engine, start: &[u8], end: &[u8], terms_max: usize) -> Result<Vec<(String, Postings)>> {
    let mut terms: Vec<(String, Postings)> = Vec::new();
    for entry in engine.scan(start, Some(end)) {
        let (stored, siblings) = entry?;
        let Some(bytes) = siblings.value() else { continue };
        let (Some((term, key)), Ok(posting)) = (split_posting_key(&stored), postcard::from_bytes::<Posting>(bytes))
        else {
            continue;
        };
        if terms.last().is_none_or(|(last, _)| last != term) {
            if terms.len() == terms_max {
                break;
            }
            terms.push((term.to_owned(), Vec::new()));
        }
        if let Some((_, postings)) = terms.last_mut() {
            postings.push((key.to_vec(), posting));
        }
    }
    Ok(terms)
}

/// The postings of one term.
fn term_postings(engine: &Engine, term: &str) -> Result<Postings> {
    let start = term_start(term);
    let mut end = start.clone();
    if let Some(last) = end.last_mut() {
        *last = 1;
    }
    Ok(postings_in(engine, &start, &end, 1)?.pop().map(|(_, postings)| postings).unwrap_or_default())
}

/// A document a query found, with its score.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub key: Vec<u8>,
    pub score: f64,
}

/// The postings a clause reads, by term: a term's, a prefix's terms', or
/// a phrase's terms' (with the documents where the phrase stands).
struct ClausePostings {
    terms: Vec<(String, Postings)>,
    /// For a phrase: the documents that hold it (others score nothing).
    phrase: Option<HashMap<Vec<u8>, ()>>,
}

fn clause_postings(engine: &Engine, clause: &Clause) -> Result<ClausePostings> {
    Ok(match clause {
        Clause::Term(term) => {
            ClausePostings { terms: vec![(term.clone(), term_postings(engine, term)?)], phrase: None }
        }
        Clause::Prefix(prefix) => {
            let (start, end) = prefix_range(prefix);
            ClausePostings { terms: postings_in(engine, &start, &end, PREFIX_TERMS_MAX)?, phrase: None }
        }
        Clause::Phrase(words) => {
            let postings: Vec<(u32, Postings)> = words
                .iter()
                .map(|(term, offset)| Ok((*offset, term_postings(engine, term)?)))
                .collect::<Result<_>>()?;
            let matched = phrase_matches(&postings);
            let terms = words.iter().map(|(term, _)| term.clone()).zip(postings.into_iter().map(|(_, p)| p)).collect();
            ClausePostings { terms, phrase: Some(matched) }
        }
    })
}

/// The statistics BM25 weighs terms by: this node's own (`df` empty), or
/// the whole cluster's, gathered from every node for the query's terms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TermStats {
    pub docs: u64,
    pub words: u64,
    /// Documents holding each term (terms not here: counted locally).
    pub df: BTreeMap<String, u64>,
}

impl From<Stats> for TermStats {
    /// Totals alone: every term's document count is counted locally.
    fn from(totals: Stats) -> TermStats {
        TermStats { docs: totals.docs, words: totals.words, df: BTreeMap::new() }
    }
}

impl TermStats {
    /// Adds another node's statistics (over other keys) to these.
    pub fn add(&mut self, other: TermStats) {
        self.docs += other.docs;
        self.words += other.words;
        for (term, df) in other.df {
            *self.df.entry(term).or_default() += df;
        }
    }
}

/// The statistics of `query`'s terms over the documents `keep` accepts,
/// which are those of the token `ranges` (`None`: every document here).
pub fn term_stats(
    engine: &Engine,
    query: &Query,
    ranges: Option<&[TokenRange]>,
    keep: &dyn Fn(&[u8]) -> bool,
) -> Result<TermStats> {
    let totals = match ranges {
        Some(ranges) => range_stats(engine, ranges)?,
        None => read_stats(engine)?,
    };
    let mut stats = TermStats::from(totals);
    for clause in &query.clauses {
        for (term, postings) in clause_postings(engine, clause)?.terms {
            let df = postings.iter().filter(|(key, _)| keep(key)).count() as u64;
            stats.df.insert(term, df);
        }
    }
    Ok(stats)
}

/// The scores one clause gives the documents it matches.
fn clause_scores(engine: &Engine, clause: &Clause, stats: &TermStats) -> Result<HashMap<Vec<u8>, f64>> {
    let average = Stats { docs: stats.docs, words: stats.words }.average_words();
    let mut scores: HashMap<Vec<u8>, f64> = HashMap::new();
    let ClausePostings { terms, phrase } = clause_postings(engine, clause)?;
    for (term, postings) in &terms {
        let df = stats.df.get(term).copied().unwrap_or(postings.len() as u64);
        let weight = idf(stats.docs, df);
        for (key, posting) in postings {
            if phrase.as_ref().is_none_or(|matched| matched.contains_key(key)) {
                *scores.entry(key.clone()).or_default() +=
                    bm25(weight, posting.positions.len() as u32, posting.words, average);
            }
        }
    }
    Ok(scores)
}

/// The documents where every term stands at its offset from a common
/// start.
fn phrase_matches(terms: &[(u32, Postings)]) -> HashMap<Vec<u8>, ()> {
    let Some(((first_offset, first), rest)) = terms.split_first() else { return HashMap::new() };
    let lookups: Vec<(u32, HashMap<&[u8], &Posting>)> = rest
        .iter()
        .map(|(offset, postings)| (*offset, postings.iter().map(|(k, p)| (k.as_slice(), p)).collect()))
        .collect();
    let mut matched = HashMap::new();
    'docs: for (key, posting) in first {
        let others: Option<Vec<(u32, &Posting)>> =
            lookups.iter().map(|(offset, map)| map.get(key.as_slice()).map(|p| (*offset, *p))).collect();
        let Some(others) = others else { continue };
        for &position in &posting.positions {
            let Some(start) = position.checked_sub(*first_offset) else { continue };
            let all = others.iter().all(|(offset, p)| p.positions.binary_search(&(start + offset)).is_ok());
            if all {
                matched.insert(key.clone(), ());
                continue 'docs;
            }
        }
    }
    matched
}

/// The `k` best documents for `query` among the keys `keep` accepts, best
/// first (ties by key). Terms are weighed by `stats` if given (the
/// cluster's), else by this node's own statistics over all its documents.
pub fn search(
    engine: &Engine,
    query: &Query,
    k: usize,
    keep: &dyn Fn(&[u8]) -> bool,
    stats: Option<&TermStats>,
) -> Result<Vec<Scored>> {
    let stats = match stats {
        Some(stats) => stats.clone(),
        None => TermStats::from(read_stats(engine)?),
    };
    let mut total: HashMap<Vec<u8>, (f64, usize)> = HashMap::new();
    for clause in &query.clauses {
        for (key, score) in clause_scores(engine, clause, &stats)? {
            let entry = total.entry(key).or_default();
            entry.0 += score;
            entry.1 += 1;
        }
    }
    let needed = match query.matching {
        Match::Any => 1,
        Match::All => query.clauses.len(),
    };
    let mut scored: Vec<Scored> = total
        .into_iter()
        .filter(|(key, (_, clauses))| *clauses >= needed && keep(key))
        .map(|(key, (score, _))| Scored { key, score })
        .collect();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.key.cmp(&b.key)));
    scored.truncate(k);
    Ok(scored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posting_keys_split_back_and_sort_by_term_then_key() {
        let a = posting_key("king", b"k1");
        assert_eq!(split_posting_key(&a), Some(("king", &b"k1"[..])));
        assert!(
            posting_key("king", b"\xff") < posting_key("kinga", b"\x00"),
            "a term's postings end before the next term"
        );
        let (start, end) = prefix_range("kin");
        assert!(start <= a && a < end);
        assert!(posting_key("kio", b"") >= end);
        assert_eq!(split_posting_key(&stats_key()), None);
    }

    #[test]
    fn only_changed_postings_are_written() {
        let analyzer = Analyzer::default();
        let doc = |text: &str| Doc::of(&analyzer, Some(text.as_bytes()));
        let before = doc("red apple");
        let after = doc("green apple");
        let changes = posting_changes(b"k", before.as_ref(), after.as_ref());
        let keys: Vec<_> =
            changes.iter().map(|(k, p)| (split_posting_key(k).unwrap().0.to_owned(), p.is_some())).collect();
        assert_eq!(keys, vec![("red".into(), false), ("green".into(), true)], "apple stays at position 1, length 2");
        assert!(posting_changes(b"k", after.as_ref(), after.as_ref()).is_empty());
        let deleted = posting_changes(b"k", after.as_ref(), None);
        assert_eq!(deleted.len(), 2);
        assert!(deleted.iter().all(|(_, p)| p.is_none()));
        assert_eq!(Doc::of(&analyzer, Some(b"\xff\xfe")), None, "not UTF-8");
        assert_eq!(Doc::of(&analyzer, Some(b"the of")), None, "stop words only");
    }

    #[test]
    fn bm25_follows_its_formula() {
        // One document of average length holding the term once, in an
        // index of 10 where 2 hold it: idf = ln(1 + 8.5 / 2.5).
        let weight = idf(10, 2);
        assert!((weight - (1.0f64 + 8.5 / 2.5).ln()).abs() < 1e-12);
        assert!((bm25(weight, 1, 5, 5.0) - weight * 2.2 / 2.2).abs() < 1e-12);
        assert!(bm25(weight, 2, 5, 5.0) > bm25(weight, 1, 5, 5.0), "more occurrences score higher");
        assert!(bm25(weight, 1, 10, 5.0) < bm25(weight, 1, 5, 5.0), "longer documents score lower");
    }
}
