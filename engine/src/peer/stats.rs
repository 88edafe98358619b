//! Per-peer counters: lock-free, updated on the data path, read as a
//! snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;

use crate::config::PublicKey;
use crate::stats::{stats_reasons, stats_struct};
use crate::wire::MessageKind;

stats_reasons! {
    /// Why a packet to or from a peer was dropped.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum DropReason {
        /// Nowhere to send: the peer has no endpoint yet.
        NoEndpoint = "no_endpoint",
        /// Decrypted, but its inner source is outside the peer's AllowedIPs.
        SourceNotAllowed = "source_not_allowed",
        /// Authentication tag or handshake cryptography did not verify.
        DecryptFailed = "decrypt_failed",
        /// A counter already seen or older than the replay window.
        Replay = "replay",
        /// A data message for a session we no longer (or never) had.
        NoSession = "no_session",
        /// Handshake initiations closer than [`super::MIN_INITIATION_INTERVAL`].
        HandshakeFlood = "handshake_flood",
        /// A handshake message that failed the protocol's checks (stale
        /// timestamp, wrong index, unexpected message).
        HandshakeRejected = "handshake_rejected",
        /// The decrypted packet is not a valid IP packet.
        InnerMalformed = "inner_malformed",
        /// The receiving side (TUN, userspace stack, host queue) was full, or,
        /// before the first handshake, the queue of packets waiting for it.
        SinkFull = "sink_full",
        /// Encryption failed or the session expired.
        SessionExpired = "session_expired",
        /// Decrypted, but larger than the interface MTU, which every host
        /// buffer (TUN, userspace stack, packet API) is sized to: dropped whole
        /// rather than cut, as a peer with a larger MTU would send.
        Oversized = "oversized",
    }
}

impl DropReason {
    pub(crate) fn from_error(e: &WireGuardError) -> DropReason {
        use WireGuardError as E;
        match e {
            E::InvalidAeadTag | E::InvalidMac | E::WrongKey => DropReason::DecryptFailed,
            E::InvalidCounter | E::DuplicateCounter => DropReason::Replay,
            E::NoCurrentSession => DropReason::NoSession,
            E::InvalidPacket | E::IncorrectPacketLength => DropReason::InnerMalformed,
            E::ConnectionExpired => DropReason::SessionExpired,
            _ => DropReason::HandshakeRejected,
        }
    }
}

#[derive(Default)]
pub struct PeerCounters {
    tx_wire_bytes: AtomicU64,
    rx_wire_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_packets: AtomicU64,
    tx_inner_bytes: AtomicU64,
    rx_inner_bytes: AtomicU64,
    handshakes_initiated: AtomicU64,
    handshakes_received: AtomicU64,
    keepalives_received: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Wire bytes per path kind and direction ([`path_slot`]): counted with
    /// `tx_wire_bytes`/`rx_wire_bytes`, so the four sum to those two.
    path_bytes: [AtomicU64; 4],
}

/// The slot of `path_bytes` for one path kind and direction.
fn path_slot(path: super::PeerPath, tx: bool) -> usize {
    let p = match path {
        super::PeerPath::Udp => 0,
        super::PeerPath::Relay => 2,
    };
    p + usize::from(!tx)
}

/// Bytes and time of one peer on one path kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathUse {
    /// Wire bytes of WireGuard datagrams sent on this path kind (handshakes,
    /// probes and keepalives included, as `PeerStats::tx_bytes`).
    pub tx_bytes: u64,
    /// Wire bytes received on it that authenticated as the peer.
    pub rx_bytes: u64,
    /// Time the peer's endpoint was of this kind: every past stretch and
    /// the current one.
    pub time: Duration,
}

/// A peer's traffic split by path kind: direct UDP and the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathTraffic {
    pub udp: PathUse,
    pub relay: PathUse,
}

impl PeerCounters {
    /// Every WireGuard datagram produced for the peer, with the path kind
    /// it goes out on (the one place sent bytes are counted).
    pub(crate) fn sent_datagram(&self, datagram: &[u8], inner_len: usize, path: super::PeerPath) {
        self.tx_wire_bytes.fetch_add(datagram.len() as u64, Relaxed);
        self.path_bytes[path_slot(path, true)].fetch_add(datagram.len() as u64, Relaxed);
        match datagram.first() {
            Some(1) => {
                self.handshakes_initiated.fetch_add(1, Relaxed);
            }
            Some(4) if inner_len > 0 => {
                self.tx_packets.fetch_add(1, Relaxed);
                self.tx_inner_bytes.fetch_add(inner_len as u64, Relaxed);
            }
            _ => {}
        }
    }

