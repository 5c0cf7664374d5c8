//! The a2b load: sender/receiver pairs with a window of messages in flight.
//!
//! The same load for every system: `pairs` sender/receiver pairs, each pair
//! with its own two connections; each sender keeps at most `window`
//! messages in flight, where a message stops being in flight when its
//! receiver gets it; optionally paced to a total `rate`. Payload bytes
//! 0..8 are the send time (ns since the run's start), 8..16 a per-pair
//! sequence number, so receivers measure latency and count lost,
//! duplicated and reordered messages. Only arrivals after the warm-up and
//! before the deadline count toward throughput and latency.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::Status;
use w2w_proto::{Dest, Identity};

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub pairs: usize,
    pub window: usize,
    pub size: usize,
    pub seconds: f64,
    pub warmup: Duration,
    /// Total messages per second across all pairs; `None`: as fast as the
    /// window allows.
    pub rate: Option<f64>,
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub system: String,
    pub pairs: usize,
    pub window: usize,
    pub payload_bytes: usize,
    pub offered_rate: Option<f64>,
    pub seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Receipts other than "delivered" (w2w only).
    pub not_delivered: u64,
    pub msgs_per_sec: f64,
    pub mbytes_per_sec: f64,
    pub latency_us: Latency,
    /// The server process's CPU and memory during the run.
    pub server: Option<crate::proc::UsageReport>,
    /// The load generator's CPU during the run.
    pub loadgen: Option<crate::proc::UsageReport>,
    /// w2w: the share of the measured window its core lock was held
    /// (`w2w_core_lock_seconds_total`): the part of the relay one core runs
    /// at a time, so more cores can speed it up at most 1 / this.
    pub core_lock_share: Option<f64>,
    /// w2w: its store's durable transactions in the measured window
    /// (`w2w_store_commit_seconds`): a message the relay must write waits
    /// for one; one a connected recipient ACKs at once is never written.
    #[serde(default)]
    pub store_commits: Option<Commits>,
}

/// A relay's store commits over a window, from its histogram.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, Default)]
pub struct Commits {
    pub count: u64,
    pub mean_us: f64,
    /// Commits that took more than 2.5 ms / 10 ms (histogram buckets).
    pub over_2_5ms: u64,
    pub over_10ms: u64,
}

/// The commit histogram's figures [`Commits`] is made of.
const COMMIT_FIGURES: [&str; 4] = [
    "w2w_store_commit_seconds_count",
    "w2w_store_commit_seconds_sum",
    "w2w_store_commit_seconds_bucket{le=\"0.0025\"}",
    "w2w_store_commit_seconds_bucket{le=\"0.01\"}",
];

/// The lock's seconds and the commit figures, read at once.
async fn relay_figures(url: &str) -> Vec<Option<f64>> {
    let mut names = vec!["w2w_core_lock_seconds_total"];
    names.extend(COMMIT_FIGURES);
    crate::proc::metrics(url, &names).await
}

