//! Flushing (threads `quiver-flush` and `quiver-flush-io`): frozen
//! memtables become verified tables, and the WAL they cover is retired.
//!
//! - Owns: the order in which frozen memtables leave (oldest first, so the
//!   manifest's flushed sequence only grows), the kept table buffers, and
//!   the spare memtable the next rotation reuses.
//! - Receives: frozen memtables from [`apply`](super::apply) (in
//!   `Levels::frozen`, woken through `Inner::background_cv`).
//! - Does: `quiver-flush` builds each table in memory and hands it over at a
//!   rendezvous; `quiver-flush-io` writes it to a new file, syncs it, reads
//!   it back and compares ([`Inner::write_table`]), commits the manifest
//!   edit that names it durably, and only then swaps the table in for the
//!   memtable (which is then released), warms the value cache with the
//!   memtable's keys in the cache's free room ([`Inner::warm_value_cache`])
//!   and **deletes or recycles the WAL segments** every record of which is
//!   now in tables ([`Inner::retire_flushed_segments`]).
//! - Hands on: new tables to readers (a new `Levels`), what it wrote to the
//!   value cache, and a wake-up to [`compact`](super::compact).

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::recovery::open_table;
use super::{cache_entry, cached_versions, keyed_entry, merge_into, read, write, Inner, Levels, TablesChange};
use crate::lock;
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::manifest::{Edit, TableMeta};
use crate::storage::memtable::Memtable;
use crate::storage::sstable::{table_name, Table, TableBuilder};
use crate::storage::wal::{self, SegmentInfo};

/// A frozen memtable's table, built in memory and not yet written.
pub(super) struct BuiltFlush {
    bytes: Vec<u8>,
    /// The memtable's last sequence: flushed once the table is in.
    max_seq: u64,
}

