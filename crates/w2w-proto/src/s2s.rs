//! Relay-to-relay (s2s) frames, used on a peer link after two relays have
//! authenticated each other with the sigA → sigB → sigC handshake
//! (role = relay).
//!
//! Federation is link-state routing over relays plus a signed directory of
//! addresses:
//!
//! * LINK_STATE — a relay's signed list of its current peers, flooded to
//!   every relay. Each relay builds the relay graph (an edge counts only if
//!   both ends list it) and computes shortest paths by BFS.
//! * PRESENCE — "address X is (or was) registered at relay R". The client's
//!   own sigA from its registration is the proof: it signs the relay key, the
//!   relay URL and a timestamp, so no relay can claim an address that never
//!   registered with it. The hosting relay countersigns whether the client
//!   is online or has left. The newest timestamp wins; at equal timestamps
//!   "left" wins.
//! * FORWARD — a client's MSG frame, unchanged, wrapped with the origin
//!   relay, a hop count and the target (one relay and its recipients, or a
//!   federation-wide broadcast).
//! * FWD_RECEIPT — the target relay's per-recipient outcome, routed back to
//!   the origin relay, which answers the sender.
//! * REDIRECT — "I am at my peer limit; dial one of these instead".
//! * DIR_PUT, DIR_GET, DIR_ANSWER — the partitioned directory (PROTOCOL
//!   12.12): an address's records live on the few relays whose keys are
//!   closest to it (XOR), not everywhere. A hosting relay puts its records
//!   there (and renews them: they are leases), a sender's relay asks
//!   there. Each is routed to one relay along link-state paths.
//! * GROUP_PUT, GROUP_GET, GROUP_ANSWER — named groups across relays
//!   (PROTOCOL 12.14): a group's record ("group `name` lives on relay H",
//!   signed by H) is placed like an address's, at the relays closest to
//!   the hash of its name; a relay whose client names a group it does not
//!   host finds H there and asks H for the group's state or hands it a
//!   signed operation.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{
    flag, head, preamble, put_receipt_entries, put_string, receipt_entries, DecodeError, MsgId,
    ReceiptEntry, Register, Role, MAX_URL_LEN,
};
use crate::group::{GroupInfo, GroupOp, MAX_NAME};
use crate::handshake::sig_a_message;
use crate::identity::{Address, Identity, SignatureError};

/// s2s frame type bytes.
pub mod ty {
    pub const LINK_STATE: u8 = 0x40;
    pub const PRESENCE: u8 = 0x41;
    pub const FORWARD: u8 = 0x42;
    pub const FWD_RECEIPT: u8 = 0x43;
    pub const REDIRECT: u8 = 0x44;
    pub const DIR_PUT: u8 = 0x45;
    pub const DIR_GET: u8 = 0x46;
    pub const DIR_ANSWER: u8 = 0x47;
    pub const GROUP_PUT: u8 = 0x48;
    pub const GROUP_GET: u8 = 0x49;
    pub const GROUP_ANSWER: u8 = 0x4a;
}

/// Whether `t` is an s2s frame type (the range is the frame module's, so
/// that module needs nothing from this one).
pub use crate::frame::is_s2s_type;

pub const LINK_STATE_DOMAIN: &[u8] = b"w2w/v1 link-state\0";
pub const PRESENCE_DOMAIN: &[u8] = b"w2w/v1 presence\0";
pub const GROUP_RECORD_DOMAIN: &[u8] = b"w2w/v1 group-record\0";
pub const GROUP_KEY_DOMAIN: &[u8] = b"w2w/v1 group-key\0";

/// Most peers one link-state record may list.
pub const MAX_NEIGHBORS: usize = 256;
/// Most URLs in a REDIRECT.
pub const MAX_REDIRECT: usize = 16;
/// Most records in one DIR_PUT or DIR_ANSWER.
pub const MAX_DIR_RECORDS: usize = 64;

/// A relay's signed statement of who its peers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub relay: Address,
    pub url: String,
    /// Strictly increasing per relay (milliseconds since the epoch at
    /// creation, bumped if needed), so a restarted relay's record wins.
    pub seq: u64,
    pub neighbors: Vec<Address>,
    pub sig: [u8; 64],
}

impl LinkState {
    fn signed_bytes(relay: &Address, url: &str, seq: u64, neighbors: &[Address]) -> Vec<u8> {
        let mut m = Vec::with_capacity(
            LINK_STATE_DOMAIN.len() + 32 + 2 + url.len() + 10 + 32 * neighbors.len(),
        );
        m.extend_from_slice(LINK_STATE_DOMAIN);
        m.extend_from_slice(&relay.0);
        m.extend_from_slice(&(url.len() as u16).to_be_bytes());
        m.extend_from_slice(url.as_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&(neighbors.len() as u16).to_be_bytes());
        for n in neighbors {
            m.extend_from_slice(&n.0);
        }
        m
    }

