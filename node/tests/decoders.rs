//! Every decoder against random and damaged bytes: WAL recovery, the
//! manifest, SSTables and wire frames must answer with data or an error,
//! never panic or hang.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::Writer;
use proptest::prelude::*;
use quiver_node::storage::disk::{Fs, SimFs};
use quiver_node::storage::manifest::Manifest;
use quiver_node::storage::sstable::{Table, TableBuilder, TableScan};
use quiver_node::storage::Error;
use quiver_node::storage::{frame, wal, Engine, Options};
use quiver_ring::{Hlc, Siblings};

const DIR: &str = "/db";

fn small() -> Options {
    Options { wal_segment_bytes: 4096, ..Options::default() }
}

/// A valid table of `n` entries.
fn table_bytes(n: u32) -> Vec<u8> {
    let mut writer = Writer::new(Hlc::default());
    let mut builder = TableBuilder::new(256, 10, 1, 1);
    for i in 0..n {
        let op = writer.op(format!("key-{i:05}").as_bytes(), if i % 5 == 0 { None } else { Some(b"value") });
        builder.add(&op.key, &Siblings::one(op.version));
    }
    builder.finish().0
}

/// Opens, verifies, reads and scans a table file; errors are fine.
fn exercise_table(bytes: Vec<u8>) {
    quiver_node::fuzzing::sstable(&bytes);
}

/// A WAL segment holding a few valid records.
fn wal_bytes() -> Vec<u8> {
    let mut writer = Writer::new(Hlc::default());
    let mut out = wal::MAGIC.to_vec();
    for seq in 1..=6u64 {
        let ops = vec![writer.op(format!("k{seq}").as_bytes(), Some(b"v"))];
        wal::encode_record(&mut out, 1, seq, seq, &postcard::to_stdvec(&ops).unwrap());
    }
    out
}

fn open_with_segment(bytes: Vec<u8>) {
    let fs = SimFs::new();
    fs.put(&Path::new(DIR).join(wal::segment_name(1)), bytes);
    if let Ok(engine) = Engine::open_with(Arc::new(fs), Path::new(DIR), small()) {
        let _ = engine.get(b"k3");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_as_a_table(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        exercise_table(bytes);
    }

    #[test]
    fn damaged_table(flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6), cut in any::<prop::sample::Index>()) {
        let mut bytes = table_bytes(150);
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        exercise_table(bytes.clone());
        let keep = cut.index(bytes.len());
        exercise_table(bytes[..keep].to_vec());
    }

    #[test]
    fn random_bytes_as_a_wal_segment(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = wal::MAGIC.to_vec();
        bytes.extend(tail);
        open_with_segment(bytes);
    }

    #[test]
    fn damaged_wal_segment(flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
        let mut bytes = wal_bytes();
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        open_with_segment(bytes);
    }

    #[test]
    fn random_bytes_as_a_manifest(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let fs = SimFs::new();
        let mut bytes = b"QVMAN\0\0\x01".to_vec();
        bytes.extend(tail);
        fs.put(&Path::new(DIR).join("MANIFEST"), bytes);
        let fs: Arc<dyn Fs> = Arc::new(fs);
        let _ = Manifest::open(fs.clone(), Path::new(DIR), false, 16);
        let _ = Engine::open_with(fs, Path::new(DIR), small());
    }

    /// Records whose checksums are right but whose payloads are garbage get
    /// past the checksum, so they reach the payload decoders themselves.
    #[test]
    fn checksummed_garbage_in_wal_and_manifest(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..80), 1..5)) {
        let mut segment = wal_bytes();
        let mut manifest = b"QVMAN\0\0\x01".to_vec();
        for payload in &payloads {
            frame::encode(&mut segment, &wal::salt(1), &[payload]);
            frame::encode(&mut manifest, &[], &[payload]);
        }
        open_with_segment(segment);
        let fs = SimFs::new();
        fs.put(&Path::new(DIR).join("MANIFEST"), manifest);
        let _ = Engine::open_with(Arc::new(fs), Path::new(DIR), small());
    }

    #[test]
    fn random_bytes_as_wire_frames(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        quiver_node::fuzzing::client_request(&body);
        quiver_node::fuzzing::peer_message(&body);
        quiver_node::fuzzing::context_token(&body);
    }
}

