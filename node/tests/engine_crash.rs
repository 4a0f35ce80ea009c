//! Crash images: the WAL cut at every byte and damaged in the middle, the
//! skip-write fault, and hand-built torn group commits.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{tiny_options, Writer};
use quiver_node::storage::disk::{File, Fs, SimFs, SkipWriteFs};
use quiver_node::storage::{frame, wal, Engine, Error, Options};
use quiver_ring::Hlc;

const DIR: &str = "/db";

/// Options under which nothing is flushed: all data stays in one segment.
fn wal_only() -> Options {
    Options { memtable_bytes_max: 64 << 20, wal_segment_bytes: 1 << 20, ..Options::default() }
}

/// One acknowledged write: the keys it set and their value.
struct Record {
    keys: Vec<Vec<u8>>,
    value: Vec<u8>,
}

/// Writes 40 records (every fourth a 5-key batch), one group commit each,
/// and returns the crash image, the WAL segment path and the records.
fn build_image() -> (SimFs, PathBuf, Vec<Record>) {
    let fs = SimFs::new();
    let engine = Engine::open_with(Arc::new(fs.clone()), Path::new(DIR), wal_only()).unwrap();
    let mut writer = Writer::new(Hlc::default());
    let mut records = Vec::new();
    for i in 0..40u32 {
        let value = format!("value-{i}").into_bytes();
        let keys: Vec<Vec<u8>> = if i % 4 == 3 {
            (0..5).map(|j| format!("batch-{i}-{j}").into_bytes()).collect()
        } else {
            vec![format!("key-{i}").into_bytes()]
        };
        let entries: Vec<_> = keys.iter().map(|k| (k.clone(), Some(value.clone()))).collect();
        engine.write_blocking(writer.batch(&entries)).unwrap();
        records.push(Record { keys, value });
    }
    let image = fs.crash();
    drop(engine);
    let segment = wal_with_records(&image);
    (image, segment, records)
}

fn wal_with_records(fs: &SimFs) -> PathBuf {
    let dir = Path::new(DIR);
    fs.list(dir)
        .unwrap()
        .into_iter()
        .filter(|name| name.ends_with(".wal"))
        .map(|name| dir.join(name))
        .find(|path| {
            frame::record_at(&fs.get(path).unwrap(), &wal::salt(segment_number(path)), wal::MAGIC.len())
                .unwrap()
                .is_some()
        })
        .expect("a segment with records")
}

/// The number of the segment at `path`.
fn segment_number(path: &Path) -> u64 {
    wal::parse_segment_name(path.file_name().unwrap().to_str().unwrap()).unwrap()
}

/// Offsets where each record ends in segment `number`.
fn record_ends(number: u64, segment: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    frame::scan(segment, &wal::salt(number), wal::MAGIC.len(), |offset, payload| {
        ends.push(offset + frame::HEADER_LEN + payload.len());
        true
    });
    ends
}

/// How many records, counted from the first, are fully present; panics if
/// the present records are not a prefix or a batch is partly present.
fn present_prefix(engine: &Engine, records: &[Record]) -> usize {
    let present: Vec<bool> = records
        .iter()
        .map(|record| {
            let found: Vec<bool> = record
                .keys
                .iter()
                .map(|k| {
                    engine.get(k).unwrap().and_then(|s| s.value().map(<[u8]>::to_vec)) == Some(record.value.clone())
                })
                .collect();
            assert!(found.iter().all(|&f| f) || found.iter().all(|&f| !f), "batch partly applied: {found:?}");
            found[0]
        })
        .collect();
    let prefix = present.iter().take_while(|&&p| p).count();
    assert!(present[prefix..].iter().all(|&p| !p), "present records are not a prefix: {present:?}");
    prefix
}

