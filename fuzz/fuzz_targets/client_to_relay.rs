//! `ClientToRelay::decode` on arbitrary bytes: the first decoder every byte a
//! client sends reaches (crates/w2w-server/src/conn.rs). It must never panic,
//! and a frame it accepts must survive encode → decode unchanged, with the
//! re-encoding byte-identical to the input (the codec is canonical, and the
//! relay forwards MSG frames as received). Group operations in a REQUEST
//! also have their signature checked, as the relay does.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use w2w_proto::ClientToRelay;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    if let Ok(decoded) = ClientToRelay::decode(&frame) {
        let again = decoded.encode();
        let redecoded = ClientToRelay::decode(&again).expect("re-encoded frame must decode");
        assert_eq!(redecoded, decoded, "decode(encode(x)) != x");
        assert_eq!(&again[..], data, "encoding is not canonical");
        // The relay checks the signature of every group operation.
        if let ClientToRelay::Request(w2w_proto::frame::Request {
            op: w2w_proto::frame::RequestOp::Group(op),
            ..
        }) = &decoded
        {
            let _ = op.verify();
        }
    }
});
