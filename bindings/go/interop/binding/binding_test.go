// Interop of the Go binding's tunnel types (meshvpn.TunnelServer,
// meshvpn.TunnelAgent, in this process through cgo) with the real
// github.com/rancher/remotedialer at the revision k3s pins, both ways.
// Needs the static library: make -C bindings/go lib.
package binding_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	meshvpn "github.com/meshvpn/libmeshvpn/bindings/go"
	"github.com/meshvpn/libmeshvpn/bindings/go/interop/internal/rdtest"
)

const wait = 20 * time.Second

func kubelet(t *testing.T) *httptest.Server {
	t.Helper()
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("kubelet " + r.URL.Path))
	}))
	t.Cleanup(svc.Close)
	return svc
}

func expect200(t *testing.T, c *http.Client, url, body string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || string(got) != body {
		t.Fatalf("status %d body %q err %v", resp.StatusCode, got, err)
	}
}

// A meshvpn.TunnelServer dials through a Go remotedialer client.
func TestBindingServerDialsThroughGoClient(t *testing.T) {
	p := rdtest.NewPKI()
	svc := kubelet(t)
	s, err := meshvpn.NewTunnelServer(meshvpn.TunnelServerConfig{
		Addr: "127.0.0.1:0", Path: rdtest.Path, CertPEM: p.ServerPEM, KeyPEM: p.ServerKey,
		Tokens: map[string]string{"tok-go": "edge-go"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	addr, err := s.Addr()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*wait)
	defer cancel()
	var connects atomic.Int64
	allow := func(proto, address string) bool { return address == svc.Listener.Addr().String() }
	go rdtest.RunClient(ctx, "wss://"+addr+rdtest.Path, p, "tok-go", allow, &connects)
	if err := s.WaitSession(ctx, "edge-go"); err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: wait, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			return s.DialContext(ctx, "edge-go", network, address)
		},
	}}
	expect200(t, client, svc.URL+"/healthz", "kubelet /healthz")
	expect200(t, client, svc.URL+"/again", "kubelet /again")
	if n := connects.Load(); n != 1 {
		t.Fatalf("the Go client connected %d times", n)
	}
}

// A Go remotedialer server dials through a meshvpn.TunnelAgent.
func TestGoServerDialsThroughBindingAgent(t *testing.T) {
	p := rdtest.NewPKI()
	svc := kubelet(t)
	srv, err := rdtest.StartServer("127.0.0.1:0", p, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	a, err := meshvpn.NewTunnelAgent(meshvpn.TunnelAgentConfig{
		URL: "wss://" + srv.Addr, Path: rdtest.Path, CAPEM: p.CAPEM,
		ClientCertPEM: p.ClientPEM, ClientKeyPEM: p.ClientKey,
		Allow: []string{"tcp/" + svc.Listener.Addr().String()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	if !srv.WaitSession(rdtest.NodeCN, wait) {
		t.Fatal("no session from the binding's agent")
	}
	target := svc.Listener.Addr().String()
	expect200(t, srv.HTTPClient(rdtest.NodeCN, target), "http://"+target+"/pods", "kubelet /pods")
	// A target outside the policy fails that connection only.
	if resp, err := srv.HTTPClient(rdtest.NodeCN, "127.0.0.1:1").Get("http://x/"); err == nil {
		resp.Body.Close()
		t.Fatal("a refused target answered")
	}
	expect200(t, srv.HTTPClient(rdtest.NodeCN, target), "http://"+target+"/after", "kubelet /after")
	st, err := a.Status()
	if err != nil || st.Sessions != 1 || st.StreamsRefused != 1 || st.StreamsTotal != 2 {
		t.Fatalf("status %+v, %v", st, err)
	}
}
