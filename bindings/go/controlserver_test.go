package meshvpn

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const testPolicy = `{
  "tagOwners": {"tag:gotest": []},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "autoApprovers": {"routes": {"10.242.1.0/24": ["tag:gotest"]}}
}`

func newControlServer(t *testing.T, cfg ControlServerConfig) *ControlServer {
	t.Helper()
	if cfg.DBPath == "" {
		cfg.DBPath = filepath.Join(t.TempDir(), "control.db")
	}
	cs, err := NewControlServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs
}

func keyByID(t *testing.T, cs *ControlServer, id string) JoinKey {
	t.Helper()
	keys, err := cs.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.ID == id {
			return k
		}
	}
	t.Fatalf("key %s not listed in %+v", id, keys)
	return JoinKey{}
}

// The admin API an embedding k3s server uses, end to end through C.
func TestControlServerAdmin(t *testing.T) {
	db := filepath.Join(t.TempDir(), "control.db")
	cs := newControlServer(t, ControlServerConfig{DBPath: db})

	// A key is shown once: CreateKey returns its text, listings never do.
	text, err := cs.CreateKey(JoinKeyOptions{Tags: []string{"tag:gotest"}, Cluster: "k3s-go", Expiry: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(text, "mvpn-key-") || len(text) != joinKeyLen {
		t.Fatalf("key text %q", text)
	}
	id, secret := text[9:25], text[26:]
	k := keyByID(t, cs, id)
	if k.State != "valid" || k.Reusable || k.Expires == nil || *k.Cluster != "k3s-go" || k.Tags[0] != "tag:gotest" {
		t.Fatalf("listed %+v", k)
	}
	if raw, err := cs.keysJSON(); err != nil || strings.Contains(raw, secret) || !strings.Contains(raw, id) {
		t.Fatal("a listing holds the key's secret")
	}
	// A bad tag is refused and nothing is created.
	if _, err := cs.CreateKey(JoinKeyOptions{Tags: []string{"gotest"}}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("bad tag: %v", err)
	}
	if keys, _ := cs.Keys(); len(keys) != 1 {
		t.Fatalf("%d keys after a refused create", len(keys))
	}

	// Revoked keys are listed as revoked, by id or by whole text.
	if err := cs.RevokeKey(text); err != nil {
		t.Fatal(err)
	}
	if k := keyByID(t, cs, id); k.State != "revoked" || k.Revoked == nil {
		t.Fatalf("after revoke: %+v", k)
	}
	if err := cs.RevokeKey("0000000000000000"); !errors.Is(err, ErrControlNotFound) {
		t.Fatalf("unknown key: %v", err)
	}

	// Policy versions increase; a bad policy names its line and is not stored.
	if p, v, err := cs.Policy(); err != nil || p != "" || v != 0 {
		t.Fatalf("no policy: %q %d %v", p, v, err)
	}
	v1, err := cs.SetPolicy(testPolicy)
	if err != nil || v1 != 1 {
		t.Fatalf("SetPolicy: %d %v", v1, err)
	}
	_, err = cs.SetPolicy("{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"tag:nope\"], \"dst\": [\"*:*\"]}\n  ]\n}")
	if !errors.Is(err, ErrControlPolicyInvalid) || !strings.Contains(err.Error(), "line 3") || !strings.Contains(err.Error(), "tag:nope") {
		t.Fatalf("bad policy: %v", err)
	}
	if p, v, _ := cs.Policy(); v != 1 || p != testPolicy {
		t.Fatalf("after a bad policy: version %d", v)
	}
	if v2, err := cs.SetPolicy(`{}`); err != nil || v2 != 2 {
		t.Fatalf("second policy: %d %v", v2, err)
	}

	// Unknown nodes and bad prefixes.
	if err := cs.RemoveNode("ghost"); !errors.Is(err, ErrControlNotFound) {
		t.Fatalf("remove ghost: %v", err)
	}
	if err := cs.ApproveRoute("ghost", "10.42.0.0/99"); !errors.Is(err, ErrPrefixInvalid) {
		t.Fatalf("bad prefix: %v", err)
	}
	if nodes, err := cs.Nodes(); err != nil || len(nodes) != 0 {
		t.Fatalf("nodes: %v %v", nodes, err)
	}
	if routes, err := cs.Routes(); err != nil || len(routes) != 0 {
		t.Fatalf("routes: %v %v", routes, err)
	}

	// Closed: calls fail; the state stays in the file for the next server.
	cs.Close()
	if _, err := cs.Keys(); !errors.Is(err, ErrInvalidHandle) {
		t.Fatalf("after Close: %v", err)
	}
	again := newControlServer(t, ControlServerConfig{DBPath: db})
	if _, v, _ := again.Policy(); v != 2 {
		t.Fatalf("reopened: policy version %d", v)
	}
	// An invalid policy in the config names its line; nothing is opened.
	_, err = NewControlServer(ControlServerConfig{DBPath: db, Policy: "{\n\"acls\": 7}"})
	if !errors.Is(err, ErrControlPolicyInvalid) || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("bad config policy: %v", err)
	}
}

// One port serves the k3s tunnel (an agent connects) with the control
// server attached; attaching to a running server is refused.
func TestControlServerSharesTheTunnelPort(t *testing.T) {
	p := newTunnelPKI(t)
	cs := newControlServer(t, ControlServerConfig{})
	srv, url := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: p.serverCert, KeyPEM: p.serverKey,
		Tokens: map[string]string{tunToken: "edge1"}, Relay: true, Control: cs,
	})
	startTunnelAgent(t, TunnelAgentConfig{URL: url, CAPEM: p.ca, Token: tunToken})
	if err := srv.WaitSession(waitCtx(t), "edge1"); err != nil {
		t.Fatal(err)
	}
	// A second control server on the same tunnel server is refused.
	other := newControlServer(t, ControlServerConfig{})
	if err := other.attach(srv); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("attach to a running server: %v", err)
	}
	// Its own listener.
	own := newControlServer(t, ControlServerConfig{Addr: "127.0.0.1:0", CertPEM: p.serverCert, KeyPEM: p.serverKey})
	if addr, err := own.Addr(); err != nil || !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Fatalf("own listener: %q %v", addr, err)
	}
}

func meshvpnBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("MESHVPN_BIN")
	if bin == "" {
		bin, _ = filepath.Abs("../../target/release/meshvpn")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("no meshvpn binary at %s (cargo build --release -p meshvpn-cli, or MESHVPN_BIN)", bin)
	}
	if os.Geteuid() != 0 {
		t.Skip("meshvpn up needs root for its TUN device")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	return bin
}

// syncBuffer is a bytes.Buffer a child process writes while the test reads.
type syncBuffer struct {
	mu chan struct{}
	b  bytes.Buffer
}

func newSyncBuffer() *syncBuffer { return &syncBuffer{mu: make(chan struct{}, 1)} }
func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu <- struct{}{}
	defer func() { <-s.mu }()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string {
	s.mu <- struct{}{}
	defer func() { <-s.mu }()
	return s.b.String()
}

// eventually polls cond every 50 ms for up to d.
func eventually(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// A real node (`meshvpn up`, with a TUN of a unique name in this
// namespace) registers through a Go TunnelServer with the control server
// attached: it is listed with its routes (auto-approved by the policy, and
// pending until ApproveRoute), and once RemoveNode removes it, its
// `meshvpn up` ends and its key no longer works.
func TestControlServerNode(t *testing.T) {
	bin := meshvpnBin(t)
	p := newTunnelPKI(t)
	dir := t.TempDir()
	cs := newControlServer(t, ControlServerConfig{
		DBPath:     filepath.Join(dir, "control.db"),
		IPv4Prefix: "100.127.201.0/24", // out of the default 100.64.0.0/10 others use
		Policy:     testPolicy,
	})
	_, url := listenTunnelServer(t, TunnelServerConfig{
		Addr: "127.0.0.1:0", CertPEM: p.serverCert, KeyPEM: p.serverKey,
		Tokens: map[string]string{tunToken: "edge1"}, Relay: true, Control: cs,
	})
	ca := filepath.Join(dir, "ca.pem")
	keyFile := filepath.Join(dir, "join.key")
	key, err := cs.CreateKey(JoinKeyOptions{Tags: []string{"tag:gotest"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ca, p.ca, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, []byte(key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "node")
	ifname := fmt.Sprintf("mcgo%d", os.Getpid()%100000)
	up := func(out *syncBuffer, extra ...string) *exec.Cmd {
		args := append([]string{"up", "--control", url + "/v1-meshvpn/control", "--ca", ca,
			"--state-dir", state, "--interface", ifname, "--hostname", "gonode"}, extra...)
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = out, out
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	out := newSyncBuffer()
	node := up(out, "--join-key-file", keyFile, "--advertise-routes", "10.242.1.0/24,10.242.2.0/24")
	exited := make(chan error, 1)
	go func() { exited <- node.Wait() }()
	t.Cleanup(func() {
		if node.ProcessState == nil {
			node.Process.Kill()
			<-exited
		}
	})

	var me ControlNode
	if !eventually(20*time.Second, func() bool {
		nodes, _ := cs.Nodes()
		for _, n := range nodes {
			if n.Name == "gonode" && n.Online {
				me = n
				return true
			}
		}
		return false
	}) {
		t.Fatalf("the node is not listed online; meshvpn up said:\n%s", out.String())
	}
	if !strings.HasPrefix(me.IPv4, "100.127.201.") || me.Tags[0] != "tag:gotest" {
		t.Fatalf("node %+v", me)
	}
	route := func(prefix string) ControlRoute {
		routes, err := cs.Routes()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range routes {
			if r.Prefix == prefix && r.NodeID == me.ID {
				return r
			}
		}
		return ControlRoute{}
	}
	if r := route("10.242.1.0/24"); r.Status != "approved" || r.ApprovedBy == nil || *r.ApprovedBy != "policy" {
		t.Fatalf("auto-approved route: %+v", r)
	}
	if r := route("10.242.2.0/24"); r.Status != "pending" || r.Role != "" {
		t.Fatalf("route without an approver: %+v", r)
	}
	// The only router of its prefix: the server elects it primary.
	for deadline := time.Now().Add(5 * time.Second); route("10.242.1.0/24").Role != "primary"; {
		if time.Now().After(deadline) {
			t.Fatalf("auto-approved route never primary: %+v", route("10.242.1.0/24"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := cs.ApproveRoute("gonode", "10.242.2.0/24"); err != nil {
		t.Fatal(err)
	}
	if r := route("10.242.2.0/24"); r.Status != "approved" || *r.ApprovedBy != "operator" {
		t.Fatalf("approved route: %+v", r)
	}
	// The node hears of the approval (its status file).
	status := func() string {
		b, _ := exec.Command(bin, "up", "--status", "--state-dir", state).CombinedOutput()
		return string(b)
	}
	if !eventually(10*time.Second, func() bool { return strings.Contains(status(), "10.242.2.0/24 approved") }) {
		t.Fatalf("the node's status does not show the approval:\n%s", status())
	}

	// Removed through Go: the node is told and its meshvpn up ends.
	nodeFile := filepath.Join(state, "node.json")
	registration, err := os.ReadFile(nodeFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.RemoveNode(me.PublicKey); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out.String(), "removed") {
			t.Fatalf("meshvpn up ended with %v:\n%s", err, out.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("meshvpn up still runs 15 s after RemoveNode:\n%s", out.String())
	}
	if nodes, _ := cs.Nodes(); len(nodes) != 0 {
		t.Fatalf("still listed: %+v", nodes)
	}
	// Its WireGuard key no longer works: with its registration put back
	// (the node forgets it when told it was removed), the server refuses
	// the key's proof alone.
	if err := os.WriteFile(nodeFile, registration, 0o600); err != nil {
		t.Fatal(err)
	}
	again := newSyncBuffer()
	rejoin := up(again)
	done := make(chan error, 1)
	go func() { done <- rejoin.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || strings.Contains(again.String(), "has not joined") {
			t.Fatalf("rejoin after removal ended with %v:\n%s", err, again.String())
		}
		if !strings.Contains(again.String(), "not registered") {
			t.Fatalf("no refusal from the server:\n%s", again.String())
		}
		if _, err := os.Stat(nodeFile); !os.IsNotExist(err) {
			t.Fatalf("the server's refusal did not reach the node (node.json stays): %v", err)
		}
		t.Logf("rejoin refused: %s", strings.TrimSpace(again.String()))
	case <-time.After(15 * time.Second):
		rejoin.Process.Kill()
		<-done
		t.Fatalf("a removed node's key still works:\n%s", again.String())
	}
	if nodes, _ := cs.Nodes(); len(nodes) != 0 {
		t.Fatalf("the removed node registered again: %+v", nodes)
	}
}
