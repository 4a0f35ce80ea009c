//! The file system under the engine, as a small trait.
//!
//! Every byte the engine reads or writes goes through [`Fs`] and [`File`], so
//! tests can swap the real disk for:
//! - [`SimFs`]: an in-memory file system that remembers which bytes and which
//!   directory entries were synced, and can [`crash`](SimFs::crash) into
//!   exactly what a power cut would leave;
//! - [`SkipWriteFs`]: the debug fault of `--debug-skip-write-probability`,
//!   which silently drops writes to data files (SSTables, index snapshots),
//!   as a file system that lost unsynced data would. The WAL and the manifest
//!   are never touched by it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_ring::rand::{threshold, AtomicSplitMix64};

use crate::lock;

/// An open file. Offsets are absolute; there is no cursor.
#[allow(clippy::len_without_is_empty)] // a file's length is an I/O call, not a collection size
pub trait File: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails if the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Truncates or extends (with zeros) to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: returns once the data written so far is durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Writes all of `buf` at `offset` and returns once it is durable, as
    /// `write_all_at` then `sync_data` would (what the WAL appends with). A
    /// file opened by [`Fs::open_log`] on the real disk does it in one
    /// `O_DIRECT` write with `RWF_DSYNC` when `buf` (address and length) and
    /// `offset` are multiples of [`DIRECT_ALIGN`].
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_then_sync(self, buf, offset)
    }
}

/// `write_all_at` then `sync_data`: the plain durable write, and the real
/// disk's fallback where `O_DIRECT` with `RWF_DSYNC` is refused.
fn write_then_sync<F: File + ?Sized>(file: &F, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)?;
    file.sync_data()
}

/// A file system: opens files and changes directories.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Creates `path` empty (truncating it if it exists), for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn File>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn File>>;
    /// Opens an existing, pre-allocated file that will be written with
    /// [`File::write_durable_at`] (a WAL segment).
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.open(path)
    }
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// The names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes `dir`'s entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates `path` holding exactly `bytes`, synced (its directory entry
    /// is not). What table files are written with.
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let file = self.create(path)?;
        file.write_all_at(bytes, 0)?;
        file.sync_data()
    }
    /// Reads `path` back and compares it with `expected`: `None` when they
    /// are the same bytes, else the first offset where they differ (a length
    /// difference counts). What verifies a file just written.
    fn first_difference(&self, path: &Path, expected: &[u8]) -> io::Result<Option<u64>> {
        compare_file(self.open(path)?.as_ref(), expected)
    }
}

/// [`Fs::first_difference`] for an open file, read through whatever cache
/// it has.
fn compare_file(file: &dyn File, expected: &[u8]) -> io::Result<Option<u64>> {
    let mut window = vec![0u8; COMPARE_CHUNK_BYTES.min(expected.len())];
    compare_chunks(expected, file.len()?, &mut window, |w, n, offset| file.read_exact_at(&mut w[..n], offset))
}

/// Bytes compared at a time when reading a file back.
const COMPARE_CHUNK_BYTES: usize = 4 << 20;

/// Compares `expected` with a file of `len` bytes, read a `window` at a time
/// by `read(window, n, offset)`, which fills `window[..n]`.
fn compare_chunks(
    expected: &[u8],
    len: u64,
    window: &mut [u8],
    mut read: impl FnMut(&mut [u8], usize, u64) -> io::Result<()>,
) -> io::Result<Option<u64>> {
    let end = expected.len().min(usize::try_from(len).unwrap_or(usize::MAX));
    let mut at = 0usize;
    while at < end {
        let n = window.len().min(end - at);
        read(window, n, at as u64)?;
        let (got, want) = (&window[..n], &expected[at..at + n]);
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Ok(Some((at + i) as u64));
        }
        at += n;
    }
    Ok((len != expected.len() as u64).then_some(at as u64))
}

