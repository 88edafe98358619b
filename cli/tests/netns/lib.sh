# Shared helpers of the root namespace tests and benchmarks: sourced, not run.
#
# Sourcing it checks for root, `ip netns` and /dev/net/tun (exiting with
# SKIP when they are missing), checks for the Debian tools, makes a private
# temp dir $T (with `meshvpn` on PATH for wg-quick), and installs a cleanup
# trap that kills every process in the namespaces made through make_pair or
# add_ns and deletes them. The caller sets ROOT first, and may set
# MESHVPN_BIN (default: the release build, else the debug build under ROOT)
# and NETNS_TOOLS (default: wireguard-go wg wg-quick iperf3 ping).
#
# Functions: skip pass fail in_ns add_ns del_ns make_pair start_impl
# configure tunnel_pair pings no_pings iperf_server iperf iperf_both
# wait_gone field hex positive userspace_setup userspace_peer wait_listen.
# Counters: PASSED FAILED. Namespaces: NAMESPACES.

skip() {
	echo "SKIP: $*"
	exit 0
}
[[ $(id -u) -eq 0 ]] || skip "network namespace tests need root"
command -v ip >/dev/null || skip "no ip command (iproute2)"
[[ -c /dev/net/tun ]] || skip "no /dev/net/tun"
ID=$$
NS_PROBE=mvprobe$ID
ip netns add "$NS_PROBE" 2>/dev/null || skip "ip netns is not available here"
ip netns del "$NS_PROBE"

missing=()
for tool in ${NETNS_TOOLS:-wireguard-go wg wg-quick iperf3 ping}; do
	command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
	echo "FAIL: missing ${missing[*]}: apt-get install -y --no-install-recommends wireguard-go wireguard-tools iperf3 iputils-ping iproute2" >&2
	exit 1
fi
if [[ -z ${MESHVPN_BIN:-} ]]; then
	MESHVPN_BIN=$ROOT/target/release/meshvpn
	[[ -x $MESHVPN_BIN ]] || MESHVPN_BIN=$ROOT/target/debug/meshvpn
fi
if [[ ! -x $MESHVPN_BIN ]]; then
	echo "FAIL: no meshvpn binary at $MESHVPN_BIN: run cargo build --release -p meshvpn-cli, or set MESHVPN_BIN" >&2
	exit 1
fi

umask 077
T=$(mktemp -d /tmp/meshvpn-netns.XXXXXX)
# wg-quick finds the implementation by name on PATH.
mkdir -p "$T/bin"
ln -s "$(readlink -f "$MESHVPN_BIN")" "$T/bin/meshvpn"
export PATH="$T/bin:$PATH"

NAMESPACES=()
PASSED=0
FAILED=0
pass() {
	echo "PASS: $*"
	PASSED=$((PASSED + 1))
}
fail() {
	echo "FAIL: $*"
	FAILED=$((FAILED + 1))
}

# del_ns NS...: stops the processes inside the namespaces (only those: our
# daemons and iperf3) and deletes them.
del_ns() {
	local ns pid
	for ns in "$@"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -TERM "$pid" 2>/dev/null
		done
	done
	sleep 0.5
	for ns in "$@"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns" 2>/dev/null
	done
}

