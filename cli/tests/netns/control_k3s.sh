#!/usr/bin/env bash
# Two k3s-shaped clusters on one mesh, in network namespaces:
#
#   pod ns a1p 10.42.0.10 - ns a1 \                      / ns b1 - pod ns b1p 10.43.0.10
#   pod ns a2p 10.42.1.10 - ns a2 -- ns P (routes, ------ ns b2 - pod ns b2p 10.43.1.10
#                                    control serve :8443) \ ns r (nodes joining while
#                                                            the server is SIGKILLed)
#
# Cluster a joins with a reusable key (--tags tag:k3s-a --cluster a), cluster
# b with its own (tag:k3s-b, cluster b); each node runs `meshvpn up
# --accept-routes` advertising its slice of the pod CIDR, forwards for the
# pod namespace behind it (veth, a real TCP service on 8080 and 9090). The
# policy auto-approves 10.42.0.0/16 for both tags (so only the conflict
# check stops cluster b) and 10.43.0.0/16 for tag:k3s-b, and allows: inside
# each cluster everything; b's pods to a's pods on TCP 8080; a's nodes ICMP
# to b's pods. Checks:
# - cluster b first on 10.42.0.0/24 and 10.42.1.0/24: refused, the reason
#   naming the other node and cluster in b's `meshvpn up --status` and in
#   `meshvpn control routes list`, while a's routes stay approved and no
#   node routes 10.42 to cluster b; then b restarted on 10.43.x.0/24:
#   approved by the policy, a's nodes route them, pods reachable;
# - pods across the clusters reach each other only where the ACL says:
#   TCP 8080 b->a passes (the banner comes back), 9090 b->a and 8080 a->b
#   do not (9090 b->a fails at once with "connection refused": the sending
#   node's engine answers the refused SYN with a RST; UDP to it, not in
#   the ACL, fails with EHOSTUNREACH from the ICMP admin-prohibited it
#   answers), ICMP a's node->b's pod passes, a's pod->b's pod and b's pod->a's
#   pod do not; inside a cluster everything passes;
# - a policy change opens, then closes, b->a 9090 on live traffic: the
#   time from `policy set` to the first connection that sees it is
#   measured and must be under 1 s;
# - `meshvpn control nodes remove b2`: b2 leaves every other node's peers
#   (measured), its pod becomes unreachable from everywhere, its `meshvpn
#   up` ends;
# - the control server SIGKILLed after a policy change and while 3 new
#   nodes register: the data plane keeps going (ICMP and TCP across the
#   clusters); a policy is set while it is down; restarted, every node
#   that printed "joined", every key, approved route and policy version
#   acknowledged before is there (nodes with the same addresses); the
#   nodes not acknowledged join; every node reaches the policy set while
#   the server was down and one set after the restart.
#
# Prints PASS/FAIL lines, the figures, and "N passed, N failed"; exits
# non-zero on any FAIL. Needs root, `ip netns`, python3. 25 to 40 s.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="ping ss python3"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

# The interpreter itself, not a version manager's shim: each probe starts
# one, and the latency figures should not carry a shell script's start.
PY=$(python3 -c 'import sys; print(sys.executable)')
POD_PY=$ROOT/cli/tests/netns/pod.py
CTL_NS=mvk$ID CTL_NET=10.251 CTL_IF=mk
# shellcheck source=cli/tests/netns/control_lib.sh
source "$ROOT/cli/tests/netns/control_lib.sh"
now() { date +%s.%N; }
# since T0 [T1]: seconds from T0 to T1 (default: now), 2 decimals.
since() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.2f", b - a }'; }
# below X LIMIT: X < LIMIT.
below() { awk -v x="$1" -v l="$2" 'BEGIN { exit !(x < l) }'; }

