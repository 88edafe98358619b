//! Hostile input against the tunnel over real TLS and real websocket frames:
//! the offending connection or session ends, the server stays up and keeps
//! serving a well-behaved agent, and memory stays bounded.

mod tunnel_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshvpn_engine::supervisor::message::{decode, encode, Body, MessageType};
use meshvpn_engine::supervisor::{Agent, AgentConfig, AllowList, OsDialer, TunnelServer};
use meshvpn_engine::ws::tls;
use tungstenite::Message;
use tunnel_support::*;

const WAIT: Duration = Duration::from_secs(20);
const BAD_TOKEN: &str = "bad-client-token";

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// One server at a time in this file, so the RSS measurement sees only its own test.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Fixture {
    _serial: std::sync::MutexGuard<'static, ()>,
    pki: Pki,
    echo: SocketAddr,
    server: TunnelServer,
    _agent: Agent,
}

fn fixture(tune: impl FnOnce(&mut meshvpn_engine::supervisor::ServerConfig)) -> Fixture {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pki = pki();
    let echo = echo_server();
    let mut config = server_config(&pki, &[(BAD_TOKEN, "bad")]);
    tune(&mut config);
    let server = TunnelServer::bind(loopback(), config).unwrap();
    let agent = start_agent(&pki, server.local_addr(), &[&format!("tcp/{echo}")]);
    assert!(server.wait_for_client(NODE, WAIT));
    Fixture {
        _serial: serial,
        pki,
        echo,
        server,
        _agent: agent,
    }
}

impl Fixture {
    /// The good agent still works end to end.
    fn assert_serving(&self) {
        assert!(self.server.wait_for_client(NODE, WAIT), "good agent lost");
        let s = self
            .server
            .dial(NODE, "tcp", &self.echo.to_string())
            .unwrap();
        assert_eq!(round_trip(&s, b"still serving").unwrap(), b"still serving");
    }

    fn tls_stream(&self) -> TlsStream {
        let config = tls::client_config(self.pki.ca_pem.as_bytes(), None).unwrap();
        let tcp = TcpStream::connect(self.server.local_addr()).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    }

