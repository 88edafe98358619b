//! Shared helpers for the benches and the allocation test: two `Peer`s
//! with a session between them, wired back to back in memory; two engines
//! on loopback; and a way to read criterion's medians back to print ratios.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use meshvpn_engine::peer::{output_buffer_len, Endpoint, Peer, PeerOutput};
use meshvpn_engine::wire::MessageKind;
use meshvpn_engine::{Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PrivateKey};

/// Two engines on loopback UDP, peers of each other, engine `i` owning
/// `10.0.0.(i+1)/32` (set as its `Address`; [`ipv4_packet`] goes from the
/// first to the second). Returns the engines and their
/// mesh addresses.
pub fn engine_pair() -> [(Arc<Engine>, IpAddr); 2] {
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let addrs: [IpAddr; 2] = ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
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

/// Two peers with an established session (A initiated).
pub struct PeerPair {
    pub a: Peer,
    pub b: Peer,
    pub addr_a: SocketAddr,
    pub addr_b: SocketAddr,
}

fn limiter(key: &PrivateKey) -> Arc<RateLimiter> {
    let public = boringtun::x25519::PublicKey::from(*key.public_key().as_bytes());
    Arc::new(RateLimiter::new(&public, u64::MAX / 2))
}

impl PeerPair {
    pub fn established() -> PeerPair {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let addr_a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let addr_b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut cb = PeerConfig::new(kb.public_key());
        cb.endpoint = Some(addr_b);
        let mut ca = PeerConfig::new(ka.public_key());
        ca.endpoint = Some(addr_a);
        let a = Peer::new(&ka, &cb, 1, limiter(&ka));
        let b = Peer::new(&kb, &ca, 2, limiter(&kb));
        let mut m1 = vec![0u8; 2048];
        let mut m2 = vec![0u8; 2048];
        let now = Instant::now();
        let PeerOutput::ToNetwork { len, .. } = a.initiate_handshake(now, &mut m1) else {
            panic!("no initiation");
        };
        let PeerOutput::ToNetwork { len, .. } = b.decapsulate(
            now,
            Endpoint::Udp(addr_a),
            MessageKind::HandshakeInitiation,
            &m1[..len],
            &mut m2,
        ) else {
            panic!("no response");
        };
        let PeerOutput::ToNetwork { len, .. } = a.decapsulate(
            now,
            Endpoint::Udp(addr_b),
            MessageKind::HandshakeResponse,
            &m2[..len],
            &mut m1,
        ) else {
            panic!("no keepalive");
        };
        let r = b.decapsulate(
            now,
            Endpoint::Udp(addr_a),
            MessageKind::Data,
            &m1[..len],
            &mut m2,
        );
        assert_eq!(r, PeerOutput::Done, "keepalive");
        PeerPair {
            a,
            b,
            addr_a,
            addr_b,
        }
    }

    /// One packet A -> B: encrypt into `wire`, decrypt into `inner`.
    /// Returns the decrypted length.
    #[inline]
    pub fn round(&self, packet: &[u8], wire: &mut [u8], inner: &mut [u8]) -> usize {
        // One clock read per packet, as the engine's send path reads it
        // once per batch at most.
        let now = Instant::now();
        let PeerOutput::ToNetwork { len, .. } = self.a.encapsulate(now, packet, wire) else {
            panic!("encapsulate failed");
        };
        match self.b.decapsulate(
            now,
            Endpoint::Udp(self.addr_a),
            MessageKind::Data,
            &wire[..len],
            inner,
        ) {
            PeerOutput::ToHost { len, .. } => len,
            other => panic!("decapsulate: {other:?}"),
        }
    }
}

/// Buffers big enough for `size`-byte packets.
pub fn buffers(size: usize) -> (Vec<u8>, Vec<u8>) {
    (
        vec![0u8; output_buffer_len(size)],
        vec![0u8; output_buffer_len(size)],
    )
}

/// An IPv4 packet of `size` bytes (at least 20) from 10.0.0.1 to 10.0.0.2.
pub fn ipv4_packet(size: usize) -> Vec<u8> {
    let mut p = vec![0x5au8; size.max(20)];
    p[0] = 0x45;
    p[1] = 0;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

/// The median (ns) criterion recorded for `group/id`, if it ran.
pub fn median_ns(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_string());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let at = text.find("\"median\"")?;
    let rest = &text[at..];
    let pe = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[pe..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse().ok()
}
