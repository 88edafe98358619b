//! WireGuard over the websocket relay: two engines whose UDP path is
//! blackholed talk through a real TLS relay server and move back to UDP
//! when it returns; the relay's registration proof, forwarding,
//! replacement, unknown keys and size limits over real sockets.

mod common;
mod tunnel_support;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{unbounded, Receiver, Sender};
use meshvpn_engine::peer::{PeerPath, PeerStats};
use meshvpn_engine::relay::protocol::{self as relay, MAX_FRAME};
use meshvpn_engine::relay::{RelayClient, RelayConfig, RelayOwner, RelayServerConfig, RELAY_PATH};
use meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer};
use meshvpn_engine::ws::tls;
use meshvpn_engine::{Engine, PrivateKey};
use tungstenite::Message;

use common::lossy_relay::{LinkProfile, LossyRelay};
use common::{mesh, udp_packet, wait_until};
use tunnel_support::{loopback, pki, Pki};

const WAIT: Duration = Duration::from_secs(30);

fn relay_server(pki: Option<&Pki>) -> TunnelServer {
    relay_server_at(pki, loopback())
}

fn relay_server_at(pki: Option<&Pki>, addr: SocketAddr) -> TunnelServer {
    let tls = pki.map(|p| {
        tls::server_config(
            p.server_cert.as_bytes(),
            p.server_key.as_bytes(),
            None,
            false,
        )
        .unwrap()
    });
    let mut config = ServerConfig::new("/v1-k3s/connect", tls, ServerAuth::default());
    config.relay = Some(RelayServerConfig::default());
    TunnelServer::bind(addr, config).unwrap()
}

fn relay_config(pki: &Pki, server: SocketAddr) -> RelayConfig {
    let tls = tls::client_config(pki.ca_pem.as_bytes(), None).unwrap();
    let mut c = RelayConfig::new(format!("wss://{server}{RELAY_PATH}"), Some(tls));
    c.backoff_initial = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(500);
    c.probe_interval = Duration::from_secs(1);
    c
}

fn peer_of(engine: &Engine, key: &PrivateKey) -> PeerStats {
    engine.peer_stats(&key.public_key()).unwrap()
}

