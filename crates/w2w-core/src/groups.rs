//! Named groups across relays (PROTOCOL 12.14).
//!
//! A group lives on the relay where it was created (its *group relay*);
//! the shell keeps its members and its signed log there. What this module
//! adds is the way every other relay reaches it:
//!
//! * the group relay publishes a **group record** ("`name` lives here",
//!   signed by it) on the `replicas` relays closest to `group_key(name)`
//!   — placed, renewed and expired like an address's records;
//! * a relay whose client names a group it does not host **locates** it
//!   there (GROUP_GET kind 1) and then **asks** the group relay (kind 2:
//!   the state, for a GROUP_INFO or a MSG; kind 3: a signed operation);
//! * a MSG to such a group waits (in order, per group) for the state: its
//!   members become the recipients here, as for a group of this relay, so
//!   receipts, storage and forwarding are the ordinary ones.
//!
//! A create is checked against the federation first: a name another relay
//! hosts is `group_exists`. Two relays creating one name at the same
//! moment both succeed; the smaller `(since_ms, relay)` then holds the
//! name for every relay that does not host it (PROTOCOL 12.14).
//!
//! Inputs from the shell: [`RelayCore::host_group`] (a group of this
//! relay), [`RelayCore::group_request`] (a client's request about a group
//! this relay does not host), `handle_msg` with `group: None` (a MSG to
//! one), [`RelayCore::group_reply`] (the shell's answer to a question).
//! Outputs: [`RelayCore::poll_group_outcome`] (answers for clients here),
//! [`RelayCore::poll_group_question`] (questions for groups hosted here).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use w2w_proto::frame::{Msg, RequestOp};
use w2w_proto::group::{GroupInfo, GroupOp};
use w2w_proto::s2s::{
    group_key, GroupAnswer, GroupGet, GroupPut, GroupQuery, GroupRecord, GroupReply, RelayToRelay,
};
use w2w_proto::{Address, ErrorCode};

use std::time::Instant;

use crate::federation::NewRecord;
use crate::lookup::{Join, Lookups};
use crate::{ConnId, PeerId};

/// Most relays' records kept per group name (names two relays claim).
const MAX_CLAIMS: usize = 4;
/// Most group MSGs and requests waiting for one group at once.
const MAX_GROUP_WAITERS: usize = 1024;
/// Most questions from other relays waiting for the shell.
const MAX_QUESTIONS: usize = 4096;

/// What a client here asked about a group another relay hosts.
#[derive(Debug, Clone)]
pub enum GroupAsk {
    /// Create it here, if no relay hosts the name.
    Create(GroupOp),
    /// Its state (GROUP_INFO).
    Info,
    /// Apply this signed operation at the group's relay.
    Op(GroupOp),
}

/// An answer for a client of this relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutcome {
    /// The group's relay answered (or the group could not be reached):
    /// a RESPONSE for request `req_id` with request op code `op`.
    Answer {
        conn: ConnId,
        req_id: u32,
        op: u8,
        result: Result<GroupInfo, ErrorCode>,
    },
    /// No other relay hosts the name: the shell applies the create here
    /// (and then calls `host_group`).
    Create {
        conn: ConnId,
        req_id: u32,
        op: GroupOp,
    },
    /// A MSG from `conn` to a group of another relay went to `copies`
    /// members: the shell, which charged one copy when the MSG came,
    /// charges the sender's fan-out budget for the others.
    Fanout {
        conn: ConnId,
        copies: usize,
        bytes: usize,
    },
}

/// A question from relay `origin` about a group this relay hosts; the
/// shell answers it with [`RelayCore::group_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupQuestion {
    pub origin: Address,
    pub nonce: u64,
    /// `Info` or `Op` (a `Locate` is answered by the core).
    pub query: GroupQuery,
}

#[derive(Debug, Clone)]
enum Waiter {
    Request {
        conn: ConnId,
        /// The client's address (its session may be another shard's).
        sender: Address,
        req_id: u32,
        ask: GroupAsk,
    },
    Msg {
        conn: ConnId,
        frame: Bytes,
        msg: Box<Msg>,
    },
}

#[derive(Debug)]
struct Ask {
    home: Address,
    name: String,
    waiters: Vec<Waiter>,
    deadline: Instant,
}

/// The group state of the core beside the shell's tables.
#[derive(Debug, Default)]
pub(crate) struct GroupDir {
    /// Groups hosted here: their records, and the relays each was put on.
    own: BTreeMap<String, (GroupRecord, Vec<Address>)>,
    /// Other relays' records this relay holds, with their expiry.
    held: HashMap<String, Vec<(GroupRecord, Instant)>>,
    held_len: usize,
    /// Which relay hosts a name, as a recent locate found (until when).
    cache: HashMap<String, (Address, Instant)>,
    /// Locates on their way: GROUP_GETs to the relays that hold a name's
    /// group records.
    locates: Lookups<String, GroupRecord, Waiter>,
    /// Questions to group relays, by nonce: one per group at a time
    /// (later waiters join it).
    asks: HashMap<u64, Ask>,
    asking: HashMap<String, u64>,
    /// Questions' deadlines: (deadline, nonce), in time order.
    deadlines: BTreeSet<(Instant, u64)>,
    next_nonce: u64,
    outgoing: VecDeque<(Address, GroupRecord)>,
    outcomes: VecDeque<GroupOutcome>,
    questions: VecDeque<GroupQuestion>,
}

