//! One TCP connection to a node, shared by every call: requests are written
//! by one task (batched into few writes) and answers are matched to their
//! callers by id, in whatever order they come.
//!
//! A connection opens with the handshake (`Hello`): the node's protocol, id
//! and limits. Every request is then checked against those limits before it
//! is sent, so one the node would refuse fails here with the same error,
//! however large it is, and the connection stays up.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiver_ring::wire::{self, Consistency, ErrorKind, NodeInfo, Op, Reply, Request, Response};
use quiver_ring::Hlc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::lock;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;
type ClosedWith = Arc<Mutex<Option<wire::ServerError>>>;

/// A live connection.
#[derive(Debug)]
pub(crate) struct Connection {
    addr: String,
    requests: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
    broken: Arc<AtomicBool>,
    /// The error the node closed the connection with, if it said one (too
    /// many connections, a frame it could not read).
    closed_with: ClosedWith,
    /// Largest timestamp seen in any answer on any connection.
    hlc: Arc<AtomicU64>,
    /// What the node said in the handshake.
    info: NodeInfo,
}

impl Connection {
    /// Connects and makes the handshake.
    pub(crate) async fn open(addr: &str, hlc: Arc<AtomicU64>, timeout: Duration) -> Result<Connection> {
        let mut connection = Connection::connect(addr, hlc, timeout).await?;
        match connection.call(Op::Hello { protocol: wire::PROTOCOL_VERSION }, timeout, None).await? {
            Reply::Hello(info) => connection.info = info,
            other => return Err(Error::Protocol(format!("expected the node's hello, got {other:?}"))),
        }
        Ok(connection)
    }

    /// Connects, without the handshake.
    async fn connect(addr: &str, hlc: Arc<AtomicU64>, timeout: Duration) -> Result<Connection> {
        let io_error = |e: std::io::Error| Error::ConnectionLost { addr: addr.to_owned(), reason: e.to_string() };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Timeout { addr: addr.to_owned(), timeout })?
            .map_err(io_error)?;
        stream.set_nodelay(true).map_err(io_error)?;
        let (reader, writer) = stream.into_split();
        let (requests, queue) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let closed_with = ClosedWith::default();
        tokio::spawn(write_requests(writer, queue, broken.clone()));
        let reading = Reading {
            pending: pending.clone(),
            broken: broken.clone(),
            closed_with: closed_with.clone(),
            hlc: hlc.clone(),
        };
        tokio::spawn(read_responses(reader, reading));
        Ok(Connection {
            addr: addr.to_owned(),
            requests,
            pending,
            next_id: AtomicU64::new(1),
            broken,
            closed_with,
            hlc,
            // Until the node answers: the defaults, which the handshake
            // itself is far within.
            info: NodeInfo { protocol: wire::PROTOCOL_VERSION, node_id: 0, limits: wire::Limits::default() },
        })
    }

    /// What the node said when the connection opened.
    pub(crate) fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request and waits for its answer. A request over the
    /// node's limits is refused here, with the error the node would give.
    pub(crate) async fn call(
        &self,
        op: Op,
        timeout: Duration,
        consistency: Option<Consistency>,
    ) -> Result<wire::Reply> {
        let limits = &self.info.limits;
        let refused = |e: wire::ServerError| Error::Server { kind: e.kind, message: e.message };
        limits.check(&op).map_err(refused)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        let hlc_seen = Hlc(self.hlc.load(Ordering::Relaxed));
        let deadline = deadline(hlc_seen, timeout);
        let request = Request { id, hlc_seen, op, deadline, consistency };
        if let Err(too_large) = wire::encode_frame(&mut frame, &request, limits.frame_bytes_max as usize) {
            return Err(refused(
                limits
                    .check_frame(too_large.bytes)
                    .err()
                    .unwrap_or_else(|| wire::ServerError::new(wire::ErrorKind::FrameTooLarge, too_large.to_string())),
            ));
        }
        let (done, answer) = oneshot::channel();
        lock(&self.pending).insert(id, done);
        // The node's own word on why it closed, when it said one.
        let lost = |reason: &str| match lock(&self.closed_with).clone() {
            Some(error) => Error::Server { kind: error.kind, message: error.message },
            None => Error::ConnectionLost { addr: self.addr.clone(), reason: reason.to_owned() },
        };
        if self.is_broken() || self.requests.send(frame).is_err() {
            lock(&self.pending).remove(&id);
            return Err(lost("connection closed"));
        }
        let result = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(response)) => response.result.map_err(|e| Error::Server { kind: e.kind, message: e.message }),
            Ok(Err(_)) => Err(lost("connection closed before the answer")),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(Error::Timeout { addr: self.addr.clone(), timeout })
            }
        };
        if result.as_ref().is_err_and(|e| matches!(e, Error::Timeout { .. }) || e.kind() == Some(ErrorKind::Timeout)) {
            // The request may still be stamped, but never after its
            // deadline: everything this client sends from now on is
            // stamped above it, so the write that timed out can never land
            // above the next one.
            self.hlc.fetch_max(deadline.0, Ordering::Relaxed);
        }
        result
    }
}

