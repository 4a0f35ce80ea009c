//! Hybrid logical clocks.
//!
//! An [`Hlc`] is one `u64`: the high 48 bits are wall-clock milliseconds since
//! the Unix epoch, the low 16 bits a logical counter. It orders like a
//! timestamp, never goes backwards on one node, and moves past every timestamp
//! the node has observed, so a node that has seen a version always stamps its
//! later writes higher, whatever the skew between wall clocks.
//!
//! Two rules keep a bad timestamp from poisoning a clock:
//! - a timestamp more than the maximum offset ahead of this node's wall
//!   clock is refused ([`ClockError::Skew`]) and never adopted: a client or
//!   peer with a clock far in the future, or a corrupted `u64::MAX`, cannot
//!   drag every later stamp with it;
//! - the clock refuses to stamp while its own last timestamp is more than
//!   the maximum offset ahead of the wall clock ([`ClockError::AheadOfWall`]),
//!   as after a wall clock that jumped forward and back.
//!
//! All arithmetic is checked: nothing wraps to 0.
//!
//! The clock reads no time itself: callers pass the physical time in, which
//! keeps it deterministic under test.

use serde::{Deserialize, Serialize};

/// Bits of an [`Hlc`] given to the logical counter.
const LOGICAL_BITS: u32 = 16;

/// The largest wall-clock time an [`Hlc`] can hold, in milliseconds (about
/// the year 10889).
pub const PHYSICAL_MS_MAX: u64 = u64::MAX >> LOGICAL_BITS;

/// Default largest distance between clocks that a node accepts, in
/// milliseconds.
pub const MAX_OFFSET_MS: u64 = 500;

/// A hybrid logical timestamp: `physical_ms << 16 | logical`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The lowest timestamp: "nothing seen yet".
    pub const ZERO: Hlc = Hlc(0);

    /// The timestamp at `physical_ms` with a zero logical part (saturated
    /// at [`PHYSICAL_MS_MAX`]).
    pub fn from_physical_ms(physical_ms: u64) -> Hlc {
        Hlc(physical_ms.min(PHYSICAL_MS_MAX) << LOGICAL_BITS)
    }

    /// Wall-clock milliseconds of this timestamp.
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The next timestamp, `None` past the last one.
    pub fn successor(self) -> Option<Hlc> {
        self.0.checked_add(1).map(Hlc)
    }

    /// This timestamp plus `ms` milliseconds, saturated at the largest.
    pub fn plus_ms(self, ms: u64) -> Hlc {
        Hlc(self.0.saturating_add(ms.saturating_mul(1 << LOGICAL_BITS)))
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.0 & ((1 << LOGICAL_BITS) - 1))
    }
}

/// Why a clock refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// A timestamp from elsewhere is too far ahead of this node's wall clock.
    #[error(
        "timestamp {seen} is {ahead_ms} ms ahead of this node's clock ({now_ms} ms), more than the maximum offset of {max_offset_ms} ms"
    )]
    Skew { seen: Hlc, now_ms: u64, ahead_ms: u64, max_offset_ms: u64 },
    /// This clock's own last timestamp is too far ahead of its wall clock
    /// (the wall clock went back, or the clock adopted a timestamp from a
    /// clock that was ahead): it stamps again once the wall clock is within
    /// the maximum offset.
    #[error(
        "this node's clock is at {last}, {ahead_ms} ms ahead of its wall clock ({now_ms} ms), more than the maximum offset of {max_offset_ms} ms; it stamps again once the wall clock catches up"
    )]
    AheadOfWall { last: Hlc, now_ms: u64, ahead_ms: u64, max_offset_ms: u64 },
    /// No timestamp is left (the clock reached `u64::MAX`).
    #[error("the clock has no timestamp left after {last}")]
    Exhausted { last: Hlc },
}

/// A node's clock: hands out strictly increasing [`Hlc`]s.
#[derive(Clone, Debug)]
pub struct HlcClock {
    last: Hlc,
    max_offset_ms: u64,
}

