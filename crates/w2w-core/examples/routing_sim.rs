//! Link-state routing simulation over many seeds or relays:
//! `cargo run --release -p w2w-core --example routing_sim -- --relays 1000 --seeds 5`
//! `cargo run -p w2w-core --example routing_sim -- --seed 3`

use std::time::Instant;

use w2w_core::sim_routing::{run, RoutingSimConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<u64>().expect("a number"))
    };
    let cfg = RoutingSimConfig {
        relays: value("--relays").unwrap_or(100) as usize,
        changes: value("--changes").unwrap_or(60) as usize,
        ..RoutingSimConfig::default()
    };
    let seeds = match (value("--seed"), value("--seeds")) {
        (Some(s), _) => s..s + 1,
        (None, n) => 0..n.unwrap_or(20),
    };
    let started = Instant::now();
    let (mut frames, mut failed, mut runs) = (0u64, 0u64, 0u64);
    for seed in seeds {
        runs += 1;
        match run(seed, &cfg) {
            Ok(r) => frames += r.frames,
            Err(e) => {
                failed += 1;
                eprintln!("FAILED {e}\n  replay: cargo run -p w2w-core --example routing_sim -- --relays {} --seed {seed}", cfg.relays);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{runs} runs of {} relays in {secs:.1} s, {failed} failed: {frames} link-state frames ({:.0}/s)",
        cfg.relays,
        frames as f64 / secs
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
