// Spacerifts (WebRTC peer linking over POST /spacerift): the request
// signature against a fixed vector whose byte layout is written out here by
// hand (and checked with Node's own Ed25519, not only @noble's), and the
// signalling against the real Rust relay with opaque signals (no WebRTC in
// Node: the browser test links two real Chromium pages).
import { describe, it, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createPrivateKey, createPublicKey, sign as nodeSign, verify as nodeVerify } from 'node:crypto';

import {
  Identity, spaceriftMessage, signSpaceriftRequest, verifySpaceriftRequest, spaceriftUrl,
  spaceriftRequest, SPACERIFT_DOMAIN, SPACERIFT_STATUS, toHex, fromHex, linkPeer, W2WError, reportRtt,
} from '../src/w2w.js';
import { startRelay, stopAll } from './relay.js';

// ------------------------------------------------------------------ the vector

const SEED = '07'.repeat(32);
const KEY = 'ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c';
const REQ = {
  type: 'CONNECT',
  namespace: 'test-ns',
  nonce: '00112233445566778899aabbccddeeff',
  signal: '{"type":"offer","sdp":"v=0"}',
  ts: 1700000000123,
};
// The signed bytes, field by field.
const LAYOUT = [
  ['domain "w2w/v1 spacerift\\0"', '7732772f76312073706163657269667400'],
  ['u8 len(type) = 7', '07'],
  ['type "CONNECT"', '434f4e4e454354'],
  ['u16 BE len(namespace) = 7', '0007'],
  ['namespace "test-ns"', '746573742d6e73'],
  ['u8 len(nonce bytes) = 16', '10'],
  ['nonce (hex-decoded)', '00112233445566778899aabbccddeeff'],
  ['u32 BE len(signal) = 28', '0000001c'],
  ['signal (UTF-8)', '7b2274797065223a226f66666572222c22736470223a22763d30227d'],
  ['u64 BE ts = 1700000000123', '0000018bcfe5687b'],
];
const EXPECTED = LAYOUT.map(([, h]) => h).join('');

/** Node's own Ed25519 (OpenSSL), from the raw 32-byte seed / public key. */
const nodePriv = (seedHex) =>
  createPrivateKey({ key: Buffer.from('302e020100300506032b657004220420' + seedHex, 'hex'), format: 'der', type: 'pkcs8' });
const nodePub = (keyHex) =>
  createPublicKey({ key: Buffer.from('302a300506032b6570032100' + keyHex, 'hex'), format: 'der', type: 'spki' });

test('spaceriftMessage: the byte layout of the signed message, field by field', () => {
  const got = toHex(spaceriftMessage(REQ));
  let at = 0;
  for (const [what, h] of LAYOUT) {
    assert.equal(got.slice(at, at + h.length), h, what);
    at += h.length;
  }
  assert.equal(got.length, at, 'no trailing bytes');
  assert.equal(got, EXPECTED);
  assert.equal(toHex(SPACERIFT_DOMAIN), LAYOUT[0][1]);
});

test('spaceriftMessage: no nonce, empty namespace, UTF-8 lengths in bytes', () => {
  assert.equal(
    toHex(spaceriftMessage({ type: 'BOUNCE', namespace: '', signal: 'é', ts: 1 })),
    '7732772f76312073706163657269667400' + '06' + '424f554e4345' + '0000' + '00' + '00000002' + 'c3a9' + '0000000000000001',
  );
  // A namespace of 2 characters that is 4 bytes; a signal with a NUL.
  assert.equal(
    toHex(spaceriftMessage({ type: 'CONNECT', namespace: 'ñü', nonce: 'ab', signal: 'a\0b', ts: 2 ** 40 })),
    '7732772f76312073706163657269667400' + '07' + '434f4e4e454354' + '0004' + 'c3b1c3bc' + '01' + 'ab' +
      '00000003' + '610062' + '0000010000000000',
  );
  assert.throws(() => spaceriftMessage({ ...REQ, type: 'DEMOTE' }), /type/);
  assert.throws(() => spaceriftMessage({ ...REQ, namespace: 'x'.repeat(65) }), /namespace/);
  assert.throws(() => spaceriftMessage({ ...REQ, nonce: 'abc' }), /hex/);
  assert.throws(() => spaceriftMessage({ ...REQ, signal: 'x'.repeat(32 * 1024 + 1) }), /signal/);
  assert.throws(() => spaceriftMessage({ ...REQ, ts: -1 }), /ts/);
  spaceriftMessage({ ...REQ, namespace: 'x'.repeat(64), signal: 'x'.repeat(32 * 1024) }); // the maxima are allowed
});

