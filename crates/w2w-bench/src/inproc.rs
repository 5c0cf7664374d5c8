//! `w2w-bench a2b` (relays in this process, in a line), `store`, `idle`.
//!
//! N sender/receiver pairs; each sender keeps `window` messages in flight
//! (each waits for its receipt). Receivers timestamp arrivals; latency is
//! send → receive, recorded in an HdrHistogram. Without `--relay`, an
//! in-process relay on a loopback port is started with the rate limit
//! raised so the relay, not the limiter, is measured.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::Status;
use w2w_proto::{Dest, Identity};
use w2w_server::{Limits, Relay, RelayConfig};

/// Options of `w2w-bench a2b`.
#[derive(Args)]
pub struct A2bArgs {
    /// Relay URL; default: start in-process relays on 127.0.0.1.
    #[arg(long)]
    relay: Option<String>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages in flight per sender (each waits for its receipt).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// In-process relays in a line; senders on the first, receivers on the
    /// last (measures federation hops). Ignored with --relay.
    /// Repeat to compare in one run, e.g. `--relays 1 --relays 3`.
    #[arg(long, default_values_t = [1usize])]
    relays: Vec<usize>,
    /// Deliver to connected recipients without waiting for their ACK or
    /// storing (see `federation.durable_delivery`).
    #[arg(long)]
    no_durable: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

use crate::proc::rss_kib;

/// Connections per loopback source address in the idle benchmark: well
/// under the ephemeral port range (32768-60999 by default), so that any
/// number of connections fits, spread over 127.0.0.2, 127.0.0.3, ...
const PER_SOURCE: usize = 20_000;

/// Relay memory per idle registered connection: RSS delta / N.
pub async fn idle_bench(url: &str, pid: u32, n: usize, json: Option<&PathBuf>) -> Result<ExitCode> {
    use w2w_client::{connect_raw, register};
    // Warm up: one connection, so one-time allocations are not counted.
    let mut warm = connect_raw(&ConnectOptions::new(url)).await?;
    register(&mut warm, &Identity::from_seed(rand::random()), url, None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let conns = open_idle(url, n).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before) as f64 * 1024.0) / n as f64;
    println!(
        "{n} idle registered connections: relay RSS {before} KiB -> {after} KiB, {per:.0} bytes ({:.2} KiB) per connection",
        per / 1024.0
    );
    if let Some(p) = json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&serde_json::json!({
                "connections": n, "rss_before_kib": before, "rss_after_kib": after,
                "bytes_per_connection": per,
            }))?,
        )?;
    }
    drop(conns);
    Ok(ExitCode::SUCCESS)
}