/// Sends packets from `from` until one arrives at `to` (or `WAIT` passes).
fn traffic_flows(from: &Engine, to: &Engine, src: std::net::IpAddr, dst: std::net::IpAddr) -> bool {
    let deadline = Instant::now() + WAIT;
    for seed in 0..=255u8 {
        let p = udp_packet(src, dst, 200, seed);
        let _ = from.send_packet(&p);
        while let Some(got) = to.recv_packet(Duration::from_millis(300)) {
            if *got == p[..] {
                return true;
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    false
}

#[test]
fn engines_fall_back_to_the_relay_and_return_to_udp() {
    let pki = pki();
    let server = relay_server(Some(&pki));
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
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
    for n in &nodes {
        n.engine
            .start_relay(relay_config(&pki, server.local_addr()))
            .unwrap();
    }
    for n in &nodes {
        assert!(
            n.engine.wait_relay_connected(WAIT),
            "{:?}",
            n.engine.relay_status()
        );
    }
    // The server counts a client once its proof is checked, which may land
    // just after the client saw its registration answered.
    assert!(
        wait_until(WAIT, || server.relay_stats().unwrap().clients == 2),
        "{:?}",
        server.relay_stats()
    );

    // UDP blackholed: the handshake goes unanswered, then the relay carries it.
    assert!(
        traffic_flows(&a.engine, &b.engine, a.v4, b.v4),
        "nothing through the relay: {:?} {:?}",
        a.engine.relay_status(),
        server.relay_stats()
    );
    assert!(traffic_flows(&b.engine, &a.engine, b.v4, a.v4));
    assert_eq!(peer_of(&a.engine, &b.key).path, PeerPath::Relay);
    assert_eq!(peer_of(&b.engine, &a.key).path, PeerPath::Relay);
    // wg show sees the reserved "via relay" endpoint.
    let shown = peer_of(&a.engine, &b.key).endpoint.unwrap();
    assert!(shown.to_string().starts_with("[100::"), "{shown}");
    let relayed = server.relay_stats().unwrap().forwarded;
    assert!(relayed >= 4, "relay forwarded {relayed}");
    assert!(a.engine.relay_status().unwrap().frames_received > 0);
    // v6 inside too.
    assert!(traffic_flows(&a.engine, &b.engine, a.v6, b.v6));

    // UDP back: probes over UDP get answered and both move back.
    link.set_blocked(false);
    let back = wait_until(WAIT, || {
        let _ = a.engine.send_packet(&udp_packet(a.v4, b.v4, 50, 1));
        let _ = b.engine.send_packet(&udp_packet(b.v4, a.v4, 50, 2));
        while a.engine.recv_packet(Duration::ZERO).is_some() {}
        while b.engine.recv_packet(Duration::ZERO).is_some() {}
        peer_of(&a.engine, &b.key).path == PeerPath::Udp
            && peer_of(&b.engine, &a.key).path == PeerPath::Udp
    });
    assert!(
        back,
        "still on the relay: {:?} {:?}",
        peer_of(&a.engine, &b.key).endpoint,
        peer_of(&b.engine, &a.key).endpoint
    );
    assert_eq!(peer_of(&a.engine, &b.key).endpoint, Some(link.toward_b));
    let forwarded_before = link
        .stats
        .forwarded
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(traffic_flows(&a.engine, &b.engine, a.v4, b.v4));
    assert!(traffic_flows(&b.engine, &a.engine, b.v4, a.v4));
    assert!(
        link.stats
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            > forwarded_before
    );

    // Stopping the relay leaves UDP peers alone.
    a.engine.stop_relay();
    assert!(a.engine.relay_status().is_none());
    assert!(traffic_flows(&a.engine, &b.engine, a.v4, b.v4));
}

fn secret(key: &PrivateKey) -> boringtun::x25519::StaticSecret {
    boringtun::x25519::StaticSecret::from(*key.as_bytes())
}

/// What a test owner was handed: (source key, datagram).
type Delivered = ([u8; 32], Vec<u8>);

/// A relay owner for tests: a fixed key, deliveries into a channel.
struct Owner {
    key: PrivateKey,
    got: Sender<Delivered>,
}

impl RelayOwner for Owner {
    fn static_secret(&self) -> Option<boringtun::x25519::StaticSecret> {
        Some(secret(&self.key))
    }
    fn deliver(&self, source: &[u8; 32], datagram: &[u8]) {
        let _ = self.got.send((*source, datagram.to_vec()));
    }
}

fn client(
    pki: &Pki,
    server: &TunnelServer,
    key: &PrivateKey,
) -> (RelayClient, Receiver<Delivered>) {
    let (tx, rx) = unbounded();
    let owner = Arc::new(Owner {
        key: key.clone(),
        got: tx,
    });
    let c = RelayClient::start(relay_config(pki, server.local_addr()), owner).unwrap();
    assert!(c.wait_connected(WAIT), "{:?}", c.status());
    (c, rx)
}

#[test]
fn relay_forwards_by_key_and_drops_unknown_keys() {
    let pki = pki();
    let server = relay_server(Some(&pki));
    let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
    let (c1, rx1) = client(&pki, &server, &k1);
    let (c2, rx2) = client(&pki, &server, &k2);

    assert!(c1.send(k2.public_key().as_bytes(), b"\x04datagram one"));
    let (src, d) = rx2.recv_timeout(WAIT).unwrap();
    assert_eq!(
        src,
        *k1.public_key().as_bytes(),
        "tagged with the sender's key"
    );
    assert_eq!(d, b"\x04datagram one");
    assert!(c2.send(k1.public_key().as_bytes(), b"\x04back"));
    assert_eq!(rx1.recv_timeout(WAIT).unwrap().1, b"\x04back");

    // A key with no session: dropped and counted.
    let nobody = PrivateKey::generate().public_key();
    assert!(c1.send(nobody.as_bytes(), b"\x04lost"));
    assert!(wait_until(WAIT, || server
        .relay_stats()
        .unwrap()
        .dropped_unknown
        == 1));
    // Oversized datagrams never leave the client.
    assert!(!c1.send(
        k2.public_key().as_bytes(),
        &vec![4u8; relay::MAX_DATAGRAM + 1]
    ));
    assert!(!c1.send(k2.public_key().as_bytes(), &[]));

    // k1 registers again from a new client: frames go to the new one.
    drop(c1);
    let (c3, rx3) = client(&pki, &server, &k1);
    assert!(c2.send(k1.public_key().as_bytes(), b"\x04to the new one"));
    assert_eq!(rx3.recv_timeout(WAIT).unwrap().1, b"\x04to the new one");
    let stats = server.relay_stats().unwrap();
    assert_eq!(stats.registrations, 3);
    assert_eq!(stats.clients, 2);
    drop(c3);
    assert!(wait_until(WAIT, || server.relay_stats().unwrap().clients == 1));
}

/// The relay goes away and comes back on the same address: the client
/// notices, keeps trying with its backoff and registers again; frames flow.
#[test]
fn relay_client_registers_again_after_the_relay_restarts() {
    let pki = pki();
    let server = relay_server(Some(&pki));
    let addr = server.local_addr();
    let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
    let (c1, rx1) = client(&pki, &server, &k1);
    assert_eq!(c1.status().sessions, 1);

    server.shutdown();
    assert!(
        wait_until(WAIT, || !c1.status().connected),
        "the client did not notice the relay went away"
    );
    assert!(!c1.send(k2.public_key().as_bytes(), b"\x04nowhere"));
    // Let it fail at least once against the closed port.
    assert!(wait_until(WAIT, || c1
        .status()
        .last_error
        .is_some_and(|e| e.to_lowercase().contains("refused"))));

    let server = relay_server_at(Some(&pki), addr);
    assert!(c1.wait_connected(WAIT), "{:?}", c1.status());
    assert_eq!(c1.status().sessions, 2);
    let (c2, _rx2) = client(&pki, &server, &k2);
    assert!(c2.send(k1.public_key().as_bytes(), b"\x04after the restart"));
    assert_eq!(rx1.recv_timeout(WAIT).unwrap().1, b"\x04after the restart");
    assert_eq!(server.relay_stats().unwrap().registrations, 2);
}

/// A relay owner whose key changes while the client is connecting: its
/// first `static_secret` returns the old key and holds the attempt until
/// the test has asked for a reconnect; later calls return the new key.
struct ChangingOwner {
    keys: [PrivateKey; 2],
    calls: std::sync::atomic::AtomicUsize,
    taken: Sender<()>,
    go: std::sync::Mutex<Receiver<()>>,
    got: Sender<Delivered>,
}

impl RelayOwner for ChangingOwner {
    fn static_secret(&self) -> Option<boringtun::x25519::StaticSecret> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if call == 0 {
            self.taken.send(()).unwrap();
            self.go.lock().unwrap().recv_timeout(WAIT).unwrap();
        }
        Some(secret(&self.keys[call.min(1)]))
    }
    fn deliver(&self, source: &[u8; 32], datagram: &[u8]) {
        let _ = self.got.send((*source, datagram.to_vec()));
    }
}

/// A key change while the client is still connecting with the old key:
/// the session that comes up with the old key ends at once and the client
/// registers the new one (it used to stay on the old key until that
/// session ended for another reason).
#[test]
fn relay_client_asked_to_reconnect_while_connecting_registers_the_new_key() {
    let pki = pki();
    let server = relay_server(Some(&pki));
    let (old, new) = (PrivateKey::generate(), PrivateKey::generate());
    let (taken_tx, taken_rx) = unbounded();
    let (go_tx, go_rx) = unbounded();
    let (got_tx, got_rx) = unbounded();
    let owner = Arc::new(ChangingOwner {
        keys: [old.clone(), new.clone()],
        calls: Default::default(),
        taken: taken_tx,
        go: std::sync::Mutex::new(go_rx),
        got: got_tx,
    });
    let c = RelayClient::start(relay_config(&pki, server.local_addr()), owner).unwrap();
    taken_rx.recv_timeout(WAIT).unwrap();
    c.reconnect();
    go_tx.send(()).unwrap();

    let (other, _rx) = client(&pki, &server, &PrivateKey::generate());
    let deadline = Instant::now() + WAIT;
    let mut arrived = false;
    while !arrived && Instant::now() < deadline {
        other.send(new.public_key().as_bytes(), b"\x04to the new key");
        arrived = got_rx.recv_timeout(Duration::from_millis(200)).is_ok();
    }
    assert!(
        arrived,
        "the client never registered its new key: {:?}, {:?}",
        c.status(),
        server.relay_stats().unwrap()
    );
}

type Ws = tungstenite::WebSocket<TcpStream>;

/// A raw websocket to a plain-HTTP relay (the test owns every byte).
fn raw(server: &TunnelServer) -> Ws {
    let tcp = TcpStream::connect(server.local_addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let url = format!("ws://{}{RELAY_PATH}", server.local_addr());
    tungstenite::client(url, tcp).unwrap().0
}

fn binary(ws: &mut Ws) -> Option<Bytes> {
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => return Some(b),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            _ => return None,
        }
    }
}

fn register(server: &TunnelServer, key: &PrivateKey) -> Ws {
    let mut ws = raw(server);
    let challenge = binary(&mut ws).unwrap();
    // A plain connection has no TLS session: its exporter value is zeros.
    let proof = relay::prove(&challenge, &secret(key), &[0; 32]).unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(&proof)))
        .unwrap();
    assert_eq!(&binary(&mut ws).unwrap()[..], &relay::ACCEPTED);
    // Then, before any frame, where the relay sees us from: a message too
    // short to be a frame (a client older than it drops it as such).
    let observed = binary(&mut ws).unwrap();
    assert!(relay::Frame::decode(&observed).is_err());
    match relay::Control::decode(&observed) {
        Ok(relay::Control::Observed(a)) => assert_eq!(a.0.ip(), server.local_addr().ip()),
        other => panic!("not an observed address: {other:?}"),
    }
    ws
}

