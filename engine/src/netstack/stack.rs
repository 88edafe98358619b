//! The shared state of one stack and its thread.
//!
//! [`Inner`] is what every handle holds; [`Stack`] is what the lock guards:
//! the smoltcp interface and socket set, the device queues, and our own
//! bookkeeping per socket (its signal, whether its handle closed, the port
//! it owns), per listener (the idle listening socket and the connections
//! waiting for `accept`) and of sockets draining after close.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock, Weak};
use std::task::Waker;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Select, Sender};
use parking_lot::Mutex;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint, Ipv4Packet, Ipv6Packet, TcpPacket};

use super::device::MeshDevice;
use super::signal::{Direction, Signal};
use super::sink::{NetstackSink, RunOnReceive, RxBatch, RxPool};
use super::splice::{self, Pipe, Waiter};
use super::{NetstackConfig, NetstackError};
use crate::peer::DropReason;
use crate::wg::{Engine, SendError};
use crate::wire::IpHeader;

/// Packets smoltcp reads per poll before it sends what they caused (the
/// rest of a receive batch waits for the next poll).
const RX_BATCH: usize = 256;

/// In-order data is ACKed every this many full-sized segments (and at the
/// end of every poll; out-of-order data at once), not every second one as
/// RFC 9293 suggests: the kernel's GRO sends about as few ACKs, each costs
/// an encryption and a UDP send here, and the patched smoltcp sender grows
/// its window by the bytes an ACK covers, so a stack of ours on the other
/// end is not slowed by it. Measured against every second segment in
/// paired runs (engine/docs/performance.md).
const ACK_EVERY: usize = 16;
/// Longest sleep of an idle stack thread: how late it may notice that the
/// engine closed.
const IDLE_CHECK: Duration = Duration::from_millis(100);
/// How often sockets closed by their handles are checked for removal.
const REAP_EVERY: Duration = Duration::from_millis(10);
/// Ephemeral ports (RFC 6335 dynamic range).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Counters of one stack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetstackStats {
    /// Sockets of every kind, listening and closing ones included.
    pub sockets: usize,
    /// Packets for the stack dropped because its queue was full.
    pub rx_dropped: u64,
    /// SYNs ignored because a listener's backlog or the socket limit was full.
    pub syns_dropped: u64,
    /// Packets the stack sent that the engine had no peer (or endpoint) for.
    pub tx_unroutable: u64,
    /// Receive batches the receive thread ran the stack for itself, with no
    /// hand-off to the stack thread (see [`Inner::deliver_direct`]).
    pub polls_on_receive: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Tcp,
    Udp,
    Icmp,
}

/// A handle's reference to its socket: smoltcp reuses handles, so the id
/// tells a socket from a later one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SockRef {
    pub handle: SocketHandle,
    pub id: u64,
}

/// A port (or ICMP identifier) of one kind, bound on one of the stack's
/// addresses or, with `addr: None`, on all of them. Two bindings of the
/// same kind and port coexist only when both name different addresses, so
/// a v4 and a v6 listener can share a port, as on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Binding {
    pub kind: Kind,
    pub port: u16,
    pub addr: Option<IpAddr>,
}

impl Binding {
    /// The binding for `local` (an unspecified IP binds every address).
    pub fn new(kind: Kind, local: SocketAddr) -> Binding {
        Binding {
            kind,
            port: local.port(),
            addr: (!local.ip().is_unspecified()).then(|| local.ip()),
        }
    }

    /// A request for a free ephemeral port on every address (a dial's
    /// local port, a ping's identifier).
    pub fn ephemeral(kind: Kind) -> Binding {
        Binding {
            kind,
            port: 0,
            addr: None,
        }
    }

    /// What smoltcp listens on for this binding.
    pub fn endpoint(&self) -> IpListenEndpoint {
        IpListenEndpoint {
            addr: self.addr.map(Into::into),
            port: self.port,
        }
    }
}

pub(crate) struct Entry {
    pub id: u64,
    pub signal: Arc<Signal>,
    /// The port (or ICMP identifier) this socket holds and frees on removal.
    pub owned_port: Option<Binding>,
    /// A dial in progress: an unroutable SYN fails it as unreachable.
    pub connecting: bool,
    pub unreachable: bool,
    /// The handle was closed; the socket only drains.
    pub closed: bool,
    /// A connected UDP socket's remote ([`super::UdpSocket::connect`]).
    pub udp_peer: Option<SocketAddr>,
    /// An ICMP error about a connected UDP socket's datagram, reported
    /// once by its next send or receive (Linux's `sk_err`).
    pub error: Option<NetstackError>,
}

pub(crate) struct Listener {
    pub id: u64,
    pub backlog: usize,
    pub signal: Arc<Signal>,
    pub waker: Waker,
    /// The socket waiting in LISTEN for the next SYN, created on demand so
    /// an idle listener holds no buffers.
    pub idle: Option<SocketHandle>,
    /// Sockets that left LISTEN, in arrival order, until accepted.
    pub pending: VecDeque<SocketHandle>,
}

