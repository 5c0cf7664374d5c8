//! One relay as several cores ("shards"), so that more than one CPU can
//! decide about messages at once (issue 13, item 2).
//!
//! Every address belongs to one shard ([`shard_of`]): the shard holds its
//! sessions, its inbox and stored backlog, and every message in flight *to*
//! it. A MSG therefore goes to its recipient's shard, not its sender's: an
//! a2b touches one shard only (the sender's session is checked by the
//! caller, which knows the connection's address; the RECEIPT goes straight
//! to the sender's connection). A MSG for several recipients (a2g, a
//! group, a2n) is split by shard ([`split`]); each shard settles its part
//! and answers a partial receipt ([`RelayCore::poll_part`]) that
//! [`Merge`] joins into the one RECEIPT the sender gets, entries in the
//! order it listed them. An ACK goes to the acknowledging connection's
//! shard (its recipient's), a store answer to the shard whose token it
//! carries (`token % shards`), a NOTICE DELIVERED for a sender of another
//! shard through that shard ([`RelayCore::poll_notice`]).
//!
//! What is not sharded yet: federation. A relay with peer links runs one
//! shard (the server enforces it); link state, the directory, custody and
//! groups across relays would need their own routing (directory records
//! by address, link state replicated) and are the next step.
//!
//! [`Shards`] drives N cores in one thread with exactly the routing a
//! multi-threaded caller uses (`split`, `Merge`, `shard_of_answer`): the
//! differential test (`tests/shards.rs`) runs it against a single core.
//! The federation simulation (`sim.rs`) still runs one core per relay.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use w2w_proto::frame::{MsgId, Receipt, ReceiptEntry, RelayToClient, Route, Scope, Status};
use w2w_proto::s2s::RegistrationProof;
use w2w_proto::{Address, ErrorCode, Identity};

use crate::flight::{summarize, Reply};
use crate::relay::{reject, targets, Targets};
use crate::{Config, ConnId, RelayCore, Stats, StoreDone, StoreOp, Transmit};
use w2w_proto::frame::Msg;

/// The shard of `address` among `count`: spread evenly because addresses
/// are public keys (a client that grinds keys can load one shard more than
/// the others, never break one).
pub fn shard_of(address: &Address, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&address.0[24..32]);
    (u64::from_le_bytes(b) % count as u64) as usize
}

/// The shard a store answer goes to: the one whose token it carries
/// (shard `i` of `count` numbers its tokens `≡ i (mod count)`).
pub fn shard_of_answer(done: &StoreDone, count: usize) -> usize {
    let token = match done {
        StoreDone::Enqueued { token, .. } | StoreDone::Read { token, .. } => *token,
    };
    (token.0 % count.max(1) as u64) as usize
}

/// A RECEIPT refusing message `id` as a whole (before any shard saw it).
pub fn refusal(id: MsgId, code: ErrorCode) -> Receipt {
    reject(id, code)
}

/// Where a client's MSG goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// Refused as a whole (its RECEIPT).
    Refused(Receipt),
    /// To one shard, which answers the RECEIPT itself.
    Whole(usize, Targets),
    /// One part per shard (at least two); their receipts are merged into
    /// one with entries in `order` (the recipients as the sender listed
    /// them; empty for a2n).
    Parts {
        parts: Vec<(usize, Targets)>,
        order: Vec<Address>,
    },
}

