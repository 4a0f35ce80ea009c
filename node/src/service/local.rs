//! [`LocalStore`]: the [`Store`] of a single node, over its own engine.
//! Blind writes are stamped here and go to the engine's commit thread;
//! reads go to the reader threads, and causal writes through the per-key
//! read-modify-write of [`super::causal`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_ring::rand::{threshold, AtomicSplitMix64};
use quiver_ring::ring::TokenRange;
use quiver_ring::wire::{ErrorKind, SearchHit, ServerError};
use quiver_ring::{Context, Hlc, Siblings};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::causal::{CausalWrite, CausalWrites, VersionsRead};
use super::reads::{Job, ReadHook, ReadJob, ReadPool, Task};
use super::{Done, Entries, Store, StoreStatus, Timing};
use crate::disk_space::{DiskSpace, Writer};
use crate::horizon::{self, Carried};
use crate::index::query::Match;
use crate::index::text::TermStats;
use crate::index::{Index, Search};
use crate::lock;
use crate::stamping::NodeClock;
use crate::storage::keys::{data_key, user_key};
use crate::storage::storage_error;
use crate::storage::{self, Engine};

/// The default `gc_grace`: ten days, as Cassandra's.
pub const GC_GRACE_MS: u64 = 10 * 24 * 3600 * 1000;

/// Keys a read may have to be tried in memory on the caller's thread: each
/// costs about a microsecond, and the caller is an async worker.
const IN_MEMORY_KEYS_MAX: usize = 16;

/// Test-only: called with each blind write before it is stamped. When it
/// returns a [`HeldWrite`], the write waits (on a thread of its own) until
/// released, as on a slow coordinator.
pub type WriteHook = Arc<dyn Fn(&Entries) -> Option<HeldWrite> + Send + Sync>;

/// A write held back by a [`WriteHook`].
#[derive(Debug)]
pub struct HeldWrite {
    /// The write goes on once this yields (or its sender is gone).
    pub release: std::sync::mpsc::Receiver<()>,
    /// Then gets the write's outcome, as its client would have.
    pub outcome: std::sync::mpsc::Sender<Result<(), ServerError>>,
}

/// Called with the user keys of each data write once it is durable and
/// visible, on the engine's thread: it must be quick (queue them). The
/// cluster's hash trees are fed so.
pub type WrittenHook = Arc<dyn Fn(Vec<Vec<u8>>) + Send + Sync>;

/// Where a node's data writes go: to the engine, or through the index
/// stage, which adds each write's index changes to its record; and who
/// hears of the keys written.
#[derive(Clone)]
pub(super) struct Writes {
    to: WritesTo,
    written: Option<WrittenHook>,
}

#[derive(Clone, Debug)]
enum WritesTo {
    Engine(Arc<Engine>),
    Indexed(Arc<Index>),
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes").field("to", &self.to).field("written", &self.written.is_some()).finish()
    }
}

impl Writes {
    /// Writes `ops` as one record (see [`Engine::write_then`]).
    pub fn write_then(&self, ops: Vec<storage::Op>, done: impl FnOnce(storage::Result<u64>) + Send + 'static) {
        let Some(hook) = &self.written else { return self.to.write_then(ops, done) };
        let keys: Vec<Vec<u8>> = ops.iter().filter_map(|op| user_key(&op.key)).map(<[u8]>::to_vec).collect();
        let hook = hook.clone();
        self.to.write_then(ops, move |result: storage::Result<u64>| {
            if result.is_ok() && !keys.is_empty() {
                hook(keys);
            }
            done(result)
        })
    }
}

impl WritesTo {
    fn write_then(&self, ops: Vec<storage::Op>, done: impl FnOnce(storage::Result<u64>) + Send + 'static) {
        match self {
            WritesTo::Engine(engine) => engine.write_then(ops, done),
            WritesTo::Indexed(index) => index.write_then(ops, Box::new(done)),
        }
    }
}

