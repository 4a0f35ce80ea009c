//! Hybrid logical clocks.
//!
//! An [`Hlc`] is one `u64`: the high 48 bits are wall-clock milliseconds since
//! the Unix epoch, the low 16 bits a logical counter. It orders like a
//! timestamp, never goes backwards on one node, and moves past every timestamp
//! the node has observed, so a node that has seen a version always stamps its
//! later writes higher, whatever the skew between wall clocks.
//!
//! The clock reads no time itself: callers pass the physical time in, which
//! keeps it deterministic under test.

use serde::{Deserialize, Serialize};

/// Bits of an [`Hlc`] given to the logical counter.
const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid logical timestamp: `physical_ms << 16 | logical`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The timestamp at `physical_ms` with a zero logical part.
    pub fn from_physical_ms(physical_ms: u64) -> Hlc {
        Hlc(physical_ms << LOGICAL_BITS)
    }

    /// Wall-clock milliseconds of this timestamp.
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
}

/// A node's clock: hands out strictly increasing [`Hlc`]s.
#[derive(Clone, Debug, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has seen nothing yet.
    pub fn new() -> HlcClock {
        HlcClock::default()
    }

    /// A clock that will stamp above `last` (e.g. the highest timestamp found
    /// on disk at start-up).
    pub fn starting_after(last: Hlc) -> HlcClock {
        HlcClock { last }
    }

    /// The next timestamp, given the wall clock now. Strictly greater than
    /// every timestamp this clock returned or observed before.
    pub fn tick(&mut self, now_physical_ms: u64) -> Hlc {
        let wall = Hlc::from_physical_ms(now_physical_ms);
        let next = if wall > self.last { wall } else { Hlc(self.last.0 + 1) };
        debug_assert!(next.0 & LOGICAL_MASK != LOGICAL_MASK || next > self.last);
        self.last = next;
        next
    }

    /// Moves the clock past a timestamp seen elsewhere (in a request, a
    /// replicated version, a client's last-seen stamp).
    pub fn observe(&mut self, seen: Hlc) {
        if seen > self.last {
            self.last = seen;
        }
    }

    /// The highest timestamp handed out or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_increasing_even_when_wall_clock_goes_back() {
        let mut clock = HlcClock::new();
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(900);
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(a.physical_ms(), 1_000);
        assert_eq!(c.physical_ms(), 1_000, "a clock running behind keeps the higher physical part");
    }

    #[test]
    fn observe_moves_past_remote_stamps() {
        let mut clock = HlcClock::new();
        clock.observe(Hlc::from_physical_ms(5_000));
        let next = clock.tick(1_000);
        assert!(next > Hlc::from_physical_ms(5_000));
    }
}
