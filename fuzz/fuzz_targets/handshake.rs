//! Handshake initiation, response and cookie messages into boringtun's Noise
//! code, structure-aware: messages start valid (fixed keys, the reference
//! initiator or a real boringtun peer), then the fuzzer edits chosen bytes
//! and MAC1 is optionally recomputed so the edits get past it.
//!
//! Besides "never panic", it checks authentication: a message accepted
//! after edits may differ from the original only in fields the protocol
//! leaves unauthenticated (sender index, MAC2, and MAC1 when recomputed).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use arbitrary::Arbitrary;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use libfuzzer_sys::fuzz_target;
use meshvpn_fuzz::initiator::{set_mac1, tai64n, InitiationFields, Initiator};
use meshvpn_fuzz::{key, limiter};

#[derive(Arbitrary, Debug)]
struct Edit {
    flips: Vec<(u8, u8)>,
    fix_mac1: bool,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The reference initiator (key 1) to the tunnel under test (key 2).
    Initiation {
        ephemeral: [u8; 32],
        sender_index: u32,
        /// Seconds added to the last timestamp (0 replays it).
        ts_step: u8,
        claim_other_static: Option<[u8; 32]>,
        edit: Edit,
    },
    /// The tunnel under test initiates to a boringtun peer, whose response
    /// is edited and fed back.
    Response { edit: Edit },
    /// Same, but the peer is under load and answers with a cookie reply.
    Cookie { edit: Edit },
    /// Arbitrary bytes (MAC1 recomputed when they are a handshake's size).
    Raw { bytes: Vec<u8>, fix_mac1: bool },
}

const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

fn tunn(own: u8, other: u8, index: u32, limit: u64) -> Tunn {
    let (own, other) = (key(own), key(other));
    Tunn::new(
        x25519::StaticSecret::from(*own.as_bytes()),
        x25519::PublicKey::from(*other.public_key().as_bytes()),
        None,
        None,
        index,
        Some(limiter(&own, limit)),
    )
}

/// Applies the edits; returns the offsets that now differ.
fn edit(msg: &mut [u8], e: &Edit, responder_public: &[u8; 32]) -> Vec<usize> {
    let orig = msg.to_vec();
    for &(at, x) in e.flips.iter().take(8) {
        let n = msg.len();
        msg[at as usize % n] ^= x;
    }
    let changed = (0..msg.len()).filter(|&i| msg[i] != orig[i]).collect();
    if e.fix_mac1 {
        set_mac1(msg, responder_public);
    }
    changed
}

/// True when every changed offset is one the protocol does not
/// authenticate: the sender index, MAC2, and MAC1 if it was recomputed.
fn only_unauthenticated(changed: &[usize], len: usize, fixed_mac1: bool) -> bool {
    changed
        .iter()
        .all(|&i| (4..8).contains(&i) || i >= len - 16 || (fixed_mac1 && i >= len - 32))
}

fuzz_target!(|steps: Vec<Step>| {
    let mut dut = tunn(2, 1, 0x100, u64::MAX / 2);
    let mut out = vec![0u8; 2048];
    let mut side = vec![0u8; 2048];
    let dut_public = *key(2).public_key().as_bytes();
    let peer_public = *key(1).public_key().as_bytes();
    let mut reference = Initiator::new(*key(1).as_bytes(), dut_public, None);
    let mut ts = 1_000_000u64;
    for step in steps.iter().take(16) {
        match step {
            Step::Initiation {
                ephemeral,
                sender_index,
                ts_step,
                claim_other_static,
                edit: e,
            } => {
                ts += *ts_step as u64;
                let f = InitiationFields {
                    sender_index: *sender_index,
                    ephemeral_private: *ephemeral,
                    timestamp: tai64n(ts, 0),
                };
                let mut msg = match claim_other_static {
                    Some(k) => reference.initiation_claiming(&f, k),
                    None => reference.initiation(&f),
                };
                let changed = edit(&mut msg, e, &dut_public);
                if let TunnResult::WriteToNetwork(resp) = dut.decapsulate(Some(SRC), &msg, &mut out)
                {
                    assert!(
                        only_unauthenticated(&changed, msg.len(), e.fix_mac1),
                        "initiation accepted after editing authenticated bytes {changed:?}"
                    );
                    assert!(claim_other_static.is_none_or(|k| k == peer_public));
                    assert_eq!(resp.len(), 92);
                }
            }
            Step::Response { edit: e } | Step::Cookie { edit: e } => {
                let cookie = matches!(step, Step::Cookie { .. });
                let mut other = tunn(1, 2, 0x200, if cookie { 0 } else { u64::MAX / 2 });
                let init = match dut.format_handshake_initiation(&mut out, true) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    _ => continue,
                };
                let mut msg = match other.decapsulate(Some(SRC), &init, &mut side) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    r => panic!("a valid initiation was not answered: {r:?}"),
                };
                assert_eq!(msg.len(), if cookie { 64 } else { 92 });
                let fix = e.fix_mac1 && !cookie;
                let changed = edit(
                    &mut msg,
                    &Edit {
                        flips: e.flips.clone(),
                        fix_mac1: fix,
                    },
                    &peer_public,
                );
                let r = dut.decapsulate(Some(SRC), &msg, &mut out);
                let accepted = if cookie {
                    matches!(r, TunnResult::Done)
                } else {
                    matches!(r, TunnResult::WriteToNetwork(_))
                };
                if accepted {
                    let ok = if cookie {
                        changed.is_empty()
                    } else {
                        only_unauthenticated(&changed, msg.len(), fix)
                    };
                    assert!(
                        ok,
                        "message accepted after editing authenticated bytes {changed:?}"
                    );
                }
            }
            Step::Raw { bytes, fix_mac1 } => {
                let mut msg = bytes.clone();
                if *fix_mac1 && (msg.len() == 148 || msg.len() == 92) {
                    set_mac1(&mut msg, &dut_public);
                }
                let _ = dut.decapsulate(Some(SRC), &msg, &mut out);
            }
        }
        // Whatever happened, the tunnel must still encrypt or queue.
        let _ = dut.encapsulate(
            &[
                0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
            ],
            &mut out,
        );
    }
});
