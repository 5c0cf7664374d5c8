//! The binary frame codec.
//!
//! Every w2w frame is one binary WebSocket message:
//!
//! ```text
//! +---------+--------+------------------------------+
//! | version | type   | body (type-specific)         |
//! | u8 = 1  | u8     |                              |
//! +---------+--------+------------------------------+
//! ```
//!
//! Integers are big-endian. Strings are a `u16` byte length then UTF-8.
//! The relay reads MSG headers (route, id, sender, destinations) and never
//! the payload, which runs to the end of the frame: the relay forwards the
//! very `Bytes` it received, so a broadcast to N clients shares one buffer.
//!
//! Messages are named by direction (`ClientToRelay`, `RelayToClient`), as in
//! iroh-relay. MSG is the one frame that travels both ways with the same
//! bytes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codes::ErrorCode;
use crate::identity::Address;
use crate::PROTOCOL_VERSION;

/// Frame type bytes.
pub mod ty {
    pub const CHALLENGE: u8 = 0x01;
    pub const REGISTER: u8 = 0x02;
    pub const COUNTERSIGN: u8 = 0x03;
    pub const CONFIRM: u8 = 0x04;
    pub const REPLY_BACK: u8 = 0x05;
    pub const ACK: u8 = 0x06;
    pub const MSG: u8 = 0x10;
    pub const RECEIPT: u8 = 0x11;
    pub const REQUEST: u8 = 0x20;
    pub const RESPONSE: u8 = 0x21;
    pub const NOTICE: u8 = 0x30;
    pub const ERROR: u8 = 0x3f;
}

/// Longest URL accepted in REGISTER / REPLY_BACK / LOOKUP answers.
pub const MAX_URL_LEN: usize = 1024;
/// Longest human-readable detail in an ERROR frame.
pub const MAX_DETAIL_LEN: usize = 1024;
/// Size of the fixed MSG header before destinations: version, type, route,
/// flags, id (16), from (32).
pub const MSG_FIXED_HEADER: usize = 2 + 1 + 1 + 16 + 32;

/// A message id: 16 random bytes chosen by the sender. Receipts refer to it;
/// later layers deduplicate on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub [u8; 16]);

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MsgId({})", hex::encode(&self.0[..4]))
    }
}

/// Who is registering: a client (role 0) or a relay peering with another
/// relay (role 1, used by federation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client = 0,
    Relay = 1,
    /// A client session that sends and asks but takes no deliveries
    /// (PROTOCOL 7.7): it never disturbs a listening session of the same
    /// address.
    Sender = 2,
}

/// The route byte of a MSG frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Echo to self through the relay.
    A2a = 1,
    /// To one address.
    A2b = 2,
    /// To an explicit list of addresses.
    A2g = 3,
    /// To everyone (see [`Scope`]).
    A2n = 4,
    /// To the members of a named group hosted by the sender's relay.
    Group = 5,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::A2a => "a2a",
            Route::A2b => "a2b",
            Route::A2g => "a2g",
            Route::A2n => "a2n",
            Route::Group => "group",
        }
    }
}

/// Broadcast scope of an a2n message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every client registered on the sender's relay.
    Relay = 0,
    /// Every client in the federation (relays without federation treat this
    /// as `Relay`).
    Federation = 1,
}

/// The destination section of a MSG frame; determines the route byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    A2a,
    A2b(Address),
    A2g(Vec<Address>),
    A2n(Scope),
    /// A named group (see [`crate::group`]); the relay checks membership.
    Group(String),
}

impl Dest {
    pub fn route(&self) -> Route {
        match self {
            Dest::A2a => Route::A2a,
            Dest::A2b(_) => Route::A2b,
            Dest::A2g(_) => Route::A2g,
            Dest::A2n(_) => Route::A2n,
            Dest::Group(_) => Route::Group,
        }
    }
}

/// A MSG frame. `from` must equal the sender's registered address (the relay
/// checks; it does not rewrite), so the received bytes can be forwarded as
/// they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// End-to-end flags, opaque to the relay.
    pub flags: u8,
    pub id: MsgId,
    pub from: Address,
    pub dest: Dest,
    /// Opaque application bytes; the relay never parses them.
    pub payload: Bytes,
}

/// R→C, first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub relay_key: Address,
    pub relay_nonce: [u8; 32],
}

/// C→R, carries sigA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub role: Role,
    /// The relay key the client is registering with (from CHALLENGE, or
    /// pinned). A relay rejects a REGISTER naming another key as WrongRelay.
    pub relay_key: Address,
    pub client_key: Address,
    pub client_nonce: [u8; 32],
    pub timestamp_ms: u64,
    /// The URL the client dialled, exactly as it dialled it.
    pub url: String,
    pub sig_a: [u8; 64],
}

