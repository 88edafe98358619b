//! Replay protection of data messages.
//!
//! The engine's replay window is boringtun's: a bitmap of 1024 counters
//! (`N_WORDS = 16` words of 64 bits, boringtun `noise/session.rs`). A
//! counter is accepted when it is newer than every counter seen so far, or
//! when it has not been seen and is at most 1023 below the newest. In the
//! kernel's terms (accept when `counter + COUNTER_WINDOW_SIZE >= newest`)
//! that is `COUNTER_WINDOW_SIZE = 1023`; the kernel and wireguard-go use
//! 8128 (8192 bits less one word). 1024 tolerates reordering of up to 1023
//! packets, enough for one peer's burst on one path; a bigger bitmap costs
//! memory per session.
//!
//! Counters at or above the paper's Reject-After-Messages (2^64 - 2^13 - 1)
//! are refused before boringtun sees them (`Peer::decapsulate`): boringtun
//! adds the window to the counter without checking for overflow.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::initiator::{tai64n_now, InitiationFields, Initiator, Session};
use common::link::{relaxed_limiter, Impairments, Pair, Side};
use common::{mesh, udp_packet, wait_until};
use meshvpn_engine::peer::{output_buffer_len, DropReason, Peer, PeerOutput};
use meshvpn_engine::wire::message::REJECT_AFTER_MESSAGES;
use meshvpn_engine::wire::{MessageKind, WireMessage};
use meshvpn_engine::{PeerConfig, PrivateKey};

/// The window in the kernel selftest's terms (see the module comment).
const COUNTER_WINDOW_SIZE: u64 = 1023;
const T_LIM: u64 = COUNTER_WINDOW_SIZE + 1;

/// A responder `Peer` with a session whose sending side is ours, so data
/// messages can carry any counter.
struct Responder {
    peer: Peer,
    session: Session,
    out: Vec<u8>,
    src: SocketAddr,
    plaintext: Vec<u8>,
}

impl Responder {
    fn new() -> Responder {
        let key_r = PrivateKey::generate();
        let key_i = PrivateKey::generate();
        let mut cfg = PeerConfig::new(key_i.public_key());
        let src: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        cfg.endpoint = Some(src);
        let peer = Peer::new(&key_r, &cfg, 7, relaxed_limiter(&key_r));
        let mut init = Initiator::new(*key_i.as_bytes(), *key_r.public_key().as_bytes(), None);
        let msg = init.initiation(&InitiationFields {
            sender_index: 0x1234,
            ephemeral_private: *PrivateKey::generate().as_bytes(),
            timestamp: tai64n_now(0),
        });
        let mut out = vec![0u8; output_buffer_len(2048)];
        let r = peer.decapsulate(
            std::time::Instant::now(),
            src.into(),
            MessageKind::HandshakeInitiation,
            &msg,
            &mut out,
        );
        let PeerOutput::ToNetwork { len, .. } = r else {
            panic!("initiation not answered: {r:?}");
        };
        let session = init
            .consume_response(&out[..len])
            .expect("the response verifies");
        let plaintext = udp_packet(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            16,
            0,
        );
        Responder {
            peer,
            session,
            out,
            src,
            plaintext,
        }
    }

    /// Delivers a data message with `counter`; true when it was accepted.
    fn accepts(&mut self, counter: u64) -> bool {
        let d = self.session.data(counter, &self.plaintext);
        match self.peer.decapsulate(
            std::time::Instant::now(),
            self.src.into(),
            MessageKind::Data,
            &d,
            &mut self.out,
        ) {
            PeerOutput::ToHost { len, .. } => {
                assert_eq!(&self.out[..len], &self.plaintext[..]);
                true
            }
            PeerOutput::Dropped(DropReason::Replay) => false,
            other => panic!("counter {counter}: unexpected {other:?}"),
        }
    }
}

