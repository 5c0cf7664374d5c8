//! Nothing acknowledged is lost: messages receipted "queued" survive a
//! SIGKILL of the relay process and arrive, in order and once, when the
//! recipient comes back to the restarted relay.

use std::time::Duration;

use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::{RequestOp, ResponseBody, Status};
use w2w_proto::{Dest, Identity};

mod common;
use common::{port, serve};

fn start(data: &std::path::Path, listen: &str) -> common::ServeProc {
    serve(data, listen, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_sigkill() {
    const N: usize = 100;
    let data = tempfile::tempdir().unwrap();
    let relay = start(data.path(), "127.0.0.1:0");
    let url = relay.url.clone();
    let bob_id = Identity::from_seed(rand::random());
    // Bob registers once, then goes offline.
    Client::connect(bob_id.clone(), ConnectOptions::new(&url))
        .await
        .unwrap()
        .close()
        .await;

    let alice = std::sync::Arc::new(
        Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(&url),
        )
        .await
        .unwrap(),
    );
    // Wait until the relay has noticed Bob left (not a fixed sleep).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while alice
        .request(RequestOp::Lookup(bob_id.address()))
        .await
        .unwrap()
        != ResponseBody::Lookup(None)
    {
        assert!(std::time::Instant::now() < deadline, "Bob still online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Numbered sends, each answered before the next (so send order is
    // defined); every receipt must say "queued".
    for i in 0..N {
        let r = alice
            .send(Dest::A2b(bob_id.address()), format!("msg {i:03}"))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Queued, "{r:?}");
    }

    // SIGKILL: no shutdown path runs.
    let port = port(&url);
    drop(relay);
    let _relay = start(data.path(), &format!("127.0.0.1:{port}"));

    let mut bob = Client::connect(bob_id, ConnectOptions::new(&url))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < N {
        match tokio::time::timeout(Duration::from_secs(10), bob.recv()).await {
            Ok(Some(Event::Msg(m))) => got.push(String::from_utf8(m.body.to_vec()).unwrap()),
            Ok(Some(_)) => {}
            other => panic!("after {} messages: {other:?}", got.len()),
        }
    }
    let want: Vec<String> = (0..N).map(|i| format!("msg {i:03}")).collect();
    assert_eq!(got, want, "all arrive, in send order");
    // And nothing twice.
    assert!(tokio::time::timeout(Duration::from_millis(300), bob.recv())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_nothing_and_duplicates_nothing() {
    const N: usize = 2000;
    let data = tempfile::tempdir().unwrap();
    let relay = start(data.path(), "127.0.0.1:0");
    let url = relay.url.clone();
    let port = port(&url);
    let mut bob = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(&url),
    )
    .await
    .unwrap();
    let bob_addr = bob.address();
    let alice = std::sync::Arc::new(
        Client::connect(
            Identity::from_seed(rand::random()),
            ConnectOptions::new(&url),
        )
        .await
        .unwrap(),
    );
    let receipted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sends = Vec::new();
    for i in 0..N {
        let (a, r) = (alice.clone(), receipted.clone());
        sends.push(tokio::spawn(async move {
            let rc = a.send(Dest::A2b(bob_addr), format!("burst {i:04}")).await;
            r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rc
        }));
    }
    // Kill the relay once part of the burst has been receipted.
    while receipted.load(std::sync::atomic::Ordering::Relaxed) < N / 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(relay); // SIGKILL
    let at_kill = receipted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(at_kill < N, "the burst finished before the kill");
    eprintln!("killed the relay with {at_kill} of {N} sends receipted");
    let _relay = start(data.path(), &format!("127.0.0.1:{port}"));

    // Every send completes with a receipt (resent after the reconnect).
    for s in sends {
        let r = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("a send never got its receipt")
            .unwrap()
            .unwrap();
        assert!(
            matches!(r.status, Status::Delivered | Status::Queued),
            "{r:?}"
        );
    }
    // Bob sees each message exactly once.
    let mut seen = std::collections::HashMap::<String, usize>::new();
    while seen.len() < N {
        match tokio::time::timeout(Duration::from_secs(20), bob.recv()).await {
            Ok(Some(Event::Msg(m))) => {
                *seen
                    .entry(String::from_utf8(m.body.to_vec()).unwrap())
                    .or_default() += 1
            }
            Ok(Some(_)) => {}
            other => panic!("after {} distinct messages: {other:?}", seen.len()),
        }
    }
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), bob.recv()).await {
        if let Event::Msg(m) = ev {
            *seen
                .entry(String::from_utf8(m.body.to_vec()).unwrap())
                .or_default() += 1;
        }
    }
    for i in 0..N {
        assert_eq!(seen.get(&format!("burst {i:04}")), Some(&1), "burst {i:03}");
    }
    assert_eq!(seen.len(), N);
}
