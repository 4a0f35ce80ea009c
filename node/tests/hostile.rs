//! A real `quiverd` against what a hostile or broken client sends: requests
//! over the limits that skip the client library's checks, answers too large
//! for a frame, admin requests without the token, and tens of thousands of
//! random and half-valid frames. The node answers each with an error, loses
//! nothing and keeps running.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::start_node;
use quiver_client::blocking::Client;
use quiver_client::ErrorKind;
use quiver_ring::rand::SplitMix64;
use quiver_ring::wire::{self, Op, Reply, Request, Response};
use quiver_ring::Hlc;

/// A raw connection that sends frames as given and reads answers.
struct Raw(TcpStream);

/// A request as a client of this protocol sends it.
fn request(id: u64, op: Op) -> Request {
    Request { id, hlc_seen: Hlc::ZERO, op, deadline: Hlc(u64::MAX), consistency: None }
}

impl Raw {
    /// A connection that has made the handshake.
    fn connect(addr: &str) -> Raw {
        let mut raw = Raw::connect_without_hello(addr);
        let hello = raw.call(Op::Hello { protocol: wire::PROTOCOL_VERSION });
        assert!(matches!(hello.result, Ok(Reply::Hello(_))), "{hello:?}");
        raw
    }

    fn connect_without_hello(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        // A bound on the test, not a timing assertion.
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Raw(stream)
    }

    fn send(&mut self, id: u64, op: Op) {
        let mut frame = Vec::new();
        wire::encode_frame(&mut frame, &request(id, op), usize::MAX).unwrap();
        self.0.write_all(&frame).unwrap();
    }

    /// Whether the node closed the connection (no more answers).
    fn is_closed(&mut self) -> bool {
        matches!(self.0.read(&mut [0u8; 1]), Ok(0))
    }

    fn answer(&mut self) -> Response {
        let mut header = [0u8; wire::LEN_BYTES];
        self.0.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; wire::frame_len(header)];
        self.0.read_exact(&mut body).unwrap();
        postcard::from_bytes(&body).unwrap()
    }

    fn call(&mut self, op: Op) -> Response {
        self.send(1, op);
        self.answer()
    }
}

fn kind(response: &Response) -> Option<ErrorKind> {
    response.result.as_ref().err().map(|e| e.kind)
}

/// A connection must open with `Hello` of this protocol: any other first
/// request, a `Hello` of another version, and a `Hello` of protocol 2
/// (which does not decode in this one) are each answered with
/// `UnsupportedProtocol`, and the connection is closed.
#[test]
fn a_connection_opens_with_the_handshake_of_this_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let mut raw = Raw::connect_without_hello(&node.addr);
    let answer = raw.call(Op::Get { key: b"k".to_vec() });
    assert_eq!(kind(&answer), Some(ErrorKind::UnsupportedProtocol), "{answer:?}");
    assert!(answer.result.unwrap_err().message.contains("opens with Hello"));
    assert!(raw.is_closed());

    let mut raw = Raw::connect_without_hello(&node.addr);
    let answer = raw.call(Op::Hello { protocol: wire::PROTOCOL_VERSION + 1 });
    assert_eq!(kind(&answer), Some(ErrorKind::UnsupportedProtocol), "{answer:?}");
    assert!(raw.is_closed());

    // Protocol 2's request: id, hlc_seen, then the op (Hello is op 7).
    let mut raw = Raw::connect_without_hello(&node.addr);
    raw.0.write_all(&[0, 0, 0, 4, 9, 0, 7, 2]).unwrap();
    let answer = raw.answer();
    assert_eq!(answer.id, 9);
    let error = answer.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::UnsupportedProtocol);
    assert!(error.message.contains("the client 2"), "{}", error.message);
    assert!(raw.is_closed());

    let mut raw = Raw::connect(&node.addr);
    assert_eq!(raw.call(Op::Set { key: vec![1], value: vec![2] }).result, Ok(Reply::Done));
}

