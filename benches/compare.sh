#!/usr/bin/env bash
# Side-by-side throughput of userspace WireGuard implementations through
# TUN, on this machine, in one run: two network namespaces joined by a veth,
# the same implementation at both ends, iperf3 between the tunnel addresses.
#
#   benches/compare.sh [--runs N] [--time S] [--udp-rate R] [--impls "LIST"] [--out FILE|-]
#   benches/compare.sh --smoke     one short run each; fails unless each
#                                  implementation available moved data
#
# Implementations (all by default, each skipped with a line when missing):
#   meshvpn        this repository's daemon (target/release/meshvpn, or MESHVPN_BIN)
#   meshvpn-plain  the same with TUN offloads off (MESHVPN_TUN_OFFLOAD=0)
#   wireguard-go   Debian's package
#   wggo           current wireguard-go, built from benches/wggo (Go module)
#   boringtun      boringtun-cli (cargo install --locked boringtun-cli)
#   forward        `meshvpn forward` (userspace stack, no TUN) against meshvpn
#                  in TUN mode, both in one namespace against the same Debian
#                  wireguard-go peer: single-flow TCP each way, and the ratio;
#                  the log also gives each run's CPU seconds per GB of the
#                  forwarding meshvpn process and of the TUN daemon.
#                  FORWARD_PEER=meshvpn makes the peer meshvpn in TUN mode
#                  (faster than wireguard-go, so the peer is less often
#                  the limit); FORWARD_ARGS adds flags to `meshvpn
#                  forward` (e.g. "--tcp-buffer 4194304")
#
# Per implementation: single-flow TCP, four flows (-P 4), UDP at a fixed
# offered rate (received rate and loss), each the median of N runs of S
# seconds; ping RTT through the tunnel idle and under a TCP load; CPU
# seconds per GB moved (utime+stime of the processes in both namespaces
# other than iperf3 and ping, from /proc/PID/stat). Writes the tables with
# machine details and ratios to its section of benches/RESULTS.md (or --out FILE; --out - prints only).
# Needs root.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHVPN_BIN=${MESHVPN_BIN:-$ROOT/target/release/meshvpn}
RUNS=3
TIME=5
UDP_RATE=1G
IMPLS="meshvpn meshvpn-plain wireguard-go wggo boringtun forward"
FORWARD_PEER=${FORWARD_PEER:-wireguard-go}
case $FORWARD_PEER in
wireguard-go) PEER_NAME="Debian wireguard-go" ;;
meshvpn) PEER_NAME="meshvpn in TUN mode" peer_section=_meshvpn ;;
*)
	echo "FORWARD_PEER takes wireguard-go or meshvpn" >&2
	exit 2
	;;
esac
OUT=$ROOT/benches/RESULTS.md
SMOKE=0
while (($#)); do
	case $1 in
	--smoke) SMOKE=1 ;;
	--runs) RUNS=$2 && shift ;;
	--time) TIME=$2 && shift ;;
	--udp-rate) UDP_RATE=$2 && shift ;;
	--impls) IMPLS=$2 && shift ;;
	--out) OUT=$2 && shift ;;
	-h | --help)
		sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "usage: $0 [--smoke] [--runs N] [--time S] [--udp-rate R] [--impls LIST] [--out FILE|-]" >&2
		exit 2
		;;
	esac
	shift
done
if ((SMOKE)); then
	RUNS=1
	TIME=2
	IMPLS=${SMOKE_IMPLS:-meshvpn wireguard-go boringtun forward}
fi
[[ $RUNS =~ ^[1-9][0-9]?$ && $TIME =~ ^[1-9][0-9]?$ ]] || {
	echo "--runs and --time take 1..99" >&2
	exit 2
}

NETNS_TOOLS="wireguard-go wg iperf3 ping python3"
# shellcheck source=benches/results_section.sh
source "$ROOT/benches/results_section.sh"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