pub(crate) struct Stack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub device: MeshDevice,
    pub entries: HashMap<SocketHandle, Entry>,
    pub listeners: HashMap<Binding, Listener>,
    closing: Vec<(SocketHandle, Instant)>,
    /// The addresses bound on each port of each kind; `None` holds the
    /// whole port (an unspecified address, or a dial's ephemeral port).
    ports: HashMap<(Kind, u16), Vec<Option<IpAddr>>>,
    /// Connected UDP sockets by local port and remote, so an ICMP error
    /// finds its socket in one lookup.
    connected_udp: HashMap<(u16, SocketAddr), SocketHandle>,
    next_port: u16,
    next_id: u64,
    epoch: Instant,
    last_reap: Instant,
    /// Connections spliced to kernel sockets ([`super::TcpStream::splice`]).
    pub splices: Vec<(SockRef, Pipe)>,
    /// When the stack thread polls next on its own (its timers); a direct
    /// poll that wants an earlier one kicks it.
    wake_at: SmolInstant,
}

struct Counters {
    rx_dropped: Arc<AtomicU64>,
    syns_dropped: AtomicU64,
    tx_unroutable: AtomicU64,
    polls_on_receive: AtomicU64,
}

pub(crate) struct Inner {
    pub stack: Mutex<Stack>,
    pub config: NetstackConfig,
    pub mtu: usize,
    addresses: Vec<IpAddr>,
    engine: Weak<Engine>,
    kick: Sender<()>,
    /// Receive batches for the stack, taken only under the stack lock, so
    /// that whichever thread polls reads them in the order they came.
    packets: Receiver<RxBatch>,
    closed: AtomicBool,
    detached: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Counters,
    /// Made by the first splice.
    pub waiter: OnceLock<Waiter>,
    /// Held from a poll until its output is sent, so the output of one
    /// poll leaves before the next poll's, whichever thread polls.
    send_lock: Mutex<()>,
    /// Destinations a poll's output found no route to, for the stack
    /// thread's next poll to fail their dials.
    unreachable: Mutex<Vec<IpAddr>>,
    /// Whether a receive thread may run the stack for its batch (see
    /// [`Inner::deliver_direct`]); looked at after each poll, written
    /// only when it changes. Shared with the sink.
    poll_on_receive: Arc<AtomicBool>,
}

thread_local! {
    /// Sent packet buffers of this thread's direct polls, returned to the
    /// device at its next one.
    static DIRECT_SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random number generator failed");
    u64::from_le_bytes(b)
}

