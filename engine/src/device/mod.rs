//! The WireGuard device core, sans-IO: identity, the peer table, routing,
//! the datagram dispatch (framing, the handshake rate limiter and cookies,
//! the relay's source check), the inner source check, and the counters.
//!
//! No threads, sockets or clock reads here: every call takes `now` and the
//! caller's buffers, and hands what must be sent to a [`DeviceIo`] (and
//! what must be delivered back as [`Received`]). The runtime
//! (`wg::Engine`) owns the threads, sockets, TUN and batching and only
//! moves bytes between them and this core. Internal locks are fine (several
//! receive threads call in at once); I/O is not. Modelled on quinn-proto's
//! `Endpoint::handle` under quinn's runtime.
//!
//! ```text
//!   send:  encapsulate(now, packet, out) --route--> Peer::encapsulate --> Encapsulated
//!   recv:  handle_datagram(now, from, bytes, out, io) --> framing --> Peer::decapsulate
//!          --> source check --> Received::Packet (in `out`), replies via `io`
//!   timers: poll_timers(now, out, io)
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod path;

pub use path::{
    PathAction, PathMove, PathState, PathSummary, PathTick, ProbeBudget, FLAP_HOLDDOWN, HOLD_YIELD,
    LIVENESS_MISSES, LIVENESS_QUIET, LIVENESS_RESERVE_PERCENT, LIVENESS_TIMEOUT, MAX_FLAP_SHIFT,
    MEASURE_GAP, MEASURE_TIMEOUT, MIN_BURST_GAP, PROBES_PER_SECOND, PROBE_BURST_ROUNDS,
    PROBE_FIRST_RETRY, REPROBE_INTERVAL, RTT_MAX_AGE, SETTLE, STABLE_DIRECT, SWITCH_DWELL,
    SWITCH_MARGIN_MIN, SWITCH_MARGIN_PERCENT, UNANSWERED_INITIATIONS,
};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519;
use parking_lot::{Mutex, RwLock};

use crate::config::{PeerConfig, PresharedKey, PrivateKey, PublicKey};
use crate::filter::{
    reject, ConntrackLimits, Direction, FilterDrop, FilterRules, FilterStats, RejectLimiter,
    ShardedFilter, Verdict, REJECT_ANSWER_MAX,
};
use crate::peer::{BufferBudget, DropReason, Peer, PeerOutput, PeerStats};
pub use crate::peer::{Endpoint, PeerPath};
use crate::router::{AllowedIps, IpPrefix};
use crate::wire::{IpHeader, MessageKind, WireMessage};

/// Handshake messages (initiations and responses) per second the whole
/// device processes before it demands cookies (boringtun's device uses the
/// same order of magnitude). Each message passes the limiter once, here.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// Where a device's datagrams leave: the runtime's UDP sockets and relay.
pub trait DeviceIo {
    /// Sends one encrypted datagram to `to`. A failure is the transport's
    /// to count; the protocol recovers from loss by itself.
    fn send(&mut self, datagram: &[u8], to: &Endpoint);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("not an IP packet")]
    Malformed,
    #[error("no peer's AllowedIPs covers the destination")]
    NoRoute,
    #[error("dropped: {}", .0.name())]
    Dropped(DropReason),
    /// The packet filter refused a flow the host tried to start.
    #[error("refused by the packet filter: {}", .0.name())]
    Filtered(FilterDrop),
    #[error("the UDP send failed")]
    Network,
    #[error("the engine is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0} has a low-order public key; no handshake is possible with it")]
    LowOrderKey(PublicKey),
    #[error("peer {0} is this device's own public key")]
    OwnKey(PublicKey),
    #[error("no peer {0}")]
    NoSuchPeer(PublicKey),
}

/// A partial change to a peer, as the UAPI expresses it.
#[derive(Debug, Clone, Default)]
pub struct PeerUpdate {
    /// `Some(None)` removes the preshared key.
    pub preshared_key: Option<Option<PresharedKey>>,
    /// As the UAPI writes it: the reserved relay form stands for the relay.
    pub endpoint: Option<std::net::SocketAddr>,
    /// `Some(None)` or `Some(Some(0))` disables keepalive.
    pub persistent_keepalive: Option<Option<u16>>,
    /// Drop the peer's current AllowedIPs before adding `allowed_ips`.
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpPrefix>,
}

