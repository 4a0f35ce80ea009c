//! The client protocol: messages and their framing.
//!
//! ```text
//! frame := len u32 BE | postcard(Request or Response)     len = body bytes
//! ```
//!
//! Every connection opens with [`Op::Hello`]: the node answers with its
//! protocol version, its id and its limits, so that a client can refuse
//! locally what the node would refuse, with the same error. A client of
//! another protocol version, or one whose first request is not `Hello`,
//! gets [`ErrorKind::UnsupportedProtocol`] and the connection is closed.
//!
//! The encoding is postcard, and it is pinned: the tests at the end of this
//! file hold every request and response variant to its exact bytes, so a
//! reordered enum or field fails a test instead of a peer.
//!
//! A connection carries many requests at once. Every response repeats its
//! request's `id`, and responses may come back in any order. A frame larger
//! than the node's limit, or one that does not decode, gets an error response
//! (with the request's id when it can be read, else id 0) and the node closes
//! that connection; other connections are unaffected.
//!
//! Both sides exchange the highest [`Hlc`] they have seen, so a client's
//! later write is always stamped above its earlier one, whichever node
//! coordinates it. Every request also carries a deadline on the same scale:
//! a node never stamps a write after it (it answers [`ErrorKind::Timeout`]),
//! and a client whose write timed out raises the timestamp it sends past
//! that deadline, so the write that timed out can never land above its
//! next one.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};
pub use serde_bytes::ByteBuf;

use crate::clock::Hlc;
use crate::ring::RingView;
use crate::NodeId;

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;

/// Default largest frame a node accepts: a full 64 MiB bulk set plus room.
pub const FRAME_BYTES_MAX: usize = 72 << 20;

/// The file in a node's data directory that holds its admin token, which
/// admin requests (`Shutdown`) must carry.
pub const ADMIN_TOKEN_FILE: &str = "ADMIN_TOKEN";

/// The protocol this build speaks. 2: connections open with `Hello`, admin
/// requests carry a token. 3: typed timestamps, write deadlines, versions
/// and contexts (`GetVersions`, `SetWithContext`). 4: `Ring`, the ring in
/// `status`. 5: consistency `Any`, hinted handoff in `status`. 6: full-text
/// search (`SearchText`), similar values (`SearchSimilar`, `SearchVector`),
/// values with their own vectors (`SetWithVector`). 7: the node's bounds
/// in `status` (`budgets`), `TooManyConnections`, `DiskFull`. 8: a
/// peer's failed storage in `status`. 9: `Unconfirmed` (a write sent that
/// may be applied, where `Unavailable` now means nothing was), the members
/// to avoid in `Ring`, `cut_off` in `status`. 10: anti-entropy (`Repair`,
/// `anti_entropy` in `status`). 11: `Compact`, tombstones in
/// `anti_entropy`.
pub const PROTOCOL_VERSION: u32 = 11;

/// A client's request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the response.
    pub id: u64,
    /// The highest timestamp the client has seen (`Hlc::ZERO` if none).
    pub hlc_seen: Hlc,
    pub op: Op,
    /// A write is not stamped after this (the client's timestamp plus its
    /// timeout); reads ignore it. After `op`, so that `id, hlc_seen, Hello`
    /// reads the same in every protocol version (see [`peek_hello`]).
    pub deadline: Hlc,
    /// How many of a key's replicas must answer, in a cluster (`None`: the
    /// node's default). A single node is its own only replica.
    pub consistency: Option<Consistency>,
}

/// How many of a key's replicas must answer a read or acknowledge a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    One,
    Quorum,
    All,
    /// Acknowledged once any node has the write durable, a hint for a
    /// replica that is down included (as Cassandra's `ANY`); a read at
    /// `any` is a read at `one`. The other levels count the key's own
    /// replicas only, never hints.
    Any,
}

