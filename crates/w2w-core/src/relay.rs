//! One relay's delivery core: sessions, messages in flight, the store.
//!
//! Maps that are iterated are ordered (`BTreeMap`), so that the order of
//! outputs depends on the inputs only: the same inputs always give the
//! same outputs, which is what lets a simulation seed replay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use w2w_proto::frame::{
    ClientToRelay, Dest, Msg, MsgId, Notice, Receipt, RelayToClient, Route, Scope, Status,
};
use w2w_proto::s2s::{Presence, RegistrationProof};
use w2w_proto::{Address, ErrorCode, Identity};

use crate::federation::Peer;
use crate::flight::{entry, Flight, FlightKey, Recipient, Reply};
use crate::routing::LinkStates;
use crate::seen::SeenCache;
/// Maps looked up per message: aHash keyed by [`Config::hash_seed`].
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
pub(crate) type HashSet<T> = std::collections::HashSet<T, ahash::RandomState>;

use crate::{ConnId, Event, PeerId, Stats, StoreDone, StoreOp, Stored, Target, Token, Transmit};

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
    /// Write every message durably before it counts (default true). False:
    /// a connected recipient is handed it and it is `delivered` at once
    /// (faster; a crash can lose it); offline recipients are still stored.
    pub durable: bool,
    /// Produce [`Event`]s (default false).
    pub events: bool,
    /// Most sessions (receiving and send-only) one address may hold at
    /// once (default 8); one more is refused `too_many_sessions`.
    pub max_sessions: usize,
    /// After one session of an address acknowledged a message handed to
    /// several, how long the others have to acknowledge it before the
    /// entry is settled `delivered` without them (default 250 ms): a
    /// frozen tab or a dead connection must not hold every receipt for
    /// the address until `receipt_timeout`.
    pub session_grace: Duration,
    /// Keys the core's hash maps (addresses and ids are chosen by peers: a
    /// relay passes random bytes so nobody can aim keys at one bucket).
    /// Deterministic for a given seed; outputs never follow map order.
    pub hash_seed: [u64; 4],
    pub federation: FedConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            receipt_timeout: Duration::from_secs(5),
            max_group: 64,
            read_batch: 64,
            durable: true,
            events: false,
            max_sessions: 8,
            session_grace: Duration::from_millis(250),
            hash_seed: [
                0x243f_6a88_85a3_08d3,
                0x1319_8a2e_0370_7344,
                0xa409_3822_299f_31d0,
                0x082e_fa98_ec4e_6c89,
            ],
            federation: FedConfig::default(),
        }
    }
}

/// Settings of the federation part of the core.
#[derive(Debug, Clone)]
pub struct FedConfig {
    /// The URL this relay advertises in its link state.
    pub url: String,
    /// Relay keys trusted as peers whichever side dials (empty: none
    /// beyond those we dial).
    pub allow: Vec<Address>,
    /// Most links with trusted relays (default 5).
    pub max_peers: usize,
    /// Most links with relays on probation (default 3).
    pub max_probation_peers: usize,
    /// New relays a peer on probation may introduce (default 16).
    pub probation_relays: usize,
    /// New addresses a peer on probation may introduce (default 10,000).
    pub probation_records: usize,
    /// Most relays in the link-state database (default 10,000).
    pub max_relays: usize,
    /// Most addresses in the directory (default 1,000,000).
    pub max_directory: usize,
    /// Most relay hops a message may take (default 16).
    pub hop_limit: u8,
    /// Remembered forwarded messages (default 100,000) and for how long
    /// (default 10 min).
    pub seen_cache: usize,
    pub seen_ttl: Duration,
    /// Check the signatures of link-state and presence records (default
    /// true). Simulations that stand for honest relays turn it off: a
    /// check costs ~100 µs and cannot fail there.
    pub check_signatures: bool,
    /// Relays that hold each address's records (PROTOCOL 12.12; default
    /// 4): the reachable relays whose keys are closest to it.
    pub replicas: usize,
    /// How long a held record counts without being renewed (default
    /// 120 s); its hosting relay renews it every third of that.
    pub lease: Duration,
    /// How long a lookup's answer is used (default 10 s).
    pub cache_ttl: Duration,
    /// How long a lookup waits for answers before asking again (once) or
    /// giving up (default 1 s).
    pub lookup_timeout: Duration,
    /// Most lookups on their way (default 10,000) and cached answers
    /// (default 100,000); past them a lookup is not made (`no_route`) or
    /// its answer not kept.
    pub max_lookups: usize,
    pub max_cache: usize,
    /// How long after a change of the relay set this relay puts its
    /// records on the relays now responsible for them (default 200 ms:
    /// changes that come together are handled once).
    pub ring_settle: Duration,
    /// DIR_GETs each peer may send per second (default 20,000), beyond
    /// which they are dropped unanswered (counted).
    pub lookups_per_peer: u32,
    /// Lookups one client here may cause per second, by LOOKUPs or by
    /// messages for addresses this relay must look up (default 1,000);
    /// past it the LOOKUP, or the recipient, is `rate_limited`.
    pub lookups_per_client: u32,
    /// Keep a client's message whose recipient's relay cannot be reached,
    /// and hand it over when it can (default true; PROTOCOL 12.13).
    pub custody: bool,
    /// Most addresses with messages here waiting to move to another
    /// relay (default 100,000); past it, `unreachable` as without custody.
    pub max_custody: usize,
    /// How often those addresses are looked at again (default 2 s).
    pub handoff_retry: Duration,
}

impl Default for FedConfig {
    fn default() -> Self {
        FedConfig {
            url: String::new(),
            allow: Vec::new(),
            max_peers: 5,
            max_probation_peers: 3,
            probation_relays: 16,
            probation_records: 10_000,
            max_relays: 10_000,
            max_directory: 1_000_000,
            hop_limit: 16,
            seen_cache: 100_000,
            seen_ttl: Duration::from_secs(600),
            check_signatures: true,
            replicas: 4,
            lease: Duration::from_secs(120),
            cache_ttl: Duration::from_secs(10),
            lookup_timeout: Duration::from_secs(1),
            max_lookups: 10_000,
            max_cache: 100_000,
            ring_settle: Duration::from_millis(200),
            lookups_per_peer: 20_000,
            lookups_per_client: 1_000,
            custody: true,
            max_custody: 100_000,
            handoff_retry: Duration::from_secs(2),
        }
    }
}

/// Where an address's receiving sessions are with its stored backlog (one
/// reader for all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the backlog; `reading`: the `Read` on its way; `dirty`: a
    /// write for this address committed while it was (the read may have
    /// run before it, so another read follows); `restart`: a session came
    /// or a message went back to the inbox, so the next read starts over.
    /// Messages for the address meanwhile go through the store.
    Draining {
        after: i64,
        reading: Option<Token>,
        dirty: bool,
        restart: bool,
    },
    /// Backlog handed over: new messages are handed to every receiving
    /// session directly.
    Live,
}

const DRAIN: Phase = Phase::Draining {
    after: 0,
    reading: None,
    dirty: false,
    restart: false,
};

/// A message handed to a connection and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Handed {
    /// The message in flight its ACK settles, if it is still in flight.
    flight: Option<FlightKey>,
    /// Whether a stored copy exists (its ACK deletes it).
    stored: bool,
    /// Who sent it (told NOTICE DELIVERED if its receipt has gone out).
    sender: Address,
}

