//! Deterministic generator for `testdata/s2s_vectors.json`: one vector per
//! relay-to-relay frame (PROTOCOL.md 12.2).
//!
//! ```text
//! cargo run -p w2w-proto --example gen_s2s_vectors > testdata/s2s_vectors.json
//! ```
//!
//! Each vector lists its fields in wire order, each as hex; the frame is
//! the version and type bytes followed by those fields. `tests/s2s_vectors.rs`
//! checks that concatenation against the frame, that the crate decodes the
//! frame and encodes it back to the same bytes, and that its signatures
//! verify. Change this file only together with docs/PROTOCOL.md.

use bytes::Bytes;
use serde::Serialize;
use w2w_proto::frame::{ClientToRelay, Dest, Msg, MsgId, ReceiptEntry, Register, Role, Status};
use w2w_proto::group::{GroupAction, GroupInfo, GroupOp};
use w2w_proto::handshake::sig_a_message;
use w2w_proto::identity::{Address, Identity};
use w2w_proto::s2s::{
    group_key, DirAnswer, DirGet, DirPut, Forward, ForwardTarget, FwdReceipt, GroupAnswer,
    GroupGet, GroupPut, GroupQuery, GroupRecord, GroupReply, LinkState, Presence,
    RegistrationProof, RelayToRelay,
};

#[derive(Serialize)]
struct Vector {
    name: &'static str,
    description: &'static str,
    /// (field, hex) in wire order, after the version and type bytes.
    fields: Vec<(String, String)>,
    frame: String,
}

fn h(b: impl AsRef<[u8]>) -> String {
    hex::encode(b)
}

fn string(s: &str) -> String {
    h([&(s.len() as u16).to_be_bytes()[..], s.as_bytes()].concat())
}

fn addresses(list: &[Address]) -> String {
    let mut out = h((list.len() as u16).to_be_bytes());
    for a in list {
        out.push_str(&h(a.0));
    }
    out
}

fn f(name: &str, hex: String) -> (String, String) {
    (name.to_string(), hex)
}

/// The fields of a PRESENCE body, prefixed `prefix`.
fn presence_fields(prefix: &str, p: &Presence) -> Vec<(String, String)> {
    let q = &p.proof;
    vec![
        f(&format!("{prefix}address"), h(q.address.0)),
        f(&format!("{prefix}relay_key"), h(q.relay_key.0)),
        f(&format!("{prefix}relay_nonce"), h(q.relay_nonce)),
        f(&format!("{prefix}client_nonce"), h(q.client_nonce)),
        f(
            &format!("{prefix}timestamp_ms"),
            h(q.timestamp_ms.to_be_bytes()),
        ),
        f(&format!("{prefix}url"), string(&q.url)),
        f(&format!("{prefix}sig_a"), h(q.sig_a)),
        f(&format!("{prefix}online"), h([p.online as u8])),
        f(&format!("{prefix}seq"), h(p.seq.to_be_bytes())),
        f(&format!("{prefix}since_ms"), h(p.since_ms.to_be_bytes())),
        f(&format!("{prefix}relay_sig"), h(p.relay_sig)),
    ]
}

fn vector(
    name: &'static str,
    description: &'static str,
    frame: RelayToRelay,
    fields: Vec<(String, String)>,
) -> Vector {
    Vector {
        name,
        description,
        fields,
        frame: h(frame.encode()),
    }
}

