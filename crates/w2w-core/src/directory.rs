//! Where an address's directory records live (PROTOCOL 12.12): the
//! placement rule and the tables of the partitioned directory.
//!
//! Every relay knows every relay (link state is small: one record per
//! relay), but not every address. An address's records are held by the
//! `replicas` reachable relays whose keys are closest to it by XOR
//! distance (a one-hop DHT with Kademlia's metric), plus the relays that
//! host it. Each relay computes the same placement from its own link-state
//! view, so a record needs no routing table of its own: it is sent along
//! the link-state path to each of those relays. Views differ while a
//! change spreads, which is why a record goes to several relays and a
//! lookup asks all of them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use w2w_proto::s2s::{
    DirAnswer, DirGet, DirPut, Forward, Presence, RegistrationProof, RelayToRelay,
};
use w2w_proto::{Address, ErrorCode};

use crate::federation::{NewRecord, MAX_HOMES};
use crate::flight::{FlightKey, Recipient};
use crate::lookup::{Join, Lookups};
use crate::{ConnId, PeerId, RelayCore};

/// The `k` keys of `ring` (sorted, no repeats) closest to `target` by XOR
/// distance, closest first.
///
/// Keys sharing a longer prefix with `target` are closer than any that do
/// not, and in a sorted list the keys sharing a prefix are one run: so the
/// walk narrows the run bit by bit, taking a whole run when it is smaller
/// than what is still wanted. O(log² n) per call for random keys.
pub fn closest(ring: &[Address], target: &Address, k: usize) -> Vec<Address> {
    let mut out = Vec::with_capacity(k.min(ring.len()));
    take_closest(ring, target, 0, k, &mut out);
    out
}

fn bit(a: &Address, i: usize) -> bool {
    a.0[i / 8] & (0x80 >> (i % 8)) != 0
}

fn take_closest(run: &[Address], target: &Address, depth: usize, k: usize, out: &mut Vec<Address>) {
    if k == 0 || run.is_empty() {
        return;
    }
    if run.len() <= k || depth == 256 {
        let mut all = run.to_vec();
        all.sort_by_key(|a| xor(a, target));
        out.extend(all.into_iter().take(k));
        return;
    }
    // Every key of the run shares the first `depth` bits: split on the next.
    let split = run.partition_point(|a| !bit(a, depth));
    let (zero, one) = run.split_at(split);
    let (near, far) = if bit(target, depth) {
        (one, zero)
    } else {
        (zero, one)
    };
    if near.len() >= k {
        take_closest(near, target, depth + 1, k, out);
    } else {
        take_closest(near, target, depth + 1, near.len(), out);
        take_closest(far, target, depth + 1, k - near.len(), out);
    }
}

/// XOR distance, comparable as bytes.
pub fn xor(a: &Address, b: &Address) -> [u8; 32] {
    std::array::from_fn(|i| a.0[i] ^ b.0[i])
}

/// Who waits for a lookup.
#[derive(Debug, Clone)]
pub(crate) enum Waiter {
    /// A message's recipient legs (`Recipient::Resolving`).
    Flight(FlightKey),
    /// A client's LOOKUP request.
    Client { conn: ConnId, req_id: u32 },
    /// A FORWARD from `peer` whose sender is a client here too, with no
    /// record of it at the origin yet (its record may be on its way).
    Forward {
        peer: PeerId,
        forward: w2w_proto::s2s::Forward,
    },
    /// Messages kept here for the address (custody): where they go.
    Handoff(Address),
}

/// A client's LOOKUP answered later: (connection, request id, the relay
/// hosting the address and its URL).
pub type LookupAnswer = (ConnId, u32, Option<(Address, String)>);

/// The partitioned directory's state beside the held records (which stay
/// in `RelayCore::directory`).
#[derive(Debug, Default)]
pub(crate) struct Dir {
    /// When each held record of another relay stops counting unless it
    /// is renewed: (address, hosting relay) → expiry.
    pub leases: HashMap<(Address, Address), Instant>,
    /// Lookup answers for addresses this relay does not hold: records and
    /// when they stop being used.
    pub cache: HashMap<Address, (Vec<Presence>, Instant)>,
    /// Lookups on their way: DIR_GETs to the relays that hold an
    /// address's records; what they found (newest registration first).
    pub lookups: Lookups<Address, Presence, Waiter>,
    /// Reachable relays and this one, sorted: the placement's input;
    /// recomputed when next needed after `ring_dirty`.
    pub ring: Vec<Address>,
    pub ring_dirty: bool,
    /// This relay's own records: the relays each was last put on.
    pub placed: HashMap<Address, Vec<Address>>,
    pub next_nonce: u64,
    /// The next renewal of our records and sweep of expired ones.
    pub next_renew: Option<Instant>,
    /// When to put our records on relays that became responsible for them
    /// (the relay set changed).
    pub ring_check: Option<Instant>,
    pub ring_changed: bool,
    /// Records waiting to be put on a relay (paced), and when next.
    pub outgoing: VecDeque<(Address, Presence)>,
    pub put_at: Option<Instant>,
    /// Clients' LOOKUPs answered after a lookup.
    pub answers: VecDeque<LookupAnswer>,
    /// FORWARDs parked until a lookup says whether their sender is online
    /// at their origin.
    pub parked: usize,
    /// DIR_GETs per peer in the current second: (second start, count).
    pub gets: HashMap<PeerId, (Instant, u32)>,
    /// Lookups each client here caused in the current second.
    pub client_lookups: HashMap<Address, (Instant, u32)>,
    /// The latest `now` any input brought.
    pub now: Option<Instant>,
    /// The wall clock: (an instant, ms since the Unix epoch then).
    pub clock: Option<(Instant, u64)>,
    /// Until then, a relay that knows no other relay yet is joining (it
    /// has peers to dial): lookups wait for the first link instead of
    /// finding nothing.
    pub joining_until: Option<Instant>,
}

