//! Hinted handoff: the writes this node holds for replicas that are down.
//!
//! - Owns: a [`SetLog`] in the hints keyspace, one entry per hinted write
//!   and owner, under the owner's id and the stamp it was taken at.
//! - Receives: hints to hold, from a coordinator's write
//!   ([`HintStore::hold`] gives the engine ops, which go into the same WAL
//!   record as this node's own part of that write); the owner's
//!   acknowledgement of a delivery.
//! - Does: bounds each owner's queue in bytes ([`fits`]: a hint past it is
//!   dropped and counted, and the write it came with is taken all the same,
//!   so one node that stays down never refuses the writes of those that are
//!   up) and in age (an older hint is dropped, whether its owner is up or
//!   not: a hint must never outlive `gc_grace`, or a purged tombstone's key
//!   could come back). A hint's bytes count against the bound from when it
//!   is accepted, and in the queue once they are durable.
//! - Hands on: the oldest hints of an owner; their removal once the owner
//!   has them durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_ring::wire::ServerError;
use quiver_ring::{Hlc, NodeId};

pub use super::setlog::Entry;
use super::setlog::{Queue, SetLog};
use crate::lock;
use crate::messages::Hinted;
use crate::stamping::NodeClock;
use crate::storage::keys::Keyspace;
use crate::storage::{self, Engine};

/// The hints a node holds.
#[derive(Debug)]
pub struct HintStore {
    log: SetLog,
    clock: Arc<NodeClock>,
    /// Bound of each owner's queue.
    bytes_max: u64,
    /// Bytes of hints accepted and not yet durable, per owner: they count
    /// against the bound, not yet in the queue.
    reserved: Mutex<BTreeMap<NodeId, u64>>,
    dropped: AtomicU64,
    /// Of those, hints dropped as they arrived (no room, or no stamp).
    dropped_on_arrival: AtomicU64,
    /// When a drop was last logged (wall-clock ms): once a minute at most.
    logged_ms: AtomicU64,
}

/// How often dropped hints are logged, at most.
const DROP_LOG_EVERY_MS: u64 = 60_000;

/// Whether a hint of `bytes` fits in its owner's queue, which holds
/// `queued` bytes (durable, and accepted but not yet durable), under
/// `bytes_max`. The rule the simulation applies too.
pub fn fits(queued: u64, bytes: u64, bytes_max: u64) -> bool {
    queued.saturating_add(bytes) <= bytes_max
}

/// What a holder does with the oldest hints it holds for one owner: the
/// rule the node's hint tick and the simulation both follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff {
    /// Nothing to do: none held, or the owner is down and none is past its
    /// age.
    Keep,
    /// The owner is down: drop the first `expired`, past their age; keep
    /// the rest.
    Expire { expired: usize },
    /// The owner takes writes: send it the hints after the first
    /// `expired`; once it has them durable, remove them all (the expired
    /// ones counted as dropped).
    Deliver { expired: usize },
}

/// The step for hints taken at `taken_ms` (oldest first) for an owner that
/// is up or not, when a hint taken before `cutoff_ms` is past its age.
pub fn handoff(taken_ms: &[u64], owner_up: bool, cutoff_ms: u64) -> Handoff {
    let expired = taken_ms.iter().take_while(|&&ms| ms < cutoff_ms).count();
    match (taken_ms.is_empty(), owner_up, expired) {
        (true, _, _) | (false, false, 0) => Handoff::Keep,
        (false, true, expired) => Handoff::Deliver { expired },
        (false, false, expired) => Handoff::Expire { expired },
    }
}

/// The hints of one write a stand-in accepted: the engine ops that hold
/// them (for the write's record), and their bytes, reserved against each
/// owner's bound until [`HintStore::written`].
#[derive(Debug, Default)]
#[must_use = "give the reservation back with HintStore::written"]
pub struct Held {
    pub ops: Vec<storage::Op>,
    reserved: Vec<(NodeId, u64)>,
    /// The owners whose hints were dropped.
    pub dropped: Vec<NodeId>,
}

impl HintStore {
    /// The hints in `engine`, counted (a scan of the hints keyspace).
    pub fn open(engine: Arc<Engine>, clock: Arc<NodeClock>, bytes_max: u64) -> storage::Result<HintStore> {
        let log = SetLog::new(engine, clock.clone(), Keyspace::Hints);
        log.recount(None, &log.entries(None, u64::MAX)?);
        Ok(HintStore {
            log,
            clock,
            bytes_max,
            reserved: Mutex::default(),
            dropped: AtomicU64::new(0),
            dropped_on_arrival: AtomicU64::new(0),
            logged_ms: AtomicU64::new(0),
        })
    }

    /// The hints of `hinted` that fit ([`fits`]), one entry per owner,
    /// reserved against their owners' bounds. One that does not fit, or
    /// cannot be stamped, is dropped and counted: its owner stays stale
    /// until a read repairs it; the write it came with is taken all the
    /// same.
    pub fn hold(&self, hinted: Vec<Hinted>) -> Held {
        let mut held = Held::default();
        for Hinted { owner, sets } in hinted {
            let op = self
                .clock
                .stamp(Hlc::ZERO, Hlc::ZERO, None)
                .and_then(|taken| self.log.keep_op(owner, taken.hlc, &sets));
            let (op, bytes) = match op {
                Ok(op) => op,
                Err(error) => {
                    self.drop_one(owner, &error.message);
                    held.dropped.push(owner);
                    continue;
                }
            };
            let mut reserved = lock(&self.reserved);
            let queued = self.log.queue(owner).bytes + reserved.get(&owner).copied().unwrap_or(0);
            if !fits(queued, bytes, self.bytes_max) {
                drop(reserved);
                self.drop_one(owner, &format!("its queue would pass its bound of {} bytes", self.bytes_max));
                held.dropped.push(owner);
                continue;
            }
            *reserved.entry(owner).or_default() += bytes;
            held.ops.push(op);
            held.reserved.push((owner, bytes));
        }
        held
    }

