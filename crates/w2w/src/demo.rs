//! `w2w demo`: three federated relays in a line, A — B — C, on loopback.
//! Clients on A and C exchange a2b, a2g and a2n; every hop is printed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::sync::mpsc;
use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::{MsgId, Receipt, Scope};
use w2w_proto::{Address, Dest, Identity};
use w2w_server::{HopEvent, Relay, RelayConfig};

#[derive(Args)]
pub struct DemoArgs {
    /// Keep the relays running after the demo (Ctrl-C to stop).
    #[arg(long)]
    keep: bool,
}

struct Names(HashMap<Address, String>);

impl Names {
    fn of(&self, a: &Address) -> String {
        self.0.get(a).cloned().unwrap_or_else(|| a.short())
    }
}

async fn relay(peers: Vec<String>) -> Result<Relay> {
    let mut cfg = RelayConfig::new(Identity::from_seed(rand::random()), "127.0.0.1:0".parse()?);
    cfg.federation.peers = peers;
    Ok(Relay::start(cfg).await?)
}

async fn recv_body(c: &mut Client) -> Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
            Ok(Some(Event::Msg(m))) => return Ok(String::from_utf8_lossy(&m.body).into_owned()),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("connection ended"),
            Err(_) => bail!("no message within 5 s"),
        }
    }
}

/// Prints the hops of message `id` from the origin relay outwards.
fn print_hops(events: &[HopEvent], id: MsgId, names: &Names) {
    let mine: Vec<&HopEvent> = events
        .iter()
        .filter(|e| match e {
            HopEvent::FromClient { id: i, .. }
            | HopEvent::ToPeer { id: i, .. }
            | HopEvent::ToClient { id: i, .. } => *i == id,
        })
        .collect();
    let Some((origin, from)) = mine.iter().find_map(|e| match e {
        HopEvent::FromClient { relay, from, .. } => Some((*relay, *from)),
        _ => None,
    }) else {
        return;
    };
    println!("    {} ⇒ relay {}", names.of(&from), names.of(&origin));
    let mut queue = VecDeque::from([(origin, 0usize)]);
    let mut visited = vec![origin];
    while let Some((r, depth)) = queue.pop_front() {
        for e in &mine {
            match e {
                HopEvent::ToClient { relay, to, .. } if *relay == r => {
                    println!(
                        "    {}relay {} ⇒ {}",
                        "  ".repeat(depth),
                        names.of(relay),
                        names.of(to)
                    );
                }
                HopEvent::ToPeer { relay, peer, .. } if *relay == r => {
                    println!(
                        "    {}relay {} → relay {}",
                        "  ".repeat(depth),
                        names.of(relay),
                        names.of(peer)
                    );
                    if !visited.contains(peer) {
                        visited.push(*peer);
                        queue.push_back((*peer, depth + 1));
                    }
                }
                _ => {}
            }
        }
    }
}

/// Takes hop events until message `id`'s whole path is in: its origin,
/// both links (A → B, B → C) and `deliveries` deliveries to clients. The
/// relays report hops on their own tasks, so they may come a little after
/// the message itself; waited for (at most 5 s), not guessed with a sleep.
async fn collect_hops(
    rx: &mut mpsc::UnboundedReceiver<HopEvent>,
    events: &mut Vec<HopEvent>,
    id: MsgId,
    deliveries: usize,
) {
    let complete = |events: &[HopEvent]| {
        let (mut origin, mut links, mut delivered) = (false, HashSet::new(), 0);
        for e in events {
            match e {
                HopEvent::FromClient { id: i, .. } if *i == id => origin = true,
                HopEvent::ToPeer {
                    id: i, relay, peer, ..
                } if *i == id => {
                    links.insert((*relay, *peer));
                }
                HopEvent::ToClient { id: i, .. } if *i == id => delivered += 1,
                _ => {}
            }
        }
        origin && links.len() >= 2 && delivered >= deliveries
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !complete(events) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => events.push(e),
            _ => break,
        }
    }
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
}

fn print_receipt(r: &Receipt, names: &Names) {
    let mut line = format!(
        "    receipt: {} (delivered to {})",
        r.status.as_str(),
        r.delivered
    );
    for e in &r.entries {
        line.push_str(&format!(", {} {}", names.of(&e.to), e.status.as_str()));
    }
    println!("{line}");
}