#[derive(Debug)]
struct Session {
    address: Address,
    /// Takes deliveries (false: a send-only session, role 2).
    receive: bool,
    /// Everything handed to this connection and not acknowledged. It also
    /// stops the backlog reader from handing a message twice. (A hash map:
    /// one insert and one remove per message, under the core lock.)
    handed: HashMap<MsgId, Handed>,
}

/// An address's sessions here (PROTOCOL 7.7: one inbox, several
/// sessions). Present while it has at least one.
#[derive(Debug)]
pub(crate) struct Inbox {
    /// Sessions that take deliveries, oldest first.
    receivers: Vec<ConnId>,
    /// Send-only sessions.
    senders: Vec<ConnId>,
    phase: Phase,
    /// Acknowledged messages whose stored copy a read may still return:
    /// the number of the op that deletes it (`u64::MAX`: not polled yet,
    /// its write is still on its way). A read polled after that op cannot
    /// see the copy, so entries older than the latest read are dropped.
    gone: BTreeMap<MsgId, u64>,
    /// The op number of the read on its way.
    read_at: u64,
}

impl Inbox {
    fn len(&self) -> usize {
        self.receivers.len() + self.senders.len()
    }
}

/// What a store answer is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Waiting {
    Write {
        flight: FlightKey,
        to: Address,
    },
    Read {
        address: Address,
    },
    /// A hand-off run's read (handoff.rs).
    Handoff {
        address: Address,
    },
}

/// Removes and returns the earliest timer of `timers` that is due by
/// `now`.
fn pop_due(timers: &mut BTreeMap<(Instant, u64), FlightKey>, now: Instant) -> Option<FlightKey> {
    let (&at, &key) = timers.iter().next()?;
    if at.0 > now {
        return None;
    }
    timers.remove(&at);
    Some(key)
}

/// Every `(address, id)` key of `address`, for ranges over
/// `awaiting_drain`.
fn ids_of(address: Address) -> std::ops::RangeInclusive<(Address, MsgId)> {
    (address, MsgId([0; 16]))..=(address, MsgId([0xff; 16]))
}

/// Whom a client's MSG goes to, as [`targets`] works it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// These addresses, in the order the sender listed them, each once.
    List(Vec<Address>),
    /// Every receiving session (a2n).
    Everyone(Scope),
    /// A named group this relay does not host: looked for across the
    /// federation (groups.rs).
    ElsewhereGroup,
}

/// The recipients of `msg` (`group`: a named group's members as the
/// caller's group store resolved them, `None` if it is not a group of
/// this relay's), or the code it is refused with.
pub fn targets(
    msg: &Msg,
    group: Option<Result<Vec<Address>, ErrorCode>>,
    max_group: usize,
) -> Result<Targets, ErrorCode> {
    Ok(Targets::List(match &msg.dest {
        Dest::A2n(scope) => return Ok(Targets::Everyone(*scope)),
        Dest::Group(_) => match group {
            Some(Ok(members)) => members,
            Some(Err(code)) => return Err(code),
            None => return Ok(Targets::ElsewhereGroup),
        },
        Dest::A2a => vec![msg.from],
        Dest::A2b(to) => vec![*to],
        Dest::A2g(list) if list.is_empty() => return Err(ErrorCode::EmptyList),
        Dest::A2g(list) if list.len() > max_group => return Err(ErrorCode::ListTooLong),
        Dest::A2g(list) => {
            let mut seen = BTreeSet::new();
            list.iter().copied().filter(|a| seen.insert(*a)).collect()
        }
    }))
}

/// A receipt refusing message `id` as a whole.
pub(crate) fn reject(id: MsgId, code: ErrorCode) -> Receipt {
    Receipt {
        id,
        status: Status::Rejected,
        reason: code.as_u16(),
        delivered: 0,
        entries: Vec::new(),
    }
}

/// The state of one relay. See the crate docs for the contract.
#[derive(Debug)]
pub struct RelayCore {
    pub(crate) config: Config,
    pub(crate) identity: Identity,
    pub(crate) me: Address,
    sessions: BTreeMap<ConnId, Session>,
    pub(crate) by_address: HashMap<Address, Inbox>,
    /// Addresses that registered here: messages for them are stored while
    /// they are offline.
    pub(crate) known: HashSet<Address>,
    pub(crate) flights: HashMap<FlightKey, Flight>,
    /// Flights of this relay's clients by message id (a FWD_RECEIPT names
    /// the id only).
    pub(crate) local_ids: HashMap<MsgId, FlightKey>,
    /// Deadlines of messages in flight, in time order.
    pub(crate) deadlines: BTreeMap<(Instant, u64), FlightKey>,
    /// When messages one session of an address acknowledged stop waiting
    /// for its other sessions (`Config::session_grace`).
    graces: BTreeMap<(Instant, u64), FlightKey>,
    /// Committed messages waiting for a draining connection's reader.
    awaiting_drain: BTreeMap<(Address, MsgId), FlightKey>,
    /// Writes on their way per recipient: a connection goes live only when
    /// its address has none.
    writes: HashMap<Address, u32>,
    tokens: HashMap<Token, Waiting>,
    pub(crate) next: u64,
    /// Store ops polled so far (numbers them).
    op_seq: u64,
    // Federation (federation.rs).
    pub(crate) peers: BTreeMap<PeerId, Peer>,
    pub(crate) peer_by_key: BTreeMap<Address, PeerId>,
    /// Relays reached by dialling a configured URL: trusted whichever
    /// side's link wins.
    pub(crate) configured: BTreeSet<Address>,
    pub(crate) links: LinkStates,
    /// Routes are recomputed when next asked for after a change.
    pub(crate) links_dirty: bool,
    pub(crate) link_seq: u64,
    /// Looked up per recipient: a hash map (outputs never follow its order).
    /// Per address, its records: one per relay it registered with, newest
    /// first, at most `MAX_HOMES`.
    pub(crate) directory: HashMap<Address, Vec<Presence>>,
    /// Leases, lookups, the lookup cache and the placement (directory.rs).
    pub(crate) dir: crate::directory::Dir,
    /// Custody and roaming (handoff.rs).
    pub(crate) handoff: crate::handoff::Handoffs,
    /// Named groups across relays (groups.rs).
    pub(crate) groups: crate::groups::GroupDir,
    pub(crate) seen: SeenCache,
    pub(crate) stats: Stats,
    pub(crate) transmits: VecDeque<Transmit>,
    store_ops: VecDeque<StoreOp>,
    pub(crate) closes: VecDeque<(ConnId, ErrorCode)>,
    pub(crate) events: VecDeque<Event>,
    /// This core's shard and how many there are (shard.rs; (0, 1): not
    /// sharded).
    pub(crate) shard: (usize, usize),
    /// Receipts of messages split across shards, for the caller to merge.
    parts: VecDeque<(ConnId, Receipt)>,
    /// Notices for senders of other shards.
    notices: VecDeque<(Address, Bytes)>,
    /// Work for other shards.
    pub(crate) spread: VecDeque<crate::shard::Spread>,
    /// Counts kept with the other shards (`share`).
    pub(crate) wide: Option<std::sync::Arc<crate::shard::RelayWide>>,
}

