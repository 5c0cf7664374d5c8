//! wss: rustls with a certificate that is reloaded from disk.
//!
//! The resolver hands out whatever certificate is current; a background task
//! polls the files' modification times and swaps in a new certificate when
//! they change. Live connections keep the session they have; new handshakes
//! get the new certificate. A broken file on disk is logged and the old
//! certificate stays in service.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsPaths;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("unsupported private key in {path}: {source}")]
    BadKey { path: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses a PEM certificate chain and private key.
pub fn load_certified_key(paths: &TlsPaths) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read(&paths.cert)?;
    let key_pem = read(&paths.key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: paths.cert.display().to_string(),
        });
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey {
            path: paths.key.display().to_string(),
        })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| {
        TlsError::BadKey {
            path: paths.key.display().to_string(),
            source,
        }
    })?;
    Ok(CertifiedKey::new(certs, signer))
}

/// A certificate resolver whose certificate can be swapped at run time.
#[derive(Debug)]
pub struct ReloadingResolver {
    paths: TlsPaths,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

fn mtime(paths: &TlsPaths) -> Option<SystemTime> {
    let c = std::fs::metadata(&paths.cert)
        .and_then(|m| m.modified())
        .ok()?;
    let k = std::fs::metadata(&paths.key)
        .and_then(|m| m.modified())
        .ok()?;
    Some(c.max(k))
}

impl ReloadingResolver {
    pub fn new(paths: TlsPaths) -> Result<Self, TlsError> {
        let stamp = mtime(&paths);
        let ck = load_certified_key(&paths)?;
        Ok(ReloadingResolver {
            paths,
            current: RwLock::new((Arc::new(ck), stamp)),
        })
    }

    /// Reloads if the files changed since the last load. `Ok(true)` when a
    /// new certificate is now in service.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = mtime(&self.paths);
        let last = self.current.read().unwrap_or_else(|e| e.into_inner()).1;
        if stamp.is_none() || stamp == last {
            return Ok(false);
        }
        let ck = load_certified_key(&self.paths)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(ck), stamp);
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .clone(),
        )
    }
}

/// Builds the acceptor and returns the resolver for the reload task.
pub fn acceptor(paths: &TlsPaths) -> Result<(TlsAcceptor, Arc<ReloadingResolver>), TlsError> {
    let resolver = Arc::new(ReloadingResolver::new(paths.clone())?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(cfg)), resolver))
}
