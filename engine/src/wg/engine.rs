use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::{Mutex, RwLock};

mod nat_path;
mod relay_path;

pub use nat_path::{NatStats, NatStatus, ANNOUNCE_INTERVAL, ANSWER_GAP, REDISCOVER_INTERVAL};
pub use relay_path::{RelayInbox, RelayTransport};

use super::sink::{HostQueue, InnerBurst, InnerSink};
use crate::config::{Config, PeerConfig, PrivateKey, PublicKey, DEFAULT_MTU};
use crate::device::{Device, DeviceIo, Encapsulated, Endpoint, PeerError, Received};
pub use crate::device::{PeerUpdate, SendError};
use crate::filter::{FilterDrop, FilterRules, FilterStats, REJECT_ANSWER_MAX};
use crate::io::tun::{Tun, TunBurst};
use crate::io::udp::{normalize, RecvBatch, UdpTransport, MAX_DATAGRAM, RECV_POLL};
use crate::peer::{output_buffer_len, BufferBudget, DropReason, Peer, PeerStats};
use crate::router::IpPrefix;
use crate::stats::stats_struct;

/// How often peers' protocol timers run. boringtun's timers have 250 ms
/// granularity in its own device; 100 ms keeps handshake retries prompt.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Packets the host queue holds before new ones are dropped.
const HOST_QUEUE_PACKETS: usize = 4096;

impl From<PeerError> for EngineError {
    fn from(e: PeerError) -> EngineError {
        match e {
            PeerError::LowOrderKey(k) => EngineError::LowOrderKey(k),
            PeerError::OwnKey(k) => EngineError::OwnKey(k),
            PeerError::NoSuchPeer(k) => EngineError::NoSuchPeer(k),
        }
    }
}

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
        /// Flows the packet filter ([`Engine::set_filter`]) tracks now.
        pub filter_flows: u64,
        /// Filter drops: not an IP packet, or its TCP, UDP or ICMP header
        /// cut short.
        pub filter_malformed: u64,
        /// Filter drops: an IPv4 TCP fragment at offset 1 (RFC 1858).
        pub filter_fragment: u64,
        /// Filter drops: a peer's packet starting a flow no inbound rule
        /// accepts.
        pub filter_not_allowed: u64,
        /// Filter drops: a peer's reply-like packet (ACK, SYN-ACK, echo
        /// reply) with no tracked flow and no rule accepting it.
        pub filter_no_state: u64,
        /// Filter drops: a host packet starting a flow no outbound rule
        /// accepts (its send returns an error).
        pub filter_outbound_denied: u64,
        /// Filter drops: an accepted new flow found the tracking table
        /// full.
        pub filter_table_full: u64,
        /// Filter drops: an accepted new flow's peer already holds its
        /// share of the tracking table.
        pub filter_source_share: u64,
    }
}

/// What the runtime counts itself (the device counts the rest).
#[derive(Default)]
struct EngineCounters {
    udp_send_errors: AtomicU64,
    udp_send_dropped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

struct Shared {
    device: Device,
    transport: RwLock<Arc<UdpTransport>>,
    fwmark: Mutex<Option<u32>>,
    sink: RwLock<Arc<dyn InnerSink>>,
    host_queue: Arc<HostQueue>,
    addresses: RwLock<Vec<IpPrefix>>,
    counters: EngineCounters,
    closed: AtomicBool,
    device_gone: AtomicBool,
    relay: relay_path::RelaySlot,
    nat: nat_path::NatSlot,
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
/// datagrams to one endpoint (the last may be shorter), as UDP GSO wants
/// and as [`Transport::send_batch`] takes it, whatever the endpoint.
struct TxBatch {
    buf: Vec<u8>,
    /// Bytes of `buf` holding encrypted datagrams.
    used: usize,
    /// Where the current run starts, its destination and segment size.
    run_start: usize,
    run: Option<(Endpoint, usize)>,
    /// True once the run has a short (final) segment.
    run_closed: bool,
}

/// Bytes of encrypted datagrams a send batch holds. A run of it that is
/// longer than one IP packet carries (IPv4: 65507 bytes of UDP payload)
/// leaves in two GSO sends (`io::udp::BoundSocket::send` splits it).
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
    fn push(&mut self, at: usize, len: usize, to: Endpoint, shared: &Shared, udp: &UdpTransport) {
        let fits = match &self.run {
            Some((dst, seg)) => *dst == to && !self.run_closed && len <= *seg && at == self.used,
            None => false,
        };
        if !fits {
            self.send_run(shared, udp);
            self.run_start = at;
            self.run = Some((to, len));
            self.run_closed = false;
        } else if let Some((_, seg)) = self.run {
            self.run_closed = len < seg;
        }
        self.used = at + len;
    }

