//! The userspace stack's UDP, ICMP, error and wake-up behaviour between
//! engines over real loopback UDP.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::stacks::stack_mesh;
use meshvpn_engine::netstack::Interrupter;
use meshvpn_engine::{NetstackConfig, NetstackError, PeerConfig, PrivateKey};

const T: Duration = Duration::from_secs(5);

#[test]
fn udp_echo_v4_and_v6_up_to_the_mtu() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    for v6 in [false, true] {
        let server = b.stack.udp_bind(SocketAddr::new(b.addr(v6), 7)).unwrap();
        let client = a.stack.udp_bind(SocketAddr::new(a.addr(v6), 0)).unwrap();
        let max = client.max_payload(b.addr(v6));
        assert_eq!(max, 1420 - if v6 { 48 } else { 28 });
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0u8; 2048];
                for _ in 0..4 {
                    let (n, from) = server.recv_from_timeout(&mut buf, Some(T)).unwrap();
                    server.send_to(&buf[..n], from).unwrap();
                }
            });
            for len in [1, 100, 1000, max] {
                let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                client.send_to(&msg, server.local_addr()).unwrap();
                let mut buf = vec![0u8; 2048];
                let (n, from) = client.recv_from_timeout(&mut buf, Some(T)).unwrap();
                assert_eq!(from, server.local_addr());
                assert_eq!(&buf[..n], &msg[..], "echo of {len} bytes, v6={v6}");
            }
        });
        assert_eq!(
            client.send_to(&vec![0u8; max + 1], server.local_addr()),
            Err(NetstackError::MessageTooLarge { len: max + 1, max })
        );
    }
}

#[test]
fn ping_both_ways_v4_and_v6() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    for (x, y) in [(0, 1), (1, 0)] {
        for v6 in [false, true] {
            let rtt = nodes[x]
                .stack
                .ping(nodes[y].addr(v6), T)
                .unwrap_or_else(|e| panic!("ping {x}->{y} v6={v6}: {e}"));
            assert!(rtt < T);
        }
    }
    // A stack does not answer for an address it does not own: the engine
    // routes 10.77.0.2 to b, b's stack owns it; nobody owns 10.77.0.3.
    let mut p = PeerConfig::new(PrivateKey::generate().public_key());
    p.allowed_ips = vec!["10.77.0.3/32".parse().unwrap()];
    p.endpoint = Some("127.0.0.1:9".parse().unwrap());
    nodes[0].node.engine.add_peer(&p).unwrap();
    assert_eq!(
        nodes[0]
            .stack
            .ping("10.77.0.3".parse().unwrap(), Duration::from_millis(300)),
        Err(NetstackError::TimedOut)
    );
}

#[test]
fn an_interrupt_ends_a_ping_without_a_deadline() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    // Routed to a peer that never answers (see the test above).
    let mut p = PeerConfig::new(PrivateKey::generate().public_key());
    p.allowed_ips = vec!["10.77.0.3/32".parse().unwrap()];
    p.endpoint = Some("127.0.0.1:9".parse().unwrap());
    nodes[0].node.engine.add_peer(&p).unwrap();
    let silent: IpAddr = "10.77.0.3".parse().unwrap();
    let i = Interrupter::new();
    let start = Instant::now();
    std::thread::scope(|s| {
        let ping = s.spawn(|| nodes[0].stack.ping_with(silent, None, &i));
        std::thread::sleep(Duration::from_millis(50));
        i.interrupt();
        assert_eq!(ping.join().unwrap(), Err(NetstackError::TimedOut));
    });
    assert!(start.elapsed() < T, "the interrupt did not end the ping");
    // An interrupt just before the call starts is not lost.
    i.interrupt();
    assert_eq!(
        nodes[0].stack.ping_with(silent, None, &i),
        Err(NetstackError::TimedOut)
    );
    // Without an interrupt, the same token lets a ping complete.
    let rtt = nodes[0].stack.ping_with(nodes[1].addr(false), Some(T), &i);
    assert!(rtt.is_ok_and(|r| r < T), "{rtt:?}");
}

