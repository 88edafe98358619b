#!/usr/bin/env bash
# Root tests of `meshvpn IFNAME` against real peers, in network namespaces:
#
#   ns A (meshvpn, TUN)  ==veth==  ns B (Debian wireguard-go, TUN)
#   underlay 10.231.0.1/24, fd31::1/64   10.231.0.2/24, fd31::2/64
#   inner    10.232.0.1/24, fd32::1/64   10.232.0.2/24, fd32::2/64
#
# Scenarios print PASS/FAIL; the script ends with "N passed, N failed" and
# exits non-zero on any FAIL. Traffic stays inside the namespaces created
# here; every ping and iperf3 run is bounded in count and time; the
# namespaces, daemons and sockets are removed on exit.
#
#   cli/tests/netns/run.sh                 the scenarios (about a minute)
#   cli/tests/netns/run.sh --iperf-matrix  iperf3 TCP throughput for
#                                      meshvpn<->meshvpn, meshvpn<->wireguard-go
#                                      and wireguard-go<->wireguard-go
#
# Needs root, `ip netns`, /dev/net/tun, and the Debian packages
# wireguard-go wireguard-tools iperf3 iputils-ping iproute2 (installed by
# the CI script, not here). MESHVPN_BIN picks the binary (default: the
# release build if there is one, else the debug build).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
MODE=scenarios
case "${1:-}" in
--iperf-matrix) MODE=matrix ;;
"") ;;
-h | --help)
	sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*)
	echo "usage: $0 [--iperf-matrix]" >&2
	exit 2
	;;
esac

# shellcheck source=cli/tests/netns/lib.sh
source "$ROOT/cli/tests/netns/lib.sh"

