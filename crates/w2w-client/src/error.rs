//! Client errors.

use std::time::Duration;

use w2w_proto::handshake::HandshakeError;
use w2w_proto::seal::SealError;
use w2w_proto::ErrorCode;

/// Client errors.
///
/// Each message already includes the error it wraps, so none of them
/// reports a `source()`: printing the chain (`{:#}` in anyhow) shows every
/// cause once instead of repeating it at every level.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid relay URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connecting to {url}: {error}")]
    Connect {
        url: String,
        error: tokio_websockets::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("registration failed: {0}")]
    Handshake(HandshakeError),
    /// The relay refused with a code (ERROR frame or close code).
    #[error("relay refused: {code}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Refused { code: ErrorCode, detail: String },
    #[error("relay sent an invalid frame: {0}")]
    Protocol(String),
    #[error("connection closed{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { reason: Option<String> },
    #[error("reading TLS roots {path}: {reason}")]
    TlsRoots { path: String, reason: String },
    #[error("websocket: {0}")]
    Ws(tokio_websockets::Error),
    /// The message could not be sealed (e.g. a recipient address is not a
    /// valid Ed25519 key).
    #[error("cannot seal the message: {0}")]
    Seal(SealError),
    /// The MSG frame is larger than the relay accepts: nothing was sent.
    #[error("message too large: the frame is {size} bytes and the relay accepts at most {limit} (limits.max_frame_bytes in its /.well-known/w2w); send a smaller body or split it")]
    TooLarge { size: usize, limit: usize },
}

impl From<HandshakeError> for ClientError {
    fn from(e: HandshakeError) -> Self {
        ClientError::Handshake(e)
    }
}

impl From<tokio_websockets::Error> for ClientError {
    fn from(e: tokio_websockets::Error) -> Self {
        ClientError::Ws(e)
    }
}

impl From<SealError> for ClientError {
    fn from(e: SealError) -> Self {
        ClientError::Seal(e)
    }
}
