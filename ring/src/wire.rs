//! The client protocol: messages and their framing.
//!
//! ```text
//! frame := len u32 BE | postcard(Request or Response)     len = body bytes
//! ```
//!
//! A connection carries many requests at once. Every response repeats its
//! request's `id`, and responses may come back in any order. A frame larger
//! than the node's limit, or one that does not decode, gets an error response
//! (with the request's id when it can be read, else id 0) and the node closes
//! that connection; other connections are unaffected.
//!
//! Both sides exchange the highest [`Hlc`](crate::Hlc) they have seen, so a
//! client's later write is always stamped above its earlier one, whichever
//! node coordinates it.

use serde::{Deserialize, Serialize};

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;

/// Default largest frame a node accepts: a full 64 MiB bulk set plus room.
pub const FRAME_BYTES_MAX: usize = 72 << 20;

/// A client's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the response.
    pub id: u64,
    /// The highest timestamp the client has seen (0 if none).
    pub hlc_seen: u64,
    pub op: Op,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Admin: stop the node gracefully.
    Shutdown,
}

/// The node's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    /// The highest timestamp the node has stamped or seen.
    pub hlc: u64,
    pub result: Result<Reply, ServerError>,
}

/// A successful result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// For `Get`: the value, or `None` if the key is absent or deleted.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// For `GetMany`: one entry per requested key, in order.
    Values(#[serde(with = "crate::bytes::optional_list")] Vec<Option<Vec<u8>>>),
    /// For writes: durable on disk (fsynced). For `Shutdown`: shutting down.
    Done,
    Status(NodeStatus),
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
    /// The node's storage failed; nothing more is written there.
    StorageFailed,
    /// The node is shutting down and takes no new requests.
    ShuttingDown,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    /// Whether the same request can succeed later or elsewhere. Bad input
    /// never will.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::StorageFailed | ErrorKind::ShuttingDown | ErrorKind::Internal)
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

/// Appends one frame holding `message` to `out`.
pub fn encode_frame<T: Serialize>(out: &mut Vec<u8>, message: &T) {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_BYTES]);
    // Encoding into a Vec cannot fail for these types.
    let mut body = postcard::to_extend(message, std::mem::take(out)).expect("postcard encodes into a Vec");
    let len = (body.len() - start - LEN_BYTES) as u32;
    body[start..start + LEN_BYTES].copy_from_slice(&len.to_be_bytes());
    *out = body;
}

/// The body length a frame header announces.
pub fn frame_len(header: [u8; LEN_BYTES]) -> usize {
    u32::from_be_bytes(header) as usize
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
        let request = Request { id: 7, hlc_seen: 9, op: Op::Set { key: b"k".to_vec(), value: b"v".to_vec() } };
        let mut buf = Vec::new();
        encode_frame(&mut buf, &request);
        let len = frame_len(buf[..4].try_into().unwrap());
        assert_eq!(len, buf.len() - 4);
        assert_eq!(postcard::from_bytes::<Request>(&buf[4..]).unwrap(), request);
        assert_eq!(peek_id(&buf[4..]), Some(7));
    }

    #[test]
    fn truncated_body_still_yields_its_id() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, &Request { id: 300, hlc_seen: 0, op: Op::Get { key: vec![1; 50] } });
        let body = &buf[4..buf.len() - 10];
        assert!(postcard::from_bytes::<Request>(body).is_err());
        assert_eq!(peek_id(body), Some(300));
    }
}