/// The flush thread: builds the table of each frozen memtable, oldest first,
/// and hands it to the flush writer (which `spawn`s here), so the next table
/// is built while the last one is written, synced and read back. Handed over
/// at a rendezvous: at most one built table waits beside the one being
/// written.
pub(super) fn flush_loop(inner: Arc<Inner>) {
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

/// `ENOSPC`, for a resource error that carries no number.
fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

/// The wait before a failed flush is tried again, after its first failure
/// and at most.
const FLUSH_RETRY_MIN: Duration = Duration::from_millis(100);
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(5);

/// A frozen memtable and its built table, on the way to the flush writer.
type HandedFlush = (Arc<RwLock<Memtable>>, Option<BuiltFlush>);

/// Writes each built flush in, in the order built (oldest first); a failed
/// one is tried again until it succeeds or the engine closes.
fn flush_write_loop(inner: &Inner, writing: std::sync::mpsc::Receiver<HandedFlush>) {
    for (memtable, built) in writing {
        let mut backoff = FLUSH_RETRY_MIN;
        loop {
            match inner.write_flush(&memtable, built.as_ref()) {
                Ok(()) => {
                    lock(&inner.background).flush_error = None;
                    inner.flush_out_of.store(0, Ordering::Release);
                    break;
                }
                Err(error) => {
                    if let Error::OutOf { source, .. } = &error {
                        inner.flush_out_of.store(source.raw_os_error().unwrap_or(libc_enospc()), Ordering::Release);
                    }
                    // The data stays in the WAL; writes stall once the frozen
                    // memtables fill up, and the flush is tried again, a
                    // little later each time (out of space, it may be a
                    // while before there is room again).
                    tracing::error!(%error, retry_in_ms = backoff.as_millis() as u64, "flush failed; retrying");
                    let mut background = lock(&inner.background);
                    background.flush_error = Some(error.to_string());
                    background.flush_failures += 1;
                    inner.background_cv.notify_all();
                    if background.closing {
                        return;
                    }
                    let _ = inner.background_cv.wait_timeout(background, backoff);
                    backoff = (backoff * 2).min(FLUSH_RETRY_MAX);
                }
            }
        }
        if let Some(built) = built {
            inner.return_table_buffer(built.bytes);
        }
        inner.recycle(memtable);
    }
}

impl Inner {
    /// A table builder writing into a kept buffer, if one is free.
    pub(super) fn table_builder(&self, min_seq: u64, max_seq: u64) -> TableBuilder {
        let buf = lock(&self.table_buffers).pop().unwrap_or_default();
        TableBuilder::with_buffer(buf, self.opts.block_bytes, self.opts.bloom_bits_per_key, min_seq, max_seq)
    }

    /// Keeps a flushed memtable's memory for the next active one, if no
    /// reader holds it any more (one that does frees it when done).
    pub(super) fn recycle(&self, memtable: Arc<RwLock<Memtable>>) {
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
    pub(super) fn return_table_buffer(&self, buf: Vec<u8>) {
        let mut buffers = lock(&self.table_buffers);
        if buffers.len() < 3 {
            buffers.push(buf);
        }
    }

    /// Writes `bytes` as a new table file, syncs it, reads it back and
    /// compares it with `bytes`; retries with a new file if they differ. The
    /// table joins `run`, or starts a run of its own.
    pub(super) fn write_table(&self, bytes: &[u8], run: Option<u64>) -> Result<Arc<Table>> {
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
            match written.map_err(Error::exhaustion_passes) {
                Ok(table) => return Ok(Arc::new(table)),
                // Out of space or descriptors: no use writing it again now.
                // Nothing of it is left behind.
                Err(error @ Error::OutOf { .. }) => {
                    let _ = self.fs.remove(&path);
                    return Err(error);
                }
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

    /// What a failed manifest edit that names `table` leaves: out of space
    /// (the edit is not in the manifest), the table file is removed, and
    /// the flush is tried again later with a new one; any other failure may
    /// have left the edit in effect, so the engine stops and nothing is
    /// touched.
    pub(super) fn edit_failed(&self, error: Error, table: &Table) -> Error {
        match error {
            Error::OutOf { .. } => {
                let _ = self.fs.remove(table.path());
                let _ = self.fs.sync_dir(&self.dir);
            }
            ref other => self.manifest_failed(other),
        }
        error
    }

    /// A manifest edit failed in a way that may have left it in effect:
    /// the engine stops taking writes, and flushes and compactions stop
    /// (they would edit a manifest whose state is no longer known).
    pub(super) fn manifest_failed(&self, error: &Error) {
        self.manifest_unknown.store(true, Ordering::Release);
        self.fail(format!("a manifest edit failed: {error}"));
    }

    /// Flushes one frozen memtable: builds its table, then writes it in.
    pub(super) fn flush(&self, memtable: &Arc<RwLock<Memtable>>) -> Result<()> {
        let built = self.build_flush(memtable);
        let written = self.write_flush(memtable, built.as_ref());
        if let Some(built) = built {
            self.return_table_buffer(built.bytes);
        }
        written
    }

    /// The table of a frozen memtable, in memory (`None` if it is empty).
    pub(super) fn build_flush(&self, memtable: &RwLock<Memtable>) -> Option<BuiltFlush> {
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
    pub(super) fn write_flush(&self, memtable: &Arc<RwLock<Memtable>>, built: Option<&BuiltFlush>) -> Result<()> {
        if self.manifest_unknown.load(Ordering::Acquire) {
            return Err(Error::Failed("a manifest edit failed earlier; reopen the engine".into()));
        }
        let table = match built {
            Some(built) => Some((self.write_table(&built.bytes, None)?, built.max_seq)),
            None => None,
        };
        let flushing = lock(&self.flush_lock);
        let (before, now) = {
            let mut manifest = lock(&self.manifest);
            if let Some((table, max_seq)) = &table {
                let meta =
                    TableMeta { id: table.id(), run: table.run(), size: table.size(), props: table.props().clone() };
                let edit = Edit { added: vec![meta], flushed_seq: Some(*max_seq), ..Edit::default() };
                if let Err(error) = manifest.commit(edit) {
                    drop(manifest);
                    return Err(self.edit_failed(error, table));
                }
            }
            let mut levels = write(&self.levels);
            let frozen = levels.frozen.iter().filter(|m| !Arc::ptr_eq(m, memtable)).cloned().collect();
            let mut tables = levels.tables.clone();
            let change = match table {
                Some((table, _)) => {
                    let filter = table.key_filter();
                    tables.insert(0, table);
                    TablesChange::Flushed(filter)
                }
                None => TablesChange::Kept,
            };
            let before = levels.clone();
            *levels = Arc::new(levels.changed(frozen, tables, change));
            (before, levels.clone())
        };
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.wake_background(true);
        if self.opts.warm_value_cache_on_flush {
            self.warm_value_cache(memtable, &before, &now);
        }
        drop(flushing);
        // The flush is done: were it failed here, it would be written
        // again. Segments not retired now are by the next flush.
        if let Err(error) = self.retire_flushed_segments() {
            tracing::warn!(%error, "retiring the WAL segments a flush covered failed; the next flush tries again");
        }
        Ok(())
    }

    /// Puts what a flushed `memtable` held into the value cache as what the
    /// tables of `now` (which add its table to those of `before`) hold of
    /// each of its keys, in room the cache has free. When no table of
    /// `before` may hold a key, the new table's versions are all the tables
    /// hold of it; otherwise they are merged with what the cache holds of
    /// it for `before`, or else with what those tables hold (read here, on
    /// the flush writer: with 10 bloom bits per key about 1 % of keys per
    /// older table, besides the keys written again).
    ///
    /// It stops before it would hold writes back: when one memtable more
    /// waiting for its flush would make writes wait (about 0.6 µs a key,
    /// more with older tables, while a bulk load fills the cache). Stopping
    /// any sooner left the cache cold after a bulk load at full speed.
    fn warm_value_cache(&self, memtable: &RwLock<Memtable>, before: &Levels, now: &Levels) {
        /// Keys in a row the cache has no room for, after which it counts
        /// as full.
        const REFUSED_MAX: usize = 64;
        /// Keys between two looks at the memtables waiting for flush.
        const KEYS_PER_LOOK: usize = 1024;
        let Some(cache) = &self.value_cache else { return };
        let memtable = read(memtable);
        let writes_nearly_held = || self.levels().frozen.len() + 1 >= self.opts.frozen_memtables_max;
        let mut refused = 0;
        for (i, entry) in memtable.entries().enumerate() {
            if refused == REFUSED_MAX || (i % KEYS_PER_LOOK == 0 && writes_nearly_held()) {
                return;
            }
            let entry = match before.tables_may_hold(entry.key) {
                false => keyed_entry(entry.key, entry.value),
                true => {
                    // Not a read: what reads keep is theirs to decide.
                    let cached = cache
                        .peek_with_key(entry.key)
                        .filter(|(_, generation)| before.unchanged_since(*generation, entry.key))
                        .and_then(|(cached, _)| cached_versions(&cached));
                    let Some(mut found) = cached.or_else(|| before.in_tables(entry.key).ok()) else { continue };
                    merge_into(&mut found, entry.siblings());
                    cache_entry(entry.key, &found)
                }
            };
            let Some((entry, bytes)) = entry else { continue };
            match cache.insert_into_room(entry, now.tables_generation, bytes) {
                true => refused = 0,
                false => refused += 1,
            }
        }
    }

    /// Retires WAL segments whose every record is in tables (see
    /// [`wal::retire`]). Never the one being written.
    pub(super) fn retire_flushed_segments(&self) -> Result<()> {
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
}
