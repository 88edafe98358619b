//! The path policy, as a pure function of one peer's state: when a peer
//! moves from UDP to the relay, and when it is probed back over UDP.
//!
//! ```text
//!   on UDP:   UNANSWERED_INITIATIONS initiations sent with nothing
//!             authenticated received since (one REKEY_TIMEOUT unanswered)
//!             -> ToRelay (endpoint := relay, handshake now)
//!   on relay: every probe_interval -> Probe(last UDP endpoint): a handshake
//!             initiation over UDP whose answer moves the peer back (roaming)
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::peer::{PeerPath, PeerStats};

/// Initiations sent without anything authenticated coming back before a
/// peer moves to the relay: the first and its retry after REKEY_TIMEOUT
/// (5 s, WireGuard paper section 6.4).
pub const UNANSWERED_INITIATIONS: u64 = 2;

/// What the policy asks for one peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAction {
    Stay,
    /// Move the peer to the relay and start a handshake there.
    ToRelay,
    /// Send a handshake initiation to this UDP endpoint, endpoint unchanged.
    Probe(SocketAddr),
}

/// What the policy remembers of one peer.
#[derive(Debug, Clone)]
pub struct PathState {
    /// The last UDP endpoint the peer had: where probes go.
    pub udp: Option<SocketAddr>,
    pub path: PeerPath,
    /// Initiations sent when something authenticated last arrived.
    initiations_at_rx: u64,
    rx_bytes: u64,
    last_probe: Instant,
}

impl PathState {
    pub fn new(stats: &PeerStats, now: Instant) -> PathState {
        PathState {
            udp: None,
            path: PeerPath::Udp,
            // A peer that never answered: every initiation so far counts
            // (a relay started after the peers waits for no new ones).
            initiations_at_rx: if stats.rx_bytes == 0 {
                0
            } else {
                stats.handshakes_initiated
            },
            rx_bytes: stats.rx_bytes,
            last_probe: now,
        }
    }

    /// One look at the peer (`stats` now). `relay_up`: a relay is there to
    /// move to.
    pub fn step(
        &mut self,
        stats: &PeerStats,
        relay_up: bool,
        probe_interval: Duration,
        now: Instant,
    ) -> PathAction {
        if stats.rx_bytes != self.rx_bytes {
            self.rx_bytes = stats.rx_bytes;
            self.initiations_at_rx = stats.handshakes_initiated;
        }
        if stats.path != self.path {
            self.path = stats.path;
            self.initiations_at_rx = stats.handshakes_initiated;
            self.last_probe = now;
        }
        match (stats.path, stats.endpoint) {
            (PeerPath::Udp, Some(udp)) => {
                self.udp = Some(udp);
                let unanswered = stats
                    .handshakes_initiated
                    .saturating_sub(self.initiations_at_rx);
                if relay_up && unanswered >= UNANSWERED_INITIATIONS {
                    self.path = PeerPath::Relay;
                    self.last_probe = now;
                    return PathAction::ToRelay;
                }
                PathAction::Stay
            }
            (PeerPath::Relay, _) => {
                let Some(udp) = self.udp else {
                    return PathAction::Stay;
                };
                if now.saturating_duration_since(self.last_probe) < probe_interval {
                    return PathAction::Stay;
                }
                self.last_probe = now;
                PathAction::Probe(udp)
            }
            (PeerPath::Udp, None) => PathAction::Stay,
        }
    }
}
