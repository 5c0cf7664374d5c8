// The committed browser bundle must be exactly what `npm run build` makes
// from the current source: the Rust relay embeds dist/w2w.js at compile
// time, so a stale bundle would ship an old client. And the demo page must
// load nothing from outside the relay.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { build } from '../scripts/build.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

test('dist/w2w.js is up to date with src/w2w.js (run `npm run build`)', async () => {
  const fresh = await build();
  const committed = readFileSync(path.join(root, 'dist/w2w.js'), 'utf8');
  assert.ok(fresh === committed, 'clients/js/dist/w2w.js is stale: run `npm run build` in clients/js, then `cargo build -p w2w`');
});

test('the bundle is one ES module that exports the client', async () => {
  const text = readFileSync(path.join(root, 'dist/w2w.js'), 'utf8');
  assert.doesNotMatch(text, /\brequire\(/);
  const mod = await import(path.join(root, 'dist/w2w.js'));
  for (const name of ['W2WSocket', 'W2WHomes', 'Identity', 'seal', 'open', 'sign', 'verifySigned', 'encodeFrame', 'decodeFrame', 'linkPeer', 'signSpaceriftRequest', 'spaceriftMessage', 'reportRtt']) {
    assert.equal(typeof mod[name], 'function', name);
  }
  const id = mod.Identity.fromSeedHex('02'.repeat(32));
  assert.equal(id.address, '8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394');
});

test('the demo page uses only the relay: no external URLs, imports /w2w.js', () => {
  const html = readFileSync(path.join(root, 'demo/index.html'), 'utf8');
  assert.match(html, /from '\/w2w\.js'/);
  // The only absolute URL allowed is the SVG namespace inside data: URIs and inline SVG.
  const urls = html.match(/\b(?:https?:)?\/\/[a-z0-9.-]+\.[a-z]{2,}[^\s"'<>)]*/gi) ?? [];
  assert.deepEqual(urls.filter((u) => !u.includes('www.w3.org/2000/svg')), []);
  assert.doesNotMatch(html, /<link[^>]+rel="stylesheet"/);
  assert.doesNotMatch(html, /<script[^>]+src="https?:/);
});
