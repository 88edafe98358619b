//! Roaming: a peer's endpoint follows only messages that authenticated as
//! that peer. Garbage, replays, handshake messages that fail, and cookie
//! replies (which anyone who saw our MAC1 can make) never move it.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::initiator::{tai64n_now, InitiationFields, Initiator};
use common::link::{Impairments, Pair, Side};
use common::{udp_packet, wait_until};
use meshvpn_engine::peer::{output_buffer_len, DropReason, Peer, PeerOutput};
use meshvpn_engine::wire::MessageKind;
use meshvpn_engine::{Config, Engine, InterfaceConfig, PeerConfig, PrivateKey};

#[test]
fn engine_endpoint_moves_only_on_authenticated_packets() {
    let own = PrivateKey::generate();
    let peer_key = PrivateKey::generate();
    let home = UdpSocket::bind("127.0.0.1:0").unwrap();
    let attacker = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut p = PeerConfig::new(peer_key.public_key());
    p.endpoint = Some(home.local_addr().unwrap());
    p.allowed_ips = vec!["10.9.0.2/32".parse().unwrap()];
    let engine = Engine::new(&Config {
        interface: InterfaceConfig {
            private_key: Some(own.clone()),
            listen_port: Some(0),
            ..Default::default()
        },
        peers: vec![p],
    })
    .unwrap();
    let to_engine: SocketAddr = format!("127.0.0.1:{}", engine.listen_port())
        .parse()
        .unwrap();
    let endpoint = || {
        engine
            .peer_stats(&peer_key.public_key())
            .unwrap()
            .endpoint
            .unwrap()
    };

    // A session from the peer's home address.
    let mut init = Initiator::new(*peer_key.as_bytes(), *own.public_key().as_bytes(), None);
    let msg = init.initiation(&InitiationFields {
        sender_index: 5,
        ephemeral_private: *PrivateKey::generate().as_bytes(),
        timestamp: tai64n_now(0),
    });
    home.send_to(&msg, to_engine).unwrap();
    home.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 2048];
    let n = home.recv(&mut buf).unwrap();
    let session = init.consume_response(&buf[..n]).unwrap();
    let pkt = udp_packet(
        "10.9.0.2".parse().unwrap(),
        "10.9.0.1".parse().unwrap(),
        20,
        0,
    );
    let captured = session.data(0, &pkt);
    home.send_to(&captured, to_engine).unwrap();
    assert!(engine.recv_packet(Duration::from_secs(2)).is_some());
    let home_addr = home.local_addr().unwrap();
    assert_eq!(endpoint(), home_addr);

    // From the attacker's address: a replay of the captured message, the
    // same message with a broken tag, a data message for our index with a
    // fresh counter but garbage ciphertext, an initiation replayed, and
    // a cookie reply for our index.
    let mut broken = session.data(1, &pkt);
    let last = broken.len() - 1;
    broken[last] ^= 1;
    let mut garbage = session.data(2, &pkt);
    for b in &mut garbage[16..] {
        *b = 0x5a;
    }
    let mut cookie = vec![0u8; 64];
    cookie[0] = 3;
    cookie[4..8].copy_from_slice(&captured[4..8]);
    for d in [&captured[..], &broken, &garbage, &msg[..], &cookie] {
        attacker.send_to(d, to_engine).unwrap();
    }
    let dropped = || {
        let s = engine.peer_stats(&peer_key.public_key()).unwrap();
        s.drops(DropReason::Replay)
            + s.drops(DropReason::DecryptFailed)
            + s.drops(DropReason::HandshakeRejected)
            + s.drops(DropReason::HandshakeFlood)
    };
    assert!(
        wait_until(Duration::from_secs(3), || dropped() >= 5),
        "{:?}",
        engine.peer_stats(&peer_key.public_key())
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(endpoint(), home_addr, "an unauthenticated packet moved it");
    assert!(engine.recv_packet(Duration::from_millis(100)).is_none());

    // A genuine new message from the new address: the peer roamed.
    attacker.send_to(&session.data(3, &pkt), to_engine).unwrap();
    assert!(engine.recv_packet(Duration::from_secs(2)).is_some());
    assert_eq!(endpoint(), attacker.local_addr().unwrap());
}

