//! `w2w bench`: a2b throughput and latency through a relay.
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

#[derive(Args)]
pub struct BenchArgs {
    /// Relay URL; default: start an in-process relay on 127.0.0.1.
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
    /// Messages in flight per sender.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(a: BenchArgs) -> Result<ExitCode> {
    let mut _relay = None;
    let url = match &a.relay {
        Some(u) => u.clone(),
        None => {
            let mut cfg =
                RelayConfig::new(Identity::from_seed(rand::random()), "127.0.0.1:0".parse()?);
            cfg.limits = Limits {
                rate_per_sec: u32::MAX / 2,
                rate_burst: u32::MAX / 2,
                ..Limits::default()
            };
            let r = Relay::start(cfg).await?;
            let u = r.url();
            _relay = Some(r);
            u
        }
    };
    let size = a.size.max(8);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.seconds);
    let received = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..a.pairs {
        let rx = Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(&url),
        )
        .await?;
        let tx = Arc::new(
            Client::connect(
                Identity::from_seed(rand::random()),
                ConnectOptions::new(&url),
            )
            .await?,
        );
        let to = rx.address();
        let received = received.clone();
        receivers.push(tokio::spawn(async move {
            let mut rx = rx;
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let stop = tokio::time::Instant::from_std(deadline + Duration::from_secs(2));
            while let Ok(Some(ev)) = tokio::time::timeout_at(stop, rx.recv()).await {
                if let Event::Msg(m) = ev {
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&m.payload[..8]);
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
                    match tx.send(Dest::A2b(to), payload).await {
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
        "a2b {} pairs, {} B payload, window {}: {:.0} msgs/s ({:.2} MB/s), latency p50 {} µs, p99 {} µs, p99.9 {} µs; rejected {}",
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
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(ExitCode::SUCCESS)
}
