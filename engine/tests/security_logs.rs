//! Logs at the most verbose level never contain a secret: private keys,
//! preshared keys, chaining keys or session keys, in any of the forms a
//! log line could print them (base64, hex, a Rust byte-array `Debug`).
//!
//! A capturing subscriber is installed for the whole process at TRACE, then
//! engines go through handshakes (with a preshared key), traffic both ways
//! and a private key change; a reference initiator (whose every chaining
//! key and session key the test knows) handshakes with an engine too.
//! One test per binary: the subscriber is process-global.

mod common;

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::initiator::{tai64n_now, InitiationFields, Initiator};
use common::{mesh, send_and_receive, udp_packet};
use meshvpn_engine::{
    Config, Engine, InterfaceConfig, PeerConfig, PeerUpdate, PresharedKey, PrivateKey,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Capture {
    text: Arc<Mutex<String>>,
    next_id: Arc<AtomicU64>,
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut t = self.text.lock().unwrap();
        let _ = write!(t, "span {}:", attrs.metadata().name());
        attrs.record(&mut Fields(&mut t));
        t.push('\n');
        Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut t = self.text.lock().unwrap();
        values.record(&mut Fields(&mut t));
        t.push('\n');
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut t = self.text.lock().unwrap();
        let m = event.metadata();
        let _ = write!(t, "{} {}:", m.level(), m.target());
        event.record(&mut Fields(&mut t));
        t.push('\n');
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// The forms a 32-byte secret could take in a log line.
fn forms(secret: &[u8; 32]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let debug_prefix = format!("{:?}", &secret[..8]);
    vec![
        b64.clone(),
        b64[..16].to_string(),
        hex.clone(),
        hex.to_uppercase(),
        hex[..16].to_string(),
        debug_prefix.trim_end_matches(']').to_string(),
    ]
}

#[test]
fn trace_logs_never_contain_private_preshared_or_chaining_keys() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(capture.clone()).unwrap();
    let mut secrets: Vec<(String, [u8; 32])> = Vec::new();

    // Two engines with a preshared key: handshake, traffic, key change.
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let psk = PresharedKey::generate();
    secrets.push(("preshared key".into(), *psk.as_bytes()));
    secrets.push(("a private key".into(), *a.key.as_bytes()));
    secrets.push(("b private key".into(), *b.key.as_bytes()));
    let with_psk = PeerUpdate {
        preshared_key: Some(Some(psk.clone())),
        ..Default::default()
    };
    a.engine
        .update_peer(&b.key.public_key(), &with_psk, false)
        .unwrap();
    b.engine
        .update_peer(&a.key.public_key(), &with_psk, false)
        .unwrap();
    for i in 0..3u8 {
        let p = udp_packet(a.v4, b.v4, 100, i);
        assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());
        let q = udp_packet(b.v6, a.v6, 100, i);
        assert!(send_and_receive(&b.engine, &a.engine, &q).is_some());
    }
    let new_key = PrivateKey::generate();
    secrets.push(("a new private key".into(), *new_key.as_bytes()));
    a.engine.set_private_key(Some(new_key.clone()));
    let mut cfg = b.engine.peer_config(&a.key.public_key()).unwrap();
    b.engine.remove_peer(&a.key.public_key());
    cfg.public_key = new_key.public_key();
    b.engine.add_peer(&cfg).unwrap();
    let p = udp_packet(a.v4, b.v4, 100, 9);
    assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());

    // A handshake whose every chaining key we know.
    let own = PrivateKey::generate();
    let peer_key = PrivateKey::generate();
    secrets.push(("responder private key".into(), *own.as_bytes()));
    secrets.push(("initiator private key".into(), *peer_key.as_bytes()));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut pc = PeerConfig::new(peer_key.public_key());
    pc.endpoint = Some(sock.local_addr().unwrap());
    pc.preshared_key = Some(psk.clone());
    pc.allowed_ips = vec!["10.9.0.2/32".parse().unwrap()];
    let engine = Engine::new(&Config {
        interface: InterfaceConfig {
            private_key: Some(own.clone()),
            listen_port: Some(0),
            ..Default::default()
        },
        peers: vec![pc],
    })
    .unwrap();
    let to: SocketAddr = format!("127.0.0.1:{}", engine.listen_port())
        .parse()
        .unwrap();
    let mut init = Initiator::new(
        *peer_key.as_bytes(),
        *own.public_key().as_bytes(),
        Some(*psk.as_bytes()),
    );
    let eph = PrivateKey::generate();
    secrets.push(("initiator ephemeral key".into(), *eph.as_bytes()));
    let msg = init.initiation(&InitiationFields {
        sender_index: 3,
        ephemeral_private: *eph.as_bytes(),
        timestamp: tai64n_now(0),
    });
    sock.send_to(&msg, to).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    let session = init
        .consume_response(&buf[..n])
        .expect("handshake with psk");
    let inner = udp_packet(
        "10.9.0.2".parse().unwrap(),
        "10.9.0.1".parse().unwrap(),
        50,
        1,
    );
    sock.send_to(&session.data(0, &inner), to).unwrap();
    assert!(engine.recv_packet(Duration::from_secs(2)).is_some());
    for (i, ck) in init.chaining_keys.iter().enumerate() {
        secrets.push((format!("chaining key {i}"), *ck));
    }
    secrets.push(("session send key".into(), session.send_key));
    secrets.push(("session receive key".into(), session.recv_key));
    drop(engine);
    drop(nodes);

    let text = capture.text.lock().unwrap().clone();
    assert!(
        text.to_lowercase().contains("handshake") && text.lines().count() > 10,
        "the capture saw nothing, so this test would prove nothing:\n{text}"
    );
    for (what, secret) in &secrets {
        for form in forms(secret) {
            assert!(
                !text.contains(&form),
                "the {what} appears in the logs as `{form}`"
            );
        }
    }
    eprintln!(
        "{} log lines checked for {} secrets",
        text.lines().count(),
        secrets.len()
    );
}
