package meshvpn

import (
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

	// The status: a's own candidates, and b's as a received them.
	st, err := a.NATStatus()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a status %+v", st)
	if len(st.Candidates) == 0 || st.Reflexive.IsValid() || len(st.STUNServers) != 0 {
		t.Errorf("a's own candidates: %+v (want local ones, no STUN)", st)
	}
	var fromB []netip.AddrPort
	for _, p := range st.Peers {
		if p.PublicKey == kb.PublicKey().String() {
			fromB = p.Candidates
		}
	}
	if c, ok := st.Pending[kb.PublicKey().String()]; ok {
		fromB = c
	}
	bst, err := b.NATStatus()
	if err != nil {
		t.Fatal(err)
	}
	if len(fromB) == 0 || len(fromB) != len(bst.Candidates) {
		t.Errorf("b's candidates at a %v, b announces %v", fromB, bst.Candidates)
	}

	a.Close()
	if _, err := a.NATStats(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("NATStats after Close: %v, want net.ErrClosed", err)
	}
	if _, err := a.NATStatus(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("NATStatus after Close: %v, want net.ErrClosed", err)
	}
}
