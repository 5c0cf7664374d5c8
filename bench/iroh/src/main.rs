//! Bench-only harness that runs iroh-relay so `w2w-bench` can compare w2w's relay with it
//! on identical a2b load.
//!
//! * `serve` runs an iroh-relay server in-process (plain HTTP on loopback, no TLS, no QUIC
//!   address discovery, no metrics server, no per-client rate limit) and prints one line
//!   `LISTENING http://127.0.0.1:PORT` on stdout.
//! * `load` runs N sender/receiver pairs of Ed25519-keyed relay clients against a relay URL
//!   and prints one JSON result line on stdout.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use iroh_base::{EndpointId, RelayUrl, SecretKey};
use iroh_dns::dns::DnsResolver;
use iroh_relay::{
    client::{Client, ClientBuilder, ClientSink},
    protos::relay::{ClientToRelayMsg, Datagrams, RelayToClientMsg},
    server::{RelayConfig, Server, ServerConfig},
    tls::{default_provider, CaTlsConfig},
};
use tokio::{
    io::AsyncReadExt,
    sync::{mpsc, Notify, Semaphore},
    task::JoinSet,
};

const IROH_RELAY_VERSION: &str = env!("IROH_RELAY_VERSION");

/// Timestamp value marking a setup probe datagram (never counted or recorded).
const PROBE_TS: u64 = u64::MAX;
/// A sender whose window is full and that sees nothing arrive for this long counts its
/// outstanding datagrams as lost and resets its window.
const LOSS_TIMEOUT: Duration = Duration::from_secs(1);
/// After the deadline, senders wait at most this long for in-flight datagrams.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_CONCURRENT_CONNECTS: usize = 32;

#[derive(Parser, Debug)]
#[command(
    name = "w2w-iroh-bench",
    version,
    about = "Bench harness for iroh-relay: runs an iroh-relay server, or an a2b load generator \
             against one, for comparison with w2w's relay (`w2w-bench`).",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run an iroh-relay server in-process (plain HTTP, loopback only, no TLS/QUIC/ACME/metrics,
    /// no per-client rate limit). Prints exactly one stdout line `LISTENING http://IP:PORT` once
    /// it accepts connections. Runs until SIGTERM/SIGINT, or until stdin reaches EOF when stdin
    /// is a pipe or socket (so a dying parent cleans it up).
    Serve(ServeArgs),
    /// Run N sender->receiver pairs of relay clients (each with its own Ed25519 key and its own
    /// relay connection) against a relay and print one JSON result line on stdout. Progress goes
    /// to stderr once a second.
    Load(LoadArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to bind the relay's HTTP endpoint to (must be a loopback address; port 0 picks a
    /// free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Relay URL, e.g. http://127.0.0.1:3340 (as printed by `serve`).
    #[arg(long)]
    url: String,
    /// Number of sender/receiver pairs (2 relay connections per pair).
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Max datagrams in flight per pair; a datagram stops being in flight when its receiver gets
    /// it.
    #[arg(long, default_value_t = 32)]
    window: u32,
    /// Datagram size in bytes (>= 8; bytes 0..8 carry the send timestamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Length of the measured window in seconds (after warmup).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Pace the total send rate across all pairs to R datagrams/s (still bounded by the window).
    /// Unpaced (as fast as the window allows) if omitted.
    #[arg(long)]
    rate: Option<f64>,
    /// Warmup before the measured window, in milliseconds (traffic flows but is not counted).
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
}

fn main() {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Load(a) => load(a).await,
        }
    });
    // Don't wait for lingering tasks (e.g. connections still closing).
    rt.shutdown_background();
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// serve

