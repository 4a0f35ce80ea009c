//! The commit thread (`quiver-commit`): group commit.
//!
//! - Owns: the [`WalWriter`] (the only thread that writes the WAL) and the
//!   next sequence number.
//! - Receives: [`Request`]s queued by [`Engine`](super::Engine) callers on
//!   any thread, through [`Queue`] and `Inner::queue_cv`.
//! - Does: takes every queued write at once, writes them as one group with
//!   one durable write ([`WalWriter::append_group`]: `O_DIRECT` +
//!   `RWF_DSYNC`, the same as `write` plus `fdatasync`), records which
//!   segment holds them, and only then passes the group on.
//! - Hands on: each durable group (and the rotations asked for after it) to
//!   [`apply`](super::apply), which acknowledges it; to the apply thread
//!   when the group is large and more writes wait, else it applies the group
//!   itself. Nothing is acknowledged here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::apply::{apply, apply_loop};
use super::{Done, Inner};
use crate::lock;
use crate::storage::error::{Error, Result};
use crate::storage::wal::{SegmentInfo, WalWriter};
use crate::storage::EncodedOps;

pub(super) enum Request {
    Write {
        encoded: EncodedOps,
        done: Done,
    },
    /// Freeze the active memtable; answers with the last sequence in it.
    Rotate {
        done: oneshot::Sender<Result<u64>>,
    },
    /// Answer once every write submitted before is acknowledged, with the
    /// last sequence acknowledged.
    Barrier {
        done: Done,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Write { encoded, .. } => write!(f, "Write({} ops)", encoded.ops().len()),
            Request::Rotate { .. } => write!(f, "Rotate"),
            Request::Barrier { .. } => write!(f, "Barrier"),
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Queue {
    requests: Vec<Request>,
    closing: bool,
    /// The commit thread is parked on the condition variable. Writers signal
    /// only then: a notify is a system call even when nobody waits.
    committer_waiting: bool,
}

/// Groups with fewer keys are applied by the commit thread (when the apply
/// thread is idle): inserting them is quick next to a thread hand-off.
const HAND_OFF_KEYS_MIN: usize = 1024;

pub(super) fn commit_loop(inner: Arc<Inner>, mut wal: WalWriter, mut next_seq: u64) {
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
            let (mut rotations, mut barriers) = (Vec::new(), Vec::new());
            for request in requests {
                match request {
                    Request::Write { encoded, done } => writes.push((encoded, done)),
                    Request::Rotate { done } => rotations.push(done),
                    Request::Barrier { done } => barriers.push(done),
                }
            }
            let group = if writes.is_empty() { None } else { commit_group(&inner, &mut wal, &mut next_seq, writes) };
            if group.is_none() && rotations.is_empty() && barriers.is_empty() {
                continue;
            }
            let keys: usize = group.as_ref().map_or(0, |(_, writes)| writes.iter().map(|(e, _)| e.ops().len()).sum());
            // Groups are applied in order: once this one is, every
            // sequence before `next_seq` is acknowledged.
            let durable = Durable { group, rotations, barriers: (next_seq - 1, barriers) };
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

pub(super) type Write = (EncodedOps, Done);

/// A group that is durable in the WAL (its first sequence and its writes),
/// and the rotations asked for after it, in the order they were submitted.
pub(super) struct Durable {
    pub group: Option<(u64, Vec<Write>)>,
    pub rotations: Vec<oneshot::Sender<Result<u64>>>,
    /// The barriers submitted with the group, and the last sequence
    /// acknowledged once it is applied.
    pub barriers: (u64, Vec<Done>),
}

impl Durable {
    fn fail(self, reason: &str) {
        for (_, done) in self.group.into_iter().flat_map(|(_, writes)| writes) {
            done(Err(Error::Failed(reason.to_owned())));
        }
        for done in self.rotations {
            let _ = done.send(Err(Error::Failed(reason.to_owned())));
        }
        for done in self.barriers.1 {
            done(Err(Error::Failed(reason.to_owned())));
        }
    }
}

/// Writes a group to the WAL with one durable write (see
/// [`WalWriter::append_group`]). Returns its first sequence and its writes
/// once durable; on failure, fails the engine and answers each write with
/// the error.
pub(super) fn commit_group(
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
    if inner.memtables_out_of_room() {
        // No flush can make room now: refused, nothing written, rather
        // than left waiting for a flush that cannot happen yet.
        let code = inner.flush_out_of.load(Ordering::Acquire);
        inner.counters.groups_refused.fetch_add(1, Ordering::Relaxed);
        for (_, done) in writes {
            let source = std::io::Error::from_raw_os_error(code);
            done(Err(Error::OutOf { op: "flush tables of", path: inner.dir.clone(), source }));
        }
        return None;
    }
    let group = *next_seq;
    let last = group + writes.len() as u64 - 1;
    let synced = wal.append_group(group, writes.iter().map(|(encoded, _)| encoded.bytes()));
    let segment = match synced {
        Ok(segment) => segment,
        // No segment could be made for it (out of space or descriptors):
        // nothing was written, so the group is refused and the engine goes
        // on; the next group tries again.
        Err(e @ Error::OutOf { .. }) => {
            inner.counters.groups_refused.fetch_add(1, Ordering::Relaxed);
            for (_, done) in writes {
                done(Err(once_more(&e)));
            }
            return None;
        }
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

/// An [`Error::OutOf`] once more (an `io::Error` is not `Clone`), for each
/// write it refuses.
fn once_more(error: &Error) -> Error {
    match error {
        Error::OutOf { op, path, source } => {
            let source = match source.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(source.kind(), source.to_string()),
            };
            Error::OutOf { op, path: path.clone(), source }
        }
        other => Error::Failed(other.to_string()),
    }
}

impl Inner {
    /// Queues a request for the commit thread; gives it back if the engine
    /// is closing.
    pub(super) fn submit(&self, request: Request) -> Result<(), Request> {
        let mut queue = lock(&self.queue);
        if queue.closing {
            return Err(request);
        }
        queue.requests.push(request);
        let wake = queue.committer_waiting;
        drop(queue);
        if wake {
            self.queue_cv.notify_one();
        }
        Ok(())
    }

    /// Lets the commit thread finish what is queued and stop; later
    /// requests are refused.
    pub(super) fn close_queue(&self) {
        lock(&self.queue).closing = true;
        self.queue_cv.notify_all();
    }
}
