//! The w2w relay.
//!
//! Layers, each talking only to the one below:
//!
//! * [`server`] — binds the port, accepts TCP (and TLS), serves HTTP
//!   (`/healthz`, `/metrics`, `/status`, `/.well-known/w2w`) and upgrades WebSockets;
//!   owns shutdown.
//! * [`conn`] — one actor per WebSocket: runs the registration handshake
//!   from `w2w_proto::handshake`, then reads frames, routes them and writes
//!   its own bounded send queue.
//! * [`router`] — who is connected; routes a MSG to its recipients without
//!   ever awaiting another connection (`try_enqueue` into byte-bounded queues).
//! * [`store`] — durable state behind the [`store::Backend`] trait, run by one
//!   writer thread that commits in batches (a priority lane for what clients
//!   wait on); SQLite is the default backend. [`budget`] admits queued
//!   messages against byte budgets in memory before they are submitted.
//! * [`federation`], [`peer`] — relays joined into one network: link-state
//!   routing, the signed directory, forwarding, peer links.
//! * [`metrics`], [`ratelimit`], [`tls`], [`config`], [`datadir`] — support.

pub mod budget;
pub mod config;
pub mod conn;
pub mod datadir;
pub mod federation;
pub mod groups;
pub mod metrics;
pub mod oplog;
pub mod peer;
pub mod per_ip;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod shared;
pub mod spacerift;
pub mod status;
pub mod store;
pub mod tls;
mod ws;

pub use config::{Limits, RelayConfig, TlsPaths};
pub use federation::{FederationConfig, HopEvent};
pub use server::{Relay, RelayError};

/// Whether the process's log sink accepts writes. The binary's log writer
/// reports failures here (and drops the line: a full disk must never kill
/// a connection); `/healthz` says unhealthy while it fails.
pub mod log_health {
    use std::sync::atomic::{AtomicBool, Ordering};

    static FAILING: AtomicBool = AtomicBool::new(false);

    /// Records the outcome of the latest log write.
    pub fn report(ok: bool) {
        FAILING.store(!ok, Ordering::Relaxed);
    }

    pub fn failing() -> bool {
        FAILING.load(Ordering::Relaxed)
    }
}

/// Milliseconds since the Unix epoch, from the system clock. The only place
/// the relay reads wall-clock time (the protocol crate takes it as input).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
