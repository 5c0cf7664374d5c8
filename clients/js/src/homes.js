// W2WHomes: one identity at several relays at once (redundancy, PROTOCOL.md
// 7.7). A federation sends a message for an address to every relay where
// the address is online, so an identity registered at two relays keeps
// receiving while either is up; it also gets each message once per relay.
// W2WHomes holds one W2WSocket per relay and gives the application each
// message once. Like crates/w2w-client/src/homes.rs.

import { Identity } from './identity.js';
import { Emitter, LruSet, W2WSocket, W2WError } from './socket.js';

const { CONNECTING, OPEN, CLOSING, CLOSED } = W2WSocket;

/** A copy of a socket's event for our own listeners (its getters, e.g. `text`, stay lazy). */
function copyEvent(e) {
  const ev = Object.create(Object.getPrototypeOf(e), Object.getOwnPropertyDescriptors(e));
  ev.socket = e.target; // the relay it came through
  return ev;
}

/**
 * Receiving sessions of one identity at several relays.
 *
 *   const homes = new W2WHomes(['wss://a.example/', 'wss://b.example/'], me, { WebSocket });
 *   homes.onmessage = (e) => console.log(e.from, e.text); // once, whichever relay was first
 *   await homes.ready();                                  // one relay is enough
 *   await homes.send(friend, 'hi');                       // through the first open relay
 *   await homes.sockets[1].lookup(friend);                // ask one relay something
 *
 * `urls`: relay URLs, each a string or { url, ...options } with options
 * for that relay's socket only (e.g. its pinnedRelayKey). `opts` are
 * W2WSocket options for every socket; `dedupe` (default 10,000) is also
 * how many (id, from) pairs W2WHomes remembers.
 *
 * Each socket acknowledges what it receives itself, so every relay deletes
 * its copy, and reconnects by itself (W2WSocket). Messages are sent
 * through the first open socket. A message whose socket loses its
 * connection before the receipt is sent again, with its id, through
 * another open one (the recipient drops the repeat); one sent while no
 * socket is open waits in the first that is not closed and goes through
 * whichever opens first.
 *
 * Properties: `sockets` (one W2WSocket per URL, in order: ask each relay
 * things, listen to its own events), `identity`, `address`, `readyState`
 * (OPEN if any socket is, CLOSED when all are for good), `stats`
 * ({ received, duplicates }: messages given to the application, and
 * copies dropped because another relay brought them first).
 *
 * Events (on<name> or addEventListener), each with `socket`, the W2WSocket
 * it came from:
 *   open     the socket's open event, when one opens while none was open
 *   message  the socket's message event, each (from, id) once
 *   receipt, delivered, error   as on W2WSocket, from any socket
 *   close    { code, reason, name, wasClean, closed } once, when every
 *            socket is closed for good: code … wasClean of the last one,
 *            `closed` the { url, code, name } of each
 */
export class W2WHomes extends Emitter {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  constructor(urls, identity, opts = {}) {
    super();
    if (!Array.isArray(urls) || urls.length === 0) throw new TypeError('urls must be a non-empty array of relay URLs');
    if (!(identity instanceof Identity)) throw new TypeError('identity must be an Identity');
    this.identity = identity;
    this.address = identity.address;
    this._seen = new LruSet(opts.dedupe ?? 10000);
    this._open = false;
    this._closing = false;
    this._closed = [];
    this.stats = { received: 0, duplicates: 0 };
    this.onopen = this.onmessage = this.onreceipt = this.ondelivered = this.onerror = this.onclose = null;
    const entries = urls.map((u) => (typeof u === 'object' && !(u instanceof URL) ? { ...u } : { url: u }));
    // Checked before any socket starts connecting, so that none is left behind.
    const hrefs = entries.map((e) => {
      const u = new URL(e.url);
      if (!/^wss?:$/.test(u.protocol)) throw new TypeError('each relay URL must be ws:// or wss://');
      return u.href;
    });
    // Two sockets at one relay would be two sessions there, not redundancy.
    const twice = hrefs.find((h, i) => hrefs.indexOf(h) !== i);
    if (twice) throw new TypeError(`the relay ${twice} is listed twice`);
    this.sockets = entries.map(({ url, ...own }) => new W2WSocket(url, identity, { ...opts, ...own }));
    for (const s of this.sockets) this._watch(s);
  }

  /** Listens to a socket (with addEventListener: its on<name> properties stay the application's). */
  _watch(s) {
    s.addEventListener('open', (e) => {
      // Messages waiting in sockets that are down go through this one.
      for (const o of this.sockets) if (o !== s) o._handOver(s);
      if (!this._open) {
        this._open = true;
        this._emit('open', copyEvent(e));
      }
    });
    s.addEventListener('reconnecting', () => {
      const other = this.sockets.find((o) => o.readyState === OPEN);
      if (other) s._handOver(other);
      this._open = !!other;
    });
    s.addEventListener('message', (e) => {
      const key = e.from + e.id;
      if (this._seen.has(key)) {
        this.stats.duplicates++; // the same message through another relay
        return;
      }
      this._seen.add(key);
      this.stats.received++;
      this._emit('message', copyEvent(e));
    });
    for (const type of ['receipt', 'delivered', 'error']) s.addEventListener(type, (e) => this._emit(type, copyEvent(e)));
    s.addEventListener('close', (e) => {
      this._closed.push({ url: s.url, code: e.code, name: e.name });
      this._open = this.sockets.some((o) => o.readyState === OPEN);
      if (this._closed.length === this.sockets.length) {
        const { code, reason, name, wasClean } = e;
        this._emit('close', { code, reason, name, wasClean, closed: this._closed, socket: s });
      }
    });
  }

  get readyState() {
    if (this.sockets.some((s) => s.readyState === OPEN)) return OPEN;
    if (this.sockets.every((s) => s.readyState === CLOSED)) return CLOSED;
    return this._closing ? CLOSING : CONNECTING;
  }

  /** Resolves when one socket is registered (at once if one is); rejects when all are closed. */
  ready() {
    return Promise.any(this.sockets.map((s) => s.ready())).catch(() => {
      throw new W2WError('closed', 'every relay connection is closed');
    });
  }

  /**
   * W2WSocket.send through the first open socket; while none is open,
   * through the first that is not closed (the message waits there and goes
   * through whichever socket opens first). The promise carries `.id`.
   */
  send(to, data, options = {}) {
    const s =
      this.sockets.find((o) => o.readyState === OPEN) ??
      this.sockets.find((o) => o.readyState === CONNECTING) ??
      this.sockets[0];
    return s.send(to, data, options);
  }

  /** Closes every socket; `close` follows when all have. */
  close(code = 1000, reason = '') {
    this._closing = true;
    for (const s of this.sockets) s.close(code, reason);
  }
}
