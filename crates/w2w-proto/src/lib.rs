//! The w2w wire protocol as pure code: no sockets, no tokio, no clock.
//!
//! * [`identity`] — Ed25519 identities; an address is a public key.
//! * [`frame`] — the binary frame codec (`ClientToRelay`, `RelayToClient`).
//! * [`handshake`] — the sigA → sigB → sigC registration state machines.
//! * [`s2s`] — relay-to-relay frames: link state, presence, forwarding.
//! * [`seal`] — end-to-end sealing (a2b/a2g) and signing (a2n) of payloads.
//! * [`codes`] — every machine-readable error, receipt and close code.
//!
//! Time enters only as `now_ms` arguments and randomness only as byte
//! arrays handed in by the caller, so every function here is deterministic and
//! every test here runs without I/O. `docs/PROTOCOL.md` is the prose version
//! of this crate; `testdata/vectors.json` pins its bytes.

pub mod codes;
pub mod frame;
pub mod group;
pub mod handshake;
pub mod identity;
pub mod s2s;
pub mod seal;
pub mod spacerift;

pub use codes::ErrorCode;
pub use frame::{ClientToRelay, DecodeError, Dest, Msg, RelayToClient, Route};
pub use identity::{Address, Identity};

/// The protocol version carried in the first byte of every frame and signed
/// into every registration transcript.
pub const PROTOCOL_VERSION: u8 = 1;

/// The default largest WebSocket message a relay accepts (its info
/// document's `limits.max_frame_bytes`); clients check frames against it
/// before sending.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;
