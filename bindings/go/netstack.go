package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_engine *mv_engine_ns(uintptr_t h) { return (meshvpn_engine *)h; }
// static inline meshvpn_netstack *mv_netstack(uintptr_t h) { return (meshvpn_netstack *)h; }
import "C"

import (
	"context"
	"errors"
	"math"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// NetstackOptions are the sizes and limits of a Netstack; zero fields
// take the library's defaults.
type NetstackOptions struct {
	MaxSockets     int           // sockets of every kind (default 1024)
	TCPRxBuffer    int           // receive buffer per TCP connection, bytes (default 256 KiB)
	TCPTxBuffer    int           // send buffer per TCP connection, bytes (default 256 KiB)
	UDPBuffer      int           // payload buffer per UDP socket and direction (default 64 KiB)
	RxQueuePackets int           // packets queued for the stack (default 4096)
	TCPTimeout     time.Duration // abort a silent connection (default 120 s; negative: never)
	CloseLinger    time.Duration // time for a closed connection's last bytes (default 30 s)
}

// Netstack is a userspace TCP/IP stack on an engine's mesh addresses (its
// Address= lines): Dial, Listen, ListenPacket and Ping over WireGuard with
// no TUN device and no root. Safe for concurrent use. Closing it, or the
// engine, closes every connection, listener and packet conn it made.
type Netstack struct {
	handle atomic.Uintptr // 0 once closed
}

// NewNetstack attaches a userspace stack to the engine. opts may be nil.
func (e *Engine) NewNetstack(opts *NetstackOptions) (*Netstack, error) {
	var o C.meshvpn_netstack_options
	if r := C.meshvpn_netstack_options_default(&o); r != C.MESHVPN_OK {
		return nil, Result(r)
	}
	if opts != nil {
		set := func(dst *C.uint32_t, v int) {
			if v > 0 {
				*dst = C.uint32_t(min(v, math.MaxUint32))
			}
		}
		set(&o.max_sockets, opts.MaxSockets)
		set(&o.tcp_rx_buffer, opts.TCPRxBuffer)
		set(&o.tcp_tx_buffer, opts.TCPTxBuffer)
		set(&o.udp_buffer, opts.UDPBuffer)
		set(&o.rx_queue_packets, opts.RxQueuePackets)
		if opts.TCPTimeout < 0 {
			o.tcp_timeout_ms = 0
		} else {
			set(&o.tcp_timeout_ms, int(opts.TCPTimeout/time.Millisecond))
		}
		set(&o.close_linger_ms, int(opts.CloseLinger/time.Millisecond))
	}
	var h C.uintptr_t
	err := e.do("Engine.NewNetstack", func(eh *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_netstack_new(eh, &o, (**C.meshvpn_netstack)(unsafe.Pointer(&h)))
	})
	if err != nil {
		return nil, err
	}
	ns := &Netstack{}
	ns.handle.Store(uintptr(h))
	runtime.SetFinalizer(ns, func(ns *Netstack) { _ = ns.Close() })
	return ns, nil
}

// Close stops the stack: blocked calls on its connections wake with an
// error matching net.ErrClosed. Idempotent.
func (ns *Netstack) Close() error {
	h := ns.handle.Swap(0)
	if h == 0 {
		return nil
	}
	runtime.SetFinalizer(ns, nil)
	return call("Netstack.Close", func() C.meshvpn_result {
		return C.meshvpn_netstack_free(C.mv_netstack(C.uintptr_t(h)))
	})
}

// do runs one C call on the stack's handle.
func (ns *Netstack) do(op string, f func(*C.meshvpn_netstack) C.meshvpn_result) error {
	h := ns.handle.Load()
	if h == 0 {
		return &Error{Op: op, Code: ErrClosed, Message: "the netstack is closed"}
	}
	err := call(op, func() C.meshvpn_result { return f(C.mv_netstack(C.uintptr_t(h))) })
	runtime.KeepAlive(ns)
	return err
}

// Ping sends one ICMP echo request to addr over the mesh and returns the
// round-trip time. ctx's deadline bounds the wait (5 s without one); a
// cancelled ctx returns at once.
func (ns *Netstack) Ping(ctx context.Context, addr netip.Addr) (time.Duration, error) {
	timeout := 5 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
		if timeout <= 0 {
			return 0, context.DeadlineExceeded
		}
	}
	ms := uint32(min(ceilMillis(timeout), math.MaxUint32))
	type result struct {
		rtt time.Duration
		err error
	}
	done := make(chan result, 1)
	go func() {
		var a arena
		defer a.free()
		s := a.str(addr.String())
		var us C.uint64_t
		err := ns.do("Netstack.Ping", func(h *C.meshvpn_netstack) C.meshvpn_result {
			return C.meshvpn_netstack_ping(h, s, C.uint32_t(ms), &us)
		})
		done <- result{time.Duration(us) * time.Microsecond, err}
	}()
	select {
	case r := <-done:
		return r.rtt, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func ceilMillis(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}

// deadline is one direction's deadline of a Conn or PacketConn.
type deadline struct {
	mu sync.Mutex
	t  time.Time
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	d.t = t
	d.mu.Unlock()
}

// timeoutMs is the C timeout until the deadline: -1 without one; expired
// once it passed.
func (d *deadline) timeoutMs() (ms int64, expired bool) {
	d.mu.Lock()
	t := d.t
	d.mu.Unlock()
	if t.IsZero() {
		return -1, false
	}
	left := time.Until(t)
	if left <= 0 {
		return 0, true
	}
	return ceilMillis(left), false
}

// socket is what Conn and PacketConn share: the handle, the deadlines,
// and the C call that wakes blocked calls when a deadline changes (a
// plain function, so that it holds no reference to its owner).
type socket struct {
	handle    atomic.Uintptr // 0 once closed
	rd, wd    deadline
	interrupt func(h uintptr)
}

func (s *socket) wake() {
	if h := s.handle.Load(); h != 0 {
		s.interrupt(h)
	}
	runtime.KeepAlive(s)
}

func (s *socket) SetDeadline(t time.Time) error {
	s.rd.set(t)
	s.wd.set(t)
	s.wake()
	return nil
}

func (s *socket) SetReadDeadline(t time.Time) error {
	s.rd.set(t)
	s.wake()
	return nil
}

func (s *socket) SetWriteDeadline(t time.Time) error {
	s.wd.set(t)
	s.wake()
	return nil
}

// retry runs attempt with the time left until d until it succeeds, fails,
// or d passes; an interrupt (a deadline set meanwhile) or a timeout makes
// it look at d again. Errors come back as netErr makes them.
func (s *socket) retry(d *deadline, attempt func(h uintptr, ms int64) error) error {
	for {
		h := s.handle.Load()
		if h == 0 {
			return net.ErrClosed
		}
		ms, expired := d.timeoutMs()
		if expired {
			return os.ErrDeadlineExceeded
		}
		err := attempt(h, ms)
		runtime.KeepAlive(s)
		if err == nil {
			return nil
		}
		if code, _ := codeOf(err); code == ErrInterrupted || (code == ErrTimeout && ms >= 0) {
			continue
		}
		return netErr(err)
	}
}

// netErr turns the codes the standard library has sentinels for into
// those sentinels (what net/http and friends test for).
func netErr(err error) error {
	switch code, _ := codeOf(err); code {
	case ErrTimeout:
		return os.ErrDeadlineExceeded
	case ErrClosed, ErrInvalidHandle:
		return net.ErrClosed
	}
	return err
}

// open checks network and address, then makes a listener or UDP socket
// with create, and returns its handle.
func (ns *Netstack) open(op, network, address, kind string, create func(*C.meshvpn_netstack, *C.char, *C.uintptr_t) C.meshvpn_result) (uintptr, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: network, Err: err}
	}
	if err := checkNetwork(network, kind); err != nil {
		return 0, opErr(err)
	}
	ap, err := parseAddrPort(network, address)
	if err != nil {
		return 0, opErr(err)
	}
	var a arena
	defer a.free()
	s := a.str(ap.String())
	var h C.uintptr_t
	if err := ns.do(op, func(nh *C.meshvpn_netstack) C.meshvpn_result { return create(nh, s, &h) }); err != nil {
		return 0, opErr(netErr(err))
	}
	return uintptr(h), nil
}

// addrFromC reads an address the library writes as text.
func addrFromC(get func(*C.char, C.size_t, *C.size_t) C.meshvpn_result) netip.AddrPort {
	var buf [C.MESHVPN_ADDR_MAX]C.char
	var n C.size_t
	if get(&buf[0], C.size_t(len(buf)), &n) != C.MESHVPN_OK {
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(C.GoStringN(&buf[0], C.int(n)))
	return ap
}

// parseAddrPort takes "ip:port" (names are not resolved: mesh addresses
// are IPs). An empty host means the unspecified address of family v6 or v4.
func parseAddrPort(network, address string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if host == "" {
		host = "0.0.0.0"
		if strings.HasSuffix(network, "6") {
			host = "::"
		}
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, errors.New("meshvpn: " + host + " is not an IP address (names are not resolved)")
	}
	p, err := net.LookupPort(strings.TrimRight(network, "46"), port)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(p)), nil
}

func checkNetwork(network string, kinds ...string) error {
	for _, k := range kinds {
		if network == k || network == k+"4" || network == k+"6" {
			return nil
		}
	}
	return net.UnknownNetworkError(network)
}
