package meshvpn

// #include <stdbool.h>
// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// static meshvpn_control_server *mv_control(uintptr_t h) { return (meshvpn_control_server *)h; }
// static meshvpn_tunnel_server *mv_control_tunnel(uintptr_t h) { return (meshvpn_tunnel_server *)h; }
import "C"

import (
	"encoding/json"
	"runtime"
	"time"
	"unsafe"
)

// The control server's result codes (620-629).
const (
	// ErrControlStore: the control database cannot be opened, read or
	// written.
	ErrControlStore Result = C.MESHVPN_CONTROL_STORE
	// ErrControlPolicyInvalid: a policy that does not load; the error's
	// message names the line and column. Nothing was stored.
	ErrControlPolicyInvalid Result = C.MESHVPN_CONTROL_POLICY_INVALID
	// ErrControlNotFound: no such node or join key.
	ErrControlNotFound Result = C.MESHVPN_CONTROL_NOT_FOUND
	// ErrControlRouteRefused: the node does not advertise the route, or it
	// overlaps an approved route of another cluster (named in the message).
	ErrControlRouteRefused Result = C.MESHVPN_CONTROL_ROUTE_REFUSED
)

// ControlServerConfig says where a ControlServer keeps its state and how
// it serves nodes.
type ControlServerConfig struct {
	// DBPath is the database file (SQLite), created 0600 when missing.
	// Required. `meshvpn control keys|nodes|routes|policy --db DBPath`
	// works on it while the server runs.
	DBPath string
	// IPv4Prefix is where new nodes get their IPv4 address; empty means
	// 100.64.0.0/10.
	IPv4Prefix string
	// Policy (JSON: tagOwners, acls, autoApprovers; see docs/control.md) is
	// set at creation when it differs from the stored one; empty keeps the
	// stored policy (none: allow-all). PolicyFile reads it from a file.
	Policy, PolicyFile string
	// EphemeralTimeout: how long an ephemeral node stays after it
	// disconnects; 0 means 30 minutes.
	EphemeralTimeout time.Duration
	// MaxSessions and MaxSessionsPerSource cap control sessions (one per
	// node); 0 means 4096 and 64. More are answered 503.
	MaxSessions, MaxSessionsPerSource uint32
	// RelayURL is the relay nodes may use (wss://HOST:PORT/v1-meshvpn/relay),
	// sent in every network map; empty: none.
	RelayURL string
	// Addr, when set, gives the server an HTTPS listener of its own
	// ("127.0.0.1:0"), with CertPEM and KeyPEM, also relaying with Relay.
	// Without it, serve it on a TunnelServer: TunnelServerConfig.Control.
	Addr            string
	CertPEM, KeyPEM []byte
	Relay           bool
}

// JoinKeyOptions are what CreateKey makes.
type JoinKeyOptions struct {
	Reusable  bool          // usable by any number of nodes; otherwise single-use
	Ephemeral bool          // its nodes are removed after the ephemeral timeout once offline
	Expiry    time.Duration // 0: never expires (rounded up to whole seconds)
	Tags      []string      // "tag:k3s", given to its nodes
	// Cluster of its nodes ("k3s-east"): routes of different clusters
	// must not overlap.
	Cluster string
}

// JoinKey is a join key as listed: never its secret.
type JoinKey struct {
	ID        string   `json:"id"`
	State     string   `json:"state"` // valid, expired, revoked, used
	Uses      uint64   `json:"uses"`
	Created   int64    `json:"created"` // Unix seconds
	Expires   *int64   `json:"expires"`
	Revoked   *int64   `json:"revoked"`
	Reusable  bool     `json:"reusable"`
	Ephemeral bool     `json:"ephemeral"`
	Tags      []string `json:"tags"`
	Cluster   *string  `json:"cluster"`
}

// ControlNode is a registered node.
type ControlNode struct {
	ID           int64    `json:"id"`
	Name         string   `json:"name"`
	IPv4         string   `json:"ipv4"`
	IPv6         string   `json:"ipv6"`
	PublicKey    string   `json:"public_key"` // base64
	Tags         []string `json:"tags"`
	Cluster      *string  `json:"cluster"`
	Ephemeral    bool     `json:"ephemeral"`
	Online       bool     `json:"online"`        // a session with this server now
	OfflineSince *int64   `json:"offline_since"` // Unix seconds
	// Seen is the address its session comes from, as the listener (or,
	// through Handler, r.RemoteAddr) saw it, offered to the other nodes
	// as an endpoint; nil when offline.
	Seen *string `json:"seen"`
	// Endpoints are the UDP endpoints it reported (while online).
	Endpoints []string `json:"endpoints"`
}

