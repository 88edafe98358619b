//! Server and agent of libmeshvpn's tunnel against each other over real TLS.

mod tunnel_support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshvpn_engine::supervisor::{Agent, TunnelServer};
use tunnel_support::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn dial_through_agent_with_client_certificate() {
    let pki = pki();
    let echo = echo_server();
    let server = start_server(&pki, loopback());
    let agent = start_agent(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    assert!(server.wait_for_client(NODE, WAIT), "agent never registered");
    assert_eq!(server.clients(), vec![NODE.to_owned()]);

    let stream = server.dial(NODE, "tcp", &echo.to_string()).unwrap();
    assert_eq!(
        round_trip(&stream, b"hello through the tunnel").unwrap(),
        b"hello through the tunnel"
    );

    // A target the agent does not allow fails that stream only.
    let mut refused = server.dial(NODE, "tcp", "127.0.0.1:22").unwrap();
    let err = refused.read(&mut [0u8; 8]).unwrap_err();
    assert!(err.to_string().contains("connect not allowed"), "{err}");
    assert_eq!(round_trip(&stream, b"still alive").unwrap(), b"still alive");

    // A dial the agent's OS refuses carries the dial error text.
    let closed_port = TcpListener::bind(loopback()).unwrap().local_addr().unwrap();
    agent.stop();
    let deadline = std::time::Instant::now() + WAIT;
    while !server.clients().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "stopped agent's session lingers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _agent = start_agent(&pki, server.local_addr(), &["tcp/127.0.0.1:*"]);
    assert!(server.wait_for_client(NODE, WAIT));
    let mut failed = server.dial(NODE, "tcp", &closed_port.to_string()).unwrap();
    let err = failed.read(&mut [0u8; 8]).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    assert!(server.dial("nobody", "tcp", &echo.to_string()).is_err());
}

#[test]
fn token_auth_and_wrong_token() {
    let pki = pki();
    let echo = echo_server();
    let mut config = server_config(&pki, &[("s3cret-token", "edge-7")]);
    config.auth.client_cert_cn = false;
    let server = TunnelServer::bind(loopback(), config).unwrap();

    let mut wrong = agent_config(&pki, server.local_addr(), &[]);
    wrong.tls = Some(meshvpn_engine::ws::tls::client_config(pki.ca_pem.as_bytes(), None).unwrap());
    wrong.token = Some("not-it".into());
    let wrong = Agent::start(wrong).unwrap();
    let mut right = agent_config(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    right.tls = wrong_tls(&pki);
    right.token = Some("s3cret-token".into());
    assert!(
        !format!("{right:?}").contains("s3cret"),
        "token must not show in Debug"
    );
    let right = Agent::start(right).unwrap();
    assert!(server.wait_for_client("edge-7", WAIT));
    let stream = server.dial("edge-7", "tcp", &echo.to_string()).unwrap();
    assert_eq!(round_trip(&stream, b"tok").unwrap(), b"tok");
    // The wrong agent may not have made its first attempt yet: wait for it.
    let deadline = std::time::Instant::now() + WAIT;
    let mut status = wrong.status();
    while status.last_error.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        status = wrong.status();
    }
    assert!(!status.connected);
    assert!(status.last_error.unwrap_or_default().contains("401"));
    assert_eq!(server.clients(), vec!["edge-7".to_owned()]);
    drop(right);
}

fn wrong_tls(pki: &Pki) -> Option<std::sync::Arc<rustls::ClientConfig>> {
    Some(meshvpn_engine::ws::tls::client_config(pki.ca_pem.as_bytes(), None).unwrap())
}

#[test]
fn agent_rejects_server_with_unknown_ca() {
    let pki = pki();
    let other = tunnel_support::pki();
    let server = start_server(&pki, loopback());
    let agent = start_agent(&other, server.local_addr(), &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!agent.status().connected);
    assert!(agent
        .status()
        .last_error
        .unwrap_or_default()
        .contains("TLS"));
    assert!(server.clients().is_empty());
}

#[test]
fn a_thousand_concurrent_streams() {
    const STREAMS: usize = 1000;
    let limit = raise_open_file_limit();
    assert!(
        limit >= 2 * STREAMS as u64 + 256,
        "{STREAMS} streams to an OS target need about {} open files; the hard limit is {limit}",
        2 * STREAMS + 256
    );
    let pki = pki();
    let echo = echo_server();
    let server = start_server(&pki, loopback());
    let _agent = start_agent(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    assert!(server.wait_for_client(NODE, WAIT));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| server.dial(NODE, "tcp", &echo.to_string()).unwrap())
        .collect();
    for (i, s) in streams.iter().enumerate() {
        (&*s)
            .write_all(format!("stream {i:04}").as_bytes())
            .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    for (i, s) in streams.iter().enumerate() {
        let mut back = [0u8; 11];
        let mut got = 0;
        while got < back.len() {
            match s.read_until(&mut back[got..], Some(deadline)) {
                Ok(0) => panic!("stream {i}: closed after {got} bytes"),
                Ok(n) => got += n,
                Err(e) => panic!("stream {i}: {e}"),
            }
        }
        assert_eq!(&back, format!("stream {i:04}").as_bytes());
    }
}

#[test]
fn a_stalled_stream_does_not_stall_others() {
    let pki = pki();
    let echo = echo_server();
    // A target that accepts and never reads.
    let sink = TcpListener::bind(loopback()).unwrap();
    let sink_addr = sink.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in sink.incoming().take(1) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let server = start_server(&pki, loopback());
    let _agent = start_agent(
        &pki,
        server.local_addr(),
        &[&format!("tcp/{echo}"), &format!("tcp/{sink_addr}")],
    );
    assert!(server.wait_for_client(NODE, WAIT));
    let stalled = server.dial(NODE, "tcp", &sink_addr.to_string()).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Up to 256 MiB into a target that never reads: fills socket buffers and
        // the agent's stream buffer (Pause at 2 MiB), then blocks this writer. If
        // Pause were ignored the agent would reset the stream at its hard cap
        // (32 MiB) and the writer would finish with an error.
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0usize;
        for _ in 0..256 {
            if (&stalled).write_all(&chunk).is_err() {
                break;
            }
            written += chunk.len();
        }
        let _ = done_tx.send(written);
    });
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = mpsc::channel();
    let other = server.dial(NODE, "tcp", &echo.to_string()).unwrap();
    std::thread::spawn(move || {
        let payload = vec![7u8; 4 << 20];
        let _ = tx.send(round_trip(&other, &payload).map(|b| b == payload));
    });
    assert!(rx
        .recv_timeout(WAIT)
        .expect("other stream stalled")
        .unwrap());
    assert!(
        done_rx.try_recv().is_err(),
        "the stalled writer should still be blocked (paused)"
    );
}

