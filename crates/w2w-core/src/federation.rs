//! The federation part of the relay core: peer links, link-state routing,
//! the directory, FORWARD and FWD_RECEIPT (PROTOCOL.md §12).
//!
//! A message for a client of another relay is one recipient of the
//! sender's flight, in state `Forwarded { relay }` until that relay's
//! FWD_RECEIPT (or the deadline) settles it. A FORWARD that arrives for
//! this relay's clients starts a flight of its own whose outcome goes back
//! to the origin: local delivery is the same code for both.
//!
//! Trust (PROTOCOL.md §12.11): a peer we dialled, or on the allowlist, is
//! trusted; any other is on probation, with its own slots and a bounded
//! allowance of new relays and addresses it may introduce. A FORWARD must
//! agree with the MSG it carries; no peer may speak for a client of ours.

use std::time::Instant;

use bytes::Bytes;
use w2w_proto::frame::{ClientToRelay, Dest, Msg, MsgId, ReceiptEntry, Route, Scope, Status};
use w2w_proto::s2s::{Forward, ForwardTarget, FwdReceipt, LinkState, RelayToRelay};
use w2w_proto::{Address, ErrorCode};

use crate::flight::{delivered_count, entry, Broadcast, FlightKey, Recipient, Reply};
use crate::routing::Hop;
use crate::seen::seen_key;
use crate::shard::Spread;
use crate::{Event, PeerId, RelayCore, Target, Transmit};

/// Most relays one address's records name at once (it may be online at
/// several); a newer registration pushes the oldest out.
pub(crate) const MAX_HOMES: usize = 4;

/// A peer link.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub key: Address,
    pub url: String,
    /// Dialled by us, allow-listed, or reached at a URL we dial; else on
    /// probation.
    pub trusted: bool,
    /// Relays and addresses this link was first to tell us about.
    pub introduced_relays: usize,
    pub introduced_records: usize,
}

#[derive(Clone, Copy)]
pub(crate) enum NewRecord {
    Relay,
    Address,
    /// A relay's record of a named group (groups.rs): counted with the
    /// address records a peer on probation may bring.
    Group,
}

impl RelayCore {
    // ------------------------------------------------------------ inputs

    /// A peer link completed its handshake with relay `key` (`dialled`: we
    /// dialled it). Returns whether it is trusted; `Err` (nothing changed)
    /// if it is us, already linked, or its kind of slot is full. The new
    /// peer is sent our link-state database (and nothing sized by the
    /// number of addresses: the directory is partitioned, PROTOCOL 12.12).
    pub fn peer_up(
        &mut self,
        peer: PeerId,
        key: Address,
        url: String,
        dialled: bool,
    ) -> Result<bool, ErrorCode> {
        if key == self.me || self.peer_by_key.contains_key(&key) {
            return Err(ErrorCode::DuplicatePeer);
        }
        let c = &self.config.federation;
        let trusted = dialled || c.allow.contains(&key) || self.configured.contains(&key);
        let same_kind = self.peers.values().filter(|p| p.trusted == trusted).count();
        let cap = if trusted {
            c.max_peers
        } else {
            c.max_probation_peers
        };
        if same_kind >= cap {
            return Err(ErrorCode::PeerLimit);
        }
        self.peers.insert(
            peer,
            Peer {
                key,
                url,
                trusted,
                introduced_relays: 0,
                introduced_records: 0,
            },
        );
        self.peer_by_key.insert(key, peer);
        self.handoff.federated = true;
        self.bump_link_state();
        let records: Vec<Bytes> = self
            .links
            .records()
            .map(|ls| RelayToRelay::LinkState(ls.clone()).encode())
            .collect();
        if self.shard.0 == 0 {
            for frame in records {
                self.send_peer(peer, frame);
            }
        }
        self.flood_mine(Some(peer));
        Ok(trusted)
    }

    /// A peer link ended.
    pub fn peer_down(&mut self, peer: PeerId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        self.peer_by_key.remove(&p.key);
        self.bump_link_state();
        self.flood_mine(None);
        self.settle_unreachable_legs();
    }

    /// We reached relay `key` by dialling a configured URL: trusted from
    /// now on, whichever side made the link. Returns the link that was on
    /// probation until now.
    pub fn dialled_key(&mut self, key: Address) -> Option<PeerId> {
        self.configured.insert(key);
        let id = *self.peer_by_key.get(&key)?;
        let p = self.peers.get_mut(&id)?;
        if p.trusted {
            return None;
        }
        p.trusted = true;
        Some(id)
    }

    /// Re-signs and floods our link state (the caller does it now and then
    /// so records of relays that vanished are superseded).
    pub fn refresh(&mut self) {
        self.bump_link_state();
        self.flood_mine(None);
    }

    /// Sets the URL this relay advertises.
    pub fn set_url(&mut self, url: String) {
        self.config.federation.url = url;
        self.refresh();
    }

    /// A frame from a peer link, decoded. REDIRECT is the dialler's
    /// business and ignored here.
    pub fn handle_peer_frame(&mut self, now: Instant, peer: PeerId, frame: RelayToRelay) {
        let Some(from) = self.peers.get(&peer).map(|p| p.key) else {
            return;
        };
        self.note_now(now);
        match frame {
            RelayToRelay::LinkState(ls) => self.on_link_state(peer, ls),
            // A record on its own: taken as a DIR_PUT to this relay.
            RelayToRelay::Presence(p) => self.accept_record(now, peer, p),
            RelayToRelay::Forward(f) => self.on_forward(now, peer, from, f),
            RelayToRelay::FwdReceipt(r) => self.on_fwd_receipt(now, from, r),
            RelayToRelay::DirPut(d) => self.on_dir_put(now, peer, from, d),
            RelayToRelay::DirGet(g) => self.on_dir_get(now, peer, from, g),
            RelayToRelay::DirAnswer(a) => self.on_dir_answer(now, from, a),
            RelayToRelay::GroupPut(d) => self.on_group_put(now, peer, from, d),
            RelayToRelay::GroupGet(g) => self.on_group_get(now, peer, from, g),
            RelayToRelay::GroupAnswer(a) => self.on_group_answer(now, from, a),
            RelayToRelay::Redirect(_) => {}
        }
    }