fn main() {
    let relay = Identity::from_seed([0x01; 32]);
    let other = Identity::from_seed([0x03; 32]);
    let third = Identity::from_seed([0x04; 32]);
    let client = Identity::from_seed([0x02; 32]);
    let (r, o, t) = (relay.address(), other.address(), third.address());
    let url = "ws://127.0.0.1:7777/";

    let ls = LinkState::sign(&relay, url, 1_700_000_000_000, vec![t, o]);
    let mut neighbors = ls.neighbors.clone();
    neighbors.sort();
    let ls_fields = vec![
        f("relay", h(r.0)),
        f("url", string(url)),
        f("seq", h(ls.seq.to_be_bytes())),
        f("neighbors", addresses(&neighbors)),
        f("sig", h(ls.sig)),
    ];

    let relay_nonce: [u8; 32] = std::array::from_fn(|i| 0x30 + i as u8);
    let client_nonce: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
    let ts = 1_700_000_000_000u64;
    let mut reg = Register {
        role: Role::Client,
        relay_key: r,
        client_key: client.address(),
        client_nonce,
        timestamp_ms: ts,
        url: url.to_string(),
        sig_a: [0; 64],
    };
    reg.sig_a = client.sign(&sig_a_message(&reg, &relay_nonce));
    let sig_a = reg.sig_a;
    let proof = RegistrationProof {
        address: client.address(),
        relay_key: r,
        relay_nonce,
        client_nonce,
        timestamp_ms: ts,
        url: url.to_string(),
        sig_a,
    };
    let p = Presence::sign(&relay, proof, true, 7, 1_764_000_000_000);

    let msg = ClientToRelay::Msg(Msg {
        flags: 0,
        id: MsgId(std::array::from_fn(|i| 0x10 + i as u8)),
        from: client.address(),
        dest: Dest::A2b(t),
        payload: Bytes::from_static(b"hi"),
    })
    .encode();
    let id = MsgId(std::array::from_fn(|i| 0x10 + i as u8));
    let grec = GroupRecord::sign(&relay, "crew", 9, 1_764_000_000_000);
    let grec_fields = |prefix: &str| {
        vec![
            f(&format!("{prefix}name"), string("crew")),
            f(&format!("{prefix}relay"), h(grec.relay.0)),
            f(&format!("{prefix}seq"), h(grec.seq.to_be_bytes())),
            f(&format!("{prefix}since_ms"), h(grec.since_ms.to_be_bytes())),
            f(&format!("{prefix}sig"), h(grec.sig)),
        ]
    };
    let gop = GroupOp::sign(&client, "crew", GroupAction::Add(t), 2);
    let ginfo = GroupInfo {
        name: "crew".into(),
        owner: client.address(),
        members: {
            let mut m = vec![(client.address(), true), (t, false)];
            m.sort();
            m
        },
        seq: 2,
    };

    let vectors = vec![
        vector(
            "link_state",
            "Relay 0x01.. lists two peers (sorted); signed over LINK_STATE_DOMAIN || relay || url_len || url || seq || count || neighbors.",
            RelayToRelay::LinkState(ls.clone()),
            ls_fields,
        ),
        vector(
            "presence",
            "Client 0x02.. registered at relay 0x01.., online, the relay's record number 7, registered at 1764000000000 ms by the relay's clock.",
            RelayToRelay::Presence(p.clone()),
            presence_fields("", &p),
        ),
        vector(
            "forward_relay",
            "A MSG from the client for 0x04.., from origin 0x01.. to relay 0x04.., first hop.",
            RelayToRelay::Forward(Forward {
                origin: r,
                hops: 1,
                target: ForwardTarget::Relay {
                    relay: t,
                    to: vec![t],
                },
                msg: msg.clone(),
            }),
            vec![
                f("origin", h(r.0)),
                f("hops", h([1])),
                f("target_kind", h([1])),
                f("relay", h(t.0)),
                f("recipients", addresses(&[t])),
                f("msg", h(&msg)),
            ],
        ),
        vector(
            "forward_broadcast",
            "The same MSG bytes as a federation broadcast (a real one would carry an a2n MSG), third hop.",
            RelayToRelay::Forward(Forward {
                origin: r,
                hops: 3,
                target: ForwardTarget::Broadcast,
                msg: msg.clone(),
            }),
            vec![
                f("origin", h(r.0)),
                f("hops", h([3])),
                f("target_kind", h([2])),
                f("msg", h(&msg)),
            ],
        ),
        vector(
            "forward_handoff",
            "The same MSG, stored at origin 0x01.. for 0x04.. and handed over to relay 0x04.. (PROTOCOL 12.13).",
            RelayToRelay::Forward(Forward {
                origin: r,
                hops: 1,
                target: ForwardTarget::Handoff { relay: t, to: t },
                msg: msg.clone(),
            }),
            vec![
                f("origin", h(r.0)),
                f("hops", h([1])),
                f("target_kind", h([3])),
                f("relay", h(t.0)),
                f("recipient", h(t.0)),
                f("msg", h(&msg)),
            ],
        ),
        vector(
            "fwd_receipt",
            "Relay 0x04.. reports the recipient delivered (one session) to origin 0x01...",
            RelayToRelay::FwdReceipt(FwdReceipt {
                origin: r,
                reporter: t,
                id,
                hops: 0,
                delivered: 1,
                entries: vec![ReceiptEntry {
                    to: t,
                    status: Status::Delivered,
                    reason: 0,
                }],
            }),
            vec![
                f("origin", h(r.0)),
                f("reporter", h(t.0)),
                f("id", h(id.0)),
                f("hops", h([0])),
                f("delivered", h(1u32.to_be_bytes())),
                f("entries", h(1u16.to_be_bytes())),
                f("entry0.to", h(t.0)),
                f("entry0.status", h([0])),
                f("entry0.reason", h(0u16.to_be_bytes())),
            ],
        ),
        vector(
            "redirect",
            "Two relay URLs to dial instead.",
            RelayToRelay::Redirect(vec!["ws://a.example/".into(), "wss://b.example/".into()]),
            vec![
                f("count", h([2])),
                f("url0", string("ws://a.example/")),
                f("url1", string("wss://b.example/")),
            ],
        ),
        vector(
            "dir_put",
            "The presence record above, put on relay 0x03.. (a holder of the address), first hop.",
            RelayToRelay::DirPut(DirPut {
                target: o,
                hops: 1,
                records: vec![p.clone()],
            }),
            [
                vec![f("target", h(o.0)), f("hops", h([1])), f("count", h([1]))],
                presence_fields("record0.", &p),
            ]
            .concat(),
        ),
        vector(
            "dir_get",
            "Relay 0x04.. asks relay 0x03.. for the client's records, nonce 42.",
            RelayToRelay::DirGet(DirGet {
                origin: t,
                target: o,
                hops: 1,
                nonce: 42,
                address: client.address(),
            }),
            vec![
                f("origin", h(t.0)),
                f("target", h(o.0)),
                f("hops", h([1])),
                f("nonce", h(42u64.to_be_bytes())),
                f("address", h(client.address().0)),
            ],
        ),
        vector(
            "dir_answer",
            "Relay 0x03.. answers with the one record it holds.",
            RelayToRelay::DirAnswer(DirAnswer {
                origin: t,
                reporter: o,
                hops: 0,
                nonce: 42,
                address: client.address(),
                records: vec![p.clone()],
            }),
            [
                vec![
                    f("origin", h(t.0)),
                    f("reporter", h(o.0)),
                    f("hops", h([0])),
                    f("nonce", h(42u64.to_be_bytes())),
                    f("address", h(client.address().0)),
                    f("count", h([1])),
                ],
                presence_fields("record0.", &p),
            ]
            .concat(),
        ),
        vector(
            "dir_answer_none",
            "Relay 0x03.. holds no record of the address.",
            RelayToRelay::DirAnswer(DirAnswer {
                origin: t,
                reporter: o,
                hops: 0,
                nonce: 43,
                address: client.address(),
                records: Vec::new(),
            }),
            vec![
                f("origin", h(t.0)),
                f("reporter", h(o.0)),
                f("hops", h([0])),
                f("nonce", h(43u64.to_be_bytes())),
                f("address", h(client.address().0)),
                f("count", h([0])),
            ],
        ),
        vector(
            "group_put",
            "Relay 0x01.. hosts group \"crew\" (its record number 9, created at 1764000000000 ms by its clock) and puts the record on relay 0x03.., a holder of group_key(\"crew\"); signed over GROUP_RECORD_DOMAIN || u8 len || name || relay || seq || since_ms.",
            RelayToRelay::GroupPut(GroupPut {
                target: o,
                hops: 1,
                records: vec![grec.clone()],
            }),
            [
                vec![f("target", h(o.0)), f("hops", h([1])), f("count", h([1]))],
                grec_fields("record0."),
            ]
            .concat(),
        ),
        vector(
            "group_get_locate",
            "Relay 0x04.. asks relay 0x03.. which relay hosts \"crew\" (kind 1), nonce 44.",
            RelayToRelay::GroupGet(GroupGet {
                origin: t,
                target: o,
                hops: 1,
                nonce: 44,
                query: GroupQuery::Locate("crew".into()),
            }),
            vec![
                f("origin", h(t.0)),
                f("target", h(o.0)),
                f("hops", h([1])),
                f("nonce", h(44u64.to_be_bytes())),
                f("kind", h([1])),
                f("name", string("crew")),
            ],
        ),
        vector(
            "group_answer_located",
            "Relay 0x03.. answers with the record it holds.",
            RelayToRelay::GroupAnswer(GroupAnswer {
                origin: t,
                reporter: o,
                hops: 0,
                nonce: 44,
                name: "crew".into(),
                reply: GroupReply::Located(vec![grec.clone()]),
            }),
            [
                vec![
                    f("origin", h(t.0)),
                    f("reporter", h(o.0)),
                    f("hops", h([0])),
                    f("nonce", h(44u64.to_be_bytes())),
                    f("name", string("crew")),
                    f("kind", h([1])),
                    f("count", h([1])),
                ],
                grec_fields("record0."),
            ]
            .concat(),
        ),
        vector(
            "group_get_info",
            "Relay 0x04.. asks the group's relay 0x01.. for the state of \"crew\" for its client 0x02.. (kind 2), second hop.",
            RelayToRelay::GroupGet(GroupGet {
                origin: t,
                target: r,
                hops: 2,
                nonce: 45,
                query: GroupQuery::Info {
                    name: "crew".into(),
                    asker: client.address(),
                },
            }),
            vec![
                f("origin", h(t.0)),
                f("target", h(r.0)),
                f("hops", h([2])),
                f("nonce", h(45u64.to_be_bytes())),
                f("kind", h([2])),
                f("name", string("crew")),
                f("asker", h(client.address().0)),
            ],
        ),
        vector(
            "group_get_op",
            "Relay 0x04.. hands relay 0x01.. an operation its client 0x02.. signed: add 0x04.. to \"crew\" as operation 2 (kind 3; the operation's bytes as in a GROUP request).",
            RelayToRelay::GroupGet(GroupGet {
                origin: t,
                target: r,
                hops: 2,
                nonce: 46,
                query: GroupQuery::Op(gop.clone()),
            }),
            vec![
                f("origin", h(t.0)),
                f("target", h(r.0)),
                f("hops", h([2])),
                f("nonce", h(46u64.to_be_bytes())),
                f("kind", h([3])),
                f("name", string("crew")),
                f("action", h([&[2u8][..], &t.0].concat())),
                f("seq", h(2u64.to_be_bytes())),
                f("actor", h(client.address().0)),
                f("sig", h(gop.sig)),
            ],
        ),
        vector(
            "group_answer_state",
            "Relay 0x01.. answers with the group's state after the operation (status 0).",
            RelayToRelay::GroupAnswer(GroupAnswer {
                origin: t,
                reporter: r,
                hops: 0,
                nonce: 46,
                name: "crew".into(),
                reply: GroupReply::State(Ok(ginfo.clone())),
            }),
            [
                vec![
                    f("origin", h(t.0)),
                    f("reporter", h(r.0)),
                    f("hops", h([0])),
                    f("nonce", h(46u64.to_be_bytes())),
                    f("name", string("crew")),
                    f("kind", h([2])),
                    f("status", h(0u16.to_be_bytes())),
                    f("info.name", string("crew")),
                    f("info.owner", h(ginfo.owner.0)),
                    f("info.members", h((ginfo.members.len() as u16).to_be_bytes())),
                ],
                ginfo
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, (m, admin))| f(&format!("info.member{i}"), h([&m.0[..], &[*admin as u8]].concat())))
                    .collect(),
                vec![f("info.seq", h(ginfo.seq.to_be_bytes()))],
            ]
            .concat(),
        ),
        vector(
            "group_answer_refused",
            "Relay 0x01.. refuses a question: not_member (43).",
            RelayToRelay::GroupAnswer(GroupAnswer {
                origin: t,
                reporter: r,
                hops: 0,
                nonce: 45,
                name: "crew".into(),
                reply: GroupReply::State(Err(43)),
            }),
            vec![
                f("origin", h(t.0)),
                f("reporter", h(r.0)),
                f("hops", h([0])),
                f("nonce", h(45u64.to_be_bytes())),
                f("name", string("crew")),
                f("kind", h([2])),
                f("status", h(43u16.to_be_bytes())),
            ],
        ),
    ];
    eprintln!("group_key(\"crew\") = {}", h(group_key("crew").0));
    let out = serde_json::json!({
        "description": "Relay-to-relay (s2s) frames, PROTOCOL.md 12.2. Each frame is 01 (version), its type byte, then its fields in order. Identities: relay seed 01*32, other relay 03*32, third relay 04*32, client 02*32 (as in vectors.json).",
        "types": {
            "link_state": "40", "presence": "41", "forward_relay": "42", "forward_broadcast": "42", "forward_handoff": "42",
            "fwd_receipt": "43", "redirect": "44", "dir_put": "45", "dir_get": "46",
            "dir_answer": "47", "dir_answer_none": "47", "group_put": "48",
            "group_get_locate": "49", "group_get_info": "49", "group_get_op": "49",
            "group_answer_located": "4a", "group_answer_state": "4a", "group_answer_refused": "4a"
        },
        "group_key": { "name": "crew", "key": h(group_key("crew").0) },
        "vectors": vectors,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