# Implementations that cannot run here are left out with a reason.
available() {
	case $1 in
	meshvpn | meshvpn-plain | wireguard-go | forward) return 0 ;;
	boringtun)
		command -v boringtun-cli >/dev/null && return 0
		echo "SKIP boringtun: boringtun-cli not on PATH (cargo install --locked boringtun-cli)"
		return 1
		;;
	wggo)
		WGGO_BIN=$T/wggo
		if ! command -v go >/dev/null; then
			echo "SKIP wggo: no go command"
			return 1
		fi
		if ! (cd "$ROOT/benches/wggo" && timeout 300 go build -o "$WGGO_BIN" .) >"$T/wggo-build.log" 2>&1; then
			echo "SKIP wggo: go build failed: $(tail -3 "$T/wggo-build.log")"
			return 1
		fi
		export WGGO_BIN
		return 0
		;;
	*)
		echo "SKIP $1: unknown implementation"
		return 1
		;;
	esac
}

# cpu_ticks NS...: utime+stime clock ticks of the tunnel daemons (every
# process in the namespaces but iperf3 and ping).
cpu_ticks() {
	local ns pid total=0 comm t
	for ns in "$@"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
			[[ $comm == iperf3 || $comm == ping || $comm == timeout ]] && continue
			t=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null) || continue
			total=$((total + ${t:-0}))
		done
	done
	echo "$total"
}

# client NS_SERVER NS_CLIENT ADDR ARGS...: one iperf3 run, its JSON on stdout.
# The client dials ADDR:5201, or "HOST PORT" from IPERF_DIAL (a forwarder).
client() {
	local srv=$1 cli=$2 addr=$3
	shift 3
	# shellcheck disable=SC2206
	local dial=(${IPERF_DIAL:-$addr 5201})
	iperf_server "$srv" "$addr" $((TIME + 20))
	in_ns "$cli" timeout $((TIME + 15)) iperf3 -c "${dial[0]}" -p "${dial[1]}" -t "$TIME" -J "$@" 2>/dev/null
	wait "$IPERF_SERVER" 2>/dev/null
}

# json FIELD < iperf3 JSON: bits_per_second of the receiver (tcp), or
# "rate lost_percent" of the receiver (udp).
json() {
	python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)["end"]
except Exception:
    sys.exit(0)
if sys.argv[1] == "tcp":
    print(d["sum_received"]["bits_per_second"], d["sum_received"]["bytes"])
else:
    # Newer iperf3 reports the receiver apart; older ones only the loss.
    s = d["sum"]
    r = d.get("sum_received")
    rate = r["bits_per_second"] if r else s["bits_per_second"] * (1 - s["lost_percent"] / 100)
    print(rate, s["lost_percent"], s["bytes"])
' "$1"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

# rtt NS DST COUNT: average ping RTT in ms.
rtt() {
	in_ns "$1" ping -q -c "$3" -i 0.05 -W 1 "$2" 2>/dev/null | awk -F/ '/^rtt|^round-trip/ { print $5 }'
}

declare -A R # results: R[impl,key]
TICK=$(getconf CLK_TCK)

