package meshvpn

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// `echo <priv> | wg pubkey` (wireguard-tools).
const (
	vectorPriv = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
	vectorPub  = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
)

func TestKeys(t *testing.T) {
	k, err := ParseKey(vectorPriv)
	if err != nil {
		t.Fatal(err)
	}
	if got := k.PublicKey().String(); got != vectorPub {
		t.Fatalf("public key %s, want %s", got, vectorPub)
	}
	back, err := ParseKeyHex(k.Hex())
	if err != nil || back != k {
		t.Fatalf("hex round trip: %v", err)
	}
	a, _ := GenerateKey()
	b, _ := GeneratePresharedKey()
	if a == b || a == (Key{}) {
		t.Fatal("generated keys are not random")
	}
	_, err = ParseKey("AAAA")
	if !errors.Is(err, ErrKeyInvalid) {
		t.Fatalf("short key: %v", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Op != "ParseKey" || !strings.Contains(e.Message, "32-byte") {
		t.Fatalf("error detail: %#v", err)
	}
}

func TestConfigErrorsWrapTheResultCode(t *testing.T) {
	k, _ := GenerateKey()
	peer, _ := GenerateKey()
	_, err := New(Config{PrivateKey: &k, Peers: []PeerConfig{{PublicKey: k.PublicKey()}}})
	if !errors.Is(err, ErrKeyOwn) {
		t.Fatalf("own key as peer: %v", err)
	}
	_, err = New(Config{PrivateKey: &k, Peers: []PeerConfig{{PublicKey: Key{}}}})
	if !errors.Is(err, ErrKeyLowOrder) {
		t.Fatalf("low-order key: %v", err)
	}
	_, err = New(Config{Peers: []PeerConfig{{PublicKey: peer.PublicKey(), Endpoint: "nowhere"}}})
	if !errors.Is(err, ErrEndpointInvalid) || !strings.Contains(err.Error(), "peers[0].endpoint") {
		t.Fatalf("bad endpoint: %v", err)
	}
	_, err = NewFromWgQuick("[Interface]\nListenPort = 70000\n")
	if !errors.Is(err, ErrConfigInvalid) || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("bad wg-quick: %v", err)
	}
}

type node struct {
	e    *Engine
	key  Key
	addr netip.Addr
	port uint16
}

// pair returns two engines on loopback, each the other's peer: a from a
// Config struct, b from wg-quick text.
func pair(t testing.TB) (*node, *node) {
	t.Helper()
	ka, _ := GenerateKey()
	kb, _ := GenerateKey()
	a := &node{key: ka, addr: netip.MustParseAddr("10.77.0.1")}
	b := &node{key: kb, addr: netip.MustParseAddr("10.77.0.2")}
	var err error
	a.e, err = New(Config{PrivateKey: &ka, Addresses: []netip.Prefix{netip.MustParsePrefix("10.77.0.1/24")}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.e.Close() })
	a.port, _ = a.e.ListenPort()
	b.e, err = NewFromWgQuick(fmt.Sprintf(
		"[Interface]\nPrivateKey = %s\nAddress = 10.77.0.2/24\n\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.77.0.1/32\nEndpoint = 127.0.0.1:%d\n",
		kb, ka.PublicKey(), a.port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.e.Close() })
	b.port, _ = b.e.ListenPort()
	err = a.e.AddPeer(PeerConfig{
		PublicKey:  kb.PublicKey(),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.77.0.2/32")},
		Endpoint:   fmt.Sprintf("127.0.0.1:%d", b.port),
	})
	if err != nil {
		t.Fatal(err)
	}
	return a, b
}

// udpPacket is an IPv4/UDP packet of size bytes from src to dst.
func udpPacket(src, dst netip.Addr, size int, seed byte) []byte {
	p := make([]byte, size)
	p[0] = 0x45
	p[2], p[3] = byte(size>>8), byte(size)
	p[8], p[9] = 64, 17
	s, d := src.As4(), dst.As4()
	copy(p[12:16], s[:])
	copy(p[16:20], d[:])
	p[20], p[21], p[22], p[23] = 4, 210, 22, 46
	p[24], p[25] = byte((size-20)>>8), byte(size-20)
	for i := 28; i < size; i++ {
		p[i] = byte(i*31) + seed
	}
	return p
}

func mtuBuffers(t testing.TB, e *Engine, n int) ([][]byte, []int) {
	mtu, err := e.MTU()
	if err != nil {
		t.Fatal(err)
	}
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, mtu)
	}
	return bufs, make([]int, n)
}

