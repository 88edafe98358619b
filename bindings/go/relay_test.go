package meshvpn

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// relayNode is an engine whose one peer's UDP endpoint is a blackhole: a
// loopback socket nobody reads, so UDP handshakes go unanswered.
func relayNode(t *testing.T, key, peer Key, addr, peerAddr string, blackhole net.PacketConn) *Engine {
	t.Helper()
	e, err := New(Config{
		PrivateKey: &key,
		Addresses:  []netip.Prefix{netip.MustParsePrefix(addr + "/24")},
		Peers: []PeerConfig{{
			PublicKey:  peer.PublicKey(),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix(peerAddr + "/32")},
			Endpoint:   blackhole.LocalAddr().String(),
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// TestRelayCarriesPacketsWhenUDPIsBlackholed: a relay-only TunnelServer
// (TLS, no tokens, keys restricted to the two engines') carries a packet
// each way between two engines that cannot reach each other over UDP.
func TestRelayCarriesPacketsWhenUDPIsBlackholed(t *testing.T) {
	pki := newTunnelPKI(t)
	blackhole, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer blackhole.Close()
	ka, _ := GenerateKey()
	kb, _ := GenerateKey()
	srv, base := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		Relay: true, RelayKeys: []Key{ka.PublicKey(), kb.PublicKey()},
		RelayQueueBytes: 256 << 10, RelayBudgetBytes: 1 << 20, RelayWriteTimeout: 5 * time.Second,
	})
	aAddr, bAddr := netip.MustParseAddr("10.78.0.1"), netip.MustParseAddr("10.78.0.2")
	a := relayNode(t, ka, kb, aAddr.String(), bAddr.String(), blackhole)
	b := relayNode(t, kb, ka, bAddr.String(), aAddr.String(), blackhole)

	if _, err := a.RelayStatus(); !errors.Is(err, ErrRelayNotRunning) {
		t.Fatalf("RelayStatus before StartRelay: %v", err)
	}
	cfg := RelayConfig{
		URL:           base + "/v1-meshvpn/relay",
		CAPEM:         pki.ca,
		ProbeInterval: time.Minute, // stay on the relay for the test
	}
	for _, e := range []*Engine{a, b} {
		if err := e.StartRelay(cfg); err != nil {
			t.Fatal(err)
		}
		if err := e.WaitRelayConnected(waitCtx(t)); err != nil {
			t.Fatal(err)
		}
	}

	// The first packet waits for a handshake; two initiations go
	// unanswered over UDP (about 5 s), then the peer moves to the relay.
	// Sent again each second, for at most 30 s.
	ping := udpPacket(aAddr, bAddr, 200, 1)
	bufs, sizes := mtuBuffers(t, b, 1)
	var got []byte
	start := time.Now()
	for deadline := time.Now().Add(30 * time.Second); got == nil && time.Now().Before(deadline); {
		if err := a.SendPacket(ping); err != nil {
			t.Fatal(err)
		}
		n, err := b.ReadPackets(bufs, sizes, time.Second)
		if err != nil && !errors.Is(err, ErrTimeout) {
			t.Fatal(err)
		}
		if n > 0 {
			got = bufs[0][:sizes[0]]
		}
	}
	if !bytes.Equal(got, ping) {
		t.Fatalf("no packet through the relay within 30 s (got %d bytes)", len(got))
	}
	t.Logf("first packet through the relay after %v", time.Since(start).Round(time.Millisecond))
	reply := udpPacket(bAddr, aAddr, 300, 2)
	if err := b.SendPacket(reply); err != nil {
		t.Fatal(err)
	}
	if r := readN(t, a, 1); !bytes.Equal(r[0], reply) {
		t.Fatal("reply differs")
	}

	ps, err := a.PeerStats(kb.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	if !ps.OnRelay || !netip.MustParsePrefix("100::/64").Contains(ps.Endpoint.Addr()) {
		t.Fatalf("peer not on the relay: OnRelay %v, endpoint %v", ps.OnRelay, ps.Endpoint)
	}
	st, err := a.RelayStatus()
	if err != nil {
		t.Fatal(err)
	}
	if !st.Connected || st.Sessions != 1 || st.FramesSent == 0 || st.FramesReceived == 0 {
		t.Fatalf("relay status %+v", st)
	}
	rs, err := srv.RelayStats()
	if err != nil {
		t.Fatal(err)
	}
	if rs.Clients != 2 || rs.Registrations != 2 || rs.Forwarded == 0 || rs.Refused != 0 ||
		rs.DroppedBudget != 0 || rs.ClosedSlow != 0 || rs.QueuedBytesPeak == 0 ||
		rs.SessionQueuedBytesPeak > 256<<10 || rs.QueuedBytesPeak > 1<<20 {
		t.Fatalf("relay server stats %+v", rs)
	}

	// StopRelay: the peer goes back to its UDP endpoint; twice is fine.
	if err := a.StopRelay(); err != nil {
		t.Fatal(err)
	}
	if err := a.StopRelay(); err != nil {
		t.Fatalf("second StopRelay: %v", err)
	}
	if _, err := a.RelayStatus(); !errors.Is(err, ErrRelayNotRunning) {
		t.Fatalf("RelayStatus after StopRelay: %v", err)
	}
	if err := a.WaitRelayConnected(context.Background()); !errors.Is(err, ErrRelayNotRunning) {
		t.Fatalf("WaitRelayConnected after StopRelay: %v", err)
	}
	if ps, _ := a.PeerStats(kb.PublicKey()); ps.OnRelay || ps.Endpoint.String() != blackhole.LocalAddr().String() {
		t.Fatalf("after StopRelay: OnRelay %v, endpoint %v", ps.OnRelay, ps.Endpoint)
	}

	// Use after Close.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"StartRelay": a.StartRelay(cfg),
		"StopRelay":  a.StopRelay(),
	} {
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("%s after Close: %v", name, err)
		}
	}
	if _, err := a.RelayStatus(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("RelayStatus after Close: %v", err)
	}
}

func TestRelayBadInput(t *testing.T) {
	pki := newTunnelPKI(t)
	e, err := NewFromWgQuick("")
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for _, c := range []struct {
		cfg  RelayConfig
		want Result
		text string
	}{
		{RelayConfig{URL: "https://127.0.0.1:1/v1-meshvpn/relay", CAPEM: pki.ca}, ErrInvalidArgument, "wss://"},
		{RelayConfig{URL: "wss://127.0.0.1:1/v1-meshvpn/relay"}, ErrInvalidArgument, "ca_pem"},
		{RelayConfig{URL: "wss://127.0.0.1:1/v1-meshvpn/relay", CAPEM: []byte("not PEM")}, ErrTunnelTLS, "ca_pem"},
	} {
		err := e.StartRelay(c.cfg)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("StartRelay(%q): %v, want %v mentioning %q", c.cfg.URL, err, c.want, c.text)
		}
	}
	if err := e.WaitRelayConnected(context.Background()); !errors.Is(err, ErrRelayNotRunning) {
		t.Fatalf("WaitRelayConnected without a relay: %v", err)
	}
	// A relay nobody answers: the client keeps trying, the token stays secret.
	cfg := RelayConfig{URL: "ws://127.0.0.1:1/v1-meshvpn/relay", Token: "relay-secret-token"}
	if err := e.StartRelay(cfg); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := e.WaitRelayConnected(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitRelayConnected to nobody: %v", err)
	}
	st, err := e.RelayStatus()
	if err != nil || st.Connected || strings.Contains(st.LastError, cfg.Token) {
		t.Fatalf("status %+v, %v", st, err)
	}

	// Server side: relay options need Relay; a server without it has no relay counters.
	_, err = NewTunnelServer(TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		Tokens: map[string]string{"t": "k"}, RelayRequireAuth: true,
	})
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("relay option without Relay: %v", err)
	}
	_, err = NewTunnelServer(TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		Tokens: map[string]string{"t": "k"}, RelayWriteTimeout: time.Second,
	})
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("relay limit without Relay: %v", err)
	}
	for _, c := range []struct {
		cfg  TunnelServerConfig
		text string
	}{
		{TunnelServerConfig{RelayQueueBytes: 1000}, "below one largest frame"},
		{TunnelServerConfig{RelayQueueBytes: 4 << 20, RelayBudgetBytes: 1 << 20}, "below the queue bytes"},
	} {
		cfg := c.cfg
		cfg.Addr, cfg.CertPEM, cfg.KeyPEM, cfg.Relay = "127.0.0.1:0", pki.serverCert, pki.serverKey, true
		_, err := NewTunnelServer(cfg)
		if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("relay limits %+v: %v, want one mentioning %q", c.cfg, err, c.text)
		}
	}
	srv, _ := startTunnelServer(t, pki)
	if _, err := srv.RelayStats(); !errors.Is(err, ErrRelayNotRunning) {
		t.Fatalf("RelayStats without Relay: %v", err)
	}
}

