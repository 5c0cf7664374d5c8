//! The application's handle: sending, requests, received events.

use std::sync::Arc;
use std::time::Duration;

use crate::driver::drive;
use crate::error::ClientError;
use crate::handshake::register_session;
use crate::transport::{connect_raw, ConnectOptions, RelaySocket};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use w2w_proto::frame::{Msg, MsgId, Notice, Receipt, Request, RequestOp, ResponseBody};
use w2w_proto::group::{GroupAction, GroupInfo, GroupOp};
use w2w_proto::handshake::ClientRegistered;
use w2w_proto::seal::{self, SealError};
use w2w_proto::{Address, Dest, ErrorCode, Identity};

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

pub(crate) enum Cmd {
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
            let registered = register_session(&mut ws, &identity, &opts, opts.pinned).await?;
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
