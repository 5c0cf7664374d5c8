//! `RelayToClient::decode` on arbitrary bytes: what a client (CLI, library,
//! or a relay dialling a peer during registration) parses from a relay it
//! may not trust. Never panics; accepted frames round-trip exactly.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use w2w_proto::RelayToClient;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    if let Ok(decoded) = RelayToClient::decode(&frame) {
        let again = decoded.encode();
        let redecoded = RelayToClient::decode(&again).expect("re-encoded frame must decode");
        assert_eq!(redecoded, decoded, "decode(encode(x)) != x");
        assert_eq!(&again[..], data, "encoding is not canonical");
    }
});
