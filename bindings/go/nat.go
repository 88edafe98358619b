package meshvpn

// #include <meshvpn.h>
import "C"

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"time"
)

// NATPath is one path to a peer: Kind "udp" with Address a host:port, or
// "relay" with Address the base64 key of the relay mailbox.
type NATPath struct {
	Kind    string `json:"kind"`
	Address string `json:"address"`
}

// NATRTT is the last round trip measured on one path; Answered is false
// when the measurement went unanswered.
type NATRTT struct {
	Path     NATPath
	RTT      time.Duration
	Answered bool
}

// NATPeer is the NAT traversal state of one peer.
type NATPeer struct {
	PublicKey string
	// Path is the path chosen now; nil until the peer has one.
	Path *NATPath
	// Candidates are the peer's addresses as it last sent them.
	Candidates []netip.AddrPort
	// ProbesSent counts probe datagrams (rounds and measurements);
	// ProbeRounds the rounds, MeasuresSent the measurements.
	ProbesSent, ProbeRounds, MeasuresSent uint64
	// RTTSwitches counts moves for a lower round trip, Fallbacks direct
	// paths given up for the relay.
	RTTSwitches, Fallbacks uint64
	// RTTs holds the last round trip per path.
	RTTs []NATRTT
}

// NATDiscovery counts the engine's STUN exchanges.
type NATDiscovery struct {
	Requests           uint64 `json:"requests"`
	Retransmits        uint64 `json:"retransmits"`
	Answers            uint64 `json:"answers"`
	ErrorResponses     uint64 `json:"error_responses"`
	Timeouts           uint64 `json:"timeouts"`
	NotSTUN            uint64 `json:"not_stun"`
	Malformed          uint64 `json:"malformed"`
	UnknownSource      uint64 `json:"unknown_source"`
	UnknownTransaction uint64 `json:"unknown_transaction"`
}

// NATStatus is an engine's NAT traversal state.
type NATStatus struct {
	// STUNServers are the servers discovery asks.
	STUNServers []netip.AddrPort
	// Reflexive is this node's address as STUN saw it (invalid until found).
	Reflexive netip.AddrPort
	// Candidates are the addresses this node announces to its peers:
	// local and server-reflexive.
	Candidates []netip.AddrPort
	Discovery  NATDiscovery
	Peers      []NATPeer
	// Pending holds candidates received from peers without path state yet.
	Pending map[string][]netip.AddrPort
	// Traffic holds, per peer public key (every peer, relay up or not),
	// bytes and time on direct UDP and on the relay.
	Traffic map[string]NATPathTraffic
	// SinceDiscovery is the time since the last STUN discovery round
	// started; DiscoveryRan is false (and SinceDiscovery 0) before the
	// first round or with STUN off.
	SinceDiscovery time.Duration
	DiscoveryRan   bool
	// RelayObserved is the address the relay sees this node's session
	// come from: its NAT's public address (invalid before a relay told
	// one; older relays do not).
	RelayObserved netip.AddrPort
	// RelayIPChanges counts the times RelayObserved's IP changed between
	// sessions (each started a STUN round); NATStats has it too.
	RelayIPChanges uint64
}

// NATPathUse is one peer's traffic and time on one path kind.
type NATPathUse struct {
	// TxBytes and RxBytes count WireGuard datagrams (handshakes, probes
	// and keepalives included), as Stats' transfer does.
	TxBytes uint64 `json:"tx_bytes"`
	RxBytes uint64 `json:"rx_bytes"`
	// Time the peer's endpoint was of this kind, the current stretch
	// included.
	Time   time.Duration `json:"-"`
	TimeMs uint64        `json:"time_ms"`
}

// NATPathTraffic is one peer's traffic split by path kind.
type NATPathTraffic struct {
	Direct, Relay NATPathUse
}

type natPathUseJSON struct {
	TxBytes uint64 `json:"tx_bytes"`
	RxBytes uint64 `json:"rx_bytes"`
	TimeMs  uint64 `json:"time_ms"`
}

func (u natPathUseJSON) use() NATPathUse {
	return NATPathUse{TxBytes: u.TxBytes, RxBytes: u.RxBytes, Time: time.Duration(u.TimeMs) * time.Millisecond}
}