impl Inner {
    pub fn start(
        engine: &Arc<Engine>,
        config: NetstackConfig,
    ) -> Result<Arc<Inner>, NetstackError> {
        if config.max_sockets == 0 || config.rx_queue_packets == 0 {
            return Err(NetstackError::InvalidInput(
                "max_sockets and rx_queue_packets must be positive",
            ));
        }
        if config.tcp_rx_buffer == 0 || config.tcp_rx_buffer > 1 << 30 || config.tcp_tx_buffer == 0
        {
            return Err(NetstackError::InvalidInput(
                "TCP buffers must be between 1 byte and 1 GiB",
            ));
        }
        let prefixes = config
            .addresses
            .clone()
            .unwrap_or_else(|| engine.addresses());
        if prefixes.is_empty() {
            return Err(NetstackError::NoAddress);
        }
        let mtu = engine.mtu() as usize;
        let mut device = MeshDevice::new(mtu);
        let epoch = Instant::now();
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = random_u64();
        let mut iface = Interface::new(iface_config, &mut device, SmolInstant::ZERO);
        let mut addresses = Vec::new();
        iface.update_ip_addrs(|addrs| {
            for p in &prefixes {
                if addrs.push(IpCidr::new(p.addr().into(), p.len())).is_ok() {
                    addresses.push(p.addr());
                } else {
                    tracing::warn!(address = %p, "netstack: too many addresses, ignoring");
                }
            }
        });
        // Everything off-link goes to the mesh: with Medium::Ip the
        // gateway is never looked up, a default route just has to exist.
        for a in &addresses {
            match a {
                IpAddr::V4(v4) if iface.ipv4_addr() == Some(*v4) => {
                    let _ = iface.routes_mut().add_default_ipv4_route(*v4);
                }
                IpAddr::V6(v6) if iface.ipv6_addr() == Some(*v6) => {
                    let _ = iface.routes_mut().add_default_ipv6_route(*v6);
                }
                _ => {}
            }
        }

        let (packets_tx, packets_rx) = bounded(config.rx_queue_packets);
        let (kick_tx, kick_rx) = bounded(1);
        let detached = Arc::new(AtomicBool::new(false));
        let rx_dropped = Arc::new(AtomicU64::new(0));
        let inner = Arc::new(Inner {
            stack: Mutex::new(Stack {
                iface,
                sockets: SocketSet::new(Vec::new()),
                device,
                entries: HashMap::new(),
                listeners: HashMap::new(),
                closing: Vec::new(),
                ports: HashMap::new(),
                connected_udp: HashMap::new(),
                next_port: *EPHEMERAL.start() + (random_u64() % 16384) as u16,
                next_id: 1,
                epoch,
                last_reap: epoch,
                splices: Vec::new(),
                wake_at: SmolInstant::ZERO,
            }),
            mtu,
            addresses: addresses.clone(),
            engine: Arc::downgrade(engine),
            kick: kick_tx,
            packets: packets_rx,
            closed: AtomicBool::new(false),
            detached: detached.clone(),
            thread: Mutex::new(None),
            waiter: OnceLock::new(),
            send_lock: Mutex::new(()),
            unreachable: Mutex::new(Vec::new()),
            poll_on_receive: Arc::new(AtomicBool::new(false)),
            counters: Counters {
                rx_dropped: rx_dropped.clone(),
                syns_dropped: AtomicU64::new(0),
                tx_unroutable: AtomicU64::new(0),
                polls_on_receive: AtomicU64::new(0),
            },
            config,
        });
        let t = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("meshvpn-netstack".into())
                .spawn(move || run(inner, kick_rx))
                .map_err(|_| NetstackError::Thread)?
        };
        *inner.thread.lock() = Some(t);
        let sink = NetstackSink {
            stack: Arc::downgrade(&inner) as Weak<dyn RunOnReceive>,
            run_on_receive: inner.poll_on_receive.clone(),
            addresses,
            queue: packets_tx,
            pool: RxPool::new(inner.config.rx_queue_packets, mtu),
            next: engine.sink(),
            detached,
            dropped: rx_dropped,
        };
        engine.set_sink(Arc::new(sink));
        Ok(inner)
    }

    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    /// The engine, or `Closed` once it is gone or closed.
    pub fn engine(&self) -> Result<Arc<Engine>, NetstackError> {
        match self.engine.upgrade() {
            Some(e) if !e.is_closed() && !self.is_closed() => Ok(e),
            _ => Err(NetstackError::Closed),
        }
    }

    /// Checks that `dst` can be reached: the stack has an address of its
    /// family and a peer's AllowedIPs cover it.
    pub fn check_route(&self, dst: IpAddr) -> Result<(), NetstackError> {
        if dst.is_unspecified() || dst.is_multicast() {
            return Err(NetstackError::InvalidInput(
                "unspecified or multicast address",
            ));
        }
        if !self.addresses.iter().any(|a| a.is_ipv4() == dst.is_ipv4()) {
            return Err(NetstackError::NoAddress);
        }
        match self.engine()?.peer_for(dst) {
            Some(_) => Ok(()),
            None => Err(NetstackError::Unreachable),
        }
    }

    /// Checks a local address to bind: unspecified or one of ours.
    pub fn check_local(&self, ip: IpAddr) -> Result<(), NetstackError> {
        if ip.is_unspecified() || self.addresses.contains(&ip) {
            Ok(())
        } else {
            Err(NetstackError::AddrNotAvailable)
        }
    }

    /// Asks the stack thread to poll (after a caller queued data to send or
    /// made room to receive). Kicks coalesce.
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Runs `attempt` under the stack lock until it gives a result, sleeping
    /// on `signal` in between. `attempt` registers the socket's waker when
    /// it returns `None`, and the wait then arms `dir`'s eventfd (for a
    /// caller that sleeps in its own event loop). Wakes on the signal
    /// (socket change, handle close, stack shutdown) and fails with
    /// `TimedOut` at `deadline`.
    pub fn wait<T>(
        &self,
        signal: &Signal,
        dir: Direction,
        deadline: Option<Instant>,
        nonblocking: bool,
        mut attempt: impl FnMut(&mut Stack) -> Option<Result<T, NetstackError>>,
    ) -> Result<T, NetstackError> {
        loop {
            let seen = {
                let mut st = self.stack.lock();
                if self.is_closed() {
                    return Err(NetstackError::Closed);
                }
                if let Some(r) = attempt(&mut st) {
                    return r;
                }
                signal.arm(dir);
                signal.generation()
            };
            if nonblocking {
                return Err(NetstackError::WouldBlock);
            }
            if !signal.wait(seen, deadline) {
                return Err(NetstackError::TimedOut);
            }
        }
    }

    pub fn stats(&self) -> NetstackStats {
        NetstackStats {
            sockets: self.stack.lock().entries.len(),
            rx_dropped: self.counters.rx_dropped.load(Relaxed),
            syns_dropped: self.counters.syns_dropped.load(Relaxed),
            tx_unroutable: self.counters.tx_unroutable.load(Relaxed),
            polls_on_receive: self.counters.polls_on_receive.load(Relaxed),
        }
    }

    /// Stops the stack: the sink passes everything on, the thread exits,
    /// every blocked call wakes with `Closed`.
    pub fn shutdown(&self) {
        self.closed.store(true, SeqCst);
        self.detached.store(true, SeqCst);
        self.kick();
        let t = self.thread.lock().take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        self.wake_all();
    }

    fn wake_all(&self) {
        let mut st = self.stack.lock();
        for (_, p) in std::mem::take(&mut st.splices) {
            p.finish(false);
        }
        for e in st.entries.values() {
            e.signal.notify();
        }
        for l in st.listeners.values() {
            l.signal.notify();
        }
    }
}

