//! TUN offloads, as the kernel's virtio-net header describes them
//! (`include/uapi/linux/virtio_net.h`): pure functions over byte slices,
//! no syscalls.
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

/// Size of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds only the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const IPV6_HDR_LEN: usize = 40;
const UDP_HDR_LEN: usize = 8;
/// Offsets of the checksum fields inside the TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Largest IP packet the kernel accepts as one GRO aggregate.
const MAX_AGGREGATE: usize = 65535;

/// `struct virtio_net_hdr`, in the host's byte order (the TUN default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    pub fn decode(b: &[u8]) -> Option<VirtioNetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut out = [0u8; VNET_HDR_LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("the virtio-net header is malformed or does not match the packet")]
    BadHeader,
    #[error("the GSO type is not one this engine asked for")]
    UnsupportedGso,
    #[error("no room for the segments in the output buffer")]
    NoRoom,
}

/// Ones' complement sum of `data` added to `initial` (not yet folded).
fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u16::from_be_bytes([rest[i], rest[i + 1]]) as u64;
        i += 2;
    }
    if i < rest.len() {
        acc += (rest[i] as u64) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum (RFC 1071) of `data` with `initial` folded in.
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum(data, initial))
}

/// The pseudo-header sum for a transport header over IPv4 or IPv6.
fn pseudo_header_sum(ip: &[u8], proto: u8, len: usize) -> u64 {
    let addrs = if ip[0] >> 4 == 4 {
        &ip[12..20]
    } else {
        &ip[8..40]
    };
    sum(addrs, proto as u64 + len as u64)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The IP header length and transport protocol of `p`, when it is a plain
/// IPv4 packet or an IPv6 packet without extension headers.
fn ip_header(p: &[u8]) -> Option<(usize, u8)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = (p[0] & 0x0f) as usize * 4;
            (ihl >= 20 && p.len() >= ihl).then_some((ihl, p[9]))
        }
        6 if p.len() >= IPV6_HDR_LEN => Some((IPV6_HDR_LEN, p[6])),
        _ => None,
    }
}

/// Writes the IP length field for a packet of `total` bytes and, for IPv4,
/// `id` and a fresh header checksum.
fn fix_ip_header(p: &mut [u8], ip_len: usize, total: usize, id: Option<u16>) {
    if p[0] >> 4 == 4 {
        put16(p, 2, total as u16);
        if let Some(id) = id {
            put16(p, 4, id);
        }
        put16(p, 10, 0);
        let c = checksum(&p[..ip_len], 0);
        put16(p, 10, c);
    } else {
        put16(p, 4, (total - IPV6_HDR_LEN) as u16);
    }
}

/// Completes a checksum the kernel left partial (`NEEDS_CSUM` without GSO).
pub fn finish_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    if at + 2 > packet.len() {
        return Err(OffloadError::BadHeader);
    }
    let initial = be16(packet, at) as u64;
    put16(packet, at, 0);
    let c = checksum(&packet[start..], initial);
    put16(packet, at, c);
    Ok(())
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
            finish_checksum(hdr, dst)?;
        }
        segment(0..pkt.len());
        return Ok(pkt.len());
    }
    let (ip_len, proto) = ip_header(pkt).ok_or(OffloadError::BadHeader)?;
    let v4 = pkt[0] >> 4 == 4;
    let tcp = match gso {
        GSO_TCPV4 if v4 => true,
        GSO_TCPV6 if !v4 => true,
        GSO_UDP_L4 => false,
        _ => return Err(OffloadError::UnsupportedGso),
    };
    if proto != if tcp { PROTO_TCP } else { PROTO_UDP } || hdr.csum_start as usize != ip_len {
        return Err(OffloadError::BadHeader);
    }
    // The header length is computed from the packet: the kernel's
    // `hdr_len` is only a hint.
    let l4_len = if tcp {
        let off = pkt.get(ip_len + 12).ok_or(OffloadError::BadHeader)?;
        (*off >> 4) as usize * 4
    } else {
        UDP_HDR_LEN
    };
    let hlen = ip_len + l4_len;
    let mss = hdr.gso_size as usize;
    if (tcp && l4_len < 20) || pkt.len() < hlen || mss == 0 {
        return Err(OffloadError::BadHeader);
    }
    let payload = &pkt[hlen..];
    let first_id = if v4 { be16(pkt, 4) } else { 0 };
    let first_seq = if tcp {
        u32::from_be_bytes(pkt[ip_len + 4..ip_len + 8].try_into().unwrap_or_default())
    } else {
        0
    };
    let n = payload.len().div_ceil(mss).max(1);
    let mut used = 0;
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let total = hlen + chunk.len();
        let seg = out
            .get_mut(used..used + total)
            .ok_or(OffloadError::NoRoom)?;
        seg[..hlen].copy_from_slice(&pkt[..hlen]);
        seg[hlen..].copy_from_slice(chunk);
        fix_ip_header(
            seg,
            ip_len,
            total,
            v4.then(|| first_id.wrapping_add(i as u16)),
        );
        let csum_at = if tcp {
            let seq = first_seq.wrapping_add((i * mss) as u32);
            seg[ip_len + 4..ip_len + 8].copy_from_slice(&seq.to_be_bytes());
            // As the kernel's TSO does: FIN and PSH on the last segment
            // only, CWR on the first only.
            if i + 1 < n {
                seg[ip_len + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[ip_len + 13] &= !TCP_CWR;
            }
            ip_len + TCP_CSUM
        } else {
            put16(seg, ip_len + 4, (total - ip_len) as u16);
            ip_len + UDP_CSUM
        };
        let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
        put16(seg, csum_at, 0);
        let pseudo = pseudo_header_sum(seg, proto, total - ip_len);
        let mut c = checksum(&seg[ip_len..], pseudo);
        if !tcp && c == 0 {
            c = 0xffff;
        }
        put16(seg, csum_at, c);
        segment(used..used + total);
        used += total;
    }
    Ok(used)
}

