//! A federation of real relay processes on this machine (issue 12): R
//! relays that each know one seed, A registered addresses spread over
//! them, then a relay restarted and a relay killed for good. Measures
//! joining, registrations, directory records per relay, and whether a
//! message for a sample of addresses, sent from a relay other than the
//! address's own, is taken (`queued`: stored at its relay, or kept in
//! custody while that relay is down) or refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use w2w_client::{Client, ConnectOptions};
use w2w_proto::frame::Status;
use w2w_proto::{Address, Dest, ErrorCode, Identity};

use crate::proc::{self, ServerProc};

#[derive(Args)]
pub struct FedArgs {
    /// Relays; relay 0 is the seed every other one is given.
    #[arg(long, default_value_t = 30)]
    relays: usize,
    /// Addresses registered (each connects, registers, and leaves).
    #[arg(long, default_value_t = 100_000)]
    addresses: usize,
    /// Registrations at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Messages sent per reachability sample.
    #[arg(long, default_value_t = 2_000)]
    sample: usize,
    /// The relays' `lease_ms` (a dead relay's records lapse after it).
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl FedArgs {
    /// Seconds-long: 3 relays, 300 addresses (`w2w-bench smoke`).
    pub fn smoke() -> FedArgs {
        FedArgs {
            relays: 3,
            addresses: 300,
            concurrency: 16,
            sample: 60,
            lease_ms: 3_000,
            json: None,
        }
    }
}

/// Whether every sampled a2b of a phase was taken.
pub fn all_taken(v: &serde_json::Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.keys().all(|k| k == "taken") && !o.is_empty())
}

struct Relay {
    proc: Option<ServerProc>,
    url: String,
    dir: PathBuf,
}

impl Relay {
    fn start(dir: PathBuf, listen: &str, seed: Option<&str>, lease_ms: u64) -> Result<Relay> {
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "[limits]\nrate_per_sec = 1000000000\nrate_burst = 1000000000\nmax_connections_per_ip = 1000000000\n\
                 handshake_rate_per_ip = 1000000000\nhandshake_burst_per_ip = 1000000000\n\n\
                 [federation]\nlease_ms = {lease_ms}\nprobation_records = 100000000\nprobation_relays = 100000\n"
            ),
        )?;
        let mut cmd = Command::new(proc::w2w_bin()?);
        cmd.args(["serve", "--listen", listen, "--data"])
            .arg(&dir)
            .arg("--config")
            .arg(&cfg)
            .env("HOME", &dir)
            .env("W2W_LOG", "warn");
        if let Some(s) = seed {
            cmd.args(["--peer", s]);
        }
        let proc = ServerProc::spawn("w2w", cmd, "w2w relay listening on ", None, None)?;
        Ok(Relay {
            url: proc.url.clone(),
            proc: Some(proc),
            dir,
        })
    }

    fn listen(&self) -> String {
        self.url
            .trim_start_matches("ws://")
            .trim_end_matches('/')
            .to_string()
    }
}

/// Reads one metric from a relay's `/metrics` (`None` if it is down).
async fn metrics_of(relays: &[Relay], name: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for r in relays.iter().filter(|r| r.proc.is_some()) {
        out.push(crate::proc::metric(&r.url, name).await.unwrap_or(-1.0));
    }
    out
}

