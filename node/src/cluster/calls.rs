//! Small helpers of the cluster's I/O side: a peer's answer read for what
//! was asked, engine reads off the async workers, and work that answers
//! through a [`Done`] awaited.

use quiver_ring::wire::{ErrorKind, ServerError};

use crate::messages::PeerReply;
use crate::net::peer::PeerError;
use crate::service::Done;

/// The error of a request cut short because the node is stopping.
pub fn stopping() -> ServerError {
    ServerError::new(ErrorKind::ShuttingDown, "the node is stopping")
}

/// Runs `read`, which reads files, off the async workers.
pub async fn off_worker<T: Send + 'static>(
    read: impl FnOnce() -> crate::storage::Result<T> + Send + 'static,
) -> Result<T, ServerError> {
    let joined = tokio::task::spawn_blocking(read).await;
    joined.map_err(|e| ServerError::new(ErrorKind::Internal, e.to_string()))?.map_err(crate::storage::storage_error)
}

/// Starts work that answers through a [`Done`] (this node's store) and
/// waits for its answer; `ShuttingDown` if the work is dropped unanswered.
pub async fn answer_of<T: Send + 'static>(start: impl FnOnce(Done<T>)) -> Result<T, ServerError> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    start(Box::new(move |result| {
        let _ = sender.send(result);
    }));
    receiver.await.unwrap_or_else(|_| Err(stopping()))
}

/// A peer's answer to a request for `what`: what `pick` takes from it. A
/// peer's refusal is its error; another answer than `pick` takes is an
/// internal error, no answer at all `Unavailable`.
pub fn reply_of<T>(
    reply: Result<PeerReply, PeerError>,
    what: &str,
    pick: impl FnOnce(PeerReply) -> Result<T, PeerReply>,
) -> Result<T, ServerError> {
    match reply {
        Ok(PeerReply::Failed(error)) => Err(error),
        Ok(reply) => pick(reply)
            .map_err(|other| ServerError::new(ErrorKind::Internal, format!("{what}: the peer answered {other:?}"))),
        Err(error) => Err(ServerError::new(ErrorKind::Unavailable, format!("{what}: {error}"))),
    }
}

/// A peer's answer to a request that writes: `Ok` once it has it durable.
pub fn written(reply: Result<PeerReply, PeerError>, what: &str) -> Result<(), ServerError> {
    reply_of(reply, what, |reply| match reply {
        PeerReply::Written | PeerReply::WrittenWithoutHints(_) => Ok(()),
        other => Err(other),
    })
}
