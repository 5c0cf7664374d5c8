//! Checks `testdata/s2s_vectors.json` (relay-to-relay frames, PROTOCOL.md
//! 12.2): each frame is its version and type bytes followed by its listed
//! fields in order; this crate decodes it and encodes it back to the same
//! bytes; its signatures (link state, records) verify.

use std::path::Path;

use bytes::Bytes;
use serde_json::Value;
use w2w_proto::s2s::{GroupAnswer, GroupGet, GroupQuery, GroupReply, RelayToRelay};

fn vectors() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/s2s_vectors.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("s2s_vectors.json is valid JSON")
}

#[test]
fn every_s2s_frame_is_its_fields_in_order_and_round_trips() {
    let v = vectors();
    let types = &v["types"];
    let list = v["vectors"].as_array().expect("vectors");
    assert_eq!(list.len(), 18);
    let mut kinds = std::collections::BTreeSet::new();
    for vec in list {
        let name = vec["name"].as_str().unwrap();
        let frame = hex::decode(vec["frame"].as_str().unwrap()).unwrap();
        let ty = types[name].as_str().unwrap();
        let mut built = format!("01{ty}");
        for field in vec["fields"].as_array().unwrap() {
            built.push_str(field[1].as_str().unwrap());
        }
        assert_eq!(built, hex::encode(&frame), "{name}: fields in order");
        let bytes = Bytes::from(frame);
        let decoded =
            RelayToRelay::decode(&bytes).unwrap_or_else(|e| panic!("{name}: decode: {e:?}"));
        assert_eq!(decoded.encode(), bytes, "{name}: encodes back");
        let records = match &decoded {
            RelayToRelay::LinkState(ls) => {
                assert!(ls.verify().is_ok(), "{name}: signature");
                Vec::new()
            }
            RelayToRelay::Presence(p) => vec![p.clone()],
            RelayToRelay::DirPut(d) => d.records.clone(),
            RelayToRelay::DirAnswer(a) => a.records.clone(),
            RelayToRelay::GroupPut(g) => {
                for r in &g.records {
                    assert_eq!(r.verify(), Ok(()), "{name}: group record signature");
                }
                Vec::new()
            }
            RelayToRelay::GroupAnswer(GroupAnswer {
                reply: GroupReply::Located(records),
                ..
            }) => {
                for r in records {
                    assert_eq!(r.verify(), Ok(()), "{name}: group record signature");
                }
                Vec::new()
            }
            RelayToRelay::GroupGet(GroupGet {
                query: GroupQuery::Op(op),
                ..
            }) => {
                assert!(op.verify().is_ok(), "{name}: operation signature");
                Vec::new()
            }
            _ => Vec::new(),
        };
        for p in records {
            assert_eq!(p.verify(), Ok(()), "{name}: record signatures");
        }
        kinds.insert(ty.to_string());
    }
    // Every s2s type has a vector.
    assert_eq!(kinds.len(), 11);
    // A group's records are placed by the hash of its name.
    let g = &v["group_key"];
    let key = w2w_proto::s2s::group_key(g["name"].as_str().unwrap());
    assert_eq!(hex::encode(key.0), g["key"].as_str().unwrap());
}
