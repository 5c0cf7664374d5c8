// w2w client for browsers and Node: the wire protocol of docs/PROTOCOL.md
// (frame codec, sigA → sigB → sigC registration), end-to-end sealing and
// signing (the format of crates/w2w-proto/src/seal.rs), and W2WSocket, a
// WebSocket-like facade with receipts, dedupe and reconnect.
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

import { ed25519, x25519 } from '@noble/curves/ed25519.js';
import { xchacha20poly1305 } from '@noble/ciphers/chacha.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { hkdf } from '@noble/hashes/hkdf.js';

// ------------------------------------------------------------------ constants

export const PROTOCOL_VERSION = 1;

/** Frame type bytes (PROTOCOL.md 4.2). */
export const FRAME = Object.freeze({
  CHALLENGE: 0x01,
  REGISTER: 0x02,
  COUNTERSIGN: 0x03,
  CONFIRM: 0x04,
  REPLY_BACK: 0x05,
  ACK: 0x06,
  MSG: 0x10,
  RECEIPT: 0x11,
  REQUEST: 0x20,
  RESPONSE: 0x21,
  NOTICE: 0x30,
  ERROR: 0x3f,
});
const FRAME_NAME = Object.fromEntries(Object.entries(FRAME).map(([k, v]) => [v, k]));
const C2R_TYPES = new Set([FRAME.REGISTER, FRAME.CONFIRM, FRAME.ACK, FRAME.MSG, FRAME.REQUEST]);
const R2C_TYPES = new Set([
  FRAME.CHALLENGE, FRAME.COUNTERSIGN, FRAME.REPLY_BACK, FRAME.MSG, FRAME.RECEIPT,
  FRAME.RESPONSE, FRAME.NOTICE, FRAME.ERROR,
]);
/** s2s frame types (relay ↔ relay only): LINK_STATE … REDIRECT. */
const S2S_TYPES = new Set([0x40, 0x41, 0x42, 0x43, 0x44]);

export const ROUTES = Object.freeze(['', 'a2a', 'a2b', 'a2g', 'a2n', 'group']);
/** Longest named-group name; names are 1–64 bytes of a-z 0-9 . _ - */
export const MAX_GROUP_NAME = 64;
const GROUP_NAME = /^[a-z0-9._-]{1,64}$/;
export const SCOPES = Object.freeze(['relay', 'federation']);
export const ROLES = Object.freeze(['client', 'relay']);
export const STATUSES = Object.freeze(['delivered', 'queued', 'no_route', 'rejected', 'partial']);
export const OPS = Object.freeze(['', 'online', 'lookup', 'presence']);
export const NOTICE_KINDS = Object.freeze(['', 'join', 'leave', 'replaced', 'shutting_down']);

/** Error codes (PROTOCOL.md 10.1): number → name. Close code = 4000 + number. */
export const ERROR_CODES = Object.freeze({
  1: 'malformed', 2: 'unknown_frame_type', 3: 'unsupported_version', 4: 'not_registered',
  5: 'unexpected_frame', 6: 'unknown_route', 7: 'unknown_op', 8: 'text_frame',
  10: 'auth_timeout', 11: 'stale_timestamp', 12: 'wrong_relay', 13: 'replay',
  14: 'bad_signature', 15: 'wrong_url', 16: 'wrong_role', 20: 'rate_limited',
  21: 'frame_too_large', 22: 'slow_consumer', 23: 'max_connections', 24: 'list_too_long',
  25: 'spoofed_sender', 26: 'replaced', 27: 'shutting_down', 28: 'empty_list',
  29: 'ping_timeout', 30: 'no_route', 31: 'internal', 32: 'unauthorized_peer',
  33: 'unreachable', 34: 'peer_limit', 35: 'hop_limit', 36: 'loop', 37: 'forged_presence',
  38: 'duplicate_peer', 39: 'timeout', 40: 'duplicate', 41: 'queue_full',
  42: 'unknown_group', 43: 'not_member', 44: 'not_allowed', 45: 'group_exists',
  46: 'stale_seq', 47: 'store_busy', 48: 'storage_full', 49: 'limit_reached', 50: 'forged_forward',
});
const ERROR_NUMBER = Object.fromEntries(Object.entries(ERROR_CODES).map(([n, s]) => [s, Number(n)]));

/** Name of an error code; unknown codes are reported as their number. */
export function errorName(code) {
  if (code === 0 || code == null) return null;
  return ERROR_CODES[code] ?? code;
}
function errorNumber(name) {
  if (name == null) return 0;
  if (typeof name === 'number') return name;
  const n = ERROR_NUMBER[name];
  if (n === undefined) throw new TypeError(`unknown error code name ${name}`);
  return n;
}

export const MAX_URL_LEN = 1024;
export const MAX_DETAIL_LEN = 1024;
export const MSG_FIXED_HEADER = 52;
/**
 * The protocol's default largest WebSocket message (PROTOCOL.md 11): 1 MiB.
 * A relay publishes its own value as limits.max_frame_bytes in its info
 * document (GET /.well-known/w2w).
 */
export const DEFAULT_MAX_FRAME_BYTES = 1 << 20;
/** Most message ids in one ACK frame. */
export const MAX_ACK_IDS = 1024;

const enc = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
const ascii = (s) => enc.encode(s);

export const SIG_A_DOMAIN = ascii('w2w/v1 register sigA\0');
export const SIG_B_DOMAIN = ascii('w2w/v1 register sigB\0');
export const SIG_C_DOMAIN = ascii('w2w/v1 register sigC\0');

/** MSG flags (end to end; opaque to relays). */
export const FLAGS = Object.freeze({ plain: 0, sealed: 1, signed: 2 });
export const SEAL_SALT = ascii('w2w/v1 seal');
export const SEALED_AAD_DOMAIN = ascii('w2w/v1 sealed');
export const SIGNED_DOMAIN = ascii('w2w/v1 signed\0');
const SEALED_KIND = 1;
const SLOT_LEN = 8 + 24 + 32 + 16;
export const MAX_RECIPIENTS = 255;

// ------------------------------------------------------------------ bytes

/** Lowercase hex of bytes. */
export function toHex(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i++) s += (bytes[i] < 16 ? '0' : '') + bytes[i].toString(16);
  return s;
}

/** Bytes from hex (either case); throws on odd length or a non-hex digit. */
export function fromHex(hex) {
  if (typeof hex !== 'string' || hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new TypeError('expected an even-length hex string');
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}

export function concat(...parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

/** Bytes of a hex string or byte array, checked to be `len` long. */
function bin(x, len, field) {
  const b = typeof x === 'string' ? fromHex(x) : x instanceof Uint8Array ? x : null;
  if (!b || (len !== undefined && b.length !== len)) {
    throw new TypeError(`${field} must be ${len} bytes (hex or Uint8Array)`);
  }
  return b;
}

/** Is `s` an address: 64 hex characters? */
export function isAddress(s) {
  return typeof s === 'string' && /^[0-9a-fA-F]{64}$/.test(s.trim());
}

function normAddress(s, field = 'address') {
  if (s instanceof Uint8Array && s.length === 32) return toHex(s);
  if (!isAddress(s)) throw new TypeError(`${field} must be 64 hex characters`);
  return s.trim().toLowerCase();
}

/** Payload bytes from a string (UTF-8), ArrayBuffer, typed array or DataView. */
function toBytes(data) {
  if (typeof data === 'string') return enc.encode(data);
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError('data must be a string, ArrayBuffer or typed array');
}

function randomBytes(n) {
  const b = new Uint8Array(n);
  globalThis.crypto.getRandomValues(b);
  return b;
}

// ------------------------------------------------------------------ frame codec

/** A frame that does not decode; `code` is the error name of PROTOCOL.md 4.4. */
export class W2WDecodeError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'W2WDecodeError';
    this.code = code;
    this.number = ERROR_NUMBER[code];
  }
}

class Reader {
  constructor(buf) {
    this.buf = buf;
    this.pos = 0;
  }
  get remaining() {
    return this.buf.length - this.pos;
  }
  take(n, field) {
    if (this.remaining < n) {
      throw new W2WDecodeError('malformed', `truncated: ${field} needs ${n} bytes, ${this.remaining} left`);
    }
    const s = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
  u8(f) {
    return this.take(1, f)[0];
  }
  u16(f) {
    const b = this.take(2, f);
    return (b[0] << 8) | b[1];
  }
  u32(f) {
    const b = this.take(4, f);
    return ((b[0] << 24) >>> 0) + ((b[1] << 16) | (b[2] << 8) | b[3]);
  }
  u64(f) {
    const b = this.take(8, f);
    const v = new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0);
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  hex(n, f) {
    return toHex(this.take(n, f));
  }
  string(f, max) {
    const len = this.u16(f);
    if (len > max) throw new W2WDecodeError('malformed', `${f} is ${len} bytes, the maximum is ${max}`);
    const b = this.take(len, f);
    try {
      return strictUtf8.decode(b);
    } catch {
      throw new W2WDecodeError('malformed', `${f} is not valid UTF-8`);
    }
  }
  addressList(f) {
    const n = this.u16(f);
    if (this.remaining < n * 32) {
      throw new W2WDecodeError('malformed', `truncated: ${f} claims ${n} addresses, ${this.remaining} bytes left`);
    }
    const out = [];
    for (let i = 0; i < n; i++) out.push(this.hex(32, f));
    return out;
  }
  bool(f) {
    const v = this.u8(f);
    if (v > 1) throw new W2WDecodeError('malformed', `invalid value ${v} for ${f}`);
    return v === 1;
  }
  enumByte(f, names) {
    const v = this.u8(f);
    if (v >= names.length || names[v] === '') throw new W2WDecodeError('malformed', `invalid value ${v} for ${f}`);
    return names[v];
  }
  rest() {
    const s = this.buf.subarray(this.pos);
    this.pos = this.buf.length;
    return s;
  }
  finish() {
    if (this.remaining !== 0) throw new W2WDecodeError('malformed', `${this.remaining} trailing bytes after the frame`);
  }
}

class Writer {
  constructor() {
    this.parts = [];
  }
  bytes(b) {
    this.parts.push(b);
  }
  u8(v) {
    this.parts.push(Uint8Array.of(v & 0xff));
  }
  u16(v) {
    this.parts.push(Uint8Array.of((v >>> 8) & 0xff, v & 0xff));
  }
  u32(v) {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v);
    this.parts.push(b);
  }
  u64(v) {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v));
    this.parts.push(b);
  }
  string(s, max) {
    let b = enc.encode(s);
    if (b.length > max) {
      // Cut at a character boundary, as the Rust encoder does.
      let cut = max;
      while (cut > 0 && (b[cut] & 0xc0) === 0x80) cut--;
      b = b.subarray(0, cut);
    }
    this.u16(b.length);
    this.parts.push(b);
  }
  done() {
    return concat(...this.parts);
  }
}

