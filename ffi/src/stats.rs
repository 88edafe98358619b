//! `meshvpn_stats` and `meshvpn_peer_stats`: counters, copied out
//! as plain structs.

use std::ffi::c_char;
use std::time::UNIX_EPOCH;

use ::meshvpn_engine::peer::{DropReason, PeerPath, PeerStats};
use ::meshvpn_engine::relay::RelayServerStats;
use ::meshvpn_engine::supervisor::{AgentStats, ServerStats};
use ::meshvpn_engine::wg::{EngineStats, NatStats};

use crate::engine::{lookup, meshvpn_engine};
use crate::error::{meshvpn_result, Error};
use crate::key::meshvpn_key;
use crate::ptr::{self, Out};
use crate::tunnel::agent::meshvpn_tunnel_agent_status;
use crate::tunnel::server::{meshvpn_relay_server_stats, meshvpn_tunnel_server_stats};

/// Why packets to or from a peer were dropped: the index into
/// `meshvpn_peer_stats.drops`. Numbers are stable and never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum meshvpn_drop_reason {
    /// Nowhere to send: the peer has no endpoint yet.
    MESHVPN_DROP_NO_ENDPOINT = 0,
    /// Decrypted, but the inner source is outside the peer's AllowedIPs.
    MESHVPN_DROP_SOURCE_NOT_ALLOWED = 1,
    /// Authentication or handshake cryptography did not verify.
    MESHVPN_DROP_DECRYPT_FAILED = 2,
    /// A replayed counter, or one older than the replay window.
    MESHVPN_DROP_REPLAY = 3,
    /// A data message for a session that does not exist (any more).
    MESHVPN_DROP_NO_SESSION = 4,
    /// Handshake initiations arriving faster than allowed.
    MESHVPN_DROP_HANDSHAKE_FLOOD = 5,
    /// A handshake message that failed the protocol's checks.
    MESHVPN_DROP_HANDSHAKE_REJECTED = 6,
    /// The decrypted packet is not a valid IP packet.
    MESHVPN_DROP_INNER_MALFORMED = 7,
    /// The receiving side (host queue, TUN, userspace stack) was full, or,
    /// before the first handshake, the queue of packets waiting for it.
    MESHVPN_DROP_SINK_FULL = 8,
    /// Encryption failed or the session expired.
    MESHVPN_DROP_SESSION_EXPIRED = 9,
    /// Decrypted, but larger than the interface MTU (the size of every
    /// receive buffer): dropped whole, never cut.
    MESHVPN_DROP_OVERSIZED = 10,
}

/// Room in `meshvpn_peer_stats.drops`; reasons added later use the unused
/// slots, so the struct keeps its size.
pub const MESHVPN_DROP_REASON_COUNT: usize = 16;
/// Size of `meshvpn_peer_stats.endpoint` (the longest IPv6 endpoint with a
/// scope and port fits).
pub const MESHVPN_ENDPOINT_TEXT_LEN: usize = 64;
/// `meshvpn_peer_stats.handshake_rtt_ms` when no round trip was measured.
pub const MESHVPN_RTT_UNKNOWN: u32 = u32::MAX;

const _: () = assert!(DropReason::ALL.len() <= MESHVPN_DROP_REASON_COUNT);

fn drop_index(r: DropReason) -> meshvpn_drop_reason {
    use meshvpn_drop_reason::*;
    match r {
        DropReason::NoEndpoint => MESHVPN_DROP_NO_ENDPOINT,
        DropReason::SourceNotAllowed => MESHVPN_DROP_SOURCE_NOT_ALLOWED,
        DropReason::DecryptFailed => MESHVPN_DROP_DECRYPT_FAILED,
        DropReason::Replay => MESHVPN_DROP_REPLAY,
        DropReason::NoSession => MESHVPN_DROP_NO_SESSION,
        DropReason::HandshakeFlood => MESHVPN_DROP_HANDSHAKE_FLOOD,
        DropReason::HandshakeRejected => MESHVPN_DROP_HANDSHAKE_REJECTED,
        DropReason::InnerMalformed => MESHVPN_DROP_INNER_MALFORMED,
        DropReason::SinkFull => MESHVPN_DROP_SINK_FULL,
        DropReason::SessionExpired => MESHVPN_DROP_SESSION_EXPIRED,
        DropReason::Oversized => MESHVPN_DROP_OVERSIZED,
    }
}

