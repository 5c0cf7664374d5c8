//! Ed25519 identities. A client's address is its public key; written as 64
//! lowercase hex characters wherever a human or JSON sees it.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// A w2w address: the 32-byte Ed25519 public key of a client or relay.
///
/// Any 32 bytes can be carried as a destination; only registration proves
/// that an address is a valid key whose owner is present.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 32]);

impl Address {
    pub const LEN: usize = 32;

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex characters, for logs and terse CLI output.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Checks `sig` over `msg` against this address as an Ed25519 key
    /// (strict verification: rejects small-order keys and malleable
    /// signatures).
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> Result<(), SignatureError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| SignatureError::InvalidKey)?;
        key.verify_strict(msg, &Signature::from_bytes(sig))
            .map_err(|_| SignatureError::BadSignature)
    }
}

/// Why a signature check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The 32 bytes are not a valid Ed25519 public key.
    #[error("address is not a valid Ed25519 public key")]
    InvalidKey,
    /// The signature does not verify under the key.
    #[error("signature does not verify")]
    BadSignature,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.short())
    }
}

/// Addresses serialize as 64 lowercase hex characters (config files, JSON).
impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a string is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseAddressError {
    #[error("an address is 64 hex characters, got {0}")]
    WrongLength(usize),
    #[error("an address is lowercase hex (0-9, a-f)")]
    NotHex,
}

impl FromStr for Address {
    type Err = ParseAddressError;

    /// Accepts exactly 64 hex characters. Uppercase is accepted on input (a
    /// user pasting a key should not be refused over case); output is always
    /// lowercase.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(ParseAddressError::WrongLength(s.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseAddressError::NotHex)?;
        Ok(Address(out))
    }
}

/// A secret Ed25519 key and the address it controls.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// Builds an identity from a 32-byte secret seed. The caller supplies the
    /// randomness (this crate does no I/O).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte secret seed, for storing in a key file.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn address(&self) -> Address {
        Address(self.key.verifying_key().to_bytes())
    }

    /// The X25519 secret scalar bytes for this key (SHA-512 of the seed,
    /// first half; X25519 clamps it), for end-to-end sealing.
    pub(crate) fn scalar_bytes(&self) -> [u8; 32] {
        self.key.to_scalar_bytes()
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Identity({})", self.address().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = Identity::from_seed([7; 32]);
        let a = id.address();
        let s = a.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s.parse::<Address>().unwrap(), a);
        assert_eq!(s.to_uppercase().parse::<Address>().unwrap(), a);
        assert_eq!(
            "abc".parse::<Address>(),
            Err(ParseAddressError::WrongLength(3))
        );
        assert_eq!(
            "zz".repeat(32).parse::<Address>(),
            Err(ParseAddressError::NotHex)
        );
    }

    #[test]
    fn sign_verify() {
        let id = Identity::from_seed([1; 32]);
        let sig = id.sign(b"hello");
        assert!(id.address().verify(b"hello", &sig).is_ok());
        assert_eq!(
            id.address().verify(b"hellp", &sig),
            Err(SignatureError::BadSignature)
        );
        let other = Identity::from_seed([2; 32]).address();
        assert_eq!(
            other.verify(b"hello", &sig),
            Err(SignatureError::BadSignature)
        );
    }
}
