#!/usr/bin/env bash
# meshvpn as flannel's WireGuard, with the real flanneld (flannel v0.28.10's
# etcd subnet manager, backend manager and extension backend, linked by
# cli/tests/flannel/flanneld) and etcd, in network namespaces:
#
#              ns U: bridge br0 10.240.0.254/24, etcd :2379, relay :6443
#          /         |          \                       \
#   node n1 .1   node n2 .2   node n3 .3          ns X: NAT 10.240.0.100
#   flanneld     flanneld     flanneld            (nftables masquerade)
#   meshvpn fw1  meshvpn fw2  meshvpn fw3           LAN 192.168.60.0/24
#   cni0 bridge  cni0         cni0                  node n4 .4, node n5 .5
#     pod p1       pod p2       pod p3              (joined later, behind
#   (SUBNET.2)                                       the same NAT IP)
#
# Every node runs flanneld with the extension backend whose four commands
# are `meshvpn flannel ...` (the config in etcd is cli/flannel/net-conf.json's
# Backend); each pod namespace hangs off the node's cni0 bridge with an
# address from the node's flannel subnet, as k3s's CNI does. Scenarios:
# pod-to-pod ping, iperf3 both ways and a checksummed HTTP download between
# every pair; the daemon killed with SIGKILL and restarted (same peers,
# traffic resumes, time printed); a node's underlay IP changed during a
# ping flow (time printed, nothing restarted); flanneld restarted after a
# lease went away meanwhile (no stale peer); two nodes added later behind one
# NAT IP; UDP blocked between two nodes (relay, then back to UDP); a lease
# removed (peer and route go away); bad input to each command.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exits non-zero on any
# FAIL. Needs root, /dev/net/tun, etcd (Debian etcd-server, etcd-client),
# go (builds the flanneld test main once into target/flanneld unless
# FLANNELD_BIN is set), iperf3, curl, python3, nft, openssl, wireguard-tools.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="wg ping iperf3 curl python3 nft etcd etcdctl openssl ss go"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

FLANNELD_BIN=${FLANNELD_BIN:-$ROOT/target/flanneld}
PROMCHECK_BIN=$ROOT/target/promcheck
if [[ ! -x $FLANNELD_BIN || ! -x $PROMCHECK_BIN || $ROOT/cli/tests/flannel/flanneld/go.sum -nt $FLANNELD_BIN ]]; then
	(cd "$ROOT/cli/tests/flannel/flanneld" && go build -o "$FLANNELD_BIN" . && go build -o "$PROMCHECK_BIN" ./promcheck) || {
		echo "FAIL: cannot build the flanneld test main (cli/tests/flannel/flanneld)"
		exit 1
	}
fi

U=mfu$ID X=mfx$ID
ETCD=http://10.240.0.254:2379
PREFIX=/meshvpn-test/network
export ETCDCTL_API=3
RELAY_IP=10.240.0.254
declare -A NODE_IP=([1]=10.240.0.1 [2]=10.240.0.2 [3]=10.240.0.3 [4]=192.168.60.4 [5]=192.168.60.5)

node() { echo "mfn$ID-$1"; }
pod() { echo "mfp$ID-$1"; }
ifn() { echo "fw$1x$ID" | cut -c1-15; }
state() { echo "$T/state-$1"; }
ectl() { in_ns "$U" etcdctl --endpoints "$ETCD" "$@"; }

# The pod address of node N: its flannel subnet's .2 (cni0 has .1).
subnet_of() { sed -n 's/^FLANNEL_SUBNET=//p' "$T/subnet-$1.env" 2>/dev/null; }
pod_ip() { subnet_of "$1" | sed 's|\.1/24$|.2|'; }

underlay() {
	add_ns "$U" || return 1
	ip -n "$U" link add br0 type bridge && ip -n "$U" link set br0 up
	ip -n "$U" addr add 10.240.0.254/24 dev br0
	# The NAT box: underlay side 10.240.0.100, LAN 192.168.60.1/24.
	add_ns "$X" || return 1
	ip -n "$X" link add wan type veth peer name vx netns "$U"
	ip -n "$U" link set vx master br0 up
	ip -n "$X" addr add 10.240.0.100/24 dev wan && ip -n "$X" link set wan up
	ip -n "$X" link add lan type bridge && ip -n "$X" link set lan up
	ip -n "$X" addr add 192.168.60.1/24 dev lan
	in_ns "$X" sysctl -qw net.ipv4.ip_forward=1
	in_ns "$X" nft -f - <<-'NFT'
		table ip nat {
			chain post { type nat hook postrouting priority srcnat; oifname "wan" masquerade; }
		}
	NFT
}

