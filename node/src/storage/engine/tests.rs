//! Tests at the seams between the engine's threads: each one holds a thread
//! inside the durable step it must wait for, and checks that the next thread
//! has not acted yet.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use quiver_ring::{Hlc, NodeId, Stamper};

use super::*;
use crate::storage::disk::{File, SimFs};
use crate::storage::manifest;
use crate::storage::wal::segment_name;

/// Which durable step a [`Gate`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The WAL's durable group write.
    WalWrite,
    /// The manifest's sync after an edit.
    ManifestSync,
}

/// Holds the next call of one durable step until the test opens it.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    armed: Option<Step>,
    /// A call is held inside the gate.
    holding: bool,
    /// The held call may finish (and the gate is disarmed).
    open: bool,
}

/// Bound on the waits below, so that a broken engine fails the test instead
/// of hanging it. Not a timing assertion: each wait returns as soon as its
/// condition holds.
const WAIT_MAX: Duration = Duration::from_secs(60);

impl Gate {
    fn arm(&self, step: Step) {
        *lock(&self.state) = GateState { armed: Some(step), holding: false, open: false };
    }

    /// Called by the file system at `step`: blocks while the gate is armed
    /// for it and not yet opened.
    fn pass(&self, step: Step) {
        let mut state = lock(&self.state);
        if state.armed != Some(step) || state.open {
            return;
        }
        state.holding = true;
        self.changed.notify_all();
        while !state.open {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until a call is held.
    fn wait_holding(&self) {
        let state = lock(&self.state);
        let (state, timeout) = self.changed.wait_timeout_while(state, WAIT_MAX, |s| !s.holding).unwrap();
        assert!(!timeout.timed_out() && state.holding, "the engine never reached the gated step");
    }

    fn open(&self) {
        let mut state = lock(&self.state);
        state.open = true;
        state.armed = None;
        self.changed.notify_all();
    }
}

/// Opens the gate when dropped, so a failed assertion does not leave an
/// engine thread blocked forever.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A [`SimFs`] whose WAL writes and manifest syncs pass a [`Gate`].
#[derive(Debug)]
struct GatedFs {
    sim: SimFs,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct GatedFile {
    file: Box<dyn File>,
    gate: Arc<Gate>,
    path: PathBuf,
}

impl GatedFile {
    /// The manifest, or the new one it is written as before its rename.
    fn is_manifest(&self) -> bool {
        self.path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(manifest::FILE_NAME))
    }
}

impl File for GatedFile {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()?;
        if self.is_manifest() {
            self.gate.pass(Step::ManifestSync);
        }
        Ok(())
    }
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // The write is on disk before the gate, as a slow disk would have it:
        // what is held is the return to the caller.
        self.file.write_durable_at(buf, offset)?;
        if self.path.extension().is_some_and(|ext| ext == "wal") {
            self.gate.pass(Step::WalWrite);
        }
        Ok(())
    }
}

impl GatedFs {
    fn wrap(&self, path: &Path, file: io::Result<Box<dyn File>>) -> io::Result<Box<dyn File>> {
        Ok(Box::new(GatedFile { file: file?, gate: self.gate.clone(), path: path.to_path_buf() }))
    }
}

impl Fs for GatedFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.wrap(path, self.sim.create(path))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.wrap(path, self.sim.open(path))
    }
    fn open_log(&self, path: &Path) -> io::Result<Box<dyn File>> {
        self.wrap(path, self.sim.open_log(path))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.sim.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.sim.rename(from, to)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.sim.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.sim.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sim.sync_dir(dir)
    }
}

fn gated_engine(opts: Options) -> (Engine, Arc<Gate>, SimFs, PathBuf) {
    let sim = SimFs::new();
    let gate = Arc::new(Gate::default());
    let dir = PathBuf::from("/db");
    let fs = Arc::new(GatedFs { sim: sim.clone(), gate: gate.clone() });
    let engine = Engine::open_with(fs, &dir, opts).unwrap();
    (engine, gate, sim, dir)
}