    /// Every datagram that authenticated as the peer, with the path kind
    /// it came in on (the one place received bytes are counted).
    pub(crate) fn received_datagram(&self, kind: MessageKind, len: usize, path: super::PeerPath) {
        self.rx_wire_bytes.fetch_add(len as u64, Relaxed);
        self.path_bytes[path_slot(path, false)].fetch_add(len as u64, Relaxed);
        match kind {
            MessageKind::HandshakeInitiation | MessageKind::HandshakeResponse => {
                self.handshakes_received.fetch_add(1, Relaxed);
            }
            MessageKind::Data if len == crate::wire::message::DATA_OVERHEAD => {
                self.keepalives_received.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }

    pub(crate) fn received_packet(&self, inner_len: usize) {
        self.rx_packets.fetch_add(1, Relaxed);
        self.rx_inner_bytes.fetch_add(inner_len as u64, Relaxed);
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Relaxed)
    }

    /// Bytes per path kind; the times are the caller's (`Peer::path_traffic`).
    pub(crate) fn path_bytes(&self, udp_time: Duration, relay_time: Duration) -> PathTraffic {
        let b = |path, tx| self.path_bytes[path_slot(path, tx)].load(Relaxed);
        use super::PeerPath::{Relay, Udp};
        PathTraffic {
            udp: PathUse {
                tx_bytes: b(Udp, true),
                rx_bytes: b(Udp, false),
                time: udp_time,
            },
            relay: PathUse {
                tx_bytes: b(Relay, true),
                rx_bytes: b(Relay, false),
                time: relay_time,
            },
        }
    }

    pub(crate) fn snapshot(
        &self,
        public_key: PublicKey,
        endpoint: Option<SocketAddr>,
        since_handshake: Option<Duration>,
        rtt_ms: Option<u32>,
        persistent_keepalive: Option<u16>,
    ) -> PeerStats {
        PeerStats {
            public_key,
            path: super::PeerPath::of(endpoint),
            endpoint,
            last_handshake: since_handshake.and_then(|d| SystemTime::now().checked_sub(d)),
            handshake_rtt_ms: rtt_ms,
            persistent_keepalive,
            tx_bytes: self.tx_wire_bytes.load(Relaxed),
            rx_bytes: self.rx_wire_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            rx_packets: self.rx_packets.load(Relaxed),
            tx_inner_bytes: self.tx_inner_bytes.load(Relaxed),
            rx_inner_bytes: self.rx_inner_bytes.load(Relaxed),
            handshakes_initiated: self.handshakes_initiated.load(Relaxed),
            handshakes_received: self.handshakes_received.load(Relaxed),
            keepalives_received: self.keepalives_received.load(Relaxed),
            drops: DropReason::ALL.map(|r| (r, self.drops(r))),
        }
    }
}

stats_struct! {
    /// A point-in-time view of one peer.
    #[derive(Debug, Clone)]
    pub struct PeerStats {
        /// The peer's static public key.
        pub public_key: PublicKey,
        /// UDP, or the relay (then `endpoint` is the reserved relay endpoint,
        /// see [`super::relay_endpoint`]).
        pub path: super::PeerPath,
        /// Where the peer's datagrams go now; `None` until one is known.
        pub endpoint: Option<SocketAddr>,
        /// Wall-clock time of the last completed handshake.
        pub last_handshake: Option<SystemTime>,
        /// Round trip of the last handshake we initiated, in milliseconds.
        pub handshake_rtt_ms: Option<u32>,
        /// Seconds between keepalives; `None` when off.
        pub persistent_keepalive: Option<u16>,
        /// Bytes of WireGuard datagrams sent, handshakes and keepalives
        /// included (what `wg show` calls transfer).
        pub tx_bytes: u64,
        /// Bytes of WireGuard datagrams received, as `tx_bytes`.
        pub rx_bytes: u64,
        /// Inner IP packets sent to the peer, as the host sent them.
        pub tx_packets: u64,
        /// Inner IP packets received from the peer, as the host got them.
        pub rx_packets: u64,
        /// Bytes of the inner packets sent.
        pub tx_inner_bytes: u64,
        /// Bytes of the inner packets received.
        pub rx_inner_bytes: u64,
        /// Handshake initiations we sent (attempts, retries included).
        pub handshakes_initiated: u64,
        /// Handshake initiations and responses from the peer that authenticated.
        pub handshakes_received: u64,
        /// Keepalives (empty data messages) from the peer.
        pub keepalives_received: u64,
        /// Dropped packets, by [`DropReason`] (in the order of `DropReason::ALL`).
        pub drops: [(DropReason, u64); DropReason::ALL.len()],
    }
}

impl PeerStats {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].1
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.1).sum()
    }
}
