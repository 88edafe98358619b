//! The node side as a library (`meshvpn_control::join::Node`), as C and Go
//! use it: userspace nodes (the engine's netstack, no TUN) joined to a
//! control server on loopback reach each other over WireGuard, the
//! policy's packet filter refuses a denied port and a live policy change
//! opens it, key refusals come back with their own code, and a refused
//! route arrives as an event.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshvpn_control::join::{Event, JoinConfig, JoinError, Node};
use meshvpn_control::keys::{self, KeyOptions};
use meshvpn_control::proto::{ErrorCode, CONTROL_PATH};
use meshvpn_control::server::{ControlServer, ControlServerConfig};
use meshvpn_control::store::{SqliteStore, Store, StoreConfig};
use meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer};
use meshvpn_engine::{NetstackConfig, NetstackError, PrivateKey};
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

const WAIT: Duration = Duration::from_secs(15);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Mesh {
    _dir: TempDir,
    tunnel: TunnelServer,
    _control: ControlServer,
    cli: SqliteStore,
}

impl Mesh {
    fn start(name: &str) -> Mesh {
        let dir = std::env::temp_dir().join(format!("meshvpn-join-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("control.db");
        let store = Arc::new(SqliteStore::open(&db, &StoreConfig::default()).unwrap());
        let control = ControlServer::start(store, ControlServerConfig::default()).unwrap();
        let mut tc = ServerConfig::new("/v1-k3s/connect", None, ServerAuth::default());
        tc.extra.push(control.route());
        let tunnel = TunnelServer::bind("127.0.0.1:0".parse().unwrap(), tc).unwrap();
        let cli = SqliteStore::open(&db, &StoreConfig::default()).unwrap();
        Mesh {
            _dir: TempDir(dir),
            tunnel,
            _control: control,
            cli,
        }
    }

    fn key(&self, opts: KeyOptions, created: u64) -> Zeroizing<String> {
        keys::create(&self.cli, &opts, created, &SystemRandom::new())
            .unwrap()
            .text
    }

    fn config(&self, key: Zeroizing<String>, host: &str) -> JoinConfig {
        let mut c = JoinConfig::new(format!("ws://{}{CONTROL_PATH}", self.tunnel.local_addr()));
        c.join_key = Some(key);
        c.hostname = host.into();
        c.netstack = Some(NetstackConfig::default());
        c.backoff_initial = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(500);
        c
    }

    fn join(&self, config: JoinConfig) -> Result<Node, JoinError> {
        Node::join(
            config,
            PrivateKey::generate(),
            0,
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            WAIT,
        )
    }
}

/// Waits for an event matching `want`, skipping others.
fn event(node: &Node, what: &str, want: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(e) = node.next_event(Duration::from_millis(200)) {
            if want(&e) {
                return e;
            }
        }
    }
    panic!("no {what} event within {WAIT:?}");
}

/// One echo over a netstack TCP connection to `to`.
fn echo(from: &Node, to: SocketAddr, timeout: Duration) -> Result<(), String> {
    let ns = from.netstack().expect("a userspace node has its netstack");
    let mut s = ns
        .tcp_connect(to, Some(timeout))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

fn serve_echo(node: &Node, port: u16) {
    let ns = node.netstack().unwrap();
    let ip = node.status().node.unwrap().ipv4;
    let l = ns
        .tcp_listen(SocketAddr::new(IpAddr::V4(ip), port), 16)
        .unwrap();
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = l.accept_timeout(None) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[test]
fn userspace_nodes_reach_each_other_and_the_policy_refuses_a_denied_port() {
    let mesh = Mesh::start("userspace");
    let reusable = KeyOptions {
        reusable: true,
        ..Default::default()
    };
    let key = mesh.key(reusable, now());
    let a = mesh.join(mesh.config(key.clone(), "a")).expect("a joins");
    let b = mesh.join(mesh.config(key, "b")).expect("b joins");
    let b_ip = IpAddr::V4(b.status().node.unwrap().ipv4);
    serve_echo(&b, 8080);
    serve_echo(&b, 9090);
    let wait_peer = |n: &Node| {
        let deadline = Instant::now() + WAIT;
        while n.status().peers.is_empty() {
            assert!(Instant::now() < deadline, "the map never named the peer");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_peer(&a);
    wait_peer(&b);

    // No policy: allow all between nodes.
    echo(&a, SocketAddr::new(b_ip, 8080), WAIT).expect("a reaches b over the mesh");
    echo(&a, SocketAddr::new(b_ip, 9090), WAIT).expect("no policy: every port");

    // Only 8080 allowed: the filter in b's engine drops a's SYN to 9090.
    let v = mesh
        .cli
        .set_policy(
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:8080"]}]}"#,
            now(),
        )
        .unwrap();
    for n in [&a, &b] {
        event(
            n,
            "policy change",
            |e| matches!(e, Event::PolicyChanged { version } if *version == v),
        );
    }
    let t = Instant::now();
    let denied = echo(&a, SocketAddr::new(b_ip, 9090), Duration::from_secs(2));
    let took = t.elapsed();
    println!("denied port: {denied:?} after {took:?}");
    assert!(
        denied.is_err(),
        "port 9090 is not in the policy, yet a reached it"
    );
    // a's engine refuses its own SYN and answers it with a RST, so the
    // connect fails at once rather than by its 2 s timeout.
    assert!(
        took < Duration::from_millis(500),
        "the denied connect took {took:?}, not failing fast: {denied:?}"
    );
    assert!(
        a.engine().filter_rejects().0 > 0,
        "a's engine answered no refused SYN"
    );
    echo(&a, SocketAddr::new(b_ip, 8080), WAIT).expect("8080 is allowed");
    // UDP to the refused port: a's engine answers the datagram with an
    // ICMP admin-prohibited, and a's netstack fails the connected socket
    // with "connection refused" rather than leaving it to its timeout.
    let a_ip = IpAddr::V4(a.status().node.unwrap().ipv4);
    let ns = a.netstack().unwrap();
    let answers = a.engine().filter_rejects().0;
    let udp = ns.udp_bind(SocketAddr::new(a_ip, 0)).unwrap();
    udp.connect(SocketAddr::new(b_ip, 9090)).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2)));
    let t = Instant::now();
    udp.send(b"ping").unwrap();
    let got = udp.recv(&mut [0u8; 64]);
    let took = t.elapsed();
    println!("denied UDP port: {got:?} after {took:?}");
    assert_eq!(got, Err(NetstackError::Refused), "after {took:?}");
    assert!(
        took < Duration::from_millis(500),
        "the refused datagram's error took {took:?}"
    );
    assert!(
        a.engine().filter_rejects().0 > answers,
        "a's engine answered no refused datagram"
    );
    // Reported once, as Linux's sk_err; the allowed port's answer comes
    // back on the same socket once connected there.
    udp.set_read_timeout(Some(Duration::from_millis(300)));
    assert_eq!(udp.recv(&mut [0u8; 64]), Err(NetstackError::TimedOut));
    let server = b
        .netstack()
        .unwrap()
        .udp_bind(SocketAddr::new(b_ip, 8080))
        .unwrap();
    server.set_read_timeout(Some(WAIT));
    udp.connect(SocketAddr::new(b_ip, 8080)).unwrap();
    udp.send(b"ping").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).expect("UDP 8080 is allowed");
    server.send_to(&buf[..n], from).unwrap();
    udp.set_read_timeout(Some(WAIT));
    let n = udp.recv(&mut buf).expect("the answer from 8080");
    assert_eq!(&buf[..n], b"ping");
    // Dropped by a's engine at send or by b's on arrival, and counted.
    let drops = a.engine().stats().filter_outbound_denied + b.engine().stats().filter_not_allowed;
    assert!(drops > 0, "no engine counted a filter drop");

    // A live change opens it.
    mesh.cli
        .set_policy(
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:8080,9090"]}]}"#,
            now(),
        )
        .unwrap();
    let t = Instant::now();
    loop {
        match echo(&a, SocketAddr::new(b_ip, 9090), Duration::from_secs(1)) {
            Ok(()) => break,
            Err(e) => assert!(t.elapsed() < WAIT, "9090 never opened: {e}"),
        }
    }
    println!("9090 open {:?} after the policy change", t.elapsed());
    a.close();
    b.close();
}

#[test]
fn key_refusals_come_back_with_their_code_and_a_refused_route_is_an_event() {
    let mesh = Mesh::start("refusals");
    let expired = mesh.key(
        KeyOptions {
            expiry: Some(Duration::from_secs(60)),
            ..Default::default()
        },
        now() - 3600,
    );
    let e = mesh.join(mesh.config(expired, "x")).err().expect("refused");
    assert_eq!(e.code(), Some(ErrorCode::KeyExpired), "{e}");

    let revoked = mesh.key(KeyOptions::default(), now());
    let id = keys::parse(&revoked).unwrap().id;
    assert!(mesh.cli.revoke_key(&id, now()).unwrap());
    let e = mesh.join(mesh.config(revoked, "y")).err().expect("refused");
    assert_eq!(e.code(), Some(ErrorCode::KeyRevoked), "{e}");
    assert_ne!(
        e.to_string(),
        mesh.join(mesh.config(
            mesh.key(
                KeyOptions {
                    expiry: Some(Duration::from_secs(60)),
                    ..Default::default()
                },
                now() - 3600
            ),
            "z"
        ))
        .err()
        .unwrap()
        .to_string(),
        "expired and revoked read differently"
    );

    // Two clusters on one pod CIDR: the second is refused, as an event.
    let key_for = |cluster: &str| {
        mesh.key(
            KeyOptions {
                cluster: Some(cluster.into()),
                ..Default::default()
            },
            now(),
        )
    };
    let mut one = mesh.config(key_for("one"), "one");
    one.advertise_routes = vec!["10.42.0.0/16".parse().unwrap()];
    let one = mesh.join(one).expect("one joins");
    let id = one.status().node.unwrap().node_id;
    let policy = meshvpn_control::routes::stored_policy(&mesh.cli).unwrap();
    meshvpn_control::routes::approve(
        &mesh.cli,
        policy.as_ref(),
        id,
        "10.42.0.0/16".parse().unwrap(),
        now(),
    )
    .unwrap();
    let mut two = mesh.config(key_for("two"), "two");
    two.advertise_routes = vec!["10.42.0.0/16".parse().unwrap()];
    let two = mesh.join(two).expect("two joins");
    let e = event(
        &two,
        "route refused",
        |e| matches!(e, Event::Route { status, .. } if status == "refused"),
    );
    let Event::Route { reason, .. } = e else {
        unreachable!()
    };
    let why = reason.expect("a refusal says why");
    assert!(
        why.contains("one"),
        "the reason names the other side: {why}"
    );
    // The status says it too (updated right after the event is queued).
    let deadline = Instant::now() + WAIT;
    while !two.status().routes.iter().any(|r| r.reason.is_some()) {
        assert!(
            Instant::now() < deadline,
            "the status never showed the refusal"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
