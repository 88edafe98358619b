package meshvpn

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// controlServer runs `meshvpn control serve` (plain websocket on
// loopback) from target/, with its database in a temp dir.
type controlServer struct {
	bin, db, url string
}

func startControl(t *testing.T) *controlServer {
	t.Helper()
	bin, _ := filepath.Abs("../../target/release/meshvpn")
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("no %s: cargo build --release -p meshvpn-cli", bin)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := &controlServer{bin: bin, db: filepath.Join(t.TempDir(), "control.db")}
	s.url = "ws://" + addr + "/v1-meshvpn/control"
	cmd := exec.Command(bin, "control", "--db", s.db, "serve", "--listen", addr, "--plain")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	deadline := time.Now().Add(15 * time.Second)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("control server never listened")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

func (s *controlServer) ctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(s.bin, append([]string{"control", "--db", s.db}, args...)...).Output()
	if err != nil {
		t.Fatalf("meshvpn control %v: %v", args, err)
	}
	return strings.TrimSpace(string(out))
}

func waitEvent(t *testing.T, n *Node, what string, want func(NodeEvent) bool) NodeEvent {
	t.Helper()
	timeout := time.After(15 * time.Second)
	for {
		select {
		case ev, ok := <-n.Events():
			if !ok {
				t.Fatalf("events closed before %s", what)
			}
			if want(ev) {
				return ev
			}
		case <-timeout:
			t.Fatalf("no %s event", what)
		}
	}
}

// TestJoinUserspaceMesh: two nodes joined in userspace mode dial TCP to
// each other over the mesh; a policy change arrives as an event and its
// filter refuses a port it does not allow; revoked and expired keys get
// their own errors; a refused route is an event.
func TestJoinUserspaceMesh(t *testing.T) {
	s := startControl(t)
	key := s.ctl(t, "keys", "create", "--reusable")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	join := func(cfg JoinConfig) (*Node, error) {
		cfg.ControlURL = s.url
		cfg.Userspace = true
		cfg.EndpointIPs = []string{"127.0.0.1"}
		return Join(ctx, cfg)
	}
	a, err := join(JoinConfig{JoinKey: key, Hostname: "a"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := join(JoinConfig{JoinKey: key, Hostname: "b"})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	bIP, err := b.IPv4()
	if err != nil {
		t.Fatal(err)
	}
	for _, port := range []uint16{8080, 9090} {
		l, err := b.Netstack().Listen("tcp", netip.AddrPortFrom(bIP, port).String())
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
	}
	echo := func(port uint16, timeout time.Duration) error {
		dctx, dcancel := context.WithTimeout(context.Background(), timeout)
		defer dcancel()
		c, err := a.Netstack().DialContext(dctx, "tcp", netip.AddrPortFrom(bIP, port).String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
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
	deadline := time.Now().Add(15 * time.Second)
	for echo(8080, 2*time.Second) != nil {
		if time.Now().After(deadline) {
			t.Fatal("a never reached b over the mesh")
		}
	}

	policy := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(policy, []byte(`{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:8080"]}]}`), 0o600)
	s.ctl(t, "policy", "set", policy)
	waitEvent(t, a, "policy_changed", func(e NodeEvent) bool { return e.Type == "policy_changed" })
	waitEvent(t, b, "policy_changed", func(e NodeEvent) bool { return e.Type == "policy_changed" })
	if err := echo(9090, 2*time.Second); err == nil {
		t.Fatal("port 9090 is not in the policy, yet a reached it")
	}
	if err := echo(8080, 10*time.Second); err != nil {
		t.Fatalf("8080 is allowed: %v", err)
	}

	revoked := s.ctl(t, "keys", "create")
	s.ctl(t, "keys", "revoke", revoked)
	if _, err := join(JoinConfig{JoinKey: revoked}); !errors.Is(err, ErrJoinKeyRevoked) {
		t.Fatalf("revoked key: %v", err)
	}
	expired := s.ctl(t, "keys", "create", "--expiry", "1s")
	time.Sleep(1100 * time.Millisecond) // the key's 1 s lifetime, then it is expired
	if _, err := join(JoinConfig{JoinKey: expired}); !errors.Is(err, ErrJoinKeyExpired) {
		t.Fatalf("expired key: %v", err)
	}

	// Two clusters on one pod CIDR: the second one's route is refused.
	one := s.ctl(t, "keys", "create", "--cluster", "one")
	two := s.ctl(t, "keys", "create", "--cluster", "two")
	c1, err := join(JoinConfig{JoinKey: one, Hostname: "c1", AdvertiseRoutes: []string{"10.42.0.0/16"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	s.ctl(t, "routes", "approve", "c1", "10.42.0.0/16")
	c2, err := join(JoinConfig{JoinKey: two, Hostname: "c2", AdvertiseRoutes: []string{"10.42.0.0/16"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	ev := waitEvent(t, c2, "route refused", func(e NodeEvent) bool { return e.Type == "route" && e.Status == "refused" })
	if ev.Reason == nil || !strings.Contains(*ev.Reason, "one") {
		t.Fatalf("the refusal names the other cluster: %+v", ev)
	}
}

// TestJoinCancelEndsTheCCall: a Join to a server that accepts and never
// answers, cancelled after 100 ms, returns ctx.Err() at once, and the C
// meshvpn_join returns too (no call left in flight), long before its
// 30 s wait.
func TestJoinCancelEndsTheCCall(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		var held []net.Conn
		for {
			c, err := l.Accept()
			if err != nil {
				for _, c := range held {
					c.Close()
				}
				return
			}
			held = append(held, c)
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	n, err := Join(ctx, JoinConfig{
		ControlURL:  "ws://" + l.Addr().String() + "/v1-meshvpn/control",
		JoinKey:     "mvk-never-checked",
		EndpointIPs: []string{"127.0.0.1"},
		Userspace:   true,
	})
	if n != nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Join = %v, %v; want nil, context.Canceled", n, err)
	}
	returned := time.Since(start)
	if returned > time.Second {
		t.Fatalf("Join took %v after a 100 ms cancel", returned)
	}
	deadline := time.Now().Add(2 * time.Second)
	for joinsInFlight.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("meshvpn_join still running 2 s after the cancel")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("Join returned after %v, the C call had ended by %v", returned, time.Since(start))
}