/// The case table of the kernel's `drivers/net/wireguard/selftest/counter.c`,
/// with its window replaced by boringtun's (see the module comment).
#[test]
fn replay_window_matches_the_kernel_counter_selftest_table() {
    let mut r = Responder::new();
    let mut case = 0;
    let mut t = |r: &mut Responder, n: u64, want: bool| {
        case += 1;
        assert_eq!(r.accepts(n), want, "case {case}: counter {n}");
    };
    t(&mut r, 0, true);
    t(&mut r, 1, true);
    t(&mut r, 1, false);
    t(&mut r, 9, true);
    t(&mut r, 8, true);
    t(&mut r, 7, true);
    t(&mut r, 7, false);
    t(&mut r, T_LIM, true);
    t(&mut r, T_LIM - 1, true);
    t(&mut r, T_LIM - 1, false);
    t(&mut r, T_LIM - 2, true);
    t(&mut r, 2, true);
    t(&mut r, 2, false);
    t(&mut r, T_LIM + 16, true);
    t(&mut r, 3, false);
    t(&mut r, T_LIM + 16, false);
    t(&mut r, T_LIM * 4, true);
    t(&mut r, T_LIM * 4 - (T_LIM - 1), true);
    t(&mut r, 10, false);
    t(&mut r, T_LIM * 4 - T_LIM, false);
    t(&mut r, T_LIM * 4 - (T_LIM + 1), false);
    t(&mut r, T_LIM * 4 - (T_LIM - 2), true);
    t(&mut r, T_LIM * 4 + 1 - T_LIM, false);
    t(&mut r, 0, false);
    t(&mut r, REJECT_AFTER_MESSAGES, false);
    t(&mut r, REJECT_AFTER_MESSAGES - 1, true);
    t(&mut r, REJECT_AFTER_MESSAGES, false);
    t(&mut r, REJECT_AFTER_MESSAGES - 1, false);
    t(&mut r, REJECT_AFTER_MESSAGES - 2, true);
    t(&mut r, REJECT_AFTER_MESSAGES + 1, false);
    t(&mut r, REJECT_AFTER_MESSAGES + 2, false);
    t(&mut r, REJECT_AFTER_MESSAGES - 2, false);
    t(&mut r, REJECT_AFTER_MESSAGES - 3, true);
    t(&mut r, 0, false);

    let mut r = Responder::new();
    for i in 1..=COUNTER_WINDOW_SIZE {
        t(&mut r, i, true);
    }
    t(&mut r, 0, true);
    t(&mut r, 0, false);

    let mut r = Responder::new();
    for i in 2..=COUNTER_WINDOW_SIZE + 1 {
        t(&mut r, i, true);
    }
    t(&mut r, 1, true);
    t(&mut r, 0, false);

    let mut r = Responder::new();
    for i in (0..=COUNTER_WINDOW_SIZE).rev() {
        t(&mut r, i, true);
    }

    let mut r = Responder::new();
    for i in (1..=COUNTER_WINDOW_SIZE + 1).rev() {
        t(&mut r, i, true);
    }
    t(&mut r, 0, false);

    let mut r = Responder::new();
    for i in (1..=COUNTER_WINDOW_SIZE).rev() {
        t(&mut r, i, true);
    }
    t(&mut r, COUNTER_WINDOW_SIZE + 1, true);
    t(&mut r, 0, false);

    let mut r = Responder::new();
    for i in (1..=COUNTER_WINDOW_SIZE).rev() {
        t(&mut r, i, true);
    }
    t(&mut r, 0, true);
    t(&mut r, COUNTER_WINDOW_SIZE + 1, true);
}

/// Regression: a peer holding the session key sent counter 2^64 - 1, and
/// boringtun's `counter + window` overflowed (a panic in debug builds; in
/// release the window wrapped and accepted old counters again).
#[test]
fn counters_past_reject_after_messages_are_dropped_and_the_session_lives() {
    let mut r = Responder::new();
    assert!(r.accepts(5));
    for c in [u64::MAX, u64::MAX - 1, REJECT_AFTER_MESSAGES] {
        assert!(!r.accepts(c), "counter {c}");
    }
    assert!(!r.accepts(5), "the window did not wrap");
    assert!(r.accepts(6));
    assert_eq!(r.peer.counters().drops(DropReason::Replay), 4);
}

