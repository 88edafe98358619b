//! The control server and node client over real sockets: registration with
//! every join-key error, the key proof, the full map then deltas, changes
//! made from another store handle (as the `meshvpn control` CLI, another
//! process, makes them) reaching every node within 1 s, removal closing
//! the node's session and refusing its key, and the session caps.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::x25519::StaticSecret;
use meshvpn_control::client::{ControlClient, ControlClientConfig, JoinRequest, NodeState};
use meshvpn_control::keys::{self, KeyOptions};
use meshvpn_control::proto::{ErrorCode, CONTROL_PATH};
use meshvpn_control::server::{ControlServer, ControlServerConfig};
use meshvpn_control::store::{SqliteStore, Store, StoreConfig};
use meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer};
use meshvpn_engine::PrivateKey;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

const WAIT: Duration = Duration::from_secs(15);
/// The promise: a change reaches every connected node within this.
const DELIVERY: Duration = Duration::from_secs(1);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        Self::under(std::env::temp_dir(), name)
    }

    fn under(base: PathBuf, name: &str) -> Self {
        let dir = base.join(format!("meshvpn-ctlserver-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A control server on a plain (test) tunnel listener, plus a second
/// store handle standing for the operator's CLI.
struct Mesh {
    _dir: TempDir,
    tunnel: TunnelServer,
    control: ControlServer,
    cli: SqliteStore,
}

impl Mesh {
    fn start(name: &str, edit: impl FnOnce(&mut ControlServerConfig)) -> Mesh {
        Self::start_in(TempDir::new(name), edit)
    }

    fn start_in(dir: TempDir, edit: impl FnOnce(&mut ControlServerConfig)) -> Mesh {
        let db = dir.0.join("control.db");
        let store = Arc::new(SqliteStore::open(&db, &StoreConfig::default()).unwrap());
        let mut config = ControlServerConfig::default();
        edit(&mut config);
        let control = ControlServer::start(store, config).unwrap();
        let mut tc = ServerConfig::new("/v1-k3s/connect", None, ServerAuth::default());
        tc.extra.push(control.route());
        tc.max_handshakes_per_source = 256;
        let tunnel = TunnelServer::bind("127.0.0.1:0".parse().unwrap(), tc).unwrap();
        let cli = SqliteStore::open(&db, &StoreConfig::default()).unwrap();
        Mesh {
            _dir: dir,
            tunnel,
            control,
            cli,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}{CONTROL_PATH}", self.tunnel.local_addr())
    }

    fn key(&self, opts: KeyOptions) -> Zeroizing<String> {
        keys::create(&self.cli, &opts, now(), &SystemRandom::new())
            .unwrap()
            .text
    }

    fn join(
        &self,
        key: Option<&Zeroizing<String>>,
        host: &str,
        secret: &StaticSecret,
    ) -> ControlClient {
        let request = JoinRequest {
            join_key: key.cloned(),
            hostname: host.into(),
            routes: vec![],
            tags: vec![],
            endpoints: vec!["192.0.2.7:51820".parse().unwrap()],
        };
        self.join_with(request, secret)
    }

    fn join_with(&self, request: JoinRequest, secret: &StaticSecret) -> ControlClient {
        let mut config = ControlClientConfig::new(self.url(), request);
        config.backoff_initial = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        ControlClient::start(config, secret.clone()).unwrap()
    }
}

fn secret() -> StaticSecret {
    StaticSecret::from(*PrivateKey::generate().as_bytes())
}

fn refused_with(client: &ControlClient) -> Option<ErrorCode> {
    client.wait(WAIT, |_, st| st.fatal.is_some());
    match client.status().fatal {
        Some(meshvpn_control::client::ClientError::Refused { code, .. }) => Some(code),
        _ => None,
    }
}

#[test]
fn every_join_key_problem_reaches_the_node_as_its_own_error() {
    let mesh = Mesh::start("keys", |_| {});
    let good = mesh.key(KeyOptions::default());
    let a = mesh.join(Some(&good), "a", &secret());
    assert!(a.wait(WAIT, |s, _| s.has_map()), "{:?}", a.status());

    // Single-use, already used by a (another node key).
    let reused = mesh.join(Some(&good), "b", &secret());
    assert_eq!(refused_with(&reused), Some(ErrorCode::KeyReused));
    let text = reused.status().fatal.unwrap().to_string();
    assert!(text.contains("single-use"), "{text}");

    let expired = keys::create(
        &mesh.cli,
        &KeyOptions {
            expiry: Some(Duration::from_secs(60)),
            ..Default::default()
        },
        now() - 3600,
        &SystemRandom::new(),
    )
    .unwrap()
    .text;
    let c = mesh.join(Some(&expired), "c", &secret());
    assert_eq!(refused_with(&c), Some(ErrorCode::KeyExpired));

    let revoked = mesh.key(KeyOptions::default());
    let id = keys::parse(&revoked).unwrap().id;
    assert!(mesh.cli.revoke_key(&id, now()).unwrap());
    let d = mesh.join(Some(&revoked), "d", &secret());
    assert_eq!(refused_with(&d), Some(ErrorCode::KeyRevoked));

    let malformed = Zeroizing::new("mvpn-key-nothex".to_string());
    let e = mesh.join(Some(&malformed), "e", &secret());
    assert_eq!(refused_with(&e), Some(ErrorCode::KeyMalformed));

    // Right shape, wrong secret.
    let mut unknown = good.to_string();
    unknown.replace_range(unknown.len() - 4.., "0000");
    let f = mesh.join(Some(&Zeroizing::new(unknown)), "f", &secret());
    assert_eq!(refused_with(&f), Some(ErrorCode::KeyUnknown));

    // No key and never registered.
    let g = mesh.join(None, "g", &secret());
    assert_eq!(refused_with(&g), Some(ErrorCode::NodeUnknown));

    // A tag the key does not grant is refused before the key is used.
    let tagged = mesh.key(KeyOptions {
        tags: vec!["tag:k3s".into()],
        ..Default::default()
    });
    let h = mesh.join_with(
        JoinRequest {
            join_key: Some(tagged.clone()),
            hostname: "h".into(),
            tags: vec!["tag:admin".into()],
            ..Default::default()
        },
        &secret(),
    );
    assert_eq!(refused_with(&h), Some(ErrorCode::TagNotPermitted));
    let i = mesh.join_with(
        JoinRequest {
            join_key: Some(tagged),
            hostname: "i".into(),
            tags: vec!["tag:k3s".into()],
            ..Default::default()
        },
        &secret(),
    );
    assert!(i.wait(WAIT, |s, _| s.has_map()), "{:?}", i.status());
    assert_eq!(i.state().node.unwrap().tags, vec!["tag:k3s".to_string()]);
    assert!(mesh.control.stats().refused >= 7);
}

#[test]
fn a_node_reconnects_with_its_key_alone_and_keeps_its_addresses() {
    let mesh = Mesh::start("rejoin", |_| {});
    let key = mesh.key(KeyOptions::default());
    let s = secret();
    let first = mesh.join(Some(&key), "web", &s);
    assert!(first.wait(WAIT, |s, _| s.has_map()));
    let info = first.state().node.unwrap();
    drop(first);
    // The single-use key is spent; the node key proves the node.
    let again = mesh.join(None, "web", &s);
    assert!(again.wait(WAIT, |s, _| s.has_map()), "{:?}", again.status());
    assert_eq!(again.state().node.unwrap(), info);
}

/// Waits until every client's state satisfies `done`; returns the time it
/// took, or panics after `limit` naming the first laggard.
fn all_within(
    clients: &[ControlClient],
    limit: Duration,
    what: &str,
    done: impl Fn(&NodeState) -> bool + Copy,
) -> Duration {
    let start = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        let left = limit.saturating_sub(start.elapsed());
        assert!(
            c.wait(left, |s, _| done(s)),
            "{what}: node {i} not there after {:?}: {} peers, {:?}",
            start.elapsed(),
            c.state().peers.len(),
            c.status()
        );
    }
    start.elapsed()
}

#[test]
fn twenty_nodes_converge_and_every_change_reaches_all_within_a_second() {
    const N: usize = 20;
    let mesh = Mesh::start("twenty", |_| {});
    let key = mesh.key(KeyOptions {
        reusable: true,
        ..Default::default()
    });
    let start = Instant::now();
    let secrets: Vec<StaticSecret> = (0..N).map(|_| secret()).collect();
    let mut clients: Vec<ControlClient> = (0..N)
        .map(|i| {
            mesh.join_with(
                JoinRequest {
                    join_key: Some(key.clone()),
                    hostname: format!("node{i}"),
                    routes: vec![format!("10.42.{i}.0/24").parse().unwrap()],
                    endpoints: vec![format!("192.0.2.{}:51820", i + 1).parse().unwrap()],
                    ..Default::default()
                },
                &secrets[i],
            )
        })
        .collect();
    let converged = all_within(&clients, WAIT, "convergence", |s| {
        s.peers.len() == N - 1 && s.peers.values().all(|p| p.online)
    });
    println!(
        "{N} nodes: converged map on every node {:?} after the first join ({converged:?} waiting)",
        start.elapsed()
    );

    // Endpoint candidates: what the node reported, then what the server saw.
    let id0 = clients[0].state().node.unwrap().node_id;
    let p0 = clients[1].state().peers[&id0].clone();
    assert_eq!(
        p0.endpoints[0],
        "192.0.2.1:51820".parse::<SocketAddr>().unwrap()
    );
    assert!(p0.endpoints[1].ip().is_loopback(), "{:?}", p0.endpoints);
    assert!(p0.routes.is_empty(), "nothing approved yet");
    assert_eq!(clients[0].state().routes.len(), 1);
    assert!(!clients[0].state().routes[0].approved);

    // Route approval from the CLI's store handle.
    let t = Instant::now();
    assert!(mesh
        .cli
        .set_route_approved(id0, "10.42.0.0/24".parse().unwrap(), true)
        .unwrap());
    let took = all_within(&clients[1..], DELIVERY, "route approval", |s| {
        s.peers
            .get(&id0)
            .is_some_and(|p| p.routes == ["10.42.0.0/24"])
    });
    assert!(clients[0].wait(DELIVERY, |s, _| s
        .routes
        .first()
        .is_some_and(|r| r.approved)));
    println!(
        "route approval on every node after {:?} ({took:?})",
        t.elapsed()
    );

    // A policy set from the CLI: every node gets its compiled filter.
    let policy = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}"#;
    meshvpn_control::Policy::parse(policy).unwrap();
    let t = Instant::now();
    let version = mesh.cli.set_policy(policy, now()).unwrap();
    all_within(&clients, DELIVERY, "policy", |s| {
        s.policy_version == version && s.filter.as_ref().is_some_and(|f| !f.inbound.is_empty())
    });
    println!("policy v{version} on every node after {:?}", t.elapsed());

    // A node reports new endpoints.
    assert!(clients[2].update_endpoints(vec!["198.51.100.9:4242".parse().unwrap()]));
    let id2 = clients[2].state().node.unwrap().node_id;
    let t = Instant::now();
    all_within(&clients[3..], DELIVERY, "endpoint update", |s| {
        s.peers
            .get(&id2)
            .is_some_and(|p| p.endpoints[0] == "198.51.100.9:4242".parse::<SocketAddr>().unwrap())
    });
    println!("endpoint update on every node after {:?}", t.elapsed());

    // Removal from the CLI: gone from every map, its session closed with
    // the reason, its key refused afterwards.
    let victim = clients.pop().unwrap();
    let vid = victim.state().node.unwrap().node_id;
    let t = Instant::now();
    assert!(mesh.cli.remove_node(vid).unwrap().is_some());
    all_within(&clients, DELIVERY, "removal", |s| {
        !s.peers.contains_key(&vid)
    });
    println!("removal on every node after {:?}", t.elapsed());
    assert_eq!(refused_with(&victim), Some(ErrorCode::Removed));
    let back = mesh.join(None, "node19", &secrets[N - 1]);
    assert_eq!(refused_with(&back), Some(ErrorCode::NodeUnknown));
    assert_eq!(mesh.control.stats().closed_removed, 1);

    // A node that leaves is shown offline.
    let leaver = clients.pop().unwrap();
    let lid = leaver.state().node.unwrap().node_id;
    drop(leaver);
    all_within(&clients, DELIVERY, "offline", |s| {
        s.peers.get(&lid).is_some_and(|p| !p.online)
    });
}

#[test]
fn ephemeral_nodes_are_removed_after_their_timeout() {
    let mesh = Mesh::start("ephemeral", |c| {
        c.ephemeral_timeout = Duration::from_secs(1);
    });
    let eph = mesh.key(KeyOptions {
        ephemeral: true,
        ..Default::default()
    });
    let stay = mesh.key(KeyOptions::default());
    let watcher = mesh.join(Some(&stay), "watcher", &secret());
    let e = mesh.join(Some(&eph), "eph", &secret());
    assert!(watcher.wait(WAIT, |s, _| s.peers.len() == 1));
    let eid = e.state().node.unwrap().node_id;
    drop(e);
    // Offline is recorded in whole seconds: gone within timeout + 2 s + a poll.
    assert!(
        watcher.wait(Duration::from_secs(5), |s, _| !s.peers.contains_key(&eid)),
        "{:?}",
        mesh.control.stats()
    );
    assert_eq!(mesh.control.stats().ephemeral_removed, 1);
    assert!(mesh.cli.list_nodes().unwrap().iter().all(|n| n.id != eid));
}

#[test]
fn session_caps_per_source_refuse_the_excess_and_keep_the_rest() {
    let mesh = Mesh::start("caps", |c| {
        c.max_sessions_per_source = 3;
    });
    let key = mesh.key(KeyOptions {
        reusable: true,
        ..Default::default()
    });
    let ok: Vec<ControlClient> = (0..3)
        .map(|i| mesh.join(Some(&key), &format!("n{i}"), &secret()))
        .collect();
    for c in &ok {
        assert!(c.wait(WAIT, |s, _| s.has_map()));
    }
    let extra = mesh.join(Some(&key), "n3", &secret());
    assert!(extra.wait(WAIT, |_, st| st
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("503"))));
    assert!(!extra.status().connected);
    let stats = mesh.tunnel.extra_stats(CONTROL_PATH).unwrap();
    assert_eq!(stats.sessions, 3);
    assert!(stats.refused_sessions_per_source >= 1);
    // The admitted nodes still get changes.
    drop(ok.into_iter().next());
    assert!(
        extra.wait(WAIT, |s, _| s.has_map()),
        "a freed slot is used: {:?}",
        extra.status()
    );
}

