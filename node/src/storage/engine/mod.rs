//! The engine: its public API and the state its threads share.
//!
//! Who does what, one file each:
//! - [`commit`] (thread `quiver-commit`): takes every queued write, writes
//!   them to the WAL as one group with one durable write, and hands the
//!   durable group to apply.
//! - [`apply`] (thread `quiver-apply`, or commit itself when apply is idle):
//!   inserts each durable group into the active memtable and only then
//!   **acknowledges** its writes; rotates the memtable when it is full.
//! - [`flush`] (threads `quiver-flush` and `quiver-flush-io`): builds the
//!   table of each frozen memtable, writes and verifies it, commits the
//!   manifest edit, swaps the table in for the memtable, and **retires the
//!   WAL segments** the tables now cover.
//! - [`compact`] (thread `quiver-compact`): merges tables chosen by
//!   [`compaction::plan`](crate::storage::compaction::plan).
//! - [`recovery`] (the opening thread, before the others start): opens the
//!   manifest and tables, removes orphans, replays the WAL into memtables.
//!
//! This file holds what they share ([`Inner`]) and what callers use
//! ([`Engine`]). Readers take a snapshot of [`Levels`] (an `Arc`) and merge
//! what they find in the memtables and tables; the merge rule does not
//! depend on order.

mod apply;
mod commit;
mod compact;
mod flush;
mod recovery;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use quiver_ring::{Hlc, Siblings};
use tokio::sync::oneshot;

use crate::storage::cache::{BlockCache, ClockCache, KeyedBytes};
use crate::storage::compaction::{merge_siblings, EntryIter, MergeIter};
use crate::storage::disk::{Fs, RealFs, SkipWriteFs};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::manifest::Manifest;
use crate::storage::memtable::Memtable;
use crate::storage::sstable::{KeyFilter, Table};
use crate::storage::wal::{self, SegmentInfo};
use crate::storage::{EncodedOps, Op};
use crate::{lock, now_ms};

use commit::{Queue, Request};

/// Engine settings. Memory use is bounded by `memtable_bytes_max *
/// (frozen_memtables_max + 1)` plus three table buffers (a flush being
/// built, one being written, a compaction output; all kept for reuse) of at
/// most `table_bytes_target` bytes each, plus `block_cache_bytes` and
/// `value_cache_bytes`, whatever
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
    /// Budget of the cache of what reads found in the tables: a key's
    /// versions merged from every table, valid until the tables change (a
    /// flush or compaction). A read of a key found there reads no file.
    /// 0: no value cache.
    pub value_cache_bytes: usize,
    /// Whether a flush puts what it wrote into the value cache, in room the
    /// cache has free (it never evicts what reads put there), so that the
    /// first read of a key just flushed reads no file, as it read none while
    /// the key was in the memtable.
    pub warm_value_cache_on_flush: bool,
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
    /// What else decides whether a data key's tombstones past the grace
    /// period may go (a cluster node's anti-entropy); `None`: the grace
    /// period alone.
    pub purge: Option<Arc<dyn Purge>>,
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
            value_cache_bytes: 256 << 20,
            warm_value_cache_on_flush: true,
            bloom_bits_per_key: 10,
            table_bytes_target: 64 << 20,
            compaction_min_tables: 8,
            compaction_max_tables: 32,
            background_compaction: true,
            tombstone_grace_ms: 10 * 24 * 3600 * 1000,
            purge: None,
            table_write_attempts: 16,
            manifest_edits_max: 1024,
            repair: false,
            debug_skip_write_probability: 0.0,
        }
    }
}

/// Decides, beside the grace period, which deleted data keys compaction
/// may drop, and hears which it dropped. Called on the compaction thread:
/// quick, no I/O.
pub trait Purge: Send + Sync + std::fmt::Debug {
    /// Whether `key` (a user key), all tombstones past the grace period,
    /// and written here at sequence `written_seq` or before, may be dropped.
    fn may_drop(&self, key: &[u8], written_seq: u64) -> bool;
    /// `keys` were dropped: the tables without them are the ones readers
    /// see.
    fn dropped(&self, keys: Vec<Vec<u8>>);
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
    /// Groups of writes refused, nothing written, for want of space or
    /// file descriptors: no WAL segment could be made, or no flush could
    /// make room for more memtables.
    pub groups_refused: u64,
    /// Table entries whose versions are all tombstones (a key in several
    /// tables counts several times).
    pub table_tombstones: u64,
    /// Deleted keys compaction dropped (past the grace period, and with a
    /// [`Purge`] where it allowed).
    pub tombstones_dropped: u64,
}

