#!/usr/bin/env bash
# The daemon killed with SIGKILL and restarted at once on its saved port,
# looped: flannel.sh's restart scenario without flanneld, etcd or pods, so
# it can run many times. The kernel closes a killed process's files one by
# one and the TUN interface goes first, so the new daemon can meet its
# port still held by its predecessor. Checks after every restart that the
# new daemon serves the port on BOTH IPv4 and IPv6 (ss), and that a peer
# in a second namespace completes a UDP handshake with it.
#
#   bash cli/tests/netns/restart.sh [ROUNDS] [HOGS]
#
# ROUNDS restarts (default 30), each bounded to 10 s; HOGS `nice` CPU
# hogs (default 2) run meanwhile, as CI load. Needs root, /dev/net/tun,
# wireguard-tools, iproute2 (ss).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
MESHVPN_BIN=${MESHVPN_BIN:-$ROOT/target/release/meshvpn}
NETNS_TOOLS="wg ss"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

ROUNDS=${1:-30}
HOGS=${2:-2}
A=mra$ID B=mrb$ID
IFA=mra$ID IFB=mrb$ID
IFA=${IFA:0:15} IFB=${IFB:0:15}
PORT=51820

make_pair "$A" "$B" || exit 1
mkdir -p "$T/state-a"
wg genkey >"$T/ka" && wg genkey >"$T/kb"
PUBA=$(wg pubkey <"$T/ka") PUBB=$(wg pubkey <"$T/kb")

start_a() { in_ns "$A" "$MESHVPN_BIN" -v --state-dir "$T/state-a" "$IFA" 2>>"$T/daemon-a.log"; }
start_a || { echo "FAIL: daemon a does not start"; exit 1; }
in_ns "$A" wg set "$IFA" private-key "$T/ka" listen-port $PORT \
	peer "$PUBB" endpoint 10.231.0.2:$PORT allowed-ips 10.9.0.2/32 persistent-keepalive 25
in_ns "$B" "$MESHVPN_BIN" "$IFB" 2>>"$T/daemon-b.log" || { echo "FAIL: daemon b does not start"; exit 1; }
in_ns "$B" wg set "$IFB" private-key "$T/kb" listen-port $PORT \
	peer "$PUBA" endpoint 10.231.0.1:$PORT allowed-ips 10.9.0.1/32
sleep 1.5 # the state file is saved once a second

hogs=()
for _ in $(seq "$HOGS"); do
	nice -n 19 sh -c 'while :; do :; done' &
	hogs+=($!)
done
stop_hogs() { ((${#hogs[@]})) && kill "${hogs[@]}" 2>/dev/null; hogs=(); }
trap 'stop_hogs; cleanup' EXIT

daemon_a() { pgrep -f -- "--state-dir $T/state-a $IFA\$" | head -1; }
handshake_of() { in_ns "$B" wg show "$IFB" latest-handshakes | awk -v k="$PUBA" '$1 == k { print $2 }'; }

half=0 nohs=0
for r in $(seq "$ROUNDS"); do
	pid=$(daemon_a)
	[[ -n $pid ]] || { fail "round $r: no daemon a"; break; }
	kill -KILL "$pid"
	for _ in $(seq 100); do in_ns "$A" ip link show "$IFA" >/dev/null 2>&1 || break; sleep 0.01; done
	t0=$(date +%s)
	if ! start_a; then
		fail "round $r: restart failed ($(tail -1 "$T/daemon-a.log"))"
		continue
	fi
	new=$(daemon_a)
	socks=$(in_ns "$A" ss -uanp "sport = :$PORT")
	v4=$(grep -c "0.0.0.0:$PORT .*pid=$new," <<<"$socks")
	v6=$(grep -c "\[::\]:$PORT .*pid=$new," <<<"$socks")
	if ((v4 != 1 || v6 != 1)); then
		half=$((half + 1))
		fail "round $r: the restarted daemon serves port $PORT on IPv4 $v4 time(s), on IPv6 $v6: $(tr '\n' ' ' <<<"$socks")"
	fi
	# A handshake newer than the restart, over UDP (there is no relay).
	ok=0
	for _ in $(seq 100); do
		hs=$(handshake_of)
		((${hs:-0} >= t0)) && { ok=1; break; }
		sleep 0.1
	done
	((ok)) || { nohs=$((nohs + 1)); fail "round $r: no UDP handshake with the restarted daemon within 10 s"; }
done
stop_hogs
waits=$(grep -c "still in use" "$T/daemon-a.log")
((FAILED == 0)) && pass "$ROUNDS SIGKILL restarts on port $PORT: bound on IPv4 and IPv6 and a UDP handshake after each ($waits met the port still held by the killed daemon and waited)"
echo "restart suite: $ROUNDS rounds, $half half-bound, $nohs without a handshake, $waits waited for the port, took $SECONDS s"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
