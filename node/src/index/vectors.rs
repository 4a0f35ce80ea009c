//! The embedding index: each value's vector, stored in the engine, and an
//! HNSW graph (hnsw_rs) over them for nearest-neighbour search.
//!
//! ```text
//! vector: 0x04 | user key  ->  dim x f32 (little-endian), unit length
//! ```
//!
//! The stored vectors are the truth: they change in the same WAL record as
//! the values they come from (see [`super::writer`]). The graph is derived
//! from them and held in memory only:
//!
//! - Owns: the graph, and which graph point is which key's current vector
//!   (a key's earlier points are dead: searches filter them out).
//! - Receives: each durable change of a key's vector, in commit order,
//!   from the engine's apply thread (through the index stage's `done`),
//!   which only queues it.
//! - Does (thread `quiver-vectors`): at start, builds the graph from the
//!   stored vectors; then inserts each change as a new point and marks
//!   the key's old point dead; when dead points pass a quarter of the live
//!   ones, builds a new graph from the stored vectors and swaps it in.
//! - Hands on: nothing; searches read the graph under a read lock, and
//!   compare the query directly with the vectors of changes not yet in the
//!   graph (kept aside until they are), so a search sees every write
//!   acknowledged before it. Until the first graph is built, searches
//!   compare the query with every stored vector instead (exact, slower).
//!
//! Stored vectors are read back from disk: nothing here panics on bytes
//! that do not decode.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};

use hnsw_rs::anndists::dist::distances::Distance;
use hnsw_rs::hnsw::Hnsw;

use super::embed::similarity;
use super::Worker;
use crate::lock;
use crate::storage::keys::Keyspace;
use crate::storage::{self, Engine};

/// Graph links per point and layer (HNSW's M).
const LINKS: usize = 16;
/// Candidates kept while inserting (HNSW's efConstruction): 100 keeps
/// recall@10 above 0.95 here (the tests measure it) at half the insert cost
/// of 200.
const EF_CONSTRUCTION: usize = 100;
/// The graph's thread runs at this nice level: inserting points is the
/// heaviest work indexing adds, and it must yield to the write path (a
/// write is acknowledged without waiting for the graph).
const NICE: i32 = 10;
/// Candidates kept while searching, at least (HNSW's ef); more for a large k.
const EF_SEARCH_MIN: usize = 100;
/// Below this many points, a search compares the query with every stored
/// vector: exact, and cheap at that size. A graph of few points, or of many
/// equal ones, can leave a point in no other point's links, where a graph
/// search never reaches it.
const EXACT_BELOW: usize = 2000;
/// Changes applied at once, at most.
const BATCH_MAX: usize = 4096;
/// Dead points tolerated before the graph is rebuilt: this many, or a
/// quarter of the live ones if more.
const DEAD_MIN: usize = 1000;

/// The key of `key`'s vector.
pub fn vector_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(1 + key.len());
    stored.push(Keyspace::Vectors as u8);
    stored.extend_from_slice(key);
    stored
}

/// The user key of a vector key.
fn user_key_of(stored: &[u8]) -> Option<&[u8]> {
    stored.strip_prefix(&[Keyspace::Vectors as u8])
}

/// The range of every vector key.
pub fn vectors_range() -> (Vec<u8>, Vec<u8>) {
    (vec![Keyspace::Vectors as u8], vec![Keyspace::Vectors as u8 + 1])
}

/// A vector as stored.
pub fn encode(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A stored vector, if it has `dim` components.
pub fn decode(bytes: &[u8], dim: usize) -> Option<Vec<f32>> {
    let (chunks, rest) = bytes.as_chunks::<4>();
    (rest.is_empty() && chunks.len() == dim).then(|| chunks.iter().map(|c| f32::from_le_bytes(*c)).collect())
}

/// One minus the dot product of two unit vectors (their cosine distance),
/// never below zero: rounding can take the dot product of a vector with
/// itself just past one, which hnsw_rs's own `DistDot` asserts against.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - similarity(a, b)).max(0.0)
    }
}

type Graph = Hnsw<'static, f32, UnitDot>;

/// Which point is which key's.
#[derive(Default)]
struct Points {
    /// Point id to key; `None` once the key has a newer point or none.
    keys: Vec<Option<Vec<u8>>>,
    /// Key to its current point.
    ids: HashMap<Vec<u8>, usize>,
    dead: usize,
}

impl Points {
    /// Makes `key`'s point `id` (a new one, or none), its old one dead.
    fn set(&mut self, key: Vec<u8>, id: Option<usize>) {
        if let Some(old) = self.ids.remove(&key) {
            if let Some(slot) = self.keys.get_mut(old) {
                *slot = None;
                self.dead += 1;
            }
        }
        if let Some(id) = id {
            if self.keys.len() <= id {
                self.keys.resize(id + 1, None);
            }
            if let Some(slot) = self.keys.get_mut(id) {
                *slot = Some(key.clone());
            }
            self.ids.insert(key, id);
        }
    }
}

