//! The registration state machines driven by hostile peers.
//!
//! Relay side: a `RelayHandshake` (the relay and connection nonce of
//! testdata/vectors.json) is fed REGISTER / CONFIRM frames decoded from the
//! input, interleaved with frames made by an honest `ClientHandshake` and
//! then tampered with by input bytes. Client side: a `ClientHandshake` is
//! fed CHALLENGE / COUNTERSIGN / REPLY_BACK frames the same way.
//!
//! Nothing may panic, and every success must be justified: an accepted
//! REGISTER carries a sigA that verifies over the transcript, a completed
//! registration carries a sigC that verifies, a replayed REGISTER is refused,
//! an accepted COUNTERSIGN carries a sigB by the relay the client registered
//! with, and a pinned client never registers with another key.
//!
//! Input layout: `cfg` (u8), `dt` (i16 BE, seconds added to the clock), then
//! operations `op` (u8), `len` (u16 BE), `len` bytes.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use w2w_proto::frame::{Confirm, ReplyBack, Role};
use w2w_proto::handshake::{
    sig_a_message, sig_b_message, sig_c_message, transcript_hash, ClientHandshake, RelayHandshake,
    RelayPolicy, ReplayCache,
};
use w2w_proto::{Address, ClientToRelay, Identity, RelayToClient};

// The registration vector of testdata/vectors.json.
const RELAY_SEED: [u8; 32] = [1; 32];
const CLIENT_SEED: [u8; 32] = [2; 32];
const TIMESTAMP_MS: u64 = 1_700_000_000_000;
const RELAY_NOW_MS: u64 = 1_700_000_000_005;
const URL: &str = "ws://127.0.0.1:7777/";

/// (relay, client): key derivation is the slow part of a run, do it once.
fn identities() -> &'static (Identity, Identity) {
    static IDS: OnceLock<(Identity, Identity)> = OnceLock::new();
    IDS.get_or_init(|| {
        (
            Identity::from_seed(RELAY_SEED),
            Identity::from_seed(CLIENT_SEED),
        )
    })
}

fn relay_nonce() -> [u8; 32] {
    std::array::from_fn(|i| 0x30 + i as u8)
}

fn client_nonce() -> [u8; 32] {
    std::array::from_fn(|i| 0x80 + i as u8)
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    /// Next operation: (op, bytes).
    fn op(&mut self) -> Option<(u8, &'a [u8])> {
        let op = self.u8()?;
        let len = self.u16().unwrap_or(0) as usize;
        Some((op, self.bytes(len)))
    }
}

/// XORs `mask` into `frame` (cycling over the frame); an empty mask leaves
/// the honest frame intact.
fn tamper(frame: Bytes, mask: &[u8]) -> Bytes {
    if mask.is_empty() || frame.is_empty() {
        return frame;
    }
    let mut v = frame.to_vec();
    // The first two mask bytes pick the offset, the rest are XORed in.
    let (off, bits) = if mask.len() > 2 {
        (u16::from_be_bytes([mask[0], mask[1]]) as usize, &mask[2..])
    } else {
        (0, mask)
    };
    for (i, b) in bits.iter().enumerate() {
        let n = v.len();
        v[(off + i) % n] ^= b;
    }
    Bytes::from(v)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let Some(cfg) = inp.u8() else { return };
    let dt = inp.u16().unwrap_or(0) as i16 as i64 * 1000;
    if cfg & 1 == 0 {
        relay_side(cfg, dt, inp);
    } else {
        client_side(cfg, dt, inp);
    }
});

fn relay_side(cfg: u8, dt: i64, mut inp: Input<'_>) {
    let (relay, client) = identities();
    let now = RELAY_NOW_MS.wrapping_add(dt as u64);
    let policy = RelayPolicy {
        max_skew_ms: if cfg & 8 != 0 { 0 } else { 60_000 },
        accept_relays: cfg & 2 != 0,
    };
    let any_url = cfg & 4 != 0;
    let url_ok = |u: &str| any_url || u == URL;
    let mut replay = ReplayCache::new(4);
    let mut hs = RelayHandshake::new(relay.address(), relay_nonce());
    let role = if cfg & 16 != 0 {
        Role::Relay
    } else {
        Role::Client
    };
    let mut honest = ClientHandshake::new(client.clone(), role, URL, client_nonce(), None);
    let mut last_countersign = None;
    // The REGISTER accepted so far, for the sigC check.
    let mut accepted: Option<(w2w_proto::frame::Register, [u8; 64])> = None;

    for _ in 0..16 {
        let Some((op, bytes)) = inp.op() else { break };
        let frame = match op % 3 {
            0 => Bytes::copy_from_slice(bytes),
            1 => match honest.on_challenge(hs.challenge(), TIMESTAMP_MS.wrapping_add(dt as u64)) {
                Ok(reg) => tamper(ClientToRelay::Register(reg).encode(), bytes),
                Err(_) => continue,
            },
            _ => match last_countersign.take() {
                Some(cs) => match honest.on_countersign(cs) {
                    Ok(c) => tamper(ClientToRelay::Confirm(c).encode(), bytes),
                    Err(_) => continue,
                },
                None => tamper(
                    ClientToRelay::Confirm(Confirm { sig_c: [0; 64] }).encode(),
                    bytes,
                ),
            },
        };
        match ClientToRelay::decode(&frame) {
            Ok(ClientToRelay::Register(reg)) => {
                let r = hs.on_register(relay, reg.clone(), now, &policy, url_ok, &mut replay);
                if let Ok(cs) = r {
                    // Justify the success.
                    let msg = sig_a_message(&reg, &relay_nonce());
                    reg.client_key
                        .verify(&msg, &reg.sig_a)
                        .expect("REGISTER accepted with a sigA that does not verify");
                    assert_eq!(reg.relay_key, relay.address(), "wrong relay key accepted");
                    assert!(now.abs_diff(reg.timestamp_ms) <= policy.max_skew_ms);
                    assert!(url_ok(&reg.url));
                    assert!(reg.role == Role::Client || policy.accept_relays);
                    relay
                        .address()
                        .verify(
                            &sig_b_message(&transcript_hash(&msg), &reg.sig_a),
                            &cs.sig_b,
                        )
                        .expect("sigB does not verify");
                    // The same REGISTER on a fresh connection (same nonce, so
                    // only the replay cache can stop it) must be refused.
                    let mut again = RelayHandshake::new(relay.address(), relay_nonce());
                    assert!(
                        again
                            .on_register(relay, reg.clone(), now, &policy, url_ok, &mut replay)
                            .is_err(),
                        "replayed REGISTER accepted"
                    );
                    accepted = Some((reg, cs.sig_b));
                    last_countersign = Some(cs);
                }
            }
            Ok(ClientToRelay::Confirm(c)) => {
                if let Ok(done) = hs.on_confirm(c.clone()) {
                    let (reg, sig_b) = accepted.as_ref().expect("CONFIRM accepted before REGISTER");
                    let th = transcript_hash(&sig_a_message(reg, &relay_nonce()));
                    reg.client_key
                        .verify(&sig_c_message(&th, sig_b), &c.sig_c)
                        .expect("CONFIRM accepted with a sigC that does not verify");
                    assert_eq!(done.address, reg.client_key);
                    assert_eq!(done.sig_c, c.sig_c);
                    assert_eq!(done.relay_nonce, relay_nonce());
                }
            }
            Ok(_) | Err(_) => {}
        }
    }
}