/// A node that registers and then stops reading: once the server's writes
/// to it make no progress for the write timeout, its session is closed and
/// counted, its queue freed; the other nodes are served throughout.
#[test]
fn a_node_that_stops_reading_is_dropped_and_others_are_served() {
    use meshvpn_control::client::Step;
    use socket2::{Domain, Socket, Type};
    use tungstenite::Message;

    let _heavy = HEAVY.lock();
    // Many registrations: on tmpfs where there is one (fsyncs are free).
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    let mesh = Mesh::start_in(TempDir::under(base, "slow"), |c| {
        c.write_timeout = Duration::from_secs(1);
    });
    // 1000 peers with 64 long tags each make a full map of about 4.3 MiB:
    // more than the socket buffers on both ends hold (the server's send
    // buffer grows to 4 MiB on loopback).
    let tags: Vec<String> = (0..64)
        .map(|i| format!("tag:t{i:02}-{}", "x".repeat(58)))
        .collect();
    let key = mesh.key(KeyOptions {
        reusable: true,
        tags,
        ..Default::default()
    });
    for i in 0..1000 {
        let node = meshvpn_control::NodeRequest {
            public_key: PrivateKey::generate().public_key(),
            hostname: format!("big{i}"),
        };
        keys::redeem(&mesh.cli, &key, &node, now()).unwrap();
    }
    mesh.control.poke();

    let addr = mesh.tunnel.local_addr();
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let tcp: std::net::TcpStream = sock.into();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let (mut ws, _) = tungstenite::client(mesh.url(), tcp).unwrap();
    let s = secret();
    let request = JoinRequest {
        join_key: Some(key.clone()),
        hostname: "slow".into(),
        ..Default::default()
    };
    let mut state = NodeState::new();
    for _ in 0..2 {
        let Message::Binary(m) = ws.read().unwrap() else {
            panic!("binary expected")
        };
        if let Step::Reply(r) = state.handle(&m, &s, &[0u8; 32], &request).unwrap() {
            ws.send(Message::Binary(r.into())).unwrap();
        }
    }
    assert!(state.node.is_some(), "registered");
    // From here the node reads nothing.
    let start = Instant::now();
    while mesh.control.stats().dropped_slow == 0 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = mesh.control.stats();
    assert_eq!(stats.dropped_slow, 1, "{stats:?}");
    println!(
        "the node that stopped reading was dropped after {:?}",
        start.elapsed()
    );
    // A reading node still joins and gets the whole map.
    let ok = mesh.join(Some(&key), "reader", &secret());
    assert!(
        ok.wait(WAIT, |st, _| st.has_map() && st.peers.len() == 1001),
        "{:?}",
        ok.status()
    );
    drop(ws);
}

