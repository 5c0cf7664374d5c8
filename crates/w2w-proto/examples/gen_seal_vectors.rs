//! Writes testdata/seal_vectors.json: end-to-end sealing and signing
//! vectors with fixed keys and fixed "random" bytes, for the Rust and JS
//! clients to check.
//!
//! cargo run -p w2w-proto --example gen_seal_vectors > testdata/seal_vectors.json

use w2w_proto::frame::MsgId;
use w2w_proto::seal;
use w2w_proto::Identity;

/// Deterministic "random" bytes: 0x01, 0x02, ... wrapping.
fn counter() -> impl FnMut(&mut [u8]) {
    let mut c = 0u8;
    move |b: &mut [u8]| {
        for x in b.iter_mut() {
            c = c.wrapping_add(1);
            *x = c;
        }
    }
}

fn main() {
    let alice = Identity::from_seed([0xa1; 32]);
    let bob = Identity::from_seed([0xb0; 32]);
    let carol = Identity::from_seed([0xc0; 32]);
    let id = MsgId([0x42; 16]);
    let ids = serde_json::json!({
        "alice": {"seed": hex::encode(alice.seed()), "address": alice.address().to_hex()},
        "bob": {"seed": hex::encode(bob.seed()), "address": bob.address().to_hex()},
        "carol": {"seed": hex::encode(carol.seed()), "address": carol.address().to_hex()},
    });
    let mut sealed = Vec::new();
    for (desc, recips, pt) in [
        (
            "a2b alice → bob, short text",
            vec![bob.address()],
            b"hello bob".to_vec(),
        ),
        ("a2b alice → bob, empty", vec![bob.address()], Vec::new()),
        (
            "a2g alice → [bob, carol], 100 bytes",
            vec![bob.address(), carol.address()],
            (0..100u8).collect(),
        ),
    ] {
        let s = seal::seal(&alice, id, &recips, &pt, &mut counter()).expect("seal");
        sealed.push(serde_json::json!({
            "description": desc,
            "sender": "alice",
            "msg_id": hex::encode(id.0),
            "recipients": recips.iter().map(|a| a.to_hex()).collect::<Vec<_>>(),
            "plaintext": hex::encode(&pt),
            "padded_len": seal::padded_len(pt.len()),
            "random_bytes": "counter: bytes 0x01, 0x02, ... drawn in order: content key (32), body nonce (24), then per recipient a slot nonce (24)",
            "sealed": hex::encode(&s),
        }));
    }
    let body = b"hello everyone".to_vec();
    let signed = seal::sign(&alice, id, &body);
    let padding: Vec<_> = [0usize, 1, 62, 63, 64, 1000, 16383, 16384, 20000]
        .iter()
        .map(|n| serde_json::json!({"plaintext_len": n, "padded_len": seal::padded_len(*n)}))
        .collect();
    let v = serde_json::json!({
        "description": "w2w end-to-end payload vectors (see crates/w2w-proto/src/seal.rs and docs/PROTOCOL.md)",
        "flags": {"plain": seal::FLAG_PLAIN, "sealed": seal::FLAG_SEALED, "signed": seal::FLAG_SIGNED},
        "seal_salt": hex::encode(seal::SEAL_SALT),
        "sealed_aad_domain": hex::encode(seal::SEALED_AAD_DOMAIN),
        "signed_domain": hex::encode(seal::SIGNED_DOMAIN),
        "identities": ids,
        "sealed": sealed,
        "signed": [{
            "description": "a2n broadcast signed by alice",
            "msg_id": hex::encode(id.0),
            "from": alice.address().to_hex(),
            "body": hex::encode(&body),
            "payload": hex::encode(&signed),
        }],
        "padding": padding,
    });
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}
