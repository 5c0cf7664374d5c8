//! The relay's shell around its core (`w2w_core::RelayCore`): every
//! decision about a message (local delivery, the store, receipts,
//! federation: link state, directory, FORWARD) is the core's; this module
//! feeds it inputs and carries out its outputs.
//!
//! * Inputs come from connection actors (`conn.rs`: registration, MSG, ACK,
//!   end), peer links (`peer.rs`), the store executor (answers) and one
//!   timer task. Each takes the one core lock, calls the core, and drains
//!   its outputs before letting go: frames go to the connections' and
//!   links' [`Outbox`]es (non-blocking), store ops to the store executor's
//!   bounded queue, closes to the outboxes. Nothing awaits under the lock.
//! * A frame an outbox cannot take closes that connection (slow consumer)
//!   and the core hears of the end at once, so it writes what it had handed
//!   over unacknowledged. A `soft` frame (broadcast copy) is skipped for a
//!   receiver that is behind.
//! * The store executor runs the core's store ops in order: a write is
//!   admitted against the store budgets (refused at once with the budget's
//!   code) and submitted to the store thread; a second task awaits the
//!   commits in order and answers the core. A read of a connection's
//!   backlog waits until that connection's send queue is under half full,
//!   so a backlog of any size flows without closing a slow reader.

/// Maps keyed by connection ids: aHash.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use w2w_core::flight::Reply;
use w2w_core::shard::{
    apply_spread, route_peer, shard_of, shard_of_answer, shard_of_group, split, Cores, Merge,
    Split, Spread,
};
use w2w_core::{
    Config as CoreConfig, ConnId, Event, FedConfig, GroupAsk, GroupOutcome, GroupQuestion, PeerId,
    RelayCore, Stats, StoreDone, StoreOp, Stored, Target, Targets,
};
use w2w_proto::frame::{
    Hosted, Msg, MsgId, Receipt, RelayToClient, RequestOp, Response, ResponseBody, Status,
};
use w2w_proto::group::{GroupInfo, GroupOp};
use w2w_proto::handshake::Registration;
use w2w_proto::s2s::{RegistrationProof, RelayToRelay};
use w2w_proto::{Address, ErrorCode, Identity};

use crate::metrics::Metrics;
use crate::router::Outbox;
use crate::store::{Outcome, Store, Write};

/// A client's frame for the core, queued by its connection until the end
/// of a read burst ([`Federation::handle_inputs`]).
pub enum Input {
    /// A MSG that passed the connection's checks (the frame as received
    /// and decoded); `group`: the members of a group of this relay (its
    /// group store resolved them), `None` for a group to look for across
    /// the federation.
    Msg {
        frame: Bytes,
        msg: Msg,
        group: Option<Result<Vec<Address>, ErrorCode>>,
    },
    Ack(Vec<MsgId>),
}

/// One shard's share of a connection's read burst.
enum Work {
    Msg {
        reply: Reply,
        frame: Bytes,
        msg: Msg,
        to: Targets,
    },
    Ack(Vec<MsgId>),
    /// A RECEIPT refusing a MSG before any shard saw it.
    Refuse(Receipt),
}

/// Most shards the default (`shards = 0`, one per CPU) makes: every shard
/// knows every connection's outbox (~24 bytes per connection per shard;
/// 8 shards keep an idle connection under 4 KiB, PERFORMANCE.md).
const AUTO_SHARDS: usize = 8;

/// Most split messages (a2g, groups and a2n on a sharded relay) whose
/// receipts are being joined, in all and per connection; past either one
/// is refused `rate_limited` (one connection cannot take them all; its
/// rate budget lets it send ~7,000 in the 5 s a part may wait).
const MAX_MERGING: usize = 65_536;
const MAX_MERGING_PER_CONN: usize = 4_096;

