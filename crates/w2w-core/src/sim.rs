//! Deterministic simulation of relay cores, their stores, peer links and
//! clients.
//!
//! Everything runs in one thread on a simulated clock. Client connections
//! and peer links are FIFO with random delay and lose what is in flight
//! when they drop; each relay's store executes ops in order after a random
//! delay, commits (what is committed survives a crash, nothing else does)
//! and answers a little later; a relay crashes and restarts from what its
//! store holds, and its peer links come back. Faults: client connections
//! dropped or replaced, relay crashes, failed writes, stalled links, peer
//! links cut and restored, the federation split in two and healed. All
//! randomness comes from one seed, so a seed replays exactly:
//! `cargo run -p w2w-core --example sim -- --seed N` (add `--federation`
//! or `--scale` for those presets).
//!
//! Each client has a home relay; its clock is off by up to ±60 s at each
//! registration (the window relays accept). Invariants, checked as the run goes and at
//! its end:
//! * a receipt that says `delivered` is sent only after the recipient's
//!   client had the message; one that says `queued` only while the message
//!   is on its home relay's disk or the recipient has it;
//! * every message receipted `delivered` or `queued` reaches its
//!   recipient's application exactly once, across crashes, reconnections
//!   and partitions;
//! * no connection is handed the same message twice;
//! * a stored copy is deleted only after its recipient had it, or once
//!   another relay holds it (handed over);
//! * a NOTICE DELIVERED is sent only after the recipient had the message;
//! * a FORWARD that comes round a cycle (relays' link-state views differ
//!   while a change spreads) is dropped where the cycle closes; with no
//!   faults, none does;
//! * once quiet (every relay up, every link restored, every client
//!   connected, nothing sent) every core holds nothing in flight, every
//!   store holds no message (what was kept in custody, or stored at a
//!   relay a client moved away from, has reached it), and no table is past
//!   its configured bound;
//! * once quiet, the relays that hold a client's records rank first its
//!   newest registration by the relays' clocks, whatever its own clock
//!   said (it is skewed ±60 s at each registration);
//! * a send-only session is never handed a message, and a receipt's
//!   `delivered` count never exceeds the sessions that had the message.
//!
//! A client may hold several sessions (PROTOCOL 7.7): a second receiving
//! one (a tab), a send-only one, and zombies: a client that moves on while
//! its old connection stays open until the relay's ping timeout ends it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use w2w_proto::frame::{ClientToRelay, Dest, Msg, MsgId, Notice, RelayToClient, Scope, Status};
use w2w_proto::s2s::{ForwardTarget, RegistrationProof, RelayToRelay};
use w2w_proto::{Address, ErrorCode, Identity};

use crate::shard::Shards;
use crate::{Config, ConnId, FedConfig, PeerId, StoreDone, StoreOp, Stored, Target};

/// What one simulation does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Relays (1: a single relay, no federation).
    pub relays: usize,
    /// Peer links per relay at most, and links each relay makes at start.
    pub max_peers: usize,
    pub initial_links: usize,
    pub clients: usize,
    /// Messages the clients send in all.
    pub messages: usize,
    /// Mean time between two sends (µs of simulated time).
    pub send_interval_us: u64,
    /// Chance per send that a client's connection drops (1 in N; 0: never).
    pub drop_one_in: u64,
    /// Chance per send that a relay crashes (1 in N; 0: never).
    pub crash_one_in: u64,
    /// Chance per store write that it fails (1 in N; 0: never).
    pub write_error_one_in: u64,
    /// Chance per frame for a client that its send queue is full (a slow
    /// consumer, 1 in N): the frame is not queued and the connection is
    /// closed, as the relay's shell does; a soft frame is just skipped.
    pub slow_one_in: u64,
    /// Chance per send that a peer link is cut for a while (1 in N).
    pub cut_one_in: u64,
    /// Chance per send that the federation splits in two for a while.
    pub partition_one_in: u64,
    /// Sends an a2n now and then (with scope federation when there are
    /// several relays).
    pub broadcasts: bool,
    /// One-way delay ranges (µs): client links, peer links.
    pub link_delay_us: (u64, u64),
    pub peer_delay_us: (u64, u64),
    /// Store op delay range (µs).
    pub store_delay_us: (u64, u64),
    /// How long a client takes to acknowledge (µs).
    pub ack_delay_us: (u64, u64),
    /// Chance per frame that its link stalls (1 in N; 0: never), and for
    /// how long (µs).
    pub stall_one_in: u64,
    pub stall_us: (u64, u64),
    /// How long after the start clients begin sending (µs): the directory
    /// spreads meanwhile.
    pub warmup_us: u64,
    /// Client clocks are off by up to this much either way (registration
    /// timestamps order directory records; relays accept ±60 s).
    pub clock_skew_ms: u64,
    /// Chance that a client keeps sessions at two relays at once (1 in N;
    /// 0: none): messages for it go to both, its application takes each
    /// once.
    pub multi_home_one_in: u64,
    /// Chance that a client with no receiving session moves one of its
    /// relays to another before it connects again (1 in N; 0: never): what
    /// was stored for it at the old one must reach it at the new one.
    pub roam_one_in: u64,
    /// No topology given: relay 0 starts alone and every other relay,
    /// started one after another, knows only relay 0 (its seed) and dials
    /// it; a full relay answers with its peers' URLs (REDIRECT) and the
    /// dialler tries one of them at random, as `w2w serve --peer` does.
    pub bootstrap: bool,
    /// A named group lives on relay 0 (PROTOCOL 8.1, 12.14) and clients of
    /// every relay send to it now and then, members and outsiders alike:
    /// its relay is found and asked for the members.
    pub groups: bool,
    /// Shards per relay (shard.rs): 1 runs each relay as one core; more
    /// run every relay as that many, the relay's work spread among them
    /// exactly as a sharded relay's server spreads it.
    pub shards: usize,
    /// Relays of different shard counts: relay `r` runs `1 + r % shards`
    /// (a message between relays of other counts is split differently at
    /// each end).
    pub mixed_shards: bool,
    pub core: Config,
}

impl Default for SimConfig {
    /// One relay, every kind of fault.
    fn default() -> Self {
        SimConfig {
            relays: 1,
            max_peers: 5,
            initial_links: 2,
            clients: 12,
            messages: 200,
            send_interval_us: 300,
            drop_one_in: 40,
            crash_one_in: 150,
            write_error_one_in: 200,
            slow_one_in: 300,
            cut_one_in: 0,
            partition_one_in: 0,
            broadcasts: true,
            link_delay_us: (50, 2_000),
            peer_delay_us: (100, 3_000),
            store_delay_us: (20, 1_500),
            ack_delay_us: (0, 3_000),
            stall_one_in: 50,
            stall_us: (2_000, 30_000),
            warmup_us: 3_000,
            clock_skew_ms: 60_000,
            multi_home_one_in: 4,
            roam_one_in: 6,
            bootstrap: false,
            groups: false,
            shards: 1,
            mixed_shards: false,
            core: Config {
                receipt_timeout: Duration::from_millis(8),
                session_grace: Duration::from_millis(2),
                max_group: 8,
                read_batch: 4,
                federation: FedConfig {
                    // Short enough that leases run out and are renewed
                    // many times in a run.
                    lease: Duration::from_millis(120),
                    cache_ttl: Duration::from_millis(50),
                    lookup_timeout: Duration::from_millis(15),
                    ring_settle: Duration::from_millis(1),
                    handoff_retry: Duration::from_millis(10),
                    replicas: 3,
                    ..FedConfig::default()
                },
                ..Config::default()
            },
        }
    }
}

impl SimConfig {
    /// A few relays in a random topology, with link cuts and partitions
    /// on top of the single relay's faults.
    pub fn federation() -> Self {
        let mut c = SimConfig {
            relays: 6,
            clients: 24,
            messages: 300,
            crash_one_in: 250,
            cut_one_in: 60,
            partition_one_in: 300,
            warmup_us: 30_000,
            groups: true,
            ..SimConfig::default()
        };
        c.core.receipt_timeout = Duration::from_millis(40);
        c.core.session_grace = Duration::from_millis(10);
        c
    }