/// The client library refuses these before sending; the node must refuse
/// them too, on a connection that stays open.
#[test]
fn the_node_itself_refuses_requests_over_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--bulk-entries-max", "10", "--key-bytes-max", "8", "--value-bytes-max", "16"]);
    let mut raw = Raw::connect(&node.addr);
    let cases = [
        (Op::Get { key: vec![] }, ErrorKind::EmptyKey),
        (Op::Set { key: vec![1; 9], value: vec![] }, ErrorKind::KeyTooLarge),
        (Op::Set { key: vec![1], value: vec![0; 17] }, ErrorKind::ValueTooLarge),
        (Op::GetMany { keys: vec![vec![1]; 11] }, ErrorKind::BulkTooLarge),
        (Op::BulkSet { entries: vec![(vec![1], vec![2]); 11] }, ErrorKind::BulkTooLarge),
        (Op::BulkSet { entries: vec![(vec![1], vec![2]), (vec![], vec![2])] }, ErrorKind::EmptyKey),
    ];
    for (op, expected) in cases {
        let answer = raw.call(op.clone());
        assert_eq!(kind(&answer), Some(expected), "{op:?}: {answer:?}");
    }
    assert_eq!(raw.call(Op::Set { key: vec![1], value: vec![0; 16] }).result, Ok(Reply::Done));
    assert_eq!(raw.call(Op::Get { key: vec![1] }).result, Ok(Reply::Value(Some(vec![0; 16]))));
    // The client learns the limits in its handshake and refuses the same.
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.limits().unwrap().bulk_entries_max, 10);
    assert_eq!(client.set("k", [0u8; 17]).unwrap_err().kind(), Some(ErrorKind::ValueTooLarge));
}

/// A `get_many` whose answer would not fit in a frame is answered with
/// `ResponseTooLarge` naming the limit; the request behind it on the same
/// connection is answered, and the connection stays open.
#[test]
fn an_answer_over_the_frame_limit_is_refused_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--value-bytes-max", "1000", "--frame-bytes-max", "10000"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    for part in 0..4 {
        client.bulk_set((part * 5..part * 5 + 5).map(|i| (format!("k{i:02}"), vec![b'v'; 1000]))).unwrap();
    }
    let mut raw = Raw::connect(&node.addr);
    raw.send(1, Op::GetMany { keys: (0..20).map(|i| format!("k{i:02}").into_bytes()).collect() });
    raw.send(2, Op::Get { key: b"k03".to_vec() });
    let mut answers = [raw.answer(), raw.answer()];
    answers.sort_by_key(|a| a.id);
    let error = answers[0].result.clone().unwrap_err();
    assert_eq!(error.kind, ErrorKind::ResponseTooLarge, "{error:?}");
    assert!(error.message.contains("bytes one response can carry"), "{}", error.message);
    assert_eq!(answers[1].result, Ok(Reply::Value(Some(vec![b'v'; 1000]))));
    // Still open: fewer keys at a time fit.
    raw.send(3, Op::GetMany { keys: (0..5).map(|i| format!("k{i:02}").into_bytes()).collect() });
    let answer = raw.answer();
    assert_eq!(answer.id, 3);
    assert_eq!(answer.result, Ok(Reply::Values(vec![Some(vec![b'v'; 1000]); 5])));
    assert_eq!(client.get_many(["k00", "k19"]).unwrap().len(), 2);
}

#[test]
fn shutdown_needs_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    // Once a 3-byte frame `00 00 06` stopped a node: it is now a shutdown
    // without its token, which does not decode.
    let mut raw = Raw::connect(&node.addr);
    raw.0.write_all(&[0, 0, 0, 3, 0, 0, 6]).unwrap();
    assert_eq!(kind(&raw.answer()), Some(ErrorKind::Malformed));
    for token in ["", "0123456789abcdef0123456789abcdef", "not a token at all"] {
        let answer = Raw::connect(&node.addr).call(Op::Shutdown { token: token.into() });
        assert_eq!(kind(&answer), Some(ErrorKind::Forbidden), "{token:?}: {answer:?}");
    }
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("still", "up").unwrap();
    assert_eq!(client.shutdown_node("wrong").unwrap_err().kind(), Some(ErrorKind::Forbidden));
    let token = quiver_node::identity::read_admin_token(dir.path()).unwrap();
    client.shutdown_node(&token).unwrap();
    assert!(node.wait().unwrap().success());
}

