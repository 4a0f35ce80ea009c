//! The client listener.
//!
//! Each connection has a reader loop and a writer task. The reader reads one
//! frame at a time and hands it to the service, which never waits: reads go
//! to the reader threads and writes to the engine, whose threads queue each
//! answer when it is ready (a write's once it is durable and visible). So
//! many requests are in flight per connection (and group-commit together)
//! and answers go out in any order. The writer drains every answer queued so
//! far into one `write`.
//!
//! While the reader works through frames it already has, answers are held
//! back (corked, see [`Outbox`]) and handed to the writer together when the
//! reader must wait for the socket again: the pipelined `get`s of one read
//! are answered in one `write`, as a single-threaded server would, instead
//! of waking the writer for the first and sending the rest a few at a time.
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

use std::sync::atomic::Ordering;
use std::sync::Arc;

use quiver_ring::wire::{self, ErrorKind, Op, Request, Response, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
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
    let (responses, queue) = mpsc::unbounded_channel::<Response>();
    let writer = tokio::spawn(write_responses(writer, queue, service.limits().frame_bytes_max));
    let outbox = Outbox::new(responses);
    let in_flight = Arc::new(Semaphore::new(service.limits().requests_in_flight_max));
    let frame_max = service.limits().frame_bytes_max;
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
        let (answering, outbox, id) = (service.clone(), outbox.clone(), request.id);
        let timing =
            Timing { hlc_seen: request.hlc_seen, deadline: request.deadline, consistency: request.consistency };
        service.start(timing, request.op, move |result| {
            outbox.send(Response { id, hlc: answering.hlc(), result });
            drop(permit);
        });
    }
    // The writer ends once every in-flight request has answered (each
    // holds a clone of the outbox, and with it the channel's sender).
    outbox.uncork();
    drop(outbox);
    let _ = writer.await;
}

/// Where a connection's answers go on their way to its writer task.
///
/// Corked, it holds them; [`Outbox::uncork`] hands what it holds to the
/// writer and lets later answers through until the reader corks it again
/// (when it next has frames in hand). An answer is never held past the
/// reader's next wait: the reader uncorks before every wait.
#[derive(Clone)]
struct Outbox(Arc<OutboxInner>);

struct OutboxInner {
    responses: mpsc::UnboundedSender<Response>,
    /// `Some` while corked: the answers held back, in the order they came.
    held: std::sync::Mutex<Option<Vec<Response>>>,
    /// Whether `held` is `Some`; only the reader task changes it, so it
    /// reads it without the lock to skip taking it twice per frame.
    corked: std::sync::atomic::AtomicBool,
}

impl Outbox {
    fn new(responses: mpsc::UnboundedSender<Response>) -> Outbox {
        Outbox(Arc::new(OutboxInner {
            responses,
            held: std::sync::Mutex::new(None),
            corked: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Holds `response` while corked, else hands it to the writer.
    fn send(&self, response: Response) {
        let mut held = crate::lock(&self.0.held);
        match held.as_mut() {
            Some(held) => held.push(response),
            None => {
                drop(held);
                // Fails only once the writer has gone (the client left).
                let _ = self.0.responses.send(response);
            }
        }
    }

    /// Hands every held answer to the writer; later answers go straight
    /// through until [`Outbox::cork`].
    fn uncork(&self) {
        if !self.0.corked.swap(false, Ordering::Relaxed) {
            return;
        }
        let held = crate::lock(&self.0.held).take();
        for response in held.into_iter().flatten() {
            let _ = self.0.responses.send(response);
        }
    }

    /// Holds answers from now on (the reader has frames in hand).
    fn cork(&self) {
        if !self.0.corked.swap(true, Ordering::Relaxed) {
            *crate::lock(&self.0.held) = Some(Vec::new());
        }
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

async fn write_responses(mut writer: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Response>, frame_max: usize) {
    let mut buf = Vec::new();
    while let Some(response) = queue.recv().await {
        buf.clear();
        encode_response(&mut buf, &response, frame_max);
        while let Ok(more) = queue.try_recv() {
            encode_response(&mut buf, &more, frame_max);
        }
        if writer.write_all(&buf).await.is_err() {
            // The client went away; drain so the handlers are not blocked.
            while queue.recv().await.is_some() {}
            return;
        }
    }
    let _ = writer.shutdown().await;
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

    #[test]
    fn a_corked_outbox_holds_answers_until_uncorked_then_lets_them_through() {
        let (sender, mut queue) = mpsc::unbounded_channel();
        let outbox = Outbox::new(sender);
        let answer = |id| Response { id, hlc: Hlc(1), result: Ok(Reply::Done) };
        // Not corked at first: straight through.
        outbox.send(answer(1));
        assert_eq!(queue.try_recv().map(|r| r.id), Ok(1));
        // Corked: held, from this task or another thread.
        outbox.cork();
        outbox.send(answer(2));
        let other = outbox.clone();
        std::thread::spawn(move || other.send(answer(3))).join().unwrap();
        assert!(queue.try_recv().is_err(), "a corked outbox let an answer through");
        // Corking twice keeps what is held.
        outbox.cork();
        outbox.uncork();
        assert_eq!(queue.try_recv().map(|r| r.id), Ok(2));
        assert_eq!(queue.try_recv().map(|r| r.id), Ok(3));
        outbox.send(answer(4));
        assert_eq!(queue.try_recv().map(|r| r.id), Ok(4));
        // The writer's channel closes once the last outbox is gone.
        drop(outbox);
        assert!(matches!(queue.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
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
