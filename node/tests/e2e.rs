//! The client library against a real `quiverd` process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use common::start_node;
use quiver_chaos::node::NodeProcess;
use quiver_client::blocking::Client;
use quiver_client::ErrorKind;
use quiver_ring::wire::{self, Response};

fn node() -> (tempfile::TempDir, NodeProcess, Client) {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    (dir, node, client)
}

#[test]
fn set_then_get() {
    let (_dir, _node, client) = node();
    client.set("k", "v").unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn set_delete_then_get_is_absent() {
    let (_dir, _node, client) = node();
    client.set("k", "v").unwrap();
    client.delete("k").unwrap();
    assert_eq!(client.get("k").unwrap(), None);
    // Deleting an absent key is fine too.
    client.delete("never-set").unwrap();
}

#[test]
fn get_without_set_is_absent() {
    let (_dir, _node, client) = node();
    assert_eq!(client.get("missing").unwrap(), None);
}

#[test]
fn second_set_wins() {
    let (_dir, _node, client) = node();
    client.set("k", "first").unwrap();
    client.set("k", "second").unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"second"[..]));
}

#[test]
fn set_graceful_exit_restart_get() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    {
        let client = Client::connect([node.addr.clone()]).unwrap();
        client.set("k", "survives SIGTERM").unwrap();
        client.bulk_set((0..100).map(|i| (format!("b{i}"), format!("v{i}")))).unwrap();
    }
    assert!(node.terminate().unwrap().success());

    let mut node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"survives SIGTERM"[..]));
    assert_eq!(client.get("b99").unwrap().as_deref(), Some(&b"v99"[..]));
    client.set("k", "survives admin shutdown").unwrap();
    let error = client.shutdown_node("not the token").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::Forbidden), "{error}");
    let token = quiver_node::identity::read_admin_token(dir.path()).unwrap();
    client.shutdown_node(&token).unwrap();
    assert!(node.wait().unwrap().success());

    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"survives admin shutdown"[..]));
}

#[test]
fn set_sigkill_restart_get() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    for i in 0..200 {
        client.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    node.kill();
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    for i in 0..200 {
        assert_eq!(client.get(format!("k{i}")).unwrap(), Some(format!("v{i}").into()), "k{i}");
    }
}

#[test]
fn bulk_set_then_get_every_key() {
    let (_dir, _node, client) = node();
    let entries: Vec<(String, String)> = (0..10_000).map(|i| (format!("key-{i:05}"), format!("value-{i}"))).collect();
    client.bulk_set(entries.clone()).unwrap();
    for (key, value) in &entries {
        assert_eq!(client.get(key).unwrap().as_deref(), Some(value.as_bytes()), "{key}");
    }
    // Reading many keys at once, with absent ones in between.
    let keys: Vec<String> = vec!["key-00000".into(), "nope".into(), "key-09999".into()];
    let values = client.get_many(&keys).unwrap();
    assert_eq!(values, vec![Some("value-0".into()), None, Some("value-9999".into())]);
    let error = client.get_many(["ok", ""]).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::EmptyKey));
    // A key given twice takes its last value.
    client.bulk_set([("dup", "one"), ("other", "1"), ("dup", "two"), ("dup", "three"), ("a", "2")]).unwrap();
    assert_eq!(client.get("dup").unwrap().as_deref(), Some(&b"three"[..]));
    assert_eq!(client.get_many(["other", "a"]).unwrap(), vec![Some("1".into()), Some("2".into())]);
}

#[test]
fn limits_at_and_over_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--bulk-entries-max", "10"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    let max_value = vec![b'v'; 4 << 20];
    client.set("big", &max_value).unwrap();
    assert_eq!(client.get("big").unwrap().unwrap().len(), 4 << 20);
    let error = client.set("bigger", vec![b'v'; (4 << 20) + 1]).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::ValueTooLarge), "{error}");
    assert!(error.to_string().contains("exceeds the limit"), "{error}");

    client.set(vec![b'k'; 4096], "v").unwrap();
    let error = client.set(vec![b'k'; 4097], "v").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::KeyTooLarge), "{error}");

    let error = client.set("", "v").unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::EmptyKey), "{error}");
    assert_eq!(client.get("").unwrap_err().kind(), Some(ErrorKind::EmptyKey));

    client.bulk_set((0..10).map(|i| (format!("b{i}"), "v"))).unwrap();
    let error = client.bulk_set((0..11).map(|i| (format!("c{i}"), "v"))).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::BulkTooLarge), "{error}");
    // A bulk set with one bad entry writes nothing.
    let error = client.bulk_set([("good", "v"), ("", "v")]).unwrap_err();
    assert_eq!(error.kind(), Some(ErrorKind::EmptyKey));
    assert_eq!(client.get("good").unwrap(), None);
    assert_eq!(client.get("c0").unwrap(), None);
    // The connection is still fine after refused requests.
    assert_eq!(client.get("b9").unwrap().as_deref(), Some(&b"v"[..]));
}

