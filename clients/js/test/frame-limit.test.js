// The frame limit (PROTOCOL.md 11.2): the JS client refuses a message whose
// MSG frame is over the relay's max_frame_bytes before sending it, learns the
// limit from the info document, and after a 1009 close (the relay refused a
// frame as too big) fails the oversized message once and never resends it,
// while the messages queued behind it still go out. Against the real Rust
// relay (`w2w serve`, limits set through --config).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocket } from 'ws';

import { W2WSocket, Identity, DEFAULT_MAX_FRAME_BYTES, MSG_FIXED_HEADER, infoUrl, fetchInfo } from '../src/w2w.js';
import { startRelay, withTimeout, stopAll } from './relay.js';

const T = { timeout: 60000 };
const SMALL_LIMIT = 8192;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Collects every event of `type` on `s`. */
function collect(s, type) {
  const out = [];
  s.addEventListener(type, (e) => out.push(e));
  return out;
}

/** Waits until `pred()` holds (polling), within `ms`. */
async function until(pred, ms, what) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * A `ws` WebSocket that counts what the client does: connections opened and
 * the size of every binary message sent (MSG frames are type byte 0x10).
 */
function countingWebSocket() {
  const counts = { connections: 0, msgSizes: [] };
  class Counting extends WebSocket {
    constructor(...args) {
      super(...args);
      counts.connections++;
    }
    send(data, ...rest) {
      const b = data instanceof Uint8Array ? data : new Uint8Array(data);
      if (b[1] === 0x10) counts.msgSizes.push(b.length);
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: Counting, counts };
}

const isTooLarge = (e) => e instanceof Error && e.code === 'frame_too_large';

describe('the frame limit', { timeout: 10 * 60 * 1000 }, () => {
  let relay; // default limits (1 MiB)
  let small; // max_frame_bytes = SMALL_LIMIT
  const sockets = [];
  const connect = async (r, opts = {}, identity = Identity.generate()) => {
    const s = new W2WSocket(r.url, identity, { WebSocket, ...opts });
    sockets.push(s);
    await withTimeout(s.ready(), 15000, 'registration');
    return s;
  };
  /** The next message event on `s` whose text is `text`. */
  const received = (s, text, ms = 15000) =>
    withTimeout(
      new Promise((resolve) => {
        const h = (e) => {
          if (e.text === text) {
            s.removeEventListener('message', h);
            resolve(e);
          }
        };
        s.addEventListener('message', h);
      }),
      ms,
      `the message ${JSON.stringify(text)}`,
    );

  before(async () => {
    [relay, small] = await Promise.all([startRelay(), startRelay({ limits: { max_frame_bytes: SMALL_LIMIT } })]);
  });
  after(async () => {
    for (const s of sockets) s.close();
    await sleep(100);
    await Promise.all([relay?.stop(), small?.stop()]);
    await stopAll();
  });

  it('the info document is found from the ws URL and publishes the limit', T, async () => {
    assert.equal(infoUrl(small.url), `${small.http}/.well-known/w2w`);
    assert.equal(infoUrl('wss://relay.example/some/path'), 'https://relay.example/.well-known/w2w');
    const doc = await fetchInfo(small.url);
    assert.equal(doc.limits.max_frame_bytes, SMALL_LIMIT);
    assert.equal((await fetchInfo(relay.url)).limits.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES);
  });

  it('a message over the limit is refused locally with frame_too_large; the next one is delivered', T, async () => {
    const { WebSocket: WS, counts } = countingWebSocket();
    const alice = await connect(relay, { WebSocket: WS });
    const bob = await connect(relay);
    const reconnecting = collect(alice, 'reconnecting');
    assert.equal(alice.maxFrameBytes, DEFAULT_MAX_FRAME_BYTES);

    // Over the limit before sealing: refused without sealing it.
    const huge = new Uint8Array(DEFAULT_MAX_FRAME_BYTES + 1);
    await assert.rejects(alice.send(bob.address, huge), (e) => {
      assert.ok(isTooLarge(e), `code ${e.code}`);
      assert.equal(e.name, 'W2WError');
      assert.equal(e.limit, DEFAULT_MAX_FRAME_BYTES);
      assert.match(e.message, /1048576 bytes/);
      assert.match(e.message, /split it or send a smaller payload/);
      return true;
    });
    // Under the limit as plaintext but over it once sealed (padding, key
    // slots): the check is on the encoded frame.
    const sealedOver = new Uint8Array(DEFAULT_MAX_FRAME_BYTES - 200);
    const p = alice.send(bob.address, sealedOver);
    assert.match(p.id, /^[0-9a-f]{32}$/);
    await assert.rejects(p, (e) => {
      assert.ok(isTooLarge(e), `code ${e.code}`);
      assert.ok(e.size > DEFAULT_MAX_FRAME_BYTES, `size ${e.size}`);
      assert.match(e.message, new RegExp(`${e.size} bytes as a MSG frame`));
      assert.match(e.message, /after sealing/);
      assert.match(e.message, /limit of 1048576 bytes/);
      return true;
    });
    // A plain a2b frame of exactly the limit is accepted by the relay; one
    // byte more is refused here.
    const exact = DEFAULT_MAX_FRAME_BYTES - MSG_FIXED_HEADER - 32;
    await assert.rejects(alice.send(bob.address, new Uint8Array(exact + 1), { plain: true }), isTooLarge);
    const got = withTimeout(
      new Promise((resolve) => bob.addEventListener('message', (e) => e.data.length === exact && resolve(e))),
      20000,
      'the message of exactly the limit',
    );
    const r0 = await alice.send(bob.address, new Uint8Array(exact).fill(7), { plain: true });
    assert.equal(r0.status, 'delivered');
    await got;

    // Nothing of the refused ones went out or waits to go: the next message is delivered at once.
    const hello = received(bob, 'after the refused ones');
    const r = await alice.send(bob.address, 'after the refused ones');
    assert.equal(r.status, 'delivered');
    await hello;
    assert.deepEqual(counts.msgSizes.filter((n) => n > DEFAULT_MAX_FRAME_BYTES), []);
    assert.equal(counts.connections, 1);
    assert.equal(reconnecting.length, 0);
    assert.equal(alice.readyState, W2WSocket.OPEN);
  });

  it('the limit is read from the info document: a smaller relay limit refuses locally, no 1009', T, async () => {
    const { WebSocket: WS, counts } = countingWebSocket();
    const alice = await connect(small, { WebSocket: WS });
    const bob = await connect(small);
    await until(() => alice.maxFrameBytes === SMALL_LIMIT, 10000, 'the info document limit');
    assert.equal(alice.info.limits.max_frame_bytes, SMALL_LIMIT);
    const reconnecting = collect(alice, 'reconnecting');
    await assert.rejects(alice.send(bob.address, new Uint8Array(SMALL_LIMIT)), (e) => {
      assert.ok(isTooLarge(e));
      assert.equal(e.limit, SMALL_LIMIT);
      assert.match(e.message, /8192 bytes/);
      return true;
    });
    const hello = received(bob, 'small enough');
    assert.equal((await alice.send(bob.address, 'small enough')).status, 'delivered');
    await hello;
    assert.deepEqual(counts.msgSizes.filter((n) => n > SMALL_LIMIT), []);
    assert.equal(reconnecting.length, 0);
    assert.equal(counts.connections, 1);
  });

  it('a relay limit smaller than known: the 1009 fails the message once, it is not resent, later ones go', T, async () => {
    // The client believes 1 MiB and does not ask the relay.
    const { WebSocket: WS, counts } = countingWebSocket();
    const alice = await connect(small, { WebSocket: WS, fetchInfo: false, maxFrameBytes: DEFAULT_MAX_FRAME_BYTES });
    const bob = await connect(small);
    const reconnecting = collect(alice, 'reconnecting');
    const big = alice.send(bob.address, new Uint8Array(20000).fill(1));
    const behind = alice.send(bob.address, 'queued behind the big one');
    const hello = received(bob, 'queued behind the big one');

    const err = await withTimeout(big.then(() => null, (e) => e), 20000, 'the big message to fail');
    assert.ok(err, 'the oversized message must not be delivered');
    assert.equal(err.code, 'frame_too_large');
    assert.match(err.message, /1009/);
    assert.match(err.message, /not sent again/);
    const bigSize = err.size;
    assert.ok(bigSize > SMALL_LIMIT);
    assert.ok(alice.maxFrameBytes < bigSize, `the known limit is lowered (now ${alice.maxFrameBytes})`);

    const r = await withTimeout(behind, 20000, 'the message behind it');
    assert.equal(r.status, 'delivered');
    await hello;
    // A later message is delivered too.
    const later = received(bob, 'a later message');
    assert.equal((await alice.send(bob.address, 'a later message')).status, 'delivered');
    await later;
    // A message as big as the refused one is now refused locally.
    await assert.rejects(alice.send(bob.address, new Uint8Array(20000)), isTooLarge);

    await sleep(1500); // a resend loop would show here
    assert.equal(counts.msgSizes.filter((n) => n === bigSize).length, 1, `sent sizes ${counts.msgSizes}`);
    assert.equal(counts.connections, 2, 'one reconnect after the 1009, no more');
    assert.equal(reconnecting.length, 1);
    assert.equal(reconnecting[0].code, 1009);
    assert.equal(reconnecting[0].name, 'frame_too_large');
    assert.equal(alice.readyState, W2WSocket.OPEN);
  });

  it('after a 1009 the info document is read again when it could not be at first', T, async () => {
    const { WebSocket: WS, counts } = countingWebSocket();
    let calls = 0;
    const flaky = (url, init) => {
      calls++;
      if (calls === 1) return Promise.reject(new TypeError('network down'));
      return fetch(url, init);
    };
    const alice = await connect(small, { WebSocket: WS, fetch: flaky });
    const bob = await connect(small);
    await until(() => calls >= 1, 5000, 'the first info fetch');
    await sleep(50);
    assert.equal(alice.maxFrameBytes, DEFAULT_MAX_FRAME_BYTES, 'the failed fetch leaves the default');
    assert.equal(alice.info, null);

    const big = alice.send(bob.address, new Uint8Array(12000));
    const behind = alice.send(bob.address, 'behind, again');
    const hello = received(bob, 'behind, again');
    await assert.rejects(withTimeout(big, 20000, 'the big message to fail'), (e) => {
      assert.ok(isTooLarge(e));
      assert.equal(e.limit, SMALL_LIMIT, 'the limit re-read from the info document');
      return true;
    });
    assert.equal(calls, 2);
    assert.equal(alice.maxFrameBytes, SMALL_LIMIT);
    assert.equal((await withTimeout(behind, 20000, 'the message behind it')).status, 'delivered');
    await hello;
    await sleep(1000);
    assert.equal(counts.msgSizes.filter((n) => n > SMALL_LIMIT).length, 1);
    assert.equal(counts.connections, 2);
  });

  it('several oversized messages and no info document: each fails, none loops, the rest go', T, async () => {
    const { WebSocket: WS, counts } = countingWebSocket();
    const alice = await connect(small, { WebSocket: WS, fetchInfo: false });
    const bob = await connect(small);
    const errs = [];
    const big1 = alice.send(bob.address, new Uint8Array(20000)).catch((e) => errs.push(['big1', e]));
    const big2 = alice.send(bob.address, new Uint8Array(12000)).catch((e) => errs.push(['big2', e]));
    const hello = received(bob, 'last in line', 30000);
    const last = alice.send(bob.address, 'last in line');
    assert.equal((await withTimeout(last, 30000, 'the small message')).status, 'delivered');
    await hello;
    await Promise.all([big1, big2]);
    assert.deepEqual(errs.map(([n, e]) => [n, e.code]).sort(), [['big1', 'frame_too_large'], ['big2', 'frame_too_large']]);
    await sleep(1500);
    const sizes = counts.msgSizes.filter((n) => n > SMALL_LIMIT);
    // big1 (the largest) goes once; big2 at most twice (on the wire behind big1, then once more).
    assert.ok(sizes.length <= 3, `oversized sends ${sizes}`);
    assert.ok(counts.connections <= 3, `${counts.connections} connections`);
    const big2Size = errs.find(([n]) => n === 'big2')[1].size;
    assert.ok(alice.maxFrameBytes < big2Size, `limit ${alice.maxFrameBytes}, big2 is ${big2Size} bytes`);
    assert.equal(alice.readyState, W2WSocket.OPEN);
  });
});
