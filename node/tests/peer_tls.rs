//! Peer links over real QUIC sockets on loopback: nodes with certificates
//! from the cluster CA talk, and each request reaches the node with the
//! member its certificate names; a peer with a certificate from another
//! CA, or with none, is refused during the handshake, and one with a
//! certificate from the cluster's CA for a name that is not a member has
//! its connection closed: their requests never reach the node.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiver_node::messages::{PeerReply, PeerRequest};
use quiver_node::net::peer::{LinkBounds, LinkStats, PeerEndpoint, PeerError, PeerHandler, Reply};
use quiver_node::net::tls::{init_ca, issue_node, NodeTls};
use quiver_ring::{Hlc, NodeId};

/// A bound on each call, not a timing assertion.
const CALL: Duration = Duration::from_secs(30);

/// Answers pings, and counts the requests that reached it; admits n1, n2
/// and n3, and keeps the name each request came from.
struct Counting(AtomicUsize, std::sync::Mutex<Vec<String>>);

impl Counting {
    fn new() -> Counting {
        Counting(AtomicUsize::new(0), std::sync::Mutex::default())
    }
}

impl PeerHandler for Counting {
    fn admitted(&self) -> Vec<String> {
        ["n1", "n2", "n3"].map(String::from).to_vec()
    }

    fn handle(&self, from: &str, request: PeerRequest, reply: Reply) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.lock().unwrap().push(from.to_owned());
        if let PeerRequest::Ping { hlc, .. } = request {
            reply(pong(hlc));
        }
    }
}

/// A cluster CA in `dir/ca`, and each node's certificate in `dir/NAME`.
fn certs(dir: &Path, names: &[&str]) {
    init_ca(&dir.join("ca")).unwrap();
    for name in names {
        issue_node(&dir.join("ca"), &dir.join(name), name, &["127.0.0.1".parse().unwrap()]).unwrap();
    }
}

fn endpoint(dir: &Path, name: &str) -> PeerEndpoint {
    bounded_endpoint(dir, name, LinkBounds::default())
}

fn bounded_endpoint(dir: &Path, name: &str, bounds: LinkBounds) -> PeerEndpoint {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    PeerEndpoint::bind(addr, NodeTls::load(&dir.join(name), name).unwrap(), bounds).unwrap()
}

/// What the test handlers answer a ping with.
fn pong(hlc: Hlc) -> PeerReply {
    PeerReply::Pong { from: NodeId(1), hlc, wall_ms: 5, keys: 0, storage_failure: None, members: Vec::new() }
}

fn ping() -> PeerRequest {
    PeerRequest::Ping { from: NodeId(2), hlc: Hlc(7) }
}

#[tokio::test]
async fn nodes_of_one_cluster_ca_talk_and_strangers_are_refused() {
    let cluster = tempfile::tempdir().unwrap();
    certs(cluster.path(), &["n1", "n2", "n3", "n9"]);
    let other = tempfile::tempdir().unwrap();
    certs(other.path(), &["n3"]);

    let n1 = endpoint(cluster.path(), "n1");
    let handler = Arc::new(Counting::new());
    n1.serve(handler.clone());
    let n1_addr = n1.local_addr().unwrap();

    // A node of the cluster: its pings are answered, many on one link.
    let n2 = endpoint(cluster.path(), "n2");
    let link = n2.link("n1", n1_addr);
    for _ in 0..3 {
        assert_eq!(link.call(ping(), CALL).await.unwrap(), pong(Hlc(7)));
    }
    assert_eq!(handler.0.load(Ordering::SeqCst), 3);
    assert_eq!(*handler.1.lock().unwrap(), ["n2", "n2", "n2"], "each request comes with its sender's name");

    // A certificate from the cluster's CA for a name that is no member:
    // its connection is closed before anything is read.
    let n9 = endpoint(cluster.path(), "n9");
    let stranger_member = n9.link("n1", n1_addr).call(ping(), CALL).await;
    assert!(matches!(stranger_member, Err(PeerError::Link { .. })), "{stranger_member:?}");

    // The same name with a certificate from another CA: refused.
    let stranger = endpoint(other.path(), "n3");
    let refused = stranger.link("n1", n1_addr).call(ping(), CALL).await;
    assert!(matches!(refused, Err(PeerError::Link { .. })), "{refused:?}");

    // A client that presents no certificate: refused.
    let n3 = endpoint(cluster.path(), "n3");
    let anonymous = n3.link_without_certificate("n1", n1_addr).unwrap().call(ping(), CALL).await;
    assert!(matches!(anonymous, Err(PeerError::Link { .. })), "{anonymous:?}");
    assert_eq!(handler.0.load(Ordering::SeqCst), 3, "no request from a stranger reached the node");

    // And a node of the cluster does not trust a server of another CA.
    stranger.serve(Arc::new(Counting::new()));
    let fake = n2.link("n3", stranger.local_addr().unwrap()).call(ping(), CALL).await;
    assert!(matches!(fake, Err(PeerError::Link { .. })), "{fake:?}");

    // The cluster's own link still works.
    assert!(link.call(ping(), CALL).await.is_ok());
}

