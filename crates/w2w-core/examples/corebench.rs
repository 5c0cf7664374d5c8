//! The core's own cost per a2b message, without I/O: what a relay spends
//! under its core lock for one MSG and its ACK (routing, the flight, the
//! receipt), measured on one thread.
//!
//! `cargo run --release -p w2w-core --example corebench -- [--pairs N]
//! [--messages M] [--rounds R]`: `pairs` senders each send to their own
//! receiver, `window` messages in flight per pair (handed, then
//! acknowledged in a batch like the raw load's ACKs); prints ns per message
//! for each round and the median. The caller's work (sockets, WebSocket
//! framing, the lock itself) is not in it: compare with the relay's CPU per
//! message in `w2w-bench compare`. With `--threads T`, T shards (shard.rs)
//! each on its own thread with its own clients, against one shard on one
//! thread, alternated: how the core's work spreads over cores.

use std::time::{Duration, Instant};

use bytes::Bytes;
use w2w_core::shard::shard_of;
use w2w_core::{Config, ConnId, RelayCore, StoreDone, StoreOp};
use w2w_proto::frame::{ClientToRelay, Dest, Msg, MsgId};
use w2w_proto::Identity;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Answers the store's reads (nothing stored) so sessions go live.
fn serve_store(core: &mut RelayCore, now: Instant) {
    while let Some(op) = core.poll_store() {
        if let StoreOp::Read { token, .. } = op {
            core.store_done(
                now,
                StoreDone::Read {
                    token,
                    result: Ok(Vec::new()),
                },
            );
        }
    }
}

/// One shard's core (`shard` of `count`) moving `messages` a2b messages
/// between `pairs` pairs of its own clients; returns how long it took.
fn run_core(shard: usize, count: usize, pairs: usize, messages: usize, window: usize) -> Duration {
    let mut core = RelayCore::new(Config::default(), Identity::from_seed([1; 32]), 1, []);
    core.set_shard(shard, count);
    let mut now = Instant::now();
    // Clients whose addresses are in this shard.
    let ids: Vec<Identity> = (0u32..)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            seed[31] = 7;
            Identity::from_seed(seed)
        })
        .filter(|id| shard_of(&id.address(), count) == shard)
        .take(2 * pairs)
        .collect();
    for (i, id) in ids.iter().enumerate() {
        core.connect(now, ConnId(i as u64), id.address(), None, true)
            .expect("connect");
    }
    serve_store(&mut core, now);
    while core.poll_transmit().is_some() {}
    // Each pair's frames, encoded before the clock starts.
    let frames: Vec<Vec<(Bytes, Msg)>> = (0..pairs)
        .map(|p| {
            (0..window)
                .map(|w| {
                    let msg = Msg {
                        flags: 0,
                        id: MsgId([0; 16]),
                        from: ids[2 * p].address(),
                        dest: Dest::A2b(ids[2 * p + 1].address()),
                        payload: Bytes::from(vec![w as u8; 64]),
                    };
                    (ClientToRelay::Msg(msg.clone()).encode(), msg)
                })
                .collect()
        })
        .collect();
    let mut sent = 0u64;
    let mut out = 0u64;
    let mut acks = vec![Vec::with_capacity(window); pairs];
    let start = Instant::now();
    while sent < messages as u64 {
        for (p, batch) in frames.iter().enumerate() {
            for (frame, msg) in batch {
                // A fresh id per message (the frame's bytes are the
                // template's: the core routes by the decoded header).
                let mut msg = msg.clone();
                msg.id = MsgId((sent as u128).to_le_bytes());
                sent += 1;
                core.handle_msg(now, ConnId(2 * p as u64), frame.clone(), &msg, None);
                acks[p].push(msg.id);
            }
            while core.poll_transmit().is_some() {
                out += 1;
            }
            core.handle_ack(now, ConnId(2 * p as u64 + 1), &acks[p]);
            acks[p].clear();
            while core.poll_transmit().is_some() {
                out += 1;
            }
        }
        now += Duration::from_micros(100);
        if sent.is_multiple_of(65_536) {
            core.handle_timeout(now);
        }
    }
    let took = start.elapsed();
    assert_eq!(out, 2 * sent, "each message: one MSG out, one RECEIPT");
    assert_eq!(core.in_flight(), 0, "every message settled");
    took
}

/// `threads` shards, each on its own thread with `messages` messages:
/// messages per second over all of them.
fn sharded(threads: usize, pairs: usize, messages: usize, window: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| s.spawn(move || run_core(i, threads, pairs, messages, window)))
            .collect();
        for h in handles {
            h.join().expect("a shard's thread");
        }
    });
    (threads * messages) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let pairs = arg("--pairs", 4);
    let messages = arg("--messages", 1_000_000);
    let rounds = arg("--rounds", 5);
    let window = arg("--window", 32);
    let threads = arg("--threads", 1);
    if threads > 1 {
        // One shard on one thread, then `threads` shards on as many
        // threads, alternated: the core's own scaling (no I/O, no lock).
        let (mut one, mut many, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let a = sharded(1, pairs, messages, window);
            let b = sharded(threads, pairs, messages, window);
            eprintln!(
                "round {round}: 1 shard {a:.0} msgs/s, {threads} shards {b:.0} msgs/s ({:.2}x)",
                b / a
            );
            one.push(a);
            many.push(b);
            ratio.push(b / a);
        }
        for v in [&mut one, &mut many, &mut ratio] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
        println!(
            "core, a2b: 1 shard {:.0} msgs/s, {threads} shards on {threads} threads {:.0} msgs/s (medians); \
             per round {threads} shards / 1: median {:.2}x, {:.2}x to {:.2}x ({rounds} rounds)",
            one[rounds / 2],
            many[rounds / 2],
            ratio[rounds / 2],
            ratio[0],
            ratio[rounds - 1]
        );
        return;
    }
    let mut results = Vec::new();
    for round in 0..rounds {
        let took = run_core(0, 1, pairs, messages, window);
        let ns = took.as_nanos() as f64 / messages as f64;
        eprintln!("round {round}: {messages} messages, {ns:.0} ns per message (MSG + ACK)");
        results.push(ns);
    }
    results.sort_by(|a, b| a.total_cmp(b));
    println!(
        "core, a2b: median {:.0} ns per message ({} rounds, {} pairs, window {})",
        results[results.len() / 2],
        rounds,
        pairs,
        window
    );
}
