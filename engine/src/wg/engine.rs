use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519;
use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::{Mutex, RwLock};

mod relay_path;

use super::sink::{HostQueue, InnerBurst, InnerSink};
use crate::config::{Config, PeerConfig, PresharedKey, PrivateKey, PublicKey, DEFAULT_MTU};
use crate::io::tun::{Tun, TunBurst};
use crate::io::udp::{normalize, RecvBatch, UdpTransport, MAX_DATAGRAM, RECV_POLL};
use crate::peer::{output_buffer_len, BufferBudget, DropReason, Peer, PeerOutput, PeerStats};
use crate::router::{AllowedIps, IpPrefix};
use crate::stats::stats_struct;
use crate::wire::{IpHeader, WireMessage};

/// How often peers' protocol timers run. boringtun's timers have 250 ms
/// granularity in its own device; 100 ms keeps handshake retries prompt.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake messages per second the whole engine processes before it
/// demands cookies (boringtun's device uses the same order of magnitude).
/// Each handshake passes the shared limiter twice (engine and `Tunn`), so
/// the limiter is configured with twice this.
const HANDSHAKES_PER_SECOND: u64 = 100;
/// Packets the host queue holds before new ones are dropped.
const HOST_QUEUE_PACKETS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot bind UDP port {port}: {source}")]
    Bind { port: u16, source: io::Error },
    #[error("peer {0} has a low-order public key; no handshake is possible with it")]
    LowOrderKey(PublicKey),
    #[error("peer {0} is this engine's own public key")]
    OwnKey(PublicKey),
    #[error("no peer {0}")]
    NoSuchPeer(PublicKey),
    #[error("the engine is closed")]
    Closed,
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("not an IP packet")]
    Malformed,
    #[error("no peer's AllowedIPs covers the destination")]
    NoRoute,
    #[error("dropped: {}", .0.name())]
    Dropped(DropReason),
    #[error("the UDP send failed")]
    Network,
    #[error("the engine is closed")]
    Closed,
}

