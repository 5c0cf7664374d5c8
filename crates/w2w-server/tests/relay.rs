//! The relay against real WebSocket clients on loopback.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_websockets::Message;
use w2w_client::{connect_raw, register, Client, ConnectOptions, Event, RelaySocket};
use w2w_proto::frame::{
    ty, ClientToRelay, Confirm, Hosted, Msg, MsgId, Notice, RelayToClient, RequestOp, ResponseBody,
    Role, Scope, Status,
};
use w2w_proto::handshake::ClientHandshake;
use w2w_proto::{Address, Dest, ErrorCode, Identity};
use w2w_server::{Limits, Relay, RelayConfig};

const T: Duration = Duration::from_secs(10);

/// How long a test waits for something the relay does in the background.
/// Generous: the suite must pass on a loaded machine; a healthy run never
/// waits this long.
const WAIT: Duration = Duration::from_secs(20);

/// Polls `$cond` (an expression, it may `.await`) every 20 ms until it
/// holds; fails the test with `$what` after [`WAIT`]. For waiting on
/// background work instead of sleeping a fixed time and hoping.
macro_rules! wait_until {
    ($what:expr, $cond:expr) => {{
        let deadline = tokio::time::Instant::now() + WAIT;
        while !$cond {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {WAIT:?} waiting until {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

/// A relay on loopback with `limits`. `W2W_SHARDS=n cargo test -p
/// w2w-server --test relay` runs these tests on a relay of n shards.
async fn start(limits: Limits) -> Relay {
    let mut cfg = RelayConfig::new(
        Identity::from_seed(rand::random()),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.limits = limits;
    if let Some(n) = std::env::var("W2W_SHARDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.federation.shards = n;
    }
    Relay::start(cfg).await.unwrap()
}

fn id() -> Identity {
    Identity::from_seed(rand::random())
}

async fn client(relay: &Relay) -> Client {
    Client::connect(id(), ConnectOptions::new(relay.url()))
        .await
        .unwrap()
}

async fn raw(relay: &Relay) -> RelaySocket {
    connect_raw(&ConnectOptions::new(relay.url()))
        .await
        .unwrap()
}

async fn raw_registered(relay: &Relay) -> (RelaySocket, Identity) {
    let mut ws = raw(relay).await;
    let me = id();
    register(&mut ws, &me, &relay.url(), Some(relay.relay_key()))
        .await
        .unwrap();
    (ws, me)
}

async fn send_bin(ws: &mut RelaySocket, b: impl Into<Bytes>) {
    ws.send(Message::binary(b.into())).await.unwrap();
}

/// Next binary frame from the relay, or the close code as `Err`.
async fn next(ws: &mut RelaySocket) -> Result<RelayToClient, Option<u16>> {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("relay did not answer in time");
        let m = match m {
            None | Some(Err(_)) => return Err(None),
            Some(Ok(m)) => m,
        };
        if let Some((code, _)) = m.as_close() {
            return Err(Some(code.into()));
        }
        if m.is_binary() {
            let b: Bytes = m.into_payload().into();
            return Ok(RelayToClient::decode(&b).expect("relay sent an invalid frame"));
        }
    }
}

/// Expects ERROR(code) followed by close 4000+code.
async fn expect_refusal(ws: &mut RelaySocket, code: ErrorCode) {
    match next(ws).await {
        Ok(RelayToClient::Error(e)) => assert_eq!(
            ErrorCode::from_u16(e.code),
            Some(code),
            "detail: {}",
            e.detail
        ),
        other => panic!("expected ERROR {code}, got {other:?}"),
    }
    assert_eq!(next(ws).await.err(), Some(Some(code.close_code())));
}

async fn expect_error(ws: &mut RelaySocket, code: ErrorCode) {
    match next(ws).await {
        Ok(RelayToClient::Error(e)) => assert_eq!(
            ErrorCode::from_u16(e.code),
            Some(code),
            "detail: {}",
            e.detail
        ),
        other => panic!("expected ERROR {code}, got {other:?}"),
    }
}

async fn recv_msg(c: &mut Client) -> w2w_client::Received {
    loop {
        match tokio::time::timeout(T, c.recv()).await.expect("no message") {
            Some(Event::Msg(m)) => return m,
            Some(_) => continue,
            None => panic!("connection ended: {:?}", c.close_reason()),
        }
    }
}

/// The next NOTICE on `c` (other events skipped).
async fn recv_notice(c: &mut Client) -> Notice {
    loop {
        match tokio::time::timeout(T, c.recv()).await.expect("no notice") {
            Some(Event::Notice(n)) => return n,
            Some(_) => continue,
            None => panic!("connection ended: {:?}", c.close_reason()),
        }
    }
}

/// Asserts nothing arrives within a short window.
async fn expect_silence(c: &mut Client) {
    if let Ok(Some(Event::Msg(m))) =
        tokio::time::timeout(Duration::from_millis(200), c.recv()).await
    {
        panic!("unexpected message {m:?}");
    }
}

fn no_rate_limit() -> Limits {
    Limits {
        rate_per_sec: 1_000_000,
        rate_burst: 1_000_000,
        ..Limits::default()
    }
}

// ------------------------------------------------------------ the seed's tests

#[tokio::test]
async fn reply_back_on_registration() {
    let relay = start(Limits::default()).await;
    let me = id();
    let c = Client::connect(me.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    let rb = &c.registration().reply_back;
    assert_eq!(rb.address, me.address());
    assert_eq!(rb.relay_url, relay.url());
    assert_eq!(c.relay_key(), relay.relay_key());
}

#[tokio::test]
async fn a2a_echoes_to_self() {
    let relay = start(Limits::default()).await;
    let mut a = client(&relay).await;
    let r = a.send(Dest::A2a, "a2a hello w2w").await.unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 1));
    let m = recv_msg(&mut a).await;
    assert_eq!(&m.body[..], b"a2a hello w2w");
    assert_eq!(m.from, a.address());
    assert_eq!(m.id, r.id);
}

#[tokio::test]
async fn a2b_reaches_b_only() {
    let relay = start(Limits::default()).await;
    let mut a = client(&relay).await;
    let mut b = client(&relay).await;
    let mut c = client(&relay).await;
    let r = a
        .send(Dest::A2b(b.address()), "a2b hello w2w")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Delivered);
    assert_eq!(r.entries.len(), 1);
    assert_eq!(r.entries[0].to, b.address());
    let m = recv_msg(&mut b).await;
    assert_eq!(&m.body[..], b"a2b hello w2w");
    assert_eq!(m.from, a.address());
    assert_eq!(m.dest, Dest::A2b(b.address()));
    expect_silence(&mut a).await;
    expect_silence(&mut c).await;
}

#[tokio::test]
async fn a2g_reaches_listed_only() {
    let relay = start(Limits::default()).await;
    let mut a = client(&relay).await;
    let mut b = client(&relay).await;
    let mut c = client(&relay).await;
    let mut d = client(&relay).await;
    let r = a
        .send(Dest::A2g(vec![b.address(), c.address()]), "a2g hi")
        .await
        .unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 2));
    assert_eq!(&recv_msg(&mut b).await.body[..], b"a2g hi");
    assert_eq!(&recv_msg(&mut c).await.body[..], b"a2g hi");
    expect_silence(&mut a).await;
    expect_silence(&mut d).await;

    // One offline recipient: partial, with a per-recipient no_route.
    let ghost = id().address();
    let r = a
        .send(Dest::A2g(vec![b.address(), ghost]), "x")
        .await
        .unwrap();
    assert_eq!((r.status, r.delivered), (Status::Partial, 1));
    let e = r.entries.iter().find(|e| e.to == ghost).unwrap();
    assert_eq!(
        (e.status, e.reason),
        (Status::NoRoute, ErrorCode::NoRoute.as_u16())
    );
}

#[tokio::test]
async fn a2n_reaches_everyone() {
    let relay = start(Limits::default()).await;
    let mut cs = Vec::new();
    for _ in 0..4 {
        cs.push(client(&relay).await);
    }
    let r = cs[0].send(Dest::A2n(Scope::Relay), "to all").await.unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 4));
    for c in &mut cs {
        assert_eq!(&recv_msg(c).await.body[..], b"to all");
        expect_silence(c).await;
    }
}

#[tokio::test]
async fn a2b_to_offline_address_is_no_route() {
    let relay = start(Limits::default()).await;
    let a = client(&relay).await;
    let r = a.send(Dest::A2b(id().address()), "?").await.unwrap();
    assert_eq!(r.status, Status::NoRoute);
    assert_eq!(r.reason, ErrorCode::NoRoute.as_u16());
}

#[tokio::test]
async fn payload_bytes_arrive_unchanged() {
    let relay = start(Limits::default()).await;
    let a = client(&relay).await;
    let mut b = client(&relay).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    a.send(Dest::A2b(b.address()), payload.clone())
        .await
        .unwrap();
    assert_eq!(recv_msg(&mut b).await.body, payload);
}

// ----------------------------------------------------------- registration

