//! The write-ahead log.
//!
//! The log is a sequence of segment files named `<number:016>.wal`. Each is
//! ready before it is used, so the durable write of each group commit has no
//! file-size change to record: a segment is either created zero-filled and
//! synced, or **recycled**: a segment whose records are all in tables is not
//! deleted but renamed `<number:016>.walfree` (two are kept, the rest
//! deleted), and the next segment is made from it by rewriting its first
//! block and renaming it. Rewriting a file that already has its blocks
//! costs the device only the new bytes; zero-filling a fresh one writes
//! every byte twice (bulk loads through the network ingest 11-15 % more
//! with recycling).
//!
//! ```text
//! segment := MAGIC (8 bytes) | frame* | zeros | stale bytes
//! frame   := len u32 LE | crc32(salt ++ payload) u32 LE | payload   (see `frame`)
//! salt    := the segment's number, u64 LE (not stored)
//! payload := seq u64 LE | group u64 LE | postcard(Vec<Op>)
//! ```
//!
//! - The salt makes the records a recycled file still holds from its earlier
//!   lives (under smaller numbers: numbers only grow, see
//!   [`Recovered::next_number`]) fail their checksum in its new one.
//! - Each group is written padded with zeros to the end of its block, and
//!   with one more block of zeros when fewer than a frame header's bytes of
//!   padding are left, so a reader always finds zeros (the end) right after
//!   the last record, never stale bytes.
//! - `seq` numbers records from 1, without gaps, across segments.
//! - `group` is the `seq` of the first record of the group commit (one
//!   durable write, see [`WalWriter`]) the record was written in. A group
//!   never spans two segments.
//! - One record holds a whole write or a whole batch, so it applies entirely
//!   or not at all.
//! - Segments of format 1 (magic ending in `\x01`: unsalted checksums, never
//!   recycled) are still read.
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

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::storage::disk::{read_all, AlignedBuf, File, Fs, DIRECT_ALIGN};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::frame::{self, Stop};
use crate::storage::Op;

/// First bytes of every segment written now: name and format version.
/// Format 3: records hold versions v2. Formats 1 and 2
/// held the first version model; their segments are refused.
pub const MAGIC: &[u8; 8] = b"QVWAL\0\0\x03";
/// The format [`MAGIC`] names.
pub const FORMAT: u32 = 3;
/// What every format's magic starts with.
const MAGIC_NAME: &[u8; 7] = b"QVWAL\0\0";
const PAYLOAD_PREFIX: usize = 16;
const ZERO_CHUNK: usize = 1 << 20;
/// Retired segment files kept for recycling; more are deleted.
const FREE_SEGMENTS_KEPT: usize = 2;

/// The file name of segment `number`.
pub fn segment_name(number: u64) -> String {
    format!("{number:016}.wal")
}

/// The number of a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal")?.parse().ok()
}

/// The file name of retired segment `number`, kept for recycling.
pub fn free_segment_name(number: u64) -> String {
    format!("{number:016}.walfree")
}

fn parse_free_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".walfree")?.parse().ok()
}

/// The numbers of the retired segments in `dir`.
fn free_segments(fs: &dyn Fs, dir: &Path) -> Result<Vec<u64>> {
    Ok(fs.list(dir).ctx("list", dir)?.iter().filter_map(|n| parse_free_segment_name(n)).collect())
}

/// The checksum salt of segment `number`'s records.
pub fn salt(number: u64) -> [u8; 8] {
    number.to_le_bytes()
}