/// Peer objects over a clean in-memory link: a captured packet delivered
/// again, and one that fell behind the window, are both dropped as replays.
#[test]
fn captured_data_packet_and_one_older_than_the_window_are_dropped_as_replay() {
    let mut pair = Pair::new(1, Impairments::CLEAN);
    assert!(pair.establish(10));
    let packet = udp_packet(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap(),
        40,
        9,
    );
    let mut out = vec![0u8; output_buffer_len(2048)];
    let PeerOutput::ToNetwork { len, .. } =
        pair.a
            .encapsulate(std::time::Instant::now(), &packet, &mut out)
    else {
        panic!("no session");
    };
    let captured = out[..len].to_vec();
    assert!(matches!(
        pair.deliver(Side::B, &captured),
        PeerOutput::ToHost { .. }
    ));
    assert!(matches!(
        pair.deliver(Side::B, &captured),
        PeerOutput::Dropped(DropReason::Replay)
    ));
    // Capture one packet but hold it while 1024 newer ones arrive.
    let PeerOutput::ToNetwork { len, .. } =
        pair.a
            .encapsulate(std::time::Instant::now(), &packet, &mut out)
    else {
        panic!("no session");
    };
    let old = out[..len].to_vec();
    for _ in 0..1024 {
        pair.send(Side::A, &packet);
    }
    pair.settle(10);
    assert_eq!(pair.received_b.len(), 1 + 1024);
    assert!(matches!(
        pair.deliver(Side::B, &old),
        PeerOutput::Dropped(DropReason::Replay)
    ));
    assert_eq!(pair.b.counters().drops(DropReason::Replay), 2);
    assert_eq!(pair.received_b.len(), 1 + 1024, "nothing replayed arrived");
    assert!(pair.received_b.iter().all(|p| p == &packet));
}

/// Real engines over loopback: a man in the middle (a UDP socket that `a`
/// believes is `b`) forwards a captured data message twice, then again after
/// the window has moved on. `b` delivers it once and counts two replays.
#[test]
fn engine_drops_a_replayed_and_a_too_old_data_message() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mitm = UdpSocket::bind("127.0.0.1:0").unwrap();
    mitm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let to_b: SocketAddr = format!("127.0.0.1:{}", b.engine.listen_port())
        .parse()
        .unwrap();
    let mut cfg = a.engine.peer_config(&b.key.public_key()).unwrap();
    cfg.endpoint = Some(mitm.local_addr().unwrap());
    a.engine.add_peer(&cfg).unwrap();
    let a_pub = a.key.public_key();

    // Relay the handshake both ways until a's first data message comes.
    let p = udp_packet(a.v4, b.v4, 64, 1);
    a.engine.send_packet(&p).unwrap();
    let mut buf = [0u8; 2048];
    let to_a: SocketAddr = format!("127.0.0.1:{}", a.engine.listen_port())
        .parse()
        .unwrap();
    let first_data = loop {
        let (n, from) = mitm.recv_from(&mut buf).expect("traffic from a or b");
        let d = buf[..n].to_vec();
        let kind = WireMessage::new_checked(&d).unwrap().kind;
        let dest = if from.port() == a.engine.listen_port() {
            to_b
        } else {
            to_a
        };
        if kind == MessageKind::Data && n > 32 && dest == to_b {
            break d;
        }
        mitm.send_to(&d, dest).unwrap();
    };
    mitm.send_to(&first_data, to_b).unwrap();
    assert_eq!(
        b.engine.recv_packet(Duration::from_secs(5)).as_deref(),
        Some(&p[..])
    );
    mitm.send_to(&first_data, to_b).unwrap();
    assert!(wait_until(Duration::from_secs(3), || {
        b.engine
            .peer_stats(&a_pub)
            .unwrap()
            .drops(DropReason::Replay)
            == 1
    }));
    // 1100 newer messages pass through the middle, then the old one again.
    mitm.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut forwarded = 0;
    for i in 0..1100u32 {
        a.engine
            .send_packet(&udp_packet(a.v4, b.v4, 64, i as u8))
            .unwrap();
        let Ok((n, _)) = mitm.recv_from(&mut buf) else {
            break;
        };
        mitm.send_to(&buf[..n], to_b).unwrap();
        forwarded += 1;
        // Keep b's host queue drained as we go.
        while b.engine.host_queue().try_recv().is_some() {}
    }
    assert!(forwarded > 1024, "only {forwarded} forwarded");
    assert!(wait_until(Duration::from_secs(3), || {
        while b.engine.host_queue().try_recv().is_some() {}
        b.engine.peer_stats(&a_pub).unwrap().rx_packets == 1 + forwarded
    }));
    // The last delivery may land between a drain and the count above.
    while b.engine.host_queue().try_recv().is_some() {}
    mitm.send_to(&first_data, to_b).unwrap();
    assert!(wait_until(Duration::from_secs(3), || {
        b.engine
            .peer_stats(&a_pub)
            .unwrap()
            .drops(DropReason::Replay)
            == 2
    }));
    assert!(b.engine.recv_packet(Duration::from_millis(200)).is_none());
    assert_eq!(
        b.engine.peer_stats(&a_pub).unwrap().rx_packets,
        1 + forwarded
    );
}
