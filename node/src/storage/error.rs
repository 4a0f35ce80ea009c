//! The storage engine's error type.

use std::io;

use quiver_ring::wire::{ErrorKind, ServerError};
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// Stored bytes do not match their checksum: they are not what was written.
    #[error("checksum mismatch in {} at offset {offset}: stored {expected:#010x}, computed {got:#010x}", path.display())]
    ChecksumMismatch { path: PathBuf, offset: u64, expected: u32, got: u32 },
    /// A file is damaged in a way recovery must not paper over (for example a
    /// bad WAL record followed by valid ones). The engine refuses to open.
    #[error("corrupt {} at offset {offset}: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// A write or sync failed earlier; the engine accepts no more writes
    /// because it can no longer tell what is durable. Reopen it.
    #[error("storage engine stopped after an earlier failure: {0}")]
    Failed(String),
    /// The engine was closed.
    #[error("storage engine is closed")]
    Closed,
    /// A file written by an earlier Quiver in a format this build does not
    /// read (versions changed in format 3 of the WAL, 2 of tables). The
    /// engine refuses to open rather than misread it.
    #[error(
        "{} is {what} format {found}, written by an earlier Quiver; this build reads format {reads} only. Start \
         this build on a new data directory (and load the data again), or run the earlier build on this one",
        path.display()
    )]
    OldFormat { path: PathBuf, what: &'static str, found: u32, reads: u32 },
    /// A write is larger than one WAL record may be.
    #[error("write of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// The file system is out of something right now (free space, file
    /// descriptors) and nothing was written: the same write succeeds once
    /// it is back. The engine goes on.
    #[error("{op} {}: {source}; nothing was written, and the engine tries again", path.display())]
    OutOf { op: &'static str, path: PathBuf, source: io::Error },
}

/// Whether `error` says the file system is full (or over a quota).
pub fn is_full(error: &io::Error) -> bool {
    use rustix::io::Errno;
    let code = error.raw_os_error();
    code == Some(Errno::NOSPC.raw_os_error()) || code == Some(Errno::DQUOT.raw_os_error())
}

/// Whether `error` says the system is out of a resource that comes back
/// (free space, a quota, file descriptors), rather than that the disk
/// failed.
pub fn is_exhaustion(error: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = error.raw_os_error() else { return false };
    [Errno::NOSPC, Errno::DQUOT, Errno::MFILE, Errno::NFILE, Errno::NOMEM].iter().any(|e| e.raw_os_error() == code)
}

impl Error {
    /// Whether trying the same operation again may succeed. Corruption and
    /// oversized writes never will; a closed or failed engine needs a reopen.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::OutOf { .. })
    }

    /// This error as [`Error::OutOf`] when it is an I/O error that says the
    /// system ran out of a resource: for a step that, failing, wrote
    /// nothing that counts (a new file removed again, a log entry not yet
    /// acted upon).
    pub fn exhaustion_passes(self) -> Error {
        match self {
            Error::Io { op, path, source } if is_exhaustion(&source) => Error::OutOf { op, path, source },
            other => other,
        }
    }

    /// Whether this is the file system being full (or over a quota).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::OutOf { source, .. } if is_full(source))
    }

    pub(crate) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.to_path_buf(), offset, reason: reason.into() }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io { op, path: path.to_path_buf(), source })
    }
}

/// The error a client sees for a storage failure.
pub fn storage_error(error: Error) -> ServerError {
    let kind = match &error {
        Error::Closed => ErrorKind::ShuttingDown,
        Error::TooLarge { .. } => ErrorKind::BulkTooLarge,
        Error::OutOf { .. } if error.is_disk_full() => ErrorKind::DiskFull,
        Error::Failed(_) | Error::Io { .. } | Error::OutOf { .. } => ErrorKind::StorageFailed,
        _ => ErrorKind::Internal,
    };
    ServerError::new(kind, error.to_string())
}
