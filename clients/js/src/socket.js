// W2WSocket: a registered connection to a relay with the shape of a
// WebSocket (receipts, ACKs, dedupe, reconnect), and the relay's info
// document.

import { toHex, fromHex, normAddress, toBytes, randomBytes, strictUtf8 } from './bytes.js';
import {
  PROTOCOL_VERSION, FRAME, SCOPES, ERROR_CODES, MSG_FIXED_HEADER, DEFAULT_MAX_FRAME_BYTES, MAX_ACK_IDS,
  decodeFrame, encodeFrame, indexOf,
} from './frames.js';
import { Identity } from './identity.js';
import { ClientHandshake, W2WHandshakeError } from './handshake.js';
import { FLAGS, MAX_RECIPIENTS, W2WSealError, seal, open, sign, verifySigned } from './sealing.js';


const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/**
 * Close codes after which reconnecting cannot help. `replaced` is here
 * because another session of this key asked to be the only one (EXCLUSIVE):
 * reconnecting would fight it, and two exclusive sockets with one key would
 * close each other in a loop.
 *
 * `too_many_sessions` (4051) is deliberately NOT here: the key holds the
 * most sessions the relay allows, which changes as soon as one of them ends
 * (another tab closes, or a dead connection of ours times out on the
 * relay), so the socket keeps retrying, with the usual doubling backoff
 * from at least SESSIONS_FULL_BACKOFF_MS: never in a tight loop (a refused
 * registration never resets the backoff), and it comes back by itself
 * once a slot is free.
 */
const FATAL = new Set([
  'unsupported_version', 'stale_timestamp', 'wrong_relay', 'bad_signature', 'wrong_url',
  'wrong_role', 'replaced', 'unauthorized_peer',
  // client-side refusals
  'relay_key_changed', 'bad_countersign', 'wrong_address',
]);
/** The first retry after `too_many_sessions`: a slot frees when a session ends, not within milliseconds. */
const SESSIONS_FULL_BACKOFF_MS = 2000;

