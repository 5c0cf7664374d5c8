//! Async Rust client for w2w relays.
//!
//! [`Client::connect`] dials a relay, runs the sigA → sigB → sigC
//! registration (checking the relay key against a pin when one is given) and
//! starts a driver task that owns the socket. The [`Client`] handle sends
//! frames and awaits their receipts; incoming messages and notices arrive on
//! [`Client::recv`]. The driver answers the relay's pings (tokio-websockets
//! does that) and stops when the handle is dropped or closed.
//!
//! [`register`] exposes the handshake on a raw WebSocket for tests and tools
//! that need to send arbitrary frames.
//!
//! End to end: [`Client::send`] seals a2a/a2b/a2g payloads for their
//! recipients and signs a2n broadcasts (`w2w_proto::seal`); received
//! payloads are opened or verified before the application sees them, and a
//! forged one arrives as [`Event::Rejected`], never as data. Redelivered
//! messages (same id) are dropped with bounded memory.
//!
//! A lost connection is re-established with exponential backoff and jitter
//! (same relay, pinned key, fresh handshake); messages still without a
//! receipt are sent again with their original ids. A connection replaced by
//! a newer one of ours, or a refused registration, is not retried.

mod driver;
mod error;
mod handle;
mod handshake;
mod homes;
mod transport;

pub use driver::DEDUPE_WINDOW;
pub use error::ClientError;
pub use handle::{Client, Event, Received, Security};
pub use handshake::{register, register_as, register_session};
pub use homes::Homes;
pub use transport::{connect_raw, unix_ms, ConnectOptions, RelaySocket};
pub use w2w_proto;
