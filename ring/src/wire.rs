//! The client protocol: messages and their framing.
//!
//! ```text
//! frame := len u32 BE | postcard(Request or Response)     len = body bytes
//! ```
//!
//! A connection opens with [`Op::Hello`]: the node answers with its
//! protocol version, its id and its limits, so that a client can refuse
//! locally what the node would refuse, with the same error. A client of
//! another protocol version gets [`ErrorKind::UnsupportedProtocol`].
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

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;

/// Default largest frame a node accepts: a full 64 MiB bulk set plus room.
pub const FRAME_BYTES_MAX: usize = 72 << 20;

/// The file in a node's data directory that holds its admin token, which
/// admin requests (`Shutdown`) must carry.
pub const ADMIN_TOKEN_FILE: &str = "ADMIN_TOKEN";

/// The protocol this build speaks. 2: connections open with `Hello`, admin
/// requests carry a token.
pub const PROTOCOL_VERSION: u32 = 2;

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
    /// For `Hello`.
    Hello(NodeInfo),
}

/// What a node tells a client when a connection opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub protocol: u32,
    pub node_id: u64,
    pub limits: Limits,
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

    /// Checks `op` against every limit but the frame's: what the node
    /// checks before it acts on a request.
    pub fn check(&self, op: &Op) -> Result<(), ServerError> {
        match op {
            Op::Get { key } | Op::Delete { key } => self.check_key(key),
            Op::Set { key, value } => {
                self.check_key(key)?;
                self.check_value(value)
            }
            Op::GetMany { keys } => {
                self.check_count(keys.len(), "get_many")?;
                keys.iter().try_for_each(|key| self.check_key(key))
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
                    self.check_key(key)?;
                    self.check_value(value)
                })
            }
            Op::Status | Op::Shutdown { .. } | Op::Hello { .. } => Ok(()),
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
    /// The answer would be larger than the frame limit (a `GetMany` of many
    /// large values); ask for fewer keys at a time. The connection stays
    /// open.
    ResponseTooLarge,
    /// An admin request without the node's admin token.
    Forbidden,
    /// The client speaks another protocol version.
    UnsupportedProtocol,
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
        encode_frame(&mut buf, &request, FRAME_BYTES_MAX).unwrap();
        let len = frame_len(buf[..4].try_into().unwrap());
        assert_eq!(len, buf.len() - 4);
        assert_eq!(postcard::from_bytes::<Request>(&buf[4..]).unwrap(), request);
        assert_eq!(peek_id(&buf[4..]), Some(7));
    }

    #[test]
    fn truncated_body_still_yields_its_id() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, &Request { id: 300, hlc_seen: 0, op: Op::Get { key: vec![1; 50] } }, FRAME_BYTES_MAX)
            .unwrap();
        let body = &buf[4..buf.len() - 10];
        assert!(postcard::from_bytes::<Request>(body).is_err());
        assert_eq!(peek_id(body), Some(300));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut buf = vec![1, 2, 3];
        let big = Request { id: 1, hlc_seen: 0, op: Op::Set { key: b"k".to_vec(), value: vec![0; 1000] } };
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
}
