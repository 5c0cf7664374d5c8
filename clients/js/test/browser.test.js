// Real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) against the Rust relay serving the demo app at / and the
// bundle at /w2w.js. Screenshots go to artifacts/ at the repository root.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import path from 'node:path';
import { ARTIFACTS, launchChromium, appFromDisk } from './chromium.js';

import { startRelay, stopAll, repo } from './relay.js';

const T = { timeout: 90000 };

describe('in headless Chromium', { timeout: 15 * 60 * 1000 }, () => {
  let relay;
  let browser;
  const contexts = [];
  const closeContexts = async () => {
    await Promise.all(contexts.splice(0).map((c) => c.close().catch(() => {})));
  };

  before(async () => {
    relay = await startRelay();
    browser = await launchChromium();
  });
  after(async () => {
    await closeContexts();
    await browser?.close().catch(() => {});
    await relay?.stop();
    await stopAll();
  });

  /** A page in its own context (own storage → own identity), with its console errors collected. */
  async function openPage(pathname = '/', viewport = { width: 1280, height: 860 }, extra = {}) {
    const ctx = await browser.newContext({ viewport, ...extra });
    contexts.push(ctx);
    await appFromDisk(ctx);
    const page = await ctx.newPage();
    page.setDefaultTimeout(20000);
    page.errors = [];
    page.on('pageerror', (e) => page.errors.push(String(e)));
    page.on('console', (m) => {
      // A plain-text page has no icon: the browser's /favicon.ico 404 is not ours.
      if (m.type() === 'error' && !m.location()?.url?.endsWith('/favicon.ico')) page.errors.push(m.text());
    });
    await page.goto(relay.http + pathname);
    return page;
  }

  async function openDemo(viewport, extra) {
    const page = await openPage('/', viewport, extra);
    await page.waitForSelector('#status[data-state="online"]');
    page.address = (await page.textContent('#my-address')).trim();
    assert.match(page.address, /^[0-9a-f]{64}$/);
    return page;
  }

  it('the relay serves the committed bundle at /w2w.js', T, async () => {
    const res = await fetch(`${relay.http}/w2w.js`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /javascript/);
    const served = await res.text();
    const committed = readFileSync(path.join(repo, 'clients/js/dist/w2w.js'), 'utf8');
    assert.ok(served === committed, 'the relay serves an older dist/w2w.js: rebuild it (cargo build -p w2w)');
  });

  it('two pages exchange end-to-end messages with the W2WSocket API', T, async () => {
    const setup = async (page) =>
      page.evaluate(async () => {
        const { W2WSocket, Identity } = await import('/w2w.js');
        const me = Identity.generate();
        const url = location.origin.replace(/^http/, 'ws') + '/';
        const sock = new W2WSocket(url, me);
        window.sock = sock;
        window.inbox = [];
        sock.onmessage = (e) => window.inbox.push({ from: e.from, text: e.text, route: e.route, sealed: e.sealed, signed: e.signed, verified: e.verified });
        await sock.ready();
        return me.address;
      });
    const a = await openPage('/healthz');
    const b = await openPage('/healthz');
    const addrA = await setup(a);
    const addrB = await setup(b);

    const receipt = await a.evaluate((to) => window.sock.send(to, 'sealed hello from page A'), addrB);
    assert.equal(receipt.status, 'delivered');
    await b.waitForFunction(() => window.inbox.length >= 1);
    assert.deepEqual(await b.evaluate(() => window.inbox[0]), {
      from: addrA, text: 'sealed hello from page A', route: 'a2b', sealed: true, signed: false, verified: true,
    });

    const r2 = await b.evaluate((list) => window.sock.send(list, 'group reply'), [addrA, addrB]);
    assert.equal(r2.status, 'delivered');
    assert.equal(r2.entries.length, 2);
    await a.waitForFunction(() => window.inbox.some((m) => m.text === 'group reply'));
    await b.waitForFunction(() => window.inbox.some((m) => m.text === 'group reply'));

    const r3 = await a.evaluate(() => window.sock.send('*', 'signed broadcast'));
    assert.equal(r3.status, 'delivered');
    await b.waitForFunction(() => window.inbox.some((m) => m.text === 'signed broadcast' && m.signed && m.verified));

    const online = await a.evaluate(() => window.sock.online());
    assert.ok(online.includes(addrA) && online.includes(addrB));

    // The identity survives a reload (localStorage).
    const kept = async () => b.evaluate(async () => (await import('/w2w.js')).Identity.loadOrCreate('test.identity').address);
    const first = await kept();
    await b.reload();
    assert.equal(await kept(), first);
    assert.deepEqual([...a.errors, ...b.errors], []);
    await closeContexts();
  });

  it('two pages link through Spacerifts (3 HTTP round trips) and talk over an RTCDataChannel, not through the relay', T, async () => {
    // A media permission lets Chromium expose loopback host candidates (see ARGS in chromium.js).
    const perms = { permissions: ['camera', 'microphone'] };
    const a = await openPage('/healthz', undefined, perms); // origin = the relay
    const b = await openPage('/healthz', undefined, perms);
    const http = { a: [], b: [] };
    const sockets = { a: 0, b: 0 };
    for (const [name, page] of [['a', a], ['b', b]]) {
      page.on('request', (r) => http[name].push(`${r.method()} ${new URL(r.url()).pathname}`));
      page.on('websocket', () => sockets[name]++);
    }
    const link = (page) =>
      page.evaluate(async () => {
        const { linkPeer, Identity } = await import('/w2w.js');
        const me = Identity.generate();
        const ch = await linkPeer(location.origin, 'test-ns', { identity: me, iceServers: [] });
        window.ch = ch;
        window.inbox = [];
        ch.onmessage = (e) => window.inbox.push(e.data);
        return { me: me.address, peer: ch.peer, role: ch.role, state: ch.readyState, requests: ch.requests };
      });
    const [la, lb] = await Promise.all([link(a), link(b)]);
    assert.equal(la.peer, lb.me);
    assert.equal(lb.peer, la.me);
    assert.deepEqual([la.state, lb.state], ['open', 'open']);
    assert.deepEqual([la.role, lb.role].sort(), ['answerer', 'offerer']);
    const [offerer, answerer] = la.role === 'offerer' ? [la, lb] : [lb, la];
    // One link = 3 HTTP round trips: the offerer's CONNECT (long poll → ANSWER),
    // the answerer's CONNECT (→ DEMOTE) and CONNECT with nonce+answer (→ DELIVERED).
    assert.deepEqual(offerer.requests.map((r) => [r.type, r.status, r.result]), [['CONNECT', 200, 'ANSWER']]);
    assert.deepEqual(answerer.requests.map((r) => [r.type, r.status, r.result, !!r.nonce]), [
      ['CONNECT', 200, 'DEMOTE', false],
      ['CONNECT', 200, 'DELIVERED', true],
    ]);
    const posts = [...http.a, ...http.b].filter((r) => r === 'POST /spacerift');
    assert.equal(posts.length, 3, `HTTP round trips for one link: ${JSON.stringify(http)}`);
    console.log(`one Spacerifts link took ${posts.length} HTTP round trips (offerer ${offerer.requests.length}, answerer ${answerer.requests.length})`);

    // Both ways over the data channel; the pages make no request to the relay meanwhile.
    const before = http.a.length + http.b.length;
    await a.evaluate(() => window.ch.send('ping from A over WebRTC'));
    await b.waitForFunction(() => window.inbox.length >= 1);
    await b.evaluate(() => window.ch.send('pong from B over WebRTC'));
    await a.waitForFunction(() => window.inbox.length >= 1);
    assert.deepEqual(await b.evaluate(() => window.inbox), ['ping from A over WebRTC']);
    assert.deepEqual(await a.evaluate(() => window.inbox), ['pong from B over WebRTC']);
    assert.equal(http.a.length + http.b.length, before, 'no HTTP to the relay while the peers talk');
    assert.deepEqual(sockets, { a: 0, b: 0 }, 'no WebSocket to the relay');

    // The path the data took: on both sides the selected ICE candidate pair,
    // and every pair that carried bytes, is host ↔ host on this machine's
    // own addresses: no TURN ("relay") candidate, nothing via the relay's port.
    const route = (page) =>
      page.evaluate(async () => {
        const stats = await window.ch.peerConnection.getStats();
        const end = (id) => {
          const x = stats.get(id);
          return { type: x.candidateType, address: x.address ?? x.ip, port: x.port, protocol: x.protocol };
        };
        const pair = (p) => ({ local: end(p.localCandidateId), remote: end(p.remoteCandidateId), bytesSent: p.bytesSent ?? 0, bytesReceived: p.bytesReceived ?? 0 });
        let selected = null;
        const used = [];
        stats.forEach((s) => {
          if (s.type === 'transport' && s.selectedCandidatePairId) selected = pair(stats.get(s.selectedCandidatePairId));
          if (s.type === 'candidate-pair' && (s.bytesSent > 0 || s.bytesReceived > 0)) used.push(pair(s));
        });
        return { selected, used };
      });
    // Stats are sampled: ask again (≤ 5 s) until both sides have counted
    // bytes both ways. (With several host candidates each, the two sides'
    // selected pairs need not be mirror images: both are checked.)
    let ra;
    let rb;
    const total = (r, k) => r.used.reduce((n, p) => n + p[k], 0);
    for (let i = 0; i < 50; i++) {
      [ra, rb] = [await route(a), await route(b)];
      if ([ra, rb].every((r) => r.selected && total(r, 'bytesSent') > 0 && total(r, 'bytesReceived') > 0)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const mine = new Set(['127.0.0.1', '::1', ...Object.values(networkInterfaces()).flat().map((i) => i.address)]);
    for (const r of [ra, rb]) {
      assert.ok(r.selected, 'a selected candidate pair');
      assert.ok(total(r, 'bytesSent') > 0 && total(r, 'bytesReceived') > 0, JSON.stringify(r));
      for (const p of [r.selected, ...r.used]) {
        for (const e of [p.local, p.remote]) {
          assert.equal(e.type, 'host', JSON.stringify(r));
          assert.ok(mine.has(e.address), `${e.address} is not an address of this machine: ${JSON.stringify(r)}`);
          assert.notEqual(e.port, relay.port);
        }
      }
    }
    const show = (p) => `${p.local.protocol} ${p.local.address}:${p.local.port} -> ${p.remote.address}:${p.remote.port}`;
    console.log(`data path (selected pairs, host/host): A ${show(ra.selected)}; B ${show(rb.selected)}`);

    await Promise.all([a, b].map((p) => p.evaluate(() => window.ch.peerConnection.close())));
    assert.deepEqual([...a.errors, ...b.errors], []);
    await closeContexts();
  });
  // The chat app at / is used through its UI in app.test.js.
});

// Remove stale screenshots only when asked (they are gitignored).
if (process.env.W2W_CLEAN_ARTIFACTS === '1') rmSync(ARTIFACTS, { recursive: true, force: true });
