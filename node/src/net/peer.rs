//! Peer links: node to node over QUIC, mutually authenticated with the
//! cluster CA ([`super::tls`]).
//!
//! - Owns: the node's QUIC endpoint (one UDP socket, serving and dialling),
//!   and per peer one long-lived connection with one bidirectional stream.
//! - Receives: requests from peers, framed like the client protocol (`u32`
//!   big-endian length, then postcard), each with an id; and calls from this
//!   node's cluster logic to send to a peer.
//! - Does: answers each request with the [`PeerHandler`] it was given;
//!   matches each answer to its call by id (answers come in any order); a
//!   writer task drains every queued frame into one write. Keep-alives hold
//!   an idle link open; a broken link is dialled again on the next call.
//! - Bounds ([`LinkBounds`], settings shown in `status`): a link has at
//!   most so many requests awaiting answers and so many bytes queued to
//!   send; a call past either fails at once (`PeerError::Busy`: the quorum
//!   logic treats the peer as one that refused, and hints its part). A
//!   served connection is not read while its peer has that many requests
//!   being answered or whose answers are not yet written (QUIC's flow
//!   control then holds the sender). A frame
//!   past the frame limit is never sent: a request fails, an answer is
//!   replaced with an error answer, so no caller waits for its deadline.
//! - Hands on: answers, or a [`PeerError`] naming the peer.
//!
//! A peer whose certificate the cluster CA did not sign, or that presents
//! none, fails the handshake: it never gets a stream. One whose
//! certificate names no member the handler admits (a stranger with a
//! certificate from the cluster's CA, or a denied node) has its connection
//! closed before it is read. Every request is handed on with the member
//! its certificate names, which the handler checks what it says against.

// This module decodes bytes from the network: what it reads must never make
// it panic.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_ring::wire::ServerError;
use quiver_ring::NodeId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::tls::{NodeTls, TlsError};
use crate::lock;
use crate::messages::{PeerReply, PeerRequest};

/// The bounds of peer links: settings (`[limits]` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkBounds {
    /// Requests sent on one link and not yet answered, at most; and
    /// requests from one peer being answered at once.
    pub requests_in_flight_max: usize,
    /// Bytes queued on one link and not yet written, at most (one frame
    /// of any size may go when nothing is queued).
    pub queued_bytes_max: u64,
    /// The largest peer frame: a full bulk set and its framing.
    pub frame_bytes_max: usize,
    /// The endpoint's UDP receive and send buffers, asked of the kernel
    /// (which grants at most `net.core.rmem_max`/`wmem_max`). A datagram
    /// that arrives to a full buffer is dropped by the kernel and sent
    /// again by QUIC, late: a burst of bulk sets from two peers overflows
    /// the kernel's default of about 200 KiB.
    pub socket_buffer_bytes: usize,
}

impl Default for LinkBounds {
    fn default() -> LinkBounds {
        LinkBounds {
            requests_in_flight_max: 1 << 18,
            queued_bytes_max: 256 << 20,
            frame_bytes_max: 80 << 20,
            socket_buffer_bytes: 4 << 20,
        }
    }
}

/// How often the links of one endpoint reached a bound (what they hold now
/// is each link's own: [`PeerLink::in_flight`], [`PeerLink::queued_bytes`];
/// nothing here is touched by a request that passes).
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Calls refused at a link's bound of requests in flight.
    pub refused_in_flight: AtomicU64,
    /// Calls refused at a link's bound of bytes queued.
    pub refused_queued: AtomicU64,
    /// Times a served connection was not read, at its bound.
    pub serving_paused: AtomicU64,
    /// Answers past the frame limit, replaced with an error answer.
    pub answers_too_large: AtomicU64,
    /// The receive buffer the kernel granted the endpoint's socket.
    pub socket_buffer_granted: AtomicU64,
    /// The socket's inode, to find it in `/proc/net/udp` (0: unknown).
    socket_inode: AtomicU64,
}