fn op(stamper: &mut Stamper, key: &[u8], value: &[u8]) -> Op {
    Op {
        key: key.to_vec(),
        version: stamper.next(now_ms()).expect("a test clock never refuses").blind(Some(value.to_vec())),
    }
}

/// A delete of `key`: a blind tombstone.
fn delete(stamper: &mut Stamper, key: &[u8]) -> Op {
    Op { key: key.to_vec(), version: stamper.next(now_ms()).expect("a test clock never refuses").blind(None) }
}

/// An engine with compaction only when asked and tombstones droppable at
/// once, whose value cache holds only what reads put there, and a stamper
/// for its writes.
fn engine_compacting_on_demand() -> (Engine, Arc<Gate>, SimFs, PathBuf, Stamper) {
    engine_compacting_on_demand_with(Options { warm_value_cache_on_flush: false, ..Options::default() })
}

/// [`engine_compacting_on_demand`] with `opts` otherwise.
fn engine_compacting_on_demand_with(opts: Options) -> (Engine, Arc<Gate>, SimFs, PathBuf, Stamper) {
    let opts = Options { background_compaction: false, tombstone_grace_ms: 0, ..opts };
    let (engine, gate, sim, dir) = gated_engine(opts);
    (engine, gate, sim, dir, Stamper::new(NodeId(1), Hlc(0), u64::MAX))
}

fn value_of(engine: &Engine, key: &[u8]) -> Option<Vec<u8>> {
    engine.get(key).unwrap().and_then(|s| s.value().map(<[u8]>::to_vec))
}

/// The commit thread must not pass a group on (and so nothing may
/// acknowledge it) before its durable write has returned.
#[test]
fn a_group_is_acknowledged_only_after_its_durable_write_returned() {
    let (engine, gate, _sim, _dir) = gated_engine(Options::default());
    let _open = OpenOnDrop(gate.clone());
    let mut stamper = Stamper::new(NodeId(1), Hlc(0), u64::MAX);
    gate.arm(Step::WalWrite);
    let (acked, answers) = std::sync::mpsc::channel();
    engine.write_then(vec![op(&mut stamper, b"k", b"v")], move |result| {
        let _ = acked.send(result);
    });
    gate.wait_holding();
    // The write's bytes are on the disk, but its durable write has not
    // returned: it must be neither acknowledged nor visible.
    assert!(answers.try_recv().is_err(), "acknowledged before the durable write returned");
    assert_eq!(value_of(&engine, b"k"), None, "visible before the durable write returned");
    gate.open();
    let seq = answers.recv_timeout(WAIT_MAX).expect("never acknowledged").unwrap();
    assert_eq!(seq, 1);
    // Acknowledged means visible.
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"v"[..]));
}

/// A frozen memtable stays readable, and the WAL segments it came from stay
/// on disk, until the manifest edit that names its table is durable.
#[test]
fn a_frozen_memtable_and_its_wal_stay_until_its_tables_manifest_edit_is_durable() {
    let opts = Options { wal_segment_bytes: 16 << 10, background_compaction: false, ..Options::default() };
    let (engine, gate, sim, dir) = gated_engine(opts);
    let engine = Arc::new(engine);
    let _open = OpenOnDrop(gate.clone());
    let mut stamper = Stamper::new(NodeId(1), Hlc(0), u64::MAX);
    // Enough writes to fill the first segment, so that one is retired by
    // the flush.
    for i in 0..40u32 {
        engine.write_blocking(vec![op(&mut stamper, format!("key{i:03}").as_bytes(), &[7; 1000])]).unwrap();
    }
    let first_segment = dir.join(segment_name(1));
    assert!(sim.get(&first_segment).is_some(), "the first segment should exist before the flush");

    gate.arm(Step::ManifestSync);
    let flushing = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.flush())
    };
    gate.wait_holding();
    // The table is written and its edit is in the manifest file, but the
    // edit's sync has not returned.
    let levels = engine.inner.levels();
    assert_eq!(levels.frozen.len(), 1, "the frozen memtable was released before its manifest edit was durable");
    assert!(levels.tables.is_empty(), "the table was swapped in before its manifest edit was durable");
    assert!(sim.get(&first_segment).is_some(), "a WAL segment was retired before the manifest edit was durable");
    assert_eq!(value_of(&engine, b"key007").as_deref(), Some(&[7; 1000][..]));

    gate.open();
    flushing.join().unwrap().unwrap();
    let levels = engine.inner.levels();
    assert!(levels.frozen.is_empty());
    assert_eq!(levels.tables.len(), 1);
    // Retiring follows the swap on the flush-io thread; a shutdown waits
    // for it.
    engine.shutdown().unwrap();
    assert!(sim.get(&first_segment).is_none(), "the segment the table covers should be retired");
    assert_eq!(value_of(&engine, b"key007").as_deref(), Some(&[7; 1000][..]));
}

