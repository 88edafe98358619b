//! Admission of the tunnel server: one source address cannot take the
//! handshake slots or relay sessions every other source needs (nginx
//! `limit_conn` style caps per source and in total), and a handshake in
//! progress when the server stops is never admitted afterwards.
//!
//! A second source is 127.0.0.2 on loopback (bound by hand: the library's
//! clients cannot choose their source address).

#[path = "tunnel_support/raw.rs"]
mod raw;
mod tunnel_support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use meshvpn_engine::relay::{RelayServerConfig, DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE, RELAY_PATH};
use meshvpn_engine::supervisor::{
    Agent, ServerAuth, ServerConfig, TunnelServer, DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
};
use meshvpn_engine::ws::tls;

use raw::{closed_by_server, relay_register, tcp_from, tls_over, OTHER_SOURCE};
use tunnel_support::{agent_config, loopback, pki, Pki, PATH};

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "admission-test-token";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn tls_server(pki: &Pki, edit: impl FnOnce(&mut ServerConfig)) -> TunnelServer {
    let mut config = tunnel_support::server_config(pki, &[(TOKEN, "system:node:token")]);
    edit(&mut config);
    TunnelServer::bind(loopback(), config).unwrap()
}

fn plain_server(edit: impl FnOnce(&mut ServerConfig)) -> TunnelServer {
    let auth = ServerAuth {
        tokens: vec![(TOKEN.into(), "system:node:token".into())],
        client_cert_cn: false,
    };
    let mut config = ServerConfig::new(PATH, None, auth);
    edit(&mut config);
    TunnelServer::bind(loopback(), config).unwrap()
}

/// Polls `done` every 10 ms for up to `within`.
fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// A token agent from 127.0.0.1 connects within `within`.
fn agent_connects(pki: &Pki, server: SocketAddr, within: Duration) -> bool {
    let mut config = agent_config(pki, server, &[]);
    config.tls = Some(tls::client_config(pki.ca_pem.as_bytes(), None).unwrap());
    config.token = Some(TOKEN.into());
    let agent = Agent::start(config).unwrap();
    let ok = agent.wait_connected(within);
    agent.stop();
    ok
}

/// Defect 2: bare TCP connections from one source used to take every
/// handshake slot, and every real agent's attempt failed.
#[test]
fn one_source_holding_idle_connections_leaves_room_for_another() {
    const GLOBAL: usize = 32;
    let pki = pki();
    let server = tls_server(&pki, |c| {
        c.max_handshakes = GLOBAL;
        // Held connections outlive the test unless the server closes them.
        c.handshake_timeout = Duration::from_secs(30);
    });
    let addr = server.local_addr();
    // As many idle connections from 127.0.0.2 as there are slots in all.
    let mut idle: Vec<TcpStream> = (0..GLOBAL)
        .map(|_| tcp_from(OTHER_SOURCE, addr, Duration::from_millis(500)).unwrap())
        .collect();
    // The server has taken each of them (or closed it) before the agent's
    // connection, which queues behind them on the listener.
    assert!(
        agent_connects(&pki, addr, WAIT),
        "an agent from 127.0.0.1 was locked out by idle connections from 127.0.0.2"
    );
    let mut closed = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        closed += usize::from(closed_by_server(s));
    }
    println!("idle connections from 127.0.0.2 closed at once: {closed} of {GLOBAL}");
    // nginx limit_conn: the source keeps exactly its share, the rest were
    // closed at once and counted.
    let per_source = DEFAULT_MAX_HANDSHAKES_PER_SOURCE;
    assert_eq!(closed, GLOBAL - per_source);
    let stats = server.stats();
    assert_eq!(stats.handshakes, per_source, "{stats:?}");
    assert_eq!(
        stats.refused_handshakes_per_source,
        (GLOBAL - per_source) as u64
    );
    assert_eq!(stats.refused_handshakes, 0);
    drop(idle);
    // Slots come back when the connections go.
    assert!(wait_until(WAIT, || server.stats().handshakes == 0));
}

/// The global cap still holds when no source is over its own: four sources
/// of 4 against 8 slots in all.
#[test]
fn handshakes_are_capped_in_total_across_sources() {
    let pki = pki();
    let server = tls_server(&pki, |c| {
        c.max_handshakes = 8;
        c.max_handshakes_per_source = 4;
        c.handshake_timeout = Duration::from_secs(30);
    });
    let addr = server.local_addr();
    let mut conns = Vec::new();
    for n in 2..=5u8 {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, n));
        for _ in 0..4 {
            conns.push(tcp_from(src, addr, Duration::from_millis(500)).unwrap());
        }
    }
    let mut closed = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        closed += usize::from(closed_by_server(s));
    }
    assert_eq!(closed, 8, "16 connections against 8 slots");
    let stats = server.stats();
    assert_eq!(
        (stats.handshakes, stats.refused_handshakes),
        (8, 8),
        "{stats:?}"
    );
    drop(conns);
    assert!(wait_until(WAIT, || server.stats().handshakes == 0));
    assert!(agent_connects(&pki, addr, WAIT));
}

