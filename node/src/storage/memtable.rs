//! The in-memory table of recent writes.
//!
//! Each key maps to its [`Siblings`], held **encoded** exactly as an SSTable
//! stores them (`postcard(Siblings)`), in an arena of large byte chunks. A
//! hash table of small fixed-size slots points into the arena. Inserting
//! merges with the versions already there by the same rule every storage
//! level uses, so a memtable never needs to read from disk. Only the commit
//! thread writes to the active memtable; when it grows past its budget it is
//! frozen (read-only) and flushed to an SSTable in the background.
//!
//! Why this shape:
//! - A hash table and not a sorted map: inserts are the serial part of
//!   every write after its `fdatasync`; a hash insert costs a fraction of a
//!   B-tree insert with its key comparisons. Order is needed only when the memtable
//!   is flushed (once, on the flush thread) and by range scans, which sort
//!   the keys they return. The hash is seeded per memtable so clients cannot
//!   choose colliding keys.
//! - Encoded, in an arena: a flush copies each entry's bytes into the table
//!   (no encoding), and dropping a flushed memtable frees a few chunks rather
//!   than three allocations per key. Both dominated bulk ingest before.
//!
//! A key written again in the same memtable gets its merged versions
//! appended; the old bytes stay in the arena until the memtable is dropped,
//! and count against its budget.

use std::hash::BuildHasher;
use std::ops::Bound;

use hashbrown::HashTable;
use quiver_ring::{Hlc, Siblings, Version};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::storage::{EncodedOps, Op};

/// Bytes per arena chunk (a larger entry gets a chunk of its own size).
const CHUNK_BYTES: usize = 1 << 20;

/// The first 16 bytes of `key`, zero-padded, as two big-endian integers:
/// they order like the key wherever two prefixes differ.
fn key_prefix(key: &[u8]) -> (u64, u64) {
    let mut prefix = [0u8; 16];
    let n = key.len().min(16);
    prefix[..n].copy_from_slice(&key[..n]);
    let (high, low) = prefix.split_at(8);
    (u64::from_be_bytes(high.try_into().expect("8 bytes")), u64::from_be_bytes(low.try_into().expect("8 bytes")))
}

/// Memory a key takes in the hash table: its slot and its control byte.
const SLOT_BYTES: usize = std::mem::size_of::<Slot>() + 1;

/// Where some bytes are in the arena.
#[derive(Clone, Copy, Debug)]
struct Span {
    chunk: u32,
    offset: u32,
    len: u32,
}

/// What keys are sorted on at one depth (an offset into them, a multiple of
/// 16): the 16 bytes there as integers, zero-padded, and the key's length
/// capped one past them; `index` names the key.
#[derive(Clone, Copy, Debug)]
struct SortKey {
    prefix: (u64, u64),
    len: u32,
    index: u32,
}

impl SortKey {
    fn rank(&self) -> ((u64, u64), u32) {
        (self.prefix, self.len)
    }
}

/// Sorts `order`, whose entries hold the sort keys at depth 0, into the
/// order of the whole keys (`key` gives them).
///
/// Exact: two keys equal in their first `depth` bytes compare as their
/// next 16 bytes (zero-padded) do, and if those tie too, the shorter key
/// is a prefix of the longer (whose bytes past the end of the shorter one
/// are zeros there) and so comes first; a tie on both with lengths past
/// those 16 bytes is settled one depth further. Iterative, so long keys
/// sharing long prefixes cannot overflow the stack.
fn sort_by_whole_keys<'k>(order: &mut [SortKey], key: impl Fn(u32) -> &'k [u8]) {
    order.sort_unstable_by_key(SortKey::rank);
    // Runs that tie so far, as (start, end, depth of their next 16 bytes).
    let mut tied: Vec<(usize, usize, usize)> = Vec::new();
    let push_ties = |order: &[SortKey], base: usize, depth: usize, tied: &mut Vec<(usize, usize, usize)>| {
        let mut at = base;
        for run in order.chunk_by(|a, b| a.rank() == b.rank()) {
            // Equal ranks with a length within the 16 bytes would be equal
            // keys, which a memtable does not hold.
            if run.len() > 1 && run[0].len as usize > depth + 16 {
                tied.push((at, at + run.len(), depth + 16));
            }
            at += run.len();
        }
    };
    push_ties(order, 0, 0, &mut tied);
    while let Some((start, end, depth)) = tied.pop() {
        let run = &mut order[start..end];
        for entry in run.iter_mut() {
            let key = key(entry.index);
            entry.prefix = key_prefix(&key[depth.min(key.len())..]);
            entry.len = key.len().min(depth + 17) as u32;
        }
        run.sort_unstable_by_key(SortKey::rank);
        push_ties(run, start, depth, &mut tied);
    }
}

