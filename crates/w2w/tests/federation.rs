//! Federation with real relay processes on distinct loopback ports.
//!
//! Each relay is a `w2w serve` child process; clients are the Rust client
//! library in this test process. Topologies: line-3, ring-4, star-5,
//! tree-7. In each, every client sends a2b to every other client and one
//! federation-wide a2n; each message must arrive exactly once and each
//! receipt must be right. Then relays are killed: the line loses its middle
//! (the right receipt: unreachable) and the ring loses one relay (traffic
//! goes the other way round).

// Index loops read better here: i and j name sender and recipient.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::{RequestOp, ResponseBody, Scope, Status};
use w2w_proto::{Address, Dest, ErrorCode, Identity};

mod common;

const WAIT: Duration = Duration::from_secs(20);

/// A relay child process (killed on drop) and what is needed to restart it.
struct RelayProc {
    proc: common::ServeProc,
    url: String,
    key: Address,
    data: tempfile::TempDir,
    port: u16,
    args: Vec<String>,
}

/// `w2w serve` with short liveness and receipt timeouts, peers and `extra`.
/// The pong deadline is not that short: a loaded machine may take a while
/// to answer, and a killed relay is noticed by its closed sockets anyway.
fn spawn(data: &std::path::Path, port: u16, args: &[String]) -> common::ServeProc {
    let config = data.join("test.toml");
    std::fs::write(
        &config,
        // Directory leases of 3 s: renewed every second, so a record not
        // renewed lapses within a test.
        // (Lines a test wrote to `extra.toml` go on in [federation].)
        {
            let extra = std::fs::read_to_string(data.join("extra.toml")).unwrap_or_default();
            // The topologies are the tests' own: no links beyond them
            // unless a test turns the mesh keeper on (`min_peers`).
            let keeper = if extra.contains("min_peers") { "" } else { "min_peers = 0\n" };
            format!(
                "[limits]\nping_interval_ms = 500\nping_timeout_ms = 2000\n\n[federation]\nreceipt_timeout_ms = 3000\nlease_ms = 3000\n{keeper}{extra}"
            )
        },
    )
    .unwrap();
    let mut all = vec!["--config".to_string(), config.display().to_string()];
    all.extend_from_slice(args);
    common::serve(data, &format!("127.0.0.1:{port}"), &all)
}

impl RelayProc {
    fn start(peers: Vec<String>, extra: &[&str]) -> RelayProc {
        Self::start_with(peers, extra, "")
    }

    /// With `toml` lines added to its [federation] settings.
    fn start_with(peers: Vec<String>, extra: &[&str], toml: &str) -> RelayProc {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("extra.toml"), toml).unwrap();
        let mut args: Vec<String> = peers
            .iter()
            .flat_map(|p| ["--peer".to_string(), p.clone()])
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = spawn(data.path(), 0, &args);
        RelayProc {
            url: proc.url.clone(),
            key: proc.key,
            port: common::port(&proc.url),
            proc,
            data,
            args,
        }
    }

    fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the relay again on the same port and data dir (same key).
    fn restart(&mut self) {
        let proc = spawn(self.data.path(), self.port, &self.args);
        assert_eq!((proc.url.as_str(), proc.key), (self.url.as_str(), self.key));
        self.proc = proc;
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }
}

async fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, WAIT, f).await
}