/// R→C, carries sigB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Countersign {
    pub sig_b: [u8; 64],
}

/// C→R, carries sigC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    pub sig_c: [u8; 64],
}

/// R→C, the seed's replyBack: sent once registration is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyBack {
    pub address: Address,
    pub relay_time_ms: u64,
    pub relay_url: String,
}

/// Outcome of a send, overall or per recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Handed to the recipient's live connection.
    Delivered = 0,
    /// Stored for an offline recipient (store-and-forward).
    Queued = 1,
    /// No connected recipient for this address.
    NoRoute = 2,
    /// Refused; the reason code says why.
    Rejected = 3,
    /// a2g only: some recipients delivered, some not (see entries).
    Partial = 4,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Delivered,
            1 => Status::Queued,
            2 => Status::NoRoute,
            3 => Status::Rejected,
            4 => Status::Partial,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Queued => "queued",
            Status::NoRoute => "no_route",
            Status::Rejected => "rejected",
            Status::Partial => "partial",
        }
    }
}

/// Per-recipient line of a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptEntry {
    pub to: Address,
    pub status: Status,
    /// Error code, 0 when none.
    pub reason: u16,
}

/// R→C, the answer to every MSG a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: MsgId,
    pub status: Status,
    /// Error code, 0 when none.
    pub reason: u16,
    /// Number of connections the message was handed to.
    pub delivered: u32,
    /// One entry per a2b/a2g recipient; empty for a2a and a2n.
    pub entries: Vec<ReceiptEntry>,
}

/// c2s request operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOp {
    /// Who is online on this relay (paged).
    Online { offset: u32, limit: u16 },
    /// Is this address here; which relay hosts it.
    Lookup(Address),
    /// Turn join/leave notices on or off for this connection.
    Presence(bool),
    /// Create a named group or change its membership (signed).
    Group(crate::group::GroupOp),
    /// Who is in a named group.
    GroupInfo(String),
    /// Close every other session of this connection's address (they get
    /// NOTICE REPLACED): `w2w listen --exclusive`.
    Exclusive,
}

impl RequestOp {
    /// The op bytes on the wire (a RESPONSE repeats its REQUEST's).
    pub const ONLINE: u8 = 1;
    pub const LOOKUP: u8 = 2;
    pub const PRESENCE: u8 = 3;
    pub const GROUP: u8 = 4;
    pub const GROUP_INFO: u8 = 5;
    pub const EXCLUSIVE: u8 = 6;

    /// The op byte on the wire.
    pub fn code(&self) -> u8 {
        match self {
            RequestOp::Online { .. } => Self::ONLINE,
            RequestOp::Lookup(_) => Self::LOOKUP,
            RequestOp::Presence(_) => Self::PRESENCE,
            RequestOp::Group(_) => Self::GROUP,
            RequestOp::GroupInfo(_) => Self::GROUP_INFO,
            RequestOp::Exclusive => Self::EXCLUSIVE,
        }
    }
}

/// C→R c2s request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub req_id: u32,
    pub op: RequestOp,
}

/// Successful c2s answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    Online {
        total: u32,
        addresses: Vec<Address>,
    },
    /// `None` when the address is not known; otherwise the relay hosting it.
    Lookup(Option<Hosted>),
    Presence,
    /// A group's owner and members (answer to op 4 and op 5).
    Group(crate::group::GroupInfo),
    /// How many other sessions were closed.
    Exclusive {
        closed: u32,
    },
}

impl ResponseBody {
    /// The op byte of the request this body answers.
    pub fn op(&self) -> u8 {
        match self {
            ResponseBody::Online { .. } => 1,
            ResponseBody::Lookup(_) => 2,
            ResponseBody::Presence => 3,
            // Op 4 and op 5 both answer with the group; op 5 is canonical.
            ResponseBody::Group(_) => 5,
            ResponseBody::Exclusive { .. } => 6,
        }
    }
}

/// Where an address is hosted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosted {
    pub relay_key: Address,
    pub relay_url: String,
}

/// R→C answer to a REQUEST: either a body or an error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub req_id: u32,
    pub op: u8,
    pub result: Result<ResponseBody, u16>,
}

/// R→C s2c notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// An address registered (only sent to connections that asked).
    Join(Address),
    /// An address left (only sent to connections that asked).
    Leave(Address),
    /// Another session of this address asked to be its only one
    /// (EXCLUSIVE); this connection will close.
    Replaced,
    /// The relay is shutting down; reconnect elsewhere or later.
    ShuttingDown,
    /// A message this connection's address sent, whose receipt said
    /// `queued` for `to`, has now been acknowledged by `to` (best effort:
    /// sent only while the sender is connected to `to`'s relay).
    Delivered { id: MsgId, to: Address },
}

