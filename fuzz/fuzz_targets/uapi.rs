//! The UAPI `set=1` / `get=1` parsers on arbitrary text, and what parses
//! applied to a live engine.
//!
//! Invariants: parsing never panics; a parsed request survives
//! `to_text -> parse` unchanged (so `wg setconf` round-trips), and so does a
//! parsed `get` reply; applying any parsed request to a running engine
//! returns `Ok` or an errno-style error, never a panic, and the engine's
//! own `get` output parses back. Endpoints are rewritten to the loopback
//! discard port before a request is applied, so the engine never sends a
//! handshake anywhere but 127.0.0.1, and listen-port / fwmark changes are
//! dropped so the fuzzer never rebinds sockets.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshvpn_engine::config::uapi::{parse_get, parse_set, InterfaceChange, PeerChange};
use meshvpn_engine::{Config, Engine};

fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::default();
        config.interface.private_key = Some(meshvpn_fuzz::key(1));
        Arc::new(Engine::new(&config).expect("engine on an ephemeral port"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(reply) = parse_get(text) {
        let again = parse_get(&reply.to_text())
            .unwrap_or_else(|e| panic!("get reply does not re-parse: {e}\n{}", reply.to_text()));
        assert_eq!(reply, again, "get reply changed on to_text -> parse");
    }
    let Ok(mut request) = parse_set(text) else {
        return;
    };
    let emitted = request.to_text();
    let again = parse_set(&emitted)
        .unwrap_or_else(|e| panic!("set request does not re-parse: {e}\n{emitted}"));
    assert_eq!(
        strip_lines(&request),
        strip_lines(&again),
        "set request changed on to_text -> parse:\n{emitted}"
    );

    request.interface.retain(|(_, change)| {
        !matches!(
            change,
            InterfaceChange::ListenPort(_) | InterfaceChange::Fwmark(_)
        )
    });
    for peer in &mut request.peers {
        for (_, change) in &mut peer.changes {
            if let PeerChange::Endpoint(endpoint) = change {
                *endpoint = ([127, 0, 0, 1], 9).into();
            }
        }
    }
    let engine = engine();
    let _ = engine.uapi_apply(&request);
    let current = engine.uapi_get();
    parse_get(&current)
        .unwrap_or_else(|e| panic!("engine's own get does not parse: {e}\n{current}"));
    engine.clear_peers();
});

/// The request without its line numbers (which differ after re-emitting).
fn strip_lines(
    request: &meshvpn_engine::config::uapi::SetRequest,
) -> (
    Vec<InterfaceChange>,
    Vec<(meshvpn_engine::PublicKey, Vec<PeerChange>)>,
) {
    (
        request.interface.iter().map(|(_, c)| c.clone()).collect(),
        request
            .peers
            .iter()
            .map(|p| {
                (
                    p.public_key.clone(),
                    p.changes.iter().map(|(_, c)| c.clone()).collect(),
                )
            })
            .collect(),
    )
}