    pub fn sign(relay: &Identity, url: &str, seq: u64, mut neighbors: Vec<Address>) -> Self {
        neighbors.sort_unstable();
        neighbors.dedup();
        neighbors.truncate(MAX_NEIGHBORS);
        let mut cut = url.len().min(MAX_URL_LEN);
        while !url.is_char_boundary(cut) {
            cut -= 1;
        }
        let url = url[..cut].to_owned();
        let me = relay.address();
        let sig = relay.sign(&Self::signed_bytes(&me, &url, seq, &neighbors));
        LinkState {
            relay: me,
            url,
            seq,
            neighbors,
            sig,
        }
    }

    pub fn verify(&self) -> Result<(), SignatureError> {
        self.relay.verify(
            &Self::signed_bytes(&self.relay, &self.url, self.seq, &self.neighbors),
            &self.sig,
        )
    }
}

/// The fields of a client's REGISTER that its sigA covers: a proof that
/// `address` registered with `relay_key` at `timestamp_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationProof {
    pub address: Address,
    pub relay_key: Address,
    pub relay_nonce: [u8; 32],
    pub client_nonce: [u8; 32],
    pub timestamp_ms: u64,
    pub url: String,
    pub sig_a: [u8; 64],
}

impl RegistrationProof {
    /// Checks sigA over the rebuilt registration transcript.
    pub fn verify(&self) -> Result<(), SignatureError> {
        let reg = Register {
            role: Role::Client,
            relay_key: self.relay_key,
            client_key: self.address,
            client_nonce: self.client_nonce,
            timestamp_ms: self.timestamp_ms,
            url: self.url.clone(),
            sig_a: self.sig_a,
        };
        self.address
            .verify(&sig_a_message(&reg, &self.relay_nonce), &self.sig_a)
    }
}

/// A directory record: the client's proof plus the hosting relay's
/// statement that the client is online (or has left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub proof: RegistrationProof,
    pub online: bool,
    /// The hosting relay's number for this record: greater for every
    /// record it publishes, across restarts (PROTOCOL 12.5). It orders one
    /// relay's records for an address, so a client's clock does not.
    pub seq: u64,
    /// The hosting relay's clock (ms since the Unix epoch) when the
    /// registration was accepted (0: not known, a record restored after a
    /// restart). It orders the address's records of different relays: the
    /// client's `timestamp_ms` is the client's clock and may be off by a
    /// minute either way (PROTOCOL 12.5).
    pub since_ms: u64,
    /// By `proof.relay_key` over PRESENCE_DOMAIN || address || timestamp ||
    /// online || seq || since_ms.
    pub relay_sig: [u8; 64],
}

/// Why a presence record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("the client's sigA does not verify (forged presence)")]
    BadClientSignature,
    #[error("the hosting relay's signature does not verify")]
    BadRelaySignature,
}

impl Presence {
    fn relay_signed_bytes(p: &RegistrationProof, online: bool, seq: u64, since_ms: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(PRESENCE_DOMAIN.len() + 32 + 8 + 1 + 8 + 8);
        m.extend_from_slice(PRESENCE_DOMAIN);
        m.extend_from_slice(&p.address.0);
        m.extend_from_slice(&p.timestamp_ms.to_be_bytes());
        m.push(online as u8);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&since_ms.to_be_bytes());
        m
    }

    /// The hosting relay's record number `seq` for one of its clients,
    /// registered at `since_ms` by the relay's clock.
    pub fn sign(
        relay: &Identity,
        proof: RegistrationProof,
        online: bool,
        seq: u64,
        since_ms: u64,
    ) -> Self {
        let relay_sig = relay.sign(&Self::relay_signed_bytes(&proof, online, seq, since_ms));
        Presence {
            proof,
            online,
            seq,
            since_ms,
            relay_sig,
        }
    }

    /// Orders an address's records of different relays, newest
    /// registration greatest: by the hosting relays' clocks, then the
    /// client's, then the relay key (a total order every relay agrees on).
    pub fn newness(&self) -> (u64, u64, Address) {
        (self.since_ms, self.proof.timestamp_ms, self.proof.relay_key)
    }

    pub fn verify(&self) -> Result<(), PresenceError> {
        self.proof
            .verify()
            .map_err(|_| PresenceError::BadClientSignature)?;
        self.proof
            .relay_key
            .verify(
                &Self::relay_signed_bytes(&self.proof, self.online, self.seq, self.since_ms),
                &self.relay_sig,
            )
            .map_err(|_| PresenceError::BadRelaySignature)
    }

    /// Orders one relay's records for an address: the later it published,
    /// the newer (its `seq`; the client's clock plays no part).
    pub fn rank(&self) -> u64 {
        self.seq
    }
}

