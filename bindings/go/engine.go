package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <string.h>
// #include <meshvpn.h>
//
// // A handle is an integer the library issues, not a pointer to memory; Go
// // keeps it as a uintptr and turns it into the C type only for the call.
// static inline meshvpn_engine *mv_engine(uintptr_t h) { return (meshvpn_engine *)h; }
import "C"

import (
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

// Engine is a running WireGuard engine: a UDP socket, its peers, and the
// threads that encrypt and decrypt. All methods are safe for concurrent
// use, Close included: a method racing with Close fails with an error
// that matches net.ErrClosed.
type Engine struct {
	h handle
}

// New creates an engine from cfg and starts it.
func New(cfg Config) (*Engine, error) {
	var a arena
	defer a.free()
	c := a.config(&cfg)
	return newEngine("New", func(out **C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_new(c, out)
	})
}

// NewFromWgQuick creates an engine from the text of a wg-quick file
// ([Interface] and [Peer] sections; wg-quick-only keys such as DNS or
// PostUp are ignored) and starts it.
func NewFromWgQuick(text string) (*Engine, error) {
	var a arena
	defer a.free()
	t := a.str(text)
	return newEngine("NewFromWgQuick", func(out **C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_new_wg_quick(t, out)
	})
}

func newEngine(op string, create func(**C.meshvpn_engine) C.meshvpn_result) (*Engine, error) {
	h, err := newHandle(op, func(out unsafe.Pointer) C.meshvpn_result {
		return create((**C.meshvpn_engine)(out))
	})
	if err != nil {
		return nil, err
	}
	e := &Engine{}
	e.h.set(h)
	// A backstop only: an engine holds a socket and threads, so programs
	// should Close it.
	runtime.SetFinalizer(e, func(e *Engine) { _ = e.Close() })
	return e, nil
}

// Close stops the engine and releases it. It is idempotent: later calls
// return nil. Blocked ReadPackets calls return within about 20 ms with
// an error matching net.ErrClosed.
func (e *Engine) Close() error {
	return e.h.closeIdempotent("Engine.Close", e, func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_engine_free(C.mv_engine(h))
	})
}

// do runs one C call on the engine's handle.
func (e *Engine) do(op string, f func(*C.meshvpn_engine) C.meshvpn_result) error {
	return e.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(C.mv_engine(h)) })
}

// Start starts a stopped engine again with the configuration it had.
// Starting a running engine does nothing.
func (e *Engine) Start() error {
	return e.do("Engine.Start", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_start(h)
	})
}

// Stop stops the engine (threads end, the socket closes) but keeps it and
// its configuration for Start. Other methods fail with ErrEngineStopped
// meanwhile.
func (e *Engine) Stop() error {
	return e.do("Engine.Stop", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_stop(h)
	})
}

// Running reports whether the engine runs (false after Stop or Close).
func (e *Engine) Running() bool {
	var r C.bool
	err := e.do("Engine.Running", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_is_running(h, &r)
	})
	return err == nil && bool(r)
}

// PublicKey returns the engine's public key.
func (e *Engine) PublicKey() (Key, error) {
	var k C.meshvpn_key
	err := e.do("Engine.PublicKey", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_public_key(h, &k)
	})
	return fromC(&k), err
}

// SetPrivateKey replaces the engine's private key while it runs; sessions
// restart with the new key.
func (e *Engine) SetPrivateKey(k Key) error {
	var a arena
	defer a.free()
	ck := a.key(k)
	return e.do("Engine.SetPrivateKey", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_set_private_key(h, ck)
	})
}

// ListenPort returns the UDP port the engine listens on.
func (e *Engine) ListenPort() (uint16, error) {
	var p C.uint16_t
	err := e.do("Engine.ListenPort", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_listen_port(h, &p)
	})
	return uint16(p), err
}

// MTU returns the inner MTU: the largest packet ReadPackets delivers.
func (e *Engine) MTU() (int, error) {
	var m C.uint16_t
	err := e.do("Engine.MTU", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_mtu(h, &m)
	})
	return int(m), err
}

// AddPeer adds a peer or replaces an existing one's settings and
// AllowedIPs.
func (e *Engine) AddPeer(p PeerConfig) error {
	var a arena
	defer a.free()
	cp := (*C.meshvpn_peer_config)(a.alloc(int(unsafe.Sizeof(C.meshvpn_peer_config{}))))
	a.peer(cp, &p)
	return e.do("Engine.AddPeer", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_add_peer(h, cp)
	})
}

// UpdatePeer changes some settings of a peer.
func (e *Engine) UpdatePeer(u PeerUpdate) error {
	var a arena
	defer a.free()
	cu := a.update(&u)
	return e.do("Engine.UpdatePeer", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_update_peer(h, cu)
	})
}