    /// Bootstrap: 200 relays that each know one seed, 2,000 clients,
    /// 20,000 messages, no faults: every relay must end up linked into
    /// one federation and every message delivered.
    pub fn bootstrap() -> Self {
        let mut c = Self::scale();
        c.relays = 200;
        c.clients = 2_000;
        c.messages = 20_000;
        c.send_interval_us = 50;
        c.bootstrap = true;
        c.roam_one_in = 0;
        c.warmup_us = 1_500_000;
        c
    }

    /// Growth: 100 relays, 10,000 clients, 1,000,000 messages, no faults.
    pub fn scale() -> Self {
        let mut c = SimConfig {
            relays: 100,
            clients: 10_000,
            messages: 1_000_000,
            send_interval_us: 5,
            drop_one_in: 0,
            crash_one_in: 0,
            write_error_one_in: 0,
            slow_one_in: 0,
            stall_one_in: 0,
            broadcasts: false,
            warmup_us: 2_000_000,
            ..SimConfig::default()
        };
        c.core.receipt_timeout = Duration::from_secs(5);
        c.core.read_batch = 64;
        c.core.federation.lease = Duration::from_secs(3);
        c.core.federation.cache_ttl = Duration::from_millis(500);
        c.core.federation.lookup_timeout = Duration::from_millis(200);
        c.core.federation.ring_settle = Duration::from_millis(20);
        c.core.federation.handoff_retry = Duration::from_millis(200);
        c
    }
}

/// The named group of the simulation (it lives on relay 0).
const SIM_GROUP: &str = "crew";

/// What relay 0's group table answers for `asker`: every member but it, or
/// `not_member`.
fn group_members(group: &BTreeSet<Address>, asker: &Address) -> Result<Vec<Address>, ErrorCode> {
    if !group.contains(asker) {
        return Err(ErrorCode::NotMember);
    }
    Ok(group.iter().filter(|m| *m != asker).copied().collect())
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub sent: u64,
    pub receipts: u64,
    pub delivered_entries: u64,
    pub queued_entries: u64,
    pub rejected_entries: u64,
    /// Entries neither delivered nor queued, by reason code.
    pub reasons: BTreeMap<u16, u64>,
    /// Peer frames by type byte.
    pub peer_types: BTreeMap<u8, u64>,
    /// Directory records held per relay at the end: sum and max over
    /// relays, and how many relays were counted.
    pub held_sum: u64,
    pub held_max: u64,
    pub relays_counted: u64,
    pub arrived: u64,
    pub crashes: u64,
    pub drops: u64,
    /// Extra sessions opened by clients that had one (tabs, send-only).
    pub extra_sessions: u64,
    /// Connections left open by clients that moved on, ended later.
    pub zombies: u64,
    /// Clients with sessions at two relays at once.
    pub multi_homed: u64,
    /// Bootstrap: dials refused by a full relay and retried at a relay
    /// its REDIRECT named, and when (µs) the last relay first reached
    /// every other.
    pub redirects: u64,
    pub joined_us: u64,
    /// Times a client moved to another relay.
    pub roams: u64,
    /// Messages kept by a sender's relay because the recipient's relay
    /// could not be reached (custody), and stored messages handed over to
    /// another relay (summed over the relays' last runs).
    pub custody: u64,
    pub handed_off: u64,
    /// FORWARDs that joined one of the same message from the same origin
    /// at their target (a sharded origin sends one per shard).
    pub forwards_joined: u64,
    /// Copies the application dropped as repeats (it had the message from
    /// another session or relay).
    pub app_repeats: u64,
    /// Client connections closed as slow consumers.
    pub slow: u64,
    pub cuts: u64,
    pub partitions: u64,
    /// Frames carried by peer links.
    pub peer_frames: u64,
    /// NOTICE DELIVERED frames sent (each checked: the recipient had it).
    pub delivered_notices: u64,
    /// FORWARDs that came round a cycle to a relay they had passed (while
    /// link-state views disagreed) and were dropped there.
    pub loops: u64,
    pub events: u64,
    /// Simulated time of the run (µs).
    pub sim_us: u64,
    /// MSGs sent to the named group, and of those the ones sent through
    /// another relay than the group's.
    pub group_msgs: u64,
    pub group_remote: u64,
}

impl Report {
    /// Adds another run's counts (for totals over many seeds).
    pub fn add(&mut self, r: &Report) {
        self.sent += r.sent;
        self.receipts += r.receipts;
        self.delivered_entries += r.delivered_entries;
        self.queued_entries += r.queued_entries;
        self.rejected_entries += r.rejected_entries;
        for (code, n) in &r.reasons {
            *self.reasons.entry(*code).or_default() += n;
        }
        for (t, n) in &r.peer_types {
            *self.peer_types.entry(*t).or_default() += n;
        }
        self.held_sum += r.held_sum;
        self.held_max = self.held_max.max(r.held_max);
        self.relays_counted += r.relays_counted;
        self.arrived += r.arrived;
        self.crashes += r.crashes;
        self.drops += r.drops;
        self.extra_sessions += r.extra_sessions;
        self.zombies += r.zombies;
        self.multi_homed += r.multi_homed;
        self.roams += r.roams;
        self.redirects += r.redirects;
        self.joined_us = self.joined_us.max(r.joined_us);
        self.custody += r.custody;
        self.handed_off += r.handed_off;
        self.forwards_joined += r.forwards_joined;
        self.app_repeats += r.app_repeats;
        self.slow += r.slow;
        self.cuts += r.cuts;
        self.partitions += r.partitions;
        self.peer_frames += r.peer_frames;
        self.loops += r.loops;
        self.delivered_notices += r.delivered_notices;
        self.events += r.events;
        self.sim_us += r.sim_us;
        self.group_msgs += r.group_msgs;
        self.group_remote += r.group_remote;
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
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// True one time in `n` (never when `n` is 0).
    pub fn one_in(&mut self, n: u64) -> bool {
        n != 0 && self.next_u64().is_multiple_of(n)
    }
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
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
    Msg(Bytes, Box<Msg>),
    Ack(Vec<MsgId>),
}

#[derive(Debug)]
enum Ev {
    Send,
    ToRelay {
        relay: usize,
        conn: ConnId,
        up: Up,
    },
    ToClient {
        conn: ConnId,
        client: usize,
        frame: Bytes,
    },
    /// A frame on peer link `link`, toward its `b` end if `to_b`.
    PeerFrame {
        link: usize,
        to_b: bool,
        lgen: u64,
        frame: Bytes,
    },
    LinkUp {
        link: usize,
    },
    Restore {
        link: usize,
    },
    Heal,
    StoreStep {
        relay: usize,
        gen: u64,
    },
    StoreAnswer {
        relay: usize,
        gen: u64,
        done: StoreDone,
    },
    Tick {
        relay: usize,
        gen: u64,
    },
    /// The client has no receiving session: it opens one.
    Connect {
        client: usize,
    },
    /// The client opens one more session (a second tab or terminal;
    /// `receive` false: a send-only one, like `w2w send`).
    Open {
        client: usize,
        receive: bool,
    },
    /// One of the client's sessions drops (or is left behind as a zombie
    /// while the client opens a new one).
    Drop {
        client: usize,
    },
    /// A zombie connection (the client has moved on, the socket did not
    /// close) ends: the relay's ping timeout.
    Gone {
        relay: usize,
        gen: u64,
        conn: ConnId,
    },
    Restart {
        relay: usize,
    },
    /// Bootstrap: `relay` dials `target` (its seed, or a relay a REDIRECT
    /// named).
    Dial {
        relay: usize,
        target: usize,
    },
    /// Bootstrap: has every relay reached every other yet?
    Joined,
}

struct Client {
    address: Address,
    /// The relays it registers with: one, or two for a client that keeps
    /// sessions at two relays at once (redundancy, PROTOCOL 7.7).
    homes: Vec<usize>,
    /// Its sessions, oldest first (several: tabs, terminals, devices).
    sessions: Vec<Sess>,
    /// Messages the application got: (id, from); its sessions share it.
    app: HashSet<(MsgId, Address)>,
}

/// One session of a client.
struct Sess {
    conn: ConnId,
    relay: usize,
    /// Takes deliveries (false: send-only).
    receive: bool,
    /// Ids handed on this connection (a second copy is a relay bug).
    on_conn: HashSet<MsgId>,
}

impl Client {
    fn receiving_at(&self, relay: usize) -> bool {
        self.sessions.iter().any(|s| s.receive && s.relay == relay)
    }