/// R→C error report. Fatal errors are followed by a close with code
/// `4000 + code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: u16,
    pub detail: String,
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        truncate_utf8(&mut detail, MAX_DETAIL_LEN);
        ErrorFrame {
            code: code.as_u16(),
            detail,
        }
    }
}

/// Most message ids in one ACK frame.
pub const MAX_ACK_IDS: usize = 1024;

/// Frames a client (or a dialling relay) sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToRelay {
    Register(Register),
    Confirm(Confirm),
    Msg(Msg),
    Request(Request),
    /// The client has received (and processed) these messages; the relay
    /// may delete them from its store-and-forward queue.
    Ack(Vec<MsgId>),
}

/// Frames a relay sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayToClient {
    Challenge(Challenge),
    Countersign(Countersign),
    ReplyBack(ReplyBack),
    Msg(Msg),
    Receipt(Receipt),
    Response(Response),
    Notice(Notice),
    Error(ErrorFrame),
}

/// Why bytes are not a valid frame. Each maps to one [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the field needs.
    #[error("truncated frame: {field} needs {need} more bytes, {have} left")]
    Truncated {
        field: &'static str,
        need: usize,
        have: usize,
    },
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A known type sent in the wrong direction (e.g. a client sending CHALLENGE).
    #[error("frame type 0x{0:02x} is not valid in this direction")]
    WrongDirection(u8),
    #[error("unknown route {0}")]
    UnknownRoute(u8),
    #[error("unknown request op {0}")]
    UnknownOp(u8),
    #[error("invalid value {value} for {field}")]
    BadValue { field: &'static str, value: u32 },
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("{field} is {len} bytes, the maximum is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownType(_) => ErrorCode::UnknownFrameType,
            DecodeError::WrongDirection(_) => ErrorCode::UnexpectedFrame,
            DecodeError::UnknownRoute(_) => ErrorCode::UnknownRoute,
            DecodeError::UnknownOp(_) => ErrorCode::UnknownOp,
            DecodeError::Truncated { .. }
            | DecodeError::TrailingBytes(_)
            | DecodeError::BadValue { .. }
            | DecodeError::BadUtf8(_)
            | DecodeError::TooLong { .. } => ErrorCode::Malformed,
        }
    }
}

// ---------------------------------------------------------------- reading

/// A cursor over a received frame. Slices of the payload are taken from the
/// original `Bytes` so they share its buffer.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                field,
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, field)?);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    pub(crate) fn address(&mut self, field: &'static str) -> Result<Address, DecodeError> {
        Ok(Address(self.array::<32>(field)?))
    }

    pub(crate) fn string(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        let b = self.take(len, field)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8(field))
    }

    /// A `u16` count followed by that many addresses. The count is checked
    /// against the bytes present before anything is allocated.
    pub(crate) fn address_list(
        &mut self,
        field: &'static str,
    ) -> Result<Vec<Address>, DecodeError> {
        let n = self.u16(field)? as usize;
        let need = n * Address::LEN;
        if self.remaining() < need {
            return Err(DecodeError::Truncated {
                field,
                need,
                have: self.remaining(),
            });
        }
        (0..n).map(|_| self.address(field)).collect()
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Reads the 2-byte preamble and returns the type byte.
pub(crate) fn preamble(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let version = r.u8("version")?;
    let ty = r.u8("type")?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    Ok(ty)
}

/// A `u16` count, then that many (address, status, reason) entries; the
/// count is checked against the bytes present before allocating.
pub(crate) fn receipt_entries(r: &mut Reader<'_>) -> Result<Vec<ReceiptEntry>, DecodeError> {
    let n = r.u16("entries")? as usize;
    let need = n * (32 + 1 + 2);
    if r.remaining() < need {
        return Err(DecodeError::Truncated {
            field: "entries",
            need,
            have: r.remaining(),
        });
    }
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(ReceiptEntry {
            to: r.address("entry.to")?,
            status: status(r, "entry.status")?,
            reason: r.u16("entry.reason")?,
        });
    }
    Ok(entries)
}

pub(crate) fn put_receipt_entries(b: &mut BytesMut, entries: &[ReceiptEntry]) {
    let entries = &entries[..entries.len().min(u16::MAX as usize)];
    b.put_u16(entries.len() as u16);
    for e in entries {
        b.put_slice(&e.to.0);
        b.put_u8(e.status as u8);
        b.put_u16(e.reason);
    }
}

