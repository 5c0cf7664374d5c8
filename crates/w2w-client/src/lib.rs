//! Async Rust client for w2w relays.
//!
//! [`Client::connect`] dials a relay, runs the sigA → sigB → sigC
//! registration (checking the relay key against a pin when one is given) and
//! starts a driver task that owns the socket. The [`Client`] handle sends
//! frames and awaits their receipts; incoming messages and notices arrive on
//! [`Client::recv`]. The driver answers the relay's pings (tokio-websockets
//! does that) and stops when the handle is dropped or closed.
//!
//! [`register`] exposes the handshake on a raw WebSocket for tests and tools
//! that need to send arbitrary frames.
//!
//! End to end: [`Client::send`] seals a2a/a2b/a2g payloads for their
//! recipients and signs a2n broadcasts (`w2w_proto::seal`); received
//! payloads are opened or verified before the application sees them, and a
//! forged one arrives as [`Event::Rejected`], never as data. Redelivered
//! messages (same id) are dropped with bounded memory.
//!
//! A lost connection is re-established with exponential backoff and jitter
//! (same relay, pinned key, fresh handshake); messages still without a
//! receipt are sent again with their original ids. A connection replaced by
//! a newer one of ours, or a refused registration, is not retried.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_websockets::{MaybeTlsStream, Message, WebSocketStream};
use w2w_proto::frame::{
    ClientToRelay, ErrorFrame, Msg, MsgId, Notice, Receipt, RelayToClient, Request, RequestOp,
    ResponseBody, Role,
};
use w2w_proto::group::{GroupAction, GroupInfo, GroupOp};
use w2w_proto::handshake::{ClientHandshake, ClientRegistered, HandshakeError};
use w2w_proto::seal::{self, SealError};
use w2w_proto::{Address, Dest, ErrorCode, Identity};

pub use w2w_proto;

/// A WebSocket to a relay, plain or TLS.
pub type RelaySocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Client errors.
///
/// Each message already includes the error it wraps, so none of them
/// reports a `source()`: printing the chain (`{:#}` in anyhow) shows every
/// cause once instead of repeating it at every level.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid relay URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connecting to {url}: {error}")]
    Connect {
        url: String,
        error: tokio_websockets::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("registration failed: {0}")]
    Handshake(HandshakeError),
    /// The relay refused with a code (ERROR frame or close code).
    #[error("relay refused: {code}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Refused { code: ErrorCode, detail: String },
    #[error("relay sent an invalid frame: {0}")]
    Protocol(String),
    #[error("connection closed{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { reason: Option<String> },
    #[error("reading TLS roots {path}: {reason}")]
    TlsRoots { path: String, reason: String },
    #[error("websocket: {0}")]
    Ws(tokio_websockets::Error),
    /// The message could not be sealed (e.g. a recipient address is not a
    /// valid Ed25519 key).
    #[error("cannot seal the message: {0}")]
    Seal(SealError),
    /// The MSG frame is larger than the relay accepts: nothing was sent.
    #[error("message too large: the frame is {size} bytes and the relay accepts at most {limit} (limits.max_frame_bytes in its /.well-known/w2w); send a smaller body or split it")]
    TooLarge { size: usize, limit: usize },
}

impl From<HandshakeError> for ClientError {
    fn from(e: HandshakeError) -> Self {
        ClientError::Handshake(e)
    }
}

impl From<tokio_websockets::Error> for ClientError {
    fn from(e: tokio_websockets::Error) -> Self {
        ClientError::Ws(e)
    }
}

impl From<SealError> for ClientError {
    fn from(e: SealError) -> Self {
        ClientError::Seal(e)
    }
}