/// The graph and its points, once built.
struct Built {
    graph: Graph,
    points: Points,
}

/// A vector search hit: a key and its similarity to the query (cosine, 1
/// is the same direction).
#[derive(Clone, Debug, PartialEq)]
pub struct Near {
    pub key: Vec<u8>,
    pub similarity: f32,
}

/// Vector changes durable but not yet in the graph, by key: the latest
/// change's number and vector (`None`: the key has none now).
#[derive(Default)]
struct Pending {
    keys: HashMap<Vec<u8>, (u64, Option<Vec<f32>>)>,
    seq: u64,
}

/// What the `quiver-vectors` thread receives.
enum Change {
    /// A durable change of a key's vector, the `seq`th.
    Vector { key: Vec<u8>, vector: Option<Vec<f32>>, seq: u64 },
    /// Answered once every change before it is in the graph.
    Sync(mpsc::Sender<()>),
}

/// The embedding index of one node.
pub struct VectorIndex {
    dim: usize,
    /// Changes durable but not yet in the graph: searches take them from
    /// here (see [`Pending`]).
    pending: Arc<Mutex<Pending>>,
    engine: Arc<Engine>,
    built: Arc<RwLock<Option<Built>>>,
    changes: Worker<Change>,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VectorIndex({} dimensions)", self.dim)
    }
}

