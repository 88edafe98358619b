//! The engine's NAT traversal runtime: STUN from the WireGuard socket
//! itself (so the mapping found is the one the tunnel uses), this node's
//! candidates, and the candidate lists peers sent through the relay. The
//! logic is sans-IO in `crate::nat::Discovery` and `crate::device::PathState`;
//! this module moves bytes and keeps the state between them.
//!
//! ```text
//!   UDP socket --rx thread--> is_stun? --> Discovery::handle (only answers to our
//!              outstanding transaction from a configured server; others counted)
//!   timer thread: Discovery::poll (retransmissions), a new round every
//!              REDISCOVER_INTERVAL, at once when the UDP port is rebound,
//!              the host's addresses change or a direct path falls back
//!   relay --RelayInbox--> Candidates? --> decode (bounded) --> pending per peer key
//!   path thread: pending -> PathState::set_candidates; our candidates to every
//!              peer through the relay every ANNOUNCE_INTERVAL, when they change,
//!              and in answer to a peer's (so both sides probe at once)
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Engine, Shared};
use crate::config::PublicKey;
use crate::device::PathSummary;
use crate::nat::{
    random_transaction_id, Discovered, Discovery, DiscoveryConfig, DiscoveryStats, Output,
};
use crate::peer::PathTraffic;
use crate::relay::protocol::{Candidates, CandidatesError, MAX_CANDIDATES};
use crate::stats::stats_struct;

/// A new discovery round this often (Tailscale's netcheck runs every
/// 20-26 s; NAT mappings for UDP commonly expire after 30 s to minutes).
pub const REDISCOVER_INTERVAL: Duration = Duration::from_secs(30);
/// Our candidates go to every peer through the relay this often, besides
/// when they change and in answer to a peer's.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(30);
/// In answer to a peer's candidates, ours go back at most this often per
/// peer (a peer resending cannot make us send more).
pub const ANSWER_GAP: Duration = Duration::from_secs(5);

stats_struct! {
@counters
/// NAT traversal counters of one engine (also the metrics page's
/// `meshvpn_nat_<field>_total`, with the field's doc as help).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatStats {
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
}

/// What `meshvpn status` shows of NAT traversal.
#[derive(Debug, Clone, Default)]
pub struct NatStatus {
    pub stun_servers: Vec<SocketAddr>,
    /// The address the STUN servers saw last (the first that answered).
    pub reflexive: Option<SocketAddr>,
    /// What we announce: local address(es) with our port, the reflexive one.
    pub candidates: Vec<SocketAddr>,
    pub discovery: DiscoveryStats,
    pub stats: NatStats,
    /// Per peer: its candidates as last received.
    pub peer_candidates: Vec<(PublicKey, Vec<SocketAddr>)>,
    /// Per peer: the path policy (chosen path, probes, round trips), as
    /// the path thread last saw it (empty while no relay is up).
    pub peer_paths: Vec<(PublicKey, PathSummary)>,
    /// The address the relay saw our last session come from (relays that
    /// tell it; `None` before the first session or with an older relay).
    /// The times its IP changed are `stats.relay_ip_changes`.
    pub relay_observed: Option<SocketAddr>,
    /// Per peer (every peer, relay or not): bytes and time on direct UDP
    /// and on the relay.
    pub peer_traffic: Vec<(PublicKey, PathTraffic)>,
    /// Since the last discovery round started (`None`: none yet, or STUN
    /// is off).
    pub since_discovery: Option<Duration>,
}

#[derive(Default)]
pub(super) struct Inner {
    discovery: Option<Discovery>,
    servers: Vec<SocketAddr>,
    next_round: Option<Instant>,
    /// When the last round started.
    last_round: Option<Instant>,
    reflexive: Option<SocketAddr>,
    /// Bumped whenever our candidates change, so the path thread announces.
    generation: u64,
    /// Candidate lists received and not yet taken by the path thread.
    pending: HashMap<PublicKey, Vec<SocketAddr>>,
    /// Every peer's last list (for status).
    known: HashMap<PublicKey, Vec<SocketAddr>>,
    /// Every peer's path policy, written by the path thread (for status).
    pub(super) paths: Vec<(PublicKey, PathSummary)>,
    /// The address the relay saw our last session come from.
    relay_observed: Option<SocketAddr>,
}