/// How to reach and trust a relay.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// ws:// or wss:// URL, exactly as the relay should see it.
    pub url: String,
    /// Expected relay key (from a previous visit); `None` trusts on first use.
    pub pinned: Option<Address>,
    /// Extra PEM CA certificates to trust for wss (e.g. a self-signed relay).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Time allowed for TCP + TLS + WebSocket + registration.
    pub timeout: Duration,
    /// Reconnect (with backoff) after a lost connection, resending messages
    /// that got no receipt (default true).
    pub reconnect: bool,
    /// The relay's largest WebSocket message (default
    /// [`w2w_proto::DEFAULT_MAX_FRAME_BYTES`]): larger MSG frames are refused
    /// with [`ClientError::TooLarge`] before anything is sent. If the relay
    /// closes with 1009 anyway (its limit is lower), the largest unreceipted
    /// messages get a local `rejected` / `frame_too_large` receipt, the
    /// limit is lowered, and they are never resent.
    pub max_frame_bytes: usize,
}

impl ConnectOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            pinned: None,
            extra_roots_pem: None,
            timeout: Duration::from_secs(10),
            reconnect: true,
            max_frame_bytes: w2w_proto::DEFAULT_MAX_FRAME_BYTES,
        }
    }

    pub fn pinned(mut self, key: Option<Address>) -> Self {
        self.pinned = key;
        self
    }

    /// Trusts the PEM certificates in `path` in addition to the web PKI.
    pub fn trust_pem_file(mut self, path: &Path) -> Result<Self, ClientError> {
        let pem = std::fs::read(path).map_err(|e| ClientError::TlsRoots {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.extra_roots_pem = Some(pem);
        Ok(self)
    }
}

fn tls_connector(extra_pem: Option<&[u8]>) -> Result<tokio_websockets::Connector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_pem {
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| ClientError::TlsRoots {
                path: "<pem>".into(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| ClientError::TlsRoots {
                path: "<pem>".into(),
                reason: e.to_string(),
            })?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::TlsRoots {
        path: "<provider>".into(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_websockets::Connector::Rustls(
        tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    ))
}

/// Opens a WebSocket to the relay (no registration).
pub async fn connect_raw(opts: &ConnectOptions) -> Result<RelaySocket, ClientError> {
    let uri: http::Uri =
        opts.url
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::BadUrl {
                url: opts.url.clone(),
                reason: e.to_string(),
            })?;
    let connector = match uri.scheme_str() {
        Some("wss") => tls_connector(opts.extra_roots_pem.as_deref())?,
        Some("ws") => tokio_websockets::Connector::Plain,
        _ => {
            return Err(ClientError::BadUrl {
                url: opts.url.clone(),
                reason: "the scheme must be ws:// or wss://".into(),
            })
        }
    };
    let builder = tokio_websockets::ClientBuilder::from_uri(uri)
        .connector(&connector)
        .limits(tokio_websockets::Limits::default().max_payload_len(Some(16 << 20)));
    let fut = builder.connect();
    let (ws, _resp) = tokio::time::timeout(opts.timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(opts.timeout))?
        .map_err(|error| ClientError::Connect {
            url: opts.url.clone(),
            error,
        })?;
    set_nodelay(&ws);
    Ok(ws)
}

/// Small frames (MSG, ACK) go out at once instead of waiting for Nagle's
/// algorithm (up to 40 ms with delayed ACKs).
fn set_nodelay(ws: &RelaySocket) {
    let tcp = match ws.get_ref() {
        MaybeTlsStream::Plain(t) => t,
        MaybeTlsStream::Rustls(t) => t.get_ref().0,
        #[allow(unreachable_patterns)]
        _ => return,
    };
    let _ = tcp.set_nodelay(true);
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the next binary frame, turning ERROR frames and close codes into
/// [`ClientError::Refused`].
async fn next_frame<S>(ws: &mut WebSocketStream<S>) -> Result<RelayToClient, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = match ws.next().await {
            None => return Err(ClientError::Closed { reason: None }),
            Some(m) => m?,
        };
        if let Some((code, reason)) = m.as_close() {
            return Err(match ErrorCode::from_close_code(code.into()) {
                Some(code) => ClientError::Refused {
                    code,
                    detail: reason.to_owned(),
                },
                None => ClientError::Closed {
                    reason: Some(format!("{} {}", u16::from(code), reason)),
                },
            });
        }
        if !m.is_binary() {
            continue;
        }
        let bytes: Bytes = m.into_payload().into();
        let frame =
            RelayToClient::decode(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let RelayToClient::Error(ErrorFrame { code, detail }) = &frame {
            if let Some(code) = ErrorCode::from_u16(*code) {
                return Err(ClientError::Refused {
                    code,
                    detail: detail.clone(),
                });
            }
        }
        return Ok(frame);
    }
}

/// Runs registration on an open WebSocket. On success the socket is
/// registered and REPLY_BACK has been consumed.
pub async fn register<S>(
    ws: &mut WebSocketStream<S>,
    identity: &Identity,
    url: &str,
    pinned: Option<Address>,
) -> Result<ClientRegistered, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    register_as(ws, identity, url, pinned, Role::Client).await
}

/// [`register`] with an explicit role; relays peer with `Role::Relay`.
pub async fn register_as<S>(
    ws: &mut WebSocketStream<S>,
    identity: &Identity,
    url: &str,
    pinned: Option<Address>,
    role: Role,
) -> Result<ClientRegistered, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut hs = ClientHandshake::new(identity.clone(), role, url, rand::random(), pinned);
    let unexpected = |f: &RelayToClient| {
        ClientError::Protocol(format!("unexpected frame during registration: {f:?}"))
    };
    let ch = match next_frame(ws).await? {
        RelayToClient::Challenge(c) => c,
        f => return Err(unexpected(&f)),
    };
    let reg = hs.on_challenge(ch, unix_ms())?;
    ws.send(Message::binary(ClientToRelay::Register(reg).encode()))
        .await?;
    let cs = match next_frame(ws).await? {
        RelayToClient::Countersign(c) => c,
        f => return Err(unexpected(&f)),
    };
    let confirm = hs.on_countersign(cs)?;
    ws.send(Message::binary(ClientToRelay::Confirm(confirm).encode()))
        .await?;
    let rb = match next_frame(ws).await? {
        RelayToClient::ReplyBack(r) => r,
        f => return Err(unexpected(&f)),
    };
    Ok(hs.on_reply_back(rb)?)
}

