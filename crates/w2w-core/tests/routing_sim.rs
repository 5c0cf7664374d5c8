//! Link-state routing across 100 relays in random topologies, with links
//! cut and restored and the network split and healed: once quiet, every
//! relay's routes are the true shortest paths. A failure names its seed;
//! replay it with `cargo run -p w2w-core --example routing_sim -- --seed N`.

use w2w_core::sim_routing::{run, RoutingSimConfig};

#[test]
fn routes_converge_to_shortest_paths_after_link_changes_and_a_partition() {
    let cfg = RoutingSimConfig {
        changes: 30,
        ..RoutingSimConfig::default()
    };
    // Few seeds here (a debug build signs slowly); many in the long run:
    // `cargo run --release -p w2w-core --example routing_sim -- --seeds 1000`.
    let mut frames = 0;
    for seed in 0..2 {
        let r = run(seed, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.pairs, 100 * 99);
        assert!(r.link_changes > 50, "{r:?}");
        frames += r.frames;
    }
    assert!(frames > 10_000, "{frames} frames");
}

#[test]
fn a_routing_seed_replays_exactly() {
    let cfg = RoutingSimConfig {
        relays: 30,
        ..RoutingSimConfig::default()
    };
    assert_eq!(run(7, &cfg), run(7, &cfg));
}