/// Sends one a2b to each sampled address from a relay other than its own
/// (`skip`: relays not to send from); counts the receipts by outcome.
async fn reach(
    senders: &[Option<Client>],
    addrs: &[(Address, usize)],
    sample: usize,
    skip: &[usize],
) -> Result<(BTreeMap<String, u64>, Vec<f64>)> {
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut ms = Vec::new();
    let mut pending = FuturesUnordered::new();
    let mut i = 0;
    while i < sample || !pending.is_empty() {
        while i < sample && pending.len() < 32 {
            let (to, home) = addrs[rand::random::<u64>() as usize % addrs.len()];
            let from = loop {
                let f = rand::random::<u64>() as usize % senders.len();
                if f != home && !skip.contains(&f) && senders[f].is_some() {
                    break f;
                }
            };
            let c = senders[from].as_ref().context("a sender")?;
            let t0 = Instant::now();
            pending.push(async move {
                let r = c.send(Dest::A2b(to), "probe").await;
                (r, t0.elapsed())
            });
            i += 1;
        }
        if let Some((r, took)) = pending.next().await {
            let key = match r {
                Ok(r) if matches!(r.status, Status::Queued | Status::Delivered) => "taken".into(),
                Ok(r) => {
                    ErrorCode::from_u16(r.reason).map_or("other".into(), |c| c.as_str().into())
                }
                Err(e) => format!("error: {e}"),
            };
            *outcomes.entry(key).or_default() += 1;
            ms.push(took.as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok((outcomes, ms))
}

fn pct(ms: &[f64], p: f64) -> f64 {
    if ms.is_empty() {
        return 0.0;
    }
    ms[((ms.len() - 1) as f64 * p) as usize]
}

async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        if f().await {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(a: FedArgs) -> Result<serde_json::Value> {
    proc::raise_nofile();
    let base = std::env::temp_dir().join(format!("w2w-fedscale-{}", rand::random::<u64>()));
    let n = a.relays.max(3);
    let result = scenario(&a, n, &base).await;
    let _ = std::fs::remove_dir_all(&base);
    result
}

async fn scenario(a: &FedArgs, n: usize, base: &std::path::Path) -> Result<serde_json::Value> {
    // 1. The seed, then the others, each given only the seed's URL.
    let t0 = Instant::now();
    let mut relays = vec![Relay::start(
        base.join("r0"),
        "127.0.0.1:0",
        None,
        a.lease_ms,
    )?];
    let seed = relays[0].url.clone();
    for i in 1..n {
        relays.push(Relay::start(
            base.join(format!("r{i}")),
            "127.0.0.1:0",
            Some(&seed),
            a.lease_ms,
        )?);
    }
    let want = (n - 1) as f64;
    let joined = until(
        "every relay reaches every other",
        Duration::from_secs(120),
        async || {
            metrics_of(&relays, "w2w_known_relays")
                .await
                .iter()
                .all(|v| *v == want)
        },
    )
    .await?
        + t0.elapsed().as_secs_f64();
    println!("{n} relays, each given relay 0 only: every relay reaches every other {joined:.1} s after the first started");

    // 2. Registrations, spread over the relays; each address leaves again
    // (offline: its relay stores for it).
    let t0 = Instant::now();
    let mut addrs: Vec<(Address, usize)> = Vec::with_capacity(a.addresses);
    let mut reg_ms: Vec<f64> = Vec::with_capacity(a.addresses);
    let mut retries = 0u32;
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while addrs.len() < a.addresses {
        while next < a.addresses && pending.len() < a.concurrency.max(1) {
            let home = next % n;
            let url = relays[home].url.clone();
            pending.push(async move {
                // A registration that times out on an overloaded machine
                // is tried again (counted), at most three times.
                let id = Identity::from_seed(rand::random());
                let t0 = Instant::now();
                let mut tries = 0;
                loop {
                    tries += 1;
                    let attempt = async {
                        let mut ws = w2w_client::connect_raw(&ConnectOptions::new(&url)).await?;
                        w2w_client::register(&mut ws, &id, &url, None).await?;
                        anyhow::Ok(())
                    };
                    match attempt.await {
                        Ok(()) => break,
                        Err(e) if tries >= 3 => return Err(e),
                        Err(_) => {}
                    }
                }
                anyhow::Ok((id.address(), home, t0.elapsed(), tries - 1))
            });
            next += 1;
        }
        if let Some(r) = pending.next().await {
            let (addr, home, took, retried) = r.context("registering")?;
            addrs.push((addr, home));
            reg_ms.push(took.as_secs_f64() * 1000.0);
            retries += retried;
            if addrs.len().is_multiple_of(1000) {
                eprint!("\r  registered {:>7} / {}", addrs.len(), a.addresses);
            }
        }
    }
    eprintln!();
    let reg_secs = t0.elapsed().as_secs_f64();
    reg_ms.sort_by(f64::total_cmp);
    println!(
        "registrations: {} in {reg_secs:.1} s = {:.0}/s ({} at once; each p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {retries} timed out and were tried again)",
        a.addresses,
        a.addresses as f64 / reg_secs,
        a.concurrency,
        pct(&reg_ms, 0.5),
        pct(&reg_ms, 0.99),
        reg_ms.last().copied().unwrap_or(0.0)
    );
    // The directory settles: records held stop changing.
    // (Unchanged over 2 s: puts are paced, 512 records per 50 ms.)
    let mut last = Vec::new();
    let mut same_since = Instant::now();
    let settle = until(
        "the directory settles",
        Duration::from_secs(300),
        async || {
            let now = metrics_of(&relays, "w2w_known_addresses").await;
            if now != last {
                last = now;
                same_since = Instant::now();
            }
            same_since.elapsed() >= Duration::from_secs(2)
        },
    )
    .await?
        - 2.0;
    let held = &last;
    let mean = held.iter().sum::<f64>() / held.len() as f64;
    let max = held.iter().cloned().fold(0.0, f64::max);
    println!(
        "directory settled {settle:.1} s after the last registration: records held per relay mean {mean:.0}, max {max:.0} (k·A/R = {:.0}; all A = {})",
        4.0 * a.addresses as f64 / n as f64,
        a.addresses
    );

    // One sender per relay.
    let mut senders: Vec<Option<Client>> = Vec::new();
    for r in &relays {
        senders.push(Some(
            Client::connect(
                Identity::from_seed(rand::random()),
                ConnectOptions::new(&r.url),
            )
            .await?,
        ));
    }
    let (base_out, base_ms) = reach(&senders, &addrs, a.sample, &[]).await?;
    println!(
        "reachability: {} a2b to sampled addresses from other relays: {base_out:?}; receipt p50 {:.1} ms, p99 {:.1} ms",
        a.sample,
        pct(&base_ms, 0.5),
        pct(&base_ms, 0.99)
    );

    // 3. Relay 1 restarts (SIGKILL, then the same data dir and port).
    let x = 1;
    let mine: Vec<(Address, usize)> = addrs.iter().filter(|(_, h)| *h == x).cloned().collect();
    senders[x] = None;
    // Dropping the process SIGKILLs and reaps it (its data dir stays).
    relays[x].proc = None;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (down_out, _) = reach(&senders, &mine, a.sample / 4, &[x]).await?;
    println!("relay {x} down: a2b to its addresses: {down_out:?}");
    let t0 = Instant::now();
    let listen = relays[x].listen();
    let dir = relays[x].dir.clone();
    relays[x] = Relay::start(dir, &listen, Some(&seed), a.lease_ms)?;
    let url = relays[x].url.clone();
    until(
        "the restarted relay reaches every other",
        Duration::from_secs(60),
        async || crate::proc::metric(&url, "w2w_known_relays").await == Some(want),
    )
    .await?;
    let rejoined = t0.elapsed().as_secs_f64();
    until(
        "what others kept for it has moved there",
        Duration::from_secs(120),
        async || {
            metrics_of(&relays, "w2w_custody_addresses")
                .await
                .iter()
                .all(|v| *v == 0.0)
        },
    )
    .await?;
    let drained = t0.elapsed().as_secs_f64();
    senders[x] = Some(
        Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(&url),
        )
        .await?,
    );
    let (back_out, _) = reach(&senders, &addrs, a.sample, &[]).await?;
    println!(
        "relay {x} restarted: it reaches every relay after {rejoined:.1} s, what was kept for its addresses has moved to it after {drained:.1} s; a2b to sampled addresses: {back_out:?}"
    );

    // 4. Relay 2 is killed for good.
    let y = 2;
    senders[y] = None;
    relays[y].proc = None;
    let others: Vec<(Address, usize)> = addrs.iter().filter(|(_, h)| *h != y).cloned().collect();
    let gone: Vec<(Address, usize)> = addrs.iter().filter(|(_, h)| *h == y).cloned().collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (others_out, _) = reach(&senders, &others, a.sample, &[y]).await?;
    let (gone_out, _) = reach(&senders, &gone, a.sample / 4, &[y]).await?;
    println!("relay {y} killed for good: a2b to the other relays' addresses: {others_out:?}; to its own: {gone_out:?}");
    tokio::time::sleep(Duration::from_millis(a.lease_ms + 2_000)).await;
    let (late_out, _) = reach(&senders, &gone, a.sample / 4, &[y]).await?;
    let live: Vec<f64> = metrics_of(&relays, "w2w_known_addresses").await;
    println!(
        "after its records' lease ({} ms): a2b to its addresses: {late_out:?}; records held per live relay now mean {:.0}",
        a.lease_ms,
        live.iter().sum::<f64>() / live.len() as f64
    );
    let out = serde_json::json!({
        "relays": n, "addresses": a.addresses, "lease_ms": a.lease_ms,
        "joined_s": joined, "registrations_per_s": a.addresses as f64 / reg_secs,
        "registration_p50_ms": pct(&reg_ms, 0.5), "registration_p99_ms": pct(&reg_ms, 0.99), "registration_retries": retries,
        "settle_s": settle, "held_mean": mean, "held_max": max,
        "reach": base_out, "reach_p50_ms": pct(&base_ms, 0.5), "reach_p99_ms": pct(&base_ms, 0.99),
        "restart": { "down": down_out, "rejoined_s": rejoined, "custody_drained_s": drained, "after": back_out },
        "kill": { "others": others_out, "its_own": gone_out, "its_own_after_lease": late_out },
    });
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(out)
}
