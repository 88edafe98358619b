//! Whole [`Device`]s in simulated time, without threads or sockets: a
//! network of nodes joined by a UDP "internet" (lossy, reordering,
//! delaying, with addresses that can change and paths that can be cut) and
//! a relay that delivers by key, as the websocket relay does.
//!
//! Deterministic: all randomness comes from one seed (printed; replay with
//! `MESHVPN_LINK_SEED`), and the devices get their time from the
//! simulation's clock, which moves one millisecond per tick. Modelled on
//! quinn-proto's `tests/util.rs` `Pair`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvpn_engine::device::{Device, DeviceIo, Endpoint, Received};
use meshvpn_engine::peer::{output_buffer_len, BufferBudget, Peer};
use meshvpn_engine::{PeerConfig, PrivateKey, PublicKey};

use super::link::Rng;

/// Simulated time per tick.
pub const TICK: Duration = Duration::from_millis(1);

/// What the UDP side of the network does to datagrams (the relay is
/// reliable and in order, like a websocket).
#[derive(Debug, Clone, Copy, Default)]
pub struct Net {
    /// Chance in 1000 that a datagram is lost.
    pub loss: u32,
    /// Chance in 1000 that a datagram is held back by up to `reorder_ticks`.
    pub reorder: u32,
    pub reorder_ticks: u64,
    /// Every datagram takes at least this many ticks (0: next tick).
    pub delay_ticks: u64,
    /// Chance in 1000 that a datagram arrives twice (the copy with a delay
    /// and reordering of its own), as a network may duplicate it.
    pub duplicate: u32,
}

pub struct Node {
    pub device: Device,
    pub key: PrivateKey,
    /// The UDP address the node sends from now.
    pub addr: SocketAddr,
    /// The node's mesh address (its peers' AllowedIPs hold it as /32).
    pub ip: IpAddr,
    /// Decrypted packets the node delivered, in order.
    pub received: Vec<Vec<u8>>,
    /// `key`'s public key, computed once (the relay looks nodes up by it
    /// for every datagram).
    public: PublicKey,
}

impl Node {
    pub fn public(&self) -> PublicKey {
        self.public
    }
}

struct InFlight {
    at: u64,
    to: usize,
    from: Endpoint,
    bytes: Vec<u8>,
}

/// What a device handed to its [`DeviceIo`] during one call.
#[derive(Default)]
struct Outbox(Vec<(Vec<u8>, Endpoint)>);

impl DeviceIo for Outbox {
    fn send(&mut self, datagram: &[u8], to: &Endpoint) {
        self.0.push((datagram.to_vec(), *to));
    }
}

/// A NAT router in front of some nodes, modelled on Linux conntrack with
/// nftables `masquerade`: a node's datagrams leave from `public_ip` and a
/// mapped port; what comes in is let through only as a reply (its source
/// is exactly an address the node sent to from that port).
#[derive(Debug, Clone)]
pub struct NatBox {
    pub public_ip: IpAddr,
    /// `masquerade random`: a new port per destination (an
    /// endpoint-dependent, "symmetric", mapping). Otherwise the node keeps
    /// one port for all destinations (endpoint-independent).
    pub random: bool,
    /// (node, destination or `None` for endpoint-independent) -> port.
    map: HashMap<(usize, Option<SocketAddr>), u16>,
    /// Conntrack: (public port, remote) pairs replies may come back on.
    open: HashSet<(u16, SocketAddr)>,
    owner: HashMap<u16, usize>,
    next_port: u16,
}

impl NatBox {
    pub fn new(public_ip: IpAddr, random: bool) -> NatBox {
        NatBox {
            public_ip,
            random,
            map: HashMap::new(),
            open: HashSet::new(),
            owner: HashMap::new(),
            next_port: 40000,
        }
    }