/// A node's own engine as a [`Store`].
#[derive(Debug)]
pub struct LocalStore {
    engine: Arc<Engine>,
    writes: Writes,
    index: Option<Arc<Index>>,
    clock: Arc<NodeClock>,
    reads: ReadPool,
    causal: Arc<CausalWrites>,
    /// Test-only fault: the fraction of writes acknowledged but not written,
    /// scaled to `u64::MAX`, and the generator that picks them.
    drop_threshold: u64,
    drop_rng: AtomicSplitMix64,
    drop_salt: u64,
    write_hook: Option<HookDebug>,
    /// Versions older than now minus this are refused from peers.
    gc_grace_ms: u64,
    /// The free-space reserve other nodes' writes are held to.
    disk: Option<Arc<DiskSpace>>,
    stale_refused: Arc<AtomicU64>,
    compacting: Compacting,
}

/// Who waits for the compaction `quiver compact` runs (`Some` while one
/// runs).
#[derive(Clone, Default)]
struct Compacting(Arc<Mutex<Option<Vec<Done<()>>>>>);

impl std::fmt::Debug for Compacting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compacting").field("running", &lock(&self.0).is_some()).finish()
    }
}

/// A [`WriteHook`] that `Debug` can print.
#[derive(Clone)]
struct HookDebug(WriteHook);

impl std::fmt::Debug for HookDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteHook")
    }
}

impl LocalStore {
    /// A store over an open engine, with `read_threads` reader threads,
    /// stamping with `clock`.
    pub fn new(engine: Arc<Engine>, clock: Arc<NodeClock>, read_threads: usize) -> std::io::Result<LocalStore> {
        LocalStore::with_read_hook(engine, clock, read_threads, None)
    }

    /// [`LocalStore::new`] with a test hook that every reader thread calls
    /// before it reads a chunk of keys.
    pub fn with_read_hook(
        engine: Arc<Engine>,
        clock: Arc<NodeClock>,
        read_threads: usize,
        hook: Option<ReadHook>,
    ) -> std::io::Result<LocalStore> {
        let reads = ReadPool::new(engine.clone(), read_threads, hook)?;
        let writes = Writes { to: WritesTo::Engine(engine.clone()), written: None };
        Ok(LocalStore {
            causal: Arc::new(CausalWrites::new(clock.clone(), reads.jobs().clone(), writes.clone())),
            writes,
            index: None,
            reads,
            drop_rng: AtomicSplitMix64::new(crate::now_ms()),
            drop_threshold: 0,
            drop_salt: 0,
            write_hook: None,
            gc_grace_ms: GC_GRACE_MS,
            disk: None,
            stale_refused: Arc::default(),
            compacting: Compacting::default(),
            engine,
            clock,
        })
    }

    /// Test-only: acknowledges `probability` of writes without writing them,
    /// so tests can prove that the chaos checker reports lost writes. A
    /// client's writes are picked at random; a replica's part of another
    /// node's write by its key, hashed with `salt` (the node's id): the same
    /// keys always, so this replica's copy of them never converges, which
    /// the cluster's convergence check must report.
    pub fn with_dropped_writes(mut self, probability: f64, salt: u64) -> LocalStore {
        self.drop_threshold = threshold(probability);
        self.drop_salt = salt;
        self
    }

    /// Every data write goes through `index`, which keeps it up to date,
    /// and searches read it.
    pub fn with_index(mut self, index: Arc<Index>) -> LocalStore {
        self.writes.to = WritesTo::Indexed(index.clone());
        self.causal = Arc::new(CausalWrites::new(self.clock.clone(), self.reads.jobs().clone(), self.writes.clone()));
        self.index = Some(index);
        self
    }

    /// `hook` hears of the keys of every data write once it is durable and
    /// visible.
    pub fn with_written_hook(mut self, hook: WrittenHook) -> LocalStore {
        self.writes.written = Some(hook);
        self.causal = Arc::new(CausalWrites::new(self.clock.clone(), self.reads.jobs().clone(), self.writes.clone()));
        self
    }

    /// The node's index, if it was started with one.
    pub fn index(&self) -> Option<&Arc<Index>> {
        self.index.as_ref()
    }

    /// Runs `search` on a reader thread over this node's keys in `ranges`
    /// (`None`: all of them): a coordinator's part of a search.
    pub fn search_within(&self, search: Search, ranges: Option<Vec<TokenRange>>, done: Done<Vec<SearchHit>>) {
        let Some(index) = self.index.clone() else { return done(Err(not_indexed())) };
        self.reads.jobs().submit(Job::Task(Box::new(Searching { index, search, ranges, done })));
    }

