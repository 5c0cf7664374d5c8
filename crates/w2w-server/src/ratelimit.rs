//! Rate limits, pure: the caller passes the time.
//!
//! [`TokenBucket`] counts frames; [`ByteBudget`] charges fan-out bytes and
//! may go into debt (one large broadcast passes, then its sender waits it
//! off); [`SenderLimits`] keeps both per sending address, not per
//! connection, so reconnecting does not refill them.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// aHash, keyed per process (see `federation`).
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// A level that refills at `rate` per second up to `cap`, starting full.
#[derive(Debug)]
struct Level {
    rate: f64,
    cap: f64,
    level: f64,
    last: Instant,
}

impl Level {
    fn new(rate: f64, cap: f64, now: Instant) -> Self {
        let cap = cap.max(1.0);
        Level {
            rate,
            cap,
            level: cap,
            last: now,
        }
    }

    /// The level at `now`.
    fn at(&mut self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.level = (self.level + dt * self.rate).min(self.cap);
        self.level
    }

    /// Whether the level is back at its cap at `now` (a budget can then be
    /// forgotten: a new one would behave the same).
    fn is_full(&mut self, now: Instant) -> bool {
        self.at(now) >= self.cap
    }
}

/// A token bucket of `burst` tokens refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket(Level);

impl TokenBucket {
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        TokenBucket(Level::new(rate_per_sec as f64, burst as f64, now))
    }

    /// Takes one token; `false` when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.0.at(now) >= 1.0 {
            self.0.level -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again at `now`.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.0.is_full(now)
    }
}

/// Bytes per second with a burst, charged after the fact: a charge is
/// allowed while the budget is not in debt, and may take it into debt
/// (so a single message larger than the burst can still be sent, and its
/// sender then waits until the debt is paid off).
#[derive(Debug)]
pub struct ByteBudget(Level);

impl ByteBudget {
    pub fn new(rate_per_sec: u64, burst: u64, now: Instant) -> Self {
        ByteBudget(Level::new(rate_per_sec as f64, burst as f64, now))
    }

    /// Charges `bytes` if the budget is not in debt; `false` (nothing
    /// charged) when it is.
    pub fn charge(&mut self, bytes: u64, now: Instant) -> bool {
        if self.0.at(now) <= 0.0 {
            return false;
        }
        self.0.level -= bytes as f64;
        true
    }

    /// Charges `bytes` whatever the level (into debt if need be): for
    /// fan-out known only after the message was let through.
    pub fn charge_after(&mut self, bytes: u64, now: Instant) {
        self.0.at(now);
        self.0.level -= bytes as f64;
    }

    /// Whether the budget is full again at `now`.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.0.is_full(now)
    }
}

/// One sender's budgets: frames (MSG and REQUEST) and fan-out bytes.
#[derive(Debug)]
pub struct SenderBudget {
    pub frames: TokenBucket,
    pub bytes: ByteBudget,
}

/// How much one sender may do.
#[derive(Debug, Clone, Copy)]
pub struct SenderRates {
    pub frames_per_sec: u32,
    pub frames_burst: u32,
    pub bytes_per_sec: u64,
    pub bytes_burst: u64,
}

/// Budgets per sending address, shared by all its connections (and kept
/// across reconnections until they are full again).
pub struct SenderLimits {
    rates: SenderRates,
    map: Mutex<HashMap<[u8; 32], Arc<Mutex<SenderBudget>>>>,
    /// Past this many remembered senders, ones with full budgets and no
    /// connection are forgotten.
    sweep_at: Mutex<usize>,
}

impl SenderLimits {
    pub fn new(rates: SenderRates) -> Self {
        SenderLimits {
            rates,
            map: Mutex::new(HashMap::default()),
            sweep_at: Mutex::new(1024),
        }
    }

    /// The budget of `sender`, made full if it has none.
    pub fn get(&self, sender: &[u8; 32], now: Instant) -> Arc<Mutex<SenderBudget>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(sender) {
            return b.clone();
        }
        let mut sweep_at = self.sweep_at.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= *sweep_at {
            // Forget budgets nobody holds and that have refilled: a fresh
            // one is the same. What stays is bounded by the connections
            // plus the senders that were active in the last few seconds.
            map.retain(|_, b| {
                Arc::strong_count(b) > 1 || {
                    let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
                    !(b.frames.is_full(now) && b.bytes.is_full(now))
                }
            });
            *sweep_at = (map.len() * 2).max(1024);
        }
        let r = self.rates;
        let b = Arc::new(Mutex::new(SenderBudget {
            frames: TokenBucket::new(r.frames_per_sec, r.frames_burst, now),
            bytes: ByteBudget::new(r.bytes_per_sec, r.bytes_burst, now),
        }));
        map.insert(*sender, b.clone());
        b
    }

    /// Remembered senders (for tests and metrics).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 5);
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // Never refills past the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 5);
    }

    #[test]
    fn a_charge_after_the_fact_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = ByteBudget::new(1000, 1000, t0);
        b.charge_after(3000, t0);
        assert!(!b.charge(1, t0), "in debt: refused");
        assert!(!b.charge(1, t0 + std::time::Duration::from_millis(1500)));
        assert!(b.charge(1, t0 + std::time::Duration::from_millis(2100)));
    }

    #[test]
    fn byte_budget_lets_one_large_charge_through_then_waits_off_the_debt() {
        let t0 = Instant::now();
        let mut b = ByteBudget::new(1000, 1000, t0);
        assert!(
            b.charge(5000, t0),
            "a charge larger than the burst passes once"
        );
        assert!(!b.charge(1, t0), "then the budget is in debt");
        // 4,000 bytes of debt at 1,000/s: still in debt after 3.9 s.
        assert!(!b.charge(1, t0 + Duration::from_millis(3900)));
        assert!(b.charge(1, t0 + Duration::from_millis(4100)));
        assert!(!b.is_full(t0 + Duration::from_millis(4100)));
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_sender_keeps_its_budget_across_connections_and_idle_ones_are_forgotten() {
        let t0 = Instant::now();
        let limits = SenderLimits::new(SenderRates {
            frames_per_sec: 10,
            frames_burst: 2,
            bytes_per_sec: 1000,
            bytes_burst: 1000,
        });
        let first = limits.get(&[1; 32], t0);
        assert!(first.lock().unwrap().frames.take(t0));
        assert!(first.lock().unwrap().frames.take(t0));
        drop(first);
        // A reconnection gets the same, empty, bucket.
        let second = limits.get(&[1; 32], t0);
        assert!(!second.lock().unwrap().frames.take(t0));
        drop(second);
        // Thousands of one-off senders: the map is swept, not grown without
        // bound, once their budgets are full again.
        let later = t0 + Duration::from_secs(5);
        for i in 0..5000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 9;
            limits.get(&k, later);
        }
        assert!(limits.len() <= 2048, "{} senders remembered", limits.len());
    }
}
