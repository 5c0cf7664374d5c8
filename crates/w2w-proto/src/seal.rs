//! End-to-end payload protection. Relays forward these bytes unread.
//!
//! **Sealed** (MSG `flags` = [`FLAG_SEALED`]), for a2a, a2b and a2g: the
//! payload is encrypted once under a fresh content key, and the content key
//! is wrapped for each recipient under a key only the sender and that
//! recipient can compute:
//!
//! ```text
//! ss    = X25519(sender's Ed25519 secret → X25519, recipient's Ed25519 key → X25519)
//! K     = HKDF-SHA256(ikm = ss, salt = "w2w/v1 seal", info = from || to)        32 bytes
//! slot  = to[0..8] || nonce_i(24) || XChaCha20-Poly1305(K, nonce_i, CK, aad = id || from || to)
//! body  = XChaCha20-Poly1305(CK, nonce, pad(plaintext), aad = "w2w/v1 sealed" || id || from)
//! sealed = 0x01 || nonce(24) || n(u8) || n × slot(80) || body
//! ```
//!
//! The Ed25519 → X25519 conversion is the standard birational map (as in
//! libsodium's `crypto_sign_ed25519_*_to_curve25519`), so an address is
//! also an encryption key and no key directory is needed. Reusing an Ed25519
//! key for X25519 is what libsodium's conversion functions exist for; ePrint
//! 2021/509 analyses the closely related Ed25519 + X25519-KEM combination.
//! No formal proof is claimed for this exact static-static use.
//! Because K comes from the static pair, a recipient that opens a slot knows
//! it was made by `from` (or by itself): the sender is authenticated to the
//! recipient, deniably, as with NaCl's `crypto_box`. The AADs bind the
//! message id and sender that the relay routes on, so a relay cannot move a
//! ciphertext to another message or sender. Plaintexts are padded (ISO
//! 7816-4: 0x80 then zeros) to a power of two of at least 64 bytes, or a
//! multiple of 16 KiB above 16 KiB, so lengths leak less.
//!
//! **Signed** (MSG `flags` = [`FLAG_SIGNED`]), for a2n: the payload is
//! `sig(64) || body`, an Ed25519 signature by `from` over
//! `"w2w/v1 signed\0" || id || from || body`. Broadcasts are public; the
//! signature proves who sent them and that no relay altered them.
//!
//! Randomness is passed in (`fill`) so this module stays deterministic for
//! test vectors.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::VerifyingKey;
use sha2::Sha256;

use crate::frame::MsgId;
use crate::identity::{Address, Identity};

/// MSG flags values (end-to-end, opaque to relays).
pub const FLAG_PLAIN: u8 = 0;
pub const FLAG_SEALED: u8 = 1;
pub const FLAG_SIGNED: u8 = 2;

pub const SEAL_SALT: &[u8] = b"w2w/v1 seal";
pub const SEALED_AAD_DOMAIN: &[u8] = b"w2w/v1 sealed";
pub const SIGNED_DOMAIN: &[u8] = b"w2w/v1 signed\0";
const SEALED_KIND: u8 = 1;
const SLOT_LEN: usize = 8 + 24 + 32 + 16;
/// Most recipients one sealed payload can carry.
pub const MAX_RECIPIENTS: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("too many recipients (max {MAX_RECIPIENTS})")]
    TooManyRecipients,
    #[error("a recipient address is not a valid Ed25519 key")]
    BadRecipient,
    #[error("the sender address is not a valid Ed25519 key")]
    BadSender,
    #[error("the sealed payload is truncated or not a sealed payload")]
    Malformed,
    #[error("this payload is not addressed to us")]
    NotForUs,
    #[error("authentication failed: forged, altered, or not from the claimed sender")]
    Forged,
}

fn x25519_public(addr: &Address) -> Result<MontgomeryPoint, ()> {
    VerifyingKey::from_bytes(&addr.0)
        .map(|k| k.to_montgomery())
        .map_err(|_| ())
}