// ControlRoute is a route a node advertises.
type ControlRoute struct {
	NodeID     int64   `json:"node_id"`
	Node       string  `json:"node"`
	Cluster    string  `json:"cluster"`
	Prefix     string  `json:"prefix"`
	Status     string  `json:"status"`      // approved, pending, refused
	ApprovedBy *string `json:"approved_by"` // "policy" or "operator"
	// Role of an approved route in its prefix: "primary" (the network
	// map gives the prefix to this node) or "standby" (another router of
	// the cluster carries it); empty when not approved.
	Role string `json:"role"`
	// Reason of a refusal: names the conflicting node and both clusters.
	Reason string `json:"reason"`
}

// ControlServer is the mesh's control server (nodes join with a join key
// and get the network map), embedded in this process: on a TunnelServer's
// port next to the k3s tunnel and the relay (TunnelServerConfig.Control),
// on its own listener (ControlServerConfig.Addr), or as an http.Handler on
// the host's own HTTPS router (Handler). All methods are safe for
// concurrent use.
type ControlServer struct {
	h handle
}

// NewControlServer opens (or creates) the database, sets cfg.Policy, and
// starts the server.
func NewControlServer(cfg ControlServerConfig) (*ControlServer, error) {
	var a arena
	defer a.free()
	c := (*C.meshvpn_control_server_config)(a.alloc(int(unsafe.Sizeof(C.meshvpn_control_server_config{}))))
	c.db_path = a.str(cfg.DBPath)
	opt := func(s string) *C.char {
		if s == "" {
			return nil
		}
		return a.str(s)
	}
	c.ipv4_prefix = opt(cfg.IPv4Prefix)
	c.policy = opt(cfg.Policy)
	c.policy_file = opt(cfg.PolicyFile)
	c.relay_url = opt(cfg.RelayURL)
	c.listen = opt(cfg.Addr)
	if cfg.Addr != "" {
		c.cert_pem = a.str(string(cfg.CertPEM))
		c.key_pem = a.str(string(cfg.KeyPEM))
	}
	c.relay = C.bool(cfg.Relay)
	if cfg.EphemeralTimeout > 0 {
		c.ephemeral_timeout_ms = C.uint32_t(cTimeout(cfg.EphemeralTimeout))
	}
	c.max_sessions = C.uint32_t(cfg.MaxSessions)
	c.max_sessions_per_source = C.uint32_t(cfg.MaxSessionsPerSource)
	h, err := newHandle("NewControlServer", func(out unsafe.Pointer) C.meshvpn_result {
		return C.meshvpn_control_server_new(c, (**C.meshvpn_control_server)(out))
	})
	if err != nil {
		return nil, err
	}
	s := &ControlServer{}
	s.h.set(h)
	runtime.SetFinalizer(s, func(s *ControlServer) { _ = s.Close() })
	return s, nil
}

func (s *ControlServer) do(op string, f func(*C.meshvpn_control_server) C.meshvpn_result) error {
	return s.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(C.mv_control(h)) })
}

func (s *ControlServer) text(op string, fill func(*C.meshvpn_control_server, *C.char, C.size_t, *C.size_t) C.meshvpn_result) (string, error) {
	return s.h.textOut(op, func(h C.uintptr_t, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return fill(C.mv_control(h), buf, n, out)
	})
}

func (s *ControlServer) list(op string, v any, fill func(*C.meshvpn_control_server, *C.char, C.size_t, *C.size_t) C.meshvpn_result) error {
	text, err := s.text(op, fill)
	if err != nil {
		return err
	}
	return json.Unmarshal([]byte(text), v)
}

// attach serves s on the stopped tunnel server t (from its next Listen).
func (s *ControlServer) attach(t *TunnelServer) error {
	tv := t.h.load()
	if tv == 0 {
		return errClosed("TunnelServerConfig.Control")
	}
	// A t closed meanwhile is refused by the library (a stale handle).
	err := s.do("TunnelServerConfig.Control", func(cs *C.meshvpn_control_server) C.meshvpn_result {
		return C.meshvpn_control_server_attach(cs, C.mv_control_tunnel(C.uintptr_t(tv)))
	})
	runtime.KeepAlive(t)
	return err
}

// Addr returns the address of the server's own listener (ControlServerConfig.Addr).
func (s *ControlServer) Addr() (string, error) {
	return s.text("ControlServer.Addr", func(h *C.meshvpn_control_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_control_server_local_addr(h, buf, n, out)
	})
}