/// Federation settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Relay URLs to peer with (dialled, redialled with backoff).
    pub peers: Vec<String>,
    /// Relay keys admitted as peers. Empty: open admission (any relay that
    /// completes the handshake is registered as a peer).
    pub allow: Vec<Address>,
    /// Most links with trusted relays: dialled by us (`peers`) or on the
    /// allowlist; past it a relay is redirected to our peers (default 5).
    pub max_peers: usize,
    /// How long a relay started with `peers` that knows no other relay
    /// yet is *joining* (default 10 s): lookups wait for its first link and
    /// a message still waiting then ends `joining` (53), not `no_route`.
    pub join_grace_ms: u64,
    /// Fewest peer links this relay keeps once it knows other relays
    /// (default 3): below it, it dials a relay it learned from link state,
    /// one at a time, so one relay's death does not cut the federation in
    /// two (0: only the `peers` configured).
    pub min_peers: usize,
    /// Most links with relays on probation: open admission, inbound, not
    /// on the allowlist and not one we dial (default 3). They do not take
    /// trusted relays' slots.
    pub max_probation_peers: usize,
    /// New relays (link-state records) a peer on probation may introduce
    /// (default 16).
    pub probation_relays: usize,
    /// New addresses (directory records) a peer on probation may introduce
    /// (default 10,000).
    pub probation_records: usize,
    /// Most relays in the link-state database (default 10,000).
    pub max_relays: usize,
    /// Most addresses whose records this relay holds (default 1,000,000).
    pub max_directory: usize,
    /// Relays that hold each address's records (default 4; PROTOCOL
    /// 12.12): the reachable relays whose keys are closest to it.
    pub replicas: usize,
    /// How long a held record counts unless its relay renews it (default
    /// 120 s; renewed every third of that).
    pub lease_ms: u64,
    /// How long a lookup's answer is used (default 10 s).
    pub lookup_cache_ms: u64,
    /// Directory lookups each peer may ask of this relay per second
    /// (default 20,000).
    pub lookups_per_peer: u32,
    /// Directory lookups one client here may cause per second, by LOOKUPs
    /// or messages for addresses that must be looked up (default 1,000);
    /// past it: `rate_limited`.
    pub lookups_per_client: u32,
    /// Keep a client's message whose recipient's relay cannot be reached
    /// and hand it over when it can (default true; PROTOCOL 12.13).
    /// Messages stored for an address that moved to another relay follow
    /// it whatever this says.
    pub custody: bool,
    /// Most addresses with messages here waiting to move to another relay
    /// (custody and roaming; default 100,000).
    pub max_custody: usize,
    /// How often those are looked at again (default 2 s).
    pub handoff_retry_ms: u64,
    /// Most relay hops a message may take (default 16).
    pub hop_limit: u8,
    /// How long the origin waits for remote receipts (default 5 s).
    pub receipt_timeout_ms: u64,
    /// Remembered (message id, origin) pairs (default 100,000).
    pub seen_cache: usize,
    /// Bytes a peer link's send queue may hold (default 16 MiB).
    pub peer_queue_bytes: usize,
    /// How often a relay re-floods its link state (default 30 s).
    pub refresh_ms: u64,
    /// Idle time on a peer link before it is pinged (default 1 s): a peer
    /// that stops answering without closing its sockets (a hung process, a
    /// dead path) is noticed in `peer_ping_interval_ms` +
    /// `peer_ping_timeout_ms`, not in the clients' 25 s.
    pub peer_ping_interval_ms: u64,
    /// Time a peer has to answer a ping before its link is closed
    /// (default 2 s).
    pub peer_ping_timeout_ms: u64,
    /// Fan-out bytes per second one peer's broadcast FORWARDs may cost here
    /// (frame size times this relay's connections and peer links); past it
    /// they are dropped, and counted as `rate_limited` (default 16 MiB/s).
    pub peer_broadcast_bytes_per_sec: u64,
    /// Burst of the above (default 32 MiB).
    pub peer_broadcast_bytes_burst: u64,
    /// Store every a2a/a2b/a2g message durably before it is delivered or
    /// receipted (default true): nothing receipted is lost in a crash.
    /// False hands messages for connected recipients straight to their
    /// connection (faster; a crash can lose receipted, unacknowledged ones);
    /// offline recipients are still queued durably.
    pub durable_delivery: bool,
    /// Cores the relay's message state is split over (issue 13; 0, the
    /// default: one per CPU the relay may run on, at most 8): each address, its
    /// sessions, its directory records and the messages to it belong to
    /// one shard, each shard with its own lock, so that several CPUs
    /// decide about messages at once (w2w_core::shard).
    pub shards: usize,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            peers: Vec::new(),
            allow: Vec::new(),
            max_peers: 5,
            join_grace_ms: 10_000,
            min_peers: 3,
            max_probation_peers: 3,
            probation_relays: 16,
            probation_records: 10_000,
            max_relays: 10_000,
            max_directory: 1_000_000,
            replicas: 4,
            lease_ms: 120_000,
            lookup_cache_ms: 10_000,
            lookups_per_peer: 20_000,
            lookups_per_client: 1_000,
            custody: true,
            max_custody: 100_000,
            handoff_retry_ms: 2_000,
            hop_limit: 16,
            receipt_timeout_ms: 5000,
            seen_cache: 100_000,
            peer_queue_bytes: 16 << 20,
            refresh_ms: 30_000,
            peer_ping_interval_ms: 1_000,
            peer_ping_timeout_ms: 2_000,
            peer_broadcast_bytes_per_sec: 16 << 20,
            peer_broadcast_bytes_burst: 32 << 20,
            durable_delivery: true,
            shards: 0,
        }
    }
}

impl FederationConfig {
    pub fn admits(&self, relay: &Address) -> bool {
        self.allow.is_empty() || self.allow.contains(relay)
    }
}

/// What a relay did with a message, for `w2w demo` and debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HopEvent {
    /// A client handed the message to this relay.
    FromClient {
        relay: Address,
        id: MsgId,
        from: Address,
    },
    /// This relay forwarded it to a peer relay.
    ToPeer {
        relay: Address,
        id: MsgId,
        peer: Address,
    },
    /// This relay delivered it to a connected client.
    ToClient {
        relay: Address,
        id: MsgId,
        to: Address,
    },
}

/// Store ops waiting for the executor, and writes waiting for their commit
/// (each write is also bounded in bytes by the store budget).
const STORE_OPS: usize = 16_384;

struct Inner {
    core: RelayCore,
    /// Outboxes by connection id (clients and peer links share the ids).
    conns: HashMap<u64, Arc<Outbox>>,
    peers: HashMap<u64, Arc<Outbox>>,
    /// Counters already added to the metrics.
    exported: Stats,
}

/// Work about named groups the core hands the group table (`groups.rs`,
/// which keeps the groups and writes them to the store).
pub enum GroupWork {
    /// A client's create that no other relay hosts: apply it here.
    Create {
        outbox: Arc<Outbox>,
        req_id: u32,
        op: GroupOp,
    },
    /// Another relay asks about a group of this relay.
    Question(GroupQuestion),
    /// `address` sent a MSG to a group of another relay, charged one copy
    /// when it came: charge its fan-out budget `bytes` more.
    Charge { address: Address, bytes: u64 },
}

/// Group work waiting for the group task: bounded (the core bounds the
/// questions it passes on; creates come from clients' rate-limited
/// requests), dropped past it.
const GROUP_WORK: usize = 8192;

/// The core lock held, adding how long to a counter when let go: the
/// share of time it is held bounds what more cores can give the relay.
struct Held<'a> {
    guard: MutexGuard<'a, Inner>,
    since: Instant,
    total: &'a std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for Held<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let ns = self.since.elapsed().as_nanos() as u64;
        self.total.fetch_add(ns, Relaxed);
    }
}

/// One shard's share of the federation's gauges.
#[derive(Default)]
struct ShardGauges {
    known_addresses: std::sync::atomic::AtomicI64,
    custody_addresses: std::sync::atomic::AtomicI64,
    group_records: std::sync::atomic::AtomicI64,
    handed_off: std::sync::atomic::AtomicU64,
}

/// What one shard made for the others, handed on once its lock is let go.
#[derive(Default)]
struct ForOthers {
    notices: Vec<(Address, Bytes)>,
    spreads: Vec<Spread>,
}

/// The shards as [`apply_spread`] drives them: each taken in turn.
struct Each<'a>(&'a Federation);

