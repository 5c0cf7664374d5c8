//! Spacerifts signaling (POST /spacerift: the wire in
//! crates/w2w-proto/src/spacerift.rs, the state machine in
//! crates/w2w-core/src/spacerift.rs) on hostile input: `spacerift::parse` on
//! arbitrary HTTP bodies, and every request it accepts fed into the pure
//! state machine `Rifts::handle` (parked requests on `LocalWaiter`s), so a
//! sequence of bodies drives the whole signaling path (CONNECT → DEMOTE →
//! CONNECT(nonce) → DELIVERED / ANSWER, BOUNCE, RTT, leases, timeouts, rate
//! limits) as the relay's HTTP handler does.
//!
//! Random bodies almost never carry a valid Ed25519 signature, so an
//! operation can ask the harness to re-sign its body: it is parsed as JSON,
//! `key` is set to one of four fixed identities (optionally `ts` to the
//! relay's clock and `nonce` to the last DEMOTE nonce), and `sig` is computed
//! over the fields `parse` reads. The raw body is always parsed as well.
//!
//! Nothing may panic, and: an accepted request respects the size limits, the
//! clock skew and the signer; `Reply::status`/`json` work on every reply; a
//! DEMOTE hands out the relay's fresh nonce and a live offer of another key
//! in the requester's namespace; DELIVERED coincides with exactly one ANSWER
//! reaching a waiting offerer (with the answerer's key and signal); a waiter
//! only ever receives ANSWER or NO_PEER for its namespace; RTT reports are
//! answered NOTED (or rate limited); the offer table stays bounded.
//!
//! Input layout: `cfg` (u8: bits 0-1 pick max_skew_ms from 60 000, 0, 1,
//! u64::MAX), then operations `flags` (u8), `dt` (u16 BE), `len` (u16 BE),
//! `len` bytes of body. `flags`: bit 0 re-sign, bits 1-2 identity, bit 3 set
//! ts to the relay clock, bit 4 set nonce to the last DEMOTE nonce, bit 5 dt
//! is in seconds (else ms), bit 6 the oldest waiting offerer goes away before
//! this request, bit 7 the relay's random nonce repeats the previous one.
//! Clocks: relay wall clock 1_700_000_000_000 ms + elapsed, `Instant` base +
//! elapsed; the relay nonce of operation i is `5a`×8 ‖ (i + 1) as u64 BE.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use w2w_core::spacerift::{
    LocalReceiver, LocalWaiter, Rifts, TryRecvError, MAX_OFFERS, MAX_PARKED_BYTES, PAIR_INTERVAL,
    REQUEST_INTERVAL,
};
use w2w_proto::spacerift::{parse, signed_bytes, Reply, MAX_NAMESPACE, MAX_SIGNAL};
use w2w_proto::{Address, Identity};

const BASE_MS: u64 = 1_700_000_000_000;
const SKEWS: [u64; 4] = [60_000, 0, 1, u64::MAX];

fn identities() -> &'static [Identity; 4] {
    static IDS: OnceLock<[Identity; 4]> = OnceLock::new();
    IDS.get_or_init(|| std::array::from_fn(|i| Identity::from_seed([0x11 * (i as u8 + 1); 32])))
}

/// `SPACERIFT_TRACE=1` prints each operation's parse result and reply
/// (for reading what a seed or crash input does).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("SPACERIFT_TRACE").is_some())
}

fn relay_nonce(step: usize) -> [u8; 16] {
    let mut n = [0x5a; 16];
    n[8..].copy_from_slice(&(step as u64 + 1).to_be_bytes());
    n
}

