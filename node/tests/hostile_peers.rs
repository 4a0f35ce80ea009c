//! Peers are trusted for what their certificates name, and no more.
//!
//! Four real `quiverd` processes (so that a node does not replicate every
//! key), n1 started with `--deny-node n4`. A test-only peer, built from
//! the project's own link code with n2's certificate (a compromised n2),
//! sends n1 what a member must not: a bulk set's log entry or its removal
//! in n3's name, writes of keys n1 does not replicate, hints for a node
//! that is no member, versions an hour ahead, a context claiming
//! `u64::MAX`, more siblings than the bound, a bulk set stamped an hour
//! ahead. Each is refused with its own error kind and nothing of it is
//! applied. A certificate from the cluster's CA for a name that is no
//! member, the denied n4's, and another CA's are refused before any
//! request is read. Through it all the cluster goes on serving.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{now_ms, wait_for, WAIT_MAX};
use quiver_chaos::node::{cluster_specs, NodeProcess};
use quiver_client::blocking::Client;
use quiver_client::ErrorKind;
use quiver_node::messages::{Hinted, PeerReply, PeerRequest};
use quiver_node::net::peer::{PeerEndpoint, PeerLink};
use quiver_node::net::tls::{init_ca, issue_node, NodeTls};
use quiver_ring::ring::{Member, Ring, RingView};
use quiver_ring::{BatchId, Causal, Context, Dot, Hlc, NodeId, Siblings, Stamp, Version};

/// A link from a peer with the certificate in `tls_dir` for `name`, to the
/// node whose peer address is `to`.
fn link_as(runtime: &tokio::runtime::Runtime, tls_dir: &Path, name: &str, to: &str) -> (PeerEndpoint, PeerLink) {
    let _entered = runtime.enter();
    let tls = NodeTls::load(tls_dir, name).unwrap();
    let endpoint = PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), tls, Default::default()).unwrap();
    let to: SocketAddr = to.parse().unwrap();
    let link = endpoint.link("n1", to);
    (endpoint, link)
}

/// The error kind a request was refused with (`None`: it was not).
fn refused(runtime: &tokio::runtime::Runtime, link: &PeerLink, request: PeerRequest) -> Option<ErrorKind> {
    match runtime.block_on(link.call(request, WAIT_MAX)).unwrap() {
        PeerReply::Failed(error) => Some(error.kind),
        _ => None,
    }
}

fn blind(node: NodeId, hlc: Hlc, value: &str) -> Siblings {
    Siblings::one(Stamp { node, hlc }.blind(Some(value.as_bytes().to_vec())))
}