/// Where a FORWARD goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardTarget {
    /// To `relay`, for delivery to these of its clients.
    Relay { relay: Address, to: Vec<Address> },
    /// To every relay, for delivery to all their clients (a2n federation).
    Broadcast,
    /// To `relay`, for `to`, a client of it: a message the origin stored
    /// for `to` and now hands over (custody, or `to` moved there;
    /// PROTOCOL 12.13). Outside the seen cache: a hand-off that failed
    /// is tried again with the same bytes.
    Handoff { relay: Address, to: Address },
}

/// A client MSG travelling between relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub origin: Address,
    pub hops: u8,
    pub target: ForwardTarget,
    /// The client's MSG frame, byte for byte.
    pub msg: Bytes,
}

/// A target relay's outcome for a FORWARD, routed back to `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwdReceipt {
    pub origin: Address,
    pub reporter: Address,
    pub id: MsgId,
    pub hops: u8,
    pub delivered: u32,
    pub entries: Vec<ReceiptEntry>,
}

/// Records for relay `target` to keep (it is among the relays that hold
/// their addresses, or hosts one of them too): leases, renewed by the
/// hosting relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPut {
    pub target: Address,
    pub hops: u8,
    pub records: Vec<Presence>,
}

/// "Which relays is `address` registered with?", from relay `origin` to
/// relay `target`; `nonce` pairs the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGet {
    pub origin: Address,
    pub target: Address,
    pub hops: u8,
    pub nonce: u64,
    pub address: Address,
}

/// `reporter`'s records of `address` (none: it holds none), routed back to
/// the `origin` of the DIR_GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirAnswer {
    pub origin: Address,
    pub reporter: Address,
    pub hops: u8,
    pub nonce: u64,
    pub address: Address,
    pub records: Vec<Presence>,
}

/// Where a named group's records are placed: SHA-256 of
/// `GROUP_KEY_DOMAIN || name`, read as a key of the address space.
pub fn group_key(name: &str) -> Address {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(GROUP_KEY_DOMAIN);
    h.update(name.as_bytes());
    Address(h.finalize().into())
}

/// "Group `name` lives on relay `relay`", signed by that relay: a lease
/// placed like an address's records (PROTOCOL 12.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub name: String,
    pub relay: Address,
    /// The relay's record number: greater for every record it publishes.
    pub seq: u64,
    /// The relay's clock (ms since the Unix epoch) when the group was
    /// created there; 0 for a group older than the record (kept across
    /// restarts). Of two relays claiming one name, the smaller
    /// `(since_ms, relay)` holds it.
    pub since_ms: u64,
    pub sig: [u8; 64],
}

impl GroupRecord {
    fn signed_bytes(name: &str, relay: &Address, seq: u64, since_ms: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(GROUP_RECORD_DOMAIN.len() + 1 + name.len() + 48);
        m.extend_from_slice(GROUP_RECORD_DOMAIN);
        m.push(name.len() as u8);
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&relay.0);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&since_ms.to_be_bytes());
        m
    }

    pub fn sign(relay: &Identity, name: &str, seq: u64, since_ms: u64) -> Self {
        let me = relay.address();
        let sig = relay.sign(&Self::signed_bytes(name, &me, seq, since_ms));
        GroupRecord {
            name: name.to_owned(),
            relay: me,
            seq,
            since_ms,
            sig,
        }
    }

    pub fn verify(&self) -> Result<(), SignatureError> {
        self.relay.verify(
            &Self::signed_bytes(&self.name, &self.relay, self.seq, self.since_ms),
            &self.sig,
        )
    }

    /// Of two relays' records for one name the smaller holds it.
    pub fn precedence(&self) -> (u64, Address) {
        (self.since_ms, self.relay)
    }
}

/// Group records for relay `target` to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPut {
    pub target: Address,
    pub hops: u8,
    pub records: Vec<GroupRecord>,
}

/// What a GROUP_GET asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupQuery {
    /// Kind 1, to a relay that holds the name's records: which relay hosts
    /// group `name`?
    Locate(String),
    /// Kind 2, to the group's relay: its state, for `asker` (a client of
    /// the origin; the state is shown to members only).
    Info { name: String, asker: Address },
    /// Kind 3, to the group's relay: apply this signed operation (its
    /// actor is a client of the origin).
    Op(GroupOp),
}

impl GroupQuery {
    pub fn name(&self) -> &str {
        match self {
            GroupQuery::Locate(n) | GroupQuery::Info { name: n, .. } => n,
            GroupQuery::Op(op) => &op.name,
        }
    }
}

/// A question about a named group from relay `origin` to relay `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGet {
    pub origin: Address,
    pub target: Address,
    pub hops: u8,
    pub nonce: u64,
    pub query: GroupQuery,
}