measure() {
	local impl=$1 n=$2
	local A=mvc$ID-a$n B=mvc$ID-b$n IFA=c${n}a$ID IFB=c${n}b$ID
	if ! tunnel_pair "$impl" "$impl" "$A" "$B" "$IFA" "$IFB"; then
		echo "FAIL $impl: setup (logs: $(cat "$T/$IFA.log" "$T/$IFB.log" 2>/dev/null | tail -5))"
		R[$impl,fail]=1
		del_ns "$A" "$B"
		return
	fi
	if ! pings "$A" 10.232.0.2; then
		echo "FAIL $impl: no ping through the tunnel"
		R[$impl,fail]=1
		del_ns "$A" "$B"
		return
	fi
	R[$impl,rtt_idle]=$(rtt "$A" 10.232.0.2 40)
	local r tcp1=() tcp4=() udp=() loss=() cpu=() out c0 c1 bytes
	for r in $(seq "$RUNS"); do
		c0=$(cpu_ticks "$A" "$B")
		out=$(client "$B" "$A" 10.232.0.2 | json tcp)
		c1=$(cpu_ticks "$A" "$B")
		tcp1+=("${out%% *}")
		bytes=${out##* }
		if [[ -n $out ]] && positive "$bytes"; then
			cpu+=("$(awk -v t=$((c1 - c0)) -v hz="$TICK" -v b="$bytes" 'BEGIN { printf "%.2f", t / hz / (b / 1e9) }')")
		fi
		out=$(client "$B" "$A" 10.232.0.2 -P 4 | json tcp)
		tcp4+=("${out%% *}")
		out=$(client "$B" "$A" 10.232.0.2 -u -b "$UDP_RATE" -l 1350 | json udp)
		udp+=("$(echo "$out" | awk '{ print $1 }')")
		loss+=("$(echo "$out" | awk '{ print $2 }')")
	done
	# RTT under load: pings while a single-flow TCP run fills the tunnel.
	iperf_server "$B" 10.232.0.2 $((TIME + 20))
	in_ns "$A" timeout $((TIME + 15)) iperf3 -c 10.232.0.2 -p 5201 -t "$TIME" >/dev/null 2>&1 &
	local load=$!
	sleep 1
	R[$impl,rtt_load]=$(rtt "$A" 10.232.0.2 $((TIME > 3 ? (TIME - 2) * 20 : 20)))
	wait "$load" "$IPERF_SERVER" 2>/dev/null
	R[$impl,tcp1]=$(median "${tcp1[@]}")
	R[$impl,tcp4]=$(median "${tcp4[@]}")
	R[$impl,udp]=$(median "${udp[@]}")
	R[$impl,loss]=$(median "${loss[@]}" | awk '{ printf "%.1f", $1 }')
	R[$impl,cpu]=$(median "${cpu[@]}")
	echo "$impl: TCP ${R[$impl,tcp1]:-?} bit/s (runs: ${tcp1[*]}), TCP x4 ${R[$impl,tcp4]:-?}, UDP ${R[$impl,udp]:-?} loss ${R[$impl,loss]:-?}%, RTT ${R[$impl,rtt_idle]:-?}/${R[$impl,rtt_load]:-?} ms, CPU ${R[$impl,cpu]:-?} s/GB"
	del_ns "$A" "$B"
}

# mode_ticks NS tun|forward: utime+stime clock ticks of the meshvpn process
# in NS of that mode (`meshvpn forward`, or the TUN daemon).
mode_ticks() {
	local pid total=0 cmd t
	for pid in $(ip netns pids "$1" 2>/dev/null); do
		cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
		[[ $cmd == *meshvpn* ]] || continue
		case $cmd in
		*" forward "*) [[ $2 == forward ]] || continue ;;
		*) [[ $2 == tun ]] || continue ;;
		esac
		t=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null) || continue
		total=$((total + ${t:-0}))
	done
	echo "$total"
}

