#!/usr/bin/env bash
# Userspace TCP/IP stacks side by side, in process, on this machine, in one
# run: two WireGuard nodes in one process on loopback UDP, TCP from one to
# the other (one stream, then several), through
#   rust     libmeshvpn's stack from Rust (benches/src/bin/netstack_xfer.rs)
#   go       libmeshvpn's stack from Go through the binding
#            (bindings/go/interop/cmd/nsbench -variant meshvpn)
#   gvisor   wireguard-go with its gVisor netstack (golang.zx2c4.com/wireguard/
#            tun/netstack; the same command, -variant gvisor)
#   tsnet    Tailscale's tsnet: two tsnet.Server nodes in one process
#            (bindings/go/interop/cmd/tsnetbench, its own Go module) joined
#            to a headscale control server this script starts on loopback
#            (temp dir, sqlite, embedded DERP and STUN on 127.0.0.1, a
#            reusable ephemeral pre-auth key from the headscale CLI); the
#            nodes advertise only their STUN (loopback) endpoints and the
#            run fails unless a disco ping gets a direct answer before the
#            transfer and the path is still direct after it (printed per run).
#            Opt-in only (NSB_VARIANTS="rust gvisor tsnet"): it builds
#            headscale and tailscale.com, minutes of CPU, nice -n 19.
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
# network for wireguard-go and gVisor (and for tsnet: tailscale.com and
# github.com/juanfont/headscale at HEADSCALE_VERSION). No root.
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
		sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'
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

# headscale, and the tailscale.com tsnetbench's go.mod pins to the same
# version headscale is built with (its go.mod).
HEADSCALE_VERSION=v0.27.1
if [[ " $VARIANTS " == *" tsnet "* ]]; then
	if ! command -v go >/dev/null; then
		echo "FAIL: no go command (the tsnet variant needs it)"
		exit 1
	fi
	# Built from the module as published; `go install ...@version` would do
	# the same but also asks the proxy for the module's version list.
	echo "building headscale $HEADSCALE_VERSION and tsnetbench (nice -n 19; minutes the first time)"
	hs_src=$(go mod download -json "github.com/juanfont/headscale@$HEADSCALE_VERSION" 2>>"$T/build.log" |
		awk -F'"' '$2 == "Dir" { print $4 }')
	if [[ -z $hs_src ]] || ! cp -r "$hs_src" "$T/hs-src" || ! chmod -R u+w "$T/hs-src" ||
		! (cd "$T/hs-src" && nice -n 19 timeout 1800 go build -o "$T/headscale" ./cmd/headscale) >>"$T/build.log" 2>&1 ||
		! (cd bindings/go/interop/cmd/tsnetbench && nice -n 19 timeout 1800 go build -o "$T/tsnetbench" .) >>"$T/build.log" 2>&1; then
		tail -30 "$T/build.log"
		echo "FAIL: build of headscale $HEADSCALE_VERSION or bindings/go/interop/cmd/tsnetbench"
		exit 1
	fi
	# One free loopback port (TCP and UDP) per use, from a random base.
	free_port() {
		local p
		for _ in $(seq 50); do
			p=$((20000 + RANDOM % 40000))
			if ! ss -Htanu "( sport = :$p )" | grep -q .; then
				echo "$p"
				return
			fi
		done
		return 1
	}
	HS=$T/headscale.d
	mkdir -p "$HS"
	HS_PORT=$(free_port) && HS_METRICS=$(free_port) && HS_GRPC=$(free_port) && HS_STUN=$(free_port) || {
		echo "FAIL: no free loopback ports for headscale"
		exit 1
	}
	cat >"$HS/config.yaml" <<-YAML
		server_url: http://127.0.0.1:$HS_PORT
		listen_addr: 127.0.0.1:$HS_PORT
		metrics_listen_addr: 127.0.0.1:$HS_METRICS
		grpc_listen_addr: 127.0.0.1:$HS_GRPC
		grpc_allow_insecure: false
		noise:
		  private_key_path: $HS/noise_private.key
		prefixes:
		  v4: 100.64.0.0/10
		  v6: fd7a:115c:a1e0::/48
		  allocation: sequential
		derp:
		  server:
		    enabled: true
		    region_id: 999
		    region_code: loopback
		    region_name: loopback
		    verify_clients: true
		    stun_listen_addr: 127.0.0.1:$HS_STUN
		    private_key_path: $HS/derp_server_private.key
		    automatically_add_embedded_derp_region: true
		    ipv4: 127.0.0.1
		  urls: []
		  paths: []
		  auto_update_enabled: false
		disable_check_updates: true
		ephemeral_node_inactivity_timeout: 30m
		database:
		  type: sqlite
		  sqlite:
		    path: $HS/db.sqlite
		log:
		  level: warn
		dns:
		  magic_dns: false
		  base_domain: nsbench.internal
		  override_local_dns: false
		  nameservers:
		    global: []
		unix_socket: $HS/headscale.sock
		unix_socket_permission: "0770"
		logtail:
		  enabled: false
	YAML
	"$T/headscale" -c "$HS/config.yaml" serve >"$HS/log" 2>&1 &
	HS_PID=$!
	trap 'kill "$HS_PID" 2>/dev/null; wait "$HS_PID" 2>/dev/null; rm -rf "$T"' EXIT
	hs() { "$T/headscale" -c "$HS/config.yaml" "$@"; }
	for _ in $(seq 100); do
		[[ -S $HS/headscale.sock ]] && hs users list >/dev/null 2>&1 && break
		sleep 0.1
	done
	HS_USER=$(hs users create nsbench -o json 2>>"$HS/log" | awk -F'[:,]' '/"id"/ { gsub(/[ "]/, "", $2); print $2; exit }')
	HS_KEY=$(hs preauthkeys create -u "${HS_USER:-0}" --reusable --ephemeral -e 2h -o json 2>>"$HS/log" |
		awk -F'"' '$2 == "key" { print $4; exit }')
	if [[ -z $HS_KEY ]]; then
		tail -20 "$HS/log"
		echo "FAIL: headscale did not start or gave no pre-auth key (user id '${HS_USER:-}')"
		exit 1
	fi
	echo "headscale $HEADSCALE_VERSION on http://127.0.0.1:$HS_PORT, DERP over HTTP there, STUN on 127.0.0.1:$HS_STUN"
