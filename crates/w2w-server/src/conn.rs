//! One actor per WebSocket connection.
//!
//! Phase 1, registration: send CHALLENGE, feed REGISTER and CONFIRM to the
//! pure [`RelayHandshake`], answer with COUNTERSIGN, then record the
//! registration durably and send REPLY_BACK. Any failure is an ERROR frame
//! and a close with `4000 + code`.
//!
//! Phase 2, session: one `select!` loop owns the socket. It writes what the
//! router queued for this connection, reads and handles frames (routing
//! never awaits another connection), and keeps liveness with WebSocket
//! pings. When it ends, the address is freed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_websockets::Message;
use w2w_core::GroupAsk;
use w2w_proto::frame::{
    ClientToRelay, ErrorFrame, Hosted, Msg, Receipt, RelayToClient, ReplyBack, Request, RequestOp,
    Response, ResponseBody, Role, Status,
};
use w2w_proto::group::{valid_name, GroupAction};
use w2w_proto::handshake::{HandshakeError, Registration, RelayHandshake, RelayPolicy};
use w2w_proto::{Address, Dest, ErrorCode};

use crate::federation::Input;
use crate::groups::{apply_for_client, Groups};
use crate::ratelimit::SenderBudget;
use crate::router::{reject, Outbox, OutboxRx};
use crate::shared::Shared;
use crate::store::Write;
use crate::unix_ms;
use crate::ws::{
    close_with, count_in, finish, finish_link, flush_close, pump, read_error, send_frame, End,
    Handler, Ws,
};

/// Largest page an ONLINE request can ask for.
pub const MAX_ONLINE_PAGE: u16 = 1000;

/// What the HTTP layer knows about the connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The upgrade request's Host header.
    pub host: Option<String>,
}

/// A registered session, between REPLY_BACK and its end: what an idle
/// connection holds. The rest of a connection's life (the handshake,
/// opening and closing a session, refusals, peer links: few) runs in boxed
/// futures that exist only while they run (see `server::tests`).
pub(crate) struct Live<S> {
    shared: Arc<Shared>,
    ws: Ws<S>,
    outbox: Arc<Outbox>,
    rx: OutboxRx,
    _permit: OwnedSemaphorePermit,
}

/// Admits and registers a connection; a client session to run, or `None`
/// when the connection has ended (refused, failed, or a peer link that
/// ran here).
pub(crate) async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut ws: Ws<S>,
    info: ConnInfo,
) -> Option<Box<Live<S>>> {
    let Ok(permit) = shared.conn_permits.clone().try_acquire_owned() else {
        if let Some(suppressed) = shared
            .oplog
            .allow("refused max_connections", std::time::Instant::now())
        {
            tracing::warn!(peer = %info.peer, suppressed, "max connections ({}) reached, refusing", shared.limits.max_connections);
        }
        close_with(
            &mut ws,
            &shared,
            ErrorCode::MaxConnections,
            "relay is at its connection limit; retry later or use another relay",
        )
        .await;
        return None;
    };
    shared.metrics.connections.fetch_add(1, Relaxed);
    shared.metrics.connections_total.fetch_add(1, Relaxed);
    let started = Instant::now();
    let reg = match register(&shared, &mut ws, &info).await {
        Ok(reg) => reg,
        Err(End::Gone) => {
            shared.metrics.connections.fetch_sub(1, Relaxed);
            return None;
        }
        Err(End::Flush) => {
            flush_close(&mut ws).await;
            shared.metrics.connections.fetch_sub(1, Relaxed);
            return None;
        }
        Err(End::Close(code, detail)) => {
            crate::oplog::registration_refused(&shared, info.peer.ip(), code, &detail);
            close_with(&mut ws, &shared, code, &detail).await;
            shared.metrics.connections.fetch_sub(1, Relaxed);
            return None;
        }
    };
    let opened = match reg.role {
        Role::Client | Role::Sender => open_session(&shared, &mut ws, info, reg, started).await,
        Role::Relay => {
            relay_link(&shared, ws, info, reg).await;
            shared.metrics.connections.fetch_sub(1, Relaxed);
            return None;
        }
    };
    let Some((outbox, rx)) = opened else {
        shared.metrics.connections.fetch_sub(1, Relaxed);
        return None;
    };
    // On the heap, once: the task's future then holds a pointer, not
    // copies of it.
    Some(Box::new(Live {
        shared,
        ws,
        outbox,
        rx,
        _permit: permit,
    }))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Live<S> {
    /// Runs the session to its end.
    pub(crate) async fn run(mut self: Box<Self>) {
        let this = &mut *self;
        let shared = &this.shared;
        let mut handler = Session {
            shared,
            outbox: &this.outbox,
            budget: shared
                .senders
                .get(&this.outbox.address.0, std::time::Instant::now()),
            refused: 0,
            pending: Vec::new(),
            pending_copies: 0,
        };
        let end = pump(
            shared,
            &this.outbox,
            &mut this.ws,
            &mut this.rx,
            &mut handler,
            (
                shared.limits.ping_timeout(),
                crate::ws::Liveness {
                    interval: shared.limits.ping_interval(),
                    timeout: shared.limits.ping_timeout(),
                },
            ),
        )
        .await;
        drop(handler);
        Box::pin(close_session(shared, &mut this.ws, &this.outbox, end)).await;
        shared.metrics.connections.fetch_sub(1, Relaxed);
    }
}

/// An incoming peer link, once its handshake is done.
async fn relay_link<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    mut ws: Ws<S>,
    info: ConnInfo,
    reg: Registration,
) {
    if !shared.fed.config.admits(&reg.address) {
        if let Some(suppressed) = shared
            .oplog
            .allow("refused unauthorized_peer", std::time::Instant::now())
        {
            tracing::warn!(relay = %reg.address, peer = %info.peer, suppressed, "peer link refused: relay {} is not on the --peer-allow list", reg.address);
        }
        close_with(
            &mut ws,
            shared,
            ErrorCode::UnauthorizedPeer,
            "this relay's key is not admitted for peering",
        )
        .await;
        return;
    }
    let reply = RelayToClient::ReplyBack(ReplyBack {
        address: reg.address,
        relay_time_ms: unix_ms(),
        relay_url: shared.advertised_url(info.host.as_deref()),
    });
    // REGISTER names our URL, not the dialler's: its own URL is
    // learned from its link state.
    let end = match send_frame(&mut ws, shared, reply.encode()).await {
        Ok(()) => crate::peer::run_link(shared, &mut ws, reg.address, String::new()).await,
        Err(_) => End::Gone,
    };
    finish_link(&mut ws, shared, end, &reg.address).await;
}

