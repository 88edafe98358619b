package meshvpn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	nodeKey  = "system:node:gotest"
	tunWait  = 20 * time.Second
	tunToken = "go-token-1"
)

// tunnelPKI is a CA with a server certificate for 127.0.0.1 and a k3s-style
// node client certificate, all PEM.
type tunnelPKI struct {
	ca, serverCert, serverKey, clientCert, clientKey []byte
}

func newTunnelPKI(t *testing.T) *tunnelPKI {
	t.Helper()
	key := func() (*ecdsa.PrivateKey, []byte) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return k, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	now := time.Now()
	caKey, _ := key()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "go test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, tmpl *x509.Certificate) ([]byte, []byte) {
		k, kpem := key()
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Hour), now.Add(time.Hour)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), kpem
	}
	p := &tunnelPKI{ca: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})}
	p.serverCert, p.serverKey = leaf(2, &x509.Certificate{
		Subject: pkix.Name{CommonName: "localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	p.clientCert, p.clientKey = leaf(3, &x509.Certificate{
		Subject:     pkix.Name{CommonName: nodeKey, Organization: []string{"system:nodes"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return p
}

// okService is an HTTP server that answers "ok".
func okService(t *testing.T) *httptest.Server {
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) }))
	t.Cleanup(svc.Close)
	return svc
}

func startTunnelServer(t *testing.T, p *tunnelPKI) (*TunnelServer, string) {
	t.Helper()
	return listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: p.serverCert, KeyPEM: p.serverKey,
		ClientCAPEM: p.ca, Tokens: map[string]string{tunToken: "edge1"},
	})
}

// listenTunnelServer creates a server from cfg, starts it, closes it when
// the test ends, and returns it with its base URL (wss://ADDR).
func listenTunnelServer(t *testing.T, cfg TunnelServerConfig) (*TunnelServer, string) {
	t.Helper()
	s, err := NewTunnelServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	addr, err := s.Addr()
	if err != nil {
		t.Fatal(err)
	}
	return s, "wss://" + addr
}

// eventLog records an agent's events.
type eventLog struct {
	mu     sync.Mutex
	events []TunnelEvent
}

func (l *eventLog) add(e TunnelEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) count(kind TunnelEventKind) (n int, last TunnelEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.events {
		if e.Kind == kind {
			n++
			last = e
		}
	}
	return n, last
}

func (l *eventLog) waitFor(t *testing.T, kind TunnelEventKind, n int) TunnelEvent {
	t.Helper()
	deadline := time.Now().Add(tunWait)
	for time.Now().Before(deadline) {
		if got, last := l.count(kind); got >= n {
			return last
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no %d events of kind %d", n, kind)
	return TunnelEvent{}
}

func startTunnelAgent(t *testing.T, cfg TunnelAgentConfig) *TunnelAgent {
	t.Helper()
	a, err := NewTunnelAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	return a
}

func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), tunWait)
	t.Cleanup(cancel)
	return ctx
}

func httpVia(s *TunnelServer, clientKey string) *http.Client {
	return &http.Client{
		Timeout: tunWait,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return s.DialContext(ctx, clientKey, network, addr)
			},
		},
	}
}

func getOK(t *testing.T, c *http.Client, url string) string {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("status %d, body %q, err %v", resp.StatusCode, body, err)
	}
	return string(body)
}

func TestTunnelServerDialsThroughAgent(t *testing.T) {
	p := newTunnelPKI(t)
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("kubelet says hi from " + r.URL.Path))
	}))
	defer svc.Close()
	s, url := startTunnelServer(t, p)
	var events eventLog
	a := startTunnelAgent(t, TunnelAgentConfig{
		URL: url, CAPEM: p.ca, ClientCertPEM: p.clientCert, ClientKeyPEM: p.clientKey,
		Allow: []string{"tcp/127.0.0.1:*"}, OnEvent: events.add,
	})
	if err := a.WaitConnected(waitCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitSession(waitCtx(t), nodeKey); err != nil {
		t.Fatal(err)
	}
	if keys, err := s.Sessions(); err != nil || len(keys) != 1 || keys[0] != nodeKey {
		t.Fatalf("sessions %v, %v", keys, err)
	}
	if body := getOK(t, httpVia(s, nodeKey), svc.URL+"/pods"); body != "kubelet says hi from /pods" {
		t.Fatalf("body %q", body)
	}
	st, err := a.Status()
	if err != nil || !st.Connected || st.Sessions != 1 || st.StreamsTotal != 1 || st.BytesFromTargets == 0 {
		t.Fatalf("status %+v, %v", st, err)
	}
	if n, _ := events.count(TunnelConnected); n != 1 {
		t.Fatalf("%d connected events", n)
	}
}

