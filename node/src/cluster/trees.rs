//! The hash trees a node keeps of its own data (see [`super::antientropy`]
//! for what a tree is): one per replica set it belongs to.
//!
//! - Owns: the trees, and each key's leaf, by a 64-bit hash of the key (16
//!   bytes a key in a hash table: 17-34 MB per million keys, as the table
//!   is more or less full).
//! - Receives: the keys of each write once it is durable and visible
//!   ([`Trees::written`]), on a thread that may read the engine.
//! - Does: reads each such key's merged versions from the engine, after the
//!   write, and moves the key's leaf in its replica set's tree. A key's
//!   leaf is always what the engine held when it was read, so the order in
//!   which writes are reported, or a write reported twice, does not matter.
//! - Decides which deleted keys compaction may purge
//!   ([`TreeKeeper::may_purge`], through [`PurgeByExchanges`]): those a
//!   full exchange of their replica set covered ([`TreeKeeper::covered`],
//!   after a [`TreeKeeper::barrier`]).
//! - Is built at start by one scan of the data ([`Trees::build`]): trees
//!   are not persisted, so a restart costs a scan and a crash loses
//!   nothing. [`Trees::check`] compares them with a fresh scan.
//!
//! Two keys whose 64-bit hashes collide (about one pair in 10^7 at a
//! million keys) share a leaf slot: their segment then differs from a
//! replica's that holds the same data, and exchanges find no key to repair
//! there. It costs a listing of that segment per exchange, never data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;

use quiver_ring::ring::Ring;
use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::{NodeId, Siblings};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::antientropy::{leaf, segment_tokens, Segment, Tree};
use super::calls::off_worker;
use crate::storage::keys::{data_key, keyspace_start, token_range_start, user_key, Keyspace};
use crate::storage::{self, Engine};
use crate::{horizon, lock};

/// The nodes that replicate a key, in id order.
pub type ReplicaSet = Vec<NodeId>;

/// A seed for the hash that names a key in the table of leaves.
const KEY_SEED: u64 = 0x7ee5_0f1e_a5ed;

/// The trees and leaves of one node.
#[derive(Debug, Default)]
struct Kept {
    trees: HashMap<ReplicaSet, Tree>,
    leaves: HashMap<u64, u64>,
}

/// A node's hash trees (see the module's doc).
#[derive(Debug)]
pub struct Trees {
    engine: Arc<Engine>,
    ring: Arc<Ring>,
    replicas: usize,
    kept: Mutex<Kept>,
}

impl Trees {
    /// The trees of what `engine` holds, its keys placed on `ring` with
    /// `replicas` copies each: one scan of the data.
    pub fn build(engine: Arc<Engine>, ring: Arc<Ring>, replicas: usize) -> storage::Result<Trees> {
        let trees = Trees { engine, ring, replicas, kept: Mutex::default() };
        let kept = trees.scanned()?;
        *lock(&trees.kept) = kept;
        Ok(trees)
    }

    /// The replica set of `key`.
    pub fn replica_set(&self, key: &[u8]) -> ReplicaSet {
        let mut set = self.ring.preference_list(key, self.replicas);
        set.sort_unstable();
        set
    }

    /// Trees and leaves as a scan of the data finds them now.
    fn scanned(&self) -> storage::Result<Kept> {
        let mut kept = Kept::default();
        let data = self.engine.scan(&keyspace_start(Keyspace::Data), Some(&keyspace_start(Keyspace::Hints)));
        for entry in data {
            let (stored, siblings) = entry?;
            let Some(key) = user_key(&stored) else { continue };
            let leaf = leaf(key, Some(&siblings));
            if leaf != 0 {
                kept.leaves.insert(xxh3_64_with_seed(key, KEY_SEED), leaf);
                kept.trees.entry(self.replica_set(key)).or_default().change(key, 0, leaf);
            }
        }
        Ok(kept)
    }

    /// `keys` were written (durable and visible): their leaves follow what
    /// the engine holds of them now.
    pub fn written<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> storage::Result<()> {
        for key in keys {
            let siblings = self.engine.get(&data_key(key))?;
            let new = leaf(key, siblings.as_ref());
            let mut kept = lock(&self.kept);
            let slot = xxh3_64_with_seed(key, KEY_SEED);
            let old = match new {
                0 => kept.leaves.remove(&slot),
                _ => kept.leaves.insert(slot, new),
            }
            .unwrap_or(0);
            if old != new {
                kept.trees.entry(self.replica_set(key)).or_default().change(key, old, new);
            }
        }
        Ok(())
    }