    /// The public address node `i`'s datagram to `to` leaves from (the
    /// mapping is made, and the reply path opened, as it is sent).
    fn out(&mut self, i: usize, to: SocketAddr) -> SocketAddr {
        let key = (i, self.random.then_some(to));
        let port = match self.map.get(&key) {
            Some(p) => *p,
            None => {
                let p = self.next_port;
                self.next_port += 1;
                self.map.insert(key, p);
                self.owner.insert(p, i);
                p
            }
        };
        self.open.insert((port, to));
        SocketAddr::new(self.public_ip, port)
    }

    /// What a STUN server at `server` would tell node `i`: its mapping
    /// towards the server.
    pub fn reflexive(&mut self, i: usize, server: SocketAddr) -> SocketAddr {
        self.out(i, server)
    }

    /// The mappings expire (or the NAT reboots): every conntrack entry goes.
    pub fn expire(&mut self) {
        self.map.clear();
        self.open.clear();
        self.owner.clear();
    }
}

#[derive(Debug, Default, Clone)]
pub struct SimStats {
    pub udp_sent: u64,
    pub udp_lost: u64,
    /// UDP datagrams sent to an address no node has, or across a cut path.
    pub udp_unreachable: u64,
    pub relayed: u64,
    /// UDP datagrams a NAT dropped (no conntrack entry for them).
    pub nat_filtered: u64,
    /// UDP datagrams the network delivered twice.
    pub udp_duplicated: u64,
}

