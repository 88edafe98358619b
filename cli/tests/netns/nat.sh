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
# Then NAT traversal with meshvpn daemons (TUN) in N1, N2 and N3 (behind
# R3, masquerade), the relay (`tunnel serve --relay`, plain ws) in P and
# each daemon asking both STUN servers from its WireGuard socket
# (--stun-server). Every peer starts on the relay (endpoint [100::1]:0):
#   N1 <-> N3, two endpoint-independent NATs: a direct UDP path within a
#     few seconds (time printed), iperf3 moves onto it, and R3's counter of
#     TCP bytes to the relay stays flat while it runs;
#   N1 <-> N2, N2 behind `masquerade random`: stays on the relay, and the
#     probes each router forwards toward the other node are counted and
#     bounded (printed);
#   throughput direct (N1-N3) against relay (N1-N2), in the same run.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exits non-zero on any
# FAIL. Needs root, `ip netns`, nftables, coturn, wireguard-tools, iperf3,
# ping, /dev/net/tun. About 60 s.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="turnserver nft ss wg iperf3 ping"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"
# shellcheck source=cli/tests/netns/nat_lib.sh
source "$ROOT/cli/tests/netns/nat_lib.sh"

P=mvn$ID-p R1=mvn$ID-r1 R2=mvn$ID-r2 N1=mvn$ID-n1 N2=mvn$ID-n2
R3=mvn$ID-r3 N3=mvn$ID-n3
PUB=10.240.0.1 PUB6=fd40::1

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

