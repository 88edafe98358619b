//! NAT traversal in the running engine over loopback: STUN from the
//! WireGuard socket itself (answers demultiplexed from WireGuard traffic,
//! spoofed ones ignored), and candidate messages through the relay path
//! (taken from the relay's key, bounded, malformed ones counted).

mod common;

use std::any::Any;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use common::{mesh, send_and_receive, udp_packet, wait_until};
use meshvpn_engine::peer::Endpoint;
use meshvpn_engine::relay::protocol::Candidates;
use meshvpn_engine::wg::stun::StunServer;
use meshvpn_engine::wg::{RelayTransport, Transport, Unsent};
use meshvpn_engine::wire::stun::encode_binding_success;
use meshvpn_engine::{PrivateKey, PublicKey};
use parking_lot::Mutex;

#[test]
fn stun_from_the_wireguard_socket_finds_its_port_and_ignores_spoofed_answers() {
    let nodes = mesh(2, false);
    let e = &nodes[0].engine;
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    let me: SocketAddr = format!("127.0.0.1:{}", e.listen_port()).parse().unwrap();
    e.set_stun_servers(&[stun.local_addr()]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || e.nat_status().reflexive
            == Some(me)),
        "the STUN server never told the WireGuard socket its address: {:?}",
        e.nat_status()
    );
    // An answer from elsewhere, with a made-up transaction: dropped, counted.
    let spoofer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 64];
    let n = encode_binding_success(
        &[7; 12],
        "203.0.113.9:1".parse().unwrap(),
        None,
        true,
        &mut buf,
    )
    .unwrap();
    for _ in 0..5 {
        spoofer.send_to(&buf[..n], me).unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || {
        e.nat_status().discovery.unknown_source >= 5
    }));
    assert_eq!(
        e.nat_status().reflexive,
        Some(me),
        "a spoofed answer moved the address"
    );
    assert_eq!(
        e.stats().rx_malformed,
        0,
        "STUN reached the WireGuard framing"
    );
    // WireGuard traffic on the same socket is untouched.
    let p = udp_packet(nodes[0].v4, nodes[1].v4, 64, 1);
    assert!(send_and_receive(e, &nodes[1].engine, &p).is_some());
    assert!(
        stun.stats()
            .answered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// A relay that records what the engine sends through it; `1` counts its
/// sessions (registrations), as `RelayClient`'s status does.
#[derive(Default)]
struct Recorder(
    Mutex<Vec<(PublicKey, Vec<u8>)>>,
    std::sync::atomic::AtomicU64,
);

impl Transport for Recorder {
    fn send_batch(&self, batch: &[u8], segment: usize, to: &Endpoint) -> Result<(), Unsent> {
        let Endpoint::Relay(key) = to else {
            return Err(Unsent::all(batch.len(), segment));
        };
        let mut sent = self.0.lock();
        sent.extend(batch.chunks(segment).map(|d| (*key, d.to_vec())));
        Ok(())
    }
}

impl RelayTransport for Recorder {
    fn is_up(&self) -> bool {
        true
    }
    fn rekeyed(&self) {}
    fn reconnect(&self) {}
    fn sessions(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn candidates_arrive_through_the_relay_from_its_key_and_get_an_answer() {
    let nodes = mesh(2, false);
    let e = &nodes[1].engine;
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    e.set_stun_servers(&[stun.local_addr()]).unwrap();
    let relay = Arc::new(Recorder::default());
    e.attach_relay(relay.clone(), Duration::from_secs(5))
        .unwrap();
    let inbox = e.relay_inbox();
    let peer = nodes[0].key.public_key();
    let list: Vec<SocketAddr> = vec!["192.0.2.7:51820".parse().unwrap()];
    inbox.deliver(&peer, &Candidates(list.clone()).encode());
    // From a key that is no peer, malformed, another version: counted, dropped.
    let stranger = PrivateKey::generate().public_key();
    inbox.deliver(&stranger, &Candidates(list.clone()).encode());
    inbox.deliver(&peer, &[0x80, 1, 9]);
    inbox.deliver(&peer, &[0x80, 2, 0]);
    let s = e.nat_stats();
    assert_eq!(
        (
            s.candidates_received,
            s.candidates_unknown_peer,
            s.candidates_malformed,
            s.candidates_unsupported
        ),
        (1, 1, 1, 1)
    );
    let status = e.nat_status();
    assert_eq!(status.peer_candidates, vec![(peer, list)]);
    assert_eq!(
        e.stats().rx_malformed,
        0,
        "a candidate message reached WireGuard"
    );
    // Ours go back to that peer through the relay, as a candidate message.
    assert!(wait_until(Duration::from_secs(5), || {
        relay
            .0
            .lock()
            .iter()
            .any(|(to, m)| *to == peer && Candidates::decode(m).is_ok())
    }));
    // The peer is on a working direct path (loopback): no probing rounds.
    assert_eq!(e.nat_stats().probe_rounds, 0);
    e.detach_relay();
}

/// A direct path that stops answering may mean our own NAT's mapping
/// changed (a new public address or port): the fallback to the relay
/// starts a discovery round at once, so the new mapping is announced
/// within seconds instead of at the next REDISCOVER_INTERVAL (30 s).
#[test]
fn a_fallback_to_the_relay_starts_a_discovery_round_at_once() {
    use common::lossy_relay::{LinkProfile, LossyRelay};
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    // The UDP path between them blackholed: a's handshakes go unanswered.
    let link = LossyRelay::between(
        &a.engine,
        a.key.public_key(),
        &b.engine,
        b.key.public_key(),
        LinkProfile {
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            seed: 1,
        },
    );
    link.set_blocked(true);
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    a.engine.set_stun_servers(&[stun.local_addr()]).unwrap();
    let relay = Arc::new(Recorder::default());
    a.engine
        .attach_relay(relay.clone(), Duration::from_secs(5))
        .unwrap();
    let answered = || stun.stats().answered.load(Relaxed);
    assert!(
        wait_until(Duration::from_secs(5), || answered() >= 1),
        "no first discovery round"
    );
    let first = answered();
    let start = Instant::now();
    // Data toward b: handshakes over UDP, unanswered (twice) -> relay.
    let fell_back = wait_until(Duration::from_secs(20), || {
        let _ = a.engine.send_packet(&udp_packet(a.v4, b.v4, 64, 1));
        std::thread::sleep(Duration::from_millis(200));
        a.engine.nat_stats().fallbacks >= 1
    });
    assert!(
        fell_back,
        "no fallback to the relay: {:?}",
        a.engine.nat_stats()
    );
    let fallback_after = start.elapsed();
    assert!(
        wait_until(Duration::from_secs(3), || answered() > first),
        "no discovery round within 3 s of the fallback ({fallback_after:?} after the first \
         round; the timer's next is at 30 s): {} answers",
        answered()
    );
    a.engine.detach_relay();
}

/// Candidates sent on a relay session that then ended can be lost with
/// its connection (the public address change in nat_pairs.sh resets the
/// relay's TCP connection right after the new address is announced): a
/// new session announces ours to every peer again at once, not at the
/// next ANNOUNCE_INTERVAL (30 s).
#[test]
fn a_new_relay_session_announces_our_candidates_again() {
    use std::sync::atomic::Ordering::Relaxed;

    let nodes = mesh(2, false);
    let e = &nodes[1].engine;
    let peer = nodes[0].key.public_key();
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    e.set_stun_servers(&[stun.local_addr()]).unwrap();
    let relay = Arc::new(Recorder::default());
    relay.1.store(1, Relaxed);
    e.attach_relay(relay.clone(), Duration::from_secs(5))
        .unwrap();
    let announced = || {
        relay
            .0
            .lock()
            .iter()
            .filter(|(to, m)| *to == peer && Candidates::decode(m).is_ok())
            .count()
    };
    // The first announcement, and the one when STUN finds our address.
    assert!(wait_until(Duration::from_secs(5), || announced() >= 1
        && e.nat_status().reflexive.is_some()));
    std::thread::sleep(Duration::from_secs(1));
    let before = announced();
    // Nothing new for a while: no announcement (the next is 30 s away).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(announced(), before, "announced with nothing new");
    // The relay connected again: a new session.
    relay.1.fetch_add(1, Relaxed);
    assert!(
        wait_until(Duration::from_secs(2), || announced() > before),
        "a new relay session got no announcement of our candidates"
    );
    e.detach_relay();
}

/// The relay tells each session the address it sees it come from. A new
/// IP (our NAT's public address changed, and our UDP mapping with it)
/// starts a discovery round at once and is counted; the first report, and
/// a new port on the same IP (a new TCP connection), do not.
#[test]
fn a_new_public_ip_seen_by_the_relay_starts_a_discovery_round_at_once() {
    use std::sync::atomic::Ordering::Relaxed;

    let nodes = mesh(2, false);
    let e = &nodes[0].engine;
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    e.set_stun_servers(&[stun.local_addr()]).unwrap();
    let answered = || stun.stats().answered.load(Relaxed);
    assert!(
        wait_until(Duration::from_secs(5), || answered() >= 1),
        "no first discovery round"
    );
    let inbox = e.relay_inbox();
    let quiet = |what: &str| {
        let before = answered();
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(answered(), before, "a discovery round after {what}");
    };
    inbox.observed("198.51.100.7:40000".parse().unwrap());
    quiet("the first report");
    inbox.observed("198.51.100.7:40001".parse().unwrap());
    quiet("a new port on the same IP");
    assert_eq!(e.nat_status().stats.relay_ip_changes, 0);
    let before = answered();
    inbox.observed("203.0.113.9:40002".parse().unwrap());
    assert!(
        wait_until(Duration::from_secs(1), || answered() > before),
        "no discovery round within 1 s of a new public IP (the timer's next is at 30 s)"
    );
    let s = e.nat_status();
    assert_eq!(s.stats.relay_ip_changes, 1);
    assert_eq!(e.nat_stats().relay_ip_changes, 1);
    assert_eq!(s.relay_observed, Some("203.0.113.9:40002".parse().unwrap()));
    // Plain `meshvpn status` reads both from the paths request.
    let paths = e.uapi_paths();
    assert!(
        paths.contains("relay_observed=203.0.113.9:40002\nrelay_ip_changes=1\n"),
        "{paths}"
    );
}

/// This host's address on its default route (a connected UDP socket sends
/// nothing): a usable candidate (loopback ones are not), and datagrams to
/// it stay on this host. `None` on a host without one.
fn own_address() -> Option<std::net::IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Two engines that know no endpoint of each other, no relay: only a
/// control server's map (`set_peer_candidates`) says where each is.
fn unrelayed_pair() -> (
    Vec<(PrivateKey, meshvpn_engine::Engine)>,
    [std::net::IpAddr; 2],
) {
    use meshvpn_engine::config::{Config, InterfaceConfig, PeerConfig};
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let v4: [std::net::IpAddr; 2] = ["10.78.0.1".parse().unwrap(), "10.78.0.2".parse().unwrap()];
    let engines: Vec<_> = (0..2)
        .map(|i| {
            let cfg = Config {
                interface: InterfaceConfig {
                    private_key: Some(keys[i].clone()),
                    listen_port: Some(0),
                    ..Default::default()
                },
                peers: vec![],
            };
            let e = meshvpn_engine::Engine::new(&cfg).unwrap();
            let mut p = PeerConfig::new(keys[1 - i].public_key());
            p.allowed_ips = vec![meshvpn_engine::IpPrefix::host(v4[1 - i])];
            e.add_peer(&p).unwrap();
            (keys[i].clone(), e)
        })
        .collect();
    (engines, v4)
}

/// Map candidates are probed without any relay: two nodes with public
/// addresses and a control map reach their direct path.
#[test]
fn without_a_relay_map_candidates_are_probed_and_the_direct_path_found() {
    let Some(ip) = own_address() else {
        eprintln!("skipped: this host has no address besides loopback");
        return;
    };
    let (nodes, v4) = unrelayed_pair();
    let (a, b) = (&nodes[0], &nodes[1]);
    let at = |e: &meshvpn_engine::Engine| SocketAddr::new(ip, e.listen_port());
    assert!(a.1.set_peer_candidates(&b.0.public_key(), &[at(&b.1)]));
    assert!(b.1.set_peer_candidates(&a.0.public_key(), &[at(&a.1)]));
    let direct = wait_until(Duration::from_secs(5), || {
        a.1.peer_stats(&b.0.public_key()).unwrap().endpoint == Some(at(&b.1))
            && b.1.peer_stats(&a.0.public_key()).unwrap().endpoint == Some(at(&a.1))
    });
    assert!(
        direct,
        "no direct path without a relay within 5 s: {:?} / {:?}",
        a.1.nat_stats(),
        a.1.peer_stats(&b.0.public_key())
    );
    // One side's probe can make both sides direct before the other's
    // first round (its answer is authenticated, and it moves the other's
    // endpoint): the rounds are counted over the pair.
    let rounds = a.1.nat_stats().probe_rounds + b.1.nat_stats().probe_rounds;
    assert!(rounds >= 1, "direct with no probe round on either side");
    let p = udp_packet(v4[0], v4[1], 64, 1);
    assert!(send_and_receive(&a.1, &b.1, &p).is_some());
}

/// An in-process relay between engines: what one sends to a key is
/// delivered, on the hub's thread, to the engine attached under that key,
/// from the sender's key (a relay vouches for the key each frame came
/// from). Bounded: beyond `HUB_QUEUE` datagrams in flight, sends fail.
struct Hub {
    tx: std::sync::mpsc::SyncSender<(PublicKey, PublicKey, Vec<u8>)>,
    inboxes: Arc<Mutex<std::collections::HashMap<PublicKey, meshvpn_engine::wg::RelayInbox>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const HUB_QUEUE: usize = 4096;

struct HubLink {
    me: PublicKey,
    tx: std::sync::mpsc::SyncSender<(PublicKey, PublicKey, Vec<u8>)>,
}

impl Transport for HubLink {
    fn send_batch(&self, batch: &[u8], segment: usize, to: &Endpoint) -> Result<(), Unsent> {
        let Endpoint::Relay(key) = to else {
            return Err(Unsent::all(batch.len(), segment));
        };
        let unsent = batch
            .chunks(segment.max(1))
            .filter(|d| self.tx.try_send((self.me, *key, d.to_vec())).is_err())
            .count();
        if unsent == 0 {
            Ok(())
        } else {
            Err(Unsent(unsent))
        }
    }
}

impl RelayTransport for HubLink {
    fn is_up(&self) -> bool {
        true
    }
    fn rekeyed(&self) {}
    fn reconnect(&self) {}
    fn sessions(&self) -> u64 {
        1
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Hub {
    fn new() -> Hub {
        use std::sync::atomic::Ordering::Relaxed;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PublicKey, PublicKey, Vec<u8>)>(HUB_QUEUE);
        let inboxes: Arc<Mutex<std::collections::HashMap<_, meshvpn_engine::wg::RelayInbox>>> =
            Default::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (i, s) = (inboxes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok((from, to, d)) => {
                        let inbox = i.lock().get(&to).cloned();
                        if let Some(inbox) = inbox {
                            inbox.deliver(&from, &d);
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => break,
                }
            }
        });
        Hub {
            tx,
            inboxes,
            stop,
            thread: Some(thread),
        }
    }

    fn attach(&self, e: &meshvpn_engine::wg::Engine, key: PublicKey, probe_interval: Duration) {
        self.inboxes.lock().insert(key, e.relay_inbox());
        let link = Arc::new(HubLink {
            me: key,
            tx: self.tx.clone(),
        });
        e.attach_relay(link, probe_interval).unwrap();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every WireGuard byte to and from a peer is counted on the path kind it
/// travelled: on the relay while the UDP path is blackholed, on direct UDP
/// once a probe finds it open again (relay bytes then flat), the two
/// summing to the peer's transfer (`wg show`), and the time on each kind
/// adding up across the switch.
#[test]
fn bytes_and_time_are_counted_on_the_relay_then_on_direct_udp() {
    use common::lossy_relay::{LinkProfile, LossyRelay};
    use meshvpn_engine::peer::{PathTraffic, PeerPath};
    use std::time::Instant;

    const PACKETS: usize = 50;
    const PAYLOAD: usize = 1000;
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (ka, kb) = (a.key.public_key(), b.key.public_key());
    let link = LossyRelay::between(
        &a.engine,
        ka,
        &b.engine,
        kb,
        LinkProfile {
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            seed: 1,
        },
    );
    link.set_blocked(true);
    let hub = Hub::new();
    let started = Instant::now();
    hub.attach(&a.engine, ka, Duration::from_millis(500));
    hub.attach(&b.engine, kb, Duration::from_millis(500));
    let path_of = |e: &meshvpn_engine::wg::Engine, k: &PublicKey| e.peer_stats(k).unwrap().path;
    let traffic = |e: &meshvpn_engine::wg::Engine, k: &PublicKey| -> PathTraffic {
        e.peer_path_traffic(k).unwrap()
    };
    let drain = |e: &meshvpn_engine::wg::Engine| {
        while e.recv_packet(Duration::from_millis(100)).is_some() {}
    };
    let burst = |seed: u8| {
        let mut got = 0;
        for i in 0..PACKETS {
            let p = udp_packet(a.v4, b.v4, PAYLOAD, seed.wrapping_add(i as u8));
            if send_and_receive(&a.engine, &b.engine, &p).is_some() {
                got += 1;
            }
        }
        got
    };

    // UDP blackholed: a's handshakes go unanswered and a moves to the relay.
    let on_relay = wait_until(Duration::from_secs(20), || {
        let _ = a.engine.send_packet(&udp_packet(a.v4, b.v4, 64, 1));
        std::thread::sleep(Duration::from_millis(200));
        path_of(&a.engine, &kb) == PeerPath::Relay
    });
    assert!(
        on_relay,
        "a never moved to the relay: {:?}",
        traffic(&a.engine, &kb)
    );
    let relay_seen = Instant::now();
    drain(&b.engine);
    let before = (traffic(&a.engine, &kb), traffic(&b.engine, &ka));
    assert_eq!(burst(1), PACKETS, "packets lost on the relay");
    let after = (traffic(&a.engine, &kb), traffic(&b.engine, &ka));
    let data = (PACKETS * PAYLOAD) as u64;
    assert!(
        after.0.relay.tx_bytes - before.0.relay.tx_bytes >= data,
        "{after:?}"
    );
    assert!(
        after.1.relay.rx_bytes - before.1.relay.rx_bytes >= data,
        "{after:?}"
    );
    assert_eq!(after.1.udp.rx_bytes, 0, "b received over blackholed UDP");
    assert!(
        after.0.udp.tx_bytes > 0,
        "a's unanswered UDP handshakes uncounted"
    );

    // UDP open again: the relay path's probe finds it; a moves back.
    link.set_blocked(false);
    let mut last_relay = Instant::now();
    let direct = wait_until(Duration::from_secs(10), || {
        if path_of(&a.engine, &kb) == PeerPath::Relay {
            last_relay = Instant::now();
            return false;
        }
        path_of(&b.engine, &ka) == PeerPath::Udp
    });
    assert!(
        direct,
        "no way back to direct UDP: {:?}",
        traffic(&a.engine, &kb)
    );
    let direct_seen = Instant::now();
    drain(&b.engine);
    let before = (traffic(&a.engine, &kb), traffic(&b.engine, &ka));
    assert_eq!(burst(2), PACKETS, "packets lost on direct UDP");
    let after = (traffic(&a.engine, &kb), traffic(&b.engine, &ka));
    assert!(
        after.0.udp.tx_bytes - before.0.udp.tx_bytes >= data,
        "{after:?}"
    );
    assert!(
        after.1.udp.rx_bytes - before.1.udp.rx_bytes >= data,
        "{after:?}"
    );
    // Relay bytes flat: not one data packet's worth moved there.
    let moved = after.0.relay.tx_bytes - before.0.relay.tx_bytes;
    assert!(
        moved < PAYLOAD as u64,
        "{moved} B went on the relay while direct"
    );
    let moved = after.1.relay.rx_bytes - before.1.relay.rx_bytes;
    assert!(
        moved < PAYLOAD as u64,
        "{moved} B came on the relay while direct"
    );

    // The per-kind bytes are the peer's transfer, split.
    for (e, k) in [(&a.engine, &kb), (&b.engine, &ka)] {
        let s = e.peer_stats(k).unwrap();
        let t = traffic(e, k);
        assert_eq!(t.udp.tx_bytes + t.relay.tx_bytes, s.tx_bytes);
        assert_eq!(t.udp.rx_bytes + t.relay.rx_bytes, s.rx_bytes);
    }
    // Time: a's stretch on the relay covers what the test saw of it, and is
    // frozen now; the direct stretch grows.
    let t1 = traffic(&a.engine, &kb);
    assert!(
        t1.relay.time >= last_relay - relay_seen,
        "relay time {:?} shorter than seen {:?}",
        t1.relay.time,
        last_relay - relay_seen
    );
    assert!(t1.relay.time <= direct_seen - started, "{t1:?}");
    std::thread::sleep(Duration::from_millis(300));
    let t2 = traffic(&a.engine, &kb);
    assert_eq!(
        t2.relay.time, t1.relay.time,
        "relay time grows while direct"
    );
    assert!(t2.udp.time >= t1.udp.time + Duration::from_millis(300));
    eprintln!("a's traffic to b: {t2:?}");
    let total = t2.udp.time + t2.relay.time;
    assert!(
        total <= started.elapsed() + Duration::from_secs(1),
        "{t2:?}"
    );
    a.engine.detach_relay();
    b.engine.detach_relay();
}

/// A non-loopback address of this host (NAT traversal takes no loopback
/// candidate); datagrams to it never leave the host (see `own_address`).
fn local_non_loopback() -> std::net::IpAddr {
    own_address().expect("this test needs a route (and so a non-loopback local address)")
}

/// The path policy (`PathState::choose`: liveness probes while data
/// flows), not unanswered data handshakes (`step`), gives up a dead direct
/// path. That fallback is counted (engine and peer) and starts a discovery
/// round at once, as `step`'s does.
#[test]
fn a_direct_path_given_up_by_the_path_policy_counts_a_fallback_and_rediscovers() {
    use common::lossy_relay::{LinkProfile, LossyRelay};
    use meshvpn_engine::device::PathSummary;
    use meshvpn_engine::peer::PeerPath;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    let nodes = mesh(2, false);
    // `a` is the side that measures and chooses: the lower public key.
    let (a, b) = if nodes[0].key.public_key().as_bytes() < nodes[1].key.public_key().as_bytes() {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    let (ka, kb) = (a.key.public_key(), b.key.public_key());
    let host = local_non_loopback();
    let lo = |e: &meshvpn_engine::wg::Engine| SocketAddr::from(([127, 0, 0, 1], e.listen_port()));
    let link = LossyRelay::start_on(
        host,
        lo(&a.engine),
        lo(&b.engine),
        LinkProfile {
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            seed: 1,
        },
    );
    for (e, peer, to) in [
        (&a.engine, kb, link.toward_b),
        (&b.engine, ka, link.toward_a),
    ] {
        let u = meshvpn_engine::wg::PeerUpdate {
            endpoint: Some(to),
            ..Default::default()
        };
        e.update_peer(&peer, &u, false).unwrap();
    }
    let hub = Hub::new();
    hub.attach(&a.engine, ka, Duration::from_secs(5));
    hub.attach(&b.engine, kb, Duration::from_secs(5));
    // Direct first, then b's direct address is its candidate: measured.
    let p = udp_packet(a.v4, b.v4, 64, 1);
    assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());
    assert!(a.engine.set_peer_candidates(&kb, &[link.toward_b]));
    let summary = || -> PathSummary {
        a.engine
            .nat_status()
            .peer_paths
            .into_iter()
            .find(|(k, _)| *k == kb)
            .map(|(_, s)| s)
            .unwrap_or_default()
    };
    assert_eq!(a.engine.peer_stats(&kb).unwrap().path, PeerPath::Udp);
    assert_eq!(a.engine.nat_stats().fallbacks, 0);

    // The direct path dies while `a` sends one way (b has nothing to say):
    // the liveness probes go unanswered.
    link.set_blocked(true);
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    a.engine.set_stun_servers(&[stun.local_addr()]).unwrap();
    let blocked = Instant::now();
    let answered = || stun.stats().answered.load(Relaxed);
    assert!(
        wait_until(Duration::from_secs(5), || answered() >= 1),
        "no first discovery round"
    );
    let first = answered();
    // Bounded: at most 15 s, 20 datagrams a second.
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.engine.nat_stats().fallbacks == 0 && Instant::now() < deadline {
        let _ = a.engine.send_packet(&udp_packet(a.v4, b.v4, 64, 1));
        std::thread::sleep(Duration::from_millis(50));
    }
    let fell_after = blocked.elapsed();
    let s = summary();
    assert!(
        a.engine.nat_stats().fallbacks >= 1,
        "no fallback within 15 s of sending into a dead direct path: {:?} {s:?}",
        a.engine.nat_stats()
    );
    assert_eq!(s.fallbacks, 1, "the peer's own count: {s:?}");
    assert!(
        wait_until(Duration::from_secs(2), || a
            .engine
            .peer_stats(&kb)
            .unwrap()
            .path
            == PeerPath::Relay),
        "the peer stayed on the dead direct path"
    );
    assert!(
        wait_until(Duration::from_secs(3), || answered() > first),
        "no discovery round within 3 s of the fallback ({fell_after:?} after the block; \
         the timer's next round is at 30 s)"
    );
    let age = a.engine.nat_status().since_discovery.expect("a round ran");
    assert!(
        age < Duration::from_secs(4),
        "last discovery round {age:?} ago"
    );
    eprintln!("fallback {fell_after:?} after the block; discovery round {age:?} ago");
    a.engine.detach_relay();
    b.engine.detach_relay();
}