pub struct Sim {
    pub nodes: Vec<Node>,
    pub net: Net,
    pub stats: SimStats,
    /// Unordered pairs of nodes whose UDP path is cut (the relay still works).
    pub udp_cut: HashSet<(usize, usize)>,
    /// Nodes whose relay session is dead without knowing it (a websocket
    /// from an address the node no longer has): what they send through
    /// the relay, and what is relayed to them, is lost.
    pub relay_dead: HashSet<usize>,
    /// Every datagram that crossed the network: (to node, from, bytes).
    pub captured: Vec<(usize, Endpoint, Vec<u8>)>,
    /// NAT routers, and which one each node sits behind (by index).
    pub nats: Vec<NatBox>,
    pub behind: HashMap<usize, usize>,
    /// Every UDP datagram a node sent: (node, destination).
    pub udp_log: Vec<(usize, SocketAddr)>,
    /// Every WireGuard handshake initiation a node sent over UDP, read off
    /// the wire (message type 1): (tick, node).
    pub udp_initiations: Vec<(u64, usize)>,
    /// UDP datagrams sent to an address no node has (an attacker's or a
    /// spoofed source): (to, bytes).
    pub off_net: Vec<(SocketAddr, Vec<u8>)>,
    /// Extra ticks for UDP datagrams sent to this IP (one path slower
    /// than another), on top of `net.delay_ticks`.
    pub udp_delay_to: HashMap<IpAddr, u64>,
    /// UDP datagrams sent to these IPs are lost (one path dead).
    pub udp_dead_to: HashSet<IpAddr>,
    /// Ticks every relayed datagram takes (0: next tick).
    pub relay_delay_ticks: u64,
    rng: Rng,
    tick: u64,
    start: Instant,
    queue: Vec<InFlight>,
    out: Vec<u8>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// `n` nodes, each a peer of every other, with UDP endpoints known.
    pub fn full_mesh(n: usize, seed: u64, net: Net) -> Sim {
        let mut sim = Sim::new(seed, net);
        for i in 0..n {
            sim.add_node(i);
        }
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    sim.introduce(i, j, true);
                }
            }
        }
        sim
    }

    pub fn new(seed: u64, net: Net) -> Sim {
        Sim {
            nodes: Vec::new(),
            net,
            stats: SimStats::default(),
            udp_cut: HashSet::new(),
            relay_dead: HashSet::new(),
            captured: Vec::new(),
            nats: Vec::new(),
            behind: HashMap::new(),
            udp_log: Vec::new(),
            udp_initiations: Vec::new(),
            off_net: Vec::new(),
            udp_delay_to: HashMap::new(),
            udp_dead_to: HashSet::new(),
            relay_delay_ticks: 0,
            rng: Rng::new(seed),
            tick: 0,
            start: Instant::now(),
            queue: Vec::new(),
            out: vec![0u8; output_buffer_len(65535)],
        }
    }

    pub fn add_node(&mut self, i: usize) {
        let key = PrivateKey::generate();
        let device = Device::new(Some(key.clone()), 1420, Arc::new(BufferBudget::default()));
        self.nodes.push(Node {
            device,
            public: key.public_key(),
            key,
            addr: SocketAddr::from(([192, 0, 2, 1 + i as u8], 51820)),
            ip: IpAddr::from([10, 0, 0, 1 + i as u8]),
            received: Vec::new(),
        });
    }

    /// Node `i` restarts on `addr` (a new UDP port, say): a new device with
    /// the same key and no peers, no session; datagrams in flight to it
    /// are lost with the old socket.
    pub fn restart(&mut self, i: usize, addr: SocketAddr) {
        let key = self.nodes[i].key.clone();
        self.nodes[i].device = Device::new(Some(key), 1420, Arc::new(BufferBudget::default()));
        self.nodes[i].addr = addr;
        self.queue.retain(|f| f.to != i);
    }

    /// Makes `j` a peer of `i` (with `j`'s UDP endpoint when `endpoint`).
    pub fn introduce(&mut self, i: usize, j: usize, endpoint: bool) {
        let mut cfg = PeerConfig::new(self.nodes[j].public());
        cfg.endpoint = endpoint.then_some(self.nodes[j].addr);
        cfg.allowed_ips = vec![format!("{}/32", self.nodes[j].ip).parse().unwrap()];
        let update = meshvpn_engine::PeerUpdate {
            preshared_key: Some(None),
            endpoint: cfg.endpoint,
            persistent_keepalive: Some(None),
            replace_allowed_ips: true,
            allowed_ips: cfg.allowed_ips,
        };
        self.nodes[i]
            .device
            .update_peer(&cfg.public_key, &update, true)
            .unwrap();
    }

    /// The simulated time now.
    pub fn now(&self) -> Instant {
        self.start + TICK * self.tick as u32
    }

    /// `i`'s peer entry for node `j`.
    pub fn peer(&self, i: usize, j: usize) -> Arc<Peer> {
        self.nodes[i]
            .device
            .peer(&self.nodes[j].public())
            .expect("a peer")
    }

    pub fn endpoint(&self, i: usize, j: usize) -> Option<Endpoint> {
        self.peer(i, j).endpoint()
    }

    /// An IPv4 packet from node `i` to node `j`, `seed` in its payload.
    pub fn packet(&self, i: usize, j: usize, seed: u8) -> Vec<u8> {
        super::udp_packet(self.nodes[i].ip, self.nodes[j].ip, 32, seed)
    }

    /// Node `i` sends an inner packet to node `j` (through its device).
    pub fn send(&mut self, i: usize, j: usize, seed: u8) {
        let packet = self.packet(i, j, seed);
        self.send_packet(i, &packet);
    }

    pub fn send_packet(&mut self, i: usize, packet: &[u8]) {
        let mut io = Outbox::default();
        let now = self.now();
        let _ = self.nodes[i]
            .device
            .send(now, packet, &mut self.out, &mut io);
        self.post(i, io);
    }

    /// Node `i` starts a handshake with node `j`.
    pub fn handshake(&mut self, i: usize, j: usize) {
        let mut io = Outbox::default();
        let now = self.now();
        let key = self.nodes[j].public();
        self.nodes[i]
            .device
            .initiate_handshake(now, &key, &mut self.out, &mut io)
            .unwrap();
        self.post(i, io);
    }

    /// Runs node `i`'s timers.
    pub fn timers(&mut self, i: usize) {
        let mut io = Outbox::default();
        let now = self.now();
        self.nodes[i]
            .device
            .poll_timers(now, &mut self.out, &mut io);
        self.post(i, io);
    }

    /// Runs `f` with node `i`'s device, its output buffer and an outbox,
    /// then puts what it sent on the network.
    pub fn with_device(
        &mut self,
        i: usize,
        f: impl FnOnce(&Device, Instant, &mut [u8], &mut dyn DeviceIo),
    ) {
        let mut io = Outbox::default();
        let now = self.now();
        f(&self.nodes[i].device, now, &mut self.out, &mut io);
        self.post(i, io);
    }

    /// Puts what node `i` sent on the network.
    fn post(&mut self, i: usize, io: Outbox) {
        for (bytes, to) in io.0 {
            match to {
                Endpoint::Udp(addr) => self.send_udp(i, addr, bytes),
                Endpoint::Relay(key) => {
                    let Some(j) = self.nodes.iter().position(|n| n.public() == key) else {
                        continue;
                    };
                    if self.relay_dead.contains(&i) || self.relay_dead.contains(&j) {
                        continue;
                    }
                    self.stats.relayed += 1;
                    let from = Endpoint::Relay(self.nodes[i].public());
                    // The relay keeps order: it arrives after anything it
                    // relayed before.
                    let at = self
                        .queue
                        .iter()
                        .filter(|f| matches!(f.from, Endpoint::Relay(_)))
                        .map(|f| f.at)
                        .max()
                        .unwrap_or(0)
                        .max(self.tick + 1 + self.relay_delay_ticks);
                    self.queue.push(InFlight {
                        at,
                        to: j,
                        from,
                        bytes,
                    });
                }
            }
        }
    }

    /// Sends a UDP datagram from node `i`'s current address.
    fn send_udp(&mut self, i: usize, addr: SocketAddr, bytes: Vec<u8>) {
        self.udp_log.push((i, addr));
        if bytes.len() == 148 && bytes[..4] == [1, 0, 0, 0] {
            self.udp_initiations.push((self.tick, i));
        }
        let mut from = self.nodes[i].addr;
        if let Some(&n) = self.behind.get(&i) {
            // To a node behind the same NAT: straight over their LAN.
            let local = self
                .nodes
                .iter()
                .position(|x| x.addr == addr)
                .is_some_and(|j| self.behind.get(&j) == Some(&n));
            if !local {
                from = self.nats[n].out(i, addr);
            }
        }
        self.inject_udp(from, addr, bytes, Some(i));
    }

    /// Puts node `i` behind NAT `nat` (its `addr` becomes a private LAN
    /// address nobody outside reaches).
    pub fn put_behind(&mut self, i: usize, nat: usize, private: SocketAddr) {
        self.nodes[i].addr = private;
        self.behind.insert(i, nat);
    }

    /// The node a datagram from `from` to `to` reaches, if any: a node at
    /// that address (behind a NAT: only from its own LAN), or through a
    /// NAT's public address when conntrack has the reply path.
    fn destination(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        sender: Option<usize>,
    ) -> Option<usize> {
        if let Some(j) = self.nodes.iter().position(|n| n.addr == to) {
            return match self.behind.get(&j) {
                None => Some(j),
                Some(n) => (sender.and_then(|i| self.behind.get(&i)) == Some(n)).then_some(j),
            };
        }
        let nat = self.nats.iter().position(|n| n.public_ip == to.ip())?;
        let nat = &self.nats[nat];
        if !nat.open.contains(&(to.port(), from)) {
            self.stats.nat_filtered += 1;
            return None;
        }
        nat.owner.get(&to.port()).copied()
    }

    /// Puts a UDP datagram on the network from any source address (an
    /// attacker's, say); `sender` is the node it comes from, if any.
    pub fn inject_udp(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
        sender: Option<usize>,
    ) {
        self.stats.udp_sent += 1;
        if self.udp_dead_to.contains(&to.ip()) {
            self.stats.udp_unreachable += 1;
            return;
        }
        let Some(j) = self.destination(from, to, sender) else {
            self.stats.udp_unreachable += 1;
            self.off_net.push((to, bytes));
            return;
        };
        if sender.is_some_and(|i| self.udp_cut.contains(&pair(i, j))) {
            self.stats.udp_unreachable += 1;
            return;
        }
        if self.rng.chance(self.net.loss) {
            self.stats.udp_lost += 1;
            return;
        }
        // No draw when off: seeded runs without duplication stay as they were.
        let copies = if self.net.duplicate > 0 && self.rng.chance(self.net.duplicate) {
            self.stats.udp_duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = self.tick
                + 1
                + self.net.delay_ticks
                + self.udp_delay_to.get(&to.ip()).copied().unwrap_or(0);
            if self.rng.chance(self.net.reorder) {
                at += 1 + self.rng.below(self.net.reorder_ticks.max(1));
            }
            self.queue.push(InFlight {
                at,
                to: j,
                from: Endpoint::Udp(from),
                bytes: bytes.clone(),
            });
        }
    }

    /// Hands node `j` a datagram from `from` now, as its runtime would.
    pub fn deliver(&mut self, j: usize, from: Endpoint, bytes: &[u8]) {
        self.captured.push((j, from, bytes.to_vec()));
        let now = self.now();
        let mut io = Outbox::default();
        let node = &mut self.nodes[j];
        let flush = match node
            .device
            .handle_datagram(now, from, bytes, &mut self.out, &mut io)
        {
            Received::Nothing => None,
            Received::Packet { peer, len, flush } => {
                peer.delivered(len);
                node.received.push(self.out[..len].to_vec());
                flush.then_some(peer)
            }
            Received::Flush(peer) => Some(peer),
        };
        if let Some(peer) = flush {
            node.device.flush_queued(now, &peer, &mut self.out, &mut io);
        }
        self.post(j, io);
    }

    /// One tick: the clock moves on and everything due arrives.
    pub fn step(&mut self) {
        self.tick += 1;
        let now = self.tick;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|f| f.at <= now);
        self.queue = later;
        for f in due {
            self.deliver(f.to, f.from, &f.bytes);
        }
    }

    /// Steps until nothing is in flight (at most `max_ticks`).
    pub fn settle(&mut self, max_ticks: u64) {
        for _ in 0..max_ticks {
            if self.queue.is_empty() {
                return;
            }
            self.step();
        }
    }

    /// Moves the clock on by `d` without delivering anything early.
    pub fn advance(&mut self, d: Duration) {
        let ticks = (d.as_millis() / TICK.as_millis()) as u64;
        for _ in 0..ticks {
            self.step();
        }
    }

    /// Ticks since the start (milliseconds of simulated time).
    pub fn ticks(&self) -> u64 {
        self.tick
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// True once node `i` has a session with node `j`.
    pub fn has_session(&self, i: usize, j: usize) -> bool {
        self.peer(i, j).stats().last_handshake.is_some()
    }

    /// Node `i` handshakes with node `j` until both have a session; each
    /// retry forces a new initiation (boringtun's own retry waits for the
    /// real clock). False if `attempts` were not enough.
    pub fn establish(&mut self, i: usize, j: usize, attempts: usize) -> bool {
        for n in 0..attempts {
            if n == 0 {
                self.handshake(i, j);
            } else {
                let peer = self.peer(i, j);
                let to = peer.endpoint().expect("an endpoint");
                self.with_device(i, |d, now, out, io| d.switch_path(now, &peer, to, out, io));
            }
            self.settle(1000);
            if self.has_session(i, j) && self.has_session(j, i) {
                return true;
            }
            // Past the peer's initiation flood window before the next try.
            self.advance(Duration::from_millis(25));
        }
        false
    }
}