pub async fn run(a: DemoArgs) -> Result<ExitCode> {
    println!("w2w demo: three relays in a line, A — B — C, on 127.0.0.1\n");
    let ra = relay(vec![]).await?;
    let rb = relay(vec![ra.url()]).await?;
    let rc = relay(vec![rb.url()]).await?;
    let mut names = Names(HashMap::new());
    for (n, r) in [("A", &ra), ("B", &rb), ("C", &rc)] {
        names.0.insert(r.relay_key(), n.to_string());
        println!("  relay {n}  {}  key {}…", r.url(), r.relay_key().short());
    }
    // Wait until A can reach C through B (quick, but give a loaded
    // machine its time).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(ra.federation().reachable().contains(&rc.relay_key())
        && rc.federation().reachable().contains(&ra.relay_key()))
    {
        if tokio::time::Instant::now() >= deadline {
            bail!("relays did not link up within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  links    A — B — C (B peers with A, C peers with B)\n");

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    for r in [&ra, &rb, &rc] {
        let mut sub = r.federation().subscribe();
        let tx = ev_tx.clone();
        tokio::spawn(async move {
            while let Ok(e) = sub.recv().await {
                if tx.send(e).is_err() {
                    break;
                }
            }
        });
    }

    let alice = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(ra.url()),
    )
    .await?;
    let mut carol = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(rc.url()),
    )
    .await?;
    let mut dave = Client::connect(
        Identity::from_seed(rand::random()),
        ConnectOptions::new(rc.url()),
    )
    .await?;
    for (n, c) in [("alice", &alice), ("carol", &carol), ("dave", &dave)] {
        names.0.insert(c.address(), n.to_string());
    }
    println!("  alice {}… on relay A", alice.address().short());
    println!("  carol {}… on relay C", carol.address().short());
    println!("  dave  {}… on relay C", dave.address().short());
    // Presence records travel A ← B ← C; wait until A knows carol and dave.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ra.federation().directory_len() < 3 {
        if tokio::time::Instant::now() >= deadline {
            bail!("relay A did not learn where carol and dave are within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut events = Vec::new();
    let mut ok = true;
    let step = |title: &str| println!("\n▸ {title}");

    step("a2b  alice → carol");
    let r = alice
        .send(Dest::A2b(carol.address()), "hello carol, from relay A")
        .await?;
    let got = recv_body(&mut carol).await.context("carol")?;
    println!("    carol got: {got:?}");
    collect_hops(&mut ev_rx, &mut events, r.id, 1).await;
    print_hops(&events, r.id, &names);
    print_receipt(&r, &names);
    ok &= r.status == w2w_proto::frame::Status::Delivered;

    step("a2g  alice → [carol, dave]");
    let r = alice
        .send(
            Dest::A2g(vec![carol.address(), dave.address()]),
            "hello group",
        )
        .await?;
    println!("    carol got: {:?}", recv_body(&mut carol).await?);
    println!("    dave  got: {:?}", recv_body(&mut dave).await?);
    collect_hops(&mut ev_rx, &mut events, r.id, 2).await;
    print_hops(&events, r.id, &names);
    print_receipt(&r, &names);
    ok &= r.status == w2w_proto::frame::Status::Delivered && r.delivered == 2;

    step("a2n  alice → everyone in the federation");
    let mut alice = alice;
    let r = alice
        .send(Dest::A2n(Scope::Federation), "hello everyone")
        .await?;
    println!("    alice got: {:?}", recv_body(&mut alice).await?);
    println!("    carol got: {:?}", recv_body(&mut carol).await?);
    println!("    dave  got: {:?}", recv_body(&mut dave).await?);
    collect_hops(&mut ev_rx, &mut events, r.id, 3).await;
    print_hops(&events, r.id, &names);
    print_receipt(&r, &names);
    ok &= r.delivered == 3;

    println!();
    if ok {
        println!(
            "✓ every message arrived once, across two relay hops, with a receipt back to alice."
        );
    } else {
        println!("✗ something did not arrive as expected (see above).");
    }
    if a.keep {
        println!("relays still running; Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
    }
    alice.close().await;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