cleanup() {
	del_ns "${NAMESPACES[@]}"
	rm -f /var/run/wireguard/*"$ID".sock
	rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() {
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}

# add_ns NS: a new namespace with loopback up, removed on exit.
add_ns() {
	ip netns add "$1" && NAMESPACES+=("$1") && ip -n "$1" link set lo up
}

# make_pair NS_A NS_B: two namespaces joined by a veth, underlay addresses set.
make_pair() {
	local a=$1 b=$2
	add_ns "$a" && add_ns "$b" || return 1
	ip -n "$a" link add va type veth peer name vb netns "$b"
	ip -n "$a" addr add 10.231.0.1/24 dev va
	ip -n "$b" addr add 10.231.0.2/24 dev vb
	ip -n "$a" addr add fd31::1/64 dev va nodad
	ip -n "$b" addr add fd31::2/64 dev vb nodad
	ip -n "$a" link set va up
	ip -n "$b" link set vb up
}

# start_impl IMPL NS IFNAME: runs meshvpn or wireguard-go, daemonized as
# wg-quick would, and waits for its UAPI socket. meshvpn gets the options
# in the array MESHVPN_ARGS, when set. The benchmarks add meshvpn-plain
# (TUN offloads off), boringtun (boringtun-cli) and wggo (current
# wireguard-go, built from benches/wggo into $WGGO_BIN).
start_impl() {
	local impl=$1 ns=$2 ifname=$3
	case $impl in
	meshvpn) in_ns "$ns" env LOG_LEVEL="${MESHVPN_LOG_LEVEL:-}" meshvpn ${MESHVPN_ARGS[@]+"${MESHVPN_ARGS[@]}"} "$ifname" >>"$T/$ifname.log" 2>&1 ;;
	meshvpn-plain) in_ns "$ns" env MESHVPN_TUN_OFFLOAD=0 meshvpn "$ifname" >>"$T/$ifname.log" 2>&1 ;;
	wireguard-go) in_ns "$ns" env LOG_LEVEL=error wireguard-go "$ifname" >>"$T/$ifname.log" 2>&1 ;;
	boringtun) in_ns "$ns" env WG_LOG_LEVEL=error boringtun-cli --disable-drop-privileges --log "$T/$ifname.boringtun.log" "$ifname" >>"$T/$ifname.log" 2>&1 ;;
	wggo) (in_ns "$ns" setsid "$WGGO_BIN" "$ifname" >>"$T/$ifname.log" 2>&1 &) ;;
	*) return 1 ;;
	esac || return 1
	local i
	for i in $(seq 50); do
		[[ -S /var/run/wireguard/$ifname.sock ]] && return 0
		sleep 0.1
	done
	return 1
}

# configure NS IFNAME KEYFILE PORT PEER_PUB PEER_ENDPOINT INNER4 INNER6 PEER4 PEER6
# (with the preshared key in $T/psk)
configure() {
	local ns=$1 ifname=$2 key=$3 port=$4 peer=$5 endpoint=$6 in4=$7 in6=$8 p4=$9 p6=${10}
	in_ns "$ns" wg set "$ifname" private-key "$key" listen-port "$port" \
		peer "$peer" preshared-key "$T/psk" endpoint "$endpoint" \
		allowed-ips "$p4/32,$p6/128" || return 1
	ip -n "$ns" addr add "$in4/24" dev "$ifname"
	ip -n "$ns" addr add "$in6/64" dev "$ifname" nodad
	ip -n "$ns" link set "$ifname" up
}

# tunnel_pair IMPL_A IMPL_B NS_A NS_B IF_A IF_B: a configured tunnel.
tunnel_pair() {
	local ia=$1 ib=$2 a=$3 b=$4 ifa=$5 ifb=$6
	wg genkey >"$T/$ifa.key"
	wg genkey >"$T/$ifb.key"
	wg genpsk >"$T/psk"
	PUB_A=$(wg pubkey <"$T/$ifa.key")
	PUB_B=$(wg pubkey <"$T/$ifb.key")
	make_pair "$a" "$b" || return 1
	start_impl "$ia" "$a" "$ifa" || return 1
	start_impl "$ib" "$b" "$ifb" || return 1
	configure "$a" "$ifa" "$T/$ifa.key" 51820 "$PUB_B" 10.231.0.2:51821 \
		10.232.0.1 fd32::1 10.232.0.2 fd32::2 || return 1
	configure "$b" "$ifb" "$T/$ifb.key" 51821 "$PUB_A" 10.231.0.1:51820 \
		10.232.0.2 fd32::2 10.232.0.1 fd32::1 || return 1
}

# pings NS DST: three echoes, at most 10 s.
pings() {
	in_ns "$1" ping -q -c 3 -i 0.2 -W 2 -w 10 "$2" >/dev/null 2>&1
}

# no_pings NS DST: not one of ten echoes in 3 s comes back.
no_pings() {
	! in_ns "$1" ping -q -c 10 -i 0.2 -W 1 -w 3 "$2" >/dev/null 2>&1
}

# iperf_server NS ADDR [SECONDS]: a one-shot iperf3 server on ADDR:5201,
# listening when this returns (its pid in IPERF_SERVER), gone after
# SECONDS (default 20) at the latest.
iperf_server() {
	in_ns "$1" timeout "${3:-20}" iperf3 -s -1 -B "$2" -p 5201 >/dev/null 2>&1 &
	IPERF_SERVER=$!
	wait_listen "$1" 5201
}

# iperf NS_SERVER NS_CLIENT SERVER_ADDR [-R]: prints Gbit/s of a 5 s TCP run
# (client to server, or server to client with -R), or nothing. The client
# dials SERVER_ADDR port 5201 unless IPERF_DIAL="ADDR PORT" says otherwise
# (a port forward in front of the server); IPERF_SECONDS replaces the 5 s.
iperf() {
	local srv=$1 cli=$2 addr=$3
	shift 3
	local dial=(${IPERF_DIAL:-$addr 5201})
	iperf_server "$srv" "$addr"
	# iperf3 picks the unit (Kbits, Mbits, Gbits); print Gbit/s, 3 decimals.
	in_ns "$cli" timeout 20 iperf3 -c "${dial[0]}" -p "${dial[1]}" -t "${IPERF_SECONDS:-5}" "$@" 2>/dev/null |
		awk '/receiver/ { for (i = 1; i <= NF; i++) {
			if ($i == "Gbits/sec") printf "%.3f\n", $(i - 1)
			if ($i == "Mbits/sec") printf "%.3f\n", $(i - 1) / 1e3
			if ($i == "Kbits/sec") printf "%.3f\n", $(i - 1) / 1e6 } }'
	wait "$IPERF_SERVER" 2>/dev/null
}

hex() { printf '%s' "$1" | base64 -d | od -An -tx1 | tr -d ' \n'; }

positive() { awk -v x="${1:-0}" 'BEGIN { exit !(x > 0) }'; }

# iperf_both NS_SERVER NS_CLIENT SERVER_ADDR: sets UP (client to server) and
# DOWN (server to client) in Gbit/s; fails unless both are positive.
iperf_both() {
	UP=$(iperf "$@")
	DOWN=$(iperf "$@" -R)
	positive "$UP" && positive "$DOWN"
}

# wait_gone NS IFNAME: the daemon of IFNAME has exited and removed its socket.
wait_gone() {
	local ns=$1 ifname=$2 i
	for i in $(seq 50); do
		if [[ ! -S /var/run/wireguard/$ifname.sock ]] && [[ -z $(ip netns pids "$ns") ]]; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

field() { # field NS IFNAME WHAT PEER COLUMN: one column of `wg show IFNAME WHAT` for PEER
	in_ns "$1" wg show "$2" "$3" | awk -v p="$4" -v c="$5" '$1 == p { print $c }'
}


# userspace_setup NS_A NS_B IF_B [IMPL]: namespaces for userspace clients
# (no TUN) in NS_A against IF_B in NS_B, run by IMPL (start_impl's names;
# Debian wireguard-go by default) (10.232.0.2, fd32::2, port 51821, no
# peers yet; PUB_B set). Add clients with userspace_peer.
userspace_setup() {
	local a=$1 b=$2 ifb=$3 impl=${4:-wireguard-go}
	wg genkey >"$T/$ifb.key"
	wg genpsk >"$T/psk"
	PUB_B=$(wg pubkey <"$T/$ifb.key")
	make_pair "$a" "$b" || return 1
	start_impl "$impl" "$b" "$ifb" || return 1
	in_ns "$b" wg set "$ifb" private-key "$T/$ifb.key" listen-port 51821 || return 1
	ip -n "$b" addr add 10.232.0.2/24 dev "$ifb"
	ip -n "$b" addr add fd32::2/64 dev "$ifb" nodad
	ip -n "$b" link set "$ifb" up
}

# userspace_peer NS_B IF_B NAME PORT INNER4 INNER6: a key for client NAME
# (listening on underlay port PORT in the other namespace, owning the inner
# addresses), added as a peer of IF_B with the preshared key; writes
# $T/NAME.key and $T/NAME.conf (wg-quick, with `Address =`).
userspace_peer() {
	local b=$1 ifb=$2 name=$3 port=$4 in4=$5 in6=$6
	wg genkey >"$T/$name.key"
	in_ns "$b" wg set "$ifb" peer "$(wg pubkey <"$T/$name.key")" preshared-key "$T/psk" \
		allowed-ips "$in4/32,$in6/128" || return 1
	cat >"$T/$name.conf" <<CONF
[Interface]
PrivateKey = $(cat "$T/$name.key")
ListenPort = $port
Address = $in4/32, $in6/128

[Peer]
PublicKey = $PUB_B
PresharedKey = $(cat "$T/psk")
Endpoint = 10.231.0.2:51821
AllowedIPs = 10.232.0.2/32, fd32::2/128
PersistentKeepalive = 25
CONF
}

# wait_listen NS PORT: a TCP socket listens on PORT in NS (5 s at most).
wait_listen() {
	local ns=$1 port=$2 i
	for i in $(seq 50); do
		in_ns "$ns" ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && return 0
		sleep 0.1
	done
	return 1
}

# relay_certs IP: a throwaway CA ($T/ca.pem) and a relay server certificate
# for IP ($T/relay.pem, $T/relay.key); openssl's output in $T/openssl.log.
relay_certs() {
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
		-subj /CN=meshvpn-test-ca -keyout "$T/ca.key" -out "$T/ca.pem" &&
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
			-subj /CN=relay -keyout "$T/relay.key" -out "$T/relay.csr" &&
		printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
			"$1" >"$T/relay.ext" &&
		openssl x509 -req -in "$T/relay.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" \
			-CAcreateserial -days 1 -extfile "$T/relay.ext" -out "$T/relay.pem"
} >"$T/openssl.log" 2>&1