/// Phase 1: the sigA → sigB → sigC handshake.
async fn register<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    ws: &mut Ws<S>,
    info: &ConnInfo,
) -> Result<Registration, End> {
    let mut hs = RelayHandshake::new(shared.relay_key, rand::random());
    let policy = RelayPolicy {
        max_skew_ms: shared.limits.max_skew_ms,
        accept_relays: true,
    };
    let challenge = RelayToClient::Challenge(hs.challenge()).encode();
    send_frame(ws, shared, challenge)
        .await
        .map_err(|_| End::Gone)?;
    let deadline = tokio::time::sleep(shared.limits.auth_timeout());
    tokio::pin!(deadline);
    let fail = |e: HandshakeError| {
        if let HandshakeError::WrongUrl(signed) = &e {
            crate::oplog::wrong_url(shared, info.peer.ip(), signed, info.host.as_deref());
        }
        End::Close(e.code(), e.to_string())
    };
    loop {
        let msg = tokio::select! {
            _ = &mut deadline => return Err(End::Close(
                ErrorCode::AuthTimeout,
                format!("registration not completed within {} ms", shared.limits.auth_timeout_ms),
            )),
            _ = shared.shutdown.cancelled() => return Err(End::Close(ErrorCode::ShuttingDown, String::new())),
            m = ws.next() => m,
        };
        let msg = match msg {
            None => return Err(End::Gone),
            Some(Err(e)) => return Err(read_error(shared, e)),
            Some(Ok(m)) => m,
        };
        if msg.is_text() {
            return Err(End::Close(
                ErrorCode::TextFrame,
                "w2w frames are binary WebSocket messages".into(),
            ));
        }
        if !msg.is_binary() {
            continue; // ping/pong; close arrives as None
        }
        let bytes: Bytes = msg.into_payload().into();
        count_in(shared, &bytes);
        match ClientToRelay::decode(&bytes) {
            Ok(ClientToRelay::Register(r)) => {
                let now = unix_ms();
                let cs = {
                    let mut replay = shared.replay.lock().unwrap_or_else(|e| e.into_inner());
                    hs.on_register(
                        &shared.identity,
                        r,
                        now,
                        &policy,
                        |url| shared.url_ok(url, info.host.as_deref()),
                        &mut replay,
                    )
                }
                .map_err(fail)?;
                send_frame(ws, shared, RelayToClient::Countersign(cs).encode())
                    .await
                    .map_err(|_| End::Gone)?;
            }
            Ok(ClientToRelay::Confirm(c)) => return hs.on_confirm(c).map_err(fail),
            Ok(ClientToRelay::Msg(_) | ClientToRelay::Request(_) | ClientToRelay::Ack(_)) => {
                return Err(End::Close(
                    ErrorCode::NotRegistered,
                    "complete registration (REGISTER, CONFIRM) before sending".into(),
                ))
            }
            Err(e) => return Err(End::Close(e.code(), e.to_string())),
        }
    }
}