/// How a received message was protected end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// No protection (sent with `send_plain`): the relays could read it.
    Plain,
    /// Sealed for us by `from`: confidential and authenticated.
    Sealed,
    /// Signed by `from` (broadcasts): authenticated, not confidential.
    Signed,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Plain => "plain",
            Security::Sealed => "sealed",
            Security::Signed => "signed",
        }
    }
}

/// A message delivered to the application, already opened or verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub id: MsgId,
    pub from: Address,
    pub dest: Dest,
    pub security: Security,
    pub body: Bytes,
}

/// Something the relay sent that nobody was waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Msg(Received),
    /// A message that failed to open or verify; its body is withheld.
    Rejected {
        id: MsgId,
        from: Address,
        reason: SealError,
    },
    Notice(Notice),
    /// A non-fatal ERROR frame.
    Error {
        code: u16,
        detail: String,
    },
}

enum Cmd {
    Send(Bytes, MsgId, oneshot::Sender<Receipt>),
    Request(Request, oneshot::Sender<Result<ResponseBody, u16>>),
    Close,
}

/// A registered connection to a relay.
pub struct Client {
    identity: Identity,
    registered: ClientRegistered,
    cmd_tx: mpsc::Sender<Cmd>,
    events_rx: mpsc::Receiver<Event>,
    closed_rx: tokio::sync::watch::Receiver<Option<String>>,
    next_req: std::sync::atomic::AtomicU32,
    /// The largest frame the relay is known to accept (lowered by the
    /// driver when the relay closes with 1009).
    frame_limit: Arc<std::sync::atomic::AtomicUsize>,
}

impl Client {
    /// Connects and registers.
    pub async fn connect(identity: Identity, opts: ConnectOptions) -> Result<Client, ClientError> {
        let timeout = opts.timeout;
        tokio::time::timeout(timeout, async {
            let mut ws = connect_raw(&opts).await?;
            let registered = register(&mut ws, &identity, &opts.url, opts.pinned).await?;
            Ok(Client::start(identity, opts, registered, ws))
        })
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
    }

