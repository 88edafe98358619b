//! Inner IP packets into the userspace TCP/IP stack.
//!
//! One engine with a userspace stack on 10.0.0.1 (a TCP listener on :80, a
//! UDP socket on :53) receives a fuzzer-chosen sequence of decrypted
//! packets through its inner sink, exactly where authenticated WireGuard
//! traffic enters the stack. Packets are either raw bytes or built from
//! structured fields (TCP with every option smoltcp knows, sequence numbers
//! anywhere including the wrap, UDP, ICMP echo), with correct or corrupted
//! checksums, truncated at a fuzzer-chosen length. The stack's thread
//! processes them; a panic there aborts the process, which libFuzzer
//! reports. After each input the stack must still hold its sockets within
//! the configured cap.
//!
//! The stack's replies go to the engine's single peer, whose endpoint is
//! the loopback discard port: nothing leaves this host.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::netstack::{TcpListener, UdpSocket};
use meshvpn_engine::{Config, Engine, IpPrefix, Netstack, NetstackConfig, PeerConfig};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    TcpTimestampRepr, UdpPacket, UdpRepr,
};

const OWN: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const MAX_SOCKETS: usize = 32;

struct Fixture {
    engine: Arc<Engine>,
    stack: Netstack,
    _listener: TcpListener,
    _udp: UdpSocket,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut config = Config::default();
        config.interface.private_key = Some(meshvpn_fuzz::key(1));
        config.interface.addresses = vec![IpPrefix::new(OWN.into(), 24).unwrap()];
        let mut peer = PeerConfig::new(meshvpn_fuzz::key(2).public_key());
        peer.allowed_ips = vec!["10.0.0.0/24".parse().unwrap()];
        peer.endpoint = Some(([127, 0, 0, 1], 9).into());
        config.peers.push(peer);
        let engine = Arc::new(Engine::new(&config).expect("engine"));
        let stack = Netstack::attach(
            &engine,
            NetstackConfig {
                max_sockets: MAX_SOCKETS,
                ..NetstackConfig::default()
            },
        )
        .expect("stack");
        let listener = stack
            .tcp_listen(SocketAddr::from((OWN, 80)), 8)
            .expect("listen");
        let udp = stack.udp_bind(SocketAddr::from((OWN, 53))).expect("udp");
        Fixture {
            engine,
            stack,
            _listener: listener,
            _udp: udp,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Shape {
    Raw(Vec<u8>),
    Tcp {
        src_port: u16,
        to_listener: bool,
        control: u8,
        seq: u32,
        ack: Option<u32>,
        window: u16,
        window_scale: Option<u8>,
        mss: Option<u16>,
        sack_permitted: bool,
        sack: [Option<(u32, u32)>; 3],
        timestamp: Option<(u32, u32)>,
        payload: Vec<u8>,
    },
    Udp {
        src_port: u16,
        to_socket: bool,
        payload: Vec<u8>,
    },
    Icmp(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Packet {
    /// The sender's host part in 10.0.0.0/24 (0 is the network address).
    src_host: u8,
    shape: Shape,
    /// Flip one byte (index modulo the length) to break a checksum or header.
    corrupt: Option<(u16, u8)>,
    /// Cut the packet to this length (modulo its length + 1).
    truncate: Option<u16>,
}

fn ipv4(src: Ipv4Addr, proto: IpProtocol, payload_len: usize) -> (Ipv4Repr, Vec<u8>) {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: OWN,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + payload_len];
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    (ip, buf)
}

fn build(packet: &Packet) -> Vec<u8> {
    let src = Ipv4Addr::new(10, 0, 0, packet.src_host);
    let caps = ChecksumCapabilities::default();
    let mut bytes = match &packet.shape {
        Shape::Raw(raw) => raw.clone(),
        Shape::Tcp {
            src_port,
            to_listener,
            control,
            seq,
            ack,
            window,
            window_scale,
            mss,
            sack_permitted,
            sack,
            timestamp,
            payload,
        } => {
            let control = match control % 5 {
                0 => TcpControl::None,
                1 => TcpControl::Syn,
                2 => TcpControl::Fin,
                3 => TcpControl::Rst,
                _ => TcpControl::Psh,
            };
            let mut tcp = TcpRepr {
                src_port: *src_port,
                dst_port: if *to_listener { 80 } else { 81 },
                control,
                seq_number: TcpSeqNumber(*seq as i32),
                ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
                window_len: *window,
                window_scale: *window_scale,
                max_seg_size: *mss,
                sack_permitted: *sack_permitted,
                sack_ranges: *sack,
                timestamp: timestamp.map(|(v, e)| TcpTimestampRepr::new(v, e)),
                payload: &payload[..payload.len().min(1400)],
            };
            // A TCP header holds at most 40 bytes of options: smoltcp's
            // emitter assumes the Repr fits (raw bytes cover the rest).
            if tcp.header_len() > 60 {
                tcp.sack_ranges = [tcp.sack_ranges[0], None, None];
            }
            if tcp.header_len() > 60 {
                tcp.timestamp = None;
            }
            let (_, mut buf) = ipv4(src, IpProtocol::Tcp, tcp.buffer_len());
            tcp.emit(
                &mut TcpPacket::new_unchecked(&mut buf[20..]),
                &src.into(),
                &OWN.into(),
                &caps,
            );
            buf
        }
        Shape::Udp {
            src_port,
            to_socket,
            payload,
        } => {
            let payload = &payload[..payload.len().min(1400)];
            let udp = UdpRepr {
                src_port: *src_port,
                dst_port: if *to_socket { 53 } else { 54 },
            };
            let len = udp.header_len() + payload.len();
            let (_, mut buf) = ipv4(src, IpProtocol::Udp, len);
            udp.emit(
                &mut UdpPacket::new_unchecked(&mut buf[20..]),
                &src.into(),
                &OWN.into(),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &caps,
            );
            buf
        }
        Shape::Icmp(body) => {
            let body = &body[..body.len().min(1400)];
            let (_, mut buf) = ipv4(src, IpProtocol::Icmp, body.len());
            buf[20..].copy_from_slice(body);
            buf
        }
    };
    if let Some((at, xor)) = packet.corrupt {
        if !bytes.is_empty() {
            let i = at as usize % bytes.len();
            bytes[i] ^= xor.max(1);
        }
    }
    if let Some(len) = packet.truncate {
        bytes.truncate(len as usize % (bytes.len() + 1));
    }
    bytes
}

fuzz_target!(|packets: Vec<Packet>| {
    let f = fixture();
    let sink = f.engine.sink();
    for packet in packets.iter().take(64) {
        sink.deliver(&build(packet));
    }
    let stats = f.stack.stats();
    assert!(
        stats.sockets <= MAX_SOCKETS,
        "{} sockets over the cap of {MAX_SOCKETS}",
        stats.sockets
    );
});