pub(crate) fn status(r: &mut Reader<'_>, field: &'static str) -> Result<Status, DecodeError> {
    let v = r.u8(field)?;
    Status::from_u8(v).ok_or(DecodeError::BadValue {
        field,
        value: v as u32,
    })
}

fn decode_msg(r: &mut Reader<'_>) -> Result<Msg, DecodeError> {
    let route = r.u8("route")?;
    let flags = r.u8("flags")?;
    let id = MsgId(r.array("id")?);
    let from = r.address("from")?;
    let dest = match route {
        1 => Dest::A2a,
        2 => Dest::A2b(r.address("to")?),
        3 => Dest::A2g(r.address_list("group")?),
        4 => match r.u8("scope")? {
            0 => Dest::A2n(Scope::Relay),
            1 => Dest::A2n(Scope::Federation),
            v => {
                return Err(DecodeError::BadValue {
                    field: "scope",
                    value: v as u32,
                })
            }
        },
        5 => {
            let n = r.u8("group name")? as usize;
            let b = r.take(n, "group name")?;
            let name = std::str::from_utf8(b).map_err(|_| DecodeError::BadUtf8("group name"))?;
            if !crate::group::valid_name(name) {
                return Err(DecodeError::BadValue {
                    field: "group name",
                    value: n as u32,
                });
            }
            Dest::Group(name.to_owned())
        }
        other => return Err(DecodeError::UnknownRoute(other)),
    };
    Ok(Msg {
        flags,
        id,
        from,
        dest,
        payload: r.rest(),
    })
}

impl ClientToRelay {
    /// Decodes one frame received by a relay. Never panics on any input.
    pub fn decode(frame: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(frame);
        let t = preamble(&mut r)?;
        let out = match t {
            ty::REGISTER => {
                let role = match r.u8("role")? {
                    0 => Role::Client,
                    1 => Role::Relay,
                    2 => Role::Sender,
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "role",
                            value: v as u32,
                        })
                    }
                };
                ClientToRelay::Register(Register {
                    role,
                    relay_key: r.address("relay_key")?,
                    client_key: r.address("client_key")?,
                    client_nonce: r.array("client_nonce")?,
                    timestamp_ms: r.u64("timestamp")?,
                    url: r.string("url", MAX_URL_LEN)?,
                    sig_a: r.array("sig_a")?,
                })
            }
            ty::CONFIRM => ClientToRelay::Confirm(Confirm {
                sig_c: r.array("sig_c")?,
            }),
            ty::MSG => return decode_msg(&mut r).map(ClientToRelay::Msg),
            ty::ACK => {
                let n = r.u16("ack count")? as usize;
                if n > MAX_ACK_IDS {
                    return Err(DecodeError::TooLong {
                        field: "ack ids",
                        len: n,
                        max: MAX_ACK_IDS,
                    });
                }
                if r.remaining() < n * 16 {
                    return Err(DecodeError::Truncated {
                        field: "ack ids",
                        need: n * 16,
                        have: r.remaining(),
                    });
                }
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(MsgId(r.array("ack id")?));
                }
                ClientToRelay::Ack(ids)
            }
            ty::REQUEST => {
                let req_id = r.u32("req_id")?;
                let op = match r.u8("op")? {
                    RequestOp::ONLINE => RequestOp::Online {
                        offset: r.u32("offset")?,
                        limit: r.u16("limit")?,
                    },
                    RequestOp::LOOKUP => RequestOp::Lookup(r.address("address")?),
                    RequestOp::PRESENCE => RequestOp::Presence(flag(&mut r, "on")?),
                    RequestOp::GROUP => RequestOp::Group(crate::group::GroupOp::read(&mut r)?),
                    RequestOp::GROUP_INFO => {
                        RequestOp::GroupInfo(r.string("group name", crate::group::MAX_NAME)?)
                    }
                    RequestOp::EXCLUSIVE => RequestOp::Exclusive,
                    other => return Err(DecodeError::UnknownOp(other)),
                };
                ClientToRelay::Request(Request { req_id, op })
            }
            ty::CHALLENGE
            | ty::COUNTERSIGN
            | ty::REPLY_BACK
            | ty::RECEIPT
            | ty::RESPONSE
            | ty::NOTICE
            | ty::ERROR => return Err(DecodeError::WrongDirection(t)),
            t if is_s2s_type(t) => return Err(DecodeError::WrongDirection(t)),
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(out)
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(128);
        match self {
            ClientToRelay::Register(m) => {
                head(&mut b, ty::REGISTER);
                b.put_u8(m.role as u8);
                b.put_slice(&m.relay_key.0);
                b.put_slice(&m.client_key.0);
                b.put_slice(&m.client_nonce);
                b.put_u64(m.timestamp_ms);
                put_string(&mut b, &m.url, MAX_URL_LEN);
                b.put_slice(&m.sig_a);
            }
            ClientToRelay::Confirm(m) => {
                head(&mut b, ty::CONFIRM);
                b.put_slice(&m.sig_c);
            }
            ClientToRelay::Msg(m) => return m.encode(),
            ClientToRelay::Ack(ids) => {
                head(&mut b, ty::ACK);
                let ids = &ids[..ids.len().min(MAX_ACK_IDS)];
                b.put_u16(ids.len() as u16);
                for id in ids {
                    b.put_slice(&id.0);
                }
            }
            ClientToRelay::Request(m) => {
                head(&mut b, ty::REQUEST);
                b.put_u32(m.req_id);
                b.put_u8(m.op.code());
                match &m.op {
                    RequestOp::Online { offset, limit } => {
                        b.put_u32(*offset);
                        b.put_u16(*limit);
                    }
                    RequestOp::Lookup(a) => b.put_slice(&a.0),
                    RequestOp::Presence(on) => b.put_u8(*on as u8),
                    RequestOp::Group(op) => op.write(&mut b),
                    RequestOp::GroupInfo(name) => put_string(&mut b, name, crate::group::MAX_NAME),
                    RequestOp::Exclusive => {}
                }
            }
        }
        b.freeze()
    }
}