fn op_code(ask: &GroupAsk) -> u8 {
    match ask {
        GroupAsk::Info => RequestOp::GROUP_INFO,
        GroupAsk::Create(_) | GroupAsk::Op(_) => RequestOp::GROUP,
    }
}

/// The relay that holds a name of several relays' records (the smallest
/// `(since_ms, relay)`).
fn winner<'a>(records: impl IntoIterator<Item = &'a GroupRecord>) -> Option<Address> {
    records
        .into_iter()
        .min_by_key(|r| r.precedence())
        .map(|r| r.relay)
}

impl crate::relay::RelayCore {
    fn federated(&self) -> bool {
        self.links.len() > 1 || self.joining()
    }

    // -------------------------------------------------- groups hosted here

    /// Group `name` is hosted here: its record is published (and renewed)
    /// where the name's records belong. `created`: it was created just now
    /// (its record carries this relay's clock); otherwise it is older than
    /// the record (restored at start: `since_ms` 0).
    pub fn host_group(&mut self, now: Instant, name: &str, created: bool) {
        self.note_now(now);
        let since = if created { self.wall_ms(now) } else { 0 };
        let seq = self.next_record_seq();
        let rec = GroupRecord::sign(&self.identity, name, seq, since);
        self.groups.cache.remove(name);
        self.groups.own.insert(name.to_owned(), (rec, Vec::new()));
        self.place_groups(false);
    }

    /// Puts our group records on the relays responsible for them: all
    /// (`renew`), or only where they were not put yet.
    pub(crate) fn place_groups(&mut self, renew: bool) {
        let me = self.me;
        let names: Vec<String> = self.groups.own.keys().cloned().collect();
        for name in names {
            let targets: Vec<Address> = self
                .placement(&group_key(&name))
                .into_iter()
                .filter(|t| *t != me)
                .collect();
            let Some((rec, placed)) = self.groups.own.get_mut(&name) else {
                continue;
            };
            for t in &targets {
                if renew || !placed.contains(t) {
                    self.groups.outgoing.push_back((*t, rec.clone()));
                }
            }
            *placed = targets;
        }
        // Sent with the directory's next paced step (one step never sends
        // more than its allowance, whatever else it put).
        if !self.groups.outgoing.is_empty() && self.dir.put_at.is_none() {
            self.dir.put_at = self.dir.now.map(|n| n + crate::directory::PUT_PACE);
        }
    }

