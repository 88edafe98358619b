// Interop tests: libmeshvpn's tunnel (the meshvpn binary) against the real
// github.com/rancher/remotedialer at the revision k3s pins (f160aa32568d).
//
//	MESHVPN_BIN=/path/to/meshvpn go test ./...
package interop

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshvpn/libmeshvpn/bindings/go/interop/internal/rdtest"
)

const wait = 20 * time.Second

func meshvpnBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("MESHVPN_BIN")
	if bin == "" {
		t.Skip("MESHVPN_BIN is not set: build the CLI (cargo build --release -p meshvpn-cli) and set MESHVPN_BIN=target/release/meshvpn")
	}
	return bin
}

// logBuffer collects a process's stderr for assertions and failure output.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func startMeshvpn(t *testing.T, env []string, args ...string) *logBuffer {
	t.Helper()
	cmd := exec.Command(meshvpnBin(t), args...)
	logs := &logBuffer{}
	cmd.Stderr = logs
	cmd.Stdout = logs
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("meshvpn %s output:\n%s", args[1], logs.String())
		}
	})
	return logs
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func pkiDir(t *testing.T) (*rdtest.PKI, string) {
	t.Helper()
	p := rdtest.NewPKI()
	dir := t.TempDir()
	if err := p.WriteFiles(dir); err != nil {
		t.Fatal(err)
	}
	return p, dir
}

func okService(t *testing.T) string {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "ok from "+r.URL.Path)
	}))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

