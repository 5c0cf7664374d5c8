//! The w2w relay's delivery logic as a deterministic state machine.
//!
//! This crate has no I/O, no clock and no runtime: time enters as `now`,
//! connections are [`ConnId`]s, the store is a list of [`StoreOp`]s the
//! caller executes and answers with [`StoreDone`]. The same inputs in the
//! same order always give the same outputs, so the logic is tested by a
//! deterministic simulation ([`sim`]) rather than by real sockets and
//! sleeps. It follows quinn-proto's shape: `handle_*` and `connect` /
//! `disconnect` take inputs, `poll_*` give outputs.
//!
//! # Contract
//!
//! * `connect(now, conn, address)` once per registered connection, before
//!   any other input for `conn`; `disconnect(now, conn)` once when it ends
//!   (the core may also ask for a connection to be closed: `poll_close`,
//!   after which the caller still calls `disconnect`).
//! * `handle_msg` and `handle_ack` for each MSG and ACK a registered
//!   connection sends, in the order they arrived on it.
//! * `peer_up(peer, key, url, dialled)` once a peer link's handshake is
//!   done (if it returns `Err`, close the link and never mention `peer`
//!   again); then `handle_peer_frame` for each frame it sends, in order;
//!   `peer_down(peer)` once when it ends. Nothing on a link is sized by
//!   the number of addresses: the directory is partitioned (directory.rs).
//! * A client's LOOKUP goes through `lookup_request`; one it cannot answer
//!   at once is answered later by `poll_lookup_answer`.
//! * The store executes [`StoreOp`]s in the order they were polled. Every
//!   op with a token is answered with exactly one [`StoreDone`] carrying
//!   that token; the answers may arrive in any order (a write refused at
//!   once, e.g. over a budget, is answered at once). `Dequeue` is not
//!   answered. After a crash the caller builds a new core
//!   (`RelayCore::new` with the addresses the store knows); answers for
//!   the old core's ops are dropped.
//! * `handle_timeout(now)` whenever `poll_timeout()` has passed; calling it
//!   early or often is harmless. `refresh()` now and then (e.g. every 30 s).
//! * After any input, drain `poll_transmit`, `poll_store`, `poll_close`
//!   (and `poll_event` if events are on) until they return `None`. A
//!   transmit the caller cannot queue closes its connection or link (then
//!   `disconnect` / `peer_down`), except a `soft` one, which may be
//!   skipped.
//!
//! # What it decides
//!
//! One record per message in flight ([`flight::Flight`]) holds one state
//! per recipient ([`flight::Recipient`]): handed over without being stored
//! and awaiting the ACK, being written, on disk (handed over or waiting for
//! the connection's backlog reader), or settled with its receipt entry. The
//! sender's RECEIPT goes out when every recipient is settled. A connection
//! first takes its stored backlog (`Draining`), and only when the backlog is
//! read to its end and no write for its address is on the way does it go
//! `Live` and get messages handed over directly: so a message on its way
//! through the store is never overtaken by a newer one.
//!
//! A message for a client of another relay is a recipient in state
//! `Forwarded` until that relay's FWD_RECEIPT settles it; a FORWARD for
//! clients of this relay starts a flight whose outcome goes back as a
//! FWD_RECEIPT. Local delivery is one code path for both.
//!
//! # What stays in the shell
//!
//! `w2w-server` runs on this core (its `federation.rs` is the shell). The
//! per-sender budgets, the peer broadcast budget and the store budgets
//! stay there: they gate inputs and store ops. Groups are resolved there
//! and enter `handle_msg` as a member list.
//!
//! [`spacerift`] is a second, independent state machine: Spacerifts
//! signaling (pairing WebRTC peers over HTTP, PROTOCOL §16); its HTTP
//! handler and the channels parked requests wait on are in the shell.

mod directory;
mod federation;
pub mod flight;
mod groups;
mod handoff;
mod lookup;
mod relay;
pub mod routing;
pub mod seen;
pub mod shard;
pub mod sim;
pub mod sim_routing;
pub mod spacerift;

pub use directory::closest;
pub use groups::{GroupAsk, GroupOutcome, GroupQuestion};
pub use relay::{targets, Config, FedConfig, RelayCore, Targets};

use bytes::Bytes;
use w2w_proto::frame::MsgId;
use w2w_proto::{Address, ErrorCode};

