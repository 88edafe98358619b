# Shared helpers of the NAT suites (nat.sh, nat_pairs.sh): sourced after
# lib.sh, not run. The caller sets P (the public namespace: the internet
# between the routers), PUB (its address, where the relay listens on TCP
# 8443) and, for daemons, $T/token; STUN_SERVERS (array, default our
# server on $PUB:6443 and coturn on $PUB:3478) is what daemons ask.
#
# Functions: router lan_node public_node wait_udp counters count daemon
# peer endpoint metric tput.

# router N ROUTER NODE MASQUERADE: NODE 192.168.N.2 behind ROUTER, whose
# public side is 10.240.N.2 toward P; MASQUERADE is the nft statement.
# The router's LAN side is a bridge named "lan", so lan_node can put more
# nodes on the same LAN.
router() {
	local n=$1 r=$2 node=$3 masq=$4
	add_ns "$r" || return 1
	ip -n "$P" link add "p$n" type veth peer name wan netns "$r"
	ip -n "$P" addr add "10.240.$n.1/24" dev "p$n"
	ip -n "$P" link set "p$n" up
	ip -n "$r" addr add "10.240.$n.2/24" dev wan
	ip -n "$r" link set wan up
	ip -n "$r" route add default via "10.240.$n.1"
	ip -n "$r" link add lan type bridge
	ip -n "$r" addr add "192.168.$n.1/24" dev lan
	ip -n "$r" link set lan up
	ip -n "$P" addr add "fd40:$n::1/64" dev "p$n" nodad
	ip -n "$r" addr add "fd40:$n::2/64" dev wan nodad
	ip -n "$r" route add default via "fd40:$n::1"
	ip -n "$r" addr add "fd41:$n::1/64" dev lan nodad
	lan_node "$n" "$r" "$node" 2 || return 1
	# The bridge switches LAN to LAN traffic as a home router's switch
	# does: not through the IP hooks (br_netfilter, when loaded, would pass
	# it through the forward counters below).
	[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] &&
		in_ns "$r" sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0
	in_ns "$r" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 &&
		in_ns "$r" nft -f - <<NFT
table inet nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" $masq
	}
}
NFT
}

# lan_node N ROUTER NODE HOST: NODE at 192.168.N.HOST (fd41:N::HOST) on
# ROUTER's LAN bridge, its default route through ROUTER.
lan_node() {
	local n=$1 r=$2 node=$3 h=$4
	add_ns "$node" || return 1
	ip -n "$r" link add "l$h" type veth peer name eth0 netns "$node"
	ip -n "$r" link set "l$h" master lan
	ip -n "$r" link set "l$h" up
	ip -n "$node" addr add "192.168.$n.$h/24" dev eth0
	ip -n "$node" link set eth0 up
	ip -n "$node" route add default via "192.168.$n.1"
	ip -n "$node" addr add "fd41:$n::$h/64" dev eth0 nodad
	ip -n "$node" route add default via "fd41:$n::1"
}

# public_node N NODE: NODE with the public address 10.240.N.2 on a link to
# P (10.240.N.1), no NAT and no firewall in front of it.
public_node() {
	local n=$1 node=$2
	add_ns "$node" || return 1
	ip -n "$P" link add "p$n" type veth peer name eth0 netns "$node"
	ip -n "$P" addr add "10.240.$n.1/24" dev "p$n"
	ip -n "$P" link set "p$n" up
	ip -n "$node" addr add "10.240.$n.2/24" dev eth0
	ip -n "$node" link set eth0 up
	ip -n "$node" route add default via "10.240.$n.1"
}

# wait_udp NS PORT: a UDP socket is bound to PORT in NS (5 s at most).
wait_udp() {
	local i
	for i in $(seq 50); do
		in_ns "$1" ss -Hlun "sport = :$2" 2>/dev/null | grep -q . && return 0
		sleep 0.1
	done
	return 1
}

