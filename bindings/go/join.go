package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_node *mv_node(uintptr_t h) { return (meshvpn_node *)h; }
// static inline meshvpn_interrupter *mv_join_interrupter(uintptr_t h) { return (meshvpn_interrupter *)h; }
//
// extern void meshvpnGoNodeEvent(uintptr_t sink, char *json, size_t len);
//
// static void mv_node_event_trampoline(void *userdata, const char *json, size_t len) {
//     meshvpnGoNodeEvent((uintptr_t)userdata, (char *)json, len);
// }
//
// // sink is a cgo.Handle, passed to the library as the callback's
// // userdata (an integer it never dereferences); 0 clears the callback.
// static meshvpn_result mv_node_set_events(uintptr_t node, uintptr_t sink) {
//     return meshvpn_node_set_event_callback((meshvpn_node *)node,
//         sink ? mv_node_event_trampoline : NULL, (void *)sink);
// }
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"runtime"
	"runtime/cgo"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// Join-key refusals, each its own code (errors.Is works on them).
const (
	ErrJoinKeyInvalid Result = C.MESHVPN_JOIN_KEY_INVALID // malformed or unknown
	ErrJoinKeyExpired Result = C.MESHVPN_JOIN_KEY_EXPIRED
	ErrJoinKeyRevoked Result = C.MESHVPN_JOIN_KEY_REVOKED
	ErrJoinKeyReused  Result = C.MESHVPN_JOIN_KEY_REUSED // single-use, used by another node
	ErrJoinRefused    Result = C.MESHVPN_JOIN_REFUSED    // removed, tag not granted, ...
)

// JoinConfig says how to join a mesh run by a control server
// (`meshvpn control serve`).
type JoinConfig struct {
	ControlURL      string   // wss://host:port/v1-meshvpn/control (ws:// on a test network)
	JoinKey         string   // from `meshvpn control keys create`; empty to rejoin with PrivateKey
	PrivateKey      *Key     // the node's identity; nil: a new one
	Hostname        string   // default "node"
	AdvertiseRoutes []string // e.g. the node's pod CIDR
	Tags            []string // each granted by the join key
	AcceptRoutes    bool     // route the peers' approved routes through the mesh
	CAPEM           []byte   // the control server's CA; required for wss://
	EndpointIPs     []string // IPs to report as UDP endpoints (with the engine's port)
	ListenPort      uint16   // 0: any
	Userspace       bool     // attach a Netstack on the mesh addresses (no TUN, no root)
	EventBuffer     int      // capacity of the Events channel (see Node.Events); 0: 64
}

// NodeEvent is one change of a node: Type is joined, map_applied,
// policy_changed, route (Prefix, Status approved/pending/refused, Reason),
// disconnected, reconnected or stopped (the node left the mesh: Message).
type NodeEvent struct {
	Type          string  `json:"type"`
	Prefix        string  `json:"prefix,omitempty"`
	Status        string  `json:"status,omitempty"`
	Reason        *string `json:"reason,omitempty"`
	Version       uint64  `json:"version,omitempty"`
	PolicyVersion uint64  `json:"policy_version,omitempty"`
	Peers         int     `json:"peers,omitempty"`
	Message       string  `json:"message,omitempty"`
}

// NodeStatus is the node now (the library's JSON status).
type NodeStatus struct {
	Node *struct {
		ID   int64    `json:"id"`
		Name string   `json:"name"`
		IPv4 string   `json:"ipv4"`
		IPv6 string   `json:"ipv6"`
		Tags []string `json:"tags"`
	} `json:"node"`
	Connected     bool   `json:"connected"`
	Sessions      uint64 `json:"sessions"`
	PolicyVersion uint64 `json:"policy_version"`
	FilterRules   *int   `json:"filter_rules"`
	Routes        []struct {
		Prefix   string  `json:"prefix"`
		Approved bool    `json:"approved"`
		Status   string  `json:"status"`
		Role     string  `json:"role"` // approved: "primary" or "standby"
		Reason   *string `json:"reason"`
	} `json:"routes"`
	Peers []struct {
		ID         int64    `json:"id"`
		Name       string   `json:"name"`
		PublicKey  string   `json:"public_key"`
		AllowedIPs []string `json:"allowed_ips"`
		Endpoint   *string  `json:"endpoint"`
		TxBytes    uint64   `json:"tx_bytes"`
		RxBytes    uint64   `json:"rx_bytes"`
	} `json:"peers"`
	Stopped       *string `json:"stopped"`
	ListenPort    uint16  `json:"listen_port"`
	EventsDropped uint64  `json:"events_dropped"`
}

// Node is this program as a node of a mesh: its engine takes the map's
// peers and packet filter, and it stays in the mesh (reconnecting) until
// Close.
type Node struct {
	h        handle
	engine   *Engine
	netstack *Netstack
	sink     *eventSink
	handle   cgo.Handle // the sink, as the event callback's userdata
	closeMu  sync.Mutex // one Close at a time: a second waits for the first
}

