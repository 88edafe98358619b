package meshvpn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestControlServerHandler: Go's own HTTPS router (httptest, not the
// library's listener) mounts ControlServer.Handler; two userspace nodes
// join through it and reach each other over the mesh; the server lists
// each node's seen address as the one Go's router saw; requests that are
// not a websocket upgrade over TLS and HTTP/1.1 get a clear answer; and
// closing the control server ends the hijacked sessions.
func TestControlServerHandler(t *testing.T) {
	p := newTunnelPKI(t)
	cs := newControlServer(t, ControlServerConfig{DBPath: filepath.Join(t.TempDir(), "control.db")})
	var mu sync.Mutex
	remotes := map[string]bool{}
	mux := http.NewServeMux()
	handler := cs.Handler()
	mux.Handle(ControlPath, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		remotes[r.RemoteAddr] = true
		mu.Unlock()
		handler.ServeHTTP(w, r)
	}))
	mux.HandleFunc("/other", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "router") })
	srv := httptest.NewUnstartedServer(mux)
	cert, err := tls.X509KeyPair(p.serverCert, p.serverKey)
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()
	url := "wss://" + srv.Listener.Addr().String() + ControlPath

	key, err := cs.CreateKey(JoinKeyOptions{Reusable: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	join := func(name string) *Node {
		n, err := Join(ctx, JoinConfig{ControlURL: url, JoinKey: key, Hostname: name, CAPEM: p.ca,
			Userspace: true, EndpointIPs: []string{"127.0.0.1"}})
		if err != nil {
			t.Fatalf("join %s through Go's router: %v", name, err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	a, b := join("a"), join("b")
	bIP, err := b.IPv4()
	if err != nil {
		t.Fatal(err)
	}
	l, err := b.Netstack().Listen("tcp", netip.AddrPortFrom(bIP, 8080).String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	echo := func() error {
		dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer dcancel()
		c, err := a.Netstack().DialContext(dctx, "tcp", netip.AddrPortFrom(bIP, 8080).String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		if string(buf) != "ping" {
			t.Fatalf("echo: %q", buf)
		}
		return nil
	}
	start := time.Now()
	for err := echo(); err != nil; err = echo() {
		if time.Since(start) > 15*time.Second {
			t.Fatalf("a never reached b over the mesh: %v", err)
		}
	}
	t.Logf("a reached b over the mesh %v after both joined", time.Since(start))

	nodes, err := cs.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Fatalf("nodes: %+v", nodes)
	}
	mu.Lock()
	for _, n := range nodes {
		if !n.Online || n.Seen == nil || !remotes[*n.Seen] {
			t.Errorf("node %s: online %v, seen %v; Go's router saw %v", n.Name, n.Online, n.Seen, remotes)
		}
	}
	mu.Unlock()

	// Go's router serves its other paths; the handler answers what is not
	// a websocket upgrade over TLS and HTTP/1.1 itself.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.ca)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	get := func(path string) (int, string) {
		resp, err := client.Get("https://" + srv.Listener.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := get("/other"); code != 200 || body != "router" {
		t.Fatalf("/other: %d %q", code, body)
	}
	if code, body := get(ControlPath); code != http.StatusUpgradeRequired || !strings.Contains(body, "websocket upgrade") {
		t.Fatalf("a plain GET: %d %q", code, body)
	}
	upgrade := func(r *http.Request) *http.Request {
		r.Header.Set("Connection", "Upgrade")
		r.Header.Set("Upgrade", "websocket")
		return r
	}
	rec := httptest.NewRecorder()
	h2 := upgrade(httptest.NewRequest("GET", ControlPath, nil))
	h2.TLS = &tls.ConnectionState{}
	h2.Proto, h2.ProtoMajor, h2.ProtoMinor = "HTTP/2.0", 2, 0
	handler.ServeHTTP(rec, h2)
	if rec.Code != http.StatusHTTPVersionNotSupported || !strings.Contains(rec.Body.String(), "HTTP/1.1") {
		t.Fatalf("HTTP/2: %d %q", rec.Code, rec.Body.String())
	}
	rec = httptest.NewRecorder()
	handler.ServeHTTP(rec, upgrade(httptest.NewRequest("GET", ControlPath, nil)))
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "TLS") {
		t.Fatalf("without TLS: %d %q", rec.Code, rec.Body.String())
	}

	// Closing the control server ends the hijacked sessions: the library
	// closes its socketpair ends, the handler closes the connections, and
	// the nodes see it; a new upgrade is refused.
	closed := time.Now()
	if err := cs.Close(); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Node{a, b} {
		waitEvent(t, n, "disconnected", func(e NodeEvent) bool { return e.Type == "disconnected" })
	}
	t.Logf("both nodes disconnected %v after Close", time.Since(closed))
	raw, err := tls.Dial("tcp", srv.Listener.Addr().String(), &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	io.WriteString(raw, "GET "+ControlPath+" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	status, _ := io.ReadAll(io.LimitReader(raw, 64))
	if !strings.HasPrefix(string(status), "HTTP/1.1 503") {
		t.Fatalf("an upgrade after Close: %q", status)
	}
}