#[test]
fn wal_cut_at_every_byte_of_the_last_records_recovers_a_prefix() {
    let (image, segment, records) = build_image();
    let bytes = image.get(&segment).unwrap();
    let ends = record_ends(segment_number(&segment), &bytes);
    assert_eq!(ends.len(), records.len());
    // Every byte of the last eight records, and a little of the zero tail.
    let from = ends[ends.len() - 9];
    let to = ends[ends.len() - 1] + 16;
    for cut in from..=to {
        let fs = image.crash();
        fs.put(&segment, bytes[..cut].to_vec());
        let engine =
            Engine::open_with(Arc::new(fs), Path::new(DIR), wal_only()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let expected = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(present_prefix(&engine, &records), expected, "cut at {cut}");
    }
}

#[test]
fn reopening_after_a_cut_and_more_writes_still_works() {
    // A torn tail is truncated, so the next recovery does not mistake it for
    // a bad record followed by the records written after the restart.
    let (image, segment, records) = build_image();
    let bytes = image.get(&segment).unwrap();
    let ends = record_ends(segment_number(&segment), &bytes);
    let fs = image.crash();
    fs.put(&segment, bytes[..ends[30] + 5].to_vec());
    let engine = Engine::open_with(Arc::new(fs.clone()), Path::new(DIR), wal_only()).unwrap();
    let mut writer = Writer::new(engine.max_hlc());
    engine.write_blocking(vec![writer.op(b"after", Some(b"restart"))]).unwrap();
    let fs = fs.crash();
    drop(engine);
    let engine = Engine::open_with(Arc::new(fs), Path::new(DIR), wal_only()).unwrap();
    assert_eq!(present_prefix(&engine, &records), 31);
    assert_eq!(engine.get(b"after").unwrap().unwrap().value(), Some(&b"restart"[..]));
}

#[test]
fn flipped_byte_in_the_middle_is_corruption_naming_file_and_offset() {
    let (image, segment, records) = build_image();
    let bytes = image.get(&segment).unwrap();
    let ends = record_ends(segment_number(&segment), &bytes);
    for target in [ends[9] + 3, ends[9] + frame::HEADER_LEN + 2, ends[20] - 1] {
        let mut damaged = bytes.clone();
        damaged[target] ^= 0x10;
        let fs = image.crash();
        fs.put(&segment, damaged);
        let error = Engine::open_with(Arc::new(fs.clone()), Path::new(DIR), wal_only()).unwrap_err();
        match &error {
            Error::Corrupt { path, offset, .. } => {
                assert_eq!(path, &segment);
                let record_start = *ends.iter().rev().find(|&&end| end <= target).unwrap() as u64;
                assert_eq!(*offset, record_start, "{error}");
            }
            other => panic!("expected corruption, got {other}"),
        }
        let message = error.to_string();
        assert!(message.contains(".wal") && message.contains("offset"), "{message}");

        // The repair option keeps the valid prefix.
        let repaired = Engine::open_with(Arc::new(fs), Path::new(DIR), Options { repair: true, ..wal_only() }).unwrap();
        let kept = present_prefix(&repaired, &records);
        assert_eq!(kept, ends.iter().filter(|&&end| end <= target).count());
    }
}

/// Writes records straight into a segment, as a crash in the middle of a
/// group commit whose pages reached the disk out of order could leave them.
fn segment_with(groups: &[(u64, u64)], bad_seq: u64) -> Vec<u8> {
    let mut writer = Writer::new(Hlc::default());
    let mut out = wal::MAGIC.to_vec();
    for &(seq, group) in groups {
        let ops = vec![writer.op(format!("k{seq}").as_bytes(), Some(b"v"))];
        let start = out.len();
        wal::encode_record(&mut out, 1, seq, group, &postcard::to_stdvec(&ops).unwrap());
        if seq == bad_seq {
            out[start + frame::HEADER_LEN + 1] ^= 0xff;
        }
    }
    out.resize(out.len() + 64, 0);
    out
}

fn open_segment(bytes: Vec<u8>) -> Result<Engine, Error> {
    let fs = SimFs::new();
    fs.put(&Path::new(DIR).join(wal::segment_name(1)), bytes);
    Engine::open_with(Arc::new(fs), Path::new(DIR), wal_only())
}

#[test]
fn bad_record_followed_only_by_its_own_group_is_a_torn_tail() {
    // Group 3 holds seqs 3..=5; seq 3 never reached the disk but 4 and 5 did.
    let engine = open_segment(segment_with(&[(1, 1), (2, 2), (3, 3), (4, 3), (5, 3)], 3)).unwrap();
    assert!(engine.get(b"k2").unwrap().is_some());
    for seq in 3..=5 {
        assert!(engine.get(format!("k{seq}").as_bytes()).unwrap().is_none(), "seq {seq} is part of an unsynced group");
    }
}

#[test]
fn bad_record_followed_by_a_later_group_is_corruption() {
    let error = open_segment(segment_with(&[(1, 1), (2, 2), (3, 3), (4, 4)], 2)).expect_err("must refuse to open");
    assert!(matches!(error, Error::Corrupt { .. }), "{error}");
}

fn skip_write_run(probability: f64, seed: u64) {
    let sim = SimFs::new();
    let faulty = SkipWriteFs::new(Arc::new(sim.clone()), probability, seed);
    let dir = Path::new(DIR);
    let engine = Engine::open_with(Arc::new(faulty.clone()), dir, tiny_options()).unwrap();
    let mut writer = Writer::new(Hlc::default());
    let mut model = BTreeMap::new();
    for i in 0..3000u32 {
        let key = format!("key-{:03}", (i * 7919) % 600).into_bytes();
        if i % 11 == 0 {
            engine.write_blocking(vec![writer.op(&key, None)]).unwrap();
            model.remove(&key);
        } else {
            let value = format!("value-{i}-{}", "y".repeat(30)).into_bytes();
            engine.write_blocking(vec![writer.op(&key, Some(&value))]).unwrap();
            model.insert(key, value);
        }
        if i % 500 == 499 {
            engine.compact().unwrap();
        }
    }
    let stats = engine.stats();
    assert!(stats.flushes >= 20 && stats.compactions >= 6, "{stats:?}");
    // Most segments were recycled ones, whose old records must not replay.
    assert!(stats.wal_segments_recycled >= 5, "{stats:?}");
    assert!(faulty.skipped() > 0 && stats.table_rewrites > 0, "the fault never fired: {stats:?}");

    // Crash without the fault, then reopen and check everything.
    let survived = sim.crash();
    drop(engine);
    let engine = Engine::open_with(Arc::new(survived.clone()), dir, tiny_options()).unwrap();
    for k in 0..600u32 {
        let key = format!("key-{k:03}").into_bytes();
        let got = engine.get(&key).unwrap().and_then(|s| s.value().map(<[u8]>::to_vec));
        assert_eq!(got.as_ref(), model.get(&key), "key {k} after crash (p = {probability})");
    }
    // And a graceful close and reopen, still under the fault.
    engine.close().unwrap();
    let faulty = SkipWriteFs::new(Arc::new(survived), probability, seed + 1);
    let engine = Engine::open_with(Arc::new(faulty), dir, tiny_options()).unwrap();
    let live: BTreeMap<Vec<u8>, Vec<u8>> =
        engine.scan(b"", None).map(Result::unwrap).filter_map(|(k, s)| s.value().map(|v| (k, v.to_vec()))).collect();
    assert_eq!(live, model);
}

#[test]
fn skip_write_fault_at_5_percent_loses_nothing() {
    skip_write_run(0.05, 5);
}

#[test]
fn skip_write_fault_at_20_percent_loses_nothing() {
    skip_write_run(0.20, 20);
}

#[test]
fn damaged_table_block_reads_as_an_error_and_a_missing_table_refuses_to_open() {
    let fs = SimFs::new();
    let dir = Path::new(DIR);
    let engine = Engine::open_with(Arc::new(fs.clone()), dir, tiny_options()).unwrap();
    let mut writer = Writer::new(Hlc::default());
    for i in 0..200u32 {
        engine.write_blocking(vec![writer.op(format!("k{i}").as_bytes(), Some(&[7; 64]))]).unwrap();
    }
    engine.close().unwrap();
    let table = fs.list(dir).unwrap().into_iter().find(|n| n.ends_with(".sst")).unwrap();
    let path = dir.join(&table);
    let mut bytes = fs.get(&path).unwrap();
    bytes[10] ^= 1;
    fs.put(&path, bytes);
    let engine = Engine::open_with(Arc::new(fs.clone()), dir, tiny_options()).unwrap();
    // Block checksums are checked on read: the damaged block is an error,
    // never wrong data.
    let errors = (0..200u32).filter(|i| engine.get(format!("k{i}").as_bytes()).is_err()).count();
    assert!(errors > 0);
    drop(engine);

    fs.remove(&path).unwrap();
    let error = Engine::open_with(Arc::new(fs), dir, tiny_options()).unwrap_err();
    assert!(error.to_string().contains(&table), "{error}");
}

/// A disk with faults in table writes:
/// - it damages one byte in the middle of the first `flips` table writes, as
///   a misdirected or corrupted write would: the table still opens (footer
///   and metadata are intact), so only reading it back and comparing
///   catches it;
/// - it holds each new table file at its creation until the test lets it
///   through (`TableGate::allow`), as a slow disk would.
#[derive(Debug)]
struct FaultyTables {
    inner: SimFs,
    flips: Arc<std::sync::atomic::AtomicUsize>,
    gate: Arc<TableGate>,
}

/// How many more table files may be created (`u64::MAX`: any number).
#[derive(Debug)]
struct TableGate {
    allowed: std::sync::Mutex<u64>,
    changed: std::sync::Condvar,
}

impl TableGate {
    fn new(allowed: u64) -> Arc<TableGate> {
        Arc::new(TableGate { allowed: std::sync::Mutex::new(allowed), changed: std::sync::Condvar::new() })
    }

    fn allow(&self, more: u64) {
        let mut allowed = self.allowed.lock().unwrap();
        *allowed = allowed.saturating_add(more);
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut allowed = self.allowed.lock().unwrap();
        while *allowed == 0 {
            allowed = self.changed.wait(allowed).unwrap();
        }
        if *allowed != u64::MAX {
            *allowed -= 1;
        }
    }
}

/// Opens the gate for good when dropped: a failed assertion must fail the
/// test, not leave the engine's drop waiting on a held flush.
struct OpenOnDrop(Arc<TableGate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.allow(u64::MAX);
    }
}