# add_node N: node namespace on the underlay (or behind the NAT for N>=4).
add_node() {
	local n=$1 ns
	ns=$(node "$n")
	add_ns "$ns" || return 1
	if ((n <= 3)); then
		ip -n "$ns" link add eth0 type veth peer name vn$n netns "$U"
		ip -n "$U" link set vn$n master br0 up
		ip -n "$ns" addr add "${NODE_IP[$n]}/24" dev eth0
	else
		ip -n "$ns" link add eth0 type veth peer name vn$n netns "$X"
		ip -n "$X" link set vn$n master lan up
		ip -n "$ns" addr add "${NODE_IP[$n]}/24" dev eth0
		ip -n "$ns" link set eth0 up
		ip -n "$ns" route add default via 192.168.60.1
	fi
	ip -n "$ns" link set eth0 up
	# promote_secondaries: the IP-change scenario adds the new address
	# before deleting the old one, which would otherwise take both.
	in_ns "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
		net.ipv4.conf.eth0.promote_secondaries=1
	mkdir -p "$(state "$n")"
}

# start_flanneld N: flanneld in node N with meshvpn's commands on PATH.
start_flanneld() {
	local n=$1
	in_ns "$(node "$n")" env MESHVPN_FLANNEL_INTERFACE="$(ifn "$n")" MESHVPN_STATE_DIR="$(state "$n")" \
		MESHVPN_RELAY_CA="$T/ca.pem" MESHVPN_FLANNEL_PRUNE_AFTER=5 ${FLANNEL_RUST_LOG:+RUST_LOG=$FLANNEL_RUST_LOG} \
		setsid "$FLANNELD_BIN" --etcd-endpoints "$ETCD" --etcd-prefix "$PREFIX" \
		--iface eth0 --subnet-file "$T/subnet-$n.env" >>"$T/flanneld-$n.log" 2>&1 &
	echo $! >"$T/flanneld-$n.pid"
}

stop_flanneld() { kill -TERM "$(cat "$T/flanneld-$1.pid")" 2>/dev/null; wait "$(cat "$T/flanneld-$1.pid")" 2>/dev/null; }

# wait_subnet N: flanneld of node N leased a subnet and wrote its file
# (30 s at most: flanneld takes 40 ms here, but its etcd client backs off
# after a failed connect, and once in CI a flanneld had not even picked
# its interface 10 s after it started).
wait_subnet() {
	local i
	for i in $(seq 300); do
		[[ -n $(subnet_of "$1") ]] && return 0
		sleep 0.1
	done
	return 1
}

# no_lease N: the FAIL line for a flanneld that leased nothing, with what
# it was doing: its TCP sockets, its ARP entries, and where its main
# goroutine waited (SIGQUIT makes a Go program print every goroutine's
# stack and exit; the dump goes to its log, kept with the other logs).
no_lease() {
	local n=$1 pid socks neigh stack
	pid=$(cat "$T/flanneld-$n.pid" 2>/dev/null)
	socks=$(in_ns "$(node "$n")" ss -tan 2>&1 | tail -n +2 | tr -s ' ' | tr '\n' ';')
	neigh=$(in_ns "$(node "$n")" ip neigh show 2>&1 | tr '\n' ';')
	if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
		kill -QUIT "$pid" 2>/dev/null
		sleep 1
		# Its innermost frame, then flannel's and main's frames.
		stack=$(awk '/^goroutine 1 / {p = 1; next} p && /^$/ {exit} p && !/^\t/' "$T/flanneld-$n.log" |
			sed 's/([^()]*)$//' | awk 'NR == 1 || /flannel|^main\./' | head -8 | tr '\n' ' ')
	else
		stack="flanneld exited"
	fi
	fail "node $n: no lease in 30 s (flanneld: $(grep -E '^[IWEF][0-9]{4} ' "$T/flanneld-$n.log" | tail -4 | tr '\n' ';') main goroutine: $stack TCP: $socks ARP: $neigh)"
}

# add_pod N: pod namespace behind node N's cni0 with SUBNET.2.
add_pod() {
	local n=$1 ns p sub gw
	ns=$(node "$n") p=$(pod "$n") sub=$(subnet_of "$n")
	gw=${sub%/24}
	add_ns "$p" || return 1
	ip -n "$ns" link add cni0 type bridge && ip -n "$ns" link set cni0 up
	ip -n "$ns" addr add "$sub" dev cni0
	ip -n "$ns" link add vethp type veth peer name eth0 netns "$p"
	ip -n "$ns" link set vethp master cni0 up
	ip -n "$p" addr add "$(pod_ip "$n")/24" dev eth0
	ip -n "$p" link set eth0 up
	ip -n "$p" route add default via "$gw"
}

# block_udp N MATCH: node N drops its outgoing packets that match MATCH
# (nftables; removed with `nft delete table inet mvblock`).
block_udp() {
	in_ns "$(node "$1")" nft add table inet mvblock &&
		in_ns "$(node "$1")" nft add chain inet mvblock out '{ type filter hook output priority 0; }' &&
		in_ns "$(node "$1")" nft add rule inet mvblock out $2 drop
}

# routes_of N: node N's routes through its meshvpn interface, read whole
# (`ip ... | grep -q` under pipefail fails when grep closes the pipe first).
routes_of() { in_ns "$(node "$1")" ip route show dev "$(ifn "$1")" 2>/dev/null; }

peers_of() { in_ns "$(node "$1")" wg show "$(ifn "$1")" peers 2>/dev/null | sort; }
npeers() { peers_of "$1" | grep -c .; }

