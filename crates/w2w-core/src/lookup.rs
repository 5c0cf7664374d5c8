//! Lookups on their way, shared by the directory (an address's records,
//! PROTOCOL 12.12) and named groups (a name's group records, 12.14).
//!
//! One lookup per key at a time; later waiters join it. Each round asks
//! the relays of the key's placement (the caller sends the GETs) and ends
//! when all of them answered, when the caller has found enough, or at its
//! deadline; a round that found nothing is followed by one more, and
//! rounds go on while the relay is still joining. What was found, and what
//! each waiter gets, is the caller's.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Instant;

use w2w_proto::Address;

/// One lookup: the current round's nonce and the relays it asked that have
/// not answered yet, what answers brought so far, and who waits.
#[derive(Debug)]
pub(crate) struct Lookup<R, W> {
    nonce: u64,
    asked: Vec<Address>,
    pub found: Vec<R>,
    pub waiters: Vec<W>,
    deadline: Instant,
    rounds: u8,
}

impl<R, W> Lookup<R, W> {
    /// Whether every relay this round asked has answered.
    pub fn all_answered(&self) -> bool {
        self.asked.is_empty()
    }
}

/// What [`Lookups::join`] did with a waiter.
pub(crate) enum Join<W> {
    /// It waits for the lookup of its key already on its way.
    Joined,
    /// That lookup has its most waiters: the waiter is given back.
    Full(W),
    /// No lookup of its key is on its way: the waiter is given back.
    Absent(W),
}

/// The lookups on their way, by key, and their deadlines.
#[derive(Debug)]
pub(crate) struct Lookups<K, R, W> {
    on: HashMap<K, Lookup<R, W>>,
    /// (deadline, round nonce) → key, in time order.
    deadlines: BTreeMap<(Instant, u64), K>,
}

impl<K, R, W> Default for Lookups<K, R, W> {
    fn default() -> Self {
        Lookups {
            on: HashMap::new(),
            deadlines: BTreeMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, R, W> Lookups<K, R, W> {
    pub fn len(&self) -> usize {
        self.on.len()
    }

    pub fn is_empty(&self) -> bool {
        self.on.is_empty()
    }

    /// Adds `w` to the lookup of `key`, if one is on its way and has fewer
    /// than `max_waiters`.
    pub fn join<Q>(&mut self, key: &Q, w: W, max_waiters: usize) -> Join<W>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.on.get_mut(key) {
            Some(l) if l.waiters.len() < max_waiters => {
                l.waiters.push(w);
                Join::Joined
            }
            Some(_) => Join::Full(w),
            None => Join::Absent(w),
        }
    }

    /// A new lookup of `key` for `w`, before its first round.
    pub fn start(&mut self, now: Instant, key: K, w: W) {
        let l = Lookup {
            nonce: 0,
            asked: Vec::new(),
            found: Vec::new(),
            waiters: vec![w],
            deadline: now,
            rounds: 0,
        };
        self.on.insert(key, l);
    }

    /// The lookup of `key` begins round `nonce`: it asked `asked`, who have
    /// until `deadline`. True when it asked no one and `finish_if_nobody`:
    /// the caller finishes it now; otherwise it waits for the deadline
    /// (when joining, the relays it may ask come later).
    pub fn round(
        &mut self,
        key: &K,
        nonce: u64,
        asked: Vec<Address>,
        deadline: Instant,
        finish_if_nobody: bool,
    ) -> bool {
        let Some(l) = self.on.get_mut(key) else {
            return false;
        };
        l.nonce = nonce;
        l.asked = asked;
        l.deadline = deadline;
        l.rounds = l.rounds.saturating_add(1);
        if l.asked.is_empty() && finish_if_nobody {
            return true;
        }
        self.deadlines.insert((deadline, nonce), key.clone());
        false
    }

    /// The lookup of `key`, for `reporter`'s answer to round `nonce`: once
    /// per relay that round asked (`None` for any other answer).
    pub fn answer<Q>(
        &mut self,
        key: &Q,
        nonce: u64,
        reporter: &Address,
    ) -> Option<&mut Lookup<R, W>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let l = self.on.get_mut(key)?;
        if l.nonce != nonce || !l.asked.contains(reporter) {
            return None;
        }
        l.asked.retain(|r| r != reporter);
        Some(l)
    }

    /// The next lookup whose round's deadline passed by `now`, and whether
    /// to ask again (nothing found in its first round, or still
    /// `joining`) rather than finish it.
    pub fn expired(&mut self, now: Instant, joining: bool) -> Option<(K, bool)> {
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().0 > now {
                return None;
            }
            let ((_, nonce), key) = entry.remove_entry();
            let Some(l) = self.on.get(&key) else {
                continue;
            };
            if l.nonce != nonce {
                continue; // a round since
            }
            let again = (l.rounds < 2 || joining) && l.found.is_empty();
            return Some((key, again));
        }
        None
    }