#[derive(Debug)]
struct FlipFile {
    inner: Box<dyn File>,
    left: Arc<std::sync::atomic::AtomicUsize>,
}

impl File for FlipFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let flip =
            buf.len() > 64 && self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if flip {
            let mut damaged = buf.to_vec();
            damaged[buf.len() / 4] ^= 0x10;
            return self.inner.write_all_at(&damaged, offset);
        }
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
}

impl Fs for FaultyTables {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn File>> {
        if path.extension().is_some_and(|e| e == "sst") {
            self.gate.pass();
            let file = self.inner.create(path)?;
            return Ok(Box::new(FlipFile { inner: file, left: self.flips.clone() }));
        }
        self.inner.create(path)
    }
    fn open(&self, path: &Path) -> std::io::Result<Box<dyn File>> {
        self.inner.open(path)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

#[test]
fn a_table_damaged_on_write_is_caught_by_the_read_back_and_written_again() {
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(3));
    let fs = FaultyTables { inner: SimFs::new(), flips: left.clone(), gate: TableGate::new(u64::MAX) };
    let engine = Engine::open_with(Arc::new(fs), Path::new(DIR), tiny_options()).unwrap();
    let mut writer = Writer::new(Hlc::default());
    for i in 0..300u32 {
        engine.write_blocking(vec![writer.op(format!("k{i:03}").as_bytes(), Some(&[7; 64]))]).unwrap();
    }
    engine.flush().unwrap();
    assert_eq!(left.load(Ordering::SeqCst), 0, "the fault fired");
    assert!(engine.stats().table_rewrites >= 3, "{:?}", engine.stats());
    for i in 0..300u32 {
        let siblings = engine.get(format!("k{i:03}").as_bytes()).unwrap().expect("written");
        assert_eq!(siblings.value(), Some(&[7u8; 64][..]));
    }
}

/// Flushes are built ahead of the disk: while the first table write is held,
/// the next frozen memtable is built (and waits), and more freeze behind it.
/// Let through one table at a time, they must be built and committed oldest
/// first: a crash after each one loses nothing, because the flushed sequence
/// (past which WAL segments are deleted) never jumps over a memtable not yet
/// in a table.
#[test]
fn flushes_held_at_the_disk_are_committed_oldest_first_and_a_crash_between_loses_nothing() {
    let sim = SimFs::new();
    let gate = TableGate::new(0);
    let fs = FaultyTables { inner: sim.clone(), flips: Arc::default(), gate: gate.clone() };
    let opts = Options { frozen_memtables_max: 6, background_compaction: false, ..tiny_options() };
    let engine = Engine::open_with(Arc::new(fs), Path::new(DIR), opts.clone()).unwrap();
    let _open_on_panic = OpenOnDrop(gate.clone());
    let mut writer = Writer::new(Hlc::default());
    let mut written = 0u32;
    // Five frozen memtables: one held at the disk, one built and waiting,
    // three not built yet (a sixth would make writes wait).
    while engine.stats().frozen_memtables < 5 {
        assert!(written < 10_000, "memtables never froze: {:?}", engine.stats());
        engine.write_blocking(vec![writer.op(format!("k{written:05}").as_bytes(), Some(&[5; 100]))]).unwrap();
        written += 1;
    }
    let check_crash_image = |flushed: u64| {
        let engine = Engine::open_with(Arc::new(sim.crash()), Path::new(DIR), opts.clone()).unwrap();
        for i in 0..written {
            let got = engine.get(format!("k{i:05}").as_bytes()).unwrap();
            assert!(got.is_some(), "k{i:05} lost by a crash after the flush to seq {flushed}");
        }
    };
    let mut flushed = engine.stats().flushed_seq;
    check_crash_image(flushed);
    for step in 1..=5 {
        gate.allow(1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while engine.stats().flushes < step {
            assert!(std::time::Instant::now() < deadline, "flush {step} never landed: {:?}", engine.stats());
            std::thread::yield_now();
        }
        let stats = engine.stats();
        assert_eq!(stats.frozen_memtables, 5 - step as usize, "{stats:?}");
        assert!(stats.flushed_seq > flushed, "flush {step} did not advance: {stats:?}");
        flushed = stats.flushed_seq;
        check_crash_image(flushed);
    }
    gate.allow(u64::MAX);
    engine.close().unwrap();
}