impl RelayCore {
    /// A core for relay `identity` whose store knows `known` (addresses
    /// that registered here before). `link_seq` numbers this relay's
    /// link-state records: start it above any number an earlier run used
    /// (e.g. the wall clock in ms); an echo of a higher one moves it on.
    pub fn new(
        config: Config,
        identity: Identity,
        link_seq: u64,
        known: impl IntoIterator<Item = Address>,
    ) -> Self {
        let me = identity.address();
        let [k0, k1, k2, k3] = config.hash_seed;
        let hasher = ahash::RandomState::with_seeds(k0, k1, k2, k3);
        let (cap, ttl) = (config.federation.seen_cache, config.federation.seen_ttl);
        let seen = SeenCache::with_hasher(cap, ttl, hasher.clone());
        let handoff =
            crate::handoff::Handoffs::new(SeenCache::with_hasher(cap, ttl, hasher.clone()));
        let mut known_set = HashSet::with_hasher(hasher.clone());
        known_set.extend(known);
        let mut core = RelayCore {
            config,
            identity,
            me,
            sessions: BTreeMap::new(),
            by_address: HashMap::with_hasher(hasher.clone()),
            known: known_set,
            flights: HashMap::with_hasher(hasher.clone()),
            local_ids: HashMap::with_hasher(hasher.clone()),
            deadlines: BTreeMap::new(),
            graces: BTreeMap::new(),
            awaiting_drain: BTreeMap::new(),
            writes: HashMap::with_hasher(hasher.clone()),
            tokens: HashMap::with_hasher(hasher.clone()),
            next: 0,
            op_seq: 0,
            peers: BTreeMap::new(),
            peer_by_key: BTreeMap::new(),
            configured: BTreeSet::new(),
            links: LinkStates::new(me),
            links_dirty: false,
            link_seq,
            directory: HashMap::with_hasher(hasher),
            dir: crate::directory::Dir::default(),
            groups: crate::groups::GroupDir::default(),
            handoff,
            seen,
            stats: Stats::default(),
            transmits: VecDeque::new(),
            store_ops: VecDeque::new(),
            closes: VecDeque::new(),
            events: VecDeque::new(),
            shard: (0, 1),
            parts: VecDeque::new(),
            notices: VecDeque::new(),
            spread: VecDeque::new(),
            wide: None,
        };
        core.bump_link_state();
        core
    }

    /// This relay's key.
    pub fn address(&self) -> Address {
        self.me
    }

    /// Addresses the store knows (registered here before): messages for
    /// them are stored while they are offline.
    pub fn add_known(&mut self, addrs: impl IntoIterator<Item = Address>) {
        self.known.extend(addrs);
    }

    /// Turns [`Event`]s on or off (e.g. only while someone watches).
    pub fn set_events(&mut self, on: bool) {
        self.config.events = on;
        if !on {
            self.events.clear();
        }
    }

    // ------------------------------------------------------------ outputs

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// A hop event (only with [`Config::events`]).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Counters since the core was made.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Connected sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The sessions of `address` that take deliveries, oldest first.
    pub fn receivers_of(&self, address: &Address) -> &[ConnId] {
        self.by_address
            .get(address)
            .map_or(&[], |i| i.receivers.as_slice())
    }

    /// Whether `address` has a session here (receiving or send-only).
    pub fn is_connected(&self, address: &Address) -> bool {
        self.by_address.contains_key(address)
    }

