//! Hostile cases against a `meshvpn` engine process: forged handshake
//! initiations for a configured peer, and oversized inner packets from an
//! authenticated peer.
//!
//! The process is `meshvpn forward` (the engine with its userspace stack,
//! no TUN): it needs no root, so the cases run on a developer machine as in
//! CI, and its receive path crosses two of the engine's three sinks (the
//! stack for its own address, the packet API's host queue for the rest,
//! which `forward` never reads: the worst case for the queue's budget). The
//! TUN sink is covered by `two_engines::oversized_inner_packets_to_a_tun_device_are_dropped`.
//!
//! The legitimate peer is an in-process engine with its own userspace
//! stack; "gets through" means TCP echoes both ways across the mesh: the
//! peer dialing the forwarder (`--remote`, the peer initiates the
//! handshake) and a local client of the forwarder dialing the peer
//! (`--local`, the forwarder initiates, its first packets wait behind the
//! handshake and are charged to the buffer budget).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvpn_engine::{
    Config, Engine, InterfaceConfig, IpPrefix, Netstack, NetstackConfig, PeerConfig, PrivateKey,
};

use crate::common::{Ceilings, Daemon, Sampler, TempDir};

#[path = "../../../engine/tests/common/initiator.rs"]
mod initiator;

const FWD_ADDR: &str = "10.88.0.1";
const LEGIT_ADDR: &str = "10.88.0.2";
const ATTACKER_ADDR: &str = "10.88.0.3";
/// The mesh port both sides' echo services listen on.
const ECHO: u16 = 7;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// Echoes every TCP connection on `listener` on its own thread, until the
/// test process ends (each connection ends when its client closes).
fn spawn_echo_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 4096];
                let mut c = c;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Writes `msg` to a stream and reads it back within `deadline`.
fn echo_round_trip(mut s: impl Read + Write, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != msg {
        return Err("echo came back changed".into());
    }
    Ok(())
}

/// The in-process legitimate peer: an engine with a userspace stack on
/// [`LEGIT_ADDR`] that echoes TCP on port [`ECHO`].
struct LegitPeer {
    key: PrivateKey,
    engine: Arc<Engine>,
    stack: Arc<Netstack>,
}