/// The netstack thread: waits for packets, kicks or the next socket
/// deadline, then polls once for the whole batch and sends its output.
fn run(inner: Arc<Inner>, kicks: Receiver<()>) {
    // However the loop ends (engine gone, stack closed, or a panic), the
    // stack is marked closed and every blocked caller wakes.
    struct Stopped<'a>(&'a Inner);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.closed.store(true, SeqCst);
            self.0.detached.store(true, SeqCst);
            // Batches queued before the sink saw `detached` go back.
            while self.0.packets.try_recv().is_ok() {}
            self.0.wake_all();
        }
    }
    let _stopped = Stopped(&inner);
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut delay = Duration::ZERO;
    loop {
        if !delay.is_zero() {
            // Wait without taking: batches leave the queue under the lock.
            let mut sel = Select::new();
            sel.recv(&inner.packets);
            sel.recv(&kicks);
            let _ = sel.ready_timeout(delay);
        }
        while kicks.try_recv().is_ok() {}
        let Ok(engine) = inner.engine() else { break };
        let sending = inner.send_lock.lock();
        {
            let mut guard = inner.stack.lock();
            let st = &mut *guard;
            while st.device.pending() < RX_BATCH {
                match inner.packets.try_recv() {
                    Ok(b) => st.device.push(b),
                    Err(_) => break,
                }
            }
            st.device.free.append(&mut spare);
            let unreachable = std::mem::take(&mut *inner.unreachable.lock());
            if !unreachable.is_empty() {
                st.fail_unreachable(&unreachable);
            }
            // Spliced bytes the kernel holds leave in this poll; what the
            // poll received or made room for moves right after it.
            st.pump_splices(inner.config.close_linger);
            st.poll(&inner);
            delay = st.delay().min(IDLE_CHECK);
            if st.pump_splices(inner.config.close_linger) {
                delay = Duration::ZERO;
            }
            if st.device.pending() > 0 {
                delay = Duration::ZERO;
            }
            st.wake_at = st.now() + smol_timeout(Some(delay)).unwrap_or_default();
            inner.note_poll_on_receive(st);
            std::mem::swap(&mut out, &mut st.device.tx);
        }
        let unroutable = inner.send_output(&engine, &out);
        drop(sending);
        spare.append(&mut out);
        if unroutable || !inner.packets.is_empty() {
            delay = Duration::ZERO;
        }
    }
}

impl Inner {
    /// Updates the flag the sink reads per batch, writing it only when it
    /// changes (the sink's receive threads read it for every batch).
    fn note_poll_on_receive(&self, st: &Stack) {
        let want = st.poll_on_receive();
        if self.poll_on_receive.load(Relaxed) != want {
            self.poll_on_receive.store(want, Relaxed);
        }
    }

    /// Sends a poll's output (without the stack lock) as one batch:
    /// consecutive packets to a peer leave in one GSO send. Destinations
    /// without a route are noted for the next poll to fail their dials;
    /// true when there were any.
    fn send_output(&self, engine: &Engine, out: &[Vec<u8>]) -> bool {
        let mut unroutable = false;
        engine.send_packets_reporting(out.iter().map(Vec::as_slice), |p, e| {
            if let SendError::NoRoute | SendError::Dropped(DropReason::NoEndpoint) = e {
                self.counters.tx_unroutable.fetch_add(1, Relaxed);
                unroutable = true;
                if let Ok(h) = IpHeader::new_checked(p) {
                    let mut u = self.unreachable.lock();
                    if !u.contains(&h.dst) {
                        u.push(h.dst);
                    }
                }
            }
        });
        unroutable
    }

    /// Runs the stack for `batch` on the calling receive thread, when no
    /// other thread polls it or sends its output: one poll with its splices
    /// pumped, its output sent from here, no hand-off to the stack thread.
    /// Gives the batch back when the stack is busy or closed (the caller
    /// queues it). Kicks the stack thread when the poll left work or wants
    /// a timer earlier than the stack thread's next wake. A panic in the
    /// poll stops the stack, as one on the stack thread does, and does not
    /// reach the receive thread.
    pub fn deliver_direct(&self, batch: RxBatch) -> Result<(), RxBatch> {
        let Some(sending) = self.send_lock.try_lock() else {
            return Err(batch);
        };
        let Some(mut st) = self.stack.try_lock() else {
            return Err(batch);
        };
        let Ok(engine) = self.engine() else {
            return Err(batch);
        };
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DIRECT_SPARE.with_borrow_mut(|spare| st.device.free.append(spare));
            // Batches queued before this one are read first.
            while let Ok(b) = self.packets.try_recv() {
                st.device.push(b);
            }
            st.device.push(batch);
            let linger = self.config.close_linger;
            st.pump_splices(linger);
            st.poll(self);
            let delay = st.delay();
            let more = st.pump_splices(linger) || st.device.pending() > 0;
            let wake = st.now() + smol_timeout(Some(delay)).unwrap_or_default();
            self.note_poll_on_receive(&st);
            (std::mem::take(&mut st.device.tx), more || wake < st.wake_at)
        }));
        drop(st);
        self.counters.polls_on_receive.fetch_add(1, Relaxed);
        let Ok((mut out, mut kick)) = polled else {
            // The stack thread sees `closed`, stops, and wakes every caller.
            self.closed.store(true, SeqCst);
            self.detached.store(true, SeqCst);
            self.kick();
            return Ok(());
        };
        // The stack thread's next poll fails the dials to unroutable ones.
        kick |= self.send_output(&engine, &out);
        drop(sending);
        DIRECT_SPARE.with_borrow_mut(|spare| spare.append(&mut out));
        if kick {
            self.kick();
        }
        Ok(())
    }
}