/// Rewrites a JSON object body as signed by `id`; None if it is not an
/// object or a field `parse` signs over has the wrong type.
fn resign(body: &[u8], id: &Identity, ts: Option<u64>, nonce: Option<[u8; 16]>) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    obj.insert("key".into(), id.address().to_hex().into());
    if let Some(ts) = ts {
        obj.insert("ts".into(), ts.into());
    }
    if let Some(n) = nonce {
        obj.insert("nonce".into(), hex::encode(n).into());
    }
    let field = |k: &str| obj.get(k).filter(|x| !x.is_null());
    let ty = field("type")?.as_str()?;
    let signal = field("signal")?.as_str()?;
    let namespace = match field("namespace") {
        None => "",
        Some(x) => x.as_str()?,
    };
    let nonce = match field("nonce") {
        None => Vec::new(),
        Some(n) => {
            let mut b = [0u8; 16];
            hex::decode_to_slice(n.as_str()?, &mut b).ok()?;
            b.to_vec()
        }
    };
    let ts = field("ts")?.as_u64()?;
    let sig = id.sign(&signed_bytes(ty, namespace, &nonce, signal, ts));
    obj.insert("sig".into(), hex::encode(sig).into());
    serde_json::to_vec(&v).ok()
}

/// An offerer's parked request, as the HTTP handler holds it.
struct Waiter {
    key: Address,
    namespace: String,
    signal: String,
    rx: Option<LocalReceiver>,
    /// Received its reply, or its offer was dropped without one.
    finished: bool,
}

