//! Two engines in one process over loopback UDP, through the packet API:
//! `send_packet` on one, `recv_packet` on the other, in bursts of 64
//! packets of 1420 bytes (the default inner MTU).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshvpn_engine::{Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PrivateKey};

const BURST: usize = 64;
const SIZE: usize = 1420;

fn engine(key: &PrivateKey) -> Engine {
    Engine::new(&Config {
        interface: InterfaceConfig {
            private_key: Some(key.clone()),
            listen_port: Some(0),
            ..Default::default()
        },
        peers: vec![],
    })
    .unwrap()
}

fn peer(of: &PrivateKey, port: u16, inner: &str) -> PeerConfig {
    let mut p = PeerConfig::new(of.public_key());
    p.endpoint = Some(SocketAddr::new("127.0.0.1".parse().unwrap(), port));
    p.allowed_ips = vec![IpPrefix::host(inner.parse::<IpAddr>().unwrap())];
    p
}

fn bench(c: &mut Criterion) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (a, b) = (engine(&ka), engine(&kb));
    a.add_peer(&peer(&kb, b.listen_port(), "10.0.0.2")).unwrap();
    b.add_peer(&peer(&ka, a.listen_port(), "10.0.0.1")).unwrap();
    let packet = meshvpn_benches::ipv4_packet(SIZE);
    a.send_packet(&packet).unwrap();
    assert!(
        b.recv_packet(Duration::from_secs(5)).is_some(),
        "no handshake"
    );
    let mut g = c.benchmark_group("two_engines_loopback");
    g.throughput(Throughput::Bytes((BURST * SIZE) as u64));
    let mut lost = 0u64;
    g.bench_function(format!("burst{BURST}x{SIZE}"), |bench| {
        bench.iter(|| {
            for _ in 0..BURST {
                a.send_packet(&packet).unwrap();
            }
            for _ in 0..BURST {
                if b.recv_packet(Duration::from_millis(200)).is_none() {
                    lost += 1;
                    break;
                }
            }
        })
    });
    g.finish();
    if lost > 0 {
        println!("two_engines_loopback: {lost} bursts lost packets (loopback UDP overflow)");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
