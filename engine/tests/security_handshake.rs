//! Handshake messages as an attacker sends them: flooded from one peer,
//! flooded from many spoofed addresses, and to low-order keys. (A replayed
//! initiation and forged initiations claiming a peer are protocol
//! behaviour only and are tested in simulated time in `device_sim.rs`.)
//! The per-second rate limits stay here: boringtun reads their second from
//! the real clock, which the simulation does not move.
//!
//! The sending side is the reference initiator (tests/common/initiator.rs)
//! on a plain UDP socket, so every field is the test's choice; the
//! receiving side is a real engine on loopback.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::initiator::Initiator;
use common::{fields, mesh, resident_kib, spoofed_sockets, udp_packet};
use meshvpn_engine::peer::DropReason;
use meshvpn_engine::{
    Config, Engine, EngineError, InterfaceConfig, IpPrefix, PeerConfig, PeerUpdate, PrivateKey,
    PublicKey,
};

/// An engine with one peer whose private key the test holds, reachable at
/// a UDP socket the test reads.
struct Fixture {
    engine: Engine,
    peer_key: PrivateKey,
    sock: UdpSocket,
    to_engine: SocketAddr,
}

impl Fixture {
    fn new() -> Fixture {
        let own = PrivateKey::generate();
        let peer_key = PrivateKey::generate();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut p = PeerConfig::new(peer_key.public_key());
        p.endpoint = Some(sock.local_addr().unwrap());
        p.allowed_ips = vec!["10.9.0.2/32".parse().unwrap()];
        let engine = Engine::new(&Config {
            interface: InterfaceConfig {
                private_key: Some(own),
                listen_port: Some(0),
                ..Default::default()
            },
            peers: vec![p],
        })
        .unwrap();
        let to_engine = format!("127.0.0.1:{}", engine.listen_port())
            .parse()
            .unwrap();
        Fixture {
            engine,
            peer_key,
            sock,
            to_engine,
        }
    }

    fn initiator(&self) -> Initiator {
        let own = self.engine.public_key().unwrap();
        Initiator::new(*self.peer_key.as_bytes(), *own.as_bytes(), None)
    }

    fn stats(&self) -> meshvpn_engine::peer::PeerStats {
        self.engine.peer_stats(&self.peer_key.public_key()).unwrap()
    }
}

