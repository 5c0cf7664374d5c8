//! Token bucket, pure: the caller passes the time.

use std::time::Instant;

/// A token bucket of `burst` tokens refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate: rate_per_sec as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; `false` when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
}