control_ns || exit 1
# k3s_node N NAME: node_ns, forwarding for the pod namespace behind it.
k3s_node() {
	node_ns "$1" "$2" &&
		in_ns "mvk$ID-$2" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
}
# pod_ns NODE NET: pod namespace mvkID-NODEp behind node NODE, NET.10/24
# (NET like 10.42.0), the node NET.1 on its side; a TCP service answering
# "NODEp:PORT" on 8080 and 9090.
pod_ns() {
	local node=mvk$ID-$1 ns=mvk$ID-$1p net=$2
	add_ns "$ns" || return 1
	ip -n "$node" link add pod0 type veth peer name eth0 netns "$ns"
	ip -n "$node" addr add "$net.1/24" dev pod0
	ip -n "$node" link set pod0 up
	ip -n "$ns" addr add "$net.10/24" dev eth0
	ip -n "$ns" link set eth0 up
	ip -n "$ns" route add default via "$net.1"
	in_ns "$ns" timeout 300 "$PY" "$POD_PY" serve "$1p" 8080 9090 >>"$T/$1p.log" 2>&1 &
	wait_listen "$ns" 9090
}
k3s_node 1 a1 && k3s_node 2 a2 && k3s_node 3 b1 && k3s_node 4 b2 || exit 1
k3s_node 5 r1 && k3s_node 6 r2 && k3s_node 7 r3 || exit 1
pod_ns a1 10.42.0 && pod_ns a2 10.42.1 || exit 1

# peer_routes NODE PEER: PEER's allowed IPs at NODE.
peer_routes() { status "$1" | grep -A1 "^peer $2 " | awk '/allowed/ { print $2 }'; }
# all NODES... -- CMD...: CMD NODE succeeds for every node.
all() {
	local nodes=() n
	while [[ $1 != -- ]]; do
		nodes+=("$1")
		shift
	done
	shift
	for n in "${nodes[@]}"; do "$@" "$n" || return 1; done
}
# tcp FROM_NS HOST PORT: the banner of HOST:PORT from a pod (1 s at most).
tcp() { in_ns "mvk$ID-$1" "$PY" "$POD_PY" get "$2" "$3" 1 2>/dev/null; }
# ping1 NS DST: one of three echoes answered (about 1 s at most).
ping1() { in_ns "mvk$ID-$1" ping -q -c 3 -i 0.2 -W 1 -w 2 "$2" >/dev/null 2>&1; }
ping0() { ! in_ns "mvk$ID-$1" ping -q -c 4 -i 0.2 -W 1 -w 2 "$2" >/dev/null 2>&1; }

# --- the policy ------------------------------------------------------------
# policy EXTRA_ACL: the two-cluster policy, with EXTRA_ACL (JSON, may be
# empty) appended to its acls.
policy() {
	cat <<-JSON
		{
		  "tagOwners": {"tag:k3s-a": [], "tag:k3s-b": []},
		  "hosts": {"pods-a": "10.42.0.0/16", "pods-b": "10.43.0.0/16"},
		  "acls": [
		    {"action": "accept", "src": ["tag:k3s-a", "pods-a"], "dst": ["tag:k3s-a:*", "pods-a:*"]},
		    {"action": "accept", "src": ["tag:k3s-b", "pods-b"], "dst": ["tag:k3s-b:*", "pods-b:*"]},
		    {"action": "accept", "src": ["pods-b"], "dst": ["pods-a:8080"], "proto": "tcp"},
		    {"action": "accept", "src": ["tag:k3s-a"], "dst": ["pods-b:*"], "proto": "icmp"}$1
		  ],
		  "autoApprovers": {"routes": {
		    "10.42.0.0/16": ["tag:k3s-a", "tag:k3s-b"],
		    "10.43.0.0/16": ["tag:k3s-b"]
		  }}
		}
	JSON
}
OPEN_9090=',
    {"action": "accept", "src": ["pods-b"], "dst": ["pods-a:9090"], "proto": "tcp"}'
# policy_set EXTRA_ACL: stores the policy; POLICY_VERSION is its version.
POLICY_VERSION=0
policy_set() {
	policy "$1" >"$T/policy.json" && ctl policy set "$T/policy.json" >>"$T/ctl.log" 2>&1 &&
		POLICY_VERSION=$((POLICY_VERSION + 1))
}

serve || {
	fail "control server did not start: $(tail -3 "$T/server.log")"
	exit 1
}
policy_set "" || fail "policy set: $(tail -3 "$T/ctl.log")"
ctl keys create --reusable --tags tag:k3s-a --cluster a >"$T/a.key" 2>/dev/null
ctl keys create --reusable --tags tag:k3s-b --cluster b >"$T/b.key" 2>/dev/null