#[test]
fn dial_errors_are_distinct() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    // Nothing listens on the port: b's stack answers RST.
    let t = Instant::now();
    assert_eq!(
        a.stack
            .tcp_connect(SocketAddr::new(b.node.v4, 4444), Some(T))
            .err(),
        Some(NetstackError::Refused)
    );
    assert!(t.elapsed() < T);
    // No peer covers the address.
    assert_eq!(
        a.stack
            .tcp_connect("10.99.0.1:80".parse().unwrap(), Some(T))
            .err(),
        Some(NetstackError::Unreachable)
    );
    assert_eq!(
        a.stack.ping("10.99.0.1".parse().unwrap(), T),
        Err(NetstackError::Unreachable)
    );
    let udp = a.stack.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    assert_eq!(
        udp.send_to(b"x", "10.99.0.1:53".parse().unwrap()),
        Err(NetstackError::Unreachable)
    );
    // A peer whose endpoint never answers: the SYN waits behind a
    // handshake that never completes.
    let mut p = PeerConfig::new(PrivateKey::generate().public_key());
    p.allowed_ips = vec!["10.88.0.1/32".parse().unwrap()];
    p.endpoint = Some("127.0.0.1:9".parse().unwrap());
    a.node.engine.add_peer(&p).unwrap();
    assert_eq!(
        a.stack
            .tcp_connect(
                "10.88.0.1:80".parse().unwrap(),
                Some(Duration::from_millis(300))
            )
            .err(),
        Some(NetstackError::TimedOut)
    );
    // A peer with no endpoint at all: the engine cannot send the SYN.
    let mut p = PeerConfig::new(PrivateKey::generate().public_key());
    p.allowed_ips = vec!["10.88.0.2/32".parse().unwrap()];
    a.node.engine.add_peer(&p).unwrap();
    assert_eq!(
        a.stack
            .tcp_connect("10.88.0.2:80".parse().unwrap(), Some(T))
            .err(),
        Some(NetstackError::Unreachable)
    );
    // Binding an address the stack does not own, and a port in use.
    assert_eq!(
        a.stack.udp_bind("10.1.2.3:0".parse().unwrap()).err(),
        Some(NetstackError::AddrNotAvailable)
    );
    let l = a
        .stack
        .tcp_listen("0.0.0.0:80".parse().unwrap(), 1)
        .unwrap();
    assert_eq!(
        a.stack.tcp_listen("0.0.0.0:80".parse().unwrap(), 1).err(),
        Some(NetstackError::AddrInUse)
    );
    drop(l);
    a.stack
        .tcp_listen("0.0.0.0:80".parse().unwrap(), 1)
        .unwrap();
}

#[test]
fn socket_cap_is_a_clear_error_and_frees_on_close() {
    let nodes = stack_mesh(
        2,
        NetstackConfig {
            max_sockets: 3,
            ..Default::default()
        },
    );
    let a = &nodes[0];
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let socks: Vec<_> = (0..3).map(|_| a.stack.udp_bind(any).unwrap()).collect();
    assert_eq!(
        a.stack.udp_bind(any).err(),
        Some(NetstackError::SocketLimit(3))
    );
    assert_eq!(
        a.stack
            .tcp_connect(SocketAddr::new(nodes[1].node.v4, 80), Some(T))
            .err(),
        Some(NetstackError::SocketLimit(3))
    );
    drop(socks);
    assert_eq!(a.stack.stats().sockets, 0);
    a.stack.udp_bind(any).unwrap();
}

#[test]
fn a_connection_reset_by_the_listener_closing_is_reported() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let addr = SocketAddr::new(b.node.v4, 9000);
    let listener = b.stack.tcp_listen(addr, 8).unwrap();
    let c = a.stack.tcp_connect(addr, Some(T)).unwrap();
    // Connected but never accepted: closing the listener resets it.
    listener.close();
    let mut buf = [0u8; 8];
    assert_eq!(c.read_timeout(&mut buf, Some(T)), Err(NetstackError::Reset));
}

