//! Peer links: relay-to-relay connections, inbound and outbound.
//!
//! An outbound link is dialled from `FederationConfig::peers` and redialled
//! with exponential backoff and jitter. Both directions run the same
//! [`run_link`] after the handshake (role = relay): register with the
//! federation core (which may refuse: duplicate link, or peer limit — then
//! the newcomer gets a REDIRECT naming our peers), then pump s2s frames.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_websockets::Message;
use w2w_client::{connect_raw, register_as, ConnectOptions};
use w2w_proto::frame::Role;
use w2w_proto::s2s::{Forward, ForwardTarget, RelayToRelay};
use w2w_proto::{Address, ErrorCode};

use crate::ratelimit::ByteBudget;
use crate::router::Outbox;
use crate::shared::Shared;
use crate::ws::{finish_link, pump, send_frame, End, Handler, Ws};

struct Link<'a> {
    shared: &'a Shared,
    peer: Address,
    /// The link's id (its outbox's), as the core knows it.
    conn_id: u64,
    /// What this peer's broadcasts may cost here.
    broadcast: ByteBudget,
    /// URLs from a REDIRECT, for the dialler.
    redirect: Vec<String>,
    /// Frames of this read burst, for the core in one go.
    pending: Vec<RelayToRelay>,
}

impl Handler for Link<'_> {
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let frames = std::mem::take(&mut self.pending);
            self.shared.fed.on_frames(self.conn_id, frames);
        }
    }

    fn on_message(&mut self, m: Message, now: std::time::Instant) {
        if !m.is_binary() {
            return;
        }
        let bytes: Bytes = m.into_payload().into();
        self.shared.metrics.frames_in.fetch_add(1, Relaxed);
        self.shared
            .metrics
            .bytes_in
            .fetch_add(bytes.len() as u64, Relaxed);
        match RelayToRelay::decode(&bytes) {
            Ok(RelayToRelay::Redirect(urls)) => self.redirect = urls,
            Ok(RelayToRelay::Forward(f))
                if f.target == ForwardTarget::Broadcast && !self.afford_broadcast(&f, now) =>
            {
                self.shared.metrics.error(ErrorCode::RateLimited);
                tracing::debug!(peer = %self.peer.short(), "peer broadcast over its budget dropped");
            }
            Ok(frame) => {
                // A broadcast goes to every client here: not batched with
                // more (the core lock is held for its whole fan-out).
                let fan_out = matches!(
                    &frame,
                    RelayToRelay::Forward(f) if f.target == ForwardTarget::Broadcast
                );
                self.pending.push(frame);
                if fan_out {
                    self.flush();
                }
            }
            Err(e) => {
                self.shared.metrics.error(e.code());
                tracing::warn!(peer = %self.peer.short(), error = %e, "bad s2s frame");
            }
        }
    }
}

impl Link<'_> {
    /// Charges a broadcast FORWARD by its fan-out here.
    fn afford_broadcast(&mut self, f: &Forward, now: Instant) -> bool {
        let copies = self.shared.router.len() + self.shared.fed.peer_count();
        let cost = (f.msg.len() * copies.max(1)) as u64;
        self.broadcast.charge(cost, now)
    }
}

/// Runs an authenticated peer link until it ends. Returns how it ended and
/// any REDIRECT the peer sent.
pub(crate) async fn run_link<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    ws: &mut Ws<S>,
    peer: Address,
    peer_url: String,
) -> End {
    run_link_inner(shared, ws, peer, peer_url).await.0
}

async fn run_link_inner<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    ws: &mut Ws<S>,
    peer: Address,
    peer_url: String,
) -> (End, Vec<String>) {
    let conn_id = shared.next_conn_id.fetch_add(1, Relaxed);
    let (outbox, mut rx) = Outbox::new(
        peer,
        conn_id,
        shared.fed.config.peer_queue_bytes,
        shared.metrics.clone(),
    );
    let dialled = !peer_url.is_empty();
    let trusted = match shared
        .fed
        .peer_up(peer, peer_url.clone(), outbox.clone(), dialled)
    {
        Ok(trusted) => trusted,
        Err(code) => {
            if code == ErrorCode::PeerLimit {
                let urls = shared.fed.redirect_urls();
                tracing::info!(peer = %peer.short(), "peer limit reached; redirecting to {urls:?}");
                let _ = send_frame(ws, shared, RelayToRelay::Redirect(urls).encode()).await;
            }
            return (End::Close(code, String::new()), Vec::new());
        }
    };
    tracing::info!(peer = %peer.short(), url = %peer_url, trusted, "peer link up");
    let fc = &shared.fed.config;
    let mut link = Link {
        shared,
        peer,
        conn_id,
        broadcast: ByteBudget::new(
            fc.peer_broadcast_bytes_per_sec,
            fc.peer_broadcast_bytes_burst,
            Instant::now(),
        ),
        redirect: Vec::new(),
        pending: Vec::new(),
    };
    // Peers get longer to drain a burst than clients do, and are pinged
    // sooner: a silent peer black-holes every message routed through it.
    let live = crate::ws::Liveness {
        interval: Duration::from_millis(shared.fed.config.peer_ping_interval_ms.max(100)),
        timeout: Duration::from_millis(shared.fed.config.peer_ping_timeout_ms.max(100)),
    };
    let end = pump(
        shared,
        &outbox,
        ws,
        &mut rx,
        &mut link,
        (Duration::from_secs(30), live),
    )
    .await;
    shared.fed.peer_down(conn_id);
    outbox.dequeued(outbox.queued_bytes());
    tracing::info!(peer = %peer.short(), "peer link down");
    (end, link.redirect)
}