impl Consistency {
    /// Answers needed out of `replicas`.
    pub fn needed(self, replicas: usize) -> usize {
        match self {
            Consistency::One | Consistency::Any => 1.min(replicas),
            Consistency::Quorum => replicas / 2 + 1,
            Consistency::All => replicas,
        }
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(text: &str) -> Result<Consistency, String> {
        match text {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            "any" => Ok(Consistency::Any),
            other => Err(format!("consistency {other:?}: one of one, quorum, all, any (writes only)")),
        }
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Several keys at once (like Redis MGET); answered with `Values` in the
    /// same order.
    GetMany {
        #[serde(with = "crate::bytes::list")]
        keys: Vec<Vec<u8>>,
    },
    Set {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// All entries are applied together or not at all. A key given twice
    /// takes its last value.
    BulkSet {
        #[serde(with = "crate::bytes::pairs")]
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Status,
    /// Admin: stop the node gracefully. `token` is the node's admin token
    /// (the file `ADMIN_TOKEN` in its data directory); anything else is
    /// [`ErrorKind::Forbidden`].
    Shutdown {
        token: String,
    },
    /// The first request of a connection: the client's protocol version.
    /// Answered with [`Reply::Hello`].
    Hello {
        protocol: u32,
    },
    /// Every live version of a key and the context to write back with;
    /// answered with [`Reply::Versions`].
    GetVersions {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// A causal write: `value` (`None` deletes) replaces exactly the
    /// versions `context` covers, and stays a sibling of the others.
    SetWithContext {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        context: ContextToken,
    },
    /// The cluster's ring as this node knows it, for clients that route
    /// each key to its replicas; answered with [`Reply::Ring`]. A single
    /// node answers with itself alone.
    Ring,
    /// Full-text search: the `k` keys whose values best match `query`
    /// (BM25), best first; answered with [`Reply::Hits`]. `all`: a value
    /// must match every word, phrase and prefix of the query, not just one.
    /// `global_stats`: in a cluster, weigh terms by statistics over every
    /// node's keys (one more round trip) rather than each node's own.
    SearchText {
        query: String,
        k: u32,
        all: bool,
        global_stats: bool,
    },
    /// The `k` values about the same things as `text`, nearest first by
    /// the node's embedder (cosine similarity); answered with
    /// [`Reply::Hits`].
    SearchSimilar {
        text: String,
        k: u32,
    },
    /// The `k` values whose vectors are nearest `vector` (of the index's
    /// dimension; any length but zero); answered with [`Reply::Hits`].
    SearchVector {
        vector: Vec<f32>,
        k: u32,
    },
    /// A `Set` whose value is found by similarity search at `vector` (of
    /// the index's dimension) rather than at its text's embedding; a later
    /// write without a vector goes back to the text's. Answered with
    /// [`Reply::Done`].
    SetWithVector {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        vector: Vec<f32>,
    },
    /// In a cluster: run an anti-entropy round now (this node's hash trees
    /// against each other replica's, every difference repaired), waiting
    /// for the round that runs, if one does; answered with
    /// [`Reply::Repaired`] once it is over.
    Repair,
    /// Flush this node's memtables and merge every table into one now
    /// (dropping shadowed versions, and tombstones that may go), waiting
    /// for the one that runs, if one does; answered with [`Reply::Done`].
    Compact,
    /// In a cluster: compare this node's hash trees with a fresh scan of
    /// its data (while writes go on); answered with
    /// [`Reply::TreesChecked`].
    CheckTrees,
}

/// A read's context as the client holds it: opaque bytes, printable as
/// hex. The node that hands it out seals it for its key under the
/// cluster's secret; a token used with another key, altered, or issued
/// elsewhere is refused ([`ErrorKind::InvalidContext`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextToken(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl ContextToken {
    /// Lowercase hex, for printing and pasting.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`ContextToken::to_hex`].
    pub fn from_hex(text: &str) -> Result<ContextToken, ServerError> {
        let invalid = || ServerError::new(ErrorKind::InvalidContext, "a context token is an even number of hex digits");
        let text = text.trim().as_bytes();
        if !text.len().is_multiple_of(2) {
            return Err(invalid());
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        text.chunks_exact(2)
            .map(|pair| match pair {
                [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .map(ContextToken)
            .ok_or_else(invalid)
    }
}

/// One sibling as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// `None`: a tombstone.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub hlc: Hlc,
}

/// The answer to [`Op::GetVersions`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// Every live sibling, oldest `(hlc, origin)` first: the last is the
    /// one `get` returns. Empty when the key was never written.
    pub versions: Vec<VersionInfo>,
    /// Write back with this to replace exactly these versions.
    pub context: ContextToken,
}

/// The node's answer to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    /// The highest timestamp the node has stamped or seen.
    pub hlc: Hlc,
    pub result: Result<Reply, ServerError>,
}

/// A successful result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// For `Get`: the value, or `None` if the key is absent or deleted.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// For `GetMany`: one entry per requested key, in order.
    Values(#[serde(with = "crate::bytes::optional_list")] Vec<Option<Vec<u8>>>),
    /// For writes: durable on disk (fsynced). For `Shutdown`: shutting down.
    Done,
    /// Boxed: it is far larger than the answers that come by the
    /// hundred thousand.
    Status(Box<NodeStatus>),
    /// For `Hello`.
    Hello(NodeInfo),
    /// For `GetVersions`.
    Versions(Versions),
    /// For `Ring`.
    Ring(RingInfo),
    /// For searches: the hits, best first.
    Hits(Vec<SearchHit>),
    /// For `Repair`.
    Repaired(RepairReport),
    /// For `CheckTrees`.
    TreesChecked(TreesCheck),
}

/// What an anti-entropy round did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Exchanges run with other replicas.
    pub exchanges: u64,
    /// Keys found different and repaired both ways.
    pub keys_repaired: u64,
    /// Replica sets this node holds keys of, and those whose every other
    /// replica was up and exchanged with in full.
    pub sets: u64,
    pub sets_synced: u64,
    /// What did not go (a replica down, an exchange that failed).
    pub failed: Vec<String>,
}

/// What a check of a node's hash trees against its data found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreesCheck {
    /// Keys scanned.
    pub keys: u64,
    /// Keys whose leaf is not what the data holds (at most 100; a leaf
    /// whose key the data no longer holds is named by its 8-byte slot).
    pub differing: Vec<ByteBuf>,
}

/// A node's anti-entropy, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AntiEntropyInfo {
    /// Whether the hash trees are built (they are once the ring is known),
    /// and the keys in them.
    pub trees_built: bool,
    pub tree_keys: u64,
    /// Replica sets this node holds keys of, and those exchanged in full
    /// with every other replica so far.
    pub sets: u64,
    pub sets_synced: u64,
    /// When the oldest of the sets' last full exchanges began (ms since
    /// the epoch; 0: a set has had none yet): what every replica held then
    /// is on every replica.
    pub oldest_full_exchange_ms: u64,
    pub keys_repaired: u64,
    /// Bytes of exchanges' steps and answers, and of repairs both ways
    /// (their sibling sets).
    pub bytes_sent: u64,
    pub exchanges: u64,
    pub exchanges_failed: u64,
    /// The round running: exchanges done, of how many.
    pub round: Option<(u64, u64)>,
    /// Per replica set (its node ids), the root of this node's tree and
    /// the keys in it: replicas in sync show the same.
    pub roots: Vec<TreeRoot>,
    /// Deleted keys in this node's tables (a key in several tables counts
    /// several times), and those purged since it started.
    pub tombstones_waiting: u64,
    pub tombstones_purged: u64,
}

/// The root of one of a node's hash trees.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeRoot {
    pub set: Vec<u64>,
    pub root: u64,
    pub keys: u64,
    /// When this node's last full exchange of the set began (ms since the
    /// epoch; 0: none since it started).
    pub full_exchange_ms: u64,
}

/// One hit of a search: a key, its score (higher is better) and its value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub score: f64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// The answer to [`Op::Ring`]: the members (with the addresses clients
/// reach them at, empty while not known) and how many replicas each key
/// has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingInfo {
    pub replicas: u32,
    pub view: RingView,
    /// Members the node answering cannot reach (itself, when it reaches
    /// none of its peers): a client sends them a key's requests only after
    /// its other replicas.
    pub avoid: Vec<NodeId>,
}

