package meshvpn

// #include <meshvpn.h>
import "C"

import (
	"net/netip"
	"unsafe"
)

// Config describes an engine, as a wg-quick file does.
type Config struct {
	// PrivateKey is the engine's key; nil starts it without one (see
	// Engine.SetPrivateKey).
	PrivateKey *Key
	// ListenPort is the UDP port; 0 picks a free one (Engine.ListenPort
	// tells which).
	ListenPort uint16
	// Addresses are the host's own mesh addresses (Address =).
	Addresses []netip.Prefix
	// MTU is the inner MTU; 0 means 1420.
	MTU uint16
	// FwMark is SO_MARK for the UDP sockets; 0 means none.
	FwMark uint32
	Peers  []PeerConfig
}

// PeerConfig is one [Peer] section.
type PeerConfig struct {
	PublicKey    Key
	PresharedKey *Key // nil: none
	AllowedIPs   []netip.Prefix
	// Endpoint is "192.0.2.1:51820", "[2001:db8::1]:51820" or
	// "host:51820" (resolved once, when the peer is added); "" for none.
	Endpoint string
	// PersistentKeepalive is in seconds; 0 disables it.
	PersistentKeepalive uint16
}

// PeerUpdate changes some settings of one peer; fields left nil/false are
// kept as they are.
type PeerUpdate struct {
	PublicKey Key
	// Create adds the peer if it does not exist (otherwise updating an
	// unknown peer fails with ErrNoSuchPeer).
	Create              bool
	Endpoint            *string
	PersistentKeepalive *uint16
	// SetPresharedKey applies PresharedKey (nil removes the key).
	SetPresharedKey bool
	PresharedKey    *Key
	// ReplaceAllowedIPs drops the peer's AllowedIPs before adding
	// AllowedIPs; without it AllowedIPs are added.
	ReplaceAllowedIPs bool
	AllowedIPs        []netip.Prefix
}

func prefixStrings(ps []netip.Prefix) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

func (a *arena) optKey(k *Key) *C.meshvpn_key {
	if k == nil {
		return nil
	}
	return a.key(*k)
}

func (a *arena) optStr(s string) *C.char {
	if s == "" {
		return nil
	}
	return a.str(s)
}

func (a *arena) peer(dst *C.meshvpn_peer_config, p *PeerConfig) {
	dst.public_key = p.PublicKey.c()
	dst.preshared_key = a.optKey(p.PresharedKey)
	dst.allowed_ips, dst.allowed_ips_len = a.strs(prefixStrings(p.AllowedIPs))
	dst.endpoint = a.optStr(p.Endpoint)
	dst.persistent_keepalive = C.uint16_t(p.PersistentKeepalive)
}

// config builds the C struct; every pointer in it is C memory owned by a.
func (a *arena) config(c *Config) *C.meshvpn_config {
	out := (*C.meshvpn_config)(a.alloc(int(unsafe.Sizeof(C.meshvpn_config{}))))
	out.private_key = a.optKey(c.PrivateKey)
	out.listen_port = C.uint16_t(c.ListenPort)
	out.addresses, out.addresses_len = a.strs(prefixStrings(c.Addresses))
	out.mtu = C.uint16_t(c.MTU)
	out.fwmark = C.uint32_t(c.FwMark)
	if n := len(c.Peers); n > 0 {
		size := int(unsafe.Sizeof(C.meshvpn_peer_config{}))
		peers := unsafe.Slice((*C.meshvpn_peer_config)(a.alloc(n*size)), n)
		for i := range c.Peers {
			a.peer(&peers[i], &c.Peers[i])
		}
		out.peers, out.peers_len = &peers[0], C.size_t(n)
	}
	return out
}

func (a *arena) update(u *PeerUpdate) *C.meshvpn_peer_update {
	out := (*C.meshvpn_peer_update)(a.alloc(int(unsafe.Sizeof(C.meshvpn_peer_update{}))))
	out.public_key = u.PublicKey.c()
	var flags C.uint32_t
	if u.Create {
		flags |= C.MESHVPN_PEER_UPDATE_CREATE
	}
	if u.Endpoint != nil {
		flags |= C.MESHVPN_PEER_UPDATE_ENDPOINT
		out.endpoint = a.str(*u.Endpoint)
	}
	if u.PersistentKeepalive != nil {
		flags |= C.MESHVPN_PEER_UPDATE_KEEPALIVE
		out.persistent_keepalive = C.uint16_t(*u.PersistentKeepalive)
	}
	if u.SetPresharedKey {
		flags |= C.MESHVPN_PEER_UPDATE_PRESHARED_KEY
		out.preshared_key = a.optKey(u.PresharedKey)
	}
	if u.ReplaceAllowedIPs {
		flags |= C.MESHVPN_PEER_UPDATE_REPLACE_ALLOWED_IPS
	}
	out.flags = flags
	out.allowed_ips, out.allowed_ips_len = a.strs(prefixStrings(u.AllowedIPs))
	return out
}