#[tokio::test]
async fn registration_is_recorded_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    let relay = Relay::start(cfg).await.unwrap();
    let me = id();
    let c = Client::connect(me.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    c.close().await;
    let db = rusqlite::Connection::open(dir.path().join("w2w.sqlite")).unwrap();
    let (url, sig_a, sig_b, sig_c, first, last): (String, Vec<u8>, Vec<u8>, Vec<u8>, i64, i64) = db
        .query_row(
            "SELECT url, sig_a, sig_b, sig_c, first_seen_ms, last_seen_ms FROM registrations WHERE address = ?1",
            [&me.address().0[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .unwrap();
    assert_eq!(url, relay.url());
    assert_eq!((sig_a.len(), sig_b.len(), sig_c.len()), (64, 64, 64));
    assert!(first > 0 && last >= first);
}

/// Runs the handshake by hand up to REGISTER, letting the test tamper.
async fn challenge(ws: &mut RelaySocket) -> w2w_proto::frame::Challenge {
    match next(ws).await {
        Ok(RelayToClient::Challenge(c)) => c,
        other => panic!("expected CHALLENGE, got {other:?}"),
    }
}

fn now_ms() -> u64 {
    w2w_client::unix_ms()
}

#[tokio::test]
async fn stale_timestamp_is_rejected() {
    let relay = start(Limits::default()).await;
    for skew in [-61_000i64, 61_000] {
        let mut ws = raw(&relay).await;
        let ch = challenge(&mut ws).await;
        let mut hs = ClientHandshake::new(id(), Role::Client, relay.url(), rand::random(), None);
        let reg = hs
            .on_challenge(ch, (now_ms() as i64 + skew) as u64)
            .unwrap();
        send_bin(&mut ws, ClientToRelay::Register(reg).encode()).await;
        expect_refusal(&mut ws, ErrorCode::StaleTimestamp).await;
    }
}

#[tokio::test]
async fn wrong_relay_is_rejected() {
    let relay = start(Limits::default()).await;
    let mut ws = raw(&relay).await;
    let mut ch = challenge(&mut ws).await;
    ch.relay_key = id().address();
    let mut hs = ClientHandshake::new(id(), Role::Client, relay.url(), rand::random(), None);
    let reg = hs.on_challenge(ch, now_ms()).unwrap();
    send_bin(&mut ws, ClientToRelay::Register(reg).encode()).await;
    expect_refusal(&mut ws, ErrorCode::WrongRelay).await;
}

#[tokio::test]
async fn wrong_url_is_rejected() {
    let relay = start(Limits::default()).await;
    for url in [
        "ws://evil.example:7777/".to_string(),
        relay.url().replace("ws://", "wss://"),
        "not a url".into(),
    ] {
        let mut ws = raw(&relay).await;
        let ch = challenge(&mut ws).await;
        let mut hs = ClientHandshake::new(id(), Role::Client, url, rand::random(), None);
        let reg = hs.on_challenge(ch, now_ms()).unwrap();
        send_bin(&mut ws, ClientToRelay::Register(reg).encode()).await;
        expect_refusal(&mut ws, ErrorCode::WrongUrl).await;
    }
}

#[tokio::test]
async fn replayed_register_is_rejected() {
    let relay = start(Limits::default()).await;
    let me = id();
    let mut ws = raw(&relay).await;
    let ch = challenge(&mut ws).await;
    let mut hs = ClientHandshake::new(me.clone(), Role::Client, relay.url(), rand::random(), None);
    let captured = ClientToRelay::Register(hs.on_challenge(ch, now_ms()).unwrap()).encode();
    send_bin(&mut ws, captured.clone()).await;
    assert!(matches!(
        next(&mut ws).await,
        Ok(RelayToClient::Countersign(_))
    ));
    // An eavesdropper replays the captured REGISTER on a new connection.
    let mut ws2 = raw(&relay).await;
    challenge(&mut ws2).await;
    send_bin(&mut ws2, captured).await;
    expect_refusal(&mut ws2, ErrorCode::Replay).await;
}

#[tokio::test]
async fn bad_signatures_are_rejected() {
    let relay = start(Limits::default()).await;
    // sigA altered.
    let mut ws = raw(&relay).await;
    let ch = challenge(&mut ws).await;
    let mut hs = ClientHandshake::new(id(), Role::Client, relay.url(), rand::random(), None);
    let mut reg = hs.on_challenge(ch, now_ms()).unwrap();
    reg.sig_a[10] ^= 1;
    send_bin(&mut ws, ClientToRelay::Register(reg).encode()).await;
    expect_refusal(&mut ws, ErrorCode::BadSignature).await;
    // sigA made by another key than the one claimed.
    let mut ws = raw(&relay).await;
    let ch = challenge(&mut ws).await;
    let mut hs = ClientHandshake::new(id(), Role::Client, relay.url(), rand::random(), None);
    let mut reg = hs.on_challenge(ch, now_ms()).unwrap();
    reg.client_key = id().address();
    send_bin(&mut ws, ClientToRelay::Register(reg).encode()).await;
    expect_refusal(&mut ws, ErrorCode::BadSignature).await;
    // sigC forged.
    let mut ws = raw(&relay).await;
    let ch = challenge(&mut ws).await;
    let mut hs = ClientHandshake::new(id(), Role::Client, relay.url(), rand::random(), None);
    let reg = hs.on_challenge(ch, now_ms()).unwrap();
    send_bin(&mut ws, ClientToRelay::Register(reg).encode()).await;
    assert!(matches!(
        next(&mut ws).await,
        Ok(RelayToClient::Countersign(_))
    ));
    send_bin(
        &mut ws,
        ClientToRelay::Confirm(Confirm { sig_c: [7; 64] }).encode(),
    )
    .await;
    expect_refusal(&mut ws, ErrorCode::BadSignature).await;
}

#[tokio::test]
async fn client_refuses_a_relay_whose_key_changed() {
    let relay = start(Limits::default()).await;
    let opts = ConnectOptions::new(relay.url()).pinned(Some(id().address()));
    match Client::connect(id(), opts).await {
        Err(w2w_client::ClientError::Handshake(
            w2w_proto::handshake::HandshakeError::RelayKeyChanged { presented, .. },
        )) => assert_eq!(presented, relay.relay_key()),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("connected despite a changed relay key"),
    }
}

#[tokio::test]
async fn registration_must_finish_within_auth_timeout() {
    let relay = start(Limits {
        auth_timeout_ms: 300,
        ..Limits::default()
    })
    .await;
    let mut ws = raw(&relay).await;
    challenge(&mut ws).await;
    expect_refusal(&mut ws, ErrorCode::AuthTimeout).await;
    assert_eq!(relay.metrics().error_count(ErrorCode::AuthTimeout), 1);
}

#[tokio::test]
async fn messages_before_registration_are_refused() {
    let relay = start(Limits::default()).await;
    let me = id();
    let msg = Msg {
        flags: 0,
        id: MsgId([1; 16]),
        from: me.address(),
        dest: Dest::A2a,
        payload: Bytes::from_static(b"early"),
    };
    let mut ws = raw(&relay).await;
    challenge(&mut ws).await;
    send_bin(&mut ws, msg.encode()).await;
    expect_refusal(&mut ws, ErrorCode::NotRegistered).await;
    // Garbage during registration is fatal too, with its own code.
    let mut ws = raw(&relay).await;
    challenge(&mut ws).await;
    send_bin(&mut ws, vec![1u8, 0x77]).await;
    expect_refusal(&mut ws, ErrorCode::UnknownFrameType).await;
}

// ------------------------------------------------------------ limits

#[tokio::test]
async fn frame_over_max_size_closes_with_1009_and_others_are_served() {
    let relay = start(Limits {
        max_frame_bytes: 1024,
        ..Limits::default()
    })
    .await;
    let (mut ws, _) = raw_registered(&relay).await;
    send_bin(&mut ws, vec![0u8; 2048]).await;
    assert_eq!(next(&mut ws).await.err(), Some(Some(1009)));
    assert_eq!(relay.metrics().error_count(ErrorCode::FrameTooLarge), 1);
    let a = client(&relay).await;
    let mut b = client(&relay).await;
    assert_eq!(
        a.send(Dest::A2b(b.address()), "fine").await.unwrap().status,
        Status::Delivered
    );
    recv_msg(&mut b).await;
}

#[tokio::test]
async fn rate_limit_rejects_with_a_receipt() {
    // No refill at all: the outcome cannot depend on how long the sends
    // take (at 1/s, a second-long stall let a fourth one through).
    let relay = start(Limits {
        rate_per_sec: 0,
        rate_burst: 3,
        ..Limits::default()
    })
    .await;
    let a = client(&relay).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = a.send(Dest::A2a, "x").await.unwrap();
        statuses.push((r.status, r.reason));
    }
    let limited = (Status::Rejected, ErrorCode::RateLimited.as_u16());
    assert_eq!(&statuses[..3], &[(Status::Delivered, 0); 3]);
    assert_eq!(&statuses[3..], &[limited; 2]);
    assert!(relay.metrics().error_count(ErrorCode::RateLimited) >= 2);
    // c2s requests are limited too, with an error response.
    match a.request(RequestOp::Lookup(a.address())).await {
        Err(w2w_client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::RateLimited)
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
}

#[tokio::test]
async fn max_connections_refuses_the_extra_one() {
    let relay = start(Limits {
        max_connections: 2,
        ..Limits::default()
    })
    .await;
    let a = client(&relay).await;
    let _b = client(&relay).await;
    let mut ws = raw(&relay).await;
    expect_refusal(&mut ws, ErrorCode::MaxConnections).await;
    // Existing clients are unaffected.
    assert_eq!(
        a.send(Dest::A2a, "x").await.unwrap().status,
        Status::Delivered
    );
}

#[tokio::test]
async fn a2g_list_limits() {
    let relay = start(Limits {
        max_group: 3,
        ..Limits::default()
    })
    .await;
    let a = client(&relay).await;
    let r = a
        .send(Dest::A2g((0..4).map(|_| id().address()).collect()), "x")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.reason),
        (Status::Rejected, ErrorCode::ListTooLong.as_u16())
    );
    let r = a.send(Dest::A2g(vec![]), "x").await.unwrap();
    assert_eq!(
        (r.status, r.reason),
        (Status::Rejected, ErrorCode::EmptyList.as_u16())
    );
}

#[tokio::test]
async fn spoofed_sender_is_rejected() {
    let relay = start(Limits::default()).await;
    let (mut ws, _me) = raw_registered(&relay).await;
    let mut b = client(&relay).await;
    let msg = Msg {
        flags: 0,
        id: MsgId([3; 16]),
        from: id().address(),
        dest: Dest::A2b(b.address()),
        payload: Bytes::from_static(b"forged"),
    };
    send_bin(&mut ws, msg.encode()).await;
    match next(&mut ws).await {
        Ok(RelayToClient::Receipt(r)) => assert_eq!(
            (r.status, r.reason),
            (Status::Rejected, ErrorCode::SpoofedSender.as_u16())
        ),
        other => panic!("expected receipt, got {other:?}"),
    }
    expect_silence(&mut b).await;
    assert_eq!(
        relay.metrics().error_count(ErrorCode::SpoofedSender),
        1,
        "counted in w2w_errors_total"
    );
}

/// A client that lost its connection before its receipt resends the MSG
/// unchanged (PROTOCOL 7.6): while the original waits for the recipient's
/// ACK, the resend joins it and gets its receipt, not `duplicate`.
#[tokio::test]
async fn a_resend_while_the_original_waits_gets_the_original_receipt() {
    let relay = start(Limits::default()).await;
    let (mut bob, bob_id) = raw_registered(&relay).await;
    let alice = id();
    let mut first = raw(&relay).await;
    register(&mut first, &alice, &relay.url(), Some(relay.relay_key()))
        .await
        .unwrap();
    let msg = Msg {
        flags: 0,
        id: MsgId([4; 16]),
        from: alice.address(),
        dest: Dest::A2b(bob_id.address()),
        payload: Bytes::from_static(b"once"),
    }
    .encode();
    send_bin(&mut first, msg.clone()).await;
    let Ok(RelayToClient::Msg(got)) = next(&mut bob).await else {
        panic!("bob gets the message");
    };
    // Alice's connection ends before bob acknowledges; she comes back and
    // sends the same MSG again.
    drop(first);
    let mut second = raw(&relay).await;
    register(&mut second, &alice, &relay.url(), Some(relay.relay_key()))
        .await
        .unwrap();
    send_bin(&mut second, msg).await;
    let joined = async {
        let m = relay.metrics();
        while m.resends_joined.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(T, joined)
        .await
        .expect("the resend joins its original");
    send_bin(&mut bob, ClientToRelay::Ack(vec![got.id]).encode()).await;
    match next(&mut second).await {
        Ok(RelayToClient::Receipt(r)) => {
            assert_eq!(
                (r.id, r.status, r.delivered),
                (got.id, Status::Delivered, 1),
                "{r:?}"
            )
        }
        other => panic!("expected the receipt, got {other:?}"),
    }
    // Bob had it once.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob.next())
            .await
            .is_err(),
        "no second copy"
    );
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_its_messages_kept() {
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.limits = Limits {
        send_queue_bytes: 64 * 1024,
        ..no_rate_limit()
    };
    // Handed-over messages that are never acknowledged are reported after this.
    cfg.federation.receipt_timeout_ms = 500;
    let relay = Relay::start(cfg).await.unwrap();
    let a = std::sync::Arc::new(client(&relay).await);
    // The victim registers and then never reads (nor acknowledges) again.
    let (_victim_ws, victim) = raw_registered(&relay).await;
    // Far more than its send queue and socket buffers can hold.
    let mut sends = Vec::new();
    for _ in 0..400 {
        let a = a.clone();
        let to = victim.address();
        sends.push(tokio::spawn(async move {
            a.send(Dest::A2b(to), vec![0u8; 16 * 1024]).await.unwrap()
        }));
    }
    // Nothing is lost: every message stays stored for the victim and the
    // sender is told "queued" (none was acknowledged, so none "delivered").
    for s in sends {
        let r = s.await.unwrap();
        assert_eq!(r.status, Status::Queued, "{r:?}");
    }
    // The slow consumer is disconnected (no longer online); others are
    // still served. The error is counted as the connection closes, after
    // the receipts above may already have been sent: wait for it.
    wait_until!(
        "the slow consumer is disconnected",
        a.request(RequestOp::Lookup(victim.address()))
            .await
            .unwrap()
            == ResponseBody::Lookup(None)
    );
    wait_until!(
        "slow_consumer is counted",
        relay.metrics().error_count(ErrorCode::SlowConsumer) >= 1
    );
    assert_eq!(
        a.send(Dest::A2a, "x").await.unwrap().status,
        Status::Delivered
    );
}

// -------------------------------------------------------- hostile input

fn malformed_inputs(me: &Address) -> Vec<(&'static str, Vec<u8>, ErrorCode)> {
    let msg = |route: u8, rest: &[u8]| {
        let mut v = vec![1, ty::MSG, route, 0];
        v.extend([9u8; 16]);
        v.extend(me.0);
        v.extend(rest);
        v
    };
    let good_reg = ClientToRelay::Register(w2w_proto::frame::Register {
        role: Role::Client,
        relay_key: *me,
        client_key: *me,
        client_nonce: [0; 32],
        timestamp_ms: 0,
        url: "ws://x/".into(),
        sig_a: [0; 64],
    })
    .encode()
    .to_vec();
    use ErrorCode::*;
    vec![
        ("empty frame", vec![], Malformed),
        ("version only", vec![1], Malformed),
        ("version 2", vec![2, ty::MSG], UnsupportedVersion),
        ("version 0", vec![0, ty::MSG, 1, 2, 3], UnsupportedVersion),
        ("unknown type 0x77", vec![1, 0x77], UnknownFrameType),
        ("unknown type 0xff", vec![1, 0xff, 0, 0], UnknownFrameType),
        (
            "CHALLENGE from a client",
            vec![1, ty::CHALLENGE],
            UnexpectedFrame,
        ),
        (
            "RECEIPT from a client",
            vec![1, ty::RECEIPT, 0],
            UnexpectedFrame,
        ),
        (
            "ERROR from a client",
            vec![1, ty::ERROR, 0, 1],
            UnexpectedFrame,
        ),
        ("MSG cut after route", vec![1, ty::MSG, 2], Malformed),
        (
            "MSG cut inside id",
            vec![1, ty::MSG, 2, 0, 1, 2, 3],
            Malformed,
        ),
        ("MSG route 0", msg(0, &[]), UnknownRoute),
        ("MSG route 9", msg(9, &[]), UnknownRoute),
        ("a2b with half an address", msg(2, &[1; 16]), Malformed),
        (
            "a2g count larger than frame",
            msg(3, &[0xff, 0xff, 1, 2]),
            Malformed,
        ),
        ("a2g count cut", msg(3, &[0]), Malformed),
        ("a2n scope 7", msg(4, &[7]), Malformed),
        ("a2n without scope", msg(4, &[]), Malformed),
        ("REQUEST cut", vec![1, ty::REQUEST, 0, 0], Malformed),
        (
            "REQUEST op 99",
            vec![1, ty::REQUEST, 0, 0, 0, 1, 99],
            UnknownOp,
        ),
        (
            "LOOKUP cut address",
            vec![1, ty::REQUEST, 0, 0, 0, 1, 2, 5, 5],
            Malformed,
        ),
        (
            "ONLINE with trailing bytes",
            vec![1, ty::REQUEST, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 10, 0xee],
            Malformed,
        ),
        ("REGISTER cut", good_reg[..40].to_vec(), Malformed),
        (
            "REGISTER after registration",
            good_reg.clone(),
            UnexpectedFrame,
        ),
        (
            "CONFIRM after registration",
            {
                let mut v = vec![1, ty::CONFIRM];
                v.extend([0; 64]);
                v
            },
            UnexpectedFrame,
        ),
        (
            "CONFIRM with trailing byte",
            {
                let mut v = vec![1, ty::CONFIRM];
                v.extend([0; 65]);
                v
            },
            Malformed,
        ),
        (
            "REGISTER with bad role",
            {
                let mut v = good_reg.clone();
                v[2] = 7;
                v
            },
            Malformed,
        ),
    ]
}

#[tokio::test]
async fn hostile_inputs_get_codes_and_everyone_keeps_service() {
    let relay = start(no_rate_limit()).await;
    let (mut ws, me) = raw_registered(&relay).await;
    let a = client(&relay).await;
    let mut b = client(&relay).await;
    let inputs = malformed_inputs(&me.address());
    assert!(inputs.len() >= 20);
    for (what, bytes, code) in inputs {
        send_bin(&mut ws, bytes).await;
        match next(&mut ws).await {
            Ok(RelayToClient::Error(e)) => {
                assert_eq!(
                    ErrorCode::from_u16(e.code),
                    Some(code),
                    "{what}: {}",
                    e.detail
                )
            }
            other => panic!("{what}: expected ERROR {code}, got {other:?}"),
        }
        // The sender itself is still served...
        let echo = Msg {
            flags: 0,
            id: MsgId(rand::random()),
            from: me.address(),
            dest: Dest::A2a,
            payload: Bytes::from_static(b"still here"),
        };
        send_bin(&mut ws, echo.encode()).await;
        assert!(
            matches!(next(&mut ws).await, Ok(RelayToClient::Msg(_))),
            "{what}"
        );
        // "delivered" waits for the recipient's ACK (here: ourselves).
        send_bin(&mut ws, ClientToRelay::Ack(vec![echo.id]).encode()).await;
        assert!(
            matches!(next(&mut ws).await, Ok(RelayToClient::Receipt(_))),
            "{what}"
        );
        // ...and so is everyone else.
        let r = a.send(Dest::A2b(b.address()), what).await.unwrap();
        assert_eq!(r.status, Status::Delivered, "{what}");
        assert_eq!(&recv_msg(&mut b).await.body[..], what.as_bytes());
    }
    // Text frames are not part of the protocol.
    ws.send(Message::text("hello")).await.unwrap();
    expect_error(&mut ws, ErrorCode::TextFrame).await;
    assert!(relay.metrics().error_count(ErrorCode::Malformed) >= 10);
}

#[tokio::test]
async fn random_garbage_never_breaks_the_relay() {
    let relay = start(no_rate_limit()).await;
    let (mut ws, _) = raw_registered(&relay).await;
    let a = client(&relay).await;
    let mut errors = 0;
    for i in 0..300u32 {
        let len = (i as usize * 7) % 200;
        let mut v: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        if i % 2 == 0 && len >= 2 {
            v[0] = 1; // valid version, random type and body
        }
        send_bin(&mut ws, v).await;
        match next(&mut ws).await {
            Ok(RelayToClient::Error(_)) => errors += 1,
            Ok(RelayToClient::Receipt(_) | RelayToClient::Response(_) | RelayToClient::Msg(_)) => {}
            other => panic!("garbage {i} ended the connection: {other:?}"),
        }
    }
    assert!(errors > 200);
    assert_eq!(
        a.send(Dest::A2a, "ok").await.unwrap().status,
        Status::Delivered
    );
}

// ------------------------------------------------------------ liveness

#[tokio::test]
async fn dead_client_is_noticed_and_its_address_freed() {
    let relay = start(Limits {
        ping_interval_ms: 200,
        ping_timeout_ms: 300,
        ..Limits::default()
    })
    .await;
    let watcher = client(&relay).await;
    // Registers, then never reads: never answers pings.
    let (_dead_ws, dead) = raw_registered(&relay).await;
    // interval + timeout = 500 ms, but no upper bound on the time: on a
    // loaded machine it takes longer. Nothing else would end the dead
    // connection, and the ping_timeout count below shows what did.
    wait_until!(
        "the dead client is no longer registered",
        watcher
            .request(RequestOp::Lookup(dead.address()))
            .await
            .unwrap()
            == ResponseBody::Lookup(None)
    );
    // Counted as the connection closes, after it left the router.
    wait_until!(
        "ping_timeout is counted",
        relay.metrics().error_count(ErrorCode::PingTimeout) >= 1
    );
    assert_eq!(relay.metrics().error_count(ErrorCode::PingTimeout), 1);
    // A live client (its driver answers pings) stays registered meanwhile.
    assert!(matches!(
        watcher
            .request(RequestOp::Lookup(watcher.address()))
            .await
            .unwrap(),
        ResponseBody::Lookup(Some(Hosted { .. }))
    ));
}

#[tokio::test]
async fn explicit_close_frees_the_address() {
    let relay = start(Limits::default()).await;
    let a = client(&relay).await;
    let b = client(&relay).await;
    let b_addr = b.address();
    b.close().await;
    wait_until!(
        "the closed client's address is free",
        a.request(RequestOp::Lookup(b_addr)).await.unwrap() == ResponseBody::Lookup(None)
    );
}

async fn session(relay: &Relay, me: &Identity, opts: ConnectOptions) -> Client {
    Client::connect(me.clone(), opts.pinned(Some(relay.relay_key())))
        .await
        .unwrap()
}

/// Whether `c` gets no event (message, notice or close) for a while.
async fn quiet(c: &mut Client, d: Duration) {
    if let Ok(ev) = tokio::time::timeout(d, c.recv()).await {
        panic!("expected nothing, got {ev:?} ({:?})", c.close_reason());
    }
}

#[tokio::test]
async fn every_receiving_session_of_a_key_gets_each_live_message_once() {
    let relay = start(Limits::default()).await;
    let me = id();
    let mut tab1 = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let mut tab2 = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let other = client(&relay).await;
    for i in 0..3 {
        let body = format!("live {i}");
        let r = other.send(Dest::A2b(me.address()), &body).await.unwrap();
        assert_eq!(r.status, Status::Delivered);
        assert_eq!(r.delivered, 2, "the receipt counts both sessions: {r:?}");
        assert_eq!(recv_msg(&mut tab1).await.body, body.as_bytes());
        assert_eq!(recv_msg(&mut tab2).await.body, body.as_bytes());
    }
    // Once each: nothing more, and neither was closed.
    expect_silence(&mut tab1).await;
    expect_silence(&mut tab2).await;
    assert!(tab1.close_reason().is_none() && tab2.close_reason().is_none());
    assert_eq!(relay.metrics().error_count(ErrorCode::Replaced), 0);
    // Online once.
    let online = other
        .request(RequestOp::Online {
            offset: 0,
            limit: 100,
        })
        .await
        .unwrap();
    let ResponseBody::Online { total, .. } = online else {
        panic!("{online:?}")
    };
    assert_eq!(
        total, 2,
        "two addresses online (the key once, and the sender)"
    );
}

#[tokio::test]
async fn a_send_only_session_never_disturbs_a_listener_with_the_same_key() {
    let relay = start(Limits::default()).await;
    let me = id();
    let mut listener = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let third = id();
    let mut t = session(&relay, &third, ConnectOptions::new(relay.url())).await;
    for i in 0..3 {
        let mut sender = session(
            &relay,
            &me,
            ConnectOptions::new(relay.url()).send_only(true),
        )
        .await;
        let r = sender
            .send(Dest::A2b(third.address()), format!("out {i}"))
            .await
            .unwrap();
        assert_eq!((r.status, r.delivered), (Status::Delivered, 1), "{r:?}");
        assert_eq!(recv_msg(&mut t).await.body, format!("out {i}").as_bytes());
        // To itself: the listener gets it, the send-only session does not.
        let r = sender.send(Dest::A2a, format!("note {i}")).await.unwrap();
        assert_eq!(r.status, Status::Delivered, "{r:?}");
        assert_eq!(
            recv_msg(&mut listener).await.body,
            format!("note {i}").as_bytes()
        );
        // Messages to the key reach the listener only.
        t.send(Dest::A2b(me.address()), format!("in {i}"))
            .await
            .unwrap();
        assert_eq!(
            recv_msg(&mut listener).await.body,
            format!("in {i}").as_bytes()
        );
        quiet(&mut sender, Duration::from_millis(200)).await;
        sender.close().await;
    }
    assert!(listener.close_reason().is_none());
    quiet(&mut listener, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn exclusive_closes_the_other_sessions_and_says_how_many() {
    let relay = start(Limits::default()).await;
    let me = id();
    let mut old1 = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let mut old2 = session(
        &relay,
        &me,
        ConnectOptions::new(relay.url()).send_only(true),
    )
    .await;
    let mut new = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let r = new.request(RequestOp::Exclusive).await.unwrap();
    assert_eq!(r, ResponseBody::Exclusive { closed: 2 });
    for old in [&mut old1, &mut old2] {
        let ev = tokio::time::timeout(T, old.recv()).await.unwrap();
        assert_eq!(ev, Some(Event::Notice(Notice::Replaced)));
        assert_eq!(tokio::time::timeout(T, old.recv()).await.unwrap(), None);
        assert!(old.close_reason().unwrap().contains("replaced"));
    }
    let other = client(&relay).await;
    let r = other.send(Dest::A2b(me.address()), "to new").await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(&recv_msg(&mut new).await.body[..], b"to new");
    // The client option does the same at registration.
    let mut newer = session(
        &relay,
        &me,
        ConnectOptions::new(relay.url()).exclusive(true),
    )
    .await;
    let ev = tokio::time::timeout(T, new.recv()).await.unwrap();
    assert_eq!(ev, Some(Event::Notice(Notice::Replaced)));
    other
        .send(Dest::A2b(me.address()), "to newer")
        .await
        .unwrap();
    assert_eq!(&recv_msg(&mut newer).await.body[..], b"to newer");
}

#[tokio::test]
async fn stored_messages_go_to_the_first_session_that_takes_them() {
    let relay = start(Limits::default()).await;
    let me = id();
    // Registered once, then offline: messages for it are stored.
    session(&relay, &me, ConnectOptions::new(relay.url()))
        .await
        .close()
        .await;
    let mut other = client(&relay).await;
    wait_until!(
        "the address is offline",
        other
            .request(RequestOp::Lookup(me.address()))
            .await
            .unwrap()
            == ResponseBody::Lookup(None)
    );
    for i in 0..3 {
        let r = other
            .send(Dest::A2b(me.address()), format!("stored {i}"))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Queued);
    }
    // The first session takes them (and acknowledges them).
    let mut first = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    for i in 0..3 {
        assert_eq!(
            recv_msg(&mut first).await.body,
            format!("stored {i}").as_bytes()
        );
    }
    // Their senders hear they arrived: the ACKs were taken (the copies'
    // deletes are queued before anything a later session asks for).
    let mut notices = 0;
    while notices < 3 {
        match tokio::time::timeout(T, other.recv())
            .await
            .expect("NOTICE DELIVERED")
        {
            Some(Event::Notice(Notice::Delivered { to, .. })) if to == me.address() => notices += 1,
            Some(_) => {}
            None => panic!("sender closed"),
        }
    }
    // A session that connects later does not get them again, but gets
    // what is live from now on, like the first.
    let mut second = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    expect_silence(&mut second).await;
    other.send(Dest::A2b(me.address()), "live").await.unwrap();
    assert_eq!(&recv_msg(&mut first).await.body[..], b"live");
    assert_eq!(&recv_msg(&mut second).await.body[..], b"live");
}

#[tokio::test]
async fn a_stored_message_left_unacknowledged_goes_to_the_other_session() {
    let relay = start(Limits::default()).await;
    let me = id();
    let other = client(&relay).await;
    // A raw session that takes messages and never acknowledges them.
    let mut ws = raw(&relay).await;
    register(&mut ws, &me, &relay.url(), Some(relay.relay_key()))
        .await
        .unwrap();
    let r = other.send(Dest::A2b(me.address()), "held").await.unwrap();
    // Handed over unstored and not acknowledged: written at the deadline.
    assert_eq!(r.status, Status::Queued, "{r:?}");
    let mut tab = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    // The new session reads the inbox: the message nobody acknowledged.
    assert_eq!(&recv_msg(&mut tab).await.body[..], b"held");
    drop(ws);
}

#[tokio::test]
async fn two_reconnecting_clients_with_one_key_never_close_each_other_in_a_loop() {
    let relay = start(Limits::default()).await;
    let me = id();
    // Plain sessions: both stay.
    let mut a = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let mut b = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    quiet(&mut a, Duration::from_secs(1)).await;
    quiet(&mut b, Duration::from_millis(10)).await;
    assert_eq!(relay.metrics().error_count(ErrorCode::Replaced), 0);
    // Exclusive ones: the newer closes the older once; the older does not
    // come back (a client closed as replaced does not reconnect).
    let mut x = session(
        &relay,
        &me,
        ConnectOptions::new(relay.url()).exclusive(true),
    )
    .await;
    let mut y = session(
        &relay,
        &me,
        ConnectOptions::new(relay.url()).exclusive(true),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // a, b and x were each closed once.
    assert_eq!(relay.metrics().error_count(ErrorCode::Replaced), 3);
    for c in [&mut a, &mut b, &mut x] {
        assert!(c.close_reason().is_some_and(|r| r.contains("replaced")));
    }
    assert!(y.close_reason().is_none());
    let other = client(&relay).await;
    let r = other.send(Dest::A2b(me.address()), "y").await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(&recv_msg(&mut y).await.body[..], b"y");
}

#[tokio::test]
async fn a_session_that_never_acknowledges_does_not_hold_the_receipt() {
    let relay = start(Limits::default()).await;
    let me = id();
    // A raw session of the key that takes messages and never ACKs (a
    // frozen tab, a dead connection not yet timed out).
    let mut frozen = raw(&relay).await;
    register(&mut frozen, &me, &relay.url(), Some(relay.relay_key()))
        .await
        .unwrap();
    let mut tab = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let other = client(&relay).await;
    let started = std::time::Instant::now();
    let r = other.send(Dest::A2b(me.address()), "hi").await.unwrap();
    let took = started.elapsed();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 1), "{r:?}");
    // The grace is 250 ms; the receipt timeout (what it waited before) 5 s.
    assert!(took < Duration::from_secs(2), "the receipt took {took:?}");
    assert_eq!(&recv_msg(&mut tab).await.body[..], b"hi");
    drop(frozen);
}

#[tokio::test]
async fn too_many_sessions_are_refused_and_the_others_keep_working() {
    let relay = start(Limits {
        max_sessions: 2,
        ..Limits::default()
    })
    .await;
    let me = id();
    let mut a = session(&relay, &me, ConnectOptions::new(relay.url())).await;
    let mut b = session(
        &relay,
        &me,
        ConnectOptions::new(relay.url()).send_only(true),
    )
    .await;
    match Client::connect(me.clone(), ConnectOptions::new(relay.url())).await {
        Err(w2w_client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::TooManySessions)
        }
        Ok(_) => panic!("a third session was admitted"),
        Err(e) => panic!("expected too_many_sessions, got {e}"),
    }
    let other = client(&relay).await;
    other
        .send(Dest::A2b(me.address()), "still here")
        .await
        .unwrap();
    assert_eq!(&recv_msg(&mut a).await.body[..], b"still here");
    let r = b.send(Dest::A2b(other.address()), "me too").await.unwrap();
    assert_eq!(r.status, Status::Delivered);
    quiet(&mut b, Duration::from_millis(100)).await;
    // One leaves: a new one is admitted.
    a.close().await;
    wait_until!(
        "a session slot is free",
        Client::connect(me.clone(), ConnectOptions::new(relay.url()))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn presence_notices_and_online() {
    let relay = start(Limits::default()).await;
    let mut a = client(&relay).await;
    a.request(RequestOp::Presence(true)).await.unwrap();
    let b = client(&relay).await;
    let b_addr = b.address();
    let ev = tokio::time::timeout(T, a.recv()).await.unwrap();
    assert_eq!(ev, Some(Event::Notice(Notice::Join(b_addr))));
    let mut online = a.online().await.unwrap();
    online.sort();
    let mut want = vec![a.address(), b_addr];
    want.sort();
    assert_eq!(online, want);
    b.close().await;
    let ev = tokio::time::timeout(T, a.recv()).await.unwrap();
    assert_eq!(ev, Some(Event::Notice(Notice::Leave(b_addr))));
}

#[tokio::test]
async fn shutdown_tells_clients() {
    let relay = start(Limits::default()).await;
    let mut a = client(&relay).await;
    relay.shutdown(Duration::from_secs(3)).await;
    let ev = tokio::time::timeout(T, a.recv()).await.unwrap();
    assert_eq!(ev, Some(Event::Notice(Notice::ShuttingDown)));
}

// ------------------------------------------------------------ HTTP

async fn http_get(relay: &Relay, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(relay.local_addr())
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn http_endpoints() {
    let relay = start(Limits::default()).await;
    let a = client(&relay).await;
    a.send(Dest::A2a, "x").await.unwrap();
    assert_eq!(http_get(&relay, "/healthz").await, (200, "ok\n".into()));
    let (st, metrics) = http_get(&relay, "/metrics").await;
    assert_eq!(st, 200);
    assert!(metrics.contains("w2w_registered 1"), "{metrics}");
    assert!(metrics.contains("w2w_messages_total{route=\"a2a\"} 1"));
    assert!(metrics.contains("w2w_receipts_total{status=\"delivered\"} 1"));
    let (st, info) = http_get(&relay, "/.well-known/w2w").await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["relay_key"], relay.relay_key().to_hex());
    assert_eq!(v["version"], 1);
    assert_eq!(v["limits"]["max_group"], 64);
    assert_eq!(v["limits"]["max_frame_bytes"], 1 << 20);
    assert_eq!(http_get(&relay, "/nope").await.0, 404);
}

// ------------------------------------------------------- store-and-forward

/// A sender told `queued` hears NOTICE DELIVERED once the recipient has
/// the message (PROTOCOL 5.10); a message it never gets brings none.
#[tokio::test]
async fn a_queued_message_is_followed_by_a_delivered_notice() {
    let relay = start(Limits::default()).await;
    let mut alice = client(&relay).await;
    let bob_id = id();
    let bob = Client::connect(bob_id.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    bob.close().await;
    wait_until!(
        "the relay noticed bob left",
        relay.metrics().registered.load(Ordering::Relaxed) == 1
    );
    let r = alice
        .send(Dest::A2b(bob_id.address()), "while you were out")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Queued, "{r:?}");
    let mut bob = Client::connect(bob_id.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    assert_eq!(&recv_msg(&mut bob).await.body[..], b"while you were out");
    let notice = recv_notice(&mut alice).await;
    assert_eq!(
        notice,
        Notice::Delivered {
            id: r.id,
            to: bob_id.address()
        }
    );
}

#[tokio::test]
async fn offline_recipient_gets_its_queue_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.limits.queue_quota = 5;
    let relay = Relay::start(cfg).await.unwrap();
    let alice = client(&relay).await;
    let bob_id = id();
    let bob = Client::connect(bob_id.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    let mut carol = client(&relay).await;
    bob.close().await;
    // Wait until the relay has noticed bob left.
    wait_until!(
        "the relay noticed bob left",
        relay.metrics().registered.load(Ordering::Relaxed) == 2
    );
    for i in 0..4 {
        let r = alice
            .send(Dest::A2b(bob_id.address()), format!("queued {i}"))
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.entries[0].status),
            (Status::Queued, Status::Queued),
            "{r:?}"
        );
    }
    // a2g: carol is online (delivered), bob offline (queued): all accepted.
    let r = alice
        .send(
            Dest::A2g(vec![carol.address(), bob_id.address()]),
            "queued 4",
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::Queued, "{r:?}");
    assert_eq!(&recv_msg(&mut carol).await.body[..], b"queued 4");
    // Quota: the sixth is refused with a clear code.
    let r = alice
        .send(Dest::A2b(bob_id.address()), "too many")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.reason),
        (Status::Rejected, ErrorCode::QueueFull.as_u16())
    );
    // A never-registered address is not queued.
    let r = alice
        .send(Dest::A2b(id().address()), "nobody")
        .await
        .unwrap();
    assert_eq!(r.status, Status::NoRoute);

    let mut bob = Client::connect(bob_id.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(
            recv_msg(&mut bob).await.body,
            format!("queued {i}").as_bytes()
        );
    }
    expect_silence(&mut bob).await;
    // Acknowledged messages are deleted from the store.
    queue_rows(dir.path(), 0).await;
    // Reconnecting again delivers nothing twice.
    bob.close().await;
    let mut bob = Client::connect(bob_id, ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    expect_silence(&mut bob).await;
}

// ------------------------------------------------------------ named groups

#[tokio::test]
async fn named_groups_reach_members_only_and_check_rights() {
    use w2w_proto::group::{GroupAction, GroupOp};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    let relay = Relay::start(cfg).await.unwrap();
    let alice_id = id();
    let alice = Client::connect(alice_id.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    let mut bob = client(&relay).await;
    let mut carol = client(&relay).await;
    let dave_id = id();
    Client::connect(dave_id.clone(), ConnectOptions::new(relay.url()))
        .await
        .unwrap()
        .close()
        .await;

    let g = alice.group_create("team").await.unwrap();
    assert_eq!(g.owner, alice.address());
    alice
        .group_op("team", GroupAction::Add(bob.address()))
        .await
        .unwrap();
    let g = alice
        .group_op("team", GroupAction::Add(dave_id.address()))
        .await
        .unwrap();
    assert_eq!(g.members.len(), 3);

    // To the group: bob gets it (sealed for members), dave's is queued,
    // carol (not a member) gets nothing.
    let r = alice
        .send(Dest::Group("team".into()), "team news")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Queued, "{r:?}");
    assert_eq!(r.entries.len(), 2);
    let m = recv_msg(&mut bob).await;
    assert_eq!(
        (&m.body[..], m.security),
        (&b"team news"[..], w2w_client::Security::Sealed)
    );
    expect_silence(&mut carol).await;

    // Non-members may not send; non-admins may not add; unknown groups.
    let r = carol
        .send_plain(Dest::Group("team".into()), "let me in")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.reason),
        (Status::Rejected, ErrorCode::NotMember.as_u16())
    );
    let e = bob
        .group_op("team", GroupAction::Add(carol.address()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            w2w_client::ClientError::Refused {
                code: ErrorCode::NotAllowed,
                ..
            }
        ),
        "{e}"
    );
    let r = alice
        .send_plain(Dest::Group("nope".into()), "?")
        .await
        .unwrap();
    assert_eq!(r.reason, ErrorCode::UnknownGroup.as_u16());
    // A membership change signed by someone else is refused.
    let forged = GroupOp::sign(
        &id(),
        "team",
        GroupAction::Add(carol.address()),
        u64::MAX / 2,
    );
    let e = carol.request(RequestOp::Group(forged)).await.unwrap_err();
    assert!(
        matches!(
            e,
            w2w_client::ClientError::Refused {
                code: ErrorCode::NotAllowed,
                ..
            }
        ),
        "{e}"
    );
    // Bob leaves; the next message skips him.
    bob.group_op("team", GroupAction::Remove(bob.address()))
        .await
        .unwrap();
    alice
        .send(Dest::Group("team".into()), "after bob left")
        .await
        .unwrap();
    expect_silence(&mut bob).await;
    // Dave gets both team messages he missed, from the queue, in order.
    let mut dave = Client::connect(dave_id, ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    assert_eq!(&recv_msg(&mut dave).await.body[..], b"team news");
    assert_eq!(&recv_msg(&mut dave).await.body[..], b"after bob left");
    // Groups survive a restart of the relay (same data dir).
    let addr = relay.local_addr();
    relay.shutdown(Duration::from_secs(2)).await;
    let mut cfg = RelayConfig::new(id(), addr);
    cfg.data_dir = Some(dir.path().to_owned());
    let relay = Relay::start(cfg).await.unwrap();
    let c = Client::connect(alice_id, ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    let g = c.group_info("team").await.unwrap();
    assert_eq!(g.owner, alice.address());
    assert_eq!(g.members.len(), 2);
    // Non-members cannot read the member list.
    let outsider = client(&relay).await;
    let e = outsider.group_info("team").await.unwrap_err();
    assert!(
        matches!(
            e,
            w2w_client::ClientError::Refused {
                code: ErrorCode::NotMember,
                ..
            }
        ),
        "{e}"
    );
}

/// Issue 16: operations back to back (many in one millisecond) from one
/// client, and two admins changing one group at the same time, all apply:
/// the sequence is the group's own counter (compare and set, re-signed on
/// `stale_seq`), not a clock.
#[tokio::test]
async fn group_operations_back_to_back_and_from_racing_admins_all_apply() {
    use w2w_proto::group::GroupAction;
    let relay = Relay::start(RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let alice = client(&relay).await;
    let bob = client(&relay).await;
    alice.group_create("ops").await.unwrap();
    alice
        .group_op("ops", GroupAction::Add(bob.address()))
        .await
        .unwrap();
    alice
        .group_op("ops", GroupAction::Admin(bob.address(), true))
        .await
        .unwrap();
    // Back to back from one client.
    for i in 0..40u8 {
        alice
            .group_op("ops", GroupAction::Add(Address([i; 32])))
            .await
            .unwrap();
    }
    // Two admins at once, each adding and removing its own range.
    async fn run(c: &Client, base: u8) {
        for i in 0..30u8 {
            let m = Address([base + i; 32]);
            c.group_op("ops", GroupAction::Add(m)).await.unwrap();
            if i % 3 == 0 {
                c.group_op("ops", GroupAction::Remove(m)).await.unwrap();
            }
        }
    }
    tokio::join!(run(&alice, 100), run(&bob, 200));
    let g = alice.group_info("ops").await.unwrap();
    // alice, bob, 40 back-to-back, 2 × (30 - 10 removed).
    assert_eq!(g.members.len(), 2 + 40 + 2 * 20);
    // create, add, admin, 40, and 2 × (30 adds + 10 removes).
    assert_eq!(g.seq, 3 + 40 + 2 * 40);
}

/// Waits until `relay`'s store-and-forward queue holds `n` rows.
async fn queue_rows(dir: &std::path::Path, n: i64) {
    let db = rusqlite::Connection::open(dir.join("w2w.sqlite")).unwrap();
    let rows = || -> i64 {
        db.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .unwrap()
    };
    wait_until!(
        format!("the queue holds {n} rows (now {})", rows()),
        rows() == n
    );
}

/// Messages stored so far (committed to the store).
fn stored_total(relay: &Relay) -> u64 {
    relay.metrics().stored_total.load(Ordering::Relaxed)
}

/// Waits until `to` takes messages directly: until its (empty) stored
/// backlog has been handed over, messages for it go through the store.
/// Nothing tells a client when that is done, and a fixed sleep is a guess
/// a loaded machine can miss; so probes are sent (and read and
/// acknowledged by `$take_and_ack`) until one arrives without being stored.
macro_rules! until_live {
    ($relay:expr, $from:expr, $to:expr, $take_and_ack:expr) => {{
        wait_until!("the recipient goes live (its backlog handed over)", {
            let before = stored_total($relay);
            let (r, ()) = tokio::join!($from.send(Dest::A2b($to), "probe"), $take_and_ack);
            assert_eq!(r.unwrap().status, Status::Delivered);
            stored_total($relay) == before
        });
    }};
}

#[tokio::test]
async fn acknowledged_messages_are_never_written_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.limits = no_rate_limit();
    let relay = Relay::start(cfg).await.unwrap();
    let alice = client(&relay).await;
    let mut bob = client(&relay).await;
    // Let bob's (empty) stored backlog be handed over first.
    until_live!(&relay, alice, bob.address(), async {
        assert_eq!(&recv_msg(&mut bob).await.body[..], b"probe");
    });
    let before = stored_total(&relay);
    for i in 0..50 {
        let r = alice
            .send(Dest::A2b(bob.address()), format!("m{i}"))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Delivered, "{r:?}");
        assert_eq!(recv_msg(&mut bob).await.body, format!("m{i}").as_bytes());
    }
    let r = alice.send(Dest::A2a, "to myself").await.unwrap();
    assert_eq!(r.status, Status::Delivered, "{r:?}");
    assert_eq!(
        stored_total(&relay),
        before,
        "a message its connected recipient acknowledged was written to disk"
    );
    queue_rows(dir.path(), 0).await;
}