impl HlcClock {
    /// A clock that will stamp above `last` (the highest timestamp found on
    /// disk at start-up, or its persisted high-water mark), and accepts
    /// clocks at most `max_offset_ms` ahead of its wall clock.
    pub fn starting_after(last: Hlc, max_offset_ms: u64) -> HlcClock {
        HlcClock { last, max_offset_ms }
    }

    /// The largest distance between clocks that this one accepts.
    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// How far `hlc` is ahead of `now_ms`, if it is beyond the maximum
    /// offset.
    fn too_far_ahead(&self, hlc: Hlc, now_ms: u64) -> Option<u64> {
        let ahead_ms = hlc.physical_ms().saturating_sub(now_ms);
        (ahead_ms > self.max_offset_ms).then_some(ahead_ms)
    }

    /// The next timestamp, given the wall clock now. Strictly greater than
    /// every timestamp this clock returned or observed before.
    pub fn tick(&mut self, now_ms: u64) -> Result<Hlc, ClockError> {
        if let Some(ahead_ms) = self.too_far_ahead(self.last, now_ms) {
            let max_offset_ms = self.max_offset_ms;
            return Err(ClockError::AheadOfWall { last: self.last, now_ms, ahead_ms, max_offset_ms });
        }
        let wall = Hlc::from_physical_ms(now_ms);
        let next = if wall > self.last {
            wall
        } else {
            self.last.successor().ok_or(ClockError::Exhausted { last: self.last })?
        };
        self.last = next;
        Ok(next)
    }

    /// Checks a timestamp seen elsewhere (in a request, a replicated
    /// version, a context) without adopting it.
    pub fn check(&self, seen: Hlc, now_ms: u64) -> Result<(), ClockError> {
        match self.too_far_ahead(seen, now_ms) {
            Some(ahead_ms) => Err(ClockError::Skew { seen, now_ms, ahead_ms, max_offset_ms: self.max_offset_ms }),
            None => Ok(()),
        }
    }

    /// Moves the clock past a timestamp seen elsewhere, unless it is too far
    /// ahead of the wall clock: then it is refused and not adopted. One the
    /// clock has already passed (a client echoing this clock back) changes
    /// nothing and is not checked.
    pub fn observe(&mut self, seen: Hlc, now_ms: u64) -> Result<(), ClockError> {
        if seen <= self.last {
            return Ok(());
        }
        self.check(seen, now_ms)?;
        self.last = seen;
        Ok(())
    }

