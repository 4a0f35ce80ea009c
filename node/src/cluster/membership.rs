//! Membership from configuration, and heartbeats.
//!
//! - Owns: the configured peers (name and peer address) and what the last
//!   heartbeat to each found: up or down, its node id, its clock offset,
//!   whether its storage failed; the names denied (a lost machine's: never
//!   dialled, its connections refused); the ring, once every member's node
//!   id is known.
//! - Receives: nothing but time: every heartbeat (`heartbeat_ms`) it pings every peer
//!   over its peer link, and answers their pings ([`Membership::pong`]:
//!   its id, clocks, and the node ids it knows, so a node that restarts
//!   learns the ids of peers that are down).
//! - Does: estimates each peer's wall-clock offset from a ping's round trip
//!   (the peer's wall clock against the midpoint of this node's send and
//!   receive); when more than half of the configured peers are further off
//!   than the maximum offset, tells the node's clock to refuse to stamp
//!   writes ([`NodeClock::set_peer_skew`]), and lifts it once they are not.
//!   When no peer answers, the node is cut off ([`Membership::cut_off`]):
//!   it says so in `status` and the log, and tells clients to avoid it.
//! - Hands on: [`Membership::peers`] for `status`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use quiver_ring::ring::{Member, Ring, RingView};
use quiver_ring::wire::{ErrorKind, PeerInfo, ServerError};
use quiver_ring::NodeId;

use crate::clock::Clock;
pub use crate::config::PeerConfig;
use crate::lock;
use crate::messages::{KnownMember, PeerReply, PeerRequest};
use crate::net::peer::{LinkBounds, LinkStats, PeerEndpoint, PeerLink};
use crate::stamping::NodeClock;

#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    link: PeerLink,
    seen: Mutex<PeerInfo>,
}

/// The peers of a node and what its heartbeats know of them.
#[derive(Debug)]
pub struct Membership {
    me: NodeId,
    /// This node's name.
    name: String,
    /// Where clients reach this node.
    client_addr: String,
    peers: Vec<Peer>,
    /// Members whose connections are refused and who are never dialled.
    denied: Vec<String>,
    ring: OnceLock<Arc<Ring>>,
    /// The peer links' bounds, and what they hold.
    link_bounds: LinkBounds,
    link_stats: Arc<LinkStats>,
    clock: Arc<NodeClock>,
    wall: Arc<dyn Clock>,
    /// A round of heartbeats is done: until then, nothing is known.
    heard: AtomicBool,
    /// The node was cut off at the last round (logged once each way).
    was_cut_off: AtomicBool,
    /// How often each peer is pinged, and how long a ping may take.
    heartbeat: Duration,
}

impl Membership {
    /// The membership of node `me` with `peers`; heartbeats start with
    /// [`Membership::run`].
    pub fn new(
        endpoint: &PeerEndpoint,
        me: NodeId,
        name: String,
        client_addr: String,
        peers: Vec<PeerConfig>,
        clock: Arc<NodeClock>,
        wall: Arc<dyn Clock>,
    ) -> Membership {
        let peers = peers
            .into_iter()
            .map(|config| Peer {
                link: endpoint.link(&config.name, config.peer_addr),
                seen: Mutex::new(PeerInfo {
                    name: config.name.clone(),
                    peer_addr: config.peer_addr.to_string(),
                    node_id: None,
                    client_addr: String::new(),
                    up: false,
                    keys: None,
                    clock_offset_ms: None,
                    storage_failure: None,
                }),
                config,
            })
            .collect();
        let (link_bounds, link_stats) = (endpoint.bounds(), endpoint.stats());
        Membership {
            me,
            name,
            client_addr,
            peers,
            denied: Vec::new(),
            ring: OnceLock::new(),
            link_bounds,
            link_stats,
            clock,
            wall,
            heard: AtomicBool::new(false),
            was_cut_off: AtomicBool::new(false),
            heartbeat: crate::config::ClusterTimers::default().heartbeat,
        }
    }