/// Append-only byte storage in chunks that never move.
#[derive(Debug, Default)]
struct Arena {
    chunks: Vec<Vec<u8>>,
    /// Emptied chunks of `CHUNK_BYTES`, kept by [`Arena::clear`] for reuse.
    spare: Vec<Vec<u8>>,
}

impl Arena {
    /// Forgets every span, keeping the standard-size chunks for reuse.
    fn clear(&mut self) {
        for mut chunk in self.chunks.drain(..) {
            if chunk.capacity() == CHUNK_BYTES {
                chunk.clear();
                self.spare.push(chunk);
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Span {
        self.push_parts(&[bytes])
    }

    /// Stores `parts` one after another, as one span.
    fn push_parts(&mut self, parts: &[&[u8]]) -> Span {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let fits = self.chunks.last().is_some_and(|c| c.capacity() - c.len() >= len);
        if !fits {
            let spare = if len <= CHUNK_BYTES { self.spare.pop() } else { None };
            self.chunks.push(spare.unwrap_or_else(|| Vec::with_capacity(CHUNK_BYTES.max(len))));
        }
        let chunk = self.chunks.len() - 1;
        let buf = &mut self.chunks[chunk];
        let offset = buf.len();
        for part in parts {
            buf.extend_from_slice(part);
        }
        Span { chunk: chunk as u32, offset: offset as u32, len: len as u32 }
    }

    fn get(&self, span: Span) -> &[u8] {
        let start = span.offset as usize;
        &self.chunks[span.chunk as usize][start..start + span.len as usize]
    }
}

/// One key in the hash table.
#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: u64,
    /// [`key_prefix`] of the key, taken while the key is at hand: sorting
    /// for a flush then reads only the slots, not every key in the arena
    /// (in hash order, each a cache miss).
    prefix: (u64, u64),
    key: Span,
    /// `postcard(Siblings)`.
    value: Span,
    hlc_range: (u64, u64),
    all_tombstones: bool,
}

/// One entry as stored: its key, its encoded versions and what a table
/// needs to know about them.
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    pub key: &'a [u8],
    /// `postcard(Siblings)`, as an SSTable stores it.
    pub value: &'a [u8],
    pub hlc_range: (u64, u64),
    pub all_tombstones: bool,
}

impl EntryRef<'_> {
    /// The versions, decoded.
    pub fn siblings(&self) -> Siblings {
        decode(self.value)
    }
}

fn decode(value: &[u8]) -> Siblings {
    postcard::from_bytes(value).expect("the memtable decodes what it encoded")
}

/// An in-memory table of versions.
#[derive(Debug)]
pub struct Memtable {
    arena: Arena,
    slots: HashTable<Slot>,
    seed: u64,
    /// Bytes of entries written (arena bytes, old copies included).
    written: usize,
    min_seq: u64,
    max_seq: u64,
    max_hlc: Hlc,
    scratch: Vec<u8>,
}

/// A fresh hash seed. std's RandomState is seeded from the operating
/// system's randomness.
fn new_seed() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(0u64)
}

impl Default for Memtable {
    fn default() -> Memtable {
        Memtable {
            arena: Arena::default(),
            slots: HashTable::new(),
            seed: new_seed(),
            written: 0,
            min_seq: 0,
            max_seq: 0,
            max_hlc: Hlc::default(),
            scratch: Vec::new(),
        }
    }
}

impl Memtable {
    /// An empty memtable.
    pub fn new() -> Memtable {
        Memtable::default()
    }