/// Defect 1 (session caps): relay sessions from one source are capped;
/// another source still registers.
#[test]
fn relay_sessions_from_one_source_are_capped() {
    const PER_SOURCE: usize = DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE;
    let server = plain_server(|c| c.relay = Some(RelayServerConfig::default()));
    let addr = server.local_addr();
    let url = format!("ws://{addr}{RELAY_PATH}");
    let mut held = Vec::new();
    let mut refused = None;
    let started = Instant::now();
    for _ in 0..PER_SOURCE + 8 {
        assert!(started.elapsed() < WAIT * 3, "registrations too slow");
        let tcp = tcp_from(OTHER_SOURCE, addr, WAIT).unwrap();
        match relay_register(tcp, &url) {
            Ok(ws) => held.push(ws),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(
        held.len(),
        PER_SOURCE,
        "relay sessions from 127.0.0.2 held at once (refusal: {refused:?})"
    );
    let refused = refused.unwrap();
    assert!(refused.contains("503"), "{refused}");
    // Another source registers while 127.0.0.2 is at its cap.
    let tcp = tcp_from(LOCAL, addr, WAIT).unwrap();
    let other = relay_register(tcp, &url).expect("a relay client from 127.0.0.1");
    let stats = server.stats();
    assert_eq!(stats.relay_sessions, PER_SOURCE + 1, "{stats:?}");
    assert_eq!(stats.refused_relay_sessions_per_source, 1);
    drop(other);
    // A session holds its slot until it ends; then the source may register again.
    drop(held.pop());
    let again = wait_until(WAIT, || {
        let tcp = tcp_from(OTHER_SOURCE, addr, WAIT).unwrap();
        relay_register(tcp, &url).map(|ws| held.push(ws)).is_ok()
    });
    assert!(again, "a slot freed by a session's end was not given back");
}

/// The relay's total cap: two sources at 2 each fill 3 sessions in all.
#[test]
fn relay_sessions_are_capped_in_total() {
    let server = plain_server(|c| {
        c.relay = Some(RelayServerConfig {
            max_sessions: 3,
            max_sessions_per_source: 2,
            ..Default::default()
        })
    });
    let addr = server.local_addr();
    let url = format!("ws://{addr}{RELAY_PATH}");
    let register = |src| relay_register(tcp_from(src, addr, WAIT).unwrap(), &url);
    let a1 = register(OTHER_SOURCE).unwrap();
    let a2 = register(OTHER_SOURCE).unwrap();
    let per_source = register(OTHER_SOURCE).map(drop).unwrap_err();
    assert!(per_source.contains("503"), "{per_source}");
    let b1 = register(LOCAL).unwrap();
    let total = register(LOCAL).map(drop).unwrap_err();
    assert!(total.contains("503"), "{total}");
    let stats = server.stats();
    assert_eq!(stats.relay_sessions, 3);
    assert_eq!(
        (
            stats.refused_relay_sessions,
            stats.refused_relay_sessions_per_source
        ),
        (1, 1)
    );
    assert_eq!(server.relay_stats().unwrap().clients, 3);
    drop((a1, a2, b1));
    assert!(wait_until(WAIT, || server.stats().relay_sessions == 0));
}

/// Sends an upgrade request to `stream` but the blank line that ends it,
/// stops the server, then sends the blank line: the server must not answer
/// 101 (it did, and then kept the session that nothing stopped).
fn held_handshake_is_not_admitted_after_stop(
    server: TunnelServer,
    mut stream: impl Read + Write,
) -> String {
    let req = format!(
        "GET {PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {TOKEN}\r\n"
    );
    stream.write_all(req.as_bytes()).unwrap();
    stream.flush().unwrap();
    // The server has the connection in a handshake (not still queued on
    // the listener, which stop closes).
    assert!(wait_until(WAIT, || server.stats().handshakes == 1));
    let stopping = Instant::now();
    server.shutdown();
    let stop_took = stopping.elapsed();
    // The server's handshake thread may have hung up already; that is fine.
    let _ = stream.write_all(b"\r\n");
    let _ = stream.flush();
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    let read_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < read_until && answer.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        !answer.starts_with("HTTP/1.1 101"),
        "a handshake held across stop was admitted after stop returned: {answer:?}"
    );
    assert!(
        stop_took < Duration::from_secs(5),
        "stop waited {stop_took:?} on a handshake in progress"
    );
    answer
}

/// Defect 6, plain HTTP: the upgrade header arrives after stop.
#[test]
fn stop_admits_no_plain_handshake_in_progress() {
    let server = plain_server(|_| {});
    let tcp = TcpStream::connect(server.local_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let answer = held_handshake_is_not_admitted_after_stop(server, tcp);
    println!("answer after stop: {answer:?}");
}

/// Defect 6, TLS: the client finished TLS and pauses before the upgrade.
#[test]
fn stop_admits_no_tls_handshake_in_progress() {
    let pki = pki();
    let server = tls_server(&pki, |_| {});
    let tcp = TcpStream::connect(server.local_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let config = tls::client_config(pki.ca_pem.as_bytes(), None).unwrap();
    let tls = tls_over(tcp, config).unwrap();
    let answer = held_handshake_is_not_admitted_after_stop(server, tls);
    println!("answer after stop: {answer:?}");
}