// readN reads exactly n packets from e within 10 s.
func readN(t testing.TB, e *Engine, n int) [][]byte {
	t.Helper()
	var out [][]byte
	deadline := time.Now().Add(10 * time.Second)
	bufs, sizes := mtuBuffers(t, e, n)
	for len(out) < n && time.Now().Before(deadline) {
		got, err := e.ReadPackets(bufs[:n-len(out)], sizes, time.Until(deadline))
		if err != nil {
			t.Fatalf("ReadPackets after %d of %d: %v", len(out), n, err)
		}
		for i := 0; i < got; i++ {
			out = append(out, append([]byte(nil), bufs[i][:sizes[i]]...))
		}
	}
	return out
}

func TestPacketExchangeBetweenTwoEngines(t *testing.T) {
	a, b := pair(t)
	var batch [][]byte
	total := 0
	for i, size := range []int{84, 1400, 600, 1420} {
		batch = append(batch, udpPacket(a.addr, b.addr, size, byte(i)))
		total += size
	}
	n, err := a.e.SendPackets(batch)
	if err != nil || n != len(batch) {
		t.Fatalf("SendPackets: %d, %v", n, err)
	}
	got := readN(t, b.e, len(batch))
	for i := range batch {
		if !bytes.Equal(got[i], batch[i]) {
			t.Fatalf("packet %d differs", i)
		}
	}
	reply := udpPacket(b.addr, a.addr, 300, 9)
	if err := b.e.SendPacket(reply); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, a.e, 1); !bytes.Equal(got[0], reply) {
		t.Fatal("reply differs")
	}

	// A packet is counted just after it is queued for the host: give the
	// receive thread a moment to finish counting.
	var sa, sb PeerStats
	for range 200 {
		var err error
		if sa, err = a.e.PeerStats(b.key.PublicKey()); err != nil {
			t.Fatal(err)
		}
		sb, _ = b.e.PeerStats(a.key.PublicKey())
		if sb.RxPackets == 4 && sa.RxPackets == 1 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if sa.TxPackets != 4 || sa.TxInnerBytes != uint64(total) || sb.RxPackets != 4 || sb.RxInnerBytes != uint64(total) {
		t.Fatalf("counters: a %+v b %+v", sa, sb)
	}
	if sa.LastHandshake.IsZero() || time.Since(sa.LastHandshake) > time.Minute {
		t.Fatalf("last handshake %v", sa.LastHandshake)
	}
	if sb.Endpoint != netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.port) {
		t.Fatalf("endpoint %v", sb.Endpoint)
	}

	// Errors a sender can act on.
	err = a.e.SendPacket(udpPacket(a.addr, netip.MustParseAddr("10.99.0.1"), 60, 0))
	if !errors.Is(err, ErrNoRoute) {
		t.Fatalf("no route: %v", err)
	}
	if err := a.e.SendPacket(nil); !errors.Is(err, ErrPacketMalformed) {
		t.Fatalf("empty packet: %v", err)
	}
	mixed := [][]byte{batch[0], udpPacket(a.addr, netip.MustParseAddr("10.99.0.1"), 60, 0), batch[1]}
	if n, err := a.e.SendPackets(mixed); n != 1 || !errors.Is(err, ErrNoRoute) {
		t.Fatalf("mixed batch: %d, %v", n, err)
	}
	readN(t, b.e, 1)
	s, _ := a.e.Stats()
	if s.TxNoRoute != 2 || s.TxMalformed != 1 {
		t.Fatalf("engine stats %+v", s)
	}
	small := [][]byte{make([]byte, 100)}
	if _, err := b.e.ReadPackets(small, []int{0}, 0); !errors.Is(err, ErrBufferTooSmall) {
		t.Fatalf("small buffer: %v", err)
	}
	bufs, sizes := mtuBuffers(t, b.e, 1)
	if _, err := b.e.ReadPackets(bufs, sizes, 50*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("timeout: %v", err)
	}
}

