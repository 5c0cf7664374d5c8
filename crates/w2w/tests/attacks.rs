//! Attacks on a real `w2w serve` process (issue 10): each test runs an
//! attack bounded in time while a probe, from another source address,
//! measures what a legitimate user gets: an a2b round trip (send until the
//! receipt says the recipient acknowledged it), a fresh registration and
//! `/healthz`. The attack must fail, the relay must keep serving, and the
//! probe's a2b p50 under attack must stay within 2× its baseline (with a
//! 2 ms floor: on loopback the baseline is a fraction of a millisecond and
//! the two-core machine is shared with the attacker).
//!
//! Attackers connect from 127.0.0.2 (Linux routes all of 127/8 to
//! loopback), so the per-IP limits that stop them are not what keeps the
//! probe (127.0.0.1) in service.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::Status;
use w2w_proto::{Dest, ErrorCode, Identity};

mod common;
use common::{port, serve};

/// One attack at a time: each judges the probe's latency, which another
/// test's attack running beside it would distort.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn id() -> Identity {
    Identity::from_seed(rand::random())
}

/// A config file with these `[limits]` lines.
fn config(dir: &std::path::Path, limits: &str) -> Vec<String> {
    let path = dir.join("relay.toml");
    std::fs::write(&path, format!("[limits]\n{limits}\n")).unwrap();
    vec!["--config".into(), path.display().to_string()]
}

/// GET `path` over a fresh connection from 127.0.0.1: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, out))
}

fn p50(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty(), "no samples");
    v.sort();
    v[v.len() / 2]
}

/// The legitimate user: alice sends a2b to bob and waits for the receipt.
struct Probe {
    url: String,
    addr: SocketAddr,
    alice: Client,
    bob: Client,
    /// What `/healthz` must answer (200; 503 where the attack is a failing
    /// log the relay is right to report).
    healthz: u16,
}

#[derive(Debug, Default)]
struct Figures {
    a2b: Vec<Duration>,
    register: Vec<Duration>,
    failures: Vec<String>,
}

impl Probe {
    async fn new(url: &str) -> Probe {
        let alice = Client::connect(id(), ConnectOptions::new(url))
            .await
            .unwrap();
        let bob = Client::connect(id(), ConnectOptions::new(url))
            .await
            .unwrap();
        Probe {
            url: url.to_owned(),
            addr: format!("127.0.0.1:{}", port(url)).parse().unwrap(),
            alice,
            bob,
            healthz: 200,
        }
    }