test('signSpaceriftRequest: the request body and its signature (checked with Node crypto)', () => {
  const id = Identity.fromSeedHex(SEED);
  assert.equal(id.address, KEY);
  const body = signSpaceriftRequest(id, REQ);
  assert.deepEqual(Object.keys(body), ['type', 'namespace', 'signal', 'nonce', 'key', 'ts', 'sig']);
  assert.equal(body.key, KEY);
  assert.equal(body.ts, REQ.ts);
  assert.equal(body.nonce, REQ.nonce);
  assert.match(body.sig, /^[0-9a-f]{128}$/);
  // Ed25519 is deterministic: OpenSSL signing the hand-written bytes gives the same signature.
  const msg = Buffer.from(EXPECTED, 'hex');
  assert.equal(body.sig, nodeSign(null, msg, nodePriv(SEED)).toString('hex'));
  assert.equal(
    body.sig,
    '5275115edca9031d7cb7b6c8e15370b3b7dfc86d5c5f483d984b71f87309a80001f1ce5248ceb7d91a7dda5f532c9d02c618fd1ae7616803981dab8b4a9bbc05',
  );
  assert.ok(nodeVerify(null, msg, nodePub(KEY), Buffer.from(body.sig, 'hex')));
  assert.ok(verifySpaceriftRequest(body));

  // Every signed field is covered: changing any one breaks the signature.
  for (const [field, value] of [
    ['type', 'BOUNCE'], ['namespace', 'test-nt'], ['namespace', ''], ['nonce', '00112233445566778899aabbccddeefe'],
    ['nonce', undefined], ['signal', REQ.signal + ' '], ['ts', REQ.ts + 1],
    ['key', Identity.fromSeedHex('08'.repeat(32)).address],
  ]) {
    assert.equal(verifySpaceriftRequest({ ...body, [field]: value }), false, `${field} → ${value}`);
  }

  // No nonce: the field is left out of the body.
  const first = signSpaceriftRequest(id, { type: 'CONNECT', namespace: '', signal: 'offer', ts: 1700000000000 });
  assert.equal('nonce' in first, false);
  assert.ok(nodeVerify(
    null,
    Buffer.from('7732772f76312073706163657269667400' + '07434f4e4e454354' + '0000' + '00' + '00000005' + '6f66666572' + '0000018bcfe56800', 'hex'),
    nodePub(KEY),
    Buffer.from(first.sig, 'hex'),
  ));
});

test('spaceriftUrl: ws/wss/http/https relay URLs → …/spacerift', () => {
  assert.equal(spaceriftUrl('ws://127.0.0.1:8080/'), 'http://127.0.0.1:8080/spacerift');
  assert.equal(spaceriftUrl('wss://relay.example'), 'https://relay.example/spacerift');
  assert.equal(spaceriftUrl('http://127.0.0.1:8080'), 'http://127.0.0.1:8080/spacerift');
  assert.equal(spaceriftUrl('https://relay.example/w2w/'), 'https://relay.example/w2w/spacerift');
  assert.equal(spaceriftUrl('https://relay.example/spacerift'), 'https://relay.example/spacerift');
});

