//! Write deadlines: a write held back in the node past
//! its deadline is never applied, and the same client's next write wins.
//!
//! The node runs in this process with a test hook that holds one write
//! before it is stamped, as a slow coordinator would. Its client times out,
//! writes again (that write succeeds), and only then is the held write let
//! go: it reaches its stamp after its deadline, so it is refused.

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::InProcessNode;
use quiver_client::blocking::Client;
use quiver_client::{Error, ErrorKind};
use quiver_node::clock::{Clock, SystemClock};
use quiver_node::service::{HeldWrite, LocalStore, WriteHook};
use quiver_node::stamping::NodeClock;
use quiver_node::storage::{Engine, Options};
use quiver_ring::{NodeId, MAX_OFFSET_MS};

#[test]
fn a_write_held_past_its_deadline_is_never_applied_and_the_next_write_wins() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), Options::default()).unwrap());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let node_clock = Arc::new(NodeClock::unpersisted(NodeId(1), engine.max_hlc(), MAX_OFFSET_MS, clock.clone()));

    let (release, release_rx) = mpsc::channel();
    let (outcome_tx, outcome) = mpsc::channel();
    let held = Mutex::new(Some(HeldWrite { release: release_rx, outcome: outcome_tx }));
    let hook: WriteHook = Arc::new(move |entries| {
        let slow = entries.iter().any(|(_, value)| value.as_deref() == Some(&b"slow"[..]));
        if slow {
            held.lock().unwrap().take()
        } else {
            None
        }
    });
    let store = LocalStore::new(engine, node_clock.clone(), 2).unwrap().with_write_hook(hook);
    let node = InProcessNode::start(Arc::new(store), clock, node_clock);

    let client = Client::connect([node.addr.clone()]).unwrap().with_timeout(Duration::from_millis(300));
    client.set("k", "first").unwrap();
    let error = client.set("k", "slow").unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    client.set("k", "next").unwrap();

    release.send(()).unwrap();
    // A bound on the test, not a timing assertion.
    let held_outcome = outcome.recv_timeout(Duration::from_secs(60)).expect("the held write finished");
    let refused = held_outcome.unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Timeout, "{refused}");
    assert!(refused.message.contains("after its deadline"), "{refused}");

    let versions = client.get_versions("k").unwrap();
    let values: Vec<_> = versions.versions.iter().map(|v| v.value.as_deref()).collect();
    assert_eq!(values, [Some(&b"next"[..])], "the held write was never applied");
}
