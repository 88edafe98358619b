//! Hostile inner TCP into the userspace stack: a peer crafts IP packets
//! through its engine's packet API (so they arrive authenticated) with a
//! zero MSS, sequence numbers at the wrap, SACK blocks across the wrap, an
//! unspecified source, bad checksums, truncated and random headers. The
//! stack must not panic, must still follow the protocol where the packet is
//! valid, and must keep serving a well-behaved peer.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::stacks::{attach, Pattern};
use common::{mesh, Node};
use meshvpn_engine::{IpPrefix, NetstackConfig, PeerConfig};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

const T: Duration = Duration::from_secs(5);
const PORT: u16 = 80;

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("v4 only"),
    }
}

fn segment(src: Ipv4Addr, dst: Ipv4Addr, tcp: &TcpRepr) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[20..]),
        &src.into(),
        &dst.into(),
        &caps,
    );
    buf
}

fn syn(src_port: u16, seq: u32, mss: Option<u16>) -> TcpRepr<'static> {
    TcpRepr {
        src_port,
        dst_port: PORT,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: None,
        window_len: 65535,
        window_scale: Some(7),
        max_seg_size: mss,
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    }
}

/// Waits for the SYN-ACK the stack sends to `port`; returns its sequence
/// number and acknowledgment.
fn syn_ack(attacker: &Node, port: u16) -> (u32, u32) {
    let end = Instant::now() + T;
    while Instant::now() < end {
        let Some(p) = attacker.engine.recv_packet(Duration::from_millis(100)) else {
            continue;
        };
        let Ok(ip) = Ipv4Packet::new_checked(&p[..]) else {
            continue;
        };
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            continue;
        };
        if tcp.dst_port() == port && tcp.syn() && tcp.ack() {
            return (tcp.seq_number().0 as u32, tcp.ack_number().0 as u32);
        }
    }
    panic!("no SYN-ACK for port {port}");
}

