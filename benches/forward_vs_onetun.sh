#!/usr/bin/env bash
# Port forwarding without TUN, side by side: `meshvpn forward --local` and
# onetun against the same Debian wireguard-go peer, iperf3 through each.
#
#   ns A: meshvpn forward  127.0.0.1:15201 -> 10.232.0.2:5201  (inner 10.232.0.1)
#         onetun           127.0.0.1:15202 -> 10.232.0.2:5201  (inner 10.232.0.3)
#   ns B: wireguard-go with TUN, 10.232.0.2, iperf3 -s
#
# Each tool gets three 5 s iperf3 runs per direction, interleaved (so a
# burst of load on the machine hits both); the script prints the medians in
# Gbit/s and the meshvpn/onetun ratio. A benchmark, not a test: it fails
# only when a tool moves no data at all.
#
# Needs root, `ip netns`, /dev/net/tun, the Debian packages wireguard-go
# wireguard-tools iperf3 iproute2, and onetun (`cargo install --locked
# onetun`). MESHVPN_BIN picks the binary (default: the release build);
# ONETUN_BIN the onetun binary (default: onetun on PATH); RUNS the runs per
# direction and tool (default 3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHVPN_BIN=${MESHVPN_BIN:-$ROOT/target/release/meshvpn}
ONETUN_BIN=${ONETUN_BIN:-$(command -v onetun)}
RUNS=${RUNS:-3}
if [[ ! -x $ONETUN_BIN ]]; then
	echo "FAIL: no onetun: cargo install --locked onetun (or set ONETUN_BIN)" >&2
	exit 1
fi
NETNS_TOOLS="wireguard-go wg iperf3 ping"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

A=mvo$ID-a
B=mvo$ID-b
IFB=wgo$ID
if ! userspace_setup "$A" "$B" "$IFB" ||
	! userspace_peer "$B" "$IFB" forward 51820 10.232.0.1 fd32::1 ||
	! userspace_peer "$B" "$IFB" onetun 51822 10.232.0.3 fd32::3; then
	echo "FAIL: setup (log: $(cat "$T"/*.log 2>/dev/null))"
	exit 1
fi

in_ns "$A" env LOG_LEVEL=error "$MESHVPN_BIN" forward -c "$T/forward.conf" \
	--local 127.0.0.1:15201=10.232.0.2:5201 >>"$T/forward.log" 2>&1 &
in_ns "$A" env ONETUN_PRESHARED_KEY="$(cat "$T/psk")" "$ONETUN_BIN" \
	--private-key-file "$T/onetun.key" --endpoint-public-key "$PUB_B" \
	--endpoint-addr 10.231.0.2:51821 --endpoint-bind-addr 10.231.0.1:51822 \
	--source-peer-ip 10.232.0.3 --keep-alive 10 --log warn \
	127.0.0.1:15202:10.232.0.2:5201:TCP >>"$T/onetun.log" 2>&1 &
if ! wait_listen "$A" 15201 || ! wait_listen "$A" 15202; then
	echo "FAIL: a forwarder did not start: $(tail -5 "$T/forward.log" "$T/onetun.log")"
	exit 1
fi

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "inf" }'; }

declare -A rates
for run in $(seq "$RUNS"); do
	for tool in meshvpn onetun; do
		port=15201
		[[ $tool == onetun ]] && port=15202
		for dir in up down; do
			flag=()
			[[ $dir == down ]] && flag=(-R)
			r=$(IPERF_DIAL="127.0.0.1 $port" iperf "$B" "$A" 10.232.0.2 "${flag[@]}")
			echo "run $run $tool $dir: ${r:-0} Gbit/s"
			rates[$tool.$dir]+=" ${r:-0}"
		done
	done
done

echo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
printf '%-22s %12s %12s\n' "median of $RUNS (Gbit/s)" "A->B (up)" "B->A (down)"
for tool in meshvpn onetun; do
	# shellcheck disable=SC2086
	printf '%-22s %12s %12s\n' "$tool" "$(median ${rates[$tool.up]})" "$(median ${rates[$tool.down]})"
done
# shellcheck disable=SC2086
up_m=$(median ${rates[meshvpn.up]}) up_o=$(median ${rates[onetun.up]})
# shellcheck disable=SC2086
down_m=$(median ${rates[meshvpn.down]}) down_o=$(median ${rates[onetun.down]})
printf '%-22s %12s %12s\n' "ratio meshvpn/onetun" "$(ratio "$up_m" "$up_o")" "$(ratio "$down_m" "$down_o")"
positive "$up_m" && positive "$down_m" && positive "$up_o" && positive "$down_o"