// defaultEventBuffer is the Events channel's capacity when
// JoinConfig.EventBuffer is 0.
const defaultEventBuffer = 64

// eventSink is what the library's event callback feeds: the Events
// channel and its counters. The cgo.Handle refers to it and not to the
// Node, so an unclosed Node can still be collected (and its finalizer
// close it).
type eventSink struct {
	ch chan NodeEvent
	// dropped counts the events the callback took out of a full channel
	// to make room for a newer one.
	dropped atomic.Uint64
	// delivered counts the callback's calls (tests: proof that events
	// come by callback).
	delivered atomic.Uint64
	// closed is set once the node is freed, before ch is closed; late
	// counts callback calls that came after it (the library promises
	// none; tests check).
	closed atomic.Bool
	late   atomic.Uint64
}

// callbackPanics counts panics caught in the event callback (none are
// expected; a panic must never unwind into the library's thread).
var callbackPanics atomic.Uint64

// eventHook, when set (tests only), runs inside the callback before the
// event is queued: a slow callback that Close must wait for.
var eventHook atomic.Pointer[func(*eventSink)]

// deliverEvent is the event callback's body: it never blocks the
// library's event thread. When the channel is full the oldest event is
// dropped and counted (Node.EventsDropped), as the library does with its
// own queue; the newest state is the one worth keeping.
func deliverEvent(h uintptr, text []byte) {
	defer func() {
		if recover() != nil {
			callbackPanics.Add(1)
		}
	}()
	s, ok := cgo.Handle(h).Value().(*eventSink)
	if !ok {
		return
	}
	if s.closed.Load() {
		s.late.Add(1)
		return
	}
	s.delivered.Add(1)
	if hook := eventHook.Load(); hook != nil {
		(*hook)(s)
	}
	var ev NodeEvent
	if json.Unmarshal(text, &ev) != nil {
		return
	}
	// The callback is the channel's only sender and is never called
	// twice at once, so after taking one out there is room.
	select {
	case s.ch <- ev:
		return
	default:
	}
	select {
	case <-s.ch:
		s.dropped.Add(1)
	default:
	}
	select {
	case s.ch <- ev:
	default:
		s.dropped.Add(1)
	}
}

// joinsInFlight counts the meshvpn_join calls not yet returned (for tests).
var joinsInFlight atomic.Int64

// joinWait is how long Join waits for the registration when ctx has no
// deadline.
const joinWait = 30 * time.Second

