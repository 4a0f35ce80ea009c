//! The node's hybrid logical clock: every write's stamp comes from here.
//!
//! - Owns: the [`Stamper`] (behind a mutex), and the persisted high-water
//!   mark, the file `HLC` in the data directory.
//! - Receives: timestamps seen in client requests, in contexts, and (in a
//!   cluster) in versions from peers; wall-clock time from a [`Clock`].
//! - Does: refuses a timestamp more than the maximum offset ahead of the
//!   wall clock (`ClockSkew`, naming both values) and never adopts it;
//!   refuses to stamp while its own clock is more than the maximum offset
//!   ahead of the wall clock (after the wall clock stepped back), and says
//!   so in `status` and the log; never stamps past a write's deadline
//!   (`Timeout`).
//! - Hands on: stamps strictly above everything stamped or adopted before,
//!   across restarts too: before a stamp goes above the persisted mark, the
//!   mark is moved ahead (by half the maximum offset) and synced, and a node
//!   starts above its mark and above every stamp in its store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{ClockError, Hlc, NodeId, Stamp, Stamper};

use crate::clock::Clock;
use crate::lock;

/// The file that holds the high-water mark: `u64` LE, then its CRC32 LE.
pub const HLC_FILE: &str = "HLC";

/// Bytes of the `HLC` file.
const HLC_FILE_BYTES: usize = 12;

#[derive(Debug)]
struct State {
    stamper: Stamper,
    /// Why the node's wall clock is out of step with most of its peers',
    /// while it is (set by the heartbeats).
    peer_skew: Option<String>,
    /// No stamp goes above this before it is on disk.
    mark: Hlc,
    /// Why the clock refuses to stamp, while it does (logged once).
    refusing: Option<String>,
}

/// The node's clock. Shared by every request.
#[derive(Debug)]
pub struct NodeClock {
    state: Mutex<State>,
    /// The stamper's last timestamp, kept with every change under the
    /// mutex, so that every answer (which carries it) and every read (which
    /// usually brings nothing newer) reads it without the lock.
    last: AtomicU64,
    wall: Arc<dyn Clock>,
    max_offset_ms: u64,
    /// `None`: the mark is not persisted (tests of the clock alone).
    dir: Option<PathBuf>,
}

/// Reads the persisted mark (`Hlc::ZERO` if there is none yet).
fn read_mark(dir: &Path) -> std::io::Result<Hlc> {
    let path = dir.join(HLC_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Hlc::ZERO),
        Err(e) => return Err(e),
    };
    let invalid =
        |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {why}", path.display()));
    let Ok(bytes) = <[u8; HLC_FILE_BYTES]>::try_from(bytes.as_slice()) else {
        return Err(invalid("not 12 bytes"));
    };
    let [a, b, c, d, e, f, g, h, s0, s1, s2, s3] = bytes;
    let value = [a, b, c, d, e, f, g, h];
    if crc32fast::hash(&value) != u32::from_le_bytes([s0, s1, s2, s3]) {
        return Err(invalid("checksum mismatch"));
    }
    Ok(Hlc(u64::from_le_bytes(value)))
}

fn write_mark(dir: &Path, mark: Hlc) -> std::io::Result<()> {
    let mut bytes = mark.0.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&mark.0.to_le_bytes()).to_le_bytes());
    quiver_certs::write_new_file(dir, HLC_FILE, &bytes)
}

/// The error a client sees when the clock refuses.
fn clock_error(error: ClockError) -> ServerError {
    ServerError::new(ErrorKind::ClockSkew, error.to_string())
}

impl NodeClock {
    /// The clock of the node whose data directory is `dir`: it starts above
    /// `stored` (the highest stamp in the store) and above its persisted
    /// mark.
    pub fn open(
        dir: &Path,
        node: NodeId,
        stored: Hlc,
        max_offset_ms: u64,
        wall: Arc<dyn Clock>,
    ) -> std::io::Result<NodeClock> {
        let mark = read_mark(dir)?;
        let mut clock = NodeClock::unpersisted(node, stored.max(mark), max_offset_ms, wall);
        clock.dir = Some(dir.to_path_buf());
        lock(&clock.state).mark = mark;
        Ok(clock)
    }

    /// A clock whose mark is not persisted, starting above `last`.
    pub fn unpersisted(node: NodeId, last: Hlc, max_offset_ms: u64, wall: Arc<dyn Clock>) -> NodeClock {
        let stamper = Stamper::new(node, last, max_offset_ms);
        NodeClock {
            last: AtomicU64::new(stamper.last().0),
            state: Mutex::new(State { stamper, peer_skew: None, mark: Hlc(u64::MAX), refusing: None }),
            wall,
            max_offset_ms,
            dir: None,
        }
    }

