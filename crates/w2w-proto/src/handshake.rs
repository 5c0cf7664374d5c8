//! Registration: the seed's sigA → sigB → sigC, made sound.
//!
//! ```text
//! relay  → client  CHALLENGE   relay_key, relay_nonce (32 fresh random bytes)
//! client → relay   REGISTER    role, relay_key, client_key, client_nonce, timestamp, url, sigA
//! relay  → client  COUNTERSIGN sigB
//! client → relay   CONFIRM     sigC
//! relay  → client  REPLY_BACK  (the seed's replyBack: registration complete)
//! ```
//!
//! The transcript signed by sigA binds the protocol version, the role, the
//! relay's key, the URL the client dialled, both nonces and the client's
//! clock, each field at a fixed offset or length-prefixed:
//!
//! ```text
//! sigA = Sign(client, SIG_A_DOMAIN || version || role || relay_key || relay_nonce
//!                     || client_key || client_nonce || timestamp_ms(u64 BE)
//!                     || url_len(u16 BE) || url)
//! th   = SHA-256(the sigA message above)
//! sigB = Sign(relay,  SIG_B_DOMAIN || th || sigA)
//! sigC = Sign(client, SIG_C_DOMAIN || th || sigB)
//! ```
//!
//! REGISTER carries the relay key the client means to register with, so a
//! client that reached the wrong relay is told `WrongRelay` rather than a bare
//! signature failure. Each signature has its own domain prefix, so no signature can be replayed
//! as another. The relay nonce makes a captured REGISTER useless on any other
//! connection; the relay also remembers accepted client nonces for the skew
//! window and rejects their reuse as `Replay`. sigB proves the relay holds the
//! key the client expected (pinned on first use by the caller); sigC proves
//! the client saw sigB, completing mutual authentication.

use sha2::{Digest, Sha256};

use crate::codes::ErrorCode;
use crate::frame::{Challenge, Confirm, Countersign, Register, ReplyBack, Role};
use crate::identity::{Address, Identity};
use crate::PROTOCOL_VERSION;

pub const SIG_A_DOMAIN: &[u8] = b"w2w/v1 register sigA\0";
pub const SIG_B_DOMAIN: &[u8] = b"w2w/v1 register sigB\0";
pub const SIG_C_DOMAIN: &[u8] = b"w2w/v1 register sigC\0";

/// Default allowed difference between the client's and relay's clocks.
pub const DEFAULT_MAX_SKEW_MS: u64 = 60_000;

/// The exact bytes sigA signs.
pub fn sig_a_message(reg: &Register, relay_nonce: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIG_A_DOMAIN.len() + 2 + 4 * 32 + 8 + 2 + reg.url.len());
    m.extend_from_slice(SIG_A_DOMAIN);
    m.push(PROTOCOL_VERSION);
    m.push(reg.role as u8);
    m.extend_from_slice(&reg.relay_key.0);
    m.extend_from_slice(relay_nonce);
    m.extend_from_slice(&reg.client_key.0);
    m.extend_from_slice(&reg.client_nonce);
    m.extend_from_slice(&reg.timestamp_ms.to_be_bytes());
    m.extend_from_slice(&(reg.url.len() as u16).to_be_bytes());
    m.extend_from_slice(reg.url.as_bytes());
    m
}

/// The transcript hash `th`.
pub fn transcript_hash(sig_a_msg: &[u8]) -> [u8; 32] {
    Sha256::digest(sig_a_msg).into()
}

/// The exact bytes sigB signs.
pub fn sig_b_message(th: &[u8; 32], sig_a: &[u8; 64]) -> Vec<u8> {
    [SIG_B_DOMAIN, th, sig_a].concat()
}

/// The exact bytes sigC signs.
pub fn sig_c_message(th: &[u8; 32], sig_b: &[u8; 64]) -> Vec<u8> {
    [SIG_C_DOMAIN, th, sig_b].concat()
}

