//! Reaching a relay: WebSocket over TCP, with TLS for wss.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ClientError;
use tokio::net::TcpStream;
use tokio_websockets::{MaybeTlsStream, WebSocketStream};
use w2w_proto::Address;

/// A WebSocket to a relay, plain or TLS.
pub type RelaySocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How to reach and trust a relay.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// ws:// or wss:// URL, exactly as the relay should see it.
    pub url: String,
    /// Expected relay key (from a previous visit); `None` trusts on first use.
    pub pinned: Option<Address>,
    /// Extra PEM CA certificates to trust for wss (e.g. a self-signed relay).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Time allowed for TCP + TLS + WebSocket + registration.
    pub timeout: Duration,
    /// Reconnect (with backoff) after a lost connection, resending messages
    /// that got no receipt (default true).
    pub reconnect: bool,
    /// The relay's largest WebSocket message (default
    /// [`w2w_proto::DEFAULT_MAX_FRAME_BYTES`]): larger MSG frames are refused
    /// with [`ClientError::TooLarge`] before anything is sent. If the relay
    /// closes with 1009 anyway (its limit is lower), the largest unreceipted
    /// messages get a local `rejected` / `frame_too_large` receipt, the
    /// limit is lowered, and they are never resent.
    pub max_frame_bytes: usize,
    /// Register as a send-only session (role 2, PROTOCOL 7.7): it sends,
    /// asks and gets receipts but takes no deliveries, so it never
    /// disturbs a listening session of the same key (default false).
    pub send_only: bool,
    /// After registering (and after every reconnect), close every other
    /// session of this address on the relay (REQUEST op 6): a listener
    /// that wants to be the only one (default false).
    pub exclusive: bool,
}

impl ConnectOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            pinned: None,
            extra_roots_pem: None,
            timeout: Duration::from_secs(10),
            reconnect: true,
            max_frame_bytes: w2w_proto::DEFAULT_MAX_FRAME_BYTES,
            send_only: false,
            exclusive: false,
        }
    }

    /// A send-only session (see [`ConnectOptions::send_only`]).
    pub fn send_only(mut self, on: bool) -> Self {
        self.send_only = on;
        self
    }

    /// An exclusive session (see [`ConnectOptions::exclusive`]).
    pub fn exclusive(mut self, on: bool) -> Self {
        self.exclusive = on;
        self
    }

    /// The role REGISTER carries.
    pub fn role(&self) -> w2w_proto::frame::Role {
        if self.send_only {
            w2w_proto::frame::Role::Sender
        } else {
            w2w_proto::frame::Role::Client
        }
    }

    pub fn pinned(mut self, key: Option<Address>) -> Self {
        self.pinned = key;
        self
    }

    /// Trusts the PEM certificates in `path` in addition to the web PKI.
    pub fn trust_pem_file(mut self, path: &Path) -> Result<Self, ClientError> {
        let pem = std::fs::read(path).map_err(|e| ClientError::TlsRoots {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.extra_roots_pem = Some(pem);
        Ok(self)
    }
}

pub(crate) fn tls_connector(
    extra_pem: Option<&[u8]>,
) -> Result<tokio_websockets::Connector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_pem {
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| ClientError::TlsRoots {
                path: "<pem>".into(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| ClientError::TlsRoots {
                path: "<pem>".into(),
                reason: e.to_string(),
            })?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::TlsRoots {
        path: "<provider>".into(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_websockets::Connector::Rustls(
        tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    ))
}

/// Opens a WebSocket to the relay (no registration).
pub async fn connect_raw(opts: &ConnectOptions) -> Result<RelaySocket, ClientError> {
    let uri: http::Uri =
        opts.url
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::BadUrl {
                url: opts.url.clone(),
                reason: e.to_string(),
            })?;
    let connector = match uri.scheme_str() {
        Some("wss") => tls_connector(opts.extra_roots_pem.as_deref())?,
        Some("ws") => tokio_websockets::Connector::Plain,
        _ => {
            return Err(ClientError::BadUrl {
                url: opts.url.clone(),
                reason: "the scheme must be ws:// or wss://".into(),
            })
        }
    };
    let builder = tokio_websockets::ClientBuilder::from_uri(uri)
        .connector(&connector)
        .limits(tokio_websockets::Limits::default().max_payload_len(Some(16 << 20)));
    let fut = builder.connect();
    let (ws, _resp) = tokio::time::timeout(opts.timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(opts.timeout))?
        .map_err(|error| ClientError::Connect {
            url: opts.url.clone(),
            error,
        })?;
    set_nodelay(&ws);
    Ok(ws)
}

/// Small frames (MSG, ACK) go out at once instead of waiting for Nagle's
/// algorithm (up to 40 ms with delayed ACKs).
pub(crate) fn set_nodelay(ws: &RelaySocket) {
    let tcp = match ws.get_ref() {
        MaybeTlsStream::Plain(t) => t,
        MaybeTlsStream::Rustls(t) => t.get_ref().0,
        #[allow(unreachable_patterns)]
        _ => return,
    };
    let _ = tcp.set_nodelay(true);
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
