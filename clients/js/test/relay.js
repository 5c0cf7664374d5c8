// Test helpers: build and run the real Rust relay (target/debug/w2w) and the
// w2w CLI as child processes, with bounded waits, and kill them afterwards.
import { spawn, execFile } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
/** The relay binary; W2W_BIN overrides it (and skips the cargo build). */
export const w2wBin = process.env.W2W_BIN || path.join(repo, 'target', 'debug', process.platform === 'win32' ? 'w2w.exe' : 'w2w');

/** Rejects after `ms` with a message naming what was awaited. */
export function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

/** Stops every child process still running (an after() safety net). */
export async function stopAll() {
  await Promise.all([...children].map((c) => c.stop()));
}

export function tempDir(prefix = 'w2w-js-') {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

let built = null;
/**
 * `cargo build -q -p w2w` once per test process (cargo's own up-to-date
 * check makes it quick when nothing changed). The relay embeds
 * clients/js/demo/index.html and clients/js/dist/w2w.js at compile time, so
 * this also picks up edits to those files. W2W_SKIP_CARGO_BUILD=1 uses the
 * binary as it is; W2W_BIN=/path/to/w2w uses another binary.
 */
export function buildRelay() {
  if (process.env.W2W_BIN || (process.env.W2W_SKIP_CARGO_BUILD === '1' && existsSync(w2wBin))) return Promise.resolve();
  built ??= new Promise((resolve, reject) => {
    execFile(
      'cargo',
      ['build', '-q', '-p', 'w2w'],
      { cwd: repo, timeout: 20 * 60 * 1000, maxBuffer: 64 << 20 },
      (err, _stdout, stderr) => (err ? reject(new Error(`cargo build -p w2w failed: ${err.message}\n${stderr}`)) : resolve()),
    );
  });
  return built;
}

/** Environment for child processes: HOME and XDG dirs in a temp dir. */
function childEnv(home) {
  return {
    ...process.env,
    HOME: home,
    XDG_CONFIG_HOME: path.join(home, 'config'),
    XDG_DATA_HOME: path.join(home, 'data'),
    W2W_LOG: process.env.W2W_LOG ?? 'warn',
    NO_COLOR: '1',
  };
}

const children = new Set();
process.on('exit', () => {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

/** Spawns a process, collecting its output; it is killed at exit at the latest. */
export function run(cmd, args, { home, cwd = repo } = {}) {
  const child = spawn(cmd, args, { cwd, env: childEnv(home ?? tempDir()), stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.stdoutText = '';
  child.stderrText = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', (d) => (child.stdoutText += d));
  child.stderr.on('data', (d) => (child.stderrText += d));
  child.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
  });
  child.waitFor = (stream, re, ms, what) =>
    withTimeout(
      new Promise((resolve, reject) => {
        const check = () => {
          const m = (stream === 'stdout' ? child.stdoutText : child.stderrText).match(re);
          if (m) {
            child[stream].off('data', onData);
            resolve(m);
          }
        };
        const onData = () => setImmediate(check);
        child[stream].on('data', onData);
        child.exited.then(({ code, signal }) =>
          reject(new Error(`${what}: process exited (${code ?? signal}) first\nstdout: ${child.stdoutText}\nstderr: ${child.stderrText}`)),
        );
        check();
      }),
      ms,
      `${what}\nstdout so far: ${child.stdoutText}\nstderr so far: ${child.stderrText}`,
    );
  child.stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    try {
      await withTimeout(child.exited, 7000, 'process to stop');
    } catch {
      child.kill('SIGKILL');
      await withTimeout(child.exited, 5000, 'process to die');
    }
  };
  return child;
}

/**
 * Starts `w2w serve --listen 127.0.0.1:0` with a fresh data dir and HOME.
 * `limits` (e.g. { max_frame_bytes: 8192 }) go into a config file's
 * [limits] table (`w2w serve --config`); `args` are more `w2w serve`
 * arguments (e.g. ['--peer', url]).
 * Returns { url: 'ws://127.0.0.1:PORT/', http: 'http://127.0.0.1:PORT', home, stop() }.
 */
export async function startRelay({ limits, args: more = [] } = {}) {
  await buildRelay();
  const home = tempDir('w2w-relay-');
  const data = path.join(home, 'relay-data');
  const args = ['serve', '--listen', '127.0.0.1:0', '--data', data];
  if (limits) {
    const config = path.join(home, 'relay.toml');
    const lines = Object.entries(limits).map(([k, v]) => `${k} = ${JSON.stringify(v)}`);
    writeFileSync(config, ['[limits]', ...lines, ''].join('\n'));
    args.push('--config', config);
  }
  args.push(...more);
  const proc = run(w2wBin, args, { home });
  const m = await proc.waitFor('stdout', /w2w relay listening on (ws:\/\/127\.0\.0\.1:(\d+)\/)/, 20000, 'the relay to listen');
  return {
    url: m[1],
    port: Number(m[2]),
    http: `http://127.0.0.1:${m[2]}`,
    home,
    proc,
    async stop() {
      await this.proc.stop(); // this.proc: a test may have restarted it
      rmSync(home, { recursive: true, force: true });
    },
  };
}