# --- two clusters, the second first on the same pod CIDR -------------------
T0=$(now)
up a1 --join-key-file "$T/a.key" --tags tag:k3s-a --advertise-routes 10.42.0.0/24 --accept-routes
up a2 --join-key-file "$T/a.key" --tags tag:k3s-a --advertise-routes 10.42.1.0/24 --accept-routes
if joined a1 && A1=$V4 && joined a2 && A2=$V4; then
	pass "cluster a joined: a1 $A1, a2 $A2"
else
	fail "cluster a did not join: $(tail -2 "$T/a1.log" "$T/a2.log")"
	exit 1
fi
up b1 --join-key-file "$T/b.key" --tags tag:k3s-b --advertise-routes 10.42.0.0/24 --accept-routes
up b2 --join-key-file "$T/b.key" --tags tag:k3s-b --advertise-routes 10.42.1.0/24 --accept-routes
if joined b1 && B1=$V4 && joined b2 && B2=$V4 &&
	wait_for 10 all a1 a2 b1 -- has_peer b2 && wait_for 10 all a1 a2 b2 -- has_peer b1 &&
	wait_for 10 all a2 b1 b2 -- has_peer a1 && wait_for 10 all a1 b1 b2 -- has_peer a2; then
	pass "four nodes converged: every node has the three others as peers $(since "$T0") s after the first meshvpn up"
else
	fail "the four nodes did not converge: $(status a1 | grep -c '^peer') peers at a1"
fi
# refused_here NODE PREFIX: NODE's status shows PREFIX refused, naming the
# cluster a node that holds it.
refused_here() { status "$1" | grep -qF "$2 refused (overlaps $2 approved for node $3 of cluster a (this node is in cluster b)"; }
if wait_for 5 refused_here b1 10.42.0.0/24 a1 && wait_for 5 refused_here b2 10.42.1.0/24 a2; then
	pass "b1 and b2 on 10.42.x.0/24: refused in their status: $(status b1 | grep -o 'refused (overlaps [^)]*)' | head -1))"
else
	fail "b's status does not show the conflict: $(status b1 | grep routes)"
fi
if ctl routes list >"$T/routes.1" 2>&1 &&
	grep -E "\bb1\b.*10\.42\.0\.0/24.*refused.*a1.*cluster a" "$T/routes.1" >/dev/null &&
	grep -E "\bb2\b.*10\.42\.1\.0/24.*refused.*a2.*cluster a" "$T/routes.1" >/dev/null &&
	grep -E "\ba1\b.*10\.42\.0\.0/24.*approved" "$T/routes.1" >/dev/null &&
	grep -E "\ba2\b.*10\.42\.1\.0/24.*approved" "$T/routes.1" >/dev/null; then
	pass "routes list: a's routes approved, b's refused naming a's nodes"
else
	fail "routes list: $(cat "$T/routes.1")"
fi
if status a1 | grep -q "10.42.0.0/24 approved" && [[ $(peer_routes a1 a2) == *10.42.1.0/24* ]] &&
	[[ $(peer_routes a1 b1) != *10.42.* ]] && [[ $(peer_routes a2 b2) != *10.42.* ]]; then
	pass "a's nodes keep their routes, and route no 10.42 prefix to cluster b"
else
	fail "a1 routes b1: $(peer_routes a1 b1), a2 routes b2: $(peer_routes a2 b2)"
fi
if [[ $(tcp a1p 10.42.1.10 9090) == a2p:9090 ]] && ping1 a1p 10.42.1.10; then
	pass "inside cluster a: pod a1p reaches pod a2p (TCP 9090, ICMP)"
else
	fail "inside cluster a: a1p does not reach a2p"
fi