impl LinkStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The bytes waiting in the endpoint socket's receive buffer, and the
    /// datagrams the kernel dropped there because it was full, as
    /// `/proc/net/udp` tells (`None` where it cannot be read).
    pub fn socket_buffer(&self) -> Option<(u64, u64)> {
        let inode = self.socket_inode.load(Ordering::Relaxed);
        ["/proc/self/net/udp", "/proc/self/net/udp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .find_map(|text| udp_socket_use(&text, inode))
    }
}

/// In a `/proc/net/udp` table, the socket `inode`'s receive queue (bytes)
/// and drops.
fn udp_socket_use(table: &str, inode: u64) -> Option<(u64, u64)> {
    if inode == 0 {
        return None;
    }
    table.lines().skip(1).find_map(|line| {
        // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout
        // inode ref pointer drops
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        let (_, rx_queue) = fields.get(4)?.split_once(':')?;
        let queued = u64::from_str_radix(rx_queue, 16).ok()?;
        let drops = fields.last()?.parse().ok()?;
        Some((queued, drops))
    })
}

/// How often an idle link proves it is alive, and how long a silent one
/// lasts.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct Frame<T> {
    id: u64,
    body: T,
}

/// A frame body as a link reads it: its id and message, if it decodes.
pub fn decode_frame<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<(u64, T)> {
    postcard::from_bytes::<Frame<T>>(body).ok().map(|frame| (frame.id, frame.body))
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer} ({addr}): {reason}")]
    Link { peer: String, addr: SocketAddr, reason: String },
    #[error("peer {peer} ({addr}): no answer within {timeout:?}")]
    Timeout { peer: String, addr: SocketAddr, timeout: Duration },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no link to node {:016x}", .0.0)]
    Unknown(NodeId),
    #[error("peer {peer}: its link is at its bound ({bound}); not sent")]
    Busy { peer: String, bound: String },
}

/// Called once with the answer to a peer's request, from any thread.
pub type Reply = Box<dyn FnOnce(PeerReply) + Send>;

/// What a node does with its peers' requests. Returns at once; the answer
/// goes to `reply` when it is ready (a write once it is durable).
pub trait PeerHandler: Send + Sync + 'static {
    /// The names of the members this node takes connections from.
    fn admitted(&self) -> Vec<String>;
    /// A request from `from`, the member the peer's certificate names.
    fn handle(&self, from: &str, request: PeerRequest, reply: Reply);
}

/// The member `connection`'s certificate names, among `admitted`.
fn member_of(connection: &quinn::Connection, admitted: &[String]) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    super::tls::certified_name(chain.first()?, admitted).map(str::to_owned)
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    Arc::new(transport)
}

/// This node's QUIC endpoint.
#[derive(Debug, Clone)]
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    tls: NodeTls,
    bounds: LinkBounds,
    stats: Arc<LinkStats>,
}

