// W2WHomes against real federated relay processes (PROTOCOL.md 7.7, 12.5,
// 12.6): one key listening at relays A and B at once gets every message
// through both and gives it to the application once, and keeps receiving
// (and sending) when one of the relays is SIGKILLed.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocket } from 'ws';

import { W2WHomes, W2WSocket, Identity } from '../src/w2w.js';
import { startRelay, withTimeout, stopAll } from './relay.js';

const T = { timeout: 120000 };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A value of the relay's /metrics, or null. */
async function metric(relay, name) {
  try {
    const text = await (await fetch(`${relay.http}/metrics`)).text();
    const m = text.match(new RegExp(`^${name} (\\S+)$`, 'm'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** Polls `check` (async, truthy when done) every 100 ms, for at most `ms`. */
async function eventually(what, check, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(100);
  }
}

/** Sends probes from `sender` until one is acknowledged by both of `to`'s relays. */
async function untilBothHomes(sender, to) {
  let last;
  await eventually(
    `a probe delivered at both relays (last receipt: ${JSON.stringify(last)})`,
    async () => {
      last = await sender.send(to, 'probe');
      return last.status === 'delivered' && last.delivered === 2;
    },
    30000,
  );
}

/** Records every message the application and each socket get, by text. */
function record(homes) {
  const app = new Map(); // text → times given to the application
  const perSocket = homes.sockets.map(() => new Set());
  homes.onmessage = (e) => app.set(e.text, (app.get(e.text) ?? 0) + 1);
  homes.sockets.forEach((s, i) => s.addEventListener('message', (e) => perSocket[i].add(e.text)));
  return { app, perSocket };
}

describe('W2WHomes: one key at two federated relays', { timeout: 10 * 60 * 1000 }, () => {
  let a;
  let b;
  let c;
  const closeLater = [];
  const connect = async (relay, opts = {}) => {
    const s = new W2WSocket(relay.url, Identity.generate(), { WebSocket, ...opts });
    closeLater.push(s);
    await withTimeout(s.ready(), 20000, `registration at ${relay.url}`);
    return s;
  };
  const homesAt = async (relays, identity = Identity.generate()) => {
    const h = new W2WHomes(relays.map((r) => r.url), identity, { WebSocket });
    closeLater.push(h);
    await withTimeout(Promise.all(h.sockets.map((s) => s.ready())), 20000, 'both registrations');
    return h;
  };

  before(async () => {
    // A; B dials A; C dials both: every pair is linked directly.
    a = await startRelay();
    b = await startRelay({ args: ['--peer', a.url] });
    c = await startRelay({ args: ['--peer', a.url, '--peer', b.url] });
    for (const r of [a, b, c]) {
      await eventually(`${r.url} to know the two other relays`, async () => (await metric(r, 'w2w_known_relays')) === 2);
    }
  });
  after(async () => {
    for (const s of closeLater) s.close();
    await sleep(100);
    await Promise.all([a, b, c].map((r) => r?.stop()));
    await stopAll();
  });

  it('the API: URLs are checked before anything connects, and the events of every socket come through', T, async () => {
    const me = Identity.generate();
    assert.throws(() => new W2WHomes([], me), TypeError);
    assert.throws(() => new W2WHomes([a.url, 'http://x/'], me), TypeError);
    assert.throws(() => new W2WHomes([a.url, a.url.replace(/\/$/, '')], me), /listed twice/);
    assert.throws(() => new W2WHomes([a.url], 'not an identity'), TypeError);

    const h = new W2WHomes([a.url, { url: b.url, reconnect: false }], me, { WebSocket });
    assert.equal(h.readyState, W2WHomes.CONNECTING);
    assert.equal(h.sockets.length, 2);
    assert.equal(h.sockets[1].opts.reconnect, false, 'per-relay options');
    assert.equal(h.address, me.address);
    const opened = [];
    h.onopen = (e) => opened.push(e);
    await withTimeout(h.ready(), 20000, 'the first registration');
    await withTimeout(Promise.all(h.sockets.map((s) => s.ready())), 20000, 'both registrations');
    assert.equal(h.readyState, W2WHomes.OPEN);
    assert.equal(opened.length, 1, 'open once: when the first socket opens');
    assert.ok(h.sockets.includes(opened[0].socket));
    assert.equal(opened[0].target, h);
    // Each socket asks its own relay.
    assert.deepEqual(await h.sockets[0].online(), [me.address]);
    assert.deepEqual(await h.sockets[1].online(), [me.address]);
    // Sending goes through the first open socket; its receipt comes as an event too.
    const receipts = [];
    h.onreceipt = (e) => receipts.push(e);
    const r = await h.send(Identity.generate().address, 'nobody');
    assert.equal(r.status, 'no_route');
    assert.equal(receipts.length, 1);
    assert.equal(receipts[0].socket, h.sockets[0]);
    assert.equal(receipts[0].id, r.id);
    const closed = new Promise((resolve) => (h.onclose = resolve));
    h.close();
    const e = await withTimeout(closed, 10000, 'close');
    assert.equal(h.readyState, W2WHomes.CLOSED);
    assert.deepEqual(e.closed.map((x) => x.url).sort(), [a.url, b.url].sort());
    await assert.rejects(h.ready(), (err) => err.code === 'closed');
    await assert.rejects(h.send(me.address, 'x'), (err) => err.code === 'closed');
  });

  it('each message reaches both relays and the application once; every receipt is delivered', T, async () => {
    const homes = await homesAt([a, b]);
    const got = record(homes);
    const sender = await connect(c); // a third relay: both legs are forwarded
    const t0 = Date.now();
    await untilBothHomes(sender, homes.address);
    const probed = Date.now() - t0;
    const bodies = Array.from({ length: 50 }, (_, i) => `a-${i}`);
    const t1 = Date.now();
    const receipts = await withTimeout(Promise.all(bodies.map((m) => sender.send(homes.address, m))), 60000, 'the receipts');
    const receiptMs = Date.now() - t1;
    assert.deepEqual(
      receipts.filter((r) => r.status !== 'delivered'),
      [],
      'every receipt is delivered',
    );
    await eventually('all 50 at the application', () => bodies.every((m) => got.app.has(m)), 20000);
    await eventually('all 50 through both relays', () => got.perSocket.every((s) => bodies.every((m) => s.has(m))), 20000);
    await sleep(1000); // no late copy
    for (const m of bodies) assert.equal(got.app.get(m), 1, `${m} given to the application once`);
    assert.ok(homes.stats.duplicates >= 50, `the copies through the other relay were dropped (${homes.stats.duplicates})`);
    const counts = {};
    for (const r of receipts) counts[r.delivered] = (counts[r.delivered] ?? 0) + 1;
    console.log(
      `# both homes known after ${probed} ms; 50 receipts in ${receiptMs} ms; receipts by "delivered" count: ${JSON.stringify(counts)}; duplicates dropped: ${homes.stats.duplicates}`,
    );
  });

  it('sending: messages without a receipt when their relay dies go again through the other', T, async () => {
    // Its own relay D, linked to B, so that killing it leaves A, B and C alone.
    const d = await startRelay({ args: ['--peer', b.url] });
    try {
      await eventually('D to be linked', async () => (await metric(d, 'w2w_peer_links')) >= 1);
      const recipient = await connect(b);
      const got = new Map();
      recipient.onmessage = (e) => got.set(e.text, (got.get(e.text) ?? 0) + 1);
      const homes = await homesAt([d, b]);
      // The recipient is on B: until D knows that, D answers no_route.
      await eventually('D to know where the recipient is', async () => (await homes.sockets[0].lookup(recipient.address)) !== null);
      // Which socket each receipt came through.
      const via = new Map();
      homes.onreceipt = (e) => via.set(e.id, homes.sockets.indexOf(e.socket));
      const sends = [];
      for (let i = 0; i < 10; i++) {
        sends.push(homes.send(recipient.address, `s-${i}`));
        await sleep(10);
      }
      // Twenty at once through D, and D dies before it can answer them.
      for (let i = 10; i < 30; i++) sends.push(homes.send(recipient.address, `s-${i}`));
      // (The burst's: one of the ten before may still wait for its receipt
      // on a loaded machine.)
      const throughD = sends.slice(10).filter((p) => homes.sockets[0]._pending.has(p.id)).length;
      d.proc.kill('SIGKILL');
      for (let i = 30; i < 40; i++) {
        sends.push(homes.send(recipient.address, `s-${i}`));
        await sleep(10);
      }
      const t0 = Date.now();
      const results = await withTimeout(Promise.allSettled(sends), 90000, 'the receipts');
      const ms = Date.now() - t0;
      const bad = results
        .map((r, i) => ({ i, r: r.status === 'fulfilled' ? r.value : { error: r.reason?.code ?? String(r.reason) } }))
        .filter(({ r }) => r.status !== 'delivered');
      assert.deepEqual(bad, [], 'every send through the homes is delivered, the ones D had not answered through B');
      await eventually('all 40 at the recipient', () => sends.every((_, i) => got.has(`s-${i}`)), 20000);
      await sleep(1000);
      for (let i = 0; i < 40; i++) assert.equal(got.get(`s-${i}`), 1, `s-${i} once`);
      const handedOver = sends.slice(10, 30).filter((p) => via.get(p.id) === 1).length;
      assert.equal(throughD, 20, 'the burst went through D, the first open socket');
      assert.equal(handedOver, 20, 'answered through B: D died before answering any of them');
      assert.equal(homes.readyState, W2WHomes.OPEN);
      assert.equal(homes.sockets[0].readyState, W2WSocket.CONNECTING, 'the socket at D keeps trying');
      console.log(`# 40 sends, D killed right after a burst of 20 through it: every receipt delivered (the burst's through B), the last ${ms} ms after the last send; copies the recipient dropped (D had forwarded them before it died): ${recipient.stats.duplicates}`);
    } finally {
      await d.stop();
    }
  });

  // Last: it kills A.
  it('A is SIGKILLed in the middle of a stream: every receipted message arrives once, none is refused', T, async () => {
    const homes = await homesAt([a, b]);
    const got = record(homes);
    const sender = await connect(b); // at B: one local leg, one forwarded to A
    await untilBothHomes(sender, homes.address);
    const N = 100;
    const sends = [];
    let killedAt = 0;
    const t0 = Date.now();
    const send = (i) => {
      const sentAt = Date.now();
      sends.push(
        sender.send(homes.address, `b-${i}`).then(
          (r) => ({ i, sentAt, at: Date.now(), r }),
          (e) => ({ i, sentAt, at: Date.now(), error: e.code ?? String(e) }),
        ),
      );
    };
    for (let i = 0; i < N; i++) {
      if (i >= 10 && i < 30) {
        // A burst of twenty at once, and A dies while B forwards them to it.
        send(i);
        if (i === 29) {
          a.proc.kill('SIGKILL');
          killedAt = Date.now();
        }
        continue;
      }
      send(i);
      if (i % 5 === 4) await sleep(10);
    }
    const results = await withTimeout(Promise.all(sends), 90000, 'the receipts');
    const rel = (t) => t - killedAt;
    const refused = results.filter((x) => x.error || (x.r.status !== 'delivered' && x.r.status !== 'queued'));
    assert.deepEqual(
      refused.map((x) => ({ i: x.i, sentMsAfterKill: rel(x.sentAt), receiptMsAfterKill: rel(x.at), error: x.error, ...x.r })),
      [],
      'no receipt is no_route or rejected while B is up',
    );
    const promised = results.map((x) => `b-${x.i}`);
    await eventually('every receipted message at the application', () => promised.every((m) => got.app.has(m)), 30000);
    await sleep(1500); // no second copy comes later
    for (const m of promised) assert.equal(got.app.get(m), 1, `${m} given to the application once`);
    assert.equal(homes.readyState, W2WHomes.OPEN, 'B still open');
    assert.equal(homes.sockets[1].readyState, W2WSocket.OPEN);
    assert.equal(homes.sockets[0].readyState, W2WSocket.CONNECTING, 'the socket at A keeps trying');
    const byStatus = {};
    for (const x of results) {
      const k = `${x.i < 10 ? 'before' : x.i < 30 ? 'burst at' : 'after'} kill: ${x.r.status}/${x.r.delivered}`;
      byStatus[k] = (byStatus[k] ?? 0) + 1;
    }
    const slowest = Math.max(...results.map((x) => x.at - x.sentAt));
    const burst = results.slice(10, 30).map((x) => x.at - x.sentAt);
    const later = Math.max(...results.slice(30).map((x) => x.at - x.sentAt));
    console.log(
      `# ${N} sent over ${Date.now() - t0} ms, A killed right after a burst of 20 (10th to 29th); receipts: ${JSON.stringify(byStatus)}; slowest receipt ${slowest} ms, the burst's ${Math.min(...burst)}-${Math.max(...burst)} ms, the later ones' at most ${later} ms; through A before it died: ${got.perSocket[0].size}, through B: ${got.perSocket[1].size}`,
    );
  });
});
