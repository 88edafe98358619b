//! Configuration: keys, interface and peer specs, the wg-quick `.conf` format
//! and the WireGuard UAPI text protocol.
//!
//! Pure data and text: nothing here opens a socket or reads the clock. DNS
//! names in `Endpoint =` are the one exception to "no I/O", and only through
//! the resolver the caller passes in.

mod conf;
mod key;
pub mod uapi;

use std::net::SocketAddr;

pub use conf::{emit_wg_quick, parse_wg_quick, parse_wg_quick_with, ConfError};
pub use key::{KeyError, PresharedKey, PrivateKey, PublicKey, KEY_LEN};

use crate::router::IpPrefix;

/// The `[Interface]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub private_key: Option<PrivateKey>,
    /// 0 or `None` picks a free port.
    pub listen_port: Option<u16>,
    /// The host's own mesh addresses (used by the userspace stack and by
    /// wg-quick to configure a TUN device).
    pub addresses: Vec<IpPrefix>,
    pub mtu: Option<u16>,
    pub fwmark: Option<u32>,
}

/// One `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub allowed_ips: Vec<IpPrefix>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives; `None` or 0 disables them.
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    pub fn new(public_key: PublicKey) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            allowed_ips: Vec::new(),
            endpoint: None,
            persistent_keepalive: None,
        }
    }
}

/// A whole device configuration, as in a wg-quick `.conf` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
}

/// The default inner MTU, as wg-quick picks for a 1500-byte underlay.
pub const DEFAULT_MTU: u16 = 1420;