#[test]
fn relay_refuses_bad_proofs_and_bounds_messages() {
    let server = relay_server(None);

    // A proof for another key than the one claimed: refused, connection closed.
    let mut ws = raw(&server);
    let challenge = binary(&mut ws).unwrap();
    let mut proof = relay::prove(&challenge, &secret(&PrivateKey::generate()), &[0; 32]).unwrap();
    proof[1..33].copy_from_slice(PrivateKey::generate().public_key().as_bytes());
    ws.send(Message::Binary(Bytes::copy_from_slice(&proof)))
        .unwrap();
    assert!(binary(&mut ws).is_none(), "a forged proof was accepted");
    // Garbage instead of a proof.
    let mut ws = raw(&server);
    binary(&mut ws).unwrap();
    ws.send(Message::Binary(Bytes::from_static(b"hello")))
        .unwrap();
    assert!(binary(&mut ws).is_none());
    assert!(wait_until(WAIT, || server.relay_stats().unwrap().refused == 2));
    assert_eq!(server.relay_stats().unwrap().clients, 0);

    // Registered: a too-short frame is dropped and counted, the session stays.
    let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
    let mut w1 = register(&server, &k1);
    let mut w2 = register(&server, &k2);
    w1.send(Message::Binary(Bytes::from_static(&[7u8; 32])))
        .unwrap();
    let frame = relay::Frame::encode(k2.public_key().as_bytes(), b"\x04ok").unwrap();
    w1.send(Message::Binary(Bytes::from(frame))).unwrap();
    let got = binary(&mut w2).unwrap();
    assert_eq!(&got[..32], k1.public_key().as_bytes());
    assert_eq!(&got[32..], b"\x04ok");
    assert_eq!(server.relay_stats().unwrap().dropped_malformed, 1);

    // A message over the limit ends that session before it is buffered;
    // the other one is unaffected.
    let _ = w1.send(Message::Binary(Bytes::from(vec![0u8; MAX_FRAME + 1])));
    assert!(binary(&mut w1).is_none());
    assert!(wait_until(WAIT, || server.relay_stats().unwrap().clients == 1));
    let k3 = PrivateKey::generate();
    let mut w3 = register(&server, &k3);
    let frame = relay::Frame::encode(k2.public_key().as_bytes(), b"\x04still").unwrap();
    w3.send(Message::Binary(Bytes::from(frame))).unwrap();
    assert_eq!(&binary(&mut w2).unwrap()[32..], b"\x04still");

    // Replacement on the wire: a new registration of k2 ends the old socket.
    let _w2b = register(&server, &k2);
    assert!(
        binary(&mut w2).is_none(),
        "the replaced session stayed open"
    );
    assert_eq!(server.relay_stats().unwrap().replaced, 1);
}