/// Splits `msg` from `sender` (already checked against the connection's
/// session) among `count` shards. `group` as for [`RelayCore::handle_msg`].
pub fn split(
    msg: &Msg,
    group: Option<Result<Vec<Address>, ErrorCode>>,
    max_group: usize,
    count: usize,
) -> Split {
    let home = shard_of(&msg.from, count);
    // The common cases, without grouping.
    match &msg.dest {
        w2w_proto::Dest::A2b(to) => {
            return Split::Whole(shard_of(to, count), Targets::List(vec![*to]))
        }
        w2w_proto::Dest::A2a => return Split::Whole(home, Targets::List(vec![msg.from])),
        _ => {}
    }
    match targets(msg, group, max_group) {
        Err(code) => Split::Refused(reject(msg.id, code)),
        Ok(Targets::List(list)) => {
            let mut by: BTreeMap<usize, Vec<Address>> = BTreeMap::new();
            for a in &list {
                by.entry(shard_of(a, count)).or_default().push(*a);
            }
            let mut parts: Vec<(usize, Targets)> =
                by.into_iter().map(|(s, l)| (s, Targets::List(l))).collect();
            match parts.len() {
                0 => Split::Whole(home, Targets::List(Vec::new())),
                1 => {
                    let (s, t) = parts.remove(0);
                    Split::Whole(s, t)
                }
                _ => Split::Parts { parts, order: list },
            }
        }
        // A group of another relay is looked for by the sender's shard.
        Ok(Targets::ElsewhereGroup) => Split::Whole(home, Targets::ElsewhereGroup),
        Ok(Targets::Everyone(scope)) if count == 1 => Split::Whole(0, Targets::Everyone(scope)),
        // Every shard's clients; only the sender's shard tells the other
        // relays.
        Ok(Targets::Everyone(scope)) => Split::Parts {
            parts: (0..count)
                .map(|s| {
                    let scope = if s == home { scope } else { Scope::Relay };
                    (s, Targets::Everyone(scope))
                })
                .collect(),
            order: Vec::new(),
        },
    }
}

/// Receipts of split messages being joined, per (connection, id).
#[derive(Debug, Default)]
pub struct Merge {
    pending: BTreeMap<(ConnId, MsgId), Partial>,
    /// How many each connection has pending.
    per_conn: HashMap<ConnId, usize>,
}

#[derive(Debug)]
struct Partial {
    frame: Bytes,
    route: Route,
    /// The recipients in the sender's order (empty for a2n).
    order: Vec<Address>,
    /// Each part's shard and recipients, until it answers.
    waiting: Vec<(usize, Vec<Address>)>,
    entries: Vec<ReceiptEntry>,
    delivered: u32,
}

impl Merge {
    /// The frame of the split message of `conn` with this id whose
    /// receipts are being joined, if any: the same frame again is answered
    /// by the merged receipt, another one under the id is refused
    /// `duplicate`.
    pub fn frame(&self, conn: ConnId, id: MsgId) -> Option<&Bytes> {
        self.pending.get(&(conn, id)).map(|p| &p.frame)
    }

    /// Expects one receipt from each of `parts` (as [`split`] made them).
    pub fn expect(
        &mut self,
        conn: ConnId,
        msg: &Msg,
        frame: &Bytes,
        parts: &[(usize, Targets)],
        order: Vec<Address>,
    ) {
        let waiting: Vec<(usize, Vec<Address>)> = parts
            .iter()
            .map(|(s, t)| match t {
                Targets::List(l) => (*s, l.clone()),
                _ => (*s, Vec::new()),
            })
            .collect();
        let partial = Partial {
            frame: frame.clone(),
            route: msg.dest.route(),
            order,
            waiting,
            entries: Vec::new(),
            delivered: 0,
        };
        if self.pending.insert((conn, msg.id), partial).is_none() {
            *self.per_conn.entry(conn).or_default() += 1;
        }
    }

    /// Split messages of `conn` whose receipts are being joined.
    pub fn of(&self, conn: ConnId) -> usize {
        self.per_conn.get(&conn).copied().unwrap_or(0)
    }

    fn done(&mut self, conn: ConnId) {
        if let Some(n) = self.per_conn.get_mut(&conn) {
            *n -= 1;
            if *n == 0 {
                self.per_conn.remove(&conn);
            }
        }
    }