    /// Pings every peer every `heartbeat`, each ping waiting as long.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Membership {
        self.heartbeat = heartbeat;
        self
    }

    /// Why this node is cut off from its cluster, while it is: it has
    /// peers, and none answered the last heartbeat (nothing is said before
    /// the first round).
    pub fn cut_off(&self) -> Option<String> {
        match self.heard.load(Ordering::Acquire) {
            false => None,
            true => cut_off(&self.peers()),
        }
    }

    /// Refuses the members named in `denied`: their connections are closed
    /// and they are never dialled (they stay down), as for a lost machine
    /// whose certificate must not be trusted any more.
    pub fn with_denied(mut self, denied: Vec<String>) -> Membership {
        self.denied = denied;
        self
    }

    /// The peer links' bounds, how often they were reached, and what the
    /// links hold now: requests awaiting answers and bytes queued, over
    /// every link.
    pub fn links(&self) -> (LinkBounds, &LinkStats, u64, u64) {
        let in_flight = self.peers.iter().map(|p| p.link.in_flight()).sum();
        let queued = self.peers.iter().map(|p| p.link.queued_bytes()).sum();
        (self.link_bounds, &self.link_stats, in_flight, queued)
    }

    /// The names of the peers this node takes connections from: the
    /// configured ones not denied.
    pub fn admitted(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.config.name.clone()).filter(|name| !self.denied.contains(name)).collect()
    }

    /// The node id of the member named `name` (this node too), once known.
    pub fn id_of(&self, name: &str) -> Option<NodeId> {
        if name == self.name {
            return Some(self.me);
        }
        let peer = self.peers.iter().find(|p| p.config.name == name)?;
        lock(&peer.seen).node_id.map(NodeId)
    }

    /// The ring, once every member's node id is known (until then
    /// `Unavailable`, naming a peer not heard from yet).
    pub fn ring(&self) -> Result<Arc<Ring>, ServerError> {
        if let Some(ring) = self.ring.get() {
            return Ok(ring.clone());
        }
        let mut members = vec![Member {
            id: self.me,
            name: self.name.clone(),
            client_addr: self.client_addr.clone(),
            peer_addr: String::new(),
        }];
        for peer in self.peers() {
            let Some(id) = peer.node_id else {
                return Err(ServerError::new(
                    ErrorKind::Unavailable,
                    format!("the node id of peer {} is not known yet (it has not answered a heartbeat)", peer.name),
                ));
            };
            members.push(Member {
                id: NodeId(id),
                name: peer.name,
                client_addr: String::new(),
                peer_addr: peer.peer_addr,
            });
        }
        let ring = Arc::new(Ring::new(RingView { epoch: 1, members }));
        Ok(self.ring.get_or_init(|| ring).clone())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// This node's name and client address.
    pub fn me(&self) -> KnownMember {
        KnownMember { name: self.name.clone(), id: self.me, client_addr: self.client_addr.clone() }
    }

    /// The answer to a peer's heartbeat: `keys` is this node's key count,
    /// `storage_failure` why its storage stopped taking writes.
    pub fn pong(&self, keys: u64, storage_failure: Option<String>) -> PeerReply {
        let mut members = vec![self.me()];
        members.extend(
            self.peers()
                .into_iter()
                .filter_map(|p| Some(KnownMember { name: p.name, id: NodeId(p.node_id?), client_addr: p.client_addr })),
        );
        let (hlc, wall_ms) = (self.clock.last(), self.wall.now_ms());
        PeerReply::Pong { from: self.me, hlc, wall_ms, keys, storage_failure, members }
    }

    /// The link to the peer whose node id is `id`, once known.
    pub fn link_to(&self, id: NodeId) -> Option<&PeerLink> {
        self.peers.iter().find(|p| lock(&p.seen).node_id == Some(id.0)).map(|p| &p.link)
    }

    /// The node ids of the peers that take no writes now: those the last
    /// heartbeats found down, or whose storage failed.
    pub fn down(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter_map(|p| {
                let seen = lock(&p.seen);
                seen.node_id.filter(|_| !seen.up || seen.storage_failure.is_some()).map(NodeId)
            })
            .collect()
    }

    /// The link to the peer whose node id is `id`, or why there is none.
    pub fn link(&self, id: NodeId) -> Result<&PeerLink, ServerError> {
        self.link_to(id)
            .ok_or_else(|| ServerError::new(ErrorKind::Unavailable, format!("no link to node {:016x}", id.0)))
    }

    /// What the last heartbeats found, in the configured order.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.peers.iter().map(|p| lock(&p.seen).clone()).collect()
    }

    /// Pings every peer once, concurrently, and applies the clock rule.
    pub async fn heartbeat(self: &Arc<Self>) {
        let mut pings = tokio::task::JoinSet::new();
        for index in 0..self.peers.len() {
            let membership = self.clone();
            pings.spawn(async move { membership.ping(index).await });
        }
        while pings.join_next().await.is_some() {}
        self.heard.store(true, Ordering::Release);
        self.apply_clock_rule();
        let now = self.cut_off();
        match (self.was_cut_off.swap(now.is_some(), Ordering::AcqRel), &now) {
            (false, Some(reason)) => tracing::error!(%reason, "this node is cut off from its cluster"),
            (true, None) => tracing::info!("this node hears its peers again"),
            _ => {}
        }
    }

    async fn ping(&self, index: usize) {
        let Some(peer) = self.peers.get(index) else { return };
        if self.denied.contains(&peer.config.name) {
            lock(&peer.seen).up = false;
            return;
        }
        let sent = self.wall.now_ms();
        let ping = PeerRequest::Ping { from: self.me, hlc: self.clock.last() };
        let answer = peer.link.call(ping, self.heartbeat).await;
        let received = self.wall.now_ms();
        if let Ok(PeerReply::Pong { from, members, .. }) = &answer {
            self.learn(&peer.config.name, *from, members);
        }
        let mut seen = lock(&peer.seen);
        match answer {
            Ok(PeerReply::Pong { from, wall_ms, keys, storage_failure, .. }) => {
                let midpoint = sent + received.saturating_sub(sent) / 2;
                if !seen.up {
                    tracing::info!(peer = %peer.config.name, node_id = from.0, "peer up");
                }
                if let (None, Some(reason)) = (&seen.storage_failure, &storage_failure) {
                    tracing::error!(peer = %peer.config.name, %reason, "a peer's storage failed: its writes are hinted");
                }
                seen.storage_failure = storage_failure;
                seen.up = true;
                seen.node_id = Some(from.0);
                seen.keys = Some(keys);
                seen.clock_offset_ms = Some(wall_ms as i64 - midpoint as i64);
            }
            Ok(other) => {
                tracing::warn!(peer = %peer.config.name, ?other, "a heartbeat got an answer that is not a pong");
                seen.up = false;
            }
            Err(error) => {
                if seen.up {
                    tracing::warn!(peer = %peer.config.name, %error, "peer down");
                }
                seen.up = false;
            }
        }
    }

    /// Takes what peer `sender` (node `sender_id`, as its certificate and
    /// its own answer say) knows of the members: node ids this node has not
    /// learned yet, and client addresses. An entry for the sender itself
    /// must carry its own id; one that contradicts an id this node knows is
    /// ignored.
    fn learn(&self, sender: &str, sender_id: NodeId, members: &[KnownMember]) {
        for member in members {
            if member.name == sender && member.id != sender_id {
                tracing::warn!(peer = sender, "a peer's heartbeat names itself with another node id; ignored");
                continue;
            }
            if let Some(peer) = self.peers.iter().find(|p| p.config.name == member.name) {
                let mut seen = lock(&peer.seen);
                match seen.node_id {
                    None => seen.node_id = Some(member.id.0),
                    Some(known) if known != member.id.0 => {
                        tracing::warn!(peer = sender, member = %member.name, "a peer's heartbeat gives a member another node id than this node knows; ignored");
                        continue;
                    }
                    Some(_) => {}
                }
                if !member.client_addr.is_empty() {
                    seen.client_addr = member.client_addr.clone();
                }
            }
        }
    }

    /// A node out of step with more than half of its peers' clocks refuses
    /// to stamp writes.
    fn apply_clock_rule(&self) {
        self.clock.set_peer_skew(peer_skew(&self.peers(), self.clock.max_offset_ms()));
    }

    /// Heartbeats every `heartbeat` until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.heartbeat);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.heartbeat().await;
        }
    }
}

