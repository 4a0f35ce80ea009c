//! Embeddings: a value's text as one vector, so that values about the same
//! things lie close together.
//!
//! [`Embedder`] is the seam; [`WordVectors`] the default: the mean of the
//! unit-length vectors of the text's words (lowercased, stop words left
//! out, words it does not know skipped), scaled to unit length. Word
//! vectors come from the GloVe file shipped in `node/data` (see its
//! README: 30,000 words, 50 dimensions, 8-bit) or from any GloVe, word2vec
//! or fastText file in text form.
//!
//! Word-vector files are read from disk: nothing here panics on bytes that
//! do not parse (the file is refused with the reason).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use super::analyzer::{is_stop_word, Analyzer};

/// The word vectors shipped with the node.
const SHIPPED: &[u8] = include_bytes!("../../data/glove-6b-50d-30k.qvec");
const QVEC_MAGIC: &[u8; 8] = b"QVEC\x00\x00\x00\x01";

/// Most dimensions a vector may have.
pub const DIM_MAX: usize = 4096;

/// Text to vectors.
pub trait Embedder: Send + Sync + std::fmt::Debug {
    /// The vectors' dimension.
    fn dim(&self) -> usize;
    /// The unit-length vector of `text`; `None` when nothing in it is known.
    fn embed(&self, text: &str) -> Option<Vec<f32>>;
    /// Names the embedder and its data: stored vectors made by another are
    /// made again.
    fn fingerprint(&self) -> String;
}

/// `vector` scaled to unit length; `None` for a zero (or not finite) one.
pub fn unit(mut vector: Vec<f32>) -> Option<Vec<f32>> {
    let norm = vector.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return None;
    }
    for x in &mut vector {
        *x = (f64::from(*x) / norm) as f32;
    }
    Some(vector)
}

/// Word vectors, each of unit length.
pub struct WordVectors {
    dim: usize,
    words: HashMap<String, usize>,
    /// The words in the order they were read (word `i` is `order[i]`).
    order: Vec<String>,
    /// Word `i`'s vector is `vectors[i * dim..][..dim]`.
    vectors: Vec<f32>,
    /// The file's name.
    name: String,
}

impl std::fmt::Debug for WordVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WordVectors({}, {} words of {} dimensions)", self.name, self.words.len(), self.dim)
    }
}

impl WordVectors {
    /// The vectors shipped with the node.
    pub fn shipped() -> Result<WordVectors, String> {
        WordVectors::from_qvec(SHIPPED, "glove-6b-50d-30k")
    }

