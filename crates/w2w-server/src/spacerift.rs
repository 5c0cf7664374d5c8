//! Spacerifts: WebRTC peer linking over plain HTTP in the fewest round trips
//! (seed 002). One long-polled request for the offerer, two for the answerer:
//!
//! ```text
//! Alice  POST CONNECT {signal: offer_A}            ── waits (≤ 15 s)
//! Bob    POST CONNECT {signal: offer_B}  → DEMOTE {nonce, signal: offer_A}
//! Bob    POST CONNECT {nonce, signal: answer_B} → DELIVERED
//! Alice  ◀── ANSWER {signal: answer_B}
//! ```
//!
//! Requests are signed with the client's Ed25519 key (domain-separated,
//! covering type, namespace, nonce, signal and a timestamp). An offer is
//! leased to one answerer at a time; the lease carries an unguessable,
//! single-use nonce bound to that answerer and that offer, and expires after
//! [`LEASE`] (the offer goes back to the queue). The same two keys are not
//! paired again within [`PAIR_MEMORY`]. Every table is bounded.
//!
//! [`Rifts`] is the pure state machine (time and randomness passed in); the
//! HTTP handler in `server.rs` holds it behind a mutex and parks the
//! offerer's request on a oneshot channel.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use w2w_proto::Address;

pub const DOMAIN: &[u8] = b"w2w/v1 spacerift\0";
/// How long an offerer's request waits for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an answerer may take to answer a leased offer.
pub const LEASE: Duration = Duration::from_secs(5);
/// The same pair is not linked again within this.
pub const PAIR_MEMORY: Duration = Duration::from_secs(300);
/// One request per second per key (nonce-carrying requests are exempt).
pub const REQUEST_INTERVAL: Duration = Duration::from_secs(1);
/// One new pairing per five seconds per key.
pub const PAIR_INTERVAL: Duration = Duration::from_secs(5);
pub const MAX_SIGNAL: usize = 32 * 1024;
pub const MAX_NAMESPACE: usize = 64;
/// Bounds on every table.
pub const MAX_OFFERS: usize = 10_000;
pub const MAX_KEYS: usize = 100_000;

/// What the relay answers.
#[derive(Debug)]
pub enum Reply {
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
    /// Too fast; retry after this many seconds.
    RateLimited {
        retry_after: u64,
    },
    BadNonce,
    /// Wait for the offerer side: the request is parked on this channel.
    Wait(oneshot::Receiver<Reply>),
}

impl Reply {
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
            Reply::RateLimited { .. } => 297,
            Reply::BadNonce => 409,
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
            Reply::BadNonce => json!({"error": "bad_nonce"}),
            Reply::Wait(_) => json!({"error": "internal"}),
        }
    }
}

/// A verified request.
#[derive(Debug, Clone)]
pub struct Request {
    pub bounce: bool,
    /// An RTT report (type "RTT", signal "<peer hex>:<milliseconds>"):
    /// the measured round trip to a linked peer, used to prefer
    /// lower-latency offers (best-latency peer rotation).
    pub rtt: Option<(Address, u32)>,
    pub namespace: String,
    pub signal: String,
    pub nonce: Option<[u8; 16]>,
    pub key: Address,
}

/// The bytes a request's signature covers.
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

