//! The client listener.
//!
//! Each connection has a reader loop and a writer task. The reader reads one
//! frame at a time and hands it to the service, which never waits: reads go
//! to the reader threads and writes to the engine, whose threads queue each
//! answer when it is ready (a write's once it is durable and visible). So
//! many requests are in flight per connection (and group-commit together)
//! and answers go out in any order.
//!
//! While the reader works through frames it already has, answers are held
//! back (corked, see [`Outbox`]) and the reader writes them itself, 16 at a
//! time and the rest before it next waits for the socket: the pipelined
//! `get`s of one read go out in a few writes, not one per answer, and the
//! client starts on the first answers while the node answers the rest, so
//! the two sides' work overlaps instead of taking turns. Answers that come
//! later, from other threads, wake the writer task, which writes everything
//! queued so far at once.
//!
//! The first request of a connection must be `Hello` of this protocol
//! version; anything else is answered with `UnsupportedProtocol` and the
//! connection is closed. A `Hello` of another version that does not decode
//! here is still recognised and answered so (see `wire::peek_hello`).
//!
//! Bad input is answered, never fatal to the node: a frame longer than the
//! limit is refused before any of it is buffered, a body is buffered only as
//! its bytes arrive (a header alone reserves nothing), and a body that does
//! not decode gets a `Malformed` error with its id when the id can be read;
//! in those cases the connection is then closed. An answer larger than the
//! frame limit is replaced by a `ResponseTooLarge` error with its id, and
//! the connection goes on.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Duration;

use quiver_ring::wire::{self, ErrorKind, Op, Reply, Request, Response, ServerError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::service::{ConnectionStats, Service, Timing};

/// Bytes read from a client socket at once.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// After a failed `accept` (out of file descriptors, say), the listener
/// waits this long before it tries again, twice as long after each
/// failure in a row up to the most, so that it neither spins nor stops.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Connections refused at `connections_max` that are still being told so
/// (the error written, the client's first bytes drained so that closing
/// does not reset the connection before the client reads the error). Past
/// this many, a refused connection is closed at once.
const REFUSALS_MAX: usize = 64;

/// How long a refused connection is given to read its error.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Accepts connections until `stop` turns true, then waits for every
/// connection to finish its in-flight requests.
pub async fn serve(listener: TcpListener, service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    let for_connections = stop.clone();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let stats = || service.connection_stats();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    if connections.len() >= service.limits().connections_max {
                        ConnectionStats::count(&stats().refused);
                        if refusals.len() < REFUSALS_MAX {
                            refusals.spawn(refuse(stream, too_many_connections(&service)));
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let (service, stop) = (service.clone(), for_connections.clone());
                    connections.spawn(async move {
                        tracing::debug!(%peer, "client connected");
                        let stats = service.connection_stats();
                        stats.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        connection(stream, service.clone(), stop).await;
                        service.connection_stats().open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(%peer, "client disconnected");
                    });
                }
                // Out of file descriptors and the like: keep serving the
                // connections we have, try again shortly.
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    let mut stopping = for_connections.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopping.wait_for(|&stop| stop) => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            _ = stop.wait_for(|&stop| stop) => break,
            Some(_) = connections.join_next() => {}
            Some(_) = refusals.join_next() => {}
        }
    }
    drop(listener);
    refusals.abort_all();
    while connections.join_next().await.is_some() {}
}

/// The error a connection past `connections_max` gets.
fn too_many_connections(service: &Service) -> Vec<u8> {
    let max = service.limits().connections_max;
    let error = ServerError::new(
        ErrorKind::TooManyConnections,
        format!(
            "this node serves {max} client connections, its limit (connections_max); try again later or another node"
        ),
    );
    let mut frame = Vec::new();
    encode_response(&mut frame, &Response { id: 0, hlc: service.hlc(), result: Err(error) }, usize::MAX);
    frame
}

