#!/usr/bin/env bash
# NAT traversal for the NAT pairs nat.sh does not run, in network
# namespaces with nftables NAT routers (the routers, counters and daemons
# of nat_lib.sh), the relay and our STUN server in the public namespace P:
#
#   NP 10.240.9.2 (public, no NAT) -----------------------------+
#   N1 192.168.1.2 -- R1 (masquerade) -- 10.240.1.2 ------------+
#   N3 192.168.3.2 -- R3 (masquerade) -- 10.240.3.2 ------------+-- P 10.240.0.1
#   N4 192.168.4.2 -+- R4 (masquerade) -- 10.240.4.2 ------------+   relay TCP 8443
#   N6 192.168.4.3 -+                                            |   STUN UDP 6443
#   N2 192.168.2.2 -- R2 (masquerade random) -- 10.240.2.2 -----+
#   N5 192.168.5.2 -- R5 (masquerade random) -- 10.240.5.2 -----+
#
# Every daemon asks the STUN server from its WireGuard socket; every peer
# starts on the relay (endpoint [100::1]:0); all pairs are set at once:
#   public:   NP <-> N1: direct, NP sees R1's public address, N1 sees NP's;
#   same NAT: N4 <-> N6: direct over the LAN (each sees the other's
#             192.168.4.x address, not R4's), and R4 forwards none of it;
#   masq/masq N1 <-> N3: direct; then R1's public address changes
#             (10.240.1.2 -> 10.240.1.3, as a new DHCP lease) while N1
#             pings N3 every 0.1 s: the pings go on (relay, then direct to
#             10.240.1.3), the longest gap is printed and bounded. The
#             fallback (WireGuard's timers: ~20 s of silence) starts a
#             STUN round at once and the relay session, reset by the
#             change too, re-announces N1's candidates when it is back:
#             direct again within a second of the fallback;
#   random/random N2 <-> N5: stays on the relay; the probes each router
#             forwards are counted and bounded.
# Per pair: seconds from the peers being set to the direct path, and
# iperf3 throughput (2 s) on its path; the relay's throughput is the
# random/random pair's, in the same run.
#
# Prints PASS/FAIL lines and "N passed, N failed"; exits non-zero on any
# FAIL. Needs root, `ip netns`, nftables, wireguard-tools, iperf3, ping,
# /dev/net/tun. The masquerade/masquerade pair's iperf3 bytes are also
# read from N1's daemon per path kind (direct grows, relay flat).
# CI suite `nat_pairs`: about 60 s (66 s on a 2-core
# machine at load 16): setup 2 s, the address change ~23 s, the rest the
# direct pairs' pings and 2 s iperf3 runs; random/random is judged after
# the address change, so its 20 s of probing cost nothing extra.
#
# NAT_CHOOSER=N1|N3 makes that side of the N1/N3 pair the one that chooses
# the path (keys drawn until its key is the lower); otherwise the order is
# random. GAP_MAX bounds the address change's longest ping gap (default
# 10 s).
set -uo pipefail
GAP_MAX=${GAP_MAX:-10}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
NETNS_TOOLS="nft ss wg iperf3 ping"
# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"
# shellcheck source=cli/tests/netns/nat_lib.sh
source "$ROOT/cli/tests/netns/nat_lib.sh"

P=mvq$ID-p PUB=10.240.0.1
STUN_SERVERS=("$PUB:6443")
NP=mvq$ID-np
R1=mvq$ID-r1 N1=mvq$ID-n1 R3=mvq$ID-r3 N3=mvq$ID-n3
R4=mvq$ID-r4 N4=mvq$ID-n4 N6=mvq$ID-n6
R2=mvq$ID-r2 N2=mvq$ID-n2 R5=mvq$ID-r5 N5=mvq$ID-n5
IFP=mnq$ID-p IF1=mnq$ID-1 IF3=mnq$ID-3 IF4=mnq$ID-4 IF6=mnq$ID-6 IF2=mnq$ID-2 IF5=mnq$ID-5
IFP=${IFP:0:15} IF1=${IF1:0:15} IF3=${IF3:0:15} IF4=${IF4:0:15} IF6=${IF6:0:15}
IF2=${IF2:0:15} IF5=${IF5:0:15}