    fn start(
        identity: Identity,
        opts: ConnectOptions,
        registered: ClientRegistered,
        ws: RelaySocket,
    ) -> Client {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (events_tx, events_rx) = mpsc::channel(4096);
        let (closed_tx, closed_rx) = tokio::sync::watch::channel(None);
        let frame_limit = Arc::new(std::sync::atomic::AtomicUsize::new(opts.max_frame_bytes));
        tokio::spawn(drive(
            identity.clone(),
            frame_limit.clone(),
            opts,
            registered.relay_key,
            ws,
            cmd_rx,
            events_tx,
            closed_tx,
        ));
        Client {
            identity,
            registered,
            cmd_tx,
            events_rx,
            closed_rx,
            next_req: std::sync::atomic::AtomicU32::new(1),
            frame_limit,
        }
    }

    pub fn address(&self) -> Address {
        self.identity.address()
    }

    pub fn relay_key(&self) -> Address {
        self.registered.relay_key
    }

    pub fn registration(&self) -> &ClientRegistered {
        &self.registered
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed {
            reason: self.closed_rx.borrow().clone(),
        }
    }

    /// Sends a message and waits for its receipt: sealed for its
    /// recipients (a2a, a2b, a2g) or signed (a2n).
    pub async fn send(&self, dest: Dest, body: impl AsRef<[u8]>) -> Result<Receipt, ClientError> {
        let id = MsgId(rand::random());
        let body = body.as_ref();
        let (flags, payload) = match &dest {
            Dest::A2n(_) => (seal::FLAG_SIGNED, seal::sign(&self.identity, id, body)),
            _ => {
                let recipients: Vec<Address> = match &dest {
                    Dest::A2a => vec![self.address()],
                    Dest::A2b(to) => vec![*to],
                    Dest::A2g(list) => {
                        let mut seen = std::collections::HashSet::new();
                        list.iter().copied().filter(|a| seen.insert(*a)).collect()
                    }
                    Dest::A2n(_) => Vec::new(),
                    // Sealed for the members the relay reports; it delivers
                    // to the same list (minus us).
                    Dest::Group(name) => self
                        .group_info(name)
                        .await?
                        .members
                        .into_iter()
                        .map(|(m, _)| m)
                        .filter(|m| *m != self.address())
                        .collect(),
                };
                let mut fill = |b: &mut [u8]| rand::RngCore::fill_bytes(&mut rand::thread_rng(), b);
                if recipients.is_empty() {
                    // An empty a2g list is the relay's to refuse (empty_list);
                    // a group with no other member delivers to no one.
                    (seal::FLAG_PLAIN, Vec::new())
                } else {
                    (
                        seal::FLAG_SEALED,
                        seal::seal(&self.identity, id, &recipients, body, &mut fill)?,
                    )
                }
            }
        };
        let msg = Msg {
            flags,
            id,
            from: self.address(),
            dest,
            payload: payload.into(),
        };
        self.send_msg(&msg).await
    }

    /// Sends without end-to-end protection: every relay on the path can
    /// read `body`. For public data and benchmarks.
    pub async fn send_plain(
        &self,
        dest: Dest,
        body: impl Into<Bytes>,
    ) -> Result<Receipt, ClientError> {
        let msg = Msg {
            flags: seal::FLAG_PLAIN,
            id: MsgId(rand::random()),
            from: self.address(),
            dest,
            payload: body.into(),
        };
        self.send_msg(&msg).await
    }

    /// Sends a prepared MSG (its `from` must be this client's address).
    /// A frame over the relay's limit is refused here, unsent.
    pub async fn send_msg(&self, msg: &Msg) -> Result<Receipt, ClientError> {
        let frame = msg.encode();
        let limit = self.frame_limit.load(std::sync::atomic::Ordering::Relaxed);
        if frame.len() > limit {
            return Err(ClientError::TooLarge {
                size: frame.len(),
                limit,
            });
        }
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(Cmd::Send(frame, msg.id, tx))
            .await
            .map_err(|_| self.closed_error())?;
        rx.await.map_err(|_| self.closed_error())
    }

