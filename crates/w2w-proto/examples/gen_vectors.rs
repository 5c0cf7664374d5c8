//! Deterministic generator for `testdata/vectors.json`.
//!
//! ```text
//! cargo run -p w2w-proto --example gen_vectors > testdata/vectors.json
//! ```
//!
//! Every input is fixed (seeds, nonces, timestamps, message ids) and Ed25519
//! signatures are deterministic, so running this twice gives identical bytes.
//! The vectors pin the wire format for other implementations (a JavaScript
//! client checks the same file); `tests/vectors.rs` checks them against this
//! crate. Change this file only together with docs/PROTOCOL.md.

use bytes::Bytes;
use serde::Serialize;
use w2w_proto::codes::ErrorCode;
use w2w_proto::frame::{
    ty, Challenge, ClientToRelay, Confirm, Countersign, Dest, ErrorFrame, Hosted, Msg, MsgId,
    Notice, Receipt, ReceiptEntry, Register, RelayToClient, ReplyBack, Request, RequestOp,
    Response, ResponseBody, Role, Scope, Status, MAX_DETAIL_LEN, MAX_URL_LEN, MSG_FIXED_HEADER,
};
use w2w_proto::handshake::{
    sig_a_message, sig_b_message, sig_c_message, transcript_hash, DEFAULT_MAX_SKEW_MS,
    SIG_A_DOMAIN, SIG_B_DOMAIN, SIG_C_DOMAIN,
};
use w2w_proto::identity::{Address, Identity};
use w2w_proto::PROTOCOL_VERSION;

// ------------------------------------------------------------ fixed inputs

const RELAY_SEED: [u8; 32] = [0x01; 32];
const CLIENT_SEED: [u8; 32] = [0x02; 32];
const BOB_SEED: [u8; 32] = [0x05; 32];
const CAROL_SEED: [u8; 32] = [0x06; 32];
/// RFC 8032 section 7.1, TEST 1: an independent check of the Ed25519 code.
const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const TIMESTAMP_MS: u64 = 1_700_000_000_000;
const RELAY_TIME_MS: u64 = 1_700_000_000_042;
const URL: &str = "ws://127.0.0.1:7777/";

/// Incrementing bytes `start, start+1, ...`: unlike a constant fill, a
/// reversed or shifted field shows up as a mismatch.
fn seq<const N: usize>(start: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

fn relay_nonce() -> [u8; 32] {
    seq(0x30)
}

fn client_nonce() -> [u8; 32] {
    seq(0x80)
}

/// Message id number `k`: bytes `k0 k1 .. kf` (k = 1..=15).
fn msg_id(k: u8) -> MsgId {
    MsgId(seq(k << 4))
}

fn h(b: impl AsRef<[u8]>) -> String {
    hex::encode(b)
}

fn code_name(reason: u16) -> Option<&'static str> {
    if reason == 0 {
        None
    } else {
        Some(
            ErrorCode::from_u16(reason)
                .expect("vectors use known codes")
                .as_str(),
        )
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Client => "client",
        Role::Relay => "relay",
        Role::Sender => "sender",
    }
}

fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Relay => "relay",
        Scope::Federation => "federation",
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        1 => "online",
        2 => "lookup",
        3 => "presence",
        6 => "exclusive",
        _ => panic!("vectors use known ops"),
    }
}

fn type_name(t: u8) -> &'static str {
    match t {
        ty::CHALLENGE => "CHALLENGE",
        ty::REGISTER => "REGISTER",
        ty::COUNTERSIGN => "COUNTERSIGN",
        ty::CONFIRM => "CONFIRM",
        ty::ACK => "ACK",
        ty::REPLY_BACK => "REPLY_BACK",
        ty::MSG => "MSG",
        ty::RECEIPT => "RECEIPT",
        ty::REQUEST => "REQUEST",
        ty::RESPONSE => "RESPONSE",
        ty::NOTICE => "NOTICE",
        ty::ERROR => "ERROR",
        _ => panic!("unknown type"),
    }
}

// ------------------------------------------------------------ JSON shapes

#[derive(Serialize)]
struct Vectors {
    description: &'static str,
    generator: &'static str,
    conventions: Vec<&'static str>,
    protocol_version: u8,
    constants: Constants,
    identities: Vec<IdentityVector>,
    registration: RegistrationVector,
    registration_checks: Vec<RegistrationCheck>,
    frames: Vec<FrameVector>,
    invalid_frames: Vec<InvalidFrame>,
    error_codes: Vec<ErrorCodeRow>,
}

#[derive(Serialize)]
struct Named {
    name: &'static str,
    value: u8,
}

#[derive(Serialize)]
struct Domain {
    /// The domain as text; JSON writes its trailing NUL as \u0000.
    ascii: String,
    hex: String,
}

#[derive(Serialize)]
struct Constants {
    frame_types: Vec<Named>,
    routes: Vec<Named>,
    scopes: Vec<Named>,
    roles: Vec<Named>,
    statuses: Vec<Named>,
    request_ops: Vec<Named>,
    notice_kinds: Vec<Named>,
    sig_a_domain: Domain,
    sig_b_domain: Domain,
    sig_c_domain: Domain,
    max_url_len: usize,
    max_detail_len: usize,
    msg_fixed_header_len: usize,
    default_max_skew_ms: u64,
}

#[derive(Serialize)]
struct IdentityVector {
    name: &'static str,
    description: &'static str,
    seed: String,
    address: String,
    /// Ed25519 signature of `message` under the seed.
    message: String,
    signature: String,
}

#[derive(Serialize)]
struct LayoutRow {
    offset: usize,
    size: usize,
    field: &'static str,
    hex: String,
}

#[derive(Serialize)]
struct RegistrationFrames {
    challenge: String,
    register: String,
    countersign: String,
    confirm: String,
    reply_back: String,
}

#[derive(Serialize)]
struct RegistrationVector {
    description: &'static str,
    relay_seed: String,
    relay_key: String,
    client_seed: String,
    client_key: String,
    role: &'static str,
    relay_nonce: String,
    client_nonce: String,
    timestamp_ms: u64,
    url: &'static str,
    relay_now_ms: u64,
    relay_time_ms: u64,
    sig_a_message: String,
    sig_a_message_layout: Vec<LayoutRow>,
    th: String,
    sig_a: String,
    sig_b_message: String,
    sig_b: String,
    sig_c_message: String,
    sig_c: String,
    frames: RegistrationFrames,
}

