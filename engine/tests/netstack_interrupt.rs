//! `Interrupter`: waking a blocked dial, read or receive of the userspace
//! stack from another thread without closing it (what the C ABI's
//! `meshvpn_conn_interrupt` and Go's deadlines are built on).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::stacks::stack_mesh;
use meshvpn_engine::netstack::Interrupter;
use meshvpn_engine::{NetstackConfig, NetstackError, PeerConfig, PrivateKey};

const LONG: Duration = Duration::from_secs(30);

#[test]
fn an_interrupt_ends_a_blocked_dial_read_and_recv_early() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    // 10.77.0.3 routes to a peer that never answers: the SYN hangs.
    let mut p = PeerConfig::new(PrivateKey::generate().public_key());
    p.allowed_ips = vec!["10.77.0.3/32".parse().unwrap()];
    p.endpoint = Some("127.0.0.1:9".parse().unwrap());
    a.node.engine.add_peer(&p).unwrap();
    let silent: SocketAddr = "10.77.0.3:80".parse().unwrap();

    let dial = Interrupter::new();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let start = Instant::now();
            let r = a.stack.tcp_connect_with(silent, Some(LONG), &dial);
            (r.map(|_| ()), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        dial.interrupt();
        let (r, took) = t.join().unwrap();
        assert_eq!(r, Err(NetstackError::TimedOut));
        assert!(took < LONG / 2, "the dial waited {took:?}");
    });

    // An interrupt before the call is kept for it, once.
    let early = Interrupter::new();
    early.interrupt();
    assert_eq!(
        a.stack
            .tcp_connect_with(silent, Some(LONG), &early)
            .map(|_| ()),
        Err(NetstackError::TimedOut)
    );

    // A connected stream: an interrupt wakes its read, and the stream
    // still works afterwards.
    let server = SocketAddr::new(b.addr(false), 7000);
    let listener = b.stack.tcp_listen(server, 1).unwrap();
    let client = a.stack.tcp_connect(server, Some(LONG)).unwrap();
    let (accepted, _) = listener.accept_timeout(Some(LONG)).unwrap();
    let mut buf = [0u8; 8];
    std::thread::scope(|s| {
        let t = s.spawn(|| accepted.read_timeout(&mut buf, Some(LONG)));
        std::thread::sleep(Duration::from_millis(100));
        accepted.interrupter().interrupt();
        assert_eq!(t.join().unwrap(), Err(NetstackError::TimedOut));
    });
    client.write_timeout(b"still up", Some(LONG)).unwrap();
    // The next call after an interrupt may return early once too.
    let n = match accepted.read_timeout(&mut buf, Some(LONG)) {
        Err(NetstackError::TimedOut) => accepted.read_timeout(&mut buf, Some(LONG)),
        r => r,
    }
    .unwrap();
    assert_eq!(&buf[..n], b"still up");

    let udp = b.stack.udp_bind(SocketAddr::new(b.addr(false), 0)).unwrap();
    udp.interrupter().interrupt();
    assert_eq!(
        udp.recv_from_timeout(&mut buf, Some(LONG)).map(|_| ()),
        Err(NetstackError::TimedOut)
    );
}