// RemovePeer removes a peer; ErrNoSuchPeer if there is none.
func (e *Engine) RemovePeer(publicKey Key) error {
	k := publicKey.c()
	return e.do("Engine.RemovePeer", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_remove_peer(h, &k)
	})
}

// InitiateHandshake starts a handshake with a peer now.
func (e *Engine) InitiateHandshake(publicKey Key) error {
	k := publicKey.c()
	return e.do("Engine.InitiateHandshake", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_initiate_handshake(h, &k)
	})
}

// Peers returns the public keys of the peers, in the order they were added.
func (e *Engine) Peers() ([]Key, error) {
	for {
		var n C.size_t
		if err := e.do("Engine.Peers", func(h *C.meshvpn_engine) C.meshvpn_result {
			return C.meshvpn_engine_peer_keys(h, nil, 0, &n)
		}); err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, nil
		}
		keys := make([]C.meshvpn_key, n)
		var got C.size_t
		err := e.do("Engine.Peers", func(h *C.meshvpn_engine) C.meshvpn_result {
			return C.meshvpn_engine_peer_keys(h, &keys[0], n, &got)
		})
		if code, ok := codeOf(err); ok && code == ErrBufferTooSmall {
			continue // peers were added meanwhile
		}
		if err != nil {
			return nil, err
		}
		out := make([]Key, got)
		for i := range out {
			out[i] = fromC(&keys[i])
		}
		return out, nil
	}
}

// ConfigText returns the running configuration as wg-quick text. It
// contains the private key: treat it as a secret.
func (e *Engine) ConfigText() (string, error) {
	return e.textOut("Engine.ConfigText", func(h *C.meshvpn_engine, buf *C.char, n C.size_t, got *C.size_t) C.meshvpn_result {
		return C.meshvpn_engine_config_text(h, buf, n, got)
	})
}

// textOut reads text that fill writes with the buffer protocol (see
// handle.textOut).
func (e *Engine) textOut(op string, fill func(h *C.meshvpn_engine, buf *C.char, n C.size_t, got *C.size_t) C.meshvpn_result) (string, error) {
	return e.h.textOut(op, func(h C.uintptr_t, buf *C.char, n C.size_t, got *C.size_t) C.meshvpn_result {
		return fill(C.mv_engine(h), buf, n, got)
	})
}

// Stats are engine-wide counters of packets that never reached a peer.
// The fields are those of C's meshvpn_stats and Rust's EngineStats (a
// parity test in meshvpn-ffi checks that none is missing).
type Stats struct {
	RxMalformed       uint64 // datagrams that are not WireGuard messages
	RxUnknownIndex    uint64 // messages for a session index no peer has
	RxUnknownPeer     uint64 // initiations from keys that are not peers
	RxInvalidMAC      uint64 // handshake messages whose MAC1 failed
	CookieRepliesSent uint64 // cookie replies sent while under load
	TxMalformed       uint64 // packets from the host that are not IP
	TxNoRoute         uint64 // packets from the host no peer routes
	UDPSendErrors     uint64 // UDP sends that failed
	// UDPSendDropped counts the encrypted datagrams those failed sends
	// dropped (a batched run counts each of its datagrams).
	UDPSendDropped uint64
	// BufferLimitDrops counts packets dropped because the buffer ceiling
	// (SetBufferLimit) was reached; each also counts as DropSinkFull on
	// its peer.
	BufferLimitDrops uint64
	// FilterFlows is the number of flows the packet filter tracks now.
	FilterFlows uint64
	// Packets the packet filter dropped, per reason: not IP or a header
	// cut short; an IPv4 TCP fragment at offset 1; a flow no inbound rule
	// accepts; a reply-like packet with no tracked flow; a host packet no
	// outbound rule accepts; the tracking table full; the peer's share of
	// the table used up.
	FilterMalformed      uint64
	FilterFragment       uint64
	FilterNotAllowed     uint64
	FilterNoState        uint64
	FilterOutboundDenied uint64
	FilterTableFull      uint64
	FilterSourceShare    uint64
}

