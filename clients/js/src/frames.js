// The frame codec of docs/PROTOCOL.md sections 4 and 5: constants, error
// codes, decodeFrame and encodeFrame.

import { enc, strictUtf8, toHex, concat, bin, toBytes } from './bytes.js';

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
export const GROUP_NAME = /^[a-z0-9._-]{1,64}$/;
export const SCOPES = Object.freeze(['relay', 'federation']);
/**
 * REGISTER roles: 0 client (a receiving session), 1 relay (peering), 2 sender
 * (a send-only client session: it is never handed a MSG and is not online).
 */
export const ROLES = Object.freeze(['client', 'relay', 'sender']);
export const STATUSES = Object.freeze(['delivered', 'queued', 'no_route', 'rejected', 'partial']);
/**
 * REQUEST ops by number. 4 GROUP and 5 GROUP_INFO (named groups, managed
 * with the Rust CLI) are not implemented by this client: '' keeps their
 * numbers and makes them unknown here, as before.
 */
export const OPS = Object.freeze(['', 'online', 'lookup', 'presence', '', '', 'exclusive']);
export const NOTICE_KINDS = Object.freeze(['', 'join', 'leave', 'replaced', 'shutting_down', 'delivered']);

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
  51: 'too_many_sessions',
  52: 'moved',
  53: 'joining',
});
const ERROR_NUMBER = Object.fromEntries(Object.entries(ERROR_CODES).map(([n, s]) => [s, Number(n)]));

/** Name of an error code; unknown codes are reported as their number. */
export function errorName(code) {
  if (code === 0 || code == null) return null;
  return ERROR_CODES[code] ?? code;
}
export function errorNumber(name) {
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


/** A frame that does not decode; `code` is the error name of PROTOCOL.md 4.4. */
export class W2WDecodeError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'W2WDecodeError';
    this.code = code;
    this.number = ERROR_NUMBER[code];
  }
}

export class Reader {
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

export class Writer {
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

export function indexOf(names, v, field) {
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
      } else if (op === 6) {
        // EXCLUSIVE has no body: trailing bytes are malformed (finish below).
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
        } else if (op === 6) {
          f.closed = r.u32('closed'); // how many other sessions the relay closed
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
      if (kind === 'delivered') {
        // A message of ours that was receipted `queued` reached `address`.
        f.id = r.hex(16, 'id');
        f.address = r.hex(32, 'address');
      }
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
      else if (op === 3) w.u8(f.on ? 1 : 0);
      // op 6 (exclusive): no body
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
        } else if (f.op === 'exclusive' || f.op === 6) {
          w.u32(f.closed ?? 0);
        }
      }
      break;
    }
    case 'NOTICE': {
      const kind = indexOf(NOTICE_KINDS, f.kind, 'notice kind');
      w.u8(kind);
      if (kind === 1 || kind === 2) w.bytes(bin(f.address, 32, 'address'));
      if (kind === 5) {
        w.bytes(bin(f.id, 16, 'id'));
        w.bytes(bin(f.address, 32, 'address'));
      }
      break;
    }
    case 'ERROR':
      w.u16(errorNumber(f.code));
      w.string(f.detail ?? '', MAX_DETAIL_LEN);
      break;
  }
  return w.done();
}