    /// Sends a c2s request and waits for the answer.
    pub async fn request(&self, op: RequestOp) -> Result<ResponseBody, ClientError> {
        let req_id = self
            .next_req
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(Cmd::Request(Request { req_id, op }, tx))
            .await
            .map_err(|_| self.closed_error())?;
        match rx.await.map_err(|_| self.closed_error())? {
            Ok(body) => Ok(body),
            Err(code) => Err(ClientError::Refused {
                code: ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal),
                detail: format!("request failed with code {code}"),
            }),
        }
    }

    /// Every address online on this relay (pages through ONLINE).
    /// Creates a named group on this relay, owned by us.
    pub async fn group_create(&self, name: &str) -> Result<GroupInfo, ClientError> {
        self.group_op(name, GroupAction::Create).await
    }

    /// Applies a signed membership change (we must be an admin, or a
    /// member removing itself).
    ///
    /// A group's operations are numbered 1, 2, 3, … and each must carry
    /// the group's current number + 1. This reads the group's number, signs
    /// the next one, and if another operation took that number first
    /// (`stale_seq`) reads and signs again, up to 16 times with a short
    /// random pause, so quick successive operations, several admins and
    /// skewed clocks never collide for the caller.
    pub async fn group_op(
        &self,
        name: &str,
        action: GroupAction,
    ) -> Result<GroupInfo, ClientError> {
        const ATTEMPTS: u32 = 16;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let seq = match action {
                GroupAction::Create => 1,
                _ => self.group_info(name).await?.seq.saturating_add(1),
            };
            let op = GroupOp::sign(&self.identity, name, action.clone(), seq);
            match self.request(RequestOp::Group(op)).await {
                Ok(ResponseBody::Group(g)) => return Ok(g),
                Ok(_) => {
                    return Err(ClientError::Protocol(
                        "group op answered with another op".into(),
                    ))
                }
                Err(ClientError::Refused {
                    code: ErrorCode::StaleSeq,
                    ..
                }) if attempt < ATTEMPTS && !matches!(action, GroupAction::Create) => {
                    let pause = rand::random::<u64>() % (2 * u64::from(attempt)) + 1;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A group's owner and members.
    pub async fn group_info(&self, name: &str) -> Result<GroupInfo, ClientError> {
        match self.request(RequestOp::GroupInfo(name.to_owned())).await? {
            ResponseBody::Group(g) => Ok(g),
            _ => Err(ClientError::Protocol(
                "group info answered with another op".into(),
            )),
        }
    }

    pub async fn online(&mut self) -> Result<Vec<Address>, ClientError> {
        let mut out = Vec::new();
        loop {
            let body = self
                .request(RequestOp::Online {
                    offset: out.len() as u32,
                    limit: 1000,
                })
                .await?;
            let ResponseBody::Online { total, addresses } = body else {
                return Err(ClientError::Protocol(
                    "ONLINE answered with another op".into(),
                ));
            };
            let done = addresses.is_empty() || out.len() + addresses.len() >= total as usize;
            out.extend(addresses);
            if done {
                return Ok(out);
            }
        }
    }

    /// The next message or notice; `None` once the connection has ended
    /// (see [`Client::close_reason`]).
    pub async fn recv(&mut self) -> Option<Event> {
        self.events_rx.recv().await
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.closed_rx.borrow().clone()
    }

    /// Closes the connection with a normal WebSocket close.
    pub async fn close(self) {
        let _ = self.cmd_tx.send(Cmd::Close).await;
        let mut rx = self.closed_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|c| c.is_some())).await;
    }
}

