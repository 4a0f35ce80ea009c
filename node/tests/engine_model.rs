//! The engine against a `BTreeMap` model: random sets, deletes, batches,
//! flushes, compactions, clean reopens and crashes (on the simulated disk,
//! which keeps only what was synced). After every step, every key reads back
//! as the model says.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::{tiny_options, Writer};
use proptest::prelude::*;
use quiver_node::storage::disk::SimFs;
use quiver_node::storage::{Engine, Options};

#[derive(Clone, Debug)]
enum Action {
    Set(u8, u16),
    Delete(u8),
    Batch(Vec<(u8, Option<u16>)>),
    Flush,
    Compact,
    Reopen,
    Crash,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        30 => (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Action::Set(k, v)),
        8 => any::<u8>().prop_map(Action::Delete),
        8 => proptest::collection::vec((any::<u8>(), proptest::option::of(any::<u16>())), 1..40).prop_map(Action::Batch),
        2 => Just(Action::Flush),
        2 => Just(Action::Compact),
        1 => Just(Action::Reopen),
        1 => Just(Action::Crash),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k:03}").into_bytes()
}

fn value(v: u16) -> Vec<u8> {
    // Long enough that a few dozen writes fill a tiny memtable.
    format!("value-{v:05}-{}", "x".repeat(40)).into_bytes()
}

fn check(engine: &Engine, model: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), TestCaseError> {
    for k in 0..=255u8 {
        let got = engine.get(&key(k)).unwrap();
        let got = got.as_ref().and_then(|s| s.value().map(<[u8]>::to_vec));
        prop_assert_eq!(got.as_ref(), model.get(&key(k)), "key {}", k);
        // Memory's answer, when it has one, is the same.
        if let Some(in_memory) = engine.value_in_memory(&key(k)) {
            prop_assert_eq!(in_memory.as_ref(), model.get(&key(k)), "key {} from memory", k);
        }
    }
    let scanned: BTreeMap<Vec<u8>, Vec<u8>> =
        engine.scan(b"", None).map(Result::unwrap).filter_map(|(k, s)| s.value().map(|v| (k, v.to_vec()))).collect();
    prop_assert_eq!(&scanned, model);
    Ok(())
}

