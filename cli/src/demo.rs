//! `meshvpn demo`: a mesh of engines in this process on loopback UDP, no
//! root, no TUN. They handshake; UDP echoes time the round trips; a TCP
//! transfer runs through the userspace stacks of two engines; a supervisor
//! tunnel server (TLS websocket, remotedialer protocol) dials back through
//! an agent to its "kubelet"; and a table shows each peer's handshake age,
//! transfer and round-trip time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use std::io::{Read, Write};

use meshvpn_engine::netstack::{Netstack, NetstackConfig};
use meshvpn_engine::supervisor::{
    Agent, AgentConfig, AllowList, OsDialer, ServerAuth, ServerConfig, TunnelServer,
};
use meshvpn_engine::ws;
use meshvpn_engine::{Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PrivateKey};

/// Arguments of `meshvpn demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// How many engines to run (each a peer of every other).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=16))]
    pub nodes: u8,
    /// Round trips to time per pair of engines.
    #[arg(long, default_value_t = 200)]
    pub pings: u32,
    /// MiB to send over TCP through the userspace stacks.
    #[arg(long, default_value_t = 64)]
    pub tcp_mib: u32,
}

struct Node {
    name: String,
    addr: Ipv4Addr,
    engine: Arc<Engine>,
    /// Echo replies that reached this node: (from, payload).
    replies: mpsc::Receiver<(Ipv4Addr, Vec<u8>)>,
    replies_tx: mpsc::Sender<(Ipv4Addr, Vec<u8>)>,
}

const NAMES: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

