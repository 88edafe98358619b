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
	"os"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"
)

// PacketConn is a UDP socket on the mesh; it implements net.PacketConn
// with working deadlines. Safe for concurrent use.
type PacketConn struct {
	handle atomic.Uintptr // 0 once closed
	local  *net.UDPAddr
	rd, wd deadline
}

var _ net.PacketConn = (*PacketConn)(nil)

// ListenPacket binds a UDP socket on address (":53", "10.0.0.1:0").
func (ns *Netstack) ListenPacket(network, address string) (net.PacketConn, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: network, Err: err}
	}
	if err := checkNetwork(network, "udp"); err != nil {
		return nil, opErr(err)
	}
	ap, err := parseAddrPort(network, address)
	if err != nil {
		return nil, opErr(err)
	}
	var a arena
	defer a.free()
	s := a.str(ap.String())
	var h C.uintptr_t
	if err := ns.do("Netstack.ListenPacket", func(nh *C.meshvpn_netstack) C.meshvpn_result {
		return C.meshvpn_udp_bind(nh, s, (**C.meshvpn_udp)(unsafe.Pointer(&h)))
	}); err != nil {
		return nil, opErr(err)
	}
	p := &PacketConn{local: &net.UDPAddr{}}
	p.handle.Store(uintptr(h))
	var buf [C.MESHVPN_ADDR_MAX]C.char
	var n C.size_t
	if C.meshvpn_udp_local_addr(C.mv_udp(h), &buf[0], C.size_t(len(buf)), &n) == C.MESHVPN_OK {
		if ap, err := netip.ParseAddrPort(C.GoStringN(&buf[0], C.int(n))); err == nil {
			p.local = net.UDPAddrFromAddrPort(ap)
		}
	}
	runtime.SetFinalizer(p, func(p *PacketConn) { _ = p.Close() })
	return p, nil
}

func (p *PacketConn) opErr(op string, addr net.Addr, err error) error {
	if code, ok := codeOf(err); ok {
		switch code {
		case ErrTimeout:
			err = os.ErrDeadlineExceeded
		case ErrClosed, ErrInvalidHandle:
			err = net.ErrClosed
		}
	}
	return &net.OpError{Op: op, Net: "udp", Source: p.local, Addr: addr, Err: err}
}

// io runs one call until it succeeds, fails, or d passes.
func (p *PacketConn) io(op string, addr net.Addr, d *deadline, f func(*C.meshvpn_udp, C.int64_t) C.meshvpn_result) error {
	for {
		h := p.handle.Load()
		if h == 0 {
			return p.opErr(op, addr, net.ErrClosed)
		}
		ms, expired := d.timeoutMs()
		if expired {
			return p.opErr(op, addr, os.ErrDeadlineExceeded)
		}
		err := call("PacketConn."+op, func() C.meshvpn_result { return f(C.mv_udp(C.uintptr_t(h)), C.int64_t(ms)) })
		runtime.KeepAlive(p)
		if err == nil {
			return nil
		}
		if code, _ := codeOf(err); code == ErrInterrupted || (code == ErrTimeout && ms >= 0) {
			continue
		}
		return p.opErr(op, addr, err)
	}
}

// ReadFrom reads the next datagram (truncated to len(b)) and its sender.
func (p *PacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	var from [C.MESHVPN_ADDR_MAX]C.char
	var n C.size_t
	err := p.io("read", nil, &p.rd, func(h *C.meshvpn_udp, ms C.int64_t) C.meshvpn_result {
		var bp *C.uint8_t
		if len(b) > 0 {
			bp = (*C.uint8_t)(unsafe.Pointer(&b[0]))
		}
		return C.meshvpn_udp_recv_from(h, bp, C.size_t(len(b)), ms, &from[0], C.size_t(len(from)), &n)
	})
	if err != nil {
		return 0, nil, err
	}
	ap, perr := netip.ParseAddrPort(C.GoString(&from[0]))
	if perr != nil {
		return int(n), nil, p.opErr("read", nil, perr)
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
	err = p.io("write", addr, &p.wd, func(h *C.meshvpn_udp, _ C.int64_t) C.meshvpn_result {
		var bp *C.uint8_t
		if len(b) > 0 {
			bp = (*C.uint8_t)(unsafe.Pointer(&b[0]))
		}
		return C.meshvpn_udp_send_to(h, bp, C.size_t(len(b)), s)
	})
	if err != nil {
		return 0, err
	}
	return len(b), nil
}

// Close closes the socket; blocked calls return an error matching
// net.ErrClosed, and so does a second Close.
func (p *PacketConn) Close() error {
	h := p.handle.Swap(0)
	if h == 0 {
		return p.opErr("close", nil, net.ErrClosed)
	}
	runtime.SetFinalizer(p, nil)
	if err := call("PacketConn.Close", func() C.meshvpn_result { return C.meshvpn_udp_free(C.mv_udp(C.uintptr_t(h))) }); err != nil {
		return p.opErr("close", nil, err)
	}
	return nil
}

func (p *PacketConn) LocalAddr() net.Addr { return p.local }

func (p *PacketConn) interrupt() {
	if h := p.handle.Load(); h != 0 {
		C.meshvpn_udp_interrupt(C.mv_udp(C.uintptr_t(h)))
	}
	runtime.KeepAlive(p)
}

func (p *PacketConn) SetDeadline(t time.Time) error {
	p.rd.set(t)
	p.wd.set(t)
	p.interrupt()
	return nil
}

func (p *PacketConn) SetReadDeadline(t time.Time) error {
	p.rd.set(t)
	p.interrupt()
	return nil
}

func (p *PacketConn) SetWriteDeadline(t time.Time) error {
	p.wd.set(t)
	p.interrupt()
	return nil
}
