//! Deterministic simulation of one relay core, its store and its clients.
//!
//! Everything runs in one thread on a simulated clock: client connections
//! are FIFO links with random delay that lose what is in flight when they
//! drop; the store executes ops in order after a random delay, commits
//! (what is committed survives a crash, nothing else does) and answers a
//! little later; the relay crashes and restarts from what the store holds.
//! All randomness comes from one seed, so a seed replays exactly:
//! `cargo run -p w2w-core --example sim -- --seed N`.
//!
//! Invariants, checked as the run goes and at its end:
//! * a receipt that says `delivered` is sent only after the recipient's
//!   client had the message; one that says `queued` only while the message
//!   is on disk or the recipient has it;
//! * every message receipted `delivered` or `queued` reaches its
//!   recipient's application exactly once, across crashes and reconnections;
//! * no connection is handed the same message twice;
//! * a stored copy is deleted only after its recipient had it;
//! * once quiet (every client connected, nothing sent) the core holds
//!   nothing in flight and the store holds no message.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use w2w_proto::frame::{ClientToRelay, Dest, Msg, MsgId, RelayToClient, Status};
use w2w_proto::{Address, ErrorCode};

use crate::{Config, ConnId, RelayCore, StoreDone, StoreOp, Stored};

/// What one simulation does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub clients: usize,
    /// Messages the clients send in all.
    pub messages: usize,
    /// Mean time between two sends (µs of simulated time).
    pub send_interval_us: u64,
    /// Chance per send that a client's connection drops (1 in N; 0: never).
    pub drop_one_in: u64,
    /// Chance per send that the relay crashes (1 in N; 0: never).
    pub crash_one_in: u64,
    /// Chance per store write that it fails (1 in N; 0: never).
    pub write_error_one_in: u64,
    /// One-way link delay range (µs).
    pub link_delay_us: (u64, u64),
    /// Store op delay range (µs).
    pub store_delay_us: (u64, u64),
    /// How long a client takes to acknowledge (µs).
    pub ack_delay_us: (u64, u64),
    /// Chance per frame that its link stalls (1 in N; 0: never), and for
    /// how long (µs).
    pub stall_one_in: u64,
    pub stall_us: (u64, u64),
    pub core: Config,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            clients: 12,
            messages: 200,
            send_interval_us: 300,
            drop_one_in: 40,
            crash_one_in: 150,
            write_error_one_in: 200,
            link_delay_us: (50, 2_000),
            store_delay_us: (20, 1_500),
            ack_delay_us: (0, 3_000),
            stall_one_in: 50,
            stall_us: (2_000, 30_000),
            core: Config {
                receipt_timeout: Duration::from_millis(8),
                max_group: 8,
                read_batch: 4,
            },
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub sent: u64,
    pub receipts: u64,
    pub delivered_entries: u64,
    pub queued_entries: u64,
    pub rejected_entries: u64,
    pub arrived: u64,
    pub crashes: u64,
    pub drops: u64,
    pub events: u64,
}

impl Report {
    /// Adds another run's counts (for totals over many seeds).
    pub fn add(&mut self, r: &Report) {
        self.sent += r.sent;
        self.receipts += r.receipts;
        self.delivered_entries += r.delivered_entries;
        self.queued_entries += r.queued_entries;
        self.rejected_entries += r.rejected_entries;
        self.arrived += r.arrived;
        self.crashes += r.crashes;
        self.drops += r.drops;
        self.events += r.events;
    }
}

/// splitmix64: small, fast and enough for fault schedules.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    /// True one time in `n` (never when `n` is 0).
    pub fn one_in(&mut self, n: u64) -> bool {
        n != 0 && self.next_u64().is_multiple_of(n)
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        out
    }
}

#[derive(Debug)]
enum Up {
    Msg(Bytes, Msg),
    Ack(Vec<MsgId>),
}

#[derive(Debug)]
enum Ev {
    Send,
    ToRelay {
        conn: ConnId,
        up: Up,
    },
    ToClient {
        conn: ConnId,
        client: usize,
        frame: Bytes,
    },
    StoreStep {
        gen: u64,
    },
    StoreAnswer {
        gen: u64,
        done: StoreDone,
    },
    Tick {
        gen: u64,
    },
    Connect {
        client: usize,
    },
    Drop {
        client: usize,
    },
    Restart,
}

