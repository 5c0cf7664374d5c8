//! The listener: one port for WebSocket (ws or wss), health, metrics and the
//! info document.
//!
//! Each TCP connection gets one task: optional TLS, then hyper's HTTP/1
//! server. A WebSocket upgrade hands the upgraded stream to a
//! [`conn::open`] actor. Every task is tracked; [`Relay::shutdown`] cancels
//! them all, each registered client is told `shutting_down`, and shutdown
//! waits for the tasks to finish. Dropping a [`Relay`] cancels too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use w2w_proto::handshake::ReplayCache;
use w2w_proto::Address;

use crate::config::RelayConfig;
use crate::conn::{self, ConnInfo};
use crate::federation::Federation;
use crate::metrics::Metrics;
use crate::router::Router;
pub use crate::shared::Shared;
use crate::store::{SqliteBackend, Store, StoreError};
use crate::tls::{self, TlsError};
use crate::ws::{ServerIo, Ws};

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
}

impl Relay {
    /// Binds the port, opens the store and starts serving.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        let backend = match &config.data_dir {
            Some(dir) => {
                crate::datadir::prepare(dir)?;
                SqliteBackend::open(dir)?
            }
            None => SqliteBackend::in_memory()?,
        };
        let tls = match &config.tls {
            Some(paths) => Some(tls::acceptor(paths)?),
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RelayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics = Arc::new(Metrics::default());
        let fed_identity = config.identity.clone();
        let store = Store::spawn(backend, config.limits.budget_limits())?;
        let groups = crate::groups::Groups::load(store.groups().await?);
        let max_group = config.limits.max_group;
        let max_sessions = config.limits.max_sessions;
        let shared = Arc::new(Shared {
            relay_key: config.identity.address(),
            identity: config.identity,
            replay: Mutex::new(ReplayCache::new(config.limits.replay_cache)),
            conn_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            ip_gate: crate::per_ip::IpGate::new(
                config.limits.max_connections_per_ip,
                config.limits.handshake_rate_per_ip,
                config.limits.handshake_burst_per_ip,
            ),
            trusted_proxies: config.trusted_proxies.clone(),
            senders: crate::ratelimit::SenderLimits::new(config.limits.sender_rates()),
            limits: config.limits,
            public_urls: config.public_urls,
            tls: tls.is_some(),
            local_addr,
            router: Router::new(),
            fed: Arc::new(Federation::new(
                fed_identity,
                config.federation.clone(),
                (max_group, max_sessions),
                metrics.clone(),
            )),
            store,
            groups,
            rifts: Mutex::new(Default::default()),
            metrics,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
            oplog: Default::default(),
            started: std::time::Instant::now(),
            dials: Mutex::new(
                config
                    .federation
                    .peers
                    .iter()
                    .map(|u| (u.clone(), None))
                    .collect(),
            ),
        });
        if let (Some((_, resolver)), Some(paths)) = (&tls, &config.tls) {
            let resolver = resolver.clone();
            let every = Duration::from_millis(paths.reload_interval_ms.max(50));
            let stop = shared.shutdown.clone();
            shared.tracker.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => match resolver.reload_if_changed() {
                            Ok(true) => tracing::info!("TLS certificate reloaded from disk"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, "TLS certificate on disk is unusable; keeping the current one"),
                        },
                    }
                }
            });
        }
        shared.fed.set_url(shared.advertised_url(None));
        shared.fed.add_known(shared.store.known_addresses().await?);
        // Their directory records, published again (as offline) so their
        // messages keep coming here to be stored (PROTOCOL 12.12).
        shared
            .fed
            .restore_records(shared.store.registration_proofs().await?);
        // Messages kept for addresses of other relays (custody): handed
        // over once those relays can be reached (PROTOCOL 12.13).
        let custody = shared
            .store
            .custody_addresses(shared.fed.max_custody())
            .await?;
        shared.fed.add_custody(custody);
        // Groups of this relay: their records, published where other relays
        // look for them (PROTOCOL 12.14); and the task that answers their
        // questions.
        for name in shared.groups.names() {
            shared.fed.host_group(&name, false);
        }
        shared.tracker.spawn(crate::groups::run(shared.clone()));
        shared.fed.attach_store(
            shared.store.clone(),
            shared.limits.queue_ttl_ms,
            &shared.tracker,
            shared.shutdown.clone(),
        );
        // The core's deadlines (ACKs and remote receipts that do not come).
        let s = shared.clone();
        shared.tracker.spawn(async move {
            loop {
                let now = tokio::time::Instant::now();
                // Look again within 250 ms whatever is due: an input may
                // set an earlier timer meanwhile (a lookup's, the
                // directory's after a change of the relay set).
                let soon = now + Duration::from_millis(250);
                let due = s
                    .fed
                    .next_tick()
                    .map_or(soon, |t| tokio::time::Instant::from_std(t).min(soon));
                tokio::select! {
                    _ = s.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(due) => s.fed.tick(),
                }
            }
        });
        let s = shared.clone();
        shared.tracker.spawn(async move {
            let mut refresh =
                tokio::time::interval(Duration::from_millis(s.fed.config.refresh_ms.max(1000)));
            loop {
                tokio::select! {
                    _ = s.shutdown.cancelled() => break,
                    _ = refresh.tick() => {
                        s.fed.refresh();
                        let _ = s.store.write_later(crate::store::Write::Expire { now_ms: crate::unix_ms() }).await;
                        s.tracker.spawn(forget_gone(s.clone()));
                    }
                }
            }
        });
        for url in &config.federation.peers {
            shared
                .tracker
                .spawn(crate::peer::dial_loop(shared.clone(), url.clone()));
        }
        shared
            .tracker
            .spawn(crate::peer::keep_linked(shared.clone()));
        let acceptor = tls.map(|(a, _)| a);
        let s = shared.clone();
        shared.tracker.spawn(accept_loop(s, listener, acceptor));
        Ok(Relay { shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The URL clients dial, e.g. `ws://127.0.0.1:7777/`.
    pub fn url(&self) -> String {
        self.shared.advertised_url(None)
    }

    pub fn relay_key(&self) -> Address {
        self.shared.relay_key
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The federation core (peers, directory, hop events).
    pub fn federation(&self) -> &Federation {
        &self.shared.fed
    }

    /// Spacerift offers currently parked, waiting for a peer (for tests:
    /// a request is known to be parked, not just sent).
    pub fn spacerift_waiting(&self) -> usize {
        self.shared
            .rifts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting()
    }

    /// Stops accepting, tells every client `shutting_down`, and waits (at
    /// most `grace`) for all connection tasks to end.
    pub async fn shutdown(self, grace: Duration) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        let _ = tokio::time::timeout(grace, self.shared.tracker.wait()).await;
    }

    /// Resolves when shutdown is requested (e.g. by another handle).
    pub async fn cancelled(&self) {
        self.shared.shutdown.cancelled().await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Registrations forgotten per maintenance round (every `refresh_ms`).
const FORGET_BATCH: usize = 1000;

/// Forgets registrations last seen longer than `queue_ttl_ms` ago with
/// nothing queued (a message for them could not wait that long anyway):
/// throwaway registrations do not grow the relay's memory and directory
/// forever. A connected address is never forgotten; one seen again between
/// the list and the delete is kept (the delete re-checks `last_seen_ms`).
async fn forget_gone(shared: Arc<Shared>) {
    let before = crate::unix_ms().saturating_sub(shared.limits.queue_ttl_ms);
    let Ok(gone) = shared.store.forgettable(before, FORGET_BATCH).await else {
        return;
    };
    let mut forgotten = Vec::with_capacity(gone.len());
    for address in gone {
        if shared.router.contains(&address) {
            continue;
        }
        let forget = crate::store::Write::Forget {
            address,
            before_ms: before,
        };
        if shared.store.write_later(forget).await.is_ok() {
            forgotten.push(address);
        }
    }
    if !forgotten.is_empty() {
        tracing::debug!(
            count = forgotten.len(),
            "forgot registrations gone longer than the queue's time to live"
        );
        shared.fed.forget(&forgotten);
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Raw TCP connections: the WebSocket limit plus headroom for HTTP
    // requests and for telling excess WebSocket clients `max_connections`.
    let tcp_permits = Arc::new(Semaphore::new(shared.limits.max_connections + 256));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = tcp_permits.clone().try_acquire_owned() else {
            shared.metrics.error(w2w_proto::ErrorCode::MaxConnections);
            refuse_tcp(&tcp, "max_connections");
            continue;
        };
        // A trusted proxy's clients are counted by their own address, at
        // the upgrade (see `upgrade`).
        let ip_slot = if shared.trusted_proxies.contains(&peer.ip()) {
            None
        } else {
            match shared.ip_gate.connect(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    shared.metrics.error(w2w_proto::ErrorCode::LimitReached);
                    tracing::debug!(%peer, "per-IP connection limit reached");
                    refuse_tcp(&tcp, "limit_reached");
                    continue;
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let s = shared.clone();
        let tls = tls.clone();
        shared.tracker.spawn(async move {
            let _permit = permit;
            serve_tcp(s, tcp, peer, tls, ip_slot).await;
        });
    }
}

/// Answers a refused TCP connection with a canned HTTP 429 if the socket
/// takes it at once (never waits), then drops it.
fn refuse_tcp(tcp: &TcpStream, error: &str) {
    let body = format!(r#"{{"error":"{error}","detail":"too many connections; retry later"}}"#);
    let reply = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(reply.as_bytes());
}

async fn serve_tcp(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ip_slot: Option<crate::per_ip::IpSlot>,
) {
    match tls {
        None => serve_http(shared, tcp, peer, ip_slot).await,
        Some(acceptor) => {
            let hs = tokio::time::timeout(shared.limits.auth_timeout(), acceptor.accept(tcp));
            match hs.await {
                Ok(Ok(stream)) => serve_http(shared, stream, peer, ip_slot).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

/// Serves HTTP/1 on one connection until it ends, upgrades, or has been
/// open `http_timeout_ms` (whatever it is doing: a trickled body, unread
/// answers, an idle keep-alive). The per-IP slot is held as long as the
/// connection, including a WebSocket it upgrades to.
async fn serve_http<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    ip_slot: Option<crate::per_ip::IpSlot>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let s = shared.clone();
    // Handed to the WebSocket task if the connection upgrades.
    let slot = Arc::new(Mutex::new(ip_slot));
    let svc = service_fn(move |req| {
        let (s, slot) = (s.clone(), slot.clone());
        async move { Ok::<_, Infallible>(handle(s, req, peer, slot).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.auth_timeout())
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "http connection error");
        },
        _ = tokio::time::sleep(shared.limits.http_timeout()) => {
            tracing::debug!(%peer, "http connection open too long, closed");
        }
        _ = shared.shutdown.cancelled() => {}
    }
}

/// The demo web app (clients/js/demo) and browser client bundle
/// (clients/js/dist), served at `/` and `/w2w.js`.
const DEMO_HTML: &str = include_str!("../../../clients/js/demo/index.html");
const CLIENT_JS: &str = include_str!("../../../clients/js/dist/w2w.js");

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap_or_default()
}

fn json_error(status: StatusCode, error: &str, detail: &str) -> Response<Full<Bytes>> {
    text(
        status,
        "application/json",
        serde_json::json!({ "error": error, "detail": detail }).to_string(),
    )
}

fn cors(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        "access-control-allow-origin",
        http::HeaderValue::from_static("*"),
    );
    r
}

fn json_status(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

/// POST /spacerift: WebRTC peer linking (`w2w_proto::spacerift` the wire,
/// `w2w_core::spacerift` the state machine, `spacerift.rs` the channel).
/// Bodies are capped at 64 KiB; the offerer's request waits at most 15 s. Cheapest
/// checks first: the per-IP gate before the body is read, the key's limit
/// and the replay memory before the signature (which is checked outside the
/// lock).
async fn spacerift(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    ip: std::net::IpAddr,
) -> Response<Full<Bytes>> {
    use crate::spacerift::{parse, Reply, REQUEST_TIMEOUT};
    use http_body_util::BodyExt;
    use std::time::Instant;
    let rifts = || shared.rifts.lock().unwrap_or_else(|e| e.into_inner());
    let gated = rifts().gate(ip, Instant::now());
    let pass = match gated {
        Ok(p) => p,
        Err(r) => return json_status(r.status(), r.json()),
    };
    let collect = http_body_util::Limited::new(req.into_body(), 64 * 1024).collect();
    let body = match tokio::time::timeout(shared.limits.auth_timeout(), collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return json_status(
                400,
                serde_json::json!({"error": "bad_request", "detail": e.to_string()}),
            )
        }
        Err(_) => {
            return json_status(
                408,
                serde_json::json!({"error": "timeout", "detail": "request body not received in time"}),
            )
        }
    };
    let parsed = parse(&body, crate::unix_ms(), shared.limits.max_skew_ms);
    // A parked offer keeps its signal only, not the body (nor the
    // connection's read buffer the body may share).
    drop(body);
    let admitted = parsed.map_err(|e| (e.status(), e.json())).and_then(|u| {
        let admitted = rifts().admit(pass, u, Instant::now());
        admitted.map_err(|r| (r.status(), r.json()))
    });
    let request = match admitted.and_then(|a| a.verify().map_err(|e| (e.status(), e.json()))) {
        Ok(r) => r,
        Err((status, body)) => return json_status(status, body),
    };
    let namespaced = !request.namespace.is_empty();
    let reply = rifts().handle(request, Instant::now(), rand::random());
    let reply: Reply = match reply {
        Reply::Wait(rx) => {
            let wait = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), rx);
            tokio::select! {
                r = wait => match r {
                    Ok(Ok(reply)) => reply,
                    _ => Reply::NoPeer { namespaced },
                },
                _ = shared.shutdown.cancelled() => Reply::NoPeer { namespaced },
            }
        }
        r => return json_status(r.status(), r.json()),
    };
    json_status(reply.status(), reply.json())
}

/// `ok` (200), or 503 with what cannot write: the store (its latest write
/// failed) or the log (its latest line could not be written).
fn health(shared: &Shared) -> Response<Full<Bytes>> {
    let mut failing = Vec::new();
    if !shared.store.healthy() {
        failing.push("store");
    }
    if crate::log_health::failing() {
        failing.push("log");
    }
    if failing.is_empty() {
        return text(StatusCode::OK, "text/plain", "ok\n");
    }
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unhealthy",
        &format!("cannot write: {}", failing.join(", ")),
    )
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

/// RFC 6455 §4.2.2: base64(SHA-1(key ++ GUID)).
fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

type SharedSlot = Arc<Mutex<Option<crate::per_ip::IpSlot>>>;

async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    slot: SharedSlot,
) -> Response<Full<Bytes>> {
    if is_upgrade(&req) {
        return upgrade(shared, &mut req, peer, slot);
    }
    // HEAD is GET without the body (hyper sends the headers only).
    let method = match req.method().as_str() {
        "HEAD" => "GET",
        m => m,
    };
    match (method, req.uri().path()) {
        ("GET", "/healthz") => health(&shared),
        ("GET", "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics_page(),
        ),
        ("GET", "/status") => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::status::render(&shared),
        ),
        // Public facts; pages on other origins read the limits too.
        ("GET", "/.well-known/w2w") => cors(text(
            StatusCode::OK,
            "application/json",
            shared.info_document(),
        )),
        // The browser client and demo app, embedded at build time.
        ("GET", "/") | ("GET", "/index.html") => {
            text(StatusCode::OK, "text/html; charset=utf-8", DEMO_HTML)
        }
        ("GET", "/w2w.js") => text(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT_JS),
        ("POST", "/spacerift") => {
            // Behind a trusted proxy, the client's own address.
            let ip = match shared.trusted_proxies.contains(&peer.ip()) {
                true => crate::per_ip::forwarded_for(req.headers()).unwrap_or(peer.ip()),
                false => peer.ip(),
            };
            cors(spacerift(shared, req, ip).await)
        }
        // CORS preflight: pages served elsewhere may link peers here too
        // (requests are authenticated by their signature, not by origin).
        ("OPTIONS", "/spacerift") => {
            let mut r = cors(text(StatusCode::NO_CONTENT, "text/plain", ""));
            let h = r.headers_mut();
            h.insert(
                "access-control-allow-methods",
                http::HeaderValue::from_static("POST, OPTIONS"),
            );
            h.insert(
                "access-control-allow-headers",
                http::HeaderValue::from_static("content-type"),
            );
            h.insert(
                "access-control-max-age",
                http::HeaderValue::from_static("600"),
            );
            r
        }
        _ => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "try /, /w2w.js, /healthz, /metrics, /status or /.well-known/w2w",
        ),
    }
}

fn upgrade(
    shared: Arc<Shared>,
    req: &mut Request<Incoming>,
    mut peer: SocketAddr,
    slot: SharedSlot,
) -> Response<Full<Bytes>> {
    // The client's own address: a trusted proxy's forwarded one. The
    // connection's slot moves to the WebSocket task only once the upgrade
    // is accepted (a refused one keeps counting against the connection).
    let mut forwarded_slot = None;
    if shared.trusted_proxies.contains(&peer.ip()) {
        if let Some(ip) = crate::per_ip::forwarded_for(req.headers()) {
            peer = SocketAddr::new(ip, 0);
            match shared.ip_gate.connect(ip) {
                Some(s) => forwarded_slot = Some(s),
                None => {
                    shared.metrics.error(w2w_proto::ErrorCode::LimitReached);
                    return json_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "limit_reached",
                        "too many connections from your address; retry later",
                    );
                }
            }
        }
    }
    if !shared
        .ip_gate
        .handshake(peer.ip(), std::time::Instant::now())
    {
        shared.metrics.error(w2w_proto::ErrorCode::RateLimited);
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many WebSocket handshakes from your address; retry in a second",
        );
    }
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_upgrade",
            "missing Sec-WebSocket-Key",
        );
    };
    if !version_ok || req.method() != http::Method::GET {
        let mut r = json_error(
            StatusCode::BAD_REQUEST,
            "bad_upgrade",
            "WebSocket version 13 over GET is required",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            http::HeaderValue::from_static("13"),
        );
        return r;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let slot = forwarded_slot.or_else(|| slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    let on_upgrade = hyper::upgrade::on(req);
    shared
        .tracker
        .spawn(upgraded(shared.clone(), on_upgrade, peer, host, slot));
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap_or_default()
}

/// The task of one upgraded connection, for as long as it lasts. Only the
/// registered session's state stays in it; the upgrade and the handshake
/// run boxed.
async fn upgraded(
    s: Arc<Shared>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    peer: SocketAddr,
    host: Option<String>,
    slot: Option<crate::per_ip::IpSlot>,
) {
    let _slot = slot;
    if let Some(live) = Box::pin(open_upgraded(s, on_upgrade, peer, host)).await {
        live.run().await;
    }
}

async fn open_upgraded(
    s: Arc<Shared>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    peer: SocketAddr,
    host: Option<String>,
) -> Option<Box<conn::Live<ServerIo>>> {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "upgrade failed");
            return None;
        }
    };
    // The socket itself, not hyper's boxed wrapper: the WebSocket waits for
    // readability on it and holds no read buffer while idle.
    let (io, pre) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => (ServerIo::Tcp(p.io.into_inner()), p.read_buf),
        Err(u) => match u.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>() {
            Ok(p) => (ServerIo::Tls(Box::new(p.io.into_inner())), p.read_buf),
            Err(_) => {
                tracing::error!(%peer, "upgraded connection of an unknown type");
                return None;
            }
        },
    };
    let ws = Ws::lazy(io, pre, ServerIo::poll_read_ready, s.limits.max_frame_bytes);
    conn::open(s, ws, ConnInfo { peer, host }).await
}

#[cfg(test)]
mod tests {
    /// What an idle registered connection's task holds inline, at most
    /// (936 bytes in a debug build when this was written; tokio's task
    /// header and the boxed `conn::Live` come on top). It was 4.9 KiB before
    /// the handshake and the session's opening and closing were boxed.
    const MAX_CONNECTION_TASK: usize = 1024;

    #[tokio::test]
    async fn a_connection_task_stays_small() {
        use super::*;
        let id = w2w_proto::Identity::from_seed([7; 32]);
        let relay = Relay::start(RelayConfig::new(id, "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let mut req = Request::new(());
        let task = upgraded(
            relay.shared.clone(),
            hyper::upgrade::on(&mut req),
            "127.0.0.1:1".parse().unwrap(),
            None,
            None,
        );
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= MAX_CONNECTION_TASK,
            "the connection task is {size} bytes; box what only runs briefly (see conn::open)"
        );
    }

    #[test]
    fn rfc6455_accept_key_example() {
        assert_eq!(
            super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn authority_normalization() {
        assert_eq!(
            crate::shared::normalize_authority("Example.com:443", true),
            "example.com"
        );
        assert_eq!(
            crate::shared::normalize_authority("example.com:443", false),
            "example.com:443"
        );
    }
}