# --- cluster b moves to 10.43.0.0/16 ------------------------------------------
T0=$(now)
for n in b1 b2; do kill -TERM "${UP_PID[$n]}"; done
for n in b1 b2; do wait "${UP_PID[$n]}" 2>/dev/null; done
pod_ns b1 10.43.0 && pod_ns b2 10.43.1 || exit 1
up b1 --tags tag:k3s-b --advertise-routes 10.43.0.0/24 --accept-routes
up b2 --tags tag:k3s-b --advertise-routes 10.43.1.0/24 --accept-routes
approved_here() { status "$1" | grep -q "routes advertised: $2 approved;"; }
routed() { [[ $(peer_routes "$1" "$2") == *"$3"* ]]; }
if wait_for 10 approved_here b1 10.43.0.0/24 && wait_for 10 approved_here b2 10.43.1.0/24 &&
	ctl routes list >"$T/routes.2" 2>&1 &&
	grep -E "\bb1\b.*10\.43\.0\.0/24.*approved.*autoApprovers" "$T/routes.2" >/dev/null &&
	! grep -q "10.42.*refused" "$T/routes.2"; then
	pass "b restarted on 10.43.0.0/24 and 10.43.1.0/24: auto-approved (status and routes list), 10.42 withdrawn"
else
	fail "b on 10.43: $(status b1 | grep routes); $(cat "$T/routes.2")"
fi
if wait_for 10 eval 'routed a1 b1 10.43.0.0/24 && routed a2 b1 10.43.0.0/24 && routed b2 b1 10.43.0.0/24 && routed a1 b2 10.43.1.0/24 && routed b1 b2 10.43.1.0/24'; then
	pass "every node routes 10.43.0.0/24 to b1 and 10.43.1.0/24 to b2 ($(since "$T0") s from the restart)"
else
	fail "10.43 not routed: a1 has b1 $(peer_routes a1 b1), b2 $(peer_routes a1 b2)"
fi

# --- the ACL on pod traffic ---------------------------------------------------
if [[ $(tcp b1p 10.42.0.10 8080) == a1p:8080 ]] && [[ $(tcp b2p 10.42.1.10 8080) == a2p:8080 ]]; then
	pass "b's pods reach a's pods on TCP 8080 (allowed): the banner came back"
else
	fail "b1p -> a1p:8080: '$(tcp b1p 10.42.0.10 8080)'"
fi
if [[ -z $(tcp b1p 10.42.0.10 9090) ]] && [[ -z $(tcp a1p 10.43.0.10 8080) ]]; then
	pass "TCP denied: b's pod to a's pod on 9090, a's pod to b's pod on 8080"
else
	fail "denied TCP got through: b1p->a1p:9090 '$(tcp b1p 10.42.0.10 9090)', a1p->b1p:8080 '$(tcp a1p 10.43.0.10 8080)'"
fi
# b1's engine refuses b1p's SYN to 9090 at send and answers it with a RST
# (filter/reject.rs), so the connect fails at once instead of timing out.
REFUSED=$(in_ns "mvk$ID-b1p" "$PY" "$POD_PY" refused 10.42.0.10 9090 2)
if [[ $REFUSED == refused\ * ]] && below "${REFUSED#* }" 0.5; then
	pass "denied TCP fails fast: b1p -> a1p:9090 connection refused after ${REFUSED#* } s (bound 0.5 s)"
else
	fail "denied TCP b1p -> a1p:9090 does not fail fast: '$REFUSED'"
fi
# UDP is not in the ACL: b1's engine answers the datagram with an ICMP
# admin-prohibited, which the pod's kernel turns into EHOSTUNREACH on its
# connected socket.
UDP_REFUSED=$(in_ns "mvk$ID-b1p" "$PY" "$POD_PY" udp 10.42.0.10 9090 2)
if [[ $UDP_REFUSED == EHOSTUNREACH\ * ]] && below "${UDP_REFUSED#* }" 0.5; then
	pass "denied UDP fails fast: b1p -> a1p:9090 EHOSTUNREACH (ICMP admin-prohibited) after ${UDP_REFUSED#* } s (bound 0.5 s)"
else
	fail "denied UDP b1p -> a1p:9090 does not fail fast: '$UDP_REFUSED'"
fi
if ping1 a1 10.43.0.10 && ping1 a2 10.43.1.10; then
	pass "ICMP allowed: a's nodes (tag:k3s-a) ping b's pods"
else
	fail "a1 cannot ping b1's pod"
fi
if ping0 a1p 10.43.0.10 && ping0 b1p 10.42.0.10; then
	pass "ICMP denied: a's pod to b's pod, b's pod to a's pod"
else
	fail "denied ICMP between the pod CIDRs got through"