now_ms() { date +%s%3N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1000 }'; }
is_relay() { [[ $1 == "[100::"*"]:0" ]]; }

setup() {
	add_ns "$P" && ip -n "$P" addr add "$PUB/32" dev lo &&
		in_ns "$P" sysctl -qw net.ipv4.ip_forward=1 &&
		public_node 9 "$NP" &&
		router 1 "$R1" "$N1" masquerade && router 3 "$R3" "$N3" masquerade &&
		router 4 "$R4" "$N4" masquerade && lan_node 4 "$R4" "$N6" 3 &&
		router 2 "$R2" "$N2" "masquerade random" && router 5 "$R5" "$N5" "masquerade random" &&
		counters "$R1" && counters "$R3" && counters "$R4" && counters "$R2" && counters "$R5" ||
		return 1
	printf 'k token\n' >"$T/tokens"
	printf 'token\n' >"$T/token"
	in_ns "$P" "$MESHVPN_BIN" tunnel serve --plain --tokens "$T/tokens" --relay \
		--listen "$PUB:8443" --stun-listen off >>"$T/relay.log" 2>&1 &
	in_ns "$P" "$MESHVPN_BIN" tunnel serve --plain --tokens "$T/tokens" \
		--listen "$PUB:6443" >>"$T/stun.log" 2>&1 &
	wait_listen "$P" 8443 && wait_udp "$P" 6443 || return 1
	# NAT_CHOOSER=N1 or N3: keys for N1 and N3 such that this side has the
	# lower key, the side that measures and chooses (the address change
	# runs differently in each order); otherwise random, either order.
	if [[ -n ${NAT_CHOOSER:-} ]]; then
		local k
		for k in $(seq 64); do
			wg genkey >"$T/$IF1.key"
			wg genkey >"$T/$IF3.key"
			[[ $(chooser) == "$NAT_CHOOSER" ]] && break
		done
	fi
	daemon "$NP" "$IFP" 9 && daemon "$N1" "$IF1" 1 && daemon "$N3" "$IF3" 3 &&
		daemon "$N4" "$IF4" 4 && daemon "$N6" "$IF6" 6 &&
		daemon "$N2" "$IF2" 2 && daemon "$N5" "$IF5" 5
}

# Pairs: name, node A, its interface, inner number, node B, interface,
# inner number, and the endpoint prefixes A and B must see when direct.
PAIRS=(
	"public/masquerade $NP $IFP 9 $N1 $IF1 1 10.240.1.2: 10.240.9.2:51820"
	"same-NAT(LAN) $N4 $IF4 4 $N6 $IF6 6 192.168.4.3:51820 192.168.4.2:51820"
	"masquerade/masquerade $N1 $IF1 1 $N3 $IF3 3 10.240.3.2: 10.240.1.2:"
)
declare -A DIRECT_S TPUT

# direct_all: polls every pair's endpoints (every 50 ms, 15 s at most)
# from the moment the peers were set; DIRECT_S[pair] is when both sides
# of the pair saw the expected direct endpoints.
direct_all() {
	local t0=$1 i p name a ia b ib wa wb left
	for i in $(seq 300); do
		left=0
		for p in "${PAIRS[@]}"; do
			read -r name a ia _ b ib _ wa wb <<<"$p"
			[[ -n ${DIRECT_S[$name]:-} ]] && continue
			if [[ $(endpoint "$a" "$ia" "$ib") == "$wa"* && $(endpoint "$b" "$ib" "$ia") == "$wb"* ]]; then
				DIRECT_S[$name]=$(secs "$t0" "$(now_ms)")
			else
				left=1
			fi
		done
		((left)) || return 0
		sleep 0.05
	done
}