impl PeerEndpoint {
    /// Binds `addr` (UDP) with this node's certificate, serving and
    /// dialling, its links held to `bounds`.
    pub fn bind(addr: SocketAddr, tls: NodeTls, bounds: LinkBounds) -> Result<PeerEndpoint, PeerError> {
        let binding =
            |e: std::io::Error| PeerError::Link { peer: tls.name.clone(), addr, reason: format!("binding: {e}") };
        let socket = std::net::UdpSocket::bind(addr).map_err(binding)?;
        let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(binding)?;
        // The kernel may grant less than asked (its own maximum): that is
        // what `socket_buffers` shows.
        let _ = state.set_recv_buffer_size((&socket).into(), bounds.socket_buffer_bytes);
        let _ = state.set_send_buffer_size((&socket).into(), bounds.socket_buffer_bytes);
        let stats = Arc::new(LinkStats::default());
        let granted = state.recv_buffer_size((&socket).into()).unwrap_or(0);
        stats.socket_buffer_granted.store(granted as u64, Ordering::Relaxed);
        stats.socket_inode.store(socket_inode(&socket), Ordering::Relaxed);
        let mut server = tls.quic_server()?;
        server.transport_config(transport());
        let runtime = Arc::new(quinn::TokioRuntime);
        let mut endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime).map_err(binding)?;
        let mut client = tls.quic_client()?;
        client.transport_config(transport());
        endpoint.set_default_client_config(client);
        Ok(PeerEndpoint { endpoint, tls, bounds, stats })
    }

    pub fn bounds(&self) -> LinkBounds {
        self.bounds
    }

    /// What its links hold now, and how often a bound was reached.
    pub fn stats(&self) -> Arc<LinkStats> {
        self.stats.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves peers until the endpoint is closed: every connection that
    /// passes the handshake, every request on its streams.
    pub fn serve(&self, handler: Arc<dyn PeerHandler>) -> tokio::task::JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        let (bounds, stats) = (self.bounds, self.stats.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (handler, stats) = (handler.clone(), stats.clone());
                tokio::spawn(async move {
                    let connection = match incoming.await {
                        Ok(connection) => connection,
                        Err(error) => {
                            tracing::warn!(%error, "a peer failed the handshake");
                            return;
                        }
                    };
                    let Some(from) = member_of(&connection, &handler.admitted()) else {
                        tracing::warn!(
                            addr = %connection.remote_address(),
                            "a peer's certificate names no member this node admits; its connection is closed"
                        );
                        connection.close(NOT_A_MEMBER.into(), b"the certificate names no member this node admits");
                        return;
                    };
                    let from: Arc<str> = from.into();
                    // One bound of requests being answered for the whole
                    // connection, whatever its streams.
                    let slots = Arc::new(tokio::sync::Semaphore::new(bounds.requests_in_flight_max.max(1)));
                    while let Ok((send, recv)) = connection.accept_bi().await {
                        let served = Served {
                            handler: handler.clone(),
                            from: from.clone(),
                            slots: slots.clone(),
                            stats: stats.clone(),
                            bounds,
                        };
                        tokio::spawn(serve_stream(send, recv, served));
                    }
                });
            }
        })
    }

    /// Closes the endpoint: every link ends. Its socket is released once
    /// every handle (and the task [`PeerEndpoint::serve`] started) is gone.
    pub async fn close(self) {
        self.endpoint.close(0u32.into(), b"closing");
        self.endpoint.wait_idle().await;
    }

    /// A link to the peer called `name` at `addr` (dialled on first use).
    pub fn link(&self, name: &str, addr: SocketAddr) -> PeerLink {
        PeerLink {
            endpoint: self.endpoint.clone(),
            name: name.to_owned(),
            addr,
            live: tokio::sync::Mutex::new(None),
            client: None,
            bounds: self.bounds,
            stats: self.stats.clone(),
        }
    }

    /// A link that presents no certificate: for tests of refusal.
    pub fn link_without_certificate(&self, name: &str, addr: SocketAddr) -> Result<PeerLink, PeerError> {
        let mut link = self.link(name, addr);
        let mut client = self.tls.quic_client_without_certificate()?;
        client.transport_config(transport());
        link.client = Some(client);
        Ok(link)
    }
}

/// The inode of `socket`, as `/proc/net/udp` names it (0: unknown).
fn socket_inode(socket: &std::net::UdpSocket) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd())).map_or(0, |m| m.ino())
}

/// The QUIC error code a connection from a stranger is closed with.
const NOT_A_MEMBER: u32 = 403;