# wait_peers N COUNT: node N's daemon has COUNT peers (20 s at most).
wait_peers() {
	local i
	for i in $(seq 200); do
		(($(npeers "$1") == $2)) && return 0
		sleep 0.1
	done
	return 1
}

pod_ping() { in_ns "$(pod "$1")" ping -q -c 3 -i 0.2 -W 2 -w 10 "$(pod_ip "$2")" >/dev/null 2>&1; }

# resume_time FROM TO: seconds (0.1 s steps) until a ping from pod FROM to
# pod TO is answered, at most 30 s; prints it, fails past that.
resume_time() {
	local t0 now
	t0=$(date +%s.%N)
	while :; do
		in_ns "$(pod "$1")" ping -q -c 1 -W 0.3 "$(pod_ip "$2")" >/dev/null 2>&1 && break
		now=$(date +%s.%N)
		awk -v a="$t0" -v b="$now" 'BEGIN { exit !(b - a > 30) }' && return 1
	done
	awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }'
}

# curl_check FROM TO: pod FROM downloads 8 MiB from pod TO's HTTP server
# over the mesh; the SHA-256 must match.
curl_check() {
	local got
	got=$(in_ns "$(pod "$1")" timeout 20 curl -sf "http://$(pod_ip "$2"):8080/blob" | sha256sum | cut -d' ' -f1)
	[[ $got == "$BLOB_SUM" ]]
}

# dump_nodes WHY: what every running node's daemon knows, so a FAIL tells
# apart "UDP not received" (ss shows nothing queued, rx counters still),
# "not sent" (udp_send_errors, a peer's endpoint on the relay) and
# "received and refused" (rx_unknown_index, rx_invalid_mac,
# cookie_replies_sent). Peer lines of `wg show dump` without the interface
# line and the preshared key: the logs must never hold a key.
dump_nodes() {
	local n ns
	echo "=== $(date -u +%T.%N) FAIL: $1"
	for n in 1 2 3 4 5; do
		ns=$(node "$n")
		ip netns list 2>/dev/null | grep -q "^$ns\b" || continue
		echo "--- node $n ($ns) $(ip -n "$ns" -br addr show eth0 2>/dev/null)"
		echo "wg dump (peer, endpoint, allowed-ips, handshake, rx, tx, keepalive):"
		in_ns "$ns" wg show "$(ifn "$n")" dump 2>&1 | tail -n +2 | cut -f1,3-8
		echo "metrics:"
		in_ns "$ns" curl -s --max-time 2 http://127.0.0.1:9586/metrics 2>&1 |
			awk '/^meshvpn_(engine|peer_path|peer_handshake)/ || (/^meshvpn_peer_drops/ && $NF != 0)'
		echo "ss -uanp:"
		in_ns "$ns" ss -uanp 2>&1
	done
}

# Every FAIL also leaves the state of every daemon at that moment in
# fail-dump.log (kept with the other logs).
fail() {
	echo "FAIL: $*"
	FAILED=$((FAILED + 1))
	dump_nodes "$*" >>"$T/fail-dump.log" 2>&1
}

daemon_pid() { pgrep -f -- "--state-dir $(state "$1") $(ifn "$1")( |\$)" | head -1; }