async fn serve(args: ServeArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!("--listen must be a loopback address, got {}", args.listen);
    }
    // RelayConfig::new: no TLS, default Limits (client_rx = None: no per-client rate limit),
    // AllowAll access. No QUIC (QAD) server and no metrics server.
    let mut config = ServerConfig::default();
    config.relay = Some(RelayConfig::new(args.listen));
    config.quic = None;
    config.metrics_addr = None;
    let mut server = Server::spawn(config)
        .await
        .map_err(|e| anyhow!("failed to start iroh-relay server: {e:#}"))?;
    let addr = server
        .http_addr()
        .ok_or_else(|| anyhow!("iroh-relay server has no HTTP address"))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "LISTENING http://{addr}")?;
        out.flush()?;
    }
    eprintln!("iroh-relay {IROH_RELAY_VERSION} serving on http://{addr}");

    let stdin_watch = stdin_is_pipe();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stdin_eof = async {
        if !stdin_watch {
            return std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = sigterm.recv() => eprintln!("SIGTERM, shutting down"),
        _ = tokio::signal::ctrl_c() => eprintln!("SIGINT, shutting down"),
        _ = stdin_eof => eprintln!("stdin closed, shutting down"),
        res = server.join() => {
            bail!("iroh-relay server stopped unexpectedly: {res:?}");
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), server.shutdown()).await;
    Ok(())
}

/// True when stdin is a pipe or socket, i.e. closing it means the parent went away.
/// (`/dev/null` or a terminal on stdin must not stop the server.)
fn stdin_is_pipe() -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata("/proc/self/fd/0") {
        Ok(m) => m.file_type().is_fifo() || m.file_type().is_socket(),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// load

/// State shared between a pair's sender and receiver.
struct Pair {
    /// Datagrams the receiver got (all phases except setup probes).
    received: AtomicU64,
    /// Datagrams the receiver got inside the measured window.
    received_measured: AtomicU64,
    /// Signalled by the receiver on every arrival (wakes a sender with a full window).
    notify: Notify,
}

/// Timing shared by all tasks; all times are nanoseconds since `epoch`.
struct Clock {
    epoch: Instant,
    /// Start of sending (end of setup).
    start_ns: u64,
    /// Start of the measured window (start + warmup).
    measure_start_ns: u64,
    /// End of the measured window; senders stop here.
    measure_end_ns: u64,
}

impl Clock {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_nanos(ns))
    }
    fn measured(&self, ns: u64) -> bool {
        ns >= self.measure_start_ns && ns < self.measure_end_ns
    }
}

struct SenderResult {
    sent_measured: u64,
    lost: u64,
}

struct ReceiverResult {
    hist: Histogram<u64>,
}

