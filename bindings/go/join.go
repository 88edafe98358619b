package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static inline meshvpn_node *mv_node(uintptr_t h) { return (meshvpn_node *)h; }
// static inline meshvpn_interrupter *mv_join_interrupter(uintptr_t h) { return (meshvpn_interrupter *)h; }
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"runtime"
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
	events   chan NodeEvent
	done     chan struct{}
	once     sync.Once
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
		return newNode(r.h, cfg.Userspace)
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.err == nil {
				C.meshvpn_node_free(C.mv_node(C.uintptr_t(r.h)))
			}
		}()
		return nil, ctx.Err()
	}
}

func newNode(h uintptr, userspace bool) (*Node, error) {
	n := &Node{events: make(chan NodeEvent, 64), done: make(chan struct{})}
	n.h.set(h)
	runtime.SetFinalizer(n, func(n *Node) { _ = n.Close() })
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
	go n.pump()
	return n, nil
}

// pump moves the library's events to the Events channel; when nobody
// reads it, the oldest are dropped (the channel holds 64).
func (n *Node) pump() {
	defer close(n.events)
	for {
		select {
		case <-n.done:
			return
		default:
		}
		text, err := n.h.textOut("Node.Events", func(h C.uintptr_t, buf *C.char, sz C.size_t, got *C.size_t) C.meshvpn_result {
			return C.meshvpn_node_next_event(C.mv_node(h), 200, buf, sz, got)
		})
		if err != nil {
			if errors.Is(err, ErrTimeout) {
				continue
			}
			return
		}
		var ev NodeEvent
		if json.Unmarshal([]byte(text), &ev) != nil {
			continue
		}
		select {
		case n.events <- ev:
		default:
			select {
			case <-n.events:
			default:
			}
			n.events <- ev
		}
	}
}

// Events delivers the node's changes; closed after Close.
func (n *Node) Events() <-chan NodeEvent { return n.events }

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
// end. Idempotent.
func (n *Node) Close() error {
	n.once.Do(func() { close(n.done) })
	if n.netstack != nil {
		_ = n.netstack.Close()
	}
	if n.engine != nil {
		_ = n.engine.Close()
	}
	freed, err := n.h.release("Node.Close", func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_node_free(C.mv_node(h))
	})
	if freed {
		runtime.SetFinalizer(n, nil)
	}
	return err
}
