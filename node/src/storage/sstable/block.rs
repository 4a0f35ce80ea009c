//! Data blocks: a run of entries, their count and a checksum.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::ops::Range;

use crate::storage::u32_le_at;
use quiver_ring::Siblings;

/// Builds one data block at the end of a table's buffer, in place: entries
/// are written once, where they will stay.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    /// Where the open block starts in the buffer.
    start: usize,
    count: u32,
}

impl BlockBuilder {
    pub fn add(&mut self, out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        if self.count == 0 {
            self.start = out.len();
        }
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        self.count += 1;
    }

    /// Bytes of entries in the open block.
    pub fn len(&self, out: &[u8]) -> usize {
        if self.count == 0 {
            0
        } else {
            out.len() - self.start
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Ends the open block: its count and checksum follow its entries.
    /// Returns where it starts in `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> usize {
        out.extend_from_slice(&self.count.to_le_bytes());
        // Writing: `start` is where this builder began the block in `out`.
        #[allow(clippy::indexing_slicing)]
        let crc = crc32fast::hash(&out[self.start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        self.count = 0;
        self.start
    }
}

/// A data block read from disk whose checksum was verified.
#[derive(Debug)]
pub struct Block {
    data: Vec<u8>,
    /// Offset just past the last entry.
    entries_end: usize,
}

/// Why a block could not be read.
#[derive(Debug)]
pub enum BlockError {
    Checksum { expected: u32, got: u32 },
    Malformed(&'static str),
}

/// Checks the checksum of a block's bytes (as stored, with count and crc).
/// Returns where its entries end (the count follows them).
pub fn check(data: &[u8]) -> Result<usize, BlockError> {
    let crc_at = data.len().checked_sub(4).ok_or(BlockError::Malformed("block shorter than its checksum"))?;
    let expected = u32_le_at(data, crc_at).ok_or(BlockError::Malformed("block checksum"))?;
    let got = crc32fast::hash(data.get(..crc_at).unwrap_or_default());
    if got != expected {
        return Err(BlockError::Checksum { expected, got });
    }
    crc_at.checked_sub(4).ok_or(BlockError::Malformed("block shorter than its count"))
}

/// The entry at `at` in a block's entries (`entries` ends where the entries
/// end): where its key and its value lie, and where the next entry starts.
pub fn entry_at(entries: &[u8], at: usize) -> Result<(Range<usize>, Range<usize>), BlockError> {
    let parsed = (|| {
        let key_len = u32_le_at(entries, at)? as usize;
        let value_len = u32_le_at(entries, at.checked_add(4)?)? as usize;
        let key_start = at.checked_add(8)?;
        let value_start = key_start.checked_add(key_len)?;
        let end = value_start.checked_add(value_len)?;
        (end <= entries.len()).then_some((key_start..value_start, value_start..end))
    })();
    parsed.ok_or(BlockError::Malformed("entry runs past the end of its block"))
}

impl Block {
    /// Checks the checksum of a block's bytes (as stored, with count and crc).
    pub fn decode(mut data: Vec<u8>) -> Result<Block, BlockError> {
        let entries_end = check(&data)?;
        data.truncate(entries_end + 4);
        Ok(Block { data, entries_end })
    }

    /// Bytes of memory the block holds (what the block cache counts).
    pub fn size(&self) -> usize {
        self.data.capacity() + std::mem::size_of::<Block>()
    }

    /// The entries, in order: `(key, value bytes)`.
    pub fn entries(&self) -> BlockEntries<'_> {
        BlockEntries { block: self, at: 0 }
    }

    /// The value bytes stored for `key`, if any.
    pub fn find(&self, key: &[u8]) -> Result<Option<&[u8]>, BlockError> {
        find_in_entries(self.data.get(..self.entries_end).unwrap_or_default(), key)
    }
}

/// The value bytes stored for `key` in a block's bytes as read (entries,
/// count and checksum), after checking the checksum: a point read without
/// making a [`Block`] of them, so the bytes can be read into a buffer that
/// is used again.
pub fn check_and_find<'a>(data: &'a [u8], key: &[u8]) -> Result<Option<&'a [u8]>, BlockError> {
    let entries_end = check(data)?;
    find_in_entries(data.get(..entries_end).unwrap_or_default(), key)
}

/// The value of `key` among a block's `entries`, which are in key order.
fn find_in_entries<'a>(entries: &'a [u8], key: &[u8]) -> Result<Option<&'a [u8]>, BlockError> {
    let mut at = 0;
    while at < entries.len() {
        let (k, v) = entry_at(entries, at)?;
        at = v.end;
        // `entry_at` returns ranges within `entries` only.
        match entries.get(k).unwrap_or_default().cmp(key) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => return Ok(entries.get(v)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

/// Iterator over a block's entries.
#[derive(Debug)]
pub struct BlockEntries<'a> {
    block: &'a Block,
    at: usize,
}

impl<'a> Iterator for BlockEntries<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), BlockError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.block.entries_end {
            return None;
        }
        let data = self.block.data.get(..self.block.entries_end).unwrap_or_default();
        match entry_at(data, self.at) {
            // `entry_at` returns ranges within `data` only.
            Ok((key, value)) => {
                self.at = value.end;
                Some(Ok((data.get(key).unwrap_or_default(), data.get(value).unwrap_or_default())))
            }
            Err(e) => {
                self.at = usize::MAX;
                Some(Err(e))
            }
        }
    }
}

/// Decodes a stored value.
pub fn decode_value(bytes: &[u8]) -> Option<Siblings> {
    postcard::from_bytes(bytes).ok()
}