// Stats returns the engine-wide counters.
func (e *Engine) Stats() (Stats, error) {
	var s C.meshvpn_stats
	err := e.do("Engine.Stats", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_stats(h, &s)
	})
	return Stats{
		RxMalformed:          uint64(s.rx_malformed),
		RxUnknownIndex:       uint64(s.rx_unknown_index),
		RxUnknownPeer:        uint64(s.rx_unknown_peer),
		RxInvalidMAC:         uint64(s.rx_invalid_mac),
		CookieRepliesSent:    uint64(s.cookie_replies_sent),
		TxMalformed:          uint64(s.tx_malformed),
		TxNoRoute:            uint64(s.tx_no_route),
		UDPSendErrors:        uint64(s.udp_send_errors),
		UDPSendDropped:       uint64(s.udp_send_dropped),
		BufferLimitDrops:     uint64(s.buffer_limit_drops),
		FilterFlows:          uint64(s.filter_flows),
		FilterMalformed:      uint64(s.filter_malformed),
		FilterFragment:       uint64(s.filter_fragment),
		FilterNotAllowed:     uint64(s.filter_not_allowed),
		FilterNoState:        uint64(s.filter_no_state),
		FilterOutboundDenied: uint64(s.filter_outbound_denied),
		FilterTableFull:      uint64(s.filter_table_full),
		FilterSourceShare:    uint64(s.filter_source_share),
	}, err
}

// DefaultBufferLimit is the buffer ceiling a new engine starts with, in
// bytes (see SetBufferLimit).
const DefaultBufferLimit = C.MESHVPN_DEFAULT_BUFFER_LIMIT

// SetBufferLimit sets the ceiling on bytes of packets the engine holds in
// queues (packets waiting behind a handshake, decrypted packets waiting
// for ReadPackets). Past it new packets are dropped (SendPacket returns
// ErrPacketDropped) and counted in Stats.BufferLimitDrops and as
// DropSinkFull on their peer. A new engine starts at DefaultBufferLimit.
// A negative limit is ErrInvalidArgument.
func (e *Engine) SetBufferLimit(bytes int) error {
	if bytes < 0 {
		return &Error{Op: "Engine.SetBufferLimit", Code: ErrInvalidArgument, Message: "the buffer limit is negative"}
	}
	return e.do("Engine.SetBufferLimit", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_set_buffer_limit(h, C.size_t(bytes))
	})
}

// SetFilter installs the engine's packet filter from its text form, one
// rule per line:
//
//	in  from 100.64.0.2/32,10.43.0.0/16 to 100.64.0.1/32:22,10.42.1.0/24:8000-8099 proto tcp
//	out from 0.0.0.0/0,::/0 to 0.0.0.0/0,::/0
//
// "in" rules say which flows peers may start to this node, "out" rules
// which flows the host may start; replies to an allowed flow pass both
// ways. Ports are N, N-M or *; "proto" lists tcp, udp, icmp, icmpv6,
// numbers or * (default: those four); "icmp" lists the ICMP types that
// may start a flow (default: echo requests); # starts a comment. An empty
// text refuses every new flow; ClearFilter allows all again. New rules
// apply to the next packet; tracked flows go on. A rule that does not
// parse is ErrInvalidArgument naming its line. Refused packets are
// counted in Stats.Filter*; a refused send is ErrPacketDropped.
func (e *Engine) SetFilter(rules string) error {
	text := C.CString(rules)
	defer C.free(unsafe.Pointer(text))
	return e.do("Engine.SetFilter", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_set_filter(h, text)
	})
}

// ClearFilter removes the packet filter: everything passes (the default).
func (e *Engine) ClearFilter() error {
	return e.do("Engine.ClearFilter", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_set_filter(h, nil)
	})
}

// BufferLimit returns the engine's buffer ceiling in bytes (see
// SetBufferLimit).
func (e *Engine) BufferLimit() (int, error) {
	var n C.size_t
	err := e.do("Engine.BufferLimit", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_buffer_limit(h, &n)
	})
	return int(n), err
}

// DropReason indexes PeerStats.Drops. Its String is the reason's name in
// C (MESHVPN_DROP_ + upper case) and Rust (DropReason::name).
type DropReason int

// Why packets to or from a peer were dropped.
const (
	DropNoEndpoint        DropReason = C.MESHVPN_DROP_NO_ENDPOINT
	DropSourceNotAllowed  DropReason = C.MESHVPN_DROP_SOURCE_NOT_ALLOWED
	DropDecryptFailed     DropReason = C.MESHVPN_DROP_DECRYPT_FAILED
	DropReplay            DropReason = C.MESHVPN_DROP_REPLAY
	DropNoSession         DropReason = C.MESHVPN_DROP_NO_SESSION
	DropHandshakeFlood    DropReason = C.MESHVPN_DROP_HANDSHAKE_FLOOD
	DropHandshakeRejected DropReason = C.MESHVPN_DROP_HANDSHAKE_REJECTED
	DropInnerMalformed    DropReason = C.MESHVPN_DROP_INNER_MALFORMED
	DropSinkFull          DropReason = C.MESHVPN_DROP_SINK_FULL
	DropSessionExpired    DropReason = C.MESHVPN_DROP_SESSION_EXPIRED
	// DropOversized: a decrypted packet larger than the MTU, dropped whole.
	DropOversized DropReason = C.MESHVPN_DROP_OVERSIZED
)