impl VectorIndex {
    /// Starts the index over the vectors stored in `engine`: the graph is
    /// built in the background.
    pub fn start(engine: Arc<Engine>, dim: usize) -> std::io::Result<VectorIndex> {
        let built: Arc<RwLock<Option<Built>>> = Arc::default();
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let (thread_engine, thread_built, thread_pending) = (engine.clone(), built.clone(), pending.clone());
        let changes = Worker::spawn("quiver-vectors", move |changes: mpsc::Receiver<Change>| {
            // Best effort: at the default priority the graph still works.
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE);
            maintain(&thread_engine, dim, &thread_built, &changes, &thread_pending)
        })?;
        Ok(VectorIndex { dim, pending, engine, built, changes })
    }

    /// The vectors' dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `key`'s vector is now `vector` (durably): queued for the graph.
    pub fn changed(&self, key: Vec<u8>, vector: Option<Vec<f32>>) {
        let seq = {
            let mut pending = lock(&self.pending);
            pending.seq += 1;
            let seq = pending.seq;
            pending.keys.insert(key.clone(), (seq, vector.clone()));
            seq
        };
        let _ = self.changes.send(Change::Vector { key, vector, seq });
    }

    /// Waits until the graph is built and holds every change queued before
    /// this call (false if the thread has stopped).
    pub fn sync(&self) -> bool {
        let (sender, receiver) = mpsc::channel();
        self.changes.send(Change::Sync(sender)).is_ok() && receiver.recv().is_ok()
    }

    /// Vector changes durable but not yet in the graph (the latest per key).
    pub fn backlog(&self) -> usize {
        lock(&self.pending).keys.len()
    }

    /// Whether the graph is built (else searches compare every vector).
    pub fn is_built(&self) -> bool {
        read(&self.built).is_some()
    }

    /// The `k` keys whose vectors are nearest `query` (unit length), nearest
    /// first, among those `keep` accepts: from the graph, and for the keys
    /// whose latest vector the graph does not have yet, by comparing with
    /// it directly, so a search finds every write acknowledged before it.
    pub fn search(&self, query: &[f32], k: usize, keep: &dyn Fn(&[u8]) -> bool) -> storage::Result<Vec<Near>> {
        // The graph's points and the pending changes change together,
        // under the write lock of `built`: a change is in one or the other.
        let built = read(&self.built);
        let Some(Built { graph, points }) = built.as_ref().filter(|built| built.points.ids.len() >= EXACT_BELOW) else {
            // Few vectors, or no graph yet: compared one by one, without
            // holding up the graph's builder meanwhile.
            drop(built);
            return self.search_exact(query, k, keep);
        };
        let pending = lock(&self.pending);
        let current = |key: &[u8]| keep(key) && !pending.keys.contains_key(key);
        let filter = |id: &usize| points.keys.get(*id).is_some_and(|key| key.as_deref().is_some_and(current));
        let found = graph.search_filter(query, k, EF_SEARCH_MIN.max(2 * k), Some(&filter));
        let mut near: Vec<Near> = found
            .into_iter()
            .filter_map(|n| {
                let key = points.keys.get(n.d_id)?.clone()?;
                Some(Near { key, similarity: 1.0 - n.distance })
            })
            .collect();
        for (key, (_, vector)) in &pending.keys {
            if let Some(vector) = vector.as_ref().filter(|_| keep(key)) {
                near.push(Near { key: key.clone(), similarity: similarity(query, vector) });
            }
        }
        near.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then_with(|| a.key.cmp(&b.key)));
        near.truncate(k);
        Ok(near)
    }

    /// The same by comparing `query` with every stored vector.
    pub fn search_exact(&self, query: &[f32], k: usize, keep: &dyn Fn(&[u8]) -> bool) -> storage::Result<Vec<Near>> {
        let mut all = Vec::new();
        for (key, vector) in stored_vectors(&self.engine, self.dim) {
            let key = key?;
            if keep(&key) {
                all.push(Near { similarity: similarity(query, &vector), key });
            }
        }
        all.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then_with(|| a.key.cmp(&b.key)));
        all.truncate(k);
        Ok(all)
    }

    /// Stops the thread (changes queued so far are applied first).
    pub fn stop(&self) {
        self.changes.stop();
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every stored vector of `dim` components, with its user key (an error
/// reading stops the iteration with the error).
fn stored_vectors(engine: &Engine, dim: usize) -> impl Iterator<Item = (storage::Result<Vec<u8>>, Vec<f32>)> {
    let (start, end) = vectors_range();
    engine.scan(&start, Some(&end)).filter_map(move |entry| match entry {
        Err(error) => Some((Err(error), Vec::new())),
        Ok((stored, siblings)) => {
            let vector = decode(siblings.value()?, dim)?;
            Some((Ok(user_key_of(&stored)?.to_vec()), vector))
        }
    })
}

/// A graph of every stored vector.
fn build(engine: &Engine, dim: usize) -> storage::Result<Built> {
    let mut entries = Vec::new();
    for (key, vector) in stored_vectors(engine, dim) {
        entries.push((key?, vector));
    }
    let graph = Graph::new(LINKS, entries.len().max(1024), 16, EF_CONSTRUCTION, UnitDot);
    let with_ids: Vec<(&Vec<f32>, usize)> = entries.iter().enumerate().map(|(id, (_, v))| (v, id)).collect();
    graph.parallel_insert(&with_ids);
    let mut points = Points::default();
    for (id, (key, _)) in entries.into_iter().enumerate() {
        points.set(key, Some(id));
    }
    Ok(Built { graph, points })
}

/// The `quiver-vectors` thread: builds the graph, then applies changes in
/// batches (every change queued, up to [`BATCH_MAX`]: their points are
/// inserted in parallel), rebuilding when too many points are dead.
fn maintain(
    engine: &Engine,
    dim: usize,
    built: &RwLock<Option<Built>>,
    changes: &mpsc::Receiver<Change>,
    pending: &Mutex<Pending>,
) {
    match build(engine, dim) {
        Ok(first) => *write(built) = Some(first),
        Err(error) => {
            tracing::error!(%error, "cannot build the vector index; searches compare every vector");
            return;
        }
    }
    while let Ok(first) = changes.recv() {
        let batch: Vec<Change> =
            std::iter::once(first).chain(std::iter::from_fn(|| changes.try_recv().ok()).take(BATCH_MAX)).collect();
        let mut synced = Vec::new();
        let mut vectors = Vec::new();
        for change in batch {
            match change {
                Change::Vector { key, vector, seq } => vectors.push((key, vector, seq)),
                Change::Sync(answer) => synced.push(answer),
            }
        }
        // Only this thread changes the points, so the ids are known before
        // the points are inserted; searches go on meanwhile (a point not
        // yet in `points` is not live to them).
        let rebuild = {
            let first_id = match read(built).as_ref() {
                Some(Built { graph, points }) => {
                    let first_id = points.keys.len();
                    let new: Vec<(&Vec<f32>, usize)> =
                        vectors.iter().filter_map(|(_, v, _)| v.as_ref()).zip(first_id..).collect();
                    graph.parallel_insert(&new);
                    first_id
                }
                None => return,
            };
            let mut guard = write(built);
            let Some(Built { points, .. }) = guard.as_mut() else { return };
            let mut next = first_id;
            let mut pending = lock(pending);
            for (key, vector, seq) in vectors {
                // In the graph now, unless a later change is pending.
                if pending.keys.get(&key).is_some_and(|(latest, _)| *latest == seq) {
                    pending.keys.remove(&key);
                }
                let id = vector.map(|_| {
                    next += 1;
                    next - 1
                });
                points.set(key, id);
            }
            drop(pending);
            points.dead > DEAD_MIN.max(points.ids.len() / 4)
        };
        if rebuild {
            match build(engine, dim) {
                Ok(fresh) => *write(built) = Some(fresh),
                Err(error) => tracing::error!(%error, "cannot rebuild the vector index"),
            }
        }
        for answer in synced {
            let _ = answer.send(());
        }
    }
}