/// Route decisions at registration reach the node through the server: a
/// pod CIDR another cluster already has is refused with the reason naming
/// that node and cluster, and a route the policy's `autoApprovers` covers
/// is approved without the operator.
#[test]
fn route_conflicts_and_auto_approvals_reach_the_node_that_advertised() {
    let mesh = Mesh::start("routes", |_| {});
    mesh.cli
        .set_policy(
            r#"{"tagOwners": {"tag:k3s": []},
                "autoApprovers": {"routes": {"10.43.0.0/16": ["tag:k3s"]}}}"#,
            now(),
        )
        .unwrap();
    let key_for = |cluster: &str| {
        mesh.key(KeyOptions {
            cluster: Some(cluster.into()),
            tags: vec!["tag:k3s".into()],
            ..Default::default()
        })
    };
    let join = |key: &Zeroizing<String>, host: &str, route: &str| {
        mesh.join_with(
            JoinRequest {
                join_key: Some(key.clone()),
                hostname: host.into(),
                routes: vec![route.parse().unwrap()],
                ..Default::default()
            },
            &secret(),
        )
    };
    let a = join(&key_for("one"), "a", "10.42.0.0/16");
    assert!(
        a.wait(WAIT, |s, _| s.routes.len() == 1),
        "a never registered"
    );
    let a_id = a.state().node.unwrap().node_id;
    assert_eq!(
        a.state().routes[0].status,
        "pending",
        "no approver covers 10.42/16"
    );
    let policy = meshvpn_control::routes::stored_policy(&mesh.cli).unwrap();
    meshvpn_control::routes::approve(
        &mesh.cli,
        policy.as_ref(),
        a_id,
        "10.42.0.0/16".parse().unwrap(),
        now(),
    )
    .unwrap();

    let b = join(&key_for("two"), "b", "10.42.0.0/16");
    assert!(
        b.wait(WAIT, |s, _| s.routes.len() == 1),
        "b never registered"
    );
    let r = b.state().routes[0].clone();
    assert_eq!((r.status.as_str(), r.approved), ("refused", false), "{r:?}");
    let why = r.reason.expect("a refused route carries its reason");
    assert!(
        why.contains("one") && why.contains('a'),
        "the reason names the other side: {why}"
    );

    let c = join(&key_for("two"), "c", "10.43.0.0/16");
    assert!(
        c.wait(WAIT, |s, _| s.routes.len() == 1),
        "c never registered"
    );
    let r = c.state().routes[0].clone();
    assert_eq!((r.status.as_str(), r.approved), ("approved", true), "{r:?}");
}