/// Reads a whole file into memory.
pub fn read_all(file: &dyn File) -> io::Result<Vec<u8>> {
    let len = usize::try_from(file.len()?).map_err(|_| io::Error::other("file too large to read"))?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------
// The real disk.

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile {
    file: std::fs::File,
    /// For a log: the same file opened `O_DIRECT`, where the file
    /// system allows it, until a write through it is refused.
    direct: Option<std::fs::File>,
    direct_refused: AtomicBool,
}

impl RealFile {
    fn new(file: std::fs::File) -> RealFile {
        RealFile { file, direct: None, direct_refused: AtomicBool::new(false) }
    }
}

impl File for RealFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    /// One `O_DIRECT` write with `RWF_DSYNC` when it can: the kernel sends the
    /// data to the device straight from `buf` and flushes the device's cache
    /// before the write returns, with no page-cache copy and no writeback of
    /// dirty pages (a small group commit costs about a fifth less time and
    /// CPU than `write` plus `fdatasync` on the 2-core VM).
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned = buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned && !self.direct_refused.load(Ordering::Relaxed)) {
            match write_all_dsync(direct, buf, offset) {
                Ok(()) => return Ok(()),
                // A device whose blocks are larger than DIRECT_ALIGN, or a
                // kernel without `RWF_DSYNC`: write through the cache from
                // now on (rewriting any part that went through is harmless:
                // the same bytes).
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        write_then_sync(self, buf, offset)
    }
}

/// Writes all of `buf` at `offset`, each `pwritev2` with `RWF_DSYNC`: durable
/// when it returns, as if `fdatasync` followed. (Not `O_DSYNC` at open:
/// rustix maps that flag to `O_SYNC`, whose writes also commit each
/// timestamp change to the journal.)
fn write_all_dsync(file: &std::fs::File, mut buf: &[u8], mut offset: u64) -> Result<(), rustix::io::Errno> {
    use rustix::io::{pwritev2, Errno, ReadWriteFlags};
    while !buf.is_empty() {
        match pwritev2(file, &[io::IoSlice::new(buf)], offset, ReadWriteFlags::DSYNC) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Alignment of `O_DIRECT` transfers (buffer address, length, offset).
pub const DIRECT_ALIGN: usize = 4096;
/// The open flag that bypasses the page cache.
const O_DIRECT: i32 = rustix::fs::OFlags::DIRECT.bits() as i32;

/// `path` opened `O_DIRECT` for writing, or for reading; `None` where the
/// file system refuses `O_DIRECT` (tmpfs, some overlays).
fn open_direct(path: &Path, write: bool) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(!write).write(write).custom_flags(O_DIRECT).open(path).ok()
}

/// A reusable buffer whose bytes start at a [`DIRECT_ALIGN`] boundary in
/// memory, as `O_DIRECT` transfers need.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    skip: usize,
}

impl AlignedBuf {
    /// `len` bytes starting at a [`DIRECT_ALIGN`] boundary. The first `keep`
    /// bytes are those the previous call returned (`keep` is at most the
    /// length it had); the rest are unspecified.
    pub fn get(&mut self, len: usize, keep: usize) -> &mut [u8] {
        if self.skip + len > self.raw.len() {
            let mut raw = vec![0u8; len + len / 2 + DIRECT_ALIGN];
            let skip = raw.as_ptr().align_offset(DIRECT_ALIGN);
            raw[skip..skip + keep].copy_from_slice(&self.raw[self.skip..self.skip + keep]);
            (self.raw, self.skip) = (raw, skip);
        }
        &mut self.raw[self.skip..self.skip + len]
    }
}
/// Files smaller than this are written and read back through the page
/// cache.
const DIRECT_MIN_BYTES: usize = 1 << 20;
/// Bytes per `O_DIRECT` write: small enough that a table being written does
/// not queue tens of megabytes at the device ahead of the WAL's next sync.
const DIRECT_WRITE_CHUNK_BYTES: usize = 2 << 20;