/// Why a registration failed. Each relay-side variant has its own wire code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The timestamp is further than the allowed skew from the relay's clock.
    #[error("timestamp is {skew_ms} ms from the relay's clock (max {max_ms} ms)")]
    StaleTimestamp { skew_ms: u64, max_ms: u64 },
    /// The transcript names another relay's key.
    #[error("registration is addressed to relay {0}, not this one")]
    WrongRelay(Address),
    /// The transcript names a URL this relay does not serve.
    #[error("registration names URL {0:?}, which this relay does not serve")]
    WrongUrl(String),
    /// The client nonce was used before.
    #[error("client nonce was already used")]
    Replay,
    /// A client signature (sigA or sigC) does not verify.
    #[error("{0} does not verify under the client's key")]
    BadSignature(&'static str),
    /// The role is not accepted on this endpoint.
    #[error("role {0:?} is not accepted here")]
    WrongRole(Role),
    /// A frame arrived that the current state does not expect.
    #[error("unexpected {0} frame during registration")]
    Unexpected(&'static str),
    /// Client side: the relay's key differs from the pinned one.
    #[error("relay key changed: pinned {pinned}, relay presented {presented}")]
    RelayKeyChanged { pinned: Address, presented: Address },
    /// Client side: sigB does not verify under the relay's key.
    #[error("sigB does not verify under the relay's key")]
    BadRelaySignature,
    /// Client side: the URL is longer than the protocol allows.
    #[error("relay URL is {0} bytes; the maximum is {max}", max = crate::frame::MAX_URL_LEN)]
    UrlTooLong(usize),
    /// Client side: REPLY_BACK names an address other than ours.
    #[error("relay confirmed a different address")]
    WrongAddress,
}

impl HandshakeError {
    /// The wire code a relay reports for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::StaleTimestamp { .. } => ErrorCode::StaleTimestamp,
            HandshakeError::WrongRelay(_) => ErrorCode::WrongRelay,
            HandshakeError::WrongUrl(_) => ErrorCode::WrongUrl,
            HandshakeError::Replay => ErrorCode::Replay,
            HandshakeError::BadSignature(_) => ErrorCode::BadSignature,
            HandshakeError::WrongRole(_) => ErrorCode::WrongRole,
            HandshakeError::Unexpected(_) => ErrorCode::UnexpectedFrame,
            HandshakeError::UrlTooLong(_) => ErrorCode::Malformed,
            HandshakeError::RelayKeyChanged { .. }
            | HandshakeError::BadRelaySignature
            | HandshakeError::WrongAddress => ErrorCode::BadSignature,
        }
    }
}

/// Bounded memory of client nonces from accepted registrations.
///
/// An entry is kept until its registration's timestamp leaves the skew
/// window (after which the timestamp check rejects a replay anyway). When
/// full, the oldest entry is dropped: a replay of that nonce would still fail,
/// because sigA binds the relay nonce of the connection it was made on.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    expiry: std::collections::VecDeque<(u64, [u8; 32])>,
    seen: std::collections::HashSet<[u8; 32]>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity: capacity.max(1),
            expiry: Default::default(),
            seen: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn prune(&mut self, now_ms: u64) {
        while let Some(&(exp, nonce)) = self.expiry.front() {
            if exp > now_ms && self.expiry.len() < self.capacity {
                break;
            }
            self.expiry.pop_front();
            self.seen.remove(&nonce);
        }
    }

    pub fn contains(&self, nonce: &[u8; 32]) -> bool {
        self.seen.contains(nonce)
    }

    pub fn insert(&mut self, nonce: [u8; 32], expires_ms: u64, now_ms: u64) {
        self.prune(now_ms);
        if self.seen.insert(nonce) {
            self.expiry.push_back((expires_ms, nonce));
        }
    }
}

/// What the relay learns from a completed registration: the seed's
/// registration record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub role: Role,
    pub address: Address,
    pub url: String,
    pub timestamp_ms: u64,
    pub client_nonce: [u8; 32],
    /// The relay's CHALLENGE nonce: with the fields above it lets anyone
    /// re-verify sigA (federation presence records carry it).
    pub relay_nonce: [u8; 32],
    pub relay_key: Address,
    pub sig_a: [u8; 64],
    pub sig_b: [u8; 64],
    pub sig_c: [u8; 64],
}

enum RelayState {
    AwaitRegister,
    AwaitConfirm {
        reg: Box<Register>,
        th: [u8; 32],
        sig_b: [u8; 64],
    },
    Done,
}

/// Relay side of registration, one per connection.
pub struct RelayHandshake {
    relay_key: Address,
    relay_nonce: [u8; 32],
    state: RelayState,
}

/// Relay-side checks that depend on configuration.
#[derive(Debug, Clone)]
pub struct RelayPolicy {
    pub max_skew_ms: u64,
    /// Whether relays (role 1) may register here to peer.
    pub accept_relays: bool,
}

