// libmeshvpn's userspace stack (the Go binding) against wireguard-go with
// its gVisor netstack, in one process over real loopback UDP: HTTP served
// by each side and fetched by the other.
package interop

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	meshvpn "github.com/meshvpn/libmeshvpn/bindings/go"
)

var (
	ourAddr = netip.MustParseAddr("10.88.0.1")
	wgAddr  = netip.MustParseAddr("10.88.0.2")
)

// wgPeer is wireguard-go with a gVisor stack on 10.88.0.2.
type wgPeer struct {
	dev  *device.Device
	net  *netstack.Net
	port int
}

func startWireguardGo(t *testing.T, priv, peerPub meshvpn.Key, peerPort uint16) *wgPeer {
	t.Helper()
	tun, tnet, err := netstack.CreateNetTUN([]netip.Addr{wgAddr}, nil, 1420)
	if err != nil {
		t.Fatal(err)
	}
	// No persistent keepalive: it would make wireguard-go initiate as it
	// comes up, crossing the handshake the test's first ping starts. When
	// an initiation and a response reach this wireguard-go at the same
	// moment, its two handshake workers can race on the peer's state and
	// leave it a session it sends on but cannot receive on (index 0 in its
	// table), until its 15-second retry. That is wireguard-go's; what the
	// engine does when handshakes cross is tested in
	// engine/tests/crossing_handshakes.rs.
	dev := device.NewDevice(tun, conn.NewDefaultBind(), device.NewLogger(device.LogLevelError, "wireguard-go: "))
	t.Cleanup(dev.Close)
	err = dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\npublic_key=%s\nallowed_ip=%s/32\nendpoint=127.0.0.1:%d\n",
		priv.Hex(), peerPub.Hex(), ourAddr, peerPort))
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.Up(); err != nil {
		t.Fatal(err)
	}
	get, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	p := &wgPeer{dev: dev, net: tnet}
	for _, line := range strings.Split(get, "\n") {
		if v, ok := strings.CutPrefix(line, "listen_port="); ok {
			fmt.Sscan(v, &p.port)
		}
	}
	if p.port == 0 {
		t.Fatalf("no listen_port in wireguard-go's UAPI reply:\n%s", get)
	}
	return p
}

func hashHandler(who string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%s %s %d %x", who, r.URL.Path, n, h.Sum(nil))
	})
}

// exchange POSTs 256 KiB and checks the server's answer.
func exchange(t *testing.T, client *http.Client, url, who string) {
	t.Helper()
	body := strings.Repeat("wireguard interop ", 256<<10/18)
	var resp *http.Response
	var err error
	// The first request may wait for the handshake.
	for i := 0; i < 3; i++ {
		resp, err = client.Post(url, "text/plain", strings.NewReader(body))
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	want := fmt.Sprintf("%s /x %d %x", who, len(body), sha256.Sum256([]byte(body)))
	if string(got) != want {
		t.Fatalf("POST %s: %q, want %q", url, got, want)
	}
}

func TestHTTPBothWaysWithWireguardGoNetstack(t *testing.T) {
	ourKey, _ := meshvpn.GenerateKey()
	wgKey, _ := meshvpn.GenerateKey()
	e, err := meshvpn.New(meshvpn.Config{
		PrivateKey: &ourKey,
		Addresses:  []netip.Prefix{netip.PrefixFrom(ourAddr, 24)},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	port, _ := e.ListenPort()
	wg := startWireguardGo(t, wgKey, ourKey.PublicKey(), port)
	if err := e.AddPeer(meshvpn.PeerConfig{
		PublicKey:  wgKey.PublicKey(),
		AllowedIPs: []netip.Prefix{netip.PrefixFrom(wgAddr, 32)},
		Endpoint:   fmt.Sprintf("127.0.0.1:%d", wg.port),
	}); err != nil {
		t.Fatal(err)
	}
	ns, err := e.NewNetstack(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := ns.Ping(ctx, wgAddr); err != nil {
		t.Fatalf("ping wireguard-go's stack: %v", err)
	}

	// libmeshvpn serves, wireguard-go's stack fetches.
	l, err := ns.Listen("tcp", ":80")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: hashHandler("libmeshvpn"), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	defer srv.Close()
	wgClient := &http.Client{
		Timeout:   20 * time.Second,
		Transport: &http.Transport{DialContext: wg.net.DialContext},
	}
	for i := 0; i < 3; i++ {
		exchange(t, wgClient, fmt.Sprintf("http://%s/x", ourAddr), "libmeshvpn")
	}

	// wireguard-go's stack serves, libmeshvpn fetches.
	wl, err := wg.net.ListenTCP(&net.TCPAddr{Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	wsrv := &http.Server{Handler: hashHandler("wireguard-go"), ReadHeaderTimeout: 10 * time.Second}
	go wsrv.Serve(wl)
	defer wsrv.Close()
	ourClient := &http.Client{
		Timeout:   20 * time.Second,
		Transport: &http.Transport{DialContext: ns.DialContext},
	}
	for i := 0; i < 3; i++ {
		exchange(t, ourClient, fmt.Sprintf("http://%s/x", wgAddr), "wireguard-go")
	}

	// A closed port on wireguard-go's side is refused, not timed out. The
	// dial gets its own deadline: the exchanges above may have used up the
	// ping's on a loaded machine.
	dialCtx, dialCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dialCancel()
	if _, err := ns.DialContext(dialCtx, "tcp", wgAddr.String()+":81"); !errors.Is(err, meshvpn.ErrConnectionRefused) {
		t.Fatalf("dial to a closed port: %v", err)
	}
}