/// What a node tells a client when a connection opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub protocol: u32,
    pub node_id: u64,
    pub limits: Limits,
}

/// Longest search query, in bytes.
pub const QUERY_BYTES_MAX: usize = 4096;
/// Most hits one search returns.
pub const SEARCH_K_MAX: u32 = 1000;

/// Checks what every search is checked for before it runs: a query of at
/// most [`QUERY_BYTES_MAX`] bytes with something in it, and `k` in
/// `1..=SEARCH_K_MAX`.
pub fn check_search(query: &str, k: u32) -> Result<(), ServerError> {
    let bad = |message: String| Err(ServerError::new(ErrorKind::BadQuery, message));
    if query.len() > QUERY_BYTES_MAX {
        return bad(format!("the query is {} bytes, more than the limit of {QUERY_BYTES_MAX}", query.len()));
    }
    if query.trim().is_empty() {
        return bad("the query is empty".into());
    }
    if k == 0 || k > SEARCH_K_MAX {
        return bad(format!("k = {k}: ask for 1 to {SEARCH_K_MAX} results"));
    }
    Ok(())
}

/// Most components a query vector may have.
pub const VECTOR_DIM_MAX: usize = 4096;

/// Checks a vector search: `k` in range, and a query vector as
/// [`check_vector`] wants it.
pub fn check_vector_search(vector: &[f32], dim: usize, k: u32) -> Result<(), ServerError> {
    if k == 0 || k > SEARCH_K_MAX {
        return Err(ServerError::new(ErrorKind::BadQuery, format!("k = {k}: ask for 1 to {SEARCH_K_MAX} results")));
    }
    check_vector(vector, dim)
}

/// Checks a vector: `dim` finite components, not all zero (`dim` 0: any
/// dimension up to [`VECTOR_DIM_MAX`], what a client checks before it knows
/// the index's).
pub fn check_vector(vector: &[f32], dim: usize) -> Result<(), ServerError> {
    let bad = |message: String| Err(ServerError::new(ErrorKind::BadQuery, message));
    if vector.is_empty() || vector.len() > VECTOR_DIM_MAX || (dim != 0 && vector.len() != dim) {
        let want = if dim == 0 { format!("1 to {VECTOR_DIM_MAX}") } else { dim.to_string() };
        return bad(format!("the vector has {} dimensions; the index's vectors have {want}", vector.len()));
    }
    if vector.iter().any(|x| !x.is_finite()) {
        return bad("the vector has a component that is not a finite number".into());
    }
    if vector.iter().all(|x| *x == 0.0) {
        return bad("the vector has no direction (all zeros)".into());
    }
    Ok(())
}

/// The per-request limits a node enforces. Clients learn them in
/// [`NodeInfo`] and check requests against them before sending, with the
/// same errors the node would give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub key_bytes_max: u64,
    pub value_bytes_max: u64,
    /// Entries of one bulk set, and keys of one `GetMany`.
    pub bulk_entries_max: u64,
    /// Bytes (keys + values) of one bulk set.
    pub bulk_bytes_max: u64,
    /// Largest frame, request or response.
    pub frame_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            key_bytes_max: 4 << 10,
            value_bytes_max: 4 << 20,
            bulk_entries_max: 100_000,
            bulk_bytes_max: 64 << 20,
            frame_bytes_max: FRAME_BYTES_MAX as u64,
        }
    }
}

impl Limits {
    /// A key must be 1..=`key_bytes_max` bytes.
    pub fn check_key(&self, key: &[u8]) -> Result<(), ServerError> {
        // A vector key is its base key's, and as long as it may be.
        let key = crate::ring::vector_key_base(key).unwrap_or(key);
        if key.is_empty() {
            return Err(ServerError::new(ErrorKind::EmptyKey, "keys must be at least one byte"));
        }
        if key.len() as u64 > self.key_bytes_max {
            return Err(ServerError::new(
                ErrorKind::KeyTooLarge,
                format!("key of {} bytes exceeds the limit of {} bytes", key.len(), self.key_bytes_max),
            ));
        }
        Ok(())
    }

    /// A client's key: [`Limits::check_key`], and not one of the keys a node
    /// keeps for itself ([`crate::ring::VECTOR_KEY_PREFIX`]).
    pub fn check_user_key(&self, key: &[u8]) -> Result<(), ServerError> {
        if key.starts_with(crate::ring::VECTOR_KEY_PREFIX) {
            return Err(ServerError::new(
                ErrorKind::ReservedKey,
                "keys starting with the bytes ff fe 'vector' 00 are kept for the vectors written with values",
            ));
        }
        self.check_key(key)
    }

    /// A value must be at most `value_bytes_max` bytes.
    pub fn check_value(&self, value: &[u8]) -> Result<(), ServerError> {
        if value.len() as u64 > self.value_bytes_max {
            return Err(ServerError::new(
                ErrorKind::ValueTooLarge,
                format!("value of {} bytes exceeds the limit of {} bytes", value.len(), self.value_bytes_max),
            ));
        }
        Ok(())
    }

    /// A request's count of keys or entries.
    fn check_count(&self, count: usize, what: &str) -> Result<(), ServerError> {
        if count as u64 > self.bulk_entries_max {
            return Err(ServerError::new(
                ErrorKind::BulkTooLarge,
                format!("{what} of {count} entries exceeds the limit of {}", self.bulk_entries_max),
            ));
        }
        Ok(())
    }

