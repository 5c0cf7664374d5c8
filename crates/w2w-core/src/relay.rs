//! One relay's delivery core: sessions, messages in flight, the store.
//!
//! Maps that are iterated are ordered (`BTreeMap`), so that the order of
//! outputs depends on the inputs only: the same inputs always give the
//! same outputs, which is what lets a simulation seed replay.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use w2w_proto::frame::{Dest, Msg, MsgId, Receipt, RelayToClient, Route, Status};
use w2w_proto::{Address, ErrorCode};

use crate::flight::{entry, receipt, Flight, FlightKey, Recipient};
use crate::{ConnId, StoreDone, StoreOp, Stored, Token, Transmit};

/// Settings of the delivery core.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a recipient handed a message without it being stored has
    /// to acknowledge it before it is written (default 5 s).
    pub receipt_timeout: Duration,
    /// Longest a2g list (default 64).
    pub max_group: usize,
    /// Stored messages read per step of a connection's backlog (default 64).
    pub read_batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            receipt_timeout: Duration::from_secs(5),
            max_group: 64,
            read_batch: 64,
        }
    }
}

/// Where a connection is with its stored backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading its backlog; `reading`: a `Read` is on its way; `dirty`: a
    /// write for this address committed while it was (the read may have
    /// run before it, so another read follows). Messages for it meanwhile
    /// go through the store.
    Draining {
        after: i64,
        reading: bool,
        dirty: bool,
    },
    /// Backlog handed over: new messages are handed over directly.
    Live,
}

/// A message handed to a connection and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Handed {
    /// The message in flight its ACK settles, if it is still in flight.
    flight: Option<FlightKey>,
    /// Whether a stored copy exists (its ACK deletes it).
    stored: bool,
}

#[derive(Debug)]
struct Session {
    address: Address,
    phase: Phase,
    /// Everything handed to this connection and not acknowledged. While
    /// draining it also stops the backlog reader from handing a message
    /// twice.
    handed: BTreeMap<MsgId, Handed>,
}

/// What a store answer is for.
#[derive(Debug, Clone, Copy)]
enum Waiting {
    Write { flight: FlightKey, to: Address },
    Read { conn: ConnId },
}

/// Every `(address, id)` key of `address`, for ranges over
/// `awaiting_drain`.
fn ids_of(address: Address) -> std::ops::RangeInclusive<(Address, MsgId)> {
    (address, MsgId([0; 16]))..=(address, MsgId([0xff; 16]))
}

/// The delivery state of one relay. See the crate docs for the contract.
#[derive(Debug)]
pub struct RelayCore {
    config: Config,
    sessions: BTreeMap<ConnId, Session>,
    by_address: HashMap<Address, ConnId>,
    /// Addresses that registered here: messages for them are stored while
    /// they are offline.
    known: BTreeSet<Address>,
    flights: HashMap<FlightKey, Flight>,
    /// Deadlines of messages in flight, in time order.
    deadlines: BTreeMap<(Instant, u64), FlightKey>,
    /// Committed messages waiting for a draining connection's reader.
    awaiting_drain: BTreeMap<(Address, MsgId), FlightKey>,
    /// Writes on their way per recipient: a connection goes live only when
    /// its address has none.
    writes: HashMap<Address, u32>,
    tokens: HashMap<Token, Waiting>,
    next: u64,
    transmits: VecDeque<Transmit>,
    store_ops: VecDeque<StoreOp>,
    closes: VecDeque<(ConnId, ErrorCode)>,
}

impl RelayCore {
    /// A core for a relay whose store knows `known` (addresses that
    /// registered here before).
    pub fn new(config: Config, known: impl IntoIterator<Item = Address>) -> Self {
        RelayCore {
            config,
            sessions: BTreeMap::new(),
            by_address: HashMap::new(),
            known: known.into_iter().collect(),
            flights: HashMap::new(),
            deadlines: BTreeMap::new(),
            awaiting_drain: BTreeMap::new(),
            writes: HashMap::new(),
            tokens: HashMap::new(),
            next: 0,
            transmits: VecDeque::new(),
            store_ops: VecDeque::new(),
            closes: VecDeque::new(),
        }
    }