/// Engine-wide counters of packets that never reached a peer.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_stats {
    /// Datagrams that are not WireGuard messages.
    pub rx_malformed: u64,
    /// Messages for a session index no peer has.
    pub rx_unknown_index: u64,
    /// Handshake initiations from keys that are not peers.
    pub rx_unknown_peer: u64,
    /// Handshake messages whose MAC1 did not verify.
    pub rx_invalid_mac: u64,
    /// Cookie replies sent while under load.
    pub cookie_replies_sent: u64,
    /// Packets from the host that are not IP packets.
    pub tx_malformed: u64,
    /// Packets from the host no peer's AllowedIPs covers.
    pub tx_no_route: u64,
    /// UDP sends that failed.
    pub udp_send_errors: u64,
    /// Encrypted datagrams those failed sends dropped (a batched run
    /// counts each of its datagrams), runs still blocked after the send
    /// wait included.
    pub udp_send_dropped: u64,
    /// Packets dropped because the buffer ceiling
    /// (`meshvpn_engine_set_buffer_limit`) was reached; also counted as
    /// `MESHVPN_DROP_SINK_FULL` on their peer.
    pub buffer_limit_drops: u64,
    /// Flows the packet filter tracks now.
    pub filter_flows: u64,
    /// Filter drops: not an IP packet, or its TCP, UDP or ICMP header cut
    /// short.
    pub filter_malformed: u64,
    /// Filter drops: an IPv4 TCP fragment at offset 1 (RFC 1858).
    pub filter_fragment: u64,
    /// Filter drops: a peer's packet starting a flow no inbound rule
    /// accepts.
    pub filter_not_allowed: u64,
    /// Filter drops: a peer's reply-like packet (ACK, SYN-ACK, echo reply)
    /// with no tracked flow and no rule accepting it.
    pub filter_no_state: u64,
    /// Filter drops: a host packet starting a flow no outbound rule
    /// accepts (its send fails with `MESHVPN_PACKET_DROPPED`).
    pub filter_outbound_denied: u64,
    /// Filter drops: an accepted new flow found the tracking table full.
    pub filter_table_full: u64,
    /// Filter drops: an accepted new flow's peer already holds its share
    /// of the tracking table.
    pub filter_source_share: u64,
}

// The conversions below destructure without `..`: a field added to an
// engine stats struct does not compile until it is handled here, and the
// parity test (src/parity.rs) then checks the header and the Go binding.
impl From<EngineStats> for meshvpn_stats {
    fn from(s: EngineStats) -> Self {
        let EngineStats {
            rx_malformed,
            rx_unknown_index,
            rx_unknown_peer,
            rx_invalid_mac,
            cookie_replies_sent,
            tx_malformed,
            tx_no_route,
            udp_send_errors,
            udp_send_dropped,
            buffer_limit_drops,
            filter_flows,
            filter_malformed,
            filter_fragment,
            filter_not_allowed,
            filter_no_state,
            filter_outbound_denied,
            filter_table_full,
            filter_source_share,
        } = s;
        meshvpn_stats {
            rx_malformed,
            rx_unknown_index,
            rx_unknown_peer,
            rx_invalid_mac,
            cookie_replies_sent,
            tx_malformed,
            tx_no_route,
            udp_send_errors,
            udp_send_dropped,
            buffer_limit_drops,
            filter_flows,
            filter_malformed,
            filter_fragment,
            filter_not_allowed,
            filter_no_state,
            filter_outbound_denied,
            filter_table_full,
            filter_source_share,
        }
    }
}