    // ----------------------------------------------------------- queries

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// (key, URL, trusted) of every peer link; the URL is the one the peer
    /// advertises in its link state, or the one it was reached at.
    pub fn peers(&self) -> Vec<(Address, String, bool)> {
        self.peers
            .values()
            .map(|p| (p.key, self.url_of(&p.key, &p.url), p.trusted))
            .collect()
    }

    /// The peer link to relay `key`.
    pub fn peer_of(&self, key: &Address) -> Option<PeerId> {
        self.peer_by_key.get(key).copied()
    }

    /// Relays reachable from here.
    pub fn reachable(&mut self) -> Vec<Address> {
        self.recompute_if_dirty();
        self.links.reachable().copied().collect()
    }

    /// How many relays are reachable from here.
    pub fn reachable_count(&mut self) -> usize {
        self.recompute_if_dirty();
        self.links.reachable_count()
    }

    /// Relays with a link-state record (ourselves included).
    pub fn relays_known(&self) -> usize {
        self.links.len()
    }

    /// (key, URL) of relays in the link-state database that advertise a
    /// URL and are not linked to this one (candidates for more links).
    pub fn unlinked_relays(&self) -> Vec<(Address, String)> {
        self.links
            .records()
            .filter(|l| l.relay != self.me && !l.url.is_empty())
            .filter(|l| !self.peer_by_key.contains_key(&l.relay))
            .map(|l| (l.relay, l.url.clone()))
            .collect()
    }

    /// URLs of our peers, for a REDIRECT.
    pub fn redirect_urls(&self) -> Vec<String> {
        self.peers
            .values()
            .map(|p| self.url_of(&p.key, &p.url))
            .filter(|u| !u.is_empty())
            .collect()
    }