function indexOf(names, v, field) {
  const i = typeof v === 'number' ? v : names.indexOf(v);
  if (i < 0 || i >= names.length || names[i] === '') throw new TypeError(`unknown ${field} ${v}`);
  return i;
}

function decodeMsg(r) {
  const route = r.u8('route');
  const flags = r.u8('flags');
  const id = r.hex(16, 'id');
  const from = r.hex(32, 'from');
  const m = { type: 'MSG', route: '', flags, id, from };
  switch (route) {
    case 1:
      m.route = 'a2a';
      break;
    case 2:
      m.route = 'a2b';
      m.to = r.hex(32, 'to');
      break;
    case 3:
      m.route = 'a2g';
      m.group = r.addressList('group');
      break;
    case 4:
      m.route = 'a2n';
      m.scope = r.enumByte('scope', SCOPES);
      break;
    case 5: {
      // A named group hosted by the sender's relay, which checks membership.
      const n = r.u8('group name');
      let name;
      try {
        name = strictUtf8.decode(r.take(n, 'group name'));
      } catch (e) {
        if (e instanceof W2WDecodeError) throw e;
        throw new W2WDecodeError('malformed', 'group name is not valid UTF-8');
      }
      if (!GROUP_NAME.test(name)) throw new W2WDecodeError('malformed', `invalid group name ${JSON.stringify(name)}`);
      m.route = 'group';
      m.group_name = name;
      break;
    }
    default:
      throw new W2WDecodeError('unknown_route', `unknown route ${route}`);
  }
  m.payload = r.rest();
  return m;
}

/**
 * Decodes one frame. `direction` is who sent it: 'r2c' (relay → client,
 * what a client receives; the default) or 'c2r' (client → relay, what a
 * relay receives). Returns a plain object: { type: 'MSG', … } with the field
 * names of testdata/vectors.json; fixed-size binary fields (keys, nonces,
 * ids, signatures) are lowercase hex strings, MSG payloads Uint8Array.
 * Throws W2WDecodeError with the PROTOCOL.md 4.4 code.
 */
export function decodeFrame(bytes, direction = 'r2c') {
  const buf = toBytes(bytes);
  const r = new Reader(buf);
  const version = r.u8('version');
  const t = r.u8('type');
  if (version !== PROTOCOL_VERSION) throw new W2WDecodeError('unsupported_version', `version ${version}`);
  const mine = direction === 'c2r' ? C2R_TYPES : R2C_TYPES;
  const theirs = direction === 'c2r' ? R2C_TYPES : C2R_TYPES;
  if (!mine.has(t)) {
    // A client sending an s2s type is a wrong-direction frame (the relay
    // sees it on a client connection); as the reference decoder does, a
    // client receiving one reports it as unknown.
    if (theirs.has(t) || (direction === 'c2r' && S2S_TYPES.has(t))) {
      throw new W2WDecodeError('unexpected_frame', `frame type 0x${t.toString(16)} is not valid in this direction`);
    }
    throw new W2WDecodeError('unknown_frame_type', `unknown frame type 0x${t.toString(16)}`);
  }
  let f;
  switch (t) {
    case FRAME.CHALLENGE:
      f = { type: 'CHALLENGE', relay_key: r.hex(32, 'relay_key'), relay_nonce: r.hex(32, 'relay_nonce') };
      break;
    case FRAME.REGISTER:
      f = {
        type: 'REGISTER',
        role: r.enumByte('role', ROLES),
        relay_key: r.hex(32, 'relay_key'),
        client_key: r.hex(32, 'client_key'),
        client_nonce: r.hex(32, 'client_nonce'),
        timestamp_ms: r.u64('timestamp_ms'),
        url: r.string('url', MAX_URL_LEN),
        sig_a: r.hex(64, 'sig_a'),
      };
      break;
    case FRAME.COUNTERSIGN:
      f = { type: 'COUNTERSIGN', sig_b: r.hex(64, 'sig_b') };
      break;
    case FRAME.CONFIRM:
      f = { type: 'CONFIRM', sig_c: r.hex(64, 'sig_c') };
      break;
    case FRAME.REPLY_BACK:
      f = {
        type: 'REPLY_BACK',
        address: r.hex(32, 'address'),
        relay_time_ms: r.u64('relay_time_ms'),
        relay_url: r.string('relay_url', MAX_URL_LEN),
      };
      break;
    case FRAME.ACK: {
      const n = r.u16('ack count');
      if (n > MAX_ACK_IDS) throw new W2WDecodeError('malformed', `ACK has ${n} ids, the maximum is ${MAX_ACK_IDS}`);
      if (r.remaining < n * 16) {
        throw new W2WDecodeError('malformed', `truncated: ${n} ack ids need ${n * 16} bytes, ${r.remaining} left`);
      }
      f = { type: 'ACK', ack_ids: [] };
      for (let i = 0; i < n; i++) f.ack_ids.push(r.hex(16, 'ack id'));
      break;
    }
    case FRAME.MSG:
      return decodeMsg(r); // the payload runs to the end: no trailing bytes
    case FRAME.RECEIPT: {
      f = {
        type: 'RECEIPT',
        id: r.hex(16, 'id'),
        status: r.enumByte('status', STATUSES),
        reason: errorName(r.u16('reason')),
        delivered: r.u32('delivered'),
        entries: [],
      };
      const n = r.u16('entries');
      if (r.remaining < n * 35) {
        throw new W2WDecodeError('malformed', `truncated: ${n} entries need ${n * 35} bytes, ${r.remaining} left`);
      }
      for (let i = 0; i < n; i++) {
        f.entries.push({
          to: r.hex(32, 'entry.to'),
          status: r.enumByte('entry.status', STATUSES),
          reason: errorName(r.u16('entry.reason')),
        });
      }
      break;
    }
    case FRAME.REQUEST: {
      const req_id = r.u32('req_id');
      const op = r.u8('op');
      f = { type: 'REQUEST', req_id, op: OPS[op] || op };
      if (op === 1) {
        f.offset = r.u32('offset');
        f.limit = r.u16('limit');
      } else if (op === 2) {
        f.address = r.hex(32, 'address');
      } else if (op === 3) {
        f.on = r.bool('on');
      } else {
        throw new W2WDecodeError('unknown_op', `unknown request op ${op}`);
      }
      break;
    }
    case FRAME.RESPONSE: {
      const req_id = r.u32('req_id');
      const op = r.u8('op');
      const status = r.u16('status');
      f = { type: 'RESPONSE', req_id, op: OPS[op] || op, error: errorName(status) };
      if (status === 0) {
        if (op === 1) {
          f.total = r.u32('total');
          f.addresses = r.addressList('addresses');
        } else if (op === 2) {
          f.found = r.bool('found');
          if (f.found) {
            f.relay_key = r.hex(32, 'relay_key');
            f.relay_url = r.string('relay_url', MAX_URL_LEN);
          }
        } else if (op !== 3) {
          throw new W2WDecodeError('unknown_op', `unknown response op ${op}`);
        }
      }
      break;
    }
    case FRAME.NOTICE: {
      const kind = r.enumByte('kind', NOTICE_KINDS);
      f = { type: 'NOTICE', kind };
      if (kind === 'join' || kind === 'leave') f.address = r.hex(32, 'address');
      break;
    }
    case FRAME.ERROR:
      f = { type: 'ERROR', code: errorName(r.u16('code')), detail: r.string('detail', MAX_DETAIL_LEN) };
      break;
  }
  r.finish();
  return f;
}

/**
 * Encodes a frame object (the shape decodeFrame returns; binary fields may
 * be hex strings or Uint8Arrays) into the bytes of one WebSocket message.
 */