/// Why a request body was refused before reaching the state machine.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// 499: a required field is missing.
    Missing(&'static str),
    /// 400 with a machine-readable error.
    Bad(&'static str, String),
}

/// Parses and authenticates a JSON request body.
pub fn parse(body: &[u8], now_ms: u64, max_skew_ms: u64) -> Result<Request, ParseError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ParseError::Bad("bad_request", format!("body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ParseError::Bad(
            "bad_request",
            "body must be a JSON object".into(),
        ));
    }
    let field = |k: &'static str| v.get(k).filter(|x| !x.is_null());
    let string = |k: &'static str| -> Result<&str, ParseError> {
        field(k)
            .ok_or(ParseError::Missing(k))?
            .as_str()
            .ok_or(ParseError::Bad(
                "bad_request",
                format!("{k} must be a string"),
            ))
    };
    let ty = string("type")?;
    let bounce = match ty {
        "CONNECT" | "RTT" => false,
        "BOUNCE" => true,
        other => {
            return Err(ParseError::Bad(
                "bad_request",
                format!("unknown type {other:?}"),
            ))
        }
    };
    let signal = string("signal")?;
    if signal.len() > MAX_SIGNAL {
        return Err(ParseError::Bad(
            "bad_request",
            format!("signal over {MAX_SIGNAL} bytes"),
        ));
    }
    let namespace = match field("namespace") {
        None => "",
        Some(x) => x.as_str().ok_or(ParseError::Bad(
            "bad_request",
            "namespace must be a string".into(),
        ))?,
    };
    if namespace.len() > MAX_NAMESPACE {
        return Err(ParseError::Bad(
            "bad_request",
            format!("namespace over {MAX_NAMESPACE} bytes"),
        ));
    }
    let key: Address = string("key")?
        .parse()
        .map_err(|e| ParseError::Bad("bad_request", format!("key: {e}")))?;
    let ts = field("ts")
        .ok_or(ParseError::Missing("ts"))?
        .as_u64()
        .ok_or(ParseError::Bad(
            "bad_request",
            "ts must be unix milliseconds".into(),
        ))?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(string("sig")?, &mut sig)
        .map_err(|_| ParseError::Bad("bad_request", "sig must be 128 hex characters".into()))?;
    let nonce = match field("nonce") {
        None => None,
        Some(n) => {
            let mut b = [0u8; 16];
            hex::decode_to_slice(
                n.as_str()
                    .ok_or(ParseError::Bad("bad_request", "nonce must be hex".into()))?,
                &mut b,
            )
            .map_err(|_| {
                ParseError::Bad("bad_request", "nonce must be 32 hex characters".into())
            })?;
            Some(b)
        }
    };
    if bounce && nonce.is_none() {
        return Err(ParseError::Missing("nonce"));
    }
    if now_ms.abs_diff(ts) > max_skew_ms {
        return Err(ParseError::Bad(
            "stale_timestamp",
            format!("ts is more than {max_skew_ms} ms from the relay's clock"),
        ));
    }
    let msg = signed_bytes(
        ty,
        namespace,
        nonce.as_ref().map_or(&[][..], |n| &n[..]),
        signal,
        ts,
    );
    key.verify(&msg, &sig)
        .map_err(|_| ParseError::Bad("bad_signature", "sig does not verify under key".into()))?;
    let rtt = if ty == "RTT" {
        let (peer, ms) = signal.split_once(':').ok_or(ParseError::Bad(
            "bad_request",
            "RTT signal is \"<peer hex>:<ms>\"".into(),
        ))?;
        let peer: Address = peer
            .parse()
            .map_err(|e| ParseError::Bad("bad_request", format!("RTT peer: {e}")))?;
        let ms: u32 = ms.parse().map_err(|_| {
            ParseError::Bad("bad_request", "RTT milliseconds must be an integer".into())
        })?;
        Some((peer, ms))
    } else {
        None
    };
    Ok(Request {
        bounce,
        rtt,
        namespace: namespace.to_owned(),
        signal: signal.to_owned(),
        nonce,
        key,
    })
}

struct Offer {
    key: Address,
    namespace: String,
    signal: String,
    waiter: oneshot::Sender<Reply>,
    deadline: Instant,
    /// Leased to (answerer, nonce) until the instant.
    lease: Option<(Address, [u8; 16], Instant)>,
}

/// The Spacerifts state: waiting offers, leases, pair memory, limits.
#[derive(Default)]
pub struct Rifts {
    offers: VecDeque<Offer>,
    /// (smaller key, larger key) → when paired.
    pairs: HashMap<(Address, Address), Instant>,
    pair_order: VecDeque<((Address, Address), Instant)>,
    last_request: HashMap<Address, Instant>,
    last_pairing: HashMap<Address, Instant>,
    /// Reported round trips between pairs of keys (latest wins).
    rtts: HashMap<(Address, Address), u32>,
}

