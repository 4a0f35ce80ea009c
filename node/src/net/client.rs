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

use quiver_ring::wire::{self, ErrorKind, Op, Request, Response, ServerError};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::service::{Service, Timing};

/// Bytes read from a client socket at once.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Accepts connections until `stop` turns true, then waits for every
/// connection to finish its in-flight requests.
pub async fn serve(listener: TcpListener, service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let for_connections = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (service, stop) = (service.clone(), for_connections.clone());
                    connections.spawn(async move {
                        tracing::debug!(%peer, "client connected");
                        connection(stream, service, stop).await;
                        tracing::debug!(%peer, "client disconnected");
                    });
                }
                // Out of file descriptors and the like: keep serving the
                // connections we have, try again shortly.
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.wait_for(|&stop| stop) => break,
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn connection(stream: TcpStream, service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let (reader, writer) = stream.into_split();
    // Buffered: with many requests pipelined, one read syscall brings in
    // many frames instead of two syscalls per frame.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let frame_max = service.limits().frame_bytes_max;
    let outbox = Outbox::new(writer, frame_max);
    let writer = tokio::spawn(outbox.clone().write_when_woken());
    let in_flight_max = service.limits().requests_in_flight_max;
    let in_flight = Arc::new(Semaphore::new(in_flight_max));
    let mut greeted = false;
    loop {
        let mut header = [0u8; wire::LEN_BYTES];
        if reader.buffer().len() < wire::LEN_BYTES {
            outbox.uncork();
        }
        tokio::select! {
            read = reader.read_exact(&mut header) => if read.is_err() { break },
            _ = stop.wait_for(|&stop| stop) => break,
        }
        outbox.cork();
        let len = wire::frame_len(header);
        if len > frame_max {
            let error = ServerError::new(
                ErrorKind::FrameTooLarge,
                format!("frame of {len} bytes exceeds the limit of {frame_max} bytes"),
            );
            outbox.send(Response { id: 0, hlc: service.hlc(), result: Err(error) });
            break;
        }
        // Grown as the bytes arrive, so a header that announces a large
        // body and then stalls costs no memory. Also raced against
        // shutdown: a client that sends half a frame and stalls must not
        // keep the node from stopping.
        if reader.buffer().len() < len {
            outbox.uncork();
        }
        let mut body = Vec::with_capacity(len.min(READ_BUFFER_BYTES));
        let mut limited = (&mut reader).take(len as u64);
        tokio::select! {
            read = limited.read_to_end(&mut body) => {
                if read.is_err() || body.len() != len { break }
            }
            _ = stop.wait_for(|&stop| stop) => break,
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
                break;
            }
        };
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
                break;
            }
            greeted = true;
        }
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                outbox.uncork();
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
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
        });
        outbox.write_if_many();
    }
    // Every in-flight request answers (each holds a permit until its
    // answer is queued), then the writer writes what is left and ends.
    outbox.uncork();
    let all = u32::try_from(in_flight_max).unwrap_or(u32::MAX);
    let _ = in_flight.acquire_many(all).await;
    outbox.end();
    let _ = writer.await;
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
    frame_max: usize,
}

#[derive(Default)]
struct Pending {
    /// Answers not yet encoded, in the order they came.
    answers: Vec<Response>,
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
}

/// Answers a corked reader lets gather before it writes them itself. The
/// client works on these while the node decodes and answers the rest of
/// what it read, so the two sides' work overlaps instead of taking turns
/// (docs/performance.md, "Answers in chunks"). Smaller chunks cost more
/// writes on both sides: 16 measured best of 4, 8, 16, 32 and 64.
const ANSWERS_PER_WRITE: usize = 16;

impl Outbox {
    fn new(socket: OwnedWriteHalf, frame_max: usize) -> Outbox {
        Outbox(Arc::new(OutboxInner {
            socket,
            pending: std::sync::Mutex::new(Pending::default()),
            wake: Notify::new(),
            frame_max,
        }))
    }

    /// Queues `response`; the writer task is woken unless corked.
    fn send(&self, response: Response) {
        let mut pending = crate::lock(&self.0.pending);
        if pending.failed {
            return;
        }
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
        if failed {
            pending.failed = true;
            pending.answers = Vec::new();
            return false;
        }
        // Kept, emptied or not: its allocation serves the next write.
        pending.unwritten = unwritten;
        !pending.is_empty()
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

    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            self.0.socket.writable().await?;
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
        let outbox = Outbox::new(write, 8 << 20);
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