// TestRelayRequireAuth: with RelayRequireAuth, only an engine with one of
// the server's tokens registers; the refusal shows in LastError without
// the token.
func TestRelayRequireAuth(t *testing.T) {
	pki := newTunnelPKI(t)
	srv, base := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		Tokens: map[string]string{"relay-good-token": "edge"},
		Relay:  true, RelayRequireAuth: true,
	})
	engine := func() *Engine { return newKeyedEngine(t) }
	cfg := RelayConfig{URL: base + "/v1-meshvpn/relay", CAPEM: pki.ca, Token: "relay-bad-token"}
	bad := engine()
	if err := bad.StartRelay(cfg); err != nil {
		t.Fatal(err)
	}
	var st RelayStatus
	var err error
	for deadline := time.Now().Add(tunWait); st.LastError == "" && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, err = bad.RelayStatus(); err != nil {
			t.Fatal(err)
		}
	}
	if st.Connected || st.LastError == "" || strings.Contains(st.LastError, cfg.Token) {
		t.Fatalf("wrong token: %+v", st)
	}
	t.Logf("wrong token: %s", st.LastError)
	good := engine()
	cfg.Token = "relay-good-token"
	if err := good.StartRelay(cfg); err != nil {
		t.Fatal(err)
	}
	if err := good.WaitRelayConnected(waitCtx(t)); err != nil {
		t.Fatal(err)
	}
	if st, _ := bad.RelayStatus(); st.Connected {
		t.Fatal("the engine with the wrong token registered")
	}
	rs, err := srv.RelayStats()
	if err != nil || rs.Clients != 1 || rs.Registrations != 1 {
		t.Fatalf("relay server stats %+v, %v", rs, err)
	}
}

