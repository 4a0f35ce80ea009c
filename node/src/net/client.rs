//! The client listener.
//!
//! Each connection has a reader loop and a writer task. The reader reads one
//! frame at a time and hands it to the service, which answers reads at once
//! and passes writes to the engine without waiting for them: the engine's
//! threads queue each write's answer when it is durable and visible. So many
//! requests are in flight per connection (and group-commit together) and
//! answers go out in any order. The writer drains every answer queued so far
//! into one `write`.
//!
//! Bad input is answered, never fatal to the node: a frame longer than the
//! limit is refused before any of it is buffered, a body that does not decode
//! gets a `Malformed` error with its id when the id can be read; in both
//! cases the connection is then closed.

use std::sync::Arc;

use quiver_ring::wire::{self, ErrorKind, Request, Response, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::service::Service;

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
    let writer = tokio::spawn(write_responses(writer, queue));
    let in_flight = Arc::new(Semaphore::new(service.limits().requests_in_flight_max));
    let frame_max = service.limits().frame_bytes_max;
    loop {
        let mut header = [0u8; wire::LEN_BYTES];
        tokio::select! {
            read = reader.read_exact(&mut header) => if read.is_err() { break },
            _ = stop.wait_for(|&stop| stop) => break,
        }
        let len = wire::frame_len(header);
        if len > frame_max {
            let error = ServerError::new(
                ErrorKind::FrameTooLarge,
                format!("frame of {len} bytes exceeds the limit of {frame_max} bytes"),
            );
            let _ = responses.send(Response { id: 0, hlc: service.hlc(), result: Err(error) });
            break;
        }
        let mut body = vec![0u8; len];
        // Also raced against shutdown: a client that sends half a frame and
        // stalls must not keep the node from stopping.
        tokio::select! {
            read = reader.read_exact(&mut body) => if read.is_err() { break },
            _ = stop.wait_for(|&stop| stop) => break,
        }
        let request: Request = match postcard::from_bytes(&body) {
            Ok(request) => request,
            Err(e) => {
                let id = wire::peek_id(&body).unwrap_or(0);
                let error = ServerError::new(ErrorKind::Malformed, format!("request does not decode: {e}"));
                let _ = responses.send(Response { id, hlc: service.hlc(), result: Err(error) });
                break;
            }
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        // Reads are answered right here; a write's answer is queued by the
        // engine once it is durable and visible, with no task in between.
        let (answering, responses, id) = (service.clone(), responses.clone(), request.id);
        service.start(request.hlc_seen, request.op, move |result| {
            let _ = responses.send(Response { id, hlc: answering.hlc(), result });
            drop(permit);
        });
    }
    // The writer ends once every in-flight request has answered.
    drop(responses);
    let _ = writer.await;
}

async fn write_responses(mut writer: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Response>) {
    let mut buf = Vec::new();
    while let Some(response) = queue.recv().await {
        buf.clear();
        wire::encode_frame(&mut buf, &response);
        while let Ok(more) = queue.try_recv() {
            wire::encode_frame(&mut buf, &more);
        }
        if writer.write_all(&buf).await.is_err() {
            // The client went away; drain so the handlers are not blocked.
            while queue.recv().await.is_some() {}
            return;
        }
    }
    let _ = writer.shutdown().await;
}
