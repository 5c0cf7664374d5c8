//! The state every task of one relay shares (`Shared`), and what it
//! answers about itself (advertised URL, peer links, gauges, the metrics
//! page, the info document).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use w2w_proto::handshake::ReplayCache;
use w2w_proto::{Address, Identity};

use crate::config::Limits;
use crate::federation::Federation;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::store::Store;

/// State shared by every task of one relay.
pub struct Shared {
    pub identity: Identity,
    pub relay_key: Address,
    pub limits: Limits,
    pub public_urls: Vec<String>,
    pub tls: bool,
    pub local_addr: SocketAddr,
    pub router: Router,
    pub fed: Arc<Federation>,
    pub groups: crate::groups::Groups,
    pub rifts: Mutex<crate::spacerift::Rifts>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub replay: Mutex<ReplayCache>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub next_conn_id: AtomicU64,
    pub conn_permits: Arc<Semaphore>,
    /// Per-IP connection and handshake budgets.
    pub ip_gate: Arc<crate::per_ip::IpGate>,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Frame and fan-out budgets per sending address.
    pub senders: crate::ratelimit::SenderLimits,
    /// Rate limit for the operator's log lines (refusals, peer dials).
    pub oplog: crate::oplog::Throttle,
    pub started: std::time::Instant,
    /// Configured peer URLs (`--peer`) and the relay key last reached at
    /// each, for `/metrics` and `/status`.
    pub dials: Mutex<std::collections::BTreeMap<String, Option<Address>>>,
}

fn scheme(tls: bool) -> &'static str {
    if tls {
        "wss"
    } else {
        "ws"
    }
}

/// `host:port` with the scheme's default port removed, lowercased.
pub(crate) fn normalize_authority(auth: &str, tls: bool) -> String {
    let auth = auth.to_ascii_lowercase();
    let default = if tls { ":443" } else { ":80" };
    auth.strip_suffix(default)
        .map(str::to_owned)
        .unwrap_or(auth)
}

impl Shared {
    /// Whether a REGISTER may name `url` (see [`RelayConfig::public_urls`]).
    pub fn url_ok(&self, url: &str, host: Option<&str>) -> bool {
        if !self.public_urls.is_empty() {
            return self.public_urls.iter().any(|u| u == url);
        }
        let Ok(uri) = url.parse::<http::Uri>() else {
            return false;
        };
        let (Some(s), Some(auth), Some(host)) = (uri.scheme_str(), uri.authority(), host) else {
            return false;
        };
        s == scheme(self.tls)
            && normalize_authority(auth.as_str(), self.tls) == normalize_authority(host, self.tls)
    }

    /// The URL this relay tells clients it is at.
    pub fn advertised_url(&self, host: Option<&str>) -> String {
        if let Some(u) = self.public_urls.first() {
            return u.clone();
        }
        match host {
            Some(h) => format!("{}://{}/", scheme(self.tls), h),
            None => format!("{}://{}/", scheme(self.tls), self.local_addr),
        }
    }

    /// Peer links: every configured peer (up if a link to the key last
    /// reached there is up), then every other live link (they dialled us).
    pub fn peer_links(&self) -> Vec<crate::metrics::PeerLinkView> {
        use crate::metrics::PeerLinkView;
        let live = self.fed.peers();
        let dials = self.dials.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out: Vec<PeerLinkView> = dials
            .iter()
            .map(|(url, key)| PeerLinkView {
                peer: *key,
                url: url.clone(),
                up: key.is_some_and(|k| live.iter().any(|(p, _)| *p == k)),
                configured: true,
            })
            .collect();
        for (key, url) in live {
            if !dials.values().any(|k| *k == Some(key)) {
                out.push(PeerLinkView {
                    peer: Some(key),
                    url,
                    up: true,
                    configured: false,
                });
            }
        }
        out
    }

    /// The gauges `/metrics` adds to the counters.
    pub fn gauges(&self) -> crate::metrics::RelayGauges {
        let budget = self.store.budget();
        let (pending, stored) = budget.totals();
        crate::metrics::RelayGauges {
            uptime: self.started.elapsed(),
            peers: self.peer_links(),
            store_messages: budget.queued_messages(),
            store_bytes: stored,
            store_pending_bytes: pending,
        }
    }

    pub(crate) fn metrics_page(&self) -> String {
        let mut s = self.metrics.render();
        self.gauges().render(&mut s);
        self.store.commit_seconds().render(
            &mut s,
            "w2w_store_commit_seconds",
            "Time of each durable transaction of the message store (a group commit and its fsync).",
        );
        s
    }

    pub(crate) fn info_document(&self) -> String {
        let l = &self.limits;
        serde_json::json!({
            "protocol": "w2w",
            "version": w2w_proto::PROTOCOL_VERSION,
            "software": concat!("w2w/", env!("CARGO_PKG_VERSION")),
            "relay_key": self.relay_key.to_hex(),
            "urls": if self.public_urls.is_empty() {
                vec![self.advertised_url(None)]
            } else {
                self.public_urls.clone()
            },
            // Every limit, by its config name: one source of truth.
            "limits": serde_json::to_value(l).unwrap_or_default(),
        })
        .to_string()
    }
}