fn check_reply<W>(reply: &Reply<W>) {
    let status = reply.status();
    assert!(
        matches!(status, 200 | 297 | 298 | 299 | 409),
        "status {status}"
    );
    let json = reply.json();
    assert!(json.is_object());
    let _ = json.to_string();
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, mut rest)) = data.split_first() else {
        return;
    };
    let max_skew_ms = SKEWS[(cfg & 3) as usize];
    let ids = identities();
    let base = Instant::now();
    let mut elapsed_ms: u64 = 0;
    let mut rifts = Rifts::<LocalWaiter>::default();
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut last_demote: Option<[u8; 16]> = None;
    let mut prev_nonce = relay_nonce(0);

    let mut step = 0usize;
    while rest.len() >= 5 {
        let flags = rest[0];
        let dt = u16::from_be_bytes([rest[1], rest[2]]) as u64;
        let len = (u16::from_be_bytes([rest[3], rest[4]]) as usize).min(rest.len() - 5);
        let body = &rest[5..5 + len];
        rest = &rest[5 + len..];

        elapsed_ms += if flags & 0x20 != 0 { dt * 1000 } else { dt };
        let now = base + Duration::from_millis(elapsed_ms);
        let now_ms = BASE_MS + elapsed_ms;
        let nonce = if flags & 0x80 != 0 {
            prev_nonce
        } else {
            relay_nonce(step)
        };
        prev_nonce = nonce;
        step += 1;

        if flags & 0x40 != 0 {
            if let Some(w) = waiters.iter_mut().find(|w| w.rx.is_some()) {
                w.rx = None; // the offerer's HTTP request went away
            }
        }

        // The raw body always goes through the parser.
        let raw = parse(body, now_ms, max_skew_ms);
        let (parsed, signer, signed_body) = if flags & 1 != 0 {
            let id = &ids[((flags >> 1) & 3) as usize];
            let ts = (flags & 0x08 != 0).then_some(now_ms);
            let n = if flags & 0x10 != 0 { last_demote } else { None };
            match resign(body, id, ts, n) {
                Some(b) => (parse(&b, now_ms, max_skew_ms), Some(id.address()), b),
                None => (raw, None, body.to_vec()),
            }
        } else {
            (raw, None, body.to_vec())
        };
        if trace() {
            eprintln!("op {step} t+{elapsed_ms} ms flags {flags:#04x}: parse {parsed:?}");
        }
        let Ok(unverified) = parsed else {
            continue;
        };
        // As the handler does: the per-IP gate (each operation from its own
        // address, so the gate does not starve the harness), the cheap
        // limits, then the signature.
        let ip = std::net::IpAddr::V4((step as u32).into());
        let Ok(pass) = rifts.gate(ip, now) else {
            panic!("a fresh address was gated");
        };
        let admitted = match rifts.admit(pass, unverified, now) {
            Ok(a) => a,
            Err(reply) => {
                check_reply(&reply);
                assert!(
                    matches!(reply, Reply::Replayed | Reply::RateLimited { .. }),
                    "admit refused with {reply:?}"
                );
                continue;
            }
        };
        let Ok(req) = admitted.verify() else {
            continue;
        };

        // What parse accepted.
        assert!(req.signal.len() <= MAX_SIGNAL);
        assert!(req.namespace.len() <= MAX_NAMESPACE);
        assert!(!req.bounce || req.nonce.is_some(), "BOUNCE without nonce");
        if let Some(k) = signer {
            assert_eq!(req.key, k, "accepted under another key than the signer's");
        }
        let v: Value = serde_json::from_slice(&signed_body).expect("accepted body is JSON");
        let ts = v["ts"].as_u64().expect("accepted ts is u64");
        assert!(now_ms.abs_diff(ts) <= max_skew_ms, "stale ts accepted");
        assert_eq!(req.rtt.is_some(), v["type"] == "RTT");

        let reply = rifts.handle(req.clone(), now, nonce);
        check_reply(&reply);
        if trace() {
            eprintln!("    -> {} {}", reply.status(), reply.json());
        }
        assert!(rifts.waiting() <= MAX_OFFERS);
        assert!(rifts.parked_bytes() <= MAX_PARKED_BYTES);

        // What reached the parked offerers.
        let mut answers = 0;
        for w in waiters.iter_mut().filter(|w| !w.finished) {
            let Some(rx) = w.rx.as_mut() else { continue };
            match rx.try_recv() {
                Ok(Reply::Answer { signal, peer }) => {
                    answers += 1;
                    assert!(
                        matches!(reply, Reply::Delivered),
                        "ANSWER without DELIVERED"
                    );
                    assert_eq!(peer, req.key);
                    assert_eq!(signal, req.signal);
                    assert_ne!(w.key, peer, "an offerer answered itself");
                    w.finished = true;
                }
                Ok(Reply::NoPeer { namespaced }) => {
                    assert_eq!(namespaced, !w.namespace.is_empty());
                    w.finished = true;
                }
                Ok(other) => panic!("a waiting offerer received {other:?}"),
                Err(TryRecvError::Closed) => w.finished = true,
                Err(TryRecvError::Empty) => {}
            }
        }
        if matches!(reply, Reply::Delivered) {
            assert_eq!(answers, 1, "DELIVERED but {answers} ANSWERs");
        }

        match reply {
            Reply::Demote {
                nonce: n,
                signal,
                peer,
            } => {
                assert!(req.rtt.is_none());
                assert_eq!(n, nonce, "DEMOTE nonce is not the relay's fresh nonce");
                assert_ne!(peer, req.key, "demoted to its own offer");
                assert!(
                    waiters.iter().any(|w| !w.finished
                        && w.rx.is_some()
                        && w.key == peer
                        && w.signal == signal
                        && w.namespace == req.namespace),
                    "DEMOTE to an offer nobody waits on, or from another namespace"
                );
                last_demote = Some(n);
            }
            Reply::Wait(rx) => {
                assert!(req.rtt.is_none());
                waiters.push(Waiter {
                    key: req.key,
                    namespace: req.namespace.clone(),
                    signal: req.signal.clone(),
                    rx: Some(rx),
                    finished: false,
                });
            }
            Reply::Noted => assert!(req.rtt.is_some(), "NOTED for a non-RTT request"),
            Reply::RateLimited { retry_after } => {
                let max = REQUEST_INTERVAL.max(PAIR_INTERVAL).as_secs();
                assert!(
                    (1..=max).contains(&retry_after),
                    "retry_after {retry_after}"
                );
            }
            Reply::Delivered => assert!(req.rtt.is_none() && !req.bounce),
            Reply::Answer { .. } => panic!("ANSWER returned to a requester"),
            Reply::NoPeer { .. } | Reply::BadNonce | Reply::Replayed | Reply::Full { .. } => {
                assert!(req.rtt.is_none());
            }
        }
        let unfinished = waiters.iter().filter(|w| !w.finished).count();
        assert!(rifts.waiting() <= unfinished, "an offer without a waiter");
    }
});
