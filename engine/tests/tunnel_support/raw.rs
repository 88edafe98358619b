//! Clients the library does not have, for admission tests: TCP from a
//! chosen loopback source address (the library's clients cannot bind one,
//! and admission counts per source), and a relay registration done by hand
//! over any byte stream.
//!
//! Shared by the engine's tunnel tests and the `meshvpn` hostile suite
//! (`cli/tests/hostile`, included by path), so it uses only crates both
//! have: std, socket2, rustls, tungstenite, boringtun and the engine.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::StaticSecret;
use meshvpn_engine::relay::protocol::{check_accepted, prove, EXPORTER_LABEL, EXPORTER_LEN};
use tungstenite::{Message, WebSocket};

/// A second source address on loopback.
pub const OTHER_SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to `to` from `source` (port chosen by the system), with
/// `timeout` for the connect and every later read and write.
pub fn tcp_from(source: IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(source, 0).into())?;
    sock.connect_timeout(&to.into(), timeout)?;
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Whether the server closed (or reset) `tcp` within its read timeout;
/// `false` when it was still open at the timeout.
pub fn closed_by_server(tcp: &mut TcpStream) -> bool {
    match tcp.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// TLS over `tcp` to the test certificates' `127.0.0.1`, handshake done.
pub fn tls_over(tcp: TcpStream, config: Arc<rustls::ClientConfig>) -> std::io::Result<TlsStream> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The value a relay key proof is bound to: the TLS exporter, or zeros on
/// a plain connection (as the library does).
pub trait Exporter {
    fn exporter(&self) -> [u8; EXPORTER_LEN];
}

impl Exporter for TcpStream {
    fn exporter(&self) -> [u8; EXPORTER_LEN] {
        [0; EXPORTER_LEN]
    }
}

impl Exporter for TlsStream {
    fn exporter(&self) -> [u8; EXPORTER_LEN] {
        self.conn
            .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
            .expect("TLS exporter")
    }
}

fn binary<S: Read + Write>(ws: &mut WebSocket<S>) -> Result<Vec<u8>, String> {
    for _ in 0..16 {
        match ws.read() {
            Ok(Message::Binary(b)) => return Ok(b.to_vec()),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Ok(other) => return Err(format!("relay sent {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("no binary message from the relay".into())
}

/// Upgrades `stream` on `url` (`ws://` or `wss://`, the stream already
/// speaks TLS for the latter) and registers a fresh WireGuard key with the
/// relay. `Ok` holds the registered session open; `Err` says why the relay
/// refused (e.g. `HTTP error: 503 Service Unavailable`).
pub fn relay_register<S: Read + Write + Exporter>(
    stream: S,
    url: &str,
) -> Result<WebSocket<S>, String> {
    let (mut ws, _) = tungstenite::client(url, stream).map_err(|e| e.to_string())?;
    let challenge = binary(&mut ws)?;
    let secret = StaticSecret::from(*meshvpn_engine::PrivateKey::generate().as_bytes());
    let proof = prove(&challenge, &secret, &ws.get_ref().exporter()).map_err(|e| e.to_string())?;
    ws.send(Message::binary(proof.to_vec()))
        .map_err(|e| e.to_string())?;
    check_accepted(&binary(&mut ws)?).map_err(|e| e.to_string())?;
    Ok(ws)
}