/// A read that no table may answer is answered from the memtables alone;
/// one that a table may answer is not (it needs a file read).
#[test]
fn a_read_is_in_memory_only_when_no_table_may_hold_its_key() {
    let opts = Options { background_compaction: false, warm_value_cache_on_flush: false, ..Options::default() };
    let (engine, _gate, _sim, _dir) = gated_engine(opts);
    let mut stamper = Stamper::new(NodeId(1), Hlc(0), u64::MAX);
    engine.write_blocking(vec![op(&mut stamper, b"b-flushed", b"1")]).unwrap();
    engine.flush().unwrap();
    engine.write_blocking(vec![op(&mut stamper, b"c-in-memory", b"2")]).unwrap();
    assert!(engine.value_in_memory(b"b-flushed").is_none(), "a table holds it: the read needs that table");
    assert_eq!(engine.value_in_memory(b"c-in-memory"), Some(Some(b"2".to_vec())));
    // Outside every table's key range: absent, known from memory.
    assert_eq!(engine.value_in_memory(b"a-never"), Some(None));
    // A newer version in memory of a key a table also holds still needs
    // the table (its versions are merged).
    engine.write_blocking(vec![op(&mut stamper, b"b-flushed", b"3")]).unwrap();
    assert!(engine.value_in_memory(b"b-flushed").is_none());
    assert_eq!(value_of(&engine, b"b-flushed").as_deref(), Some(&b"3"[..]));
}

/// A cached read survives the changes of the tables that cannot have
/// changed its key: a flush of other keys, a compaction that dropped
/// nothing; a hit keeps it under the newer tables. A flush that may hold
/// the key, a compaction that dropped keys, or more changes than the
/// engine remembers since its last hit, and it is read again.
#[test]
fn a_cached_read_outlives_flushes_of_other_keys_and_compactions_that_keep_every_key() {
    let (engine, _gate, _sim, _dir, mut stamper) = engine_compacting_on_demand();
    let in_memory = |engine: &Engine| engine.value_in_memory(b"k");
    engine.write_blocking(vec![op(&mut stamper, b"k", b"1")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"1"[..]));
    assert_eq!(in_memory(&engine), Some(Some(b"1".to_vec())), "the read is cached");

    // Flushes of keys outside `k`'s table key range, then a compaction of
    // everything that drops nothing: still answered from memory.
    for other in [&b"x1"[..], b"x2", b"x3"] {
        engine.write_blocking(vec![op(&mut stamper, other, b"other")]).unwrap();
        engine.flush().unwrap();
    }
    assert_eq!(in_memory(&engine), Some(Some(b"1".to_vec())), "a flush of other keys dropped the cached read");
    engine.compact().unwrap();
    assert_eq!(in_memory(&engine), Some(Some(b"1".to_vec())), "a compaction that kept every key dropped it");

    // A flush that holds `k`: read again, and the new version is seen.
    engine.write_blocking(vec![op(&mut stamper, b"k", b"2")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(in_memory(&engine), None, "a read cached before a flush of its key answered");
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"2"[..]));
    assert_eq!(in_memory(&engine), Some(Some(b"2".to_vec())));

    // A compaction that drops a deleted key: every cached read goes.
    engine.write_blocking(vec![delete(&mut stamper, b"x1")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"2"[..]));
    assert!(in_memory(&engine).is_some());
    engine.compact().unwrap();
    assert_eq!(in_memory(&engine), None, "a read cached before a compaction that dropped keys answered");
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"2"[..]));

    // More changes than remembered in all, but a hit halfway: the hit
    // keeps the entry under the newer tables, and it is still used.
    let flush_others = |stamper: &mut Stamper, from: usize, to: usize| {
        for i in from..to {
            engine.write_blocking(vec![op(stamper, format!("y{i}").as_bytes(), b"other")]).unwrap();
            engine.flush().unwrap();
        }
    };
    flush_others(&mut stamper, 0, CHANGES_KEPT / 2);
    assert_eq!(in_memory(&engine), Some(Some(b"2".to_vec())));
    flush_others(&mut stamper, CHANGES_KEPT / 2, CHANGES_KEPT + 2);
    assert_eq!(in_memory(&engine), Some(Some(b"2".to_vec())), "a hit did not keep the entry");
    // More changes than remembered since the last hit: read again.
    flush_others(&mut stamper, CHANGES_KEPT + 2, 2 * CHANGES_KEPT + 3);
    assert_eq!(in_memory(&engine), None, "a read cached before more changes than are remembered answered");
}

