//! Spacerifts' wire (PROTOCOL §16): the JSON bodies of `POST /spacerift`,
//! what their Ed25519 signature covers (domain-separated), and the replies
//! with their HTTP statuses. One long-polled request for the offerer, two
//! for the answerer:
//!
//! ```text
//! Alice  POST CONNECT {signal: offer_A}            ── waits (≤ 15 s)
//! Bob    POST CONNECT {signal: offer_B}  → DEMOTE {nonce, signal: offer_A}
//! Bob    POST CONNECT {nonce, signal: answer_B} → DELIVERED
//! Alice  ◀── ANSWER {signal: answer_B}
//! ```
//!
//! [`parse`] does the cheap half of reading a request (syntax, sizes, the
//! clock window, the key's format) and gives an [`Unverified`] request; its
//! signature is checked by [`Unverified::verify`]. A relay checks its cheap
//! limits in between, and reaches `verify` only through
//! `w2w_core::spacerift::Admitted`, where the state machine (`Rifts`:
//! pairing, leases, limits, timeouts) lives. Clients build bodies with
//! [`sign`] and [`body`].

use std::time::Duration;

use crate::{Address, Identity};

/// Domain separation of the signed bytes ([`signed_bytes`]).
pub const DOMAIN: &[u8] = b"w2w/v1 spacerift\0";
pub const MAX_SIGNAL: usize = 32 * 1024;
pub const MAX_NAMESPACE: usize = 64;
/// Spacerifts accepts timestamps within the relay's `max_skew_ms`, but never
/// more than this: it bounds how long the replay memory keeps a signature.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// What the relay answers. `W` is what a parked request waits on (see
/// [`Reply::Wait`]); replies handed to a waiting offerer are `Reply<()>`.
#[derive(Debug)]
pub enum Reply<W = ()> {
    /// You answer: here is an offer and the nonce to answer it with.
    Demote {
        nonce: [u8; 16],
        signal: String,
        peer: Address,
    },
    /// Your offer was answered.
    Answer {
        signal: String,
        peer: Address,
    },
    /// Your answer was handed over.
    Delivered,
    /// Your RTT report was recorded.
    Noted,
    /// Nobody to pair with right now (no namespace / in this namespace).
    NoPeer {
        namespaced: bool,
    },
    /// Too fast (this key, or this source IP); retry after this many seconds.
    RateLimited {
        retry_after: u64,
    },
    /// The offer memory (count or bytes) or the replay memory is full.
    Full {
        retry_after: u64,
    },
    BadNonce,
    /// This exact signed request was accepted before.
    Replayed,
    /// Not on the wire: the offerer's request is parked on `W` until its
    /// ANSWER or NO_PEER (the relay encodes that reply instead).
    Wait(W),
}

impl<W> Reply<W> {
    /// The seed's HTTP status codes.
    pub fn status(&self) -> u16 {
        match self {
            Reply::Demote { .. }
            | Reply::Answer { .. }
            | Reply::Delivered
            | Reply::Noted
            | Reply::Wait(_) => 200,
            Reply::NoPeer { namespaced: false } => 299,
            Reply::NoPeer { namespaced: true } => 298,
            Reply::RateLimited { .. } | Reply::Full { .. } => 297,
            Reply::BadNonce | Reply::Replayed => 409,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Reply::Demote {
                nonce,
                signal,
                peer,
            } => {
                json!({"type": "DEMOTE", "nonce": hex::encode(nonce), "signal": signal, "peer": peer.to_hex()})
            }
            Reply::Answer { signal, peer } => {
                json!({"type": "ANSWER", "signal": signal, "peer": peer.to_hex()})
            }
            Reply::Delivered => json!({"type": "DELIVERED"}),
            Reply::Noted => json!({"type": "NOTED"}),
            Reply::NoPeer { namespaced: false } => json!({"error": "no_peer"}),
            Reply::NoPeer { namespaced: true } => json!({"error": "no_namespace_peer"}),
            Reply::RateLimited { retry_after } => {
                json!({"error": "rate_limited", "retry_after": retry_after})
            }
            Reply::Full { retry_after } => json!({"error": "full", "retry_after": retry_after}),
            Reply::BadNonce => json!({"error": "bad_nonce"}),
            Reply::Replayed => json!({"error": "replayed"}),
            Reply::Wait(_) => json!({"error": "internal"}),
        }
    }
}