    /// The wall clock's time.
    pub fn wall_ms(&self) -> u64 {
        self.wall.now_ms()
    }

    /// The largest distance between clocks this node accepts.
    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// Checks a timestamp from elsewhere without adopting it.
    pub fn check(&self, seen: Hlc) -> Result<(), ServerError> {
        lock(&self.state).stamper.check(seen, self.wall.now_ms()).map_err(clock_error)
    }

    /// The latest timestamp this node accepts from elsewhere now: the wall
    /// clock plus the maximum offset, or what the clock has already passed.
    pub fn latest_accepted(&self) -> Hlc {
        let past = self.wall.now_ms().saturating_add(self.max_offset_ms).saturating_add(1);
        Hlc(Hlc::from_physical_ms(past).0.saturating_sub(1)).max(self.last())
    }

    /// Adopts a timestamp from elsewhere, unless it is too far ahead.
    pub fn observe(&self, seen: Hlc) -> Result<(), ServerError> {
        // The clock only rises: what it has passed needs no lock.
        if seen <= self.last() {
            return Ok(());
        }
        let mut state = lock(&self.state);
        state.stamper.observe(seen, self.wall.now_ms()).map_err(clock_error)?;
        self.last.store(state.stamper.last().0, Ordering::Release);
        Ok(())
    }

    /// How long to wait before stamping a write above `seen`, so that
    /// replicas within half the maximum offset accept the stamp
    /// ([`quiver_ring::HlcClock::wait_before_stamp_ms`]).
    pub fn wait_before_stamp(&self, seen: Hlc) -> std::time::Duration {
        let now_ms = self.wall.now_ms();
        // Nearly always nothing is ahead: no lock for that.
        if self.last().max(seen).physical_ms() <= now_ms.saturating_add(self.max_offset_ms / 2) {
            return std::time::Duration::ZERO;
        }
        let wait_ms = lock(&self.state).stamper.wait_before_stamp_ms(seen, now_ms);
        std::time::Duration::from_millis(wait_ms)
    }

    /// The stamp of a write: above `seen` (the client's timestamp) and
    /// `above` (a causal write's context), never past `deadline`.
    pub fn stamp(&self, seen: Hlc, above: Hlc, deadline: Option<Hlc>) -> Result<Stamp, ServerError> {
        let now = self.wall.now_ms();
        let mut state = lock(&self.state);
        if let Some(skew) = &state.peer_skew {
            return Err(ServerError::new(ErrorKind::ClockSkew, skew.clone()));
        }
        state.stamper.observe(seen.max(above), now).map_err(clock_error)?;
        self.last.store(state.stamper.last().0, Ordering::Release);
        let stamp = match state.stamper.next(now) {
            Ok(stamp) => stamp,
            Err(error) => {
                if state.refusing.is_none() {
                    tracing::error!(%error, "the clock refuses to stamp writes");
                    state.refusing = Some(error.to_string());
                }
                return Err(clock_error(error));
            }
        };
        self.last.store(state.stamper.last().0, Ordering::Release);
        if let Some(reason) = state.refusing.take() {
            tracing::info!(was = %reason, "the clock stamps writes again");
        }
        if deadline.is_some_and(|deadline| stamp.hlc > deadline) {
            return Err(ServerError::new(
                ErrorKind::Timeout,
                format!(
                    "the write reached its stamp at {} after its deadline {}; it was not applied",
                    stamp.hlc,
                    deadline.unwrap_or_default()
                ),
            ));
        }
        if stamp.hlc > state.mark {
            self.persist_mark(&mut state, stamp.hlc)?;
        }
        Ok(stamp)
    }