impl Cores for Each<'_> {
    fn count(&self) -> usize {
        self.0.shards.len()
    }

    fn on<R>(&mut self, s: usize, f: impl FnOnce(&mut RelayCore, Instant) -> R) -> R {
        self.0.with_shard(s, |inner, now| f(&mut inner.core, now))
    }

    fn group_members(
        &mut self,
        conn: ConnId,
        frame: Bytes,
        msg: &Msg,
        members: Result<Vec<Address>, ErrorCode>,
    ) {
        let fed = self.0;
        let home = fed.shard_of(&msg.from);
        let mut by: Vec<Vec<Work>> = (0..fed.shards.len()).map(|_| Vec::new()).collect();
        fed.bucket_msg(conn, home, (frame, msg.clone(), Some(members)), &mut by);
        fed.apply_work(conn, by);
    }
}

/// The relay core and the outboxes its outputs go to.
pub struct Federation {
    me: Address,
    pub config: FederationConfig,
    /// The core, one per shard (w2w_core::shard). Every shard knows every
    /// connection's and peer link's outbox.
    shards: Vec<Mutex<Inner>>,
    /// Per shard: its directory, custody and group records and hand-offs
    /// (the metrics show their sums).
    gauges: Vec<ShardGauges>,
    /// Receipts of messages split across shards, being joined.
    merge: Mutex<Merge>,
    /// Most addresses in an a2g (the core's `max_group`).
    max_group: usize,
    group_work: Mutex<std::collections::VecDeque<GroupWork>>,
    group_notify: tokio::sync::Notify,
    store_tx: Mutex<Option<mpsc::Sender<StoreOp>>>,
    metrics: Arc<Metrics>,
    events: tokio::sync::broadcast::Sender<HopEvent>,
}