async fn eventually_within(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Starts relays; relay j dials relay i for every edge (i, j), i < j.
fn topology(n: usize, edges: &[(usize, usize)]) -> Vec<RelayProc> {
    let mut relays: Vec<RelayProc> = Vec::new();
    for j in 0..n {
        let peers = edges
            .iter()
            .filter(|(_, b)| *b == j)
            .map(|(a, _)| relays[*a].url.clone())
            .collect();
        relays.push(RelayProc::start(peers, &[]));
    }
    relays
}

async fn converge(relays: &[RelayProc]) {
    let n = relays.len() as f64 - 1.0;
    for r in relays {
        eventually("every relay reaches every other", || {
            r.metric("w2w_known_relays ") == Some(n)
        })
        .await;
    }
}

async fn clients(relays: &[RelayProc]) -> Vec<Client> {
    let mut cs = Vec::new();
    for r in relays {
        cs.push(
            Client::connect(
                Identity::from_seed(rand::random()),
                ConnectOptions::new(&r.url),
            )
            .await
            .unwrap(),
        );
    }
    // Wait until every relay's directory knows every client.
    let addrs: Vec<Address> = cs.iter().map(|c| c.address()).collect();
    for c in cs.iter_mut() {
        for a in &addrs {
            let deadline = Instant::now() + WAIT;
            loop {
                if let ResponseBody::Lookup(Some(_)) =
                    c.request(RequestOp::Lookup(*a)).await.unwrap()
                {
                    break;
                }
                assert!(Instant::now() < deadline, "directory never learned {a}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    cs
}

/// Collects the messages a client receives: at least `expected` (waiting
/// up to `WAIT` for each, however slow the machine), then any more that
/// come before `quiet` passes with none (extras and duplicates).
async fn drain(c: &mut Client, expected: usize, quiet: Duration) -> Vec<(Address, String)> {
    let mut got = Vec::new();
    loop {
        let wait = if got.len() < expected { WAIT } else { quiet };
        match tokio::time::timeout(wait, c.recv()).await {
            Ok(Some(Event::Msg(m))) => {
                got.push((m.from, String::from_utf8_lossy(&m.body).into_owned()))
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    got
}

/// Everyone sends a2b to everyone else and one a2n; checks receipts and
/// that each message arrives exactly once.
async fn all_to_all(cs: &mut [Client]) {
    let n = cs.len();
    let addrs: Vec<Address> = cs.iter().map(|c| c.address()).collect();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let r = cs[i]
                .send(Dest::A2b(addrs[j]), format!("a2b {i}->{j}"))
                .await
                .unwrap();
            assert_eq!(
                (r.status, r.delivered, r.entries.len()),
                (Status::Delivered, 1, 1),
                "a2b {i}->{j}: {r:?}"
            );
            assert_eq!(r.entries[0].to, addrs[j]);
        }
        let r = cs[i]
            .send(Dest::A2n(Scope::Federation), format!("a2n from {i}"))
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.delivered),
            (Status::Delivered, n as u32),
            "a2n from {i}: {r:?}"
        );
    }
    for (j, c) in cs.iter_mut().enumerate() {
        // n - 1 a2b and n a2n.
        let got = drain(c, 2 * n - 1, Duration::from_millis(500)).await;
        let mut counts: HashMap<(Address, String), usize> = HashMap::new();
        for m in got {
            *counts.entry(m).or_default() += 1;
        }
        for i in 0..n {
            if i != j {
                let k = (addrs[i], format!("a2b {i}->{j}"));
                assert_eq!(counts.remove(&k), Some(1), "client {j}: {:?}", k.1);
            }
            let k = (addrs[i], format!("a2n from {i}"));
            assert_eq!(counts.remove(&k), Some(1), "client {j}: {:?}", k.1);
        }
        assert!(
            counts.is_empty(),
            "client {j} got extra messages: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_3_then_the_middle_dies_and_returns() {
    let mut relays = topology(3, &[(0, 1), (1, 2)]);
    converge(&relays).await;
    let mut cs = clients(&relays).await;
    all_to_all(&mut cs).await;

    // Kill B: A's client can no longer reach C's. A keeps what its client
    // sends C's meanwhile (custody, PROTOCOL 12.13): `queued`, not lost.
    relays[1].kill();
    let c_addr = cs[2].address();
    let deadline = Instant::now() + WAIT;
    let mut kept = Vec::new();
    while kept.len() < 5 {
        let body = format!("across a dead relay {}", kept.len());
        let r = cs[0].send(Dest::A2b(c_addr), &body).await.unwrap();
        match r.status {
            Status::Queued => kept.push(body),
            // In flight to B when it died: the outcome is unknown.
            Status::NoRoute => assert_eq!(r.reason, ErrorCode::Timeout.as_u16(), "{r:?}"),
            // Before A noticed, it may still have gone.
            _ => {}
        }
        assert!(Instant::now() < deadline, "never kept: {r:?}");
    }
    // A still knows where C's client is: lookup answers.
    assert!(matches!(
        cs[0].request(RequestOp::Lookup(c_addr)).await.unwrap(),
        ResponseBody::Lookup(Some(_))
    ));

    // B returns (same key, same port): routes return, and what A kept
    // goes to C's client, each message once, in the order it was sent.
    relays[1].restart();
    converge(&relays).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = cs[0].send(Dest::A2b(c_addr), "B is back").await.unwrap();
        if r.status == Status::Delivered {
            break;
        }
        assert!(Instant::now() < deadline, "route never returned: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = drain(&mut cs[2], kept.len() + 1, Duration::from_millis(500)).await;
    assert_eq!(got.iter().filter(|m| m.1 == "B is back").count(), 1);
    let across: Vec<&String> = got
        .iter()
        .map(|m| &m.1)
        .filter(|b| b.starts_with("across"))
        .collect();
    let want: Vec<&String> = kept.iter().collect();
    assert_eq!(across, want, "each kept message once, in order");
}

/// Custody is bounded (`max_custody` addresses): past it a message whose
/// recipient's relay cannot be reached is refused `unreachable` as
/// without custody, and the relay goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_stops_at_its_bound() {
    let mut relays = topology(2, &[(0, 1)]);
    std::fs::write(
        relays[0].data.path().join("extra.toml"),
        "max_custody = 2\n",
    )
    .unwrap();
    relays[0].kill();
    relays[0].restart();
    converge(&relays).await;
    let far: Vec<Client> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let id = Identity::from_seed(rand::random());
            v.push(
                Client::connect(id, ConnectOptions::new(&relays[1].url))
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let near = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&relays[0].url),
    )
    .await
    .unwrap();
    for c in &far {
        let r = near.send(Dest::A2b(c.address()), "hello").await.unwrap();
        assert_eq!(r.status, Status::Delivered, "{r:?}");
    }
    relays[1].kill();
    eventually("relay 0 notices relay 1 died", || {
        relays[0].metric("w2w_peer_links ") == Some(0.0)
    })
    .await;
    let mut statuses = Vec::new();
    for c in &far {
        let r = near.send(Dest::A2b(c.address()), "kept?").await.unwrap();
        statuses.push((r.status, r.reason));
    }
    let unreachable = (Status::NoRoute, ErrorCode::Unreachable.as_u16());
    assert_eq!(
        statuses,
        vec![(Status::Queued, 0), (Status::Queued, 0), unreachable],
        "two kept, the third refused"
    );
    // The relay still serves: a message for a client of its own.
    let r = near.send(Dest::A2a, "me").await.unwrap();
    assert_eq!(r.status, Status::Delivered, "{r:?}");
}

/// A client cannot make its relay look up addresses without end
/// (`lookups_per_client`, PROTOCOL 12.12): past the limit a LOOKUP is
/// refused `rate_limited` and so is a recipient that would need a lookup,
/// while other clients are served and answers the relay holds stay free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_per_client_are_limited() {
    let mut relays = topology(2, &[(0, 1)]);
    std::fs::write(
        relays[0].data.path().join("extra.toml"),
        "lookups_per_client = 5\n",
    )
    .unwrap();
    relays[0].kill();
    relays[0].restart();
    converge(&relays).await;
    let cs = clients(&relays).await;
    let prober = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&relays[0].url),
    )
    .await
    .unwrap();
    // An a2g to 20 addresses nobody registered: each must be looked up.
    let strangers: Vec<Address> = (0..20)
        .map(|_| Identity::from_seed(rand::random()).address())
        .collect();
    let r = prober
        .send(Dest::A2g(strangers.clone()), "probe")
        .await
        .unwrap();
    let limited = r
        .entries
        .iter()
        .filter(|e| e.reason == ErrorCode::RateLimited.as_u16())
        .count();
    let looked_up = r
        .entries
        .iter()
        .filter(|e| e.reason == ErrorCode::NoRoute.as_u16())
        .count();
    assert_eq!((looked_up, limited), (5, 15), "{r:?}");
    // Within the same second, a LOOKUP is refused too...
    let refused = prober
        .request(RequestOp::Lookup(strangers[0]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            w2w_client::ClientError::Refused {
                code: ErrorCode::RateLimited,
                ..
            }
        ),
        "{refused:?}"
    );
    // ...but not a message to an address the relay holds, nor another
    // client's lookups.
    let r = prober
        .send(Dest::A2b(cs[1].address()), "held")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Delivered, "{r:?}");
    let r = cs[0]
        .send(Dest::A2b(strangers[1]), "another client")
        .await
        .unwrap();
    assert_eq!(r.reason, ErrorCode::NoRoute.as_u16(), "{r:?}");
    // A second later the prober may look up again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        prober
            .request(RequestOp::Lookup(strangers[0]))
            .await
            .unwrap(),
        ResponseBody::Lookup(None)
    ));
    // Looking for groups of other relays counts too (PROTOCOL 12.14).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut codes = Vec::new();
    for i in 0..8 {
        match prober.group_info(&format!("nobody-{i}")).await {
            Err(w2w_client::ClientError::Refused { code, .. }) => codes.push(code),
            other => panic!("{other:?}"),
        }
    }
    let unknown = codes
        .iter()
        .filter(|c| **c == ErrorCode::UnknownGroup)
        .count();
    let limited = codes
        .iter()
        .filter(|c| **c == ErrorCode::RateLimited)
        .count();
    assert_eq!((unknown, limited), (5, 3), "{codes:?}");
}

