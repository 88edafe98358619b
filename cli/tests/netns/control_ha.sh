#!/usr/bin/env bash
# High-availability subnet routers, in network namespaces:
#
#   ns r1 10.249.1.2 (lan0 192.168.77.1) \
#   ns r2 10.249.2.2 (lan0 192.168.77.2) -- ns P (routes; control serve :8443)
#   ns c  10.249.3.2 (--accept-routes)   /
#   ns h: bridge br0 192.168.77.10/24, ports to r1's and r2's lan0
#
# r1 and r2 run `meshvpn up --advertise-routes 192.168.77.0/24` (one join
# key, one cluster), forward into the LAN and masquerade there (as
# Tailscale's subnet routers do by default, so the host answers whichever
# router brought the packet). The operator approves both. Checks:
# - `meshvpn control routes list` shows r1 primary and r2 standby, c's map
#   gives the prefix to r1 only, r2's status says standby; c pings h;
# - r1's `meshvpn up` SIGKILLed during a 10-per-second ping from c to h:
#   the ping resumes through r2; the outage (the longest time between two
#   answers) is measured and must be under FAILOVER_MAX_S
#   (routes::PRIMARY_GRACE, 2 s, plus the server's poll and the map's
#   way to c); routes list: r2 primary, r1 standby;
# - r1 back: r2 stays primary (no flapping back), c still pings h;
# - `meshvpn control nodes remove r2` during a ping: r1 takes over, the
#   outage measured and bounded the same way.
#
# Prints PASS/FAIL lines, the figures, and "N passed, N failed"; exits
# non-zero on any FAIL (KEEP_LOGS=DIR: the logs are copied there on a
# FAIL). Needs root, `ip netns`, nft. About 30 s.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="ping ss nft"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

CTL_NS=mvh$ID CTL_NET=10.249 CTL_IF=mh
# shellcheck source=cli/tests/netns/control_lib.sh
source "$ROOT/cli/tests/netns/control_lib.sh"

LAN=192.168.77.0/24
HOST=192.168.77.10
# The failover bound: PRIMARY_GRACE (2 s) plus 2 s for the session's end
# to be seen, the server's poll (0.2 s), the delta and c's engine.
FAILOVER_MAX_S=${FAILOVER_MAX_S:-4}

control_ns || exit 1
node_ns 1 r1 && node_ns 2 r2 && node_ns 3 c || exit 1
H=mvh$ID-h
add_ns "$H" || exit 1
ip -n "$H" link add br0 type bridge
ip -n "$H" addr add "$HOST/24" dev br0
ip -n "$H" link set br0 up
# router N NAME: NAME's lan0 on h's bridge as 192.168.77.N, forwarding
# and masquerading into it.
router() {
	local ns=mvh$ID-$2
	ip -n "$ns" link add lan0 type veth peer name "p$2" netns "$H"
	ip -n "$ns" addr add "192.168.77.$1/24" dev lan0
	ip -n "$ns" link set lan0 up
	ip -n "$H" link set "p$2" master br0
	ip -n "$H" link set "p$2" up
	in_ns "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
	in_ns "$ns" nft add table ip nat &&
		in_ns "$ns" nft 'add chain ip nat post { type nat hook postrouting priority 100 ; }' &&
		in_ns "$ns" nft add rule ip nat post oifname lan0 masquerade
}
router 1 r1 && router 2 r2 || exit 1

serve || { fail "control server did not start: $(tail -3 "$T/server.log")"; exit 1; }
ctl keys create --reusable >"$T/key" 2>/dev/null

# role_of NODE: NODE's role for the LAN in `routes list` (primary, standby).
role_of() { ctl routes list 2>/dev/null | awk -v n="$1" -v p="$LAN" '$2 == n && $4 == p { print $6 }'; }
role_is() { [[ $(role_of "$1") == "$2" ]]; }
# carries NODE: c's map gives the LAN to NODE (its allowed IPs at c).
carries() { status c | grep -A1 "^peer $1 " | grep -q "$LAN"; }
# failover_ping: c pings h 10 times a second for at most 12 s in the
# background (timestamps in $T/ping.log); the caller then acts and calls
# outage.
failover_ping() {
	: >"$T/ping.log"
	in_ns "mvh$ID-c" ping -D -n -i 0.1 -W 1 -w 12 "$HOST" >"$T/ping.log" 2>&1 &
	PING_PID=$!
	sleep 1
}
# outage T0: after `wait $PING_PID` (in this shell: the ping is not a
# child of a command substitution), prints the longest time without an
# answer around T0 (the longest gap between two answers, the first one
# answered before T0), 2 decimals; nothing when fewer than 10 answers came
# after T0 (the ping did not resume).
outage() {
	awk -v t0="$1" -F'[][]' '/bytes from/ {
		t = $2 + 0
		if (n++ && t - prev > gap) gap = t - prev
		if (t > t0) after++
		prev = t
	} END { if (after >= 10) printf "%.2f", gap }' "$T/ping.log"
}
ping_once() { in_ns "$1" ping -q -c 1 -W 0.5 "$2" >/dev/null 2>&1; }
below() { awk -v x="$1" -v l="$2" 'BEGIN { exit !(x != "" && x < l) }'; }