export function encodeFrame(f) {
  const w = new Writer();
  const t = FRAME[f.type];
  if (t === undefined) throw new TypeError(`unknown frame type ${f.type}`);
  w.u8(PROTOCOL_VERSION);
  w.u8(t);
  switch (f.type) {
    case 'CHALLENGE':
      w.bytes(bin(f.relay_key, 32, 'relay_key'));
      w.bytes(bin(f.relay_nonce, 32, 'relay_nonce'));
      break;
    case 'REGISTER':
      w.u8(indexOf(ROLES, f.role ?? 'client', 'role'));
      w.bytes(bin(f.relay_key, 32, 'relay_key'));
      w.bytes(bin(f.client_key, 32, 'client_key'));
      w.bytes(bin(f.client_nonce, 32, 'client_nonce'));
      w.u64(f.timestamp_ms);
      w.string(f.url, MAX_URL_LEN);
      w.bytes(bin(f.sig_a, 64, 'sig_a'));
      break;
    case 'COUNTERSIGN':
      w.bytes(bin(f.sig_b, 64, 'sig_b'));
      break;
    case 'CONFIRM':
      w.bytes(bin(f.sig_c, 64, 'sig_c'));
      break;
    case 'REPLY_BACK':
      w.bytes(bin(f.address, 32, 'address'));
      w.u64(f.relay_time_ms);
      w.string(f.relay_url, MAX_URL_LEN);
      break;
    case 'ACK':
      if (f.ack_ids.length > MAX_ACK_IDS) throw new RangeError(`at most ${MAX_ACK_IDS} ids in one ACK`);
      w.u16(f.ack_ids.length);
      for (const id of f.ack_ids) w.bytes(bin(id, 16, 'ack id'));
      break;
    case 'MSG':
      w.u8(indexOf(ROUTES, f.route, 'route'));
      w.u8(f.flags ?? 0);
      w.bytes(bin(f.id, 16, 'id'));
      w.bytes(bin(f.from, 32, 'from'));
      if (f.route === 'a2b') w.bytes(bin(f.to, 32, 'to'));
      else if (f.route === 'a2g') {
        if (f.group.length > 0xffff) throw new RangeError('a2g list longer than 65535');
        w.u16(f.group.length);
        for (const a of f.group) w.bytes(bin(a, 32, 'group address'));
      } else if (f.route === 'a2n') w.u8(indexOf(SCOPES, f.scope ?? 'federation', 'scope'));
      else if (f.route === 'group') {
        if (!GROUP_NAME.test(f.group_name)) throw new TypeError('a group name is 1-64 bytes of a-z 0-9 . _ -');
        w.u8(f.group_name.length);
        w.bytes(enc.encode(f.group_name));
      }
      w.bytes(f.payload ? toBytes(f.payload) : new Uint8Array(0));
      break;
    case 'RECEIPT':
      w.bytes(bin(f.id, 16, 'id'));
      w.u8(indexOf(STATUSES, f.status, 'status'));
      w.u16(errorNumber(f.reason));
      w.u32(f.delivered ?? 0);
      w.u16(f.entries.length);
      for (const e of f.entries) {
        w.bytes(bin(e.to, 32, 'entry.to'));
        w.u8(indexOf(STATUSES, e.status, 'entry.status'));
        w.u16(errorNumber(e.reason));
      }
      break;
    case 'REQUEST': {
      const op = indexOf(OPS, f.op, 'op');
      w.u32(f.req_id);
      w.u8(op);
      if (op === 1) {
        w.u32(f.offset ?? 0);
        w.u16(f.limit ?? 1000);
      } else if (op === 2) w.bytes(bin(f.address, 32, 'address'));
      else w.u8(f.on ? 1 : 0);
      break;
    }
    case 'RESPONSE': {
      w.u32(f.req_id);
      w.u8(typeof f.op === 'number' ? f.op : indexOf(OPS, f.op, 'op'));
      const status = errorNumber(f.error);
      w.u16(status);
      if (status === 0) {
        if (f.op === 'online') {
          w.u32(f.total);
          w.u16(f.addresses.length);
          for (const a of f.addresses) w.bytes(bin(a, 32, 'address'));
        } else if (f.op === 'lookup') {
          w.u8(f.found ? 1 : 0);
          if (f.found) {
            w.bytes(bin(f.relay_key, 32, 'relay_key'));
            w.string(f.relay_url, MAX_URL_LEN);
          }
        }
      }
      break;
    }
    case 'NOTICE': {
      const kind = indexOf(NOTICE_KINDS, f.kind, 'notice kind');
      w.u8(kind);
      if (kind === 1 || kind === 2) w.bytes(bin(f.address, 32, 'address'));
      break;
    }
    case 'ERROR':
      w.u16(errorNumber(f.code));
      w.string(f.detail ?? '', MAX_DETAIL_LEN);
      break;
  }
  return w.done();
}

// ------------------------------------------------------------------ signatures

/**
 * Strict Ed25519 verification, matching ed25519-dalek's verify_strict:
 * canonical encodings, S < L, and no small-order public key or R.
 */
export function verifyStrict(sig, msg, publicKey) {
  try {
    sig = bin(sig, 64, 'signature');
    publicKey = bin(publicKey, 32, 'public key');
    const R = ed25519.Point.fromBytes(sig.subarray(0, 32), false);
    if (R.isSmallOrder()) return false;
    return ed25519.verify(sig, msg, publicKey, { zip215: false });
  } catch {
    return false;
  }
}

// ------------------------------------------------------------------ identity

/**
 * An Ed25519 key pair. The secret is the 32-byte RFC 8032 seed; the address
 * is the public key as 64 lowercase hex characters.
 */