impl LegitPeer {
    fn start() -> LegitPeer {
        let key = PrivateKey::generate();
        let engine = Arc::new(
            Engine::new(&Config {
                interface: InterfaceConfig {
                    private_key: Some(key.clone()),
                    listen_port: Some(0),
                    addresses: vec![IpPrefix::host(ip(LEGIT_ADDR))],
                    ..Default::default()
                },
                peers: vec![],
            })
            .expect("legitimate engine"),
        );
        let stack = Arc::new(Netstack::attach(&engine, NetstackConfig::default()).expect("stack"));
        let listener = stack
            .tcp_listen(SocketAddr::new(ip(LEGIT_ADDR), ECHO), 16)
            .expect("listen on the mesh");
        std::thread::spawn(move || {
            while let Ok((c, _)) = listener.accept_timeout(None) {
                std::thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = (&c).read(&mut buf) {
                        if n == 0 || (&c).write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LegitPeer { key, engine, stack }
    }
}

/// A running `meshvpn forward` whose engine has the legitimate peer and
/// the attacker as peers.
struct Forwarder {
    daemon: Daemon,
    key: PrivateKey,
    udp: SocketAddr,
    /// Its `--local` port: dials the legitimate peer's echo service.
    local: SocketAddr,
    _dir: TempDir,
}

impl Forwarder {
    fn start(legit: &LegitPeer, attacker: &PrivateKey) -> Forwarder {
        let dir = TempDir::new("engine");
        let echo = TcpListener::bind("127.0.0.1:0").expect("echo listener");
        let echo_at = echo.local_addr().expect("echo addr");
        spawn_echo_server(echo);
        let key = PrivateKey::generate();
        for _ in 0..5 {
            let port = free_udp_port();
            let local: SocketAddr = format!("127.0.0.1:{}", crate::common::free_port())
                .parse()
                .expect("addr");
            let conf = format!(
                "[Interface]\nPrivateKey = {}\nListenPort = {port}\nAddress = {FWD_ADDR}/32\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = {LEGIT_ADDR}/32\nEndpoint = 127.0.0.1:{}\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = {ATTACKER_ADDR}/32\n",
                key.to_base64(),
                legit.key.public_key().to_base64(),
                legit.engine.listen_port(),
                attacker.public_key().to_base64(),
            );
            let conf_file = dir.file("fwd.conf", conf);
            let args: Vec<String> = vec![
                "forward".into(),
                "-c".into(),
                conf_file.display().to_string(),
                "--local".into(),
                format!("{local}={LEGIT_ADDR}:{ECHO}"),
                "--remote".into(),
                format!("{FWD_ADDR}:{ECHO}={echo_at}"),
            ];
            let mut daemon = Daemon::spawn(&args, dir.path().join("forward.log"));
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) && daemon.alive() {
                if daemon.log_text().contains("forward: running") {
                    return Forwarder {
                        daemon,
                        key,
                        udp: format!("127.0.0.1:{port}").parse().expect("addr"),
                        local,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("meshvpn forward did not come up: {}", daemon.log_text());
        }
        panic!("meshvpn forward did not start");
    }

    /// A peer entry for this forwarder, in an in-process engine's config.
    fn as_peer(&self) -> PeerConfig {
        let mut p = PeerConfig::new(self.key.public_key());
        p.endpoint = Some(self.udp);
        p.allowed_ips = vec![IpPrefix::host(ip(FWD_ADDR))];
        p
    }
}

/// The legitimate peer's traffic both ways, each a fresh connection:
/// the peer dials the forwarder's `--remote` echo, and a local client
/// dials the peer through the forwarder's `--local`. Ok(time taken).
/// `peer_first` picks which side makes first contact (and so initiates
/// the handshake when there is no session yet).
fn legit_traffic_gets_through(
    fwd: &Forwarder,
    legit: &LegitPeer,
    peer_first: bool,
    within: Duration,
) -> Result<Duration, String> {
    let t = Instant::now();
    let msg = format!("legitimate {:?}", t).into_bytes();
    let left = || {
        within
            .saturating_sub(t.elapsed())
            .max(Duration::from_millis(100))
    };
    let peer_dials = || -> Result<(), String> {
        let c = legit
            .stack
            .tcp_connect(SocketAddr::new(ip(FWD_ADDR), ECHO), Some(left()))
            .map_err(|e| format!("peer -> forwarder: dial: {e}"))?;
        c.set_read_timeout(Some(left()));
        echo_round_trip(&c, &msg).map_err(|e| format!("peer -> forwarder: {e}"))?;
        c.close();
        Ok(())
    };
    let forwarder_dials = || -> Result<(), String> {
        let s = TcpStream::connect_timeout(&fwd.local, left())
            .map_err(|e| format!("forwarder -> peer: local connect: {e}"))?;
        let _ = s.set_read_timeout(Some(left()));
        echo_round_trip(&s, &msg).map_err(|e| format!("forwarder -> peer: {e}"))
    };
    if peer_first {
        peer_dials()?;
        forwarder_dials()?;
    } else {
        forwarder_dials()?;
        peer_dials()?;
    }
    Ok(t.elapsed())
}

/// Forged initiations claiming the legitimate peer's key (valid MAC1, the
/// peer's public key as the encrypted static; made with the forger's own
/// key, so they never decrypt) to the forwarder's UDP port from
/// 127.0.0.2-5 every 20 ms, while the legitimate peer handshakes again and
/// again and sends traffic: every one of its initiations is answered.
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn engine_forged_initiations_for_a_configured_peer() {
    let legit = LegitPeer::start();
    let fwd = Forwarder::start(&legit, &PrivateKey::generate());
    legit.engine.add_peer(&fwd.as_peer()).expect("peer");
    let fwd_pub = *fwd.key.public_key().as_bytes();
    let claimed = *legit.key.public_key().as_bytes();
    let forged: Vec<[u8; initiator::INITIATION_LEN]> = (0..64u32)
        .map(|i| {
            let mut forger =
                initiator::Initiator::new(*PrivateKey::generate().as_bytes(), fwd_pub, None);
            let f = initiator::InitiationFields {
                sender_index: i,
                ephemeral_private: *PrivateKey::generate().as_bytes(),
                timestamp: initiator::tai64n_now(i as u64),
            };
            forger.initiation_claiming(&f, &claimed)
        })
        .collect();
    let sources: Vec<UdpSocket> = (2..=5)
        .map(|i| UdpSocket::bind(format!("127.0.0.{i}:0")).expect("forger socket"))
        .collect();
    let before = fwd.daemon.usage();
    let sampler = Sampler::start(fwd.daemon.pid());
    let stop = AtomicBool::new(false);
    let peer_stats = || {
        legit
            .engine
            .peer_stats(&fwd.key.public_key())
            .expect("stats")
    };
    let (forgeries, during, handshakes) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let end = Instant::now() + Duration::from_secs(15);
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end && sent < 1000 {
                let sock = &sources[sent % sources.len()];
                let _ = sock.send_to(&forged[sent % forged.len()], fwd.udp);
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(200));
        // The first contact (the peer initiates) is made under the flood.
        let during = legit_traffic_gets_through(&fwd, &legit, true, Duration::from_secs(4));
        // Then a handshake every 150 ms for 3 s: each must be answered
        // before the next is started (one in flight at a time).
        let start = Instant::now();
        let mut started = 0u64;
        while start.elapsed() < Duration::from_secs(3) && started < 25 {
            // Past the forwarder's 20 ms window from the peer's previous
            // (authenticated) initiation, so only a forgery could put this
            // one inside it.
            std::thread::sleep(Duration::from_millis(150));
            let done = peer_stats().handshakes_received;
            let _ = legit.engine.initiate_handshake(&fwd.key.public_key());
            started += 1;
            let t = Instant::now();
            while peer_stats().handshakes_received == done && t.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let s = peer_stats();
        (
            flood.join().expect("flood"),
            during,
            (started, s.handshakes_initiated, s.handshakes_received),
        )
    });
    let after = legit_traffic_gets_through(&fwd, &legit, true, Duration::from_secs(10));
    let peak = sampler.finish();
    let (started, initiated, answered) = handshakes;
    println!(
        "engine forged initiations: {forgeries} forged; the peer started {started} handshakes, \
         sent {initiated} initiations, {answered} answered; traffic during: {during:?}, \
         after: {after:?}"
    );
    // Baseline of an idle forwarder: 6 MiB, 7 threads, 8 fds.
    Ceilings {
        rss_mib: 32,
        threads: 16,
        fds: 32,
    }
    .check("engine_forged_initiations", before, peak);
    assert!(forgeries >= 50, "the flood was too thin to test anything");
    // Initiations include boringtun's own retries: every one answered.
    assert_eq!(
        answered, initiated,
        "the real peer's initiations went unanswered under forged ones"
    );
    during.expect("legitimate traffic during the flood");
    after.expect("legitimate traffic after the flood");
    assert!(
        started >= 10,
        "only {started} handshakes in the attack window"
    );
}

/// An authenticated peer sends inner packets of 60,028 bytes and of
/// MTU + 80 bytes, to the forwarder's stack address and to an address only
/// the (never read) host queue takes; meanwhile and afterwards the
/// forwarder dials the legitimate peer for the first time (its SYN waits
/// behind a handshake, charged to the buffer budget the oversized packets
/// used to leak).
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn engine_oversized_inner_packets_from_an_authenticated_peer() {
    let legit = LegitPeer::start();
    let attacker_key = PrivateKey::generate();
    let fwd = Forwarder::start(&legit, &attacker_key);
    legit.engine.add_peer(&fwd.as_peer()).expect("peer");
    let mut to_fwd = fwd.as_peer();
    to_fwd.allowed_ips = vec!["10.88.0.0/24".parse().expect("prefix")];
    let attacker = Engine::new(&Config {
        interface: InterfaceConfig {
            private_key: Some(attacker_key),
            listen_port: Some(0),
            ..Default::default()
        },
        peers: vec![to_fwd],
    })
    .expect("attacker engine");
    let packet = |dst: &str, len: usize, seed: usize| {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        let v4 = |a: &str| a.parse::<std::net::Ipv4Addr>().expect("v4").octets();
        p[12..16].copy_from_slice(&v4(ATTACKER_ADDR));
        p[16..20].copy_from_slice(&v4(dst));
        p[20..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i + seed) as u8);
        p
    };
    let before = fwd.daemon.usage();
    let sampler = Sampler::start(fwd.daemon.pid());
    let stop = AtomicBool::new(false);
    let (sent, during) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let end = Instant::now() + Duration::from_secs(10);
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end && sent < 4000 {
                let dst = if sent % 4 == 3 {
                    FWD_ADDR
                } else {
                    "10.88.0.99"
                };
                let len = if sent % 2 == 0 { 60_028 } else { 1420 + 80 };
                if attacker.send_packet(&packet(dst, len, sent)).is_ok() {
                    sent += 1;
                }
                // Paced (one 60 KB datagram a millisecond) so they are not
                // lost in the forwarder's socket buffer before decryption.
                if len > 1500 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        });
        // Well past the ~560 packets of 60 KB to the host queue that used
        // to fill the 32 MiB budget, before the first legitimate contact.
        let t = Instant::now();
        while attacker
            .peer_stats(&fwd.key.public_key())
            .map_or(0, |s| s.tx_packets)
            < 2000
            && t.elapsed() < Duration::from_secs(8)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let during = legit_traffic_gets_through(&fwd, &legit, false, Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        (flood.join().expect("flood"), during)
    });
    let after = legit_traffic_gets_through(&fwd, &legit, false, Duration::from_secs(10));
    let peak = sampler.finish();
    println!(
        "engine oversized inner packets: {sent} sent; traffic during: {during:?}, after: {after:?}"
    );
    // Baseline of an idle forwarder: 6 MiB, 7 threads, 8 fds; each 60 KB
    // datagram passes through 64 KiB receive buffers.
    Ceilings {
        rss_mib: 32,
        threads: 16,
        fds: 32,
    }
    .check("engine_oversized_inner_packets", before, peak);
    assert!(sent >= 2000, "the flood was too thin to test anything");
    during.expect("legitimate traffic during the flood");
    after.expect("legitimate traffic after the flood");
}