async fn load(args: LoadArgs) -> Result<()> {
    if args.pairs == 0 {
        bail!("--pairs must be >= 1");
    }
    if args.window == 0 {
        bail!("--window must be >= 1");
    }
    if args.size < 8 {
        bail!("--size must be >= 8 (bytes 0..8 carry the send timestamp)");
    }
    if args.size > iroh_relay::MAX_PACKET_SIZE - 64 {
        bail!("--size must be <= {}", iroh_relay::MAX_PACKET_SIZE - 64);
    }
    if !args.seconds.is_finite() || args.seconds <= 0.0 {
        bail!("--seconds must be > 0");
    }
    if let Some(r) = args.rate {
        if !r.is_finite() || r <= 0.0 {
            bail!("--rate must be > 0");
        }
    }
    let url: RelayUrl = args
        .url
        .parse()
        .map_err(|e| anyhow!("invalid --url {:?}: {e}", args.url))?;
    match url.scheme() {
        "http" | "https" | "ws" | "wss" => {}
        other => bail!("invalid --url {:?}: unsupported scheme {other:?}", args.url),
    }
    let epoch = Instant::now();
    let n = args.pairs;

    // 1. Connect 2N clients, each with its own Ed25519 key and its own relay connection.
    //    Index 2*i is pair i's sender, 2*i+1 its receiver.
    // Plain http:// relays never use it, but the builder requires a TLS config.
    let tls = CaTlsConfig::embedded()
        .client_config(default_provider())
        .context("building rustls client config")?;
    let dns = DnsResolver::new();
    let secrets: Vec<SecretKey> = (0..2 * n).map(|_| SecretKey::generate()).collect();
    let ids: Vec<EndpointId> = secrets.iter().map(|k| k.public()).collect();
    let connect_sem = Arc::new(Semaphore::new(MAX_CONCURRENT_CONNECTS));
    let mut connects = JoinSet::new();
    for (idx, secret) in secrets.into_iter().enumerate() {
        let builder = ClientBuilder::new(url.clone(), secret, dns.clone()).tls_client_config(tls.clone());
        let sem = connect_sem.clone();
        connects.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let res = tokio::time::timeout(CONNECT_TIMEOUT, builder.connect()).await;
            (idx, res)
        });
    }
    let mut slots: Vec<Option<Client>> = (0..2 * n).map(|_| None).collect();
    while let Some(joined) = connects.join_next().await {
        let (idx, res) = joined.context("connect task panicked")?;
        slots[idx] = Some(match res {
            Err(_) => bail!(
                "cannot connect to relay {}: timed out after {CONNECT_TIMEOUT:?}",
                args.url
            ),
            Ok(Err(e)) => bail!("cannot connect to relay {}: {e:#}", args.url),
            Ok(Ok(c)) => c,
        });
    }
    let mut clients = slots.into_iter().map(|c| c.expect("all connected"));
    let mut pairs_clients = Vec::with_capacity(n);
    for i in 0..n {
        let s = clients.next().expect("sender");
        let r = clients.next().expect("receiver");
        pairs_clients.push((s, r, ids[2 * i], ids[2 * i + 1]));
    }
    eprintln!("connected {} clients to {}", 2 * n, args.url);

    // 2. One datagram must get through each pair before the clock starts.
    let mut setups = JoinSet::new();
    for (i, (s, r, s_id, r_id)) in pairs_clients.into_iter().enumerate() {
        setups.spawn(async move {
            let res = tokio::time::timeout(SETUP_TIMEOUT, probe_pair(s, r, s_id, r_id, 8)).await;
            (i, res)
        });
    }
    let mut ready: Vec<Option<(Client, Client, EndpointId)>> = (0..n).map(|_| None).collect();
    while let Some(joined) = setups.join_next().await {
        let (i, res) = joined.context("setup task panicked")?;
        ready[i] = Some(match res {
            Err(_) => bail!("pair {i}: no datagram got through the relay within {SETUP_TIMEOUT:?}"),
            Ok(Err(e)) => bail!("pair {i}: setup failed: {e:#}"),
            Ok(Ok(v)) => v,
        });
    }
    eprintln!("all {n} pairs round-tripped a first datagram; starting load");

    // 3. Run.
    let start_ns = epoch.elapsed().as_nanos() as u64;
    let measure_start_ns = start_ns + args.warmup_ms * 1_000_000;
    let measure_ns = (args.seconds * 1e9).round() as u64;
    let clock = Arc::new(Clock {
        epoch,
        start_ns,
        measure_start_ns,
        measure_end_ns: measure_start_ns + measure_ns,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let stop_notify = Arc::new(Notify::new());
    let fatal: Arc<std::sync::Mutex<Option<String>>> = Arc::new(std::sync::Mutex::new(None));
    let per_pair_rate = args.rate.map(|r| r / n as f64);

    let mut pair_states = Vec::with_capacity(n);
    let mut senders = JoinSet::new();
    let mut receivers = JoinSet::new();
    for (i, slot) in ready.into_iter().enumerate() {
        let (s, r, r_id) = slot.expect("all pairs set up");
        let pair = Arc::new(Pair {
            received: AtomicU64::new(0),
            received_measured: AtomicU64::new(0),
            notify: Notify::new(),
        });
        pair_states.push(pair.clone());
        let (s_stream, s_sink) = s.split();
        let (pong_tx, pong_rx) = mpsc::unbounded_channel();
        // The sender connection only receives pings (and status); answer pings via the sink.
        {
            let fatal = fatal.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut s_stream = s_stream;
                while let Some(msg) = s_stream.next().await {
                    match msg {
                        Ok(RelayToClientMsg::Ping(p)) => {
                            let _ = pong_tx.send(p);
                        }
                        Ok(RelayToClientMsg::Status(st)) => eprintln!("pair {i} sender: relay status: {st}"),
                        Ok(_) => {}
                        Err(e) => {
                            if !stop.load(Ordering::Relaxed) {
                                set_fatal(&fatal, format!("pair {i} sender connection: {e:#}"));
                            }
                            return;
                        }
                    }
                }
                if !stop.load(Ordering::Relaxed) {
                    set_fatal(&fatal, format!("pair {i} sender connection closed by relay"));
                }
            });
        }
        let cfg = SenderCfg {
            window: args.window as i64,
            size: args.size,
            dst: r_id,
            rate: per_pair_rate,
            // Spread paced sends of different pairs over one interval.
            rate_offset: per_pair_rate.map_or(0.0, |r| i as f64 / n as f64 / r),
        };
        senders.spawn(run_sender(cfg, s_sink, pong_rx, pair.clone(), clock.clone()));
        receivers.spawn(run_receiver(r, pair, clock.clone(), stop_notify.clone()));
    }

    // Progress once a second until the end of the measured window.
    let mut sent_measured = 0u64;
    let mut lost = 0u64;
    let total_s = args.seconds;
    let mut tick = 1u64;
    loop {
        let next = clock.measure_start_ns + tick * 1_000_000_000;
        let wake = next.min(clock.measure_end_ns);
        let mut slept = false;
        tokio::select! {
            _ = tokio::time::sleep_until(clock.at(wake)) => slept = true,
            Some(joined) = senders.join_next() => {
                // (Senders return only at the deadline, or early on error.)
                match joined {
                    Ok(Err(e)) => bail!("{e:#}"),
                    Ok(Ok(r)) => {
                        sent_measured += r.sent_measured;
                        lost += r.lost;
                    }
                    Err(e) => bail!("sender task failed: {e}"),
                }
            }
            Some(joined) = receivers.join_next() => {
                match joined {
                    Ok(Err(e)) => bail!("{e:#}"),
                    Ok(Ok(_)) => bail!("receiver finished early"),
                    Err(e) => bail!("receiver task failed: {e}"),
                }
            }
        }
        if let Some(msg) = fatal.lock().expect("lock").take() {
            bail!("{msg}");
        }
        if slept && wake == next {
            let recv: u64 = pair_states
                .iter()
                .map(|p| p.received_measured.load(Ordering::Relaxed))
                .sum();
            eprintln!("[{tick:>3}/{total_s}s] {recv} received");
            tick += 1;
        }
        if clock.now_ns() >= clock.measure_end_ns {
            break;
        }
    }
    if (tick as f64) <= total_s.ceil() {
        let recv: u64 = pair_states
            .iter()
            .map(|p| p.received_measured.load(Ordering::Relaxed))
            .sum();
        eprintln!("[{:>3}/{total_s}s] {recv} received", total_s.ceil() as u64);
    }

    // 4. Senders stop at the deadline and drain; then stop the receivers.
    while let Some(joined) = senders.join_next().await {
        let r = joined.context("sender task panicked")??;
        sent_measured += r.sent_measured;
        lost += r.lost;
    }
    stop.store(true, Ordering::Relaxed);
    stop_notify.notify_waiters();
    let mut hist = Histogram::<u64>::new(3).expect("valid sigfig");
    while let Some(joined) = receivers.join_next().await {
        let r = joined.context("receiver task panicked")??;
        hist.add(&r.hist).context("merging histograms")?;
    }
    let received: u64 = pair_states
        .iter()
        .map(|p| p.received_measured.load(Ordering::Relaxed))
        .sum();

    let seconds = measure_ns as f64 / 1e9;
    let msgs_per_sec = received as f64 / seconds;
    let mbytes_per_sec = msgs_per_sec * args.size as f64 / 1e6;
    let out = serde_json::json!({
        "system": "iroh-relay",
        "iroh_relay_version": IROH_RELAY_VERSION,
        "pairs": n,
        "window": args.window,
        "payload_bytes": args.size,
        "seconds": seconds,
        "sent": sent_measured,
        "received": received,
        "lost": lost,
        "msgs_per_sec": round2(msgs_per_sec),
        "mbytes_per_sec": round2(mbytes_per_sec),
        "latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999),
            "max": hist.max(),
        },
    });
    {
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        writeln!(o, "{out}")?;
        o.flush()?;
    }
    Ok(())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn set_fatal(fatal: &std::sync::Mutex<Option<String>>, msg: String) {
    let mut g = fatal.lock().expect("lock");
    if g.is_none() {
        *g = Some(msg);
    }
}

