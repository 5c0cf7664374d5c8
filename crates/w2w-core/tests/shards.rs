//! A relay split into shards (shard.rs) against the same relay as one core:
//! one seeded workload (sessions coming and going, a2a, a2b, a2g, groups,
//! a2n, resends, reused ids, ACKs given late or never, store writes,
//! deadlines) run through both must give every connection the same
//! messages in the same order, the same receipts and the same notices. A
//! failing seed replays: `SHARD_SEED=n cargo test -p w2w-core --test shards`
//! (`SHARD_TRACE=<id prefix>` follows a message, `TRACE_STORE=1` prints
//! every store op). The store commits some writes at once and some one or
//! two clock steps later, fails one in 23, and keeps one row per
//! (recipient, id) as the real one does.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use w2w_core::flight::summarize;
use w2w_core::shard::Shards;
use w2w_core::sim::Rng;
use w2w_core::{Config, ConnId, RelayCore, StoreDone, StoreOp, Stored, Target, Transmit};
use w2w_proto::frame::{
    ClientToRelay, Dest, Msg, MsgId, Notice, Receipt, ReceiptEntry, RelayToClient, Route, Scope,
    Status,
};
use w2w_proto::{Address, ErrorCode, Identity};

/// What both relays take.
trait Relay {
    fn connect(
        &mut self,
        now: Instant,
        conn: ConnId,
        a: Address,
        rx: bool,
    ) -> Result<(), ErrorCode>;
    fn disconnect(&mut self, now: Instant, conn: ConnId);
    fn msg(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Bytes,
        m: &Msg,
        group: Option<Vec<Address>>,
    );
    fn ack(&mut self, now: Instant, conn: ConnId, ids: &[MsgId]);
    fn store_done(&mut self, now: Instant, d: StoreDone);
    fn timeout(&mut self, now: Instant);
    fn transmit(&mut self) -> Option<Transmit>;
    fn store(&mut self) -> Option<StoreOp>;
    fn close(&mut self) -> Option<(ConnId, ErrorCode)>;
}

/// Both take the same calls under the same names.
macro_rules! relay {
    ($t:ty) => {
        impl Relay for $t {
            fn connect(
                &mut self,
                now: Instant,
                conn: ConnId,
                a: Address,
                rx: bool,
            ) -> Result<(), ErrorCode> {
                <$t>::connect(self, now, conn, a, None, rx)
            }
            fn disconnect(&mut self, now: Instant, conn: ConnId) {
                <$t>::disconnect(self, now, conn)
            }
            fn msg(
                &mut self,
                now: Instant,
                conn: ConnId,
                frame: Bytes,
                m: &Msg,
                group: Option<Vec<Address>>,
            ) {
                self.handle_msg(now, conn, frame, m, group.map(Ok))
            }
            fn ack(&mut self, now: Instant, conn: ConnId, ids: &[MsgId]) {
                self.handle_ack(now, conn, ids)
            }
            fn store_done(&mut self, now: Instant, d: StoreDone) {
                <$t>::store_done(self, now, d)
            }
            fn timeout(&mut self, now: Instant) {
                self.handle_timeout(now)
            }
            fn transmit(&mut self) -> Option<Transmit> {
                self.poll_transmit()
            }
            fn store(&mut self) -> Option<StoreOp> {
                self.poll_store()
            }
            fn close(&mut self) -> Option<(ConnId, ErrorCode)> {
                self.poll_close()
            }
        }
    };
}
relay!(RelayCore);
relay!(Shards);

/// One step of the workload, the same for both relays.
#[derive(Debug, Clone)]
enum Step {
    Connect {
        conn: u64,
        client: usize,
        receive: bool,
    },
    Disconnect {
        conn: u64,
    },
    Send {
        conn: u64,
        frame: Bytes,
        group: Option<Vec<Address>>,
    },
    Advance {
        ms: u64,
    },
}

/// What a connection saw, in order (notices apart: they may come at
/// another point of the stream).
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    msgs: Vec<(MsgId, Address)>,
    receipts: BTreeMap<MsgId, Vec<Receipt>>,
    notices: Vec<Vec<u8>>,
}