fi
if [[ $(tcp b1p 10.43.1.10 9090) == b2p:9090 ]] && ping1 b2p 10.43.0.10; then
	pass "inside cluster b: b1p and b2p reach each other (TCP 9090, ICMP)"
else
	fail "inside cluster b: b1p does not reach b2p"
fi

# --- a policy change on live traffic -----------------------------------------
# flip_after STATE EXTRA_ACL: sets the policy with EXTRA_ACL while b1p
# probes a1p:9090 until it is STATE; LATENCY: from `policy set` to the
# first probe that saw STATE.
flip_after() {
	in_ns "mvk$ID-b1p" "$PY" "$POD_PY" flip 10.42.0.10 9090 "$1" 5 >"$T/flip" 2>&1 &
	local probe=$! t0
	# Not before the probe saw the state the change ends.
	wait_for 5 grep -q probing "$T/flip" || return 1
	t0=$(now)
	policy_set "$2" || return 1
	wait "$probe" || return 1
	LATENCY=$(since "$t0" "$(tail -1 "$T/flip")")
}
if flip_after open "$OPEN_9090" && below "$LATENCY" 1; then
	pass "policy opens b->a 9090: live traffic passes $LATENCY s after policy set (bound 1 s)"
else
	fail "policy opening 9090: ${LATENCY:-never} s"
fi
LATENCY=
if flip_after closed "" && below "$LATENCY" 1; then
	pass "policy closes b->a 9090 again: new connections refused $LATENCY s after policy set (bound 1 s)"
else
	fail "policy closing 9090: ${LATENCY:-never} s"
fi

# --- node removal ---------------------------------------------------------------
if ping1 a1 10.43.1.10 && ping1 a2 10.43.1.10 && ping1 b1 "$B2" && [[ $(tcp b1p 10.43.1.10 9090) == b2p:9090 ]]; then
	pass "before removing b2: a1 and a2 ping its pod, b1 pings it, b1's pod reaches its pod"
else
	fail "b2 not reachable before its removal"
fi
R0=$(now)
ctl nodes remove b2 >>"$T/ctl.log" 2>&1
no_peer() { ! has_peer "$1" b2; }
if wait_for 10 all a1 a2 b1 -- no_peer; then
	pass "b2 removed: gone from a1, a2 and b1's peers $(since "$R0") s after nodes remove"
else
	fail "b2 is still a peer 10 s after removal"
fi
if ping0 a1 10.43.1.10 && ping0 a2 10.43.1.10 && ping0 b1 "$B2" && [[ -z $(tcp b1p 10.43.1.10 9090) ]]; then
	pass "b2's traffic stopped: a1 and a2 to its pod, b1 to it, b1's pod to its pod"
else
	fail "b2 is still reachable after its removal"