    /// An authenticated websocket as client key "bad".
    fn bad_client(&self) -> tungstenite::WebSocket<TlsStream> {
        use tungstenite::client::IntoClientRequest;
        let mut req = format!("wss://localhost:{}{PATH}", self.server.local_addr().port())
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {BAD_TOKEN}").parse().unwrap(),
        );
        let (ws, _) = tungstenite::client::client(req, self.tls_stream()).unwrap();
        assert!(self.server.wait_for_client("bad", WAIT));
        ws
    }

    fn wait_gone(&self, key: &str) {
        let deadline = Instant::now() + WAIT;
        while self.server.clients().iter().any(|k| k == key) {
            assert!(Instant::now() < deadline, "session {key} was not ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads until the server ends the websocket; panics if it does not within WAIT.
fn expect_closed(ws: &mut tungstenite::WebSocket<TlsStream>) {
    loop {
        match ws.read() {
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
fn text_frame_ends_only_that_session() {
    let f = fixture(|_| {});
    let mut ws = f.bad_client();
    ws.send(Message::text("hello")).unwrap();
    expect_closed(&mut ws);
    f.wait_gone("bad");
    f.assert_serving();
}

#[test]
fn truncated_varints_end_only_that_session() {
    let f = fixture(|_| {});
    let mut ws = f.bad_client();
    ws.send(Message::Binary(Bytes::from_static(&[
        0x02, 0x04, 0x02, 0xb0,
    ])))
    .unwrap();
    expect_closed(&mut ws);
    f.wait_gone("bad");
    let mut ws = f.bad_client();
    ws.send(Message::Binary(Bytes::from_static(&[0xff; 11])))
        .unwrap();
    expect_closed(&mut ws);
    f.assert_serving();
}

#[test]
fn connect_to_a_server_is_refused_per_connection_and_unknown_data_answered() {
    let f = fixture(|_| {});
    let mut ws = f.bad_client();
    let mut oversized = b"tcp/".to_vec();
    oversized.extend(std::iter::repeat_n(b'9', 100_000));
    ws.send(Message::Binary(
        encode(1, 7, MessageType::Connect, &oversized).into(),
    ))
    .unwrap();
    ws.send(Message::Binary(
        encode(2, 8, MessageType::Data, b"who?").into(),
    ))
    .unwrap();
    let mut replies = Vec::new();
    while replies.len() < 2 {
        if let Message::Binary(b) = ws.read().unwrap() {
            let m = decode(&b).unwrap();
            let Body::Error(text) = m.body else {
                panic!("{:?}", m.body)
            };
            replies.push((m.conn_id, String::from_utf8_lossy(text).into_owned()));
        }
    }
    assert_eq!(replies[0], (7, "connect not allowed".to_owned()));
    assert_eq!(replies[1].0, 8);
    assert!(
        replies[1].1.starts_with("connection not found"),
        "{:?}",
        replies[1]
    );
    assert!(
        f.server.clients().contains(&"bad".to_owned()),
        "session survives"
    );
    f.assert_serving();
}

#[test]
fn frame_header_declaring_2_pow_63_bytes() {
    let f = fixture(|_| {});
    let mut ws = f.bad_client();
    // FIN + binary, masked, 64-bit length 2^63 - 1, mask key, then nothing.
    let mut raw = vec![0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    raw.extend_from_slice(&[1, 2, 3, 4]);
    ws.get_mut().write_all(&raw).unwrap();
    ws.get_mut().flush().unwrap();
    expect_closed(&mut ws);
    f.wait_gone("bad");
    f.assert_serving();
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn megabyte_http_headers_are_cut_off() {
    let f = fixture(|_| {});
    let before = rss_kib();
    let header = "a".repeat(1 << 20);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let mut s = f.tls_stream();
            let header = header.clone();
            std::thread::spawn(move || {
                let req =
                    format!("GET {PATH} HTTP/1.1\r\nHost: localhost\r\nX-Big: {header}\r\n\r\n");
                // The server gives up long before the end; the write may fail.
                let _ = s.write_all(req.as_bytes());
                let _ = s.flush();
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                !String::from_utf8_lossy(&buf).contains("101 Switching Protocols")
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap(), "a 1 MB header was upgraded");
    }
    let grown = rss_kib().saturating_sub(before);
    // 20 MB of headers were sent; the server keeps at most 64 KiB of each.
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB");
    f.assert_serving();
}

#[test]
fn wrong_path_and_missing_auth_get_http_errors() {
    let f = fixture(|_| {});
    for (path, auth, want) in [("/other", true, "404"), (PATH, false, "401")] {
        let mut s = f.tls_stream();
        let auth = if auth {
            format!("Authorization: Bearer {BAD_TOKEN}\r\n")
        } else {
            String::new()
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want}")),
            "{path}: {text}"
        );
    }
    f.assert_serving();
}

#[test]
fn clients_that_never_finish_the_handshake() {
    let f = fixture(|c| {
        c.handshake_timeout = Duration::from_secs(1);
        c.max_handshakes = 4;
    });
    let addr = f.server.local_addr();
    // A TLS session that never sends the upgrade, half a TLS ClientHello, and
    // silent TCP, more than the handshake slots (those beyond are dropped at once).
    let mut tls_only = f.tls_stream();
    tls_only.write_all(b"GET ").unwrap();
    tls_only.flush().unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    let _ = half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]);
    let mut idle: Vec<TcpStream> = vec![half];
    idle.extend((0..10).map(|_| TcpStream::connect(addr).unwrap()));
    // The server hangs up on each within the handshake deadline (plus slack), never later.
    for s in &mut idle {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let started = Instant::now();
        let r = s.read(&mut [0u8; 64]);
        assert!(
            matches!(r, Ok(0) | Err(_)) || started.elapsed() < WAIT,
            "{r:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "slow-loris connection held open"
        );
    }
    let mut buf = [0u8; 16];
    assert!(matches!(tls_only.read(&mut buf), Ok(0) | Err(_)));
    // TLS closed mid-handshake.
    let mut cut = TcpStream::connect(addr).unwrap();
    cut.write_all(&[0x16, 0x03, 0x01]).unwrap();
    drop(cut);
    // A new agent gets in once slots free up.
    let mut late = agent_config(&f.pki, addr, &[]);
    late.tls = Some(tls::client_config(f.pki.ca_pem.as_bytes(), None).unwrap());
    late.token = Some(BAD_TOKEN.into());
    let late = Agent::start(late).unwrap();
    assert!(
        late.wait_connected(WAIT),
        "server stopped accepting after slow clients"
    );
    drop(late);
    f.assert_serving();
}

/// A hostile *server*: the agent answers bad Connects with an Error for that
/// connection and keeps the session; a malformed frame ends the session and
/// the agent reconnects.
#[test]
fn agent_survives_hostile_server_messages() {
    let echo = echo_server();
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let policy = AllowList(vec![format!("tcp/{echo}").parse().unwrap()]);
    let mut config = AgentConfig::new(
        format!("ws://{addr}{PATH}"),
        Arc::new(policy),
        Arc::new(OsDialer::default()),
    );
    config.backoff_initial = Duration::from_millis(50);
    let agent = Agent::start(config).unwrap();

    let (tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut ws = tungstenite::accept(tcp).unwrap();
    let mut oversized = b"tcp/".to_vec();
    oversized.extend(std::iter::repeat_n(b'1', 300));
    let send = |ws: &mut tungstenite::WebSocket<TcpStream>, m: Vec<u8>| {
        ws.send(Message::Binary(m.into())).unwrap()
    };
    send(&mut ws, encode(1, 2, MessageType::Connect, &oversized));
    send(
        &mut ws,
        encode(2, 3, MessageType::Connect, b"tcp/127.0.0.1:22"),
    );
    send(
        &mut ws,
        encode(3, 4, MessageType::Connect, format!("tcp/{echo}").as_bytes()),
    );
    send(&mut ws, encode(4, 4, MessageType::Data, b"ping"));
    let mut errors = Vec::new();
    let mut echoed = Vec::new();
    while errors.len() < 2 || echoed.len() < 4 {
        if let Message::Binary(b) = ws.read().unwrap() {
            let m = decode(&b).unwrap();
            match m.body {
                Body::Error(t) => errors.push((m.conn_id, String::from_utf8_lossy(t).into_owned())),
                Body::Data(d) if m.conn_id == 4 => echoed.extend_from_slice(d),
                _ => {}
            }
        }
    }
    assert_eq!(
        errors,
        [
            (2, "failed to parse connect address".into()),
            (3, "connect not allowed".into())
        ]
    );
    assert_eq!(echoed, b"ping");
    // Now a malformed header: the agent drops this session and comes back.
    send(&mut ws, vec![0x02, 0x80]);
    loop {
        match ws.read() {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let (tcp, _) = listener.accept().unwrap();
    let _ws = tungstenite::accept(tcp).unwrap();
    assert!(agent.wait_connected(WAIT));
    assert!(agent.status().sessions >= 2);
}

/// Defect 5 of the hardening review: an authenticated client that floods
/// Connects (each answered with an Error) and never reads used to grow the
/// server's outbound control queue without limit (40 MB of Connects: RSS
/// from 8 MB to 397 MB). The session now stops reading while its control
/// queue is full, so the flood backs up into the client's own socket.
#[test]
fn connect_flood_from_a_client_that_never_reads_is_bounded() {
    // Four million Connect messages (about 70 MB), or 15 s, whichever comes first.
    const FRAMES: i64 = 4_000_000;
    const TIME: Duration = Duration::from_secs(15);
    let f = fixture(|_| {});
    let mut ws = f.bad_client();
    // Pushback shows as a write that cannot finish.
    ws.get_mut()
        .sock
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let before = rss_kib();
    let mut peak = before;
    let started = Instant::now();
    let (mut sent, mut bytes) = (0i64, 0usize);
    let mut pushed_back = false;
    while sent < FRAMES && started.elapsed() < TIME {
        let frame = encode(sent + 1, sent + 2, MessageType::Connect, b"tcp/a:1");
        bytes += frame.len();
        if ws.write(Message::Binary(frame.into())).is_err() {
            pushed_back = true;
            break;
        }
        sent += 1;
        if sent % 4096 == 0 {
            if ws.flush().is_err() {
                pushed_back = true;
                break;
            }
            peak = peak.max(rss_kib());
        }
    }
    peak = peak.max(rss_kib());
    let grown = peak.saturating_sub(before);
    println!(
        "connect flood: {sent} messages ({bytes} bytes) in {:?}, pushed back: {pushed_back}; \
         RSS {before} KiB before, peak growth {grown} KiB",
        started.elapsed()
    );
    // The session holds at most max_control_queue (4096) small frames plus
    // socket and TLS buffers: far under what the flood would take.
    assert!(
        grown < 48 * 1024,
        "RSS grew by {grown} KiB under a Connect flood of {bytes} bytes"
    );
    // The flooder's session is stuck, not the server: the good agent is served
    // while it is still connected, and after it goes.
    f.assert_serving();
    drop(ws);
    f.assert_serving();
}