/// What an outgoing packet became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulated {
    /// `out[..len]` is a datagram for `to` (the encrypted packet, or the
    /// handshake initiation it waits behind).
    Datagram { len: usize, to: Endpoint },
    /// Queued behind a handshake already in flight.
    Queued,
}

/// What an incoming datagram gave the caller.
pub enum Received {
    Nothing,
    /// `out[..len]` is a decrypted packet from `peer` that passed the
    /// source check. When `flush` is true, call [`Device::flush_queued`]
    /// (with a fresh buffer) next: packets that waited for a session go.
    Packet {
        peer: Arc<Peer>,
        len: usize,
        flush: bool,
    },
    /// Nothing to deliver; call [`Device::flush_queued`] for `peer`.
    Flush(Arc<Peer>),
}

/// Counters for datagrams and packets that never reached a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub rx_malformed: u64,
    pub rx_unknown_index: u64,
    pub rx_unknown_peer: u64,
    pub rx_invalid_mac: u64,
    pub cookie_replies_sent: u64,
    pub tx_malformed: u64,
    pub tx_no_route: u64,
}

#[derive(Default)]
struct Counters {
    rx_malformed: AtomicU64,
    rx_unknown_index: AtomicU64,
    rx_unknown_peer: AtomicU64,
    rx_invalid_mac: AtomicU64,
    cookie_replies_sent: AtomicU64,
    tx_malformed: AtomicU64,
    tx_no_route: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Our own key and what derives from it.
struct Identity {
    private_key: Option<PrivateKey>,
    secret: Option<x25519::StaticSecret>,
    public: Option<x25519::PublicKey>,
    /// The device-wide handshake limiter: every handshake message passes
    /// it once, in [`Device::handle_datagram`].
    limiter: Arc<RateLimiter>,
    /// What the peers' `Tunn`s get: it checks MAC1 again (a keyed hash)
    /// but is never under load, so no message counts twice. The second
    /// MAC1 check cannot go without patching boringtun: 0.7.1's
    /// `Tunn::decapsulate` always runs its limiter's `verify_packet`, and
    /// the call that takes an already verified packet
    /// (`handle_verified_packet`) is `pub(crate)`. Ours cannot go either:
    /// it guards the Diffie-Hellman in `parse_handshake_anon` and counts
    /// the device-wide handshake load (cookies). The second
    /// check only runs for messages that passed the first, next to at
    /// least one Diffie-Hellman: `benches/handshake` `mac1_check` puts it
    /// near 0.1% of a handshake.
    mac_only: Arc<RateLimiter>,
}

impl Identity {
    fn new(private_key: Option<PrivateKey>) -> Identity {
        let secret = private_key.as_ref().map(|k| k.to_x25519());
        let public = secret.as_ref().map(x25519::PublicKey::from);
        let key = public.unwrap_or(x25519::PublicKey::from([0u8; 32]));
        Identity {
            private_key,
            secret,
            public,
            limiter: Arc::new(RateLimiter::new(&key, HANDSHAKES_PER_SECOND)),
            mac_only: Arc::new(RateLimiter::new(&key, u64::MAX)),
        }
    }
}

#[derive(Default)]
struct PeerTable {
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    allowed_ips: AllowedIps<u32>,
    /// Insertion order, for stable listings.
    order: Vec<PublicKey>,
}

impl PeerTable {
    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.allowed_ips
            .lookup(dst)
            .and_then(|i| self.by_index.get(i))
    }
}

/// The device core. Every method takes `&self`; share it behind an `Arc`.
pub struct Device {
    identity: RwLock<Identity>,
    peers: RwLock<PeerTable>,
    budget: Arc<BufferBudget>,
    mtu: u16,
    counters: Counters,
    /// When the handshake limiter's count was last reset.
    last_reset: Mutex<Option<Instant>>,
    /// The packet filter (inactive, allow all, until rules are set).
    filter: ShardedFilter,
    /// Paces the answers to refused host packets ([`Device::reject_answer`]).
    rejects: Mutex<RejectLimiter>,
}

