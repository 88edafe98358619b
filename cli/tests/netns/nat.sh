#!/usr/bin/env bash
# STUN discovery through NAT routers, in network namespaces, against our
# server (`meshvpn tunnel serve`) and coturn (Debian's turnserver, STUN
# only, a server nobody here wrote):
#
#   ns N1 192.168.1.2 -- ns R1 (nft masquerade)        -- 10.240.1.2 \
#                                                                      ns P: 10.240.0.1
#   ns N2 192.168.2.2 -- ns R2 (nft masquerade random) -- 10.240.2.2 /  meshvpn STUN on UDP 6443
#                                                                       coturn on UDP 3478
#
# `meshvpn stun probe` from N1 must find R1's public address at both
# servers with one mapping (endpoint-independent); from N2, R2's address
# with a different port per server (endpoint-dependent: a symmetric NAT,
# which the probe prints). The same for N1 over IPv6 through NAT66
# (fd41:1::2 behind fd40:1::2, servers on fd40::1). `--stun-listen off` must leave the port silent.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exits non-zero on any
# FAIL. Needs root, `ip netns`, nftables, coturn. About 10 s.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
if [[ -z ${MESHVPN_BIN:-} ]]; then
	MESHVPN_BIN=$ROOT/target/release/meshvpn
	[[ -x $MESHVPN_BIN ]] || MESHVPN_BIN=$ROOT/target/debug/meshvpn
fi
NETNS_TOOLS="turnserver nft ss"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

P=mvn$ID-p R1=mvn$ID-r1 R2=mvn$ID-r2 N1=mvn$ID-n1 N2=mvn$ID-n2
PUB=10.240.0.1 PUB6=fd40::1