// Join registers with the control server and returns the node once the
// server accepted it. A key refusal matches ErrJoinKeyExpired and its
// siblings. Cancelling ctx returns ctx.Err() at once and ends the join in
// the library too (through a meshvpn_interrupter): the C call returns
// within about 20 ms and closes what it started.
func Join(ctx context.Context, cfg JoinConfig) (*Node, error) {
	wait := joinWait
	if d, ok := ctx.Deadline(); ok {
		wait = time.Until(d)
		if wait <= 0 {
			return nil, context.DeadlineExceeded
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var cancel handle
	ih, err := newHandle("Join", func(out unsafe.Pointer) C.meshvpn_result {
		return C.meshvpn_interrupter_new((**C.meshvpn_interrupter)(out))
	})
	if err != nil {
		return nil, err
	}
	cancel.set(ih)
	stop := context.AfterFunc(ctx, func() {
		_ = cancel.do("Join", func(h C.uintptr_t) C.meshvpn_result {
			return C.meshvpn_interrupter_interrupt(C.mv_join_interrupter(h))
		})
	})
	var a arena
	str := func(s string) *C.char {
		if s == "" {
			return nil
		}
		return a.str(s)
	}
	var c C.meshvpn_join_config
	c.control_url = a.str(cfg.ControlURL)
	c.join_key = str(cfg.JoinKey)
	c.hostname = str(cfg.Hostname)
	c.advertise_routes = str(strings.Join(cfg.AdvertiseRoutes, ","))
	c.tags = str(strings.Join(cfg.Tags, ","))
	c.ca_pem = str(string(cfg.CAPEM))
	c.endpoint_ips = str(strings.Join(cfg.EndpointIPs, ","))
	c.listen_port = C.uint16_t(cfg.ListenPort)
	c.accept_routes = C.bool(cfg.AcceptRoutes)
	c.userspace = C.bool(cfg.Userspace)
	if cfg.PrivateKey != nil {
		c.private_key = a.key(*cfg.PrivateKey)
	}
	type result struct {
		h   uintptr
		err error
	}
	ch := make(chan result, 1)
	joinsInFlight.Add(1)
	go func() {
		defer a.free()
		h, err := newHandle("Join", func(out unsafe.Pointer) C.meshvpn_result {
			return C.meshvpn_join(&c, cTimeout(wait), C.mv_join_interrupter(C.uintptr_t(ih)), (**C.meshvpn_node)(out))
		})
		// The C call has ended: the token goes (an interrupt racing with
		// the free meets a dead handle, which the library refuses).
		stop()
		_, _ = cancel.release("Join", func(h C.uintptr_t) C.meshvpn_result {
			return C.meshvpn_interrupter_free(C.mv_join_interrupter(h))
		})
		joinsInFlight.Add(-1)
		ch <- result{h, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		return newNode(r.h, cfg.Userspace, cfg.EventBuffer)
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.err == nil {
				C.meshvpn_node_free(C.mv_node(C.uintptr_t(r.h)))
			}
		}()
		return nil, ctx.Err()
	}
}

func newNode(h uintptr, userspace bool, buffer int) (*Node, error) {
	if buffer <= 0 {
		buffer = defaultEventBuffer
	}
	n := &Node{sink: &eventSink{ch: make(chan NodeEvent, buffer)}}
	n.h.set(h)
	runtime.SetFinalizer(n, func(n *Node) { _ = n.Close() })
	// Events are pushed by the library's event thread: nothing polls.
	n.handle = cgo.NewHandle(n.sink)
	if err := n.h.do("Node.Events", func(h C.uintptr_t) C.meshvpn_result {
		return C.mv_node_set_events(h, C.uintptr_t(n.handle))
	}); err != nil {
		_ = n.Close()
		return nil, err
	}
	eh, err := newHandle("Node.Engine", func(out unsafe.Pointer) C.meshvpn_result {
		return C.meshvpn_node_engine(C.mv_node(C.uintptr_t(h)), (**C.meshvpn_engine)(out))
	})
	if err != nil {
		_ = n.Close()
		return nil, err
	}
	n.engine = &Engine{}
	n.engine.h.set(eh)
	if userspace {
		sh, err := newHandle("Node.Netstack", func(out unsafe.Pointer) C.meshvpn_result {
			return C.meshvpn_node_netstack(C.mv_node(C.uintptr_t(h)), (**C.meshvpn_netstack)(out))
		})
		if err != nil {
			_ = n.Close()
			return nil, err
		}
		n.netstack = &Netstack{}
		n.netstack.h.set(sh)
	}
	return n, nil
}

// Events delivers the node's changes, pushed by the library as they
// happen (no polling); closed by Close. The library calls into Go on its
// own event thread and never waits for the reader: when the channel
// (JoinConfig.EventBuffer, default 64) is full, the oldest event is
// dropped and counted in EventsDropped. Status().EventsDropped counts the
// events the library's own queue (256) dropped, which only happens if
// its thread cannot get into Go in time.
func (n *Node) Events() <-chan NodeEvent { return n.sink.ch }

// EventsDropped is the number of events dropped because the Events
// channel was full.
func (n *Node) EventsDropped() uint64 { return n.sink.dropped.Load() }

// Engine is the node's engine (peers, stats, packets). Close the Node, not
// the Engine.
func (n *Node) Engine() *Engine { return n.engine }

// Netstack is the node's userspace stack; nil unless joined with
// Userspace.
func (n *Node) Netstack() *Netstack { return n.netstack }

// Status is the node now.
func (n *Node) Status() (*NodeStatus, error) {
	text, err := n.h.textOut("Node.Status", func(h C.uintptr_t, buf *C.char, sz C.size_t, got *C.size_t) C.meshvpn_result {
		return C.meshvpn_node_status(C.mv_node(h), buf, sz, got)
	})
	if err != nil {
		return nil, err
	}
	var s NodeStatus
	if err := json.Unmarshal([]byte(text), &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// IPv4 is the node's mesh IPv4 address.
func (n *Node) IPv4() (netip.Addr, error) {
	s, err := n.Status()
	if err != nil {
		return netip.Addr{}, err
	}
	if s.Node == nil {
		return netip.Addr{}, errors.New("meshvpn: node not registered")
	}
	return netip.ParseAddr(s.Node.IPv4)
}

// Close leaves the mesh: the control session, the netstack and the engine
// end, the event callback is unregistered (the library waits for a
// running call), and Events is closed; no event is delivered after Close
// returns. Idempotent; a Close racing with another returns once the first
// is done.
func (n *Node) Close() error {
	n.closeMu.Lock()
	defer n.closeMu.Unlock()
	if n.netstack != nil {
		_ = n.netstack.Close()
	}
	if n.engine != nil {
		_ = n.engine.Close()
	}
	// meshvpn_node_free stops the event thread and waits for a running
	// callback: once it returns none runs, so the channel may close.
	freed, err := n.h.release("Node.Close", func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_node_free(C.mv_node(h))
	})
	if freed {
		n.sink.closed.Store(true)
		close(n.sink.ch)
		n.handle.Delete()
		runtime.SetFinalizer(n, nil)
	}
	return err
}