    /// Shard `shard`'s receipt for its part; the whole RECEIPT once every
    /// part answered. A part refused as a whole (its id reused there:
    /// `duplicate`) gives each of its recipients that code.
    pub fn part(&mut self, conn: ConnId, shard: usize, r: Receipt) -> Option<Receipt> {
        let p = self.pending.get_mut(&(conn, r.id))?;
        let i = p.waiting.iter().position(|(s, _)| *s == shard)?;
        let (_, list) = p.waiting.swap_remove(i);
        p.delivered += r.delivered;
        if r.entries.is_empty() && r.status == Status::Rejected {
            p.entries.extend(list.into_iter().map(|to| ReceiptEntry {
                to,
                status: r.status,
                reason: r.reason,
            }));
        } else {
            p.entries.extend(r.entries);
        }
        if !p.waiting.is_empty() {
            return None;
        }
        let p = self.pending.remove(&(conn, r.id))?;
        self.done(conn);
        Some(p.finish(r.id))
    }

    /// Forgets what `conn` waited for (it ended: its receipts go nowhere).
    pub fn forget(&mut self, conn: ConnId) {
        let ids: Vec<(ConnId, MsgId)> = self
            .pending
            .range((conn, MsgId([0; 16]))..=(conn, MsgId([0xff; 16])))
            .map(|(k, _)| *k)
            .collect();
        for k in ids {
            self.pending.remove(&k);
        }
        self.per_conn.remove(&conn);
    }

    /// Split messages being joined.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

impl Partial {
    fn finish(self, id: MsgId) -> Receipt {
        if self.route == Route::A2n {
            let (status, reason) = summarize(Route::A2n, &[], self.delivered);
            return Receipt {
                id,
                status,
                reason,
                delivered: self.delivered,
                entries: Vec::new(),
            };
        }
        // Entries in the sender's order.
        let mut by: HashMap<Address, ReceiptEntry> = HashMap::new();
        for e in self.entries {
            by.entry(e.to).or_insert(e);
        }
        let entries: Vec<ReceiptEntry> = self.order.iter().filter_map(|a| by.remove(a)).collect();
        let mut r = crate::flight::receipt(id, self.route, entries);
        r.delivered = r.delivered.max(self.delivered);
        r
    }
}

/// N cores as one relay, driven in one thread (see the module docs). It
/// takes the same inputs as a [`RelayCore`] of a relay without peers.
#[derive(Debug)]
pub struct Shards {
    cores: Vec<RelayCore>,
    /// Each registered connection's address.
    conns: HashMap<ConnId, Address>,
    merge: Merge,
    /// Merged receipts by status (wire value).
    merged: BTreeMap<u8, u64>,
    /// Merged receipts and refusals, in order.
    out: VecDeque<Transmit>,
    max_group: usize,
}

impl Shards {
    /// `count` cores for relay `identity` whose store knows `known`.
    pub fn new(config: Config, identity: Identity, count: usize, known: &[Address]) -> Self {
        assert!(count >= 1);
        let max_group = config.max_group;
        let cores = (0..count)
            .map(|i| {
                let mine = known.iter().copied().filter(|a| shard_of(a, count) == i);
                let mut c = RelayCore::new(config.clone(), identity.clone(), 1, mine);
                c.set_shard(i, count);
                c
            })
            .collect();
        Shards {
            cores,
            conns: HashMap::new(),
            merge: Merge::default(),
            merged: BTreeMap::new(),
            out: VecDeque::new(),
            max_group,
        }
    }

    pub fn count(&self) -> usize {
        self.cores.len()
    }

    fn of(&self, a: &Address) -> usize {
        shard_of(a, self.cores.len())
    }

    pub fn connect(
        &mut self,
        now: Instant,
        conn: ConnId,
        address: Address,
        proof: Option<RegistrationProof>,
        receive: bool,
    ) -> Result<(), ErrorCode> {
        let s = self.of(&address);
        self.cores[s].connect(now, conn, address, proof, receive)?;
        self.conns.insert(conn, address);
        self.route(s);
        Ok(())
    }

    pub fn disconnect(&mut self, now: Instant, conn: ConnId) {
        let Some(address) = self.conns.remove(&conn) else {
            return;
        };
        self.merge.forget(conn);
        let s = self.of(&address);
        self.cores[s].disconnect(now, conn);
        self.route(s);
    }