/// The readable state: memtables and tables, newest first.
#[derive(Debug)]
struct Levels {
    active: Arc<RwLock<Memtable>>,
    frozen: Vec<Arc<RwLock<Memtable>>>,
    tables: Vec<Arc<Table>>,
    /// Which set of tables this is: one more each time the tables change
    /// (a flush adds one, a compaction replaces some). The value cache
    /// keeps what it read from tables under this number; an entry of an
    /// older number is used only if [`Levels::changes`] shows that no
    /// change since could have changed what the tables hold of its key.
    tables_generation: u64,
    /// The last few changes of the tables, oldest first, each with the
    /// generation it made.
    changes: Arc<VecDeque<(u64, TablesChange)>>,
}

/// How many changes of the tables [`Levels::changes`] remembers: a cached
/// read older than that is read again.
const CHANGES_KEPT: usize = 16;

/// One change of the tables, as the value cache sees it.
#[derive(Clone, Debug)]
pub(super) enum TablesChange {
    /// A flush added a table: a key it may hold may have new versions.
    Flushed(KeyFilter),
    /// A change that left every key's merged versions as they were: a
    /// compaction that dropped only what merging drops anyway, or a flush
    /// of an empty memtable.
    Kept,
    /// A compaction that dropped keys (tombstones past their grace).
    Dropped,
}

impl Levels {
    /// These levels after one more change of the tables, now `tables`.
    fn changed(&self, frozen: Vec<Arc<RwLock<Memtable>>>, tables: Vec<Arc<Table>>, change: TablesChange) -> Levels {
        let generation = self.tables_generation + 1;
        let mut changes = VecDeque::clone(&self.changes);
        if changes.len() == CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back((generation, change));
        Levels {
            active: self.active.clone(),
            frozen,
            tables,
            tables_generation: generation,
            changes: Arc::new(changes),
        }
    }

    /// Whether what the tables of generation `generation` held of `key` is
    /// still what these tables hold of it.
    fn unchanged_since(&self, generation: u64, key: &[u8]) -> bool {
        if generation == self.tables_generation {
            return true;
        }
        // Every change after `generation` must be remembered, and none may
        // have touched `key`.
        let mut after = self.changes.iter().skip_while(|(made, _)| *made <= generation).peekable();
        if after.peek().is_none_or(|(made, _)| *made != generation + 1) {
            return false;
        }
        after.all(|(_, change)| match change {
            TablesChange::Flushed(filter) => !filter.may_hold(key),
            TablesChange::Kept => true,
            TablesChange::Dropped => false,
        })
    }

    /// The versions of `key` in the memtables merged with `in_tables`, what
    /// the tables hold of it.
    fn with_memtables(&self, key: &[u8], in_tables: Option<Siblings>) -> Option<Siblings> {
        let mut found = self.in_memtables(key);
        if let Some(siblings) = in_tables {
            merge_into(&mut found, siblings);
        }
        found
    }

    /// Whether a table may hold `key`, by its key range and bloom filter
    /// (in memory, no file read).
    fn tables_may_hold(&self, key: &[u8]) -> bool {
        self.tables.iter().any(|table| table.may_hold(key))
    }

    /// The versions of `key` in the tables, merged (a file read for each
    /// table whose key range and bloom filter admit the key).
    fn in_tables(&self, key: &[u8]) -> Result<Option<Siblings>> {
        let mut found = None;
        for table in &self.tables {
            if let Some(siblings) = table.get(key)? {
                merge_into(&mut found, siblings);
            }
        }
        Ok(found)
    }

    /// The versions of `key` in the memtables, merged.
    fn in_memtables(&self, key: &[u8]) -> Option<Siblings> {
        let mut found = read(&self.active).get(key);
        for memtable in &self.frozen {
            if let Some(siblings) = read(memtable).get(key) {
                merge_into(&mut found, siblings);
            }
        }
        found
    }
}

/// The value cache: per key, what the tables held of it, encoded (see
/// [`cache_entry`]) beside the key in one allocation, and the generation of
/// the tables it was read from.
type ValueCache = ClockCache<KeyedBytes, u64>;

/// A value cache entry for `key`, whose versions in the tables are `found`
/// encoded as a table stores them (`postcard(Siblings)`; no bytes: none),
/// with the bytes it takes in memory. A hit reads one allocation and
/// decodes it, where a tree of versions would be several allocations, each
/// likely a cache miss in a cache this large; and an entry takes about
/// two-thirds of the memory (~240 bytes for a 100-byte value).
fn cache_entry(key: &[u8], found: &Option<Siblings>) -> Option<(KeyedBytes, usize)> {
    let encoded = match found {
        Some(siblings) => postcard::to_allocvec(siblings).ok()?,
        None => Vec::new(),
    };
    keyed_entry(key, &encoded)
}