/// Phase 2, opening the registered session: records the registration, hands the session to the core and the router,
/// and sends REPLY_BACK; `None` if the session ended instead.
async fn open_session<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    ws: &mut Ws<S>,
    info: ConnInfo,
    reg: Registration,
    started: Instant,
) -> Option<(Arc<Outbox>, OutboxRx)> {
    let address = reg.address;
    // A send-only session (role 2) takes no deliveries (PROTOCOL 7.7).
    let receive = reg.role != Role::Sender;
    let now_ms = unix_ms();
    let published = reg.clone();
    if let Err(e) = shared
        .store
        .write(Write::Registered {
            reg: Box::new(reg),
            at_ms: now_ms,
        })
        .await
    {
        tracing::error!(error = %e, "recording registration");
        close_with(
            ws,
            shared,
            ErrorCode::Internal,
            "could not record registration; retry",
        )
        .await;
        return None;
    }
    let conn_id = shared.next_conn_id.fetch_add(1, Relaxed);
    let (outbox, rx) = Outbox::new(
        address,
        conn_id,
        shared.limits.send_queue_bytes,
        shared.metrics.clone(),
    );
    // The core takes the session before REPLY_BACK goes out (once the
    // client hears it is registered, messages to it must arrive): its
    // backlog and new messages wait in the outbox meanwhile. Older
    // sessions of the address stay; past `--max-sessions` this one is
    // refused.
    if let Err(code) = shared.fed.connect(&outbox, &published, receive) {
        tracing::info!(address = %address.short(), "refused: too many sessions");
        let detail = format!(
            "this address already has {} sessions here (the most this relay allows); close one, or register and ask for an exclusive session",
            shared.limits.max_sessions
        );
        close_with(ws, shared, code, &detail).await;
        return None;
    }
    shared.router.insert(outbox.clone(), receive);
    let reply = RelayToClient::ReplyBack(ReplyBack {
        address,
        relay_time_ms: now_ms,
        relay_url: shared.advertised_url(info.host.as_deref()),
    });
    if send_frame(ws, shared, reply.encode()).await.is_err() {
        shared.fed.disconnect(&outbox);
        shared.router.remove(&outbox);
        return None;
    }
    shared.metrics.registered.fetch_add(1, Relaxed);
    shared.metrics.registrations_total.fetch_add(1, Relaxed);
    shared
        .metrics
        .registration_seconds
        .observe(started.elapsed());
    tracing::info!(address = %address.short(), peer = %info.peer, send_only = !receive, "registered");
    Some((outbox, rx))
}

/// Ends a session the pump left.
async fn close_session<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    ws: &mut Ws<S>,
    outbox: &Arc<Outbox>,
    end: End,
) {
    let address = outbox.address;
    // The core writes what it handed over unacknowledged, and from now on
    // stores new messages for this address.
    shared.fed.disconnect(outbox);
    shared.router.remove(outbox);
    shared.metrics.registered.fetch_sub(1, Relaxed);
    // Give back the queue's share of the queued-bytes gauge.
    outbox.dequeued(outbox.queued_bytes());
    let _ = shared
        .store
        .write_later(Write::Seen {
            address,
            at_ms: unix_ms(),
        })
        .await;
    finish(ws, shared, end, &address).await;
}

/// A registered client's connection.
struct Session<'a> {
    shared: &'a Arc<Shared>,
    outbox: &'a Arc<Outbox>,
    /// This address's frame and fan-out budgets (shared by all its
    /// connections).
    budget: Arc<std::sync::Mutex<SenderBudget>>,
    /// Frames refused `rate_limited` in a row: a client that ignores
    /// [`REFUSED_IN_A_ROW`] refusals is closed instead of answered forever.
    refused: u32,
    /// MSGs and ACKs of this read burst, for the core in one go (no memory
    /// while idle: taken whole at each flush).
    pending: Vec<Input>,
    /// The copies the pending MSGs make (recipients; an a2n: everyone).
    pending_copies: usize,
}

