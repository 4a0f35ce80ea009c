//! Reads run on the reader threads, never on the async workers: a node
//! served by a single async worker, holding a `get_many` of 100,000 keys in
//! the middle of its read, still answers a `set` and a `get` from another
//! connection.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::InProcessNode;
use quiver_client::Client;
use quiver_node::clock::SystemClock;
use quiver_node::service::{LocalStore, ReadHook};
use quiver_node::stamping::NodeClock;
use quiver_node::storage::keys::data_key;
use quiver_node::storage::{Engine, Op, Options};
use quiver_ring::{Hlc, NodeId, Stamper, MAX_OFFSET_MS};

const KEYS: usize = 100_000;

/// A bound on the test, not a timing assertion: a node that cannot answer
/// fails the test rather than hanging it.
const WAIT_MAX: Duration = Duration::from_secs(120);

fn key(i: usize) -> String {
    format!("key-{i:06}")
}

/// Holds the first chunk of a multi-key read until released.
struct Hold {
    held: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

#[test]
fn a_get_many_being_served_holds_up_no_other_connection() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), Options::default()).unwrap());
    let mut stamper = Stamper::new(NodeId(1), Hlc(0), u64::MAX);
    for batch in (0..KEYS).collect::<Vec<_>>().chunks(10_000) {
        let stamp = stamper.next(1).expect("a test clock never refuses");
        let ops =
            batch.iter().map(|&i| Op { key: data_key(key(i).as_bytes()), version: stamp.blind(Some(vec![b'v'; 8])) });
        engine.write_blocking(ops.collect()).unwrap();
    }

    let (held_tx, held) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let hold = Arc::new(Hold { held: Mutex::new(Some(held_tx)), release: Mutex::new(release_rx) });
    let hook: ReadHook = {
        let hold = hold.clone();
        Arc::new(move |chunk: &[Vec<u8>]| {
            if chunk.len() > 1 {
                if let Some(held) = hold.held.lock().unwrap().take() {
                    held.send(()).unwrap();
                    let _ = hold.release.lock().unwrap().recv_timeout(WAIT_MAX);
                }
            }
        })
    };
    let clock = Arc::new(SystemClock);
    let node_clock = Arc::new(NodeClock::unpersisted(NodeId(1), engine.max_hlc(), MAX_OFFSET_MS, clock.clone()));
    let store = LocalStore::with_read_hook(engine.clone(), node_clock.clone(), 2, Some(hook)).unwrap();

    // The node runs on one async worker: a read held there would hold
    // every connection.
    let node = InProcessNode::start(Arc::new(store), clock, node_clock);
    let addr = node.addr.clone();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let order = Arc::new(Mutex::new(Vec::new()));
        let reader = Client::connect([addr.clone()]).await.unwrap().with_timeout(WAIT_MAX);
        let other = Client::connect([addr.clone()]).await.unwrap().with_timeout(WAIT_MAX);
        let large = {
            let order = order.clone();
            tokio::spawn(async move {
                let values = reader.get_many((0..KEYS).map(key)).await;
                order.lock().unwrap().push("get_many");
                values
            })
        };
        tokio::task::spawn_blocking(move || held.recv_timeout(WAIT_MAX).expect("the get_many never reached a reader"))
            .await
            .unwrap();

        other.set("written", "while the get_many is held").await.unwrap();
        order.lock().unwrap().push("set");
        assert_eq!(other.get(key(7)).await.unwrap().as_deref(), Some(&b"vvvvvvvv"[..]));
        order.lock().unwrap().push("get");

        release.send(()).unwrap();
        let values = large.await.unwrap().unwrap();
        assert_eq!(values.len(), KEYS);
        assert!(values.iter().all(|v| v.as_deref() == Some(&b"vvvvvvvv"[..])));
        assert_eq!(*order.lock().unwrap(), ["set", "get", "get_many"]);
    });
    drop(node);
}
