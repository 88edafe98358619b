package meshvpn

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestNATStatsAndStatusThroughTheRelay: two engines on a relay
// exchange their candidates through it; NATStats shows the messages
// sent by one and accepted by the other, and nothing refused.
func TestNATStatsAndStatusThroughTheRelay(t *testing.T) {
	pki := newTunnelPKI(t)
	blackhole, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer blackhole.Close()
	ka, _ := GenerateKey()
	kb, _ := GenerateKey()
	_, base := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		Relay: true, RelayKeys: []Key{ka.PublicKey(), kb.PublicKey()},
	})
	a := relayNode(t, ka, kb, "10.79.0.1", "10.79.0.2", blackhole)
	b := relayNode(t, kb, ka, "10.79.0.2", "10.79.0.1", blackhole)

	for _, e := range []*Engine{a, b} {
		st, err := e.NATStats()
		if err != nil {
			t.Fatal(err)
		}
		if st.CandidatesSent != 0 || st.CandidatesReceived != 0 {
			t.Fatalf("candidates counted before any relay: %+v", st)
		}
	}
	stun := stunServer(t)
	for _, e := range []*Engine{a, b} {
		if err := e.SetSTUNServers([]string{stun}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.SetSTUNServers([]string{"not an address"}); !errors.Is(err, ErrEndpointInvalid) {
		t.Fatalf("SetSTUNServers(bad): %v, want ErrEndpointInvalid", err)
	}
	cfg := RelayConfig{URL: base + "/v1-meshvpn/relay", CAPEM: pki.ca}
	for _, e := range []*Engine{a, b} {
		if err := e.StartRelay(cfg); err != nil {
			t.Fatal(err)
		}
		if err := e.WaitRelayConnected(waitCtx(t)); err != nil {
			t.Fatal(err)
		}
	}

	// Each announces its candidates when its relay session starts and
	// answers the other's; polled for at most 15 s.
	var sa, sb NATStats
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if sa, err = a.NATStats(); err != nil {
			t.Fatal(err)
		}
		if sb, err = b.NATStats(); err != nil {
			t.Fatal(err)
		}
		if sa.CandidatesSent > 0 && sb.CandidatesReceived > 0 &&
			sb.CandidatesSent > 0 && sa.CandidatesReceived > 0 {
			break
		}
	}
	t.Logf("a %+v", sa)
	t.Logf("b %+v", sb)
	for name, s := range map[string]NATStats{"a": sa, "b": sb} {
		if s.CandidatesSent == 0 || s.CandidatesReceived == 0 {
			t.Errorf("%s: no candidates exchanged through the relay: %+v", name, s)
		}
		if s.CandidatesMalformed != 0 || s.CandidatesUnsupported != 0 || s.CandidatesUnknownPeer != 0 {
			t.Errorf("%s: candidates refused: %+v", name, s)
		}
	}

	// The status: a's own candidates (its reflexive address from STUN) and
	// b's path. b's candidates reach a empty: loopback addresses are
	// dropped on decode (relay::protocol::Candidates), so on 127.0.0.0/8
	// the received lists are not asserted.
	st, err := a.NATStatus()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a status %+v", st)
	if len(st.Candidates) == 0 || !st.Reflexive.IsValid() ||
		len(st.STUNServers) != 1 || st.STUNServers[0].String() != stun ||
		st.Discovery.Requests == 0 || st.Discovery.Answers == 0 {
		t.Errorf("a's own candidates and STUN: %+v", st)
	}
	// The relay told a where its session comes from: a's loopback address
	// and the connection's port; one session, so no IP change yet.
	if !st.RelayObserved.IsValid() || st.RelayObserved.Addr() != netip.MustParseAddr("127.0.0.1") ||
		st.RelayObserved.Port() == 0 || st.RelayIPChanges != 0 || sa.RelayIPChanges != 0 {
		t.Errorf("a's relay-observed address: %v, IP changes %d (NATStats %d)",
			st.RelayObserved, st.RelayIPChanges, sa.RelayIPChanges)
	}
	var peerB *NATPeer
	for i, p := range st.Peers {
		if p.PublicKey == kb.PublicKey().String() {
			peerB = &st.Peers[i]
		}
	}
	if peerB == nil || peerB.Path == nil || (peerB.Path.Kind != "udp" && peerB.Path.Kind != "relay") {
		t.Errorf("b's path at a: %+v", peerB)
	} else {
		t.Logf("b at a: path %+v", *peerB.Path)
	}

	// Bytes and time per path kind: UDP is blackholed, so packets go on
	// the relay once a's handshakes there go unanswered (about 5 s; sent
	// again each second for at most 30 s), and nothing arrives over UDP.
	aAddr, bAddr := netip.MustParseAddr("10.79.0.1"), netip.MustParseAddr("10.79.0.2")
	ping := udpPacket(aAddr, bAddr, 1000, 3)
	bufs, sizes := mtuBuffers(t, b, 1)
	delivered := 0
	for deadline := time.Now().Add(30 * time.Second); delivered == 0 && time.Now().Before(deadline); {
		if err := a.SendPacket(ping); err != nil {
			t.Fatal(err)
		}
		n, err := b.ReadPackets(bufs, sizes, time.Second)
		if err != nil && !errors.Is(err, ErrTimeout) {
			t.Fatal(err)
		}
		delivered += n
	}
	if delivered == 0 {
		t.Fatal("no packet through the relay within 30 s")
	}
	before, err := a.NATStatus()
	if err != nil {
		t.Fatal(err)
	}
	const burst = 20
	for i := 0; i < burst; i++ {
		if err := a.SendPacket(udpPacket(aAddr, bAddr, 1000, byte(i))); err != nil {
			t.Fatal(err)
		}
		readN(t, b, 1)
	}
	after, err := a.NATStatus()
	if err != nil {
		t.Fatal(err)
	}
	bStatus, err := b.NATStatus()
	if err != nil {
		t.Fatal(err)
	}
	tb, ta := after.Traffic[kb.PublicKey().String()], bStatus.Traffic[ka.PublicKey().String()]
	t.Logf("a's traffic to b %+v, b's from a %+v", tb, ta)
	sent := tb.Relay.TxBytes - before.Traffic[kb.PublicKey().String()].Relay.TxBytes
	if sent < burst*1000 {
		t.Errorf("a counted %d B on the relay for %d packets of 1000 B", sent, burst)
	}
	if ta.Relay.RxBytes < burst*1000 || ta.Direct.RxBytes != 0 {
		t.Errorf("b's bytes from a: %+v", ta)
	}
	if tb.Direct.TxBytes == 0 || tb.Direct.RxBytes != 0 {
		t.Errorf("a's unanswered UDP handshakes: %+v", tb.Direct)
	}
	if tb.Relay.Time <= 0 || tb.Relay.Time > time.Minute {
		t.Errorf("a's time on the relay: %v", tb.Relay.Time)
	}
	ps, err := a.PeerStats(kb.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	if tb.Direct.TxBytes+tb.Relay.TxBytes > ps.TxBytes {
		t.Errorf("per-path bytes %+v exceed the peer's transfer %d", tb, ps.TxBytes)
	}
	if !after.DiscoveryRan || after.SinceDiscovery > 31*time.Second {
		t.Errorf("time since the last discovery round: %v (ran %v)", after.SinceDiscovery, after.DiscoveryRan)
	}

	a.Close()
	if _, err := a.NATStats(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("NATStats after Close: %v, want net.ErrClosed", err)
	}
	if _, err := a.NATStatus(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("NATStatus after Close: %v, want net.ErrClosed", err)
	}
}

// stunServer answers RFC 5389 binding requests on 127.0.0.1 with the
// sender's address (XOR-MAPPED-ADDRESS), for at most the test's length.
func stunServer(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			// A binding request: type 0x0001, magic cookie 0x2112A442.
			if n < 20 || buf[0] != 0 || buf[1] != 1 || binary.BigEndian.Uint32(buf[4:8]) != 0x2112A442 {
				continue
			}
			ua := from.(*net.UDPAddr)
			ip4 := ua.IP.To4()
			if ip4 == nil {
				continue
			}
			resp := make([]byte, 32)
			binary.BigEndian.PutUint16(resp[0:], 0x0101) // binding success
			binary.BigEndian.PutUint16(resp[2:], 12)
			copy(resp[4:20], buf[4:20])                   // cookie and transaction id
			binary.BigEndian.PutUint16(resp[20:], 0x0020) // XOR-MAPPED-ADDRESS
			binary.BigEndian.PutUint16(resp[22:], 8)
			resp[25] = 1 // IPv4
			binary.BigEndian.PutUint16(resp[26:], uint16(ua.Port)^0x2112)
			binary.BigEndian.PutUint32(resp[28:], binary.BigEndian.Uint32(ip4)^0x2112A442)
			_, _ = c.WriteTo(resp, from)
		}
	}()
	return c.LocalAddr().String()
}
