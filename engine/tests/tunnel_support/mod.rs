//! Shared by the tunnel integration tests: certificates made in-test, an echo
//! target, and a server + agent pair over real TLS.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use meshvpn_engine::supervisor::{
    Agent, AgentConfig, AllowList, OsDialer, ServerAuth, ServerConfig, TunnelServer,
};
use meshvpn_engine::ws::tls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

pub const PATH: &str = "/v1-k3s/connect";
pub const NODE: &str = "system:node:agent1";

pub struct Pki {
    pub ca_pem: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "meshvpn test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".into()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::new()).unwrap();
    cp.distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    cp.distinguished_name.push(DnType::CommonName, NODE);
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

    Pki {
        ca_pem: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A TCP echo service; one thread per connection.
/// Raises this test process's soft limit on open files to the hard limit
/// (what the Go runtime and `meshvpn` do at start) and returns the new soft
/// limit. A stream through the tunnel to an OS target holds two sockets
/// here: the agent's dial and the echo server's accept.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

pub fn server_config(pki: &Pki, tokens: &[(&str, &str)]) -> ServerConfig {
    let tls = tls::server_config(
        pki.server_cert.as_bytes(),
        pki.server_key.as_bytes(),
        Some(pki.ca_pem.as_bytes()),
        false,
    )
    .unwrap();
    let auth = ServerAuth {
        tokens: tokens
            .iter()
            .map(|(t, k)| (t.to_string(), k.to_string()))
            .collect(),
        client_cert_cn: true,
    };
    ServerConfig::new(PATH, Some(tls), auth)
}

pub fn start_server(pki: &Pki, addr: SocketAddr) -> TunnelServer {
    TunnelServer::bind(addr, server_config(pki, &[])).unwrap()
}

pub fn agent_config(pki: &Pki, server: SocketAddr, allow: &[&str]) -> AgentConfig {
    let policy = AllowList(allow.iter().map(|p| p.parse().unwrap()).collect());
    let mut config = AgentConfig::new(
        format!("wss://{server}{PATH}"),
        Arc::new(policy),
        Arc::new(OsDialer::default()),
    );
    config.tls = Some(
        tls::client_config(
            pki.ca_pem.as_bytes(),
            Some((pki.client_cert.as_bytes(), pki.client_key.as_bytes())),
        )
        .unwrap(),
    );
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(500);
    config
}

pub fn start_agent(pki: &Pki, server: SocketAddr, allow: &[&str]) -> Agent {
    Agent::start(agent_config(pki, server, allow)).unwrap()
}

/// Writes `msg` and reads back as many bytes.
pub fn round_trip(mut s: impl Read + Write, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}
