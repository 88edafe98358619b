//! The control protocol's parsers on any bytes: the server's
//! (`NodeBody::decode`, what a node sends) and the node's
//! (`ServerBody::decode` and the `NodeState` machine fed a script of
//! server messages, full maps and deltas included).
#![no_main]

use boringtun::x25519::StaticSecret;
use libfuzzer_sys::fuzz_target;
use meshvpn_control::client::{JoinRequest, NodeState, Step};
use meshvpn_control::proto::{NodeBody, ServerBody, MAX_PEERS};

fuzz_target!(|data: &[u8]| {
    // What a node sends: never a panic; what parses re-encodes and parses
    // the same.
    if let Ok(m) = NodeBody::decode(data) {
        assert_eq!(NodeBody::decode(&m.encode()).as_ref(), Ok(&m));
    }
    // What the server sends, one message per 0xff-separated chunk, into
    // one node's state machine.
    let secret = StaticSecret::from([7u8; 32]);
    let request = JoinRequest::default();
    let mut state = NodeState::new();
    for chunk in data.split(|b| *b == 0xff) {
        if let Ok(m) = ServerBody::decode(chunk) {
            assert_eq!(ServerBody::decode(&m.encode()).as_ref(), Ok(&m));
        }
        match state.handle(chunk, &secret, &[0u8; 32], &request) {
            Ok(Step::Reply(r)) => {
                NodeBody::decode(&r).expect("the node's own answer parses");
            }
            Ok(_) | Err(_) => {}
        }
        assert!(state.peers.len() <= MAX_PEERS * 64);
        if let Some(n) = &state.node {
            assert!(!state.peers.contains_key(&n.node_id), "the node is never its own peer");
        }
    }
});
