//! Custody and roaming (PROTOCOL 12.13): messages stored at this relay for
//! an address whose place is now another relay move there.
//!
//! Two cases put them here. **Custody**: a client of ours sent a message
//! whose recipient's relay could not be reached (a partition, a link
//! down); rather than fail it `unreachable`, this relay stores it for the
//! recipient (the store budgets count it like any other) and the sender
//! is told `queued`. **Roaming**: a client that registered here went to
//! another relay; what was stored for it here stays here.
//!
//! Both are *pending* addresses. A hand-off *run* for one reads its stored
//! messages in order, a batch at a time, and sends each as a FORWARD with
//! target kind `Handoff` to the relay where the address now is; a
//! FWD_RECEIPT saying `delivered` or `queued` there deletes the copy here.
//! Anything else (unreachable, `moved`, a timeout, refused) leaves it
//! stored and the address pending: the run stops after its batch and the
//! address is looked at again every `handoff_retry`, after any change of
//! the relay set, and whenever a record says it is online elsewhere.
//! A client of ours moves only to a relay where it is online; a custody
//! address to where it is online, or else to the relay of its newest
//! record (which stores for it). A run never starts while the address has
//! a receiving session here (that session's reader takes the backlog).
//!
//! A copy is deleted only after the other relay committed or delivered
//! it, so nothing is lost; a FWD_RECEIPT lost on the way leaves the copy
//! here, and it goes again later: the recipient's client drops the repeat
//! (ids), as after any crash between delivery and deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use w2w_proto::frame::{ClientToRelay, Dest, Msg, MsgId, ReceiptEntry, Status};
use w2w_proto::s2s::{Forward, ForwardTarget, Presence, RelayToRelay};
use w2w_proto::{Address, ErrorCode};

use crate::flight::{entry, Flight, FlightKey, Recipient, Reply};
use crate::seen::{seen_key, SeenCache, SeenKey};
use crate::{RelayCore, StoreOp, Stored, Token};

/// Most hand-off runs at once.
const MAX_RUNS: usize = 256;
/// Pending addresses looked at per retry tick.
const SCAN_BATCH: usize = 64;

/// One address's hand-off in progress.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    /// Where its messages go.
    relay: Address,
    /// The read on its way.
    reading: Option<Token>,
    /// The last stored sequence number handed so far.
    after: i64,
    /// Messages of the current batch not yet settled.
    open: u32,
    /// One of them failed: the run ends with this batch.
    failed: bool,
    /// A write for the address committed while the read was on its way
    /// (the read may have run before it): read again before ending.
    dirty: bool,
}

/// Addresses that may have messages here that belong elsewhere; on a
/// sharded relay their count is also kept for the whole relay
/// (`max_custody` bounds the relay, not each shard).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    set: BTreeSet<Address>,
    relay_wide: Option<Arc<AtomicUsize>>,
}

impl std::ops::Deref for Pending {
    type Target = BTreeSet<Address>;
    fn deref(&self) -> &BTreeSet<Address> {
        &self.set
    }
}

impl Pending {
    pub fn insert(&mut self, a: Address) -> bool {
        let new = self.set.insert(a);
        if let (true, Some(n)) = (new, &self.relay_wide) {
            n.fetch_add(1, Relaxed);
        }
        new
    }

    pub fn remove(&mut self, a: &Address) -> bool {
        let was = self.set.remove(a);
        if let (true, Some(n)) = (was, &self.relay_wide) {
            n.fetch_sub(1, Relaxed);
        }
        was
    }

    /// How many the relay has (all its shards).
    pub fn total(&self) -> usize {
        self.relay_wide
            .as_ref()
            .map_or(self.set.len(), |n| n.load(Relaxed))
    }

    /// Counts in `n` with the relay's other shards.
    pub fn share(&mut self, n: Arc<AtomicUsize>) {
        n.fetch_add(self.set.len(), Relaxed);
        self.relay_wide = Some(n);
    }
}

/// Custody and roaming state.
#[derive(Debug)]
pub(crate) struct Handoffs {
    /// Addresses that may have messages here that belong elsewhere.
    pub pending: Pending,
    pub runs: BTreeMap<Address, Run>,
    /// The next look at pending addresses, and where the last one ended.
    pub next_scan: Option<Instant>,
    cursor: Option<Address>,
    /// Messages a session here acknowledged (or a FORWARD here settled
    /// `delivered`): (id, recipient, digest of the sender). A copy of one
    /// that comes again (a hand-off whose FWD_RECEIPT was lost, a copy
    /// another relay stored for another leg or kept in custody, a FORWARD
    /// held up on the way) is answered without being handed twice.
    pub taken: SeenCache,
    /// This relay has (or expects) peers: only then can a copy of a
    /// message come back by hand-off, and `taken` is kept.
    pub federated: bool,
}

