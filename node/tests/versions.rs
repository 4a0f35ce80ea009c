//! Versions, contexts and clocks through a real `quiverd`: siblings made by
//! concurrent causal writes and resolved by the merged context, contexts
//! that name their key, the sibling bound, a client clock an hour ahead,
//! and a data directory of the earlier format.

mod common;

use common::{now_ms, raw_call, start_node};
use quiver_chaos::node::{NodeProcess, NodeSpec};
use quiver_client::blocking::Client;
use quiver_client::{ErrorKind, Versions};
use quiver_ring::wire::Op;
use quiver_ring::{Hlc, SIBLINGS_MAX};

fn values(versions: &Versions) -> Vec<Option<&[u8]>> {
    versions.versions.iter().map(|v| v.value.as_deref()).collect()
}

/// Two clients read the same context and write concurrently: both values
/// stay, as siblings, also across a restart; a write with the context of
/// both resolves them, and so does a delete.
#[test]
fn concurrent_causal_writes_leave_siblings_that_the_merged_context_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    let (alice, bob) = (Client::connect([node.addr.clone()]).unwrap(), Client::connect([node.addr.clone()]).unwrap());
    alice.set("k", "base").unwrap();
    let read_by_alice = alice.get_versions("k").unwrap();
    let read_by_bob = bob.get_versions("k").unwrap();
    assert_eq!(values(&read_by_alice), [Some(&b"base"[..])]);
    alice.set_with_context("k", "alice", &read_by_alice.context).unwrap();
    bob.set_with_context("k", "bob", &read_by_bob.context).unwrap();

    let both = alice.get_versions("k").unwrap();
    assert_eq!(values(&both), [Some(&b"alice"[..]), Some(&b"bob"[..])], "both writes stay, the base is replaced");
    assert!(both.versions[0].hlc < both.versions[1].hlc);
    assert_eq!(alice.get("k").unwrap().as_deref(), Some(&b"bob"[..]), "get returns the latest sibling");

    // Siblings are stored as such: the same after a restart.
    node.terminate().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.get_versions("k").unwrap(), both);

    client.set_with_context("k", "merged", &both.context).unwrap();
    let merged = client.get_versions("k").unwrap();
    assert_eq!(values(&merged), [Some(&b"merged"[..])]);
    client.delete_with_context("k", &merged.context).unwrap();
    assert_eq!(values(&client.get_versions("k").unwrap()), [None], "a causal delete leaves one tombstone");
    assert_eq!(client.get("k").unwrap(), None);
    // A key never written has no versions, and its context writes it.
    let fresh = client.get_versions("fresh").unwrap();
    assert!(fresh.versions.is_empty());
    client.set_with_context("fresh", "first", &fresh.context).unwrap();
    assert_eq!(client.get("fresh").unwrap().as_deref(), Some(&b"first"[..]));
}

/// A blind write after the reads replaces everything, and a causal write
/// made with a context older than it stays beside it: it did not see it.
#[test]
fn a_causal_write_keeps_a_blind_write_it_did_not_see() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("k", "v1").unwrap();
    let read = client.get_versions("k").unwrap();
    client.set("k", "blind").unwrap();
    client.set_with_context("k", "causal", &read.context).unwrap();
    assert_eq!(values(&client.get_versions("k").unwrap()), [Some(&b"blind"[..]), Some(&b"causal"[..])]);
}

#[test]
fn a_context_read_for_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("a", "1").unwrap();
    let of_a = client.get_versions("a").unwrap().context;
    let error = client.set_with_context("b", "2", &of_a).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::InvalidContext), "{error}");
    assert!(error.to_string().contains("another key"), "{error}");
    assert_eq!(client.get("b").unwrap(), None, "nothing was written");
}

/// A client cannot make a context claim more than it read. Unsealed, a
/// token with a floor at the end of time made every later write of its key
/// acknowledged and lost (the key frozen for ever); now such a forged
/// token, one sealed by another node, and one used with another key are
/// each `InvalidContext`, write nothing, and the key takes writes as
/// before. A node's own tokens still open after its restart.
#[test]
fn a_forged_or_foreign_context_token_is_refused_and_freezes_nothing() {
    use quiver_ring::version::BatchId;
    use quiver_ring::{Context, NodeId};
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("k", "v1").unwrap();
    let end_of_time = (Hlc(u64::MAX), BatchId { node: NodeId(u64::MAX), counter: u64::MAX });
    let claims = Context { floor: Some(end_of_time), ..Context::default() };
    // What a token was before it was sealed: its key's hash and a context.
    let key_hash = xxhash_rust::xxh3::xxh3_64_with_seed(b"k", 0x7175_6976_6572);
    let forged = quiver_client::ContextToken(postcard::to_stdvec(&(key_hash, &claims)).unwrap());
    let error = client.set_with_context("k", "frozen", &forged).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::InvalidContext), "{error}");
    client.set("k", "v2").unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"v2"[..]), "a later write is seen");

    let other_dir = tempfile::tempdir().unwrap();
    let other = start_node(other_dir.path(), &[]);
    let foreign = Client::connect([other.addr.clone()]).unwrap().get_versions("k").unwrap().context;
    let error = client.set_with_context("k", "foreign", &foreign).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::InvalidContext), "{error}");
    assert!(error.to_string().contains("not issued by this cluster"), "{error}");

    let own = client.get_versions("k").unwrap().context;
    node.terminate().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set_with_context("k", "after a restart", &own).unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"after a restart"[..]));
}

