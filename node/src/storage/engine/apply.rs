//! The apply stage (thread `quiver-apply`, or the commit thread itself):
//! makes durable groups visible, then acknowledges them.
//!
//! - Owns: the active memtable's writes (only this stage inserts into it,
//!   one group at a time, in sequence order) and memtable rotation.
//! - Receives: [`Durable`] groups from [`commit`](super::commit), each
//!   already on disk.
//! - Does: inserts the group into the active memtable, then calls every
//!   write's `done`: this is where a write is **acknowledged**, once it is
//!   both durable and visible. When the memtable is full (or a flush asks),
//!   freezes it, waiting first while too many frozen memtables wait for
//!   flush.
//! - Hands on: frozen memtables to [`flush`](super::flush), through
//!   `Levels::frozen` and `Inner::background_cv`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::commit::Durable;
use super::{read, write, Inner, Levels};
use crate::lock;
use crate::storage::memtable::Memtable;

/// The apply thread: [`apply`]s each group handed to it, in order.
pub(super) fn apply_loop(inner: &Inner, applying: std::sync::mpsc::Receiver<Durable>, handed: &AtomicU64) {
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
pub(super) fn apply(inner: &Inner, Durable { group, rotations, barriers }: Durable) {
    if let Some((group, writes)) = group {
        let mut acks = Vec::with_capacity(writes.len());
        {
            let levels = inner.levels();
            let mut active = write(&levels.active);
            for (i, (encoded, done)) in writes.into_iter().enumerate() {
                let seq = group + i as u64;
                active.apply(seq, &encoded);
                acks.push((done, seq));
            }
        }
        // Acknowledge only now: the group is durable (fdatasync returned)
        // and visible to readers.
        for (done, seq) in acks {
            done(Ok(seq));
        }
    }
    let (acknowledged, barriers) = barriers;
    for done in barriers {
        done(Ok(acknowledged));
    }
    let full = read(&inner.levels().active).bytes() >= inner.opts.memtable_bytes_max;
    // With flushes failing for want of space and the frozen memtables at
    // their bound, a full memtable takes the groups already written to the
    // WAL (they are acknowledged, not held); the commit thread refuses new
    // ones meanwhile, so it outgrows its budget by a few groups at most.
    let keep_applying = rotations.is_empty() && inner.memtables_out_of_room();
    if (full && !keep_applying) || !rotations.is_empty() {
        inner.wait_for_flush_room();
        let seq = inner.rotate();
        for done in rotations {
            let _ = done.send(Ok(seq));
        }
    }
}

impl Inner {
    /// Freezes the active memtable (where groups are applied, or open
    /// before the threads start). Returns the last sequence in it, or
    /// when it is empty that of the newest frozen one.
    pub(super) fn rotate(&self) -> u64 {
        let mut levels = write(&self.levels);
        let max_seq = read(&levels.active).seq_range().1;
        if read(&levels.active).is_empty() {
            // Nothing to freeze: what waits for this rotation waits for
            // the newest frozen memtable (a flush still to be retried).
            return levels.frozen.first().map_or(max_seq, |newest| read(newest).seq_range().1);
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
        *levels = Arc::new(Levels {
            active,
            frozen,
            tables: levels.tables.clone(),
            tables_generation: levels.tables_generation,
            changes: levels.changes.clone(),
        });
        drop(levels);
        self.wake_background(false);
        max_seq
    }

    /// Whether the frozen memtables are at their bound while flushes fail
    /// for want of a resource (`flush_out_of` holds its error number).
    pub(super) fn memtables_out_of_room(&self) -> bool {
        self.flush_out_of.load(Ordering::Acquire) != 0
            && self.levels().frozen.len() >= self.opts.frozen_memtables_max.max(1)
    }

    /// Blocks the thread applying groups (and so, soon, the commit thread)
    /// while too many memtables wait for flush.
    pub(super) fn wait_for_flush_room(&self) {
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
}
