//! Typed relay configuration. Only the CLI parses TOML; this crate takes
//! these structs. Every limit is advertised in the info document.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use w2w_proto::Identity;

/// Everything a relay needs to start.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The relay's own key; its address is the relay key clients pin.
    pub identity: Identity,
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory for the SQLite store (`w2w.sqlite`). `None` keeps the store
    /// in memory (tests only).
    pub data_dir: Option<PathBuf>,
    /// URLs clients may name in REGISTER. Empty: accept any URL whose
    /// authority equals the request's Host header (and whose scheme matches
    /// the listener: ws or wss).
    pub public_urls: Vec<String>,
    /// Serve wss (TLS) with this certificate and key, reloaded when the files
    /// change on disk.
    pub tls: Option<TlsPaths>,
    /// Reverse proxies whose `X-Forwarded-For` names the real client: per-IP
    /// limits and logs use that address instead of the proxy's.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub limits: Limits,
    pub federation: crate::federation::FederationConfig,
}

impl RelayConfig {
    /// A config with default limits, plain ws, in-memory store.
    pub fn new(identity: Identity, listen: SocketAddr) -> Self {
        RelayConfig {
            identity,
            listen,
            data_dir: None,
            public_urls: Vec::new(),
            tls: None,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
            federation: Default::default(),
        }
    }
}

/// Certificate chain and private key, PEM files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often to check the files for a new certificate (default 2 s).
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    2000
}

/// Per-relay limits. Defaults are documented on each field and in
/// docs/PROTOCOL.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message accepted (default 1 MiB).
    pub max_frame_bytes: usize,
    /// Longest a2g address list (default 64).
    pub max_group: usize,
    /// Most sessions one address may hold at once, receiving and
    /// send-only together (default 8); one more is refused
    /// `too_many_sessions`.
    pub max_sessions: usize,
    /// Bytes a connection's send queue may hold before the connection is
    /// closed as a slow consumer (default 4 MiB).
    pub send_queue_bytes: usize,
    /// Sustained MSG/REQUEST frames per second per sending address, all its
    /// connections together (default 1000).
    pub rate_per_sec: u32,
    /// Token-bucket burst (default 2000).
    pub rate_burst: u32,
    /// Sustained fan-out bytes per second per sending address: a message
    /// costs its frame size times its copies (recipients; for a2n, the
    /// relay's connections and peer links). Past it, MSGs are refused
    /// `rate_limited` until the debt is paid off (default 8 MiB/s).
    pub fanout_bytes_per_sec: u64,
    /// Fan-out burst (default 16 MiB). One message may cost more than the
    /// burst; its sender then waits the debt off.
    pub fanout_bytes_burst: u64,
    /// Registered-or-registering WebSocket connections (default 10,000).
    pub max_connections: usize,
    /// Open TCP connections from one IP address (default 256).
    pub max_connections_per_ip: usize,
    /// WebSocket upgrades per second from one IP address (default 50).
    pub handshake_rate_per_ip: u32,
    /// Burst of WebSocket upgrades from one IP address (default 200).
    pub handshake_burst_per_ip: u32,
    /// Longest a plain HTTP connection (not a WebSocket) stays open, headers,
    /// body, answers and keep-alive together (default 30 s).
    pub http_timeout_ms: u64,
    /// Time allowed to finish registration (default 10 s).
    pub auth_timeout_ms: u64,
    /// Idle time before the relay pings (default 15 s).
    pub ping_interval_ms: u64,
    /// Time to answer a ping (default 10 s).
    pub ping_timeout_ms: u64,
    /// Allowed clock difference in REGISTER (default 60 s).
    pub max_skew_ms: u64,
    /// Remembered client nonces for replay detection (default 100,000).
    pub replay_cache: usize,
    /// How long a message waits for an offline recipient (default 7 days).
    pub queue_ttl_ms: u64,
    /// Most messages queued per offline recipient (default 10,000).
    pub queue_quota: usize,
    /// Most bytes queued per offline recipient (default 32 MiB). Every
    /// stored copy is charged at least 512 bytes.
    pub queue_quota_bytes: u64,
    /// Most bytes of queued messages one sender may have on disk here
    /// (default 64 MiB).
    pub store_sender_bytes: u64,
    /// Most bytes of queued messages on disk in all (default 1 GiB).
    pub store_max_bytes: u64,
    /// Most bytes of queued messages admitted and not yet committed: past
    /// it new ones are refused `store_busy` at once (default 32 MiB).
    pub store_pending_bytes: u64,
    /// Named groups this relay hosts (default 100,000).
    pub max_groups: usize,
    /// Named groups one address may own (default 64).
    pub max_groups_per_owner: usize,
    /// Operations kept in each group's signed log; older ones are deleted
    /// (default 1,000).
    pub group_log_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: w2w_proto::DEFAULT_MAX_FRAME_BYTES,
            max_group: 64,
            max_sessions: 8,
            send_queue_bytes: 4 << 20,
            rate_per_sec: 1000,
            rate_burst: 2000,
            fanout_bytes_per_sec: 8 << 20,
            fanout_bytes_burst: 16 << 20,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            handshake_rate_per_ip: 50,
            handshake_burst_per_ip: 200,
            http_timeout_ms: 30_000,
            auth_timeout_ms: 10_000,
            ping_interval_ms: 15_000,
            ping_timeout_ms: 10_000,
            max_skew_ms: 60_000,
            replay_cache: 100_000,
            queue_ttl_ms: 7 * 24 * 3600 * 1000,
            queue_quota: 10_000,
            queue_quota_bytes: 32 << 20,
            store_sender_bytes: 64 << 20,
            store_max_bytes: 1 << 30,
            store_pending_bytes: 32 << 20,
            max_groups: 100_000,
            max_groups_per_owner: 64,
            group_log_len: 1000,
        }
    }
}

impl Limits {
    pub fn budget_limits(&self) -> crate::budget::BudgetLimits {
        crate::budget::BudgetLimits {
            pending_bytes: self.store_pending_bytes,
            max_bytes: self.store_max_bytes,
            sender_bytes: self.store_sender_bytes,
            recipient_messages: self.queue_quota as u64,
            recipient_bytes: self.queue_quota_bytes,
        }
    }
    pub fn sender_rates(&self) -> crate::ratelimit::SenderRates {
        crate::ratelimit::SenderRates {
            frames_per_sec: self.rate_per_sec,
            frames_burst: self.rate_burst,
            bytes_per_sec: self.fanout_bytes_per_sec,
            bytes_burst: self.fanout_bytes_burst,
        }
    }
    pub fn group_limits(&self) -> crate::groups::GroupLimits {
        crate::groups::GroupLimits {
            max_groups: self.max_groups,
            max_groups_per_owner: self.max_groups_per_owner,
            log_len: self.group_log_len.max(1),
        }
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn http_timeout(&self) -> Duration {
        Duration::from_millis(self.http_timeout_ms)
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }
}
