package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_udp *mv_udp(uintptr_t h) { return (meshvpn_udp *)h; }
import "C"

import (
	"net"
	"net/netip"
	"runtime"
	"unsafe"
)

// PacketConn is a UDP socket on the mesh; it implements net.PacketConn
// with working deadlines. Safe for concurrent use.
type PacketConn struct {
	socket
	local *net.UDPAddr
}

var _ net.PacketConn = (*PacketConn)(nil)

func interruptUDP(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_udp_interrupt(C.mv_udp(h)) }

// udpWaitFds makes the read wait descriptor; sends do not wait.
func udpWaitFds(h C.uintptr_t, r, w *C.int32_t) C.meshvpn_result {
	*w = -1
	return C.meshvpn_udp_wait_fd(C.mv_udp(h), r)
}

// ListenPacket binds a UDP socket on address (":53", "10.0.0.1:0").
func (ns *Netstack) ListenPacket(network, address string) (net.PacketConn, error) {
	h, err := ns.open("Netstack.ListenPacket", network, address, "udp", func(nh *C.meshvpn_netstack, s *C.char, out *C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_udp_bind(nh, s, (**C.meshvpn_udp)(unsafe.Pointer(out)))
	})
	if err != nil {
		return nil, err
	}
	p := &PacketConn{socket: socket{interrupt: interruptUDP, waitFds: udpWaitFds}}
	p.h.set(h)
	p.local = net.UDPAddrFromAddrPort(addrFromC(func(b *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_udp_local_addr(C.mv_udp(C.uintptr_t(h)), b, n, out)
	}))
	runtime.SetFinalizer(p, func(p *PacketConn) { _ = p.Close() })
	return p, nil
}

func (p *PacketConn) opErr(op string, addr net.Addr, err error) error {
	return &net.OpError{Op: op, Net: "udp", Source: p.local, Addr: addr, Err: netErr(err)}
}

// ptr is b's first byte for C, or NULL when b is empty.
func ptr(b []byte) *C.uint8_t {
	if len(b) == 0 {
		return nil
	}
	return (*C.uint8_t)(unsafe.Pointer(&b[0]))
}

// ReadFrom reads the next datagram (truncated to len(b)) and its sender.
func (p *PacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	var from [C.MESHVPN_ADDR_MAX]C.char
	var n C.size_t
	err := p.retry("PacketConn.ReadFrom", &p.rd, func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result {
		return C.meshvpn_udp_recv_from(C.mv_udp(h), ptr(b), C.size_t(len(b)), ms, &from[0], C.size_t(len(from)), &n)
	})
	if err != nil {
		return 0, nil, p.opErr("read", nil, err)
	}
	ap, err := netip.ParseAddrPort(C.GoString(&from[0]))
	if err != nil {
		return int(n), nil, p.opErr("read", nil, err)
	}
	return int(n), net.UDPAddrFromAddrPort(ap), nil
}

// WriteTo sends b as one datagram to addr (a *net.UDPAddr or anything
// whose String() is "ip:port").
func (p *PacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return 0, p.opErr("write", addr, err)
	}
	var a arena
	defer a.free()
	s := a.str(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String())
	err = p.retry("PacketConn.WriteTo", &p.wd, func(h C.uintptr_t, _ C.meshvpn_timeout_ms) C.meshvpn_result {
		return C.meshvpn_udp_send_to(C.mv_udp(h), ptr(b), C.size_t(len(b)), s)
	})
	if err != nil {
		return 0, p.opErr("write", addr, err)
	}
	return len(b), nil
}

// Close closes the socket; blocked calls return an error matching
// net.ErrClosed, and so does a second Close.
func (p *PacketConn) Close() error {
	return p.closeSocket("PacketConn.Close", p, func(err error) error { return p.opErr("close", nil, err) },
		func(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_udp_free(C.mv_udp(h)) })
}

func (p *PacketConn) LocalAddr() net.Addr { return p.local }