/// What a served stream needs: whom it serves, for whom, and its bounds.
struct Served {
    handler: Arc<dyn PeerHandler>,
    /// The member the peer's certificate names.
    from: Arc<str>,
    /// Requests from this peer being answered: while none is free, the
    /// stream is not read.
    slots: Arc<tokio::sync::Semaphore>,
    stats: Arc<LinkStats>,
    bounds: LinkBounds,
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, served: Served) {
    let Served { handler, from, slots, stats, bounds } = served;
    // Each answer holds its request's slot until it is written: never more
    // answers wait here than there are slots, and a peer that reads no
    // answers stops being read.
    let (answers, mut queue) = mpsc::channel::<Queued>(bounds.requests_in_flight_max.max(1));
    let writer = tokio::spawn(async move {
        write_frames(&mut send, &mut queue, |_| {}).await;
        let _ = send.finish();
    });
    while let Some(body) = read_frame(&mut recv, bounds.frame_bytes_max).await {
        let Some((id, request)) = decode_frame::<PeerRequest>(&body) else { break };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                stats.serving_paused.fetch_add(1, Ordering::Relaxed);
                let Ok(slot) = slots.clone().acquire_owned().await else { break };
                slot
            }
        };
        let (answers, stats) = (answers.clone(), stats.clone());
        handler.handle(
            &from,
            request,
            Box::new(move |body| {
                let mut out = Vec::new();
                if quiver_ring::wire::encode_frame(&mut out, &Frame { id, body }, bounds.frame_bytes_max).is_err() {
                    // Too large to send: the caller gets an error now, not
                    // silence until its deadline.
                    stats.answers_too_large.fetch_add(1, Ordering::Relaxed);
                    out.clear();
                    let error = ServerError::new(
                        quiver_ring::wire::ErrorKind::ResponseTooLarge,
                        format!("the answer is larger than the peer frame limit of {} bytes", bounds.frame_bytes_max),
                    );
                    let body = PeerReply::Failed(error);
                    let _ = quiver_ring::wire::encode_frame(&mut out, &Frame { id, body }, usize::MAX);
                }
                // Room is certain: every answer queued holds a slot.
                let _ = answers.try_send(Queued { bytes: out, _slot: Some(slot) });
            }),
        );
    }
    drop(answers);
    let _ = writer.await;
}

