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
//! Federation (session 11): every shard keeps the same link state and
//! peer links (shard 0 alone sends link state); an address's directory
//! records, lookups and custody live in its shard, a named group's records
//! and questions in its name's ([`shard_of_group`]). A peer's frame goes
//! where its key says ([`route_peer`]): a FORWARD to its sender's shard,
//! which checks it and hands the recipients of other shards on
//! ([`Spread::Forward`]; each shard answers its own FWD_RECEIPT, and a
//! FORWARD of a message already waiting from the same origin joins it); a
//! FWD_RECEIPT to its recipients' shards. Invariant: every flight's
//! recipients are in the flight's shard (a MSG to a group of another relay
//! is split by member once its members are known, [`Spread::Members`]).
//! Limits a client or peer could reach through any shard are counted for
//! the relay ([`RelayWide`]); table bounds are shared out.
//!
//! [`Shards`] drives N cores in one thread with exactly the routing a
//! multi-threaded caller uses (`split`, `Merge`, `shard_of_answer`,
//! `route_peer`, [`apply_spread`]): the differential test
//! (`tests/shards.rs`) runs it against a single core, and the federation
//! simulation (`sim.rs`) runs every relay as one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use w2w_proto::frame::{MsgId, Receipt, ReceiptEntry, RelayToClient, Route, Scope, Status};
use w2w_proto::s2s::{
    DirPut, ForwardTarget, FwdReceipt, GroupPut, RegistrationProof, RelayToRelay,
};
use w2w_proto::{Address, ErrorCode, Identity};

use crate::flight::{summarize, Reply};
use crate::relay::{reject, targets, Targets};
use crate::{Config, ConnId, PeerId, RelayCore, Stats, StoreDone, StoreOp, Transmit};
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

/// What a relay's shards count together, so that a limit holds for the
/// relay and not for each shard: the addresses kept in custody or waiting
/// to move (`max_custody`), and each client's lookups in the current
/// second (`lookups_per_client`). Taken per lookup or custody address,
/// never per message.
#[derive(Debug, Default)]
pub struct RelayWide {
    pub(crate) pending: Arc<AtomicUsize>,
    pub(crate) lookups: Mutex<HashMap<Address, (Instant, u32)>>,
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
            let mut parts: Vec<(usize, Targets)> = by_shard(list.iter().copied(), count)
                .into_iter()
                .map(|(s, l)| (s, Targets::List(l)))
                .collect();
            match parts.len() {
                0 => Split::Whole(home, Targets::List(Vec::new())),
                1 => {
                    let (s, t) = parts.remove(0);
                    Split::Whole(s, t)
                }
                _ => Split::Parts { parts, order: list },
            }
        }
        // A group of another relay is looked for by the group's shard.
        Ok(Targets::ElsewhereGroup) => {
            let s = match &msg.dest {
                w2w_proto::Dest::Group(name) => shard_of_group(name, count),
                _ => home,
            };
            Split::Whole(s, Targets::ElsewhereGroup)
        }
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

/// Work one shard hands to the others (`RelayCore::poll_spread`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spread {
    /// A FORWARD for clients of this relay, checked by its sender's shard:
    /// each shard serves its recipients among `to`
    /// ([`RelayCore::forward_part`]).
    Forward {
        origin: Address,
        frame: Bytes,
        msg: Box<Msg>,
        to: Vec<Address>,
    },
    /// A broadcast FORWARD, checked and passed on by its sender's shard,
    /// which handed it to its own connections (`delivered`): every other
    /// shard hands it to its connections ([`RelayCore::broadcast_here`])
    /// and `origin` is sent one FWD_RECEIPT with the sum
    /// ([`RelayCore::fwd_receipt`]).
    Broadcast {
        origin: Address,
        id: MsgId,
        frame: Bytes,
        delivered: u32,
    },
    /// A client's MSG to a group of another relay whose members its
    /// group's shard has learnt: split among the shards like an a2g
    /// (`members` as [`split`] takes a group's).
    Members {
        conn: ConnId,
        frame: Bytes,
        msg: Box<Msg>,
        members: Result<Vec<Address>, ErrorCode>,
    },
}

