//! What the operator reads in the log: refused registrations and failing
//! peer links, at the default level but rate-limited, so a scanner or a
//! dead peer cannot flood the log.
//!
//! [`Throttle`] lets one line per key (a refusal reason, a peer URL) through
//! every [`WINDOW`]; the next line after a quiet window says how many were
//! suppressed meanwhile. The counts themselves are in `/metrics`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use w2w_proto::ErrorCode;

use crate::shared::Shared;

/// At most one line per key this often.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Keys remembered; past it the table starts over (keys are reasons and
/// configured peer URLs, so this is never reached in practice).
const MAX_KEYS: usize = 1024;

#[derive(Debug)]
struct Slot {
    last: Instant,
    suppressed: u64,
}

/// One log line per key per [`WINDOW`].
#[derive(Debug, Default)]
pub struct Throttle {
    slots: Mutex<HashMap<String, Slot>>,
}

impl Throttle {
    /// `Some(suppressed)` if a line for `key` may be written now (with the
    /// number of lines held back since the last one), `None` if it must
    /// be dropped.
    pub fn allow(&self, key: &str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(key) {
            if now.saturating_duration_since(s.last) < WINDOW {
                s.suppressed += 1;
                return None;
            }
            s.last = now;
            return Some(std::mem::take(&mut s.suppressed));
        }
        if slots.len() >= MAX_KEYS {
            slots.clear();
        }
        slots.insert(
            key.to_owned(),
            Slot {
                last: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// What an operator should do about a refusal, if the reason says.
fn hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::StaleTimestamp => "; the client's clock (or this relay's) is off",
        ErrorCode::WrongRelay => "; the client pinned or dialled another relay's key",
        ErrorCode::AuthTimeout => "; the client did not finish the handshake in time",
        _ => "",
    }
}

/// Logs a registration refused with `code` (rate-limited per reason).
/// A `wrong_url` refusal is logged where the signed URL is known, see
/// [`wrong_url`].
pub fn registration_refused(shared: &Shared, ip: IpAddr, code: ErrorCode, detail: &str) {
    if matches!(code, ErrorCode::ShuttingDown | ErrorCode::WrongUrl) {
        return;
    }
    let Some(suppressed) = shared
        .oplog
        .allow(&format!("refused {}", code.as_str()), Instant::now())
    else {
        return;
    };
    tracing::info!(
        reason = code.as_str(),
        detail,
        suppressed,
        "registration refused: {code} from {ip}{}",
        hint(code),
    );
}

/// Logs a `wrong_url` refusal: the URL the client signed, what this relay
/// expected, and the usual cause (a reverse proxy, without `--public-url`).
pub fn wrong_url(shared: &Shared, ip: IpAddr, signed: &str, host: Option<&str>) {
    let Some(suppressed) = shared.oplog.allow("refused wrong_url", Instant::now()) else {
        return;
    };
    let (expected, hint) = if shared.public_urls.is_empty() {
        (
            shared.advertised_url(host),
            "behind a reverse proxy or TLS terminator, start the relay with \
             --public-url set to the URL clients dial (e.g. --public-url wss://chat.example.com/)",
        )
    } else {
        (
            shared.public_urls.join(" "),
            "if clients reach this relay at that URL too, add it with another --public-url",
        )
    };
    tracing::warn!(
        reason = "wrong_url",
        signed,
        expected = %expected,
        suppressed,
        "registration refused: wrong_url (15) from {ip}: the client signed a URL \
         this relay does not serve; {hint}"
    );
}

/// Why dialling a peer failed, in words an operator can act on.
pub fn dial_hint(url: &str, error: &str) -> &'static str {
    let scheme_ok = url.starts_with("ws://") || url.starts_with("wss://");
    let e = error.to_ascii_lowercase();
    if !scheme_ok {
        "; a peer URL starts with ws:// or wss://"
    } else if e.contains("refused") && !e.contains("relay refused") {
        "; is a relay running at that address?"
    } else if e.contains("invalidcontenttype") || e.contains("corrupt message") {
        "; wss:// to a relay without TLS? (use ws://, or give that relay --tls-cert)"
    } else if e.contains("unauthorized_peer") {
        "; that relay does not admit this relay's key (its --peer-allow)"
    } else if e.contains("wrong_url") {
        "; that relay expects another URL (its --public-url)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_window_then_the_suppressed_count() {
        let t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.allow("a", t0), Some(0));
        assert_eq!(t.allow("b", t0), Some(0), "keys are independent");
        for i in 1..=5 {
            assert_eq!(t.allow("a", t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.allow("a", t0 + WINDOW), Some(5));
        assert_eq!(t.allow("a", t0 + WINDOW + Duration::from_secs(1)), None);
    }

    #[test]
    fn dial_hints() {
        assert!(dial_hint("http://x:1/", "invalid relay URL").contains("ws://"));
        assert!(dial_hint(
            "ws://x:1/",
            "connecting to ws://x:1/: Connection refused (os error 111)"
        )
        .contains("running"));
        assert!(dial_hint(
            "wss://x:1/",
            "websocket: io error: received corrupt message of type InvalidContentType"
        )
        .contains("TLS"));
        assert!(dial_hint("ws://x:1/", "relay refused: unauthorized_peer").contains("peer-allow"));
    }
}
