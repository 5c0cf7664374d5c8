//! Per-IP budgets: open TCP connections and WebSocket handshakes.
//!
//! Counted by the client's address: the TCP peer, or, when the peer is a
//! trusted reverse proxy, the address the proxy names in
//! `X-Forwarded-For` (its last entry, the one the proxy itself added).
//! Both tables are bounded: past [`MAX_TRACKED`] addresses, idle entries
//! are swept, and if none is idle a new address is refused until some are.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ratelimit::TokenBucket;

/// Most addresses tracked in each table.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Default)]
struct Tables {
    conns: HashMap<IpAddr, u32>,
    buckets: HashMap<IpAddr, (TokenBucket, Instant)>,
}

/// The per-IP limits of one relay.
pub struct IpGate {
    max_conns: u32,
    rate: u32,
    burst: u32,
    tables: Mutex<Tables>,
}

/// One open connection counted against an address; given back on drop.
pub struct IpSlot {
    gate: Arc<IpGate>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut t = self.gate.lock();
        if let Some(n) = t.conns.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.conns.remove(&self.ip);
            }
        }
    }
}

impl IpGate {
    pub fn new(max_conns: usize, rate_per_sec: u32, burst: u32) -> Arc<Self> {
        Arc::new(IpGate {
            max_conns: max_conns.min(u32::MAX as usize) as u32,
            rate: rate_per_sec,
            burst,
            tables: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more open connection from `ip`; `None` when `ip` is at
    /// its limit (or too many addresses are tracked).
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut t = self.lock();
        if !t.conns.contains_key(&ip) && t.conns.len() >= MAX_TRACKED {
            return None;
        }
        let n = t.conns.entry(ip).or_default();
        if *n >= self.max_conns {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            gate: self.clone(),
            ip,
        })
    }

    /// Takes one handshake token for `ip`; `false` when it has none left.
    pub fn handshake(&self, ip: IpAddr, now: Instant) -> bool {
        let mut t = self.lock();
        if !t.buckets.contains_key(&ip) && t.buckets.len() >= MAX_TRACKED {
            // A bucket unused for long enough to refill is the same as a
            // new one: forget those.
            let refill =
                Duration::from_secs_f64(f64::from(self.burst.max(1)) / f64::from(self.rate.max(1)));
            t.buckets
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < refill);
            if t.buckets.len() >= MAX_TRACKED {
                return false;
            }
        }
        let (bucket, last) = t
            .buckets
            .entry(ip)
            .or_insert_with(|| (TokenBucket::new(self.rate, self.burst, now), now));
        *last = now;
        bucket.take(now)
    }
}

/// The client's address as a trusted proxy reports it: the last entry of
/// the last `X-Forwarded-For` header (the one the proxy appended).
pub fn forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_and_given_back() {
        let g = IpGate::new(2, 10, 10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = g.connect(ip).unwrap();
        let _b = g.connect(ip).unwrap();
        assert!(g.connect(ip).is_none());
        assert!(g.connect("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(g.connect(ip).is_some());
    }

    #[test]
    fn handshakes_are_rate_limited_per_address() {
        let g = IpGate::new(2, 10, 3);
        let (ip, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let t = Instant::now();
        assert_eq!((0..5).filter(|_| g.handshake(ip, t)).count(), 3);
        assert!(g.handshake(other, t));
        assert!(g.handshake(ip, t + Duration::from_millis(100)));
    }

    #[test]
    fn the_proxys_own_entry_is_used() {
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        h.append("x-forwarded-for", "9.9.9.9".parse().unwrap());
        assert_eq!(forwarded_for(&h), Some("9.9.9.9".parse().unwrap()));
        assert_eq!(forwarded_for(&http::HeaderMap::new()), None);
    }
}