#[tokio::test]
async fn unacknowledged_handover_is_stored_then_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.limits = no_rate_limit();
    // Long enough that the probes below are surely acknowledged in time.
    cfg.federation.receipt_timeout_ms = 1000;
    let relay = Relay::start(cfg).await.unwrap();
    let alice = client(&relay).await;
    // Bob reads but never acknowledges (but for the probes).
    let (mut bob_ws, bob) = raw_registered(&relay).await;
    until_live!(&relay, alice, bob.address(), async {
        match next(&mut bob_ws).await {
            Ok(RelayToClient::Msg(m)) => {
                send_bin(&mut bob_ws, ClientToRelay::Ack(vec![m.id]).encode()).await
            }
            other => panic!("expected the probe, got {other:?}"),
        }
    });
    let base = stored_total(&relay);
    // Counted from here.
    let stored = || stored_total(&relay) - base;

    // 1. No ACK in time: stored, then reported "queued".
    let r = alice.send(Dest::A2b(bob.address()), "m1").await.unwrap();
    assert!(matches!(next(&mut bob_ws).await, Ok(RelayToClient::Msg(_))));
    assert_eq!(r.status, Status::Queued, "{r:?}");
    assert_eq!(stored(), 1);
    queue_rows(dir.path(), 1).await;

    // 2. The connection ends before the ACK: stored then, "queued".
    let send = {
        let to = bob.address();
        let alice = &alice;
        async move { alice.send(Dest::A2b(to), "m2").await.unwrap() }
    };
    let read_then_drop = async {
        assert!(matches!(next(&mut bob_ws).await, Ok(RelayToClient::Msg(_))));
        drop(bob_ws);
    };
    let (r, ()) = tokio::join!(send, read_then_drop);
    assert_eq!(r.status, Status::Queued, "{r:?}");
    assert_eq!(stored(), 2);
    queue_rows(dir.path(), 2).await;

    // Bob comes back: both, in order, once; acknowledged, they are deleted.
    let mut bob = Client::connect(bob, ConnectOptions::new(relay.url()))
        .await
        .unwrap();
    assert_eq!(&recv_msg(&mut bob).await.body[..], b"m1");
    assert_eq!(&recv_msg(&mut bob).await.body[..], b"m2");
    expect_silence(&mut bob).await;
    queue_rows(dir.path(), 0).await;
}