scenarios() {
	local A=mvt$ID-a B=mvt$ID-b IFA=mva$ID IFB=wgb$ID
	local started=$SECONDS
	echo "meshvpn: $MESHVPN_BIN"
	if ! tunnel_pair meshvpn wireguard-go "$A" "$B" "$IFA" "$IFB"; then
		fail "setup: meshvpn in one namespace, wireguard-go in the other (logs: $(cat "$T"/*.log 2>/dev/null))"
		return
	fi
	pass "setup: meshvpn $IFA and wireguard-go $IFB up, configured with wg set"

	pings "$A" 10.232.0.2 && pings "$B" 10.232.0.1 &&
		pass "ping v4 inside, both ways" || fail "ping v4 inside, both ways"
	pings "$A" fd32::2 && pings "$B" fd32::1 &&
		pass "ping v6 inside, both ways" || fail "ping v6 inside, both ways"

	local hs rx tx now
	now=$(date +%s)
	hs=$(field "$A" "$IFA" latest-handshakes "$PUB_B" 2)
	rx=$(field "$A" "$IFA" transfer "$PUB_B" 2)
	tx=$(field "$A" "$IFA" transfer "$PUB_B" 3)
	if [[ -n $hs ]] && ((hs > 0 && now - hs < 120)) && ((${rx:-0} > 0 && ${tx:-0} > 0)); then
		pass "wg show $IFA: peer listed, handshake $((now - hs)) s ago, rx $rx B, tx $tx B"
	else
		fail "wg show $IFA: handshake='$hs' rx='$rx' tx='$tx'"
	fi

	if iperf_both "$B" "$A" 10.232.0.2; then
		pass "iperf3 TCP 5 s: meshvpn->wireguard-go $UP Gbit/s, wireguard-go->meshvpn $DOWN Gbit/s"
	else
		fail "iperf3 TCP 5 s: up='$UP' down='$DOWN' Gbit/s"
	fi

	# v6 underlay: both sides point at each other's v6 address. Any
	# authenticated packet moves a WireGuard endpoint to its source (both
	# implementations roam, as they must), so a packet that left B over
	# IPv4 before B's `wg set` and reached A after A's pulls A back to
	# IPv4, A's next packet pulls B back too, and both stay there: the
	# check then raced the traffic still in flight (reproduced by pinging
	# from B during the switch). IPv4 between the underlay addresses is
	# blackholed while the check runs, so no IPv4 packet can arrive after
	# the switch, and a stale one is undone by the next packet over IPv6.
	ip -n "$A" route add blackhole 10.231.0.2/32
	ip -n "$B" route add blackhole 10.231.0.1/32
	in_ns "$A" wg set "$IFA" peer "$PUB_B" endpoint "[fd31::2]:51821"
	in_ns "$B" wg set "$IFB" peer "$PUB_A" endpoint "[fd31::1]:51820"
	local ep_a ep_b
	if pings "$A" 10.232.0.2 && pings "$B" fd32::1 && pings "$A" 10.232.0.2; then
		ep_a=$(field "$A" "$IFA" endpoints "$PUB_B" 2)
		ep_b=$(field "$B" "$IFB" endpoints "$PUB_A" 2)
		if [[ $ep_a == "[fd31::2]:51821" && $ep_b == "[fd31::1]:51820" ]]; then
			pass "v6 underlay: pings both ways, endpoints $ep_a / $ep_b"
		else
			fail "v6 underlay: endpoints $ep_a / $ep_b"
		fi
	else
		fail "v6 underlay: no ping"
	fi
	ip -n "$A" route del blackhole 10.231.0.2/32
	ip -n "$B" route del blackhole 10.231.0.1/32
	in_ns "$A" wg set "$IFA" peer "$PUB_B" endpoint 10.231.0.2:51821
	in_ns "$B" wg set "$IFB" peer "$PUB_A" endpoint 10.231.0.1:51820

	# showconf / set / syncconf.
	local extra ok=1
	extra=$(wg genkey | wg pubkey)
	in_ns "$A" wg showconf "$IFA" >"$T/a.conf" || ok=0
	grep -q "^PublicKey = $PUB_B" "$T/a.conf" && grep -q "^AllowedIPs = " "$T/a.conf" &&
		grep -q "^ListenPort = 51820" "$T/a.conf" || ok=0
	in_ns "$A" wg set "$IFA" peer "$PUB_B" persistent-keepalive 7 || ok=0
	[[ $(field "$A" "$IFA" persistent-keepalive "$PUB_B" 2) == 7 ]] || ok=0
	{
		cat "$T/a.conf"
		printf '\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.250.0.0/24\n' "$extra"
	} >"$T/a2.conf"
	in_ns "$A" wg syncconf "$IFA" "$T/a2.conf" || ok=0
	in_ns "$A" wg show "$IFA" peers | grep -qx "$extra" || ok=0
	in_ns "$A" wg syncconf "$IFA" "$T/a.conf" || ok=0
	[[ $(in_ns "$A" wg show "$IFA" peers) == "$PUB_B" ]] || ok=0
	# syncconf leaves settings the file does not mention (as the kernel does).
	[[ $(field "$A" "$IFA" persistent-keepalive "$PUB_B" 2) == 7 ]] || ok=0
	in_ns "$A" wg set "$IFA" peer "$PUB_B" persistent-keepalive off || ok=0
	[[ $(field "$A" "$IFA" persistent-keepalive "$PUB_B" 2) == off ]] || ok=0
	pings "$A" 10.232.0.2 || ok=0
	((ok)) && pass "wg showconf, wg set, wg syncconf (a peer added, then dropped; keepalive on, then off)" ||
		fail "wg showconf/set/syncconf"

	# Roaming: wireguard-go's underlay address moves to another subnet while
	# it pings. (Deleting the primary address also deletes secondaries in its
	# subnet, hence a new subnet, and B keeps an on-link route to A's old
	# address.) wireguard-go 0.0.20220316 caches its source address and does
	# not drop it when the address goes away (ENETUNREACH, not retried; the
	# same with wireguard-go on both sides), so it is rebound the way a host
	# does on a network change: a new listen port. A must follow the
	# authenticated packets from the new address and port.
	in_ns "$B" ping -q -c 60 -i 0.1 -W 1 -w 15 10.232.0.1 >/dev/null 2>&1 &
	local ping_pid=$!
	sleep 1
	ip -n "$A" addr add 10.231.1.1/24 dev va
	ip -n "$B" addr add 10.231.1.2/24 dev vb
	ip -n "$B" addr del 10.231.0.2/24 dev vb
	ip -n "$B" route add 10.231.0.0/24 dev vb src 10.231.1.2
	in_ns "$B" wg set "$IFB" listen-port 51822
	local i roamed=
	for i in $(seq 50); do
		ep_a=$(field "$A" "$IFA" endpoints "$PUB_B" 2)
		[[ $ep_a == 10.231.1.2:51822 ]] && roamed=1 && break
		sleep 0.1
	done
	wait "$ping_pid"
	if [[ -n $roamed ]] && pings "$A" 10.232.0.2; then
		pass "roaming: endpoint followed wireguard-go to $ep_a, traffic resumed"
	else
		fail "roaming: endpoint is $ep_a"
	fi

	# A removed peer stops traffic.
	in_ns "$A" wg set "$IFA" peer "$PUB_B" remove
	if [[ -z $(in_ns "$A" wg show "$IFA" peers) ]] && no_pings "$A" 10.232.0.2 && no_pings "$B" 10.232.0.1; then
		pass "wg set ... remove: peer gone, no traffic either way"
	else
		fail "wg set ... remove: traffic still flows or peer still listed"
	fi

	# Shutdown by deleting the interface.
	ip -n "$A" link del "$IFA"
	wait_gone "$A" "$IFA" && pass "ip link del $IFA: meshvpn exited and removed its socket" ||
		fail "ip link del $IFA: meshvpn still running or socket left"

	# Shutdown by SIGTERM (the pid is that of the daemon started here).
	local IFS2=mvs$ID pid
	if start_impl meshvpn "$A" "$IFS2"; then
		pid=$(ip netns pids "$A")
		kill -TERM "$pid"
		if wait_gone "$A" "$IFS2" && ! ip -n "$A" link show "$IFS2" >/dev/null 2>&1; then
			pass "SIGTERM: meshvpn exited, interface and socket gone"
		else
			fail "SIGTERM: meshvpn did not shut down cleanly"
		fi
	else
		fail "SIGTERM: meshvpn $IFS2 did not start"
	fi

	# wg-quick with meshvpn as the userspace implementation.
	local IFQ=mvq$ID
	wg genkey >"$T/q.key"
	local pub_q
	pub_q=$(wg pubkey <"$T/q.key")
	in_ns "$B" wg set "$IFB" peer "$pub_q" allowed-ips 10.233.0.1/32
	ip -n "$B" addr add 10.233.0.2/24 dev "$IFB"
	cat >"$T/$IFQ.conf" <<-EOF
		[Interface]
		PrivateKey = $(cat "$T/q.key")
		Address = 10.233.0.1/24
		ListenPort = 51830

		[Peer]
		PublicKey = $PUB_B
		AllowedIPs = 10.233.0.2/32
		Endpoint = 10.231.1.2:51822
	EOF
	if in_ns "$A" env WG_QUICK_USERSPACE_IMPLEMENTATION=meshvpn wg-quick up "$T/$IFQ.conf" >"$T/wg-quick.log" 2>&1 &&
		pings "$A" 10.233.0.2 &&
		in_ns "$A" wg-quick down "$T/$IFQ.conf" >>"$T/wg-quick.log" 2>&1 &&
		wait_gone "$A" "$IFQ"; then
		pass "WG_QUICK_USERSPACE_IMPLEMENTATION=meshvpn wg-quick up (ping through it), wg-quick down"
	else
		fail "wg-quick up/down with meshvpn: $(tr '\n' ' ' <"$T/wg-quick.log")"
	fi
	# Logs at debug level never carry the private or preshared key.
	local secret leaked=
	for secret in "$(cat "$T/$IFA.key")" "$(cat "$T/psk")" "$(cat "$T/q.key")"; do
		grep -qF -e "$secret" -e "$(hex "$secret")" "$T"/mv*.log && leaked=1
	done
	[[ -s $T/$IFA.log && -z $leaked ]] &&
		pass "meshvpn's debug log ($(wc -l <"$T/$IFA.log") lines) holds no private or preshared key" ||
		fail "meshvpn's debug log is missing or holds a key"
	echo "scenarios took $((SECONDS - started)) s"
}

