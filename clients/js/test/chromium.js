// Headless Chromium for the browser tests (Debian's /usr/bin/chromium or
// W2W_CHROMIUM, driven by playwright-core). playwright's launch() makes a
// fresh temporary profile for every browser; each newContext() is an
// isolated, incognito-like profile (its own localStorage, so its own
// identity). Screenshots go to artifacts/ at the repository root.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { repo, withTimeout } from './relay.js';

export const CHROMIUM = process.env.W2W_CHROMIUM || '/usr/bin/chromium';
export const ARTIFACTS = path.join(repo, 'artifacts');
export const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // WebRTC host candidates with real addresses (not mDNS names), loopback
  // included: Chromium adds 127.0.0.1 only with this switch AND when the
  // origin holds a media permission (the Spacerifts tests' contexts grant
  // camera/microphone); without it a machine with only `lo` gathers nothing.
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--allow-loopback-in-peer-connection',
];

// A page whose document a route handler made (appFromDisk) counts as
// public, and Chromium's local network access checks then block its
// WebSocket to 127.0.0.1: in that mode they are off.
const ARGS_FROM_DISK = ARGS.map((a) => (a.startsWith('--disable-features=') ? a + ',LocalNetworkAccessChecks' : a));

/** Starts headless Chromium (and makes artifacts/), or says how to get it. */
export async function launchChromium() {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install -y chromium (or set W2W_CHROMIUM)`);
  const browser = await withTimeout(
    chromium.launch({ executablePath: CHROMIUM, headless: true, args: process.env.W2W_APP_FROM_DISK === '1' ? ARGS_FROM_DISK : ARGS, timeout: 60000 }),
    70000,
    'Chromium to start',
  );
  mkdirSync(ARTIFACTS, { recursive: true });
  return browser;
}

/**
 * With W2W_APP_FROM_DISK=1, pages of `ctx` get the app (/) and the bundle
 * (/w2w.js) from the working tree (clients/js/demo/index.html and
 * dist/w2w.js, as `npm run build` left it) instead of the copies the relay
 * binary embedded when it was built: to try edits of the app without
 * rebuilding the relay. Without it (the default), nothing changes.
 */
export async function appFromDisk(ctx) {
  if (process.env.W2W_APP_FROM_DISK !== '1') return;
  const file = (p) => readFileSync(path.join(repo, 'clients/js', p), 'utf8');
  // The relay's own response (its headers) with the file as the body.
  const serve = (name) => async (r) => r.fulfill({ response: await r.fetch(), body: file(name) });
  await ctx.route(/^http:\/\/127\.0\.0\.1:\d+\/(index\.html)?$/, serve('demo/index.html'));
  await ctx.route(/^http:\/\/127\.0\.0\.1:\d+\/w2w\.js$/, serve('dist/w2w.js'));
}
