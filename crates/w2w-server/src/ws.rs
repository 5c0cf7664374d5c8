//! The socket plumbing every WebSocket actor shares (clients in `conn.rs`,
//! peer links in `peer.rs`): sending and closing, the `pump` loop that owns
//! a socket (queued writes in batches, reads handed to a [`Handler`],
//! pings), and how a connection ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_websockets::{CloseCode, Message, WebSocketStream};
use w2w_proto::frame::{ErrorFrame, Notice, RelayToClient};
use w2w_proto::{Address, ErrorCode};

use crate::router::{Outbox, OutboxRx};
use crate::shared::Shared;

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 64;

/// A WebSocket as the relay's actors use it: a stream of messages and a
/// sink for them.
///
/// `Lazy` (every connection the relay accepts) holds no WebSocket state
/// and no read buffer while the connection is idle: it waits for the
/// socket to become readable, builds the tokio-websockets stream (and its
/// 8 KiB read buffer) then, and drops it again once every byte read has
/// been handed out as whole frames and nothing is left to write. `Plain`
/// is a stream built elsewhere (peer links this relay dials, through the
/// client library); it is used as it is.
pub(crate) enum Ws<S> {
    Plain(WebSocketStream<S>),
    Lazy(Lazy<S>),
}

/// How a [`Lazy`] socket waits for readability without a read buffer.
pub(crate) type PollReady<S> = fn(&S, &mut Context<'_>) -> Poll<io::Result<()>>;

/// See [`Ws`]. The stream's state lives in [`Tracked`] (the socket, bytes
/// read before the upgrade completed, frame boundaries) while idle.
pub(crate) struct Lazy<S> {
    state: LazyState<S>,
    ready: PollReady<S>,
    max_payload: usize,
    /// Set once a close was sent or seen or the stream failed: the
    /// WebSocket's close state must then be kept, so it stays built.
    pinned: bool,
}

enum LazyState<S> {
    Idle(Tracked<S>),
    Live(Box<WebSocketStream<Tracked<S>>>),
    /// Only while switching.
    Gone,
}

impl<S> Ws<S> {
    /// A server-side WebSocket over `io` that builds its buffers only while
    /// there is data to read or write. `pre`: bytes already read past the
    /// upgrade request (read first).
    pub(crate) fn lazy(io: S, pre: Bytes, ready: PollReady<S>, max_payload: usize) -> Self {
        // An empty `Bytes` may still hold the HTTP layer's whole read buffer.
        let pre = if pre.is_empty() { Bytes::new() } else { pre };
        Ws::Lazy(Lazy {
            state: LazyState::Idle(Tracked {
                io,
                pre,
                frames: Boundaries::default(),
            }),
            ready,
            max_payload,
            pinned: false,
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    /// The socket under the WebSocket (for the linger after a close).
    pub(crate) fn get_mut(&mut self) -> &mut S {
        match self {
            Ws::Plain(ws) => ws.get_mut(),
            Ws::Lazy(l) => match &mut l.state {
                LazyState::Idle(t) => &mut t.io,
                LazyState::Live(ws) => &mut ws.get_mut().io,
                LazyState::Gone => unreachable!("a lazy socket is never left switching"),
            },
        }
    }

    /// Whether the WebSocket (and its read buffer) exists now; always true
    /// for `Plain`.
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        match self {
            Ws::Plain(_) => true,
            Ws::Lazy(l) => matches!(l.state, LazyState::Live(_)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lazy<S> {
    fn live(&mut self) -> &mut WebSocketStream<Tracked<S>> {
        if let LazyState::Idle(_) = self.state {
            let LazyState::Idle(t) = std::mem::replace(&mut self.state, LazyState::Gone) else {
                unreachable!()
            };
            let ws = tokio_websockets::ServerBuilder::new()
                .limits(tokio_websockets::Limits::default().max_payload_len(Some(self.max_payload)))
                .serve(t);
            self.state = LazyState::Live(Box::new(ws));
        }
        match &mut self.state {
            LazyState::Live(ws) => ws,
            _ => unreachable!("just built"),
        }
    }

    /// After a read came back pending: drop the WebSocket if it holds
    /// nothing (no partial frame or message read, nothing left to write).
    fn idle_if_empty(&mut self, cx: &mut Context<'_>) {
        let LazyState::Live(ws) = &mut self.state else {
            return;
        };
        if self.pinned || !ws.get_ref().is_empty() {
            return;
        }
        // An automatic pong may still be queued.
        if !matches!(Pin::new(&mut **ws).poll_flush(cx), Poll::Ready(Ok(()))) {
            return;
        }
        let LazyState::Live(ws) = std::mem::replace(&mut self.state, LazyState::Gone) else {
            unreachable!()
        };
        let mut t = ws.into_inner();
        t.frames = Boundaries::default();
        self.state = LazyState::Idle(t);
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, tokio_websockets::Error>>> {
        if let LazyState::Idle(t) = &self.state {
            if t.pre.is_empty() {
                if let Err(e) = ready!((self.ready)(&t.io, cx)) {
                    self.pinned = true;
                    return Poll::Ready(Some(Err(tokio_websockets::Error::Io(e))));
                }
            }
        }
        let r = Pin::new(self.live()).poll_next(cx);
        match &r {
            Poll::Pending => self.idle_if_empty(cx),
            Poll::Ready(Some(Ok(m))) if !m.is_close() => {}
            Poll::Ready(_) => self.pinned = true,
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for Ws<S> {
    type Item = Result<Message, tokio_websockets::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Ws::Plain(ws) => Pin::new(ws).poll_next(cx),
            Ws::Lazy(l) => l.poll_next(cx),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for Ws<S> {
    type Error = tokio_websockets::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.get_mut() {
            Ws::Plain(ws) => Pin::new(ws).poll_ready(cx),
            Ws::Lazy(l) => Pin::new(l.live()).poll_ready(cx),
        }
    }

    fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), Self::Error> {
        match self.get_mut() {
            Ws::Plain(ws) => Pin::new(ws).start_send(m),
            Ws::Lazy(l) => {
                if m.is_close() {
                    l.pinned = true;
                }
                Pin::new(l.live()).start_send(m)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.get_mut() {
            Ws::Plain(ws) => Pin::new(ws).poll_flush(cx),
            Ws::Lazy(l) => match &mut l.state {
                // Nothing is queued while idle.
                LazyState::Idle(_) => Poll::Ready(Ok(())),
                LazyState::Live(ws) => Pin::new(&mut **ws).poll_flush(cx),
                LazyState::Gone => unreachable!("a lazy socket is never left switching"),
            },
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.get_mut() {
            Ws::Plain(ws) => Pin::new(ws).poll_close(cx),
            Ws::Lazy(l) => {
                l.pinned = true;
                Pin::new(l.live()).poll_close(cx)
            }
        }
    }
}

/// The socket under a [`Lazy`] WebSocket: serves the bytes read before the
/// upgrade first, and follows frame boundaries in what it reads.
pub(crate) struct Tracked<S> {
    io: S,
    pre: Bytes,
    frames: Boundaries,
}

impl<S> Tracked<S> {
    /// Every byte read so far belongs to a whole frame, and no fragmented
    /// message is open: once the WebSocket layer has asked for more (read
    /// pending), it holds nothing.
    fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.frames.at_boundary()
    }
}

/// Where the bytes read so far stand in the frame sequence (RFC 6455 5.2
/// header lengths only; tokio-websockets decodes and checks the frames).
#[derive(Default)]
struct Boundaries {
    head: [u8; 14],
    /// Header bytes seen of the current frame (0: between frames).
    have: u8,
    /// Payload bytes of the current frame still to come.
    rest: u64,
    /// A data frame without FIN was seen and its message is not finished.
    fragmented: bool,
}

impl Boundaries {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.rest == 0 && !self.fragmented
    }

    fn header_len(&self) -> usize {
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if self.head[1] & 0x80 != 0 { 4 } else { 0 }
    }

    fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.rest > 0 {
                let n = (b.len() as u64).min(self.rest);
                self.rest -= n;
                b = &b[n as usize..];
                continue;
            }
            self.head[self.have as usize] = b[0];
            self.have += 1;
            b = &b[1..];
            if self.have < 2 || (self.have as usize) < self.header_len() {
                continue;
            }
            self.rest = match self.head[1] & 0x7f {
                126 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
                127 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or_default()),
                n => n as u64,
            };
            // Data frames (opcodes 0-2) open or close a fragmented message;
            // control frames (8-15) may come in between.
            if self.head[0] & 0x0f < 8 {
                self.fragmented = self.head[0] & 0x80 == 0;
            }
            self.have = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            if this.pre.is_empty() {
                this.pre = Bytes::new();
            }
        } else {
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        }
        this.frames.feed(&buf.filled()[start..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The socket of a connection the relay accepted: TCP, or TLS over TCP.
pub enum ServerIo {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerIo {
    /// Readable without reading (the TCP socket's readiness; TLS has
    /// nothing buffered when the WebSocket layer last found no data).
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ServerIo::Tcp(s) => s.poll_read_ready(cx),
            ServerIo::Tls(s) => s.get_ref().0.poll_read_ready(cx),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Tcp(s) => Pin::new(s).poll_write(cx, b),
            ServerIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Tcp(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

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
    /// A frame read at `now` (one clock read per frame, shared by the
    /// liveness timer and the handler's budgets).
    fn on_message(&mut self, m: Message, now: std::time::Instant);

    /// The end of a read burst: frames `on_message` kept back (to apply
    /// several under one core lock) are applied now, before anything else
    /// the connection does.
    fn flush(&mut self) {}
}

/// Frames taken from one read burst before [`Handler::flush`].
const READ_BURST: usize = 64;

/// The loop every registered connection (client or peer relay) runs: it
/// owns the socket, writes what was queued for it, reads and hands frames
/// to `handler`, and keeps liveness with pings. `write_timeout` bounds how
/// long a peer that stops reading can hold the writer.
pub(crate) async fn pump<S: AsyncRead + AsyncWrite + Unpin, H: Handler>(
    shared: &Shared,
    outbox: &Outbox,
    ws: &mut Ws<S>,
    rx: &mut OutboxRx,
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
                    // Boxed (as is the ping below): inline, a write's state
                    // would make every idle connection's task larger.
                    let write = Box::pin(write_batch(shared, outbox, ws, rx, first, write_timeout));
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
                    let now = last_rx.into_std();
                    match m {
                        None => return End::Gone,
                        Some(Err(e)) => return read_error(shared, e),
                        Some(Ok(m)) => handler.on_message(m, now),
                    }
                    // The frames already read (no waiting), then one flush;
                    // none after the connection was asked to close.
                    let mut n = 1;
                    while n < READ_BURST && !outbox.is_closing() {
                        let Some(m) = ws.next().now_or_never() else {
                            break;
                        };
                        n += 1;
                        match m {
                            None => {
                                handler.flush();
                                return End::Gone;
                            }
                            Some(Err(e)) => {
                                handler.flush();
                                return read_error(shared, e);
                            }
                            Some(Ok(m)) => handler.on_message(m, now),
                        }
                    }
                    handler.flush();
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
                            if Box::pin(ws.send(Message::ping(Bytes::new()))).await.is_err() {
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
    rx: &mut OutboxRx,
    first: Bytes,
    timeout: Duration,
) -> Result<(), End> {
    {
        let write = async {
            let mut next = Some(first);
            let (mut n, mut bytes) = (0, 0);
            while let Some(frame) = next.take() {
                bytes += frame.len();
                let fed = ws.feed(Message::binary(frame)).await;
                if fed.is_err() {
                    outbox.dequeued(bytes);
                    fed?;
                }
                n += 1;
                if n < WRITE_BATCH {
                    next = rx.try_recv();
                }
            }
            // Counted and taken off the queue's bound once per batch.
            shared.metrics.frames_out.fetch_add(n as u64, Relaxed);
            shared.metrics.bytes_out.fetch_add(bytes as u64, Relaxed);
            outbox.dequeued(bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::net::TcpListener;

    /// A lazy server WebSocket and the raw client end of its socket.
    async fn pair() -> (Ws<ServerIo>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let ws = Ws::lazy(
            ServerIo::Tcp(server),
            Bytes::new(),
            ServerIo::poll_read_ready,
            1 << 16,
        );
        (ws, client)
    }

    /// A masked client frame (mask 0: the payload goes as it is).
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut f = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    /// Polls once; true if a message was ready.
    async fn poll_once(ws: &mut Ws<ServerIo>) -> Poll<Option<Message>> {
        poll_fn(|cx| Poll::Ready(Pin::new(&mut *ws).poll_next(cx)))
            .await
            .map(|m| m.map(|r| r.unwrap()))
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_websocket_and_no_read_buffer() {
        let (mut ws, mut client) = pair().await;
        assert!(!ws.is_built(), "nothing built before any data");
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(!ws.is_built(), "waiting for data holds no buffer");

        // Two frames in one read: both come out, then it is idle again.
        let mut two = frame(0x82, b"one");
        two.extend(frame(0x82, b"two"));
        client.write_all(&two).await.unwrap();
        assert_eq!(
            &ws.next().await.unwrap().unwrap().into_payload()[..],
            b"one"
        );
        assert_eq!(
            &ws.next().await.unwrap().unwrap().into_payload()[..],
            b"two"
        );
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(!ws.is_built(), "read to the end: the buffer is gone");

        // Half a frame keeps it, the rest completes it.
        let f = frame(0x82, b"split");
        client.write_all(&f[..4]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(ws.is_built(), "a partial frame stays buffered");
        client.write_all(&f[4..]).await.unwrap();
        assert_eq!(
            &ws.next().await.unwrap().unwrap().into_payload()[..],
            b"split"
        );
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(!ws.is_built());

        // A fragmented message, a ping in between: kept until it is whole.
        client.write_all(&frame(0x02, b"ab")).await.unwrap();
        client.write_all(&frame(0x89, b"p")).await.unwrap();
        let ping = ws.next().await.unwrap().unwrap();
        assert!(ping.is_ping());
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(ws.is_built(), "a message in fragments stays buffered");
        client.write_all(&frame(0x80, b"cd")).await.unwrap();
        assert_eq!(
            &ws.next().await.unwrap().unwrap().into_payload()[..],
            b"abcd"
        );
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(!ws.is_built());
        // The automatic pong went out before the WebSocket was dropped.
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8a, 1, b'p']);

        // Writing while idle builds it; once flushed and read to the end it
        // is dropped again.
        ws.send(Message::binary(Bytes::from_static(b"out")))
            .await
            .unwrap();
        let mut out = [0u8; 5];
        client.read_exact(&mut out).await.unwrap();
        assert_eq!(out, [0x82, 3, b'o', b'u', b't']);
        assert!(poll_once(&mut ws).await.is_pending());
        assert!(!ws.is_built());

        // A close from the peer is answered and ends the stream.
        client.write_all(&frame(0x88, &[0x03, 0xe8])).await.unwrap();
        assert!(ws.next().await.unwrap().unwrap().is_close());
        assert!(ws.next().await.is_none());
    }

    #[tokio::test]
    async fn bytes_read_before_the_upgrade_are_read_first() {
        let (ws, mut client) = pair().await;
        let Ws::Lazy(l) = ws else { unreachable!() };
        let LazyState::Idle(t) = l.state else {
            unreachable!()
        };
        let mut ws = Ws::lazy(
            t.io,
            Bytes::from(frame(0x82, b"early")),
            ServerIo::poll_read_ready,
            1 << 16,
        );
        assert_eq!(
            &ws.next().await.unwrap().unwrap().into_payload()[..],
            b"early"
        );
        client.write_all(&frame(0x82, b"late")).await.unwrap();
        assert_eq!(
            &ws.next().await.unwrap().unwrap().into_payload()[..],
            b"late"
        );
    }

    #[test]
    fn frame_boundaries_follow_header_lengths() {
        let mut b = Boundaries::default();
        // 16-bit length, masked, 300 bytes, fed in pieces.
        let mut f = vec![0x82, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4];
        f.extend(std::iter::repeat_n(0u8, 300));
        for chunk in f.chunks(7) {
            assert!(!b.at_boundary() || chunk.as_ptr() == f.as_ptr());
            b.feed(chunk);
        }
        assert!(b.at_boundary());
        // 64-bit length, unmasked.
        let mut g = vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        g.extend(std::iter::repeat_n(0u8, 65536));
        b.feed(&g[..g.len() - 1]);
        assert!(!b.at_boundary());
        b.feed(&g[g.len() - 1..]);
        assert!(b.at_boundary());
        // An empty frame is whole at once; a text frame without FIN opens a
        // message that a continuation with FIN closes.
        b.feed(&[0x82, 0x80, 0, 0, 0, 0]);
        assert!(b.at_boundary());
        b.feed(&[0x01, 0x80, 0, 0, 0, 0]);
        assert!(!b.at_boundary());
        b.feed(&[0x8a, 0x80, 0, 0, 0, 0]);
        assert!(!b.at_boundary(), "a control frame does not end it");
        b.feed(&[0x80, 0x80, 0, 0, 0, 0]);
        assert!(b.at_boundary());
    }
}
