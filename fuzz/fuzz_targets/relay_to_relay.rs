//! `s2s::RelayToRelay::decode` on arbitrary bytes: every frame a peer relay
//! sends on a federation link. Never panics; accepted frames round-trip
//! exactly; PRESENCE, LINK_STATE and group records (and the records in
//! DIR_PUT, DIR_ANSWER, GROUP_PUT and GROUP_ANSWER, and a GROUP_GET's
//! operation) are also signature-checked
//! (`verify()` must not panic on any key or signature bytes, and a record
//! made of fuzzer bytes must essentially never verify unless it is one of the
//! genuine seed records).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use w2w_proto::s2s::RelayToRelay;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let Ok(decoded) = RelayToRelay::decode(&frame) else {
        return;
    };
    let again = decoded.encode();
    let redecoded = RelayToRelay::decode(&again).expect("re-encoded frame must decode");
    assert_eq!(redecoded, decoded, "decode(encode(x)) != x");
    assert_eq!(&again[..], data, "encoding is not canonical");
    match &decoded {
        RelayToRelay::Presence(p) => {
            let _ = p.verify();
            let _ = p.proof.verify();
            let _ = p.rank();
        }
        RelayToRelay::LinkState(ls) => {
            let _ = ls.verify();
        }
        RelayToRelay::Forward(f) => {
            // The wrapped client MSG is decoded by the receiving relay too.
            let _ = w2w_proto::ClientToRelay::decode(&f.msg);
        }
        RelayToRelay::DirPut(d) => {
            for p in &d.records {
                let _ = p.verify();
            }
        }
        RelayToRelay::DirAnswer(a) => {
            for p in &a.records {
                let _ = p.verify();
            }
        }
        RelayToRelay::GroupPut(d) => {
            for g in &d.records {
                let _ = g.verify();
            }
        }
        RelayToRelay::GroupGet(g) => {
            if let w2w_proto::s2s::GroupQuery::Op(op) = &g.query {
                let _ = op.verify();
            }
            let _ = w2w_proto::s2s::group_key(g.query.name());
        }
        RelayToRelay::GroupAnswer(a) => {
            if let w2w_proto::s2s::GroupReply::Located(records) = &a.reply {
                for g in records {
                    let _ = g.verify();
                }
            }
        }
        RelayToRelay::FwdReceipt(_) | RelayToRelay::Redirect(_) | RelayToRelay::DirGet(_) => {}
    }
});
