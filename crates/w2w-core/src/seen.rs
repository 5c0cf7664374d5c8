//! The seen-cache: which forwarded messages a relay has already handled.
//!
//! A message reaches a relay more than once when a federation has cycles
//! (a broadcast floods every link) or a peer repeats it; the relay handles
//! the first copy and drops the others. The key includes a digest of the
//! MSG frame, so a forged frame that reuses a real message's id and origin
//! is another entry and cannot make the real one look like a duplicate.
//! Bounded in entries and in age, oldest forgotten first.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use w2w_proto::frame::MsgId;
use w2w_proto::Address;

/// (message id, origin relay, [`digest`] of the MSG frame).
pub type SeenKey = (MsgId, Address, [u8; 16]);

/// The first 16 bytes of SHA-256 over a MSG frame.
pub fn digest(frame: &[u8]) -> [u8; 16] {
    forward_digest(frame, None)
}

/// The digest of a FORWARD: its MSG frame and, for one addressed to a
/// relay, that relay. One a2g for clients of two relays is two FORWARDs
/// that may pass the same relay on their way: they are two entries, not a
/// duplicate (the simulation found the second one dropped).
pub fn forward_digest(frame: &[u8], target: Option<&Address>) -> [u8; 16] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(frame);
    if let Some(t) = target {
        h.update(t.0);
    }
    let full = h.finalize();
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// Bounded memory of seen messages.
#[derive(Debug)]
pub struct SeenCache {
    cap: usize,
    ttl: Duration,
    order: VecDeque<(Instant, SeenKey)>,
    set: HashSet<SeenKey, ahash::RandomState>,
}

impl SeenCache {
    /// At most `cap` entries (at least 16), each for at most `ttl`.
    pub fn new(cap: usize, ttl: Duration) -> Self {
        Self::with_hasher(cap, ttl, ahash::RandomState::new())
    }

    /// The same, hashing with `hasher` (the core's, seeded by its caller:
    /// aHash, not SipHash, on the forwarding path).
    pub fn with_hasher(cap: usize, ttl: Duration, hasher: ahash::RandomState) -> Self {
        SeenCache {
            cap: cap.max(16),
            ttl,
            order: VecDeque::new(),
            set: HashSet::with_hasher(hasher),
        }
    }

    /// Records the key; `false` if it was already there.
    pub fn insert(&mut self, key: SeenKey, now: Instant) -> bool {
        while let Some(&(t, k)) = self.order.front() {
            if now.saturating_duration_since(t) < self.ttl && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            self.set.remove(&k);
        }
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back((now, key));
        true
    }

    /// Whether the key is remembered (it may have expired but not yet be
    /// forgotten: an entry counts until an insert drops it).
    pub fn contains(&self, key: &SeenKey) -> bool {
        self.set.contains(key)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_entries_and_age_and_dedupes() {
        let mut c = SeenCache::new(16, Duration::from_secs(60));
        let t = Instant::now();
        let k = |i: u8| (MsgId([i; 16]), Address([0; 32]), [0u8; 16]);
        assert!(c.insert(k(1), t));
        assert!(!c.insert(k(1), t));
        for i in 2..40 {
            c.insert(k(i), t);
        }
        assert!(c.len() <= 16);
        assert!(c.insert(k(1), t), "oldest entries are forgotten");
        // The same id and origin with another frame is another message.
        let other = (MsgId([1; 16]), Address([0; 32]), [1u8; 16]);
        assert!(c.insert(other, t));
        // Old entries expire.
        let later = t + Duration::from_secs(61);
        assert!(c.insert(k(39), later), "expired after its ttl");
        assert_eq!(c.len(), 1);
        assert_ne!(digest(b"a"), digest(b"b"));
        let (x, y) = (Address([1; 32]), Address([2; 32]));
        assert_ne!(
            forward_digest(b"a", Some(&x)),
            forward_digest(b"a", Some(&y)),
            "forwards of one message to two relays are two entries"
        );
    }
}