# router N ROUTER NODE MASQUERADE: NODE 192.168.N.2 behind ROUTER, whose
# public side is 10.240.N.2 toward P; MASQUERADE is the nft statement.
router() {
	local n=$1 r=$2 node=$3 masq=$4
	add_ns "$r" && add_ns "$node" || return 1
	ip -n "$P" link add "p$n" type veth peer name wan netns "$r"
	ip -n "$P" addr add "10.240.$n.1/24" dev "p$n"
	ip -n "$P" link set "p$n" up
	ip -n "$r" addr add "10.240.$n.2/24" dev wan
	ip -n "$r" link set wan up
	ip -n "$r" route add default via "10.240.$n.1"
	ip -n "$r" link add lan type veth peer name eth0 netns "$node"
	ip -n "$r" addr add "192.168.$n.1/24" dev lan
	ip -n "$r" link set lan up
	ip -n "$node" addr add "192.168.$n.2/24" dev eth0
	ip -n "$node" link set eth0 up
	ip -n "$node" route add default via "192.168.$n.1"
	ip -n "$P" addr add "fd40:$n::1/64" dev "p$n" nodad
	ip -n "$r" addr add "fd40:$n::2/64" dev wan nodad
	ip -n "$r" route add default via "fd40:$n::1"
	ip -n "$r" addr add "fd41:$n::1/64" dev lan nodad
	ip -n "$node" addr add "fd41:$n::2/64" dev eth0 nodad
	ip -n "$node" route add default via "fd41:$n::1"
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

# wait_udp NS PORT: a UDP socket is bound to PORT in NS (5 s at most).
wait_udp() {
	local i
	for i in $(seq 50); do
		in_ns "$1" ss -Hlun "sport = :$2" 2>/dev/null | grep -q . && return 0
		sleep 0.1
	done
	return 1
}

# probe NODE ARGS...: `meshvpn stun probe` in NODE against both servers;
# output in OUT, status in RC.
probe() {
	local node=$1
	shift
	OUT=$(in_ns "$node" timeout 30 "$MESHVPN_BIN" stun probe "$PUB:6443" "$PUB:3478" --transmits 3 "$@" 2>&1)
	RC=$?
	echo "$OUT" | sed 's/^/    /'
}

# reflexive PORT: the address the server on PORT reported in OUT.
reflexive() { awk -v s="$PUB:$1" '$1 == s && $2 == "reflexive" { print $3 }' <<<"$OUT"; }

main() {
	echo "meshvpn: $MESHVPN_BIN"
	if ! add_ns "$P" || ! ip -n "$P" addr add "$PUB/32" dev lo ||
		! ip -n "$P" addr add "$PUB6/128" dev lo nodad ||
		! router 1 "$R1" "$N1" masquerade || ! router 2 "$R2" "$N2" "masquerade random"; then
		fail "setup: namespaces and NAT routers"
		return
	fi
	printf 'k token\n' >"$T/tokens"
	in_ns "$P" "$MESHVPN_BIN" tunnel serve --plain --tokens "$T/tokens" \
		--listen "$PUB:6443" >>"$T/serve.log" 2>&1 &
	in_ns "$P" "$MESHVPN_BIN" tunnel serve --plain --tokens "$T/tokens" \
		--listen "$PUB:7443" --stun-listen off >>"$T/serve-off.log" 2>&1 &
	in_ns "$P" "$MESHVPN_BIN" tunnel serve --plain --tokens "$T/tokens" \
		--listen "[$PUB6]:6443" >>"$T/serve6.log" 2>&1 &
	in_ns "$P" turnserver -n --stun-only --no-cli --no-tls --no-dtls --no-rfc5780 \
		-L "$PUB" -L "$PUB6" -p 3478 --log-file stdout --simple-log --pidfile "$T/turn.pid" \
		>>"$T/coturn.log" 2>&1 &
	if wait_udp "$P" 6443 && wait_udp "$P" 3478 && wait_listen "$P" 7443; then
		pass "setup: meshvpn STUN on $PUB:6443, coturn on $PUB:3478, NAT routers R1 and R2"
	else
		fail "setup: servers (meshvpn: $(cat "$T/serve.log"); coturn: $(tail -5 "$T/coturn.log"))"
		return
	fi

	echo "-- N1 behind R1 (masquerade), from port 40000"
	probe "$N1" --from 192.168.1.2:40000
	local a b
	a=$(reflexive 6443) b=$(reflexive 3478)
	if ((RC == 0)) && [[ $a == 10.240.1.2:* && $b == "$a" ]]; then
		pass "N1: meshvpn and coturn both see R1's public address $a"
	else
		fail "N1: want 10.240.1.2:PORT from both, got '$a' and '$b' (rc $RC)"
	fi
	grep -q "^mapping: endpoint-independent" <<<"$OUT" &&
		pass "N1: the probe reports an endpoint-independent mapping" ||
		fail "N1: no endpoint-independent mapping in the output"

	echo "-- N1 over IPv6 (NAT66 masquerade)"
	OUT=$(in_ns "$N1" timeout 30 "$MESHVPN_BIN" stun probe "[$PUB6]:6443" "[$PUB6]:3478" --transmits 3 --from "[fd41:1::2]:40000" 2>&1)
	RC=$?
	echo "$OUT" | sed 's/^/    /'
	a=$(awk -v s="[$PUB6]:6443" '$1 == s && $2 == "reflexive" { print $3 }' <<<"$OUT")
	b=$(awk -v s="[$PUB6]:3478" '$1 == s && $2 == "reflexive" { print $3 }' <<<"$OUT")
	if ((RC == 0)) && [[ $a == "[fd40:1::2]:"* && $b == "$a" ]]; then
		pass "N1 IPv6: meshvpn and coturn both see R1's public IPv6 address $a"
	else
		fail "N1 IPv6: want [fd40:1::2]:PORT from both, got '$a' and '$b' (rc $RC)"
	fi

	echo "-- N2 behind R2 (masquerade random)"
	probe "$N2"
	a=$(reflexive 6443) b=$(reflexive 3478)
	if ((RC == 0)) && [[ $a == 10.240.2.2:* && $b == 10.240.2.2:* && $a != "$b" ]]; then
		pass "N2: the servers see R2's address with different ports ($a, $b)"
	else
		fail "N2: want 10.240.2.2 with two ports, got '$a' and '$b' (rc $RC)"
	fi
	grep -q "^mapping: endpoint-dependent (symmetric NAT" <<<"$OUT" &&
		pass "N2: the probe reports a symmetric NAT" ||
		fail "N2: no symmetric NAT in the output"

	echo "-- --stun-listen off"
	OUT=$(in_ns "$N1" timeout 30 "$MESHVPN_BIN" stun probe "$PUB:7443" --transmits 1 2>&1)
	RC=$?
	echo "$OUT" | sed 's/^/    /'
	if ((RC != 0)) && grep -q "no answer" <<<"$OUT"; then
		pass "--stun-listen off: nothing answers STUN on the HTTPS port"
	else
		fail "--stun-listen off: got an answer (rc $RC)"
	fi
}

main
echo "$PASSED passed, $FAILED failed"
((FAILED == 0 && PASSED > 0))