    /// The highest timestamp handed out or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// How long a coordinator waits before it stamps a write above `seen`
    /// (the client's timestamp, or a context's), in milliseconds: until the
    /// stamp is at most half the maximum offset ahead of its wall clock.
    /// Replicas accept versions up to the whole offset ahead of theirs, so
    /// every replica whose clock is within half the offset of the
    /// coordinator's accepts what it stamps. Zero when `seen` is beyond the
    /// offset: that is refused, not waited for.
    pub fn wait_before_stamp_ms(&self, seen: Hlc, now_ms: u64) -> u64 {
        if self.too_far_ahead(seen, now_ms).is_some() {
            return 0;
        }
        let ahead_ms = self.last.max(seen).physical_ms().saturating_sub(now_ms);
        ahead_ms.saturating_sub(self.max_offset_ms / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> HlcClock {
        HlcClock::starting_after(Hlc::ZERO, MAX_OFFSET_MS)
    }

    #[test]
    fn tick_is_strictly_increasing_even_when_wall_clock_goes_back() {
        let mut clock = clock();
        let a = clock.tick(1_000).unwrap();
        let b = clock.tick(1_000).unwrap();
        let c = clock.tick(900).unwrap();
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(a.physical_ms(), 1_000);
        assert_eq!(c.physical_ms(), 1_000, "a clock running behind keeps the higher physical part");
    }

    /// A coordinator waits until its stamp would be at most half the
    /// offset ahead of its wall clock: a replica whose clock is behind by
    /// less than half the offset then accepts it.
    #[test]
    fn a_stamp_waits_until_it_is_within_half_the_offset() {
        let mut clock = clock();
        assert_eq!(clock.wait_before_stamp_ms(Hlc::from_physical_ms(1_250), 1_000), 0);
        assert_eq!(clock.wait_before_stamp_ms(Hlc::from_physical_ms(1_490), 1_000), 240);
        assert_eq!(clock.wait_before_stamp_ms(Hlc::from_physical_ms(1_501), 1_000), 0, "refused, not waited for");
        clock.observe(Hlc::from_physical_ms(1_400), 1_000).unwrap();
        assert_eq!(clock.wait_before_stamp_ms(Hlc::ZERO, 1_000), 150, "its own clock ahead waits too");
        let seen = Hlc::from_physical_ms(1_490);
        let waited = 1_000 + clock.wait_before_stamp_ms(seen, 1_000);
        clock.observe(seen, waited).unwrap();
        let stamp = clock.tick(waited).unwrap();
        assert_eq!(stamp.physical_ms() - waited, MAX_OFFSET_MS / 2);
        let mut replica = HlcClock::starting_after(Hlc::ZERO, MAX_OFFSET_MS);
        replica.observe(stamp, waited - MAX_OFFSET_MS / 2 + 1).unwrap();
    }

    #[test]
    fn observe_moves_past_remote_stamps_within_the_offset() {
        let mut clock = clock();
        clock.observe(Hlc::from_physical_ms(1_400), 1_000).unwrap();
        let next = clock.tick(1_000).unwrap();
        assert!(next > Hlc::from_physical_ms(1_400));
    }

    #[test]
    fn a_timestamp_beyond_the_offset_is_refused_and_not_adopted() {
        let mut clock = clock();
        let now = 10_000;
        for seen in [Hlc(u64::MAX), Hlc::from_physical_ms(now + 3_600_000), Hlc::from_physical_ms(now + 501)] {
            let error = clock.observe(seen, now).unwrap_err();
            assert!(matches!(error, ClockError::Skew { .. }), "{error}");
            assert!(error.to_string().contains("maximum offset of 500 ms"), "{error}");
        }
        assert_eq!(clock.last(), Hlc::ZERO);
        assert_eq!(clock.tick(now).unwrap(), Hlc::from_physical_ms(now));
    }

    #[test]
    fn a_clock_far_ahead_of_its_wall_clock_refuses_to_stamp_until_it_catches_up() {
        // Stamped at 10 s, restarted after the wall clock went back to 9 s.
        let mut clock = HlcClock::starting_after(Hlc::from_physical_ms(10_000), MAX_OFFSET_MS);
        let error = clock.tick(9_000).unwrap_err();
        assert!(matches!(error, ClockError::AheadOfWall { ahead_ms: 1_000, .. }), "{error}");
        // Its own timestamp echoed back is not a client's skew.
        assert_eq!(clock.observe(Hlc::from_physical_ms(10_000), 9_000), Ok(()));
        let next = clock.tick(9_600).unwrap();
        assert!(next > Hlc::from_physical_ms(10_000), "stamps still rise: {next}");
    }

    #[test]
    fn the_last_timestamp_is_exhausted_not_wrapped() {
        let mut clock = HlcClock::starting_after(Hlc(u64::MAX), u64::MAX);
        assert_eq!(clock.tick(0), Err(ClockError::Exhausted { last: Hlc(u64::MAX) }));
        assert_eq!(Hlc(u64::MAX).successor(), None);
        assert_eq!(Hlc::from_physical_ms(u64::MAX).physical_ms(), PHYSICAL_MS_MAX);
        assert_eq!(Hlc(u64::MAX - 1).plus_ms(5), Hlc(u64::MAX));
    }
}
