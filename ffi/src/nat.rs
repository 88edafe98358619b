//! `meshvpn_engine_nat_status`: the engine's NAT traversal state as JSON
//! through the buffer protocol, like the other listings of this crate
//! (lists of addresses and per-peer paths do not fit a flat struct). The
//! counters alone are a struct: `meshvpn_engine_nat_stats` in stats.rs.

use std::ffi::c_char;

use ::meshvpn_engine::peer::Endpoint;
use ::meshvpn_engine::wg::NatStatus;
use serde_json::{json, Value};

use crate::config::parse_endpoint;
use crate::engine::{lookup, meshvpn_engine};
use crate::error::{meshvpn_result, Error};
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
                // As last received: the path state takes them on its next tick.
                "candidates": addrs(s
                    .peer_candidates
                    .iter()
                    .find(|(k, _)| k == key)
                    .map_or(&p.candidates, |(_, c)| c)),
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
    let use_json = |u: &::meshvpn_engine::peer::PathUse| {
        json!({
            "tx_bytes": u.tx_bytes,
            "rx_bytes": u.rx_bytes,
            "time_ms": u.time.as_millis() as u64,
        })
    };
    let traffic: Vec<Value> = s
        .peer_traffic
        .iter()
        .map(|(k, t)| {
            json!({
                "public_key": k.to_string(),
                "direct": use_json(&t.udp),
                "relay": use_json(&t.relay),
            })
        })
        .collect();
    json!({
        "discovery_age_ms": s.since_discovery.map(|d| d.as_millis() as u64),
        "traffic": traffic,
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
            "relay_ip_changes": n.relay_ip_changes,
        },
        "relay_observed": s.relay_observed.map(|a| a.to_string()),
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
/// unanswered}]), `pending_candidates` (received for peers without path
/// state yet: `public_key`, `candidates`), `traffic` (every peer:
/// `public_key`, `direct` and `relay` = {`tx_bytes`, `rx_bytes`, `time_ms`}:
/// WireGuard datagram bytes and time on each path kind) and
/// `discovery_age_ms` (since the last STUN round started; null before one),
/// `relay_observed` (the address the relay sees this node's session come
/// from, its NAT's public address; null before a relay told one) and, in
/// `stats`, `relay_ip_changes` (times that address's IP changed between
/// sessions).
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

/// Sets the STUN servers discovery asks (each `"host:port"`, resolved
/// now), replacing the previous ones, and starts a discovery round at
/// once; `len` 0 stops discovery. Our local address towards each server
/// and the server-reflexive address found become the candidates announced
/// to peers through the relay.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_ENDPOINT_INVALID`,
/// `MESHVPN_INVALID_ARGUMENT` (a list discovery refuses).
///
/// Thread safety: safe to call from any thread at any time.
///
/// # Safety
/// `servers` is NULL (with `len` 0) or points to `len` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_set_stun_servers(
    engine: *const meshvpn_engine,
    servers: *const *const c_char,
    len: usize,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller's promise about `servers`.
        let items = unsafe { ptr::try_slice(servers, len, "servers") }?;
        let mut list = Vec::with_capacity(items.len());
        for (i, &s) in items.iter().enumerate() {
            let what = format!("servers[{i}]");
            // SAFETY: the caller's promise, per element.
            let text = unsafe { ptr::try_str(s, &what) }?;
            list.push(parse_endpoint(text, &what)?);
        }
        let e = lookup(engine)?.running()?;
        e.set_stun_servers(&list)
            .map_err(|why| Error::new(meshvpn_result::MESHVPN_INVALID_ARGUMENT, why))
    }}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::meshvpn_engine::config::PublicKey;
    use ::meshvpn_engine::device::PathSummary;

    use super::*;

    #[test]
    fn status_json_carries_paths_candidates_and_round_trips() {
        let key = PublicKey::from_bytes([7; 32]);
        let other = PublicKey::from_bytes([9; 32]);
        let direct: std::net::SocketAddr = "127.0.0.2:51820".parse().unwrap();
        let mut s = NatStatus {
            reflexive: Some("127.0.0.9:4000".parse().unwrap()),
            candidates: vec!["127.0.0.1:51820".parse().unwrap()],
            peer_candidates: vec![(other, vec![direct])],
            ..Default::default()
        };
        s.stats.probes_sent = 18;
        s.peer_paths = vec![(
            key,
            PathSummary {
                chosen: Some(Endpoint::Udp(direct)),
                candidates: vec![direct],
                probes_sent: 9,
                rtts: vec![
                    (Endpoint::Udp(direct), Some(Duration::from_micros(1500))),
                    (Endpoint::Relay(key), None),
                ],
                ..Default::default()
            },
        )];
        let v = status_json(&s);
        assert_eq!(v["reflexive"], "127.0.0.9:4000");
        assert_eq!(v["candidates"][0], "127.0.0.1:51820");
        assert_eq!(v["stats"]["probes_sent"], 18);
        let p = &v["peers"][0];
        assert_eq!(p["public_key"], key.to_string());
        assert_eq!(p["path"]["kind"], "udp");
        assert_eq!(p["path"]["address"], "127.0.0.2:51820");
        assert_eq!(p["probes_sent"], 9);
        assert_eq!(p["rtts"][0]["rtt_us"], 1500);
        assert_eq!(p["rtts"][1]["path"]["kind"], "relay");
        assert!(p["rtts"][1]["rtt_us"].is_null());
        assert_eq!(v["pending_candidates"][0]["public_key"], other.to_string());
        assert_eq!(v["peers"].as_array().unwrap().len(), 1);
        assert!(v["discovery_age_ms"].is_null());
        s.since_discovery = Some(Duration::from_millis(2500));
        let mut t = ::meshvpn_engine::peer::PathTraffic::default();
        t.udp.tx_bytes = 100;
        t.relay.rx_bytes = 7;
        t.relay.time = Duration::from_secs(3);
        s.peer_traffic = vec![(key, t)];
        let v = status_json(&s);
        assert_eq!(v["discovery_age_ms"], 2500);
        let t = &v["traffic"][0];
        assert_eq!(t["public_key"], key.to_string());
        assert_eq!(t["direct"]["tx_bytes"], 100);
        assert_eq!(t["direct"]["rx_bytes"], 0);
        assert_eq!(t["relay"]["rx_bytes"], 7);
        assert_eq!(t["relay"]["time_ms"], 3000);
        assert!(v["relay_observed"].is_null());
        assert_eq!(v["stats"]["relay_ip_changes"], 0);
        s.relay_observed = Some("203.0.113.9:40002".parse().unwrap());
        s.stats.relay_ip_changes = 2;
        let v = status_json(&s);
        assert_eq!(v["relay_observed"], "203.0.113.9:40002");
        assert_eq!(v["stats"]["relay_ip_changes"], 2);
    }
}
