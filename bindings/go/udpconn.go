package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_udp *mv_udp_c(uintptr_t h) { return (meshvpn_udp *)h; }
import "C"

import (
	"net"
	"runtime"
	"unsafe"
)

// UDPConn is a UDP socket on the mesh connected to one remote, as
// net.DialUDP makes: it implements net.Conn with working deadlines. It
// receives only the remote's datagrams, and an ICMP destination
// unreachable about one it sent (a closed port, or a packet filter's
// reject, such as the engine's own answer to a datagram its policy
// refuses) fails the next Read or Write once with an error matching
// ErrConnectionRefused and syscall.ECONNREFUSED (port unreachable,
// administratively prohibited) or ErrUnreachable and syscall.EHOSTUNREACH
// (net or host unreachable), as on Linux. Safe for concurrent use.
type UDPConn struct {
	socket
	local, remote *net.UDPAddr
}

var _ net.Conn = (*UDPConn)(nil)

// DialUDP connects a new UDP socket to address ("10.0.0.2:53",
// "[fd00::2]:53"; IPs only). The socket is bound to the unspecified
// address of the remote's family and a free port; LocalAddr reports the
// source address its datagrams carry (the stack's address of that family)
// and the port. Nothing is sent:
// an address no peer routes fails here, a refused one on Read or Write.
func (ns *Netstack) DialUDP(network, address string) (*UDPConn, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: network, Err: err}
	}
	if err := checkNetwork(network, "udp"); err != nil {
		return nil, opErr(err)
	}
	ap, err := parseAddrPort(network, address)
	if err != nil {
		return nil, opErr(err)
	}
	local := "0.0.0.0:0"
	if ap.Addr().Is6() {
		local = "[::]:0"
	}
	var a arena
	defer a.free()
	lp, rp := a.str(local), a.str(ap.String())
	var h C.uintptr_t
	if err := ns.do("Netstack.DialUDP", func(nh *C.meshvpn_netstack) C.meshvpn_result {
		return C.meshvpn_udp_bind(nh, lp, (**C.meshvpn_udp)(unsafe.Pointer(&h)))
	}); err != nil {
		return nil, opErr(netErr(err))
	}
	if err := call("Netstack.DialUDP", func() C.meshvpn_result {
		return C.meshvpn_udp_connect(C.mv_udp_c(h), rp)
	}); err != nil {
		C.meshvpn_udp_free(C.mv_udp_c(h))
		return nil, opErr(netErr(err))
	}
	c := &UDPConn{socket: socket{interrupt: interruptUDP, waitFds: udpWaitFds}, remote: net.UDPAddrFromAddrPort(ap)}
	c.h.set(uintptr(h))
	c.local = net.UDPAddrFromAddrPort(addrFromC(func(b *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_udp_local_addr(C.mv_udp_c(h), b, n, out)
	}))
	runtime.SetFinalizer(c, func(c *UDPConn) { _ = c.Close() })
	return c, nil
}

func (c *UDPConn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "udp", Source: c.local, Addr: c.remote, Err: netErr(err)}
}

// Read reads the next datagram from the remote (truncated to len(b)),
// waiting until the read deadline.
func (c *UDPConn) Read(b []byte) (int, error) {
	var n C.size_t
	err := c.retry("UDPConn.Read", &c.rd, func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result {
		return C.meshvpn_udp_recv(C.mv_udp_c(h), ptr(b), C.size_t(len(b)), ms, &n)
	})
	if err != nil {
		return 0, c.opErr("read", err)
	}
	return int(n), nil
}

// Write sends b as one datagram to the remote.
func (c *UDPConn) Write(b []byte) (int, error) {
	err := c.retry("UDPConn.Write", &c.wd, func(h C.uintptr_t, _ C.meshvpn_timeout_ms) C.meshvpn_result {
		return C.meshvpn_udp_send(C.mv_udp_c(h), ptr(b), C.size_t(len(b)))
	})
	if err != nil {
		return 0, c.opErr("write", err)
	}
	return len(b), nil
}

// Close closes the socket; blocked calls return an error matching
// net.ErrClosed, and so does a second Close.
func (c *UDPConn) Close() error {
	return c.closeSocket("UDPConn.Close", c, func(err error) error { return c.opErr("close", err) },
		func(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_udp_free(C.mv_udp_c(h)) })
}

func (c *UDPConn) LocalAddr() net.Addr  { return c.local }
func (c *UDPConn) RemoteAddr() net.Addr { return c.remote }
