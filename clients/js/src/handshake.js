// The client side of registration, sigA → sigB → sigC (PROTOCOL.md 6).

import { sha256 } from '@noble/hashes/sha2.js';
import { ascii, toHex, fromHex, concat, bin, normAddress, randomBytes } from './bytes.js';
import { PROTOCOL_VERSION, ROLES, MAX_URL_LEN, Writer, indexOf } from './frames.js';
import { verifyStrict } from './identity.js';

export const SIG_A_DOMAIN = ascii('w2w/v1 register sigA\0');
export const SIG_B_DOMAIN = ascii('w2w/v1 register sigB\0');
export const SIG_C_DOMAIN = ascii('w2w/v1 register sigC\0');

/** The sigA message (PROTOCOL.md 6.2), `161 + L` bytes. */
export function sigAMessage({ role = 'client', relay_key, relay_nonce, client_key, client_nonce, timestamp_ms, url }) {
  const w = new Writer();
  w.bytes(SIG_A_DOMAIN);
  w.u8(PROTOCOL_VERSION);
  w.u8(indexOf(ROLES, role, 'role'));
  w.bytes(bin(relay_key, 32, 'relay_key'));
  w.bytes(bin(relay_nonce, 32, 'relay_nonce'));
  w.bytes(bin(client_key, 32, 'client_key'));
  w.bytes(bin(client_nonce, 32, 'client_nonce'));
  w.u64(timestamp_ms);
  w.string(url, MAX_URL_LEN);
  return w.done();
}
/** SIG_B_DOMAIN || th || sigA */
export function sigBMessage(th, sigA) {
  return concat(SIG_B_DOMAIN, bin(th, 32, 'th'), bin(sigA, 64, 'sig_a'));
}
/** SIG_C_DOMAIN || th || sigB */
export function sigCMessage(th, sigB) {
  return concat(SIG_C_DOMAIN, bin(th, 32, 'th'), bin(sigB, 64, 'sig_b'));
}

/** A client-side refusal during registration (PROTOCOL.md 6.6). */
export class W2WHandshakeError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'W2WHandshakeError';
    this.code = code;
  }
}

/**
 * The client side of sigA → sigB → sigC as a small state machine with no
 * I/O: feed it CHALLENGE, COUNTERSIGN and REPLY_BACK frames, send what it
 * returns. `clientNonce` and `now` are for tests; by default a fresh random
 * nonce and Date.now().
 */
export class ClientHandshake {
  constructor(identity, url, { role = 'client', pinnedRelayKey = null, clientNonce = null } = {}) {
    this.identity = identity;
    this.url = url;
    this.role = role;
    this.pinned = pinnedRelayKey ? normAddress(pinnedRelayKey, 'pinnedRelayKey') : null;
    this.clientNonce = clientNonce ? bin(clientNonce, 32, 'clientNonce') : randomBytes(32);
    this.state = 'challenge';
  }
  onChallenge(ch, now = Date.now()) {
    if (this.state !== 'challenge') throw new W2WHandshakeError('unexpected_frame', 'CHALLENGE out of order');
    if (this.pinned && ch.relay_key !== this.pinned) {
      const e = new W2WHandshakeError(
        'relay_key_changed',
        `the relay presents key ${ch.relay_key}, but ${this.pinned} is pinned for it`,
      );
      e.relayKey = ch.relay_key; // what it presented
      e.pinnedRelayKey = this.pinned;
      throw e;
    }
    this.relayKey = ch.relay_key;
    const fields = {
      role: this.role,
      relay_key: ch.relay_key,
      relay_nonce: ch.relay_nonce,
      client_key: this.identity.address,
      client_nonce: this.clientNonce,
      timestamp_ms: now,
      url: this.url,
    };
    const m = sigAMessage(fields);
    this.th = sha256(m);
    this.sigA = this.identity.sign(m);
    this.state = 'countersign';
    return {
      type: 'REGISTER',
      role: this.role,
      relay_key: ch.relay_key,
      client_key: this.identity.address,
      client_nonce: toHex(this.clientNonce),
      timestamp_ms: now,
      url: this.url,
      sig_a: toHex(this.sigA),
    };
  }
  onCountersign(cs) {
    if (this.state !== 'countersign') throw new W2WHandshakeError('unexpected_frame', 'COUNTERSIGN out of order');
    const sigB = fromHex(cs.sig_b);
    if (!verifyStrict(sigB, sigBMessage(this.th, this.sigA), fromHex(this.relayKey))) {
      throw new W2WHandshakeError('bad_countersign', 'sigB does not verify under the relay key');
    }
    this.sigB = sigB;
    this.sigC = this.identity.sign(sigCMessage(this.th, sigB));
    this.state = 'reply_back';
    return { type: 'CONFIRM', sig_c: toHex(this.sigC) };
  }
  onReplyBack(rb) {
    if (this.state !== 'reply_back') throw new W2WHandshakeError('unexpected_frame', 'REPLY_BACK out of order');
    if (rb.address !== this.identity.address) {
      throw new W2WHandshakeError('wrong_address', `REPLY_BACK names ${rb.address}, not this client`);
    }
    this.state = 'done';
    return { relayKey: this.relayKey, relayUrl: rb.relay_url, relayTimeMs: rb.relay_time_ms };
  }
}
