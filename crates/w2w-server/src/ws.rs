//! The socket plumbing every WebSocket actor shares (clients in `conn.rs`,
//! peer links in `peer.rs`): sending and closing, the `pump` loop that owns
//! a socket (queued writes in batches, reads handed to a [`Handler`],
//! pings), and how a connection ends.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_websockets::{CloseCode, Message, WebSocketStream};
use w2w_proto::frame::{ErrorFrame, Notice, RelayToClient};
use w2w_proto::{Address, ErrorCode};

use crate::router::Outbox;
use crate::shared::Shared;

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 64;

pub(crate) type Ws<S> = WebSocketStream<S>;

/// Why a connection ends.
pub(crate) enum End {
    /// The peer closed or the socket failed; nothing more to send.
    Gone,
    /// The WebSocket layer queued a close (1009, frame too large); flush it.
    Flush,
    /// We close with this code (after an ERROR frame or notice).
    Close(ErrorCode, String),
}

pub(crate) async fn send_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    shared: &Shared,
    frame: Bytes,
) -> Result<(), tokio_websockets::Error> {
    shared.metrics.frames_out.fetch_add(1, Relaxed);
    shared
        .metrics
        .bytes_out
        .fetch_add(frame.len() as u64, Relaxed);
    ws.send(Message::binary(frame)).await
}

/// Sends ERROR (unless the code has its own notice), closes with
/// `4000 + code`, and waits briefly for the peer's close.
pub(crate) async fn close_with<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    shared: &Shared,
    code: ErrorCode,
    detail: &str,
) {
    close_as(ws, shared, code, detail, true).await
}

/// [`close_with`]; `client_frame` false for an established peer link,
/// which speaks s2s frames only: the close code alone says why.
async fn close_as<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    shared: &Shared,
    code: ErrorCode,
    detail: &str,
    client_frame: bool,
) {
    shared.metrics.error(code);
    let notice = match code {
        ErrorCode::Replaced => Some(Notice::Replaced),
        ErrorCode::ShuttingDown => Some(Notice::ShuttingDown),
        _ => None,
    };
    let frame = match notice {
        Some(n) => RelayToClient::Notice(n),
        None => RelayToClient::Error(ErrorFrame::new(code, detail)),
    };
    let graceful = async {
        if client_frame {
            send_frame(ws, shared, frame.encode()).await?;
        }
        let close_code =
            CloseCode::try_from(code.close_code()).unwrap_or(CloseCode::POLICY_VIOLATION);
        ws.send(Message::close(Some(close_code), code.as_str()))
            .await?;
        while ws.next().await.is_some() {}
        Ok::<_, tokio_websockets::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful).await;
}

/// Sends whatever close the WebSocket layer queued and waits briefly for
/// the peer's answer.
pub(crate) async fn flush_close<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // tokio-websockets queues 1009 for one oversized frame and 1002/1007
        // for protocol violations, but not for an oversized *fragmented*
        // message: send 1009 ourselves (harmlessly refused as AlreadyClosed
        // when a close is already queued).
        let _ = ws
            .send(Message::close(
                Some(CloseCode::MESSAGE_TOO_BIG),
                "message too big",
            ))
            .await;
        let _ = ws.flush().await;
        while ws.next().await.is_some() {}
        // Linger: half-close and drain, so unread input does not make the
        // kernel reset the connection and destroy the close frame.
        let io = ws.get_mut();
        let _ = io.shutdown().await;
        // On the heap, and only here: an array held across these awaits
        // would be part of every connection's task (16 KiB per idle
        // connection, found with heaptrack).
        let mut sink = vec![0u8; 4096];
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

pub(crate) fn read_error(shared: &Shared, e: tokio_websockets::Error) -> End {
    if let tokio_websockets::Error::PayloadTooLong { len, max_len } = e {
        // tokio-websockets has already queued a 1009 close.
        shared.metrics.error(ErrorCode::FrameTooLarge);
        tracing::debug!(len, max_len, "frame too large");
        return End::Flush;
    }
    if let tokio_websockets::Error::Protocol(p) = &e {
        // The matching close (1002/1007) is queued: send it.
        tracing::debug!(error = %p, "WebSocket protocol violation");
        return End::Flush;
    }
    End::Gone
}

pub(crate) fn count_in(shared: &Shared, bytes: &Bytes) {
    shared.metrics.frames_in.fetch_add(1, Relaxed);
    shared
        .metrics
        .bytes_in
        .fetch_add(bytes.len() as u64, Relaxed);
}