matrix() {
	local rows=() n=0 ia ib
	echo "iperf3 TCP, 5 s per direction, one pair of namespaces per row, this machine ($(nproc) cores)"
	echo "meshvpn: $MESHVPN_BIN"
	for pair in "meshvpn meshvpn" "meshvpn wireguard-go" "wireguard-go wireguard-go"; do
		read -r ia ib <<<"$pair"
		n=$((n + 1))
		local A=mvm$ID-$n-a B=mvm$ID-$n-b IFA=mma$n$ID IFB=mmb$n$ID
		if ! tunnel_pair "$ia" "$ib" "$A" "$B" "$IFA" "$IFB" || ! pings "$A" 10.232.0.2; then
			fail "$ia <-> $ib: no tunnel"
			rows+=("$(printf '%-28s %10s %10s' "$ia <-> $ib" - -)")
			continue
		fi
		if iperf_both "$B" "$A" 10.232.0.2; then
			pass "$ia <-> $ib measured"
		else
			fail "$ia <-> $ib: iperf3 gave up='$UP' down='$DOWN'"
		fi
		rows+=("$(printf '%-28s %10s %10s' "$ia -> $ib" "${UP:--}" "${DOWN:--}")")
		# Free the CPU for the next row.
		for pid in $(ip netns pids "$A") $(ip netns pids "$B"); do kill -TERM "$pid" 2>/dev/null; done
		sleep 0.5
	done
	echo
	printf '%-28s %10s %10s\n' "pair (A -> B)" "A->B" "B->A"
	printf '%-28s %10s %10s\n' "" "Gbit/s" "Gbit/s"
	printf '%s\n' "${rows[@]}"
	echo
}

if [[ $MODE == matrix ]]; then
	MESHVPN_LOG_LEVEL=error
	matrix
else
	MESHVPN_LOG_LEVEL=debug
	scenarios
fi
echo "netns: $PASSED passed, $FAILED failed"
((FAILED == 0))