/// A relay, its store (answered at once, sequence numbers per
/// recipient) and its clients, who ACK a message at once, after the
/// next step, or never, decided by its id and their connection.
struct World<R: Relay> {
    relay: R,
    now: Instant,
    store: HashMap<Address, BTreeMap<i64, (MsgId, Bytes)>>,
    seq: HashMap<Address, i64>,
    open: HashMap<u64, Address>,
    seen: BTreeMap<u64, Seen>,
    later: Vec<(u64, MsgId)>,
    trace: Option<String>,
    /// Clock steps so far, and writes that commit at a later one.
    advances: u64,
    commits: Vec<(u64, (Address, MsgId), StoreDone)>,
    /// Store ops in the current step.
    ops: u64,
}

impl<R: Relay> World<R> {
    fn new(relay: R, now: Instant) -> Self {
        World {
            relay,
            now,
            store: HashMap::new(),
            seq: HashMap::new(),
            open: HashMap::new(),
            seen: BTreeMap::new(),
            later: Vec::new(),
            trace: std::env::var("SHARD_TRACE").ok(),
            advances: 0,
            commits: Vec::new(),
            ops: 0,
        }
    }

    fn step(&mut self, s: &Step, clients: &[Address]) {
        self.ops = 0;
        if self.trace.is_some() {
            eprintln!(
                " step {s:?}",
                s = match s {
                    Step::Send { conn, .. } => format!("send from {conn}"),
                    o => format!("{o:?}"),
                }
            );
        }
        match s {
            Step::Connect {
                conn,
                client,
                receive,
            } => {
                let a = clients[*client];
                if self
                    .relay
                    .connect(self.now, ConnId(*conn), a, *receive)
                    .is_ok()
                {
                    self.open.insert(*conn, a);
                }
            }
            Step::Disconnect { conn } => {
                if self.open.remove(conn).is_some() {
                    self.relay.disconnect(self.now, ConnId(*conn));
                }
            }
            Step::Send { conn, frame, group } => {
                if self.open.contains_key(conn) {
                    let Ok(ClientToRelay::Msg(m)) = ClientToRelay::decode(frame) else {
                        panic!("a MSG");
                    };
                    self.relay
                        .msg(self.now, ConnId(*conn), frame.clone(), &m, group.clone());
                }
            }
            Step::Advance { ms } => {
                self.now += Duration::from_millis(*ms);
                self.advances += 1;
                // Writes due now commit, in an order both relays share.
                let (mut due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.commits)
                    .into_iter()
                    .partition(|(at, ..)| *at <= self.advances);
                self.commits = keep;
                due.sort_by_key(|(_, key, _)| *key);
                for (_, key, done) in due {
                    if std::env::var("TRACE_STORE").is_ok() {
                        eprintln!("COMMIT {key:?} {done:?}");
                    }
                    self.relay.store_done(self.now, done);
                }
                for (conn, id) in std::mem::take(&mut self.later) {
                    if self.open.contains_key(&conn) {
                        self.relay.ack(self.now, ConnId(conn), &[id]);
                    }
                }
                self.relay.timeout(self.now);
            }
        }
        self.settle();
    }