    pub(crate) fn url_of(&self, relay: &Address, fallback: &str) -> String {
        self.links
            .get(relay)
            .map(|l| l.url.clone())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| fallback.to_string())
    }

    // -------------------------------------------------------- link state

    pub(crate) fn bump_link_state(&mut self) {
        self.link_seq += 1;
        let neighbors = self.peer_by_key.keys().copied().collect();
        let ls = LinkState::sign(
            &self.identity,
            &self.config.federation.url,
            self.link_seq,
            neighbors,
        );
        self.links.insert(ls);
        self.links_changed();
    }

    pub(crate) fn recompute_if_dirty(&mut self) {
        if self.links_dirty {
            let peers = &self.peer_by_key;
            self.links.recompute(|p| peers.contains_key(p));
            self.links_dirty = false;
        }
    }

    pub(crate) fn hop(&mut self, relay: &Address) -> Option<Hop> {
        self.recompute_if_dirty();
        self.links.hop(relay)
    }

    fn flood_mine(&mut self, except: Option<PeerId>) {
        if let Some(mine) = self.links.mine() {
            let frame = RelayToRelay::LinkState(mine.clone()).encode();
            self.flood(frame, except);
        }
    }

    /// Sends a frame to every peer except `except` (link state: on a
    /// sharded relay every shard keeps it, shard 0 sends it).
    fn flood(&mut self, frame: Bytes, except: Option<PeerId>) {
        if self.shard.0 != 0 {
            return;
        }
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            if Some(id) != except {
                self.send_peer(id, frame.clone());
            }
        }
    }

    pub(crate) fn send_peer(&mut self, peer: PeerId, frame: Bytes) {
        self.transmits.push_back(Transmit {
            to: Target::Peer(peer),
            frame,
            soft: false,
        });
    }

    fn on_link_state(&mut self, peer: PeerId, ls: LinkState) {
        if self.config.federation.check_signatures && ls.verify().is_err() {
            // (Every shard of a relay takes every LINK_STATE: shard 0
            // counts.)
            if self.shard.0 == 0 {
                self.stats.error(ErrorCode::BadSignature);
            }
            return;
        }
        if ls.relay == self.me {
            // An echo of an older record of ours (e.g. from before a
            // restart): supersede it.
            if ls.seq >= self.link_seq {
                self.link_seq = ls.seq;
                self.refresh();
            }
            return;
        }
        if !self.links.is_newer(&ls) {
            return;
        }
        if self.links.get(&ls.relay).is_none() && !self.admit_new(peer, NewRecord::Relay) {
            return;
        }
        let frame = RelayToRelay::LinkState(ls.clone()).encode();
        self.links.insert(ls);
        self.links_changed();
        self.flood(frame, Some(peer));
        self.settle_unreachable_legs();
    }

    /// Legs of our clients' messages forwarded toward a relay we can no
    /// longer reach (it died, or the federation split) settle now as
    /// `no_route` / `unreachable`, instead of at the deadline: when the
    /// recipient is also online elsewhere, its receipt need not wait.
    fn settle_unreachable_legs(&mut self) {
        let keys: Vec<FlightKey> = self.local_ids.values().copied().collect();
        for key in keys {
            let relays: Vec<Address> = self.flights.get(&key).map_or(Vec::new(), |f| {
                f.recipients
                    .iter()
                    .filter_map(|(_, s)| match s {
                        Recipient::Forwarded { relay } => Some(*relay),
                        _ => None,
                    })
                    .collect()
            });
            let gone: Vec<Address> = relays
                .into_iter()
                .filter(|r| self.hop(r).is_none())
                .collect();
            if gone.is_empty() {
                continue;
            }
            let Some(f) = self.flights.get(&key) else {
                continue;
            };
            // A client's recipient with no other way left is kept here
            // (custody, handoff.rs): one leg becomes a write.
            let client = f.reply.client().is_some();
            let frame = f.frame.clone();
            let is_gone =
                |s: &Recipient| matches!(s, Recipient::Forwarded { relay } if gone.contains(relay));
            let mut kept: Vec<Address> = Vec::new();
            let mut plan = Vec::new();
            for (i, (to, state)) in f.recipients.iter().enumerate() {
                if !is_gone(state) {
                    continue;
                }
                let other_way = f.recipients.iter().any(|(a, s)| {
                    a == to
                        && !is_gone(s)
                        && match s {
                            Recipient::Settled(e) => {
                                matches!(e.status, Status::Delivered | Status::Queued)
                            }
                            _ => true,
                        }
                });
                let keep = client && !other_way && !kept.contains(to) && self.may_keep(to);
                if keep {
                    kept.push(*to);
                }
                plan.push((i, *to, keep));
            }
            for (i, to, keep) in plan {
                let state = if keep {
                    self.keep(key, to, &frame)
                } else {
                    self.settle_now(to, ErrorCode::Unreachable)
                };
                if let Some(s) = self
                    .flights
                    .get_mut(&key)
                    .and_then(|f| f.recipients.get_mut(i))
                {
                    s.1 = state;
                }
            }
            self.finish_if_settled(key);
        }
    }

    /// Admits a record for a relay or address we do not know yet, brought
    /// by `peer`: false (counted) if its table is at its bound, or if the
    /// peer is on probation and has brought its allowance of that kind.
    pub(crate) fn admit_new(&mut self, peer: PeerId, kind: NewRecord) -> bool {
        let c = &self.config.federation;
        let (len, max, allowance) = match kind {
            NewRecord::Relay => (self.links.len(), c.max_relays, c.probation_relays),
            NewRecord::Address => (self.directory.len(), c.max_directory, c.probation_records),
            NewRecord::Group => (self.group_records(), c.max_directory, c.probation_records),
        };
        let admitted = len < max
            && self.peers.get_mut(&peer).is_some_and(|p| {
                let n = match kind {
                    NewRecord::Relay => &mut p.introduced_relays,
                    NewRecord::Address | NewRecord::Group => &mut p.introduced_records,
                };
                let ok = p.trusted || *n < allowance;
                *n += ok as usize;
                ok
            });
        // (Every shard takes every relay record: shard 0 counts them.)
        let counted = !matches!(kind, NewRecord::Relay) || self.shard.0 == 0;
        if !admitted && counted {
            self.stats.records_refused += 1;
        }
        admitted
    }

    // ---------------------------------------------------------- messages

    /// Sends the FORWARD of flight `key` toward `relay` for `to`; if there
    /// is no way, settles them `no_route`.
    pub(crate) fn forward_to(
        &mut self,
        key: FlightKey,
        relay: Address,
        to: Vec<Address>,
        frame: &Bytes,
    ) {
        let fwd = RelayToRelay::Forward(Forward {
            origin: self.me,
            hops: 1,
            target: ForwardTarget::Relay {
                relay,
                to: to.clone(),
            },
            msg: frame.clone(),
        })
        .encode();
        if let Some(f) = self.flights.get_mut(&key) {
            f.sent.extend(to.iter().map(|a| (*a, relay)));
        }
        if let Err(code) = self.send_toward(&relay, fwd, key.0) {
            self.stats.error(code);
            if let Some(f) = self.flights.get_mut(&key) {
                for a in to {
                    if let Some(s) = f.leg_mut(&a, &relay) {
                        *s = Recipient::Settled(entry(a, Status::NoRoute, Some(code)));
                    }
                }
            }
        }
    }

    pub(crate) fn send_toward(
        &mut self,
        relay: &Address,
        frame: Bytes,
        id: MsgId,
    ) -> Result<(), ErrorCode> {
        let next = self.hop(relay).ok_or(ErrorCode::Unreachable)?.next;
        let peer = *self.peer_by_key.get(&next).ok_or(ErrorCode::Unreachable)?;
        self.send_peer(peer, frame);
        self.stats.forwarded += 1;
        self.event(Event::ToPeer { id, peer: next });
        Ok(())
    }

    /// Tells `origin` what became of the recipients it forwarded here.
    pub(crate) fn reply_to_origin(
        &mut self,
        origin: Address,
        id: MsgId,
        entries: Vec<ReceiptEntry>,
        delivered: u32,
    ) {
        let r = FwdReceipt {
            origin,
            reporter: self.me,
            id,
            hops: 0,
            delivered: delivered.max(delivered_count(&entries)),
            entries,
        };
        self.send_fwd_receipt(r);
    }

    fn send_fwd_receipt(&mut self, r: FwdReceipt) {
        if r.origin == self.me {
            return;
        }
        let origin = r.origin;
        let next = self
            .hop(&origin)
            .and_then(|h| self.peer_by_key.get(&h.next).copied());
        match next {
            Some(peer) => self.send_peer(peer, RelayToRelay::FwdReceipt(r).encode()),
            None => self.stats.error(ErrorCode::NoRoute),
        }
    }

    /// Another shard's broadcast FORWARD (`Spread::Broadcast`): handed to
    /// every connection of this shard; returns how many.
    pub fn broadcast_here(&mut self, id: MsgId, frame: &Bytes) -> u32 {
        self.broadcast_local(id, frame)
    }

    /// Sends a FWD_RECEIPT toward its origin (a sharded relay's merged
    /// answer to a broadcast FORWARD, `Spread::Broadcast`).
    pub fn fwd_receipt(&mut self, r: FwdReceipt) {
        self.send_fwd_receipt(r)
    }

    /// Hands an a2n to every connection here; returns how many.
    fn broadcast_local(&mut self, id: MsgId, frame: &Bytes) -> u32 {
        let conns = self.conns();
        for (c, to) in &conns {
            self.send_conn(*c, frame.clone(), true);
            self.event(Event::ToClient { id, to: *to });
        }
        conns.len() as u32
    }

    /// A client's a2n: every connection here, and with scope federation
    /// every relay, whose counts make the receipt.
    pub(crate) fn broadcast_from_client(
        &mut self,
        now: Instant,
        reply: Reply,
        key: FlightKey,
        frame: Bytes,
        scope: Scope,
    ) {
        let delivered = self.broadcast_local(key.0, &frame);
        let mut waiting = std::collections::BTreeSet::new();
        if scope == Scope::Federation && !self.peers.is_empty() {
            self.seen
                .insert(seen_key(&key.0, &self.me, &frame, None), now);
            let fwd = RelayToRelay::Forward(Forward {
                origin: self.me,
                hops: 1,
                target: ForwardTarget::Broadcast,
                msg: frame.clone(),
            })
            .encode();
            let peers: Vec<(PeerId, Address)> =
                self.peers.iter().map(|(id, p)| (*id, p.key)).collect();
            for (id, k) in peers {
                self.send_peer(id, fwd.clone());
                self.stats.forwarded += 1;
                self.event(Event::ToPeer { id: key.0, peer: k });
            }
            waiting = self.reachable().into_iter().collect();
        }
        let broadcast = Some(Broadcast { delivered, waiting });
        let head = (key, reply, Route::A2n);
        self.start_flight(now, head, frame, Vec::new(), broadcast);
    }

    fn on_forward(&mut self, now: Instant, peer: PeerId, from: Address, f: Forward) {
        let Ok(ClientToRelay::Msg(msg)) = ClientToRelay::decode(&f.msg) else {
            self.stats.error(ErrorCode::Malformed);
            return;
        };
        if f.origin == self.me {
            // Our own messages never come back legitimately (the seen
            // cache would drop an echo): a peer claiming one is forging.
            self.stats.error(ErrorCode::ForgedForward);
            return;
        }
        let target = match &f.target {
            ForwardTarget::Relay { relay, to } => Some((relay, to.as_slice())),
            ForwardTarget::Broadcast => None,
            // A hand-off that failed goes again with the same bytes: not
            // remembered (the hop limit and the way-back check bound it).
            ForwardTarget::Handoff { .. } => None,
        };
        let handoff = matches!(f.target, ForwardTarget::Handoff { .. });
        let seen = seen_key(&msg.id, &f.origin, &f.msg, target);
        if !handoff && !self.seen.insert(seen, now) {
            self.stats.error(ErrorCode::Duplicate);
            return;
        }
        match f.target {
            ForwardTarget::Relay { relay, .. } if relay == self.me => {
                self.forward_here(now, peer, f, &msg, false)
            }
            ForwardTarget::Handoff { relay, to } if relay == self.me => {
                self.handoff_here(now, f.origin, to, f.msg, &msg)
            }
            ForwardTarget::Relay { relay, ref to } => {
                let to = to.clone();
                self.pass_forward(from, relay, f, &msg, to)
            }
            ForwardTarget::Handoff { relay, to } => {
                self.pass_forward(from, relay, f, &msg, vec![to])
            }
            ForwardTarget::Broadcast => {
                if !matches!(msg.dest, Dest::A2n(Scope::Federation)) || self.hosts(&msg.from) {
                    self.stats.error(ErrorCode::ForgedForward);
                    return;
                }
                let delivered = self.broadcast_local(msg.id, &f.msg);
                if self.shard.1 > 1 {
                    // The other shards' connections, and one FWD_RECEIPT.
                    self.spread.push_back(Spread::Broadcast {
                        origin: f.origin,
                        id: msg.id,
                        frame: f.msg.clone(),
                        delivered,
                    });
                } else {
                    self.send_fwd_receipt(FwdReceipt {
                        origin: f.origin,
                        reporter: self.me,
                        id: msg.id,
                        hops: 0,
                        delivered,
                        entries: Vec::new(),
                    });
                }
                if f.hops >= self.config.federation.hop_limit {
                    self.stats.error(ErrorCode::HopLimit);
                    return;
                }
                let fwd = RelayToRelay::Forward(Forward {
                    origin: f.origin,
                    hops: f.hops + 1,
                    target: ForwardTarget::Broadcast,
                    msg: f.msg,
                })
                .encode();
                let peers: Vec<(PeerId, Address)> = self
                    .peers
                    .iter()
                    .filter(|(id, p)| **id != peer && p.key != f.origin)
                    .map(|(id, p)| (*id, p.key))
                    .collect();
                for (id, k) in peers {
                    self.send_peer(id, fwd.clone());
                    self.stats.forwarded += 1;
                    self.event(Event::ToPeer {
                        id: msg.id,
                        peer: k,
                    });
                }
            }
        }
    }

    /// Passes a FORWARD for another relay on toward it; if it cannot go
    /// on, tells its origin (for its recipients `to`).
    fn pass_forward(
        &mut self,
        from: Address,
        relay: Address,
        f: Forward,
        msg: &Msg,
        to: Vec<Address>,
    ) {
        let code = if f.hops >= self.config.federation.hop_limit {
            Some(ErrorCode::HopLimit)
        } else {
            match self.hop(&relay) {
                None => Some(ErrorCode::Unreachable),
                Some(h) if h.next == from => Some(ErrorCode::Loop),
                Some(_) => None,
            }
        };
        let fwd = RelayToRelay::Forward(Forward {
            hops: f.hops.saturating_add(1),
            ..f
        })
        .encode();
        let code = match code {
            Some(c) => Some(c),
            None => self.send_toward(&relay, fwd, msg.id).err(),
        };
        if let Some(code) = code {
            self.stats.error(code);
            let entries = to
                .iter()
                .map(|a| entry(*a, Status::NoRoute, Some(code)))
                .collect();
            self.send_fwd_receipt(FwdReceipt {
                origin: f.origin,
                reporter: relay,
                id: msg.id,
                hops: 0,
                delivered: 0,
                entries,
            });
        }
    }

    /// A FORWARD for clients of this relay. Its sender may be a client
    /// here too with no record yet of it at the origin (the record may be
    /// on its way): then the FORWARD waits for a lookup of the sender,
    /// once (`looked`: it did).
    fn forward_here(&mut self, now: Instant, peer: PeerId, f: Forward, msg: &Msg, looked: bool) {
        let ForwardTarget::Relay { to, .. } = &f.target else {
            return;
        };
        let to = to.clone();
        let unproven = self.hosts(&msg.from) && !self.online_at(&msg.from, &f.origin);
        if unproven && !looked && self.park_forward(now, peer, f.clone(), msg.from) {
            return;
        }
        if let Err(code) = self.check_forward(&msg.dest, (&msg.from, &f.origin), &to) {
            return self.refuse_forward(f.origin, msg.id, &to, code);
        }
        let (index, count) = self.shard;
        if count > 1 {
            // Its recipients are served by their shards (shard.rs): this
            // one's here, the others' handed on.
            let (mine, others): (Vec<Address>, Vec<Address>) = to
                .into_iter()
                .partition(|a| crate::shard::shard_of(a, count) == index);
            if !others.is_empty() {
                self.spread.push_back(Spread::Forward {
                    origin: f.origin,
                    frame: f.msg.clone(),
                    msg: Box::new(msg.clone()),
                    to: others,
                });
            }
            if mine.is_empty() {
                return;
            }
            return self.forward_part(now, f.origin, f.msg, msg, mine);
        }
        self.forward_part(now, f.origin, f.msg, msg, to);
    }

    /// Answers `origin` that a FORWARD's recipients `to` are refused.
    fn refuse_forward(&mut self, origin: Address, id: MsgId, to: &[Address], code: ErrorCode) {
        self.stats.error(code);
        let entries = to
            .iter()
            .map(|a| entry(*a, Status::Rejected, Some(code)))
            .collect();
        self.reply_to_origin(origin, id, entries, 0)
    }

    /// Serves recipients `to` of a FORWARD from `origin` (checked against
    /// its MSG, `frame` decoded as `msg`) that are this shard's (all of
    /// them on a relay of one shard). A second FORWARD of the same message
    /// from the same origin for other recipients (a sharded origin sends
    /// one per shard) joins the first one's flight while it waits: the
    /// FWD_RECEIPT names them all. Any other one under the same (id,
    /// sender) is refused `duplicate`.
    pub fn forward_part(
        &mut self,
        now: Instant,
        origin: Address,
        frame: Bytes,
        msg: &Msg,
        to: Vec<Address>,
    ) {
        let key = (msg.id, msg.from);
        if let Some(f) = self.flights.get(&key) {
            let joins = f.reply == Reply::Relay(origin)
                && f.frame == frame
                && !f.expired
                && to.iter().all(|a| f.recipients.iter().all(|(b, _)| a != b));
            if !joins {
                return self.refuse_forward(origin, msg.id, &to, ErrorCode::Duplicate);
            }
            self.stats.forwards_joined += 1;
            let mut legs = Vec::with_capacity(to.len());
            let mut copies = 0;
            for a in to {
                copies += self.peer_leg(key, a, &frame, &mut legs);
            }
            if let Some(f) = self.flights.get_mut(&key) {
                f.recipients.extend(legs);
                f.copies += copies;
            }
            return self.finish_if_settled(key);
        }
        let head = (key, Reply::Relay(origin), Route::A2g);
        self.start_flight(now, head, frame, to, None);
    }

    /// A parked FORWARD's lookup is done: checked again, and delivered or
    /// refused.
    pub(crate) fn unpark_forward(&mut self, now: Instant, peer: PeerId, f: Forward) {
        let Ok(ClientToRelay::Msg(msg)) = ClientToRelay::decode(&f.msg) else {
            return;
        };
        self.forward_here(now, peer, f, &msg, true);
    }

    /// Checks a FORWARD for delivery here against the MSG it carries: the
    /// recipients must be ones its header names (a2b: that one; a2g: a
    /// subset of its list; a group is resolved by its own relay and cannot
    /// be checked here) and its sender must not be one of our own clients
    /// (unless the directory says it is online at the origin too). (No
    /// other message may be in flight under the same key: `forward_part`.)
    fn check_forward(
        &self,
        dest: &Dest,
        (sender, origin): (&Address, &Address),
        to: &[Address],
    ) -> Result<(), ErrorCode> {
        let named = match dest {
            Dest::A2b(b) => to.iter().all(|t| t == b),
            Dest::A2g(list) => to.iter().all(|t| list.contains(t)),
            Dest::Group(_) => true,
            Dest::A2a | Dest::A2n(_) => false,
        };
        // A sender hosted here may be online at the origin too (an address
        // at several relays at once): that is no forgery.
        if !named || (self.hosts(sender) && !self.online_at(sender, origin)) {
            return Err(ErrorCode::ForgedForward);
        }
        Ok(())
    }

    fn on_fwd_receipt(&mut self, now: Instant, from: Address, r: FwdReceipt) {
        if r.origin != self.me {
            // Passing through, toward its origin.
            if r.hops >= self.config.federation.hop_limit {
                return self.stats.error(ErrorCode::HopLimit);
            }
            if self.hop(&r.origin).is_some_and(|h| h.next == from) {
                return self.stats.error(ErrorCode::Loop);
            }
            let hops = r.hops + 1;
            return self.send_fwd_receipt(FwdReceipt { hops, ..r });
        }
        // (On a sharded relay it came to the shards of its recipients,
        // which hold every flight for them.)
        let Some(&key) = self.local_ids.get(&r.id) else {
            return;
        };
        let Some(f) = self.flights.get_mut(&key) else {
            return;
        };
        if let Some(b) = &mut f.broadcast {
            if b.waiting.remove(&r.reporter) {
                b.delivered += r.delivered;
            }
        } else {
            let mut settled = false;
            let mut moved = Vec::new();
            // Recipients it reports delivered whose leg here is settled
            // already (the leg was given up, e.g. its relay looked
            // unreachable for a moment): their sessions are not ours to
            // count.
            let mut mine = Vec::new();
            for (to, state) in &mut f.recipients {
                if *state != (Recipient::Forwarded { relay: r.reporter }) {
                    continue;
                }
                // A recipient the receipt leaves out waits for another
                // receipt of the reporter's (a sharded relay answers each
                // shard's part on its own, shard.rs) or the deadline.
                let Some(e) = r.entries.iter().find(|e| e.to == *to).cloned() else {
                    continue;
                };
                settled = true;
                mine.push(*to);
                if e.status == Status::NoRoute
                    && e.reason == ErrorCode::Moved.as_u16()
                    && !moved.contains(to)
                {
                    // It moved: looked up again, not settled.
                    moved.push(*to);
                    continue;
                }
                *state = Recipient::Settled(e);
            }
            let delivered = |e: &&ReceiptEntry| e.status == Status::Delivered;
            let stale = r
                .entries
                .iter()
                .filter(delivered)
                .any(|e| !mine.contains(&e.to));
            if settled && !stale {
                f.copies += r.delivered;
            } else if settled {
                // One session each, at least, for the ones it settled.
                f.copies += r
                    .entries
                    .iter()
                    .filter(delivered)
                    .filter(|e| mine.contains(&e.to))
                    .count() as u32;
            }
            // (A hand-off that finds its address moved on fails; it is
            // looked at again later.)
            let open = !f.expired && f.reply.client().is_some();
            for to in moved {
                if open {
                    self.reroute(now, key, to, r.reporter);
                } else if let Some(s) = self
                    .flights
                    .get_mut(&key)
                    .and_then(|f| f.leg_mut(&to, &r.reporter))
                {
                    *s = Recipient::Settled(entry(to, Status::NoRoute, Some(ErrorCode::Moved)));
                }
            }
        }
        self.finish_if_settled(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, ConnId, FedConfig};
    use w2w_proto::frame::{Msg, Receipt, RelayToClient};
    use w2w_proto::Identity;

    fn core(seed: u8, federation: FedConfig) -> RelayCore {
        let config = Config {
            federation,
            ..Config::default()
        };
        RelayCore::new(config, Identity::from_seed([seed; 32]), 1, [])
    }

    /// Answers the backlog reads (nothing stored): the sessions go live.
    fn read_empty_backlogs(c: &mut RelayCore, now: Instant) {
        while let Some(op) = c.poll_store() {
            if let crate::StoreOp::Read { token, .. } = op {
                let done = crate::StoreDone::Read {
                    token,
                    result: Ok(Vec::new()),
                };
                c.store_done(now, done);
            }
        }
    }

    fn key(seed: u8) -> Address {
        Identity::from_seed([seed; 32]).address()
    }

    fn drain(c: &mut RelayCore) -> Vec<Transmit> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn msg(id: u8, from: Address, dest: Dest) -> Bytes {
        ClientToRelay::Msg(Msg {
            flags: 0,
            id: MsgId([id; 16]),
            from,
            dest,
            payload: Bytes::from_static(b"x"),
        })
        .encode()
    }

    fn forward(origin: Address, target: ForwardTarget, msg: Bytes) -> RelayToRelay {
        RelayToRelay::Forward(Forward {
            origin,
            hops: 1,
            target,
            msg,
        })
    }

    #[test]
    fn relays_on_probation_have_their_own_slots_and_a_bounded_allowance() {
        let mut c = core(
            1,
            FedConfig {
                max_peers: 1,
                max_probation_peers: 1,
                probation_relays: 1,
                ..FedConfig::default()
            },
        );
        let rogue = key(2);
        assert_eq!(c.peer_up(PeerId(2), rogue, String::new(), false), Ok(false));
        // A second unknown relay finds the probation slot taken...
        assert_eq!(
            c.peer_up(PeerId(3), key(3), String::new(), false),
            Err(ErrorCode::PeerLimit)
        );
        // ...but a relay we dial still gets its reserved slot.
        assert_eq!(c.peer_up(PeerId(4), key(4), String::new(), true), Ok(true));
        // The rogue may introduce one invented relay, not two.
        let now = Instant::now();
        for seed in [10u8, 11] {
            let ls = LinkState::sign(&Identity::from_seed([seed; 32]), "", 1, vec![rogue]);
            c.handle_peer_frame(now, PeerId(2), RelayToRelay::LinkState(ls));
        }
        assert_eq!(c.stats().records_refused, 1);
        // Once we reach it by dialling a configured URL, it is trusted.
        assert_eq!(c.dialled_key(rogue), Some(PeerId(2)));
        let ls = LinkState::sign(&Identity::from_seed([12; 32]), "", 1, vec![rogue]);
        c.handle_peer_frame(now, PeerId(2), RelayToRelay::LinkState(ls));
        assert_eq!(c.stats().records_refused, 1);
    }

    #[test]
    fn a_forward_that_contradicts_its_message_is_refused() {
        let mut c = core(1, FedConfig::default());
        let me = c.address();
        let rogue = key(2);
        c.peer_up(PeerId(2), rogue, String::new(), false).unwrap();
        let now = Instant::now();
        let (alice, bob, carol) = (Address([5; 32]), Address([6; 32]), Address([7; 32]));
        for (i, a) in [alice, bob, carol].into_iter().enumerate() {
            c.connect(now, ConnId(i as u64), a, None, true).unwrap();
        }
        // Backlogs read (empty): live.
        read_empty_backlogs(&mut c, now);
        drain(&mut c);
        let outsider = Address([9; 32]);
        let to = |a: Address| ForwardTarget::Relay {
            relay: me,
            to: vec![a],
        };
        let frames = [
            // The header names bob; the FORWARD asks for carol.
            forward(rogue, to(carol), msg(1, outsider, Dest::A2b(bob))),
            // A "from" that is one of our own clients.
            forward(rogue, to(bob), msg(2, alice, Dest::A2b(bob))),
            // A broadcast claiming to come from us.
            forward(
                me,
                ForwardTarget::Broadcast,
                msg(3, outsider, Dest::A2n(Scope::Federation)),
            ),
        ];
        for f in frames {
            c.handle_peer_frame(now, PeerId(2), f);
        }
        // The one claiming our client would wait for a lookup of it (its
        // record at the origin might be on its way), but no relay that
        // published link state is there to ask (the rogue never did): it
        // is refused at once.
        assert_eq!(c.stats().count(ErrorCode::ForgedForward), 3);
        let to_clients = drain(&mut c)
            .into_iter()
            .filter(|t| matches!(t.to, Target::Conn(_)))
            .count();
        assert_eq!(to_clients, 0, "nothing was delivered");
        // An honest one is delivered.
        let honest = msg(4, outsider, Dest::A2g(vec![bob, carol]));
        c.handle_peer_frame(now, PeerId(2), forward(rogue, to(carol), honest));
        let out = drain(&mut c);
        assert!(out.iter().any(|t| t.to == Target::Conn(ConnId(2))));
        // A forgery reusing its id and origin (another frame, so the seen
        // cache does not take it for a copy) while carol's ACK is awaited:
        // refused, not delivered.
        let forged = msg(4, outsider, Dest::A2b(carol));
        c.handle_peer_frame(now, PeerId(2), forward(rogue, to(carol), forged));
        assert_eq!(c.stats().count(ErrorCode::Duplicate), 1);
        assert!(drain(&mut c)
            .iter()
            .all(|t| t.to != Target::Conn(ConnId(2))));
    }

    #[test]
    fn a_msg_sent_again_while_in_flight_joins_it_and_gets_its_receipt() {
        let mut c = core(1, FedConfig::default());
        let me = c.address();
        let origin = key(2);
        c.peer_up(PeerId(2), origin, String::new(), true).unwrap();
        let now = Instant::now();
        let (alice, bob, carol) = (Address([5; 32]), Address([6; 32]), Address([7; 32]));
        c.connect(now, ConnId(1), bob, None, true).unwrap();
        read_empty_backlogs(&mut c, now);
        drain(&mut c);
        let send = |c: &mut RelayCore, conn: u64, frame: &Bytes| {
            let Ok(ClientToRelay::Msg(m)) = ClientToRelay::decode(frame) else {
                panic!("a MSG");
            };
            c.handle_msg(now, ConnId(conn), frame.clone(), &m, None);
        };
        let receipt_to = |out: &[Transmit], conn: u64| -> Vec<Receipt> {
            out.iter()
                .filter(|t| t.to == Target::Conn(ConnId(conn)))
                .filter_map(|t| match RelayToClient::decode(&t.frame) {
                    Ok(RelayToClient::Receipt(r)) => Some(r),
                    _ => None,
                })
                .collect()
        };
        let to_bob = |out: &[Transmit]| {
            out.iter()
                .filter(|t| t.to == Target::Conn(ConnId(1)))
                .count()
        };

        // Alice's connection ends before bob's ACK; her next one sends the
        // MSG again: no second copy, no refusal, and the original's receipt.
        let m1 = msg(1, alice, Dest::A2b(bob));
        c.connect(now, ConnId(2), alice, None, false).unwrap();
        send(&mut c, 2, &m1);
        assert_eq!(to_bob(&drain(&mut c)), 1);
        c.disconnect(now, ConnId(2));
        c.connect(now, ConnId(3), alice, None, false).unwrap();
        send(&mut c, 3, &m1);
        let out = drain(&mut c);
        assert_eq!(to_bob(&out), 0, "not handed over twice");
        assert!(receipt_to(&out, 3).is_empty(), "answered when bob answers");
        // Another MSG under the same id is still refused.
        send(&mut c, 3, &msg(1, alice, Dest::A2g(vec![bob])));
        let r = receipt_to(&drain(&mut c), 3);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].status, r[0].reason),
            (Status::Rejected, ErrorCode::Duplicate.as_u16())
        );
        c.handle_ack(now, ConnId(1), &[MsgId([1; 16])]);
        let r = receipt_to(&drain(&mut c), 3);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].id, r[0].status, r[0].delivered),
            (MsgId([1; 16]), Status::Delivered, 1)
        );

        // Carol's MSG came through another relay of hers, which forwarded
        // it here; she sends it again here: she gets the receipt too, and
        // the origin its FWD_RECEIPT.
        let m2 = msg(2, carol, Dest::A2b(bob));
        let target = ForwardTarget::Relay {
            relay: me,
            to: vec![bob],
        };
        c.handle_peer_frame(now, PeerId(2), forward(origin, target, m2.clone()));
        assert_eq!(to_bob(&drain(&mut c)), 1);
        c.connect(now, ConnId(4), carol, None, false).unwrap();
        send(&mut c, 4, &m2);
        let out = drain(&mut c);
        assert_eq!(to_bob(&out), 0);
        assert!(receipt_to(&out, 4).is_empty());
        c.handle_ack(now, ConnId(1), &[MsgId([2; 16])]);
        let out = drain(&mut c);
        let r = receipt_to(&out, 4);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].status, r[0].delivered), (Status::Delivered, 1));
        let fwd = out
            .iter()
            .filter(|t| t.to == Target::Peer(PeerId(2)))
            .filter(|t| {
                matches!(
                    RelayToRelay::decode(&t.frame),
                    Ok(RelayToRelay::FwdReceipt(_))
                )
            })
            .count();
        assert_eq!(fwd, 1);
        assert_eq!(c.stats().resends_joined, 2);
        assert_eq!(c.stats().count(ErrorCode::Duplicate), 1);

        // An a2g forwarded here covers only the recipients given to this
        // relay: sent again here, it is refused as before, not joined.
        let dave = Address([8; 32]);
        let m3 = msg(3, dave, Dest::A2g(vec![bob, alice]));
        let target = ForwardTarget::Relay {
            relay: me,
            to: vec![bob],
        };
        c.handle_peer_frame(now, PeerId(2), forward(origin, target, m3.clone()));
        assert_eq!(to_bob(&drain(&mut c)), 1);
        c.connect(now, ConnId(5), dave, None, false).unwrap();
        send(&mut c, 5, &m3);
        let r = receipt_to(&drain(&mut c), 5);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].reason, ErrorCode::Duplicate.as_u16());
    }

    #[test]
    fn one_message_forwarded_to_two_relays_through_this_one_passes_twice() {
        // x - me - b - {c, d}: an a2g from x's client for clients of c and
        // d is two FORWARDs (one per target) that both pass here. The
        // second is not a duplicate of the first (the seen key names the
        // target; the simulation found it dropped).
        let ids: Vec<Identity> = (1..=5).map(|i| Identity::from_seed([i; 32])).collect();
        let [me, x, b, c_, d] = std::array::from_fn(|i| ids[i].address());
        let mut c = core(1, FedConfig::default());
        c.peer_up(PeerId(10), x, String::new(), true).unwrap();
        c.peer_up(PeerId(11), b, String::new(), true).unwrap();
        let now = Instant::now();
        for (peer, ls) in [
            (10, LinkState::sign(&ids[1], "", 10, vec![me])),
            (11, LinkState::sign(&ids[2], "", 10, vec![me, c_, d])),
            (11, LinkState::sign(&ids[3], "", 10, vec![b])),
            (11, LinkState::sign(&ids[4], "", 10, vec![b])),
        ] {
            c.handle_peer_frame(now, PeerId(peer), RelayToRelay::LinkState(ls));
        }
        drain(&mut c);
        let (carol, dave) = (Address([7; 32]), Address([8; 32]));
        let m = msg(1, Address([5; 32]), Dest::A2g(vec![carol, dave]));
        for (relay, to) in [(c_, carol), (d, dave)] {
            let target = ForwardTarget::Relay {
                relay,
                to: vec![to],
            };
            c.handle_peer_frame(now, PeerId(10), forward(x, target, m.clone()));
        }
        let passed = drain(&mut c)
            .iter()
            .filter(|t| t.to == Target::Peer(PeerId(11)))
            .filter(|t| matches!(RelayToRelay::decode(&t.frame), Ok(RelayToRelay::Forward(_))))
            .count();
        assert_eq!(passed, 2, "both FORWARDs go on toward b");
        assert_eq!(c.stats().count(ErrorCode::Duplicate), 0);
    }

    #[test]
    fn link_states_from_a_peer_give_routes_through_it() {
        // me - b - c, plus a one-way claim d -> me (BFS itself is tested in
        // routing.rs).
        let ids: Vec<Identity> = (1..=4).map(|i| Identity::from_seed([i; 32])).collect();
        let [me, b, c_, _d] = std::array::from_fn(|i| ids[i].address());
        let mut c = core(1, FedConfig::default());
        c.peer_up(PeerId(2), b, "ws://b/".into(), true).unwrap();
        let now = Instant::now();
        for ls in [
            LinkState::sign(&ids[1], "ws://b/", 10, vec![me, c_]),
            LinkState::sign(&ids[2], "ws://c/", 10, vec![b]),
            LinkState::sign(&ids[3], "ws://d/", 10, vec![me]),
        ] {
            c.handle_peer_frame(now, PeerId(2), RelayToRelay::LinkState(ls));
        }
        let mut reachable = c.reachable();
        reachable.sort();
        let mut want = vec![b, c_];
        want.sort();
        assert_eq!(reachable, want, "c through b; d's one-way edge ignored");
    }
}
