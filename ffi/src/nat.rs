//! `meshvpn_engine_nat_status`: the engine's NAT traversal state as JSON
//! through the buffer protocol, like the other listings of this crate
//! (lists of addresses and per-peer paths do not fit a flat struct). The
//! counters alone are a struct: `meshvpn_engine_nat_stats` in stats.rs.

use std::ffi::c_char;

use ::meshvpn_engine::peer::Endpoint;
use ::meshvpn_engine::wg::NatStatus;
use serde_json::{json, Value};

use crate::engine::{lookup, meshvpn_engine};
use crate::error::meshvpn_result;
use crate::ptr::{self, Out};

fn endpoint(e: &Endpoint) -> Value {
    match e {
        Endpoint::Udp(a) => json!({ "kind": "udp", "address": a.to_string() }),
        Endpoint::Relay(k) => json!({ "kind": "relay", "address": k.to_string() }),
    }
}

fn addrs(list: &[std::net::SocketAddr]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// The JSON document `meshvpn_engine_nat_status` writes.
pub(crate) fn status_json(s: &NatStatus) -> Value {
    let d = &s.discovery;
    let n = &s.stats;
    let peers: Vec<Value> = s
        .peer_paths
        .iter()
        .map(|(key, p)| {
            json!({
                "public_key": key.to_string(),
                "path": p.chosen.as_ref().map(endpoint),
                "candidates": addrs(&p.candidates),
                "probes_sent": p.probes_sent,
                "probe_rounds": p.probe_rounds,
                "measures_sent": p.measures_sent,
                "rtt_switches": p.rtt_switches,
                "fallbacks": p.fallbacks,
                "rtts": p.rtts.iter().map(|(e, rtt)| json!({
                    "path": endpoint(e),
                    "rtt_us": rtt.map(|d| d.as_micros() as u64),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    // Candidates received from peers that have no path state yet.
    let pending: Vec<Value> = s
        .peer_candidates
        .iter()
        .filter(|(k, _)| !s.peer_paths.iter().any(|(p, _)| p == k))
        .map(|(k, c)| json!({ "public_key": k.to_string(), "candidates": addrs(c) }))
        .collect();
    json!({
        "stun_servers": addrs(&s.stun_servers),
        "reflexive": s.reflexive.map(|a| a.to_string()),
        "candidates": addrs(&s.candidates),
        "discovery": {
            "requests": d.requests,
            "retransmits": d.retransmits,
            "answers": d.answers,
            "error_responses": d.error_responses,
            "timeouts": d.timeouts,
            "not_stun": d.not_stun,
            "malformed": d.malformed,
            "unknown_source": d.unknown_source,
            "unknown_transaction": d.unknown_transaction,
        },
        "stats": {
            "candidates_received": n.candidates_received,
            "candidates_sent": n.candidates_sent,
            "probe_rounds": n.probe_rounds,
            "probes_sent": n.probes_sent,
            "fallbacks": n.fallbacks,
        },
        "peers": peers,
        "pending_candidates": pending,
    })
}

/// Writes the engine's NAT traversal state as one JSON object into `buf`,
/// following the buffer protocol of `meshvpn_result_message`:
/// `stun_servers` (strings), `reflexive` (this node's server-reflexive
/// address as STUN found it, or null), `candidates` (what we announce:
/// local and reflexive addresses), `discovery` (STUN counters), `stats`
/// (a subset of `meshvpn_nat_stats`), `peers` (per peer: `public_key`
/// base64, `path` = {`kind`: "udp"|"relay", `address`} or null,
/// `candidates`, `probes_sent`, `probe_rounds`, `measures_sent`,
/// `rtt_switches`, `fallbacks`, `rtts` = [{`path`, `rtt_us` or null when
/// unanswered}]) and `pending_candidates` (received for peers without path
/// state yet: `public_key`, `candidates`).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_nat_status(
    engine: *const meshvpn_engine,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let e = lookup(engine)?.running()?;
        let text = status_json(&e.nat_status()).to_string();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &text) }
    }}
}
