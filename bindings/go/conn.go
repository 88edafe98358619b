package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_conn *mv_conn(uintptr_t h) { return (meshvpn_conn *)h; }
// static inline meshvpn_netstack *mv_netstack_c(uintptr_t h) { return (meshvpn_netstack *)h; }
import "C"

import (
	"context"
	"io"
	"net"
	"runtime"
	"time"
	"unsafe"
)

// Conn is a TCP connection over the mesh; it implements net.Conn with
// working deadlines. Safe for concurrent use: one goroutine may read
// while another writes and a third sets deadlines or closes.
type Conn struct {
	socket
	local, remote *net.TCPAddr
}

var _ net.Conn = (*Conn)(nil)

func interruptConn(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_conn_interrupt(C.mv_conn(h)) }

func connWaitFds(h C.uintptr_t, r, w *C.int32_t) C.meshvpn_result {
	return C.meshvpn_conn_wait_fds(C.mv_conn(h), r, w)
}

func newConn(h uintptr) *Conn {
	c := &Conn{socket: socket{interrupt: interruptConn, waitFds: connWaitFds}}
	c.h.set(h)
	ch := C.mv_conn(C.uintptr_t(h))
	c.local = net.TCPAddrFromAddrPort(addrFromC(func(b *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_conn_local_addr(ch, b, n, out)
	}))
	c.remote = net.TCPAddrFromAddrPort(addrFromC(func(b *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_conn_peer_addr(ch, b, n, out)
	}))
	runtime.SetFinalizer(c, func(c *Conn) { _ = c.Close() })
	return c
}

// Dial connects to address ("10.0.0.2:80") over the mesh.
func (ns *Netstack) Dial(network, address string) (net.Conn, error) {
	return ns.DialContext(context.Background(), network, address)
}

// DialContext connects to address ("10.0.0.2:80", "[fd00::2]:80"; IPs
// only) over the mesh. ctx's deadline bounds the handshake; cancelling
// ctx abandons it. Network "udp" (or "udp4", "udp6") returns a connected
// *UDPConn (see DialUDP), which sends nothing until written to.
func (ns *Netstack) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: network, Err: err}
	}
	if checkNetwork(network, "udp") == nil {
		if err := ctx.Err(); err != nil {
			return nil, opErr(err)
		}
		return ns.DialUDP(network, address)
	}
	if err := checkNetwork(network, "tcp"); err != nil {
		return nil, opErr(err)
	}
	ap, err := parseAddrPort(network, address)
	if err != nil {
		return nil, opErr(err)
	}
	if err := ctx.Err(); err != nil {
		return nil, opErr(err)
	}
	var h C.uintptr_t
	if err := ns.do("Netstack.Dial", func(nh *C.meshvpn_netstack) C.meshvpn_result {
		return C.meshvpn_conn_new(nh, (**C.meshvpn_conn)(unsafe.Pointer(&h)))
	}); err != nil {
		return nil, opErr(err)
	}
	ms := cTimeout(-1)
	if d, ok := ctx.Deadline(); ok {
		ms = cTimeout(max(time.Until(d), 0))
	}
	var a arena
	defer a.free()
	s := a.str(ap.String())
	// A cancelled ctx closes the conn, which wakes the dial.
	stop := context.AfterFunc(ctx, func() { C.meshvpn_conn_close(C.mv_conn(h)) })
	err = call("Netstack.Dial", func() C.meshvpn_result {
		return C.meshvpn_conn_dial(C.mv_conn(h), s, ms)
	})
	stopped := stop()
	if err == nil && stopped {
		return newConn(uintptr(h)), nil
	}
	C.meshvpn_conn_free(C.mv_conn(h))
	if ctx.Err() != nil {
		return nil, opErr(ctx.Err())
	}
	if code, _ := codeOf(err); code == ErrTimeout && ms != C.MESHVPN_WAIT_FOREVER {
		// The library's timer can fire just before ctx's own.
		return nil, opErr(context.DeadlineExceeded)
	}
	if err == nil {
		err = net.ErrClosed
	}
	return nil, opErr(err)
}

func (c *Conn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.local, Addr: c.remote, Err: netErr(err)}
}

// io runs a read or write (see socket.retry) and returns its count.
func (c *Conn) io(op string, d *deadline, f func(*C.meshvpn_conn, C.meshvpn_timeout_ms, *C.size_t) C.meshvpn_result) (int, error) {
	var n C.size_t
	err := c.retry("Conn."+op, d, func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result {
		return f(C.mv_conn(h), ms, &n)
	})
	if err != nil {
		return 0, c.opErr(op, err)
	}
	return int(n), nil
}

// Read reads what has arrived, waiting for at least one byte until the
// read deadline. io.EOF after the peer's FIN.
func (c *Conn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	n, err := c.io("read", &c.rd, func(h *C.meshvpn_conn, ms C.meshvpn_timeout_ms, n *C.size_t) C.meshvpn_result {
		return C.meshvpn_conn_read(h, ptr(b), C.size_t(len(b)), ms, n)
	})
	if err == nil && n == 0 {
		return 0, io.EOF
	}
	return n, err
}

// Write writes all of b unless the write deadline passes or the
// connection fails.
func (c *Conn) Write(b []byte) (int, error) {
	total := 0
	for total < len(b) {
		rest := b[total:]
		n, err := c.io("write", &c.wd, func(h *C.meshvpn_conn, ms C.meshvpn_timeout_ms, n *C.size_t) C.meshvpn_result {
			return C.meshvpn_conn_write(h, ptr(rest), C.size_t(len(rest)), ms, n)
		})
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// CloseWrite sends FIN after the bytes written; reading goes on.
func (c *Conn) CloseWrite() error {
	err := c.h.do("Conn.CloseWrite", func(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_conn_shutdown_write(C.mv_conn(h)) })
	if err != nil {
		return c.opErr("close", err)
	}
	return nil
}

// Close closes the connection; blocked Read and Write calls return an
// error matching net.ErrClosed. A second Close returns such an error too.
func (c *Conn) Close() error {
	return c.closeSocket("Conn.Close", c, func(err error) error { return c.opErr("close", err) },
		func(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_conn_free(C.mv_conn(h)) })
}

func (c *Conn) LocalAddr() net.Addr  { return c.local }
func (c *Conn) RemoteAddr() net.Addr { return c.remote }
