//! Hostile case: an authenticated agent floods Connect messages (each one
//! answered by the server with an Error) and never reads a byte back.
//!
//! Before the fix the server queued every reply: the issue saw 40 MB of
//! Connects take the server from 8 MB to 397 MB. Now the session stops
//! reading while its control queue is full (`Limits::max_control_queue`),
//! so the flood backs up into the attacker's own socket.
//!
//! The attacker authenticates with the node certificate (client key
//! `system:node:legit-cert`), not the legitimate agent's token: a second
//! session for the same client key would replace the first and end the
//! attack the moment the legitimate agent connects.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use meshvpn_engine::supervisor::message::{encode, MessageType};

use crate::common::{
    legit_agent_connects, legit_relay_client_registers, Ceilings, Sampler, Server,
};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A websocket to the tunnel path, upgraded by hand over rustls, ready for
/// frames (the server's replies are never read).
fn authenticated_websocket(server: &Server) -> Tls {
    let tcp = TcpStream::connect(server.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(
        server.client_tls(true),
        "localhost".try_into().expect("server name"),
    )
    .expect("TLS client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!(
        "GET /v1-k3s/connect HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    tls.write_all(request.as_bytes()).expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        tls.read_exact(&mut byte).expect("upgrade response");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    tls
}

/// Appends one masked binary websocket frame (client to server) of `payload`.
fn push_frame(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    assert!(payload.len() < 126, "short frames only");
    out.push(0x82);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn connect_flood_from_an_agent_that_never_reads() {
    // Four million Connects (about 60 MB of tunnel messages), or 15 s.
    const MESSAGES: i64 = 4_000_000;
    const TIME: Duration = Duration::from_secs(15);
    const PER_WRITE: i64 = 4096;
    let mut server = Server::start(&["--relay"]);
    let before = server.daemon.usage();
    let sampler = Sampler::start(server.daemon.pid());
    let mut ws = authenticated_websocket(&server);
    // Pushback shows as a write that cannot finish.
    ws.sock
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    let flood = std::thread::spawn(move || {
        let started = Instant::now();
        let (mut sent, mut bytes, mut pushed_back) = (0i64, 0usize, false);
        let mut buf = Vec::with_capacity(PER_WRITE as usize * 32);
        while sent < MESSAGES && started.elapsed() < TIME {
            buf.clear();
            for i in sent..sent + PER_WRITE {
                let msg = encode(i + 1, i + 2, MessageType::Connect, b"tcp/a:1");
                bytes += msg.len();
                push_frame(&mut buf, &msg, [0x5a, 0x17, 0xc3, 0x9e]);
            }
            if ws.write_all(&buf).and_then(|()| ws.flush()).is_err() {
                pushed_back = true;
                break;
            }
            sent += PER_WRITE;
        }
        (ws, sent, bytes, pushed_back, started.elapsed())
    });
    // During the flood: give it a moment to fill what it can, then the
    // legitimate clients must get through.
    std::thread::sleep(Duration::from_secs(2));
    let agent_during = legit_agent_connects(&server, Duration::from_secs(10));
    let relay_during = legit_relay_client_registers(&server, None, Duration::from_secs(10));
    let (ws, sent, bytes, pushed_back, took) = flood.join().expect("flood thread");
    let held = server.daemon.usage();
    println!(
        "session: {sent} Connects ({bytes} bytes) in {took:?}, pushed back: {pushed_back}; \
         server while the attacker still holds its session: {held}"
    );
    let agent_during = agent_during.expect("legitimate agent during the flood");
    let relay_during = relay_during.expect("legitimate relay client during the flood");
    // After: the attacker goes, everyone else still gets in.
    drop(ws);
    let agent_after = legit_agent_connects(&server, Duration::from_secs(10)).expect("agent after");
    let relay_after = legit_relay_client_registers(&server, None, Duration::from_secs(10))
        .expect("relay client after");
    let peak = sampler.finish();
    println!(
        "session: agent in {agent_during:?} during / {agent_after:?} after, relay client in \
         {relay_during:?} / {relay_after:?}"
    );
    assert!(
        server.daemon.alive(),
        "the server died: {}",
        server.daemon.log_text()
    );
    // Before the fix the peak was 373.6 MiB (4 threads, 12 fds); after, 8.3 MiB.
    Ceilings {
        rss_mib: 32,
        threads: 16,
        fds: 32,
    }
    .check("session connect flood", before, peak);
}
