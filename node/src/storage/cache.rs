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

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use hashbrown::HashTable;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use super::sstable::Block;
use crate::lock;

/// Shards: a power of two, a few per core.
const SHARDS: usize = 8;

#[derive(Debug)]
struct Entry<K, V> {
    key: K,
    value: V,
    hash: u64,
    bytes: usize,
    referenced: bool,
}

#[derive(Debug)]
struct Shard<K, V> {
    entries: HashTable<Entry<K, V>>,
    /// The hash of every entry, in the order the clock hand visits them.
    /// Hashes rather than keys: a key replaced with an equal one (a value
    /// cache entry carries its value) leaves nothing behind here, and a
    /// place is 8 bytes.
    clock: VecDeque<u64>,
    bytes: usize,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Shard<K, V> {
        Shard { entries: HashTable::new(), clock: VecDeque::new(), bytes: 0 }
    }
}

impl<K, V> Shard<K, V> {
    /// Evicts until the shard holds at most `budget` bytes. Should two
    /// entries share a hash, each of their two places evicts one of them.
    fn evict_to(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some(hash) = self.clock.pop_front() else { break };
            let Ok(entry) = self.entries.find_entry(hash, |entry| entry.hash == hash) else { continue };
            if entry.get().referenced {
                entry.into_mut().referenced = false;
                self.clock.push_back(hash);
            } else {
                self.bytes -= entry.remove().0.bytes;
            }
        }
    }

    fn find_mut<Q>(&mut self, hash: u64, key: &Q) -> Option<&mut Entry<K, V>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        self.entries.find_mut(hash, |entry| entry.hash == hash && entry.key.borrow() == key)
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

    /// The key's hash and its shard. The shard is chosen by high bits: the
    /// table inside it places entries by the low ones.
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> (u64, &Mutex<Shard<K, V>>) {
        let hash = self.hasher.hash_one(key);
        let at = (hash >> 48) as usize % SHARDS;
        // `at < SHARDS`, the array's length.
        #[allow(clippy::indexing_slicing)]
        (hash, &self.shards[at])
    }

    /// The value of `key`, if cached.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_with_key(key).map(|(_, value)| value)
    }

    /// The key as cached and its value, if cached; the entry counts as
    /// read (the clock hand passes it over once).
    pub fn get_with_key<Q>(&self, key: &Q) -> Option<(K, V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.look_up(key, true)
    }

    /// [`ClockCache::get_with_key`] for a look that is not a read (a
    /// flush's warm): the entry's place in the clock is left as it was.
    pub fn peek_with_key<Q>(&self, key: &Q) -> Option<(K, V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.look_up(key, false)
    }

    fn look_up<Q>(&self, key: &Q, read: bool) -> Option<(K, V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.shard(key);
        let mut shard = lock(shard);
        let entry = shard.find_mut(hash, key)?;
        entry.referenced |= read;
        Some((entry.key.clone(), entry.value.clone()))
    }

    /// Keeps `value` (of about `bytes` bytes) under `key`, replacing what
    /// was there (key and value: an equal key may carry more), and evicts
    /// others to stay within the budget. Every cached entry has exactly one
    /// place in the clock: a replaced entry keeps its own, and a new one
    /// gets one only once the hand has made room.
    pub fn insert(&self, key: K, value: V, bytes: usize) {
        if bytes > self.shard_bytes_max {
            return;
        }
        let (hash, shard) = self.shard(&key);
        let mut shard = lock(shard);
        if let Some(entry) = shard.find_mut(hash, &key) {
            let old = std::mem::replace(&mut entry.bytes, bytes);
            (entry.key, entry.value) = (key, value);
            shard.bytes = shard.bytes - old + bytes;
            // This may evict the entry just replaced: then it is gone
            // entirely, from the entries and from the clock.
            shard.evict_to(self.shard_bytes_max);
            return;
        }
        shard.evict_to(self.shard_bytes_max - bytes);
        shard.entries.insert_unique(hash, Entry { key, value, hash, bytes, referenced: false }, |entry| entry.hash);
        shard.clock.push_back(hash);
        shard.bytes += bytes;
    }

    /// Keeps `value` (of about `bytes` bytes) under `key` only if that
    /// evicts nothing: in room the shard has free, or in place of what
    /// `key` held if the new value fits there. Whether it was kept.
    pub fn insert_into_room(&self, key: K, value: V, bytes: usize) -> bool {
        let (hash, shard) = self.shard(&key);
        let mut shard = lock(shard);
        let shard = &mut *shard;
        match shard.entries.entry(hash, |entry| entry.hash == hash && entry.key == key, |entry| entry.hash) {
            hashbrown::hash_table::Entry::Occupied(mut held) => {
                let entry = held.get_mut();
                if shard.bytes - entry.bytes + bytes > self.shard_bytes_max {
                    return false;
                }
                shard.bytes = shard.bytes - entry.bytes + bytes;
                (entry.key, entry.value, entry.bytes) = (key, value, bytes);
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                if shard.bytes + bytes > self.shard_bytes_max {
                    return false;
                }
                shard.bytes += bytes;
                vacant.insert(Entry { key, value, hash, bytes, referenced: false });
                shard.clock.push_back(hash);
            }
        }
        true
    }

    /// Replaces the value of `key`, if it is cached and `held` says yes to
    /// the key as cached, by `value` (of the same size): no allocation,
    /// nothing evicted.
    pub fn replace_if<Q>(&self, key: &Q, value: V, held: impl FnOnce(&K) -> bool)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.shard(key);
        if let Some(entry) = lock(shard).find_mut(hash, key).filter(|entry| held(&entry.key)) {
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

/// A key and the bytes kept for it, in one allocation: the key's length
/// (two bytes, little-endian), the key, the bytes. The value cache's entry:
/// it hashes and compares as its key, so the cache finds it by the key
/// alone, and a hit reads one allocation, the key and what it caches side
/// by side.
#[derive(Clone, Debug)]
pub struct KeyedBytes(Arc<[u8]>);

impl KeyedBytes {
    /// `key` and `bytes`. `None` for a key longer than 65,535 bytes
    /// (longer than any key the store takes).
    pub fn new(key: &[u8], bytes: &[u8]) -> Option<KeyedBytes> {
        let len = u16::try_from(key.len()).ok()?;
        let mut all = Vec::with_capacity(2 + key.len() + bytes.len());
        all.extend_from_slice(&len.to_le_bytes());
        all.extend_from_slice(key);
        all.extend_from_slice(bytes);
        Some(KeyedBytes(Arc::from(all)))
    }

    fn split(&self) -> (&[u8], &[u8]) {
        // `new` wrote a length that fits; an empty split is never made.
        let len = self.0.first_chunk::<2>().map_or(0, |len| usize::from(u16::from_le_bytes(*len)));
        self.0.get(2..).and_then(|rest| rest.split_at_checked(len)).unwrap_or_default()
    }

    pub fn key(&self) -> &[u8] {
        self.split().0
    }

    /// The bytes kept for the key.
    pub fn bytes(&self) -> &[u8] {
        self.split().1
    }

    /// Whether `other` is this very entry (not merely one of the same key).
    pub fn is(&self, other: &KeyedBytes) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Bytes in the allocation, not counting its reference counts.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no key and no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len() <= 2
    }
}