fn client_side(cfg: u8, dt: i64, mut inp: Input<'_>) {
    let (relay, me) = identities();
    let now = TIMESTAMP_MS.wrapping_add(dt as u64);
    let pinned = (cfg & 2 != 0).then(|| relay.address());
    let role = if cfg & 16 != 0 {
        Role::Relay
    } else {
        Role::Client
    };
    let url: String = if cfg & 32 != 0 {
        "ws://x/".repeat(200) // longer than MAX_URL_LEN
    } else {
        URL.into()
    };
    let mut hs = ClientHandshake::new(me.clone(), role, url, client_nonce(), pinned);
    // An honest relay the input can ask for frames.
    let mut honest = RelayHandshake::new(relay.address(), relay_nonce());
    let mut replay = ReplayCache::new(4);
    let policy = RelayPolicy {
        max_skew_ms: u64::MAX,
        accept_relays: true,
    };
    let mut last_register = None;
    // (relay key, transcript hash, sigA) of the REGISTER we sent.
    let mut sent: Option<(Address, [u8; 32], [u8; 64])> = None;
    let mut countersigned = false;

    for _ in 0..16 {
        let Some((op, bytes)) = inp.op() else { break };
        let frame = match op % 4 {
            0 => Bytes::copy_from_slice(bytes),
            1 => tamper(RelayToClient::Challenge(honest.challenge()).encode(), bytes),
            2 => match last_register.take() {
                Some(reg) => {
                    match honest.on_register(relay, reg, now, &policy, |_| true, &mut replay) {
                        Ok(cs) => tamper(RelayToClient::Countersign(cs).encode(), bytes),
                        Err(_) => continue,
                    }
                }
                None => continue,
            },
            _ => tamper(
                RelayToClient::ReplyBack(ReplyBack {
                    address: me.address(),
                    relay_time_ms: now,
                    relay_url: URL.into(),
                })
                .encode(),
                bytes,
            ),
        };
        match RelayToClient::decode(&frame) {
            Ok(RelayToClient::Challenge(ch)) => {
                if let Ok(reg) = hs.on_challenge(ch.clone(), now) {
                    if let Some(p) = pinned {
                        assert_eq!(
                            ch.relay_key, p,
                            "registered with a key other than the pinned one"
                        );
                    }
                    assert_eq!(reg.relay_key, ch.relay_key);
                    assert_eq!(reg.client_key, me.address());
                    let msg = sig_a_message(&reg, &ch.relay_nonce);
                    me.address().verify(&msg, &reg.sig_a).expect("our own sigA");
                    sent = Some((ch.relay_key, transcript_hash(&msg), reg.sig_a));
                    last_register = Some(reg);
                }
            }
            Ok(RelayToClient::Countersign(cs)) => {
                if let Ok(c) = hs.on_countersign(cs.clone()) {
                    let (key, th, sig_a) = sent.expect("COUNTERSIGN accepted before CHALLENGE");
                    key.verify(&sig_b_message(&th, &sig_a), &cs.sig_b)
                        .expect("COUNTERSIGN accepted with a sigB that does not verify");
                    me.address()
                        .verify(&sig_c_message(&th, &cs.sig_b), &c.sig_c)
                        .expect("our own sigC");
                    countersigned = true;
                }
            }
            Ok(RelayToClient::ReplyBack(rb)) => {
                if let Ok(done) = hs.on_reply_back(rb.clone()) {
                    assert!(countersigned, "REPLY_BACK accepted before COUNTERSIGN");
                    assert_eq!(rb.address, me.address());
                    assert_eq!(Some(done.relay_key), sent.map(|s| s.0));
                }
            }
            Ok(_) | Err(_) => {}
        }
    }
}
