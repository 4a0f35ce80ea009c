//! The index stage (thread `quiver-index`): puts each write's index
//! changes into the write's own WAL record.
//!
//! - Owns: the view of every key as it will be once the writes handed on
//!   so far are applied (the engine's state, and for keys with a write
//!   still in flight, the state after it: the overlay), and the index's
//!   totals (documents and words) as of those writes.
//! - Receives: every write of the node's data (local writes, causal
//!   writes, replicas' parts, read repairs, delivered hints), from
//!   [`LocalStore`](crate::service::LocalStore) through [`Writer::write_then`],
//!   on any thread, which only queues them.
//! - Does: one write at a time, in arrival order: for each data key it
//!   touches, merges its versions into the key's current ones, and when
//!   that changes the key's value, adds the posting changes (and the new
//!   totals) to the write's ops.
//! - Hands on: the write with its index ops to the engine, as one record,
//!   in the same order it took them, so that each write's index changes are
//!   computed from the state that the writes before it leave. The write's
//!   `done` runs once the engine made it durable and visible; only then
//!   does a key leave the overlay (its state is then the engine's).

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use quiver_ring::{BatchId, Hlc, NodeId, Siblings, Version};

use super::analyzer::Analyzer;
use super::embed::Embedder;
use super::text::{stats_key, Stats};
use super::vectors::VectorIndex;
use super::{base_of, supplied_vector, Derived, Worker};
use crate::lock;
use crate::storage::keys::{data_key, user_key};
use crate::storage::{self, Engine, Op};
use quiver_ring::ring::{vector_key_base, vector_key_of};

/// Called once with a write's outcome (as [`Engine::write_then`]'s).
pub type Done = Box<dyn FnOnce(storage::Result<u64>) + Send>;

struct Submit {
    ops: Vec<Op>,
    /// What each op's value puts in the index (`None` for an op of another
    /// keyspace): worked out by the caller, in parallel with other writes,
    /// since it depends on the value alone.
    derived: Vec<Option<Derived>>,
    done: Done,
}

/// Keys with a write in flight: the number of the last such write, and the
/// key's versions once it is applied.
type Overlay = Arc<Mutex<HashMap<Vec<u8>, (u64, Siblings)>>>;

/// A key's versions before and after a write (borrowed from the write's
/// own when it touches the key).
enum State<'a> {
    Written { before: Option<&'a Siblings>, after: &'a Siblings },
    Unchanged(Option<Siblings>),
}

impl State<'_> {
    fn both(&self) -> (Option<&Siblings>, Option<&Siblings>) {
        match self {
            State::Written { before, after } => (*before, Some(*after)),
            State::Unchanged(current) => (current.as_ref(), current.as_ref()),
        }
    }
}

/// Vectors a write changes: user key and new vector (`None`: none now).
type VectorChanges = Vec<(Vec<u8>, Option<Vec<f32>>)>;

/// The handle callers write through.
#[derive(Debug)]
pub struct Writer {
    analyzer: Arc<Analyzer>,
    embedder: Arc<dyn Embedder>,
    stage: Worker<Submit>,
}

impl Writer {
    /// Starts the stage over `engine`, from the index totals `stats`;
    /// durable vector changes go to `vectors`.
    pub fn start(
        engine: Arc<Engine>,
        analyzer: Arc<Analyzer>,
        embedder: Arc<dyn Embedder>,
        vectors: Arc<VectorIndex>,
        stats: Stats,
    ) -> std::io::Result<Writer> {
        let last_hlc = engine.max_hlc();
        let overlay = Overlay::default();
        let (stage_analyzer, stage_embedder) = (analyzer.clone(), embedder.clone());
        let mut stage = Stage {
            engine,
            analyzer: stage_analyzer,
            embedder: stage_embedder,
            vectors,
            overlay,
            stats,
            last_hlc,
            writes: 0,
        };
        let stage = Worker::spawn("quiver-index", move |submits: mpsc::Receiver<Submit>| {
            for submit in submits {
                stage.write(submit);
            }
        })?;
        Ok(Writer { analyzer, embedder, stage })
    }