impl Handoffs {
    /// `taken`: an empty seen cache (bounded like the forwarding one).
    pub fn new(taken: SeenCache) -> Self {
        Handoffs {
            pending: Pending::default(),
            runs: BTreeMap::new(),
            next_scan: None,
            cursor: None,
            taken,
            federated: false,
        }
    }
}

impl RelayCore {
    /// Addresses this relay stores messages for that never registered
    /// here (custody, from the store after a restart): they are handed
    /// over once their relay can be reached.
    pub fn add_custody(&mut self, addrs: impl IntoIterator<Item = Address>) {
        for a in addrs {
            if self.handoff.pending.total() >= self.config.federation.max_custody {
                break;
            }
            self.handoff.pending.insert(a);
        }
        self.scan_soon();
    }

    /// Most custody addresses (`FedConfig::max_custody`, for the relay).
    pub fn max_custody(&self) -> usize {
        self.config.federation.max_custody
    }

    /// Addresses with messages here waiting to move (for metrics).
    pub fn custody_len(&self) -> usize {
        self.handoff.pending.len()
    }

    /// Whether a message for `to` that cannot reach its relay may be kept
    /// here for it.
    pub(crate) fn may_keep(&self, to: &Address) -> bool {
        let c = &self.config.federation;
        c.custody
            && (self.handoff.pending.contains(to) || self.handoff.pending.total() < c.max_custody)
    }

    /// Keeps flight `key`'s copy for `to` here (custody): its leg becomes
    /// a write, `queued` once committed.
    pub(crate) fn keep(&mut self, key: FlightKey, to: Address, frame: &Bytes) -> Recipient {
        self.stats.custody += 1;
        self.handoff.pending.insert(to);
        self.scan_soon();
        self.enqueue(key, to, key.1, key.0, frame, false)
    }

    /// Look at pending addresses soon (the relay set changed, or one was
    /// added).
    pub(crate) fn scan_soon(&mut self) {
        if self.handoff.pending.is_empty() {
            return;
        }
        self.scan_within(self.config.federation.ring_settle);
    }

    /// Look at pending addresses `after` from now at the latest.
    fn scan_within(&mut self, after: std::time::Duration) {
        if let Some(now) = self.dir.now {
            let at = now + after;
            if self.handoff.next_scan.is_none_or(|t| t > at) {
                self.handoff.next_scan = Some(at);
            }
        }
    }

    pub(crate) fn handoff_timeout(&self) -> Option<Instant> {
        self.handoff
            .next_scan
            .filter(|_| !self.handoff.pending.is_empty())
    }

    pub(crate) fn handoff_tick(&mut self, now: Instant) {
        if self.handoff.next_scan.is_none_or(|t| t > now) {
            return;
        }
        self.handoff.next_scan = None;
        use std::ops::Bound::{Excluded, Unbounded};
        let start = self.handoff.cursor;
        let mut batch: Vec<Address> = match start {
            Some(c) => self.handoff.pending.range((Excluded(c), Unbounded)),
            None => self.handoff.pending.range(..),
        }
        .take(SCAN_BATCH)
        .copied()
        .collect();
        // Past the end: on from the start (the round is complete).
        let wrapped = start.is_some() && batch.len() < SCAN_BATCH;
        if wrapped {
            let more: Vec<Address> = self
                .handoff
                .pending
                .iter()
                .take(SCAN_BATCH - batch.len())
                .filter(|a| !batch.contains(a))
                .copied()
                .collect();
            batch.extend(more);
        }
        let goes_on = !wrapped
            && batch.last().is_some_and(|l| {
                self.handoff
                    .pending
                    .range((Excluded(*l), Unbounded))
                    .next()
                    .is_some()
            });
        self.handoff.cursor = batch.last().copied();
        for addr in batch {
            self.consider_handoff(now, addr, None);
        }
        if !self.handoff.pending.is_empty() {
            // A round over many addresses goes on soon (runs are bounded);
            // then the next round after `handoff_retry`.
            let f = &self.config.federation;
            let pause = if goes_on {
                f.ring_settle
            } else {
                f.handoff_retry
            };
            self.handoff.next_scan = Some(now + pause);
        }
    }