impl RelayToClient {
    /// Decodes one frame received by a client. Never panics on any input.
    pub fn decode(frame: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(frame);
        let t = preamble(&mut r)?;
        let out = match t {
            ty::CHALLENGE => RelayToClient::Challenge(Challenge {
                relay_key: r.address("relay_key")?,
                relay_nonce: r.array("relay_nonce")?,
            }),
            ty::COUNTERSIGN => RelayToClient::Countersign(Countersign {
                sig_b: r.array("sig_b")?,
            }),
            ty::REPLY_BACK => RelayToClient::ReplyBack(ReplyBack {
                address: r.address("address")?,
                relay_time_ms: r.u64("relay_time")?,
                relay_url: r.string("relay_url", MAX_URL_LEN)?,
            }),
            ty::MSG => return decode_msg(&mut r).map(RelayToClient::Msg),
            ty::RECEIPT => {
                let id = MsgId(r.array("id")?);
                let st = status(&mut r, "status")?;
                let reason = r.u16("reason")?;
                let delivered = r.u32("delivered")?;
                let entries = receipt_entries(&mut r)?;
                RelayToClient::Receipt(Receipt {
                    id,
                    status: st,
                    reason,
                    delivered,
                    entries,
                })
            }
            ty::RESPONSE => {
                let req_id = r.u32("req_id")?;
                let op = r.u8("op")?;
                let st = r.u16("status")?;
                let result = if st != 0 {
                    Err(st)
                } else {
                    Ok(match op {
                        RequestOp::ONLINE => {
                            let total = r.u32("total")?;
                            let addresses = r.address_list("addresses")?;
                            ResponseBody::Online { total, addresses }
                        }
                        RequestOp::LOOKUP => {
                            if !flag(&mut r, "found")? {
                                ResponseBody::Lookup(None)
                            } else {
                                ResponseBody::Lookup(Some(Hosted {
                                    relay_key: r.address("relay_key")?,
                                    relay_url: r.string("relay_url", MAX_URL_LEN)?,
                                }))
                            }
                        }
                        RequestOp::PRESENCE => ResponseBody::Presence,
                        RequestOp::GROUP | RequestOp::GROUP_INFO => {
                            ResponseBody::Group(crate::group::GroupInfo::read(&mut r)?)
                        }
                        RequestOp::EXCLUSIVE => ResponseBody::Exclusive {
                            closed: r.u32("closed")?,
                        },
                        other => return Err(DecodeError::UnknownOp(other)),
                    })
                };
                RelayToClient::Response(Response { req_id, op, result })
            }
            ty::NOTICE => RelayToClient::Notice(match r.u8("kind")? {
                1 => Notice::Join(r.address("address")?),
                2 => Notice::Leave(r.address("address")?),
                3 => Notice::Replaced,
                4 => Notice::ShuttingDown,
                5 => Notice::Delivered {
                    id: MsgId(r.array("id")?),
                    to: r.address("to")?,
                },
                v => {
                    return Err(DecodeError::BadValue {
                        field: "notice kind",
                        value: v as u32,
                    })
                }
            }),
            ty::ERROR => RelayToClient::Error(ErrorFrame {
                code: r.u16("code")?,
                detail: r.string("detail", MAX_DETAIL_LEN)?,
            }),
            ty::REGISTER | ty::CONFIRM | ty::REQUEST | ty::ACK => {
                return Err(DecodeError::WrongDirection(t))
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(out)
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(128);
        match self {
            RelayToClient::Challenge(m) => {
                head(&mut b, ty::CHALLENGE);
                b.put_slice(&m.relay_key.0);
                b.put_slice(&m.relay_nonce);
            }
            RelayToClient::Countersign(m) => {
                head(&mut b, ty::COUNTERSIGN);
                b.put_slice(&m.sig_b);
            }
            RelayToClient::ReplyBack(m) => {
                head(&mut b, ty::REPLY_BACK);
                b.put_slice(&m.address.0);
                b.put_u64(m.relay_time_ms);
                put_string(&mut b, &m.relay_url, MAX_URL_LEN);
            }
            RelayToClient::Msg(m) => return m.encode(),
            RelayToClient::Receipt(m) => {
                head(&mut b, ty::RECEIPT);
                b.put_slice(&m.id.0);
                b.put_u8(m.status as u8);
                b.put_u16(m.reason);
                b.put_u32(m.delivered);
                put_receipt_entries(&mut b, &m.entries);
            }
            RelayToClient::Response(m) => {
                head(&mut b, ty::RESPONSE);
                b.put_u32(m.req_id);
                // A successful body determines the op byte.
                b.put_u8(match &m.result {
                    Ok(body) => body.op(),
                    Err(_) => m.op,
                });
                match &m.result {
                    Err(code) => b.put_u16(*code),
                    Ok(body) => {
                        b.put_u16(0);
                        match body {
                            ResponseBody::Online { total, addresses } => {
                                b.put_u32(*total);
                                b.put_u16(addresses.len() as u16);
                                for a in addresses {
                                    b.put_slice(&a.0);
                                }
                            }
                            ResponseBody::Lookup(None) => b.put_u8(0),
                            ResponseBody::Lookup(Some(h)) => {
                                b.put_u8(1);
                                b.put_slice(&h.relay_key.0);
                                put_string(&mut b, &h.relay_url, MAX_URL_LEN);
                            }
                            ResponseBody::Presence => {}
                            ResponseBody::Group(g) => g.write(&mut b),
                            ResponseBody::Exclusive { closed } => b.put_u32(*closed),
                        }
                    }
                }
            }
            RelayToClient::Notice(n) => {
                head(&mut b, ty::NOTICE);
                match n {
                    Notice::Join(a) => {
                        b.put_u8(1);
                        b.put_slice(&a.0);
                    }
                    Notice::Leave(a) => {
                        b.put_u8(2);
                        b.put_slice(&a.0);
                    }
                    Notice::Replaced => b.put_u8(3),
                    Notice::ShuttingDown => b.put_u8(4),
                    Notice::Delivered { id, to } => {
                        b.put_u8(5);
                        b.put_slice(&id.0);
                        b.put_slice(&to.0);
                    }
                }
            }
            RelayToClient::Error(e) => {
                head(&mut b, ty::ERROR);
                b.put_u16(e.code);
                put_string(&mut b, &e.detail, MAX_DETAIL_LEN);
            }
        }
        b.freeze()
    }
}

impl Msg {
    /// Length of the header before the payload.
    pub fn header_len(&self) -> usize {
        MSG_FIXED_HEADER
            + match &self.dest {
                Dest::A2a => 0,
                Dest::A2b(_) => 32,
                Dest::A2g(l) => 2 + 32 * l.len(),
                Dest::A2n(_) => 1,
                Dest::Group(n) => 1 + n.len().min(crate::group::MAX_NAME),
            }
    }

    /// Encodes the frame. Panics only if an a2g list exceeds 65,535 entries,
    /// which no caller can send (the frame would exceed every size limit).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.header_len() + self.payload.len());
        head(&mut b, ty::MSG);
        b.put_u8(self.dest.route() as u8);
        b.put_u8(self.flags);
        b.put_slice(&self.id.0);
        b.put_slice(&self.from.0);
        match &self.dest {
            Dest::A2a => {}
            Dest::A2b(to) => b.put_slice(&to.0),
            Dest::A2g(list) => {
                let n = u16::try_from(list.len()).expect("a2g list longer than 65535");
                b.put_u16(n);
                for a in list {
                    b.put_slice(&a.0);
                }
            }
            Dest::A2n(scope) => b.put_u8(*scope as u8),
            Dest::Group(name) => {
                let n = &name.as_bytes()[..name.len().min(crate::group::MAX_NAME)];
                b.put_u8(n.len() as u8);
                b.put_slice(n);
            }
        }
        b.put_slice(&self.payload);
        b.freeze()
    }
}

pub(crate) fn head(b: &mut BytesMut, t: u8) {
    b.put_u8(PROTOCOL_VERSION);
    b.put_u8(t);
}

/// Writes a length-prefixed string, cut (at a character boundary) to
/// `max` bytes so that the decoder's limit always accepts what we encode.
pub(crate) fn put_string(b: &mut BytesMut, s: &str, max: usize) {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    b.put_u16(cut as u16);
    b.put_slice(&s.as_bytes()[..cut]);
}

pub(crate) fn flag(r: &mut Reader<'_>, field: &'static str) -> Result<bool, DecodeError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::BadValue {
            field,
            value: v as u32,
        }),
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Frame types 0x40–0x4a belong to relay-to-relay links (`crate::s2s::ty`).
pub fn is_s2s_type(t: u8) -> bool {
    (0x40..=0x4a).contains(&t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(b: u8) -> Address {
        Address([b; 32])
    }

    fn sample_c2r() -> Vec<ClientToRelay> {
        vec![
            ClientToRelay::Register(Register {
                role: Role::Client,
                relay_key: addr(12),
                client_key: addr(1),
                client_nonce: [2; 32],
                timestamp_ms: 1_700_000_000_000,
                url: "ws://127.0.0.1:7777/".into(),
                sig_a: [3; 64],
            }),
            ClientToRelay::Confirm(Confirm { sig_c: [4; 64] }),
            ClientToRelay::Msg(Msg {
                flags: 0,
                id: MsgId([5; 16]),
                from: addr(6),
                dest: Dest::A2g(vec![addr(7), addr(8)]),
                payload: Bytes::from_static(b"hello"),
            }),
            ClientToRelay::Msg(Msg {
                flags: 1,
                id: MsgId([5; 16]),
                from: addr(6),
                dest: Dest::A2n(Scope::Federation),
                payload: Bytes::new(),
            }),
            ClientToRelay::Request(Request {
                req_id: 9,
                op: RequestOp::Online {
                    offset: 0,
                    limit: 100,
                },
            }),
            ClientToRelay::Request(Request {
                req_id: 10,
                op: RequestOp::Lookup(addr(11)),
            }),
            ClientToRelay::Ack(vec![MsgId([1; 16]), MsgId([2; 16])]),
        ]
    }

    fn sample_r2c() -> Vec<RelayToClient> {
        vec![
            RelayToClient::Challenge(Challenge {
                relay_key: addr(1),
                relay_nonce: [2; 32],
            }),
            RelayToClient::Countersign(Countersign { sig_b: [3; 64] }),
            RelayToClient::ReplyBack(ReplyBack {
                address: addr(4),
                relay_time_ms: 5,
                relay_url: "wss://relay.example/".into(),
            }),
            RelayToClient::Receipt(Receipt {
                id: MsgId([6; 16]),
                status: Status::Partial,
                reason: 0,
                delivered: 1,
                entries: vec![
                    ReceiptEntry {
                        to: addr(7),
                        status: Status::Delivered,
                        reason: 0,
                    },
                    ReceiptEntry {
                        to: addr(8),
                        status: Status::NoRoute,
                        reason: ErrorCode::NoRoute.as_u16(),
                    },
                ],
            }),
            RelayToClient::Response(Response {
                req_id: 1,
                op: 1,
                result: Ok(ResponseBody::Online {
                    total: 2,
                    addresses: vec![addr(1), addr(2)],
                }),
            }),
            RelayToClient::Response(Response {
                req_id: 2,
                op: 2,
                result: Ok(ResponseBody::Lookup(Some(Hosted {
                    relay_key: addr(3),
                    relay_url: "ws://x/".into(),
                }))),
            }),
            RelayToClient::Response(Response {
                req_id: 3,
                op: 2,
                result: Err(ErrorCode::UnknownOp.as_u16()),
            }),
            RelayToClient::Notice(Notice::Join(addr(9))),
            RelayToClient::Notice(Notice::Replaced),
            RelayToClient::Error(ErrorFrame::new(ErrorCode::RateLimited, "slow down")),
        ]
    }

    #[test]
    fn round_trip_samples() {
        for f in sample_c2r() {
            assert_eq!(ClientToRelay::decode(&f.encode()).unwrap(), f);
        }
        for f in sample_r2c() {
            assert_eq!(RelayToClient::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for f in sample_c2r() {
            let full = f.encode();
            for cut in 0..full.len() {
                // A MSG frame cut inside its payload is still a (shorter) MSG.
                if let ClientToRelay::Msg(m) = &f {
                    if cut >= m.header_len() {
                        continue;
                    }
                }
                let e = ClientToRelay::decode(&full.slice(..cut)).unwrap_err();
                assert_eq!(e.code(), ErrorCode::Malformed, "cut {cut} of {f:?}: {e}");
            }
        }
        for f in sample_r2c() {
            let full = f.encode();
            for cut in 0..full.len() {
                assert!(RelayToClient::decode(&full.slice(..cut)).is_err());
            }
        }
    }

    #[test]
    fn msg_payload_shares_the_frame_buffer() {
        let frame = sample_c2r()[2].encode();
        let ClientToRelay::Msg(m) = ClientToRelay::decode(&frame).unwrap() else {
            panic!("not a msg")
        };
        let start = frame.as_ptr() as usize;
        let p = m.payload.as_ptr() as usize;
        assert!(p >= start && p < start + frame.len(), "payload was copied");
    }

    #[test]
    fn specific_errors() {
        let b = |v: &[u8]| Bytes::copy_from_slice(v);
        assert_eq!(
            ClientToRelay::decode(&b(&[2, ty::MSG])).unwrap_err(),
            DecodeError::UnsupportedVersion(2)
        );
        assert_eq!(
            ClientToRelay::decode(&b(&[1, 0x77])).unwrap_err(),
            DecodeError::UnknownType(0x77)
        );
        assert_eq!(
            ClientToRelay::decode(&b(&[1, ty::CHALLENGE])).unwrap_err(),
            DecodeError::WrongDirection(ty::CHALLENGE)
        );
        let mut m = sample_c2r()[2].encode().to_vec();
        m[2] = 9;
        assert_eq!(
            ClientToRelay::decode(&Bytes::from(m)).unwrap_err(),
            DecodeError::UnknownRoute(9)
        );
        let mut c = ClientToRelay::Confirm(Confirm { sig_c: [0; 64] })
            .encode()
            .to_vec();
        c.push(0);
        assert_eq!(
            ClientToRelay::decode(&Bytes::from(c)).unwrap_err(),
            DecodeError::TrailingBytes(1)
        );
        // Booleans are exactly 0 or 1, so decode → encode is the identity.
        assert!(matches!(
            ClientToRelay::decode(&b(&[1, ty::REQUEST, 0, 0, 0, 1, 3, 2])).unwrap_err(),
            DecodeError::BadValue { field: "on", .. }
        ));
        // A list count far larger than the frame must fail before allocating.
        let mut g = vec![1, ty::MSG, 3, 0];
        g.extend([0; 48]);
        g.extend([0xff, 0xff]);
        assert!(matches!(
            ClientToRelay::decode(&Bytes::from(g)).unwrap_err(),
            DecodeError::Truncated { field: "group", .. }
        ));
    }

    fn arb_addr() -> impl Strategy<Value = Address> {
        any::<[u8; 32]>().prop_map(Address)
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        let dest = prop_oneof![
            Just(Dest::A2a),
            arb_addr().prop_map(Dest::A2b),
            proptest::collection::vec(arb_addr(), 0..8).prop_map(Dest::A2g),
            prop_oneof![Just(Scope::Relay), Just(Scope::Federation)].prop_map(Dest::A2n),
        ];
        (
            any::<u8>(),
            any::<[u8; 16]>(),
            arb_addr(),
            dest,
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(flags, id, from, dest, payload)| Msg {
                flags,
                id: MsgId(id),
                from,
                dest,
                payload: Bytes::from(payload),
            })
    }

    proptest! {
        #[test]
        fn msg_round_trips(m in arb_msg()) {
            let enc = m.encode();
            prop_assert_eq!(enc.len(), m.header_len() + m.payload.len());
            prop_assert_eq!(ClientToRelay::decode(&enc).unwrap(), ClientToRelay::Msg(m.clone()));
            prop_assert_eq!(RelayToClient::decode(&enc).unwrap(), RelayToClient::Msg(m));
        }

        #[test]
        fn register_round_trips(
            nonce in any::<[u8; 32]>(),
            ts in any::<u64>(),
            url in "[a-z:/.0-9]{0,80}",
            relay in any::<bool>(),
        ) {
            let f = ClientToRelay::Register(Register {
                role: if relay { Role::Relay } else { Role::Client },
                relay_key: Address([1; 32]),
                client_key: Address(nonce),
                client_nonce: nonce,
                timestamp_ms: ts,
                url,
                sig_a: [9; 64],
            });
            prop_assert_eq!(ClientToRelay::decode(&f.encode()).unwrap(), f);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let b = Bytes::from(data);
            let _ = ClientToRelay::decode(&b);
            let _ = RelayToClient::decode(&b);
        }

        #[test]
        fn valid_preamble_random_body_never_panics(
            t in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut v = vec![PROTOCOL_VERSION, t];
            v.extend(body);
            let b = Bytes::from(v);
            let _ = ClientToRelay::decode(&b);
            let _ = RelayToClient::decode(&b);
        }
    }
}
