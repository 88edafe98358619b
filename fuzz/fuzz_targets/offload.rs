//! The TUN offloads on arbitrary reads: a virtio-net header and a packet
//! into `split`, every segment it makes into a `Coalescer`, every
//! aggregate back through `split`. Never a panic; segments tile the output
//! and are well-formed IP packets with valid checksums; coalescing loses
//! or invents no payload byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn_engine::io::offload::{split, Coalescer};
use meshvpn_engine::wire::checksum::checksum;
use meshvpn_engine::wire::virtio::{self, VirtioNetHdr, GSO_ECN, GSO_NONE};
use meshvpn_engine::wire::{IpPacket, TcpPacket};

/// IP and transport checksums both right.
fn checksums_ok(p: &[u8]) -> bool {
    let Ok(ip) = IpPacket::new_checked(p) else {
        return false;
    };
    let pseudo = ip.pseudo_header_sum(ip.protocol(), ip.payload_len());
    ip.verify_checksum() && checksum(ip.payload(), pseudo) == 0
}

/// The TCP payload of a segment (empty for anything else).
fn tcp_payload(p: &[u8]) -> &[u8] {
    IpPacket::new_checked(p)
        .ok()
        .filter(|ip| ip.protocol() == 6)
        .and_then(|ip| TcpPacket::new_checked(ip.payload()).ok())
        .map_or(&[], |t| t.payload())
}

fuzz_target!(|data: &[u8]| {
    let Ok(hdr) = VirtioNetHdr::new_checked(data) else {
        return;
    };
    let pkt = &data[virtio::HEADER_LEN..];
    // What one TUN read can hold (io::tun reads into a 64 KiB slot).
    if pkt.len() > 65535 {
        return;
    }
    let mut out = vec![0u8; 2 * 65536];
    let mut segs = Vec::new();
    let Ok(used) = split(&hdr, pkt, &mut out, |r| segs.push(r)) else {
        return;
    };
    let mut at = 0;
    for r in &segs {
        assert_eq!(r.start, at, "segments tile the output");
        at = r.end;
    }
    assert_eq!(at, used);
    let gso = hdr.gso_type & !GSO_ECN != GSO_NONE;
    if gso {
        for r in &segs {
            let s = &out[r.clone()];
            let ip = IpPacket::new_checked(s).expect("a segment is an IP packet");
            assert_eq!(ip.declared_len(), s.len());
            assert!(checksums_ok(s), "segment checksums");
        }
    }

    let mut co = Coalescer::new(256 * 1024);
    let mut pushed = 0;
    let mut sent = Vec::new();
    for r in &segs {
        if co.push(&out[r.clone()]) {
            pushed += 1;
            sent.extend_from_slice(tcp_payload(&out[r.clone()]));
        }
    }
    let mut written = 0;
    let mut resplit = vec![0u8; 2 * 65536];
    let mut received = Vec::new();
    co.drain(|w, n| {
        written += n;
        let h = VirtioNetHdr::new_checked(w).expect("a drained write has a header");
        let mut back = Vec::new();
        split(&h, &w[virtio::HEADER_LEN..], &mut resplit, |r| back.push(r))
            .expect("an aggregate splits");
        if n > 1 {
            assert_eq!(back.len(), n, "an aggregate of {n} splits into {n}");
        }
        for r in back {
            let s = &resplit[r];
            if n > 1 {
                assert!(checksums_ok(s), "re-split checksums");
            }
            received.extend_from_slice(tcp_payload(s));
        }
    });
    assert_eq!(written, pushed, "every pushed packet written once");
    assert_eq!(received, sent, "coalescing keeps the TCP payload");
});