/// Records put per step, and the time between steps (~10,000 records/s).
const PUT_BATCH: usize = 512;
pub(crate) const PUT_PACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Most FORWARDs parked at once waiting for a lookup of their sender.
const MAX_PARKED: usize = 256;
/// Most waiters on one lookup.
const MAX_WAITERS: usize = 1024;
/// Most clients whose lookups in the current second are counted at once
/// (past it, counts older than a second are dropped).
const MAX_LOOKUP_SENDERS: usize = 100_000;

impl RelayCore {
    // ------------------------------------------------------------- time

    /// Every input with a clock passes it here: timers start from it.
    pub(crate) fn note_now(&mut self, now: Instant) {
        self.dir.now = Some(now);
        if self.dir.next_renew.is_none() {
            self.dir.next_renew = Some(now + self.renew_every());
        }
        if self.dir.ring_changed && self.dir.ring_check.is_none() {
            self.dir.ring_check = Some(now + self.config.federation.ring_settle);
        }
    }

    fn renew_every(&self) -> std::time::Duration {
        self.config.federation.lease / 3
    }

    /// The link state changed: routes, the ring and where our records
    /// belong may have.
    pub(crate) fn links_changed(&mut self) {
        self.links_dirty = true;
        self.dir.ring_dirty = true;
        self.dir.ring_changed = true;
        if let (Some(now), None) = (self.dir.now, self.dir.ring_check) {
            self.dir.ring_check = Some(now + self.config.federation.ring_settle);
        } // A relay that came back may take what waits here for it.
        self.scan_soon();
    }

    /// When the directory next needs `dir_tick`.
    pub(crate) fn dir_timeout(&self) -> Option<Instant> {
        let renew = self
            .dir
            .next_renew
            .filter(|_| !self.directory.is_empty() || !self.dir.cache.is_empty());
        let lookup = self.dir.lookups.next_deadline();
        renew
            .into_iter()
            .chain(lookup)
            .chain(self.dir.ring_check)
            .chain(self.dir.put_at)
            .chain(self.groups_timeout())
            .min()
    }

    pub(crate) fn dir_tick(&mut self, now: Instant) {
        let joining = self.joining();
        while let Some((addr, again)) = self.dir.lookups.expired(now, joining) {
            if again {
                self.ask(now, addr);
            } else {
                self.finish_lookup(now, addr);
            }
        }
        if self.dir.ring_check.is_some_and(|t| t <= now) {
            self.dir.ring_check = None;
            self.dir.ring_changed = false;
            self.place_own(false);
            self.place_groups(false);
        }
        if self.dir.next_renew.is_some_and(|t| t <= now) {
            self.dir.next_renew = Some(now + self.renew_every());
            // A renewal replaces what still waits from the last one.
            self.dir.outgoing.clear();
            self.place_own(true);
            self.renew_groups();
            self.sweep(now);
            self.sweep_groups(now);
        }
        if self.dir.put_at.is_some_and(|t| t <= now) {
            self.flush_puts(now);
        }
        self.groups_tick(now);
    }

    // -------------------------------------------------------- placement

    /// Reachable relays and this one, sorted.
    pub(crate) fn ring(&mut self) -> &[Address] {
        if self.dir.ring_dirty || self.dir.ring.is_empty() {
            self.recompute_if_dirty();
            // Only relays that published their link state: a peer that
            // never did is reachable from its neighbours alone, and would
            // be placed differently by each relay (and learn records
            // without having joined).
            let links = &self.links;
            let mut ring: Vec<Address> = links
                .reachable()
                .filter(|r| links.get(r).is_some())
                .copied()
                .collect();
            ring.push(self.me);
            ring.sort_unstable();
            ring.dedup();
            self.dir.ring = ring;
            self.dir.ring_dirty = false;
        }
        &self.dir.ring
    }

    /// The relays that hold `addr`'s records, closest first.
    pub fn placement(&mut self, addr: &Address) -> Vec<Address> {
        let k = self.config.federation.replicas.max(1);
        closest(self.ring(), addr, k)
    }

    /// Whether this relay holds `addr`'s records (with a little slack:
    /// views of the relay set differ while a change spreads).
    pub(crate) fn responsible(&mut self, addr: &Address) -> bool {
        let k = self.config.federation.replicas.max(1) + 2;
        let me = self.me;
        closest(self.ring(), addr, k).contains(&me)
    }

    /// Puts our records on the relays responsible for them: all of them
    /// (`renew`: the leases are renewed), or only those not put there yet
    /// (the relay set changed). One DIR_PUT per relay per 64 records.
    fn place_own(&mut self, renew: bool) {
        let me = self.me;
        let mut own: Vec<Presence> = self
            .directory
            .values()
            .flat_map(|h| h.iter().filter(|p| p.proof.relay_key == me))
            .cloned()
            .collect();
        own.sort_unstable_by_key(|p| p.proof.address);
        let mut by_target: BTreeMap<Address, Vec<Presence>> = BTreeMap::new();
        for p in own {
            let addr = p.proof.address;
            let targets: Vec<Address> = self
                .placement(&addr)
                .into_iter()
                .filter(|t| *t != me)
                .collect();
            let before = self.dir.placed.get(&addr);
            for t in &targets {
                if renew || before.is_none_or(|b| !b.contains(t)) {
                    by_target.entry(*t).or_default().push(p.clone());
                }
            }
            self.dir.placed.insert(addr, targets);
        }
        for (target, records) in by_target {
            self.dir
                .outgoing
                .extend(records.into_iter().map(|p| (target, p)));
        }
        if let Some(now) = self.dir.now {
            self.flush_puts(now);
        }
    }

