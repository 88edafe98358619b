//! Two `Peer`s wired back to back by hand, one datagram at a time, to pin
//! down who sends what while handshakes cross.

use super::*;

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";

/// `a` is A's view of B, `b` is B's view of A.
fn pair() -> (Peer, Peer) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let side = |own: &PrivateKey, other: &PrivateKey, endpoint: &str, index: u32| {
        let mut cfg = PeerConfig::new(other.public_key());
        cfg.endpoint = Some(endpoint.parse().unwrap());
        let limiter = Arc::new(RateLimiter::new(&own.public_key().to_x25519(), 100));
        Peer::new(own, &cfg, index, limiter)
    };
    (side(&ka, &kb, B_ADDR, 1), side(&kb, &ka, A_ADDR, 2))
}

fn kind(datagram: &[u8]) -> MessageKind {
    crate::wire::WireMessage::new_checked(datagram)
        .unwrap()
        .kind
}

/// Delivers `datagram` from `from` to `to`, returning the result and what
/// it wrote.
fn deliver(to: &Peer, from: &str, datagram: &[u8]) -> (PeerOutput, Vec<u8>) {
    let mut out = vec![0u8; 2048];
    let r = to.decapsulate(from.parse().unwrap(), kind(datagram), datagram, &mut out);
    let len = match r {
        PeerOutput::ToNetwork { len, .. } | PeerOutput::ToHost { len, .. } => len,
        _ => 0,
    };
    out.truncate(len);
    (r, out)
}

fn network(r: PeerOutput, out: &[u8]) -> Vec<u8> {
    match r {
        PeerOutput::ToNetwork { len, .. } => out[..len].to_vec(),
        other => panic!("expected a datagram, got {other:?}"),
    }
}