main() {
	echo "meshvpn: $MESHVPN_BIN, flanneld: $FLANNELD_BIN"
	relay_certs "$RELAY_IP" || {
		fail "openssl: $(cat "$T/openssl.log")"
		return
	}
	underlay || {
		fail "setup: underlay"
		return
	}
	in_ns "$U" etcd --data-dir "$T/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
		--listen-peer-urls http://127.0.0.1:2380 >"$T/etcd.log" 2>&1 &
	in_ns "$U" "$MESHVPN_BIN" tunnel serve --listen "$RELAY_IP:6443" \
		--cert "$T/relay.pem" --key "$T/relay.key" --relay >>"$T/relay.log" 2>&1 &
	local i conf
	for i in $(seq 50); do ectl endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
	# The Backend of the shipped net-conf.json, plus the relay (its CA path
	# comes from flanneld's environment, as flannel expands $VAR).
	conf=$(python3 - "$ROOT/cli/flannel/net-conf.json" "$RELAY_IP" <<-'PY'
		import json, sys
		c = json.load(open(sys.argv[1]))
		c["Network"] = "10.50.0.0/16"
		c["SubnetLen"] = 24
		c["Backend"]["PreStartupCommand"] += " --relay-url wss://%s:6443/v1-meshvpn/relay --relay-ca $MESHVPN_RELAY_CA --metrics-listen 127.0.0.1:9586" % sys.argv[2]
		print(json.dumps(c))
	PY
	)
	if ectl put "$PREFIX/config" "$conf" >/dev/null; then
		pass "setup: etcd in $U holds the network config (extension backend, meshvpn commands)"
	else
		fail "etcd: $(tail -5 "$T/etcd.log")"
		return
	fi

	# --- three nodes ---
	for n in 1 2 3; do add_node "$n" && start_flanneld "$n"; done
	for n in 1 2 3; do
		wait_subnet "$n" && add_pod "$n" || {
			no_lease "$n"
			return
		}
	done
	pass "flanneld leased $(subnet_of 1) $(subnet_of 2) $(subnet_of 3); pods at $(pod_ip 1) $(pod_ip 2) $(pod_ip 3)"
	if wait_peers 1 2 && wait_peers 2 2 && wait_peers 3 2; then
		pass "every meshvpn daemon has the 2 other nodes as peers (subnet-add from flanneld)"
	else
		fail "peers: n1 $(npeers 1) n2 $(npeers 2) n3 $(npeers 3) (flanneld 1: $(grep -i error "$T/flanneld-1.log" | tail -3))"
	fi
	local a b ok=1
	for a in 1 2 3; do for b in 1 2 3; do
		((a == b)) && continue
		pod_ping "$a" "$b" || { ok=0; fail "ping pod $a -> pod $b"; }
	done; done
	((ok)) && pass "pod-to-pod ping between every pair, both ways"
	ok=1
	local rates=""
	for pair in "1 2" "2 3" "3 1"; do
		set -- $pair
		if iperf_both "$(pod "$2")" "$(pod "$1")" "$(pod_ip "$2")"; then
			rates+=" $1->$2 $UP / $2->$1 $DOWN Gbit/s;"
		else
			ok=0
			fail "iperf3 pod $1 <-> pod $2 (up '$UP' down '$DOWN')"
		fi
	done
	((ok)) && pass "iperf3 both ways between every pair:$rates"
	head -c 8M /dev/urandom >"$T/blob"
	BLOB_SUM=$(sha256sum "$T/blob" | cut -d' ' -f1)
	for n in 1 2 3; do
		(cd "$T" && in_ns "$(pod "$n")" timeout 300 python3 -m http.server -b "$(pod_ip "$n")" 8080 >/dev/null 2>&1 &)
	done
	for n in 1 2 3; do wait_listen "$(pod "$n")" 8080; done
	ok=1
	for a in 1 2 3; do for b in 1 2 3; do
		((a == b)) && continue
		curl_check "$a" "$b" || { ok=0; fail "curl pod $a <- pod $b: checksum"; }
	done; done
	((ok)) && pass "HTTP download of 8 MiB between every pair, SHA-256 verified"

	# --- the daemon killed and restarted: state restored ---
	local before after pid t
	before=$(peers_of 2)
	pid=$(daemon_pid 2)
	local argv
	argv=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)
	if [[ -n $pid ]] && kill -KILL "$pid"; then
		for i in $(seq 50); do [[ -d /sys/class/net ]] && ! in_ns "$(node 2)" ip link show "$(ifn 2)" >/dev/null 2>&1 && break; sleep 0.1; done
		# As systemd or the next pre-startup would: the same command line.
		in_ns "$(node 2)" $argv 2>>"$T/daemon-2-restart.log"
		if t=$(resume_time 1 2); then
			after=$(peers_of 2)
			if [[ $before == "$after" ]] && grep -qF "$(subnet_of 1 | sed 's|\.1/24|.0/24|')" <<<"$(routes_of 2)"; then
				pass "daemon SIGKILLed and restarted: same 2 peers and routes restored, pod traffic resumed after $t s (flannel ran nothing)"
			else
				fail "after restart: peers '$before' vs '$after', routes $(in_ns "$(node 2)" ip route show dev "$(ifn 2)")"
			fi
			pod_ping 2 3 && pod_ping 3 2 || fail "pod 2 <-> pod 3 after the restart"
		else
			fail "no pod traffic 30 s after the daemon restart ($(tail -5 "$T/daemon-2-restart.log"))"
		fi
	else
		fail "no daemon process for node 2"
	fi
	[[ $(stat -c %a "$(state 2)/$(ifn 2).json" 2>/dev/null) == 600 ]] &&
		pass "state file $(ifn 2).json is mode 0600" || fail "state file mode"
	if grep -rqF "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["private_key"])' "$(state 2)/$(ifn 2).json")" "$T"/*.log "$(state 2)"/*.log 2>/dev/null; then
		fail "a private key appears in a log"
	else
		pass "no private key in any daemon, flanneld or relay log"
	fi

	# --- node 3's underlay IP changes during a flow towards it ---
	# Only pod 1 sends (node 3 answers nothing until found again), so it is
	# node 3's daemon noticing its new address that brings traffic back.
	in_ns "$(pod 1)" ping -q -i 0.2 -w 25 "$(pod_ip 3)" >/dev/null 2>&1 &
	local bg=$!
	sleep 1
	ip -n "$(node 3)" addr add 10.240.0.13/24 dev eth0
	ip -n "$(node 3)" addr del 10.240.0.3/24 dev eth0
	local t2
	if t=$(resume_time 1 3) && t2=$(resume_time 2 3); then
		pass "node 3's underlay IP 10.240.0.3 -> 10.240.0.13 during a flow to it: pod 1 -> pod 3 answered again after $t s, pod 2 -> pod 3 after $t2 s more, nothing restarted"
	else
		fail "no pod traffic to node 3 30 s after its IP change (daemon 3: $(grep -c 'addresses changed' "$(state 3)"/*.log) address-change lines)"
	fi
	kill "$bg" 2>/dev/null
	wait "$bg" 2>/dev/null
	# flannel's PUBLIC_IP for node 3 is now stale; a re-run of subnet-add
	# with it must not undo the roamed endpoint.
	local pub3
	pub3=$(in_ns "$(node 3)" wg show "$(ifn 3)" public-key)
	stop_flanneld 1
	start_flanneld 1
	sleep 3
	if pod_ping 1 3 && [[ $(field "$(node 1)" "$(ifn 1)" endpoints "$pub3" 2) == 10.240.0.13:* ]]; then
		pass "flanneld restart re-ran subnet-add with node 3's old PUBLIC_IP: the roamed endpoint 10.240.0.13 was kept (a hint only)"
	else
		fail "after the subnet-add re-run node 1 sees node 3 at $(field "$(node 1)" "$(ifn 1)" endpoints "$pub3" 2)"
	fi

	# --- flanneld restart after a lease went away while it was down ---
	stop_flanneld 1
	stop_flanneld 3
	ectl del "$PREFIX/subnets/$(subnet_of 3 | sed 's|\.1/24|.0-24|')" >/dev/null
	start_flanneld 1
	sleep 7
	if [[ $(npeers 1) == 1 ]] && pod_ping 1 2 && ! grep -qF "$(subnet_of 3 | sed 's|\.1/24|.0/24|')" <<<"$(routes_of 1)"; then
		pass "flanneld restarted after node 3's lease went away: its peer and route were pruned, node 2 still reachable, no duplicate"
	else
		fail "stale peers on node 1: $(npeers 1) peers; routes $(in_ns "$(node 1)" ip route show dev "$(ifn 1)" | tr '\n' ';')"
	fi
	wait_peers 2 1 && pass "node 2 got subnet-remove for node 3 (1 peer left)" || fail "node 2 still has $(npeers 2) peers"

	# --- two nodes joining later, behind one NAT IP; UDP between node 4
	# and node 2 blocked from the start (a firewall between them) ---
	for n in 4 5; do add_node "$n"; done
	block_udp 4 "ip daddr 10.240.0.2 udp dport 51820" && block_udp 2 "ip daddr 10.240.0.100 meta l4proto udp" ||
		fail "nftables: cannot block UDP between nodes 4 and 2"
	for n in 4 5; do start_flanneld "$n"; done
	for n in 4 5; do
		wait_subnet "$n" && add_pod "$n" || {
			no_lease "$n"
			return
		}
	done
	if wait_peers 1 3 && wait_peers 2 3 && wait_peers 4 3 && wait_peers 5 3; then
		pass "nodes 4 and 5 joined later (behind NAT 10.240.0.100): every node has 3 peers"
	else
		fail "peers after the join: $(npeers 1) $(npeers 2) $(npeers 4) $(npeers 5)"
	fi
	ok=1
	# The NATed nodes speak first (their PUBLIC_IP is unreachable); the
	# others then roam to the NAT's address and answer.
	for pair in "4 1" "5 1"; do
		set -- $pair
		pod_ping "$1" "$2" && pod_ping "$2" "$1" || { ok=0; fail "pod $1 <-> pod $2 through the NAT"; }
	done
	pod_ping 4 5 && pod_ping 5 4 || { ok=0; fail "pod 4 <-> pod 5 on their LAN"; }
	local e4 e5
	e4=$(field "$(node 1)" "$(ifn 1)" endpoints "$(in_ns "$(node 4)" wg show "$(ifn 4)" public-key)" 2)
	e5=$(field "$(node 1)" "$(ifn 1)" endpoints "$(in_ns "$(node 5)" wg show "$(ifn 5)" public-key)" 2)
	if ((ok)) && [[ $e4 == 10.240.0.100:* && $e5 == 10.240.0.100:* && $e4 != "$e5" ]]; then
		pass "two nodes behind one NAT IP: node 1 reaches them at $e4 and $e5"
	else
		fail "NAT endpoints seen by node 1: '$e4' '$e5'"
	fi

	# --- nodes 4 and 2, UDP blocked: the relay, then UDP again ---
	local pub2 pub4 via="" end
	pub2=$(in_ns "$(node 2)" wg show "$(ifn 2)" public-key)
	pub4=$(in_ns "$(node 4)" wg show "$(ifn 4)" public-key)
	end=$((SECONDS + 40))
	while ((SECONDS < end)); do
		in_ns "$(pod 4)" ping -q -c 1 -W 1 "$(pod_ip 2)" >/dev/null 2>&1
		via=$(field "$(node 4)" "$(ifn 4)" endpoints "$pub2" 2)
		[[ $via == "[100::"* ]] && break
		sleep 0.5
	done
	if [[ $via == "[100::"* ]] && pod_ping 4 2 && pod_ping 2 4; then
		pass "UDP between node 4 (behind NAT) and node 2 blocked: pod traffic through the relay (node 4 sees node 2 at $via)"
	else
		fail "relay: node 4 sees node 2 at '$via' (node 4: $(in_ns "$(node 4)" wg show "$(ifn 4)" dump | grep "^$pub2" | cut -f3-7); node 2: $(in_ns "$(node 2)" wg show "$(ifn 2)" dump | grep "^$pub4" | cut -f3-7))"
	fi
	for n in 2 4; do in_ns "$(node "$n")" nft delete table inet mvblock; done
	end=$((SECONDS + 40))
	while ((SECONDS < end)); do
		in_ns "$(pod 4)" ping -q -c 1 -W 1 "$(pod_ip 2)" >/dev/null 2>&1
		via=$(field "$(node 4)" "$(ifn 4)" endpoints "$pub2" 2)
		[[ $via == 10.240.0.2:* && $(field "$(node 2)" "$(ifn 2)" endpoints "$pub4" 2) == 10.240.0.100:* ]] && break
		sleep 0.5
	done
	[[ $via == 10.240.0.2:* ]] && pod_ping 4 2 &&
		pass "UDP unblocked: both back on UDP (node 4 sees $via, node 2 sees $(field "$(node 2)" "$(ifn 2)" endpoints "$pub4" 2))" ||
		fail "still at '$via' / '$(field "$(node 2)" "$(ifn 2)" endpoints "$pub4" 2)' after unblocking"

	# --- nodes 1 and 2 (talking over UDP) cut off from each other mid-flow ---
	local pub2b t0m
	pub2b=$(in_ns "$(node 2)" wg show "$(ifn 2)" public-key)
	block_udp 1 "ip daddr 10.240.0.2 udp dport 51820" && block_udp 2 "ip daddr 10.240.0.1 udp dport 51820" ||
		fail "nftables: cannot block UDP between nodes 1 and 2"
	t0m=$SECONDS
	end=$((SECONDS + 60))
	while ((SECONDS < end)); do
		in_ns "$(pod 1)" ping -q -c 1 -W 1 "$(pod_ip 2)" >/dev/null 2>&1
		via=$(field "$(node 1)" "$(ifn 1)" endpoints "$pub2b" 2)
		[[ $via == "[100::"* ]] && break
		sleep 0.5
	done
	if [[ $via == "[100::"* ]] && pod_ping 1 2; then
		pass "UDP between nodes 1 and 2 cut during a ping flow: moved to the relay after $((SECONDS - t0m)) s"
	else
		fail "mid-flow cut: node 1 sees node 2 at '$via' after $((SECONDS - t0m)) s"
	fi
	for n in 1 2; do in_ns "$(node "$n")" nft delete table inet mvblock; done

	# --- status and metrics ---
	local st
	st=$(in_ns "$(node 1)" env MESHVPN_FLANNEL_INTERFACE="$(ifn 1)" "$MESHVPN_BIN" status 2>&1)
	st+=$(in_ns "$(node 1)" env MESHVPN_FLANNEL_INTERFACE="$(ifn 1)" "$MESHVPN_BIN" status --metrics 127.0.0.1:9586 2>&1)
	if grep -q "subnet $(subnet_of 2 | sed 's|\.1/24|.0/24|')" <<<"$st" && grep -q "path udp" <<<"$st" &&
		grep -q "rtt .* ms, drops" <<<"$st"; then
		pass "meshvpn status lists node 2's subnet, endpoint, path, and with --metrics RTT and drops"
	else
		fail "status: $st"
	fi

	metrics_check

	# --- a lease removed: peer and route go away everywhere ---
	local sub5
	sub5=$(subnet_of 5 | sed 's|\.1/24|.0/24|')
	ectl del "$PREFIX/subnets/${sub5/\//-}" >/dev/null
	if wait_peers 1 2 && wait_peers 2 2 && wait_peers 4 2 &&
		! grep -qF "$sub5" <<<"$(routes_of 1)"; then
		pass "node 5's lease removed: its peer and route left nodes 1, 2 and 4"
	else
		fail "after removing node 5's lease: peers $(npeers 1) $(npeers 2) $(npeers 4)"
	fi

	# --- bad input to each command ---
	bad_input
}

# metrics_check: node 1's --metrics-listen page parses with Prometheus's
# own text parser, has the exporter families, and its per-peer bytes and
# handshake times equal `wg show` (read just before and just after).
metrics_check() {
	local n1 if1 w1 w2 page parsed ok=1 key rx1 tx1 rx2 tx2 sent recv hs hs1 hs2 f
	n1=$(node 1) if1=$(ifn 1)
	w1=$(in_ns "$n1" wg show "$if1" dump | tail -n +2)
	page=$(in_ns "$n1" curl -sf --max-time 5 http://127.0.0.1:9586/metrics)
	w2=$(in_ns "$n1" wg show "$if1" dump | tail -n +2)
	if ! parsed=$("$PROMCHECK_BIN" <<<"$page" 2>&1); then
		fail "metrics: not Prometheus text: $parsed"
		return
	fi
	for f in "wireguard_sent_bytes_total COUNTER" "wireguard_received_bytes_total COUNTER" \
		"wireguard_latest_handshake_seconds GAUGE" "meshvpn_peer_drops_total COUNTER" \
		"meshvpn_peer_path GAUGE" "meshvpn_engine_rx_invalid_mac_total COUNTER"; do
		grep -q "^$f " <<<"$parsed" || { ok=0; fail "metrics: no $f"; }
	done
	# dump columns: key psk endpoint allowed-ips handshake rx tx keepalive
	while read -r key _ _ _ hs1 rx1 tx1 _; do
		read -r _ _ _ _ hs2 rx2 tx2 _ < <(awk -v k="$key" '$1 == k' <<<"$w2")
		sent=$(awk -v k="public_key=$key" '$1 == "wireguard_sent_bytes_total" && $3 == k { print $4 }' <<<"$parsed")
		recv=$(awk -v k="public_key=$key" '$1 == "wireguard_received_bytes_total" && $3 == k { print $4 }' <<<"$parsed")
		hs=$(awk -v k="public_key=$key" '$1 == "wireguard_latest_handshake_seconds" && $3 == k { print $4 }' <<<"$parsed")
		if ! ((tx1 <= sent && sent <= tx2 && rx1 <= recv && recv <= rx2)) || [[ $hs != "$hs1" && $hs != "$hs2" ]]; then
			ok=0
			fail "metrics vs wg show for $key: sent $sent in [$tx1,$tx2], received $recv in [$rx1,$rx2], handshake $hs vs $hs1/$hs2"
		fi
	done <<<"$w1"
	((ok)) && pass "metrics: $(grep -c . <<<"$parsed") samples parse as Prometheus text (expfmt); per-peer bytes and handshake times equal wg show for $(grep -c . <<<"$w1") peers"
}

# expect_fail WHAT PATTERN CMD...: CMD exits non-zero and says PATTERN.
expect_fail() {
	local what=$1 pattern=$2 out
	shift 2
	if out=$("$@" 2>&1); then
		fail "$what: exited 0 ($out)"
	elif grep -qi -- "$pattern" <<<"$out"; then
		pass "$what: refused ($(head -1 <<<"$out" | cut -c1-110))"
	else
		fail "$what: message '$out' lacks '$pattern'"
	fi
}

bad_input() {
	local n1 if1 key
	n1=$(node 1) if1=$(ifn 1)
	key=$(in_ns "$n1" wg show "$if1" public-key)
	local run=(in_ns "$n1" env MESHVPN_FLANNEL_INTERFACE="$if1" MESHVPN_STATE_DIR="$(state 1)")
	expect_fail "subnet-add without SUBNET" "SUBNET is not set" \
		"${run[@]}" PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add </dev/null
	expect_fail "subnet-add with SUBNET=garbage" "not an address prefix" \
		"${run[@]}" SUBNET=garbage PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add </dev/null
	expect_fail "subnet-add with malformed backend-data" "not JSON" \
		"${run[@]}" SUBNET=10.50.99.0/24 PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add <<<'{"v":1,'
	expect_fail "subnet-add with backend-data version 9" "version 9" \
		"${run[@]}" SUBNET=10.50.99.0/24 PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add <<<'{"v":9}'
	expect_fail "subnet-add with a bad key" "publicKey" \
		"${run[@]}" SUBNET=10.50.99.0/24 PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add <<<'{"v":1,"publicKey":"xx","port":51820}'
	expect_fail "subnet-add with our own key" "own key" \
		"${run[@]}" SUBNET=10.50.99.0/24 PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add <<<"{\"v\":1,\"publicKey\":\"$key\",\"port\":51820}"
	expect_fail "subnet-remove with empty backend-data" "no backend-data" \
		"${run[@]}" SUBNET=10.50.99.0/24 "$MESHVPN_BIN" flannel subnet-remove </dev/null
	expect_fail "post-startup without NETWORK" "NETWORK is not set" \
		"${run[@]}" SUBNET=10.50.99.0/24 "$MESHVPN_BIN" flannel post-startup
	expect_fail "subnet-add with the daemon not running" "not running" \
		in_ns "$n1" env MESHVPN_FLANNEL_INTERFACE=nodaemon$ID SUBNET=10.50.99.0/24 PUBLIC_IP=10.240.0.9 \
		"$MESHVPN_BIN" flannel subnet-add <<<"{\"v\":1,\"publicKey\":\"$(wg genkey | wg pubkey)\",\"port\":51820}"
	expect_fail "pre-startup that cannot start a daemon (bad interface name)" "did not start\|interface name" \
		in_ns "$n1" env MESHVPN_FLANNEL_INTERFACE="bad/name" MESHVPN_STATE_DIR="$T/state-bad" "$MESHVPN_BIN" flannel pre-startup
	# Idempotence: the same subnet-add twice leaves one peer, one route.
	local k
	k=$(wg genkey | wg pubkey)
	for i in 1 2; do
		"${run[@]}" SUBNET=10.50.99.0/24 PUBLIC_IP=10.240.0.9 "$MESHVPN_BIN" flannel subnet-add <<<"{\"v\":1,\"publicKey\":\"$k\",\"port\":51820}" >/dev/null 2>&1
	done
	local c1 r1
	c1=$(npeers 1)
	r1=$(in_ns "$n1" ip route show dev "$if1" | grep -c 10.50.99.0/24)
	for i in 1 2; do
		"${run[@]}" SUBNET=10.50.99.0/24 "$MESHVPN_BIN" flannel subnet-remove <<<"{\"v\":1,\"publicKey\":\"$k\",\"port\":51820}" >/dev/null 2>&1 || { fail "subnet-remove run $i exited non-zero"; }
	done
	if [[ $r1 == 1 ]] && (($(npeers 1) == c1 - 1)) && ! grep -qF 10.50.99.0/24 <<<"$(routes_of 1)"; then
		pass "subnet-add twice: one peer, one route; subnet-remove twice: both gone, second run exits 0"
	else
		fail "idempotence: route count $r1, peers $c1 -> $(npeers 1)"
	fi
}

# --- benchmark: the same 3-node flannel topology per implementation ------
#
# flannel.sh --bench: for meshvpn, Debian wireguard-go and current
# wireguard-go (benches/wggo), the daemon of each node is started first
# (as a systemd unit would), so the same `meshvpn flannel` commands,
# which speak the UAPI as `wg` does, configure whichever runs. Pod 1 ->
# pod 2: iperf3 TCP single flow and 4 flows (5 s each), ping idle and
# under a 4-flow load (median RTT of 20). Prints one table row each.

# bench_impl IMPL: one cluster, measured, torn down.
bench_impl() {
	local impl=$1 n
	PREFIX=/meshvpn-bench/$impl
	ectl put "$PREFIX/config" "$BENCH_CONF" >/dev/null || return 1
	local nodes=()
	for n in 1 2 3; do
		add_node "$n" || return 1
		start_impl "$impl" "$(node "$n")" "$(ifn "$n")" || { echo "cannot start $impl"; return 1; }
		start_flanneld "$n"
		nodes+=("$(node "$n")")
	done
	for n in 1 2 3; do wait_subnet "$n" && add_pod "$n" || return 1; done
	for n in 1 2 3; do wait_peers "$n" 2 || return 1; done
	pod_ping 1 2 && pod_ping 2 1 || return 1
	local one four idle loaded
	one=$(iperf "$(pod 2)" "$(pod 1)" "$(pod_ip 2)")
	four=$(iperf "$(pod 2)" "$(pod 1)" "$(pod_ip 2)" -P 4 | tail -1) # the SUM line
	idle=$(in_ns "$(pod 1)" ping -c 20 -i 0.05 -W 1 "$(pod_ip 2)" 2>/dev/null | median_rtt)
	iperf_server "$(pod 2)" "$(pod_ip 2)" 15
	in_ns "$(pod 1)" timeout 15 iperf3 -c "$(pod_ip 2)" -p 5201 -t 6 -P 4 >/dev/null 2>&1 &
	local load=$!
	sleep 1
	loaded=$(in_ns "$(pod 1)" ping -c 20 -i 0.1 -W 1 "$(pod_ip 2)" 2>/dev/null | median_rtt)
	wait "$load" "$IPERF_SERVER" 2>/dev/null
	printf '| %-13s | %8s | %8s | %8s | %8s |\n' "$impl" "${one:--}" "${four:--}" "${idle:--}" "${loaded:--}"
	for n in 1 2 3; do stop_flanneld "$n"; done
	del_ns "${nodes[@]}" "$(pod 1)" "$(pod 2)" "$(pod 3)"
	rm -f "$T"/subnet-*.env
}

median_rtt() { awk -F'time=' '/time=/ { split($2, a, " "); print a[1] }' | sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.3f", v[int((NR + 1) / 2)] }'; }

bench_main() {
	underlay || return 1
	in_ns "$U" etcd --data-dir "$T/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
		--listen-peer-urls http://127.0.0.1:2380 >"$T/etcd.log" 2>&1 &
	local i impls="meshvpn wireguard-go"
	for i in $(seq 50); do ectl endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
	BENCH_CONF=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["Network"]="10.50.0.0/16"; c["SubnetLen"]=24; print(json.dumps(c))' "$ROOT/cli/flannel/net-conf.json")
	WGGO_BIN=$T/wggo
	if (cd "$ROOT/benches/wggo" && timeout 300 go build -o "$WGGO_BIN" .) >"$T/wggo-build.log" 2>&1; then
		export WGGO_BIN
		impls+=" wggo"
	else
		echo "SKIP wggo: $(tail -2 "$T/wggo-build.log")"
	fi
	echo "pod 1 -> pod 2 through flannel's extension backend, 3 nodes, $(nproc) cores"
	echo "| implementation | 1 flow Gbit/s | 4 flows Gbit/s | ping idle ms | ping loaded ms |"
	echo "|---|---|---|---|---|"
	for i in $impls; do bench_impl "$i" || echo "| $i | failed (see $T) |"; done
}

t_start=$SECONDS
if [[ ${1:-} == --bench ]]; then
	bench_main
	exit 0
fi
main
echo "flannel suite took $((SECONDS - t_start)) s"
# The logs (never the state files: they hold private keys) for CI.
LOGS=${FLANNEL_LOGS:-$ROOT/target/ci-logs/flannel}
rm -rf "$LOGS" && mkdir -p "$LOGS" && cp "$T"/*.log "$LOGS"/ 2>/dev/null
for n in 1 2 3 4 5; do cp "$(state "$n")"/*.log "$LOGS/daemon-$n.log" 2>/dev/null; done
echo "$PASSED passed, $FAILED failed"
((FAILED == 0 && PASSED > 0))