# --- two routers, one primary ------------------------------------------
up r1 --join-key-file "$T/key" --advertise-routes "$LAN"
joined r1 || { fail "r1 did not join: $(tail -2 "$T/r1.log")"; exit 1; }
up r2 --join-key-file "$T/key" --advertise-routes "$LAN"
joined r2 || { fail "r2 did not join: $(tail -2 "$T/r2.log")"; exit 1; }
up c --join-key-file "$T/key" --accept-routes
joined c || { fail "c did not join: $(tail -2 "$T/c.log")"; exit 1; }
ctl routes approve r1 "$LAN" >>"$T/ctl.log" 2>&1
sleep 1.1 # r2 approved a second later: r1 is the earliest approved
ctl routes approve r2 "$LAN" >>"$T/ctl.log" 2>&1
if wait_for 5 role_is r1 primary && wait_for 5 role_is r2 standby; then
	pass "routes list: r1 primary, r2 standby"
else
	fail "routes list: $(ctl routes list 2>&1)"
fi
if wait_for 10 carries r1 && ! carries r2 &&
	wait_for 5 sh -c "meshvpn up --status --state-dir $T/r2 | grep -q '$LAN approved, standby'"; then
	pass "c's map gives $LAN to r1 only; r2's status says standby"
else
	fail "c's status: $(status c | grep -A1 '^peer'); r2: $(status r2 | grep routes)"
fi
if pings "mvh$ID-c" "$HOST"; then
	pass "c pings h ($HOST) through r1"
else
	fail "c cannot ping h through r1"
fi

# --- the primary killed ----------------------------------------------------
failover_ping
T0=$(date +%s.%N)
kill -KILL "${UP_PID[r1]}"
wait "$PING_PID"
GAP=$(outage "$T0")
if below "$GAP" "$FAILOVER_MAX_S"; then
	pass "r1's meshvpn up SIGKILLed: c's ping to h resumed through r2, outage $GAP s (bound $FAILOVER_MAX_S s)"
else
	fail "no failover to r2 within $FAILOVER_MAX_S s (outage ${GAP:-without end} s): $(tail -3 "$T/ping.log")"
fi
if role_is r2 primary && role_is r1 standby && carries r2 && ! carries r1; then
	pass "after the kill: r2 primary, r1 standby; c's map gives $LAN to r2"
else
	fail "after the kill: $(ctl routes list 2>&1)"
fi

# --- r1 back: no flapping --------------------------------------------------
wait "${UP_PID[r1]}" 2>/dev/null
mv "$T/r1.log" "$T/r1.first.log"
up r1 --advertise-routes "$LAN"
joined r1 || fail "r1 did not rejoin: $(tail -2 "$T/r1.log")"
R1_4=$V4
sleep 3 # past PRIMARY_GRACE and a few polls
if role_is r2 primary && role_is r1 standby && carries r2 && pings "mvh$ID-c" "$HOST"; then
	pass "r1 back: r2 stays primary, c still pings h"
else
	fail "r1 back: $(ctl routes list 2>&1)"
fi

# --- the primary removed ---------------------------------------------------
# c still holds the WireGuard session it had with r1's first process; the
# restarted r1 does not know it. Traffic to r1 renews it first (timed: it
# is the engine's recovery from a restarted peer, not the failover), so
# the outage below is the route's move alone.
S0=$(date +%s.%N)
if wait_for 20 ping_once "mvh$ID-c" "$R1_4"; then
	echo "c reaches the restarted r1 at $R1_4 $(awk -v s="$S0" 'BEGIN { printf "%.2f", '"$(date +%s.%N)"' - s }') s after its first try"
else
	fail "c cannot reach the restarted r1 at $R1_4"
fi
failover_ping
T0=$(date +%s.%N)
ctl nodes remove r2 >>"$T/ctl.log" 2>&1
wait "$PING_PID"
GAP=$(outage "$T0")
if below "$GAP" "$FAILOVER_MAX_S" && role_is r1 primary && carries r1; then
	pass "r2 removed: c's ping to h resumed through r1, outage $GAP s (bound $FAILOVER_MAX_S s); r1 primary"
else
	fail "no failover to r1 after the removal (outage ${GAP:-without end} s): $(ctl routes list 2>&1)"
fi

if ((FAILED)) && [[ -n ${KEEP_LOGS:-} ]]; then
	mkdir -p "$KEEP_LOGS" && cp "$T"/*.log "$KEEP_LOGS"/
fi
echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
