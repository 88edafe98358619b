package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_engine *mv_engine_ns(uintptr_t h) { return (meshvpn_engine *)h; }
// static inline meshvpn_netstack *mv_netstack(uintptr_t h) { return (meshvpn_netstack *)h; }
// static inline meshvpn_interrupter *mv_interrupter(uintptr_t h) { return (meshvpn_interrupter *)h; }
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
	h handle
	// pings counts Ping's C calls still running, so tests can tell that
	// a cancelled Ping left none behind.
	pings atomic.Int32
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
	ns.h.set(uintptr(h))
	runtime.SetFinalizer(ns, func(ns *Netstack) { _ = ns.Close() })
	return ns, nil
}

// Close stops the stack: blocked calls on its connections wake with an
// error matching net.ErrClosed. Idempotent.
func (ns *Netstack) Close() error {
	return ns.h.closeIdempotent("Netstack.Close", ns, func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_netstack_free(C.mv_netstack(h))
	})
}

// do runs one C call on the stack's handle.
func (ns *Netstack) do(op string, f func(*C.meshvpn_netstack) C.meshvpn_result) error {
	return ns.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(C.mv_netstack(h)) })
}

// Ping sends one ICMP echo request to addr over the mesh and returns the
// round-trip time. ctx's deadline bounds the wait (5 s without one);
// cancelling ctx ends the call in the library too (through a
// meshvpn_interrupter), so no ping is left running when Ping returns.
func (ns *Netstack) Ping(ctx context.Context, addr netip.Addr) (time.Duration, error) {
	timeout := cTimeout(5 * time.Second)
	if d, ok := ctx.Deadline(); ok {
		left := time.Until(d)
		if left <= 0 {
			return 0, context.DeadlineExceeded
		}
		timeout = cTimeout(left)
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	var cancel handle
	h, err := newHandle("Netstack.Ping", func(out unsafe.Pointer) C.meshvpn_result {
		return C.meshvpn_interrupter_new((**C.meshvpn_interrupter)(out))
	})
	if err != nil {
		return 0, err
	}
	cancel.set(h)
	// Freed after the ping returned; an interrupt racing with the free
	// meets a dead handle, which the library refuses harmlessly.
	defer cancel.release("Netstack.Ping", func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_interrupter_free(C.mv_interrupter(h))
	})
	stop := context.AfterFunc(ctx, func() {
		_ = cancel.do("Netstack.Ping", func(h C.uintptr_t) C.meshvpn_result {
			return C.meshvpn_interrupter_interrupt(C.mv_interrupter(h))
		})
	})
	defer stop()
	var a arena
	defer a.free()
	s := a.str(addr.String())
	var us C.uint64_t
	ns.pings.Add(1)
	err = ns.do("Netstack.Ping", func(nh *C.meshvpn_netstack) C.meshvpn_result {
		return C.meshvpn_netstack_ping(nh, s, timeout, C.mv_interrupter(C.uintptr_t(h)), &us)
	})
	ns.pings.Add(-1)
	if err != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		return 0, err
	}
	return time.Duration(us) * time.Microsecond, nil
}

// deadline is one direction's deadline of a Conn, PacketConn or tunnel
// connection, when a call in that direction last yielded to Go's
// scheduler (see yieldEvery), and the direction's wait descriptor.
type deadline struct {
	mu sync.Mutex
	t  time.Time
	// yielded is the last yield, as time since yieldEpoch.
	yielded atomic.Int64
	// file is the direction's wait descriptor (meshvpn_conn_wait_fds) in
	// Go's netpoller, with t as its read deadline; nil until the socket's
	// first call, and for sockets that block in the library instead.
	file atomic.Pointer[os.File]
}

// yieldEvery is how often each direction of a socket lets its goroutine
// pass through Go's scheduler (runtime.Gosched before the library call).
// A goroutine that lives in blocking cgo calls never does otherwise, and
// once its P has stayed on one scheduler tick for 10 ms (the runtime's
// forcePreemptNS) sysmon takes that P from the call at every look and
// keeps itself on 20 µs ticks. On a 2-CPU machine those wakeups preempted
// the library's own threads twice as often as in a Rust program making
// the same calls (engine/docs/performance.md). 8 ms stays under the limit
// with room for sysmon's tick; 2 ms cost more than it saved with many
// streams.
const yieldEvery = 8 * time.Millisecond

var yieldEpoch = time.Now()

// yieldDue reports whether a call in this direction yields first, now
// being the time since yieldEpoch, and if so records the yield.
func (d *deadline) yieldDue(now time.Duration) bool {
	last := d.yielded.Load()
	return int64(now)-last >= int64(yieldEvery) && d.yielded.CompareAndSwap(last, int64(now))
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	d.t = t
	if f := d.file.Load(); f != nil {
		_ = f.SetReadDeadline(t)
	}
	d.mu.Unlock()
}

// attach makes f the direction's wait descriptor, its deadline the
// direction's.
func (d *deadline) attach(f *os.File) {
	d.mu.Lock()
	_ = f.SetReadDeadline(d.t)
	d.file.Store(f)
	d.mu.Unlock()
}

// timeout is the C timeout until the deadline (forever without one);
// expired once it passed.
func (d *deadline) timeout() (ms C.meshvpn_timeout_ms, expired bool) {
	d.mu.Lock()
	t := d.t
	d.mu.Unlock()
	if t.IsZero() {
		return cTimeout(-1), false
	}
	left := time.Until(t)
	if left <= 0 {
		return 0, true
	}
	return cTimeout(left), false
}