    /// Keys with a leaf, over every tree.
    pub fn keys(&self) -> u64 {
        lock(&self.kept).leaves.len() as u64
    }

    /// The ring the trees place keys on.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// The tree of `set` now (empty if this node holds none of its keys).
    pub fn tree(&self, set: &[NodeId]) -> Tree {
        lock(&self.kept).trees.get(set).cloned().unwrap_or_default()
    }

    /// The replica sets this node holds keys of.
    pub fn sets(&self) -> Vec<ReplicaSet> {
        lock(&self.kept).trees.keys().cloned().collect()
    }

    /// This node's keys of `set` in `segments`, each with its leaf: a range
    /// scan per run of adjacent segments (a scan reads every memtable
    /// entry once, so one per segment would cost a memtable's worth each).
    pub fn list(&self, set: &[NodeId], segments: &[Segment]) -> storage::Result<Vec<(Vec<u8>, u64)>> {
        let mut sorted = segments.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut listed = Vec::new();
        for run in sorted.chunk_by(|a, b| a.checked_add(1) == Some(*b)) {
            let (Some(&first), Some(&last)) = (run.first(), run.last()) else { continue };
            let (start, _) = segment_tokens(first);
            let (_, end) = segment_tokens(last);
            let end = end.checked_add(1).map_or_else(|| keyspace_start(Keyspace::Hints), token_range_start);
            for entry in self.engine.scan(&token_range_start(start), Some(&end)) {
                let (stored, siblings) = entry?;
                let Some(key) = user_key(&stored) else { continue };
                let leaf = leaf(key, Some(&siblings));
                if leaf != 0 && self.replica_set(key) == set {
                    listed.push((key.to_vec(), leaf));
                }
            }
        }
        Ok(listed)
    }

    /// The sibling sets of `keys` here (`None` for a key not held).
    pub fn siblings(&self, keys: &[Vec<u8>]) -> storage::Result<Vec<(Vec<u8>, Option<Siblings>)>> {
        keys.iter().map(|key| Ok((key.clone(), self.engine.get(&data_key(key))?))).collect()
    }

    /// The keys whose kept leaf is not the leaf of what a scan of the data
    /// finds now, or that one of them lacks (at most `max`), and the keys
    /// the scan read. Writes during the scan make keys differ for a while:
    /// see [`TreeKeeper::check`].
    fn leaves_differing(&self, max: usize) -> storage::Result<(Vec<Vec<u8>>, u64)> {
        let mut unseen: std::collections::HashSet<u64> = lock(&self.kept).leaves.keys().copied().collect();
        let (mut differing, mut scanned) = (Vec::new(), 0);
        let data = self.engine.scan(&keyspace_start(Keyspace::Data), Some(&keyspace_start(Keyspace::Hints)));
        for entry in data {
            let (stored, siblings) = entry?;
            let Some(key) = user_key(&stored) else { continue };
            scanned += 1;
            let slot = xxh3_64_with_seed(key, KEY_SEED);
            unseen.remove(&slot);
            let kept = lock(&self.kept).leaves.get(&slot).copied().unwrap_or(0);
            if kept != leaf(key, Some(&siblings)) && differing.len() < max {
                differing.push(key.to_vec());
            }
        }
        // Leaves of keys the data no longer holds (by their slot only: the
        // key itself is not kept).
        if differing.len() < max && !unseen.is_empty() {
            differing.extend(unseen.into_iter().take(max - differing.len()).map(|slot| slot.to_be_bytes().to_vec()));
        }
        Ok((differing, scanned))
    }

    /// Whether the trees kept are the trees of the data now (a fresh
    /// scan): `Err` names the first replica set that differs. Call it
    /// while nothing is written.
    pub fn check(&self) -> Result<(), String> {
        let scanned = self.scanned().map_err(|e| format!("scanning the data: {e}"))?;
        let kept = lock(&self.kept);
        let empty = Tree::default();
        let sets = kept.trees.keys().chain(scanned.trees.keys());
        for set in sets {
            let (ours, fresh) = (kept.trees.get(set).unwrap_or(&empty), scanned.trees.get(set).unwrap_or(&empty));
            if ours != fresh {
                return Err(format!(
                    "the tree of replica set {:?} has {} keys and root {:016x}; the data, {} keys and root {:016x}",
                    set.iter().map(|id| format!("{:016x}", id.0)).collect::<Vec<_>>(),
                    ours.keys(),
                    ours.root(),
                    fresh.keys(),
                    fresh.root()
                ));
            }
        }
        Ok(())
    }
}

