//! Shared helpers for the benches.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshvpn_engine::{Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PrivateKey};

/// Two engines on loopback UDP, peers of each other, engine `i` owning
/// `10.66.0.(i+1)/32` (set as its `Address`). Returns the engines and their
/// mesh addresses.
pub fn engine_pair() -> [(Arc<Engine>, IpAddr); 2] {
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let addrs: [IpAddr; 2] = ["10.66.0.1".parse().unwrap(), "10.66.0.2".parse().unwrap()];
    let engines: Vec<Arc<Engine>> = (0..2)
        .map(|i| {
            let cfg = Config {
                interface: InterfaceConfig {
                    private_key: Some(keys[i].clone()),
                    listen_port: Some(0),
                    addresses: vec![IpPrefix::host(addrs[i])],
                    ..Default::default()
                },
                peers: vec![],
            };
            Arc::new(Engine::new(&cfg).expect("engine starts"))
        })
        .collect();
    for (i, e) in engines.iter().enumerate() {
        let j = 1 - i;
        let mut p = PeerConfig::new(keys[j].public_key());
        p.endpoint = Some(SocketAddr::from(([127, 0, 0, 1], engines[j].listen_port())));
        p.allowed_ips = vec![IpPrefix::host(addrs[j])];
        e.add_peer(&p).expect("peer added");
    }
    [
        (engines[0].clone(), addrs[0]),
        (engines[1].clone(), addrs[1]),
    ]
}