fn pair(a: Address, b: Address) -> (Address, Address) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Rifts {
    /// Expires what is due ("reactive": run on every request).
    fn sweep(&mut self, now: Instant) {
        // Offers whose request timed out, or whose requester went away.
        let mut kept = VecDeque::with_capacity(self.offers.len());
        for mut o in self.offers.drain(..) {
            if o.deadline <= now || o.waiter.is_closed() {
                let _ = o.waiter.send(Reply::NoPeer {
                    namespaced: !o.namespace.is_empty(),
                });
                continue;
            }
            if o.lease.is_some_and(|(_, _, until)| until <= now) {
                o.lease = None; // requeued: the answerer did not answer
            }
            kept.push_back(o);
        }
        self.offers = kept;
        while let Some(&(k, t)) = self.pair_order.front() {
            if now.duration_since(t) < PAIR_MEMORY && self.pair_order.len() <= MAX_KEYS {
                break;
            }
            self.pair_order.pop_front();
            if self.pairs.get(&k) == Some(&t) {
                self.pairs.remove(&k);
            }
        }
        if self.last_request.len() > MAX_KEYS {
            self.last_request
                .retain(|_, t| now.duration_since(*t) < REQUEST_INTERVAL);
        }
        if self.last_pairing.len() > MAX_KEYS {
            self.last_pairing
                .retain(|_, t| now.duration_since(*t) < PAIR_INTERVAL);
        }
    }

    fn recently_paired(&self, a: Address, b: Address, now: Instant) -> bool {
        self.pairs
            .get(&pair(a, b))
            .is_some_and(|t| now.duration_since(*t) < PAIR_MEMORY)
    }

    fn remember_pair(&mut self, a: Address, b: Address, now: Instant) {
        self.pairs.insert(pair(a, b), now);
        self.pair_order.push_back((pair(a, b), now));
        self.last_pairing.insert(a, now);
        self.last_pairing.insert(b, now);
    }

    /// Handles one verified request. `nonce` supplies fresh random bytes.
    pub fn handle(&mut self, req: Request, now: Instant, nonce: [u8; 16]) -> Reply {
        self.sweep(now);
        let has_valid_nonce = req.nonce.is_some_and(|n| {
            self.offers
                .iter()
                .any(|o| o.lease.is_some_and(|(k, ln, _)| k == req.key && ln == n))
        });
        // 1 request/s per key; a request carrying a valid nonce is the
        // second leg of a pairing and is never refused for speed.
        if !has_valid_nonce {
            if let Some(t) = self.last_request.get(&req.key) {
                let since = now.duration_since(*t);
                if since < REQUEST_INTERVAL {
                    return Reply::RateLimited {
                        retry_after: (REQUEST_INTERVAL - since).as_secs().max(1),
                    };
                }
            }
            self.last_request.insert(req.key, now);
        }
        if let Some((peer, ms)) = req.rtt {
            if self.rtts.len() >= MAX_KEYS {
                self.rtts.clear(); // bounded; reports are refreshed by clients
            }
            self.rtts.insert(pair(req.key, peer), ms);
            return Reply::Noted;
        }
        match (req.bounce, req.nonce) {
            (false, Some(n)) => self.answer(req, n, now, nonce),
            (true, Some(n)) => {
                // Bob is already linked to this offerer: give the offer back
                // to the queue (never to Bob again), then Bob's signal is a
                // fresh offer.
                let Some(o) = self
                    .offers
                    .iter_mut()
                    .find(|o| o.lease.is_some_and(|(k, ln, _)| k == req.key && ln == n))
                else {
                    return Reply::BadNonce;
                };
                o.lease = None;
                let offerer = o.key;
                self.pairs.insert(pair(offerer, req.key), now);
                self.pair_order.push_back((pair(offerer, req.key), now));
                self.connect(req, now, nonce)
            }
            (_, None) => self.connect(req, now, nonce),
        }
    }

    /// A CONNECT with an offer: take a waiting offer (DEMOTE) or wait.
    fn connect(&mut self, req: Request, now: Instant, nonce: [u8; 16]) -> Reply {
        if let Some(t) = self.last_pairing.get(&req.key) {
            let since = now.duration_since(*t);
            if since < PAIR_INTERVAL {
                return Reply::RateLimited {
                    retry_after: (PAIR_INTERVAL - since).as_secs().max(1),
                };
            }
        }
        // A newer offer from the same key replaces the older one.
        self.offers.retain(|o| {
            if o.key == req.key && o.lease.is_none() {
                return false;
            }
            true
        });
        // Best-latency rotation: among eligible offers, the one whose key
        // reported (or was reported with) the lowest RTT to this requester;
        // otherwise the oldest.
        let candidate = self
            .offers
            .iter()
            .enumerate()
            .filter(|(_, o)| {
                o.namespace == req.namespace
                    && o.key != req.key
                    && o.lease.is_none()
                    && !self.recently_paired(o.key, req.key, now)
                    && !self.holds_lease_from(req.key, o.key)
            })
            .min_by_key(|(i, o)| {
                let rtt = self
                    .rtts
                    .get(&pair(o.key, req.key))
                    .copied()
                    .unwrap_or(u32::MAX);
                (rtt, *i)
            })
            .map(|(i, _)| i);
        if let Some(i) = candidate {
            let o = &mut self.offers[i];
            o.lease = Some((req.key, nonce, now + LEASE));
            return Reply::Demote {
                nonce,
                signal: o.signal.clone(),
                peer: o.key,
            };
        }
        if self.offers.len() >= MAX_OFFERS {
            return Reply::NoPeer {
                namespaced: !req.namespace.is_empty(),
            };
        }
        let (tx, rx) = oneshot::channel();
        self.offers.push_back(Offer {
            key: req.key,
            namespace: req.namespace,
            signal: req.signal,
            waiter: tx,
            deadline: now + REQUEST_TIMEOUT,
            lease: None,
        });
        Reply::Wait(rx)
    }

    /// Whether `answerer` holds a lease on an offer from `offerer` now: a
    /// second offer of the same key must not be leased to it as well, or
    /// the pair could be linked twice within the pair memory.
    fn holds_lease_from(&self, answerer: Address, offerer: Address) -> bool {
        self.offers
            .iter()
            .any(|o| o.key == offerer && o.lease.is_some_and(|(k, _, _)| k == answerer))
    }

    /// A CONNECT with a nonce: Bob's answer to the offer he was leased.
    fn answer(&mut self, req: Request, n: [u8; 16], now: Instant, nonce: [u8; 16]) -> Reply {
        let namespaced = !req.namespace.is_empty();
        let Some(i) = self
            .offers
            .iter()
            .position(|o| o.lease.is_some_and(|(k, ln, _)| k == req.key && ln == n))
        else {
            return Reply::BadNonce;
        };
        let Some(o) = self.offers.remove(i) else {
            return Reply::BadNonce;
        };
        let offerer = o.key;
        match o.waiter.send(Reply::Answer {
            signal: req.signal.clone(),
            peer: req.key,
        }) {
            Ok(()) => {
                self.remember_pair(offerer, req.key, now);
                Reply::Delivered
            }
            // Alice went away meanwhile: Bob gets another offer if there is
            // one (the seed's second DEMOTE), else "no peer".
            Err(_) => match self.connect(Request { nonce: None, ..req }, now, nonce) {
                Reply::Wait(_) => {
                    // Bob sent an answer, not an offer: don't park it.
                    self.offers.pop_back();
                    Reply::NoPeer { namespaced }
                }
                r => r,
            },
        }
    }

    /// Offers currently waiting (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.offers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: u8, ns: &str, signal: &str, nonce: Option<[u8; 16]>, bounce: bool) -> Request {
        Request {
            bounce,
            rtt: None,
            namespace: ns.into(),
            signal: signal.into(),
            nonce,
            key: Address([key; 32]),
        }
    }

    #[test]
    fn three_round_trips_link_two_peers() {
        let mut r = Rifts::default();
        let t = Instant::now();
        let Reply::Wait(mut alice) = r.handle(req(1, "ns", "offer-a", None, false), t, [1; 16])
        else {
            panic!("alice should wait")
        };
        let Reply::Demote {
            nonce,
            signal,
            peer,
        } = r.handle(req(2, "ns", "offer-b", None, false), t, [2; 16])
        else {
            panic!("bob should be demoted")
        };
        assert_eq!((signal.as_str(), peer), ("offer-a", Address([1; 32])));
        assert!(matches!(
            r.handle(req(2, "ns", "answer-b", Some(nonce), false), t, [3; 16]),
            Reply::Delivered
        ));
        match alice.try_recv().unwrap() {
            Reply::Answer { signal, peer } => {
                assert_eq!((signal.as_str(), peer), ("answer-b", Address([2; 32])))
            }
            other => panic!("{other:?}"),
        }
        // The nonce is single-use.
        let later = t + Duration::from_secs(2);
        assert!(matches!(
            r.handle(req(2, "ns", "again", Some(nonce), false), later, [4; 16]),
            Reply::BadNonce
        ));
    }

    #[test]
    fn one_answerer_is_never_leased_two_offers_of_one_key() {
        // Fuzzing finding F3: Alice offers, Bob is leased it; Alice offers
        // again (the leased offer stays); Bob's next CONNECT must not be
        // leased Alice's second offer, or both answers would be delivered
        // and the pair linked twice within the pair memory.
        let mut r = Rifts::default();
        let t = Instant::now();
        let _alice1 = r.handle(req(1, "ns", "offer-a1", None, false), t, [1; 16]);
        let Reply::Demote { nonce: n1, .. } =
            r.handle(req(2, "ns", "offer-b", None, false), t, [2; 16])
        else {
            panic!("bob should be demoted")
        };
        let t1 = t + Duration::from_millis(1500);
        let _alice2 = r.handle(req(1, "ns", "offer-a2", None, false), t1, [3; 16]);
        let again = r.handle(req(2, "ns", "offer-b2", None, false), t1, [4; 16]);
        assert!(
            !matches!(again, Reply::Demote { peer, .. } if peer == Address([1; 32])),
            "bob was leased a second offer from alice"
        );
        // His answer to the first lease still links them, once.
        assert!(matches!(
            r.handle(req(2, "ns", "answer-b", Some(n1), false), t1, [5; 16]),
            Reply::Delivered
        ));
    }

    #[test]
    fn limits_namespaces_leases_and_pair_memory() {
        let mut r = Rifts::default();
        let t = Instant::now();
        let _alice = r.handle(req(1, "a", "offer-a", None, false), t, [1; 16]);
        // Too fast for the same key.
        assert!(matches!(
            r.handle(req(1, "a", "x", None, false), t, [9; 16]),
            Reply::RateLimited { .. }
        ));
        // Another namespace does not see Alice.
        let Reply::Wait(mut carol) = r.handle(req(3, "b", "offer-c", None, false), t, [2; 16])
        else {
            panic!()
        };
        // Bob is leased Alice's offer, never answers: the lease expires and
        // Dave gets the same offer with a new nonce.
        let Reply::Demote { nonce: n1, .. } =
            r.handle(req(2, "a", "offer-b", None, false), t, [3; 16])
        else {
            panic!()
        };
        let t2 = t + LEASE + Duration::from_millis(1);
        let Reply::Demote {
            nonce: n2, peer, ..
        } = r.handle(req(4, "a", "offer-d", None, false), t2, [4; 16])
        else {
            panic!("offer not requeued")
        };
        assert_eq!(peer, Address([1; 32]));
        assert_ne!(n1, n2);
        // Bob's late answer: his nonce is gone.
        assert!(matches!(
            r.handle(req(2, "a", "late", Some(n1), false), t2, [5; 16]),
            Reply::BadNonce
        ));
        // Dave answers; Alice and Dave are not paired again within 5 min.
        assert!(matches!(
            r.handle(req(4, "a", "answer-d", Some(n2), false), t2, [6; 16]),
            Reply::Delivered
        ));
        let t3 = t2 + PAIR_INTERVAL + Duration::from_secs(1);
        let Reply::Wait(_a2) = r.handle(req(1, "a", "offer-a2", None, false), t3, [7; 16]) else {
            panic!()
        };
        assert!(matches!(
            r.handle(req(4, "a", "offer-d2", None, false), t3, [8; 16]),
            Reply::Wait(_)
        ));
        // Carol's request times out as "no namespace peer".
        r.handle(
            req(9, "z", "x", None, false),
            t + REQUEST_TIMEOUT + Duration::from_secs(1),
            [0; 16],
        );
        assert!(matches!(
            carol.try_recv().unwrap(),
            Reply::NoPeer { namespaced: true }
        ));
    }

    #[test]
    fn bounce_requeues_the_offer_for_someone_else() {
        let mut r = Rifts::default();
        let t = Instant::now();
        let _alice = r.handle(req(1, "", "offer-a", None, false), t, [1; 16]);
        let Reply::Demote { nonce, .. } = r.handle(req(2, "", "offer-b", None, false), t, [2; 16])
        else {
            panic!()
        };
        // Bob is already linked to Alice: bounce. His signal becomes an offer
        // (nobody else waits, so he waits) and Alice's offer is free again.
        assert!(matches!(
            r.handle(req(2, "", "offer-b2", Some(nonce), true), t, [3; 16]),
            Reply::Wait(_)
        ));
        let t2 = t + Duration::from_secs(2);
        match r.handle(req(3, "", "offer-c", None, false), t2, [4; 16]) {
            Reply::Demote { peer, .. } => {
                assert!(peer == Address([1; 32]) || peer == Address([2; 32]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lower_latency_offers_are_preferred() {
        let mut r = Rifts::default();
        let t = Instant::now();
        let _a = r.handle(req(1, "", "offer-1", None, false), t, [1; 16]);
        // 1 and 2 were paired recently, so both offers wait.
        r.pairs.insert(pair(Address([1; 32]), Address([2; 32])), t);
        let _b = r.handle(req(2, "", "offer-2", None, false), t, [2; 16]);
        assert!(matches!(_b, Reply::Wait(_)));
        // Key 3 reports 200 ms to key 1 and 20 ms to key 2.
        for (peer, ms, n) in [(1u8, 200u32, 5u8), (2, 20, 6)] {
            let mut q = req(3, "", "", None, false);
            q.rtt = Some((Address([peer; 32]), ms));
            let later = t + Duration::from_secs(n as u64);
            assert!(matches!(r.handle(q, later, [n; 16]), Reply::Noted));
        }
        // Without the reports key 1 (the oldest offer) would be chosen.
        let t2 = t + Duration::from_secs(10);
        match r.handle(req(3, "", "offer-3", None, false), t2, [7; 16]) {
            Reply::Demote { peer, .. } => assert_eq!(peer, Address([2; 32])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signed_requests_parse_and_forgeries_fail() {
        let id = w2w_proto::Identity::from_seed([5; 32]);
        let ts = 1_000_000u64;
        let sig = id.sign(&signed_bytes("CONNECT", "ns", &[], "sdp", ts));
        let body = serde_json::json!({
            "type": "CONNECT", "namespace": "ns", "signal": "sdp",
            "key": id.address().to_hex(), "ts": ts, "sig": hex::encode(sig),
        });
        let ok = parse(body.to_string().as_bytes(), ts, 60_000).unwrap();
        assert_eq!(ok.key, id.address());
        let mut tampered = body.clone();
        tampered["signal"] = "other".into();
        assert!(matches!(
            parse(tampered.to_string().as_bytes(), ts, 60_000),
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
    }
}