/// A registered connection, named by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Names a store operation whose answer the core waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// A peer link (to another relay), named by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Conn(ConnId),
    Peer(PeerId),
}

/// A frame for a connection or a peer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: Target,
    pub frame: Bytes,
    /// A broadcast copy or a presence notice: the caller may skip it for a
    /// receiver whose send queue is behind, rather than close that
    /// receiver. Everything else must be queued or the receiver closed.
    pub soft: bool,
}

/// What the relay did with a message, for hop traces (`w2w demo`); only
/// produced when [`Config::events`] is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client of this relay sent it.
    FromClient { id: MsgId, from: Address },
    /// Handed to a peer link toward another relay.
    ToPeer { id: MsgId, peer: Address },
    /// Handed to a connection of this relay.
    ToClient { id: MsgId, to: Address },
}

/// Counters the caller may export (they only grow).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// FORWARDs handed to peer links.
    pub forwarded: u64,
    /// Directory or link-state records refused at a bound or allowance.
    pub records_refused: u64,
    /// Refusals and failures by error code.
    pub errors: std::collections::BTreeMap<u16, u64>,
    /// Receipts sent to clients, by status (wire value).
    pub receipts: std::collections::BTreeMap<u8, u64>,
    /// Receipt entries (local recipients) that said `queued`.
    pub queued: u64,
    /// Directory lookups made (rounds of DIR_GETs), refused (table full,
    /// or a peer over its rate), and legs looked up again after `moved`.
    pub lookups: u64,
    pub lookups_refused: u64,
    pub rerouted: u64,
    /// Held records dropped because their lease ran out.
    pub records_expired: u64,
    /// Client messages kept here because their recipient's relay could
    /// not be reached (custody), stored messages handed over to another
    /// relay, and hand-offs that did not succeed (tried again later).
    pub custody: u64,
    pub handed_off: u64,
    pub handoffs_failed: u64,
    /// A sender's MSG that came again while its original was in flight
    /// and joined it (PROTOCOL 7.6).
    pub resends_joined: u64,
    /// A FORWARD for other recipients of a message already waiting here
    /// from the same origin that joined it (a sharded origin sends one per
    /// shard).
    pub forwards_joined: u64,
}

impl Stats {
    /// Adds `other`'s counts to these (a sharded relay's total).
    pub fn add(&mut self, other: &Stats) {
        self.forwarded += other.forwarded;
        self.records_refused += other.records_refused;
        for (k, v) in &other.errors {
            *self.errors.entry(*k).or_default() += v;
        }
        for (k, v) in &other.receipts {
            *self.receipts.entry(*k).or_default() += v;
        }
        self.queued += other.queued;
        self.lookups += other.lookups;
        self.lookups_refused += other.lookups_refused;
        self.rerouted += other.rerouted;
        self.records_expired += other.records_expired;
        self.custody += other.custody;
        self.handed_off += other.handed_off;
        self.handoffs_failed += other.handoffs_failed;
        self.resends_joined += other.resends_joined;
        self.forwards_joined += other.forwards_joined;
    }

    pub(crate) fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.as_u16()).or_default() += 1;
    }

    /// How many times `code` was counted.
    pub fn count(&self, code: ErrorCode) -> u64 {
        self.errors.get(&code.as_u16()).copied().unwrap_or(0)
    }
}

/// Work for the store, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Write `frame` durably for `recipient` (idempotent per recipient and
    /// id); answered [`StoreDone::Enqueued`].
    Enqueue {
        token: Token,
        recipient: Address,
        sender: Address,
        id: MsgId,
        frame: Bytes,
    },
    /// Delete the stored copy (acknowledged). Not answered: if it is lost
    /// in a crash the recipient gets the message again and its client
    /// drops the copy.
    Dequeue { recipient: Address, id: MsgId },
    /// Up to `limit` stored messages for `recipient` after sequence number
    /// `after`, oldest first; answered [`StoreDone::Read`].
    Read {
        token: Token,
        recipient: Address,
        after: i64,
        limit: usize,
    },
}

/// A stored message, as a `Read` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    pub id: MsgId,
    pub frame: Bytes,
}

/// The store's answer to an op with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreDone {
    /// The write committed (or failed with the code).
    Enqueued {
        token: Token,
        result: Result<(), ErrorCode>,
    },
    Read {
        token: Token,
        result: Result<Vec<Stored>, ErrorCode>,
    },
}
