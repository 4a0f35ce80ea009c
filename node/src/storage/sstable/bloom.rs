//! A bloom filter over a table's keys, for point lookups.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// A bloom filter with `k` probes by double hashing of one xxh3 hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bloom {
    k: u32,
    bits: Vec<u8>,
}

/// The hash a bloom filter is built from.
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

impl Bloom {
    /// A filter for the given key hashes with about `bits_per_key` bits each.
    pub fn build(hashes: &[u64], bits_per_key: usize) -> Bloom {
        let bits_per_key = bits_per_key.clamp(1, 64);
        // k = ln 2 * bits per key minimises the false-positive rate.
        let k = ((bits_per_key as f64 * 0.69) as u32).clamp(1, 30);
        let nbits = (hashes.len() * bits_per_key).max(64);
        let mut bits = vec![0u8; nbits.div_ceil(8)];
        let nbits = bits.len() as u64 * 8;
        for &hash in hashes {
            for bit in probes(hash, k, nbits) {
                // `probes` yields bits below `nbits`, the length in bits.
                if let Some(byte) = bits.get_mut((bit / 8) as usize) {
                    *byte |= 1 << (bit % 8);
                }
            }
        }
        Bloom { k, bits }
    }

    /// False means the key is certainly absent.
    pub fn may_contain(&self, hash: u64) -> bool {
        let nbits = self.bits.len() as u64 * 8;
        if nbits == 0 {
            return true;
        }
        probes(hash, self.k, nbits)
            .all(|bit| self.bits.get((bit / 8) as usize).is_some_and(|b| b & (1 << (bit % 8)) != 0))
    }
}

fn probes(hash: u64, k: u32, nbits: u64) -> impl Iterator<Item = u64> {
    let delta = hash.rotate_left(32) | 1;
    // Multiply-shift maps a 64-bit hash onto 0..nbits without a division,
    // which would cost more than the rest of the probe.
    (0..u64::from(k))
        .map(move |i| ((u128::from(hash.wrapping_add(i.wrapping_mul(delta))) * u128::from(nbits)) >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let hashes: Vec<u64> = (0..10_000u32).map(|i| key_hash(&i.to_le_bytes())).collect();
        let bloom = Bloom::build(&hashes, 10);
        assert!(hashes.iter().all(|&h| bloom.may_contain(h)));
        let false_positives = (10_000..20_000u32).filter(|i| bloom.may_contain(key_hash(&i.to_le_bytes()))).count();
        assert!(false_positives < 300, "{false_positives} false positives in 10,000 (expected about 1%)");
    }
}
