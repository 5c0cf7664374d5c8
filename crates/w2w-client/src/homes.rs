//! One identity at several relays at once (redundancy, PROTOCOL 7.7).
//!
//! A relay federation sends a message for an address to every relay where
//! the address is online, so a client registered at two relays keeps
//! receiving while either is up. [`Homes`] holds one [`Client`] per relay
//! and hands the application each message once: repeats (the same id and
//! sender through another relay) are dropped, over a window of the last
//! [`DEDUPE_WINDOW`] messages. Each connection acknowledges what it
//! received itself, so every relay deletes its stored copy.

use futures_util::future::select_all;
use w2w_proto::frame::Receipt;
use w2w_proto::{Address, Dest, Identity};

use crate::driver::{Dedupe, DEDUPE_WINDOW};
use crate::{Client, ClientError, ConnectOptions, Event};

/// Receiving sessions of one identity at several relays.
pub struct Homes {
    /// Connections still open, each with its relay's URL.
    clients: Vec<(String, Client)>,
    dedupe: Dedupe,
    /// Why each connection that ended did (relay URL, reason).
    ended: Vec<(String, String)>,
}

impl Homes {
    /// Connects to every relay of `opts` (each a receiving session). Fails
    /// only if none can be reached; the errors of those that could not are
    /// in [`Homes::ended`].
    pub async fn connect(
        identity: Identity,
        opts: Vec<ConnectOptions>,
    ) -> Result<Homes, ClientError> {
        let mut clients = Vec::new();
        let mut ended = Vec::new();
        let mut last = None;
        for o in opts {
            let url = o.url.clone();
            match Client::connect(identity.clone(), o).await {
                Ok(c) => clients.push((url, c)),
                Err(e) => {
                    ended.push((url, e.to_string()));
                    last = Some(e);
                }
            }
        }
        match (clients.is_empty(), last) {
            (true, Some(e)) => Err(e),
            _ => Ok(Homes {
                clients,
                dedupe: Dedupe::new(DEDUPE_WINDOW),
                ended,
            }),
        }
    }

    /// Sessions connected already (e.g. each after the caller's own key
    /// pinning), each with its relay's URL.
    pub fn from_clients(clients: Vec<(String, Client)>) -> Homes {
        Homes {
            clients,
            dedupe: Dedupe::new(DEDUPE_WINDOW),
            ended: Vec::new(),
        }
    }

    /// Asks every relay for something (e.g. presence notices); the first
    /// error, if any.
    pub async fn request_all(&self, op: w2w_proto::frame::RequestOp) -> Result<(), ClientError> {
        for (_, c) in &self.clients {
            c.request(op.clone()).await?;
        }
        Ok(())
    }

    /// The identity's address.
    pub fn address(&self) -> Option<Address> {
        self.clients.first().map(|(_, c)| c.address())
    }

    /// The open connections, with their relays' URLs.
    pub fn clients(&self) -> impl Iterator<Item = (&str, &Client)> {
        self.clients.iter().map(|(u, c)| (u.as_str(), c))
    }

    /// Connections that could not be made or have ended: (URL, why).
    pub fn ended(&self) -> &[(String, String)] {
        &self.ended
    }

    /// The next event from any relay, each message once. `None` when every
    /// connection has ended.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if self.clients.is_empty() {
                return None;
            }
            let (ev, i, _) =
                select_all(self.clients.iter_mut().map(|(_, c)| Box::pin(c.recv()))).await;
            match ev {
                None => {
                    let (url, c) = self.clients.remove(i);
                    let why = c.close_reason().unwrap_or_else(|| "closed".into());
                    self.ended.push((url, why));
                }
                Some(Event::Msg(m)) if !self.dedupe.first((m.id, m.from)) => {}
                Some(ev) => return Some(ev),
            }
        }
    }

    /// Sends through the first open connection (which, like any
    /// [`Client`], resends after a reconnect: PROTOCOL 7.6).
    pub async fn send(&self, dest: Dest, body: impl AsRef<[u8]>) -> Result<Receipt, ClientError> {
        match self.clients.first() {
            Some((_, c)) => c.send(dest, body).await,
            None => Err(ClientError::Closed {
                reason: Some("no relay connection is open".into()),
            }),
        }
    }

    /// Closes every connection.
    pub async fn close(self) {
        for (_, c) in self.clients {
            c.close().await;
        }
    }
}