    fn send_run(&mut self, shared: &Shared, udp: &UdpTransport) {
        if let Some((to, seg)) = self.run.take() {
            shared.send_batch(udp, &self.buf[self.run_start..self.used], seg, &to);
        }
        self.run_start = self.used;
    }

    fn flush(&mut self, shared: &Shared, udp: &UdpTransport) {
        self.send_run(shared, udp);
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
            device: Device::new(iface.private_key.clone(), mtu, budget),
            transport: RwLock::new(Arc::new(transport)),
            fwmark: Mutex::new(iface.fwmark),
            sink: RwLock::new(host_queue.clone()),
            host_queue,
            addresses: RwLock::new(iface.addresses.clone()),
            counters: EngineCounters::default(),
            closed: AtomicBool::new(false),
            device_gone: AtomicBool::new(false),
            relay: Default::default(),
            nat: Default::default(),
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
        engine.spawn("meshvpn-path", relay_path::path_loop)?;
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
        self.shared.device.public_key()
    }

    pub fn private_key(&self) -> Option<PrivateKey> {
        self.shared.device.private_key()
    }

    /// The UDP port actually bound (the one picked when 0 was asked for).
    pub fn listen_port(&self) -> u16 {
        self.shared.transport.read().port()
    }

    pub fn mtu(&self) -> u16 {
        self.shared.device.mtu()
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
        self.shared.device.set_private_key(key);
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
        // A new socket has a new NAT mapping.
        self.rediscover();
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
        self.shared
            .device
            .update_peer(key, update, create)
            .map_err(EngineError::from)
    }

    /// Removes a peer; its sessions end and its AllowedIPs route nowhere.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        self.shared.device.remove_peer(key)
    }

    /// Removes every peer.
    pub fn clear_peers(&self) {
        self.shared.device.clear_peers()
    }

    /// The public keys of the peers, in the order they were added.
    pub fn peer_keys(&self) -> Vec<PublicKey> {
        self.shared.device.peer_keys()
    }

    /// The current configuration of one peer.
    pub fn peer_config(&self, key: &PublicKey) -> Option<PeerConfig> {
        self.shared.device.peer_config(key)
    }

    /// Every peer's configuration and stats, in the order they were added,
    /// read under one lock (one pass over AllowedIPs, however many peers).
    pub fn peer_snapshot(&self) -> Vec<(PeerConfig, PeerStats)> {
        self.shared.device.peer_snapshot()
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
        self.shared.device.peer_stats(key)
    }

    /// Stats of every peer, in the order they were added.
    pub fn all_peer_stats(&self) -> Vec<PeerStats> {
        self.shared.device.all_peer_stats()
    }