/// Roaming (PROTOCOL 12.13): messages stored for an address at the relay
/// it registered with move to the relay it registers with next, and
/// reach it there once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stored_at_the_old_relay_follow_a_client_that_moved() {
    let relays = topology(2, &[(0, 1)]);
    converge(&relays).await;
    let cs = clients(&relays).await;
    let mover = Identity::from_seed(rand::random());
    let x = Client::connect(mover.clone(), ConnectOptions::new(&relays[0].url))
        .await
        .unwrap();
    let x_addr = x.address();
    x.close().await;
    // Stored at relay 0, where it was.
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = format!("while away {i}");
        let r = cs[1].send(Dest::A2b(x_addr), &body).await.unwrap();
        assert_eq!(r.status, Status::Queued, "{r:?}");
        sent.push(body);
    }
    assert!(
        relays[0]
            .metric("w2w_store_queued_messages ")
            .unwrap_or(0.0)
            >= 20.0
    );
    // It comes back at relay 1 only.
    let mut x = Client::connect(mover, ConnectOptions::new(&relays[1].url))
        .await
        .unwrap();
    let got = drain(&mut x, sent.len(), Duration::from_millis(500)).await;
    let bodies: Vec<&String> = got.iter().map(|m| &m.1).collect();
    let want: Vec<&String> = sent.iter().collect();
    assert_eq!(bodies, want, "every message once, in order");
    // Nothing is left at relay 0.
    eventually("relay 0's queue is empty", || {
        relays[0].metric("w2w_store_queued_messages ") == Some(0.0)
    })
    .await;
    drop(cs);
}