impl Federation {
    pub fn new(
        identity: Identity,
        config: FederationConfig,
        (max_group, max_sessions): (usize, usize),
        metrics: Arc<Metrics>,
    ) -> Self {
        let me = identity.address();
        let core_config = CoreConfig {
            receipt_timeout: Duration::from_millis(config.receipt_timeout_ms),
            max_group,
            max_sessions,
            session_grace: Duration::from_millis(250),
            read_batch: 64,
            durable: config.durable_delivery,
            events: false,
            hash_seed: rand::random(),
            federation: FedConfig {
                url: String::new(),
                allow: config.allow.clone(),
                max_peers: config.max_peers,
                max_probation_peers: config.max_probation_peers,
                probation_relays: config.probation_relays,
                probation_records: config.probation_records,
                max_relays: config.max_relays,
                max_directory: config.max_directory,
                hop_limit: config.hop_limit,
                seen_cache: config.seen_cache,
                seen_ttl: Duration::from_secs(120),
                check_signatures: true,
                replicas: config.replicas.max(1),
                lease: Duration::from_millis(config.lease_ms.max(1_000)),
                cache_ttl: Duration::from_millis(config.lookup_cache_ms),
                lookups_per_peer: config.lookups_per_peer,
                lookups_per_client: config.lookups_per_client,
                custody: config.custody,
                max_custody: config.max_custody,
                handoff_retry: Duration::from_millis(config.handoff_retry_ms.max(10)),
                ..FedConfig::default()
            },
        };
        let count = match config.shards {
            // One per CPU this process may run on (its affinity: a relay
            // pinned to one CPU runs one shard), at most `AUTO_SHARDS`.
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(AUTO_SHARDS)),
            n => n,
        };
        metrics.shards.store(count as i64, Relaxed);
        let wide = Arc::new(w2w_core::shard::RelayWide::default());
        let shards = (0..count)
            .map(|i| {
                // Link-state records are numbered from the wall clock, so a
                // restarted relay's records supersede the ones it sent
                // before.
                let mut core =
                    RelayCore::new(core_config.clone(), identity.clone(), crate::unix_ms(), []);
                if count > 1 {
                    core.set_shard(i, count);
                    core.share(wide.clone());
                }
                // Registrations are ordered between relays by relay clocks.
                core.set_clock(Instant::now(), crate::unix_ms());
                if !config.peers.is_empty() {
                    // Until a first link brings another relay, lookups wait
                    // (and end `joining`, not `no_route`): PROTOCOL 12.12.
                    core.expect_peers(Instant::now() + Duration::from_millis(config.join_grace_ms));
                }
                Mutex::new(Inner {
                    core,
                    conns: HashMap::default(),
                    peers: HashMap::default(),
                    exported: Stats::default(),
                })
            })
            .collect();
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Federation {
            me,
            config,
            gauges: (0..count).map(|_| ShardGauges::default()).collect(),
            shards,
            merge: Mutex::new(Merge::default()),
            max_group,
            store_tx: Mutex::new(None),
            group_work: Mutex::new(Default::default()),
            group_notify: tokio::sync::Notify::new(),
            metrics,
            events,
        }
    }

    /// How many shards the core is split over.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard of `address`.
    fn shard_of(&self, address: &Address) -> usize {
        shard_of(address, self.shards.len())
    }

    /// Shard `s`'s lock, timed (`w2w_core_lock_seconds_total` adds up the
    /// shards' times).
    fn lock(&self, s: usize) -> Held<'_> {
        let guard = self.shards[s].lock().unwrap_or_else(|e| e.into_inner());
        Held {
            guard,
            since: Instant::now(),
            total: &self.metrics.core_lock_ns,
        }
    }

    /// Runs `f` on shard `s`'s core, then carries out everything it asked
    /// for. `f` is given the time the lock was taken: inputs reach the
    /// core in time order, and the clock is read once. Notices for senders
    /// of other shards are handed on after the lock is let go (no two
    /// shard locks are ever held at once).
    fn with_shard<R>(&self, s: usize, f: impl FnOnce(&mut Inner, Instant) -> R) -> R {
        let mut guard = self.lock(s);
        let now = guard.since;
        let inner = &mut *guard;
        inner.core.set_events(self.events.receiver_count() > 0);
        let r = f(inner, now);
        let others = self.drain(s, inner);
        drop(guard);
        self.hand_on(s, others);
        r
    }

    /// [`Self::with_shard`] on every shard in turn; shard 0's result.
    fn with_each<R>(&self, mut f: impl FnMut(&mut Inner, Instant) -> R) -> R {
        let first = self.with_shard(0, &mut f);
        for s in 1..self.shards.len() {
            self.with_shard(s, &mut f);
        }
        first
    }

    /// Gives each notice to its sender's shard, and carries out the work
    /// shard `s` made for others.
    fn hand_on(&self, s: usize, others: ForOthers) {
        for (address, frame) in others.notices {
            let t = self.shard_of(&address);
            self.with_shard(t, |inner, _| inner.core.notice_to(address, frame));
        }
        for spread in others.spreads {
            apply_spread(&mut Each(self), s, spread);
        }
    }

    /// Carries out shard `s`'s outputs until it has none (an end or a
    /// refusal fed back as an input may make more); returns what it made
    /// for other shards.
    fn drain(&self, s: usize, inner: &mut Inner) -> ForOthers {
        let mut others = ForOthers::default();
        loop {
            while let Some((conn, part)) = inner.core.poll_part() {
                let merged = {
                    let mut merge = self.merge.lock().unwrap_or_else(|e| e.into_inner());
                    let r = merge.part(conn, s, part);
                    self.metrics.merging.store(merge.len() as i64, Relaxed);
                    r
                };
                if let (Some(r), Some(outbox)) = (merged, inner.conns.get(&conn.0)) {
                    self.metrics.receipt(r.status);
                    let _ = outbox.try_enqueue(RelayToClient::Receipt(r).encode());
                }
            }
            while let Some(n) = inner.core.poll_notice() {
                others.notices.push(n);
            }
            while let Some(spread) = inner.core.poll_spread() {
                others.spreads.push(spread);
            }
            let mut ended = Vec::new();
            while let Some(t) = inner.core.poll_transmit() {
                let (outbox, conn) = match t.to {
                    Target::Conn(c) => (inner.conns.get(&c.0), Some(c)),
                    Target::Peer(p) => (inner.peers.get(&p.0), None),
                };
                let Some(outbox) = outbox else { continue };
                if t.soft {
                    outbox.try_enqueue_soft(t.frame);
                } else if outbox.try_enqueue(t.frame).is_err() {
                    // The outbox closed itself (slow consumer): the core
                    // hears of it now, so nothing more is handed to it. A
                    // peer link's end comes from its actor.
                    if let Some(c) = conn {
                        ended.push(c);
                    }
                }
            }
            let mut answers = Vec::new();
            while let Some(op) = inner.core.poll_store() {
                if let Some(done) = self.submit(op) {
                    answers.push(done);
                }
            }
            while let Some((c, code)) = inner.core.poll_close() {
                if let Some(o) = inner.conns.get(&c.0) {
                    o.close(code);
                }
                ended.push(c);
            }
            while let Some((c, req_id, found)) = inner.core.poll_lookup_answer() {
                let Some(outbox) = inner.conns.get(&c.0) else {
                    continue;
                };
                let hosted = found.map(|(relay_key, relay_url)| Hosted {
                    relay_key,
                    relay_url,
                });
                let resp = RelayToClient::Response(Response {
                    req_id,
                    op: RequestOp::LOOKUP,
                    result: Ok(ResponseBody::Lookup(hosted)),
                });
                let _ = outbox.try_enqueue(resp.encode());
            }
            self.drain_groups(inner);
            while let Some(e) = inner.core.poll_event() {
                let relay = self.me;
                let _ = self.events.send(match e {
                    Event::FromClient { id, from } => HopEvent::FromClient { relay, id, from },
                    Event::ToPeer { id, peer } => HopEvent::ToPeer { relay, id, peer },
                    Event::ToClient { id, to } => HopEvent::ToClient { relay, id, to },
                });
            }
            if ended.is_empty() && answers.is_empty() {
                break;
            }
            let now = Instant::now();
            for c in ended {
                if inner.conns.remove(&c.0).is_some() {
                    inner.core.disconnect(now, c);
                }
            }
            for done in answers {
                inner.core.store_done(now, done);
            }
        }
        self.export(s, inner);
        others
    }

    /// Hands a store op to the executor; one it cannot take is answered at
    /// once (`store_busy`).
    fn submit(&self, op: StoreOp) -> Option<StoreDone> {
        let tx = self
            .store_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let refused = |op: &StoreOp, code: ErrorCode| match op {
            StoreOp::Enqueue { token, .. } => Some(StoreDone::Enqueued {
                token: *token,
                result: Err(code),
            }),
            StoreOp::Read { token, .. } => Some(StoreDone::Read {
                token: *token,
                result: Err(code),
            }),
            StoreOp::Dequeue { .. } => None,
        };
        let Some(tx) = tx else {
            return refused(&op, ErrorCode::Internal);
        };
        match tx.try_send(op) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(op)) => refused(&op, ErrorCode::StoreBusy),
            Err(mpsc::error::TrySendError::Closed(op)) => refused(&op, ErrorCode::Internal),
        }
    }

    /// Adds what the core counted since last time to the metrics (no
    /// allocation: per message this is a few comparisons).
    fn export(&self, shard: usize, inner: &mut Inner) {
        let m = &self.metrics;
        if shard == 0 {
            // Every shard has the same links.
            m.peer_links.store(inner.core.peer_count() as i64, Relaxed);
            m.known_relays
                .store(inner.core.reachable_count() as i64, Relaxed);
        }
        // Each shard holds its addresses' records: the metrics show sums,
        // added up again only when this shard's figure moved.
        let g = &self.gauges[shard];
        let mut moved = false;
        // (Written only when changed: this runs after every burst.)
        let mut set = |gauge: &std::sync::atomic::AtomicI64, v: usize| {
            if gauge.load(Relaxed) != v as i64 {
                gauge.store(v as i64, Relaxed);
                moved = true;
            }
        };
        set(&g.known_addresses, inner.core.directory_len());
        set(&g.custody_addresses, inner.core.custody_len());
        set(&g.group_records, inner.core.group_records());
        let handed = inner.core.stats().handed_off;
        if g.handed_off.load(Relaxed) != handed {
            g.handed_off.store(handed, Relaxed);
            moved = true;
        }
        if moved {
            let sum = |f: fn(&ShardGauges) -> i64| self.gauges.iter().map(f).sum::<i64>();
            m.known_addresses
                .store(sum(|g| g.known_addresses.load(Relaxed)), Relaxed);
            m.custody_addresses
                .store(sum(|g| g.custody_addresses.load(Relaxed)), Relaxed);
            m.group_records
                .store(sum(|g| g.group_records.load(Relaxed)), Relaxed);
            let handed: u64 = self.gauges.iter().map(|g| g.handed_off.load(Relaxed)).sum();
            m.handed_off.store(handed, Relaxed);
        }
        let s = inner.core.stats();
        let old = &mut inner.exported;
        // Shared counters are touched only when they move (an atomic add
        // of nothing still takes the cache line from the other CPUs).
        let add = |counter: &std::sync::atomic::AtomicU64, new: u64, old: &mut u64| {
            if new > *old {
                counter.fetch_add(new - *old, Relaxed);
                *old = new;
            }
        };
        add(&m.resends_joined, s.resends_joined, &mut old.resends_joined);
        add(&m.forwarded, s.forwarded, &mut old.forwarded);
        add(
            &m.records_refused,
            s.records_refused,
            &mut old.records_refused,
        );
        add(&m.queued_total, s.queued, &mut old.queued);
        for (code, n) in &s.errors {
            let before = old.errors.entry(*code).or_default();
            if let Some(c) = ErrorCode::from_u16(*code) {
                (*before..*n).for_each(|_| m.error(c));
            }
            *before = *n;
        }
        for (status, n) in &s.receipts {
            let before = old.receipts.entry(*status).or_default();
            if let Some(st) = Status::from_u8(*status) {
                (*before..*n).for_each(|_| m.receipt(st));
            }
            *before = *n;
        }
    }

    // ------------------------------------------------------------ wiring

    /// Starts the store executor (see the module docs); its tasks end at
    /// `shutdown`.
    pub fn attach_store(
        self: &Arc<Self>,
        store: Store,
        queue_ttl_ms: u64,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let (tx, rx) = mpsc::channel(STORE_OPS);
        *self.store_tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        // Commits are awaited in submission order by a second task, so the
        // store thread can commit whatever accumulated in one transaction.
        let (commit_tx, commit_rx) = mpsc::channel(STORE_OPS);
        let executor = Executor {
            fed: self.clone(),
            store,
            queue_ttl_ms,
            commits: commit_tx,
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        };
        tracker.spawn(executor.run(rx));
        tracker.spawn(await_commits(self.clone(), commit_rx, shutdown));
    }

    /// Addresses that registered here before (loaded at start).
    pub fn add_known(&self, addrs: impl IntoIterator<Item = Address>) {
        let mut by: Vec<Vec<Address>> = vec![Vec::new(); self.shards.len()];
        for a in addrs {
            by[self.shard_of(&a)].push(a);
        }
        for (s, addrs) in by.into_iter().enumerate() {
            self.lock(s).core.add_known(addrs);
        }
    }

    /// Directory records for the addresses that registered here before a
    /// restart (their latest registrations, from the store).
    pub fn restore_records(&self, proofs: Vec<RegistrationProof>) {
        let mut by: Vec<Vec<RegistrationProof>> = vec![Vec::new(); self.shards.len()];
        for p in proofs {
            by[self.shard_of(&p.address)].push(p);
        }
        for (s, proofs) in by.into_iter().enumerate() {
            self.with_shard(s, |inner, _| inner.core.restore_records(proofs));
        }
    }

    /// Addresses with messages here that never registered here (from the
    /// store at start): handed over once their relays can be reached.
    pub fn add_custody(&self, addrs: Vec<Address>) {
        let count = self.shards.len();
        for (s, addrs) in w2w_core::shard::by_shard(addrs, count) {
            self.with_shard(s, |inner, _| inner.core.add_custody(addrs));
        }
    }

    /// The custody bound (`max_custody`, shared out among the shards).
    pub fn max_custody(&self) -> usize {
        (0..self.shards.len())
            .map(|s| self.lock(s).core.max_custody())
            .sum()
    }

    /// Forgets addresses whose registrations the store dropped (gone
    /// longer than the queue's time to live, nothing queued). A connected
    /// address is kept.
    pub fn forget(&self, addrs: &[Address]) {
        for s in 0..self.shards.len() {
            let mine: Vec<Address> = addrs
                .iter()
                .copied()
                .filter(|a| self.shard_of(a) == s)
                .collect();
            self.with_shard(s, |inner, _| inner.core.forget(&mine));
        }
    }

    /// Sets the URL this relay advertises in its link state.
    pub fn set_url(&self, url: String) {
        self.with_each(|inner, _| inner.core.set_url(url.clone()));
    }

    /// Hop events, for `w2w demo`.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<HopEvent> {
        self.events.subscribe()
    }

    // ------------------------------------------------------- connections

    /// A client completed registration; from now on messages for it go to
    /// `outbox` (its stored backlog first) if it takes deliveries
    /// (`receive`), and its presence is published. `Err`: refused (too
    /// many sessions), nothing changed.
    pub fn connect(
        &self,
        outbox: &Arc<Outbox>,
        reg: &Registration,
        receive: bool,
    ) -> Result<(), ErrorCode> {
        let proof = RegistrationProof {
            address: reg.address,
            relay_key: reg.relay_key,
            relay_nonce: reg.relay_nonce,
            client_nonce: reg.client_nonce,
            timestamp_ms: reg.timestamp_ms,
            url: reg.url.clone(),
            sig_a: reg.sig_a,
        };
        let home = self.shard_of(&reg.address);
        // Every shard may have a receipt or notice for it.
        for s in (0..self.shards.len()).filter(|s| *s != home) {
            self.lock(s).conns.insert(outbox.conn_id, outbox.clone());
        }
        let r = self.with_shard(home, |inner, now| {
            let conn = ConnId(outbox.conn_id);
            inner
                .core
                .connect(now, conn, reg.address, Some(proof), receive)?;
            inner.conns.insert(outbox.conn_id, outbox.clone());
            Ok(())
        });
        if r.is_err() {
            self.forget_conn(outbox.conn_id, home);
        }
        r
    }

    /// Removes a connection from the shards other than `home`.
    fn forget_conn(&self, conn_id: u64, home: usize) {
        for s in (0..self.shards.len()).filter(|s| *s != home) {
            self.lock(s).conns.remove(&conn_id);
        }
        let mut merge = self.merge.lock().unwrap_or_else(|e| e.into_inner());
        merge.forget(ConnId(conn_id));
        self.metrics.merging.store(merge.len() as i64, Relaxed);
    }

    /// Closes every other session of `outbox`'s address; returns how many.
    pub fn exclusive(&self, outbox: &Outbox) -> u32 {
        let home = self.shard_of(&outbox.address);
        self.with_shard(home, |inner, now| {
            inner.core.exclusive(now, ConnId(outbox.conn_id))
        })
    }

    /// A client connection ended (or was closed).
    pub fn disconnect(&self, outbox: &Outbox) {
        let home = self.shard_of(&outbox.address);
        let conn_id = outbox.conn_id;
        self.with_shard(home, |inner, now| {
            if inner.conns.remove(&conn_id).is_some() {
                inner.core.disconnect(now, ConnId(conn_id));
            }
        });
        self.forget_conn(conn_id, home);
    }

    /// A client connection's MSGs and ACKs read in one burst. Each goes to
    /// its shard (a MSG to its recipients', split if they are in several;
    /// an ACK to the connection's own), in order per shard, under one
    /// taking of each shard's lock (one drain of its outputs).
    pub fn handle_inputs(&self, outbox: &Outbox, inputs: Vec<Input>) {
        if inputs.is_empty() {
            return;
        }
        let conn = ConnId(outbox.conn_id);
        let count = self.shards.len();
        let home = self.shard_of(&outbox.address);
        let mut by: Vec<Vec<Work>> = (0..count)
            .map(|s| Vec::with_capacity(if s == home { inputs.len() } else { 0 }))
            .collect();
        for input in inputs {
            match input {
                Input::Ack(ids) => by[home].push(Work::Ack(ids)),
                Input::Msg { msg, .. } if msg.from != outbox.address => {
                    let r = w2w_core::shard::refusal(msg.id, ErrorCode::SpoofedSender);
                    by[home].push(Work::Refuse(r));
                }
                Input::Msg { frame, msg, group } => {
                    self.bucket_msg(conn, home, (frame, msg, group), &mut by)
                }
            }
        }
        self.apply_work(conn, by);
    }

    /// Puts a client's MSG (its sender checked) into the buckets of the
    /// shards it goes to (`home`: its sender's), split if its recipients
    /// are in several.
    fn bucket_msg(
        &self,
        conn: ConnId,
        home: usize,
        (frame, msg, group): (Bytes, Msg, Option<Result<Vec<Address>, ErrorCode>>),
        by: &mut [Vec<Work>],
    ) {
        match split(&msg, group, self.max_group, self.shards.len()) {
            Split::Refused(r) => by[home].push(Work::Refuse(r)),
            Split::Whole(s, to) => by[s].push(Work::Msg {
                reply: Reply::Client(conn),
                frame,
                msg,
                to,
            }),
            Split::Parts { parts, order } => {
                let mut merge = self.merge.lock().unwrap_or_else(|e| e.into_inner());
                match merge.frame(conn, msg.id) {
                    // Sent again on this connection: the merged receipt
                    // answers both.
                    Some(f) if *f == frame => return,
                    Some(_) => {
                        let r = w2w_core::shard::refusal(msg.id, ErrorCode::Duplicate);
                        return by[home].push(Work::Refuse(r));
                    }
                    None if merge.len() >= MAX_MERGING
                        || merge.of(conn) >= MAX_MERGING_PER_CONN =>
                    {
                        let r = w2w_core::shard::refusal(msg.id, ErrorCode::RateLimited);
                        return by[home].push(Work::Refuse(r));
                    }
                    None => {
                        merge.expect(conn, &msg, &frame, &parts, order);
                        self.metrics.merging.store(merge.len() as i64, Relaxed);
                    }
                }
                drop(merge);
                for (s, to) in parts {
                    by[s].push(Work::Msg {
                        reply: Reply::Part(conn),
                        frame: frame.clone(),
                        msg: msg.clone(),
                        to,
                    });
                }
            }
        }
    }

    /// Applies each shard's bucket of `conn`'s work under one taking of
    /// its lock.
    fn apply_work(&self, conn: ConnId, by: Vec<Vec<Work>>) {
        for (s, work) in by.into_iter().enumerate() {
            if work.is_empty() {
                continue;
            }
            self.with_shard(s, |inner, now| {
                for w in work {
                    match w {
                        Work::Msg {
                            reply,
                            frame,
                            msg,
                            to,
                        } => inner.core.handle_part(now, reply, frame, &msg, to),
                        Work::Ack(ids) => inner.core.handle_ack(now, conn, &ids),
                        Work::Refuse(r) => {
                            // Counted as the core counts its refusals.
                            if let Some(code) = ErrorCode::from_u16(r.reason) {
                                self.metrics.error(code);
                            }
                            self.metrics.receipt(r.status);
                            if let Some(outbox) = inner.conns.get(&conn.0) {
                                let _ = outbox.try_enqueue(RelayToClient::Receipt(r).encode());
                            }
                        }
                    }
                }
            });
        }
    }

    /// Applies deadlines that passed (the timer task calls it).
    pub fn tick(&self) {
        for s in 0..self.shards.len() {
            self.with_shard(s, |inner, now| inner.core.handle_timeout(now));
        }
    }

    /// When [`Self::tick`] is next due.
    pub fn next_tick(&self) -> Option<Instant> {
        (0..self.shards.len())
            .filter_map(|s| self.lock(s).core.poll_timeout())
            .min()
    }

    // ------------------------------------------------------------- peers

    /// Registers a peer link (`dialled`: we dialled it). Returns whether it
    /// is trusted.
    pub fn peer_up(
        &self,
        key: Address,
        url: String,
        outbox: Arc<Outbox>,
        dialled: bool,
    ) -> Result<bool, ErrorCode> {
        // Every shard has the link (each sends on it); they agree on
        // whether it is taken.
        let id = outbox.conn_id;
        let r = self.with_shard(0, |inner, _| {
            inner.peers.insert(id, outbox.clone());
            let r = inner.core.peer_up(PeerId(id), key, url.clone(), dialled);
            if r.is_err() {
                inner.peers.remove(&id);
            }
            r
        });
        if r.is_ok() {
            for s in 1..self.shards.len() {
                self.with_shard(s, |inner, _| {
                    inner.peers.insert(id, outbox.clone());
                    let _ = inner.core.peer_up(PeerId(id), key, url.clone(), dialled);
                });
            }
        }
        r
    }

    /// Removes a peer link.
    pub fn peer_down(&self, conn_id: u64) {
        self.with_each(|inner, _| {
            if inner.peers.remove(&conn_id).is_some() {
                inner.core.peer_down(PeerId(conn_id));
            }
        });
    }

    /// A peer link's frames of one read burst: each to its shards
    /// ([`route_peer`]), in order per shard, under one taking of each
    /// shard's lock.
    pub fn on_frames(&self, conn_id: u64, frames: Vec<RelayToRelay>) {
        if frames.is_empty() {
            return;
        }
        let count = self.shards.len();
        let mut by: Vec<Vec<RelayToRelay>> = (0..count).map(|_| Vec::new()).collect();
        for frame in frames {
            for (s, f) in route_peer(&self.me, frame, count) {
                by[s].push(f);
            }
        }
        for (s, frames) in by.into_iter().enumerate() {
            if frames.is_empty() {
                continue;
            }
            self.with_shard(s, |inner, now| {
                for frame in frames {
                    inner.core.handle_peer_frame(now, PeerId(conn_id), frame);
                }
            });
        }
    }

    /// We reached relay `key` by dialling a configured URL: its link is
    /// trusted from now on, whichever side made it. Returns the outbox of a
    /// link that was on probation until now.
    pub fn dialled_key(&self, key: Address) -> Option<Arc<Outbox>> {
        self.with_each(|inner, _| {
            let id = inner.core.dialled_key(key)?;
            inner.peers.get(&id.0).cloned()
        })
    }

    /// Re-signs and floods our link state (called periodically).
    pub fn refresh(&self) {
        self.with_each(|inner, _| inner.core.refresh());
    }

    // ----------------------------------------------------------- queries

    pub fn peer_count(&self) -> usize {
        self.lock(0).core.peer_count()
    }

    /// (peer key, peer URL) of every current link.
    pub fn peers(&self) -> Vec<(Address, String)> {
        let inner = self.lock(0);
        let peers = inner.core.peers();
        peers.into_iter().map(|(k, url, _)| (k, url)).collect()
    }

    /// Relays reachable from here.
    pub fn reachable(&self) -> Vec<Address> {
        self.lock(0).core.reachable()
    }

    pub fn directory_len(&self) -> usize {
        (0..self.shards.len())
            .map(|s| self.lock(s).core.directory_len())
            .sum()
    }

    /// Messages in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        (0..self.shards.len())
            .map(|s| self.lock(s).core.in_flight())
            .sum()
    }

    /// URLs of our peers, for a REDIRECT.
    pub fn redirect_urls(&self) -> Vec<String> {
        self.lock(0).core.redirect_urls()
    }

    /// Relays known from link state, with a URL, not linked to us.
    pub fn unlinked_relays(&self) -> Vec<(Address, String)> {
        self.lock(0).core.unlinked_relays()
    }

    /// Which relay hosts `address` (a client's LOOKUP `req_id` on
    /// connection `conn_id`): `Some` if known now; `None` if the relays
    /// that hold its records are asked first (PROTOCOL 12.12), and the
    /// RESPONSE is queued on the connection when they answer.
    /// `Err`: the client is past `lookups_per_client`.
    pub fn lookup(
        &self,
        outbox: &Outbox,
        req_id: u32,
        address: &Address,
    ) -> Result<Option<Option<Hosted>>, ErrorCode> {
        // Its sessions and records are in its shard.
        let s = self.shard_of(address);
        let asker = (ConnId(outbox.conn_id), outbox.address);
        let found = self.with_shard(s, |inner, now| {
            inner.core.lookup_request(now, asker, req_id, *address)
        })?;
        Ok(found.map(|f| {
            f.map(|(relay_key, relay_url)| Hosted {
                relay_key,
                relay_url,
            })
        }))
    }

    // ------------------------------------------------------------ groups

    /// Answers for clients' group requests go to their connections; creates
    /// and other relays' questions to the group task.
    fn drain_groups(&self, inner: &mut Inner) {
        let mut work = Vec::new();
        while let Some(o) = inner.core.poll_group_outcome() {
            match o {
                GroupOutcome::Answer {
                    conn,
                    req_id,
                    op,
                    result,
                } => {
                    let Some(outbox) = inner.conns.get(&conn.0) else {
                        continue;
                    };
                    let result = result.map(ResponseBody::Group).map_err(|c| c.as_u16());
                    let resp = RelayToClient::Response(Response { req_id, op, result });
                    let _ = outbox.try_enqueue(resp.encode());
                }
                GroupOutcome::Create { conn, req_id, op } => {
                    if let Some(outbox) = inner.conns.get(&conn.0) {
                        let outbox = outbox.clone();
                        work.push(GroupWork::Create { outbox, req_id, op });
                    }
                }
                GroupOutcome::Fanout {
                    conn,
                    copies,
                    bytes,
                } => {
                    if let (Some(outbox), true) = (inner.conns.get(&conn.0), copies > 1) {
                        let bytes = (bytes * (copies - 1)) as u64;
                        let address = outbox.address;
                        work.push(GroupWork::Charge { address, bytes });
                    }
                }
            }
        }
        while let Some(q) = inner.core.poll_group_question() {
            work.push(GroupWork::Question(q));
        }
        if work.is_empty() {
            return;
        }
        let mut queue = self.group_work.lock().unwrap_or_else(|e| e.into_inner());
        for w in work {
            if queue.len() < GROUP_WORK {
                queue.push_back(w);
            }
        }
        drop(queue);
        self.group_notify.notify_one();
    }

    /// The next piece of group work (waits for one).
    pub async fn next_group_work(&self) -> GroupWork {
        loop {
            let notified = self.group_notify.notified();
            if let Some(w) = self
                .group_work
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            {
                return w;
            }
            notified.await;
        }
    }

    /// A client's request about group `name`, which this relay does not
    /// host: answered on its connection once the group's relay answers
    /// (a create: applied here if no relay hosts the name).
    pub fn group_request(&self, outbox: &Outbox, req_id: u32, name: &str, ask: GroupAsk) {
        let s = shard_of_group(name, self.shards.len());
        let asker = (ConnId(outbox.conn_id), outbox.address);
        self.with_shard(s, |inner, now| {
            inner.core.group_request(now, asker, req_id, name, ask)
        });
    }

    /// Group `name` is hosted here (`created` now, or restored at start):
    /// its record is published where other relays look for it.
    pub fn host_group(&self, name: &str, created: bool) {
        let s = shard_of_group(name, self.shards.len());
        self.with_shard(s, |inner, now| inner.core.host_group(now, name, created));
    }

    /// The group task's answer to another relay's question.
    pub fn group_reply(
        &self,
        origin: Address,
        nonce: u64,
        name: &str,
        result: Result<GroupInfo, ErrorCode>,
    ) {
        let s = shard_of_group(name, self.shards.len());
        self.with_shard(s, |inner, now| {
            inner.core.group_reply(now, origin, nonce, name, result)
        });
    }

    /// Answers one of the core's store ops (from the executor).
    fn store_done(&self, done: StoreDone) {
        let s = shard_of_answer(&done, self.shards.len());
        self.with_shard(s, |inner, now| inner.core.store_done(now, done));
    }

    /// The outboxes of `address`'s receiving sessions (for pacing its
    /// backlog reads).
    fn outboxes_of(&self, address: &Address) -> Vec<Arc<Outbox>> {
        let inner = self.lock(self.shard_of(address));
        inner
            .core
            .receivers_of(address)
            .iter()
            .filter_map(|c| inner.conns.get(&c.0).cloned())
            .collect()
    }
}