    /// Sends up to [`PUT_BATCH`] of the records waiting to be put (shared
    /// among a relay's shards), and comes back for the rest in
    /// [`PUT_PACE`]: a relay's records go out
    /// paced, so no link's queue fills with them (however many addresses
    /// it hosts).
    pub(crate) fn flush_puts(&mut self, now: Instant) {
        // The shards of a relay share its pace (they put at once).
        let batch = PUT_BATCH.div_ceil(self.shard.1);
        let n = batch.min(self.dir.outgoing.len());
        // Group records share the step's allowance.
        self.flush_group_puts(batch - n);
        let mut by_target: BTreeMap<Address, Vec<Presence>> = BTreeMap::new();
        for (t, p) in self.dir.outgoing.drain(..n) {
            by_target.entry(t).or_default().push(p);
        }
        for (target, records) in by_target {
            let mut sent = true;
            for chunk in records.chunks(w2w_proto::s2s::MAX_DIR_RECORDS) {
                let put = RelayToRelay::DirPut(DirPut {
                    target,
                    hops: 1,
                    records: chunk.to_vec(),
                });
                sent &= self.route_to(&target, put.encode());
            }
            if !sent {
                // No path now: tried again when the relay set changes.
                self.unplace(&target, &records);
            }
        }
        let waiting = !self.dir.outgoing.is_empty() || self.group_puts_waiting();
        self.dir.put_at = waiting.then(|| now + PUT_PACE);
    }

    /// `records` did not reach `target`: not placed there.
    fn unplace(&mut self, target: &Address, records: &[Presence]) {
        for p in records {
            if let Some(v) = self.dir.placed.get_mut(&p.proof.address) {
                v.retain(|t| t != target);
            }
        }
    }