/// A flush puts what it wrote into the value cache, so that a key just
/// flushed is answered from memory: alone when no older table may hold it,
/// merged with what the cache held of the older tables, or else with what
/// they hold, when they may. It takes only free room: what reads cached
/// stays.
#[test]
fn a_flush_warms_the_value_cache_in_free_room_only() {
    let (engine, _gate, _sim, _dir, mut stamper) = engine_compacting_on_demand_with(Options::default());
    engine.write_blocking(vec![op(&mut stamper, b"k", b"1")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(engine.value_in_memory(b"k"), Some(Some(b"1".to_vec())), "a key just flushed needs a table read");
    // Flushed again over the older table: merged with what was cached.
    engine.write_blocking(vec![op(&mut stamper, b"k", b"2")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(engine.value_in_memory(b"k"), Some(Some(b"2".to_vec())));
    // A version from a node whose clock is an hour ahead: it wins over
    // every later write of this node.
    let ahead = Stamper::new(NodeId(2), Hlc(0), u64::MAX).next(now_ms() + 3_600_000).unwrap();
    engine.write_blocking(vec![Op { key: b"k".to_vec(), version: ahead.blind(Some(b"ahead".to_vec())) }]).unwrap();
    engine.flush().unwrap();
    assert_eq!(engine.value_in_memory(b"k"), Some(Some(b"ahead".to_vec())));
    // A compaction that dropped a key: the cache knows nothing of the
    // tables any more; a flush of `k` merges the older tables' versions,
    // read from them.
    engine.write_blocking(vec![delete(&mut stamper, b"x")]).unwrap();
    engine.flush().unwrap();
    engine.compact().unwrap();
    assert_eq!(engine.value_in_memory(b"k"), None, "a compaction that dropped a key kept the cache");
    engine.write_blocking(vec![op(&mut stamper, b"k", b"3")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(engine.value_in_memory(b"k"), Some(Some(b"ahead".to_vec())), "the older tables' versions were left out");
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"ahead"[..]));

    // A cache full of reads (400 keys, room for about 200): a flush of other
    // keys takes no room from them.
    let one = Some(Siblings::one(op(&mut stamper, b"a-000", b"v").version));
    let (_, entry_bytes) = cache_entry(b"a-000", &one).unwrap();
    let opts = Options { value_cache_bytes: 200 * entry_bytes, ..Options::default() };
    let (engine, _gate, _sim, _dir, mut stamper) = engine_compacting_on_demand_with(opts);
    let keys = |prefix: &str| (0..400).map(|i| format!("{prefix}-{i:03}").into_bytes()).collect::<Vec<_>>();
    engine.write_blocking(keys("a").iter().map(|key| op(&mut stamper, key, b"v")).collect()).unwrap();
    engine.flush().unwrap();
    for key in keys("a") {
        assert_eq!(value_of(&engine, &key).as_deref(), Some(&b"v"[..]));
    }
    let held: Vec<Vec<u8>> = keys("a").into_iter().filter(|key| engine.value_in_memory(key).is_some()).collect();
    assert!((100..400).contains(&held.len()), "{} of 400 reads cached", held.len());
    engine.write_blocking(keys("z").iter().map(|key| op(&mut stamper, key, b"v")).collect()).unwrap();
    engine.flush().unwrap();
    for key in &held {
        assert!(engine.value_in_memory(key).is_some(), "a flush pushed a cached read out");
    }
    assert!(keys("z").iter().all(|key| engine.value_in_memory(key).is_none()), "a full cache took flushed keys");
}

/// The value cache answers only for the tables it read: once a flush or a
/// compaction changes them, what it kept is not used.
#[test]
fn the_value_cache_never_answers_for_tables_that_changed() {
    let (engine, _gate, _sim, _dir, mut stamper) = engine_compacting_on_demand();
    let in_memory = |engine: &Engine| engine.value_in_memory(b"k");
    engine.write_blocking(vec![op(&mut stamper, b"k", b"1")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(in_memory(&engine), None, "nothing cached yet: the table must be read");
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"1"[..]));
    assert_eq!(in_memory(&engine), Some(Some(b"1".to_vec())), "the read is cached");

    // A newer version in the memtable is merged with the cached one.
    engine.write_blocking(vec![op(&mut stamper, b"k", b"2")]).unwrap();
    assert_eq!(in_memory(&engine), Some(Some(b"2".to_vec())));
    // Flushed: the tables changed, the cached read is not used again.
    engine.flush().unwrap();
    assert_eq!(in_memory(&engine), None, "a read cached for other tables answered");
    assert_eq!(value_of(&engine, b"k").as_deref(), Some(&b"2"[..]));

    // Deleted, flushed and compacted away: absent, cached or not.
    engine.write_blocking(vec![delete(&mut stamper, b"k")]).unwrap();
    engine.flush().unwrap();
    assert_eq!(value_of(&engine, b"k"), None);
    engine.compact().unwrap();
    assert_eq!(in_memory(&engine).flatten(), None);
    assert_eq!(value_of(&engine, b"k"), None);
    assert_eq!(engine.stats().tables, 0, "the tombstone and all it shadowed are gone");
}

/// A [`Purge`] that lets a key go only if it was written at or before a
/// sequence, and records what was dropped.
#[derive(Debug, Default)]
struct PurgeUpTo {
    seq: Mutex<u64>,
    dropped: Mutex<Vec<Vec<u8>>>,
}

impl Purge for PurgeUpTo {
    fn may_drop(&self, _key: &[u8], written_seq: u64) -> bool {
        written_seq <= *self.seq.lock().unwrap()
    }

    fn dropped(&self, keys: Vec<Vec<u8>>) {
        self.dropped.lock().unwrap().extend(keys);
    }
}

/// With a [`Purge`], a deleted data key leaves only where it allows (by
/// the sequence it was written at), and the purge hears of it once the
/// compaction is what readers see; other keyspaces' tombstones go by the
/// grace period alone.
#[test]
fn a_purge_decides_which_deleted_data_keys_compaction_drops() {
    use crate::storage::keys::{data_key, keyspace_start, Keyspace};
    let purge = Arc::new(PurgeUpTo::default());
    let opts = Options { purge: Some(purge.clone()), ..Options::default() };
    let (engine, _gate, _sim, _dir, mut stamper) = engine_compacting_on_demand_with(opts);
    let (early, late) = (data_key(b"early"), data_key(b"late"));
    let mut hint = keyspace_start(Keyspace::Hints);
    hint.extend_from_slice(b"h");
    engine.write_blocking(vec![op(&mut stamper, &early, b"1"), op(&mut stamper, &hint, b"2")]).unwrap();
    let deleted_early = engine.write_blocking(vec![delete(&mut stamper, &early), delete(&mut stamper, &hint)]).unwrap();
    engine.flush().unwrap();
    engine.write_blocking(vec![op(&mut stamper, &late, b"3")]).unwrap();
    engine.write_blocking(vec![delete(&mut stamper, &late)]).unwrap();
    engine.flush().unwrap();

    engine.compact().unwrap();
    assert_eq!(engine.stats().tombstones_dropped, 1, "only the hint's tombstone goes: the purge allows nothing");
    assert!(purge.dropped.lock().unwrap().is_empty());
    assert_eq!(engine.stats().table_tombstones, 2);

    // Both deletes are in one table now, written up to the later one: the
    // earlier alone is not enough.
    *purge.seq.lock().unwrap() = deleted_early;
    engine.compact().unwrap();
    assert_eq!(engine.stats().tombstones_dropped, 1);
    *purge.seq.lock().unwrap() = engine.stats().last_seq;
    engine.compact().unwrap();
    assert_eq!(engine.stats().tombstones_dropped, 3);
    assert_eq!(engine.stats().table_tombstones, 0);
    let mut dropped = purge.dropped.lock().unwrap().clone();
    dropped.sort();
    assert_eq!(dropped, [b"early".to_vec(), b"late".to_vec()], "user keys, each once");
    assert_eq!(engine.get(&early).unwrap(), None);
}

/// A barrier answers only after every write submitted before it was
/// acknowledged, with the last sequence acknowledged.
#[test]
fn a_barrier_answers_after_every_earlier_write_is_acknowledged() {
    let (engine, gate, _sim, _dir) = gated_engine(Options::default());
    let _open = OpenOnDrop(gate.clone());
    let mut stamper = Stamper::new(NodeId(1), Hlc(0), u64::MAX);
    engine.write_blocking(vec![op(&mut stamper, b"a", b"1")]).unwrap();
    gate.arm(Step::WalWrite);
    let (events, heard) = std::sync::mpsc::channel();
    let acked = events.clone();
    engine.write_then(vec![op(&mut stamper, b"b", b"2")], move |result| {
        let _ = acked.send(("write", result.unwrap()));
    });
    gate.wait_holding();
    engine.after_acknowledged(move |result| {
        let _ = events.send(("barrier", result.unwrap()));
    });
    assert!(heard.recv_timeout(Duration::from_millis(50)).is_err(), "the barrier passed a write not yet durable");
    gate.open();
    assert_eq!(heard.recv_timeout(WAIT_MAX).unwrap(), ("write", 2));
    assert_eq!(heard.recv_timeout(WAIT_MAX).unwrap(), ("barrier", 2));
    // With nothing in flight, at once, with the last sequence.
    let (answer, answered) = std::sync::mpsc::channel();
    engine.after_acknowledged(move |result| {
        let _ = answer.send(result.unwrap());
    });
    assert_eq!(answered.recv_timeout(WAIT_MAX).unwrap(), 2);
}

/// A deleted key whose memtable holds a version is not dropped: the
/// tombstone is not merged with the memtable, and dropping it would
/// uncover an older version written there after it (a repair's).
#[test]
fn a_tombstone_stays_while_a_memtable_holds_its_key() {
    let (engine, _gate, _sim, _dir, mut stamper) = engine_compacting_on_demand();
    let older = op(&mut stamper, b"k", b"old");
    engine.write_blocking(vec![delete(&mut stamper, b"k")]).unwrap();
    engine.flush().unwrap();
    engine.write_blocking(vec![older]).unwrap();
    assert_eq!(value_of(&engine, b"k"), None, "the tombstone deletes the older version");
    engine.compact().unwrap();
    assert_eq!(engine.stats().tombstones_dropped, 0, "kept while the memtable holds the key");
    assert_eq!(value_of(&engine, b"k"), None);
    engine.flush().unwrap();
    engine.compact().unwrap();
    assert_eq!(engine.stats().tombstones_dropped, 1, "merged with the older version, and dropped with it");
    assert_eq!(value_of(&engine, b"k"), None);
}