/// Issue 10, item 10 (poison messages): a message over the frame limit is
/// refused by the client before sending, and one the relay refuses with
/// 1009 (its limit is lower than the client believed) gets a local
/// `rejected` / `frame_too_large` receipt, is never resent, and does not
/// hold up the messages behind it.
#[tokio::test]
async fn oversized_messages_are_refused_once_and_never_resent() {
    let relay = start(Limits {
        max_frame_bytes: 64 * 1024,
        ..Limits::default()
    })
    .await;
    let mut bob = client(&relay).await;
    // The client knows the limit: refused locally, nothing sent.
    let mut opts = ConnectOptions::new(relay.url());
    opts.max_frame_bytes = 64 * 1024;
    let careful = Client::connect(id(), opts).await.unwrap();
    match careful
        .send_plain(Dest::A2b(bob.address()), vec![0u8; 100 * 1024])
        .await
    {
        Err(w2w_client::ClientError::TooLarge { size, limit }) => {
            assert!(size > 100 * 1024);
            assert_eq!(limit, 64 * 1024);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let r = careful
        .send_plain(Dest::A2b(bob.address()), "small")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Delivered);
    assert_eq!(&recv_msg(&mut bob).await.body[..], b"small");

    // The client believes the default 1 MiB: the relay closes with 1009.
    let naive = client(&relay).await;
    let registrations = relay.metrics().registrations_total.load(Ordering::Relaxed);
    let big = naive.send_plain(Dest::A2b(bob.address()), vec![1u8; 100 * 1024]);
    let small = async {
        // Queued right behind the big one: `join!` polls `big` first (it
        // hands its frame to the driver), then this, which yields once so
        // `big` is polled again first. No timing involved (a sleep let a
        // fast machine answer the big one before this was sent).
        tokio::task::yield_now().await;
        naive.send_plain(Dest::A2b(bob.address()), "after").await
    };
    let (big, small) = tokio::time::timeout(T, async { tokio::join!(big, small) })
        .await
        .expect("both sends answered");
    let big = big.unwrap();
    assert_eq!(
        (big.status, big.reason),
        (Status::Rejected, ErrorCode::FrameTooLarge.as_u16())
    );
    assert_eq!(small.unwrap().status, Status::Delivered);
    assert_eq!(&recv_msg(&mut bob).await.body[..], b"after");
    // One reconnect, not a loop; and it stays that way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = relay.metrics().registrations_total.load(Ordering::Relaxed);
    assert_eq!(after - registrations, 1, "exactly one reconnect");
    // The lowered limit now refuses it locally.
    assert!(matches!(
        naive
            .send_plain(Dest::A2b(bob.address()), vec![1u8; 100 * 1024])
            .await,
        Err(w2w_client::ClientError::TooLarge { .. })
    ));
}

/// Issue 10 (11): a receiver that reconnects while messages for it are on
/// their way through the store got some of them twice on one connection
/// (handed over by the store writer and read again from the store by the
/// backlog reader). Each connection must see each message at most once, and
/// nothing may be lost across the reconnections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_receiver_never_gets_a_message_twice_on_one_connection() {
    let relay = start(no_rate_limit()).await;
    let sender = std::sync::Arc::new(client(&relay).await);
    let me = id();
    // Registered once, so messages sent while it is away are stored.
    let (ws, _) = {
        let mut ws = raw(&relay).await;
        register(&mut ws, &me, &relay.url(), Some(relay.relay_key()))
            .await
            .unwrap();
        (ws, ())
    };
    drop(ws);
    let to = me.address();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sending = {
        let (sender, stop, sent_so_far) = (sender.clone(), stop.clone(), sent_so_far.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for t in 0..4 {
                let (sender, stop, sent_so_far) =
                    (sender.clone(), stop.clone(), sent_so_far.clone());
                tasks.push(tokio::spawn(async move {
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let r = sender
                            .send(Dest::A2b(to), format!("{t}/{sent}"))
                            .await
                            .unwrap();
                        assert!(
                            matches!(r.status, Status::Delivered | Status::Queued),
                            "{r:?}"
                        );
                        sent += 1;
                        sent_so_far.fetch_add(1, Ordering::Relaxed);
                    }
                    sent
                }));
            }
            let mut sent = 0;
            for t in tasks {
                sent += t.await.unwrap();
            }
            sent
        })
    };
    let mut all = std::collections::HashSet::new();
    let mut twice = 0;
    const ROUNDS: usize = 30;
    // At least ROUNDS reconnections, and then until enough was sent (a
    // slow machine sends less per round).
    let mut sent = None;
    let mut round = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while sent.is_none() {
        if round >= ROUNDS
            && (sent_so_far.load(Ordering::Relaxed) > 100 || tokio::time::Instant::now() > deadline)
        {
            stop.store(true, Ordering::Relaxed);
            sent = Some((&mut sending).await.unwrap());
        }
        round += 1;
        let mut ws = raw(&relay).await;
        register(&mut ws, &me, &relay.url(), Some(relay.relay_key()))
            .await
            .unwrap();
        let mut here = std::collections::HashSet::new();
        // Read for a moment; the last round, once the sender is done,
        // until every message sent has arrived (then a moment more, for
        // any sent twice).
        let now = tokio::time::Instant::now();
        let mut end = match sent {
            None => now + Duration::from_millis(40),
            Some(n) if all.len() == n => now + Duration::from_millis(300),
            Some(_) => now + WAIT,
        };
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end, ws.next()).await {
            if !m.is_binary() {
                continue;
            }
            let b: Bytes = m.into_payload().into();
            if let Ok(RelayToClient::Msg(msg)) = RelayToClient::decode(&b) {
                if !here.insert(msg.id) {
                    twice += 1;
                }
                all.insert(msg.id);
                send_bin(&mut ws, ClientToRelay::Ack(vec![msg.id]).encode()).await;
                if Some(all.len()) == sent {
                    end = end.min(tokio::time::Instant::now() + Duration::from_millis(300));
                }
            }
        }
        let _ = ws.close().await;
    }
    let sent = sent.unwrap();
    assert_eq!(twice, 0, "messages handed twice on one connection");
    assert_eq!(all.len(), sent, "every receipted message arrived");
    assert!(sent > 100, "only {sent} messages were sent");
}