/// The wrapping key shared by `me` and `other`, for the direction
/// `from → to`.
fn pair_key(me: &Identity, other: &Address, from: &Address, to: &Address) -> Result<[u8; 32], ()> {
    let their = x25519_public(other)?;
    let ss = their.mul_clamped(me.scalar_bytes());
    if ss.0 == [0u8; 32] {
        return Err(()); // low-order point
    }
    let hk = hkdf::Hkdf::<Sha256>::new(Some(SEAL_SALT), &ss.0);
    let mut k = [0u8; 32];
    let info = [from.0.as_slice(), to.0.as_slice()].concat();
    hk.expand(&info, &mut k).map_err(|_| ())?;
    Ok(k)
}

/// Padded length for a plaintext of `n` bytes (including the 0x80 marker).
pub fn padded_len(n: usize) -> usize {
    let need = n + 1;
    if need <= 16 * 1024 {
        need.next_power_of_two().max(64)
    } else {
        need.div_ceil(16 * 1024) * 16 * 1024
    }
}

fn pad(p: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(padded_len(p.len()));
    v.extend_from_slice(p);
    v.push(0x80);
    v.resize(padded_len(p.len()), 0);
    v
}

fn unpad(mut v: Vec<u8>) -> Result<Vec<u8>, SealError> {
    let end = v
        .iter()
        .rposition(|b| *b != 0)
        .ok_or(SealError::Malformed)?;
    if v[end] != 0x80 {
        return Err(SealError::Malformed);
    }
    v.truncate(end);
    Ok(v)
}

fn body_aad(id: &MsgId, from: &Address) -> Vec<u8> {
    [SEALED_AAD_DOMAIN, &id.0, &from.0].concat()
}

fn slot_aad(id: &MsgId, from: &Address, to: &Address) -> Vec<u8> {
    [id.0.as_slice(), &from.0, &to.0].concat()
}

/// Seals `plaintext` from `sender` to `recipients` for message `id`.
/// `fill` supplies random bytes (the content key and nonces).
pub fn seal(
    sender: &Identity,
    id: MsgId,
    recipients: &[Address],
    plaintext: &[u8],
    fill: &mut dyn FnMut(&mut [u8]),
) -> Result<Vec<u8>, SealError> {
    if recipients.len() > MAX_RECIPIENTS || recipients.is_empty() {
        return Err(SealError::TooManyRecipients);
    }
    let from = sender.address();
    let mut ck = [0u8; 32];
    fill(&mut ck);
    let mut nonce = [0u8; 24];
    fill(&mut nonce);
    let mut out =
        Vec::with_capacity(26 + recipients.len() * SLOT_LEN + padded_len(plaintext.len()) + 16);
    out.push(SEALED_KIND);
    out.extend_from_slice(&nonce);
    out.push(recipients.len() as u8);
    for to in recipients {
        let k = pair_key(sender, to, &from, to).map_err(|_| SealError::BadRecipient)?;
        let mut n = [0u8; 24];
        fill(&mut n);
        let wrapped = XChaCha20Poly1305::new(&k.into())
            .encrypt(
                XNonce::from_slice(&n),
                Payload {
                    msg: &ck,
                    aad: &slot_aad(&id, &from, to),
                },
            )
            .map_err(|_| SealError::BadRecipient)?;
        out.extend_from_slice(&to.0[..8]);
        out.extend_from_slice(&n);
        out.extend_from_slice(&wrapped);
    }
    let body = XChaCha20Poly1305::new(&ck.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &pad(plaintext),
                aad: &body_aad(&id, &from),
            },
        )
        .map_err(|_| SealError::Malformed)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens a sealed payload addressed to `me`, sent by `from` as message `id`.
pub fn open(me: &Identity, id: MsgId, from: &Address, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < 26 || sealed[0] != SEALED_KIND {
        return Err(SealError::Malformed);
    }
    let nonce = &sealed[1..25];
    let n = sealed[25] as usize;
    let slots_end = 26 + n * SLOT_LEN;
    if sealed.len() < slots_end + 16 {
        return Err(SealError::Malformed);
    }
    let to = me.address();
    let k = pair_key(me, from, from, &to).map_err(|_| SealError::BadSender)?;
    let mut found = false;
    let mut ck = None;
    for slot in sealed[26..slots_end].chunks_exact(SLOT_LEN) {
        if slot[..8] != to.0[..8] {
            continue;
        }
        found = true;
        if let Ok(c) = XChaCha20Poly1305::new(&k.into()).decrypt(
            XNonce::from_slice(&slot[8..32]),
            Payload {
                msg: &slot[32..],
                aad: &slot_aad(&id, from, &to),
            },
        ) {
            ck = Some(c);
            break;
        }
    }
    let ck: [u8; 32] = match ck {
        Some(c) => c.try_into().map_err(|_| SealError::Forged)?,
        None if found => return Err(SealError::Forged),
        None => return Err(SealError::NotForUs),
    };
    let padded = XChaCha20Poly1305::new(&ck.into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: &sealed[slots_end..],
                aad: &body_aad(&id, from),
            },
        )
        .map_err(|_| SealError::Forged)?;
    unpad(padded)
}

