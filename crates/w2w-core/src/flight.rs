//! A message in flight: one record, one state per recipient.

use std::time::Instant;

use bytes::Bytes;
use w2w_proto::frame::{MsgId, Receipt, ReceiptEntry, Route, Status};
use w2w_proto::{Address, ErrorCode};

use crate::{ConnId, Token};

/// Identifies a message in flight: (id, sender).
pub type FlightKey = (MsgId, Address);

/// Where one recipient's copy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// Handed to the address's live sessions `conns` without being
    /// stored; each ACK takes its session out and counts in `acked`. When
    /// none is left (or at the deadline) it is `delivered` if one
    /// acknowledged it, written otherwise (`Storing { late: true }`).
    Unstored { conns: Vec<ConnId>, acked: u32 },
    /// A write is on its way. `late`: the recipient was handed it unstored
    /// and missed the ACK deadline (or left), so once on disk it is
    /// `queued`, not handed over again. `acked`: an ACK came meanwhile (a
    /// session had it from the backlog reader or unstored): `delivered`
    /// once the write lands, and the copy deleted.
    Storing {
        token: Token,
        late: bool,
        acked: bool,
    },
    /// On disk; handed to the sessions `conns` (empty: waiting for the
    /// backlog reader of an address whose sessions are still draining).
    /// The first ACK settles it `delivered`; the last of them leaving with
    /// no other session to take it, or the deadline, `queued`.
    Stored { conns: Vec<ConnId> },
    /// Forwarded toward `relay`, whose FWD_RECEIPT settles it (or the
    /// deadline: `no_route`, reason `timeout`).
    Forwarded { relay: Address },
    /// Waiting for a directory lookup (PROTOCOL 12.12) to say where the
    /// recipient is; `moved_from`: the relay that answered `moved` (it is
    /// not asked again for this message).
    Resolving { moved_from: Option<Address> },
    /// The receipt entry is known.
    Settled(ReceiptEntry),
}

impl Recipient {
    /// A leg that is not (or not yet) this relay's: forwarded, or waiting
    /// for a lookup. (A settled leg may be either; it is never looked up.)
    pub fn elsewhere(&self) -> bool {
        matches!(
            self,
            Recipient::Forwarded { .. } | Recipient::Resolving { .. }
        )
    }
}

/// Who is told the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A client of this relay (a RECEIPT).
    Client(ConnId),
    /// A client of this relay whose message was split across the relay's
    /// shards (shard.rs): this flight is one shard's part, and its receipt
    /// is merged with the other parts' into the client's RECEIPT.
    Part(ConnId),
    /// The origin relay of a FORWARD (a FWD_RECEIPT).
    Relay(Address),
    /// Nobody: a stored message for `to` handed over to another relay
    /// (handoff.rs); its outcome decides whether the copy here goes.
    Handoff { to: Address },
}

impl Reply {
    /// The client connection told the outcome (whole or in part).
    pub fn client(&self) -> Option<ConnId> {
        match self {
            Reply::Client(c) | Reply::Part(c) => Some(*c),
            _ => None,
        }
    }
}

/// An a2n across the federation: how many connections had it, and which
/// relays have not answered yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Broadcast {
    pub delivered: u32,
    pub waiting: std::collections::BTreeSet<Address>,
}

/// One message in flight.
#[derive(Debug, Clone)]
pub struct Flight {
    /// Who gets the outcome.
    pub reply: Reply,
    /// A connection of the sender that sent the same MSG again while this
    /// one was in flight (a resend after a lost connection, or through
    /// another of its relays, PROTOCOL 7.6): it gets the receipt too (as a
    /// part, if the resend was split across shards too).
    pub resent: Option<Reply>,
    pub route: Route,
    pub frame: Bytes,
    /// Recipients in the order the sender listed them, each with its state:
    /// one leg per place it goes (PROTOCOL 7.7: an address online at
    /// several relays has one `Forwarded` leg per relay, and a local one
    /// if it is a client here too). Its receipt entry is its best leg's.
    pub recipients: Vec<(Address, Recipient)>,
    /// When recipients handed over unstored stop waiting for their ACK
    /// (with the timer's sequence number, which makes it unique).
    pub deadline: (Instant, u64),
    /// Whether the deadline has been applied.
    pub expired: bool,
    /// For an a2n sent to the federation.
    pub broadcast: Option<Broadcast>,
    /// Sessions that acknowledged it (here, and as other relays reported):
    /// the receipt's `delivered` when an address has several sessions.
    pub copies: u32,
    /// Recipients waiting for a lookup; while any is, FORWARDs wait in
    /// `unsent` (one FORWARD per relay per message: a relay takes a second
    /// one with the same id for a duplicate).
    pub resolving: u32,
    pub unsent: std::collections::BTreeMap<Address, Vec<Address>>,
    /// (recipient, relay) pairs forwarded so far: a leg looked up again
    /// never goes to a relay that had it.
    pub sent: Vec<(Address, Address)>,
}

impl Flight {
    /// Whether this flight's receipt answers a MSG with `dest` from its
    /// sender: one the sender's own relay started covers all its
    /// recipients; one forwarded here or handed over covers only the
    /// recipients it was given, which for a2b and a2a is all of them.
    pub fn covers(&self, dest: &w2w_proto::frame::Dest) -> bool {
        use w2w_proto::frame::Dest;
        self.reply.client().is_some() || matches!(dest, Dest::A2b(_) | Dest::A2a)
    }

