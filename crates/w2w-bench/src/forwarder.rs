//! The bare forwarder: the practical bound for any relay here.
//!
//! Built on the same WebSocket crate as the w2w relay (tokio-websockets),
//! with the same shape (one task per connection that batches its writes),
//! but nothing else: no handshake, no signatures, no receipts, no ACKs, no
//! store. A client's first binary message is its 32-byte address; every
//! later one starts with a 32-byte destination and is passed on unchanged
//! (the same buffer) to the connection registered under it: one read and
//! one write per message. Messages for unknown destinations are dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::Result;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_websockets::Message;

type Table = Arc<RwLock<HashMap<[u8; 32], mpsc::UnboundedSender<Bytes>>>>;

/// Serves until killed (or until stdin closes, so a dead parent leaves no
/// orphan). Prints `LISTENING ws://ADDR` once it accepts connections.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("LISTENING ws://{}", listener.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    let table: Table = Default::default();
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let table = table.clone();
        tokio::spawn(async move {
            let _ = connection(tcp, table).await;
        });
    }
}

async fn connection(tcp: tokio::net::TcpStream, table: Table) -> Result<()> {
    let (_req, mut ws) = tokio_websockets::ServerBuilder::new().accept(tcp).await?;
    let hello: Bytes = match ws.next().await {
        Some(Ok(m)) if m.is_binary() => m.into_payload().into(),
        _ => return Ok(()),
    };
    let Ok(me) = <[u8; 32]>::try_from(&hello[..]) else {
        return Ok(());
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    table
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(me, tx);
    loop {
        tokio::select! {
            Some(first) = rx.recv() => {
                ws.feed(Message::binary(first)).await?;
                let mut n = 1;
                while n < 64 {
                    let Ok(f) = rx.try_recv() else { break };
                    ws.feed(Message::binary(f)).await?;
                    n += 1;
                }
                ws.flush().await?;
            }
            m = ws.next() => {
                let Some(Ok(m)) = m else { break };
                if !m.is_binary() {
                    continue;
                }
                let b: Bytes = m.into_payload().into();
                if b.len() < 32 {
                    continue;
                }
                let to = table
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&b[..32])
                    .cloned();
                if let Some(to) = to {
                    let _ = to.send(b);
                }
            }
        }
    }
    table.write().unwrap_or_else(|e| e.into_inner()).remove(&me);
    Ok(())
}