#[test]
fn relay_admits_only_listed_keys_when_given_a_list() {
    let (listed, other) = (PrivateKey::generate(), PrivateKey::generate());
    let mut config = ServerConfig::new("/v1-k3s/connect", None, ServerAuth::default());
    config.relay = Some(RelayServerConfig {
        allowed_keys: Some(vec![listed.public_key()]),
        ..Default::default()
    });
    let server = TunnelServer::bind(loopback(), config).unwrap();
    let _ok = register(&server, &listed);
    // A valid proof for a key not on the list: refused.
    let mut ws = raw(&server);
    let challenge = binary(&mut ws).unwrap();
    let proof = relay::prove(&challenge, &secret(&other), &[0; 32]).unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(&proof)))
        .unwrap();
    assert!(binary(&mut ws).is_none(), "an unlisted key registered");
    let stats = server.relay_stats().unwrap();
    assert_eq!((stats.clients, stats.refused), (1, 1));
}

#[test]
fn relay_can_require_the_tunnel_credentials() {
    let pki = pki();
    let tls = tls::server_config(
        pki.server_cert.as_bytes(),
        pki.server_key.as_bytes(),
        None,
        false,
    )
    .unwrap();
    let auth = ServerAuth {
        tokens: vec![("s3cret-token".into(), "node-a".into())],
        client_cert_cn: false,
    };
    let mut config = ServerConfig::new("/v1-k3s/connect", Some(tls), auth);
    config.relay = Some(RelayServerConfig {
        require_auth: true,
        ..Default::default()
    });
    let server = TunnelServer::bind(loopback(), config).unwrap();
    let (tx, _rx) = unbounded();
    let owner = Arc::new(Owner {
        key: PrivateKey::generate(),
        got: tx,
    });
    let without =
        RelayClient::start(relay_config(&pki, server.local_addr()), owner.clone()).unwrap();
    assert!(wait_until(WAIT, || without
        .status()
        .last_error
        .is_some_and(|e| e.contains("401"))));
    assert!(!without.status().connected);
    drop(without);
    let mut with = relay_config(&pki, server.local_addr());
    with.token = Some("s3cret-token".into());
    let with = RelayClient::start(with, owner).unwrap();
    assert!(with.wait_connected(WAIT), "{:?}", with.status());
    assert_eq!(server.relay_stats().unwrap().clients, 1);
}

// Relay memory: queues bounded in bytes per session and in all, a session
// that does not read closed after the write timeout, the budget given back
// exactly when sessions end, a legitimate pair relaying throughout.

