//! The analyzer: how a value's text becomes the terms the full-text index
//! holds, and how a query's text becomes the terms it looks for. Both go
//! through the same [`terms`], so a word is found exactly when it was
//! indexed.
//!
//! Text is split into words by Unicode's word boundaries (UAX #29: "don't"
//! is one word, "e-mail" two, ideographs one each), lowercased, stripped of
//! [`STOP_WORDS`], and stemmed with the Snowball English stemmer ("running"
//! and "runs" are both `run`). Every word, stop word or not, takes a
//! position, so a phrase matches only words that stood at the same
//! distances in the text.

use rust_stemmers::{Algorithm, Stemmer};
use unicode_segmentation::UnicodeSegmentation;

/// Words too common to say anything about a document, left out of the
/// index and out of queries (they still count for positions).
pub const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with",
];

/// A longer word is left out: it is an identifier or an encoded blob, not
/// something anyone searches for, and it would make the index's keys long.
pub const TERM_BYTES_MAX: usize = 64;

/// Words of one text taken into account; the rest of a longer text is not
/// indexed (a value is at most a few MiB, so this is rarely reached).
pub const WORDS_MAX: usize = 1 << 20;

/// One indexed word: its term and its position among the text's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub term: String,
    pub position: u32,
}

/// Turns text into terms.
pub struct Analyzer {
    stemmer: Stemmer,
}

impl std::fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Analyzer(english)")
    }
}

impl Default for Analyzer {
    fn default() -> Analyzer {
        Analyzer { stemmer: Stemmer::create(Algorithm::English) }
    }
}

impl Analyzer {
    /// The lowercased words of `text`, stop words included, in order.
    pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
        text.unicode_words().take(WORDS_MAX).map(str::to_lowercase)
    }

    /// The terms of `text` with their positions: what is indexed, and what
    /// a query's words are looked up as.
    pub fn terms(&self, text: &str) -> Vec<Token> {
        Analyzer::words(text)
            .enumerate()
            .filter_map(|(position, word)| {
                let term = self.term(&word)?;
                Some(Token { term, position: position as u32 })
            })
            .collect()
    }

    /// The term of one lowercased word, `None` for a stop word or a word
    /// too long to index.
    pub fn term(&self, word: &str) -> Option<String> {
        if is_stop_word(word) {
            return None;
        }
        let term = self.stemmer.stem(word).into_owned();
        (!term.is_empty() && term.len() <= TERM_BYTES_MAX && !term.contains('\0')).then_some(term)
    }
}

/// Whether `word` (lowercased) is one of the [`STOP_WORDS`].
pub fn is_stop_word(word: &str) -> bool {
    STOP_WORDS.binary_search(&word).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(text: &str) -> Vec<(String, u32)> {
        Analyzer::default().terms(text).into_iter().map(|t| (t.term, t.position)).collect()
    }

    #[test]
    fn stop_words_are_sorted_for_the_binary_search() {
        assert!(STOP_WORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn words_are_lowercased_stemmed_and_keep_their_positions() {
        assert_eq!(
            terms("The King of France was RUNNING, and runs!"),
            vec![("king".into(), 1), ("franc".into(), 3), ("run".into(), 5), ("run".into(), 7)]
        );
    }

    #[test]
    fn unicode_words_and_punctuation() {
        assert_eq!(terms("Straße café naïve"), vec![("straße".into(), 0), ("café".into(), 1), ("naïv".into(), 2)]);
        assert_eq!(terms("e-mail don't"), vec![("e".into(), 0), ("mail".into(), 1), ("don't".into(), 2)]);
        assert_eq!(terms("... !!! ---"), vec![]);
        assert_eq!(terms("東京"), vec![("東".into(), 0), ("京".into(), 1)]);
    }

    #[test]
    fn overlong_words_are_left_out() {
        let long = "x".repeat(TERM_BYTES_MAX + 1);
        assert_eq!(terms(&format!("{long} word")), vec![("word".into(), 1)]);
    }
}