impl Commits {
    /// Between two reads of [`COMMIT_FIGURES`] (`None` if a figure is
    /// missing: an older relay).
    fn between(a: &[Option<f64>], b: &[Option<f64>]) -> Option<Commits> {
        let d = |i: usize| Some(b.get(i).copied()?? - a.get(i).copied()??);
        let count = d(0)?;
        Some(Commits {
            count: count as u64,
            mean_us: d(1)? * 1e6 / count.max(1.0),
            over_2_5ms: (count - d(2)?) as u64,
            over_10ms: (count - d(3)?) as u64,
        })
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, Default)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// State shared by the senders and receivers of one run.
struct Run {
    start: Instant,
    measure_from: Instant,
    deadline: Instant,
    received: AtomicU64,
    received_all: AtomicU64,
    sent: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    not_delivered: AtomicU64,
    windows: Vec<Semaphore>,
    last_seq: Vec<AtomicU64>,
    /// Set once everything sent has arrived (or given up on): receivers stop.
    finished: std::sync::atomic::AtomicBool,
    /// CPU and memory of the watched processes over the measured window.
    usage: std::sync::Mutex<Vec<crate::proc::UsageReport>>,
    /// The w2w relay's core lock share over the window (see `Outcome`).
    lock_share: std::sync::Mutex<Option<f64>>,
    commits: std::sync::Mutex<Option<Commits>>,
}

impl Run {
    /// `watch`: process ids whose CPU and memory are read over exactly the
    /// measured window (server first, then the load generator).
    /// `relay`: a w2w relay's URL, whose core lock time is read too.
    fn new(spec: &Spec, watch: &[u32], relay: Option<&str>) -> Arc<Run> {
        let start = Instant::now();
        let run = Arc::new(Run {
            start,
            measure_from: start + spec.warmup,
            deadline: start + spec.warmup + Duration::from_secs_f64(spec.seconds),
            received: AtomicU64::new(0),
            received_all: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            not_delivered: AtomicU64::new(0),
            windows: (0..spec.pairs)
                .map(|_| Semaphore::new(spec.window))
                .collect(),
            last_seq: (0..spec.pairs).map(|_| AtomicU64::new(0)).collect(),
            finished: Default::default(),
            usage: Default::default(),
            lock_share: Default::default(),
            commits: Default::default(),
        });
        let (r, pids) = (run.clone(), watch.to_vec());
        let relay = relay.map(str::to_owned);
        tokio::spawn(async move {
            use crate::proc::{cpu_seconds, rss_kib, UsageReport};
            tokio::time::sleep_until(r.measure_from.into()).await;
            let cpu0: Vec<f64> = pids
                .iter()
                .map(|p| cpu_seconds(*p).unwrap_or(0.0))
                .collect();
            let before = match &relay {
                Some(u) => relay_figures(u).await,
                None => Vec::new(),
            };
            let t0 = Instant::now();
            let mut peak = vec![0u64; pids.len()];
            while Instant::now() < r.deadline {
                for (i, p) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kib(*p).unwrap_or(0));
                }
                let left = r.deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(left.min(Duration::from_millis(200))).await;
            }
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            if let Some(u) = &relay {
                let after = relay_figures(u).await;
                if let (Some(Some(l0)), Some(Some(l1))) = (before.first(), after.first()) {
                    *r.lock_share.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((l1 - l0) / secs);
                }
                *r.commits.lock().unwrap_or_else(|e| e.into_inner()) = Commits::between(
                    before.get(1..).unwrap_or(&[]),
                    after.get(1..).unwrap_or(&[]),
                );
            }
            let reports = pids
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let cpu = cpu_seconds(*p).unwrap_or(cpu0[i]) - cpu0[i];
                    let end = rss_kib(*p).unwrap_or(0);
                    UsageReport {
                        cpu_seconds: cpu,
                        cpu_cores: cpu / secs,
                        rss_end_kib: end,
                        rss_peak_kib: peak[i].max(end),
                    }
                })
                .collect();
            *r.usage.lock().unwrap_or_else(|e| e.into_inner()) = reports;
        });
        run
    }

    /// After the senders are done: waits (≤ 3 s) for what is in flight, then
    /// lets the receivers stop.
    async fn settle(&self) {
        let t = Instant::now();
        while self.received_all.load(Relaxed) < self.sent.load(Relaxed)
            && t.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The usage watcher finishes at the deadline.
        while Instant::now() < self.deadline + Duration::from_millis(50) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.finished.store(true, Relaxed);
    }

    /// Waits for the senders, lets what is in flight land, merges the
    /// receivers' histograms and reports.
    async fn finish(
        &self,
        system: &str,
        spec: &Spec,
        senders: Vec<tokio::task::JoinHandle<()>>,
        receivers: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
        progress: tokio::task::JoinHandle<()>,
    ) -> Result<Outcome> {
        for t in senders {
            t.await?;
        }
        self.settle().await;
        let mut hist = Histogram::<u64>::new(3)?;
        for r in receivers {
            hist.add(r.await?)?;
        }
        let _ = progress.await;
        Ok(self.outcome(system, spec, &hist))
    }

    fn is_finished(&self) -> bool {
        self.finished.load(Relaxed)
    }

    /// The payload for pair's `seq`-th message (`seq` from 1).
    fn payload(&self, size: usize, seq: u64) -> Vec<u8> {
        let mut p = vec![0u8; size.max(16)];
        p[..8].copy_from_slice(&(self.start.elapsed().as_nanos() as u64).to_le_bytes());
        p[8..16].copy_from_slice(&seq.to_le_bytes());
        p
    }

    /// A receiver of `pair` got `body`.
    fn arrived(&self, pair: usize, body: &[u8], hist: &mut Histogram<u64>) {
        if body.len() < 16 {
            return;
        }
        let sent_ns = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
        let last = self.last_seq[pair].fetch_max(seq, Relaxed);
        if seq == last {
            self.duplicated.fetch_add(1, Relaxed);
            return;
        }
        if seq < last {
            self.reordered.fetch_add(1, Relaxed);
        }
        self.received_all.fetch_add(1, Relaxed);
        self.windows[pair].add_permits(1);
        let now = Instant::now();
        if now >= self.measure_from && now < self.deadline {
            let now_ns = self.start.elapsed().as_nanos() as u64;
            let _ = hist.record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
            self.received.fetch_add(1, Relaxed);
        }
    }

    /// A window slot if one is free now (for writing a batch).
    fn try_slot(&self, pair: usize) -> bool {
        match self.windows[pair].try_acquire() {
            Ok(p) => {
                p.forget();
                Instant::now() < self.deadline
            }
            Err(_) => false,
        }
    }

    /// Waits for a window slot, pacing to `interval` if set. `None` once
    /// the deadline has passed.
    /// Cancel-safe: the caller advances `next_at` once it has sent.
    async fn next_slot(
        &self,
        pair: usize,
        next_at: tokio::time::Instant,
        interval: Option<Duration>,
    ) -> Option<()> {
        if interval.is_some() {
            tokio::time::sleep_until(next_at).await;
        }
        let stall = Duration::from_secs(10);
        match tokio::time::timeout(stall, self.windows[pair].acquire()).await {
            Ok(Ok(p)) => p.forget(),
            _ => return None, // nothing arrived for 10 s: give up (counted as lost)
        }
        (Instant::now() < self.deadline).then_some(())
    }

    fn interval(spec: &Spec) -> Option<Duration> {
        spec.rate
            .map(|r| Duration::from_secs_f64(spec.pairs as f64 / r.max(1e-3)))
    }

    fn outcome(&self, system: &str, spec: &Spec, hist: &Histogram<u64>) -> Outcome {
        let got = self.received.load(Relaxed);
        let sent = self.sent.load(Relaxed);
        let all = self.received_all.load(Relaxed);
        let rate = got as f64 / spec.seconds;
        let usage = self.usage.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Outcome {
            system: system.to_string(),
            pairs: spec.pairs,
            window: spec.window,
            payload_bytes: spec.size.max(16),
            offered_rate: spec.rate,
            seconds: spec.seconds,
            sent,
            received: all,
            lost: sent.saturating_sub(all),
            duplicated: self.duplicated.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
            not_delivered: self.not_delivered.load(Relaxed),
            msgs_per_sec: rate,
            mbytes_per_sec: rate * spec.size.max(16) as f64 / 1e6,
            latency_us: Latency::of(hist),
            server: usage.first().copied(),
            loadgen: usage.get(1).copied(),
            core_lock_share: *self.lock_share.lock().unwrap_or_else(|e| e.into_inner()),
            store_commits: *self.commits.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// Prints received counts once a second until `done`.
fn progress(run: &Arc<Run>, label: String) -> tokio::task::JoinHandle<()> {
    let run = run.clone();
    tokio::spawn(async move {
        let total = run.deadline.duration_since(run.start).as_secs_f64();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = run.start.elapsed().as_secs_f64().min(total);
            let filled = ((t / total) * 30.0) as usize;
            eprint!(
                "\r  {label:<14} [{}{}] {:>5.1}/{total:.1}s {:>9} received",
                "#".repeat(filled),
                " ".repeat(30 - filled.min(30)),
                t,
                run.received_all.load(Relaxed)
            );
            if t >= total {
                eprintln!();
                return;
            }
        }
    })
}

/// Runs the load through a w2w relay at `url` (plain a2b, so the relay
/// does its full work: registration, routing, receipts, ACKs, durability).
pub async fn w2w(url: &str, spec: &Spec, watch: &[u32]) -> Result<Outcome> {
    let mut pairs = Vec::new();
    for _ in 0..spec.pairs {
        let rx = Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(url),
        )
        .await
        .context("connecting a receiver")?;
        let tx = Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(url),
        )
        .await
        .context("connecting a sender")?;
        pairs.push((tx, rx));
    }
    // A new connection first takes its (empty) stored backlog.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = Run::new(spec, watch, Some(url));
    let bar = progress(&run, "w2w".into());
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for (i, (tx, mut rx)) in pairs.into_iter().enumerate() {
        let to = rx.address();
        let run2 = run.clone();
        receivers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            while !run2.is_finished() {
                match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
                    Ok(Some(Event::Msg(m))) => run2.arrived(i, &m.body, &mut hist),
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => break,
                }
            }
            hist
        }));
        let (run, size, interval) = (run.clone(), spec.size, Run::interval(spec));
        tasks.push(tokio::spawn(async move {
            let mut inflight = FuturesUnordered::new();
            let mut next_at = tokio::time::Instant::now();
            let mut seq = 0u64;
            let mut sending = true;
            loop {
                tokio::select! {
                    Some(r) = inflight.next() => {
                        let r: Result<w2w_proto::frame::Receipt, _> = r;
                        if !matches!(r, Ok(ref r) if r.status == Status::Delivered) {
                            run.not_delivered.fetch_add(1, Relaxed);
                        }
                    }
                    slot = run.next_slot(i, next_at, interval), if sending => {
                        if slot.is_none() {
                            sending = false;
                            continue;
                        }
                        next_at += interval.unwrap_or_default();
                        seq += 1;
                        run.sent.fetch_add(1, Relaxed);
                        inflight.push(tx.send_plain(Dest::A2b(to), run.payload(size, seq)));
                    }
                    else => break,
                }
            }
        }));
    }
    run.finish("w2w", spec, tasks, receivers, bar).await
}