pub fn run(args: &DemoArgs) -> Result<(), String> {
    let n = args.nodes as usize;
    println!("meshvpn demo: {n} engines on 127.0.0.1, each a WireGuard peer of every other\n");
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let mut nodes = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let addr = Ipv4Addr::new(10, 99, 0, i as u8 + 1);
        let cfg = Config {
            interface: InterfaceConfig {
                private_key: Some(key.clone()),
                listen_port: Some(0),
                addresses: vec![IpPrefix::new(IpAddr::V4(addr), 24).expect("valid prefix")],
                ..Default::default()
            },
            peers: vec![],
        };
        let engine = Engine::new(&cfg).map_err(|e| format!("starting engine {i}: {e}"))?;
        println!(
            "  {:<8} {:<12} udp 127.0.0.1:{:<5}  public key {}",
            NAMES[i],
            addr,
            engine.listen_port(),
            key.public_key()
        );
        let (replies_tx, replies) = mpsc::channel();
        nodes.push(Node {
            name: NAMES[i].to_string(),
            addr,
            engine: Arc::new(engine),
            replies,
            replies_tx,
        });
    }
    for a in &nodes {
        for (j, b) in nodes.iter().enumerate() {
            if a.addr == b.addr {
                continue;
            }
            let mut p = PeerConfig::new(keys[j].public_key());
            p.endpoint = Some(SocketAddr::new(
                Ipv4Addr::LOCALHOST.into(),
                b.engine.listen_port(),
            ));
            p.allowed_ips = vec![IpPrefix::host(IpAddr::V4(b.addr))];
            a.engine.add_peer(&p).map_err(|e| e.to_string())?;
        }
    }

    // Handshakes: every engine starts one with every peer.
    let t0 = Instant::now();
    for a in &nodes {
        for k in a.engine.peer_keys() {
            a.engine.initiate_handshake(&k).map_err(|e| e.to_string())?;
        }
    }
    let all_up = || {
        nodes.iter().all(|a| {
            a.engine
                .all_peer_stats()
                .iter()
                .all(|s| s.last_handshake.is_some())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_up() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !all_up() {
        return Err("handshakes did not complete within 10 s".into());
    }
    println!(
        "\nhandshakes: all {} pairs up in {:.1} ms",
        n * (n - 1) / 2,
        t0.elapsed().as_secs_f64() * 1e3
    );

    // Every engine echoes UDP datagrams addressed to it back to the sender.
    let stop = Arc::new(AtomicBool::new(false));
    let echoers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let engine = node.engine.clone();
            let stop = stop.clone();
            let replies = node.replies_tx.clone();
            std::thread::spawn(move || echo_loop(&engine, &stop, &replies))
        })
        .collect();

    println!(
        "\nround trips through the tunnels ({} per pair, UDP echo via the packet API):",
        args.pings
    );
    let mut rtts = Vec::new();
    for a in &nodes {
        for b in &nodes {
            if a.addr == b.addr {
                continue;
            }
            let median = ping_pair(a, b, args.pings)
                .ok_or_else(|| format!("{} -> {}: no echo came back", a.name, b.name))?;
            println!(
                "  {:<8} -> {:<8} median {:.0} µs",
                a.name,
                b.name,
                median.as_secs_f64() * 1e6
            );
            rtts.push((a.name.clone(), b.name.clone(), median));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for e in echoers {
        let _ = e.join();
    }

    tcp_through_userspace_stacks(&nodes[0], &nodes[1], args.tcp_mib)?;
    supervisor_tunnel()?;

    println!(
        "\n{:<8} {:<8} {:<21} {:>10} {:>12} {:>12} {:>9} {:>10}",
        "engine", "peer", "endpoint", "handshake", "sent", "received", "drops", "rtt p50"
    );
    for a in &nodes {
        for s in a.engine.all_peer_stats() {
            let peer = nodes
                .iter()
                .find(|b| b.engine.public_key() == Some(s.public_key))
                .expect("peer is a node");
            let age = s
                .last_handshake
                .and_then(|t| t.elapsed().ok())
                .map(|d| format!("{:.1}s ago", d.as_secs_f64()))
                .unwrap_or_else(|| "never".into());
            let rtt = rtts
                .iter()
                .find(|(x, y, _)| *x == a.name && *y == peer.name)
                .map(|r| format!("{:.0} µs", r.2.as_secs_f64() * 1e6))
                .unwrap_or_default();
            println!(
                "{:<8} {:<8} {:<21} {:>10} {:>12} {:>12} {:>9} {:>10}",
                a.name,
                peer.name,
                s.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                age,
                human_bytes(s.tx_bytes),
                human_bytes(s.rx_bytes),
                s.total_drops(),
                rtt
            );
        }
    }
    for node in &nodes {
        node.engine.close();
    }
    println!("\nall engines closed cleanly");
    Ok(())
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 10 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

const ECHO_PORT: u16 = 7;

/// An IPv4/UDP datagram (checksum 0: "none", valid for UDP over IPv4).
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parsed (src, dst, sport, dport, payload) of an IPv4/UDP packet.
fn parse_udp4(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16, &[u8])> {
    if p.len() < 28 || p[0] != 0x45 || p[9] != 17 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    Some((
        src,
        dst,
        u16::from_be_bytes([p[20], p[21]]),
        u16::from_be_bytes([p[22], p[23]]),
        &p[28..],
    ))
}

/// Reads everything decrypted for one engine: answers echo requests and
/// hands echo replies to whoever is timing round trips.
fn echo_loop(engine: &Engine, stop: &AtomicBool, replies: &mpsc::Sender<(Ipv4Addr, Vec<u8>)>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(pkt) = engine.recv_packet(Duration::from_millis(50)) else {
            continue;
        };
        match parse_udp4(&pkt) {
            Some((src, dst, sport, ECHO_PORT, payload)) => {
                let _ = engine.send_packet(&udp4(dst, src, ECHO_PORT, sport, payload));
            }
            Some((src, _, ECHO_PORT, _, payload)) => {
                let _ = replies.send((src, payload.to_vec()));
            }
            _ => {}
        }
    }
}

/// Times `count` echo round trips from `a` to `b`: the median, or None if
/// nothing came back.
fn ping_pair(a: &Node, b: &Node, count: u32) -> Option<Duration> {
    let mut samples = Vec::new();
    for seq in 0..count {
        let payload = seq.to_be_bytes();
        let t = Instant::now();
        a.engine
            .send_packet(&udp4(a.addr, b.addr, 40000, ECHO_PORT, &payload))
            .ok()?;
        let deadline = t + Duration::from_secs(1);
        while let Ok((from, p)) = a
            .replies
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if from == b.addr && p == payload {
                samples.push(t.elapsed());
                break;
            }
        }
    }
    samples.sort();
    samples.get(samples.len() / 2).copied()
}

/// FNV-1a over a byte stream: enough to tell the receiver got exactly the
/// bytes the sender wrote.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= b as u64;
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// `a` dials `b` over TCP through both engines' userspace stacks (no TUN,
/// no root) and sends `mib` MiB; `b` hashes what arrives.
fn tcp_through_userspace_stacks(a: &Node, b: &Node, mib: u32) -> Result<(), String> {
    let err = |e: meshvpn_engine::netstack::NetstackError| e.to_string();
    let stack_a = Netstack::attach(&a.engine, NetstackConfig::default()).map_err(err)?;
    let stack_b = Netstack::attach(&b.engine, NetstackConfig::default()).map_err(err)?;
    let listen = SocketAddr::new(IpAddr::V4(b.addr), 8080);
    let listener = stack_b.tcp_listen(listen, 4).map_err(err)?;
    let total = mib as usize * (1 << 20);
    let receiver = std::thread::spawn(move || -> Result<(usize, u64), String> {
        let (mut conn, _) = listener
            .accept_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut hash = FNV_OFFSET;
        let mut got = 0;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    fnv1a(&mut hash, &buf[..n]);
                    got += n;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok((got, hash))
    });
    let t = Instant::now();
    let mut conn = stack_a
        .tcp_connect(listen, Some(Duration::from_secs(10)))
        .map_err(err)?;
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut sent_hash = FNV_OFFSET;
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        conn.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        fnv1a(&mut sent_hash, &chunk[..n]);
        sent += n;
    }
    conn.shutdown_write().map_err(err)?;
    let (got, got_hash) = receiver
        .join()
        .map_err(|_| "receiver panicked".to_string())??;
    let secs = t.elapsed().as_secs_f64();
    conn.close();
    if got != total || got_hash != sent_hash {
        return Err(format!(
            "TCP transfer corrupted: sent {total} bytes, received {got}"
        ));
    }
    println!(
        "\nTCP through the userspace stacks: {} -> {}:8080, {mib} MiB in {:.2} s ({:.2} Gbit/s), hash verified",
        a.name,
        b.addr,
        secs,
        total as f64 * 8.0 / secs / 1e9
    );
    stack_a.close();
    stack_b.close();
    Ok(())
}

