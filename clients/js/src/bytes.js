// Byte helpers shared by the modules of the w2w client (public: toHex,
// fromHex, concat and isAddress; the rest are internal).

export const enc = new TextEncoder();
export const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
export const ascii = (s) => enc.encode(s);

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

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

/** Bytes of a hex string or byte array, checked to be `len` long. */
export function bin(x, len, field) {
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

export function normAddress(s, field = 'address') {
  if (s instanceof Uint8Array && s.length === 32) return toHex(s);
  if (!isAddress(s)) throw new TypeError(`${field} must be 64 hex characters`);
  return s.trim().toLowerCase();
}

/** Payload bytes from a string (UTF-8), ArrayBuffer, typed array or DataView. */
export function toBytes(data) {
  if (typeof data === 'string') return enc.encode(data);
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError('data must be a string, ArrayBuffer or typed array');
}

export function randomBytes(n) {
  const b = new Uint8Array(n);
  globalThis.crypto.getRandomValues(b);
  return b;
}