/// What a GROUP_ANSWER says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupReply {
    /// Kind 1: the records of the name the reporter holds (none: it holds
    /// none).
    Located(Vec<GroupRecord>),
    /// Kind 2: the group's state after the query (`Ok`), or the error
    /// code that refused it.
    State(Result<GroupInfo, u16>),
}

/// `reporter`'s answer to a GROUP_GET, routed back to its `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAnswer {
    pub origin: Address,
    pub reporter: Address,
    pub hops: u8,
    pub nonce: u64,
    pub name: String,
    pub reply: GroupReply,
}

/// Frames on a peer link (both directions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayToRelay {
    LinkState(LinkState),
    Presence(Presence),
    Forward(Forward),
    FwdReceipt(FwdReceipt),
    Redirect(Vec<String>),
    DirPut(DirPut),
    DirGet(DirGet),
    DirAnswer(DirAnswer),
    GroupPut(GroupPut),
    GroupGet(GroupGet),
    GroupAnswer(GroupAnswer),
}

fn read_group_record(r: &mut crate::frame::Reader<'_>) -> Result<GroupRecord, DecodeError> {
    Ok(GroupRecord {
        name: r.string("group name", MAX_NAME)?,
        relay: r.address("relay")?,
        seq: r.u64("seq")?,
        since_ms: r.u64("since_ms")?,
        sig: r.array("sig")?,
    })
}

fn put_group_record(b: &mut BytesMut, g: &GroupRecord) {
    put_string(b, &g.name, MAX_NAME);
    b.put_slice(&g.relay.0);
    b.put_u64(g.seq);
    b.put_u64(g.since_ms);
    b.put_slice(&g.sig);
}

fn read_presence(r: &mut crate::frame::Reader<'_>) -> Result<Presence, DecodeError> {
    Ok(Presence {
        proof: RegistrationProof {
            address: r.address("address")?,
            relay_key: r.address("relay_key")?,
            relay_nonce: r.array("relay_nonce")?,
            client_nonce: r.array("client_nonce")?,
            timestamp_ms: r.u64("timestamp")?,
            url: r.string("url", MAX_URL_LEN)?,
            sig_a: r.array("sig_a")?,
        },
        online: flag(r, "online")?,
        seq: r.u64("seq")?,
        since_ms: r.u64("since_ms")?,
        relay_sig: r.array("relay_sig")?,
    })
}

fn put_presence(b: &mut BytesMut, p: &Presence) {
    let q = &p.proof;
    b.put_slice(&q.address.0);
    b.put_slice(&q.relay_key.0);
    b.put_slice(&q.relay_nonce);
    b.put_slice(&q.client_nonce);
    b.put_u64(q.timestamp_ms);
    put_string(b, &q.url, MAX_URL_LEN);
    b.put_slice(&q.sig_a);
    b.put_u8(p.online as u8);
    b.put_u64(p.seq);
    b.put_u64(p.since_ms);
    b.put_slice(&p.relay_sig);
}

