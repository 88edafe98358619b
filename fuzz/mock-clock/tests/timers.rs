//! The protocol timers under boringtun's mock clock (`mock-instant`, only
//! enabled in this workspace so it never reaches a real build): rekey
//! after 120 s, reject after 180 s, all session state gone by 540 s
//! (WireGuard paper, section 6.1: REKEY_AFTER_TIME, REJECT_AFTER_TIME,
//! REJECT_AFTER_TIME x 3).
//!
//! `MockClock` is per thread and each test runs on its own thread, so the
//! tests do not disturb each other. The peers' own 20 ms initiation flood
//! guard reads the real clock; tests sleep past it where a handshake
//! follows another.

#[path = "../../../engine/tests/common/link.rs"]
mod link;

use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use link::{Impairments, Pair, Side};
use meshvpn_engine::peer::{output_buffer_len, DropReason, PeerOutput};
use mock_instant::MockClock;

fn packet(seed: u8) -> Vec<u8> {
    let mut p = vec![seed; 60];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&60u16.to_be_bytes());
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

/// Runs both peers' timers once, putting what they send on the link, and
/// lets the link settle.
fn timers(pair: &mut Pair) {
    let mut out = vec![0u8; output_buffer_len(2048)];
    for side in [Side::A, Side::B] {
        for _ in 0..4 {
            match pair.peer(side).update_timers(Instant::now(), &mut out) {
                PeerOutput::ToNetwork { len, .. } => pair.link.send(side.other(), &out[..len]),
                _ => break,
            }
        }
    }
    pair.settle(10);
}

/// A data message from A captured (not delivered).
fn capture(pair: &Pair, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; output_buffer_len(2048)];
    match pair.a.encapsulate(Instant::now(), &packet(seed), &mut out) {
        PeerOutput::ToNetwork { len, .. } if out[0] == 4 => out[..len].to_vec(),
        other => panic!("no data message: {other:?}"),
    }
}

#[test]
fn initiator_rekeys_120_seconds_after_the_handshake() {
    let mut pair = Pair::new(11, Impairments::CLEAN);
    assert!(pair.establish(10));
    let initiated = pair.a.stats().handshakes_initiated;
    // boringtun stamps events with the time of the last `update_timers`
    // call, so the timers run before the send (the engine runs them every
    // 100 ms).
    MockClock::advance(Duration::from_secs(1));
    timers(&mut pair);
    pair.send(Side::A, &packet(1));
    pair.settle(10);
    assert_eq!(pair.received_b.len(), 1);
    std::thread::sleep(Duration::from_millis(25));
    let mut rekey_at = None;
    for t in 2..=130u64 {
        MockClock::advance(Duration::from_secs(1));
        timers(&mut pair);
        if pair.a.stats().handshakes_initiated > initiated {
            rekey_at = Some(t);
            break;
        }
    }
    assert_eq!(rekey_at, Some(120), "REKEY_AFTER_TIME is 120 s");
    // The new handshake completed over the link and data still flows.
    pair.send(Side::A, &packet(2));
    pair.settle(10);
    assert_eq!(pair.received_b.len(), 2);
}

#[test]
fn sessions_are_rejected_after_180_seconds() {
    let mut pair = Pair::new(12, Impairments::CLEAN);
    assert!(pair.establish(10));
    MockClock::advance(Duration::from_secs(1));
    let early = capture(&pair, 1);
    let late = capture(&pair, 2);
    let mut out = vec![0u8; output_buffer_len(2048)];
    // Only B's timers run: A stays silent, so nothing rekeys.
    let b_timers = |pair: &Pair, out: &mut [u8]| {
        let _ = pair.b.update_timers(Instant::now(), out);
    };
    MockClock::advance(Duration::from_secs(178)); // t = 179 s
    b_timers(&pair, &mut out);
    assert!(
        matches!(pair.deliver(Side::B, &early), PeerOutput::ToHost { .. }),
        "a session 179 s old still decrypts"
    );
    MockClock::advance(Duration::from_secs(2)); // t = 181 s
    b_timers(&pair, &mut out);
    assert_eq!(
        pair.deliver(Side::B, &late),
        PeerOutput::Dropped(DropReason::NoSession),
        "a session 181 s old is gone"
    );
    // A's own session is gone too: what it sends now is a handshake, not data.
    let _ = pair.a.update_timers(Instant::now(), &mut out);
    let r = pair.a.encapsulate(Instant::now(), &packet(3), &mut out);
    assert!(
        !matches!(r, PeerOutput::ToNetwork { .. } if out[0] == 4),
        "A still encrypted with a session older than 180 s"
    );
}

#[test]
fn all_session_state_is_cleared_by_540_seconds() {
    // boringtun's `Tunn` directly: the 540 s step reports itself as
    // `ConnectionExpired` from `update_timers`, which `Peer` swallows.
    let (sa, sb) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let (mut m1, mut m2) = (vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut m1, false) else {
        panic!()
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut m2) else {
        panic!()
    };
    let TunnResult::WriteToNetwork(ka) = a.decapsulate(None, resp, &mut m1) else {
        panic!()
    };
    assert!(matches!(b.decapsulate(None, ka, &mut m2), TunnResult::Done));
    assert!(a.time_since_last_handshake().is_some());
    let mut expired_at = None;
    for t in (10..=600u64).step_by(10) {
        MockClock::advance(Duration::from_secs(10));
        if let TunnResult::Err(WireGuardError::ConnectionExpired) = a.update_timers(&mut m1) {
            expired_at = Some(t);
            break;
        }
    }
    assert_eq!(expired_at, Some(540), "REJECT_AFTER_TIME x 3 is 540 s");
    assert!(
        a.time_since_last_handshake().is_none(),
        "a session survived"
    );
    // Encrypting now starts over with a new handshake.
    assert!(matches!(
        a.encapsulate(&packet(1), &mut m1),
        TunnResult::WriteToNetwork(d) if d[0] == 1
    ));
}
