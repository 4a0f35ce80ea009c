//! Opens, verifies and reads a table file.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_ring::Siblings;
use serde::de::DeserializeOwned;

use super::block::{self, decode_value, Block, BlockError};
use super::bloom::{key_hash, Bloom};
use super::{IndexEntry, Props, FOOTER_LEN, FORMAT_VERSION, MAGIC};
use crate::storage::cache::BlockCache;
use crate::storage::disk::{File, Fs};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::u32_le_at;

/// The first 16 bytes of `key`, zero-padded, as a big-endian number: keys
/// whose prefixes differ compare as their prefixes do (a shorter key's
/// padding is below any byte the longer one has there, or equal to a zero
/// byte, which leaves the prefixes equal).
fn key_prefix(key: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    let n = key.len().min(16);
    if let (Some(to), Some(from)) = (bytes.get_mut(..n), key.get(..n)) {
        to.copy_from_slice(from);
    }
    u128::from_be_bytes(bytes)
}

thread_local! {
    /// Each reading thread's buffer for the block of a point read.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An open, immutable table.
#[derive(Debug)]
pub struct Table {
    id: u64,
    run: u64,
    path: PathBuf,
    file: Box<dyn File>,
    size: u64,
    index: Vec<IndexEntry>,
    /// The first 16 bytes of each index entry's last key, as a number
    /// ([`key_prefix`]): a point read searches these, in one compact array,
    /// and compares whole keys only where prefixes tie. Searching the
    /// entries' keys themselves, each behind its own pointer, missed the
    /// cache at nearly every step.
    index_prefixes: Vec<u128>,
    filter: KeyFilter,
    props: Props,
    /// Where point reads keep the blocks they read (none: read each time).
    cache: Option<Arc<BlockCache>>,
}

/// What a table says from memory about the keys it may hold: its key range
/// and bloom filter. Cheap to clone, and holding one keeps no file open
/// (the engine keeps those of recent flushes to tell which cached reads a
/// flush left as they were).
#[derive(Clone, Debug)]
pub struct KeyFilter {
    smallest: Arc<[u8]>,
    largest: Arc<[u8]>,
    bloom: Arc<Bloom>,
}

impl KeyFilter {
    /// Whether `key` may be in the table: in its key range (of the tables
    /// of one run, only one can match), then allowed by its bloom filter.
    pub fn may_hold(&self, key: &[u8]) -> bool {
        key >= &*self.smallest && key <= &*self.largest && self.bloom.may_contain(key_hash(key))
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
}

impl Table {
    /// Opens a table: checks the footer and the checksums of its index,
    /// bloom filter and properties. Data blocks are checked as they are read,
    /// or all at once by [`Table::verify`].
    pub fn open(fs: &dyn Fs, path: &Path, id: u64) -> Result<Table> {
        let file = fs.open(path).ctx("open", path)?;
        let size = file.len().ctx("stat", path)?;
        let corrupt = |offset: u64, reason: &str| Error::corrupt(path, offset, reason);
        if size < FOOTER_LEN as u64 {
            return Err(corrupt(0, &format!("table of {size} bytes is shorter than its footer")));
        }
        let footer_at = size - FOOTER_LEN as u64;
        let mut footer = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut footer, footer_at).ctx("read", path)?;
        let mut cursor = Cursor(&footer);
        let fields = (|| {
            let index = (cursor.u64()?, cursor.u32()?);
            let bloom = (cursor.u64()?, cursor.u32()?);
            let props = (cursor.u64()?, cursor.u32()?);
            let version = cursor.u32()?;
            let crc = cursor.u32()?;
            let magic = cursor.u64()?;
            Some((index, bloom, props, version, crc, magic))
        })();
        let Some((index_at, bloom_at, props_at, version, crc, magic)) = fields else {
            return Err(corrupt(footer_at, "footer too short"));
        };
        if magic != MAGIC {
            return Err(corrupt(footer_at, "not a Quiver table (bad magic)"));
        }
        let got = crc32fast::hash(&footer[..FOOTER_LEN - 12]);
        if got != crc {
            return Err(Error::ChecksumMismatch { path: path.to_path_buf(), offset: footer_at, expected: crc, got });
        }
        if version < FORMAT_VERSION {
            let path = path.to_path_buf();
            return Err(Error::OldFormat { path, what: "a table of", found: version, reads: FORMAT_VERSION });
        }
        if version != FORMAT_VERSION {
            return Err(corrupt(
                footer_at,
                &format!("table format version {version}, this build reads {FORMAT_VERSION}"),
            ));
        }
        let index: Vec<IndexEntry> = read_meta(file.as_ref(), path, index_at, footer_at)?;
        let bloom: Bloom = read_meta(file.as_ref(), path, bloom_at, footer_at)?;
        let props: Props = read_meta(file.as_ref(), path, props_at, footer_at)?;
        if index.iter().any(|entry| entry.offset.saturating_add(u64::from(entry.len)) > index_at.0) {
            return Err(corrupt(index_at.0, "index points past the data blocks"));
        }
        let index_prefixes = index.iter().map(|entry| key_prefix(&entry.last_key)).collect();
        Ok(Table {
            id,
            run: id,
            path: path.to_path_buf(),
            file,
            size,
            index,
            index_prefixes,
            filter: KeyFilter {
                smallest: props.smallest_key.as_slice().into(),
                largest: props.largest_key.as_slice().into(),
                bloom: Arc::new(bloom),
            },
            props,
            cache: None,
        })
    }

    /// The table's id (its file number).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Places the table in a sorted run (see [`crate::storage::manifest::TableMeta`]);
    /// a table is a run of its own until told otherwise.
    pub fn with_run(mut self, run: u64) -> Table {
        self.run = run;
        self
    }

    /// Has point reads keep the blocks they read in `cache` (shared by the
    /// engine's tables) and look there first.
    pub fn with_cache(mut self, cache: Arc<BlockCache>) -> Table {
        self.cache = Some(cache);
        self
    }

    /// The sorted run the table belongs to.
    pub fn run(&self) -> u64 {
        self.run
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The table's stored properties.
    pub fn props(&self) -> &Props {
        &self.props
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `key` may be in this table, from memory alone
    /// ([`KeyFilter::may_hold`]).
    pub fn may_hold(&self, key: &[u8]) -> bool {
        self.filter.may_hold(key)
    }

    /// Whether the bloom filter allows `key` to be here.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        self.filter.bloom.may_contain(key_hash(key))
    }

    /// The table's key range and bloom filter, apart from the table.
    pub fn key_filter(&self) -> KeyFilter {
        self.filter.clone()
    }

    fn read_block(&self, entry: &IndexEntry) -> Result<Block> {
        let mut data = vec![0u8; entry.len as usize];
        self.file.read_exact_at(&mut data, entry.offset).ctx("read", &self.path)?;
        Block::decode(data).map_err(|e| self.block_error(entry.offset, e))
    }

    /// A block through `cache`: from it, or read and kept in it.
    fn cached_block(&self, cache: &BlockCache, entry: &IndexEntry) -> Result<Arc<Block>> {
        if let Some(block) = cache.get(&(self.id, entry.offset)) {
            return Ok(block);
        }
        let block = Arc::new(self.read_block(entry)?);
        cache.insert((self.id, entry.offset), block.clone(), block.size());
        Ok(block)
    }

    fn block_error(&self, offset: u64, error: BlockError) -> Error {
        match error {
            BlockError::Checksum { expected, got } => {
                Error::ChecksumMismatch { path: self.path.clone(), offset, expected, got }
            }
            BlockError::Malformed(reason) => Error::corrupt(&self.path, offset, reason),
        }
    }

    fn decode(&self, offset: u64, value: &[u8]) -> Result<Siblings> {
        decode_value(value).ok_or_else(|| Error::corrupt(&self.path, offset, "stored versions do not decode"))
    }

    /// The versions of `key` in this table.
    pub fn get(&self, key: &[u8]) -> Result<Option<Siblings>> {
        if !self.may_hold(key) {
            return Ok(None);
        }
        let Some(entry) = self.index.get(self.first_block_ending_at_or_after(key)) else { return Ok(None) };
        let found = |value: Option<&[u8]>| value.map(|value| self.decode(entry.offset, value)).transpose();
        match &self.cache {
            Some(cache) => {
                let block = self.cached_block(cache, entry)?;
                found(block.find(key).map_err(|e| self.block_error(entry.offset, e))?)
            }
            // Without a cache the block is read into this thread's buffer,
            // used again by its next read: no allocation (and no zeroing of
            // a fresh block) per read on the default path.
            None => READ_BUFFER.with_borrow_mut(|buf| {
                buf.resize(entry.len as usize, 0);
                self.file.read_exact_at(buf, entry.offset).ctx("read", &self.path)?;
                found(block::check_and_find(buf, key).map_err(|e| self.block_error(entry.offset, e))?)
            }),
        }
    }

    /// The index of the first block whose last key is `>= key` (the only
    /// block that can hold `key`); the index's length if there is none.
    fn first_block_ending_at_or_after(&self, key: &[u8]) -> usize {
        let prefix = key_prefix(key);
        // A smaller prefix means a smaller key, a larger one a larger key;
        // only equal prefixes need the whole keys compared.
        let mut at = self.index_prefixes.partition_point(|&p| p < prefix);
        while self.index_prefixes.get(at) == Some(&prefix)
            && self.index.get(at).is_some_and(|entry| entry.last_key.as_slice() < key)
        {
            at += 1;
        }
        at
    }

    /// Reads every block and checks checksums, key order, the index and the
    /// entry count. Run on every new table before the manifest names it: the
    /// checksums prove the bytes are the ones the builder produced, so values
    /// are not decoded again here.
    pub fn verify(&self) -> Result<()> {
        let mut entries = 0u64;
        let mut last: Option<Vec<u8>> = None;
        for entry in &self.index {
            let block = self.read_block(entry)?;
            let mut block_last: Option<&[u8]> = None;
            for item in block.entries() {
                let (key, _value) = item.map_err(|e| self.block_error(entry.offset, e))?;
                if last.as_deref().is_some_and(|prev| prev >= key) || block_last.is_some_and(|prev| prev >= key) {
                    return Err(Error::corrupt(&self.path, entry.offset, "keys out of order"));
                }
                block_last = Some(key);
                entries += 1;
            }
            if block_last != Some(entry.last_key.as_slice()) {
                return Err(Error::corrupt(&self.path, entry.offset, "block's last key differs from the index"));
            }
            last = block_last.map(<[u8]>::to_vec);
        }
        if entries != self.props.entries {
            return Err(Error::corrupt(
                &self.path,
                0,
                format!("{entries} entries, properties say {}", self.props.entries),
            ));
        }
        Ok(())
    }

    /// Decodes a value as stored (as a [`TableScan`] yields it).
    pub fn decode_value(&self, value: &[u8]) -> Result<Siblings> {
        self.decode(0, value)
    }

    /// Iterates the entries with keys `>= start`, in order, decoded. Reads a
    /// block at a time: a range scan may want only a few entries.
    pub fn iter_from(self: &Arc<Self>, start: &[u8]) -> TableIter {
        match TableScan::from_key(self.clone(), start, 0) {
            Ok(scan) => TableIter { scan: Some(scan), error: None },
            Err(error) => TableIter { scan: None, error: Some(error) },
        }
    }
}

fn read_meta<T: DeserializeOwned>(file: &dyn File, path: &Path, (offset, len): (u64, u32), limit: u64) -> Result<T> {
    if len < 4 || offset.saturating_add(u64::from(len)) > limit {
        return Err(Error::corrupt(path, offset, "meta block out of bounds"));
    }
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset).ctx("read", path)?;
    // `len >= 4`, checked above.
    let (body, crc) = data.split_at(data.len() - 4);
    let expected = u32_le_at(crc, 0).unwrap_or_default();
    let got = crc32fast::hash(body);
    if got != expected {
        return Err(Error::ChecksumMismatch { path: path.to_path_buf(), offset, expected, got });
    }
    postcard::from_bytes(body).map_err(|e| Error::corrupt(path, offset, format!("meta block does not decode: {e}")))
}

/// Iterator over a table's entries, decoded. Ends after its first error.
#[derive(Debug)]
pub struct TableIter {
    scan: Option<TableScan>,
    error: Option<Error>,
}

impl Iterator for TableIter {
    type Item = Result<(Vec<u8>, Siblings)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(error) = self.error.take() {
            self.scan = None;
            return Some(Err(error));
        }
        let scan = self.scan.as_mut()?;
        let (key, value) = scan.head()?;
        let item = scan.table().decode_value(value).map(|siblings| (key.to_vec(), siblings));
        match &item {
            Ok(_) => self.error = scan.advance().err(),
            Err(_) => self.scan = None,
        }
        Some(item)
    }
}

