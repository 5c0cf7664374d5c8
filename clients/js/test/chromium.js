// Headless Chromium for the browser tests (Debian's /usr/bin/chromium or
// W2W_CHROMIUM, driven by playwright-core). playwright's launch() makes a
// fresh temporary profile for every browser; each newContext() is an
// isolated, incognito-like profile (its own localStorage, so its own
// identity). Screenshots go to artifacts/ at the repository root.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
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

/** Starts headless Chromium (and makes artifacts/), or says how to get it. */
export async function launchChromium() {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install -y chromium (or set W2W_CHROMIUM)`);
  const browser = await withTimeout(
    chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS, timeout: 60000 }),
    70000,
    'Chromium to start',
  );
  mkdirSync(ARTIFACTS, { recursive: true });
  return browser;
}