/// A frame waiting to be written, and what it holds until then (an
/// answer: its request's slot).
struct Queued {
    bytes: Vec<u8>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Writes the frames queued, every one queued so far in one write, until
/// the queue closes or the stream fails; tells `written` the bytes of each
/// write, and at the end those of the frames left unwritten.
async fn write_frames(send: &mut quinn::SendStream, queue: &mut mpsc::Receiver<Queued>, written: impl Fn(u64)) {
    let mut buf = Vec::new();
    let mut batch = Vec::new();
    while let Some(frame) = queue.recv().await {
        batch.push(frame);
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        buf.clear();
        batch.iter().for_each(|frame| buf.extend_from_slice(&frame.bytes));
        let result = send.write_all(&buf).await;
        written(buf.len() as u64);
        // Written: their slots are free.
        batch.clear();
        if result.is_err() {
            break;
        }
    }
    queue.close();
    while let Ok(left) = queue.try_recv() {
        written(left.bytes.len() as u64);
    }
}

/// One frame's body, or `None` at the end of the stream or on a bad frame.
async fn read_frame(recv: &mut quinn::RecvStream, frame_bytes_max: usize) -> Option<Vec<u8>> {
    let mut header = [0u8; quiver_ring::wire::LEN_BYTES];
    recv.read_exact(&mut header).await.ok()?;
    let len = quiver_ring::wire::frame_len(header);
    if len > frame_bytes_max {
        return None;
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    let read = (&mut *recv).take(len as u64).read_to_end(&mut body).await.ok()?;
    (read == len).then_some(body)
}

/// Called once with the answer to a request sent on a link, or the error
/// that ended the link first. It runs on the link's reader task: it must be
/// quick.
pub type Answer = Box<dyn FnOnce(Result<PeerReply, PeerError>) + Send>;

type Pending = Arc<Mutex<HashMap<u64, Answer>>>;

/// A live stream to a peer.
struct Live {
    /// Room for as many frames as requests may be in flight.
    frames: mpsc::Sender<Queued>,
    pending: Pending,
    broken: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes queued on this link and not yet written.
    queued: Arc<AtomicU64>,
}

/// A link to one peer: calls are pipelined on one stream and matched by id.
pub struct PeerLink {
    endpoint: quinn::Endpoint,
    name: String,
    addr: SocketAddr,
    live: tokio::sync::Mutex<Option<Arc<Live>>>,
    /// A client configuration other than the endpoint's (tests).
    client: Option<quinn::ClientConfig>,
    bounds: LinkBounds,
    stats: Arc<LinkStats>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerLink({} at {})", self.name, self.addr)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl PeerLink {
    fn error(&self, reason: impl std::fmt::Display) -> PeerError {
        PeerError::Link { peer: self.name.clone(), addr: self.addr, reason: reason.to_string() }
    }

    async fn live(&self) -> Result<Arc<Live>, PeerError> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref().filter(|l| !l.broken.load(Ordering::Acquire)) {
            return Ok(current.clone());
        }
        let connecting = match &self.client {
            Some(client) => self.endpoint.connect_with(client.clone(), self.addr, &self.name),
            None => self.endpoint.connect(self.addr, &self.name),
        }
        .map_err(|e| self.error(format!("connecting: {e}")))?;
        let connection = connecting.await.map_err(|e| self.error(format!("handshake: {e}")))?;
        let (mut send, mut recv) =
            connection.open_bi().await.map_err(|e| self.error(format!("opening a stream: {e}")))?;
        let (frames, mut queue) = mpsc::channel::<Queued>(self.bounds.requests_in_flight_max.max(1));
        let pending: Pending = Arc::default();
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queued = Arc::new(AtomicU64::new(0));
        let (writer_broken, writer_queued) = (broken.clone(), queued.clone());
        tokio::spawn(async move {
            write_frames(&mut send, &mut queue, |bytes| {
                writer_queued.fetch_sub(bytes, Ordering::Relaxed);
            })
            .await;
            writer_broken.store(true, Ordering::Release);
        });
        let (reader_pending, reader_broken) = (pending.clone(), broken.clone());
        let (peer, addr, frame_bytes_max) = (self.name.clone(), self.addr, self.bounds.frame_bytes_max);
        tokio::spawn(async move {
            while let Some(body) = read_frame(&mut recv, frame_bytes_max).await {
                let Some((id, reply)) = decode_frame::<PeerReply>(&body) else { break };
                let answer = lock(&reader_pending).remove(&id);
                if let Some(answer) = answer {
                    answer(Ok(reply));
                }
            }
            reader_broken.store(true, Ordering::Release);
            let unanswered: Vec<Answer> = lock(&reader_pending).drain().map(|(_, answer)| answer).collect();
            for answer in unanswered {
                answer(Err(PeerError::Link { peer: peer.clone(), addr, reason: "link lost before the answer".into() }));
            }
            drop(connection);
        });
        let fresh = Arc::new(Live { frames, pending, broken, queued });
        *live = Some(fresh.clone());
        Ok(fresh)
    }

    /// Queues `request` on `live`; `answer` gets its reply. Refused at once
    /// (`Busy`) at the link's bounds.
    fn send_on(&self, live: &Live, request: PeerRequest, answer: Answer) {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        let frame_bytes_max = self.bounds.frame_bytes_max;
        if let Err(e) = quiver_ring::wire::encode_frame(&mut frame, &Frame { id, body: request }, frame_bytes_max) {
            return answer(Err(self.error(e)));
        }
        let bytes = frame.len() as u64;
        let busy = |bound: String| PeerError::Busy { peer: self.name.clone(), bound };
        let mut pending = lock(&live.pending);
        if pending.len() >= self.bounds.requests_in_flight_max {
            drop(pending);
            self.stats.refused_in_flight.fetch_add(1, Ordering::Relaxed);
            let max = self.bounds.requests_in_flight_max;
            return answer(Err(busy(format!("{max} requests awaiting answers"))));
        }
        let queued = live.queued.load(Ordering::Relaxed);
        if queued > 0 && queued.saturating_add(bytes) > self.bounds.queued_bytes_max {
            drop(pending);
            self.stats.refused_queued.fetch_add(1, Ordering::Relaxed);
            let max = self.bounds.queued_bytes_max;
            return answer(Err(busy(format!("{queued} bytes queued of at most {max}"))));
        }
        pending.insert(id, answer);
        drop(pending);
        live.queued.fetch_add(bytes, Ordering::Relaxed);
        // Room is certain: the channel holds as many frames as requests may
        // be pending, and this one is counted there already.
        if live.frames.try_send(Queued { bytes: frame, _slot: None }).is_err() {
            live.queued.fetch_sub(bytes, Ordering::Relaxed);
            if let Some(answer) = lock(&live.pending).remove(&id) {
                answer(Err(self.error("link closed")));
            }
        }
    }

    /// Requests sent on the live link and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.current().map_or(0, |live| lock(&live.pending).len() as u64)
    }