impl RealFs {
    /// Writes the page-aligned prefix of `bytes` at offset 0 through
    /// `O_DIRECT`, a chunk at a time (staged through an aligned buffer when
    /// `bytes` itself is not page-aligned). Returns how many bytes it wrote:
    /// 0 when the file is small or the file system refuses `O_DIRECT`
    /// (tmpfs, some overlays), and the caller writes everything buffered.
    /// Nothing is synced here.
    fn write_direct_prefix(path: &Path, bytes: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let aligned = bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if aligned < DIRECT_MIN_BYTES {
            return Ok(0);
        }
        let Some(direct) = open_direct(path, true) else {
            return Ok(0);
        };
        let mut staging = AlignedBuf::default();
        let mut at = 0;
        while at < aligned {
            let chunk = &bytes[at..aligned.min(at + DIRECT_WRITE_CHUNK_BYTES)];
            let source = if chunk.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
                chunk
            } else {
                let staged = staging.get(DIRECT_WRITE_CHUNK_BYTES, 0);
                staged[..chunk.len()].copy_from_slice(chunk);
                &staged[..chunk.len()]
            };
            match direct.write_all_at(source, at as u64) {
                Ok(()) => at += chunk.len(),
                // A device whose blocks are larger than DIRECT_ALIGN: the
                // caller rewrites everything through the cache.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput && at == 0 => return Ok(0),
                Err(e) => return Err(e),
            }
        }
        Ok(aligned)
    }
}

/// Creates (or empties) `path`, readable and writable by its owner only.
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(path)
}

impl Fs for RealFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn File>> {
        let file = create_private(path)?;
        Ok(Box::new(RealFile::new(file)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn File>> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(RealFile::new(file)))
    }
    /// Also opens the file `O_DIRECT` for
    /// [`File::write_durable_at`], and drops its cached pages (the zeros of
    /// its pre-allocation): each direct write would otherwise first have the
    /// kernel evict the pages it covers.
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn File>> {
        let mut log = RealFile::new(std::fs::OpenOptions::new().read(true).write(true).open(path)?);
        log.direct = open_direct(path, true);
        if log.direct.is_some() {
            // Only a hint: pages left cached are evicted by the writes.
            let _ = rustix::fs::fadvise(&log.file, 0, None, rustix::fs::Advice::DontNeed);
        }
        Ok(Box::new(log))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
    /// Owner-only (`0700`), as is every file made in it (`0600`): the data
    /// is the users', not every local account's.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    /// Large files bypass the page cache for their page-aligned prefix
    /// (`O_DIRECT`, in chunks): copying every flushed and compacted table
    /// into cache pages cost about a fifth of all CPU in a bulk load. Once
    /// synced, the kernel is asked to read the file into the cache in the
    /// background (the reads to come find it warm, and the read-back, being
    /// `O_DIRECT`, still reads the disk).
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let file = create_private(path)?;
        let direct = RealFs::write_direct_prefix(path, bytes)?;
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes[direct..], direct as u64)?;
        file.sync_data()?;
        if direct > 0 {
            // Only a hint: a refusal changes nothing that matters.
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed);
        }
        Ok(())
    }
    /// Reads through `O_DIRECT` where the file system allows it: from the
    /// disk itself, not the page cache (which the read-ahead asked for by
    /// `write_new` fills for the reads to come), and without the kernel
    /// copying each page.
    fn first_difference(&self, path: &Path, expected: &[u8]) -> io::Result<Option<u64>> {
        use std::os::unix::fs::FileExt;
        let len = std::fs::metadata(path)?.len();
        let buffered = || compare_file(self.open(path)?.as_ref(), expected);
        let Some(direct) = (expected.len() >= DIRECT_MIN_BYTES).then(|| open_direct(path, false)).flatten() else {
            return buffered();
        };
        // Chunks of whole pages into a page-aligned buffer; the last read
        // asks for a whole page and gets what is left of the file.
        let mut buf = AlignedBuf::default();
        let window = buf.get(COMPARE_CHUNK_BYTES, 0);
        let compared = compare_chunks(expected, len, window, |window, n, offset| {
            let want = n.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let mut got = 0;
            while got < n {
                match direct.read_at(&mut window[got..want], offset + got as u64)? {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    read => got += read,
                }
            }
            Ok(())
        });
        match compared {
            // A device whose blocks are larger than DIRECT_ALIGN.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => buffered(),
            other => other,
        }
    }
}