/// The directory is leases (PROTOCOL 12.12): a record its relay does not
/// renew lapses. A relay that restarts renews the records of its clients
/// that are offline from the registrations on its disk, so messages for
/// them are still stored there (`queued`) long after every lease from its
/// earlier run ran out, and are delivered when they come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_keeps_its_offline_clients_in_the_directory() {
    let mut relays = topology(2, &[(0, 1)]);
    converge(&relays).await;
    let mut cs = clients(&relays).await;
    let away = Identity::from_seed(rand::random());
    let x = Client::connect(away.clone(), ConnectOptions::new(&relays[0].url))
        .await
        .unwrap();
    let x_addr = x.address();
    x.close().await;
    relays[0].kill();
    relays[0].restart();
    converge(&relays).await;
    // Two leases: whatever the first run published has lapsed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let deadline = Instant::now() + WAIT;
    let r = loop {
        let r = cs[1].send(Dest::A2b(x_addr), "while away").await.unwrap();
        if r.status == Status::Queued || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.status, Status::Queued, "{r:?}");
    let mut x = Client::connect(away, ConnectOptions::new(&relays[0].url))
        .await
        .unwrap();
    let got = drain(&mut x, 1, Duration::from_millis(300)).await;
    assert!(got.iter().any(|m| m.1 == "while away"), "{got:?}");
    drop(cs.pop());
}