/// The error of what needs a node's trees before they are built.
pub fn not_built() -> ServerError {
    ServerError::new(ErrorKind::Unavailable, "this node's hash trees are not built yet (the ring is not known)")
}

/// Where the ring comes from: `None` while it is not known yet.
pub type RingSource = Box<dyn Fn() -> Option<Arc<Ring>> + Send>;

/// Keeps a node's [`Trees`] on a thread of its own (`quiver-trees`): builds
/// them once the ring is known (and again when it changes, or after keys
/// were dropped at the feed's bound), then feeds them the keys written.
///
/// - Bound: `feed_keys_max` keys waiting to be read back (a setting);
///   past it a write's keys are dropped and counted, and the trees are
///   rebuilt by a scan (nothing is lost: the scan reads every key).
#[derive(Debug)]
pub struct TreeKeeper {
    engine: Arc<Engine>,
    trees: Arc<Mutex<Option<Arc<Trees>>>>,
    shared: Arc<Shared>,
    /// For each replica set, its last full exchange: the sequence up to
    /// which it covered this node's writes (see [`TreeKeeper::may_purge`]),
    /// and when it began (wall ms).
    covered: Mutex<HashMap<ReplicaSet, FullExchange>>,
    purged: AtomicU64,
}

/// A replica set's last full exchange (one with every other replica, all
/// in sync).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullExchange {
    /// It began once the trees held every write up to this sequence.
    pub held: u64,
    /// When it began (wall ms).
    pub began_ms: u64,
}

/// What the keeper's thread is sent.
#[derive(Debug)]
enum Feed {
    /// The keys of a write.
    Keys(Vec<Vec<u8>>),
    /// Answer once the trees hold every write up to this sequence.
    Barrier(u64, tokio::sync::oneshot::Sender<Option<u64>>),
}

#[derive(Debug, Default)]
struct Shared {
    /// What waits for the keeper's thread. Writers queue their keys
    /// without waking it (a wake per write cost a few microseconds of CPU
    /// each): it looks every `FEED_TICK`, and at once for a barrier.
    feed: Mutex<Queue>,
    fed_ready: Condvar,
    queued: AtomicU64,
    feed_keys_max: u64,
    dropped: AtomicU64,
    overflowed: AtomicBool,
    builds: AtomicU64,
    fed: AtomicU64,
    failure: Mutex<Option<String>>,
}

#[derive(Debug, Default)]
struct Queue {
    items: Vec<Feed>,
    /// The keeper is dropped: its thread ends.
    closed: bool,
}

impl Shared {
    fn send(&self, feed: Feed, wake: bool) {
        lock(&self.feed).items.push(feed);
        if wake {
            self.fed_ready.notify_one();
        }
    }
}

/// What `status` shows of a [`TreeKeeper`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeeperStatus {
    pub built: bool,
    pub keys: u64,
    pub sets: usize,
    pub queued: u64,
    pub feed_keys_max: u64,
    pub dropped: u64,
    pub builds: u64,
    pub fed: u64,
    pub failure: Option<String>,
    /// Deleted keys purged (see [`TreeKeeper::may_purge`]).
    pub purged: u64,
}

impl TreeKeeper {
    /// Starts the thread that keeps `engine`'s trees, with `replicas`
    /// copies of each key on the ring `ring` gives.
    pub fn start(
        engine: Arc<Engine>,
        ring: RingSource,
        replicas: usize,
        feed_keys_max: u64,
    ) -> std::io::Result<TreeKeeper> {
        let shared = Arc::new(Shared { feed_keys_max, ..Shared::default() });
        let trees = Arc::new(Mutex::new(None));
        let kept = Keeping { engine: engine.clone(), ring, replicas, trees: trees.clone(), shared: shared.clone() };
        std::thread::Builder::new().name("quiver-trees".into()).spawn(move || kept.run())?;
        Ok(TreeKeeper { engine, trees, shared, covered: Mutex::default(), purged: AtomicU64::new(0) })
    }