#[derive(Serialize)]
struct RegistrationCheck {
    name: &'static str,
    description: &'static str,
    /// The REGISTER frame the relay receives on the vector connection
    /// (relay key and relay nonce of `registration`).
    register: String,
    /// CONFIRM frame, when the REGISTER is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    confirm: Option<String>,
    relay_now_ms: u64,
    /// Client nonces the relay has already accepted.
    seen_client_nonces: Vec<String>,
    /// Error code name, or null when registration completes.
    error: Option<&'static str>,
    /// "register" or "confirm": the frame the error answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'static str>,
}

#[derive(Serialize)]
struct FrameVector {
    name: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    type_byte: u8,
    /// "c2r" (client to relay), "r2c" (relay to client) or "both" (MSG).
    direction: &'static str,
    description: &'static str,
    fields: Fields,
    hex: String,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Fields {
    Challenge {
        relay_key: String,
        relay_nonce: String,
    },
    Register {
        role: &'static str,
        relay_key: String,
        client_key: String,
        client_nonce: String,
        timestamp_ms: u64,
        url: String,
        sig_a: String,
    },
    Countersign {
        sig_b: String,
    },
    Confirm {
        sig_c: String,
    },
    Ack {
        ack_ids: Vec<String>,
    },
    ReplyBack {
        address: String,
        relay_time_ms: u64,
        relay_url: String,
    },
    Msg {
        route: &'static str,
        flags: u8,
        id: String,
        from: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<&'static str>,
        payload: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_text: Option<String>,
    },
    Receipt {
        id: String,
        status: &'static str,
        reason: Option<&'static str>,
        delivered: u32,
        entries: Vec<EntryFields>,
    },
    Request {
        req_id: u32,
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        address: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        on: Option<bool>,
    },
    Response {
        req_id: u32,
        op: &'static str,
        error: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        addresses: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        found: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        relay_key: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        relay_url: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        closed: Option<u32>,
    },
    Notice {
        kind: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        address: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Error {
        code: &'static str,
        detail: String,
    },
}

#[derive(Serialize)]
struct EntryFields {
    to: String,
    status: &'static str,
    reason: Option<&'static str>,
}

#[derive(Serialize)]
struct InvalidFrame {
    name: &'static str,
    /// Which side decodes it: "c2r" = a relay decoding a client's frame,
    /// "r2c" = a client decoding a relay's frame.
    direction: &'static str,
    description: &'static str,
    hex: String,
    /// ErrorCode name the decoder reports.
    error: &'static str,
    error_number: u16,
    /// Which decoding rule fails (informational; see docs/PROTOCOL.md).
    kind: &'static str,
}

#[derive(Serialize)]
struct ErrorCodeRow {
    name: &'static str,
    number: u16,
    close_code: u16,
    description: &'static str,
}

// ------------------------------------------------------------ fields

fn msg_fields(m: &Msg) -> Fields {
    let (to, group, scope) = match &m.dest {
        Dest::A2a => (None, None, None),
        Dest::A2b(a) => (Some(a.to_hex()), None, None),
        Dest::A2g(l) => (None, Some(l.iter().map(Address::to_hex).collect()), None),
        Dest::A2n(s) => (None, None, Some(scope_name(*s))),
        Dest::Group(_) => unreachable!("this vector set has no named-group frames"),
    };
    Fields::Msg {
        route: m.dest.route().as_str(),
        flags: m.flags,
        id: h(m.id.0),
        from: m.from.to_hex(),
        to,
        group,
        scope,
        payload: h(&m.payload),
        payload_text: std::str::from_utf8(&m.payload)
            .ok()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    }
}

fn c2r_fields(f: &ClientToRelay) -> Fields {
    match f {
        ClientToRelay::Register(r) => Fields::Register {
            role: role_name(r.role),
            relay_key: r.relay_key.to_hex(),
            client_key: r.client_key.to_hex(),
            client_nonce: h(r.client_nonce),
            timestamp_ms: r.timestamp_ms,
            url: r.url.clone(),
            sig_a: h(r.sig_a),
        },
        ClientToRelay::Confirm(c) => Fields::Confirm { sig_c: h(c.sig_c) },
        ClientToRelay::Ack(ids) => Fields::Ack {
            ack_ids: ids.iter().map(|i| h(i.0)).collect(),
        },
        ClientToRelay::Msg(m) => msg_fields(m),
        ClientToRelay::Request(r) => {
            let (offset, limit, address, on) = match &r.op {
                RequestOp::Online { offset, limit } => (Some(*offset), Some(*limit), None, None),
                RequestOp::Lookup(a) => (None, None, Some(a.to_hex()), None),
                RequestOp::Presence(on) => (None, None, None, Some(*on)),
                RequestOp::Exclusive => (None, None, None, None),
                RequestOp::Group(_) | RequestOp::GroupInfo(_) => {
                    unreachable!("this vector set has no named-group frames")
                }
            };
            let op = match &r.op {
                RequestOp::Online { .. } => "online",
                RequestOp::Lookup(_) => "lookup",
                RequestOp::Presence(_) => "presence",
                RequestOp::Exclusive => "exclusive",
                RequestOp::Group(_) | RequestOp::GroupInfo(_) => {
                    unreachable!("this vector set has no named-group frames")
                }
            };
            Fields::Request {
                req_id: r.req_id,
                op,
                offset,
                limit,
                address,
                on,
            }
        }
    }
}

fn r2c_fields(f: &RelayToClient) -> Fields {
    match f {
        RelayToClient::Challenge(c) => Fields::Challenge {
            relay_key: c.relay_key.to_hex(),
            relay_nonce: h(c.relay_nonce),
        },
        RelayToClient::Countersign(c) => Fields::Countersign { sig_b: h(c.sig_b) },
        RelayToClient::ReplyBack(r) => Fields::ReplyBack {
            address: r.address.to_hex(),
            relay_time_ms: r.relay_time_ms,
            relay_url: r.relay_url.clone(),
        },
        RelayToClient::Msg(m) => msg_fields(m),
        RelayToClient::Receipt(r) => Fields::Receipt {
            id: h(r.id.0),
            status: r.status.as_str(),
            reason: code_name(r.reason),
            delivered: r.delivered,
            entries: r
                .entries
                .iter()
                .map(|e| EntryFields {
                    to: e.to.to_hex(),
                    status: e.status.as_str(),
                    reason: code_name(e.reason),
                })
                .collect(),
        },
        RelayToClient::Response(r) => {
            let mut total = None;
            let mut addresses = None;
            let mut found = None;
            let mut relay_key = None;
            let mut relay_url = None;
            let mut closed = None;
            let error = match &r.result {
                Err(code) => Some(code_name(*code).expect("error responses carry a code")),
                Ok(ResponseBody::Group(_)) => {
                    unreachable!("this vector set has no named-group frames")
                }
                Ok(ResponseBody::Online {
                    total: t,
                    addresses: a,
                }) => {
                    total = Some(*t);
                    addresses = Some(a.iter().map(Address::to_hex).collect());
                    None
                }
                Ok(ResponseBody::Lookup(l)) => {
                    found = Some(l.is_some());
                    if let Some(hosted) = l {
                        relay_key = Some(hosted.relay_key.to_hex());
                        relay_url = Some(hosted.relay_url.clone());
                    }
                    None
                }
                Ok(ResponseBody::Presence) => None,
                Ok(ResponseBody::Exclusive { closed: n }) => {
                    closed = Some(*n);
                    None
                }
            };
            Fields::Response {
                req_id: r.req_id,
                op: op_name(r.op),
                error,
                total,
                addresses,
                found,
                relay_key,
                relay_url,
                closed,
            }
        }
        RelayToClient::Notice(n) => {
            let (kind, address, id) = match n {
                Notice::Join(a) => ("join", Some(a.to_hex()), None),
                Notice::Leave(a) => ("leave", Some(a.to_hex()), None),
                Notice::Replaced => ("replaced", None, None),
                Notice::ShuttingDown => ("shutting_down", None, None),
                Notice::Delivered { id, to } => {
                    ("delivered", Some(to.to_hex()), Some(hex::encode(id.0)))
                }
            };
            Fields::Notice { kind, address, id }
        }
        RelayToClient::Error(e) => Fields::Error {
            code: code_name(e.code).expect("error frames carry a code"),
            detail: e.detail.clone(),
        },
    }
}

fn c2r(name: &'static str, description: &'static str, f: ClientToRelay) -> FrameVector {
    let bytes = f.encode();
    assert_eq!(ClientToRelay::decode(&bytes).unwrap(), f, "{name}");
    let direction = if matches!(f, ClientToRelay::Msg(_)) {
        assert!(RelayToClient::decode(&bytes).is_ok(), "{name}");
        "both"
    } else {
        "c2r"
    };
    FrameVector {
        name,
        ty: type_name(bytes[1]),
        type_byte: bytes[1],
        direction,
        description,
        fields: c2r_fields(&f),
        hex: h(&bytes),
    }
}

fn r2c(name: &'static str, description: &'static str, f: RelayToClient) -> FrameVector {
    let bytes = f.encode();
    assert_eq!(RelayToClient::decode(&bytes).unwrap(), f, "{name}");
    FrameVector {
        name,
        ty: type_name(bytes[1]),
        type_byte: bytes[1],
        direction: "r2c",
        description,
        fields: r2c_fields(&f),
        hex: h(&bytes),
    }
}

fn invalid(
    name: &'static str,
    direction: &'static str,
    description: &'static str,
    bytes: Vec<u8>,
    error: ErrorCode,
    kind: &'static str,
) -> InvalidFrame {
    let b = Bytes::from(bytes);
    let got = match direction {
        "c2r" => ClientToRelay::decode(&b).unwrap_err(),
        "r2c" => RelayToClient::decode(&b).unwrap_err(),
        _ => unreachable!(),
    };
    assert_eq!(got.code(), error, "{name}: {got}");
    InvalidFrame {
        name,
        direction,
        description,
        hex: h(&b),
        error: error.as_str(),
        error_number: error.as_u16(),
        kind,
    }
}

fn named(pairs: &[(&'static str, u8)]) -> Vec<Named> {
    pairs
        .iter()
        .map(|&(name, value)| Named { name, value })
        .collect()
}

fn domain(d: &'static [u8]) -> Domain {
    let ascii = std::str::from_utf8(&d[..d.len() - 1]).unwrap();
    assert_eq!(d.last(), Some(&0));
    Domain {
        ascii: format!("{ascii}\0"),
        hex: h(d),
    }
}

/// Signs a REGISTER the way a client would, with arbitrary (possibly wrong)
/// inputs, on the vector connection's relay nonce unless told otherwise.
fn signed_register(
    client: &Identity,
    role: Role,
    relay_key: Address,
    nonce: [u8; 32],
    timestamp_ms: u64,
    url: &str,
    signed_relay_nonce: [u8; 32],
) -> Register {
    let mut reg = Register {
        role,
        relay_key,
        client_key: client.address(),
        client_nonce: nonce,
        timestamp_ms,
        url: url.into(),
        sig_a: [0; 64],
    };
    reg.sig_a = client.sign(&sig_a_message(&reg, &signed_relay_nonce));
    reg
}

fn enc(r: &Register) -> String {
    h(ClientToRelay::Register(r.clone()).encode())
}

fn main() {
    let relay = Identity::from_seed(RELAY_SEED);
    let client = Identity::from_seed(CLIENT_SEED);
    let bob = Identity::from_seed(BOB_SEED);
    let carol = Identity::from_seed(CAROL_SEED);
    let mut rfc_seed = [0u8; 32];
    hex::decode_to_slice(RFC8032_SEED, &mut rfc_seed).unwrap();
    let rfc = Identity::from_seed(rfc_seed);

    let relay_key = relay.address();
    let me = client.address();
    let b = bob.address();
    let c = carol.address();

    // ---------------------------------------------------------- identities
    let ident = |name, description, id: &Identity, message: &[u8]| IdentityVector {
        name,
        description,
        seed: h(id.seed()),
        address: id.address().to_hex(),
        message: h(message),
        signature: h(id.sign(message)),
    };
    let identities = vec![
        ident("relay", "The relay in every vector.", &relay, b""),
        ident(
            "client",
            "The registering client (sender of every MSG vector).",
            &client,
            b"",
        ),
        ident("bob", "A second client, used as a recipient.", &bob, b"w2w"),
        ident("carol", "A third client, used as a recipient.", &carol, b"w2w"),
        ident(
            "rfc8032_test1",
            "RFC 8032 section 7.1 TEST 1 (empty message): address and signature equal the RFC's public key and signature.",
            &rfc,
            b"",
        ),
    ];

    // -------------------------------------------------------- registration
    let reg = signed_register(
        &client,
        Role::Client,
        relay_key,
        client_nonce(),
        TIMESTAMP_MS,
        URL,
        relay_nonce(),
    );
    let a_msg = sig_a_message(&reg, &relay_nonce());
    let th = transcript_hash(&a_msg);
    let b_msg = sig_b_message(&th, &reg.sig_a);
    let sig_b = relay.sign(&b_msg);
    let c_msg = sig_c_message(&th, &sig_b);
    let sig_c = client.sign(&c_msg);

    let mut layout = Vec::new();
    let mut off = 0;
    let mut row = |field: &'static str, bytes: &[u8]| {
        layout.push(LayoutRow {
            offset: off,
            size: bytes.len(),
            field,
            hex: h(bytes),
        });
        off += bytes.len();
    };
    row("domain", SIG_A_DOMAIN);
    row("version", &[PROTOCOL_VERSION]);
    row("role", &[reg.role as u8]);
    row("relay_key", &reg.relay_key.0);
    row("relay_nonce", &relay_nonce());
    row("client_key", &reg.client_key.0);
    row("client_nonce", &reg.client_nonce);
    row("timestamp_ms", &reg.timestamp_ms.to_be_bytes());
    row("url_len", &(reg.url.len() as u16).to_be_bytes());
    row("url", reg.url.as_bytes());
    assert_eq!(off, a_msg.len());

    let challenge = Challenge {
        relay_key,
        relay_nonce: relay_nonce(),
    };
    let reply_back = ReplyBack {
        address: me,
        relay_time_ms: RELAY_TIME_MS,
        relay_url: URL.into(),
    };
    let registration = RegistrationVector {
        description: "One complete registration of `client` with `relay` on connection nonce `relay_nonce`. The relay's clock reads relay_now_ms when REGISTER arrives.",
        relay_seed: h(RELAY_SEED),
        relay_key: relay_key.to_hex(),
        client_seed: h(CLIENT_SEED),
        client_key: me.to_hex(),
        role: role_name(reg.role),
        relay_nonce: h(relay_nonce()),
        client_nonce: h(client_nonce()),
        timestamp_ms: TIMESTAMP_MS,
        url: URL,
        relay_now_ms: TIMESTAMP_MS + 5,
        relay_time_ms: RELAY_TIME_MS,
        sig_a_message: h(&a_msg),
        sig_a_message_layout: layout,
        th: h(th),
        sig_a: h(reg.sig_a),
        sig_b_message: h(&b_msg),
        sig_b: h(sig_b),
        sig_c_message: h(&c_msg),
        sig_c: h(sig_c),
        frames: RegistrationFrames {
            challenge: h(RelayToClient::Challenge(challenge.clone()).encode()),
            register: enc(&reg),
            countersign: h(RelayToClient::Countersign(Countersign { sig_b }).encode()),
            confirm: h(ClientToRelay::Confirm(Confirm { sig_c }).encode()),
            reply_back: h(RelayToClient::ReplyBack(reply_back.clone()).encode()),
        },
    };

    // ------------------------------------------------- registration checks
    let now = TIMESTAMP_MS;
    let rn = relay_nonce();
    let cn = client_nonce();
    let good = |ts: u64| signed_register(&client, Role::Client, relay_key, cn, ts, URL, rn);
    let mut flipped = reg.clone();
    flipped.sig_a[0] ^= 0x01;
    let mut bad_c = sig_c;
    bad_c[63] ^= 0x01;
    let check = |name,
                 description,
                 r: &Register,
                 confirm: Option<[u8; 64]>,
                 relay_now_ms,
                 seen: Vec<[u8; 32]>,
                 error: Option<ErrorCode>,
                 stage: Option<&'static str>| RegistrationCheck {
        name,
        description,
        register: enc(r),
        confirm: confirm.map(|s| h(ClientToRelay::Confirm(Confirm { sig_c: s }).encode())),
        relay_now_ms,
        seen_client_nonces: seen.iter().map(h).collect(),
        error: error.map(ErrorCode::as_str),
        stage,
    };
    let registration_checks = vec![
        check(
            "accepted",
            "The vector registration: accepted, CONFIRM verifies.",
            &reg,
            Some(sig_c),
            now + 5,
            vec![],
            None,
            None,
        ),
        check(
            "skew_at_limit_accepted",
            "The relay clock is exactly 60 000 ms ahead of the timestamp: still accepted (the bound is inclusive).",
            &reg,
            None,
            now + DEFAULT_MAX_SKEW_MS,
            vec![],
            None,
            None,
        ),
        check(
            "wrong_role",
            "Role 1 (relay) on the client endpoint.",
            &signed_register(&client, Role::Relay, relay_key, cn, now, URL, rn),
            None,
            now,
            vec![],
            Some(ErrorCode::WrongRole),
            Some("register"),
        ),
        check(
            "stale_timestamp_future",
            "The client clock is 60 001 ms ahead of the relay's.",
            &good(now + DEFAULT_MAX_SKEW_MS + 1),
            None,
            now,
            vec![],
            Some(ErrorCode::StaleTimestamp),
            Some("register"),
        ),
        check(
            "stale_timestamp_past",
            "The client clock is 60 001 ms behind the relay's.",
            &reg,
            None,
            now + DEFAULT_MAX_SKEW_MS + 1,
            vec![],
            Some(ErrorCode::StaleTimestamp),
            Some("register"),
        ),
        check(
            "stale_timestamp_checked_before_signature",
            "Stale timestamp and a corrupted sigA: the timestamp check runs first.",
            &flipped,
            None,
            now + DEFAULT_MAX_SKEW_MS + 1,
            vec![],
            Some(ErrorCode::StaleTimestamp),
            Some("register"),
        ),
        check(
            "wrong_relay",
            "REGISTER names bob's key as the relay key (correctly signed).",
            &signed_register(&client, Role::Client, b, cn, now, URL, rn),
            None,
            now,
            vec![],
            Some(ErrorCode::WrongRelay),
            Some("register"),
        ),
        check(
            "wrong_url",
            "REGISTER names a URL other than ws://127.0.0.1:7777/ (the only URL this relay serves in these vectors).",
            &signed_register(
                &client,
                Role::Client,
                relay_key,
                cn,
                now,
                "ws://127.0.0.1:7778/",
                rn,
            ),
            None,
            now,
            vec![],
            Some(ErrorCode::WrongUrl),
            Some("register"),
        ),
        check(
            "replay",
            "The client nonce was already accepted in an earlier registration.",
            &reg,
            None,
            now,
            vec![cn],
            Some(ErrorCode::Replay),
            Some("register"),
        ),
        check(
            "bad_sig_a_bit_flip",
            "sigA with its first byte's low bit flipped.",
            &flipped,
            None,
            now,
            vec![],
            Some(ErrorCode::BadSignature),
            Some("register"),
        ),
        check(
            "bad_sig_a_other_connection",
            "sigA made over another connection's relay nonce (a captured REGISTER replayed on a new connection).",
            &signed_register(&client, Role::Client, relay_key, cn, now, URL, [0xee; 32]),
            None,
            now,
            vec![],
            Some(ErrorCode::BadSignature),
            Some("register"),
        ),
        check(
            "bad_sig_c",
            "REGISTER is accepted; sigC has its last byte's low bit flipped.",
            &reg,
            Some(bad_c),
            now,
            vec![],
            Some(ErrorCode::BadSignature),
            Some("confirm"),
        ),
    ];

    // -------------------------------------------------------------- frames
    let msg = |k: u8, flags: u8, dest: Dest, payload: &'static [u8]| {
        ClientToRelay::Msg(Msg {
            flags,
            id: msg_id(k),
            from: me,
            dest,
            payload: Bytes::from_static(payload),
        })
    };
    let entry = |to, status, reason: u16| ReceiptEntry { to, status, reason };
    let receipt = |k: u8, status, reason: u16, delivered, entries| {
        RelayToClient::Receipt(Receipt {
            id: msg_id(k),
            status,
            reason,
            delivered,
            entries,
        })
    };
    let no_route = ErrorCode::NoRoute.as_u16();
    let mut online = vec![me, b, c];
    online.sort();

    let frames = vec![
        r2c(
            "challenge",
            "First frame on every connection: the relay's key and this connection's nonce.",
            RelayToClient::Challenge(challenge),
        ),
        c2r(
            "register",
            "The vector registration's REGISTER (carries sigA).",
            ClientToRelay::Register(reg.clone()),
        ),
        c2r(
            "register_sender",
            "The same registration as a send-only session (role 2): sigA signs the role byte, so it differs.",
            ClientToRelay::Register(signed_register(
                &client,
                Role::Sender,
                relay_key,
                client_nonce(),
                TIMESTAMP_MS,
                URL,
                relay_nonce(),
            )),
        ),
        r2c(
            "countersign",
            "The vector registration's COUNTERSIGN (carries sigB).",
            RelayToClient::Countersign(Countersign { sig_b }),
        ),
        c2r(
            "confirm",
            "The vector registration's CONFIRM (carries sigC).",
            ClientToRelay::Confirm(Confirm { sig_c }),
        ),
        r2c(
            "reply_back",
            "Registration complete: the registered address, the relay's clock, the URL registered.",
            RelayToClient::ReplyBack(reply_back),
        ),
        c2r(
            "msg_a2a",
            "a2a: echo to the sender itself.",
            msg(1, 0, Dest::A2a, b"ping"),
        ),
        c2r(
            "msg_a2b",
            "a2b: to bob.",
            msg(2, 0, Dest::A2b(b), b"hello bob"),
        ),
        c2r(
            "msg_a2g",
            "a2g: to an explicit list of two addresses (bob, carol).",
            msg(3, 0, Dest::A2g(vec![b, c]), b"hello group"),
        ),
        c2r(
            "msg_a2g_empty_list",
            "a2g with an empty list: a valid frame, which the relay answers with a Rejected receipt (empty_list).",
            msg(4, 0, Dest::A2g(vec![]), b"nobody"),
        ),
        c2r(
            "msg_a2n_relay",
            "a2n, scope 0 (relay): to every client registered on this relay.",
            msg(5, 0, Dest::A2n(Scope::Relay), b"hello everyone"),
        ),
        c2r(
            "msg_a2n_federation",
            "a2n, scope 1 (federation); treated as scope relay until federation exists.",
            msg(6, 0, Dest::A2n(Scope::Federation), b"hello world"),
        ),
        c2r(
            "msg_a2b_flags_empty_payload",
            "a2b to carol with flags 0x81 (opaque to the relay) and an empty payload.",
            msg(7, 0x81, Dest::A2b(c), b""),
        ),
        c2r(
            "msg_a2b_binary_payload",
            "a2b to bob with a non-UTF-8 binary payload.",
            msg(8, 0, Dest::A2b(b), &[0x00, 0xff, 0x10, 0x80]),
        ),
        c2r(
            "ack_two",
            "ACK: the client has received messages 0x01.. and 0x02..; the relay may drop them from its queue.",
            ClientToRelay::Ack(vec![MsgId([1; 16]), MsgId([2; 16])]),
        ),
        r2c(
            "receipt_a2a_delivered",
            "Receipt for msg_a2a: delivered to the sender's own connection; a2a has no entries.",
            receipt(1, Status::Delivered, 0, 1, vec![]),
        ),
        r2c(
            "receipt_a2b_delivered",
            "Receipt for msg_a2b: bob is connected.",
            receipt(
                2,
                Status::Delivered,
                0,
                1,
                vec![entry(b, Status::Delivered, 0)],
            ),
        ),
        r2c(
            "receipt_a2b_no_route",
            "Receipt for msg_a2b when bob is not connected.",
            receipt(
                2,
                Status::NoRoute,
                no_route,
                0,
                vec![entry(b, Status::NoRoute, no_route)],
            ),
        ),
        r2c(
            "receipt_a2g_partial",
            "Receipt for msg_a2g: bob delivered, carol not connected.",
            receipt(
                3,
                Status::Partial,
                0,
                1,
                vec![
                    entry(b, Status::Delivered, 0),
                    entry(c, Status::NoRoute, no_route),
                ],
            ),
        ),
        r2c(
            "receipt_a2g_slow_consumer",
            "Receipt for msg_a2g: bob delivered, carol's send queue was full (carol is closed with 4022).",
            receipt(
                3,
                Status::Partial,
                0,
                1,
                vec![
                    entry(b, Status::Delivered, 0),
                    entry(c, Status::Rejected, ErrorCode::SlowConsumer.as_u16()),
                ],
            ),
        ),
        r2c(
            "receipt_a2g_empty_list",
            "Receipt for msg_a2g_empty_list.",
            receipt(
                4,
                Status::Rejected,
                ErrorCode::EmptyList.as_u16(),
                0,
                vec![],
            ),
        ),
        r2c(
            "receipt_a2n",
            "Receipt for msg_a2n_relay with three registered clients (the sender included): delivered = 3, no entries.",
            receipt(5, Status::Delivered, 0, 3, vec![]),
        ),
        r2c(
            "receipt_rejected_spoofed_sender",
            "Receipt for a MSG whose `from` is not the sender's registered address.",
            receipt(
                9,
                Status::Rejected,
                ErrorCode::SpoofedSender.as_u16(),
                0,
                vec![],
            ),
        ),
        r2c(
            "receipt_rejected_rate_limited",
            "Receipt for a MSG sent with an empty token bucket.",
            receipt(
                10,
                Status::Rejected,
                ErrorCode::RateLimited.as_u16(),
                0,
                vec![],
            ),
        ),
        c2r(
            "request_online",
            "ONLINE: first page of up to 100 addresses.",
            ClientToRelay::Request(Request {
                req_id: 1,
                op: RequestOp::Online {
                    offset: 0,
                    limit: 100,
                },
            }),
        ),
        c2r(
            "request_lookup",
            "LOOKUP bob.",
            ClientToRelay::Request(Request {
                req_id: 2,
                op: RequestOp::Lookup(b),
            }),
        ),
        c2r(
            "request_presence_on",
            "PRESENCE on: send JOIN/LEAVE notices to this connection.",
            ClientToRelay::Request(Request {
                req_id: 3,
                op: RequestOp::Presence(true),
            }),
        ),
        c2r(
            "request_presence_off",
            "PRESENCE off.",
            ClientToRelay::Request(Request {
                req_id: 4,
                op: RequestOp::Presence(false),
            }),
        ),
        c2r(
            "request_exclusive",
            "EXCLUSIVE: close this address's other sessions (no body).",
            ClientToRelay::Request(Request {
                req_id: 7,
                op: RequestOp::Exclusive,
            }),
        ),
        r2c(
            "response_online",
            "Answer to request_online: three clients online, sorted by address bytes.",
            RelayToClient::Response(Response {
                req_id: 1,
                op: 1,
                result: Ok(ResponseBody::Online {
                    total: 3,
                    addresses: online,
                }),
            }),
        ),
        r2c(
            "response_online_past_end",
            "ONLINE with an offset past the end: total still 3, empty page.",
            RelayToClient::Response(Response {
                req_id: 5,
                op: 1,
                result: Ok(ResponseBody::Online {
                    total: 3,
                    addresses: vec![],
                }),
            }),
        ),
        r2c(
            "response_lookup_found",
            "Answer to request_lookup: bob is connected to this relay.",
            RelayToClient::Response(Response {
                req_id: 2,
                op: 2,
                result: Ok(ResponseBody::Lookup(Some(Hosted {
                    relay_key,
                    relay_url: URL.into(),
                }))),
            }),
        ),
        r2c(
            "response_lookup_not_found",
            "Answer to request_lookup: bob is not connected here.",
            RelayToClient::Response(Response {
                req_id: 2,
                op: 2,
                result: Ok(ResponseBody::Lookup(None)),
            }),
        ),
        r2c(
            "response_presence",
            "Answer to request_presence_on.",
            RelayToClient::Response(Response {
                req_id: 3,
                op: 3,
                result: Ok(ResponseBody::Presence),
            }),
        ),
        r2c(
            "response_exclusive",
            "Answer to request_exclusive: two other sessions were closed.",
            RelayToClient::Response(Response {
                req_id: 7,
                op: 6,
                result: Ok(ResponseBody::Exclusive { closed: 2 }),
            }),
        ),
        r2c(
            "response_error_rate_limited",
            "An ONLINE request refused by the rate limiter: nonzero status, no body.",
            RelayToClient::Response(Response {
                req_id: 6,
                op: 1,
                result: Err(ErrorCode::RateLimited.as_u16()),
            }),
        ),
        r2c(
            "notice_join",
            "bob registered (sent only to connections with presence on).",
            RelayToClient::Notice(Notice::Join(b)),
        ),
        r2c(
            "notice_leave",
            "bob disconnected (sent only to connections with presence on).",
            RelayToClient::Notice(Notice::Leave(b)),
        ),
        r2c(
            "notice_delivered",
            "bob acknowledged a message that alice's receipt had reported queued (sent to alice if she is connected to bob's relay).",
            RelayToClient::Notice(Notice::Delivered {
                id: msg_id(7),
                to: b,
            }),
        ),
        r2c(
            "notice_replaced",
            "A newer connection registered this address; close 4026 follows.",
            RelayToClient::Notice(Notice::Replaced),
        ),
        r2c(
            "notice_shutting_down",
            "The relay is shutting down; close 4027 follows.",
            RelayToClient::Notice(Notice::ShuttingDown),
        ),
        r2c(
            "error_auth_timeout",
            "Fatal: registration not completed in time; close 4010 follows.",
            RelayToClient::Error(ErrorFrame::new(
                ErrorCode::AuthTimeout,
                "registration not completed within 10000 ms",
            )),
        ),
        r2c(
            "error_text_frame",
            "Non-fatal: the client sent a WebSocket text message.",
            RelayToClient::Error(ErrorFrame::new(ErrorCode::TextFrame, "frames are binary")),
        ),
        r2c(
            "error_empty_detail",
            "An ERROR with an empty detail string.",
            RelayToClient::Error(ErrorFrame::new(ErrorCode::NotRegistered, "")),
        ),
    ];

    // ------------------------------------------------------ invalid frames
    let confirm_bytes = ClientToRelay::Confirm(Confirm { sig_c }).encode().to_vec();
    let register_bytes = ClientToRelay::Register(reg.clone()).encode().to_vec();
    let a2b_bytes = msg(2, 0, Dest::A2b(b), b"hello bob").encode().to_vec();
    let a2n_bytes = msg(5, 0, Dest::A2n(Scope::Relay), b"x").encode().to_vec();
    let challenge_bytes = h2b(&registration.frames.challenge);
    let with = |mut v: Vec<u8>, i: usize, x: u8| {
        v[i] = x;
        v
    };
    let cat = |parts: &[&[u8]]| parts.concat();
    // REGISTER with url_len 1025 and 1025 bytes of url.
    let long_url = {
        let mut v = register_bytes[..2 + 1 + 32 + 32 + 32 + 8].to_vec();
        v.extend_from_slice(&((MAX_URL_LEN + 1) as u16).to_be_bytes());
        v.extend(std::iter::repeat_n(b'a', MAX_URL_LEN + 1));
        v.extend_from_slice(&reg.sig_a);
        v
    };
    // REGISTER whose url is "ws://\xff/".
    let bad_utf8 = {
        let mut v = register_bytes[..2 + 1 + 32 + 32 + 32 + 8].to_vec();
        let url = b"ws://\xff/";
        v.extend_from_slice(&(url.len() as u16).to_be_bytes());
        v.extend_from_slice(url);
        v.extend_from_slice(&reg.sig_a);
        v
    };
    let head = |t: u8| vec![PROTOCOL_VERSION, t];
    let invalid_frames = vec![
        invalid(
            "empty",
            "c2r",
            "A zero-length message.",
            vec![],
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "version_only",
            "c2r",
            "Only the version byte.",
            vec![PROTOCOL_VERSION],
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "bad_version",
            "c2r",
            "Version byte 2 on an otherwise valid CONFIRM.",
            with(confirm_bytes.clone(), 0, 2),
            ErrorCode::UnsupportedVersion,
            "unsupported_version",
        ),
        invalid(
            "bad_version_r2c",
            "r2c",
            "Version byte 0 on an otherwise valid CHALLENGE.",
            with(challenge_bytes.clone(), 0, 0),
            ErrorCode::UnsupportedVersion,
            "unsupported_version",
        ),
        invalid(
            "unknown_type",
            "c2r",
            "Type byte 0x77.",
            head(0x77),
            ErrorCode::UnknownFrameType,
            "unknown_type",
        ),
        invalid(
            "unknown_type_r2c",
            "r2c",
            "Type byte 0x00.",
            head(0x00),
            ErrorCode::UnknownFrameType,
            "unknown_type",
        ),
        invalid(
            "wrong_direction_challenge",
            "c2r",
            "A client sends a (well-formed) CHALLENGE.",
            challenge_bytes.clone(),
            ErrorCode::UnexpectedFrame,
            "wrong_direction",
        ),
        invalid(
            "wrong_direction_error",
            "c2r",
            "A client sends an ERROR frame.",
            RelayToClient::Error(ErrorFrame::new(ErrorCode::Internal, "x"))
                .encode()
                .to_vec(),
            ErrorCode::UnexpectedFrame,
            "wrong_direction",
        ),
        invalid(
            "wrong_direction_register",
            "r2c",
            "A relay sends a (well-formed) REGISTER.",
            register_bytes.clone(),
            ErrorCode::UnexpectedFrame,
            "wrong_direction",
        ),
        invalid(
            "wrong_direction_request",
            "r2c",
            "A relay sends a REQUEST.",
            ClientToRelay::Request(Request {
                req_id: 1,
                op: RequestOp::Presence(true),
            })
            .encode()
            .to_vec(),
            ErrorCode::UnexpectedFrame,
            "wrong_direction",
        ),
        invalid(
            "confirm_truncated",
            "c2r",
            "CONFIRM with 63 of the 64 signature bytes.",
            confirm_bytes[..confirm_bytes.len() - 1].to_vec(),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "confirm_trailing_byte",
            "c2r",
            "CONFIRM followed by one extra zero byte.",
            cat(&[&confirm_bytes, &[0]]),
            ErrorCode::Malformed,
            "trailing_bytes",
        ),
        invalid(
            "challenge_trailing_byte",
            "r2c",
            "CHALLENGE followed by one extra byte.",
            cat(&[&challenge_bytes, &[0x01]]),
            ErrorCode::Malformed,
            "trailing_bytes",
        ),
        invalid(
            "register_truncated",
            "c2r",
            "The vector REGISTER without its last byte.",
            register_bytes[..register_bytes.len() - 1].to_vec(),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "register_bad_role",
            "c2r",
            "REGISTER with role byte 3 (0 client, 1 relay, 2 sender are the roles).",
            with(register_bytes.clone(), 2, 3),
            ErrorCode::Malformed,
            "bad_value",
        ),
        invalid(
            "register_url_too_long",
            "c2r",
            "REGISTER whose url is 1025 bytes (the maximum is 1024).",
            long_url,
            ErrorCode::Malformed,
            "too_long",
        ),
        invalid(
            "register_url_bad_utf8",
            "c2r",
            "REGISTER whose url contains the byte 0xff (not UTF-8).",
            bad_utf8,
            ErrorCode::Malformed,
            "bad_utf8",
        ),
        invalid(
            "msg_unknown_route_0",
            "c2r",
            "MSG with route byte 0.",
            with(a2b_bytes.clone(), 2, 0),
            ErrorCode::UnknownRoute,
            "unknown_route",
        ),
        invalid(
            "msg_unknown_route_9",
            "r2c",
            "MSG with route byte 9 (as a client would see it).",
            with(a2b_bytes.clone(), 2, 9),
            ErrorCode::UnknownRoute,
            "unknown_route",
        ),
        invalid(
            "msg_header_truncated",
            "c2r",
            "a2b MSG cut inside the `to` address.",
            a2b_bytes[..MSG_FIXED_HEADER + 31].to_vec(),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "msg_a2g_oversize_count",
            "c2r",
            "a2g MSG whose list count is 65535 with no addresses following: rejected before allocating.",
            cat(&[&a2b_bytes[..MSG_FIXED_HEADER], &[0xff, 0xff]])
                .into_iter()
                .enumerate()
                .map(|(i, x)| if i == 2 { 3 } else { x })
                .collect(),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "msg_a2g_count_one_too_many",
            "c2r",
            "a2g MSG with count 2 and only one address (and no payload).",
            {
                let mut v = a2b_bytes[..MSG_FIXED_HEADER].to_vec();
                v[2] = 3;
                v.extend_from_slice(&[0x00, 0x02]);
                v.extend_from_slice(&b.0);
                v
            },
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "msg_a2n_bad_scope",
            "c2r",
            "a2n MSG with scope byte 2.",
            with(a2n_bytes.clone(), MSG_FIXED_HEADER, 2),
            ErrorCode::Malformed,
            "bad_value",
        ),
        invalid(
            "request_unknown_op",
            "c2r",
            "REQUEST with op 9.",
            cat(&[&head(ty::REQUEST), &[0, 0, 0, 1, 9]]),
            ErrorCode::UnknownOp,
            "unknown_op",
        ),
        invalid(
            "request_online_truncated",
            "c2r",
            "ONLINE request missing the limit field.",
            cat(&[&head(ty::REQUEST), &[0, 0, 0, 1, 1, 0, 0, 0, 0]]),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "request_presence_trailing",
            "c2r",
            "PRESENCE request with an extra byte.",
            cat(&[&head(ty::REQUEST), &[0, 0, 0, 1, 3, 1, 0]]),
            ErrorCode::Malformed,
            "trailing_bytes",
        ),
        invalid(
            "receipt_bad_status",
            "r2c",
            "RECEIPT with status byte 9.",
            cat(&[&head(ty::RECEIPT), &[0x11; 16], &[9, 0, 0, 0, 0, 0, 0, 0, 0]]),
            ErrorCode::Malformed,
            "bad_value",
        ),
        invalid(
            "receipt_oversize_entry_count",
            "r2c",
            "RECEIPT claiming 65535 entries with none present.",
            cat(&[&head(ty::RECEIPT), &[0x11; 16], &[0, 0, 0, 0, 0, 0, 1, 0xff, 0xff]]),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "response_unknown_op",
            "r2c",
            "RESPONSE with status 0 (ok) and op 9: the body cannot be parsed.",
            cat(&[&head(ty::RESPONSE), &[0, 0, 0, 1, 9, 0, 0]]),
            ErrorCode::UnknownOp,
            "unknown_op",
        ),
        invalid(
            "response_online_oversize_count",
            "r2c",
            "ONLINE response claiming 65535 addresses with none present.",
            cat(&[&head(ty::RESPONSE), &[0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 3, 0xff, 0xff]]),
            ErrorCode::Malformed,
            "truncated",
        ),
        invalid(
            "notice_unknown_kind",
            "r2c",
            "NOTICE with kind 9.",
            cat(&[&head(ty::NOTICE), &[9]]),
            ErrorCode::Malformed,
            "bad_value",
        ),
        invalid(
            "notice_replaced_trailing",
            "r2c",
            "NOTICE replaced followed by an address it does not have.",
            cat(&[&head(ty::NOTICE), &[3], &b.0]),
            ErrorCode::Malformed,
            "trailing_bytes",
        ),
        invalid(
            "error_detail_truncated",
            "r2c",
            "ERROR whose detail length says 5 but only 2 bytes follow.",
            cat(&[&head(ty::ERROR), &[0, 1, 0, 5], b"ab"]),
            ErrorCode::Malformed,
            "truncated",
        ),
    ];

    // --------------------------------------------------------- error codes
    let error_codes = ErrorCode::ALL
        .iter()
        .map(|&c| ErrorCodeRow {
            name: c.as_str(),
            number: c.as_u16(),
            close_code: c.close_code(),
            description: describe(c),
        })
        .collect();

    let constants = Constants {
        frame_types: named(&[
            ("CHALLENGE", ty::CHALLENGE),
            ("REGISTER", ty::REGISTER),
            ("COUNTERSIGN", ty::COUNTERSIGN),
            ("CONFIRM", ty::CONFIRM),
            ("ACK", ty::ACK),
            ("REPLY_BACK", ty::REPLY_BACK),
            ("MSG", ty::MSG),
            ("RECEIPT", ty::RECEIPT),
            ("REQUEST", ty::REQUEST),
            ("RESPONSE", ty::RESPONSE),
            ("NOTICE", ty::NOTICE),
            ("ERROR", ty::ERROR),
        ]),
        routes: named(&[("a2a", 1), ("a2b", 2), ("a2g", 3), ("a2n", 4)]),
        scopes: named(&[
            ("relay", Scope::Relay as u8),
            ("federation", Scope::Federation as u8),
        ]),
        roles: named(&[
            ("client", Role::Client as u8),
            ("relay", Role::Relay as u8),
            ("sender", Role::Sender as u8),
        ]),
        statuses: [
            Status::Delivered,
            Status::Queued,
            Status::NoRoute,
            Status::Rejected,
            Status::Partial,
        ]
        .iter()
        .map(|s| Named {
            name: s.as_str(),
            value: *s as u8,
        })
        .collect(),
        request_ops: named(&[
            ("online", 1),
            ("lookup", 2),
            ("presence", 3),
            ("exclusive", 6),
        ]),
        notice_kinds: named(&[
            ("join", 1),
            ("leave", 2),
            ("replaced", 3),
            ("shutting_down", 4),
        ]),
        sig_a_domain: domain(SIG_A_DOMAIN),
        sig_b_domain: domain(SIG_B_DOMAIN),
        sig_c_domain: domain(SIG_C_DOMAIN),
        max_url_len: MAX_URL_LEN,
        max_detail_len: MAX_DETAIL_LEN,
        msg_fixed_header_len: MSG_FIXED_HEADER,
        default_max_skew_ms: DEFAULT_MAX_SKEW_MS,
    };

    let v = Vectors {
        description: "w2w protocol test vectors. Every frame is one binary WebSocket message; see docs/PROTOCOL.md.",
        generator: "cargo run -p w2w-proto --example gen_vectors > testdata/vectors.json",
        conventions: vec![
            "All byte strings are lowercase hex.",
            "Integers on the wire are big-endian; in this file they are JSON numbers (all below 2^53).",
            "Addresses are 32-byte Ed25519 public keys; seeds are 32-byte Ed25519 secret keys (RFC 8032).",
            "Error codes are named by their snake_case name; numbers are in error_codes.",
            "A reason or error of null means code 0 (none).",
            "direction: c2r = sent by a client, decoded by a relay; r2c = sent by a relay, decoded by a client; both = MSG, which travels both ways unchanged.",
            "Each frame's fields encode to hex and hex decodes to fields; invalid_frames must be refused with the stated error.",
        ],
        protocol_version: PROTOCOL_VERSION,
        constants,
        identities,
        registration,
        registration_checks,
        frames,
        invalid_frames,
        error_codes,
    };
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
}

fn h2b(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn describe(c: ErrorCode) -> &'static str {
    c.description()
}
