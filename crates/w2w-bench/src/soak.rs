//! `w2w-bench soak`: many clients, mixed routes, for minutes, on one relay
//! (a child process with a real SQLite store). Every message's receipt
//! says how many recipients got it; at the end each recipient must have
//! seen each message exactly once, and the relay's RSS must be flat.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::Rng;
use w2w_client::Event;
use w2w_proto::frame::{Scope, Status};
use w2w_proto::Dest;

use crate::proc::{self, ServerProc};

#[derive(Args)]
pub struct SoakArgs {
    /// Connected clients.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Messages per second across all clients (mix: 70% a2b, 15% a2g to 3,
    /// 10% a2a, 5% of them a2n... see --a2n-per-mille).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// a2n messages per thousand (each reaches every client).
    #[arg(long, default_value_t = 2)]
    a2n_per_mille: u32,
    /// Payload bytes per message (sealed end to end, a2n signed).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Allowed RSS growth from the first fifth of the run to the last, in
    /// percent (beyond 4 MiB of slack).
    #[arg(long, default_value_t = 10.0)]
    max_rss_growth_pct: f64,
    /// Directory for soak.json and soak-rss.svg.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

impl SoakArgs {
    pub fn smoke(out: PathBuf) -> SoakArgs {
        SoakArgs {
            clients: 30,
            seconds: 3,
            rate: 200,
            a2n_per_mille: 20,
            size: 64,
            max_rss_growth_pct: 1000.0,
            out,
        }
    }
}

/// Message tag: (sender index, sequence number), in the payload.
type Tag = (u32, u64);

#[derive(Default)]
struct Books {
    /// How many recipients each message's receipt says got it.
    expected: HashMap<Tag, u32>,
    /// Who got what.
    got: HashMap<Tag, u32>,
    seen: HashSet<(u32, Tag)>,
    duplicated: u64,
    not_delivered: u64,
    send_errors: u64,
}

pub async fn run(a: SoakArgs) -> Result<ExitCode> {
    proc::raise_nofile();
    let relay = ServerProc::w2w(
        None,
        true,
        &format!("max_connections = {}\n", a.clients + 100),
    )?;
    let url = relay.url.clone();
    let n = a.clients.max(2);
    eprintln!(
        "soak: {n} clients, {} msgs/s, {} s, relay pid {}",
        a.rate,
        a.seconds,
        relay.pid()
    );
    let clients = crate::connect_many(&url, n, 32).await?;
    let addrs: Vec<_> = clients.iter().map(|c| c.address()).collect();
    let books = Arc::new(Mutex::new(Books::default()));
    let received = Arc::new(AtomicU64::new(0));
    // Each client: a receiver task, and a handle the sender uses.
    let mut handles = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for (i, c) in clients.into_iter().enumerate() {
        let c = Arc::new(tokio::sync::Mutex::new(c));
        handles.push(c.clone());
        let (books, received) = (books.clone(), received.clone());
        receivers.push(tokio::spawn(async move {
            loop {
                // Hold the lock only while polling recv, so sends (which
                // take it briefly to get a &Client) interleave.
                let ev = {
                    let mut g = c.lock().await;
                    tokio::time::timeout(Duration::from_millis(20), g.recv()).await
                };
                match ev {
                    Ok(Some(Event::Msg(m))) if m.body.len() >= 12 => {
                        let s = u32::from_le_bytes(m.body[..4].try_into().unwrap_or_default());
                        let q = u64::from_le_bytes(m.body[4..12].try_into().unwrap_or_default());
                        let mut b = books.lock().unwrap_or_else(|e| e.into_inner());
                        if b.seen.insert((i as u32, (s, q))) {
                            *b.got.entry((s, q)).or_default() += 1;
                        } else {
                            b.duplicated += 1;
                        }
                        received.fetch_add(1, Relaxed);
                    }
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => return,
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(a.seconds);
    let sample_every = Duration::from_secs((a.seconds / 60).max(1));
    let mut rss = vec![(0.0, relay.rss_kib().unwrap_or(0))];
    let mut next_sample = t0 + sample_every;
    let interval = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
    let mut next_send = tokio::time::Instant::now();
    let mut sends = FuturesUnordered::new();
    let mut seq = 0u64;
    let mut sent = 0u64;
    let mut rng = rand::rngs::StdRng::from_entropy();
    use rand::SeedableRng;
    while Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep_until(next_send) => {
                next_send += interval;
                seq += 1;
                let from = rng.gen_range(0..n);
                let roll = rng.gen_range(0..1000u32);
                let dest = if roll < a.a2n_per_mille {
                    Dest::A2n(Scope::Relay)
                } else if roll < 100 {
                    Dest::A2a
                } else if roll < 250 {
                    let mut to = HashSet::new();
                    while to.len() < 3.min(n - 1) {
                        let t = rng.gen_range(0..n);
                        if t != from {
                            to.insert(addrs[t]);
                        }
                    }
                    Dest::A2g(to.into_iter().collect())
                } else {
                    let mut t = rng.gen_range(0..n);
                    if t == from {
                        t = (t + 1) % n;
                    }
                    Dest::A2b(addrs[t])
                };
                let mut body = vec![0u8; a.size.max(12)];
                body[..4].copy_from_slice(&(from as u32).to_le_bytes());
                body[4..12].copy_from_slice(&seq.to_le_bytes());
                let tag = (from as u32, seq);
                let h = handles[from].clone();
                sent += 1;
                sends.push(async move {
                    // The client's send needs only &Client: lock, start the
                    // send (it queues the frame), release while it waits.
                    let c = h.lock().await;
                    let fut = c.send(dest, body);
                    (tag, fut.await)
                });
            }
            Some((tag, r)) = sends.next(), if !sends.is_empty() => {
                settle(&books, tag, r);
            }
        }
        if Instant::now() >= next_sample {
            next_sample += sample_every;
            let r = relay.rss_kib().unwrap_or(0);
            let t = t0.elapsed().as_secs_f64();
            rss.push((t, r));
            eprint!(
                "\r  [{:>4.0}/{}s] sent {sent}, received {}, relay RSS {:.1} MiB   ",
                t,
                a.seconds,
                received.load(Relaxed),
                r as f64 / 1024.0
            );
        }
    }
    while let Some((tag, r)) = sends.next().await {
        settle(&books, tag, r);
    }
    eprintln!();
    // Let the last deliveries land.
    let want: u64 = books
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expected
        .values()
        .map(|v| *v as u64)
        .sum();
    let t1 = Instant::now();
    while received.load(Relaxed) < want && t1.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rss.push((t0.elapsed().as_secs_f64(), relay.rss_kib().unwrap_or(0)));
    // Clients go before the relay, so none of them tries to reconnect.
    for r in receivers {
        r.abort();
    }
    drop(handles);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = books.lock().unwrap_or_else(|e| e.into_inner());
    let mut lost = 0u64;
    for (tag, exp) in &b.expected {
        let got = b.got.get(tag).copied().unwrap_or(0);
        lost += exp.saturating_sub(got) as u64;
    }
    let unexpected: u64 = b
        .got
        .iter()
        .map(|(t, g)| g.saturating_sub(b.expected.get(t).copied().unwrap_or(0)) as u64)
        .sum();
    // Flat: the last fifth of the samples vs the first fifth after start.
    let fifth = (rss.len() / 5).max(1);
    let avg = |s: &[(f64, u64)]| s.iter().map(|x| x.1 as f64).sum::<f64>() / s.len().max(1) as f64;
    let early = avg(&rss[1.min(rss.len() - 1)..(1 + fifth).min(rss.len())]);
    let late = avg(&rss[rss.len().saturating_sub(fifth)..]);
    let growth_pct = (late - early) / early.max(1.0) * 100.0;
    let flat = late <= early * (1.0 + a.max_rss_growth_pct / 100.0) + 4096.0;
    println!(
        "soak: {n} clients, {} s, {sent} messages sent, {} deliveries expected (from receipts), {} received; lost {lost}, duplicated {}, unexpected {unexpected}, receipts not 'delivered' {}, send errors {}",
        a.seconds,
        want,
        received.load(Relaxed),
        b.duplicated,
        b.not_delivered,
        b.send_errors
    );
    println!(
        "relay RSS: {:.1} MiB early, {:.1} MiB late ({growth_pct:+.1}%), peak {:.1} MiB: {}",
        early / 1024.0,
        late / 1024.0,
        rss.iter().map(|x| x.1).max().unwrap_or(0) as f64 / 1024.0,
        if flat { "flat" } else { "GROWING" }
    );
    let ok = lost == 0 && b.duplicated == 0 && unexpected == 0 && b.send_errors == 0 && flat;
    let result = serde_json::json!({
        "machine": crate::machine(),
        "clients": n,
        "seconds": a.seconds,
        "rate": a.rate,
        "sent": sent,
        "deliveries_expected": want,
        "received": received.load(Relaxed),
        "lost": lost,
        "duplicated": b.duplicated,
        "unexpected": unexpected,
        "not_delivered_receipts": b.not_delivered,
        "send_errors": b.send_errors,
        "rss_kib": rss,
        "rss_growth_pct": growth_pct,
        "rss_flat": flat,
        "pass": ok,
    });
    crate::write_json(&a.out, "soak.json", &result)?;
    std::fs::write(
        a.out.join("soak-rss.svg"),
        crate::plot::lines(
            &format!("relay RSS during soak ({n} clients, {} msgs/s)", a.rate),
            "seconds",
            "RSS (MiB)",
            &[(
                "relay RSS".into(),
                rss.iter().map(|(t, r)| (*t, *r as f64 / 1024.0)).collect(),
            )],
        ),
    )?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn settle(
    books: &Mutex<Books>,
    tag: Tag,
    r: Result<w2w_proto::frame::Receipt, w2w_client::ClientError>,
) {
    let mut b = books.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(r) => {
            if r.status != Status::Delivered {
                b.not_delivered += 1;
            }
            b.expected.insert(tag, r.delivered);
        }
        Err(_) => b.send_errors += 1,
    }
}