/// A point-in-time view of one peer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct meshvpn_peer_stats {
    pub public_key: meshvpn_key,
    /// The current endpoint as NUL-terminated text (`"192.0.2.1:51820"`,
    /// `"[2001:db8::1]:51820"`), empty when none is known.
    pub endpoint: [c_char; MESHVPN_ENDPOINT_TEXT_LEN],
    /// Wall-clock time of the last completed handshake, in milliseconds
    /// since the Unix epoch; 0 if there has been none.
    pub last_handshake_unix_ms: u64,
    /// Round trip of the last handshake this side initiated, or
    /// `MESHVPN_RTT_UNKNOWN`.
    pub handshake_rtt_ms: u32,
    /// Seconds between keepalives; 0 when off.
    pub persistent_keepalive: u16,
    /// Encrypted bytes sent and received over the network (WireGuard
    /// messages, handshakes included).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Inner packets and their bytes, sent to and received from the peer.
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub tx_inner_bytes: u64,
    pub rx_inner_bytes: u64,
    /// Handshake initiations sent (retries included).
    pub handshakes_initiated: u64,
    /// Authenticated handshake messages received.
    pub handshakes_received: u64,
    pub keepalives_received: u64,
    /// Dropped packets, indexed by `meshvpn_drop_reason`.
    pub drops: [u64; MESHVPN_DROP_REASON_COUNT],
    /// The peer's datagrams go through the relay now
    /// (`meshvpn_engine_relay_start`); `endpoint` then reads
    /// `"[100::N]:0"`, a reserved address standing for the relay.
    pub on_relay: bool,
}

impl From<&PeerStats> for meshvpn_peer_stats {
    fn from(s: &PeerStats) -> Self {
        let PeerStats {
            public_key,
            path,
            endpoint,
            last_handshake,
            handshake_rtt_ms,
            persistent_keepalive,
            tx_bytes,
            rx_bytes,
            tx_packets,
            rx_packets,
            tx_inner_bytes,
            rx_inner_bytes,
            handshakes_initiated,
            handshakes_received,
            keepalives_received,
            drops: by_reason,
        } = s;
        let mut endpoint_text = [0 as c_char; MESHVPN_ENDPOINT_TEXT_LEN];
        if let Some(e) = endpoint {
            let text = e.to_string();
            let n = text.len().min(MESHVPN_ENDPOINT_TEXT_LEN - 1);
            for (d, b) in endpoint_text.iter_mut().zip(&text.as_bytes()[..n]) {
                *d = *b as c_char;
            }
        }
        let mut drops = [0u64; MESHVPN_DROP_REASON_COUNT];
        for (reason, count) in by_reason {
            drops[drop_index(*reason) as usize] = *count;
        }
        meshvpn_peer_stats {
            public_key: meshvpn_key::from_public(public_key),
            endpoint: endpoint_text,
            last_handshake_unix_ms: last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64),
            handshake_rtt_ms: handshake_rtt_ms.unwrap_or(MESHVPN_RTT_UNKNOWN),
            persistent_keepalive: persistent_keepalive.unwrap_or(0),
            tx_bytes: *tx_bytes,
            rx_bytes: *rx_bytes,
            tx_packets: *tx_packets,
            rx_packets: *rx_packets,
            tx_inner_bytes: *tx_inner_bytes,
            rx_inner_bytes: *rx_inner_bytes,
            handshakes_initiated: *handshakes_initiated,
            handshakes_received: *handshakes_received,
            keepalives_received: *keepalives_received,
            drops,
            on_relay: *path == PeerPath::Relay,
        }
    }
}

/// Copies the engine-wide counters into `*out_stats`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time; the counters
/// are read one by one while traffic flows, not as an atomic snapshot.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_stats(
    engine: *const meshvpn_engine,
    out_stats: *mut meshvpn_stats,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        Out::new(out_stats, "out_stats")?.write(e.stats().into());
        Ok(())
    }}
}

/// Copies the counters of the peer with `public_key` into `*out_stats`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_NO_SUCH_PEER`.
///
/// Thread safety: safe to call from any thread at any time; see
/// `meshvpn_engine_stats` on consistency.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_peer_stats(
    engine: *const meshvpn_engine,
    public_key: *const meshvpn_key,
    out_stats: *mut meshvpn_peer_stats,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a valid key or NULL.
        let key = unsafe { ptr::try_ref(public_key, "public_key") }?.public();
        let out = Out::new(out_stats, "out_stats")?;
        let stats = e
            .peer_stats(&key)
            .ok_or_else(|| Error::new(meshvpn_result::MESHVPN_NO_SUCH_PEER, format!("no peer {key}")))?;
        out.write((&stats).into());
        Ok(())
    }}
}