#[test]
fn an_undamaged_table_and_wal_read_back() {
    // The generators above start from these; make sure they are valid, so the
    // damage is what the fuzzing exercises.
    let fs = SimFs::new();
    let path = Path::new(DIR).join("0000000000000001.sst");
    fs.put(&path, table_bytes(150));
    let table = Table::open(&fs, &path, 1).unwrap();
    table.verify().unwrap();
    assert_eq!(table.props().entries, 150);

    let fs = SimFs::new();
    fs.put(&Path::new(DIR).join(wal::segment_name(1)), wal_bytes());
    let engine = Engine::open_with(Arc::new(fs), Path::new(DIR), small()).unwrap();
    assert!(engine.get(b"k6").unwrap().is_some());
}

/// Compaction's scan reads many blocks per read (a 1 MiB window): over a
/// table of several windows it yields exactly the entries a range scan
/// (a block per read) does, a range scan starts at the right entry, and a
/// damaged block in a later window is an error naming that block, never a
/// panic or a silent skip.
#[test]
fn a_table_scan_over_many_windows_matches_the_iterator_and_catches_damage() {
    let mut writer = Writer::new(Hlc::default());
    let mut builder = TableBuilder::new(4096, 10, 1, 1);
    let value = [7u8; 100];
    for i in 0..40_000u32 {
        let op = writer.op(format!("key-{i:06}").as_bytes(), Some(&value));
        builder.add(&op.key, &Siblings::one(op.version));
    }
    let bytes = builder.finish().0;
    assert!(bytes.len() > 4 << 20, "the table spans several windows");
    let fs = SimFs::new();
    let path = Path::new(DIR).join("0000000000000001.sst");
    fs.put(&path, bytes.clone());
    let table = Arc::new(Table::open(&fs, &path, 1).unwrap());

    let mut expected = table.iter_from(b"");
    let mut scan = TableScan::new(table.clone()).unwrap();
    let mut count = 0;
    while let Some((key, value)) = scan.head() {
        let (want_key, want_siblings) = expected.next().unwrap().unwrap();
        assert_eq!(key, want_key.as_slice(), "entry {count}");
        assert_eq!(table.decode_value(value).unwrap(), want_siblings, "entry {count}");
        scan.advance().unwrap();
        count += 1;
    }
    assert!(expected.next().is_none());
    assert_eq!(count, 40_000);
    // From a key in the middle of a block: the first entry at or after it.
    let from = |start: &[u8]| table.iter_from(start).next().map(|item| item.unwrap().0);
    assert_eq!(from(b"key-012345x"), Some(b"key-012346".to_vec()));
    assert_eq!(from(b"key-012346"), Some(b"key-012346".to_vec()));
    assert_eq!(from(b"key-04"), None);

    // Damage one byte about 3 MiB in (the fourth window).
    let mut damaged = bytes;
    damaged[3 << 20] ^= 0x40;
    fs.put(&path, damaged);
    let table = Arc::new(Table::open(&fs, &path, 1).unwrap());
    let mut scan = TableScan::new(table).unwrap();
    let error = loop {
        match scan.advance() {
            Ok(()) if scan.head().is_some() => continue,
            Ok(()) => panic!("the damaged block went unnoticed"),
            Err(e) => break e,
        }
    };
    match error {
        Error::ChecksumMismatch { offset, .. } => assert!(offset <= 3 << 20 && (3 << 20) - offset < 8192, "{offset}"),
        other => panic!("unexpected error: {other}"),
    }
}