    /// A record says `addr` is online at another relay: if messages for it
    /// may wait here, they go there.
    pub(crate) fn online_elsewhere(&mut self, now: Instant, addr: Address) {
        let ours = self.known.contains(&addr) || self.handoff.pending.contains(&addr);
        if ours && self.receivers_of(&addr).is_empty() && !self.handoff.runs.contains_key(&addr) {
            self.consider_handoff(now, addr, None);
        }
    }

    /// Something may now be stored here for `addr` with no session to
    /// take it while the directory says it is online elsewhere (its last
    /// session here left, or a late write landed): it is looked at soon.
    pub(crate) fn may_move(&mut self, addr: Address) {
        if let Some(run) = self.handoff.runs.get_mut(&addr) {
            run.dirty = true;
            return;
        }
        let me = self.me;
        let elsewhere = self
            .homes(&addr)
            .iter()
            .any(|p| p.online && p.proof.relay_key != me);
        if elsewhere
            && self.receivers_of(&addr).is_empty()
            && self.handoff.pending.total() < self.config.federation.max_custody
        {
            self.handoff.pending.insert(addr);
            self.scan_soon();
        }
    }

    /// Decides whether `addr`'s stored messages can move now, and where
    /// (`found`: a lookup's answer, when this comes after one).
    pub(crate) fn consider_handoff(
        &mut self,
        now: Instant,
        addr: Address,
        found: Option<&[Presence]>,
    ) {
        if self.handoff.runs.contains_key(&addr) {
            return;
        }
        if !self.receivers_of(&addr).is_empty() {
            // Its sessions here take the backlog.
            self.handoff.pending.remove(&addr);
            return;
        }
        let client = self.known.contains(&addr);
        let homes: Vec<Presence> = match found {
            Some(f) => f.to_vec(),
            None => self.homes(&addr).to_vec(),
        };
        if homes.is_empty() && found.is_none() {
            // An address whose records are not known here (kept in
            // custody, or a client of this relay's that registered here
            // send-only, which publishes no record): ask.
            self.handoff.pending.insert(addr);
            return self.look_up(now, addr, crate::directory::Waiter::Handoff(addr));
        }
        let me = self.me;
        let online: Vec<Address> = homes
            .iter()
            .filter(|p| p.online && p.proof.relay_key != me)
            .map(|p| p.proof.relay_key)
            .collect();
        let candidates = if client || !online.is_empty() {
            online
        } else {
            self.elsewhere_of(&homes)
        };
        let Some(relay) = candidates.into_iter().find(|r| self.hop(r).is_some()) else {
            if client && !homes.iter().any(|p| p.online && p.proof.relay_key != me) {
                // Offline everywhere else: its messages wait here.
                self.handoff.pending.remove(&addr);
            } else {
                self.handoff.pending.insert(addr);
                self.retry_later();
            }
            return;
        };
        if self.handoff.runs.len() >= MAX_RUNS {
            self.handoff.pending.insert(addr);
            return self.retry_later();
        }
        self.handoff.pending.insert(addr);
        self.handoff.runs.insert(
            addr,
            Run {
                relay,
                reading: None,
                after: 0,
                open: 0,
                failed: false,
                dirty: false,
            },
        );
        self.handoff_read(addr);
    }

    fn handoff_read(&mut self, addr: Address) {
        let Some(after) = self.handoff.runs.get(&addr).map(|r| r.after) else {
            return;
        };
        let token = self.token(crate::relay::Waiting::Handoff { address: addr });
        self.push_op(StoreOp::Read {
            token,
            recipient: addr,
            after,
            limit: self.config.read_batch.max(1),
        });
        if let Some(r) = self.handoff.runs.get_mut(&addr) {
            r.reading = Some(token);
        }
    }

