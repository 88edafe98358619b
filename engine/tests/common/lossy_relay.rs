//! A bad link between two engines: a UDP relay on loopback that drops,
//! duplicates and reorders the encrypted datagrams it forwards, driven by a
//! seeded generator so a failure can be replayed.
//!
//! ```text
//!   engine A --> [toward_b] --drop/dup/reorder--> [toward_a] --> engine B
//!   engine A <-- [toward_b] <--drop/dup/reorder-- [toward_a] <-- engine B
//! ```
//!
//! A uses `toward_b` as B's endpoint and B uses `toward_a` as A's, so each
//! engine sees its peer always at the address it sends to (no roaming).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use meshvpn_engine::{Engine, PeerUpdate, PublicKey};

/// How the link misbehaves, per datagram.
#[derive(Debug, Clone, Copy)]
pub struct LinkProfile {
    pub drop: f64,
    pub duplicate: f64,
    /// Chance that a datagram is held back and sent after the next one.
    pub reorder: f64,
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
}

pub struct LossyRelay {
    /// Where A must send to reach B.
    pub toward_b: SocketAddr,
    /// Where B must send to reach A.
    pub toward_a: SocketAddr,
    pub stats: Arc<RelayStats>,
    /// While set, every datagram is dropped (a blackholed UDP path).
    blocked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// SplitMix64: small, seedable, good enough to pick packets.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Longest time a held-back datagram waits for a successor.
const HOLD: Duration = Duration::from_millis(2);

fn forward(
    from: UdpSocket,
    out: UdpSocket,
    to: SocketAddr,
    profile: LinkProfile,
    stats: Arc<RelayStats>,
    blocked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng(profile.seed);
    let mut buf = vec![0u8; 65535];
    let mut held: Option<Vec<u8>> = None;
    from.set_read_timeout(Some(HOLD)).unwrap();
    while !stop.load(Relaxed) {
        let n = match from.recv(&mut buf) {
            Ok(n) => n,
            Err(_) => {
                if let Some(h) = held.take() {
                    let _ = out.send_to(&h, to);
                }
                continue;
            }
        };
        let d = &buf[..n];
        if blocked.load(Relaxed) || rng.next_f64() < profile.drop {
            stats.dropped.fetch_add(1, Relaxed);
            continue;
        }
        if held.is_none() && rng.next_f64() < profile.reorder {
            stats.reordered.fetch_add(1, Relaxed);
            held = Some(d.to_vec());
            continue;
        }
        let _ = out.send_to(d, to);
        stats.forwarded.fetch_add(1, Relaxed);
        if rng.next_f64() < profile.duplicate {
            stats.duplicated.fetch_add(1, Relaxed);
            let _ = out.send_to(d, to);
        }
        if let Some(h) = held.take() {
            let _ = out.send_to(&h, to);
        }
    }
}

impl LossyRelay {
    /// Relays between the engines listening at `a` and `b` (loopback).
    pub fn start(a: SocketAddr, b: SocketAddr, profile: LinkProfile) -> LossyRelay {
        LossyRelay::start_on([127, 0, 0, 1].into(), a, b, profile)
    }

    /// [`LossyRelay::start`] with its two sockets bound on `ip` (a local
    /// address: what is sent there never leaves the host).
    pub fn start_on(
        ip: std::net::IpAddr,
        a: SocketAddr,
        b: SocketAddr,
        profile: LinkProfile,
    ) -> LossyRelay {
        let toward_b = UdpSocket::bind((ip, 0)).unwrap();
        let toward_a = UdpSocket::bind((ip, 0)).unwrap();
        let stats = Arc::new(RelayStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let blocked = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let spawn = |from: &UdpSocket, out: &UdpSocket, to, seed| {
            let (from, out) = (from.try_clone().unwrap(), out.try_clone().unwrap());
            let (stats, blocked, stop) = (stats.clone(), blocked.clone(), stop.clone());
            let profile = LinkProfile { seed, ..profile };
            std::thread::spawn(move || forward(from, out, to, profile, stats, blocked, stop))
        };
        threads.push(spawn(&toward_b, &toward_a, b, profile.seed));
        threads.push(spawn(&toward_a, &toward_b, a, profile.seed ^ 0x5555));
        LossyRelay {
            toward_b: toward_b.local_addr().unwrap(),
            toward_a: toward_a.local_addr().unwrap(),
            stats,
            blocked,
            stop,
            threads,
        }
    }

    /// Blackholes the link (`true`) or restores it.
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Relaxed);
    }

    /// Puts a relay between two engines that are peers of each other.
    pub fn between(
        a: &Engine,
        a_key: PublicKey,
        b: &Engine,
        b_key: PublicKey,
        profile: LinkProfile,
    ) -> LossyRelay {
        let lo = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let relay = LossyRelay::start(lo(a.listen_port()), lo(b.listen_port()), profile);
        let set = |e: &Engine, peer: &PublicKey, endpoint| {
            let u = PeerUpdate {
                endpoint: Some(endpoint),
                ..Default::default()
            };
            e.update_peer(peer, &u, false).unwrap();
        };
        set(a, &b_key, relay.toward_b);
        set(b, &a_key, relay.toward_a);
        relay
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
