package meshvpn

// #include <stdbool.h>
// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
//
// extern void meshvpnGoTunnelEvent(void *userdata, meshvpn_tunnel_event *event);
// extern bool meshvpnGoTunnelAllow(void *userdata, char *network, char *address);
//
// static void mv_tunnel_event(void *userdata, const meshvpn_tunnel_event *event) {
//     meshvpnGoTunnelEvent(userdata, (meshvpn_tunnel_event *)event);
// }
// static bool mv_tunnel_allow(void *userdata, const char *network, const char *address) {
//     return meshvpnGoTunnelAllow(userdata, (char *)network, (char *)address);
// }
// // The Go side's callbacks are a cgo.Handle, an integer, carried as userdata.
// static void mv_tunnel_callbacks(meshvpn_tunnel_agent_config *c, uintptr_t h, bool allow, bool event) {
//     if (allow) { c->allow_callback = mv_tunnel_allow; c->allow_userdata = (void *)h; }
//     if (event) { c->event_callback = mv_tunnel_event; c->event_userdata = (void *)h; }
// }
// static meshvpn_tunnel_agent *mv_agent(uintptr_t h) { return (meshvpn_tunnel_agent *)h; }
// static meshvpn_tunnel_server *mv_server(uintptr_t h) { return (meshvpn_tunnel_server *)h; }
// static meshvpn_tunnel_stream *mv_stream(uintptr_t h) { return (meshvpn_tunnel_stream *)h; }
// static void mv_agent_netstack(meshvpn_tunnel_agent_config *c, uintptr_t h) { c->netstack = (const meshvpn_netstack *)h; }
import "C"

import (
	"context"
	"io"
	"net"
	"runtime"
	"runtime/cgo"
	"sort"
	"strings"
	"time"
	"unsafe"
)

// The tunnel's result codes (500-599).
const (
	ErrTunnelNoSession     Result = C.MESHVPN_TUNNEL_NO_SESSION
	ErrTunnelRefused       Result = C.MESHVPN_TUNNEL_REFUSED
	ErrTunnelClosed        Result = C.MESHVPN_TUNNEL_CLOSED
	ErrTunnelReset         Result = C.MESHVPN_TUNNEL_RESET
	ErrTunnelTLS           Result = C.MESHVPN_TUNNEL_TLS
	ErrTunnelAuth          Result = C.MESHVPN_TUNNEL_AUTH
	ErrTunnelHandshake     Result = C.MESHVPN_TUNNEL_HANDSHAKE
	ErrTunnelListenFailed  Result = C.MESHVPN_TUNNEL_LISTEN_FAILED
	ErrTunnelConnectFailed Result = C.MESHVPN_TUNNEL_CONNECT_FAILED
	ErrTunnelLimit         Result = C.MESHVPN_TUNNEL_LIMIT
	ErrTunnelNotRunning    Result = C.MESHVPN_TUNNEL_NOT_RUNNING
)

// waitSlice bounds each C wait for a session or a connection, so that a
// cancelled context takes effect within it.
const waitSlice = 100 * time.Millisecond

// ------------------------------------------------------------------ agent

// TunnelEventKind says what happened to a TunnelAgent.
type TunnelEventKind int

const (
	// TunnelConnected: a session with the server is up.
	TunnelConnected TunnelEventKind = C.MESHVPN_TUNNEL_EVENT_CONNECTED
	// TunnelDisconnected: the session ended; the agent reconnects unless closed.
	TunnelDisconnected TunnelEventKind = C.MESHVPN_TUNNEL_EVENT_DISCONNECTED
	// TunnelConnectError: an attempt to connect failed; the agent retries
	// after a backoff. Err says why (ErrTunnelTLS, ErrTunnelAuth, ...).
	TunnelConnectError TunnelEventKind = C.MESHVPN_TUNNEL_EVENT_ERROR
)

// TunnelEvent is one thing that happened to a TunnelAgent.
type TunnelEvent struct {
	Kind    TunnelEventKind
	Message string // why the session ended or the attempt failed
	Err     error  // for TunnelConnectError: an *Error with the code
}

