//! The STUN server thread and the blocking probe over loopback: answers
//! carry the client's address, a flooding source is capped while another
//! source is served, and non-STUN datagrams get nothing.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshvpn_engine::nat::{DiscoveryConfig, Mapping};
use meshvpn_engine::wg::stun::{probe, StunServer, StunServerConfig};
use meshvpn_engine::wire::stun::{encode_binding_request, is_stun};

fn server(config: StunServerConfig) -> StunServer {
    StunServer::bind("127.0.0.1:0".parse().unwrap(), config).unwrap()
}

fn quick() -> DiscoveryConfig {
    DiscoveryConfig {
        rto: Duration::from_millis(100),
        max_transmits: 3,
    }
}

#[test]
fn probe_learns_its_source_address_from_two_servers() {
    let (a, b) = (server(Default::default()), server(Default::default()));
    let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
    let d = probe(&socket, &[a.local_addr(), b.local_addr()], quick()).unwrap();
    let me = socket.local_addr().unwrap();
    let results: Vec<_> = d.results().collect();
    assert_eq!(
        results,
        [(a.local_addr(), Some(me)), (b.local_addr(), Some(me))]
    );
    assert_eq!(d.mapping(), Mapping::EndpointIndependent(me));
    assert_eq!(d.stats().answers, 2);
}

#[test]
fn a_server_that_does_not_answer_times_out() {
    // A bound socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
    let start = Instant::now();
    let d = probe(&socket, &[silent.local_addr().unwrap()], quick()).unwrap();
    // 3 transmissions at 0, 100, 300 ms, then 16 x 100 ms.
    assert!(start.elapsed() >= Duration::from_millis(1900));
    let s = d.stats();
    assert_eq!((s.requests, s.retransmits, s.timeouts), (1, 2, 1));
    assert_eq!(d.mapping(), Mapping::Unknown);
}

/// Reads answers on `socket` until it stays quiet for 300 ms (at most 5 s).
fn drain(socket: &UdpSocket) -> usize {
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    let mut n = 0;
    while Instant::now() < end {
        match socket.recv(&mut buf) {
            Ok(len) => {
                assert!(is_stun(&buf[..len]));
                n += 1;
            }
            Err(_) => break,
        }
    }
    n
}

#[test]
fn a_flooding_source_is_capped_and_another_is_still_served() {
    let s = server(StunServerConfig {
        per_source: 10,
        ..Default::default()
    });
    let flood = UdpSocket::bind("127.0.0.3:0").unwrap();
    let mut req = [0u8; 64];
    let len = encode_binding_request(&[7; 12], None, false, &mut req).unwrap();
    let seen = || {
        s.stats().rate_limited.load(Ordering::Relaxed) + s.stats().answered.load(Ordering::Relaxed)
    };
    // Bursts of 50, each waited for (at most 2 s), so no request is lost
    // to a full socket buffer and every one must be counted.
    let start = Instant::now();
    for burst in 1..=10u64 {
        for _ in 0..50 {
            flood.send_to(&req[..len], s.local_addr()).unwrap();
        }
        let end = Instant::now() + Duration::from_secs(2);
        while seen() < burst * 50 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let sent_for = start.elapsed();
    let answers = drain(&flood);
    // Ten per one-second window; the flood may straddle a window or two.
    let windows = sent_for.as_secs() as usize + 2;
    println!("flood: 500 requests in {sent_for:?}, {answers} answers");
    assert!((10..=10 * windows).contains(&answers), "{answers} answers");
    let limited = s.stats().rate_limited.load(Ordering::Relaxed) as usize;
    let answered = s.stats().answered.load(Ordering::Relaxed) as usize;
    assert_eq!(answered, answers);
    assert_eq!(limited + answered, 500);
    // Another source, during the same window.
    let other = UdpSocket::bind("127.0.0.2:0").unwrap();
    let d = probe(&other, &[s.local_addr()], quick()).unwrap();
    assert_eq!(
        d.results().next().unwrap().1,
        Some(other.local_addr().unwrap())
    );
}

#[test]
fn non_stun_and_wireguard_datagrams_get_no_answer() {
    let s = server(Default::default());
    let c = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut keepalive = [0u8; 32];
    keepalive[0] = 4;
    let mut initiation = [0u8; 148];
    initiation[0] = 1;
    initiation[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    for d in [&b"hello"[..], &keepalive, &initiation, &[0u8; 20]] {
        c.send_to(d, s.local_addr()).unwrap();
    }
    assert_eq!(drain(&c), 0);
    let end = Instant::now() + Duration::from_secs(5);
    while s.stats().malformed.load(Ordering::Relaxed) < 4 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.stats().malformed.load(Ordering::Relaxed), 4);
    assert_eq!(s.stats().answered.load(Ordering::Relaxed), 0);
    let addr: SocketAddr = s.local_addr();
    assert!(probe(&c, &[addr], quick()).unwrap().stats().answers == 1);
}
