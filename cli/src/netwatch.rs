//! The daemon notices when this host's own addresses change (DHCP renewal,
//! a cloud VM's new public IP, a laptop on another network) and starts a
//! handshake with every peer at once. WireGuard's roaming then points each
//! peer at the new address as soon as that handshake arrives, so traffic
//! *towards* this node resumes within about a second instead of waiting for
//! this node's own traffic or its next persistent keepalive (25 s for
//! flannel). This is what Tailscale does on a link change; wireguard-go
//! leaves it to the keepalive.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshvpn_engine::Engine;

/// How often the host's addresses are compared with the last seen ones.
pub const ADDRESS_CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct AddressWatch {
    ifname: String,
    last: Option<Vec<IpAddr>>,
    next: Instant,
}

impl AddressWatch {
    pub fn new(ifname: &str) -> AddressWatch {
        AddressWatch {
            ifname: ifname.to_owned(),
            last: None,
            next: Instant::now(),
        }
    }

    /// Every address of the host except loopback, link-local and those on
    /// our own interface, sorted.
    fn host_addresses(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .into_iter()
            .flatten()
            .filter(|a| a.interface_name != self.ifname)
            .filter_map(|a| {
                let s = a.address?;
                if let Some(v4) = s.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .filter(|ip| match ip {
                IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
                IpAddr::V6(a) => !a.is_loopback() && a.segments()[0] & 0xffc0 != 0xfe80,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn tick(&mut self, engine: &Engine) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + ADDRESS_CHECK_EVERY;
        let now = self.host_addresses();
        if self.last.as_ref().is_some_and(|last| *last != now) {
            let keys = engine.peer_keys();
            tracing::info!(
                peers = keys.len(),
                "host addresses changed: handshaking with every peer"
            );
            for k in keys {
                let _ = engine.initiate_handshake(&k);
            }
        }
        self.last = Some(now);
    }
}