    /// Samples for `d`: a2b round trips back to back, a registration and a
    /// health check every 250 ms.
    async fn run(&mut self, d: Duration) -> Figures {
        let mut f = Figures::default();
        let end = Instant::now() + d;
        let mut next_slow = Instant::now();
        while Instant::now() < end {
            let t = Instant::now();
            match tokio::time::timeout(
                Duration::from_secs(5),
                self.alice
                    .send_plain(Dest::A2b(self.bob.address()), "probe"),
            )
            .await
            {
                Ok(Ok(r)) if r.status == Status::Delivered => f.a2b.push(t.elapsed()),
                other => f.failures.push(format!("a2b: {other:?}")),
            }
            // Keep bob's event queue drained.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(0), self.bob.recv()).await
            {}
            if Instant::now() >= next_slow {
                next_slow = Instant::now() + Duration::from_millis(250);
                let t = Instant::now();
                match Client::connect(id(), ConnectOptions::new(&self.url)).await {
                    Ok(c) => {
                        f.register.push(t.elapsed());
                        c.close().await;
                    }
                    Err(e) => f.failures.push(format!("registration: {e}")),
                }
                let addr = self.addr;
                match tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
                    .await
                    .unwrap()
                {
                    Ok((status, _)) if status == self.healthz => {}
                    other => f.failures.push(format!("healthz: {other:?}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f
    }
}

/// Asserts the probe was served throughout and its a2b p50 under attack
/// is within 2× (floor 2 ms) of its baseline; prints both.
fn judge(name: &str, base: &Figures, attacked: &Figures) {
    assert!(
        base.failures.is_empty(),
        "{name}: baseline failures {:?}",
        base.failures
    );
    assert!(
        attacked.failures.is_empty(),
        "{name}: the probe was refused under attack: {:?}",
        &attacked.failures[..attacked.failures.len().min(5)]
    );
    let (b, a) = (p50(base.a2b.clone()), p50(attacked.a2b.clone()));
    let (rb, ra) = (p50(base.register.clone()), p50(attacked.register.clone()));
    println!(
        "{name}: a2b p50 {b:?} -> {a:?} under attack ({} samples); registration p50 {rb:?} -> {ra:?}",
        attacked.a2b.len()
    );
    let bound = (b * 2).max(Duration::from_millis(2));
    assert!(
        a <= bound,
        "{name}: a2b p50 {a:?} > {bound:?} (baseline {b:?})"
    );
}

/// RSS of a process in bytes (Linux).
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// Items 1 and 2: a flood of large a2g messages to offline throwaway
/// addresses. Before: RSS +100 MB/s, 9.7 GB/min of database, receipts
/// `timeout` for messages still waiting, registrations 4.2 s. Now every
/// copy is admitted against byte budgets in memory: the flood is refused
/// `storage_full` / `store_busy` / `queue_full` at once, memory and disk
/// stay bounded, no receipt says `timeout`, and registrations do not wait
/// behind the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_flood_is_bounded_in_memory_and_disk() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let budget = 16u64 << 20; // per sender
    let extra = config(
        data.path(),
        &format!(
            "store_sender_bytes = {budget}\nstore_max_bytes = {}\n",
            48u64 << 20
        ),
    );
    let relay = serve(data.path(), "127.0.0.1:0", &extra);
    let mut probe = Probe::new(&relay.url).await;
    let base = probe.run(Duration::from_secs(2)).await;
    // 64 throwaway recipients, registered once and gone.
    let mut victims = Vec::new();
    for _ in 0..64 {
        let c = Client::connect(id(), ConnectOptions::new(&relay.url))
            .await
            .unwrap();
        victims.push(c.address());
        c.close().await;
    }
    let rss_before = rss(relay.child.id());
    let stop = Arc::new(AtomicBool::new(false));
    let (stored, refused, timeouts) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let c = Client::connect(id(), ConnectOptions::new(&relay.url))
            .await
            .unwrap();
        let (victims, stop) = (victims.clone(), stop.clone());
        let (stored, refused, timeouts) = (stored.clone(), refused.clone(), timeouts.clone());
        attackers.push(tokio::spawn(async move {
            let body = vec![0u8; 64 * 1024];
            // 200 a2g of 64 KiB to 64 recipients per second each: 50 MB/s
            // of frames and 51,200 stored copies asked for per second in
            // all, on the same two cores as the relay.
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(r) = c.send_plain(Dest::A2g(victims.clone()), body.clone()).await else {
                    break;
                };
                for e in &r.entries {
                    match (e.status, ErrorCode::from_u16(e.reason)) {
                        (Status::Queued, _) => stored.fetch_add(1, Ordering::Relaxed),
                        (Status::Rejected, Some(ErrorCode::Timeout))
                        | (Status::NoRoute, Some(ErrorCode::Timeout)) => {
                            timeouts.fetch_add(1, Ordering::Relaxed)
                        }
                        (Status::Rejected, Some(_)) => refused.fetch_add(1, Ordering::Relaxed),
                        other => panic!("unexpected entry {other:?}"),
                    };
                }
            }
        }));
    }
    let attacked = probe.run(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.await;
    }
    let rss_after = rss(relay.child.id());
    let (stored, refused) = (
        stored.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    println!(
        "store flood: {stored} copies stored, {refused} refused, RSS {} -> {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
    assert_eq!(
        timeouts.load(Ordering::Relaxed),
        0,
        "no receipt may say timeout"
    );
    assert!(refused > 0, "the flood must hit a budget");
    // Each attacker has at most its budget on disk (64 KiB + header each).
    assert!(stored * 64 * 1024 <= 4 * budget, "{stored} copies stored");
    let db = std::fs::metadata(data.path().join("w2w.sqlite"))
        .map(|m| m.len())
        .unwrap_or(0)
        + std::fs::metadata(data.path().join("w2w.sqlite-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!("store flood: database + WAL {} MiB", db >> 20);
    assert!(db < (48 << 20) * 3, "database {db} bytes");
    assert!(
        rss_after < rss_before + (200 << 20),
        "RSS grew {} MiB",
        (rss_after - rss_before) >> 20
    );
    judge("store flood", &base, &attacked);
}

/// Item 3: slow HTTP. Before: bodies trickled a byte every 5 s and
/// unread pipelined answers held every TCP slot forever, and half-open
/// WebSockets refused 47 of 48 registrations. Now one address holds at
/// most `max_connections_per_ip` (answered 429 past it), a plain HTTP
/// connection is closed after `http_timeout_ms` whatever it does, and
/// WebSocket handshakes per address are rate limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_and_half_open_websockets_cannot_hold_the_relay() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let extra = config(
        data.path(),
        "max_connections = 300\nmax_connections_per_ip = 100\nhttp_timeout_ms = 3000\nauth_timeout_ms = 3000\n",
    );
    let relay = serve(data.path(), "127.0.0.1:0", &extra);
    let addr: SocketAddr = format!("127.0.0.1:{}", port(&relay.url)).parse().unwrap();
    let mut probe = Probe::new(&relay.url).await;
    let base = probe.run(Duration::from_secs(2)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let attack = {
        let (stop, refused) = (stop.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // All at once, as fast as the relay accepts them.
            for i in 0..556 {
                let mut s = match socket2_connect(addr) {
                    Ok(s) => s,
                    Err(e) => {
                        if i == 0 {
                            eprintln!("attacker connect failed: {e}");
                        }
                        continue;
                    }
                };
                let req = match i % 3 {
                    // A body announced and trickled.
                    0 => "POST /spacerift HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{".to_string(),
                    // Pipelined requests whose answers are never read.
                    1 => "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(50),
                    // A WebSocket that never registers.
                    _ => "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_string(),
                };
                let _ = s.write_all(req.as_bytes());
                held.push(s);
            }
            eprintln!("attacker holds {} connections", held.len());
            std::thread::sleep(Duration::from_millis(300));
            for s in &mut held {
                let _ = s.set_nonblocking(true);
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    if buf[..n].starts_with(b"HTTP/1.1 429") {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = s.set_nonblocking(false);
            }
            while !stop.load(Ordering::Relaxed) {
                for s in &mut held {
                    let _ = s.write_all(b" ");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            held
        })
    };
    let attacked = probe.run(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let held = attack.join().unwrap();
    // Every trickling connection has been closed by the relay by now.
    let mut open = 0;
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 1 << 16];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        if !closed {
            open += 1;
        }
    }
    let refused = refused.load(Ordering::Relaxed);
    println!("slow http: {refused} of 556 attacker connections refused 429, {open} still open after the attack");
    assert!(refused > 0, "the per-IP limit must refuse some");
    assert_eq!(open, 0, "the relay must close slow HTTP connections");
    judge("slow http", &base, &attacked);
    let (status, _) = http_get(addr, "/healthz").unwrap();
    assert_eq!(status, 200);
}

/// A TCP connection from 127.0.0.2 (the attacker's address).
fn socket2_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind("127.0.0.2:0".parse().unwrap())?;
    let std = sock_into_std(sock)?;
    // tokio's socket is non-blocking; connect(2) here should wait.
    std.set_nonblocking(false)?;
    std.connect_timeout_fallback(addr)
}

fn sock_into_std(sock: tokio::net::TcpSocket) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = sock.into_raw_fd();
    // SAFETY: the fd was just created by TcpSocket and is owned here.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

trait ConnectFallback {
    fn connect_timeout_fallback(self, addr: SocketAddr) -> std::io::Result<TcpStream>;
}

impl ConnectFallback for std::net::TcpStream {
    /// Connects a bound, unconnected socket (blocking connect(2)).
    fn connect_timeout_fallback(self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        use std::os::fd::AsRawFd;
        let (sa, len) = sockaddr(addr);
        // SAFETY: fd is a valid socket; sa is a valid sockaddr_in of len.
        let r = unsafe {
            libc::connect(
                self.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(self)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_in, libc::socklen_t) {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    (
        sa,
        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
}

/// Item 7: an outsider's "remove myself" with seq 2^64-1 froze a group for
/// everyone, across restarts. Now it is refused `not_member` and the
/// owner's next operation works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_cannot_freeze_a_group() {
    let _serial = SERIAL.lock().await;
    use w2w_proto::frame::RequestOp;
    use w2w_proto::group::{GroupAction, GroupOp};
    let data = tempfile::tempdir().unwrap();
    let relay = serve(data.path(), "127.0.0.1:0", &[]);
    let owner = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    owner.group_create("team").await.unwrap();
    let mallory = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    let mut probe = Probe::new(&relay.url).await;
    let base = probe.run(Duration::from_secs(2)).await;
    // Mallory keeps trying, with every sequence number, for 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        let url = relay.url.clone();
        let mallory_id = id();
        tokio::spawn(async move {
            let m = Client::connect(mallory_id.clone(), ConnectOptions::new(&url))
                .await
                .unwrap();
            let mut tries = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let seq = [2, 3, rand::random(), u64::MAX][tries as usize % 4];
                let op = GroupOp::sign(
                    &mallory_id,
                    "team",
                    GroupAction::Remove(mallory_id.address()),
                    seq,
                );
                match m.request(RequestOp::Group(op)).await {
                    Err(w2w_client::ClientError::Refused {
                        code: ErrorCode::NotMember,
                        ..
                    }) => {}
                    Err(w2w_client::ClientError::Refused {
                        code: ErrorCode::RateLimited,
                        ..
                    }) => {}
                    other => panic!("expected not_member, got {other:?}"),
                }
                tries += 1;
            }
            tries
        })
    };
    let attacked = probe.run(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let tries = attack.await.unwrap();
    println!("group freeze: {tries} operations from a non-member, all refused");
    judge("group freeze", &base, &attacked);
    // Nothing froze the group: the owner's next change is seq 2.
    let g = owner
        .group_op("team", GroupAction::Add(mallory.address()))
        .await
        .unwrap();
    assert_eq!((g.seq, g.members.len()), (2, 2));
}

/// Item 10: a message over the frame limit. Before: refused with 1009, the
/// CLI reconnected and resent it ~8 times a second forever. Now `w2w send`
/// refuses what exceeds the protocol default locally, and a message the
/// relay refuses (its limit is lower) ends the command with an error after
/// one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_never_resends_a_message_the_relay_refused_as_too_large() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let extra = config(data.path(), "max_frame_bytes = 65536\n");
    let relay = serve(data.path(), "127.0.0.1:0", &extra);
    let addr: SocketAddr = format!("127.0.0.1:{}", port(&relay.url)).parse().unwrap();
    let bob = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    // The default identity: only `w2w id new` makes one.
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_w2w"))
        .args(["id", "new"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("cfg"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let send = |size: usize| {
        let t = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_w2w"))
            .args(["send", "--relay", &relay.url, "--plain", "--to"])
            .arg(bob.address().to_hex())
            .arg("-")
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join("cfg"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; size]).unwrap();
        drop(stdin);
        (child.wait_with_output().unwrap(), t.elapsed())
    };
    let metric = |name: &str| -> u64 {
        let (_, body) = http_get(addr, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = metric("w2w_registrations_total");
    // Over the relay's 64 KiB but under the protocol default.
    let (out, took) = send(100 * 1024);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "exit {:?}", out.status);
    assert!(stdout.contains("frame_too_large"), "{stdout}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // One registration for the send, one reconnect at most: no loop.
    let regs = metric("w2w_registrations_total") - before;
    assert!(regs <= 2, "{regs} registrations");
    // Over the protocol default: refused before anything is sent.
    let (out, _) = send(2 << 20);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("message too large"), "{stderr}");

    // A client that ignores the limit and keeps sending oversized frames,
    // reconnecting each time it is closed with 1009, costs the relay little.
    let mut probe = Probe::new(&relay.url).await;
    let base = probe.run(Duration::from_secs(2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        let url = relay.url.clone();
        tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            let mut closed_1009 = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut ws) = w2w_client::connect_raw(&ConnectOptions::new(&url)).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                // ~30 a second: under the per-IP handshake budget (50/s)
                // that the probe, from the same address here, shares.
                tokio::time::sleep(Duration::from_millis(30)).await;
                if w2w_client::register(&mut ws, &id(), &url, None)
                    .await
                    .is_err()
                {
                    continue;
                }
                let _ = ws
                    .send(tokio_websockets::Message::binary(vec![0u8; 100 * 1024]))
                    .await;
                while let Some(Ok(m)) = ws.next().await {
                    if let Some((code, _)) = m.as_close() {
                        if u16::from(code) == 1009 {
                            closed_1009 += 1;
                        }
                        break;
                    }
                }
            }
            closed_1009
        })
    };
    let attacked = probe.run(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let closed = attack.await.unwrap();
    println!("oversized frames: {closed} connections closed with 1009");
    assert!(closed > 10, "{closed} oversized frames refused");
    judge("oversized frames", &base, &attacked);
}

/// Item 9: a full log disk. Before: new connections died right after
/// REPLY_BACK while `/healthz` said ok, and a restart exited 101. Now the
/// relay starts and serves with stdout and stderr on /dev/full, and
/// `/healthz` reports the log as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_disk_does_not_stop_the_relay() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_w2w"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data.path())
        .env("HOME", data.path())
        .env("W2W_LOG", "info")
        .stdout(full())
        .stderr(full())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let url = format!("ws://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "/healthz").is_err() {
        assert!(Instant::now() < deadline, "relay did not start");
        assert!(child.try_wait().unwrap().is_none(), "relay exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Registrations (each logs a line) and messages keep working.
    let alice = Client::connect(id(), ConnectOptions::new(&url))
        .await
        .unwrap();
    let mut bob = Client::connect(id(), ConnectOptions::new(&url))
        .await
        .unwrap();
    for i in 0..20 {
        let c = Client::connect(id(), ConnectOptions::new(&url))
            .await
            .unwrap();
        c.close().await;
        let r = alice
            .send_plain(Dest::A2b(bob.address()), format!("m{i}"))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Delivered);
    }
    let mut got = 0;
    while got < 20 {
        match tokio::time::timeout(Duration::from_secs(5), bob.recv()).await {
            Ok(Some(Event::Msg(_))) => got += 1,
            Ok(Some(_)) => {}
            other => panic!("bob: {other:?}"),
        }
    }
    let (status, body) = http_get(addr, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("log"), "{body}");
    // The probe against the same relay with a working log (baseline) and
    // this one, whose every log line fails.
    let ok_dir = tempfile::tempdir().unwrap();
    let healthy = serve(ok_dir.path(), "127.0.0.1:0", &[]);
    let base = Probe::new(&healthy.url)
        .await
        .run(Duration::from_secs(2))
        .await;
    drop(healthy);
    let mut probe = Probe::new(&url).await;
    probe.healthz = 503;
    let attacked = probe.run(Duration::from_secs(3)).await;
    judge("full log disk", &base, &attacked);
    assert!(child.try_wait().unwrap().is_none(), "relay still running");
    let _ = child.kill();
    let _ = child.wait();
}

/// A number from the relay's `/metrics` (the first line starting `name `).
fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn metric_async(addr: SocketAddr, name: &'static str) -> Option<f64> {
    tokio::task::spawn_blocking(move || metric(addr, name))
        .await
        .unwrap()
}

async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {within:?}");
}

const SLOW_CONSUMERS: &str = "w2w_errors_total{reason=\"slow_consumer\"}";

/// Item 4: one client sending 256 KiB a2n within its frame rate got all 40
/// receivers closed as slow consumers within 18 messages. Now a message is
/// charged by its fan-out bytes (frame size × copies) against its sender's
/// budget, and a broadcast skips a receiver whose queue is past half its
/// bound instead of closing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_broadcasts_cannot_disconnect_receivers() {
    let _serial = SERIAL.lock().await;
    broadcast_flood("broadcast flood", "").await;
    // With the fan-out budget lifted, receivers that fall behind are
    // skipped, not closed.
    broadcast_flood(
        "broadcast flood, no fan-out budget",
        "fanout_bytes_per_sec = 1000000000000\nfanout_bytes_burst = 1000000000000\n",
    )
    .await;
}

async fn broadcast_flood(name: &str, limits: &str) {
    let data = tempfile::tempdir().unwrap();
    let relay = serve(data.path(), "127.0.0.1:0", &config(data.path(), limits));
    let mut probe = Probe::new(&relay.url).await;
    let addr = probe.addr;
    let base = probe.run(Duration::from_secs(2)).await;
    let got = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    for _ in 0..40 {
        let mut c = Client::connect(id(), ConnectOptions::new(&relay.url))
            .await
            .unwrap();
        let got = got.clone();
        receivers.push(tokio::spawn(async move {
            while let Some(e) = c.recv().await {
                if matches!(e, Event::Msg(_)) {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
            c.close_reason()
        }));
    }
    // Five receivers that have stopped reading: before, the first
    // broadcasts past their 4 MiB queue closed them.
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let mut ws = w2w_client::connect_raw(&ConnectOptions::new(&relay.url))
            .await
            .unwrap();
        w2w_client::register(&mut ws, &id(), &relay.url, None)
            .await
            .unwrap();
        stalled.push(ws);
    }
    let attacker = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut sent, mut limited) = (0u64, 0u64);
            let body = vec![7u8; 256 * 1024];
            // Within its frame rate (1000/s): 500 broadcasts a second, as
            // in the issue; the fan-out budget is what must refuse them.
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let r = attacker
                    .send_plain(Dest::A2n(w2w_proto::frame::Scope::Relay), body.clone())
                    .await
                    .unwrap();
                match (r.status, ErrorCode::from_u16(r.reason)) {
                    (Status::Delivered, _) => sent += 1,
                    (Status::Rejected, Some(ErrorCode::RateLimited)) => limited += 1,
                    other => panic!("unexpected receipt {other:?}"),
                }
            }
            (sent, limited)
        })
    };
    let attacked = probe.run(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, limited) = flood.await.unwrap();
    let slow = metric_async(addr, SLOW_CONSUMERS).await.unwrap_or(0.0);
    let skipped = metric_async(addr, "w2w_broadcast_skipped_total")
        .await
        .unwrap_or(0.0);
    println!(
        "{name}: {sent} broadcasts of 256 KiB went out, {limited} refused rate_limited, \
         {} copies received by 40 receivers, {skipped} copies skipped (5 receivers stalled), {slow} slow consumers",
        got.load(Ordering::Relaxed)
    );
    if limits.is_empty() {
        assert!(limited > 0, "the fan-out budget must stop the flood");
    } else {
        assert!(skipped > 0.0, "receivers behind must have been skipped");
    }
    assert!(sent >= 1, "a broadcast within the budget goes out");
    assert_eq!(slow, 0.0, "no receiver may be closed as a slow consumer");
    for r in &receivers {
        assert!(!r.is_finished(), "a receiver was disconnected");
    }
    assert!(
        got.load(Ordering::Relaxed) >= 40,
        "every receiver got broadcasts"
    );
    if limits.is_empty() {
        judge(name, &base, &attacked);
    } else {
        // Without its budget the flood is 40 × 256 KiB per message as fast
        // as the relay can push: the budget, not the skip, is what keeps
        // everyone else's latency. Printed, not judged.
        println!(
            "{name}: a2b p50 {:?} -> {:?} (not judged: the fan-out budget is off)",
            p50(base.a2b.clone()),
            p50(attacked.a2b.clone())
        );
    }
    drop(stalled);
}

/// A free TCP port on 127.0.0.1 (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A valid directory record for a new address "hosted" by `relay`.
fn invented_presence(relay: &Identity) -> w2w_proto::s2s::Presence {
    use w2w_proto::frame::{Register, Role};
    use w2w_proto::handshake::sig_a_message;
    let client = id();
    let mut reg = Register {
        role: Role::Client,
        relay_key: relay.address(),
        client_key: client.address(),
        client_nonce: rand::random(),
        timestamp_ms: w2w_client::unix_ms(),
        url: "ws://rogue.invalid/".into(),
        sig_a: [0; 64],
    };
    let relay_nonce: [u8; 32] = rand::random();
    reg.sig_a = client.sign(&sig_a_message(&reg, &relay_nonce));
    let proof = w2w_proto::s2s::RegistrationProof {
        address: client.address(),
        relay_key: relay.address(),
        relay_nonce,
        client_nonce: reg.client_nonce,
        timestamp_ms: reg.timestamp_ms,
        url: reg.url,
        sig_a: reg.sig_a,
    };
    w2w_proto::s2s::Presence::sign(relay, proof, true, 1, 1)
}

/// A relay link made by the attacker: its writer, and the addresses of
/// the PRESENCE records it received (read in the background).
struct Rogue {
    identity: Identity,
    tx: futures_util::stream::SplitSink<w2w_client::RelaySocket, tokio_websockets::Message>,
    heard: Arc<std::sync::Mutex<Vec<w2w_proto::Address>>>,
    closed: Arc<std::sync::Mutex<Option<u16>>>,
    /// GROUP_ANSWERs received.
    group_answers: Arc<AtomicU64>,
}

impl Rogue {
    async fn link(url: &str) -> Rogue {
        use futures_util::StreamExt;
        let identity = id();
        let mut ws = w2w_client::connect_raw(&ConnectOptions::new(url))
            .await
            .unwrap();
        w2w_client::register_as(&mut ws, &identity, url, None, w2w_proto::frame::Role::Relay)
            .await
            .unwrap();
        let (tx, mut rx) = ws.split();
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let closed = Arc::new(std::sync::Mutex::new(None));
        let group_answers = Arc::new(AtomicU64::new(0));
        let (h, c, g) = (heard.clone(), closed.clone(), group_answers.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                if let Some((code, _)) = m.as_close() {
                    *c.lock().unwrap() = Some(code.into());
                    break;
                }
                let b: bytes::Bytes = m.into_payload().into();
                match w2w_proto::s2s::RelayToRelay::decode(&b) {
                    Ok(w2w_proto::s2s::RelayToRelay::Presence(p)) => {
                        h.lock().unwrap().push(p.proof.address)
                    }
                    Ok(w2w_proto::s2s::RelayToRelay::DirPut(d)) => h
                        .lock()
                        .unwrap()
                        .extend(d.records.iter().map(|p| p.proof.address)),
                    Ok(w2w_proto::s2s::RelayToRelay::GroupAnswer(_)) => {
                        g.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        Rogue {
            identity,
            tx,
            heard,
            closed,
            group_answers,
        }
    }

    async fn send(&mut self, frame: w2w_proto::s2s::RelayToRelay) {
        use futures_util::SinkExt;
        self.tx
            .send(tokio_websockets::Message::binary(frame.encode()))
            .await
            .unwrap();
    }
}

/// A FORWARD carrying a plain MSG.
fn forward(
    origin: w2w_proto::Address,
    from: w2w_proto::Address,
    dest: Dest,
    target: w2w_proto::s2s::ForwardTarget,
    body: Vec<u8>,
) -> w2w_proto::s2s::RelayToRelay {
    use w2w_proto::frame::{ClientToRelay, Msg, MsgId};
    let msg = Msg {
        flags: 0,
        id: MsgId(rand::random()),
        from,
        dest,
        payload: body.into(),
    };
    w2w_proto::s2s::RelayToRelay::Forward(w2w_proto::s2s::Forward {
        origin,
        hops: 1,
        target,
        msg: ClientToRelay::Msg(msg).encode(),
    })
}

/// Item 5: any key that completed the handshake as a relay was a peer.
/// Five throwaway keys filled `max_peers` and the operator's configured
/// peer was refused; a rogue received every address ever registered,
/// inserted 20,000 addresses and 5,355 relays, and made the relay deliver
/// messages whose header named someone else, or a local `from`. Now
/// unknown relays are on probation: their own slots, the online addresses
/// only (what any client can list), a bounded allowance of new records,
/// FORWARDs checked against the MSG they carry, and broadcasts charged by
/// their fan-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_relay_cannot_take_over_the_federation() {
    use w2w_proto::s2s::{ForwardTarget, LinkState, RelayToRelay};
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let peer_port = free_port();
    let peer_url = format!("ws://127.0.0.1:{peer_port}/");
    let path = data.path().join("relay.toml");
    std::fs::write(&path, "[federation]\nprobation_records = 100\n").unwrap();
    let extra = vec![
        "--config".into(),
        path.display().to_string(),
        "--peer".into(),
        peer_url.clone(),
    ];
    let relay = serve(data.path(), "127.0.0.1:0", &extra);
    let mut probe = Probe::new(&relay.url).await;
    let addr = probe.addr;
    // Three addresses registered once and gone, two online.
    let mut left = Vec::new();
    for _ in 0..3 {
        let c = Client::connect(id(), ConnectOptions::new(&relay.url))
            .await
            .unwrap();
        left.push(c.address());
        c.close().await;
    }
    let alice = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    let mut carol = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    let base = probe.run(Duration::from_secs(2)).await;

    // Five throwaway relay keys: three get the probation slots, two are
    // redirected and closed with peer_limit (4034).
    let mut rogues = Vec::new();
    for _ in 0..5 {
        rogues.push(Rogue::link(&relay.url).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused: Vec<_> = rogues
        .iter()
        .filter(|r| *r.closed.lock().unwrap() == Some(ErrorCode::PeerLimit.close_code()))
        .collect();
    assert_eq!(refused.len(), 2, "two rogues past the probation slots");
    // The configured peer still links: it has a reserved slot.
    let peer_dir = tempfile::tempdir().unwrap();
    let peer = serve(peer_dir.path(), &format!("127.0.0.1:{peer_port}"), &[]);
    eventually(
        "the configured peer links",
        Duration::from_secs(20),
        async || metric_async(addr, "w2w_peer_links").await == Some(4.0),
    )
    .await;
    drop(peer);
    let rogue = &mut rogues[0];
    // Nothing on a link is sized by the directory (PROTOCOL 12.12): a
    // rogue hears at most the records placed on it, never those of
    // addresses that left.
    let heard = rogue.heard.lock().unwrap().clone();
    for a in &left {
        assert!(!heard.contains(a), "a rogue enumerated a left address");
    }

    // 300 valid records for invented addresses: 100 taken at most.
    let before = metric_async(addr, "w2w_known_addresses").await.unwrap();
    for _ in 0..300 {
        let p = invented_presence(&rogue.identity);
        rogue.send(RelayToRelay::Presence(p)).await;
    }
    // 50 invented relays: 16 taken at most.
    for _ in 0..50 {
        let fake = id();
        let ls = LinkState::sign(
            &fake,
            "ws://fake.invalid/",
            1,
            vec![rogue.identity.address()],
        );
        rogue.send(RelayToRelay::LinkState(ls)).await;
    }
    eventually("records refused", Duration::from_secs(10), async || {
        metric_async(addr, "w2w_federation_records_refused_total").await == Some(234.0)
    })
    .await;
    let after = metric_async(addr, "w2w_known_addresses").await.unwrap();
    assert!(after - before <= 100.0, "{before} -> {after} addresses");

    // FORWARDs that contradict their MSG: refused, carol gets nothing.
    let me = relay.key;
    let outsider = id().address();
    let to_carol = ForwardTarget::Relay {
        relay: me,
        to: vec![carol.address()],
    };
    let origin = rogue.identity.address();
    let bob = probe.bob.address();
    rogue
        .send(forward(
            origin,
            outsider,
            Dest::A2b(bob),
            to_carol.clone(),
            b"for bob".to_vec(),
        ))
        .await;
    rogue
        .send(forward(
            origin,
            alice.address(),
            Dest::A2b(carol.address()),
            to_carol.clone(),
            b"from alice?".to_vec(),
        ))
        .await;
    let fed = Dest::A2n(w2w_proto::frame::Scope::Federation);
    rogue
        .send(forward(
            me,
            outsider,
            fed.clone(),
            ForwardTarget::Broadcast,
            b"from you?".to_vec(),
        ))
        .await;
    eventually(
        "forged forwards counted",
        Duration::from_secs(5),
        async || {
            metric_async(addr, "w2w_errors_total{reason=\"forged_forward\"}").await == Some(3.0)
        },
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), carol.recv())
            .await
            .is_err(),
        "carol got a forged message"
    );

    // A broadcast flood from a peer, under the probe.
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let mut r = rogues.remove(1);
        let fed = fed.clone();
        tokio::spawn(async move {
            let origin = r.identity.address();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let f = forward(
                    origin,
                    outsider,
                    fed.clone(),
                    ForwardTarget::Broadcast,
                    vec![1; 256 * 1024],
                );
                r.send(f).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    let attacked = probe.run(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let flooded = flooder.await.unwrap();
    let limited = metric_async(addr, "w2w_errors_total{reason=\"rate_limited\"}")
        .await
        .unwrap_or(0.0);
    let slow = metric_async(addr, SLOW_CONSUMERS).await.unwrap_or(0.0);
    println!(
        "rogue relay: 2 of 5 refused peer_limit, configured peer linked, {} addresses heard \
         (none of the left ones), {} of 300 invented addresses taken, 3 forged FORWARDs refused, \
         {flooded} broadcast FORWARDs of 256 KiB sent, {limited} dropped over budget, {slow} slow consumers",
        heard.len(),
        after - before
    );
    assert!(limited > 0.0, "the peer's broadcasts must be charged");
    assert_eq!(slow, 0.0, "no receiver closed by a peer's broadcasts");
    judge("rogue relay", &base, &attacked);
}

/// Named groups across relays (PROTOCOL 12.14) take questions and records
/// from peers. A relay on probation floods GROUP_GETs (operations it may
/// not make, state questions) and GROUP_PUTs for invented names: questions
/// are answered at most `lookups_per_peer` per second, no operation
/// changes the group, invented group records stop at the probation
/// allowance, and the relay's own clients are served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_relay_cannot_flood_the_groups() {
    use w2w_proto::group::{GroupAction, GroupOp};
    use w2w_proto::s2s::{GroupGet, GroupPut, GroupQuery, GroupRecord, LinkState, RelayToRelay};
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("relay.toml");
    std::fs::write(
        &path,
        "[federation]\nprobation_records = 100\nlookups_per_peer = 200\n",
    )
    .unwrap();
    let extra = vec!["--config".into(), path.display().to_string()];
    let relay = serve(data.path(), "127.0.0.1:0", &extra);
    let mut probe = Probe::new(&relay.url).await;
    let addr = probe.addr;
    probe.alice.group_create("crew").await.unwrap();
    let base = probe.run(Duration::from_secs(2)).await;

    let mut rogue = Rogue::link(&relay.url).await;
    let me = rogue.identity.address();
    // Link state naming the relay: its answers have a way back.
    let ls = LinkState::sign(&rogue.identity, "", 1, vec![relay.key]);
    rogue.send(RelayToRelay::LinkState(ls)).await;
    let refused_before = metric_async(addr, "w2w_federation_records_refused_total")
        .await
        .unwrap_or(0.0);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let relay_key = relay.key;
        tokio::spawn(async move {
            let (mut n, start) = (0u64, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..50 {
                    let query = if n % 2 == 0 {
                        let add = GroupAction::Add(me);
                        GroupQuery::Op(GroupOp::sign(&rogue.identity, "crew", add, 2))
                    } else {
                        GroupQuery::Info {
                            name: "crew".into(),
                            asker: me,
                        }
                    };
                    let get = GroupGet {
                        origin: me,
                        target: relay_key,
                        hops: 1,
                        nonce: n,
                        query,
                    };
                    rogue.send(RelayToRelay::GroupGet(get)).await;
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // 1,000 invented groups.
            for batch in 0..16u64 {
                let records = (0..64)
                    .map(|i| GroupRecord::sign(&rogue.identity, &format!("fake-{batch}-{i}"), 1, 0))
                    .collect();
                let put = GroupPut {
                    target: relay_key,
                    hops: 1,
                    records,
                };
                rogue.send(RelayToRelay::GroupPut(put)).await;
            }
            (n, start.elapsed(), rogue)
        })
    };
    let attacked = probe.run(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (asked, took, rogue) = flooder.await.unwrap();
    eventually(
        "invented group records refused",
        Duration::from_secs(10),
        async || {
            metric_async(addr, "w2w_federation_records_refused_total").await
                == Some(refused_before + 924.0)
        },
    )
    .await;
    let held = metric_async(addr, "w2w_group_records").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = rogue.group_answers.load(Ordering::Relaxed);
    let allowed = 200 * (took.as_secs() + 2);
    println!(
        "group flood: {asked} GROUP_GETs in {took:?}, {answered} answered (at most {allowed}), \
         {held} of 1,024 invented group records held"
    );
    assert!(asked > 2 * allowed, "the flood outran the limit ({asked})");
    assert!(answered > 0 && answered <= allowed, "{answered} answers");
    assert_eq!(held, 100.0, "the probation allowance");
    // No operation of the rogue's changed the group.
    let crew = probe.alice.group_info("crew").await.unwrap();
    assert_eq!((crew.seq, crew.members.len()), (1, 1), "{crew:?}");
    judge("group flood", &base, &attacked);
}

/// Item 6: 60,000 throwaway registrations made every new or restarted peer
/// link overflow its queue during the directory dump (closed as a slow
/// consumer before one record arrived, forever). Now the dump is paced by
/// the link's queue. Scaled down here: 4,000 left records (~2.3 MB) through
/// a 256 KiB peer queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_flood_cannot_break_peer_links() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let peer_port = free_port();
    let path = data.path().join("relay.toml");
    std::fs::write(
        &path,
        "[limits]\nhandshake_rate_per_ip = 100000\nhandshake_burst_per_ip = 100000\n\
         [federation]\npeer_queue_bytes = 262144\n",
    )
    .unwrap();
    let extra = vec![
        "--config".into(),
        path.display().to_string(),
        "--peer".into(),
        format!("ws://127.0.0.1:{peer_port}/"),
    ];
    let relay = serve(data.path(), "127.0.0.1:0", &extra);
    let addr: SocketAddr = format!("127.0.0.1:{}", port(&relay.url)).parse().unwrap();
    const N: usize = 4000;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = relay.url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..N / 8 {
                let c = Client::connect(id(), ConnectOptions::new(&url))
                    .await
                    .unwrap();
                c.close().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually("all registered", Duration::from_secs(10), async || {
        metric_async(addr, "w2w_known_addresses").await >= Some(N as f64)
    })
    .await;
    let mut probe = Probe::new(&relay.url).await;
    let base = probe.run(Duration::from_secs(2)).await;
    let peer_dir = tempfile::tempdir().unwrap();
    let peer = serve(peer_dir.path(), &format!("127.0.0.1:{peer_port}"), &[]);
    let peer_addr: SocketAddr = format!("127.0.0.1:{peer_port}").parse().unwrap();
    let t = Instant::now();
    // The probe runs while the link comes up and the directory goes out.
    let probing = tokio::spawn(async move { probe.run(Duration::from_secs(3)).await });
    eventually(
        "the new peer has the whole directory",
        Duration::from_secs(60),
        async || metric_async(peer_addr, "w2w_known_addresses").await >= Some(N as f64),
    )
    .await;
    let took = t.elapsed();
    let attacked = probing.await.unwrap();
    judge("registration flood, then a new peer", &base, &attacked);
    let slow = metric_async(addr, SLOW_CONSUMERS).await.unwrap_or(0.0);
    let links = metric_async(addr, "w2w_peer_links").await;
    println!("registration flood: {N} records reached a new peer through a 256 KiB queue in {took:?}; {slow} slow consumers");
    assert_eq!(slow, 0.0, "the link must not be closed during the dump");
    assert_eq!(links, Some(1.0));
    drop(peer);
}

/// Item 8: Spacerifts. Before: every anonymous request cost a signature
/// check before any limit (28k requests/s took both cores, a2b p50
/// 0.44 → 10.7 ms). Now the per-IP limit and the cheap checks come first:
/// four threads from one address posting validly shaped, wrongly signed
/// requests as fast as they can reach the signature check at most the
/// per-IP burst plus its rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spacerift_flood_is_refused_before_any_signature_check() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let relay = serve(data.path(), "127.0.0.1:0", &[]);
    let mut probe = Probe::new(&relay.url).await;
    let addr = probe.addr;
    let base = probe.run(Duration::from_secs(2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut counts = std::collections::BTreeMap::<u16, u64>::new();
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"type":"CONNECT","signal":"x","key":"{}","ts":{},"sig":"{}"}}"#,
                    id().address().to_hex(),
                    w2w_client::unix_ms(),
                    "ab".repeat(64)
                );
                let Ok(mut s) = socket2_connect(addr) else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!(
                    "POST /spacerift HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(req.as_bytes()).is_err() {
                    continue;
                }
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                let status = out
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                *counts.entry(status).or_default() += 1;
            }
            counts
        }));
    }
    let attacked = probe.run(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts = std::collections::BTreeMap::<u16, u64>::new();
    for t in threads {
        for (k, v) in t.join().unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let total: u64 = counts.values().sum();
    let verified = counts.get(&400).copied().unwrap_or(0);
    println!("spacerift flood: {total} requests in 4 s from one address: {counts:?} (400 = reached the signature check)");
    assert!(total > 200, "the flood must be a flood ({total})");
    // Burst 20 plus 10/s for about 4 s.
    assert!(
        verified <= 80,
        "{verified} requests reached a signature check"
    );
    assert!(counts.get(&297).copied().unwrap_or(0) > total / 2);
    judge("spacerift flood", &base, &attacked);
}

/// A sharded relay (`--shards 2`, issue 13): one client floods a2g
/// messages to two clients of different shards that read but never
/// acknowledge, so every part waits out `receipt_timeout` and the relay
/// holds each message's partial receipts until both parts answer. Past
/// 4,096 pending per connection its messages are refused `rate_limited`
/// (the rate limits are lifted so that only this bound can stop it); what
/// is pending stays bounded, and the probe (a2b) and another client's a2g
/// across the same two shards are served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_message_flood_cannot_fill_a_sharded_relay() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let mut args = config(
        data.path(),
        "rate_per_sec = 1000000\nrate_burst = 1000000\n\
         fanout_bytes_per_sec = 1000000000000\nfanout_bytes_burst = 1000000000000\n",
    );
    args.extend(["--shards".to_string(), "2".to_string()]);
    let relay = serve(data.path(), "127.0.0.1:0", &args);
    let addr: SocketAddr = format!("127.0.0.1:{}", port(&relay.url)).parse().unwrap();
    assert_eq!(metric_async(addr, "w2w_shards").await, Some(2.0));
    // An identity in each shard.
    let in_shard = |s: usize| loop {
        let i = id();
        if w2w_core::shard::shard_of(&i.address(), 2) == s {
            break i;
        }
    };
    // The flood's recipients: they read everything and acknowledge nothing.
    let mut sinks = Vec::new();
    let mut deaf = Vec::new();
    for s in 0..2 {
        let who = in_shard(s);
        let mut ws = w2w_client::connect_raw(&ConnectOptions::new(&relay.url))
            .await
            .unwrap();
        w2w_client::register(&mut ws, &who, &relay.url, None)
            .await
            .unwrap();
        deaf.push(who.address());
        sinks.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    let mut probe = Probe::new(&relay.url).await;
    let base = probe.run(Duration::from_secs(2)).await;
    let attacker = Arc::new(
        Client::connect(id(), ConnectOptions::new(&relay.url))
            .await
            .unwrap(),
    );
    const FLOOD: usize = 6_000;
    let flood = {
        let (attacker, deaf) = (attacker.clone(), deaf.clone());
        tokio::spawn(async move {
            let sends = (0..FLOOD).map(|_| {
                let (attacker, deaf) = (attacker.clone(), deaf.clone());
                async move { attacker.send_plain(Dest::A2g(deaf), "x").await }
            });
            futures_util::future::join_all(sends).await
        })
    };
    // While the parts wait: the pending joins stay under the bound.
    let mut most = 0.0f64;
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        most = most.max(
            metric_async(addr, "w2w_split_receipts_pending")
                .await
                .unwrap_or(0.0),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attacked = probe.run(Duration::from_secs(3)).await;
    // Another client's a2g across both shards, to recipients that answer.
    let mut b = [in_shard(0), in_shard(1)];
    let mut honest = Vec::new();
    for who in &mut b {
        honest.push(
            Client::connect(who.clone(), ConnectOptions::new(&relay.url))
                .await
                .unwrap(),
        );
    }
    let sender = Client::connect(id(), ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    let to: Vec<_> = honest.iter().map(|c| c.address()).collect();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        sender.send_plain(Dest::A2g(to.clone()), "still served"),
    )
    .await
    .expect("the honest a2g is answered")
    .unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 2), "{r:?}");
    assert_eq!(r.entries.iter().map(|e| e.to).collect::<Vec<_>>(), to);
    let results = flood.await.unwrap();
    let (mut limited, mut queued, mut other) = (0, 0, Vec::new());
    for r in results {
        match r {
            Ok(r)
                if r.status == Status::Rejected && r.reason == ErrorCode::RateLimited.as_u16() =>
            {
                limited += 1
            }
            Ok(r) if r.status == Status::Queued => queued += 1,
            other_result => other.push(format!("{other_result:?}")),
        }
    }
    println!(
        "split flood on 2 shards: {FLOOD} a2g to two clients that never ACK: {queued} queued after the parts' deadline, \
         {limited} refused rate_limited; at most {most} receipts pending at once"
    );
    assert!(
        other.is_empty(),
        "unexpected answers: {:?}",
        &other[..other.len().min(3)]
    );
    assert!(limited > 0, "the per-connection bound must refuse some");
    assert!(
        queued >= 4_000,
        "the ones under the bound are kept ({queued})"
    );
    assert!(most <= 4_096.0 + 8.0, "pending joins stay bounded ({most})");
    judge("split flood on 2 shards", &base, &attacked);
    for s in sinks {
        s.abort();
    }
}