/** A small bounded set with least-recently-used eviction, for message ids (internal: also W2WHomes). */
export class LruSet {
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
 * Events as on<name> properties or addEventListener, each a plain object
 * with `type` and `target` (internal: the base of W2WSocket and W2WHomes).
 */
export class Emitter {
  constructor() {
    this._listeners = new Map();
  }
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
}

/**
 * A registered connection to a w2w relay, with the shape of a WebSocket.
 *
 *   new W2WSocket(url, identity, {
 *     WebSocket,          // constructor to use (default: global, else the `ws` package)
 *     pinnedRelayKey,     // refuse a relay with another key (default: pin on first use)
 *     reconnect: true,    // reconnect after an unexpected close, with backoff + jitter
 *     sendOnly: false,    // register as a send-only session (role 'sender'): it sends,
 *                         // asks and gets receipts, but is never handed a message and
 *                         // is not online; it never disturbs a receiving session of
 *                         // the same key
 *     exclusive: false,   // after registering and after every reconnect, ask the relay
 *                         // to close this key's other sessions (exclusive(); the
 *                         // count comes as the `exclusive` event)
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
 * One key may hold several sessions on a relay at once (tabs, devices, a
 * listener and a one-shot sender): a live message reaches every receiving
 * session, each acknowledging it for itself (the sender's receipt counts
 * them in `delivered`); a stored message goes to whichever session takes
 * it first. A relay admits a limited number of sessions per key (8 by
 * default) and refuses the next with `too_many_sessions`: the socket then
 * retries with backoff (see FATAL).
 *
 * Events (as on<name> properties or addEventListener), each a plain object
 * with `type` and `target`:
 *   open         { relayKey, relayUrl, address, reconnected } after every
 *                (re)registration
 *   exclusive    { closed, reconnected } with the `exclusive` option: the
 *                relay's answer after each (re)registration, how many other
 *                sessions of this key it closed
 *   message      { from, id, route, data, text, flags, sealed, signed,
 *                verified, to?, group?, scope? }: opened/verified already;
 *                each (from, id) once
 *   receipt      { receipt, id, status, reason, delivered, entries }
 *   presence     { kind: 'join' | 'leave', address } after presence(true)
 *   delivered    { id, to }: a message of ours whose receipt said `queued`
 *                for `to` has now reached it (best effort: only while we are
 *                connected to `to`'s relay)
 *   error        { code, message, from?, id? }: relay ERROR frames, refused
 *                registrations, and messages that did not open or verify;
 *                code 'relay_key_changed' also carries relayKey (the key
 *                the relay presented) and pinnedRelayKey
 *   reconnecting { code, reason, name, delay, attempt, wasOpen }
 *   close        { code, reason, name, wasClean }: once, when the socket is
 *                closed for good (close(), a fatal refusal, or reconnect: false)
 */
export class W2WSocket extends Emitter {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  constructor(url, identity, opts = {}) {
    super();
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
      sendOnly: !!opts.sendOnly,
      exclusive: !!opts.exclusive,
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
    /** The role this socket registers with: 'client' (receives) or 'sender' (send-only). */
    this.role = this.opts.sendOnly ? 'sender' : 'client';
    this.onopen = this.onmessage = this.onreceipt = this.onpresence = null;
    this.onexclusive = null;
    this.onerror = this.onclose = this.onreconnecting = null;
    if (this.opts.fetchInfo) this._readInfo();
    this._connect();
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
    const hs = new ClientHandshake(this.identity, this.url, { role: this.role, pinnedRelayKey: this.relayKey });
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
          const extra = e.code === 'relay_key_changed' ? { relayKey: e.relayKey, pinnedRelayKey: e.pinnedRelayKey } : null;
          this._fail(ws, e.code ?? 'unexpected_frame', e.message, extra);
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
  _fail(ws, code, message, extra = null) {
    this._clientRefusal = code;
    this._emit('error', { code, message, ...extra });
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
    // First, before anything else goes out: close this key's other sessions
    // (e.g. our own old connection the relay has not yet seen die).
    if (this.opts.exclusive) this._askExclusive(reconnected);
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
    // Refused for too many sessions: no quick retries (see FATAL).
    if (name === 'too_many_sessions') this._backoff = Math.max(this._backoff, Math.min(SESSIONS_FULL_BACKOFF_MS, this.opts.maxBackoffMs));
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

  /**
   * While waiting to reconnect: tries again now (and restarts the backoff
   * from its minimum), e.g. from a "reconnect now" button or when the
   * browser says it is online again. Returns true if an attempt was
   * started; false when open, closed for good, or an attempt is under way.
   */
  reconnectNow() {
    if (this.readyState !== CONNECTING || this._closedByUser || !this._timer) return false;
    clearTimeout(this._timer);
    this._timer = null;
    this._backoff = this.opts.minBackoffMs;
    this._connect();
    return true;
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

  /**
   * While this socket is not open: gives every message still waiting for
   * its receipt to `other`, an open socket of the same identity at another
   * relay (W2WHomes), which sends it now with its id, so that it does not
   * wait for this relay to come back. A MSG is the same bytes at any relay,
   * and a copy that this relay delivered before it went away is dropped by
   * the recipient as a repeat (id, from): PROTOCOL.md 7.6. The promise
   * send() returned resolves with the other relay's receipt.
   */
  _handOver(other) {
    if (this.readyState === OPEN || other.readyState !== OPEN || !other._ws) return;
    for (const [id, e] of this._pending) {
      if (e.bytes.length > other.maxFrameBytes || other._pending.has(id)) continue; // stays for our reconnect
      clearTimeout(e.timer);
      this._pending.delete(id);
      other._pending.set(id, e);
      other._transmit(id, e);
    }
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

  /**
   * Asks the relay to close every other session of this key (REQUEST op 6,
   * EXCLUSIVE): they get NOTICE REPLACED and close 4026, and do not
   * reconnect. Resolves with how many it closed. For once; the `exclusive`
   * option asks after every (re)registration.
   */
  async exclusive() {
    const r = await this._request('exclusive', {});
    return r.closed;
  }

  /** The `exclusive` option: asks at once (first on the new connection) and reports the count. */
  _askExclusive(reconnected) {
    this._request('exclusive', {}).then(
      (r) => this._emit('exclusive', { closed: r.closed, reconnected }),
      (e) => {
        // connection_lost / closed: the next registration asks again.
        if (e.code !== 'connection_lost' && e.code !== 'closed' && this.readyState === OPEN) {
          this._emit('error', { code: e.code, message: `could not take over this key's other sessions: ${e.message}` });
        }
      },
    );
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
        else if (f.kind === 'delivered') this._emit('delivered', { id: f.id, to: f.address });
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
