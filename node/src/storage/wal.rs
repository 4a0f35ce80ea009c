//! The write-ahead log.
//!
//! The log is a sequence of segment files named `<number:016>.wal`. Each is
//! pre-allocated (zero-filled and synced) before it is used, so the durable
//! write of each group commit has no file-size change to record.
//!
//! ```text
//! segment := magic "QVWAL\0\0\x01" (8 bytes) | frame* | zeros
//! frame   := len u32 LE | crc32 u32 LE | payload          (see `frame`)
//! payload := seq u64 LE | group u64 LE | postcard(Vec<Op>)
//! ```
//!
//! - `seq` numbers records from 1, without gaps, across segments.
//! - `group` is the `seq` of the first record of the group commit (one
//!   durable write, see [`WalWriter`]) the record was written in. A group
//!   never spans two segments.
//! - One record holds a whole write or a whole batch, so it applies entirely
//!   or not at all.
//!
//! Recovery reads every segment in order. When a record is bad (cut short,
//! or its checksum fails), the records that still follow decide what it is:
//! - none, or only records of the same, unfinished group (their group
//!   started at or before the bad record, so that group's durable write never
//!   returned and none of it was acknowledged): a **torn tail**. The segment
//!   is truncated at the bad record.
//! - a record of a later group: that later group was synced, so the bad
//!   record was synced and acknowledged before it. This is **corruption**:
//!   the engine refuses to open and names the file and offset, unless the
//!   repair option asks it to keep the valid prefix and drop the rest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::storage::disk::{read_all, AlignedBuf, File, Fs, DIRECT_ALIGN};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::frame::{self, Stop};
use crate::storage::Op;

/// First bytes of every segment: name and format version.
pub const MAGIC: &[u8; 8] = b"QVWAL\0\0\x01";
const PAYLOAD_PREFIX: usize = 16;
const ZERO_CHUNK: usize = 1 << 20;

/// The file name of segment `number`.
pub fn segment_name(number: u64) -> String {
    format!("{number:016}.wal")
}

/// The number of a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal")?.parse().ok()
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, group: u64, ops: &[u8]) {
    frame::encode(out, &[&seq.to_le_bytes(), &group.to_le_bytes(), ops]);
}

/// Bytes a record with `ops_len` bytes of encoded ops takes in the log.
pub fn record_len(ops_len: usize) -> usize {
    frame::HEADER_LEN + PAYLOAD_PREFIX + ops_len
}

fn decode_prefix(payload: &[u8]) -> Option<(u64, u64, &[u8])> {
    let seq = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let group = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((seq, group, payload.get(PAYLOAD_PREFIX..)?))
}

/// A segment that exists on disk and the last record it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub number: u64,
    /// `None` when the segment holds no record.
    pub last_seq: Option<u64>,
}

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    /// Every segment left on disk, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// The highest record sequence number in the log (0 if none).
    pub last_seq: u64,
}