/// Why this node must not stamp writes, if more than half of its
/// configured `peers` answer with a wall clock further than `max_offset_ms`
/// from its own (a peer that is down or has no estimate does not count as
/// off).
pub fn peer_skew(peers: &[PeerInfo], max_offset_ms: u64) -> Option<String> {
    let max = i64::try_from(max_offset_ms).unwrap_or(i64::MAX);
    let off: Vec<String> = peers
        .iter()
        .filter_map(|p| p.clock_offset_ms.filter(|o| p.up && o.abs() > max).map(|o| format!("{} ({o:+} ms)", p.name)))
        .collect();
    (!peers.is_empty() && off.len() * 2 > peers.len()).then(|| {
        format!(
            "this node's wall clock is more than the maximum offset of {max} ms away from most of its peers' \
             (theirs: {}); it refuses to stamp writes until they agree again",
            off.join(", ")
        )
    })
}

/// Why a node whose heartbeats found its `peers` so is cut off from its
/// cluster: it has peers, and none of them answered.
pub fn cut_off(peers: &[PeerInfo]) -> Option<String> {
    (!peers.is_empty() && peers.iter().all(|p| !p.up)).then(|| {
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        format!(
            "none of its peers ({}) answers its heartbeats: it coordinates no quorum request, and clients asking for \
             the ring are told to avoid it",
            names.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, up: bool, offset: Option<i64>) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            peer_addr: String::new(),
            node_id: Some(1),
            client_addr: String::new(),
            up,
            keys: None,
            clock_offset_ms: offset,
            storage_failure: None,
        }
    }

    #[test]
    fn a_node_refuses_only_when_most_of_its_peers_clocks_are_off() {
        let off = |a: Option<i64>, b: Option<i64>| peer_skew(&[peer("a", true, a), peer("b", true, b)], 500);
        assert_eq!(off(Some(10), Some(-20)), None);
        assert_eq!(off(Some(2_000), Some(0)), None, "one of two is not most");
        let reason = off(Some(2_000), Some(-600)).expect("both are off");
        assert!(reason.contains("a (+2000 ms)") && reason.contains("b (-600 ms)"), "{reason}");
        assert_eq!(off(Some(501), Some(-500)), None, "500 ms is within the offset");
        // A peer that is down, or not yet measured, is not off.
        assert_eq!(peer_skew(&[peer("a", false, Some(9_000)), peer("b", true, Some(9_000))], 500), None);
        assert_eq!(peer_skew(&[peer("a", true, None), peer("b", true, Some(9_000))], 500), None);
        assert_eq!(peer_skew(&[], 500), None);
    }

    #[test]
    fn a_node_is_cut_off_when_no_peer_answers() {
        let reason = cut_off(&[peer("a", false, None), peer("b", false, None)]).expect("cut off");
        assert!(reason.contains("(a, b)"), "{reason}");
        assert_eq!(cut_off(&[peer("a", false, None), peer("b", true, None)]), None, "one peer answers");
        assert_eq!(cut_off(&[]), None, "a node alone is not cut off");
    }
}