/// An IPv4 header from 10.0.0.1 to 10.0.0.2 and `body`.
fn ip_packet(body: &[u8]) -> Vec<u8> {
    let len = (20 + body.len()) as u16;
    let mut p = vec![
        0x45,
        0,
        (len >> 8) as u8,
        len as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    p.extend_from_slice(body);
    p
}

/// B initiates; A answers. Returns A's response.
fn b_initiates(a: &Peer, b: &Peer) -> Vec<u8> {
    let mut out = vec![0u8; 2048];
    let init = network(b.initiate_handshake(&mut out), &out);
    assert_eq!(kind(&init), MessageKind::HandshakeInitiation);
    let (r, response) = deliver(a, B_ADDR, &init);
    assert!(matches!(r, PeerOutput::ToNetwork { .. }), "{r:?}");
    assert_eq!(kind(&response), MessageKind::HandshakeResponse);
    response
}

#[test]
fn a_packet_after_answering_waits_for_the_initiators_session_instead_of_a_second_handshake() {
    let (a, b) = pair();
    let response = b_initiates(&a, &b);

    // A has a packet for B before B confirmed the session: it waits; no
    // initiation of A's own crosses B's.
    let packet = ip_packet(b"held for the answered session");
    let mut out = vec![0u8; 2048];
    assert_eq!(a.encapsulate(&packet, &mut out), PeerOutput::Done);
    assert!(a.is_waiting());
    assert_eq!(a.stats().handshakes_initiated, 0);

    // B completes its handshake and confirms with a keepalive.
    let (r, keepalive) = deliver(&b, A_ADDR, &response);
    let keepalive = network(r, &keepalive);
    assert_eq!(kind(&keepalive), MessageKind::Data);
    let (r, _) = deliver(&a, B_ADDR, &keepalive);
    assert_eq!(r, PeerOutput::Done);

    // The held packet goes out on that session, once, and B reads it.
    let mut out = vec![0u8; 2048];
    let sent = network(a.flush_queued(&mut out), &out);
    assert_eq!(a.flush_queued(&mut out), PeerOutput::Done);
    assert!(!a.is_waiting());
    let (r, got) = deliver(&b, A_ADDR, &sent);
    assert!(matches!(r, PeerOutput::ToHost { .. }), "{r:?}");
    assert_eq!(got, packet);
    assert_eq!(a.stats().handshakes_initiated, 0);
    assert_eq!(a.stats().tx_inner_bytes, packet.len() as u64);
}

#[test]
fn without_the_initiators_confirmation_the_answering_side_starts_its_own_handshake() {
    let (a, b) = pair();
    let _lost_response = b_initiates(&a, &b);
    let packet = ip_packet(b"the confirmation never comes");
    let mut out = vec![0u8; 2048];
    assert_eq!(a.encapsulate(&packet, &mut out), PeerOutput::Done);

    // Within the wait, the timers hold on.
    assert_eq!(a.update_timers(Instant::now(), &mut out), PeerOutput::Done);
    assert!(a.is_waiting());

    // Past it, A initiates, and the packet follows that handshake.
    let later = Instant::now() + CONFIRM_WAIT + Duration::from_millis(10);
    let init = network(a.update_timers(later, &mut out), &out);
    assert_eq!(kind(&init), MessageKind::HandshakeInitiation);
    assert_eq!(a.update_timers(later, &mut out), PeerOutput::Done);
    assert_eq!(a.stats().handshakes_initiated, 1);

    let (r, response) = deliver(&b, A_ADDR, &init);
    let response = network(r, &response);
    let (r, keepalive) = deliver(&a, B_ADDR, &response);
    assert_eq!(kind(&network(r, &keepalive)), MessageKind::Data);
    let sent = network(a.flush_queued(&mut out), &out);
    assert_eq!(a.flush_queued(&mut out), PeerOutput::Done);
    assert!(!a.is_waiting());
    let (r, got) = deliver(&b, A_ADDR, &sent);
    assert!(matches!(r, PeerOutput::ToHost { .. }), "{r:?}");
    assert_eq!(got, packet);
}

#[test]
fn answering_while_our_own_initiation_is_in_flight_starts_no_third_handshake() {
    let (a, b) = pair();
    // A's packet starts A's handshake; B's initiation crosses it.
    let packet = ip_packet(b"queued behind A's own handshake");
    let mut out = vec![0u8; 2048];
    let a_init = network(a.encapsulate(&packet, &mut out), &out);
    assert_eq!(kind(&a_init), MessageKind::HandshakeInitiation);
    let _ = b_initiates(&a, &b);

    // Flushing after the answer sends nothing: no new initiation replaces
    // the one in flight.
    assert_eq!(a.flush_queued(&mut out), PeerOutput::Done);
    assert!(a.is_waiting());
    assert_eq!(a.stats().handshakes_initiated, 1);

    // B answers A's initiation; A's packet goes on that session.
    let (r, b_response) = deliver(&b, A_ADDR, &a_init);
    let b_response = network(r, &b_response);
    let (r, keepalive) = deliver(&a, B_ADDR, &b_response);
    assert_eq!(kind(&network(r, &keepalive)), MessageKind::Data);
    let sent = network(a.flush_queued(&mut out), &out);
    let (r, got) = deliver(&b, A_ADDR, &sent);
    assert!(matches!(r, PeerOutput::ToHost { .. }), "{r:?}");
    assert_eq!(got, packet);
    assert_eq!(a.stats().handshakes_initiated, 1);
}

#[test]
fn with_a_usable_session_answering_a_rekey_holds_nothing() {
    let (a, b) = pair();
    let response = b_initiates(&a, &b);
    let (r, keepalive) = deliver(&b, A_ADDR, &response);
    deliver(&a, B_ADDR, &network(r, &keepalive));

    // B rekeys (past A's initiation flood guard); A answers but still has
    // the first session to send on.
    std::thread::sleep(MIN_INITIATION_INTERVAL * 2);
    let _ = b_initiates(&a, &b);
    let mut out = vec![0u8; 2048];
    let sent = network(a.encapsulate(&ip_packet(b"x"), &mut out), &out);
    assert_eq!(kind(&sent), MessageKind::Data);
    assert!(!a.is_waiting());
}

#[test]
fn held_packets_are_bounded_by_the_handshake_queue() {
    let (a, b) = pair();
    let _ = b_initiates(&a, &b);
    let packet = ip_packet(&[0u8; 100]);
    let mut out = vec![0u8; 2048];
    for _ in 0..HANDSHAKE_QUEUE_PACKETS {
        assert_eq!(a.encapsulate(&packet, &mut out), PeerOutput::Done);
    }
    assert_eq!(
        a.encapsulate(&packet, &mut out),
        PeerOutput::Dropped(DropReason::SinkFull)
    );
}
