//! Relays route what they cannot read: distinctive plaintexts sent through
//! two federated relay processes never appear in any WebSocket frame the
//! relays receive or send, nor in their data directories. Every connection
//! (client → relay A, relay B → relay A, client → relay B) goes through a
//! recording TCP proxy; the recording is parsed as WebSocket frames and
//! unmasked, so masking cannot hide a plaintext. A plain (unsealed) control
//! message must be visible in the same recordings, proving they see payloads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use w2w_client::{Client, ConnectOptions, Event, Security};
use w2w_proto::frame::{RequestOp, ResponseBody, Status};
use w2w_proto::{Dest, Identity};

mod common;

fn serve(data: &std::path::Path, peers: &[String]) -> (common::ServeProc, String) {
    let extra: Vec<String> = peers
        .iter()
        .flat_map(|p| ["--peer".to_string(), p.clone()])
        .collect();
    let p = common::serve(data, "127.0.0.1:0", &extra);
    let url = p.url.clone();
    (p, url)
}

/// Bytes seen by a proxy, per direction: (client → server, server → client).
type Tape = Arc<Mutex<(Vec<u8>, Vec<u8>)>>;

/// A TCP proxy to `target` that records both directions; returns its URL.
/// Bytes are recorded before they are passed on, so whatever an endpoint
/// has received is already on the tape (no settling time to guess).
async fn proxy(target: String) -> (String, Tape) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", l.local_addr().unwrap());
    let tape: Tape = Arc::default();
    let t = tape.clone();
    let target = target
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_string();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                continue;
            };
            let (mut ir, mut iw) = inbound.into_split();
            let (mut or, mut ow) = outbound.into_split();
            let (t1, t2) = (t.clone(), t.clone());
            tokio::spawn(async move {
                let mut b = [0u8; 16384];
                while let Ok(n) = ir.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    t1.lock().unwrap().0.extend_from_slice(&b[..n]);
                    if ow.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut b = [0u8; 16384];
                while let Ok(n) = or.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    t2.lock().unwrap().1.extend_from_slice(&b[..n]);
                    if iw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, tape)
}

/// Skips the HTTP upgrade, then parses WebSocket frames and returns their
/// unmasked payloads concatenated.
fn ws_payloads(stream: &[u8]) -> Vec<u8> {
    let Some(start) = stream.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut s = &stream[start + 4..];
    let mut out = Vec::new();
    while s.len() >= 2 {
        let masked = s[1] & 0x80 != 0;
        let (len, mut at) = match s[1] & 0x7f {
            126 if s.len() >= 4 => (u16::from_be_bytes([s[2], s[3]]) as usize, 4),
            127 if s.len() >= 10 => (
                u64::from_be_bytes(s[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n if n < 126 => (n as usize, 2),
            _ => break,
        };
        let mut key = [0u8; 4];
        if masked {
            if s.len() < at + 4 {
                break;
            }
            key.copy_from_slice(&s[at..at + 4]);
            at += 4;
        }
        if s.len() < at + len {
            break;
        }
        out.extend(s[at..at + len].iter().enumerate().map(|(i, b)| {
            if masked {
                b ^ key[i % 4]
            } else {
                *b
            }
        }));
        s = &s[at + len..];
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn recv(c: &mut Client) -> w2w_client::Received {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.recv())
            .await
            .unwrap()
        {
            Some(Event::Msg(m)) => return m,
            Some(_) => continue,
            None => panic!("connection ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_never_see_sealed_plaintext() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let (_a, url_a) = serve(dir_a.path(), &[]);
    let (link_url, link_tape) = proxy(url_a.clone()).await;
    let (_b, url_b) = serve(dir_b.path(), &[link_url]);
    let (alice_url, alice_tape) = proxy(url_a).await;
    let (bob_url, bob_tape) = proxy(url_b).await;

    let mut alice = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&alice_url),
    )
    .await
    .unwrap();
    let mut bob = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&bob_url),
    )
    .await
    .unwrap();
    // Wait until alice's relay knows where bob is.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        alice
            .request(RequestOp::Lookup(bob.address()))
            .await
            .unwrap(),
        ResponseBody::Lookup(Some(_))
    ) {
        assert!(Instant::now() < deadline, "federation did not converge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let secrets: Vec<String> = (0..3)
        .map(|i| format!("TOP-SECRET-{i}-{}", hex::encode(rand::random::<[u8; 8]>())))
        .collect();
    let r = alice
        .send(Dest::A2b(bob.address()), &secrets[0])
        .await
        .unwrap();
    assert_eq!(r.status, Status::Delivered);
    let r = alice
        .send(Dest::A2g(vec![bob.address(), alice.address()]), &secrets[1])
        .await
        .unwrap();
    assert_eq!(r.status, Status::Delivered);
    let r = alice.send(Dest::A2a, &secrets[2]).await.unwrap();
    assert_eq!(r.status, Status::Delivered);
    let control = format!("PLAIN-CONTROL-{}", hex::encode(rand::random::<[u8; 8]>()));
    let r = alice
        .send_plain(Dest::A2b(bob.address()), control.clone())
        .await
        .unwrap();
    assert_eq!(r.status, Status::Delivered);

    // Bob reads the sealed messages and the plain one.
    let m = recv(&mut bob).await;
    assert_eq!(
        (m.body.as_ref(), m.security),
        (secrets[0].as_bytes(), Security::Sealed)
    );
    let m = recv(&mut bob).await;
    assert_eq!(
        (m.body.as_ref(), m.security),
        (secrets[1].as_bytes(), Security::Sealed)
    );
    let m = recv(&mut bob).await;
    assert_eq!(
        (m.body.as_ref(), m.security),
        (control.as_bytes(), Security::Plain)
    );
    assert_eq!(recv(&mut alice).await.body, secrets[1].as_bytes());
    assert_eq!(recv(&mut alice).await.body, secrets[2].as_bytes());
    // Every hop the control took is on its tape by now (recorded before
    // passing it on), however slow the machine.

    let mut frames = Vec::new();
    for (name, tape) in [
        ("alice↔A", &alice_tape),
        ("B↔A link", &link_tape),
        ("bob↔B", &bob_tape),
    ] {
        let t = tape.lock().unwrap();
        let seen = [ws_payloads(&t.0), ws_payloads(&t.1)].concat();
        assert!(!seen.is_empty(), "{name}: nothing recorded");
        for s in &secrets {
            assert!(
                !contains(&seen, s.as_bytes()),
                "{name} carried plaintext {s}"
            );
        }
        frames.push(seen);
    }
    // The control proves the recordings see payloads: plain text is visible
    // on every hop it took.
    for (i, seen) in frames.iter().enumerate() {
        assert!(
            contains(seen, control.as_bytes()),
            "capture {i} missed the plain control"
        );
    }
    // Nor is any secret in either relay's files (SQLite, WAL, keys).
    for dir in [dir_a.path(), dir_b.path()] {
        for entry in walk(dir) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            for s in &secrets {
                assert!(
                    !contains(&bytes, s.as_bytes()),
                    "{} holds plaintext",
                    entry.display()
                );
            }
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
