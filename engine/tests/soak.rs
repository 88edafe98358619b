//! A bounded soak (about a minute in release): three engines with
//! userspace stacks carry paced TCP streams while the mesh is disturbed —
//! an endpoint roams, a peer is removed and re-added, a fourth sender
//! floods one engine with handshake initiations, and a private key is
//! swapped (the other nodes then learn the new public key, as an operator
//! would push it).
//!
//! Asserts: the stream between the two nodes whose peering is never
//! reconfigured delivers exactly its bytes; every other stream either
//! fails with an error or delivers exactly its bytes (never other bytes);
//! after the disturbances every pair carries a fresh transfer intact;
//! resident memory stays under the configured ceiling; at shutdown every
//! thread the engines started has been joined and every socket closed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use common::initiator::Initiator;
use common::stacks::{stack_mesh, try_recv_all, try_send_pattern, StackNode};
use common::{
    fd_count, fields, peak_resident_kib, resident_kib, spoofed_sockets, thread_count, wait_until,
};
use meshvpn_engine::{IpPrefix, NetstackConfig, PeerConfig, PrivateKey};

const STREAM_BYTES: u64 = 24 << 20;
/// Each fresh transfer after the disturbances.
const AFTER_BYTES: u64 = 1 << 20;
/// A pause after each 64 KiB write: ~1.6 MB/s per stream, so a stream
/// spans the disturbances (about 15 s) instead of finishing before them.
const PACE: Duration = Duration::from_millis(40);
const PORT: u16 = 7000;

fn config() -> NetstackConfig {
    NetstackConfig {
        max_sockets: 16,
        tcp_rx_buffer: 1 << 20,
        tcp_tx_buffer: 1 << 20,
        rx_queue_packets: 2048,
        ..NetstackConfig::default()
    }
}

/// The netstack ceiling of one node, KiB (see `NetstackConfig`).
fn stack_ceiling_kib(c: &NetstackConfig) -> u64 {
    ((c.max_sockets * (c.tcp_rx_buffer + c.tcp_tx_buffer) + c.rx_queue_packets * 1500) >> 10) as u64
}

/// What one stream carried: `Ok((bytes, hash))` at the receiver, and the
/// sender's hash, or the error that ended it.
struct Outcome {
    name: &'static str,
    bytes: u64,
    sent: Result<[u8; 32], String>,
    received: Result<(u64, [u8; 32]), String>,
}

impl Outcome {
    fn intact(&self) -> bool {
        matches!((&self.sent, &self.received), (Ok(s), Ok((n, r))) if *n == self.bytes && s == r)
    }

    /// Intact, or ended by an error: never a completed stream with other bytes.
    fn honest(&self) -> bool {
        match (&self.sent, &self.received) {
            (Ok(s), Ok((n, r))) => (*n == self.bytes) == (s == r),
            (Err(_), Ok((n, _))) => *n < self.bytes,
            _ => true,
        }
    }
}

/// One paced stream of `bytes` from `a` to a listener on `b`.
fn stream(
    name: &'static str,
    (a, b): (&StackNode, &StackNode),
    port: u16,
    bytes: u64,
    seed: u64,
    deadline: Instant,
) -> Outcome {
    let to = SocketAddr::new(b.node.v4, port);
    let listener = b.stack.tcp_listen(to, 2).expect("listen");
    thread::scope(|s| {
        let rx = s.spawn(|| {
            let (conn, _) = listener
                .accept_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            try_recv_all(&conn, deadline)
        });
        let sent = a
            .stack
            .tcp_connect(to, Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())
            .and_then(|c| try_send_pattern(&c, bytes, seed, deadline, Some(PACE)));
        let received = rx.join().unwrap();
        Outcome {
            name,
            bytes,
            sent,
            received,
        }
    })
}

/// `a`'s peer entry for `b` as the mesh made it.
fn peer_entry(b: &StackNode, key: &PrivateKey) -> PeerConfig {
    let mut p = PeerConfig::new(key.public_key());
    p.endpoint = Some(SocketAddr::from((
        [127, 0, 0, 1],
        b.node.engine.listen_port(),
    )));
    p.allowed_ips = vec![IpPrefix::host(b.node.v4), IpPrefix::host(b.node.v6)];
    p
}

