//! Two (or three) engines back to back over real loopback UDP sockets.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{mesh, mesh_with_mtu, send_and_receive, udp_packet, wait_until};
use meshvpn_engine::peer::DropReason;
use meshvpn_engine::{PeerUpdate, PrivateKey, SendError};

fn exchange_both_ways(underlay_v6: bool) {
    let nodes = mesh(2, underlay_v6);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut sent_ab = (0u64, 0u64);
    let mut sent_ba = (0u64, 0u64);
    for (inner_v6, size) in [(false, 84), (false, 1400), (true, 104), (true, 1400)] {
        let (sa, sb): (IpAddr, IpAddr) = if inner_v6 { (a.v6, b.v6) } else { (a.v4, b.v4) };
        let payload = size - if inner_v6 { 48 } else { 28 };
        let p = udp_packet(sa, sb, payload, 1);
        assert_eq!(p.len(), size);
        assert_eq!(
            send_and_receive(&a.engine, &b.engine, &p).as_deref(),
            Some(&p[..]),
            "a->b {size} v6={inner_v6}"
        );
        sent_ab = (sent_ab.0 + 1, sent_ab.1 + size as u64);
        let q = udp_packet(sb, sa, payload, 2);
        assert_eq!(
            send_and_receive(&b.engine, &a.engine, &q).as_deref(),
            Some(&q[..]),
            "b->a {size} v6={inner_v6}"
        );
        sent_ba = (sent_ba.0 + 1, sent_ba.1 + size as u64);
    }
    let sa = a.engine.peer_stats(&b.key.public_key()).unwrap();
    let sb = b.engine.peer_stats(&a.key.public_key()).unwrap();
    assert_eq!((sa.tx_packets, sa.tx_inner_bytes), sent_ab);
    assert_eq!((sb.rx_packets, sb.rx_inner_bytes), sent_ab);
    assert_eq!((sb.tx_packets, sb.tx_inner_bytes), sent_ba);
    assert_eq!((sa.rx_packets, sa.rx_inner_bytes), sent_ba);
    // Wire bytes: every data message is its inner packet plus 32 bytes, and
    // one side's sent is the other's received (no loss on loopback).
    assert!(sa.tx_bytes >= sent_ab.1 + 32 * sent_ab.0);
    assert!(wait_until(Duration::from_secs(2), || {
        let sa = a.engine.peer_stats(&b.key.public_key()).unwrap();
        let sb = b.engine.peer_stats(&a.key.public_key()).unwrap();
        sa.tx_bytes == sb.rx_bytes && sb.tx_bytes == sa.rx_bytes
    }));
    assert!(sa.last_handshake.is_some() && sb.last_handshake.is_some());
    assert_eq!(sa.total_drops() + sb.total_drops(), 0);
    let expected_host = if underlay_v6 { "::1" } else { "127.0.0.1" };
    assert_eq!(
        sb.endpoint.unwrap().ip(),
        expected_host.parse::<IpAddr>().unwrap()
    );
}

#[test]
fn packets_cross_both_ways_v4_and_v6_inside_over_v4_underlay() {
    exchange_both_ways(false);
}

#[test]
fn packets_cross_both_ways_over_v6_underlay() {
    exchange_both_ways(true);
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped_and_counted() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let ok = udp_packet(a.v4, b.v4, 10, 0);
    assert!(send_and_receive(&a.engine, &b.engine, &ok).is_some());
    // a spoofs an inner source that b does not allow for a.
    let spoofed = udp_packet("10.77.0.99".parse().unwrap(), b.v4, 10, 0);
    a.engine.send_packet(&spoofed).unwrap();
    assert!(b.engine.recv_packet(Duration::from_millis(500)).is_none());
    let sb = b.engine.peer_stats(&a.key.public_key()).unwrap();
    assert_eq!(sb.drops(DropReason::SourceNotAllowed), 1);
    assert_eq!(sb.rx_packets, 1);
}