    /// Refuses a request body whose `GetMany` or `BulkSet` announces more
    /// entries than the limit, before it is decoded: an empty key costs
    /// one byte of a frame and tens of bytes decoded, so a frame of such
    /// lists would cost many times its size in memory. A body that does
    /// not read that far is left to the decoder to refuse.
    pub fn check_announced_entries(&self, body: &[u8]) -> Result<(), ServerError> {
        const GET_MANY: u32 = 1;
        const BULK_SET: u32 = 4;
        let Ok(((_id, _hlc_seen, op), rest)) = postcard::take_from_bytes::<(u64, u64, u32)>(body) else {
            return Ok(());
        };
        let what = match op {
            GET_MANY => "get_many",
            BULK_SET => "bulk set",
            _ => return Ok(()),
        };
        match postcard::take_from_bytes::<u64>(rest) {
            Ok((count, _)) => self.check_count(usize::try_from(count).unwrap_or(usize::MAX), what),
            Err(_) => Ok(()),
        }
    }

    /// Checks `op` against every limit but the frame's: what the node
    /// checks before it acts on a request.
    pub fn check(&self, op: &Op) -> Result<(), ServerError> {
        match op {
            Op::Get { key } | Op::Delete { key } | Op::GetVersions { key } => self.check_user_key(key),
            Op::SetWithContext { key, value, .. } => {
                self.check_user_key(key)?;
                value.as_deref().map_or(Ok(()), |value| self.check_value(value))
            }
            Op::Set { key, value } => {
                self.check_user_key(key)?;
                self.check_value(value)
            }
            Op::GetMany { keys } => {
                self.check_count(keys.len(), "get_many")?;
                keys.iter().try_for_each(|key| self.check_user_key(key))
            }
            Op::BulkSet { entries } => {
                self.check_count(entries.len(), "bulk set")?;
                let bytes: u64 = entries.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
                if bytes > self.bulk_bytes_max {
                    return Err(ServerError::new(
                        ErrorKind::BulkTooLarge,
                        format!("bulk set of {bytes} bytes exceeds the limit of {} bytes", self.bulk_bytes_max),
                    ));
                }
                entries.iter().try_for_each(|(key, value)| {
                    self.check_user_key(key)?;
                    self.check_value(value)
                })
            }
            Op::SearchText { query, k, .. } | Op::SearchSimilar { text: query, k } => check_search(query, *k),
            Op::SearchVector { vector, k } => check_vector_search(vector, 0, *k),
            Op::SetWithVector { key, value, vector } => {
                self.check_user_key(key)?;
                self.check_value(value)?;
                check_vector(vector, 0)
            }
            Op::Status
            | Op::Shutdown { .. }
            | Op::Hello { .. }
            | Op::Ring
            | Op::Repair
            | Op::Compact
            | Op::CheckTrees => Ok(()),
        }
    }

    /// Checks a frame body's length.
    pub fn check_frame(&self, body_bytes: usize) -> Result<(), ServerError> {
        if body_bytes as u64 > self.frame_bytes_max {
            return Err(ServerError::new(
                ErrorKind::FrameTooLarge,
                format!("frame of {body_bytes} bytes exceeds the limit of {} bytes", self.frame_bytes_max),
            ));
        }
        Ok(())
    }
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    pub version: String,
    /// Approximate: entries in memtables and tables, before merging.
    pub keys: u64,
    pub bytes_on_disk: u64,
    pub uptime_ms: u64,
    /// The largest distance between clocks the node accepts.
    pub max_clock_offset_ms: u64,
    /// Why the node refuses to stamp writes now, if it does (its clock is
    /// too far ahead of its wall clock).
    pub clock_refusal: Option<String>,
    /// Why the node's storage stopped taking writes, if it did (a disk
    /// that failed): until it restarts, its peers hint what it would hold.
    pub storage_failure: Option<String>,
    /// Causal writes refused because they would have left more than the
    /// sibling bound.
    pub too_many_siblings_refused: u64,
    /// The node's name in its cluster (empty when it runs alone).
    pub name: String,
    /// The peers it was configured with, as its heartbeats see them.
    pub peers: Vec<PeerInfo>,
    /// Replicas per key (1 when it runs alone).
    pub replicas: u32,
    /// Every member of the ring, this node first (empty until every
    /// member's node id is known, and when it runs alone).
    pub ring: Vec<RingMember>,
    /// Hints this node dropped undelivered: past their age bound, or
    /// refused because the queue for their owner was full.
    pub hints_dropped: u64,
    /// Bulk sets in this node's batch log, not yet known applied on their
    /// replicas.
    pub batches_pending: u64,
    /// Whether the node indexes its values (`--index`), and the vectors
    /// written but not yet in its similarity graph (searches still find
    /// them, comparing them one by one: slower while this is large).
    pub indexed: bool,
    pub graph_backlog: u64,
    /// Every bound the node keeps (connections, bytes of answers not yet
    /// written, free disk, ...): its setting, what is in use, and how
    /// often it was reached.
    pub budgets: Vec<BudgetInfo>,
    /// Why the node is cut off from its cluster, while it is: none of its
    /// peers answers its heartbeats. It coordinates nothing then (too few
    /// replicas up) and tells clients asking for the ring to avoid it.
    pub cut_off: Option<String>,
    /// In a cluster: its anti-entropy.
    pub anti_entropy: Option<AntiEntropyInfo>,
}

/// One of a node's bounds as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetInfo {
    /// The setting's name, as in the configuration file.
    pub name: String,
    /// The bound (bytes, a count, or for a timeout its milliseconds).
    pub max: u64,
    /// What is in use now (0 for a timeout).
    pub used: u64,
    /// How often the bound was reached since the node started: what it
    /// refused, paused, closed or dropped there.
    pub reached: u64,
    /// What happens at the bound, in a few words.
    pub at_bound: String,
}

