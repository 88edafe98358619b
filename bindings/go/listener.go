package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_listener *mv_listener(uintptr_t h) { return (meshvpn_listener *)h; }
import "C"

import (
	"net"
	"runtime"
	"unsafe"
)

// DefaultBacklog is the number of connections a Listener keeps waiting
// to be accepted.
const DefaultBacklog = 128

// Listener is a TCP listener on the mesh; it implements net.Listener.
// Safe for concurrent use; Close wakes blocked Accept calls with an error
// matching net.ErrClosed.
type Listener struct {
	h    handle
	addr *net.TCPAddr
}

var _ net.Listener = (*Listener)(nil)

// Listen listens for TCP connections on address (":80" or "0.0.0.0:80"
// for every address of the stack, or one of its addresses; port 0 picks
// one). Listeners on different addresses share a port, as on Linux (a v4
// and a v6 listener, say); one on every address takes the port for all, and
// a clash fails with an error matching ErrAddressInUse.
func (ns *Netstack) Listen(network, address string) (net.Listener, error) {
	h, err := ns.open("Netstack.Listen", network, address, "tcp", func(nh *C.meshvpn_netstack, s *C.char, out *C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_listener_new(nh, s, DefaultBacklog, (**C.meshvpn_listener)(unsafe.Pointer(out)))
	})
	if err != nil {
		return nil, err
	}
	l := &Listener{}
	l.h.set(h)
	l.addr = net.TCPAddrFromAddrPort(addrFromC(func(b *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_listener_local_addr(C.mv_listener(C.uintptr_t(h)), b, n, out)
	}))
	runtime.SetFinalizer(l, func(l *Listener) { _ = l.Close() })
	return l, nil
}

func (l *Listener) opErr(err error) error {
	return &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: netErr(err)}
}

// Accept waits for the next connection.
func (l *Listener) Accept() (net.Conn, error) {
	var out C.uintptr_t
	err := l.h.do("Listener.Accept", func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_listener_accept(C.mv_listener(h), C.MESHVPN_WAIT_FOREVER, (**C.meshvpn_conn)(unsafe.Pointer(&out)))
	})
	if err != nil {
		return nil, l.opErr(err)
	}
	return newConn(uintptr(out)), nil
}

// Close stops listening; connections not yet accepted are reset.
func (l *Listener) Close() error {
	return l.h.closeSocket("Listener.Close", l, l.opErr,
		func(h C.uintptr_t) C.meshvpn_result { return C.meshvpn_listener_free(C.mv_listener(h)) })
}

func (l *Listener) Addr() net.Addr { return l.addr }
