#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 10), bounded
# by libFuzzer's -max_total_time. Fails on the first crash, leak or
# timeout, leaving the input in fuzz/artifacts/<target>/. Prints execs per
# target at the end.
#
#   fuzz/smoke.sh 30
#
# Needs cargo-fuzz (cargo install cargo-fuzz --locked); on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags.
set -euo pipefail
SECONDS_PER_TARGET="${1:-10}"
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    exit 2
fi
# Comparison tracing makes the X25519 field arithmetic ~3x slower and the
# handshake-heavy targets need every exec they can get; the parsers get
# keyword dictionaries instead (fuzz/dict/).
BUILD_FLAGS=(--no-trace-compares)
cargo fuzz build "${BUILD_FLAGS[@]}"
mkdir -p target/smoke-logs
summary=()
failed=0
for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t"
    log="target/smoke-logs/$t.log"
    echo "== $t (${SECONDS_PER_TARGET}s)"
    # A scratch copy of the corpus, so a smoke run never grows the tree.
    work="target/smoke-corpus/$t"
    rm -rf "$work" && mkdir -p "$work"
    cp corpus/"$t"/* "$work"/ 2>/dev/null || true
    dict=()
    [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
    if cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "$work" -- "${dict[@]}" \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed=1
        tail -40 "$log"
    fi
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
    rate=$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
    summary+=("$t: $status, $runs execs, $rate execs/s")
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
