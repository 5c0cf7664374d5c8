//! `w2w-bench fanout`: registrations per second, then a2n deliveries per
//! second from one sender to many clients on one relay (a child process).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures_util::stream::StreamExt;
use futures_util::SinkExt;
use tokio_websockets::Message;
use w2w_client::{ConnectOptions, Event};
use w2w_proto::frame::Scope;
use w2w_proto::frame::{ClientToRelay, Msg, MsgId, RelayToClient};
use w2w_proto::{Dest, Identity};

use crate::proc::{self, ServerProc, Usage};

#[derive(Args)]
pub struct FanoutArgs {
    /// Receiving clients (each its own connection and key).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Registrations in progress at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured seconds of a2n.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// a2n messages in flight (each waits for its receipt).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Directory for fanout.json.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

impl FanoutArgs {
    /// `clients` receivers, 3 s of a2n (`w2w-bench curves`).
    pub fn audience(clients: usize, out: PathBuf) -> FanoutArgs {
        FanoutArgs {
            clients,
            concurrency: 64,
            seconds: 3.0,
            window: 4,
            size: 64,
            out,
        }
    }

    pub fn smoke(out: PathBuf) -> FanoutArgs {
        FanoutArgs {
            clients: 50,
            concurrency: 8,
            seconds: 1.0,
            window: 2,
            size: 64,
            out,
        }
    }
}

pub async fn run(a: FanoutArgs) -> Result<serde_json::Value> {
    proc::raise_nofile();
    let pin = proc::cpu_count() >= 2;
    let relay = ServerProc::w2w(
        pin.then_some(0),
        true,
        &format!("max_connections = {}\n", a.clients + 1000),
    )?;
    if pin {
        proc::pin_self(1)?;
    }
    let url = relay.url.clone();
    // 1. Registrations: connect + the full sigA/sigB/sigC handshake.
    let usage = Usage::start(relay.pid());
    let t0 = Instant::now();
    let clients = crate::connect_many(&url, a.clients, a.concurrency).await?;
    let reg_secs = t0.elapsed().as_secs_f64();
    let reg_usage = usage.finish();
    let regs_per_sec = a.clients as f64 / reg_secs;
    println!(
        "registrations: {} clients in {reg_secs:.2} s = {regs_per_sec:.0} /s ({} at once); relay CPU {:.0}%",
        a.clients,
        a.concurrency,
        reg_usage.cpu_cores * 100.0
    );

    // 2. a2n from one more client to all of them. The sender is a raw
    // socket: it gets its own copy of every a2n too, and simply skips it.
    let sender_id = Identity::from_seed(rand::random());
    let mut sender = w2w_client::connect_raw(&ConnectOptions::new(&url)).await?;
    w2w_client::register(&mut sender, &sender_id, &url, None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let in_window = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut c in clients {
        let (received, measuring, in_window) =
            (received.clone(), measuring.clone(), in_window.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = c.recv().await {
                if let Event::Msg(_) = ev {
                    received.fetch_add(1, Relaxed);
                    if measuring.load(Relaxed) {
                        in_window.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    let usage = Usage::start(relay.pid());
    let mut expected = 0u64;
    let mut sent = 0u64;
    let t0 = Instant::now();
    measuring.store(true, Relaxed);
    let deadline = t0 + Duration::from_secs_f64(a.seconds);
    let mut inflight = 0usize;
    loop {
        while Instant::now() < deadline && inflight < a.window.max(1) {
            let msg = Msg {
                flags: w2w_proto::seal::FLAG_PLAIN,
                id: MsgId(rand::random()),
                from: sender_id.address(),
                dest: Dest::A2n(Scope::Relay),
                payload: vec![0x5a; a.size].into(),
            };
            sender
                .send(Message::binary(ClientToRelay::Msg(msg).encode()))
                .await?;
            sent += 1;
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        let m = tokio::time::timeout(Duration::from_secs(10), sender.next())
            .await
            .context("no receipt for an a2n within 10 s")?
            .context("relay closed the connection")??;
        if !m.is_binary() {
            continue;
        }
        let b: bytes::Bytes = m.into_payload().into();
        if let Ok(RelayToClient::Receipt(r)) = RelayToClient::decode(&b) {
            inflight -= 1;
            // The sender's own copy is in the count; it is not a client's.
            expected += (r.delivered as u64).saturating_sub(1);
        }
    }
    let secs = t0.elapsed().as_secs_f64().min(a.seconds).max(1e-3);
    measuring.store(false, Relaxed);
    let fan_usage = usage.finish();
    // Let the last deliveries land, then compare with the receipts.
    let want = expected;
    let t1 = Instant::now();
    while received.load(Relaxed) < want && t1.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.load(Relaxed);
    let per_sec = in_window.load(Relaxed) as f64 / secs;
    println!(
        "a2n fan-out to {} clients: {sent} messages, {per_sec:.0} deliveries/s ({:.0} messages/s); receipts counted {want} deliveries, clients got {got}; relay CPU {:.0}%, RSS {} KiB",
        a.clients,
        per_sec / a.clients as f64,
        fan_usage.cpu_cores * 100.0,
        fan_usage.rss_end_kib
    );
    proc::unpin_self()?;
    let _ = sender.close().await;
    // Clients go before the relay, so none of them tries to reconnect.
    for t in tasks {
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(relay);
    anyhow::ensure!(
        got == want,
        "a2n: receipts counted {want} deliveries but clients received {got}"
    );
    let result = serde_json::json!({
        "machine": crate::machine(),
        "clients": a.clients,
        "registration_concurrency": a.concurrency,
        "registrations_per_sec": regs_per_sec,
        "registration_relay": reg_usage,
        "a2n_messages": sent,
        "a2n_deliveries_per_sec": per_sec,
        "a2n_deliveries_expected": want,
        "a2n_deliveries_received": got,
        "fanout_relay": fan_usage,
    });
    crate::write_json(&a.out, "fanout.json", &result)?;
    Ok(result)
}
