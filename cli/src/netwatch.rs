//! The daemon notices when this host's own addresses change (DHCP renewal,
//! a cloud VM's new public IP, a laptop on another network), reconnects
//! the relay, asks the STUN servers for its public address again and starts a handshake with every peer at once. WireGuard's roaming then points each
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

/// Every address of the host except loopback, link-local, unspecified and
/// those on interface `exclude` (the mesh's own), sorted.
pub fn host_addresses(exclude: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter(|a| a.interface_name != exclude)
        .filter_map(|a| {
            let s = a.address?;
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
            IpAddr::V6(a) => {
                !a.is_loopback() && a.segments()[0] & 0xffc0 != 0xfe80 && !a.is_unspecified()
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

impl AddressWatch {
    pub fn new(ifname: &str) -> AddressWatch {
        AddressWatch {
            ifname: ifname.to_owned(),
            last: None,
            next: Instant::now(),
        }
    }

    pub fn tick(&mut self, engine: &Engine) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + ADDRESS_CHECK_EVERY;
        let now = host_addresses(&self.ifname);
        self.observe(now, engine);
    }

    /// Compares the host's addresses with the last seen ones; on a change
    /// reconnects the relay and handshakes with every peer. True when they
    /// changed.
    fn observe(&mut self, now: Vec<IpAddr>, engine: &Engine) -> bool {
        let changed = self.last.as_ref().is_some_and(|last| *last != now);
        if changed {
            let keys = engine.peer_keys();
            // The relay's websocket may ride an address that went away;
            // nothing would notice before its 60 s idle timeout, and a
            // peer on the relay would be cut off for that long. Tailscale
            // redials DERP on a link change for the same reason.
            let relay = engine.reconnect_relay();
            // The public (server-reflexive) address may have changed with
            // them: ask the STUN servers again now, not at the next 30 s
            // round (a no-op when discovery is off).
            engine.rediscover();
            tracing::info!(
                peers = keys.len(),
                relay,
                "host addresses changed: handshaking with every peer"
            );
            for k in keys {
                let _ = engine.initiate_handshake(&k);
            }
        }
        self.last = Some(now);
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::any::Any;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use meshvpn_engine::config::{Config, InterfaceConfig, PeerConfig, PrivateKey};
    use meshvpn_engine::peer::Endpoint;
    use meshvpn_engine::wg::{RelayTransport, Transport, Unsent};

    use super::*;

    /// A relay that only counts what the engine asks of it.
    #[derive(Default)]
    struct CountingRelay {
        reconnects: AtomicUsize,
    }

    impl Transport for CountingRelay {
        fn send_batch(&self, _: &[u8], _: usize, _: &Endpoint) -> Result<(), Unsent> {
            Ok(())
        }
    }

    impl RelayTransport for CountingRelay {
        fn is_up(&self) -> bool {
            true
        }
        fn rekeyed(&self) {}
        fn reconnect(&self) {
            self.reconnects.fetch_add(1, Ordering::SeqCst);
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_change_reconnects_the_relay() {
        let engine = Engine::new(&Config {
            interface: InterfaceConfig {
                private_key: Some(PrivateKey::generate()),
                listen_port: Some(0),
                ..Default::default()
            },
            peers: vec![PeerConfig::new(PrivateKey::generate().public_key())],
        })
        .unwrap();
        let relay = Arc::new(CountingRelay::default());
        engine
            .attach_relay(relay.clone(), Duration::from_secs(5))
            .unwrap();
        let mut watch = AddressWatch::new("mvtest0");
        let reconnects = || relay.reconnects.load(Ordering::SeqCst);

        assert!(!watch.observe(vec![ip("10.240.0.3")], &engine));
        assert!(!watch.observe(vec![ip("10.240.0.3")], &engine));
        assert_eq!(reconnects(), 0, "no change, no reconnect");

        assert!(watch.observe(vec![ip("10.240.0.13")], &engine));
        assert_eq!(
            reconnects(),
            1,
            "the relay's websocket may ride the address that went away: \
             a new address must reconnect it at once"
        );
        assert!(!watch.observe(vec![ip("10.240.0.13")], &engine));
        assert_eq!(reconnects(), 1);
        engine.close();
    }
}