    /// Moves the persisted mark past `hlc` (half the maximum offset ahead,
    /// so it is written a few times a second at most).
    fn persist_mark(&self, state: &mut State, hlc: Hlc) -> Result<(), ServerError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mark = hlc.plus_ms((self.max_offset_ms / 2).max(1));
        write_mark(dir, mark).map_err(|error| {
            // Refused, not stamped; the next stamp tries again.
            let kind = match crate::storage::error::is_full(&error) {
                true => ErrorKind::DiskFull,
                false => ErrorKind::StorageFailed,
            };
            ServerError::new(kind, format!("persisting the clock's high-water mark: {error}"))
        })?;
        state.mark = mark;
        Ok(())
    }

    /// The highest timestamp stamped or adopted.
    pub fn last(&self) -> Hlc {
        Hlc(self.last.load(Ordering::Acquire))
    }

    /// Sets (or, with `None`, lifts) the refusal to stamp because this
    /// node's wall clock is out of step with most of its peers'.
    pub fn set_peer_skew(&self, skew: Option<String>) {
        let mut state = lock(&self.state);
        match (&state.peer_skew, &skew) {
            (None, Some(reason)) => tracing::error!(%reason, "the clock refuses to stamp writes"),
            (Some(_), None) => tracing::info!("the clock agrees with its peers again; it stamps writes"),
            _ => {}
        }
        state.peer_skew = skew;
    }

    /// Why the clock refuses to stamp now, if it does.
    pub fn refusal(&self) -> Option<String> {
        let state = lock(&self.state);
        if let Some(skew) = &state.peer_skew {
            return Some(skew.clone());
        }
        let last = state.stamper.last();
        let now = self.wall.now_ms();
        let ahead_ms = last.physical_ms().saturating_sub(now);
        (ahead_ms > self.max_offset_ms).then(|| {
            format!(
                "this node's clock is at {last}, {ahead_ms} ms ahead of its wall clock ({now} ms), more than the \
                 maximum offset of {} ms: it refuses to stamp writes until the wall clock catches up",
                self.max_offset_ms
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const T: u64 = 1_700_000_000_000;

    fn open(dir: &Path, wall: &Arc<ManualClock>, stored: Hlc) -> NodeClock {
        NodeClock::open(dir, NodeId(1), stored, 500, wall.clone()).unwrap()
    }

    #[test]
    fn a_timestamp_an_hour_ahead_or_u64_max_is_refused_and_stamps_go_on_from_the_wall_clock() {
        let dir = tempfile::tempdir().unwrap();
        let wall = Arc::new(ManualClock::new(T));
        let clock = open(dir.path(), &wall, Hlc::ZERO);
        for seen in [Hlc::from_physical_ms(T + 3_600_000), Hlc(u64::MAX)] {
            let error = clock.stamp(seen, Hlc::ZERO, None).unwrap_err();
            assert_eq!(error.kind, ErrorKind::ClockSkew);
            assert!(error.message.contains(&format!("({T} ms)")), "{}", error.message);
            assert_eq!(clock.observe(seen).unwrap_err().kind, ErrorKind::ClockSkew);
        }
        let stamp = clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap();
        assert_eq!(stamp.hlc, Hlc::from_physical_ms(T));
    }

    #[test]
    fn stamps_rise_across_a_restart_with_the_wall_clock_stepped_back() {
        let dir = tempfile::tempdir().unwrap();
        let wall = Arc::new(ManualClock::new(T));
        let before = open(dir.path(), &wall, Hlc::ZERO).stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap().hlc;
        // Restarted with nothing in the store and the wall clock 10 s back:
        // it refuses to stamp, and says why.
        wall.set(T - 10_000);
        let clock = open(dir.path(), &wall, Hlc::ZERO);
        let error = clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap_err();
        assert_eq!(error.kind, ErrorKind::ClockSkew);
        assert!(clock.refusal().unwrap().contains("refuses to stamp"));
        // Back within the offset of the mark: it stamps, above the old stamp.
        wall.set(T);
        let after = clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap().hlc;
        assert!(after > before, "{after} > {before}");
        assert_eq!(clock.refusal(), None);
    }

    #[test]
    fn a_restart_within_the_offset_stamps_at_once_above_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let wall = Arc::new(ManualClock::new(T));
        let first = open(dir.path(), &wall, Hlc::ZERO);
        let before = first.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap().hlc;
        let mark = read_mark(dir.path()).unwrap();
        assert!(mark > before && mark <= Hlc::from_physical_ms(T + 250), "{mark}");
        let again = open(dir.path(), &wall, Hlc::ZERO).stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap().hlc;
        assert!(again > mark);
    }

    #[test]
    fn a_damaged_mark_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HLC_FILE), [1u8; 12]).unwrap();
        let wall: Arc<dyn Clock> = Arc::new(ManualClock::new(T));
        let error = NodeClock::open(dir.path(), NodeId(1), Hlc::ZERO, 500, wall).unwrap_err();
        assert!(error.to_string().contains("checksum mismatch"), "{error}");
    }

    #[test]
    fn a_write_is_never_stamped_past_its_deadline() {
        let wall = Arc::new(ManualClock::new(T));
        let clock = NodeClock::unpersisted(NodeId(1), Hlc::ZERO, 500, wall.clone());
        let deadline = Hlc::from_physical_ms(T + 100);
        assert!(clock.stamp(Hlc::ZERO, Hlc::ZERO, Some(deadline)).is_ok());
        wall.set(T + 101);
        assert_eq!(clock.stamp(Hlc::ZERO, Hlc::ZERO, Some(deadline)).unwrap_err().kind, ErrorKind::Timeout);
    }
}