/// A TCP segment's identity for coalescing: what must match for two
/// segments to be parts of one stream write.
struct TcpSegment {
    ip_len: usize,
    hlen: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

fn tcp_segment(p: &[u8]) -> Option<TcpSegment> {
    let (ip_len, proto) = ip_header(p)?;
    if proto != PROTO_TCP || p.len() < ip_len + 20 {
        return None;
    }
    let v4 = p[0] >> 4 == 4;
    // Fragments and packets whose length field disagrees are left alone.
    if v4 && (ip_len != 20 || be16(p, 2) as usize != p.len() || be16(p, 6) & 0x3fff != 0) {
        return None;
    }
    if !v4 && be16(p, 4) as usize + IPV6_HDR_LEN != p.len() {
        return None;
    }
    let hlen = ip_len + (p[ip_len + 12] >> 4) as usize * 4;
    if hlen < ip_len + 20 || p.len() < hlen {
        return None;
    }
    Some(TcpSegment {
        ip_len,
        hlen,
        seq: u32::from_be_bytes(p[ip_len + 4..ip_len + 8].try_into().ok()?),
        flags: p[ip_len + 13],
        payload: p.len() - hlen,
    })
}

/// True when `next` continues the aggregate whose headers are `head` and
/// whose next expected sequence number is `next_seq`.
fn continues(
    head: &[u8],
    ip_len: usize,
    hlen: usize,
    next: &[u8],
    n: &TcpSegment,
    next_seq: u32,
) -> bool {
    let v4 = head[0] >> 4 == 4;
    n.hlen == hlen
        && n.seq == next_seq
        && n.payload > 0
        // ACK (and PSH on the last one) only: SYN, FIN, RST, URG end runs.
        && n.flags & !TCP_PSH == TCP_ACK
        && next[0] >> 4 == head[0] >> 4
        // Same addresses and ports.
        && if v4 {
            head[12..20] == next[12..20] && head[1] == next[1] && head[8] == next[8]
                && head[6] & 0x40 == next[6] & 0x40
        } else {
            head[8..40] == next[8..40] && head[..4] == next[..4] && head[7] == next[7]
        }
        && head[ip_len..ip_len + 4] == next[n.ip_len..n.ip_len + 4]
        // Same ACK number and options (timestamps included), as the
        // kernel's tcp_gro_receive demands; the window may move.
        && head[ip_len + 8..ip_len + 12] == next[n.ip_len + 8..n.ip_len + 12]
        && head[ip_len + 20..hlen] == next[n.ip_len + 20..n.hlen]
}

/// One aggregate being built in the coalescer's buffer.
struct Aggregate {
    /// Where the packet starts in the buffer (after room for the header).
    start: usize,
    len: usize,
    ip_len: usize,
    hlen: usize,
    mss: usize,
    next_seq: u32,
    segments: usize,
    /// A segment shorter than `mss`, or one with PSH, closes it.
    closed: bool,
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
        let seg = tcp_segment(p);
        if let (Some(seg), Some(a)) = (&seg, self.out.last_mut()) {
            let head = &self.buf[a.start..a.start + a.hlen];
            let fits = !a.closed
                && a.len + seg.payload <= MAX_AGGREGATE
                && seg.payload <= a.mss
                && continues(head, a.ip_len, a.hlen, p, seg, a.next_seq);
            if fits {
                if self.buf.len() - self.used < seg.payload {
                    return false;
                }
                self.buf[self.used..self.used + seg.payload].copy_from_slice(&p[seg.hlen..]);
                self.used += seg.payload;
                a.len += seg.payload;
                a.segments += 1;
                a.next_seq = seg.seq.wrapping_add(seg.payload as u32);
                // The newest window is the one that holds.
                let w = a.start + a.ip_len + 14;
                self.buf[w..w + 2].copy_from_slice(&p[seg.ip_len + 14..seg.ip_len + 16]);
                if seg.payload < a.mss || seg.flags & TCP_PSH != 0 {
                    a.closed = true;
                    // PSH on the last segment carries over to the aggregate.
                    self.buf[a.start + a.ip_len + 13] |= seg.flags & TCP_PSH;
                }
                return true;
            }
        }
        // A new packet, with room for a virtio header in front of it.
        let need = VNET_HDR_LEN + p.len();
        if self.buf.len() - self.used < need || self.out.len() == self.out.capacity() {
            return false;
        }
        let start = self.used + VNET_HDR_LEN;
        self.buf[start..start + p.len()].copy_from_slice(p);
        self.used = start + p.len();
        let (ip_len, hlen, mss, next_seq, closed) = match seg {
            Some(s) if s.payload > 0 && s.flags & !TCP_PSH == TCP_ACK => (
                s.ip_len,
                s.hlen,
                s.payload,
                s.seq.wrapping_add(s.payload as u32),
                s.flags & TCP_PSH != 0,
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
            let mut hdr = VirtioNetHdr::default();
            let pkt = &mut self.buf[a.start..a.start + a.len];
            if a.segments > 1 {
                let v4 = pkt[0] >> 4 == 4;
                fix_ip_header(pkt, a.ip_len, a.len, None);
                // A partial checksum: the pseudo-header sum, not inverted.
                let pseudo = fold(pseudo_header_sum(pkt, PROTO_TCP, a.len - a.ip_len));
                put16(pkt, a.ip_len + TCP_CSUM, pseudo);
                hdr = VirtioNetHdr {
                    flags: F_NEEDS_CSUM,
                    gso_type: if v4 { GSO_TCPV4 } else { GSO_TCPV6 },
                    hdr_len: a.hlen as u16,
                    gso_size: a.mss as u16,
                    csum_start: a.ip_len as u16,
                    csum_offset: TCP_CSUM as u16,
                };
            }
            let whole = &mut self.buf[a.start - VNET_HDR_LEN..a.start + a.len];
            whole[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
            write(whole, a.segments);
        }
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let c = checksum(&p[..20], 0);
            put16(&mut p, 10, c);
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
        let pseudo = pseudo_header_sum(&p, PROTO_TCP, total - t);
        let c = checksum(&p[t..], pseudo);
        put16(&mut p, t + TCP_CSUM, c);
        p
    }

    /// Checks the IPv4 header checksum and the TCP/UDP checksum.
    fn checksums_ok(p: &[u8]) -> bool {
        let (ip_len, proto) = ip_header(p).unwrap();
        let ip_ok = p[0] >> 4 == 6 || checksum(&p[..ip_len], 0) == 0;
        let pseudo = pseudo_header_sum(p, proto, p.len() - ip_len);
        ip_ok && checksum(&p[ip_len..], pseudo) == 0
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
            assert_eq!(be16(s, 2) as usize, s.len());
            assert_eq!(be16(s, 4), 0x1234 + i as u16);
            let seq = u32::from_be_bytes(s[24..28].try_into().unwrap());
            assert_eq!(seq, 1000 + 1400 * i as u32);
            let last = i == 2;
            assert_eq!(s[33] & (TCP_PSH | TCP_FIN) != 0, last, "flags of {i}");
            joined.extend_from_slice(&s[40..]);
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
            assert_eq!(be16(s, 4) as usize + 40, s.len());
            let seq = u32::from_be_bytes(s[44..48].try_into().unwrap());
            assert_eq!(seq, (u32::MAX - 10).wrapping_add(1000 * i as u32));
        }

        // UDP (USO): a 20-byte IPv4 header, an 8-byte UDP header.
        let mut udp = tcp_packet(false, 0, 0, &payload(2988));
        udp[9] = PROTO_UDP;
        put16(&mut udp, 10, 0);
        let c = checksum(&udp[..20], 0);
        put16(&mut udp, 10, c);
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
            assert_eq!(be16(s, 24) as usize, s.len() - 20);
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
        let pseudo = fold(pseudo_header_sum(&p, PROTO_TCP, p.len() - 20));
        put16(&mut p, 20 + TCP_CSUM, pseudo);
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
            let hdr = VirtioNetHdr::decode(w).unwrap();
            assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(hdr.gso_size, 1300);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            let mut out = vec![0u8; 1 << 16];
            let mut back = Vec::new();
            split(&hdr, &w[VNET_HDR_LEN..], &mut out, |r| back.push(r)).unwrap();
            assert_eq!(back.len(), 6);
            for (i, r) in back.iter().enumerate() {
                let mut expect = segs[i].clone();
                let got = &out[r.clone()];
                assert!(checksums_ok(got));
                if !v6 {
                    // IDs restart from the first segment's.
                    expect[4..6].copy_from_slice(&got[4..6]);
                    put16(&mut expect, 10, 0);
                    let c = checksum(&expect[..20], 0);
                    put16(&mut expect, 10, c);
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
