//! Compaction (thread `quiver-compact`, or a caller of
//! [`Engine::compact`](super::Engine::compact)).
//!
//! - Owns: the choice and the merging of tables; one compaction at a time
//!   (`Inner::compaction_lock`).
//! - Receives: wake-ups from [`flush`](super::flush) when a table was added.
//! - Does: asks [`compaction::plan`] which runs to merge, merges them into
//!   new verified tables (dropping shadowed versions, and tombstones past the
//!   grace period that nothing outside the merge can hold older versions
//!   of), commits one manifest edit that adds the outputs and removes the
//!   inputs, swaps them in for readers, then deletes the input files.
//! - Hands on: nothing; the WAL is not touched here.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use quiver_ring::Siblings;

use super::recovery::sort_newest_first;
use super::{read, write, Inner, TablesChange};
use crate::storage::compaction::{self, Policy, RunSize};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::keys::{user_key, Keyspace};
use crate::storage::manifest::{Edit, TableMeta};
use crate::storage::sstable::{Table, TableBuilder, TableScan};
use crate::{horizon, lock, now_ms};

pub(super) fn compact_loop(inner: Arc<Inner>) {
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

impl Inner {
    /// Runs one compaction: the planned one, or all tables if `full`.
    /// Returns whether it merged anything.
    pub(super) fn compact(&self, full: bool) -> Result<bool> {
        let _only_one = lock(&self.compaction_lock);
        if self.manifest_unknown.load(Ordering::Acquire) {
            return Ok(false);
        }
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
        let (outputs, dropped) = self.merge_tables(&inputs, &outside)?;
        let dropped_any = dropped.any;
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
                let change = if dropped_any { TablesChange::Dropped } else { TablesChange::Kept };
                *levels = Arc::new(levels.changed(levels.frozen.clone(), tables, change));
            }
            committed
        };
        if let Err(error) = &committed {
            if !matches!(error, Error::OutOf { .. }) {
                // The edit may be in effect: the engine stops, and no file
                // is touched.
                self.manifest_failed(error);
                return committed.map(|()| false);
            }
        }
        // Out of space, the edit is not in the manifest: the outputs go,
        // the inputs stay.
        let obsolete = if committed.is_ok() { &inputs } else { &outputs };
        for table in obsolete {
            let _ = self.fs.remove(table.path());
        }
        self.fs.sync_dir(&self.dir).ctx("sync directory", &self.dir)?;
        committed?;
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters.tombstones_dropped.fetch_add(dropped.deleted_keys, Ordering::Relaxed);
        if let (Some(purge), false) = (&self.opts.purge, dropped.data_keys.is_empty()) {
            purge.dropped(dropped.data_keys);
        }
        Ok(true)
    }

    /// Merges `inputs` into new verified tables, and says which keys it
    /// left out. Tombstones may be dropped only when no table in `outside`
    /// can hold an older version of the key, and a data key's only where
    /// the [`Purge`](super::Purge), if there is one, allows it.
    ///
    /// A key held by one input only, in a table without tombstones, is
    /// copied as stored: nothing to merge and nothing to drop, so its bytes
    /// are not decoded and encoded again.
    fn merge_tables(&self, inputs: &[Arc<Table>], outside: &[Arc<Table>]) -> Result<(Vec<Arc<Table>>, Dropped)> {
        let min_seq = inputs.iter().map(|t| t.props().min_seq).min().unwrap_or(0);
        let max_seq = inputs.iter().map(|t| t.props().max_seq).max().unwrap_or(0);
        let horizon_ms = horizon::horizon_ms(now_ms(), self.opts.tombstone_grace_ms);
        let new_builder = || self.table_builder(min_seq, max_seq);
        let mut outputs: Vec<Arc<Table>> = Vec::new();
        let mut builder = new_builder();
        let mut dropped = Dropped::default();
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
                    // The newest write of the key here is in one of these.
                    let written_seq = holders.iter().map(|&i| scans[i].table().props().max_seq).max().unwrap_or(0);
                    if droppable(key, &merged, horizon_ms, outside)
                        && !self.in_memtables(key)
                        && self.purge_allows(key, written_seq)
                    {
                        dropped.any = true;
                        dropped.deleted_keys += 1;
                        if let (Some(user), Some(_)) = (user_key(key), &self.opts.purge) {
                            dropped.data_keys.push(user.to_vec());
                        }
                    } else {
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
            Ok(()) => Ok((outputs, dropped)),
            Err(e) => {
                for table in &outputs {
                    let _ = self.fs.remove(table.path());
                }
                Err(e)
            }
        }
    }
}

impl Inner {
    /// Whether a memtable holds a version of `key`: a deleted key stays
    /// then (its tombstones are not merged with the memtable's versions, so
    /// dropping them could uncover an older one there).
    fn in_memtables(&self, key: &[u8]) -> bool {
        let levels = self.levels();
        let memtables = std::iter::once(&levels.active).chain(&levels.frozen);
        memtables.into_iter().any(|memtable| read(memtable).get(key).is_some())
    }

    /// Whether the [`Purge`](super::Purge), if any, lets the stored key
    /// `key` go (only data keys are asked).
    fn purge_allows(&self, key: &[u8], written_seq: u64) -> bool {
        match (&self.opts.purge, user_key(key)) {
            (Some(purge), Some(user)) => purge.may_drop(user, written_seq),
            _ => true,
        }
    }
}

/// What a merge left out.
#[derive(Debug, Default)]
struct Dropped {
    any: bool,
    /// Keys whose versions were all tombstones.
    deleted_keys: u64,
    /// The user keys of data keys left out, for the [`Purge`](super::Purge).
    data_keys: Vec<Vec<u8>>,
}

/// Whether a merged entry can leave the store: all tombstones, the newest
/// older than the horizon (data only: the other keyspaces are this node's
/// own bookkeeping, never replicated), and nothing older of it outside the
/// merge.
fn droppable(key: &[u8], siblings: &Siblings, horizon_ms: u64, outside: &[Arc<Table>]) -> bool {
    let Some(newest) = siblings.winner() else { return true };
    let data = key.first() == Some(&(Keyspace::Data as u8));
    let horizon_ms = if data { horizon_ms } else { u64::MAX };
    horizon::expired(siblings, horizon_ms)
        && outside.iter().all(|t| t.props().min_hlc > newest.hlc.0 || !t.may_contain(key))
}