// socket is what Conn, PacketConn and the tunnel connection share: the
// handle, the deadlines, the C call that wakes blocked calls when a
// deadline changes, and the one that makes the wait descriptors (plain
// functions, so that they hold no reference to their owner).
//
// Blocking calls wait in one of two ways. Up to blockingCalls at once
// block in the library with the time left as their timeout, and setting
// a deadline interrupts them so that they look again. The others, on a
// socket with wait descriptors (waitFds), call with timeout 0 and park
// their goroutine in Go's netpoller on the direction's descriptor until
// the library signals it, the deadline passes or the socket closes: a
// parked goroutine holds no thread and no P, so a program may leave any
// number of connections waiting. The tunnel connection has no
// descriptors, and neither has a socket whose descriptors could not be
// made; their calls always block in the library.
type socket struct {
	h         handle
	rd, wd    deadline
	interrupt func(h C.uintptr_t) C.meshvpn_result
	// waitFds writes the read and write wait descriptors (-1 for a
	// direction without one); nil for a socket without them.
	waitFds  func(h C.uintptr_t, r, w *C.int32_t) C.meshvpn_result
	waitOnce sync.Once
}

// openWaitFds makes the wait descriptors once; if the library cannot
// (no descriptors left), calls block in the library as without them.
func (s *socket) openWaitFds() {
	r, w := C.int32_t(-1), C.int32_t(-1)
	if s.h.do("wait descriptors", func(h C.uintptr_t) C.meshvpn_result { return s.waitFds(h, &r, &w) }) != nil {
		return
	}
	for _, p := range []struct {
		fd C.int32_t
		d  *deadline
	}{{r, &s.rd}, {w, &s.wd}} {
		if p.fd < 0 {
			continue
		}
		// Non-blocking, so os.NewFile registers it with the netpoller.
		if f := os.NewFile(uintptr(p.fd), "meshvpn-wait"); f != nil {
			p.d.attach(f)
		}
	}
}

// closeWaitFds closes the wait descriptors after the handle was freed;
// a goroutine still parked on one wakes with net.ErrClosed.
func (s *socket) closeWaitFds() {
	for _, d := range []*deadline{&s.rd, &s.wd} {
		if f := d.file.Swap(nil); f != nil {
			_ = f.Close()
		}
	}
}

// closeSocket is handle.closeSocket that also closes the wait descriptors.
func (s *socket) closeSocket(op string, owner any, wrap func(error) error, free func(C.uintptr_t) C.meshvpn_result) error {
	err := s.h.closeSocket(op, owner, wrap, free)
	if s.h.load() == 0 {
		s.closeWaitFds()
	}
	return err
}

func (s *socket) wake() {
	_ = s.h.do("SetDeadline", s.interrupt)
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

// retry runs f with the time left until d until it succeeds, fails, or d
// passes; an interrupt (a deadline set meanwhile) or a timeout makes it
// look at d again. Past blockingCalls, a direction with a wait descriptor
// goes to poll instead (see socket). Errors come back as netErr makes
// them.
func (s *socket) retry(op string, d *deadline, f func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result) error {
	if d.yieldDue(time.Since(yieldEpoch)) {
		runtime.Gosched()
	}
	if s.waitFds != nil {
		s.waitOnce.Do(s.openWaitFds)
		if file := d.file.Load(); file != nil {
			if inLibrary.Add(1) > int32(blockingCalls()) {
				inLibrary.Add(-1)
				return s.poll(op, file, f)
			}
			defer inLibrary.Add(-1)
		}
	}
	for {
		if s.h.load() == 0 {
			return net.ErrClosed
		}
		ms, expired := d.timeout()
		if expired {
			return os.ErrDeadlineExceeded
		}
		err := s.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(h, ms) })
		if err == nil {
			return nil
		}
		if code, _ := codeOf(err); code == ErrInterrupted || (code == ErrTimeout && ms != C.MESHVPN_WAIT_FOREVER) {
			continue
		}
		return netErr(err)
	}
}

// inLibrary counts the calls of sockets with wait descriptors that are
// blocking in the library now.
var inLibrary atomic.Int32

// blockingCalls is how many such calls may block in the library at once
// (one per P by default); the others park in the netpoller. A call
// blocked in the library is woken directly by the library's thread, the
// cheapest wakeup there is, so a few busy connections keep it; past one
// per P, a blocked call would hold a P that a woken goroutine needs, and
// past thousands, threads would run out.
func blockingCalls() int {
	if netpollOnly.Load() {
		return 0
	}
	return runtime.GOMAXPROCS(0)
}

// netpollOnly sends every call with a wait descriptor through the
// netpoller (tests set it; atomic, since calls of other goroutines read
// it meanwhile).
var netpollOnly atomic.Bool

// poll is retry for a direction with a wait descriptor: f with timeout 0,
// and between two calls that found nothing to do, the goroutine parked in
// the netpoller on file (whose read deadline is the direction's).
func (s *socket) poll(op string, file *os.File, f func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result) error {
	rc, err := file.SyscallConn()
	if err != nil {
		return net.ErrClosed
	}
	var callErr error
	err = rc.Read(func(uintptr) bool {
		callErr = s.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(h, 0) })
		code, _ := codeOf(callErr)
		// At timeout 0, a timeout or an interrupt means "nothing yet".
		return callErr == nil || (code != ErrTimeout && code != ErrInterrupted)
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return os.ErrDeadlineExceeded
	case err != nil:
		// The descriptor was closed: Close ran.
		return net.ErrClosed
	case callErr != nil:
		return netErr(callErr)
	}
	return nil
}

// netErr turns the codes the standard library has sentinels for into
// those sentinels (what net/http and friends test for).
func netErr(err error) error {
	switch code, _ := codeOf(err); code {
	case ErrTimeout:
		return os.ErrDeadlineExceeded
	case ErrClosed, ErrInvalidHandle, ErrTunnelClosed:
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