    /// Waits until the trees hold every write acknowledged before the
    /// call, and returns the engine's sequence they hold writes up to
    /// (`None` if they are not built: the ring is not known).
    pub async fn barrier(&self) -> Option<u64> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        // Acknowledgements come in sequence order, each write's keys fed
        // before it is acknowledged: once the engine answers, every write
        // up to `seq` has been fed, and the keeper reads the barrier after.
        self.engine.after_acknowledged(move |acknowledged| match acknowledged {
            Ok(seq) => shared.send(Feed::Barrier(seq, answer), true),
            Err(_) => drop(answer),
        });
        answered.await.ok().flatten()
    }

    /// A full exchange of `set` ended in sync.
    pub fn covered(&self, set: ReplicaSet, full: FullExchange) {
        let mut covered = lock(&self.covered);
        let last = covered.entry(set).or_default();
        *last = FullExchange { held: last.held.max(full.held), began_ms: last.began_ms.max(full.began_ms) };
    }

    /// The last full exchange of `set` (`None`: none since the node
    /// started).
    pub fn last_full_exchange(&self, set: &[NodeId]) -> Option<FullExchange> {
        lock(&self.covered).get(set).copied()
    }

    /// Whether `key`, deleted, past the grace period and written here at
    /// `written_seq` or before, may be purged: only if a full exchange of
    /// its replica set began after its tree held that write. Such an
    /// exchange gave every other replica the tombstone (or found it there,
    /// or found that it held no live version it deletes), and every replica
    /// refuses versions older than the horizon: nothing it deleted can
    /// come back.
    pub fn may_purge(&self, key: &[u8], written_seq: u64) -> bool {
        let Some(trees) = self.trees() else { return false };
        horizon::covered(written_seq, self.last_full_exchange(&trees.replica_set(key)).map(|full| full.held))
    }

    /// Checks the kept trees against the data while writes go on: a scan
    /// behind a barrier finds the keys whose leaf differs from the data; a
    /// key written during the scan may differ then, so the scan is made
    /// again behind a new barrier, up to three times, and only what every
    /// scan found is reported (at most 100 keys; a leaf whose key the data
    /// no longer holds is named by its 8-byte slot), with the keys scanned.
    pub async fn check(&self) -> Result<(Vec<Vec<u8>>, u64), ServerError> {
        let mut found: Option<(Vec<Vec<u8>>, u64)> = None;
        for _ in 0..3 {
            self.barrier().await.ok_or_else(not_built)?;
            let trees = self.trees().ok_or_else(not_built)?;
            let (differing, keys) = off_worker(move || trees.leaves_differing(100)).await?;
            let differing = match found {
                None => differing,
                Some((before, _)) => before.into_iter().filter(|key| differing.contains(key)).collect(),
            };
            let done = differing.is_empty();
            found = Some((differing, keys));
            if done {
                break;
            }
        }
        Ok(found.unwrap_or_default())
    }

    /// Deleted keys were purged: their leaves go.
    pub fn purged(&self, keys: Vec<Vec<u8>>) {
        self.purged.fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.written(keys);
    }

    /// The keys of a write, durable and visible (quick: queues them).
    pub fn written(&self, keys: Vec<Vec<u8>>) {
        let n = keys.len() as u64;
        let queued = self.shared.queued.fetch_add(n, Ordering::AcqRel);
        if queued.saturating_add(n) > self.shared.feed_keys_max {
            self.shared.queued.fetch_sub(n, Ordering::AcqRel);
            self.shared.dropped.fetch_add(n, Ordering::Relaxed);
            self.shared.overflowed.store(true, Ordering::Release);
            return;
        }
        self.shared.send(Feed::Keys(keys), false);
    }

    /// The trees, once built.
    pub fn trees(&self) -> Option<Arc<Trees>> {
        lock(&self.trees).clone()
    }

    pub fn status(&self) -> KeeperStatus {
        let trees = self.trees();
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        KeeperStatus {
            built: trees.is_some(),
            keys: trees.as_ref().map_or(0, |t| t.keys()),
            sets: trees.as_ref().map_or(0, |t| t.sets().len()),
            queued: get(&self.shared.queued),
            feed_keys_max: self.shared.feed_keys_max,
            dropped: get(&self.shared.dropped),
            builds: get(&self.shared.builds),
            fed: get(&self.shared.fed),
            failure: lock(&self.shared.failure).clone(),
            purged: get(&self.purged),
        }
    }
}

/// The engine's [`Purge`](storage::Purge) on a node of a cluster:
/// asks the node's [`TreeKeeper`] (made after the engine it reads, hence
/// attached later, and held weakly: it holds the engine). Until then,
/// nothing is purged.
#[derive(Debug, Default)]
pub struct PurgeByExchanges(OnceLock<Weak<TreeKeeper>>);

