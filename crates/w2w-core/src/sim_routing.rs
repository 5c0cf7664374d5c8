//! Deterministic simulation of link-state routing across many relays.
//!
//! Relays in a random topology (at most `max_peers` links each) run the
//! flooding of PROTOCOL.md 12.4 with [`LinkStates`]: on a link change both
//! ends re-sign their record and flood it; a new link first gets the whole
//! database; a relay passes on a record newer than its own copy to every
//! peer but the sender; a relay that sees an older record of its own
//! re-signs above it. Frames on a link arrive in order after a random delay
//! and are lost when the link goes down. Faults: links cut and restored,
//! and the network split in two and healed.
//!
//! Invariant, once quiet: every relay's routes are the true shortest paths
//! of the links that are up (same distance; following next hops reaches
//! the relay in that many steps) and no relay outside its component is
//! reachable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use w2w_proto::s2s::LinkState;
use w2w_proto::{Address, Identity};

use crate::routing::LinkStates;
use crate::sim::Rng;

/// What one routing simulation does.
#[derive(Debug, Clone)]
pub struct RoutingSimConfig {
    pub relays: usize,
    pub max_peers: usize,
    /// Links each relay tries to make at the start.
    pub initial_links: usize,
    /// Link cuts and restorations after the start.
    pub changes: usize,
    /// Whether the network is split in two halfway and healed at the end.
    pub partition: bool,
    /// One-way link delay range (µs).
    pub delay_us: (u64, u64),
}

