// Spacerifts: WebRTC peer linking over the relay's HTTP port
// (PROTOCOL.md 16), and linkPeer, which makes a link and resolves with an
// open RTCDataChannel.

import { enc, ascii, toHex, fromHex } from './bytes.js';
import { Writer } from './frames.js';
import { Identity, verifyStrict } from './identity.js';
import { W2WError } from './socket.js';


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

/**
 * Keeps what arrives on `dc` until the application takes it: the other side
 * may send as soon as its end is open, before ours has resolved (the
 * answerer still waits for the relay's DELIVERED), and a message with no
 * listener yet would be lost. `dc.takeEarly()` returns the kept data, in
 * order, and stops keeping.
 */
function keepEarly(dc) {
  let early = [];
  const keep = (e) => early?.push(e.data);
  dc.addEventListener('message', keep);
  dc.takeEarly = () => {
    dc.removeEventListener('message', keep);
    const out = early ?? [];
    early = null;
    return out;
  };
  return dc;
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
 * (each HTTP request made: { type, nonce?, status, result, ms }). The other
 * side may send before this promise resolves: `ch.takeEarly()` returns what
 * came before you listened (call it once you have added your listener, in
 * the same task).
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
    const dc = keepEarly(pc.createDataChannel(label, channelOptions));
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, gatherTimeoutMs);
    return { pc, dc, signal: JSON.stringify(pc.localDescription) };
  };
  /** An answerer to `offerSignal`: PC, the coming channel, and the gathered answer. */
  const makeAnswer = async (offerSignal) => {
    const pc = newPc();
    const channel = new Promise((resolve) => {
      pc.addEventListener('datachannel', (e) => resolve(keepEarly(e.channel)), { once: true });
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
