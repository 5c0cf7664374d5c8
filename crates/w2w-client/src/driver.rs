//! The driver task: owns the socket, matches receipts and responses to
//! waiters, acknowledges and deduplicates received messages, reconnects.

use std::sync::Arc;
use std::time::Duration;

use crate::error::ClientError;
use crate::handle::{Cmd, Event, Received, Security};
use crate::handshake::register_session;
use crate::transport::{connect_raw, ConnectOptions, RelaySocket};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_websockets::Message;
use w2w_proto::frame::{ClientToRelay, Msg, MsgId, Receipt, RelayToClient, ResponseBody};
use w2w_proto::seal::{self, SealError};
use w2w_proto::{Address, ErrorCode, Identity};

/// The driver: owns the socket, matches receipts and responses to waiters.
/// Opens or verifies a received MSG for the application.
pub(crate) fn open_msg(me: &Identity, m: Msg) -> Event {
    let result = match m.flags {
        seal::FLAG_SEALED => {
            seal::open(me, m.id, &m.from, &m.payload).map(|b| (Security::Sealed, Bytes::from(b)))
        }
        seal::FLAG_SIGNED => seal::verify(&m.id, &m.from, &m.payload)
            .map(|b| (Security::Signed, m.payload.slice_ref(b))),
        seal::FLAG_PLAIN => Ok((Security::Plain, m.payload.clone())),
        _ => Err(SealError::Malformed),
    };
    match result {
        Ok((security, body)) => Event::Msg(Received {
            id: m.id,
            from: m.from,
            dest: m.dest,
            security,
            body,
        }),
        Err(reason) => Event::Rejected {
            id: m.id,
            from: m.from,
            reason,
        },
    }
}

/// aHash with per-process random keys: the ids and senders in these maps
/// come from the network, and SipHash cost a tenth of the receive path.
type Hasher = ahash::RandomState;
type HashMap<K, V> = std::collections::HashMap<K, V, Hasher>;
type HashSet<K> = std::collections::HashSet<K, Hasher>;

/// Remembers at least the last `cap` (id, sender) pairs (at most twice
/// that), to drop redeliveries: two generations, the older one forgotten
/// whole when the newer is full, so no entry is removed one by one.
pub(crate) struct Dedupe {
    cap: usize,
    current: HashSet<(MsgId, Address)>,
    previous: HashSet<(MsgId, Address)>,
}

impl Dedupe {
    pub(crate) fn new(cap: usize) -> Self {
        Dedupe {
            cap: cap.max(1),
            current: HashSet::default(),
            previous: HashSet::default(),
        }
    }

    fn seen(&self, key: &(MsgId, Address)) -> bool {
        self.current.contains(key) || self.previous.contains(key)
    }

    /// `true` the first time a (id, sender) pair is seen.
    pub(crate) fn first(&mut self, key: (MsgId, Address)) -> bool {
        if self.seen(&key) {
            return false;
        }
        if self.current.len() >= self.cap {
            // (Both tables keep their memory.)
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        self.current.insert(key);
        true
    }
}

/// Message ids remembered for deduplication.
pub const DEDUPE_WINDOW: usize = 16_384;

/// Most frames written before one flush.
const SEND_BATCH: usize = 64;

/// Most MSG ids acknowledged in one ACK frame.
pub(crate) const MAX_ACK_BATCH: usize = 256;

/// How one connection ended.
pub(crate) enum SessionEnd {
    /// `close()` was called or the handle dropped: stop for good.
    Stop(String),
    /// The relay refused us in a way reconnecting cannot fix (replaced by a
    /// session of ours that asked to be the only one, or registration
    /// refused).
    Fatal(String),
    /// The connection was lost: reconnect if allowed.
    Lost(String),
    /// The relay closed with 1009 (message too big): its limit is lower
    /// than we thought. Drop the too-large messages, then reconnect.
    TooBig,
}

/// Owns the socket; survives reconnects. Messages without a receipt are
/// kept (in send order) and sent again, with the same id, after a
/// reconnect; the relay stores each id once and the recipient drops
/// duplicates, so the application sees each message once.
pub(crate) struct Driver {
    identity: Identity,
    opts: ConnectOptions,
    frame_limit: Arc<std::sync::atomic::AtomicUsize>,
    cmd_rx: mpsc::Receiver<Cmd>,
    events_tx: mpsc::Sender<Event>,
    /// Per message awaiting its receipt: its place in `unreceipted` and
    /// its waiter (one map, one insert and one removal per message).
    receipts: HashMap<MsgId, (u64, oneshot::Sender<Receipt>)>,
    unreceipted: std::collections::BTreeMap<u64, (MsgId, Bytes)>,
    next_seq: u64,
    requests: HashMap<u32, oneshot::Sender<Result<ResponseBody, u16>>>,
    dedupe: Dedupe,
}

impl Driver {
    fn remember(&mut self, id: MsgId, frame: Bytes, tx: oneshot::Sender<Receipt>) {
        self.receipts.insert(id, (self.next_seq, tx));
        self.unreceipted.insert(self.next_seq, (id, frame));
        self.next_seq += 1;
    }

