//! Hostile cases: admission of the tunnel server's listener. One source
//! (127.0.0.2, or a few: 127.0.0.2-5) holds idle TCP connections, dribbles
//! its upgrade headers, or registers relay sessions in bulk; the server
//! holds each source to its per-source caps, its threads and files stay
//! under what the caps imply, and the legitimate agent and relay client
//! (from 127.0.0.1) get through during and after.

#[path = "../../../engine/tests/tunnel_support/raw.rs"]
mod raw;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::common::{
    legit_agent_connects, legit_relay_client_registers, Ceilings, Sampler, Server,
};
use raw::{closed_by_server, relay_register, tcp_from, tls_over};

/// The server's defaults these cases attack (`meshvpn tunnel serve
/// --help`): handshakes in progress per source, relay sessions per source.
const HANDSHAKES_PER_SOURCE: usize = 16;
const RELAY_SESSIONS_PER_SOURCE: usize = 32;

fn source(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// An attack running on its own thread until `stop` (or its own bounds);
/// returns what it counted.
struct Attack {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<String>,
}

impl Attack {
    fn start(f: impl FnOnce(&AtomicBool) -> String + Send + 'static) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Attack {
            stop,
            thread: std::thread::spawn(move || f(&flag)),
        }
    }

    fn finish(self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("attack thread")
    }
}