#[test]
fn unrouted_and_malformed_packets_are_refused() {
    let nodes = mesh(2, false);
    let a = &nodes[0];
    let p = udp_packet(a.v4, "10.99.0.1".parse().unwrap(), 10, 0);
    assert_eq!(a.engine.send_packet(&p), Err(SendError::NoRoute));
    assert_eq!(
        a.engine.send_packet(&[0x45, 0, 0]),
        Err(SendError::Malformed)
    );
    assert_eq!(a.engine.send_packet(&[]), Err(SendError::Malformed));
    let s = a.engine.stats();
    assert_eq!((s.tx_no_route, s.tx_malformed), (1, 2));
}

#[test]
fn garbage_datagrams_are_counted_and_dropped() {
    let nodes = mesh(2, false);
    let b = &nodes[1];
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = ("127.0.0.1", b.engine.listen_port());
    for len in [0usize, 1, 3, 4, 31, 100, 147, 149] {
        sock.send_to(&vec![0xAB; len], to).unwrap();
    }
    // A data message for an index nobody has.
    let mut data = vec![0u8; 48];
    data[0] = 4;
    sock.send_to(&data, to).unwrap();
    // An initiation with a bad MAC1.
    let mut init = vec![0u8; 148];
    init[0] = 1;
    sock.send_to(&init, to).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || {
            let s = b.engine.stats();
            s.rx_malformed == 8 && s.rx_unknown_index == 1 && s.rx_invalid_mac == 1
        }),
        "{:?}",
        b.engine.stats()
    );
    // The engine still works.
    let a = &nodes[0];
    assert!(send_and_receive(&a.engine, &b.engine, &udp_packet(a.v4, b.v4, 5, 0)).is_some());
}

#[test]
fn removed_peer_stops_traffic_and_readding_restores_it() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let p = udp_packet(a.v4, b.v4, 64, 3);
    assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());
    let cfg_of_a = b.engine.peer_config(&a.key.public_key()).unwrap();
    assert!(b.engine.remove_peer(&a.key.public_key()));
    assert!(!b.engine.remove_peer(&a.key.public_key()));
    a.engine.send_packet(&p).unwrap();
    assert!(b.engine.recv_packet(Duration::from_millis(500)).is_none());
    assert!(b.engine.stats().rx_unknown_index >= 1);
    b.engine.add_peer(&cfg_of_a).unwrap();
    // a's session is gone on b's side: a retries its handshake (REKEY_TIMEOUT
    // 5 s) or b initiates when it has something to send.
    let q = udp_packet(b.v4, a.v4, 64, 4);
    assert_eq!(
        send_and_receive(&b.engine, &a.engine, &q).as_deref(),
        Some(&q[..])
    );
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &p).as_deref(),
        Some(&p[..])
    );
}