// TestRelayClientCertificate: a relay whose server has only a client CA
// (no tokens) and requires the tunnel's credentials admits an engine that
// presents ClientCertPEM/ClientKeyPEM and refuses one without; the two
// fields go together and need CAPEM.
func TestRelayClientCertificate(t *testing.T) {
	pki := newTunnelPKI(t)
	srv, base := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		ClientCAPEM: pki.ca, Relay: true, RelayRequireAuth: true,
	})
	engine := func() *Engine { return newKeyedEngine(t) }
	url := base + "/v1-meshvpn/relay"
	probe := engine()
	for _, c := range []struct {
		cfg  RelayConfig
		want Result
		text string
	}{
		{RelayConfig{URL: url, CAPEM: pki.ca, ClientCertPEM: pki.clientCert}, ErrInvalidArgument, "client_key_pem"},
		{RelayConfig{URL: url, CAPEM: pki.ca, ClientKeyPEM: pki.clientKey}, ErrInvalidArgument, "client_key_pem"},
		{RelayConfig{URL: url, CAPEM: pki.ca, ClientCertPEM: pki.clientCert, ClientKeyPEM: []byte("not PEM")}, ErrTunnelTLS, "client certificate"},
		{RelayConfig{URL: "ws://127.0.0.1:1/v1-meshvpn/relay", ClientCertPEM: pki.clientCert, ClientKeyPEM: pki.clientKey}, ErrInvalidArgument, "ca_pem"},
	} {
		err := probe.StartRelay(c.cfg)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("StartRelay: %v, want %v mentioning %q", err, c.want, c.text)
		}
	}

	without := engine()
	if err := without.StartRelay(RelayConfig{URL: url, CAPEM: pki.ca}); err != nil {
		t.Fatal(err)
	}
	var st RelayStatus
	var err error
	for deadline := time.Now().Add(tunWait); st.LastError == "" && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, err = without.RelayStatus(); err != nil {
			t.Fatal(err)
		}
	}
	if st.Connected || !strings.Contains(st.LastError, "401") {
		t.Fatalf("without a certificate: %+v", st)
	}
	with := engine()
	cfg := RelayConfig{URL: url, CAPEM: pki.ca, ClientCertPEM: pki.clientCert, ClientKeyPEM: pki.clientKey}
	if err := with.StartRelay(cfg); err != nil {
		t.Fatal(err)
	}
	if err := with.WaitRelayConnected(waitCtx(t)); err != nil {
		st, _ := with.RelayStatus()
		t.Fatalf("%v: %+v", err, st)
	}
	rs, err := srv.RelayStats()
	if err != nil || rs.Clients != 1 {
		t.Fatalf("relay server stats %+v, %v", rs, err)
	}
}

// newKeyedEngine is an engine with a fresh key, closed when the test ends.
func newKeyedEngine(t *testing.T) *Engine {
	t.Helper()
	k, _ := GenerateKey()
	e, err := New(Config{PrivateKey: &k})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}
