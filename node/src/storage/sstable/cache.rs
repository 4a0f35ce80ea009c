//! The block cache: data blocks that point reads found, checksum already
//! verified, kept in memory up to a byte budget and shared by every table.
//!
//! A table's blocks never change, and a table id is never reused (the
//! manifest hands out ids in order), so an entry keyed by `(table id,
//! block offset)` can never be stale: the blocks of a table that compaction
//! deleted are simply no longer asked for, and age out.
//!
//! Eviction is CLOCK (second chance): each entry has a bit set on every hit;
//! the hand clears set bits and evicts the first entry it finds clear. A
//! block read once and never again goes before one that is read often,
//! without the list surgery of an exact LRU on every hit. The cache is split
//! into shards by key hash, each under its own mutex, so concurrent readers
//! rarely wait for each other.
//!
//! Only `Table::get` goes through it. Compaction and verification read
//! whole tables once and would only push out the blocks readers want.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::block::Block;
use crate::lock;

/// Shards: a power of two, a few per core.
const SHARDS: usize = 8;

type Key = (u64, u64);

#[derive(Debug)]
struct Entry {
    block: Arc<Block>,
    referenced: bool,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<Key, Entry>,
    /// Every key in `entries`, in the order the clock hand visits them.
    clock: VecDeque<Key>,
    bytes: usize,
}

impl Shard {
    /// Evicts until the shard holds at most `budget` bytes.
    fn evict_to(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some(key) = self.clock.pop_front() else { break };
            let entry = self.entries.get_mut(&key).expect("the clock holds only cached keys");
            if entry.referenced {
                entry.referenced = false;
                self.clock.push_back(key);
            } else {
                let entry = self.entries.remove(&key).expect("just found");
                self.bytes -= entry.block.size();
            }
        }
    }
}

/// A cache of verified data blocks, shared by every table of an engine.
#[derive(Debug)]
pub struct BlockCache {
    shards: [Mutex<Shard>; SHARDS],
    shard_bytes_max: usize,
}

impl BlockCache {
    /// A cache of at most about `bytes_max` bytes of blocks (a block larger
    /// than a shard's share is not kept).
    pub fn new(bytes_max: usize) -> BlockCache {
        BlockCache { shards: Default::default(), shard_bytes_max: bytes_max / SHARDS }
    }

    fn shard(&self, key: Key) -> &Mutex<Shard> {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&key.0.to_le_bytes());
        bytes[8..].copy_from_slice(&key.1.to_le_bytes());
        let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        &self.shards[hash as usize % SHARDS]
    }

    /// The block of table `table` at `offset`, if cached.
    pub fn get(&self, table: u64, offset: u64) -> Option<Arc<Block>> {
        let mut shard = lock(self.shard((table, offset)));
        let entry = shard.entries.get_mut(&(table, offset))?;
        entry.referenced = true;
        Some(entry.block.clone())
    }

    /// Keeps `block` as table `table`'s block at `offset`, evicting others
    /// to stay within the budget.
    pub fn insert(&self, table: u64, offset: u64, block: Arc<Block>) {
        let size = block.size();
        if size > self.shard_bytes_max {
            return;
        }
        let key = (table, offset);
        let mut shard = lock(self.shard(key));
        if shard.entries.contains_key(&key) {
            // Another reader read it at the same time; one copy is enough.
            return;
        }
        shard.evict_to(self.shard_bytes_max - size);
        shard.entries.insert(key, Entry { block, referenced: false });
        shard.clock.push_back(key);
        shard.bytes += size;
    }

    /// Bytes of blocks held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).bytes).sum()
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).entries.len()).sum()
    }
}

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

    #[test]
    fn blocks_are_keyed_by_table_and_offset() {
        let cache = BlockCache::new(1 << 20);
        cache.insert(1, 0, block(b"one", 10));
        cache.insert(2, 0, block(b"two", 10));
        cache.insert(1, 4096, block(b"three", 10));
        let find = |table, offset, key: &[u8]| cache.get(table, offset).unwrap().find(key).unwrap().is_some();
        assert!(find(1, 0, b"one") && find(2, 0, b"two") && find(1, 4096, b"three"));
        assert!(cache.get(2, 4096).is_none());
        assert_eq!(cache.blocks(), 3);
    }

    #[test]
    fn stays_within_its_budget_and_keeps_what_is_read_again() {
        let size = block(b"k", 1000).size();
        // Room for about four blocks per shard.
        let cache = BlockCache::new(SHARDS * (4 * size + size / 2));
        let hot = (0u64, 0u64);
        cache.insert(hot.0, hot.1, block(b"hot", 1000));
        for i in 1..2000u64 {
            cache.get(hot.0, hot.1).expect("a block read between every insert stays");
            cache.insert(i, i * 4096, block(b"k", 1000));
            assert!(cache.bytes() <= SHARDS * (4 * size + size / 2), "over budget after {i} inserts");
        }
        assert!(cache.blocks() >= SHARDS * 3, "the budget is used: {} blocks", cache.blocks());
    }

    #[test]
    fn a_block_larger_than_a_shard_is_not_kept() {
        let cache = BlockCache::new(SHARDS * 100);
        cache.insert(1, 0, block(b"big", 1000));
        assert!(cache.get(1, 0).is_none());
        assert_eq!(cache.bytes(), 0);
    }
}