#[test]
fn initiations_every_5ms_from_one_peer_are_processed_at_most_50_per_second() {
    let f = Fixture::new();
    let mut init = f.initiator();
    f.sock.set_nonblocking(true).unwrap();
    let mut responses = 0u64;
    let mut cookies = 0u64;
    let mut buf = [0u8; 2048];
    // 200 initiations (made beforehand: X25519 in a debug build is slow),
    // then sent one every 5 ms: about one second.
    let msgs: Vec<[u8; 148]> = (0..200u64)
        .map(|i| init.initiation(&fields(i as u32, i)))
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    for msg in &msgs {
        f.sock.send_to(msg, f.to_engine).unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_millis(5));
        while let Ok(n) = f.sock.recv(&mut buf) {
            match buf[0] {
                2 if n == 92 => responses += 1,
                3 if n == 64 => cookies += 1,
                _ => {}
            }
        }
    }
    // Wait until the engine has dealt with every initiation: the flood
    // guard runs on processing time, so the bound uses the time the last
    // one was processed, not the time it was sent.
    let accounted = |responses: u64| {
        let d = f.stats();
        responses
            + d.drops(DropReason::HandshakeFlood)
            + d.drops(DropReason::HandshakeRejected)
            + f.engine.stats().cookie_replies_sent
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while accounted(responses) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        while let Ok(n) = f.sock.recv(&mut buf) {
            match buf[0] {
                2 if n == 92 => responses += 1,
                3 if n == 64 => cookies += 1,
                _ => {}
            }
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(accounted(responses), sent, "{:?}", f.stats());
    // One initiation per 20 ms window at most (the kernel's 50/s).
    let bound = elapsed.as_millis() as u64 / 20 + 1;
    let flood = f.stats().drops(DropReason::HandshakeFlood);
    eprintln!(
        "sent {sent}, all processed after {elapsed:?}: {responses} responses, \
         {cookies} cookie replies, {flood} flood drops"
    );
    assert!(responses <= bound, "{responses} responses > {bound}");
    assert!(responses >= 5, "the peer was locked out entirely");
    assert!(flood > 0, "the flood guard never acted");
}

#[test]
fn spoofed_initiation_flood_gets_cookie_replies_while_a_real_peer_connects() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let b_pub = *b.key.public_key().as_bytes();
    let to_b: SocketAddr = format!("127.0.0.1:{}", b.engine.listen_port())
        .parse()
        .unwrap();
    let spoofers = spoofed_sockets(32);
    // Initiations with a valid MAC1 from identities b does not know:
    // they pass the cheap check, so only the rate limit protects b.
    let flood: Vec<[u8; 148]> = (0..64)
        .map(|i| {
            let mut stranger = Initiator::new(*PrivateKey::generate().as_bytes(), b_pub, None);
            stranger.initiation(&fields(i, i as u64))
        })
        .collect();
    let stop = AtomicBool::new(false);
    let rss_before = resident_kib();
    let (sent, delivered) = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut sent = 0u64;
            let end = Instant::now() + Duration::from_secs(15);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                for (i, sock) in spoofers.iter().enumerate() {
                    let _ = sock.send_to(&flood[(sent as usize + i) % flood.len()], to_b);
                    sent += 1;
                }
                // ~3000 initiations per second, 15x the engine's budget.
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(300));
        // The real peer connects through the flood (with a cookie when
        // its first initiation lands while b is under load).
        let p = udp_packet(a.v4, b.v4, 100, 7);
        a.engine.send_packet(&p).unwrap();
        let got = b
            .engine
            .recv_packet(Duration::from_secs(12))
            .map(|x| x.to_vec());
        let ok = got.as_deref() == Some(&p[..]);
        stop.store(true, Ordering::Relaxed);
        (flooder.join().unwrap(), ok)
    });
    let rss_after = resident_kib();
    let mut cookie_replies = 0;
    let mut buf = [0u8; 256];
    for sock in &spoofers {
        while let Ok(n) = sock.recv(&mut buf) {
            if n == 64 && buf[0] == 3 {
                cookie_replies += 1;
            }
        }
    }
    let stats = b.engine.stats();
    eprintln!(
        "flood: {sent} sent, {cookie_replies} cookie replies received, engine {stats:?}, \
         RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(delivered, "the real peer did not get through the flood");
    assert!(
        cookie_replies > 0,
        "no cookie reply reached a spoofed source"
    );
    assert!(stats.cookie_replies_sent > 0);
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "resident memory grew by {} KiB under the flood",
        rss_after - rss_before
    );
    assert!(b.engine.peer_stats(&a.key.public_key()).unwrap().rx_packets >= 1);
}

/// Every encoding of a point of small order on Curve25519 (the list of
/// the kernel's and libsodium's checks, with and without the top bit).
fn low_order_points() -> Vec<[u8; 32]> {
    let hex = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];
    let mut out = Vec::new();
    for h in hex {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap();
        }
        out.push(k);
        k[31] |= 0x80;
        out.push(k);
    }
    out
}

#[test]
fn low_order_public_keys_never_get_a_handshake() {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap();
    let good = Fixture::new();
    for point in low_order_points() {
        let key = PublicKey::from_bytes(point);
        assert!(key.is_low_order(), "{key} not detected");
        let mut p = PeerConfig::new(key);
        p.endpoint = Some(endpoint);
        p.allowed_ips = vec!["10.66.0.0/16".parse().unwrap()];
        p.persistent_keepalive = Some(1);
        // In a config: the engine refuses to start.
        let cfg = Config {
            interface: InterfaceConfig {
                private_key: Some(PrivateKey::generate()),
                listen_port: Some(0),
                ..Default::default()
            },
            peers: vec![p.clone()],
        };
        assert!(matches!(
            Engine::new(&cfg),
            Err(EngineError::LowOrderKey(_))
        ));
        // Added at run time, by either path: refused.
        assert!(matches!(
            good.engine.add_peer(&p),
            Err(EngineError::LowOrderKey(_))
        ));
        let upd = PeerUpdate {
            endpoint: Some(endpoint),
            allowed_ips: vec![IpPrefix::host("10.66.0.1".parse().unwrap())],
            ..Default::default()
        };
        assert!(matches!(
            good.engine.update_peer(&key, &upd, true),
            Err(EngineError::LowOrderKey(_))
        ));
        assert!(good.engine.peer_config(&key).is_none());
    }
    // Traffic for the prefix goes nowhere, and nothing reaches the endpoint.
    let p = udp_packet(
        "10.9.0.1".parse().unwrap(),
        "10.66.0.1".parse().unwrap(),
        10,
        0,
    );
    assert!(good.engine.send_packet(&p).is_err());
    listener
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        listener.recv(&mut buf).is_err(),
        "something was sent to a low-order peer's endpoint"
    );
}