    /// The statistics of a full-text query's terms over this node's keys in
    /// `ranges`, on a reader thread: a coordinator's first round of a
    /// search with cluster-wide statistics.
    pub fn term_stats_within(&self, query: String, matching: Match, ranges: Vec<TokenRange>, done: Done<TermStats>) {
        let Some(index) = self.index.clone() else { return done(Err(not_indexed())) };
        let task = move || index.term_stats_within(&query, matching, Some(&ranges));
        self.reads.jobs().submit(Job::Task(Box::new(Closure { run: Box::new(task), done })));
    }

    /// Test-only: see [`WriteHook`].
    pub fn with_write_hook(mut self, hook: WriteHook) -> LocalStore {
        self.write_hook = Some(HookDebug(hook));
        self
    }

    /// A replica's part of a write another node coordinated (or of a read
    /// repair, or a delivered hint): merges the sibling sets (user keys)
    /// and `with` (hints it holds) as one record, and adopts their
    /// timestamps (refusing any too far ahead); `done` once durable.
    ///
    /// Versions older than the tombstone horizon (now minus `gc_grace`)
    /// are refused (a tombstone that covered one may have been purged here,
    /// and the key would come back), but for a tombstone that deletes a
    /// live version held here ([`horizon::takes`]).
    pub fn apply_replicated(&self, sets: Vec<(Vec<u8>, Siblings)>, with: Vec<storage::Op>, done: Done<()>) {
        self.apply_carried(sets, with, Carried::Message, done)
    }

    /// Another replica's sibling sets, as an anti-entropy repair streams
    /// them (its current state): merged whole, but below the horizon for
    /// tombstones that delete nothing held here and live versions that
    /// something held here deletes ([`horizon::takes`]).
    pub fn apply_streamed(&self, sets: Vec<(Vec<u8>, Siblings)>, done: Done<()>) {
        self.apply_carried(sets, Vec::new(), Carried::Stream, done)
    }

