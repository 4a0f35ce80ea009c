//! A small seeded generator (splitmix64), for schedules that a seed must
//! reproduce (chaos runs, tests) and for fault injection. Not for secrets.

use std::sync::atomic::{AtomicU64, Ordering};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A probability scaled to `u64::MAX`, for comparing with a random `u64`.
pub fn threshold(probability: f64) -> u64 {
    (probability.clamp(0.0, 1.0) * u64::MAX as f64) as u64
}

/// A deterministic generator: the same seed gives the same sequence.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in `low..=high` (`low` if the range is empty).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low + 1)
    }

    /// True with `probability`.
    pub fn chance(&mut self, probability: f64) -> bool {
        self.next_u64() < threshold(probability)
    }
}

/// The same generator shared between threads without a lock.
#[derive(Debug)]
pub struct AtomicSplitMix64(AtomicU64);

impl AtomicSplitMix64 {
    pub const fn new(seed: u64) -> AtomicSplitMix64 {
        AtomicSplitMix64(AtomicU64::new(seed))
    }

    pub fn next_u64(&self) -> u64 {
        mix(self.0.fetch_add(GAMMA, Ordering::Relaxed).wrapping_add(GAMMA))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_atomic_agrees() {
        let mut a = SplitMix64::new(42);
        let b = AtomicSplitMix64::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn between_stays_in_range() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            let x = rng.between(10, 20);
            assert!((10..=20).contains(&x));
        }
        assert_eq!(rng.between(5, 5), 5);
    }
}