/// Issue 10 (6): registrations were never pruned, so throwaway ones grew
/// memory and the directory forever. One gone longer than `queue_ttl_ms`
/// with nothing queued is forgotten (then it is `no_route`, like one that
/// never registered); a connected one never is, however old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_gone_longer_than_the_queue_ttl_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_path_buf());
    cfg.limits = Limits {
        queue_ttl_ms: 1000,
        ..no_rate_limit()
    };
    cfg.federation.refresh_ms = 1000;
    let relay = Relay::start(cfg).await.unwrap();
    let stays = client(&relay).await;
    let gone = client(&relay).await;
    let gone_addr = gone.address();
    gone.close().await;
    let db = rusqlite::Connection::open(dir.path().join("w2w.sqlite")).unwrap();
    let rows = |a: Address| -> i64 {
        db.query_row(
            "SELECT count(*) FROM registrations WHERE address = ?1",
            [&a.0[..]],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(rows(gone_addr), 1);
    wait_until!("the registration is forgotten", rows(gone_addr) == 0);
    // Forgotten by the router too: no longer stored for, but no_route.
    // That happens after the store's delete is submitted (and so maybe
    // after it commits): wait for its record to leave the directory (the
    // last step) rather than sleep.
    wait_until!(
        "the forgotten address leaves the directory",
        relay.federation().directory_len() == 1
    );
    let r = stays.send(Dest::A2b(gone_addr), "late").await.unwrap();
    assert_eq!(r.status, Status::NoRoute, "{r:?}");
    // The connected one, registered as long ago, is kept and served.
    assert_eq!(rows(stays.address()), 1);
    assert_eq!(
        stays.send(Dest::A2a, "me").await.unwrap().status,
        Status::Delivered
    );
}

/// A client that ignores every `rate_limited` refusal is closed (4020)
/// after 10,000 in a row instead of being answered forever; others are
/// still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_rate_limit_refusals_is_closed() {
    let relay = start(Limits {
        rate_per_sec: 0,
        rate_burst: 1,
        ..Limits::default()
    })
    .await;
    let (mut ws, me) = raw_registered(&relay).await;
    let frame = |i: u32| {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        ClientToRelay::Msg(Msg {
            flags: 0,
            id: MsgId(id),
            from: me.address(),
            dest: Dest::A2a,
            payload: Bytes::from_static(b"x"),
        })
        .encode()
    };
    // Sent without reading; the relay's answers wait in its queue for us.
    let sending = async {
        for i in 0..10_100u32 {
            if ws.send(Message::binary(frame(i))).await.is_err() {
                break;
            }
        }
        ws
    };
    let mut ws = tokio::time::timeout(Duration::from_secs(60), sending)
        .await
        .expect("sending took too long");
    let mut code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Some((c, _)) = m.as_close() {
            code = Some(u16::from(c));
            break;
        }
    }
    assert_eq!(code, Some(ErrorCode::RateLimited.close_code()));
    // Someone else is still served: its message reaches it. (A client that
    // sends at once may still be taking its stored backlog, so the message
    // goes through the store; on a loaded machine that can outlast the ACK
    // deadline and the receipt says `queued`: either is a served message.)
    let mut other = client(&relay).await;
    let status = other.send(Dest::A2a, "fine").await.unwrap().status;
    assert!(
        matches!(status, Status::Delivered | Status::Queued),
        "{status:?}"
    );
    let got = tokio::time::timeout(T, other.recv())
        .await
        .expect("no message");
    assert!(
        matches!(&got, Some(w2w_client::Event::Msg(m)) if m.body.as_ref() == b"fine"),
        "{got:?}"
    );
}

