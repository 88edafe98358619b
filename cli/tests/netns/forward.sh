#!/usr/bin/env bash
# Root tests of `meshvpn forward` (userspace stack, no TUN) against a real
# peer, in network namespaces:
#
#   ns A: meshvpn forward, no TUN         ==veth==  ns B: Debian wireguard-go, TUN
#   underlay 10.231.0.1:51820                       10.231.0.2:51821
#   stack    10.232.0.1, fd32::1                    kernel 10.232.0.2/24, fd32::2/64
#     --local  127.0.0.1:15201=10.232.0.2:5201   (iperf3 in A -> iperf3 -s in B)
#     --local  [::1]:15206=[fd32::2]:5201
#     --remote 10.232.0.1:8080=127.0.0.1:8000    (curl in B -> http.server in A)
#     --remote [fd32::1]:8081=127.0.0.1:8000    (the stack's ports are per protocol)
#
# Scenarios: the stack answers pings from the kernel side (v4, v6); iperf3
# through --local for 5 s each way with a positive rate (v4, v6); curl from
# the kernel side fetches a file through --remote and its SHA-256 matches
# (v4, v6). Ends with "N passed, N failed", non-zero on any FAIL.
#
# Needs root, `ip netns`, /dev/net/tun, python3, curl and the Debian packages
# wireguard-go wireguard-tools iperf3 iputils-ping iproute2 (installed by
# .ci/test-all). MESHVPN_BIN picks the binary (default: the release build).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
MESHVPN_BIN=${MESHVPN_BIN:-$ROOT/target/release/meshvpn}
case "${1:-}" in
"") ;;
*)
	sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
NETNS_TOOLS="wireguard-go wg iperf3 ping curl python3 sha256sum"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

A=mvf$ID-a
B=mvf$ID-b
IFB=wgf$ID
started=$SECONDS
echo "meshvpn: $MESHVPN_BIN"

if ! userspace_setup "$A" "$B" "$IFB" ||
	! userspace_peer "$B" "$IFB" forward 51820 10.232.0.1 fd32::1; then
	fail "setup: wireguard-go in $B (log: $(cat "$T"/*.log 2>/dev/null))"
	exit 1
fi

# The service --remote exposes: a random file on loopback in A.
mkdir -p "$T/www"
head -c $((3 << 20)) /dev/urandom >"$T/www/blob"
want=$(sha256sum <"$T/www/blob" | cut -d' ' -f1)
in_ns "$A" python3 -m http.server 8000 --bind 127.0.0.1 --directory "$T/www" \
	>>"$T/http.log" 2>&1 &

in_ns "$A" env LOG_LEVEL=debug NO_COLOR=1 "$MESHVPN_BIN" forward -c "$T/forward.conf" \
	--local 127.0.0.1:15201=10.232.0.2:5201 \
	--local '[::1]:15206=[fd32::2]:5201' \
	--remote 10.232.0.1:8080=127.0.0.1:8000 \
	--remote '[fd32::1]:8081=127.0.0.1:8000' \
	>>"$T/forward.log" 2>&1 &

if wait_listen "$A" 15201 && wait_listen "$A" 15206 && wait_listen "$A" 8000; then
	pass "setup: meshvpn forward (no TUN) in $A, wireguard-go $IFB in $B"
else
	fail "setup: forward or http.server did not listen (log: $(tail -20 "$T/forward.log"))"
	exit 1
fi
if in_ns "$A" ip -o link show | grep -qv ' lo:\| va@'; then
	fail "the forward namespace has an interface besides lo and the veth"
else
	pass "no TUN device in the forward namespace"
fi

pings "$B" 10.232.0.1 && pass "ping v4: the userspace stack answers the kernel side" ||
	fail "ping v4 to the userspace stack"
pings "$B" fd32::1 && pass "ping v6: the userspace stack answers the kernel side" ||
	fail "ping v6 to the userspace stack"

if IPERF_DIAL="127.0.0.1 15201" iperf_both "$B" "$A" 10.232.0.2; then
	pass "iperf3 v4 through --local, 5 s each way: up $UP Gbit/s, down $DOWN Gbit/s"
else
	fail "iperf3 v4 through --local: up='$UP' down='$DOWN'"
fi
if IPERF_DIAL="::1 15206" iperf_both "$B" "$A" fd32::2; then
	pass "iperf3 v6 through --local, 5 s each way: up $UP Gbit/s, down $DOWN Gbit/s"
else
	fail "iperf3 v6 through --local: up='$UP' down='$DOWN'"
fi

# curl_hash URL: SHA-256 of what curl in B fetched (30 s at most).
curl_hash() {
	in_ns "$B" curl -sS -f --max-time 30 "$1" | sha256sum | cut -d' ' -f1
}
got=$(curl_hash http://10.232.0.1:8080/blob)
[[ $got == "$want" ]] && pass "curl v4 through --remote: 3 MiB, SHA-256 matches" ||
	fail "curl v4 through --remote: got $got, want $want"
got=$(curl_hash 'http://[fd32::1]:8081/blob')
[[ $got == "$want" ]] && pass "curl v6 through --remote: 3 MiB, SHA-256 matches" ||
	fail "curl v6 through --remote: got $got, want $want"

if grep -q "connection closed" "$T/forward.log"; then
	pass "forward logged its connections"
else
	fail "forward logged no connection"
fi

echo "scenarios took $((SECONDS - started)) s"
((FAILED == 0)) || sed 's/^/    forward.log: /' "$T/forward.log" | tail -30
echo "netns forward: $PASSED passed, $FAILED failed"
((FAILED == 0))