/// `try_send` gives the request back while no link is up; on a live link
/// it delivers at once and the answer comes to its callback; when the peer
/// goes away, a request left unanswered gets an error, not silence.
#[tokio::test]
async fn try_send_delivers_on_a_live_link_and_a_lost_link_answers_with_an_error() {
    let cluster = tempfile::tempdir().unwrap();
    certs(cluster.path(), &["n1", "n2"]);
    let n1 = endpoint(cluster.path(), "n1");
    n1.serve(Arc::new(Counting::new()));
    let n2 = endpoint(cluster.path(), "n2");
    let link = n2.link("n1", n1.local_addr().unwrap());

    let refused = link.try_send(ping(), Box::new(|_| panic!("nothing was sent")));
    assert!(matches!(refused, Err((PeerRequest::Ping { .. }, _))), "no live link yet");
    link.call(ping(), CALL).await.unwrap();
    let (done, answer) = tokio::sync::oneshot::channel();
    assert!(link.try_send(ping(), Box::new(move |reply| drop(done.send(reply)))).is_ok());
    assert!(matches!(answer.await.unwrap(), Ok(PeerReply::Pong { .. })));

    // A request n1 never answers (it is not a ping), then n1 closes.
    let (done, answer) = tokio::sync::oneshot::channel();
    assert!(link.try_send(PeerRequest::Read { key: b"k".to_vec() }, Box::new(move |r| drop(done.send(r)))).is_ok());
    n1.close().await;
    let lost = tokio::time::timeout(CALL, answer).await.expect("answered within the bound").unwrap();
    assert!(matches!(lost, Err(PeerError::Link { .. })), "{lost:?}");
}

/// Answers pings at once; holds every other request's reply until the test
/// answers it.
struct Holding {
    held: std::sync::Mutex<Vec<Reply>>,
    arrived: tokio::sync::Notify,
}

impl PeerHandler for Holding {
    fn admitted(&self) -> Vec<String> {
        vec!["n2".into()]
    }

    fn handle(&self, _from: &str, request: PeerRequest, reply: Reply) {
        match request {
            PeerRequest::Ping { hlc, .. } => reply(pong(hlc)),
            _ => {
                self.held.lock().unwrap().push(reply);
                self.arrived.notify_one();
            }
        }
    }
}

fn read() -> PeerRequest {
    PeerRequest::Read { key: b"k".to_vec() }
}

/// A link with as many requests awaiting answers as its bound refuses the
/// next at once (`Busy`), and counts it; a node serving a peer with as
/// many requests being answered as its bound reads no more of them until
/// one is answered.
#[tokio::test]
async fn a_link_at_its_bound_refuses_at_once_and_a_peer_past_its_bound_waits() {
    let cluster = tempfile::tempdir().unwrap();
    certs(cluster.path(), &["n1", "n2"]);
    let n1 = bounded_endpoint(cluster.path(), "n1", LinkBounds { requests_in_flight_max: 2, ..LinkBounds::default() });
    let holding = Arc::new(Holding { held: std::sync::Mutex::default(), arrived: tokio::sync::Notify::new() });
    n1.serve(holding.clone());
    let n2 = bounded_endpoint(cluster.path(), "n2", LinkBounds { requests_in_flight_max: 3, ..LinkBounds::default() });
    let link = n2.link("n1", n1.local_addr().unwrap());
    link.call(ping(), CALL).await.unwrap();

    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..4 {
        let answers = answers.clone();
        assert!(link.try_send(read(), Box::new(move |reply| drop(answers.send(reply)))).is_ok());
    }
    let refused = answered.recv().await.unwrap();
    assert!(matches!(refused, Err(PeerError::Busy { .. })), "the fourth is refused at once: {refused:?}");
    let stats = n2.stats();
    assert_eq!((LinkStats::get(&stats.refused_in_flight), link.in_flight()), (1, 3));

    // n1 answers two at a time: the third is not read until one is done.
    let served = n1.stats();
    let started = std::time::Instant::now();
    while LinkStats::get(&served.serving_paused) == 0 {
        assert!(started.elapsed() < CALL, "n1 never reached its bound");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(holding.held.lock().unwrap().len(), 2, "no more than two are being answered");
    let first = holding.held.lock().unwrap().remove(0);
    first(PeerReply::Found(None));
    assert!(matches!(answered.recv().await.unwrap(), Ok(PeerReply::Found(None))));
    let third = async {
        while holding.held.lock().unwrap().len() < 2 {
            holding.arrived.notified().await;
        }
    };
    tokio::time::timeout(CALL, third).await.expect("the third is read once a slot is free");
}

/// An answer larger than the peer frame limit becomes an error answer:
/// the caller hears at once, rather than waiting for its deadline.
#[tokio::test]
async fn an_answer_past_the_frame_limit_becomes_an_error_answer() {
    use quiver_ring::wire::ErrorKind;
    let cluster = tempfile::tempdir().unwrap();
    certs(cluster.path(), &["n1", "n2"]);
    let n1 = bounded_endpoint(cluster.path(), "n1", LinkBounds { frame_bytes_max: 1024, ..LinkBounds::default() });
    let holding = Arc::new(Holding { held: std::sync::Mutex::default(), arrived: tokio::sync::Notify::new() });
    n1.serve(holding.clone());
    let n2 = endpoint(cluster.path(), "n2");
    let link = n2.link("n1", n1.local_addr().unwrap());
    let call = tokio::spawn(async move { link.call(read(), CALL).await });
    while holding.held.lock().unwrap().is_empty() {
        holding.arrived.notified().await;
    }
    let reply = holding.held.lock().unwrap().remove(0);
    let big = quiver_ring::Stamp { node: NodeId(1), hlc: Hlc(1) }.blind(Some(vec![7; 4096]));
    reply(PeerReply::Found(Some(quiver_ring::Siblings::one(big))));
    match call.await.unwrap().unwrap() {
        PeerReply::Failed(error) => assert_eq!(error.kind, ErrorKind::ResponseTooLarge, "{error:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(LinkStats::get(&n1.stats().answers_too_large), 1);
}