# path_bytes NODE OTHER_IFNAME PATH DIR: NODE's daemon's count of bytes
# to (DIR tx) or from (rx) the peer of OTHER_IFNAME's key on PATH (direct
# or relay), from its metrics page.
path_bytes() {
	local k
	k=$(wg pubkey <"$T/$2.key")
	in_ns "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9586 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null |
		awk -v k="peer=\"$k\"" -v p="path=\"$3\"" -v d="dir=\"$4\"" \
			'index($1, "meshvpn_nat_peer_path_bytes_total{") == 1 && index($1, k) && index($1, p) && index($1, d) { print $2 }'
}

# status_paths NODE IFNAME OTHER_IFNAME: the per-path line of `meshvpn
# status --metrics` for the peer of OTHER_IFNAME's key.
status_paths() {
	in_ns "$1" "$MESHVPN_BIN" status -i "$2" --metrics 127.0.0.1:9586 2>&1 |
		awk -v k="peer $(wg pubkey <"$T/$3.key")" '$0 == k { f = 1 } f && /direct sent/ { sub(/^ +/, ""); print; exit }'
}

# direct_checks: each direct pair pings both ways and moves an iperf3 run
# (A's side is the client) on the direct path, with no relay bytes at A's
# router (none for NP, which has no router) and, for the LAN pair, no
# forwarded UDP at R4 either (nothing hairpins through the router).
direct_checks() {
	local p name a ia na b ib nb wa wb ea eb router r0 u0 h0 r1 u1 h1 mbit
	for p in "${PAIRS[@]}"; do
		read -r name a ia na b ib nb wa wb <<<"$p"
		ea=$(endpoint "$a" "$ia" "$ib") eb=$(endpoint "$b" "$ib" "$ia")
		if [[ -n ${DIRECT_S[$name]:-} ]]; then
			pass "$name: direct UDP path $ea / $eb, ${DIRECT_S[$name]} s after the peers were set"
		else
			fail "$name: no direct path within 15 s: '$ea' / '$eb', want $wa* / $wb*"
		fi
		pings "$a" "10.250.0.$nb" && pings "$b" "10.250.0.$na" && pass "$name: pings both ways" ||
			fail "$name: no ping"
		router=""
		case $a in "$N1") router=$R1 ;; "$N4") router=$R4 ;; esac
		[[ -z $router ]] && router=$R1 # NP: N1's router carries the other side
		r0=$(count "$router" relay) u0=$(count "$router" peer_udp) h0=$(count "$router" hairpin)
		local d0 d1 q0 q1
		d0=$(path_bytes "$a" "$ib" direct tx) q0=$(path_bytes "$a" "$ib" relay tx)
		mbit=$(IPERF_SECONDS=2 tput "$b" "$a" "10.250.0.$nb")
		d1=$(path_bytes "$a" "$ib" direct tx) q1=$(path_bytes "$a" "$ib" relay tx)
		r1=$(count "$router" relay) u1=$(count "$router" peer_udp) h1=$(count "$router" hairpin)
		# The daemon's own count per path kind: the run's bytes on direct
		# UDP (at least 1 MB of a 2 s iperf3), the relay's flat (a round-
		# trip measurement there is one 148-byte initiation).
		if [[ $name == masquerade/masquerade ]]; then
			echo "    $name: ${a##*-}'s bytes to ${b##*-} during iperf3: direct +$((${d1:-0} - ${d0:-0})), relay +$((${q1:-0} - ${q0:-0})) (status: $(status_paths "$a" "$ia" "$ib"))"
			if [[ -n $d0 && -n $q1 ]] && ((d1 - d0 >= 1000000 && q1 - q0 < 2000)); then
				pass "$name: the daemon counts +$((d1 - d0)) bytes direct and +$((q1 - q0)) on the relay during iperf3"
			else
				fail "$name: bytes per path during iperf3: direct '${d0:-?}' -> '${d1:-?}', relay '${q0:-?}' -> '${q1:-?}'"
			fi
			# Plain status (no --metrics): the peer's candidates, among them
			# R3's public address, and the last STUN round.
			local plain cands
			plain=$(in_ns "$a" "$MESHVPN_BIN" status -i "$ia" 2>&1)
			cands=$(awk -v k="peer $(wg pubkey <"$T/$ib.key")" '$0 == k { f = 1 } f && /candidates/ { print $2; exit }' <<<"$plain")
			if [[ ,$cands, == *,10.240.3.2:* ]] && grep -q 'last STUN discovery round' <<<"$plain"; then
				pass "$name: meshvpn status shows ${b##*-}'s candidates $cands and the last STUN round"
			else
				fail "$name: meshvpn status without --metrics: candidates '$cands': $plain"
			fi
		fi
		TPUT[$name]=$mbit
		echo "    $name iperf3 -t 2: $mbit Mbit/s; at ${router##*-}: relay TCP +$((r1 - r0)) bytes, forwarded peer UDP +$((u1 - u0)), hairpin UDP +$((h1 - h0))"
		if [[ $name == same-NAT* ]]; then
			# Over the LAN: R4 neither routes nor hairpins any of it.
			if ((mbit > 0 && r1 - r0 < 200000 && u1 - u0 < 10000 && h1 - h0 < 10000)); then
				pass "$name: iperf3 $mbit Mbit/s over the LAN; R4 routed +$((u1 - u0)) and hairpinned +$((h1 - h0)) bytes of it, the relay +$((r1 - r0))"
			else
				fail "$name: iperf3 $mbit Mbit/s, R4 routed +$((u1 - u0)) UDP, hairpinned +$((h1 - h0)), relay +$((r1 - r0)) bytes"
			fi
		elif ((mbit > 0 && r1 - r0 < 200000)); then
			pass "$name: iperf3 $mbit Mbit/s on the direct path; relay bytes at ${router##*-} +$((r1 - r0))"
		else
			fail "$name: iperf3 $mbit Mbit/s, relay +$((r1 - r0)) bytes at ${router##*-}"
		fi
	done
}

