//! What nodes say to each other: the requests and answers their peer
//! links carry ([`crate::net::peer`] frames and sends them; the cluster
//! logic makes and reads them). Plain data, with no I/O: both sides, and the
//! pure rules (`cluster::quorum`, `cluster::hints`), import it from here.

use quiver_ring::ring::TokenRange;
use quiver_ring::wire::{SearchHit, ServerError};
use quiver_ring::{Hlc, NodeId, Siblings};
use serde::{Deserialize, Serialize};

use crate::index::query::Match;
use crate::index::text::TermStats;
use crate::index::Search;

/// What one node asks another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// A heartbeat, carrying the sender's clock.
    Ping { from: NodeId, hlc: Hlc },
    /// Merge these sibling sets (user keys) and hold these hints, all as
    /// one record, durably.
    Write { sets: Vec<(Vec<u8>, Siblings)>, hints: Vec<Hinted> },
    /// Every version of a key this replica holds.
    Read { key: Vec<u8> },
    /// Log this bulk set (its coordinator, its stamp, all of its sets)
    /// durably: it is sent to no replica before two nodes logged it.
    LogBatch { coordinator: NodeId, id: Hlc, sets: Vec<(Vec<u8>, Siblings)> },
    /// The bulk set `(coordinator, id)` is applied: remove it from the log.
    BatchDone { coordinator: NodeId, id: Hlc },
    /// This node's part of a cluster-wide search: its hits among its keys
    /// in `ranges`.
    Search { search: Search, ranges: Vec<TokenRange> },
    /// This node's statistics of a full-text query's terms over its keys in
    /// `ranges` (the first round of a search with cluster-wide statistics).
    TermStats { query: String, matching: Match, ranges: Vec<TokenRange> },
    /// A step of an anti-entropy exchange over the keys whose replicas are
    /// `set` (both nodes among them).
    Exchange { set: Vec<NodeId>, ask: Ask },
    /// Every version of each of these keys this replica holds (an
    /// exchange's repair).
    Pull { keys: Vec<Vec<u8>> },
    /// Merge these sibling sets, the sender's current state of keys an
    /// exchange found different (held to the horizon as a stream, not as a
    /// message: `horizon::Carried`), durably.
    Repair { sets: Vec<(Vec<u8>, Siblings)> },
}

/// What one replica asks the other in an anti-entropy exchange
/// (`cluster::antientropy`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// Its root and every branch.
    Branches,
    /// The segments under these branches.
    Segments(Vec<u16>),
    /// Its keys in these segments, each with its leaf.
    Keys(Vec<u16>),
}

/// The answer to an [`Ask`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Told {
    Branches { root: u64, branches: Vec<u64> },
    Segments(Vec<(u16, Vec<u64>)>),
    Keys(Vec<(Vec<u8>, u64)>),
}

/// Sibling sets held for `owner`, a replica that is down, until it is
/// back: a hint (hinted handoff).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hinted {
    pub owner: NodeId,
    pub sets: Vec<(Vec<u8>, Siblings)>,
}

/// A member as a node knows it: enough for a ring view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownMember {
    pub name: String,
    pub id: NodeId,
    pub client_addr: String,
}

/// The answer to a [`PeerRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerReply {
    /// The answer to a heartbeat: the node, its clock and its wall clock,
    /// its key count, why its storage stopped taking writes (if it did),
    /// and the members it knows by name (itself included: node id and
    /// client address), so a node that restarts learns the ids of peers
    /// that are down.
    Pong {
        from: NodeId,
        hlc: Hlc,
        wall_ms: u64,
        keys: u64,
        storage_failure: Option<String>,
        members: Vec<KnownMember>,
    },
    /// The sets are durable here.
    Written,
    Found(Option<Siblings>),
    /// A search's hits, best first.
    Hits(Vec<SearchHit>),
    TermStats(TermStats),
    /// The request failed on the replica.
    Failed(ServerError),
    /// The sets are durable here, and the hints too except those for
    /// these owners, which had no room (a replica that is down).
    WrittenWithoutHints(Vec<NodeId>),
    /// An exchange's answer.
    Told(Told),
    /// The versions of the keys pulled, in the order asked.
    Sets(Vec<(Vec<u8>, Option<Siblings>)>),
}