/// Appends one framed record of segment `segment` to `out`.
pub fn encode_record(out: &mut Vec<u8>, segment: u64, seq: u64, group: u64, ops: &[u8]) {
    frame::encode(out, &salt(segment), &[&seq.to_le_bytes(), &group.to_le_bytes(), ops]);
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

/// The salt segment `number`'s records were written with, from its magic
/// (`None` if the magic is not this format's).
fn salt_of(buf: &[u8], number: u64) -> Option<Vec<u8>> {
    (buf.get(..MAGIC.len())? == MAGIC).then(|| salt(number).to_vec())
}

/// The format of a segment of an earlier Quiver, from its magic.
fn older_format(buf: &[u8]) -> Option<u32> {
    match buf.get(..MAGIC.len())?.split_last()? {
        (&format, name) if name == MAGIC_NAME && u32::from(format) < FORMAT => Some(u32::from(format)),
        _ => None,
    }
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
    /// The number for the next segment: above every segment's and every
    /// retired segment's, so no file holds records salted with it.
    pub next_number: u64,
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
    let names = fs.list(dir).ctx("list", dir)?;
    let mut numbers: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    numbers.sort_unstable();
    let free_max = names.iter().filter_map(|n| parse_free_segment_name(n)).max();
    let next_number = numbers.last().copied().max(free_max).map_or(1, |n| n + 1);

    let mut segments = Vec::new();
    let mut last_seq = 0;
    // Set once a torn tail was cut: every later segment must then be empty.
    let mut cut_at: Option<(PathBuf, u64)> = None;
    // Bytes of log from the cut on: no record past the cut is further ahead
    // of `last_seq` than that (each takes more than a byte).
    let mut room_after_cut = 0;
    for &number in &numbers {
        let path = dir.join(segment_name(number));
        if let Some((cut_path, cut_offset)) = &cut_at {
            if segment_has_records(fs, &path, number, last_seq, &mut room_after_cut)? {
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
        let mut salt = Vec::new();
        if let Some(found) = older_format(&buf) {
            return Err(Error::OldFormat { path, what: "a WAL segment of", found, reads: FORMAT });
        }
        let stop = if buf.iter().all(|&b| b == 0) {
            // Pre-allocation was cut short before the magic was written.
            Stop::End
        } else if let Some(found) = salt_of(&buf, number) {
            salt = found;
            let mut failure = None;
            let stop = frame::scan(&buf, &salt, MAGIC.len(), |offset, payload| {
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
        } else {
            return Err(Error::corrupt(&path, 0, "not a Quiver WAL segment (bad magic)"));
        };
        if let Stop::Bad { offset, reason } = stop {
            // A record of a later group than the bad one (which started at
            // `last_seq + 1`), within this segment.
            let room = buf.len() as u64;
            let later_group = frame::valid_records_after(&buf, &salt, offset, |payload| {
                could_be_later(payload, last_seq, last_seq + 1, room)
            })
            .find_map(|(_, payload)| decode_prefix(payload));
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
            room_after_cut = (buf.len() - offset) as u64;
        }
        segments.push(SegmentInfo { number, last_seq: segment_last });
    }
    Ok(Recovered { segments, last_seq, next_number })
}

/// Whether `payload`, not yet checksummed, could be a record written after
/// the one with `last_seq`, in a group that started after `group_after`, with
/// no more than `room` bytes of log between them (a record takes more than a
/// byte): its numbers are in range and its operations decode, exactly.
///
/// Recovery looks for such records at every offset after a bad one, and
/// this is checked before the checksum, which costs the record's claimed
/// length. In a recycled segment's stale bytes, lengths and sequence numbers
/// read at offsets shifted from the old records' own often pass every
/// numeric check, and claim megabytes: checksummed, a 64 MiB segment took
/// minutes to read past a torn write.
fn could_be_later(payload: &[u8], last_seq: u64, group_after: u64, room: u64) -> bool {
    numbers_could_be_later(payload, last_seq, group_after, room)
        && decode_prefix(payload)
            .is_some_and(|(_, _, ops)| postcard::take_from_bytes::<Vec<Op>>(ops).is_ok_and(|(_, rest)| rest.is_empty()))
}

/// The numeric half of [`could_be_later`]: `payload`'s sequence and group
/// numbers are in range.
fn numbers_could_be_later(payload: &[u8], last_seq: u64, group_after: u64, room: u64) -> bool {
    decode_prefix(payload)
        .is_some_and(|(seq, group, _)| group > group_after && seq > last_seq && seq - last_seq <= room)
}

/// Whether segment `number`, after a torn tail was cut in an earlier one,
/// holds a record written after the last one kept (`last_seq`). `room` is the
/// bytes of log from the cut up to this segment, and grows by its length.
fn segment_has_records(fs: &dyn Fs, path: &Path, number: u64, last_seq: u64, room: &mut u64) -> Result<bool> {
    let file = fs.open(path).ctx("open", path)?;
    let buf = read_all(file.as_ref()).ctx("read", path)?;
    *room += buf.len() as u64;
    let room = *room;
    let later = |payload: &[u8]| could_be_later(payload, last_seq, 0, room);
    let (start, salts) = match salt_of(&buf, number) {
        Some(found) => (MAGIC.len(), vec![found]),
        // An unknown magic: look for records anyway.
        None => (0, vec![salt(number).to_vec()]),
    };
    Ok(salts.iter().any(|salt| {
        frame::record_at(&buf, salt, start).ok().flatten().is_some()
            || frame::valid_records_after(&buf, salt, start, later).next().is_some()
    }))
}

/// Retires segments whose records are all in tables: keeps up to
/// [`FREE_SEGMENTS_KEPT`] of them (with those already retired) for recycling,
/// renamed `<number>.walfree`, and deletes the rest. Syncs the directory.
pub fn retire(fs: &dyn Fs, dir: &Path, numbers: &[u64]) -> Result<()> {
    if numbers.is_empty() {
        return Ok(());
    }
    let mut free = free_segments(fs, dir)?.len();
    for &number in numbers {
        let path = dir.join(segment_name(number));
        let done = if free < FREE_SEGMENTS_KEPT {
            let renamed = fs.rename(&path, &dir.join(free_segment_name(number)));
            free += usize::from(renamed.is_ok());
            renamed
        } else {
            fs.remove(&path)
        };
        match done {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).ctx("retire", &path),
            _ => {}
        }
    }
    fs.sync_dir(dir).ctx("sync directory", dir)
}

// ---------------------------------------------------------------------------
// Writing.

/// A segment ready for appending.
#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    file: Box<dyn File>,
    offset: u64,
    capacity: u64,
    /// Made from a retired segment rather than zero-filled.
    recycled: bool,
}

/// Makes segment `number` of at least `capacity` bytes (a multiple of
/// [`DIRECT_ALIGN`]): recycled from a retired one if one is large enough,
/// else created zero-filled (also when recycling fails: a retired file is
/// never needed).
fn prepare(fs: &dyn Fs, dir: &Path, number: u64, capacity: u64) -> Result<Segment> {
    match recycle(fs, dir, number, capacity) {
        Ok(Some(segment)) => Ok(segment),
        Ok(None) => preallocate(fs, dir, number, capacity),
        Err(error) => {
            tracing::warn!(%error, "recycling a retired WAL segment failed; creating a new one");
            preallocate(fs, dir, number, capacity)
        }
    }
}

/// Takes a retired segment file, if there is one: rewrites its first block
/// (the magic, then zeros) durably, then renames it segment `number`, so
/// that under its new name it never holds the old magic. The records it
/// still holds from its earlier life are salted with smaller numbers. A
/// file too small (a truncated segment) is deleted instead.
fn recycle(fs: &dyn Fs, dir: &Path, number: u64, capacity: u64) -> Result<Option<Segment>> {
    let Some(free) = free_segments(fs, dir)?.into_iter().min() else {
        return Ok(None);
    };
    let from = dir.join(free_segment_name(free));
    let file = fs.open_log(&from).ctx("open", &from)?;
    let len = file.len().ctx("size", &from)?;
    if len < capacity || !len.is_multiple_of(DIRECT_ALIGN as u64) {
        drop(file);
        fs.remove(&from).ctx("remove", &from)?;
        return Ok(None);
    }
    let mut header = AlignedBuf::default();
    let block = header.get(DIRECT_ALIGN, 0);
    block.fill(0);
    // Writing: a block is far longer than the magic.
    #[allow(clippy::indexing_slicing)]
    block[..MAGIC.len()].copy_from_slice(MAGIC);
    file.write_durable_at(block, 0).ctx("write", &from)?;
    let path = dir.join(segment_name(number));
    fs.rename(&from, &path).ctx("rename", &from)?;
    fs.sync_dir(dir).ctx("sync directory", dir)?;
    Ok(Some(Segment { number, path, file, offset: MAGIC.len() as u64, capacity: len, recycled: true }))
}

/// Creates, zero-fills and syncs a segment and its directory entry; a
/// segment it could not finish (the disk filled up) is removed again, so no
/// half-made segment is left for recovery to read.
fn preallocate(fs: &dyn Fs, dir: &Path, number: u64, capacity: u64) -> Result<Segment> {
    let path = dir.join(segment_name(number));
    let made = make_zeroed(fs, dir, &path, capacity);
    if made.is_err() {
        let _ = fs.remove(&path);
    }
    let file = made?;
    drop(file);
    let file = fs.open_log(&path).ctx("open", &path)?;
    Ok(Segment { number, path, file, offset: MAGIC.len() as u64, capacity, recycled: false })
}

/// `path`, created, zero-filled to `capacity` after the magic, synced, with
/// its directory entry synced.
fn make_zeroed(fs: &dyn Fs, dir: &Path, path: &Path, capacity: u64) -> Result<Box<dyn File>> {
    let file = fs.create(path).ctx("create", path)?;
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = 0u64;
    while at < capacity {
        let n = (capacity - at).min(ZERO_CHUNK as u64) as usize;
        // Writing: `n <= ZERO_CHUNK`, the length of `zeros`.
        #[allow(clippy::indexing_slicing)]
        file.write_all_at(&zeros[..n], at).ctx("pre-allocate", path)?;
        at += n as u64;
    }
    file.write_all_at(MAGIC, 0).ctx("write", path)?;
    file.sync_data().ctx("sync", path)?;
    fs.sync_dir(dir).ctx("sync directory", dir)?;
    Ok(file)
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
/// group, padded with zeros to the end of its last block (and one block
/// more when that leaves less than a frame header: see the module's
/// format). Whole blocks let the real disk take the write with `O_DIRECT`
/// and `RWF_DSYNC`. A write torn by a power cut leaves each sector old or
/// new; the old bytes before the group are the same in both, so only the
/// group, unacknowledged, can be torn.
#[derive(Debug)]
pub struct WalWriter {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    segment_bytes: u64,
    /// `None` until a first segment could be made (a node started on a
    /// full disk, or out of file descriptors).
    current: Option<Segment>,
    /// The number of the segment being written, or of the first one.
    number: u64,
    /// After a segment could not be made for want of space or descriptors:
    /// when to try again, the wait after the next failure, and why.
    retry: Option<Retry>,
    /// The next segment, being made ready in the background.
    spare: Option<JoinHandle<Result<Segment>>>,
    /// Starts with the bytes of the current segment's last, partly written
    /// block; what each group is written from.
    blocks: AlignedBuf,
    /// The group being framed.
    group: Vec<u8>,
    /// Counts the segments written that were recycled.
    recycled: Arc<AtomicU64>,
}

/// When a segment is next tried, after one could not be made.
#[derive(Debug)]
struct Retry {
    at: Instant,
    backoff: Duration,
    /// The error, its kind kept to answer the writes refused meanwhile.
    op: &'static str,
    path: PathBuf,
    errno: Option<i32>,
}

/// The wait before trying again to make a segment, after the first
/// failure and at most: short, since writes are refused meanwhile.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(10);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl WalWriter {
    /// Starts a new segment `number` (never appends to an old one); counts
    /// the recycled segments it writes in `recycled`. Out of space or file
    /// descriptors, it starts without one and makes it with the first
    /// write that finds them back (the writes before are refused with
    /// [`Error::OutOf`]), so an engine opens, and serves reads, on a full
    /// disk.
    pub fn create(
        fs: Arc<dyn Fs>,
        dir: &Path,
        number: u64,
        segment_bytes: u64,
        recycled: Arc<AtomicU64>,
    ) -> Result<WalWriter> {
        let segment_bytes = whole_blocks(segment_bytes.max(1));
        let mut writer = WalWriter {
            fs,
            dir: dir.to_path_buf(),
            segment_bytes,
            current: None,
            number,
            retry: None,
            spare: None,
            blocks: AlignedBuf::default(),
            group: Vec::new(),
            recycled,
        };
        match prepare(writer.fs.as_ref(), dir, number, segment_bytes).map_err(Error::exhaustion_passes) {
            Ok(segment) => writer.start(segment),
            Err(error @ Error::OutOf { .. }) => {
                tracing::warn!(%error, "no WAL segment could be made: writes are refused until one can be");
                writer.retry_later(&error);
            }
            Err(error) => return Err(error),
        }
        Ok(writer)
    }

    fn prepare_spare(&mut self) {
        let (fs, dir, number, capacity) = (self.fs.clone(), self.dir.clone(), self.number + 1, self.segment_bytes);
        let spawned = std::thread::Builder::new()
            .name("quiver-wal-prealloc".into())
            .spawn(move || prepare(fs.as_ref(), &dir, number, capacity));
        self.spare = spawned.ok();
    }

    /// The segment being written (tests).
    #[cfg(test)]
    fn current(&self) -> &Segment {
        self.current.as_ref().expect("a segment is being written")
    }

    /// The segment being written (or the first one to be).
    pub fn segment_number(&self) -> u64 {
        self.number
    }

    /// Writes go to `segment` from now on: its only bytes so far are its
    /// magic. The next one is made ready meanwhile.
    fn start(&mut self, segment: Segment) {
        if segment.recycled {
            self.recycled.fetch_add(1, Ordering::Relaxed);
        }
        self.number = segment.number;
        self.current = Some(segment);
        self.retry = None;
        self.blocks.get(MAGIC.len(), 0).copy_from_slice(MAGIC);
        self.prepare_spare();
    }

    /// No segment could be made for `error` (out of something): the next
    /// try waits, twice as long as the last one up to a second.
    fn retry_later(&mut self, error: &Error) {
        let backoff = self.retry.as_ref().map_or(RETRY_BACKOFF_MIN, |r| (r.backoff * 2).min(RETRY_BACKOFF_MAX));
        let (op, path, errno) = match error {
            Error::OutOf { op, path, source } => (*op, path.clone(), source.raw_os_error()),
            _ => ("make", self.dir.clone(), None),
        };
        self.retry = Some(Retry { at: Instant::now() + backoff, backoff, op, path, errno });
    }

    /// The error that refuses writes until the next try.
    fn still_out(&self, retry: &Retry) -> Error {
        let source = match retry.errno {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::other("out of resources"),
        };
        Error::OutOf { op: retry.op, path: retry.path.clone(), source }
    }

    /// Writes one group commit: a record for each of `records` (encoded
    /// ops), numbered from `first_seq`, and returns once it is durable, with
    /// the number of the segment it was written to, which differs from the
    /// previous call's when the log rolled over.
    pub fn append_group<'a>(&mut self, first_seq: u64, records: impl Iterator<Item = &'a [u8]> + Clone) -> Result<u64> {
        let len: u64 = records.clone().map(|ops| record_len(ops.len()) as u64).sum();
        if self.current.as_ref().is_none_or(|current| current.offset + len > current.capacity) {
            self.roll(len)?;
        }
        let mut group = std::mem::take(&mut self.group);
        group.clear();
        for (i, ops) in records.enumerate() {
            encode_record(&mut group, self.number, first_seq + i as u64, first_seq, ops);
        }
        debug_assert_eq!(group.len() as u64, len);
        let written = self.append_durable(&group);
        self.group = group;
        written
    }

    /// Writes one framed group and returns once it is durable.
    fn append_durable(&mut self, group: &[u8]) -> Result<u64> {
        let Some(current) = self.current.as_mut() else {
            return Err(Error::Failed("no WAL segment to write to".into()));
        };
        let block_start = current.offset / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let kept = (current.offset - block_start) as usize;
        let end = kept + group.len();
        let mut len = whole_blocks(end as u64);
        // Fewer zeros than a frame header after the group: the next record's
        // header would run into the next block, which in a recycled segment
        // holds stale bytes. Zero that block too (if the segment has it).
        if len - (end as u64) < frame::HEADER_LEN as u64 && block_start + len < current.capacity {
            len += DIRECT_ALIGN as u64;
        }
        let blocks = self.blocks.get(len as usize, kept);
        // Writing: `len` covers the group, `kept + group.len() == end`.
        #[allow(clippy::indexing_slicing)]
        {
            blocks[kept..end].copy_from_slice(group);
            blocks[end..].fill(0);
        }
        current.file.write_durable_at(blocks, block_start).ctx("write", &current.path)?;
        // The new last block, partly written, goes first for the next group.
        let last_block = end / DIRECT_ALIGN * DIRECT_ALIGN;
        blocks.copy_within(last_block..end, 0);
        current.offset += group.len() as u64;
        Ok(current.number)
    }

    /// Moves to the next segment (the first, if there is none yet), with
    /// room for `needed` bytes. Nothing is written to the log here: a
    /// failure for want of space or descriptors is [`Error::OutOf`], the
    /// group that needed the room is refused, and the engine goes on (the
    /// next group tries again, after a short wait).
    fn roll(&mut self, needed: u64) -> Result<()> {
        if let Some(retry) = &self.retry {
            if Instant::now() < retry.at {
                return Err(self.still_out(retry));
            }
        }
        let next = if self.current.is_some() { self.number + 1 } else { self.number };
        let made = self.next_segment(next, needed).map_err(Error::exhaustion_passes);
        match made {
            Ok(segment) => {
                self.start(segment);
                Ok(())
            }
            Err(error) => {
                if matches!(error, Error::OutOf { .. }) {
                    tracing::warn!(%error, "no new WAL segment: writes are refused until one can be made");
                    self.retry_later(&error);
                }
                Err(error)
            }
        }
    }

    /// Segment `number` with room for `needed`: the one made ready in the
    /// background if it is that one and large enough, else one made here.
    fn next_segment(&mut self, number: u64, needed: u64) -> Result<Segment> {
        match self.spare.take().map(JoinHandle::join) {
            Some(Ok(Ok(spare))) if spare.number == number && spare.capacity >= needed + MAGIC.len() as u64 => {
                return Ok(spare)
            }
            // Too small for this group (or another number): made again.
            Some(Ok(Ok(other))) => self.fs.remove(&other.path).ctx("remove", &other.path)?,
            // It failed (out of space, say) or its thread died: tried again.
            Some(Ok(Err(_))) | Some(Err(_)) | None => {}
        }
        let capacity = self.segment_bytes.max(whole_blocks(needed + MAGIC.len() as u64));
        prepare(self.fs.as_ref(), &self.dir, number, capacity)
    }

    /// Waits for the background preparation and retires its unused file.
    pub fn close(mut self) -> Result<()> {
        if let Some(Ok(Ok(spare))) = self.spare.take().map(JoinHandle::join) {
            retire(self.fs.as_ref(), &self.dir, &[spare.number])?;
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
    use crate::storage::disk::{RealFs, SimFs};
    use quiver_ring::{NodeId, Stamper};

    /// One op (a key of `key_len` bytes set to `value_len` bytes), encoded.
    fn one_op(key_len: usize, value_len: usize) -> Vec<u8> {
        let stamp =
            Stamper::new(NodeId(1), Default::default(), u64::MAX).next(1_000_000).expect("a test clock never refuses");
        let op = Op { key: vec![b'k'; key_len], version: stamp.blind(Some(vec![7; value_len])) };
        postcard::to_allocvec(&vec![op]).unwrap()
    }

    /// Fills segment 1 with records (seqs from 1) and retires it, with the
    /// writer's unused spare (segment 2, zero-filled): `1.walfree` is then a
    /// file full of valid-looking records of an earlier life. Returns the
    /// next free sequence number.
    fn stale_free_segment(fs: &Arc<dyn Fs>, dir: &Path) -> u64 {
        let mut old = WalWriter::create(fs.clone(), dir, 1, 4 * DIRECT_ALIGN as u64, Arc::default()).unwrap();
        let ops = one_op(8, 100);
        let mut seq = 1;
        while old.current().offset + record_len(ops.len()) as u64 <= old.current().capacity {
            old.append_group(seq, std::iter::once(ops.as_slice())).unwrap();
            seq += 1;
        }
        old.close().unwrap();
        retire(fs.as_ref(), dir, &[1]).unwrap();
        let mut names = fs.list(dir).unwrap();
        names.sort();
        assert_eq!(names, [free_segment_name(1), free_segment_name(2)]);
        // With no segment left, numbering still goes on above the retired
        // ones: their old records are salted with their old numbers.
        assert_eq!(recover(fs.as_ref(), dir, 0, false, |_, _| Ok(())).unwrap().next_number, 3);
        seq
    }

    /// Sequence numbers recovery replays from `fs`.
    fn replayed(fs: &dyn Fs, dir: &Path) -> Result<Vec<u64>> {
        let mut seqs = Vec::new();
        recover(fs, dir, 0, false, |seq, _| {
            seqs.push(seq);
            Ok(())
        })?;
        Ok(seqs)
    }

    /// A recycled segment still holds its earlier life's records, with
    /// valid checksums under that life's salt. Cut at every byte of its new
    /// records, or torn there with the old bytes after the cut (what a power
    /// cut leaves of a write to a recycled file), recovery replays exactly
    /// the new records before the cut, never an old one.
    #[test]
    fn a_recycled_segment_cut_or_torn_anywhere_replays_only_its_own_records() {
        let sim = SimFs::new();
        let fs: Arc<dyn Fs> = Arc::new(sim.clone());
        let dir = Path::new("/wal");
        let seq = stale_free_segment(&fs, dir) + 100;
        let stale = sim.get(&dir.join(free_segment_name(1))).unwrap();

        let recycled = Arc::new(AtomicU64::new(0));
        let mut wal = WalWriter::create(fs.clone(), dir, 3, 4 * DIRECT_ALIGN as u64, recycled.clone()).unwrap();
        assert_eq!(recycled.load(Ordering::Relaxed), 1);
        let path = dir.join(segment_name(3));
        let before = sim.get(&path).unwrap();
        assert_eq!(before.len(), stale.len(), "segment 3 should be the recycled segment 1");
        assert_eq!(before[DIRECT_ALIGN..], stale[DIRECT_ALIGN..], "its old records are still there");
        assert_eq!(before[..MAGIC.len()], MAGIC[..]);
        assert!(before[MAGIC.len()..DIRECT_ALIGN].iter().all(|&b| b == 0), "its first block was rewritten");

        let mut expected = Vec::new();
        let mut ends = Vec::new();
        for (records, value_len) in [(1, 10), (3, 200), (1, 1500), (2, 37), (1, 3000), (4, 5), (1, 700), (2, 90)] {
            let encoded: Vec<Vec<u8>> = (0..records).map(|i| one_op(8 + i, value_len)).collect();
            let mut offset = wal.current().offset as usize;
            for ops in &encoded {
                offset += record_len(ops.len());
                ends.push(offset);
                expected.push(seq + expected.len() as u64);
            }
            wal.append_group(seq + expected.len() as u64 - records as u64, encoded.iter().map(Vec::as_slice)).unwrap();
        }
        assert_eq!(wal.segment_number(), 3, "the groups should fit in the segment");
        drop(wal);
        let after = sim.get(&path).unwrap();

        for cut in MAGIC.len()..=ends.last().unwrap() + 16 {
            let torn = [&after[..cut], &before[cut..]].concat();
            for (model, bytes) in [("cut", after[..cut].to_vec()), ("torn", torn)] {
                // Whole: the records whose bytes are all there (old bytes
                // after a torn cut may happen to equal the new ones).
                let whole = ends.iter().filter(|&&end| bytes.get(..end) == Some(&after[..end])).count();
                let image = sim.crash();
                image.put(&path, bytes);
                if model == "torn" {
                    // The next segment, made ready from another retired
                    // file while this one was written: only old records.
                    image.put(&dir.join(segment_name(4)), before.clone());
                }
                let seqs = replayed(&image, dir).unwrap_or_else(|e| panic!("{model} at {cut}: {e}"));
                assert_eq!(seqs, expected[..whole], "{model} at {cut}");
            }
        }
    }

    /// Past a torn write in a recycled segment, recovery looks for later
    /// records at every offset of the segment's stale bytes. Read at offsets
    /// shifted from the old records' own, lengths and sequence numbers pass
    /// every numeric check and claim up to megabytes each to checksum (a
    /// 64 MiB segment took minutes). Their operations must also decode,
    /// exactly, and none do: not one offset is checksummed.
    #[test]
    fn stale_bytes_past_a_torn_write_offer_nothing_to_checksum() {
        let sim = SimFs::new();
        let fs: Arc<dyn Fs> = Arc::new(sim.clone());
        let dir = Path::new("/wal");
        let size = 1 << 20;
        let mut old = WalWriter::create(fs.clone(), dir, 1, size, Arc::default()).unwrap();
        let mut seq = 1;
        let mut random = 0x9e37_79b9_7f4a_7c15_u64;
        loop {
            let group: Vec<Vec<u8>> = (seq..seq + 32)
                .map(|n| {
                    let value = (0..100)
                        .map(|_| {
                            random ^= random << 13;
                            random ^= random >> 7;
                            random ^= random << 17;
                            random as u8
                        })
                        .collect();
                    let stamp = Stamper::new(NodeId(1), Default::default(), u64::MAX)
                        .next(1_000_000 + n)
                        .expect("a test clock never refuses");
                    let op = Op { key: format!("key{n:012}").into_bytes(), version: stamp.blind(Some(value)) };
                    postcard::to_allocvec(&vec![op]).unwrap()
                })
                .collect();
            let bytes: usize = group.iter().map(|ops| record_len(ops.len())).sum();
            if old.current().offset + bytes as u64 + DIRECT_ALIGN as u64 > old.current().capacity {
                break;
            }
            old.append_group(seq, group.iter().map(Vec::as_slice)).unwrap();
            seq += 32;
        }
        old.close().unwrap();
        retire(fs.as_ref(), dir, &[1]).unwrap();
        let mut wal = WalWriter::create(fs.clone(), dir, 3, size, Arc::default()).unwrap();
        let ops = one_op(8, 100);
        for i in 0..3 {
            wal.append_group(seq + i, std::iter::once(ops.as_slice())).unwrap();
        }
        drop(wal);
        let path = dir.join(segment_name(3));
        let mut bytes = sim.get(&path).unwrap();
        let bad = MAGIC.len() + 2 * record_len(ops.len());
        bytes[bad + frame::HEADER_LEN + 3] ^= 0xff;

        let last_seq = seq + 1;
        let room = bytes.len() as u64;
        let numbers_pass = std::cell::Cell::new(0);
        let _ = frame::valid_records_after(&bytes, &salt(3), bad, |payload| {
            let pass = numbers_could_be_later(payload, last_seq, last_seq + 1, room);
            numbers_pass.set(numbers_pass.get() + usize::from(pass));
            false
        })
        .count();
        let numbers_pass = numbers_pass.get();
        assert!(numbers_pass > 1000, "the stale bytes should hold the trap: {numbers_pass}");
        let checksummed = std::cell::Cell::new(0);
        let found = frame::valid_records_after(&bytes, &salt(3), bad, |payload| {
            let wanted = could_be_later(payload, last_seq, last_seq + 1, room);
            checksummed.set(checksummed.get() + usize::from(wanted));
            wanted
        })
        .count();
        assert_eq!((found, checksummed.get()), (0, 0));

        let image = sim.crash();
        image.put(&path, bytes);
        assert_eq!(replayed(&image, dir).unwrap(), [seq, seq + 1], "a torn tail, cut");
    }

    /// A bad record at the end of one segment, with a record of a later
    /// group in the next segment, is corruption (that group was synced after
    /// the bad one was), wherever in the next segment the record lies; with
    /// only zeros or stale records there, a torn tail.
    #[test]
    fn a_bad_record_followed_by_a_record_in_the_next_segment_is_corruption() {
        let ops = one_op(8, 20);
        let segment = |number: u64, records: &[(u64, usize)], damaged: Option<u64>| {
            let mut bytes = MAGIC.to_vec();
            for &(seq, at) in records {
                bytes.resize(bytes.len().max(at), 0);
                let start = bytes.len();
                encode_record(&mut bytes, number, seq, seq, &ops);
                if damaged == Some(seq) {
                    bytes[start + frame::HEADER_LEN + 1] ^= 0xff;
                }
            }
            bytes.resize(4 * DIRECT_ALIGN, 0);
            bytes
        };
        let dir = Path::new("/wal");
        let first = segment(1, &[(1, 0), (2, 0), (3, 0)], Some(3));
        for (next, corrupt) in [
            (segment(2, &[(4, 0)], None), true),
            (segment(2, &[(4, 2 * DIRECT_ALIGN + 5)], None), true),
            (segment(2, &[], None), false),
            // Records of an earlier life: salted with another number.
            (segment(7, &[(9, 0), (10, 0)], None), false),
        ] {
            let sim = SimFs::new();
            sim.put(&dir.join(segment_name(1)), first.clone());
            sim.put(&dir.join(segment_name(2)), next);
            match replayed(&sim, dir) {
                Ok(seqs) => assert!(!corrupt && seqs == [1, 2], "{seqs:?}"),
                Err(error) => assert!(corrupt && error.to_string().contains("later segment"), "{error}"),
            }
        }
    }

    /// A retired segment that cannot be recycled (here a directory in its
    /// place) does not stop the log: the segment is created zero-filled.
    #[test]
    fn a_retired_segment_that_cannot_be_reused_falls_back_to_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(free_segment_name(1))).unwrap();
        let fs: Arc<dyn Fs> = Arc::new(RealFs);
        let recycled = Arc::new(AtomicU64::new(0));
        let mut wal = WalWriter::create(fs.clone(), dir.path(), 2, 2 * DIRECT_ALIGN as u64, recycled.clone()).unwrap();
        wal.append_group(1, std::iter::once(one_op(4, 10).as_slice())).unwrap();
        drop(wal);
        assert_eq!(recycled.load(Ordering::Relaxed), 0);
        assert_eq!(replayed(fs.as_ref(), dir.path()).unwrap(), [1]);
    }

    /// Retired segments from a node that ran with another segment size: a
    /// smaller one is deleted and a new segment made zero-filled; a larger
    /// one is reused whole.
    #[test]
    fn a_retired_segment_of_another_size_is_reused_only_if_large_enough() {
        for (retired_blocks, reused) in [(2, false), (8, true)] {
            let sim = SimFs::new();
            let fs: Arc<dyn Fs> = Arc::new(sim.clone());
            let dir = Path::new("/wal");
            let mut old =
                WalWriter::create(fs.clone(), dir, 1, retired_blocks * DIRECT_ALIGN as u64, Arc::default()).unwrap();
            old.append_group(1, std::iter::once(one_op(4, 10).as_slice())).unwrap();
            old.close().unwrap();
            retire(fs.as_ref(), dir, &[1]).unwrap();

            let recycled = Arc::new(AtomicU64::new(0));
            let mut wal = WalWriter::create(fs.clone(), dir, 3, 4 * DIRECT_ALIGN as u64, recycled.clone()).unwrap();
            wal.append_group(2, std::iter::once(one_op(4, 10).as_slice())).unwrap();
            let capacity = wal.current().capacity;
            drop(wal);
            assert_eq!(recycled.load(Ordering::Relaxed), u64::from(reused), "{retired_blocks} blocks");
            let expected_blocks = if reused { retired_blocks } else { 4 };
            assert_eq!(capacity, expected_blocks * DIRECT_ALIGN as u64);
            assert!(sim.get(&dir.join(free_segment_name(1))).is_none(), "{retired_blocks} blocks");
            assert_eq!(replayed(&sim, dir).unwrap(), [2]);
        }
    }

    /// Segments of formats 1 and 2 hold versions of the first model: they
    /// are refused with a message that says so, never misread.
    #[test]
    fn a_segment_of_an_earlier_format_is_refused_clearly() {
        for format in [1u8, 2] {
            let sim = SimFs::new();
            let dir = Path::new("/wal");
            let mut bytes = b"QVWAL\0\0".to_vec();
            bytes.push(format);
            bytes.resize(2 * DIRECT_ALIGN, 0);
            sim.put(&dir.join(segment_name(5)), bytes);
            let error = recover(&sim, dir, 0, false, |_, _| Ok(())).unwrap_err();
            assert!(matches!(error, Error::OldFormat { found, reads: 3, .. } if found == u32::from(format)), "{error}");
            assert!(error.to_string().contains("written by an earlier Quiver"), "{error}");
        }
    }

    /// After a group that leaves fewer zeros in its last block than a frame
    /// header takes, the writer zeros the next block too: otherwise, in a
    /// recycled segment, the reader would take the old bytes there for a bad
    /// record, and with a later segment holding records, for corruption.
    #[test]
    fn a_group_ending_at_a_block_end_in_a_recycled_segment_is_read_as_its_end() {
        for gap in [0, 1, 7, 8, 9, 100] {
            let sim = SimFs::new();
            let fs: Arc<dyn Fs> = Arc::new(sim.clone());
            let dir = Path::new("/wal");
            let seq = stale_free_segment(&fs, dir);
            let mut wal = WalWriter::create(fs.clone(), dir, 3, 4 * DIRECT_ALIGN as u64, Arc::default()).unwrap();
            wal.append_group(seq, std::iter::once(one_op(8, 50).as_slice())).unwrap();
            // One record that leaves `gap` bytes in its block.
            let offset = wal.current().offset as usize;
            let ops = (0..2 * DIRECT_ALIGN)
                .map(|value_len| one_op(8, value_len))
                .find(|ops| (offset + record_len(ops.len())) % DIRECT_ALIGN == (DIRECT_ALIGN - gap) % DIRECT_ALIGN)
                .unwrap();
            wal.append_group(seq + 1, std::iter::once(ops.as_slice())).unwrap();
            // A group too large for what is left: the log rolls over.
            let large = one_op(8, 4 * DIRECT_ALIGN - 200);
            wal.append_group(seq + 2, std::iter::once(large.as_slice())).unwrap();
            assert_eq!(wal.segment_number(), 4);
            drop(wal);
            let seqs = replayed(&sim.crash(), dir).unwrap_or_else(|e| panic!("gap {gap}: {e}"));
            assert_eq!(seqs, [seq, seq + 1, seq + 2], "gap {gap}");
        }
    }

    /// Groups of every size, written as whole blocks through `O_DIRECT` on
    /// the real disk (each rewriting the partly filled block before it),
    /// across segment roll-overs and a group larger than a segment, all read
    /// back by recovery, in order and intact.
    #[test]
    fn real_disk_groups_of_any_size_recover_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Fs> = Arc::new(RealFs);
        let mut wal = WalWriter::create(fs.clone(), dir.path(), 1, 2 * DIRECT_ALIGN as u64, Arc::default()).unwrap();
        let stamp =
            Stamper::new(NodeId(1), Default::default(), u64::MAX).next(1_000_000).expect("a test clock never refuses");
        let op = |key_len: usize, value_len: usize| Op {
            key: vec![b'k'; key_len],
            version: stamp.blind(Some(vec![(key_len + value_len) as u8; value_len])),
        };
        let mut expected: Vec<(u64, Vec<Op>)> = Vec::new();
        let mut append = |wal: &mut WalWriter, records: Vec<Vec<Op>>| {
            let first = expected.len() as u64 + 1;
            let encoded: Vec<Vec<u8>> = records.iter().map(|ops| postcard::to_allocvec(ops).unwrap()).collect();
            for ops in records {
                expected.push((expected.len() as u64 + 1, ops));
            }
            wal.append_group(first, encoded.iter().map(Vec::as_slice)).unwrap();
        };
        // Small groups sharing blocks, groups spanning blocks, one larger
        // than a segment, and several roll-overs.
        for (records, value_len) in [(1, 10), (3, 200), (1, 4000), (7, 37), (2, 1500), (1, 20_000), (5, 3), (3, 2500)] {
            append(&mut wal, (0..records).map(|_| vec![op(8, value_len)]).collect());
        }
        // A group ending exactly on a block boundary, then one after it.
        let record_bytes = |key_len: usize| record_len(postcard::to_allocvec(&vec![op(key_len, 4)]).unwrap().len());
        let key_len = (1..2 * DIRECT_ALIGN)
            .find(|&k| (wal.current().offset as usize + record_bytes(k)).is_multiple_of(DIRECT_ALIGN))
            .unwrap();
        append(&mut wal, vec![vec![op(key_len, 4)]]);
        assert_eq!(wal.current().offset % DIRECT_ALIGN as u64, 0);
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