    /// Writes `ops` as one record with their index changes (see
    /// [`Engine::write_then`]).
    pub fn write_then(&self, ops: Vec<Op>, done: Done) {
        let derived = ops
            .iter()
            .map(|op| {
                let value = op.version.value.as_deref();
                // A vector key's own value is a vector, not text: nothing
                // to analyse (its base key's entries use it as it is).
                let text_key = user_key(&op.key).filter(|key| vector_key_base(key).is_none());
                text_key.map(|_| Derived::of(&self.analyzer, self.embedder.as_ref(), value, None))
            })
            .collect();
        if let Err(refused) = self.stage.send(Submit { ops, derived, done }) {
            (refused.done)(Err(storage::Error::Closed));
        }
    }

    /// Stops the stage once the writes queued so far are handed on.
    pub fn stop(&self) {
        self.stage.stop();
    }
}

struct Stage {
    engine: Arc<Engine>,
    analyzer: Arc<Analyzer>,
    embedder: Arc<dyn Embedder>,
    vectors: Arc<VectorIndex>,
    overlay: Overlay,
    stats: Stats,
    /// The timestamp of the last index ops written: each record's are
    /// stamped above it, so a later record's posting replaces an earlier
    /// one's.
    last_hlc: Hlc,
    writes: u64,
}

impl Stage {
    fn write(&mut self, Submit { mut ops, mut derived, done }: Submit) {
        self.writes += 1;
        let write = self.writes;
        let (changed, vector_changes) = match self.index_ops(&ops, &mut derived) {
            Ok((index_ops, changed, vector_changes)) => {
                ops.extend(index_ops);
                (changed, vector_changes)
            }
            Err(error) => return done(Err(error)),
        };
        let keys: Vec<Vec<u8>> = changed.iter().map(|(key, _)| key.clone()).collect();
        {
            let mut overlay = lock(&self.overlay);
            for (key, after) in changed {
                overlay.insert(key, (write, after));
            }
        }
        let (overlay, vectors) = (self.overlay.clone(), self.vectors.clone());
        self.engine.write_then(ops, move |result| {
            if result.is_ok() {
                for (key, vector) in vector_changes {
                    vectors.changed(key, vector);
                }
            }
            // Now in the engine (or the engine failed, and nothing is
            // written any more): the engine's state is the key's.
            let mut overlay = lock(&overlay);
            for key in keys {
                if overlay.get(&key).is_some_and(|(last, _)| *last == write) {
                    overlay.remove(&key);
                }
            }
            drop(overlay);
            done(result);
        });
    }

