//! The client's error type.

use std::time::Duration;

use quiver_ring::wire::ErrorKind;

use crate::retry::Failure;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No seed address accepted a connection.
    #[error("could not connect to any of {addrs:?}: {last}")]
    Connect { addrs: Vec<String>, last: String },
    /// The connection broke while the request was in flight: a write may or
    /// may not have been applied.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost { addr: String, reason: String },
    /// No answer within the timeout: a write may or may not have been applied.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// The node refused or failed the request.
    #[error("{kind:?}: {message}")]
    Server { kind: ErrorKind, message: String },
    /// The node answered with something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether a write that failed this way may still have been applied
    /// (a lost connection, a timeout, or `Unconfirmed`).
    pub fn is_ambiguous(&self) -> bool {
        self.failure() == Failure::InDoubt
    }

    /// What the attempt that failed so left behind, for the retry rule
    /// ([`crate::retry`]).
    pub fn failure(&self) -> Failure {
        match self {
            Error::Connect { .. } => Failure::NotApplied,
            Error::ConnectionLost { .. } | Error::Timeout { .. } => Failure::InDoubt,
            Error::Server { kind, .. } => match kind {
                ErrorKind::ShuttingDown
                | ErrorKind::NotReplica
                | ErrorKind::StorageFailed
                | ErrorKind::ClockSkew
                | ErrorKind::TooManyConnections
                | ErrorKind::DiskFull
                | ErrorKind::Unavailable => Failure::NotApplied,
                ErrorKind::Unconfirmed => Failure::InDoubt,
                _ => Failure::Final,
            },
            Error::Protocol(_) => Failure::Final,
        }
    }

    /// Whether trying again (perhaps on another node) can help. Bad input
    /// (empty or oversized keys and values) never will.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectionLost { .. } | Error::Timeout { .. } => true,
            Error::Server { kind, .. } => kind.is_retryable(),
            Error::Protocol(_) => false,
        }
    }

    /// The server's error kind, if the node answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Server { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
