# Shared helpers of the control-server suites (control.sh, control_k3s.sh):
# sourced after lib.sh, not run. The caller sets CTL_NS (the namespace
# prefix: node NAME lives in CTL_NS-NAME, the server in CTL_NS-p), CTL_NET
# (the first two octets of the underlay: node N is CTL_NET.N.2, the server
# CTL_NET.0.1 on the routing namespace's loopback) and CTL_IF (the TUN
# prefix: node NAME's interface is CTL_IF NAME ID).
#
# Sets P, SERVER, URL, DB. Functions: ctl control_ns node_ns serve up
# joined status has_peer policy_is wait_for.

P=$CTL_NS-p
SERVER=$CTL_NET.0.1
URL=ws://$SERVER:8443/v1-meshvpn/control
DB=$T/control.db
ctl() { meshvpn control --db "$DB" "$@"; }

# control_ns: the routing namespace P, with the server's address.
control_ns() {
	add_ns "$P" || return 1
	ip -n "$P" addr add "$SERVER/32" dev lo
	in_ns "$P" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

# node_ns N NAME: namespace CTL_NS-NAME, CTL_NET.N.2 behind P.
node_ns() {
	local n=$1 ns=$CTL_NS-$2
	add_ns "$ns" || return 1
	ip -n "$P" link add "p$n" type veth peer name eth0 netns "$ns"
	ip -n "$P" addr add "$CTL_NET.$n.1/24" dev "p$n"
	ip -n "$P" link set "p$n" up
	ip -n "$ns" addr add "$CTL_NET.$n.2/24" dev eth0
	ip -n "$ns" link set eth0 up
	ip -n "$ns" route add default via "$CTL_NET.$n.1"
}

# serve: `meshvpn control serve` in P on 8443; its pid in SERVER_PID.
SERVER_PID=
serve() {
	# Not through in_ns (a function: $! would be a subshell): ip netns exec
	# execs meshvpn, so $! is the server's pid.
	ip netns exec "$P" meshvpn control --db "$DB" serve --listen 0.0.0.0:8443 --plain >>"$T/server.log" 2>&1 &
	SERVER_PID=$!
	wait_listen "$P" 8443
}

# up NAME [ARGS...]: `meshvpn up` in ns CTL_NS-NAME, state in $T/NAME,
# interface CTL_IF NAME ID; its pid in UP_PID[NAME], its output in
# $T/NAME.log.
declare -A UP_PID
up() {
	local name=$1
	shift
	ip netns exec "$CTL_NS-$name" meshvpn up --control "$URL" --state-dir "$T/$name" \
		--interface "$CTL_IF$name$ID" --hostname "$name" "$@" >>"$T/$name.log" 2>&1 &
	UP_PID[$name]=$!
}

# joined NAME: its `meshvpn up` printed that it joined (10 s at most); sets
# V4 and V6 to its mesh addresses.
joined() {
	local i
	for i in $(seq 100); do
		if grep -q "^joined" "$T/$1.log" 2>/dev/null; then
			read -r V4 V6 < <(grep "^joined" "$T/$1.log" | tail -1 | awk '{ print $(NF-1), $NF }')
			return 0
		fi
		sleep 0.1
	done
	return 1
}

status() { meshvpn up --status --state-dir "$T/$1" 2>/dev/null; }
# has_peer NAME PEER: PEER is in NAME's status.
has_peer() { status "$1" | grep -q "^peer $2 "; }
# policy_is NODE VERSION: NODE's engine enforces the policy's VERSION.
policy_is() { status "$1" | grep -q "^policy version $2: .*enforced"; }

# wait_for SECONDS CMD...: CMD succeeds within SECONDS (checked every 0.1 s).
wait_for() {
	local n=$(($1 * 10)) i
	shift
	for i in $(seq "$n"); do
		"$@" && return 0
		sleep 0.1
	done
	return 1
}