// ---------------------------------------------------------------------------
// The debug fault: silently skipped data-file writes.

/// Whether a file holds data the engine can rebuild from the WAL (SSTables,
/// index snapshots): only those are subject to the skip-write fault.
pub fn is_data_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("sst" | "idx"))
}

/// Wraps a file system and drops each write to a data file with probability
/// `p`, reporting success. Simulates a file system that lost unsynced data.
#[derive(Debug, Clone)]
pub struct SkipWriteFs {
    inner: Arc<dyn Fs>,
    fault: Arc<SkipFault>,
}

#[derive(Debug)]
struct SkipFault {
    /// Probability scaled to `u64::MAX`.
    threshold: u64,
    rng: AtomicSplitMix64,
    skipped: AtomicU64,
}

impl SkipFault {
    fn should_skip(&self) -> bool {
        let skip = self.rng.next_u64() < self.threshold;
        if skip {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        skip
    }
}

impl SkipWriteFs {
    /// Drops data-file writes on `inner` with `probability` (0.0..=1.0).
    pub fn new(inner: Arc<dyn Fs>, probability: f64, seed: u64) -> SkipWriteFs {
        let fault = SkipFault {
            threshold: threshold(probability),
            rng: AtomicSplitMix64::new(seed),
            skipped: AtomicU64::new(0),
        };
        SkipWriteFs { inner, fault: Arc::new(fault) }
    }

    /// How many writes were dropped so far.
    pub fn skipped(&self) -> u64 {
        self.fault.skipped.load(Ordering::Relaxed)
    }

    fn wrap(&self, path: &Path, file: Box<dyn File>) -> Box<dyn File> {
        if is_data_file(path) {
            Box::new(SkipWriteFile { inner: file, fault: self.fault.clone() })
        } else {
            file
        }
    }
}

#[derive(Debug)]
struct SkipWriteFile {
    inner: Box<dyn File>,
    fault: Arc<SkipFault>,
}

impl File for SkipWriteFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fault.should_skip() {
            return Ok(());
        }
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
}

impl Fs for SkipWriteFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn File>> {
        Ok(self.wrap(path, self.inner.create(path)?))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn File>> {
        Ok(self.wrap(path, self.inner.open(path)?))
    }
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn File>> {
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
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

// ---------------------------------------------------------------------------
// The simulated disk, for crash tests.

#[derive(Debug, Default)]
struct SimData {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash: the content at the last `sync_data`.
    synced: Vec<u8>,
}

type SimNode = Arc<Mutex<SimData>>;

#[derive(Debug, Default)]
struct SimDirs {
    /// The names reads see.
    current: HashMap<PathBuf, SimNode>,
    /// The names that survive a crash: as of each directory's last sync.
    synced: HashMap<PathBuf, SimNode>,
}

/// An in-memory file system that remembers what was synced. [`SimFs::crash`]
/// returns the file system a power cut would leave: each file holds what it
/// held at its last `sync_data`, and each directory the entries it had at its
/// last `sync_dir`.
#[derive(Debug, Default, Clone)]
pub struct SimFs {
    dirs: Arc<Mutex<SimDirs>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))
}

impl SimFs {
    /// An empty file system.
    pub fn new() -> SimFs {
        SimFs::default()
    }

    /// What survives a power cut now.
    pub fn crash(&self) -> SimFs {
        let dirs = lock(&self.dirs);
        let mut survived = HashMap::new();
        for (path, node) in &dirs.synced {
            let synced = lock(node).synced.clone();
            survived.insert(path.clone(), Arc::new(Mutex::new(SimData { current: synced.clone(), synced })));
        }
        SimFs { dirs: Arc::new(Mutex::new(SimDirs { current: survived.clone(), synced: survived })) }
    }

