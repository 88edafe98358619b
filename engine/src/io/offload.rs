//! TUN offloads, as the kernel's virtio-net header describes them
//! (`include/uapi/linux/virtio_net.h`): pure functions over byte slices,
//! no syscalls. The bytes are read and written only through the checked
//! views of [`crate::wire`]; this file holds the offload logic.
//!
//! ```text
//!  kernel --TSO super-packet--> split()    --MSS-sized packets--> encrypt
//!  decrypt --in-order segments--> Coalescer --GRO super-packet--> kernel
//! ```
//!
//! Reading: with `IFF_VNET_HDR` every packet from the TUN starts with a
//! [`VirtioNetHdr`]. A GSO packet (TCP or UDP, up to 64 KiB) is cut into
//! `gso_size` pieces with their own IP and TCP/UDP headers and complete
//! checksums; a packet whose checksum was left to "hardware" gets it here.
//!
//! Writing: in-order TCP segments of one flow, as one decrypted batch
//! holds them, are joined into one packet the kernel then treats as a GRO
//! aggregate; the TCP checksum is left partial (`NEEDS_CSUM`), so the
//! kernel does not verify what the tunnel's AEAD already authenticated.

use std::ops::Range;

use crate::wire::checksum::fold;
use crate::wire::ip::{IpError, IpPacket, PROTO_TCP, PROTO_UDP};
use crate::wire::tcp::{self, flags, TcpPacket};
use crate::wire::udp::{self, UdpPacket};
use crate::wire::virtio::{
    self, VirtioNetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
};
use crate::wire::HeaderError;

/// Largest IP packet the kernel accepts as one GRO aggregate.
const MAX_AGGREGATE: usize = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("the virtio-net header is malformed or does not match the packet")]
    BadHeader,
    #[error("the GSO type is not one this engine asked for")]
    UnsupportedGso,
    #[error("no room for the segments in the output buffer")]
    NoRoom,
}

impl From<IpError> for OffloadError {
    fn from(_: IpError) -> Self {
        OffloadError::BadHeader
    }
}

impl From<HeaderError> for OffloadError {
    fn from(_: HeaderError) -> Self {
        OffloadError::BadHeader
    }
}

/// Writes the IP length field for a packet of `total` bytes and, for IPv4,
/// `id` (when given) and a fresh header checksum.
fn fix_ip_header<T: AsRef<[u8]> + AsMut<[u8]>>(
    ip: &mut IpPacket<T>,
    total: usize,
    id: Option<u16>,
) {
    ip.set_total_len(total);
    if let Some(id) = id {
        ip.set_ident(id);
    }
    ip.fill_checksum();
}