/// Dials `url` as a peer until shutdown, with backoff and jitter. Follows a
/// REDIRECT by dialling one of the named relays instead, at random among
/// those this walk has not tried yet (always taking the first name sent
/// every newcomer to the same full relays, back and forth): a walk over the
/// federation that ends at a relay with room, or back at `url` when it
/// runs out of names.
pub(crate) async fn dial_loop(shared: Arc<Shared>, url: String) {
    let mut backoff = Duration::from_millis(250);
    let max = Duration::from_secs(30);
    let mut target = url.clone();
    // Relays tried since the walk last started at `url` (bounded by the
    // names REDIRECTs carry; cleared when the walk starts over).
    let mut visited: std::collections::HashSet<String> = std::collections::HashSet::new();
    // The key behind `target`, once known: while we already have a link to
    // that relay (e.g. it dialled us first), we wait instead of redialling.
    let mut last_key: Option<Address> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            return;
        }
        if let Some(k) = last_key {
            if shared.fed.peers().iter().any(|(p, _)| *p == k) {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        }
        let started = Instant::now();
        visited.insert(target.clone());
        let mut redirect = Vec::new();
        let opts = ConnectOptions::new(target.clone());
        let attempt = async {
            let mut ws = connect_raw(&opts).await?;
            let reg = register_as(&mut ws, &shared.identity, &target, None, Role::Relay).await?;
            Ok::<_, w2w_client::ClientError>((ws, reg))
        };
        let result = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok((ws, reg)) => {
                let mut ws = Ws::Plain(ws);
                let key = reg.relay_key;
                last_key = Some(key);
                if let Some(k) = shared
                    .dials
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&url)
                {
                    *k = Some(key);
                }
                if shared.fed.config.admits(&key) {
                    // A link the other side made first is trusted now too.
                    if shared.fed.dialled_key(key).is_some() {
                        tracing::info!(peer = %key.short(), "peer link now trusted (reached at a configured URL)");
                    }
                }
                if !shared.fed.config.admits(&key) {
                    if let Some(suppressed) =
                        shared.oplog.allow(&format!("dial {url}"), Instant::now())
                    {
                        tracing::warn!(relay = %key, suppressed, "peer link to {target} not made: that relay is not on the --peer-allow list");
                    }
                    shared.metrics.error(ErrorCode::UnauthorizedPeer);
                    let _ = ws.close().await;
                } else {
                    let (end, urls) = run_link_inner(&shared, &mut ws, key, target.clone()).await;
                    redirect = urls;
                    finish_link(&mut ws, &shared, end, &key).await;
                }
            }
            Err(e) => {
                let error = e.to_string();
                if let Some(suppressed) = shared.oplog.allow(&format!("dial {url}"), Instant::now())
                {
                    let hint = crate::oplog::dial_hint(&target, &error);
                    tracing::warn!(%error, suppressed, "peer link to {target} failed{hint}");
                }
                // A redirect target that fails sends us back to the
                // configured URL.
                if target != url {
                    target = url.clone();
                    last_key = None;
                }
            }
        }
        // Follow a redirect to a relay this walk has not tried, at random;
        // with none left, start over from `url` after the backoff.
        let mut soon = false;
        if !redirect.is_empty() {
            let linked: Vec<String> = shared.fed.peers().into_iter().map(|(_, u)| u).collect();
            let fresh: Vec<String> = redirect
                .into_iter()
                .filter(|u| !linked.contains(u) && !visited.contains(u))
                .collect();
            if fresh.is_empty() {
                target = url.clone();
                visited.clear();
            } else {
                let next = fresh[rand::random::<u64>() as usize % fresh.len()].clone();
                tracing::info!(from = %target, to = %next, "following redirect");
                target = next;
                soon = true;
            }
            last_key = None;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
            visited.clear();
        }
        if soon {
            // A new name: try it after a short pause, without growing the
            // backoff (the walk is bounded by the names it has not tried).
            let pause = Duration::from_millis(100 + rand::random::<u64>() % 150);
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            continue;
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// Keeps at least `min_peers` links: while this relay has fewer, it dials
/// a relay it knows from link state (one at a time, at random among those
/// not linked; a refusal or a dropped link is tried again later with
/// another). A federation grown from one seed is a tree; this makes it a
/// mesh, so that no single relay's death splits it.
pub(crate) async fn keep_linked(shared: Arc<Shared>) {
    let min = shared.fed.config.min_peers;
    if min == 0 {
        return;
    }
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let pause = Duration::from_millis(2_000 + rand::random::<u64>() % 1_000);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if busy.load(Relaxed) || shared.fed.peer_count() >= min {
            continue;
        }
        let candidates: Vec<(Address, String)> = shared
            .fed
            .unlinked_relays()
            .into_iter()
            .filter(|(k, _)| shared.fed.config.admits(k))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let (key, url) = candidates[rand::random::<u64>() as usize % candidates.len()].clone();
        busy.store(true, Relaxed);
        let (s, b) = (shared.clone(), busy.clone());
        shared.tracker.spawn(async move {
            tracing::info!(peer = %key.short(), %url, "fewer than min_peers links: dialling a relay known from link state");
            let opts = ConnectOptions::new(url.clone());
            let attempt = async {
                let mut ws = connect_raw(&opts).await?;
                let reg = register_as(&mut ws, &s.identity, &url, Some(key), Role::Relay).await?;
                Ok::<_, w2w_client::ClientError>((ws, reg))
            };
            let result = tokio::select! {
                _ = s.shutdown.cancelled() => None,
                r = attempt => r.ok(),
            };
            b.store(false, Relaxed);
            if let Some((ws, reg)) = result {
                let mut ws = Ws::Plain(ws);
                let (end, _) = run_link_inner(&s, &mut ws, reg.relay_key, url).await;
                finish_link(&mut ws, &s, end, &reg.relay_key).await;
            }
        });
    }
}
