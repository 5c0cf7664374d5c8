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
//! * The store executes [`StoreOp`]s in the order they were polled. Every
//!   op with a token is answered with exactly one [`StoreDone`] carrying
//!   that token; the answers may arrive in any order. `Dequeue` is not
//!   answered. After a
//!   crash the caller builds a new core (`RelayCore::new` with the addresses
//!   the store knows); answers for the old core's ops are dropped.
//! * `handle_timeout(now)` whenever `poll_timeout()` has passed; calling it
//!   early or often is harmless.
//! * After any input, drain `poll_transmit`, `poll_store` and `poll_close`
//!   until they return `None`.
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
//! # Not here yet (issue 11)
//!
//! Federation (link state, directory, FORWARD and its receipts), named
//! groups, a2n across relays, the store budgets and pacing the backlog by
//! the connection's send queue still live in `w2w-server`, which does not
//! use this crate yet.

pub mod flight;
mod relay;
pub mod routing;
pub mod seen;
pub mod sim;
pub mod sim_routing;

pub use relay::{Config, RelayCore};

use bytes::Bytes;
use w2w_proto::frame::MsgId;
use w2w_proto::{Address, ErrorCode};

/// A registered connection, named by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Names a store operation whose answer the core waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// A frame for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub conn: ConnId,
    pub frame: Bytes,
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