type natStatusJSON struct {
	DiscoveryAgeMs *uint64 `json:"discovery_age_ms"`
	Traffic        []struct {
		PublicKey string         `json:"public_key"`
		Direct    natPathUseJSON `json:"direct"`
		Relay     natPathUseJSON `json:"relay"`
	} `json:"traffic"`
	STUNServers []netip.AddrPort `json:"stun_servers"`
	Reflexive   *netip.AddrPort  `json:"reflexive"`
	Candidates  []netip.AddrPort `json:"candidates"`
	Discovery   NATDiscovery     `json:"discovery"`
	Stats       struct {
		RelayIPChanges uint64 `json:"relay_ip_changes"`
	} `json:"stats"`
	RelayObserved *netip.AddrPort `json:"relay_observed"`
	Peers         []struct {
		PublicKey    string           `json:"public_key"`
		Path         *NATPath         `json:"path"`
		Candidates   []netip.AddrPort `json:"candidates"`
		ProbesSent   uint64           `json:"probes_sent"`
		ProbeRounds  uint64           `json:"probe_rounds"`
		MeasuresSent uint64           `json:"measures_sent"`
		RTTSwitches  uint64           `json:"rtt_switches"`
		Fallbacks    uint64           `json:"fallbacks"`
		RTTs         []struct {
			Path  NATPath `json:"path"`
			RTTUs *uint64 `json:"rtt_us"`
		} `json:"rtts"`
	} `json:"peers"`
	Pending []struct {
		PublicKey  string           `json:"public_key"`
		Candidates []netip.AddrPort `json:"candidates"`
	} `json:"pending_candidates"`
}

// NATStatus returns the engine's NAT traversal state: its own candidates,
// what STUN found, and per peer the path, candidates, probes and round
// trips. An error matching net.ErrClosed after Close.
func (e *Engine) NATStatus() (NATStatus, error) {
	text, err := e.textOut("Engine.NATStatus", func(h *C.meshvpn_engine, buf *C.char, n C.size_t, got *C.size_t) C.meshvpn_result {
		return C.meshvpn_engine_nat_status(h, buf, n, got)
	})
	if err != nil {
		return NATStatus{}, err
	}
	var j natStatusJSON
	if err := json.Unmarshal([]byte(text), &j); err != nil {
		return NATStatus{}, fmt.Errorf("meshvpn: Engine.NATStatus: %w", err)
	}
	s := NATStatus{
		STUNServers: j.STUNServers,
		Candidates:  j.Candidates,
		Discovery:   j.Discovery,
		Pending:     map[string][]netip.AddrPort{},
		Traffic:     map[string]NATPathTraffic{},
	}
	if j.DiscoveryAgeMs != nil {
		s.SinceDiscovery, s.DiscoveryRan = time.Duration(*j.DiscoveryAgeMs)*time.Millisecond, true
	}
	for _, t := range j.Traffic {
		s.Traffic[t.PublicKey] = NATPathTraffic{Direct: t.Direct.use(), Relay: t.Relay.use()}
	}
	if j.Reflexive != nil {
		s.Reflexive = *j.Reflexive
	}
	if j.RelayObserved != nil {
		s.RelayObserved = *j.RelayObserved
	}
	s.RelayIPChanges = j.Stats.RelayIPChanges
	for _, p := range j.Peers {
		np := NATPeer{
			PublicKey: p.PublicKey, Path: p.Path, Candidates: p.Candidates,
			ProbesSent: p.ProbesSent, ProbeRounds: p.ProbeRounds, MeasuresSent: p.MeasuresSent,
			RTTSwitches: p.RTTSwitches, Fallbacks: p.Fallbacks,
		}
		for _, r := range p.RTTs {
			rtt := NATRTT{Path: r.Path}
			if r.RTTUs != nil {
				rtt.RTT, rtt.Answered = time.Duration(*r.RTTUs)*time.Microsecond, true
			}
			np.RTTs = append(np.RTTs, rtt)
		}
		s.Peers = append(s.Peers, np)
	}
	for _, p := range j.Pending {
		s.Pending[p.PublicKey] = p.Candidates
	}
	return s, nil
}

// SetSTUNServers sets the STUN servers discovery asks ("host:port" each),
// replacing the previous ones, and starts a discovery round at once; none
// stops discovery. The local address towards each server and the
// server-reflexive address found are the candidates the engine announces
// to its peers through the relay. A bad address fails with
// ErrEndpointInvalid.
func (e *Engine) SetSTUNServers(servers []string) error {
	var a arena
	defer a.free()
	list, n := a.strs(servers)
	return e.do("Engine.SetSTUNServers", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_set_stun_servers(h, list, n)
	})
}