/// Replays the log in `dir`: calls `apply(seq, ops)` for every valid record
/// with `seq > after_seq`, in order, truncates a torn tail, and fails on
/// corruption (or, with `repair`, keeps the valid prefix).
pub fn recover(
    fs: &dyn Fs,
    dir: &Path,
    after_seq: u64,
    repair: bool,
    mut apply: impl FnMut(u64, Vec<Op>) -> Result<()>,
) -> Result<Recovered> {
    let mut numbers: Vec<u64> = fs.list(dir).ctx("list", dir)?.iter().filter_map(|n| parse_segment_name(n)).collect();
    numbers.sort_unstable();

    let mut segments = Vec::new();
    let mut last_seq = 0;
    // Set once a torn tail was cut: every later segment must then be empty.
    let mut cut_at: Option<(PathBuf, u64)> = None;
    for &number in &numbers {
        let path = dir.join(segment_name(number));
        if let Some((cut_path, cut_offset)) = &cut_at {
            if segment_has_records(fs, &path)? {
                if !repair {
                    return Err(Error::corrupt(
                        cut_path,
                        *cut_offset,
                        format!("bad WAL record followed by valid records in the later segment {}", path.display()),
                    ));
                }
                tracing::warn!(path = %path.display(), "repair: dropping WAL segment after a bad record");
            }
            fs.remove(&path).ctx("remove", &path)?;
            continue;
        }
        let file = fs.open(&path).ctx("open", &path)?;
        let buf = read_all(file.as_ref()).ctx("read", &path)?;
        let mut segment_last = None;
        let stop = if buf.iter().all(|&b| b == 0) {
            // Pre-allocation was cut short before the magic was written.
            Stop::End
        } else if buf.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(Error::corrupt(&path, 0, "not a Quiver WAL segment (bad magic)"));
        } else {
            let mut failure = None;
            let stop = frame::scan(&buf, MAGIC.len(), |offset, payload| {
                let decoded = decode_prefix(payload).and_then(|(seq, group, ops)| {
                    let ops: Vec<Op> = postcard::from_bytes(ops).ok()?;
                    Some((seq, group, ops))
                });
                let Some((seq, _group, ops)) = decoded else {
                    failure = Some(Error::corrupt(
                        &path,
                        offset as u64,
                        "WAL record passes its checksum but does not decode",
                    ));
                    return false;
                };
                if seq <= last_seq {
                    failure =
                        Some(Error::corrupt(&path, offset as u64, format!("WAL sequence {seq} after {last_seq}")));
                    return false;
                }
                last_seq = seq;
                segment_last = Some(seq);
                if seq > after_seq {
                    if let Err(e) = apply(seq, ops) {
                        failure = Some(e);
                        return false;
                    }
                }
                true
            });
            if let Some(e) = failure {
                return Err(e);
            }
            stop
        };
        if let Stop::Bad { offset, reason } = stop {
            let later_group = frame::valid_records_after(&buf, offset)
                .filter_map(|(_, payload)| decode_prefix(payload))
                .find(|&(seq, group, _)| seq > last_seq && group > last_seq + 1);
            if let Some((seq, _, _)) = later_group {
                if !repair {
                    return Err(Error::corrupt(
                        &path,
                        offset as u64,
                        format!("{reason}; a later, synced record (seq {seq}) follows, so this is not a torn write"),
                    ));
                }
                tracing::warn!(path = %path.display(), offset, "repair: keeping the WAL prefix before a bad record");
            } else {
                tracing::info!(path = %path.display(), offset, %reason, "truncating torn WAL tail");
            }
            file.set_len(offset as u64).ctx("truncate", &path)?;
            file.sync_data().ctx("sync", &path)?;
            cut_at = Some((path.clone(), offset as u64));
        }
        segments.push(SegmentInfo { number, last_seq: segment_last });
    }
    Ok(Recovered { segments, last_seq })
}

fn segment_has_records(fs: &dyn Fs, path: &Path) -> Result<bool> {
    let file = fs.open(path).ctx("open", path)?;
    let buf = read_all(file.as_ref()).ctx("read", path)?;
    let start = if buf.get(..MAGIC.len()) == Some(&MAGIC[..]) { MAGIC.len() } else { 0 };
    Ok(frame::record_at(&buf, start).ok().flatten().is_some()
        || frame::valid_records_after(&buf, start).next().is_some())
}

// ---------------------------------------------------------------------------
// Writing.

/// A pre-allocated segment, open for appending.
#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    file: Box<dyn File>,
    offset: u64,
    capacity: u64,
}

/// Creates, zero-fills and syncs a segment and its directory entry.
/// `capacity` is a multiple of [`DIRECT_ALIGN`].
fn preallocate(fs: &dyn Fs, dir: &Path, number: u64, capacity: u64) -> Result<Segment> {
    let path = dir.join(segment_name(number));
    let file = fs.create(&path).ctx("create", &path)?;
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = 0u64;
    while at < capacity {
        let n = (capacity - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at).ctx("pre-allocate", &path)?;
        at += n as u64;
    }
    file.write_all_at(MAGIC, 0).ctx("write", &path)?;
    file.sync_data().ctx("sync", &path)?;
    fs.sync_dir(dir).ctx("sync directory", dir)?;
    drop(file);
    let file = fs.open_log(&path).ctx("open", &path)?;
    Ok(Segment { number, path, file, offset: MAGIC.len() as u64, capacity })
}

