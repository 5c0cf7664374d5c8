//! The partitioned directory (PROTOCOL 12.12) at sizes the full simulation
//! cannot hold in one process: 1,000 and 10,000 relays, 1,000,000
//! addresses. A model, not a simulation: it uses the relay's own placement
//! (`w2w_core::closest`, the XOR walk the core runs) on random keys and
//! breadth-first hop counts over a random topology like the simulation's
//! (each relay ≤ `--degree` links), and counts what the protocol then
//! sends: no timing, no faults, no cores.
//!
//! `cargo run --release -p w2w-core --example dir_model -- --relays 1000,10000 --addresses 1000000`

use std::collections::VecDeque;
use std::time::Instant;

use w2w_core::closest;
use w2w_core::sim::Rng;
use w2w_proto::s2s::Presence;
use w2w_proto::Address;

/// Bytes of one held record: the `Presence` itself (a `Vec` of capacity
/// one per address), its URL, the directory's map entry (address → Vec)
/// and the lease map's entry ((address, relay) → Instant), each with
/// hashbrown's control byte, at its 7/8 load.
fn record_bytes() -> usize {
    let presence = std::mem::size_of::<Presence>();
    let url = 40;
    let dir_entry = (32 + std::mem::size_of::<Vec<Presence>>() + 1) * 8 / 7;
    let lease_entry = (64 + std::mem::size_of::<Instant>() + 1) * 8 / 7;
    presence + url + dir_entry + lease_entry
}

/// On the wire: a PRESENCE body with a 40-byte URL (283 + L) in a DIR_PUT
/// of one record (36-byte head), or a DIR_GET (76 bytes).
const PUT_BYTES: usize = 36 + 283 + 40;
const GET_BYTES: usize = 76;

fn topology(rng: &mut Rng, n: usize, degree: usize) -> Vec<Vec<u32>> {
    let mut adj: Vec<Vec<u32>> = vec![Vec::new(); n];
    let link = |adj: &mut Vec<Vec<u32>>, a: usize, b: usize| {
        let free = adj[a].len() < degree && adj[b].len() < degree;
        if a != b && free && !adj[a].contains(&(b as u32)) {
            adj[a].push(b as u32);
            adj[b].push(a as u32);
        }
    };
    // A tree first (each relay links to an earlier one with a free slot:
    // connected), then up to two more links each, at random.
    let mut open: Vec<usize> = vec![0];
    for a in 1..n {
        let i = rng.below(open.len());
        let b = open[i];
        link(&mut adj, a, b);
        if adj[b].len() >= degree {
            open.swap_remove(i);
        }
        open.push(a);
    }
    for a in 0..n {
        for _ in 0..2 {
            let b = rng.below(n);
            link(&mut adj, a, b);
        }
    }
    adj
}