/// Most MSG frames a raw sender writes before one flush, and most ids in
/// one ACK a raw receiver sends.
const RAW_BATCH: usize = 64;

/// Runs the load through a w2w relay with a load generator made cheap
/// enough to drive it (issue 13, item 1): registered raw sockets, MSG
/// frames built from one template per pair (id and payload patched in),
/// written in batches of up to [`RAW_BATCH`] with one flush, receipts read
/// by a task per sender that only looks at the status byte, ACKs sent in
/// batches by the receivers; no client library, no per-message futures.
/// It still checks every message arrives once and in order, and counts
/// receipts other than `delivered`.
pub async fn w2w_raw(url: &str, spec: &Spec, watch: &[u32]) -> Result<Outcome> {
    w2w_raw_between(url, url, url, spec, watch).await
}

/// The raw load with its senders registered at relay `from` and its
/// receivers at relay `to` (the same relay, or the ends of a federation);
/// `watched`: the relay whose core lock share is read.
pub async fn w2w_raw_between(
    from: &str,
    to: &str,
    watched: &str,
    spec: &Spec,
    watch: &[u32],
) -> Result<Outcome> {
    use futures_util::FutureExt;
    use tokio_websockets::Message;
    use w2w_proto::frame::{ClientToRelay, Msg, MsgId};
    let (tx_opts, rx_opts) = (ConnectOptions::new(from), ConnectOptions::new(to));
    let mut pairs = Vec::new();
    for _ in 0..spec.pairs {
        let (tx_id, rx_id) = (
            Identity::from_seed(rand::random()),
            Identity::from_seed(rand::random()),
        );
        let mut rx = w2w_client::connect_raw(&rx_opts).await?;
        w2w_client::register(&mut rx, &rx_id, to, None)
            .await
            .context("registering a receiver")?;
        let mut tx = w2w_client::connect_raw(&tx_opts).await?;
        w2w_client::register(&mut tx, &tx_id, from, None)
            .await
            .context("registering a sender")?;
        pairs.push((tx, tx_id.address(), rx, rx_id.address()));
    }
    // (Across relays: the receivers' records reach their holders first.)
    let settle = if from == to { 200 } else { 1_000 };
    tokio::time::sleep(Duration::from_millis(settle)).await;
    let run = Run::new(spec, watch, Some(watched));
    let bar = progress(&run, "w2w raw".into());
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for (i, (tx, from, rx, to)) in pairs.into_iter().enumerate() {
        // The receiver: MSG payloads to the run, ids back as one ACK per
        // read burst.
        let run2 = run.clone();
        let (mut rx_sink, mut rx_stream) = rx.split();
        // ACKs are written by their own task: a receiver that waited for
        // its ACK write would stop reading, and the relay, which does not
        // read a connection while a write to it is blocked, would wait for
        // it in turn (both sides blocked on writes).
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel::<Vec<MsgId>>(1024);
        tokio::spawn(async move {
            while let Some(ids) = ack_rx.recv().await {
                let ack = ClientToRelay::Ack(ids).encode();
                if rx_sink.send(Message::binary(ack)).await.is_err() {
                    break;
                }
            }
        });
        receivers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut ids = Vec::with_capacity(RAW_BATCH);
            while !run2.is_finished() {
                let first =
                    match tokio::time::timeout(Duration::from_millis(50), rx_stream.next()).await {
                        Ok(Some(Ok(m))) => m,
                        Ok(Some(Err(_)) | None) => break,
                        Err(_) => continue,
                    };
                let mut next = Some(first);
                while let Some(m) = next.take() {
                    let b = m.as_payload();
                    // MSG: type 0x10 at 1, id at 4..20, a2b payload from 84.
                    if b.len() >= 84 && b[1] == 0x10 {
                        run2.arrived(i, &b[84..], &mut hist);
                        ids.push(MsgId(b[4..20].try_into().expect("16 bytes")));
                    }
                    if ids.len() < RAW_BATCH {
                        next = rx_stream
                            .next()
                            .now_or_never()
                            .flatten()
                            .and_then(|r| r.ok());
                    }
                }
                if !ids.is_empty() {
                    match ack_tx.try_send(std::mem::take(&mut ids)) {
                        Ok(()) => {}
                        // The writer is behind: these go with the next ACK.
                        Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => ids = back,
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
            }
            hist
        }));
        // The sender's receipts: only the status byte is read.
        let (mut tx_sink, mut tx_stream) = tx.split();
        let run3 = run.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = tx_stream.next().await {
                let b = m.as_payload();
                // RECEIPT: type 0x11 at 1, status at 18 (0 = delivered).
                if b.len() > 18 && b[1] == 0x11 && b[18] != 0 {
                    run3.not_delivered.fetch_add(1, Relaxed);
                }
            }
        });
        let template = ClientToRelay::Msg(Msg {
            flags: 0,
            id: MsgId([0; 16]),
            from,
            dest: Dest::A2b(to),
            payload: Bytes::new(),
        })
        .encode();
        let (run, size, interval) = (run.clone(), spec.size, Run::interval(spec));
        tasks.push(tokio::spawn(async move {
            let frame = |seq: u64| {
                let mut f = bytes::BytesMut::with_capacity(template.len() + size.max(16));
                f.extend_from_slice(&template);
                f[4..12].copy_from_slice(&(i as u64).to_be_bytes());
                f[12..20].copy_from_slice(&seq.to_be_bytes());
                f.extend_from_slice(&run.payload(size, seq));
                Message::binary(f.freeze())
            };
            send_batched(&run, i, interval, &mut tx_sink, frame).await;
            // A close waits for the relay's answer, which the receipt
            // reader may take: bounded, so a run always ends.
            let _ = tokio::time::timeout(Duration::from_secs(1), tx_sink.close()).await;
        }));
    }
    run.finish("w2w (raw load)", spec, tasks, receivers, bar)
        .await
}