func TestPeersAddUpdateRemove(t *testing.T) {
	a, b := pair(t)
	stranger, _ := GenerateKey()
	ep := "127.0.0.1:9"
	err := a.e.UpdatePeer(PeerUpdate{PublicKey: stranger.PublicKey(), Endpoint: &ep})
	if !errors.Is(err, ErrNoSuchPeer) {
		t.Fatalf("update unknown: %v", err)
	}
	ka := uint16(25)
	err = a.e.UpdatePeer(PeerUpdate{PublicKey: stranger.PublicKey(), Create: true, Endpoint: &ep,
		PersistentKeepalive: &ka, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.99.0.0/24")}})
	if err != nil {
		t.Fatal(err)
	}
	peers, _ := a.e.Peers()
	if len(peers) != 2 || peers[0] != b.key.PublicKey() || peers[1] != stranger.PublicKey() {
		t.Fatalf("peers %v", peers)
	}
	st, _ := a.e.PeerStats(stranger.PublicKey())
	if st.PersistentKeepalive != 25 || st.Endpoint.String() != ep {
		t.Fatalf("stats %+v", st)
	}
	text, err := a.e.ConfigText()
	if err != nil || !strings.Contains(text, "10.99.0.0/24") || !strings.Contains(text, stranger.PublicKey().String()) {
		t.Fatalf("config text %q, %v", text, err)
	}
	if err := a.e.RemovePeer(stranger.PublicKey()); err != nil {
		t.Fatal(err)
	}
	if err := a.e.RemovePeer(stranger.PublicKey()); !errors.Is(err, ErrNoSuchPeer) {
		t.Fatalf("second remove: %v", err)
	}
	if err := a.e.InitiateHandshake(b.key.PublicKey()); err != nil {
		t.Fatal(err)
	}
	pub, _ := a.e.PublicKey()
	if pub != a.key.PublicKey() {
		t.Fatal("public key")
	}
	nk, _ := GenerateKey()
	if err := a.e.SetPrivateKey(nk); err != nil {
		t.Fatal(err)
	}
	if pub, _ := a.e.PublicKey(); pub != nk.PublicKey() {
		t.Fatal("public key after SetPrivateKey")
	}
}

func TestDoubleCloseAndUseAfterClose(t *testing.T) {
	e, err := NewFromWgQuick("")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if e.Running() {
		t.Fatal("running after Close")
	}
	for name, err := range map[string]error{
		"SendPacket": e.SendPacket(make([]byte, 40)),
		"AddPeer":    e.AddPeer(PeerConfig{}),
		"Start":      e.Start(),
	} {
		if !errors.Is(err, net.ErrClosed) || !errors.Is(err, ErrInvalidHandle) {
			t.Fatalf("%s after Close: %v", name, err)
		}
	}
	if _, err := e.Stats(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Stats after Close: %v", err)
	}
}

func TestStopStart(t *testing.T) {
	a, b := pair(t)
	if err := b.e.Stop(); err != nil {
		t.Fatal(err)
	}
	if b.e.Running() {
		t.Fatal("running after Stop")
	}
	if _, err := b.e.ListenPort(); !errors.Is(err, ErrEngineStopped) {
		t.Fatalf("ListenPort while stopped: %v", err)
	}
	if err := b.e.Start(); err != nil {
		t.Fatal(err)
	}
	if p, _ := b.e.ListenPort(); p != b.port {
		t.Fatalf("port %d after restart, was %d", p, b.port)
	}
	p := udpPacket(a.addr, b.addr, 100, 1)
	if err := a.e.SendPacket(p); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, b.e, 1); !bytes.Equal(got[0], p) {
		t.Fatal("packet after restart differs")
	}
}

func TestCloseWakesBlockedRead(t *testing.T) {
	_, b := pair(t)
	bufs, sizes := mtuBuffers(t, b.e, 4)
	done := make(chan error, 1)
	go func() {
		_, err := b.e.ReadPackets(bufs, sizes, -1)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	if err := b.e.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("blocked read returned %v", err)
		}
		t.Logf("blocked read woke %v after Close", time.Since(start))
	case <-time.After(5 * time.Second):
		t.Fatal("blocked read did not wake on Close")
	}
}

