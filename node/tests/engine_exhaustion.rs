//! The engine out of file descriptors and out of disk space, on a disk
//! that runs out on demand ([`ExhaustFs`]): a write that finds no room is
//! refused (retryable, nothing written), nothing is left half-made, an
//! engine opens and serves reads on a full disk, and once the resource is
//! back writes go on without a reopen, having lost nothing acknowledged.
//! Before, the first WAL segment that could not be made stopped the engine
//! until a restart.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Writer;
use quiver_node::storage::disk::{Fs, SimFs};
use quiver_node::storage::exhaust::{ExhaustFs, Shortage};
use quiver_node::storage::{wal, Engine, Error, Options};
use quiver_ring::Hlc;

const DIR: &str = "/db";

/// Small WAL segments, so that a new one is needed every few dozen
/// writes, and room for several frozen memtables, so that the WAL runs out
/// of room before writes wait for a flush.
fn options() -> Options {
    Options { wal_segment_bytes: 16 << 10, memtable_bytes_max: 8 << 10, frozen_memtables_max: 16, ..Options::default() }
}

fn open(sim: &SimFs, shortage: &Arc<Shortage>) -> Result<Engine, Error> {
    let fs: Arc<dyn Fs> = Arc::new(ExhaustFs::new(Arc::new(sim.clone()), shortage.clone()));
    Engine::open_with(fs, Path::new(DIR), options())
}

/// What was acknowledged, key by key.
#[derive(Default)]
struct Acked(BTreeMap<Vec<u8>, Vec<u8>>);

impl Acked {
    /// Writes `key`; records it if acknowledged.
    fn write(&mut self, engine: &Engine, writer: &mut Writer, key: String) -> Result<(), Error> {
        let value = format!("{key}-{}", "v".repeat(100)).into_bytes();
        engine.write_blocking(vec![writer.op(key.as_bytes(), Some(&value))])?;
        self.0.insert(key.into_bytes(), value);
        Ok(())
    }

    /// Every acknowledged key reads back with its value.
    fn check(&self, engine: &Engine) {
        for (key, value) in &self.0 {
            let got = engine.get(key).unwrap().and_then(|s| s.value().map(<[u8]>::to_vec));
            assert_eq!(got.as_ref(), Some(value), "{}", String::from_utf8_lossy(key));
        }
    }
}

/// An engine on a disk that runs out on demand, with `writes` of its own
/// acknowledged.
struct Setup {
    sim: SimFs,
    shortage: Arc<Shortage>,
    engine: Engine,
    writer: Writer,
    acked: Acked,
}

impl Setup {
    fn new(writes: usize) -> Setup {
        let sim = SimFs::new();
        let shortage = Arc::new(Shortage::default());
        let engine = open(&sim, &shortage).unwrap();
        let (mut writer, mut acked) = (Writer::new(Hlc::ZERO), Acked::default());
        for i in 0..writes {
            acked.write(&engine, &mut writer, format!("k-{i:04}")).unwrap();
        }
        Setup { sim, shortage, engine, writer, acked }
    }

    /// With the resource back: writes are taken again (after the short
    /// wait the engine keeps between tries), a flush goes through, and
    /// everything acknowledged reads back, also after a crash.
    fn resumes_and_lost_nothing(mut self) {
        self.shortage.set_space(false);
        self.shortage.set_descriptors(false);
        write_until_taken(&self.engine, &mut self.writer, &mut self.acked, "room-again");
        self.engine.flush().unwrap();
        self.acked.check(&self.engine);
        drop(self.engine);
        self.acked.check(&open(&self.sim.crash(), &self.shortage).unwrap());
    }
}

/// The table files on the disk.
fn table_files(sim: &SimFs) -> usize {
    sim.list(Path::new(DIR)).unwrap().iter().filter(|name| name.ends_with(".sst")).count()
}

/// Writes until one is refused: that refusal.
fn write_until_refused(engine: &Engine, writer: &mut Writer, acked: &mut Acked, prefix: &str) -> Error {
    for i in 0..10_000 {
        if let Err(error) = acked.write(engine, writer, format!("{prefix}-{i:05}")) {
            return error;
        }
    }
    panic!("10,000 writes and none refused");
}

