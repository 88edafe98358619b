//! Where a peer's datagrams go: a typed [`Endpoint`] (UDP to an address, or
//! the websocket relay to the peer's key), and the [`PeerPath`] it implies.
//!
//! Inside the engine an endpoint is always this enum; the relay never hides
//! behind an address. Only at the UAPI/stats edge (what `wg show` prints) a
//! relayed peer shows a reserved endpoint in the IPv6 discard prefix
//! `100::/64` (RFC 6666), `[100::<peer index>]:0` ([`relay_endpoint`]), so
//! tools that know nothing of the relay still print something true.
//!
//! Shaped after wireguard-go's `conn.Endpoint`: the transport that received
//! a datagram says where it came from, and the peer keeps the last source
//! that authenticated (roaming). A peer holds one endpoint today; NAT
//! traversal will hold several candidates of this same type.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

use crate::config::PublicKey;

/// Where one datagram came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A UDP address (IPv4 addresses in their plain form, never mapped).
    Udp(SocketAddr),
    /// The websocket relay, to or from the mailbox of this key. For a
    /// peer's own endpoint the key is the peer's: sending needs no lookup.
    Relay(PublicKey),
}

impl Endpoint {
    pub fn path(&self) -> PeerPath {
        match self {
            Endpoint::Udp(_) => PeerPath::Udp,
            Endpoint::Relay(_) => PeerPath::Relay,
        }
    }

    pub fn udp(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Udp(a) => Some(*a),
            Endpoint::Relay(_) => None,
        }
    }

    /// The address cookies (WireGuard's MAC2) are bound to. For the relay
    /// that is an address in `100::/64` made from the source key: the
    /// relay authenticates the key each frame came from, as UDP's source
    /// address would be checked by a cookie round trip.
    pub fn cookie_addr(&self) -> IpAddr {
        match self {
            Endpoint::Udp(a) => a.ip(),
            Endpoint::Relay(k) => {
                let b = k.as_bytes();
                let s = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, s(0), s(2), s(4), s(6)))
            }
        }
    }

    /// What the UAPI and stats show for a peer with `index` on this
    /// endpoint (see [`relay_endpoint`]).
    pub fn to_uapi(&self, index: u32) -> SocketAddr {
        match self {
            Endpoint::Udp(a) => *a,
            Endpoint::Relay(_) => relay_endpoint(index),
        }
    }

    /// An endpoint set through the UAPI for the peer `key`: the reserved
    /// relay form stands for the relay, as [`Endpoint::to_uapi`] prints it.
    pub fn from_uapi(addr: SocketAddr, key: PublicKey) -> Endpoint {
        match relay_index(addr) {
            Some(_) => Endpoint::Relay(key),
            None => Endpoint::Udp(addr),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Endpoint {
        Endpoint::Udp(a)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Udp(a) => a.fmt(f),
            Endpoint::Relay(k) => write!(f, "relay:{k}"),
        }
    }
}

/// How a peer's datagrams travel now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerPath {
    Udp,
    Relay,
}

impl PeerPath {
    /// The path of an endpoint as the UAPI/stats edge shows it.
    pub fn of(endpoint: Option<SocketAddr>) -> PeerPath {
        match endpoint.and_then(relay_index) {
            Some(_) => PeerPath::Relay,
            None => PeerPath::Udp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PeerPath::Udp => "udp",
            PeerPath::Relay => "relay",
        }
    }
}

/// The endpoint the UAPI shows for "through the relay" for the peer with
/// `index` (the 24-bit index of [`super::Peer::index`]).
pub fn relay_endpoint(index: u32) -> SocketAddr {
    let ip = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, (index >> 16) as u16, index as u16);
    SocketAddr::V6(SocketAddrV6::new(ip, 0, 0, 0))
}

/// The peer index a UAPI relay endpoint stands for; `None` for real addresses.
pub fn relay_index(endpoint: SocketAddr) -> Option<u32> {
    let SocketAddr::V6(a) = endpoint else {
        return None;
    };
    let s = a.ip().segments();
    if a.port() != 0 || s[..6] != [0x100, 0, 0, 0, 0, 0] {
        return None;
    }
    let index = (u32::from(s[6]) << 16) | u32::from(s[7]);
    (index <= 0x00ff_ffff).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_endpoints_round_trip_and_real_addresses_are_not_relay() {
        for i in [0, 1, 0xabcd, 0x12_3456, 0xff_ffff] {
            let e = relay_endpoint(i);
            assert_eq!(relay_index(e), Some(i));
            assert_eq!(PeerPath::of(Some(e)), PeerPath::Relay);
        }
        assert_eq!(relay_endpoint(0x12_3456).to_string(), "[100::12:3456]:0");
        for real in [
            "10.0.0.1:0",
            "[100::1]:51820",
            "[100:0:0:1::1]:0",
            "[::1]:0",
        ] {
            let a: SocketAddr = real.parse().unwrap();
            assert_eq!(relay_index(a), None, "{real}");
            assert_eq!(PeerPath::of(Some(a)), PeerPath::Udp);
        }
        assert_eq!(relay_index("[100::100:0]:0".parse().unwrap()), None);
        assert_eq!(PeerPath::of(None), PeerPath::Udp);
    }

    #[test]
    fn typed_endpoints_meet_the_uapi_form_only_at_the_edge() {
        let key = PublicKey::from_bytes([7u8; 32]);
        let relay = Endpoint::Relay(key);
        assert_eq!(relay.to_uapi(0x12_3456).to_string(), "[100::12:3456]:0");
        assert_eq!(Endpoint::from_uapi(relay.to_uapi(5), key), relay);
        let udp: SocketAddr = "10.0.0.1:51820".parse().unwrap();
        assert_eq!(Endpoint::from_uapi(udp, key), Endpoint::Udp(udp));
        assert_eq!(relay.path(), PeerPath::Relay);
        assert_eq!(Endpoint::Udp(udp).path(), PeerPath::Udp);
        // Cookies for relayed sources differ per source key.
        let other = Endpoint::Relay(PublicKey::from_bytes([8u8; 32]));
        assert_ne!(relay.cookie_addr(), other.cookie_addr());
    }
}
