#!/usr/bin/env bash
# Userspace TCP/IP stacks side by side, in process, on this machine, in one
# run: two WireGuard nodes in one process on loopback UDP, TCP from one to
# the other (one stream, then several), through
#   rust     libmeshvpn's stack from Rust (benches/src/bin/netstack_xfer.rs)
#   go       libmeshvpn's stack from Go through the binding
#            (bindings/go/interop/cmd/nsbench -variant meshvpn)
#   gvisor   wireguard-go with its gVisor netstack (golang.zx2c4.com/wireguard/
#            tun/netstack; the same command, -variant gvisor)
# Every variant sends the same deterministic bytes and its receiver compares
# each byte and the count, so a broken transfer fails the script instead of
# giving a figure. Prints Gbit/s and CPU seconds per GB (user+system of the
# whole process over the transfer: both nodes, encryption, both stacks, the
# check) for each, and the ratios rust/gvisor and go/rust.
#
#   benches/netstack_compare.sh [--runs N] [--out FILE|-]
#   benches/netstack_compare.sh --smoke   small sizes, one run, writes nothing;
#                                         fails unless every variant moved and
#                                         verified its bytes (no speed check)
#
# Environment: NSB_BYTES bytes per transfer, split between the streams
# (default 1 GiB; smoke 16 MiB), NSB_STREAMS the stream counts (default
# "1 8"), NSB_VARIANTS (default "rust go gvisor"), NSB_TIMEOUT seconds one
# transfer may take (default 120; smoke 30). For a before/after figure,
# NSB_BASE_BIN=PATH names a netstack_xfer built from another commit and the
# variant rust-base runs it (NSB_VARIANTS="rust-base rust"). Results are medians of N runs
# (default 3), variants interleaved within a run so a burst of load on the
# machine hits all of them; written as a section of benches/RESULTS.md
# unless --out says otherwise. Needs cargo, go, and the Go module cache or
# network for wireguard-go and gVisor. No root.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/results_section.sh
source "$ROOT/benches/results_section.sh"
RUNS=3
OUT=$ROOT/benches/RESULTS.md
SMOKE=0
while (($#)); do
	case $1 in
	--smoke) SMOKE=1 ;;
	--runs) RUNS=$2 && shift ;;
	--out) OUT=$2 && shift ;;
	-h | --help)
		sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "usage: $0 [--smoke] [--runs N] [--out FILE|-]" >&2
		exit 2
		;;
	esac
	shift
done
if ((SMOKE)); then
	RUNS=1
	BYTES=${NSB_BYTES:-$((16 << 20))}
	TIMEOUT=${NSB_TIMEOUT:-30}
else
	BYTES=${NSB_BYTES:-$((1 << 30))}
	TIMEOUT=${NSB_TIMEOUT:-120}
fi
STREAMS=${NSB_STREAMS:-1 8}
VARIANTS=${NSB_VARIANTS:-rust go gvisor}
[[ $RUNS =~ ^[1-9][0-9]?$ && $BYTES =~ ^[1-9][0-9]*$ && $TIMEOUT =~ ^[1-9][0-9]*$ ]] || {
	echo "--runs takes 1..99, NSB_BYTES and NSB_TIMEOUT positive integers" >&2
	exit 2
}

T=$(mktemp -d /tmp/meshvpn-nsbench.XXXXXX)
trap 'rm -rf "$T"' EXIT
cd "$ROOT" || exit 1
echo "building (release)"
if ! cargo build --release --locked -p meshvpn-benches --bin netstack_xfer >"$T/build.log" 2>&1; then
	tail -30 "$T/build.log"
	echo "FAIL: cargo build of netstack_xfer"
	exit 1
fi
RUST_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/netstack_xfer
if [[ " $VARIANTS " == *" go "* || " $VARIANTS " == *" gvisor "* ]]; then
	if ! command -v go >/dev/null; then
		echo "FAIL: no go command (the go and gvisor variants need it; NSB_VARIANTS=rust runs without)"
		exit 1
	fi
	if ! make -C bindings/go lib PROFILE=release >>"$T/build.log" 2>&1 ||
		! (cd bindings/go/interop && timeout 600 go build -o "$T/nsbench" ./cmd/nsbench) >>"$T/build.log" 2>&1; then
		tail -30 "$T/build.log"
		echo "FAIL: build of the Go binding or bindings/go/interop/cmd/nsbench"
		exit 1
	fi
fi

GO_VERSIONS=
if [[ " $VARIANTS " == *" go "* || " $VARIANTS " == *" gvisor "* ]]; then
	GO_VERSIONS="$(go version | awk '{ print $3 }'), $( (cd bindings/go/interop &&
		go list -m -f '{{.Path}} {{.Version}}' golang.zx2c4.com/wireguard gvisor.dev/gvisor) 2>/dev/null | paste -sd, - | sed 's/,/, /g')"
fi