impl Hash for KeyedBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, which `Borrow` requires.
        self.key().hash(state)
    }
}

impl PartialEq for KeyedBytes {
    fn eq(&self, other: &KeyedBytes) -> bool {
        self.key() == other.key()
    }
}

impl Eq for KeyedBytes {}

impl Borrow<[u8]> for KeyedBytes {
    fn borrow(&self) -> &[u8] {
        self.key()
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

    /// A cache with room for about four blocks of 1000 bytes per shard,
    /// holding one such block at `(0, 0)`, and its budget.
    fn four_blocks_per_shard_with_one_at_zero(name: &[u8]) -> (BlockCache, usize) {
        let size = block(b"k", 1000).size();
        let budget = SHARDS * (4 * size + size / 2);
        let cache = BlockCache::new(budget);
        insert(&cache, 0, 0, block(name, 1000));
        (cache, budget)
    }

    #[test]
    fn stays_within_its_budget_and_keeps_what_is_read_again() {
        let (cache, budget) = four_blocks_per_shard_with_one_at_zero(b"hot");
        let hot = (0u64, 0u64);
        for i in 1..2000u64 {
            cache.get(&hot).expect("a block read between every insert stays");
            insert(&cache, i, i * 4096, block(b"k", 1000));
            assert!(cache.bytes() <= budget, "over budget after {i} inserts");
        }
        assert!(cache.len() >= SHARDS * 3, "the budget is used: {} blocks", cache.len());
    }

    #[test]
    fn a_peek_is_not_a_read() {
        let (cache, _) = four_blocks_per_shard_with_one_at_zero(b"looked at");
        let looked_at = (0u64, 0u64);
        let mut inserts = 0;
        while cache.peek_with_key(&looked_at).is_some() {
            inserts += 1;
            assert!(inserts < 2000, "an entry only peeked at stays as if read");
            insert(&cache, inserts, inserts * 4096, block(b"k", 1000));
        }
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

    #[test]
    fn keyed_bytes_are_found_by_their_key_alone() {
        let cache: ClockCache<KeyedBytes, u64> = ClockCache::new(1 << 20);
        for i in 0..100u64 {
            let key = format!("key-{i}");
            let entry = KeyedBytes::new(key.as_bytes(), &i.to_le_bytes()).unwrap();
            assert_eq!((entry.key(), entry.bytes()), (key.as_bytes(), &i.to_le_bytes()[..]));
            cache.insert(entry, i, 100);
        }
        for i in 0..100u64 {
            let (entry, value) = cache.get_with_key(format!("key-{i}").as_bytes()).unwrap();
            assert_eq!((entry.bytes(), value), (&i.to_le_bytes()[..], i));
        }
        assert!(cache.get_with_key(&b"key-100"[..]).is_none());
        // A value replaced only for the very entry it was read with: not
        // for another entry of the same key cached meanwhile.
        let (read, _) = cache.get_with_key(&b"key-1"[..]).unwrap();
        let newer = KeyedBytes::new(b"key-1", &[9]).unwrap();
        cache.insert(newer.clone(), 50, 100);
        cache.replace_if(&b"key-1"[..], 7, |held| held.is(&read));
        assert_eq!(cache.get(&b"key-1"[..]), Some(50), "the newer entry took the older one's value");
        cache.replace_if(&b"key-1"[..], 51, |held| held.is(&newer));
        assert_eq!(cache.get(&b"key-1"[..]), Some(51));
        let empty = KeyedBytes::new(b"", b"").unwrap();
        assert_eq!((empty.key(), empty.bytes(), empty.is_empty()), (&b""[..], &b""[..], true));
        assert!(KeyedBytes::new(&vec![0; 1 << 16], b"").is_none());
    }

    #[test]
    fn an_insert_into_room_evicts_nothing() {
        let cache: ClockCache<u32, u32> = ClockCache::new(SHARDS * 1000);
        let mut kept = Vec::new();
        for key in 0..200u32 {
            if cache.insert_into_room(key, key, 100) {
                kept.push(key);
            }
        }
        // Ten entries of 100 bytes fill each shard's 1000; none went.
        assert_eq!(kept.len(), SHARDS * 10);
        assert!(kept.iter().all(|key| cache.get(key) == Some(*key)), "an insert into room evicted an entry");
        // In place of a held key: kept if it fits where the old value was.
        assert!(cache.insert_into_room(kept[0], 7, 100));
        assert!(!cache.insert_into_room(kept[0], 8, 101));
        assert_eq!(cache.get(&kept[0]), Some(7));
        assert_eq!(cache.bytes(), SHARDS * 1000);
        for shard in &cache.shards {
            let shard = lock(shard);
            assert_eq!(shard.clock.len(), shard.entries.len(), "each cached key has one place in the clock");
        }
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
            assert_eq!(shard.bytes, shard.entries.iter().map(|e| e.bytes).sum::<usize>());
        }
    }
}