impl Default for RelayPolicy {
    fn default() -> Self {
        RelayPolicy {
            max_skew_ms: DEFAULT_MAX_SKEW_MS,
            accept_relays: false,
        }
    }
}

impl RelayHandshake {
    /// `relay_nonce` must be fresh random bytes, never reused.
    pub fn new(relay_key: Address, relay_nonce: [u8; 32]) -> Self {
        RelayHandshake {
            relay_key,
            relay_nonce,
            state: RelayState::AwaitRegister,
        }
    }

    pub fn challenge(&self) -> Challenge {
        Challenge {
            relay_key: self.relay_key,
            relay_nonce: self.relay_nonce,
        }
    }

    /// Checks REGISTER and returns sigB. Checks run cheapest first and the
    /// nonce is remembered only once sigA verifies, so garbage cannot fill
    /// the replay cache.
    pub fn on_register(
        &mut self,
        relay: &Identity,
        reg: Register,
        now_ms: u64,
        policy: &RelayPolicy,
        url_ok: impl FnOnce(&str) -> bool,
        replay: &mut ReplayCache,
    ) -> Result<Countersign, HandshakeError> {
        if !matches!(self.state, RelayState::AwaitRegister) {
            return Err(HandshakeError::Unexpected("REGISTER"));
        }
        if reg.role == Role::Relay && !policy.accept_relays {
            return Err(HandshakeError::WrongRole(reg.role));
        }
        let skew_ms = now_ms.abs_diff(reg.timestamp_ms);
        if skew_ms > policy.max_skew_ms {
            return Err(HandshakeError::StaleTimestamp {
                skew_ms,
                max_ms: policy.max_skew_ms,
            });
        }
        if reg.relay_key != self.relay_key {
            return Err(HandshakeError::WrongRelay(reg.relay_key));
        }
        if !url_ok(&reg.url) {
            return Err(HandshakeError::WrongUrl(reg.url));
        }
        if replay.contains(&reg.client_nonce) {
            return Err(HandshakeError::Replay);
        }
        let msg = sig_a_message(&reg, &self.relay_nonce);
        reg.client_key
            .verify(&msg, &reg.sig_a)
            .map_err(|_| HandshakeError::BadSignature("sigA"))?;
        replay.insert(
            reg.client_nonce,
            reg.timestamp_ms.saturating_add(policy.max_skew_ms),
            now_ms,
        );
        let th = transcript_hash(&msg);
        let sig_b = relay.sign(&sig_b_message(&th, &reg.sig_a));
        self.state = RelayState::AwaitConfirm {
            reg: Box::new(reg),
            th,
            sig_b,
        };
        Ok(Countersign { sig_b })
    }

    /// Checks sigC; on success the client is registered.
    pub fn on_confirm(&mut self, c: Confirm) -> Result<Registration, HandshakeError> {
        let RelayState::AwaitConfirm { reg, th, sig_b } =
            std::mem::replace(&mut self.state, RelayState::Done)
        else {
            return Err(HandshakeError::Unexpected("CONFIRM"));
        };
        reg.client_key
            .verify(&sig_c_message(&th, &sig_b), &c.sig_c)
            .map_err(|_| HandshakeError::BadSignature("sigC"))?;
        Ok(Registration {
            role: reg.role,
            address: reg.client_key,
            url: reg.url,
            timestamp_ms: reg.timestamp_ms,
            client_nonce: reg.client_nonce,
            relay_nonce: self.relay_nonce,
            relay_key: self.relay_key,
            sig_a: reg.sig_a,
            sig_b,
            sig_c: c.sig_c,
        })
    }
}

enum ClientState {
    AwaitChallenge,
    AwaitCountersign {
        relay_key: Address,
        th: [u8; 32],
        sig_a: [u8; 64],
    },
    AwaitReplyBack {
        relay_key: Address,
    },
    Done,
}

/// Client side of registration.
pub struct ClientHandshake {
    identity: Identity,
    role: Role,
    url: String,
    client_nonce: [u8; 32],
    pinned: Option<Address>,
    state: ClientState,
}

/// A completed client registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRegistered {
    pub relay_key: Address,
    pub reply_back: ReplyBack,
}