    /// An empty memtable whose hash table already holds `keys` keys (fewer
    /// if those alone would take more than `slot_bytes_max`), so that
    /// filling it does not stop each time the table doubles to copy it into
    /// new pages the kernel must zero.
    pub fn with_capacity(keys: usize, slot_bytes_max: usize) -> Memtable {
        let keys = keys.min(slot_bytes_max / SLOT_BYTES);
        Memtable { slots: HashTable::with_capacity(keys), ..Memtable::default() }
    }

    /// Empties the memtable but keeps its memory (the arena's chunks, and
    /// the hash table's capacity unless that alone takes more than
    /// `slot_bytes_max`) for the entries to come, with a new hash seed. A
    /// fresh memtable grows its hash table by doubling, each time into new
    /// pages the kernel must zero, and faults in every arena chunk: together
    /// most of what applying a bulk load cost.
    pub fn clear(&mut self, slot_bytes_max: usize) {
        self.arena.clear();
        self.slots.clear();
        if self.slot_bytes() > slot_bytes_max {
            self.slots = HashTable::new();
        }
        *self = Memtable {
            arena: std::mem::take(&mut self.arena),
            slots: std::mem::take(&mut self.slots),
            scratch: std::mem::take(&mut self.scratch),
            ..Memtable::default()
        };
    }

    fn hash(&self, key: &[u8]) -> u64 {
        xxh3_64_with_seed(key, self.seed)
    }

    /// Applies one operation of WAL record `seq`.
    pub fn insert(&mut self, seq: u64, op: Op) {
        self.apply(seq, &EncodedOps::new(std::slice::from_ref(&op)));
    }

    /// Applies every operation of WAL record `seq`, as encoded for the WAL
    /// (live writes and recovery alike), each merged into its key's
    /// siblings.
    pub fn apply(&mut self, seq: u64, encoded: &EncodedOps) {
        for op in encoded.ops() {
            self.insert_encoded(seq, encoded.key(op), encoded.version(op), op.hlc, op.tombstone);
        }
    }

    /// One op already encoded: `version` is `postcard(Version)`, with its
    /// timestamp and whether it is a tombstone. A key new to this memtable
    /// costs one copy of its bytes, nothing more.
    fn insert_encoded(&mut self, seq: u64, key: &[u8], version: &[u8], hlc: Hlc, tombstone: bool) {
        if self.slots.is_empty() && self.min_seq == 0 {
            self.min_seq = seq;
        }
        self.max_seq = self.max_seq.max(seq);
        self.max_hlc = self.max_hlc.max(hlc);
        let hash = self.hash(key);
        let Memtable { arena, slots, scratch, .. } = self;
        match slots.find_mut(hash, |slot| arena.get(slot.key) == key) {
            Some(slot) => {
                let mut siblings = decode(arena.get(slot.value));
                siblings.insert(postcard::from_bytes::<Version>(version).expect("the engine encoded this version"));
                scratch.clear();
                let encoded = postcard::to_extend(&siblings, std::mem::take(scratch)).expect("postcard encodes");
                *scratch = encoded;
                slot.value = arena.push(scratch);
                slot.hlc_range = siblings.hlc_bounds();
                slot.all_tombstones = siblings.all_tombstones();
                self.written += scratch.len();
            }
            None => {
                // `postcard(Siblings)` of one version: a sequence of length
                // 1, then the version.
                let value = arena.push_parts(&[&[1], version]);
                let key_span = arena.push(key);
                let slot = Slot {
                    hash,
                    prefix: key_prefix(key),
                    key: key_span,
                    value,
                    hlc_range: (hlc.0, hlc.0),
                    all_tombstones: tombstone,
                };
                slots.insert_unique(hash, slot, |slot| slot.hash);
                self.written += key.len() + 1 + version.len();
            }
        }
    }