/// A plain-HTTP relay server with `config`.
fn relay_server_with(config: RelayServerConfig) -> TunnelServer {
    let mut c = ServerConfig::new("/v1-k3s/connect", None, ServerAuth::default());
    c.relay = Some(config);
    TunnelServer::bind(loopback(), c).unwrap()
}

/// Two relay clients over plain ws:// that must keep reaching each other.
struct LegitPair {
    a: (PrivateKey, RelayClient, Receiver<Delivered>),
    b: (PrivateKey, RelayClient, Receiver<Delivered>),
}

impl LegitPair {
    fn start(server: &TunnelServer) -> LegitPair {
        let start = |key: PrivateKey| {
            let (tx, rx) = unbounded();
            let owner = Arc::new(Owner {
                key: key.clone(),
                got: tx,
            });
            let mut cfg =
                RelayConfig::new(format!("ws://{}{RELAY_PATH}", server.local_addr()), None);
            cfg.backoff_initial = Duration::from_millis(100);
            cfg.backoff_max = Duration::from_millis(500);
            let c = RelayClient::start(cfg, owner).unwrap();
            assert!(c.wait_connected(WAIT), "{:?}", c.status());
            (key, c, rx)
        };
        LegitPair {
            a: start(PrivateKey::generate()),
            b: start(PrivateKey::generate()),
        }
    }

    /// A datagram each way arrives (sent again every 200 ms, up to `WAIT`).
    fn relays(&self, tag: u8) -> Result<(), String> {
        for (from, to) in [(&self.a, &self.b), (&self.b, &self.a)] {
            let datagram = [4, tag, 1, 2, 3];
            let deadline = Instant::now() + WAIT;
            let mut arrived = false;
            while !arrived && Instant::now() < deadline {
                from.1.send(to.0.public_key().as_bytes(), &datagram);
                while let Ok((src, d)) = to.2.recv_timeout(Duration::from_millis(200)) {
                    if src == *from.0.public_key().as_bytes() && d == datagram {
                        arrived = true;
                        break;
                    }
                }
            }
            if !arrived {
                return Err(format!("datagram {tag} not relayed"));
            }
        }
        Ok(())
    }
}

const FLOOD_FRAME: usize = 64 << 10;

