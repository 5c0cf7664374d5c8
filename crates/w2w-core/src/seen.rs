//! The seen-cache: which forwarded messages a relay has already handled.
//!
//! A message reaches a relay more than once when a federation has cycles
//! (a broadcast floods every link) or a peer repeats it; the relay handles
//! the first copy and drops the others. The key includes a digest of the
//! MSG frame, so a forged frame that reuses a real message's id and origin
//! is another entry and cannot make the real one look like a duplicate.
//! Bounded in entries and in age, oldest forgotten first, a generation at
//! a time.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use w2w_proto::frame::MsgId;
use w2w_proto::Address;

/// What a relay remembers of one handled message: the first 16 bytes of
/// SHA-256 over (message id, origin relay, the target relay if any, the
/// MSG frame), see [`seen_key`]. 16 bytes instead of the 64 those fields
/// take, so a full cache of 100,000 entries stays small enough for the
/// CPU's caches (the forwarding hot path touches it twice per message).
pub type SeenKey = u128;

/// The key of a FORWARD: its message id and origin, the MSG frame and, for
/// one addressed to a relay, that relay and the recipients it lists. One
/// a2g for clients of two relays is two FORWARDs that may pass the same
/// relay on their way: they are two entries, not a duplicate (the
/// simulation found the second one dropped); so are two FORWARDs of one
/// message to one relay for other recipients (a sharded origin sends one
/// per shard, shard.rs).
/// The frame is in the key, so a forged frame that reuses a real message's
/// id and origin is another entry and cannot make the real one look like a
/// duplicate (a second preimage of a 128-bit SHA-256 prefix would be
/// needed). Fixed-size fields come first and the frame last, so no two
/// inputs hash the same bytes.
pub fn seen_key(
    id: &MsgId,
    origin: &Address,
    frame: &[u8],
    target: Option<(&Address, &[Address])>,
) -> SeenKey {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"w2w/v1 seen\0");
    h.update(id.0);
    h.update(origin.0);
    match target {
        Some((t, to)) => {
            h.update([1]);
            h.update(t.0);
            h.update((to.len() as u32).to_le_bytes());
            for a in to {
                h.update(a.0);
            }
        }
        None => h.update([0]),
    }
    h.update(frame);
    let full = h.finalize();
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    u128::from_le_bytes(d)
}

/// Bounded memory of seen messages, in two generations: new keys go into
/// the current one; when it holds `cap` keys or is `ttl` old, it becomes
/// the previous one and the previous one is forgotten whole. So a key is
/// remembered for at least `cap` newer keys or `ttl` (whichever comes
/// first, as with a queue of `cap` entries each `ttl` long) and at most
/// twice that, and at most `2 × cap` keys are held. Forgetting a
/// generation at once costs no hash-table removal per message: the
/// forwarding hot path touches one table to look up and one to insert.
#[derive(Debug)]
pub struct SeenCache {
    cap: usize,
    ttl: Duration,
    /// When the current generation took its first key.
    since: Option<Instant>,
    current: HashSet<SeenKey, ahash::RandomState>,
    previous: HashSet<SeenKey, ahash::RandomState>,
}

impl SeenCache {
    /// Each key remembered for at least `cap` newer keys (at least 16) or
    /// `ttl`, whichever comes first; at most `2 × cap` keys held.
    pub fn new(cap: usize, ttl: Duration) -> Self {
        Self::with_hasher(cap, ttl, ahash::RandomState::new())
    }

    /// The same, hashing with `hasher` (the core's, seeded by its caller:
    /// aHash, not SipHash, on the forwarding path).
    pub fn with_hasher(cap: usize, ttl: Duration, hasher: ahash::RandomState) -> Self {
        SeenCache {
            cap: cap.max(16),
            ttl,
            since: None,
            current: HashSet::with_hasher(hasher.clone()),
            previous: HashSet::with_hasher(hasher),
        }
    }

    /// Records the key; `false` if it was already there.
    pub fn insert(&mut self, key: SeenKey, now: Instant) -> bool {
        if self.current.contains(&key) || self.previous.contains(&key) {
            return false;
        }
        let age = self
            .since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if age >= self.ttl.saturating_mul(2) {
            // Both generations are past their time.
            self.current.clear();
            self.previous.clear();
            self.since = None;
        } else if self.current.len() >= self.cap || age >= self.ttl {
            // (The tables keep their memory: no allocation per generation.)
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
            self.since = None;
        }
        self.since.get_or_insert(now);
        self.current.insert(key);
        true
    }

    /// Whether the key is remembered (it may have expired but not yet be
    /// forgotten: an entry counts until an insert drops its generation).
    pub fn contains(&self, key: &SeenKey) -> bool {
        self.current.contains(key) || self.previous.contains(key)
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_entries_and_age_and_dedupes() {
        let mut c = SeenCache::new(16, Duration::from_secs(60));
        let t = Instant::now();
        let k = |i: u8| seen_key(&MsgId([i; 16]), &Address([0; 32]), b"m", None);
        assert!(c.insert(k(1), t));
        assert!(!c.insert(k(1), t));
        // Remembered while fewer than `cap` newer keys came.
        for i in 2..=17 {
            assert!(c.insert(k(i), t));
            assert!(c.contains(&k(1)), "forgotten after {} newer keys", i - 1);
        }
        for i in 18..60 {
            c.insert(k(i), t);
            assert!(c.len() <= 32, "at most 2 × cap keys");
        }
        assert!(!c.contains(&k(1)));
        assert!(c.insert(k(1), t), "old keys are forgotten");
        // The same id and origin with another frame is another message.
        let other = seen_key(&MsgId([1; 16]), &Address([0; 32]), b"n", None);
        assert!(c.insert(other, t));
        // Kept for at least the ttl, forgotten by twice it.
        let mut c = SeenCache::new(1000, Duration::from_secs(60));
        assert!(c.insert(k(1), t));
        assert!(!c.insert(k(1), t + Duration::from_secs(59)));
        assert!(c.insert(k(2), t + Duration::from_secs(61)));
        assert!(c.contains(&k(1)), "within twice the ttl it may be kept");
        assert!(c.insert(k(3), t + Duration::from_secs(125)));
        assert!(!c.contains(&k(1)), "forgotten after twice the ttl");
        assert!(c.contains(&k(2)));
        assert!(c.insert(k(4), t + Duration::from_secs(400)));
        assert_eq!(c.len(), 1, "both generations expired");
        let (x, y) = (Address([1; 32]), Address([2; 32]));
        let id = MsgId([1; 16]);
        assert_ne!(
            seen_key(&id, &x, b"a", Some((&x, &[]))),
            seen_key(&id, &x, b"a", Some((&y, &[]))),
            "forwards of one message to two relays are two entries"
        );
        assert_ne!(
            seen_key(&id, &x, b"a", Some((&y, &[x]))),
            seen_key(&id, &x, b"a", Some((&y, &[y]))),
            "forwards of one message to one relay for other recipients are two entries"
        );
        assert_ne!(seen_key(&id, &x, b"a", None), seen_key(&id, &y, b"a", None));
        assert_ne!(
            seen_key(&id, &x, b"a", None),
            seen_key(&MsgId([2; 16]), &x, b"a", None)
        );
    }
}
