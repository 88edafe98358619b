//! TCP through the userspace stack between engines over real loopback UDP.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::stacks::{bulk_bytes, recv_all, send_pattern, stack_mesh, transfer_both_ways};
use meshvpn_engine::NetstackConfig;

#[test]
fn bulk_transfer_both_ways_arrives_intact() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let bytes = bulk_bytes();
    let t = Instant::now();
    transfer_both_ways(&nodes[0], &nodes[1], false, bytes, Duration::from_secs(120));
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} MiB each way in {secs:.2} s ({:.2} Gbit/s total)",
        bytes >> 20,
        (2 * bytes * 8) as f64 / secs / 1e9
    );
    let stats = nodes[1].stack.stats();
    assert_eq!(stats.tx_unroutable, 0);
}

#[test]
fn bulk_transfer_arrives_intact_while_the_stack_lock_is_contended() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let nodes = stack_mesh(2, NetstackConfig::default());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Other callers take the stack lock over and over (through
        // `stats`), so received batches meet a busy stack and take the
        // queue to its thread as often as they run on the receive thread.
        s.spawn(|| {
            for _ in 0..50_000_000u64 {
                if stop.load(Relaxed) {
                    return;
                }
                for n in &nodes {
                    std::hint::black_box(n.stack.stats());
                }
            }
        });
        transfer_both_ways(
            &nodes[0],
            &nodes[1],
            false,
            64 << 20,
            Duration::from_secs(120),
        );
        stop.store(true, Relaxed);
    });
    assert_eq!(nodes[1].stack.stats().tx_unroutable, 0);
}

#[test]
fn transfer_over_v6_inner_addresses() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    transfer_both_ways(&nodes[0], &nodes[1], true, 4 << 20, Duration::from_secs(60));
}

#[test]
fn a_thousand_concurrent_short_connections() {
    const N: usize = 1000;
    let config = NetstackConfig {
        max_sockets: N + 64,
        tcp_rx_buffer: 4 << 10,
        tcp_tx_buffer: 4 << 10,
        ..Default::default()
    };
    let nodes = stack_mesh(2, config);
    let (a, b) = (&nodes[0], &nodes[1]);
    let addr = SocketAddr::new(b.node.v4, 7000);
    let listener = b.stack.tcp_listen(addr, N).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        // The server holds every connection open until it has all of them,
        // then answers each request with its reverse.
        let server = s.spawn(|| {
            let mut conns = Vec::with_capacity(N);
            while conns.len() < N {
                assert!(Instant::now() < deadline, "accepted only {}", conns.len());
                let (c, _) = listener
                    .accept_timeout(Some(Duration::from_secs(20)))
                    .expect("accept");
                conns.push(c);
            }
            for mut c in conns.iter() {
                c.set_read_timeout(Some(Duration::from_secs(20)));
                let mut req = [0u8; 8];
                c.read_exact(&mut req).unwrap();
                req.reverse();
                c.write_all(&req).unwrap();
            }
            conns
        });
        let mut clients = Vec::with_capacity(N);
        for _ in 0..N {
            clients.push(
                a.stack
                    .tcp_connect(addr, Some(Duration::from_secs(20)))
                    .expect("connect"),
            );
        }
        // All N are open at once on both engines.
        assert!(a.stack.stats().sockets >= N);
        for (i, mut c) in clients.iter().enumerate() {
            c.write_all(&(i as u64).to_be_bytes()).unwrap();
        }
        for (i, mut c) in clients.iter().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(20)));
            let mut resp = [0u8; 8];
            c.read_exact(&mut resp).unwrap();
            resp.reverse();
            assert_eq!(u64::from_be_bytes(resp), i as u64);
        }
        let server_conns = server.join().unwrap();
        assert!(b.stack.stats().sockets >= N);
        drop(clients);
        drop(server_conns);
    });
    // Closed connections finish closing and free their sockets.
    assert!(common::wait_until(Duration::from_secs(10), || {
        a.stack.stats().sockets == 0 && b.stack.stats().sockets == 0
    }));
}

/// The receiving stack acknowledges in-order bulk data every few segments,
/// not every second one (RFC 9293's rule): each ACK costs an encryption and
/// a UDP send, and the sending stack's window grows by the bytes an ACK
/// covers, so fewer ACKs do not slow it down.
#[test]
fn bulk_data_is_acknowledged_every_few_segments() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let bytes: u64 = 32 << 20;
    let deadline = Instant::now() + Duration::from_secs(60);
    let at = SocketAddr::new(b.addr(false), 5002);
    let listener = b.stack.tcp_listen(at, 1).unwrap();
    std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let (conn, _) = listener
                .accept_timeout(Some(Duration::from_secs(60)))
                .expect("accept");
            recv_all(&conn, deadline)
        });
        let conn = a
            .stack
            .tcp_connect(at, Some(Duration::from_secs(60)))
            .expect("connect");
        let sent = send_pattern(&conn, bytes, 7, deadline);
        let (got, hash) = receiver.join().unwrap();
        assert_eq!((got, hash), (bytes, sent), "stream arrives whole");
    });
    let stats = b.node.engine.peer_stats(&a.node.key.public_key()).unwrap();
    let (segments, acks) = (stats.rx_packets, stats.tx_packets);
    eprintln!("{segments} packets in, {acks} out for {} MiB", bytes >> 20);
    assert!(
        segments > bytes / 1500,
        "the data came as {segments} packets"
    );
    assert!(
        acks * 4 < segments,
        "{acks} packets sent back for {segments} received"
    );
}