#[test]
fn server_restart_agent_reconnects_old_streams_fail() {
    let pki = pki();
    let echo = echo_server();
    let server = start_server(&pki, loopback());
    let addr = server.local_addr();
    let agent = start_agent(&pki, addr, &[&format!("tcp/{echo}")]);
    assert!(server.wait_for_client(NODE, WAIT));
    let old = server.dial(NODE, "tcp", &echo.to_string()).unwrap();
    assert_eq!(round_trip(&old, b"before").unwrap(), b"before");

    server.shutdown();
    let err = (&old).read(&mut [0u8; 4]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(err.to_string().contains("tunnel disconnect"), "{err}");
    assert!((&old).write_all(b"x").is_err());

    let server = start_server(&pki, addr);
    assert!(
        server.wait_for_client(NODE, WAIT),
        "agent did not reconnect"
    );
    let new = server.dial(NODE, "tcp", &echo.to_string()).unwrap();
    assert_eq!(round_trip(&new, b"after").unwrap(), b"after");
    assert!(agent.status().sessions >= 2);
}

#[test]
fn new_session_for_same_client_replaces_old() {
    let pki = pki();
    let echo = echo_server();
    let server = start_server(&pki, loopback());
    let first = start_agent(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    assert!(server.wait_for_client(NODE, WAIT));
    let old = server.dial(NODE, "tcp", &echo.to_string()).unwrap();
    assert_eq!(round_trip(&old, b"1").unwrap(), b"1");
    // A second agent with the same identity: its session replaces the first one.
    let second = start_agent(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    let err = (&old).read(&mut [0u8; 1]).unwrap_err();
    assert!(err.to_string().contains("tunnel disconnect"), "{err}");
    assert!(second.wait_connected(WAIT));
    first.stop();
    // Once only the second agent is left, dials go through it.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(s) = server.dial(NODE, "tcp", &echo.to_string()) {
            if round_trip(&s, b"2").is_ok_and(|b| b == b"2") {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no working session after replacement"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.clients().len(), 1);
}

#[test]
fn agent_events_and_stream_deadlines() {
    use meshvpn_engine::supervisor::AgentEvent;
    use meshvpn_engine::ws::TunnelError;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let pki = pki();
    let echo = echo_server();
    let server = start_server(&pki, loopback());
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = |seen: &Arc<Mutex<Vec<String>>>| {
        let seen = seen.clone();
        Arc::new(move |e: AgentEvent<'_>| {
            let text = match e {
                AgentEvent::Connected => "connected".to_owned(),
                AgentEvent::Disconnected(_) => "disconnected".to_owned(),
                AgentEvent::ConnectFailed(TunnelError::Rejected(s)) => format!("rejected {s}"),
                AgentEvent::ConnectFailed(other) => format!("failed {other}"),
            };
            seen.lock().unwrap().push(text);
        })
    };
    let wait_event = |seen: &Arc<Mutex<Vec<String>>>, prefix: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = seen.lock().unwrap().clone();
            if events.iter().any(|e| e.starts_with(prefix)) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} event in {events:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut config = agent_config(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    config.on_event = Some(record(&seen));
    let agent = Agent::start(config).unwrap();
    assert!(agent.wait_connected(WAIT));
    assert!(server.wait_for_client(NODE, WAIT));
    assert_eq!(wait_event(&seen, "connected"), ["connected"]);

    // Nothing to read: the deadline ends the wait; then data arrives.
    let stream = server.dial(NODE, "tcp", &echo.to_string()).unwrap();
    let mut buf = [0u8; 8];
    let err = stream
        .read_until(&mut buf, Some(Instant::now() + Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    // An interrupt wakes a read that has no deadline, without closing the
    // stream; one that comes before the read starts is not lost either.
    std::thread::scope(|t| {
        let blocked = t.spawn(|| stream.read_until(&mut [0u8; 8], None));
        std::thread::sleep(Duration::from_millis(50));
        stream.interrupt();
        let err = blocked.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
    });
    stream.interrupt();
    let err = stream.read_until(&mut buf, None).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
    assert_eq!(
        stream
            .write_until(b"ping", Some(Instant::now() + WAIT))
            .unwrap(),
        4
    );
    let n = stream
        .read_until(&mut buf, Some(Instant::now() + WAIT))
        .unwrap();
    assert_eq!(&buf[..n], b"ping"[..n].as_ref());

    // The server goes away: the session's end is reported.
    server.shutdown();
    wait_event(&seen, "disconnected");
    drop(agent);

    // A server that takes tokens only answers 401: reported as Rejected.
    let mut config = server_config(&pki, &[("t", "k")]);
    config.auth.client_cert_cn = false;
    let server = TunnelServer::bind(loopback(), config).unwrap();
    let rejected = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut config = agent_config(&pki, server.local_addr(), &[]);
    config.on_event = Some(record(&rejected));
    let _agent = Agent::start(config).unwrap();
    wait_event(&rejected, "rejected 401");
}