/// Copies (deliveries) a read burst may put to the core under one taking
/// of the lock before it is handed over: a burst of a2b MSGs goes in
/// whole, while fan-out (a2g, groups, a2n) goes a few MSGs at a time, so
/// one connection's burst does not hold the core from everyone else for
/// long.
const BURST_COPIES: usize = 256;

/// Frames a connection may send past its rate limit, without one being
/// accepted in between, before it is closed with `rate_limited` (4020): a
/// client that backs off never gets near it; one that ignores every refusal
/// would otherwise cost a decode and a receipt per frame, forever.
const REFUSED_IN_A_ROW: u32 = 10_000;

impl Handler for Session<'_> {
    fn flush(&mut self) {
        self.pending_copies = 0;
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            self.shared.fed.handle_inputs(self.outbox, batch);
        }
    }

    fn on_message(&mut self, m: Message, now: std::time::Instant) {
        if m.is_text() {
            self.error(
                ErrorCode::TextFrame,
                "w2w frames are binary WebSocket messages",
            );
            return;
        }
        if !m.is_binary() {
            return; // ping/pong; tokio-websockets answers pings itself
        }
        let bytes: Bytes = m.into_payload().into();
        count_in(self.shared, &bytes);
        let decoded = ClientToRelay::decode(&bytes);
        // ACKs answer what the relay sent; they are not rate limited (each
        // costs a set lookup, and their number is bounded by our sends).
        let allowed = matches!(decoded, Ok(ClientToRelay::Ack(_))) || {
            let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            b.frames.take(now)
        };
        if allowed {
            self.refused = 0;
        } else {
            self.refused += 1;
            if self.refused > REFUSED_IN_A_ROW {
                self.outbox.close(ErrorCode::RateLimited);
                return;
            }
        }
        match decoded {
            Ok(ClientToRelay::Msg(msg)) => {
                if let Some(receipt) = self.on_msg(&bytes, msg, allowed, now) {
                    self.shared.metrics.receipt(receipt.status);
                    self.enqueue(RelayToClient::Receipt(receipt).encode());
                }
            }
            Ok(ClientToRelay::Request(req)) => {
                // Answered after what the core makes of earlier frames.
                self.flush();
                let resp = if allowed {
                    self.on_request(req)
                } else {
                    self.shared.metrics.error(ErrorCode::RateLimited);
                    Some(Response {
                        req_id: req.req_id,
                        op: req.op.code(),
                        result: Err(ErrorCode::RateLimited.as_u16()),
                    })
                };
                if let Some(resp) = resp {
                    self.enqueue(RelayToClient::Response(resp).encode());
                }
            }
            Ok(ClientToRelay::Ack(ids)) => {
                // Each id may settle a flight and make a receipt.
                self.pending_copies += ids.len();
                self.pending.push(Input::Ack(ids));
                if self.pending_copies >= BURST_COPIES {
                    self.flush();
                }
            }
            Ok(ClientToRelay::Register(_) | ClientToRelay::Confirm(_)) => {
                self.error(ErrorCode::UnexpectedFrame, "already registered");
            }
            Err(e) => self.error(e.code(), &e.to_string()),
        }
    }
}

