//! Replays every input of the committed fuzz corpora (`fuzz/corpus/TARGET/`)
//! through its target's function, so that `cargo test` runs what the
//! fuzzers found (each crash or hang they found was kept there, and is
//! fixed). A run of the fuzzers themselves is described in `fuzz/README.md`.

mod common;

use std::path::Path;

#[test]
fn every_corpus_input_decodes_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in quiver_node::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{}: the corpus of {name} is empty", dir.display());
        for input in &inputs {
            let bytes = std::fs::read(input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name} panicked on {}", input.display());
        }
        println!("{name}: {} inputs", inputs.len());
    }
}

/// Writes the seed inputs the corpora started from (one valid input of
/// each kind, so the fuzzers begin past the magic numbers and checksums):
/// `cargo test -p quiver-node --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed inputs into fuzz/corpus; run by hand before a first fuzzing run"]
fn write_seed_inputs() {
    use quiver_node::messages::{Hinted, PeerRequest};
    use quiver_node::service::token::{TokenSeal, SECRET_BYTES};
    use quiver_node::storage::disk::SimFs;
    use quiver_node::storage::sstable::TableBuilder;
    use quiver_node::storage::{wal, Engine, Options};
    use quiver_ring::wire::{ContextToken, Op, Request};
    use quiver_ring::{Hlc, NodeId, Siblings};
    use std::sync::Arc;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = |target: &str, name: &str, bytes: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    };
    let mut writer = common::Writer::new(Hlc::ZERO);
    let siblings = |writer: &mut common::Writer, key: &str| {
        let op = writer.op(key.as_bytes(), Some(b"value"));
        (op.key, Siblings::one(op.version))
    };

    let request = |op: Op| Request { id: 1, hlc_seen: Hlc(2), op, deadline: Hlc(u64::MAX), consistency: None };
    let ops = [
        ("get", Op::Get { key: b"k".to_vec() }),
        ("get-many", Op::GetMany { keys: vec![b"a".to_vec(), b"b".to_vec()] }),
        ("set", Op::Set { key: b"k".to_vec(), value: b"v".to_vec() }),
        ("bulk-set", Op::BulkSet { entries: vec![(b"a".to_vec(), b"1".to_vec())] }),
        ("hello", Op::Hello { protocol: quiver_ring::wire::PROTOCOL_VERSION }),
        ("set-with-context", Op::SetWithContext { key: b"k".to_vec(), value: None, context: ContextToken(vec![1]) }),
        ("search", Op::SearchText { query: "royal palace".into(), k: 10, all: false, global_stats: false }),
        ("vector", Op::SetWithVector { key: b"k".to_vec(), value: b"v".to_vec(), vector: vec![0.5, 0.25] }),
    ];
    for (name, op) in ops {
        write("client_request", name, postcard::to_stdvec(&request(op)).unwrap());
    }

    let hinted = Hinted { owner: NodeId(3), sets: vec![siblings(&mut writer, "h")] };
    let peers = [
        ("ping", PeerRequest::Ping { from: NodeId(1), hlc: Hlc(5) }),
        ("write", PeerRequest::Write { sets: vec![siblings(&mut writer, "w")], hints: vec![hinted] }),
        ("read", PeerRequest::Read { key: b"r".to_vec() }),
        (
            "log-batch",
            PeerRequest::LogBatch { coordinator: NodeId(2), id: Hlc(9), sets: vec![siblings(&mut writer, "b")] },
        ),
    ];
    for (name, message) in peers {
        write("peer_message", name, postcard::to_stdvec(&(7u64, message)).unwrap());
    }

    let mut segment = wal::MAGIC.to_vec();
    for seq in 1..=4u64 {
        let ops = vec![writer.op(format!("k{seq}").as_bytes(), Some(b"v"))];
        wal::encode_record(&mut segment, 1, seq, seq, &postcard::to_stdvec(&ops).unwrap());
    }
    write("wal_segment", "records", segment);

    let mut builder = TableBuilder::new(256, 10, 1, 1);
    for i in 0..40u32 {
        let op = writer.op(format!("key-{i:05}").as_bytes(), if i % 5 == 0 { None } else { Some(b"value") });
        builder.add(&op.key, &Siblings::one(op.version));
    }
    write("sstable", "table", builder.finish().0);

    let sim = SimFs::new();
    let engine = Engine::open_with(Arc::new(sim.clone()), Path::new("/db"), Options::default()).unwrap();
    engine.write_blocking(vec![writer.op(b"k", Some(b"v"))]).unwrap();
    engine.flush().unwrap();
    engine.close().unwrap();
    write("manifest", "edits", sim.get(&Path::new("/db").join("MANIFEST")).unwrap());

    let seal = TokenSeal::new(&[7; SECRET_BYTES]);
    let mut context = quiver_ring::Context { max_hlc: Hlc(40), ..Default::default() };
    context.vv.add(quiver_ring::Dot { node: NodeId(3), hlc: Hlc(30) });
    let token = seal.seal(b"key", &context).0;
    // The fuzz target seals what it is given as a body: the body alone.
    write("context_token", "body", token[17..].to_vec());
    write("context_token", "token", token);
}