#[tokio::test]
async fn frames_of_one_burst_are_answered_in_order() {
    // The relay hands a burst's MSGs to its core in one go, at the end of
    // the burst; what the connection answers itself (a refusal over the
    // rate limit, a request's response) must still come after the core's
    // answers to the frames before it.
    let relay = start(Limits {
        rate_per_sec: 0,
        rate_burst: 3,
        ..Limits::default()
    })
    .await;
    let (mut ws, me) = raw_registered(&relay).await;
    let msg = |i: u8| Msg {
        flags: 0,
        id: MsgId([i; 16]),
        from: me.address(),
        dest: Dest::A2b(id().address()),
        payload: Bytes::from_static(b"?"),
    };
    // Three the core answers `no_route`, a fourth refused by the
    // connection (`rate_limited`), then a request refused too.
    for i in 1..=4 {
        ws.feed(Message::binary(msg(i).encode())).await.unwrap();
    }
    let req = ClientToRelay::Request(w2w_proto::frame::Request {
        req_id: 9,
        op: RequestOp::Lookup(me.address()),
    });
    ws.feed(Message::binary(req.encode())).await.unwrap();
    ws.flush().await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        match next(&mut ws).await {
            Ok(RelayToClient::Receipt(r)) => seen.push((r.id.0[0], r.reason)),
            Ok(RelayToClient::Response(r)) => {
                seen.push((r.req_id as u8, r.result.err().unwrap_or(0)))
            }
            other => panic!("expected a receipt or a response, got {other:?}"),
        }
    }
    let (no_route, limited) = (ErrorCode::NoRoute.as_u16(), ErrorCode::RateLimited.as_u16());
    if relay.metrics().shards.load(Ordering::Relaxed) > 1 {
        // Each shard answers its part of the burst: the core's answers may
        // come in another order among themselves, never after the
        // connection's own.
        seen[..3].sort();
    }
    assert_eq!(
        seen,
        vec![
            (1, no_route),
            (2, no_route),
            (3, no_route),
            (4, limited),
            (9, limited)
        ]
    );
}