    pub fn stats(&self) -> EngineStats {
        let d = self.shared.device.stats();
        let c = &self.shared.counters;
        let (f, drops) = self.shared.device.filter_stats();
        let drop = |r: FilterDrop| drops[r as usize];
        EngineStats {
            rx_malformed: d.rx_malformed,
            rx_unknown_index: d.rx_unknown_index,
            rx_unknown_peer: d.rx_unknown_peer,
            rx_invalid_mac: d.rx_invalid_mac,
            cookie_replies_sent: d.cookie_replies_sent,
            tx_malformed: d.tx_malformed,
            tx_no_route: d.tx_no_route,
            udp_send_errors: c.udp_send_errors.load(Relaxed),
            udp_send_dropped: c.udp_send_dropped.load(Relaxed),
            buffer_limit_drops: self.shared.device.budget().drops(),
            filter_flows: f.flows,
            filter_malformed: drop(FilterDrop::Malformed),
            filter_fragment: drop(FilterDrop::Fragment),
            filter_not_allowed: drop(FilterDrop::NotAllowed),
            filter_no_state: drop(FilterDrop::NoState),
            filter_outbound_denied: drop(FilterDrop::OutboundDenied),
            filter_table_full: drop(FilterDrop::TableFull),
            filter_source_share: drop(FilterDrop::SourceShare),
        }
    }

    /// Installs the packet filter (`None`, the default: allow all, at no
    /// cost on the data path). Rules are compiled by the control crate's
    /// policy compiler or built directly. Enforced on decrypted inbound
    /// packets after the source check and on what the host sends (a
    /// refused send returns [`SendError::Filtered`]); replies to allowed
    /// flows pass. New rules apply to the next packet; flows already
    /// tracked go on until they end or expire (as Tailscale's filter
    /// keeps its state across updates); `None` forgets every flow.
    pub fn set_filter(&self, rules: Option<Arc<FilterRules>>) {
        self.shared.device.set_filter(rules);
    }

    /// The rules installed, if any.
    pub fn filter(&self) -> Option<Arc<FilterRules>> {
        self.shared.device.filter_rules()
    }

    /// Answers (RSTs and ICMP admin-prohibited errors) handed to the host
    /// for packets the filter refused, and refused packets left unanswered
    /// by [`crate::filter::REJECT_ANSWERS_PER_SEC`].
    pub fn filter_rejects(&self) -> (u64, u64) {
        self.shared.device.reject_stats()
    }

    /// The packet filter's own counters (accepted packets by kind, and
    /// the flows tracked).
    pub fn filter_stats(&self) -> FilterStats {
        self.shared.device.filter_stats().0
    }

    /// Sets the ceiling on bytes of packets held in queues (waiting behind
    /// a handshake, or for the host to read them); past it new packets are
    /// dropped and counted. Default [`super::DEFAULT_BUFFER_LIMIT`].
    pub fn set_buffer_limit(&self, bytes: usize) {
        self.shared.device.budget().set_limit(bytes);
    }

    pub fn buffer_limit(&self) -> usize {
        self.shared.device.budget().limit()
    }

    /// Bytes of packets held in queues now.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.device.budget().used()
    }

    /// Starts a handshake with `key` now, without waiting for traffic.
    pub fn initiate_handshake(&self, key: &PublicKey) -> Result<(), EngineError> {
        OUT_BUF.with_borrow_mut(|out| {
            self.shared
                .device
                .initiate_handshake(Instant::now(), key, out, &mut Net(&self.shared))
        })?;
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
        self.shared.device.peer_for(dst).map(|p| p.public_key())
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
        let end: Arc<dyn InnerSink> = Arc::new(TunSink(writer));
        // A sink in front (the userspace stack) keeps its place.
        let sink = self.sink().rewrap(end.clone()).unwrap_or(end);
        self.set_sink(sink);
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
        self.detach_relay();
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
                // A sink may have kept the buffer (`replace_buf`): lengths only.
                peer.delivered(self.packets.packet_len(i));
            } else {
                peer.drop_for(DropReason::SinkFull);
            }
        }
        self.packets.clear();
    }
}

/// The runtime's side of [`DeviceIo`]: the transport of the endpoint's kind.
struct Net<'a>(&'a Shared);

