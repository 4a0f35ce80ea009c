//! A file system that runs out: of free space, or of file descriptors.
//!
//! [`ExhaustFs`] wraps another [`Fs`] and, while its [`Shortage`] says so,
//! fails what a real system would fail then, with the real error numbers:
//! - out of space (`ENOSPC`): every write that would take a new block
//!   (past a file's end: a new table, a new WAL segment), growing a file;
//!   writes into bytes a file already has (a pre-allocated WAL segment)
//!   still go through, as they do on a real file system;
//! - out of descriptors (`EMFILE`): every open and create, and syncing a
//!   directory (which opens it).
//!
//! Tests drive the engine into these and out again, and check that it
//! refuses what it cannot do, leaves nothing half-made, and goes on once
//! the resource is back, having lost nothing it acknowledged.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::storage::disk::{File, Fs};

/// What the file system is out of, shared by the test and the file system.
#[derive(Debug, Default)]
pub struct Shortage(AtomicU8, std::sync::Mutex<Option<String>>);

const NONE: u8 = 0;
const SPACE: u8 = 1;
const DESCRIPTORS: u8 = 2;

impl Shortage {
    /// Free space runs out (or comes back, with `false`).
    pub fn set_space(&self, out: bool) {
        if !out {
            *crate::lock(&self.1) = None;
        }
        self.0.store(if out { SPACE } else { NONE }, Ordering::SeqCst);
    }

    /// Free space runs out for the files whose names start with `prefix`
    /// only (the manifest, say), to reach the steps after those that write
    /// other files.
    pub fn set_space_only_for(&self, prefix: &str) {
        *crate::lock(&self.1) = Some(prefix.to_owned());
        self.set_space(true);
    }

    /// File descriptors run out (or come back, with `false`).
    pub fn set_descriptors(&self, out: bool) {
        self.0.store(if out { DESCRIPTORS } else { NONE }, Ordering::SeqCst);
    }

    fn space(&self, path: &Path) -> io::Result<()> {
        let named = |prefix: &String| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|name| name.starts_with(prefix.as_str()))
        };
        match self.0.load(Ordering::SeqCst) {
            SPACE if crate::lock(&self.1).as_ref().is_none_or(named) => {
                Err(io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()))
            }
            _ => Ok(()),
        }
    }

    fn descriptor(&self) -> io::Result<()> {
        match self.0.load(Ordering::SeqCst) {
            DESCRIPTORS => Err(io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error())),
            _ => Ok(()),
        }
    }
}

/// See the module's documentation.
#[derive(Debug)]
pub struct ExhaustFs {
    inner: Arc<dyn Fs>,
    shortage: Arc<Shortage>,
}

impl ExhaustFs {
    /// `inner`, running out of what `shortage` says.
    pub fn new(inner: Arc<dyn Fs>, shortage: Arc<Shortage>) -> ExhaustFs {
        ExhaustFs { inner, shortage }
    }

    fn wrap(&self, path: &Path, file: Box<dyn File>) -> Box<dyn File> {
        Box::new(ExhaustFile { inner: file, shortage: self.shortage.clone(), path: path.to_path_buf() })
    }
}

#[derive(Debug)]
struct ExhaustFile {
    inner: Box<dyn File>,
    shortage: Arc<Shortage>,
    path: std::path::PathBuf,
}

impl ExhaustFile {
    /// Out of space, a write that reaches past the end needs new blocks.
    fn room_for(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.inner.len()? {
            self.shortage.space(&self.path)?;
        }
        Ok(())
    }
}

impl File for ExhaustFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.room_for(buf, offset)?;
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.inner.len()? {
            self.shortage.space(&self.path)?;
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.room_for(buf, offset)?;
        self.inner.write_durable_at(buf, offset)
    }
}

impl Fs for ExhaustFs {
    /// An empty file takes no block: only descriptors can run out here.
    fn create(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.shortage.descriptor()?;
        Ok(self.wrap(path, self.inner.create(path)?))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.shortage.descriptor()?;
        Ok(self.wrap(path, self.inner.open(path)?))
    }
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.shortage.descriptor()?;
        Ok(self.wrap(path, self.inner.open_log(path)?))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    /// Syncing a directory opens it: a descriptor.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.shortage.descriptor()?;
        self.inner.sync_dir(dir)
    }
    // `write_new` and `first_difference` are the trait's own, through
    // `create` and `open` above: a table that does not fit is left
    // half-written, as on a real disk, for the engine to remove.
}