    /// Drops records whose lease ran out, and stale lookup answers.
    fn sweep(&mut self, now: Instant) {
        let expired: Vec<(Address, Address)> = self
            .dir
            .leases
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| *k)
            .collect();
        for (addr, relay) in expired {
            self.dir.leases.remove(&(addr, relay));
            if let Some(homes) = self.directory.get_mut(&addr) {
                homes.retain(|p| p.proof.relay_key != relay);
                if homes.is_empty() {
                    self.directory.remove(&addr);
                }
            }
            self.stats.records_expired += 1;
        }
        self.dir.cache.retain(|_, (_, t)| *t > now);
        self.dir
            .gets
            .retain(|_, (t, _)| now.duration_since(*t).as_secs() < 1);
    }

    /// Sends a directory frame toward relay `target`; false if no path.
    pub(crate) fn route_to(&mut self, target: &Address, frame: Bytes) -> bool {
        let Some(peer) = self
            .hop(target)
            .and_then(|h| self.peer_by_key.get(&h.next).copied())
        else {
            return false;
        };
        self.send_peer(peer, frame);
        true
    }

    // ------------------------------------------------------- own records

    pub(crate) fn local_join(&mut self, now: Instant, proof: RegistrationProof) {
        let seq = self.next_record_seq();
        let since = self.wall_ms(now);
        let p = Presence::sign(&self.identity, proof, true, seq, since);
        self.publish_own(p);
    }

    /// Sets the wall clock: `unix_ms` is the time at `now` (ms since the
    /// Unix epoch). A registration's record carries the time it was
    /// accepted by this clock, which orders it against other relays'
    /// records of the address (not the client's clock; PROTOCOL 12.5).
    pub fn set_clock(&mut self, now: Instant, unix_ms: u64) {
        self.dir.clock = Some((now, unix_ms));
    }

    /// This relay's wall clock at `now` (0 if it was never set).
    pub(crate) fn wall_ms(&self, now: Instant) -> u64 {
        self.dir.clock.map_or(0, |(at, ms)| {
            let d = now.saturating_duration_since(at).as_millis() as u64;
            ms.saturating_add(d)
        })
    }

    /// Records for addresses that registered here before a restart (their
    /// registrations, from the store): published as offline, so their
    /// messages keep coming here to be stored.
    pub fn restore_records(&mut self, proofs: impl IntoIterator<Item = RegistrationProof>) {
        for proof in proofs {
            let addr = proof.address;
            if proof.relay_key != self.me || self.by_address.contains_key(&addr) {
                continue;
            }
            self.known.insert(addr);
            let seq = self.next_record_seq();
            // When it registered is not kept: older than any registration
            // since (its messages follow it if it is online elsewhere).
            let p = Presence::sign(&self.identity, proof, false, seq, 0);
            self.set_home(p);
        }
        // Put at the next renewal (the ring is not known yet).
    }

    /// The number of a record this relay publishes: above every earlier
    /// one, also of an earlier run (it shares the link-state counter,
    /// which starts above any number an earlier run used).
    pub(crate) fn next_record_seq(&mut self) -> u64 {
        self.link_seq += 1;
        self.link_seq
    }

    /// The last session of `address` left: publish the withdrawal, if our
    /// record is the current one.
    pub(crate) fn local_leave(&mut self, address: &Address) {
        let me = self.me;
        let Some(cur) = self
            .homes(address)
            .iter()
            .find(|p| p.proof.relay_key == me && p.online)
        else {
            return;
        };
        let (proof, since) = (cur.proof.clone(), cur.since_ms);
        let seq = self.next_record_seq();
        let p = Presence::sign(&self.identity, proof, false, seq, since);
        self.publish_own(p);
    }

    /// Keeps our record `p` and puts it on the relays responsible for its
    /// address (and tells its other hosts, if we are one of those).
    fn publish_own(&mut self, p: Presence) {
        let addr = p.proof.address;
        let me = self.me;
        self.set_home(p.clone());
        self.dir.cache.remove(&addr);
        let targets: Vec<Address> = self
            .placement(&addr)
            .into_iter()
            .filter(|t| *t != me)
            .collect();
        let mut placed = Vec::with_capacity(targets.len());
        for t in targets {
            let put = RelayToRelay::DirPut(DirPut {
                target: t,
                hops: 1,
                records: vec![p.clone()],
            });
            if self.route_to(&t, put.encode()) {
                placed.push(t);
            }
        }
        self.dir.placed.insert(addr, placed);
        if self.responsible(&addr) {
            self.tell_hosts(&p);
        }
    }

    /// Puts `p` in its address's records, in place of the same relay's
    /// (newest registration first by the hosting relays' clocks,
    /// `Presence::newness`; at most [`MAX_HOMES`]: the oldest goes).
    pub(crate) fn set_home(&mut self, p: Presence) {
        let relay = p.proof.relay_key;
        // Most addresses have one record: room for one (a Vec grows to
        // four at its first push, ~1 KiB per address for nothing).
        let homes = self
            .directory
            .entry(p.proof.address)
            .or_insert_with(|| Vec::with_capacity(1));
        homes.retain(|h| h.proof.relay_key != relay);
        homes.push(p);
        homes.sort_by_key(|h| std::cmp::Reverse(h.newness()));
        for gone in homes.drain(MAX_HOMES.min(homes.len())..) {
            self.dir
                .leases
                .remove(&(gone.proof.address, gone.proof.relay_key));
        }
    }

    /// A relay responsible for `p`'s address tells the address's other
    /// hosts about `p`, and `p`'s relay about them: so a relay learns at
    /// once that a client of its own is also (or now) elsewhere.
    fn tell_hosts(&mut self, p: &Presence) {
        let addr = p.proof.address;
        let relay = p.proof.relay_key;
        let me = self.me;
        let others: Vec<Presence> = self
            .homes(&addr)
            .iter()
            .filter(|q| q.proof.relay_key != relay)
            .cloned()
            .collect();
        for q in &others {
            let host = q.proof.relay_key;
            if host != me {
                let put = RelayToRelay::DirPut(DirPut {
                    target: host,
                    hops: 1,
                    records: vec![p.clone()],
                });
                self.route_to(&host, put.encode());
            }
        }
        if relay != me && !others.is_empty() {
            self.tell_hosts_to(&addr, relay);
        }
    }

    /// Sends `relay` the records of `addr`'s other relays.
    fn tell_hosts_to(&mut self, addr: &Address, relay: Address) {
        let others: Vec<Presence> = self
            .homes_held(addr)
            .iter()
            .filter(|q| q.proof.relay_key != relay)
            .cloned()
            .collect();
        if others.is_empty() || relay == self.me {
            return;
        }
        let put = RelayToRelay::DirPut(DirPut {
            target: relay,
            hops: 1,
            records: others,
        });
        self.route_to(&relay, put.encode());
    }

    // ---------------------------------------------------- peer's records

    /// A record from a peer (a DIR_PUT for us, or a PRESENCE).
    pub(crate) fn accept_record(&mut self, now: Instant, peer: PeerId, p: Presence) {
        let addr = p.proof.address;
        let relay = p.proof.relay_key;
        // A renewal is the record held here, byte for byte: its signatures
        // were checked when it came first (two checks, ~100 µs: renewals
        // of every held record every `lease_ms`/3 would cost that again).
        // Replaying it can only extend its lease, as replaying the signed
        // bytes would.
        let known = self
            .homes_held(&addr)
            .iter()
            .any(|h| h.proof.relay_key == relay && h.seq == p.seq && h.relay_sig == p.relay_sig);
        if !known && self.config.federation.check_signatures && p.verify().is_err() {
            self.stats.error(ErrorCode::ForgedPresence);
            return;
        }
        let cur = self
            .homes_held(&addr)
            .iter()
            .find(|h| h.proof.relay_key == relay)
            .map(|h| h.rank());
        if relay == self.me {
            // Ours, from before a restart: continue above its number, and
            // if it says online with no session here, say it left.
            self.link_seq = self.link_seq.max(p.seq);
            if cur.is_none_or(|r| r < p.rank()) {
                let stale = p.online && self.receivers_of(&addr).is_empty();
                self.set_home(p);
                if stale {
                    self.local_leave(&addr);
                }
            }
            return;
        }
        match cur {
            Some(r) if r > p.rank() => return,
            Some(r) if r == p.rank() => {
                // A renewal. Its relay is told of the address's other
                // relays again (a word lost on a dropped link heals).
                let lease = self.config.federation.lease;
                self.dir.leases.insert((addr, relay), now + lease);
                // (Only by a relay that is not a host itself: hosts tell
                // each other nothing on renewals, or they would echo.)
                let me = self.me;
                let homes = self.homes_held(&addr);
                let host = homes.iter().any(|h| h.proof.relay_key == me);
                if homes.len() > 1 && !host && self.responsible(&addr) {
                    self.tell_hosts_to(&addr, relay);
                }
                return;
            }
            Some(_) => {}
            None => {
                let hosted = self.by_address.contains_key(&addr) || self.known.contains(&addr);
                let held = self.directory.contains_key(&addr);
                if !hosted && !held && !self.responsible(&addr) {
                    self.stats.records_refused += 1;
                    return;
                }
                if !held && !self.admit_new(peer, NewRecord::Address) {
                    return;
                }
            }
        }
        self.set_home(p.clone());
        let lease = self.config.federation.lease;
        self.dir.leases.insert((addr, relay), now + lease);
        self.dir.cache.remove(&addr);
        if self.responsible(&addr) {
            self.tell_hosts(&p);
        }
        if p.online {
            // What waits here for it may go there (handoff.rs).
            self.online_elsewhere(now, addr);
        }
    }

    pub(crate) fn on_dir_put(&mut self, now: Instant, peer: PeerId, from: Address, d: DirPut) {
        if d.target != self.me {
            let (hops, target) = (d.hops, d.target);
            return self.pass_on(hops, target, &from, |hops| {
                RelayToRelay::DirPut(DirPut { hops, ..d })
            });
        }
        for p in d.records {
            self.accept_record(now, peer, p);
        }
    }

    /// Passes a directory frame for another relay on toward `target`, as
    /// `make(hops + 1)`: within the hop limit, and never back to where it
    /// came from (else dropped, counted).
    pub(crate) fn pass_on(
        &mut self,
        hops: u8,
        target: Address,
        from: &Address,
        make: impl FnOnce(u8) -> RelayToRelay,
    ) {
        let refused = if hops >= self.config.federation.hop_limit {
            Some(ErrorCode::HopLimit)
        } else {
            match self.hop(&target) {
                None => Some(ErrorCode::Unreachable),
                Some(h) if h.next == *from => Some(ErrorCode::Loop),
                Some(_) => None,
            }
        };
        match refused {
            Some(code) => self.stats.error(code),
            None => {
                self.route_to(&target, make(hops + 1).encode());
            }
        }
    }

    pub(crate) fn on_dir_get(&mut self, now: Instant, peer: PeerId, from: Address, g: DirGet) {
        if g.target != self.me {
            let (hops, target) = (g.hops, g.target);
            return self.pass_on(hops, target, &from, |hops| {
                RelayToRelay::DirGet(DirGet { hops, ..g })
            });
        }
        if !self.get_allowed(now, peer) {
            return;
        }
        let records = self.homes_held(&g.address).to_vec();
        let answer = RelayToRelay::DirAnswer(DirAnswer {
            origin: g.origin,
            reporter: self.me,
            hops: 0,
            nonce: g.nonce,
            address: g.address,
            records,
        });
        if !self.route_to(&g.origin, answer.encode()) {
            self.stats.error(ErrorCode::NoRoute);
        }
    }

    /// Lookups (DIR_GET, GROUP_GET) are rate-limited per link they arrive
    /// on: false past `lookups_per_peer` in the current second.
    pub(crate) fn get_allowed(&mut self, now: Instant, peer: PeerId) -> bool {
        let limit = self.config.federation.lookups_per_peer;
        let (start, n) = self.dir.gets.entry(peer).or_insert((now, 0));
        if now.duration_since(*start).as_secs() >= 1 {
            *start = now;
            *n = 0;
        }
        *n += 1;
        if *n > limit {
            self.stats.lookups_refused += 1;
            return false;
        }
        true
    }

    pub(crate) fn on_dir_answer(&mut self, now: Instant, from: Address, a: DirAnswer) {
        if a.origin != self.me {
            let (hops, origin) = (a.hops, a.origin);
            return self.pass_on(hops, origin, &from, |hops| {
                RelayToRelay::DirAnswer(DirAnswer { hops, ..a })
            });
        }
        let check = self.config.federation.check_signatures;
        let Some(l) = self.dir.lookups.answer(&a.address, a.nonce, &a.reporter) else {
            return;
        };
        for p in a.records {
            if p.proof.address != a.address || (check && p.verify().is_err()) {
                continue;
            }
            let relay = p.proof.relay_key;
            match l.found.iter_mut().find(|q| q.proof.relay_key == relay) {
                Some(q) if q.rank() >= p.rank() => {}
                Some(q) => *q = p,
                None => l.found.push(p),
            }
        }
        l.found.sort_by_key(|h| std::cmp::Reverse(h.newness()));
        l.found.truncate(MAX_HOMES);
        // Done when every relay answered, or one named an online home.
        if l.all_answered() || l.found.iter().any(|p| p.online) {
            self.finish_lookup(now, a.address);
        }
    }

    // ----------------------------------------------------------- lookups

    /// Whether `to`'s relays must be looked up before a message can go:
    /// it is not a client here and this relay neither holds nor has
    /// recently looked up its records, and there are other relays (or it
    /// is still joining: then the lookup waits for them).
    pub(crate) fn needs_lookup(&mut self, to: &Address) -> bool {
        !self.by_address.contains_key(to)
            && !self.directory.contains_key(to)
            && !self.cached(to)
            && (self.links.len() > 1 || self.joining())
    }

    /// The relay has peers to dial and was started a moment ago (`until`):
    /// until it knows another relay, it is joining (PROTOCOL 12.12).
    pub fn expect_peers(&mut self, until: Instant) {
        self.dir.joining_until = Some(until);
        self.handoff.federated = true;
    }

    /// Whether this relay is still joining: it knows no other relay yet,
    /// within the time it was given to.
    pub(crate) fn joining(&self) -> bool {
        self.links.len() <= 1
            && self
                .dir
                .joining_until
                .is_some_and(|t| self.dir.now.is_none_or(|n| n < t))
    }

    /// The reason for a recipient no lookup found: `joining` while this
    /// relay knows no other relay yet, else `no_route`.
    pub(crate) fn not_found(&self) -> ErrorCode {
        if self.joining() {
            ErrorCode::Joining
        } else {
            ErrorCode::NoRoute
        }
    }

    fn cached(&self, to: &Address) -> bool {
        let now = self.dir.now;
        self.dir
            .cache
            .get(to)
            .is_some_and(|(_, t)| now.is_none_or(|n| n < *t))
    }

    /// Looks `addr` up for `waiter`: asks the relays that hold its records
    /// (one lookup per address at a time; later waiters join it). With no
    /// one to ask, or too many lookups on their way, it finishes at once.
    pub(crate) fn look_up(&mut self, now: Instant, addr: Address, waiter: Waiter) {
        let waiter = match self.dir.lookups.join(&addr, waiter, MAX_WAITERS) {
            Join::Joined => return,
            Join::Full(w) => return self.answer_waiter(now, addr, w, &[]),
            Join::Absent(w) => w,
        };
        if self.dir.lookups.len() >= self.config.federation.max_lookups {
            self.stats.lookups_refused += 1;
            return self.answer_waiter(now, addr, waiter, &[]);
        }
        self.dir.lookups.start(now, addr, waiter);
        self.ask(now, addr);
    }

    /// One round of a lookup: a DIR_GET to each relay of the placement.
    fn ask(&mut self, now: Instant, addr: Address) {
        let me = self.me;
        let targets: Vec<Address> = self
            .placement(&addr)
            .into_iter()
            .filter(|t| *t != me)
            .collect();
        self.dir.next_nonce += 1;
        let nonce = self.dir.next_nonce;
        let mut asked = Vec::new();
        for t in targets {
            let get = RelayToRelay::DirGet(DirGet {
                origin: me,
                target: t,
                hops: 1,
                nonce,
                address: addr,
            });
            if self.route_to(&t, get.encode()) {
                asked.push(t);
            }
        }
        self.stats.lookups += 1;
        let deadline = now + self.config.federation.lookup_timeout;
        // (Joining with no one to ask yet: asked again at the deadline.)
        let finish_if_nobody = !self.joining();
        if self
            .dir
            .lookups
            .round(&addr, nonce, asked, deadline, finish_if_nobody)
        {
            self.finish_lookup(now, addr);
        }
    }

    fn finish_lookup(&mut self, now: Instant, addr: Address) {
        let Some(l) = self.dir.lookups.finish(&addr) else {
            return;
        };
        let found = l.found;
        if !found.is_empty() {
            if self.by_address.contains_key(&addr) || self.known.contains(&addr) {
                // Other homes of a client of ours: held, like the
                // records its responsible relays send.
                let lease = self.config.federation.lease;
                for p in &found {
                    let relay = p.proof.relay_key;
                    if relay == self.me {
                        continue;
                    }
                    let newer = self
                        .homes_held(&addr)
                        .iter()
                        .find(|h| h.proof.relay_key == relay)
                        .is_none_or(|h| h.rank() < p.rank());
                    if newer {
                        self.set_home(p.clone());
                        self.dir.leases.insert((addr, relay), now + lease);
                        if p.online {
                            self.online_elsewhere(now, addr);
                        }
                    }
                }
            } else if self.dir.cache.len() < self.config.federation.max_cache {
                let ttl = self.config.federation.cache_ttl;
                self.dir.cache.insert(addr, (found.clone(), now + ttl));
            }
        }
        for w in l.waiters {
            self.answer_waiter(now, addr, w, &found);
        }
    }

    fn answer_waiter(&mut self, now: Instant, addr: Address, w: Waiter, found: &[Presence]) {
        match w {
            Waiter::Flight(key) => self.resolve_legs(now, key, addr, found),
            Waiter::Client { conn, req_id } => {
                let hosted = found.iter().find(|p| p.online).map(|p| {
                    let relay = p.proof.relay_key;
                    (relay, self.url_of(&relay, &p.proof.url))
                });
                self.dir.answers.push_back((conn, req_id, hosted));
            }
            Waiter::Forward { peer, forward } => {
                self.dir.parked -= 1;
                self.unpark_forward(now, peer, forward);
            }
            Waiter::Handoff(a) => self.consider_handoff(now, a, Some(found)),
        }
    }

    /// Parks a FORWARD whose sender is a client here too until a lookup
    /// of the sender says whether it is online at the origin; false if
    /// too many are parked.
    pub(crate) fn park_forward(
        &mut self,
        now: Instant,
        peer: PeerId,
        f: Forward,
        sender: Address,
    ) -> bool {
        if self.dir.parked >= MAX_PARKED {
            return false;
        }
        self.dir.parked += 1;
        self.look_up(now, sender, Waiter::Forward { peer, forward: f });
        true
    }

    /// The lookup for `to` is done (`found`: its records): its legs of
    /// flight `key` waiting for it become real ones, and once none is
    /// waiting the flight's FORWARDs go.
    fn resolve_legs(&mut self, _now: Instant, key: FlightKey, to: Address, found: &[Presence]) {
        let Some(f) = self.flights.get_mut(&key) else {
            return;
        };
        let Some(i) = f
            .recipients
            .iter()
            .position(|(a, s)| *a == to && matches!(s, Recipient::Resolving { .. }))
        else {
            return;
        };
        let Recipient::Resolving { moved_from } = f.recipients.remove(i).1 else {
            return;
        };
        let frame = f.frame.clone();
        let has_local = f.local(&to).is_some();
        let client = f.reply.client().is_some();
        // Relays it went or goes to already.
        let mut others: Vec<Address> = f
            .sent
            .iter()
            .filter(|(a, _)| *a == to)
            .map(|(_, r)| *r)
            .collect();
        others.extend(
            f.unsent
                .iter()
                .filter(|(_, tos)| tos.contains(&to))
                .map(|(r, _)| *r),
        );
        let had_leg = f.recipients.iter().any(|(a, _)| *a == to);
        let elsewhere: Vec<Address> = self
            .elsewhere_of(found)
            .into_iter()
            .filter(|r| Some(*r) != moved_from && !others.contains(r))
            .collect();
        let mut legs = Vec::new();
        let mut remote = BTreeMap::new();
        let none = if had_leg {
            // Its other legs answer for it.
            None
        } else if moved_from.is_some() {
            Some(ErrorCode::Moved)
        } else {
            Some(self.not_found())
        };
        let copies = self.place(
            (key, to),
            &frame,
            &elsewhere,
            (!has_local, client && !has_local && !had_leg, none),
            &mut legs,
            &mut remote,
        );
        let Some(f) = self.flights.get_mut(&key) else {
            return;
        };
        f.copies += copies;
        let at = i.min(f.recipients.len());
        f.recipients.splice(at..at, legs);
        for (relay, tos) in remote {
            f.unsent.entry(relay).or_default().extend(tos);
        }
        f.resolving = f.resolving.saturating_sub(1);
        if f.resolving == 0 {
            // Legs settled meanwhile (their relay became unreachable) do
            // not go.
            let unsent: Vec<(Address, Vec<Address>)> = std::mem::take(&mut f.unsent)
                .into_iter()
                .map(|(relay, mut tos)| {
                    let leg = Recipient::Forwarded { relay };
                    tos.retain(|a| f.recipients.iter().any(|(b, s)| b == a && *s == leg));
                    (relay, tos)
                })
                .filter(|(_, tos)| !tos.is_empty())
                .collect();
            for (relay, tos) in unsent {
                self.forward_to(key, relay, tos, &frame);
            }
        }
        self.finish_if_settled(key);
    }

    /// A FWD_RECEIPT said `to` moved away from `reporter`: its leg is
    /// looked up again (without `reporter`).
    pub(crate) fn reroute(&mut self, now: Instant, key: FlightKey, to: Address, reporter: Address) {
        self.dir.cache.remove(&to);
        let Some(f) = self.flights.get_mut(&key) else {
            return;
        };
        let Some(leg) = f.leg_mut(&to, &reporter) else {
            return;
        };
        *leg = Recipient::Resolving {
            moved_from: Some(reporter),
        };
        f.resolving += 1;
        self.stats.rerouted += 1;
        self.look_up(now, to, Waiter::Flight(key));
    }

    /// LOOKUP from a client: the relay hosting `addr` if known now
    /// (`Some`), or `None`: the answer comes from [`Self::poll_lookup_answer`].
    pub fn lookup_request(
        &mut self,
        now: Instant,
        (conn, sender): (ConnId, Address),
        req_id: u32,
        addr: Address,
    ) -> Result<Option<Option<(Address, String)>>, ErrorCode> {
        self.note_now(now);
        if !self.needs_lookup(&addr) {
            return Ok(Some(self.lookup(&addr)));
        }
        if !self.may_look_up(now, sender) {
            return Err(ErrorCode::RateLimited);
        }
        self.look_up(now, addr, Waiter::Client { conn, req_id });
        // It may have finished at once.
        let Some(pos) = self
            .dir
            .answers
            .iter()
            .position(|(c, r, _)| *c == conn && *r == req_id)
        else {
            return Ok(None);
        };
        Ok(self.dir.answers.remove(pos).map(|(_, _, a)| a))
    }

    /// Counts one lookup `sender` (a client here) makes happen, by a
    /// LOOKUP or a message for an address this relay must look up: false
    /// past `lookups_per_client` in the current second (each costs
    /// `replicas` DIR_GETs across the federation).
    pub(crate) fn may_look_up(&mut self, now: Instant, sender: Address) -> bool {
        let limit = self.config.federation.lookups_per_client;
        let allowed = match &self.wide {
            // Counted with the relay's other shards.
            Some(wide) => {
                let mut table = wide.lookups.lock().unwrap_or_else(|e| e.into_inner());
                count_lookup(&mut table, now, sender, limit)
            }
            None => count_lookup(&mut self.dir.client_lookups, now, sender, limit),
        };
        if !allowed {
            self.stats.lookups_refused += 1;
        }
        allowed
    }

    /// A client's LOOKUP answered after a lookup.
    pub fn poll_lookup_answer(&mut self) -> Option<LookupAnswer> {
        self.dir.answers.pop_front()
    }

    // ----------------------------------------------------------- queries

    /// The records this relay holds for `address` (not lookup answers).
    pub(crate) fn homes_held(&self, address: &Address) -> &[Presence] {
        self.directory.get(address).map_or(&[], |h| h.as_slice())
    }

    /// The records of `address` this relay knows (held, or a recent
    /// lookup's answer), newest registration first.
    pub(crate) fn homes(&self, address: &Address) -> &[Presence] {
        if let Some(h) = self.directory.get(address) {
            return h;
        }
        match self.dir.cache.get(address) {
            Some((h, t)) if self.dir.now.is_none_or(|n| n < *t) => h,
            _ => &[],
        }
    }

    /// The other relays a message for `addr` goes to (PROTOCOL 12.5):
    /// every relay where it is online (it may be at several at once); if
    /// it is online nowhere, the relay of its newest record, which stores
    /// for it, if that is not this one.
    pub(crate) fn homes_elsewhere(&self, addr: &Address) -> Vec<Address> {
        self.elsewhere_of(self.homes(addr))
    }

    pub(crate) fn elsewhere_of(&self, homes: &[Presence]) -> Vec<Address> {
        if homes.iter().any(|p| p.online) {
            return homes
                .iter()
                .filter(|p| p.online && p.proof.relay_key != self.me)
                .map(|p| p.proof.relay_key)
                .collect();
        }
        homes
            .first()
            .map(|p| p.proof.relay_key)
            .filter(|r| *r != self.me)
            .into_iter()
            .collect()
    }

    /// Whether `to`, with no receiving session here, is online at another
    /// relay: a FORWARD for it is answered `moved` rather than stored here
    /// (where it is not, whichever registration is newer).
    pub(crate) fn moved(&self, to: &Address) -> bool {
        if !self.receivers_of(to).is_empty() {
            return false;
        }
        self.homes_held(to)
            .iter()
            .any(|p| p.online && p.proof.relay_key != self.me)
    }

    /// Whether `addr` is a client of this relay (connected, or our record
    /// says online): its messages start here, not at a peer, unless the
    /// directory says it is online at that peer too.
    pub(crate) fn hosts(&self, addr: &Address) -> bool {
        self.by_address.contains_key(addr) || self.online_at(addr, &self.me)
    }

    /// Whether the directory says `address` is online at `relay`.
    pub(crate) fn online_at(&self, address: &Address, relay: &Address) -> bool {
        self.homes(address)
            .iter()
            .any(|p| p.online && p.proof.relay_key == *relay)
    }

    /// The newest registration of `address` this relay holds a record of
    /// (its relay and `Presence::newness`), and this relay's own record's.
    pub fn newest_record(&self, address: &Address) -> Option<(Address, (u64, u64, Address))> {
        self.homes_held(address)
            .first()
            .map(|p| (p.proof.relay_key, p.newness()))
    }

    pub fn own_record(&self, address: &Address) -> Option<(u64, u64, Address)> {
        self.homes_held(address)
            .iter()
            .find(|p| p.proof.relay_key == self.me)
            .map(|p| p.newness())
    }

    /// (relay, online, held) of each record of `address` known here, and
    /// whether messages for it wait to move (for diagnostics).
    pub fn debug_homes(&self, address: &Address) -> (Vec<(String, bool)>, bool, bool) {
        let homes = self
            .homes(address)
            .iter()
            .map(|p| (format!("{:.6}", p.proof.relay_key.to_string()), p.online))
            .collect();
        (
            homes,
            self.handoff.pending.contains(address),
            self.handoff.runs.contains_key(address),
        )
    }

    /// Whether this relay's directory says `address` is online at `relay`
    /// (`None`: it has no record of it there).
    pub fn record_online(&self, address: &Address, relay: &Address) -> Option<bool> {
        self.homes_held(address)
            .iter()
            .find(|p| p.proof.relay_key == *relay)
            .map(|p| p.online)
    }

    /// Addresses with records held here.
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// Held records (one per address and relay) and cached lookup answers.
    pub fn directory_records(&self) -> (usize, usize) {
        let held = self.directory.values().map(Vec::len).sum();
        (held, self.dir.cache.len())
    }

    /// Addresses that registered here (stored for while offline).
    pub fn known_len(&self) -> usize {
        self.known.len()
    }

    /// The relay hosting `address` (its newest online home) and its URL,
    /// if this relay knows it is online.
    pub fn lookup(&self, address: &Address) -> Option<(Address, String)> {
        let p = self.homes(address).iter().find(|p| p.online)?;
        let relay = p.proof.relay_key;
        Some((relay, self.url_of(&relay, &p.proof.url)))
    }

    /// Forgets addresses that registered here long ago and are gone: no
    /// longer stored for, and our records of them are dropped (their
    /// leases elsewhere run out).
    pub fn forget(&mut self, addrs: &[Address]) {
        for a in addrs {
            if self.by_address.contains_key(a) {
                continue;
            }
            self.known.remove(a);
            self.dir.placed.remove(a);
            let me = self.me;
            if let Some(homes) = self.directory.get_mut(a) {
                homes.retain(|p| p.proof.relay_key != me);
                if homes.is_empty() {
                    self.directory.remove(a);
                }
            }
        }
    }
}