# random_traffic: N2 <-> N5 (random/random) pings and moves an iperf3
# run over the relay.
random_traffic() {
	pings "$N2" 10.250.0.5 && pass "random/random: pings over the relay" ||
		fail "random/random: no ping"
	TPUT[relay]=$(IPERF_SECONDS=2 tput "$N5" "$N2" 10.250.0.5)
	((TPUT[relay] > 0)) && pass "random/random: iperf3 ${TPUT[relay]} Mbit/s over the relay" ||
		fail "random/random: no iperf3 throughput over the relay"
}

# random_verdict T0: after at least 20 s of probing since T0, N2 <-> N5
# is still on the relay and the probes R2 and R5 forwarded stay within
# the bound.
random_verdict() {
	local t0=$1 e25 e52 w p2 p5 m2 bound
	sleep $((t0 + 20 - SECONDS > 0 ? t0 + 20 - SECONDS : 0))
	w=$((SECONDS - t0))
	e25=$(endpoint "$N2" "$IF2" "$IF5") e52=$(endpoint "$N5" "$IF5" "$IF2")
	is_relay "$e25" && is_relay "$e52" &&
		pass "random/random: stays on the relay after ${w} s ($e25, $e52)" ||
		fail "random/random: endpoints '$e25' '$e52', want the relay"
	# N2's and N5's only peer is each other: every UDP datagram their
	# routers forward toward the other side is a probe. Bound: a burst of
	# 5 rounds per MIN_BURST_GAP (10 s), 3 targets a round.
	p2=$(count "$R2" peer_udp packets) p5=$(count "$R5" peer_udp packets)
	m2=$(metric "$N2" meshvpn_nat_probes_sent_total)
	bound=$(((w / 10 + 1) * 5 * 3))
	echo "    random/random probes in ${w} s: R2 forwarded $p2, R5 $p5 (N2's daemon counts ${m2:-?}; bound $bound each)"
	if ((p2 > 0 && p5 > 0 && p2 <= bound && p5 <= bound && ${m2:--99} - p2 <= 3 && p2 - ${m2:--99} <= 3)); then
		pass "random/random: probes bounded: $p2 and $p5 in ${w} s (bound $bound)"
	else
		fail "random/random: probes $p2 and $p5 in ${w} s (bound $bound, N2 counts ${m2:-?})"
	fi
}

