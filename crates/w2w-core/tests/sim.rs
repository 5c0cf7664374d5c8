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
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = SimConfig::default();
    assert_eq!(run(42, &cfg), run(42, &cfg));
}
