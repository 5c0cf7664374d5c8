// w2w client for browsers and Node: the wire protocol of docs/PROTOCOL.md
// (frame codec, sigA → sigB → sigC registration), end-to-end sealing and
// signing (the format of crates/w2w-proto/src/seal.rs), W2WSocket, a
// WebSocket-like facade with receipts, dedupe and reconnect, W2WHomes (one
// identity at several relays, each message once), and Spacerifts (WebRTC
// peer linking through a relay).
//
// This file is the public API; the code lives in one module per part:
//
//   bytes.js       hex and byte helpers
//   frames.js      constants, error codes, the frame codec
//   identity.js    Identity (Ed25519 key pair = address), verifyStrict
//   handshake.js   the registration transcript and ClientHandshake
//   sealing.js     sealed and signed end-to-end payloads
//   socket.js      W2WSocket, the relay's info document
//   homes.js       W2WHomes: one W2WSocket per relay, each message once
//   spacerifts.js  Spacerifts requests and linkPeer
//
// Crypto comes only from the audited @noble packages; nothing here is a
// hand-written primitive.
//
//   import { W2WSocket, Identity } from '/w2w.js';
//   const me = Identity.loadOrCreate('w2w.identity');
//   const s = new W2WSocket('wss://relay.example/', me);
//   s.onopen = () => s.send(friendAddress, 'hello');   // sealed a2b
//   s.onmessage = (e) => console.log(e.from, e.text, e.verified);
//
// Node 20 has no global WebSocket: pass one in ({ WebSocket } from the `ws`
// package) or have `ws` installed, which is then imported on first use.

import { W2WSocket } from './socket.js';

export { toHex, fromHex, concat, isAddress } from './bytes.js';
export {
  PROTOCOL_VERSION, FRAME, ROUTES, MAX_GROUP_NAME, SCOPES, ROLES, STATUSES, OPS, NOTICE_KINDS,
  ERROR_CODES, errorName, MAX_URL_LEN, MAX_DETAIL_LEN, MSG_FIXED_HEADER, DEFAULT_MAX_FRAME_BYTES,
  MAX_ACK_IDS, W2WDecodeError, decodeFrame, encodeFrame,
} from './frames.js';
export { verifyStrict, Identity } from './identity.js';
export {
  SIG_A_DOMAIN, SIG_B_DOMAIN, SIG_C_DOMAIN, sigAMessage, sigBMessage, sigCMessage, W2WHandshakeError,
  ClientHandshake,
} from './handshake.js';
export {
  FLAGS, SEAL_SALT, SEALED_AAD_DOMAIN, SIGNED_DOMAIN, MAX_RECIPIENTS, W2WSealError, paddedLen, seal, open,
  signedMessage, sign, verifySigned,
} from './sealing.js';
export { infoUrl, fetchInfo, W2WSocket, W2WError } from './socket.js';
export { W2WHomes } from './homes.js';
export {
  SPACERIFT_DOMAIN, SPACERIFT_TYPES, MAX_SPACERIFT_NAMESPACE, MAX_SPACERIFT_SIGNAL, SPACERIFT_STATUS,
  spaceriftMessage, signSpaceriftRequest, verifySpaceriftRequest, spaceriftUrl, spaceriftRequest,
  reportRtt, linkPeer,
} from './spacerifts.js';

export default W2WSocket;