#[test]
fn allowed_ips_move_between_peers_and_updates_apply_live() {
    let nodes = mesh(3, false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let shared: meshvpn_engine::IpPrefix = "10.88.0.0/24".parse().unwrap();
    let add = |ips| PeerUpdate {
        allowed_ips: vec![ips],
        ..Default::default()
    };
    a.engine
        .update_peer(&b.key.public_key(), &add(shared), false)
        .unwrap();
    assert!(a
        .engine
        .peer_config(&b.key.public_key())
        .unwrap()
        .allowed_ips
        .contains(&shared));
    a.engine
        .update_peer(&c.key.public_key(), &add(shared), false)
        .unwrap();
    assert!(!a
        .engine
        .peer_config(&b.key.public_key())
        .unwrap()
        .allowed_ips
        .contains(&shared));
    assert!(a
        .engine
        .peer_config(&c.key.public_key())
        .unwrap()
        .allowed_ips
        .contains(&shared));
    // update_only on an unknown peer creates nothing.
    let stranger = PrivateKey::generate().public_key();
    a.engine
        .update_peer(&stranger, &add(shared), false)
        .unwrap();
    assert!(a.engine.peer_config(&stranger).is_none());
    // c accepts 10.88.0.5 from a only if c allows it for a: it does not, so
    // send to c's own address instead and check routing went to c.
    let p = udp_packet(a.v4, c.v4, 20, 0);
    assert!(send_and_receive(&a.engine, &c.engine, &p).is_some());
}

#[test]
fn low_order_and_own_keys_are_refused_as_peers() {
    let nodes = mesh(1, false);
    let a = &nodes[0];
    let zero = meshvpn_engine::PublicKey::from_bytes([0u8; 32]);
    let err = a
        .engine
        .add_peer(&meshvpn_engine::PeerConfig::new(zero))
        .unwrap_err();
    assert!(err.to_string().contains("low-order"), "{err}");
    let own = a
        .engine
        .add_peer(&meshvpn_engine::PeerConfig::new(a.key.public_key()))
        .unwrap_err();
    assert!(own.to_string().contains("own public key"), "{own}");
    assert!(a.engine.peer_keys().is_empty());
}

#[test]
fn private_key_swap_while_traffic_flows_recovers() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let p = udp_packet(a.v4, b.v4, 200, 5);
    assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());
    let new_key = PrivateKey::generate();
    a.engine.set_private_key(Some(new_key.clone()));
    // b must learn a's new public key, as an operator would configure it.
    let mut cfg = b.engine.peer_config(&a.key.public_key()).unwrap();
    b.engine.remove_peer(&a.key.public_key());
    cfg.public_key = new_key.public_key();
    b.engine.add_peer(&cfg).unwrap();
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &p).as_deref(),
        Some(&p[..])
    );
    let q = udp_packet(b.v4, a.v4, 200, 6);
    assert_eq!(
        send_and_receive(&b.engine, &a.engine, &q).as_deref(),
        Some(&q[..])
    );
}

#[test]
fn persistent_keepalive_establishes_a_session_without_traffic() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let upd = PeerUpdate {
        persistent_keepalive: Some(Some(1)),
        ..Default::default()
    };
    a.engine
        .update_peer(&b.key.public_key(), &upd, false)
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        b.engine
            .peer_stats(&a.key.public_key())
            .unwrap()
            .keepalives_received
            >= 2
    }));
    assert!(b
        .engine
        .peer_stats(&a.key.public_key())
        .unwrap()
        .last_handshake
        .is_some());
}

#[test]
fn roaming_follows_authenticated_packets() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let p = udp_packet(a.v4, b.v4, 30, 0);
    assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());
    let before = b
        .engine
        .peer_stats(&a.key.public_key())
        .unwrap()
        .endpoint
        .unwrap();
    assert_eq!(before.port(), a.engine.listen_port());
    // a moves to a new port (its "public address" changes).
    let new_port = a.engine.set_listen_port(0).unwrap();
    assert_ne!(new_port, before.port());
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &p).as_deref(),
        Some(&p[..])
    );
    let after = b
        .engine
        .peer_stats(&a.key.public_key())
        .unwrap()
        .endpoint
        .unwrap();
    assert_eq!(after.port(), new_port, "b follows a to its new address");
    // and b's replies reach a at the new address.
    let q = udp_packet(b.v4, a.v4, 30, 1);
    assert_eq!(
        send_and_receive(&b.engine, &a.engine, &q).as_deref(),
        Some(&q[..])
    );
}

#[test]
fn close_while_traffic_flows_joins_every_thread() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let p = udp_packet(a.v4, b.v4, 1000, 0);
    assert!(send_and_receive(&a.engine, &b.engine, &p).is_some());
    std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut sent = 0;
            for _ in 0..200_000 {
                match a.engine.send_packet(&p) {
                    Ok(()) => sent += 1,
                    Err(SendError::Closed) => break,
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(100));
        let t = std::time::Instant::now();
        b.engine.close();
        a.engine.close();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "close took {:?}",
            t.elapsed()
        );
        let sent = sender.join().unwrap();
        assert!(sent > 0);
    });
    assert_eq!(a.engine.send_packet(&p), Err(SendError::Closed));
}

