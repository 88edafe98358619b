//! Hostile case: the STUN server of `meshvpn tunnel serve` flooded with
//! Binding requests from 40 sources (127.0.0.2-41) for 6 s. Each source
//! gets at most its per-second answers (`--stun-per-source`, default 20),
//! the process's memory, threads and files stay at the baseline (one
//! socket, one thread, a table bounded by `STUN_MAX_SOURCES`), and a
//! legitimate STUN client, agent and relay client get through during and
//! after.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvpn_engine::nat::{DiscoveryConfig, DEFAULT_STUN_PER_SOURCE};
use meshvpn_engine::wg::stun::probe;
use meshvpn_engine::wire::stun::encode_binding_request;

use super::common::{
    legit_agent_connects, legit_relay_client_registers, Ceilings, Sampler, Server,
};

const SOURCES: u8 = 40;

#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn stun_flood_from_many_sources() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stun: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Server::start(&["--relay", "--stun-listen", &stun.to_string()]);
    let before = server.daemon.usage();
    let sampler = Sampler::start(server.daemon.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let attack = std::thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (2..2 + SOURCES)
            .map(|n| {
                let s =
                    UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0))
                        .expect("attacker socket");
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let mut req = [0u8; 32];
        let len = encode_binding_request(&[9; 12], None, false, &mut req).unwrap();
        let started = Instant::now();
        let (mut sent, mut answers) = (0u64, 0u64);
        let mut buf = [0u8; 128];
        // Bounded: 300 000 requests or 10 s.
        while !flag.load(Ordering::SeqCst)
            && sent < 300_000
            && started.elapsed() < Duration::from_secs(10)
        {
            for s in &sockets {
                for _ in 0..10 {
                    if s.send_to(&req[..len], stun).is_ok() {
                        sent += 1;
                    }
                }
                while s.recv(&mut buf).is_ok() {
                    answers += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(200));
        for s in &sockets {
            while s.recv(&mut buf).is_ok() {
                answers += 1;
            }
        }
        (sent, answers, started.elapsed())
    });
    std::thread::sleep(Duration::from_secs(2));
    legit(&server, stun, "during the STUN flood");
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::SeqCst);
    let (sent, answers, took) = attack.join().expect("attack thread");
    legit(&server, stun, "after the STUN flood");
    let peak = sampler.finish();
    // Each source's budget per started second (the flood may straddle one
    // more window than its length).
    let cap = u64::from(SOURCES) * u64::from(DEFAULT_STUN_PER_SOURCE) * (took.as_secs() + 2);
    println!("STUN flood from {SOURCES} sources: {sent} requests in {took:?}, {answers} answers (cap {cap})");
    assert!(
        answers <= cap,
        "{answers} answers, more than the per-source budget {cap}"
    );
    assert!(
        answers >= u64::from(SOURCES) * u64::from(DEFAULT_STUN_PER_SOURCE),
        "{answers} answers: the server stopped answering altogether"
    );
    assert!(
        sent > 10 * answers,
        "the flood was too small to test the cap: {sent} sent"
    );
    // The baseline's ceilings: the flood adds nothing.
    Ceilings {
        rss_mib: 64,
        threads: 32,
        fds: 64,
    }
    .check("stun_flood_from_many_sources", before, peak);
}

fn legit(server: &Server, stun: SocketAddr, when: &str) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let config = DiscoveryConfig {
        rto: Duration::from_millis(100),
        max_transmits: 5,
    };
    let d = probe(&socket, &[stun], config).expect("probe");
    let seen = d.results().next().and_then(|r| r.1);
    assert_eq!(
        seen,
        Some(socket.local_addr().unwrap()),
        "{when}: STUN client not answered"
    );
    let agent = legit_agent_connects(server, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{when}: {e}"));
    let relay = legit_relay_client_registers(server, None, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{when}: {e}"));
    println!(
        "{when}: STUN answered, agent connected in {agent:?}, relay client registered in {relay:?}"
    );
}