#[test]
fn a_member_is_trusted_for_what_its_certificate_names_and_strangers_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let specs = cluster_specs(Path::new(env!("CARGO_BIN_EXE_quiverd")), dir.path(), 4).unwrap();
    let nodes: Vec<NodeProcess> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let spec = if i == 0 { spec.clone().args(["--deny-node", "n4"]) } else { spec.clone() };
            NodeProcess::start(&spec).unwrap()
        })
        .collect();
    let clients: Vec<Client> = nodes.iter().map(|n| Client::connect([n.addr.clone()]).unwrap().direct()).collect();
    let n1 = &clients[0];
    for client in &clients[1..3] {
        wait_for(client, "every peer up", |s| s.peers.iter().all(|p| p.up));
    }
    wait_for(&clients[3], "n4 refused by n1", |s| s.peers.iter().all(|p| p.up == (p.name != "n1")));
    let status = wait_for(n1, "n2 and n3 up, n4 denied", |s| {
        s.ring.len() == 4 && s.peers.iter().all(|p| p.up == (p.name != "n4"))
    });
    let ids: Vec<NodeId> = clients.iter().map(|c| NodeId(c.status().unwrap().node_id)).collect();
    let members =
        ids.iter().map(|&id| Member { id, name: String::new(), client_addr: String::new(), peer_addr: String::new() });
    let ring = Ring::new(RingView { epoch: 1, members: members.collect() });
    let key_of = |with: bool| {
        (0..)
            .map(|i| format!("hostile-{with}-{i}"))
            .find(|k| ring.preference_list(k.as_bytes(), 3).contains(&ids[0]) == with)
            .unwrap()
    };
    let (theirs, ours) = (key_of(false), key_of(true));
    assert!(status.peers.iter().any(|p| p.name == "n4" && !p.up), "n1 never dials the denied n4");

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let n1_peer = &specs[0].peer_addr;
    let (_n2_endpoint, n2) = link_as(&runtime, &dir.path().join("tls/n2"), "n2", n1_peer);
    let now = Hlc::from_physical_ms(now_ms());
    let ahead = Hlc::from_physical_ms(now_ms() + 3_600_000);
    let write = |sets: Vec<(Vec<u8>, Siblings)>, hints| PeerRequest::Write { sets, hints };
    let at = |key: &str, siblings: Siblings| vec![(key.as_bytes().to_vec(), siblings)];

    // In another member's name.
    let log = PeerRequest::LogBatch { coordinator: ids[2], id: now, sets: at(&ours, blind(ids[2], now, "x")) };
    assert_eq!(refused(&runtime, &n2, log), Some(ErrorKind::Forbidden), "a bulk set logged in n3's name");
    let done = PeerRequest::BatchDone { coordinator: ids[2], id: now };
    assert_eq!(refused(&runtime, &n2, done), Some(ErrorKind::Forbidden), "a bulk set removed in n3's name");
    let ahead_log = PeerRequest::LogBatch { coordinator: ids[1], id: ahead, sets: at(&ours, blind(ids[1], now, "x")) };
    assert_eq!(refused(&runtime, &n2, ahead_log), Some(ErrorKind::ClockSkew), "a bulk set stamped an hour ahead");
    assert_eq!(n1.status().unwrap().batches_pending, 0, "nothing was logged");

    // Keys n1 does not replicate; hints for no member.
    let theirs_write = write(at(&theirs, blind(ids[1], now, "x")), vec![]);
    assert_eq!(refused(&runtime, &n2, theirs_write), Some(ErrorKind::NotReplica));
    let theirs_repair = PeerRequest::Repair { sets: at(&theirs, blind(ids[1], now, "x")) };
    assert_eq!(refused(&runtime, &n2, theirs_repair), Some(ErrorKind::NotReplica), "an exchange's repair");
    let ahead_repair = PeerRequest::Repair { sets: at(&ours, blind(ids[1], ahead, "ahead")) };
    assert_eq!(refused(&runtime, &n2, ahead_repair), Some(ErrorKind::ClockSkew));
    let stranger_hint = vec![Hinted { owner: NodeId(12345), sets: at(&ours, blind(ids[1], now, "x")) }];
    assert_eq!(refused(&runtime, &n2, write(vec![], stranger_hint)), Some(ErrorKind::Forbidden));
    let own_hint = vec![Hinted { owner: ids[0], sets: at(&ours, blind(ids[1], now, "x")) }];
    assert_eq!(refused(&runtime, &n2, write(vec![], own_hint)), Some(ErrorKind::Forbidden), "hints for n1 itself");

    // Versions no client could send either.
    let hour_ahead = write(at(&ours, blind(ids[1], ahead, "ahead")), vec![]);
    assert_eq!(refused(&runtime, &n2, hour_ahead), Some(ErrorKind::ClockSkew));
    let context = Context { max_hlc: Hlc(u64::MAX), ..Context::default() };
    let causal = Causal { dot: Dot { node: ids[1], hlc: now }, context };
    let claiming = Version {
        hlc: now,
        origin: BatchId { node: ids[1], counter: now.0 },
        causal: Some(Box::new(causal)),
        value: Some(b"claims".to_vec()),
    };
    let claims_all = write(at(&ours, Siblings::one(claiming)), vec![]);
    assert_eq!(refused(&runtime, &n2, claims_all), Some(ErrorKind::InvalidContext));
    let many = (0..65u64).map(|i| Stamp { node: NodeId(1000 + i), hlc: now }.causal(Context::default(), Some(vec![1])));
    let many = Siblings::from_versions(many.collect());
    assert_eq!(many.len(), 65);
    assert_eq!(refused(&runtime, &n2, write(at(&ours, many), vec![])), Some(ErrorKind::TooManySiblings));

    // What a member may send still goes through.
    assert_eq!(refused(&runtime, &n2, write(at(&ours, blind(ids[1], now, "fine")), vec![])), None);

    // Strangers: a certificate from the cluster's CA for no member, the
    // denied n4's, another CA's: no request is answered.
    issue_node(&dir.path().join("ca"), &dir.path().join("tls/n9"), "n9", &["127.0.0.1".parse().unwrap()]).unwrap();
    let other = tempfile::tempdir().unwrap();
    init_ca(&other.path().join("ca")).unwrap();
    issue_node(&other.path().join("ca"), &other.path().join("n2"), "n2", &["127.0.0.1".parse().unwrap()]).unwrap();
    for (tls_dir, name) in
        [(dir.path().join("tls/n9"), "n9"), (dir.path().join("tls/n4"), "n4"), (other.path().join("n2"), "n2")]
    {
        let (_endpoint, link) = link_as(&runtime, &tls_dir, name, n1_peer);
        let ping = PeerRequest::Ping { from: ids[1], hlc: now };
        let answer = runtime.block_on(link.call(ping, WAIT_MAX));
        assert!(answer.is_err(), "{name} from {}: {answer:?}", tls_dir.display());
    }

    // The cluster goes on, and none of the refused writes is anywhere.
    n1.set("after", "v").unwrap();
    assert_eq!(clients[1].get("after").unwrap().as_deref(), Some(&b"v"[..]));
    let values: Vec<Option<Vec<u8>>> =
        n1.get_many([&theirs, &ours]).unwrap().into_iter().map(|v| v.map(|v| v.to_vec())).collect();
    assert_eq!(values, [None, Some(b"fine".to_vec())], "only the write a member may send was taken");
}
