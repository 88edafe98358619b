//! Both sides start a handshake at the same moment, so their initiations
//! cross on the link. Each side answers the other's and completes its own;
//! neither starts a third (which would replace the one in flight and leave
//! its answer unmatched until the five-second retry), and the packets that
//! started them arrive. Runs over the in-memory link, with no clock: a
//! retry never comes, so a lost session fails the test.

mod common;

use common::link::{seed, Impairments, Pair, Side};

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
        let to_b = packet([10, 0, 0, 1], [10, 0, 0, 2], b"from A, sent as B initiates");
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

        // Both sessions work afterwards, both ways.
        let again = packet([10, 0, 0, 1], [10, 0, 0, 2], b"and after");
        pair.send(Side::A, &again);
        pair.settle(200);
        assert_eq!(pair.received_b.last(), Some(&again));
    }
}
