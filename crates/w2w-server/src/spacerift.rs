//! Spacerifts (PROTOCOL §16), the relay's HTTP side. The wire (bodies,
//! signatures, replies) is [`w2w_proto::spacerift`], the state machine
//! [`w2w_core::spacerift::Rifts`]; this module binds the core's waiter to a
//! tokio one-shot channel. The handler of `POST /spacerift` is
//! `server.rs`'s `spacerift`: gate, read the body, `parse`, `admit`,
//! `verify` outside the lock, `handle`, and park the offerer's request on
//! its channel (at most [`REQUEST_TIMEOUT`]).

use tokio::sync::oneshot;

pub use w2w_core::spacerift::{
    Admitted, Pass, Waiter, IP_BURST, IP_INTERVAL, LEASE, MAX_IPS, MAX_KEYS, MAX_OFFERS,
    MAX_PARKED_BYTES, MAX_RTTS, MAX_RTT_PEERS, MAX_SEEN, OFFER_OVERHEAD, PAIR_INTERVAL,
    PAIR_MEMORY, REQUEST_INTERVAL, REQUEST_TIMEOUT,
};
pub use w2w_proto::spacerift::{
    parse, signed_bytes, ParseError, Reply, Request, Unverified, DOMAIN, MAX_NAMESPACE, MAX_SIGNAL,
    MAX_SKEW,
};

/// The relay's Spacerifts state; the parked requests wait on tokio channels.
pub type Rifts = w2w_core::spacerift::Rifts<Parked>;

/// A parked offerer's request: the sending end of its one-shot channel
/// (closed once the HTTP request went away).
#[derive(Debug)]
pub struct Parked(oneshot::Sender<Reply>);

impl Waiter for Parked {
    type Rx = oneshot::Receiver<Reply>;

    fn channel() -> (Self, Self::Rx) {
        let (tx, rx) = oneshot::channel();
        (Parked(tx), rx)
    }

    fn send(self, reply: Reply) -> Result<(), Reply> {
        self.0.send(reply)
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_request_gets_its_answer_or_is_seen_gone() {
        let (tx, mut rx) = Parked::channel();
        assert!(!tx.is_closed());
        assert!(tx.send(Reply::Delivered).is_ok());
        assert!(matches!(rx.try_recv(), Ok(Reply::Delivered)));
        let (tx, rx) = Parked::channel();
        drop(rx);
        assert!(tx.is_closed());
        assert!(matches!(tx.send(Reply::Noted), Err(Reply::Noted)));
        // The waiter is one pointer, as `OFFER_OVERHEAD` assumes.
        assert_eq!(std::mem::size_of::<Parked>(), std::mem::size_of::<usize>());
    }
}
