//! The engine: its state, its five threads, and recovery.
//!
//! Threads:
//! - **commit**: takes every waiting write, frames them into one group and
//!   writes the group to the WAL with one durable write (`O_DIRECT` with
//!   `RWF_DSYNC` on the real disk: the same as `write` plus `fdatasync`),
//!   then hands it to apply and goes on with the next group.
//! - **apply**: inserts each large durable group into the active memtable,
//!   then acknowledges every write in it (so a write is acknowledged once
//!   it is both durable and visible), while commit syncs the next group.
//!   Small groups, or a group with no other write behind it, commit applies
//!   itself when apply is idle: they gain less than a thread hand-off costs.
//!   Either way groups are applied one at a time, in order, and only there
//!   is the memtable rotated, so no write can land in a memtable being
//!   flushed.
//! - **flush**: builds the SSTable of each frozen memtable in memory, oldest
//!   first, and hands it to flush-io, then builds the next.
//! - **flush-io**: writes each built table to a verified file, commits the
//!   manifest edit, swaps the table in for its memtable, then retires the
//!   WAL segments it covers; strictly in the order the memtables were
//!   frozen, so the flushed sequence only grows.
//! - **compact**: merges tables chosen by [`compaction::plan`].
//!
//! Readers take a snapshot of [`Levels`] (an `Arc`) and merge what they find
//! in the memtables and tables; the merge rule does not depend on order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use quiver_ring::{Hlc, Siblings};
use tokio::sync::oneshot;

use crate::storage::compaction::{self, merge_siblings, EntryIter, MergeIter, Policy, RunSize};
use crate::storage::disk::{is_data_file, Fs, RealFs, SkipWriteFs};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::manifest::{Edit, Manifest, TableMeta};
use crate::storage::memtable::Memtable;
use crate::storage::sstable::{parse_table_name, table_name, BlockCache, Table, TableBuilder, TableScan};
use crate::storage::wal::{self, SegmentInfo, WalWriter};
use crate::storage::{EncodedOps, Op};
use crate::{lock, now_ms};

/// Engine settings. Memory use is bounded by `memtable_bytes_max *
/// (frozen_memtables_max + 1)` plus three table buffers (a flush being
/// built, one being written, a compaction output; all kept for reuse) of at
/// most `table_bytes_target` bytes each, plus `block_cache_bytes`, whatever
/// the data size (bloom filters and block indexes, about 2 bytes per key,
/// aside).
#[derive(Clone, Debug)]
pub struct Options {
    /// The active memtable is frozen and flushed past this many bytes.
    pub memtable_bytes_max: usize,
    /// Writes wait when this many frozen memtables are waiting for flush.
    /// Four absorb a slow flush (one running beside a compaction) without
    /// holding writes back; two stalled bulk loads ~7 % of the time.
    pub frozen_memtables_max: usize,
    /// Size of each pre-allocated WAL segment. Two retired segments are kept
    /// for reuse (see `wal`), so the WAL takes up to three more of these on
    /// disk than the segments it still needs.
    pub wal_segment_bytes: u64,
    /// Largest encoded write (one WAL record).
    pub record_bytes_max: usize,
    /// Target size of an SSTable data block.
    pub block_bytes: usize,
    /// Budget of the cache of data blocks that point reads found (0, the
    /// default: no cache; every read then reads its block from the page
    /// cache with `pread`). It pays only when the blocks read fit: `get` at
    /// 64 in flight over 1M uniformly read keys (~160 MB of tables) went from
    /// 142-150k to 163-185k/s with 512 MiB, but lost 8-10 % with 64 MiB
    /// (about 40 % of reads hit, and a miss also costs the insert and an
    /// eviction).
    pub block_cache_bytes: usize,
    pub bloom_bits_per_key: usize,
    /// Compaction splits its output into files of about this size.
    pub table_bytes_target: usize,
    /// Size-tiered compaction: merge this many similar runs at once (min).
    /// Eight rather than the usual four: each byte is rewritten about
    /// log8 instead of log4 times as the store grows, which sustained ~13 %
    /// more bulk ingest on 2 cores; a point read probes at most a few more
    /// bloom filters.
    pub compaction_min_tables: usize,
    pub compaction_max_tables: usize,
    /// Whether compaction runs by itself in the background.
    pub background_compaction: bool,
    /// Tombstones younger than this are kept by compaction.
    pub tombstone_grace_ms: u64,
    /// Versions kept per key; past it the lowest `(hlc, origin)` is dropped.
    pub siblings_max: usize,
    /// Tries to write and verify one table before giving up for now.
    pub table_write_attempts: u32,
    /// Manifest edits before it is rolled over to a snapshot.
    pub manifest_edits_max: usize,
    /// Open a damaged WAL or manifest by keeping its valid prefix.
    pub repair: bool,
    /// Debug fault: drop each data-file write with this probability.
    pub debug_skip_write_probability: f64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            memtable_bytes_max: 64 << 20,
            frozen_memtables_max: 4,
            wal_segment_bytes: 64 << 20,
            record_bytes_max: 72 << 20,
            block_bytes: 4096,
            block_cache_bytes: 0,
            bloom_bits_per_key: 10,
            table_bytes_target: 64 << 20,
            compaction_min_tables: 8,
            compaction_max_tables: 32,
            background_compaction: true,
            tombstone_grace_ms: 10 * 24 * 3600 * 1000,
            siblings_max: 16,
            table_write_attempts: 16,
            manifest_edits_max: 1024,
            repair: false,
            debug_skip_write_probability: 0.0,
        }
    }
}

