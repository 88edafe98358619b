#!/usr/bin/env bash
# Nodes joined by the control server, in network namespaces:
#
#   ns A 10.250.1.2 \                                   / ns C 10.250.3.2
#   ns B 10.250.2.2 -- ns P (routes; 10.250.0.1 on lo) -- ns D 10.250.4.2
#                        `meshvpn control serve` :8443  \ ns X 10.250.5.2 (bad keys)
#
# Join keys from `meshvpn control keys create`; each node runs `meshvpn up`
# (TUN, its own state dir). Checks: A and B join and ping each other's mesh
# IPv4 and IPv6 addresses (WireGuard straight between the namespaces);
# malformed, unknown, expired, revoked and reused keys each end `meshvpn up`
# with status 1 and their own message; `meshvpn control nodes remove C`
# stops A's traffic to C within seconds and ends C's `meshvpn up`; the
# server SIGKILLed: A and B keep pinging; a key made while it is down, the
# server restarted: D joins and reaches A and B, and A reconnects; B
# restarted without its join key rejoins as the same node (same address),
# and so does B with its node.json deleted and its used join key given.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exits non-zero on any
# FAIL. Needs root and `ip netns`. About 40 s.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="ping ss"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

CTL_NS=mvc$ID CTL_NET=10.250 CTL_IF=mc
# shellcheck source=cli/tests/netns/control_lib.sh
source "$ROOT/cli/tests/netns/control_lib.sh"

control_ns || exit 1
node_ns 1 a && node_ns 2 b && node_ns 3 c && node_ns 4 d && node_ns 5 x || exit 1

serve || { fail "control server did not start: $(tail -3 "$T/server.log")"; exit 1; }

ctl keys create >"$T/a.key" 2>/dev/null
ctl keys create >"$T/b.key" 2>/dev/null
ctl keys create >"$T/c.key" 2>/dev/null
ctl keys create --expiry 1s >"$T/expired.key" 2>/dev/null
ctl keys create >"$T/revoked.key" 2>/dev/null
ctl keys revoke "$(cat "$T/revoked.key")" >/dev/null 2>&1
echo "mvpn-key-0123456789abcdef-$(printf '%064d' 0)" >"$T/unknown.key"
echo "mvpn-key-not-a-key" >"$T/malformed.key"

# --- join and ping -----------------------------------------------------
START=$(date +%s.%N)
up a --join-key-file "$T/a.key"
up b --join-key-file "$T/b.key"
if joined a && A4=$V4 A6=$V6 && joined b && B4=$V4 B6=$V6; then
	pass "a and b joined: a $A4 $A6, b $B4 $B6"
else
	fail "a and b did not join: $(tail -2 "$T/a.log" "$T/b.log")"
	exit 1
fi
if wait_for 10 has_peer a b && wait_for 10 has_peer b a; then
	pass "each has the other as a peer ($(awk -v s="$START" 'BEGIN { printf "%.1f", '"$(date +%s.%N)"' - s }') s from start)"
else
	fail "the maps did not arrive"
fi
if pings "mvc$ID-a" "$B4" && pings "mvc$ID-b" "$A4"; then
	pass "a and b ping each other's mesh IPv4"
else
	fail "no IPv4 between a and b"
fi
if pings "mvc$ID-a" "$B6"; then
	pass "a pings b's mesh IPv6"
else
	fail "no IPv6 between a and b"
fi
if meshvpn up --status --state-dir "$T/a" | grep -A1 "^peer b " | grep -q "path udp"; then
	pass "a's status shows b on udp"
else
	fail "a's status: $(meshvpn up --status --state-dir "$T/a")"
fi

# --- ACL policy on live traffic ------------------------------------------
# policy_set TEXT: stores TEXT as the policy (validated by the CLI).
policy_set() { printf '%s\n' "$1" >"$T/policy.json" && ctl policy set "$T/policy.json" >/dev/null 2>&1; }
# ping_once NS DST: one echo answered within 0.5 s.
ping_once() { in_ns "$1" ping -q -c 1 -W 0.5 "$2" >/dev/null 2>&1; }
# Only a may open flows to b: a's echoes (and b's replies) pass, b's own
# echoes to a are dropped by a's engine.
P0=$(date +%s.%N)
if policy_set "{\"acls\": [{\"action\": \"accept\", \"src\": [\"$A4/32\"], \"dst\": [\"$B4/32:*\"]}]}" &&
	wait_for 3 policy_is b 1 &&
	wait_for 3 sh -c "! ip netns exec mvc$ID-b ping -q -c 1 -W 0.3 $A4 >/dev/null 2>&1"; then
	pass "policy a->b only: b's echoes to a dropped $(awk -v s="$P0" 'BEGIN { printf "%.1f", '"$(date +%s.%N)"' - s }') s after policy set"
else
	fail "policy a->b only was not applied: $(meshvpn up --status --state-dir "$T/b" | grep policy)"
fi
if pings "mvc$ID-a" "$B4" && no_pings "mvc$ID-b" "$A4"; then
	pass "policy a->b only: a pings b (replies pass), b cannot ping a"
else
	fail "policy a->b only: wrong verdicts"
fi
P0=$(date +%s.%N)
if policy_set '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}' &&
	wait_for 3 ping_once "mvc$ID-b" "$A4"; then
	pass "policy allow-all: b reaches a again $(awk -v s="$P0" 'BEGIN { printf "%.1f", '"$(date +%s.%N)"' - s }') s after policy set"
