//! Decapsulation with an established session, against a naive model of the
//! replay window. The session's sending side is the reference initiator,
//! so every message is correctly encrypted under a fuzzer-chosen counter
//! (or deliberately damaged). The model: a counter is accepted when it is
//! below Reject-After-Messages, not seen before, and at most 1023 below the
//! newest seen; tampered or truncated messages never decrypt; accepted
//! packets come out byte for byte.
#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::peer::{output_buffer_len, DropReason, PeerOutput};
use meshvpn_engine::wire::message::REJECT_AFTER_MESSAGES;
use meshvpn_engine::wire::{MessageKind, WireMessage};
use meshvpn_fuzz::initiator::{tai64n, InitiationFields, Initiator};
use meshvpn_fuzz::{ipv4_packet, key, peer};

#[derive(Arbitrary, Debug)]
enum Counter {
    Exact(u64),
    /// Relative to the newest counter accepted so far.
    Near(i16),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Ip { len: u16, seed: u32 },
    Keepalive,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Msg {
    counter: Counter,
    body: Body,
    tamper: Option<(u16, u8)>,
    truncate: Option<u16>,
}

fuzz_target!(|msgs: Vec<Msg>| {
    let (k_init, k_resp) = (key(1), key(2));
    let p = peer(&k_resp, &k_init, 3, u64::MAX / 2);
    let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let mut init = Initiator::new(*k_init.as_bytes(), *k_resp.public_key().as_bytes(), None);
    let msg = init.initiation(&InitiationFields {
        sender_index: 0x77,
        ephemeral_private: [7; 32],
        timestamp: tai64n(1_000_000, 0),
    });
    let mut out = vec![0u8; output_buffer_len(70_000)];
    let PeerOutput::ToNetwork { len, .. } =
        p.decapsulate(Instant::now(), src.into(), MessageKind::HandshakeInitiation, &msg, &mut out)
    else {
        panic!("a valid initiation was refused");
    };
    let session = init
        .consume_response(&out[..len])
        .expect("response verifies");

    let mut seen = HashSet::new();
    let mut newest: Option<u64> = None;
    for m in msgs.iter().take(128) {
        let counter = match m.counter {
            Counter::Exact(c) => c,
            Counter::Near(d) => newest.unwrap_or(0).saturating_add_signed(d as i64),
        };
        let plaintext = match &m.body {
            Body::Ip { len, seed } => ipv4_packet([10, 0, 0, 1], *len as usize % 2000, *seed),
            Body::Keepalive => Vec::new(),
            Body::Raw(b) => b.clone(),
        };
        let mut d = session.data(counter, &plaintext);
        let mut intact = true;
        if let Some((i, x)) = m.tamper.filter(|t| t.1 != 0) {
            let at = 16 + i as usize % (d.len() - 16);
            d[at] ^= x;
            intact = false;
        }
        if let Some(n) = m.truncate {
            let n = n as usize % (d.len() + 1);
            if n < d.len() {
                d.truncate(n);
                intact = false;
            }
        }
        let Ok(wm) = WireMessage::new_checked(&d) else {
            assert!(d.len() < 32, "a data message of {} bytes refused", d.len());
            continue;
        };
        let r = p.decapsulate(Instant::now(), src.into(), wm.kind, &d, &mut out);
        let window_ok = counter < REJECT_AFTER_MESSAGES
            && !seen.contains(&counter)
            && newest.is_none_or(|n| counter + 1023 >= n);
        if !window_ok {
            assert_eq!(
                r,
                PeerOutput::Dropped(DropReason::Replay),
                "counter {counter}"
            );
            continue;
        }
        if !intact {
            assert_eq!(
                r,
                PeerOutput::Dropped(DropReason::DecryptFailed),
                "counter {counter}"
            );
            continue;
        }
        // Decrypted: the counter is now used whatever the plaintext was.
        seen.insert(counter);
        newest = Some(newest.map_or(counter, |n| n.max(counter)));
        match (&m.body, r) {
            (Body::Keepalive, PeerOutput::Done) => {}
            (Body::Ip { .. }, PeerOutput::ToHost { len, .. }) => {
                assert_eq!(&out[..len], &plaintext[..]);
            }
            (Body::Raw(_), PeerOutput::ToHost { len, .. }) => {
                assert!(len <= plaintext.len());
                assert_eq!(&out[..len], &plaintext[..len]);
            }
            (Body::Raw(_), PeerOutput::Done | PeerOutput::Dropped(DropReason::InnerMalformed)) => {}
            (b, r) => panic!("counter {counter}: {b:?} gave {r:?}"),
        }
    }
    assert_eq!(p.counters().drops(DropReason::SourceNotAllowed), 0);
});