/// Registers a fresh key over a raw websocket and sends up to `frames`
/// frames of 64 KiB to that key (for at most 20 s), never reading. `paced`
/// sends 8 frames (under a 1 MiB queue) every 20 ms, so the relay's queue
/// drains into the socket until the kernel's buffers are full and output
/// then waits; unpaced, a fast sender mostly meets a full queue and its
/// frames are dropped, which leaves nothing waiting to write.
fn flood_own_key(server: &TunnelServer, frames: usize, paced: bool) -> (Ws, usize) {
    let key = PrivateKey::generate();
    let mut ws = register(server, &key);
    ws.get_ref()
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let datagram = vec![4u8; FLOOD_FRAME - relay::KEY_LEN];
    let frame = Bytes::from(relay::Frame::encode(key.public_key().as_bytes(), &datagram).unwrap());
    let t = Instant::now();
    let mut sent = 0;
    while sent < frames && t.elapsed() < Duration::from_secs(20) {
        if ws.send(Message::Binary(frame.clone())).is_err() {
            break;
        }
        sent += 1;
        if paced && sent % 8 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (ws, sent)
}

/// Once the flooders' sessions end, only the legitimate pair is left and
/// every queued byte is back in the budget.
fn assert_budget_given_back(server: &TunnelServer) {
    assert!(
        wait_until(WAIT, || {
            let s = server.relay_stats().unwrap();
            s.clients == 2 && s.queued_bytes == 0
        }),
        "{:?}",
        server.relay_stats()
    );
}

fn limits(queue_bytes: usize, budget_bytes: usize, write_timeout: Duration) -> RelayServerConfig {
    RelayServerConfig {
        queue_bytes,
        budget_bytes,
        write_timeout,
        // Only the write timeout may end a flooder that stops sending.
        idle: Duration::from_secs(120),
        ..Default::default()
    }
}

#[test]
fn relay_client_flooding_its_own_key_without_reading_holds_at_most_its_queue_bytes() {
    const QUEUE: usize = 256 << 10;
    let server = relay_server_with(limits(QUEUE, 64 << 20, Duration::from_secs(60)));
    let pair = LegitPair::start(&server);
    std::thread::scope(|s| {
        let flood = s.spawn(|| flood_own_key(&server, 1100, false));
        // The legitimate pair relays during the flood.
        let mut round = 0u8;
        while !flood.is_finished() && round < 50 {
            pair.relays(round).unwrap();
            round += 1;
        }
        let (ws, sent) = flood.join().unwrap();
        assert_eq!(sent, 1100, "the relay kept reading the flooder");
        let stats = server.relay_stats().unwrap();
        println!("one flooder: {stats:?}");
        assert!(
            stats.session_queued_bytes_peak <= QUEUE,
            "one session queued {} bytes, over its cap of {QUEUE}",
            stats.session_queued_bytes_peak
        );
        assert!(stats.dropped_full > 0, "{stats:?}");
        pair.relays(100).unwrap();
        // The session ends: every byte it held goes back to the budget.
        drop(ws);
        assert_budget_given_back(&server);
        pair.relays(101).unwrap();
    });
}

#[test]
fn relay_clients_flooding_without_reading_stay_within_the_global_budget() {
    const QUEUE: usize = 512 << 10;
    // The budget is one session's queue: any two flooders whose queues
    // fill at the same time overflow it. With twice the queue it took
    // three at once, which a loaded machine that runs the flooders one
    // after the other does not give (dropped_budget 0 with two full
    // queues at the peak).
    const BUDGET: usize = QUEUE;
    const FLOODERS: usize = 4;
    let server = relay_server_with(limits(QUEUE, BUDGET, Duration::from_secs(60)));
    let pair = LegitPair::start(&server);
    let flooders: Vec<(Ws, usize)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..FLOODERS)
            .map(|_| s.spawn(|| flood_own_key(&server, 300, false)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(flooders.iter().all(|(_, sent)| *sent == 300));
    let stats = server.relay_stats().unwrap();
    println!("{FLOODERS} flooders: {stats:?}");
    assert!(
        stats.queued_bytes_peak <= BUDGET,
        "the relay queued {} bytes in all, over its budget of {BUDGET}",
        stats.queued_bytes_peak
    );
    assert!(stats.session_queued_bytes_peak <= QUEUE, "{stats:?}");
    assert!(stats.dropped_budget > 0, "{stats:?}");
    // The flooders' queues hold the budget until their sessions end; then
    // it is all given back and the pair relays again.
    drop(flooders);
    assert_budget_given_back(&server);
    pair.relays(1).unwrap();
}

#[test]
fn relay_session_that_does_not_read_is_closed_after_the_write_timeout() {
    let server = relay_server_with(limits(1 << 20, 64 << 20, Duration::from_secs(1)));
    let pair = LegitPair::start(&server);
    // 400 frames (26 MB): more than the queue, the socket buffers and
    // tungstenite's write buffer take; then silence, still not reading.
    let (mut ws, sent) = flood_own_key(&server, 400, true);
    assert_eq!(sent, 400);
    let mut round = 0u8;
    let closed = wait_until(WAIT, || {
        // The legitimate pair relays while the flooder's writes stall.
        pair.relays(round).unwrap();
        round = round.wrapping_add(1);
        let s = server.relay_stats().unwrap();
        s.closed_slow == 1 && s.clients == 2
    });
    let stats = server.relay_stats().unwrap();
    println!("non-reading session: {stats:?}");
    assert!(closed, "the non-reading session was not closed: {stats:?}");
    // What the relay had already written still arrives, then the close.
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut frames = 0;
    while binary(&mut ws).is_some() {
        frames += 1;
        assert!(frames <= 400, "more frames than were sent");
    }
    assert!(
        wait_until(WAIT, || server.relay_stats().unwrap().queued_bytes == 0),
        "{:?}",
        server.relay_stats()
    );
    pair.relays(200).unwrap();
}

#[test]
fn relay_session_that_reads_slowly_is_not_closed() {
    const FRAMES: usize = 300;
    // Room for every frame: only the write timeout could lose any.
    let server = relay_server_with(limits(32 << 20, 64 << 20, Duration::from_secs(1)));
    // 300 frames (20 MB), more than the socket buffers take, for a client
    // that then takes one every 10 ms: output waits longer than the write
    // timeout, but every timeout sees progress.
    let (mut ws, sent) = flood_own_key(&server, FRAMES, false);
    assert_eq!(sent, FRAMES);
    let mut got = 0;
    let t = Instant::now();
    while got < FRAMES && t.elapsed() < Duration::from_secs(30) {
        assert!(
            binary(&mut ws).is_some(),
            "the slow reader's session ended after {got} frames: {:?}",
            server.relay_stats()
        );
        got += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = server.relay_stats().unwrap();
    assert_eq!(
        (got, stats.closed_slow, stats.clients),
        (FRAMES, 0, 1),
        "{stats:?}"
    );
}

#[test]
fn relay_limits_are_checked_when_the_server_starts() {
    let bad = |config: RelayServerConfig| {
        let mut c = ServerConfig::new("/v1-k3s/connect", None, ServerAuth::default());
        c.relay = Some(config);
        TunnelServer::bind(loopback(), c).err().unwrap().to_string()
    };
    let e = bad(limits(1000, 64 << 20, Duration::from_secs(1)));
    assert!(e.contains("below one largest frame"), "{e}");
    let e = bad(limits(2 << 20, 1 << 20, Duration::from_secs(1)));
    assert!(e.contains("below the queue bytes"), "{e}");
    let e = bad(limits(1 << 20, 2 << 20, Duration::ZERO));
    assert!(e.contains("write timeout"), "{e}");
}

/// Regression (hardening #8): a server with a client CA and no tokens
/// (`meshvpn tunnel serve --client-ca --relay`) demands a client
/// certificate in the TLS handshake, for the relay path too. A relay
/// client given one registers; one without is told what to pass, instead
/// of a bare TLS alert.
#[test]
fn relay_behind_a_client_ca_takes_a_client_certificate() {
    let pki = pki();
    let tls = tls::server_config(
        pki.server_cert.as_bytes(),
        pki.server_key.as_bytes(),
        Some(pki.ca_pem.as_bytes()),
        true,
    )
    .unwrap();
    let auth = ServerAuth {
        tokens: Vec::new(),
        client_cert_cn: true,
    };
    let mut config = ServerConfig::new("/v1-k3s/connect", Some(tls), auth);
    config.relay = Some(RelayServerConfig::default());
    let server = TunnelServer::bind(loopback(), config).unwrap();
    let (tx, _rx) = unbounded();
    let owner = Arc::new(Owner {
        key: PrivateKey::generate(),
        got: tx,
    });

    let without =
        RelayClient::start(relay_config(&pki, server.local_addr()), owner.clone()).unwrap();
    assert!(
        wait_until(WAIT, || without.status().last_error.is_some()),
        "{:?}",
        without.status()
    );
    let error = without.status().last_error.unwrap();
    assert!(
        error.contains("requires a client certificate")
            && error.contains("--relay-cert")
            && error.contains("client_cert_pem")
            && error.contains("ClientCertPEM"),
        "{error}"
    );
    assert!(!without.status().connected);
    drop(without);

    let mut with = relay_config(&pki, server.local_addr());
    with.tls = Some(
        tls::client_config(
            pki.ca_pem.as_bytes(),
            Some((pki.client_cert.as_bytes(), pki.client_key.as_bytes())),
        )
        .unwrap(),
    );
    let with = RelayClient::start(with, owner).unwrap();
    assert!(with.wait_connected(WAIT), "{:?}", with.status());
    assert_eq!(server.relay_stats().unwrap().clients, 1);
}

/// A relay owner that also records the addresses the relay says it sees.
struct Observer {
    key: PrivateKey,
    seen: Sender<SocketAddr>,
}

impl RelayOwner for Observer {
    fn static_secret(&self) -> Option<boringtun::x25519::StaticSecret> {
        Some(secret(&self.key))
    }
    fn deliver(&self, _: &[u8; 32], _: &[u8]) {}
    fn observed(&self, address: SocketAddr) {
        let _ = self.seen.send(address);
    }
}

/// After the key proof the relay tells the client the address it sees the
/// connection come from (its NAT's public address), once per session; the
/// control message is neither delivered as a datagram nor counted dropped.
#[test]
fn the_relay_tells_each_session_the_address_it_comes_from() {
    let pki = pki();
    let server = relay_server(Some(&pki));
    let (tx, rx) = unbounded();
    let owner = Arc::new(Observer {
        key: PrivateKey::generate(),
        seen: tx,
    });
    let c = RelayClient::start(relay_config(&pki, server.local_addr()), owner).unwrap();
    assert!(c.wait_connected(WAIT), "{:?}", c.status());
    let first = rx.recv_timeout(WAIT).expect("no observed address");
    assert_eq!(first.ip(), server.local_addr().ip(), "{first}");
    assert!(first.port() != 0 && first.port() != server.local_addr().port());
    // A new session: told again, from its new connection's port.
    c.reconnect();
    let second = rx
        .recv_timeout(WAIT)
        .expect("no address for the new session");
    assert_eq!(second.ip(), first.ip());
    assert_ne!(second.port(), first.port(), "the old session's address");
    assert!(rx.try_recv().is_err(), "more than one per session");
    let s = c.status();
    assert_eq!((s.frames_received, s.frames_dropped), (0, 0), "{s:?}");
}

/// A TCP proxy on loopback in front of the relay. `blackhole` makes every
/// connection open at that moment silently stop forwarding in both
/// directions, without closing: what a NAT that lost its mapping (or a
/// middlebox that dropped the flow) does to a TCP connection. Connections
/// accepted later forward normally, to the real relay.
struct BlackholeProxy {
    addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    holes: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    sockets: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl BlackholeProxy {
    fn start(to: SocketAddr) -> BlackholeProxy {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind(loopback()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = BlackholeProxy {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::new(AtomicUsize::new(0)),
            holes: Default::default(),
            sockets: Default::default(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (accepted, holes, sockets, stop) = (
            proxy.accepted.clone(),
            proxy.holes.clone(),
            proxy.sockets.clone(),
            proxy.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let Ok(upstream) = TcpStream::connect(to) else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let hole = Arc::new(AtomicBool::new(false));
                holes.lock().unwrap().push(hole.clone());
                let mut kept = sockets.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(upstream.try_clone().unwrap());
                drop(kept);
                for (from, to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let hole = hole.clone();
                    std::thread::spawn(move || forward(from, to, &hole));
                }
            }
        });
        proxy
    }

    /// Every connection open now stops forwarding (and stays open).
    fn blackhole(&self) {
        for hole in self.holes.lock().unwrap().iter() {
            hole.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies `from` to `to` until either ends; once `hole` is set, reads and
/// discards (no error, no close, no backpressure: the bytes just vanish).
fn forward(mut from: TcpStream, mut to: TcpStream, hole: &std::sync::atomic::AtomicBool) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hole.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !hole.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = to.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A relay client whose connection is blackholed (no close, no error: the
/// NAT in front of it lost the flow) notices within seconds once it sends
/// and nothing comes back, and registers again through a new connection.
/// The bound is the client's quiet time before its check ping (2 s) plus
/// that ping's deadline (3 s), plus 3 s of slack; without the check the
/// client only noticed at its 15 s ping's 60 s idle timeout.
#[test]
fn a_blackholed_relay_connection_is_replaced_within_seconds_once_the_client_sends() {
    const BOUND: Duration = Duration::from_secs(8);
    let pki = pki();
    let server = relay_server(Some(&pki));
    let proxy = BlackholeProxy::start(server.local_addr());
    let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
    let (tx, rx1) = unbounded();
    let owner = Arc::new(Owner {
        key: k1.clone(),
        got: tx,
    });
    let c1 = RelayClient::start(relay_config(&pki, proxy.addr), owner).unwrap();
    assert!(c1.wait_connected(WAIT), "{:?}", c1.status());
    let (c2, rx2) = client(&pki, &server, &k2);
    assert!(wait_until(WAIT, || server.relay_stats().unwrap().clients == 2));
    assert!(c1.send(k2.public_key().as_bytes(), b"\x04before"));
    assert_eq!(rx2.recv_timeout(WAIT).unwrap().1, b"\x04before");
    assert!(c2.send(k1.public_key().as_bytes(), b"\x04back"));
    assert_eq!(rx1.recv_timeout(WAIT).unwrap().1, b"\x04back");
    assert_eq!(proxy.accepted(), 1);

    proxy.blackhole();
    let start = Instant::now();
    // The client keeps sending (a peer moved to the relay, say), a frame
    // every 200 ms, until it has a new session or the bound passes.
    let mut sent = 0u32;
    while c1.status().sessions < 2 && start.elapsed() < BOUND {
        c1.send(k2.public_key().as_bytes(), b"\x04into the hole");
        sent += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    assert!(
        c1.status().sessions >= 2,
        "no new relay session within {BOUND:?} of the blackhole ({sent} frames sent): {:?}",
        c1.status()
    );
    println!("blackholed relay connection replaced after {took:?}");
    assert!(c1.wait_connected(WAIT), "{:?}", c1.status());
    assert_eq!(proxy.accepted(), 2, "the new session's fresh connection");
    while rx2.try_recv().is_ok() {}
    // Frames flow both ways on the new session, through the real relay.
    assert!(wait_until(WAIT, || {
        c1.send(k2.public_key().as_bytes(), b"\x04after");
        rx2.recv_timeout(Duration::from_millis(200))
            .is_ok_and(|(_, d)| d == b"\x04after")
    }));
    assert!(wait_until(WAIT, || {
        c2.send(k1.public_key().as_bytes(), b"\x04back after");
        rx1.recv_timeout(Duration::from_millis(200))
            .is_ok_and(|(_, d)| d == b"\x04back after")
    }));
}

/// The engine checks its relay session at once when it rediscovers (the
/// network changed, or a direct path was given up): a blackholed session
/// that has sent nothing is replaced within the check ping's deadline
/// (3 s) plus 2 s of slack, not at the next 15 s keepalive ping.
#[test]
fn a_rediscovery_checks_the_relay_session_at_once() {
    const BOUND: Duration = Duration::from_secs(5);
    let pki = pki();
    let server = relay_server(Some(&pki));
    let proxy = BlackholeProxy::start(server.local_addr());
    let nodes = mesh(1, false);
    let engine = &nodes[0].engine;
    engine.start_relay(relay_config(&pki, proxy.addr)).unwrap();
    assert!(
        engine.wait_relay_connected(WAIT),
        "{:?}",
        engine.relay_status()
    );
    assert_eq!(engine.relay_status().unwrap().sessions, 1);

    proxy.blackhole();
    let start = Instant::now();
    engine.rediscover();
    let replaced = wait_until(BOUND, || engine.relay_status().unwrap().sessions >= 2);
    assert!(
        replaced,
        "the relay session was not checked: no new session within {BOUND:?} of the rediscovery: {:?}",
        engine.relay_status()
    );
    println!("checked and replaced after {:?}", start.elapsed());
    assert!(engine.wait_relay_connected(WAIT));
    assert_eq!(proxy.accepted(), 2);
}
