//! Federation: relays joined into one network.
//!
//! Routing is link-state over relays plus a signed address directory (see
//! `w2w_proto::s2s`). Every relay floods its signed peer list; each relay
//! runs BFS over the two-way edges to get the next hop toward every other
//! relay, so paths are shortest and loop-free once records have spread. The
//! directory maps an address to the relay it registered with, proven by the
//! client's own sigA and countersigned by that relay.
//!
//! A message for a remote address is wrapped in FORWARD and sent to the next
//! hop toward the recipient's relay; that relay delivers and sends a
//! FWD_RECEIPT back toward the origin, which answers the sender. Loops and
//! duplicates are stopped three ways: a bounded seen-cache of (message id,
//! origin), a hop limit, and never forwarding a message back to the peer it
//! came from. Federation-wide a2n floods to every peer but the one it came
//! from; the seen-cache makes each relay deliver it once.
//!
//! All state sits behind one mutex held only for map updates and
//! non-blocking `try_enqueue` calls, never across an await.

/// Maps keyed by addresses and message ids on the hot path: aHash (keyed
/// per process, so still resistant to chosen-key flooding) instead of SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<T> = std::collections::HashSet<T, ahash::RandomState>;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use w2w_proto::frame::{
    ClientToRelay, Dest, Hosted, Msg, MsgId, Receipt, ReceiptEntry, RelayToClient, Scope, Status,
};
use w2w_proto::handshake::Registration;
use w2w_proto::s2s::{
    Forward, ForwardTarget, FwdReceipt, LinkState, Presence, RegistrationProof, RelayToRelay,
};
use w2w_proto::{Address, ErrorCode, Identity};

use w2w_core::flight::{delivered_count, entry, summarize};
use w2w_core::routing::LinkStates;
use w2w_core::seen::{digest, forward_digest, SeenCache};

use crate::budget::StoreBudget;
use crate::metrics::Metrics;
use crate::router::{Outbox, Router};

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
    /// Most addresses in the directory (default 1,000,000).
    pub max_directory: usize,
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
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            peers: Vec::new(),
            allow: Vec::new(),
            max_peers: 5,
            max_probation_peers: 3,
            probation_relays: 16,
            probation_records: 10_000,
            max_relays: 10_000,
            max_directory: 1_000_000,
            hop_limit: 16,
            receipt_timeout_ms: 5000,
            seen_cache: 100_000,
            peer_queue_bytes: 16 << 20,
            refresh_ms: 30_000,
            peer_broadcast_bytes_per_sec: 16 << 20,
            peer_broadcast_bytes_burst: 32 << 20,
            durable_delivery: true,
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

struct Peer {
    outbox: Arc<Outbox>,
    url: String,
    /// Dialled by us, allow-listed, or reached at a URL we dial; else on
    /// probation (see [`FederationConfig::max_probation_peers`]).
    trusted: bool,
    /// Relays and addresses this link was first to tell us about.
    introduced_relays: usize,
    introduced_records: usize,
}

/// Where the answer for a store-and-forward write goes.
#[derive(Debug, Clone)]
pub enum QueueReply {
    /// A client of this relay is waiting for the receipt.
    Local,
    /// The origin relay is waiting for a FWD_RECEIPT.
    Remote { origin: Address },
    /// The message was handed to these (connected) recipients before being
    /// stored and was not acknowledged in time: once stored, the pending
    /// receipt `key` reports them `queued`.
    AckMissed { key: PendingKey },
}

/// Work for the queue writer: store `frame` durably for each offline
/// recipient, then call [`Federation::queue_done`].
#[derive(Debug, Clone)]
pub struct QueueJob {
    pub id: MsgId,
    /// The MSG's `from` (charged against its sender's storage budget).
    pub sender: Address,
    pub frame: Bytes,
    pub recipients: Vec<Address>,
    /// Outcomes already known for the same message (other recipients).
    pub prior: Vec<ReceiptEntry>,
    pub reply: QueueReply,
}

/// The kinds of record a peer's allowance counts.
#[derive(Clone, Copy)]
enum NewRecord {
    Relay,
    Address,
}

/// Who gets a completed receipt.
enum PendingReply {
    /// A client of this relay.
    Local(Arc<Outbox>),
    /// The origin relay of a FORWARD (as a FWD_RECEIPT).
    Remote { origin: Address },
}

/// Identifies a pending receipt: (message id, origin relay).
pub type PendingKey = (MsgId, Address);

/// A receipt waiting for remote relays, store commits, or recipients' ACKs.
struct Pending {
    reply: PendingReply,
    /// Local recipients the message was handed to, whose ACK we await.
    awaiting_ack: HashSet<Address>,
    route: w2w_proto::frame::Route,
    entries: Vec<ReceiptEntry>,
    delivered: u32,
    /// Relay → the addresses it was asked to deliver to (empty: broadcast).
    waiting: HashMap<Address, Vec<Address>>,
    /// The destinations in request order; receipt entries follow it.
    order: Vec<Address>,
    deadline: Instant,
    /// The MSG frame, kept while recipients hold it unstored.
    frame: Bytes,
    /// Recipients (of `awaiting_ack`) handed the message before it was
    /// stored: if their ACK does not come, it is stored for them then.
    unstored: HashSet<Address>,
    /// Recipients (of `awaiting_ack`) whose late store write is in flight.
    storing: HashSet<Address>,
    /// The MSG's `from` (charged for late store writes).
    sender: Address,
}

impl Pending {
    fn new(
        reply: PendingReply,
        route: w2w_proto::frame::Route,
        order: Vec<Address>,
        timeout: Duration,
    ) -> Self {
        Pending {
            reply,
            awaiting_ack: HashSet::default(),
            route,
            entries: Vec::new(),
            delivered: 0,
            waiting: HashMap::default(),
            order,
            deadline: Instant::now() + timeout,
            frame: Bytes::new(),
            unstored: HashSet::default(),
            storing: HashSet::default(),
            sender: Address([0; 32]),
        }
    }
}

/// Puts receipt entries in the order the sender listed the recipients.
fn order_entries(entries: &mut [ReceiptEntry], order: &[Address]) {
    entries.sort_by_key(|e| order.iter().position(|a| *a == e.to).unwrap_or(usize::MAX));
}

struct State {
    seq: u64,
    peers: HashMap<Address, Peer>,
    /// Link-state records and the routes they give (BFS over two-way
    /// edges, `w2w_core::routing`).
    links: LinkStates,
    directory: HashMap<Address, Presence>,
    seen: SeenCache,
    pending: HashMap<PendingKey, Pending>,
    /// Keys of relays we reached by dialling a configured URL: trusted
    /// whichever side's link wins.
    configured: HashSet<Address>,
}

/// The federation core of one relay.
pub struct Federation {
    identity: Identity,
    me: Address,
    /// Addresses that ever registered here: an offline one gets its
    /// messages queued instead of `no_route`.
    known: std::sync::RwLock<HashSet<Address>>,
    /// The store-and-forward writer and the budgets that admit its jobs.
    queue_tx: Mutex<Option<(tokio::sync::mpsc::Sender<QueueJob>, Arc<StoreBudget>)>>,
    /// Store jobs submitted and not yet finished (committed and handed
    /// over), per recipient. A connection goes live (direct hand-over)
    /// only when its recipient has none, so a message on its way through
    /// the store is never overtaken by a newer one handed over directly.
    store_inflight: Mutex<HashMap<Address, u32>>,
    url: Mutex<String>,
    pub config: FederationConfig,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    events: tokio::sync::broadcast::Sender<HopEvent>,
}

/// The outcome of routing a client's MSG.
pub enum Dispatch {
    Done(Receipt),
    /// Remote relays were asked; the receipt is sent when they answer.
    Pending,
}