    /// A hand-off run's read came back: each message goes to the run's
    /// relay, in order.
    pub(crate) fn on_handoff_read(
        &mut self,
        now: Instant,
        token: Token,
        addr: Address,
        result: Result<Vec<Stored>, ErrorCode>,
    ) {
        let Some(run) = self.handoff.runs.get_mut(&addr) else {
            return;
        };
        if run.reading != Some(token) {
            return;
        }
        run.reading = None;
        let relay = run.relay;
        let dirty = std::mem::take(&mut run.dirty);
        let msgs = match result {
            Ok(m) if !m.is_empty() && self.receivers_of(&addr).is_empty() => m,
            Ok(m) if m.is_empty() && dirty && self.receivers_of(&addr).is_empty() => {
                return self.handoff_read(addr);
            }
            Ok(m) => {
                // Nothing (more) stored, or a session here takes it now;
                // a write for it still on its way is looked at later.
                self.handoff.runs.remove(&addr);
                if m.is_empty() && !self.writes_for(&addr) {
                    self.handoff.pending.remove(&addr);
                } else {
                    self.retry_later();
                }
                return;
            }
            Err(_) => {
                self.handoff.runs.remove(&addr);
                return self.retry_later();
            }
        };
        for m in msgs {
            let Ok(ClientToRelay::Msg(msg)) = ClientToRelay::decode(&m.frame) else {
                continue;
            };
            let key = (m.id, msg.from);
            if self.flights.contains_key(&key) || self.local_ids.contains_key(&m.id) {
                // Still in flight here (its receipt not out yet): later,
                // and nothing after it now (order).
                if let Some(r) = self.handoff.runs.get_mut(&addr) {
                    r.failed = true;
                }
                break;
            }
            self.hand_over(now, key, addr, relay, &msg, m.frame);
            if let Some(r) = self.handoff.runs.get_mut(&addr) {
                r.after = r.after.max(m.seq);
                r.open += 1;
            }
        }
        self.run_step(addr);
    }

    /// One stored message for `to` goes to `relay` as a hand-off, in a
    /// flight of its own whose outcome settles the stored copy.
    fn hand_over(
        &mut self,
        now: Instant,
        key: FlightKey,
        to: Address,
        relay: Address,
        msg: &Msg,
        frame: Bytes,
    ) {
        self.local_ids.insert(key.0, key);
        let leg = (to, Recipient::Forwarded { relay });
        let head = (key, Reply::Handoff { to }, msg.dest.route());
        self.one_leg_flight(now, head, frame.clone(), leg, vec![(to, relay)]);
        let fwd = RelayToRelay::Forward(Forward {
            origin: self.me,
            hops: 1,
            target: ForwardTarget::Handoff { relay, to },
            msg: frame,
        })
        .encode();
        if let Err(code) = self.send_toward(&relay, fwd, key.0) {
            if let Some(s) = self
                .flights
                .get_mut(&key)
                .and_then(|f| f.leg_mut(&to, &relay))
            {
                *s = Recipient::Settled(entry(to, Status::NoRoute, Some(code)));
            }
        }
        self.stats.handed_off += 1;
        self.finish_if_settled(key);
    }

    /// A hand-off flight settled: its copy here is deleted if the other
    /// relay has it.
    pub(crate) fn handoff_settled(&mut self, key: FlightKey, to: Address, f: &Flight) {
        self.local_ids.remove(&key.0);
        let ok = f.entries().is_some_and(|e| {
            e.iter()
                .any(|e| e.to == to && matches!(e.status, Status::Delivered | Status::Queued))
        });
        if ok {
            let op = self.push_op(StoreOp::Dequeue {
                recipient: to,
                id: key.0,
            });
            self.note_gone(to, key.0, op);
        } else {
            self.stats.handoffs_failed += 1;
        }
        let Some(run) = self.handoff.runs.get_mut(&to) else {
            return;
        };
        run.open = run.open.saturating_sub(1);
        run.failed |= !ok;
        self.run_step(to);
    }

    /// After a batch: the next one, or the end of the run (a failure:
    /// tried again later).
    fn run_step(&mut self, addr: Address) {
        let Some(run) = self.handoff.runs.get(&addr) else {
            return;
        };
        if run.open > 0 || run.reading.is_some() {
            return;
        }
        if run.failed {
            self.handoff.runs.remove(&addr);
            self.handoff.pending.insert(addr);
            return self.retry_later();
        }
        self.handoff_read(addr);
    }

    /// Look at pending addresses again after `handoff_retry`.
    fn retry_later(&mut self) {
        self.scan_within(self.config.federation.handoff_retry);
    }