impl Default for RoutingSimConfig {
    fn default() -> Self {
        RoutingSimConfig {
            relays: 100,
            max_peers: 5,
            initial_links: 2,
            changes: 60,
            partition: true,
            delay_us: (100, 5_000),
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutingReport {
    /// Link-state frames delivered.
    pub frames: u64,
    pub link_changes: u64,
    /// Simulated time until quiet, µs.
    pub quiet_after_us: u64,
    /// Relay pairs checked at the end.
    pub pairs: u64,
}

struct Relay {
    identity: Identity,
    links: LinkStates,
    peers: BTreeSet<usize>,
    seq: u64,
}

type Edge = (usize, usize);

fn edge(a: usize, b: usize) -> Edge {
    (a.min(b), a.max(b))
}

struct Net<'a> {
    cfg: &'a RoutingSimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    relays: Vec<Relay>,
    index: BTreeMap<Address, usize>,
    /// Up links and their generation (frames of an older one are lost).
    up: BTreeMap<Edge, u64>,
    next_gen: u64,
    /// Per direction, when its last frame arrives (FIFO).
    last: BTreeMap<(usize, usize), u64>,
    events: BTreeMap<(u64, u64), (usize, usize, u64, LinkState)>,
    report: RoutingReport,
}

/// Runs one seeded routing simulation; `Err` names the violated invariant.
pub fn run(seed: u64, cfg: &RoutingSimConfig) -> Result<RoutingReport, String> {
    let mut rng = Rng::new(seed);
    let relays: Vec<Relay> = (0..cfg.relays)
        .map(|_| {
            let mut s = [0u8; 32];
            for c in s.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let identity = Identity::from_seed(s);
            Relay {
                links: LinkStates::new(identity.address()),
                identity,
                peers: BTreeSet::new(),
                seq: 0,
            }
        })
        .collect();
    let index = relays
        .iter()
        .enumerate()
        .map(|(i, r)| (r.identity.address(), i))
        .collect();
    let mut net = Net {
        cfg,
        rng,
        now: 0,
        seq: 0,
        relays,
        index,
        up: BTreeMap::new(),
        next_gen: 0,
        last: BTreeMap::new(),
        events: BTreeMap::new(),
        report: RoutingReport::default(),
    };
    net.go().map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(net.report)
}

impl Net<'_> {
    fn go(&mut self) -> Result<(), String> {
        let n = self.relays.len();
        for r in 0..n {
            self.sign(r);
        }
        // A random topology, every relay with a few links.
        for a in 0..n {
            for _ in 0..self.cfg.initial_links {
                let b = self.rng.range((0, n as u64 - 1)) as usize;
                self.link_up(a, b);
            }
        }
        self.run_until_quiet();
        let half = n / 2;
        for change in 0..self.cfg.changes {
            if self.cfg.partition && change == self.cfg.changes / 2 {
                // Split: every link between the halves goes down.
                let cut: Vec<Edge> = self
                    .up
                    .keys()
                    .copied()
                    .filter(|(a, b)| (*a < half) != (*b < half))
                    .collect();
                for (a, b) in cut {
                    self.link_down(a, b);
                }
            }
            let a = self.rng.range((0, n as u64 - 1)) as usize;
            let b = self.rng.range((0, n as u64 - 1)) as usize;
            let split = self.cfg.partition
                && change >= self.cfg.changes / 2
                && change + 1 < self.cfg.changes
                && (a < half) != (b < half);
            if self.up.contains_key(&edge(a, b)) {
                self.link_down(a, b);
            } else if !split {
                self.link_up(a, b);
            }
            // Let some frames through, not all: changes overlap.
            let until = self.now + self.rng.range((0, 3_000));
            self.run_until(until);
            if self.cfg.partition && change + 1 == self.cfg.changes {
                // Heal: a few links between the halves again.
                for _ in 0..4 {
                    let a = self.rng.range((0, half as u64 - 1)) as usize;
                    let b = half + self.rng.range((0, (n - half) as u64 - 1)) as usize;
                    self.link_up(a, b);
                }
            }
        }
        self.run_until_quiet();
        self.report.quiet_after_us = self.now;
        self.check()
    }

    /// Re-signs relay `r`'s record above everything it signed so far.
    fn sign(&mut self, r: usize) {
        self.relays[r].seq += 1;
        let neighbors: Vec<Address> = self.relays[r]
            .peers
            .iter()
            .map(|p| self.relays_addr(*p))
            .collect();
        let relay = &mut self.relays[r];
        let ls = LinkState::sign(&relay.identity, "", relay.seq, neighbors);
        relay.links.insert(ls);
        self.recompute(r);
    }

    fn relays_addr(&self, r: usize) -> Address {
        self.relays[r].identity.address()
    }

    fn recompute(&mut self, r: usize) {
        let peers: BTreeSet<Address> = self.relays[r]
            .peers
            .iter()
            .map(|p| self.relays[*p].identity.address())
            .collect();
        self.relays[r].links.recompute(|a| peers.contains(a));
    }

    fn link_up(&mut self, a: usize, b: usize) {
        if a == b
            || self.up.contains_key(&edge(a, b))
            || self.relays[a].peers.len() >= self.cfg.max_peers
            || self.relays[b].peers.len() >= self.cfg.max_peers
        {
            return;
        }
        self.report.link_changes += 1;
        self.next_gen += 1;
        self.up.insert(edge(a, b), self.next_gen);
        for (x, y) in [(a, b), (b, a)] {
            self.relays[x].peers.insert(y);
            self.sign(x);
            // The new peer gets the whole database; the others our record.
            let all: Vec<LinkState> = self.relays[x].links.records().cloned().collect();
            for ls in all {
                self.send(x, y, ls);
            }
            self.flood_own(x, Some(y));
        }
    }

    fn link_down(&mut self, a: usize, b: usize) {
        if self.up.remove(&edge(a, b)).is_none() {
            return;
        }
        self.report.link_changes += 1;
        for (x, y) in [(a, b), (b, a)] {
            self.relays[x].peers.remove(&y);
            self.sign(x);
            self.flood_own(x, None);
        }
    }

    fn flood_own(&mut self, r: usize, except: Option<usize>) {
        let Some(mine) = self.relays[r].links.mine().cloned() else {
            return;
        };
        let peers: Vec<usize> = self.relays[r].peers.iter().copied().collect();
        for p in peers {
            if Some(p) != except {
                self.send(r, p, mine.clone());
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, ls: LinkState) {
        let Some(&gen) = self.up.get(&edge(from, to)) else {
            return;
        };
        let want = self.now + self.rng.range(self.cfg.delay_us);
        let last = self.last.entry((from, to)).or_insert(0);
        let at = want.max(*last);
        *last = at;
        self.seq += 1;
        self.events.insert((at, self.seq), (from, to, gen, ls));
    }

    fn run_until_quiet(&mut self) {
        self.run_until(u64::MAX);
    }

    fn run_until(&mut self, until: u64) {
        while let Some((&(t, s), _)) = self.events.iter().next() {
            if t > until {
                break;
            }
            let Some((from, to, gen, ls)) = self.events.remove(&(t, s)) else {
                break;
            };
            self.now = t;
            if self.up.get(&edge(from, to)) != Some(&gen) {
                continue; // the link it was on went down
            }
            self.report.frames += 1;
            self.receive(to, from, ls);
        }
        if until != u64::MAX {
            self.now = self.now.max(until);
        }
    }

    /// Relay `r` receives `ls` from peer `from` (as `Federation::on_link_state`).
    fn receive(&mut self, r: usize, from: usize, ls: LinkState) {
        if self.index.get(&ls.relay) == Some(&r) {
            // An echo of an older record of ours: re-sign above it.
            if ls.seq >= self.relays[r].seq {
                self.relays[r].seq = ls.seq;
                self.sign(r);
                self.flood_own(r, None);
            }
            return;
        }
        if !self.relays[r].links.is_newer(&ls) {
            return;
        }
        self.relays[r].links.insert(ls.clone());
        self.recompute(r);
        let peers: Vec<usize> = self.relays[r].peers.iter().copied().collect();
        for p in peers {
            if p != from {
                self.send(r, p, ls.clone());
            }
        }
    }

    /// Every relay's routes against BFS over the links that are up.
    fn check(&mut self) -> Result<(), String> {
        let n = self.relays.len();
        let mut adj = vec![Vec::new(); n];
        for (a, b) in self.up.keys() {
            adj[*a].push(*b);
            adj[*b].push(*a);
        }
        for a in 0..n {
            let mut dist = vec![u32::MAX; n];
            dist[a] = 0;
            let mut q = VecDeque::from([a]);
            while let Some(u) = q.pop_front() {
                for &v in &adj[u] {
                    if dist[v] == u32::MAX {
                        dist[v] = dist[u] + 1;
                        q.push_back(v);
                    }
                }
            }
            for (b, &d) in dist.iter().enumerate() {
                if b == a {
                    continue;
                }
                self.report.pairs += 1;
                let addr = self.relays_addr(b);
                let hop = self.relays[a].links.hop(&addr);
                match (d, hop) {
                    (u32::MAX, None) => {}
                    (u32::MAX, Some(h)) => {
                        return Err(format!(
                            "relay {a} routes to {b}, which it cannot reach (via {:?}, {} hops)",
                            self.index.get(&h.next),
                            h.distance
                        ))
                    }
                    (_, None) => {
                        return Err(format!("relay {a} has no route to {b} ({d} hops away)"))
                    }
                    (_, Some(h)) if h.distance != d => {
                        return Err(format!(
                            "relay {a} routes to {b} in {} hops, the shortest is {d}",
                            h.distance
                        ))
                    }
                    (_, Some(_)) => {
                        // Following next hops gets there in d steps.
                        let mut at = a;
                        for _ in 0..d {
                            let Some(h) = self.relays[at].links.hop(&addr) else {
                                return Err(format!(
                                    "relay {at} on the way from {a} to {b} has no route"
                                ));
                            };
                            let Some(&next) = self.index.get(&h.next) else {
                                return Err("a next hop that is no relay".into());
                            };
                            if !self.up.contains_key(&edge(at, next)) {
                                return Err(format!("relay {at} routes over a link that is down"));
                            }
                            at = next;
                        }
                        if at != b {
                            return Err(format!(
                                "next hops from {a} do not reach {b} in {d} steps"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