/// A host program (the C and Go bindings) may keep the listener running
/// after it closes the control server: the route it keeps must then refuse
/// nodes rather than register them into a map that never changes again.
#[test]
fn a_listener_that_outlives_its_control_server_registers_nobody() {
    let mesh = Mesh::start("outlived", |_| {});
    let key = mesh.key(KeyOptions::default());
    let url = mesh.url();
    let Mesh {
        _dir,
        tunnel,
        control,
        cli,
    } = mesh;
    drop(control);
    let mut config = ControlClientConfig::new(
        url,
        JoinRequest {
            join_key: Some(key),
            hostname: "late".into(),
            routes: vec![],
            tags: vec![],
            endpoints: vec![],
        },
    );
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    let client = ControlClient::start(config, secret()).unwrap();
    // An attempt ended in an error: the session was turned away.
    assert!(
        client.wait(WAIT, |_, st| st.last_error.is_some() && !st.connected),
        "{:?}",
        client.status()
    );
    let st = client.status();
    assert_eq!(st.sessions, 0, "{st:?}");
    assert!(!client.state().has_map());
    assert!(cli.list_nodes().unwrap().is_empty());
    drop(client);
    drop(tunnel);
}

/// The cap on sessions from all sources (`max_sessions`, nginx
/// `limit_conn` on a zone for the whole server): nodes past it are refused
/// with a clear 503 and counted, and the admitted ones keep their
/// sessions; a freed slot is taken by a waiting node.
#[test]
fn the_total_session_cap_refuses_the_excess_and_keeps_the_rest() {
    const CAP: usize = 3;
    let mesh = Mesh::start("totalcap", |c| {
        c.max_sessions = CAP;
        // The per-source cap is not the one that bites here.
        c.max_sessions_per_source = 64;
    });
    let key = mesh.key(KeyOptions {
        reusable: true,
        ..Default::default()
    });
    let ok: Vec<ControlClient> = (0..CAP)
        .map(|i| mesh.join(Some(&key), &format!("n{i}"), &secret()))
        .collect();
    for c in &ok {
        assert!(c.wait(WAIT, |s, _| s.has_map()), "{:?}", c.status());
    }
    // Three times the cap of nodes beyond it.
    let extra: Vec<ControlClient> = (0..3 * CAP)
        .map(|i| mesh.join(Some(&key), &format!("x{i}"), &secret()))
        .collect();
    for c in &extra {
        assert!(
            c.wait(WAIT, |_, st| st
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("503"))),
            "{:?}",
            c.status()
        );
        assert!(!c.status().connected);
    }
    let stats = mesh.tunnel.extra_stats(CONTROL_PATH).unwrap();
    assert_eq!(stats.sessions, CAP, "{stats:?}");
    assert!(stats.refused_sessions >= 3 * CAP as u64, "{stats:?}");
    assert_eq!(stats.refused_sessions_per_source, 0, "{stats:?}");
    assert_eq!(mesh.control.stats().sessions, CAP);
    // The admitted nodes are still served: a change reaches them.
    let victim = mesh.cli.list_nodes().unwrap().last().unwrap().id;
    mesh.cli.remove_node(victim).unwrap();
    mesh.control.poke();
    for c in &ok {
        let mine = c.state().node.unwrap().node_id;
        if mine != victim {
            assert!(c.wait(WAIT, |s, _| !s.peers.contains_key(&victim)));
        }
    }
    // A freed slot is taken by one of the waiting nodes.
    drop(ok);
    let start = Instant::now();
    while start.elapsed() < WAIT && !extra.iter().any(|c| c.status().connected) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(extra.iter().any(|c| c.status().connected));
    assert!(mesh.control.stats().sessions <= CAP);
}