    // ------------------------------------------------------------ outputs

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.store_ops.pop_front()
    }

    /// A connection the caller must close (with this code).
    pub fn poll_close(&mut self) -> Option<(ConnId, ErrorCode)> {
        self.closes.pop_front()
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.keys().next().map(|(t, _)| *t)
    }

    /// Messages in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Whether nothing is in flight, waited for, or about to be sent: what
    /// a quiet relay must come back to.
    pub fn is_idle(&self) -> bool {
        self.flights.is_empty()
            && self.tokens.is_empty()
            && self.awaiting_drain.is_empty()
            && self.writes.is_empty()
            && self.transmits.is_empty()
            && self.store_ops.is_empty()
    }

    // ------------------------------------------------------------- inputs

    /// A connection completed registration as `address`. An older session
    /// of the same address is replaced (closed).
    pub fn connect(&mut self, now: Instant, conn: ConnId, address: Address) {
        if let Some(&old) = self.by_address.get(&address) {
            self.closes.push_back((old, ErrorCode::Replaced));
            self.disconnect(now, old);
        }
        self.known.insert(address);
        self.by_address.insert(address, conn);
        self.sessions.insert(
            conn,
            Session {
                address,
                phase: Phase::Draining {
                    after: 0,
                    reading: false,
                    dirty: false,
                },
                handed: BTreeMap::new(),
            },
        );
        self.read_next(conn);
    }

    /// A connection ended (or was closed). Copies it was handed without
    /// being stored are written now; stored ones it did not acknowledge
    /// are `queued`.
    pub fn disconnect(&mut self, _now: Instant, conn: ConnId) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        let address = session.address;
        if self.by_address.get(&address) == Some(&conn) {
            self.by_address.remove(&address);
        }
        let mut touched = BTreeSet::new();
        for (_, h) in session.handed {
            let Some(key) = h.flight else { continue };
            let Some(state) = self
                .flights
                .get_mut(&key)
                .and_then(|f| f.state_mut(&address))
            else {
                continue;
            };
            match *state {
                Recipient::Unstored { conn: c } if c == conn => self.store_late(key, address),
                Recipient::Stored { conn: Some(c) } if c == conn => {
                    *state = Recipient::Settled(entry(address, Status::Queued, None));
                }
                _ => {}
            }
            touched.insert(key);
        }
        // Committed messages its reader had not reached: they stay stored.
        let waiting: Vec<_> = self
            .awaiting_drain
            .range(ids_of(address))
            .map(|(k, f)| (*k, *f))
            .collect();
        for (k, key) in waiting {
            self.awaiting_drain.remove(&k);
            if let Some(state) = self
                .flights
                .get_mut(&key)
                .and_then(|f| f.state_mut(&address))
            {
                *state = Recipient::Settled(entry(address, Status::Queued, None));
            }
            touched.insert(key);
        }
        for key in touched {
            self.finish_if_settled(key);
        }
    }

    /// A MSG from a registered connection (the frame exactly as received,
    /// and its decoded form).
    pub fn handle_msg(&mut self, now: Instant, conn: ConnId, frame: Bytes, msg: &Msg) {
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        let reject = |code: ErrorCode| Receipt {
            id: msg.id,
            status: Status::Rejected,
            reason: code.as_u16(),
            delivered: 0,
            entries: Vec::new(),
        };
        if msg.from != session.address {
            return self.send_receipt(conn, reject(ErrorCode::SpoofedSender));
        }
        let route = msg.dest.route();
        let targets: Vec<Address> = match &msg.dest {
            Dest::A2n(_) => {
                let mut delivered = 0;
                for c in self.sessions.keys() {
                    self.transmits.push_back(Transmit {
                        conn: *c,
                        frame: frame.clone(),
                    });
                    delivered += 1;
                }
                let r = receipt(msg.id, Route::A2n, Vec::new());
                return self.send_receipt(conn, Receipt { delivered, ..r });
            }
            Dest::Group(_) => return self.send_receipt(conn, reject(ErrorCode::UnknownGroup)),
            Dest::A2a => vec![msg.from],
            Dest::A2b(to) => vec![*to],
            Dest::A2g(list) if list.is_empty() => {
                return self.send_receipt(conn, reject(ErrorCode::EmptyList))
            }
            Dest::A2g(list) if list.len() > self.config.max_group => {
                return self.send_receipt(conn, reject(ErrorCode::ListTooLong))
            }
            Dest::A2g(list) => {
                let mut seen = BTreeSet::new();
                list.iter().copied().filter(|a| seen.insert(*a)).collect()
            }
        };
        let key = (msg.id, msg.from);
        if self.flights.contains_key(&key) {
            return self.send_receipt(conn, reject(ErrorCode::Duplicate));
        }
        let mut recipients = Vec::with_capacity(targets.len());
        for to in targets {
            let state = match self.by_address.get(&to).copied() {
                Some(c) if self.hand_unstored(c, msg.id, &frame, key) => {
                    Recipient::Unstored { conn: c }
                }
                Some(_) => self.enqueue(key, to, msg.from, msg.id, &frame, false),
                None if self.known.contains(&to) => {
                    self.enqueue(key, to, msg.from, msg.id, &frame, false)
                }
                None => Recipient::Settled(entry(to, Status::NoRoute, Some(ErrorCode::NoRoute))),
            };
            recipients.push((to, state));
        }
        self.next += 1;
        let deadline = (now + self.config.receipt_timeout, self.next);
        self.deadlines.insert(deadline, key);
        self.flights.insert(
            key,
            Flight {
                reply_to: conn,
                route,
                frame,
                recipients,
                deadline,
                expired: false,
            },
        );
        self.finish_if_settled(key);
    }

    /// An ACK: the connection has these messages.
    pub fn handle_ack(&mut self, _now: Instant, conn: ConnId, ids: &[MsgId]) {
        for id in ids {
            let Some(session) = self.sessions.get_mut(&conn) else {
                return;
            };
            let address = session.address;
            let Some(h) = session.handed.remove(id) else {
                continue;
            };
            if h.stored {
                self.store_ops.push_back(StoreOp::Dequeue {
                    recipient: address,
                    id: *id,
                });
            }
            let Some(key) = h.flight else { continue };
            let Some(state) = self
                .flights
                .get_mut(&key)
                .and_then(|f| f.state_mut(&address))
            else {
                continue;
            };
            match state {
                Recipient::Unstored { conn: c } | Recipient::Stored { conn: Some(c) }
                    if *c == conn =>
                {
                    *state = Recipient::Settled(entry(address, Status::Delivered, None));
                }
                // Its late write is on the way: delivered, and deleted once
                // it lands.
                Recipient::Storing {
                    late: true, acked, ..
                } => *acked = true,
                _ => {}
            }
            self.finish_if_settled(key);
        }
    }

    /// The store's answer to an op with a token.
    pub fn store_done(&mut self, now: Instant, done: StoreDone) {
        match done {
            StoreDone::Enqueued { token, result } => self.on_enqueued(now, token, result),
            StoreDone::Read { token, result } => self.on_read(token, result),
        }
    }

    /// Applies the deadlines that have passed: recipients handed a message
    /// unstored that did not ACK it get it written; stored ones that did
    /// not ACK are `queued`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((&(t, n), &key)) = self.deadlines.iter().next() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, n));
            let Some(f) = self.flights.get_mut(&key) else {
                continue;
            };
            f.expired = true;
            let mut late = Vec::new();
            for (to, state) in &mut f.recipients {
                match state {
                    Recipient::Unstored { .. } => late.push(*to),
                    Recipient::Stored { conn } => {
                        if conn.is_none() {
                            self.awaiting_drain.remove(&(*to, key.0));
                        }
                        *state = Recipient::Settled(entry(*to, Status::Queued, None));
                    }
                    _ => {}
                }
            }
            for to in late {
                self.store_late(key, to);
            }
            self.finish_if_settled(key);
        }
    }

    // ------------------------------------------------------------ helpers

    fn token(&mut self, w: Waiting) -> Token {
        self.next += 1;
        let t = Token(self.next);
        self.tokens.insert(t, w);
        t
    }

    /// Hands `frame` to a live connection without storing it, remembering
    /// that its ACK settles `key`. False (nothing done) if the connection
    /// is still draining or already holds a message with this id.
    fn hand_unstored(&mut self, conn: ConnId, id: MsgId, frame: &Bytes, key: FlightKey) -> bool {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        if s.phase != Phase::Live || s.handed.contains_key(&id) {
            return false;
        }
        s.handed.insert(
            id,
            Handed {
                flight: Some(key),
                stored: false,
            },
        );
        self.transmits.push_back(Transmit {
            conn,
            frame: frame.clone(),
        });
        true
    }

    fn enqueue(
        &mut self,
        key: FlightKey,
        to: Address,
        sender: Address,
        id: MsgId,
        frame: &Bytes,
        late: bool,
    ) -> Recipient {
        let token = self.token(Waiting::Write { flight: key, to });
        *self.writes.entry(to).or_default() += 1;
        self.store_ops.push_back(StoreOp::Enqueue {
            token,
            recipient: to,
            sender,
            id,
            frame: frame.clone(),
        });
        Recipient::Storing {
            token,
            late,
            acked: false,
        }
    }

    /// Writes the copy of a recipient that was handed it unstored and did
    /// not acknowledge it in time.
    fn store_late(&mut self, key: FlightKey, to: Address) {
        let Some(frame) = self.flights.get(&key).map(|f| f.frame.clone()) else {
            return;
        };
        let state = self.enqueue(key, to, key.1, key.0, &frame, true);
        if let Some(s) = self.flights.get_mut(&key).and_then(|f| f.state_mut(&to)) {
            *s = state;
        }
    }

    fn read_next(&mut self, conn: ConnId) {
        let Some(s) = self.sessions.get(&conn) else {
            return;
        };
        let Phase::Draining {
            after,
            reading: false,
            ..
        } = s.phase
        else {
            return;
        };
        let recipient = s.address;
        let token = self.token(Waiting::Read { conn });
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.phase = Phase::Draining {
                after,
                reading: true,
                dirty: false,
            };
        }
        self.store_ops.push_back(StoreOp::Read {
            token,
            recipient,
            after,
            limit: self.config.read_batch.max(1),
        });
    }

    fn on_enqueued(&mut self, _now: Instant, token: Token, result: Result<(), ErrorCode>) {
        let Some(Waiting::Write { flight: key, to }) = self.tokens.remove(&token) else {
            return;
        };
        if let Some(n) = self.writes.get_mut(&to) {
            *n -= 1;
            if *n == 0 {
                self.writes.remove(&to);
            }
        }
        let conn = self.by_address.get(&to).copied();
        let expired = self.flights.get(&key).is_some_and(|f| f.expired);
        let current = self
            .flights
            .get(&key)
            .and_then(|f| f.recipients.iter().find(|(a, _)| *a == to))
            .map(|(_, s)| s.clone());
        if let Some(Recipient::Storing {
            token: t,
            late,
            acked,
        }) = current
        {
            if t == token {
                let next = match (result, late) {
                    (Ok(()), true) if acked => {
                        self.store_ops.push_back(StoreOp::Dequeue {
                            recipient: to,
                            id: key.0,
                        });
                        Recipient::Settled(entry(to, Status::Delivered, None))
                    }
                    (Ok(()), true) => {
                        // On disk now: the ACK, if it still comes, deletes it.
                        if let Some(h) = conn
                            .and_then(|c| self.sessions.get_mut(&c))
                            .and_then(|s| s.handed.get_mut(&key.0))
                        {
                            h.stored = true;
                        }
                        Recipient::Settled(entry(to, Status::Queued, None))
                    }
                    (Ok(()), false) if expired => {
                        Recipient::Settled(entry(to, Status::Queued, None))
                    }
                    (Ok(()), false) => self.after_commit(key, to, conn),
                    (Err(_), true) if acked => {
                        Recipient::Settled(entry(to, Status::Delivered, None))
                    }
                    (Err(code), _) => Recipient::Settled(entry(to, Status::Rejected, Some(code))),
                };
                if let Some(s) = self.flights.get_mut(&key).and_then(|f| f.state_mut(&to)) {
                    *s = next;
                }
                self.finish_if_settled(key);
            }
        }
        // A draining connection reads again: now if it is waiting, after
        // its current read otherwise (which may have run before this write).
        if let Some(c) = conn {
            if let Some(s) = self.sessions.get_mut(&c) {
                match &mut s.phase {
                    Phase::Draining {
                        reading: true,
                        dirty,
                        ..
                    } => *dirty = true,
                    Phase::Draining { reading: false, .. } => self.read_next(c),
                    Phase::Live => {}
                }
            }
        }
    }

    /// A first write committed: hand it to a live connection, leave it to a
    /// draining one's reader, or report it queued.
    fn after_commit(&mut self, key: FlightKey, to: Address, conn: Option<ConnId>) -> Recipient {
        let queued = Recipient::Settled(entry(to, Status::Queued, None));
        let Some(c) = conn else { return queued };
        let Some(s) = self.sessions.get_mut(&c) else {
            return queued;
        };
        match s.phase {
            // Not reached today: a connection goes live only when no write
            // for its address is on its way. Handed over (not left on
            // disk) should that rule ever change.
            Phase::Live if !s.handed.contains_key(&key.0) => {
                s.handed.insert(
                    key.0,
                    Handed {
                        flight: Some(key),
                        stored: true,
                    },
                );
                let frame = self.flights.get(&key).map(|f| f.frame.clone());
                if let Some(frame) = frame {
                    self.transmits.push_back(Transmit { conn: c, frame });
                }
                Recipient::Stored { conn: Some(c) }
            }
            Phase::Live => queued,
            Phase::Draining { .. } => {
                self.awaiting_drain.insert((to, key.0), key);
                Recipient::Stored { conn: None }
            }
        }
    }

    fn on_read(&mut self, token: Token, result: Result<Vec<Stored>, ErrorCode>) {
        let Some(Waiting::Read { conn }) = self.tokens.remove(&token) else {
            return;
        };
        let Some(s) = self.sessions.get(&conn) else {
            return;
        };
        let address = s.address;
        let Phase::Draining {
            mut after, dirty, ..
        } = s.phase
        else {
            return;
        };
        let msgs = match result {
            Ok(m) => m,
            Err(code) => {
                self.closes.push_back((conn, code));
                return;
            }
        };
        let full = msgs.len() >= self.config.read_batch.max(1);
        let mut touched = Vec::new();
        for m in msgs {
            after = after.max(m.seq);
            let Some(s) = self.sessions.get_mut(&conn) else {
                return;
            };
            if s.handed.contains_key(&m.id) {
                continue;
            }
            let flight = self.awaiting_drain.remove(&(address, m.id));
            s.handed.insert(
                m.id,
                Handed {
                    flight,
                    stored: true,
                },
            );
            self.transmits.push_back(Transmit {
                conn,
                frame: m.frame,
            });
            if let Some(key) = flight {
                if let Some(st) = self
                    .flights
                    .get_mut(&key)
                    .and_then(|f| f.state_mut(&address))
                {
                    *st = Recipient::Stored { conn: Some(conn) };
                }
                touched.push(key);
            }
        }
        // Store answers may come in any order: a write for this address
        // may have committed (and be waiting for this reader) after this
        // read was executed. Live only when nothing is on its way and
        // nothing committed waits to be read.
        let writing = self.writes.contains_key(&address);
        let committed = self.awaiting_drain.range(ids_of(address)).next().is_some();
        let caught_up = !full && !writing && !committed && !dirty;
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.phase = if caught_up {
                Phase::Live
            } else {
                Phase::Draining {
                    after,
                    reading: false,
                    dirty: false,
                }
            };
        }
        // Otherwise the next read starts now, or when the write lands.
        if !caught_up && !writing {
            self.read_next(conn);
        }
        for key in touched {
            self.finish_if_settled(key);
        }
    }

    /// Sends the receipt once every recipient is settled.
    fn finish_if_settled(&mut self, key: FlightKey) {
        let Some(f) = self.flights.get(&key) else {
            return;
        };
        if !f.settled() {
            return;
        }
        let Some(f) = self.flights.remove(&key) else {
            return;
        };
        self.deadlines.remove(&f.deadline);
        if let Some(r) = f.receipt(key.0) {
            self.send_receipt(f.reply_to, r);
        }
    }

    fn send_receipt(&mut self, conn: ConnId, r: Receipt) {
        if self.sessions.contains_key(&conn) {
            self.transmits.push_back(Transmit {
                conn,
                frame: RelayToClient::Receipt(r).encode(),
            });
        }
    }
}
