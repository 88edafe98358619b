//! Handshakes that cross, over the in-memory link (no clock: a retry never
//! comes, so a handshake lost to a crossing fails the test).
//!
//! - Both sides initiate at once: each answers the other's and completes
//!   its own; neither starts a third, which would replace the one in flight
//!   and leave its answer unmatched until the five-second retry.
//! - A side that just answered an initiation and has a packet to send holds
//!   it for the initiator's confirmation (one round trip) instead of
//!   starting a second handshake; without that confirmation it initiates
//!   after `CONFIRM_WAIT`.

mod common;

use std::time::{Duration, Instant};

use common::link::{seed, Impairments, Pair, Side};
use meshvpn_engine::peer::{
    DropReason, PeerOutput, CONFIRM_WAIT, HANDSHAKE_QUEUE_PACKETS, MIN_INITIATION_INTERVAL,
};

fn packet(from: [u8; 4], to: [u8; 4], body: &[u8]) -> Vec<u8> {
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
    p.extend_from_slice(&from);
    p.extend_from_slice(&to);
    p.extend_from_slice(body);
    p
}

fn a_to_b(body: &[u8]) -> Vec<u8> {
    packet([10, 0, 0, 1], [10, 0, 0, 2], body)
}

/// B initiates and A answers; the answer is on the link unless `lose_it`.
fn b_initiates(pair: &mut Pair, lose_it: bool) {
    assert!(matches!(
        pair.handshake(Side::B),
        PeerOutput::ToNetwork { .. }
    ));
    pair.link.set_partitioned(lose_it);
    pair.step();
    pair.link.set_partitioned(false);
    assert_eq!(pair.a.stats().handshakes_received, 1);
}

#[test]
fn crossing_initiations_each_get_answered_and_no_third_handshake_starts() {
    for delay_ticks in [0, 1, 3] {
        let seed = seed(0xc0de_0001 + delay_ticks);
        let mut pair = Pair::new(
            seed,
            Impairments {
                delay_ticks,
                ..Impairments::CLEAN
            },
        );
        let to_b = a_to_b(b"from A, sent as B initiates");
        let to_a = packet([10, 0, 0, 2], [10, 0, 0, 1], b"from B, sent as A initiates");
        // Both initiations are on the link before either arrives.
        pair.send(Side::A, &to_b);
        pair.send(Side::B, &to_a);
        assert_eq!(pair.link.in_flight(), 2);
        pair.settle(200);

        assert_eq!(
            pair.received_b,
            vec![to_b.clone()],
            "delay {delay_ticks}: B got"
        );
        assert_eq!(
            pair.received_a,
            vec![to_a.clone()],
            "delay {delay_ticks}: A got"
        );
        for side in [Side::A, Side::B] {
            let stats = pair.peer(side).stats();
            assert_eq!(
                stats.handshakes_initiated, 1,
                "delay {delay_ticks}: {side:?} initiated more than once"
            );
            assert!(!pair.peer(side).is_waiting());
        }

        // The sessions work afterwards.
        let again = a_to_b(b"and after");
        pair.send(Side::A, &again);
        pair.settle(200);
        assert_eq!(pair.received_b.last(), Some(&again));
    }
}

#[test]
fn a_packet_after_answering_waits_for_the_initiators_session_instead_of_a_second_handshake() {
    let mut pair = Pair::new(seed(0xc0de_0010), Impairments::CLEAN);
    b_initiates(&mut pair, false);

    // A has a packet for B before B confirmed the session: it waits.
    let held = a_to_b(b"held for the answered session");
    assert_eq!(pair.send(Side::A, &held), PeerOutput::Done);
    assert!(pair.a.is_waiting());
    // Within the wait, A's timers start nothing either.
    assert_eq!(pair.timers(Side::A, Instant::now()), PeerOutput::Done);

    // B completes its handshake and confirms with a keepalive; A's packet
    // follows on that session, once.
    pair.settle(20);
    assert_eq!(pair.received_b, vec![held.clone()]);
    assert!(!pair.a.is_waiting());
    let a = pair.a.stats();
    assert_eq!(a.handshakes_initiated, 0);
    assert_eq!(a.tx_inner_bytes, held.len() as u64);
}

#[test]
fn without_the_initiators_confirmation_the_answering_side_starts_its_own_handshake() {
    let mut pair = Pair::new(seed(0xc0de_0020), Impairments::CLEAN);
    b_initiates(&mut pair, true);
    let held = a_to_b(b"the confirmation never comes");
    assert_eq!(pair.send(Side::A, &held), PeerOutput::Done);
    assert_eq!(pair.timers(Side::A, Instant::now()), PeerOutput::Done);
    assert_eq!(pair.a.stats().handshakes_initiated, 0);

    // Past the wait, A initiates (once), and the packet follows that
    // handshake.
    let later = Instant::now() + CONFIRM_WAIT + Duration::from_millis(10);
    assert!(matches!(
        pair.timers(Side::A, later),
        PeerOutput::ToNetwork { .. }
    ));
    assert_eq!(pair.timers(Side::A, later), PeerOutput::Done);
    assert_eq!(pair.a.stats().handshakes_initiated, 1);
    pair.settle(20);
    assert_eq!(pair.received_b, vec![held]);
    assert!(!pair.a.is_waiting());
}

#[test]
fn with_a_usable_session_answering_a_rekey_holds_nothing() {
    let mut pair = Pair::new(seed(0xc0de_0030), Impairments::CLEAN);
    assert!(pair.establish(20));
    // B rekeys (past A's initiation flood guard); A answers but still has
    // the first session to send on.
    std::thread::sleep(MIN_INITIATION_INTERVAL * 2);
    assert!(matches!(
        pair.handshake(Side::B),
        PeerOutput::ToNetwork { .. }
    ));
    pair.step();
    assert!(matches!(
        pair.send(Side::A, &a_to_b(b"x")),
        PeerOutput::ToNetwork { .. }
    ));
    assert!(!pair.a.is_waiting());
}

#[test]
fn held_packets_are_bounded_by_the_handshake_queue() {
    let mut pair = Pair::new(seed(0xc0de_0040), Impairments::CLEAN);
    b_initiates(&mut pair, true);
    let p = a_to_b(&[0u8; 100]);
    for _ in 0..HANDSHAKE_QUEUE_PACKETS {
        assert_eq!(pair.send(Side::A, &p), PeerOutput::Done);
    }
    assert_eq!(
        pair.send(Side::A, &p),
        PeerOutput::Dropped(DropReason::SinkFull)
    );
}