/// The tests that measure this process's memory run one at a time, so
/// one's peak is not another's.
static HEAVY: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// VmRSS of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The send-queue cap attacked: a node registers and then reads nothing
/// while the operator sets big policies, each compiled into a filter of
/// about 5 MiB for every node. The socket buffers hold a few MiB; after
/// them the node's queue fills to its byte cap
/// ([`meshvpn_control::server::DEFAULT_QUEUE_BYTES`]) within a few
/// changes, and the session is dropped and counted as `dropped_slow`: not
/// by the write timeout, set far beyond the test here. A reading node gets
/// every policy throughout, and the process's peak memory does not grow
/// while tens of MiB more are pushed after the drop (without the cap the
/// queue would hold all of it).
#[test]
fn a_node_that_never_reads_big_changes_is_dropped_at_its_queue_cap() {
    use meshvpn_control::client::Step;
    use meshvpn_control::proto::{filter_to_wire, MapUpdate, ServerBody};
    use meshvpn_control::server::DEFAULT_QUEUE_BYTES;
    use socket2::{Domain, Socket, Type};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tungstenite::Message;

    /// Policy changes made; each reaches every node.
    const CHANGES: u64 = 12;
    let _heavy = HEAVY.lock();
    let mesh = Mesh::start("queuecap", |c| {
        c.write_timeout = Duration::from_secs(600);
    });
    let key = mesh.key(KeyOptions {
        reusable: true,
        ..Default::default()
    });
    let reader = mesh.join(Some(&key), "reader", &secret());
    assert!(
        reader.wait(WAIT, |st, _| st.has_map()),
        "{:?}",
        reader.status()
    );

    // The silent node: a raw websocket with a small receive buffer that
    // registers and then never reads again.
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&mesh.tunnel.local_addr().into()).unwrap();
    let tcp: std::net::TcpStream = sock.into();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let (mut ws, _) = tungstenite::client(mesh.url(), tcp).unwrap();
    let request = JoinRequest {
        join_key: Some(key.clone()),
        hostname: "silent".into(),
        ..Default::default()
    };
    let (s, mut state) = (secret(), NodeState::new());
    for _ in 0..2 {
        let Message::Binary(m) = ws.read().unwrap() else {
            panic!("binary expected")
        };
        if let Step::Reply(r) = state.handle(&m, &s, &[0u8; 32], &request).unwrap() {
            ws.send(Message::Binary(r.into())).unwrap();
        }
    }
    let silent = state.node.as_ref().expect("registered").node_id;
    assert!(reader.wait(WAIT, |st, _| st
        .peers
        .get(&silent)
        .is_some_and(|p| p.online)));

    // Every TCP port but a few, one by one, to every node: 2 x 30000
    // destinations each way per ACL.
    let ports = |from: u32| {
        (0..30_000)
            .map(|i| (from + 2 * i).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let policy = |n: u64| {
        format!(
            r#"{{"acls": [
                {{"action": "accept", "src": ["*"], "dst": ["*:{}"], "proto": "tcp"}},
                {{"action": "accept", "src": ["*"], "dst": ["*:{},{}"], "proto": "tcp"}}
            ]}}"#,
            ports(1),
            ports(2),
            60_001 + n
        )
    };

    let baseline = rss_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let start = Instant::now();
    let mut pushed = 0usize;
    let mut dropped_after = None;
    let mut largest = 0;
    for n in 0..CHANGES {
        let (version, _) =
            meshvpn_control::admin::set_policy(&mesh.cli, &policy(n), now()).unwrap();
        mesh.control.poke();
        assert!(
            reader.wait(WAIT, |st, _| st.policy_version == version),
            "the reading node did not get policy {version} after {:?}: {:?}",
            start.elapsed(),
            reader.status()
        );
        // What the silent node was sent: the same filter as the reader's,
        // its own addresses in place of the reader's.
        let filter = reader
            .state()
            .filter
            .expect("a policy compiles to a filter");
        let size = ServerBody::Map(MapUpdate {
            policy_version: version,
            filter: Some(filter_to_wire(&filter)),
            filter_set: true,
            ..Default::default()
        })
        .encode()
        .len();
        pushed += size;
        largest = largest.max(size);
        if dropped_after.is_none() && mesh.control.stats().dropped_slow > 0 {
            dropped_after = Some((n + 1, pushed, peak.load(Ordering::Relaxed)));
        }
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let stats = mesh.control.stats();
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "{CHANGES} policies in {:?}: {} MiB toward the silent node, {} KiB at most in one message; \
         dropped after {:?} (changes, bytes, peak RSS KiB); RSS before {} MiB, peak {} MiB; {stats:?}",
        start.elapsed(),
        pushed >> 20,
        largest >> 10,
        dropped_after,
        baseline >> 10,
        peak >> 10,
    );
    assert_eq!(stats.dropped_slow, 1, "{stats:?}");
    assert!(
        !mesh.control.connected().contains(&silent),
        "the silent node still has a session"
    );
    let (changes, at, peak_at_drop) = dropped_after.unwrap();
    // Held when it was dropped: the queue up to its cap, one message in
    // the websocket's write buffer, the socket buffers (at most 4 MiB on
    // loopback), and the message that did not fit.
    assert!(
        at <= DEFAULT_QUEUE_BYTES + 3 * largest + (4 << 20),
        "dropped only after {} MiB",
        at >> 20
    );
    // Bounded: what was pushed after the drop (which the queue would have
    // held without its cap) did not raise the peak.
    let after = pushed - at;
    assert!(
        after >= 32 << 20 && changes + 3 <= CHANGES,
        "only {} MiB after the drop",
        after >> 20
    );
    assert!(
        peak <= peak_at_drop + (16 << 10),
        "memory grew from {} MiB to {} MiB after the drop, while {} MiB more were pushed",
        peak_at_drop >> 10,
        peak >> 10,
        after >> 20
    );
    // The reading node is still served after the drop.
    assert!(reader.status().connected && reader.status().sessions == 1);
    drop(ws);
}