/// At most [`SIBLINGS_MAX`] siblings: the causal write that would leave
/// one more is refused (and counted in `status`); the merged context then
/// resolves them all.
#[test]
fn a_causal_write_past_the_sibling_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("k", "base").unwrap();
    let stale = client.get_versions("k").unwrap().context;
    for i in 0..SIBLINGS_MAX {
        client.set_with_context("k", format!("v{i}"), &stale).unwrap();
    }
    let all = client.get_versions("k").unwrap();
    assert_eq!(all.versions.len(), SIBLINGS_MAX);
    let error = client.set_with_context("k", "one more", &stale).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::TooManySiblings), "{error}");
    assert_eq!(client.status().unwrap().too_many_siblings_refused, 1);
    assert_eq!(client.get_versions("k").unwrap(), all, "the refused write left nothing");
    client.set_with_context("k", "resolved", &all.context).unwrap();
    assert_eq!(values(&client.get_versions("k").unwrap()), [Some(&b"resolved"[..])]);
}

/// A client whose clock is an hour ahead (or sends `u64::MAX`) is refused
/// with `ClockSkew`, naming both clocks, and the node's clock does not
/// move: its next stamps come from its own wall clock.
#[test]
fn a_request_an_hour_ahead_is_refused_and_the_node_keeps_its_own_clock() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let ahead = Hlc::from_physical_ms(now_ms() + 3_600_000);
    for hlc_seen in [ahead, Hlc(u64::MAX)] {
        for op in [Op::Set { key: b"k".to_vec(), value: b"v".to_vec() }, Op::Get { key: b"k".to_vec() }] {
            let answer = raw_call(&node.addr, hlc_seen, op);
            assert!(answer.hlc < ahead, "the node adopted the timestamp: {answer:?}");
            let error = answer.result.unwrap_err();
            assert_eq!(error.kind, ErrorKind::ClockSkew);
            assert!(error.message.contains("ahead of this node's clock"), "{}", error.message);
            assert!(error.message.contains("maximum offset of 500 ms"), "{}", error.message);
        }
    }
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("k", "own clock").unwrap();
    let versions = client.get_versions("k").unwrap();
    assert_eq!(values(&versions), [Some(&b"own clock"[..])]);
    assert!(versions.versions[0].hlc < ahead, "stamped from the node's clock: {}", versions.versions[0].hlc);
    assert_eq!(client.status().unwrap().clock_refusal, None);
}

/// A data directory written before versions v2 is refused at start, with a
/// message that says so; its files are left as they were.
#[test]
fn a_data_directory_of_the_earlier_format_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut segment = b"QVWAL\0\0\x02".to_vec();
    segment.resize(4096, 0);
    let path = dir.path().join("0000000000000001.wal");
    std::fs::write(&path, &segment).unwrap();
    let spec = NodeSpec::new(env!("CARGO_BIN_EXE_quiverd"), dir.path());
    let Err(error) = NodeProcess::start(&spec) else { panic!("quiverd started on a directory of the earlier format") };
    let error = error.to_string();
    assert!(error.contains("format 2, written by an earlier Quiver"), "{error}");
    assert!(error.contains("this build reads format 3"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), segment);
}

/// A node whose clock starts far ahead of its wall clock (its persisted
/// high-water mark is 10 s ahead, as after the wall clock was stepped back
/// across a restart) refuses to stamp writes, and says why in `status`;
/// reads go on.
#[test]
fn a_node_whose_clock_is_ahead_of_its_wall_clock_refuses_to_stamp_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mark = Hlc::from_physical_ms(now_ms() + 10_000).0.to_le_bytes();
    let mut file = mark.to_vec();
    file.extend_from_slice(&crc32fast::hash(&mark).to_le_bytes());
    std::fs::write(dir.path().join(quiver_node::stamping::HLC_FILE), file).unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    let error = client.set("k", "v").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::ClockSkew), "{error}");
    assert!(error.to_string().contains("ahead of its wall clock"), "{error}");
    let refusal = client.status().unwrap().clock_refusal.expect("status says why");
    assert!(refusal.contains("refuses to stamp writes"), "{refusal}");
    assert_eq!(client.get("k").unwrap(), None);
}

/// Causal writes of one key run one at a time (a per-key lock, released
/// once each is durable): of many concurrent writes made with the same
/// stale context, exactly as many as the sibling bound allows succeed.
#[test]
fn concurrent_causal_writes_of_one_key_never_pass_the_sibling_bound() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = std::sync::Arc::new(Client::connect([node.addr.clone()]).unwrap());
    client.set("k", "base").unwrap();
    let stale = client.get_versions("k").unwrap().context;
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (client, stale) = (client.clone(), stale.clone());
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| client.set_with_context("k", format!("{t}-{i}"), &stale).map_err(|e| e.kind()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let written = results.iter().filter(|r| r.is_ok()).count();
    let refused = results.iter().filter(|r| **r == Err(Some(ErrorKind::TooManySiblings))).count();
    assert_eq!((written, refused), (SIBLINGS_MAX, 160 - SIBLINGS_MAX), "{results:?}");
    assert_eq!(client.get_versions("k").unwrap().versions.len(), SIBLINGS_MAX);
}