impl Device {
    pub fn new(private_key: Option<PrivateKey>, mtu: u16, budget: Arc<BufferBudget>) -> Device {
        Device {
            identity: RwLock::new(Identity::new(private_key)),
            peers: RwLock::new(PeerTable::default()),
            budget,
            mtu,
            counters: Counters::default(),
            last_reset: Mutex::new(None),
            filter: ShardedFilter::new(
                ConntrackLimits::default(),
                u64::from(random_u32()) << 32 | u64::from(random_u32()),
            ),
            rejects: Mutex::new(RejectLimiter::default()),
        }
    }

    /// The answer for the host to a packet it sent that the filter refused
    /// ([`SendError::Filtered`] with [`FilterDrop::OutboundDenied`]),
    /// written into `out` so the host's flow fails at once, as nftables
    /// `reject` does: a TCP RST for a SYN, an ICMP destination
    /// unreachable (administratively prohibited) for UDP, an echo request
    /// or another protocol ([`reject::answer`]). `None` for packets that
    /// get no answer (other TCP segments, ICMP errors, later fragments,
    /// broadcast and multicast), and beyond
    /// [`crate::filter::REJECT_ANSWERS_PER_SEC`], which RSTs and ICMP
    /// errors share. The caller hands it to the host's sink; it never goes
    /// to a peer.
    pub fn reject_answer(
        &self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8; REJECT_ANSWER_MAX],
    ) -> Option<usize> {
        let len = reject::answer(packet, out)?;
        self.rejects.lock().allow(now).then_some(len)
    }

    /// Answers made by [`Device::reject_answer`], and refused packets left
    /// unanswered by its rate limit.
    pub fn reject_stats(&self) -> (u64, u64) {
        let r = self.rejects.lock();
        (r.sent, r.limited)
    }

    /// Installs the packet filter's rules (`None`: allow all, the
    /// default). Applies from the next packet; tracked flows stay (see
    /// [`crate::filter`]'s module doc).
    pub fn set_filter(&self, rules: Option<Arc<FilterRules>>) {
        self.filter.set_rules(rules);
    }

    pub fn filter_rules(&self) -> Option<Arc<FilterRules>> {
        self.filter.rules()
    }

    /// The packet filter's counters, and its drops per reason (indexed as
    /// [`FilterDrop::ALL`]).
    pub fn filter_stats(&self) -> (FilterStats, [u64; FilterDrop::ALL.len()]) {
        (self.filter.stats(), self.filter.drops())
    }

    /// Whether the filter lets `packet` (to or from `peer`) pass. Without
    /// rules this is one atomic load: no lock, no parsing.
    #[inline]
    fn filter_admits(
        &self,
        dir: Direction,
        packet: &[u8],
        peer: &Peer,
        now: Instant,
    ) -> Result<(), FilterDrop> {
        if !self.filter.is_active() {
            return Ok(());
        }
        match self.filter.check(dir, packet, u64::from(peer.index()), now) {
            Verdict::Accept => Ok(()),
            Verdict::Drop(r) => Err(r),
        }
    }

    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    pub fn budget(&self) -> &Arc<BufferBudget> {
        &self.budget
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.identity
            .read()
            .public
            .map(|p| PublicKey::from_bytes(*p.as_bytes()))
    }

    pub fn private_key(&self) -> Option<PrivateKey> {
        self.identity.read().private_key.clone()
    }

    /// Our static secret (what a relay client registers with).
    pub fn static_secret(&self) -> Option<x25519::StaticSecret> {
        self.identity.read().secret.clone()
    }

    /// Replaces the private key: every session is dropped and handshakes
    /// restart with the new key. A peer whose public key is our new public
    /// key is removed (the kernel does the same).
    pub fn set_private_key(&self, key: Option<PrivateKey>) {
        let mut id = self.identity.write();
        if id.private_key == key {
            return;
        }
        *id = Identity::new(key.clone());
        let limiter = id.mac_only.clone();
        drop(id);
        if let Some(k) = &key {
            self.remove_peer(&k.public_key());
            for p in self.peers.read().by_key.values() {
                p.set_private_key(k, limiter.clone());
            }
        }
    }

    /// Changes a peer; creates it first when `create` is true and it does
    /// not exist.
    pub fn update_peer(
        &self,
        key: &PublicKey,
        update: &PeerUpdate,
        create: bool,
    ) -> Result<(), PeerError> {
        // Our public key is cached in the identity: deriving it here cost a
        // scalar multiplication per call (per peer, in a large UAPI set).
        let (private_key, own_public, limiter) = {
            let id = self.identity.read();
            (id.private_key.clone(), id.public, id.mac_only.clone())
        };
        if own_public.is_some_and(|p| p.as_bytes() == key.as_bytes()) {
            return Err(PeerError::OwnKey(*key));
        }
        // Peers need a private key to exist as protocol state; without one
        // a placeholder is used and replaced by `set_private_key`.
        let private_key = private_key.unwrap_or_else(|| PrivateKey::from_bytes([0u8; 32]));
        let mut table = self.peers.write();
        let existed = table.by_key.contains_key(key);
        let peer = match table.by_key.get(key) {
            Some(p) => p.clone(),
            None if !create => return Ok(()),
            // Checked once, when the peer is created: it costs a
            // Diffie-Hellman, and an existing peer passed it already.
            None if key.is_low_order() => return Err(PeerError::LowOrderKey(*key)),
            None => {
                let index = loop {
                    let i = random_u32() & 0x00ff_ffff;
                    if !table.by_index.contains_key(&i) {
                        break i;
                    }
                };
                let cfg = PeerConfig {
                    public_key: *key,
                    preshared_key: update.preshared_key.clone().flatten(),
                    allowed_ips: Vec::new(),
                    endpoint: update.endpoint,
                    persistent_keepalive: update.persistent_keepalive.flatten(),
                };
                let peer = Arc::new(Peer::new(&private_key, &cfg, index, limiter.clone()));
                peer.set_budget(self.budget.clone());
                table.by_key.insert(*key, peer.clone());
                table.by_index.insert(index, peer.clone());
                table.order.push(*key);
                tracing::debug!(peer = %key, "peer added");
                peer
            }
        };
        if let Some(psk) = &update.preshared_key {
            peer.set_preshared_key(psk.clone(), &private_key, limiter);
        }
        if let Some(e) = update.endpoint {
            peer.set_endpoint(Endpoint::from_uapi(e, *key));
        }
        if let Some(k) = update.persistent_keepalive {
            peer.set_persistent_keepalive(k);
        }
        let index = peer.index();
        // A peer created just now holds no prefix; skipping the walk over
        // the whole table keeps a large `wg setconf` linear.
        if update.replace_allowed_ips && existed {
            table.allowed_ips.remove_value(&index);
        }
        for p in &update.allowed_ips {
            table.allowed_ips.insert(*p, index);
        }
        Ok(())
    }

    /// Removes a peer; its sessions end and its AllowedIPs route nowhere.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        let mut table = self.peers.write();
        let Some(peer) = table.by_key.remove(key) else {
            return false;
        };
        table.by_index.remove(&peer.index());
        table.allowed_ips.remove_value(&peer.index());
        table.order.retain(|k| k != key);
        tracing::debug!(peer = %key, "peer removed");
        true
    }

    pub fn clear_peers(&self) {
        *self.peers.write() = PeerTable::default();
    }

    /// The public keys of the peers, in the order they were added.
    pub fn peer_keys(&self) -> Vec<PublicKey> {
        self.peers.read().order.clone()
    }

    pub fn peer(&self, key: &PublicKey) -> Option<Arc<Peer>> {
        self.peers.read().by_key.get(key).cloned()
    }

    /// Every peer, in no particular order.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers.read().by_key.values().cloned().collect()
    }

    /// The current configuration of one peer.
    pub fn peer_config(&self, key: &PublicKey) -> Option<PeerConfig> {
        let table = self.peers.read();
        let peer = table.by_key.get(key)?;
        Some(PeerConfig {
            public_key: *key,
            preshared_key: peer.preshared_key(),
            allowed_ips: table.allowed_ips.prefixes_of(&peer.index()),
            endpoint: peer.uapi_endpoint(),
            persistent_keepalive: peer.persistent_keepalive(),
        })
    }

    /// Every peer's configuration and stats, in the order they were added,
    /// read under one lock (one pass over AllowedIPs, however many peers).
    pub fn peer_snapshot(&self) -> Vec<(PeerConfig, PeerStats)> {
        let table = self.peers.read();
        let mut allowed: HashMap<u32, Vec<IpPrefix>> = HashMap::new();
        for (prefix, index) in table.allowed_ips.iter() {
            allowed.entry(index).or_default().push(prefix);
        }
        table
            .order
            .iter()
            .filter_map(|k| table.by_key.get(k))
            .map(|peer| {
                let cfg = PeerConfig {
                    public_key: peer.public_key(),
                    preshared_key: peer.preshared_key(),
                    allowed_ips: allowed.remove(&peer.index()).unwrap_or_default(),
                    endpoint: peer.uapi_endpoint(),
                    persistent_keepalive: peer.persistent_keepalive(),
                };
                (cfg, peer.stats())
            })
            .collect()
    }

    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        self.peers.read().by_key.get(key).map(|p| p.stats())
    }

    /// Stats of every peer, in the order they were added.
    pub fn all_peer_stats(&self) -> Vec<PeerStats> {
        let table = self.peers.read();
        table
            .order
            .iter()
            .filter_map(|k| table.by_key.get(k))
            .map(|p| p.stats())
            .collect()
    }

    pub fn stats(&self) -> DeviceStats {
        let c = &self.counters;
        DeviceStats {
            rx_malformed: c.rx_malformed.load(Relaxed),
            rx_unknown_index: c.rx_unknown_index.load(Relaxed),
            rx_unknown_peer: c.rx_unknown_peer.load(Relaxed),
            rx_invalid_mac: c.rx_invalid_mac.load(Relaxed),
            cookie_replies_sent: c.cookie_replies_sent.load(Relaxed),
            tx_malformed: c.tx_malformed.load(Relaxed),
            tx_no_route: c.tx_no_route.load(Relaxed),
        }
    }

    /// The peer whose AllowedIPs cover `dst`, if any.
    pub fn peer_for(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        self.peers.read().route(dst).cloned()
    }

    /// The peer that `packet` routes to, and the packet cut to its IP length.
    pub fn route<'p>(&self, packet: &'p [u8]) -> Result<(Arc<Peer>, &'p [u8]), SendError> {
        let Ok(header) = IpHeader::new_checked(packet) else {
            bump(&self.counters.tx_malformed);
            return Err(SendError::Malformed);
        };
        // The table lock is held per lookup, never across a send.
        match self.peers.read().route(header.dst) {
            Some(p) => Ok((p.clone(), &packet[..header.total_len])),
            None => {
                bump(&self.counters.tx_no_route);
                Err(SendError::NoRoute)
            }
        }
    }

    /// Encrypts one inner IP packet for the peer it routes to into `out`
    /// (at least `output_buffer_len` of the packet).
    pub fn encapsulate(
        &self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<Encapsulated, SendError> {
        let (peer, packet) = self.route(packet)?;
        // A flow the rules refuse fails here, at the sender, rather than
        // after a round trip to a peer that would drop it: dropped, counted
        // and returned to the caller (the packet API's send, the TUN
        // reader's batch). Tailscale's `filter.RunOut` refuses nothing (it
        // only records the flow so replies pass) and answers a refused SYN
        // at the receiver with a TSMP reject that the sender turns into a
        // local failure; here the sender holds the rules itself, so it
        // refuses at once. The runtime, which holds the sink (TUN, stack),
        // answers a refused SYN with a RST and other refused packets with
        // an ICMP admin-prohibited error ([`Device::reject_answer`]) so the
        // flow fails at once; packet API callers get the error too.
        self.filter_admits(Direction::Outbound, packet, &peer, now)
            .map_err(SendError::Filtered)?;
        match peer.encapsulate(now, packet, out) {
            PeerOutput::ToNetwork { len, to } => Ok(Encapsulated::Datagram { len, to }),
            PeerOutput::Dropped(r) => Err(SendError::Dropped(r)),
            PeerOutput::Done | PeerOutput::ToHost { .. } => Ok(Encapsulated::Queued),
        }
    }

    /// [`Device::encapsulate`], handing the datagram to `io`.
    pub fn send(
        &self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> Result<(), SendError> {
        if let Encapsulated::Datagram { len, to } = self.encapsulate(now, packet, out)? {
            io.send(&out[..len], &to);
        }
        Ok(())
    }

    /// Starts a handshake with `key` now, without waiting for traffic.
    pub fn initiate_handshake(
        &self,
        now: Instant,
        key: &PublicKey,
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> Result<(), PeerError> {
        let peer = self.peer(key).ok_or(PeerError::NoSuchPeer(*key))?;
        emit(peer.initiate_handshake(now, out), out, io);
        Ok(())
    }

    /// Whether a packet `peer` decrypted may go to the host, and if not,
    /// why. The one place the rules for every sink live:
    /// - its inner source `src` must route back to `peer` (inside its
    ///   sender's AllowedIPs);
    /// - it must fit the MTU: every sink's packet buffers are MTU-sized
    ///   (the host queue's, copied into MTU-sized C buffers by the packet
    ///   API; the userspace stack's), and a TUN device gets no more than
    ///   its MTU either. A larger one is dropped whole, never cut.
    fn inner_allowed(&self, peer: &Peer, src: IpAddr, len: usize) -> Result<(), DropReason> {
        if self.peers.read().allowed_ips.lookup(src) != Some(&peer.index()) {
            return Err(DropReason::SourceNotAllowed);
        }
        if len > self.mtu as usize {
            return Err(DropReason::Oversized);
        }
        Ok(())
    }

    /// One datagram from the network (`from` is where the transport got it:
    /// a UDP address, or the relay with the key of the client that sent
    /// it). Parsed once here. A decrypted packet is left in `out`
    /// (see [`Received`]); replies go to `io`.
    pub fn handle_datagram(
        &self,
        now: Instant,
        from: Endpoint,
        datagram: &[u8],
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> Received {
        let Ok(msg) = WireMessage::new_checked(datagram) else {
            bump(&self.counters.rx_malformed);
            return Received::Nothing;
        };
        // Through the relay, the relay vouches for the sender's key: only a
        // peer may send, and only for its own sessions, since that key is
        // where replies go back.
        let relayed_from = match from {
            Endpoint::Relay(key) => match self.peer(&key) {
                Some(p) => Some(p),
                None => {
                    bump(&self.counters.rx_unknown_peer);
                    return Received::Nothing;
                }
            },
            Endpoint::Udp(_) => None,
        };
        let peer = match msg.receiver_index {
            Some(index) => match self.peers.read().by_index.get(&(index >> 8)) {
                Some(p) if relayed_from.as_ref().is_none_or(|r| Arc::ptr_eq(r, p)) => p.clone(),
                _ => {
                    bump(&self.counters.rx_unknown_index);
                    return Received::Nothing;
                }
            },
            None => match self.initiation_sender(&from, datagram, out, io) {
                Some(p) if relayed_from.as_ref().is_none_or(|r| Arc::ptr_eq(r, &p)) => p,
                Some(_) => {
                    bump(&self.counters.rx_unknown_peer);
                    return Received::Nothing;
                }
                None => return Received::Nothing,
            },
        };
        if msg.kind == MessageKind::HandshakeResponse
            && !self.admit_handshake(&from, datagram, out, io)
        {
            return Received::Nothing;
        }
        let result = peer.decapsulate(now, from, msg.kind, datagram, out);
        let flush = peer.should_flush(msg.kind, result);
        match result {
            PeerOutput::ToHost { len, src } => match self.inner_allowed(&peer, src, len) {
                // The filter sees only packets whose source is the peer's
                // own: a peer cannot spend another's share of the table.
                // A refused packet is counted by the filter, per reason.
                Ok(()) => {
                    if self
                        .filter_admits(Direction::Inbound, &out[..len], &peer, now)
                        .is_ok()
                    {
                        return Received::Packet { peer, len, flush };
                    }
                }
                Err(reason) => {
                    peer.drop_for(reason);
                }
            },
            r => emit(r, out, io),
        }
        if flush {
            Received::Flush(peer)
        } else {
            Received::Nothing
        }
    }

    /// Sends the packets that waited for `peer`'s session, after
    /// [`Received`] asked for it.
    pub fn flush_queued(&self, now: Instant, peer: &Peer, out: &mut [u8], io: &mut dyn DeviceIo) {
        while let r @ PeerOutput::ToNetwork { .. } = peer.flush_queued(now, out) {
            emit(r, out, io);
        }
    }

    /// Passes a handshake message through the device-wide limiter: MAC1,
    /// and under load MAC2 or a cookie reply. True when it may go on.
    fn admit_handshake(
        &self,
        from: &Endpoint,
        datagram: &[u8],
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> bool {
        let limiter = self.identity.read().limiter.clone();
        match limiter.verify_packet(Some(from.cookie_addr()), datagram, out) {
            Ok(_) => true,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                bump(&self.counters.cookie_replies_sent);
                io.send(&out[..len], from);
                false
            }
            Err(_) => {
                bump(&self.counters.rx_invalid_mac);
                false
            }
        }
    }

    /// Finds the peer that sent a handshake initiation. MAC1 and the
    /// device-wide rate limit are checked first, so a flood costs a keyed
    /// hash per packet, not a Diffie-Hellman; under load a cookie reply
    /// goes back instead.
    fn initiation_sender(
        &self,
        from: &Endpoint,
        datagram: &[u8],
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> Option<Arc<Peer>> {
        let id = self.identity.read();
        let (Some(secret), Some(public)) = (&id.secret, &id.public) else {
            bump(&self.counters.rx_unknown_peer);
            return None;
        };
        let init = match id
            .limiter
            .verify_packet(Some(from.cookie_addr()), datagram, out)
        {
            Ok(Packet::HandshakeInit(init)) => init,
            Ok(_) => return None,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                drop(id);
                bump(&self.counters.cookie_replies_sent);
                io.send(&out[..len], from);
                return None;
            }
            Err(_) => {
                bump(&self.counters.rx_invalid_mac);
                return None;
            }
        };
        let half = match parse_handshake_anon(secret, public, &init) {
            Ok(h) => h,
            Err(_) => {
                bump(&self.counters.rx_unknown_peer);
                return None;
            }
        };
        drop(id);
        let key = PublicKey::from_bytes(half.peer_static_public);
        let peer = self.peer(&key);
        if peer.is_none() {
            bump(&self.counters.rx_unknown_peer);
        }
        peer
    }

    /// Runs the protocol timers of every peer (call every ~100 ms) and
    /// resets the handshake limiter's count once a second.
    pub fn poll_timers(&self, now: Instant, out: &mut [u8], io: &mut dyn DeviceIo) {
        {
            let mut last = self.last_reset.lock();
            if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                self.identity.read().limiter.reset_count();
                *last = Some(now);
                // Expired flows give their memory back once a second too.
                if self.filter.is_active() {
                    self.filter.expire(now);
                }
            }
        }
        for p in self.peers() {
            // A few rounds at most: a timer tick yields one datagram per call.
            for _ in 0..4 {
                match p.update_timers(now, out) {
                    r @ PeerOutput::ToNetwork { .. } => emit(r, out, io),
                    _ => break,
                }
            }
        }
    }

    /// Moves `peer` onto `to` and starts a handshake there now, even if one
    /// is in flight (the one in flight went where nobody answers).
    pub fn switch_path(
        &self,
        now: Instant,
        peer: &Peer,
        to: Endpoint,
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) {
        peer.set_endpoint(to);
        emit(peer.force_handshake(now, out), out, io);
    }

    /// Sends a handshake initiation to `to` without moving `peer`'s
    /// endpoint: its answer authenticating over `to` moves the peer there
    /// (roaming). Sent even while a handshake is in flight (see
    /// [`Peer::probe`]).
    pub fn probe(
        &self,
        now: Instant,
        peer: &Peer,
        to: Endpoint,
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> bool {
        match peer.probe(now, out, to.path()) {
            Some(len) => {
                io.send(&out[..len], &to);
                true
            }
            None => false,
        }
    }

    /// One handshake initiation sent to every address in `to` (a NAT
    /// traversal probing round), `peer`'s endpoint unchanged: the same
    /// initiation everywhere, so whichever copy is answered first completes
    /// the handshake and its authenticated answer moves the peer there
    /// (separate initiations would each cancel the one before). Returns the
    /// datagrams sent.
    pub fn probe_many(
        &self,
        now: Instant,
        peer: &Peer,
        to: &[std::net::SocketAddr],
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> usize {
        if to.is_empty() {
            return 0;
        }
        let Some(len) = peer.probe(now, out, crate::peer::PeerPath::Udp) else {
            return 0;
        };
        for a in to {
            io.send(&out[..len], &Endpoint::Udp(*a));
        }
        to.len()
    }
}

/// Hands what a peer call produced to `io`.
fn emit(result: PeerOutput, out: &[u8], io: &mut dyn DeviceIo) {
    if let PeerOutput::ToNetwork { len, to } = result {
        io.send(&out[..len], &to);
    }
}

fn random_u32() -> u32 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random number generator failed");
    u32::from_le_bytes(b)
}