/// A cookie reply that boringtun accepts (it decrypts under our MAC1) still
/// does not move the endpoint: anyone on the path who saw our initiation
/// can produce one from anywhere.
#[test]
fn accepted_cookie_reply_from_a_new_address_does_not_move_the_endpoint() {
    let mut pair = Pair::new(2, Impairments::CLEAN);
    let mut out = vec![0u8; output_buffer_len(2048)];
    let PeerOutput::ToNetwork { len, .. } = pair
        .a
        .initiate_handshake(std::time::Instant::now(), &mut out)
    else {
        panic!("no initiation");
    };
    let init = out[..len].to_vec();
    // B under load: a limiter with no budget answers with a cookie.
    let mut cfg = PeerConfig::new(pair.key_a.public_key());
    cfg.endpoint = Some(pair.addr_a);
    let loaded_limiter = {
        let public = boringtun::x25519::PublicKey::from(*pair.key_b.public_key().as_bytes());
        std::sync::Arc::new(boringtun::noise::rate_limiter::RateLimiter::new(&public, 0))
    };
    let loaded_b = Peer::new(&pair.key_b, &cfg, 0x0c, loaded_limiter);
    let r = loaded_b.decapsulate(
        std::time::Instant::now(),
        pair.addr_a.into(),
        MessageKind::HandshakeInitiation,
        &init,
        &mut out,
    );
    let PeerOutput::ToNetwork { len, .. } = r else {
        panic!("no cookie reply: {r:?}");
    };
    assert_eq!((len, out[0]), (64, 3), "a cookie reply");
    let cookie = out[..len].to_vec();

    let stranger: SocketAddr = "198.51.100.9:7".parse().unwrap();
    let before = pair.a.endpoint();
    let r = pair.deliver_from(Side::A, stranger, &cookie);
    assert_eq!(r, PeerOutput::Done, "boringtun accepted the cookie");
    assert_eq!(pair.a.endpoint(), before);
    assert_eq!(loaded_b.uapi_endpoint(), Some(pair.addr_a));
}

/// Over the in-memory link: data from a new address moves the endpoint of
/// both Peer objects, a corrupted copy from a third address does not.
#[test]
fn peer_endpoint_follows_authenticated_data_only() {
    let mut pair = Pair::new(3, Impairments::CLEAN);
    assert!(pair.establish(10));
    let pkt = udp_packet(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap(),
        30,
        1,
    );
    let mut out = vec![0u8; output_buffer_len(2048)];
    let PeerOutput::ToNetwork { len, .. } =
        pair.a
            .encapsulate(std::time::Instant::now(), &pkt, &mut out)
    else {
        panic!("no session");
    };
    let good = out[..len].to_vec();
    let mut bad = good.clone();
    bad[20] ^= 0x80;
    let third: SocketAddr = "203.0.113.3:3".parse().unwrap();
    let moved: SocketAddr = "203.0.113.4:4".parse().unwrap();
    assert_eq!(
        pair.deliver_from(Side::B, third, &bad),
        PeerOutput::Dropped(DropReason::DecryptFailed)
    );
    assert_eq!(pair.b.uapi_endpoint(), Some(pair.addr_a));
    assert!(matches!(
        pair.deliver_from(Side::B, moved, &good),
        PeerOutput::ToHost { .. }
    ));
    assert_eq!(pair.b.uapi_endpoint(), Some(moved));
    assert_eq!(
        pair.deliver_from(Side::B, third, &good),
        PeerOutput::Dropped(DropReason::Replay)
    );
    assert_eq!(pair.b.uapi_endpoint(), Some(moved), "a replay moved it");
}