/// A value cache entry for `key` from versions already encoded, with the
/// bytes it takes in memory.
fn keyed_entry(key: &[u8], encoded: &[u8]) -> Option<(KeyedBytes, usize)> {
    let entry = KeyedBytes::new(key, encoded)?;
    let bytes = cached_bytes(&entry);
    Some((entry, bytes))
}

/// About the bytes a value cache entry takes in memory: its slots in the
/// map (with the map's spare room) and in the clock, the allocation's
/// reference counts and the allocator's rounding, and the allocation.
fn cached_bytes(entry: &KeyedBytes) -> usize {
    const ENTRY: usize = 96;
    ENTRY + entry.len()
}

/// What a value cache entry says the tables hold of its key.
fn cached_versions(entry: &KeyedBytes) -> Option<Option<Siblings>> {
    match entry.bytes() {
        [] => Some(None),
        encoded => postcard::from_bytes(encoded).ok().map(Some),
    }
}

/// Adds `siblings` to what was `found` so far (the merge does not depend on
/// order).
fn merge_into(found: &mut Option<Siblings>, siblings: Siblings) {
    match found {
        Some(all) => all.merge(siblings),
        None => *found = Some(siblings),
    }
}

/// Called once with a write's outcome: its WAL sequence number once durable,
/// or why it failed. Runs on the engine's commit or apply thread, so it must
/// be quick (send a message, wake a task).
pub type Done = Box<dyn FnOnce(Result<u64>) + Send>;

#[derive(Debug, Default)]
struct Background {
    closing: bool,
    compaction_wanted: bool,
    flush_error: Option<String>,
    /// Failed flush attempts so far: a caller waiting for a flush reports
    /// only a failure of an attempt made after it began to wait.
    flush_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    last_seq: AtomicU64,
    group_commits: AtomicU64,
    flushes: AtomicU64,
    compactions: AtomicU64,
    table_rewrites: AtomicU64,
    wal_recycled: Arc<AtomicU64>,
    /// See [`Stats::groups_refused`].
    groups_refused: AtomicU64,
    tombstones_dropped: AtomicU64,
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
    /// Held by the flush writer from a flush's manifest edit until its
    /// table is in and the value cache warmed, so that [`Engine::flush`]
    /// returns once everything the flush does is visible.
    flush_lock: Mutex<()>,
    /// Table buffers kept between flushes and between compaction outputs.
    table_buffers: Mutex<Vec<Vec<u8>>>,
    /// A flushed memtable, emptied, that the next rotation makes active.
    spare_memtable: Mutex<Option<Memtable>>,
    /// A manifest edit failed in a way that may have left it in effect:
    /// no more flushes or compactions until the engine is reopened.
    manifest_unknown: std::sync::atomic::AtomicBool,
    /// The last flush failed for want of a resource (space, descriptors):
    /// its error number, else 0. While it is set and the frozen memtables
    /// are at their bound, new writes are refused rather than left waiting
    /// for a flush that cannot happen yet.
    flush_out_of: std::sync::atomic::AtomicI32,
    failed: Mutex<Option<String>>,
    counters: Counters,
    /// Shared by every table's point reads (`None` when its budget is 0).
    block_cache: Option<Arc<BlockCache>>,
    /// What reads found in the tables (`None` when its budget is 0).
    value_cache: Option<ValueCache>,
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

