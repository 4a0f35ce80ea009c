//! A CLOCK cache: entries kept in memory up to a byte budget, shared by
//! threads. Two caches use it: the block cache (verified data blocks of
//! tables, keyed by table id and offset) and the value cache (a key's
//! versions merged from every table, see the engine).
//!
//! Eviction is CLOCK (second chance): each entry has a bit set on every hit;
//! the hand clears set bits and evicts the first entry it finds clear. An
//! entry read once and never again goes before one that is read often,
//! without the list surgery of an exact LRU on every hit. The cache is split
//! into shards by key hash, each under its own mutex, so concurrent readers
//! rarely wait for each other.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use super::sstable::Block;
use crate::lock;

/// Shards: a power of two, a few per core.
const SHARDS: usize = 8;

#[derive(Debug)]
struct Entry<V> {
    value: V,
    bytes: usize,
    referenced: bool,
}

#[derive(Debug)]
struct Shard<K, V> {
    entries: HashMap<K, Entry<V>, Xxh3DefaultBuilder>,
    /// Every key in `entries`, in the order the clock hand visits them.
    clock: VecDeque<K>,
    bytes: usize,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Shard<K, V> {
        Shard { entries: HashMap::with_hasher(Xxh3DefaultBuilder), clock: VecDeque::new(), bytes: 0 }
    }
}

impl<K: Hash + Eq + Clone, V> Shard<K, V> {
    /// Evicts until the shard holds at most `budget` bytes.
    fn evict_to(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some(key) = self.clock.pop_front() else { break };
            match self.entries.get_mut(&key) {
                Some(entry) if entry.referenced => {
                    entry.referenced = false;
                    self.clock.push_back(key);
                }
                Some(_) => {
                    if let Some(entry) = self.entries.remove(&key) {
                        self.bytes -= entry.bytes;
                    }
                }
                // The clock holds only cached keys; nothing to do otherwise.
                None => {}
            }
        }
    }
}

/// A cache of values of about `bytes_max` bytes at most, in shards.
pub struct ClockCache<K, V> {
    shards: [Mutex<Shard<K, V>>; SHARDS],
    shard_bytes_max: usize,
    hasher: Xxh3DefaultBuilder,
}

impl<K, V> std::fmt::Debug for ClockCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClockCache({} bytes per shard at most)", self.shard_bytes_max)
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ClockCache<K, V> {
    /// A cache of at most about `bytes_max` bytes (a value larger than a
    /// shard's share is not kept).
    pub fn new(bytes_max: usize) -> ClockCache<K, V> {
        ClockCache { shards: Default::default(), shard_bytes_max: bytes_max / SHARDS, hasher: Xxh3DefaultBuilder }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<Shard<K, V>> {
        let at = self.hasher.hash_one(key) as usize % SHARDS;
        // `at < SHARDS`, the array's length.
        #[allow(clippy::indexing_slicing)]
        &self.shards[at]
    }

    /// The value of `key`, if cached.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut shard = lock(self.shard(key));
        let entry = shard.entries.get_mut(key)?;
        entry.referenced = true;
        Some(entry.value.clone())
    }

    /// Keeps `value` (of about `bytes` bytes) under `key`, replacing what
    /// was there, and evicts others to stay within the budget. Every cached
    /// key has exactly one place in the clock: a replaced entry keeps its
    /// own, and a new key gets one only once the hand has made room (the
    /// hand drops a place whose key is not cached).
    pub fn insert(&self, key: K, value: V, bytes: usize) {
        if bytes > self.shard_bytes_max {
            return;
        }
        let mut shard = lock(self.shard(&key));
        if let Some(entry) = shard.entries.get_mut(&key) {
            let old = std::mem::replace(&mut entry.bytes, bytes);
            entry.value = value;
            shard.bytes = shard.bytes - old + bytes;
            // This may evict the entry just replaced: then it is gone
            // entirely, from the entries and from the clock.
            shard.evict_to(self.shard_bytes_max);
            return;
        }
        shard.evict_to(self.shard_bytes_max - bytes);
        shard.entries.insert(key.clone(), Entry { value, bytes, referenced: false });
        shard.clock.push_back(key);
        shard.bytes += bytes;
    }

    /// Replaces the value of `key`, if it is cached, by `value` (of the
    /// same size): no allocation, nothing evicted.
    pub fn replace<Q>(&self, key: &Q, value: V)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(entry) = lock(self.shard(key)).entries.get_mut(key) {
            entry.value = value;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).bytes).sum()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).entries.len()).sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verified data blocks that point reads found, shared by every table.