// CreateKey creates a join key and returns its text (mvpn-key-...), shown
// only now: the database keeps its hash. Give it to a node (meshvpn up
// --join-key-file, or Join) and do not log it.
func (s *ControlServer) CreateKey(o JoinKeyOptions) (string, error) {
	var a arena
	defer a.free()
	c := (*C.meshvpn_join_key_options)(a.alloc(int(unsafe.Sizeof(C.meshvpn_join_key_options{}))))
	c.reusable, c.ephemeral = C.bool(o.Reusable), C.bool(o.Ephemeral)
	if o.Expiry > 0 {
		c.expiry_seconds = C.uint64_t((o.Expiry + time.Second - 1) / time.Second)
	}
	if len(o.Tags) > 0 {
		tags := ""
		for i, t := range o.Tags {
			if i > 0 {
				tags += ","
			}
			tags += t
		}
		c.tags = a.str(tags)
	}
	if o.Cluster != "" {
		c.cluster = a.str(o.Cluster)
	}
	buf := (*C.char)(a.alloc(C.MESHVPN_JOIN_KEY_LEN)) // zeroed when the arena is freed
	var n C.size_t
	if err := s.do("ControlServer.CreateKey", func(h *C.meshvpn_control_server) C.meshvpn_result {
		return C.meshvpn_control_server_create_key(h, c, buf, C.MESHVPN_JOIN_KEY_LEN, &n)
	}); err != nil {
		return "", err
	}
	return C.GoStringN(buf, C.int(n)), nil
}

// joinKeyLen is the length of a join key's text.
const joinKeyLen = C.MESHVPN_JOIN_KEY_LEN - 1

// Keys lists the join keys (never their secrets).
func (s *ControlServer) Keys() ([]JoinKey, error) {
	var v []JoinKey
	text, err := s.keysJSON()
	if err == nil {
		err = json.Unmarshal([]byte(text), &v)
	}
	return v, err
}

// keysJSON is the library's listing as it comes.
func (s *ControlServer) keysJSON() (string, error) {
	return s.text("ControlServer.Keys", func(h *C.meshvpn_control_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_control_server_keys(h, buf, n, out)
	})
}

// RevokeKey revokes a join key by its id (or whole text); nodes that
// joined with it stay.
func (s *ControlServer) RevokeKey(id string) error {
	var a arena
	defer a.free()
	k := a.str(id)
	return s.do("ControlServer.RevokeKey", func(h *C.meshvpn_control_server) C.meshvpn_result {
		return C.meshvpn_control_server_revoke_key(h, k)
	})
}

// Nodes lists the registered nodes.
func (s *ControlServer) Nodes() ([]ControlNode, error) {
	var v []ControlNode
	err := s.list("ControlServer.Nodes", &v, func(h *C.meshvpn_control_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_control_server_nodes(h, buf, n, out)
	})
	return v, err
}

// RemoveNode removes a node (by id, name or base64 public key) with its
// routes: its session is closed, its key is refused from now on, and the
// other nodes drop it as a peer.
func (s *ControlServer) RemoveNode(node string) error {
	var a arena
	defer a.free()
	n := a.str(node)
	return s.do("ControlServer.RemoveNode", func(h *C.meshvpn_control_server) C.meshvpn_result {
		return C.meshvpn_control_server_remove_node(h, n)
	})
}

// Routes lists the routes the nodes advertise, with their status.
func (s *ControlServer) Routes() ([]ControlRoute, error) {
	var v []ControlRoute
	err := s.list("ControlServer.Routes", &v, func(h *C.meshvpn_control_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_control_server_routes(h, buf, n, out)
	})
	return v, err
}

// ApproveRoute approves the route prefix that node (id, name or public
// key) advertises; ErrControlRouteRefused when it overlaps an approved
// route of another cluster.
func (s *ControlServer) ApproveRoute(node, prefix string) error {
	var a arena
	defer a.free()
	n, p := a.str(node), a.str(prefix)
	return s.do("ControlServer.ApproveRoute", func(h *C.meshvpn_control_server) C.meshvpn_result {
		return C.meshvpn_control_server_approve_route(h, n, p)
	})
}

// SetPolicy validates policy and makes it the policy, returning its new
// version; an invalid one fails with ErrControlPolicyInvalid naming the
// line, and nothing is stored.
func (s *ControlServer) SetPolicy(policy string) (uint64, error) {
	var a arena
	defer a.free()
	p := a.str(policy)
	var v C.uint64_t
	err := s.do("ControlServer.SetPolicy", func(h *C.meshvpn_control_server) C.meshvpn_result {
		return C.meshvpn_control_server_set_policy(h, p, &v)
	})
	return uint64(v), err
}

// Policy returns the policy as set and its version; "" and 0 when none
// is set (allow-all).
func (s *ControlServer) Policy() (string, uint64, error) {
	var v C.uint64_t
	text, err := s.text("ControlServer.Policy", func(h *C.meshvpn_control_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_control_server_get_policy(h, buf, n, out, &v)
	})
	return text, uint64(v), err
}

// Close stops the server (its listener, and every node's session; nodes
// keep their data plane) and releases it. It is idempotent.
func (s *ControlServer) Close() error {
	return s.h.closeIdempotent("ControlServer.Close", s, func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_control_server_free(C.mv_control(h))
	})
}
