//! Opening an engine: recovery, on the caller's thread, before any engine
//! thread starts.
//!
//! - Owns: nothing once it returns.
//! - Receives: a directory and [`Options`].
//! - Does: opens the manifest (rolling back a torn tail), opens every table
//!   it names and checks their sizes, removes table files no manifest names
//!   (a crash between writing a table and committing its edit), replays the
//!   WAL records after the manifest's flushed sequence into memtables
//!   (flushing right here when one fills up), opens a fresh WAL segment and
//!   retires the segments already covered by tables.
//! - Hands on: the shared [`Inner`], the [`WalWriter`] for
//!   [`commit`](super::commit) and the last sequence number in the store.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::{write, Counters, Inner, Levels, Options};
use crate::lock;
use crate::storage::cache::{BlockCache, ClockCache};
use crate::storage::disk::{is_data_file, Fs};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::manifest::Manifest;
use crate::storage::sstable::{parse_table_name, table_name, Table};
use crate::storage::wal::{self, SegmentInfo, WalWriter};
use crate::storage::EncodedOps;

/// What [`open`] hands to the engine's threads.
pub(super) struct Recovered {
    pub inner: Arc<Inner>,
    pub wal: WalWriter,
    /// The last sequence number in the store (WAL or tables).
    pub last_seq: u64,
}

/// Recovers the engine in `dir`: manifest, tables, orphans, WAL replay.
pub(super) fn open(fs: Arc<dyn Fs>, dir: &Path, opts: Options) -> Result<Recovered> {
    fs.create_dir_all(dir).ctx("create directory", dir)?;
    let manifest = Manifest::open(fs.clone(), dir, opts.repair, opts.manifest_edits_max)?;
    let state = manifest.state().clone();

    let block_cache = (opts.block_cache_bytes > 0).then(|| Arc::new(BlockCache::new(opts.block_cache_bytes)));
    let mut tables = Vec::with_capacity(state.tables.len());
    for meta in state.tables.values() {
        let path = dir.join(table_name(meta.id));
        let table = open_table(fs.as_ref(), &path, meta.id, meta.run, block_cache.as_ref())?;
        if table.size() != meta.size {
            return Err(Error::corrupt(&path, 0, format!("{} bytes, the manifest says {}", table.size(), meta.size)));
        }
        tables.push(Arc::new(table));
    }
    sort_newest_first(&mut tables);
    remove_orphans(fs.as_ref(), dir, |id| state.tables.contains_key(&id))?;

    let inner = Arc::new(Inner {
        fs: fs.clone(),
        dir: dir.to_path_buf(),
        levels: RwLock::new(Arc::new(Levels {
            active: Arc::default(),
            frozen: Vec::new(),
            tables,
            tables_generation: 0,
            changes: Arc::default(),
        })),
        value_cache: (opts.value_cache_bytes > 0).then(|| ClockCache::new(opts.value_cache_bytes)),
        queue: Mutex::default(),
        queue_cv: Condvar::new(),
        manifest: Mutex::new(manifest),
        segments: Mutex::default(),
        background: Mutex::default(),
        background_cv: Condvar::new(),
        compaction_lock: Mutex::new(()),
        flush_lock: Mutex::new(()),
        table_buffers: Mutex::default(),
        spare_memtable: Mutex::default(),
        manifest_unknown: Default::default(),
        flush_out_of: Default::default(),
        failed: Mutex::new(None),
        counters: Counters::default(),
        block_cache,
        opts,
    });

    let recovered = wal::recover(fs.as_ref(), dir, state.flushed_seq, inner.opts.repair, |seq, ops| {
        let full = {
            let levels = inner.levels();
            let mut active = write(&levels.active);
            active.apply(seq, &EncodedOps::new(&ops));
            active.bytes() >= inner.opts.memtable_bytes_max
        };
        if full {
            // No thread runs yet: flush right here to stay within memory.
            // Out of space, the memtable stays frozen (its records stay in
            // the WAL) for the flush thread to try again: an engine opens,
            // and serves reads, on a full disk.
            inner.rotate();
            if let Some(memtable) = inner.levels().frozen.last().cloned() {
                match inner.flush(&memtable) {
                    Ok(()) => {}
                    Err(error @ Error::OutOf { .. }) => {
                        tracing::warn!(%error, "a flush during recovery found no room; it is tried again later")
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    })?;
    let last_seq = recovered.last_seq.max(state.flushed_seq);
    inner.counters.last_seq.store(last_seq, Ordering::Relaxed);
    let number = recovered.next_number;
    let wal = WalWriter::create(fs, dir, number, inner.opts.wal_segment_bytes, inner.counters.wal_recycled.clone())?;
    {
        let mut segments = lock(&inner.segments);
        segments.0 = recovered.segments;
        segments.0.push(SegmentInfo { number, last_seq: None });
        segments.1 = number;
    }
    inner.retire_flushed_segments()?;
    Ok(Recovered { inner, wal, last_seq })
}

/// Opens table `id` of sorted run `run`, its point reads going through
/// `cache` if there is one.
pub(super) fn open_table(
    fs: &dyn Fs,
    path: &Path,
    id: u64,
    run: u64,
    cache: Option<&Arc<BlockCache>>,
) -> Result<Table> {
    let table = Table::open(fs, path, id)?.with_run(run);
    Ok(match cache {
        Some(cache) => table.with_cache(cache.clone()),
        None => table,
    })
}

pub(super) fn sort_newest_first(tables: &mut [Arc<Table>]) {
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
