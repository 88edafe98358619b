//! The relay's candidate message (`relay::protocol::Candidates`) and the
//! path policy that takes its addresses, on hostile bytes. Invariants:
//! - decoding never panics, and never accepts more than MAX_CANDIDATES, an
//!   unusable address (loopback, unspecified, multicast, port 0) or a
//!   duplicate, nor anything longer than MAX_CANDIDATES_LEN;
//! - nothing it accepts frames as a WireGuard message (old peers drop it);
//! - what it accepts re-encodes to a message that decodes to the same list;
//! - the path policy given the list probes only those addresses, at most
//!   MAX_CANDIDATES of them per round;
//! - the relay server's control messages (`relay::protocol::Control`, the
//!   same relay stream): never a frame, an observed address re-encodes to a
//!   message that decodes to itself, and nothing longer than KEY_LEN is one.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

use meshvpn_engine::device::{Device, PathState, ProbeBudget};
use meshvpn_engine::peer::{BufferBudget, PeerStats};
use meshvpn_engine::relay::protocol::{
    Candidates, Control, Frame, KEY_LEN, MAX_CANDIDATES, MAX_CANDIDATES_LEN,
};
use meshvpn_engine::wire::WireMessage;
use meshvpn_engine::{PeerUpdate, PrivateKey};

/// A peer with no endpoint: not on a direct path, so rounds may go out.
fn stats() -> &'static PeerStats {
    static S: OnceLock<PeerStats> = OnceLock::new();
    S.get_or_init(|| {
        let dev = Device::new(
            Some(PrivateKey::from_bytes([1; 32])),
            1420,
            Arc::new(BufferBudget::default()),
        );
        let key = PrivateKey::from_bytes([2; 32]).public_key();
        dev.update_peer(&key, &PeerUpdate::default(), true).unwrap();
        dev.peer_stats(&key).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    match Control::decode(data) {
        Ok(control) => {
            assert!(data.len() <= KEY_LEN);
            assert!(Frame::decode(data).is_err(), "a control message framed");
            if let Control::Observed(a) = control {
                assert_eq!(Control::decode(&a.encode()), Ok(Control::Observed(a)));
            }
        }
        Err(_) => assert!(data.len() > KEY_LEN || data.len() < 2 || data[0] == 0xA0),
    }
    let Ok(c) = Candidates::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_CANDIDATES_LEN);
    assert!(c.0.len() <= MAX_CANDIDATES);
    assert!(WireMessage::new_checked(data).is_err());
    for (i, a) in c.0.iter().enumerate() {
        assert!(Candidates::usable(a), "{a}");
        assert!(!c.0[..i].contains(a), "{a} twice");
    }
    assert_eq!(Candidates::decode(&c.encode()).as_ref(), Ok(&c));

    let now = Instant::now();
    let stats = stats();
    let mut st = PathState::new(stats, now);
    st.set_candidates(&c.0, now);
    let mut budget = ProbeBudget::default();
    if let Some(targets) = st.candidate_round(stats, now + Duration::from_secs(1), &mut budget) {
        assert!(targets.len() <= MAX_CANDIDATES);
        assert!(targets.iter().all(|t| c.0.contains(t)));
    }
});