#[derive(Default)]
pub(super) struct NatSlot {
    pub(super) inner: Mutex<Inner>,
    received: AtomicU64,
    malformed: AtomicU64,
    unsupported: AtomicU64,
    unknown_peer: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) rounds: AtomicU64,
    pub(super) probes: AtomicU64,
    pub(super) deferred: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    relay_ip_changes: AtomicU64,
}

impl NatSlot {
    /// The primary local address towards `to` (the kernel's route choice,
    /// learnt with a connected UDP socket that sends nothing).
    fn local_towards(to: SocketAddr) -> Option<IpAddr> {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let s = UdpSocket::bind(bind).ok()?;
        s.connect(to).ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    }
}

impl Shared {
    /// A datagram on the WireGuard socket that `is_stun`: an answer to
    /// discovery, or dropped and counted by it. False when discovery is
    /// off (the caller treats it as any other datagram).
    pub(super) fn handle_stun(&self, from: SocketAddr, datagram: &[u8]) -> bool {
        let mut inner = self.nat.inner.lock();
        let Some(d) = inner.discovery.as_mut() else {
            return false;
        };
        if let Ok(Discovered::Reflexive {
            reflexive, changed, ..
        }) = d.handle(from, datagram)
        {
            if changed || inner.reflexive != Some(reflexive) {
                tracing::info!(%reflexive, "STUN: public address");
                inner.reflexive = Some(reflexive);
                inner.generation += 1;
            }
        }
        true
    }

    /// Timer work: discovery's retransmissions and new rounds.
    pub(super) fn poll_nat(&self, now: Instant) {
        let mut buf = [0u8; 64];
        let mut sends = Vec::new();
        {
            let mut inner = self.nat.inner.lock();
            let Some(next) = inner.next_round else {
                return;
            };
            let due = next <= now;
            if due {
                inner.next_round = Some(now + REDISCOVER_INTERVAL);
                if inner.discovery.is_some() {
                    inner.last_round = Some(now);
                }
            }
            let Some(d) = inner.discovery.as_mut() else {
                return;
            };
            if due {
                d.start(now, &mut random_transaction_id);
            }
            // At most one transmission per server per call.
            for _ in 0..crate::nat::MAX_SERVERS {
                match d.poll(now, &mut buf) {
                    Output::Transmit { to, len } => sends.push((to, buf[..len].to_vec())),
                    Output::TimedOut { server } => {
                        tracing::debug!(%server, "STUN server did not answer")
                    }
                    Output::Wait(_) => break,
                }
            }
        }
        let transport = self.transport.read().clone();
        for (to, bytes) in sends {
            let _ = transport.send_to(&bytes, to);
        }
    }

    /// Our candidates: the local address towards each STUN server with our
    /// port, and the reflexive address.
    pub(super) fn nat_candidates(&self) -> (u64, Vec<SocketAddr>) {
        let port = self.transport.read().port();
        let inner = self.nat.inner.lock();
        let mut c: Vec<SocketAddr> = Vec::new();
        for s in &inner.servers {
            if let Some(ip) = NatSlot::local_towards(*s) {
                let a = SocketAddr::new(ip, port);
                if !c.contains(&a) {
                    c.push(a);
                }
            }
        }
        if let Some(r) = inner.reflexive {
            if !c.contains(&r) {
                c.push(r);
            }
        }
        c.truncate(MAX_CANDIDATES);
        (inner.generation, c)
    }