/// Tells a connection it is refused: the error (for id 0, which the
/// client takes as meant for every request it sent), then its first bytes
/// read and dropped until it closes or [`REFUSAL_LINGER`] passes.
async fn refuse(stream: TcpStream, frame: Vec<u8>) {
    let _ = stream.try_write(&frame);
    let (mut read, _write) = stream.into_split();
    let mut sink = [0u8; 4096];
    let drained = async {
        for _ in 0..16 {
            if matches!(read.read(&mut sink).await, Ok(0) | Err(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drained).await;
}

/// When a connection that waits for bytes is given up: its `Hello` is due
/// by a fixed time; after that, it may be idle for `idle` (`None`: for
/// ever) once nothing is in flight and its answers are written.
struct Patience {
    hello_due: Instant,
    idle: Option<Duration>,
}

impl Patience {
    /// The time to wake at, waiting for the next frame.
    fn wake_at(&self, greeted: bool, last_read: Instant) -> Option<Instant> {
        match greeted {
            false => Some(self.hello_due),
            true => self.idle.map(|idle| last_read + idle),
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a connection stopped reading.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The client closed, or its socket failed.
    Client,
    /// The node is shutting down.
    Stop,
    /// The client sent no `Hello` in time.
    NoHello,
    /// Nothing happened for the idle timeout.
    Idle,
    /// A frame the connection cannot go on after was answered.
    Refused,
}

async fn connection(stream: TcpStream, service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let (reader, writer) = stream.into_split();
    // Buffered: with many requests pipelined, one read syscall brings in
    // many frames instead of two syscalls per frame.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let limits = service.limits().clone();
    let wire_limits = limits.wire();
    let frame_max = limits.frame_bytes_max;
    // Until answers say otherwise, each request in flight may bring the
    // largest value back.
    let first_estimate = limits.value_bytes_max + limits.key_bytes_max;
    let outbox = Outbox::new(writer, frame_max, limits.idle_timeout()).expecting(first_estimate);
    let mut writer = tokio::spawn(outbox.clone().write_when_woken());
    let in_flight_max = limits.requests_in_flight_max;
    let in_flight = Arc::new(Semaphore::new(in_flight_max));
    let patience = Patience {
        hello_due: Instant::now() + Duration::from_millis(limits.hello_timeout_ms),
        idle: limits.idle_timeout(),
    };
    let stats = service.connection_stats();
    let mut greeted = false;
    let mut last_read = Instant::now();
    let end = loop {
        // Backpressure: while the answers its client has not read, and
        // those of the requests in flight (at the size answers have lately
        // had), are over the budget, read none of its requests.
        let in_flight_now = || in_flight_max - in_flight.available_permits();
        if outbox.over_budget(limits.connection_answer_bytes_max, in_flight_now()) {
            outbox.uncork();
            ConnectionStats::count(&stats.paused);
            stats.paused_now.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let drained = tokio::select! {
                drained = outbox.wait_under_budget(limits.connection_answer_bytes_max, in_flight_now) => drained,
                _ = stop.wait_for(|&stop| stop) => false,
            };
            stats.paused_now.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if !drained {
                // Stopping, or the writer gave up on a client that read
                // nothing for the idle timeout.
                break if *stop.borrow() { End::Stop } else { End::Idle };
            }
        }
        if reader.buffer().len() < wire::LEN_BYTES {
            outbox.uncork();
        }
        // Wait for the next frame's first byte; give up on a silent client
        // once it is past its time (and has nothing in flight).
        if reader.buffer().is_empty() {
            let waited = tokio::select! {
                filled = reader.fill_buf() => match filled {
                    Ok([]) | Err(_) => Some(End::Client),
                    Ok(_) => None,
                },
                _ = stop.wait_for(|&stop| stop) => Some(End::Stop),
                _ = sleep_until(patience.wake_at(greeted, last_read)) => {
                    let busy = in_flight.available_permits() < in_flight_max || !outbox.is_idle();
                    match (greeted, busy) {
                        (false, _) => Some(End::NoHello),
                        (true, false) => Some(End::Idle),
                        // Still answering: as good as a request just read.
                        (true, true) => {
                            last_read = Instant::now();
                            continue;
                        }
                    }
                }
            };
            if let Some(end) = waited {
                break end;
            }
        }
        outbox.cork();
        // A frame begun is finished within the same time, or the
        // connection is closed: half a frame holds nothing for long.
        let stalled = sleep_until(patience.wake_at(greeted, Instant::now()));
        let frame = tokio::select! {
            frame = read_frame(&mut reader, frame_max, &outbox) => frame,
            _ = stop.wait_for(|&stop| stop) => break End::Stop,
            _ = stalled => break if greeted { End::Idle } else { End::NoHello },
        };
        last_read = Instant::now();
        let body = match frame {
            Ok(body) => body,
            Err(Some(error)) => {
                outbox.send(Response { id: 0, hlc: service.hlc(), result: Err(error) });
                break End::Refused;
            }
            Err(None) => break End::Client,
        };
        // Counts are checked before the lists they announce are decoded.
        if let Err(error) = wire_limits.check_announced_entries(&body) {
            let id = wire::peek_id(&body).unwrap_or(0);
            outbox.send(Response { id, hlc: service.hlc(), result: Err(error) });
            if greeted {
                continue;
            }
            break End::Refused;
        }
        let request: Request = match postcard::from_bytes(&body) {
            Ok(request) => request,
            Err(e) => {
                let error = match wire::peek_hello(&body) {
                    Some((_, protocol)) if !greeted => unsupported(protocol),
                    _ => ServerError::new(ErrorKind::Malformed, format!("request does not decode: {e}")),
                };
                let id = wire::peek_id(&body).unwrap_or(0);
                outbox.send(Response { id, hlc: service.hlc(), result: Err(error) });
                break End::Refused;
            }
        };
        drop(body);
        if !greeted {
            let error = match request.op {
                Op::Hello { protocol } if protocol == wire::PROTOCOL_VERSION => None,
                Op::Hello { protocol } => Some(unsupported(protocol)),
                _ => Some(ServerError::new(
                    ErrorKind::UnsupportedProtocol,
                    format!(
                        "a connection opens with Hello (protocol {}); the connection is closed",
                        wire::PROTOCOL_VERSION
                    ),
                )),
            };
            if let Some(error) = error {
                outbox.send(Response { id: request.id, hlc: service.hlc(), result: Err(error) });
                break End::Refused;
            }
            greeted = true;
        }
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                outbox.uncork();
                ConnectionStats::count(&stats.waited_for_slot);
                let permit = tokio::select! {
                    permit = in_flight.clone().acquire_owned() => permit,
                    _ = stop.wait_for(|&stop| stop) => break End::Stop,
                };
                let Ok(permit) = permit else { break End::Stop };
                permit
            }
        };
        // The answer is queued by whichever thread finishes the request
        // (this task, a reader thread, the engine's), with no task between.
        let (answering, answers, id) = (service.clone(), outbox.clone(), request.id);
        let timing =
            Timing { hlc_seen: request.hlc_seen, deadline: request.deadline, consistency: request.consistency };
        service.start(timing, request.op, move |result| {
            answers.send(Response { id, hlc: answering.hlc(), result });
            drop(permit);
            answers.answered();
        });
        outbox.write_if_many();
    };
    match end {
        End::NoHello => ConnectionStats::count(&stats.closed_before_hello),
        End::Idle => ConnectionStats::count(&stats.closed_idle),
        End::Client | End::Stop | End::Refused => {}
    }
    // Every in-flight request answers (each holds a permit until its
    // answer is queued), then the writer writes what is left and ends:
    // within the idle timeout of the client reading nothing, or at
    // shutdown within the grace period.
    outbox.uncork();
    let all = u32::try_from(in_flight_max).unwrap_or(u32::MAX);
    let _ = in_flight.acquire_many(all).await;
    outbox.end();
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    let stopping = async {
        let _ = stop.wait_for(|&stop| stop).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = &mut writer => {}
        _ = stopping => {
            writer.abort();
            ConnectionStats::count(&stats.dropped_at_shutdown);
        }
    }
}

/// Reads one frame's body: `Err(Some(error))` for a frame the connection
/// cannot go on after (too long), `Err(None)` when the client went away.
/// Answers held back are written before it waits for bytes that have not
/// arrived.
async fn read_frame(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    frame_max: usize,
    outbox: &Outbox,
) -> Result<Vec<u8>, Option<ServerError>> {
    let mut header = [0u8; wire::LEN_BYTES];
    reader.read_exact(&mut header).await.map_err(|_| None)?;
    let len = wire::frame_len(header);
    if len > frame_max {
        return Err(Some(ServerError::new(
            ErrorKind::FrameTooLarge,
            format!("frame of {len} bytes exceeds the limit of {frame_max} bytes"),
        )));
    }
    if reader.buffer().len() < len {
        outbox.uncork();
    }
    // Grown as the bytes arrive, so a header that announces a large body
    // and then stalls costs no memory.
    let mut body = Vec::with_capacity(len.min(READ_BUFFER_BYTES));
    let read = (&mut *reader).take(len as u64).read_to_end(&mut body).await;
    if read.is_err() || body.len() != len {
        return Err(None);
    }
    Ok(body)
}

/// Where a connection's answers wait to be written, and who writes them.
///
/// Any thread queues an answer (the reader task, a reader thread, the
/// engine's). Corked, while the reader works through frames it already
/// has, answers are held until [`ANSWERS_PER_WRITE`] of them have gathered
/// and the reader writes them itself, or until it uncorks before it next
/// waits for the socket. Uncorked, an answer wakes the writer task. One
/// writer at a time, whoever it is: it encodes the answers it took and
/// writes them; answers queued meanwhile wait for it, and the writer task
/// looks again when a write ends.
#[derive(Clone)]
struct Outbox(Arc<OutboxInner>);

struct OutboxInner {
    socket: OwnedWriteHalf,
    pending: std::sync::Mutex<Pending>,
    /// Wakes the writer task: answers to write, or the end.
    wake: Notify,
    /// Wakes a reader waiting for the answers to drain below its budget:
    /// a write ended, or (while `paused`) a request ended.
    drained: Notify,
    /// The reader waits for the budget (see [`Outbox::wait_under_budget`]).
    paused: std::sync::atomic::AtomicBool,
    frame_max: usize,
    /// The writer gives up on a client that takes no byte for this long.
    stall: Option<Duration>,
}

#[derive(Default)]
struct Pending {
    /// Answers not yet encoded, in the order they came.
    answers: Vec<Response>,
    /// About how many bytes `answers` encode to.
    answer_bytes: usize,
    /// About how many bytes the write under way holds.
    writing_bytes: usize,
    /// About how large an answer is expected to be: the largest of late,
    /// shrinking by a 64th with each answer smaller than it.
    answer_estimate: usize,
    /// Bytes a write left unwritten (the socket was full): written first.
    unwritten: Vec<u8>,
    corked: bool,
    /// Someone is writing: new answers wait for them.
    writing: bool,
    /// The socket failed (the client went away): answers are dropped.
    failed: bool,
    /// No more answers will come: the writer task ends once all is written.
    ended: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.unwritten.is_empty()
    }

    /// About how many bytes of answers wait to reach the client.
    fn outstanding(&self) -> usize {
        self.answer_bytes + self.writing_bytes + self.unwritten.len()
    }
}

/// About how many bytes `response` encodes to: its keys and values, and a
/// little for the rest. Counted against the connection's answer budget
/// without encoding it.
fn answer_bytes(response: &Response) -> usize {
    const SMALL: usize = 32;
    let of = |value: &Option<Vec<u8>>| value.as_ref().map_or(1, |v| v.len() + 4);
    SMALL
        + match &response.result {
            Ok(Reply::Value(value)) => of(value),
            Ok(Reply::Values(values)) => values.iter().map(of).sum(),
            Ok(Reply::Hits(hits)) => hits.iter().map(|hit| hit.key.len() + hit.value.len() + 16).sum(),
            Ok(Reply::Versions(versions)) => {
                versions.context.0.len() + versions.versions.iter().map(|v| of(&v.value) + 10).sum::<usize>()
            }
            Ok(Reply::Status(_)) => 4096,
            Ok(Reply::Repaired(report)) => report.failed.iter().map(|f| f.len() + 2).sum(),
            Ok(Reply::TreesChecked(check)) => check.differing.iter().map(|key| key.len() + 2).sum(),
            Ok(Reply::Ring(ring)) => ring.view.members.len() * 128,
            Ok(Reply::Done) | Ok(Reply::Hello(_)) => 0,
            Err(error) => error.message.len(),
        }
}

/// Answers a corked reader lets gather before it writes them itself. The
/// client works on these while the node decodes and answers the rest of
/// what it read, so the two sides' work overlaps instead of taking turns
/// (docs/performance.md, "Answers in chunks"). Smaller chunks cost more
/// writes on both sides: 16 measured best of 4, 8, 16, 32 and 64.
const ANSWERS_PER_WRITE: usize = 16;

impl Outbox {
    fn new(socket: OwnedWriteHalf, frame_max: usize, stall: Option<Duration>) -> Outbox {
        Outbox(Arc::new(OutboxInner {
            socket,
            pending: std::sync::Mutex::new(Pending::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            paused: std::sync::atomic::AtomicBool::new(false),
            frame_max,
            stall,
        }))
    }

    /// Expects answers of `bytes` until answers say otherwise.
    fn expecting(self, bytes: usize) -> Outbox {
        crate::lock(&self.0.pending).answer_estimate = bytes;
        self
    }

    /// Whether the answers waiting, and those of `in_flight` requests at
    /// the size answers have lately had, come to `budget` bytes or more.
    fn over_budget(&self, budget: usize, in_flight: usize) -> bool {
        let pending = crate::lock(&self.0.pending);
        pending.outstanding().saturating_add(in_flight.saturating_mul(pending.answer_estimate)) >= budget
    }

    /// Whether every answer was written (or the socket failed).
    fn is_idle(&self) -> bool {
        let pending = crate::lock(&self.0.pending);
        pending.failed || (pending.is_empty() && !pending.writing)
    }

    /// Waits until [`Outbox::over_budget`] no longer holds: `true`;
    /// `false` if the socket failed first (the writer gave up on a client
    /// that read nothing).
    async fn wait_under_budget(&self, budget: usize, in_flight: impl Fn() -> usize) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.0.paused.store(true, SeqCst);
        let drained = loop {
            let drained = self.0.drained.notified();
            tokio::pin!(drained);
            // Registered before the checks, so a write or a request that
            // ends between them and the wait still wakes it: every answer
            // is written while the reader waits (uncorked), and a request
            // that ends after this flag was set says so (`answered`).
            drained.as_mut().enable();
            if crate::lock(&self.0.pending).failed {
                break false;
            }
            if !self.over_budget(budget, in_flight()) {
                break true;
            }
            drained.await;
        };
        self.0.paused.store(false, SeqCst);
        drained
    }

    /// A request's slot was given back: a reader waiting for the budget
    /// looks again.
    fn answered(&self) {
        if self.0.paused.load(std::sync::atomic::Ordering::SeqCst) {
            self.0.drained.notify_waiters();
        }
    }

    /// Queues `response`; the writer task is woken unless corked.
    fn send(&self, response: Response) {
        let bytes = answer_bytes(&response);
        let mut pending = crate::lock(&self.0.pending);
        if pending.failed {
            return;
        }
        pending.answer_bytes += bytes;
        pending.answer_estimate = bytes.max(pending.answer_estimate - pending.answer_estimate / 64);
        pending.answers.push(response);
        if !pending.corked && !pending.writing {
            drop(pending);
            self.0.wake.notify_one();
        }
    }

    /// Writes what is queued, here and now, if it is many answers.
    fn write_if_many(&self) {
        if crate::lock(&self.0.pending).answers.len() >= ANSWERS_PER_WRITE {
            self.write_now();
        }
    }

    /// Writes what is queued as far as the socket takes it without
    /// waiting; the writer task is woken for any rest.
    fn write_now(&self) {
        let Some(mut bytes) = self.take() else { return };
        let mut written = 0;
        let failed = loop {
            match self.0.socket.try_write(bytes.get(written..).unwrap_or_default()) {
                // A socket that takes nothing of a non-empty buffer is
                // broken; looping on it would spin.
                Ok(0) => break true,
                Ok(n) => {
                    written += n;
                    if written == bytes.len() {
                        break false;
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        bytes.drain(..written);
        if self.put_back(bytes, failed) {
            self.0.wake.notify_one();
        }
    }

    /// What is queued, encoded after the bytes a write left, to write it;
    /// `None` when nothing is, or someone is writing.
    fn take(&self) -> Option<Vec<u8>> {
        let mut pending = crate::lock(&self.0.pending);
        if pending.writing || pending.failed || pending.is_empty() {
            return None;
        }
        pending.writing = true;
        let mut bytes = std::mem::take(&mut pending.unwritten);
        let answers = std::mem::take(&mut pending.answers);
        pending.writing_bytes = std::mem::take(&mut pending.answer_bytes) + bytes.len();
        // Encoded outside the lock: the threads that queue answers do not
        // wait for it.
        drop(pending);
        for answer in &answers {
            encode_response(&mut bytes, answer, self.0.frame_max);
        }
        Some(bytes)
    }

    /// Ends a write that left `unwritten` (empty when all went). Whether
    /// anything is left to write.
    fn put_back(&self, unwritten: Vec<u8>, failed: bool) -> bool {
        let mut pending = crate::lock(&self.0.pending);
        pending.writing = false;
        pending.writing_bytes = 0;
        let more = if failed {
            pending.failed = true;
            pending.answers = Vec::new();
            pending.answer_bytes = 0;
            false
        } else {
            // Kept, emptied or not: its allocation serves the next write.
            pending.unwritten = unwritten;
            !pending.is_empty()
        };
        drop(pending);
        self.0.drained.notify_waiters();
        more
    }

    /// Writes what is queued (the reader must wait for the socket), and
    /// lets later answers wake the writer until [`Outbox::cork`].
    fn uncork(&self) {
        let mut pending = crate::lock(&self.0.pending);
        if !pending.corked {
            return;
        }
        pending.corked = false;
        drop(pending);
        self.write_now();
    }

    /// Holds answers from now on (the reader has frames in hand).
    fn cork(&self) {
        crate::lock(&self.0.pending).corked = true;
    }

    /// No more answers: the writer task writes what is left and ends.
    fn end(&self) {
        crate::lock(&self.0.pending).ended = true;
        self.0.wake.notify_one();
    }

    /// The writer task: writes what is queued whenever woken, waiting for
    /// the socket as long as it must, until [`Outbox::end`].
    async fn write_when_woken(self) {
        loop {
            self.0.wake.notified().await;
            while let Some(bytes) = self.take() {
                let failed = self.write_all(&bytes).await.is_err();
                let mut emptied = bytes;
                emptied.clear();
                self.put_back(emptied, failed);
            }
            let pending = crate::lock(&self.0.pending);
            if pending.ended && !pending.writing && (pending.failed || pending.is_empty()) {
                return;
            }
        }
    }

    /// Writes `bytes`, waiting for the socket as long as the client takes
    /// some within the stall time; one that takes nothing for that long is
    /// given up on (`TimedOut`).
    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match self.0.stall {
                Some(stall) => tokio::time::timeout(stall, self.0.socket.writable())
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??,
                None => self.0.socket.writable().await?,
            }
            match self.0.socket.try_write(bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// The answer to a `Hello` of another protocol version.
fn unsupported(protocol: u32) -> ServerError {
    ServerError::new(
        ErrorKind::UnsupportedProtocol,
        format!(
            "this node speaks protocol {}, the client {protocol}; the connection is closed",
            wire::PROTOCOL_VERSION
        ),
    )
}

/// Appends `response`'s frame to `buf`; one over `frame_max` is answered
/// with a `ResponseTooLarge` error for the same request instead.
fn encode_response(buf: &mut Vec<u8>, response: &Response, frame_max: usize) {
    if let Err(too_large) = wire::encode_frame(buf, response, frame_max) {
        let error = ServerError::new(
            ErrorKind::ResponseTooLarge,
            format!("the answer ({} bytes) exceeds the frame limit of {} bytes", too_large.bytes, too_large.max),
        );
        let refusal = Response { id: response.id, hlc: response.hlc, result: Err(error) };
        // An error message always fits: the limit leaves room for a key
        // and a value.
        let _ = wire::encode_frame(buf, &refusal, frame_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::wire::Reply;
    use quiver_ring::Hlc;

    /// The node's write half of a loopback connection in an outbox with its
    /// writer task, and the client's end as a plain socket (its reads are
    /// the read syscall itself: bytes a write put in the socket are seen at
    /// once).
    async fn outbox_on_loopback() -> (Outbox, tokio::task::JoinHandle<()>, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // A bound, not a pace: a test whose answers never come fails
        // instead of hanging.
        client.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_, write) = server.into_split();
        let outbox = Outbox::new(write, 8 << 20, None);
        let writer = tokio::spawn(outbox.clone().write_when_woken());
        (outbox, writer, client)
    }

    fn answer(id: u64, value_bytes: usize) -> Response {
        Response { id, hlc: Hlc(1), result: Ok(Reply::Value(Some(vec![id as u8; value_bytes]))) }
    }

    /// Whether the client could read nothing right now.
    fn nothing_arrived(client: &std::net::TcpStream) -> bool {
        client.set_nonblocking(true).unwrap();
        let none = matches!(client.peek(&mut [0u8; 1]), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock);
        client.set_nonblocking(false).unwrap();
        none
    }

    /// The ids of the next `n` answers the client reads, each checked whole.
    fn read_answers(client: &mut std::net::TcpStream, n: usize) -> Vec<u64> {
        use std::io::Read;
        (0..n)
            .map(|_| {
                let mut header = [0u8; wire::LEN_BYTES];
                client.read_exact(&mut header).unwrap();
                let mut body = vec![0u8; wire::frame_len(header)];
                client.read_exact(&mut body).unwrap();
                let response: Response = postcard::from_bytes(&body).unwrap();
                let Ok(Reply::Value(Some(value))) = &response.result else { panic!("{response:?}") };
                assert!(value.iter().all(|&b| b == response.id as u8), "answer {} came torn", response.id);
                response.id
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corked_answers_are_written_sixteen_at_a_time_or_at_the_uncork_and_uncorked_ones_by_the_writer() {
        let (outbox, writer, mut client) = outbox_on_loopback().await;
        outbox.cork();
        for id in 0..ANSWERS_PER_WRITE as u64 - 1 {
            outbox.send(answer(id, 10));
        }
        outbox.write_if_many();
        assert!(nothing_arrived(&client), "a corked outbox wrote fewer than {ANSWERS_PER_WRITE} answers");
        // Another thread's answer is held too: only the reader writes while corked.
        let other = outbox.clone();
        std::thread::spawn(move || other.send(answer(15, 10))).join().unwrap();
        assert!(nothing_arrived(&client), "a corked outbox wrote on another thread's answer");
        outbox.write_if_many();
        assert_eq!(read_answers(&mut client, ANSWERS_PER_WRITE), (0..16).collect::<Vec<_>>());
        assert!(nothing_arrived(&client));
        // Held again until the reader uncorks.
        outbox.send(answer(16, 10));
        outbox.send(answer(17, 10));
        assert!(nothing_arrived(&client));
        // Written by the uncork itself: nothing else would write them.
        outbox.uncork();
        assert_eq!(read_answers(&mut client, 2), [16, 17]);
        // Uncorked, an answer from any thread goes out through the writer task.
        let other = outbox.clone();
        std::thread::spawn(move || other.send(answer(18, 10))).join().unwrap();
        assert_eq!(read_answers(&mut client, 1), [18]);
        // The end: the writer task ends, and the connection closes with it.
        outbox.end();
        writer.await.unwrap();
        drop(outbox);
        assert_eq!(std::io::Read::read(&mut client, &mut [0u8; 1]).unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_full_socket_leaves_unwritten_goes_out_whole_before_later_answers() {
        let (outbox, writer, mut client) = outbox_on_loopback().await;
        // Far more than the socket's buffers take: the reader's own write
        // stops part-way, and the writer task writes the rest as the client
        // reads.
        outbox.cork();
        for id in 0..ANSWERS_PER_WRITE as u64 {
            outbox.send(answer(id, 1 << 20));
        }
        outbox.write_if_many();
        outbox.uncork();
        for id in 16..20 {
            outbox.send(answer(id, 100_000));
        }
        let ids = tokio::task::spawn_blocking(move || read_answers(&mut client, 20)).await.unwrap();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        outbox.end();
        writer.await.unwrap();
    }

    #[test]
    fn an_answer_over_the_frame_limit_becomes_a_response_too_large_error_for_its_request() {
        let mut buf = Vec::new();
        let small = Response { id: 1, hlc: Hlc(5), result: Ok(Reply::Value(Some(vec![1; 10]))) };
        let large =
            Response { id: 2, hlc: Hlc(5), result: Ok(Reply::Values(vec![Some(vec![2; 600]), Some(vec![3; 600])])) };
        encode_response(&mut buf, &small, 1000);
        encode_response(&mut buf, &large, 1000);
        encode_response(&mut buf, &small, 1000);
        let mut answers = Vec::new();
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let len = wire::frame_len(rest[..wire::LEN_BYTES].try_into().unwrap());
            answers.push(postcard::from_bytes::<Response>(&rest[wire::LEN_BYTES..wire::LEN_BYTES + len]).unwrap());
            rest = &rest[wire::LEN_BYTES + len..];
        }
        assert_eq!(answers.len(), 3);
        assert_eq!((&answers[0], &answers[2]), (&small, &small));
        assert_eq!(answers[1].id, 2);
        let error = answers[1].result.clone().unwrap_err();
        assert_eq!(error.kind, ErrorKind::ResponseTooLarge);
        assert!(error.message.contains("limit of 1000 bytes"), "{}", error.message);
    }
}