    fn entry(&self, slot: &Slot) -> EntryRef<'_> {
        EntryRef {
            key: self.arena.get(slot.key),
            value: self.arena.get(slot.value),
            hlc_range: slot.hlc_range,
            all_tombstones: slot.all_tombstones,
        }
    }

    /// The versions of `key` held here.
    pub fn get(&self, key: &[u8]) -> Option<Siblings> {
        let slot = self.slots.find(self.hash(key), |slot| self.arena.get(slot.key) == key)?;
        Some(decode(self.arena.get(slot.value)))
    }

    /// Entries with `start <= key < end` (no end: to the last key), sorted.
    pub fn sorted_range(&self, start: &[u8], end: Bound<&[u8]>) -> Vec<EntryRef<'_>> {
        let below_end = |key: &[u8]| match end {
            Bound::Included(end) => key <= end,
            Bound::Excluded(end) => key < end,
            Bound::Unbounded => true,
        };
        // Sort on each key's first 16 bytes kept in its slot (and its
        // length), then each run of keys that tie on them by the next 16
        // bytes, and so on: the first sort compares integers in one compact
        // array instead of chasing a pointer to every key (which dominated
        // flushing), and keys sharing a long prefix are each read once per
        // 16 bytes instead of at every comparison of a sort.
        let whole = start.is_empty() && matches!(end, Bound::Unbounded);
        let slots: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|slot| whole || (self.arena.get(slot.key) >= start && below_end(self.arena.get(slot.key))))
            .collect();
        let mut order: Vec<SortKey> = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| SortKey { prefix: slot.prefix, len: slot.key.len.min(17), index: i as u32 })
            .collect();
        sort_by_whole_keys(&mut order, |i| self.arena.get(slots[i as usize].key));
        order.into_iter().map(|k| self.entry(slots[k.index as usize])).collect()
    }

    /// All entries, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.slots.iter().map(|slot| self.entry(slot))
    }

    /// All entries, sorted by key.
    pub fn sorted(&self) -> Vec<EntryRef<'_>> {
        self.sorted_range(&[], Bound::Unbounded)
    }

    /// Memory held, in bytes: entries written and the hash table (the
    /// arena holds at most one chunk more).
    pub fn bytes(&self) -> usize {
        self.written + self.slot_bytes()
    }

    /// Memory held by the hash table.
    fn slot_bytes(&self) -> usize {
        self.slots.capacity() * SLOT_BYTES
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Lowest and highest WAL sequence applied (both 0 when empty).
    pub fn seq_range(&self) -> (u64, u64) {
        (self.min_seq, self.max_seq)
    }

    /// Highest timestamp of any version applied.
    pub fn max_hlc(&self) -> Hlc {
        self.max_hlc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_ring::BatchId;

    fn version(hlc: u64, value: Option<&[u8]>) -> Version {
        Version { hlc: Hlc(hlc), origin: BatchId::default(), causal: None, value: value.map(<[u8]>::to_vec) }
    }

    fn op(key: Vec<u8>) -> Op {
        Op { key, version: version(1, None) }
    }

    #[test]
    fn a_new_key_is_stored_as_the_encoding_of_one_sibling() {
        for v in [version(7, Some(b"value")), version(u64::MAX, None)] {
            let mut memtable = Memtable::new();
            memtable.insert(1, Op { key: b"k".to_vec(), version: v.clone() });
            assert_eq!(memtable.sorted()[0].value, postcard::to_stdvec(&Siblings::one(v)).unwrap());
        }
    }

    #[test]
    fn a_presized_memtable_takes_its_keys_without_growing_and_stays_within_its_cap() {
        let mut memtable = Memtable::with_capacity(5000, usize::MAX);
        let slot_bytes = memtable.slot_bytes();
        assert!(slot_bytes >= 5000 * SLOT_BYTES, "{slot_bytes}");
        for i in 0..5000u32 {
            memtable.insert(1, op(i.to_be_bytes().to_vec()));
        }
        assert_eq!(memtable.slot_bytes(), slot_bytes, "the hash table grew");
        assert_eq!(memtable.bytes(), memtable.written + slot_bytes);

        // Capped: the table rounds up to a power of two buckets, so it may
        // hold up to twice the keys the cap allows, never more.
        let capped = Memtable::with_capacity(1_000_000, 1000 * SLOT_BYTES);
        assert!(capped.slot_bytes() >= 1000 * SLOT_BYTES && capped.slot_bytes() < 2000 * SLOT_BYTES);
    }

    proptest! {
        /// The prefix sort gives exactly the byte order of the keys,
        /// including keys that share their first 16, 32 or 48 bytes or
        /// more, or end in zero bytes; so does a range.
        #[test]
        fn sorted_is_byte_order(
            keys in proptest::collection::btree_set(
                (
                    prop_oneof![Just(0usize), Just(15), Just(16), Just(17), Just(31), Just(32), Just(33), Just(47)],
                    proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..8),
                )
                    .prop_map(|(shared, tail)| [vec![b'a'; shared], tail].concat()),
                0..200,
            ),
            start in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..20),
            end in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..20),
        ) {
            let mut memtable = Memtable::new();
            for key in &keys {
                memtable.insert(1, op(key.clone()));
            }
            let sorted: Vec<Vec<u8>> = memtable.sorted().into_iter().map(|e| e.key.to_vec()).collect();
            prop_assert_eq!(sorted, keys.iter().cloned().collect::<Vec<_>>());
            let range: Vec<Vec<u8>> = memtable
                .sorted_range(&start, Bound::Excluded(&end))
                .into_iter()
                .map(|e| e.key.to_vec())
                .collect();
            let expected: Vec<Vec<u8>> = keys.into_iter().filter(|k| *k >= start && *k < end).collect();
            prop_assert_eq!(range, expected);
        }

        /// Whatever the writes, each key reads back as the merge of every
        /// version written to it, and the stored summary (timestamps,
        /// tombstones) matches the versions; values larger than a chunk
        /// included; in a new memtable or in one emptied for reuse.
        #[test]
        fn reads_back_the_merge_of_its_writes(writes in proptest::collection::vec(
            (0u8..8, 1u64..50, proptest::option::of(prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..40),
                Just(vec![7u8; CHUNK_BYTES + 3]),
            ])), 1..60), reused in any::<bool>()) {
            let mut memtable = Memtable::new();
            if reused {
                // Keys, some of them those to come, over several chunks.
                for i in 0..3000u64 {
                    let key = vec![b'k', (i % 8) as u8, (i / 8) as u8];
                    memtable.insert(i + 1, Op { key, version: version(i, Some(&[9; 900])) });
                    memtable.insert(i + 1, op(vec![b'k', (i % 8) as u8]));
                }
                let slots = memtable.slots.capacity();
                memtable.clear(usize::MAX);
                prop_assert!(memtable.is_empty() && memtable.sorted().is_empty());
                prop_assert_eq!(memtable.slots.capacity(), slots);
                prop_assert!(memtable.arena.spare.len() > 1);
                prop_assert_eq!((memtable.seq_range(), memtable.max_hlc()), ((0, 0), Hlc::default()));
            }
            let mut model: std::collections::BTreeMap<Vec<u8>, Siblings> = Default::default();
            for (i, (key, hlc, value)) in writes.into_iter().enumerate() {
                let key = vec![b'k', key];
                let v = version(hlc * 100 + i as u64, value.as_deref());
                memtable.insert(i as u64 + 1, Op { key: key.clone(), version: v.clone() });
                let siblings = model.entry(key).or_default();
                siblings.insert(v);
            }
            for (key, siblings) in &model {
                prop_assert_eq!(memtable.get(key), Some(siblings.clone()));
            }
            prop_assert_eq!(memtable.len(), model.len());
            for (entry, (key, siblings)) in memtable.sorted().into_iter().zip(&model) {
                prop_assert_eq!(entry.key, key.as_slice());
                prop_assert_eq!(&entry.siblings(), siblings);
                let hlcs: Vec<u64> = siblings.versions().iter().map(|v| v.hlc.0).collect();
                prop_assert_eq!(entry.hlc_range, (*hlcs.iter().min().unwrap(), *hlcs.iter().max().unwrap()));
                prop_assert_eq!(entry.all_tombstones, siblings.all_tombstones());
            }
            prop_assert!(memtable.get(b"absent").is_none());
        }
    }
}