pub(crate) async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    shared: &Shared,
    end: End,
    who: &Address,
) {
    finish_as(ws, shared, end, who, true).await
}

/// Ends an established peer link: no client ERROR or NOTICE frame.
pub(crate) async fn finish_link<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    shared: &Shared,
    end: End,
    who: &Address,
) {
    finish_as(ws, shared, end, who, false).await
}

async fn finish_as<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    shared: &Shared,
    end: End,
    who: &Address,
    client: bool,
) {
    match end {
        End::Gone => tracing::info!(address = %who.short(), "disconnected"),
        End::Flush => {
            tracing::info!(address = %who.short(), "frame too large or WebSocket protocol violation, closing");
            flush_close(ws).await;
        }
        End::Close(code, detail) => {
            tracing::info!(address = %who.short(), %code, "closing");
            close_as(ws, shared, code, &detail, client).await;
        }
    }
}

/// What a connection does with each received WebSocket message.
/// When a quiet connection is pinged, and how long it has to answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    pub interval: Duration,
    pub timeout: Duration,
}

pub(crate) trait Handler {
    fn on_message(&mut self, m: Message);
}

/// The loop every registered connection (client or peer relay) runs: it
/// owns the socket, writes what was queued for it, reads and hands frames
/// to `handler`, and keeps liveness with pings. `write_timeout` bounds how
/// long a peer that stops reading can hold the writer.
pub(crate) async fn pump<S: AsyncRead + AsyncWrite + Unpin, H: Handler>(
    shared: &Shared,
    outbox: &Outbox,
    ws: &mut Ws<S>,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    handler: &mut H,
    (write_timeout, live): (Duration, Liveness),
) -> End {
    {
        let mut last_rx = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        // The timer is reset only when it fires (to the real deadline),
        // not on every received frame.
        let timer = tokio::time::sleep(live.interval);
        tokio::pin!(timer);
        // Made once, not per frame: each would register (and drop) a waiter.
        let closed = outbox.closed();
        tokio::pin!(closed);
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                // A close request (replaced, slow consumer) beats everything.
                code = &mut closed => {
                    return End::Close(code, String::new());
                }
                _ = &mut shutdown => {
                    return End::Close(ErrorCode::ShuttingDown, String::new());
                }
                // Writes before reads: drain what we owe before taking more.
                Some(first) = rx.recv() => {
                    // A close request (e.g. slow consumer) must not wait for
                    // a write the peer is not reading.
                    let write = write_batch(shared, outbox, ws, rx, first, write_timeout);
                    tokio::select! {
                        biased;
                        code = &mut closed => return End::Close(code, String::new()),
                        r = write => if let Err(end) = r {
                            return end;
                        },
                    }
                }
                m = ws.next() => {
                    last_rx = Instant::now();
                    ping_sent = None;
                    match m {
                        None => return End::Gone,
                        Some(Err(e)) => return read_error(shared, e),
                        Some(Ok(m)) => handler.on_message(m),
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    match ping_sent {
                        Some(t) if now >= t + live.timeout => {
                            return End::Close(
                                ErrorCode::PingTimeout,
                                format!("no pong within {} ms", live.timeout.as_millis()),
                            );
                        }
                        Some(t) => timer.as_mut().reset(t + live.timeout),
                        None if now >= last_rx + live.interval => {
                            if ws.send(Message::ping(Bytes::new())).await.is_err() {
                                return End::Gone;
                            }
                            ping_sent = Some(now);
                            timer.as_mut().reset(now + live.timeout);
                        }
                        None => timer.as_mut().reset(last_rx + live.interval),
                    }
                }
            }
        }
    }
}

async fn write_batch<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    outbox: &Outbox,
    ws: &mut Ws<S>,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    first: Bytes,
    timeout: Duration,
) -> Result<(), End> {
    {
        let write = async {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(frame) = next.take() {
                let len = frame.len();
                shared.metrics.frames_out.fetch_add(1, Relaxed);
                shared.metrics.bytes_out.fetch_add(len as u64, Relaxed);
                ws.feed(Message::binary(frame)).await?;
                outbox.dequeued(len);
                n += 1;
                if n < WRITE_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            ws.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(
                ErrorCode::SlowConsumer,
                "socket write timed out".into(),
            )),
        }
    }
}