    /// Replaces a file's whole content (synced), for tests that build images.
    pub fn put(&self, path: &Path, bytes: Vec<u8>) {
        let node = Arc::new(Mutex::new(SimData { current: bytes.clone(), synced: bytes }));
        let mut dirs = lock(&self.dirs);
        dirs.current.insert(path.to_path_buf(), node.clone());
        dirs.synced.insert(path.to_path_buf(), node);
    }

    /// A file's current content.
    pub fn get(&self, path: &Path) -> Option<Vec<u8>> {
        lock(&self.dirs).current.get(path).map(|node| lock(node).current.clone())
    }
}

#[derive(Debug)]
struct SimFile(SimNode);

impl File for SimFile {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.0).current.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = lock(&self.0);
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| data.current.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = lock(&self.0);
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + buf.len();
        if data.current.len() < end {
            data.current.resize(end, 0);
        }
        data.current[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        lock(&self.0).current.resize(len, 0);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut data = lock(&self.0);
        data.synced = data.current.clone();
        Ok(())
    }
}

impl Fs for SimFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn File>> {
        let node: SimNode = Arc::default();
        lock(&self.dirs).current.insert(path.to_path_buf(), node.clone());
        Ok(Box::new(SimFile(node)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn File>> {
        let node = lock(&self.dirs).current.get(path).cloned().ok_or_else(|| not_found(path))?;
        Ok(Box::new(SimFile(node)))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.dirs).current.remove(path).map(drop).ok_or_else(|| not_found(path))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut dirs = lock(&self.dirs);
        let node = dirs.current.remove(from).ok_or_else(|| not_found(from))?;
        dirs.current.insert(to.to_path_buf(), node);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let dirs = lock(&self.dirs);
        Ok(dirs
            .current
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut dirs = lock(&self.dirs);
        let SimDirs { current, synced } = &mut *dirs;
        synced.retain(|path, _| path.parent() != Some(dir));
        for (path, node) in current.iter().filter(|(path, _)| path.parent() == Some(dir)) {
            synced.insert(path.clone(), node.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the size and the buffer's alignment, `write_new` on the real
    /// disk leaves exactly the bytes given (`O_DIRECT` chunks, a buffered
    /// tail, an unaligned buffer staged, small files through the cache), and
    /// reading them back (whole `O_DIRECT` chunks, a short last one, or
    /// through the cache) finds no difference.
    #[test]
    fn real_write_new_round_trips_any_size_and_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = quiver_ring::rand::SplitMix64::new(7);
        let raw: Vec<u8> =
            (0..COMPARE_CHUNK_BYTES + (1 << 20) + 2 * DIRECT_ALIGN).map(|_| rng.next_u64() as u8).collect();
        let skip = raw.as_ptr().align_offset(DIRECT_ALIGN);
        // Page-aligned: written from the buffer itself.
        let big = &raw[skip..skip + COMPARE_CHUNK_BYTES + (1 << 20) + 17];
        let cases: [&[u8]; 7] = [
            &[],
            &big[..100],
            &big[..DIRECT_MIN_BYTES],
            &big[..DIRECT_MIN_BYTES + DIRECT_ALIGN - 1],
            &big[..COMPARE_CHUNK_BYTES],
            big,
            // Not page-aligned: staged chunk by chunk.
            &big[1..],
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.sst"));
            std::fs::write(&path, b"old contents, longer than some of the cases").unwrap();
            RealFs.write_new(&path, bytes).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "case {i}");
            assert_eq!(RealFs.first_difference(&path, bytes).unwrap(), None, "case {i}");
        }
    }

    /// A log file on the real disk takes whole blocks from an aligned
    /// buffer through `O_DIRECT` with `RWF_DSYNC`, and anything else (an unaligned
    /// buffer, length or offset) through the cache; either way the file
    /// then holds exactly those bytes.
    #[test]
    fn real_log_writes_land_aligned_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.wal");
        std::fs::write(&path, vec![0u8; 8 * DIRECT_ALIGN]).unwrap();
        let log = RealFs.open_log(&path).unwrap();
        let mut expected = vec![0u8; 8 * DIRECT_ALIGN];
        let mut buf = AlignedBuf::default();
        let write = |bytes: &[u8], offset: usize, expected: &mut Vec<u8>| {
            log.write_durable_at(bytes, offset as u64).unwrap();
            expected[offset..offset + bytes.len()].copy_from_slice(bytes);
            assert_eq!(std::fs::read(&path).unwrap(), *expected, "after {} bytes at {offset}", bytes.len());
        };
        let blocks = buf.get(2 * DIRECT_ALIGN, 0);
        blocks.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
        write(blocks, DIRECT_ALIGN, &mut expected);
        write(&blocks[1..DIRECT_ALIGN + 1], 0, &mut expected);
        write(&blocks[..100], 3 * DIRECT_ALIGN, &mut expected);
        write(&blocks[..DIRECT_ALIGN], 5 * DIRECT_ALIGN + 10, &mut expected);
        blocks.fill(7);
        write(blocks, 6 * DIRECT_ALIGN, &mut expected);
    }

    /// Reading back through `O_DIRECT` finds the first differing byte, in
    /// the first chunk, at the end of one, at the last byte, and a file of
    /// another length.
    #[test]
    fn real_first_difference_finds_changed_bytes_and_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sst");
        let bytes: Vec<u8> = (0..(2 << 20) + 100).map(|i| (i % 251) as u8).collect();
        for at in [0, 5 << 10, COMPARE_CHUNK_BYTES.min(bytes.len()) - 1, bytes.len() - 1] {
            let mut changed = bytes.clone();
            changed[at] ^= 0x40;
            std::fs::write(&path, &changed).unwrap();
            assert_eq!(RealFs.first_difference(&path, &bytes).unwrap(), Some(at as u64));
        }
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(RealFs.first_difference(&path, &bytes).unwrap(), Some(bytes.len() as u64 - 1));
        std::fs::write(&path, [&bytes[..], b"x"].concat()).unwrap();
        assert_eq!(RealFs.first_difference(&path, &bytes).unwrap(), Some(bytes.len() as u64));
    }

    #[test]
    fn sim_first_difference_compares_synced_contents() {
        let fs = SimFs::new();
        let path = Path::new("/d/t.sst");
        fs.write_new(path, b"abcdef").unwrap();
        assert_eq!(fs.first_difference(path, b"abcdef").unwrap(), None);
        assert_eq!(fs.first_difference(path, b"abcXef").unwrap(), Some(3));
        assert_eq!(fs.first_difference(path, b"abc").unwrap(), Some(3));
    }

    #[test]
    fn crash_keeps_only_synced_bytes_and_entries() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        let a = fs.create(&dir.join("a")).unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        a.write_all_at(b" world", 5).unwrap();
        let b = fs.create(&dir.join("b")).unwrap();
        b.write_all_at(b"unsynced entry", 0).unwrap();
        b.sync_data().unwrap();

        let after = fs.crash();
        assert_eq!(after.get(&dir.join("a")).unwrap(), b"hello");
        assert!(after.get(&dir.join("b")).is_none(), "b's directory entry was never synced");
    }

    #[test]
    fn skip_write_only_touches_data_files() {
        let sim = SimFs::new();
        let fs = SkipWriteFs::new(Arc::new(sim.clone()), 1.0, 7);
        let sst = fs.create(Path::new("/d/1.sst")).unwrap();
        sst.write_all_at(b"data", 0).unwrap();
        let wal = fs.create(Path::new("/d/1.wal")).unwrap();
        wal.write_all_at(b"data", 0).unwrap();
        assert_eq!(sim.get(Path::new("/d/1.sst")).unwrap(), b"");
        assert_eq!(sim.get(Path::new("/d/1.wal")).unwrap(), b"data");
        assert_eq!(fs.skipped(), 1);
    }
}