    /// Vectors in the shipped format (see `node/data/make_word_vectors.py`).
    pub fn from_qvec(bytes: &[u8], name: &str) -> Result<WordVectors, String> {
        let bad = |what: &str| format!("word vectors {name}: {what}");
        let (body, crc) = bytes.split_last_chunk::<4>().ok_or_else(|| bad("too short"))?;
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err(bad("checksum mismatch"));
        }
        let mut at = body.strip_prefix(QVEC_MAGIC).ok_or_else(|| bad("not a word-vector file"))?;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let (head, rest) = at.split_at_checked(n).ok_or_else(|| bad("truncated"))?;
            at = rest;
            Ok(head)
        };
        let u32_at = |b: &[u8]| b.try_into().map(u32::from_le_bytes).map_err(|_| bad("truncated"));
        let dim = u32_at(take(4)?)? as usize;
        let count = u32_at(take(4)?)? as usize;
        if dim == 0 || dim > DIM_MAX {
            return Err(bad(&format!("{dim} dimensions")));
        }
        let mut vectors = WordVectors::empty(dim, name, count);
        for _ in 0..count {
            let len = usize::from(*take(1)?.first().ok_or_else(|| bad("truncated"))?);
            let word = std::str::from_utf8(take(len)?).map_err(|_| bad("a word that is not UTF-8"))?.to_owned();
            let scale = f32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("truncated"))?);
            let vector = take(dim)?.iter().map(|&q| f32::from(q as i8) * scale).collect();
            vectors.add(word, vector);
        }
        Ok(vectors)
    }

    /// Vectors from a text file: GloVe (`word x1 x2 ...` per line), or
    /// word2vec or fastText text (the same after a `count dim` line).
    pub fn from_text_file(path: &Path) -> Result<WordVectors, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = path.file_name().map_or_else(|| "vectors".into(), |n| n.to_string_lossy().into_owned());
        let mut vectors: Option<WordVectors> = None;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let bad = |what: &str| format!("{}, line {}: {what}", path.display(), n + 1);
            let mut fields = line.split_whitespace();
            let Some(word) = fields.next() else { continue };
            let numbers: Vec<f32> =
                fields.map(str::parse).collect::<Result<_, _>>().map_err(|_| bad("not a number"))?;
            if n == 0 && numbers.len() == 1 && word.parse::<u64>().is_ok() {
                continue; // word2vec and fastText: "count dim"
            }
            let into = vectors.get_or_insert_with(|| WordVectors::empty(numbers.len(), &name, 0));
            if numbers.len() != into.dim || into.dim == 0 || into.dim > DIM_MAX {
                return Err(bad(&format!("{} numbers, expected {}", numbers.len(), into.dim)));
            }
            into.add(word.to_lowercase(), numbers);
        }
        vectors.filter(|v| !v.words.is_empty()).ok_or_else(|| format!("{}: no word vectors in it", path.display()))
    }

    fn empty(dim: usize, name: &str, count: usize) -> WordVectors {
        WordVectors {
            dim,
            words: HashMap::with_capacity(count),
            order: Vec::with_capacity(count),
            vectors: Vec::with_capacity(count * dim),
            name: name.to_owned(),
        }
    }

    /// Adds a word (the first vector of a word given twice stays).
    fn add(&mut self, word: String, vector: Vec<f32>) {
        let Some(vector) = unit(vector) else { return };
        let next = self.words.len();
        if let std::collections::hash_map::Entry::Vacant(slot) = self.words.entry(word.clone()) {
            slot.insert(next);
            self.order.push(word);
            self.vectors.extend_from_slice(&vector);
        }
    }

    /// The unit vector of `word`, if known.
    pub fn word(&self, word: &str) -> Option<&[f32]> {
        let i = *self.words.get(word)?;
        self.vectors.get(i * self.dim..(i + 1) * self.dim)
    }

    /// The `i`-th word of the file (the shipped file is in frequency
    /// order: the most frequent first).
    pub fn word_at(&self, i: usize) -> Option<&str> {
        self.order.get(i).map(String::as_str)
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there is no word.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

impl Embedder for WordVectors {
    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str) -> Option<Vec<f32>> {
        let mut sum = vec![0f32; self.dim];
        let mut known = 0;
        for word in Analyzer::words(text) {
            if is_stop_word(&word) {
                continue;
            }
            if let Some(vector) = self.word(&word) {
                for (s, x) in sum.iter_mut().zip(vector) {
                    *s += x;
                }
                known += 1;
            }
        }
        (known > 0).then_some(()).and_then(|()| unit(sum))
    }

    fn fingerprint(&self) -> String {
        format!("word vectors {}: {} words, {} dimensions", self.name, self.words.len(), self.dim)
    }
}

/// Cosine similarity of two unit vectors.
pub fn similarity(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_vectors_load_and_know_related_words() {
        let vectors = WordVectors::shipped().unwrap();
        assert_eq!((vectors.len(), vectors.dim()), (30_000, 50));
        let near = |a: &str, b: &str| similarity(vectors.word(a).unwrap(), vectors.word(b).unwrap());
        assert!(near("king", "queen") > near("king", "banana"));
        assert!(near("paris", "france") > near("paris", "guitar"));
        let text = vectors.embed("The King and the Queen").unwrap();
        assert!((similarity(&text, &text) - 1.0).abs() < 1e-5, "unit length");
        assert_eq!(vectors.embed("the of and"), None, "stop words only");
        assert_eq!(vectors.embed("qwzxv"), None, "no known word");
    }

    #[test]
    fn damaged_vector_files_are_refused_with_the_reason() {
        let mut bytes = SHIPPED.to_vec();
        bytes[100] ^= 1;
        assert!(WordVectors::from_qvec(&bytes, "x").unwrap_err().contains("checksum"));
        assert!(WordVectors::from_qvec(&SHIPPED[..3], "x").unwrap_err().contains("too short"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.txt");
        std::fs::write(&path, "2 3\nKing 1 0 0\nqueen 0.9 0.1 0\n").unwrap();
        let text = WordVectors::from_text_file(&path).unwrap();
        assert_eq!((text.len(), text.dim()), (2, 3));
        assert!(text.word("king").is_some(), "words are lowercased");
        std::fs::write(&path, "king 1 0 0\nqueen 1 x 0\n").unwrap();
        assert!(WordVectors::from_text_file(&path).unwrap_err().contains("line 2"));
        std::fs::write(&path, "king 1 0 0\nqueen 1 0\n").unwrap();
        assert!(WordVectors::from_text_file(&path).unwrap_err().contains("expected 3"));
    }
}