/// `len` rounded up to a whole number of blocks.
fn whole_blocks(len: u64) -> u64 {
    len.div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64
}

/// Appends group commits to the log. Owned by the engine's commit thread.
///
/// Each group is written as whole blocks ([`DIRECT_ALIGN`] bytes, at block
/// offsets), durable when the write returns: from the start of the block the
/// log's data ends in (its bytes written again, unchanged) through the
/// group, padded with zeros to the end of its last block (the segment holds
/// zeros there already). Whole blocks let the real disk take the write with
/// `O_DIRECT` and `RWF_DSYNC`. A write torn by a power cut leaves each sector old
/// or new; the old bytes before the group are the same in both, so only the
/// group, unacknowledged, can be torn.
#[derive(Debug)]
pub struct WalWriter {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    segment_bytes: u64,
    current: Segment,
    /// The next segment, being pre-allocated in the background.
    spare: Option<JoinHandle<Result<Segment>>>,
    /// Starts with the bytes of the current segment's last, partly written
    /// block; what each group is written from.
    blocks: AlignedBuf,
}

impl WalWriter {
    /// Starts a new segment `number` (never appends to an old one).
    pub fn create(fs: Arc<dyn Fs>, dir: &Path, number: u64, segment_bytes: u64) -> Result<WalWriter> {
        let segment_bytes = whole_blocks(segment_bytes.max(1));
        let current = preallocate(fs.as_ref(), dir, number, segment_bytes)?;
        let mut writer = WalWriter {
            fs,
            dir: dir.to_path_buf(),
            segment_bytes,
            current,
            spare: None,
            blocks: AlignedBuf::default(),
        };
        writer.started_segment();
        writer.prepare_spare();
        Ok(writer)
    }

    fn prepare_spare(&mut self) {
        let (fs, dir, number, capacity) =
            (self.fs.clone(), self.dir.clone(), self.current.number + 1, self.segment_bytes);
        let spawned = std::thread::Builder::new()
            .name("quiver-wal-prealloc".into())
            .spawn(move || preallocate(fs.as_ref(), &dir, number, capacity));
        self.spare = spawned.ok();
    }

    /// The segment being written.
    pub fn segment_number(&self) -> u64 {
        self.current.number
    }

    /// A new segment's only bytes so far are its magic.
    fn started_segment(&mut self) {
        self.blocks.get(MAGIC.len(), 0).copy_from_slice(MAGIC);
    }

    /// Writes one group commit (already framed) and returns once it is
    /// durable, with the number of the segment it was written to, which
    /// differs from the previous call's when the log rolled over.
    pub fn append_durable(&mut self, group: &[u8]) -> Result<u64> {
        if self.current.offset + group.len() as u64 > self.current.capacity {
            self.roll(group.len() as u64)?;
        }
        let block_start = self.current.offset / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let kept = (self.current.offset - block_start) as usize;
        let end = kept + group.len();
        let blocks = self.blocks.get(whole_blocks(end as u64) as usize, kept);
        blocks[kept..end].copy_from_slice(group);
        blocks[end..].fill(0);
        self.current.file.write_durable_at(blocks, block_start).ctx("write", &self.current.path)?;
        // The new last block, partly written, goes first for the next group.
        let last_block = end / DIRECT_ALIGN * DIRECT_ALIGN;
        blocks.copy_within(last_block..end, 0);
        self.current.offset += group.len() as u64;
        Ok(self.current.number)
    }