    fn relay_of(&self, conn: ConnId) -> Option<usize> {
        self.sessions
            .iter()
            .find(|s| s.conn == conn)
            .map(|s| s.relay)
    }

    fn has(&self, conn: ConnId) -> bool {
        self.sessions.iter().any(|s| s.conn == conn)
    }

    fn remove(&mut self, conn: ConnId) {
        self.sessions.retain(|s| s.conn != conn);
    }
}

/// Most sessions a simulated client opens at once (zombies aside).
const SIM_SESSIONS: usize = 3;

/// A relay's store: what is committed survives a crash.
#[derive(Default)]
struct Disk {
    /// Registrations: the latest proof per address.
    known: BTreeMap<Address, RegistrationProof>,
    rows: BTreeMap<(Address, i64), (MsgId, Bytes)>,
    index: HashMap<(Address, MsgId), i64>,
    next_seq: i64,
    /// Ops polled from the core and not yet executed (lost in a crash).
    queue: VecDeque<StoreOp>,
    busy: bool,
}

struct Relay {
    identity: Identity,
    core: Option<Shards>,
    gen: u64,
    disk: Disk,
    tick_at: Option<u64>,
    links: Vec<usize>,
}

struct Link {
    a: usize,
    b: usize,
    /// Cut by a fault (restored later).
    cut: bool,
    up: bool,
    /// Bumped whenever the link goes down: frames of an older one are lost.
    lgen: u64,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    rng: Rng,
    t0: Instant,
    now_us: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    relays: Vec<Relay>,
    links: Vec<Link>,
    /// One side of the federation while it is split.
    partition: Option<BTreeSet<usize>>,
    clients: Vec<Client>,
    /// Connection → (client, relay).
    by_conn: HashMap<ConnId, usize>,
    next_conn: u64,
    /// Registrations so far (a newer one has a later timestamp).
    registrations: u64,
    /// Per link direction, when the last frame arrives (FIFO).
    link_last: HashMap<(u64, bool), u64>,
    /// Receipted delivered/queued: (id, sender, recipient).
    promises: Vec<(MsgId, Address, Address)>,
    /// Messages each recipient's client ever got: (recipient, id).
    got: HashSet<(Address, MsgId)>,
    /// On how many of its sessions each recipient got each message.
    got_sessions: HashMap<(Address, MsgId), u32>,
    /// Every message sent: its sender and whether it was an a2a.
    sent_by: HashMap<MsgId, (Address, bool)>,
    /// The named group's members (it lives on relay 0), and the messages
    /// sent to it.
    group: BTreeSet<Address>,
    group_sent: HashSet<MsgId>,
    /// (message, target relay, its recipients, relay) of every FORWARD
    /// that reached a relay (a message re-routed after `moved` goes to a
    /// relay again for other recipients: another FORWARD).
    visits: HashMap<(MsgId, Address, Vec<Address>, usize), u32>,
    sending: bool,
    faults: bool,
    /// After this (µs), an idle core's timers are not run: only the
    /// directory's renewals are left, which never end.
    ticks_until: Option<u64>,
    report: Report,
    /// Print every event (`W2W_SIM_TRACE=1`).
    trace: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One line for an event, for traces.
fn describe(ev: &Ev) -> String {
    let short = |a: &Address| hex(&a.0[..3]);
    match ev {
        Ev::ToRelay {
            relay,
            conn,
            up: Up::Msg(_, m),
        } => {
            let dest = match &m.dest {
                Dest::A2b(a) => format!("a2b {}", short(a)),
                Dest::A2g(l) => format!("a2g {:?}", l.iter().map(short).collect::<Vec<_>>()),
                other => format!("{:?}", other.route()),
            };
            format!(
                "relay {relay} <- c{} MSG {} from {} {dest}",
                conn.0,
                hex(&m.id.0[..3]),
                short(&m.from)
            )
        }
        Ev::ToRelay {
            relay,
            conn,
            up: Up::Ack(ids),
        } => format!("relay {relay} <- c{} ACK {}", conn.0, hex(&ids[0].0[..3])),
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
                    .map(|e| (short(&e.to), e.status, e.reason))
                    .collect::<Vec<_>>()
            ),
            _ => format!("client {client} <- c{} other", conn.0),
        },
        Ev::PeerFrame {
            link, to_b, frame, ..
        } => {
            let what = match RelayToRelay::decode(frame) {
                Ok(RelayToRelay::Forward(f)) => {
                    let id = match ClientToRelay::decode(&f.msg) {
                        Ok(ClientToRelay::Msg(m)) => hex(&m.id.0[..3]),
                        _ => "?".into(),
                    };
                    let target = match &f.target {
                        ForwardTarget::Relay { relay, to } => format!(
                            "to relay {} for {:?}",
                            short(relay),
                            to.iter().map(short).collect::<Vec<_>>()
                        ),
                        ForwardTarget::Broadcast => "broadcast".into(),
                        ForwardTarget::Handoff { relay, to } => {
                            format!("handoff to relay {} for {}", short(relay), short(to))
                        }
                    };
                    format!(
                        "FORWARD {id} from {} hops {} {target}",
                        short(&f.origin),
                        f.hops
                    )
                }
                Ok(RelayToRelay::FwdReceipt(r)) => {
                    format!("FWD_RECEIPT {} {:?}", hex(&r.id.0[..3]), r.entries)
                }
                Ok(RelayToRelay::Presence(p)) => {
                    format!("PRESENCE {} {}", short(&p.proof.address), p.online)
                }
                Ok(RelayToRelay::LinkState(l)) => format!("LINK_STATE seq {}", l.seq),
                _ => "other".into(),
            };
            format!("link {link} (to_b {to_b}): {what}")
        }
        Ev::StoreAnswer { relay, gen, done } => {
            format!("relay {relay} store answer (gen {gen}) {done:?}")
                .chars()
                .take(160)
                .collect()
        }
        other => format!("{other:?}"),
    }
}