/// `list` grouped by shard, in shard order, each group in list order.
pub fn by_shard(
    list: impl IntoIterator<Item = Address>,
    count: usize,
) -> Vec<(usize, Vec<Address>)> {
    let list: Vec<Address> = list.into_iter().collect();
    grouped(&list, |a| shard_of(a, count)).into_iter().collect()
}

/// `items` grouped by `shard(item)`, in shard order, each group in order.
fn grouped<T: Clone>(items: &[T], shard: impl Fn(&T) -> usize) -> BTreeMap<usize, Vec<T>> {
    let mut by: BTreeMap<usize, Vec<T>> = BTreeMap::new();
    for x in items {
        by.entry(shard(x)).or_default().push(x.clone());
    }
    by
}

/// The shard of named group `name` (its records, its locates and the
/// questions about it, and the MSGs to it when another relay hosts it).
pub fn shard_of_group(name: &str, count: usize) -> usize {
    shard_of(&w2w_proto::s2s::group_key(name), count)
}

/// Where a peer's frame goes on a relay of `count` shards, as (shard,
/// frame) pairs: link state to every shard; a FORWARD to its sender's
/// shard (which checks it and hands its recipients on, [`Spread`]), a
/// hand-off to its recipient's; records, lookups and their answers to
/// their address's (or group name's) shard, a DIR_PUT or GROUP_PUT split
/// by record; what only passes through to shard 0; a FWD_RECEIPT for this
/// relay to the shards of the recipients it names (every flight is in the
/// shard of its recipients: a group MSG's members are split like an a2g's,
/// a hand-off goes from its address's shard), a broadcast's to every
/// shard (the one whose client sent it waits for it).
pub fn route_peer(me: &Address, frame: RelayToRelay, count: usize) -> Vec<(usize, RelayToRelay)> {
    use RelayToRelay as R;
    if count <= 1 {
        return vec![(0, frame)];
    }
    let one = |s: usize, f: RelayToRelay| vec![(s, f)];
    match frame {
        R::LinkState(_) => (0..count).map(|s| (s, frame.clone())).collect(),
        R::Presence(p) => one(shard_of(&p.proof.address, count), R::Presence(p)),
        R::Forward(f) => {
            let s = match &f.target {
                ForwardTarget::Handoff { to, .. } => shard_of(to, count),
                // The MSG's `from`, read where the header has it (a frame
                // too short goes to shard 0, which refuses it).
                _ if f.msg.len() >= 52 => {
                    let mut from = [0u8; 32];
                    from.copy_from_slice(&f.msg[20..52]);
                    shard_of(&Address(from), count)
                }
                _ => 0,
            };
            one(s, R::Forward(f))
        }
        R::FwdReceipt(r) if r.origin != *me => one(0, R::FwdReceipt(r)),
        R::FwdReceipt(r) if r.entries.is_empty() => {
            // A broadcast's count: the shard waiting for it takes it.
            (0..count).map(|s| (s, R::FwdReceipt(r.clone()))).collect()
        }
        R::FwdReceipt(r) => {
            // Sessions beyond one per delivered entry go with the first
            // part (the sender's receipt adds the parts up).
            let counted = |e: &[ReceiptEntry]| {
                e.iter().filter(|e| e.status == Status::Delivered).count() as u32
            };
            let mut extra = r.delivered.saturating_sub(counted(&r.entries));
            grouped(&r.entries, |e| shard_of(&e.to, count))
                .into_iter()
                .map(|(s, entries)| {
                    let delivered = counted(&entries) + std::mem::take(&mut extra);
                    let part = FwdReceipt {
                        delivered,
                        entries,
                        ..r.clone()
                    };
                    (s, R::FwdReceipt(part))
                })
                .collect()
        }
        R::DirPut(d) if d.target != *me => one(0, R::DirPut(d)),
        R::DirPut(d) => grouped(&d.records, |p| shard_of(&p.proof.address, count))
            .into_iter()
            .map(|(s, records)| {
                (
                    s,
                    R::DirPut(DirPut {
                        records,
                        ..d.clone()
                    }),
                )
            })
            .collect(),
        R::DirGet(g) => one(shard_of(&g.address, count), R::DirGet(g)),
        R::DirAnswer(a) => one(shard_of(&a.address, count), R::DirAnswer(a)),
        R::GroupPut(d) if d.target != *me => one(0, R::GroupPut(d)),
        R::GroupPut(d) => grouped(&d.records, |g| shard_of_group(&g.name, count))
            .into_iter()
            .map(|(s, records)| {
                (
                    s,
                    R::GroupPut(GroupPut {
                        records,
                        ..d.clone()
                    }),
                )
            })
            .collect(),
        R::GroupGet(g) => one(shard_of_group(g.query.name(), count), R::GroupGet(g)),
        R::GroupAnswer(a) => one(shard_of_group(&a.name, count), R::GroupAnswer(a)),
        R::Redirect(_) => Vec::new(),
    }
}

