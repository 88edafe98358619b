#!/usr/bin/env bash
# Regenerates the C header from ffi/ into a temporary file and fails if the
# committed include/meshvpn.h differs. With --write, updates the committed
# header instead.
#
# Needs cbindgen on PATH (`cargo install cbindgen --locked`); the committed
# header was generated with cbindgen 0.29.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
header="$root/include/meshvpn.h"

if ! command -v cbindgen >/dev/null; then
    echo "check-header: cbindgen not found; install it with: cargo install cbindgen --locked" >&2
    exit 2
fi

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
# cbindgen lists every private item it skips on stderr; keep only real problems.
cbindgen --quiet --config "$root/ffi/cbindgen.toml" --crate meshvpn-ffi \
    --output "$tmp" "$root/ffi"

if [[ "${1:-}" == "--write" ]]; then
    cp "$tmp" "$header"
    echo "check-header: wrote $header"
    exit 0
fi

if ! diff -u "$header" "$tmp"; then
    echo "check-header: include/meshvpn.h is out of date with ffi/; run ffi/check-header.sh --write and commit it" >&2
    exit 1
fi
echo "check-header: include/meshvpn.h matches ffi/"
