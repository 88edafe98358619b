#!/usr/bin/env bash
# WireGuard through the websocket relay when UDP between two nodes is
# blackholed, and back to UDP when it returns, in network namespaces:
#
#   ns A (meshvpn, TUN) ====veth 10.231.0.0/24==== ns B (meshvpn, TUN)
#        \ rva 10.233.1.2                   rvb 10.233.2.2 /
#         \                                               /
#          ns R: `meshvpn tunnel serve --relay` on 10.233.0.1:6443 (TLS)
#
# A and B run `meshvpn IFNAME --relay-url wss://10.233.0.1:6443/... --relay-ca`.
# A blackhole route for the peer's underlay address in A and in B cuts UDP
# between them; pings must then pass through the relay (`wg show` shows the
# peer's endpoint as the reserved [100::N]:0), and after the routes are
# deleted both peers must return to their UDP endpoints.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exits non-zero on any
# FAIL. Needs root, `ip netns`, /dev/net/tun, wireguard-tools, iputils-ping,
# openssl (for the relay's throwaway CA). MESHVPN_BIN picks the binary.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="wg ping openssl ss"
MESHVPN_LOG_LEVEL=${MESHVPN_LOG_LEVEL:-info}
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

A=mvr$ID-a B=mvr$ID-b R=mvr$ID-r IFA=mra$ID IFB=mrb$ID
RELAY_IP=10.233.0.1

# relay_ns: namespace R joined to A and B, the relay address routed from both.
relay_ns() {
	add_ns "$R" || return 1
	ip -n "$R" addr add "$RELAY_IP/32" dev lo
	ip -n "$R" link add rra type veth peer name rva netns "$A"
	ip -n "$R" link add rrb type veth peer name rvb netns "$B"
	ip -n "$R" addr add 10.233.1.1/24 dev rra
	ip -n "$A" addr add 10.233.1.2/24 dev rva
	ip -n "$R" addr add 10.233.2.1/24 dev rrb
	ip -n "$B" addr add 10.233.2.2/24 dev rvb
	ip -n "$R" link set dev rra up
	ip -n "$R" link set dev rrb up
	ip -n "$A" link set dev rva up
	ip -n "$B" link set dev rvb up
	ip -n "$A" route add "$RELAY_IP/32" via 10.233.1.1 dev rva &&
		ip -n "$B" route add "$RELAY_IP/32" via 10.233.2.1 dev rvb
}

# endpoint NS IFNAME PEER: the peer's endpoint as `wg show` prints it.
endpoint() { field "$1" "$2" endpoints "$3" 2; }

# wait_endpoint NS IFNAME PEER PATTERN PING_DST: pings (one every 0.5 s)
# until the endpoint matches PATTERN, at most 30 s.
wait_endpoint() {
	local ns=$1 ifname=$2 peer=$3 pattern=$4 dst=$5 end=$((SECONDS + 30))
	while ((SECONDS < end)); do
		[[ $(endpoint "$ns" "$ifname" "$peer") == $pattern ]] && return 0
		in_ns "$ns" ping -q -c 1 -W 1 "$dst" >/dev/null 2>&1 || true
		sleep 0.5
	done
	[[ $(endpoint "$ns" "$ifname" "$peer") == $pattern ]]
}

main() {
	echo "meshvpn: $MESHVPN_BIN"
	relay_certs "$RELAY_IP" || {
		fail "openssl could not make the test certificates: $(cat "$T/openssl.log")"
		return
	}
	MESHVPN_ARGS=(--relay-url "wss://$RELAY_IP:6443/v1-meshvpn/relay" --relay-ca "$T/ca.pem" --relay-probe 1)
	if ! tunnel_pair meshvpn meshvpn "$A" "$B" "$IFA" "$IFB" || ! relay_ns; then
		fail "setup: namespaces and daemons (logs: $(cat "$T"/*.log 2>/dev/null))"
		return
	fi
	in_ns "$R" "$MESHVPN_BIN" tunnel serve --listen "0.0.0.0:6443" \
		--cert "$T/relay.pem" --key "$T/relay.key" --relay >>"$T/relay.log" 2>&1 &
	# Cut UDP between A and B before any packet flows.
	ip -n "$A" route add blackhole 10.231.0.2/32
	ip -n "$B" route add blackhole 10.231.0.1/32
	local i
	for i in $(seq 100); do
		(($(grep -c "relay: client registered" "$T/relay.log" 2>/dev/null) >= 2)) && break
		sleep 0.2
	done
	if (($(grep -c "relay: client registered" "$T/relay.log") >= 2)); then
		pass "setup: relay in $R, both meshvpn daemons registered their keys"
	else
		fail "relay registration (relay log: $(cat "$T/relay.log"); A: $(cat "$T/$IFA.log"))"
		return
	fi

	no_pings "$A" 10.231.0.2 && pass "underlay A->B blackholed" || fail "underlay A->B still answers"

	# The first handshake goes unanswered over UDP; after its retry the
	# peers move to the relay.
	local t0=$SECONDS
	in_ns "$A" ping -q -c 1 -W 1 -w 20 10.232.0.2 >/dev/null 2>&1
	local first=$((SECONDS - t0))
	if pings "$A" 10.232.0.2 && pings "$B" 10.232.0.1 && pings "$A" fd32::2; then
		pass "ping v4 and v6 inside, both ways, UDP blackholed (first reply after ${first} s)"
	else
		fail "ping through the relay (A: $(tail -5 "$T/$IFA.log"))"
	fi
	local ea eb
	ea=$(endpoint "$A" "$IFA" "$PUB_B")
	eb=$(endpoint "$B" "$IFB" "$PUB_A")
	if [[ $ea == "[100::"*"]:0" && $eb == "[100::"*"]:0" ]]; then
		pass "wg show: both peers via the relay (A sees $ea, B sees $eb)"
	else
		fail "wg show endpoints while blackholed: A '$ea' B '$eb'"
	fi

	ip -n "$A" route del blackhole 10.231.0.2/32
	ip -n "$B" route del blackhole 10.231.0.1/32
	t0=$SECONDS
	if wait_endpoint "$A" "$IFA" "$PUB_B" "10.231.0.2:51821" 10.232.0.2 &&
		wait_endpoint "$B" "$IFB" "$PUB_A" "10.231.0.1:51820" 10.232.0.1; then
		pass "UDP restored: both peers back on their UDP endpoints within $((SECONDS - t0)) s"
	else
		fail "still on the relay: A '$(endpoint "$A" "$IFA" "$PUB_B")' B '$(endpoint "$B" "$IFB" "$PUB_A")' (A: $(tail -5 "$T/$IFA.log"); B: $(tail -5 "$T/$IFB.log"))"
	fi
	pings "$A" 10.232.0.2 && pings "$B" 10.232.0.1 &&
		pass "ping inside over UDP again" || fail "ping after UDP came back"
	grep -q "peer path changed" "$T/$IFA.log" &&
		pass "daemon log records the path changes" || fail "no path change in the daemon log"
}

main
echo "$PASSED passed, $FAILED failed"
((FAILED == 0 && PASSED > 0))
