//! An in-memory lossy link between two [`Peer`]s, in simulated time, and a
//! [`Pair`] harness that drives two peers over it without sockets.
//!
//! The link loses, duplicates, delays and reorders datagrams, and can be
//! partitioned (everything sent while partitioned is lost). All randomness
//! comes from one seed: a failing run prints its seed, and setting
//! `MESHVPN_LINK_SEED` to it replays the same run.
//!
//! Time on the link is in ticks; one [`Pair::step`] is one tick. The peers
//! get their time from the pair ([`Pair::now`]: the real clock, or a
//! simulated one after [`Pair::advance`]); boringtun's own timers still
//! read the real clock, so a test that needs handshake retries calls
//! [`Pair::handshake`] again instead of waiting for them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use meshvpn_engine::peer::{output_buffer_len, Peer, PeerOutput};
use meshvpn_engine::wire::WireMessage;
use meshvpn_engine::{PeerConfig, PrivateKey};

/// splitmix64: small, fast, and the same on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        (self.next_u64() % 1000) < per_mille as u64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// The seed to use: `MESHVPN_LINK_SEED` when set, else `default`. Printed,
/// so a failing test's output says how to replay it.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("MESHVPN_LINK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    eprintln!("link seed {s} (replay with MESHVPN_LINK_SEED={s})");
    s
}

/// What the link does to datagrams. Probabilities are per mille.
#[derive(Clone, Copy, Debug, Default)]
pub struct Impairments {
    pub loss: u32,
    pub duplicate: u32,
    /// Chance that a datagram is held back by up to `reorder_ticks` extra.
    pub reorder: u32,
    pub reorder_ticks: u64,
    /// Every datagram takes at least this many ticks (0: next tick).
    pub delay_ticks: u64,
}

impl Impairments {
    pub const CLEAN: Impairments = Impairments {
        loss: 0,
        duplicate: 0,
        reorder: 0,
        reorder_ticks: 0,
        delay_ticks: 0,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub delivered: u64,
}

struct InFlight {
    at: u64,
    seq: u64,
    to: Side,
    datagram: Vec<u8>,
}

/// Datagrams in flight between two sides, in simulated time.
pub struct Link {
    pub impairments: Impairments,
    rng: Rng,
    now: u64,
    seq: u64,
    partitioned: bool,
    in_flight: Vec<InFlight>,
    pub stats: LinkStats,
}

impl Link {
    pub fn new(seed: u64, impairments: Impairments) -> Link {
        Link {
            impairments,
            rng: Rng::new(seed),
            now: 0,
            seq: 0,
            partitioned: false,
            in_flight: Vec::new(),
            stats: LinkStats::default(),
        }
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// While partitioned, every datagram sent is lost (those already in
    /// flight still arrive).
    pub fn set_partitioned(&mut self, partitioned: bool) {
        self.partitioned = partitioned;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Puts a datagram on the wire towards `to`.
    pub fn send(&mut self, to: Side, datagram: &[u8]) {
        self.stats.sent += 1;
        let imp = self.impairments;
        if self.partitioned || self.rng.chance(imp.loss) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.chance(imp.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = 1 + imp.delay_ticks;
            if self.rng.chance(imp.reorder) {
                delay += 1 + self.rng.below(imp.reorder_ticks.max(1));
            }
            self.seq += 1;
            self.in_flight.push(InFlight {
                at: self.now + delay,
                seq: self.seq,
                to,
                datagram: datagram.to_vec(),
            });
        }
    }

    /// Advances one tick; returns what arrives now, in arrival order.
    pub fn tick(&mut self) -> Vec<(Side, Vec<u8>)> {
        self.now += 1;
        let now = self.now;
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|f| f.at <= now);
        self.in_flight = rest;
        due.sort_by_key(|f| (f.at, f.seq));
        self.stats.delivered += due.len() as u64;
        due.into_iter().map(|f| (f.to, f.datagram)).collect()
    }
}

/// Two peers that know each other, over a [`Link`].
pub struct Pair {
    pub a: Peer,
    pub b: Peer,
    pub key_a: PrivateKey,
    pub key_b: PrivateKey,
    pub addr_a: SocketAddr,
    pub addr_b: SocketAddr,
    pub link: Link,
    /// Decrypted packets each side received, in order.
    pub received_a: Vec<Vec<u8>>,
    pub received_b: Vec<Vec<u8>>,
    out: Vec<u8>,
    clock: Option<Instant>,
}

/// A limiter that never demands cookies (the engine's own is tested
/// through the engine).
pub fn relaxed_limiter(key: &PrivateKey) -> Arc<RateLimiter> {
    let public = boringtun::x25519::PublicKey::from(*key.public_key().as_bytes());
    Arc::new(RateLimiter::new(&public, u64::MAX / 2))
}

impl Pair {
    pub fn new(seed: u64, impairments: Impairments) -> Pair {
        Pair::with_keys(
            PrivateKey::generate(),
            PrivateKey::generate(),
            seed,
            impairments,
        )
    }