/// Splits the packet `pkt` (what followed `hdr` in one TUN read) into
/// MSS-sized IP packets written one after another into `out`; calls
/// `segment` with each one's range in `out`. Returns the bytes of `out`
/// used. A packet without GSO is copied, its checksum completed if asked.
pub fn split(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    out: &mut [u8],
    mut segment: impl FnMut(Range<usize>),
) -> Result<usize, OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        let dst = out.get_mut(..pkt.len()).ok_or(OffloadError::NoRoom)?;
        dst.copy_from_slice(pkt);
        if hdr.flags & F_NEEDS_CSUM != 0 {
            hdr.complete_checksum(dst)?;
        }
        segment(0..pkt.len());
        return Ok(pkt.len());
    }
    let ip = IpPacket::new_checked(pkt)?;
    let v4 = ip.is_v4();
    let tcp = match gso {
        GSO_TCPV4 if v4 => true,
        GSO_TCPV6 if !v4 => true,
        GSO_UDP_L4 => false,
        _ => return Err(OffloadError::UnsupportedGso),
    };
    let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    let ip_len = ip.header_len();
    if ip.protocol() != proto || hdr.csum_start as usize != ip_len {
        return Err(OffloadError::BadHeader);
    }
    // The header length is computed from the packet: the kernel's
    // `hdr_len` is only a hint.
    let (l4_len, first_seq) = if tcp {
        let t = TcpPacket::new_checked(ip.payload())?;
        (t.header_len(), t.seq_number())
    } else {
        UdpPacket::new_checked(ip.payload())?;
        (udp::HEADER_LEN, 0)
    };
    let hlen = ip_len + l4_len;
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return Err(OffloadError::BadHeader);
    }
    let payload = &pkt[hlen..];
    let first_id = ip.ident().unwrap_or(0);
    let n = payload.len().div_ceil(mss).max(1);
    let mut used = 0;
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let total = hlen + chunk.len();
        let seg = out
            .get_mut(used..used + total)
            .ok_or(OffloadError::NoRoom)?;
        seg[..hlen].copy_from_slice(&pkt[..hlen]);
        seg[hlen..].copy_from_slice(chunk);
        // Views of a copy of the headers checked above: they cannot fail,
        // but an error is still an error, not a panic.
        let mut ip = IpPacket::new_checked(seg)?;
        fix_ip_header(&mut ip, total, v4.then(|| first_id.wrapping_add(i as u16)));
        let pseudo = ip.pseudo_header_sum(proto, total - ip_len);
        if tcp {
            let mut t = TcpPacket::new_checked(ip.payload_mut())?;
            t.set_seq_number(first_seq.wrapping_add((i * mss) as u32));
            // As the kernel's TSO does: FIN and PSH on the last segment
            // only, CWR on the first only.
            let mut f = t.flags();
            if i + 1 < n {
                f &= !(flags::FIN | flags::PSH);
            }
            if i > 0 {
                f &= !flags::CWR;
            }
            t.set_flags(f);
            t.fill_checksum(pseudo);
        } else {
            let mut u = UdpPacket::new_checked(ip.payload_mut())?;
            u.set_length((total - ip_len) as u16);
            u.fill_checksum(pseudo);
        }
        segment(used..used + total);
        used += total;
    }
    Ok(used)
}

/// A plain TCP segment that may join an aggregate: its IP and TCP headers,
/// each parsed once.
struct TcpSegment<'a> {
    ip: IpPacket<&'a [u8]>,
    tcp: TcpPacket<&'a [u8]>,
}

impl<'a> TcpSegment<'a> {
    fn new(p: &'a [u8]) -> Option<TcpSegment<'a>> {
        let ip = IpPacket::new_checked(p).ok()?;
        if ip.protocol() != PROTO_TCP {
            return None;
        }
        // Fragments, IPv4 options and packets whose length field
        // disagrees are left alone.
        if ip.is_v4() && (ip.header_len() != 20 || ip.is_fragment()) {
            return None;
        }
        if ip.declared_len() != p.len() {
            return None;
        }
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        Some(TcpSegment { ip, tcp })
    }

    fn header_len(&self) -> usize {
        self.ip.header_len() + self.tcp.header_len()
    }

    fn payload(&self) -> &'a [u8] {
        self.tcp.payload()
    }

    /// ACK (and PSH on the last one) only: SYN, FIN, RST, URG end runs.
    fn is_plain_data(&self) -> bool {
        !self.payload().is_empty() && self.tcp.flags() & !flags::PSH == flags::ACK
    }

    /// True when `next` continues the aggregate headed by `self` whose
    /// next expected sequence number is `next_seq`.
    fn continued_by(&self, next: &TcpSegment, next_seq: u32) -> bool {
        next.header_len() == self.header_len()
            && next.tcp.seq_number() == next_seq
            && next.is_plain_data()
            // Same addresses, class, hop limit and DF; same ports.
            && self.ip.same_flow(&next.ip)
            && self.tcp.src_port() == next.tcp.src_port()
            && self.tcp.dst_port() == next.tcp.dst_port()
            // Same ACK number and options (timestamps included), as the
            // kernel's tcp_gro_receive demands; the window may move.
            && self.tcp.ack_number() == next.tcp.ack_number()
            && self.tcp.options() == next.tcp.options()
    }
}

/// One aggregate being built in the coalescer's buffer.
struct Aggregate {
    /// Where the packet starts in the buffer (after room for the header).
    start: usize,
    len: usize,
    /// IP and IP + TCP header lengths; zero for a plain packet (one that
    /// can take no segments).
    ip_len: usize,
    hlen: usize,
    mss: usize,
    next_seq: u32,
    segments: usize,
    /// A segment shorter than `mss`, or one with PSH, closes it.
    closed: bool,
}

