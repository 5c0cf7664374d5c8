#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "run all tests"):
#   1. cargo test --workspace — the Rust crates (protocol, relay, client, CLI, benchmark smoke run),
#      then the relay's and the federation's tests again on relays of one and of three shards
#   2. the JS client in clients/js — the shared test vectors, interop with a
#      real Rust relay and the Rust CLI, and real headless Chromium (the
#      demo app and two pages exchanging end-to-end messages)
#
# Needs: a Rust toolchain, Node.js 20.19+ with npm, and Chromium at
# /usr/bin/chromium (or set W2W_CHROMIUM). scripts/install-deps.sh, run
# first, installs what is missing with apt-get (as root or through sudo), or
# says in one line what to install.
# `npm ci` installs the JS dependencies from clients/js/package-lock.json.
# Screenshots of the demo app go to artifacts/ (gitignored).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Chromium, Node.js, a C compiler…: installed if missing (apt-get, as root
# or through sudo), or named in one line with how to get them.
scripts/install-deps.sh

echo "==> cargo test --workspace"
cargo test --workspace

# (The default is one shard per CPU: the runs below pin the count.)
echo
echo "==> the relay's tests, and the federation's on real relay processes, again on relays of one shard"
W2W_SHARDS=1 cargo test --workspace --test relay --test federation  # (--workspace: no rebuild of what it shares)
echo
echo "==> ... and on relays of three shards (--shards)"
W2W_SHARDS=3 cargo test --workspace --test relay --test federation

echo
echo "==> JS client: npm ci && npm test (clients/js)"
cd clients/js
npm ci --no-audit --no-fund
npm test
