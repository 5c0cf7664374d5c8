//! `w2w-bench`: measurements of the w2w relay anyone can reproduce on
//! their own machine. Its own crate so that the product binary (`w2w`)
//! carries none of it (no histograms, plots or CPU pinning); the relays it
//! measures as child processes are the real `w2w` binary (see
//! [`proc::w2w_bin`]).
//!
//! * `compare` — the same a2b load through the bare WebSocket forwarder
//!   (the practical bound), a w2w relay, and iroh-relay; each server a
//!   child process pinned to its own CPU, its CPU and memory read from
//!   /proc; then again at half of each one's maximum rate for latency.
//! * `fanout` — registrations per second, then a2n deliveries per second to
//!   many clients.
//! * `soak` — many clients, mixed routes, minutes; asserts nothing lost or
//!   duplicated and reports the relay's memory over time.
//! * `a2b` (relays in a line in this process), `store` (group commit),
//!   `idle` (memory per idle connection), `smoke` (all of it, seconds long,
//!   for CI), `forwarder` (the bare forwarder server itself).

mod fanout;
mod fedscale;
mod forwarder;
mod inproc;
mod load;
mod plot;
mod proc;
mod soak;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use load::{Outcome, Spec};
use proc::{ServerProc, Usage};

#[derive(Parser)]
#[command(
    name = "w2w-bench",
    version,
    about = "Benchmarks of the w2w relay: throughput, latency, fan-out, memory, soak.",
    long_about = "Benchmarks of the w2w relay, reproducible on your own machine: \
        throughput, latency, fan-out, memory per connection, and a soak run.\n\n\
        Relays measured as child processes are the `w2w` binary next to this one \
        (`cargo build --release` builds both into target/release/), or --w2w-bin.\n\n\
        Compare with iroh-relay:  w2w-bench compare\n\
        Fan-out:                  w2w-bench fanout\n\
        Everything, briefly (CI): w2w-bench smoke",
    after_help = "Docs: docs/PERFORMANCE.md (results and how they were measured)"
)]
struct Cli {
    /// Log filter, e.g. info, warn, w2w_server=debug (RUST_LOG also
    /// works); relays started as child processes log warnings only.
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "W2W_LOG",
        display_order = 100
    )]
    log: String,
    /// The `w2w` binary to run relays with (compare, fanout, soak, idle,
    /// smoke); default: the `w2w` next to this executable.
    #[arg(
        long,
        global = true,
        env = "W2W_BIN",
        value_name = "PATH",
        display_order = 101
    )]
    w2w_bin: Option<PathBuf>,
    #[command(subcommand)]
    cmd: BenchCmd,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// a2b through the bare forwarder, w2w and iroh-relay (same load, same
    /// machine, one run): throughput, latency at max and half rate, server
    /// CPU and RSS, ratios; writes JSON and SVG plots.
    Compare(CompareArgs),
    /// Registrations per second, then a2n fan-out (deliveries per second)
    /// to many clients on one relay (a child process).
    Fanout(fanout::FanoutArgs),
    /// Many clients, mixed routes (a2b, a2g, a2n, a2a) for minutes: asserts
    /// 0 lost and 0 duplicated; plots the relay's RSS over time.
    Soak(soak::SoakArgs),
    /// a2b through relays in this process, optionally in a line (federation
    /// hops), or through a running relay (--relay).
    A2b(inproc::A2bArgs),
    /// A federation of real relay processes that each know one seed:
    /// joining, registrations, directory records per relay, reachability,
    /// then a relay restarted and a relay killed for good.
    Federation(fedscale::FedArgs),
    /// a2b against payload size (64 B to 1 MiB): msgs/s, MB/s and server
    /// CPU µs per message for the bare forwarder and w2w (raw load), in
    /// one run; writes curves.json and SVG curves.
    Curves(CurvesArgs),
    /// Durable queue writes: group commit vs one transaction per message.
    Store {
        /// Messages to write.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Frame bytes per message.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Relay memory per idle registered connection (RSS delta / N); starts
    /// a relay child process unless --relay and --relay-pid are given.
    Idle {
        /// Idle registered connections to open.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// A running relay to measure instead (needs --relay-pid).
        #[arg(long, requires = "relay_pid")]
        relay: Option<String>,
        /// Its process id (memory is read from /proc).
        #[arg(long)]
        relay_pid: Option<u32>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Seconds-long versions of compare, fanout, idle, store and soak, with
    /// their assertions (CI runs this so none of them rots).
    Smoke,
    /// Run the bare WebSocket forwarder (the baseline `compare` measures).
    Forwarder {
        /// Where to listen (port 0: a free one); prints `LISTENING <URL>`.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

/// The load every `compare` system gets.
#[derive(Args, Clone)]
pub struct LoadArgs {
    /// Sender/receiver pairs (two connections each).
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Messages in flight per pair (until the receiver has it).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured seconds per run (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up before measuring, in milliseconds.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
}

impl LoadArgs {
    fn spec(&self) -> Spec {
        Spec {
            pairs: self.pairs.max(1),
            window: self.window.max(1),
            size: self.size.max(16),
            seconds: self.seconds.max(0.1),
            warmup: Duration::from_millis(self.warmup_ms),
            rate: None,
        }
    }
}

#[derive(Args)]
pub struct CurvesArgs {
    /// Payload sizes in bytes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,1024,16384,131072,1048576"
    )]
    sizes: Vec<usize>,
    /// Systems (bare, w2w-raw, w2w).
    #[arg(long, value_delimiter = ',', default_value = "bare,w2w-raw")]
    only: Vec<String>,
    /// a2n audiences (receiving clients) for the fan-out curve
    /// (`--audiences` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,1000,10000")]
    audiences: Vec<usize>,
    /// Idle registered connections beside the a2b load (64 B, raw load):
    /// the cost per message against the number of connected clients
    /// (`--connected` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,1000,10000")]
    connected: Vec<usize>,
    /// Measured seconds per point.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Directory for curves.json and the SVG curves.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

/// Throughput and the server's CPU per message against payload size.
async fn curves(a: CurvesArgs) -> Result<serde_json::Value> {
    std::fs::create_dir_all(&a.out)?;
    let mut points: Vec<serde_json::Value> = Vec::new();
    let mut mbs: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut cpu: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    println!(
        "{:<10} {:>9} {:>10} {:>9} {:>12} {:>10}",
        "system", "payload", "msgs/s", "MB/s", "srv µs/msg", "srv cores"
    );
    for system in &a.only {
        let (mut m, mut c) = (Vec::new(), Vec::new());
        for &size in &a.sizes {
            // About 4 MiB in flight per pair, at most 32 messages.
            let window = ((4usize << 20) / size.max(1)).clamp(1, 32);
            let spec = Spec {
                pairs: 4,
                window,
                size: size.max(16),
                seconds: a.seconds.max(0.1),
                warmup: Duration::from_millis(300),
                rate: None,
            };
            // Frames over 1 MiB (the default limit) for the largest payloads.
            let limits = "max_frame_bytes = 4194304\nsend_queue_bytes = 67108864\n";
            let r = measure_with(system, &spec, true, None, limits).await?;
            anyhow::ensure!(
                r.lost == 0 && r.duplicated == 0,
                "{system} at {size} B lost or duplicated messages"
            );
            let us = us_per_msg(&r).unwrap_or(f64::NAN);
            let cores = r.server.as_ref().map_or(f64::NAN, |u| u.cpu_cores);
            println!(
                "{:<10} {:>9} {:>10.0} {:>9.1} {:>12.1} {:>10.2}",
                system, size, r.msgs_per_sec, r.mbytes_per_sec, us, cores
            );
            let x = (size as f64).log2();
            m.push((x, r.mbytes_per_sec));
            c.push((x, us));
            points.push(serde_json::json!({
                "system": system, "payload_bytes": size, "window": window,
                "msgs_per_sec": r.msgs_per_sec, "mbytes_per_sec": r.mbytes_per_sec,
                "server_us_per_msg": us, "server_cores": cores,
            }));
        }
        mbs.push((system.clone(), m));
        cpu.push((system.clone(), c));
    }
    std::fs::write(
        a.out.join("curves-throughput.svg"),
        plot::lines(
            "a2b throughput vs payload size",
            "payload size, log2 bytes",
            "MB/s",
            &mbs,
        ),
    )?;
    std::fs::write(
        a.out.join("curves-cpu.svg"),
        plot::lines(
            "server CPU per message vs payload size",
            "payload size, log2 bytes",
            "server µs per message",
            &cpu,
        ),
    )?;
    // a2n deliveries per second against the audience.
    let mut fan = Vec::new();
    let mut fan_points = Vec::new();
    let tmp = std::env::temp_dir().join(format!("w2w-curves-{}", rand::random::<u32>()));
    for &n in &a.audiences {
        let r = fanout::run(fanout::FanoutArgs::audience(n, tmp.clone())).await?;
        let per_sec = r["a2n_deliveries_per_sec"].as_f64().unwrap_or(0.0);
        let cores = r["fanout_relay"]["cpu_cores"].as_f64().unwrap_or(f64::NAN);
        let us = cores * 1e6 / per_sec.max(1.0);
        println!("a2n to {n:>6} clients: {per_sec:>10.0} deliveries/s, relay {cores:.2} cores, {us:.2} µs per delivery");
        fan.push(((n as f64).log10(), per_sec / 1000.0));
        fan_points.push(serde_json::json!({
            "audience": n, "deliveries_per_sec": per_sec, "relay_cores": cores, "us_per_delivery": us,
        }));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !fan.is_empty() {
        std::fs::write(
            a.out.join("curves-fanout.svg"),
            plot::lines(
                "a2n deliveries per second vs audience",
                "receiving clients, log10",
                "thousand deliveries/s",
                &[("w2w".to_string(), fan)],
            ),
        )?;
    }
    // a2b against the number of connected (idle) clients.
    let mut conn_points = Vec::new();
    let (mut conn_rate, mut conn_cpu) = (Vec::new(), Vec::new());
    for &n in &a.connected {
        let r = measure_connected(n, a.seconds).await?;
        anyhow::ensure!(
            r.lost == 0 && r.duplicated == 0,
            "w2w-raw beside {n} idle clients lost or duplicated messages"
        );
        let us = us_per_msg(&r).unwrap_or(f64::NAN);
        let lock = r.core_lock_share.unwrap_or(f64::NAN);
        println!(
            "a2b beside {n:>6} idle clients: {:>9.0} msgs/s, {us:.1} µs/msg, lock {:.0} %",
            r.msgs_per_sec,
            lock * 100.0
        );
        conn_rate.push(((n as f64).log10(), r.msgs_per_sec / 1000.0));
        conn_cpu.push(((n as f64).log10(), us));
        conn_points.push(serde_json::json!({
            "idle_clients": n, "msgs_per_sec": r.msgs_per_sec, "server_us_per_msg": us,
            "core_lock_share": lock,
        }));
    }
    if !conn_points.is_empty() {
        std::fs::write(
            a.out.join("curves-connected.svg"),
            plot::lines(
                "a2b (64 B, raw load) vs connected idle clients",
                "idle registered clients, log10",
                "thousand msgs/s",
                &[("w2w-raw".to_string(), conn_rate)],
            ),
        )?;
        std::fs::write(
            a.out.join("curves-connected-cpu.svg"),
            plot::lines(
                "server CPU per message vs connected idle clients",
                "idle registered clients, log10",
                "server µs per message",
                &[("w2w-raw".to_string(), conn_cpu)],
            ),
        )?;
    }
    let out = serde_json::json!({
        "machine": machine(), "a2b": points, "a2n": fan_points, "connected": conn_points,
    });
    std::fs::write(
        a.out.join("curves.json"),
        serde_json::to_string_pretty(&out)?,
    )?;
    Ok(out)
}

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// The iroh-relay bench binary (build: see bench/iroh/README.md);
    /// default: bench/iroh/target/release/w2w-iroh-bench if it exists.
    #[arg(long)]
    iroh_bin: Option<PathBuf>,
    /// Skip iroh-relay even if its binary is there.
    #[arg(long)]
    no_iroh: bool,
    /// Also measure w2w with durable_delivery off.
    #[arg(long)]
    no_durable_too: bool,
    /// Do not pin the server to CPU 0 and the load generator to CPU 1.
    #[arg(long)]
    no_pin: bool,
    /// Measure only these systems (bare, w2w, w2w-raw, w2w-hop,
    /// w2w-nondurable, iroh); default: all available but w2w-hop. `w2w-raw`
    /// is the same relay driven by a load generator without the client
    /// library (raw sockets, template frames, batched writes and ACKs);
    /// `w2w-hop` is that load through a line of three relays, measuring
    /// the middle one: the cost of one federation hop.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip the half-rate latency runs.
    #[arg(long)]
    no_half: bool,
    /// Directory for compare.json and the SVG plots.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or(cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    proc::set_w2w_bin(cli.w2w_bin);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: BenchCmd) -> Result<ExitCode> {
    match cmd {
        BenchCmd::Compare(c) => compare(c).await.map(|_| ExitCode::SUCCESS),
        BenchCmd::Fanout(f) => fanout::run(f).await.map(|_| ExitCode::SUCCESS),
        BenchCmd::Soak(s) => soak::run(s).await,
        BenchCmd::A2b(a) => inproc::run(a).await,
        BenchCmd::Federation(f) => fedscale::run(f).await.map(|_| ExitCode::SUCCESS),
        BenchCmd::Curves(c) => curves(c).await.map(|_| ExitCode::SUCCESS),
        BenchCmd::Store {
            messages,
            size,
            json,
        } => inproc::store_bench(messages, size, json.as_ref()).await,
        BenchCmd::Idle {
            connections,
            relay,
            relay_pid,
            json,
        } => {
            // Each side (this process, the relay) holds one socket per
            // connection, and the relay inherits this limit.
            let nofile = proc::raise_nofile();
            if (connections as u64) + 200 > nofile {
                anyhow::bail!(
                    "{connections} connections need RLIMIT_NOFILE >= {} in this process and in the relay; \
                     the hard limit here is {nofile} (raise it, e.g. `ulimit -Hn` as root with CAP_SYS_RESOURCE, \
                     or measure at most {} connections)",
                    connections + 200,
                    nofile.saturating_sub(200)
                );
            }
            match (relay, relay_pid) {
                (Some(url), Some(pid)) => {
                    inproc::idle_bench(&url, pid, connections, json.as_ref()).await
                }
                _ => {
                    let relay = ServerProc::w2w(None, true, &idle_limits(connections))?;
                    inproc::idle_bench(&relay.url, relay.pid(), connections, json.as_ref()).await
                }
            }
        }
        BenchCmd::Smoke => smoke().await,
        BenchCmd::Forwarder { listen } => forwarder::serve(listen).await.map(|_| ExitCode::SUCCESS),
    }
}

/// Limits for a relay that must hold `n` connections.
fn idle_limits(n: usize) -> String {
    format!("max_connections = {}\n", n + 1000)
}

fn default_iroh_bin() -> Option<PathBuf> {
    let rel = Path::new("bench/iroh/target/release/w2w-iroh-bench");
    let mut dirs = vec![std::env::current_dir().ok()?];
    // Also next to the workspace this binary was built in (target/release/w2w).
    if let Ok(exe) = std::env::current_exe() {
        if let Some(ws) = exe
            .parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.parent())
        {
            dirs.push(ws.to_path_buf());
        }
    }
    dirs.into_iter().map(|d| d.join(rel)).find(|p| p.exists())
}

/// One system's measurement: its server started pinned to CPU 0, this
/// process pinned to CPU 1 (when there are two CPUs and `pin`).
async fn measure(system: &str, spec: &Spec, pin: bool, iroh_bin: Option<&Path>) -> Result<Outcome> {
    measure_with(system, spec, pin, iroh_bin, "").await
}

/// [`measure`], with `limits` added to a w2w relay's `[limits]`.
async fn measure_with(
    system: &str,
    spec: &Spec,
    pin: bool,
    iroh_bin: Option<&Path>,
    limits: &str,
) -> Result<Outcome> {
    let (server_cpu, load_cpu) = if pin && proc::cpu_count() >= 2 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    let server = match system {
        "bare" => ServerProc::bare(server_cpu)?,
        "w2w" => ServerProc::w2w(server_cpu, true, limits)?,
        "w2w-nondurable" => ServerProc::w2w(server_cpu, false, limits)?,
        "w2w-raw" => ServerProc::w2w(server_cpu, true, limits)?,
        "iroh" => ServerProc::iroh(iroh_bin.context("no iroh-relay bench binary")?, server_cpu)?,
        "w2w-hop" => return measure_hop(spec, server_cpu, load_cpu, limits).await,
        other => bail!("unknown system {other}"),
    };
    if let Some(c) = load_cpu {
        proc::pin_self(c)?;
    }
    // iroh's load generator keeps its own clock: its server's usage is read
    // over the whole child run (connection setup included).
    let whole = (system == "iroh").then(|| Usage::start(server.pid()));
    let watch = [server.pid(), std::process::id()];
    let r = match system {
        "bare" => load::bare(&server.url, spec, &watch).await,
        "iroh" => {
            load::iroh(
                iroh_bin.context("no iroh binary")?,
                &server.url,
                spec,
                load_cpu,
            )
            .await
        }
        "w2w-raw" => load::w2w_raw(&server.url, spec, &watch).await,
        _ => load::w2w(&server.url, spec, &watch).await,
    };
    let whole = whole.map(Usage::finish);
    proc::unpin_self()?;
    drop(server);
    let mut r = r?;
    if system == "w2w-nondurable" {
        r.system = "w2w (durable_delivery off)".into();
    }
    if whole.is_some() {
        r.server = whole;
    }
    Ok(r)
}

/// The raw a2b load (4 pairs, 64 B) through a relay (pinned to CPU 0, the
/// load to CPU 1) that also holds `n` idle registered connections.
async fn measure_connected(n: usize, seconds: f64) -> Result<Outcome> {
    let nofile = proc::raise_nofile();
    anyhow::ensure!(
        (n as u64) + 200 <= nofile,
        "{n} idle clients need RLIMIT_NOFILE >= {} (the hard limit here is {nofile})",
        n + 200
    );
    let pin = proc::cpu_count() >= 2;
    // Idle clients that never answer a ping stay connected for the run.
    let limits = format!(
        "{}ping_interval_ms = 600000\nping_timeout_ms = 600000\n",
        idle_limits(n)
    );
    let server = ServerProc::w2w(pin.then_some(0), true, &limits)?;
    let idle = inproc::open_idle(&server.url, n).await?;
    if pin {
        proc::pin_self(1)?;
    }
    let spec = Spec {
        pairs: 4,
        window: 32,
        size: 64,
        seconds: seconds.max(0.1),
        warmup: Duration::from_millis(300),
        rate: None,
    };
    let watch = [server.pid(), std::process::id()];
    let r = load::w2w_raw(&server.url, &spec, &watch).await;
    proc::unpin_self()?;
    drop(idle);
    r
}

/// One federation hop: a line of three relays A – B – C, the raw load's
/// senders at A and receivers at C; the server measured is B, which only
/// passes FORWARDs and FWD_RECEIPTs between its two peer links (on the
/// server CPU; A, C and the load share the other).
async fn measure_hop(
    spec: &load::Spec,
    server_cpu: Option<usize>,
    load_cpu: Option<usize>,
    limits: &str,
) -> Result<Outcome> {
    let c = ServerProc::w2w_linked(load_cpu, true, limits, &[])?;
    let b = ServerProc::w2w_linked(server_cpu, true, limits, std::slice::from_ref(&c.url))?;
    let a = ServerProc::w2w_linked(load_cpu, true, limits, std::slice::from_ref(&b.url))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for r in [&a, &c] {
        while proc::metric(&r.url, "w2w_known_relays").await != Some(2.0) {
            if std::time::Instant::now() > deadline {
                bail!("the line of three relays did not link within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if let Some(cpu) = load_cpu {
        proc::pin_self(cpu)?;
    }
    let watch = [b.pid(), std::process::id()];
    let r = load::w2w_raw_between(&a.url, &c.url, &b.url, spec, &watch).await;
    proc::unpin_self()?;
    let mut r = r?;
    r.system = "w2w hop (middle relay)".into();
    Ok(r)
}

/// The server's CPU time per message delivered (µs): the efficiency figure.
fn us_per_msg(r: &Outcome) -> Option<f64> {
    r.server
        .as_ref()
        .map(|s| s.cpu_seconds * 1e6 / (r.msgs_per_sec * r.seconds).max(1.0))
}

fn print_row(label: &str, r: &Outcome) {
    let s = r.server.as_ref();
    println!(
        "{label:<28} {:>9.0} {:>7.2} {:>8} {:>8} {:>9} {:>6} {:>7.1} {:>10} {:>9} {:>6} {:>4} {:>6}",
        r.msgs_per_sec,
        r.mbytes_per_sec,
        r.latency_us.p50,
        r.latency_us.p99,
        r.latency_us.p999,
        s.map(|s| format!("{:.0}%", s.cpu_cores * 100.0))
            .unwrap_or_default(),
        us_per_msg(r).unwrap_or(f64::NAN),
        s.map(|s| s.rss_peak_kib).unwrap_or(0),
        r.loadgen
            .map(|l| format!("{:.0}%", l.cpu_cores * 100.0))
            .unwrap_or_else(|| "-".into()),
        r.lost,
        r.duplicated,
        r.core_lock_share
            .map(|l| format!("{:.0}%", l * 100.0))
            .unwrap_or_else(|| "-".into()),
    );
}

async fn compare(a: CompareArgs) -> Result<serde_json::Value> {
    let spec = a.load.spec();
    let iroh_bin = if a.no_iroh {
        None
    } else {
        a.iroh_bin.clone().or_else(default_iroh_bin)
    };
    let mut systems = vec!["bare", "w2w", "w2w-raw"];
    if a.no_durable_too {
        systems.push("w2w-nondurable");
    }
    match &iroh_bin {
        Some(_) => systems.push("iroh"),
        None if !a.no_iroh => eprintln!(
            "note: iroh-relay skipped: build it with `cargo build --release --manifest-path bench/iroh/Cargo.toml` or pass --iroh-bin"
        ),
        None => {}
    }
    if !a.only.is_empty() {
        systems = a
            .only
            .iter()
            .map(|s| match s.as_str() {
                "bare" => Ok("bare"),
                "w2w" => Ok("w2w"),
                "w2w-nondurable" => Ok("w2w-nondurable"),
                "w2w-raw" => Ok("w2w-raw"),
                "w2w-hop" => Ok("w2w-hop"),
                "iroh" if iroh_bin.is_some() => Ok("iroh"),
                "iroh" => bail!("--only iroh: no iroh-relay bench binary (see --iroh-bin)"),
                other => {
                    bail!("--only: unknown system {other:?} (bare, w2w, w2w-raw, w2w-hop, w2w-nondurable, iroh)")
                }
            })
            .collect::<Result<_>>()?;
    }
    eprintln!(
        "a2b, {} pairs, window {}, {} B payload, {:.1} s measured after {} ms warm-up; server on CPU 0, load on CPU 1{}",
        spec.pairs,
        spec.window,
        spec.size,
        spec.seconds,
        spec.warmup.as_millis(),
        if a.no_pin || proc::cpu_count() < 2 { " (not pinned)" } else { "" }
    );
    let mut max = Vec::new();
    for s in &systems {
        max.push(measure(s, &spec, !a.no_pin, iroh_bin.as_deref()).await?);
    }
    let mut half = Vec::new();
    if !a.no_half {
        for (s, m) in systems.iter().zip(&max) {
            let mut sp = spec.clone();
            sp.rate = Some((m.msgs_per_sec / 2.0).max(1.0));
            half.push(measure(s, &sp, !a.no_pin, iroh_bin.as_deref()).await?);
        }
    }
    // A server's CPU per message falls as its load rises (more frames per
    // wake-up and per system call). The hop's middle relay is not
    // saturated (the two other relays and the load share the other CPU),
    // so it is compared with the bare forwarder paced at the hop's rate
    // too, not only with the bare forwarder at its own maximum.
    let mut same_rate = None;
    let hop = systems.iter().position(|s| *s == "w2w-hop");
    if let (Some(h), true) = (hop, systems.contains(&"bare")) {
        let mut sp = spec.clone();
        sp.rate = Some(max[h].msgs_per_sec.max(1.0));
        let mut r = measure("bare", &sp, !a.no_pin, None).await?;
        r.system = "bare forwarder, hop's rate".into();
        same_rate = Some(r);
    }
    println!("\nat the maximum rate:");
    println!(
        "{:<28} {:>9} {:>7} {:>8} {:>8} {:>9} {:>6} {:>7} {:>10} {:>9} {:>6} {:>4} {:>6}",
        "system (max rate)",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "srvCPU",
        "µs/msg",
        "srvRSS KiB",
        "loadCPU%",
        "lost",
        "dup",
        "lock"
    );
    println!("(lock: the share of the time w2w's core lock was held; more cores can speed the relay up at most 1 / that)");
    for r in &max {
        print_row(&r.system, r);
    }
    if let Some(r) = &same_rate {
        print_row(&r.system, r);
    }
    if !half.is_empty() {
        println!("at half of each one's maximum rate:");
        for r in &half {
            print_row(&r.system, r);
        }
    }
    let rate = |name: &str| {
        systems
            .iter()
            .position(|s| *s == name)
            .map(|i| max[i].msgs_per_sec)
    };
    let mut ratios = serde_json::Map::new();
    if let (Some(w), Some(b)) = (rate("w2w"), rate("bare")) {
        println!(
            "\nw2w / bare forwarder throughput: {:.2}x (target >= 0.9x)",
            w / b
        );
        ratios.insert("w2w_over_bare".into(), (w / b).into());
    }
    // With the raw load both servers are driven by batched writes: the
    // fair pair, and the server's CPU per message is the figure to watch.
    let outcome = |name: &str| systems.iter().position(|s| *s == name).map(|i| &max[i]);
    // (other system, its name, ratio keys' suffixes, throughput and CPU targets)
    let against = [
        (
            "bare",
            "bare forwarder",
            ("bare", "bare"),
            ">= 0.9x",
            "<= 1.2x",
        ),
        (
            "iroh",
            "iroh-relay",
            ("iroh_relay", "iroh"),
            ">= 1.5x unpinned",
            "<= 0.5x",
        ),
    ];
    let unpinned = if a.no_pin { " unpinned" } else { "" };
    for (other, name, (rate_key, cpu_key), rate_target, cpu_target) in against {
        let (Some(w), Some(o)) = (outcome("w2w-raw"), outcome(other)) else {
            continue;
        };
        let q = w.msgs_per_sec / o.msgs_per_sec;
        println!("w2w (raw load) / {name} throughput:{unpinned} {q:.2}x (target {rate_target})");
        ratios.insert(format!("w2w_raw_over_{rate_key}"), q.into());
        if let (Some(wu), Some(ou)) = (us_per_msg(w), us_per_msg(o)) {
            println!(
                "server CPU per message: w2w {wu:.1} µs, {name} {ou:.1} µs = {:.2}x (target {cpu_target})",
                wu / ou
            );
            ratios.insert(
                format!("w2w_raw_cpu_per_msg_over_{cpu_key}"),
                (wu / ou).into(),
            );
        }
    }
    if let Some(h) = outcome("w2w-hop").and_then(us_per_msg) {
        let bare_max = outcome("bare").and_then(us_per_msg);
        let bare_same = same_rate.as_ref().and_then(us_per_msg);
        if let (Some(b), Some(s)) = (bare_max, bare_same) {
            println!(
                "one hop, server CPU per message: middle relay {h:.1} µs; bare forwarder {s:.1} µs at the same rate ({:.2}x), {b:.1} µs at its max ({:.2}x) (target <= 1.3x)",
                h / s,
                h / b
            );
            ratios.insert("hop_cpu_per_msg_over_bare_same_rate".into(), (h / s).into());
            ratios.insert("hop_cpu_per_msg_over_bare".into(), (h / b).into());
        }
    }
    if let (Some(w), Some(i)) = (rate("w2w"), rate("iroh")) {
        println!(
            "w2w / iroh-relay throughput:     {:.2}x (target >= 1.2x)",
            w / i
        );
        ratios.insert("w2w_over_iroh_relay".into(), (w / i).into());
    }
    if let Some(h) = systems
        .iter()
        .position(|s| *s == "w2w")
        .and_then(|i| half.get(i))
    {
        let q = h.latency_us.p99 as f64 / h.latency_us.p50.max(1) as f64;
        println!(
            "w2w at half its max rate: p99 {} µs = {q:.2}x p50 {} µs (target <= 2x)",
            h.latency_us.p99, h.latency_us.p50
        );
        ratios.insert("w2w_half_rate_p99_over_p50".into(), q.into());
    }
    // Item 4 of issue 13: the tail against the bare forwarder's, same run.
    let tail = |r: &Outcome| r.latency_us.p99 as f64 / r.latency_us.p50.max(1) as f64;
    let half_of = |name: &str| {
        systems
            .iter()
            .position(|s| *s == name)
            .and_then(|i| half.get(i))
    };
    if let Some(b) = half_of("bare") {
        for name in ["w2w-raw", "w2w"] {
            if let Some(w) = half_of(name) {
                println!(
                    "at half rate, p99 / p50: {} {:.2}x, bare forwarder {:.2}x (target: no worse)",
                    w.system,
                    tail(w),
                    tail(b)
                );
                ratios.insert(
                    format!("{}_half_rate_tail_over_bare", name.replace('-', "_")),
                    (tail(w) / tail(b)).into(),
                );
            }
        }
    }
    for (when, rows) in [("max rate", &max), ("half rate", &half)] {
        for r in rows.iter() {
            if let Some(c) = r.store_commits {
                println!(
                    "{} at {when}: {} store commits (mean {:.0} µs), {} over 2.5 ms, {} over 10 ms; p99.9 {} µs",
                    r.system, c.count, c.mean_us, c.over_2_5ms, c.over_10ms, r.latency_us.p999
                );
            }
        }
    }
    let result = serde_json::json!({
        "machine": machine(),
        "max_rate": max,
        "half_rate": half,
        "bare_at_hop_rate": same_rate,
        "ratios": ratios,
    });
    write_json(&a.out, "compare.json", &result)?;
    let names: Vec<String> = max.iter().map(|r| r.system.clone()).collect();
    std::fs::write(
        a.out.join("compare-throughput.svg"),
        plot::bars(
            &format!(
                "a2b throughput, {} pairs, window {}, {} B",
                spec.pairs, spec.window, spec.size
            ),
            "messages / s",
            &names,
            &[(
                "max rate".into(),
                max.iter().map(|r| r.msgs_per_sec).collect(),
            )],
        ),
    )?;
    if !half.is_empty() {
        std::fs::write(
            a.out.join("compare-latency.svg"),
            plot::bars(
                "a2b latency at half of each system's max rate",
                "microseconds",
                &names,
                &[
                    (
                        "p50".into(),
                        half.iter().map(|r| r.latency_us.p50 as f64).collect(),
                    ),
                    (
                        "p99".into(),
                        half.iter().map(|r| r.latency_us.p99 as f64).collect(),
                    ),
                    (
                        "p99.9".into(),
                        half.iter().map(|r| r.latency_us.p999 as f64).collect(),
                    ),
                ],
            ),
        )?;
    }
    eprintln!("wrote {}/compare.json and SVG plots", a.out.display());
    Ok(result)
}

/// Registers `n` clients (fresh keys) at `url`, `concurrency` handshakes
/// at a time, printing progress every 200.
pub(crate) async fn connect_many(
    url: &str,
    n: usize,
    concurrency: usize,
) -> Result<Vec<w2w_client::Client>> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    use w2w_client::{Client, ConnectOptions};
    let mut clients = Vec::with_capacity(n);
    let mut pending = FuturesUnordered::new();
    let mut started = 0;
    while clients.len() < n {
        while started < n && pending.len() < concurrency.max(1) {
            let url = url.to_string();
            pending.push(async move {
                Client::connect(
                    w2w_proto::Identity::from_seed(rand::random()),
                    ConnectOptions::new(url),
                )
                .await
            });
            started += 1;
        }
        if let Some(c) = pending.next().await {
            clients.push(c.context("registering a client")?);
            if clients.len() % 200 == 0 {
                eprint!("\r  registered {:>6} / {n}", clients.len());
            }
        }
    }
    if n >= 200 {
        eprintln!();
    }
    Ok(clients)
}

/// Writes `value` as pretty JSON to `dir/name`, creating `dir`.
pub(crate) fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// What the numbers were measured on.
pub(crate) fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    serde_json::json!({
        "cpus": proc::cpu_count(),
        "cpu_model": cpu,
        "loadavg_at_end": load.trim(),
        "w2w_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Everything, seconds long, with the assertions that must hold.
async fn smoke() -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("w2w-smoke-{}", rand::random::<u32>()));
    let r = compare(CompareArgs {
        load: LoadArgs {
            pairs: 2,
            window: 8,
            size: 64,
            seconds: 1.0,
            warmup_ms: 200,
        },
        iroh_bin: None,
        no_iroh: true,
        no_durable_too: false,
        no_pin: false,
        no_half: false,
        // Every system the default run has, and one federation hop.
        only: ["bare", "w2w", "w2w-raw", "w2w-hop"]
            .map(String::from)
            .to_vec(),
        out: dir.clone(),
    })
    .await?;
    for run in r["max_rate"].as_array().into_iter().flatten() {
        let name = run["system"].as_str().unwrap_or("?");
        if run["msgs_per_sec"].as_f64().unwrap_or(0.0) <= 0.0 {
            bail!("smoke: {name} moved no messages");
        }
        if run["lost"].as_u64() != Some(0) || run["duplicated"].as_u64() != Some(0) {
            bail!("smoke: {name} lost or duplicated messages: {run}");
        }
    }
    for f in [
        "compare.json",
        "compare-throughput.svg",
        "compare-latency.svg",
    ] {
        anyhow::ensure!(dir.join(f).exists(), "smoke: {f} was not written");
    }
    fanout::run(fanout::FanoutArgs::smoke(dir.clone())).await?;
    inproc::store_bench(500, 256, None).await?;
    {
        let relay = ServerProc::w2w(None, true, &idle_limits(200))?;
        inproc::idle_bench(&relay.url, relay.pid(), 200, None).await?;
    }
    let fed = fedscale::run(fedscale::FedArgs::smoke()).await?;
    for phase in [
        "reach",
        "restart/down",
        "restart/after",
        "kill/others",
        "kill/its_own",
    ] {
        let v = fed
            .pointer(&format!("/{phase}"))
            .cloned()
            .unwrap_or_default();
        anyhow::ensure!(
            fedscale::all_taken(&v),
            "smoke: federation: not every message was taken in {phase}: {v}"
        );
    }
    let code = soak::run(soak::SoakArgs::smoke(dir.clone())).await?;
    let _ = std::fs::remove_dir_all(&dir);
    if code != ExitCode::SUCCESS {
        bail!("smoke: soak failed");
    }
    println!("bench smoke: all ran, nothing lost or duplicated");
    Ok(ExitCode::SUCCESS)
}