/// Counters and sizes, for status reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tables: usize,
    pub table_bytes: u64,
    /// Entries in tables; a key in several tables counts several times.
    pub table_entries: u64,
    pub memtable_bytes: usize,
    pub memtable_entries: usize,
    pub frozen_memtables: usize,
    pub wal_segments: usize,
    pub last_seq: u64,
    pub flushed_seq: u64,
    pub group_commits: u64,
    pub flushes: u64,
    pub compactions: u64,
    /// Table writes that failed verification and were redone.
    pub table_rewrites: u64,
    /// Bytes of blocks in the block cache.
    pub cached_block_bytes: usize,
    /// WAL segments made from retired ones rather than zero-filled.
    pub wal_segments_recycled: u64,
}

/// The readable state: memtables and tables, newest first.
#[derive(Debug)]
struct Levels {
    active: Arc<RwLock<Memtable>>,
    frozen: Vec<Arc<RwLock<Memtable>>>,
    tables: Vec<Arc<Table>>,
}

/// Called once with a write's outcome: its WAL sequence number once durable,
/// or why it failed. Runs on the engine's commit or apply thread, so it must
/// be quick (send a message, wake a task).
pub type Done = Box<dyn FnOnce(Result<u64>) + Send>;

enum Request {
    Write {
        encoded: EncodedOps,
        done: Done,
    },
    /// Freeze the active memtable; answers with the last sequence in it.
    Rotate {
        done: oneshot::Sender<Result<u64>>,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Write { encoded, .. } => write!(f, "Write({} ops)", encoded.ops().len()),
            Request::Rotate { .. } => write!(f, "Rotate"),
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    requests: Vec<Request>,
    closing: bool,
    /// The commit thread is parked on the condition variable. Writers signal
    /// only then: a notify is a system call even when nobody waits.
    committer_waiting: bool,
}

#[derive(Debug, Default)]
struct Background {
    closing: bool,
    compaction_wanted: bool,
    flush_error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    last_seq: AtomicU64,
    group_commits: AtomicU64,
    flushes: AtomicU64,
    compactions: AtomicU64,
    table_rewrites: AtomicU64,
    wal_recycled: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Inner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    opts: Options,
    levels: RwLock<Arc<Levels>>,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    manifest: Mutex<Manifest>,
    /// WAL segments on disk and the current one, under one lock.
    segments: Mutex<(Vec<SegmentInfo>, u64)>,
    background: Mutex<Background>,
    background_cv: Condvar,
    compaction_lock: Mutex<()>,
    /// Table buffers kept between flushes and between compaction outputs.
    table_buffers: Mutex<Vec<Vec<u8>>>,
    /// A flushed memtable, emptied, that the next rotation makes active.
    spare_memtable: Mutex<Option<Memtable>>,
    failed: Mutex<Option<String>>,
    counters: Counters,
    /// Shared by every table's point reads (`None` when its budget is 0).
    block_cache: Option<Arc<BlockCache>>,
}

/// The storage engine. Cheap to share behind an `Arc`; every method takes
/// `&self`.
#[derive(Debug)]
pub struct Engine {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Engine {
    /// Opens (or creates) the engine in `dir` on the real disk, with the
    /// skip-write fault if the options ask for it.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Engine> {
        let real: Arc<dyn Fs> = Arc::new(RealFs);
        let fs: Arc<dyn Fs> = if opts.debug_skip_write_probability > 0.0 {
            Arc::new(SkipWriteFs::new(
                real,
                opts.debug_skip_write_probability,
                now_ms() ^ u64::from(std::process::id()),
            ))
        } else {
            real
        };
        Engine::open_with(fs, dir.as_ref(), opts)
    }