func TestConcurrentUseWhileClosing(t *testing.T) {
	a, b := pair(t)
	p := udpPacket(a.addr, b.addr, 200, 3)
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				// Until the handshake completes the engine queues a
				// bounded number of packets; past that a send is
				// dropped (ErrPacketDropped), which is backpressure,
				// not a failure of Close.
				err := a.e.SendPacket(p)
				if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, ErrPacketDropped) {
					t.Errorf("send: %v", err)
					return
				}
				_, _ = a.e.PeerStats(b.key.PublicKey())
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	a.e.Close()
	wg.Wait()
}

func TestForcedPanicReturnsAnErrorAndTheProcessLives(t *testing.T) {
	err := testPanic()
	if !errors.Is(err, ErrPanic) || !strings.Contains(err.Error(), "forced by a test") {
		t.Fatalf("forced panic: %v", err)
	}
	// The library still works.
	a, b := pair(t)
	p := udpPacket(a.addr, b.addr, 64, 0)
	if err := a.e.SendPacket(p); err != nil {
		t.Fatal(err)
	}
	readN(t, b.e, 1)
}

func TestFinalizerReleasesAnUnclosedEngine(t *testing.T) {
	port := func() uint16 {
		e, err := NewFromWgQuick("")
		if err != nil {
			t.Fatal(err)
		}
		p, _ := e.ListenPort()
		return p // e becomes garbage without Close
	}()
	addr := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.IPv4Unspecified(), port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		c, err := net.ListenUDP("udp4", addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("port %d still bound 10 s after the engine became garbage: %v", port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type recordingHandler struct {
	mu      sync.Mutex
	records []string
}

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	var s strings.Builder
	s.WriteString(r.Level.String() + " " + r.Message)
	r.Attrs(func(a slog.Attr) bool { s.WriteString(" " + a.String()); return true })
	h.mu.Lock()
	h.records = append(h.records, s.String())
	h.mu.Unlock()
	return nil
}
func (h *recordingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordingHandler) WithGroup(string) slog.Handler      { return h }

func TestLoggerReceivesRecordsWithoutSecrets(t *testing.T) {
	h := &recordingHandler{}
	if err := SetLogger(slog.New(h)); err != nil {
		t.Fatal(err)
	}
	defer SetLogger(nil)
	a, b := pair(t)
	p := udpPacket(a.addr, b.addr, 64, 0)
	if err := a.e.SendPacket(p); err != nil {
		t.Fatal(err)
	}
	readN(t, b.e, 1)
	a.e.Close()
	b.e.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.records) == 0 {
		t.Fatal("no log records")
	}
	all := strings.Join(h.records, "\n")
	for _, secret := range []string{a.key.String(), b.key.String(), a.key.Hex(), b.key.Hex()} {
		if strings.Contains(all, secret) {
			t.Fatal("a private key appears in the logs")
		}
	}
	if !strings.Contains(all, "target=") {
		t.Fatalf("records lack their target: %s", h.records[0])
	}
	t.Logf("%d records, e.g. %q", len(h.records), h.records[0])
}

// A decrypted packet larger than the receiver's MTU is dropped whole and
// counted as DropOversized; the next packet arrives intact.
func TestOversizedPacketIsDroppedAndCounted(t *testing.T) {
	a, b := pair(t)
	first := udpPacket(a.addr, b.addr, 1420, 1)
	if err := a.e.SendPacket(first); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, b.e, 1); !bytes.Equal(got[0], first) {
		t.Fatal("first packet differs")
	}
	if err := a.e.SendPacket(udpPacket(a.addr, b.addr, 1500, 2)); err != nil {
		t.Fatal(err)
	}
	var sb PeerStats
	for range 200 {
		sb, _ = b.e.PeerStats(a.key.PublicKey())
		if sb.Drops[DropOversized] > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if sb.Drops[DropOversized] != 1 || sb.RxPackets != 1 {
		t.Fatalf("drops %v, rx %d", sb.Drops, sb.RxPackets)
	}
	last := udpPacket(a.addr, b.addr, 1000, 3)
	if err := a.e.SendPacket(last); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, b.e, 1); !bytes.Equal(got[0], last) {
		t.Fatal("the packet after the oversized one differs")
	}
}