impl Federation {
    pub fn new(identity: Identity, config: FederationConfig, metrics: Arc<Metrics>) -> Self {
        let me = identity.address();
        let seen = SeenCache::new(config.seen_cache, Duration::from_secs(120));
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let f = Federation {
            identity,
            me,
            known: Default::default(),
            queue_tx: Mutex::new(None),
            store_inflight: Default::default(),
            url: Mutex::new(String::new()),
            config,
            state: Mutex::new(State {
                seq: 0,
                peers: HashMap::default(),
                links: LinkStates::new(me),
                directory: HashMap::default(),
                seen,
                pending: HashMap::default(),
                configured: HashSet::default(),
            }),
            metrics,
            events,
        };
        {
            let mut st = f.lock();
            f.bump_link_state(&mut st);
        }
        f
    }

    /// Connects the store-and-forward writer.
    pub fn set_queue(&self, tx: tokio::sync::mpsc::Sender<QueueJob>, budget: Arc<StoreBudget>) {
        *self.queue_tx.lock().unwrap_or_else(|e| e.into_inner()) = Some((tx, budget));
    }

    /// Records addresses that registered here (loaded at start, then one
    /// per registration).
    pub fn add_known(&self, addrs: impl IntoIterator<Item = Address>) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(addrs);
    }

    /// Forgets addresses whose registrations the store dropped (gone
    /// longer than the queue's time to live, nothing queued): they leave
    /// `known` and our own "left" records leave the directory.
    /// `connected` is asked under the `known` lock: a registration inserts
    /// its connection before it calls [`Self::add_known`], so an address
    /// that registers meanwhile is either skipped here or added again.
    pub fn forget(&self, addrs: &[Address], connected: impl Fn(&Address) -> bool) {
        let addrs: Vec<Address> = {
            let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
            addrs
                .iter()
                .filter(|a| !connected(a))
                .filter(|a| known.remove(*a))
                .copied()
                .collect()
        };
        let mut st = self.lock();
        for a in &addrs {
            if st
                .directory
                .get(a)
                .is_some_and(|p| !p.online && p.proof.relay_key == self.me)
            {
                st.directory.remove(a);
            }
        }
        self.metrics
            .known_addresses
            .store(st.directory.len() as i64, Relaxed);
    }

    fn is_known(&self, a: &Address) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(a)
    }

    /// Admits `job`'s recipients to the store against its budgets (in
    /// memory: nothing waits and no row is counted) and hands the job, cut
    /// down to those admitted, to the queue writer. Returns the admitted
    /// recipients and a `rejected` entry for each refused one
    /// (`store_busy`, `storage_full`, `queue_full`; `internal` if there is
    /// no writer). Callers hold the state lock, which orders this against
    /// [`Self::go_live`].
    fn queue(&self, mut job: QueueJob) -> (Vec<Address>, Vec<ReceiptEntry>) {
        let writer = self
            .queue_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((tx, budget)) = writer else {
            let refused = job
                .recipients
                .iter()
                .map(|a| entry(*a, Status::Rejected, Some(ErrorCode::Internal)));
            return (Vec::new(), refused.collect());
        };
        let admitted = budget.admit(&job.sender, &job.recipients, job.frame.len());
        let mut refused = Vec::new();
        let mut accepted = Vec::with_capacity(job.recipients.len());
        for (to, ok) in job.recipients.iter().zip(admitted) {
            match ok {
                Ok(()) => accepted.push(*to),
                Err(code) => {
                    self.metrics.error(code);
                    refused.push(entry(*to, Status::Rejected, Some(code)));
                }
            }
        }
        if accepted.is_empty() {
            return (accepted, refused);
        }
        job.recipients = accepted.clone();
        let (sender, len) = (job.sender, job.frame.len());
        // Counted before the writer can finish the job.
        {
            let mut m = self
                .store_inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for r in &accepted {
                *m.entry(*r).or_default() += 1;
            }
        }
        if let Err(e) = tx.try_send(job) {
            // Bounded in jobs as well as bytes: a full channel is busy.
            let code = match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => ErrorCode::StoreBusy,
                tokio::sync::mpsc::error::TrySendError::Closed(_) => ErrorCode::Internal,
            };
            self.metrics.error(code);
            self.store_job_finished(&accepted);
            for to in &accepted {
                budget.released(&sender, to, len);
                refused.push(entry(*to, Status::Rejected, Some(code)));
            }
            return (Vec::new(), refused);
        }
        (accepted, refused)
    }

    /// The queue writer has finished a job for `recipients` (written, and
    /// handed to those connected).
    pub fn store_job_finished(&self, recipients: &[Address]) {
        let mut m = self
            .store_inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for r in recipients {
            if let Some(n) = m.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    m.remove(r);
                }
            }
        }
    }

    /// Lets `outbox` take messages directly (not through the store) if no
    /// store job for its address is unfinished; `false` means try again
    /// after the store has caught up.
    pub fn go_live(&self, outbox: &Outbox) -> bool {
        let _st = self.lock();
        let busy = self
            .store_inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&outbox.address);
        if !busy {
            outbox.set_live(true);
        }
        !busy
    }

    /// Stops direct hand-over to a connection that is ending; once this
    /// returns, no dispatch is still handing it a message.
    pub fn retire(&self, outbox: &Outbox) {
        let _st = self.lock();
        outbox.set_live(false);
    }

    /// The queue writer finished `job`: `entries` are settled outcomes
    /// (prior ones, queued, refused); `awaiting` are recipients the message
    /// is about to be handed to, whose ACK completes the receipt. Returns
    /// the key their ACKs must name.
    pub fn queue_done(
        &self,
        job: QueueJob,
        entries: Vec<ReceiptEntry>,
        awaiting: Vec<Address>,
    ) -> PendingKey {
        let mut st = self.lock();
        let key = match job.reply {
            QueueReply::Remote { origin } => (job.id, origin),
            QueueReply::Local => (job.id, self.me),
            QueueReply::AckMissed { key } => {
                // Late store writes for recipients that did not ACK: an
                // ACK that came meanwhile already settled the entry.
                if let Some(p) = st.pending.get_mut(&key) {
                    for e in entries {
                        if p.storing.remove(&e.to) && p.awaiting_ack.remove(&e.to) {
                            if e.status == Status::Queued {
                                self.metrics.queued_total.fetch_add(1, Relaxed);
                            }
                            p.entries.push(e);
                        }
                    }
                }
                self.maybe_finish(&mut st, key);
                return key;
            }
        };
        // No pending: it expired while the store write was in flight, and
        // the receipt has gone out already (those recipients timed out).
        if let Some(p) = st.pending.get_mut(&key) {
            if p.waiting.remove(&self.me).is_some() {
                p.entries.extend(entries);
                p.awaiting_ack.extend(awaiting);
            }
        }
        self.maybe_finish(&mut st, key);
        key
    }

    /// Sets the URL this relay advertises in its link state.
    pub fn set_url(&self, url: String) {
        *self.url.lock().unwrap_or_else(|e| e.into_inner()) = url;
        let mut st = self.lock();
        self.bump_link_state(&mut st);
        self.flood_mine(&st, None);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hop events, for `w2w demo`.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<HopEvent> {
        self.events.subscribe()
    }

    fn event(&self, e: HopEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(e);
        }
    }

    pub fn peer_count(&self) -> usize {
        self.lock().peers.len()
    }

    /// (peer key, peer URL) of every current link; the URL is the one the
    /// peer advertises in its link state, or the one we dialled.
    pub fn peers(&self) -> Vec<(Address, String)> {
        let st = self.lock();
        st.peers
            .iter()
            .map(|(k, p)| {
                let url = st
                    .links
                    .get(k)
                    .map(|l| l.url.clone())
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| p.url.clone());
                (*k, url)
            })
            .collect()
    }

    /// Relays reachable from here.
    pub fn reachable(&self) -> Vec<Address> {
        self.lock().links.reachable().copied().collect()
    }

    pub fn directory_len(&self) -> usize {
        self.lock().directory.len()
    }

    // -------------------------------------------------------- link state

    fn bump_link_state(&self, st: &mut State) {
        st.seq = (st.seq + 1).max(crate::unix_ms());
        let url = self.url.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ls = LinkState::sign(
            &self.identity,
            &url,
            st.seq,
            st.peers.keys().copied().collect(),
        );
        st.links.insert(ls);
        self.recompute(st);
    }

    /// Recomputes the routes (BFS over two-way edges from this relay,
    /// first hops among the peers we are linked to).
    fn recompute(&self, st: &mut State) {
        let State { links, peers, .. } = st;
        links.recompute(|p| peers.contains_key(p));
        self.metrics
            .known_relays
            .store(st.links.reachable_count() as i64, Relaxed);
        self.metrics
            .known_addresses
            .store(st.directory.len() as i64, Relaxed);
    }

    /// Floods our own link state (signed at start, re-signed by
    /// [`Self::bump_link_state`]) to every peer except `except`.
    fn flood_mine(&self, st: &State, except: Option<Address>) {
        if let Some(mine) = st.links.mine() {
            self.flood(st, RelayToRelay::LinkState(mine.clone()), except);
        }
    }

    /// Sends a frame to every peer except `except`.
    fn flood(&self, st: &State, frame: RelayToRelay, except: Option<Address>) {
        let bytes = frame.encode();
        for (k, p) in &st.peers {
            if Some(*k) != except {
                let _ = p.outbox.try_enqueue(bytes.clone());
            }
        }
    }

    // ------------------------------------------------------------ peers

    /// Registers a peer link (`dialled`: we dialled it). On success the
    /// new peer is sent our link-state database; returns whether it is
    /// trusted. The directory follows, paced, from [`Self::directory_for`].
    pub fn peer_up(
        &self,
        key: Address,
        url: String,
        outbox: Arc<Outbox>,
        dialled: bool,
    ) -> Result<bool, ErrorCode> {
        let mut st = self.lock();
        if key == self.me {
            return Err(ErrorCode::DuplicatePeer);
        }
        if st.peers.contains_key(&key) {
            return Err(ErrorCode::DuplicatePeer);
        }
        let trusted = dialled || self.config.allow.contains(&key) || st.configured.contains(&key);
        let same_kind = st.peers.values().filter(|p| p.trusted == trusted).count();
        let cap = if trusted {
            self.config.max_peers
        } else {
            self.config.max_probation_peers
        };
        if same_kind >= cap {
            return Err(ErrorCode::PeerLimit);
        }
        st.peers.insert(
            key,
            Peer {
                outbox: outbox.clone(),
                url,
                trusted,
                introduced_relays: 0,
                introduced_records: 0,
            },
        );
        self.metrics
            .peer_links
            .store(st.peers.len() as i64, Relaxed);
        self.bump_link_state(&mut st);
        for ls in st.links.records() {
            let _ = outbox.try_enqueue(RelayToRelay::LinkState(ls.clone()).encode());
        }
        self.flood_mine(&st, Some(key));
        Ok(trusted)
    }

    /// We reached relay `key` by dialling a configured URL: its link is
    /// trusted from now on, whichever side made it. Returns the outbox of a
    /// link that was on probation until now (it is owed the directory).
    pub fn dialled_key(&self, key: Address) -> Option<Arc<Outbox>> {
        let mut st = self.lock();
        st.configured.insert(key);
        let p = st.peers.get_mut(&key)?;
        if p.trusted {
            return None;
        }
        p.trusted = true;
        Some(p.outbox.clone())
    }

    /// The addresses whose records a new link is sent: the whole directory
    /// for a trusted peer; for one on probation only the addresses online
    /// here now, which any client can list (ONLINE), so an unknown relay
    /// cannot enumerate who ever registered here or who is elsewhere.
    pub fn directory_for(&self, trusted: bool) -> Vec<Address> {
        let st = self.lock();
        st.directory
            .iter()
            .filter(|(_, p)| trusted || (p.online && p.proof.relay_key == self.me))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Queues the current records of `addrs` (a slice of
    /// [`Self::directory_for`]) for a peer; false once the link is gone.
    pub fn send_records(&self, outbox: &Outbox, addrs: &[Address]) -> bool {
        let st = self.lock();
        for a in addrs {
            if let Some(p) = st.directory.get(a) {
                if outbox
                    .try_enqueue(RelayToRelay::Presence(p.clone()).encode())
                    .is_err()
                {
                    return false;
                }
            }
        }
        true
    }

    /// Removes a peer link (if `conn_id` is still the current one).
    pub fn peer_down(&self, key: Address, conn_id: u64) {
        let mut st = self.lock();
        if st
            .peers
            .get(&key)
            .is_some_and(|p| p.outbox.conn_id == conn_id)
        {
            st.peers.remove(&key);
            self.metrics
                .peer_links
                .store(st.peers.len() as i64, Relaxed);
            self.bump_link_state(&mut st);
            self.flood_mine(&st, None);
        }
    }

    /// Re-signs and floods our link state (called periodically).
    pub fn refresh(&self) {
        let mut st = self.lock();
        self.bump_link_state(&mut st);
        self.flood_mine(&st, None);
    }

    /// URLs of our peers, for a REDIRECT.
    pub fn redirect_urls(&self) -> Vec<String> {
        let st = self.lock();
        st.peers
            .iter()
            .map(|(k, p)| {
                st.links
                    .get(k)
                    .map(|l| l.url.clone())
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| p.url.clone())
            })
            .filter(|u| !u.is_empty())
            .collect()
    }

    // -------------------------------------------------------- directory

    fn proof(reg: &Registration) -> RegistrationProof {
        RegistrationProof {
            address: reg.address,
            relay_key: reg.relay_key,
            relay_nonce: reg.relay_nonce,
            client_nonce: reg.client_nonce,
            timestamp_ms: reg.timestamp_ms,
            url: reg.url.clone(),
            sig_a: reg.sig_a,
        }
    }

    /// A client registered here: publish its presence.
    pub fn local_join(&self, reg: &Registration) {
        let p = Presence::sign(&self.identity, Self::proof(reg), true);
        let mut st = self.lock();
        st.directory.insert(reg.address, p.clone());
        self.flood(&st, RelayToRelay::Presence(p), None);
        self.metrics
            .known_addresses
            .store(st.directory.len() as i64, Relaxed);
    }

    /// A client left: publish the withdrawal (if our record is current).
    pub fn local_leave(&self, address: &Address) {
        let mut st = self.lock();
        let Some(cur) = st.directory.get(address) else {
            return;
        };
        if cur.proof.relay_key != self.me || !cur.online {
            return;
        }
        let p = Presence::sign(&self.identity, cur.proof.clone(), false);
        st.directory.insert(*address, p.clone());
        self.flood(&st, RelayToRelay::Presence(p), None);
    }

    /// Which relay hosts `address`, if the directory knows.
    pub fn lookup(&self, address: &Address) -> Option<Hosted> {
        let st = self.lock();
        let p = st.directory.get(address).filter(|p| p.online)?;
        let url = st
            .links
            .get(&p.proof.relay_key)
            .map(|l| l.url.clone())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| p.proof.url.clone());
        Some(Hosted {
            relay_key: p.proof.relay_key,
            relay_url: url,
        })
    }

    // ----------------------------------------------------- s2s frames in

    /// Handles a frame from peer `from`. Returns a local address that a
    /// newer registration elsewhere has displaced (its connection is to be
    /// closed as replaced).
    pub fn on_frame(&self, router: &Router, from: Address, frame: RelayToRelay) {
        match frame {
            RelayToRelay::LinkState(ls) => self.on_link_state(from, ls),
            RelayToRelay::Presence(p) => self.on_presence(router, from, p),
            RelayToRelay::Forward(f) => self.on_forward(router, from, f),
            RelayToRelay::FwdReceipt(r) => self.on_fwd_receipt(from, r),
            RelayToRelay::Redirect(_) => {} // handled by the dialler
        }
    }

    fn on_link_state(&self, from: Address, ls: LinkState) {
        if ls.verify().is_err() {
            self.metrics.error(ErrorCode::BadSignature);
            return;
        }
        let mut st = self.lock();
        if ls.relay == self.me {
            // An echo of an older record of ours (e.g. from before a
            // restart): supersede it.
            if ls.seq >= st.seq {
                st.seq = ls.seq;
                self.bump_link_state(&mut st);
                self.flood_mine(&st, None);
            }
            return;
        }
        if !st.links.is_newer(&ls) {
            return;
        }
        if st.links.get(&ls.relay).is_none() && !self.admit_new(&mut st, from, NewRecord::Relay) {
            return;
        }
        st.links.insert(ls.clone());
        self.recompute(&mut st);
        self.flood(&st, RelayToRelay::LinkState(ls), Some(from));
    }

    fn on_presence(&self, router: &Router, from: Address, p: Presence) {
        if p.verify().is_err() {
            self.metrics.error(ErrorCode::ForgedPresence);
            tracing::warn!(peer = %from.short(), address = %p.proof.address.short(), "forged presence record rejected");
            return;
        }
        let addr = p.proof.address;
        let mut st = self.lock();
        match st.directory.get(&addr) {
            Some(cur) if cur.rank() >= p.rank() => return,
            Some(_) => {}
            None => {
                if !self.admit_new(&mut st, from, NewRecord::Address) {
                    return;
                }
            }
        }
        st.directory.insert(addr, p.clone());
        self.metrics
            .known_addresses
            .store(st.directory.len() as i64, Relaxed);
        self.flood(&st, RelayToRelay::Presence(p.clone()), Some(from));
        drop(st);
        // Newest registration wins across the federation too.
        if p.online && p.proof.relay_key != self.me {
            if let Some(local) = router.get(&addr) {
                local.close(ErrorCode::Replaced);
            }
        }
    }

    /// Admits a record for a relay or address we do not know yet, brought
    /// by peer `from`: false (counted) if its table is at its bound, or if
    /// `from` is on probation and has brought its allowance of that kind.
    fn admit_new(&self, st: &mut State, from: Address, kind: NewRecord) -> bool {
        let c = &self.config;
        let (len, max, allowance) = match kind {
            NewRecord::Relay => (st.links.len(), c.max_relays, c.probation_relays),
            NewRecord::Address => (st.directory.len(), c.max_directory, c.probation_records),
        };
        let admitted = len < max
            && st.peers.get_mut(&from).is_some_and(|peer| {
                let n = match kind {
                    NewRecord::Relay => &mut peer.introduced_relays,
                    NewRecord::Address => &mut peer.introduced_records,
                };
                let ok = peer.trusted || *n < allowance;
                *n += ok as usize;
                ok
            });
        if !admitted {
            self.metrics.records_refused.fetch_add(1, Relaxed);
        }
        admitted
    }

    fn send_toward(&self, st: &State, relay: &Address, frame: Bytes) -> Result<Address, ErrorCode> {
        let next = st.links.hop(relay).ok_or(ErrorCode::Unreachable)?.next;
        let peer = st.peers.get(&next).ok_or(ErrorCode::Unreachable)?;
        peer.outbox
            .try_enqueue(frame)
            .map(|_| next)
            .map_err(|_| ErrorCode::Unreachable)
    }

    /// Answers the origin of a FORWARD for the recipients this relay served.
    fn reply_served(
        &self,
        st: &State,
        origin: Address,
        id: MsgId,
        delivered: u32,
        entries: Vec<ReceiptEntry>,
    ) {
        self.reply(
            st,
            FwdReceipt {
                origin,
                reporter: self.me,
                id,
                hops: 0,
                delivered,
                entries,
            },
        );
    }

    fn reply(&self, st: &State, r: FwdReceipt) {
        if r.origin == self.me {
            return;
        }
        let origin = r.origin;
        if self
            .send_toward(st, &origin, RelayToRelay::FwdReceipt(r).encode())
            .is_err()
        {
            self.metrics.error(ErrorCode::NoRoute);
        }
    }

    /// Hands a frame straight to a connected client (durable_delivery off).
    fn deliver_now(&self, router: &Router, to: &Address, frame: &Bytes, id: MsgId) -> ReceiptEntry {
        let (status, code) = router.deliver(to, frame);
        if status == Status::Delivered {
            self.delivered_event(id, *to);
        }
        entry(*to, status, code)
    }

    /// Reports a delivery to a local client (for hop traces).
    pub fn delivered_event(&self, id: MsgId, to: Address) {
        self.event(HopEvent::ToClient {
            relay: self.me,
            id,
            to,
        });
    }

    fn on_forward(&self, router: &Router, from: Address, f: Forward) {
        let Ok(ClientToRelay::Msg(msg)) = ClientToRelay::decode(&f.msg) else {
            self.metrics.error(ErrorCode::Malformed);
            return;
        };
        let now = Instant::now();
        if f.origin == self.me {
            // Our own messages never come back to us legitimately (the
            // seen cache would drop an echo): a peer claiming to forward
            // one of ours is forging it.
            self.metrics.error(ErrorCode::ForgedForward);
            return;
        }
        let mut st = self.lock();
        // Keyed by target too: one a2g for clients of two relays is two
        // FORWARDs that may pass this relay (w2w_core::seen).
        let target = match &f.target {
            ForwardTarget::Relay { relay, .. } => Some(relay),
            ForwardTarget::Broadcast => None,
        };
        if !st
            .seen
            .insert((msg.id, f.origin, forward_digest(&f.msg, target)), now)
        {
            self.metrics.error(ErrorCode::Duplicate);
            return;
        }
        match f.target {
            ForwardTarget::Relay { relay, to } if relay == self.me => {
                let key = (msg.id, f.origin);
                if let Err(code) = self.check_forward(&st, router, &msg, &to, key) {
                    self.metrics.error(code);
                    let entries = to
                        .iter()
                        .map(|a| entry(*a, Status::Rejected, Some(code)))
                        .collect();
                    self.reply_served(&st, f.origin, msg.id, 0, entries);
                    return;
                }
                let mut entries = Vec::with_capacity(to.len());
                let mut offline = Vec::new();
                let mut direct = HashSet::default();
                // Connected recipients get it at once and it is stored only
                // if their ACK does not come; others are stored (see
                // `dispatch`).
                for a in &to {
                    match router.get(a) {
                        Some(_) if !self.config.durable_delivery => {
                            entries.push(self.deliver_now(router, a, &f.msg, msg.id));
                        }
                        Some(o) if o.is_live() && o.hand_over(msg.id, &f.msg, key).is_ok() => {
                            self.delivered_event(msg.id, *a);
                            direct.insert(*a);
                        }
                        Some(_) => offline.push(*a),
                        None if self.is_known(a) => offline.push(*a),
                        None => entries.push(entry(*a, Status::NoRoute, Some(ErrorCode::NoRoute))),
                    }
                }
                if direct.is_empty() && offline.is_empty() {
                    let delivered = delivered_count(&entries);
                    self.reply_served(&st, f.origin, msg.id, delivered, entries);
                    return;
                }
                let mut p = Pending::new(
                    PendingReply::Remote { origin: f.origin },
                    w2w_proto::frame::Route::A2g,
                    to.clone(),
                    Duration::from_millis(self.config.receipt_timeout_ms),
                );
                if !direct.is_empty() {
                    p.frame = f.msg.clone();
                }
                p.awaiting_ack = direct.clone();
                p.unstored = direct;
                p.sender = msg.from;
                if !offline.is_empty() {
                    let job = QueueJob {
                        id: msg.id,
                        sender: msg.from,
                        frame: f.msg.clone(),
                        recipients: offline,
                        prior: Vec::new(),
                        reply: QueueReply::Remote { origin: f.origin },
                    };
                    let (accepted, refused) = self.queue(job);
                    entries.extend(refused);
                    if !accepted.is_empty() {
                        p.waiting.insert(self.me, accepted);
                    }
                }
                p.delivered = delivered_count(&entries);
                p.entries = entries;
                st.pending.insert(key, p);
                self.maybe_finish(&mut st, key);
            }
            ForwardTarget::Relay { relay, to } => {
                let fail = |code: ErrorCode, st: &State| {
                    self.metrics.error(code);
                    self.reply(
                        st,
                        FwdReceipt {
                            origin: f.origin,
                            reporter: relay,
                            id: msg.id,
                            hops: 0,
                            delivered: 0,
                            entries: to
                                .iter()
                                .map(|a| entry(*a, Status::NoRoute, Some(code)))
                                .collect(),
                        },
                    );
                };
                if f.hops >= self.config.hop_limit {
                    return fail(ErrorCode::HopLimit, &st);
                }
                match st.links.hop(&relay) {
                    None => return fail(ErrorCode::Unreachable, &st),
                    Some(hop) if hop.next == from => return fail(ErrorCode::Loop, &st),
                    Some(_) => {}
                }
                let fwd = RelayToRelay::Forward(Forward {
                    origin: f.origin,
                    hops: f.hops + 1,
                    target: ForwardTarget::Relay {
                        relay,
                        to: to.clone(),
                    },
                    msg: f.msg.clone(),
                });
                match self.send_toward(&st, &relay, fwd.encode()) {
                    Ok(next) => {
                        self.metrics.forwarded.fetch_add(1, Relaxed);
                        self.event(HopEvent::ToPeer {
                            relay: self.me,
                            id: msg.id,
                            peer: next,
                        });
                    }
                    Err(code) => fail(code, &st),
                }
            }
            ForwardTarget::Broadcast => {
                if !matches!(msg.dest, Dest::A2n(Scope::Federation))
                    || self.hosts(router, &st, &msg.from)
                {
                    self.metrics.error(ErrorCode::ForgedForward);
                    return;
                }
                let delivered = router.broadcast(&f.msg, |to| {
                    self.event(HopEvent::ToClient {
                        relay: self.me,
                        id: msg.id,
                        to: *to,
                    })
                });
                self.reply_served(&st, f.origin, msg.id, delivered, Vec::new());
                if f.hops >= self.config.hop_limit {
                    self.metrics.error(ErrorCode::HopLimit);
                    return;
                }
                let fwd = RelayToRelay::Forward(Forward {
                    origin: f.origin,
                    hops: f.hops + 1,
                    target: ForwardTarget::Broadcast,
                    msg: f.msg,
                })
                .encode();
                for (k, p) in &st.peers {
                    if *k != from && *k != f.origin && p.outbox.try_enqueue(fwd.clone()).is_ok() {
                        self.metrics.forwarded.fetch_add(1, Relaxed);
                        self.event(HopEvent::ToPeer {
                            relay: self.me,
                            id: msg.id,
                            peer: *k,
                        });
                    }
                }
            }
        }
    }

    /// Whether `addr` is a client of this relay (connected, or its current
    /// directory record names us): its messages start here, never at a peer.
    fn hosts(&self, router: &Router, st: &State, addr: &Address) -> bool {
        router.get(addr).is_some()
            || st
                .directory
                .get(addr)
                .is_some_and(|p| p.online && p.proof.relay_key == self.me)
    }

    /// Checks a FORWARD for delivery here against the MSG it carries: the
    /// recipients must be ones its header names (a2b: that one; a2g: a
    /// subset of its list; a group is resolved by its own relay and cannot
    /// be checked here), its sender must not be one of our own clients,
    /// and no other message may be waiting under the same (id, origin).
    fn check_forward(
        &self,
        st: &State,
        router: &Router,
        msg: &Msg,
        to: &[Address],
        key: PendingKey,
    ) -> Result<(), ErrorCode> {
        let named = match &msg.dest {
            Dest::A2b(b) => to.iter().all(|t| t == b),
            Dest::A2g(list) => to.iter().all(|t| list.contains(t)),
            Dest::Group(_) => true,
            Dest::A2a | Dest::A2n(_) => false,
        };
        if !named || self.hosts(router, st, &msg.from) {
            return Err(ErrorCode::ForgedForward);
        }
        if st.pending.contains_key(&key) {
            return Err(ErrorCode::Duplicate);
        }
        Ok(())
    }

    fn on_fwd_receipt(&self, from: Address, r: FwdReceipt) {
        let mut st = self.lock();
        if r.origin != self.me {
            if r.hops >= self.config.hop_limit {
                self.metrics.error(ErrorCode::HopLimit);
                return;
            }
            let origin = r.origin;
            let fwd = RelayToRelay::FwdReceipt(FwdReceipt {
                hops: r.hops + 1,
                ..r
            })
            .encode();
            match st.links.hop(&origin) {
                Some(hop) if hop.next == from => self.metrics.error(ErrorCode::Loop),
                _ => {
                    if self.send_toward(&st, &origin, fwd).is_err() {
                        self.metrics.error(ErrorCode::NoRoute);
                    }
                }
            }
            return;
        }
        let key = (r.id, self.me);
        let Some(p) = st.pending.get_mut(&key) else {
            return;
        };
        if p.waiting.remove(&r.reporter).is_none() {
            return;
        }
        p.delivered += r.delivered;
        p.entries.extend(r.entries);
        self.maybe_finish(&mut st, key);
    }

    fn maybe_finish(&self, st: &mut State, key: PendingKey) {
        let done = st
            .pending
            .get(&key)
            .is_some_and(|p| p.waiting.is_empty() && p.awaiting_ack.is_empty());
        if done {
            if let Some(p) = st.pending.remove(&key) {
                self.finish(st, key.0, p);
            }
        }
    }

    /// A recipient acknowledged a message it was handed: "delivered".
    /// Returns whether a stored copy may exist (to be deleted): false only
    /// if it was handed over unstored and is known never to have been
    /// written.
    pub fn on_ack(&self, key: PendingKey, recipient: Address) -> bool {
        let mut st = self.lock();
        let Some(p) = st.pending.get_mut(&key) else {
            return true;
        };
        let never_stored = p.unstored.remove(&recipient);
        p.storing.remove(&recipient);
        if p.awaiting_ack.remove(&recipient) {
            p.entries.push(entry(recipient, Status::Delivered, None));
            p.delivered += 1;
            self.maybe_finish(&mut st, key);
        }
        !never_stored
    }

    /// A recipient went away before acknowledging. A stored message stays
    /// stored for it ("queued"); one handed over unstored (`unstored` is
    /// its frame) is stored now and reported once written.
    pub fn ack_lost(&self, key: PendingKey, recipient: Address, unstored: Option<Bytes>) {
        let mut st = self.lock();
        // Settled already (by a late write that has finished), or being
        // written: nothing to do.
        let Some(p) = st.pending.get_mut(&key) else {
            return;
        };
        if p.storing.contains(&recipient) || !p.awaiting_ack.contains(&recipient) {
            return;
        }
        if unstored.is_some() && p.unstored.remove(&recipient) {
            p.storing.insert(recipient);
            let (frame, sender) = (p.frame.clone(), p.sender);
            let (_, refused) = self.queue_late(key, sender, frame, vec![recipient]);
            if !refused.is_empty() {
                let Some(p) = st.pending.get_mut(&key) else {
                    return;
                };
                p.storing.remove(&recipient);
                p.awaiting_ack.remove(&recipient);
                p.entries.extend(refused);
                self.maybe_finish(&mut st, key);
            }
            return;
        }
        p.awaiting_ack.remove(&recipient);
        p.entries.push(entry(recipient, Status::Queued, None));
        self.maybe_finish(&mut st, key);
    }

    /// Stores a message handed over unstored whose ACK did not come;
    /// returns the recipients admitted and entries for those refused.
    fn queue_late(
        &self,
        key: PendingKey,
        sender: Address,
        frame: Bytes,
        recipients: Vec<Address>,
    ) -> (Vec<Address>, Vec<ReceiptEntry>) {
        self.queue(QueueJob {
            id: key.0,
            sender,
            frame,
            recipients,
            prior: Vec::new(),
            reply: QueueReply::AckMissed { key },
        })
    }

    fn finish(&self, st: &State, id: MsgId, mut p: Pending) {
        order_entries(&mut p.entries, &p.order);
        match p.reply {
            PendingReply::Remote { origin } => {
                let delivered = delivered_count(&p.entries);
                self.reply_served(st, origin, id, delivered, p.entries);
            }
            PendingReply::Local(sender) => {
                let (status, reason) = summarize(p.route, &p.entries, p.delivered);
                let entries = if matches!(
                    p.route,
                    w2w_proto::frame::Route::A2n | w2w_proto::frame::Route::A2a
                ) {
                    Vec::new()
                } else {
                    p.entries
                };
                let receipt = Receipt {
                    id,
                    status,
                    reason,
                    delivered: p.delivered,
                    entries,
                };
                self.metrics.receipt(status);
                let _ = sender.try_enqueue(RelayToClient::Receipt(receipt).encode());
            }
        }
    }

    /// Answers every pending receipt whose remote relays did not reply in
    /// time; their recipients are reported `no_route` / `timeout`.
    pub fn expire_pending(&self, now: Instant) {
        let mut st = self.lock();
        let expired: Vec<PendingKey> = st
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        let timeout = Duration::from_millis(self.config.receipt_timeout_ms);
        for key in expired {
            let Some(mut p) = st.pending.remove(&key) else {
                continue;
            };
            // A store write of ours always answers (committed or failed):
            // it is waited for, never reported as a timeout, so the receipt
            // cannot say `no_route` for a message that is then stored.
            let storing_here = p.waiting.remove(&self.me);
            if !p.waiting.is_empty() {
                self.metrics.error(ErrorCode::Timeout);
            }
            for (_, addrs) in p.waiting.drain() {
                for a in addrs {
                    p.entries
                        .push(entry(a, Status::NoRoute, Some(ErrorCode::Timeout)));
                }
            }
            // Handed over unstored and not acknowledged in time: store it
            // now; the receipt waits for that write.
            let late: Vec<Address> = p.unstored.drain().collect();
            if !late.is_empty() {
                let (accepted, refused) = self.queue_late(key, p.sender, p.frame.clone(), late);
                p.storing.extend(accepted);
                for e in refused {
                    p.awaiting_ack.remove(&e.to);
                    p.entries.push(e);
                }
            }
            // Stored, handed over, not acknowledged in time: it will be
            // delivered (again) on the next connection.
            let stored: Vec<Address> = p
                .awaiting_ack
                .iter()
                .filter(|a| !p.storing.contains(*a))
                .copied()
                .collect();
            for a in stored {
                p.awaiting_ack.remove(&a);
                p.entries.push(entry(a, Status::Queued, None));
            }
            if let Some(addrs) = storing_here {
                p.waiting.insert(self.me, addrs);
            }
            if p.awaiting_ack.is_empty() && p.waiting.is_empty() {
                self.finish(&st, key.0, p);
            } else {
                p.deadline = now + timeout;
                st.pending.insert(key, p);
            }
        }
    }

    // ------------------------------------------------ client messages out

    /// Routes a client's MSG (already checked: registered sender, rate
    /// limit, `from`). Local recipients are served at once; remote ones via
    /// FORWARD, with the receipt completed when their relays answer.
    pub fn dispatch(
        &self,
        router: &Router,
        sender: &Arc<Outbox>,
        frame: &Bytes,
        msg: &Msg,
        max_group: usize,
        group: Option<Result<Vec<Address>, ErrorCode>>,
    ) -> Dispatch {
        use w2w_proto::frame::Route;
        let route = msg.dest.route();
        self.event(HopEvent::FromClient {
            relay: self.me,
            id: msg.id,
            from: msg.from,
        });
        let done = |entries: Vec<ReceiptEntry>, delivered: u32| {
            let (status, reason) = summarize(route, &entries, delivered);
            let entries = if matches!(route, Route::A2n | Route::A2a) {
                Vec::new()
            } else {
                entries
            };
            Dispatch::Done(Receipt {
                id: msg.id,
                status,
                reason,
                delivered,
                entries,
            })
        };
        let reject = |code: ErrorCode| {
            self.metrics.error(code);
            Dispatch::Done(Receipt {
                id: msg.id,
                status: Status::Rejected,
                reason: code.as_u16(),
                delivered: 0,
                entries: Vec::new(),
            })
        };
        let targets: Vec<Address> = match &msg.dest {
            Dest::A2a => vec![msg.from],
            Dest::A2n(scope) => {
                let mut st = self.lock();
                if st.pending.contains_key(&(msg.id, self.me)) {
                    drop(st);
                    return reject(ErrorCode::Duplicate);
                }
                let delivered = router.broadcast(frame, |to| {
                    self.event(HopEvent::ToClient {
                        relay: self.me,
                        id: msg.id,
                        to: *to,
                    })
                });
                if *scope == Scope::Relay || st.peers.is_empty() {
                    return done(Vec::new(), delivered);
                }
                st.seen
                    .insert((msg.id, self.me, digest(frame)), Instant::now());
                let fwd = RelayToRelay::Forward(Forward {
                    origin: self.me,
                    hops: 1,
                    target: ForwardTarget::Broadcast,
                    msg: frame.clone(),
                })
                .encode();
                for (k, p) in &st.peers {
                    if p.outbox.try_enqueue(fwd.clone()).is_ok() {
                        self.metrics.forwarded.fetch_add(1, Relaxed);
                        self.event(HopEvent::ToPeer {
                            relay: self.me,
                            id: msg.id,
                            peer: *k,
                        });
                    }
                }
                let waiting = st.links.reachable().map(|r| (*r, Vec::new())).collect();
                let mut p = Pending::new(
                    PendingReply::Local(sender.clone()),
                    route,
                    Vec::new(),
                    Duration::from_millis(self.config.receipt_timeout_ms),
                );
                p.delivered = delivered;
                p.waiting = waiting;
                st.pending.insert((msg.id, self.me), p);
                return Dispatch::Pending;
            }
            Dest::A2b(to) => vec![*to],
            Dest::Group(_) => match group {
                Some(Ok(members)) if members.is_empty() => return done(Vec::new(), 0),
                Some(Ok(members)) => members,
                Some(Err(code)) => return reject(code),
                None => return reject(ErrorCode::UnknownGroup),
            },
            Dest::A2g(list) => {
                if list.is_empty() {
                    return reject(ErrorCode::EmptyList);
                }
                if list.len() > max_group {
                    return reject(ErrorCode::ListTooLong);
                }
                let mut seen = HashSet::with_capacity_and_hasher(list.len(), Default::default());
                list.iter().copied().filter(|a| seen.insert(*a)).collect()
            }
        };
        let order = targets.clone();
        let mut entries = Vec::with_capacity(targets.len());
        let mut remote: HashMap<Address, Vec<Address>> = HashMap::default();
        let mut offline = Vec::new();
        let mut st = self.lock();
        // Receipts are matched by id: a second message with the id of one
        // still waiting is refused rather than allowed to take its receipt.
        if st.pending.contains_key(&(msg.id, self.me)) {
            drop(st);
            return reject(ErrorCode::Duplicate);
        }
        let key = (msg.id, self.me);
        let mut direct = HashSet::default();
        for t in targets {
            // Ours and connected: handed over at once; "delivered" once it
            // ACKs. Only if the ACK does not come in time (or the
            // connection ends first) is it stored, and reported "queued"
            // once on disk. Ours and offline (registered here before), or
            // connected but still taking its stored backlog: stored first.
            // Either way the relay's receipt means the recipient has it or
            // it is on disk.
            if let Some(o) = router.get(&t) {
                if !self.config.durable_delivery {
                    entries.push(self.deliver_now(router, &t, frame, msg.id));
                } else if o.is_live() && o.hand_over(msg.id, frame, key).is_ok() {
                    self.delivered_event(msg.id, t);
                    direct.insert(t);
                } else {
                    offline.push(t);
                }
                continue;
            }
            match st.directory.get(&t) {
                // Hosted elsewhere (online, or left: its home relay queues).
                Some(p) if p.proof.relay_key != self.me => {
                    if st.links.hop(&p.proof.relay_key).is_some() {
                        remote.entry(p.proof.relay_key).or_default().push(t);
                    } else {
                        self.metrics.error(ErrorCode::Unreachable);
                        entries.push(entry(t, Status::NoRoute, Some(ErrorCode::Unreachable)));
                    }
                }
                _ if self.is_known(&t) => offline.push(t),
                _ => {
                    self.metrics.error(ErrorCode::NoRoute);
                    entries.push(entry(t, Status::NoRoute, Some(ErrorCode::NoRoute)));
                }
            }
        }
        let mut waiting = HashMap::default();
        if !offline.is_empty() {
            let job = QueueJob {
                id: msg.id,
                sender: msg.from,
                frame: frame.clone(),
                recipients: offline,
                prior: Vec::new(),
                reply: QueueReply::Local,
            };
            let (accepted, refused) = self.queue(job);
            entries.extend(refused);
            if !accepted.is_empty() {
                waiting.insert(self.me, accepted);
            }
        }
        for (relay, to) in remote {
            let fwd = RelayToRelay::Forward(Forward {
                origin: self.me,
                hops: 1,
                target: ForwardTarget::Relay {
                    relay,
                    to: to.clone(),
                },
                msg: frame.clone(),
            });
            match self.send_toward(&st, &relay, fwd.encode()) {
                Ok(next) => {
                    self.metrics.forwarded.fetch_add(1, Relaxed);
                    self.event(HopEvent::ToPeer {
                        relay: self.me,
                        id: msg.id,
                        peer: next,
                    });
                    waiting.insert(relay, to);
                }
                Err(code) => {
                    self.metrics.error(code);
                    entries.extend(
                        to.into_iter()
                            .map(|a| entry(a, Status::NoRoute, Some(code))),
                    );
                }
            }
        }
        let delivered = delivered_count(&entries);
        if waiting.is_empty() && direct.is_empty() {
            order_entries(&mut entries, &order);
            return done(entries, delivered);
        }
        let mut p = Pending::new(
            PendingReply::Local(sender.clone()),
            route,
            order,
            Duration::from_millis(self.config.receipt_timeout_ms),
        );
        if !direct.is_empty() {
            p.frame = frame.clone();
        }
        p.awaiting_ack = direct.clone();
        p.unstored = direct;
        p.sender = msg.from;
        p.entries = entries;
        p.delivered = delivered;
        p.waiting = waiting;
        st.pending.insert(key, p);
        Dispatch::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_box(
        b: u8,
        m: &Arc<Metrics>,
    ) -> (Arc<Outbox>, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
        Outbox::new(Address([b; 32]), b as u64, 1 << 20, m.clone())
    }

    #[test]
    fn relays_on_probation_have_their_own_slots_and_a_bounded_allowance() {
        let m = Arc::new(Metrics::default());
        let config = FederationConfig {
            max_peers: 1,
            max_probation_peers: 1,
            probation_relays: 1,
            ..FederationConfig::default()
        };
        let fed = Federation::new(Identity::from_seed([1; 32]), config, m.clone());
        let rogue = Identity::from_seed([2; 32]).address();
        let (o1, _r1) = peer_box(2, &m);
        assert_eq!(fed.peer_up(rogue, String::new(), o1, false), Ok(false));
        // A second unknown relay finds the probation slot taken...
        let (o2, _r2) = peer_box(3, &m);
        let other = Identity::from_seed([3; 32]).address();
        assert_eq!(
            fed.peer_up(other, String::new(), o2, false),
            Err(ErrorCode::PeerLimit)
        );
        // ...but a relay we dial still gets its reserved slot.
        let (o3, _r3) = peer_box(4, &m);
        let configured = Identity::from_seed([4; 32]).address();
        assert_eq!(fed.peer_up(configured, String::new(), o3, true), Ok(true));
        // The rogue may introduce one invented relay, not two.
        let router = Router::new();
        for seed in [10u8, 11] {
            let fake = Identity::from_seed([seed; 32]);
            let ls = LinkState::sign(&fake, "ws://fake", 1, vec![rogue]);
            fed.on_frame(&router, rogue, RelayToRelay::LinkState(ls));
        }
        assert_eq!(m.records_refused.load(Relaxed), 1);
        // Once we reach it by dialling a configured URL, it is trusted.
        assert!(fed.dialled_key(rogue).is_some());
        let fake = Identity::from_seed([12; 32]);
        let ls = LinkState::sign(&fake, "ws://fake", 1, vec![rogue]);
        fed.on_frame(&router, rogue, RelayToRelay::LinkState(ls));
        assert_eq!(m.records_refused.load(Relaxed), 1);
    }

    #[test]
    fn a_forward_that_contradicts_its_message_is_refused() {
        let m = Arc::new(Metrics::default());
        let me = Identity::from_seed([1; 32]);
        let my_key = me.address();
        let fed = Federation::new(me, FederationConfig::default(), m.clone());
        let rogue = Identity::from_seed([2; 32]).address();
        let (link, _lr) = peer_box(2, &m);
        fed.peer_up(rogue, String::new(), link, false).unwrap();
        let router = Router::new();
        let (alice, bob, carol) = (Address([5; 32]), Address([6; 32]), Address([7; 32]));
        let mut queues = Vec::new();
        for a in [alice, bob, carol] {
            let (o, rx) = Outbox::new(a, a.0[0] as u64, 1 << 20, m.clone());
            o.set_live(true);
            router.insert(o);
            queues.push(rx);
        }
        let forward =
            |id: u8, from: Address, dest: Dest, origin: Address, target: ForwardTarget| {
                let msg = Msg {
                    flags: 0,
                    id: MsgId([id; 16]),
                    from,
                    dest,
                    payload: Bytes::from_static(b"x"),
                };
                RelayToRelay::Forward(Forward {
                    origin,
                    hops: 1,
                    target,
                    msg: ClientToRelay::Msg(msg).encode(),
                })
            };
        let outsider = Address([9; 32]);
        let to = |a: Address| ForwardTarget::Relay {
            relay: my_key,
            to: vec![a],
        };
        // The header names bob; the FORWARD asks for carol.
        fed.on_frame(
            &router,
            rogue,
            forward(1, outsider, Dest::A2b(bob), rogue, to(carol)),
        );
        // A "from" that is one of our own clients.
        fed.on_frame(
            &router,
            rogue,
            forward(2, alice, Dest::A2b(bob), rogue, to(bob)),
        );
        // A broadcast claiming to come from us.
        fed.on_frame(
            &router,
            rogue,
            forward(
                3,
                outsider,
                Dest::A2n(Scope::Federation),
                my_key,
                ForwardTarget::Broadcast,
            ),
        );
        assert_eq!(m.error_count(ErrorCode::ForgedForward), 3);
        for rx in &mut queues {
            assert!(rx.try_recv().is_err(), "nothing was delivered");
        }
        // An honest one is delivered.
        fed.on_frame(
            &router,
            rogue,
            forward(4, outsider, Dest::A2g(vec![bob, carol]), rogue, to(carol)),
        );
        assert!(queues[2].try_recv().is_ok());
        // A forgery reusing its id and origin (another frame, so the
        // seen-cache does not take it for a copy) while carol's ACK is
        // awaited: refused, not delivered, the waiting receipt untouched.
        fed.on_frame(
            &router,
            rogue,
            forward(4, outsider, Dest::A2b(carol), rogue, to(carol)),
        );
        assert_eq!(m.error_count(ErrorCode::Duplicate), 1);
        assert!(queues[2].try_recv().is_err());
    }

    #[test]
    fn a_connection_goes_live_only_after_its_store_jobs_finish() {
        use w2w_proto::frame::{Msg, MsgId};
        let m = Arc::new(Metrics::default());
        let me = Identity::from_seed([1; 32]);
        let fed = Federation::new(me, FederationConfig::default(), m.clone());
        let (qtx, mut qrx) = tokio::sync::mpsc::channel(16);
        let budget = crate::budget::BudgetLimits {
            pending_bytes: 1 << 20,
            max_bytes: 1 << 20,
            sender_bytes: 1 << 20,
            recipient_messages: 10,
            recipient_bytes: 1 << 20,
        };
        fed.set_queue(qtx, Arc::new(StoreBudget::new(budget, [])));
        let router = Router::new();
        let (alice, bob) = (Address([2; 32]), Address([3; 32]));
        let (sender, _srx) = Outbox::new(alice, 1, 1 << 20, m.clone());
        let (ob, _brx) = Outbox::new(bob, 2, 1 << 20, m.clone());
        router.insert(sender.clone());
        router.insert(ob.clone());
        fed.add_known([bob]);
        // Bob is connected but not live (his backlog is being handed over):
        // the message goes through the store.
        let msg = Msg {
            flags: 0,
            id: MsgId([7; 16]),
            from: alice,
            dest: Dest::A2b(bob),
            payload: Bytes::from_static(b"m1"),
        };
        let frame = ClientToRelay::Msg(msg.clone()).encode();
        assert!(matches!(
            fed.dispatch(&router, &sender, &frame, &msg, 16, None),
            Dispatch::Pending
        ));
        let job = qrx.try_recv().expect("a store job");
        assert_eq!(job.recipients, vec![bob]);
        // While it is on its way, bob may not go live (a newer message
        // handed over directly would overtake it).
        assert!(!fed.go_live(&ob));
        assert!(!ob.is_live());
        fed.store_job_finished(&job.recipients);
        assert!(fed.go_live(&ob));
        assert!(ob.is_live());
        // Ending: retired, new messages go through the store again.
        fed.retire(&ob);
        assert!(!ob.is_live());
    }

    #[test]
    fn one_message_forwarded_to_two_relays_through_this_one_passes_twice() {
        // x - me - b - {c, d}: an a2g from x's client for clients of c and
        // d is two FORWARDs (one per target) that both pass here. The
        // second is not a duplicate of the first (the seen key names the
        // target; the simulation found it dropped).
        let ids: Vec<Identity> = (1..=5).map(|i| Identity::from_seed([i; 32])).collect();
        let m = Arc::new(Metrics::default());
        let fed = Federation::new(ids[0].clone(), FederationConfig::default(), m.clone());
        let [me, x, b, c, d] = std::array::from_fn(|i| ids[i].address());
        let (ox, _rx_x) = Outbox::new(x, 1, 1 << 20, m.clone());
        let (ob, mut rx_b) = Outbox::new(b, 2, 1 << 20, m.clone());
        fed.peer_up(x, String::new(), ox, true).unwrap();
        fed.peer_up(b, String::new(), ob, true).unwrap();
        fed.on_link_state(x, LinkState::sign(&ids[1], "", 10, vec![me]));
        fed.on_link_state(b, LinkState::sign(&ids[2], "", 10, vec![me, c, d]));
        fed.on_link_state(b, LinkState::sign(&ids[3], "", 10, vec![b]));
        fed.on_link_state(b, LinkState::sign(&ids[4], "", 10, vec![b]));
        while rx_b.try_recv().is_ok() {}
        let (carol, dave) = (Address([7; 32]), Address([8; 32]));
        let msg = ClientToRelay::Msg(Msg {
            flags: 0,
            id: MsgId([1; 16]),
            from: Address([5; 32]),
            dest: Dest::A2g(vec![carol, dave]),
            payload: Bytes::from_static(b"x"),
        })
        .encode();
        let router = Router::new();
        for (relay, to) in [(c, carol), (d, dave)] {
            let f = Forward {
                origin: x,
                hops: 1,
                target: ForwardTarget::Relay {
                    relay,
                    to: vec![to],
                },
                msg: msg.clone(),
            };
            fed.on_frame(&router, x, RelayToRelay::Forward(f));
        }
        let mut passed = 0;
        while let Ok(frame) = rx_b.try_recv() {
            if let Ok(RelayToRelay::Forward(_)) = RelayToRelay::decode(&frame) {
                passed += 1;
            }
        }
        assert_eq!(passed, 2, "both FORWARDs go on toward b");
        assert_eq!(m.error_count(ErrorCode::Duplicate), 0);
    }

    #[test]
    fn link_states_from_a_peer_give_routes_through_it() {
        // me - b - c, plus a one-way claim d -> me (BFS itself is tested in
        // w2w_core::routing).
        let ids: Vec<Identity> = (1..=4).map(|i| Identity::from_seed([i; 32])).collect();
        let m = Arc::new(Metrics::default());
        let fed = Federation::new(ids[0].clone(), FederationConfig::default(), m.clone());
        let [me, b, c, _d] = std::array::from_fn(|i| ids[i].address());
        let (ob, _rx) = Outbox::new(b, 1, 1 << 20, m.clone());
        fed.peer_up(b, "ws://b/".into(), ob, true).unwrap();
        fed.on_link_state(b, LinkState::sign(&ids[1], "ws://b/", 10, vec![me, c]));
        fed.on_link_state(b, LinkState::sign(&ids[2], "ws://c/", 10, vec![b]));
        fed.on_link_state(b, LinkState::sign(&ids[3], "ws://d/", 10, vec![me]));
        let mut reachable = fed.reachable();
        reachable.sort();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(reachable, want, "c through b; d's one-way edge ignored");
    }
}
