// End-to-end payloads (PROTOCOL.md 15, the format of
// crates/w2w-proto/src/seal.rs): sealing for recipients and signing.

import { ed25519, x25519 } from '@noble/curves/ed25519.js';
import { xchacha20poly1305 } from '@noble/ciphers/chacha.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { ascii, concat, equalBytes, bin, toBytes } from './bytes.js';
import { verifyStrict } from './identity.js';

/** MSG flags (end to end; opaque to relays). */
export const FLAGS = Object.freeze({ plain: 0, sealed: 1, signed: 2 });
export const SEAL_SALT = ascii('w2w/v1 seal');
export const SEALED_AAD_DOMAIN = ascii('w2w/v1 sealed');
export const SIGNED_DOMAIN = ascii('w2w/v1 signed\0');
const SEALED_KIND = 1;
const SLOT_LEN = 8 + 24 + 32 + 16;
export const MAX_RECIPIENTS = 255;


/** Why a sealed or signed payload was refused. */
export class W2WSealError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'W2WSealError';
    this.code = code;
  }
}

/** Padded length for a plaintext of n bytes (ISO 7816-4 marker included). */
export function paddedLen(n) {
  const need = n + 1;
  if (need <= 16 * 1024) {
    let p = 64;
    while (p < need) p *= 2;
    return p;
  }
  return Math.ceil(need / (16 * 1024)) * 16 * 1024;
}

function pad(p) {
  const out = new Uint8Array(paddedLen(p.length));
  out.set(p);
  out[p.length] = 0x80;
  return out;
}

function unpad(v) {
  let end = v.length - 1;
  while (end >= 0 && v[end] === 0) end--;
  if (end < 0 || v[end] !== 0x80) throw new W2WSealError('malformed', 'bad padding');
  return v.slice(0, end);
}

/** The wrapping key of `me` and `other` for the direction from → to. */
function pairKey(me, other, from, to) {
  let xpub;
  try {
    xpub = ed25519.utils.toMontgomery(other);
  } catch {
    return null;
  }
  let ss;
  try {
    ss = x25519.getSharedSecret(me._x25519Secret(), xpub); // throws on a low-order point
  } catch {
    return null;
  }
  if (ss.every((b) => b === 0)) return null;
  return hkdf(sha256, ss, SEAL_SALT, concat(from, to), 32);
}

/**
 * Seals `plaintext` from `sender` to `recipients` (addresses) for message
 * `id` (16 bytes): sealed = 0x01 || nonce(24) || n || n × slot(80) || body.
 * `fill(buf)` supplies random bytes (for test vectors); default: crypto.
 */
export function seal(sender, id, recipients, plaintext, fill = null) {
  const rnd = (n) => {
    const b = new Uint8Array(n);
    if (fill) fill(b);
    else globalThis.crypto.getRandomValues(b);
    return b;
  };
  id = bin(id, 16, 'id');
  if (recipients.length === 0 || recipients.length > MAX_RECIPIENTS) {
    throw new W2WSealError('too_many_recipients', `1 to ${MAX_RECIPIENTS} recipients`);
  }
  const from = sender.publicKey;
  const ck = rnd(32);
  const nonce = rnd(24);
  const parts = [Uint8Array.of(SEALED_KIND), nonce, Uint8Array.of(recipients.length)];
  for (const r of recipients) {
    const to = bin(r, 32, 'recipient');
    const k = pairKey(sender, to, from, to);
    if (!k) throw new W2WSealError('bad_recipient', 'a recipient address is not a valid Ed25519 key');
    const n = rnd(24);
    const wrapped = xchacha20poly1305(k, n, concat(id, from, to)).encrypt(ck);
    parts.push(to.subarray(0, 8), n, wrapped);
  }
  const body = xchacha20poly1305(ck, nonce, concat(SEALED_AAD_DOMAIN, id, from)).encrypt(pad(toBytes(plaintext)));
  parts.push(body);
  return concat(...parts);
}

/** Opens a sealed payload addressed to `me`, sent by `from` as message `id`. */
export function open(me, id, from, sealed) {
  id = bin(id, 16, 'id');
  from = bin(from, 32, 'from');
  sealed = toBytes(sealed);
  if (sealed.length < 26 || sealed[0] !== SEALED_KIND) throw new W2WSealError('malformed', 'not a sealed payload');
  const nonce = sealed.subarray(1, 25);
  const n = sealed[25];
  const slotsEnd = 26 + n * SLOT_LEN;
  if (sealed.length < slotsEnd + 16) throw new W2WSealError('malformed', 'sealed payload truncated');
  const to = me.publicKey;
  const k = pairKey(me, from, from, to);
  if (!k) throw new W2WSealError('bad_sender', 'the sender address is not a valid Ed25519 key');
  let found = false;
  let ck = null;
  for (let o = 26; o < slotsEnd; o += SLOT_LEN) {
    if (!equalBytes(sealed.subarray(o, o + 8), to.subarray(0, 8))) continue;
    found = true;
    try {
      ck = xchacha20poly1305(k, sealed.subarray(o + 8, o + 32), concat(id, from, to)).decrypt(
        sealed.subarray(o + 32, o + SLOT_LEN),
      );
      break;
    } catch {
      // another slot may carry the same 8-byte prefix
    }
  }
  if (!ck) {
    if (found) throw new W2WSealError('forged', 'authentication failed: forged, altered, or not from the claimed sender');
    throw new W2WSealError('not_for_us', 'this payload is not addressed to us');
  }
  let padded;
  try {
    padded = xchacha20poly1305(ck, nonce, concat(SEALED_AAD_DOMAIN, id, from)).decrypt(sealed.subarray(slotsEnd));
  } catch {
    throw new W2WSealError('forged', 'authentication failed: forged, altered, or not from the claimed sender');
  }
  return unpad(padded);
}

/** The bytes a signed payload's signature covers. */
export function signedMessage(id, from, body) {
  return concat(SIGNED_DOMAIN, bin(id, 16, 'id'), bin(from, 32, 'from'), toBytes(body));
}

/** sig(64) || body, signed by `sender` for message `id` (a2n broadcasts). */
export function sign(sender, id, body) {
  body = toBytes(body);
  return concat(sender.sign(signedMessage(id, sender.publicKey, body)), body);
}

/** Verifies a signed payload from `from`; returns the body. */
export function verifySigned(id, from, payload) {
  payload = toBytes(payload);
  if (payload.length < 64) throw new W2WSealError('malformed', 'signed payload shorter than a signature');
  const body = payload.subarray(64);
  if (!verifyStrict(payload.subarray(0, 64), signedMessage(id, from, body), bin(from, 32, 'from'))) {
    throw new W2WSealError('forged', 'the signature does not verify: forged or altered');
  }
  return body;
}