/// Frames of one of five kinds: random bytes; a length and a random body;
/// a length alone, often far too large; a valid id and timestamp before
/// random op bytes; a valid request that is not allowed (shutdown with a
/// random token) or harmless (a read of a random key).
fn hostile_frame(rng: &mut SplitMix64, out: &mut Vec<u8>) {
    let random_bytes = |rng: &mut SplitMix64, n: u64| (0..n).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>();
    match rng.between(0, 5) {
        0 => {
            let n = rng.between(1, 64);
            out.extend(random_bytes(rng, n));
        }
        1 => {
            let n = rng.between(0, 300);
            out.extend_from_slice(&(n as u32).to_be_bytes());
            out.extend(random_bytes(rng, n));
        }
        2 => out.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes()),
        3 => {
            let mut body = Vec::new();
            wire::encode_frame(&mut body, &(rng.next_u64(), rng.next_u64()), usize::MAX).unwrap();
            let mut body = body.split_off(wire::LEN_BYTES);
            let n = rng.between(1, 40);
            body.extend(random_bytes(rng, n));
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend(body);
        }
        _ => {
            let op = if rng.chance(0.5) {
                Op::Shutdown { token: format!("{:032x}", rng.next_u64()) }
            } else {
                Op::Get { key: random_bytes(rng, 8) }
            };
            let request = Request { hlc_seen: Hlc(rng.next_u64() >> 20), ..request(rng.next_u64(), op) };
            wire::encode_frame(out, &request, usize::MAX).unwrap();
        }
    }
}

#[test]
fn stray_and_hostile_frames_stop_nothing_and_lose_nothing() {
    let seed = std::env::var("QUIVER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f00d);
    println!("seed {seed} (QUIVER_FUZZ_SEED replays it)");
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    let entries: Vec<(String, String)> = (0..1000).map(|i| (format!("before-{i:04}"), format!("value-{i}"))).collect();
    client.bulk_set(entries.clone()).unwrap();

    let mut rng = SplitMix64::new(seed);
    let (connections, frames_each) = (2_000, 15);
    for _ in 0..connections {
        let mut frames = Vec::new();
        // Most connections open as a client would, so the frames after
        // the handshake are tried too.
        if rng.chance(0.9) {
            wire::encode_frame(&mut frames, &request(0, Op::Hello { protocol: wire::PROTOCOL_VERSION }), usize::MAX)
                .unwrap();
        }
        for _ in 0..frames_each {
            hostile_frame(&mut rng, &mut frames);
        }
        let Ok(mut stream) = TcpStream::connect(&node.addr) else {
            panic!("seed {seed}: the node stopped accepting connections");
        };
        // The node may close the connection at the first bad frame, before
        // the rest is written: that is fine.
        let _ = stream.write_all(&frames);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Read what it answers until it closes, so each connection is
        // served before the next (a bound, not a timing assertion).
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = stream.read_to_end(&mut Vec::new());
    }

    assert!(node.try_wait().unwrap().is_none(), "seed {seed}: quiverd exited");
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("after", "the storm").unwrap();
    let keys: Vec<&String> = entries.iter().map(|(k, _)| k).collect();
    let values = client.get_many(keys).unwrap();
    for ((key, value), got) in entries.iter().zip(values) {
        assert_eq!(got.as_deref(), Some(value.as_bytes()), "seed {seed}: {key}");
    }
    assert_eq!(client.get("after").unwrap().as_deref(), Some(&b"the storm"[..]));
}

/// A node's bound as its `status` shows it, asked on a connection of its
/// own.
fn budget(addr: &str, name: &str) -> wire::BudgetInfo {
    common::budget_of(&Client::connect([addr.to_owned()]).unwrap(), name)
}

/// Waits (a bound of a minute, not a pace) until `ready` holds.
fn await_condition(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen within a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process's resident memory, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A connection that pipelines `gets` reads of the key `big` and reads
/// none of the answers, once the node has stopped reading it.
fn a_client_that_reads_nothing(addr: &str, gets: u64) -> Raw {
    let mut hog = Raw::connect(addr);
    let mut frames = Vec::new();
    for id in 0..gets {
        wire::encode_frame(&mut frames, &request(id, Op::Get { key: b"big".to_vec() }), usize::MAX).unwrap();
    }
    hog.0.write_all(&frames).unwrap();
    await_condition("the connection's pause", || budget(addr, "connection_answer_bytes_max").used == 1);
    hog
}

/// A client pipelines `get`s of a 4 MiB value and never reads an answer.
/// Before answers had a budget, the node read every request and kept every
/// answer, 4 MiB each (a gigabyte here); now it stops reading that
/// connection once 8 MiB wait, serves every other client meanwhile, and
/// closes the connection once its client has read nothing for the idle
/// timeout.
#[test]
fn a_client_that_never_reads_holds_at_most_its_answer_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget_bytes = 8 << 20;
    let node = start_node(
        dir.path(),
        &["--connection-answer-bytes-max", &budget_bytes.to_string(), "--idle-timeout-secs", "3"],
    );
    let client = Client::connect([node.addr.clone()]).unwrap();
    let big = vec![7u8; 4 << 20];
    client.set("big", &big).unwrap();
    assert_eq!(client.get("big").unwrap().map(|v| v.len()), Some(big.len()));
    let before = resident_bytes(node.pid());

    let mut hog = a_client_that_reads_nothing(&node.addr, 250);

    // Everyone else is served meanwhile.
    client.set("other", "served").unwrap();
    assert_eq!(client.get("other").unwrap().as_deref(), Some(&b"served"[..]));
    assert_eq!(client.get("big").unwrap().map(|v| v.len()), Some(big.len()));
    let grown = resident_bytes(node.pid()).saturating_sub(before);
    // The budget, the few answers the socket's buffers took, and room for
    // the allocator: far below the gigabyte that 250 answers are.
    assert!(grown < 160 << 20, "the node grew by {} MiB for a client that reads nothing", grown >> 20);

    // The idle timeout ends it: the writer gives up on a client that has
    // read nothing for that long, and the connection closes with most of
    // its answers never sent (what the kernel's buffers took arrives, then
    // the end).
    await_condition("the hog's pause to end", || budget(&node.addr, "connection_answer_bytes_max").used == 0);
    assert!(budget(&node.addr, "idle_timeout_ms").reached >= 1);
    let mut received = Vec::new();
    hog.0.read_to_end(&mut received).unwrap();
    assert!(
        received.len() < 20 * big.len(),
        "{} answers were sent to a client that read nothing",
        received.len() / big.len()
    );
}

/// Past `connections_max`, a new connection is refused with
/// `TooManyConnections` (counted in `status`), the connections already open
/// are served, and once one closes a new one is taken again.
#[test]
fn connections_past_the_limit_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--connections-max", "3"]);
    let first = Client::connect([node.addr.clone()]).unwrap();
    let _second = Raw::connect(&node.addr);
    let third = Raw::connect(&node.addr);
    let refused = Client::connect([node.addr.clone()]).unwrap_err();
    assert_eq!(refused.kind(), Some(ErrorKind::TooManyConnections), "{refused}");
    assert!(refused.to_string().contains("connections_max"), "{refused}");
    let of_first = |name: &str| common::budget_of(&first, name);
    let connections = of_first("connections_max");
    assert_eq!((connections.max, connections.used), (3, 3));
    assert!(connections.reached >= 1);
    first.set("still", "served").unwrap();
    drop(third);
    await_condition("a connection slot", || Client::connect([node.addr.clone()]).is_ok());
    assert!(of_first("connections_max").reached >= 1);
}

