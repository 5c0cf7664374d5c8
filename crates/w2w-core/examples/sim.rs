//! Runs the simulation over many seeds, or replays one:
//! `cargo run --release -p w2w-core --example sim -- --seeds 100000`
//! `cargo run -p w2w-core --example sim -- --seed 1234`
//! Presets: `--federation` (6 relays, link cuts, partitions), `--scale`
//! (100 relays, 10,000 clients, 1,000,000 messages), `--bootstrap` (200
//! relays that each know one seed); `--messages N`, `--relays N`,
//! `--clients N` change any preset; `--shards N` runs every relay as N
//! shards (`--mixed-shards`: relay r as 1 + r % N).

use std::time::Instant;

use w2w_core::sim::{run, Report, SimConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<u64>().expect("a number"))
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let mut cfg = if flag("--bootstrap") {
        SimConfig::bootstrap()
    } else if flag("--scale") {
        SimConfig::scale()
    } else if flag("--federation") {
        SimConfig::federation()
    } else {
        SimConfig::default()
    };
    if let Some(m) = value("--messages") {
        cfg.messages = m as usize;
    }
    if let Some(r) = value("--relays") {
        cfg.relays = r as usize;
    }
    if let Some(c) = value("--clients") {
        cfg.clients = c as usize;
    }
    if let Some(n) = value("--shards") {
        cfg.shards = (n as usize).max(1);
    }
    let mut preset = if flag("--bootstrap") {
        " --bootstrap"
    } else if flag("--scale") {
        " --scale"
    } else if flag("--federation") {
        " --federation"
    } else {
        ""
    }
    .to_string();
    cfg.mixed_shards = flag("--mixed-shards");
    if cfg.shards > 1 {
        preset += &format!(" --shards {}", cfg.shards);
    }
    if cfg.mixed_shards {
        preset += " --mixed-shards";
    }
    let (from, to) = match (value("--seed"), value("--seeds")) {
        (Some(s), _) => (s, s + 1),
        (None, Some(n)) => (
            value("--from").unwrap_or(0),
            value("--from").unwrap_or(0) + n,
        ),
        (None, None) => (0, 1000),
    };
    let started = Instant::now();
    let mut total = Report::default();
    let mut failed = 0;
    for seed in from..to {
        match run(seed, &cfg) {
            Ok(r) => total.add(&r),
            Err(e) => {
                failed += 1;
                eprintln!(
                    "FAILED {e}\n  replay: cargo run -p w2w-core --example sim -- --seed {seed}{preset}"
                );
            }
        }
        if (seed - from + 1) % 10_000 == 0 {
            eprintln!("{} seeds…", seed - from + 1);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds in {secs:.1} s, {failed} failed: {} messages ({:.0} messages/s), {} events ({:.0} events/s), {} peer frames, {} crashes, {} client drops ({} left open as zombies), {} extra sessions (tabs, send-only), {} clients at two relays, {} moves to another relay, {} messages kept in custody, {} handed over, {} FORWARDs joined, {} repeats dropped by applications, {} slow consumers closed, {} link cuts, {} partitions, {} loops cut, {} delivered notices, {} group MSGs ({} through other relays than the group's); entries: {} delivered, {} queued, {} not ({})",
        to - from,
        total.sent,
        total.sent as f64 / secs,
        total.events,
        total.events as f64 / secs,
        total.peer_frames,
        total.crashes,
        total.drops,
        total.zombies,
        total.extra_sessions,
        total.multi_homed,
        total.roams,
        total.custody,
        total.handed_off,
        total.forwards_joined,
        total.app_repeats,
        total.slow,
        total.cuts,
        total.partitions,
        total.loops,
        total.delivered_notices,
        total.group_msgs,
        total.group_remote,
        total.delivered_entries,
        total.queued_entries,
        total.rejected_entries,
        total
            .reasons
            .iter()
            .map(|(c, n)| {
                let name = w2w_proto::ErrorCode::from_u16(*c).map_or("?", |e| e.as_str());
                format!("{name} {n}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if cfg.bootstrap {
        println!(
            "bootstrap: {} relays, each given relay 0 only: {} dials redirected; the last relay reached every other at {:.1} ms of simulated time",
            cfg.relays,
            total.redirects,
            total.joined_us as f64 / 1000.0
        );
    }
    if cfg.relays > 1 && total.relays_counted > 0 {
        let names = [
            (0x40, "LINK_STATE"),
            (0x41, "PRESENCE"),
            (0x42, "FORWARD"),
            (0x43, "FWD_RECEIPT"),
            (0x45, "DIR_PUT"),
            (0x46, "DIR_GET"),
            (0x47, "DIR_ANSWER"),
        ];
        let frames: Vec<String> = names
            .iter()
            .map(|(t, n)| format!("{n} {}", total.peer_types.get(t).copied().unwrap_or(0)))
            .collect();
        let k = cfg.core.federation.replicas as f64;
        println!(
            "directory at the end: {:.0} records held per relay on average, {} at most (k·A/R = {:.0}, A = {} addresses, R = {} relays, k = {}); peer frames: {}",
            total.held_sum as f64 / total.relays_counted as f64,
            total.held_max,
            k * cfg.clients as f64 / cfg.relays as f64,
            cfg.clients,
            cfg.relays,
            k,
            frames.join(", ")
        );
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
