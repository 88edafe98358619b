//! Hostile cases against the relay of `meshvpn tunnel serve --relay`:
//! clients that register a fresh key (no `--relay-keys`, no
//! `--relay-require-auth`: anyone may), flood 64 KiB frames addressed to
//! themselves and never read what the relay sends back.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use bytes::Bytes;
use meshvpn_engine::relay::protocol::{self as relay, Frame, EXPORTER_LABEL, EXPORTER_LEN};
use rustls::pki_types::ServerName;
use tungstenite::{Message, WebSocket};

use crate::common::{
    legit_agent_connects, legit_relay_client_registers, Ceilings, Sampler, Server,
};

type TlsWs = WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// A relay client built from the engine's public protocol pieces: TLS, the
/// websocket upgrade, the key proof; after that it only writes.
struct RawRelayClient {
    ws: TlsWs,
    key: [u8; relay::KEY_LEN],
}

fn binary(ws: &mut TlsWs) -> Result<Bytes, String> {
    for _ in 0..16 {
        match ws.read().map_err(|e| e.to_string())? {
            Message::Binary(b) => return Ok(b),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            other => return Err(format!("unexpected relay message {other:?}")),
        }
    }
    Err("no relay handshake message".into())
}

impl RawRelayClient {
    /// Upgrades on the relay path and registers a fresh WireGuard key.
    fn register(server: &Server) -> Result<RawRelayClient, String> {
        let tcp = TcpStream::connect(server.addr).map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(server.client_tls(false), name)
            .map_err(|e| e.to_string())?;
        let stream = rustls::StreamOwned::new(conn, tcp);
        let (mut ws, _) =
            tungstenite::client(server.relay_url(), stream).map_err(|e| e.to_string())?;
        let challenge = binary(&mut ws)?;
        let mut exporter = [0u8; EXPORTER_LEN];
        exporter = ws
            .get_ref()
            .conn
            .export_keying_material(exporter, EXPORTER_LABEL, None)
            .map_err(|e| e.to_string())?;
        let secret = StaticSecret::from(*meshvpn_engine::PrivateKey::generate().as_bytes());
        let key = *boringtun::x25519::PublicKey::from(&secret).as_bytes();
        let proof = relay::prove(&challenge, &secret, &exporter).map_err(|e| e.to_string())?;
        ws.send(Message::Binary(Bytes::copy_from_slice(&proof)))
            .map_err(|e| e.to_string())?;
        relay::check_accepted(&binary(&mut ws)?).map_err(|e| e.to_string())?;
        Ok(RawRelayClient { ws, key })
    }

    /// Sends up to `count` frames of `frame_len` bytes to its own key for at
    /// most `within`, never reading; returns how many the socket took.
    fn flood_self(&mut self, frame_len: usize, count: usize, within: Duration) -> usize {
        let datagram = vec![0x04u8; frame_len - relay::KEY_LEN];
        let frame = Bytes::from(Frame::encode(&self.key, &datagram).expect("frame"));
        let t = Instant::now();
        let mut sent = 0;
        while sent < count && t.elapsed() < within {
            if self.ws.send(Message::Binary(frame.clone())).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }
}

/// How many log lines of the server say a relay session ended.
fn relay_sessions_ended(server: &Server) -> usize {
    server
        .daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("relay: client gone"))
        .count()
}

/// Eight clients register, each sends 64 KiB frames to its own key (up to
/// 1100 each, for at most 6 s) and never reads. The relay's queues are
/// bounded in bytes (1 MiB per session, 64 MiB in all by default): the
/// server's memory stays near its baseline, a legitimate agent and relay
/// client get through during and after, and the relay closes the sessions
/// that do not read once their writes make no progress for the write
/// timeout (10 s by default).
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn relay_clients_flooding_their_own_key_and_never_reading() {
    const CLIENTS: usize = 8;
    const FRAME: usize = 64 << 10;
    const FRAMES: usize = 1100;
    const FLOOD_FOR: Duration = Duration::from_secs(6);
    let server = Arc::new(Server::start(&["--relay"]));
    let before = server.daemon.usage();
    let sampler = Sampler::start(server.daemon.pid());

    let flooders: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || {
                let mut c = RawRelayClient::register(&server).expect("flooder registers");
                let sent = c.flood_self(FRAME, FRAMES, FLOOD_FOR);
                (c, sent)
            })
        })
        .collect();
    // During the flood.
    let agent_during = legit_agent_connects(&server, Duration::from_secs(10));
    let relay_during = legit_relay_client_registers(&server, None, Duration::from_secs(10));
    let flooders: Vec<(RawRelayClient, usize)> = flooders
        .into_iter()
        .map(|t| t.join().expect("flooder thread"))
        .collect();
    let sent: usize = flooders.iter().map(|(_, n)| n).sum();
    // After the flood, the flooders still connected and not reading.
    let agent_after = legit_agent_connects(&server, Duration::from_secs(10));
    let relay_after = legit_relay_client_registers(&server, None, Duration::from_secs(10));
    let peak = sampler.finish();
    println!(
        "relay flood: {CLIENTS} clients sent {sent} frames of {FRAME} bytes ({:.0} MiB)",
        (sent * FRAME) as f64 / (1 << 20) as f64
    );
    // RSS: a 16 MiB baseline allowance plus, per flooder, its 1 MiB queue
    // and at most ~0.5 MiB of websocket/TLS buffers, rounded up (unfixed:
    // 524 MiB). Threads and fds: one per session plus the listener's own.
    Ceilings {
        rss_mib: 48,
        threads: 32,
        fds: 64,
    }
    .check("relay_flood_never_reading", before, peak);
    agent_during.expect("agent during the flood");
    relay_during.expect("relay client during the flood");
    agent_after.expect("agent after the flood");
    relay_after.expect("relay client after the flood");

    // The write timeout (10 s without progress) ends every flooder's
    // session; the two legitimate relay clients' sessions ended already.
    let t = Instant::now();
    while relay_sessions_ended(&server) < CLIENTS + 2 && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = relay_sessions_ended(&server);
    let slow = server
        .daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("relay: client gone") && l.contains("no write progress"))
        .count();
    println!("relay flood: {ended} relay sessions ended, {slow} for no write progress");
    assert_eq!(
        slow, CLIENTS,
        "every non-reading flooder is closed by the write timeout"
    );
    drop(flooders);
    let after = server.daemon.usage();
    println!("relay flood: after the flooders were closed: {after}");
}