    /// Opens the engine on any file system: recovers its state (see
    /// `recovery.rs`), then starts the threads.
    pub fn open_with(fs: Arc<dyn Fs>, dir: &Path, opts: Options) -> Result<Engine> {
        let recovery::Recovered { inner, wal, last_seq } = recovery::open(fs, dir, opts)?;
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.to_owned()).spawn(body).ctx("spawn thread", Path::new(name))
        };
        let mut threads = Vec::new();
        let commit_inner = inner.clone();
        threads.push(spawn("quiver-commit", Box::new(move || commit::commit_loop(commit_inner, wal, last_seq + 1)))?);
        let flush_inner = inner.clone();
        threads.push(spawn("quiver-flush", Box::new(move || flush::flush_loop(flush_inner)))?);
        let compact_inner = inner.clone();
        threads.push(spawn("quiver-compact", Box::new(move || compact::compact_loop(compact_inner)))?);
        inner.wake_background(true);
        Ok(Engine { inner, threads: Mutex::new(threads) })
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
        if let Err(Request::Write { done, .. }) = self.inner.submit(Request::Write { encoded, done: Box::new(done) }) {
            done(Err(Error::Closed));
        }
    }

    /// Calls `done` once every write submitted before this call is
    /// acknowledged (its `done` called), with the last sequence
    /// acknowledged then: what a reader of acknowledged writes waits for
    /// to know it heard of every write up to a sequence.
    pub fn after_acknowledged(&self, done: impl FnOnce(Result<u64>) + Send + 'static) {
        if let Err(Request::Barrier { done }) = self.inner.submit(Request::Barrier { done: Box::new(done) }) {
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
        if levels.tables.is_empty() {
            return Ok(levels.in_memtables(key));
        }
        let in_tables = match self.cached_in_tables(&levels, key) {
            Some(cached) => cached,
            None => {
                let found = levels.in_tables(key)?;
                let entry = self.inner.value_cache.as_ref().zip(cache_entry(key, &found));
                if let Some((cache, (entry, bytes))) = entry {
                    cache.insert(entry, levels.tables_generation, bytes);
                }
                found
            }
        };
        Ok(levels.with_memtables(key, in_tables))
    }

    /// The value [`Engine::get`] would return for `key` (its winning
    /// version's), when it needs no file read: when the value cache holds
    /// what the current tables have of `key`, or no table may hold it (by
    /// its key range and bloom filter), the answer comes from memory.
    /// `None` when a table would have to be read. The winner of a merge is
    /// the highest `(hlc, origin)` of either side, since nothing dominates
    /// the highest: no merge is made.
    pub fn value_in_memory(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let levels = self.inner.levels();
        let in_tables = match levels.tables.is_empty() {
            // No table: nothing cached, nothing to look up.
            true => None,
            false => match self.cached_in_tables(&levels, key) {
                Some(cached) => cached,
                None if levels.tables_may_hold(key) => return None,
                None => None,
            },
        };
        let winner_of = |found: Option<Siblings>| found.and_then(|s| s.into_versions().pop());
        let winner = match (winner_of(levels.in_memtables(key)), winner_of(in_tables)) {
            (Some(m), Some(t)) => Some(if m.order() > t.order() { m } else { t }),
            (m, t) => m.or(t),
        };
        Some(winner.and_then(|v| v.value))
    }

    /// What the tables of `levels` hold of `key`, if the value cache has it
    /// for exactly those tables.
    fn cached_in_tables(&self, levels: &Levels, key: &[u8]) -> Option<Option<Siblings>> {
        let cache = self.inner.value_cache.as_ref()?;
        let (entry, generation) = cache.get_with_key(key)?;
        if generation != levels.tables_generation {
            if !levels.unchanged_since(generation, key) {
                return None;
            }
            // Still what these tables hold: kept under their generation, it
            // outlives the changes remembered. Only this very entry: one
            // another thread cached meanwhile (a newer read, a flush's
            // warm) keeps its own generation.
            cache.replace_if(key, levels.tables_generation, |held| held.is(&entry));
        }
        cached_versions(&entry)
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
        self.inner.submit(Request::Rotate { done }).map_err(|_| Error::Closed)?;
        let seq = receiver.blocking_recv().unwrap_or(Err(Error::Closed))?;
        self.inner.wait_flushed(seq)?;
        drop(lock(&self.inner.flush_lock));
        Ok(())
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
            groups_refused: counters.groups_refused.load(Ordering::Relaxed),
            table_tombstones: levels.tables.iter().map(|t| t.props().tombstone_entries).sum(),
            tombstones_dropped: counters.tombstones_dropped.load(Ordering::Relaxed),
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
        self.inner.close_queue();
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

    /// Waits until every write up to `seq` is in tables.
    fn wait_flushed(&self, seq: u64) -> Result<()> {
        let mut background = lock(&self.background);
        let failures_before = background.flush_failures;
        // A flush waiting to be tried again (after running out of space,
        // say) is tried now.
        self.background_cv.notify_all();
        loop {
            if lock(&self.manifest).state().flushed_seq >= seq || self.levels().frozen.is_empty() {
                return Ok(());
            }
            if let Some(reason) = lock(&self.failed).clone() {
                return Err(Error::Failed(reason));
            }
            if let Some(reason) = background.flush_error.clone().filter(|_| background.flush_failures > failures_before)
            {
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
}