test('linkPeer refuses without WebRTC or with a bad namespace, before any request', async () => {
  let calls = 0;
  const fetch = async () => {
    calls++;
    throw new Error('no');
  };
  await assert.rejects(linkPeer('http://x', 'ns', { fetch, RTCPeerConnection: undefined }), (e) => e instanceof W2WError && e.code === 'no_webrtc');
  await assert.rejects(linkPeer('http://x', 'x'.repeat(65), { fetch, RTCPeerConnection: class {} }), /namespace/);
  assert.equal(calls, 0);
});

// ------------------------------------------------------------------ the real relay

describe('against the Rust relay (opaque signals)', { timeout: 10 * 60 * 1000 }, () => {
  let relay;
  before(async () => {
    relay = await startRelay();
  });
  after(async () => {
    await relay?.stop();
    await stopAll();
  });

  const post = (id, fields) => spaceriftRequest(relay.http, signSpaceriftRequest(id, fields));
  const raw = async (body, contentType = 'application/json') => {
    const res = await fetch(`${relay.http}/spacerift`, { method: 'POST', headers: { 'content-type': contentType }, body });
    return { status: res.status, body: await res.json().catch(() => null) };
  };

  it('RTT reports are signed and recorded (best-latency rotation); a malformed one is refused', async () => {
    const me = Identity.generate();
    const peer = Identity.generate();
    const r = await reportRtt(relay.http, me, peer.address, 42.4);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.type, 'NOTED');
    await new Promise((res) => setTimeout(res, 1100)); // 1 request/s per key
    const bad = await spaceriftRequest(relay.http, signSpaceriftRequest(me, { type: 'RTT', signal: 'not-a-report' }));
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error, 'bad_request');
  });

  it('CONNECT → DEMOTE → CONNECT(nonce) → DELIVERED, and the waiting CONNECT gets the ANSWER: 3 round trips', async () => {
    const alice = Identity.generate();
    const bob = Identity.generate();
    const ns = 'node-' + toHex(fromHex(alice.address).subarray(0, 4));
    let trips = 0;
    const p = (id, f) => {
      trips++;
      return post(id, f);
    };
    const waiting = p(alice, { type: 'CONNECT', namespace: ns, signal: 'offer from alice' });
    await new Promise((r) => setTimeout(r, 300)); // Alice's offer is queued first
    const d = await p(bob, { type: 'CONNECT', namespace: ns, signal: 'offer from bob' });
    assert.equal(d.status, 200, JSON.stringify(d.body));
    assert.equal(d.body.type, 'DEMOTE');
    assert.equal(d.body.signal, 'offer from alice');
    assert.equal(d.body.peer, alice.address);
    assert.match(d.body.nonce, /^[0-9a-f]+$/);
    const done = await p(bob, { type: 'CONNECT', namespace: ns, nonce: d.body.nonce, signal: 'answer from bob' });
    assert.equal(done.status, 200, JSON.stringify(done.body));
    assert.equal(done.body.type, 'DELIVERED');
    const a = await waiting;
    assert.equal(a.status, 200, JSON.stringify(a.body));
    assert.deepEqual({ type: a.body.type, signal: a.body.signal, peer: a.body.peer }, { type: 'ANSWER', signal: 'answer from bob', peer: bob.address });
    assert.equal(trips, 3);

    // The nonce is single-use.
    await new Promise((r) => setTimeout(r, 1100));
    const again = await post(bob, { type: 'CONNECT', namespace: ns, nonce: d.body.nonce, signal: 'answer again' });
    assert.equal(again.status, 409, JSON.stringify(again.body));
    assert.equal(again.body.error, 'bad_nonce');
  });

  it('refuses bad signatures, stale timestamps and missing parameters with the documented codes', async () => {
    const me = Identity.generate();
    const good = signSpaceriftRequest(me, { type: 'CONNECT', namespace: 'x', signal: 's' });

    const forged = { ...good, signal: 't' };
    let r = await raw(JSON.stringify(forged));
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error, 'bad_signature');

    r = await raw(JSON.stringify(signSpaceriftRequest(me, { type: 'CONNECT', namespace: 'x', signal: 's', ts: Date.now() - 120000 })));
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error, 'stale_timestamp');

    for (const field of ['type', 'signal', 'key', 'ts', 'sig']) {
      const body = { ...good };
      delete body[field];
      r = await raw(JSON.stringify(body));
      assert.equal(r.status, SPACERIFT_STATUS.missing_parameter, `${field}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error, 'missing_parameter', field);
      assert.equal(r.body.detail, field);
    }
    r = await raw(JSON.stringify({ ...signSpaceriftRequest(me, { type: 'BOUNCE', namespace: 'x', signal: 's' }) }));
    assert.equal(r.status, SPACERIFT_STATUS.missing_parameter, `BOUNCE without nonce: ${JSON.stringify(r.body)}`);
    assert.equal(r.body.detail, 'nonce');

    r = await raw('{not json');
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error, 'bad_request');

    const stranger = await post(me, { type: 'CONNECT', namespace: 'x', nonce: '00'.repeat(16), signal: 's' });
    assert.equal(stranger.status, 409, JSON.stringify(stranger.body));
    assert.equal(stranger.body.error, 'bad_nonce');
  });

  it('a lone CONNECT waits ~15 s and gets 298 (namespace) / 299 (none); a second request within 1 s gets 297', async () => {
    const me = Identity.generate();
    const other = Identity.generate();
    const t0 = Date.now();
    const first = post(me, { type: 'CONNECT', namespace: 'lonely-' + me.address.slice(0, 8), signal: 's' });
    await new Promise((r) => setTimeout(r, 100));
    const fast = await post(me, { type: 'CONNECT', namespace: 'elsewhere', signal: 's' });
    assert.equal(fast.status, SPACERIFT_STATUS.rate_limited, JSON.stringify(fast.body));
    assert.equal(fast.body.error, 'rate_limited');
    assert.ok(typeof fast.body.retry_after === 'number' && fast.body.retry_after > 0, JSON.stringify(fast.body));
    const none = post(other, { type: 'CONNECT', namespace: '', signal: 's' });
    const r = await first;
    const waited = Date.now() - t0;
    assert.equal(r.status, SPACERIFT_STATUS.no_namespace_peer, JSON.stringify(r.body));
    assert.equal(r.body.error, 'no_namespace_peer');
    assert.ok(waited > 13000 && waited < 20000, `waited ${waited} ms`);
    const n = await none;
    assert.equal(n.status, SPACERIFT_STATUS.no_peer, JSON.stringify(n.body));
    assert.equal(n.body.error, 'no_peer');
  });

  it('linkPeer (with a stand-in RTCPeerConnection): BOUNCE when DEMOTEd to a peer it is already linked to', async () => {
    const [alice, bob, carol, dave] = [0, 1, 2, 3].map(() => Identity.generate());
    const ns = 'bounce-' + alice.address.slice(0, 8);
    const sent = [];
    const opts = (identity, more = {}) => ({
      identity, RTCPeerConnection: FakePC, onRequest: (r) => sent.push({ who: identity.address, ...r }), ...more,
    });
    const next = (n) => waitFor(() => sent.length >= n, `${n} requests`);
    const firstSent = fakeFirstPost(); // resolves when a CONNECT is parked at the relay
    const pa = linkPeer(relay.http, ns, opts(alice));
    await firstSent;
    // Bob is already linked to Alice: her offer comes back to the queue and his waits.
    const pb = linkPeer(relay.http, ns, opts(bob, { linked: [alice.address] }));
    await next(1); // Bob's CONNECT → DEMOTE (Alice's offer)
    assert.deepEqual([sent[0].who, sent[0].result], [bob.address, 'DEMOTE']);
    await sleepMs(300); // Bob's BOUNCE is parked now
    const pc = linkPeer(relay.http, ns, opts(carol)); // Carol gets Alice's (older) offer
    const chC = await pc;
    const chA = await pa;
    assert.equal(chC.peer, alice.address);
    assert.equal(chA.peer, carol.address);
    const chD = await linkPeer(relay.http, ns, opts(dave)); // …and Dave gets Bob's
    const chB = await pb;
    assert.deepEqual([chB.peer, chD.peer], [dave.address, bob.address]);
    assert.deepEqual(chB.requests.map((r) => [r.type, r.status, r.result, !!r.nonce]), [
      ['CONNECT', 200, 'DEMOTE', false],
      ['BOUNCE', 200, 'ANSWER', true],
    ]);
    assert.deepEqual([chA.role, chB.role, chC.role, chD.role], ['offerer', 'offerer', 'answerer', 'answerer']);
    assert.equal(chA.requests.length + chC.requests.length, 3, 'one link, three round trips');

    // Right after a link, a key may not pair again for 5 s: linkPeer waits out
    // the 297 (retry_after) and then, alone in a fresh namespace, gives up
    // after its one attempt with the relay's 298.
    const t0 = Date.now();
    const own = [];
    await assert.rejects(
      linkPeer(relay.http, 'alone-' + alice.address.slice(0, 8), { ...opts(alice), attempts: 1, onRequest: (r) => own.push(r) }),
      (e) => e instanceof W2WError && e.code === 'no_namespace_peer',
    );
    assert.ok(own.length >= 2, JSON.stringify(own));
    assert.deepEqual(own.slice(0, -1).map((r) => r.status), own.slice(0, -1).map(() => 297));
    assert.equal(own.at(-1).status, 298);
    assert.ok(Date.now() - t0 > 15000);
  });
});

// ------------------------------------------------------------------ a stand-in for WebRTC

const sleepMs = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(cond, what, ms = 20000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleepMs(20);
  }
}
/** Resolves shortly after the next fake offer is made (its CONNECT is then on the way). */
function fakeFirstPost() {
  return new Promise((resolve) => {
    FakePC.onOffer = () => {
      FakePC.onOffer = null;
      setTimeout(resolve, 300);
    };
  });
}

class FakeChannel extends EventTarget {
  constructor(label) {
    super();
    this.label = label;
    this.readyState = 'connecting';
  }
  _open() {
    this.readyState = 'open';
    this.dispatchEvent(new Event('open'));
  }
  send() {}
}

/**
 * Just enough of RTCPeerConnection for linkPeer's signalling: SDPs are
 * names, and applying an answer opens the channel on both sides.
 */
class FakePC extends EventTarget {
  static byDescription = new Map();
  static count = 0;
  static onOffer = null;
  constructor(config) {
    super();
    assert.deepEqual(config.iceServers, []);
    this.id = ++FakePC.count;
    this.iceGatheringState = 'new';
    this.connectionState = 'new';
  }
  createDataChannel(label) {
    this.dc = new FakeChannel(label);
    return this.dc;
  }
  async createOffer() {
    FakePC.onOffer?.();
    return { type: 'offer', sdp: `offer ${this.id}` };
  }
  async createAnswer() {
    return { type: 'answer', sdp: `answer ${this.id} to ${this.remoteDescription.sdp}` };
  }
  async setLocalDescription(d) {
    this.localDescription = d;
    FakePC.byDescription.set(d.sdp, this);
    setTimeout(() => {
      this.iceGatheringState = 'complete';
      this.dispatchEvent(new Event('icegatheringstatechange'));
    }, 5);
  }
  async setRemoteDescription(d) {
    this.remoteDescription = d;
    if (d.type !== 'answer') return;
    const answerer = FakePC.byDescription.get(d.sdp);
    assert.ok(answerer, `no answerer made ${d.sdp}`);
    assert.equal(answerer.remoteDescription.sdp, this.localDescription.sdp, 'the answer answers this offer');
    const ch = new FakeChannel(this.dc.label);
    answerer.dispatchEvent(Object.assign(new Event('datachannel'), { channel: ch }));
    setTimeout(() => {
      this.connectionState = answerer.connectionState = 'connected';
      this.dc._open();
      ch._open();
    }, 5);
  }
  close() {
    this.connectionState = 'closed';
  }
}
