//! `RelayToClient::decode` on arbitrary bytes: what a client (CLI, library,
//! or a relay dialling a peer during registration) parses from a relay it
//! may not trust. Never panics; accepted frames round-trip.
//!
//! One normalization is by design (crates/w2w-proto/src/frame.rs,
//! `ResponseBody::op`): a successful RESPONSE's op byte is re-encoded from
//! its body, so a group body read under op 4 (GROUP) comes back as op 5
//! (GROUP_INFO). Apart from that op byte the encoding is canonical.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use w2w_proto::RelayToClient;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let Ok(mut decoded) = RelayToClient::decode(&frame) else {
        return;
    };
    let again = decoded.encode();
    let redecoded = RelayToClient::decode(&again).expect("re-encoded frame must decode");
    let mut expected = data.to_vec();
    if let RelayToClient::Response(r) = &mut decoded {
        if let Ok(body) = &r.result {
            r.op = body.op();
            expected[6] = r.op; // version, type, req_id (4), op
        }
    }
    assert_eq!(redecoded, decoded, "decode(encode(x)) != x");
    assert_eq!(&again[..], &expected[..], "encoding is not canonical");
});