fi
if wait_for 10 eval '! kill -0 '"${UP_PID[b2]}"' 2>/dev/null'; then
	wait "${UP_PID[b2]}"
	rc=$?
	if [[ $rc -eq 1 ]] && grep -q "removed" "$T/b2.log"; then
		pass "b2's meshvpn up ended with status 1: $(grep -o "this node was removed[^(]*" "$T/b2.log" | head -1)"
	else
		fail "b2 ended with $rc: $(tail -2 "$T/b2.log")"
	fi
else
	fail "b2's meshvpn up still runs after its removal"
fi

# --- the control server SIGKILLed during a policy change and registrations ------
for i in 1 2 3; do ctl keys create --tags tag:k3s-a --cluster a >"$T/r$i.key" 2>/dev/null; done
ctl keys list >"$T/keys.before" 2>&1
ctl nodes list >"$T/nodes.before" 2>&1
ctl routes list >"$T/routes.before" 2>&1
policy_set "$OPEN_9090" || fail "policy set before the kill"
for i in 1 2 3; do
	up "r$i" --join-key-file "$T/r$i.key" --tags tag:k3s-a --advertise-routes "10.42.$((10 + i)).0/24"
done
# The kill lands 0.05 to 0.35 s after the registrations start: before,
# during or after each (the count acknowledged is printed).
sleep "0.$((RANDOM % 31 + 5))"
kill -KILL "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
K0=$(now)
declare -A ACKED
for i in 1 2 3; do
	if grep -q "^joined" "$T/r$i.log"; then
		ACKED[r$i]=$(grep "^joined" "$T/r$i.log" | awk '{ print $(NF-1) }')
	fi
done
echo "server SIGKILLed with ${#ACKED[@]} of 3 registrations acknowledged"
policy_set "" || fail "policy set while the server is down"
DOWN_VERSION=$POLICY_VERSION
if ping1 a1 10.43.0.10 && [[ $(tcp b1p 10.42.0.10 8080) == a1p:8080 ]] && ping1 a1p 10.42.1.10; then
	pass "server down: a1 pings b1's pod, b1p gets a1p's TCP 8080, a1p pings a2p"
else
	fail "the data plane stopped with the control server"
fi
sleep 1
serve || fail "control server did not restart: $(tail -3 "$T/server.log")"
echo "server down for $(since "$K0") s"
lost=
ctl keys list >"$T/keys.after" 2>&1
ctl nodes list >"$T/nodes.after" 2>&1
ctl routes list >"$T/routes.after" 2>&1
# Keys by id, cluster and tags (their use count moves); nodes by id,
# name, addresses, ephemeral flag and public key (not the connected
# column); approved routes whole (blanks squeezed).
keys_of() { awk 'NR > 1 { print $1, $(NF-1), $NF }' "$1"; }
nodes_of() { awk 'NR > 1 { print $1, $2, $3, $4, $5, $6 }' "$1"; }
approved_of() { awk '/approved/ { $1 = $1; print }' "$1"; }
while read -r line; do keys_of "$T/keys.after" | grep -qxF "$line" || lost+=" key:$line"; done < <(keys_of "$T/keys.before")
while read -r line; do nodes_of "$T/nodes.after" | grep -qxF "$line" || lost+=" node:$line"; done < <(nodes_of "$T/nodes.before")
while read -r line; do approved_of "$T/routes.after" | grep -qxF "$line" || lost+=" route:$line"; done < <(approved_of "$T/routes.before")
for r in "${!ACKED[@]}"; do
	grep -E "\b$r\b" "$T/nodes.after" | grep -qF "${ACKED[$r]}" || lost+=" node:$r ${ACKED[$r]}"
done
got=$(ctl policy get 2>&1 >/dev/null | grep -o 'version [0-9]*')
[[ $got == "version $DOWN_VERSION" ]] || lost+=" policy:$got(want $DOWN_VERSION)"
if [[ -z $lost ]]; then
	pass "restarted: every key, node, approved route and the policy version $DOWN_VERSION acknowledged before are there, and the ${#ACKED[@]} acknowledged registrations with their addresses"
else
	fail "lost:$lost; after: $(head -3 "$T/keys.after" "$T/nodes.after")"
fi
policy_is_down() { policy_is "$1" "$DOWN_VERSION"; }
if joined r1 && joined r2 && joined r3 && wait_for 20 all a1 a2 b1 r1 r2 r3 -- policy_is_down; then
	pass "after the restart all 3 new nodes joined, and every node enforces policy $DOWN_VERSION (set while the server was down) $(since "$K0") s after the kill"
else
	fail "nodes did not catch up: $(for n in a1 b1 r1 r2 r3; do echo "$n: $(status "$n" | grep -E '^(control|policy)')"; done)"
fi
for r in "${!ACKED[@]}"; do
	joined "$r"
	[[ $V4 == "${ACKED[$r]}" ]] || fail "$r acknowledged as ${ACKED[$r]} but is $V4 now"
done
if ping1 r1 "$A1" && ping1 r2 "$A1" && ping1 r3 "$A1"; then
	pass "the nodes that joined across the kill reach a1"
else
	fail "the r nodes do not reach a1: $(status r1; status a1 | grep -A2 '^peer r')"
fi
T1=$(now)
policy_set "$OPEN_9090"
policy_is_after() { policy_is "$1" "$POLICY_VERSION"; }
if wait_for 5 all a1 a2 b1 r1 r2 r3 -- policy_is_after && [[ $(tcp b1p 10.42.0.10 9090) == a1p:9090 ]]; then
	pass "a policy set after the restart reached all 6 nodes in $(since "$T1") s; b1p reaches a1p:9090"
else
	fail "the policy after the restart did not reach every node"
fi

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