impl Aggregate {
    /// Its headers as a segment, while it can still grow.
    fn head<'b>(&self, buf: &'b [u8]) -> Option<TcpSegment<'b>> {
        if self.closed {
            return None;
        }
        let head = &buf[self.start..self.start + self.hlen];
        let ip = IpPacket::new_checked(head).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        Some(TcpSegment { ip, tcp })
    }

    /// Its TCP header, for the fields a joining segment updates.
    fn tcp_mut<'b>(&self, buf: &'b mut [u8]) -> Option<TcpPacket<&'b mut [u8]>> {
        TcpPacket::new_checked(&mut buf[self.start + self.ip_len..self.start + self.hlen]).ok()
    }
}

/// Joins consecutive in-order TCP segments of one flow in a batch into GRO
/// aggregates; anything else passes through as a plain packet. Holds its
/// buffers across batches: no allocation per packet.
pub struct Coalescer {
    buf: Vec<u8>,
    used: usize,
    /// Aggregates and plain packets in output order; only the last one
    /// can grow (its payload ends the buffer).
    out: Vec<Aggregate>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new(512 * 1024)
    }
}

impl Coalescer {
    /// A coalescer holding at most `bytes` of packets per batch.
    pub fn new(bytes: usize) -> Coalescer {
        Coalescer {
            buf: vec![0u8; bytes],
            used: 0,
            out: Vec::with_capacity(1024),
        }
    }

    /// Adds one packet. Returns false (and takes nothing) when there is no
    /// room: drain and push again.
    pub fn push(&mut self, p: &[u8]) -> bool {
        let seg = TcpSegment::new(p);
        if let (Some(seg), Some(a)) = (&seg, self.out.last_mut()) {
            let payload = seg.payload();
            let fits = a.len + payload.len() <= MAX_AGGREGATE
                && payload.len() <= a.mss
                && a.head(&self.buf)
                    .is_some_and(|head| head.continued_by(seg, a.next_seq));
            if fits {
                if self.buf.len() - self.used < payload.len() {
                    return false;
                }
                self.buf[self.used..self.used + payload.len()].copy_from_slice(payload);
                self.used += payload.len();
                a.len += payload.len();
                a.segments += 1;
                a.next_seq = seg.tcp.seq_number().wrapping_add(payload.len() as u32);
                let last = payload.len() < a.mss || seg.tcp.flags() & flags::PSH != 0;
                if let Some(mut head) = a.tcp_mut(&mut self.buf) {
                    // The newest window is the one that holds.
                    head.set_window_len(seg.tcp.window_len());
                    if last {
                        // PSH on the last segment carries over to the aggregate.
                        head.set_flags(head.flags() | seg.tcp.flags() & flags::PSH);
                    }
                }
                a.closed = last;
                return true;
            }
        }
        // A new packet, with room for a virtio header in front of it.
        let need = virtio::HEADER_LEN + p.len();
        if self.buf.len() - self.used < need || self.out.len() == self.out.capacity() {
            return false;
        }
        let start = self.used + virtio::HEADER_LEN;
        self.buf[start..start + p.len()].copy_from_slice(p);
        self.used = start + p.len();
        let (ip_len, hlen, mss, next_seq, closed) = match seg {
            Some(s) if s.is_plain_data() => (
                s.ip.header_len(),
                s.header_len(),
                s.payload().len(),
                s.tcp.seq_number().wrapping_add(s.payload().len() as u32),
                s.tcp.flags() & flags::PSH != 0,
            ),
            _ => (0, 0, 0, 0, true),
        };
        self.out.push(Aggregate {
            start,
            len: p.len(),
            ip_len,
            hlen,
            mss,
            next_seq,
            segments: 1,
            closed,
        });
        true
    }