func echoService(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// startAgentAgainstGoServer runs a Go remotedialer server and a meshvpn agent
// authenticating with the node's client certificate.
func startAgentAgainstGoServer(t *testing.T, allow ...string) (*rdtest.Server, *logBuffer) {
	p, dir := pkiDir(t)
	srv, err := rdtest.StartServer("127.0.0.1:0", p, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	args := []string{"tunnel", "connect", "--url", "wss://" + srv.Addr + rdtest.Path,
		"--ca", filepath.Join(dir, "ca.pem"), "--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client.key")}
	for _, a := range allow {
		args = append(args, "--allow", a)
	}
	logs := startMeshvpn(t, []string{"RUST_LOG=meshvpn_engine=debug"}, args...)
	if !srv.WaitSession(rdtest.NodeCN, wait) {
		t.Fatalf("meshvpn agent never connected to the Go server")
	}
	return srv, logs
}

// (a) A Go remotedialer server dials through a libmeshvpn agent.
func TestGoServerDialsThroughMeshvpnAgent(t *testing.T) {
	t.Parallel()
	svc := okService(t)
	srv, _ := startAgentAgainstGoServer(t, "tcp/"+svc)
	code, body := get(t, srv.HTTPClient(rdtest.NodeCN, svc), "http://"+svc+"/kubelet")
	if code != 200 || body != "ok from /kubelet" {
		t.Fatalf("got %d %q", code, body)
	}
	// A target the agent does not allow fails that dial only; the session stays.
	resp, err := srv.HTTPClient(rdtest.NodeCN, "127.0.0.1:1").Get("http://x/")
	if err == nil {
		resp.Body.Close()
		t.Fatalf("refused target answered %d", resp.StatusCode)
	}
	if !srv.RD.HasSession(rdtest.NodeCN) {
		t.Fatal("refusing one connect dropped the session")
	}
	if code, _ := get(t, srv.HTTPClient(rdtest.NodeCN, svc), "http://"+svc+"/again"); code != 200 {
		t.Fatalf("after refusal: %d", code)
	}
	if n := srv.Sessions.Load(); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
}

// startServerWithGoClient runs `meshvpn tunnel serve` with a forward to
// target through the Go remotedialer client "edge1".
func startServerWithGoClient(t *testing.T, target string, connects *atomic.Int64) string {
	p, dir := pkiDir(t)
	tokens := filepath.Join(dir, "tokens")
	os.WriteFile(tokens, []byte("edge1 tok-123\n"), 0o600)
	listen, fwd := freeAddr(t), freeAddr(t)
	startMeshvpn(t, []string{"RUST_LOG=meshvpn_engine=debug"}, "tunnel", "serve", "--listen", listen,
		"--cert", filepath.Join(dir, "server.pem"), "--key", filepath.Join(dir, "server.key"),
		"--tokens", tokens, "--forward", fwd+"=edge1/tcp/"+target)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	allow := func(proto, address string) bool { return proto == "tcp" && address == target }
	go rdtest.RunClient(ctx, "wss://"+listen+rdtest.Path, p, "tok-123", allow, connects)
	deadline := time.Now().Add(wait)
	for connects.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("Go client never connected to meshvpn server")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fwd
}

// (b) A libmeshvpn server dials through a Go remotedialer client.
func TestMeshvpnServerDialsThroughGoClient(t *testing.T) {
	t.Parallel()
	svc := okService(t)
	var connects atomic.Int64
	fwd := startServerWithGoClient(t, svc, &connects)
	c := &http.Client{Timeout: wait, Transport: &http.Transport{DisableKeepAlives: true}}
	var code int
	var body string
	deadline := time.Now().Add(wait)
	for {
		// The forward listener is up before the session is registered; retry briefly.
		resp, err := c.Get("http://" + fwd + "/stream")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			code, body = resp.StatusCode, string(b)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET through meshvpn server: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code != 200 || body != "ok from /stream" {
		t.Fatalf("got %d %q", code, body)
	}
	for i := 0; i < 20; i++ {
		if code, _ := get(t, c, "http://"+fwd+"/n"); code != 200 {
			t.Fatalf("request %d: %d", i, code)
		}
	}
	if n := connects.Load(); n != 1 {
		t.Fatalf("Go client connected %d times, want 1", n)
	}
}

const bigSize = 50 << 20

func pattern(seed int64) io.Reader {
	return io.LimitReader(rand.New(rand.NewSource(seed)), bigSize)
}

func patternHash(seed int64) [32]byte {
	h := sha256.New()
	io.Copy(h, pattern(seed))
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// slowCopy hashes r, sleeping while the first 8 MiB arrive so the sender's
// side of the tunnel must pause.
func slowHash(r io.Reader) ([32]byte, int64, error) {
	h := sha256.New()
	buf := make([]byte, 32<<10)
	var n int64
	for {
		k, err := r.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if n < 8<<20 {
			time.Sleep(3 * time.Millisecond)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return [32]byte{}, n, err
		}
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out, n, nil
}

// (c) 50 MB each way through one stream with a slow reader: Pause/Resume
// both ways between the Go server and the libmeshvpn agent; hashes match.
func TestFiftyMegabytesSlowReader(t *testing.T) {
	t.Parallel()
	// Source: writes 50 MB then closes. Sink: reads slowly, reports the hash.
	source, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	go func() {
		for {
			c, err := source.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, pattern(1)); c.Close() }()
		}
	}()
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	type result struct {
		sum [32]byte
		n   int64
	}
	sinkDone := make(chan result, 1)
	go func() {
		c, err := sink.Accept()
		if err != nil {
			return
		}
		sum, n, _ := slowHash(c)
		c.Close()
		sinkDone <- result{sum, n}
	}()
	srv, logs := startAgentAgainstGoServer(t, "tcp/"+source.Addr().String(), "tcp/"+sink.Addr().String())
	dial := srv.RD.Dialer(rdtest.NodeCN)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Agent -> Go: the Go reader is slow, so Go pauses the agent.
	down, err := dial(ctx, "tcp", source.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sum, n, err := slowHash(down)
	down.Close()
	if err != nil || n != bigSize || sum != patternHash(1) {
		t.Fatalf("download: %d bytes, err %v, hash ok %v", n, err, sum == patternHash(1))
	}

	// Go -> agent: the target behind the agent is slow, so the agent pauses Go.
	up, err := dial(ctx, "tcp", sink.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(up, pattern(2)); err != nil {
		t.Fatal(err)
	}
	up.Close()
	select {
	case r := <-sinkDone:
		if r.n != bigSize || r.sum != patternHash(2) {
			t.Fatalf("upload: sink got %d bytes, hash ok %v", r.n, r.sum == patternHash(2))
		}
	case <-ctx.Done():
		t.Fatal("sink never finished")
	}
	out := logs.String()
	for _, want := range []string{"tunnel: peer sent Pause", "tunnel: peer sent Resume", "tunnel: sending Pause", "tunnel: sending Resume"} {
		if !strings.Contains(out, want) {
			t.Errorf("flow control not exercised: no %q in agent log", want)
		}
	}
}

// roundTrip writes msg and reads it back, failing after `wait`. It sets no
// deadline on c: a remotedialer connection closes itself when a write
// deadline passes, even long after the write finished.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		if _, err := c.Write([]byte(msg)); err != nil {
			done <- fmt.Errorf("write: %w", err)
			return
		}
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(c, back); err != nil || string(back) != msg {
			done <- fmt.Errorf("read %q, %v", back, err)
			return
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(wait):
		t.Fatalf("round trip of %q timed out", msg)
	}
}

// (d) Both pairings stay up across 70 s of silence (more than the 60 s read
// deadline): keepalive pings are sent and answered.
func TestIdleSeventySeconds(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("takes 70 s")
	}
	const idle = 70 * time.Second
	t.Run("go-server-meshvpn-agent", func(t *testing.T) {
		t.Parallel()
		echo := echoService(t)
		srv, _ := startAgentAgainstGoServer(t, "tcp/"+echo)
		c, err := srv.RD.Dialer(rdtest.NodeCN)(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		roundTrip(t, c, "before idle")
		time.Sleep(idle)
		roundTrip(t, c, "after idle")
		if n := srv.Sessions.Load(); n != 1 {
			t.Fatalf("agent reconnected: %d sessions", n)
		}
	})
	t.Run("meshvpn-server-go-client", func(t *testing.T) {
		t.Parallel()
		echo := echoService(t)
		var connects atomic.Int64
		fwd := startServerWithGoClient(t, echo, &connects)
		var c net.Conn
		var err error
		deadline := time.Now().Add(wait)
		for {
			c, err = net.Dial("tcp", fwd)
			if err == nil {
				c.SetDeadline(time.Now().Add(2 * time.Second))
				_, err = c.Write([]byte("x"))
				b := make([]byte, 1)
				if err == nil {
					_, err = io.ReadFull(c, b)
				}
				if err == nil {
					c.SetDeadline(time.Time{})
					break
				}
				c.Close()
			}
			if time.Now().After(deadline) {
				t.Fatalf("forward never worked: %v", err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		defer c.Close()
		roundTrip(t, c, "before idle")
		time.Sleep(idle)
		roundTrip(t, c, "after idle")
		if n := connects.Load(); n != 1 {
			t.Fatalf("Go client reconnected: %d sessions", n)
		}
	})
}

// (e) The Go server restarts: the old stream fails cleanly, the libmeshvpn
// agent reconnects, new dials work.
func TestReconnectAfterServerRestart(t *testing.T) {
	t.Parallel()
	echo := echoService(t)
	p, dir := pkiDir(t)
	srv, err := rdtest.StartServer("127.0.0.1:0", p, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := srv.Addr
	logs := startMeshvpn(t, nil, "tunnel", "connect", "--url", "wss://"+addr+rdtest.Path,
		"--ca", filepath.Join(dir, "ca.pem"), "--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client.key"),
		"--allow", "tcp/"+echo)
	if !srv.WaitSession(rdtest.NodeCN, wait) {
		t.Fatal("no session")
	}
	old, err := srv.RD.Dialer(rdtest.NodeCN)(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, old, "before restart")

	srv.Stop()
	old.SetDeadline(time.Now().Add(wait))
	if _, err := old.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "deadline") {
		t.Fatalf("old stream after server stop: %v (want a clean tunnel error, not a hang)", err)
	}

	srv2, err := rdtest.StartServer(addr, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Stop()
	if !srv2.WaitSession(rdtest.NodeCN, wait) {
		t.Fatalf("agent did not reconnect; log:\n%s", logs.String())
	}
	c, err := srv2.RD.Dialer(rdtest.NodeCN)(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "after restart")
	if !strings.Contains(logs.String(), "session ended") {
		t.Errorf("agent did not log the lost session")
	}
}

// The agent's log never contains the bearer token, even at trace level.
func TestTokenNotLogged(t *testing.T) {
	t.Parallel()
	p, dir := pkiDir(t)
	srv, err := rdtest.StartServer("127.0.0.1:0", p, map[string]string{"very-secret-token-42": "edge9"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("very-secret-token-42\n"), 0o600)
	logs := startMeshvpn(t, []string{"RUST_LOG=trace"}, "tunnel", "connect", "--url", "wss://"+srv.Addr+rdtest.Path,
		"--ca", filepath.Join(dir, "ca.pem"), "--token-file", tokenFile)
	if !srv.WaitSession("edge9", wait) {
		t.Fatal("no session with token auth")
	}
	time.Sleep(200 * time.Millisecond)
	sc := bufio.NewScanner(strings.NewReader(logs.String()))
	for sc.Scan() {
		if strings.Contains(sc.Text(), "very-secret-token-42") {
			t.Fatalf("token in log line: %s", sc.Text())
		}
	}
}