/// A request's deadline on the HLC scale: the client's timestamp (the
/// highest it has seen, or its wall clock if that is later) plus its
/// timeout.
fn deadline(hlc_seen: Hlc, timeout: Duration) -> Hlc {
    let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    hlc_seen.max(Hlc::from_physical_ms(wall_ms)).plus_ms(timeout.as_millis() as u64)
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the request queue ends the writer, which closes the socket.
        self.broken.store(true, Ordering::Release);
    }
}

async fn write_requests(
    mut writer: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    broken: Arc<AtomicBool>,
) {
    let mut buf = Vec::new();
    while let Some(frame) = queue.recv().await {
        buf.clear();
        buf.extend_from_slice(&frame);
        while let Ok(more) = queue.try_recv() {
            buf.extend_from_slice(&more);
        }
        if writer.write_all(&buf).await.is_err() {
            break;
        }
    }
    broken.store(true, Ordering::Release);
    let _ = writer.shutdown().await;
}

/// What the task that reads a connection's answers shares with it.
struct Reading {
    pending: Pending,
    broken: Arc<AtomicBool>,
    closed_with: ClosedWith,
    hlc: Arc<AtomicU64>,
}

async fn read_responses(reader: OwnedReadHalf, reading: Reading) {
    let Reading { pending, broken, closed_with, hlc } = reading;
    // Buffered: one read syscall brings in every answer that has arrived.
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    loop {
        let mut header = [0u8; wire::LEN_BYTES];
        if reader.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = wire::frame_len(header);
        // Grown as the bytes arrive: the node's frame limit may be above
        // the default, and a broken stream must not reserve memory.
        let mut body = Vec::with_capacity(len.min(64 << 10));
        let mut limited = (&mut reader).take(len as u64);
        if limited.read_to_end(&mut body).await.is_err() || body.len() != len {
            break;
        }
        let Ok(response) = postcard::from_bytes::<Response>(&body) else { break };
        hlc.fetch_max(response.hlc.0, Ordering::Relaxed);
        if let Some(done) = lock(&pending).remove(&response.id) {
            let _ = done.send(response);
        } else if response.id == 0 {
            // A connection-level error (too many connections, an oversized
            // or malformed frame): the node closes the connection after it,
            // and every call waiting, or made from now on, gets it.
            if let Err(error) = response.result {
                *lock(&closed_with) = Some(error);
            }
            break;
        }
    }
    broken.store(true, Ordering::Release);
    // Dropping the senders tells every waiting caller the connection is gone.
    lock(&pending).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A node that takes requests and never answers: each call fails with a
    /// timeout (once its time is up, not before), and the connection stays
    /// usable for the next call.
    #[tokio::test]
    async fn a_call_without_an_answer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                });
            }
        });
        let timeout = Duration::from_millis(200);
        let connection = Connection::open(&addr, Arc::default(), timeout).await;
        assert!(matches!(connection, Err(Error::Timeout { .. })), "the handshake itself has no answer: {connection:?}");
        let connection = Connection::connect(&addr, Arc::default(), timeout).await.unwrap();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let call = connection.call(Op::Get { key: b"k".to_vec() }, timeout, None);
            // A bound on the test, not a timing assertion: a call that never
            // times out must fail the test rather than hang it.
            let result = tokio::time::timeout(Duration::from_secs(60), call).await.expect("the call never timed out");
            assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
            assert!(started.elapsed() >= timeout, "timed out before its time");
            assert!(!connection.is_broken());
        }
        assert!(lock(&connection.pending).is_empty(), "expired calls must not stay pending");
    }
}
