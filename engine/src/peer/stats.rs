//! Per-peer counters: lock-free, updated on the data path, read as a
//! snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;

use crate::config::PublicKey;
use crate::wire::MessageKind;

/// Why a packet to or from a peer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Nowhere to send: the peer has no endpoint yet.
    NoEndpoint,
    /// Decrypted, but its inner source is outside the peer's AllowedIPs.
    SourceNotAllowed,
    /// Authentication tag or handshake cryptography did not verify.
    DecryptFailed,
    /// A counter already seen or older than the replay window.
    Replay,
    /// A data message for a session we no longer (or never) had.
    NoSession,
    /// Handshake initiations closer than [`super::MIN_INITIATION_INTERVAL`].
    HandshakeFlood,
    /// A handshake message that failed the protocol's checks (stale
    /// timestamp, wrong index, unexpected message).
    HandshakeRejected,
    /// The decrypted packet is not a valid IP packet.
    InnerMalformed,
    /// The receiving side (TUN, userspace stack, host queue) was full, or,
    /// before the first handshake, the queue of packets waiting for it.
    SinkFull,
    /// Encryption failed or the session expired.
    SessionExpired,
    /// Decrypted, but larger than the interface MTU, which every host
    /// buffer (TUN, userspace stack, packet API) is sized to: dropped whole
    /// rather than cut, as a peer with a larger MTU would send.
    Oversized,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NoEndpoint,
        DropReason::SourceNotAllowed,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::NoSession,
        DropReason::HandshakeFlood,
        DropReason::HandshakeRejected,
        DropReason::InnerMalformed,
        DropReason::SinkFull,
        DropReason::SessionExpired,
        DropReason::Oversized,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::NoSession => "no_session",
            DropReason::HandshakeFlood => "handshake_flood",
            DropReason::HandshakeRejected => "handshake_rejected",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::SinkFull => "sink_full",
            DropReason::SessionExpired => "session_expired",
            DropReason::Oversized => "oversized",
        }
    }

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
}

impl PeerCounters {
    pub(crate) fn sent_datagram(&self, datagram: &[u8], inner_len: usize) {
        self.tx_wire_bytes.fetch_add(datagram.len() as u64, Relaxed);
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

    pub(crate) fn received_datagram(&self, kind: MessageKind, len: usize) {
        self.rx_wire_bytes.fetch_add(len as u64, Relaxed);
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

/// A point-in-time view of one peer.
#[derive(Debug, Clone)]
pub struct PeerStats {
    pub public_key: PublicKey,
    /// UDP, or the relay (then `endpoint` is the reserved relay endpoint,
    /// see [`super::relay_endpoint`]).
    pub path: super::PeerPath,
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
    /// Round trip of the last handshake we initiated, in milliseconds.
    pub handshake_rtt_ms: Option<u32>,
    pub persistent_keepalive: Option<u16>,
    /// Bytes of WireGuard datagrams sent / received, handshakes and
    /// keepalives included (what `wg show` calls transfer).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Inner IP packets and their bytes, exactly as the host sent/received them.
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub tx_inner_bytes: u64,
    pub rx_inner_bytes: u64,
    /// Handshake initiations we sent (attempts, retries included).
    pub handshakes_initiated: u64,
    /// Handshake initiations and responses from the peer that authenticated.
    pub handshakes_received: u64,
    pub keepalives_received: u64,
    pub drops: [(DropReason, u64); DropReason::ALL.len()],
}

impl PeerStats {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].1
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.1).sum()
    }
}
