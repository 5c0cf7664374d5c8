#!/usr/bin/env bash
# Installs what the test suite needs and this machine lacks, or says in one
# line what is missing and how to get it. Used by scripts/test.sh and .ci/run;
# does nothing on a machine that already has everything.
#
# Debian/Ubuntu with apt-get: installs as root, or through sudo. Elsewhere:
# prints what to install and exits non-zero.
set -euo pipefail

step() { printf '\n==> %s\n' "$*"; }

# A C compiler (bundled SQLite, ring), pkg-config, and CA certificates so
# cargo can fetch crates. SQLite is bundled: no libsqlite3-dev.
# For the JS client's tests: Chromium (Debian's package, driven headless by
# playwright-core; never a downloaded browser build) and, only if there is
# no node at all, Node.js and npm.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
[ -x /usr/bin/chromium ] || [ -n "${W2W_CHROMIUM:-}" ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: missing ${missing[*]} and no apt-get to install them" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "error: node/npm still missing: install Node.js 20.19 or newer (https://nodejs.org/)" >&2
    exit 1
fi
if [ ! -x /usr/bin/chromium ] && [ -z "${W2W_CHROMIUM:-}" ]; then
    echo "error: Chromium is missing: apt-get install chromium, or set W2W_CHROMIUM to a Chromium binary" >&2
    exit 1
fi