    /// A MSG from a registered connection, as [`RelayCore::handle_msg`].
    pub fn handle_msg(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Bytes,
        msg: &Msg,
        group: Option<Result<Vec<Address>, ErrorCode>>,
    ) {
        let Some(&address) = self.conns.get(&conn) else {
            return;
        };
        let refuse = |this: &mut Self, r: Receipt| {
            this.out.push_back(Transmit {
                to: crate::Target::Conn(conn),
                frame: RelayToClient::Receipt(r).encode(),
                soft: false,
            })
        };
        if msg.from != address {
            return refuse(self, reject(msg.id, ErrorCode::SpoofedSender));
        }
        match split(msg, group, self.max_group, self.cores.len()) {
            Split::Refused(r) => refuse(self, r),
            Split::Whole(s, to) => {
                self.cores[s].handle_part(now, Reply::Client(conn), frame, msg, to);
                self.route(s);
            }
            Split::Parts { parts, order } => {
                match self.merge.frame(conn, msg.id) {
                    // Sent again on the same connection: the merged
                    // receipt answers both.
                    Some(f) if *f == frame => return,
                    Some(_) => return refuse(self, reject(msg.id, ErrorCode::Duplicate)),
                    None => {}
                }
                self.merge.expect(conn, msg, &frame, &parts, order);
                for (s, to) in parts {
                    self.cores[s].handle_part(now, Reply::Part(conn), frame.clone(), msg, to);
                    self.route(s);
                }
            }
        }
    }

    pub fn handle_ack(&mut self, now: Instant, conn: ConnId, ids: &[MsgId]) {
        let Some(address) = self.conns.get(&conn) else {
            return;
        };
        let s = self.of(address);
        self.cores[s].handle_ack(now, conn, ids);
        self.route(s);
    }

    pub fn store_done(&mut self, now: Instant, done: StoreDone) {
        let s = shard_of_answer(&done, self.cores.len());
        self.cores[s].store_done(now, done);
        self.route(s);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for s in 0..self.cores.len() {
            self.cores[s].handle_timeout(now);
            self.route(s);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.cores.iter().filter_map(RelayCore::poll_timeout).min()
    }

    /// Moves shard `s`'s partial receipts and notices where they go.
    fn route(&mut self, s: usize) {
        while let Some((conn, r)) = self.cores[s].poll_part() {
            if let Some(r) = self.merge.part(conn, s, r) {
                *self.merged.entry(r.status as u8).or_default() += 1;
                self.out.push_back(Transmit {
                    to: crate::Target::Conn(conn),
                    frame: RelayToClient::Receipt(r).encode(),
                    soft: false,
                });
            }
        }
        while let Some((address, frame)) = self.cores[s].poll_notice() {
            let t = self.of(&address);
            self.cores[t].notice_to(address, frame);
        }
    }

    /// Frames for connections: each shard's, then the merged receipts.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        for c in &mut self.cores {
            if let Some(t) = c.poll_transmit() {
                return Some(t);
            }
        }
        self.out.pop_front()
    }

    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.cores.iter_mut().find_map(RelayCore::poll_store)
    }

    pub fn poll_close(&mut self) -> Option<(ConnId, ErrorCode)> {
        self.cores.iter_mut().find_map(RelayCore::poll_close)
    }

    pub fn in_flight(&self) -> usize {
        self.cores.iter().map(RelayCore::in_flight).sum()
    }

    /// Split messages whose receipts are being joined.
    pub fn merging(&self) -> usize {
        self.merge.len()
    }

    /// The split messages still waiting for parts, and which shards they
    /// wait for (for a test's report).
    pub fn merging_detail(&self) -> Vec<String> {
        self.merge
            .pending
            .iter()
            .map(|((c, id), p)| {
                let shards: Vec<usize> = p.waiting.iter().map(|(s, _)| *s).collect();
                format!("{c:?} {id:?} {:?} waits for shards {shards:?}", p.route)
            })
            .collect()
    }

    /// Every shard's counts added up.
    pub fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for c in &self.cores {
            total.add(c.stats());
        }
        for (status, n) in &self.merged {
            *total.receipts.entry(*status).or_default() += n;
        }
        total
    }
}