impl RunOnReceive for Inner {
    fn run(&self, batch: RxBatch) -> Result<(), RxBatch> {
        self.deliver_direct(batch)
    }
}

/// A std duration as smoltcp's.
pub(crate) fn smol_timeout(d: Option<Duration>) -> Option<smoltcp::time::Duration> {
    d.map(|d| smoltcp::time::Duration::from_micros(d.as_micros() as u64))
}

/// The destination of a TCP SYN (without ACK), the packets that open
/// connections to listeners.
fn syn_destination(packet: &[u8]) -> Option<SocketAddr> {
    let (dst, payload) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != smoltcp::wire::IpProtocol::Tcp || ip.frag_offset() != 0 {
                return None;
            }
            (IpAddr::V4(ip.dst_addr()), ip.payload())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != smoltcp::wire::IpProtocol::Tcp {
                return None;
            }
            (IpAddr::V6(ip.dst_addr()), ip.payload())
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| SocketAddr::new(dst, tcp.dst_port()))
}

/// The local port, remote and error of an ICMP destination unreachable
/// that quotes a UDP datagram the stack sent: port unreachable and
/// administratively prohibited (what a filter's `reject` sends) refuse,
/// net and host unreachable make the remote unreachable. Other ICMP
/// messages give `None`.
fn udp_icmp_error(packet: &[u8]) -> Option<(u16, SocketAddr, NetstackError)> {
    use crate::wire::icmp::types;
    use crate::wire::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP};
    use crate::wire::{IcmpPacket, IpPacket, UdpPacket};
    let ip = IpPacket::new_checked(packet).ok()?;
    let v4 = ip.is_v4();
    if ip.protocol() != if v4 { PROTO_ICMP } else { PROTO_ICMPV6 } || ip.fragment_offset() != 0 {
        return None;
    }
    let icmp = IcmpPacket::new_checked(ip.payload(), v4).ok()?;
    let err = match (v4, icmp.msg_type(), icmp.code()) {
        // RFC 1812 5.2.7.1: port unreachable (3); administratively
        // prohibited (9, 10, 13).
        (true, types::V4_DEST_UNREACHABLE, 3 | 9 | 10 | 13) => NetstackError::Refused,
        (true, types::V4_DEST_UNREACHABLE, 0 | 1) => NetstackError::Unreachable,
        // RFC 4443 3.1: administratively prohibited (1), port
        // unreachable (4); no route (0), address unreachable (3).
        (false, types::V6_DEST_UNREACHABLE, 1 | 4) => NetstackError::Refused,
        (false, types::V6_DEST_UNREACHABLE, 0 | 3) => NetstackError::Unreachable,
        _ => return None,
    };
    // The quoted datagram: its IP header and at least the UDP ports.
    let quoted = IpPacket::new_checked(ip.payload().get(8..)?).ok()?;
    if quoted.is_v4() != v4 || quoted.protocol() != PROTO_UDP || quoted.fragment_offset() != 0 {
        return None;
    }
    let udp = UdpPacket::new_checked(quoted.payload()).ok()?;
    let a = quoted.addrs();
    let dst: IpAddr = if v4 {
        <[u8; 4]>::try_from(&a[4..]).ok()?.into()
    } else {
        <[u8; 16]>::try_from(&a[16..]).ok()?.into()
    };
    Some((udp.src_port(), SocketAddr::new(dst, udp.dst_port()), err))
}

