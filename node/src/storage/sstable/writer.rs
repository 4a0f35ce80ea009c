//! Builds a table in memory.

use quiver_ring::Siblings;

use super::block::BlockBuilder;
use super::bloom::{key_hash, Bloom};
use super::{encode_meta, IndexEntry, Props, FOOTER_LEN, FORMAT_VERSION, MAGIC};

/// Builds one table file from entries added in ascending key order.
#[derive(Debug)]
pub struct TableBuilder {
    out: Vec<u8>,
    block: BlockBuilder,
    block_bytes: usize,
    bloom_bits_per_key: usize,
    index: Vec<IndexEntry>,
    hashes: Vec<u64>,
    props: Props,
    last_key: Vec<u8>,
    value_buf: Vec<u8>,
}

impl TableBuilder {
    /// A builder for a table whose writes have WAL sequences in
    /// `min_seq..=max_seq`.
    pub fn new(block_bytes: usize, bloom_bits_per_key: usize, min_seq: u64, max_seq: u64) -> TableBuilder {
        TableBuilder::with_buffer(Vec::new(), block_bytes, bloom_bits_per_key, min_seq, max_seq)
    }

    /// [`TableBuilder::new`] writing into `buf` (cleared first): a buffer
    /// kept from an earlier table is not grown, copied and zero-filled by
    /// the kernel again, which otherwise costs about as much as building.
    pub fn with_buffer(
        mut buf: Vec<u8>,
        block_bytes: usize,
        bloom_bits_per_key: usize,
        min_seq: u64,
        max_seq: u64,
    ) -> TableBuilder {
        buf.clear();
        TableBuilder {
            out: buf,
            block: BlockBuilder::default(),
            block_bytes: block_bytes.max(256),
            bloom_bits_per_key,
            index: Vec::new(),
            hashes: Vec::new(),
            props: Props { min_seq, max_seq, min_hlc: u64::MAX, ..Props::default() },
            last_key: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Adds an entry. Keys must be strictly ascending.
    pub fn add(&mut self, key: &[u8], siblings: &Siblings) {
        let mut value = std::mem::take(&mut self.value_buf);
        value.clear();
        let value = postcard::to_extend(siblings, value).expect("postcard encodes versions into a Vec without failing");
        self.add_encoded(key, &value, siblings.hlc_bounds(), siblings.all_tombstones());
        self.value_buf = value;
    }

    /// Adds an entry copied as stored from another table that holds no
    /// tombstones. `hlc_range` bounds its timestamps (the source table's
    /// range will do: wider bounds are safe, they only make compaction and
    /// restart more careful).
    pub fn add_raw(&mut self, key: &[u8], value: &[u8], hlc_range: (u64, u64)) {
        self.add_encoded(key, value, hlc_range, false);
    }

    /// Adds an entry whose versions are already encoded (`postcard(Siblings)`),
    /// with the range of their timestamps and whether all are tombstones.
    pub fn add_encoded(&mut self, key: &[u8], value: &[u8], (min_hlc, max_hlc): (u64, u64), all_tombstones: bool) {
        self.props.tombstone_entries += u64::from(all_tombstones);
        assert!(self.props.entries == 0 || key > self.last_key.as_slice(), "table keys must be strictly ascending");
        self.block.add(&mut self.out, key, value);
        self.hashes.push(key_hash(key));
        self.props.min_hlc = self.props.min_hlc.min(min_hlc);
        self.props.max_hlc = self.props.max_hlc.max(max_hlc);
        if self.props.entries == 0 {
            self.props.smallest_key = key.to_vec();
        }
        self.props.entries += 1;
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        if self.block.len(&self.out) >= self.block_bytes {
            self.finish_block();
        }
    }

    fn finish_block(&mut self) {
        if self.block.is_empty() {
            return;
        }
        let offset = self.block.finish(&mut self.out) as u64;
        let len = (self.out.len() as u64 - offset) as u32;
        self.index.push(IndexEntry { last_key: self.last_key.clone(), offset, len });
    }

    /// Number of entries added.
    pub fn entries(&self) -> u64 {
        self.props.entries
    }

    /// Bytes the file would have if finished now, roughly.
    pub fn estimated_bytes(&self) -> usize {
        self.out.len() + self.hashes.len() * 2
    }

    /// The whole file and its properties.
    pub fn finish(mut self) -> (Vec<u8>, Props) {
        self.finish_block();
        if self.props.entries == 0 {
            self.props.min_hlc = 0;
        }
        self.props.largest_key = self.last_key.clone();
        let mut out = self.out;
        let (index_offset, index_len) = encode_meta(&mut out, &self.index);
        let (bloom_offset, bloom_len) = encode_meta(&mut out, &Bloom::build(&self.hashes, self.bloom_bits_per_key));
        let (props_offset, props_len) = encode_meta(&mut out, &self.props);
        let footer_start = out.len();
        out.extend_from_slice(&index_offset.to_le_bytes());
        out.extend_from_slice(&index_len.to_le_bytes());
        out.extend_from_slice(&bloom_offset.to_le_bytes());
        out.extend_from_slice(&bloom_len.to_le_bytes());
        out.extend_from_slice(&props_offset.to_le_bytes());
        out.extend_from_slice(&props_len.to_le_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let crc = crc32fast::hash(&out[footer_start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        debug_assert_eq!(out.len() - footer_start, FOOTER_LEN);
        (out, self.props)
    }
}