/// Counts one lookup of `sender` in `table` (per second, at most
/// `limit`; the table bounded by `MAX_LOOKUP_SENDERS`): whether it may go.
fn count_lookup(
    table: &mut HashMap<Address, (Instant, u32)>,
    now: Instant,
    sender: Address,
    limit: u32,
) -> bool {
    if table.len() >= MAX_LOOKUP_SENDERS {
        // A new second for everyone (bounded table).
        table.retain(|_, (start, _)| now.duration_since(*start).as_secs() < 1);
    }
    let (start, n) = table.entry(sender).or_insert((now, 0));
    if now.duration_since(*start).as_secs() >= 1 {
        *start = now;
        *n = 0;
    }
    *n += 1;
    *n <= limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(seed: u64) -> Address {
        let mut r = crate::sim::Rng::new(seed);
        Address(r.bytes())
    }

    #[test]
    fn closest_agrees_with_sorting_everything_by_distance() {
        for n in [0usize, 1, 2, 3, 5, 17, 100, 1000] {
            let mut ring: Vec<Address> = (0..n as u64).map(|i| addr(i * 7 + 1)).collect();
            ring.sort();
            ring.dedup();
            for t in 0..50u64 {
                let target = addr(1_000_000 + t);
                for k in [1usize, 3, 4, 8] {
                    let mut want = ring.clone();
                    want.sort_by_key(|a| xor(a, &target));
                    want.truncate(k);
                    assert_eq!(closest(&ring, &target, k), want, "n {n} k {k}");
                }
            }
        }
    }

    #[test]
    fn a_key_in_the_ring_is_closest_to_itself() {
        let mut ring: Vec<Address> = (0..64).map(addr).collect();
        ring.sort();
        for a in &ring {
            assert_eq!(closest(&ring, a, 1), vec![*a]);
        }
    }
}