// The names of the reasons this binding knows; a newer library may count
// more (they print as DropReason(N)).
var dropReasonNames = [...]string{
	DropNoEndpoint:        "no_endpoint",
	DropSourceNotAllowed:  "source_not_allowed",
	DropDecryptFailed:     "decrypt_failed",
	DropReplay:            "replay",
	DropNoSession:         "no_session",
	DropHandshakeFlood:    "handshake_flood",
	DropHandshakeRejected: "handshake_rejected",
	DropInnerMalformed:    "inner_malformed",
	DropSinkFull:          "sink_full",
	DropSessionExpired:    "session_expired",
	DropOversized:         "oversized",
}

func (r DropReason) String() string {
	if r >= 0 && int(r) < len(dropReasonNames) {
		return dropReasonNames[r]
	}
	return "DropReason(" + strconv.Itoa(int(r)) + ")"
}

// Drops counts a peer's dropped packets, indexed by DropReason
// (d[DropSinkFull]). A fixed array, so reading stats allocates nothing
// for it; it prints by name: {no_endpoint:0 source_not_allowed:2 ...}.
type Drops [C.MESHVPN_DROP_REASON_COUNT]uint64

// String lists every known reason by name, and any other slot that is
// not zero.
func (d Drops) String() string {
	var b strings.Builder
	b.WriteByte('{')
	for i, n := range d {
		if i >= len(dropReasonNames) && n == 0 {
			continue
		}
		if b.Len() > 1 {
			b.WriteByte(' ')
		}
		b.WriteString(DropReason(i).String())
		b.WriteByte(':')
		b.WriteString(strconv.FormatUint(n, 10))
	}
	b.WriteByte('}')
	return b.String()
}

// Total is the sum over all reasons.
func (d Drops) Total() uint64 {
	var t uint64
	for _, n := range d {
		t += n
	}
	return t
}

// PeerStats is a point-in-time view of one peer.
type PeerStats struct {
	PublicKey Key
	Endpoint  netip.AddrPort // zero when none is known
	// LastHandshake is the time of the last completed handshake; zero if
	// there was none.
	LastHandshake time.Time
	// HandshakeRTT is the round trip of the last handshake this side
	// initiated; -1 when none was measured.
	HandshakeRTT        time.Duration
	PersistentKeepalive uint16
	TxBytes, RxBytes    uint64 // encrypted bytes on the wire
	TxPackets           uint64 // inner packets sent to the peer
	RxPackets           uint64
	TxInnerBytes        uint64
	RxInnerBytes        uint64
	HandshakesInitiated uint64
	HandshakesReceived  uint64
	KeepalivesReceived  uint64
	Drops               Drops // by DropReason; prints by name
	// OnRelay reports whether the peer's datagrams go through the relay
	// now (Engine.StartRelay); Endpoint then reads [100::N]:0, a reserved
	// address standing for the relay.
	OnRelay bool
}

// PeerStats returns the counters of one peer; ErrNoSuchPeer if unknown.
func (e *Engine) PeerStats(publicKey Key) (PeerStats, error) {
	k := publicKey.c()
	var s C.meshvpn_peer_stats
	if err := e.do("Engine.PeerStats", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_peer_stats(h, &k, &s)
	}); err != nil {
		return PeerStats{}, err
	}
	out := PeerStats{
		PublicKey:           fromC(&s.public_key),
		HandshakeRTT:        -1,
		PersistentKeepalive: uint16(s.persistent_keepalive),
		TxBytes:             uint64(s.tx_bytes),
		RxBytes:             uint64(s.rx_bytes),
		TxPackets:           uint64(s.tx_packets),
		RxPackets:           uint64(s.rx_packets),
		TxInnerBytes:        uint64(s.tx_inner_bytes),
		RxInnerBytes:        uint64(s.rx_inner_bytes),
		HandshakesInitiated: uint64(s.handshakes_initiated),
		HandshakesReceived:  uint64(s.handshakes_received),
		KeepalivesReceived:  uint64(s.keepalives_received),
		OnRelay:             bool(s.on_relay),
	}
	out.Endpoint, _ = netip.ParseAddrPort(C.GoString(&s.endpoint[0]))
	if ms := uint64(s.last_handshake_unix_ms); ms != 0 {
		out.LastHandshake = time.UnixMilli(int64(ms))
	}
	if rtt := uint32(s.handshake_rtt_ms); rtt != C.MESHVPN_RTT_UNKNOWN {
		out.HandshakeRTT = time.Duration(rtt) * time.Millisecond
	}
	for i := range out.Drops {
		out.Drops[i] = uint64(s.drops[i])
	}
	return out, nil
}

func codeOf(err error) (Result, bool) {
	if e, ok := err.(*Error); ok {
		return e.Code, true
	}
	return 0, false
}