    /// Hands every packet and aggregate, virtio header first, to `write`
    /// in the order they were pushed, with how many pushed packets each
    /// holds, and empties the coalescer.
    pub fn drain(&mut self, mut write: impl FnMut(&[u8], usize)) {
        for a in self.out.drain(..) {
            let pkt = &mut self.buf[a.start..a.start + a.len];
            let hdr = if a.segments > 1 {
                // Its headers were checked when it was opened: this cannot
                // fail, and would only send the packet without GSO if it did.
                gro_header(pkt, &a).unwrap_or_default()
            } else {
                VirtioNetHdr::default()
            };
            let whole = &mut self.buf[a.start - virtio::HEADER_LEN..a.start + a.len];
            whole[..virtio::HEADER_LEN].copy_from_slice(&hdr.to_bytes());
            write(whole, a.segments);
        }
        self.used = 0;
    }
}

/// Fixes the IP length and checksum of an aggregate of several segments,
/// leaves its TCP checksum partial, and returns the virtio-net header that
/// tells the kernel so.
fn gro_header(pkt: &mut [u8], a: &Aggregate) -> Option<VirtioNetHdr> {
    let mut ip = IpPacket::new_checked(pkt).ok()?;
    let v4 = ip.is_v4();
    let ip_len = ip.header_len();
    fix_ip_header(&mut ip, a.len, None);
    // A partial checksum: the pseudo-header sum, not inverted.
    let pseudo = fold(ip.pseudo_header_sum(PROTO_TCP, a.len - ip_len));
    TcpPacket::new_checked(ip.payload_mut())
        .ok()?
        .set_checksum(pseudo);
    Some(VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: a.hlen as u16,
        gso_size: a.mss as u16,
        csum_start: ip_len as u16,
        csum_offset: tcp::field::CHECKSUM.start as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::checksum;
    use crate::wire::virtio::GSO_UDP;

    const TCP_ACK: u8 = flags::ACK;
    const TCP_PSH: u8 = flags::PSH;
    const TCP_FIN: u8 = flags::FIN;

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// Recomputes the IP header checksum and the TCP or UDP checksum.
    fn fill_checksums(p: &mut [u8]) {
        let mut ip = IpPacket::new_checked(p).unwrap();
        ip.fill_checksum();
        let proto = ip.protocol();
        let pseudo = ip.pseudo_header_sum(proto, ip.payload_len());
        if proto == PROTO_TCP {
            TcpPacket::new_checked(ip.payload_mut())
                .unwrap()
                .fill_checksum(pseudo);
        } else {
            UdpPacket::new_checked(ip.payload_mut())
                .unwrap()
                .fill_checksum(pseudo);
        }
    }

    /// A TCP/IPv4 or IPv6 segment with a valid checksum.
    fn tcp_packet(v6: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let total = ip_len + 20 + payload.len();
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            put16(&mut p, 4, (total - 40) as u16);
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            put16(&mut p, 2, total as u16);
            put16(&mut p, 4, 0x1234);
            p[6] = 0x40;
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        }
        let t = ip_len;
        put16(&mut p, t, 40000);
        put16(&mut p, t + 2, 5201);
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&7u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        put16(&mut p, t + 14, 512);
        p[t + 20..].copy_from_slice(payload);
        fill_checksums(&mut p);
        p
    }

    /// Checks the IPv4 header checksum and the TCP/UDP checksum.
    fn checksums_ok(p: &[u8]) -> bool {
        let ip = IpPacket::new_checked(p).unwrap();
        let pseudo = ip.pseudo_header_sum(ip.protocol(), ip.payload_len());
        ip.verify_checksum() && checksum(ip.payload(), pseudo) == 0
    }

    /// The IP and TCP views of a segment `split` or the tests made.
    fn views(p: &[u8]) -> (IpPacket<&[u8]>, TcpPacket<&[u8]>) {
        let ip = IpPacket::new_checked(p).unwrap();
        (ip, TcpPacket::new_checked(ip.payload()).unwrap())
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn split_tcp_v4_into_mss_segments() {
        let data = payload(3000);
        let big = tcp_packet(false, 1000, TCP_ACK | TCP_PSH | TCP_FIN, &data);
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut out = vec![0u8; 8192];
        let mut segs = Vec::new();
        let used = split(&hdr, &big, &mut out, |r| segs.push(r)).unwrap();
        assert_eq!(used, 3000 + 3 * 40);
        assert_eq!(segs.len(), 3);
        let mut joined = Vec::new();
        for (i, r) in segs.iter().enumerate() {
            let s = &out[r.clone()];
            assert!(checksums_ok(s), "segment {i} checksum");
            let (ip, tcp) = views(s);
            assert_eq!(ip.declared_len(), s.len());
            assert_eq!(ip.ident(), Some(0x1234 + i as u16));
            assert_eq!(tcp.seq_number(), 1000 + 1400 * i as u32);
            let last = i == 2;
            assert_eq!(tcp.flags() & (TCP_PSH | TCP_FIN) != 0, last, "flags of {i}");
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, data);
        assert_eq!(out[segs[2].clone()].len(), 40 + 200);
    }

    #[test]
    fn split_tcp_v6_and_udp() {
        let data = payload(2500);
        let big = tcp_packet(true, u32::MAX - 10, TCP_ACK, &data);
        let hdr = VirtioNetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 1000,
            csum_start: 40,
            csum_offset: 16,
            flags: F_NEEDS_CSUM,
            hdr_len: 60,
        };
        let mut out = vec![0u8; 8192];
        let mut segs = Vec::new();
        split(&hdr, &big, &mut out, |r| segs.push(r)).unwrap();
        assert_eq!(segs.len(), 3);
        for (i, r) in segs.iter().enumerate() {
            let s = &out[r.clone()];
            assert!(checksums_ok(s));
            let (ip, tcp) = views(s);
            assert_eq!(ip.declared_len(), s.len());
            assert_eq!(
                tcp.seq_number(),
                (u32::MAX - 10).wrapping_add(1000 * i as u32)
            );
        }

        // UDP (USO): a 20-byte IPv4 header, an 8-byte UDP header.
        let mut udp = tcp_packet(false, 0, 0, &payload(2988));
        udp[9] = PROTO_UDP;
        fill_checksums(&mut udp);
        let hdr = VirtioNetHdr {
            gso_type: GSO_UDP_L4,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
            flags: F_NEEDS_CSUM,
            hdr_len: 28,
        };
        let mut segs = Vec::new();
        split(&hdr, &udp, &mut out, |r| segs.push(r)).unwrap();
        assert_eq!(segs.len(), 3);
        for r in &segs {
            let s = &out[r.clone()];
            assert!(checksums_ok(s));
            let ip = IpPacket::new_checked(s).unwrap();
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert_eq!(udp.length() as usize, s.len() - 20);
        }
    }

    #[test]
    fn split_rejects_bad_headers_and_small_buffers() {
        let big = tcp_packet(false, 0, TCP_ACK, &payload(3000));
        let good = VirtioNetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
            flags: F_NEEDS_CSUM,
            hdr_len: 40,
        };
        let mut out = vec![0u8; 8192];
        let bad = [
            VirtioNetHdr {
                gso_type: GSO_TCPV6,
                ..good
            },
            VirtioNetHdr {
                gso_type: GSO_UDP,
                ..good
            },
            VirtioNetHdr {
                gso_size: 0,
                ..good
            },
            VirtioNetHdr {
                csum_start: 30,
                ..good
            },
        ];
        for h in bad {
            assert!(split(&h, &big, &mut out, |_| {}).is_err(), "{h:?}");
        }
        assert_eq!(
            split(&good, &big, &mut out[..2000], |_| {}),
            Err(OffloadError::NoRoom)
        );
        for cut in [0, 1, 19, 20, 39] {
            assert!(split(&good, &big[..cut], &mut out, |_| {}).is_err());
        }
    }

    #[test]
    fn finish_checksum_completes_a_partial_one() {
        let mut p = tcp_packet(false, 5, TCP_ACK, &payload(333));
        let mut ip = IpPacket::new_checked(&mut p[..]).unwrap();
        let pseudo = fold(ip.pseudo_header_sum(PROTO_TCP, ip.payload_len()));
        TcpPacket::new_checked(ip.payload_mut())
            .unwrap()
            .set_checksum(pseudo);
        assert!(!checksums_ok(&p));
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = vec![0u8; 1000];
        let mut segs = Vec::new();
        split(&hdr, &p, &mut out, |r| segs.push(r)).unwrap();
        assert!(checksums_ok(&out[segs[0].clone()]));
    }

    /// Coalesced output, split again as the kernel would: the original
    /// segments come back, checksums valid.
    #[test]
    fn coalesce_in_order_segments_and_split_back() {
        for v6 in [false, true] {
            let data = payload(1300 * 5 + 100);
            let segs: Vec<Vec<u8>> = data
                .chunks(1300)
                .enumerate()
                .map(|(i, c)| {
                    let flags = if i == 5 { TCP_ACK | TCP_PSH } else { TCP_ACK };
                    tcp_packet(v6, 100 + 1300 * i as u32, flags, c)
                })
                .collect();
            let mut co = Coalescer::new(1 << 20);
            for s in &segs {
                assert!(co.push(s));
            }
            let mut writes = Vec::new();
            co.drain(|w, n| {
                assert_eq!(n, 6);
                writes.push(w.to_vec())
            });
            assert_eq!(writes.len(), 1, "one aggregate");
            let w = &writes[0];
            let hdr = VirtioNetHdr::new_checked(w).unwrap();
            assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(hdr.gso_size, 1300);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            let mut out = vec![0u8; 1 << 16];
            let mut back = Vec::new();
            split(&hdr, &w[virtio::HEADER_LEN..], &mut out, |r| back.push(r)).unwrap();
            assert_eq!(back.len(), 6);
            for (i, r) in back.iter().enumerate() {
                let mut expect = segs[i].clone();
                let got = &out[r.clone()];
                assert!(checksums_ok(got));
                if !v6 {
                    // IDs restart from the first segment's.
                    let id = views(got).0.ident().unwrap();
                    let mut ip = IpPacket::new_checked(&mut expect[..]).unwrap();
                    ip.set_ident(id);
                    ip.fill_checksum();
                }
                assert_eq!(got, &expect[..], "segment {i} v6={v6}");
            }
        }
    }

    #[test]
    fn coalesce_keeps_gaps_other_flows_and_odd_packets_apart() {
        let a = tcp_packet(false, 0, TCP_ACK, &payload(1000));
        let gap = tcp_packet(false, 2000, TCP_ACK, &payload(1000));
        let mut other_flow = tcp_packet(false, 1000, TCP_ACK, &payload(1000));
        other_flow[21] ^= 1; // another source port
        let syn = tcp_packet(false, 1000, 0x02, &[]);
        let short = tcp_packet(false, 1000, TCP_ACK, &payload(500));
        let after_short = tcp_packet(false, 1500, TCP_ACK, &payload(500));
        let longer = tcp_packet(false, 1000, TCP_ACK, &payload(1200));
        let mut ping = vec![0x45u8; 28];
        ping[9] = 1;
        for (name, second, writes) in [
            ("gap", &gap, 2),
            ("other flow", &other_flow, 2),
            ("syn", &syn, 2),
            ("longer", &longer, 2),
            ("short", &short, 1),
            ("ping", &ping, 2),
        ] {
            let mut co = Coalescer::new(1 << 20);
            assert!(co.push(&a));
            assert!(co.push(second));
            if name == "short" {
                // Nothing joins after a short segment.
                assert!(co.push(&after_short));
            }
            let (mut n, mut packets) = (0, 0);
            co.drain(|_, segs| {
                n += 1;
                packets += segs;
            });
            assert_eq!(packets, if name == "short" { 3 } else { 2 });
            assert_eq!(n, writes + (name == "short") as usize, "{name}");
        }
    }

    #[test]
    fn coalescer_reports_no_room() {
        let a = tcp_packet(false, 0, TCP_ACK, &payload(1000));
        let mut co = Coalescer::new(1500);
        assert!(co.push(&a));
        let ping = [0x45u8; 600];
        assert!(!co.push(&ping));
        let mut packets = 0;
        co.drain(|_, n| packets += n);
        assert_eq!(packets, 1);
        assert!(co.push(&ping));
    }
}
