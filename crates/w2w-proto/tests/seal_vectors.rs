//! Checks testdata/seal_vectors.json against the code: sealing with the
//! recorded "random" bytes reproduces the bytes, and every recipient opens
//! them; signed payloads verify.

use serde_json::Value;
use w2w_proto::frame::MsgId;
use w2w_proto::{seal, Address, Identity};

fn load() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/seal_vectors.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("read vectors")).expect("json")
}

fn bytes(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

fn ident(v: &Value, name: &str) -> Identity {
    let seed: [u8; 32] = bytes(&v["identities"][name]["seed"]).try_into().unwrap();
    let id = Identity::from_seed(seed);
    assert_eq!(
        id.address().to_hex(),
        v["identities"][name]["address"].as_str().unwrap()
    );
    id
}

fn counter() -> impl FnMut(&mut [u8]) {
    let mut c = 0u8;
    move |b: &mut [u8]| {
        for x in b.iter_mut() {
            c = c.wrapping_add(1);
            *x = c;
        }
    }
}

#[test]
fn sealed_vectors_reproduce_and_open() {
    let v = load();
    let alice = ident(&v, "alice");
    let people = [ident(&v, "bob"), ident(&v, "carol")];
    for case in v["sealed"].as_array().unwrap() {
        let id = MsgId(bytes(&case["msg_id"]).try_into().unwrap());
        let recips: Vec<Address> = case["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().parse().unwrap())
            .collect();
        let pt = bytes(&case["plaintext"]);
        let want = bytes(&case["sealed"]);
        let got = seal::seal(&alice, id, &recips, &pt, &mut counter()).unwrap();
        assert_eq!(
            hex::encode(&got),
            hex::encode(&want),
            "{}",
            case["description"]
        );
        for r in &recips {
            let who = people.iter().find(|p| p.address() == *r).unwrap();
            assert_eq!(seal::open(who, id, &alice.address(), &want).unwrap(), pt);
        }
    }
}

#[test]
fn signed_and_padding_vectors() {
    let v = load();
    for case in v["signed"].as_array().unwrap() {
        let id = MsgId(bytes(&case["msg_id"]).try_into().unwrap());
        let from: Address = case["from"].as_str().unwrap().parse().unwrap();
        let payload = bytes(&case["payload"]);
        assert_eq!(
            seal::verify(&id, &from, &payload).unwrap(),
            bytes(&case["body"])
        );
        assert_eq!(
            seal::sign(&ident(&v, "alice"), id, &bytes(&case["body"])),
            payload
        );
    }
    for p in v["padding"].as_array().unwrap() {
        let n = p["plaintext_len"].as_u64().unwrap() as usize;
        assert_eq!(
            seal::padded_len(n) as u64,
            p["padded_len"].as_u64().unwrap()
        );
    }
}
