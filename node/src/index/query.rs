//! Full-text queries: what a user types, parsed into clauses.
//!
//! - `word`: documents holding the word (analyzed as the index is: `Kings`
//!   finds `king`);
//! - `"two words"`: the words as a phrase, at the same distances as in the
//!   query (stop words keep their place: `"king of france"` matches "king
//!   of France" and "king in France", not "king France");
//! - `pre*`: documents holding a term that starts with `pre` (the prefix is
//!   lowercased, not stemmed; terms are stemmed, so `runn*` finds nothing
//!   that `run*` would not).
//!
//! A query matches a document when any clause does ([`Match::Any`], the
//! default) or every clause does ([`Match::All`]); its score is the sum of
//! the matching clauses' BM25 scores.

use quiver_ring::wire::{ErrorKind, ServerError};

use super::analyzer::Analyzer;

/// Clauses of one query at most.
pub const CLAUSES_MAX: usize = 64;

/// Whether a document must match every clause or one is enough.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Match {
    #[default]
    Any,
    All,
}

/// One part of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clause {
    Term(String),
    Prefix(String),
    /// Terms with their offsets from the phrase's first word.
    Phrase(Vec<(String, u32)>),
}

/// A parsed query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub clauses: Vec<Clause>,
    pub matching: Match,
}

fn bad(message: String) -> ServerError {
    ServerError::new(ErrorKind::BadQuery, message)
}

impl Query {
    /// Parses `text` (already checked by
    /// [`check_search`](quiver_ring::wire::check_search)), or says what
    /// is wrong with it.
    pub fn parse(analyzer: &Analyzer, text: &str, matching: Match) -> Result<Query, ServerError> {
        if text.matches('"').count() % 2 == 1 {
            return Err(bad("the query has a quote that is not closed".into()));
        }
        let mut clauses = Vec::new();
        // Outside quotes at even indexes, inside at odd ones.
        for (i, part) in text.split('"').enumerate() {
            if i % 2 == 1 {
                clauses.extend(phrase(analyzer, part));
                continue;
            }
            for chunk in part.split_whitespace() {
                match chunk.strip_suffix('*') {
                    Some(stem) => {
                        let words: Vec<String> = Analyzer::words(stem).collect();
                        let Some((last, before)) = words.split_last() else {
                            return Err(bad(format!("the prefix {chunk:?} has no letters before its '*'")));
                        };
                        clauses.extend(before.iter().filter_map(|w| analyzer.term(w)).map(Clause::Term));
                        clauses.push(Clause::Prefix(last.clone()));
                    }
                    None => clauses.extend(analyzer.terms(chunk).into_iter().map(|t| Clause::Term(t.term))),
                }
            }
        }
        if clauses.is_empty() {
            return Err(bad("the query has no word to search for (it is empty, or only stop words)".into()));
        }
        if clauses.len() > CLAUSES_MAX {
            return Err(bad(format!("the query has {} words or phrases, more than {CLAUSES_MAX}", clauses.len())));
        }
        Ok(Query { clauses, matching })
    }
}

/// The clause of a quoted phrase: none when it has no term, a plain term
/// when it has one.
fn phrase(analyzer: &Analyzer, text: &str) -> Option<Clause> {
    let tokens = analyzer.terms(text);
    let first = tokens.first()?.position;
    if tokens.len() == 1 {
        return tokens.into_iter().next().map(|t| Clause::Term(t.term));
    }
    Some(Clause::Phrase(tokens.into_iter().map(|t| (t.term, t.position - first)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::wire::check_search;

    fn parse(text: &str) -> Result<Vec<Clause>, ErrorKind> {
        check_search(text, 10)
            .and_then(|()| Query::parse(&Analyzer::default(), text, Match::Any))
            .map(|q| q.clauses)
            .map_err(|e| e.kind)
    }

    fn term(t: &str) -> Clause {
        Clause::Term(t.into())
    }

    #[test]
    fn words_phrases_and_prefixes() {
        assert_eq!(parse("Kings of  France").unwrap(), vec![term("king"), term("franc")]);
        assert_eq!(
            parse("\"king of france\" pari*").unwrap(),
            vec![Clause::Phrase(vec![("king".into(), 0), ("franc".into(), 2)]), Clause::Prefix("pari".into())]
        );
        assert_eq!(parse("\"the Kings\"").unwrap(), vec![term("king")], "a phrase of one term is a term");
        assert_eq!(parse("Runn*").unwrap(), vec![Clause::Prefix("runn".into())], "a prefix is not stemmed");
    }

    #[test]
    fn bad_queries_say_why() {
        for text in ["", "   ", "the of a", "\"the\"", "*", "\"king", &"word ".repeat(100)] {
            assert_eq!(parse(text), Err(ErrorKind::BadQuery), "{text:?}");
        }
        assert_eq!(parse(&"w".repeat(quiver_ring::wire::QUERY_BYTES_MAX + 1)), Err(ErrorKind::BadQuery));
        assert!(check_search("w", 0).is_err() && check_search("w", quiver_ring::wire::SEARCH_K_MAX + 1).is_err());
    }
}
