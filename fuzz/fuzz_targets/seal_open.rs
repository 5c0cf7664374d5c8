//! End-to-end payload checks on hostile bytes: `seal::open` and
//! `seal::verify` run by every client on every MSG payload a relay hands it.
//!
//! Identities are fixed (alice, bob, carol of testdata/seal_vectors.json,
//! plus eve, who is never a recipient); the sender may also be any 32 input
//! bytes (invalid points, small-order points). Nothing may panic, and a
//! successful open or verify must return one of the genuine plaintexts of
//! the vectors for their message id and sender: anything else would be a
//! forgery made by a fuzzer without any secret key.
//!
//! Mode bit 0x40 instead seals input bytes to bob, carol and input-chosen
//! addresses and checks that each named identity opens them to the same
//! plaintext.
//!
//! Input layout: `mode` (u8), [`id` (16) if mode & 0x10], [`from` (32) if
//! (mode >> 2) & 3 == 3], then the payload.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use w2w_proto::frame::MsgId;
use w2w_proto::seal::{self, SealError};
use w2w_proto::{Address, Identity};

const ALICE: [u8; 32] = [0xa1; 32];
const BOB: [u8; 32] = [0xb0; 32];
const CAROL: [u8; 32] = [0xc0; 32];
const EVE: [u8; 32] = [0xee; 32];
const VECTOR_ID: MsgId = MsgId([0x42; 16]);

fn genuine_sealed(pt: &[u8]) -> bool {
    pt == b"hello bob" || pt.is_empty() || pt.iter().copied().eq(0u8..100)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    // Key derivation is the slow part of a run: do it once.
    static IDS: OnceLock<[Identity; 4]> = OnceLock::new();
    let ids = IDS.get_or_init(|| [ALICE, BOB, CAROL, EVE].map(Identity::from_seed));
    if mode & 0x40 != 0 {
        return seal_round_trip(ids, rest);
    }
    let me = &ids[(mode & 3) as usize];
    let id = if mode & 0x10 != 0 && rest.len() >= 16 {
        let (a, b) = rest.split_at(16);
        rest = b;
        MsgId(a.try_into().unwrap())
    } else {
        VECTOR_ID
    };
    let from = match (mode >> 2) & 3 {
        3 if rest.len() >= 32 => {
            let (a, b) = rest.split_at(32);
            rest = b;
            Address(a.try_into().unwrap())
        }
        i => ids[(i % 3) as usize].address(),
    };
    let payload = rest;
    let genuine_context = id == VECTOR_ID && from == ids[0].address();

    if let Ok(pt) = seal::open(me, id, &from, payload) {
        assert!(
            genuine_context && genuine_sealed(&pt),
            "open accepted a payload no one sealed: me {:?} from {from:?} id {id:?} -> {} bytes",
            me.address(),
            pt.len()
        );
    }
    if let Ok(body) = seal::verify(&id, &from, payload) {
        assert!(
            genuine_context && body == b"hello everyone",
            "verify accepted a signature no one made"
        );
    }
});

fn seal_round_trip(ids: &[Identity; 4], data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let extra = (n as usize % 4).min(rest.len() / 32);
    let (extra_bytes, plaintext) = rest.split_at(extra * 32);
    let mut recipients = vec![ids[1].address(), ids[2].address()];
    recipients.extend(
        extra_bytes
            .chunks_exact(32)
            .map(|c| Address(c.try_into().unwrap())),
    );
    let mut ctr = n;
    let mut fill = |b: &mut [u8]| {
        for x in b {
            ctr = ctr.wrapping_add(1);
            *x = ctr;
        }
    };
    let id = MsgId([n; 16]);
    match seal::seal(&ids[0], id, &recipients, plaintext, &mut fill) {
        Ok(sealed) => {
            for me in &ids[1..3] {
                assert_eq!(
                    seal::open(me, id, &ids[0].address(), &sealed).as_deref(),
                    Ok(plaintext),
                    "a recipient cannot open what was sealed to it"
                );
            }
            if !recipients.contains(&ids[3].address()) {
                assert!(
                    seal::open(&ids[3], id, &ids[0].address(), &sealed).is_err(),
                    "a non-recipient opened a sealed payload"
                );
            }
            let signed = seal::sign(&ids[0], id, plaintext);
            assert_eq!(seal::verify(&id, &ids[0].address(), &signed), Ok(plaintext));
        }
        Err(e) => assert_eq!(e, SealError::BadRecipient, "seal failed: {e}"),
    }
}