/// A partial change to a peer, as the UAPI expresses it.
#[derive(Debug, Clone, Default)]
pub struct PeerUpdate {
    /// `Some(None)` removes the preshared key.
    pub preshared_key: Option<Option<PresharedKey>>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(None)` or `Some(Some(0))` disables keepalive.
    pub persistent_keepalive: Option<Option<u16>>,
    /// Drop the peer's current AllowedIPs before adding `allowed_ips`.
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpPrefix>,
}

stats_struct! {
    /// Engine-wide counters for packets that never reached a peer.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct EngineStats {
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
        /// Encrypted datagrams those failed sends dropped (a GSO run counts
        /// each of its datagrams), including runs still blocked after
        /// [`crate::io::udp::SEND_WAIT`].
        pub udp_send_dropped: u64,
        /// Packets dropped because the buffer ceiling
        /// ([`Engine::set_buffer_limit`]) was reached (also counted as
        /// `sink_full` on their peer).
        pub buffer_limit_drops: u64,
    }
}

#[derive(Default)]
struct EngineCounters {
    rx_malformed: AtomicU64,
    rx_unknown_index: AtomicU64,
    rx_unknown_peer: AtomicU64,
    rx_invalid_mac: AtomicU64,
    cookie_replies_sent: AtomicU64,
    tx_malformed: AtomicU64,
    tx_no_route: AtomicU64,
    udp_send_errors: AtomicU64,
    udp_send_dropped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Our own key and what derives from it.
struct Identity {
    private_key: Option<PrivateKey>,
    secret: Option<x25519::StaticSecret>,
    public: Option<x25519::PublicKey>,
    limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(private_key: Option<PrivateKey>) -> Identity {
        let secret = private_key.as_ref().map(|k| k.to_x25519());
        let public = secret.as_ref().map(x25519::PublicKey::from);
        let limiter = Arc::new(RateLimiter::new(
            &public.unwrap_or(x25519::PublicKey::from([0u8; 32])),
            2 * HANDSHAKES_PER_SECOND,
        ));
        Identity {
            private_key,
            secret,
            public,
            limiter,
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

struct Shared {
    identity: RwLock<Identity>,
    peers: RwLock<PeerTable>,
    transport: RwLock<Arc<UdpTransport>>,
    fwmark: Mutex<Option<u32>>,
    sink: RwLock<Arc<dyn InnerSink>>,
    host_queue: Arc<HostQueue>,
    budget: Arc<BufferBudget>,
    addresses: RwLock<Vec<IpPrefix>>,
    mtu: u16,
    counters: EngineCounters,
    closed: AtomicBool,
    device_gone: AtomicBool,
    relay: relay_path::RelaySlot,
}

/// A running WireGuard engine. Cheap to share behind an `Arc`; every method
/// takes `&self` and is safe to call from any thread.
pub struct Engine {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_tx: Mutex<Option<Sender<()>>>,
    stop_rx: Receiver<()>,
    /// Serialises UAPI transactions, as wireguard-go's `ipcMutex` does.
    uapi: Mutex<()>,
}

thread_local! {
    static OUT_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; output_buffer_len(MAX_DATAGRAM)]);
    static TX_BATCH: RefCell<TxBatch> = RefCell::new(TxBatch::default());
}

/// Encrypted datagrams waiting to leave together: a run of equal-sized
/// datagrams to one endpoint (the last may be shorter), as UDP GSO wants.
struct TxBatch {
    buf: Vec<u8>,
    /// Bytes of `buf` holding encrypted datagrams.
    used: usize,
    /// Where the current run starts, its destination and segment size.
    run_start: usize,
    run: Option<(SocketAddr, usize)>,
    /// True once the run has a short (final) segment.
    run_closed: bool,
}

/// Bytes of encrypted datagrams a send batch holds (and so at most what
/// one GSO send carries: the kernel's limit is 64 KiB).
const TX_BATCH_BYTES: usize = 64 * 1024 - 1;

impl Default for TxBatch {
    fn default() -> Self {
        TxBatch {
            buf: vec![0u8; TX_BATCH_BYTES + output_buffer_len(MAX_DATAGRAM)],
            used: 0,
            run_start: 0,
            run: None,
            run_closed: false,
        }
    }
}

impl TxBatch {
    fn room(&self) -> usize {
        TX_BATCH_BYTES.saturating_sub(self.used)
    }

    /// Adds the datagram just written at `buf[at..at + len]`.
    fn push(
        &mut self,
        at: usize,
        len: usize,
        to: SocketAddr,
        t: &UdpTransport,
        c: &EngineCounters,
    ) {
        let fits = match self.run {
            Some((dst, seg)) => dst == to && !self.run_closed && len <= seg && at == self.used,
            None => false,
        };
        if !fits {
            self.send_run(t, c);
            self.run_start = at;
            self.run = Some((to, len));
            self.run_closed = false;
        } else if let Some((_, seg)) = self.run {
            self.run_closed = len < seg;
        }
        self.used = at + len;
    }

    fn send_run(&mut self, t: &UdpTransport, c: &EngineCounters) {
        if let Some((to, seg)) = self.run.take() {
            let run = &self.buf[self.run_start..self.used];
            if t.send(run, Some(seg), to).is_err() {
                bump(&c.udp_send_errors);
                c.udp_send_dropped
                    .fetch_add(run.len().div_ceil(seg) as u64, Relaxed);
            }
        }
        self.run_start = self.used;
    }

    fn flush(&mut self, t: &UdpTransport, c: &EngineCounters) {
        self.send_run(t, c);
        self.used = 0;
        self.run_start = 0;
    }
}

impl Engine {
    /// Binds the UDP port, adds the peers and starts the engine's threads.
    /// Decrypted packets go to the host queue ([`Engine::recv_packet`])
    /// until another sink is attached.
    pub fn new(config: &Config) -> Result<Engine, EngineError> {
        let iface = &config.interface;
        let port = iface.listen_port.unwrap_or(0);
        let transport = UdpTransport::bind(port, iface.fwmark)
            .map_err(|source| EngineError::Bind { port, source })?;
        let mtu = iface.mtu.unwrap_or(DEFAULT_MTU);
        let budget = Arc::new(BufferBudget::default());
        let host_queue = HostQueue::new(HOST_QUEUE_PACKETS, mtu as usize, budget.clone());
        let shared = Arc::new(Shared {
            identity: RwLock::new(Identity::new(iface.private_key.clone())),
            peers: RwLock::new(PeerTable::default()),
            transport: RwLock::new(Arc::new(transport)),
            fwmark: Mutex::new(iface.fwmark),
            sink: RwLock::new(host_queue.clone()),
            host_queue,
            budget,
            addresses: RwLock::new(iface.addresses.clone()),
            mtu,
            counters: EngineCounters::default(),
            closed: AtomicBool::new(false),
            device_gone: AtomicBool::new(false),
            relay: Default::default(),
        });
        let (stop_tx, stop_rx) = bounded(0);
        let engine = Engine {
            shared,
            threads: Mutex::new(Vec::new()),
            stop_tx: Mutex::new(Some(stop_tx)),
            stop_rx,
            uapi: Mutex::new(()),
        };
        for p in &config.peers {
            engine.add_peer(p)?;
        }
        engine.spawn("meshvpn-rx4", |s, _| rx_loop(s, true))?;
        engine.spawn("meshvpn-rx6", |s, _| rx_loop(s, false))?;
        engine.spawn("meshvpn-timers", timer_loop)?;
        Ok(engine)
    }

    fn spawn(
        &self,
        name: &str,
        f: impl FnOnce(Arc<Shared>, Receiver<()>) + Send + 'static,
    ) -> Result<(), EngineError> {
        let shared = self.shared.clone();
        let stop = self.stop_rx.clone();
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(shared, stop))
            .map_err(EngineError::Thread)?;
        self.threads.lock().push(h);
        Ok(())
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.shared
            .identity
            .read()
            .private_key
            .as_ref()
            .map(|k| k.public_key())
    }

    pub fn private_key(&self) -> Option<PrivateKey> {
        self.shared.identity.read().private_key.clone()
    }

    /// The UDP port actually bound (the one picked when 0 was asked for).
    pub fn listen_port(&self) -> u16 {
        self.shared.transport.read().port()
    }

    pub fn mtu(&self) -> u16 {
        self.shared.mtu
    }

    pub fn fwmark(&self) -> Option<u32> {
        *self.shared.fwmark.lock()
    }

    /// The host's own mesh addresses (`Address =`).
    pub fn addresses(&self) -> Vec<IpPrefix> {
        self.shared.addresses.read().clone()
    }

    pub fn set_addresses(&self, addresses: Vec<IpPrefix>) {
        *self.shared.addresses.write() = addresses;
    }

    /// Replaces the private key while traffic flows: every session is
    /// dropped and handshakes restart with the new key. A peer whose public
    /// key is our new public key is removed (the kernel does the same).
    pub fn set_private_key(&self, key: Option<PrivateKey>) {
        let mut id = self.shared.identity.write();
        if id.private_key == key {
            return;
        }
        *id = Identity::new(key.clone());
        let limiter = id.limiter.clone();
        drop(id);
        if let Some(k) = &key {
            let own = k.public_key();
            self.remove_peer(&own);
            for p in self.shared.peers.read().by_key.values() {
                p.set_private_key(k, limiter.clone());
            }
        }
    }

    /// Rebinds the UDP sockets on `port` (0 picks one); returns the port.
    pub fn set_listen_port(&self, port: u16) -> Result<u16, EngineError> {
        if port != 0 && port == self.listen_port() {
            return Ok(port);
        }
        let fwmark = *self.shared.fwmark.lock();
        let t = UdpTransport::bind(port, fwmark)
            .map_err(|source| EngineError::Bind { port, source })?;
        let chosen = t.port();
        *self.shared.transport.write() = Arc::new(t);
        Ok(chosen)
    }

    /// Sets SO_MARK on the UDP sockets in place (0 or `None` clears it).
    /// Rebinding instead would collide with the sockets still holding the
    /// port.
    pub fn set_fwmark(&self, mark: Option<u32>) -> Result<(), EngineError> {
        let mark = mark.filter(|&m| m != 0);
        let mut current = self.shared.fwmark.lock();
        let transport = self.shared.transport.read().clone();
        transport
            .set_mark(mark)
            .map_err(|source| EngineError::Bind {
                port: transport.port(),
                source,
            })?;
        *current = mark;
        Ok(())
    }

    /// Adds a peer, or replaces an existing one's settings and AllowedIPs.
    pub fn add_peer(&self, cfg: &PeerConfig) -> Result<(), EngineError> {
        let update = PeerUpdate {
            preshared_key: Some(cfg.preshared_key.clone()),
            endpoint: cfg.endpoint,
            persistent_keepalive: Some(cfg.persistent_keepalive),
            replace_allowed_ips: true,
            allowed_ips: cfg.allowed_ips.clone(),
        };
        self.update_peer(&cfg.public_key, &update, true)
    }

    /// Changes a peer; creates it first when `create` is true and it does
    /// not exist (the UAPI's default; `update_only` passes false).
    pub fn update_peer(
        &self,
        key: &PublicKey,
        update: &PeerUpdate,
        create: bool,
    ) -> Result<(), EngineError> {
        if self.shared.closed.load(Relaxed) {
            return Err(EngineError::Closed);
        }
        // Our public key is cached in the identity: deriving it here cost a
        // scalar multiplication per call (per peer, in a large UAPI set).
        let (private_key, own_public, limiter) = {
            let id = self.shared.identity.read();
            (id.private_key.clone(), id.public, id.limiter.clone())
        };
        if own_public.is_some_and(|p| p.as_bytes() == key.as_bytes()) {
            return Err(EngineError::OwnKey(*key));
        }
        // Peers need a private key to exist as protocol state; without one
        // a placeholder is used and replaced by `set_private_key`.
        let private_key = private_key.unwrap_or_else(|| PrivateKey::from_bytes([0u8; 32]));
        let mut table = self.shared.peers.write();
        let existed = table.by_key.contains_key(key);
        let peer = match table.by_key.get(key) {
            Some(p) => p.clone(),
            None if !create => return Ok(()),
            // Checked once, when the peer is created: it costs a
            // Diffie-Hellman, and an existing peer passed it already.
            None if key.is_low_order() => return Err(EngineError::LowOrderKey(*key)),
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
                peer.set_budget(self.shared.budget.clone());
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
            peer.set_endpoint(e);
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
        let mut table = self.shared.peers.write();
        let Some(peer) = table.by_key.remove(key) else {
            return false;
        };
        table.by_index.remove(&peer.index());
        table.allowed_ips.remove_value(&peer.index());
        table.order.retain(|k| k != key);
        tracing::debug!(peer = %key, "peer removed");
        true
    }

    /// Removes every peer.
    pub fn clear_peers(&self) {
        let mut table = self.shared.peers.write();
        *table = PeerTable::default();
    }

    /// The public keys of the peers, in the order they were added.
    pub fn peer_keys(&self) -> Vec<PublicKey> {
        self.shared.peers.read().order.clone()
    }

    /// The current configuration of one peer.
    pub fn peer_config(&self, key: &PublicKey) -> Option<PeerConfig> {
        let table = self.shared.peers.read();
        let peer = table.by_key.get(key)?;
        Some(PeerConfig {
            public_key: *key,
            preshared_key: peer.preshared_key(),
            allowed_ips: table.allowed_ips.prefixes_of(&peer.index()),
            endpoint: peer.endpoint(),
            persistent_keepalive: peer.persistent_keepalive(),
        })
    }

    /// Every peer's configuration and stats, in the order they were added,
    /// read under one lock (one pass over AllowedIPs, however many peers).
    pub fn peer_snapshot(&self) -> Vec<(PeerConfig, PeerStats)> {
        let table = self.shared.peers.read();
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
                    endpoint: peer.endpoint(),
                    persistent_keepalive: peer.persistent_keepalive(),
                };
                (cfg, peer.stats())
            })
            .collect()
    }

    /// Held for the whole of one UAPI get or set.
    pub(super) fn uapi_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.uapi.lock()
    }

    /// The whole running configuration (what `wg showconf` prints).
    pub fn config(&self) -> Config {
        let peers = self
            .peer_snapshot()
            .into_iter()
            .map(|(cfg, _)| cfg)
            .collect();
        Config {
            interface: crate::config::InterfaceConfig {
                private_key: self.private_key(),
                listen_port: Some(self.listen_port()),
                addresses: self.addresses(),
                mtu: Some(self.mtu()),
                fwmark: self.fwmark(),
            },
            peers,
        }
    }

    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        self.shared.peers.read().by_key.get(key).map(|p| p.stats())
    }

    /// Stats of every peer, in the order they were added.
    pub fn all_peer_stats(&self) -> Vec<PeerStats> {
        let table = self.shared.peers.read();
        table
            .order
            .iter()
            .filter_map(|k| table.by_key.get(k))
            .map(|p| p.stats())
            .collect()
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            rx_malformed: c.rx_malformed.load(Relaxed),
            rx_unknown_index: c.rx_unknown_index.load(Relaxed),
            rx_unknown_peer: c.rx_unknown_peer.load(Relaxed),
            rx_invalid_mac: c.rx_invalid_mac.load(Relaxed),
            cookie_replies_sent: c.cookie_replies_sent.load(Relaxed),
            tx_malformed: c.tx_malformed.load(Relaxed),
            tx_no_route: c.tx_no_route.load(Relaxed),
            udp_send_errors: c.udp_send_errors.load(Relaxed),
            udp_send_dropped: c.udp_send_dropped.load(Relaxed),
            buffer_limit_drops: self.shared.budget.drops(),
        }
    }

    /// Sets the ceiling on bytes of packets held in queues (waiting behind
    /// a handshake, or for the host to read them); past it new packets are
    /// dropped and counted. Default [`super::DEFAULT_BUFFER_LIMIT`].
    pub fn set_buffer_limit(&self, bytes: usize) {
        self.shared.budget.set_limit(bytes);
    }

    pub fn buffer_limit(&self) -> usize {
        self.shared.budget.limit()
    }

    /// Bytes of packets held in queues now.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.budget.used()
    }

    /// Starts a handshake with `key` now, without waiting for traffic.
    pub fn initiate_handshake(&self, key: &PublicKey) -> Result<(), EngineError> {
        let peer = self
            .shared
            .peers
            .read()
            .by_key
            .get(key)
            .cloned()
            .ok_or(EngineError::NoSuchPeer(*key))?;
        OUT_BUF.with_borrow_mut(|out| self.shared.emit(&peer, peer.initiate_handshake(out), out));
        Ok(())
    }

    /// Sends one inner IP packet into the mesh: the packet API's send side,
    /// and what the TUN reader and the userspace stack call. Runs on the
    /// caller's thread, so callers on several threads encrypt in parallel.
    pub fn send_packet(&self, packet: &[u8]) -> Result<(), SendError> {
        self.shared.send_packet(packet)
    }

    /// Sends a batch of inner IP packets: the fast path for a host with many
    /// packets at hand (a TUN read burst, the userspace stack's output).
    /// Unroutable or malformed packets are counted and skipped. Returns how
    /// many were accepted.
    pub fn send_packets<'a>(&self, packets: impl IntoIterator<Item = &'a [u8]>) -> usize {
        self.shared.send_packets(packets, &mut |_, _| {})
    }

    /// [`Engine::send_packets`], calling `rejected` with each packet that
    /// was not accepted and why (what [`Engine::send_packet`] would have
    /// returned for it).
    pub fn send_packets_reporting<'a>(
        &self,
        packets: impl IntoIterator<Item = &'a [u8]>,
        mut rejected: impl FnMut(&[u8], SendError),
    ) -> usize {
        self.shared.send_packets(packets, &mut rejected)
    }

    /// The peer whose AllowedIPs cover `dst`, if any: where
    /// [`Engine::send_packet`] would send a packet for `dst`. The userspace
    /// stack asks before it dials, so "no route" is an immediate error.
    pub fn peer_for(&self, dst: IpAddr) -> Option<PublicKey> {
        self.shared.peers.read().route(dst).map(|p| p.public_key())
    }

    /// The next decrypted packet for the host (packet API), waiting up to
    /// `timeout`. Only packets no other sink took arrive here.
    pub fn recv_packet(&self, timeout: Duration) -> Option<super::PacketBuf> {
        self.shared.host_queue.recv_timeout(timeout)
    }

    /// The packet API's receive queue (to drain in batches or be notified).
    pub fn host_queue(&self) -> &Arc<HostQueue> {
        &self.shared.host_queue
    }

    /// The sink decrypted packets go to now.
    pub fn sink(&self) -> Arc<dyn InnerSink> {
        self.shared.sink.read().clone()
    }

    /// Routes decrypted packets to `sink` from now on.
    pub fn set_sink(&self, sink: Arc<dyn InnerSink>) {
        *self.shared.sink.write() = sink;
    }

    /// Moves the engine's inner side onto a TUN device: decrypted packets
    /// are written to it and a reader thread sends what the kernel routes
    /// into it.
    pub fn attach_tun(&self, tun: Tun) -> Result<(), EngineError> {
        let writer = tun.try_clone().map_err(EngineError::Thread)?;
        self.set_sink(Arc::new(TunSink(writer)));
        self.spawn("meshvpn-tun", move |s, stop| tun_loop(s, stop, tun))
    }

    /// True once an attached TUN device has gone away (interface deleted).
    pub fn device_gone(&self) -> bool {
        self.shared.device_gone.load(Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Relaxed)
    }

    /// Stops every thread and waits for them. Idempotent; also done on drop.
    pub fn close(&self) {
        self.shared.closed.store(true, Relaxed);
        self.stop_relay();
        self.stop_tx.lock().take();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
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

struct TunSink(Tun);

impl InnerSink for TunSink {
    fn deliver(&self, packet: &[u8]) -> bool {
        self.0.write_packet(packet).is_ok()
    }

    fn deliver_burst(&self, burst: &mut InnerBurst) {
        let (packets, delivered) = burst.parts();
        self.0.write_burst(packets, |i, ok| {
            if let Some(d) = delivered.get_mut(i) {
                *d = ok;
            }
        });
    }
}

/// Bytes of decrypted packets one receive thread gathers before handing
/// them to the sink, and how many packets at most.
const RX_BURST_BYTES: usize = 512 * 1024;
const RX_BURST_PACKETS: usize = 1024;

/// What one receive thread decrypted since its last delivery, and from
/// which peer each packet came (for the counters).
struct RxBurst {
    packets: InnerBurst,
    peers: Vec<Arc<Peer>>,
}

impl RxBurst {
    fn new() -> RxBurst {
        RxBurst {
            packets: InnerBurst::new(RX_BURST_BYTES, RX_BURST_PACKETS),
            peers: Vec::with_capacity(RX_BURST_PACKETS),
        }
    }

    /// Hands the gathered packets to the sink, counts them, and empties.
    fn deliver(&mut self, shared: &Shared) {
        if self.packets.is_empty() {
            return;
        }
        let sink = shared.sink.read().clone();
        sink.deliver_burst(&mut self.packets);
        for (i, peer) in self.peers.drain(..).enumerate() {
            if self.packets.delivered(i) {
                peer.delivered(self.packets.packet(i).len());
            } else {
                peer.drop_for(DropReason::SinkFull);
            }
        }
        self.packets.clear();
    }
}

impl Shared {
    /// The peer that `packet` routes to, and the packet cut to its IP length.
    fn route<'p>(
        &self,
        table: &PeerTable,
        packet: &'p [u8],
    ) -> Result<(Arc<Peer>, &'p [u8]), SendError> {
        let Ok(header) = IpHeader::new_checked(packet) else {
            bump(&self.counters.tx_malformed);
            return Err(SendError::Malformed);
        };
        match table.route(header.dst) {
            Some(p) => Ok((p.clone(), &packet[..header.total_len])),
            None => {
                bump(&self.counters.tx_no_route);
                Err(SendError::NoRoute)
            }
        }
    }

    fn send_packet(&self, packet: &[u8]) -> Result<(), SendError> {
        if self.closed.load(Relaxed) {
            return Err(SendError::Closed);
        }
        let (peer, packet) = self.route(&self.peers.read(), packet)?;
        OUT_BUF.with_borrow_mut(|out| {
            let result = peer.encapsulate(packet, out);
            match self.emit(&peer, result, out) {
                PeerOutput::Dropped(r) => Err(SendError::Dropped(r)),
                _ => Ok(()),
            }
        })
    }

    /// Sends many packets; consecutive ones to the same endpoint are
    /// encrypted into one buffer and leave in one GSO send. Returns how many
    /// were accepted (encrypted, or queued behind a handshake); the others
    /// go to `rejected` with the reason.
    fn send_packets<'a>(
        &self,
        packets: impl IntoIterator<Item = &'a [u8]>,
        rejected: &mut dyn FnMut(&[u8], SendError),
    ) -> usize {
        if self.closed.load(Relaxed) {
            for packet in packets {
                rejected(packet, SendError::Closed);
            }
            return 0;
        }
        let transport = self.transport.read().clone();
        TX_BATCH.with_borrow_mut(|batch| {
            let mut accepted = 0;
            for packet in packets {
                // The table lock is held per lookup, never across a send.
                let (peer, packet) = match self.route(&self.peers.read(), packet) {
                    Ok(routed) => routed,
                    Err(e) => {
                        rejected(packet, e);
                        continue;
                    }
                };
                if batch.room() < output_buffer_len(packet.len()) {
                    batch.flush(&transport, &self.counters);
                }
                let at = batch.used;
                match peer.encapsulate(packet, &mut batch.buf[at..]) {
                    PeerOutput::ToNetwork { len, to } => {
                        accepted += 1;
                        if crate::peer::relay_index(to).is_some() {
                            self.send_relay(&peer.public_key(), &batch.buf[at..at + len]);
                            continue;
                        }
                        batch.push(at, len, to, &transport, &self.counters);
                    }
                    PeerOutput::Done => accepted += 1,
                    PeerOutput::Dropped(reason) => rejected(packet, SendError::Dropped(reason)),
                    PeerOutput::ToHost { .. } => {}
                }
            }
            batch.flush(&transport, &self.counters);
            accepted
        })
    }

    /// Whether a packet `peer` decrypted may go to the sink, and if not,
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

    /// Does what a peer call asked: sends datagrams, delivers packets.
    fn emit(&self, peer: &Peer, result: PeerOutput, out: &mut [u8]) -> PeerOutput {
        match result {
            PeerOutput::ToNetwork { len, to } => self.send_datagram(&out[..len], to),
            PeerOutput::ToHost { len, src } => {
                if let Err(reason) = self.inner_allowed(peer, src, len) {
                    return peer.drop_for(reason);
                }
                let sink = self.sink.read().clone();
                if !sink.deliver(&out[..len]) {
                    return peer.drop_for(DropReason::SinkFull);
                }
                peer.delivered(len);
            }
            PeerOutput::Done | PeerOutput::Dropped(_) => {}
        }
        result
    }

    /// One datagram from the network. A decrypted packet joins `rx`, to
    /// reach the sink with the rest of its batch.
    fn handle_datagram(&self, src: SocketAddr, datagram: &[u8], rx: &mut RxBurst) {
        if rx.packets.is_full(output_buffer_len(datagram.len())) {
            rx.deliver(self);
        }
        let out = rx.packets.spare();
        let src = normalize(src);
        let Ok(msg) = WireMessage::new_checked(datagram) else {
            bump(&self.counters.rx_malformed);
            return;
        };
        let peer = match msg.receiver_index {
            Some(index) => match self.peers.read().by_index.get(&(index >> 8)) {
                Some(p) => p.clone(),
                None => {
                    bump(&self.counters.rx_unknown_index);
                    return;
                }
            },
            None => match self.initiation_sender(src, datagram, out) {
                Some(p) => p,
                None => return,
            },
        };
        let result = peer.decapsulate(src, msg.kind, datagram, out);
        match result {
            PeerOutput::ToHost { len, src } => match self.inner_allowed(&peer, src, len) {
                Ok(()) => {
                    rx.packets.commit(len);
                    rx.peers.push(peer.clone());
                }
                Err(reason) => {
                    peer.drop_for(reason);
                }
            },
            _ => {
                self.emit(&peer, result, out);
            }
        }
        if peer.should_flush(msg.kind, result) {
            if rx.packets.is_full(output_buffer_len(MAX_DATAGRAM)) {
                rx.deliver(self);
            }
            let out = rx.packets.spare();
            while let r @ PeerOutput::ToNetwork { .. } = peer.flush_queued(out) {
                self.emit(&peer, r, out);
            }
        }
    }

    /// Finds the peer that sent a handshake initiation. MAC1 and the
    /// engine-wide rate limit are checked first, so a flood costs a keyed
    /// hash per packet, not a Diffie-Hellman; under load a cookie reply
    /// goes back instead.
    fn initiation_sender(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<Arc<Peer>> {
        let id = self.identity.read();
        let (Some(secret), Some(public)) = (&id.secret, &id.public) else {
            bump(&self.counters.rx_unknown_peer);
            return None;
        };
        let init = match id.limiter.verify_packet(Some(src.ip()), datagram, out) {
            Ok(Packet::HandshakeInit(init)) => init,
            Ok(_) => return None,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                drop(id);
                bump(&self.counters.cookie_replies_sent);
                self.send_datagram(&out[..len], src);
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
        let peer = self.peers.read().by_key.get(&key).cloned();
        if peer.is_none() {
            bump(&self.counters.rx_unknown_peer);
        }
        peer
    }
}

fn rx_loop(shared: Arc<Shared>, v4: bool) {
    let mut batch = RecvBatch::default();
    let mut rx = RxBurst::new();
    while !shared.closed.load(Relaxed) {
        let transport = shared.transport.read().clone();
        let sock = if v4 {
            transport.v4.as_ref()
        } else {
            transport.v6.as_ref()
        };
        let Some(sock) = sock else {
            std::thread::sleep(RECV_POLL);
            continue;
        };
        match sock.recv(&mut batch, RECV_POLL) {
            Ok(n) => {
                batch.for_each(n, |src, datagram| {
                    shared.handle_datagram(src, datagram, &mut rx)
                });
                rx.deliver(&shared);
            }
            // ICMP errors surface as ECONNREFUSED and the like on a read:
            // harmless for a datagram protocol.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn timer_loop(shared: Arc<Shared>, stop: Receiver<()>) {
    let mut out = vec![0u8; output_buffer_len(MAX_DATAGRAM)];
    let mut last_reset = Instant::now();
    loop {
        if stop.recv_timeout(TIMER_TICK).is_ok() || shared.closed.load(Relaxed) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(last_reset) >= Duration::from_secs(1) {
            shared.identity.read().limiter.reset_count();
            last_reset = now;
        }
        let peers: Vec<Arc<Peer>> = shared.peers.read().by_key.values().cloned().collect();
        for p in peers {
            // A few rounds at most: a timer tick yields one datagram per call.
            for _ in 0..4 {
                match p.update_timers(now, &mut out) {
                    r @ PeerOutput::ToNetwork { .. } => {
                        shared.emit(&p, r, &mut out);
                    }
                    _ => break,
                }
            }
        }
    }
}

fn tun_loop(shared: Arc<Shared>, stop: Receiver<()>, mut tun: Tun) {
    let mut burst = TunBurst::default();
    loop {
        if shared.closed.load(Relaxed)
            || matches!(
                stop.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            )
        {
            return;
        }
        match tun.read_burst(&mut burst, RECV_POLL) {
            Ok(0) => {}
            Ok(n) => {
                shared.send_packets(burst.packets(n), &mut |_, _| {});
            }
            Err(e) => {
                tracing::info!(device = tun.name(), error = %e, "TUN device gone");
                shared.device_gone.store(true, Relaxed);
                return;
            }
        }
    }
}