    /// Opens the engine on any file system: recovers the manifest, opens the
    /// tables, removes files no manifest names, replays the WAL, and starts
    /// the threads.
    pub fn open_with(fs: Arc<dyn Fs>, dir: &Path, opts: Options) -> Result<Engine> {
        fs.create_dir_all(dir).ctx("create directory", dir)?;
        let manifest = Manifest::open(fs.clone(), dir, opts.repair, opts.manifest_edits_max)?;
        let state = manifest.state().clone();

        let block_cache = (opts.block_cache_bytes > 0).then(|| Arc::new(BlockCache::new(opts.block_cache_bytes)));
        let mut tables = Vec::with_capacity(state.tables.len());
        for meta in state.tables.values() {
            let path = dir.join(table_name(meta.id));
            let table = open_table(fs.as_ref(), &path, meta.id, meta.run, block_cache.as_ref())?;
            if table.size() != meta.size {
                return Err(Error::corrupt(
                    &path,
                    0,
                    format!("{} bytes, the manifest says {}", table.size(), meta.size),
                ));
            }
            tables.push(Arc::new(table));
        }
        sort_newest_first(&mut tables);
        remove_orphans(fs.as_ref(), dir, |id| state.tables.contains_key(&id))?;

        let inner = Arc::new(Inner {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            levels: RwLock::new(Arc::new(Levels { active: Arc::default(), frozen: Vec::new(), tables })),
            queue: Mutex::default(),
            queue_cv: Condvar::new(),
            manifest: Mutex::new(manifest),
            segments: Mutex::default(),
            background: Mutex::default(),
            background_cv: Condvar::new(),
            compaction_lock: Mutex::new(()),
            table_buffers: Mutex::default(),
            spare_memtable: Mutex::default(),
            failed: Mutex::new(None),
            counters: Counters::default(),
            block_cache,
            opts,
        });

        let recovered = wal::recover(fs.as_ref(), dir, state.flushed_seq, inner.opts.repair, |seq, ops| {
            let full = {
                let levels = inner.levels();
                let mut active = write(&levels.active);
                active.apply(seq, &EncodedOps::new(&ops), inner.opts.siblings_max);
                active.bytes() >= inner.opts.memtable_bytes_max
            };
            if full {
                // No thread runs yet: flush right here to stay within memory.
                inner.rotate();
                if let Some(memtable) = inner.levels().frozen.last().cloned() {
                    inner.flush(&memtable)?;
                }
            }
            Ok(())
        })?;
        let last_seq = recovered.last_seq.max(state.flushed_seq);
        inner.counters.last_seq.store(last_seq, Ordering::Relaxed);
        let number = recovered.next_number;
        let wal =
            WalWriter::create(fs, dir, number, inner.opts.wal_segment_bytes, inner.counters.wal_recycled.clone())?;
        {
            let mut segments = lock(&inner.segments);
            segments.0 = recovered.segments;
            segments.0.push(SegmentInfo { number, last_seq: None });
            segments.1 = number;
        }
        inner.retire_flushed_segments()?;

        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.to_owned()).spawn(body).ctx("spawn thread", Path::new(name))
        };
        let mut threads = Vec::new();
        let commit_inner = inner.clone();
        threads.push(spawn("quiver-commit", Box::new(move || commit_loop(commit_inner, wal, last_seq + 1)))?);
        let flush_inner = inner.clone();
        threads.push(spawn("quiver-flush", Box::new(move || flush_loop(flush_inner)))?);
        let compact_inner = inner.clone();
        threads.push(spawn("quiver-compact", Box::new(move || compact_loop(compact_inner)))?);
        inner.wake_background(true);
        Ok(Engine { inner, threads: Mutex::new(threads) })
    }

    /// Queues a request for the commit thread; gives it back if the engine
    /// is closing.
    fn submit(&self, request: Request) -> Result<(), Request> {
        let mut queue = lock(&self.inner.queue);
        if queue.closing {
            return Err(request);
        }
        queue.requests.push(request);
        let wake = queue.committer_waiting;
        drop(queue);
        if wake {
            self.inner.queue_cv.notify_one();
        }
        Ok(())
    }

    /// Writes `ops` as one WAL record: all of them become durable and
    /// visible together, or none does. Calls `done` with the record's
    /// sequence number once it is on disk (after `fdatasync`), or with the
    /// error; `done` runs on one of the engine's threads and must be quick.
    pub fn write_then(&self, ops: Vec<Op>, done: impl FnOnce(Result<u64>) + Send + 'static) {
        let encoded = EncodedOps::new(&ops);
        // Freed here, on the thread that made them, not on the engine's.
        drop(ops);
        let size = encoded.bytes().len();
        if wal::record_len(size) > self.inner.opts.record_bytes_max {
            return done(Err(Error::TooLarge { size, max: self.inner.opts.record_bytes_max }));
        }
        if let Err(Request::Write { done, .. }) = self.submit(Request::Write { encoded, done: Box::new(done) }) {
            done(Err(Error::Closed));
        }
    }

    fn write_channel(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<u64>> {
        let (sender, receiver) = oneshot::channel();
        self.write_then(ops, move |result| {
            let _ = sender.send(result);
        });
        receiver
    }

    /// [`Engine::write_then`] as a future: the record's sequence number once
    /// it is durable.
    pub async fn write(&self, ops: Vec<Op>) -> Result<u64> {
        self.write_channel(ops).await.unwrap_or(Err(Error::Closed))
    }

    /// [`Engine::write`] for plain threads. Must not be called from async code.
    pub fn write_blocking(&self, ops: Vec<Op>) -> Result<u64> {
        self.write_channel(ops).blocking_recv().unwrap_or(Err(Error::Closed))
    }

    /// The live versions of `key`, merged from every level. `None` when the
    /// key was never written (a deleted key returns its tombstone).
    pub fn get(&self, key: &[u8]) -> Result<Option<Siblings>> {
        let levels = self.inner.levels();
        let mut found: Option<Siblings> = None;
        let mut add = |siblings: Siblings| match &mut found {
            Some(all) => all.merge(siblings),
            None => found = Some(siblings),
        };
        if let Some(siblings) = read(&levels.active).get(key) {
            add(siblings);
        }
        for memtable in &levels.frozen {
            if let Some(siblings) = read(memtable).get(key) {
                add(siblings);
            }
        }
        for table in &levels.tables {
            if let Some(siblings) = table.get(key)? {
                add(siblings);
            }
        }
        Ok(found)
    }

    /// Every key `>= start` (and `< end`, if given) with its merged versions,
    /// in key order, tombstones included. Reads a consistent snapshot of the
    /// tables; memtable entries in the range are copied up front.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>) -> impl Iterator<Item = Result<(Vec<u8>, Siblings)>> + use<> {
        let levels = self.inner.levels();
        let end = end.map(<[u8]>::to_vec);
        let in_range = {
            let end = end.clone();
            move |key: &Vec<u8>| end.as_ref().is_none_or(|end| key < end)
        };
        let mut sources: Vec<EntryIter<'static, Siblings>> = Vec::new();
        let end_bound = end.as_deref().map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        for memtable in std::iter::once(&levels.active).chain(&levels.frozen) {
            let copied: Vec<_> = read(memtable)
                .sorted_range(start, end_bound)
                .into_iter()
                .map(|entry| Ok((entry.key.to_vec(), entry.siblings())))
                .collect();
            sources.push(Box::new(copied.into_iter()));
        }
        for table in &levels.tables {
            sources.push(Box::new(table.iter_from(start)));
        }
        MergeIter::new(sources)
            .map(|item| item.map(|(key, values)| (key, merge_siblings(values))))
            .take_while(move |item| item.as_ref().map_or(true, |(key, _)| in_range(key)))
    }

    /// Freezes the active memtable and waits until it and every older one
    /// are in verified SSTables.
    pub fn flush(&self) -> Result<()> {
        let (done, receiver) = oneshot::channel();
        self.submit(Request::Rotate { done }).map_err(|_| Error::Closed)?;
        let seq = receiver.blocking_recv().unwrap_or(Err(Error::Closed))?;
        self.inner.wait_flushed(seq)
    }

    /// Merges every table into one (a major compaction), dropping shadowed
    /// versions and tombstones past the grace period.
    pub fn compact(&self) -> Result<()> {
        self.inner.compact(true).map(drop)
    }

    /// Runs one compaction the size-tiered policy asks for, if any (what the
    /// background thread does). Returns whether it merged anything.
    pub fn compact_step(&self) -> Result<bool> {
        self.inner.compact(false)
    }

    /// The highest timestamp in the store: a restarted node's clock must
    /// start above it.
    pub fn max_hlc(&self) -> Hlc {
        let levels = self.inner.levels();
        let mut max = read(&levels.active).max_hlc();
        for memtable in &levels.frozen {
            max = max.max(read(memtable).max_hlc());
        }
        for table in &levels.tables {
            max = max.max(Hlc(table.props().max_hlc));
        }
        max
    }

    /// Current sizes and counters.
    pub fn stats(&self) -> Stats {
        let levels = self.inner.levels();
        let active = read(&levels.active);
        let counters = &self.inner.counters;
        Stats {
            tables: levels.tables.len(),
            table_bytes: levels.tables.iter().map(|t| t.size()).sum(),
            table_entries: levels.tables.iter().map(|t| t.props().entries).sum(),
            memtable_bytes: active.bytes() + levels.frozen.iter().map(|m| read(m).bytes()).sum::<usize>(),
            memtable_entries: active.len() + levels.frozen.iter().map(|m| read(m).len()).sum::<usize>(),
            frozen_memtables: levels.frozen.len(),
            wal_segments: lock(&self.inner.segments).0.len(),
            last_seq: counters.last_seq.load(Ordering::Relaxed),
            flushed_seq: lock(&self.inner.manifest).state().flushed_seq,
            group_commits: counters.group_commits.load(Ordering::Relaxed),
            flushes: counters.flushes.load(Ordering::Relaxed),
            compactions: counters.compactions.load(Ordering::Relaxed),
            table_rewrites: counters.table_rewrites.load(Ordering::Relaxed),
            cached_block_bytes: self.inner.block_cache.as_ref().map_or(0, |cache| cache.bytes()),
            wal_segments_recycled: counters.wal_recycled.load(Ordering::Relaxed),
        }
    }

    /// Bytes of every file in the engine's directory.
    pub fn disk_bytes(&self) -> Result<u64> {
        let dir = &self.inner.dir;
        let mut total = 0;
        for name in self.inner.fs.list(dir).ctx("list", dir)? {
            if let Ok(file) = self.inner.fs.open(&dir.join(&name)) {
                total += file.len().unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Why the engine stopped accepting writes, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failed).clone()
    }

    /// Graceful close: finishes queued writes, flushes every memtable to
    /// verified tables, retires the WAL they cover, and stops the threads.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// [`Engine::close`] for a shared engine: afterwards every write fails
    /// with [`Error::Closed`]; reads still work.
    pub fn shutdown(&self) -> Result<()> {
        if lock(&self.threads).is_empty() {
            return Err(Error::Closed);
        }
        let flushed = if self.failure().is_none() { self.flush() } else { Ok(()) };
        self.stop();
        flushed?;
        self.inner.retire_flushed_segments()?;
        match self.failure() {
            Some(reason) => Err(Error::Failed(reason)),
            None => Ok(()),
        }
    }

    /// Stops the threads without flushing (what `Drop` does). Everything
    /// acknowledged is already in the WAL.
    fn stop(&self) {
        lock(&self.inner.queue).closing = true;
        self.inner.queue_cv.notify_all();
        lock(&self.inner.background).closing = true;
        self.inner.background_cv.notify_all();
        for handle in lock(&self.threads).drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens table `id` of sorted run `run`, its point reads going through
/// `cache` if there is one.
fn open_table(fs: &dyn Fs, path: &Path, id: u64, run: u64, cache: Option<&Arc<BlockCache>>) -> Result<Table> {
    let table = Table::open(fs, path, id)?.with_run(run);
    Ok(match cache {
        Some(cache) => table.with_cache(cache.clone()),
        None => table,
    })
}

fn sort_newest_first(tables: &mut [Arc<Table>]) {
    tables.sort_by_key(|t| std::cmp::Reverse((t.props().max_seq, t.id())));
}

/// Removes table files the manifest does not name (left by a crash between
/// writing a table and committing its edit) and temporary files.
fn remove_orphans(fs: &dyn Fs, dir: &Path, known: impl Fn(u64) -> bool) -> Result<()> {
    let mut removed = false;
    for name in fs.list(dir).ctx("list", dir)? {
        let path = dir.join(&name);
        let orphan = match parse_table_name(&name) {
            Some(id) => !known(id),
            None => is_data_file(&path),
        };
        if orphan {
            tracing::info!(path = %path.display(), "removing a table file no manifest names");
            fs.remove(&path).ctx("remove", &path)?;
            removed = true;
        }
    }
    if removed {
        fs.sync_dir(dir).ctx("sync directory", dir)?;
    }
    Ok(())
}

impl Inner {
    fn levels(&self) -> Arc<Levels> {
        read(&self.levels).clone()
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "storage engine stops accepting writes");
        lock(&self.failed).get_or_insert(reason);
        self.background_cv.notify_all();
    }

    fn wake_background(&self, compaction: bool) {
        let mut background = lock(&self.background);
        background.compaction_wanted |= compaction;
        drop(background);
        self.background_cv.notify_all();
    }

    /// Freezes the active memtable (where groups are applied, or open
    /// before the threads start).
    /// Returns the last sequence in it.
    fn rotate(&self) -> u64 {
        let mut levels = write(&self.levels);
        let max_seq = read(&levels.active).seq_range().1;
        if read(&levels.active).is_empty() {
            return max_seq;
        }
        let mut frozen = vec![levels.active.clone()];
        frozen.extend(levels.frozen.iter().cloned());
        // A flushed memtable's memory if there is one; else (the first
        // rotations, or a flush behind) a hash table sized for as many keys
        // as the memtable just frozen, within half the budget.
        let spare = lock(&self.spare_memtable)
            .take()
            .unwrap_or_else(|| Memtable::with_capacity(read(&levels.active).len(), self.opts.memtable_bytes_max / 2));
        let active = Arc::new(RwLock::new(spare));
        *levels = Arc::new(Levels { active, frozen, tables: levels.tables.clone() });
        drop(levels);
        self.wake_background(false);
        max_seq
    }

    /// Blocks the thread applying groups (and so, soon, the commit thread)
    /// while too many memtables wait for flush.
    fn wait_for_flush_room(&self) {
        let mut background = lock(&self.background);
        while self.levels().frozen.len() >= self.opts.frozen_memtables_max.max(1)
            && !background.closing
            && lock(&self.failed).is_none()
        {
            background = self
                .background_cv
                .wait_timeout(background, Duration::from_millis(100))
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Waits until every write up to `seq` is in tables.
    fn wait_flushed(&self, seq: u64) -> Result<()> {
        let mut background = lock(&self.background);
        loop {
            if lock(&self.manifest).state().flushed_seq >= seq || self.levels().frozen.is_empty() {
                return Ok(());
            }
            if let Some(reason) = lock(&self.failed).clone() {
                return Err(Error::Failed(reason));
            }
            if let Some(reason) = background.flush_error.clone() {
                return Err(Error::Failed(format!("flush failed (the data is safe in the WAL): {reason}")));
            }
            if background.closing {
                return Err(Error::Closed);
            }
            background = self
                .background_cv
                .wait_timeout(background, Duration::from_millis(100))
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// A table builder writing into a kept buffer, if one is free.
    fn table_builder(&self, min_seq: u64, max_seq: u64) -> TableBuilder {
        let buf = lock(&self.table_buffers).pop().unwrap_or_default();
        TableBuilder::with_buffer(buf, self.opts.block_bytes, self.opts.bloom_bits_per_key, min_seq, max_seq)
    }

    /// Keeps a flushed memtable's memory for the next active one, if no
    /// reader holds it any more (one that does frees it when done).
    fn recycle(&self, memtable: Arc<RwLock<Memtable>>) {
        if let Ok(memtable) = Arc::try_unwrap(memtable) {
            let mut memtable = memtable.into_inner().unwrap_or_else(|p| p.into_inner());
            // A hash table grown past half the budget would leave the next
            // memtable too little room for entries.
            memtable.clear(self.opts.memtable_bytes_max / 2);
            *lock(&self.spare_memtable) = Some(memtable);
        }
    }

    /// Keeps a finished table's buffer for the next (two for flushes, one
    /// for compaction: at most three are kept).
    fn return_table_buffer(&self, buf: Vec<u8>) {
        let mut buffers = lock(&self.table_buffers);
        if buffers.len() < 3 {
            buffers.push(buf);
        }
    }

    /// Writes `bytes` as a new table file, syncs it, reads it back and
    /// compares it with `bytes`; retries with a new file if they differ. The
    /// table joins `run`, or starts a run of its own.
    fn write_table(&self, bytes: &[u8], run: Option<u64>) -> Result<Arc<Table>> {
        let attempts = self.opts.table_write_attempts.max(1);
        let mut last_error = None;
        for attempt in 1..=attempts {
            let id = lock(&self.manifest).next_file_id();
            let path = self.dir.join(table_name(id));
            let written = (|| {
                self.fs.write_new(&path, bytes).ctx("write", &path)?;
                self.fs.sync_dir(&self.dir).ctx("sync directory", &self.dir)?;
                // Read back from the disk and compared with what the builder
                // made, byte for byte.
                if let Some(offset) = self.fs.first_difference(&path, bytes).ctx("read back", &path)? {
                    return Err(Error::corrupt(&path, offset, "the table read back differs from what was written"));
                }
                open_table(self.fs.as_ref(), &path, id, run.unwrap_or(id), self.block_cache.as_ref())
            })();
            match written {
                Ok(table) => return Ok(Arc::new(table)),
                Err(error) => {
                    tracing::warn!(path = %path.display(), attempt, %error, "new table failed verification; writing it again");
                    self.counters.table_rewrites.fetch_add(1, Ordering::Relaxed);
                    let _ = self.fs.remove(&path);
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or(Error::Closed))
    }

    /// Flushes one frozen memtable: builds its table, then writes it in.
    fn flush(&self, memtable: &Arc<RwLock<Memtable>>) -> Result<()> {
        let built = self.build_flush(memtable);
        let written = self.write_flush(memtable, built.as_ref());
        if let Some(built) = built {
            self.return_table_buffer(built.bytes);
        }
        written
    }

    /// The table of a frozen memtable, in memory (`None` if it is empty).
    fn build_flush(&self, memtable: &RwLock<Memtable>) -> Option<BuiltFlush> {
        let memtable = read(memtable);
        if memtable.is_empty() {
            return None;
        }
        let (min_seq, max_seq) = memtable.seq_range();
        let mut builder = self.table_builder(min_seq, max_seq);
        for entry in memtable.sorted() {
            builder.add_encoded(entry.key, entry.value, entry.hlc_range, entry.all_tombstones);
        }
        Some(BuiltFlush { bytes: builder.finish().0, max_seq })
    }

    /// Writes a built flush of the **oldest** frozen `memtable`: verified
    /// table, manifest edit, swap, WAL cleanup.
    fn write_flush(&self, memtable: &Arc<RwLock<Memtable>>, built: Option<&BuiltFlush>) -> Result<()> {
        let table = match built {
            Some(built) => Some((self.write_table(&built.bytes, None)?, built.max_seq)),
            None => None,
        };
        {
            let mut manifest = lock(&self.manifest);
            if let Some((table, max_seq)) = &table {
                let meta =
                    TableMeta { id: table.id(), run: table.run(), size: table.size(), props: table.props().clone() };
                manifest.commit(Edit { added: vec![meta], flushed_seq: Some(*max_seq), ..Edit::default() })?;
            }
            let mut levels = write(&self.levels);
            let frozen = levels.frozen.iter().filter(|m| !Arc::ptr_eq(m, memtable)).cloned().collect();
            let mut tables = levels.tables.clone();
            if let Some((table, _)) = table {
                tables.insert(0, table);
            }
            *levels = Arc::new(Levels { active: levels.active.clone(), frozen, tables });
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.wake_background(true);
        self.retire_flushed_segments()
    }

    /// Retires WAL segments whose every record is in tables (see
    /// [`wal::retire`]). Never the one being written.
    fn retire_flushed_segments(&self) -> Result<()> {
        let flushed = lock(&self.manifest).state().flushed_seq;
        let mut segments = lock(&self.segments);
        let current = segments.1;
        let (dead, live): (Vec<SegmentInfo>, Vec<SegmentInfo>) =
            segments.0.iter().partition(|s| s.number != current && s.last_seq.is_none_or(|last| last <= flushed));
        let dead: Vec<u64> = dead.iter().map(|s| s.number).collect();
        wal::retire(self.fs.as_ref(), &self.dir, &dead)?;
        segments.0 = live;
        Ok(())
    }

    /// Runs one compaction: the planned one, or all tables if `full`.
    /// Returns whether it merged anything.
    fn compact(&self, full: bool) -> Result<bool> {
        let _only_one = lock(&self.compaction_lock);
        let tables = self.levels().tables.clone();
        let runs: Vec<u64> = if full {
            tables.iter().map(|t| t.run()).collect()
        } else {
            let policy = Policy {
                min_runs: self.opts.compaction_min_tables,
                max_runs: self.opts.compaction_max_tables,
                small_run_bytes: (self.opts.memtable_bytes_max / 4) as u64,
            };
            let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
            for table in &tables {
                *sizes.entry(table.run()).or_default() += table.size();
            }
            let sizes: Vec<RunSize> = sizes.into_iter().map(|(run, bytes)| RunSize { run, bytes }).collect();
            compaction::plan(&sizes, &policy).unwrap_or_default()
        };
        if runs.is_empty() {
            return Ok(false);
        }
        let (inputs, outside): (Vec<Arc<Table>>, Vec<Arc<Table>>) =
            tables.into_iter().partition(|t| runs.contains(&t.run()));
        let ids: Vec<u64> = inputs.iter().map(|t| t.id()).collect();
        let outputs = self.merge_tables(&inputs, &outside)?;
        let committed = {
            let mut manifest = lock(&self.manifest);
            let added = outputs
                .iter()
                .map(|t| TableMeta { id: t.id(), run: t.run(), size: t.size(), props: t.props().clone() })
                .collect();
            let committed = manifest.commit(Edit { added, removed: ids.clone(), ..Edit::default() });
            if committed.is_ok() {
                let mut levels = write(&self.levels);
                let mut tables: Vec<Arc<Table>> =
                    levels.tables.iter().filter(|t| !ids.contains(&t.id())).cloned().collect();
                tables.extend(outputs.iter().cloned());
                sort_newest_first(&mut tables);
                *levels = Arc::new(Levels { active: levels.active.clone(), frozen: levels.frozen.clone(), tables });
            }
            committed
        };
        let obsolete = if committed.is_ok() { &inputs } else { &outputs };
        for table in obsolete {
            let _ = self.fs.remove(table.path());
        }
        self.fs.sync_dir(&self.dir).ctx("sync directory", &self.dir)?;
        committed?;
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Merges `inputs` into new verified tables. Tombstones may be dropped
    /// only when no table in `outside` can hold an older version of the key.
    ///
    /// A key held by one input only, in a table without tombstones, is
    /// copied as stored: nothing to merge and nothing to drop, so its bytes
    /// are not decoded and encoded again.
    fn merge_tables(&self, inputs: &[Arc<Table>], outside: &[Arc<Table>]) -> Result<Vec<Arc<Table>>> {
        let min_seq = inputs.iter().map(|t| t.props().min_seq).min().unwrap_or(0);
        let max_seq = inputs.iter().map(|t| t.props().max_seq).max().unwrap_or(0);
        let horizon_ms = now_ms().saturating_sub(self.opts.tombstone_grace_ms);
        let new_builder = || self.table_builder(min_seq, max_seq);
        let mut outputs: Vec<Arc<Table>> = Vec::new();
        let mut builder = new_builder();
        // Writes the builder's table as the next file of this merge's run
        // (the first file's id names the run) and starts a new one in the
        // buffer it leaves.
        let emit = |builder: &mut TableBuilder, outputs: &mut Vec<Arc<Table>>| -> Result<()> {
            let run = outputs.first().map(|t| t.run());
            let bytes = std::mem::replace(builder, TableBuilder::new(0, 0, 0, 0)).finish().0;
            let written = self.write_table(&bytes, run);
            self.return_table_buffer(bytes);
            *builder = new_builder();
            outputs.push(written?);
            Ok(())
        };
        let result = (|| {
            let mut scans: Vec<TableScan> = inputs.iter().map(|t| TableScan::new(t.clone())).collect::<Result<_>>()?;
            // The inputs whose current entry has the smallest key.
            let mut holders: Vec<usize> = Vec::with_capacity(scans.len());
            loop {
                holders.clear();
                let mut smallest: Option<&[u8]> = None;
                for (i, scan) in scans.iter().enumerate() {
                    let Some((key, _)) = scan.head() else { continue };
                    match smallest.map(|s| key.cmp(s)) {
                        None | Some(std::cmp::Ordering::Less) => {
                            smallest = Some(key);
                            holders.clear();
                            holders.push(i);
                        }
                        Some(std::cmp::Ordering::Equal) => holders.push(i),
                        Some(std::cmp::Ordering::Greater) => {}
                    }
                }
                let Some(key) = smallest else { break };
                let stored = |i: usize| scans[i].head().map_or(&[][..], |(_, value)| value);
                let props = scans[holders[0]].table().props();
                if holders.len() == 1 && props.tombstone_entries == 0 {
                    builder.add_raw(key, stored(holders[0]), (props.min_hlc, props.max_hlc));
                } else {
                    let mut merged = Siblings::default();
                    for &i in &holders {
                        merged.merge(scans[i].table().decode_value(stored(i))?);
                    }
                    if !droppable(key, &merged, horizon_ms, outside) {
                        builder.add(key, &merged);
                    }
                }
                if builder.estimated_bytes() >= self.opts.table_bytes_target {
                    emit(&mut builder, &mut outputs)?;
                }
                for &i in &holders {
                    scans[i].advance()?;
                }
            }
            if builder.entries() > 0 {
                emit(&mut builder, &mut outputs)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(outputs),
            Err(e) => {
                for table in &outputs {
                    let _ = self.fs.remove(table.path());
                }
                Err(e)
            }
        }
    }
}

/// Whether a merged entry can leave the store: all tombstones, the newest
/// older than the horizon, and nothing older of it outside the merge.
fn droppable(key: &[u8], siblings: &Siblings, horizon_ms: u64, outside: &[Arc<Table>]) -> bool {
    let Some(newest) = siblings.winner() else { return true };
    siblings.all_tombstones()
        && newest.hlc.physical_ms() < horizon_ms
        && outside.iter().all(|t| t.props().min_hlc > newest.hlc.0 || !t.may_contain(key))
}

/// Groups with fewer keys are applied by the commit thread (when the apply
/// thread is idle): inserting them is quick next to a thread hand-off.
const HAND_OFF_KEYS_MIN: usize = 1024;

fn commit_loop(inner: Arc<Inner>, mut wal: WalWriter, mut next_seq: u64) {
    // The apply stage runs one group behind: while it inserts group N into
    // the memtable and acknowledges it, this thread writes and syncs group
    // N+1. The channel holds one group, so at most three are in hand. A
    // group is handed over only when that pays: when it is large (inserting
    // it takes about as long as a sync) and more writes wait. Otherwise, if
    // the apply thread is idle, this thread applies the group itself,
    // sparing small groups and a lone writer a thread hand-off (handing
    // every group over cost a lone writer a fifth of its writes).
    let (to_apply, applying) = std::sync::mpsc::sync_channel::<Durable>(1);
    // Groups handed to the apply thread and not yet applied.
    let handed = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let applier = std::thread::Builder::new()
            .name("quiver-apply".into())
            .spawn_scoped(scope, || apply_loop(&inner, applying, &handed));
        if let Err(e) = applier {
            inner.fail(format!("cannot start the apply thread: {e}"));
        }
        loop {
            let requests = {
                let mut queue = lock(&inner.queue);
                while queue.requests.is_empty() && !queue.closing {
                    queue.committer_waiting = true;
                    queue = inner.queue_cv.wait(queue).unwrap_or_else(|p| p.into_inner());
                    queue.committer_waiting = false;
                }
                if queue.requests.is_empty() {
                    break;
                }
                std::mem::take(&mut queue.requests)
            };
            let mut writes = Vec::with_capacity(requests.len());
            let mut rotations = Vec::new();
            for request in requests {
                match request {
                    Request::Write { encoded, done } => writes.push((encoded, done)),
                    Request::Rotate { done } => rotations.push(done),
                }
            }
            let group = if writes.is_empty() { None } else { commit_group(&inner, &mut wal, &mut next_seq, writes) };
            if group.is_none() && rotations.is_empty() {
                continue;
            }
            let keys: usize = group.as_ref().map_or(0, |(_, writes)| writes.iter().map(|(e, _)| e.ops().len()).sum());
            let durable = Durable { group, rotations };
            let worth_handing = keys >= HAND_OFF_KEYS_MIN && !lock(&inner.queue).requests.is_empty();
            // Acquire: every group handed over before is in the memtable.
            if handed.load(Ordering::Acquire) == 0 && !worth_handing {
                apply(&inner, durable);
                continue;
            }
            handed.fetch_add(1, Ordering::Relaxed);
            if let Err(std::sync::mpsc::SendError(unsent)) = to_apply.send(durable) {
                // Only if the apply thread is gone (it could not start, or
                // panicked): nothing synced can become visible, so fail.
                let reason = "the apply thread stopped".to_owned();
                inner.fail(reason.clone());
                unsent.fail(&reason);
            }
        }
        drop(to_apply);
    });
    if let Err(e) = wal.close() {
        tracing::warn!(error = %e, "closing the WAL");
    }
}

type Write = (EncodedOps, Done);

/// A group that is durable in the WAL (its first sequence and its writes),
/// and the rotations asked for after it, in the order they were submitted.
struct Durable {
    group: Option<(u64, Vec<Write>)>,
    rotations: Vec<oneshot::Sender<Result<u64>>>,
}

impl Durable {
    fn fail(self, reason: &str) {
        for (_, done) in self.group.into_iter().flat_map(|(_, writes)| writes) {
            done(Err(Error::Failed(reason.to_owned())));
        }
        for done in self.rotations {
            let _ = done.send(Err(Error::Failed(reason.to_owned())));
        }
    }
}

/// Writes a group to the WAL with one durable write (see
/// [`WalWriter::append_group`]). Returns its first sequence and its writes
/// once durable; on failure, fails the engine and answers each write with
/// the error.
fn commit_group(
    inner: &Inner,
    wal: &mut WalWriter,
    next_seq: &mut u64,
    writes: Vec<Write>,
) -> Option<(u64, Vec<Write>)> {
    if let Some(reason) = lock(&inner.failed).clone() {
        for (_, done) in writes {
            done(Err(Error::Failed(reason.clone())));
        }
        return None;
    }
    let group = *next_seq;
    let last = group + writes.len() as u64 - 1;
    let synced = wal.append_group(group, writes.iter().map(|(encoded, _)| encoded.bytes()));
    let segment = match synced {
        Ok(segment) => segment,
        Err(e) => {
            // After a failed write or fsync the file's state is unknown
            // (fsync errors are not retryable on Linux): stop writing.
            inner.fail(e.to_string());
            for (_, done) in writes {
                done(Err(Error::Failed(e.to_string())));
            }
            return None;
        }
    };
    *next_seq = last + 1;
    {
        let mut segments = lock(&inner.segments);
        match segments.0.last_mut() {
            Some(info) if info.number == segment => info.last_seq = Some(last),
            _ => segments.0.push(SegmentInfo { number: segment, last_seq: Some(last) }),
        }
        segments.1 = segment;
    }
    inner.counters.last_seq.store(last, Ordering::Relaxed);
    inner.counters.group_commits.fetch_add(1, Ordering::Relaxed);
    Some((group, writes))
}

/// The apply thread: [`apply`]s each group handed to it, in order.
fn apply_loop(inner: &Inner, applying: std::sync::mpsc::Receiver<Durable>, handed: &AtomicU64) {
    for durable in applying {
        apply(inner, durable);
        // Release: the commit thread may apply the next group itself once
        // it sees this one done.
        handed.fetch_sub(1, Ordering::Release);
    }
}

/// Inserts a durable group into the active memtable, acknowledges its
/// writes, and rotates the memtable when it is full or asked to. Runs on the
/// apply thread, or on the commit thread when the apply thread is idle; one
/// group at a time either way, in order.
fn apply(inner: &Inner, Durable { group, rotations }: Durable) {
    if let Some((group, writes)) = group {
        let mut acks = Vec::with_capacity(writes.len());
        {
            let levels = inner.levels();
            let mut active = write(&levels.active);
            for (i, (encoded, done)) in writes.into_iter().enumerate() {
                let seq = group + i as u64;
                active.apply(seq, &encoded, inner.opts.siblings_max);
                acks.push((done, seq));
            }
        }
        // Acknowledge only now: the group is durable (fdatasync returned)
        // and visible to readers.
        for (done, seq) in acks {
            done(Ok(seq));
        }
    }
    let full = read(&inner.levels().active).bytes() >= inner.opts.memtable_bytes_max;
    if full || !rotations.is_empty() {
        inner.wait_for_flush_room();
        let seq = inner.rotate();
        for done in rotations {
            let _ = done.send(Ok(seq));
        }
    }
}

/// A frozen memtable's table, built in memory and not yet written.
struct BuiltFlush {
    bytes: Vec<u8>,
    /// The memtable's last sequence: flushed once the table is in.
    max_seq: u64,
}

/// The flush thread: builds the table of each frozen memtable, oldest first,
/// and hands it to the flush writer (which `spawn`s here), so the next table
/// is built while the last one is written, synced and read back. Handed over
/// at a rendezvous: at most one built table waits beside the one being
/// written.
fn flush_loop(inner: Arc<Inner>) {
    let (hand, writing) = std::sync::mpsc::sync_channel::<HandedFlush>(0);
    std::thread::scope(|scope| {
        let writer = std::thread::Builder::new()
            .name("quiver-flush-io".into())
            .spawn_scoped(scope, || flush_write_loop(&inner, writing));
        if let Err(e) = writer {
            inner.fail(format!("cannot start the flush writer thread: {e}"));
            return;
        }
        // The last sequence of the last memtable handed over: the writer
        // owns it (and every older one) from then on.
        let mut handed_seq = 0;
        loop {
            let next = {
                let mut background = lock(&inner.background);
                loop {
                    let levels = inner.levels();
                    let oldest_unbuilt = levels.frozen.iter().rev().find(|m| read(m).seq_range().1 > handed_seq);
                    if let Some(memtable) = oldest_unbuilt {
                        break Some(memtable.clone());
                    }
                    if background.closing {
                        break None;
                    }
                    background = inner.background_cv.wait(background).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Some(memtable) = next else { break };
            let built = inner.build_flush(&memtable);
            handed_seq = read(&memtable).seq_range().1;
            if hand.send((memtable, built)).is_err() {
                // The writer stopped: the engine is closing.
                break;
            }
        }
        drop(hand);
    });
}

/// A frozen memtable and its built table, on the way to the flush writer.
type HandedFlush = (Arc<RwLock<Memtable>>, Option<BuiltFlush>);

/// Writes each built flush in, in the order built (oldest first); a failed
/// one is tried again until it succeeds or the engine closes.
fn flush_write_loop(inner: &Inner, writing: std::sync::mpsc::Receiver<HandedFlush>) {
    for (memtable, built) in writing {
        loop {
            match inner.write_flush(&memtable, built.as_ref()) {
                Ok(()) => {
                    lock(&inner.background).flush_error = None;
                    break;
                }
                Err(error) => {
                    // The data stays in the WAL; writes stall once the frozen
                    // memtables fill up, and the flush is tried again.
                    tracing::error!(%error, "flush failed; retrying");
                    let mut background = lock(&inner.background);
                    background.flush_error = Some(error.to_string());
                    inner.background_cv.notify_all();
                    if background.closing {
                        return;
                    }
                    let _ = inner.background_cv.wait_timeout(background, Duration::from_millis(200));
                }
            }
        }
        if let Some(built) = built {
            inner.return_table_buffer(built.bytes);
        }
        inner.recycle(memtable);
    }
}

fn compact_loop(inner: Arc<Inner>) {
    loop {
        {
            let mut background = lock(&inner.background);
            while !(background.closing || background.compaction_wanted && inner.opts.background_compaction) {
                background = inner.background_cv.wait(background).unwrap_or_else(|p| p.into_inner());
            }
            if background.closing {
                return;
            }
            background.compaction_wanted = false;
        }
        loop {
            match inner.compact(false) {
                Ok(true) if !lock(&inner.background).closing => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "compaction failed; the input tables stay");
                    break;
                }
            }
        }
    }
}
