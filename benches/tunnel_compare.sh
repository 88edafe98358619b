#!/usr/bin/env bash
# Tunnel throughput, libmeshvpn vs Go remotedialer (k3s pin), in one run.
#
# Both setups carry the same transfer over TLS on loopback:
#   load client -> forward listener -> server -> websocket/TLS -> agent -> byte source
# libmeshvpn: `meshvpn tunnel serve --forward` + `meshvpn tunnel connect` (two processes).
# Go:         remotedialer server + client + forward in one Go process (both Go ends).
#
# Usage: benches/tunnel_compare.sh            (env: MESHVPN_BIN, SINGLE_MB=512, MULTI_MB=64)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESHVPN_BIN=${MESHVPN_BIN:-$ROOT/target/release/meshvpn}
SINGLE_MB=${SINGLE_MB:-512}   # one stream
MULTI_MB=${MULTI_MB:-64}      # per stream, 16 streams
if [ ! -x "$MESHVPN_BIN" ]; then
  (cd "$ROOT" && cargo build --release -p meshvpn-cli)
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
(cd "$ROOT/bindings/go/interop" && go build -o "$TMP/tunnelbench" ./cmd/tunnelbench)
TB="$TMP/tunnelbench"
"$TB" certs -dir "$TMP"
port() { "$TB" freeport; }
SRC=127.0.0.1:$(port)
"$TB" source -listen "$SRC" >"$TMP/source.log" 2>&1 & PIDS+=($!)

# libmeshvpn, both ends.
MS=127.0.0.1:$(port); MF=127.0.0.1:$(port)
RUST_LOG=warn "$MESHVPN_BIN" tunnel serve --listen "$MS" --cert "$TMP/server.pem" --key "$TMP/server.key" \
  --client-ca "$TMP/ca.pem" --forward "$MF=system:node:agent1/tcp/$SRC" >"$TMP/serve.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn "$MESHVPN_BIN" tunnel connect --url "wss://$MS/v1-k3s/connect" --ca "$TMP/ca.pem" \
  --cert "$TMP/client.pem" --key "$TMP/client.key" --allow "tcp/$SRC" >"$TMP/connect.log" 2>&1 & PIDS+=($!)

# Go remotedialer, both ends.
GS=127.0.0.1:$(port); GF=127.0.0.1:$(port)
"$TB" gopair -listen "$GS" -forward "$GF" -target "$SRC" >"$TMP/gopair.log" 2>&1 & PIDS+=($!)

mbps() { sed -n 's/.*MBps=\([0-9.]*\).*/\1/p'; }
run() { # name addr streams bytes
  local out; out=$("$TB" load -addr "$2" -streams "$3" -bytes "$4")
  echo "$1: $out" >&2
  echo "$out" | mbps
}
S=$((SINGLE_MB << 20)); M=$((MULTI_MB << 20))
echo "tunnel throughput over TLS on loopback ($(nproc) cores); single stream ${SINGLE_MB} MiB, 16 streams x ${MULTI_MB} MiB" >&2
m1=$(run "libmeshvpn  1 stream " "$MF" 1 "$S")
g1=$(run "remotedialer 1 stream " "$GF" 1 "$S")
m16=$(run "libmeshvpn 16 streams" "$MF" 16 "$M")
g16=$(run "remotedialer 16 streams" "$GF" 16 "$M")
printf '\n%-12s %14s %14s %8s\n' "streams" "libmeshvpn MB/s" "Go MB/s" "ratio"
printf '%-12s %14s %14s %8s\n' 1 "$m1" "$g1" "$(awk -v a="$m1" -v b="$g1" 'BEGIN{printf "%.2fx", a/b}')"
printf '%-12s %14s %14s %8s\n' 16 "$m16" "$g16" "$(awk -v a="$m16" -v b="$g16" 'BEGIN{printf "%.2fx", a/b}')"