    /// `stored`'s versions before and after this write: from `keys` if the
    /// write touches it, else its current ones, unchanged.
    fn state<'a>(
        &self,
        keys: &'a [(Vec<u8>, Option<Siblings>, Siblings)],
        at: &HashMap<&[u8], usize>,
        stored: &[u8],
    ) -> storage::Result<State<'a>> {
        if let Some((_, before, after)) = at.get(stored).and_then(|&i| keys.get(i)) {
            return Ok(State::Written { before: before.as_ref(), after });
        }
        Ok(State::Unchanged(self.current(stored)?))
    }

    /// The key's versions before this write: the overlay's, else the
    /// engine's.
    fn current(&self, key: &[u8]) -> storage::Result<Option<Siblings>> {
        if let Some((_, siblings)) = lock(&self.overlay).get(key) {
            return Ok(Some(siblings.clone()));
        }
        self.engine.get(key)
    }

    /// The index ops of a write, every data key it touches with its
    /// versions after it, and the vectors it changes (by user key).
    #[allow(clippy::type_complexity)]
    fn index_ops(
        &mut self,
        ops: &[Op],
        derived: &mut [Option<Derived>],
    ) -> storage::Result<(Vec<Op>, Vec<(Vec<u8>, Siblings)>, VectorChanges)> {
        // Each data key once, in order, with its versions before and after.
        let mut keys: Vec<(Vec<u8>, Option<Siblings>, Siblings)> = Vec::new();
        let mut at: HashMap<&[u8], usize> = HashMap::new();
        for op in ops.iter().filter(|op| user_key(&op.key).is_some()) {
            let i = match at.get(op.key.as_slice()) {
                Some(&i) => i,
                None => {
                    let before = self.current(&op.key)?;
                    keys.push((op.key.clone(), before.clone(), before.unwrap_or_default()));
                    at.insert(&op.key, keys.len() - 1);
                    keys.len() - 1
                }
            };
            if let Some((_, _, after)) = keys.get_mut(i) {
                after.insert(op.version.clone());
            }
        }
        let mut index_ops = Vec::new();
        let mut vector_changes = Vec::new();
        let stats_before = self.stats;
        let stamp = self.stamp();
        // Each key whose index entries may change, once: a key written, or
        // whose vector key was (the vector written with its value).
        let mut bases: Vec<Vec<u8>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (stored, _, _) in &keys {
            let base = base_of(stored);
            if seen.insert(base.clone()) {
                bases.push(base);
            }
        }
        for base in bases {
            let Some(key) = user_key(&base) else { continue };
            let companion = data_key(&vector_key_of(key));
            let base_state = self.state(&keys, &at, &base)?;
            let (base_before, base_after) = base_state.both();
            // A new key has no vector key of its own but one this write
            // brings: no need to read one.
            let vector_state = match base_before.is_some() || at.contains_key(companion.as_slice()) {
                true => self.state(&keys, &at, &companion)?,
                false => State::Unchanged(None),
            };
            let (vector_before, vector_after) = vector_state.both();
            let dim = self.embedder.dim();
            let supplied_before = supplied_vector(dim, vector_before, base_before);
            let supplied_after = supplied_vector(dim, vector_after, base_after);
            let (before_value, after_value) =
                (base_before.and_then(Siblings::value), base_after.and_then(Siblings::value));
            if before_value == after_value && supplied_before == supplied_after {
                continue;
            }
            let was = Derived::of(&self.analyzer, self.embedder.as_ref(), before_value, supplied_before);
            // The new value is one of this write's: its index entries were
            // worked out already.
            let made = ops
                .iter()
                .zip(derived.iter_mut())
                .find(|(op, _)| op.key == base && op.version.value.as_deref() == after_value)
                .and_then(|(_, made)| made.take());
            let is = match made {
                Some(made) => made.with_supplied(supplied_after),
                None => Derived::of(&self.analyzer, self.embedder.as_ref(), after_value, supplied_after),
            };
            self.stats.replace(was.doc.as_ref(), is.doc.as_ref());
            is.ops_from(&was, key, stamp, &mut index_ops);
            if is.vector != was.vector {
                vector_changes.push((key.to_vec(), is.vector));
            }
        }
        if self.stats != stats_before {
            let value = postcard::to_stdvec(&self.stats).expect("postcard encodes into a Vec");
            index_ops.push(Op { key: stats_key(), version: stamp.version(Some(value)) });
        }
        Ok((index_ops, keys.into_iter().map(|(key, _, after)| (key, after)).collect(), vector_changes))
    }

    /// The stamp of this record's index ops: above the last one's, and at
    /// least the wall clock's now.
    fn stamp(&mut self) -> IndexStamp {
        let now = Hlc::from_physical_ms(crate::now_ms());
        self.last_hlc = now.max(self.last_hlc.successor().unwrap_or(self.last_hlc));
        IndexStamp(self.last_hlc)
    }
}

/// The timestamp of one record's index ops.
#[derive(Clone, Copy, Debug)]
pub struct IndexStamp(pub Hlc);

impl IndexStamp {
    /// An index version with `value` (`None` deletes).
    pub fn version(self, value: Option<Vec<u8>>) -> Version {
        // Node 0 is no node's id: index versions are this node's own and
        // never leave it.
        Version { hlc: self.0, origin: BatchId { node: NodeId(0), counter: self.0 .0 }, causal: None, value }
    }
}