    /// Sends up to `n` waiting group records (the directory's pacing).
    pub(crate) fn flush_group_puts(&mut self, n: usize) {
        let n = n.min(self.groups.outgoing.len());
        let mut by_target: BTreeMap<Address, Vec<GroupRecord>> = BTreeMap::new();
        for (t, r) in self.groups.outgoing.drain(..n) {
            by_target.entry(t).or_default().push(r);
        }
        for (target, records) in by_target {
            for chunk in records.chunks(w2w_proto::s2s::MAX_DIR_RECORDS) {
                let put = RelayToRelay::GroupPut(GroupPut {
                    target,
                    hops: 1,
                    records: chunk.to_vec(),
                });
                if !self.route_to(&target, put.encode()) {
                    // No path now: put again when the relay set changes.
                    for r in chunk {
                        if let Some((_, placed)) = self.groups.own.get_mut(&r.name) {
                            placed.retain(|p| *p != target);
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn group_puts_waiting(&self) -> bool {
        !self.groups.outgoing.is_empty()
    }

    /// A renewal replaces what still waits from the last one.
    pub(crate) fn renew_groups(&mut self) {
        self.groups.outgoing.clear();
        self.place_groups(true);
    }

    /// Drops held group records whose lease ran out, and stale answers.
    pub(crate) fn sweep_groups(&mut self, now: Instant) {
        let mut dropped = 0;
        self.groups.held.retain(|_, v| {
            let before = v.len();
            v.retain(|(_, t)| *t > now);
            dropped += before - v.len();
            !v.is_empty()
        });
        self.groups.held_len -= dropped;
        self.groups.cache.retain(|_, (_, t)| *t > now);
    }

    pub(crate) fn on_group_put(&mut self, now: Instant, peer: PeerId, from: Address, d: GroupPut) {
        if d.target != self.me {
            let (hops, target) = (d.hops, d.target);
            return self.pass_on(hops, target, &from, |hops| {
                RelayToRelay::GroupPut(GroupPut { hops, ..d })
            });
        }
        let check = self.config.federation.check_signatures;
        let lease = self.config.federation.lease;
        for r in d.records {
            if !w2w_proto::group::valid_name(&r.name) || (check && r.verify().is_err()) {
                self.stats.records_refused += 1;
                continue;
            }
            if !self.responsible(&group_key(&r.name)) {
                self.stats.records_refused += 1;
                continue;
            }
            let held = self.groups.held.get(&r.name);
            let known = held.is_some_and(|v| v.iter().any(|(h, _)| h.relay == r.relay));
            let room = held.is_none_or(|v| v.len() < MAX_CLAIMS);
            let admitted = known || room && self.admit_new(peer, NewRecord::Group);
            if !admitted {
                if !room {
                    self.stats.records_refused += 1;
                }
                continue;
            }
            let held = self.groups.held.entry(r.name.clone()).or_default();
            if let Some((h, t)) = held.iter_mut().find(|(h, _)| h.relay == r.relay) {
                if h.seq <= r.seq {
                    *h = r;
                }
                *t = now + lease;
            } else {
                held.push((r, now + lease));
                self.groups.held_len += 1;
            }
        }
    }

    /// Group records this relay holds for other relays.
    pub fn group_records(&self) -> usize {
        self.groups.held_len
    }

    /// The relay that hosts `name` as far as this relay knows now.
    fn group_home(&self, name: &str) -> Option<Address> {
        if self.groups.own.contains_key(name) {
            return Some(self.me);
        }
        let now = self.dir.now;
        if let Some(w) = self
            .groups
            .held
            .get(name)
            .and_then(|v| winner(v.iter().map(|(r, _)| r)))
        {
            return Some(w);
        }
        self.groups
            .cache
            .get(name)
            .filter(|(_, t)| now.is_none_or(|n| n < *t))
            .map(|(r, _)| *r)
    }

    // ------------------------------------------- requests of clients here

    /// A client's request about group `name`, which this relay does not
    /// host: answered by [`Self::poll_group_outcome`] once the group's
    /// relay has answered (or at once, if it cannot be reached).
    pub fn group_request(
        &mut self,
        now: Instant,
        (conn, sender): (ConnId, Address),
        req_id: u32,
        name: &str,
        ask: GroupAsk,
    ) {
        self.note_now(now);
        let w = Waiter::Request {
            conn,
            sender,
            req_id,
            ask,
        };
        self.group_wait(now, name.to_owned(), w);
    }

    /// A MSG to group `name`, which this relay does not host.
    pub(crate) fn group_msg(&mut self, now: Instant, conn: ConnId, frame: Bytes, msg: &Msg) {
        self.note_now(now);
        let w2w_proto::frame::Dest::Group(name) = &msg.dest else {
            return;
        };
        let w = Waiter::Msg {
            conn,
            frame,
            msg: Box::new(msg.clone()),
        };
        self.group_wait(now, name.clone(), w);
    }

    fn group_wait(&mut self, now: Instant, name: String, w: Waiter) {
        if !self.federated() {
            return self.group_found(now, &name, None, w);
        }
        if let Some(home) = self.group_home(&name) {
            return self.group_found(now, &name, Some(home), w);
        }
        let w = match self.groups.locates.join(&name, w, MAX_GROUP_WAITERS) {
            Join::Joined => return,
            Join::Full(w) => return self.group_fail(now, w, ErrorCode::RateLimited),
            Join::Absent(w) => w,
        };
        let sender = match &w {
            Waiter::Request { sender, .. } => *sender,
            Waiter::Msg { msg, .. } => msg.from,
        };
        if !self.may_look_up(now, sender) {
            return self.group_fail(now, w, ErrorCode::RateLimited);
        }
        if self.groups.locates.len() >= self.config.federation.max_lookups {
            self.stats.lookups_refused += 1;
            return self.group_fail(now, w, ErrorCode::RateLimited);
        }
        self.groups.locates.start(now, name.clone(), w);
        self.locate(now, name);
    }

    /// One round of a locate: a GROUP_GET to each relay of the placement.
    fn locate(&mut self, now: Instant, name: String) {
        let me = self.me;
        let targets: Vec<Address> = self
            .placement(&group_key(&name))
            .into_iter()
            .filter(|t| *t != me)
            .collect();
        self.groups.next_nonce += 1;
        let nonce = self.groups.next_nonce;
        let mut asked = Vec::new();
        for t in targets {
            let get = RelayToRelay::GroupGet(GroupGet {
                origin: me,
                target: t,
                hops: 1,
                nonce,
                query: GroupQuery::Locate(name.clone()),
            });
            if self.route_to(&t, get.encode()) {
                asked.push(t);
            }
        }
        self.stats.lookups += 1;
        let deadline = now + self.config.federation.lookup_timeout;
        let finish_if_nobody = !self.joining();
        if self
            .groups
            .locates
            .round(&name, nonce, asked, deadline, finish_if_nobody)
        {
            self.finish_locate(now, &name);
        }
    }

    fn finish_locate(&mut self, now: Instant, name: &str) {
        let Some(l) = self.groups.locates.finish(name) else {
            return;
        };
        let home = winner(&l.found);
        if let Some(h) = home {
            if self.groups.cache.len() < self.config.federation.max_cache {
                let ttl = self.config.federation.cache_ttl;
                self.groups.cache.insert(name.to_owned(), (h, now + ttl));
            }
        }
        for w in l.waiters {
            self.group_found(now, name, home, w);
        }
    }

    /// Where `name` lives is known (`None`: nowhere): `w` goes on.
    fn group_found(&mut self, now: Instant, name: &str, home: Option<Address>, w: Waiter) {
        let elsewhere = home.filter(|h| *h != self.me);
        match (w, elsewhere) {
            // A create: refused if another relay hosts the name, else the
            // shell applies it here.
            (
                w @ Waiter::Request {
                    ask: GroupAsk::Create(_),
                    ..
                },
                Some(_),
            ) => self.group_fail(now, w, ErrorCode::GroupExists),
            (
                Waiter::Request {
                    conn,
                    req_id,
                    ask: GroupAsk::Create(op),
                    ..
                },
                None,
            ) => self
                .groups
                .outcomes
                .push_back(GroupOutcome::Create { conn, req_id, op }),
            (w, Some(h)) => self.ask_home(now, name, h, w),
            // Nowhere (or here per our records, but the shell did not
            // find it): unknown.
            (w, None) => self.group_fail(now, w, ErrorCode::UnknownGroup),
        }
    }

    /// Asks relay `home` about group `name` for `w`: one question per
    /// group at a time for its MSGs and GROUP_INFOs (they share the
    /// answer, in order); an operation has its own.
    fn ask_home(&mut self, now: Instant, name: &str, home: Address, w: Waiter) {
        let shares = !matches!(
            &w,
            Waiter::Request {
                ask: GroupAsk::Op(_),
                ..
            }
        );
        if shares {
            if let Some(nonce) = self.groups.asking.get(name) {
                if let Some(a) = self.groups.asks.get_mut(nonce) {
                    if a.home == home && a.waiters.len() < MAX_GROUP_WAITERS {
                        a.waiters.push(w);
                        return;
                    }
                }
            }
        }
        if self.groups.asks.len() >= self.config.federation.max_lookups {
            return self.group_fail(now, w, ErrorCode::RateLimited);
        }
        let query = match &w {
            Waiter::Request {
                ask: GroupAsk::Op(op),
                ..
            } => GroupQuery::Op(op.clone()),
            Waiter::Request { sender, .. } => GroupQuery::Info {
                name: name.to_owned(),
                asker: *sender,
            },
            Waiter::Msg { msg, .. } => GroupQuery::Info {
                name: name.to_owned(),
                asker: msg.from,
            },
        };
        self.groups.next_nonce += 1;
        let nonce = self.groups.next_nonce;
        let get = RelayToRelay::GroupGet(GroupGet {
            origin: self.me,
            target: home,
            hops: 1,
            nonce,
            query,
        });
        if !self.route_to(&home, get.encode()) {
            self.groups.cache.remove(name);
            return self.group_fail(now, w, ErrorCode::Unreachable);
        }
        // A question waits for a store write at the group's relay.
        let deadline = now + 2 * self.config.federation.lookup_timeout;
        self.groups.asks.insert(
            nonce,
            Ask {
                home,
                name: name.to_owned(),
                waiters: vec![w],
                deadline,
            },
        );
        if shares {
            self.groups.asking.insert(name.to_owned(), nonce);
        }
        self.groups.deadlines.insert((deadline, nonce));
    }

    /// The group relay's answer (or a failure) for `w`. A state answer is
    /// shared by the MSGs and GROUP_INFOs that waited for it, whoever asked
    /// first: each gets it only if its own sender is a member.
    fn group_answered(&mut self, now: Instant, w: Waiter, result: Result<GroupInfo, ErrorCode>) {
        let asker = match &w {
            Waiter::Msg { msg, .. } => Some(msg.from),
            Waiter::Request {
                ask: GroupAsk::Info,
                sender,
                ..
            } => Some(*sender),
            Waiter::Request { .. } => None,
        };
        let result = match (result, asker) {
            (Ok(info), Some(a)) if !info.members.iter().any(|(m, _)| *m == a) => {
                Err(ErrorCode::NotMember)
            }
            (r, _) => r,
        };
        match w {
            Waiter::Request {
                conn, req_id, ask, ..
            } => {
                let op = op_code(&ask);
                self.groups.outcomes.push_back(GroupOutcome::Answer {
                    conn,
                    req_id,
                    op,
                    result,
                });
            }
            Waiter::Msg { conn, frame, msg } => {
                let members: Result<Vec<Address>, ErrorCode> = result.map(|info| {
                    info.members
                        .into_iter()
                        .map(|(m, _)| m)
                        .filter(|m| *m != msg.from)
                        .collect()
                });
                if let Ok(m) = &members {
                    let (copies, bytes) = (m.len(), frame.len());
                    self.groups.outcomes.push_back(GroupOutcome::Fanout {
                        conn,
                        copies,
                        bytes,
                    });
                }
                if self.shard.1 > 1 {
                    // Its members are split among the shards.
                    self.spread.push_back(crate::shard::Spread::Members {
                        conn,
                        frame,
                        msg,
                        members,
                    });
                } else {
                    self.handle_msg(now, conn, frame, &msg, Some(members));
                }
            }
        }
    }

    fn group_fail(&mut self, now: Instant, w: Waiter, code: ErrorCode) {
        self.stats.error(code);
        self.group_answered(now, w, Err(code));
    }

    /// An answer for a client here.
    pub fn poll_group_outcome(&mut self) -> Option<GroupOutcome> {
        self.groups.outcomes.pop_front()
    }

    // ------------------------------------------ questions for groups here

    pub(crate) fn on_group_get(&mut self, now: Instant, peer: PeerId, from: Address, g: GroupGet) {
        if g.target != self.me {
            let (hops, target) = (g.hops, g.target);
            return self.pass_on(hops, target, &from, |hops| {
                RelayToRelay::GroupGet(GroupGet { hops, ..g })
            });
        }
        if !self.get_allowed(now, peer) {
            return;
        }
        let name = g.query.name().to_owned();
        match g.query {
            GroupQuery::Locate(_) => {
                let mut records: Vec<GroupRecord> = self
                    .groups
                    .held
                    .get(&name)
                    .map(|v| v.iter().map(|(r, _)| r.clone()).collect())
                    .unwrap_or_default();
                if let Some((own, _)) = self.groups.own.get(&name) {
                    records.push(own.clone());
                }
                self.group_send_answer(g.origin, g.nonce, name, GroupReply::Located(records));
            }
            query if self.groups.own.contains_key(&name) => {
                if self.groups.questions.len() >= MAX_QUESTIONS {
                    self.stats.lookups_refused += 1;
                    return;
                }
                self.groups.questions.push_back(GroupQuestion {
                    origin: g.origin,
                    nonce: g.nonce,
                    query,
                });
            }
            _ => {
                let code = ErrorCode::UnknownGroup.as_u16();
                self.group_send_answer(g.origin, g.nonce, name, GroupReply::State(Err(code)));
            }
        }
    }

    /// A question about a group hosted here, for the shell.
    pub fn poll_group_question(&mut self) -> Option<GroupQuestion> {
        self.groups.questions.pop_front()
    }

    /// The shell's answer to question `nonce` of relay `origin`.
    pub fn group_reply(
        &mut self,
        now: Instant,
        origin: Address,
        nonce: u64,
        name: &str,
        result: Result<GroupInfo, ErrorCode>,
    ) {
        self.note_now(now);
        let reply = GroupReply::State(result.map_err(|c| c.as_u16()));
        self.group_send_answer(origin, nonce, name.to_owned(), reply);
    }

    fn group_send_answer(&mut self, origin: Address, nonce: u64, name: String, reply: GroupReply) {
        let a = RelayToRelay::GroupAnswer(GroupAnswer {
            origin,
            reporter: self.me,
            hops: 0,
            nonce,
            name,
            reply,
        });
        if !self.route_to(&origin, a.encode()) {
            self.stats.error(ErrorCode::NoRoute);
        }
    }

    pub(crate) fn on_group_answer(&mut self, now: Instant, from: Address, a: GroupAnswer) {
        if a.origin != self.me {
            let (hops, origin) = (a.hops, a.origin);
            return self.pass_on(hops, origin, &from, |hops| {
                RelayToRelay::GroupAnswer(GroupAnswer { hops, ..a })
            });
        }
        match a.reply {
            GroupReply::Located(records) => {
                let check = self.config.federation.check_signatures;
                let Some(l) = self.groups.locates.answer(&a.name, a.nonce, &a.reporter) else {
                    return;
                };
                for r in records {
                    if r.name == a.name && !(check && r.verify().is_err()) {
                        l.found.push(r);
                    }
                }
                l.found.truncate(MAX_CLAIMS * 4);
                if l.all_answered() || !l.found.is_empty() {
                    self.finish_locate(now, &a.name);
                }
            }
            GroupReply::State(result) => {
                let Some(ask) = self.groups.asks.get(&a.nonce) else {
                    return;
                };
                if ask.home != a.reporter || ask.name != a.name {
                    return;
                }
                let Some(ask) = self.groups.asks.remove(&a.nonce) else {
                    return;
                };
                self.groups.deadlines.remove(&(ask.deadline, a.nonce));
                if self.groups.asking.get(&ask.name) == Some(&a.nonce) {
                    self.groups.asking.remove(&ask.name);
                }
                let result =
                    result.map_err(|c| ErrorCode::from_u16(c).unwrap_or(ErrorCode::Internal));
                if result == Err(ErrorCode::UnknownGroup) {
                    // The record was stale: look again next time.
                    self.groups.cache.remove(&ask.name);
                }
                for w in ask.waiters {
                    self.group_answered(now, w, result.clone());
                }
            }
        }
    }

    // --------------------------------------------------------------- time

    pub(crate) fn groups_timeout(&self) -> Option<Instant> {
        let ask = self.groups.deadlines.first().map(|(t, _)| *t);
        ask.into_iter()
            .chain(self.groups.locates.next_deadline())
            .min()
    }

    pub(crate) fn groups_tick(&mut self, now: Instant) {
        let joining = self.joining();
        while let Some((name, again)) = self.groups.locates.expired(now, joining) {
            if again {
                self.locate(now, name);
            } else {
                self.finish_locate(now, &name);
            }
        }
        while let Some(&(due, nonce)) = self.groups.deadlines.first() {
            if due > now {
                break;
            }
            self.groups.deadlines.pop_first();
            let Some(ask) = self.groups.asks.remove(&nonce) else {
                continue;
            };
            if self.groups.asking.get(&ask.name) == Some(&nonce) {
                self.groups.asking.remove(&ask.name);
            }
            self.groups.cache.remove(&ask.name);
            for w in ask.waiters {
                self.group_fail(now, w, ErrorCode::Timeout);
            }
        }
    }

    /// Whether no group question or locate is on its way.
    pub(crate) fn groups_idle(&self) -> bool {
        self.groups.locates.is_empty() && self.groups.asks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    //! Four relays in a line, 0 – 1 – 2 – 3, driven by hand: no I/O, time
    //! enters as `now`, the store answers at once.
    use super::*;
    use crate::{Config, RelayCore, StoreDone, StoreOp, Target};
    use std::time::Duration;
    use w2w_proto::frame::{ClientToRelay, Dest, MsgId, RelayToClient, Status};
    use w2w_proto::group::GroupAction;
    use w2w_proto::Identity;

    struct Net {
        cores: Vec<RelayCore>,
        /// (relay, peer id) → (relay, peer id) at the other end.
        links: HashMap<(usize, u64), (usize, u64)>,
        /// Frames each relay sent its clients: (relay, conn, frame).
        to_clients: Vec<(usize, ConnId, RelayToClient)>,
        questions: Vec<(usize, GroupQuestion)>,
        outcomes: Vec<(usize, GroupOutcome)>,
        now: Instant,
    }

    impl Net {
        fn line(n: usize) -> Net {
            let mut cores: Vec<RelayCore> = (0..n)
                .map(|i| {
                    let id = Identity::from_seed([i as u8 + 1; 32]);
                    RelayCore::new(Config::default(), id, 1, [])
                })
                .collect();
            let mut links = HashMap::new();
            for i in 0..n - 1 {
                let (a, b) = (cores[i].me, cores[i + 1].me);
                let (pa, pb) = (100 + i as u64, 200 + i as u64);
                cores[i]
                    .peer_up(PeerId(pa), b, String::new(), true)
                    .unwrap();
                cores[i + 1]
                    .peer_up(PeerId(pb), a, String::new(), false)
                    .unwrap();
                links.insert((i, pa), (i + 1, pb));
                links.insert((i + 1, pb), (i, pa));
            }
            let mut net = Net {
                cores,
                links,
                to_clients: Vec::new(),
                questions: Vec::new(),
                outcomes: Vec::new(),
                now: Instant::now(),
            };
            net.pump();
            net
        }

        /// Carries frames and store answers until nothing moves.
        fn pump(&mut self) {
            loop {
                let mut moved = false;
                for i in 0..self.cores.len() {
                    while let Some(t) = self.cores[i].poll_transmit() {
                        moved = true;
                        match t.to {
                            Target::Peer(p) => {
                                let (j, q) = self.links[&(i, p.0)];
                                let f = RelayToRelay::decode(&t.frame).unwrap();
                                self.cores[j].handle_peer_frame(self.now, PeerId(q), f);
                            }
                            Target::Conn(c) => {
                                let f = RelayToClient::decode(&t.frame).unwrap();
                                if let RelayToClient::Msg(m) = &f {
                                    self.cores[i].handle_ack(self.now, c, &[m.id]);
                                }
                                self.to_clients.push((i, c, f));
                            }
                        }
                    }
                    while let Some(op) = self.cores[i].poll_store() {
                        moved = true;
                        let done = match op {
                            StoreOp::Enqueue { token, .. } => StoreDone::Enqueued {
                                token,
                                result: Ok(()),
                            },
                            StoreOp::Read { token, .. } => StoreDone::Read {
                                token,
                                result: Ok(Vec::new()),
                            },
                            StoreOp::Dequeue { .. } => continue,
                        };
                        self.cores[i].store_done(self.now, done);
                    }
                    while let Some(q) = self.cores[i].poll_group_question() {
                        moved = true;
                        self.questions.push((i, q));
                    }
                    while let Some(o) = self.cores[i].poll_group_outcome() {
                        moved = true;
                        self.outcomes.push((i, o));
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            for c in &mut self.cores {
                c.handle_timeout(self.now);
            }
            self.pump();
        }

        /// `who` registers with `relay` (with a real proof: its record is
        /// published and looked up like any other).
        fn client(&mut self, relay: usize, conn: u64, who: &Identity) -> ConnId {
            use w2w_proto::frame::{Challenge, Role};
            use w2w_proto::handshake::ClientHandshake;
            let relay_key = self.cores[relay].me;
            let mut hs = ClientHandshake::new(who.clone(), Role::Client, "ws://r/", [5; 32], None);
            let reg = hs
                .on_challenge(
                    Challenge {
                        relay_key,
                        relay_nonce: [6; 32],
                    },
                    1_000,
                )
                .unwrap();
            let proof = w2w_proto::s2s::RegistrationProof {
                address: who.address(),
                relay_key,
                relay_nonce: [6; 32],
                client_nonce: reg.client_nonce,
                timestamp_ms: reg.timestamp_ms,
                url: reg.url,
                sig_a: reg.sig_a,
            };
            let c = ConnId(conn);
            self.cores[relay]
                .connect(self.now, c, who.address(), Some(proof), true)
                .unwrap();
            self.pump();
            c
        }
    }

    /// The answer relay `at` gave request `req_id` of a client of its own.
    fn answer(net: &mut Net, at: usize, req_id: u32) -> (u8, Result<GroupInfo, ErrorCode>) {
        let i = net
            .outcomes
            .iter()
            .position(|(r, o)| {
                *r == at && matches!(o, GroupOutcome::Answer { req_id: q, .. } if *q == req_id)
            })
            .expect("an answer");
        match net.outcomes.remove(i).1 {
            GroupOutcome::Answer { op, result, .. } => (op, result),
            _ => unreachable!("matched above"),
        }
    }

    fn info(owner: &Identity, members: &[&Identity], seq: u64) -> GroupInfo {
        let mut members: Vec<(Address, bool)> = members
            .iter()
            .map(|m| (m.address(), m.address() == owner.address()))
            .collect();
        members.sort();
        GroupInfo {
            name: "team".into(),
            owner: owner.address(),
            members,
            seq,
        }
    }

    #[test]
    fn a_group_on_one_relay_is_found_asked_and_sent_to_from_the_far_end() {
        let (alice, bob, carol) = (
            Identity::from_seed([11; 32]),
            Identity::from_seed([12; 32]),
            Identity::from_seed([13; 32]),
        );
        let mut net = Net::line(4);
        let ca = net.client(0, 1, &alice);
        let cb = net.client(3, 2, &bob);
        let cc = net.client(1, 3, &carol);

        // Alice creates "team" at relay 0: no relay hosts it yet.
        let create = GroupOp::sign(&alice, "team", GroupAction::Create, 1);
        let now = net.now;
        net.cores[0].group_request(
            now,
            (ca, alice.address()),
            7,
            "team",
            GroupAsk::Create(create.clone()),
        );
        net.pump();
        assert_eq!(
            net.outcomes.pop(),
            Some((
                0,
                GroupOutcome::Create {
                    conn: ca,
                    req_id: 7,
                    op: create
                }
            ))
        );
        net.cores[0].host_group(now, "team", true);
        net.advance(Duration::from_millis(60)); // the paced put
        let now = net.now;

        // Bob at relay 3 cannot create the same name.
        let mine = GroupOp::sign(&bob, "team", GroupAction::Create, 1);
        net.cores[3].group_request(now, (cb, bob.address()), 8, "team", GroupAsk::Create(mine));
        net.pump();
        let (_, result) = answer(&mut net, 3, 8);
        assert_eq!(result, Err(ErrorCode::GroupExists));

        // Bob's GROUP_INFO reaches relay 0 as a question naming him.
        net.cores[3].group_request(now, (cb, bob.address()), 9, "team", GroupAsk::Info);
        net.pump();
        let (at, q) = net
            .questions
            .pop()
            .expect("a question at the group's relay");
        assert_eq!(at, 0);
        assert_eq!(
            q.query,
            GroupQuery::Info {
                name: "team".into(),
                asker: bob.address()
            }
        );
        let state = info(&alice, &[&alice, &bob, &carol], 3);
        net.cores[0].group_reply(now, q.origin, q.nonce, "team", Ok(state.clone()));
        net.pump();
        let (op, result) = answer(&mut net, 3, 9);
        assert_eq!(op, RequestOp::GROUP_INFO);
        assert_eq!(result, Ok(state.clone()));

        // An operation travels signed and comes back with the new state.
        let add = GroupOp::sign(&bob, "team", GroupAction::Add(Address([9; 32])), 4);
        net.cores[3].group_request(
            now,
            (cb, bob.address()),
            10,
            "team",
            GroupAsk::Op(add.clone()),
        );
        net.pump();
        let (_, q) = net.questions.pop().unwrap();
        assert_eq!(q.query, GroupQuery::Op(add));
        net.cores[0].group_reply(now, q.origin, q.nonce, "team", Err(ErrorCode::NotAllowed));
        net.pump();
        let (_, result) = answer(&mut net, 3, 10);
        assert_eq!(result, Err(ErrorCode::NotAllowed));

        // Bob's MSG to the group: the members (but him) are its recipients,
        // at relays 0 and 1; one receipt with both entries delivered.
        let msg = Msg {
            flags: 0,
            id: MsgId([5; 16]),
            from: bob.address(),
            dest: Dest::Group("team".into()),
            payload: Bytes::from_static(b"hi"),
        };
        let frame = ClientToRelay::Msg(msg.clone()).encode();
        let len = frame.len();
        net.cores[3].handle_msg(now, cb, frame, &msg, None);
        net.pump();
        let (_, q) = net.questions.pop().unwrap();
        net.cores[0].group_reply(now, q.origin, q.nonce, "team", Ok(state));
        net.pump();
        // The shell is told the fan-out, to charge the sender's budget.
        let fanout = GroupOutcome::Fanout {
            conn: cb,
            copies: 2,
            bytes: len,
        };
        assert!(net.outcomes.contains(&(3, fanout)));
        let mut got: Vec<(usize, ConnId)> = net
            .to_clients
            .iter()
            .filter(|(_, _, f)| matches!(f, RelayToClient::Msg(m) if m.id == msg.id))
            .map(|(r, c, _)| (*r, *c))
            .collect();
        got.sort();
        assert_eq!(got, vec![(0, ca), (1, cc)]);
        let receipt = net
            .to_clients
            .iter()
            .find_map(|(r, c, f)| match f {
                RelayToClient::Receipt(rc) if *r == 3 && *c == cb => Some(rc.clone()),
                _ => None,
            })
            .expect("a receipt");
        assert_eq!(receipt.status, Status::Delivered);
        assert_eq!(receipt.entries.len(), 2);
        assert!(net.cores.iter().all(|c| c.groups_idle()));
    }

    #[test]
    fn a_non_member_is_refused_and_a_silent_group_relay_times_out() {
        let (alice, bob) = (Identity::from_seed([11; 32]), Identity::from_seed([12; 32]));
        let mut net = Net::line(3);
        let cb = net.client(2, 2, &bob);
        let now = net.now;
        net.cores[0].host_group(now, "team", true);
        net.advance(Duration::from_millis(60)); // the paced put
        let now = net.now;
        let _ = alice;
        let msg = Msg {
            flags: 0,
            id: MsgId([6; 16]),
            from: bob.address(),
            dest: Dest::Group("team".into()),
            payload: Bytes::new(),
        };
        let frame = ClientToRelay::Msg(msg.clone()).encode();
        net.cores[2].handle_msg(now, cb, frame.clone(), &msg, None);
        net.pump();
        let (_, q) = net.questions.pop().unwrap();
        net.cores[0].group_reply(now, q.origin, q.nonce, "team", Err(ErrorCode::NotMember));
        net.pump();
        let reasons: Vec<(Status, u16)> = net
            .to_clients
            .iter()
            .filter_map(|(_, _, f)| match f {
                RelayToClient::Receipt(r) => Some((r.status, r.reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            vec![(Status::Rejected, ErrorCode::NotMember.as_u16())]
        );

        // The group's relay never answers: the sender hears `timeout`.
        let msg2 = Msg {
            id: MsgId([7; 16]),
            ..msg
        };
        let frame = ClientToRelay::Msg(msg2.clone()).encode();
        net.cores[2].handle_msg(now, cb, frame, &msg2, None);
        net.pump();
        assert_eq!(net.questions.len(), 1, "asked, and left unanswered");
        net.advance(Duration::from_secs(3));
        let last = net.to_clients.iter().rev().find_map(|(_, _, f)| match f {
            RelayToClient::Receipt(r) => Some((r.id, r.status, r.reason)),
            _ => None,
        });
        assert_eq!(
            last,
            Some((msg2.id, Status::Rejected, ErrorCode::Timeout.as_u16()))
        );
        assert!(net.cores.iter().all(|c| c.groups_idle()));

        // A name nobody hosts is unknown everywhere.
        let msg3 = Msg {
            id: MsgId([8; 16]),
            dest: Dest::Group("nobody".into()),
            ..msg2
        };
        let frame = ClientToRelay::Msg(msg3.clone()).encode();
        net.cores[2].handle_msg(net.now, cb, frame, &msg3, None);
        net.pump();
        let last = net.to_clients.iter().rev().find_map(|(_, _, f)| match f {
            RelayToClient::Receipt(r) => Some((r.id, r.reason)),
            _ => None,
        });
        assert_eq!(last, Some((msg3.id, ErrorCode::UnknownGroup.as_u16())));
    }

    /// Found by the simulation: MSGs waiting for one group share one
    /// question, asked for the first sender; an outsider's MSG that joined
    /// a member's question went out with the member's answer.
    #[test]
    fn a_shared_answer_is_checked_for_each_sender() {
        let (bob, mallory) = (Identity::from_seed([12; 32]), Identity::from_seed([14; 32]));
        let mut net = Net::line(2);
        let cb = net.client(1, 2, &bob);
        let cm = net.client(1, 4, &mallory);
        let now = net.now;
        net.cores[0].host_group(now, "team", true);
        net.advance(Duration::from_millis(60)); // the paced put
        let now = net.now;
        let mut ids = Vec::new();
        for (i, (who, conn)) in [(&bob, cb), (&mallory, cm)].into_iter().enumerate() {
            let msg = Msg {
                flags: 0,
                id: MsgId([20 + i as u8; 16]),
                from: who.address(),
                dest: Dest::Group("team".into()),
                payload: Bytes::new(),
            };
            let frame = ClientToRelay::Msg(msg.clone()).encode();
            net.cores[1].handle_msg(now, conn, frame, &msg, None);
            ids.push(msg.id);
        }
        net.pump();
        assert_eq!(net.questions.len(), 1, "one question for both");
        let (_, q) = net.questions.pop().unwrap();
        let state = GroupInfo {
            name: "team".into(),
            owner: bob.address(),
            members: vec![(bob.address(), true)],
            seq: 1,
        };
        net.cores[0].group_reply(now, q.origin, q.nonce, "team", Ok(state));
        net.pump();
        let receipts: Vec<(MsgId, Status, u16)> = net
            .to_clients
            .iter()
            .filter_map(|(_, _, f)| match f {
                RelayToClient::Receipt(r) => Some((r.id, r.status, r.reason)),
                _ => None,
            })
            .collect();
        assert!(
            receipts.contains(&(ids[0], Status::Delivered, 0)),
            "{receipts:?}"
        );
        assert!(
            receipts.contains(&(ids[1], Status::Rejected, ErrorCode::NotMember.as_u16())),
            "{receipts:?}"
        );
    }

    #[test]
    fn a_group_record_expires_with_its_lease_when_its_relay_is_gone() {
        let mut net = Net::line(3);
        let now = net.now;
        net.cores[0].host_group(now, "team", true);
        net.advance(Duration::from_millis(60)); // the paced put
        let key = group_key("team");
        let holders: Vec<usize> = (1..3)
            .filter(|i| net.cores[*i].groups.held.contains_key("team"))
            .collect();
        assert!(
            !holders.is_empty(),
            "placed on the relays closest to {key:?}"
        );
        // Relay 0 leaves; nobody renews its record.
        net.cores[1].peer_down(PeerId(200));
        net.cores[0].peer_down(PeerId(100));
        net.pump();
        let lease = net.cores[1].config.federation.lease;
        for _ in 0..4 {
            net.advance(lease / 2);
        }
        for i in 1..3 {
            assert!(!net.cores[i].groups.held.contains_key("team"), "relay {i}");
            assert_eq!(net.cores[i].groups.held_len, 0);
        }
    }
}
