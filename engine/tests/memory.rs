//! Memory bounds: configured idle peers are cheap (their protocol state is
//! made on first use), and packets held in queues stop at the engine's
//! buffer ceiling. These are sizes, not timings.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::{udp_packet, wait_until};
use meshvpn_engine::peer::DropReason;
use meshvpn_engine::router::IpPrefix;
use meshvpn_engine::wg::DEFAULT_BUFFER_LIMIT;
use meshvpn_engine::{Config, Engine, InterfaceConfig, PeerConfig, PrivateKey, SendError};

fn engine() -> Engine {
    Engine::new(&Config {
        interface: InterfaceConfig {
            private_key: Some(PrivateKey::generate()),
            listen_port: Some(0),
            ..Default::default()
        },
        peers: Vec::new(),
    })
    .unwrap()
}

/// Resident set size of this process, from /proc/self/status.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn peer(i: u32, endpoint: SocketAddr) -> PeerConfig {
    let ip = Ipv4Addr::from(0x0a00_0000 + i);
    PeerConfig {
        public_key: PrivateKey::generate().public_key(),
        preshared_key: None,
        allowed_ips: vec![IpPrefix::new(IpAddr::V4(ip), 32).unwrap()],
        endpoint: Some(endpoint),
        persistent_keepalive: None,
    }
}

/// The bound: 10,000 configured idle peers in 64 MiB resident,
/// for the whole test process.
#[test]
fn ten_thousand_idle_peers_fit_in_64_mib() {
    let e = engine();
    let endpoint: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let before = rss_bytes();
    for i in 0..10_000 {
        e.add_peer(&peer(i + 1, endpoint)).unwrap();
    }
    // Timer ticks run over every peer and must not make their state.
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_bytes();
    assert_eq!(e.peer_keys().len(), 10_000);
    eprintln!(
        "RSS: {} KiB before, {} KiB with 10,000 peers ({} bytes per peer)",
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) / 10_000
    );
    assert!(
        after < 64 << 20,
        "resident {} MiB with 10,000 idle peers",
        after >> 20
    );
    // A peer still works when first used: a packet to it makes its state
    // and starts a handshake (queued behind it, so accepted).
    let p = udp_packet(
        "10.99.0.1".parse().unwrap(),
        "10.0.0.7".parse().unwrap(),
        100,
        1,
    );
    assert_eq!(e.send_packet(&p), Ok(()));
}

/// Packets waiting behind a handshake that never completes stop at the
/// ceiling: the rest are dropped and counted, and the reservation is
/// returned when the peer goes.
#[test]
fn packets_queued_behind_a_handshake_stop_at_the_buffer_limit() {
    let e = engine();
    assert_eq!(e.buffer_limit(), DEFAULT_BUFFER_LIMIT);
    // A peer that never answers: a bound socket nobody reads.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut peers = Vec::new();
    for i in 0..4 {
        let cfg = peer(i + 1, silent.local_addr().unwrap());
        e.add_peer(&cfg).unwrap();
        peers.push(cfg.public_key);
    }
    e.set_buffer_limit(20_000);
    let mut dropped = 0;
    for n in 0..200u32 {
        let dst = IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + n % 4));
        let p = udp_packet("10.99.0.1".parse().unwrap(), dst, 972, n as u8);
        assert_eq!(p.len(), 1000);
        match e.send_packet(&p) {
            Ok(()) => {}
            Err(SendError::Dropped(DropReason::SinkFull)) => dropped += 1,
            Err(other) => panic!("packet {n}: {other}"),
        }
        assert!(e.buffered_bytes() <= 20_000);
    }
    assert_eq!(e.buffered_bytes(), 20_000, "20 packets of 1000 bytes held");
    assert_eq!(dropped, 180);
    assert_eq!(e.stats().buffer_limit_drops, 180);
    let sink_full: u64 = peers
        .iter()
        .map(|k| e.peer_stats(k).unwrap().drops(DropReason::SinkFull))
        .sum();
    assert_eq!(sink_full, 180);
    for k in &peers {
        e.remove_peer(k);
    }
    assert!(wait_until(Duration::from_secs(2), || e.buffered_bytes() == 0));
}

/// Decrypted packets the host does not read count against the same
/// ceiling; reading them gives the room back.
#[test]
fn unread_host_packets_stop_at_the_buffer_limit() {
    let nodes = common::mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let first = udp_packet(a.v4, b.v4, 100, 0);
    assert!(common::send_and_receive(&a.engine, &b.engine, &first).is_some());
    b.engine.set_buffer_limit(10 * 1000);
    for n in 0..30u8 {
        let p = udp_packet(a.v4, b.v4, 972, n);
        a.engine.send_packet(&p).unwrap();
        // Paced so the loopback socket never overflows.
        std::thread::sleep(Duration::from_millis(2));
    }
    let key = a.key.public_key();
    assert!(wait_until(Duration::from_secs(5), || {
        b.engine
            .peer_stats(&key)
            .unwrap()
            .drops(DropReason::SinkFull)
            == 20
    }));
    assert_eq!(b.engine.buffered_bytes(), 10 * 1000);
    let mut read = 0;
    while b.engine.recv_packet(Duration::from_millis(100)).is_some() {
        read += 1;
    }
    assert_eq!(read, 10);
    assert_eq!(b.engine.buffered_bytes(), 0);
    assert_eq!(b.engine.stats().buffer_limit_drops, 20);
}