fn datagram(size: usize, ts: u64) -> Datagrams {
    let mut buf = vec![0u8; size];
    buf[..8].copy_from_slice(&ts.to_le_bytes());
    Datagrams {
        ecn: None,
        segment_size: None,
        contents: bytes::Bytes::from(buf),
    }
}

/// Sends probe datagrams from `s` to `r` until `r` receives one (answering pings meanwhile).
async fn probe_pair(
    mut s: Client,
    mut r: Client,
    s_id: EndpointId,
    r_id: EndpointId,
    size: usize,
) -> Result<(Client, Client, EndpointId)> {
    loop {
        s.send(ClientToRelayMsg::Datagrams {
            dst_endpoint_id: r_id,
            datagrams: datagram(size, PROBE_TS),
        })
        .await
        .context("sending probe")?;
        let deadline = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                msg = r.next() => match msg {
                    None => bail!("relay closed the receiver connection"),
                    Some(Err(e)) => bail!("receiver connection: {e:#}"),
                    Some(Ok(RelayToClientMsg::Datagrams { remote_endpoint_id, .. })) => {
                        if remote_endpoint_id == s_id {
                            return Ok((s, r, r_id));
                        }
                    }
                    Some(Ok(RelayToClientMsg::Ping(p))) => {
                        r.send(ClientToRelayMsg::Pong(p)).await.context("sending pong")?;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

struct SenderCfg {
    window: i64,
    size: usize,
    dst: EndpointId,
    /// Datagrams/s for this pair, if paced.
    rate: Option<f64>,
    /// Seconds to shift this pair's pacing schedule by.
    rate_offset: f64,
}

async fn run_sender(
    cfg: SenderCfg,
    mut sink: ClientSink,
    mut pong_rx: mpsc::UnboundedReceiver<[u8; 8]>,
    pair: Arc<Pair>,
    clock: Arc<Clock>,
) -> Result<SenderResult> {
    let mut sent_total: i64 = 0;
    let mut sent_measured: u64 = 0;
    // Datagrams given up on (window timeouts); reduced again if they arrive late.
    let mut lost: i64 = 0;
    let mut paced: i64 = 0;
    let pace_start_ns = clock.start_ns as f64 + cfg.rate_offset * 1e9;
    // Last time the received counter moved (or the window was reset).
    let mut last_recv_count: u64 = 0;
    let mut last_progress_ns = clock.now_ns();

    let inflight = |sent_total: i64, lost: &mut i64| -> i64 {
        let recv = pair.received.load(Ordering::Acquire) as i64;
        let mut inf = sent_total - recv - *lost;
        if inf < 0 {
            // Datagrams counted as lost arrived after all.
            *lost += inf;
            inf = 0;
        }
        inf
    };

    loop {
        let now = clock.now_ns();
        if now >= clock.measure_end_ns {
            break;
        }
        let mut wrote = false;
        while let Ok(p) = pong_rx.try_recv() {
            sink.feed(ClientToRelayMsg::Pong(p)).await.context("sending pong")?;
            wrote = true;
        }
        let recv_now = pair.received.load(Ordering::Acquire);
        if recv_now != last_recv_count {
            last_recv_count = recv_now;
            last_progress_ns = now;
        }
        let inf = inflight(sent_total, &mut lost);
        let mut can = cfg.window - inf;
        let mut next_due_ns = None;
        if let Some(rate) = cfg.rate {
            let elapsed = (now as f64 - pace_start_ns).max(0.0) / 1e9;
            let due_total = (elapsed * rate).floor() as i64 + 1;
            let mut due = due_total - paced;
            if due > cfg.window {
                // Fell behind (window-bound): don't burst the whole backlog.
                paced = due_total - cfg.window;
                due = cfg.window;
            }
            can = can.min(due);
            if can <= 0 {
                let next_ns = pace_start_ns + (paced as f64) / rate * 1e9;
                next_due_ns = Some(next_ns.max(now as f64) as u64);
            }
        }
        if can > 0 {
            for _ in 0..can {
                let ts = clock.now_ns();
                sink.feed(ClientToRelayMsg::Datagrams {
                    dst_endpoint_id: cfg.dst,
                    datagrams: datagram(cfg.size, ts),
                })
                .await
                .context("sending datagram")?;
                sent_total += 1;
                paced += 1;
                if clock.measured(ts) {
                    sent_measured += 1;
                }
            }
            sink.flush().await.context("flushing datagrams")?;
            last_progress_ns = clock.now_ns();
            continue;
        }
        if wrote {
            sink.flush().await.context("flushing pongs")?;
        }
        let end = clock.measure_end_ns;
        if inf >= cfg.window {
            // Window full: wait for an arrival, at most until the loss timeout.
            let loss_at = last_progress_ns + LOSS_TIMEOUT.as_nanos() as u64;
            tokio::select! {
                _ = pair.notify.notified() => {}
                p = pong_rx.recv() => {
                    if let Some(p) = p {
                        sink.send(ClientToRelayMsg::Pong(p)).await.context("sending pong")?;
                    }
                }
                _ = tokio::time::sleep_until(clock.at(loss_at.min(end))) => {
                    let now = clock.now_ns();
                    if now >= loss_at && pair.received.load(Ordering::Acquire) == last_recv_count {
                        let inf = inflight(sent_total, &mut lost);
                        lost += inf;
                        last_progress_ns = now;
                    }
                }
            }
        } else if let Some(due_ns) = next_due_ns {
            // Paced: wait for the next send slot.
            tokio::select! {
                _ = tokio::time::sleep_until(clock.at(due_ns.min(end))) => {}
                p = pong_rx.recv() => {
                    if let Some(p) = p {
                        sink.send(ClientToRelayMsg::Pong(p)).await.context("sending pong")?;
                    }
                }
            }
        }
    }

    // Drain: wait (bounded) for in-flight datagrams to arrive.
    let drain_end = clock.now_ns() + DRAIN_TIMEOUT.as_nanos() as u64;
    loop {
        let inf = inflight(sent_total, &mut lost);
        if inf == 0 || clock.now_ns() >= drain_end {
            break;
        }
        tokio::select! {
            _ = pair.notify.notified() => {}
            _ = tokio::time::sleep_until(clock.at(drain_end)) => {}
        }
    }
    let recv = pair.received.load(Ordering::Acquire) as i64;
    Ok(SenderResult {
        sent_measured,
        lost: (sent_total - recv).max(0) as u64,
    })
}

async fn run_receiver(
    mut client: Client,
    pair: Arc<Pair>,
    clock: Arc<Clock>,
    stop: Arc<Notify>,
) -> Result<ReceiverResult> {
    let mut hist = Histogram::<u64>::new(3).expect("valid sigfig");
    let mut received: u64 = 0;
    let mut received_measured: u64 = 0;
    let stopped = stop.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            msg = client.next() => match msg {
                None => bail!("relay closed a receiver connection"),
                Some(Err(e)) => bail!("receiver connection: {e:#}"),
                Some(Ok(RelayToClientMsg::Datagrams { mut datagrams, .. })) => {
                    let now = clock.now_ns();
                    let mut got = 0u64;
                    while !datagrams.contents.is_empty() {
                        let d = datagrams.take_segments(1);
                        if d.contents.len() < 8 {
                            continue;
                        }
                        let ts = u64::from_le_bytes(d.contents[..8].try_into().expect("8 bytes"));
                        if ts == PROBE_TS {
                            continue;
                        }
                        got += 1;
                        if clock.measured(now) {
                            received_measured += 1;
                            let us = now.saturating_sub(ts) / 1000;
                            hist.record(us.max(1)).ok();
                        }
                    }
                    if got > 0 {
                        received += got;
                        pair.received_measured.store(received_measured, Ordering::Relaxed);
                        pair.received.store(received, Ordering::Release);
                        pair.notify.notify_one();
                    }
                }
                Some(Ok(RelayToClientMsg::Ping(p))) => {
                    client.send(ClientToRelayMsg::Pong(p)).await.context("sending pong")?;
                }
                Some(Ok(RelayToClientMsg::Status(st))) => eprintln!("receiver: relay status: {st}"),
                Some(Ok(_)) => {}
            }
        }
    }
    Ok(ReceiverResult { hist })
}