    pub fn with_keys(
        key_a: PrivateKey,
        key_b: PrivateKey,
        seed: u64,
        impairments: Impairments,
    ) -> Pair {
        let addr_a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let addr_b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut cfg_b = PeerConfig::new(key_b.public_key());
        cfg_b.endpoint = Some(addr_b);
        let mut cfg_a = PeerConfig::new(key_a.public_key());
        cfg_a.endpoint = Some(addr_a);
        let a = Peer::new(&key_a, &cfg_b, 0x0a, relaxed_limiter(&key_a));
        let b = Peer::new(&key_b, &cfg_a, 0x0b, relaxed_limiter(&key_b));
        Pair {
            a,
            b,
            key_a,
            key_b,
            addr_a,
            addr_b,
            link: Link::new(seed, impairments),
            received_a: Vec::new(),
            received_b: Vec::new(),
            out: vec![0u8; output_buffer_len(65535)],
            clock: None,
        }
    }

    /// The time the peers are given: simulated once [`Pair::advance`] ran,
    /// the real clock before.
    pub fn now(&self) -> Instant {
        self.clock.unwrap_or_else(Instant::now)
    }

    /// Moves the peers' clock on by `d` (and makes it simulated from now).
    pub fn advance(&mut self, d: Duration) {
        self.clock = Some(self.now() + d);
    }

    pub fn peer(&self, side: Side) -> &Peer {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn parts(&mut self, side: Side) -> (&Peer, &mut Vec<u8>) {
        match side {
            Side::A => (&self.a, &mut self.out),
            Side::B => (&self.b, &mut self.out),
        }
    }

    fn addr(&self, side: Side) -> SocketAddr {
        match side {
            Side::A => self.addr_a,
            Side::B => self.addr_b,
        }
    }

    /// Encrypts `packet` on `from` and puts the result on the link.
    pub fn send(&mut self, from: Side, packet: &[u8]) -> PeerOutput {
        let now = self.now();
        let (peer, out) = self.parts(from);
        let r = peer.encapsulate(now, packet, out);
        self.forward(from, r);
        r
    }

    /// Starts a handshake from `from` (no-op while one is in flight).
    pub fn handshake(&mut self, from: Side) -> PeerOutput {
        let now = self.now();
        let (peer, out) = self.parts(from);
        let r = peer.initiate_handshake(now, out);
        self.forward(from, r);
        r
    }

    /// Runs `side`'s timers as of `now`, putting what they send on the link.
    pub fn timers(&mut self, side: Side, now: std::time::Instant) -> PeerOutput {
        let (peer, out) = self.parts(side);
        let r = peer.update_timers(now, out);
        self.forward(side, r);
        r
    }

    fn forward(&mut self, from: Side, r: PeerOutput) {
        if let PeerOutput::ToNetwork { len, .. } = r {
            self.link.send(from.other(), &self.out[..len]);
        }
    }

    /// Hands one datagram to `to` as if it came from the other side's
    /// address; returns what the peer said.
    pub fn deliver(&mut self, to: Side, datagram: &[u8]) -> PeerOutput {
        let src = self.addr(to.other());
        self.deliver_from(to, src, datagram)
    }

    /// Like [`Pair::deliver`] from an arbitrary source address.
    pub fn deliver_from(&mut self, to: Side, src: SocketAddr, datagram: &[u8]) -> PeerOutput {
        let Ok(msg) = WireMessage::new_checked(datagram) else {
            return PeerOutput::Done;
        };
        let now = self.now();
        let (peer, out) = self.parts(to);
        let r = peer.decapsulate(now, src.into(), msg.kind, datagram, out);
        match r {
            PeerOutput::ToNetwork { .. } => self.forward(to, r),
            PeerOutput::ToHost { len, .. } => {
                let p = self.out[..len].to_vec();
                self.peer(to).delivered(len);
                match to {
                    Side::A => self.received_a.push(p),
                    Side::B => self.received_b.push(p),
                }
            }
            _ => {}
        }
        if self.peer(to).should_flush(msg.kind, r) {
            loop {
                let (peer, out) = self.parts(to);
                match peer.flush_queued(now, out) {
                    r @ PeerOutput::ToNetwork { .. } => self.forward(to, r),
                    _ => break,
                }
            }
        }
        r
    }

    /// One tick: everything due on the link is delivered.
    pub fn step(&mut self) {
        for (to, d) in self.link.tick() {
            self.deliver(to, &d);
        }
    }

    /// Steps until nothing is in flight (at most `max_ticks`).
    pub fn settle(&mut self, max_ticks: u64) {
        for _ in 0..max_ticks {
            if self.link.in_flight() == 0 {
                return;
            }
            self.step();
        }
    }

    /// Handshakes over the link as it is now; true once both sides have a
    /// session (A can send data that B decrypts).
    pub fn establish(&mut self, max_ticks: u64) -> bool {
        self.handshake(Side::A);
        self.settle(max_ticks);
        self.a.stats().last_handshake.is_some() && self.b.stats().last_handshake.is_some()
    }
}
