//! Extra upgrade paths on the tunnel server's listener
//! (`ServerConfig::extra`): a service above the engine (the control server)
//! shares the one TLS port with the k3s tunnel and the relay, with its own
//! session caps, and the server's shutdown ends its sessions.

mod tunnel_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{unbounded, Sender};
use meshvpn_engine::relay::{RelayClient, RelayConfig, RelayOwner, RelayServerConfig, RELAY_PATH};
use meshvpn_engine::supervisor::upgrade::{
    self, Conn, SessionLimits, UpgradeHandler, UpgradeRoute,
};
use meshvpn_engine::supervisor::TunnelServer;
use meshvpn_engine::ws::{tls, TunnelError};
use meshvpn_engine::PrivateKey;

use tunnel_support::{loopback, pki, start_agent, Pki, NODE};

const WAIT: Duration = Duration::from_secs(10);
const ECHO_PATH: &str = "/v1-test/echo";
const LABEL: &[u8] = b"EXPORTER-test-echo";

/// The service: answers the first message with its TLS exporter value
/// (handshake mode), then echoes every message (session mode).
struct Echo {
    ended: Sender<String>,
}

impl UpgradeHandler for Echo {
    fn serve(&self, mut conn: Conn) {
        let Ok(_) = conn.recv() else { return };
        let exporter = conn.exporter(LABEL).unwrap();
        if conn.send(&exporter).is_err() {
            return;
        }
        let session = conn
            .into_session(SessionLimits {
                queue_messages: 16,
                queue_bytes: 1 << 20,
                ping_every: None,
                idle: Duration::from_secs(30),
                write_timeout: Some(Duration::from_secs(5)),
            })
            .unwrap();
        let out = session.outbox();
        let end = session.run(&mut |m| {
            let _ = out.push(m);
        });
        let _ = self.ended.send(end.reason);
    }
}

fn server(pki: &Pki, per_source: usize, ended: Sender<String>) -> TunnelServer {
    let mut config = tunnel_support::server_config(pki, &[]);
    config.relay = Some(RelayServerConfig::default());
    config.extra.push(UpgradeRoute {
        path: ECHO_PATH.into(),
        handler: Arc::new(Echo { ended }),
        max_message: 64 << 10,
        max_sessions: 8,
        max_sessions_per_source: per_source,
    });
    TunnelServer::bind(loopback(), config).unwrap()
}

fn client_tls(pki: &Pki) -> Arc<rustls::ClientConfig> {
    tls::client_config(pki.ca_pem.as_bytes(), None).unwrap()
}

fn echo_conn(pki: &Pki, server: &TunnelServer) -> Result<Conn, TunnelError> {
    upgrade::connect(
        &format!("wss://{}{ECHO_PATH}", server.local_addr()),
        Some(&client_tls(pki)),
        None,
        WAIT,
        64 << 10,
    )
}

struct Owner(PrivateKey);

impl RelayOwner for Owner {
    fn static_secret(&self) -> Option<boringtun::x25519::StaticSecret> {
        Some(boringtun::x25519::StaticSecret::from(*self.0.as_bytes()))
    }
    fn deliver(&self, _source: &[u8; 32], _datagram: &[u8]) {}
}

#[test]
fn tunnel_relay_and_an_extra_service_share_one_port() {
    let pki = pki();
    let (ended_tx, ended) = unbounded();
    let server = server(&pki, 4, ended_tx);
    let addr = server.local_addr();

    let agent = start_agent(&pki, addr, &[]);
    assert!(server.wait_for_client(NODE, WAIT), "the tunnel agent");

    let mut rc = RelayConfig::new(format!("wss://{addr}{RELAY_PATH}"), Some(client_tls(&pki)));
    rc.backoff_initial = Duration::from_millis(100);
    let relay = RelayClient::start(rc, Arc::new(Owner(PrivateKey::generate()))).unwrap();
    assert!(relay.wait_connected(WAIT), "the relay client");

    let mut conn = echo_conn(&pki, &server).unwrap();
    conn.send(b"hello").unwrap();
    // Both ends export the same value: the service can bind a proof to
    // this TLS session.
    let theirs = conn.recv().unwrap();
    assert_eq!(&theirs[..], &conn.exporter(LABEL).unwrap()[..]);
    assert_ne!(
        &theirs[..],
        &[0u8; 32][..],
        "a TLS session has a real exporter"
    );
    let session = conn
        .into_session(SessionLimits {
            queue_messages: 16,
            queue_bytes: 1 << 20,
            ping_every: None,
            idle: WAIT,
            write_timeout: None,
        })
        .unwrap();
    let out = session.outbox();
    let (got_tx, got) = unbounded();
    let runner = std::thread::spawn(move || {
        session.run(&mut |m| {
            let _ = got_tx.send(m);
        })
    });
    out.push(Bytes::from_static(b"ping 1")).unwrap();
    assert_eq!(&got.recv_timeout(WAIT).unwrap()[..], b"ping 1");
    assert_eq!(server.extra_stats(ECHO_PATH).unwrap().sessions, 1);
    assert_eq!(server.stats().sessions, 1, "the agent is still up");
    assert!(relay.status().connected);

    // Shutdown ends the service's session too.
    let started = Instant::now();
    drop(agent);
    server.shutdown();
    let reason = ended.recv_timeout(WAIT).expect("the service session ended");
    assert!(reason.contains("stopped"), "{reason}");
    assert!(started.elapsed() < WAIT);
    let client_end = runner.join().unwrap();
    assert!(!client_end.reason.is_empty());
}

#[test]
fn an_extra_path_caps_its_sessions_per_source() {
    let pki = pki();
    let (ended_tx, _ended) = unbounded();
    let server = server(&pki, 2, ended_tx);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = echo_conn(&pki, &server).unwrap();
        c.send(b"x").unwrap();
        c.recv().unwrap();
        held.push(c);
    }
    match echo_conn(&pki, &server) {
        Err(TunnelError::Rejected(status)) => assert_eq!(status.as_u16(), 503),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("a third session from one source was admitted"),
    }
    let stats = server.extra_stats(ECHO_PATH).unwrap();
    assert_eq!(stats.sessions, 2);
    assert_eq!(stats.refused_sessions_per_source, 1);
    // A freed slot is usable again.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    while server.extra_stats(ECHO_PATH).unwrap().sessions > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(echo_conn(&pki, &server).is_ok());
    assert!(server.extra_stats("/elsewhere").is_none());
}
