//! wss with a self-signed certificate generated at test time, and a
//! certificate replaced on disk while clients are connected.

use std::path::Path;
use std::time::Duration;

use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::Status;
use w2w_proto::{Dest, Identity};
use w2w_server::{Relay, RelayConfig, TlsPaths};

/// Writes a fresh self-signed certificate for 127.0.0.1; returns its PEM.
fn write_cert(dir: &Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = ck.cert.pem();
    // Write the key first and the certificate last via rename, so the relay
    // never sees a new certificate with an old key.
    std::fs::write(dir.join("key.tmp"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.tmp"), &cert).unwrap();
    std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
    cert.into_bytes()
}

fn opts(relay: &Relay, trust: &[u8]) -> ConnectOptions {
    let mut o = ConnectOptions::new(relay.url());
    o.extra_roots_pem = Some(trust.to_vec());
    o.timeout = Duration::from_secs(5);
    o
}

#[tokio::test]
async fn wss_and_certificate_reload_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let cert_a = write_cert(dir.path());
    let mut cfg = RelayConfig::new(
        Identity::from_seed(rand::random()),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.tls = Some(TlsPaths {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        reload_interval_ms: 50,
    });
    let relay = Relay::start(cfg).await.unwrap();
    assert!(relay.url().starts_with("wss://127.0.0.1:"));

    let mut live = Client::connect(Identity::from_seed(rand::random()), opts(&relay, &cert_a))
        .await
        .unwrap();
    let r = live.send(Dest::A2a, "over tls").await.unwrap();
    assert_eq!(r.status, Status::Delivered);

    // A client that trusts nothing extra is refused by TLS verification.
    let mut untrusting = ConnectOptions::new(relay.url());
    untrusting.timeout = Duration::from_secs(5);
    assert!(
        Client::connect(Identity::from_seed(rand::random()), untrusting)
            .await
            .is_err()
    );

    // Replace the certificate on disk.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cert_b = write_cert(dir.path());
    // Polled every 50 ms; picked up within 20 s however loaded the machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut reloaded = false;
    while !reloaded && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reloaded = Client::connect(Identity::from_seed(rand::random()), opts(&relay, &cert_b))
            .await
            .is_ok();
    }
    assert!(reloaded, "new certificate not picked up");
    // New handshakes no longer present the old certificate...
    assert!(
        Client::connect(Identity::from_seed(rand::random()), opts(&relay, &cert_a))
            .await
            .is_err()
    );
    // ...and the connection made under the old one is still alive.
    let r = live.send(Dest::A2a, "still here").await.unwrap();
    assert_eq!(r.status, Status::Delivered);
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .unwrap()
        {
            Some(Event::Msg(m)) => bodies.push(m.body),
            Some(_) => {}
            None => panic!("live connection dropped: {:?}", live.close_reason()),
        }
    }
    assert_eq!(&bodies[1][..], b"still here");
}