/// A relay that starts with peers to dial and has reached none of them
/// yet cannot know where a remote address is: a message for one waits
/// for the federation and ends `joining` (53, retry), never a false
/// `no_route` (30, "never registered"); once the link is up it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_has_not_joined_yet_says_joining_not_no_route() {
    let mut relays = topology(2, &[(0, 1)]);
    converge(&relays).await;
    let cs = clients(&relays).await;
    let far = cs[0].address();
    // Relay 1 restarts while relay 0 (its only peer) is down.
    relays[0].kill();
    relays[1].kill();
    relays[1].restart();
    let id = Identity::from_seed(rand::random());
    let near = Client::connect(id, ConnectOptions::new(&relays[1].url))
        .await
        .unwrap();
    let r = near.send(Dest::A2b(far), "before the link").await.unwrap();
    assert_eq!(r.status, Status::NoRoute, "{r:?}");
    assert_eq!(r.reason, ErrorCode::Joining.as_u16(), "{r:?}");
    // Relay 0 returns: the same send goes through (its client is back, or
    // its record says it is stored for there).
    relays[0].restart();
    converge(&relays).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = near.send(Dest::A2b(far), "after the link").await.unwrap();
        if matches!(r.status, Status::Delivered | Status::Queued) {
            break;
        }
        assert!(Instant::now() < deadline, "never went through: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(cs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_4_routes_around_a_dead_relay() {
    let mut relays = topology(4, &[(0, 1), (1, 2), (2, 3), (0, 3)]);
    converge(&relays).await;
    let mut cs = clients(&relays).await;
    all_to_all(&mut cs).await;

    // Kill relay 1; 0, 2 and 3 still reach each other the other way round.
    relays[1].kill();
    drop(cs.remove(1));
    let live = [&relays[0], &relays[2], &relays[3]];
    for r in live {
        eventually("ring re-converges without relay 1", || {
            r.metric("w2w_known_relays ") == Some(2.0)
        })
        .await;
    }
    let addrs: Vec<Address> = cs.iter().map(|c| c.address()).collect();
    for i in 0..cs.len() {
        for j in 0..cs.len() {
            if i != j {
                let r = cs[i]
                    .send(Dest::A2b(addrs[j]), format!("around {i}->{j}"))
                    .await
                    .unwrap();
                assert_eq!(r.status, Status::Delivered, "{i}->{j}: {r:?}");
            }
        }
    }
    for (j, c) in cs.iter_mut().enumerate() {
        let got = drain(c, addrs.len() - 1, Duration::from_millis(300)).await;
        for i in 0..addrs.len() {
            if i != j {
                let body = format!("around {i}->{j}");
                assert_eq!(got.iter().filter(|m| m.1 == body).count(), 1, "{body}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_5() {
    let relays = topology(5, &[(0, 1), (0, 2), (0, 3), (0, 4)]);
    converge(&relays).await;
    let mut cs = clients(&relays).await;
    all_to_all(&mut cs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_7() {
    let relays = topology(7, &[(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6)]);
    converge(&relays).await;
    let mut cs = clients(&relays).await;
    all_to_all(&mut cs).await;
    // Leaves 3 and 6 are four hops apart; the forward count shows the path.
    let forwarded: f64 = relays
        .iter()
        .filter_map(|r| r.metric("w2w_forwarded_total "))
        .sum();
    assert!(forwarded > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_unknown_relays() {
    let stranger = Identity::from_seed([42; 32]).address().to_hex();
    let guarded = RelayProc::start(vec![], &["--peer-allow", &stranger]);
    let outsider = RelayProc::start(vec![guarded.url.clone()], &[]);
    eventually("the guarded relay refuses the outsider", || {
        guarded
            .metric("w2w_errors_total{reason=\"unauthorized_peer\"} ")
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    assert_eq!(guarded.metric("w2w_peer_links "), Some(0.0));
    assert_eq!(outsider.metric("w2w_known_relays "), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_presence_is_rejected_and_counted() {
    use futures_util::SinkExt;
    use w2w_proto::frame::Role;
    use w2w_proto::s2s::{Presence, RegistrationProof, RelayToRelay};

    let relay = RelayProc::start(vec![], &[]);
    // A rogue relay peers (open admission) and claims a client it never saw.
    let rogue = Identity::from_seed(rand::random());
    let mut ws = w2w_client::connect_raw(&ConnectOptions::new(&relay.url))
        .await
        .unwrap();
    w2w_client::register_as(&mut ws, &rogue, &relay.url, None, Role::Relay)
        .await
        .unwrap();
    let victim = Identity::from_seed(rand::random()).address();
    let proof = RegistrationProof {
        address: victim,
        relay_key: rogue.address(),
        relay_nonce: [1; 32],
        client_nonce: [2; 32],
        timestamp_ms: w2w_client::unix_ms(),
        url: "ws://rogue/".into(),
        sig_a: [3; 64],
    };
    let forged = RelayToRelay::Presence(Presence::sign(&rogue, proof, true, 1, 1)).encode();
    ws.send(tokio_websockets::Message::binary(forged))
        .await
        .unwrap();
    eventually("forged presence counted", || {
        relay
            .metric("w2w_errors_total{reason=\"forged_presence\"} ")
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    let c = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&relay.url),
    )
    .await
    .unwrap();
    assert_eq!(
        c.request(RequestOp::Lookup(victim)).await.unwrap(),
        ResponseBody::Lookup(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_limit_redirects_newcomers() {
    // `first` dials the hub, so at the hub it is a relay on probation.
    let hub = RelayProc::start(vec![], &["--max-probation-peers", "1"]);
    let first = RelayProc::start(vec![hub.url.clone()], &[]);
    eventually("first links to hub", || {
        hub.metric("w2w_peer_links ") == Some(1.0)
    })
    .await;
    // The hub is full: the newcomer is redirected to `first` and joins there.
    let late = RelayProc::start(vec![hub.url.clone()], &[]);
    eventually("late reaches both through first", || {
        late.metric("w2w_known_relays ") == Some(2.0)
    })
    .await;
    assert_eq!(hub.metric("w2w_peer_links "), Some(1.0));
    assert_eq!(first.metric("w2w_peer_links "), Some(2.0));
}

/// A key listening at relays 0 and 1 (`Homes`) and a sender at relay 2,
/// once relay 2's directory names both homes: a probe is acknowledged by
/// both sessions.
async fn two_homes_and_a_sender(relays: &[RelayProc]) -> (Identity, w2w_client::Homes, Client) {
    let me = Identity::from_seed(rand::random());
    let homes = w2w_client::Homes::connect(
        me.clone(),
        vec![
            ConnectOptions::new(&relays[0].url),
            ConnectOptions::new(&relays[1].url),
        ],
    )
    .await
    .unwrap();
    assert!(homes.ended().is_empty(), "{:?}", homes.ended());
    let sender = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&relays[2].url),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let r = sender.send(Dest::A2b(me.address()), "probe").await.unwrap();
        if r.status == Status::Delivered && r.delivered == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reached both relays: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (me, homes, sender)
}

/// Redundancy (PROTOCOL 7.7): one key listens at relays A and B at once; a
/// sender at C sends a stream; A is SIGKILLed in the middle and restarted
/// at the end. Every message receipted `delivered` or `queued` reaches the
/// application once (`Homes` drops the copy that came through the other
/// relay); none is refused while B is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_at_two_relays_loses_nothing_when_one_is_killed() {
    let mut relays = topology(3, &[(0, 1), (1, 2), (0, 2)]);
    converge(&relays).await;
    let (me, mut homes, sender) = two_homes_and_a_sender(&relays).await;
    let mut promised = Vec::new();
    let mut refused = Vec::new();
    for batch in 0..12 {
        let sends = (0..25).map(|i| {
            let body = format!("m{batch}-{i}");
            let s = &sender;
            let to = me.address();
            async move { (body.clone(), s.send(Dest::A2b(to), body).await.unwrap()) }
        });
        // A dies while the fifth batch is on its way.
        let kill = async {
            if batch == 4 {
                tokio::time::sleep(Duration::from_millis(3)).await;
                relays[0].kill();
            }
        };
        let (receipts, ()) = tokio::join!(futures_util::future::join_all(sends), kill);
        for (body, r) in receipts {
            match r.status {
                Status::Delivered | Status::Queued => promised.push(body),
                _ => refused.push((body, r)),
            }
        }
    }
    assert!(refused.is_empty(), "refused while B was up: {refused:?}");
    relays[0].restart();
    // Everything promised, once: through B, or A after its restart.
    let mut got: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    while promised.iter().any(|b| !got.contains_key(b)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, homes.recv()).await {
            Ok(Some(Event::Msg(m))) => {
                *got.entry(String::from_utf8_lossy(&m.body).into_owned())
                    .or_default() += 1
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("both connections ended: {:?}", homes.ended()),
            Err(_) => {
                let lost: Vec<_> = promised.iter().filter(|b| !got.contains_key(*b)).collect();
                panic!("{} receipted messages never arrived: {lost:?}", lost.len());
            }
        }
    }
    // A little longer: no second copy comes through the other relay.
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), homes.recv()).await {
        if let Event::Msg(m) = ev {
            *got.entry(String::from_utf8_lossy(&m.body).into_owned())
                .or_default() += 1;
        }
    }
    eprintln!(
        "{} sent, {} receipted, {} arrived once; A killed during the fifth batch of 25",
        300,
        promised.len(),
        got.iter()
            .filter(|(b, n)| **n == 1 && *b != "probe")
            .count()
    );
    let twice: Vec<_> = got
        .iter()
        .filter(|(b, n)| **n > 1 && *b != "probe")
        .collect();
    assert!(
        twice.is_empty(),
        "the application got these twice: {twice:?}"
    );
    assert_eq!(promised.len(), 300);
}

/// A relay that stops answering without closing its sockets (SIGSTOP: a
/// hung process) is noticed by its peers in about `peer_ping_interval_ms`
/// + `peer_ping_timeout_ms` (1 s + 2 s): messages for a key that is also
/// online at another relay are then answered `delivered` through that
/// one, without waiting for the hung relay or the receipt deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_relay_is_noticed_in_seconds_and_the_other_home_delivers() {
    let relays = topology(3, &[(0, 1), (1, 2), (0, 2)]);
    converge(&relays).await;
    let (me, mut homes, sender) = two_homes_and_a_sender(&relays).await;
    // Hang A.
    let pid = relays[0].proc.child.id().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stop.success());
    let hung = Instant::now();
    // C's link to A closes within the peer ping settings; after that every
    // message is answered by B at once.
    eventually("C notices A is gone", || {
        relays[2].metric("w2w_known_relays ") == Some(1.0)
    })
    .await;
    let noticed = hung.elapsed();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let r = sender
            .send(Dest::A2b(me.address()), format!("m{i}"))
            .await
            .unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status, Status::Delivered, "{r:?}");
    }
    let mut got = HashMap::new();
    while got.len() < 20 {
        match tokio::time::timeout(WAIT, homes.recv()).await {
            Ok(Some(Event::Msg(m))) if m.body.starts_with(b"m") => {
                *got.entry(m.body.clone()).or_insert(0) += 1
            }
            Ok(Some(_)) => {}
            other => panic!("messages missing ({} of 20): {other:?}", got.len()),
        }
    }
    assert!(got.values().all(|n| *n == 1), "{got:?}");
    eprintln!("hung relay noticed after {noticed:?}; slowest receipt after that {slowest:?}");
    assert!(
        noticed < Duration::from_secs(10),
        "noticed after {noticed:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a receipt took {slowest:?}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
}

/// Bootstrap that keeps growing (issue 12, item 7): relays started with
/// only `--peer SEED` all end up linked into one federation although the
/// seed and the relays it redirects to fill up (each takes 2 relays on
/// probation here): a newcomer walks REDIRECT lists at random instead of
/// always taking the first name (before: 15 of 20 never linked). Every
/// link a newcomer makes is to a relay its walk reached from the seed, so
/// one link each means one federation. (Not every relay learns every other
/// one's link state here: a link on probation introduces at most
/// `probation_relays`, 16, and the seed's two inbound links each carry a
/// subtree; that bound is issue 12's to rethink.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_given_one_seed_all_join() {
    const N: usize = 30;
    let seed = RelayProc::start(vec![], &["--max-probation-peers", "2"]);
    let mut relays = vec![];
    for _ in 1..N {
        relays.push(RelayProc::start(
            vec![seed.url.clone()],
            &["--max-probation-peers", "2"],
        ));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let all = || std::iter::once(&seed).chain(&relays);
    loop {
        let linked = all()
            .filter(|r| r.metric("w2w_peer_links ").is_some_and(|n| n >= 1.0))
            .count();
        if linked == N {
            break;
        }
        if Instant::now() >= deadline {
            let seen: Vec<_> = all()
                .map(|r| (r.metric("w2w_peer_links "), r.metric("w2w_known_relays ")))
                .collect();
            panic!(
                "after 30 s only {linked} of {N} relays are linked: (links, known relays) {seen:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let known: Vec<f64> = all()
        .filter_map(|r| r.metric("w2w_known_relays "))
        .collect();
    let min = known.iter().copied().fold(f64::MAX, f64::min);
    eprintln!("{N} relays from one seed: all linked in {took:?}; each knows {min} to {} others a second later", N - 1);
    assert!(
        min >= (N / 2) as f64,
        "a relay knows only {min} others: {known:?}"
    );
}

/// A federation grown from one seed is a tree (each relay dials its seed,
/// or where a REDIRECT sends it); with `min_peers` every relay dials more
/// relays it learns from link state, and the death of the best-linked
/// relay no longer cuts anyone off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_grown_from_one_seed_survives_any_one_relay() {
    const N: usize = 8;
    let keep = "min_peers = 3\n";
    let mut relays = vec![RelayProc::start_with(vec![], &[], keep)];
    let seed = relays[0].url.clone();
    for _ in 1..N {
        relays.push(RelayProc::start_with(vec![seed.clone()], &[], keep));
    }
    // (5 s alone; with the other federation tests' relays on the same two
    // cores, dials that fail back off for seconds.)
    eventually_within(
        "every relay has at least 3 links",
        Duration::from_secs(90),
        || {
            relays
                .iter()
                .all(|r| r.metric("w2w_peer_links ").is_some_and(|n| n >= 3.0))
        },
    )
    .await;
    converge(&relays).await;
    // Kill the relay with the most links (the seed, mostly).
    let busiest = (0..N)
        .max_by_key(|&i| relays[i].metric("w2w_peer_links ").unwrap_or(0.0) as u64)
        .unwrap();
    relays[busiest].kill();
    let rest: Vec<&RelayProc> = (0..N)
        .filter(|&i| i != busiest)
        .map(|i| &relays[i])
        .collect();
    let want = (N - 2) as f64;
    eventually("the others still reach each other", || {
        rest.iter()
            .all(|r| r.metric("w2w_known_relays ") == Some(want))
    })
    .await;
}

/// Named groups across relays (PROTOCOL 12.14): a group created at relay 0
/// of a line 0 – 1 – 2 is read, sent to and managed by its members from
/// the other relays, with the same signed, replay-proof log; its name is
/// taken federation-wide; it is still reachable after its relay restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_on_one_relay_is_used_and_managed_from_every_relay() {
    use w2w_proto::group::{GroupAction, GroupOp};
    let mut relays = topology(3, &[(0, 1), (1, 2)]);
    converge(&relays).await;
    let mut cs = clients(&relays).await;
    // Bob at relay 2 (his key, to sign an operation by hand).
    let bob_id = Identity::from_seed(rand::random());
    cs[2] = Client::connect(bob_id.clone(), ConnectOptions::new(&relays[2].url))
        .await
        .unwrap();
    let (alice, carol, bob) = (cs[0].address(), cs[1].address(), cs[2].address());
    cs[0].group_create("crew").await.unwrap();
    for m in [bob, carol] {
        cs[0].group_op("crew", GroupAction::Add(m)).await.unwrap();
    }

    // Bob, at relay 2, reads the group held at relay 0.
    let info = cs[2].group_info("crew").await.unwrap();
    assert_eq!((info.owner, info.members.len(), info.seq), (alice, 3, 3));

    // Bob sends to it (sealed for the members it reported): each other
    // member gets it once and opens it; one receipt with both entries.
    let r = cs[2]
        .send(Dest::Group("crew".into()), "hello crew")
        .await
        .unwrap();
    assert_eq!((r.status, r.entries.len()), (Status::Delivered, 2), "{r:?}");
    for i in [0, 1] {
        let got = drain(&mut cs[i], 1, Duration::from_millis(300)).await;
        assert_eq!(got, vec![(bob, "hello crew".to_string())], "client {i}");
    }

    // Management from relay 2: refused until the owner makes bob an admin.
    let dave = Identity::from_seed(rand::random()).address();
    let refused = cs[2].group_op("crew", GroupAction::Add(dave)).await;
    assert!(
        matches!(
            refused,
            Err(w2w_client::ClientError::Refused {
                code: ErrorCode::NotAllowed,
                ..
            })
        ),
        "{refused:?}"
    );
    cs[0]
        .group_op("crew", GroupAction::Admin(bob, true))
        .await
        .unwrap();
    let add = GroupOp::sign(&bob_id, "crew", GroupAction::Add(dave), 5);
    let g = cs[2].request(RequestOp::Group(add.clone())).await.unwrap();
    let ResponseBody::Group(g) = g else {
        panic!("{g:?}")
    };
    assert_eq!((g.seq, g.members.len()), (5, 4));
    // The same signed operation again: its number is used.
    let replay = cs[2].request(RequestOp::Group(add)).await;
    assert!(
        matches!(
            replay,
            Err(w2w_client::ClientError::Refused {
                code: ErrorCode::StaleSeq,
                ..
            })
        ),
        "{replay:?}"
    );
    // Relay 0 holds the change.
    assert_eq!(cs[0].group_info("crew").await.unwrap().seq, 5);

    // The name is taken federation-wide.
    let taken = cs[1].group_create("crew").await;
    assert!(
        matches!(
            taken,
            Err(w2w_client::ClientError::Refused {
                code: ErrorCode::GroupExists,
                ..
            })
        ),
        "{taken:?}"
    );
    // A name nobody hosts is unknown from anywhere.
    let none = cs[2].group_info("nobody-here").await;
    assert!(
        matches!(
            none,
            Err(w2w_client::ClientError::Refused {
                code: ErrorCode::UnknownGroup,
                ..
            })
        ),
        "{none:?}"
    );

    // Carol leaves from relay 1; a message now reaches alice only.
    cs[1]
        .group_op("crew", GroupAction::Remove(carol))
        .await
        .unwrap();
    let r = cs[2]
        .send(Dest::Group("crew".into()), "after carol")
        .await
        .unwrap();
    let to: Vec<Address> = r.entries.iter().map(|e| e.to).collect();
    assert!(
        to.contains(&alice) && !to.contains(&carol) && to.contains(&dave),
        "{r:?}"
    );

    // Relay 0 restarts: its group is found again from relay 2.
    relays[0].kill();
    relays[0].restart();
    converge(&relays).await;
    let deadline = Instant::now() + WAIT;
    loop {
        match cs[2].group_info("crew").await {
            Ok(g) => {
                assert_eq!((g.owner, g.seq), (alice, 6));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "group not found again: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