/// Writes `key` until it is acknowledged (the engine tries the resource
/// again after a short wait); bounded, not a pace.
fn write_until_taken(engine: &Engine, writer: &mut Writer, acked: &mut Acked, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(error) = acked.write(engine, writer, key.to_owned()) {
        assert!(matches!(error, Error::OutOf { .. }), "{error}");
        assert!(Instant::now() < deadline, "writes were still refused a minute after the resource came back");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The WAL files on disk, each checked to open with a segment's magic:
/// none is half-made.
fn assert_whole_segments(sim: &SimFs) {
    for name in sim.list(Path::new(DIR)).unwrap() {
        if wal::parse_segment_name(&name).is_some() {
            let bytes = sim.get(&Path::new(DIR).join(&name)).unwrap();
            assert!(bytes.starts_with(wal::MAGIC), "{name}: a segment without its magic ({} bytes)", bytes.len());
        }
    }
}

#[test]
fn out_of_file_descriptors_a_write_is_refused_and_the_engine_goes_on() {
    let mut t = Setup::new(20);
    t.shortage.set_descriptors(true);
    let refused = write_until_refused(&t.engine, &mut t.writer, &mut t.acked, "short");
    assert!(matches!(refused, Error::OutOf { .. }), "{refused}");
    assert!(refused.is_retryable() && !refused.is_disk_full(), "{refused}");
    assert!(t.engine.failure().is_none(), "the engine stopped: {:?}", t.engine.failure());
    assert!(t.engine.stats().groups_refused >= 1);
    t.resumes_and_lost_nothing();
}

#[test]
fn out_of_space_a_write_is_refused_nothing_is_half_made_and_writes_resume() {
    let mut t = Setup::new(20);
    t.engine.flush().unwrap();
    t.shortage.set_space(true);
    let refused = write_until_refused(&t.engine, &mut t.writer, &mut t.acked, "full");
    assert!(refused.is_disk_full(), "{refused}");
    assert!(t.engine.failure().is_none(), "the engine stopped: {:?}", t.engine.failure());
    t.acked.check(&t.engine);
    assert_whole_segments(&t.sim);
    // A crash now recovers everything acknowledged (the segment that could
    // not be made left nothing behind).
    t.acked.check(&open(&t.sim.crash(), &Arc::new(Shortage::default())).unwrap());
    // Every table file is one the engine uses: failed flushes left none.
    assert_eq!(table_files(&t.sim), t.engine.stats().tables);
    t.resumes_and_lost_nothing();
}

#[test]
fn an_engine_opens_on_a_full_disk_serves_reads_and_takes_writes_once_there_is_room() {
    // Enough for memtables to fill during recovery, so that it has
    // flushes to make too.
    let t = Setup::new(300);
    drop(t.engine);
    let sim = t.sim.crash();
    // Without retired segments to reuse (which need no new blocks), the
    // new segment every open starts cannot be made.
    for name in sim.list(Path::new(DIR)).unwrap() {
        if name.ends_with(".walfree") {
            sim.remove(&Path::new(DIR).join(name)).unwrap();
        }
    }
    t.shortage.set_space(true);
    let engine = open(&sim, &t.shortage).expect("an engine opens on a full disk");
    let mut t = Setup { sim, engine, ..t };
    t.acked.check(&t.engine);
    let refused = t.acked.write(&t.engine, &mut t.writer, "while-full".into()).unwrap_err();
    assert!(refused.is_disk_full(), "{refused}");
    t.resumes_and_lost_nothing();
}

/// The table of a flush is written, but its manifest edit finds no room:
/// the edit is cut off the manifest again, the table file is removed (one
/// more per retry, before), and once there is room the flush goes through.
#[test]
fn a_manifest_edit_without_room_leaves_no_table_behind() {
    let mut t = Setup::new(20);
    t.engine.flush().unwrap();
    let tables = t.engine.stats().tables;
    t.shortage.set_space_only_for("MANIFEST");
    t.acked.write(&t.engine, &mut t.writer, "one more".into()).unwrap();
    let error = t.engine.flush().unwrap_err();
    assert!(error.to_string().contains("No space left"), "{error}");
    assert!(t.engine.failure().is_none(), "the engine stopped: {:?}", t.engine.failure());
    // A second try, and a third: each fails the same way, and leaves no file.
    assert!(t.engine.flush().is_err());
    assert!(t.engine.flush().is_err());
    assert_eq!(table_files(&t.sim), tables);
    t.shortage.set_space(false);
    t.engine.flush().unwrap();
    assert_eq!(t.engine.stats().tables, tables + 1);
    t.resumes_and_lost_nothing();
}
