//! The operator's view of a running relay: `/metrics` beyond the counters
//! (uptime, version, peer links, the stored queue, latency) and HEAD.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use w2w_client::{Client, ConnectOptions};
use w2w_proto::frame::Status;
use w2w_proto::{Dest, Identity};
use w2w_server::{Relay, RelayConfig};

const WAIT: Duration = Duration::from_secs(20);

fn id() -> Identity {
    Identity::from_seed(rand::random())
}

fn config() -> RelayConfig {
    RelayConfig::new(id(), "127.0.0.1:0".parse().unwrap())
}

/// One HTTP/1.1 request; returns the status, the headers and the body.
async fn http(relay: &Relay, method: &str, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(relay.local_addr())
        .await
        .unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_owned(), body.to_owned())
}

async fn metrics(relay: &Relay) -> String {
    let (status, _, body) = http(relay, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Relay `a` configured to peer with a live relay `b` and with a URL
/// where nothing listens: (a, b, that URL).
async fn peered_with_one_dead() -> (Relay, Relay, String) {
    let b = Relay::start(config()).await.unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("ws://{}/", dead.local_addr().unwrap());
    drop(dead);
    let mut cfg = config();
    cfg.federation.peers = vec![b.url(), dead_url.clone()];
    let a = Relay::start(cfg).await.unwrap();
    (a, b, dead_url)
}

/// Issue 15: `/metrics` had no uptime, version, per-peer link state,
/// stored-queue size or latency histogram.
#[tokio::test]
async fn metrics_show_uptime_version_peer_links_queue_and_registration_latency() {
    let (a, b, dead_url) = peered_with_one_dead().await;

    // The link to b comes up; the dead one stays down.
    let up = format!(
        "w2w_peer_link_up{{peer=\"{}\",url=\"{}\",configured=\"true\"}} 1",
        b.relay_key().short(),
        b.url()
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut m = metrics(&a).await;
    while !m.contains(&up) {
        assert!(tokio::time::Instant::now() < deadline, "no {up}\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = metrics(&a).await;
    }
    assert!(
        m.contains(&format!(
            "w2w_peer_link_up{{peer=\"\",url=\"{dead_url}\",configured=\"true\"}} 0"
        )),
        "{m}"
    );
    // b sees a's link as one it did not dial.
    let mb = metrics(&b).await;
    assert!(
        mb.contains(&format!("peer=\"{}\"", a.relay_key().short()))
            && mb.contains("configured=\"false\"} 1"),
        "{mb}"
    );
    assert!(
        m.contains(&format!(
            "w2w_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    assert!(sample(&m, "w2w_uptime_seconds ").is_some(), "{m}");

    // A message for an address that registered and left is stored.
    assert_eq!(sample(&m, "w2w_store_queued_messages "), Some(0.0), "{m}");
    let gone = id();
    Client::connect(gone.clone(), ConnectOptions::new(a.url()))
        .await
        .unwrap()
        .close()
        .await;
    let sender = Client::connect(id(), ConnectOptions::new(a.url()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = sender
            .send_plain(Dest::A2b(gone.address()), "for later")
            .await
            .unwrap();
        if r.status == Status::Queued {
            break;
        }
        // Still connected as far as the relay knows: delivered, try again.
        assert!(tokio::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&a).await;
    assert_eq!(sample(&m, "w2w_store_queued_messages "), Some(1.0), "{m}");
    assert!(
        sample(&m, "w2w_store_queued_bytes ").unwrap() >= 512.0,
        "{m}"
    );

    // Two registrations, each in the histogram.
    assert!(
        m.contains("# TYPE w2w_registration_seconds histogram"),
        "{m}"
    );
    assert_eq!(
        sample(&m, "w2w_registration_seconds_bucket{le=\"+Inf\"} "),
        Some(2.0),
        "{m}"
    );
    assert_eq!(sample(&m, "w2w_registration_seconds_count "), Some(2.0));
    assert!(sample(&m, "w2w_registration_seconds_sum ").unwrap() > 0.0);

    // The store's transactions (the registrations, the queued message)
    // are timed.
    assert!(
        m.contains("# TYPE w2w_store_commit_seconds histogram"),
        "{m}"
    );
    assert!(
        sample(&m, "w2w_store_commit_seconds_count ").unwrap() >= 3.0,
        "{m}"
    );
}

/// Issue 15: HEAD answered 404 on every endpoint but `/healthz`.
#[tokio::test]
async fn head_works_on_every_get_endpoint() {
    let relay = Relay::start(config()).await.unwrap();
    for path in ["/healthz", "/metrics", "/.well-known/w2w", "/", "/w2w.js"] {
        let (status, head, body) = http(&relay, "HEAD", path).await;
        assert_eq!(status, 200, "HEAD {path}: {head}");
        assert!(body.is_empty(), "HEAD {path} sent a body: {body:?}");
    }
}

/// Issue 15: there was no status page. `/status` is one HTML page without
/// script: the relay, its connections, its peer links and their state,
/// the queue, and refusals by reason.
#[tokio::test]
async fn status_page_shows_peers_queue_connections_and_refusals() {
    let (a, b, dead_url) = peered_with_one_dead().await;
    let _c = Client::connect(id(), ConnectOptions::new(a.url()))
        .await
        .unwrap();
    // One refusal: a text frame before registering.
    {
        use futures_util::{SinkExt, StreamExt};
        let mut ws = w2w_client::connect_raw(&ConnectOptions::new(a.url()))
            .await
            .unwrap();
        ws.send(tokio_websockets::Message::text("hello"))
            .await
            .unwrap();
        let _ = tokio::time::timeout(WAIT, async { while ws.next().await.is_some() {} }).await;
    }
    let up_row = format!(
        "<td class=\"up\">up</td><td><code>{}</code></td><td>{}</td>",
        b.relay_key().short(),
        b.url()
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    let page = loop {
        let (status, head, page) = http(&a, "GET", "/status").await;
        assert_eq!(status, 200);
        assert!(head.contains("text/html"), "{head}");
        if page.contains(&up_row) && page.contains("<td>text_frame</td>") {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(page.contains(&a.relay_key().to_hex()), "{page}");
    assert!(
        page.contains(&format!(
            "<td class=\"down\">down</td><td><code>?</code></td><td>{dead_url}</td>"
        )),
        "{page}"
    );
    assert!(
        page.contains("<th>registered clients</th><td class=\"n\">1</td>"),
        "{page}"
    );
    assert!(page.contains("<th>messages queued on disk</th>"), "{page}");
    assert!(
        page.contains("<td>text_frame</td><td class=\"n\">8</td><td class=\"n\">1</td>"),
        "{page}"
    );
    assert!(!page.contains("<script"), "no script on the status page");
}