/// The bytes a signed (broadcast) payload's signature covers.
pub fn signed_message(id: &MsgId, from: &Address, body: &[u8]) -> Vec<u8> {
    [SIGNED_DOMAIN, &id.0, &from.0, body].concat()
}

/// `sig || body`, signed by `sender` for message `id`.
pub fn sign(sender: &Identity, id: MsgId, body: &[u8]) -> Vec<u8> {
    let sig = sender.sign(&signed_message(&id, &sender.address(), body));
    [sig.as_slice(), body].concat()
}

/// Verifies a signed payload from `from`; returns the body.
pub fn verify<'a>(id: &MsgId, from: &Address, payload: &'a [u8]) -> Result<&'a [u8], SealError> {
    if payload.len() < 64 {
        return Err(SealError::Malformed);
    }
    let (sig, body) = payload.split_at(64);
    let sig: [u8; 64] = sig.try_into().map_err(|_| SealError::Malformed)?;
    from.verify(&signed_message(id, from, body), &sig)
        .map_err(|_| SealError::Forged)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn seal_open_round_trip_for_each_recipient() {
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let c = Identity::from_seed([3; 32]);
        let eve = Identity::from_seed([4; 32]);
        let id = MsgId([9; 16]);
        let s = seal(
            &a,
            id,
            &[b.address(), c.address()],
            b"secret",
            &mut counter(),
        )
        .unwrap();
        assert_eq!(open(&b, id, &a.address(), &s).unwrap(), b"secret");
        assert_eq!(open(&c, id, &a.address(), &s).unwrap(), b"secret");
        assert_eq!(open(&eve, id, &a.address(), &s), Err(SealError::NotForUs));
        // Wrong sender claimed, wrong id, any flipped bit: refused.
        assert_eq!(open(&b, id, &eve.address(), &s), Err(SealError::Forged));
        assert_eq!(
            open(&b, MsgId([8; 16]), &a.address(), &s),
            Err(SealError::Forged)
        );
        for i in [0usize, 1, 30, s.len() - 1] {
            let mut t = s.clone();
            t[i] ^= 1;
            assert!(open(&b, id, &a.address(), &t).is_err(), "flip at {i}");
        }
        assert!(!s.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn padding_hides_small_length_differences() {
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]).address();
        let l1 = seal(&a, MsgId([0; 16]), &[b], b"hi", &mut counter())
            .unwrap()
            .len();
        let l2 = seal(&a, MsgId([0; 16]), &[b], &[7; 60], &mut counter())
            .unwrap()
            .len();
        assert_eq!(l1, l2);
        assert_eq!(padded_len(0), 64);
        assert_eq!(padded_len(64), 128);
        assert_eq!(padded_len(20_000), 32 * 1024);
        assert_eq!(unpad(pad(b"")).unwrap(), b"");
        assert_eq!(unpad(pad(&[0, 0x80, 0])).unwrap(), vec![0, 0x80, 0]);
    }

    #[test]
    fn signed_broadcast_verifies_and_rejects_forgery() {
        let a = Identity::from_seed([1; 32]);
        let id = MsgId([5; 16]);
        let p = sign(&a, id, b"to all");
        assert_eq!(verify(&id, &a.address(), &p).unwrap(), b"to all");
        let mut q = p.clone();
        *q.last_mut().unwrap() ^= 1;
        assert_eq!(verify(&id, &a.address(), &q), Err(SealError::Forged));
        let other = Identity::from_seed([2; 32]).address();
        assert_eq!(verify(&id, &other, &p), Err(SealError::Forged));
    }
}