/// Runs one seeded simulation; `Err` names the violated invariant.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, String> {
    let mut rng = Rng::new(seed);
    let relays: Vec<Relay> = (0..cfg.relays.max(1))
        .map(|_| Relay {
            identity: Identity::from_seed(rng.bytes()),
            core: None,
            gen: 0,
            disk: Disk::default(),
            tick_at: None,
            links: Vec::new(),
        })
        .collect();
    let clients = (0..cfg.clients)
        .map(|i| Client {
            address: Address(rng.bytes()),
            homes: {
                let home = i % relays.len();
                let mut homes = vec![home];
                if relays.len() > 1 && rng.one_in(cfg.multi_home_one_in) {
                    homes.push((home + 1 + rng.below(relays.len() - 1)) % relays.len());
                }
                homes
            },
            sessions: Vec::new(),
            app: HashSet::new(),
        })
        .collect();
    let mut sim = Sim {
        cfg,
        rng,
        t0: Instant::now(),
        now_us: 0,
        seq: 0,
        events: BTreeMap::new(),
        relays,
        links: Vec::new(),
        partition: None,
        clients,
        by_conn: HashMap::new(),
        next_conn: 0,
        registrations: 0,
        link_last: HashMap::new(),
        promises: Vec::new(),
        got: HashSet::new(),
        got_sessions: HashMap::new(),
        sent_by: HashMap::new(),
        group: BTreeSet::new(),
        group_sent: HashSet::new(),
        visits: HashMap::new(),
        sending: true,
        faults: true,
        ticks_until: None,
        report: Report::default(),
        trace: std::env::var_os("W2W_SIM_TRACE").is_some(),
    };
    sim.report.multi_homed = sim.clients.iter().filter(|c| c.homes.len() > 1).count() as u64;
    if cfg.groups {
        // About one client in three is a member.
        for c in &sim.clients {
            if sim.rng.one_in(3) {
                sim.group.insert(c.address);
            }
        }
    }
    sim.go().map_err(|e| format!("seed {seed}: {e}"))?;
    sim.report.sim_us = sim.now_us;
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

    fn core_config(&self, relay: usize) -> Config {
        let mut c = self.cfg.core.clone();
        c.federation = FedConfig {
            url: format!("sim://{relay}"),
            // Every relay of the simulation is trusted by the others.
            allow: self.relays.iter().map(|r| r.identity.address()).collect(),
            max_peers: self.cfg.max_peers + 1,
            check_signatures: false,
            ..c.federation
        };
        c
    }

    fn start_relay(&mut self, r: usize) {
        let config = self.core_config(r);
        let relay = &mut self.relays[r];
        // Numbered as a wall clock would: above anything signed earlier.
        let link_seq = self.now_us * 16 + relay.gen;
        let known: Vec<Address> = relay.disk.known.keys().copied().collect();
        let shards = if self.cfg.mixed_shards {
            1 + r % self.cfg.shards.max(1)
        } else {
            self.cfg.shards
        };
        let mut core = Shards::new(
            config,
            Identity::from_seed(relay.identity.seed()),
            shards,
            link_seq,
            &known,
        );
        // Every relay's wall clock reads the simulated time (ms).
        core.set_clock(self.t0, 0);
        core.restore_records(relay.disk.known.values().cloned());
        // Messages it keeps for addresses that never registered here.
        let custody: BTreeSet<Address> = relay
            .disk
            .rows
            .keys()
            .map(|(a, _)| *a)
            .filter(|a| !relay.disk.known.contains_key(a))
            .collect();
        core.add_custody(custody);
        if self.cfg.groups && r == 0 {
            core.host_group(
                self.t0 + Duration::from_micros(self.now_us),
                SIM_GROUP,
                false,
            );
        }
        if self.cfg.relays > 1 {
            // Its links come back within a few ms: until then it is joining.
            core.expect_peers(self.t0 + Duration::from_micros(self.now_us + 20_000));
        }
        relay.core = Some(core);
    }

    fn go(&mut self) -> Result<(), String> {
        let n = self.relays.len();
        for r in 0..n {
            self.start_relay(r);
        }
        if self.cfg.bootstrap {
            // Relays come up one after another, each given relay 0 only.
            for r in 1..n {
                let d = r as u64 * 2_000 + self.rng.range((0, 1_000));
                self.at(
                    d,
                    Ev::Dial {
                        relay: r,
                        target: 0,
                    },
                );
            }
            self.at(10_000, Ev::Joined);
        }
        // A random topology, every relay with a few links (at most
        // `max_peers`), connected: relay r first links to one before it.
        let mut edges = BTreeSet::new();
        let mut degree = vec![0usize; n];
        for a in (1..n).filter(|_| !self.cfg.bootstrap) {
            for attempt in 0..(1 + self.cfg.initial_links) {
                let b = if attempt == 0 {
                    // One with a free slot (relay 0..a always has one: a
                    // tree of a nodes has fewer than a * max_peers ends).
                    let mut b = self.rng.below(a);
                    while degree[b] >= self.cfg.max_peers {
                        b = self.rng.below(a);
                    }
                    b
                } else {
                    self.rng.below(n)
                };
                let e = (a.min(b), a.max(b));
                let full = degree[a] >= self.cfg.max_peers || degree[b] >= self.cfg.max_peers;
                if a == b || edges.contains(&e) || (attempt > 0 && full) {
                    continue;
                }
                edges.insert(e);
                degree[a] += 1;
                degree[b] += 1;
            }
        }
        for (a, b) in edges {
            let link = self.links.len();
            self.links.push(Link {
                a,
                b,
                cut: false,
                up: false,
                lgen: 0,
            });
            self.relays[a].links.push(link);
            self.relays[b].links.push(link);
            let d = self.rng.range((0, 1_000));
            self.at(d, Ev::LinkUp { link });
        }
        for c in 0..self.clients.len() {
            let d = self.rng.range((0, self.cfg.warmup_us / 2));
            self.at(d, Ev::Connect { client: c });
        }
        self.at(self.cfg.warmup_us, Ev::Send);
        let limit = 400 * (self.cfg.messages as u64 + 100) * (self.cfg.clients as u64 + 4);
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

    /// No more sends or faults: every link comes back, everyone connects.
    fn quiesce(&mut self) {
        self.sending = false;
        // Long enough for several renewals and every deadline.
        let lease = self.cfg.core.federation.lease.as_micros() as u64;
        let receipt = self.cfg.core.receipt_timeout.as_micros() as u64;
        self.ticks_until = Some(self.now_us + 4 * lease + 4 * receipt + 100_000);
        self.faults = false;
        self.partition = None;
        for link in 0..self.links.len() {
            self.links[link].cut = false;
            self.at(100, Ev::LinkUp { link });
        }
        for c in 0..self.clients.len() {
            let cl = &self.clients[c];
            if cl.homes.iter().any(|r| !cl.receiving_at(*r)) {
                self.at(100, Ev::Connect { client: c });
            }
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Send => self.send()?,
            Ev::Connect { client } => {
                self.maybe_roam(client);
                // A receiving session at each home that has none.
                for relay in self.clients[client].homes.clone() {
                    if !self.clients[client].receiving_at(relay) {
                        self.connect(client, relay, true);
                    }
                }
            }
            Ev::Open { client, receive } => {
                if self.clients[client].sessions.len() < SIM_SESSIONS {
                    self.report.extra_sessions += 1;
                    let homes = &self.clients[client].homes;
                    let relay = homes[self.rng.below(homes.len())];
                    self.connect(client, relay, receive);
                }
            }
            Ev::Drop { client } if !self.clients[client].sessions.is_empty() => {
                self.report.drops += 1;
                let n = self.clients[client].sessions.len();
                let sess = &self.clients[client].sessions[self.rng.below(n)];
                let (conn, relay) = (sess.conn, sess.relay);
                if self.rng.one_in(3) {
                    // The client moves on (a fast reconnect, a laptop
                    // that slept) while its old connection stays open:
                    // the relay keeps it until its ping timeout.
                    self.report.zombies += 1;
                    self.clients[client].remove(conn);
                    self.by_conn.remove(&conn);
                    let gen = self.relays[relay].gen;
                    let d = self.rng.range((2_000, 40_000));
                    self.at(d, Ev::Gone { relay, gen, conn });
                    self.connect(client, relay, true);
                } else {
                    self.drop_conn(conn);
                    if !self.clients[client].receiving_at(relay) {
                        let d = self.rng.range((500, 20_000));
                        self.at(d, Ev::Connect { client });
                    }
                }
            }
            Ev::Drop { .. } => {}
            Ev::Gone { relay, gen, conn } => {
                if self.relays[relay].gen == gen {
                    let now = self.now();
                    if let Some(core) = self.relays[relay].core.as_mut() {
                        core.disconnect(now, conn);
                    }
                    self.pump(relay)?;
                }
            }
            Ev::ToRelay { relay, conn, up } => {
                if self.by_conn.contains_key(&conn) {
                    let now = self.now();
                    if let Some(core) = self.relays[relay].core.as_mut() {
                        match up {
                            Up::Msg(frame, msg) => {
                                // Relay 0's shell resolves its own group;
                                // elsewhere the core finds it (`None`).
                                let group = match &msg.dest {
                                    Dest::Group(_) if relay == 0 && self.cfg.groups => {
                                        Some(group_members(&self.group, &msg.from))
                                    }
                                    _ => None,
                                };
                                core.handle_msg(now, conn, frame, &msg, group)
                            }
                            Up::Ack(ids) => core.handle_ack(now, conn, &ids),
                        }
                    }
                    self.pump(relay)?;
                }
            }
            Ev::ToClient {
                conn,
                client,
                frame,
            } => {
                if self.clients[client].has(conn) {
                    self.client_frame(client, conn, frame)?;
                }
            }
            Ev::PeerFrame {
                link,
                to_b,
                lgen,
                frame,
            } => {
                let l = &self.links[link];
                if l.up && l.lgen == lgen {
                    self.report.peer_frames += 1;
                    let relay = if to_b { l.b } else { l.a };
                    self.peer_frame(relay, link, lgen, frame)?;
                }
            }
            Ev::LinkUp { link } => self.link_up(link)?,
            Ev::Restore { link } => {
                if self.faults {
                    self.links[link].cut = false;
                    self.link_up(link)?;
                }
            }
            Ev::Heal => {
                if self.faults && self.partition.take().is_some() {
                    for link in 0..self.links.len() {
                        self.link_up(link)?;
                    }
                }
            }
            Ev::StoreStep { relay, gen } => {
                if gen == self.relays[relay].gen {
                    self.store_step(relay)?;
                }
            }
            Ev::StoreAnswer { relay, gen, done } => {
                if gen == self.relays[relay].gen {
                    let now = self.now();
                    if let Some(core) = self.relays[relay].core.as_mut() {
                        core.store_done(now, done);
                    }
                    self.pump(relay)?;
                }
            }
            Ev::Tick { relay, gen } => {
                if gen == self.relays[relay].gen {
                    self.relays[relay].tick_at = None;
                    let now = self.now();
                    if let Some(core) = self.relays[relay].core.as_mut() {
                        core.handle_timeout(now);
                    }
                    self.pump(relay)?;
                }
            }
            Ev::Dial { relay, target } => self.dial(relay, target)?,
            Ev::Joined => {
                let n = self.relays.len();
                let all = self.relays.iter_mut().all(|r| {
                    r.core
                        .as_mut()
                        .is_some_and(|c| c.reachable_count() + 1 == n)
                });
                if all {
                    self.report.joined_us = self.now_us;
                } else {
                    self.at(10_000, Ev::Joined);
                }
            }
            Ev::Restart { relay } => {
                self.start_relay(relay);
                for c in 0..self.clients.len() {
                    if self.clients[c].homes.contains(&relay) {
                        let d = self.rng.range((100, 5_000));
                        self.at(d, Ev::Connect { client: c });
                    }
                }
                for link in self.relays[relay].links.clone() {
                    let d = self.rng.range((100, 3_000));
                    self.at(d, Ev::LinkUp { link });
                }
            }
        }
        Ok(())
    }

    /// A client with no receiving session may come back at another relay
    /// (it moved): one of its relays is replaced.
    fn maybe_roam(&mut self, client: usize) {
        let n = self.relays.len();
        let c = &self.clients[client];
        if !self.sending || n <= c.homes.len() || c.sessions.iter().any(|s| s.receive) {
            return;
        }
        if !self.rng.one_in(self.cfg.roam_one_in) {
            return;
        }
        let i = self.rng.below(c.homes.len());
        let mut r = self.rng.below(n);
        while self.clients[client].homes.contains(&r) {
            r = (r + 1) % n;
        }
        self.clients[client].homes[i] = r;
        self.report.roams += 1;
    }

    fn send(&mut self) -> Result<(), String> {
        if !self.sending {
            return Ok(());
        }
        let next = self.rng.range((1, 2 * self.cfg.send_interval_us));
        self.at(next, Ev::Send);
        if self.faults {
            self.faults_now()?;
        }
        let from = self.rng.below(self.clients.len());
        let n = self.clients[from].sessions.len();
        if n == 0 {
            return Ok(());
        }
        let sess = &self.clients[from].sessions[self.rng.below(n)];
        let (conn, relay) = (sess.conn, sess.relay);
        let pick = |sim: &mut Sim| {
            let i = sim.rng.below(sim.clients.len());
            sim.clients[i].address
        };
        let federation = self.relays.len() > 1;
        let dest = match self.rng.range((0, 19)) {
            0 | 10 => Dest::A2a,
            11 if self.cfg.broadcasts => Dest::A2n(if federation {
                Scope::Federation
            } else {
                Scope::Relay
            }),
            1 | 12 => Dest::A2b(Address(self.rng.bytes())), // never registered
            4 | 15 if self.cfg.groups => Dest::Group(SIM_GROUP.into()),
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
        if matches!(msg.dest, Dest::Group(_)) {
            self.group_sent.insert(msg.id);
            self.report.group_msgs += 1;
            self.report.group_remote += (relay != 0) as u64;
        }
        self.report.sent += 1;
        let d = self.link_delay(conn.0, true, self.cfg.link_delay_us);
        self.at(
            d,
            Ev::ToRelay {
                relay,
                conn,
                up: Up::Msg(frame, Box::new(msg)),
            },
        );
        Ok(())
    }

    fn faults_now(&mut self) -> Result<(), String> {
        let n = self.relays.len();
        if self.rng.one_in(self.cfg.crash_one_in) {
            let r = self.rng.below(n);
            if self.relays[r].core.is_some() {
                self.crash(r)?;
            }
        }
        if self.rng.one_in(self.cfg.drop_one_in) {
            let c = self.rng.below(self.clients.len());
            self.at(0, Ev::Drop { client: c });
        }
        if self.rng.one_in(self.cfg.drop_one_in) {
            let client = self.rng.below(self.clients.len());
            let receive = self.rng.one_in(2);
            self.at(0, Ev::Open { client, receive });
        }
        if !self.links.is_empty() && self.rng.one_in(self.cfg.cut_one_in) {
            let link = self.rng.below(self.links.len());
            if !self.links[link].cut {
                self.report.cuts += 1;
                self.links[link].cut = true;
                self.link_down(link)?;
                let d = self.rng.range((1_000, 60_000));
                self.at(d, Ev::Restore { link });
            }
        }
        if n > 1 && self.partition.is_none() && self.rng.one_in(self.cfg.partition_one_in) {
            self.report.partitions += 1;
            let side: BTreeSet<usize> = (0..n).filter(|_| self.rng.one_in(2)).collect();
            self.partition = Some(side);
            for link in 0..self.links.len() {
                if !self.usable(link) {
                    self.link_down(link)?;
                }
            }
            let d = self.rng.range((5_000, 100_000));
            self.at(d, Ev::Heal);
        }
        Ok(())
    }

    /// Whether a link may be up: not cut, not across the partition, both
    /// relays running.
    fn usable(&self, link: usize) -> bool {
        let l = &self.links[link];
        let split = self
            .partition
            .as_ref()
            .is_some_and(|s| s.contains(&l.a) != s.contains(&l.b));
        !l.cut && !split && self.relays[l.a].core.is_some() && self.relays[l.b].core.is_some()
    }

    fn peer_id(link: usize, lgen: u64) -> PeerId {
        PeerId(((lgen) << 24) | link as u64)
    }

    fn link_up(&mut self, link: usize) -> Result<(), String> {
        if self.links[link].up || !self.usable(link) {
            return Ok(());
        }
        let (a, b) = (self.links[link].a, self.links[link].b);
        self.links[link].up = true;
        self.links[link].lgen += 1;
        let pid = Self::peer_id(link, self.links[link].lgen);
        let (ka, kb) = (
            self.relays[a].identity.address(),
            self.relays[b].identity.address(),
        );
        for (r, key, dialled) in [(a, kb, true), (b, ka, false)] {
            if let Some(core) = self.relays[r].core.as_mut() {
                if let Err(code) = core.peer_up(pid, key, String::new(), dialled) {
                    return Err(format!("relay {r} refused link {link}: {code:?}"));
                }
            }
        }
        self.pump(a)?;
        self.pump(b)
    }

    /// Bootstrap: relay `r` dials `t`. A relay with no free slot refuses
    /// and names its peers (REDIRECT); `r` tries one of them at random a
    /// moment later.
    fn dial(&mut self, r: usize, t: usize) -> Result<(), String> {
        let linked = self.relays[r]
            .links
            .iter()
            .any(|l| self.links[*l].a == t || self.links[*l].b == t);
        if r == t || linked {
            return Ok(());
        }
        let link = self.links.len();
        let pid = Self::peer_id(link, 1);
        let (kr, kt) = (
            self.relays[r].identity.address(),
            self.relays[t].identity.address(),
        );
        let accepted = match self.relays[t].core.as_mut() {
            Some(core) => core.peer_up(pid, kr, String::new(), false).is_ok(),
            None => false,
        };
        if !accepted {
            self.report.redirects += 1;
            let urls = self.relays[t]
                .core
                .as_ref()
                .map_or(Vec::new(), |c| c.redirect_urls());
            let named: Vec<usize> = urls
                .iter()
                .filter_map(|u| u.strip_prefix("sim://")?.parse().ok())
                .filter(|x| *x != r)
                .collect();
            let next = if named.is_empty() {
                0
            } else {
                named[self.rng.below(named.len())]
            };
            let d = self.rng.range((500, 3_000));
            self.at(
                d,
                Ev::Dial {
                    relay: r,
                    target: next,
                },
            );
            return Ok(());
        }
        if let Some(core) = self.relays[r].core.as_mut() {
            if let Err(code) = core.peer_up(pid, kt, String::new(), true) {
                return Err(format!("relay {r} refused the link it dialled: {code:?}"));
            }
        }
        self.links.push(Link {
            a: t,
            b: r,
            cut: false,
            up: true,
            lgen: 1,
        });
        self.relays[r].links.push(link);
        self.relays[t].links.push(link);
        self.pump(t)?;
        self.pump(r)
    }

    fn link_down(&mut self, link: usize) -> Result<(), String> {
        if !self.links[link].up {
            return Ok(());
        }
        self.links[link].up = false;
        let pid = Self::peer_id(link, self.links[link].lgen);
        self.links[link].lgen += 1;
        let (a, b) = (self.links[link].a, self.links[link].b);
        for r in [a, b] {
            if let Some(core) = self.relays[r].core.as_mut() {
                core.peer_down(pid);
            }
            self.pump(r)?;
        }
        Ok(())
    }

    fn peer_frame(
        &mut self,
        relay: usize,
        link: usize,
        lgen: u64,
        frame: Bytes,
    ) -> Result<(), String> {
        let Ok(f) = RelayToRelay::decode(&frame) else {
            return Err("a relay sent a peer frame that does not decode".into());
        };
        if let RelayToRelay::Forward(fwd) = &f {
            if let ForwardTarget::Relay { relay: target, to } = &fwd.target {
                let id = match ClientToRelay::decode(&fwd.msg) {
                    Ok(ClientToRelay::Msg(m)) => m.id,
                    _ => return Err("a FORWARD carries no MSG".into()),
                };
                let n = self
                    .visits
                    .entry((id, *target, to.clone(), relay))
                    .or_insert(0);
                *n += 1;
                match *n {
                    1 => {}
                    // Relays whose link-state views disagree while a change
                    // spreads can send a FORWARD round a cycle (a micro-loop,
                    // as in any link-state protocol); the seen cache must
                    // end it where it closes.
                    2 => self.report.loops += 1,
                    _ => {
                        return Err(format!(
                            "message {id} reached relay {relay} {n} times (a loop not cut)"
                        ))
                    }
                }
            }
        }
        let now = self.now();
        let pid = Self::peer_id(link, lgen);
        if self.trace {
            if let RelayToRelay::FwdReceipt(r) = &f {
                let up = self.relays[relay].core.is_some();
                eprintln!(
                    "{:>9} relay {relay} (up {up}) <- FWD_RECEIPT {} {:?}",
                    self.now_us, r.id, r.entries
                );
            }
        }
        if let Some(core) = self.relays[relay].core.as_mut() {
            core.handle_peer_frame(now, pid, f);
        }
        self.pump(relay)
    }

    fn link_delay(&mut self, key: u64, up: bool, range: (u64, u64)) -> u64 {
        let mut want = self.now_us + self.rng.range(range);
        // Now and then a link stalls (a congested or lossy path: TCP
        // retransmits, everything behind waits).
        if self.rng.one_in(self.cfg.stall_one_in) {
            want += self.rng.range(self.cfg.stall_us);
        }
        let last = self.link_last.entry((key, up)).or_insert(0);
        let arrive = want.max(*last);
        *last = arrive;
        arrive - self.now_us
    }

    /// Opens a session for `client` at `home` (`receive` false:
    /// send-only).
    fn connect(&mut self, client: usize, home: usize, receive: bool) {
        if self.relays[home].core.is_none() {
            return;
        }
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let address = self.clients[client].address;
        self.registrations += 1;
        // The client's clock, anywhere in the ±60 s a relay accepts: a
        // later registration may carry an earlier timestamp.
        let skew = self.rng.range((0, 2 * self.cfg.clock_skew_ms));
        let timestamp_ms = self.now_us / 1000 + self.cfg.clock_skew_ms + skew;
        let timestamp_ms = timestamp_ms.saturating_sub(self.cfg.clock_skew_ms * 2);
        let proof = RegistrationProof {
            address,
            relay_key: self.relays[home].identity.address(),
            relay_nonce: [0; 32],
            client_nonce: [0; 32],
            timestamp_ms: timestamp_ms.max(1),
            url: String::new(),
            sig_a: [0; 64],
        };
        // Registration is durable before the client hears it succeeded.
        self.relays[home].disk.known.insert(address, proof.clone());
        let now = self.now();
        let federation = self.relays.len() > 1;
        let accepted = self.relays[home].core.as_mut().is_some_and(|core| {
            core.connect(now, conn, address, federation.then_some(proof), receive)
                .is_ok()
        });
        if self.trace {
            eprintln!("{:>9} relay {home} <- {conn:?} registers {address:.6} (receive {receive}): accepted {accepted}", self.now_us);
        }
        if accepted {
            self.clients[client].sessions.push(Sess {
                conn,
                relay: home,
                receive,
                on_conn: HashSet::new(),
            });
            self.by_conn.insert(conn, client);
        } else if receive && !self.clients[client].receiving_at(home) {
            // Too many sessions (zombies count): try again later.
            let d = self.rng.range((500, 20_000));
            self.at(d, Ev::Connect { client });
        }
        // `pump` cannot fail on a connect (no receipt is emitted).
        let _ = self.pump(home);
    }

    fn drop_conn(&mut self, conn: ConnId) {
        let Some(client) = self.by_conn.remove(&conn) else {
            return;
        };
        let Some(home) = self.clients[client].relay_of(conn) else {
            return;
        };
        self.clients[client].remove(conn);
        self.link_last.remove(&(conn.0, true));
        self.link_last.remove(&(conn.0, false));
        let now = self.now();
        if let Some(core) = self.relays[home].core.as_mut() {
            core.disconnect(now, conn);
        }
        let _ = self.pump(home);
    }

    fn crash(&mut self, r: usize) -> Result<(), String> {
        self.report.crashes += 1;
        let relay = &mut self.relays[r];
        relay.gen += 1;
        if let Some(core) = relay.core.take() {
            self.report.custody += core.stats().custody;
            self.report.handed_off += core.stats().handed_off;
            self.report.forwards_joined += core.stats().forwards_joined;
        }
        relay.tick_at = None;
        relay.disk.queue.clear();
        relay.disk.busy = false;
        for c in &mut self.clients {
            for s in &c.sessions {
                if s.relay == r {
                    self.by_conn.remove(&s.conn);
                }
            }
            c.sessions.retain(|s| s.relay != r);
        }
        for link in self.relays[r].links.clone() {
            self.link_down(link)?;
        }
        let d = self.rng.range((1_000, 10_000));
        self.at(d, Ev::Restart { relay: r });
        Ok(())
    }

    /// Takes a relay's outputs.
    fn pump(&mut self, r: usize) -> Result<(), String> {
        let gen = self.relays[r].gen;
        let now = self.now();
        // Relay 0's shell answers questions about its group at once.
        let group = &self.group;
        let info = |asker: &Address| {
            group_members(group, asker).map(|_| w2w_proto::group::GroupInfo {
                name: SIM_GROUP.into(),
                owner: group.first().copied().unwrap_or(Address([0; 32])),
                members: group.iter().map(|m| (*m, false)).collect(),
                seq: 1,
            })
        };
        let mut answers = Vec::new();
        if let Some(core) = self.relays[r].core.as_mut() {
            while let Some(q) = core.poll_group_question() {
                match &q.query {
                    w2w_proto::s2s::GroupQuery::Info { asker, .. } => {
                        answers.push((q.origin, q.nonce, info(asker)))
                    }
                    other => return Err(format!("relay {r} asked {other:?}")),
                }
            }
            while let Some(o) = core.poll_group_outcome() {
                if !matches!(o, crate::GroupOutcome::Fanout { .. }) {
                    return Err(format!(
                        "relay {r}: a group outcome nobody asked for: {o:?}"
                    ));
                }
            }
        }
        let Some(core) = self.relays[r].core.as_mut() else {
            return Ok(());
        };
        for (origin, nonce, result) in answers {
            core.group_reply(now, origin, nonce, SIM_GROUP, result);
        }
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
        let timeout = core
            .poll_timeout()
            .filter(|_| !core.is_idle() || self.ticks_until.is_none_or(|t| self.now_us < t));
        let mut slow = Vec::new();
        for t in transmits {
            match t.to {
                Target::Conn(conn) => {
                    if self.trace && !self.by_conn.contains_key(&conn) {
                        if let Ok(RelayToClient::Msg(m)) = RelayToClient::decode(&t.frame) {
                            eprintln!(
                                "{:>9} relay {r} -> c{} (gone) MSG {}",
                                self.now_us,
                                conn.0,
                                hex(&m.id.0[..3])
                            );
                        }
                    }
                    self.check_receipt(&t.frame)?;
                    if self.faults && self.by_conn.contains_key(&conn) {
                        if slow.contains(&conn) {
                            continue; // closed: nothing more is queued
                        }
                        if self.rng.one_in(self.cfg.slow_one_in) {
                            if !t.soft {
                                slow.push(conn);
                            }
                            continue;
                        }
                    }
                    if let Some(&client) = self.by_conn.get(&conn) {
                        let d = self.link_delay(conn.0, false, self.cfg.link_delay_us);
                        self.at(
                            d,
                            Ev::ToClient {
                                conn,
                                client,
                                frame: t.frame,
                            },
                        );
                    }
                }
                Target::Peer(pid) => {
                    let link = (pid.0 & 0xff_ffff) as usize;
                    let lgen = pid.0 >> 24;
                    let Some(l) = self.links.get(link) else {
                        return Err(format!("relay {r} sent to an unknown peer {pid:?}"));
                    };
                    if !l.up || l.lgen != lgen {
                        continue; // the link is gone: lost
                    }
                    let to_b = l.a == r;
                    let ty = t.frame.get(1).copied().unwrap_or(0);
                    *self.report.peer_types.entry(ty).or_default() += 1;
                    let key = (1u64 << 63) | (link as u64);
                    let d = self.link_delay(key ^ (lgen << 32), to_b, self.cfg.peer_delay_us);
                    self.at(
                        d,
                        Ev::PeerFrame {
                            link,
                            to_b,
                            lgen,
                            frame: t.frame,
                        },
                    );
                }
            }
        }
        self.relays[r].disk.queue.extend(ops);
        if !self.relays[r].disk.busy && !self.relays[r].disk.queue.is_empty() {
            self.relays[r].disk.busy = true;
            let d = self.rng.range(self.cfg.store_delay_us);
            self.at(d, Ev::StoreStep { relay: r, gen });
        }
        // Slow consumers: closed by the shell, the core told at once.
        let again = !slow.is_empty() || !closes.is_empty();
        for conn in slow {
            if self.closed_by_relay(r, conn) {
                self.report.slow += 1;
            }
        }
        for (conn, _) in closes {
            self.closed_by_relay(r, conn);
        }
        if let Some(t) = timeout {
            let us = t.duration_since(self.t0).as_micros() as u64;
            if self.relays[r].tick_at.is_none_or(|cur| us < cur) {
                self.relays[r].tick_at = Some(us);
                let d = us.saturating_sub(self.now_us);
                self.at(d, Ev::Tick { relay: r, gen });
            }
        }
        if again {
            // What the ends made (late writes, receipts) goes out now.
            return self.pump(r);
        }
        Ok(())
    }

    /// Relay `r` closed a client's connection (slow consumer, or the core
    /// asked): the core is told at once, the client comes back later.
    /// False if the connection was no longer the client's.
    fn closed_by_relay(&mut self, r: usize, conn: ConnId) -> bool {
        let Some(client) = self.by_conn.get(&conn).copied() else {
            return false;
        };
        if !self.clients[client].has(conn) {
            return false;
        }
        self.by_conn.remove(&conn);
        self.clients[client].remove(conn);
        let now = self.now();
        if let Some(core) = self.relays[r].core.as_mut() {
            core.disconnect(now, conn);
        }
        let d = self.rng.range((500, 5_000));
        self.at(d, Ev::Connect { client });
        true
    }

    /// Executes relay `r`'s next store op (it commits now), and schedules
    /// its answer.
    fn store_step(&mut self, r: usize) -> Result<(), String> {
        let gen = self.relays[r].gen;
        let Some(op) = self.relays[r].disk.queue.pop_front() else {
            self.relays[r].disk.busy = false;
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
            eprintln!("{:>9}   relay {r} store: {line}", self.now_us);
        }
        let fail = self.rng.one_in(self.cfg.write_error_one_in);
        // A copy may go once it arrived, or once another relay holds it
        // (it was handed over).
        let elsewhere = match &op {
            StoreOp::Dequeue { recipient, id } => {
                self.got.contains(&(*recipient, *id)) || self.on_disk(recipient, *id, Some(r))
            }
            _ => false,
        };
        let disk = &mut self.relays[r].disk;
        let answer = match op {
            StoreOp::Enqueue {
                token,
                recipient,
                id,
                frame,
                ..
            } => {
                let result = if fail {
                    Err(ErrorCode::Internal)
                } else {
                    if !disk.index.contains_key(&(recipient, id)) {
                        disk.next_seq += 1;
                        let seq = disk.next_seq;
                        disk.rows.insert((recipient, seq), (id, frame));
                        disk.index.insert((recipient, id), seq);
                    }
                    Ok(())
                };
                Some(StoreDone::Enqueued { token, result })
            }
            StoreOp::Dequeue { recipient, id } => {
                if let Some(seq) = disk.index.remove(&(recipient, id)) {
                    if !elsewhere {
                        return Err(format!(
                            "a stored copy for {recipient} was deleted before it arrived or another relay had it"
                        ));
                    }
                    disk.rows.remove(&(recipient, seq));
                }
                None
            }
            StoreOp::Read {
                token,
                recipient,
                after,
                limit,
            } => {
                let rows = disk
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
        let more = !self.relays[r].disk.queue.is_empty();
        if let Some(done) = answer {
            let d = self.rng.range((0, 300));
            self.at(
                d,
                Ev::StoreAnswer {
                    relay: r,
                    gen,
                    done,
                },
            );
        }
        if more {
            let d = self.rng.range(self.cfg.store_delay_us);
            self.at(d, Ev::StoreStep { relay: r, gen });
        } else {
            self.relays[r].disk.busy = false;
        }
        Ok(())
    }

    /// Whether a relay (other than `except`) holds message `id` for `to`
    /// on disk: one of its relays, or one that keeps it in custody.
    fn on_disk(&self, to: &Address, id: MsgId, except: Option<usize>) -> bool {
        self.relays
            .iter()
            .enumerate()
            .any(|(i, r)| Some(i) != except && r.disk.index.contains_key(&(*to, id)))
    }

    /// Checks a RECEIPT as a relay sends it, and records its promises.
    fn check_receipt(&mut self, frame: &Bytes) -> Result<(), String> {
        let r = match RelayToClient::decode(frame) {
            Ok(RelayToClient::Receipt(r)) => r,
            Ok(RelayToClient::Notice(Notice::Delivered { id, to })) => {
                self.report.delivered_notices += 1;
                if !self.got.contains(&(to, id)) {
                    return Err(format!(
                        "NOTICE DELIVERED for {to}, whose client never had it"
                    ));
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        self.report.receipts += 1;
        let Some(&(sender, a2a)) = self.sent_by.get(&r.id) else {
            return Err(format!("a receipt for {}, which nobody sent", r.id));
        };
        if self.group_sent.contains(&r.id) {
            // A group's receipt names exactly its other members, or
            // refuses the MSG (an outsider is `not_member`).
            let named: BTreeSet<Address> = r.entries.iter().map(|e| e.to).collect();
            let went_out = r.status != Status::Rejected;
            match group_members(&self.group, &sender) {
                Ok(m)
                    if went_out
                        && (named != m.iter().copied().collect()
                            || named.len() != r.entries.len()) =>
                {
                    return Err(format!("group receipt {} names {named:?}", r.id));
                }
                Err(_) if went_out => {
                    return Err(format!("an outsider's group MSG went out: {r:?}"));
                }
                // Refused (an outsider `not_member`; anyone when the
                // group's relay could not be asked).
                _ => {}
            }
        }
        // An a2a receipt has no entries: its one recipient is the sender.
        let entries: Vec<(Address, Status)> = if a2a {
            vec![(sender, r.status)]
        } else {
            r.entries.iter().map(|e| (e.to, e.status)).collect()
        };
        // (An a2n receipt counts connections handed it: no entries.)
        let a2n = !a2a && r.entries.is_empty();
        if r.status != Status::Rejected && !a2n {
            let copies: u32 = entries
                .iter()
                .filter(|(_, st)| *st == Status::Delivered)
                .map(|(to, _)| self.got_sessions.get(&(*to, r.id)).copied().unwrap_or(0))
                .sum();
            if r.delivered > copies {
                return Err(format!(
                    "receipt for {} counts {} sessions, but only {copies} had it ({r:?})",
                    r.id, r.delivered
                ));
            }
        }
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
                    let on_disk = self.on_disk(&to, r.id, None);
                    if !self.got.contains(&(to, r.id)) && !on_disk {
                        return Err(format!(
                            "receipt says queued for {to}, but it is neither on disk nor arrived"
                        ));
                    }
                }
                _ => {
                    self.report.rejected_entries += 1;
                    let reason = r
                        .entries
                        .iter()
                        .find(|e| e.to == to)
                        .map_or(r.reason, |e| e.reason);
                    *self.report.reasons.entry(reason).or_default() += 1;
                    continue;
                }
            }
            self.promises.push((r.id, sender, to));
        }
        Ok(())
    }

    fn client_frame(&mut self, client: usize, conn: ConnId, frame: Bytes) -> Result<(), String> {
        let Ok(RelayToClient::Msg(m)) = RelayToClient::decode(&frame) else {
            // Receipts were checked when sent.
            return Ok(());
        };
        let c = &mut self.clients[client];
        let address = c.address;
        let Some(sess) = c.sessions.iter_mut().find(|s| s.conn == conn) else {
            return Ok(());
        };
        if !sess.receive {
            return Err(format!(
                "{address}'s send-only session was handed message {}",
                m.id
            ));
        }
        if !sess.on_conn.insert(m.id) {
            return Err(format!(
                "{address} got message {} twice on one connection",
                m.id
            ));
        }
        let to = c.address;
        let home = sess.relay;
        if c.app.insert((m.id, m.from)) {
            self.report.arrived += 1;
        } else {
            self.report.app_repeats += 1;
        }
        self.got.insert((to, m.id));
        *self.got_sessions.entry((to, m.id)).or_default() += 1;
        if matches!(m.dest, Dest::A2n(_)) {
            return Ok(()); // broadcasts are not acknowledged
        }
        let d = self.rng.range(self.cfg.ack_delay_us);
        // Acknowledged after a while, on the same link (lost if it drops).
        let arrive = d + self.link_delay(conn.0, true, self.cfg.link_delay_us);
        self.at(
            arrive,
            Ev::ToRelay {
                relay: home,
                conn,
                up: Up::Ack(vec![m.id]),
            },
        );
        Ok(())
    }

    fn check_end(&mut self) -> Result<(), String> {
        let by_address: HashMap<Address, usize> = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.address, i))
            .collect();
        for (id, from, to) in &self.promises {
            let Some(&c) = by_address.get(to) else {
                continue;
            };
            if !self.clients[c].app.contains(&(*id, *from)) {
                let held: Vec<String> = self
                    .relays
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.disk.index.contains_key(&(*to, *id)))
                    .map(|(i, r)| {
                        let view = r.core.as_ref().map(|core| core.debug_homes(to));
                        format!("relay {i} has it (its view {view:?})")
                    })
                    .collect();
                return Err(format!(
                    "message {id} receipted for {to} never arrived (its relays {:?}; {})",
                    self.clients[c].homes,
                    held.join(", ")
                ));
            }
        }
        // The relays that hold each client's records (the placement, with
        // every relay up) say it is online at each relay where it has a
        // receiving session, whatever its clock said when it registered
        // (it registered again and again, skewed ±60 s); and each of its
        // relays knows the others.
        if self.relays.len() > 1 {
            let mut ring: Vec<Address> = self.relays.iter().map(|r| r.identity.address()).collect();
            ring.sort_unstable();
            let k = self.cfg.core.federation.replicas;
            let index: HashMap<Address, usize> = self
                .relays
                .iter()
                .enumerate()
                .map(|(i, r)| (r.identity.address(), i))
                .collect();
            for c in &self.clients {
                let holders: Vec<usize> = crate::directory::closest(&ring, &c.address, k)
                    .iter()
                    .map(|a| index[a])
                    .collect();
                let homes: BTreeSet<usize> = c
                    .sessions
                    .iter()
                    .filter(|s| s.receive)
                    .map(|s| s.relay)
                    .collect();
                // The newest registration, by the relays' clocks (which
                // agree here), is first at every holder: not the one whose
                // client clock said latest (PROTOCOL 12.5).
                let newest = self
                    .relays
                    .iter()
                    .filter_map(|r| r.core.as_ref()?.own_record(&c.address))
                    .max();
                for &i in &holders {
                    let Some(core) = &self.relays[i].core else {
                        continue;
                    };
                    let first = core.newest_record(&c.address).map(|(_, n)| n);
                    if newest.is_some() && first != newest {
                        return Err(format!(
                            "relay {i} (holds {}'s records) ranks a registration ({first:?}) first where the newest is {newest:?}",
                            c.address
                        ));
                    }
                }
                for &h in &homes {
                    let home = self.relays[h].identity.address();
                    let askers = holders.iter().chain(homes.iter());
                    for &i in askers {
                        let Some(core) = &self.relays[i].core else {
                            continue;
                        };
                        if core.record_online(&c.address, &home) != Some(true) {
                            return Err(format!(
                                "relay {i} (holds {}'s records: {}) says it is not online at relay {h}, where it is connected ({:?})",
                                c.address,
                                holders.contains(&i),
                                core.record_online(&c.address, &home)
                            ));
                        }
                    }
                }
            }
        }
        if self.cfg.bootstrap && self.report.joined_us == 0 {
            return Err("the relays never all reached each other".into());
        }
        for r in &self.relays {
            if let Some(core) = &r.core {
                self.report.custody += core.stats().custody;
                self.report.handed_off += core.stats().handed_off;
                self.report.forwards_joined += core.stats().forwards_joined;
                self.report.forwards_joined += core.stats().forwards_joined;
                let held = core.directory_records().0 as u64;
                self.report.held_sum += held;
                self.report.held_max = self.report.held_max.max(held);
                self.report.relays_counted += 1;
            }
        }
        let fed = &self.cfg.core.federation;
        for (i, r) in self.relays.iter().enumerate() {
            if let Some(core) = &r.core {
                if !core.is_idle() {
                    return Err(format!(
                        "relay {i}'s core is not idle at the end ({} messages in flight)",
                        core.in_flight()
                    ));
                }
                if core.directory_len() > fed.max_directory.min(self.clients.len())
                    || core.relays_known() > fed.max_relays.min(self.relays.len())
                {
                    return Err(format!("relay {i} holds more records than exist"));
                }
            }
            if !r.disk.rows.is_empty() {
                let views: Vec<String> = r
                    .disk
                    .rows
                    .keys()
                    .map(|(a, _)| {
                        let c = self.clients.iter().find(|c| c.address == *a);
                        let view = r.core.as_ref().map(|core| core.debug_homes(a));
                        format!(
                            "{a}: client homes {:?}, known here {}, relay's view {view:?}",
                            c.map(|c| c.homes.clone()),
                            r.disk.known.contains_key(a)
                        )
                    })
                    .collect();
                return Err(format!(
                    "{} messages still stored at relay {i} at the end, every recipient connected ({})",
                    r.disk.rows.len(),
                    views.join("; ")
                ));
            }
        }
        Ok(())
    }
}