/// A member of the ring as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMember {
    pub name: String,
    pub node_id: u64,
    pub up: bool,
    /// Its share of the ring as the first replica of a key, in millionths.
    pub share_ppm: u32,
    /// Its keys (approximate, as `keys` above), as of its last heartbeat.
    pub keys: Option<u64>,
    /// Hints this node holds for it (writes it missed while down), and
    /// their bytes.
    pub hints: u64,
    pub hint_bytes: u64,
}

/// A peer as a node's heartbeats see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub peer_addr: String,
    /// Its node id, once it answered.
    pub node_id: Option<u64>,
    /// Where clients reach it, once it answered.
    pub client_addr: String,
    /// Whether it answered the last heartbeat.
    pub up: bool,
    /// Its keys (approximate), as of the last heartbeat it answered.
    pub keys: Option<u64>,
    /// How far its wall clock is ahead of this node's (negative: behind),
    /// estimated on the last heartbeat it answered.
    pub clock_offset_ms: Option<i64>,
    /// Why its storage stopped taking writes, as it said on the last
    /// heartbeat it answered: it is sent no writes (they are hinted).
    pub storage_failure: Option<String>,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The kinds of failure a client can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A key must be at least one byte.
    EmptyKey,
    /// The key is longer than the node's limit.
    KeyTooLarge,
    /// The value is longer than the node's limit.
    ValueTooLarge,
    /// The bulk set has too many entries or bytes.
    BulkTooLarge,
    /// The frame is longer than the node's limit; the connection is closed.
    FrameTooLarge,
    /// The frame does not decode; the connection is closed.
    Malformed,
    /// The node's storage failed (nothing more is written there until it
    /// restarts), or could not take the write for want of a resource that
    /// comes back (file descriptors): the write was not applied.
    StorageFailed,
    /// The node is shutting down and takes no new requests.
    ShuttingDown,
    /// Anything else.
    Internal,
    /// The answer would be larger than the frame limit (a `GetMany` of many
    /// large values); ask for fewer keys at a time. The connection stays
    /// open.
    ResponseTooLarge,
    /// An admin request without the node's admin token.
    Forbidden,
    /// The client speaks another protocol version, or did not open the
    /// connection with `Hello`.
    UnsupportedProtocol,
    /// The write could not be stamped before its deadline; it was not
    /// applied.
    Timeout,
    /// Too few of the key's replicas are up, as the node sees them, for the
    /// consistency asked: nothing was written. (For a read: too few
    /// answered, in time.)
    Unavailable,
    /// A timestamp too far ahead of the node's clock, or the node's clock
    /// too far ahead of its wall clock.
    ClockSkew,
    /// A causal write sent to a node that does not replicate its key.
    NotReplica,
    /// The causal write would leave more siblings than the bound: write
    /// again with the context of all of them (or overwrite blind).
    TooManySiblings,
    /// A context token that does not decode, or was read for another key.
    InvalidContext,
    /// A search query that cannot be run (empty, too long, no word to look
    /// for, an unclosed quote) or a `k` out of range.
    BadQuery,
    /// A search on a node started without indexing (`--index`).
    NotIndexed,
    /// A key that starts with the bytes a node keeps for itself.
    ReservedKey,
    /// The node already serves as many client connections as it allows;
    /// try again later, or another node.
    TooManyConnections,
    /// The node's disk is below its free-space reserve: it takes no client
    /// writes until space comes back (reads go on). The message names the
    /// free bytes.
    DiskFull,
    /// The write was sent to its replicas, but fewer than the consistency
    /// asked confirmed it in time (or too many refused it): it may be
    /// applied on some of them, and reach the others later. Like a lost
    /// connection: a blind write can be sent again; read before sending a
    /// causal one again. (`Unavailable` means nothing was written.)
    Unconfirmed,
}

impl ErrorKind {
    /// Whether the same request can succeed later or elsewhere. Bad input
    /// never will.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::StorageFailed
                | ErrorKind::ShuttingDown
                | ErrorKind::Internal
                | ErrorKind::Timeout
                | ErrorKind::Unavailable
                | ErrorKind::ClockSkew
                | ErrorKind::NotReplica
                | ErrorKind::TooManyConnections
                | ErrorKind::DiskFull
                | ErrorKind::Unconfirmed
        )
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl ServerError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ServerError {
        ServerError { kind, message: message.into() }
    }
}

/// Why [`encode_frame`] wrote nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a frame of {bytes} bytes exceeds the limit of {max} bytes")]
pub struct FrameTooLarge {
    pub bytes: usize,
    pub max: usize,
}

/// Appends one frame holding `message` to `out`, if its body is at most
/// `max` bytes (and fits the 4-byte length, whatever `max` says); else
/// leaves `out` as it was.
pub fn encode_frame<T: Serialize>(out: &mut Vec<u8>, message: &T, max: usize) -> Result<(), FrameTooLarge> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_BYTES]);
    let Ok(mut body) = postcard::to_extend(message, std::mem::take(out)) else {
        // postcard fails only on types it cannot encode, none of which are
        // sent; nothing is written.
        return Err(FrameTooLarge { bytes: usize::MAX, max });
    };
    let bytes = body.len() - start - LEN_BYTES;
    match frame_header(bytes, max) {
        Ok(header) => {
            if let Some(at) = body.get_mut(start..start + LEN_BYTES) {
                at.copy_from_slice(&header);
            }
        }
        Err(error) => {
            body.truncate(start);
            *out = body;
            return Err(error);
        }
    }
    *out = body;
    Ok(())
}