// TunnelAgentConfig says how a TunnelAgent connects and what it allows.
type TunnelAgentConfig struct {
	// URL is wss://host:port, or wss://host:port/path.
	URL string
	// Path replaces the URL's path; empty keeps it, or /v1-k3s/connect
	// (where k3s mounts the tunnel) when the URL has none.
	Path string
	// CAPEM is the CA the server's certificate must chain to (required;
	// there is no mode without verification).
	CAPEM []byte
	// ClientCertPEM and ClientKeyPEM: the agent's client certificate (k3s:
	// CN system:node:NAME), both or neither.
	ClientCertPEM, ClientKeyPEM []byte
	// Token is sent as "Authorization: Bearer TOKEN" when not empty. Never logged.
	Token string
	// ClientID is sent as the X-Tunnel-ID header when not empty.
	ClientID string
	// Allow lists the targets the server may dial, as NETWORK/HOST:PORT
	// patterns (tcp/127.0.0.1:10250, tcp/10.42.0.0/16:*, tcp/[::1]:8000-9000).
	// With neither Allow nor AllowFunc: what k3s allows, the kubelet
	// (10250) and the stream server (10010) on loopback.
	Allow []string
	// AllowFunc decides instead of Allow. It runs on the library's threads
	// with the session locked: it must return quickly.
	AllowFunc func(network, address string) bool
	// OnEvent receives the agent's events, one at a time, on the library's
	// thread. It must not call Stop or Close (they fail with ErrWouldDeadlock).
	OnEvent func(TunnelEvent)
	// Netstack, when set, dials allowed targets inside a peer's AllowedIPs
	// over the mesh through this userspace stack (a kubelet on a mesh
	// address); other targets go through the OS. Close the agent before
	// the stack: mesh dials fail once the stack is closed.
	Netstack *Netstack
	// MaxStreams caps the streams the server may have the agent dial and
	// relay at once (two threads each); more are refused and counted in
	// TunnelAgentStatus.StreamsRefusedAtCap. 0 means the default, 1024.
	MaxStreams uint32
}

// TunnelAgentStatus holds a TunnelAgent's counters.
type TunnelAgentStatus struct {
	Connected        bool
	Sessions         uint64 // sessions established
	Reconnects       uint64 // sessions after the first
	StreamsActive    uint64 // relays to targets now
	StreamsTotal     uint64 // targets dialed
	StreamsRefused   uint64 // targets the policy refused
	BytesToTargets   uint64
	BytesFromTargets uint64
	// Targets refused because the agent's stream limit was reached.
	StreamsRefusedAtCap uint64
	// Allowed targets whose dial failed (refused, unreachable, timed out).
	DialsFailed uint64
}

// TunnelAgent keeps a websocket tunnel open to a TunnelServer (or to a k3s
// server, or any rancher/remotedialer server) and dials the targets it
// allows for the server. All methods are safe for concurrent use.
type TunnelAgent struct {
	h         handle
	callbacks cgo.Handle // 0 without Go callbacks
}

type agentCallbacks struct {
	allow   func(network, address string) bool
	onEvent func(TunnelEvent)
}