impl DeviceIo for Net<'_> {
    fn send(&mut self, datagram: &[u8], to: &Endpoint) {
        let udp = self.0.transport.read().clone();
        self.0.send_batch(&udp, datagram, datagram.len(), to);
    }
}

impl Shared {
    fn send_packet(&self, packet: &[u8]) -> Result<(), SendError> {
        if self.closed.load(Relaxed) {
            return Err(SendError::Closed);
        }
        let now = Instant::now();
        let sent =
            OUT_BUF.with_borrow_mut(|out| self.device.send(now, packet, out, &mut Net(self)));
        if let Err(e) = &sent {
            self.answer_refused(now, packet, e);
        }
        sent
    }

    /// Hands the host the answer to a packet the filter refused (a RST for
    /// a SYN, an ICMP admin-prohibited error for UDP and the rest;
    /// rate-limited), so its flow fails at once rather than by timeout.
    /// Only the host's own packets get here: a peer's refused packet is
    /// dropped silently on the receive path.
    fn answer_refused(&self, now: Instant, packet: &[u8], e: &SendError) {
        if !matches!(e, SendError::Filtered(FilterDrop::OutboundDenied)) {
            return;
        }
        let mut answer = [0u8; REJECT_ANSWER_MAX];
        if let Some(len) = self.device.reject_answer(now, packet, &mut answer) {
            let sink = self.sink.read().clone();
            // A full sink drops it like any packet for the host.
            sink.deliver(&answer[..len]);
        }
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
        let now = Instant::now();
        TX_BATCH.with_borrow_mut(|batch| {
            let mut accepted = 0;
            for packet in packets {
                if batch.room() < output_buffer_len(packet.len()) {
                    batch.flush(self, &transport);
                }
                let at = batch.used;
                match self.device.encapsulate(now, packet, &mut batch.buf[at..]) {
                    Ok(Encapsulated::Datagram { len, to }) => {
                        accepted += 1;
                        batch.push(at, len, to, self, &transport);
                    }
                    Ok(Encapsulated::Queued) => accepted += 1,
                    Err(e) => {
                        self.answer_refused(now, packet, &e);
                        rejected(packet, e)
                    }
                }
            }
            batch.flush(self, &transport);
            accepted
        })
    }

    /// One datagram from the network. A decrypted packet joins `rx`, to
    /// reach the sink with the rest of its batch.
    fn handle_datagram(&self, now: Instant, from: Endpoint, datagram: &[u8], rx: &mut RxBurst) {
        if rx.packets.is_full(output_buffer_len(datagram.len())) {
            rx.deliver(self);
        }
        let mut net = Net(self);
        let flush =
            match self
                .device
                .handle_datagram(now, from, datagram, rx.packets.spare(), &mut net)
            {
                Received::Nothing => return,
                Received::Packet { peer, len, flush } => {
                    rx.packets.commit(len);
                    rx.peers.push(peer.clone());
                    if !flush {
                        return;
                    }
                    peer
                }
                Received::Flush(peer) => peer,
            };
        if rx.packets.is_full(output_buffer_len(MAX_DATAGRAM)) {
            rx.deliver(self);
        }
        self.device
            .flush_queued(now, &flush, rx.packets.spare(), &mut net);
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
                let now = Instant::now();
                batch.for_each(n, |src, datagram| {
                    // STUN answers share the WireGuard socket; no WireGuard
                    // message is ever `is_stun` (see wire::stun).
                    if crate::wire::stun::is_stun(datagram)
                        && shared.handle_stun(normalize(src), datagram)
                    {
                        return;
                    }
                    shared.handle_datagram(now, Endpoint::Udp(normalize(src)), datagram, &mut rx)
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
    loop {
        if stop.recv_timeout(TIMER_TICK).is_ok() || shared.closed.load(Relaxed) {
            return;
        }
        shared
            .device
            .poll_timers(Instant::now(), &mut out, &mut Net(&shared));
        shared.poll_nat(Instant::now());
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
