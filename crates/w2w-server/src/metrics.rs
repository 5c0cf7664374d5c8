//! Relay counters, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: every counter is a relaxed add on the hot path, and the
//! set of labels is fixed (routes, receipt statuses, error codes), so no
//! registry or allocation is needed.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use w2w_proto::frame::{Route, Status};
use w2w_proto::ErrorCode;

const ROUTES: [Route; 5] = [Route::A2a, Route::A2b, Route::A2g, Route::A2n, Route::Group];
const STATUSES: [Status; 5] = [
    Status::Delivered,
    Status::Queued,
    Status::NoRoute,
    Status::Rejected,
    Status::Partial,
];
const CODE_SLOTS: usize = 64;

#[derive(Debug)]
pub struct Metrics {
    /// Open WebSocket connections (registering or registered).
    pub connections: AtomicI64,
    /// Registered sessions.
    pub registered: AtomicI64,
    /// Cores the relay's message state is split over (`[federation] shards`).
    pub shards: AtomicI64,
    /// Messages split across shards whose receipts are being joined.
    pub merging: AtomicI64,
    pub connections_total: AtomicU64,
    pub registrations_total: AtomicU64,
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes currently waiting in all send queues.
    pub queued_bytes: AtomicI64,
    pub requests_total: AtomicU64,
    /// Federation: live peer links.
    pub peer_links: AtomicI64,
    /// Federation: relays reachable from here.
    pub known_relays: AtomicI64,
    /// Federation: addresses in the directory.
    pub known_addresses: AtomicI64,
    /// Federation: records of other relays' named groups held here.
    pub group_records: AtomicI64,
    /// Nanoseconds the core lock was held (every decision about a message
    /// is taken under it: the part of the relay that one core runs at a
    /// time).
    pub core_lock_ns: AtomicU64,
    /// Federation: addresses with messages here waiting to move to
    /// another relay (custody, roaming; PROTOCOL 12.13).
    pub custody_addresses: AtomicI64,
    /// Federation: stored messages handed over to another relay.
    pub handed_off: AtomicU64,
    /// MSGs sent again while their original was in flight, answered with
    /// the original's receipt (PROTOCOL 7.6).
    pub resends_joined: AtomicU64,
    /// Federation: FORWARD frames sent to peers.
    pub forwarded: AtomicU64,
    /// Broadcast (a2n) and presence-notice copies not queued for a
    /// receiver whose send queue was past half its bound (best effort: the
    /// receiver is skipped, not disconnected).
    pub broadcast_skipped: AtomicU64,
    /// Federation records (relays, addresses) refused: a peer on probation
    /// past its allowance, or a table at its bound.
    pub records_refused: AtomicU64,
    /// Receipt entries that said "queued" (stored for later delivery).
    pub queued_total: AtomicU64,
    /// Message copies written to the store (one per recipient). Messages a
    /// connected recipient acknowledged in time are never written.
    pub stored_total: AtomicU64,
    /// Time from the WebSocket upgrade to REPLY_BACK (registration
    /// recorded and answered), clients only.
    pub registration_seconds: Histogram,
    messages: [AtomicU64; 5],
    receipts: [AtomicU64; 5],
    /// Errors and drops by [`ErrorCode`] (index = code).
    errors: [AtomicU64; CODE_SLOTS],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: AtomicI64::new(0),
            registered: AtomicI64::new(0),
            shards: AtomicI64::new(1),
            merging: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            registrations_total: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            queued_bytes: AtomicI64::new(0),
            requests_total: AtomicU64::new(0),
            peer_links: AtomicI64::new(0),
            known_relays: AtomicI64::new(0),
            known_addresses: AtomicI64::new(0),
            group_records: AtomicI64::new(0),
            core_lock_ns: AtomicU64::new(0),
            custody_addresses: AtomicI64::new(0),
            handed_off: AtomicU64::new(0),
            resends_joined: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            broadcast_skipped: AtomicU64::new(0),
            records_refused: AtomicU64::new(0),
            queued_total: AtomicU64::new(0),
            stored_total: AtomicU64::new(0),
            registration_seconds: Histogram::default(),
            messages: std::array::from_fn(|_| AtomicU64::new(0)),
            receipts: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Metrics {
    pub fn message(&self, route: Route) {
        self.messages[route as usize - 1].fetch_add(1, Relaxed);
    }

    pub fn receipt(&self, status: Status) {
        self.receipts[status as usize].fetch_add(1, Relaxed);
    }

    pub fn error(&self, code: ErrorCode) {
        if let Some(c) = self.errors.get(code.as_u16() as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn error_count(&self, code: ErrorCode) -> u64 {
        self.errors
            .get(code.as_u16() as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "w2w_connections",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        gauge(
            "w2w_registered",
            "Registered sessions.",
            self.registered.load(Relaxed),
        );
        gauge(
            "w2w_shards",
            "Cores the relay's message state is split over, each with its own lock.",
            self.shards.load(Relaxed),
        );
        gauge(
            "w2w_split_receipts_pending",
            "Messages split across shards (a2g, groups, a2n) whose receipts are being joined.",
            self.merging.load(Relaxed),
        );
        gauge(
            "w2w_queued_bytes",
            "Bytes waiting in send queues.",
            self.queued_bytes.load(Relaxed),
        );
        gauge(
            "w2w_peer_links",
            "Federation peer links.",
            self.peer_links.load(Relaxed),
        );
        gauge(
            "w2w_known_relays",
            "Relays reachable through the federation.",
            self.known_relays.load(Relaxed),
        );
        gauge(
            "w2w_known_addresses",
            "Addresses in the federation directory.",
            self.known_addresses.load(Relaxed),
        );
        gauge(
            "w2w_group_records",
            "Records of other relays' named groups held here (PROTOCOL 12.14).",
            self.group_records.load(Relaxed),
        );
        gauge(
            "w2w_custody_addresses",
            "Addresses with messages here waiting to move to another relay (custody, roaming).",
            self.custody_addresses.load(Relaxed),
        );
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "w2w_connections_total",
            "WebSocket connections accepted.",
            self.connections_total.load(Relaxed),
        );
        counter(
            "w2w_registrations_total",
            "Completed registrations.",
            self.registrations_total.load(Relaxed),
        );
        counter(
            "w2w_frames_in_total",
            "Frames received.",
            self.frames_in.load(Relaxed),
        );
        counter(
            "w2w_bytes_in_total",
            "Bytes received in frames.",
            self.bytes_in.load(Relaxed),
        );
        counter(
            "w2w_frames_out_total",
            "Frames sent.",
            self.frames_out.load(Relaxed),
        );
        counter(
            "w2w_bytes_out_total",
            "Bytes sent in frames.",
            self.bytes_out.load(Relaxed),
        );
        counter(
            "w2w_forwarded_total",
            "Messages forwarded to peer relays.",
            self.forwarded.load(Relaxed),
        );
        counter(
            "w2w_handed_off_total",
            "Stored messages handed over to the relay where their recipient is.",
            self.handed_off.load(Relaxed),
        );
        counter(
            "w2w_resends_joined_total",
            "MSGs sent again while their original was in flight, answered with the original's receipt.",
            self.resends_joined.load(Relaxed),
        );
        counter(
            "w2w_broadcast_skipped_total",
            "Broadcast and notice copies skipped for receivers past half their send queue.",
            self.broadcast_skipped.load(Relaxed),
        );
        counter(
            "w2w_federation_records_refused_total",
            "Relay and address records refused from peers (probation allowance or table bound).",
            self.records_refused.load(Relaxed),
        );
        counter(
            "w2w_queued_total",
            "Receipt entries reporting a message stored for later delivery.",
            self.queued_total.load(Relaxed),
        );
        counter(
            "w2w_stored_total",
            "Message copies written to the durable queue (one per recipient).",
            self.stored_total.load(Relaxed),
        );
        counter(
            "w2w_requests_total",
            "c2s requests answered.",
            self.requests_total.load(Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP w2w_core_lock_seconds_total Time the relay core's lock was held (one core at a time runs it).\n# TYPE w2w_core_lock_seconds_total counter\nw2w_core_lock_seconds_total {:.6}",
            self.core_lock_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            s,
            "# HELP w2w_messages_total MSG frames accepted, by route.\n# TYPE w2w_messages_total counter"
        );
        for r in ROUTES {
            let _ = writeln!(
                s,
                "w2w_messages_total{{route=\"{}\"}} {}",
                r.as_str(),
                self.messages[r as usize - 1].load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP w2w_receipts_total Receipts sent, by outcome.\n# TYPE w2w_receipts_total counter"
        );
        for st in STATUSES {
            let _ = writeln!(
                s,
                "w2w_receipts_total{{status=\"{}\"}} {}",
                st.as_str(),
                self.receipts[st as usize].load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP w2w_errors_total Errors, rejections and drops, by reason.\n# TYPE w2w_errors_total counter"
        );
        for c in ErrorCode::ALL {
            let _ = writeln!(
                s,
                "w2w_errors_total{{reason=\"{}\"}} {}",
                c.as_str(),
                self.error_count(*c)
            );
        }
        self.registration_seconds.render(
            &mut s,
            "w2w_registration_seconds",
            "Time from WebSocket upgrade to REPLY_BACK for client registrations.",
        );
        s
    }
}

/// Upper bounds of the histogram buckets, in seconds (Prometheus'
/// defaults with a 1 ms and a 2.5 ms bucket added at the bottom).
const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram in fixed buckets: one relaxed add per observation,
/// rendered cumulatively in the Prometheus histogram format.
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub(crate) fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            match BUCKETS.get(i) {
                Some(b) => {
                    let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// One peer link as `/metrics` and `/status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLinkView {
    /// The peer's relay key, if known (a configured peer never reached has none).
    pub peer: Option<w2w_proto::Address>,
    pub url: String,
    pub up: bool,
    /// Dialled from `--peer` (else: it dialled us).
    pub configured: bool,
}

/// What `/metrics` adds about the relay as a whole, beyond the counters.
#[derive(Debug, Clone, Default)]
pub struct RelayGauges {
    pub uptime: std::time::Duration,
    pub peers: Vec<PeerLinkView>,
    /// Messages (copies, one per recipient) in the durable queue.
    pub store_messages: u64,
    /// Bytes they are charged (see `budget`): on disk, committed.
    pub store_bytes: u64,
    /// Bytes admitted and not yet committed.
    pub store_pending_bytes: u64,
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl RelayGauges {
    /// Appends these gauges to `s` (the output of [`Metrics::render`]).
    pub fn render(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "# HELP w2w_uptime_seconds Seconds since the relay started.\n# TYPE w2w_uptime_seconds gauge\nw2w_uptime_seconds {}",
            self.uptime.as_secs()
        );
        let _ = writeln!(
            s,
            "# HELP w2w_build_info The relay's version.\n# TYPE w2w_build_info gauge\nw2w_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            s,
            "# HELP w2w_peer_link_up Peer links: 1 up, 0 down (configured peers not reached).\n# TYPE w2w_peer_link_up gauge"
        );
        for p in &self.peers {
            let _ = writeln!(
                s,
                "w2w_peer_link_up{{peer=\"{}\",url=\"{}\",configured=\"{}\"}} {}",
                p.peer.map(|k| k.short()).unwrap_or_default(),
                label(&p.url),
                p.configured,
                u8::from(p.up)
            );
        }
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "w2w_store_queued_messages",
            "Message copies in the durable queue for offline recipients (stored or being written).",
            self.store_messages,
        );
        gauge(
            "w2w_store_queued_bytes",
            "Bytes of queued messages on disk (each copy charged at least 512).",
            self.store_bytes,
        );
        gauge(
            "w2w_store_pending_bytes",
            "Bytes of queued messages admitted and not yet committed.",
            self.store_pending_bytes,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_label() {
        let m = Metrics::default();
        m.message(Route::A2g);
        m.error(ErrorCode::SlowConsumer);
        let out = m.render();
        assert!(out.contains("w2w_messages_total{route=\"a2g\"} 1"));
        assert!(out.contains("w2w_errors_total{reason=\"slow_consumer\"} 1"));
        assert!(out.contains("w2w_receipts_total{status=\"no_route\"} 0"));
        assert!(out.contains("# TYPE w2w_registration_seconds histogram"));
        assert!(ErrorCode::ALL
            .iter()
            .all(|c| (c.as_u16() as usize) < CODE_SLOTS));
    }

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_micros(500));
        h.observe(std::time::Duration::from_millis(30));
        h.observe(std::time::Duration::from_secs(60));
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "X.");
        assert!(s.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.025\"} 1\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.05\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(
            s.contains("x_seconds_sum 60.0305\nx_seconds_count 3\n"),
            "{s}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
