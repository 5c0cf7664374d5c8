//! The delivery core under the deterministic simulation: many seeds, each a
//! different schedule of sends, link drops, store delays and failures, and
//! relay crashes. A failure names its seed; replay it with
//! `cargo run -p w2w-core --example sim -- --seed N`.

use w2w_core::sim::{run, SimConfig};

#[test]
fn a_thousand_seeds_keep_every_invariant() {
    let cfg = SimConfig::default();
    let mut total = w2w_core::sim::Report::default();
    for seed in 0..1000 {
        let r = run(seed, &cfg).unwrap_or_else(|e| panic!("{e}"));
        total.add(&r);
    }
    println!("{total:?}");
    // The schedules must have exercised what they are for.
    assert!(total.crashes > 500, "{total:?}");
    assert!(total.drops > 1000, "{total:?}");
    assert!(total.queued_entries > 1000, "{total:?}");
    assert!(total.delivered_entries > 10_000, "{total:?}");
    assert!(total.rejected_entries > 100, "{total:?}");
    assert!(total.delivered_notices > 1000, "{total:?}");
    assert!(total.slow > 100, "{total:?}");
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = SimConfig::default();
    assert_eq!(run(42, &cfg), run(42, &cfg));
}

#[test]
fn federated_relays_keep_every_invariant_through_cuts_partitions_and_crashes() {
    let cfg = SimConfig::federation();
    let mut total = w2w_core::sim::Report::default();
    for seed in 0..150 {
        let r = run(seed, &cfg).unwrap_or_else(|e| {
            panic!(
                "{e}\n  replay: cargo run -p w2w-core --example sim -- --seed {seed} --federation"
            )
        });
        total.add(&r);
    }
    println!("{total:?}");
    assert!(total.crashes > 100, "{total:?}");
    assert!(total.cuts > 300, "{total:?}");
    assert!(total.partitions > 50, "{total:?}");
    assert!(total.peer_frames > 100_000, "{total:?}");
    assert!(total.queued_entries > 500, "{total:?}");
    assert!(total.delivered_entries > 20_000, "{total:?}");
}

#[test]
fn federated_relays_of_several_shards_keep_every_invariant() {
    // Relays of several shards: peer frames routed by key, a FORWARD's
    // recipients served by their shards, one FORWARD per origin shard
    // joined at its target (shard.rs).
    let mut total = w2w_core::sim::Report::default();
    for seed in 0..120 {
        let mut cfg = SimConfig::federation();
        // Every relay of 2 or 3 shards, or each of its own count (1 to 4).
        cfg.mixed_shards = seed % 3 == 0;
        cfg.shards = if cfg.mixed_shards {
            4
        } else {
            2 + (seed % 2) as usize
        };
        let r = run(seed, &cfg).unwrap_or_else(|e| {
            let mixed = if cfg.mixed_shards { " --mixed-shards" } else { "" };
            panic!(
                "{e}\n  replay: cargo run -p w2w-core --example sim -- --seed {seed} --federation --shards {}{mixed}",
                cfg.shards
            )
        });
        total.add(&r);
    }
    println!("{total:?}");
    assert!(total.crashes > 80, "{total:?}");
    assert!(total.partitions > 40, "{total:?}");
    assert!(total.delivered_entries > 15_000, "{total:?}");
    assert!(total.group_remote > 500, "{total:?}");
    assert!(total.handed_off > 1_000, "{total:?}");
    assert!(total.forwards_joined > 0, "{total:?}");
}

#[test]
fn a_quiet_federation_of_forty_relays_delivers_without_loops() {
    let mut cfg = SimConfig::scale();
    cfg.relays = 40;
    cfg.clients = 400;
    cfg.messages = 4_000;
    cfg.warmup_us = 200_000;
    let r = run(7, &cfg).unwrap_or_else(|e| panic!("{e}"));
    println!("{r:?}");
    assert_eq!(r.loops, 0, "{r:?}");
    // Only the never-registered recipients (1 in 10 sends) are refused.
    assert!(r.rejected_entries * 8 < r.sent, "{r:?}");
    assert!(r.delivered_entries > r.sent, "{r:?}");
}

#[test]
fn two_hundred_relays_given_one_seed_all_join() {
    // Each relay knows relay 0 only; full relays answer with their peers'
    // URLs and the dialler walks on (issue 12, item 7).
    let mut cfg = SimConfig::bootstrap();
    cfg.clients = 400;
    cfg.messages = 2_000;
    let r = run(1, &cfg).unwrap_or_else(|e| panic!("{e}"));
    println!("{r:?}");
    assert!(r.redirects > 100, "relay 0 filled up and redirected: {r:?}");
    assert!(r.joined_us > 0, "{r:?}");
    assert!(r.delivered_entries > r.sent, "{r:?}");
}
