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

use quiver_node::net::peer::{PeerEndpoint, PeerError, PeerHandler, PeerReply, PeerRequest, Reply};
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
            reply(PeerReply::Pong {
                from: NodeId(1),
                hlc,
                wall_ms: 5,
                keys: 0,
                storage_failure: None,
                members: Vec::new(),
            });
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
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    PeerEndpoint::bind(addr, NodeTls::load(&dir.join(name), name).unwrap()).unwrap()
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
        assert_eq!(
            link.call(ping(), CALL).await.unwrap(),
            PeerReply::Pong {
                from: NodeId(1),
                hlc: Hlc(7),
                wall_ms: 5,
                keys: 0,
                storage_failure: None,
                members: Vec::new()
            }
        );
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