struct Client {
    address: Address,
    /// The current connection, if any.
    conn: Option<ConnId>,
    /// Ids handed on the current connection (a second copy is a relay bug).
    on_conn: BTreeSet<MsgId>,
    /// Messages the application got: (id, from).
    app: BTreeSet<(MsgId, Address)>,
}

/// The store: what is committed survives a crash.
#[derive(Default)]
struct Disk {
    known: BTreeSet<Address>,
    rows: BTreeMap<(Address, i64), (MsgId, Bytes)>,
    index: HashMap<(Address, MsgId), i64>,
    next_seq: i64,
    /// Ops polled from the core and not yet executed (lost in a crash).
    queue: VecDeque<StoreOp>,
    busy: bool,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    rng: Rng,
    t0: Instant,
    now_us: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    core: Option<RelayCore>,
    gen: u64,
    disk: Disk,
    clients: Vec<Client>,
    by_conn: HashMap<ConnId, usize>,
    next_conn: u64,
    /// Per link direction, when the last frame arrives (FIFO).
    link_last: HashMap<(ConnId, bool), u64>,
    tick_at: Option<u64>,
    /// Receipted delivered/queued: (id, sender, recipient).
    promises: BTreeSet<(MsgId, Address, Address)>,
    /// Messages each recipient's client ever got: (recipient, id).
    got: BTreeSet<(Address, MsgId)>,
    /// Every message sent: its sender and whether it was an a2a.
    sent_by: HashMap<MsgId, (Address, bool)>,
    sending: bool,
    faults: bool,
    report: Report,
    /// Print every event (`W2W_SIM_TRACE=1`).
    trace: bool,
}