// NewTunnelAgent checks cfg and creates an agent; Start connects it.
func NewTunnelAgent(cfg TunnelAgentConfig) (*TunnelAgent, error) {
	var a arena
	defer a.free()
	c := (*C.meshvpn_tunnel_agent_config)(a.alloc(int(unsafe.Sizeof(C.meshvpn_tunnel_agent_config{}))))
	c.url = a.str(cfg.URL)
	opt := func(s string) *C.char {
		if s == "" {
			return nil
		}
		return a.str(s)
	}
	c.path = opt(cfg.Path)
	c.ca_pem = opt(string(cfg.CAPEM))
	c.client_cert_pem = opt(string(cfg.ClientCertPEM))
	c.client_key_pem = opt(string(cfg.ClientKeyPEM))
	c.token = opt(cfg.Token)
	c.client_id = opt(cfg.ClientID)
	c.allow, c.allow_len = a.strs(cfg.Allow)
	c.max_streams = C.uint32_t(cfg.MaxStreams)
	if cfg.Netstack != nil {
		h := cfg.Netstack.h.load()
		if h == 0 {
			return nil, &Error{Op: "NewTunnelAgent", Code: ErrClosed, Message: "the netstack is closed"}
		}
		C.mv_agent_netstack(c, C.uintptr_t(h))
	}
	agent := &TunnelAgent{}
	if cfg.AllowFunc != nil || cfg.OnEvent != nil {
		agent.callbacks = cgo.NewHandle(&agentCallbacks{allow: cfg.AllowFunc, onEvent: cfg.OnEvent})
		C.mv_tunnel_callbacks(c, C.uintptr_t(agent.callbacks), C.bool(cfg.AllowFunc != nil), C.bool(cfg.OnEvent != nil))
	}
	h, err := newHandle("NewTunnelAgent", func(out unsafe.Pointer) C.meshvpn_result {
		return C.meshvpn_tunnel_agent_new(c, (**C.meshvpn_tunnel_agent)(out))
	})
	if err != nil {
		if agent.callbacks != 0 {
			agent.callbacks.Delete()
		}
		return nil, err
	}
	agent.h.set(h)
	runtime.SetFinalizer(agent, func(a *TunnelAgent) { _ = a.Close() })
	runtime.KeepAlive(cfg.Netstack)
	return agent, nil
}

func (a *TunnelAgent) do(op string, f func(*C.meshvpn_tunnel_agent) C.meshvpn_result) error {
	return a.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(C.mv_agent(h)) })
}

// Start connects in the background and keeps reconnecting (exponential
// backoff with jitter, 0.5 s up to 30 s) until Stop or Close. Connection
// failures arrive as events and in Status, not here.
func (a *TunnelAgent) Start() error {
	return a.do("TunnelAgent.Start", func(h *C.meshvpn_tunnel_agent) C.meshvpn_result {
		return C.meshvpn_tunnel_agent_start(h)
	})
}

// Stop ends the session and waits for the agent's threads; Start connects again.
func (a *TunnelAgent) Stop() error {
	return a.do("TunnelAgent.Stop", func(h *C.meshvpn_tunnel_agent) C.meshvpn_result {
		return C.meshvpn_tunnel_agent_stop(h)
	})
}

