//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

pub mod initiator;
pub mod link;
pub mod lossy_relay;
pub mod sim;
pub mod stacks;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvpn_engine::{Config, Engine, InterfaceConfig, PeerConfig, PrivateKey};

/// An IPv4 or IPv6 UDP packet from `src` to `dst` with `payload_len` bytes
/// of a recognisable pattern. Checksums are left zero: the engine routes on
/// headers and never looks at the transport layer.
pub fn udp_packet(src: IpAddr, dst: IpAddr, payload_len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let udp_len = 8 + payload_len;
    let mut p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + udp_len;
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            h[8] = 64;
            h[9] = 17;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            h[6] = 17;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h
        }
        _ => panic!("mixed address families"),
    };
    p.extend_from_slice(&1234u16.to_be_bytes());
    p.extend_from_slice(&5678u16.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&payload);
    p
}

pub struct Node {
    pub key: PrivateKey,
    pub engine: Arc<Engine>,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

/// `n` engines on loopback, each a peer of every other, node `i` owning
/// 10.77.0.(i+1)/32 and fd77::(i+1)/128. `underlay_v6` picks `[::1]`
/// endpoints instead of 127.0.0.1.
pub fn mesh(n: usize, underlay_v6: bool) -> Vec<Node> {
    mesh_with_mtu(n, underlay_v6, None)
}

/// [`mesh`] with every interface's MTU set (`None`: the default).
pub fn mesh_with_mtu(n: usize, underlay_v6: bool, mtu: Option<u16>) -> Vec<Node> {
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let nodes: Vec<Node> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let cfg = Config {
                interface: InterfaceConfig {
                    private_key: Some(k.clone()),
                    listen_port: Some(0),
                    mtu,
                    ..Default::default()
                },
                peers: vec![],
            };
            Node {
                key: k.clone(),
                engine: Arc::new(Engine::new(&cfg).expect("engine starts")),
                v4: format!("10.77.0.{}", i + 1).parse().unwrap(),
                v6: format!("fd77::{}", i + 1).parse().unwrap(),
            }
        })
        .collect();
    for a in &nodes {
        for b in &nodes {
            if std::ptr::eq(a, b) {
                continue;
            }
            let host: IpAddr = if underlay_v6 {
                "::1".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            };
            let mut p = PeerConfig::new(b.key.public_key());
            p.endpoint = Some(SocketAddr::new(host, b.engine.listen_port()));
            p.allowed_ips = vec![
                meshvpn_engine::IpPrefix::host(b.v4),
                meshvpn_engine::IpPrefix::host(b.v6),
            ];
            a.engine.add_peer(&p).unwrap();
        }
    }
    nodes
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Sends `packet` from `from` and returns what `to` receives within 5 s.
pub fn send_and_receive(from: &Engine, to: &Engine, packet: &[u8]) -> Option<Vec<u8>> {
    from.send_packet(packet).ok()?;
    to.recv_packet(Duration::from_secs(5)).map(|p| p.to_vec())
}

/// Fields of a fresh initiation: a new ephemeral key, the current TAI64N
/// time plus `extra_nanos` (so successive initiations are newer).
pub fn fields(index: u32, extra_nanos: u64) -> initiator::InitiationFields {
    initiator::InitiationFields {
        sender_index: index,
        ephemeral_private: *PrivateKey::generate().as_bytes(),
        timestamp: initiator::tai64n_now(extra_nanos),
    }
}

/// Loopback addresses 127.0.1.1 .. 127.0.1.n, one socket each: the
/// "spoofed" sources of a flood (on Linux all of 127/8 is local).
pub fn spoofed_sockets(n: u8) -> Vec<std::net::UdpSocket> {
    (1..=n)
        .map(|i| {
            let s =
                std::net::UdpSocket::bind(("127.0.1.".to_string() + &i.to_string(), 0)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect()
}

/// This process's resident memory, KiB.
pub fn resident_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// This process's peak resident memory, KiB.
pub fn peak_resident_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
