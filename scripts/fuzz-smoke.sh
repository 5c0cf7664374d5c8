#!/usr/bin/env bash
# Fuzz smoke test (for CI): builds every cargo-fuzz target in fuzz/, replays
# the committed regression inputs (fuzz/artifacts/<target>/*), then fuzzes
# each target for a short time from the seed corpus. Exits non-zero when any
# target crashes, panics, times out or runs out of memory; the input that did
# it is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz-smoke.sh                      # every target, 20 s each
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh handshake   # one target, longer
#
# Environment:
#   FUZZ_SECONDS     seconds per target (default 20)
#   FUZZ_SANITIZER   none (default: the targets are safe Rust, and without
#                    ASan they run ~3-7x more inputs per second) or address
#   CARGO_TARGET_DIR where to build (default fuzz/target)
#
# cargo-fuzz drives nightly-only rustc flags (-Zsanitizer, sanitizer
# coverage); on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks them. cargo-fuzz
# itself is installed with `cargo install` when missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SECS=${FUZZ_SECONDS:-20}
SAN=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1

step() { printf '\n==> %s\n' "$*"; }
START=$(date +%s)

if ! cargo fuzz --version >/dev/null 2>&1; then
    step "cargo install cargo-fuzz@$CARGO_FUZZ_VERSION"
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

cd "$ROOT/fuzz"
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    mapfile -t TARGETS < <(cargo fuzz list)
fi

step "cargo fuzz build -s $SAN (${TARGETS[*]})"
cargo fuzz build -s "$SAN"

if command -v python3 >/dev/null 2>&1; then
    step "seed corpora from testdata/"
    python3 seed_corpus.py
else
    echo "python3 not found: fuzzing from an empty corpus" >&2
fi

failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    shopt -s nullglob
    regressions=(artifacts/"$t"/*)
    shopt -u nullglob
    if [ "${#regressions[@]}" -gt 0 ]; then
        step "$t: replaying ${#regressions[@]} regression input(s)"
        # Given files (not a directory), libFuzzer runs each once and exits.
        if ! cargo fuzz run -s "$SAN" "$t" "${regressions[@]}" 2>&1 | tail -n 5; then
            failed+=("$t (regression)")
            continue
        fi
    fi
    step "$t: fuzzing for $SECS s"
    log=$(mktemp)
    if cargo fuzz run -s "$SAN" "$t" "corpus/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^Done|stat::number_of_executed_units|stat::average_exec_per_sec' "$log" || true
    else
        tail -n 40 "$log"
        failed+=("$t")
    fi
    rm -f "$log"
done

echo
echo "fuzz smoke: ${#TARGETS[@]} targets, $SECS s each, $(($(date +%s) - START)) s in all"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "no crashes"