#[test]
fn blocked_calls_wake_on_close_and_on_shutdown() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let addr = SocketAddr::new(b.node.v4, 9100);
    let listener = b.stack.tcp_listen(addr, 8).unwrap();
    let conn = a.stack.tcp_connect(addr, Some(T)).unwrap();
    let (server_side, _) = listener.accept_timeout(Some(T)).unwrap();
    let udp = a.stack.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
    std::thread::scope(|s| {
        // Closing a handle wakes a read blocked on it.
        let reader = s.spawn(|| {
            let mut buf = [0u8; 8];
            conn.read_timeout(&mut buf, None)
        });
        let receiver = s.spawn(|| {
            let mut buf = [0u8; 8];
            udp.recv_from_timeout(&mut buf, None)
        });
        let acceptor = s.spawn(|| listener.accept_timeout(None).map(|_| ()));
        std::thread::sleep(Duration::from_millis(100));
        conn.close();
        udp.close();
        listener.close();
        assert_eq!(reader.join().unwrap(), Err(NetstackError::Closed));
        assert_eq!(receiver.join().unwrap().err(), Some(NetstackError::Closed));
        assert_eq!(acceptor.join().unwrap().err(), Some(NetstackError::Closed));
    });
    // The peer sees the close as the end of the stream.
    let mut buf = [0u8; 8];
    assert_eq!(server_side.read_timeout(&mut buf, Some(T)), Ok(0));

    // Closing the engine wakes a read blocked on b's stack.
    let listener = b
        .stack
        .tcp_listen(SocketAddr::new(b.node.v4, 9200), 8)
        .unwrap();
    let _conn = a
        .stack
        .tcp_connect(SocketAddr::new(b.node.v4, 9200), Some(T))
        .unwrap();
    let (server_side, _) = listener.accept_timeout(Some(T)).unwrap();
    let engine = b.node.engine.clone();
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = [0u8; 8];
            server_side.read_timeout(&mut buf, None)
        });
        std::thread::sleep(Duration::from_millis(100));
        engine.close();
        assert_eq!(reader.join().unwrap(), Err(NetstackError::Closed));
    });
    assert_eq!(
        b.stack.tcp_listen("0.0.0.0:1".parse().unwrap(), 1).err(),
        Some(NetstackError::Closed)
    );

    // Closing a stack wakes what blocks on it, and its addresses fall
    // through to the host queue again.
    let l = a
        .stack
        .tcp_listen("0.0.0.0:9300".parse().unwrap(), 1)
        .unwrap();
    std::thread::scope(|s| {
        let acceptor = s.spawn(|| l.accept_timeout(None).map(|_| ()));
        std::thread::sleep(Duration::from_millis(100));
        a.stack.close();
        assert_eq!(acceptor.join().unwrap().err(), Some(NetstackError::Closed));
    });
}

#[test]
fn packets_not_for_the_stack_reach_the_host_queue() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    // b's engine routes fd77::99 and 10.77.0.99 to b in a's table only if
    // AllowedIPs cover them; give b a wider range than its stack owns.
    let mut p = PeerConfig::new(b.node.key.public_key());
    p.endpoint = Some(SocketAddr::new(
        IpAddr::from([127, 0, 0, 1]),
        b.node.engine.listen_port(),
    ));
    p.allowed_ips = vec!["10.77.0.0/24".parse().unwrap()];
    a.node.engine.add_peer(&p).unwrap();
    let mut q = PeerConfig::new(a.node.key.public_key());
    q.endpoint = Some(SocketAddr::new(
        IpAddr::from([127, 0, 0, 1]),
        a.node.engine.listen_port(),
    ));
    q.allowed_ips = vec![meshvpn_engine::IpPrefix::host(a.node.v4)];
    b.node.engine.add_peer(&q).unwrap();
    let pkt = common::udp_packet(a.node.v4, "10.77.0.99".parse().unwrap(), 32, 9);
    a.node.engine.send_packet(&pkt).unwrap();
    let got = b.node.engine.recv_packet(T).expect("host queue gets it");
    assert_eq!(&got[..], &pkt[..]);
    // ...while a packet for the stack's own address does not.
    let pkt = common::udp_packet(a.node.v4, b.node.v4, 32, 9);
    a.node.engine.send_packet(&pkt).unwrap();
    assert!(b
        .node
        .engine
        .recv_packet(Duration::from_millis(300))
        .is_none());
}