export class Identity {
  #seed;
  #xsecret;
  constructor(seed) {
    this.#seed = Uint8Array.from(bin(seed, 32, 'seed'));
    /** The public key (32 bytes). */
    this.publicKey = ed25519.getPublicKey(this.#seed);
    /** The address: the public key in lowercase hex. */
    this.address = toHex(this.publicKey);
    Object.freeze(this);
  }
  static generate() {
    return new Identity(randomBytes(32));
  }
  static fromSeed(seed) {
    return new Identity(seed);
  }
  static fromSeedHex(hex) {
    return new Identity(fromHex(String(hex).trim()));
  }
  /**
   * The identity kept in browser storage under `storageKey`, created on first
   * use (and then kept across reloads).
   *
   * Storage choice: localStorage. It is the simplest persistent store that
   * every browser has, synchronous, per origin, and survives reloads and
   * restarts; the seed is exactly what any Ed25519 library needs, so it is
   * stored as 64 hex characters. The cost: any script running on this origin
   * can read it, so an XSS bug on the page would leak the key. (A
   * non-extractable WebCrypto key in IndexedDB would resist that, but
   * WebCrypto Ed25519 is not available in every browser yet and still could
   * not do the X25519 conversion sealing needs.) Serve the page with a strict
   * Content-Security-Policy and no third-party scripts.
   */
  static loadOrCreate(storageKey = 'w2w.identity', storage = globalThis.localStorage) {
    if (!storage) throw new Error('no localStorage here: pass a storage object');
    const saved = storage.getItem(storageKey);
    if (saved && /^[0-9a-fA-F]{64}$/.test(saved.trim())) return Identity.fromSeedHex(saved);
    const id = Identity.generate();
    storage.setItem(storageKey, id.seedHex());
    return id;
  }
  /** The secret seed (a copy). Keep it secret. */
  seed() {
    return Uint8Array.from(this.#seed);
  }
  seedHex() {
    return toHex(this.#seed);
  }
  sign(msg) {
    return ed25519.sign(toBytes(msg), this.#seed);
  }
  /** @internal X25519 secret for sealing (SHA-512 of the seed, first half, clamped). */
  _x25519Secret() {
    if (!this.#xsecret) this.#xsecret = ed25519.utils.toMontgomerySecret(this.#seed);
    return this.#xsecret;
  }
  toJSON() {
    return { address: this.address };
  }
}

// ------------------------------------------------------------------ registration

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
      throw new W2WHandshakeError(
        'relay_key_changed',
        `the relay presents key ${ch.relay_key}, but ${this.pinned} is pinned for it`,
      );
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

// ------------------------------------------------------------------ sealing

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

// ------------------------------------------------------------------ W2WSocket

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/** Close codes after which reconnecting cannot help. */
const FATAL = new Set([
  'unsupported_version', 'stale_timestamp', 'wrong_relay', 'bad_signature', 'wrong_url',
  'wrong_role', 'replaced', 'unauthorized_peer',
  // client-side refusals
  'relay_key_changed', 'bad_countersign', 'wrong_address',
]);

/** A small bounded set with least-recently-used eviction, for message ids. */
class LruSet {
  constructor(max) {
    this.max = max;
    this.map = new Map();
  }
  has(k) {
    if (!this.map.has(k)) return false;
    this.map.delete(k);
    this.map.set(k, true);
    return true;
  }
  add(k) {
    this.map.delete(k);
    this.map.set(k, true);
    while (this.map.size > this.max) this.map.delete(this.map.keys().next().value);
  }
  get size() {
    return this.map.size;
  }
}

let wsImport = null;
async function resolveWebSocket(given) {
  if (given) return given;
  if (typeof globalThis.WebSocket === 'function') return globalThis.WebSocket;
  // Node < 22: fall back to the `ws` package (a name in a variable, so
  // bundlers leave it alone in the browser build).
  const name = 'ws';
  wsImport ??= import(/* @vite-ignore */ name).then((m) => m.WebSocket ?? m.default);
  return wsImport;
}

function closeCodeName(code) {
  if (code >= 4000 && code < 5000) return ERROR_CODES[code - 4000] ?? `close_${code}`;
  if (code === 1009) return 'frame_too_large';
  if (code === 1000) return 'normal';
  return `close_${code}`;
}

/** The info document URL of a relay URL: ws → http, wss → https, path /.well-known/w2w. */
export function infoUrl(relayUrl) {
  const u = new URL(String(relayUrl), globalThis.location?.href);
  if (u.protocol === 'ws:') u.protocol = 'http:';
  else if (u.protocol === 'wss:') u.protocol = 'https:';
  return new URL('/.well-known/w2w', u.origin).href;
}

/**
 * Fetches a relay's info document (PROTOCOL.md 13): { protocol, version,
 * relay_key, urls, limits: { max_frame_bytes, … } }. Rejects with
 * W2WError('network' | 'timeout' | 'bad_response', …).
 */
export async function fetchInfo(relayUrl, { fetch: doFetch = globalThis.fetch, timeoutMs = 5000, signal } = {}) {
  if (typeof doFetch !== 'function') throw new W2WError('no_fetch', 'no fetch() here: pass { fetch }');
  const url = infoUrl(relayUrl);
  const ac = new AbortController();
  const onAbort = () => ac.abort();
  signal?.addEventListener?.('abort', onAbort);
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  timer.unref?.(); // Node: do not keep the process alive for this
  try {
    let res;
    try {
      res = await doFetch(url, { signal: ac.signal, cache: 'no-store', headers: { accept: 'application/json' } });
    } catch (e) {
      if (ac.signal.aborted && !signal?.aborted) throw new W2WError('timeout', `no answer from ${url} within ${timeoutMs} ms`);
      throw new W2WError('network', `GET ${url} failed: ${e.message}`);
    }
    if (!res.ok) throw new W2WError('bad_response', `GET ${url}: HTTP ${res.status}`);
    let doc;
    try {
      doc = JSON.parse(await res.text());
    } catch {
      throw new W2WError('bad_response', `GET ${url}: not JSON`);
    }
    if (doc === null || typeof doc !== 'object') throw new W2WError('bad_response', `GET ${url}: not an info document`);
    return doc;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener?.('abort', onAbort);
  }
}

/** limits.max_frame_bytes of an info document, or null if it has none that makes sense. */
function infoMaxFrame(doc) {
  const n = doc?.limits?.max_frame_bytes;
  return Number.isSafeInteger(n) && n > 0 ? n : null;
}

/** The error of a message whose frame is over the relay's limit. */
function frameTooLarge(message, size, limit) {
  const e = new W2WError('frame_too_large', message);
  e.size = size;
  e.limit = limit;
  return e;
}

/**
 * A registered connection to a w2w relay, with the shape of a WebSocket.
 *
 *   new W2WSocket(url, identity, {
 *     WebSocket,          // constructor to use (default: global, else the `ws` package)
 *     pinnedRelayKey,     // refuse a relay with another key (default: pin on first use)
 *     reconnect: true,    // reconnect after an unexpected close, with backoff + jitter
 *     scope: 'federation', // a2n scope for send('*', …)
 *     maxFrameBytes,      // the relay's largest WebSocket message (default 1 MiB, the
 *                         // protocol default); replaced by the relay's own value
 *     fetchInfo: true,    // read it from the info document, GET /.well-known/w2w
 *                         // (http(s) on the relay's host), in the background
 *     fetch,              // fetch() to use for that (default: the global)
 *     infoTimeoutMs: 5000 // how long to wait for the info document
 *   })
 *
 * The known limit is `maxFrameBytes` (and the info document, once fetched,
 * is `info`). send() refuses a message whose MSG frame (after sealing) is
 * larger, with code 'frame_too_large', and nothing is queued. If the relay
 * still closes with 1009 (message too big: its limit is lower than known),
 * the limit is lowered — to the info document's value if it can be read
 * again, otherwise below the largest frame sent on that connection — every
 * unreceipted message over it fails with 'frame_too_large' and is never
 * sent again, and the rest go again after the reconnect.
 *
 * Events (as on<name> properties or addEventListener), each a plain object
 * with `type` and `target`:
 *   open         { relayKey, relayUrl, address, reconnected } after every
 *                (re)registration
 *   message      { from, id, route, data, text, flags, sealed, signed,
 *                verified, to?, group?, scope? }: opened/verified already;
 *                each (from, id) once
 *   receipt      { receipt, id, status, reason, delivered, entries }
 *   presence     { kind: 'join' | 'leave', address } after presence(true)
 *   error        { code, message, from?, id? }: relay ERROR frames, refused
 *                registrations, and messages that did not open or verify
 *   reconnecting { code, reason, name, delay, attempt, wasOpen }
 *   close        { code, reason, name, wasClean }: once, when the socket is
 *                closed for good (close(), a fatal refusal, or reconnect: false)
 */
export class W2WSocket {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  constructor(url, identity, opts = {}) {
    if (!(identity instanceof Identity)) throw new TypeError('identity must be an Identity');
    this.url = new URL(url).href; // sign the same normalized URL we dial (PROTOCOL.md 6.4)
    if (!/^wss?:$/.test(new URL(this.url).protocol)) throw new TypeError('the relay URL must be ws:// or wss://');
    this.identity = identity;
    this.address = identity.address;
    this.readyState = CONNECTING;
    this.relayKey = opts.pinnedRelayKey ? normAddress(opts.pinnedRelayKey, 'pinnedRelayKey') : null;
    this.relayUrl = null;
    this.opts = {
      reconnect: opts.reconnect ?? true,
      minBackoffMs: opts.minBackoffMs ?? 250,
      maxBackoffMs: opts.maxBackoffMs ?? 30000,
      registerTimeoutMs: opts.registerTimeoutMs ?? 15000,
      receiptTimeoutMs: opts.receiptTimeoutMs ?? 30000,
      requestTimeoutMs: opts.requestTimeoutMs ?? 15000,
      dedupe: opts.dedupe ?? 10000,
      scope: opts.scope ?? 'federation',
      maxQueued: opts.maxQueued ?? 1000,
      ack: opts.ack ?? true,
      fetchInfo: opts.fetchInfo ?? true,
      infoTimeoutMs: opts.infoTimeoutMs ?? 5000,
    };
    const maxFrame = opts.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    if (!Number.isSafeInteger(maxFrame) || maxFrame <= MSG_FIXED_HEADER) {
      throw new TypeError(`maxFrameBytes must be an integer above ${MSG_FIXED_HEADER}`);
    }
    /** The largest frame the relay accepts, as far as this client knows (bytes). */
    this.maxFrameBytes = maxFrame;
    /** The relay's info document, once fetched (null until then, or if it cannot be). */
    this.info = null;
    this._fetch = opts.fetch ?? null;
    this._refused = Infinity; // smallest frame the relay closed 1009 on (info doc or not)
    this._sentMax = 0; // largest MSG frame sent on the current connection
    this._limitCheck = null; // the re-read of the limit after a 1009, awaited before reconnecting
    this._infoAbort = new AbortController();
    this._WebSocket = opts.WebSocket ?? null;
    this._listeners = new Map();
    this._seen = new LruSet(this.opts.dedupe);
    // Messages without a receipt yet, in send order: id hex → {bytes, resolve,
    // reject, timer}. Sent again, with the same id, after a reconnect.
    this._pending = new Map();
    this._requests = new Map(); // req_id → {resolve, reject, timer}
    this._queue = []; // requests waiting for the connection to (re)open
    this._waiters = []; // {resolve, reject} waiting for open
    this._nextReq = 1;
    this._backoff = this.opts.minBackoffMs;
    this._attempt = 0;
    this._ws = null;
    this._timer = null;
    this._closedByUser = false;
    this._fatal = null;
    this._presence = false;
    this._everOpened = false;
    /** Counters: messages delivered, repeats dropped, refused (forged etc.), reconnects. */
    this.stats = { received: 0, duplicates: 0, refused: 0, reconnects: 0 };
    this._acks = []; // message ids to acknowledge (store-and-forward)
    this._ackTimer = null;
    this._ackOn = false;
    this._ackSent = false;
    this.onopen = this.onmessage = this.onreceipt = this.onpresence = null;
    this.onerror = this.onclose = this.onreconnecting = null;
    if (this.opts.fetchInfo) this._readInfo();
    this._connect();
  }

  // --- events

  addEventListener(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
  }
  removeEventListener(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }
  _emit(type, ev) {
    ev.type = type;
    ev.target = this;
    const handlers = [this['on' + type], ...(this._listeners.get(type) ?? [])];
    for (const h of handlers) {
      if (typeof h !== 'function') continue;
      try {
        h.call(this, ev);
      } catch (e) {
        // An application handler that throws must not break the connection.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  // --- the frame limit

  /**
   * Fetches the info document and takes its max_frame_bytes (never above a
   * size the relay has refused). Resolves the relay's value, or null when
   * there is none (fetch disabled, unavailable, failed): never rejects.
   */
  async _readInfo(refused = null) {
    if (!this.opts.fetchInfo) return null;
    let doc;
    try {
      // A local: fetch called as a method of this socket would be an illegal invocation.
      const doFetch = this._fetch ?? globalThis.fetch;
      if (typeof doFetch !== 'function') return null;
      doc = await fetchInfo(this.url, { fetch: doFetch, timeoutMs: this.opts.infoTimeoutMs, signal: this._infoAbort.signal });
    } catch {
      return null; // not fatal: the connection goes on with the limit it knows
    }
    const n = infoMaxFrame(doc);
    if (n === null || this.readyState === CLOSED) return null;
    this.info = doc;
    this._setMaxFrame(Math.min(n, this._refused - 1), refused);
    return n;
  }

  /**
   * Takes `limit` as the relay's limit and fails every unreceipted message
   * over it. `refused`: after the relay closed with 1009 — 'info' when the
   * limit is the info document's, 'guess' when it is inferred.
   */
  _setMaxFrame(limit, refused = null) {
    this.maxFrameBytes = limit;
    for (const [id, e] of this._pending) {
      const size = e.bytes.length;
      if (size <= limit) continue;
      clearTimeout(e.timer);
      this._pending.delete(id);
      const closed = 'the relay refused a frame as too large (WebSocket close 1009)';
      const why =
        refused === 'guess'
          ? `${closed}; this message is ${size} bytes as a MSG frame, the largest sent before the close, so the relay's limit (max_frame_bytes) is taken to be below that`
          : refused
            ? `${closed}; this message is ${size} bytes as a MSG frame and the relay's limit is ${limit} bytes (max_frame_bytes)`
            : `this message is ${size} bytes as a MSG frame, over the relay's limit of ${limit} bytes (max_frame_bytes)`;
      e.reject(frameTooLarge(`${why}: it is not sent again; split it or send a smaller payload`, size, limit));
    }
  }

  /**
   * After a 1009 close (the relay refused a frame as too big): learn the
   * real limit — the info document's value if it can be read and explains
   * the refusal, otherwise one byte below the largest frame sent on that
   * connection — and fail what is over it, so that it is never sent again.
   */
  async _afterTooLarge(sentMax) {
    await this._readInfo('info'); // updates maxFrameBytes when it can be read
    let limit = this.maxFrameBytes;
    let how = 'info';
    if (sentMax > 0 && sentMax <= limit) {
      // The relay's limit is lower than it says (or we could not ask):
      // assume the largest frame it was sent is what it refused.
      this._refused = Math.min(this._refused, sentMax);
      limit = sentMax - 1;
      how = 'guess';
    }
    if (this.readyState === CLOSED) return;
    this._setMaxFrame(limit, how);
  }

  // --- connection

  async _connect() {
    this._timer = null;
    if (this._closedByUser) return;
    if (this._limitCheck) {
      // Work out which messages the relay refused before sending any again.
      await this._limitCheck;
      this._limitCheck = null;
      if (this._closedByUser || this.readyState === CLOSED) return;
    }
    this._attempt++;
    let WS;
    try {
      WS = await resolveWebSocket(this._WebSocket);
    } catch {
      this._finish(1006, 'no WebSocket implementation: pass { WebSocket } or install the ws package', false);
      return;
    }
    if (this._closedByUser) return;
    let ws;
    try {
      ws = new WS(this.url);
    } catch (e) {
      this._lost(1006, `cannot connect: ${e.message}`);
      return;
    }
    ws.binaryType = 'arraybuffer';
    this._ws = ws;
    const hs = new ClientHandshake(this.identity, this.url, { pinnedRelayKey: this.relayKey });
    let registered = false;
    let openedAt = 0;
    const regTimer = setTimeout(() => {
      if (!registered && this._ws === ws) {
        this._fail(ws, 'auth_timeout', 'registration did not complete in time');
      }
    }, this.opts.registerTimeoutMs);
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      if (typeof ev.data === 'string') return; // not part of the protocol
      let f;
      try {
        f = decodeFrame(new Uint8Array(ev.data), 'r2c');
      } catch (e) {
        this._emit('error', { code: e.code ?? 'malformed', message: `undecodable frame from the relay: ${e.message}` });
        if (!registered) this._fail(ws, e.code ?? 'malformed', e.message);
        // A stored MSG we cannot read is still acknowledged, or the relay
        // would send it again on every registration. Its id is at 4..20.
        const b = new Uint8Array(ev.data);
        if (registered && b.length >= 20 && b[0] === PROTOCOL_VERSION && b[1] === FRAME.MSG) this._ack(toHex(b.subarray(4, 20)));
        return;
      }
      if (!registered) {
        try {
          if (f.type === 'CHALLENGE') ws.send(encodeFrame(hs.onChallenge(f, Date.now())));
          else if (f.type === 'COUNTERSIGN') ws.send(encodeFrame(hs.onCountersign(f)));
          else if (f.type === 'REPLY_BACK') {
            const info = hs.onReplyBack(f);
            registered = true;
            openedAt = Date.now();
            clearTimeout(regTimer);
            this._onRegistered(info);
          } else if (f.type === 'ERROR') {
            this._lastError = f;
            this._emit('error', { code: f.code, message: f.detail || String(f.code) });
          } else if (f.type === 'NOTICE' && f.kind === 'shutting_down') {
            this._lastError = { code: 'shutting_down' };
          } else {
            throw new W2WHandshakeError('unexpected_frame', `unexpected ${f.type} during registration`);
          }
        } catch (e) {
          this._fail(ws, e.code ?? 'unexpected_frame', e.message);
        }
        return;
      }
      this._onFrame(f);
    };
    ws.onerror = () => {
      // The close event that follows says why; browsers give no detail here.
    };
    ws.onclose = (ev) => {
      clearTimeout(regTimer);
      if (this._ws !== ws) return;
      this._ws = null;
      const code = ev.code ?? 1006;
      const name = this._clientRefusal ?? closeCodeName(code);
      this._clientRefusal = null;
      const lasted = openedAt ? Date.now() - openedAt : 0;
      if (lasted > 10000) this._backoff = this.opts.minBackoffMs;
      this._lost(code, ev.reason || name, name);
    };
  }

  /** Client-side refusal: remember why and close the socket. */
  _fail(ws, code, message) {
    this._clientRefusal = code;
    this._emit('error', { code, message });
    try {
      ws.close(1000, String(code).slice(0, 100));
    } catch {
      // already closing
    }
  }

  _onRegistered(info) {
    this.relayKey = info.relayKey; // pinned from now on (trust on first use)
    this.relayUrl = info.relayUrl;
    this.relayTimeMs = info.relayTimeMs;
    this.readyState = OPEN;
    this._ackOn = this.opts.ack;
    this._ackSent = false;
    const reconnected = this._everOpened;
    if (reconnected) this.stats.reconnects++;
    this._everOpened = true;
    this._attempt = 0;
    this._sentMax = 0;
    if (this._presence) this._sendNow(this._requestFrame('presence', { on: true }).frame, null);
    // Messages that have no receipt yet go (again) with their ids: the relay
    // stores an id once per recipient and recipients drop repeats.
    for (const [id, e] of this._pending) this._transmit(id, e);
    const queued = this._queue.splice(0);
    for (const q of queued) this._sendNow(q.bytes, q.onSent);
    for (const w of this._waiters.splice(0)) w.resolve();
    this._emit('open', { relayKey: this.relayKey, relayUrl: this.relayUrl, address: this.address, reconnected });
  }

  _lost(code, reason, name = closeCodeName(code)) {
    const wasOpen = this.readyState === OPEN;
    if (this.readyState !== CLOSED && !this._closedByUser) this.readyState = CONNECTING;
    // Requests in flight get no answer now; messages without a receipt are
    // kept and sent again after the reconnect.
    this._rejectRequests(new W2WError('connection_lost', `connection lost before the answer came (${name})`));
    for (const e of this._pending.values()) clearTimeout(e.timer);
    if (this._closedByUser) {
      this._finish(code, reason, code === 1000);
      return;
    }
    const fatal = FATAL.has(name) || (this._lastError && FATAL.has(this._lastError.code));
    this._lastError = null;
    if (fatal || !this.opts.reconnect) {
      this._fatal = fatal ? name : null;
      this._finish(code, reason, false, name);
      return;
    }
    if (code === 1009) {
      // The relay refused a frame as too big: find out which messages were
      // (they fail, and are never sent again) before reconnecting.
      const sentMax = this._sentMax;
      this._sentMax = 0;
      const prev = this._limitCheck;
      this._limitCheck = (prev ?? Promise.resolve()).then(() => this._afterTooLarge(sentMax));
    }
    const base = this._backoff;
    const delay = Math.round(base + Math.random() * (base / 2));
    this._backoff = Math.min(this.opts.maxBackoffMs, base * 2);
    this._emit('reconnecting', { code, reason, name, delay, attempt: this._attempt, wasOpen });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _finish(code, reason, wasClean, name = closeCodeName(code)) {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    clearTimeout(this._timer);
    this._infoAbort.abort();
    const err = new W2WError(name, `the connection is closed (${name})`);
    this._rejectRequests(err);
    for (const e of this._pending.values()) {
      clearTimeout(e.timer);
      e.reject(err);
    }
    this._pending.clear();
    for (const q of this._queue.splice(0)) q.onFail?.(err);
    for (const w of this._waiters.splice(0)) w.reject(err);
    this._emit('close', { code, reason, name, wasClean });
  }

  _rejectRequests(err) {
    for (const [, p] of this._requests) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this._requests.clear();
  }

  /** Resolves when the socket is registered (at once if it is). */
  ready() {
    if (this.readyState === OPEN) return Promise.resolve();
    if (this.readyState === CLOSED) return Promise.reject(new W2WError('closed', 'the connection is closed'));
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /** Ends the session (WebSocket close 1000); no reconnect. */
  close(code = 1000, reason = '') {
    if (this.readyState === CLOSED) return;
    this._closedByUser = true;
    clearTimeout(this._timer);
    const ws = this._ws;
    if (ws && ws.readyState <= 1) {
      this.readyState = CLOSING;
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
      // If the close handshake stalls, finish anyway.
      const t = setTimeout(() => {
        if (this._ws === ws) {
          this._ws = null;
          this._finish(code, reason, true);
        }
      }, 3000);
      t.unref?.(); // Node: do not keep the process alive for this

    } else {
      this._ws = null;
      this._finish(code, reason, true);
    }
  }

  // --- sending

  _sendNow(bytes, onSent) {
    this._ws.send(bytes);
    onSent?.();
  }

  /** Sends a message and (re)arms its receipt timer. */
  _transmit(id, e) {
    this._ws.send(e.bytes);
    if (e.bytes.length > this._sentMax) this._sentMax = e.bytes.length;
    clearTimeout(e.timer);
    e.timer = setTimeout(() => {
      this._pending.delete(id);
      e.reject(new W2WError('timeout', 'no receipt from the relay in time'));
    }, this.opts.receiptTimeoutMs);
  }

  /** Sends now if registered, else queues until the connection is open. */
  _sendOrQueue(bytes, onSent, onFail) {
    if (this.readyState === OPEN && this._ws) {
      this._sendNow(bytes, onSent);
    } else if (this.readyState === CLOSED || this.readyState === CLOSING) {
      onFail(new W2WError('closed', 'the connection is closed'));
    } else if (this._queue.length >= this.opts.maxQueued) {
      onFail(new W2WError('queue_full', 'too many sends waiting for the connection'));
    } else {
      this._queue.push({ bytes, onSent, onFail });
    }
  }

  /**
   * Sends `data` (string → UTF-8, or bytes) and resolves with the relay's
   * receipt { id, status, reason, delivered, entries }.
   *
   * `to`: an address (a2b; your own address: a2a), an array of addresses
   * (a2g), or '*' / 'all' (a2n). a2a, a2b and a2g are sealed end to end;
   * a2n is signed. Options: { plain: true } sends flags 0 (no protection),
   * { scope: 'relay' | 'federation' } for a2n. The returned promise
   * carries the message id (hex) as `.id` at once.
   *
   * Sent while the socket is (re)connecting, the message waits for the
   * connection; if the connection drops before the receipt, it is sent
   * again with the same id after the reconnect (the relay stores an id once
   * per recipient and recipients drop repeats). The promise rejects only
   * when the socket closes for good or no receipt comes within
   * receiptTimeoutMs of a send.
   *
   * A message whose MSG frame (after sealing) is larger than the relay's
   * limit (`maxFrameBytes`) is refused at once: the promise rejects with a
   * W2WError of code 'frame_too_large' (with `size` and `limit`), and
   * nothing is sent or queued. It also rejects so if the relay closes the
   * connection with 1009 on it; it is then not sent again.
   */
  send(to, data, options = {}) {
    let msg;
    const limit = this.maxFrameBytes;
    try {
      const payload = toBytes(data);
      if (payload.length + MSG_FIXED_HEADER > limit) {
        // Too big whatever the route: do not seal it to find out.
        throw frameTooLarge(
          `a ${payload.length}-byte payload cannot be sent: with the ${MSG_FIXED_HEADER}-byte MSG header (and sealing) it is over the relay's limit of ${limit} bytes per frame (max_frame_bytes); split it or send a smaller payload`,
          payload.length + MSG_FIXED_HEADER,
          limit,
        );
      }
      msg = this._buildMsg(to, payload, options);
    } catch (e) {
      return Promise.reject(e);
    }
    const bytes = encodeFrame(msg);
    let p;
    if (bytes.length > limit) {
      p = Promise.reject(
        frameTooLarge(
          `this message is ${bytes.length} bytes as a MSG frame (its payload ${msg.payload.length} bytes${msg.flags === FLAGS.sealed ? ' after sealing' : msg.flags === FLAGS.signed ? ' with its signature' : ''}), over the relay's limit of ${limit} bytes (max_frame_bytes): it was not sent; split it or send a smaller payload`,
          bytes.length,
          limit,
        ),
      );
    } else if (this.readyState === CLOSED || this.readyState === CLOSING) {
      p = Promise.reject(new W2WError('closed', 'the connection is closed'));
    } else if (this.readyState !== OPEN && this._pending.size >= this.opts.maxQueued) {
      p = Promise.reject(new W2WError('queue_full', 'too many messages waiting for the connection'));
    } else {
      p = new Promise((resolve, reject) => {
        const e = { bytes, resolve, reject, timer: null };
        this._pending.set(msg.id, e);
        if (this.readyState === OPEN && this._ws) this._transmit(msg.id, e);
      });
    }
    p.id = msg.id; // the message id, known before the receipt comes
    return p;
  }

  _buildMsg(to, data, options) {
    const payload = toBytes(data);
    const id = randomBytes(16);
    const me = this.identity;
    let route;
    let recipients;
    const m = { type: 'MSG', flags: 0, id: toHex(id), from: me.address };
    if (to === '*' || to === 'all') {
      route = 'a2n';
      m.scope = options.scope ?? this.opts.scope;
      indexOf(SCOPES, m.scope, 'scope');
    } else if (Array.isArray(to)) {
      route = 'a2g';
      m.group = to.map((a) => normAddress(a, 'recipient'));
      recipients = [...new Set(m.group)];
    } else {
      const a = normAddress(to, 'recipient');
      if (a === me.address) route = 'a2a';
      else {
        route = 'a2b';
        m.to = a;
      }
      recipients = [a];
    }
    m.route = route;
    if (options.plain) {
      m.payload = payload;
    } else if (route === 'a2n') {
      m.flags = FLAGS.signed;
      m.payload = sign(me, id, payload);
    } else if (recipients.length === 0 || recipients.length > MAX_RECIPIENTS) {
      // An empty or oversize list is the relay's to refuse, with its own
      // code (empty_list, list_too_long): send nothing readable.
      m.payload = new Uint8Array(0);
    } else {
      m.flags = FLAGS.sealed;
      m.payload = seal(me, id, recipients.map((a) => fromHex(a)), payload);
    }
    return m;
  }

  // --- requests (c2s)

  _requestFrame(op, body) {
    const req_id = this._nextReq;
    this._nextReq = (this._nextReq + 1) >>> 0 || 1;
    return { req_id, frame: encodeFrame({ type: 'REQUEST', req_id, op, ...body }) };
  }

  _request(op, body) {
    const { req_id, frame } = this._requestFrame(op, body);
    return new Promise((resolve, reject) => {
      const onSent = () => {
        const timer = setTimeout(() => {
          this._requests.delete(req_id);
          reject(new W2WError('timeout', `no answer to ${op} in time`));
        }, this.opts.requestTimeoutMs);
        this._requests.set(req_id, { resolve, reject, timer });
      };
      this._sendOrQueue(frame, onSent, reject);
    });
  }

  /** Every address registered on this relay (pages through ONLINE). */
  async online() {
    const out = [];
    for (;;) {
      const r = await this._request('online', { offset: out.length, limit: 1000 });
      out.push(...r.addresses);
      if (r.addresses.length === 0 || out.length >= r.total) return out;
    }
  }

  /** Which relay hosts `address`: { relayKey, relayUrl }, or null if unknown. */
  async lookup(address) {
    const r = await this._request('lookup', { address: normAddress(address) });
    return r.found ? { relayKey: r.relay_key, relayUrl: r.relay_url } : null;
  }

  /** Turns join/leave notices (the `presence` event) on or off; kept across reconnects. */
  async presence(on = true) {
    this._presence = !!on;
    await this._request('presence', { on: !!on });
  }

  // --- receiving

  _onFrame(f) {
    switch (f.type) {
      case 'MSG':
        this._onMsg(f);
        break;
      case 'RECEIPT': {
        const p = this._pending.get(f.id);
        const receipt = { id: f.id, status: f.status, reason: f.reason, delivered: f.delivered, entries: f.entries };
        if (p) {
          clearTimeout(p.timer);
          this._pending.delete(f.id);
          p.resolve(receipt);
        }
        this._emit('receipt', { receipt, ...receipt });
        break;
      }
      case 'RESPONSE': {
        const p = this._requests.get(f.req_id);
        if (!p) break;
        clearTimeout(p.timer);
        this._requests.delete(f.req_id);
        if (f.error) p.reject(new W2WError(f.error, `the relay refused ${f.op}: ${f.error}`));
        else p.resolve(f);
        break;
      }
      case 'NOTICE':
        if (f.kind === 'join' || f.kind === 'leave') this._emit('presence', { kind: f.kind, address: f.address });
        else this._lastError = { code: f.kind }; // replaced / shutting_down: the close follows
        break;
      case 'ERROR':
        if (this._ackSent && (f.code === 'unknown_frame_type' || f.code === 'unexpected_frame')) {
          // A relay without store-and-forward does not know ACK: stop sending it.
          this._ackOn = false;
          this._acks = [];
          break;
        }
        this._emit('error', { code: f.code, message: f.detail || String(f.code) });
        break;
      default:
        this._emit('error', { code: 'unexpected_frame', message: `unexpected ${f.type} from the relay` });
    }
  }

  /**
   * Acknowledges a received message id (ACK, 0x06) so that a relay with
   * store-and-forward can drop it from its queue. Batched; sent for every
   * MSG handled, whether delivered, a duplicate, or refused.
   */
  _ack(id) {
    if (!this._ackOn) return;
    this._acks.push(id);
    if (this._ackTimer) return;
    // Right after the frames that arrived together have been handled: the
    // sender's receipt waits for this ACK.
    this._ackTimer = true;
    queueMicrotask(() => {
      this._ackTimer = null;
      const ids = this._acks.splice(0);
      if (!this._ackOn || this.readyState !== OPEN || !this._ws) return;
      for (let i = 0; i < ids.length; i += MAX_ACK_IDS) {
        this._ws.send(encodeFrame({ type: 'ACK', ack_ids: ids.slice(i, i + MAX_ACK_IDS) }));
        this._ackSent = true;
      }
    });
  }

  _onMsg(m) {
    this._ack(m.id);
    const key = m.from + m.id;
    if (this._seen.has(key)) {
      this.stats.duplicates++; // a redelivered copy (acknowledged again above)
      return;
    }
    let data;
    let verified = false;
    try {
      if (m.flags === FLAGS.sealed) {
        data = open(this.identity, m.id, m.from, m.payload);
        verified = true;
      } else if (m.flags === FLAGS.signed) {
        data = verifySigned(m.id, m.from, m.payload);
        verified = true;
      } else if (m.flags === FLAGS.plain) {
        data = m.payload;
      } else {
        throw new W2WSealError('unsupported_flags', `flags ${m.flags} are not understood`);
      }
    } catch (e) {
      // Never deliver what does not open or verify. Not marked as seen, so a
      // forgery cannot block the genuine message with the same id.
      this.stats.refused++;
      this._emit('error', {
        code: e.code ?? 'forged',
        message: `dropped a message from ${m.from}: ${e.message}`,
        from: m.from,
        id: m.id,
        route: m.route,
      });
      return;
    }
    this._seen.add(key);
    this.stats.received++;
    data = Uint8Array.from(data);
    let text;
    this._emit('message', {
      from: m.from,
      id: m.id,
      route: m.route,
      flags: m.flags,
      sealed: m.flags === FLAGS.sealed,
      signed: m.flags === FLAGS.signed,
      verified,
      to: m.to,
      group: m.group,
      groupName: m.group_name,
      scope: m.scope,
      data,
      get text() {
        if (text === undefined) {
          try {
            text = strictUtf8.decode(data);
          } catch {
            text = null;
          }
        }
        return text;
      },
    });
  }
}

/** An error with a machine-readable `code` (an error-code name or a client reason). */
export class W2WError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'W2WError';
    this.code = code;
  }
}

// ------------------------------------------------------------------ Spacerifts

/*
 * Spacerifts: WebRTC peer linking over the relay's HTTP port (POST
 * /spacerift) in as few round trips as possible. Alice CONNECTs with her
 * offer and waits (long poll, up to 15 s); Bob CONNECTs with his offer, is
 * DEMOTEd to answerer (a nonce and Alice's offer), CONNECTs again with the
 * nonce and his answer (→ DELIVERED), and Alice's waiting request returns
 * the ANSWER. Three HTTP round trips per link; then the data flows peer to
 * peer over an RTCDataChannel, not through the relay.
 *
 * Every request is signed with the client's Ed25519 key over
 * spaceriftMessage() (domain-separated; binds type, namespace, nonce,
 * signal and time).
 */

export const SPACERIFT_DOMAIN = ascii('w2w/v1 spacerift\0');
export const SPACERIFT_TYPES = Object.freeze(['CONNECT', 'BOUNCE', 'RTT']);
/** Longest namespace, in UTF-8 bytes. */
export const MAX_SPACERIFT_NAMESPACE = 64;
/** Longest signal, in UTF-8 bytes. */
export const MAX_SPACERIFT_SIGNAL = 32 * 1024;
/** The non-200 statuses of POST /spacerift that are part of the protocol. */
export const SPACERIFT_STATUS = Object.freeze({
  no_peer: 299,
  no_namespace_peer: 298,
  rate_limited: 297,
  missing_parameter: 499,
});

/**
 * The bytes a Spacerifts request signs:
 *   "w2w/v1 spacerift\0" || u8 len(type) || type || u16 len(namespace) ||
 *   namespace || u8 len(nonce) || nonce (hex-decoded; empty if none) ||
 *   u32 len(signal) || signal (UTF-8) || u64 ts      (big-endian lengths)
 */
export function spaceriftMessage({ type, namespace = '', nonce = '', signal, ts }) {
  if (!SPACERIFT_TYPES.includes(type)) throw new TypeError(`type must be one of ${SPACERIFT_TYPES.join(', ')}`);
  if (typeof namespace !== 'string') throw new TypeError('namespace must be a string');
  if (typeof signal !== 'string') throw new TypeError('signal must be a string');
  if (!Number.isSafeInteger(ts) || ts < 0) throw new TypeError('ts must be unix milliseconds');
  const t = ascii(type);
  const ns = enc.encode(namespace);
  if (ns.length > MAX_SPACERIFT_NAMESPACE) throw new TypeError(`namespace is ${ns.length} bytes, the maximum is ${MAX_SPACERIFT_NAMESPACE}`);
  const n = nonce ? fromHex(nonce) : new Uint8Array(0);
  if (n.length > 255) throw new TypeError('nonce is longer than 255 bytes');
  const sg = enc.encode(signal);
  if (sg.length > MAX_SPACERIFT_SIGNAL) throw new TypeError(`signal is ${sg.length} bytes, the maximum is ${MAX_SPACERIFT_SIGNAL}`);
  const w = new Writer();
  w.bytes(SPACERIFT_DOMAIN);
  w.u8(t.length);
  w.bytes(t);
  w.u16(ns.length);
  w.bytes(ns);
  w.u8(n.length);
  w.bytes(n);
  w.u32(sg.length);
  w.bytes(sg);
  w.u64(ts);
  return w.done();
}

/**
 * A signed request body for POST /spacerift:
 * { type, namespace, signal, nonce?, key, ts, sig }.
 */
export function signSpaceriftRequest(identity, { type, namespace = '', signal, nonce = null, ts = Date.now() }) {
  const sig = identity.sign(spaceriftMessage({ type, namespace, nonce: nonce ?? '', signal, ts }));
  const body = { type, namespace, signal };
  if (nonce) body.nonce = nonce;
  body.key = identity.address;
  body.ts = ts;
  body.sig = toHex(sig);
  return body;
}

/** Verifies a request body's signature (strictly); true or false. */
export function verifySpaceriftRequest(body) {
  try {
    const msg = spaceriftMessage({ type: body.type, namespace: body.namespace ?? '', nonce: body.nonce ?? '', signal: body.signal, ts: body.ts });
    return verifyStrict(body.sig, msg, body.key);
  } catch {
    return false;
  }
}

/** The Spacerifts endpoint of a relay URL (ws:, wss:, http: or https:; any path → …/spacerift). */
export function spaceriftUrl(relayUrl) {
  const u = new URL(String(relayUrl), globalThis.location?.href);
  if (u.protocol === 'ws:') u.protocol = 'http:';
  else if (u.protocol === 'wss:') u.protocol = 'https:';
  if (!u.pathname.endsWith('/spacerift')) u.pathname = u.pathname.replace(/\/?$/, '/spacerift');
  u.search = '';
  u.hash = '';
  return u.href;
}

/**
 * POSTs one (already signed) request body; resolves { status, body, date }
 * whatever the status. Rejects with W2WError('network', …) or ('timeout', …).
 */
export async function spaceriftRequest(relayUrl, request, { fetch: doFetch = globalThis.fetch, timeoutMs = 25000, signal } = {}) {
  if (typeof doFetch !== 'function') throw new W2WError('no_fetch', 'no fetch() here: pass { fetch }');
  const ac = new AbortController();
  const onAbort = () => ac.abort();
  signal?.addEventListener?.('abort', onAbort);
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  try {
    const res = await doFetch(spaceriftUrl(relayUrl), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(request),
      signal: ac.signal,
      cache: 'no-store',
    });
    const text = await res.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = { error: 'bad_response', detail: text.slice(0, 200) };
    }
    if (body === null || typeof body !== 'object') body = { error: 'bad_response', detail: text.slice(0, 200) };
    return { status: res.status, body, date: res.headers.get('date') };
  } catch (e) {
    if (signal?.aborted) throw new W2WError('aborted', 'linkPeer was aborted');
    if (ac.signal.aborted) throw new W2WError('timeout', `no answer from ${spaceriftUrl(relayUrl)} within ${timeoutMs} ms`);
    throw new W2WError('network', `POST ${spaceriftUrl(relayUrl)} failed: ${e.message}`);
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener?.('abort', onAbort);
  }
}

/**
 * Best-latency peer rotation: reports the round trip measured to a linked
 * peer (e.g. over its data channel). The relay then prefers lower-latency
 * offerers when it pairs this key again. Resolves the relay's answer.
 */
export async function reportRtt(relayUrl, identity, peer, rttMs, opts = {}) {
  const signal = `${String(peer).toLowerCase()}:${Math.max(0, Math.round(rttMs))}`;
  const body = signSpaceriftRequest(identity, { type: 'RTT', signal, ts: opts.ts ?? Date.now() });
  return spaceriftRequest(relayUrl, body, opts);
}

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new W2WError('aborted', 'linkPeer was aborted'));
    const t = setTimeout(() => {
      signal?.removeEventListener?.('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(new W2WError('aborted', 'linkPeer was aborted'));
    };
    signal?.addEventListener?.('abort', onAbort, { once: true });
  });

/** Resolves when ICE gathering is complete (or after `ms`, with what was gathered). */
function iceGathered(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t);
      pc.removeEventListener('icegatheringstatechange', onState);
      pc.removeEventListener('icecandidate', onCandidate);
      resolve();
    };
    const onState = () => pc.iceGatheringState === 'complete' && done();
    const onCandidate = (e) => !e.candidate && done();
    const t = setTimeout(done, ms);
    pc.addEventListener('icegatheringstatechange', onState);
    pc.addEventListener('icecandidate', onCandidate);
  });
}