#[test]
fn batched_sends_deliver_every_packet_in_order_across_peers() {
    let nodes = mesh(3, false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // Sessions first, so nothing waits behind a handshake.
    for n in [b, c] {
        let p = udp_packet(a.v4, n.v4, 8, 0);
        assert!(send_and_receive(&a.engine, &n.engine, &p).is_some());
    }
    // Runs of full-size packets, short ones closing runs, alternating
    // destinations and families, plus one unroutable packet.
    let mut to_b = Vec::new();
    let mut to_c = Vec::new();
    let mut all = Vec::new();
    for i in 0..300usize {
        let size = match i % 7 {
            0 => 40,
            3 => 700,
            _ => 1372,
        };
        let (dst, list) = if (i / 5) % 2 == 0 {
            (b, &mut to_b)
        } else {
            (c, &mut to_c)
        };
        let (s, d) = if i % 11 == 0 {
            (a.v6, dst.v6)
        } else {
            (a.v4, dst.v4)
        };
        let p = udp_packet(s, d, size, i as u8);
        list.push(p.clone());
        all.push(p);
    }
    all.insert(50, udp_packet(a.v4, "10.200.0.1".parse().unwrap(), 10, 0));
    let accepted = a.engine.send_packets(all.iter().map(|p| &p[..]));
    assert_eq!(accepted, 300);
    assert_eq!(a.engine.stats().tx_no_route, 1);
    for (node, expected) in [(b, to_b), (c, to_c)] {
        let mut got = Vec::new();
        while got.len() < expected.len() {
            match node.engine.recv_packet(Duration::from_secs(5)) {
                Some(p) => got.push(p.to_vec()),
                None => break,
            }
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "packets arrive intact and in order");
    }
}

#[test]
fn inner_mtu_1280_1420_and_jumbo_arrive_untruncated() {
    for mtu in [1280u16, 1420, 9000] {
        let nodes = mesh_with_mtu(2, false, Some(mtu));
        let (a, b) = (&nodes[0], &nodes[1]);
        for (src, dst, header) in [(a.v4, b.v4, 28), (a.v6, b.v6, 48), (b.v4, a.v4, 28)] {
            let (from, to) = if src == a.v4 || src == a.v6 {
                (a, b)
            } else {
                (b, a)
            };
            // Exactly the MTU, and the smallest packet for comparison.
            for len in [mtu as usize, header + 1] {
                let p = udp_packet(src, dst, len - header, len as u8);
                assert_eq!(p.len(), len);
                let got = send_and_receive(&from.engine, &to.engine, &p);
                assert_eq!(
                    got.as_deref().map(<[u8]>::len),
                    Some(len),
                    "MTU {mtu}: a {len}-byte packet {src} -> {dst}"
                );
                assert_eq!(got.unwrap(), p, "MTU {mtu}: {len}-byte packet changed");
            }
        }
        for n in &nodes {
            n.engine.close();
        }
    }
}

/// The drop reason an inner packet larger than the receiving host's
/// buffers is counted under, looked up by its published name (the name
/// the C and Go stats use too).
fn oversized_drops(stats: &meshvpn_engine::peer::PeerStats) -> u64 {
    stats
        .drops
        .iter()
        .find(|(r, _)| r.name() == "oversized")
        .map_or(0, |&(_, n)| n)
}

/// An authenticated peer sends inner packets larger than the receiver's
/// MTU (60,028 bytes, and MTU + 80 as an honest peer with MTU 1500 would)
/// toward `to_addr`; none reaches the receiver's sinks, truncated or not,
/// each is counted as `oversized`, the packet-API budget goes back to
/// exactly 0, and a packet of exactly the MTU still arrives intact.
/// `received` drains the lengths of what the receiver's sink under test
/// got.
fn oversized_inner_packets_are_dropped(
    a: &common::Node,
    b: &common::Node,
    to_addr: IpAddr,
    mut received: impl FnMut() -> Vec<usize>,
) {
    let mtu = b.engine.mtu() as usize;
    // A session first, so every oversized packet is decrypted.
    let hello = udp_packet(a.v4, to_addr, 100, 1);
    a.engine.send_packet(&hello).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        b.engine
            .peer_stats(&a.key.public_key())
            .is_some_and(|s| s.rx_packets == 1)
    }));
    received();
    const ROUNDS: usize = 40;
    let mut sent = 0u64;
    for round in 0..ROUNDS {
        for len in [60_028usize, mtu + 80] {
            let p = udp_packet(a.v4, to_addr, len - 28, round as u8);
            assert_eq!(p.len(), len);
            a.engine.send_packet(&p).unwrap();
            sent += 1;
        }
    }
    let stats = || b.engine.peer_stats(&a.key.public_key()).unwrap();
    // Every one is accounted for (delivered or dropped) before checking.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = stats();
            // The first packet, then every oversized one.
            s.rx_packets + s.total_drops() > sent
        }),
        "not every packet reached the receiver: {:?}",
        stats()
    );
    let got = received();
    let truncated = got.iter().filter(|&&len| len == mtu).count();
    eprintln!(
        "{sent} oversized packets sent: {} reached the host ({truncated} cut to the MTU), \
         buffer budget in use after draining: {} bytes",
        got.len(),
        b.engine.buffered_bytes()
    );
    assert_eq!(
        got.len(),
        0,
        "{} oversized packets reached the host ({truncated} cut to the MTU of {mtu})",
        got.len()
    );
    assert_eq!(
        b.engine.buffered_bytes(),
        0,
        "the packet API's buffer budget leaked after {sent} oversized packets"
    );
    let s = stats();
    assert_eq!(s.rx_packets, 1, "{s:?}");
    assert_eq!(oversized_drops(&s), sent, "drops by reason: {:?}", s.drops);
    assert_eq!(s.total_drops(), sent, "{:?}", s.drops);
    // The rule is "larger than the MTU": exactly the MTU still goes through.
    let p = udp_packet(a.v4, to_addr, mtu - 28, 9);
    a.engine.send_packet(&p).unwrap();
    assert!(wait_until(Duration::from_secs(5), || stats().rx_packets == 2));
    assert_eq!(received(), vec![mtu]);
    assert_eq!(b.engine.buffered_bytes(), 0);
}