func TestTunnelRefusedTarget(t *testing.T) {
	p := newTunnelPKI(t)
	svc := okService(t)
	s, url := startTunnelServer(t, p)
	// The default policy (kubelet and stream ports only) refuses svc.
	a := startTunnelAgent(t, TunnelAgentConfig{URL: url, CAPEM: p.ca, Token: tunToken})
	if err := s.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	c, err := s.DialContext(waitCtx(t), "edge1", "tcp", svc.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Read(make([]byte, 10))
	if !errors.Is(err, ErrTunnelRefused) {
		t.Fatalf("read: %v, want ErrTunnelRefused", err)
	}
	// The tunnel stayed up.
	if keys, _ := s.Sessions(); len(keys) != 1 {
		t.Fatalf("sessions %v", keys)
	}
	if st, err := a.Status(); err != nil || st.StreamsRefused != 1 || st.StreamsTotal != 0 {
		t.Fatalf("status %+v, %v: want the refusal counted", st, err)
	}
	// No session for another key.
	if _, err := s.Dial("nobody", "tcp", "127.0.0.1:1"); !errors.Is(err, ErrTunnelNoSession) {
		t.Fatalf("dial: %v, want ErrTunnelNoSession", err)
	}
}

// TestTunnelAgentCountsCapAndFailedDials: with MaxStreams 1, a second
// stream while one is open is refused and counted at the cap; an allowed
// target that refuses the connection counts as a failed dial.
func TestTunnelAgentCountsCapAndFailedDials(t *testing.T) {
	p := newTunnelPKI(t)
	hold, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	// A port that was just closed: dials to it are refused.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := closed.Addr().String()
	closed.Close()
	s, url := startTunnelServer(t, p)
	a := startTunnelAgent(t, TunnelAgentConfig{
		URL: url, CAPEM: p.ca, Token: tunToken, Allow: []string{"tcp/127.0.0.1:*"}, MaxStreams: 1,
	})
	if err := s.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	held, err := s.DialContext(waitCtx(t), "edge1", "tcp", hold.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	second, err := s.DialContext(waitCtx(t), "edge1", "tcp", hold.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := second.Read(make([]byte, 10)); err == nil {
		t.Fatal("a stream over the cap was served")
	}
	second.Close()
	st, err := a.Status()
	if err != nil || st.StreamsRefusedAtCap != 1 || st.StreamsRefused != 0 || st.StreamsActive != 1 {
		t.Fatalf("status %+v, %v: want one refusal at the cap", st, err)
	}
	held.Close()
	deadline := time.Now().Add(tunWait)
	for st.StreamsActive != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		st, _ = a.Status()
	}
	c, err := s.DialContext(waitCtx(t), "edge1", "tcp", deadAddr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 10)); !errors.Is(err, ErrTunnelRefused) {
		t.Fatalf("read: %v, want ErrTunnelRefused", err)
	}
	c.Close()
	st, err = a.Status()
	if err != nil || st.DialsFailed != 1 || st.StreamsRefusedAtCap != 1 {
		t.Fatalf("status %+v, %v: want one failed dial", st, err)
	}
}

func TestTunnelAllowFuncAndAuthFailure(t *testing.T) {
	p := newTunnelPKI(t)
	svc := okService(t)
	s, url := startTunnelServer(t, p)
	var mu sync.Mutex
	var asked []string
	startTunnelAgent(t, TunnelAgentConfig{URL: url, CAPEM: p.ca, Token: tunToken, AllowFunc: func(network, address string) bool {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, network+"/"+address)
		return address == svc.Listener.Addr().String()
	}})
	if err := s.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	getOK(t, httpVia(s, "edge1"), svc.URL)
	mu.Lock()
	if len(asked) != 1 || asked[0] != "tcp/"+svc.Listener.Addr().String() {
		t.Fatalf("asked %v", asked)
	}
	mu.Unlock()

	var events eventLog
	startTunnelAgent(t, TunnelAgentConfig{URL: url, CAPEM: p.ca, Token: "wrong", OnEvent: events.add})
	ev := events.waitFor(t, TunnelConnectError, 1)
	if !errors.Is(ev.Err, ErrTunnelAuth) {
		t.Fatalf("event %+v, want ErrTunnelAuth", ev)
	}
	if _, err := NewTunnelAgent(TunnelAgentConfig{URL: url, CAPEM: []byte("not PEM")}); !errors.Is(err, ErrTunnelTLS) {
		t.Fatalf("bad PEM: %v", err)
	}
	if _, err := NewTunnelAgent(TunnelAgentConfig{URL: url}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("no CA: %v", err)
	}
}