/** Resolves with the channel once it is open; rejects if the connection fails or after `ms`. */
function channelOpen(pc, channelPromise, ms) {
  return new Promise((resolve, reject) => {
    let dc = null;
    const cleanup = () => {
      clearTimeout(t);
      pc.removeEventListener('connectionstatechange', onPc);
      dc?.removeEventListener('open', onOpen);
    };
    const fail = (why) => {
      cleanup();
      reject(new W2WError('link_failed', why));
    };
    const onOpen = () => {
      cleanup();
      resolve(dc);
    };
    const onPc = () => {
      if (pc.connectionState === 'failed' || pc.connectionState === 'closed') fail(`the peer connection ${pc.connectionState}`);
    };
    const t = setTimeout(() => fail(`the data channel did not open within ${ms} ms`), ms);
    pc.addEventListener('connectionstatechange', onPc);
    channelPromise.then((c) => {
      dc = c;
      if (dc.readyState === 'open') onOpen();
      else dc.addEventListener('open', onOpen);
    });
  });
}

/**
 * Links this browser to another peer through a relay's Spacerifts endpoint
 * and resolves with an open RTCDataChannel to it.
 *
 *   const ch = await linkPeer('https://relay.example', 'my-app', { identity });
 *   ch.onmessage = (e) => console.log(ch.peer, e.data);
 *   ch.send('hello, peer');
 *   …
 *   ch.peerConnection.close();   // closing the channel alone keeps the PC
 *
 * The channel also carries `peer` (the other side's key as the relay named
 * it), `role` ('offerer' | 'answerer'), `peerConnection`, and `requests`
 * (each HTTP request made: { type, nonce?, status, result, ms }).
 *
 * Non-trickle: every SDP is sent once ICE gathering is complete, so the
 * signal carries its candidates. The default is no ICE servers (host
 * candidates only: peers on one host or LAN); pass `iceServers` for STUN or
 * TURN.
 *
 * Options: identity (an Identity; default a fresh one — the relay rate-limits
 * and remembers pairs per key, so pass a kept one), RTCPeerConnection
 * (default the global), iceServers ([]), rtcConfig (more RTCConfiguration),
 * label / channelOptions (for createDataChannel), attempts (CONNECTs that
 * may come back with no peer, default 5), timeoutMs (the whole link, default
 * 120 s), gatherTimeoutMs (5 s; at most 3 s when answering, as the relay
 * leases an offer for 5 s), openTimeoutMs (15 s), linked (a Set, array
 * or predicate of keys already linked: their offers are BOUNCEd and their
 * answers disregarded), fetch, signal (an AbortSignal), onRequest (called
 * with each request record).
 */
