package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
import "C"

import (
	"context"
	"time"
	"unsafe"
)

// ErrRelayNotRunning is the code of RelayStatus and WaitRelayConnected
// on an engine without a relay (never started, or stopped), and of
// TunnelServer.RelayStats on a server created without Relay.
const ErrRelayNotRunning Result = C.MESHVPN_RELAY_NOT_RUNNING

// RelayConfig says where an Engine reaches a WireGuard relay: a
// `meshvpn tunnel serve --relay`, or a TunnelServer with Relay set.
//
// Through a relay, WireGuard datagrams travel over a websocket (TLS) to
// the relay, which forwards them by the destination's public key, still
// encrypted. Peers whose UDP handshakes go unanswered (two initiations,
// about 5 s) move to the relay by themselves; every ProbeInterval a
// handshake is tried over UDP again, and an answer moves the peer back.
// Both ends of a relayed pair must use the same relay.
type RelayConfig struct {
	// URL of the relay: wss://host:port/v1-meshvpn/relay (ws:// is plain
	// HTTP, for tests). Required.
	URL string
	// CAPEM is the CA that signed the relay's certificate. Required for
	// wss://: the relay is always verified.
	CAPEM []byte
	// Token is sent as "Authorization: Bearer TOKEN" when set, for relays
	// that require the tunnel's credentials. It is never logged.
	Token string
	// ProbeInterval is how often a peer on the relay is probed over UDP;
	// zero means 5 s. It is rounded up to whole milliseconds.
	ProbeInterval time.Duration
	// ClientCertPEM and ClientKeyPEM are a client certificate (chain) and
	// its private key to present to the relay: both or neither, and only
	// with CAPEM. A relay whose server has a client CA and no tokens
	// (`meshvpn tunnel serve --client-ca --relay`) demands one signed by
	// that CA. The key is never logged.
	ClientCertPEM, ClientKeyPEM []byte
}

// RelayStatus is the state of an engine's relay client.
type RelayStatus struct {
	// Connected reports whether the engine is registered with the relay now.
	Connected bool
	// Sessions counts registrations since StartRelay (reconnects included).
	Sessions uint64
	// FramesSent and FramesReceived count WireGuard datagrams through
	// the relay.
	FramesSent, FramesReceived uint64
	// FramesDropped counts datagrams not sent: no session, or the send
	// queue was full.
	FramesDropped uint64
	// LastError says why the last session or connection attempt ended
	// (a refused registration, a TLS failure, a relay that requires a
	// client certificate: see ClientCertPEM); empty when none failed.
	// It never contains the token.
	LastError string
}

// StartRelay connects the engine to a relay, replacing one it has. It
// returns before the connection is up (see WaitRelayConnected); the
// client reconnects with backoff until StopRelay, Stop or Close, and
// connection failures show in RelayStatus().LastError.
//
// Errors: ErrInvalidArgument (a URL that is not wss:// or ws://, wss://
// without CAPEM, only one of ClientCertPEM and ClientKeyPEM, either
// without CAPEM), ErrTunnelTLS (CAPEM holds no certificate, the client
// certificate or key is not PEM),
// ErrEngineStopped; after Close, an error matching net.ErrClosed.
//
// The relay belongs to the running engine: Stop ends it, and after Start
// the engine has none until StartRelay is called again.
func (e *Engine) StartRelay(cfg RelayConfig) error {
	var a arena
	defer a.free()
	c := (*C.meshvpn_relay_config)(a.alloc(int(unsafe.Sizeof(C.meshvpn_relay_config{}))))
	c.url = a.str(cfg.URL)
	c.ca_pem, c.ca_pem_len = a.bytes(cfg.CAPEM)
	c.client_cert_pem, c.client_cert_pem_len = a.bytes(cfg.ClientCertPEM)
	c.client_key_pem, c.client_key_pem_len = a.bytes(cfg.ClientKeyPEM)
	if cfg.Token != "" {
		c.token = a.str(cfg.Token)
	}
	if cfg.ProbeInterval > 0 {
		c.probe_interval_ms = C.uint32_t(cTimeout(cfg.ProbeInterval))
	}
	return e.do("Engine.StartRelay", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_relay_start(h, c)
	})
}

// StopRelay disconnects the engine from its relay; peers on the relay go
// back to their last UDP endpoint. Without a relay it does nothing and
// returns nil, so calling it twice is fine. After Close it returns an
// error matching net.ErrClosed.
func (e *Engine) StopRelay() error {
	return e.do("Engine.StopRelay", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_relay_stop(h)
	})
}

// RelayStatus returns the state of the engine's relay client: an error
// with code ErrRelayNotRunning without a relay (before StartRelay, after
// StopRelay), one matching net.ErrClosed after Close.
func (e *Engine) RelayStatus() (RelayStatus, error) {
	var s C.meshvpn_relay_status
	if err := e.do("Engine.RelayStatus", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_relay_status(h, &s)
	}); err != nil {
		return RelayStatus{}, err
	}
	last, err := e.textOut("Engine.RelayStatus", func(h *C.meshvpn_engine, buf *C.char, n C.size_t, got *C.size_t) C.meshvpn_result {
		return C.meshvpn_engine_relay_last_error(h, buf, n, got)
	})
	if err != nil {
		return RelayStatus{}, err
	}
	return RelayStatus{
		Connected:      bool(s.connected),
		Sessions:       uint64(s.sessions),
		FramesSent:     uint64(s.frames_sent),
		FramesReceived: uint64(s.frames_received),
		FramesDropped:  uint64(s.frames_dropped),
		LastError:      last,
	}, nil
}