/// Bytes of blocks a whole-table [`TableScan`] reads at once.
const SCAN_WINDOW_BYTES: u64 = 1 << 20;

/// A table's entries in key order: blocks are read up to `window_bytes` at
/// a time (at least one block) into one window and checked, and each entry
/// is borrowed from the window, so nothing is allocated or copied per entry.
/// Compaction scans whole tables a megabyte at a time; range scans
/// ([`Table::iter_from`]) a block at a time.
#[derive(Debug)]
pub struct TableScan {
    table: Arc<Table>,
    window_bytes: u64,
    window: Vec<u8>,
    /// File offset of `window[0]`.
    window_offset: u64,
    /// Blocks (index entries) in the window not started yet.
    pending: std::ops::Range<usize>,
    /// File offset of the block being read, and where its entries lie in
    /// the window.
    block_offset: u64,
    entries: std::ops::Range<usize>,
    /// The current entry's key and value, in the window.
    head: Option<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl TableScan {
    /// A scan of the whole table, positioned on its first entry.
    pub fn new(table: Arc<Table>) -> Result<TableScan> {
        TableScan::from_key(table, &[], SCAN_WINDOW_BYTES)
    }

    /// A scan positioned on the first entry with a key `>= start`.
    pub fn from_key(table: Arc<Table>, start: &[u8], window_bytes: u64) -> Result<TableScan> {
        // Only this block can hold keys below `start`.
        let first = table.index.partition_point(|entry| entry.last_key.as_slice() < start);
        let mut scan = TableScan {
            table,
            window_bytes,
            window: Vec::new(),
            window_offset: 0,
            pending: first..first,
            block_offset: 0,
            entries: 0..0,
            head: None,
        };
        scan.advance()?;
        while scan.head().is_some_and(|(key, _)| key < start) {
            scan.advance()?;
        }
        Ok(scan)
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The current entry (key, value as stored); `None` past the last.
    pub fn head(&self) -> Option<(&[u8], &[u8])> {
        let (key, value) = self.head.clone()?;
        Some((self.window.get(key)?, self.window.get(value)?))
    }

    /// Moves to the next entry.
    pub fn advance(&mut self) -> Result<()> {
        self.head = None;
        loop {
            if self.entries.start < self.entries.end {
                let entries = self.window.get(..self.entries.end).unwrap_or_default();
                let (key, value) = block::entry_at(entries, self.entries.start)
                    .map_err(|e| self.table.block_error(self.block_offset, e))?;
                self.entries.start = value.end;
                self.head = Some((key, value));
                return Ok(());
            }
            if let Some(i) = self.pending.next() {
                let Some(entry) = self.table.index.get(i) else { continue };
                let start = (entry.offset - self.window_offset) as usize;
                let data = start
                    .checked_add(entry.len as usize)
                    .and_then(|end| self.window.get(start..end))
                    .ok_or_else(|| Error::corrupt(&self.table.path, entry.offset, "block outside the read window"))?;
                let entries_end = block::check(data).map_err(|e| self.table.block_error(entry.offset, e))?;
                self.block_offset = entry.offset;
                self.entries = start..start + entries_end;
                continue;
            }
            if !self.read_window()? {
                return Ok(());
            }
        }
    }

    /// Reads the next blocks, up to a window's worth (at least one), in one
    /// read. Returns false past the last block.
    fn read_window(&mut self) -> Result<bool> {
        let index = &self.table.index;
        let first = self.pending.end;
        let Some(first_entry) = index.get(first) else { return Ok(false) };
        let start = first_entry.offset;
        let end_of = |entry: &IndexEntry| entry.offset + u64::from(entry.len);
        let mut last = first + 1;
        // The end of the window so far: that of block `last - 1`.
        let mut end = end_of(first_entry);
        // Blocks are written back to back; an index that says otherwise
        // is read one block at a time (and its checksums decide).
        while let Some(entry) = index.get(last).filter(|e| e.offset >= end && end_of(e) - start <= self.window_bytes) {
            end = end_of(entry);
            last += 1;
        }
        self.window.resize((end - start) as usize, 0);
        self.table.file.read_exact_at(&mut self.window, start).ctx("read", &self.table.path)?;
        self.window_offset = start;
        self.pending = first..last;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::SimFs;
    use crate::storage::sstable::TableBuilder;
    use proptest::prelude::*;
    use quiver_ring::{Hlc, NodeId, Stamper};

    /// Keys from a small alphabet with zero bytes, of lengths around 16, so
    /// that prefixes tie, pad and differ in every way.
    fn keys() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::btree_set(prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a']), 0..=20), 1..300)
            .prop_map(|set| set.into_iter().filter(|k| !k.is_empty()).collect())
    }

    proptest! {
        /// The prefix search finds the block the plain search over whole
        /// keys finds, for stored keys and for keys between them.
        #[test]
        fn the_prefix_search_finds_the_block_the_key_search_finds(
            stored in keys(),
            probes in prop::collection::vec(prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a', 2]), 0..=20), 50),
        ) {
            prop_assume!(!stored.is_empty());
            let mut stamper = Stamper::new(NodeId(1), Hlc(0), u64::MAX);
            let mut builder = TableBuilder::new(64, 10, 1, 1);
            for key in &stored {
                builder.add(key, &Siblings::one(stamper.next(1).expect("a test clock never refuses").blind(Some(vec![7]))));
            }
            let fs = SimFs::new();
            let path = Path::new("/t/0000000000000001.sst");
            fs.put(path, builder.finish().0);
            let table = Table::open(&fs, path, 1).unwrap();
            for key in stored.iter().chain(&probes) {
                let expected = table.index.partition_point(|entry| entry.last_key.as_slice() < key.as_slice());
                prop_assert_eq!(table.first_block_ending_at_or_after(key), expected, "{:?}", key);
            }
            for key in &stored {
                prop_assert!(table.get(key).unwrap().is_some(), "{:?} not found", key);
            }
        }
    }
}