    /// The local leg of `to` (delivered or stored at this relay): the one
    /// still under way if there is one (a leg kept in custody may follow
    /// settled legs of relays that could not be reached), else the first
    /// settled one.
    pub fn state_mut(&mut self, to: &Address) -> Option<&mut Recipient> {
        let i = self.local_index(to)?;
        self.recipients.get_mut(i).map(|(_, s)| s)
    }

    /// The local leg of `to`, read-only.
    pub fn local(&self, to: &Address) -> Option<&Recipient> {
        self.recipients.get(self.local_index(to)?).map(|(_, s)| s)
    }

    fn local_index(&self, to: &Address) -> Option<usize> {
        let mine = |s: &Recipient| !s.elsewhere();
        let open = |s: &Recipient| !matches!(s, Recipient::Settled(_));
        let legs = || {
            self.recipients
                .iter()
                .enumerate()
                .filter(|(_, (a, _))| a == to)
        };
        legs()
            .find(|(_, (_, s))| mine(s) && open(s))
            .or_else(|| legs().find(|(_, (_, s))| mine(s)))
            .map(|(i, _)| i)
    }

    /// The leg of `to` forwarded toward `relay`.
    pub fn leg_mut(&mut self, to: &Address, relay: &Address) -> Option<&mut Recipient> {
        self.recipients
            .iter_mut()
            .find(|(a, s)| a == to && *s == Recipient::Forwarded { relay: *relay })
            .map(|(_, s)| s)
    }

    pub fn settled(&self) -> bool {
        self.recipients
            .iter()
            .all(|(_, s)| matches!(s, Recipient::Settled(_)))
            && self.broadcast.as_ref().is_none_or(|b| b.waiting.is_empty())
    }

    /// The settled entries, one per recipient in the order the sender
    /// listed them, each its best leg's (`None` while a leg is not
    /// settled).
    pub fn entries(&self) -> Option<Vec<ReceiptEntry>> {
        let mut out: Vec<ReceiptEntry> = Vec::with_capacity(self.recipients.len());
        for (to, s) in &self.recipients {
            let Recipient::Settled(e) = s else {
                return None;
            };
            match out.iter_mut().find(|p| p.to == *to) {
                Some(prev) if better(e.status) > better(prev.status) => *prev = e.clone(),
                Some(_) => {}
                None => out.push(e.clone()),
            }
        }
        Some(out)
    }

    /// The sender's receipt, once every recipient is settled.
    pub fn receipt(&self, id: MsgId) -> Option<Receipt> {
        if !self.settled() {
            return None;
        }
        if let Some(b) = &self.broadcast {
            let r = receipt(id, self.route, Vec::new());
            let (status, reason) = summarize(self.route, &[], b.delivered);
            return Some(Receipt {
                status,
                reason,
                delivered: b.delivered,
                ..r
            });
        }
        let mut r = receipt(id, self.route, self.entries()?);
        r.delivered = r.delivered.max(self.copies);
        Some(r)
    }

    /// The count a FWD_RECEIPT reports: sessions that acknowledged it.
    pub fn delivered(&self) -> u32 {
        self.entries()
            .map_or(0, |e| delivered_count(&e))
            .max(self.copies)
    }
}

/// Which of two legs' outcomes a recipient's entry takes: delivered over
/// queued over the rest.
fn better(s: Status) -> u8 {
    match s {
        Status::Delivered => 2,
        Status::Queued => 1,
        _ => 0,
    }
}

/// A receipt entry.
pub fn entry(to: Address, status: Status, code: Option<ErrorCode>) -> ReceiptEntry {
    ReceiptEntry {
        to,
        status,
        reason: code.map_or(0, ErrorCode::as_u16),
    }
}

/// How many entries say "delivered".
pub fn delivered_count(entries: &[ReceiptEntry]) -> u32 {
    entries
        .iter()
        .filter(|e| e.status == Status::Delivered)
        .count() as u32
}

/// The overall status and reason from the entries (PROTOCOL.md 7.2): a2a
/// and a2b carry their one entry's; a2g and group are `delivered`,
/// `queued` (all delivered or queued, at least one queued), `partial` or
/// `no_route`; a2n is `delivered` when `delivered` (its count) is above 0.
pub fn summarize(route: Route, entries: &[ReceiptEntry], delivered: u32) -> (Status, u16) {
    match route {
        Route::A2a | Route::A2b => entries
            .first()
            .map_or((Status::NoRoute, ErrorCode::NoRoute.as_u16()), |e| {
                (e.status, e.reason)
            }),
        Route::A2g | Route::Group => {
            let queued = entries
                .iter()
                .filter(|e| e.status == Status::Queued)
                .count();
            let ok = queued + delivered_count(entries) as usize;
            if ok == entries.len() && queued > 0 {
                (Status::Queued, 0)
            } else if ok == entries.len() {
                (Status::Delivered, 0)
            } else if ok == 0 {
                let reason = entries
                    .first()
                    .map_or(ErrorCode::NoRoute.as_u16(), |e| e.reason);
                (Status::NoRoute, reason)
            } else {
                (Status::Partial, 0)
            }
        }
        Route::A2n => {
            if delivered > 0 {
                (Status::Delivered, 0)
            } else {
                (Status::NoRoute, ErrorCode::NoRoute.as_u16())
            }
        }
    }
}

/// The receipt for a message whose recipients are all settled (a2a
/// receipts carry no entries).
pub fn receipt(id: MsgId, route: Route, entries: Vec<ReceiptEntry>) -> Receipt {
    let delivered = delivered_count(&entries);
    let (status, reason) = summarize(route, &entries, delivered);
    let entries = if route == Route::A2a {
        Vec::new()
    } else {
        entries
    };
    Receipt {
        id,
        status,
        reason,
        delivered,
        entries,
    }
}