# key_hex IFNAME: the interface's public key as hex (byte order compares
# as the engine compares keys).
key_hex() {
	wg pubkey <"$T/$1.key" | base64 -d | od -An -tx1 | tr -d ' \n'
}

# chooser: N1 or N3, the side of that pair with the lower public key, which
# measures round trips and chooses the path (engine/docs/nat.md).
chooser() {
	if [[ $(key_hex "$IF1") < $(key_hex "$IF3") ]]; then echo N1; else echo N3; fi
}

# address_change: N1 pings N3 every 0.1 s (500 at most, 50 s at most)
# while R1's public address moves from 10.240.1.2 to 10.240.1.3 (the
# kernel drops masquerade's mappings of the old address, as after a new
# DHCP lease). The pings continue, N3 sees N1 direct at 10.240.1.3 again
# (through the relay or re-punched at once), and the longest gap between
# answered pings is bounded.
address_change() {
	local pingpid e e1 seen_relay="" back="" t0 i gap lost f0 f1
	f0=$(metric "$N1" meshvpn_nat_fallbacks_total)
	in_ns "$N1" ping -D -n -i 0.1 -c 500 -w 50 -W 1 10.250.0.3 >"$T/change.ping" 2>&1 &
	pingpid=$!
	sleep 1
	t0=$(now_ms)
	ip -n "$R1" addr del 10.240.1.2/24 dev wan &&
		ip -n "$R1" addr add 10.240.1.3/24 dev wan &&
		ip -n "$R1" route add default via 10.240.1.1 ||
		{ fail "address change: ip addr on R1"; kill "$pingpid"; return; }
	# Poll both views (every 0.2 s, 40 s at most) until both are direct
	# between R1's new address and R3.
	local end=$((SECONDS + 40))
	for i in $(seq 200); do
		((SECONDS < end)) || break
		e=$(endpoint "$N3" "$IF3" "$IF1") e1=$(endpoint "$N1" "$IF1" "$IF3")
		echo "$(secs "$t0" "$(now_ms)") N3->N1 $e N1->N3 $e1" >>"$T/change.path"
		if [[ -z $seen_relay ]] && { is_relay "$e" || is_relay "$e1"; }; then
			seen_relay=$(secs "$t0" "$(now_ms)")
		fi
		# Only reachable after the change; the relay phase between can be
		# shorter than one poll (N1's fallback counter proves it below).
		if [[ $e == 10.240.1.3:* && $e1 == 10.240.3.2:* ]]; then
			back=$(secs "$t0" "$(now_ms)")
			break
		fi
		sleep 0.2
	done
	sleep 1
	kill -INT "$pingpid" 2>/dev/null
	wait "$pingpid" 2>/dev/null
	[[ -n ${NAT_DEBUG_DIR:-} ]] && mkdir -p "$NAT_DEBUG_DIR" && cp "$T"/*.log "$T"/change.* "$NAT_DEBUG_DIR"/
	# The longest time between two answered pings, from ping -D's stamps.
	gap=$(awk -F'[][]' '/bytes from/ { if (p) { d = $2 - p; if (d > m) m = d }; p = $2 } END { printf "%.2f", m }' "$T/change.ping")
	lost=$(awk '/packet loss/ { print $1 - $4 }' "$T/change.ping")
	f1=$(metric "$N1" meshvpn_nat_fallbacks_total)
	# Which side chooses changes the timeline.
	echo "    address change: the relay seen after ${seen_relay:-never} s, direct to 10.240.1.3 after ${back:-never} s; N1's fallbacks ${f0:-?} -> ${f1:-?}; longest ping gap ${gap} s, ${lost:-?} pings lost; $(chooser) chooses"
	# Two ways back are both right, and which one comes first is a race:
	# N1 gives the direct path up for the relay (its fallback counter
	# moves), or N3 learns N1's new address through the relay (N1's
	# rediscovery announces it) and the probes punch the new mapping while
	# N1 still counts its path as direct. What must hold is below: direct
	# again to the new address, and the pings go on.
	if ((${f1:-0} > ${f0:-0})); then
		echo "    address change: N1 fell back to the relay first (fallbacks ${f0} -> ${f1})"
	else
		echo "    address change: re-punched to the new address without a fallback (fallbacks ${f0:-?} -> ${f1:-?})"
	fi
	[[ -n $back ]] && pass "address change: direct again to R1's new address ${back} s after the change" ||
		fail "address change: not direct to 10.240.1.3 within 40 s ($(endpoint "$N3" "$IF3" "$IF1") / $(endpoint "$N1" "$IF1" "$IF3"))"
	GAP=$gap
	# The dead direct path is given up after about 6 s and the pair is
	# direct again within a second of it, whichever side chooses (6.1-6.7 s
	# measured, under load too); a measurement's endpoint hold that kept the
	# chooser on the dead path made it about 12 s when N3 chose.
	awk -v g="$gap" -v max="$GAP_MAX" 'BEGIN { exit !(g > 0 && g < max) }' &&
		pass "address change: pings went on, longest gap ${gap} s (bound ${GAP_MAX} s, $(chooser) chooses)" ||
		fail "address change: longest gap between answered pings '${gap}' s (bound ${GAP_MAX} s, $(chooser) chooses)"
}

main() {
	echo "meshvpn: $MESHVPN_BIN"
	local start=$SECONDS
	setup || {
		fail "setup: namespaces, routers, relay, daemons (relay: $(cat "$T/relay.log"))"
		return
	}
	echo "    setup (namespaces, routers, relay, 7 daemons): $((SECONDS - start)) s"
	local p name a ia na b ib nb
	local t0=$SECONDS t0ms
	t0ms=$(now_ms)
	for p in "${PAIRS[@]}" "random/random $N2 $IF2 2 $N5 $IF5 5 - -"; do
		read -r name a ia na b ib nb _ <<<"$p"
		peer "$a" "$ia" "$ib" "$nb" && peer "$b" "$ib" "$ia" "$na" || {
			fail "setup: wg set peers for $name"
			return
		}
	done
	direct_all "$t0ms"
	direct_checks
	random_traffic
	# The address change takes longer than the 20 s random/random needs
	# to show its probes: both are judged after it.
	address_change
	random_verdict "$t0"
	echo "    figures (one run):"
	printf '    %-24s %-8s %16s %12s\n' "NAT pair" path "time to direct" "iperf3"
	for p in "${PAIRS[@]}"; do
		read -r name _ <<<"$p"
		printf '    %-24s %-8s %14s s %7s Mbit/s\n' "$name" direct "${DIRECT_S[$name]:--}" "${TPUT[$name]:-0}"
	done
	printf '    %-24s %-8s %16s %7s Mbit/s\n' "random/random" relay "-" "${TPUT[relay]:-0}"
	echo "    address change mid-transfer: longest ping gap ${GAP:-?} s; suite took $((SECONDS - start)) s"
}

main
echo "$PASSED passed, $FAILED failed"
((FAILED == 0 && PASSED > 0))
