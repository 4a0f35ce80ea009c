//! Tombstones that stay dead: a tombstone is purged
//! only below the horizon (now minus `gc_grace`), and a version from a
//! peer (replication, read repair, a hint) below that horizon is refused,
//! or a hint delivered late would bring a deleted key back.
//!
//! The node's wall clock is a test clock: the key is written and deleted
//! three `gc_grace` ago, compaction purges the tombstone, and then the
//! stale hint (the first version, held for this node while it was down)
//! arrives.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use quiver_node::clock::{Clock, ManualClock, SystemClock};
use quiver_node::service::{Done, LocalStore, Store, Timing};
use quiver_node::stamping::NodeClock;
use quiver_node::storage::keys::data_key;
use quiver_node::storage::{Engine, Options};
use quiver_ring::{Hlc, NodeId, Siblings, Version, MAX_OFFSET_MS};

const GC_GRACE_MS: u64 = 60_000;

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

/// Calls `f` with a `Done` and waits for its answer (bounded).
fn wait<T: Send + 'static>(f: impl FnOnce(Done<T>)) -> T {
    let (sent, answer) = mpsc::channel();
    f(Box::new(move |result| sent.send(result).unwrap()));
    answer.recv_timeout(Duration::from_secs(60)).expect("answered").unwrap()
}

fn versions(store: &LocalStore, key: &[u8]) -> Option<Siblings> {
    let timing = Timing { hlc_seen: Hlc::ZERO, deadline: Hlc(u64::MAX), consistency: None };
    wait(|done| store.read_versions(key.to_vec(), timing, done))
}

/// A node's store whose wall clock reads three `gc_grace` ago.
struct Node {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    wall: Arc<ManualClock>,
    node_clock: Arc<NodeClock>,
    store: LocalStore,
}

fn node_three_gc_grace_ago() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { background_compaction: false, tombstone_grace_ms: GC_GRACE_MS, ..Options::default() };
    let engine = Arc::new(Engine::open(dir.path(), options).unwrap());
    let wall = Arc::new(ManualClock::new(now_ms() - 3 * GC_GRACE_MS));
    let clock: Arc<dyn Clock> = wall.clone();
    let node_clock = Arc::new(NodeClock::unpersisted(NodeId(1), Hlc::ZERO, MAX_OFFSET_MS, clock));
    let store = LocalStore::new(engine.clone(), node_clock.clone(), 2).unwrap().with_gc_grace_ms(GC_GRACE_MS);
    Node { _dir: dir, engine, wall, node_clock, store }
}

#[test]
fn a_stale_hint_delivered_after_its_tombstone_was_purged_does_not_bring_the_key_back() {
    let Node { _dir, engine, wall, node_clock, store } = node_three_gc_grace_ago();
    let stamp = || node_clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap();
    let replicate = |version: Version| {
        wait(|done| store.apply_replicated(vec![(b"k".to_vec(), Siblings::one(version))], vec![], done))
    };

    // Three gc_grace ago: written, then deleted.
    let first = stamp().blind(Some(b"first".to_vec()));
    replicate(first.clone());
    wall.advance(10);
    replicate(stamp().blind(None));
    assert!(versions(&store, b"k").is_some_and(|s| s.all_tombstones()), "deleted");
    engine.flush().unwrap();
    engine.compact().unwrap();
    assert_eq!(engine.get(&data_key(b"k")).unwrap(), None, "the tombstone was purged, and what it covered");

    // Now: the hint held for this node while it was down arrives.
    wall.set(now_ms());
    replicate(first);
    assert_eq!(store.stale_refused(), 1, "the stale version was refused");
    assert_eq!(versions(&store, b"k"), None, "the deleted key stays deleted");

    // A version above the horizon is taken as always.
    let fresh = stamp().blind(Some(b"fresh".to_vec()));
    replicate(fresh.clone());
    assert_eq!(versions(&store, b"k"), Some(Siblings::one(fresh)));
}

/// A message's tombstone below the horizon is refused like any version,
/// except where it deletes a live version held: a replica that missed a
/// delete for longer than `gc_grace` still takes it, and the deleted key
/// does not live on there.
#[test]
fn a_tombstone_past_the_horizon_is_taken_only_where_it_deletes_a_live_version() {
    let Node { _dir, wall, node_clock, store, .. } = node_three_gc_grace_ago();
    let stamp = || node_clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap();
    let replicate = |key: &[u8], version: Version| {
        wait(|done| store.apply_replicated(vec![(key.to_vec(), Siblings::one(version))], vec![], done))
    };

    // Three gc_grace ago: "missed" written here, its delete made elsewhere;
    // "never" never written here.
    replicate(b"missed", stamp().blind(Some(b"old".to_vec())));
    wall.advance(10);
    let (deleted, never_held) = (stamp().blind(None), stamp().blind(None));
    wall.set(now_ms());

    replicate(b"never", never_held);
    assert_eq!(versions(&store, b"never"), None, "a tombstone that deletes nothing here is refused");
    assert_eq!(store.stale_refused(), 1);
    replicate(b"missed", deleted.clone());
    assert_eq!(versions(&store, b"missed"), Some(Siblings::one(deleted.clone())), "the live version is deleted");
    assert_eq!(store.stale_refused(), 1);
    // Once more: now it deletes nothing live, and changes nothing.
    replicate(b"missed", deleted.clone());
    assert_eq!(store.stale_refused(), 2);
    assert_eq!(versions(&store, b"missed"), Some(Siblings::one(deleted)));
}

/// Anti-entropy streams another replica's current state: a live version
/// older than the horizon is taken (no replica's state holds what a purged
/// tombstone deleted), an old tombstone only where it deletes a live
/// version (a replica that purged it does not take it back).
#[test]
fn an_exchange_takes_old_live_versions_and_old_tombstones_only_where_they_delete() {
    let Node { _dir, wall, node_clock, store, .. } = node_three_gc_grace_ago();
    let stamp = || node_clock.stamp(Hlc::ZERO, Hlc::ZERO, None).unwrap();
    let stream = |key: &[u8], version: Version| {
        wait(|done| store.apply_streamed(vec![(key.to_vec(), Siblings::one(version))], done))
    };
    let (old, purged_here) = (stamp().blind(Some(b"old".to_vec())), stamp().blind(None));
    wall.advance(10);
    let deletes_old = stamp().blind(None);
    wall.set(now_ms());

    stream(b"missed", old.clone());
    assert_eq!(versions(&store, b"missed"), Some(Siblings::one(old)), "an old live version is taken");
    stream(b"purged", purged_here);
    assert_eq!(versions(&store, b"purged"), None, "an old tombstone that deletes nothing is not");
    stream(b"missed", deletes_old.clone());
    assert_eq!(versions(&store, b"missed"), Some(Siblings::one(deletes_old.clone())));
    assert_eq!(store.stale_refused(), 1);
    // An old live version that what is held here deletes does not land
    // beside it (the tombstone's purge would uncover it).
    stream(b"missed", stamp_before(&deletes_old));
    assert_eq!(store.stale_refused(), 2);
    assert_eq!(versions(&store, b"missed"), Some(Siblings::one(deletes_old)));
}

/// A live version stamped just before `version`.
fn stamp_before(version: &Version) -> Version {
    Version { hlc: Hlc(version.hlc.0 - 1), value: Some(b"older".to_vec()), ..version.clone() }
}