/// Started with a soft open-files limit of 256 (the shell's `ulimit`),
/// `quiverd` raises it to the hard limit: each connection holds a
/// descriptor, and 256 would run out at a few hundred clients.
#[test]
fn quiverd_raises_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_with_ulimit(dir.path(), "-Sn 256", &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", node.pid())).unwrap();
    let files = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "the soft limit is not the hard one: {files}");
    assert_ne!(numbers[0], "256", "{files}");
}

/// A `quiverd` run by a shell that first sets `ulimit` to `limit` (so the
/// node cannot raise it past that).
fn start_with_ulimit(dir: &std::path::Path, limit: &str, args: &[&str]) -> quiver_chaos::node::NodeProcess {
    let script = dir.join("quiverd-limited");
    let quiverd = env!("CARGO_BIN_EXE_quiverd");
    std::fs::write(&script, format!("#!/bin/sh\nulimit {limit}\nexec {quiverd} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = quiver_chaos::node::NodeSpec::new(&script, &dir.join("data")).args(args.iter().copied());
    quiver_chaos::node::NodeProcess::start(&spec).unwrap()
}

/// Idle connections take every file descriptor. Before, the next WAL
/// segment that could not be made stopped the engine until a restart,
/// and flushes that could not make their tables left writes waiting for
/// ever. Now such a write is refused at once (retryable), the listener
/// backs off, and once the connections go, writes resume, with every
/// acknowledged one there.
#[test]
fn descriptors_taken_by_idle_connections_refuse_writes_until_they_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    // Small WAL segments and memtables: new files every few dozen writes
    // (a segment, a table). The clock's high-water mark, a file too, is
    // written half the clock offset ahead of the stamps: half a minute
    // here, so that the test meets the engine's files first.
    let args = [
        "--wal-segment-bytes",
        "4096",
        "--memtable-bytes-max",
        "4096",
        "--hello-timeout-ms",
        "600000",
        "--max-clock-offset-ms",
        "60000",
    ];
    let node = start_with_ulimit(dir.path(), "-n 64", &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("before", "the descriptors ran out").unwrap();
    let open = |client: &Client| common::budget_of(client, "connections_max").used;
    let hogs: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(&node.addr).unwrap()).collect();
    await_condition("the node to take the connections it can", || open(&client) >= 30);
    let value = vec![b'v'; 100];
    let mut acked = Vec::new();
    let refused = (0..20_000).find_map(|i| {
        let key = format!("k{i:05}");
        match client.set(&key, &value) {
            Ok(()) => {
                acked.push(key);
                None
            }
            Err(error) => Some(error),
        }
    });
    let refused = refused.expect("no write was refused with every descriptor taken");
    assert_eq!(refused.kind(), Some(ErrorKind::StorageFailed), "{refused}");
    assert!(refused.to_string().contains("Too many open files"), "{refused}");
    assert_eq!(client.get("before").unwrap().as_deref(), Some(&b"the descriptors ran out"[..]), "reads go on");
    drop(hogs);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Err(error) = client.set("after", "descriptors came back") {
        assert!(std::time::Instant::now() < deadline, "writes still refused a minute later: {error}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for chunk in acked.chunks(1000) {
        assert!(client.get_many(chunk).unwrap().iter().all(Option::is_some), "an acknowledged write is missing");
    }
}

/// A connection that sends no `Hello` in time, one that stops half-way
/// through a frame, and one that says nothing for the idle timeout are
/// closed, and counted.
#[test]
fn silent_and_stalled_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &["--hello-timeout-ms", "300", "--idle-timeout-secs", "1"]);
    let mut silent = Raw::connect_without_hello(&node.addr);
    assert!(silent.is_closed(), "a connection without Hello stays open");
    let mut half = Raw::connect_without_hello(&node.addr);
    half.0.write_all(&[0, 0]).unwrap();
    assert!(half.is_closed(), "a connection that stopped half-way through a header stays open");
    let mut idle = Raw::connect(&node.addr);
    assert!(idle.is_closed(), "an idle connection stays open");
    assert_eq!(budget(&node.addr, "hello_timeout_ms").reached, 2);
    assert_eq!(budget(&node.addr, "idle_timeout_ms").reached, 1);
}

