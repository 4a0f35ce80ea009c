//! Full-text search against a real `quiverd --index`: through the client,
//! across a SIGKILL in the middle of writes, and `quiverd --check-index`
//! on what the kill left.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::start_node;
use quiver_client::blocking::Client;
use quiver_client::ErrorKind;

fn hit_keys(hits: &[quiver_client::SearchHit]) -> Vec<String> {
    hits.iter().map(|hit| String::from_utf8_lossy(&hit.key).into_owned()).collect()
}

/// Runs `quiverd --check-index` on `dir`: its exit status and output.
fn check_index(dir: &std::path::Path) -> (bool, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_quiverd")).args(["--check-index", "--data-dir"]).arg(dir).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn search_finds_current_values_and_the_index_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &["--index"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("paris", "Paris is the capital of France").unwrap();
    client.set("lyon", "Lyon is a city in France, known for its food").unwrap();
    client.set("rome", "Rome is the capital of Italy").unwrap();
    client.bulk_set([("berlin", "Berlin is the capital of Germany"), ("oslo", "Oslo, capital of Norway")]).unwrap();
    assert_eq!(hit_keys(&client.search_text("france", 10).unwrap()), ["paris", "lyon"]);
    assert_eq!(hit_keys(&client.search_text_all("capital france", 10).unwrap()), ["paris"]);
    assert_eq!(hit_keys(&client.search_text("\"capital of italy\"", 10).unwrap()), ["rome"]);
    let hits = client.search_text("germ*", 10).unwrap();
    assert_eq!(hit_keys(&hits), ["berlin"]);
    assert_eq!(hits[0].value, "Berlin is the capital of Germany".as_bytes());
    client.set("paris", "Paris, on the Seine").unwrap();
    client.delete("lyon").unwrap();
    assert!(client.search_text("france", 10).unwrap().is_empty(), "overwritten and deleted values are not found");

    // Writers overwrite keys until the node is killed under them.
    let stop = Arc::new(AtomicBool::new(false));
    // Connected before any starts: the kill may come before a late one
    // would have connected.
    let clients: Vec<Client> = (0..4).map(|_| Client::connect([node.addr.clone()]).unwrap()).collect();
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, client)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed)
                    && client.set(format!("w{w}-{}", i % 50), format!("word{i} shared")).is_ok()
                {
                    i += 1;
                }
                i
            })
        })
        .collect();
    while client.status().unwrap().keys < 150 {
        std::thread::yield_now();
    }
    node.kill();
    stop.store(true, Ordering::Relaxed);
    let written: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(written > 0);

    let (matches, text) = check_index(dir.path());
    assert!(matches, "{text}");
    assert!(text.contains("matches"), "{text}");

    let node = start_node(dir.path(), &["--index"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    let shared = client.search_text("shared", 1000).unwrap();
    assert!(!shared.is_empty() && shared.len() <= 200, "{}", shared.len());
    for hit in &shared {
        assert_eq!(client.get(&hit.key).unwrap().as_deref(), Some(hit.value.as_slice()), "a hit is the current value");
    }
    assert_eq!(hit_keys(&client.search_text("seine", 10).unwrap()), ["paris"]);
    assert_eq!(hit_keys(&client.search_similar("river", 1).unwrap()), ["paris"], "the Seine is a river");
    let vector = client.search_vector(&[0.1; 50], 3).unwrap();
    assert_eq!(vector.len(), 3);
    // A vector from the same space as the values' (an outlier far from
    // every point may not be reachable through the graph's links).
    let volcano = quiver_node::index::embed::WordVectors::shipped().unwrap().word("volcano").unwrap().to_vec();
    client.set_with_vector("own", [0xff, 0x00, 0x10], &volcano).unwrap();
    let nearest = client.search_vector(&volcano, 1).unwrap();
    assert_eq!((nearest[0].key.as_slice(), nearest[0].value.as_slice()), (&b"own"[..], &[0xff, 0x00, 0x10][..]));
    let error = client.set_with_vector("own", "v", &[1.0; 3]).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::BadQuery), "{error}");
    let error = client.get(quiver_ring::ring::vector_key_of(b"own")).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::ReservedKey), "{error}");
}

#[test]
fn searches_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert!(!client.status().unwrap().indexed);
    let error = client.search_text("france", 10).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::NotIndexed), "{error}");
    assert!(error.to_string().contains("--index"), "{error}");
    drop(node);

    let node = start_node(dir.path(), &["--index"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert!(client.status().unwrap().indexed);
    for (query, k) in [("", 10), ("the of and", 10), ("\"open", 10), ("france", 0), ("france", 1001)] {
        let error = client.search_text(query, k).unwrap_err();
        assert_eq!(error.kind(), Some(ErrorKind::BadQuery), "{query:?} k={k}: {error}");
    }
    let error = client.search_text(&"word ".repeat(1000), 10).unwrap_err();
    assert!(error.to_string().contains("4096"), "{error}");
    client.set("k", "still up").unwrap();
    assert_eq!(hit_keys(&client.search_text("still", 10).unwrap()), ["k"]);
}

#[test]
fn a_second_node_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _node = start_node(dir.path(), &[]);
    let (matches, text) = check_index(dir.path());
    assert!(!matches && text.contains("in use by another quiverd"), "{text}");
}