traversal() {
	echo "-- NAT traversal: daemons in N1 (R1 masquerade), N3 (R3 masquerade), N2 (R2 masquerade random)"
	# P is the internet between the routers from here on.
	if ! in_ns "$P" sysctl -qw net.ipv4.ip_forward=1 || ! router 3 "$R3" "$N3" masquerade ||
		! counters "$R1" || ! counters "$R2" || ! counters "$R3"; then
		fail "setup: R3 and the counters"
		return
	fi
	printf 'token\n' >"$T/token"
	in_ns "$P" "$MESHVPN_BIN" tunnel serve --plain --tokens "$T/tokens" --relay \
		--listen "$PUB:8443" --stun-listen off >>"$T/relay.log" 2>&1 &
	local IF1=mnt$ID-1 IF2=mnt$ID-2 IF3=mnt$ID-3
	IF1=${IF1:0:15} IF2=${IF2:0:15} IF3=${IF3:0:15}
	if ! wait_listen "$P" 8443 || ! daemon "$N1" "$IF1" 1 || ! daemon "$N2" "$IF2" 2 ||
		! daemon "$N3" "$IF3" 3; then
		fail "setup: relay and daemons (relay: $(cat "$T/relay.log"); N1: $(cat "$T/$IF1.log"))"
		return
	fi
	local t0=$SECONDS
	peer "$N1" "$IF1" "$IF3" 3 && peer "$N3" "$IF3" "$IF1" 1 &&
		peer "$N1" "$IF1" "$IF2" 2 && peer "$N2" "$IF2" "$IF1" 1 ||
		{ fail "setup: wg set peers"; return; }
	local s13 s13ms
	s13=$SECONDS s13ms=$(date +%s%3N)
	# Direct: each side's endpoint is the other router's public address.
	# Direct: each side's endpoint is the other router's public address
	# (polled every 50 ms, 15 s at most, from the moment the peers were set).
	local e13="" e31="" i
	for i in $(seq 300); do
		e13=$(endpoint "$N1" "$IF1" "$IF3") e31=$(endpoint "$N3" "$IF3" "$IF1")
		[[ $e13 == 10.240.3.2:* && $e31 == 10.240.1.2:* ]] && break
		sleep 0.05
	done
	local direct_s
	direct_s=$(awk -v a="$s13ms" -v b="$(date +%s%3N)" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
	[[ -n ${NAT_DEBUG_DIR:-} ]] && { mkdir -p "$NAT_DEBUG_DIR"; cp "$T"/*.log "$NAT_DEBUG_DIR"/; in_ns "$R1" nft list ruleset >"$NAT_DEBUG_DIR/r1.nft"; }
	if [[ $e13 == 10.240.3.2:* && $e31 == 10.240.1.2:* ]]; then
		pass "N1 <-> N3 (masquerade/masquerade): direct UDP path $e13 / $e31, ${direct_s} s after the peers were set"
	else
		fail "N1 <-> N3: no direct path within 15 s: N1 sees '$e13', N3 sees '$e31' (N1: $(grep -i 'stun\|path\|probing' "$T/$IF1.log" | tail -5))"
	fi
	local r0 u0 r1 u1 direct_mbit relay_mbit
	pings "$N1" 10.250.0.3 && pings "$N3" 10.250.0.1 && pass "N1 <-> N3 ping on the direct path" ||
		fail "N1 <-> N3 no ping (N1: $(tail -5 "$T/$IF1.log"))"
	# N1 is the iperf3 client: its data leaves through R1.
	r0=$(count "$R1" relay) u0=$(count "$R1" peer_udp)
	direct_mbit=$(tput "$N3" "$N1" 10.250.0.3)
	r1=$(count "$R1" relay) u1=$(count "$R1" peer_udp)
	echo "    R1 during iperf3 N1->N3: relay TCP +$((r1 - r0)) bytes, peer UDP +$((u1 - u0)) bytes"
	if ((direct_mbit > 0 && u1 - u0 > 1000000 && r1 - r0 < 200000)); then
		pass "N1 -> N3 iperf3 ${direct_mbit} Mbit/s on the direct path; relay bytes at R1 stayed flat (+$((r1 - r0)))"
	else
		fail "N1 -> N3 iperf3 ${direct_mbit} Mbit/s: relay +$((r1 - r0)) bytes, UDP +$((u1 - u0)) bytes"
	fi

	# N2 behind masquerade random: no direct path, traffic over the relay.
	local p12a p21a
	p12a=$(count "$R1" peer_udp packets) p21a=$(count "$R2" peer_udp packets)
	local w0=$SECONDS
	pings "$N1" 10.250.0.2 && pass "N1 -> N2 ping over the relay" ||
		fail "N1 -> N2 no ping (N2: $(tail -5 "$T/$IF2.log"))"
	relay_mbit=$(tput "$N2" "$N1" 10.250.0.2)
	sleep $((w0 + 20 - SECONDS > 0 ? w0 + 20 - SECONDS : 0))
	local e12 e21 p2 w=$((SECONDS - t0))
	e12=$(endpoint "$N1" "$IF1" "$IF2") e21=$(endpoint "$N2" "$IF2" "$IF1")
	if [[ $e12 == "[100::"*"]:0" && $e21 == "[100::"*"]:0" ]]; then
		pass "N1 <-> N2 (masquerade/masquerade random): stays on the relay ($e12, $e21)"
	else
		fail "N1 <-> N2: endpoints '$e12' '$e21', want the relay"
	fi
	# UDP from N2 toward N1's side: only probes (N2 has no other peer).
	p2=$(count "$R2" peer_udp packets)
	# Bound: a burst of 5 rounds per 10 s (MIN_BURST_GAP), 3 targets each.
	local bound=$(((w / 10 + 1) * 5 * 3))
	local m2
	m2=$(metric "$N2" meshvpn_nat_probes_sent_total)
	echo "    probes in ${w} s: N2 -> N1's side $p2 datagrams at R2, N2's daemon counts ${m2:-?} (bound $bound)"
	# The daemon's own count matches the router's, give or take a round
	# between the two reads.
	if ((p2 > 0 && p2 <= bound && ${m2:--99} - p2 <= 3 && p2 - ${m2:--99} <= 3)); then
		pass "N2's probes toward N1 bounded: $p2 in ${w} s (bound $bound)"
	else
		fail "N2 sent $p2 probe datagrams in ${w} s (bound $bound)"
	fi
	echo "    figures: N1-N3 direct after ${direct_s} s; iperf3 N1->N3 direct ${direct_mbit} Mbit/s, N1->N2 relay ${relay_mbit} Mbit/s"
	if ((relay_mbit > 0)); then
		pass "throughput in one run: direct ${direct_mbit} Mbit/s, relay ${relay_mbit} Mbit/s"
	else
		fail "no throughput over the relay N1 -> N2"
	fi
}

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

	traversal
}

main
echo "$PASSED passed, $FAILED failed"
((FAILED == 0 && PASSED > 0))
