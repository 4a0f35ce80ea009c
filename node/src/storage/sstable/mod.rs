//! Sorted string tables: immutable, checksummed files of `key -> Siblings`.
//!
//! ```text
//! table  := data_block* index_block bloom_block props_block footer
//! data_block  := entry* | count u32 LE | crc32 u32 LE      crc over entries and count
//! entry       := key_len u32 LE | value_len u32 LE | key | value
//!                value = postcard(Siblings)
//! index_block := postcard(Vec<IndexEntry>) | crc32 u32 LE   one entry per data block
//! bloom_block := postcard(Bloom) | crc32 u32 LE
//! props_block := postcard(Props) | crc32 u32 LE
//! footer (52 bytes, little endian):
//!   index_offset u64 | index_len u32 | bloom_offset u64 | bloom_len u32 |
//!   props_offset u64 | props_len u32 | format_version u32 |
//!   crc32 u32 (of the 40 bytes before it) | magic u64 "QVSST\0\0\0"
//! ```
//!
//! Keys are strictly ascending. Every byte of the file is under a checksum:
//! the footer's own, each block's, and each meta block's. A table is built
//! whole in memory and written with one write, then synced, re-read and
//! verified before the manifest may name it.

pub(crate) mod block;
mod bloom;
mod reader;
mod writer;

pub use block::Block;
pub use bloom::Bloom;
pub use reader::{KeyFilter, Table, TableIter, TableScan};
pub use writer::TableBuilder;

use serde::{Deserialize, Serialize};

/// Last eight bytes of every table.
pub const MAGIC: u64 = u64::from_le_bytes(*b"QVSST\0\0\0");
/// The format this code writes and reads. 2: versions v2; tables of format
/// 1 are refused.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed footer.
pub const FOOTER_LEN: usize = 52;

/// Where one data block is, and the last key in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub last_key: Vec<u8>,
    pub offset: u64,
    /// Length including the block's count and checksum.
    pub len: u32,
}

/// Facts about a table, stored in it and in the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Props {
    pub entries: u64,
    /// Entries whose versions are all tombstones.
    pub tombstone_entries: u64,
    /// WAL sequence range of the writes the table holds.
    pub min_seq: u64,
    pub max_seq: u64,
    /// Timestamp range of the versions it holds.
    pub min_hlc: u64,
    pub max_hlc: u64,
    pub smallest_key: Vec<u8>,
    pub largest_key: Vec<u8>,
}

/// The file name of table `id`.
pub fn table_name(id: u64) -> String {
    format!("{id:016}.sst")
}

/// The id of a table file name, if it is one.
pub fn parse_table_name(name: &str) -> Option<u64> {
    name.strip_suffix(".sst")?.parse().ok()
}

/// A meta block: postcard bytes followed by their crc32.
fn encode_meta<T: Serialize>(out: &mut Vec<u8>, value: &T) -> (u64, u32) {
    let offset = out.len() as u64;
    let bytes = postcard::to_stdvec(value).expect("postcard encodes meta blocks into a Vec without failing");
    out.extend_from_slice(&bytes);
    out.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    (offset, (bytes.len() + 4) as u32)
}