// WaitConnected waits until the agent has a session or ctx ends.
func (a *TunnelAgent) WaitConnected(ctx context.Context) error {
	for {
		err := a.do("TunnelAgent.WaitConnected", func(h *C.meshvpn_tunnel_agent) C.meshvpn_result {
			return C.meshvpn_tunnel_agent_wait_connected(h, cTimeout(waitSlice))
		})
		if e, ok := err.(*Error); !ok || e.Code != ErrTimeout {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// Status returns the agent's counters.
func (a *TunnelAgent) Status() (TunnelAgentStatus, error) {
	var s C.meshvpn_tunnel_agent_status
	err := a.do("TunnelAgent.Status", func(h *C.meshvpn_tunnel_agent) C.meshvpn_result {
		return C.meshvpn_tunnel_agent_get_status(h, &s)
	})
	return TunnelAgentStatus{
		Connected: bool(s.connected), Sessions: uint64(s.sessions), Reconnects: uint64(s.reconnects),
		StreamsActive: uint64(s.streams_active), StreamsTotal: uint64(s.streams_total),
		StreamsRefused: uint64(s.streams_refused), BytesToTargets: uint64(s.bytes_to_targets),
		BytesFromTargets: uint64(s.bytes_from_targets), StreamsRefusedAtCap: uint64(s.streams_refused_at_cap),
		DialsFailed: uint64(s.dials_failed),
	}, err
}

// Close stops the agent and releases it; no callback runs after it
// returns. It is idempotent: later calls return nil.
func (a *TunnelAgent) Close() error {
	freed, err := a.h.release("TunnelAgent.Close", func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_tunnel_agent_free(C.mv_agent(h))
	})
	if !freed {
		return err
	}
	runtime.SetFinalizer(a, nil)
	if a.callbacks != 0 {
		a.callbacks.Delete()
		a.callbacks = 0
	}
	return nil
}

//export meshvpnGoTunnelEvent
func meshvpnGoTunnelEvent(userdata unsafe.Pointer, event *C.meshvpn_tunnel_event) {
	cb := cgo.Handle(uintptr(userdata)).Value().(*agentCallbacks)
	if cb.onEvent == nil || event == nil {
		return
	}
	ev := TunnelEvent{Kind: TunnelEventKind(event.kind), Message: C.GoString(event.message)}
	if event.result != C.MESHVPN_OK {
		ev.Err = &Error{Op: "TunnelAgent", Code: Result(event.result), Message: ev.Message}
	}
	cb.onEvent(ev)
}

//export meshvpnGoTunnelAllow
func meshvpnGoTunnelAllow(userdata unsafe.Pointer, network, address *C.char) C.bool {
	cb := cgo.Handle(uintptr(userdata)).Value().(*agentCallbacks)
	return C.bool(cb.allow != nil && cb.allow(C.GoString(network), C.GoString(address)))
}

// ------------------------------------------------------------------ server

// TunnelServerConfig says where a TunnelServer listens and whom it accepts.
type TunnelServerConfig struct {
	// Addr to listen on, e.g. "127.0.0.1:0" (a free port, kept across
	// Stop and Listen).
	Addr string
	// Path to upgrade on; empty means /v1-k3s/connect.
	Path string
	// CertPEM and KeyPEM: the server's certificate chain and key (required).
	CertPEM, KeyPEM []byte
	// ClientCAPEM: agents may present a client certificate signed by it;
	// its CN becomes the client key (k3s: system:node:NAME).
	ClientCAPEM []byte
	// Tokens maps bearer tokens to the client key an agent presenting one
	// gets. At least one of ClientCAPEM and Tokens is required, unless
	// Relay is set and RelayRequireAuth is not (a relay-only server).
	Tokens map[string]string
	// Relay also serves the WireGuard relay on the same listener, for
	// engines that call Engine.StartRelay. It forwards encrypted datagrams
	// by public key and never sees plaintext; a client proves it owns the
	// key it registers.
	Relay bool
	// RelayPath is the relay's upgrade path; empty means /v1-meshvpn/relay.
	RelayPath string
	// RelayKeys, when not empty, are the only public keys that may
	// register with the relay; empty admits any key whose owner proves
	// possession.
	RelayKeys []Key
	// RelayRequireAuth makes relay clients also present the tunnel's
	// credentials (a token from Tokens, or a client certificate).
	RelayRequireAuth bool
	// MaxHandshakes caps the TLS and HTTP handshakes in progress at once
	// from all sources; more connections are closed at once. 0 means 256.
	MaxHandshakes uint32
	// MaxHandshakesPerSource caps them per source address (nginx
	// limit_conn style): more from it are closed at once while other
	// sources are served. 0 means 16.
	MaxHandshakesPerSource uint32
	// RelayMaxSessions caps relay sessions at once from all sources (each
	// is one thread and three open files); more registrations are
	// answered 503. 0 means 1024. Needs Relay.
	RelayMaxSessions uint32
	// RelayMaxSessionsPerSource caps relay sessions per source address.
	// 0 means 32. Needs Relay.
	RelayMaxSessionsPerSource uint32
	// RelayQueueBytes bounds what the relay queues toward one client;
	// frames past it are dropped (RelayServerStats.DroppedFull). 0 means
	// 1 MiB; at least 65631 (one largest frame).
	RelayQueueBytes uint
	// RelayBudgetBytes bounds what the relay queues toward all clients
	// together (RelayServerStats.DroppedBudget). 0 means 64 MiB; at least
	// RelayQueueBytes.
	RelayBudgetBytes uint
	// RelayWriteTimeout closes a relay client's session when its writes
	// make no progress this long (it does not read), freeing its queue
	// (RelayServerStats.ClosedSlow). 0 means 10 s; rounded up to ms.
	RelayWriteTimeout time.Duration
	// Control, when set, serves that control server on this listener
	// (path /v1-meshvpn/control), so one port serves the k3s tunnel, the
	// relay and the mesh's coordination. Closing the control server
	// first makes the path refuse nodes until this server stops.
	Control *ControlServer
}

// TunnelServerStats are a TunnelServer's sessions, handshakes and
// refusals since it started.
type TunnelServerStats struct {
	Sessions   uint64 // agents with a tunnel session now
	Handshakes uint64 // handshakes in progress now
	// Connections closed at once: MaxHandshakes in progress in all, or
	// MaxHandshakesPerSource from their source.
	RefusedHandshakes, RefusedHandshakesPerSource uint64
	RelaySessions                                 uint64 // relay sessions now
	// Relay registrations answered 503: RelayMaxSessions in all, or
	// RelayMaxSessionsPerSource from their source.
	RefusedRelaySessions, RefusedRelaySessionsPerSource uint64
}

// TunnelServer accepts TunnelAgents (or k3s agents, or any
// rancher/remotedialer client) and dials through them. All methods are
// safe for concurrent use.
type TunnelServer struct {
	h handle
}

// NewTunnelServer checks cfg and creates a server; Listen starts it.
func NewTunnelServer(cfg TunnelServerConfig) (*TunnelServer, error) {
	var a arena
	defer a.free()
	c := (*C.meshvpn_tunnel_server_config)(a.alloc(int(unsafe.Sizeof(C.meshvpn_tunnel_server_config{}))))
	c.listen = a.str(cfg.Addr)
	if cfg.Path != "" {
		c.path = a.str(cfg.Path)
	}
	c.cert_pem = a.str(string(cfg.CertPEM))
	c.key_pem = a.str(string(cfg.KeyPEM))
	if len(cfg.ClientCAPEM) > 0 {
		c.client_ca_pem = a.str(string(cfg.ClientCAPEM))
	}
	if n := len(cfg.Tokens); n > 0 {
		tokens := unsafe.Slice((*C.meshvpn_tunnel_token)(a.alloc(n*int(unsafe.Sizeof(C.meshvpn_tunnel_token{})))), n)
		i := 0
		for token, key := range cfg.Tokens {
			tokens[i].token = a.str(token)
			tokens[i].client_key = a.str(key)
			i++
		}
		c.tokens, c.tokens_len = &tokens[0], C.size_t(n)
	}
	c.relay, c.relay_require_auth = C.bool(cfg.Relay), C.bool(cfg.RelayRequireAuth)
	c.max_handshakes = C.uint32_t(cfg.MaxHandshakes)
	c.max_handshakes_per_source = C.uint32_t(cfg.MaxHandshakesPerSource)
	c.relay_max_sessions = C.uint32_t(cfg.RelayMaxSessions)
	c.relay_max_sessions_per_source = C.uint32_t(cfg.RelayMaxSessionsPerSource)
	if cfg.RelayPath != "" {
		c.relay_path = a.str(cfg.RelayPath)
	}
	if n := len(cfg.RelayKeys); n > 0 {
		keys := unsafe.Slice((*C.meshvpn_key)(a.alloc(n*int(unsafe.Sizeof(C.meshvpn_key{})))), n)
		for i, k := range cfg.RelayKeys {
			keys[i] = k.c()
		}
		c.relay_keys, c.relay_keys_len = &keys[0], C.size_t(n)
	}
	c.relay_queue_bytes, c.relay_budget_bytes = C.size_t(cfg.RelayQueueBytes), C.size_t(cfg.RelayBudgetBytes)
	if cfg.RelayWriteTimeout > 0 { // 0: the library's default
		c.relay_write_timeout_ms = C.uint32_t(cTimeout(cfg.RelayWriteTimeout))
	}
	h, err := newHandle("NewTunnelServer", func(out unsafe.Pointer) C.meshvpn_result {
		return C.meshvpn_tunnel_server_new(c, (**C.meshvpn_tunnel_server)(out))
	})
	if err != nil {
		return nil, err
	}
	s := &TunnelServer{}
	s.h.set(h)
	runtime.SetFinalizer(s, func(s *TunnelServer) { _ = s.Close() })
	if cfg.Control != nil {
		if err := cfg.Control.attach(s); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

func (s *TunnelServer) do(op string, f func(*C.meshvpn_tunnel_server) C.meshvpn_result) error {
	return s.h.do(op, func(h C.uintptr_t) C.meshvpn_result { return f(C.mv_server(h)) })
}

func (s *TunnelServer) text(op string, fill func(*C.meshvpn_tunnel_server, *C.char, C.size_t, *C.size_t) C.meshvpn_result) (string, error) {
	return s.h.textOut(op, func(h C.uintptr_t, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return fill(C.mv_server(h), buf, n, out)
	})
}

// Listen binds the address and serves agents in the background. After
// Stop, it binds the address it had before (the same port).
func (s *TunnelServer) Listen() error {
	return s.do("TunnelServer.Listen", func(h *C.meshvpn_tunnel_server) C.meshvpn_result {
		return C.meshvpn_tunnel_server_start(h)
	})
}

// Stop stops listening and ends every session; streams through them fail
// with ErrTunnelReset. Listen starts it again.
func (s *TunnelServer) Stop() error {
	return s.do("TunnelServer.Stop", func(h *C.meshvpn_tunnel_server) C.meshvpn_result {
		return C.meshvpn_tunnel_server_stop(h)
	})
}

// Addr returns the address the server listens on, e.g. "127.0.0.1:41234".
func (s *TunnelServer) Addr() (string, error) {
	return s.text("TunnelServer.Addr", func(h *C.meshvpn_tunnel_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_tunnel_server_local_addr(h, buf, n, out)
	})
}

// Sessions returns the client keys with a session now, sorted.
func (s *TunnelServer) Sessions() ([]string, error) {
	text, err := s.text("TunnelServer.Sessions", func(h *C.meshvpn_tunnel_server, buf *C.char, n C.size_t, out *C.size_t) C.meshvpn_result {
		return C.meshvpn_tunnel_server_sessions(h, buf, n, out)
	})
	if err != nil || text == "" {
		return nil, err
	}
	keys := strings.Split(text, "\n")
	sort.Strings(keys)
	return keys, nil
}

// Stats returns the server's counters; ErrTunnelNotRunning before Listen
// or after Stop.
func (s *TunnelServer) Stats() (TunnelServerStats, error) {
	var st C.meshvpn_tunnel_server_stats
	err := s.do("TunnelServer.Stats", func(h *C.meshvpn_tunnel_server) C.meshvpn_result {
		return C.meshvpn_tunnel_server_get_stats(h, &st)
	})
	return TunnelServerStats{
		Sessions: uint64(st.sessions), Handshakes: uint64(st.handshakes),
		RefusedHandshakes:             uint64(st.refused_handshakes),
		RefusedHandshakesPerSource:    uint64(st.refused_handshakes_per_source),
		RelaySessions:                 uint64(st.relay_sessions),
		RefusedRelaySessions:          uint64(st.refused_relay_sessions),
		RefusedRelaySessionsPerSource: uint64(st.refused_relay_sessions_per_source),
	}, err
}

// WaitSession waits until clientKey has a session or ctx ends.
func (s *TunnelServer) WaitSession(ctx context.Context, clientKey string) error {
	key := C.CString(clientKey)
	defer C.free(unsafe.Pointer(key))
	for {
		err := s.do("TunnelServer.WaitSession", func(h *C.meshvpn_tunnel_server) C.meshvpn_result {
			return C.meshvpn_tunnel_server_wait_session(h, key, cTimeout(waitSlice))
		})
		if e, ok := err.(*Error); !ok || e.Code != ErrTunnelNoSession || ctx.Err() != nil {
			if err != nil && ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
	}
}

// Dial is DialContext with context.Background().
func (s *TunnelServer) Dial(clientKey, network, address string) (net.Conn, error) {
	return s.DialContext(context.Background(), clientKey, network, address)
}

// DialContext opens a connection to address (e.g. "127.0.0.1:10250") over
// network ("tcp") as seen from the agent clientKey. Without a session for
// clientKey it fails with ErrTunnelNoSession at once, or, when ctx has a
// deadline, after waiting for one until then. The protocol has no
// acknowledgement: a target the agent refuses shows as ErrTunnelRefused on
// the connection's first Read or Write.
func (s *TunnelServer) DialContext(ctx context.Context, clientKey, network, address string) (net.Conn, error) {
	var a arena
	defer a.free()
	key, nw, addr := a.str(clientKey), a.str(network), a.str(address)
	deadline, hasDeadline := ctx.Deadline()
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		var wait C.meshvpn_timeout_ms
		if hasDeadline {
			wait = cTimeout(max(min(time.Until(deadline), waitSlice), 0))
		}
		var h C.uintptr_t
		err := s.do("TunnelServer.DialContext", func(srv *C.meshvpn_tunnel_server) C.meshvpn_result {
			return C.meshvpn_tunnel_server_dial(srv, key, nw, addr, wait, (**C.meshvpn_tunnel_stream)(unsafe.Pointer(&h)))
		})
		if err == nil {
			c := &tunnelConn{
				socket: socket{interrupt: interruptStream},
				local:  tunnelAddr{network, "tunnel:" + clientKey},
				remote: tunnelAddr{network, address},
			}
			c.h.set(uintptr(h))
			runtime.SetFinalizer(c, func(c *tunnelConn) { _ = c.Close() })
			return c, nil
		}
		if e, ok := err.(*Error); !ok || e.Code != ErrTunnelNoSession || !hasDeadline || !time.Now().Before(deadline) {
			return nil, err
		}
	}
}

// Close stops the server and releases it. It is idempotent. Connections
// dialed through it fail but must still be closed.
func (s *TunnelServer) Close() error {
	return s.h.closeIdempotent("TunnelServer.Close", s, func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_tunnel_server_free(C.mv_server(h))
	})
}

// ------------------------------------------------------------------ conn

type tunnelAddr struct{ network, addr string }

func (a tunnelAddr) Network() string { return a.network }
func (a tunnelAddr) String() string  { return a.addr }

// tunnelConn is a net.Conn over a meshvpn_tunnel_stream. Its deadlines
// work as Conn's (see socket): a deadline set while a call blocks
// interrupts the call (meshvpn_tunnel_stream_interrupt), which then looks
// at the deadline again.
type tunnelConn struct {
	socket
	local, remote tunnelAddr
}

func interruptStream(h C.uintptr_t) C.meshvpn_result {
	return C.meshvpn_tunnel_stream_interrupt(C.mv_stream(h))
}

func (c *tunnelConn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: c.remote.network, Source: c.local, Addr: c.remote, Err: err}
}

func (c *tunnelConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n C.size_t
	err := c.retry("TunnelConn.Read", &c.rd, func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result {
		return C.meshvpn_tunnel_stream_read(C.mv_stream(h), ptr(p), C.size_t(len(p)), ms, &n)
	})
	if err != nil {
		return 0, c.opErr("read", err)
	}
	if n == 0 {
		return 0, io.EOF
	}
	return int(n), nil
}

func (c *tunnelConn) Write(p []byte) (int, error) {
	written := 0
	for written < len(p) {
		rest := p[written:]
		var n C.size_t
		err := c.retry("TunnelConn.Write", &c.wd, func(h C.uintptr_t, ms C.meshvpn_timeout_ms) C.meshvpn_result {
			return C.meshvpn_tunnel_stream_write(C.mv_stream(h), ptr(rest), C.size_t(len(rest)), ms, &n)
		})
		written += int(n)
		if err != nil {
			return written, c.opErr("write", err)
		}
	}
	return written, nil
}

// CloseWrite ends writing. The tunnel protocol has no half-close: the far
// side reads end of stream and this side's reads end too.
func (c *tunnelConn) CloseWrite() error {
	return c.h.do("TunnelConn.CloseWrite", func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_tunnel_stream_shutdown_write(C.mv_stream(h))
	})
}

// Close closes the connection; blocked Reads and Writes return an error
// matching net.ErrClosed. Idempotent.
func (c *tunnelConn) Close() error {
	return c.h.closeIdempotent("TunnelConn.Close", c, func(h C.uintptr_t) C.meshvpn_result {
		return C.meshvpn_tunnel_stream_free(C.mv_stream(h))
	})
}

func (c *tunnelConn) LocalAddr() net.Addr  { return c.local }
func (c *tunnelConn) RemoteAddr() net.Addr { return c.remote }
