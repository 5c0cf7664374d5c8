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
            forwarded: AtomicU64::new(0),
            broadcast_skipped: AtomicU64::new(0),
            records_refused: AtomicU64::new(0),
            queued_total: AtomicU64::new(0),
            stored_total: AtomicU64::new(0),
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
        s
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
        assert!(ErrorCode::ALL
            .iter()
            .all(|c| (c.as_u16() as usize) < CODE_SLOTS));
    }
}