impl From<ServerStats> for meshvpn_tunnel_server_stats {
    fn from(s: ServerStats) -> Self {
        let ServerStats {
            sessions,
            handshakes,
            refused_handshakes,
            refused_handshakes_per_source,
            relay_sessions,
            refused_relay_sessions,
            refused_relay_sessions_per_source,
        } = s;
        meshvpn_tunnel_server_stats {
            sessions: sessions as u64,
            handshakes: handshakes as u64,
            refused_handshakes,
            refused_handshakes_per_source,
            relay_sessions: relay_sessions as u64,
            refused_relay_sessions,
            refused_relay_sessions_per_source,
        }
    }
}

impl From<RelayServerStats> for meshvpn_relay_server_stats {
    fn from(s: RelayServerStats) -> Self {
        let RelayServerStats {
            clients,
            registrations,
            replaced,
            refused,
            forwarded,
            dropped_unknown,
            dropped_full,
            dropped_malformed,
            dropped_budget,
            closed_slow,
            queued_bytes,
            queued_bytes_peak,
            session_queued_bytes_peak,
        } = s;
        meshvpn_relay_server_stats {
            clients: clients as u64,
            registrations,
            replaced,
            refused,
            forwarded,
            dropped_unknown,
            dropped_full,
            dropped_malformed,
            dropped_budget,
            closed_slow,
            queued_bytes: queued_bytes as u64,
            queued_bytes_peak: queued_bytes_peak as u64,
            session_queued_bytes_peak: session_queued_bytes_peak as u64,
        }
    }
}

impl From<AgentStats> for meshvpn_tunnel_agent_status {
    fn from(s: AgentStats) -> Self {
        let AgentStats {
            connected,
            sessions,
            reconnects,
            streams_active,
            streams_total,
            streams_refused,
            bytes_to_targets,
            bytes_from_targets,
            streams_refused_at_cap,
            dials_failed,
        } = s;
        meshvpn_tunnel_agent_status {
            connected,
            sessions,
            reconnects,
            streams_active,
            streams_total,
            streams_refused,
            bytes_to_targets,
            bytes_from_targets,
            streams_refused_at_cap,
            dials_failed,
        }
    }
}

/// NAT traversal counters of one engine, from `meshvpn_engine_nat_stats`
/// (the fields of the engine's `NatStats`, checked by the parity test).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_nat_stats {
    /// Candidate messages accepted from peers.
    pub candidates_received: u64,
    /// Candidate messages refused by the parser.
    pub candidates_malformed: u64,
    /// Candidate messages of a version we do not speak.
    pub candidates_unsupported: u64,
    /// Candidate messages from a key that is not a peer.
    pub candidates_unknown_peer: u64,
    /// Candidate messages sent to peers.
    pub candidates_sent: u64,
    /// Probing rounds, all peers.
    pub probe_rounds: u64,
    /// Datagrams those rounds sent.
    pub probes_sent: u64,
    /// Rounds put off by the device-wide probe budget.
    pub probes_deferred: u64,
    /// Direct paths given up for the relay.
    pub fallbacks: u64,
    /// Times the IP the relay sees our session come from changed between
    /// sessions (our NAT's public address moved; each started a STUN round).
    pub relay_ip_changes: u64,
}

impl From<NatStats> for meshvpn_nat_stats {
    fn from(s: NatStats) -> Self {
        // Exhaustive: a new engine field does not compile until it is here.
        let NatStats {
            candidates_received,
            candidates_malformed,
            candidates_unsupported,
            candidates_unknown_peer,
            candidates_sent,
            probe_rounds,
            probes_sent,
            probes_deferred,
            fallbacks,
            relay_ip_changes,
        } = s;
        meshvpn_nat_stats {
            candidates_received,
            candidates_malformed,
            candidates_unsupported,
            candidates_unknown_peer,
            candidates_sent,
            probe_rounds,
            probes_sent,
            probes_deferred,
            fallbacks,
            relay_ip_changes,
        }
    }
}

/// Copies the engine's NAT traversal counters into `*out_stats`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time; see
/// `meshvpn_engine_stats` on consistency.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_nat_stats(
    engine: *const meshvpn_engine,
    out_stats: *mut meshvpn_nat_stats,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        Out::new(out_stats, "out_stats")?.write(e.nat_stats().into());
        Ok(())
    }}
}