    /// The write that carried `held` ended: durable (its hints are now in
    /// their queues) or not (they never will be).
    pub fn written(&self, held: Held, durable: bool) {
        if held.reserved.is_empty() {
            return;
        }
        let mut reserved = lock(&self.reserved);
        for (owner, bytes) in held.reserved {
            if let Some(left) = reserved.get_mut(&owner) {
                *left = left.saturating_sub(bytes);
                if *left == 0 {
                    reserved.remove(&owner);
                }
            }
            if durable {
                self.log.kept(owner, bytes);
            }
        }
    }

    /// Counts a hint dropped on arrival, and logs it (once a minute at most).
    fn drop_one(&self, owner: NodeId, why: &str) {
        self.dropped_on_arrival.fetch_add(1, Ordering::Relaxed);
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = self.clock.wall_ms();
        let last_ms = self.logged_ms.load(Ordering::Relaxed);
        let due = last_ms == 0 || now_ms.saturating_sub(last_ms) >= DROP_LOG_EVERY_MS;
        if due && self.logged_ms.compare_exchange(last_ms, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(
                owner = format_args!("{:016x}", owner.0),
                dropped,
                "a hint was dropped ({why}); its replica stays stale until a read repairs it"
            );
        }
    }

    /// What is held for each owner that has hints.
    pub fn queues(&self) -> std::collections::BTreeMap<NodeId, Queue> {
        self.log.queues()
    }

    /// Hints dropped undelivered: at their bound, or too old.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Hints dropped as they arrived, their owner's queue full.
    pub fn dropped_on_arrival(&self) -> u64 {
        self.dropped_on_arrival.load(Ordering::Relaxed)
    }

    /// The bound of each owner's queue, in bytes.
    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// The oldest hints held for `owner`, about `bytes_max` of them (at
    /// least one); when there are none, its count starts again from zero.
    /// Reads files: not for an async worker.
    pub fn oldest(&self, owner: NodeId, bytes_max: u64) -> storage::Result<Vec<Entry>> {
        let hints = self.log.entries(Some(owner), bytes_max)?;
        if hints.is_empty() {
            self.log.recount(Some(&[owner]), &[]);
        }
        Ok(hints)
    }

    /// Removes `hints` for good, once their owner has them durable or
    /// (`dropped` of them) past their age.
    pub async fn remove(&self, hints: &[Entry], dropped: u64) -> Result<(), ServerError> {
        self.log.remove(hints).await?;
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use quiver_ring::Siblings;

    fn hint(owner: u64, value_bytes: usize, clock: &NodeClock) -> Hinted {
        let version = clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap().blind(Some(vec![7; value_bytes]));
        Hinted { owner: NodeId(owner), sets: vec![(b"k".to_vec(), Siblings::one(version))] }
    }

    /// A hint that does not fit its owner's bound, counting those accepted
    /// and not yet durable, is dropped and counted, and the others held; a
    /// hint's bytes are in its queue once its write is durable, and free
    /// again if the write failed.
    #[test]
    fn hints_go_to_an_owner_that_is_up_and_expire_by_age_either_way() {
        assert_eq!(handoff(&[], true, 100), Handoff::Keep);
        assert_eq!(handoff(&[150, 160], false, 100), Handoff::Keep, "down, none too old");
        assert_eq!(handoff(&[50, 60, 150], false, 100), Handoff::Expire { expired: 2 });
        assert_eq!(handoff(&[50, 60, 150], true, 100), Handoff::Deliver { expired: 2 });
        assert_eq!(handoff(&[150], true, 100), Handoff::Deliver { expired: 0 });
        assert_eq!(handoff(&[50], true, 100), Handoff::Deliver { expired: 1 }, "only expired: removed, nothing sent");
    }

    #[test]
    fn a_hint_past_its_bound_is_dropped_and_bytes_count_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), storage::Options::default()).unwrap());
        let clock = Arc::new(NodeClock::unpersisted(NodeId(9), Hlc::ZERO, 500, Arc::new(SystemClock)));
        let hints = HintStore::open(engine.clone(), clock.clone(), 1000).unwrap();

        let first = hints.hold(vec![hint(1, 600, &clock), hint(2, 600, &clock)]);
        assert_eq!((first.ops.len(), first.dropped.clone()), (2, vec![]));
        assert!(hints.queues().is_empty(), "nothing counts in a queue before it is durable");
        let second = hints.hold(vec![hint(1, 600, &clock)]);
        assert_eq!(second.dropped, [NodeId(1)], "owner 1's reserved bytes leave no room");
        assert_eq!((hints.dropped(), hints.dropped_on_arrival()), (1, 1));

        hints.written(first, true);
        let queues = hints.queues();
        assert!(queues[&NodeId(1)].bytes > 600 && queues[&NodeId(2)].entries == 1, "{queues:?}");
        let failed = hints.hold(vec![hint(3, 600, &clock)]);
        hints.written(failed, false);
        assert!(!hints.queues().contains_key(&NodeId(3)), "a failed write holds nothing");
        let again = hints.hold(vec![hint(3, 600, &clock)]);
        assert!(again.dropped.is_empty(), "and its reservation is free again");
        hints.written(again, true);
        hints.written(second, true);
    }
}
