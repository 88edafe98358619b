package meshvpn

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// stacks returns two engines (see pair) with a userspace stack each.
func stacks(t testing.TB) (*node, *node, *Netstack, *Netstack) {
	t.Helper()
	a, b := pair(t)
	na, err := a.e.NewNetstack(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { na.Close() })
	nb, err := b.e.NewNetstack(&NetstackOptions{MaxSockets: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nb.Close() })
	return a, b, na, nb
}

// udpEcho answers every datagram to port on ns with itself until the test
// ends.
func udpEcho(t testing.TB, ns *Netstack, port string) {
	t.Helper()
	srv, err := ns.ListenPacket("udp", port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := srv.ReadFrom(buf)
			if err != nil {
				return
			}
			srv.WriteTo(buf[:n], from)
		}
	}()
}

func TestUAPIGetAndSet(t *testing.T) {
	a, b := pair(t)
	text, err := a.e.UAPIGet()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"private_key=" + a.key.Hex(),
		fmt.Sprintf("listen_port=%d", a.port),
		"public_key=" + b.key.PublicKey().Hex(),
		"allowed_ip=10.77.0.2/32",
	} {
		if !strings.Contains(text, want+"\n") {
			t.Fatalf("get reply lacks %q:\n%s", want, text)
		}
	}
	extra, _ := GenerateKey()
	err = a.e.UAPISet("set=1\npublic_key=" + extra.PublicKey().Hex() + "\nallowed_ip=10.77.0.9/32\npersistent_keepalive_interval=25\n\n")
	if err != nil {
		t.Fatal(err)
	}
	peers, _ := a.e.Peers()
	if len(peers) != 2 || peers[1] != extra.PublicKey() {
		t.Fatalf("peers after set: %v", peers)
	}
	err = a.e.UAPISet("public_key=" + extra.PublicKey().Hex() + "\nbogus_key=1\n")
	var ue *UAPIError
	if !errors.Is(err, ErrUAPIInvalid) || !errors.As(err, &ue) || ue.Errno != syscall.EINVAL || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("unknown key: %v", err)
	}
	err = a.e.UAPISet("not a line\n")
	if !errors.As(err, &ue) || ue.Errno != syscall.EPROTO {
		t.Fatalf("syntax error: %v", err)
	}
	a.e.Close()
	if _, err := a.e.UAPIGet(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("get after Close: %v", err)
	}
	if err := a.e.UAPISet("listen_port=0\n"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("set after Close: %v", err)
	}
}

// echoHandler answers GET with the path and POST with the SHA-256 of the body.
func echoHandler(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
		return
	}
	fmt.Fprintf(w, "hello %s from %s", r.URL.Path, r.RemoteAddr)
}