// WaitRelayConnected waits until the engine is registered with its relay
// or ctx ends (then it returns ctx.Err()). It fails with
// ErrRelayNotRunning without a relay, also when StopRelay runs meanwhile.
func (e *Engine) WaitRelayConnected(ctx context.Context) error {
	for {
		err := e.do("Engine.WaitRelayConnected", func(h *C.meshvpn_engine) C.meshvpn_result {
			return C.meshvpn_engine_relay_wait_connected(h, cTimeout(waitSlice))
		})
		if code, ok := codeOf(err); !ok || code != ErrTimeout {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// RelayServerStats are a TunnelServer relay's counters since it started.
type RelayServerStats struct {
	Clients       uint64 // keys registered now
	Registrations uint64 // registrations so far
	Replaced      uint64 // registrations that replaced a live one of the same key
	Refused       uint64 // failed key proofs, and keys outside RelayKeys
	Forwarded     uint64 // datagrams forwarded
	// Dropped datagrams: to a key without a session, to a session whose
	// queue was full, and frames too short to hold a key and a datagram.
	DroppedUnknown, DroppedFull, DroppedMalformed uint64
	// DroppedBudget counts datagrams dropped because all queues together
	// held RelayBudgetBytes.
	DroppedBudget uint64
	// ClosedSlow counts sessions closed because their writes made no
	// progress for RelayWriteTimeout (clients that do not read).
	ClosedSlow uint64
	// QueuedBytes are queued toward all clients now (0 once every session
	// ended); QueuedBytesPeak is its most, SessionQueuedBytesPeak the most
	// one client's queue held.
	QueuedBytes, QueuedBytesPeak, SessionQueuedBytesPeak uint64
}

// RelayStats returns the counters of the server's relay: ErrRelayNotRunning
// when the server was created without Relay, ErrTunnelNotRunning before
// Listen or after Stop.
func (s *TunnelServer) RelayStats() (RelayServerStats, error) {
	var st C.meshvpn_relay_server_stats
	err := s.do("TunnelServer.RelayStats", func(h *C.meshvpn_tunnel_server) C.meshvpn_result {
		return C.meshvpn_tunnel_server_relay_stats(h, &st)
	})
	return RelayServerStats{
		Clients: uint64(st.clients), Registrations: uint64(st.registrations),
		Replaced: uint64(st.replaced), Refused: uint64(st.refused), Forwarded: uint64(st.forwarded),
		DroppedUnknown: uint64(st.dropped_unknown), DroppedFull: uint64(st.dropped_full),
		DroppedMalformed: uint64(st.dropped_malformed), DroppedBudget: uint64(st.dropped_budget),
		ClosedSlow: uint64(st.closed_slow), QueuedBytes: uint64(st.queued_bytes),
		QueuedBytesPeak: uint64(st.queued_bytes_peak), SessionQueuedBytesPeak: uint64(st.session_queued_bytes_peak),
	}, err
}

// NATStats are an engine's NAT traversal counters since it started.
type NATStats struct {
	// CandidatesReceived counts candidate messages accepted from peers.
	CandidatesReceived uint64
	// CandidatesMalformed counts candidate messages refused by the parser.
	CandidatesMalformed uint64
	// CandidatesUnsupported counts candidate messages of a version the
	// engine does not speak.
	CandidatesUnsupported uint64
	// CandidatesUnknownPeer counts candidate messages from a key that is
	// not a peer.
	CandidatesUnknownPeer uint64
	// CandidatesSent counts candidate messages sent to peers.
	CandidatesSent uint64
	// ProbeRounds counts probing rounds, all peers.
	ProbeRounds uint64
	// ProbesSent counts the datagrams those rounds sent.
	ProbesSent uint64
	// ProbesDeferred counts rounds put off by the device-wide probe budget.
	ProbesDeferred uint64
	// Fallbacks counts direct paths given up for the relay.
	Fallbacks uint64
	// RelayIPChanges counts the times the IP the relay sees this node's
	// session come from changed between sessions (its NAT's public address
	// moved; each started a STUN round).
	RelayIPChanges uint64
}

// NATStats returns the engine's NAT traversal counters (read one by one,
// not as an atomic snapshot); an error matching net.ErrClosed after Close.
func (e *Engine) NATStats() (NATStats, error) {
	var s C.meshvpn_nat_stats
	if err := e.do("Engine.NATStats", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_nat_stats(h, &s)
	}); err != nil {
		return NATStats{}, err
	}
	return NATStats{
		CandidatesReceived:    uint64(s.candidates_received),
		CandidatesMalformed:   uint64(s.candidates_malformed),
		CandidatesUnsupported: uint64(s.candidates_unsupported),
		CandidatesUnknownPeer: uint64(s.candidates_unknown_peer),
		CandidatesSent:        uint64(s.candidates_sent),
		ProbeRounds:           uint64(s.probe_rounds),
		ProbesSent:            uint64(s.probes_sent),
		ProbesDeferred:        uint64(s.probes_deferred),
		Fallbacks:             uint64(s.fallbacks),
		RelayIPChanges:        uint64(s.relay_ip_changes),
	}, nil
}