/// A write submitted to the store thread, its commit awaited in order.
struct Commit {
    token: w2w_core::Token,
    wait: Result<tokio::sync::oneshot::Receiver<Result<Outcome, String>>, crate::store::StoreError>,
}

/// Runs the core's store ops in order (see the module docs).
struct Executor {
    fed: Arc<Federation>,
    store: Store,
    queue_ttl_ms: u64,
    commits: mpsc::Sender<Commit>,
    tracker: tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Executor {
    async fn run(self, mut rx: mpsc::Receiver<StoreOp>) {
        loop {
            let op = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                op = rx.recv() => match op { Some(op) => op, None => break },
            };
            let go_on = match op {
                StoreOp::Enqueue {
                    token,
                    recipient,
                    sender,
                    id,
                    frame,
                } => self.enqueue(token, recipient, sender, id, frame).await,
                StoreOp::Dequeue { recipient, id } => {
                    let w = Write::Dequeue { recipient, id };
                    self.store.write_later(w).await.is_ok()
                }
                StoreOp::Read {
                    token,
                    recipient,
                    after,
                    limit,
                } => {
                    self.read(token, recipient, after, limit);
                    true
                }
            };
            if !go_on {
                break;
            }
        }
    }

    /// Admits a write against the store budgets and submits it; false once
    /// the commit waiter is gone (shutdown).
    async fn enqueue(
        &self,
        token: w2w_core::Token,
        recipient: Address,
        sender: Address,
        id: MsgId,
        frame: Bytes,
    ) -> bool {
        let len = frame.len();
        let admitted = self.store.budget().admit(&sender, &[recipient], len);
        if let Some(Err(code)) = admitted.into_iter().next() {
            self.fed.store_done(StoreDone::Enqueued {
                token,
                result: Err(code),
            });
            return true;
        }
        let now = crate::unix_ms();
        let w = Write::Enqueue {
            recipient,
            sender,
            id,
            frame,
            queued_ms: now,
            expires_ms: now.saturating_add(self.queue_ttl_ms),
        };
        self.fed.metrics.stored_total.fetch_add(1, Relaxed);
        let wait = self.store.submit(w).await;
        if wait.is_err() {
            self.store.budget().released(&sender, &recipient, len);
        }
        self.commits.send(Commit { token, wait }).await.is_ok()
    }