/// The header of a frame whose body is `bytes` long, if that is at most
/// `max` and fits the 4-byte length.
fn frame_header(bytes: usize, max: usize) -> Result<[u8; LEN_BYTES], FrameTooLarge> {
    let max = max.min(u32::MAX as usize);
    match u32::try_from(bytes) {
        Ok(len) if bytes <= max => Ok(len.to_be_bytes()),
        _ => Err(FrameTooLarge { bytes, max }),
    }
}

/// The body length a frame header announces.
pub fn frame_len(header: [u8; LEN_BYTES]) -> usize {
    u32::from_be_bytes(header) as usize
}

/// The id and protocol of a `Hello` from a client of another protocol
/// version, whose request does not decode in this one: every version keeps
/// `id, hlc_seen, op` first and `Hello` at the same place among the ops, so
/// a node can still tell such a client what it speaks.
pub fn peek_hello(body: &[u8]) -> Option<(u64, u32)> {
    const HELLO: u32 = 7;
    let ((id, _hlc_seen, op, protocol), _) = postcard::take_from_bytes::<(u64, u64, u32, u32)>(body).ok()?;
    (op == HELLO).then_some((id, protocol))
}

/// The request id at the start of a body that does not fully decode, so the
/// error response can still name it.
pub fn peek_id(body: &[u8]) -> Option<u64> {
    postcard::take_from_bytes::<u64>(body).ok().map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip() {
        let request = Request {
            id: 7,
            hlc_seen: Hlc(9),
            deadline: Hlc(10),
            consistency: Some(Consistency::All),
            op: Op::Set { key: b"k".to_vec(), value: b"v".to_vec() },
        };
        let mut buf = Vec::new();
        encode_frame(&mut buf, &request, FRAME_BYTES_MAX).unwrap();
        let len = frame_len(buf[..4].try_into().unwrap());
        assert_eq!(len, buf.len() - 4);
        assert_eq!(postcard::from_bytes::<Request>(&buf[4..]).unwrap(), request);
        assert_eq!(peek_id(&buf[4..]), Some(7));
    }

    #[test]
    fn truncated_body_still_yields_its_id() {
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            &Request {
                id: 300,
                hlc_seen: Hlc::ZERO,
                deadline: Hlc::ZERO,
                consistency: None,
                op: Op::Get { key: vec![1; 50] },
            },
            FRAME_BYTES_MAX,
        )
        .unwrap();
        let body = &buf[4..buf.len() - 10];
        assert!(postcard::from_bytes::<Request>(body).is_err());
        assert_eq!(peek_id(body), Some(300));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut buf = vec![1, 2, 3];
        let big = Request {
            id: 1,
            hlc_seen: Hlc::ZERO,
            deadline: Hlc::ZERO,
            consistency: None,
            op: Op::Set { key: b"k".to_vec(), value: vec![0; 1000] },
        };
        let error = encode_frame(&mut buf, &big, 999).unwrap_err();
        assert_eq!(error.max, 999);
        assert!(error.bytes > 1000, "{error:?}");
        assert_eq!(buf, [1, 2, 3]);
        encode_frame(&mut buf, &big, 2000).unwrap();
        assert_eq!(frame_len(buf[3..7].try_into().unwrap()), buf.len() - 7);
    }

    /// A body longer than a `u32` can say is refused whatever the limit,
    /// rather than written with a truncated length.
    #[test]
    fn a_length_over_u32_is_refused_even_without_a_limit() {
        let over = u32::MAX as usize + 1;
        assert_eq!(frame_header(over, usize::MAX), Err(FrameTooLarge { bytes: over, max: u32::MAX as usize }));
        assert_eq!(frame_header(over - 1, usize::MAX), Ok(u32::MAX.to_be_bytes()));
        assert_eq!(frame_header(10, 9), Err(FrameTooLarge { bytes: 10, max: 9 }));
    }

    #[test]
    fn limits_refuse_what_the_node_would() {
        let limits = Limits {
            key_bytes_max: 4,
            value_bytes_max: 8,
            bulk_entries_max: 2,
            bulk_bytes_max: 20,
            ..Limits::default()
        };
        let kind = |op: Op| limits.check(&op).err().map(|e| e.kind);
        assert_eq!(kind(Op::Get { key: vec![] }), Some(ErrorKind::EmptyKey));
        assert_eq!(kind(Op::Delete { key: vec![1; 5] }), Some(ErrorKind::KeyTooLarge));
        assert_eq!(kind(Op::Set { key: vec![1], value: vec![0; 9] }), Some(ErrorKind::ValueTooLarge));
        assert_eq!(kind(Op::Set { key: vec![1], value: vec![0; 8] }), None);
        assert_eq!(kind(Op::GetMany { keys: vec![vec![1]; 3] }), Some(ErrorKind::BulkTooLarge));
        let entries = |n: usize, v: usize| Op::BulkSet { entries: vec![(vec![1], vec![0; v]); n] };
        assert_eq!(kind(entries(3, 1)), Some(ErrorKind::BulkTooLarge));
        assert_eq!(kind(entries(2, 8)), None);
        assert_eq!(
            kind(Op::BulkSet { entries: vec![(vec![1], vec![0; 8]), (vec![1; 4], vec![0; 8])] }),
            Some(ErrorKind::BulkTooLarge)
        );
        assert_eq!(limits.check_frame(limits.frame_bytes_max as usize + 1).unwrap_err().kind, ErrorKind::FrameTooLarge);
    }

    #[test]
    fn entries_announced_over_the_limit_are_refused_before_decoding() {
        let limits = Limits { bulk_entries_max: 2, ..Limits::default() };
        let body = |op: Op| {
            postcard::to_stdvec(&Request { id: 1, hlc_seen: Hlc(2), op, deadline: Hlc(3), consistency: None }).unwrap()
        };
        let keys = |n: usize| (0..n).map(|i| vec![i as u8]).collect::<Vec<_>>();
        assert!(limits.check_announced_entries(&body(Op::GetMany { keys: keys(2) })).is_ok());
        let error = limits.check_announced_entries(&body(Op::GetMany { keys: keys(3) })).unwrap_err();
        assert_eq!(error.kind, ErrorKind::BulkTooLarge);
        let entries = keys(3).into_iter().map(|k| (k, vec![])).collect();
        assert!(limits.check_announced_entries(&body(Op::BulkSet { entries })).is_err());
        // Only the announced count is read: a body cut after it is refused too.
        let mut cut = body(Op::GetMany { keys: keys(3) });
        cut.truncate(cut.len() - 5);
        assert!(limits.check_announced_entries(&cut).is_err());
        // A count of 2^64 - 1 in a frame of a dozen bytes.
        let huge = [1, 2, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(limits.check_announced_entries(&huge).is_err());
        assert!(limits.check_announced_entries(&body(Op::Get { key: vec![1] })).is_ok());
        assert!(limits.check_announced_entries(&[]).is_ok());
    }

    #[test]
    fn a_context_token_survives_hex() {
        let token = ContextToken((0..=255).collect());
        let printed = token.to_hex();
        assert!(printed.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(ContextToken::from_hex(&printed).unwrap(), token);
        assert_eq!(ContextToken::from_hex("abc").unwrap_err().kind, ErrorKind::InvalidContext);
        assert_eq!(ContextToken::from_hex("zz").unwrap_err().kind, ErrorKind::InvalidContext);
    }

    fn hex<T: Serialize>(message: &T) -> String {
        postcard::to_stdvec(message).unwrap().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every request and response variant, and every error kind, encoded:
    /// these bytes are the protocol. A change here breaks every client and
    /// peer of another build, so it must come with a new `PROTOCOL_VERSION`.
    /// A `Hello` of protocol 2 (no deadline) is still understood enough to
    /// refuse it clearly.
    #[test]
    fn a_hello_of_another_protocol_is_recognised() {
        let v2_hello = [0x05, 0x00, 0x07, 0x02];
        assert!(postcard::from_bytes::<Request>(&v2_hello).is_err());
        assert_eq!(peek_hello(&v2_hello), Some((5, 2)));
        let v3 =
            Request { id: 6, hlc_seen: Hlc(1), op: Op::Hello { protocol: 3 }, deadline: Hlc(9), consistency: None };
        assert_eq!(peek_hello(&postcard::to_stdvec(&v3).unwrap()), Some((6, 3)));
        let get =
            Request { id: 6, hlc_seen: Hlc(1), op: Op::Get { key: vec![7] }, deadline: Hlc(9), consistency: None };
        assert_eq!(peek_hello(&postcard::to_stdvec(&get).unwrap()), None);
    }

    #[test]
    fn golden_bytes_pin_every_variant() {
        let key = || b"k".to_vec();
        let request = |op: Op| Request { id: 1, hlc_seen: Hlc(2), op, deadline: Hlc(3), consistency: None };
        let token = ContextToken(vec![0xab]);
        let requests = [
            (request(Op::Get { key: key() }), "010200016b0300"),
            (request(Op::GetMany { keys: vec![key(), b"l".to_vec()] }), "01020102016b016c0300"),
            (request(Op::Set { key: key(), value: b"v".to_vec() }), "010202016b01760300"),
            (request(Op::Delete { key: key() }), "010203016b0300"),
            (request(Op::BulkSet { entries: vec![(key(), b"v".to_vec())] }), "01020401016b01760300"),
            (request(Op::Status), "0102050300"),
            (Request { consistency: Some(Consistency::Quorum), ..request(Op::Status) }, "010205030101"),
            (Request { consistency: Some(Consistency::One), ..request(Op::Status) }, "010205030100"),
            (Request { consistency: Some(Consistency::All), ..request(Op::Status) }, "010205030102"),
            (Request { consistency: Some(Consistency::Any), ..request(Op::Status) }, "010205030103"),
            (request(Op::Shutdown { token: "t".into() }), "01020601740300"),
            (request(Op::Hello { protocol: 5 }), "010207050300"),
            (request(Op::GetVersions { key: key() }), "010208016b0300"),
            (
                request(Op::SetWithContext { key: key(), value: Some(b"v".to_vec()), context: token.clone() }),
                "010209016b01017601ab0300",
            ),
            (request(Op::SetWithContext { key: key(), value: None, context: token.clone() }), "010209016b0001ab0300"),
            (request(Op::Ring), "01020a0300"),
            (
                request(Op::SearchText { query: "q".into(), k: 2, all: true, global_stats: false }),
                "01020b01710201000300",
            ),
            (request(Op::SearchSimilar { text: "q".into(), k: 2 }), "01020c0171020300"),
            (request(Op::SearchVector { vector: vec![1.0], k: 2 }), "01020d010000803f020300"),
            (
                request(Op::SetWithVector { key: key(), value: b"v".to_vec(), vector: vec![1.0] }),
                "01020e016b0176010000803f0300",
            ),
            (request(Op::Repair), "01020f0300"),
            (request(Op::Compact), "0102100300"),
            (request(Op::CheckTrees), "0102110300"),
        ];
        let response = |result: Result<Reply, ServerError>| Response { id: 1, hlc: Hlc(2), result };
        let limits =
            Limits { key_bytes_max: 1, value_bytes_max: 2, bulk_entries_max: 3, bulk_bytes_max: 4, frame_bytes_max: 5 };
        let status = NodeStatus {
            node_id: 1,
            client_addr: "a".into(),
            peer_addr: "b".into(),
            version: "v".into(),
            keys: 2,
            bytes_on_disk: 3,
            uptime_ms: 4,
            max_clock_offset_ms: 5,
            clock_refusal: Some("r".into()),
            storage_failure: Some("s".into()),
            too_many_siblings_refused: 6,
            name: "n".into(),
            peers: vec![PeerInfo {
                name: "p".into(),
                peer_addr: "q".into(),
                node_id: Some(7),
                client_addr: "c".into(),
                up: true,
                keys: Some(8),
                clock_offset_ms: Some(-2),
                storage_failure: None,
            }],
            replicas: 3,
            ring: vec![RingMember {
                name: "n".into(),
                node_id: 1,
                up: true,
                share_ppm: 9,
                keys: None,
                hints: 10,
                hint_bytes: 11,
            }],
            hints_dropped: 12,
            batches_pending: 13,
            indexed: true,
            graph_backlog: 14,
            budgets: vec![BudgetInfo { name: "c".into(), max: 15, used: 16, reached: 17, at_bound: "d".into() }],
            cut_off: Some("x".into()),
            anti_entropy: Some(AntiEntropyInfo {
                trees_built: true,
                tree_keys: 18,
                sets: 1,
                sets_synced: 1,
                oldest_full_exchange_ms: 19,
                keys_repaired: 20,
                bytes_sent: 21,
                exchanges: 22,
                exchanges_failed: 23,
                round: Some((1, 2)),
                roots: vec![TreeRoot { set: vec![1, 7], root: 24, keys: 25, full_exchange_ms: 28 }],
                tombstones_waiting: 26,
                tombstones_purged: 27,
            }),
        };
        let ring = RingInfo {
            replicas: 3,
            view: RingView {
                epoch: 1,
                members: vec![crate::ring::Member {
                    id: crate::NodeId(7),
                    name: "n".into(),
                    client_addr: "c".into(),
                    peer_addr: "p".into(),
                }],
            },
            avoid: vec![crate::NodeId(7)],
        };
        let versions = Versions {
            versions: vec![
                VersionInfo { value: Some(b"v".to_vec()), hlc: Hlc(7) },
                VersionInfo { value: None, hlc: Hlc(8) },
            ],
            context: token,
        };
        let responses = [
            (response(Ok(Reply::Value(Some(b"v".to_vec())))), "01020000010176"),
            (response(Ok(Reply::Value(None))), "0102000000"),
            (response(Ok(Reply::Values(vec![Some(b"v".to_vec()), None]))), "010200010201017600"),
            (response(Ok(Reply::Done)), "01020002"),
            (
                response(Ok(Reply::Status(Box::new(status)))),
                "01020003010161016201760203040501017201017306016e0101700171010701630101080103000301016e010109000a0b\
                 0c0d010e0101630f10110164010178010112010113141516170101020102010718 19 1c 1a 1b",
            ),
            (response(Ok(Reply::Hello(NodeInfo { protocol: 4, node_id: 9, limits }))), "0102000404090102030405"),
            (response(Ok(Reply::Versions(versions))), "010200050201017607000801ab"),
            (response(Ok(Reply::Ring(ring))), "0102000603010107016e016301700107"),
            (
                response(Ok(Reply::Hits(vec![SearchHit { key: key(), score: 0.5, value: b"v".to_vec() }]))),
                "01020007 01 016b 000000000000e03f 0176",
            ),
            (
                response(Ok(Reply::Repaired(RepairReport {
                    exchanges: 1,
                    keys_repaired: 2,
                    sets: 3,
                    sets_synced: 4,
                    failed: vec!["f".into()],
                }))),
                "01020008 01 02 03 04 01 0166",
            ),
            (
                response(Ok(Reply::TreesChecked(TreesCheck { keys: 2, differing: vec![ByteBuf::from(vec![7])] }))),
                "01020009 02 01 0107",
            ),
            (response(Err(ServerError::new(ErrorKind::Timeout, "m"))), "0102010c016d"),
        ];
        let kinds = [
            (ErrorKind::EmptyKey, "00"),
            (ErrorKind::KeyTooLarge, "01"),
            (ErrorKind::ValueTooLarge, "02"),
            (ErrorKind::BulkTooLarge, "03"),
            (ErrorKind::FrameTooLarge, "04"),
            (ErrorKind::Malformed, "05"),
            (ErrorKind::StorageFailed, "06"),
            (ErrorKind::ShuttingDown, "07"),
            (ErrorKind::Internal, "08"),
            (ErrorKind::ResponseTooLarge, "09"),
            (ErrorKind::Forbidden, "0a"),
            (ErrorKind::UnsupportedProtocol, "0b"),
            (ErrorKind::Timeout, "0c"),
            (ErrorKind::Unavailable, "0d"),
            (ErrorKind::ClockSkew, "0e"),
            (ErrorKind::NotReplica, "0f"),
            (ErrorKind::TooManySiblings, "10"),
            (ErrorKind::InvalidContext, "11"),
            (ErrorKind::BadQuery, "12"),
            (ErrorKind::NotIndexed, "13"),
            (ErrorKind::ReservedKey, "14"),
            (ErrorKind::TooManyConnections, "15"),
            (ErrorKind::DiskFull, "16"),
            (ErrorKind::Unconfirmed, "17"),
        ];
        let mut wrong = Vec::new();
        for (message, want) in &requests {
            let got = hex(message);
            if got != want.replace(' ', "") {
                wrong.push(format!("{message:?}: {got}"));
            }
            assert_eq!(&postcard::from_bytes::<Request>(&postcard::to_stdvec(message).unwrap()).unwrap(), message);
        }
        for (message, want) in &responses {
            let got = hex(message);
            if got != want.replace(' ', "") {
                wrong.push(format!("{message:?}: {got}"));
            }
            assert_eq!(&postcard::from_bytes::<Response>(&postcard::to_stdvec(message).unwrap()).unwrap(), message);
        }
        for (kind, want) in kinds {
            let got = hex(&kind);
            if got != want {
                wrong.push(format!("{kind:?}: {got}"));
            }
        }
        assert!(wrong.is_empty(), "encodings changed:\n{}", wrong.join("\n"));
    }
}