/// Sends raw bytes and reads the node's one answer frame.
fn raw_exchange(addr: &str, bytes: &[u8]) -> (Response, bool) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; wire::frame_len(header)];
    stream.read_exact(&mut body).unwrap();
    let response: Response = postcard::from_bytes(&body).unwrap();
    // The node closes the connection after a bad frame.
    let mut rest = Vec::new();
    let closed = matches!(stream.read_to_end(&mut rest), Ok(0));
    (response, closed)
}

#[test]
fn malformed_frame_gets_an_error_and_others_are_still_served() {
    let (_dir, node, client) = node();
    // A body that starts with a valid id (42) and then is garbage.
    let body = [42u8, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let (response, closed) = raw_exchange(&node.addr, &frame);
    assert_eq!(response.id, 42);
    assert_eq!(response.result.unwrap_err().kind, ErrorKind::Malformed);
    assert!(closed, "the connection should be closed after a malformed frame");
    client.set("still", "serving").unwrap();
    assert_eq!(client.get("still").unwrap().as_deref(), Some(&b"serving"[..]));
}

#[test]
fn frame_claiming_4_gib_is_refused_without_buffering_it() {
    let (_dir, node, client) = node();
    let (response, closed) = raw_exchange(&node.addr, &u32::MAX.to_be_bytes());
    assert_eq!(response.id, 0);
    let error = response.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::FrameTooLarge);
    assert!(error.message.contains("4294967295"), "{}", error.message);
    assert!(closed);
    client.set("still", "serving").unwrap();
    assert_eq!(client.status().unwrap().client_addr, node.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_distinct_and_shared_keys() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let mut tasks = Vec::new();
    for c in 0..16 {
        let addr = node.addr.clone();
        tasks.push(tokio::spawn(async move {
            let client = Arc::new(quiver_client::Client::connect([addr]).await.unwrap());
            // Each client pipelines its requests over its one connection.
            let mut calls = Vec::new();
            for i in 0..100 {
                let client = client.clone();
                calls.push(tokio::spawn(async move {
                    client.set(format!("own-{c}-{i}"), format!("{c}:{i}")).await.unwrap();
                    client.set(format!("shared-{}", i % 5), format!("{c}:{i}")).await.unwrap();
                }));
            }
            for call in calls {
                call.await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let client = quiver_client::Client::connect([node.addr.clone()]).await.unwrap();
    for c in 0..16 {
        for i in 0..100 {
            let value = client.get(format!("own-{c}-{i}")).await.unwrap();
            assert_eq!(value, Some(format!("{c}:{i}").into()));
        }
    }
    for k in 0..5 {
        // Some client's write to this key won; it must be one that was made.
        let value = client.get(format!("shared-{k}")).await.unwrap().unwrap();
        let text = String::from_utf8(value.to_vec()).unwrap();
        let (c, i) = text.split_once(':').unwrap();
        let (c, i): (u32, u32) = (c.parse().unwrap(), i.parse().unwrap());
        assert!(c < 16 && i < 100 && i % 5 == k, "{text}");
    }
}

#[test]
fn a_client_sees_its_own_writes_in_order() {
    let (_dir, _node, client) = node();
    for i in 0..300 {
        client.set("counter", i.to_string()).unwrap();
        assert_eq!(client.get("counter").unwrap(), Some(i.to_string().into()));
    }
}

#[test]
fn a_client_stalled_mid_frame_does_not_block_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("k", "v").unwrap();
    // A header announcing 100 bytes, then only 3 of them, then silence.
    let mut stalled = TcpStream::connect(&node.addr).unwrap();
    stalled.write_all(&100u32.to_be_bytes()).unwrap();
    stalled.write_all(b"abc").unwrap();
    // The stalled connection's reader is now (almost surely) waiting for the
    // rest of the body; the node must still stop when asked.
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    let status = node.terminate_within(std::time::Duration::from_secs(60)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "quiverd did not exit cleanly on SIGTERM: {status:?}");
    drop(stalled);
}

#[test]
fn sigint_shuts_down_gracefully_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    Client::connect([node.addr.clone()]).unwrap().set("k", "before SIGINT").unwrap();
    let pid = node.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    assert!(node.wait().unwrap().success());
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"before SIGINT"[..]));
}

#[test]
fn config_file_sets_limits_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quiver.toml");
    std::fs::write(&config, "[limits]\nkey_bytes_max = 10\nvalue_bytes_max = 100\n").unwrap();
    let data = dir.path().join("data");
    let node = start_node(&data, &["--config", config.to_str().unwrap(), "--value-bytes-max", "200"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("0123456789", "v").unwrap();
    assert_eq!(client.set("0123456789a", "v").unwrap_err().kind(), Some(ErrorKind::KeyTooLarge));
    client.set("k", vec![b'v'; 200]).unwrap();
    assert_eq!(client.set("k", vec![b'v'; 201]).unwrap_err().kind(), Some(ErrorKind::ValueTooLarge));
}

#[test]
fn a_bad_config_file_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quiver.toml");
    std::fs::write(&config, "client_adr = \"127.0.0.1:1\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_quiverd"))
        .args(["--config", config.to_str().unwrap(), "--data-dir", dir.path().join("d").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("quiver.toml") && stderr.contains("client_adr"), "{stderr}");
}