    /// Ends the lookup of `key`: what it found and its waiters.
    pub fn finish<Q>(&mut self, key: &Q) -> Option<Lookup<R, W>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let l = self.on.remove(key)?;
        self.deadlines.remove(&(l.deadline, l.nonce));
        Some(l)
    }

    /// When the next round's deadline falls.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.keys().next().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    type L = Lookups<u8, &'static str, u32>;

    fn relay(n: u8) -> Address {
        Address([n; 32])
    }

    #[test]
    fn waiters_join_one_lookup_up_to_a_bound() {
        let now = Instant::now();
        let mut l = L::default();
        assert!(matches!(l.join(&1, 10, 2), Join::Absent(10)));
        l.start(now, 1, 10);
        assert!(matches!(l.join(&1, 11, 2), Join::Joined));
        assert!(matches!(l.join(&1, 12, 2), Join::Full(12)));
        assert_eq!(l.len(), 1);
        assert_eq!(l.finish(&1).unwrap().waiters, vec![10, 11]);
        assert!(l.is_empty());
    }

    #[test]
    fn answers_count_once_per_relay_asked_in_the_current_round() {
        let now = Instant::now();
        let mut l = L::default();
        l.start(now, 1, 10);
        let asked = vec![relay(1), relay(2)];
        assert!(!l.round(&1, 7, asked, now + Duration::from_secs(1), true));
        assert!(l.answer(&1, 6, &relay(1)).is_none(), "an older round");
        assert!(l.answer(&1, 7, &relay(3)).is_none(), "a relay not asked");
        let a = l.answer(&1, 7, &relay(1)).unwrap();
        a.found.push("one");
        assert!(!a.all_answered());
        assert!(l.answer(&1, 7, &relay(1)).is_none(), "the same relay twice");
        assert!(l.answer(&1, 7, &relay(2)).unwrap().all_answered());
        let done = l.finish(&1).unwrap();
        assert_eq!(done.found, vec!["one"]);
        assert_eq!(l.next_deadline(), None, "its deadline went with it");
    }

    #[test]
    fn a_round_that_asked_no_one_finishes_unless_joining() {
        let now = Instant::now();
        let mut l = L::default();
        l.start(now, 1, 10);
        assert!(l.round(&1, 1, Vec::new(), now, true));
        assert_eq!(l.next_deadline(), None);
        // Joining: it waits for the deadline, then asks again.
        assert!(!l.round(&1, 2, Vec::new(), now, false));
        assert_eq!(l.next_deadline(), Some(now));
        assert_eq!(l.expired(now, true), Some((1, true)));
    }

    #[test]
    fn an_empty_first_round_is_asked_again_then_finished() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let mut l = L::default();
        l.start(now, 1, 10);
        l.round(&1, 1, vec![relay(1)], now + second, true);
        assert_eq!(l.expired(now, false), None, "not yet");
        assert_eq!(l.expired(now + second, false), Some((1, true)));
        l.round(&1, 2, vec![relay(1)], now + 2 * second, true);
        assert_eq!(l.expired(now + 2 * second, false), Some((1, false)));
        // A lookup that found something is finished at its first deadline.
        l.start(now, 2, 20);
        l.round(&2, 3, vec![relay(1), relay(2)], now + second, true);
        l.answer(&2, 3, &relay(1)).unwrap().found.push("x");
        assert_eq!(l.expired(now + second, false), Some((2, false)));
        // A deadline of a round since replaced is skipped.
        l.start(now, 3, 30);
        l.round(&3, 4, vec![relay(1)], now + second, true);
        l.round(&3, 5, vec![relay(1)], now + 3 * second, true);
        assert_eq!(l.expired(now + 2 * second, false), None);
    }
}