    /// Every session that takes deliveries, in id order.
    pub(crate) fn conns(&self) -> Vec<(ConnId, Address)> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.receive)
            .map(|(c, s)| (*c, s.address))
            .collect()
    }

    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.store_ops.pop_front()
    }

    /// A connection the caller must close (with this code).
    pub fn poll_close(&mut self) -> Option<(ConnId, ErrorCode)> {
        self.closes.pop_front()
    }

    /// Makes this core shard `index` of `count` (shard.rs): its store
    /// tokens are `≡ index (mod count)`, and notices for senders of other
    /// shards come out of `poll_notice`. Call it before any input.
    ///
    /// With peers: each shard holds the directory records, lookups,
    /// custody and group records of its addresses (and group names), so
    /// the bounds on the directory and lookup tables and a peer's
    /// allowance on probation are shared out among the shards (custody and
    /// clients' lookups are counted for the relay: `share`); link state and
    /// the peer links are the same in every shard, and only shard 0 sends
    /// link state.
    pub fn set_shard(&mut self, index: usize, count: usize) {
        assert!(index < count, "shard {index} of {count}");
        self.shard = (index, count);
        let f = &mut self.config.federation;
        f.max_directory = f.max_directory.div_ceil(count);
        f.probation_records = f.probation_records.div_ceil(count);
        f.max_lookups = f.max_lookups.div_ceil(count);
    }

    /// Counts custody and clients' lookups with the relay's other shards
    /// (`wide`), so `max_custody` and `lookups_per_client` hold for the
    /// relay. Call it before any input.
    pub fn share(&mut self, wide: std::sync::Arc<crate::shard::RelayWide>) {
        self.handoff.pending.share(wide.pending.clone());
        self.wide = Some(wide);
    }

    /// Work this shard hands to others (shard.rs).
    pub fn poll_spread(&mut self) -> Option<crate::shard::Spread> {
        self.spread.pop_front()
    }

    /// The receipt of one shard's part of a client's message (a flight
    /// with [`Reply::Part`]), for the caller to merge (shard.rs).
    pub fn poll_part(&mut self) -> Option<(ConnId, Receipt)> {
        self.parts.pop_front()
    }

    /// A notice for a sender of another shard: give it to
    /// [`RelayCore::notice_to`] of that shard.
    pub fn poll_notice(&mut self) -> Option<(Address, Bytes)> {
        self.notices.pop_front()
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let d = self.deadlines.keys().next().map(|(t, _)| *t);
        let g = self.graces.keys().next().map(|(t, _)| *t);
        d.into_iter()
            .chain(g)
            .chain(self.dir_timeout())
            .chain(self.handoff_timeout())
            .min()
    }

    /// Messages in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Whether nothing is in flight, waited for, or about to be sent: what
    /// a quiet relay must come back to.
    pub fn is_idle(&self) -> bool {
        self.flights.is_empty()
            && self.local_ids.is_empty()
            && self.tokens.is_empty()
            && self.awaiting_drain.is_empty()
            && self.writes.is_empty()
            && self.transmits.is_empty()
            && self.store_ops.is_empty()
            && self.handoff.runs.is_empty()
            && self.groups_idle()
            && self.handoff.pending.is_empty()
    }

    // ------------------------------------------------------------- inputs

    /// A connection completed registration as `address`; `receive`: it
    /// takes deliveries (false: a send-only session). Older sessions of
    /// the address stay (see [`RelayCore::exclusive`]); past
    /// [`Config::max_sessions`] the new one is refused
    /// (`too_many_sessions`, nothing changed). A receiving session reads
    /// what the address has stored and not yet acknowledged. With `proof`
    /// (the registration's), the first receiving session publishes the
    /// address's presence to the federation.
    pub fn connect(
        &mut self,
        now: Instant,
        conn: ConnId,
        address: Address,
        proof: Option<RegistrationProof>,
        receive: bool,
    ) -> Result<(), ErrorCode> {
        if self.by_address.get(&address).map_or(0, Inbox::len) >= self.config.max_sessions {
            self.stats.error(ErrorCode::TooManySessions);
            return Err(ErrorCode::TooManySessions);
        }
        self.known.insert(address);
        self.sessions.insert(
            conn,
            Session {
                address,
                receive,
                handed: HashMap::with_hasher(self.flights.hasher().clone()),
            },
        );
        let inbox = self.by_address.entry(address).or_insert(Inbox {
            receivers: Vec::new(),
            senders: Vec::new(),
            phase: DRAIN,
            gone: BTreeMap::new(),
            read_at: 0,
        });
        if !receive {
            inbox.senders.push(conn);
            return Ok(());
        }
        inbox.receivers.push(conn);
        // Its backlog here is its sessions' to take, not to move.
        self.handoff.pending.remove(&address);
        let Some(inbox) = self.by_address.get_mut(&address) else {
            return Ok(());
        };
        if inbox.receivers.len() > 1 {
            // It takes what is still stored, like the first one did.
            self.redrain(address);
            return Ok(());
        }
        inbox.phase = DRAIN;
        if let Some(proof) = proof {
            self.local_join(now, proof);
        }
        self.read_next(address);
        Ok(())
    }

    /// Closes every other session of `conn`'s address (`replaced`), as a
    /// client that wants to be its address's only session asks; returns
    /// how many.
    pub fn exclusive(&mut self, now: Instant, conn: ConnId) -> u32 {
        let Some(address) = self.sessions.get(&conn).map(|s| s.address) else {
            return 0;
        };
        let others: Vec<ConnId> = self.by_address.get(&address).map_or(Vec::new(), |i| {
            i.receivers
                .iter()
                .chain(&i.senders)
                .copied()
                .filter(|c| *c != conn)
                .collect()
        });
        for c in &others {
            self.closes.push_back((*c, ErrorCode::Replaced));
            self.disconnect(now, *c);
        }
        others.len() as u32
    }

    /// A connection ended (or was closed). Copies it was handed without
    /// being stored, which no other session acknowledged, are written now;
    /// stored ones it did not acknowledge go back to the address's other
    /// receiving sessions, or are `queued` if there are none.
    pub fn disconnect(&mut self, _now: Instant, conn: ConnId) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        let address = session.address;
        let mut others = false;
        if let Some(inbox) = self.by_address.get_mut(&address) {
            inbox.receivers.retain(|c| *c != conn);
            inbox.senders.retain(|c| *c != conn);
            others = !inbox.receivers.is_empty();
            if session.receive && !others {
                // A read on its way is answered to nobody.
                inbox.phase = DRAIN;
            }
            if inbox.len() == 0 {
                self.by_address.remove(&address);
            }
            if session.receive && !others {
                self.local_leave(&address);
                self.may_move(address);
            }
        }
        // Something it held goes back to the inbox for the others.
        let mut back = false;
        let mut touched = BTreeSet::new();
        // In id order, as before (the writes below are made in this order).
        let mut handed: Vec<(MsgId, Handed)> = session.handed.into_iter().collect();
        handed.sort_unstable_by_key(|(id, _)| *id);
        for (id, h) in handed {
            let Some(key) = h.flight else {
                back |= h.stored;
                continue;
            };
            let Some(state) = self
                .flights
                .get_mut(&key)
                .and_then(|f| f.state_mut(&address))
            else {
                back |= h.stored;
                continue;
            };
            let mut late = false;
            match state {
                Recipient::Unstored { conns, acked } if conns.contains(&conn) => {
                    conns.retain(|c| *c != conn);
                    if conns.is_empty() {
                        if *acked > 0 {
                            *state = Recipient::Settled(entry(address, Status::Delivered, None));
                        } else {
                            back = true;
                            late = true;
                        }
                    }
                }
                Recipient::Stored { conns } if conns.contains(&conn) => {
                    conns.retain(|c| *c != conn);
                    if conns.is_empty() {
                        if others {
                            back = true;
                            self.awaiting_drain.insert((address, id), key);
                        } else {
                            *state = Recipient::Settled(entry(address, Status::Queued, None));
                        }
                    }
                }
                _ => back |= h.stored,
            }
            if late {
                self.store_late(key, address);
            }
            touched.insert(key);
        }
        if others {
            if back {
                self.redrain(address);
            }
        } else {
            // Committed messages no reader will reach: they stay stored.
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
        }
        for key in touched {
            self.finish_if_settled(key);
        }
    }

    /// The receiving sessions of `address` read its stored backlog again
    /// from the start (a session arrived, or one left something
    /// unacknowledged): each is handed what it does not hold yet.
    fn redrain(&mut self, address: Address) {
        let writing = self.writes.contains_key(&address);
        let Some(inbox) = self.by_address.get_mut(&address) else {
            return;
        };
        if inbox.receivers.is_empty() {
            return;
        }
        match &mut inbox.phase {
            Phase::Live => {
                inbox.phase = DRAIN;
                self.read_next(address);
            }
            Phase::Draining {
                reading: Some(_),
                restart,
                ..
            } => *restart = true,
            Phase::Draining { after, .. } => {
                *after = 0;
                if !writing {
                    self.read_next(address);
                }
            }
        }
    }

    /// A MSG from a registered connection (the frame exactly as received,
    /// and its decoded form). For a named group, `group` holds its members
    /// as the caller's group store resolved them (`None`: not a group of
    /// this relay: looked for across the federation, groups.rs).
    pub fn handle_msg(
        &mut self,
        now: Instant,
        conn: ConnId,
        frame: Bytes,
        msg: &Msg,
        group: Option<Result<Vec<Address>, ErrorCode>>,
    ) {
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        if msg.from != session.address {
            self.stats.error(ErrorCode::SpoofedSender);
            return self.send_receipt(conn, reject(msg.id, ErrorCode::SpoofedSender));
        }
        match targets(msg, group, self.config.max_group) {
            Ok(to) => self.accept(now, Reply::Client(conn), frame, msg, to),
            Err(code) => self.send_receipt(conn, reject(msg.id, code)),
        }
    }

    /// A MSG, or one shard's part of it (shard.rs), from a connection of
    /// another shard: the caller checked its sender against that
    /// connection's session and chose the recipients for this shard.
    /// `reply`: [`Reply::Client`] when this shard has the whole message,
    /// [`Reply::Part`] when its receipt is merged with other shards'.
    pub fn handle_part(
        &mut self,
        now: Instant,
        reply: Reply,
        frame: Bytes,
        msg: &Msg,
        to: Targets,
    ) {
        self.accept(now, reply, frame, msg, to)
    }

    fn accept(&mut self, now: Instant, reply: Reply, frame: Bytes, msg: &Msg, to: Targets) {
        let key = (msg.id, msg.from);
        // The same MSG again while its original is in flight (a resend
        // after a lost connection, or through another relay of the
        // sender's that forwarded it here): it joins the original and gets
        // the original's receipt (PROTOCOL 7.6).
        if let Some(f) = self.flights.get_mut(&key) {
            if f.frame == frame && f.covers(&msg.dest) {
                if f.reply != reply {
                    f.resent = Some(reply);
                }
                self.stats.resends_joined += 1;
                return;
            }
        }
        // Receipts from other relays name the id only: a second message
        // with the id of one still in flight is refused rather than
        // allowed to take its receipt.
        if self.local_ids.contains_key(&msg.id) || self.flights.contains_key(&key) {
            self.stats.error(ErrorCode::Duplicate);
            return self.answer(reply, reject(msg.id, ErrorCode::Duplicate));
        }
        self.event(Event::FromClient {
            id: msg.id,
            from: msg.from,
        });
        let route = msg.dest.route();
        match (to, reply) {
            (Targets::Everyone(scope), _) => {
                self.broadcast_from_client(now, reply, key, frame, scope)
            }
            (Targets::ElsewhereGroup, Reply::Client(conn)) => self.group_msg(now, conn, frame, msg),
            (Targets::ElsewhereGroup, _) => {}
            (Targets::List(targets), _) => {
                self.start_flight(now, (key, reply, route), frame, targets, None)
            }
        }
    }

    /// Starts the record of a message for `targets`: each is handed over,
    /// stored, forwarded toward its relay or settled at once.
    pub(crate) fn start_flight(
        &mut self,
        now: Instant,
        (key, reply, route): (FlightKey, Reply, Route),
        frame: Bytes,
        targets: Vec<Address>,
        broadcast: Option<crate::flight::Broadcast>,
    ) {
        let from_peer = matches!(reply, Reply::Relay(_));
        self.note_now(now);
        let mut recipients = Vec::with_capacity(targets.len());
        let mut remote: BTreeMap<Address, Vec<Address>> = BTreeMap::new();
        let mut lookups = Vec::new();
        let mut copies = 0;
        for to in targets {
            if from_peer {
                copies += self.peer_leg(key, to, &frame, &mut recipients);
                continue;
            }
            // A relay that was forwarded the message never forwards it
            // again, and an a2a stays with the sender's relay; any other
            // recipient whose relays this one does not know is looked up.
            let wide = route != Route::A2a;
            if wide && self.needs_lookup(&to) && !self.may_look_up(now, key.1) {
                self.stats.error(ErrorCode::RateLimited);
                let e = entry(to, Status::Rejected, Some(ErrorCode::RateLimited));
                recipients.push((to, Recipient::Settled(e)));
                continue;
            }
            if wide && self.needs_lookup(&to) {
                lookups.push(to);
                recipients.push((to, Recipient::Resolving { moved_from: None }));
                continue;
            }
            let elsewhere = if wide {
                self.homes_elsewhere(&to)
            } else {
                Vec::new()
            };
            // A client's message whose recipient's relay cannot be reached
            // may be kept here for it (custody).
            let how = (true, wide, Some(ErrorCode::NoRoute));
            copies += self.place(
                (key, to),
                &frame,
                &elsewhere,
                how,
                &mut recipients,
                &mut remote,
            );
        }
        self.next += 1;
        let deadline = (now + self.config.receipt_timeout, self.next);
        self.deadlines.insert(deadline, key);
        if reply.client().is_some() {
            self.local_ids.insert(key.0, key);
        }
        let resolving = lookups.len() as u32;
        let unsent = if resolving > 0 {
            std::mem::take(&mut remote)
        } else {
            BTreeMap::new()
        };
        self.flights.insert(
            key,
            Flight {
                reply,
                resent: None,
                route,
                frame: frame.clone(),
                recipients,
                deadline,
                expired: false,
                broadcast,
                copies,
                resolving,
                unsent,
                sent: Vec::new(),
            },
        );
        for (relay, to) in remote {
            self.forward_to(key, relay, to, &frame);
        }
        for to in lookups {
            self.look_up(now, to, crate::directory::Waiter::Flight(key));
        }
        self.finish_if_settled(key);
    }

    /// The leg of recipient `to` of a message another relay forwarded here
    /// (pushed to `legs`); returns the copies already delivered.
    pub(crate) fn peer_leg(
        &mut self,
        key: FlightKey,
        to: Address,
        frame: &Bytes,
        legs: &mut Vec<(Address, Recipient)>,
    ) -> u32 {
        if self.took(key.0, &to, &key.1) {
            // It reached `to` here already (a hand-off overtook a FORWARD
            // that was held up on the way): not handed twice.
            legs.push((to, Recipient::Settled(entry(to, Status::Queued, None))));
            return 0;
        }
        if self.moved(&to) {
            // It registered at another relay since the origin looked it
            // up: the origin looks again.
            let state = self.settle_now(to, ErrorCode::Moved);
            legs.push((to, state));
            return 0;
        }
        let how = (true, false, Some(ErrorCode::NoRoute));
        let mut remote = BTreeMap::new();
        self.place((key, to), frame, &[], how, legs, &mut remote)
    }

    /// The legs of `to` given the other relays it is at (`elsewhere`): a
    /// local one if it is a client here (or stored for here) and `local`
    /// asks for it, one `Forwarded` per reachable relay (added to
    /// `remote`); if its relays cannot be reached, a copy kept here when
    /// `keep` allows (custody, handoff.rs), else `no_route` `unreachable`
    /// for each; if that makes none, one settled `no_route` with reason
    /// `none` (if any). Returns the copies already delivered.
    pub(crate) fn place(
        &mut self,
        (key, to): (FlightKey, Address),
        frame: &Bytes,
        elsewhere: &[Address],
        (local, keep, none): (bool, bool, Option<ErrorCode>),
        legs: &mut Vec<(Address, Recipient)>,
        remote: &mut BTreeMap<Address, Vec<Address>>,
    ) -> u32 {
        let before = legs.len();
        let mut copies = 0;
        if local {
            if let Some((state, n)) = self.deliver_local(key, to, frame, !elsewhere.is_empty()) {
                copies += n;
                legs.push((to, state));
            }
        }
        let mut gone = 0;
        for relay in elsewhere {
            if self.hop(relay).is_some() {
                remote.entry(*relay).or_default().push(to);
                legs.push((to, Recipient::Forwarded { relay: *relay }));
            } else {
                gone += 1;
            }
        }
        if gone > 0 && keep && legs.len() == before && self.may_keep(&to) {
            let state = self.keep(key, to, frame);
            legs.push((to, state));
        } else {
            for _ in 0..gone {
                let state = self.settle_now(to, ErrorCode::Unreachable);
                legs.push((to, state));
            }
        }
        if let (true, Some(code)) = (legs.len() == before, none) {
            let state = self.settle_now(to, code);
            legs.push((to, state));
        }
        copies
    }

    /// A recipient that cannot be reached: settled `no_route` with `code`.
    pub(crate) fn settle_now(&mut self, to: Address, code: ErrorCode) -> Recipient {
        self.stats.error(code);
        Recipient::Settled(entry(to, Status::NoRoute, Some(code)))
    }

    /// Delivers to `to` if it is a client of this relay: handed to every
    /// receiving session without being stored when they are live (the
    /// ACKs or the deadline decide), or stored first (no session, or they
    /// are still taking the backlog; an address known here with no session
    /// is stored for only if it goes to no other relay: `elsewhere`). With
    /// the copies already counted delivered (not durable). `None`: not
    /// ours.
    pub(crate) fn deliver_local(
        &mut self,
        key: FlightKey,
        to: Address,
        frame: &Bytes,
        elsewhere: bool,
    ) -> Option<(Recipient, u32)> {
        let (receivers, live) = match self.by_address.get(&to) {
            Some(i) if !i.receivers.is_empty() => (i.receivers.clone(), i.phase == Phase::Live),
            _ => (Vec::new(), false),
        };
        if !receivers.is_empty() {
            if !self.config.durable {
                for c in &receivers {
                    self.send_conn(*c, frame.clone(), false);
                }
                self.event(Event::ToClient { id: key.0, to });
                let n = receivers.len() as u32;
                return Some((Recipient::Settled(entry(to, Status::Delivered, None)), n));
            }
            if live {
                let conns: Vec<ConnId> = receivers
                    .into_iter()
                    .filter(|c| self.hand_unstored(*c, key.0, frame, key))
                    .collect();
                if !conns.is_empty() {
                    self.event(Event::ToClient { id: key.0, to });
                    return Some((Recipient::Unstored { conns, acked: 0 }, 0));
                }
            }
            return Some((self.enqueue(key, to, key.1, key.0, frame, false), 0));
        }
        if self.known.contains(&to) && !elsewhere {
            return Some((self.enqueue(key, to, key.1, key.0, frame, false), 0));
        }
        None
    }

    /// An ACK: the connection has these messages.
    pub fn handle_ack(&mut self, now: Instant, conn: ConnId, ids: &[MsgId]) {
        for id in ids {
            let Some(session) = self.sessions.get_mut(&conn) else {
                return;
            };
            let address = session.address;
            let Some(h) = session.handed.remove(id) else {
                continue;
            };
            if h.stored {
                let op = self.push_op(StoreOp::Dequeue {
                    recipient: address,
                    id: *id,
                });
                self.note_gone(address, *id, op);
            }
            if self.handoff.federated {
                // A copy of it another relay stored (another leg, or one
                // kept in custody) and hands over later is not handed
                // twice.
                self.note_took(*id, address, h.sender);
            }
            let Some(key) = h.flight.filter(|k| self.flights.contains_key(k)) else {
                // Its receipt has gone out (`queued`): tell the sender it
                // has arrived, if it is connected here.
                if h.stored {
                    self.notify_delivered(h.sender, *id, address);
                }
                continue;
            };
            let Some(f) = self.flights.get_mut(&key) else {
                continue;
            };
            let mut counts = true;
            let mut drained = false;
            let mut pending = false;
            let mut grace = false;
            let mut delete = false;
            if let Some(state) = f.state_mut(&address) {
                match state {
                    Recipient::Unstored { conns, acked } if conns.contains(&conn) => {
                        conns.retain(|c| *c != conn);
                        *acked += 1;
                        if conns.is_empty() {
                            *state = Recipient::Settled(entry(address, Status::Delivered, None));
                        } else {
                            // The others get a little while, not the
                            // whole receipt timeout.
                            grace = *acked == 1;
                        }
                    }
                    Recipient::Stored { .. } => {
                        // A copy handed unstored by an earlier flight of
                        // the same message (one that ended before a
                        // hand-off of it was stored here under the same
                        // key) is this one: its ACK deletes this copy too.
                        delete = !h.stored;
                        drained = true;
                        *state = Recipient::Settled(entry(address, Status::Delivered, None));
                    }
                    // Its write is on the way: delivered, and deleted once
                    // it lands.
                    Recipient::Storing { acked, .. } => {
                        *acked = true;
                        pending = true;
                    }
                    // Reported `queued` at its deadline, the receipt not sent
                    // yet (other recipients pending): it has arrived after all.
                    Recipient::Settled(e) if h.stored && e.status == Status::Queued => {
                        *state = Recipient::Settled(entry(address, Status::Delivered, None));
                    }
                    Recipient::Settled(e) => counts = e.status == Status::Delivered,
                    _ => counts = false,
                }
            }
            if counts {
                f.copies += 1;
            }
            if drained {
                self.awaiting_drain.remove(&(address, *id));
            }
            if delete {
                let op = self.push_op(StoreOp::Dequeue {
                    recipient: address,
                    id: *id,
                });
                self.note_gone(address, *id, op);
            }
            if pending {
                // Its copy is deleted once written: until then no read
                // hands it out again.
                self.note_gone(address, *id, u64::MAX);
            }
            if grace {
                self.next += 1;
                self.graces
                    .insert((now + self.config.session_grace, self.next), key);
            }
            self.finish_if_settled(key);
        }
    }

    /// The store's answer to an op with a token.
    pub fn store_done(&mut self, now: Instant, done: StoreDone) {
        match done {
            StoreDone::Enqueued { token, result } => self.on_enqueued(now, token, result),
            StoreDone::Read { token, result } => match self.tokens.get(&token) {
                Some(&Waiting::Handoff { address }) => {
                    self.tokens.remove(&token);
                    self.on_handoff_read(now, token, address, result)
                }
                _ => self.on_read(token, result),
            },
        }
    }

    /// Applies the deadlines that have passed: recipients handed a message
    /// unstored that did not ACK it get it written; stored ones that did
    /// not ACK are `queued`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.note_now(now);
        // Messages an address's other sessions did not acknowledge within
        // the grace after the first: delivered (it has them).
        while let Some(key) = pop_due(&mut self.graces, now) {
            let Some(f) = self.flights.get_mut(&key) else {
                continue;
            };
            for (to, state) in &mut f.recipients {
                if matches!(state, Recipient::Unstored { acked, .. } if *acked > 0) {
                    *state = Recipient::Settled(entry(*to, Status::Delivered, None));
                }
            }
            self.finish_if_settled(key);
        }
        let waited = if self.joining() {
            ErrorCode::Joining
        } else {
            ErrorCode::Timeout
        };
        while let Some(key) = pop_due(&mut self.deadlines, now) {
            let Some(f) = self.flights.get_mut(&key) else {
                continue;
            };
            f.expired = true;
            if let Some(b) = &mut f.broadcast {
                if !b.waiting.is_empty() {
                    b.waiting.clear();
                    self.stats.error(ErrorCode::Timeout);
                }
            }
            let mut late = Vec::new();
            // A client's FORWARD whose receipt did not come: kept here if
            // custody allows (below), else `timeout`.
            let custody = f.reply.client().is_some() && self.config.federation.custody;
            let mut unanswered = Vec::new();
            for (i, (to, state)) in f.recipients.iter_mut().enumerate() {
                match state {
                    // One session acknowledged it: the address has it.
                    Recipient::Unstored { acked, .. } if *acked > 0 => {
                        *state = Recipient::Settled(entry(*to, Status::Delivered, None));
                    }
                    Recipient::Unstored { .. } => late.push(*to),
                    Recipient::Forwarded { .. } if custody => unanswered.push((i, *to)),
                    Recipient::Forwarded { .. } => {
                        self.stats.error(ErrorCode::Timeout);
                        *state = Recipient::Settled(entry(
                            *to,
                            Status::NoRoute,
                            Some(ErrorCode::Timeout),
                        ));
                    }
                    Recipient::Resolving { .. } => {
                        self.stats.error(waited);
                        *state = Recipient::Settled(entry(*to, Status::NoRoute, Some(waited)));
                    }
                    Recipient::Stored { .. } => {
                        self.awaiting_drain.remove(&(*to, key.0));
                        *state = Recipient::Settled(entry(*to, Status::Queued, None));
                    }
                    _ => {}
                }
            }
            for to in late {
                self.store_late(key, to);
            }
            self.keep_unanswered(key, unanswered);
            self.finish_if_settled(key);
        }
        self.dir_tick(now);
        self.handoff_tick(now);
    }

    // ------------------------------------------------------------ helpers

    pub(crate) fn token(&mut self, w: Waiting) -> Token {
        self.next += 1;
        // A shard's tokens are its own: the caller routes a store answer
        // by `token % shards` (shard.rs).
        let t = Token(self.next * self.shard.1 as u64 + self.shard.0 as u64);
        self.tokens.insert(t, w);
        t
    }

    /// Hands `frame` to a live session without storing it, remembering
    /// that its ACK settles `key`. False (nothing done) if the session
    /// already holds a message with this id.
    fn hand_unstored(&mut self, conn: ConnId, id: MsgId, frame: &Bytes, key: FlightKey) -> bool {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        if s.handed.contains_key(&id) {
            return false;
        }
        s.handed.insert(
            id,
            Handed {
                flight: Some(key),
                stored: false,
                sender: key.1,
            },
        );
        self.send_conn(conn, frame.clone(), false);
        true
    }

    pub(crate) fn enqueue(
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
        self.push_op(StoreOp::Enqueue {
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
    /// Legs of flight `key` forwarded and never answered by its deadline
    /// (the path broke, or the relay went silent: whether it delivered is
    /// unknown). One per recipient with no other way is kept here
    /// (custody, PROTOCOL 12.13): handed over later, where a copy the
    /// recipient's relay already took is not handed again (`taken`, and
    /// the store's one row per id); the others are `timeout`.
    fn keep_unanswered(&mut self, key: FlightKey, legs: Vec<(usize, Address)>) {
        let mut kept: Vec<Address> = Vec::new();
        for (i, to) in legs {
            let Some(f) = self.flights.get(&key) else {
                return;
            };
            let other_way = f.recipients.iter().enumerate().any(|(j, (a, s))| {
                j != i
                    && *a == to
                    && match s {
                        Recipient::Settled(e) => {
                            matches!(e.status, Status::Delivered | Status::Queued)
                        }
                        Recipient::Forwarded { .. } | Recipient::Resolving { .. } => false,
                        _ => true,
                    }
            });
            let frame = f.frame.clone();
            let state = if !other_way && !kept.contains(&to) && self.may_keep(&to) {
                kept.push(to);
                self.keep(key, to, &frame)
            } else {
                self.stats.error(ErrorCode::Timeout);
                Recipient::Settled(entry(to, Status::NoRoute, Some(ErrorCode::Timeout)))
            };
            if let Some(s) = self
                .flights
                .get_mut(&key)
                .and_then(|f| f.recipients.get_mut(i))
            {
                s.1 = state;
            }
        }
    }

    fn store_late(&mut self, key: FlightKey, to: Address) {
        let Some(frame) = self.flights.get(&key).map(|f| f.frame.clone()) else {
            return;
        };
        let state = self.enqueue(key, to, key.1, key.0, &frame, true);
        if let Some(s) = self.flights.get_mut(&key).and_then(|f| f.state_mut(&to)) {
            *s = state;
        }
    }

    /// Whether a write for `address` is on its way.
    pub(crate) fn writes_for(&self, address: &Address) -> bool {
        self.writes.contains_key(address)
    }

    /// Starts the next read of `address`'s backlog, if its sessions are
    /// draining and no read is on its way.
    fn read_next(&mut self, address: Address) {
        let Some(Phase::Draining {
            after,
            reading: None,
            ..
        }) = self.by_address.get(&address).map(|i| i.phase)
        else {
            return;
        };
        let token = self.token(Waiting::Read { address });
        let op = self.push_op(StoreOp::Read {
            token,
            recipient: address,
            after,
            limit: self.config.read_batch.max(1),
        });
        if let Some(i) = self.by_address.get_mut(&address) {
            i.phase = Phase::Draining {
                after,
                reading: Some(token),
                dirty: false,
                restart: false,
            };
            i.read_at = op;
            // Deleted before this read runs: it cannot return them.
            i.gone.retain(|_, del| *del > op);
        }
    }

    /// Queues a store op; returns its number (ops run in this order).
    pub(crate) fn push_op(&mut self, op: StoreOp) -> u64 {
        self.op_seq += 1;
        self.store_ops.push_back(op);
        self.op_seq
    }

    /// Session ACKed `id` of `address`, whose copy op number `del`
    /// deletes: remembered while a read that may still return it is on
    /// its way (or will be polled before `del`).
    pub(crate) fn note_gone(&mut self, address: Address, id: MsgId, del: u64) {
        let Some(i) = self.by_address.get_mut(&address) else {
            return;
        };
        let reading = matches!(
            i.phase,
            Phase::Draining {
                reading: Some(_),
                ..
            }
        );
        if del == u64::MAX || (reading && del > i.read_at) {
            i.gone.insert(id, del);
        } else {
            i.gone.remove(&id);
        }
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
        let expired = self.flights.get(&key).is_some_and(|f| f.expired);
        // A session here acknowledged this message meanwhile (another copy
        // of it, e.g. the one on disk before a hand-off of it landed).
        let had = self.took(key.0, &to, &key.1);
        let current = self.flights.get(&key).and_then(|f| f.local(&to)).cloned();
        let mut back = false;
        if let Some(Recipient::Storing {
            token: t,
            late,
            acked,
        }) = current
        {
            if t == token {
                let next = match result {
                    // A session had it meanwhile (unstored, or from the
                    // backlog reader): delivered; the copy is not needed.
                    Ok(()) if acked || had => {
                        let op = self.push_op(StoreOp::Dequeue {
                            recipient: to,
                            id: key.0,
                        });
                        self.note_gone(to, key.0, op);
                        Recipient::Settled(entry(to, Status::Delivered, None))
                    }
                    Ok(()) if late => {
                        // On disk now: an ACK that still comes deletes it;
                        // a session that never had it takes it from there.
                        for c in self.receivers_of(&to).to_vec() {
                            match self
                                .sessions
                                .get_mut(&c)
                                .and_then(|s| s.handed.get_mut(&key.0))
                            {
                                Some(h) => h.stored = true,
                                None => back = true,
                            }
                        }
                        Recipient::Settled(entry(to, Status::Queued, None))
                    }
                    Ok(()) if expired => {
                        // Too late for the receipt, not for its live
                        // sessions (the reader of draining ones finds it).
                        self.hand_live_stored(key, to);
                        Recipient::Settled(entry(to, Status::Queued, None))
                    }
                    Ok(()) => self.after_commit(key, to),
                    Err(_) if acked => {
                        // This write failed, but another copy of the
                        // message may be on disk (an earlier hand-off of
                        // it, the store keeps one row per id): the ACK
                        // deletes that one.
                        let op = self.push_op(StoreOp::Dequeue {
                            recipient: to,
                            id: key.0,
                        });
                        self.note_gone(to, key.0, op);
                        Recipient::Settled(entry(to, Status::Delivered, None))
                    }
                    Err(code) => Recipient::Settled(entry(to, Status::Rejected, Some(code))),
                };
                if let Some(s) = self.flights.get_mut(&key).and_then(|f| f.state_mut(&to)) {
                    *s = next;
                }
                self.finish_if_settled(key);
            }
        }
        if back {
            self.redrain(to);
        }
        if result.is_ok() {
            self.may_move(to);
        }
        // Draining sessions read again: now if no read is on its way, after
        // the current one otherwise (which may have run before this write).
        if let Some(i) = self.by_address.get_mut(&to) {
            match &mut i.phase {
                Phase::Draining {
                    reading: Some(_),
                    dirty,
                    ..
                } => *dirty = true,
                Phase::Draining { reading: None, .. } => self.read_next(to),
                Phase::Live => {}
            }
        }
    }

    /// A committed copy whose flight is settled without it: handed to
    /// the address's live sessions that do not hold it (its ACK deletes
    /// it).
    fn hand_live_stored(&mut self, key: FlightKey, to: Address) {
        let Some(i) = self.by_address.get(&to).filter(|i| i.phase == Phase::Live) else {
            return;
        };
        let Some(frame) = self.flights.get(&key).map(|f| f.frame.clone()) else {
            return;
        };
        for c in i.receivers.clone() {
            let Some(s) = self.sessions.get_mut(&c) else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(v) = s.handed.entry(key.0) {
                v.insert(Handed {
                    flight: None,
                    stored: true,
                    sender: key.1,
                });
                self.send_conn(c, frame.clone(), false);
            }
        }
    }

    /// A first write committed: hand it to live sessions, leave it to the
    /// reader of draining ones, or report it queued.
    fn after_commit(&mut self, key: FlightKey, to: Address) -> Recipient {
        let queued = Recipient::Settled(entry(to, Status::Queued, None));
        let Some((receivers, phase)) = self
            .by_address
            .get(&to)
            .filter(|i| !i.receivers.is_empty())
            .map(|i| (i.receivers.clone(), i.phase))
        else {
            return queued;
        };
        let frame = self.flights.get(&key).map(|f| f.frame.clone());
        let mut conns = Vec::new();
        let mut missing = false;
        for c in receivers {
            let Some(s) = self.sessions.get_mut(&c) else {
                continue;
            };
            match s.handed.entry(key.0) {
                std::collections::hash_map::Entry::Occupied(_) => conns.push(c),
                // Only when every session already held this id was it
                // written for live sessions: a resent id.
                std::collections::hash_map::Entry::Vacant(v) if phase == Phase::Live => {
                    v.insert(Handed {
                        flight: Some(key),
                        stored: true,
                        sender: key.1,
                    });
                    if let Some(frame) = &frame {
                        self.send_conn(c, frame.clone(), false);
                    }
                    conns.push(c);
                }
                std::collections::hash_map::Entry::Vacant(_) => missing = true,
            }
        }
        if missing {
            self.awaiting_drain.insert((to, key.0), key);
        } else if conns.is_empty() {
            return queued;
        }
        Recipient::Stored { conns }
    }

    fn on_read(&mut self, token: Token, result: Result<Vec<Stored>, ErrorCode>) {
        let Some(Waiting::Read { address }) = self.tokens.remove(&token) else {
            return;
        };
        let Some(inbox) = self.by_address.get(&address) else {
            return;
        };
        let Phase::Draining {
            mut after,
            reading: Some(t),
            dirty,
            restart,
        } = inbox.phase
        else {
            return;
        };
        if t != token {
            return;
        }
        let receivers = inbox.receivers.clone();
        let gone: BTreeSet<MsgId> = inbox.gone.keys().copied().collect();
        let msgs = match result {
            Ok(m) => m,
            Err(code) => {
                for c in receivers {
                    self.closes.push_back((c, code));
                }
                return;
            }
        };
        let full = msgs.len() >= self.config.read_batch.max(1);
        let mut touched = Vec::new();
        for m in msgs {
            after = after.max(m.seq);
            if gone.contains(&m.id) {
                continue;
            }
            let decoded = match ClientToRelay::decode(&m.frame) {
                Ok(ClientToRelay::Msg(msg)) => Some(msg.from),
                _ => None,
            };
            // Its flight, if it is still in flight.
            let flight = self.awaiting_drain.remove(&(address, m.id)).or_else(|| {
                decoded.map(|from| (m.id, from)).filter(|k| {
                    self.flights
                        .get(k)
                        .is_some_and(|f| f.local(&address).is_some())
                })
            });
            let sender = flight.map(|k| k.1).or(decoded).unwrap_or(address);
            let mut holders = Vec::new();
            for &c in &receivers {
                let Some(s) = self.sessions.get_mut(&c) else {
                    continue;
                };
                if let std::collections::hash_map::Entry::Vacant(v) = s.handed.entry(m.id) {
                    v.insert(Handed {
                        flight,
                        stored: true,
                        sender,
                    });
                    self.send_conn(c, m.frame.clone(), false);
                }
                holders.push(c);
            }
            if let Some(key) = flight {
                if let Some(Recipient::Stored { conns }) = self
                    .flights
                    .get_mut(&key)
                    .and_then(|f| f.state_mut(&address))
                {
                    for c in holders {
                        if !conns.contains(&c) {
                            conns.push(c);
                        }
                    }
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
        let caught_up = !full && !writing && !committed && !dirty && !restart;
        if let Some(i) = self.by_address.get_mut(&address) {
            // No read on its way: a later one runs after every delete
            // polled so far.
            i.gone.retain(|_, del| *del == u64::MAX);
            i.phase = if caught_up {
                Phase::Live
            } else {
                Phase::Draining {
                    after: if restart { 0 } else { after },
                    reading: None,
                    dirty: false,
                    restart: false,
                }
            };
        }
        // Otherwise the next read starts now, or when the write lands.
        if !caught_up && !writing {
            self.read_next(address);
        }
        for key in touched {
            self.finish_if_settled(key);
        }
    }

    /// Sends the receipt (or FWD_RECEIPT) once every recipient is settled.
    pub(crate) fn finish_if_settled(&mut self, key: FlightKey) {
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
        // Stored here (a remote relay counts its own).
        let queued = f.entries().map_or(0, |e| {
            e.iter()
                .filter(|e| e.status == Status::Queued && self.known.contains(&e.to))
                .count()
        });
        self.stats.queued += queued as u64;
        if let (Some(to), Some(r)) = (f.resent, f.receipt(key.0)) {
            self.answer(to, r);
        }
        match f.reply {
            Reply::Client(_) | Reply::Part(_) => {
                self.local_ids.remove(&key.0);
                if let Some(r) = f.receipt(key.0) {
                    self.answer(f.reply, r);
                }
            }
            Reply::Relay(origin) => {
                let delivered = f.delivered();
                let entries = f.entries().unwrap_or_default();
                self.note_taken(key, &entries);
                self.reply_to_origin(origin, key.0, entries, delivered);
            }
            Reply::Handoff { to } => self.handoff_settled(key, to, &f),
        }
    }

    /// NOTICE DELIVERED to `sender`'s connection here, if any (best
    /// effort; PROTOCOL 5.10). A sender of another shard's is told through
    /// that shard (`poll_notice`).
    fn notify_delivered(&mut self, sender: Address, id: MsgId, to: Address) {
        if sender == to {
            return;
        }
        let frame = RelayToClient::Notice(Notice::Delivered { id, to }).encode();
        if crate::shard::shard_of(&sender, self.shard.1) != self.shard.0 {
            self.notices.push_back((sender, frame));
            return;
        }
        self.notice_to(sender, frame);
    }

    /// A notice for `address`'s sessions here (one another shard made).
    pub fn notice_to(&mut self, address: Address, frame: Bytes) {
        let Some(inbox) = self.by_address.get(&address) else {
            return;
        };
        let conns: Vec<ConnId> = inbox
            .receivers
            .iter()
            .chain(&inbox.senders)
            .copied()
            .collect();
        for conn in conns {
            self.send_conn(conn, frame.clone(), false);
        }
    }

    fn send_receipt(&mut self, conn: ConnId, r: Receipt) {
        *self.stats.receipts.entry(r.status as u8).or_default() += 1;
        // A connection of another shard's is not among this one's
        // sessions: the caller drops frames for connections gone.
        if self.sessions.contains_key(&conn) || self.shard.1 > 1 {
            self.send_conn(conn, RelayToClient::Receipt(r).encode(), false);
        }
    }

    /// The outcome of a client's message: its RECEIPT, or one part of it
    /// for the caller to merge (`poll_part`).
    fn answer(&mut self, to: Reply, r: Receipt) {
        match to {
            Reply::Client(conn) => self.send_receipt(conn, r),
            Reply::Part(conn) => self.parts.push_back((conn, r)),
            Reply::Relay(_) | Reply::Handoff { .. } => {}
        }
    }

    pub(crate) fn send_conn(&mut self, conn: ConnId, frame: Bytes, soft: bool) {
        self.transmits.push_back(Transmit {
            to: Target::Conn(conn),
            frame,
            soft,
        });
    }

    pub(crate) fn event(&mut self, e: Event) {
        if self.config.events {
            self.events.push_back(e);
        }
    }
}