#[test]
fn oversized_inner_packets_to_the_host_queue_are_dropped_never_truncated() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    oversized_inner_packets_are_dropped(a, b, b.v4, || {
        std::iter::from_fn(|| b.engine.recv_packet(Duration::from_millis(200)))
            .map(|p| p.len())
            .collect()
    });
}

#[test]
fn oversized_inner_packets_to_the_userspace_stack_are_dropped_never_truncated() {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    b.engine
        .set_addresses(vec![meshvpn_engine::IpPrefix::host(b.v4)]);
    let stack = meshvpn_engine::Netstack::attach(&b.engine, Default::default()).unwrap();
    // A UDP socket on the stack receives what the stack was given.
    let sock = stack
        .udp_bind(std::net::SocketAddr::new(b.v4, 5678))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)));
    oversized_inner_packets_are_dropped(a, b, b.v4, || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            got.push(28 + n);
        }
        // Nothing for the stack may leak to the host queue either.
        got.extend(std::iter::from_fn(|| b.engine.host_queue().try_recv()).map(|p| p.len()));
        got
    });
    assert_eq!(
        stack.stats().rx_dropped,
        0,
        "the stack's own queue dropped none"
    );
}

/// The same on a TUN device (needs root for /dev/net/tun and `ip`; skips
/// without): what the device received is read from the interface's
/// counters.
#[test]
fn oversized_inner_packets_to_a_tun_device_are_dropped() {
    if running_as_root().is_none() {
        eprintln!("skipped: needs root (a TUN device); the netns suite runs as root");
        return;
    }
    let name = format!("mvovs{}", std::process::id() % 100_000);
    let tun = match meshvpn_engine::io::tun::Tun::create(&name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: no TUN device: {e}");
            return;
        }
    };
    let up = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status();
    if !up.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot bring {name} up with `ip`");
        return;
    }
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    b.engine.attach_tun(tun).unwrap();
    let counter = |what: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut seen = (counter("rx_packets"), counter("rx_bytes"));
    oversized_inner_packets_are_dropped(a, b, b.v4, || {
        // Writes to the device are counted as the interface receiving.
        std::thread::sleep(Duration::from_millis(200));
        let now = (counter("rx_packets"), counter("rx_bytes"));
        let (n, bytes) = (now.0 - seen.0, now.1 - seen.1);
        seen = now;
        (0..n).map(|_| (bytes / n) as usize).collect()
    });
    b.engine.close();
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &name])
        .status();
}