/// Sends pair `pair`'s messages (`frame(seq)`) to `sink` as its window
/// allows: waits for a slot, then feeds more while slots are free now (at
/// most [`RAW_BATCH`]; when paced, only those already due), one flush per
/// batch. Paced, the timer wakes it at most once a millisecond, so each
/// wake-up sends what fell due since (a flush per message capped the
/// paced rate near 200,000 msgs/s). Ends at the deadline or when the sink
/// fails.
async fn send_batched<S>(
    run: &Run,
    pair: usize,
    interval: Option<Duration>,
    sink: &mut S,
    mut frame: impl FnMut(u64) -> tokio_websockets::Message,
) where
    S: futures_util::Sink<tokio_websockets::Message> + Unpin,
{
    let mut next_at = tokio::time::Instant::now();
    let mut seq = 0u64;
    'send: while run.next_slot(pair, next_at, interval).await.is_some() {
        let mut n = 0;
        loop {
            next_at += interval.unwrap_or_default();
            seq += 1;
            run.sent.fetch_add(1, Relaxed);
            if sink.feed(frame(seq)).await.is_err() {
                break 'send;
            }
            n += 1;
            let due = interval.is_none() || next_at <= tokio::time::Instant::now();
            if !due || n == RAW_BATCH || !run.try_slot(pair) {
                break;
            }
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
}

type BareWs =
    tokio_websockets::WebSocketStream<tokio_websockets::MaybeTlsStream<tokio::net::TcpStream>>;

async fn bare_connect(url: &str, me: [u8; 32]) -> Result<BareWs> {
    let uri: http::Uri = url.parse()?;
    let (mut ws, _) = tokio_websockets::ClientBuilder::from_uri(uri)
        .connect()
        .await
        .with_context(|| format!("connecting to the bare forwarder at {url}"))?;
    if let tokio_websockets::MaybeTlsStream::Plain(t) = ws.get_ref() {
        t.set_nodelay(true)?;
    }
    ws.send(tokio_websockets::Message::binary(Bytes::copy_from_slice(
        &me,
    )))
    .await?;
    Ok(ws)
}

/// Runs the load through the bare forwarder at `url`.
pub async fn bare(url: &str, spec: &Spec, watch: &[u32]) -> Result<Outcome> {
    let mut pairs = Vec::new();
    for _ in 0..spec.pairs {
        let (a, b): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
        let rx = bare_connect(url, b).await?;
        let tx = bare_connect(url, a).await?;
        pairs.push((tx, rx, b));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = Run::new(spec, watch, None);
    let bar = progress(&run, "bare".into());
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for (i, (mut tx, mut rx, to)) in pairs.into_iter().enumerate() {
        let run2 = run.clone();
        receivers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            while !run2.is_finished() {
                match tokio::time::timeout(Duration::from_millis(50), rx.next()).await {
                    Ok(Some(Ok(m))) if m.is_binary() => {
                        let b = m.into_payload();
                        if b.len() >= 32 {
                            run2.arrived(i, &b[32..], &mut hist);
                        }
                    }
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(Some(Err(_)) | None) => break,
                }
            }
            hist
        }));
        let (run, size, interval) = (run.clone(), spec.size, Run::interval(spec));
        tasks.push(tokio::spawn(async move {
            let frame = |seq: u64| {
                let mut m = Vec::with_capacity(32 + size.max(16));
                m.extend_from_slice(&to);
                m.extend_from_slice(&run.payload(size, seq));
                tokio_websockets::Message::binary(Bytes::from(m))
            };
            send_batched(&run, i, interval, &mut tx, frame).await;
            let _ = tx.close().await;
        }));
    }
    run.finish("bare forwarder", spec, tasks, receivers, bar)
        .await
}