fn bfs(adj: &[Vec<u32>], from: usize) -> Vec<u16> {
    let mut dist = vec![u16::MAX; adj.len()];
    dist[from] = 0;
    let mut q = VecDeque::from([from]);
    while let Some(x) = q.pop_front() {
        for &y in &adj[x] {
            let y = y as usize;
            if dist[y] == u16::MAX {
                dist[y] = dist[x] + 1;
                q.push_back(y);
            }
        }
    }
    dist
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let relays: Vec<usize> = value("--relays")
        .unwrap_or_else(|| "1000,10000".into())
        .split(',')
        .map(|v| v.parse().expect("a number"))
        .collect();
    let addresses: usize = value("--addresses").map_or(1_000_000, |v| v.parse().expect("a number"));
    let k: usize = value("--replicas").map_or(4, |v| v.parse().expect("a number"));
    let degree: usize = value("--degree").map_or(5, |v| v.parse().expect("a number"));
    let seed: u64 = value("--seed").map_or(1, |v| v.parse().expect("a number"));
    let lease_s = 120.0;
    println!(
        "directory model: {addresses} addresses, k = {k} replicas, ≤ {degree} links per relay, seed {seed}; one held record ≈ {} bytes",
        record_bytes()
    );
    for &r in &relays {
        let started = Instant::now();
        let mut rng = Rng::new(seed);
        let mut ring: Vec<Address> = (0..r).map(|_| Address(rng.bytes())).collect();
        ring.sort_unstable();
        ring.dedup();
        let index = |a: &Address, ring: &[Address]| ring.binary_search(a).expect("in the ring");
        let adj = topology(&mut rng, ring.len(), degree);
        // Hop counts from a sample of relays.
        let sources: Vec<usize> = (0..64).map(|_| rng.below(ring.len())).collect();
        let dists: Vec<Vec<u16>> = sources.iter().map(|&s| bfs(&adj, s)).collect();
        let mut path_sum = 0u64;
        let mut path_n = 0u64;
        let mut diameter = 0u16;
        for d in &dists {
            for &h in d.iter().filter(|h| **h > 0) {
                path_sum += h as u64;
                path_n += 1;
                diameter = diameter.max(h);
            }
        }
        let mut held = vec![0u32; ring.len()];
        let mut put_frames = 0u64;
        let mut nearest_hops = 0u64;
        for _ in 0..addresses {
            let addr = Address(rng.bytes());
            // Its home (any relay) holds its record too; its puts and
            // lookups are measured from a sampled relay (same distribution).
            let home = rng.below(ring.len());
            let s = rng.below(sources.len());
            let from = sources[s];
            let holders = closest(&ring, &addr, k);
            let mut home_holds = false;
            let mut nearest = u16::MAX;
            for h in &holders {
                let i = index(h, &ring);
                held[i] += 1;
                home_holds |= i == home;
                let hops = dists[s][i];
                put_frames += hops as u64;
                if i != from {
                    nearest = nearest.min(hops);
                }
            }
            if !home_holds {
                held[home] += 1;
            }
            nearest_hops += nearest.min(diameter) as u64;
        }
        let mut sorted = held.clone();
        sorted.sort_unstable();
        let mean = held.iter().map(|&h| h as f64).sum::<f64>() / held.len() as f64;
        let max = *sorted.last().unwrap_or(&0);
        let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
        let b = record_bytes() as f64;
        // A relay that joins: the records whose holders it becomes.
        let newcomers = 20;
        let mut share = 0u64;
        for _ in 0..newcomers {
            let key = Address(rng.bytes());
            let mut with = ring.clone();
            let at = with.partition_point(|a| *a < key);
            with.insert(at, key);
            for _ in 0..(addresses / 100).max(1) {
                let addr = Address(rng.bytes());
                if closest(&with, &addr, k).contains(&key) {
                    share += 1;
                }
            }
        }
        let share = share as f64 * 100.0 / newcomers as f64;
        let per_join = put_frames as f64 / addresses as f64;
        let hops = path_sum as f64 / path_n as f64;
        // 1 % of the addresses reconnect per minute: a leave and a join.
        let events_per_s = addresses as f64 * 0.01 / 60.0 * 2.0;
        let churn_frames = events_per_s * per_join / ring.len() as f64;
        let renew_records = k as f64 * addresses as f64 / (lease_s / 3.0) / ring.len() as f64;
        println!(
            "\nR = {} relays (model built in {:.1} s)\n  paths: mean {:.2} hops, longest seen {}\n  records held per relay: mean {:.0}, p99 {}, max {} (k·A/R = {:.0}); ≈ {:.1} MiB mean, {:.1} MiB max (full replication: {} records, {:.0} MiB on every relay)\n  a join or leave: {} DIR_PUTs, {:.1} frames counted per hop, {:.1} KiB on the wire in all\n  a lookup: {} DIR_GETs + {} answers, {:.1} frames counted per hop, {:.1} KiB, done at the first answer: {:.2} hops each way (nearest holder)\n  a new relay becomes holder of ≈ {:.0} records (k·A/(R+1) = {:.0}), verified at ~100 µs each: {:.2} s of one core\n  1 %/min churn ({:.0} joins+leaves/s in the federation): {:.1} DIR_PUT frames/s per relay (received or passed on); renewals: {:.1} records/s per relay (every lease/3 = {} s)",
            ring.len(),
            started.elapsed().as_secs_f64(),
            hops,
            diameter,
            mean,
            p99,
            max,
            (k * addresses) as f64 / ring.len() as f64,
            mean * b / (1 << 20) as f64,
            max as f64 * b / (1 << 20) as f64,
            addresses,
            addresses as f64 * b / (1 << 20) as f64,
            k,
            per_join,
            per_join * PUT_BYTES as f64 / 1024.0,
            k,
            k,
            2.0 * per_join,
            per_join * (GET_BYTES + PUT_BYTES) as f64 / 1024.0,
            nearest_hops as f64 / addresses as f64,
            share,
            (k * addresses) as f64 / (ring.len() + 1) as f64,
            share * 100e-6,
            events_per_s,
            churn_frames,
            renew_records,
            lease_s / 3.0,
        );
    }
}