#[test]
fn hostile_tcp_does_not_panic_and_valid_peers_still_work() {
    let mut nodes = mesh(3, false).into_iter();
    let (a, attacker, c) = (
        nodes.next().unwrap(),
        nodes.next().unwrap(),
        nodes.next().unwrap(),
    );
    // a accepts the unspecified source from the attacker, so a SYN from
    // 0.0.0.0 reaches its stack instead of stopping at the source check.
    let mut p = PeerConfig::new(attacker.key.public_key());
    p.endpoint = Some(SocketAddr::new(
        [127, 0, 0, 1].into(),
        attacker.engine.listen_port(),
    ));
    p.allowed_ips = vec![IpPrefix::host(attacker.v4), "0.0.0.0/32".parse().unwrap()];
    a.engine.add_peer(&p).unwrap();
    let a = attach(a, NetstackConfig::default());
    let c = attach(c, NetstackConfig::default());
    let listener = a
        .stack
        .tcp_listen(SocketAddr::new(a.node.v4, PORT), 64)
        .unwrap();
    let (me, target) = (v4(attacker.v4), v4(a.node.v4));
    let send = |pkt: &[u8]| {
        let _ = attacker.engine.send_packet(pkt);
    };

    // Sequence numbers at the wrap: the 64 bytes after the SYN straddle
    // 2^32 and must arrive in order.
    let isn = 0xFFFF_FFE0u32;
    send(&segment(me, target, &syn(40000, isn, Some(1380))));
    let (their_seq, ack) = syn_ack(&attacker, 40000);
    assert_eq!(ack, isn.wrapping_add(1));
    let data: Vec<u8> = (0..64u8).collect();
    let mut seg = syn(40000, isn.wrapping_add(1), None);
    seg.control = TcpControl::Psh;
    seg.ack_number = Some(TcpSeqNumber(their_seq.wrapping_add(1) as i32));
    seg.window_scale = None;
    seg.sack_permitted = false;
    seg.payload = &data;
    send(&segment(me, target, &seg));
    let (conn, peer) = listener.accept_timeout(Some(T)).expect("accept");
    assert_eq!(peer, SocketAddr::new(attacker.v4, 40000));
    let mut got = vec![0u8; 64];
    conn.set_read_timeout(Some(T));
    (&conn).read_exact(&mut got).unwrap();
    assert_eq!(got, data);
    // SACK blocks around the wrap on that connection, and an ACK for data
    // never sent.
    (&conn).write_all(&[7u8; 3000]).unwrap();
    let mut sack = seg;
    sack.payload = &[];
    sack.control = TcpControl::None;
    sack.seq_number = TcpSeqNumber(isn.wrapping_add(65) as i32);
    sack.sack_ranges = [
        Some((0xFFFF_FFF0, 0x10)),
        Some((u32::MAX, 0)),
        Some((0, u32::MAX)),
    ];
    send(&segment(me, target, &sack));
    sack.ack_number = Some(TcpSeqNumber(their_seq.wrapping_add(1_000_000) as i32));
    send(&segment(me, target, &sack));

    // A zero MSS: the handshake completes (smoltcp clamps the MSS).
    send(&segment(me, target, &syn(40001, 1000, Some(0))));
    syn_ack(&attacker, 40001);

    // A SYN from 0.0.0.0, and one with a bad checksum.
    send(&segment(
        Ipv4Addr::UNSPECIFIED,
        target,
        &syn(40002, 5, None),
    ));
    let mut bad = segment(me, target, &syn(40003, 5, None));
    bad[20 + 16] ^= 0xFF;
    send(&bad);

    // Truncated and malformed headers: TCP header cut short, data offset
    // past the end or below 5, an IP header length of 15 words.
    let good = segment(me, target, &syn(40004, 9, Some(1380)));
    for cut in [21, 25, 33, 39, 43] {
        let mut p = good[..cut].to_vec();
        p[2..4].copy_from_slice(&(cut as u16).to_be_bytes());
        send(&p);
    }
    for offset_words in [0u8, 1, 4, 15] {
        let mut p = good.clone();
        p[20 + 12] = offset_words << 4;
        send(&p);
    }
    let mut p = good.clone();
    p[0] = 0x4F;
    send(&p);

    // Seeded random corruption of valid segments.
    let mut pat = Pattern::new(0xBAD5EED);
    let mut noise = [0u8; 8];
    for i in 0..3000u32 {
        pat.fill(&mut noise);
        let mut s = syn(
            41000 + (i % 500) as u16,
            u32::from_le_bytes(noise[..4].try_into().unwrap()),
            None,
        );
        if i % 3 == 0 {
            s.control = TcpControl::None;
            s.ack_number = Some(TcpSeqNumber(noise[4] as i32));
            s.payload = &data[..(noise[5] % 64) as usize];
        }
        let mut p = segment(me, target, &s);
        // Flip a few bytes anywhere after the IP addresses (the engine's
        // source check would drop anything before), then maybe truncate.
        for k in 0..(noise[6] % 4) as usize {
            let at = 20 + (noise[k] as usize % (p.len() - 20));
            p[at] ^= noise[7] | 1;
        }
        if noise[7] % 5 == 0 {
            let len = 20 + (noise[3] as usize % (p.len() - 19));
            p.truncate(len);
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        send(&p);
    }

    // The stack still serves a well-behaved peer: ping and an echo.
    c.stack.ping(a.node.v4, T).expect("ping after the barrage");
    let echo = a
        .stack
        .tcp_listen(SocketAddr::new(a.node.v4, 81), 4)
        .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let (conn, _) = echo.accept_timeout(Some(T)).unwrap();
            let mut buf = [0u8; 5];
            conn.set_read_timeout(Some(T));
            (&conn).read_exact(&mut buf).unwrap();
            (&conn).write_all(&buf).unwrap();
        });
        let conn = c
            .stack
            .tcp_connect(SocketAddr::new(a.node.v4, 81), Some(T))
            .unwrap();
        (&conn).write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        conn.set_read_timeout(Some(T));
        (&conn).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    });
}