else
	fail "policy allow-all: b still cannot reach a"
fi

# --- bad keys ------------------------------------------------------------
sleep 1 # the 1 s key is expired by now
# bad_key FILE MESSAGE: `meshvpn up` with FILE ends with status 1 and MESSAGE.
bad_key() {
	local file=$1 want=$2 dir
	dir=$T/x-$(basename "$file" .key)
	in_ns "mvc$ID-x" timeout 20 meshvpn up --control "$URL" --state-dir "$dir" \
		--interface "mcx$ID" --hostname x --join-key-file "$file" >"$dir.log" 2>&1
	local rc=$?
	if [[ $rc -eq 1 ]] && grep -q "$want" "$dir.log"; then
		pass "$(basename "$file" .key) key: exit 1, \"$(grep -o "$want.*" "$dir.log" | head -1 | cut -c1-70)\""
	else
		fail "$(basename "$file" .key) key: exit $rc, $(cat "$dir.log")"
	fi
}
bad_key "$T/malformed.key" "the join key is malformed"
bad_key "$T/unknown.key" "the join key is not known"
bad_key "$T/expired.key" "the join key expired"
bad_key "$T/revoked.key" "the join key was revoked"
bad_key "$T/a.key" "the join key was already used"

# --- removal -------------------------------------------------------------
up c --join-key-file "$T/c.key"
if joined c && C4=$V4 && wait_for 10 has_peer a c && pings "mvc$ID-a" "$C4"; then
	pass "c joined and a reaches it"
else
	fail "c did not join or a cannot reach it"
fi
ctl nodes remove c >/dev/null 2>&1
R0=$(date +%s.%N)
if wait_for 10 eval '! has_peer a c'; then
	pass "c left a's peers $(awk -v s="$R0" 'BEGIN { printf "%.1f", '"$(date +%s.%N)"' - s }') s after nodes remove"
else
	fail "c is still a's peer 10 s after removal"
fi
if no_pings "mvc$ID-a" "$C4"; then
	pass "a's traffic to c stopped"
else
	fail "a still reaches c after its removal"
fi
if wait_for 10 eval '! kill -0 '"${UP_PID[c]}"' 2>/dev/null'; then
	wait "${UP_PID[c]}"
	rc=$?
	if [[ $rc -eq 1 ]] && grep -q "removed" "$T/c.log"; then
		pass "c's meshvpn up ended: $(grep -o "left the mesh.*removed[^(]*" "$T/c.log" | head -1)"
	else
		fail "c ended with $rc: $(tail -2 "$T/c.log")"
	fi
else
	fail "c's meshvpn up still runs after its removal"
fi

# --- the control server killed ----------------------------------------------
kill -KILL "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
sleep 1
if pings "mvc$ID-a" "$B4" && pings "mvc$ID-b" "$A4"; then
	pass "control server SIGKILLed: a and b still ping"
else
	fail "the data plane stopped with the control server"
fi
ctl keys create >"$T/d.key" 2>/dev/null
up d --join-key-file "$T/d.key"
sleep 2
if pings "mvc$ID-a" "$B4" && ! grep -q "^joined" "$T/d.log"; then
	pass "server down for 3 s: a and b still ping, d waits"
else
	fail "while the server is down: $(tail -2 "$T/d.log")"
fi
serve || fail "control server did not restart"
if joined d && D4=$V4 && wait_for 15 has_peer d a && wait_for 15 has_peer a d &&
	pings "mvc$ID-d" "$A4" && pings "mvc$ID-d" "$B4" && pings "mvc$ID-a" "$D4"; then
	pass "server restarted: d (joined meanwhile) reaches a and b, and a reaches d"
else
	fail "after the restart d does not reach a and b: $(tail -2 "$T/d.log")"
fi
if meshvpn up --status --state-dir "$T/a" | grep -q "connected, sessions 2"; then
	pass "a reconnected (second session)"
else
	fail "a's status: $(meshvpn up --status --state-dir "$T/a" | head -3)"
fi

# --- a node restarted keeps its identity ------------------------------------
kill -TERM "${UP_PID[b]}"
wait "${UP_PID[b]}" 2>/dev/null
mv "$T/b.log" "$T/b.first.log"
up b
if wait_for 10 eval 'grep -q "^rejoining" "$T/b.log"' && joined b && [[ $V4 == "$B4" ]] &&
	wait_for 15 has_peer b a && pings "mvc$ID-a" "$B4" && pings "mvc$ID-b" "$D4"; then
	pass "b restarted without its join key: same node, same address $V4, reaches a and d"
else
	fail "b after a restart: $V4 (was $B4): $(tail -3 "$T/b.log")"
fi

# --- registered, but node.json lost (killed before writing it) ------------
kill -TERM "${UP_PID[b]}"
wait "${UP_PID[b]}" 2>/dev/null
rm "$T/b/node.json"
mv "$T/b.log" "$T/b.second.log"
up b --join-key-file "$T/b.key"
if joined b && [[ $V4 == "$B4" ]] && wait_for 15 has_peer b a && pings "mvc$ID-a" "$B4"; then
	pass "b without node.json, its used key refused: rejoined by its node key as $V4"
else
	fail "b without node.json: $V4 (was $B4): $(tail -3 "$T/b.log")"
fi

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