/// Three subnet routers of one cluster advertise one LAN, auto-approved:
/// a node's map gives the prefix to exactly one of them (the first to be
/// approved), the routers' own states say primary or standby; when the
/// primary's session ends the prefix moves to a standby after
/// `PRIMARY_GRACE`, when that one is removed (from a second store handle,
/// as the CLI does) to the last; the observer never sees two routers
/// claim the prefix.
#[test]
fn one_primary_router_per_prefix_fails_over_on_disconnect_and_removal() {
    use meshvpn_control::routes::{self, PRIMARY, PRIMARY_GRACE, STANDBY};
    use std::sync::atomic::{AtomicBool, Ordering};
    const LAN: &str = "192.168.50.0/24";
    let mesh = Mesh::start("primary", |_| {});
    mesh.cli
        .set_policy(
            r#"{"tagOwners": {"tag:router": []},
                "autoApprovers": {"routes": {"192.168.50.0/24": ["tag:router"]}}}"#,
            now(),
        )
        .unwrap();
    let key = mesh.key(KeyOptions {
        reusable: true,
        cluster: Some("site".into()),
        tags: vec!["tag:router".into()],
        ..Default::default()
    });
    let router = |host: &str| {
        let c = mesh.join_with(
            JoinRequest {
                join_key: Some(key.clone()),
                hostname: host.into(),
                routes: vec![LAN.parse().unwrap()],
                ..Default::default()
            },
            &secret(),
        );
        assert!(
            c.wait(WAIT, |s, _| s.routes.iter().any(|r| r.approved)),
            "{host} never got its route approved: {:?}",
            c.state().routes
        );
        c
    };
    let a = router("a");
    let b = router("b");
    let c = router("c");
    let id = |c: &ControlClient| c.state().node.unwrap().node_id;
    let (a_id, b_id, c_id) = (id(&a), id(&b), id(&c));
    let observer = mesh.join(Some(&key), "observer", &secret());
    let twice = AtomicBool::new(false);
    let twice = &twice;
    let carrier_is = |want: i64| {
        move |s: &NodeState, _: &_| {
            let claim: Vec<i64> = s
                .peers
                .values()
                .filter(|p| p.routes.iter().any(|r| r == LAN))
                .map(|p| p.id)
                .collect();
            if claim.len() > 1 {
                twice.store(true, Ordering::SeqCst);
            }
            claim == [want]
        }
    };
    let role = |c: &ControlClient| c.state().routes[0].role.clone();
    assert!(
        observer.wait(WAIT, carrier_is(a_id)),
        "the first approved router carries the LAN: {:?}",
        observer.state().peers
    );
    assert!(
        a.wait(WAIT, |s, _| s.routes[0].role == PRIMARY),
        "a primary"
    );
    for standby in [&b, &c] {
        assert!(
            standby.wait(WAIT, |s, _| s.routes[0].role == STANDBY),
            "{:?}",
            standby.state().routes
        );
    }

    // The primary's session ends: b (approved before c) takes over, no
    // sooner than the grace.
    let gone = Instant::now();
    drop(a);
    assert!(
        observer.wait(WAIT, carrier_is(b_id)),
        "b carries the LAN after a left: {:?}",
        observer.state().peers
    );
    assert!(gone.elapsed() >= PRIMARY_GRACE, "{:?}", gone.elapsed());
    assert!(b.wait(WAIT, |s, _| s.routes[0].role == PRIMARY));
    assert_eq!(role(&c), STANDBY, "c stays standby");
    let listed = mesh.cli.list_routes().unwrap();
    let stored: Vec<(i64, bool)> = listed.iter().map(|r| (r.node_id, r.primary)).collect();
    assert_eq!(
        stored,
        [(a_id, false), (b_id, true), (c_id, false)],
        "the store records it"
    );

    // b removed as `meshvpn control nodes remove` does: c at once.
    let removed = mesh.cli.remove_node_with_routes(b_id).unwrap().unwrap();
    let policy = routes::stored_policy(&mesh.cli).unwrap();
    routes::withdrawn(&mesh.cli, policy.as_ref(), &removed.routes, now()).unwrap();
    assert!(
        observer.wait(WAIT, carrier_is(c_id)),
        "c carries the LAN after b's removal: {:?}",
        observer.state().peers
    );
    assert!(c.wait(WAIT, |s, _| s.routes[0].role == PRIMARY));
    assert!(
        !twice.load(Ordering::SeqCst),
        "the observer saw two routers claim the LAN"
    );
}