# run VARIANT STREAMS: one transfer; its RESULT line's fields on stdout as
# "secs cpu_s bytes", nothing when it failed (the reason on stderr).
run() {
	local v=$1 s=$2 cmd out
	case $v in
	rust) cmd=("$RUST_BIN" --streams "$s" --bytes "$BYTES" --timeout "$TIMEOUT") ;;
	rust-base) cmd=("${NSB_BASE_BIN:?rust-base needs NSB_BASE_BIN}" --streams "$s" --bytes "$BYTES" --timeout "$TIMEOUT") ;;
	go) cmd=("$T/nsbench" -variant meshvpn -streams "$s" -bytes "$BYTES" -timeout "$TIMEOUT") ;;
	gvisor) cmd=("$T/nsbench" -variant gvisor -streams "$s" -bytes "$BYTES" -timeout "$TIMEOUT") ;;
	*)
		echo "unknown variant $v" >&2
		return
		;;
	esac
	out=$(NSB_CLK_TCK=$(getconf CLK_TCK) timeout $((TIMEOUT + 30)) "${cmd[@]}" 2>"$T/err") || {
		echo "FAIL $v x$s: exit $?: $(tail -3 "$T/err")" >&2
		return
	}
	# Only a verified transfer prints its RESULT line with the full count.
	local want=$((BYTES / s * s))
	echo "$out" | awk -v want="$want" '/^RESULT / {
		for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
		if (f["bytes"] == want && f["secs"] > 0) print f["secs"], f["cpu_s"], f["bytes"]
	}'
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
or_dash() { echo "${1:--}"; }

declare -A GB CPU FAILS
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load before: $LOAD_BEFORE; $((BYTES >> 20)) MiB per transfer, streams: $STREAMS, runs: $RUNS"
status=0
for r in $(seq "$RUNS"); do
	for s in $STREAMS; do
		for v in $VARIANTS; do
			res=$(run "$v" "$s")
			if [[ -z $res ]]; then
				FAILS[$v,$s]=1
				status=1
				continue
			fi
			read -r secs cpu bytes <<<"$res"
			g=$(awk -v b="$bytes" -v t="$secs" 'BEGIN { printf "%.3f", b * 8 / t / 1e9 }')
			c=$(awk -v b="$bytes" -v c="$cpu" 'BEGIN { printf "%.2f", c / (b / 1e9) }')
			echo "run $r $v x$s: $((bytes >> 20)) MiB verified in $secs s = $g Gbit/s, $cpu CPU s = $c s/GB"
			GB[$v,$s]+=" $g"
			CPU[$v,$s]+=" $c"
		done
	done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load after: $LOAD_AFTER"

if ((SMOKE)); then
	for s in $STREAMS; do
		for v in $VARIANTS; do
			if [[ -z ${FAILS[$v,$s]:-} && -n ${GB[$v,$s]:-} ]]; then
				echo "PASS: netstack smoke: $v x$s moved and verified $((BYTES >> 20)) MiB"
			else
				echo "FAIL: netstack smoke: $v x$s did not move and verify its bytes"
			fi
		done
	done
	exit $status
fi

declare -A M
for s in $STREAMS; do
	for v in $VARIANTS; do
		# shellcheck disable=SC2086
		M[$v,$s,gb]=$(median ${GB[$v,$s]:-})
		# shellcheck disable=SC2086
		M[$v,$s,cpu]=$(median ${CPU[$v,$s]:-})
	done
done
table() {
	echo "# Userspace TCP/IP stacks in process, side by side"
	echo
	echo "Regenerated by \`benches/netstack_compare.sh --runs $RUNS\` (NSB_BYTES=$BYTES) on $(date -u '+%Y-%m-%d %H:%M UTC')."
	echo "Two WireGuard nodes in one process on loopback UDP, TCP from one to the other,"
	echo "$((BYTES >> 20)) MiB per transfer split between the streams, every byte verified;"
	echo "medians of $RUNS runs, the variants interleaved."
	echo
	echo "Machine: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r),"
	echo "load average $LOAD_BEFORE before the run and $LOAD_AFTER after it (other jobs share this machine)."
	if [[ -n $GO_VERSIONS ]]; then
		echo "Go side: $GO_VERSIONS; wireguard-go's netstack as its examples use it"
		echo "(\`netstack.CreateNetTUN\`, MTU 1420, \`conn.NewDefaultBind\`, defaults otherwise)."
	fi
	echo
	echo "| variant | streams | Gbit/s | CPU s/GB | failed runs |"
	echo "|---|---|---|---|---|"
	local v s
	for s in $STREAMS; do
		for v in $VARIANTS; do
			echo "| $v | $s | $(or_dash "${M[$v,$s,gb]}") | $(or_dash "${M[$v,$s,cpu]}") | ${FAILS[$v,$s]:+yes} |"
		done
	done
	echo
	echo "| streams | rust / gvisor Gbit/s | go / rust Gbit/s | gvisor / rust CPU s/GB |"
	echo "|---|---|---|---|"
	for s in $STREAMS; do
		echo "| $s | $(ratio "${M[rust,$s,gb]:-}" "${M[gvisor,$s,gb]:-}") | $(ratio "${M[go,$s,gb]:-}" "${M[rust,$s,gb]:-}") | $(ratio "${M[gvisor,$s,cpu]:-}" "${M[rust,$s,cpu]:-}") |"
	done
	if [[ " $VARIANTS " == *" rust-base "* ]]; then
		echo
		echo "rust-base: $NSB_BASE_BIN, the same transfer built from another commit."
		echo
		echo "| streams | rust / rust-base Gbit/s | rust / rust-base CPU s/GB |"
		echo "|---|---|---|"
		for s in $STREAMS; do
			echo "| $s | $(ratio "${M[rust,$s,gb]:-}" "${M[rust-base,$s,gb]:-}") | $(ratio "${M[rust,$s,cpu]:-}" "${M[rust-base,$s,cpu]:-}") |"
		done
	fi
	echo
	echo "rust: benches/src/bin/netstack_xfer.rs; go and gvisor: bindings/go/interop/cmd/nsbench."
	echo "CPU s/GB: user+system time of the whole process (both nodes) per 10^9 bytes moved."
}
table >"$T/table"
cat "$T/table"
[[ $OUT == - ]] || results_section "$OUT" netstack_compare <"$T/table" || status=1
exit $status
