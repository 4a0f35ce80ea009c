//! Free space on the file system of the node's data directory, and the
//! reserves below which writes are refused.
//!
//! A disk that fills up must be an error that passes, not an outage: below
//! `disk_reserve_bytes` of free space (by default the larger of 1 GiB and
//! 5 % of the volume) client writes get a retryable
//! [`ErrorKind::DiskFull`] naming the free bytes, while reads go on;
//! replication, delivered hints, read repair and the batch log of other
//! nodes' bulk sets go on down to the smaller `disk_reserve_peer_bytes` (a
//! quarter of it by default), so that the cluster converges with the room
//! left. Writes resume by themselves once there is room again: free space
//! is looked at again at most every [`RECHECK`], on the request path,
//! without a thread of its own. Below everything, the engine itself turns
//! `ENOSPC` into a refused write that passes (see `storage::exhaust`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quiver_ring::wire::{BudgetInfo, ErrorKind, ServerError};

/// How old a reading of the free space may be before it is taken again.
pub const RECHECK: Duration = Duration::from_millis(100);

/// The default reserve: the larger of this and [`RESERVE_SHARE`] of the
/// volume.
const RESERVE_MIN_BYTES: u64 = 1 << 30;
const RESERVE_SHARE: f64 = 0.05;

/// What one reserve protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Writes clients send to this node.
    Client,
    /// What other nodes send: their replicas' parts, hints, repairs, and
    /// their bulk sets' batch log.
    Peer,
}

/// See the module's documentation.
#[derive(Debug)]
pub struct DiskSpace {
    dir: PathBuf,
    reserve_bytes: u64,
    peer_reserve_bytes: u64,
    /// The last reading, and when it was taken (ms after `start`, plus one:
    /// 0 means never).
    free_bytes: AtomicU64,
    read_at_ms: AtomicU64,
    start: Instant,
    refused_clients: AtomicU64,
    refused_peers: AtomicU64,
}

/// The bytes free to an unprivileged user on the file system of `dir`, and
/// its size.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok((stat.f_bavail.saturating_mul(stat.f_frsize), stat.f_blocks.saturating_mul(stat.f_frsize)))
}

impl DiskSpace {
    /// The reserves of `dir`'s file system: `reserve_bytes` (default: the
    /// larger of 1 GiB and 5 % of the volume) and `peer_reserve_bytes`
    /// (default: a quarter of the other).
    pub fn new(dir: &Path, reserve_bytes: Option<u64>, peer_reserve_bytes: Option<u64>) -> std::io::Result<DiskSpace> {
        let (free, total) = statvfs(dir)?;
        let reserve_bytes =
            reserve_bytes.unwrap_or_else(|| RESERVE_MIN_BYTES.max((total as f64 * RESERVE_SHARE) as u64));
        let space = DiskSpace {
            dir: dir.to_path_buf(),
            reserve_bytes,
            peer_reserve_bytes: peer_reserve_bytes.unwrap_or(reserve_bytes / 4).min(reserve_bytes),
            free_bytes: AtomicU64::new(free),
            read_at_ms: AtomicU64::new(1),
            start: Instant::now(),
            refused_clients: AtomicU64::new(0),
            refused_peers: AtomicU64::new(0),
        };
        if free < space.reserve_bytes {
            tracing::warn!(
                free_bytes = free,
                reserve_bytes = space.reserve_bytes,
                dir = %dir.display(),
                "the disk is below its free-space reserve: client writes are refused until there is room"
            );
        }
        Ok(space)
    }

    /// The free bytes, as read at most [`RECHECK`] ago. A failed reading
    /// keeps the last one.
    pub fn free_bytes(&self) -> u64 {
        let now_ms = self.start.elapsed().as_millis() as u64 + 1;
        let read_at = self.read_at_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(read_at) >= RECHECK.as_millis() as u64
            && self.read_at_ms.compare_exchange(read_at, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            match statvfs(&self.dir) {
                Ok((free, _)) => self.free_bytes.store(free, Ordering::Relaxed),
                Err(error) => tracing::warn!(%error, dir = %self.dir.display(), "reading the free disk space"),
            }
        }
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Whether `writer` may write now: `DiskFull`, naming the free bytes
    /// and the reserve, when the disk is below its reserve.
    pub fn check(&self, writer: Writer) -> Result<(), ServerError> {
        let (reserve, setting, refused) = match writer {
            Writer::Client => (self.reserve_bytes, "disk_reserve_bytes", &self.refused_clients),
            Writer::Peer => (self.peer_reserve_bytes, "disk_reserve_peer_bytes", &self.refused_peers),
        };
        let free = self.free_bytes();
        if free >= reserve {
            return Ok(());
        }
        refused.fetch_add(1, Ordering::Relaxed);
        Err(ServerError::new(
            ErrorKind::DiskFull,
            format!(
                "the disk of {} has {free} bytes free, below the reserve of {reserve} bytes ({setting}): writes are \
                 refused until there is room again; reads go on",
                self.dir.display()
            ),
        ))
    }

    /// The reserves for `status`: the bound, the free bytes now, and the
    /// writes refused.
    pub fn budgets(&self) -> Vec<BudgetInfo> {
        let free = self.free_bytes();
        let budget = |name: &str, max: u64, refused: &AtomicU64, at_bound: &str| BudgetInfo {
            name: name.to_owned(),
            max,
            used: free,
            reached: refused.load(Ordering::Relaxed),
            at_bound: at_bound.to_owned(),
        };
        vec![
            budget(
                "disk_reserve_bytes",
                self.reserve_bytes,
                &self.refused_clients,
                "below it, client writes get DiskFull (in use: free bytes now)",
            ),
            budget(
                "disk_reserve_peer_bytes",
                self.peer_reserve_bytes,
                &self.refused_peers,
                "below it, other nodes' writes are refused too (in use: free bytes now)",
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_below_each_reserve_and_the_default_is_a_share_of_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = statvfs(dir.path()).unwrap();
        let space = DiskSpace::new(dir.path(), None, None).unwrap();
        assert_eq!(space.reserve_bytes, RESERVE_MIN_BYTES.max((total as f64 * RESERVE_SHARE) as u64));
        assert_eq!(space.peer_reserve_bytes, space.reserve_bytes / 4);

        // Reserves above what is free: one for clients only, then both.
        let space = DiskSpace::new(dir.path(), Some(u64::MAX), Some(0)).unwrap();
        let error = space.check(Writer::Client).unwrap_err();
        assert_eq!(error.kind, ErrorKind::DiskFull);
        assert!(error.message.contains("bytes free") && error.message.contains("disk_reserve_bytes"), "{error}");
        assert!(space.check(Writer::Peer).is_ok());
        let space = DiskSpace::new(dir.path(), Some(u64::MAX), Some(u64::MAX)).unwrap();
        assert!(space.check(Writer::Peer).unwrap_err().message.contains("disk_reserve_peer_bytes"));
        let budgets = space.budgets();
        assert_eq!(budgets[0].reached, 0);
        assert_eq!(budgets[1].reached, 1);
        assert!(budgets[0].used > 0 && budgets[0].used <= free.max(1) * 2);
        assert!(DiskSpace::new(dir.path(), Some(0), None).unwrap().check(Writer::Client).is_ok());
    }
}