/// A `u8`-counted list of records (at most [`MAX_DIR_RECORDS`]).
fn read_records<T>(
    r: &mut crate::frame::Reader<'_>,
    read: impl Fn(&mut crate::frame::Reader<'_>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let n = r.u8("record count")? as usize;
    if n > MAX_DIR_RECORDS {
        return Err(DecodeError::TooLong {
            field: "records",
            len: n,
            max: MAX_DIR_RECORDS,
        });
    }
    (0..n).map(|_| read(r)).collect()
}

fn put_records<T>(b: &mut BytesMut, records: &[T], put: impl Fn(&mut BytesMut, &T)) {
    let records = &records[..records.len().min(MAX_DIR_RECORDS)];
    b.put_u8(records.len() as u8);
    for x in records {
        put(b, x);
    }
}

impl RelayToRelay {
    /// Decodes one frame received on a peer link. Never panics.
    pub fn decode(frame: &Bytes) -> Result<Self, DecodeError> {
        use crate::frame::Reader;
        let mut r = Reader::new(frame);
        let t = preamble(&mut r)?;
        let out = match t {
            ty::LINK_STATE => {
                let relay = r.address("relay")?;
                let url = r.string("url", MAX_URL_LEN)?;
                let seq = r.u64("seq")?;
                let neighbors = r.address_list("neighbors")?;
                if neighbors.len() > MAX_NEIGHBORS {
                    return Err(DecodeError::TooLong {
                        field: "neighbors",
                        len: neighbors.len(),
                        max: MAX_NEIGHBORS,
                    });
                }
                RelayToRelay::LinkState(LinkState {
                    relay,
                    url,
                    seq,
                    neighbors,
                    sig: r.array("sig")?,
                })
            }
            ty::PRESENCE => RelayToRelay::Presence(read_presence(&mut r)?),
            ty::DIR_PUT => RelayToRelay::DirPut(DirPut {
                target: r.address("target")?,
                hops: r.u8("hops")?,
                records: read_records(&mut r, read_presence)?,
            }),
            ty::DIR_GET => RelayToRelay::DirGet(DirGet {
                origin: r.address("origin")?,
                target: r.address("target")?,
                hops: r.u8("hops")?,
                nonce: r.u64("nonce")?,
                address: r.address("address")?,
            }),
            ty::DIR_ANSWER => RelayToRelay::DirAnswer(DirAnswer {
                origin: r.address("origin")?,
                reporter: r.address("reporter")?,
                hops: r.u8("hops")?,
                nonce: r.u64("nonce")?,
                address: r.address("address")?,
                records: read_records(&mut r, read_presence)?,
            }),
            ty::GROUP_PUT => RelayToRelay::GroupPut(GroupPut {
                target: r.address("target")?,
                hops: r.u8("hops")?,
                records: read_records(&mut r, read_group_record)?,
            }),
            ty::GROUP_GET => {
                let (origin, target) = (r.address("origin")?, r.address("target")?);
                let (hops, nonce) = (r.u8("hops")?, r.u64("nonce")?);
                let query = match r.u8("query kind")? {
                    1 => GroupQuery::Locate(r.string("group name", MAX_NAME)?),
                    2 => GroupQuery::Info {
                        name: r.string("group name", MAX_NAME)?,
                        asker: r.address("asker")?,
                    },
                    3 => GroupQuery::Op(GroupOp::read(&mut r)?),
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "query kind",
                            value: v as u32,
                        })
                    }
                };
                RelayToRelay::GroupGet(GroupGet {
                    origin,
                    target,
                    hops,
                    nonce,
                    query,
                })
            }
            ty::GROUP_ANSWER => {
                let (origin, reporter) = (r.address("origin")?, r.address("reporter")?);
                let (hops, nonce) = (r.u8("hops")?, r.u64("nonce")?);
                let name = r.string("group name", MAX_NAME)?;
                let reply = match r.u8("reply kind")? {
                    1 => GroupReply::Located(read_records(&mut r, read_group_record)?),
                    2 => GroupReply::State(match r.u16("status")? {
                        0 => Ok(GroupInfo::read(&mut r)?),
                        code => Err(code),
                    }),
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "reply kind",
                            value: v as u32,
                        })
                    }
                };
                RelayToRelay::GroupAnswer(GroupAnswer {
                    origin,
                    reporter,
                    hops,
                    nonce,
                    name,
                    reply,
                })
            }
            ty::FORWARD => {
                let origin = r.address("origin")?;
                let hops = r.u8("hops")?;
                let target = match r.u8("target kind")? {
                    1 => ForwardTarget::Relay {
                        relay: r.address("target relay")?,
                        to: r.address_list("recipients")?,
                    },
                    2 => ForwardTarget::Broadcast,
                    3 => ForwardTarget::Handoff {
                        relay: r.address("target relay")?,
                        to: r.address("recipient")?,
                    },
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "target kind",
                            value: v as u32,
                        })
                    }
                };
                return Ok(RelayToRelay::Forward(Forward {
                    origin,
                    hops,
                    target,
                    msg: r.rest(),
                }));
            }
            ty::FWD_RECEIPT => {
                let origin = r.address("origin")?;
                let reporter = r.address("reporter")?;
                let id = MsgId(r.array("id")?);
                let hops = r.u8("hops")?;
                let delivered = r.u32("delivered")?;
                let entries = receipt_entries(&mut r)?;
                RelayToRelay::FwdReceipt(FwdReceipt {
                    origin,
                    reporter,
                    id,
                    hops,
                    delivered,
                    entries,
                })
            }
            ty::REDIRECT => {
                let n = r.u8("count")? as usize;
                if n > MAX_REDIRECT {
                    return Err(DecodeError::TooLong {
                        field: "redirect urls",
                        len: n,
                        max: MAX_REDIRECT,
                    });
                }
                let mut urls = Vec::with_capacity(n);
                for _ in 0..n {
                    urls.push(r.string("url", MAX_URL_LEN)?);
                }
                RelayToRelay::Redirect(urls)
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(out)
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(256);
        match self {
            RelayToRelay::LinkState(ls) => {
                head(&mut b, ty::LINK_STATE);
                b.put_slice(&ls.relay.0);
                put_string(&mut b, &ls.url, MAX_URL_LEN);
                b.put_u64(ls.seq);
                b.put_u16(ls.neighbors.len() as u16);
                for n in &ls.neighbors {
                    b.put_slice(&n.0);
                }
                b.put_slice(&ls.sig);
            }
            RelayToRelay::Presence(p) => {
                head(&mut b, ty::PRESENCE);
                put_presence(&mut b, p);
            }
            RelayToRelay::DirPut(d) => {
                head(&mut b, ty::DIR_PUT);
                b.put_slice(&d.target.0);
                b.put_u8(d.hops);
                put_records(&mut b, &d.records, put_presence);
            }
            RelayToRelay::DirGet(g) => {
                head(&mut b, ty::DIR_GET);
                b.put_slice(&g.origin.0);
                b.put_slice(&g.target.0);
                b.put_u8(g.hops);
                b.put_u64(g.nonce);
                b.put_slice(&g.address.0);
            }
            RelayToRelay::DirAnswer(a) => {
                head(&mut b, ty::DIR_ANSWER);
                b.put_slice(&a.origin.0);
                b.put_slice(&a.reporter.0);
                b.put_u8(a.hops);
                b.put_u64(a.nonce);
                b.put_slice(&a.address.0);
                put_records(&mut b, &a.records, put_presence);
            }
            RelayToRelay::GroupPut(d) => {
                head(&mut b, ty::GROUP_PUT);
                b.put_slice(&d.target.0);
                b.put_u8(d.hops);
                put_records(&mut b, &d.records, put_group_record);
            }
            RelayToRelay::GroupGet(g) => {
                head(&mut b, ty::GROUP_GET);
                b.put_slice(&g.origin.0);
                b.put_slice(&g.target.0);
                b.put_u8(g.hops);
                b.put_u64(g.nonce);
                match &g.query {
                    GroupQuery::Locate(name) => {
                        b.put_u8(1);
                        put_string(&mut b, name, MAX_NAME);
                    }
                    GroupQuery::Info { name, asker } => {
                        b.put_u8(2);
                        put_string(&mut b, name, MAX_NAME);
                        b.put_slice(&asker.0);
                    }
                    GroupQuery::Op(op) => {
                        b.put_u8(3);
                        op.write(&mut b);
                    }
                }
            }
            RelayToRelay::GroupAnswer(a) => {
                head(&mut b, ty::GROUP_ANSWER);
                b.put_slice(&a.origin.0);
                b.put_slice(&a.reporter.0);
                b.put_u8(a.hops);
                b.put_u64(a.nonce);
                put_string(&mut b, &a.name, MAX_NAME);
                match &a.reply {
                    GroupReply::Located(records) => {
                        b.put_u8(1);
                        put_records(&mut b, records, put_group_record);
                    }
                    GroupReply::State(Ok(info)) => {
                        b.put_u8(2);
                        b.put_u16(0);
                        info.write(&mut b);
                    }
                    GroupReply::State(Err(code)) => {
                        b.put_u8(2);
                        // 0 means success on the wire: an error is never 0.
                        b.put_u16((*code).max(1));
                    }
                }
            }
            RelayToRelay::Forward(f) => {
                b.reserve(f.msg.len());
                head(&mut b, ty::FORWARD);
                b.put_slice(&f.origin.0);
                b.put_u8(f.hops);
                match &f.target {
                    ForwardTarget::Relay { relay, to } => {
                        b.put_u8(1);
                        b.put_slice(&relay.0);
                        b.put_u16(to.len().min(u16::MAX as usize) as u16);
                        for a in to.iter().take(u16::MAX as usize) {
                            b.put_slice(&a.0);
                        }
                    }
                    ForwardTarget::Broadcast => b.put_u8(2),
                    ForwardTarget::Handoff { relay, to } => {
                        b.put_u8(3);
                        b.put_slice(&relay.0);
                        b.put_slice(&to.0);
                    }
                }
                b.put_slice(&f.msg);
            }
            RelayToRelay::FwdReceipt(fr) => {
                head(&mut b, ty::FWD_RECEIPT);
                b.put_slice(&fr.origin.0);
                b.put_slice(&fr.reporter.0);
                b.put_slice(&fr.id.0);
                b.put_u8(fr.hops);
                b.put_u32(fr.delivered);
                put_receipt_entries(&mut b, &fr.entries);
            }
            RelayToRelay::Redirect(urls) => {
                head(&mut b, ty::REDIRECT);
                let urls = &urls[..urls.len().min(MAX_REDIRECT)];
                b.put_u8(urls.len() as u8);
                for u in urls {
                    put_string(&mut b, u, MAX_URL_LEN);
                }
            }
        }
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_s2s_type_is_in_the_range_frame_refuses_from_clients() {
        for t in [
            ty::LINK_STATE,
            ty::PRESENCE,
            ty::FORWARD,
            ty::FWD_RECEIPT,
            ty::REDIRECT,
            ty::DIR_PUT,
            ty::DIR_GET,
            ty::DIR_ANSWER,
            ty::GROUP_PUT,
            ty::GROUP_GET,
            ty::GROUP_ANSWER,
        ] {
            assert!(is_s2s_type(t), "{t:#x}");
        }
        assert!(!is_s2s_type(ty::LINK_STATE - 1) && !is_s2s_type(ty::GROUP_ANSWER + 1));
    }
    use crate::frame::{Dest, Msg, Status};
    use crate::handshake::ClientHandshake;
    use proptest::prelude::*;

    fn proof(client: &Identity, relay: &Identity) -> RegistrationProof {
        let mut hs = ClientHandshake::new(client.clone(), Role::Client, "ws://r/", [5; 32], None);
        let reg = hs
            .on_challenge(
                crate::frame::Challenge {
                    relay_key: relay.address(),
                    relay_nonce: [6; 32],
                },
                1_000,
            )
            .unwrap();
        RegistrationProof {
            address: client.address(),
            relay_key: relay.address(),
            relay_nonce: [6; 32],
            client_nonce: reg.client_nonce,
            timestamp_ms: reg.timestamp_ms,
            url: reg.url,
            sig_a: reg.sig_a,
        }
    }

    #[test]
    fn presence_verifies_and_forgeries_fail() {
        let client = Identity::from_seed([1; 32]);
        let relay = Identity::from_seed([2; 32]);
        let evil = Identity::from_seed([3; 32]);
        let p = Presence::sign(&relay, proof(&client, &relay), true, 7, 1_000);
        assert_eq!(p.verify(), Ok(()));
        let rt = RelayToRelay::decode(&RelayToRelay::Presence(p.clone()).encode()).unwrap();
        assert_eq!(rt, RelayToRelay::Presence(p.clone()));
        // A relay claiming a client that registered elsewhere.
        let mut stolen = p.clone();
        stolen.proof.relay_key = evil.address();
        let stolen = Presence::sign(&evil, stolen.proof, true, 8, 1_000);
        assert_eq!(stolen.verify(), Err(PresenceError::BadClientSignature));
        // Flipping online without the hosting relay's key.
        let mut flipped = p.clone();
        flipped.online = false;
        assert_eq!(flipped.verify(), Err(PresenceError::BadRelaySignature));
        // A later record of the relay beats an earlier one, and its number
        // cannot be changed without the relay's key.
        let left = Presence::sign(&relay, p.proof.clone(), false, 9, 1_000);
        assert!(left.rank() > p.rank());
        let mut renumbered = p.clone();
        renumbered.seq = 10;
        assert_eq!(renumbered.verify(), Err(PresenceError::BadRelaySignature));
        // Nor can its registration time (which orders it against other
        // relays' records of the address).
        let mut redated = p.clone();
        redated.since_ms += 1;
        assert_eq!(redated.verify(), Err(PresenceError::BadRelaySignature));
        assert!(redated.newness() > p.newness());
    }

    #[test]
    fn link_state_signs_and_round_trips() {
        let relay = Identity::from_seed([2; 32]);
        let ls = LinkState::sign(
            &relay,
            "ws://a/",
            7,
            vec![Address([9; 32]), Address([1; 32])],
        );
        assert_eq!(ls.verify(), Ok(()));
        assert_eq!(ls.neighbors[0], Address([1; 32]), "sorted");
        let f = RelayToRelay::LinkState(ls.clone());
        assert_eq!(RelayToRelay::decode(&f.encode()).unwrap(), f);
        let mut bad = ls;
        bad.seq = 8;
        assert!(bad.verify().is_err());
    }

    #[test]
    fn forward_and_receipt_round_trip() {
        let msg = Msg {
            flags: 0,
            id: MsgId([4; 16]),
            from: Address([1; 32]),
            dest: Dest::A2g(vec![Address([2; 32]), Address([3; 32])]),
            payload: Bytes::from_static(b"hi"),
        }
        .encode();
        for target in [
            ForwardTarget::Relay {
                relay: Address([8; 32]),
                to: vec![Address([2; 32])],
            },
            ForwardTarget::Broadcast,
            ForwardTarget::Handoff {
                relay: Address([8; 32]),
                to: Address([2; 32]),
            },
        ] {
            let f = RelayToRelay::Forward(Forward {
                origin: Address([7; 32]),
                hops: 3,
                target,
                msg: msg.clone(),
            });
            assert_eq!(RelayToRelay::decode(&f.encode()).unwrap(), f);
        }
        let r = RelayToRelay::FwdReceipt(FwdReceipt {
            origin: Address([7; 32]),
            reporter: Address([8; 32]),
            id: MsgId([4; 16]),
            hops: 1,
            delivered: 1,
            entries: vec![ReceiptEntry {
                to: Address([2; 32]),
                status: Status::Delivered,
                reason: 0,
            }],
        });
        assert_eq!(RelayToRelay::decode(&r.encode()).unwrap(), r);
        let d = RelayToRelay::Redirect(vec!["ws://a/".into(), "ws://b/".into()]);
        assert_eq!(RelayToRelay::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn group_frames_round_trip_and_records_verify() {
        use crate::group::GroupAction;
        let relay = Identity::from_seed([2; 32]);
        let alice = Identity::from_seed([1; 32]);
        let rec = GroupRecord::sign(&relay, "team", 9, 1_000);
        assert!(rec.verify().is_ok());
        let mut forged = rec.clone();
        forged.relay = alice.address();
        assert!(forged.verify().is_err(), "another relay cannot claim it");
        let mut renamed = rec.clone();
        renamed.name = "teams".into();
        assert!(renamed.verify().is_err());
        assert_ne!(group_key("team"), group_key("teams"));
        let info = GroupInfo {
            name: "team".into(),
            owner: alice.address(),
            members: vec![(alice.address(), true), (Address([3; 32]), false)],
            seq: 2,
        };
        let (o, t) = (Address([7; 32]), Address([8; 32]));
        let frames = [
            RelayToRelay::GroupPut(GroupPut {
                target: t,
                hops: 1,
                records: vec![rec.clone(), rec.clone()],
            }),
            RelayToRelay::GroupGet(GroupGet {
                origin: o,
                target: t,
                hops: 2,
                nonce: 5,
                query: GroupQuery::Locate("team".into()),
            }),
            RelayToRelay::GroupGet(GroupGet {
                origin: o,
                target: t,
                hops: 2,
                nonce: 6,
                query: GroupQuery::Info {
                    name: "team".into(),
                    asker: alice.address(),
                },
            }),
            RelayToRelay::GroupGet(GroupGet {
                origin: o,
                target: t,
                hops: 2,
                nonce: 7,
                query: GroupQuery::Op(GroupOp::sign(
                    &alice,
                    "team",
                    GroupAction::Admin(Address([3; 32]), true),
                    3,
                )),
            }),
            RelayToRelay::GroupAnswer(GroupAnswer {
                origin: o,
                reporter: t,
                hops: 0,
                nonce: 5,
                name: "team".into(),
                reply: GroupReply::Located(vec![rec]),
            }),
            RelayToRelay::GroupAnswer(GroupAnswer {
                origin: o,
                reporter: t,
                hops: 0,
                nonce: 6,
                name: "team".into(),
                reply: GroupReply::State(Ok(info)),
            }),
            RelayToRelay::GroupAnswer(GroupAnswer {
                origin: o,
                reporter: t,
                hops: 0,
                nonce: 7,
                name: "team".into(),
                reply: GroupReply::State(Err(43)),
            }),
        ];
        for f in frames {
            let bytes = f.encode();
            assert_eq!(RelayToRelay::decode(&bytes).unwrap(), f);
            // Every shorter prefix is refused, never read past its end.
            for cut in 2..bytes.len() {
                assert!(RelayToRelay::decode(&bytes.slice(..cut)).is_err());
            }
        }
    }

    #[test]
    fn directory_frames_round_trip() {
        let client = Identity::from_seed([1; 32]);
        let relay = Identity::from_seed([2; 32]);
        let p = Presence::sign(&relay, proof(&client, &relay), true, 7, 1_000);
        let frames = [
            RelayToRelay::DirPut(DirPut {
                target: Address([8; 32]),
                hops: 2,
                records: vec![p.clone(), p.clone()],
            }),
            RelayToRelay::DirGet(DirGet {
                origin: Address([7; 32]),
                target: Address([8; 32]),
                hops: 1,
                nonce: 42,
                address: client.address(),
            }),
            RelayToRelay::DirAnswer(DirAnswer {
                origin: Address([7; 32]),
                reporter: Address([8; 32]),
                hops: 3,
                nonce: 42,
                address: client.address(),
                records: vec![p],
            }),
            RelayToRelay::DirAnswer(DirAnswer {
                origin: Address([7; 32]),
                reporter: Address([8; 32]),
                hops: 0,
                nonce: 43,
                address: client.address(),
                records: Vec::new(),
            }),
        ];
        for f in frames {
            assert_eq!(RelayToRelay::decode(&f.encode()).unwrap(), f);
        }
        // A record count above the bound is refused, not read.
        let mut b = BytesMut::new();
        head(&mut b, ty::DIR_PUT);
        b.put_slice(&[8; 32]);
        b.put_u8(0);
        b.put_u8(MAX_DIR_RECORDS as u8 + 1);
        assert!(matches!(
            RelayToRelay::decode(&b.freeze()),
            Err(DecodeError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_s2s_bytes_never_panic(t in 0x40u8..0x4b, body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut v = vec![crate::PROTOCOL_VERSION, t];
            v.extend(body);
            let _ = RelayToRelay::decode(&Bytes::from(v));
        }
    }
}