/// A relay's shards as their caller holds them (one thread, or a lock
/// each), for [`apply_spread`].
pub trait Cores {
    fn count(&self) -> usize;
    /// Runs `f` on shard `s` with the time, then carries out what it made
    /// (work for other shards included).
    fn on<R>(&mut self, s: usize, f: impl FnOnce(&mut RelayCore, Instant) -> R) -> R;
    /// A client's MSG (its sender checked when it came) to a group of
    /// another relay, whose members are now known: split like an a2g.
    fn group_members(
        &mut self,
        conn: ConnId,
        frame: Bytes,
        msg: &Msg,
        members: Result<Vec<Address>, ErrorCode>,
    );
}

/// Carries out `spread`, which shard `from` made (see [`Spread`]).
pub fn apply_spread(cores: &mut impl Cores, from: usize, spread: Spread) {
    match spread {
        Spread::Forward {
            origin,
            frame,
            msg,
            to,
        } => {
            for (t, list) in by_shard(to, cores.count()) {
                let frame = frame.clone();
                cores.on(t, |c, now| c.forward_part(now, origin, frame, &msg, list));
            }
        }
        Spread::Broadcast {
            origin,
            id,
            frame,
            mut delivered,
        } => {
            for t in (0..cores.count()).filter(|t| *t != from) {
                delivered += cores.on(t, |c, _| c.broadcast_here(id, &frame));
            }
            cores.on(from, |c, _| {
                let reporter = c.address();
                c.fwd_receipt(FwdReceipt {
                    origin,
                    reporter,
                    id,
                    hops: 0,
                    delivered,
                    entries: Vec::new(),
                })
            });
        }
        Spread::Members {
            conn,
            frame,
            msg,
            members,
        } => cores.group_members(conn, frame, &msg, members),
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

impl Cores for Shards {
    fn count(&self) -> usize {
        self.cores.len()
    }

    fn on<R>(&mut self, s: usize, f: impl FnOnce(&mut RelayCore, Instant) -> R) -> R {
        let now = self.now.unwrap_or_else(Instant::now);
        Shards::on(self, s, |c| f(c, now))
    }

    fn group_members(
        &mut self,
        conn: ConnId,
        frame: Bytes,
        msg: &Msg,
        members: Result<Vec<Address>, ErrorCode>,
    ) {
        let now = self.now.unwrap_or_else(Instant::now);
        self.client_msg(now, conn, frame, msg, Some(members))
    }
}

/// N cores as one relay, driven in one thread (see the module docs). It
/// takes the inputs the simulation gives a [`RelayCore`], peer links
/// included.
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
    /// The time of the latest input (for work handed between shards by an
    /// input that has none).
    now: Option<Instant>,
}

impl Shards {
    /// `count` cores for relay `identity` whose store knows `known`
    /// (`link_seq` as for [`RelayCore::new`]).
    pub fn new(
        config: Config,
        identity: Identity,
        count: usize,
        link_seq: u64,
        known: &[Address],
    ) -> Self {
        assert!(count >= 1);
        let max_group = config.max_group;
        let wide = Arc::new(RelayWide::default());
        let cores = (0..count)
            .map(|i| {
                let mine = known.iter().copied().filter(|a| shard_of(a, count) == i);
                let mut c = RelayCore::new(config.clone(), identity.clone(), link_seq, mine);
                if count > 1 {
                    c.set_shard(i, count);
                    c.share(wide.clone());
                }
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
            now: None,
        }
    }

    /// Applies `f` to shard `s`, then moves what it made for other shards.
    fn on<R>(&mut self, s: usize, f: impl FnOnce(&mut RelayCore) -> R) -> R {
        let r = f(&mut self.cores[s]);
        self.route(s);
        r
    }

    /// Applies `f` to every shard; the first shard's result.
    fn on_all<R>(&mut self, mut f: impl FnMut(&mut RelayCore) -> R) -> R {
        let first = self.on(0, &mut f);
        for s in 1..self.cores.len() {
            self.on(s, &mut f);
        }
        first
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
        self.now = Some(now);
        let s = self.of(&address);
        self.on(s, |c| c.connect(now, conn, address, proof, receive))?;
        self.conns.insert(conn, address);
        Ok(())
    }

    pub fn disconnect(&mut self, now: Instant, conn: ConnId) {
        let Some(address) = self.conns.remove(&conn) else {
            return;
        };
        self.now = Some(now);
        self.merge.forget(conn);
        let s = self.of(&address);
        self.on(s, |c| c.disconnect(now, conn));
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
        self.now = Some(now);
        let Some(&address) = self.conns.get(&conn) else {
            return;
        };
        if msg.from != address {
            return self.refuse(conn, reject(msg.id, ErrorCode::SpoofedSender));
        }
        if self.cores.len() == 1 {
            return self.on(0, |c| c.handle_msg(now, conn, frame, msg, group));
        }
        self.client_msg(now, conn, frame, msg, group)
    }

    fn refuse(&mut self, conn: ConnId, r: Receipt) {
        self.out.push_back(Transmit {
            to: crate::Target::Conn(conn),
            frame: RelayToClient::Receipt(r).encode(),
            soft: false,
        })
    }

    /// A client's MSG whose sender was checked, to its shards.
    fn client_msg(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Bytes,
        msg: &Msg,
        group: Option<Result<Vec<Address>, ErrorCode>>,
    ) {
        match split(msg, group, self.max_group, self.cores.len()) {
            Split::Refused(r) => self.refuse(conn, r),
            Split::Whole(s, to) => {
                self.on(s, |c| {
                    c.handle_part(now, Reply::Client(conn), frame, msg, to)
                });
            }
            Split::Parts { parts, order } => {
                match self.merge.frame(conn, msg.id) {
                    // Sent again on the same connection: the merged
                    // receipt answers both.
                    Some(f) if *f == frame => return,
                    Some(_) => return self.refuse(conn, reject(msg.id, ErrorCode::Duplicate)),
                    None => {}
                }
                self.merge.expect(conn, msg, &frame, &parts, order);
                for (s, to) in parts {
                    let frame = frame.clone();
                    self.on(s, |c| c.handle_part(now, Reply::Part(conn), frame, msg, to));
                }
            }
        }
    }

    pub fn handle_ack(&mut self, now: Instant, conn: ConnId, ids: &[MsgId]) {
        self.now = Some(now);
        let Some(address) = self.conns.get(&conn) else {
            return;
        };
        let s = self.of(address);
        self.on(s, |c| c.handle_ack(now, conn, ids));
    }

    pub fn store_done(&mut self, now: Instant, done: StoreDone) {
        self.now = Some(now);
        let s = shard_of_answer(&done, self.cores.len());
        self.on(s, |c| c.store_done(now, done));
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        self.on_all(|c| c.handle_timeout(now));
    }

    // -------------------------------------------------------- federation

    pub fn peer_up(
        &mut self,
        peer: PeerId,
        key: Address,
        url: String,
        dialled: bool,
    ) -> Result<bool, ErrorCode> {
        self.on_all(|c| c.peer_up(peer, key, url.clone(), dialled))
    }

    pub fn peer_down(&mut self, peer: PeerId) {
        self.on_all(|c| c.peer_down(peer))
    }

    pub fn set_clock(&mut self, now: Instant, unix_ms: u64) {
        self.now = Some(now);
        self.on_all(|c| c.set_clock(now, unix_ms))
    }

    pub fn expect_peers(&mut self, until: Instant) {
        self.on_all(|c| c.expect_peers(until))
    }

    pub fn restore_records(&mut self, proofs: impl IntoIterator<Item = RegistrationProof>) {
        let n = self.cores.len();
        let mut by: Vec<Vec<RegistrationProof>> = vec![Vec::new(); n];
        for p in proofs {
            by[shard_of(&p.address, n)].push(p);
        }
        for (s, proofs) in by.into_iter().enumerate() {
            self.on(s, |c| c.restore_records(proofs));
        }
    }

    pub fn add_custody(&mut self, addrs: impl IntoIterator<Item = Address>) {
        for (s, list) in by_shard(addrs, self.cores.len()) {
            self.on(s, |c| c.add_custody(list));
        }
    }

    pub fn host_group(&mut self, now: Instant, name: &str, created: bool) {
        self.now = Some(now);
        let s = shard_of_group(name, self.cores.len());
        self.on(s, |c| c.host_group(now, name, created))
    }

    pub fn group_reply(
        &mut self,
        now: Instant,
        origin: Address,
        nonce: u64,
        name: &str,
        result: Result<w2w_proto::group::GroupInfo, ErrorCode>,
    ) {
        self.now = Some(now);
        let s = shard_of_group(name, self.cores.len());
        self.on(s, |c| c.group_reply(now, origin, nonce, name, result))
    }

    /// A frame from a peer link, to its shards ([`route_peer`]).
    pub fn handle_peer_frame(&mut self, now: Instant, peer: PeerId, frame: RelayToRelay) {
        self.now = Some(now);
        let me = self.cores[0].address();
        for (s, f) in route_peer(&me, frame, self.cores.len()) {
            self.on(s, |c| c.handle_peer_frame(now, peer, f));
        }
    }

    pub fn poll_group_question(&mut self) -> Option<crate::GroupQuestion> {
        self.cores
            .iter_mut()
            .find_map(RelayCore::poll_group_question)
    }

    pub fn poll_group_outcome(&mut self) -> Option<crate::GroupOutcome> {
        self.cores
            .iter_mut()
            .find_map(RelayCore::poll_group_outcome)
    }

    // ----------------------------------------------- looks inside (tests)

    fn by_address(&self, a: &Address) -> &RelayCore {
        &self.cores[self.of(a)]
    }

    pub fn record_online(&self, address: &Address, relay: &Address) -> Option<bool> {
        self.by_address(address).record_online(address, relay)
    }

    pub fn debug_homes(&self, address: &Address) -> (Vec<(String, bool)>, bool, bool) {
        self.by_address(address).debug_homes(address)
    }

    pub fn newest_record(&self, address: &Address) -> Option<(Address, (u64, u64, Address))> {
        self.by_address(address).newest_record(address)
    }

    pub fn own_record(&self, address: &Address) -> Option<(u64, u64, Address)> {
        self.by_address(address).own_record(address)
    }

    pub fn directory_len(&self) -> usize {
        self.cores.iter().map(RelayCore::directory_len).sum()
    }

    pub fn directory_records(&self) -> (usize, usize) {
        self.cores
            .iter()
            .map(RelayCore::directory_records)
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    pub fn relays_known(&self) -> usize {
        self.cores[0].relays_known()
    }

    pub fn reachable_count(&mut self) -> usize {
        self.cores[0].reachable_count()
    }

    pub fn redirect_urls(&self) -> Vec<String> {
        self.cores[0].redirect_urls()
    }

    /// Whether every shard is idle and no receipt is being joined.
    pub fn is_idle(&self) -> bool {
        self.cores.iter().all(RelayCore::is_idle) && self.merge.is_empty() && self.out.is_empty()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.cores.iter().filter_map(RelayCore::poll_timeout).min()
    }

    /// Moves shard `s`'s partial receipts, notices and work for other
    /// shards where they go.
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
        while let Some(spread) = self.cores[s].poll_spread() {
            apply_spread(self, s, spread);
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
