//! The tombstone horizon, now minus `gc_grace`, and the rules that keep
//! deletes deleted around it. Pure: the node (`LocalStore`, the engine's
//! compaction, `cluster::trees::TreeKeeper`) and the simulation apply the
//! same functions.
//!
//! - A *message* from the past (a replica's part of a write, a hint, a
//!   read repair, a bulk set's replay) is refused below the horizon
//!   ([`Carried::Message`]): once a tombstone is past the horizon, nothing
//!   it deleted can arrive again.
//! - Anti-entropy *streams* replicas' current states ([`Carried::Stream`]),
//!   and takes them whole, but below the horizon a tombstone that deletes
//!   nothing held, or a live version that something held deletes: no
//!   replica's current state holds a version that a purged tombstone
//!   deleted (the full exchange that allowed the purge gave every replica
//!   the tombstone), a replica that purged a tombstone does not take it
//!   back from one that has not yet, and an old version a tombstone held
//!   here deletes never lands beside it (where the tombstone's purge would
//!   uncover it).
//! - Below the horizon, a tombstone that deletes a live version held is
//!   taken either way: where a delete was missed, it still deletes.
//! - A deleted key goes ([`expired`]) once its newest tombstone is past the
//!   horizon and, on a node of a cluster, a full exchange of its replica
//!   set covered its last write here ([`covered`]).

use quiver_ring::{Siblings, Version};

/// The horizon at `now_ms`.
pub fn horizon_ms(now_ms: u64, gc_grace_ms: u64) -> u64 {
    now_ms.saturating_sub(gc_grace_ms)
}

/// Whether `version` is older than the horizon: a peer's such version is
/// taken only as [`takes`] says, which needs what the replica holds.
pub fn below(version: &Version, horizon_ms: u64) -> bool {
    version.hlc.physical_ms() < horizon_ms
}

/// How a peer's versions came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    /// A write, hint, read repair or replay: it may have waited anywhere.
    Message,
    /// An anti-entropy repair: another replica's current state.
    Stream,
}

/// Whether [`takes`] needs what the replica holds of `version`'s key to
/// decide (below the horizon, a tombstone, or a stream's live version);
/// otherwise it needs nothing.
pub fn needs_held(version: &Version, horizon_ms: u64, carried: Carried) -> bool {
    below(version, horizon_ms) && (version.is_tombstone() || carried == Carried::Stream)
}

/// Whether a replica that holds `held` of a key takes `version` of it from
/// a peer, carried `carried` (see the module's doc).
pub fn takes(version: &Version, horizon_ms: u64, carried: Carried, held: Option<&Siblings>) -> bool {
    let held = held.map_or(&[][..], Siblings::versions);
    match (below(version, horizon_ms), version.is_tombstone(), carried) {
        (false, _, _) => true,
        (true, true, _) => held.iter().any(|v| !v.is_tombstone() && version.dominates(v)),
        (true, false, Carried::Message) => false,
        (true, false, Carried::Stream) => !held.iter().any(|v| v.dominates(version)),
    }
}

/// Whether a key's versions are all tombstones, the newest older than the
/// horizon.
pub fn expired(siblings: &Siblings, horizon_ms: u64) -> bool {
    siblings.all_tombstones() && siblings.winner().is_none_or(|newest| below(newest, horizon_ms))
}

/// Whether a deleted key whose newest write here has sequence
/// `written_seq` may be purged, its replica set covered up to `covered` by
/// full exchanges (`None`: never): an exchange that began once the trees
/// held that write left the tombstone on every replica, or found there
/// nothing it deletes.
pub fn covered(written_seq: u64, covered: Option<u64>) -> bool {
    covered.is_some_and(|covered| written_seq <= covered)
}