/// Runs the load against iroh-relay with the bench-only crate's load
/// generator (a child process, pinned to `cpu`), which prints one JSON line.
pub async fn iroh(
    bin: &std::path::Path,
    url: &str,
    spec: &Spec,
    cpu: Option<usize>,
) -> Result<Outcome> {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["load", "--url", url])
        .args(["--pairs", &spec.pairs.to_string()])
        .args(["--window", &spec.window.to_string()])
        .args(["--size", &spec.size.max(16).to_string()])
        .args(["--seconds", &spec.seconds.to_string()])
        .args(["--warmup-ms", &spec.warmup.as_millis().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    if let Some(r) = spec.rate {
        cmd.args(["--rate", &format!("{r:.0}")]);
    }
    if let Some(cpu) = cpu {
        crate::proc::pin_command(&mut cmd, cpu);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("running the iroh-relay load generator")?;
    if !out.status.success() {
        bail!("the iroh-relay load generator failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON from the iroh-relay load generator")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let lat: Latency = serde_json::from_value(v["latency_us"].clone()).unwrap_or_default();
    Ok(Outcome {
        system: format!(
            "iroh-relay {}",
            v["iroh_relay_version"].as_str().unwrap_or("")
        )
        .trim()
        .to_string(),
        pairs: spec.pairs,
        window: spec.window,
        payload_bytes: spec.size.max(16),
        offered_rate: spec.rate,
        seconds: f("seconds"),
        sent: u("sent"),
        received: u("received"),
        lost: u("lost"),
        duplicated: 0,
        reordered: 0,
        not_delivered: 0,
        msgs_per_sec: f("msgs_per_sec"),
        mbytes_per_sec: f("mbytes_per_sec"),
        latency_us: lat,
        server: None,
        loadgen: None,
        core_lock_share: None,
        store_commits: None,
    })
}