# measure_forward N: `meshvpn forward --local` (inner 10.232.0.1) and meshvpn
# with TUN (inner 10.232.0.3) side by side in ns A, peers of one
# $FORWARD_PEER in ns B (10.232.0.2, iperf3 -s); single-flow TCP up (A to B)
# and down (-R) through each, interleaved run by run.
measure_forward() {
	local n=$1 r mode dir flag out
	local A=mvc$ID-a$n B=mvc$ID-b$n IFA=c${n}a$ID IFB=c${n}b$ID
	if ! userspace_setup "$A" "$B" "$IFB" "$FORWARD_PEER" ||
		! userspace_peer "$B" "$IFB" forward 51820 10.232.0.1 fd32::1 ||
		! userspace_peer "$B" "$IFB" tun 51822 10.232.0.3 fd32::3 ||
		! start_impl meshvpn "$A" "$IFA" ||
		! configure "$A" "$IFA" "$T/tun.key" 51822 "$PUB_B" 10.231.0.2:51821 \
			10.232.0.3 fd32::3 10.232.0.2 fd32::2; then
		echo "FAIL forward: setup (logs: $(cat "$T/$IFA.log" "$T/$IFB.log" 2>/dev/null | tail -5))"
		R[forward,fail]=1
		del_ns "$A" "$B"
		return
	fi
	# FORWARD_ARGS is split into words on purpose.
	# shellcheck disable=SC2086
	in_ns "$A" env LOG_LEVEL=error "$MESHVPN_BIN" forward -c "$T/forward.conf" ${FORWARD_ARGS:-} \
		--local 127.0.0.1:15201=10.232.0.2:5201 >>"$T/forward.log" 2>&1 &
	if ! wait_listen "$A" 15201 || ! pings "$A" 10.232.0.2; then
		echo "FAIL forward: forward did not listen or TUN mode did not ping (log: $(tail -5 "$T/forward.log"))"
		R[forward,fail]=1
		del_ns "$A" "$B"
		return
	fi
	local -A runs cpus
	local c0 c1 bytes cpu
	for r in $(seq "$RUNS"); do
		for mode in tun forward; do
			for dir in up down; do
				flag=()
				[[ $dir == down ]] && flag=(-R)
				c0=$(mode_ticks "$A" $mode)
				if [[ $mode == forward ]]; then
					out=$(IPERF_DIAL="127.0.0.1 15201" client "$B" "$A" 10.232.0.2 "${flag[@]}" | json tcp)
				else
					out=$(client "$B" "$A" 10.232.0.2 "${flag[@]}" | json tcp)
				fi
				c1=$(mode_ticks "$A" $mode)
				bytes=${out##* }
				cpu=-
				if [[ -n $out ]] && positive "$bytes"; then
					cpu=$(awk -v t=$((c1 - c0)) -v hz="$TICK" -v b="$bytes" 'BEGIN { printf "%.2f", t / hz / (b / 1e9) }')
					cpus[$mode.$dir]+=" $cpu"
				fi
				echo "forward run $r: $mode $dir $(gbit "${out%% *}") Gbit/s, $cpu CPU s/GB"
				runs[$mode.$dir]+=" ${out%% *}"
			done
		done
	done
	for mode in tun forward; do
		for dir in up down; do
			# shellcheck disable=SC2086
			R[forward,$mode.$dir]=$(median ${runs[$mode.$dir]})
			# shellcheck disable=SC2086
			R[forward,$mode.$dir.cpu]=$(median ${cpus[$mode.$dir]:-})
		done
	done
	echo "forward: CPU s/GB of the meshvpn process (medians): up $(or_dash "${R[forward,forward.up.cpu]}") vs TUN $(or_dash "${R[forward,tun.up.cpu]}"), down $(or_dash "${R[forward,forward.down.cpu]}") vs TUN $(or_dash "${R[forward,tun.down.cpu]}")"
	echo "forward: up $(gbit "${R[forward,forward.up]}") vs TUN $(gbit "${R[forward,tun.up]}") Gbit/s, down $(gbit "${R[forward,forward.down]}") vs TUN $(gbit "${R[forward,tun.down]}") Gbit/s"
	del_ns "$A" "$B"
}

gbit() { awk -v x="${1:-}" 'BEGIN { if (x == "") print "-"; else printf "%.2f", x / 1e9 }'; }
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
or_dash() { echo "${1:--}"; }
# forward_row LABEL up|down: one row of the forward-against-TUN table.
forward_row() { echo "| $1 | $(gbit "${R[forward,tun.$2]:-}") | $(gbit "${R[forward,forward.$2]:-}") | $(ratio "${R[forward,forward.$2]:-}" "${R[forward,tun.$2]:-}") |"; }

DONE=()
FORWARD=0
n=0
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load before: $LOAD_BEFORE"
for impl in $IMPLS; do
	available "$impl" || continue
	n=$((n + 1))
	if [[ $impl == forward ]]; then
		measure_forward "$n"
		FORWARD=1
		continue
	fi
	measure "$impl" "$n"
	DONE+=("$impl")
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

if ((SMOKE)); then
	status=0
	for impl in "${DONE[@]}"; do
		if [[ -z ${R[$impl,fail]:-} ]] && positive "${R[$impl,tcp1]:-0}" && positive "${R[$impl,udp]:-0}"; then
			pass "compare smoke: $impl moved TCP $(gbit "${R[$impl,tcp1]}") Gbit/s and UDP $(gbit "${R[$impl,udp]}") Gbit/s"
		else
			fail "compare smoke: $impl produced no positive rate"
			status=1
		fi
	done
	if ((FORWARD)); then
		if [[ -z ${R[forward,fail]:-} ]] && positive "${R[forward,tun.up]:-0}" && positive "${R[forward,tun.down]:-0}" &&
			positive "${R[forward,forward.up]:-0}" && positive "${R[forward,forward.down]:-0}"; then
			pass "compare smoke: meshvpn forward moved $(gbit "${R[forward,forward.up]}")/$(gbit "${R[forward,forward.down]}") Gbit/s up/down, TUN mode $(gbit "${R[forward,tun.up]}")/$(gbit "${R[forward,tun.down]}")"
		else
			fail "compare smoke: meshvpn forward or TUN mode moved nothing in a direction"
			status=1
		fi
	fi
	echo "$PASSED passed, $FAILED failed"
	exit $status
fi

{
	echo "# Userspace WireGuard through TUN, side by side"
	echo
	echo "Regenerated by \`benches/compare.sh --runs $RUNS --time $TIME --udp-rate $UDP_RATE\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
	echo "Two network namespaces joined by a veth, the same implementation at both ends,"
	echo "iperf3 between the tunnel addresses; medians of $RUNS runs of $TIME s."
	echo
	echo "Machine: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r),"
	echo "load average $LOAD_BEFORE before the run and $LOAD_AFTER after it (other jobs share this machine)."
	echo
	echo "| implementation | TCP 1 flow Gbit/s | TCP 4 flows Gbit/s | UDP $UDP_RATE offered: received Gbit/s | UDP loss % | ping idle ms | ping under load ms | CPU s/GB |"
	echo "|---|---|---|---|---|---|---|---|"
	for impl in "${DONE[@]}"; do
		if [[ -n ${R[$impl,fail]:-} ]]; then
			echo "| $impl | failed | | | | | | |"
			continue
		fi
		echo "| $impl | $(gbit "${R[$impl,tcp1]:-}") | $(gbit "${R[$impl,tcp4]:-}") | $(gbit "${R[$impl,udp]:-}") | $(or_dash "${R[$impl,loss]:-}") | $(or_dash "${R[$impl,rtt_idle]:-}") | $(or_dash "${R[$impl,rtt_load]:-}") | $(or_dash "${R[$impl,cpu]:-}") |"
	done
	echo
	echo "meshvpn relative to each (higher is better for throughput):"
	echo
	echo "| vs | TCP 1 flow | TCP 4 flows | UDP received |"
	echo "|---|---|---|---|"
	for impl in "${DONE[@]}"; do
		[[ $impl == meshvpn ]] && continue
		echo "| $impl | $(ratio "${R[meshvpn,tcp1]:-}" "${R[$impl,tcp1]:-}") | $(ratio "${R[meshvpn,tcp4]:-}" "${R[$impl,tcp4]:-}") | $(ratio "${R[meshvpn,udp]:-}" "${R[$impl,udp]:-}") |"
	done
	echo
	echo "CPU s/GB counts both ends' daemons during the single-flow TCP runs. Ping: 50 ms"
	echo "interval; under load, while a single TCP flow fills the tunnel."
} >"$T/table"
{
	if ((FORWARD)); then
		echo "# \`meshvpn forward\` against TUN mode${peer_section:+, with meshvpn as the peer}"
		echo
		peer_env=
		[[ $FORWARD_PEER == wireguard-go ]] || peer_env="FORWARD_PEER=$FORWARD_PEER "
		[[ -z ${FORWARD_ARGS:-} ]] || peer_env+="FORWARD_ARGS=\"$FORWARD_ARGS\" "
		echo "Regenerated by \`${peer_env}benches/compare.sh --impls forward --runs $RUNS --time $TIME\` on $(date -u '+%Y-%m-%d %H:%M UTC'),"
		echo "$(nproc) CPUs, load average $LOAD_BEFORE before and $LOAD_AFTER after (other jobs share this machine)."
		echo
		echo "\`meshvpn forward\` (userspace stack, no TUN) against meshvpn in TUN mode, in one"
		echo "namespace, both peers of the same $PEER_NAME; single-flow TCP, medians of $RUNS runs of $TIME s:"
		echo
		echo "| direction | TUN mode Gbit/s | forward Gbit/s | forward / TUN |"
		echo "|---|---|---|---|"
		if [[ -n ${R[forward,fail]:-} ]]; then
			echo "| failed | | | |"
		else
			forward_row "up (to the $FORWARD_PEER side)" up
			forward_row "down (from it)" down
		fi
	fi
} >"$T/forward"
echo "load after: $LOAD_AFTER"
# Each table has its own section of the file (other scripts write theirs
# there too); a run that measured none of a table's rows leaves it alone.
if ((${#DONE[@]})); then
	cat "$T/table"
	[[ $OUT == - ]] || results_section "$OUT" compare <"$T/table"
fi
if ((FORWARD)); then
	echo
	cat "$T/forward"
	[[ $OUT == - ]] || results_section "$OUT" "compare_forward${peer_section:-}" <"$T/forward"
fi