/// `Some(())` when running as root (read from /proc, no libc call).
fn running_as_root() -> Option<()> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    (uid.split_whitespace().next()? == "0").then_some(())
}

/// `packet` (IPv4 UDP) with its ports set.
fn with_ports(mut packet: Vec<u8>, sport: u16, dport: u16) -> Vec<u8> {
    packet[20..22].copy_from_slice(&sport.to_be_bytes());
    packet[22..24].copy_from_slice(&dport.to_be_bytes());
    packet
}

/// The packet filter on a real engine: node b accepts UDP port 5678 from
/// a and may itself start nothing; a's flow and b's replies pass, the
/// rest is dropped and counted in the engine's stats.
#[test]
fn packet_filter_on_real_engines() {
    use meshvpn_engine::filter::{ByteSet, FilterDrop, FilterRules, PortRange, Rule};
    use meshvpn_engine::IpPrefix;
    use std::sync::Arc;

    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    b.engine.set_filter(Some(Arc::new(FilterRules {
        inbound: vec![Rule {
            srcs: vec![IpPrefix::host(a.v4)],
            dsts: vec![(IpPrefix::host(b.v4), PortRange::single(5678))],
            protos: ByteSet::of(&[17]),
            icmp_types: ByteSet::EMPTY,
        }],
        outbound: vec![],
    })));
    assert!(b.engine.filter().is_some());
    let allowed = with_ports(udp_packet(a.v4, b.v4, 64, 1), 1234, 5678);
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &allowed).as_deref(),
        Some(&allowed[..])
    );
    let reply = with_ports(udp_packet(b.v4, a.v4, 64, 2), 5678, 1234);
    assert_eq!(
        send_and_receive(&b.engine, &a.engine, &reply).as_deref(),
        Some(&reply[..]),
        "a reply on the allowed flow was refused"
    );
    let denied = with_ports(udp_packet(a.v4, b.v4, 64, 3), 1234, 9999);
    a.engine.send_packet(&denied).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || b
            .engine
            .stats()
            .filter_not_allowed
            == 1),
        "{:?}",
        b.engine.stats()
    );
    assert!(b.engine.recv_packet(Duration::from_millis(200)).is_none());
    let unsolicited = with_ports(udp_packet(b.v4, a.v4, 64, 4), 5678, 4321);
    assert_eq!(
        b.engine.send_packet(&unsolicited),
        Err(SendError::Filtered(FilterDrop::OutboundDenied))
    );
    // The host that sent it learns at once: ICMP destination unreachable,
    // administratively prohibited, from the refused packet's destination.
    let answer = b
        .engine
        .recv_packet(Duration::from_secs(1))
        .expect("no ICMP answer to the refused datagram");
    let octets = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => panic!("the mesh addresses here are IPv4"),
    };
    assert_eq!(answer[9], 1, "not ICMP: {:?}", &answer[..]);
    assert_eq!(answer[12..16], octets(a.v4), "source");
    assert_eq!(answer[16..20], octets(b.v4), "destination");
    assert_eq!((answer[20], answer[21]), (3, 13), "type and code");
    let s = b.engine.stats();
    assert_eq!(s.filter_outbound_denied, 1);
    assert_eq!(s.filter_flows, 1);
    // Allow-all again: the denied port passes.
    b.engine.set_filter(None);
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &denied).as_deref(),
        Some(&denied[..])
    );
}