/// A request (verified once it leaves [`Unverified::verify`]).
#[derive(Debug, Clone)]
pub struct Request {
    pub bounce: bool,
    /// An RTT report (type "RTT", signal `"<peer hex>:<milliseconds>"`):
    /// the measured round trip to a linked peer, used to prefer
    /// lower-latency offers (best-latency peer rotation).
    pub rtt: Option<(Address, u32)>,
    pub namespace: String,
    pub signal: String,
    pub nonce: Option<[u8; 16]>,
    pub key: Address,
    pub sig: [u8; 64],
    /// How much longer a replay of this request would pass the clock check
    /// (how long the replay memory must keep its signature).
    pub fresh_for: Duration,
}

impl Request {
    /// What the replay memory keys on: the signature's R half. Ed25519
    /// derives R from the signed bytes, and strict verification refuses
    /// malleated signatures, so a replay carries the same R and nobody
    /// without the key can produce a verifying request with a given R.
    pub fn replay_id(&self) -> [u8; 32] {
        let mut r = [0u8; 32];
        r.copy_from_slice(&self.sig[..32]);
        r
    }
}

/// The bytes a request's signature covers: [`DOMAIN`], then type (u8
/// length), namespace (u16 BE length), nonce (u8 length, empty if none),
/// signal (u32 BE length), each length-prefixed, and `ts` (u64 BE).
pub fn signed_bytes(ty: &str, namespace: &str, nonce: &[u8], signal: &str, ts: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 16 + ty.len() + namespace.len() + signal.len());
    m.extend_from_slice(DOMAIN);
    m.push(ty.len() as u8);
    m.extend_from_slice(ty.as_bytes());
    m.extend_from_slice(&(namespace.len() as u16).to_be_bytes());
    m.extend_from_slice(namespace.as_bytes());
    m.push(nonce.len() as u8);
    m.extend_from_slice(nonce);
    m.extend_from_slice(&(signal.len() as u32).to_be_bytes());
    m.extend_from_slice(signal.as_bytes());
    m.extend_from_slice(&ts.to_be_bytes());
    m
}

/// A request's signature by `id` (over [`signed_bytes`]; `nonce` empty if
/// none).
pub fn sign(
    id: &Identity,
    ty: &str,
    namespace: &str,
    nonce: &[u8],
    signal: &str,
    ts: u64,
) -> [u8; 64] {
    id.sign(&signed_bytes(ty, namespace, nonce, signal, ts))
}

/// A request body as a client sends it (`namespace` and `nonce` omitted
/// when empty / none), signed or not: see [`sign`].
pub fn body(
    ty: &str,
    namespace: &str,
    nonce: Option<[u8; 16]>,
    signal: &str,
    key: Address,
    ts: u64,
    sig: &[u8; 64],
) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("type".into(), ty.into());
    if !namespace.is_empty() {
        obj.insert("namespace".into(), namespace.into());
    }
    if let Some(n) = nonce {
        obj.insert("nonce".into(), hex::encode(n).into());
    }
    obj.insert("signal".into(), signal.into());
    obj.insert("key".into(), key.to_hex().into());
    obj.insert("ts".into(), ts.into());
    obj.insert("sig".into(), hex::encode(sig).into());
    serde_json::Value::Object(obj).to_string().into_bytes()
}

/// [`body`] signed by `id`.
pub fn signed_body(
    id: &Identity,
    ty: &str,
    namespace: &str,
    nonce: Option<[u8; 16]>,
    signal: &str,
    ts: u64,
) -> Vec<u8> {
    let n = nonce.as_ref().map_or(&[][..], |n| &n[..]);
    let sig = sign(id, ty, namespace, n, signal, ts);
    body(ty, namespace, nonce, signal, id.address(), ts, &sig)
}