fi

GO_VERSIONS=
if [[ " $VARIANTS " == *" go "* || " $VARIANTS " == *" gvisor "* ]]; then
	GO_VERSIONS="$(go version | awk '{ print $3 }'), $( (cd bindings/go/interop &&
		go list -m -f '{{.Path}} {{.Version}}' golang.zx2c4.com/wireguard gvisor.dev/gvisor) 2>/dev/null | paste -sd, - | sed 's/,/, /g')"
fi
TSNET_VERSIONS=
if [[ " $VARIANTS " == *" tsnet "* ]]; then
	TSNET_VERSIONS="$( (cd bindings/go/interop/cmd/tsnetbench &&
		go list -m -f '{{.Path}} {{.Version}}' tailscale.com gvisor.dev/gvisor) 2>/dev/null | paste -sd, - | sed 's/,/, /g'), headscale $HEADSCALE_VERSION"
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
	tsnet)
		TSNET_RUN=$((${TSNET_RUN:-0} + 1))
		cmd=("$T/tsnetbench" -control "http://127.0.0.1:$HS_PORT" -authkey "$HS_KEY" -dir "$T/tsnet.$TSNET_RUN"
			-streams "$s" -bytes "$BYTES" -timeout "$TIMEOUT")
		;;
	*)
		echo "unknown variant $v" >&2
		return
		;;
	esac
	out=$(NSB_CLK_TCK=$(getconf CLK_TCK) timeout $((TIMEOUT + 30)) "${cmd[@]}" 2>"$T/err") || {
		echo "FAIL $v x$s: exit $?: $(tail -3 "$T/err")" >&2
		return
	}
	# tsnetbench's path check (it fails unless direct), for the log.
	if [[ $v == tsnet ]]; then
		echo "$out" | grep '^PATH ' | sed "s/^PATH /tsnet x$s /" >>"$T/paths"
	fi
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
			path=
			[[ $v == tsnet ]] && path=", $(tail -1 "$T/paths" | cut -d' ' -f3-)"
			echo "run $r $v x$s: $((bytes >> 20)) MiB verified in $secs s = $g Gbit/s, $cpu CPU s = $c s/GB$path"
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
# One table of ratios per stream count: a header, then one column per
# A/B/KIND (KIND gb or cpu), each the ratio of A's median to B's.
ratio_table() {
	local head=$1 s c a b k row
	shift
	echo
	echo "| streams | $head |"
	echo "|---$(printf '|---%.0s' "$@")|"
	for s in $STREAMS; do
		row="| $s"
		for c in "$@"; do
			IFS=/ read -r a b k <<<"$c"
			row+=" | $(ratio "${M[$a,$s,$k]:-}" "${M[$b,$s,$k]:-}")"
		done
		echo "$row |"
	done
}
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
	if [[ -n $TSNET_VERSIONS ]]; then
		echo "tsnet: $TSNET_VERSIONS; two \`tsnet.Server\`s with defaults in one process, the control"
		echo "server on loopback; path between them in every run: $(cut -d' ' -f3- "$T/paths" 2>/dev/null |
			sed 's/:[0-9]*\( \|$\)/\1/g' | sort | uniq -c | awk '{ $1 = $1 " x"; print }' | paste -sd';' - | sed 's/;/; /g')."
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
	ratio_table "rust / gvisor Gbit/s | go / rust Gbit/s | gvisor / rust CPU s/GB" rust/gvisor/gb go/rust/gb gvisor/rust/cpu
	if [[ " $VARIANTS " == *" tsnet "* ]]; then
		ratio_table "rust / tsnet Gbit/s | tsnet / rust CPU s/GB | gvisor / tsnet Gbit/s" rust/tsnet/gb tsnet/rust/cpu gvisor/tsnet/gb
	fi
	if [[ " $VARIANTS " == *" rust-base "* ]]; then
		echo
		echo "rust-base: $NSB_BASE_BIN, the same transfer built from another commit."
		ratio_table "rust / rust-base Gbit/s | rust / rust-base CPU s/GB" rust/rust-base/gb rust/rust-base/cpu
	fi
	echo
	echo "rust: benches/src/bin/netstack_xfer.rs; go and gvisor: bindings/go/interop/cmd/nsbench;"
	echo "tsnet: bindings/go/interop/cmd/tsnetbench."
	echo "CPU s/GB: user+system time of the whole process (both nodes) per 10^9 bytes moved."
}
table >"$T/table"
cat "$T/table"
[[ $OUT == - ]] || results_section "$OUT" netstack_compare <"$T/table" || status=1
exit $status
