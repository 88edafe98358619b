//! Which transport carries a peer's datagrams: UDP to its endpoint, or the
//! websocket relay. A peer on the relay has a reserved endpoint in the IPv6
//! discard prefix `100::/64` (RFC 6666), `[100::<peer index>]:0`, so `wg
//! show` and the UAPI show "via relay" without a new field, and WireGuard's
//! roaming moves the peer between paths by itself: a datagram that
//! authenticates through the relay sets this endpoint, one that
//! authenticates over UDP sets the UDP address.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

/// How a peer's datagrams travel now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerPath {
    Udp,
    Relay,
}

impl PeerPath {
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

/// The endpoint standing for "through the relay" for the peer with
/// `index` (the 24-bit index of [`super::Peer::index`]).
pub fn relay_endpoint(index: u32) -> SocketAddr {
    let ip = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, (index >> 16) as u16, index as u16);
    SocketAddr::V6(SocketAddrV6::new(ip, 0, 0, 0))
}

/// The peer index a relay endpoint stands for; `None` for real addresses.
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
}