fn run(actions: Vec<Action>, opts: Options) -> Result<(), TestCaseError> {
    let dir = Path::new("/db");
    let mut fs = SimFs::new();
    let mut engine = Engine::open_with(Arc::new(fs.clone()), dir, opts.clone()).unwrap();
    let mut writer = Writer::new(engine.max_hlc());
    let mut model = BTreeMap::new();
    for action in actions {
        match action {
            Action::Set(k, v) => {
                engine.write_blocking(vec![writer.op(&key(k), Some(&value(v)))]).unwrap();
                model.insert(key(k), value(v));
            }
            Action::Delete(k) => {
                engine.write_blocking(vec![writer.op(&key(k), None)]).unwrap();
                model.remove(&key(k));
            }
            Action::Batch(entries) => {
                // A batch holds each key once, like a bulk set after dedup.
                let entries: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
                    entries.into_iter().map(|(k, v)| (key(k), v.map(value))).collect();
                let entries: Vec<_> = entries.into_iter().collect();
                engine.write_blocking(writer.batch(&entries)).unwrap();
                for (k, v) in entries {
                    match v {
                        Some(v) => model.insert(k, v),
                        None => model.remove(&k),
                    };
                }
            }
            Action::Flush => engine.flush().unwrap(),
            Action::Compact => engine.compact().unwrap(),
            Action::Reopen => {
                engine.close().unwrap();
                engine = Engine::open_with(Arc::new(fs.clone()), dir, opts.clone()).unwrap();
            }
            Action::Crash => {
                let survived = fs.crash();
                drop(engine);
                fs = survived;
                engine = Engine::open_with(Arc::new(fs.clone()), dir, opts.clone()).unwrap();
            }
        }
        check(&engine, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With the value cache warmed by flushes or not, and small enough that
    /// it is always full (the model's reads fill it) or large enough that
    /// a flush always finds room.
    #[test]
    fn engine_matches_model(
        actions in proptest::collection::vec(action(), 1..120),
        warm_value_cache_on_flush in any::<bool>(),
        value_cache_bytes in prop_oneof![Just(16 << 10), Just(1 << 20)],
    ) {
        run(actions, Options { warm_value_cache_on_flush, value_cache_bytes, ..tiny_options() })?;
    }
}

/// Regression: a delete flushed into its own table must not be dropped by a
/// compaction that leaves out the older table holding the value.
#[test]
fn tombstone_survives_partial_compaction() {
    run(
        vec![
            Action::Set(1, 1),
            Action::Flush,
            Action::Delete(1),
            Action::Flush,
            Action::Set(2, 2),
            Action::Flush,
            Action::Crash,
        ],
        tiny_options(),
    )
    .unwrap();
}

#[test]
fn crash_right_after_writes_keeps_them() {
    run((0..200).map(|i| Action::Set((i % 256) as u8, i)).chain([Action::Crash]).collect(), tiny_options()).unwrap();
}

/// Regression: a major compaction splits its output into several files of
/// the same size; the policy must see them as one sorted run, not as a tier
/// of similar tables to merge again (which it once did, forever).
#[test]
fn compaction_output_is_one_run_and_is_not_merged_again() {
    use quiver_node::storage::Options;
    let fs = SimFs::new();
    let opts = Options { background_compaction: false, ..tiny_options() };
    let engine = Engine::open_with(Arc::new(fs), Path::new("/db"), opts).unwrap();
    let mut writer = Writer::new(engine.max_hlc());
    for i in 0..2000u32 {
        engine.write_blocking(vec![writer.op(format!("k{i:05}").as_bytes(), Some(&[b'v'; 40]))]).unwrap();
    }
    engine.compact().unwrap();
    let after_major = engine.stats();
    assert!(after_major.tables >= 4, "the output should span several files: {after_major:?}");
    assert!(!engine.compact_step().unwrap(), "the policy merged one run's files again");
    assert_eq!(engine.stats().compactions, after_major.compactions);
    // Gets still find every key in the split run.
    for i in (0..2000u32).step_by(97) {
        assert!(engine.get(format!("k{i:05}").as_bytes()).unwrap().is_some());
    }
}

/// Point reads keep the blocks they read, within the cache's budget, and
/// find the same values with it, without it, and after compaction replaced
/// the tables the cached blocks came from (their ids are never reused).
#[test]
fn reads_through_the_block_cache_stay_within_its_budget() {
    let budget = 16 << 10;
    for block_cache_bytes in [0, budget] {
        let opts = Options { background_compaction: false, block_cache_bytes, ..tiny_options() };
        let engine = Engine::open_with(Arc::new(SimFs::new()), Path::new("/db"), opts).unwrap();
        let mut writer = Writer::new(engine.max_hlc());
        let mut model = BTreeMap::new();
        for round in 0..3u16 {
            // Each round overwrites half the keys of the last one.
            for i in round * 200..round * 200 + 400 {
                let (k, v) = (format!("key-{i:05}").into_bytes(), value(round));
                engine.write_blocking(vec![writer.op(&k, Some(&v))]).unwrap();
                model.insert(k, v);
            }
            engine.flush().unwrap();
            // Twice: the second pass reads from the cache what it can.
            for _ in 0..2 {
                for (k, v) in &model {
                    let got = engine.get(k).unwrap();
                    assert_eq!(got.as_ref().and_then(|s| s.value()), Some(&v[..]), "{}", String::from_utf8_lossy(k));
                }
            }
            let cached = engine.stats().cached_block_bytes;
            assert!(cached <= block_cache_bytes, "{cached} bytes cached, budget {block_cache_bytes}");
            assert_eq!(cached > 0, block_cache_bytes > 0, "{cached} bytes cached");
            engine.compact().unwrap();
        }
    }
}

/// A write is visible to reads as soon as it is acknowledged, whichever
/// thread applied it: many writers of 300-key batches at once (their large
/// groups go through the apply thread while the commit thread syncs the
/// next one), many single writes (small groups), and a lone writer (the
/// commit thread applies those itself). Across memtable rotations and
/// flushes.
#[test]
fn an_acknowledged_write_is_visible_at_once() {
    let options = Options { memtable_bytes_max: 256 << 10, ..tiny_options() };
    let engine = Arc::new(Engine::open_with(Arc::new(SimFs::new()), Path::new("/db"), options).unwrap());
    let check = |engine: &Engine, writer: &mut Writer, keys: Vec<Vec<u8>>| {
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys.iter().map(|k| (k.clone(), Some(b"v".to_vec()))).collect();
        engine.write_blocking(writer.batch(&entries)).unwrap();
        for key in [keys.first(), keys.last()].into_iter().flatten() {
            let found = engine.get(key).unwrap();
            assert!(found.is_some(), "{} was acknowledged but is not visible", String::from_utf8_lossy(key));
        }
    };
    for batch in [300u32, 1] {
        let writers: Vec<_> = (0..8u32)
            .map(|t| {
                let engine = engine.clone();
                std::thread::spawn(move || {
                    let mut writer = Writer::new(Default::default());
                    for i in 0..40u32 {
                        let keys = (0..batch).map(|j| format!("many-{batch}-{t}-{i}-{j}").into_bytes()).collect();
                        check(&engine, &mut writer, keys);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
    }
    let mut writer = Writer::new(engine.max_hlc());
    for i in 0..100u32 {
        check(&engine, &mut writer, vec![format!("lone-{i}").into_bytes()]);
    }
    assert!(engine.stats().flushes > 0, "the writes crossed memtable rotations");
}
