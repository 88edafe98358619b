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
//!
//! The scenario (a captured message replayed at once and after the window
//! moved, through whole devices) is in `device_sim.rs`; here the window is
//! driven counter by counter through one `Peer`.

mod common;

use std::net::SocketAddr;

use common::initiator::{tai64n_now, InitiationFields, Initiator, Session};
use common::link::relaxed_limiter;
use common::udp_packet;
use meshvpn_engine::peer::{output_buffer_len, DropReason, Peer, PeerOutput};
use meshvpn_engine::wire::message::REJECT_AFTER_MESSAGES;
use meshvpn_engine::wire::MessageKind;
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