    /// A relayed datagram that is a candidate message from `from` (the
    /// key the relay vouches for; nothing in the payload names a sender).
    pub(super) fn handle_candidates(&self, from: &PublicKey, datagram: &[u8]) {
        match Candidates::decode(datagram) {
            Ok(c) => {
                if self.device.peer(from).is_none() {
                    self.nat.unknown_peer.fetch_add(1, Relaxed);
                    return;
                }
                self.nat.received.fetch_add(1, Relaxed);
                let mut inner = self.nat.inner.lock();
                inner.known.insert(*from, c.0.clone());
                inner.pending.insert(*from, c.0);
                // Only peers are kept: both maps hold one entry per peer.
                let peers = self.device.peer_keys();
                if inner.known.len() > peers.len() {
                    inner.known.retain(|k, _| peers.contains(k));
                    inner.pending.retain(|k, _| peers.contains(k));
                }
            }
            Err(CandidatesError::Unsupported(_)) => {
                self.nat.unsupported.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.nat.malformed.fetch_add(1, Relaxed);
            }
        }
    }

    /// Starts a discovery round now: the network changed, the port was
    /// rebound, or a direct path stopped answering (our NAT may have a new
    /// public address or port for us; the netns suite's address change
    /// shows it). A round is one Binding request per server, and a server
    /// still being asked keeps its transaction, so calling this often sends
    /// no more.
    ///
    /// The same change may have killed the relay's TCP connection, which
    /// would otherwise be noticed only by its keepalive pings: the relay
    /// session is checked too (one ping with a deadline, as Tailscale pings
    /// its DERP connections after a rebind; a check while one is out adds
    /// nothing).
    pub(super) fn rediscover(&self) {
        self.check_relay();
        self.discover_now();
    }

    /// Starts a discovery round now (see [`Shared::rediscover`]).
    fn discover_now(&self) {
        let mut inner = self.nat.inner.lock();
        if inner.discovery.is_some() {
            inner.next_round = Some(Instant::now());
        }
    }

    /// The relay told us where it sees our session come from. A new IP
    /// (not the first one) starts a discovery round and is counted.
    pub(super) fn relay_observed(&self, address: SocketAddr) {
        let changed = {
            let mut inner = self.nat.inner.lock();
            let last = inner.relay_observed.replace(address);
            last.is_some_and(|l| l.ip() != address.ip())
        };
        if changed {
            tracing::info!(%address, "relay: our public address changed; discovering again");
            self.nat.relay_ip_changes.fetch_add(1, Relaxed);
            // The session that told us is new: no need to check it.
            self.discover_now();
        }
    }

    /// Whether any peer has candidates (the path thread has work without
    /// a relay).
    pub(super) fn has_peer_candidates(&self) -> bool {
        let inner = self.nat.inner.lock();
        inner.known.values().any(|c| !c.is_empty())
    }

    /// Candidate lists received since the last call.
    pub(super) fn take_pending_candidates(&self) -> Vec<(PublicKey, Vec<SocketAddr>)> {
        self.nat.inner.lock().pending.drain().collect()
    }
}

impl Engine {
    /// Candidates of peer `key` from a control server's network map (the
    /// server vouches for them as the relay does for a candidate message):
    /// probed as relayed candidates are, bounded to `MAX_CANDIDATES` and
    /// the same probe budget. False when `key` is not a peer.
    pub fn set_peer_candidates(&self, key: &PublicKey, list: &[SocketAddr]) -> bool {
        if self.shared.device.peer(key).is_none() {
            return false;
        }
        let mut list = list.to_vec();
        list.truncate(MAX_CANDIDATES);
        let mut inner = self.shared.nat.inner.lock();
        inner.known.insert(*key, list.clone());
        inner.pending.insert(*key, list);
        true
    }

    /// Discovers this node's public address with STUN Binding requests to
    /// `servers`, sent from the WireGuard socket (empty: off). A round
    /// starts now and every [`REDISCOVER_INTERVAL`].
    pub fn set_stun_servers(&self, servers: &[SocketAddr]) -> Result<(), String> {
        let mut inner = self.shared.nat.inner.lock();
        if servers.is_empty() {
            inner.discovery = None;
            inner.servers.clear();
            inner.next_round = None;
            inner.last_round = None;
            return Ok(());
        }
        inner.discovery = Some(Discovery::new(servers, DiscoveryConfig::default())?);
        inner.servers = servers.to_vec();
        inner.next_round = Some(Instant::now());
        inner.last_round = None;
        inner.reflexive = None;
        inner.generation += 1;
        Ok(())
    }

