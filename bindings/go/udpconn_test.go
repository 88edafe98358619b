package meshvpn

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestUDPConnEchoDeadlinesAndRefusal: a connected UDP socket (DialUDP and
// Dial("udp")) from a's stack to b's echo over real loopback UDP: it
// echoes, names its remote, ignores another source's datagrams, honours
// deadlines; once a's packet filter refuses the flow, a's engine answers
// the datagram with an ICMP admin-prohibited and the next Read fails
// with a refusal (errors.Is ErrConnectionRefused and
// syscall.ECONNREFUSED), long before its deadline, and only once.
func TestUDPConnEchoDeadlinesAndRefusal(t *testing.T) {
	a, b, na, nb := stacks(t)
	bAddr := func(port int) string { return netip.AddrPortFrom(b.addr, uint16(port)).String() }
	for _, port := range []string{":7", ":9"} {
		udpEcho(t, nb, port)
	}
	c, err := na.DialUDP("udp", bAddr(7))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != bAddr(7) {
		t.Fatalf("RemoteAddr %s", got)
	}
	// Connected, the socket shows the source address its datagrams carry
	// (this node's mesh address), as getsockname(2) does on Linux.
	local := c.LocalAddr().(*net.UDPAddr)
	if local.Port == 0 || local.AddrPort().Addr().Unmap() != a.addr {
		t.Fatalf("LocalAddr %v, want %v and a port", local, a.addr)
	}
	echo := func(c net.Conn, msg string) error {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 2048)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if string(buf[:n]) != msg {
			t.Fatalf("echo %q, got %q", msg, buf[:n])
		}
		return nil
	}
	if err := echo(c, "hello"); err != nil {
		t.Fatal(err)
	}

	// Another source's datagram to the connected socket's port is not
	// delivered, as with connect(2).
	other, err := nb.ListenPacket("udp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.WriteTo([]byte("stranger"), &net.UDPAddr{IP: a.addr.AsSlice(), Port: local.Port}); err != nil {
		t.Fatal(err)
	}
	if err := echo(c, "after the stranger"); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := c.Read(make([]byte, 64)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past its deadline (the stranger's datagram must not arrive): %v", err)
	}

	// A deadline set while Read blocks wakes it.
	c.SetReadDeadline(time.Time{})
	woke := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 64))
		woke <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the Read block in the library
	c.SetReadDeadline(time.Now())
	select {
	case err := <-woke:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("woken Read: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SetReadDeadline did not wake a blocked Read")
	}

	// Dial("udp") is the same connected socket.
	d, err := na.Dial("udp", bAddr(9))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, ok := d.(*UDPConn); !ok {
		t.Fatalf("Dial(udp) = %T", d)
	}
	if err := echo(d, "dialed"); err != nil {
		t.Fatal(err)
	}

	// a's filter admits only b's flows to a:5678: a new socket's datagram
	// to b:9 is refused and answered.
	if err := a.e.SetFilter("in from 10.77.0.2/32 to 10.77.0.1/32:5678 proto udp"); err != nil {
		t.Fatal(err)
	}
	r, err := na.DialUDP("udp", bAddr(9))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	start := time.Now()
	err = echo(r, "refused")
	took := time.Since(start)
	t.Logf("refused datagram: %v after %v", err, took)
	if !errors.Is(err, ErrConnectionRefused) || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("refused datagram: %v", err)
	}
	var op *net.OpError
	if !errors.As(err, &op) || op.Addr.String() != bAddr(9) {
		t.Fatalf("not a net.OpError naming the remote: %#v", err)
	}
	if took > 2*time.Second {
		t.Fatalf("the refusal took %v", took)
	}
	if s, _ := a.e.Stats(); s.FilterOutboundDenied == 0 {
		t.Fatalf("a's filter refused nothing: %+v", s)
	}
	// Reported once.
	r.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := r.Read(make([]byte, 64)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the refusal is reported once: %v", err)
	}
	if err := a.e.ClearFilter(); err != nil {
		t.Fatal(err)
	}
	if err := echo(r, "allowed again"); err != nil {
		t.Fatal(err)
	}

	// Closed: calls fail with net.ErrClosed, and so does a second Close.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := na.DialUDP("udp", "10.99.0.1:7"); !errors.Is(err, ErrUnreachable) || !errors.Is(err, syscall.EHOSTUNREACH) {
		t.Fatalf("DialUDP without a route: %v", err)
	}
	if _, err := na.DialUDP("tcp", bAddr(7)); err == nil {
		t.Fatal("DialUDP with network tcp")
	}
}