export async function linkPeer(relayUrl, namespace = '', opts = {}) {
  const {
    identity = Identity.generate(),
    RTCPeerConnection: PC = globalThis.RTCPeerConnection,
    iceServers = [],
    rtcConfig = {},
    label = 'w2w',
    channelOptions = {},
    attempts = 5,
    timeoutMs = 120000,
    gatherTimeoutMs = 5000,
    openTimeoutMs = 15000,
    linked = null,
    fetch: doFetch,
    signal,
    onRequest,
  } = opts;
  if (typeof PC !== 'function') throw new W2WError('no_webrtc', 'no RTCPeerConnection here: pass { RTCPeerConnection }');
  if (!(identity instanceof Identity)) throw new TypeError('identity must be an Identity');
  namespace = namespace ?? '';
  if (enc.encode(namespace).length > MAX_SPACERIFT_NAMESPACE) {
    throw new TypeError(`namespace is longer than ${MAX_SPACERIFT_NAMESPACE} bytes`);
  }
  const isLinked =
    typeof linked === 'function' ? linked : linked ? ((s) => (k) => s.has(k))(new Set(linked)) : () => false;
  const deadline = Date.now() + timeoutMs;
  const config = { ...rtcConfig, iceServers };
  const requests = [];
  const open = new Set(); // peer connections to close if we give up
  let clockOffset = 0; // relay clock − ours, learnt from a stale_timestamp answer

  const newPc = () => {
    const pc = new PC(config);
    open.add(pc);
    return pc;
  };
  const dropPc = (pc) => {
    if (!pc) return;
    open.delete(pc);
    try {
      pc.close();
    } catch {
      // already closed
    }
  };
  const checkTime = () => {
    if (signal?.aborted) throw new W2WError('aborted', 'linkPeer was aborted');
    if (Date.now() > deadline) throw new W2WError('timeout', `no peer linked within ${timeoutMs} ms`);
  };

  /** A fresh offerer: PC, data channel, and the gathered offer as a signal. */
  const makeOffer = async () => {
    const pc = newPc();
    const dc = pc.createDataChannel(label, channelOptions);
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, gatherTimeoutMs);
    return { pc, dc, signal: JSON.stringify(pc.localDescription) };
  };
  /** An answerer to `offerSignal`: PC, the coming channel, and the gathered answer. */
  const makeAnswer = async (offerSignal) => {
    const pc = newPc();
    const channel = new Promise((resolve) => {
      pc.addEventListener('datachannel', (e) => resolve(e.channel), { once: true });
    });
    await pc.setRemoteDescription(JSON.parse(offerSignal));
    await pc.setLocalDescription(await pc.createAnswer());
    // The relay leases the offer to us for 5 s: answer with what is gathered by 3 s.
    await iceGathered(pc, Math.min(gatherTimeoutMs, 3000));
    return { pc, channel, signal: JSON.stringify(pc.localDescription) };
  };

  /** Signs and POSTs one request; waits out 297 and corrects a skewed clock once. */
  const post = async (type, sig, nonce = null) => {
    let skewRetried = false;
    for (;;) {
      checkTime();
      const body = signSpaceriftRequest(identity, { type, namespace, signal: sig, nonce, ts: Date.now() + clockOffset });
      const started = Date.now();
      const left = Math.max(1000, deadline - started);
      const res = await spaceriftRequest(relayUrl, body, { fetch: doFetch, signal, timeoutMs: Math.min(25000, left) });
      const rec = { type, status: res.status, result: res.body.type ?? res.body.error, ms: Date.now() - started };
      if (nonce) rec.nonce = nonce;
      requests.push(rec);
      onRequest?.(rec);
      if (res.status === SPACERIFT_STATUS.rate_limited) {
        const wait = Math.max(0.2, Number(res.body.retry_after) || 1) * 1000;
        await sleep(Math.min(wait + Math.random() * 250, Math.max(0, deadline - Date.now())), signal);
        continue;
      }
      if (res.status === 400 && res.body.error === 'stale_timestamp' && !skewRetried && res.date) {
        const relayNow = Date.parse(res.date);
        if (Number.isFinite(relayNow)) {
          skewRetried = true;
          clockOffset = relayNow + 500 - Date.now();
          continue;
        }
      }
      return res;
    }
  };

  let offer = null; // our current offer (kept across no-peer retries and BOUNCEs)
  let starts = 0;
  let lastMiss = null;
  let next = null; // the next request, when it is not a fresh CONNECT
  try {
    for (;;) {
      checkTime();
      if (!next) {
        if (starts >= attempts) {
          throw new W2WError(lastMiss ?? 'no_peer', `no peer linked after ${starts} CONNECTs (${lastMiss ?? 'no_peer'})`);
        }
        starts++;
        offer ??= await makeOffer();
        next = { type: 'CONNECT', signal: offer.signal };
      }
      const req = next;
      next = null;
      const { status, body } = await post(req.type, req.signal, req.nonce);

      if (status === SPACERIFT_STATUS.no_peer || status === SPACERIFT_STATUS.no_namespace_peer) {
        lastMiss = body.error ?? (status === 299 ? 'no_peer' : 'no_namespace_peer');
        dropPc(req.answerer?.pc);
        continue; // the same offer again
      }
      if (status === 409) {
        // Our answer (or bounce) came after the lease ended: start over.
        dropPc(req.answerer?.pc);
        continue;
      }
      if (status !== 200) {
        throw new W2WError(body.error ?? `http_${status}`, `the relay refused ${req.type} (${status}): ${body.error ?? ''}${body.detail ? ` ${body.detail}` : ''}`);
      }
      switch (body.type) {
        case 'DEMOTE': {
          dropPc(req.answerer?.pc);
          if (isLinked(body.peer)) {
            // Already linked to this peer: hand its offer back, ours goes in the queue.
            offer ??= await makeOffer();
            next = { type: 'BOUNCE', nonce: body.nonce, signal: offer.signal };
            break;
          }
          dropPc(offer?.pc);
          offer = null;
          let answerer;
          try {
            answerer = await makeAnswer(body.signal);
          } catch {
            continue; // an offer we cannot answer: its lease runs out, we CONNECT again
          }
          next = { type: 'CONNECT', nonce: body.nonce, signal: answerer.signal, answerer, peer: body.peer };
          break;
        }
        case 'DELIVERED': {
          const a = req.answerer;
          if (!a) throw new W2WError('bad_response', 'DELIVERED for a request that carried no answer');
          try {
            const dc = await channelOpen(a.pc, a.channel, Math.min(openTimeoutMs, Math.max(1000, deadline - Date.now())));
            return finish(dc, a.pc, req.peer, 'answerer');
          } catch (e) {
            dropPc(a.pc);
            if (e instanceof W2WError && e.code !== 'link_failed') throw e;
            continue;
          }
        }
        case 'ANSWER': {
          if (!offer) throw new W2WError('bad_response', 'ANSWER with no offer outstanding');
          const o = offer;
          offer = null;
          if (isLinked(body.peer)) {
            dropPc(o.pc); // already linked to them: disregard, CONNECT again
            continue;
          }
          try {
            await o.pc.setRemoteDescription(JSON.parse(body.signal));
            const dc = await channelOpen(o.pc, Promise.resolve(o.dc), Math.min(openTimeoutMs, Math.max(1000, deadline - Date.now())));
            return finish(dc, o.pc, body.peer, 'offerer');
          } catch (e) {
            dropPc(o.pc);
            // A bad answer (unparsable SDP) or a link that did not come up: CONNECT again.
            if (e instanceof W2WError && e.code !== 'link_failed') throw e;
            continue;
          }
        }
        default:
          throw new W2WError('bad_response', `unexpected answer ${JSON.stringify(body).slice(0, 200)}`);
      }
    }
  } finally {
    for (const pc of [...open]) dropPc(pc);
  }

  function finish(dc, pc, peer, role) {
    open.delete(pc); // keep this one
    dc.peer = peer;
    dc.role = role;
    dc.peerConnection = pc;
    dc.requests = requests;
    return dc;
  }
}

export default W2WSocket;