/// `n` registered connections to the relay at `url` that stay idle (never
/// read), from 127.0.0.2, 127.0.0.3, … (20,000 per source address).
pub async fn open_idle(url: &str, n: usize) -> Result<Vec<Box<dyn std::any::Any + Send>>> {
    use w2w_client::register;
    let uri: http::Uri = url.parse()?;
    let relay: std::net::SocketAddr = uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default()
        .parse()
        .map_err(|e| {
            anyhow::anyhow!("idle connections need a ws://IP:PORT relay URL ({url}): {e}")
        })?;
    // Each call takes loopback addresses of its own: a previous call's
    // closed connections hold their ports (TIME_WAIT) for a minute.
    static NEXT_SOURCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(2);
    let base = NEXT_SOURCE.fetch_add(
        n.div_ceil(PER_SOURCE).max(1),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut conns: Vec<Box<dyn std::any::Any + Send>> = Vec::with_capacity(n);
    for i in 0..n {
        // Past one source address's ports: the next loopback address.
        let last = (base + i / PER_SOURCE).min(254);
        let source = std::net::Ipv4Addr::new(127, 0, 0, last as u8);
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        let tcp = socket.connect(relay).await?;
        let (mut ws, _) = tokio_websockets::ClientBuilder::from_uri(uri.clone())
            .connect_on(tcp)
            .await?;
        register(&mut ws, &Identity::from_seed(rand::random()), url, None).await?;
        conns.push(Box::new(ws));
        if (i + 1) % 1000 == 0 {
            eprint!("\r{} / {n} connections", i + 1);
        }
    }
    if n >= 1000 {
        eprintln!();
    }
    Ok(conns)
}

/// Queued messages per second into a real SQLite file (synchronous=FULL):
/// `n` writers at once (the store thread batches them into shared commits)
/// versus one write at a time (a commit, and an fsync, per message).
pub async fn store_bench(n: usize, size: usize, json: Option<&PathBuf>) -> Result<ExitCode> {
    use w2w_server::store::{SqliteBackend, Store, Write};
    let dir = tempfile_dir()?;
    // The queue's budgets are the relay's business, not this benchmark's.
    let unlimited = w2w_server::budget::BudgetLimits {
        pending_bytes: u64::MAX / 4,
        max_bytes: u64::MAX / 4,
        sender_bytes: u64::MAX / 4,
        recipient_messages: u64::MAX / 4,
        recipient_bytes: u64::MAX / 4,
    };
    let store = Store::spawn(SqliteBackend::open(&dir)?, unlimited)?;
    let frame = bytes::Bytes::from(vec![7u8; size]);
    let write = |i: usize| Write::Enqueue {
        recipient: w2w_proto::Address([(i % 251) as u8; 32]),
        sender: w2w_proto::Address([0; 32]),
        id: w2w_proto::frame::MsgId(rand::random()),
        frame: frame.clone(),
        queued_ms: 0,
        expires_ms: u64::MAX / 4,
    };
    // Through the bulk lane, as the relay's queued messages go.
    let commit = |s: Store, w: Write| async move {
        s.submit(w)
            .await?
            .await
            .map_err(|_| anyhow::anyhow!("store stopped"))?
            .map_err(|e| anyhow::anyhow!(e))
    };
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (s, w) = (store.clone(), write(i));
        tasks.push(tokio::spawn(commit(s, w)));
    }
    for t in tasks {
        t.await??;
    }
    let batched = n as f64 / t.elapsed().as_secs_f64();
    let single_n = (n / 10).max(50);
    let t = Instant::now();
    for i in 0..single_n {
        commit(store.clone(), write(i)).await?;
    }
    let single = single_n as f64 / t.elapsed().as_secs_f64();
    println!(
        "durable queue writes ({size} B frames, synchronous=FULL): group commit {batched:.0} msgs/s ({n} concurrent), one transaction per message {single:.0} msgs/s ({single_n} sequential): {:.1}x",
        batched / single
    );
    if let Some(p) = json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&serde_json::json!({
                "frame_bytes": size,
                "group_commit_msgs_per_sec": batched,
                "one_txn_per_msg_msgs_per_sec": single,
                "ratio": batched / single,
            }))?,
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("w2w-store-bench-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub async fn run(a: A2bArgs) -> Result<ExitCode> {
    if a.relay.is_some() || a.relays.len() == 1 {
        let n = a.relays.first().copied().unwrap_or(1);
        let r = run_once(&a, n).await?;
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Several line lengths, measured one after another in this process.
    let mut results = Vec::new();
    for n in &a.relays {
        results.push(run_once(&a, *n).await?);
    }
    let base = results[0]["msgs_per_sec"].as_f64().unwrap_or(0.0);
    for r in &results[1..] {
        let rate = r["msgs_per_sec"].as_f64().unwrap_or(0.0);
        println!(
            "through {} relays: {:.2}x the throughput through {} relay(s)",
            r["relays_in_line"],
            rate / base.max(1.0),
            results[0]["relays_in_line"]
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_once(a: &A2bArgs, relay_count: usize) -> Result<serde_json::Value> {
    let mut relays: Vec<Relay> = Vec::new();
    let (url, rx_url) = match &a.relay {
        Some(u) => (u.clone(), u.clone()),
        None => {
            for i in 0..relay_count.max(1) {
                let mut cfg =
                    RelayConfig::new(Identity::from_seed(rand::random()), "127.0.0.1:0".parse()?);
                cfg.limits = Limits {
                    rate_per_sec: u32::MAX / 2,
                    rate_burst: u32::MAX / 2,
                    ..Limits::default()
                };
                if i > 0 {
                    cfg.federation.peers = vec![relays[i - 1].url()];
                }
                cfg.federation.durable_delivery = !a.no_durable;
                relays.push(Relay::start(cfg).await?);
            }
            let (first, last) = (&relays[0], &relays[relays.len() - 1]);
            let t0 = Instant::now();
            while !first.federation().reachable().contains(&last.relay_key()) && relays.len() > 1 {
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(10),
                    "relays did not link up"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (first.url(), last.url())
        }
    };
    let size = a.size.max(8);
    let mut pairs = Vec::new();
    for _ in 0..a.pairs {
        let rx = Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(&rx_url),
        )
        .await?;
        let tx = Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(&url),
        )
        .await?;
        pairs.push((Arc::new(tx), rx));
    }
    // Remote receivers must be in the first relay's directory.
    if relays.len() > 1 {
        let t0 = Instant::now();
        while relays[0].federation().directory_len() < 2 * a.pairs {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "directory did not converge"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.seconds);
    let received = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (tx, rx) in pairs {
        let to = rx.address();
        let received = received.clone();
        receivers.push(tokio::spawn(async move {
            let mut rx = rx;
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let stop = tokio::time::Instant::from_std(deadline + Duration::from_secs(2));
            while let Ok(Some(ev)) = tokio::time::timeout_at(stop, rx.recv()).await {
                if let Event::Msg(m) = ev {
                    if m.body.len() < 8 || Instant::now() > deadline {
                        continue; // not ours, or after the measured window
                    }
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&m.body[..8]);
                    let sent_ns = u64::from_le_bytes(t);
                    let now_ns = start.elapsed().as_nanos() as u64;
                    let _ = hist.record(now_ns.saturating_sub(sent_ns) / 1000);
                    received.fetch_add(1, Relaxed);
                }
            }
            hist
        }));
        for _ in 0..a.window {
            let tx = tx.clone();
            let rejected = rejected.clone();
            senders.push(tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    let mut payload = vec![0u8; size];
                    payload[..8]
                        .copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
                    match tx.send_plain(Dest::A2b(to), payload).await {
                        Ok(r) if r.status == Status::Delivered => sent += 1,
                        Ok(_) => {
                            rejected.fetch_add(1, Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                sent
            }));
        }
    }
    // Remote receivers must be in the first relay's directory.
    if let Some(first) = relays.first().filter(|_| relays.len() > 1) {
        let t0 = Instant::now();
        while first.federation().directory_len() < 2 * a.pairs {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "directory did not converge"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Progress, once a second.
    let progress = {
        let received = received.clone();
        let secs = a.seconds;
        tokio::spawn(async move {
            for s in 1..=secs {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprint!(
                    "\r[{s:>3}/{secs}s] {} messages received",
                    received.load(Relaxed)
                );
            }
            eprintln!();
        })
    };
    let mut sent = 0;
    for s in senders {
        sent += s.await.unwrap_or(0);
    }
    let elapsed = start
        .elapsed()
        .min(Duration::from_secs(a.seconds))
        .as_secs_f64();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for r in receivers {
        if let Ok(h) = r.await {
            hist.add(h)?;
        }
    }
    let _ = progress.await;
    let got = received.load(Relaxed);
    let rate = got as f64 / elapsed;
    let result = serde_json::json!({
        "route": "a2b",
        "relays_in_line": relays.len().max(1),
        "durable_delivery": !a.no_durable,
        "relay": url,
        "pairs": a.pairs,
        "window": a.window,
        "payload_bytes": size,
        "seconds": elapsed,
        "sent_delivered": sent,
        "received": got,
        "rejected": rejected.load(Relaxed),
        "msgs_per_sec": rate,
        "mbytes_per_sec": rate * size as f64 / 1e6,
        "latency_us": {
            "p50": hist.value_at_quantile(0.5),
            "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999),
            "max": hist.max(),
        }
    });
    println!(
        "a2b through {} relay(s), {} pairs, {} B payload, window {}: {:.0} msgs/s ({:.2} MB/s), latency p50 {} µs, p99 {} µs, p99.9 {} µs; rejected {}",
        relays.len().max(1),
        a.pairs,
        size,
        a.window,
        rate,
        rate * size as f64 / 1e6,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        rejected.load(Relaxed),
    );
    Ok(result)
}