    async fn session(&mut self, ws: &mut RelaySocket) -> SessionEnd {
        loop {
            tokio::select! {
                cmd = self.cmd_rx.recv() => {
                    // What the application queued meanwhile goes in the
                    // same write: one flush (one system call) per burst,
                    // not per message.
                    let mut cmd = cmd;
                    let mut fed = 0;
                    loop {
                        let frame = match cmd {
                            Some(Cmd::Send(frame, id, tx)) => {
                                self.remember(id, frame.clone(), tx);
                                frame
                            }
                            Some(Cmd::Request(req, tx)) => {
                                self.requests.insert(req.req_id, tx);
                                ClientToRelay::Request(req).encode()
                            }
                            Some(Cmd::Close) => {
                                let _ = ws.close().await;
                                return SessionEnd::Stop("closed by client".into());
                            }
                            None => {
                                let _ = ws.close().await;
                                return SessionEnd::Stop("client handle dropped".into());
                            }
                        };
                        if let Err(e) = ws.feed(Message::binary(frame)).await {
                            return SessionEnd::Lost(format!("send failed: {e}"));
                        }
                        fed += 1;
                        if fed >= SEND_BATCH {
                            break;
                        }
                        match self.cmd_rx.try_recv() {
                            Ok(next) => cmd = Some(next),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = ws.flush().await {
                        return SessionEnd::Lost(format!("send failed: {e}"));
                    }
                }
                m = ws.next() => {
                    let mut acks = Vec::new();
                    let mut next = Some(m);
                    // Take every frame that is already here before
                    // acknowledging: one ACK frame covers a burst.
                    while let Some(m) = next.take() {
                        let m = match m {
                            None => return SessionEnd::Lost("connection closed".into()),
                            Some(Err(e)) => return SessionEnd::Lost(format!("connection failed: {e}")),
                            Some(Ok(m)) => m,
                        };
                        match self.on_frame(m, &mut acks) {
                            Err(end) => return end,
                            Ok(None) => {}
                            // Backpressure: if the application stops
                            // reading, so do we.
                            // The message is acknowledged only once the
                            // application has it (it is marked seen): were
                            // the ACK sent first and this connection lost
                            // in between, the resent copy would be dropped
                            // as a duplicate of one the application never got.
                            Ok(Some(event)) => {
                                if self.events_tx.send(event).await.is_err() {
                                    let _ = ws.close().await;
                                    return SessionEnd::Stop("client handle dropped".into());
                                }
                            }
                        }
                        if acks.len() < MAX_ACK_BATCH {
                            next = ws.next().now_or_never();
                        }
                    }
                    if !acks.is_empty() {
                        if let Err(e) = ws.send(Message::binary(ClientToRelay::Ack(acks).encode())).await {
                            return SessionEnd::Lost(format!("send failed: {e}"));
                        }
                    }
                }
            }
        }
    }

    /// One frame from the relay: settles receipts and requests here;
    /// returns the event for the application, if any. MSG ids to
    /// acknowledge are added to `acks` (every copy, duplicates too: the
    /// relay deletes a stored message only once it is acked).
    fn on_frame(&mut self, m: Message, acks: &mut Vec<MsgId>) -> Result<Option<Event>, SessionEnd> {
        if let Some((code, text)) = m.as_close() {
            let code = u16::from(code);
            if code == 1009 {
                return Err(SessionEnd::TooBig);
            }
            return Err(match ErrorCode::from_close_code(code) {
                Some(c @ ErrorCode::Replaced) => {
                    SessionEnd::Fatal(format!("relay closed the connection: {c}"))
                }
                Some(c) => SessionEnd::Lost(format!("relay closed the connection: {c}")),
                None => SessionEnd::Lost(format!("relay closed the connection: {code} {text}")),
            });
        }
        if !m.is_binary() {
            return Ok(None);
        }
        let bytes: Bytes = m.into_payload().into();
        Ok(Some(match RelayToClient::decode(&bytes) {
            Ok(RelayToClient::Receipt(r)) => {
                if let Some((seq, tx)) = self.receipts.remove(&r.id) {
                    self.unreceipted.remove(&seq);
                    let _ = tx.send(r);
                }
                return Ok(None);
            }
            Ok(RelayToClient::Response(r)) => {
                if let Some(tx) = self.requests.remove(&r.req_id) {
                    let _ = tx.send(r.result);
                }
                return Ok(None);
            }
            Ok(RelayToClient::Msg(m)) => {
                acks.push(m.id);
                let key = (m.id, m.from);
                if self.dedupe.seen(&key) {
                    return Ok(None);
                }
                // Only a message that opens (or verifies) counts as seen,
                // so a forged copy cannot suppress the real one.
                let event = open_msg(&self.identity, m);
                if matches!(event, Event::Msg(_)) {
                    self.dedupe.first(key);
                }
                event
            }
            Ok(RelayToClient::Notice(n)) => Event::Notice(n),
            Ok(RelayToClient::Error(e)) => Event::Error {
                code: e.code,
                detail: e.detail,
            },
            Ok(other) => Event::Error {
                code: ErrorCode::UnexpectedFrame.as_u16(),
                detail: format!("unexpected frame from relay: {other:?}"),
            },
            Err(e) => Event::Error {
                code: e.code().as_u16(),
                detail: format!("undecodable frame from relay: {e}"),
            },
        }))
    }

    /// The relay refused a frame as too large (1009), so its limit is below
    /// our largest unreceipted frame: lower the limit under that frame and
    /// answer every unreceipted message at least that large with a local
    /// `rejected` / `frame_too_large` receipt. They are never resent (a
    /// resend would be refused again, forever, and hold up the messages
    /// behind it). Repeated 1009s converge on the relay's real limit.
    fn drop_too_big(&mut self) {
        let Some(largest) = self.unreceipted.values().map(|(_, f)| f.len()).max() else {
            return;
        };
        let limit = largest.saturating_sub(1);
        self.frame_limit
            .fetch_min(limit, std::sync::atomic::Ordering::Relaxed);
        let too_big: Vec<u64> = self
            .unreceipted
            .iter()
            .filter(|(_, (_, f))| f.len() > limit)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in too_big {
            let Some((id, frame)) = self.unreceipted.remove(&seq) else {
                continue;
            };
            tracing::warn!(
                size = frame.len(),
                "the relay refused a message as too large; it will not be resent"
            );
            if let Some((_, tx)) = self.receipts.remove(&id) {
                let _ = tx.send(Receipt {
                    id,
                    status: w2w_proto::frame::Status::Rejected,
                    reason: ErrorCode::FrameTooLarge.as_u16(),
                    delivered: 0,
                    entries: Vec::new(),
                });
            }
        }
    }

    /// Reconnects with exponential backoff and jitter, then resends every
    /// message still without a receipt. `None`: stop (closed, or refused).
    async fn reconnect(&mut self, relay_key: Address) -> Result<RelaySocket, String> {
        // Requests cannot survive a reconnect; their callers get an error.
        self.requests.clear();
        let mut backoff = Duration::from_millis(100);
        loop {
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            let sleep = tokio::time::sleep(backoff + jitter);
            tokio::pin!(sleep);
            // Keep taking commands while waiting: sends are kept for later.
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.cmd_rx.recv() => match cmd {
                        Some(Cmd::Send(frame, id, tx)) => self.remember(id, frame, tx),
                        Some(Cmd::Request(..)) => {}
                        Some(Cmd::Close) | None => return Err("closed by client".into()),
                    },
                }
            }
            let attempt = async {
                let mut ws = connect_raw(&self.opts).await?;
                register_session(&mut ws, &self.identity, &self.opts, Some(relay_key)).await?;
                Ok::<_, ClientError>(ws)
            };
            match tokio::time::timeout(self.opts.timeout, attempt).await {
                Ok(Ok(mut ws)) => {
                    // Written in batches (the sink flushes when its buffer
                    // fills), flushed once at the end.
                    let mut fed = true;
                    for (_, (_, frame)) in self.unreceipted.iter() {
                        if ws.feed(Message::binary(frame.clone())).await.is_err() {
                            fed = false;
                            break;
                        }
                    }
                    if fed {
                        let _ = ws.flush().await;
                    }
                    tracing::info!(resent = self.unreceipted.len(), "reconnected");
                    return Ok(ws);
                }
                // The key's other sessions fill the relay's allowance: one
                // may end soon (a tab closes, a dead connection times out),
                // so keep trying, not faster than every 2 s.
                Ok(Err(ClientError::Refused {
                    code: w2w_proto::ErrorCode::TooManySessions,
                    ..
                })) => {
                    tracing::info!("reconnect refused: too many sessions of this key; retrying");
                    backoff = backoff.max(Duration::from_secs(1));
                }
                Ok(Err(e @ (ClientError::Handshake(_) | ClientError::Refused { .. }))) => {
                    return Err(format!("reconnect refused: {e}"));
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "reconnect failed"),
                Err(_) => tracing::debug!("reconnect timed out"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn drive(
    identity: Identity,
    frame_limit: Arc<std::sync::atomic::AtomicUsize>,
    opts: ConnectOptions,
    relay_key: Address,
    mut ws: RelaySocket,
    cmd_rx: mpsc::Receiver<Cmd>,
    events_tx: mpsc::Sender<Event>,
    closed_tx: tokio::sync::watch::Sender<Option<String>>,
) {
    let mut d = Driver {
        identity,
        frame_limit,
        opts,
        cmd_rx,
        events_tx,
        receipts: HashMap::default(),
        unreceipted: Default::default(),
        next_seq: 0,
        requests: HashMap::default(),
        dedupe: Dedupe::new(DEDUPE_WINDOW),
    };
    let reason = loop {
        match d.session(&mut ws).await {
            SessionEnd::Stop(r) | SessionEnd::Fatal(r) => break r,
            SessionEnd::TooBig if !d.opts.reconnect => {
                d.drop_too_big();
                break "relay closed the connection: message too big (1009)".into();
            }
            SessionEnd::TooBig => {
                d.drop_too_big();
                tracing::info!("relay refused a message as too large; reconnecting without it");
                match d.reconnect(relay_key).await {
                    Ok(new) => ws = new,
                    Err(r) => break r,
                }
            }
            SessionEnd::Lost(r) if !d.opts.reconnect => break r,
            SessionEnd::Lost(r) => {
                tracing::info!(reason = %r, "connection lost; reconnecting");
                match d.reconnect(relay_key).await {
                    Ok(new) => ws = new,
                    Err(r) => break r,
                }
            }
        }
    };
    tracing::debug!(reason, "client driver stopped");
    let _ = closed_tx.send(Some(reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_remembers_the_last_cap_pairs_and_forgets_older_ones() {
        let key = |i: u32| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            (MsgId(id), Address([7; 32]))
        };
        let mut d = Dedupe::new(100);
        for i in 0..1000 {
            assert!(d.first(key(i)), "{i} is new");
            assert!(!d.first(key(i)), "{i} again is a duplicate");
            // The last 100 (this one included) are always remembered.
            let oldest = i.saturating_sub(99);
            assert!(d.seen(&key(oldest)), "{oldest} forgotten at {i}");
            assert!(d.current.len() + d.previous.len() <= 200);
        }
        assert!(!d.seen(&key(0)), "old pairs are forgotten");
        // Another sender's message with the same id is another message.
        assert!(d.first((key(999).0, Address([8; 32]))));
    }
}