impl Stack {
    pub fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// The live entry of `r`, or `Closed` when its handle closed or the
    /// socket is gone.
    pub fn entry(&mut self, r: SockRef) -> Result<&mut Entry, NetstackError> {
        self.entries
            .get_mut(&r.handle)
            .filter(|e| e.id == r.id && !e.closed)
            .ok_or(NetstackError::Closed)
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    pub fn check_capacity(&self, max: usize) -> Result<(), NetstackError> {
        if self.entries.len() >= max {
            return Err(NetstackError::SocketLimit(max));
        }
        Ok(())
    }

    /// Takes `want`'s port (0: a free ephemeral one) of its kind on its
    /// address, and returns the binding with the port.
    pub fn take_port(&mut self, want: Binding) -> Result<Binding, NetstackError> {
        if want.port != 0 {
            let used = self.ports.entry((want.kind, want.port)).or_default();
            let clash = used
                .iter()
                .any(|a| a.is_none() || want.addr.is_none() || *a == want.addr);
            if clash {
                return Err(NetstackError::AddrInUse);
            }
            used.push(want.addr);
            return Ok(want);
        }
        let span = EPHEMERAL.end() - EPHEMERAL.start() + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                p + 1
            };
            if let std::collections::hash_map::Entry::Vacant(v) = self.ports.entry((want.kind, p)) {
                v.insert(vec![want.addr]);
                return Ok(Binding { port: p, ..want });
            }
        }
        Err(NetstackError::AddrInUse)
    }

    pub fn free_port(&mut self, b: Binding) {
        let key = (b.kind, b.port);
        if let Some(used) = self.ports.get_mut(&key) {
            if let Some(i) = used.iter().position(|a| *a == b.addr) {
                used.swap_remove(i);
            }
            if used.is_empty() {
                self.ports.remove(&key);
            }
        }
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn add<S: smoltcp::socket::AnySocket<'static>>(
        &mut self,
        socket: S,
        owned_port: Option<Binding>,
        signal: Arc<Signal>,
    ) -> SockRef {
        let handle = self.sockets.add(socket);
        let id = self.next_id();
        self.entries.insert(
            handle,
            Entry {
                id,
                signal,
                owned_port,
                connecting: false,
                unreachable: false,
                closed: false,
                udp_peer: None,
                error: None,
            },
        );
        SockRef { handle, id }
    }

    /// Removes a socket now and frees what it held.
    pub fn release(&mut self, h: SocketHandle) {
        if let Some(e) = self.entries.remove(&h) {
            if let Some(b) = e.owned_port {
                if let Some(peer) = e.udp_peer {
                    self.connected_udp.remove(&(b.port, peer));
                }
                self.free_port(b);
            }
            e.signal.notify();
            self.sockets.remove(h);
        }
    }

    /// Connects UDP socket `r` (bound on `port`) to `peer`: only its
    /// datagrams are received, and ICMP errors about datagrams to it fail
    /// the next send or receive.
    pub fn connect_udp(
        &mut self,
        r: SockRef,
        port: u16,
        peer: SocketAddr,
    ) -> Result<(), NetstackError> {
        if self
            .connected_udp
            .get(&(port, peer))
            .is_some_and(|h| *h != r.handle)
        {
            return Err(NetstackError::AddrInUse);
        }
        let e = self.entry(r)?;
        let old = e.udp_peer.replace(peer);
        e.error = None;
        if let Some(old) = old {
            self.connected_udp.remove(&(port, old));
        }
        self.connected_udp.insert((port, peer), r.handle);
        Ok(())
    }

    /// Hands an ICMP error the stack received to the connected UDP socket
    /// whose datagram it quotes, as Linux does for connected sockets
    /// (`__udp4_lib_err`); smoltcp's UDP sockets ignore ICMP.
    fn refuse_udp(&mut self, port: u16, peer: SocketAddr, err: NetstackError) {
        let Some(h) = self.connected_udp.get(&(port, peer)) else {
            return;
        };
        if let Some(e) = self.entries.get_mut(h) {
            e.error = Some(err);
            e.signal.notify();
        }
    }

    /// A TCP socket with the configured buffers and options.
    pub fn new_tcp_socket(config: &NetstackConfig) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; config.tcp_rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; config.tcp_tx_buffer]),
        );
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        s.set_nagle_enabled(!config.tcp_nodelay);
        // The stack is polled once per batch of packets, which already
        // coalesces ACKs: every poll ACKs what its batch brought in, and the
        // patched smoltcp (engine/vendor/README.md) ACKs in-order data every
        // `ACK_EVERY` segments within a batch. A delayed-ACK timer on top
        // only slows the sender's recovery.
        s.set_ack_delay(None);
        s.set_ack_every(ACK_EVERY);
        s
    }

    /// A closed handle's TCP socket: FIN after the queued bytes, removed
    /// once closed (or reset after `linger`).
    pub fn close_tcp(&mut self, r: SockRef, linger: Duration) {
        let Ok(e) = self.entry(r) else { return };
        e.closed = true;
        e.signal.notify();
        self.tcp(r.handle).close();
        self.closing.push((r.handle, Instant::now() + linger));
    }

    /// Closes a UDP or ICMP handle's socket: nothing to drain.
    pub fn close_now(&mut self, r: SockRef) {
        if self.entry(r).is_ok() {
            self.release(r.handle);
        }
    }

    /// Pumps every splice ([`splice::pump`]); closes the connections of
    /// those that ended. True when bytes moved.
    fn pump_splices(&mut self, linger: Duration) -> bool {
        let mut moved = false;
        let mut i = 0;
        while i < self.splices.len() {
            let (sock, pipe) = &mut self.splices[i];
            let s = self.sockets.get_mut::<tcp::Socket>(sock.handle);
            let r = splice::pump(pipe, s);
            moved |= r.moved;
            let Some(clean) = r.ended else {
                i += 1;
                continue;
            };
            let (sock, pipe) = self.splices.swap_remove(i);
            if !clean {
                self.tcp(sock.handle).abort();
            }
            self.close_tcp(sock, linger);
            pipe.finish(clean);
        }
        moved
    }

    fn poll(&mut self, inner: &Inner) {
        let now = self.now();
        self.iface.poll_maintenance(now);
        self.ingress(now, inner);
        self.device.drop_read();
        while self
            .iface
            .poll_egress(now, &mut self.device, &mut self.sockets)
            != smoltcp::iface::PollResult::None
        {}
        if !self.closing.is_empty() && self.last_reap.elapsed() >= REAP_EVERY {
            self.reap();
        }
    }

    /// Whether a receive thread should run this stack for its batches:
    /// when connections are spliced (what arrives goes to a kernel socket
    /// within the poll, with no reader thread to wake) and none has bytes
    /// queued to send (so the poll sends ACKs, not data). Measured both
    /// ways in engine/docs/performance.md: a spliced download gains; a
    /// sender, or a receiver with reader threads, loses when its receive
    /// thread also runs the stack.
    fn poll_on_receive(&self) -> bool {
        !self.splices.is_empty()
            && !self.sockets.iter().any(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => t.send_queue() > 0,
                #[allow(unreachable_patterns)]
                _ => false,
            })
    }

    fn delay(&mut self) -> Duration {
        let now = self.now();
        match self.iface.poll_delay(now, &self.sockets) {
            Some(d) => Duration::from_micros(d.total_micros()),
            None => IDLE_CHECK,
        }
    }

    /// Feeds the queued packets to smoltcp one by one; a SYN for a listener
    /// first gets a listening socket (or is dropped when the backlog or the
    /// socket limit is full); an ICMP error about a connected UDP socket's
    /// datagram is noted for that socket.
    fn ingress(&mut self, now: SmolInstant, inner: &Inner) {
        for _ in 0..RX_BATCH {
            let Some(front) = self.device.peek() else {
                break;
            };
            let icmp_error = if self.connected_udp.is_empty() {
                None
            } else {
                udp_icmp_error(front)
            };
            let listener = if self.listeners.is_empty() {
                None
            } else {
                syn_destination(front).and_then(|dst| self.listener_for(dst))
            };
            if let Some(key) = listener {
                if !self.ready_listener(key, &inner.config) {
                    self.device.pop();
                    inner.counters.syns_dropped.fetch_add(1, Relaxed);
                    continue;
                }
            }
            if let Some((port, peer, err)) = icmp_error {
                self.refuse_udp(port, peer, err);
            }
            self.iface
                .poll_ingress_single(now, &mut self.device, &mut self.sockets);
            if let Some(key) = listener {
                self.settle_listener(key);
            }
        }
    }

    /// The listener a SYN to `dst` reaches: one on that address, else one
    /// on every address.
    fn listener_for(&self, dst: SocketAddr) -> Option<Binding> {
        let exact = Binding::new(Kind::Tcp, dst);
        let any = Binding {
            addr: None,
            ..exact
        };
        [exact, any]
            .into_iter()
            .find(|k| self.listeners.contains_key(k))
    }

    /// Makes sure listener `key` has a socket in LISTEN. False when its
    /// backlog or the socket limit is full.
    fn ready_listener(&mut self, key: Binding, config: &NetstackConfig) -> bool {
        self.settle_listener(key);
        let Some(l) = self.listeners.get_mut(&key) else {
            return false;
        };
        if l.idle.is_some() {
            return true;
        }
        if l.pending.len() >= l.backlog {
            // Make room from connections that died before being accepted.
            let dead: Vec<SocketHandle> = l
                .pending
                .iter()
                .copied()
                .filter(|h| self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Closed)
                .collect();
            l.pending.retain(|h| !dead.contains(h));
            for h in dead {
                self.release(h);
            }
        }
        let Some(l) = self.listeners.get(&key) else {
            return false;
        };
        if l.pending.len() >= l.backlog || self.entries.len() >= config.max_sockets {
            return false;
        }
        let (signal, waker) = (l.signal.clone(), l.waker.clone());
        let mut s = Self::new_tcp_socket(config);
        // A handshake that never completes must not hold a backlog slot.
        s.set_timeout(smol_timeout(config.tcp_timeout));
        if s.listen(key.endpoint()).is_err() {
            return false;
        }
        s.register_recv_waker(&waker);
        let r = self.add(s, None, signal);
        if let Some(l) = self.listeners.get_mut(&key) {
            l.idle = Some(r.handle);
        }
        true
    }

    /// Moves listener `key`'s idle socket to the pending queue once a SYN
    /// took it out of LISTEN.
    fn settle_listener(&mut self, key: Binding) {
        let Some(l) = self.listeners.get_mut(&key) else {
            return;
        };
        let Some(h) = l.idle else { return };
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if s.state() != tcp::State::Listen {
            s.register_recv_waker(&l.waker);
            l.pending.push_back(h);
            l.idle = None;
            l.signal.notify();
        }
    }

    /// Removes sockets closed by their handles once they finish closing, and
    /// resets those that outstayed their linger.
    fn reap(&mut self) {
        let now = Instant::now();
        self.last_reap = now;
        let mut i = 0;
        while i < self.closing.len() {
            let (h, deadline) = self.closing[i];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Closed | tcp::State::TimeWait => {
                    self.closing.swap_remove(i);
                    self.release(h);
                }
                _ => {
                    if now >= deadline {
                        s.abort();
                    }
                    i += 1;
                }
            }
        }
    }

    /// Fails dials whose SYN the engine could not route.
    fn fail_unreachable(&mut self, dsts: &[IpAddr]) {
        for (h, e) in self.entries.iter_mut() {
            if !e.connecting || e.unreachable {
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if let Some(remote) = s.remote_endpoint() {
                if dsts.contains(&IpAddr::from(remote.addr)) {
                    e.unreachable = true;
                    s.abort();
                    e.signal.notify();
                }
            }
        }
    }

    /// Closes a listener: its idle socket goes, connections not yet
    /// accepted are reset.
    pub fn close_listener(&mut self, key: Binding, id: u64) {
        if self.listeners.get(&key).is_none_or(|l| l.id != id) {
            return;
        }
        let Some(l) = self.listeners.remove(&key) else {
            return;
        };
        if let Some(h) = l.idle {
            self.release(h);
        }
        let now = Instant::now();
        for h in l.pending {
            self.tcp(h).abort();
            if let Some(e) = self.entries.get_mut(&h) {
                e.closed = true;
            }
            self.closing.push((h, now));
        }
        self.free_port(key);
        l.signal.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::reject::{icmp_prohibited, tcp_reset};
    use crate::filter::REJECT_ANSWER_MAX;

    /// A UDP datagram (or, with `proto` 6, a bare SYN) from `src` port
    /// 40000 to `dst` port 9090, `payload` bytes long.
    fn datagram(src: IpAddr, dst: IpAddr, proto: u8, payload: usize) -> Vec<u8> {
        let l4 = if proto == 6 {
            20 + payload
        } else {
            8 + payload
        };
        let (mut p, h) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0u8; 20 + l4];
                p[0] = 0x45;
                p[2..4].copy_from_slice(&((20 + l4) as u16).to_be_bytes());
                p[8] = 64;
                p[9] = proto;
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
                (p, 20)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0u8; 40 + l4];
                p[0] = 0x60;
                p[4..6].copy_from_slice(&(l4 as u16).to_be_bytes());
                p[6] = proto;
                p[7] = 64;
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
                (p, 40)
            }
            _ => unreachable!("one family"),
        };
        p[h..h + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[h + 2..h + 4].copy_from_slice(&9090u16.to_be_bytes());
        if proto == 6 {
            p[h + 12] = 5 << 4;
            p[h + 13] = 0x02;
        } else {
            p[h + 4..h + 6].copy_from_slice(&(l4 as u16).to_be_bytes());
        }
        p
    }

    #[test]
    fn an_icmp_error_names_the_connected_udp_socket_it_quotes() {
        let (a4, b4) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let (a6, b6): (IpAddr, IpAddr) = ("fd7a::1".parse().unwrap(), "fd7a::2".parse().unwrap());
        let mut out = [0u8; REJECT_ANSWER_MAX];
        // The engine's own answer to a refused datagram, small and cut
        // (the quote ends inside the datagram), both families.
        for (a, b) in [(a4, b4), (a6, b6)] {
            for payload in [4, 1400] {
                let len = icmp_prohibited(&datagram(a, b, 17, payload), &mut out).unwrap();
                assert_eq!(
                    udp_icmp_error(&out[..len]),
                    Some((40000, SocketAddr::new(b, 9090), NetstackError::Refused)),
                    "{a} {payload}"
                );
            }
        }
        // Host unreachable makes the remote unreachable.
        let len = icmp_prohibited(&datagram(a4, b4, 17, 4), &mut out).unwrap();
        out[21] = 1;
        assert_eq!(
            udp_icmp_error(&out[..len]).map(|e| e.2),
            Some(NetstackError::Unreachable)
        );
        // Not about UDP, not an error, or cut inside the UDP header: none.
        let len = icmp_prohibited(&datagram(a4, b4, 47, 4), &mut out).unwrap();
        assert_eq!(udp_icmp_error(&out[..len]), None, "quotes GRE");
        let len = tcp_reset(&datagram(a4, b4, 6, 0), &mut out).unwrap();
        assert_eq!(udp_icmp_error(&out[..len]), None, "a RST");
        let len = icmp_prohibited(&datagram(a4, b4, 17, 4), &mut out).unwrap();
        out[20] = 8;
        assert_eq!(udp_icmp_error(&out[..len]), None, "an echo request");
        out[20] = 3;
        assert_eq!(udp_icmp_error(&out[..20 + 8 + 20 + 4]), None, "cut short");
    }
}