#[test]
fn a_v4_and_a_v6_listener_share_a_port_and_each_gets_its_own_connections() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let port = 8080;
    let listeners = [false, true].map(|v6| {
        b.stack
            .tcp_listen(SocketAddr::new(b.addr(v6), port), 4)
            .unwrap_or_else(|e| panic!("listen v6={v6}: {e}"))
    });
    // The port is taken on those two addresses, so every-address binds and
    // a second bind on one of them are refused; UDP's namespace is apart.
    for taken in [
        SocketAddr::new("0.0.0.0".parse().unwrap(), port),
        SocketAddr::new("::".parse().unwrap(), port),
        SocketAddr::new(b.addr(false), port),
        SocketAddr::new(b.addr(true), port),
    ] {
        assert_eq!(
            b.stack.tcp_listen(taken, 1).err(),
            Some(NetstackError::AddrInUse),
            "{taken}"
        );
    }
    let udp = [false, true].map(|v6| b.stack.udp_bind(SocketAddr::new(b.addr(v6), port)).unwrap());
    for v6 in [false, true] {
        let remote = SocketAddr::new(b.addr(v6), port);
        let mut c = a.stack.tcp_connect(remote, Some(T)).unwrap();
        let (mut s, from) = listeners[v6 as usize].accept_timeout(Some(T)).unwrap();
        assert_eq!(from.ip(), a.addr(v6));
        assert_eq!(s.local_addr(), remote);
        use std::io::{Read, Write};
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // The other family's listener saw nothing.
        listeners[!v6 as usize].set_nonblocking(true);
        assert_eq!(
            listeners[!v6 as usize].accept_timeout(Some(T)).err(),
            Some(NetstackError::WouldBlock)
        );
        listeners[!v6 as usize].set_nonblocking(false);
        // Each UDP socket gets only the datagrams to its address.
        let client = a.stack.udp_bind(SocketAddr::new(a.addr(v6), 0)).unwrap();
        client
            .send_to(b"ping", SocketAddr::new(b.addr(v6), port))
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = udp[v6 as usize]
            .recv_from_timeout(&mut buf, Some(T))
            .unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], client.local_addr()));
        assert_eq!(
            udp[!v6 as usize]
                .recv_from_timeout(&mut buf, Some(Duration::from_millis(200)))
                .err(),
            Some(NetstackError::TimedOut)
        );
    }
    // Once both specific listeners close, the port is free for every address.
    drop(listeners);
    b.stack
        .tcp_listen(SocketAddr::new("0.0.0.0".parse().unwrap(), port), 1)
        .unwrap();
}

/// Takes both stacks' locks over and over (through `stats`) until `stop`,
/// so packets meet a busy stack and take the queue to its thread as often
/// as they run on the receive thread directly. Bounded in count.
fn contend(nodes: &[common::stacks::StackNode], stop: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering::Relaxed;
    for _ in 0..50_000_000u64 {
        if stop.load(Relaxed) {
            return;
        }
        for n in nodes {
            std::hint::black_box(n.stack.stats());
        }
    }
}

#[test]
fn udp_datagrams_arrive_in_order_and_all_while_the_stack_lock_is_contended() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const WINDOWS: u32 = 1000;
    const PER_WINDOW: u32 = 32;
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let server = b.stack.udp_bind(SocketAddr::new(b.addr(false), 9)).unwrap();
    let client = a.stack.udp_bind(SocketAddr::new(a.addr(false), 0)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| contend(&nodes, &stop));
        }
        let receiver = s.spawn(|| {
            let mut buf = vec![0u8; 2048];
            let mut next = 0u32;
            for _ in 0..WINDOWS {
                for _ in 0..PER_WINDOW {
                    let (n, from) = server
                        .recv_from_timeout(&mut buf, Some(T))
                        .unwrap_or_else(|e| panic!("datagram {next} lost: {e}"));
                    assert_eq!(n, 1000);
                    let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                    assert_eq!(seq, next, "datagram out of order");
                    assert!(buf[4..n].iter().all(|&x| x == seq as u8));
                    next += 1;
                    if next % PER_WINDOW == 0 {
                        server.send_to(&next.to_be_bytes(), from).unwrap();
                    }
                }
            }
        });
        let mut msg = vec![0u8; 1000];
        let mut ack = [0u8; 16];
        for w in 0..WINDOWS {
            for i in 0..PER_WINDOW {
                let seq = w * PER_WINDOW + i;
                msg[..4].copy_from_slice(&seq.to_be_bytes());
                msg[4..].fill(seq as u8);
                client.send_to(&msg, server.local_addr()).unwrap();
            }
            // The next window waits for this one: no buffer along the
            // way can overflow, so any loss is the stack's.
            let (n, _) = client
                .recv_from_timeout(&mut ack, Some(T))
                .unwrap_or_else(|e| panic!("acknowledgement of window {w} lost: {e}"));
            assert_eq!(&ack[..n], &((w + 1) * PER_WINDOW).to_be_bytes());
        }
        receiver.join().unwrap();
        stop.store(true, Relaxed);
    });
    assert_eq!(a.stack.stats().rx_dropped + b.stack.stats().rx_dropped, 0);
}