/// Both legitimate clients get through within `within`.
fn legit_clients_get_through(server: &Server, when: &str) {
    let agent = legit_agent_connects(server, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{when}: {e}"));
    let relay = legit_relay_client_registers(server, None, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{when}: {e}"));
    println!("{when}: agent connected in {agent:?}, relay client registered in {relay:?}");
}

/// 300 bare TCP connections from 127.0.0.2 (more than the 256 handshake
/// slots in all), held open and reopened when closed, for 8 s.
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn idle_connections_from_one_source_beyond_its_cap() {
    let server = Server::start(&["--relay"]);
    let before = server.daemon.usage();
    let sampler = Sampler::start(server.daemon.pid());
    let addr = server.addr;
    let attack = Attack::start(move |stop| {
        let started = Instant::now();
        let mut held: Vec<TcpStream> = Vec::new();
        let (mut opened, mut closed_at_once) = (0usize, 0usize);
        while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(20) {
            // Top up to 300 held, at most 2000 connections in all.
            while held.len() < 300 && opened < 2000 {
                let Ok(s) = tcp_from(source(2), addr, Duration::from_millis(500)) else {
                    break;
                };
                opened += 1;
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(50));
            // Drop those the server closed (they are reopened next round).
            held.retain_mut(|s| {
                s.set_read_timeout(Some(Duration::from_millis(1))).ok();
                let closed = closed_by_server(s);
                closed_at_once += usize::from(closed);
                !closed
            });
        }
        format!(
            "opened {opened}, closed by the server {closed_at_once}, held at the end {}",
            held.len()
        )
    });
    // Let the attack fill what it can first.
    std::thread::sleep(Duration::from_millis(1500));
    legit_clients_get_through(&server, "during idle connections");
    std::thread::sleep(Duration::from_secs(3));
    let counted = attack.finish();
    legit_clients_get_through(&server, "after idle connections");
    let peak = sampler.finish();
    println!("idle connections from 127.0.0.2: {counted}");
    // The baseline's 32 threads and 64 files, plus one handshake thread and
    // socket per connection the source may hold.
    Ceilings {
        rss_mib: 64,
        threads: 32 + HANDSHAKES_PER_SOURCE as u64,
        fds: 64 + HANDSHAKES_PER_SOURCE as u64,
    }
    .check("idle_connections_from_one_source", before, peak);
}

/// From four sources (127.0.0.2-5), 24 connections each (above the cap of
/// 16), TLS done, then the upgrade header one byte at a time: the server
/// holds each source to its cap and cuts each at the handshake deadline
/// (10 s from accept), whatever it has sent.
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn slow_loris_headers_from_a_few_sources() {
    let server = Server::start(&["--relay"]);
    let before = server.daemon.usage();
    let sampler = Sampler::start(server.daemon.pid());
    let addr = server.addr;
    let tls = server.client_tls(false);
    let admitted = Arc::new(AtomicUsize::new(0));
    let counted_admitted = admitted.clone();
    let longest_open = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let longest = longest_open.clone();
    let attack = Attack::start(move |stop| {
        let started = Instant::now();
        let mut conns = Vec::new();
        let mut refused = 0usize;
        for n in 2..=5u8 {
            for _ in 0..24 {
                let Ok(tcp) = tcp_from(source(n), addr, Duration::from_secs(2)) else {
                    refused += 1;
                    continue;
                };
                match tls_over(tcp, tls.clone()) {
                    Ok(t) => conns.push((Instant::now(), t)),
                    Err(_) => refused += 1,
                }
            }
        }
        counted_admitted.store(conns.len(), Ordering::SeqCst);
        let header = b"GET /v1-k3s/connect HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
            Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut sent = 0usize;
        while !stop.load(Ordering::SeqCst)
            && started.elapsed() < Duration::from_secs(16)
            && !conns.is_empty()
        {
            conns.retain_mut(|(opened, t)| {
                let alive = t
                    .write_all(&header[sent % header.len()..][..1])
                    .and_then(|_| t.flush())
                    .is_ok();
                if alive {
                    let mut l = longest.lock().unwrap();
                    *l = l.max(opened.elapsed());
                }
                alive
            });
            sent += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        format!(
            "admitted {}, refused at once {refused}, still open at the end {}, longest held open {:?}, header bytes sent per connection {sent}",
            counted_admitted.load(Ordering::SeqCst),
            conns.len(),
            longest.lock().unwrap()
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    legit_clients_get_through(&server, "during slow-loris headers");
    // The attack runs past the handshake deadline on its own (16 s at most).
    let counted = attack.thread.join().expect("attack thread");
    legit_clients_get_through(&server, "after slow-loris headers");
    let peak = sampler.finish();
    println!("slow-loris headers from 127.0.0.2-5: {counted}; peak {peak}");
    let admitted = admitted.load(Ordering::SeqCst);
    assert!(
        admitted <= 4 * HANDSHAKES_PER_SOURCE,
        "{admitted} slow handshakes admitted from 4 sources with a cap of {HANDSHAKES_PER_SOURCE} each"
    );
    let longest = *longest_open.lock().unwrap();
    assert!(
        longest < Duration::from_secs(12),
        "a connection dribbling its header was held open {longest:?}, past the 10 s handshake deadline"
    );
    Ceilings {
        rss_mib: 64,
        threads: 32 + 4 * HANDSHAKES_PER_SOURCE as u64,
        fds: 64 + 4 * HANDSHAKES_PER_SOURCE as u64,
    }
    .check("slow_loris_headers", before, peak);
}

/// 600 relay registrations in a few seconds: 300 from 127.0.0.2 and 100
/// from each of 127.0.0.3-5, each held open; the server keeps at most the
/// per-source cap of sessions from each source.
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn relay_registrations_in_bulk() {
    let server = Server::start(&["--relay"]);
    let before = server.daemon.usage();
    let sampler = Sampler::start(server.daemon.pid());
    let addr = server.addr;
    let tls = server.client_tls(false);
    let url = server.relay_url();
    let registered = Arc::new(AtomicUsize::new(0));
    let count = registered.clone();
    let attack = Attack::start(move |stop| {
        let started = Instant::now();
        let mut held = Vec::new();
        let mut refused = 0usize;
        let plan = [(2u8, 300usize), (3, 100), (4, 100), (5, 100)];
        'sources: for (n, tries) in plan {
            for _ in 0..tries {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(20) {
                    break 'sources;
                }
                let registration = tcp_from(source(n), addr, Duration::from_secs(2))
                    .map_err(|e| e.to_string())
                    .and_then(|tcp| tls_over(tcp, tls.clone()).map_err(|e| e.to_string()))
                    .and_then(|t| relay_register(t, &url));
                match registration {
                    Ok(ws) => held.push(ws),
                    Err(_) => refused += 1,
                }
            }
        }
        count.store(held.len(), Ordering::SeqCst);
        let took = started.elapsed();
        while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(25) {
            std::thread::sleep(Duration::from_millis(50));
        }
        format!(
            "600 registrations in {took:?}: {} held, {refused} refused",
            held.len()
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    legit_clients_get_through(&server, "during relay registrations in bulk");
    // Until the bulk is through (bounded by the attack's own 20 s).
    let t = Instant::now();
    while registered.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(22) {
        std::thread::sleep(Duration::from_millis(100));
    }
    legit_clients_get_through(&server, "with the bulk registered");
    let counted = attack.finish();
    legit_clients_get_through(&server, "after relay registrations in bulk");
    let peak = sampler.finish();
    println!("relay registrations in bulk: {counted}; peak {peak}");
    let held = registered.load(Ordering::SeqCst);
    assert!(
        held <= 4 * RELAY_SESSIONS_PER_SOURCE,
        "{held} relay sessions held from 4 sources with a cap of {RELAY_SESSIONS_PER_SOURCE} each"
    );
    // A relay session is one thread and three files (socket, epoll,
    // eventfd); a handshake one thread and one socket.
    let sessions = 4 * RELAY_SESSIONS_PER_SOURCE as u64;
    let handshakes = 4 * HANDSHAKES_PER_SOURCE as u64;
    Ceilings {
        rss_mib: 128,
        threads: 32 + sessions + handshakes,
        fds: 64 + 3 * sessions + handshakes,
    }
    .check("relay_registrations_in_bulk", before, peak);
}
