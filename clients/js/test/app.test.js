// The chat app the relay serves at / (clients/js/demo/index.html), used
// through its UI in real headless Chromium (/usr/bin/chromium via
// playwright-core) against the Rust relay: conversations, unread counts,
// history in IndexedDB across reloads, key export/import, the phone layout,
// talking directly over a Spacerifts WebRTC link, and the relay key pinned
// per URL. Screenshots go to artifacts/ at the repository root.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, launchChromium, appFromDisk } from './chromium.js';
import { startRelay, stopAll, run, w2wBin } from './relay.js';

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { viewport: { width: 375, height: 812 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true };
const TITLE = 'w2w · messages';
const T = { timeout: 120000 };

describe('the chat app in headless Chromium', { timeout: 15 * 60 * 1000 }, () => {
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

  /**
   * The app in a fresh context (own storage → own identity), registered.
   * page.sentMsgs counts the MSG frames (type 0x10) it sent over WebSockets.
   */
  async function openApp({ viewport = DESKTOP, base = relay.http, ...extra } = {}) {
    const ctx = await browser.newContext({ viewport, ...extra });
    contexts.push(ctx);
    await appFromDisk(ctx);
    return openTab(ctx, base);
  }
  /** Another page of the app in `ctx`: another tab of that browser, with its identity (localStorage). */
  async function openTab(ctx, base = relay.http) {
    const page = await ctx.newPage();
    page.ctx = ctx;
    page.setDefaultTimeout(20000);
    page.errors = [];
    page.sentMsgs = 0;
    page.on('pageerror', (e) => page.errors.push(String(e)));
    page.on('console', (m) => {
      if (m.type() === 'error') page.errors.push(m.text());
    });
    page.on('websocket', (ws) =>
      ws.on('framesent', (f) => {
        if (typeof f.payload !== 'string' && f.payload[1] === 0x10) page.sentMsgs++;
      }),
    );
    await page.goto(base + '/');
    await online(page);
    page.address = (await page.textContent('#my-address')).trim();
    assert.match(page.address, /^[0-9a-f]{64}$/);
    return page;
  }
  const online = (page) => page.waitForSelector('#status[data-state="online"]');
  const conv = (page, id) => page.locator(`#conv-list .conv[data-conv="${id}"]`);
  const unread = async (page, id) => Number((await conv(page, id).locator('.unread').textContent()) || 0);

  /** Starts a chat with one person through the New chat dialog. */
  async function newDirect(page, address, name = '') {
    await page.click(page.viewportSize().width < 700 ? '#new-chat' : '#new-chat-top');
    await page.fill('#new-address', address);
    if (name) await page.fill('#new-name', name);
    await page.click('#new-start');
    await page.waitForFunction((n) => document.querySelector('#chat-title').textContent === n, name || `${address.slice(0, 6)}…${address.slice(-4)}`);
  }
  /** Runs `f`; if it fails, the error carries each page's system lines (what the app said). */
  async function explained(pages, f) {
    try {
      return await f();
    } catch (e) {
      const lines = await Promise.all(pages.map((p) => p.$$eval('#messages .sys', (l) => l.map((x) => x.textContent)).catch(() => [])));
      e.message += '\n' + lines.map((l, i) => `page ${i}: ${JSON.stringify(l)}`).join('\n') + `\nerrors: ${JSON.stringify(pages.flatMap((p) => p.errors))}`;
      throw e;
    }
  }
  /**
   * Two pages that know each other; A asks B to talk directly, B accepts
   * (with `forge`, B's proof of its key is forged, as a relay in between
   * would have to), then `until(a, b)` must come true; on failure the
   * error carries both pages' transcripts.
   */
  async function linkedPair(forge, until) {
    const perms = { permissions: ['camera', 'microphone'] }; // loopback ICE candidates (see ARGS in chromium.js)
    const a = await openApp(perms);
    const b = await openApp(perms);
    await newDirect(a, b.address, 'Bob');
    await newDirect(b, a.address, 'Alice');
    if (forge) {
      await b.evaluate(() => {
        const send = RTCDataChannel.prototype.send;
        RTCDataChannel.prototype.send = function (data) {
          if (typeof data === 'string' && data.includes('"t":"hello"')) data = JSON.stringify({ t: 'hello', sig: 'ab'.repeat(64) });
          return send.call(this, data);
        };
      });
    }
    await a.click('#talk-direct');
    await a.locator('#messages .sys:text("Asking Bob to talk directly")').waitFor();
    await b.locator('#messages .invite .accept-direct').click();
    await explained([a, b], () => until(a, b));
    return { a, b };
  }
  async function say(page, text) {
    await page.fill('#message', text);
    await page.click('#send');
    return page.locator('#messages .msg.out', { hasText: text }).last();
  }

  it('two pages chat in a conversation: unread counts, the title, nicknames, history after a reload, join/leave lines', T, async () => {
    const a = await openApp();
    const b = await openApp();
    const c = await openApp();
    // Every control has a name a screen reader can say (text, aria-label or a label).
    const unnamed = await a.evaluate(() =>
      [...document.querySelectorAll('button, input, textarea, a[href]')]
        .filter((e) => !(e.getAttribute('aria-label') || e.labels?.length || e.getAttribute('aria-labelledby') || e.textContent.trim()))
        .map((e) => e.outerHTML.slice(0, 80)),
    );
    assert.deepEqual(unnamed, []);
    // The Everyone room is there from the start; nothing else yet.
    assert.deepEqual(await a.locator('#conv-list .conv').evaluateAll((l) => l.map((e) => e.dataset.conv)), ['all']);

    await newDirect(a, b.address, 'Bob');
    const m1 = await say(a, 'Hello Bob, this is Alice');
    await m1.locator('.status-line[data-status="delivered"]').waitFor();
    assert.match(await m1.locator('.badge').textContent(), /encrypted/);

    // B (looking at another conversation) gets a new conversation with an unread count and a title.
    const fromA = `d:${a.address}`;
    await conv(b, fromA).waitFor();
    await b.waitForFunction(() => document.title === '(1) w2w · messages');
    assert.equal(await unread(b, fromA), 1);
    await say(a, 'Are you there?');
    await b.waitForFunction(() => document.title === '(2) w2w · messages');
    assert.equal(await unread(b, fromA), 2);
    assert.match(await conv(b, fromA).locator('.last').textContent(), /Are you there\?/);

    // B opens it: both messages in order, read now.
    await conv(b, fromA).click();
    await b.waitForFunction(() => document.querySelectorAll('#messages .msg.in').length === 2);
    assert.deepEqual(await b.locator('#messages .msg.in .body').allTextContents(), ['Hello Bob, this is Alice', 'Are you there?']);
    assert.equal(await b.title(), TITLE);
    assert.equal(await unread(b, fromA), 0);
    // B names A; the reply lands in A's open conversation without an unread count.
    await b.click('#rename');
    await b.fill('#rename-input', 'Alice');
    await b.click('#rename-save');
    await b.waitForFunction(() => document.querySelector('#chat-title').textContent === 'Alice');
    const r1 = await say(b, 'Hi Alice! Yes.');
    await r1.locator('.status-line[data-status="delivered"]').waitFor();
    await a.locator('#messages .msg.in .body', { hasText: 'Hi Alice! Yes.' }).waitFor();
    assert.equal(await unread(a, `d:${b.address}`), 0);
    assert.equal(await a.title(), TITLE);

    // A group of three: one conversation on every side, the sender named.
    await a.click('#new-chat-top');
    await a.click('#dlg-new .tab[data-kind="group"]');
    await a.fill('#new-members', `${b.address}\n${c.address}`);
    await a.fill('#new-name', 'Lunch');
    await a.click('#new-start');
    await a.waitForFunction(() => document.querySelector('#chat-title').textContent === 'Lunch');
    const g = await say(a, 'Lunch at noon?');
    await g.locator('.status-line:text("Delivered to all 2")').waitFor();
    const gid = `g:${[a.address, b.address, c.address].sort().join(',')}`;
    await conv(c, gid).waitFor();
    assert.equal(await unread(c, gid), 1);
    await conv(c, gid).click();
    assert.equal(await c.locator('#messages .msg.in .from').first().textContent(), `${a.address.slice(0, 6)}…${a.address.slice(-4)}`);
    await say(c, 'Count me in');
    await b.locator(`#conv-list .conv[data-conv="${gid}"] .last:text("Count me in")`).waitFor();
    assert.equal(await unread(b, gid), 2);
    assert.equal(await b.title(), '(2) w2w · messages');

    // A broadcast goes to the Everyone room of every page, signed.
    await conv(a, 'all').click();
    await say(a, 'Hello, everyone');
    await c.locator('#conv-list .conv[data-conv="all"] .last:text("Hello, everyone")').waitFor();

    await b.locator('#conv-list .conv[data-conv="all"] .last:text("Hello, everyone")').waitFor();
    await conv(a, `d:${b.address}`).click();
    await a.locator('#messages .msg .body:text("Hi Alice! Yes.")').waitFor();
    await a.screenshot({ path: path.join(ARTIFACTS, 'app-desktop.png') });
    assert.equal(await b.title(), '(3) w2w · messages');

    // A reload keeps every conversation, the nicknames and the history (IndexedDB).
    await b.reload();
    await online(b);
    assert.equal((await b.textContent('#my-address')).trim(), b.address);
    assert.equal(await conv(b, fromA).locator('.name').textContent(), 'Alice');
    assert.equal(await unread(b, gid), 2, 'unread counts survive a reload');
    assert.equal(await b.title(), '(3) w2w · messages');
    await conv(b, fromA).click();
    await b.waitForFunction(() => document.querySelectorAll('#messages .msg').length === 3);
    assert.deepEqual(await b.locator('#messages .msg .body').allTextContents(), ['Hello Bob, this is Alice', 'Are you there?', 'Hi Alice! Yes.']);
    assert.equal(await b.locator('#messages .msg.out .status-line').textContent(), 'Delivered');
    await conv(b, gid).click();
    await b.waitForFunction(() => document.querySelector('#chat-title').textContent === 'Lunch' || document.querySelectorAll('#messages .msg').length === 2);
    await b.locator('#messages .msg .body:text("Count me in")').waitFor();
    assert.deepEqual(await b.locator('#messages .msg .body').allTextContents(), ['Lunch at noon?', 'Count me in']);

    // Join/leave lines: A sees Bob leave and come back in their conversation.
    await conv(a, `d:${b.address}`).click();
    await a.locator('#chat-title:text("Bob")').waitFor();
    // Each change of presence adds one line; the last line and the header follow it.
    const lastLine = (text) => a.waitForFunction((x) => [...document.querySelectorAll('#messages .sys')].at(-1)?.textContent === x, text);
    await lastLine('Bob came online on this relay'); // after B's reload
    await b.close();
    await lastLine('Bob left');
    await a.waitForFunction(() => /offline/.test(document.querySelector('#chat-sub').textContent));
    const b2 = await b.ctx.newPage();
    b2.errors = [];
    b2.on('pageerror', (e) => b2.errors.push(String(e)));
    await b2.goto(relay.http + '/');
    await online(b2);
    await lastLine('Bob came online on this relay');
    assert.match(await a.textContent('#chat-sub'), /online on this relay/);

    assert.deepEqual([...a.errors, ...b.errors, ...b2.errors, ...c.errors], []);
    await closeContexts();
  });

  it('two tabs with one key both stay connected, both get live messages, and each shows what the other sent', T, async () => {
    const a1 = await openApp();
    const a2 = await openTab(a1.ctx); // the same browser: the same key from localStorage
    assert.equal(a2.address, a1.address);
    const c = await openApp(); // someone else
    // Record what each tab's socket sees: closes, reconnects, messages.
    const watch = (p) =>
      p.evaluate(() => {
        const s = window.w2w.socket;
        window.ends = [];
        window.got = [];
        window.receipts = [];
        s.addEventListener('close', (e) => window.ends.push(e.name));
        s.addEventListener('reconnecting', (e) => window.ends.push(e.name));
        s.addEventListener('message', (e) => window.got.push(e.text));
        s.addEventListener('receipt', (e) => window.receipts.push({ id: e.id, status: e.status, delivered: e.delivered }));
      });
    for (const p of [a1, a2, c]) await watch(p);
    const ends = (p) => p.evaluate(() => window.ends);
    await a1.waitForTimeout(3000);
    for (const p of [a1, a2]) {
      assert.deepEqual(await ends(p), [], 'neither tab was closed or replaced');
      assert.equal(await p.getAttribute('#status', 'data-state'), 'online');
    }

    // The other person writes: both tabs get it, once each, and show it.
    await newDirect(c, a1.address, 'Ann');
    const hello = await say(c, 'Hello, both tabs');
    await hello.locator('.status-line[data-status="delivered"]').waitFor();
    assert.deepEqual((await c.evaluate(() => window.receipts)).map((r) => [r.status, r.delivered]), [['delivered', 2]], 'both sessions acknowledged it');
    const fromC = `d:${c.address}`;
    for (const p of [a1, a2]) {
      await conv(p, fromC).waitFor();
      assert.equal(await unread(p, fromC), 1);
      assert.deepEqual(await p.evaluate(() => window.got), ['Hello, both tabs']);
    }

    // Tab 1 answers: tab 2 shows the answer in that conversation, with its receipt.
    await conv(a1, fromC).click();
    const answer = await say(a1, 'Answered from tab 1');
    await answer.locator('.status-line[data-status="delivered"]').waitFor();
    await conv(a2, fromC).click();
    await a2.locator('#messages .msg.out .body:text("Answered from tab 1")').waitFor();
    await a2.locator('#messages .msg.out .status-line[data-status="delivered"]').waitFor();
    await c.locator('#messages .msg.in .body:text("Answered from tab 1")').waitFor();
    // And tab 2 writes, seen in tab 1 (its conversation open).
    const more = await say(a2, 'And this from tab 2');
    await more.locator('.status-line[data-status="delivered"]').waitFor();
    await a1.locator('#messages .msg.out .body:text("And this from tab 2")').waitFor();
    const all = ['Hello, both tabs', 'Answered from tab 1', 'And this from tab 2'];
    for (const p of [a1, a2]) assert.deepEqual(await p.locator('#messages .msg .body').allTextContents(), all, 'each message once in each tab');
    assert.deepEqual(await c.locator('#messages .msg .body').allTextContents(), all);

    // The other person writes again to the open conversation: once in each tab.
    await say(c, 'Still both?');
    for (const p of [a1, a2]) await p.locator('#messages .msg.in .body:text("Still both?")').waitFor();
    await a1.waitForTimeout(500);
    for (const p of [a1, a2]) {
      assert.equal(await p.locator('#messages .msg .body:text("Still both?")').count(), 1);
      assert.deepEqual(await p.evaluate(() => window.got), ['Hello, both tabs', 'Still both?']);
      assert.deepEqual(await ends(p), []);
      assert.equal(await p.getAttribute('#status', 'data-state'), 'online');
    }
    // The stored history (one database for both tabs) has each message once.
    await a2.reload();
    await online(a2);
    await conv(a2, fromC).click();
    await a2.waitForFunction(() => document.querySelectorAll('#messages .msg').length >= 4);
    assert.deepEqual(await a2.locator('#messages .msg .body').allTextContents(), [...all, 'Still both?']);
    assert.deepEqual([...a1.errors, ...a2.errors, ...c.errors], []);
    await closeContexts();
  });

  it('past the relay\'s sessions per key, one more tab says so and waits; it connects when a tab closes', T, async () => {
    const small = await startRelay({ limits: { max_sessions: 2 } });
    try {
      const a1 = await openApp({ base: small.http });
      const a2 = await openTab(a1.ctx, small.http);
      const a3 = await a1.ctx.newPage();
      a3.setDefaultTimeout(20000);
      await a3.goto(small.http + '/');
      await a3.waitForSelector('#status[data-state="reconnecting"]');
      assert.match(await a3.textContent('#status-text'), /Too many tabs or devices use this identity/);
      for (const p of [a1, a2]) assert.equal(await p.getAttribute('#status', 'data-state'), 'online');
      await a2.close();
      await online(a3);
      assert.equal(await a1.getAttribute('#status', 'data-state'), 'online');
      assert.deepEqual(a1.errors, []);
      await closeContexts();
    } finally {
      await small.stop();
    }
  });

  it('a message Queued for someone offline turns Delivered when they come back (NOTICE DELIVERED)', T, async () => {
    const a = await openApp();
    const b = await openApp();
    const bAddr = b.address;
    const bCtx = b.ctx;
    await b.close(); // the same context (storage, identity) opens again below
    await newDirect(a, bAddr, 'Bea');
    const m = await say(a, 'while you were away');
    await m.locator('.status-line[data-status="queued"]').waitFor();
    // Bea comes back: her page takes the stored message and acknowledges it.
    const b2 = await bCtx.newPage();
    await b2.goto(relay.http + '/');
    await online(b2);
    assert.equal((await b2.textContent('#my-address')).trim(), bAddr);
    await b2.locator('#messages .msg.in, #conv-list .conv').first().waitFor();
    await m.locator('.status-line[data-status="delivered"]').waitFor();
    assert.deepEqual(a.errors, []);
    await closeContexts();
  });

  it('a key exported from one browser and imported into another is the same identity; nothing is replaced without a warning', T, async () => {
    const a = await openApp();
    await a.click('#open-me');
    await a.click('#export-key');
    const backup = await a.inputValue('#export-text');
    assert.match(backup, new RegExp(`address: ${a.address}`));
    assert.match(backup, /secret key: [0-9a-f]{64}/);
    await a.click('#me-close');
    await closeContexts(); // A goes away; its key goes to another browser below

    const d = await openApp();
    const before = d.address;
    await d.click('#open-me');
    // A damaged backup is refused with a reason.
    await d.fill('#import-text', backup.replace(/secret key: (.)/, (_, ch) => `secret key: ${ch === '0' ? '1' : '0'}`));
    await d.click('#import-key');
    assert.match(await d.textContent('#import-error'), /damaged/);
    // "New identity" warns first; cancelling keeps the key.
    await d.click('#new-identity');
    assert.match(await d.textContent('#confirm-text'), /will no longer be used here/);
    await d.click('#confirm-cancel');
    assert.equal((await d.textContent('#my-address')).trim(), before);
    // The real backup: a warning naming the current address, then the switch.
    await d.fill('#import-text', backup);
    await d.click('#import-key');
    assert.ok(await d.locator('#dlg-confirm').evaluate((e) => e.open));
    assert.match(await d.textContent('#confirm-text'), new RegExp(before.slice(0, 6)));
    await Promise.all([d.waitForEvent('load'), d.click('#confirm-ok')]);
    await online(d);
    assert.equal((await d.textContent('#my-address')).trim(), a.address);
    assert.equal(await d.evaluate(() => window.w2w.socket.address), a.address);
    // The replaced key was not destroyed: it is listed and can be switched back to.
    await d.click('#open-me');
    assert.equal(await d.locator('#prev-ids li').count(), 1);
    assert.match(await d.locator('#prev-ids li button').getAttribute('aria-label'), new RegExp(before));
    assert.deepEqual(d.errors, []);
    await closeContexts();
  });

  it('on a phone (375×812) the conversation list and new messages are in the lower part of the screen, with unread counts', T, async () => {
    const a = await openApp();
    const p = await openApp(PHONE);
    assert.equal(await p.getAttribute('#app', 'data-view'), 'list');
    await newDirect(a, p.address, 'Phone');
    await say(a, 'Welcome! This one is for your phone.');
    const row = conv(p, `d:${a.address}`);
    await row.waitFor();
    assert.equal(await unread(p, `d:${a.address}`), 1);
    assert.equal(await p.title(), '(1) w2w · messages');
    const inView = async (loc, what) => {
      const box = await loc.boundingBox();
      assert.ok(box, `${what} is shown`);
      assert.ok(box.y >= 0 && box.y + box.height <= 812, `${what} is on the screen: ${JSON.stringify(box)}`);
      return box;
    };
    const rowBox = await inView(row, 'the conversation');
    assert.ok(rowBox.y > 812 / 2, `the conversation list is in the lower half: ${JSON.stringify(rowBox)}`);
    assert.ok((await inView(p.locator('#new-chat'), 'New chat')).y > 700);

    await row.click();
    assert.equal(await p.getAttribute('#app', 'data-view'), 'chat');
    await p.click('#rename');
    await p.fill('#rename-input', 'Alice');
    await p.click('#rename-save');
    await p.locator('#chat-title:text("Alice")').waitFor();
    const first = p.locator('#messages .msg.in').last();
    assert.ok((await inView(first, 'the new message')).y > 812 / 2, 'the message is near the bottom');
    assert.ok((await inView(p.locator('#message'), 'the message field')).y > 700);
    assert.equal(await p.title(), TITLE);
    // Many messages later, the newest is still on screen, right above the field.
    for (let i = 1; i <= 12; i++) await say(a, `Line ${i} of a longer conversation`);
    const last = p.locator('#messages .msg.in .body', { hasText: 'Line 12 of a longer conversation' });
    await last.waitFor();
    await p.waitForTimeout(100);
    const lastBox = await inView(last, 'the newest message');
    assert.ok(lastBox.y > 600, `the newest message sits above the field: ${JSON.stringify(lastBox)}`);
    const reply = await say(p, 'Thanks, reading it on a small screen.');
    await reply.locator('.status-line[data-status="delivered"]').waitFor();
    const overflow = await p.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than the phone`);
    await p.screenshot({ path: path.join(ARTIFACTS, 'app-phone.png') });
    // Back in the list: the chat is on top, read.
    await p.click('#back');
    assert.equal(await unread(p, `d:${a.address}`), 0);
    await p.screenshot({ path: path.join(ARTIFACTS, 'app-phone-list.png') });
    assert.deepEqual([...a.errors, ...p.errors], []);
    await closeContexts();
  });

  it('"Talk directly" links two pages over WebRTC: the chat goes peer to peer, no message through the relay', T, async () => {
    const { a, b } = await linkedPair(false, async (a, b) => {
      await a.locator('#chat[data-p2p="true"]').waitFor({ timeout: 60000 });
      await b.locator('#chat[data-p2p="true"]').waitFor({ timeout: 60000 });
    });
    assert.match(await a.textContent('#chat-sub'), /Peer to peer/);
    await a.locator('#messages .sys:text("Now talking directly with Bob: peer to peer")').waitFor();

    const sent = a.sentMsgs + b.sentMsgs;
    const m = await say(a, 'This one goes browser to browser');
    await b.locator('#messages .msg.in .body:text("This one goes browser to browser")').waitFor();
    await m.locator('.status-line:text("Delivered peer to peer")').waitFor();
    assert.equal(await b.locator('#messages .msg.in').last().locator('.badge').textContent(), 'peer to peer');
    const back = await say(b, 'And back');
    await a.locator('#messages .msg.in .body:text("And back")').waitFor();
    await back.locator('.status-line:text("Delivered peer to peer")').waitFor();
    assert.equal(a.sentMsgs + b.sentMsgs, sent, 'no MSG frame went to the relay');
    assert.deepEqual(
      await Promise.all([a, b].map((p) => p.evaluate((peer) => window.w2w.links.get(peer)?.peerConnection.connectionState, p === a ? b.address : a.address))),
      ['connected', 'connected'],
    );
    // Closing the link falls back to the relay.
    await a.evaluate((peer) => window.w2w.links.get(peer).peerConnection.close(), b.address);
    await a.locator('#chat[data-p2p="false"]').waitFor();
    const via = await say(a, 'Through the relay again');
    await via.locator('.status-line[data-status="delivered"]').waitFor();
    assert.ok(a.sentMsgs > sent);
    assert.deepEqual([...a.errors, ...b.errors], []);
    await closeContexts();
  });

  it('"Talk directly" refuses a link whose other end does not prove the contact\'s key', T, async () => {
    const { a, b } = await linkedPair(true, (a) =>
      a.locator('#messages .sys.bad:text("someone may be in between")').waitFor({ timeout: 60000 }),
    );
    assert.equal(await a.getAttribute('#chat', 'data-p2p'), 'false');
    assert.equal(await a.evaluate((peer) => window.w2w.links.has(peer), b.address), false);
    const sent = a.sentMsgs;
    const m = await say(a, 'Still through the relay');
    await m.locator('.status-line[data-status="delivered"]').waitFor();
    assert.equal(a.sentMsgs, sent + 1);
    assert.deepEqual([...a.errors, ...b.errors], []);
    await closeContexts();
  });

  it('a relay presenting another key than the one pinned for its URL is refused, with a clear choice', T, async () => {
    const info = await (await fetch(`${relay.http}/.well-known/w2w`)).json();
    const p = await openApp();
    const url = `ws://127.0.0.1:${relay.port}/`;
    assert.deepEqual(await p.evaluate(() => JSON.parse(localStorage.getItem('w2w.relayKeys'))), { [url]: info.relay_key });
    // As if the relay at this URL had been replaced: another key is pinned for it.
    const fake = 'ab'.repeat(32);
    await p.evaluate(([u, k]) => localStorage.setItem('w2w.relayKeys', JSON.stringify({ [u]: k })), [url, fake]);
    await p.reload();
    await p.waitForSelector('#status[data-state="refused"]');
    await p.waitForSelector('#dlg-relay-key[open]');
    assert.equal(await p.textContent('#rk-old'), fake);
    assert.equal(await p.textContent('#rk-new'), info.relay_key);
    await p.click('#rk-refuse');
    await p.waitForTimeout(500);
    assert.equal(await p.getAttribute('#status', 'data-state'), 'refused', 'refusing keeps it disconnected');
    assert.match(await p.textContent('#banner'), /different key/);
    await p.click('#banner button');
    await p.click('#rk-accept');
    await online(p);
    assert.deepEqual(await p.evaluate(() => JSON.parse(localStorage.getItem('w2w.relayKeys'))), { [url]: info.relay_key });
    assert.deepEqual(p.errors, []);
    await closeContexts();
  });

  it('a contact on another relay of the federation shows as online there, and gets the messages', T, async () => {
    const other = await startRelay({ args: ['--peer', relay.url] });
    try {
      const perms = { permissions: ['camera', 'microphone'] };
      const a = await openApp(perms);
      const b = await openApp({ base: other.http, ...perms });
      await newDirect(a, b.address, 'Remote Bob');
      // Not on A's relay (ONLINE), so the app asks LOOKUP, which answers from the federation's
      // directory once the relays have peered. Opening the chat asks again.
      const where = `online via 127.0.0.1:${other.port}`;
      for (let i = 0; i < 30 && !(await a.textContent('#chat-sub')).includes(where); i++) {
        await a.waitForTimeout(1000);
        await conv(a, 'all').click();
        await conv(a, `d:${b.address}`).click();
      }
      assert.equal(await a.textContent('#chat-sub'), where);
      assert.equal(await conv(a, `d:${b.address}`).locator('.dot').getAttribute('data-presence'), 'remote');
      assert.equal(await a.locator('#online-list li').count(), 0, 'B is not on this relay');
      const m = await say(a, 'Hello across the federation');
      await m.locator('.status-line[data-status="delivered"]').waitFor();
      await conv(b, `d:${a.address}`).waitFor();
      assert.equal(await unread(b, `d:${a.address}`), 1);
      // Talking directly across relays: both meet at the inviter's relay.
      await conv(b, `d:${a.address}`).click();
      await a.click('#talk-direct');
      const invite = b.locator('#messages .invite');
      await invite.waitFor();
      assert.match(await invite.textContent(), new RegExp(`through their relay, 127\\.0\\.0\\.1:${relay.port}`));
      await invite.locator('.accept-direct').click();
      await a.locator('#chat[data-p2p="true"]').waitFor({ timeout: 60000 });
      await b.locator('#chat[data-p2p="true"]').waitFor({ timeout: 60000 });
      const sent = a.sentMsgs;
      await say(a, 'Peer to peer across the federation');
      await b.locator('#messages .msg.in .body:text("Peer to peer across the federation")').waitFor();
      assert.equal(a.sentMsgs, sent);
      assert.deepEqual([...a.errors, ...b.errors], []);
      await closeContexts();
    } finally {
      await other.stop();
    }
  });

  // Last: it restarts the relay.
  it('after a relay restart, "Reconnect now" connects at once', T, async () => {
    const a = await openApp();
    await a.evaluate(() => {
      window.retries = [];
      window.w2w.socket.addEventListener('reconnecting', (e) => window.retries.push({ delay: e.delay, at: Date.now() }));
    });
    await relay.proc.stop();
    await a.waitForSelector('#status[data-state="reconnecting"]');
    assert.ok(await a.isVisible('#reconnect-now'));
    // Wait for the backoff to grow: a retry just scheduled 2 s or more away.
    const n = await a.evaluate(() => window.retries.length);
    const retry = await (await a.waitForFunction((k) => window.retries.slice(k).find((r) => r.delay >= 2000), n, { timeout: 30000 })).jsonValue();
    assert.ok(retry.delay <= 3000, `retries at most 3 s apart (${retry.delay} ms)`);
    relay.proc = run(w2wBin, ['serve', '--listen', `127.0.0.1:${relay.port}`, '--data', path.join(relay.home, 'relay-data')], { home: relay.home });
    await relay.proc.waitFor('stdout', /listening on/, 20000, 'the relay to restart');
    const t0 = Date.now();
    await a.click('#reconnect-now');
    await online(a);
    const ms = Date.now() - t0;
    const early = retry.at + retry.delay - (await a.evaluate(() => Date.now()));
    console.log(`reconnected ${ms} ms after "Reconnect now", ${early} ms before the backoff would have retried`);
    assert.ok(ms < 1500, `reconnect took ${ms} ms`);
    assert.ok(early > 0, 'online before the scheduled retry: the button did it');
    assert.ok(await a.isHidden('#reconnect-now'));
    assert.deepEqual(a.errors.filter((e) => !/WebSocket connection to .* failed/.test(e)), []);
    await closeContexts();
  });
});