impl ClientHandshake {
    /// `url` is the URL being dialled, exactly as the relay should see it;
    /// `pinned` is the relay key expected from an earlier visit, if any.
    pub fn new(
        identity: Identity,
        role: Role,
        url: impl Into<String>,
        client_nonce: [u8; 32],
        pinned: Option<Address>,
    ) -> Self {
        ClientHandshake {
            identity,
            role,
            url: url.into(),
            client_nonce,
            pinned,
            state: ClientState::AwaitChallenge,
        }
    }

    /// Answers CHALLENGE with REGISTER (sigA).
    pub fn on_challenge(&mut self, ch: Challenge, now_ms: u64) -> Result<Register, HandshakeError> {
        if !matches!(self.state, ClientState::AwaitChallenge) {
            return Err(HandshakeError::Unexpected("CHALLENGE"));
        }
        if self.url.len() > crate::frame::MAX_URL_LEN {
            return Err(HandshakeError::UrlTooLong(self.url.len()));
        }
        if let Some(pinned) = self.pinned {
            if pinned != ch.relay_key {
                return Err(HandshakeError::RelayKeyChanged {
                    pinned,
                    presented: ch.relay_key,
                });
            }
        }
        let mut reg = Register {
            role: self.role,
            relay_key: ch.relay_key,
            client_key: self.identity.address(),
            client_nonce: self.client_nonce,
            timestamp_ms: now_ms,
            url: self.url.clone(),
            sig_a: [0; 64],
        };
        let msg = sig_a_message(&reg, &ch.relay_nonce);
        reg.sig_a = self.identity.sign(&msg);
        self.state = ClientState::AwaitCountersign {
            relay_key: ch.relay_key,
            th: transcript_hash(&msg),
            sig_a: reg.sig_a,
        };
        Ok(reg)
    }

    /// Verifies sigB and answers with CONFIRM (sigC).
    pub fn on_countersign(&mut self, cs: Countersign) -> Result<Confirm, HandshakeError> {
        let ClientState::AwaitCountersign {
            relay_key,
            th,
            sig_a,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(HandshakeError::Unexpected("COUNTERSIGN"));
        };
        relay_key
            .verify(&sig_b_message(&th, &sig_a), &cs.sig_b)
            .map_err(|_| HandshakeError::BadRelaySignature)?;
        let sig_c = self.identity.sign(&sig_c_message(&th, &cs.sig_b));
        self.state = ClientState::AwaitReplyBack { relay_key };
        Ok(Confirm { sig_c })
    }