func TestHTTPOverTheMesh(t *testing.T) {
	a, b, na, nb := stacks(t)
	l, err := nb.Listen("tcp", ":8080")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(echoHandler), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	client := &http.Client{
		Transport: &http.Transport{DialContext: na.DialContext},
		Timeout:   20 * time.Second,
	}
	url := fmt.Sprintf("http://%s:8080", b.addr)
	for i := 0; i < 5; i++ {
		resp, err := client.Get(fmt.Sprintf("%s/x%d", url, i))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf("hello /x%d from %s:", i, a.addr); !strings.HasPrefix(string(body), want) {
			t.Fatalf("GET: %q, want prefix %q", body, want)
		}
	}
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	resp, err := client.Post(url+"/upload", "application/octet-stream", bytes.NewReader(payload))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := fmt.Sprintf("%d %x", len(payload), sha256.Sum256(payload)); string(body) != want {
		t.Fatalf("POST: %q, want %q", body, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
}

// connPair returns both ends of a connection from a to b.
func connPair(t testing.TB, na, nb *Netstack, addr netip.Addr) (net.Conn, net.Conn) {
	t.Helper()
	l, err := nb.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	c, err := na.Dial("tcp", netip.AddrPortFrom(addr, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.FailNow()
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

func TestDeadlines(t *testing.T) {
	_, b, na, nb := stacks(t)
	c, s := connPair(t, na, nb, b.addr)
	if c.LocalAddr().String() != s.RemoteAddr().String() || c.RemoteAddr().String() != s.LocalAddr().String() {
		t.Fatalf("addresses: %v->%v vs %v<-%v", c.LocalAddr(), c.RemoteAddr(), s.RemoteAddr(), s.LocalAddr())
	}
	// A read deadline in the near future.
	c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	start := time.Now()
	_, err := c.Read(make([]byte, 10))
	if !errors.Is(err, os.ErrDeadlineExceeded) || !err.(net.Error).Timeout() {
		t.Fatalf("read past deadline: %v", err)
	}
	if el := time.Since(start); el < 90*time.Millisecond {
		t.Fatalf("read returned after %v, before its deadline", el)
	}
	// A deadline in the past set while a read blocks wakes it (what
	// net/http does to abort a background read).
	c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	c.SetReadDeadline(time.Unix(1, 0))
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("aborted read: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("moving the deadline did not wake the read")
	}
	// Extending the deadline while a read blocks keeps it waiting for data.
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	got := make(chan string, 1)
	go func() {
		buf := make([]byte, 10)
		n, err := c.Read(buf)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(buf[:n])
	}()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	time.Sleep(200 * time.Millisecond)
	if _, err := s.Write([]byte("late")); err != nil {
		t.Fatal(err)
	}
	if g := <-got; g != "late" {
		t.Fatalf("read after extended deadline: %q", g)
	}
	// A write deadline when the peer does not read: the buffers fill.
	c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	chunk := make([]byte, 1<<16)
	var werr error
	for i := 0; i < 1000 && werr == nil; i++ {
		_, werr = c.Write(chunk)
	}
	if !errors.Is(werr, os.ErrDeadlineExceeded) {
		t.Fatalf("write past deadline: %v", werr)
	}
}

func TestCloseWhileBlockedAndUseAfterClose(t *testing.T) {
	_, b, na, nb := stacks(t)
	c, _ := connPair(t, na, nb, b.addr)
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("blocked read after Close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Close: %v", err)
	}

	l, err := nb.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, err := l.Accept()
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	l.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("blocked accept after Close: %v", err)
	}
	if err := l.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second listener Close: %v", err)
	}

	p, err := nb.ListenPacket("udp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _, err := p.ReadFrom(make([]byte, 10))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	p.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("blocked ReadFrom after Close: %v", err)
	}

	// Closing the stack wakes a blocked read on one of its connections,
	// and later calls fail the same way.
	c2, _ := connPair(t, na, nb, b.addr)
	go func() {
		_, err := c2.Read(make([]byte, 10))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	na.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after the stack closed: %v", err)
	}
	if _, err := na.Dial("tcp", b.addr.String()+":80"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("dial on a closed stack: %v", err)
	}
	if err := na.Close(); err != nil {
		t.Fatalf("second netstack Close: %v", err)
	}
}

func TestDialErrors(t *testing.T) {
	a, b, na, _ := stacks(t)
	if _, err := na.Dial("tcp", b.addr.String()+":81"); !errors.Is(err, ErrConnectionRefused) {
		t.Fatalf("nothing listens: %v", err)
	}
	if _, err := na.Dial("tcp", "10.99.0.1:80"); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("no route: %v", err)
	}
	if _, err := na.Dial("ip4", b.addr.String()+":80"); err == nil {
		t.Fatal("Dial(ip4) succeeded")
	}
	if _, err := na.Dial("tcp", "example.com:80"); err == nil {
		t.Fatal("a name was dialed")
	}
	// A peer whose endpoint drops everything: the SYN goes unanswered.
	silent, _ := GenerateKey()
	if err := a.e.AddPeer(PeerConfig{
		PublicKey:  silent.PublicKey(),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.77.0.3/32")},
		Endpoint:   "127.0.0.1:9",
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := na.DialContext(ctx, "tcp", "10.77.0.3:80"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial past the ctx deadline: %v", err)
	}
	ctx2, cancel2 := context.WithCancel(context.Background())
	go func() { time.Sleep(100 * time.Millisecond); cancel2() }()
	if _, err := na.DialContext(ctx2, "tcp", "10.77.0.3:80"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled dial: %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("dials took %v", el)
	}
}

func TestUDPEchoAndPing(t *testing.T) {
	a, b, na, nb := stacks(t)
	udpEcho(t, nb, ":7")
	cl, err := na.ListenPacket("udp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	dst := &net.UDPAddr{IP: b.addr.AsSlice(), Port: 7}
	for _, size := range []int{0, 1, 500, 1392} {
		msg := bytes.Repeat([]byte{byte(size)}, size)
		if _, err := cl.WriteTo(msg, dst); err != nil {
			t.Fatal(err)
		}
		cl.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 2048)
		n, from, err := cl.ReadFrom(buf)
		if err != nil || !bytes.Equal(buf[:n], msg) || from.String() != dst.String() {
			t.Fatalf("echo of %d bytes: %d from %v, %v", size, n, from, err)
		}
	}
	if _, err := cl.WriteTo(make([]byte, 1393), dst); !errors.Is(err, ErrMessageTooLarge) {
		t.Fatalf("oversized datagram: %v", err)
	}
	cl.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, _, err := cl.ReadFrom(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadFrom past deadline: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, pair := range []struct {
		ns *Netstack
		to netip.Addr
	}{{na, b.addr}, {nb, a.addr}} {
		rtt, err := pair.ns.Ping(ctx, pair.to)
		if err != nil || rtt <= 0 || rtt > 5*time.Second {
			t.Fatalf("ping %v: %v %v", pair.to, rtt, err)
		}
	}
	if _, err := na.Ping(ctx, netip.MustParseAddr("10.99.0.1")); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("ping without a route: %v", err)
	}
}

func TestEngineCloseWakesNetstackCalls(t *testing.T) {
	a, b, na, nb := stacks(t)
	c, _ := connPair(t, na, nb, b.addr)
	var wg sync.WaitGroup
	wg.Add(1)
	var rerr error
	go func() {
		defer wg.Done()
		_, rerr = c.Read(make([]byte, 10))
	}()
	time.Sleep(50 * time.Millisecond)
	a.e.Close()
	wg.Wait()
	if !errors.Is(rerr, net.ErrClosed) {
		t.Fatalf("read after the engine closed: %v", rerr)
	}
}

// BenchmarkCopy measures io.Copy throughput over a net.Conn between two
// engines on loopback (userspace TCP, WireGuard, real UDP sockets).
func BenchmarkCopy(b *testing.B) {
	_, nb, sa, sb := stacks(b)
	c, s := connPair(b, sa, sb, nb.addr)
	const chunk = 1 << 20
	src := bytes.Repeat([]byte{0xa5}, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	done := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, s)
		done <- n
	}()
	for i := 0; i < b.N; i++ {
		if _, err := io.Copy(c, bytes.NewReader(src)); err != nil {
			b.Fatal(err)
		}
	}
	c.(*Conn).CloseWrite()
	if n := <-done; n != int64(b.N)*chunk {
		b.Fatalf("received %d bytes, sent %d", n, int64(b.N)*chunk)
	}
}

func TestSetDeadlineWakesABlockedReadAndWriteTogether(t *testing.T) {
	_, b, na, nb := stacks(t)
	c, _ := connPair(t, na, nb, b.addr)
	errs := make(chan error, 2)
	go func() {
		_, err := c.Read(make([]byte, 10))
		errs <- err
	}()
	go func() {
		// The peer never reads: this blocks once both buffers are full.
		chunk := make([]byte, 1<<16)
		for i := 0; i < 1000; i++ {
			if _, err := c.Write(chunk); err != nil {
				errs <- err
				return
			}
		}
		errs <- errors.New("1000 writes of 64 KiB did not block")
	}()
	time.Sleep(300 * time.Millisecond)
	c.SetDeadline(time.Unix(1, 0))
	for i := 0; i < 2; i++ {
		select {
		case err := <-errs:
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("blocked call after SetDeadline: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("SetDeadline did not wake both blocked calls")
		}
	}
}

// A Ping whose ctx is cancelled returns promptly and leaves no C call
// behind: the address is routed (b's AllowedIPs) but b has no stack, so
// nothing ever answers and only the cancel can end the call.
func TestPingCancelEndsTheCCall(t *testing.T) {
	a, b := pair(t)
	na, err := a.e.NewNetstack(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer na.Close()
	for i := 0; i < 3; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		timer := time.AfterFunc(50*time.Millisecond, cancel)
		start := time.Now()
		_, err := na.Ping(ctx, b.addr)
		took := time.Since(start)
		timer.Stop()
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("ping %d: %v, want context.Canceled", i, err)
		}
		// Well under the 5 s the C call would run without a cancel.
		if took > 2*time.Second {
			t.Fatalf("ping %d returned %v after its cancel", i, took)
		}
		if n := na.pings.Load(); n != 0 {
			t.Fatalf("ping %d: %d C ping call(s) still running after Ping returned", i, n)
		}
	}
	// Closing the stack does not wait for anything left behind.
	done := make(chan error, 1)
	go func() { done <- na.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Netstack.Close blocked")
	}
}

// A direction's calls yield to Go's scheduler at most every yieldEvery,
// and Read and Write do consult it (see yieldEvery for why).
func TestBlockingCallsYieldToTheScheduler(t *testing.T) {
	var d deadline
	for _, step := range []struct {
		at   time.Duration
		want bool
	}{
		{yieldEvery, true},
		{yieldEvery + time.Millisecond, false},
		{2*yieldEvery - time.Nanosecond, false},
		{2 * yieldEvery, true},
		{10 * yieldEvery, true},
		{10*yieldEvery + 1, false},
	} {
		if got := d.yieldDue(step.at); got != step.want {
			t.Fatalf("yieldDue(%v) = %v, want %v", step.at, got, step.want)
		}
	}

	_, b, na, nb := stacks(t)
	c, s := connPair(t, na, nb, b.addr)
	cc, sc := c.(*Conn), s.(*Conn)
	long := -int64(time.Hour)
	cc.wd.yielded.Store(long)
	sc.rd.yielded.Store(long)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if cc.wd.yielded.Load() == long || sc.rd.yielded.Load() == long {
		t.Fatalf("a Write and a Read made no yield: write %d, read %d", cc.wd.yielded.Load(), sc.rd.yielded.Load())
	}
}