    /// Reads a connection's backlog once its send queue is under half full
    /// (its own task, so other ops do not wait behind a slow reader).
    fn read(&self, token: w2w_core::Token, recipient: Address, after: i64, limit: usize) {
        let (fed, store) = (self.fed.clone(), self.store.clone());
        let stop = self.shutdown.clone();
        self.tracker.spawn(async move {
            for o in fed.outboxes_of(&recipient) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = o.room_below(o.max_bytes() / 2) => {}
                }
            }
            let result = match store.queued(recipient, after, limit).await {
                Ok(rows) => Ok(rows
                    .into_iter()
                    .map(|m| Stored {
                        seq: m.seq,
                        id: m.id,
                        frame: m.frame,
                    })
                    .collect()),
                Err(e) => {
                    tracing::error!(error = %e, "reading the queue");
                    Err(ErrorCode::Internal)
                }
            };
            fed.store_done(StoreDone::Read { token, result });
        });
    }
}

/// Awaits each write's commit in order and answers the core.
async fn await_commits(
    fed: Arc<Federation>,
    mut rx: mpsc::Receiver<Commit>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let c = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = rx.recv() => match c { Some(c) => c, None => break },
        };
        let outcome = match c.wait {
            Ok(rx) => rx.await.unwrap_or_else(|_| Err("store stopped".into())),
            Err(e) => Err(e.to_string()),
        };
        let result = match outcome {
            Ok(Outcome::Done | Outcome::AlreadyStored) => Ok(()),
            Ok(Outcome::Duplicate) => Err(ErrorCode::Duplicate),
            Err(e) => {
                tracing::error!(error = %e, "storing a message failed");
                Err(ErrorCode::Internal)
            }
        };
        fed.store_done(StoreDone::Enqueued {
            token: c.token,
            result,
        });
    }
}