    /// Bytes queued on the live link and not yet written.
    pub fn queued_bytes(&self) -> u64 {
        self.current().map_or(0, |live| live.queued.load(Ordering::Relaxed))
    }

    /// The live link, if there is one and it is not being dialled.
    fn current(&self) -> Option<Arc<Live>> {
        self.live.try_lock().ok().and_then(|live| live.as_ref().filter(|l| !l.broken.load(Ordering::Acquire)).cloned())
    }

    /// Sends `request` at once if the link is up, without waiting: `answer`
    /// gets the reply (or the error that ended the link), on the link's
    /// reader task. Nothing here times out: the caller's own deadline does.
    /// Without a live link, gives both back (to [`PeerLink::call`], which
    /// dials).
    pub fn try_send(&self, request: PeerRequest, answer: Answer) -> Result<(), (PeerRequest, Answer)> {
        match self.current() {
            Some(live) => {
                self.send_on(&live, request, answer);
                Ok(())
            }
            None => Err((request, answer)),
        }
    }

    /// Sends `request` (dialling first if need be) and waits at most
    /// `timeout` for its answer.
    pub async fn call(&self, request: PeerRequest, timeout: Duration) -> Result<PeerReply, PeerError> {
        let attempt = async {
            let live = self.live().await?;
            let (done, answer) = oneshot::channel();
            self.send_on(&live, request, Box::new(move |reply| drop(done.send(reply))));
            answer.await.map_err(|_| self.error("link lost before the answer"))?
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(answer) => answer,
            Err(_) => {
                // A peer that does not answer may have restarted: the next
                // call dials a new connection rather than wait on this one.
                if let Ok(live) = self.live.try_lock() {
                    if let Some(live) = live.as_ref() {
                        live.broken.store(true, Ordering::Release);
                    }
                }
                Err(PeerError::Timeout { peer: self.name.clone(), addr: self.addr, timeout })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sockets_queue_and_drops_are_read_from_the_udp_table() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 12: 0100007F:1F41 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4242 2 0000000000000000 0\n\
            \x20 13: 0100007F:1F42 00000000:0000 07 00000000:00001A00 00:00000000 00000000  1000        0 4343 2 0000000000000000 17\n";
        assert_eq!(udp_socket_use(table, 4343), Some((0x1A00, 17)));
        assert_eq!(udp_socket_use(table, 4242), Some((0, 0)));
        assert_eq!(udp_socket_use(table, 99), None);
        assert_eq!(udp_socket_use(table, 0), None);
        assert_eq!(udp_socket_use("header\ngarbage line", 4343), None);
    }

    #[tokio::test]
    async fn a_bound_endpoint_finds_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        quiver_certs::init_ca(&dir.path().join("ca")).unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        quiver_certs::issue_node(&dir.path().join("ca"), &dir.path().join("n1"), "n1", &[ip]).unwrap();
        let tls = NodeTls::load(&dir.path().join("n1"), "n1").unwrap();
        let endpoint = PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), tls, LinkBounds::default()).unwrap();
        let stats = endpoint.stats();
        assert!(LinkStats::get(&stats.socket_buffer_granted) > 0);
        assert_eq!(stats.socket_buffer().map(|(_, drops)| drops), Some(0));
    }
}