/// A throwaway CA, a server certificate for 127.0.0.1, and a k3s-style node
/// client certificate (CN system:node:NAME, O system:nodes).
struct DemoPki {
    ca: String,
    server_cert: String,
    server_key: String,
    node_cert: String,
    node_key: String,
}

fn demo_pki(node: &str) -> Result<DemoPki, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "meshvpn demo CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let server_key = KeyPair::generate()?;
    let mut sp = CertificateParams::new(vec!["localhost".to_string()])?;
    sp.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key)?;
    let node_key = KeyPair::generate()?;
    let mut np = CertificateParams::new(Vec::new())?;
    np.distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    np.distinguished_name
        .push(DnType::CommonName, format!("system:node:{node}"));
    let node_cert = np.signed_by(&node_key, &ca_cert, &ca_key)?;
    Ok(DemoPki {
        ca: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        node_cert: node_cert.pem(),
        node_key: node_key.serialize_pem(),
    })
}

/// The k3s supervisor path: an agent opens a TLS websocket to the server,
/// authenticating with its node certificate; the server then dials back
/// through it to the agent's "kubelet" (a local HTTP responder standing in
/// for it) and gets an answer.
fn supervisor_tunnel() -> Result<(), String> {
    let e = |e: ws::TunnelError| e.to_string();
    let pki = demo_pki("bravo").map_err(|e| e.to_string())?;
    let kubelet = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let kubelet_addr = kubelet.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = kubelet.accept() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let server_tls = ws::tls::server_config(
        pki.server_cert.as_bytes(),
        pki.server_key.as_bytes(),
        Some(pki.ca.as_bytes()),
        true,
    )
    .map_err(e)?;
    let auth = ServerAuth {
        client_cert_cn: true,
        ..Default::default()
    };
    let server = TunnelServer::bind(
        "127.0.0.1:0".parse().expect("literal address"),
        ServerConfig::new("/v1-k3s/connect", Some(server_tls), auth),
    )
    .map_err(e)?;
    let target = format!("tcp/{kubelet_addr}");
    let policy = AllowList(vec![target.parse()?]);
    let mut cfg = AgentConfig::new(
        format!("wss://{}/v1-k3s/connect", server.local_addr()),
        Arc::new(policy),
        Arc::new(OsDialer::default()),
    );
    cfg.tls = Some(
        ws::tls::client_config(
            pki.ca.as_bytes(),
            Some((pki.node_cert.as_bytes(), pki.node_key.as_bytes())),
        )
        .map_err(e)?,
    );
    let t = Instant::now();
    let agent = Agent::start(cfg).map_err(e)?;
    let client_key = "system:node:bravo";
    if !server.wait_for_client(client_key, Duration::from_secs(10)) {
        return Err(format!(
            "the agent did not connect: {:?}",
            agent.status().last_error
        ));
    }
    let connected = t.elapsed();
    let mut stream = server
        .dial(client_key, "tcp", &kubelet_addr.to_string())
        .map_err(e)?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kubelet\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    let status = reply.lines().next().unwrap_or("").to_string();
    if !status.contains("200") {
        return Err(format!("the kubelet stand-in answered `{status}`"));
    }
    println!(
        "\nsupervisor tunnel: agent `{client_key}` connected over TLS websocket in {:.1} ms; \
         the server dialed back to {kubelet_addr} through it and got `{status}`",
        connected.as_secs_f64() * 1e3
    );
    agent.stop();
    server.shutdown();
    Ok(())
}