/// One line for an event, for traces.
fn describe(ev: &Ev) -> String {
    let short = |a: &Address| hex(&a.0[..3]);
    match ev {
        Ev::ToRelay {
            conn,
            up: Up::Msg(_, m),
        } => {
            let dest = match &m.dest {
                Dest::A2b(a) => format!("a2b {}", short(a)),
                Dest::A2g(l) => format!("a2g {:?}", l.iter().map(short).collect::<Vec<_>>()),
                other => format!("{:?}", other.route()),
            };
            format!(
                "relay <- c{} MSG {} from {} {dest}",
                conn.0,
                hex(&m.id.0[..3]),
                short(&m.from)
            )
        }
        Ev::ToRelay {
            conn,
            up: Up::Ack(ids),
        } => {
            format!("relay <- c{} ACK {}", conn.0, hex(&ids[0].0[..3]))
        }
        Ev::ToClient {
            conn,
            client,
            frame,
        } => match RelayToClient::decode(frame) {
            Ok(RelayToClient::Msg(m)) => {
                format!("client {client} <- c{} MSG {}", conn.0, hex(&m.id.0[..3]))
            }
            Ok(RelayToClient::Receipt(r)) => format!(
                "client {client} <- c{} RECEIPT {} {:?} {:?}",
                conn.0,
                hex(&r.id.0[..3]),
                r.status,
                r.entries
                    .iter()
                    .map(|e| (short(&e.to), e.status))
                    .collect::<Vec<_>>()
            ),
            _ => format!("client {client} <- c{} other", conn.0),
        },
        Ev::StoreAnswer { gen, done } => format!("store answer (gen {gen}) {done:?}")
            .chars()
            .take(160)
            .collect(),
        other => format!("{other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs one seeded simulation; `Err` names the violated invariant.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, String> {
    let mut rng = Rng::new(seed);
    let clients = (0..cfg.clients)
        .map(|_| Client {
            address: Address(rng.bytes()),
            conn: None,
            on_conn: BTreeSet::new(),
            app: BTreeSet::new(),
        })
        .collect();
    let mut sim = Sim {
        cfg,
        rng,
        t0: Instant::now(),
        now_us: 0,
        seq: 0,
        events: BTreeMap::new(),
        core: Some(RelayCore::new(cfg.core.clone(), [])),
        gen: 0,
        disk: Disk::default(),
        clients,
        by_conn: HashMap::new(),
        next_conn: 0,
        link_last: HashMap::new(),
        tick_at: None,
        promises: BTreeSet::new(),
        got: BTreeSet::new(),
        sent_by: HashMap::new(),
        sending: true,
        faults: true,
        report: Report::default(),
        trace: std::env::var_os("W2W_SIM_TRACE").is_some(),
    };
    sim.go().map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(sim.report)
}

impl Sim<'_> {
    fn now(&self) -> Instant {
        self.t0 + Duration::from_micros(self.now_us)
    }

    fn at(&mut self, delay_us: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((self.now_us + delay_us, self.seq), ev);
    }

    fn go(&mut self) -> Result<(), String> {
        for c in 0..self.clients.len() {
            let d = self.rng.range((0, 2_000));
            self.at(d, Ev::Connect { client: c });
        }
        self.at(3_000, Ev::Send);
        let limit = 200 * (self.cfg.messages as u64 + 100) * (self.cfg.clients as u64 + 4);
        while let Some(((t, _), ev)) = self.events.pop_first() {
            self.now_us = t;
            self.report.events += 1;
            if self.trace {
                eprintln!("{t:>9} {}", describe(&ev));
            }
            if self.report.events > limit {
                return Err("no end in sight (livelock?)".into());
            }
            self.step(ev)?;
            if self.sending && self.report.sent >= self.cfg.messages as u64 {
                self.quiesce();
            }
        }
        self.check_end()
    }

    /// No more sends or faults: everyone comes back.
    fn quiesce(&mut self) {
        self.sending = false;
        self.faults = false;
        if self.core.is_none() {
            // A restart is already scheduled.
            return;
        }
        for c in 0..self.clients.len() {
            if self.clients[c].conn.is_none() {
                self.at(100, Ev::Connect { client: c });
            }
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Send => self.send()?,
            Ev::Connect { client } => self.connect(client),
            Ev::Drop { client } if self.rng.one_in(3) && self.clients[client].conn.is_some() => {
                // The same key connects again while its old connection is
                // still up (another device, a fast reconnect): the newer
                // one replaces the older.
                self.report.drops += 1;
                let old = self.clients[client].conn.take();
                if let Some(old) = old {
                    self.by_conn.remove(&old);
                }
                self.connect(client);
            }
            Ev::Drop { client } => {
                if let Some(conn) = self.clients[client].conn {
                    self.report.drops += 1;
                    self.drop_conn(conn);
                    let d = self.rng.range((500, 20_000));
                    self.at(d, Ev::Connect { client });
                }
            }
            Ev::ToRelay { conn, up } => {
                if self.by_conn.contains_key(&conn) {
                    let now = self.now();
                    if let Some(core) = self.core.as_mut() {
                        match up {
                            Up::Msg(frame, msg) => core.handle_msg(now, conn, frame, &msg),
                            Up::Ack(ids) => core.handle_ack(now, conn, &ids),
                        }
                    }
                    self.pump()?;
                }
            }
            Ev::ToClient {
                conn,
                client,
                frame,
            } => {
                if self.clients[client].conn == Some(conn) {
                    self.client_frame(client, conn, frame)?;
                }
            }
            Ev::StoreStep { gen } => {
                if gen == self.gen {
                    self.store_step()?;
                }
            }
            Ev::StoreAnswer { gen, done } => {
                if gen == self.gen {
                    let now = self.now();
                    if let Some(core) = self.core.as_mut() {
                        core.store_done(now, done);
                    }
                    self.pump()?;
                }
            }
            Ev::Tick { gen } => {
                if gen == self.gen {
                    self.tick_at = None;
                    let now = self.now();
                    if let Some(core) = self.core.as_mut() {
                        core.handle_timeout(now);
                    }
                    self.pump()?;
                }
            }
            Ev::Restart => {
                self.core = Some(RelayCore::new(
                    self.cfg.core.clone(),
                    self.disk.known.iter().copied(),
                ));
                for c in 0..self.clients.len() {
                    let d = self.rng.range((100, 5_000));
                    self.at(d, Ev::Connect { client: c });
                }
            }
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), String> {
        if !self.sending {
            return Ok(());
        }
        let next = self.rng.range((1, 2 * self.cfg.send_interval_us));
        self.at(next, Ev::Send);
        if self.faults && self.rng.one_in(self.cfg.crash_one_in) && self.core.is_some() {
            return self.crash();
        }
        if self.faults && self.rng.one_in(self.cfg.drop_one_in) {
            let c = self.rng.range((0, self.clients.len() as u64 - 1)) as usize;
            self.at(0, Ev::Drop { client: c });
        }
        let from = self.rng.range((0, self.clients.len() as u64 - 1)) as usize;
        let Some(conn) = self.clients[from].conn else {
            return Ok(());
        };
        let pick = |sim: &mut Sim| {
            let i = sim.rng.range((0, sim.clients.len() as u64 - 1)) as usize;
            sim.clients[i].address
        };
        let dest = match self.rng.range((0, 19)) {
            0 | 10 => Dest::A2a,
            11 => Dest::A2n(w2w_proto::frame::Scope::Relay),
            1 | 12 => Dest::A2b(Address(self.rng.bytes())), // never registered
            2 | 3 | 13 | 14 => {
                let n = self.rng.range((2, 4));
                Dest::A2g((0..n).map(|_| pick(self)).collect())
            }
            _ => Dest::A2b(pick(self)),
        };
        let msg = Msg {
            flags: 0,
            id: MsgId(self.rng.bytes()),
            from: self.clients[from].address,
            dest,
            payload: Bytes::from_static(b"sim"),
        };
        let frame = ClientToRelay::Msg(msg.clone()).encode();
        self.sent_by
            .insert(msg.id, (msg.from, msg.dest == Dest::A2a));
        self.report.sent += 1;
        self.up(conn, Up::Msg(frame, msg));
        Ok(())
    }

    /// A frame from a client to the relay, FIFO on its link.
    fn up(&mut self, conn: ConnId, up: Up) {
        let d = self.link_delay(conn, true);
        self.at(d, Ev::ToRelay { conn, up });
    }

    fn link_delay(&mut self, conn: ConnId, up: bool) -> u64 {
        let mut want = self.now_us + self.rng.range(self.cfg.link_delay_us);
        // Now and then a link stalls (a congested or lossy path: TCP
        // retransmits, everything behind waits).
        if self.rng.one_in(self.cfg.stall_one_in) {
            want += self.rng.range(self.cfg.stall_us);
        }
        let last = self.link_last.entry((conn, up)).or_insert(0);
        let arrive = want.max(*last);
        *last = arrive;
        arrive - self.now_us
    }

    fn connect(&mut self, client: usize) {
        if self.clients[client].conn.is_some() || self.core.is_none() {
            return;
        }
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let address = self.clients[client].address;
        // Registration is durable before the client hears it succeeded.
        self.disk.known.insert(address);
        self.clients[client].conn = Some(conn);
        self.clients[client].on_conn.clear();
        self.by_conn.insert(conn, client);
        let now = self.now();
        if let Some(core) = self.core.as_mut() {
            core.connect(now, conn, address);
        }
        // `pump` cannot fail on a connect (no receipt is emitted).
        let _ = self.pump();
    }

    fn drop_conn(&mut self, conn: ConnId) {
        let Some(client) = self.by_conn.remove(&conn) else {
            return;
        };
        self.clients[client].conn = None;
        self.link_last.remove(&(conn, true));
        self.link_last.remove(&(conn, false));
        let now = self.now();
        if let Some(core) = self.core.as_mut() {
            core.disconnect(now, conn);
        }
        let _ = self.pump();
    }

    fn crash(&mut self) -> Result<(), String> {
        self.report.crashes += 1;
        self.gen += 1;
        self.core = None;
        self.tick_at = None;
        self.disk.queue.clear();
        self.disk.busy = false;
        for c in &mut self.clients {
            if let Some(conn) = c.conn.take() {
                self.by_conn.remove(&conn);
            }
        }
        let d = self.rng.range((1_000, 10_000));
        self.at(d, Ev::Restart);
        Ok(())
    }

    /// Takes the core's outputs.
    fn pump(&mut self) -> Result<(), String> {
        let Some(core) = self.core.as_mut() else {
            return Ok(());
        };
        let mut transmits = Vec::new();
        while let Some(t) = core.poll_transmit() {
            transmits.push(t);
        }
        let mut ops = Vec::new();
        while let Some(op) = core.poll_store() {
            ops.push(op);
        }
        let mut closes = Vec::new();
        while let Some(c) = core.poll_close() {
            closes.push(c);
        }
        let timeout = core.poll_timeout();
        for t in transmits {
            self.check_receipt(&t.frame)?;
            if let Some(&client) = self.by_conn.get(&t.conn) {
                let d = self.link_delay(t.conn, false);
                self.at(
                    d,
                    Ev::ToClient {
                        conn: t.conn,
                        client,
                        frame: t.frame,
                    },
                );
            }
        }
        self.disk.queue.extend(ops);
        if !self.disk.busy && !self.disk.queue.is_empty() {
            self.disk.busy = true;
            let d = self.rng.range(self.cfg.store_delay_us);
            self.at(d, Ev::StoreStep { gen: self.gen });
        }
        for (conn, _) in closes {
            if let Some(client) = self.by_conn.get(&conn).copied() {
                if self.clients[client].conn != Some(conn) {
                    continue;
                }
                // Closed by the relay: the client comes back later.
                self.by_conn.remove(&conn);
                self.clients[client].conn = None;
                if let Some(core) = self.core.as_mut() {
                    core.disconnect(self.t0 + Duration::from_micros(self.now_us), conn);
                }
                let d = self.rng.range((500, 5_000));
                self.at(d, Ev::Connect { client });
            }
        }
        if let Some(t) = timeout {
            let us = t.duration_since(self.t0).as_micros() as u64;
            if self.tick_at.is_none_or(|cur| us < cur) {
                self.tick_at = Some(us);
                let d = us.saturating_sub(self.now_us);
                self.at(d, Ev::Tick { gen: self.gen });
            }
        }
        Ok(())
    }

    /// Executes the next store op (it commits now), and schedules its answer.
    fn store_step(&mut self) -> Result<(), String> {
        let Some(op) = self.disk.queue.pop_front() else {
            self.disk.busy = false;
            return Ok(());
        };
        if self.trace {
            let line = match &op {
                StoreOp::Enqueue { recipient, id, .. } => {
                    format!("enqueue {} for {}", hex(&id.0[..3]), hex(&recipient.0[..3]))
                }
                StoreOp::Dequeue { recipient, id } => {
                    format!("dequeue {} for {}", hex(&id.0[..3]), hex(&recipient.0[..3]))
                }
                StoreOp::Read {
                    recipient, after, ..
                } => format!("read for {} after {after}", hex(&recipient.0[..3])),
            };
            eprintln!("{:>9}   store: {line}", self.now_us);
        }
        let answer = match op {
            StoreOp::Enqueue {
                token,
                recipient,
                id,
                frame,
                ..
            } => {
                let result = if self.rng.one_in(self.cfg.write_error_one_in) {
                    Err(ErrorCode::Internal)
                } else {
                    if !self.disk.index.contains_key(&(recipient, id)) {
                        self.disk.next_seq += 1;
                        let seq = self.disk.next_seq;
                        self.disk.rows.insert((recipient, seq), (id, frame));
                        self.disk.index.insert((recipient, id), seq);
                    }
                    Ok(())
                };
                Some(StoreDone::Enqueued { token, result })
            }
            StoreOp::Dequeue { recipient, id } => {
                if let Some(seq) = self.disk.index.remove(&(recipient, id)) {
                    if !self.got.contains(&(recipient, id)) {
                        return Err(format!(
                            "a stored copy for {recipient} was deleted before it arrived"
                        ));
                    }
                    self.disk.rows.remove(&(recipient, seq));
                }
                None
            }
            StoreOp::Read {
                token,
                recipient,
                after,
                limit,
            } => {
                let rows = self
                    .disk
                    .rows
                    .range((recipient, after + 1)..=(recipient, i64::MAX))
                    .take(limit)
                    .map(|((_, seq), (id, frame))| Stored {
                        seq: *seq,
                        id: *id,
                        frame: frame.clone(),
                    })
                    .collect();
                Some(StoreDone::Read {
                    token,
                    result: Ok(rows),
                })
            }
        };
        if let Some(done) = answer {
            let d = self.rng.range((0, 300));
            self.at(
                d,
                Ev::StoreAnswer {
                    gen: self.gen,
                    done,
                },
            );
        }
        if self.disk.queue.is_empty() {
            self.disk.busy = false;
        } else {
            let d = self.rng.range(self.cfg.store_delay_us);
            self.at(d, Ev::StoreStep { gen: self.gen });
        }
        Ok(())
    }

    /// Checks a RECEIPT as the relay sends it, and records its promises.
    fn check_receipt(&mut self, frame: &Bytes) -> Result<(), String> {
        let Ok(RelayToClient::Receipt(r)) = RelayToClient::decode(frame) else {
            return Ok(());
        };
        self.report.receipts += 1;
        let Some(&(sender, a2a)) = self.sent_by.get(&r.id) else {
            return Err(format!("a receipt for {}, which nobody sent", r.id));
        };
        // An a2a receipt has no entries: its one recipient is the sender.
        let entries: Vec<(Address, Status)> = if a2a {
            vec![(sender, r.status)]
        } else {
            r.entries.iter().map(|e| (e.to, e.status)).collect()
        };
        for (to, status) in entries {
            match status {
                Status::Delivered => {
                    self.report.delivered_entries += 1;
                    if !self.got.contains(&(to, r.id)) {
                        return Err(format!(
                            "receipt says delivered to {to}, whose client never had it"
                        ));
                    }
                }
                Status::Queued => {
                    self.report.queued_entries += 1;
                    if !self.got.contains(&(to, r.id)) && !self.disk.index.contains_key(&(to, r.id))
                    {
                        return Err(format!(
                            "receipt says queued for {to}, but it is neither on disk nor arrived"
                        ));
                    }
                }
                _ => {
                    self.report.rejected_entries += 1;
                    continue;
                }
            }
            self.promises.insert((r.id, sender, to));
        }
        Ok(())
    }

    fn client_frame(&mut self, client: usize, conn: ConnId, frame: Bytes) -> Result<(), String> {
        let Ok(RelayToClient::Msg(m)) = RelayToClient::decode(&frame) else {
            // Receipts were checked when sent.
            return Ok(());
        };
        let c = &mut self.clients[client];
        if !c.on_conn.insert(m.id) {
            return Err(format!(
                "{} got message {} twice on one connection",
                c.address, m.id
            ));
        }
        let to = c.address;
        if c.app.insert((m.id, m.from)) {
            self.report.arrived += 1;
        }
        self.got.insert((to, m.id));
        let d = self.rng.range(self.cfg.ack_delay_us);
        // Acknowledged after a while, on the same link (lost if it drops).
        let arrive = d + self.link_delay(conn, true);
        self.at(
            arrive,
            Ev::ToRelay {
                conn,
                up: Up::Ack(vec![m.id]),
            },
        );
        Ok(())
    }

    fn check_end(&mut self) -> Result<(), String> {
        for (id, from, to) in &self.promises {
            let Some(c) = self.clients.iter().find(|c| c.address == *to) else {
                continue;
            };
            if !c.app.contains(&(*id, *from)) {
                return Err(format!("message {id} receipted for {to} never arrived"));
            }
        }
        if let Some(core) = &self.core {
            if !core.is_idle() {
                return Err(format!(
                    "the core is not idle at the end ({} messages in flight)",
                    core.in_flight()
                ));
            }
        }
        if !self.disk.rows.is_empty() {
            return Err(format!(
                "{} messages still stored at the end, every recipient connected",
                self.disk.rows.len()
            ));
        }
        Ok(())
    }
}