    /// Accepts REPLY_BACK: registration is complete.
    pub fn on_reply_back(&mut self, rb: ReplyBack) -> Result<ClientRegistered, HandshakeError> {
        let ClientState::AwaitReplyBack { relay_key } =
            std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(HandshakeError::Unexpected("REPLY_BACK"));
        };
        if rb.address != self.identity.address() {
            return Err(HandshakeError::WrongAddress);
        }
        Ok(ClientRegistered {
            relay_key,
            reply_back: rb,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const URL: &str = "ws://127.0.0.1:7777/";

    fn setup() -> (Identity, Identity, RelayHandshake, ClientHandshake) {
        let relay = Identity::from_seed([1; 32]);
        let client = Identity::from_seed([2; 32]);
        let rh = RelayHandshake::new(relay.address(), [3; 32]);
        let ch = ClientHandshake::new(client.clone(), Role::Client, URL, [4; 32], None);
        (relay, client, rh, ch)
    }

    fn url_ok(u: &str) -> bool {
        u == URL
    }

    #[test]
    fn full_handshake() {
        let (relay, client, mut rh, mut ch) = setup();
        let mut cache = ReplayCache::new(16);
        let reg = ch.on_challenge(rh.challenge(), NOW).unwrap();
        let cs = rh
            .on_register(
                &relay,
                reg,
                NOW + 5,
                &RelayPolicy::default(),
                url_ok,
                &mut cache,
            )
            .unwrap();
        let confirm = ch.on_countersign(cs).unwrap();
        let r = rh.on_confirm(confirm).unwrap();
        assert_eq!(r.address, client.address());
        let done = ch
            .on_reply_back(ReplyBack {
                address: client.address(),
                relay_time_ms: NOW,
                relay_url: URL.into(),
            })
            .unwrap();
        assert_eq!(done.relay_key, relay.address());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn rejections_have_distinct_codes() {
        let policy = RelayPolicy::default();
        // stale
        let (relay, _, mut rh, mut ch) = setup();
        let reg = ch.on_challenge(rh.challenge(), NOW - 61_000).unwrap();
        let e = rh
            .on_register(&relay, reg, NOW, &policy, url_ok, &mut ReplayCache::new(4))
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::StaleTimestamp);
        // wrong url
        let (relay, _, mut rh, mut ch) = setup();
        let reg = ch.on_challenge(rh.challenge(), NOW).unwrap();
        let e = rh
            .on_register(
                &relay,
                reg,
                NOW,
                &policy,
                |_| false,
                &mut ReplayCache::new(4),
            )
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::WrongUrl);
        // bad sigA: signed over a different relay nonce
        let (relay, _, mut rh, mut ch) = setup();
        let mut challenge = rh.challenge();
        challenge.relay_nonce = [9; 32];
        let reg = ch.on_challenge(challenge, NOW).unwrap();
        let e = rh
            .on_register(&relay, reg, NOW, &policy, url_ok, &mut ReplayCache::new(4))
            .unwrap_err();
        assert_eq!(e, HandshakeError::BadSignature("sigA"));
        // replay: same REGISTER on a second connection
        let (relay, _, mut rh, mut ch) = setup();
        let mut cache = ReplayCache::new(4);
        let reg = ch.on_challenge(rh.challenge(), NOW).unwrap();
        rh.on_register(&relay, reg.clone(), NOW, &policy, url_ok, &mut cache)
            .unwrap();
        let mut rh2 = RelayHandshake::new(relay.address(), [5; 32]);
        let e = rh2
            .on_register(&relay, reg, NOW, &policy, url_ok, &mut cache)
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Replay);
        // wrong relay
        let (relay, _, mut rh, mut ch) = setup();
        let other = Identity::from_seed([8; 32]).address();
        let mut challenge = rh.challenge();
        challenge.relay_key = other;
        let reg = ch.on_challenge(challenge, NOW).unwrap();
        let e = rh
            .on_register(&relay, reg, NOW, &policy, url_ok, &mut ReplayCache::new(4))
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::WrongRelay);
        // wrong role
        let (relay, client, mut rh, _) = setup();
        let mut ch = ClientHandshake::new(client, Role::Relay, URL, [4; 32], None);
        let reg = ch.on_challenge(rh.challenge(), NOW).unwrap();
        let e = rh
            .on_register(&relay, reg, NOW, &policy, url_ok, &mut ReplayCache::new(4))
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::WrongRole);
        // bad sigC
        let (relay, _, mut rh, mut ch) = setup();
        let reg = ch.on_challenge(rh.challenge(), NOW).unwrap();
        rh.on_register(&relay, reg, NOW, &policy, url_ok, &mut ReplayCache::new(4))
            .unwrap();
        let e = rh.on_confirm(Confirm { sig_c: [0; 64] }).unwrap_err();
        assert_eq!(e, HandshakeError::BadSignature("sigC"));
        // confirm before register
        let (_, _, mut rh, _) = setup();
        assert_eq!(
            rh.on_confirm(Confirm { sig_c: [0; 64] })
                .unwrap_err()
                .code(),
            ErrorCode::UnexpectedFrame
        );
    }

    #[test]
    fn client_refuses_changed_key_and_forged_sig_b() {
        let (relay, client, mut rh, _) = setup();
        let pinned = Identity::from_seed([7; 32]).address();
        let mut ch = ClientHandshake::new(client.clone(), Role::Client, URL, [4; 32], Some(pinned));
        assert!(matches!(
            ch.on_challenge(rh.challenge(), NOW),
            Err(HandshakeError::RelayKeyChanged { .. })
        ));
        let mut ch =
            ClientHandshake::new(client, Role::Client, URL, [4; 32], Some(relay.address()));
        ch.on_challenge(rh.challenge(), NOW).unwrap();
        assert_eq!(
            ch.on_countersign(Countersign { sig_b: [1; 64] }),
            Err(HandshakeError::BadRelaySignature)
        );
        let _ = &mut rh;
    }

    #[test]
    fn replay_cache_is_bounded_and_expires() {
        let mut c = ReplayCache::new(3);
        for i in 0..10u8 {
            c.insert([i; 32], 1000, 0);
        }
        assert!(c.len() <= 3);
        assert!(c.contains(&[9; 32]));
        c.insert([42; 32], 5000, 2000);
        assert!(!c.contains(&[9; 32]), "expired entries are pruned");
        assert!(c.contains(&[42; 32]));
    }
}