#[test]
fn three_engines_under_roaming_reconfiguration_key_swap_and_flood() {
    let threads_before = thread_count();
    let fds_before = fd_count();
    let rss_before = resident_kib();
    let cfg = config();
    let nodes = stack_mesh(3, cfg.clone());
    let deadline = Instant::now() + Duration::from_secs(75);
    let flood_stop = AtomicBool::new(false);
    let flood_sent = std::sync::atomic::AtomicU64::new(0);

    let outcomes = thread::scope(|s| {
        let (n0, n1, n2) = (&nodes[0], &nodes[1], &nodes[2]);
        // 1 -> 2 is never reconfigured; 0 -> 1 and 2 -> 0 cross node 0's key swap.
        let streams = [
            s.spawn(|| stream("1->2", (n1, n2), PORT, STREAM_BYTES, 12, deadline)),
            s.spawn(|| stream("0->1", (n0, n1), PORT + 1, STREAM_BYTES, 1, deadline)),
            s.spawn(|| stream("2->0", (n2, n0), PORT + 2, STREAM_BYTES, 20, deadline)),
        ];

        // The disturbances, a few seconds apart.
        thread::sleep(Duration::from_secs(2));
        let old = n1.node.engine.listen_port();
        let new = n1.node.engine.set_listen_port(0).expect("rebind");
        eprintln!("node 1 roams: port {old} -> {new}");

        thread::sleep(Duration::from_secs(2));
        let n2_key = n2.node.key.public_key();
        assert!(n0.node.engine.remove_peer(&n2_key));
        thread::sleep(Duration::from_millis(500));
        n0.node
            .engine
            .add_peer(&peer_entry(n2, &n2.node.key))
            .unwrap();
        eprintln!("node 0 removed and re-added node 2");

        thread::sleep(Duration::from_secs(1));
        let flooder = s.spawn(|| {
            let to: SocketAddr = ([127, 0, 0, 1], n2.node.engine.listen_port()).into();
            let n2_pub = *n2.node.key.public_key().as_bytes();
            let spoofers = spoofed_sockets(8);
            let flood: Vec<[u8; 148]> = (0..32)
                .map(|i| {
                    Initiator::new(*PrivateKey::generate().as_bytes(), n2_pub, None)
                        .initiation(&fields(i, i as u64))
                })
                .collect();
            let end = Instant::now() + Duration::from_secs(5);
            let mut i = 0usize;
            while !flood_stop.load(Relaxed) && Instant::now() < end {
                for sock in &spoofers {
                    let _ = sock.send_to(&flood[i % flood.len()], to);
                    i += 1;
                }
                thread::sleep(Duration::from_millis(5));
            }
            flood_sent.store(i as u64, Relaxed);
        });

        thread::sleep(Duration::from_secs(3));
        let swapped = PrivateKey::generate();
        let old_pub = n0.node.key.public_key();
        n0.node.engine.set_private_key(Some(swapped.clone()));
        for other in [n1, n2] {
            assert!(other.node.engine.remove_peer(&old_pub));
            other
                .node
                .engine
                .add_peer(&peer_entry(n0, &swapped))
                .unwrap();
        }
        eprintln!("node 0 swapped its private key; nodes 1 and 2 learned the new public key");
        flood_stop.store(true, Relaxed);
        flooder.join().unwrap();

        streams.map(|h| h.join().unwrap())
    });

    for o in &outcomes {
        eprintln!(
            "stream {}: sent {:?}, received {:?}",
            o.name,
            o.sent.as_ref().map(|_| "all"),
            o.received.as_ref().map(|(n, _)| n)
        );
        assert!(
            o.honest(),
            "stream {} delivered other bytes than it was sent",
            o.name
        );
    }
    assert!(outcomes[0].intact(), "the undisturbed stream 1->2 broke");
    let stats2 = nodes[2].node.engine.stats();
    eprintln!(
        "flood: {} initiations sent; node 2 {stats2:?}",
        flood_sent.load(Relaxed)
    );
    assert!(flood_sent.load(Relaxed) > 0);
    assert!(
        stats2.rx_unknown_peer + stats2.cookie_replies_sent > 0,
        "the flood never reached node 2"
    );

    // After the disturbances, every pair carries a fresh transfer.
    for (i, j) in [(0, 1), (1, 2), (2, 0), (1, 0)] {
        let port = PORT + 10 + i as u16 * 3 + j as u16;
        let o = stream(
            "after",
            (&nodes[i], &nodes[j]),
            port,
            AFTER_BYTES,
            99,
            deadline,
        );
        assert!(
            o.intact(),
            "{i}->{j} after the disturbances: {:?}",
            o.received.err()
        );
    }

    let ceiling = 3 * stack_ceiling_kib(&cfg) + 64 * 1024;
    let peak = peak_resident_kib();
    eprintln!(
        "resident: before {rss_before} KiB, peak {peak} KiB, ceiling {ceiling} KiB over the start"
    );
    assert!(
        peak.saturating_sub(rss_before) < ceiling,
        "peak resident memory grew by {} KiB, over {ceiling}",
        peak - rss_before
    );

    for n in &nodes {
        n.stack.close();
        n.node.engine.close();
    }
    drop(nodes);
    assert!(
        wait_until(Duration::from_secs(10), || thread_count() <= threads_before),
        "threads: {threads_before} before, {} after shutdown",
        thread_count()
    );
    assert!(
        wait_until(Duration::from_secs(5), || fd_count() <= fds_before),
        "file descriptors: {fds_before} before, {} after shutdown",
        fd_count()
    );
}