/// A table's blocks never change, and a table id is never reused (the
/// manifest hands out ids in order), so an entry keyed by `(table id, block
/// offset)` can never be stale: the blocks of a table that compaction
/// deleted are no longer asked for, and age out. Only `Table::get` goes
/// through it: compaction and verification read whole tables once and would
/// only push out the blocks readers want.
pub type BlockCache = ClockCache<(u64, u64), Arc<Block>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sstable::block::BlockBuilder;

    fn block(key: &[u8], value_len: usize) -> Arc<Block> {
        let mut data = Vec::new();
        let mut builder = BlockBuilder::default();
        builder.add(&mut data, key, &vec![7u8; value_len]);
        builder.finish(&mut data);
        Arc::new(Block::decode(data).unwrap())
    }

    fn insert(cache: &BlockCache, table: u64, offset: u64, block: Arc<Block>) {
        let size = block.size();
        cache.insert((table, offset), block, size);
    }

    #[test]
    fn blocks_are_keyed_by_table_and_offset() {
        let cache = BlockCache::new(1 << 20);
        insert(&cache, 1, 0, block(b"one", 10));
        insert(&cache, 2, 0, block(b"two", 10));
        insert(&cache, 1, 4096, block(b"three", 10));
        let find = |table, offset, key: &[u8]| cache.get(&(table, offset)).unwrap().find(key).unwrap().is_some();
        assert!(find(1, 0, b"one") && find(2, 0, b"two") && find(1, 4096, b"three"));
        assert!(cache.get(&(2, 4096)).is_none());
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn stays_within_its_budget_and_keeps_what_is_read_again() {
        let size = block(b"k", 1000).size();
        // Room for about four blocks per shard.
        let cache = BlockCache::new(SHARDS * (4 * size + size / 2));
        let hot = (0u64, 0u64);
        insert(&cache, hot.0, hot.1, block(b"hot", 1000));
        for i in 1..2000u64 {
            cache.get(&hot).expect("a block read between every insert stays");
            insert(&cache, i, i * 4096, block(b"k", 1000));
            assert!(cache.bytes() <= SHARDS * (4 * size + size / 2), "over budget after {i} inserts");
        }
        assert!(cache.len() >= SHARDS * 3, "the budget is used: {} blocks", cache.len());
    }

    #[test]
    fn a_block_larger_than_a_shard_is_not_kept() {
        let cache = BlockCache::new(SHARDS * 100);
        insert(&cache, 1, 0, block(b"big", 1000));
        assert!(cache.get(&(1, 0)).is_none());
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn a_key_inserted_again_takes_the_new_value_and_counts_once() {
        let cache: ClockCache<Vec<u8>, u32> = ClockCache::new(SHARDS * 1000);
        cache.insert(b"k".to_vec(), 1, 100);
        cache.insert(b"k".to_vec(), 2, 150);
        assert_eq!(cache.get(&b"k"[..]), Some(2));
        assert_eq!((cache.len(), cache.bytes()), (1, 150));
        // The replaced key is still evictable: fill its shard far past the
        // budget with other keys.
        for i in 0..1000u32 {
            cache.insert(i.to_le_bytes().to_vec(), i, 100);
        }
        assert!(cache.bytes() <= SHARDS * 1000);
    }

    /// Hits set the second-chance bits, so the hand goes round more than
    /// once while it makes room: the budget holds whatever the mix.
    #[test]
    fn stays_within_its_budget_under_any_mix_of_reads_inserts_and_replacements() {
        let cache: ClockCache<u32, u32> = ClockCache::new(SHARDS * 1000);
        let mut rng = quiver_ring::rand::SplitMix64::new(7);
        for _ in 0..20_000 {
            let key = rng.between(0, 200) as u32;
            if rng.chance(0.5) {
                cache.get(&key);
            } else {
                cache.insert(key, key, rng.between(1, 400) as usize);
            }
            assert!(cache.bytes() <= SHARDS * 1000, "{} bytes held", cache.bytes());
        }
        for shard in &cache.shards {
            let shard = lock(shard);
            assert_eq!(shard.clock.len(), shard.entries.len(), "each cached key has one place in the clock");
            assert_eq!(shard.bytes, shard.entries.values().map(|e| e.bytes).sum::<usize>());
        }
    }
}