/// The driver: owns the socket, matches receipts and responses to waiters.
/// Opens or verifies a received MSG for the application.
fn open_msg(me: &Identity, m: Msg) -> Event {
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

/// Remembers the last `cap` message ids, to drop redeliveries.
struct Dedupe {
    cap: usize,
    order: std::collections::VecDeque<(MsgId, Address)>,
    set: std::collections::HashSet<(MsgId, Address)>,
}

impl Dedupe {
    fn new(cap: usize) -> Self {
        Dedupe {
            cap,
            order: Default::default(),
            set: Default::default(),
        }
    }

    fn seen(&self, key: &(MsgId, Address)) -> bool {
        self.set.contains(key)
    }

    /// `true` the first time a (id, sender) pair is seen.
    fn first(&mut self, key: (MsgId, Address)) -> bool {
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Message ids remembered for deduplication.
pub const DEDUPE_WINDOW: usize = 16_384;

/// Most MSG ids acknowledged in one ACK frame.
const MAX_ACK_BATCH: usize = 256;

/// How one connection ended.
enum SessionEnd {
    /// `close()` was called or the handle dropped: stop for good.
    Stop(String),
    /// The relay refused us in a way reconnecting cannot fix (replaced by a
    /// newer connection of ours, or registration refused).
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
struct Driver {
    identity: Identity,
    opts: ConnectOptions,
    frame_limit: Arc<std::sync::atomic::AtomicUsize>,
    cmd_rx: mpsc::Receiver<Cmd>,
    events_tx: mpsc::Sender<Event>,
    receipts: HashMap<MsgId, oneshot::Sender<Receipt>>,
    unreceipted: std::collections::BTreeMap<u64, (MsgId, Bytes)>,
    seq_of: HashMap<MsgId, u64>,
    next_seq: u64,
    requests: HashMap<u32, oneshot::Sender<Result<ResponseBody, u16>>>,
    dedupe: Dedupe,
}

impl Driver {
    fn remember(&mut self, id: MsgId, frame: Bytes, tx: oneshot::Sender<Receipt>) {
        self.receipts.insert(id, tx);
        self.unreceipted.insert(self.next_seq, (id, frame));
        self.seq_of.insert(id, self.next_seq);
        self.next_seq += 1;
    }

    async fn session(&mut self, ws: &mut RelaySocket) -> SessionEnd {
        loop {
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Cmd::Send(frame, id, tx)) => {
                        self.remember(id, frame.clone(), tx);
                        if let Err(e) = ws.send(Message::binary(frame)).await {
                            return SessionEnd::Lost(format!("send failed: {e}"));
                        }
                    }
                    Some(Cmd::Request(req, tx)) => {
                        self.requests.insert(req.req_id, tx);
                        if let Err(e) = ws.send(Message::binary(ClientToRelay::Request(req).encode())).await {
                            return SessionEnd::Lost(format!("send failed: {e}"));
                        }
                    }
                    Some(Cmd::Close) => {
                        let _ = ws.close().await;
                        return SessionEnd::Stop("closed by client".into());
                    }
                    None => {
                        let _ = ws.close().await;
                        return SessionEnd::Stop("client handle dropped".into());
                    }
                },
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
                if let Some(seq) = self.seq_of.remove(&r.id) {
                    self.unreceipted.remove(&seq);
                }
                if let Some(tx) = self.receipts.remove(&r.id) {
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
            self.seq_of.remove(&id);
            tracing::warn!(
                size = frame.len(),
                "the relay refused a message as too large; it will not be resent"
            );
            if let Some(tx) = self.receipts.remove(&id) {
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
                register(&mut ws, &self.identity, &self.opts.url, Some(relay_key)).await?;
                Ok::<_, ClientError>(ws)
            };
            match tokio::time::timeout(self.opts.timeout, attempt).await {
                Ok(Ok(mut ws)) => {
                    for (_, (_, frame)) in self.unreceipted.iter() {
                        if ws.send(Message::binary(frame.clone())).await.is_err() {
                            break;
                        }
                    }
                    tracing::info!(resent = self.unreceipted.len(), "reconnected");
                    return Ok(ws);
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
async fn drive(
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
        receipts: HashMap::new(),
        unreceipted: Default::default(),
        seq_of: HashMap::new(),
        next_seq: 0,
        requests: HashMap::new(),
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