/// Why a request body was refused before reaching the state machine.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// 499: a required field is missing.
    Missing(&'static str),
    /// 400 with a machine-readable error.
    Bad(&'static str, String),
}

impl ParseError {
    pub fn status(&self) -> u16 {
        match self {
            ParseError::Missing(_) => 499,
            ParseError::Bad(..) => 400,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        match self {
            ParseError::Missing(field) => {
                serde_json::json!({"error": "missing_parameter", "detail": field})
            }
            ParseError::Bad(error, detail) => {
                serde_json::json!({"error": error, "detail": detail})
            }
        }
    }
}

/// A request that passed the cheap checks of [`parse`] but whose signature
/// has not been checked.
#[derive(Debug)]
pub struct Unverified {
    request: Request,
    ty: &'static str,
    ts: u64,
}

impl Unverified {
    /// The fields as sent (nothing here is authenticated yet).
    pub fn claimed(&self) -> &Request {
        &self.request
    }

    /// Checks the Ed25519 signature (the one expensive step). A relay calls
    /// it only through `w2w_core::spacerift::Admitted::verify`, i.e. after
    /// its cheap limits.
    pub fn verify(self) -> Result<Request, ParseError> {
        let Unverified { request, ty, ts } = self;
        let msg = signed_bytes(
            ty,
            &request.namespace,
            request.nonce.as_ref().map_or(&[][..], |n| &n[..]),
            &request.signal,
            ts,
        );
        request.key.verify(&msg, &request.sig).map_err(|_| {
            ParseError::Bad("bad_signature", "sig does not verify under key".into())
        })?;
        Ok(request)
    }
}

fn bad(detail: impl Into<String>) -> ParseError {
    ParseError::Bad("bad_request", detail.into())
}

/// Takes a present, non-null field out of the body.
fn take(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    k: &str,
) -> Option<serde_json::Value> {
    obj.remove(k).filter(|x| !x.is_null())
}

fn take_string(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    k: &'static str,
) -> Result<String, ParseError> {
    match take(obj, k) {
        None => Err(ParseError::Missing(k)),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(bad(format!("{k} must be a string"))),
    }
}

/// The cheap half of reading a request: JSON, field types and sizes, the
/// clock window (`max_skew_ms`, at most [`MAX_SKEW`]) and the key's format.
/// No signature is checked here (see [`Unverified::verify`]).
pub fn parse(body: &[u8], now_ms: u64, max_skew_ms: u64) -> Result<Unverified, ParseError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("body is not JSON: {e}")))?;
    let serde_json::Value::Object(mut obj) = v else {
        return Err(bad("body must be a JSON object"));
    };
    let (ty, bounce) = match take_string(&mut obj, "type")?.as_str() {
        "CONNECT" => ("CONNECT", false),
        "RTT" => ("RTT", false),
        "BOUNCE" => ("BOUNCE", true),
        other => return Err(bad(format!("unknown type {other:?}"))),
    };
    let signal = take_string(&mut obj, "signal")?;
    if signal.len() > MAX_SIGNAL {
        return Err(bad(format!("signal over {MAX_SIGNAL} bytes")));
    }
    let namespace = match take(&mut obj, "namespace") {
        None => String::new(),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(bad("namespace must be a string")),
    };
    if namespace.len() > MAX_NAMESPACE {
        return Err(bad(format!("namespace over {MAX_NAMESPACE} bytes")));
    }
    let key: Address = take_string(&mut obj, "key")?
        .parse()
        .map_err(|e| bad(format!("key: {e}")))?;
    let ts = take(&mut obj, "ts")
        .ok_or(ParseError::Missing("ts"))?
        .as_u64()
        .ok_or_else(|| bad("ts must be unix milliseconds"))?;
    let skew = max_skew_ms.min(MAX_SKEW.as_millis() as u64);
    if now_ms.abs_diff(ts) > skew {
        return Err(ParseError::Bad(
            "stale_timestamp",
            format!("ts is more than {skew} ms from the relay's clock"),
        ));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(take_string(&mut obj, "sig")?, &mut sig)
        .map_err(|_| bad("sig must be 128 hex characters"))?;
    let nonce = match take(&mut obj, "nonce") {
        None => None,
        Some(n) => {
            let mut b = [0u8; 16];
            hex::decode_to_slice(n.as_str().ok_or_else(|| bad("nonce must be hex"))?, &mut b)
                .map_err(|_| bad("nonce must be 32 hex characters"))?;
            Some(b)
        }
    };
    if bounce && nonce.is_none() {
        return Err(ParseError::Missing("nonce"));
    }
    let rtt = if ty == "RTT" {
        let (peer, ms) = signal
            .split_once(':')
            .ok_or_else(|| bad("RTT signal is \"<peer hex>:<ms>\""))?;
        let peer: Address = peer.parse().map_err(|e| bad(format!("RTT peer: {e}")))?;
        let ms: u32 = ms
            .parse()
            .map_err(|_| bad("RTT milliseconds must be an integer"))?;
        Some((peer, ms))
    } else {
        None
    };
    // |now - ts| ≤ skew, so this is at most 2 × MAX_SKEW.
    let fresh_for = Duration::from_millis(ts.saturating_add(skew).saturating_sub(now_ms));
    Ok(Unverified {
        request: Request {
            bounce,
            rtt,
            namespace,
            signal,
            nonce,
            key,
            sig,
            fresh_for,
        },
        ty,
        ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_parse_and_forgeries_fail() {
        let id = Identity::from_seed([5; 32]);
        let ts = 1_000_000u64;
        let sig = id.sign(&signed_bytes("CONNECT", "ns", &[], "sdp", ts));
        let body = serde_json::json!({
            "type": "CONNECT", "namespace": "ns", "signal": "sdp",
            "key": id.address().to_hex(), "ts": ts, "sig": hex::encode(sig),
        });
        let verify =
            |body: &serde_json::Value| parse(body.to_string().as_bytes(), ts, 60_000)?.verify();
        let ok = verify(&body).unwrap();
        assert_eq!(ok.key, id.address());
        assert_eq!(ok.sig, sig);
        assert_eq!(ok.fresh_for, Duration::from_secs(60));
        let mut tampered = body.clone();
        tampered["signal"] = "other".into();
        assert!(matches!(
            verify(&tampered),
            Err(ParseError::Bad("bad_signature", _))
        ));
        let mut missing = body.clone();
        missing.as_object_mut().unwrap().remove("signal");
        assert_eq!(
            parse(missing.to_string().as_bytes(), ts, 60_000).unwrap_err(),
            ParseError::Missing("signal")
        );
        assert!(matches!(
            parse(body.to_string().as_bytes(), ts + 61_000, 60_000),
            Err(ParseError::Bad("stale_timestamp", _))
        ));
        assert!(matches!(
            parse(b"not json", ts, 60_000),
            Err(ParseError::Bad("bad_request", _))
        ));
        // The helpers build the same request.
        let built = signed_body(&id, "CONNECT", "ns", None, "sdp", ts);
        let built = parse(&built, ts, 60_000).unwrap().verify().unwrap();
        assert_eq!((built.sig, built.key), (sig, id.address()));
    }

    #[test]
    fn signed_bytes_layout_and_domain() {
        let m = signed_bytes("RTT", "n", &[7; 16], "sig", 0x0102);
        let mut want = b"w2w/v1 spacerift\0".to_vec();
        want.extend_from_slice(b"\x03RTT\x00\x01n\x10");
        want.extend_from_slice(&[7; 16]);
        want.extend_from_slice(b"\x00\x00\x00\x03sig");
        want.extend_from_slice(&0x0102u64.to_be_bytes());
        assert_eq!(m, want);
    }

    #[test]
    fn bounce_needs_a_nonce_and_rtt_a_peer() {
        let id = Identity::from_seed([6; 32]);
        let ts = 5_000;
        let b = signed_body(&id, "BOUNCE", "", None, "x", ts);
        assert_eq!(parse(&b, ts, 0).unwrap_err(), ParseError::Missing("nonce"));
        let peer = Identity::from_seed([7; 32]).address();
        let rtt = format!("{}:42", peer.to_hex());
        let b = signed_body(&id, "RTT", "", None, &rtt, ts);
        let r = parse(&b, ts, 0).unwrap().verify().unwrap();
        assert_eq!(r.rtt, Some((peer, 42)));
        let b = signed_body(&id, "RTT", "", None, "nope", ts);
        assert_eq!(parse(&b, ts, 0).unwrap_err().status(), 400);
        let big = "s".repeat(MAX_SIGNAL + 1);
        let b = signed_body(&id, "CONNECT", "", None, &big, ts);
        assert_eq!(parse(&b, ts, 0).unwrap_err().status(), 400);
    }

    #[test]
    fn replies_keep_their_statuses() {
        let cases: [(Reply, u16, &str); 6] = [
            (Reply::Delivered, 200, r#"{"type":"DELIVERED"}"#),
            (
                Reply::NoPeer { namespaced: false },
                299,
                r#"{"error":"no_peer"}"#,
            ),
            (
                Reply::NoPeer { namespaced: true },
                298,
                r#"{"error":"no_namespace_peer"}"#,
            ),
            (
                Reply::RateLimited { retry_after: 2 },
                297,
                r#"{"error":"rate_limited","retry_after":2}"#,
            ),
            (Reply::BadNonce, 409, r#"{"error":"bad_nonce"}"#),
            (Reply::Wait(()), 200, r#"{"error":"internal"}"#),
        ];
        for (r, status, json) in cases {
            assert_eq!((r.status(), r.json().to_string().as_str()), (status, json));
        }
        assert_eq!(ParseError::Missing("ts").status(), 499);
    }
}