impl Session<'_> {
    /// Checks a MSG against the sender's budgets and hands it to the core;
    /// a receipt if it is refused here.
    fn on_msg(
        &mut self,
        frame: &Bytes,
        msg: Msg,
        allowed: bool,
        now: std::time::Instant,
    ) -> Option<Receipt> {
        let receipt = Receipt {
            id: msg.id,
            status: Status::Delivered,
            reason: 0,
            delivered: 0,
            entries: Vec::new(),
        };
        let metrics = &self.shared.metrics;
        if !allowed {
            return Some(reject(receipt, ErrorCode::RateLimited, metrics));
        }
        if msg.from != self.outbox.address {
            return Some(reject(receipt, ErrorCode::SpoofedSender, metrics));
        }
        metrics.message(msg.dest.route());
        // A group of another relay (`None`) is found by the core, which
        // asks that relay for its members (PROTOCOL 12.14).
        let group = match &msg.dest {
            Dest::Group(name) if self.shared.groups.hosts(name) => {
                Some(self.shared.groups.recipients(name, &self.outbox.address))
            }
            _ => None,
        };
        // Charged by what it costs to deliver: one copy per recipient.
        let copies = match &msg.dest {
            Dest::A2a | Dest::A2b(_) => 1,
            Dest::A2g(list) => list.len().min(self.shared.limits.max_group),
            Dest::Group(_) => group.as_ref().map_or(1, |g| g.as_ref().map_or(1, Vec::len)),
            Dest::A2n(_) => self.shared.router.len() + self.shared.fed.peer_count(),
        };
        let charged = {
            let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            let cost = (frame.len() * copies.max(1)) as u64;
            b.bytes.charge(cost, now)
        };
        if !charged {
            return Some(reject(receipt, ErrorCode::RateLimited, metrics));
        }
        self.pending.push(Input::Msg {
            frame: frame.clone(),
            msg,
            group,
        });
        self.pending_copies += copies.max(1);
        if self.pending_copies >= BURST_COPIES {
            self.flush();
        }
        None
    }

    fn failed(&self, req_id: u32, op: u8, code: ErrorCode) -> Option<Response> {
        self.shared.metrics.error(code);
        Some(Response {
            req_id,
            op,
            result: Err(code.as_u16()),
        })
    }

    /// Answers a c2s request; `None` when the answer comes later (group
    /// changes are answered once durable).
    fn on_request(&self, req: Request) -> Option<Response> {
        self.shared.metrics.requests_total.fetch_add(1, Relaxed);
        let op = req.op.code();
        let body = match req.op {
            RequestOp::Online { offset, limit } => {
                let (total, addresses) = self
                    .shared
                    .router
                    .online(offset, limit.min(MAX_ONLINE_PAGE));
                ResponseBody::Online { total, addresses }
            }
            RequestOp::Lookup(addr) => match self.lookup(req.req_id, &addr) {
                Ok(Some(found)) => ResponseBody::Lookup(found),
                // Answered when the relays holding its records reply.
                Ok(None) => return None,
                Err(code) => return self.failed(req.req_id, op, code),
            },
            RequestOp::Presence(on) => {
                self.outbox.presence.store(on, Relaxed);
                ResponseBody::Presence
            }
            RequestOp::Exclusive => {
                let closed = self.shared.fed.exclusive(self.outbox);
                if closed > 0 {
                    tracing::info!(address = %self.outbox.address.short(), closed, "exclusive session: older sessions closed");
                }
                ResponseBody::Exclusive { closed }
            }
            // Membership is visible to members only.
            RequestOp::GroupInfo(name) if self.shared.groups.hosts(&name) => {
                match self.shared.groups.info_for(&name, &self.outbox.address) {
                    Ok(g) => ResponseBody::Group(g),
                    Err(code) => return self.failed(req.req_id, op, code),
                }
            }
            RequestOp::GroupInfo(name) if !valid_name(&name) => {
                return self.failed(req.req_id, op, ErrorCode::UnknownGroup)
            }
            // A group of another relay: asked there (PROTOCOL 12.14).
            RequestOp::GroupInfo(name) => {
                self.shared
                    .fed
                    .group_request(self.outbox, req.req_id, &name, GroupAsk::Info);
                return None;
            }
            RequestOp::Group(g) => {
                if let Err(code) = Groups::check_signed(&g, &self.outbox.address) {
                    return self.failed(req.req_id, op, code);
                }
                let name = g.name.clone();
                let fed = &self.shared.fed;
                match g.action {
                    // Answered once the change is durable.
                    _ if self.shared.groups.hosts(&name) => {
                        apply_for_client(self.shared, self.outbox.clone(), req.req_id, g)
                    }
                    // A name another relay hosts is taken.
                    GroupAction::Create => {
                        fed.group_request(self.outbox, req.req_id, &name, GroupAsk::Create(g))
                    }
                    _ => fed.group_request(self.outbox, req.req_id, &name, GroupAsk::Op(g)),
                }
                return None;
            }
        };
        Some(Response {
            req_id: req.req_id,
            op,
            result: Ok(body),
        })
    }

    fn lookup(&self, req_id: u32, addr: &Address) -> Result<Option<Option<Hosted>>, ErrorCode> {
        match self.shared.router.receiving(addr) {
            true => Ok(Some(Some(Hosted {
                relay_key: self.shared.relay_key,
                relay_url: self.shared.advertised_url(None),
            }))),
            false => self.shared.fed.lookup(self.outbox, req_id, addr),
        }
    }

    fn error(&mut self, code: ErrorCode, detail: &str) {
        self.shared.metrics.error(code);
        self.enqueue(RelayToClient::Error(ErrorFrame::new(code, detail)).encode());
    }

    /// Queues a frame for this connection, after what the core makes of
    /// the frames before it. If our own queue is full the outbox has
    /// already asked this loop to close (slow consumer).
    fn enqueue(&mut self, frame: Bytes) {
        self.flush();
        let _ = self.outbox.try_enqueue(frame);
    }
}