# counters ROUTER: nftables counters in ROUTER's forward path: TCP to the
# relay (port 8443), and UDP from its node toward the other NATs' public
# addresses and LANs (probes and direct traffic; not STUN); on its input,
# UDP from the LAN to the router's own public address (hairpinning). And a home
# router's firewall: unsolicited datagrams to the router itself are
# dropped. Without it Linux confirms a conntrack entry for a peer's probe
# that arrives before our node's own probe went out, and masquerade then
# gives our node's probe another source port (the tuple would clash), so
# the holes never meet.
counters() {
	in_ns "$1" nft -f - <<NFT
table inet count {
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "wan" ct state new drop
		iifname "lan" ip daddr 10.240.0.0/16 udp dport != { 3478, 6443 } counter name hairpin
	}
	counter hairpin {}
	counter relay {}
	counter peer_udp {}
	chain count_forward {
		type filter hook forward priority filter; policy accept;
		iifname "lan" tcp dport 8443 counter name relay
		iifname "lan" ip daddr { 10.240.0.0/16, 192.168.0.0/16 } udp dport != { 3478, 6443 } counter name peer_udp
	}
}
NFT
}

# count ROUTER NAME: bytes (or packets with a third argument) of a counter.
count() {
	in_ns "$1" nft list counter inet count "$2" |
		awk -v w="${3:-bytes}" '{ for (i = 1; i < NF; i++) if ($i == w) print $(i + 1) }'
}

# daemon NODE IFNAME N: a meshvpn daemon in NODE with inner 10.250.0.N/24
# and its metrics on 127.0.0.1:9586 in NODE.
daemon() {
	local node=$1 ifname=$2 n=$3 s stun=()
	local servers=("$PUB:6443" "$PUB:3478")
	[[ -n ${STUN_SERVERS+x} ]] && servers=("${STUN_SERVERS[@]}")
	for s in "${servers[@]}"; do
		stun+=(--stun-server "$s")
	done
	# A key made beforehand (a chosen key order) is kept.
	[[ -s $T/$ifname.key ]] || wg genkey >"$T/$ifname.key"
	in_ns "$node" env LOG_LEVEL="${MESHVPN_LOG_LEVEL:-info}" meshvpn "$ifname" \
		--metrics-listen 127.0.0.1:9586 \
		--relay-url "ws://$PUB:8443/v1-meshvpn/relay" --relay-token-file "$T/token" \
		"${stun[@]}" >>"$T/$ifname.log" 2>&1 || return 1
	local i
	for i in $(seq 50); do
		[[ -S /var/run/wireguard/$ifname.sock ]] && break
		sleep 0.1
	done
	in_ns "$node" wg set "$ifname" private-key "$T/$ifname.key" listen-port 51820 || return 1
	ip -n "$node" addr add "10.250.0.$n/24" dev "$ifname"
	ip -n "$node" link set "$ifname" up
}

# peer NODE IFNAME OTHER_IFNAME N: OTHER (10.250.0.N) as a peer, via the relay.
peer() {
	in_ns "$1" wg set "$2" peer "$(wg pubkey <"$T/$3.key")" endpoint "[100::1]:0" \
		allowed-ips "10.250.0.$4/32" persistent-keepalive 10
}

# endpoint NODE IFNAME OTHER_IFNAME: the peer's endpoint as `wg show` prints it.
endpoint() {
	in_ns "$1" wg show "$2" endpoints | awk -v k="$(wg pubkey <"$T/$3.key")" '$1 == k { print $2 }'
}

# metric NODE NAME: the value of an interface-wide series on NODE's daemon.
metric() {
	in_ns "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9586 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null |
		awk -v n="$2" '$1 ~ "^"n"[{]" { print $2 }'
}

# tput SERVER_NODE CLIENT_NODE SERVER_INNER: Mbit/s of a 5 s iperf3 run.
tput() {
	local g
	g=$(iperf "$1" "$2" "$3")
	awk -v g="${g:-0}" 'BEGIN { printf "%.0f", g * 1000 }'
}