    /// Starts a discovery round now (the network changed).
    pub fn rediscover(&self) {
        self.shared.rediscover();
    }

    pub fn nat_stats(&self) -> NatStats {
        let n = &self.shared.nat;
        NatStats {
            candidates_received: n.received.load(Relaxed),
            candidates_malformed: n.malformed.load(Relaxed),
            candidates_unsupported: n.unsupported.load(Relaxed),
            candidates_unknown_peer: n.unknown_peer.load(Relaxed),
            candidates_sent: n.sent.load(Relaxed),
            probe_rounds: n.rounds.load(Relaxed),
            probes_sent: n.probes.load(Relaxed),
            probes_deferred: n.deferred.load(Relaxed),
            fallbacks: n.fallbacks.load(Relaxed),
            relay_ip_changes: n.relay_ip_changes.load(Relaxed),
        }
    }

    /// The reply to the UAPI request `get=meshvpn-paths` (`meshvpn status`
    /// without `--metrics`): `key=value` lines, without the closing
    /// `errno=0`: `last_discovery_ms` (when a round ran), `relay_observed`
    /// and `relay_ip_changes` (the address the relay sees us come from and
    /// how often its IP changed; when a relay told one), then per peer
    /// `public_key` (hex) and one `candidate` line per candidate (the path
    /// is `get=1`'s endpoint). A request of its own, not keys added to `get=1`: `wg`
    /// and wgctrl ignore unknown keys there, but older meshvpn parsers
    /// (`config::uapi::parse_get`) refuse them.
    pub fn uapi_paths(&self) -> String {
        use std::fmt::Write;
        let status = self.nat_status();
        let mut out = String::new();
        if let Some(d) = status.since_discovery {
            let _ = writeln!(out, "last_discovery_ms={}", d.as_millis());
        }
        if let Some(a) = status.relay_observed {
            let _ = writeln!(out, "relay_observed={a}");
            let _ = writeln!(out, "relay_ip_changes={}", status.stats.relay_ip_changes);
        }
        for peer in self.shared.device.peers() {
            let key = peer.public_key();
            let _ = writeln!(out, "public_key={}", key.to_hex());
            let listed = status.peer_candidates.iter().find(|(k, _)| *k == key);
            for a in listed.map(|(_, c)| c.as_slice()).unwrap_or_default() {
                let _ = writeln!(out, "candidate={a}");
            }
        }
        out
    }

    /// Bytes and time of peer `key` on direct UDP and on the relay.
    pub fn peer_path_traffic(&self, key: &PublicKey) -> Option<PathTraffic> {
        let peer = self.shared.device.peer(key)?;
        Some(peer.path_traffic(Instant::now()))
    }

    pub fn nat_status(&self) -> NatStatus {
        let (_, candidates) = self.shared.nat_candidates();
        let now = Instant::now();
        let peer_traffic = self
            .shared
            .device
            .peers()
            .iter()
            .map(|p| (p.public_key(), p.path_traffic(now)))
            .collect();
        let inner = self.shared.nat.inner.lock();
        NatStatus {
            peer_traffic,
            since_discovery: inner.last_round.map(|t| now.saturating_duration_since(t)),
            stun_servers: inner.servers.clone(),
            reflexive: inner.reflexive,
            candidates,
            discovery: inner
                .discovery
                .as_ref()
                .map(|d| d.stats())
                .unwrap_or_default(),
            stats: self.nat_stats(),
            peer_candidates: inner.known.iter().map(|(k, v)| (*k, v.clone())).collect(),
            peer_paths: inner.paths.clone(),
            relay_observed: inner.relay_observed,
        }
    }
}