/// SIGTERM while a client reads none of its answers (and holds its
/// connection open): the node drops that connection after the grace
/// period, flushes and exits, and the data is there after a restart.
#[test]
fn shutdown_finishes_with_a_client_that_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--shutdown-grace-ms", "200", "--connection-answer-bytes-max", "4194304"];
    let mut node = start_node(dir.path(), &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("big", vec![1u8; 4 << 20]).unwrap();
    let hog = a_client_that_reads_nothing(&node.addr, 40);
    let status = node.terminate_within(Duration::from_secs(60)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "quiverd did not stop with a client that reads nothing");
    drop(hog);
    let node = start_node(dir.path(), &[]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.get("big").unwrap().map(|v| v.len()), Some(4 << 20));
}

/// A `get_many` that announces a billion keys in a frame of a few bytes is
/// refused before any is decoded, and the connection goes on. (Before, a
/// frame of empty keys cost the node tens of times its own size.)
#[test]
fn a_list_longer_than_the_limit_is_refused_before_it_is_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &[]);
    let mut raw = Raw::connect(&node.addr);
    // id 5, hlc 0, op GetMany (1), then 1,000,000,000 as a varint.
    let body = [5, 0, 1, 0x80, 0x94, 0xeb, 0xdc, 0x03];
    raw.0.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    raw.0.write_all(&body).unwrap();
    let answer = raw.answer();
    assert_eq!((answer.id, kind(&answer)), (5, Some(ErrorKind::BulkTooLarge)), "{answer:?}");
    assert!(answer.result.unwrap_err().message.contains("1000000000 entries"));
    assert_eq!(raw.call(Op::Set { key: vec![1], value: vec![2] }).result, Ok(Reply::Done));
}

/// The data directory is its owner's alone, and so is every file in it.
#[test]
fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = start_node(&data, &["--memtable-bytes-max", "4096"]);
    let client = Client::connect([node.addr.clone()]).unwrap();
    for i in 0..200 {
        client.set(format!("k{i}"), vec![b'v'; 100]).unwrap();
    }
    await_condition("a table", || {
        std::fs::read_dir(&data).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".sst"))
    });
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    for name in ["NODE_ID", "ADMIN_TOKEN", "CONTEXT_SECRET", "LOCK", "MANIFEST"] {
        assert!(seen.iter().any(|s| s == name), "{name} not among {seen:?}");
    }
    assert!(seen.iter().any(|s| s.ends_with(".wal")), "{seen:?}");
}