    /// Runs the store, the deliveries and the ACKs they cause until
    /// nothing moves.
    fn settle(&mut self) {
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            assert!(rounds < 100_000, "the relay never settles");
            let mut moved = false;
            while let Some(op) = self.relay.store() {
                moved = true;
                self.run(op);
            }
            let mut acks: Vec<(u64, MsgId)> = Vec::new();
            while let Some(t) = self.relay.transmit() {
                moved = true;
                let Target::Conn(ConnId(conn)) = t.to else {
                    panic!("no peers here");
                };
                if !self.open.contains_key(&conn) {
                    continue;
                }
                let seen = self.seen.entry(conn).or_default();
                match RelayToClient::decode(&t.frame).expect("a valid frame") {
                    RelayToClient::Msg(m) => {
                        if self
                            .trace
                            .as_ref()
                            .is_some_and(|h| format!("{:?}", m.id).contains(h.as_str()))
                        {
                            eprintln!(
                                "  clock step {} conn {conn} gets it, policy {}",
                                self.advances,
                                policy(conn, &m.id)
                            );
                        }
                        seen.msgs.push((m.id, m.from));
                        match policy(conn, &m.id) {
                            0 => acks.push((conn, m.id)),
                            1 => self.later.push((conn, m.id)),
                            _ => {}
                        }
                    }
                    RelayToClient::Receipt(r) => {
                        if self
                            .trace
                            .as_ref()
                            .is_some_and(|h| format!("{:?}", r.id).contains(h.as_str()))
                        {
                            eprintln!("  clock step {} conn {conn} receipt {r:?}", self.advances);
                        }
                        seen.receipts.entry(r.id).or_default().push(r)
                    }
                    RelayToClient::Notice(_) => seen.notices.push(t.frame.to_vec()),
                    other => panic!("unexpected {other:?}"),
                }
            }
            for (conn, id) in acks {
                self.relay.ack(self.now, ConnId(conn), &[id]);
            }
            while let Some((conn, _)) = self.relay.close() {
                moved = true;
                if self.open.remove(&conn.0).is_some() {
                    self.relay.disconnect(self.now, conn);
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn run(&mut self, op: StoreOp) {
        let now = self.now;
        // A relay that keeps asking its store without anything else
        // happening is stuck (e.g. reading for a copy that is not there).
        self.ops += 1;
        assert!(
            self.ops < 100_000,
            "the relay keeps asking the store: {op:?}"
        );
        if std::env::var("TRACE_STORE").is_ok() {
            match &op {
                StoreOp::Enqueue { recipient, id, .. } => {
                    eprintln!("OP enqueue {recipient:?} {id:?}")
                }
                StoreOp::Dequeue { recipient, id } => eprintln!("OP dequeue {recipient:?} {id:?}"),
                StoreOp::Read {
                    recipient, after, ..
                } => eprintln!(
                    "OP read {recipient:?} after {after} rows {:?}",
                    self.store
                        .get(recipient)
                        .map(|q| q.iter().map(|(s, (i, _))| (*s, *i)).collect::<Vec<_>>())
                ),
            }
        }
        match op {
            StoreOp::Enqueue {
                token,
                recipient,
                sender,
                id,
                frame,
            } => {
                // Some writes fail, some commit at once, some one or two
                // clock steps later: the same ones in both relays (chosen
                // by recipient and id).
                let h =
                    id.0.iter()
                        .chain(&recipient.0)
                        .fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(*b as u64));
                // One row per (recipient, id): the same sender's repeat is
                // taken as stored, another sender's refused (PROTOCOL 7.5).
                let q = self.store.entry(recipient).or_default();
                let held = q.values().find(|(i, _)| *i == id).map(|(_, f)| from_of(f));
                let result = match held {
                    Some(s) if s == sender => Ok(()),
                    Some(_) => Err(ErrorCode::Duplicate),
                    None if h % 23 == 0 => Err(ErrorCode::StorageFull),
                    None => {
                        let seq = self.seq.entry(recipient).or_default();
                        *seq += 1;
                        q.insert(*seq, (id, frame));
                        Ok(())
                    }
                };
                let done = StoreDone::Enqueued { token, result };
                match (h / 23) % 3 {
                    0 => self.relay.store_done(now, done),
                    later => self
                        .commits
                        .push((self.advances + later, (recipient, id), done)),
                }
            }
            StoreOp::Dequeue { recipient, id } => {
                if let Some(q) = self.store.get_mut(&recipient) {
                    q.retain(|_, (i, _)| *i != id);
                }
            }
            StoreOp::Read {
                token,
                recipient,
                after,
                limit,
            } => {
                let rows = self
                    .store
                    .get(&recipient)
                    .map(|q| {
                        q.range(after + 1..)
                            .take(limit)
                            .map(|(seq, (id, frame))| Stored {
                                seq: *seq,
                                id: *id,
                                frame: frame.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.relay.store_done(
                    now,
                    StoreDone::Read {
                        token,
                        result: Ok(rows),
                    },
                );
            }
        }
    }
}

/// The sender of a stored MSG frame.
fn from_of(frame: &Bytes) -> Address {
    match ClientToRelay::decode(frame) {
        Ok(ClientToRelay::Msg(m)) => m.from,
        other => panic!("not a MSG: {other:?}"),
    }
}

/// 0: ACK at once; 1: at the next step that moves the clock; 2: never.
fn policy(conn: u64, id: &MsgId) -> u8 {
    let h =
        id.0.iter()
            .fold(conn, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64));
    match h % 10 {
        0..=6 => 0,
        7 | 8 => 1,
        _ => 2,
    }
}

/// A seeded workload for `clients` addresses.
fn workload(seed: u64, clients: &[Address], steps: usize) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut open: Vec<(u64, usize)> = Vec::new();
    let mut next_conn = 1u64;
    let mut sent: Vec<(usize, Bytes, Option<Vec<Address>>)> = Vec::new();
    let pick = |rng: &mut Rng| clients[rng.below(clients.len())];
    for _ in 0..steps {
        match rng.below(20) {
            0..=2 => {
                let client = rng.below(clients.len());
                out.push(Step::Connect {
                    conn: next_conn,
                    client,
                    receive: rng.below(6) > 0,
                });
                open.push((next_conn, client));
                next_conn += 1;
            }
            3 if !open.is_empty() => {
                let (conn, _) = open.swap_remove(rng.below(open.len()));
                out.push(Step::Disconnect { conn });
            }
            4..=5 => out.push(Step::Advance {
                ms: [10, 300, 2_000, 6_000][rng.below(4)],
            }),
            6 if !sent.is_empty() => {
                // A message sent again, unchanged, by a session of its
                // sender (a resend after a lost connection). Only a2a and
                // a2b: a split message's parts are joined shard by shard
                // (PROTOCOL 7.6), which one core does not do.
                let (client, frame, group) = sent[rng.below(sent.len())].clone();
                let Ok(ClientToRelay::Msg(m)) = ClientToRelay::decode(&frame) else {
                    unreachable!()
                };
                let single = matches!(m.dest, Dest::A2a | Dest::A2b(_));
                if let Some(&(conn, _)) = open.iter().find(|(_, c)| *c == client).filter(|_| single)
                {
                    out.push(Step::Send { conn, frame, group });
                }
            }
            _ if !open.is_empty() => {
                let (conn, client) = open[rng.below(open.len())];
                let from = clients[client];
                let mut group = None;
                let mut dest = match rng.below(10) {
                    0 => Dest::A2a,
                    1..=4 => Dest::A2b(pick(&mut rng)),
                    5..=6 => Dest::A2g((0..1 + rng.below(5)).map(|_| pick(&mut rng)).collect()),
                    7 => {
                        // Members are unique, as the group store keeps them.
                        let mut m: Vec<Address> =
                            (0..1 + rng.below(5)).map(|_| pick(&mut rng)).collect();
                        let mut seen = std::collections::BTreeSet::new();
                        m.retain(|a| seen.insert(*a));
                        group = Some(m);
                        Dest::Group("crew".into())
                    }
                    8 => Dest::A2n(Scope::Relay),
                    _ => Dest::A2g(Vec::new()),
                };
                // Now and then an id reused for another message to the same
                // recipient (a shard checks the ids of its recipients'
                // messages; one core checks all).
                let reused = if rng.below(15) == 0 && !sent.is_empty() {
                    let (_, f, _) = &sent[rng.below(sent.len())];
                    let Ok(ClientToRelay::Msg(m)) = ClientToRelay::decode(f) else {
                        unreachable!()
                    };
                    match m.dest {
                        Dest::A2b(to) => Some((m.id, to)),
                        _ => None,
                    }
                } else {
                    None
                };
                let id = if let Some((id, to)) = reused {
                    dest = Dest::A2b(to);
                    group = None;
                    id
                } else {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
                    id[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
                    MsgId(id)
                };
                let frame = ClientToRelay::Msg(Msg {
                    flags: 0,
                    id,
                    from,
                    dest,
                    payload: Bytes::from(rng.next_u64().to_le_bytes().to_vec()),
                })
                .encode();
                sent.push((client, frame.clone(), group.clone()));
                out.push(Step::Send { conn, frame, group });
            }
            _ => {}
        }
    }
    // Long enough for every deadline and late write.
    for _ in 0..4 {
        out.push(Step::Advance { ms: 10_000 });
    }
    out
}

fn run(seed: u64, shards: usize) -> Result<(), String> {
    let clients: Vec<Address> = (0..12u64)
        .map(|i| {
            Identity::from_seed([(i as u8).wrapping_add(seed as u8).wrapping_mul(7) | 1; 32])
                .address()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let steps = workload(seed, &clients, 400);
    let config = Config {
        hash_seed: [seed, 1, 2, 3],
        ..Config::default()
    };
    let identity = Identity::from_seed([0xee; 32]);
    let now = Instant::now();
    let mut one = World::new(RelayCore::new(config.clone(), identity.clone(), 1, []), now);
    let mut many = World::new(Shards::new(config, identity, shards, 1, &[]), now);
    for (i, s) in steps.iter().enumerate() {
        one.step(s, &clients);
        many.step(s, &clients);
        if one.open != many.open {
            return Err(format!("seed {seed}: sessions differ after step {i} {s:?}"));
        }
    }
    if many.relay.merging() != 0 {
        return Err(format!(
            "seed {seed}: {} receipts never merged: {:?}",
            many.relay.merging(),
            many.relay.merging_detail()
        ));
    }
    if let Ok(hex) = std::env::var("SHARD_TRACE") {
        for (name, w) in [("one", &one.seen), ("many", &many.seen)] {
            for (c, seen) in w.iter() {
                for (id, r) in &seen.receipts {
                    if format!("{id:?}").contains(&hex) {
                        eprintln!("{name} conn {c}: {r:?}");
                    }
                }
                for (i, (id, from)) in seen.msgs.iter().enumerate() {
                    if format!("{id:?}").contains(&hex) {
                        eprintln!("{name} conn {c} got it #{i} from {from:?}");
                    }
                }
            }
        }
        for (i, st) in steps.iter().enumerate() {
            if let Step::Send { conn, frame, .. } = st {
                if let Ok(ClientToRelay::Msg(m)) = ClientToRelay::decode(frame) {
                    if format!("{:?}", m.id).contains(&hex) {
                        eprintln!("step {i}: conn {conn} sends {:?}", m.dest);
                    }
                }
            }
        }
    }
    // A shard settles its part of a split message on its own: a
    // recipient that acknowledges after its part's deadline is `queued`
    // in the receipt and followed by a NOTICE DELIVERED, where one core,
    // still waiting for another recipient, reports it `delivered`. Both
    // are true; the comparison reads a `queued` entry whose notice came as
    // `delivered`, and then leaves out the notice and the session count.
    let routes: HashMap<MsgId, Route> = steps
        .iter()
        .rev()
        .filter_map(|st| match st {
            Step::Send { frame, .. } => match ClientToRelay::decode(frame) {
                Ok(ClientToRelay::Msg(m)) => Some((m.id, m.dest.route())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let (a_up, b_up) = (
        normalize(&mut one.seen, &routes),
        normalize(&mut many.seen, &routes),
    );
    let upgraded: std::collections::BTreeSet<(MsgId, Address)> =
        a_up.union(&b_up).copied().collect();
    let conns: std::collections::BTreeSet<u64> =
        one.seen.keys().chain(many.seen.keys()).copied().collect();
    for c in conns {
        let (a, b) = (
            one.seen.remove(&c).unwrap_or_default(),
            many.seen.remove(&c).unwrap_or_default(),
        );
        if a.msgs != b.msgs {
            return Err(format!(
                "seed {seed}: conn {c} got other messages:\n one core {:?}\n shards   {:?}",
                a.msgs, b.msgs
            ));
        }
        let ids: std::collections::BTreeSet<&MsgId> =
            a.receipts.keys().chain(b.receipts.keys()).collect();
        for id in ids {
            let (ra, rb) = (a.receipts.get(id), b.receipts.get(id));
            let loose = upgraded.iter().any(|(i, _)| i == id);
            let split = matches!(routes.get(id), Some(Route::A2g | Route::Group | Route::A2n));
            let same = match (ra, rb) {
                // A part may settle later than the whole message on one
                // core (each shard's grace starts at its own recipients'
                // first ACK): the sender's connection can end first.
                (Some(_), None) if split && !many.open.contains_key(&c) => true,
                // A part settled on its own may say `queued` (written,
                // handed again later) where the whole message on one core,
                // still waiting for another recipient, saw the late ACK.
                (Some(x), Some(y)) if split => {
                    x.len() == y.len()
                        && x.iter().zip(y).all(|(x, y)| {
                            let later = |e: &ReceiptEntry, f: &ReceiptEntry| {
                                e.to == f.to
                                    && e.status == Status::Delivered
                                    && f.status == Status::Queued
                            };
                            let pairs = || x.entries.iter().zip(&y.entries);
                            // (Fewer sessions counted: an ACK one core
                            // counted came after the part had settled.)
                            x == y
                                || ((x.status, x.reason, &x.entries)
                                    == (y.status, y.reason, &y.entries)
                                    && (loose || y.delivered <= x.delivered))
                                || (x.entries.len() == y.entries.len()
                                    && pairs().all(|(e, f)| e == f || later(e, f))
                                    && pairs().any(|(e, f)| later(e, f)))
                        })
                }
                (Some(x), Some(y)) if loose => {
                    x.len() == y.len()
                        && x.iter().zip(y).all(|(x, y)| {
                            (x.status, x.reason, &x.entries) == (y.status, y.reason, &y.entries)
                        })
                }
                _ => ra == rb,
            };
            if !same {
                return Err(format!("seed {seed}: conn {c}, receipt for {id:?}:\n one core {ra:?}\n shards   {rb:?}"));
            }
        }
        // Notices: the same, except that shards may add some for split
        // messages (a part settled before a late ACK, its receipt maybe
        // gone with a closed connection).
        let keep = |v: Vec<Vec<u8>>| -> Vec<(MsgId, Address)> {
            let mut v: Vec<(MsgId, Address)> = v
                .iter()
                .map(|f| match RelayToClient::decode(&Bytes::from(f.clone())) {
                    Ok(RelayToClient::Notice(Notice::Delivered { id, to })) => (id, to),
                    other => panic!("not a notice: {other:?}"),
                })
                .filter(|n| !upgraded.contains(n))
                .collect();
            v.sort();
            v
        };
        let (na, mut nb) = (keep(a.notices), keep(b.notices));
        for n in &na {
            match nb.iter().position(|x| x == n) {
                Some(i) => {
                    nb.remove(i);
                }
                None => {
                    return Err(format!(
                        "seed {seed}: conn {c}: only one core noticed {n:?}"
                    ))
                }
            }
        }
        let split =
            |id: &MsgId| matches!(routes.get(id), Some(Route::A2g | Route::Group | Route::A2n));
        if let Some(n) = nb.iter().find(|(id, _)| !split(id)) {
            return Err(format!("seed {seed}: conn {c}: only shards noticed {n:?}"));
        }
    }
    Ok(())
}

/// Reads each `queued` receipt entry that a NOTICE DELIVERED (to any
/// session) says arrived as `delivered`; returns those (id, recipient).
fn normalize(
    seen: &mut BTreeMap<u64, Seen>,
    routes: &HashMap<MsgId, Route>,
) -> std::collections::BTreeSet<(MsgId, Address)> {
    let notices: std::collections::BTreeSet<(MsgId, Address)> = seen
        .values()
        .flat_map(|s| s.notices.iter())
        .filter_map(|f| match RelayToClient::decode(&Bytes::from(f.clone())) {
            Ok(RelayToClient::Notice(Notice::Delivered { id, to })) => Some((id, to)),
            _ => None,
        })
        .collect();
    let mut up = std::collections::BTreeSet::new();
    for s in seen.values_mut() {
        for (id, rs) in s.receipts.iter_mut() {
            for r in rs.iter_mut() {
                let mut changed = false;
                for e in r.entries.iter_mut() {
                    if e.status == Status::Queued && notices.contains(&(*id, e.to)) {
                        e.status = Status::Delivered;
                        up.insert((*id, e.to));
                        changed = true;
                    }
                }
                if let (true, Some(route)) = (changed, routes.get(id)) {
                    (r.status, r.reason) = summarize(*route, &r.entries, r.delivered);
                }
            }
        }
    }
    up
}

#[test]
fn shards_answer_exactly_like_one_core() {
    if let Ok(seed) = std::env::var("SHARD_SEED") {
        let seed: u64 = seed.parse().expect("a number");
        for n in [2, 3, 4] {
            run(seed, n).unwrap();
        }
        return;
    }
    let mut failed = Vec::new();
    for seed in 0..300u64 {
        let n = 2 + (seed % 3) as usize;
        if let Err(e) = run(seed, n) {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 300 seeds differ; first: {}",
        failed.len(),
        failed[0]
    );
}

#[test]
fn one_shard_is_one_core() {
    for seed in 0..20 {
        run(seed, 1).unwrap();
    }
}