    fn apply_carried(&self, sets: Vec<(Vec<u8>, Siblings)>, with: Vec<storage::Op>, carried: Carried, done: Done<()>) {
        if let Err(error) = self.room_for_peers() {
            return done(Err(error));
        }
        let mut ops = with;
        // Versions whose fate depends on what is held of their key: read
        // first, on a reader thread.
        let mut undecided = Vec::new();
        let horizon_ms = horizon::horizon_ms(self.clock.wall_ms(), self.gc_grace_ms);
        for (key, siblings) in sets {
            if self.drop_threshold > 0 && xxh3_64_with_seed(&key, self.drop_salt) < self.drop_threshold {
                continue;
            }
            let stored = data_key(&key);
            for version in siblings.into_versions() {
                if horizon::needs_held(&version, horizon_ms, carried) {
                    undecided.push(storage::Op { key: stored.clone(), version });
                    continue;
                }
                if !horizon::takes(&version, horizon_ms, carried, None) {
                    self.stale_refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Err(error) = self.clock.observe(version.hlc) {
                    return done(Err(error));
                }
                ops.push(storage::Op { key: stored.clone(), version });
            }
        }
        let writes = self.writes.clone();
        let write = move |ops: Vec<storage::Op>, done: Done<()>| match ops.is_empty() {
            true => done(Ok(())),
            false => writes.write_then(ops, move |result| done(result.map(drop).map_err(storage_error))),
        };
        if undecided.is_empty() {
            return write(ops, done);
        }
        let (engine, refused) = (self.engine.clone(), self.stale_refused.clone());
        let deciding = move || {
            for op in undecided {
                let held = engine.get(&op.key).map_err(storage_error)?;
                match horizon::takes(&op.version, horizon_ms, carried, held.as_ref()) {
                    true => ops.push(op),
                    false => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(ops)
        };
        let then = Box::new(move |read: Result<Vec<storage::Op>, ServerError>| match read {
            Ok(ops) => write(ops, done),
            Err(error) => done(Err(error)),
        });
        self.reads.jobs().submit(Job::Task(Box::new(Closure { run: Box::new(deciding), done: then })));
    }

    /// Other nodes' writes are refused (`DiskFull`) below `disk`'s peer
    /// reserve.
    pub fn with_disk_space(mut self, disk: Arc<DiskSpace>) -> LocalStore {
        self.disk = Some(disk);
        self
    }

    /// Whether other nodes' writes (their replicas' parts, hints, repairs,
    /// their bulk sets' batch log) may be written here now: `DiskFull`
    /// below the peers' free-space reserve.
    pub fn room_for_peers(&self) -> Result<(), ServerError> {
        self.disk.as_ref().map_or(Ok(()), |disk| disk.check(Writer::Peer))
    }

    /// Sets the tombstone horizon's distance from now (`gc_grace`).
    pub fn with_gc_grace_ms(mut self, gc_grace_ms: u64) -> LocalStore {
        self.gc_grace_ms = gc_grace_ms;
        self
    }

    /// The tombstone horizon's distance from now.
    pub fn gc_grace_ms(&self) -> u64 {
        self.gc_grace_ms
    }

    /// Versions [`LocalStore::apply_replicated`] refused as older than the
    /// tombstone horizon.
    pub fn stale_refused(&self) -> u64 {
        self.stale_refused.load(Ordering::Relaxed)
    }

    /// The engine, for what shares its records (hints).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// A causal write (see [`Store::write_causal`]) whose answer is the
    /// key's resulting sibling set, once durable: what a replica
    /// coordinating it in a cluster sends to the other replicas.
    pub fn write_causal_set(
        &self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        context: Context,
        timing: Timing,
        done: Done<Siblings>,
    ) {
        // Refused before it waits for the key's lock: a context from a
        // clock too far ahead is never adopted.
        if let Err(error) = self.clock.check(context.max_hlc) {
            return done(Err(error));
        }
        self.causal.submit(CausalWrite { key: data_key(&key), value, context, timing, done });
    }

    fn drop_this_write(&self) -> bool {
        self.drop_threshold > 0 && self.drop_rng.next_u64() < self.drop_threshold
    }
}

/// Stamps every entry with one `(hlc, origin)`, never past the deadline,
/// and writes them as one WAL record (all or nothing); `done` once durable.
fn write_blind(writes: &Writes, clock: &NodeClock, entries: Entries, timing: Timing, done: Done<()>) {
    let stamp = match clock.stamp(timing.hlc_seen, Hlc::ZERO, Some(timing.deadline)) {
        Ok(stamp) => stamp,
        Err(error) => return done(Err(error)),
    };
    let ops = entries
        .into_iter()
        .map(|(key, value)| storage::Op { key: data_key(&key), version: stamp.blind(value) })
        .collect();
    writes.write_then(ops, move |result| done(result.map(drop).map_err(storage_error)));
}

impl Store for LocalStore {
    fn write(&self, entries: Entries, timing: Timing, done: Done<()>) {
        if self.drop_this_write() {
            return done(Ok(()));
        }
        if let Some(held) = self.write_hook.as_ref().and_then(|hook| (hook.0)(&entries)) {
            let (writes, clock) = (self.writes.clone(), self.clock.clone());
            std::thread::spawn(move || {
                let _ = held.release.recv();
                let done: Done<()> = Box::new(move |result| {
                    let _ = held.outcome.send(result.clone());
                    done(result);
                });
                write_blind(&writes, &clock, entries, timing, done);
            });
            return;
        }
        write_blind(&self.writes, &self.clock, entries, timing, done);
    }

    /// A small read that memory alone answers (the value cache, or no table
    /// whose key range and bloom filter admit its keys: see
    /// [`Engine::value_in_memory`]) is answered right here. Anything else goes
    /// to the reader threads, from the first key that may need a file read.
    fn read(&self, keys: Vec<Vec<u8>>, timing: Timing, response_bytes_max: usize, done: Done<Vec<Option<Vec<u8>>>>) {
        if let Err(error) = self.clock.observe(timing.hlc_seen) {
            return done(Err(error));
        }
        let keys: Vec<Vec<u8>> = keys.iter().map(|key| data_key(key)).collect();
        let mut job =
            ReadJob { values: Vec::with_capacity(keys.len()), keys, bytes: 0, bytes_max: response_bytes_max, done };
        if job.keys.len() <= IN_MEMORY_KEYS_MAX {
            while let Some(key) = job.keys.get(job.values.len()) {
                let Some(value) = self.engine.value_in_memory(key) else { break };
                if let Err(error) = job.push(value) {
                    return (job.done)(Err(error));
                }
            }
            if job.values.len() == job.keys.len() {
                return job.answer();
            }
        }
        self.reads.jobs().submit(Job::Read(job));
    }

    fn read_versions(&self, key: Vec<u8>, timing: Timing, done: Done<Option<Siblings>>) {
        if let Err(error) = self.clock.observe(timing.hlc_seen) {
            return done(Err(error));
        }
        self.reads.jobs().submit(Job::Task(Box::new(VersionsRead { key: data_key(&key), done })));
    }

    fn write_causal(&self, key: Vec<u8>, value: Option<Vec<u8>>, context: Context, timing: Timing, done: Done<()>) {
        self.write_causal_set(key, value, context, timing, Box::new(move |result| done(result.map(drop))));
    }

    fn search(&self, search: Search, timing: Timing, done: Done<Vec<SearchHit>>) {
        if let Err(error) = self.clock.observe(timing.hlc_seen) {
            return done(Err(error));
        }
        self.search_within(search, None, done);
    }

    fn compact(&self, done: Done<()>) {
        let mut running = lock(&self.compacting.0);
        if let Some(waiting) = running.as_mut() {
            return waiting.push(done);
        }
        *running = Some(vec![done]);
        drop(running);
        let (engine, compacting) = (self.engine.clone(), self.compacting.clone());
        let answer = move |result: Result<(), ServerError>| {
            for done in lock(&compacting.0).take().unwrap_or_default() {
                done(result.clone());
            }
        };
        // A thread of its own: it reads and writes every table.
        let compacted = answer.clone();
        let spawned = std::thread::Builder::new()
            .name("quiver-compact-all".into())
            .spawn(move || compacted(engine.flush().and_then(|()| engine.compact()).map_err(storage_error)));
        if let Err(error) = spawned {
            answer(Err(ServerError::new(ErrorKind::Internal, format!("cannot start a compaction: {error}"))));
        }
    }

    fn status(&self) -> Result<StoreStatus, ServerError> {
        let stats = self.engine.stats();
        Ok(StoreStatus {
            keys: stats.table_entries + stats.memtable_entries as u64,
            // Out of file descriptors the directory cannot be listed:
            // `status` still answers (it is what an operator looks at
            // then), with the tables' bytes the engine knows.
            bytes_on_disk: self.engine.disk_bytes().unwrap_or(stats.table_bytes),
            too_many_siblings_refused: self.causal.too_many_siblings_refused(),
            graph_backlog: self.index.as_ref().map(|index| index.vectors().backlog() as u64),
            storage_failure: self.engine.failure(),
        })
    }

    fn hlc(&self) -> Hlc {
        self.clock.last()
    }
}

/// The error of a search on a node without an index.
pub fn not_indexed() -> ServerError {
    ServerError::new(ErrorKind::NotIndexed, "this node was started without indexing: start it with --index to search")
}

/// A search, on a reader thread.
struct Searching {
    index: Arc<Index>,
    search: Search,
    ranges: Option<Vec<TokenRange>>,
    done: Done<Vec<SearchHit>>,
}

impl Task for Searching {
    fn run(self: Box<Self>, _: &Engine) {
        (self.done)(self.index.search_within(self.search, self.ranges.as_deref()));
    }

    fn cancel(self: Box<Self>, error: ServerError) {
        (self.done)(Err(error));
    }
}

/// Work for a reader thread given as a closure, and whom to tell.
struct Closure<T> {
    run: Box<dyn FnOnce() -> Result<T, ServerError> + Send>,
    done: Done<T>,
}

impl<T: Send + 'static> Task for Closure<T> {
    fn run(self: Box<Self>, _: &Engine) {
        (self.done)((self.run)());
    }

    fn cancel(self: Box<Self>, error: ServerError) {
        (self.done)(Err(error));
    }
}
