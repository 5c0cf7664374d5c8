//! Registration (sigA → sigB → sigC) on an open WebSocket.

use crate::error::ClientError;
use crate::transport::unix_ms;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_websockets::{Message, WebSocketStream};
use w2w_proto::frame::{ClientToRelay, ErrorFrame, RelayToClient, Role};
use w2w_proto::handshake::{ClientHandshake, ClientRegistered};
use w2w_proto::{Address, ErrorCode, Identity};

/// Reads the next binary frame, turning ERROR frames and close codes into
/// [`ClientError::Refused`].
pub(crate) async fn next_frame<S>(ws: &mut WebSocketStream<S>) -> Result<RelayToClient, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = match ws.next().await {
            None => return Err(ClientError::Closed { reason: None }),
            Some(m) => m?,
        };
        if let Some((code, reason)) = m.as_close() {
            return Err(match ErrorCode::from_close_code(code.into()) {
                Some(code) => ClientError::Refused {
                    code,
                    detail: reason.to_owned(),
                },
                None => ClientError::Closed {
                    reason: Some(format!("{} {}", u16::from(code), reason)),
                },
            });
        }
        if !m.is_binary() {
            continue;
        }
        let bytes: Bytes = m.into_payload().into();
        let frame =
            RelayToClient::decode(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let RelayToClient::Error(ErrorFrame { code, detail }) = &frame {
            if let Some(code) = ErrorCode::from_u16(*code) {
                return Err(ClientError::Refused {
                    code,
                    detail: detail.clone(),
                });
            }
        }
        return Ok(frame);
    }
}

/// Runs registration on an open WebSocket. On success the socket is
/// registered and REPLY_BACK has been consumed.
pub async fn register<S>(
    ws: &mut WebSocketStream<S>,
    identity: &Identity,
    url: &str,
    pinned: Option<Address>,
) -> Result<ClientRegistered, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    register_as(ws, identity, url, pinned, Role::Client).await
}

/// Registers with the role `opts` asks for and, for an exclusive session,
/// asks the relay to close the address's other sessions (REQUEST op 6,
/// `req_id` 0: its answer is not waited for; requests are answered in
/// order, so everything sent after it comes after it).
pub async fn register_session<S>(
    ws: &mut WebSocketStream<S>,
    identity: &Identity,
    opts: &crate::ConnectOptions,
    pinned: Option<Address>,
) -> Result<ClientRegistered, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let registered = register_as(ws, identity, &opts.url, pinned, opts.role()).await?;
    if opts.exclusive {
        let req = ClientToRelay::Request(w2w_proto::frame::Request {
            req_id: 0,
            op: w2w_proto::frame::RequestOp::Exclusive,
        });
        ws.send(Message::binary(req.encode()))
            .await
            .map_err(|e| ClientError::Protocol(format!("sending REQUEST exclusive: {e}")))?;
    }
    Ok(registered)
}

/// [`register`] with an explicit role; relays peer with `Role::Relay`.
pub async fn register_as<S>(
    ws: &mut WebSocketStream<S>,
    identity: &Identity,
    url: &str,
    pinned: Option<Address>,
    role: Role,
) -> Result<ClientRegistered, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut hs = ClientHandshake::new(identity.clone(), role, url, rand::random(), pinned);
    let unexpected = |f: &RelayToClient| {
        ClientError::Protocol(format!("unexpected frame during registration: {f:?}"))
    };
    let ch = match next_frame(ws).await? {
        RelayToClient::Challenge(c) => c,
        f => return Err(unexpected(&f)),
    };
    let reg = hs.on_challenge(ch, unix_ms())?;
    ws.send(Message::binary(ClientToRelay::Register(reg).encode()))
        .await?;
    let cs = match next_frame(ws).await? {
        RelayToClient::Countersign(c) => c,
        f => return Err(unexpected(&f)),
    };
    let confirm = hs.on_countersign(cs)?;
    ws.send(Message::binary(ClientToRelay::Confirm(confirm).encode()))
        .await?;
    let rb = match next_frame(ws).await? {
        RelayToClient::ReplyBack(r) => r,
        f => return Err(unexpected(&f)),
    };
    Ok(hs.on_reply_back(rb)?)
}
