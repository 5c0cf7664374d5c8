//! Link-state routing between relays.
//!
//! Every relay signs the list of its peers (`LinkState`, PROTOCOL.md 12.4)
//! and floods it. From the records it holds, a relay runs a breadth-first
//! search from itself over **two-way** edges only (both ends list each
//! other), starting from the peers it is actually linked to: the result is
//! the next hop and the distance toward every reachable relay. Paths are
//! shortest, and once records have spread every relay agrees on them, so
//! forwarding along next hops has no loops.
//!
//! Pure: signatures are checked by the caller before a record comes in.
//! Ordered maps, so iteration (and thus everything derived from it) depends
//! on the records only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use w2w_proto::s2s::LinkState;
use w2w_proto::Address;

/// The way toward a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The peer to hand a frame to.
    pub next: Address,
    /// Links to the relay (1: a peer).
    pub distance: u32,
}

/// The link-state records one relay holds, and the routes they give.
#[derive(Debug, Clone)]
pub struct LinkStates {
    me: Address,
    records: BTreeMap<Address, LinkState>,
    routes: BTreeMap<Address, Hop>,
}

impl LinkStates {
    pub fn new(me: Address) -> Self {
        LinkStates {
            me,
            records: BTreeMap::new(),
            routes: BTreeMap::new(),
        }
    }

    /// The record held for `relay`.
    pub fn get(&self, relay: &Address) -> Option<&LinkState> {
        self.records.get(relay)
    }

    /// Our own record (once [`Self::insert`]ed).
    pub fn mine(&self) -> Option<&LinkState> {
        self.records.get(&self.me)
    }

    /// Relays with a record (ourselves included).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every record, in relay-key order.
    pub fn records(&self) -> impl Iterator<Item = &LinkState> {
        self.records.values()
    }

    /// Whether `ls` is newer than the record held for its relay (true when
    /// none is held).
    pub fn is_newer(&self, ls: &LinkState) -> bool {
        self.records
            .get(&ls.relay)
            .is_none_or(|cur| ls.seq > cur.seq)
    }

    /// Keeps `ls` as its relay's record (the caller checked it is newer and
    /// signed). Routes change only at [`Self::recompute`].
    pub fn insert(&mut self, ls: LinkState) {
        self.records.insert(ls.relay, ls);
    }

    /// BFS from us over two-way edges. The first hops are the relays our
    /// own record lists that `linked` says we have a live link to.
    pub fn recompute(&mut self, linked: impl Fn(&Address) -> bool) {
        let mut routes = BTreeMap::new();
        let mut queue = VecDeque::new();
        let mut seen = BTreeSet::from([self.me]);
        if let Some(mine) = self.records.get(&self.me) {
            for n in &mine.neighbors {
                if linked(n) && seen.insert(*n) {
                    routes.insert(
                        *n,
                        Hop {
                            next: *n,
                            distance: 1,
                        },
                    );
                    queue.push_back(*n);
                }
            }
        }
        while let Some(u) = queue.pop_front() {
            let hop = routes[&u];
            let Some(ls) = self.records.get(&u) else {
                continue;
            };
            for v in &ls.neighbors {
                let two_way = self
                    .records
                    .get(v)
                    .is_some_and(|x| x.neighbors.contains(&u));
                if two_way && seen.insert(*v) {
                    routes.insert(
                        *v,
                        Hop {
                            next: hop.next,
                            distance: hop.distance + 1,
                        },
                    );
                    queue.push_back(*v);
                }
            }
        }
        self.routes = routes;
    }

    /// The way toward `relay`, if it is reachable.
    pub fn hop(&self, relay: &Address) -> Option<Hop> {
        self.routes.get(relay).copied()
    }

    /// Relays reachable from here, in key order.
    pub fn reachable(&self) -> impl Iterator<Item = &Address> {
        self.routes.keys()
    }

    pub fn reachable_count(&self) -> usize {
        self.routes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use w2w_proto::Identity;

    #[test]
    fn bfs_uses_two_way_edges_and_shortest_paths() {
        // me - b - c in a line, c - e - me around the other way (longer to
        // c? no: me-e-c is also 2), and a one-way claim d -> me.
        let ids: Vec<Identity> = (1..=5).map(|i| Identity::from_seed([i; 32])).collect();
        let [me, b, c, d, e] = std::array::from_fn(|i| ids[i].address());
        let mut ls = LinkStates::new(me);
        ls.insert(LinkState::sign(&ids[0], "ws://me/", 1, vec![b]));
        ls.insert(LinkState::sign(&ids[1], "ws://b/", 1, vec![me, c]));
        ls.insert(LinkState::sign(&ids[2], "ws://c/", 1, vec![b, e]));
        ls.insert(LinkState::sign(&ids[3], "ws://d/", 1, vec![me]));
        ls.insert(LinkState::sign(&ids[4], "ws://e/", 1, vec![c]));
        ls.recompute(|p| *p == b);
        assert_eq!(
            ls.hop(&b),
            Some(Hop {
                next: b,
                distance: 1
            })
        );
        assert_eq!(
            ls.hop(&c),
            Some(Hop {
                next: b,
                distance: 2
            })
        );
        assert_eq!(
            ls.hop(&e),
            Some(Hop {
                next: b,
                distance: 3
            })
        );
        assert_eq!(ls.hop(&d), None, "one-way edge ignored");
        // Our record lists b, but with the link down nothing is reachable.
        ls.recompute(|_| false);
        assert_eq!(ls.reachable_count(), 0);
    }

    #[test]
    fn only_newer_records_replace_older_ones() {
        let a = Identity::from_seed([1; 32]);
        let mut ls = LinkStates::new(Identity::from_seed([9; 32]).address());
        let old = LinkState::sign(&a, "ws://a/", 5, vec![]);
        assert!(ls.is_newer(&old));
        ls.insert(old.clone());
        assert!(!ls.is_newer(&old));
        assert!(!ls.is_newer(&LinkState::sign(&a, "ws://a/", 4, vec![])));
        assert!(ls.is_newer(&LinkState::sign(&a, "ws://a/", 6, vec![])));
    }
}