    fn roll(&mut self, needed: u64) -> Result<()> {
        let spare = match self.spare.take().map(JoinHandle::join) {
            Some(Ok(Ok(spare))) if spare.capacity >= needed + MAGIC.len() as u64 => spare,
            Some(Ok(Err(e))) => return Err(e),
            other => {
                // The spare is too small for this group (or its thread died):
                // make one that fits, synchronously.
                if let Some(Ok(Ok(small))) = other {
                    self.fs.remove(&small.path).ctx("remove", &small.path)?;
                }
                let capacity = self.segment_bytes.max(whole_blocks(needed + MAGIC.len() as u64));
                preallocate(self.fs.as_ref(), &self.dir, self.current.number + 1, capacity)?
            }
        };
        self.current = spare;
        self.started_segment();
        self.prepare_spare();
        Ok(())
    }

    /// Waits for the background pre-allocation and removes its unused file.
    pub fn close(mut self) -> Result<()> {
        if let Some(Ok(Ok(spare))) = self.spare.take().map(JoinHandle::join) {
            self.fs.remove(&spare.path).ctx("remove", &spare.path)?;
            self.fs.sync_dir(&self.dir).ctx("sync directory", &self.dir)?;
        }
        Ok(())
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        if let Some(handle) = self.spare.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::RealFs;
    use quiver_ring::{NodeId, Stamper};

    /// Groups of every size, written as whole blocks through `O_DIRECT` on
    /// the real disk (each rewriting the partly filled block before it),
    /// across segment roll-overs and a group larger than a segment, all read
    /// back by recovery, in order and intact.
    #[test]
    fn real_disk_groups_of_any_size_recover_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Fs> = Arc::new(RealFs);
        let mut wal = WalWriter::create(fs.clone(), dir.path(), 1, 2 * DIRECT_ALIGN as u64).unwrap();
        let stamp = Stamper::new(NodeId(1), Default::default()).next(1_000_000);
        let op = |key_len: usize, value_len: usize| Op {
            key: vec![b'k'; key_len],
            version: stamp.blind(Some(vec![(key_len + value_len) as u8; value_len])),
        };
        let mut expected: Vec<(u64, Vec<Op>)> = Vec::new();
        let mut append = |wal: &mut WalWriter, records: Vec<Vec<Op>>| {
            let mut group = Vec::new();
            let first = expected.len() as u64 + 1;
            for ops in records {
                let seq = expected.len() as u64 + 1;
                encode_record(&mut group, seq, first, &postcard::to_allocvec(&ops).unwrap());
                expected.push((seq, ops));
            }
            wal.append_durable(&group).unwrap();
        };
        // Small groups sharing blocks, groups spanning blocks, one larger
        // than a segment, and several roll-overs.
        for (records, value_len) in [(1, 10), (3, 200), (1, 4000), (7, 37), (2, 1500), (1, 20_000), (5, 3), (3, 2500)] {
            append(&mut wal, (0..records).map(|_| vec![op(8, value_len)]).collect());
        }
        // A group ending exactly on a block boundary, then one after it.
        let record_bytes = |key_len: usize| record_len(postcard::to_allocvec(&vec![op(key_len, 4)]).unwrap().len());
        let key_len = (1..2 * DIRECT_ALIGN)
            .find(|&k| (wal.current.offset as usize + record_bytes(k)).is_multiple_of(DIRECT_ALIGN))
            .unwrap();
        append(&mut wal, vec![vec![op(key_len, 4)]]);
        assert_eq!(wal.current.offset % DIRECT_ALIGN as u64, 0);
        append(&mut wal, vec![vec![op(3, 1)], vec![op(5, 0)]]);
        assert!(wal.segment_number() >= 4, "the groups should have rolled over several segments");
        drop(wal);

        let mut recovered = Vec::new();
        let found = recover(fs.as_ref(), dir.path(), 0, false, |seq, ops| {
            recovered.push((seq, ops));
            Ok(())
        })
        .unwrap();
        assert_eq!(found.last_seq, expected.len() as u64);
        assert_eq!(recovered.len(), expected.len());
        for (got, want) in recovered.iter().zip(&expected) {
            assert_eq!(got, want);
        }
    }
}