impl PurgeByExchanges {
    pub fn attach(&self, keeper: &Arc<TreeKeeper>) {
        let _ = self.0.set(Arc::downgrade(keeper));
    }

    fn keeper(&self) -> Option<Arc<TreeKeeper>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

impl storage::Purge for PurgeByExchanges {
    fn may_drop(&self, key: &[u8], written_seq: u64) -> bool {
        self.keeper().is_some_and(|keeper| keeper.may_purge(key, written_seq))
    }

    fn dropped(&self, keys: Vec<Vec<u8>>) {
        if let Some(keeper) = self.keeper() {
            keeper.purged(keys);
        }
    }
}

/// What the keeper's thread holds.
struct Keeping {
    engine: Arc<Engine>,
    ring: RingSource,
    replicas: usize,
    trees: Arc<Mutex<Option<Arc<Trees>>>>,
    shared: Arc<Shared>,
}

/// How often the keeper looks for keys written (and at the ring).
const FEED_TICK: Duration = Duration::from_millis(10);

impl Drop for TreeKeeper {
    fn drop(&mut self) {
        lock(&self.shared.feed).closed = true;
        self.shared.fed_ready.notify_one();
    }
}

impl Keeping {
    fn run(self) {
        loop {
            let batch = {
                let mut queue = lock(&self.shared.feed);
                if queue.items.is_empty() && !queue.closed {
                    queue =
                        self.shared.fed_ready.wait_timeout(queue, FEED_TICK).map_or_else(|p| p.into_inner().0, |w| w.0);
                }
                if queue.closed {
                    return;
                }
                std::mem::take(&mut queue.items)
            };
            let current = lock(&self.trees).clone();
            let ring = (self.ring)();
            // Until the ring is known nothing is built (a later scan reads
            // what is written meanwhile).
            if let Some(ring) = ring {
                let stale = current
                    .as_ref()
                    .is_none_or(|trees| !Arc::ptr_eq(&trees.ring, &ring) && trees.ring.view() != ring.view());
                if stale || self.shared.overflowed.swap(false, Ordering::AcqRel) {
                    // Keys queued before the scan are in it: they are
                    // read again after, which changes nothing.
                    self.build(ring);
                }
            }
            for feed in batch {
                match feed {
                    Feed::Keys(keys) => self.read_back(keys),
                    Feed::Barrier(seq, answer) => {
                        // Built (by a scan after `seq`, or fed every key up
                        // to it) and nothing dropped since.
                        let held = lock(&self.trees).is_some() && !self.shared.overflowed.load(Ordering::Acquire);
                        let _ = answer.send(held.then_some(seq));
                    }
                }
            }
        }
    }

    /// Moves the leaves of `keys` to what the engine holds of them now.
    fn read_back(&self, keys: Vec<Vec<u8>>) {
        let n = keys.len() as u64;
        if let Some(trees) = lock(&self.trees).clone() {
            if let Err(error) = trees.written(keys.iter().map(Vec::as_slice)) {
                // The trees may now be behind the data: built again.
                *lock(&self.shared.failure) = Some(format!("reading written keys back: {error}"));
                self.shared.overflowed.store(true, Ordering::Release);
            }
            self.shared.fed.fetch_add(n, Ordering::Relaxed);
        }
        self.shared.queued.fetch_sub(n, Ordering::AcqRel);
    }

