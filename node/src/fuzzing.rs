//! The decoders of untrusted bytes, each run on arbitrary input the way the
//! node runs it: the fuzz targets in `fuzz/` call these, and so does
//! `tests/fuzz_corpus.rs` over every input of the committed corpora, so
//! `cargo test` replays what the fuzzers found.
//!
//! Bad input is expected: each function only panics when a decoder does,
//! or when something it accepted breaks an invariant (what decoded
//! encodes back to the same value; a token that opened was sealed by this
//! node). A crash found here becomes a regression test in the corpus.

use std::path::Path;
use std::sync::Arc;

use quiver_ring::wire::{self, ContextToken, Request, Response};
use quiver_ring::Hlc;

use crate::messages::{PeerReply, PeerRequest};
use crate::service::token::{TokenSeal, SECRET_BYTES};
use crate::storage::disk::{Fs, SimFs};
use crate::storage::manifest::Manifest;
use crate::storage::sstable::{Table, TableScan};
use crate::storage::wal;

/// A target: what it runs on one input.
pub type Target = fn(&[u8]);

/// Every target: its name (the folder of its corpus) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_request", client_request),
    ("peer_message", peer_message),
    ("wal_segment", wal_segment),
    ("sstable", sstable),
    ("manifest", manifest),
    ("context_token", context_token),
];

/// Where the files of the disk targets are put.
const DIR: &str = "/db";

/// A client's request body, as a connection reads it: the entry counts it
/// announces, then the request itself, then the limits. What decodes
/// encodes back to the same bytes once decoded again.
pub fn client_request(data: &[u8]) {
    let limits = wire::Limits::default();
    let _ = wire::peek_id(data);
    let _ = wire::peek_hello(data);
    if limits.check_announced_entries(data).is_err() {
        return;
    }
    if let Ok(request) = postcard::from_bytes::<Request>(data) {
        let _ = limits.check(&request.op);
        // Compared as bytes: a vector may hold NaN, which equals nothing.
        let bytes = postcard::to_stdvec(&request).expect("a request encodes");
        let again: Request = postcard::from_bytes(&bytes).expect("an encoded request decodes");
        assert_eq!(
            postcard::to_stdvec(&again).expect("a request encodes"),
            bytes,
            "a request changed through encoding"
        );
    }
    // The client reads the node's answers with the same decoder.
    let _ = postcard::from_bytes::<Response>(data);
}

/// A peer's frame body, as a peer link reads it: a request, or a reply.
pub fn peer_message(data: &[u8]) {
    let _ = crate::net::peer::decode_frame::<PeerRequest>(data);
    let _ = crate::net::peer::decode_frame::<PeerReply>(data);
}

/// A WAL segment file: recovery reads it, record by record, decoding each
/// record's operations.
pub fn wal_segment(data: &[u8]) {
    let fs = SimFs::new();
    fs.put(&Path::new(DIR).join(wal::segment_name(1)), data.to_vec());
    let _ = wal::recover(&fs, Path::new(DIR), 0, false, |_, ops| {
        std::hint::black_box(ops);
        Ok(())
    });
}

/// A table file: opened (footer, index, bloom filter, properties),
/// verified, read at a few keys, scanned both ways.
pub fn sstable(data: &[u8]) {
    let fs = SimFs::new();
    let path = Path::new(DIR).join("0000000000000001.sst");
    fs.put(&path, data.to_vec());
    let Ok(table) = Table::open(&fs, &path, 1) else { return };
    let _ = table.verify();
    for i in (0..200u32).step_by(7) {
        let _ = table.get(format!("key-{i:05}").as_bytes());
    }
    let table = Arc::new(table);
    for item in table.iter_from(b"").take(1000) {
        if item.is_err() {
            break;
        }
    }
    if let Ok(mut scan) = TableScan::new(table.clone()) {
        for _ in 0..1000 {
            let Some((_, value)) = scan.head() else { break };
            let _ = table.decode_value(value);
            if scan.advance().is_err() {
                break;
            }
        }
    }
}

/// A manifest file, opened as is and with the repair option.
pub fn manifest(data: &[u8]) {
    for repair in [false, true] {
        let fs = SimFs::new();
        fs.put(&Path::new(DIR).join("MANIFEST"), data.to_vec());
        let fs: Arc<dyn Fs> = Arc::new(fs);
        let _ = Manifest::open(fs, Path::new(DIR), repair, 16);
    }
}

/// A context token, as a client hands it over (and as hex, as the CLI
/// reads it). Random bytes do not pass the seal, so the bytes are also
/// decoded as a body behind a valid seal: what opens is sealed again and
/// opens to the same context, and never for another key.
pub fn context_token(data: &[u8]) {
    let seal = TokenSeal::new(&[7; SECRET_BYTES]);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ContextToken::from_hex(text);
    }
    for token in [ContextToken(data.to_vec()), seal.seal_body(b"key", data)] {
        if let Ok(context) = seal.open(b"key", &token, Hlc(u64::MAX)) {
            let again = seal.open(b"key", &seal.seal(b"key", &context), Hlc(u64::MAX));
            assert_eq!(again.ok(), Some(context), "a token changed through sealing");
            assert!(seal.open(b"another key", &token, Hlc(u64::MAX)).is_err(), "a token opened for another key");
        }
    }
}
