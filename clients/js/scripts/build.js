// Builds the browser bundle dist/w2w.js (one ES module, minified) from
// src/w2w.js (the public API, which re-exports the modules of src/: frames,
// handshake, sealing, socket, spacerifts, ...) and its @noble dependencies. The Rust relay embeds that file
// (include_str!) and serves it at /w2w.js, so it is committed; the test
// test/dist.test.js fails if it differs from a fresh build.
//
//   npm run build            writes dist/w2w.js
//   node scripts/build.js X  writes X instead
import * as esbuild from 'esbuild';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export const options = {
  entryPoints: [path.join(root, 'src/w2w.js')],
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2022',
  minify: true,
  legalComments: 'eof',
  charset: 'utf8',
  logLevel: 'warning',
  absWorkingDir: root,
  banner: { js: '// w2w browser client. Generated from clients/js/src/*.js (entry src/w2w.js) by `npm run build`: do not edit.' },
};

/** Builds the bundle and returns its text (written to `outfile` when given). */
export async function build(outfile) {
  const r = await esbuild.build({ ...options, write: false, outfile: outfile ?? path.join(root, 'dist/w2w.js') });
  const text = r.outputFiles[0].text;
  if (outfile) {
    const fs = await import('node:fs/promises');
    await fs.mkdir(path.dirname(outfile), { recursive: true });
    await fs.writeFile(outfile, text);
  }
  return text;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = path.resolve(process.argv[2] ?? path.join(root, 'dist/w2w.js'));
  const text = await build(out);
  console.log(`wrote ${path.relative(process.cwd(), out) || out} (${text.length} bytes)`);
}