/// Identities whose addresses fall in each of `count` shards, in order.
fn one_per_shard(count: usize) -> Vec<Identity> {
    let mut found: Vec<Option<Identity>> = vec![None; count];
    while found.iter().any(Option::is_none) {
        let i = id();
        let s = w2w_core::shard::shard_of(&i.address(), count);
        if found[s].is_none() {
            found[s] = Some(i);
        }
    }
    found.into_iter().flatten().collect()
}

/// A relay split over three shards (`[federation] shards = 3`): an a2b
/// between shards, an a2g split three ways (one RECEIPT, entries in the
/// sender's order), an a2n to every shard's clients, and a message stored
/// for an offline recipient of another shard and the NOTICE DELIVERED
/// that crosses back to the sender's.
#[tokio::test]
async fn a_sharded_relay_splits_and_merges_and_keeps_every_guarantee() {
    let mut cfg = RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap());
    cfg.federation.shards = 3;
    let relay = Relay::start(cfg).await.unwrap();
    let ids = one_per_shard(3);
    let connect = |i: &Identity| Client::connect(i.clone(), ConnectOptions::new(relay.url()));
    let mut alice = connect(&ids[0]).await.unwrap();
    let mut b1 = connect(&ids[1]).await.unwrap();
    let mut b2 = connect(&ids[2]).await.unwrap();
    let r = alice
        .send(Dest::A2b(ids[2].address()), "across")
        .await
        .unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 1), "{r:?}");
    assert_eq!(&recv_msg(&mut b2).await.body[..], b"across");
    // One a2g, three shards, one receipt in the order alice listed.
    let order = vec![ids[2].address(), ids[0].address(), ids[1].address()];
    let r = alice.send(Dest::A2g(order.clone()), "split").await.unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 3), "{r:?}");
    let to: Vec<Address> = r.entries.iter().map(|e| e.to).collect();
    assert_eq!(to, order);
    for c in [&mut alice, &mut b1, &mut b2] {
        assert_eq!(&recv_msg(c).await.body[..], b"split");
    }
    let r = b1.send(Dest::A2n(Scope::Relay), "everyone").await.unwrap();
    assert_eq!((r.status, r.delivered), (Status::Delivered, 3), "{r:?}");
    for c in [&mut alice, &mut b1, &mut b2] {
        assert_eq!(&recv_msg(c).await.body[..], b"everyone");
        expect_silence(c).await;
    }
    // Stored for b2 (another shard than alice's) while it is away; its
    // delivery is noticed to alice through her shard.
    b2.close().await;
    wait_until!(
        "the relay noticed b2 left",
        relay.metrics().registered.load(Ordering::Relaxed) == 2
    );
    let r = alice
        .send(Dest::A2b(ids[2].address()), "later")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Queued, "{r:?}");
    let mut b2 = connect(&ids[2]).await.unwrap();
    assert_eq!(&recv_msg(&mut b2).await.body[..], b"later");
    let notice = recv_notice(&mut alice).await;
    assert_eq!(
        notice,
        Notice::Delivered {
            id: r.id,
            to: ids[2].address()
        }
    );
    assert_eq!(relay.metrics().shards.load(Ordering::Relaxed), 3);
}