    fn build(&self, ring: Arc<Ring>) {
        match Trees::build(self.engine.clone(), ring, self.replicas) {
            Ok(trees) => {
                *lock(&self.trees) = Some(Arc::new(trees));
                self.shared.builds.fetch_add(1, Ordering::Relaxed);
                *lock(&self.shared.failure) = None;
            }
            Err(error) => {
                *lock(&self.shared.failure) = Some(format!("building the trees: {error}"));
                self.shared.overflowed.store(true, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::antientropy::segment_of;
    use crate::storage::{Op, Options};
    use quiver_ring::ring::{Member, RingView};
    use quiver_ring::{BatchId, Hlc, Version};

    fn ring(nodes: u64) -> Arc<Ring> {
        let member = |id: u64| Member {
            id: NodeId(id),
            name: format!("n{id}"),
            client_addr: String::new(),
            peer_addr: String::new(),
        };
        Arc::new(Ring::new(RingView { epoch: 1, members: (1..=nodes).map(member).collect() }))
    }

    fn write(engine: &Engine, key: &[u8], hlc: u64, value: Option<&[u8]>) {
        let version = Version {
            hlc: Hlc(hlc),
            origin: BatchId { node: NodeId(1), counter: hlc },
            causal: None,
            value: value.map(<[u8]>::to_vec),
        };
        engine.write_blocking(vec![Op { key: data_key(key), version }]).unwrap();
    }

    #[test]
    fn trees_fed_by_writes_are_the_trees_of_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), Options::default()).unwrap());
        for i in 0..500u64 {
            write(&engine, format!("old{i}").as_bytes(), i + 1, Some(b"v"));
        }
        let trees = Trees::build(engine.clone(), ring(5), 3).unwrap();
        assert!(trees.sets().len() > 1, "five nodes, three replicas: several replica sets");
        trees.check().unwrap();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for i in 0..300u64 {
            let key = format!("k{}", i % 120).into_bytes();
            write(&engine, &key, 1000 + i, (i % 7 != 0).then_some(&b"w"[..]));
            keys.push(key);
        }
        // Overwritten keys too, and a key reported twice or out of order.
        write(&engine, b"old3", 5000, None);
        keys.extend([b"old3".to_vec(), b"k5".to_vec(), b"old3".to_vec()]);
        trees.written(keys.iter().rev().map(Vec::as_slice)).unwrap();
        trees.check().unwrap();

        write(&engine, b"unreported", 6000, Some(b"x"));
        assert!(trees.check().is_err(), "a write not reported leaves a tree behind the data");
        trees.written([&b"unreported"[..]]).unwrap();
        trees.check().unwrap();
    }

    #[test]
    fn a_segment_lists_its_keys_of_one_replica_set() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), Options::default()).unwrap());
        let keys: Vec<Vec<u8>> = (0..2000u64).map(|i| format!("key{i}").into_bytes()).collect();
        for (i, key) in keys.iter().enumerate() {
            write(&engine, key, i as u64 + 1, Some(b"v"));
        }
        let trees = Trees::build(engine, ring(4), 3).unwrap();
        let key = &keys[17];
        let (set, segment) = (trees.replica_set(key), segment_of(key));
        let listed = trees.list(&set, &[segment]).unwrap();
        assert!(listed.iter().any(|(k, _)| k == key));
        let expected = keys.iter().filter(|k| segment_of(k) == segment && trees.replica_set(k) == set);
        assert_eq!(listed.len(), expected.count());
        let mut tree = Tree::default();
        listed.iter().for_each(|(k, leaf)| tree.change(k, 0, *leaf));
        let several = [segment, segment.wrapping_add(1) % 4096, segment.wrapping_add(7) % 4096];
        let mut together = trees.list(&set, &several).unwrap();
        let mut one_by_one: Vec<_> = several.iter().flat_map(|&s| trees.list(&set, &[s]).unwrap()).collect();
        together.sort();
        one_by_one.sort();
        assert_eq!(together, one_by_one, "runs of adjacent segments list what each lists");
        let (branch, at) = (segment / 64, segment as usize % 64);
        assert_eq!(tree.segments_of(branch)[at], trees.tree(&set).segments_of(branch)[at]);
    }

    /// The keeper's trees, checked while writes go on, match the data when
    /// every write is fed, and name a key written behind their back; a
    /// barrier answers once what was written before is in the trees.
    #[test]
    fn a_check_finds_a_key_written_behind_the_trees_back_and_nothing_else() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path(), storage::Options::default()).unwrap());
        let ring = ring(4);
        let keeper = TreeKeeper::start(engine.clone(), Box::new(move || Some(ring.clone())), 3, 1 << 20).unwrap();
        assert!(runtime.block_on(keeper.barrier()).is_some(), "built once the ring is known");
        for i in 0..300u64 {
            let key = format!("key{i}").into_bytes();
            write(&engine, &key, i + 1, (i % 5 != 0).then_some(&b"v"[..]));
            keeper.written(vec![key]);
        }
        assert_eq!(runtime.block_on(keeper.check()).unwrap(), (Vec::new(), 300));
        assert_eq!(keeper.trees().unwrap().keys(), 300);

        write(&engine, b"unfed", 1000, Some(b"x"));
        let (differing, keys) = runtime.block_on(keeper.check()).unwrap();
        assert_eq!((differing, keys), (vec![b"unfed".to_vec()], 301));
        keeper.written(vec![b"unfed".to_vec()]);
        assert_eq!(runtime.block_on(keeper.check()).unwrap(), (Vec::new(), 301));
    }
}
