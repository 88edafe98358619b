//! Rough in-process throughput probe: engine A sends 1420-byte packets to
//! engine B over loopback UDP for a few seconds; prints the delivered rate.
//! `cargo run --release -p meshvpn-engine --example throughput`
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvpn_engine::{Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PrivateKey};

fn main() {
    let batched = std::env::args().any(|a| a == "--batched");
    let ka = PrivateKey::generate();
    let kb = PrivateKey::generate();
    let mk = |k: &PrivateKey| {
        Engine::new(&Config {
            interface: InterfaceConfig {
                private_key: Some(k.clone()),
                listen_port: Some(0),
                ..Default::default()
            },
            peers: vec![],
        })
        .unwrap()
    };
    let a = Arc::new(mk(&ka));
    let b = Arc::new(mk(&kb));
    let (ia, ib): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    let mut pa = PeerConfig::new(kb.public_key());
    pa.endpoint = Some(SocketAddr::new(
        "127.0.0.1".parse().unwrap(),
        b.listen_port(),
    ));
    pa.allowed_ips = vec![IpPrefix::host(ib)];
    a.add_peer(&pa).unwrap();
    let mut pb = PeerConfig::new(ka.public_key());
    pb.endpoint = Some(SocketAddr::new(
        "127.0.0.1".parse().unwrap(),
        a.listen_port(),
    ));
    pb.allowed_ips = vec![IpPrefix::host(ia)];
    b.add_peer(&pb).unwrap();
    let mut pkt = vec![0u8; 1420];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&1420u16.to_be_bytes());
    pkt[9] = 17;
    pkt[12..16].copy_from_slice(&[10, 0, 0, 1]);
    pkt[16..20].copy_from_slice(&[10, 0, 0, 2]);
    a.send_packet(&pkt).unwrap();
    b.recv_packet(Duration::from_secs(5)).expect("handshake");
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let rx = {
        let (b, stop, got) = (b.clone(), stop.clone(), got.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if b.recv_packet(Duration::from_millis(50)).is_some() {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let secs = 3.0;
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        if batched {
            sent += a.send_packets(std::iter::repeat_n(&pkt[..], 32)) as u64;
        } else {
            for _ in 0..32 {
                if a.send_packet(&pkt).is_ok() {
                    sent += 1;
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    let n = got.load(Ordering::Relaxed);
    let el = t.elapsed().as_secs_f64() - 0.2;
    println!(
        "{} sent {sent} delivered {n} ({:.1}% loss): {:.2} Gbit/s inner, {:.0} kpps",
        if batched { "batched" } else { "single " },
        100.0 * (sent - n.min(sent)) as f64 / sent as f64,
        n as f64 * 1420.0 * 8.0 / el / 1e9,
        n as f64 / el / 1e3
    );
}