// TestFilter: b accepts UDP port 5678 from a; a's flow and b's reply pass,
// another port is dropped and counted, a flow b may not start fails at
// once, a bad rule names its line, and ClearFilter allows all again.
func TestFilter(t *testing.T) {
	a, b := pair(t)
	withPorts := func(p []byte, sport, dport uint16) []byte {
		p[20], p[21] = byte(sport>>8), byte(sport)
		p[22], p[23] = byte(dport>>8), byte(dport)
		return p
	}
	err := b.e.SetFilter("in from 10.77.0.1/32 to 10.77.0.2/32:5678 proto udp # a's service\nin from 10.77.0.1/32 to 10.77.0.2/32:5678 proto nope")
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("bad rule: %v", err)
	}
	if err := b.e.SetFilter("in from 10.77.0.1/32 to 10.77.0.2/32:5678 proto udp # a's service"); err != nil {
		t.Fatal(err)
	}
	if err := a.e.SendPacket(withPorts(udpPacket(a.addr, b.addr, 100, 1), 1234, 5678)); err != nil {
		t.Fatal(err)
	}
	readN(t, b.e, 1)
	if err := b.e.SendPacket(withPorts(udpPacket(b.addr, a.addr, 100, 2), 5678, 1234)); err != nil {
		t.Fatalf("reply on the allowed flow: %v", err)
	}
	readN(t, a.e, 1)
	if err := a.e.SendPacket(withPorts(udpPacket(a.addr, b.addr, 100, 3), 1234, 9999)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, _ := b.e.Stats()
		if s.FilterNotAllowed == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("denied packet not counted: %+v", s)
		}
		time.Sleep(10 * time.Millisecond)
	}
	err = b.e.SendPacket(withPorts(udpPacket(b.addr, a.addr, 100, 4), 5678, 4321))
	if !errors.Is(err, ErrPacketDropped) {
		t.Fatalf("outbound flow the rules refuse: %v", err)
	}
	if s, _ := b.e.Stats(); s.FilterOutboundDenied != 1 || s.FilterFlows != 1 {
		t.Fatalf("filter stats %+v", s)
	}
	if err := b.e.ClearFilter(); err != nil {
		t.Fatal(err)
	}
	if err := b.e.SendPacket(withPorts(udpPacket(b.addr, a.addr, 100, 5), 5678, 4321)); err != nil {
		t.Fatalf("after ClearFilter: %v", err)
	}
	readN(t, a.e, 1)
}
