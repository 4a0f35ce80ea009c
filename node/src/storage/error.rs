//! The storage engine's error type.

use std::io;
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
}

impl Error {
    /// Whether trying the same operation again may succeed. Corruption and
    /// oversized writes never will; a closed or failed engine needs a reopen.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. })
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