    /// A FORWARD handing over a message the origin stored for `to`, a
    /// client of ours: delivered or stored like any other, its outcome
    /// back to the origin. The sender may be anyone, a client of ours
    /// too (the origin stored it for `to` while `to` was there, or kept
    /// it in custody): what is checked is that the message names `to` and
    /// that `to` is ours.
    pub(crate) fn handoff_here(
        &mut self,
        now: Instant,
        origin: Address,
        to: Address,
        frame: Bytes,
        msg: &Msg,
    ) {
        let named = match &msg.dest {
            Dest::A2b(b) => *b == to,
            Dest::A2g(list) => list.contains(&to),
            Dest::Group(_) => true,
            Dest::A2a => msg.from == to,
            Dest::A2n(_) => false,
        };
        let key = (msg.id, msg.from);
        if self.took(msg.id, &to, &msg.from) {
            // It had it already: nothing is handed twice.
            let e = entry(to, Status::Queued, None);
            return self.reply_to_origin(origin, msg.id, vec![e], 0);
        }
        let refused = if !named {
            Some((Status::Rejected, ErrorCode::ForgedForward))
        } else if !self.by_address.contains_key(&to) && !self.known.contains(&to) {
            Some((Status::NoRoute, ErrorCode::NoRoute))
        } else if self.flights.contains_key(&key) {
            Some((Status::Rejected, ErrorCode::Duplicate))
        } else if self.handoff.runs.contains_key(&to) {
            // This relay is moving `to`'s messages away itself (each thinks
            // it is at the other): neither takes, both keep theirs and look
            // again later, so no copy is deleted on both sides.
            Some((Status::NoRoute, ErrorCode::Moved))
        } else {
            None
        };
        if let Some((status, code)) = refused {
            self.stats.error(code);
            return self.reply_to_origin(origin, msg.id, vec![entry(to, status, Some(code))], 0);
        }
        if self.moved(&to) {
            // It went on to another relay meanwhile: the origin looks again
            // later.
            let e = entry(to, Status::NoRoute, Some(ErrorCode::Moved));
            self.stats.error(ErrorCode::Moved);
            return self.reply_to_origin(origin, msg.id, vec![e], 0);
        }
        // Written first, whatever its sessions: a copy of it may be on disk
        // here already (stored before a crash lost the answer), and the
        // store's write is idempotent, so the copy its session takes and
        // acknowledges is the one deleted, never handed twice.
        let state = self.enqueue(key, to, key.1, key.0, &frame, false);
        let head = (key, Reply::Relay(origin), msg.dest.route());
        self.one_leg_flight(now, head, frame, (to, state), Vec::new());
    }

    /// A flight with one recipient leg, due at `receipt_timeout`.
    fn one_leg_flight(
        &mut self,
        now: Instant,
        (key, reply, route): (FlightKey, Reply, w2w_proto::frame::Route),
        frame: Bytes,
        leg: (Address, Recipient),
        sent: Vec<(Address, Address)>,
    ) {
        self.next += 1;
        let deadline = (now + self.config.receipt_timeout, self.next);
        self.deadlines.insert(deadline, key);
        self.flights.insert(
            key,
            Flight {
                reply,
                resent: None,
                route,
                frame,
                recipients: vec![leg],
                deadline,
                expired: false,
                broadcast: None,
                copies: 0,
                resolving: 0,
                unsent: BTreeMap::new(),
                sent,
            },
        );
    }
}

/// (id, recipient, digest of the sender): ids are the sender's, so this
/// names one message for one recipient.
fn taken_key(id: MsgId, to: &Address, from: &Address) -> SeenKey {
    seen_key(&id, to, &from.0, None)
}

impl RelayCore {
    /// Whether message `id` (this MSG frame) from another relay was
    /// delivered or stored here for `to` already.
    pub(crate) fn took(&self, id: MsgId, to: &Address, from: &Address) -> bool {
        self.handoff.taken.contains(&taken_key(id, to, from))
    }

    /// A message from another relay was delivered or stored here for
    /// these recipients (a flight with `Reply::Relay` settled).
    pub(crate) fn note_taken(&mut self, (id, from): FlightKey, entries: &[ReceiptEntry]) {
        // (Only delivered: a copy stored here may still move on, and then
        // a hand-off of it from elsewhere must be taken, not waved off.)
        for e in entries {
            if e.status == Status::Delivered {
                self.note_took(id, e.to, from);
            }
        }
    }

    /// `to` acknowledged message `id` from `from` here (also one read
    /// from the store after a restart, whose hand-off may come again).
    pub(crate) fn note_took(&mut self, id: MsgId, to: Address, from: Address) {
        let now = self.dir.now.unwrap_or_else(Instant::now);
        self.handoff.taken.insert(taken_key(id, &to, &from), now);
    }
}
