//! The wire parsers on arbitrary bytes: inner IP headers and WireGuard
//! framing. Never a panic; a parsed view must agree with the bytes; our
//! framing must classify exactly as boringtun's parser does.
#![no_main]

use std::net::IpAddr;

use boringtun::noise::{Packet, Tunn};
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::wire::message::data_counter;
use meshvpn_engine::wire::{IpHeader, MessageKind, WireMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = IpHeader::new_checked(data) {
        assert!(h.total_len <= data.len() && h.total_len >= 20);
        match (data[0] >> 4, h.src, h.dst) {
            (4, IpAddr::V4(s), IpAddr::V4(d)) => {
                assert_eq!(s.octets(), data[12..16]);
                assert_eq!(d.octets(), data[16..20]);
                assert_eq!(h.total_len, u16::from_be_bytes([data[2], data[3]]) as usize);
            }
            (6, IpAddr::V6(s), IpAddr::V6(d)) => {
                assert_eq!(s.octets(), data[8..24]);
                assert_eq!(d.octets(), data[24..40]);
                assert_eq!(
                    h.total_len,
                    40 + u16::from_be_bytes([data[4], data[5]]) as usize
                );
            }
            other => panic!("version and address family disagree: {other:?}"),
        }
        // boringtun routes on the same destination.
        assert_eq!(Tunn::dst_address(data), Some(h.dst));
    }
    let ours = WireMessage::new_checked(data);
    let theirs = Tunn::parse_incoming_packet(data);
    match (&ours, &theirs) {
        (Ok(m), Ok(p)) => {
            let same = matches!(
                (m.kind, p),
                (MessageKind::HandshakeInitiation, Packet::HandshakeInit(_))
                    | (MessageKind::HandshakeResponse, Packet::HandshakeResponse(_))
                    | (MessageKind::CookieReply, Packet::PacketCookieReply(_))
                    | (MessageKind::Data, Packet::PacketData(_))
            );
            assert!(same, "{m:?} vs {p:?}");
            if m.kind == MessageKind::Data {
                assert!(data_counter(data).is_some());
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!("framing disagrees with boringtun: {ours:?} vs {theirs:?}"),
    }
});