func TestTunnelServerRestart(t *testing.T) {
	p := newTunnelPKI(t)
	svc := okService(t)
	s, url := startTunnelServer(t, p)
	var events eventLog
	a := startTunnelAgent(t, TunnelAgentConfig{URL: url, CAPEM: p.ca, Token: tunToken,
		Allow: []string{"tcp/127.0.0.1:*"}, OnEvent: events.add})
	if err := s.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	old, err := s.DialContext(waitCtx(t), "edge1", "tcp", svc.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Read(make([]byte, 1)); !errors.Is(err, ErrTunnelReset) {
		t.Fatalf("old stream: %v, want ErrTunnelReset", err)
	}
	events.waitFor(t, TunnelDisconnected, 1)
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	if addr, _ := s.Addr(); "wss://"+addr != url {
		t.Fatalf("restarted on %s, was %s", addr, url)
	}
	if err := s.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	getOK(t, httpVia(s, "edge1"), svc.URL)
	events.waitFor(t, TunnelConnected, 2)
	if st, _ := a.Status(); st.Reconnects != 1 {
		t.Fatalf("status %+v", st)
	}
}

func TestTunnelConnDeadlinesAndClose(t *testing.T) {
	p := newTunnelPKI(t)
	// A target that accepts and never answers.
	idle, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	go func() {
		for {
			c, err := idle.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	s, url := startTunnelServer(t, p)
	a := startTunnelAgent(t, TunnelAgentConfig{URL: url, CAPEM: p.ca, Token: tunToken, Allow: []string{"tcp/127.0.0.1:*"}})
	if err := s.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	c, err := s.DialContext(waitCtx(t), "edge1", "tcp", idle.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}

	// A deadline in the past, then a short one.
	c.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read: %v, want a timeout", err)
	}
	// A deadline set while a Read blocks wakes it.
	c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	c.SetReadDeadline(time.Now())
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read: %v", err)
		}
	case <-time.After(tunWait):
		t.Fatal("SetReadDeadline did not wake the Read")
	}

	// Close while a Read blocks: it returns net.ErrClosed.
	c.SetReadDeadline(time.Time{})
	go func() {
		_, err := c.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read: %v, want net.ErrClosed", err)
		}
	case <-time.After(tunWait):
		t.Fatal("Close did not wake the Read")
	}
	// Double Close, use after Close.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	for _, closer := range []io.Closer{a, s} {
		if err := closer.Close(); err != nil {
			t.Fatal(err)
		}
		if err := closer.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Status(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("status after close: %v", err)
	}
	if _, err := s.Dial("edge1", "tcp", "127.0.0.1:1"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("dial after close: %v", err)
	}
	if !strings.Contains(c.RemoteAddr().String(), "127.0.0.1") {
		t.Fatalf("remote addr %v", c.RemoteAddr())
	}
}

// The agent dials a target that exists only on another node's mesh
// address through its userspace stack (a kubelet reachable over the mesh,
// no TUN device), and loopback targets through the OS.
func TestTunnelAgentDialsMeshTargetsThroughItsNetstack(t *testing.T) {
	_, b, na, nb := stacks(t)
	l, err := nb.Listen("tcp", ":10250")
	if err != nil {
		t.Fatal(err)
	}
	kubelet := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("mesh kubelet " + r.URL.Path))
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go kubelet.Serve(l)
	t.Cleanup(func() { kubelet.Close() })
	local := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("loopback " + r.URL.Path))
	}))
	defer local.Close()

	p := newTunnelPKI(t)
	s, url := startTunnelServer(t, p)
	a := startTunnelAgent(t, TunnelAgentConfig{
		URL: url, CAPEM: p.ca, ClientCertPEM: p.clientCert, ClientKeyPEM: p.clientKey,
		Allow:    []string{"tcp/" + b.addr.String() + ":10250", "tcp/127.0.0.1:*"},
		Netstack: na,
	})
	if err := a.WaitConnected(waitCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitSession(waitCtx(t), nodeKey); err != nil {
		t.Fatal(err)
	}
	c := httpVia(s, nodeKey)
	if body := getOK(t, c, fmt.Sprintf("http://%s:10250/pods", b.addr)); body != "mesh kubelet /pods" {
		t.Fatalf("mesh target: %q", body)
	}
	if body := getOK(t, c, local.URL+"/healthz"); body != "loopback /healthz" {
		t.Fatalf("loopback target: %q", body)
	}
}

// TestTunnelServerAdmissionCaps: idle connections from one source
// (127.0.0.2) beyond MaxHandshakesPerSource are closed at once and
// counted, and an agent from 127.0.0.1 still connects.
func TestTunnelServerAdmissionCaps(t *testing.T) {
	pki := newTunnelPKI(t)
	srv, base := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: pki.serverCert, KeyPEM: pki.serverKey,
		Tokens: map[string]string{tunToken: "edge1"}, MaxHandshakesPerSource: 2,
	})
	addr := strings.TrimPrefix(base, "wss://")
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 2 * time.Second}
	var conns []net.Conn
	for i := 0; i < 5; i++ {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	deadline := time.Now().Add(10 * time.Second)
	var st TunnelServerStats
	for time.Now().Before(deadline) {
		var err error
		if st, err = srv.Stats(); err != nil {
			t.Fatal(err)
		}
		if st.RefusedHandshakesPerSource == 3 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st.RefusedHandshakesPerSource != 3 || st.Handshakes != 2 {
		t.Fatalf("5 idle connections from one source with a cap of 2: %+v", st)
	}
	startTunnelAgent(t, TunnelAgentConfig{URL: base, CAPEM: pki.ca, Token: tunToken})
	if err := srv.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatalf("agent from 127.0.0.1 while 127.0.0.2 is at its cap: %v", err)
	}
	if st, _ = srv.Stats(); st.Sessions != 1 {
		t.Fatalf("stats %+v", st)
	}
}
