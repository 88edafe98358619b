//! Inner IPv4/IPv6 headers: the few fields routing needs ([`IpHeader`]),
//! and a checked view of the whole header for the TUN offloads
//! ([`IpPacket`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use super::checksum;
use super::field::{be16, put16};

/// IP protocol numbers (IANA) of the transports the offloads handle.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

const V4_MIN_HEADER: usize = 20;
/// Version in the high nibble, header length in 32-bit words in the low.
const V4_VER_IHL: usize = 0;
const V4_TOS: usize = 1;
const V4_TOTAL_LEN: Range<usize> = 2..4;
const V4_IDENT: Range<usize> = 4..6;
const V4_FLAGS_FRAG: Range<usize> = 6..8;
const V4_TTL: usize = 8;
const V4_PROTOCOL: usize = 9;
const V4_CHECKSUM: Range<usize> = 10..12;
const V4_SRC: Range<usize> = 12..16;
const V4_DST: Range<usize> = 16..20;
/// Bits of [`V4_FLAGS_FRAG`]: don't fragment; more fragments and the
/// fragment offset (any of them set: a fragment).
const V4_DONT_FRAG: u16 = 0x4000;
const V4_FRAGMENT: u16 = 0x3fff;
const V4_FRAG_OFFSET: u16 = 0x1fff;
const V6_HEADER: usize = 40;
/// Version, traffic class and flow label.
const V6_VER_CLASS_FLOW: Range<usize> = 0..4;
const V6_PAYLOAD_LEN: Range<usize> = 4..6;
const V6_NEXT_HEADER: usize = 6;
const V6_HOP_LIMIT: usize = 7;
const V6_SRC: Range<usize> = 8..24;
const V6_DST: Range<usize> = 24..40;

/// Why bytes are not an IP packet we can route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    Version(u8),
    #[error("packet shorter than its IP header")]
    Truncated,
    #[error("IP length field says {declared} bytes, packet has {actual}")]
    Length { declared: usize, actual: usize },
    #[error("IPv4 header length {0} is below 20")]
    HeaderLength(usize),
}

/// A validated view of an IP header's addresses and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Length of the packet as its header declares it (may be less than the
    /// buffer: trailing padding is not part of the packet).
    pub total_len: usize,
}

impl IpHeader {
    #[inline]
    pub fn new_checked(packet: &[u8]) -> Result<IpHeader, IpError> {
        let first = *packet.first().ok_or(IpError::Empty)?;
        match first >> 4 {
            4 => {
                if packet.len() < V4_MIN_HEADER {
                    return Err(IpError::Truncated);
                }
                let total_len = be16(packet, V4_TOTAL_LEN) as usize;
                check_len(total_len, packet.len())?;
                Ok(IpHeader {
                    src: IpAddr::V4(Ipv4Addr::from(addr4(&packet[V4_SRC]))),
                    dst: IpAddr::V4(Ipv4Addr::from(addr4(&packet[V4_DST]))),
                    total_len,
                })
            }
            6 => {
                if packet.len() < V6_HEADER {
                    return Err(IpError::Truncated);
                }
                let total_len = V6_HEADER + be16(packet, V6_PAYLOAD_LEN) as usize;
                check_len(total_len, packet.len())?;
                Ok(IpHeader {
                    src: IpAddr::V6(Ipv6Addr::from(addr16(&packet[V6_SRC]))),
                    dst: IpAddr::V6(Ipv6Addr::from(addr16(&packet[V6_DST]))),
                    total_len,
                })
            }
            v => Err(IpError::Version(v)),
        }
    }
}

/// An IPv4 or IPv6 packet whose fixed header (and, for IPv4, options)
/// lies inside the buffer. IPv6 extension headers are not walked: the
/// "protocol" of an IPv6 packet is its next-header field as it stands.
/// The length fields are not trusted: accessors never index by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket<T: AsRef<[u8]>> {
    buffer: T,
    v4: bool,
    header_len: usize,
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    #[inline]
    pub fn new_checked(buffer: T) -> Result<IpPacket<T>, IpError> {
        let b = buffer.as_ref();
        let first = *b.first().ok_or(IpError::Empty)?;
        let (v4, header_len) = match first >> 4 {
            4 => {
                if b.len() < V4_MIN_HEADER {
                    return Err(IpError::Truncated);
                }
                let ihl = (b[V4_VER_IHL] & 0x0f) as usize * 4;
                if ihl < V4_MIN_HEADER {
                    return Err(IpError::HeaderLength(ihl));
                }
                if b.len() < ihl {
                    return Err(IpError::Truncated);
                }
                (true, ihl)
            }
            6 if b.len() < V6_HEADER => return Err(IpError::Truncated),
            6 => (false, V6_HEADER),
            v => return Err(IpError::Version(v)),
        };
        Ok(IpPacket {
            buffer,
            v4,
            header_len,
        })
    }

    #[inline]
    pub fn is_v4(&self) -> bool {
        self.v4
    }

    /// The IP header's length, IPv4 options included.
    #[inline]
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    #[inline]
    pub fn protocol(&self) -> u8 {
        let b = self.buffer.as_ref();
        if self.v4 {
            b[V4_PROTOCOL]
        } else {
            b[V6_NEXT_HEADER]
        }
    }

    /// The packet's length as its header declares it.
    #[inline]
    pub fn declared_len(&self) -> usize {
        let b = self.buffer.as_ref();
        if self.v4 {
            be16(b, V4_TOTAL_LEN) as usize
        } else {
            V6_HEADER + be16(b, V6_PAYLOAD_LEN) as usize
        }
    }

    /// The IPv4 identification (`None` for IPv6, which has none outside a
    /// fragment header).
    #[inline]
    pub fn ident(&self) -> Option<u16> {
        self.v4.then(|| be16(self.buffer.as_ref(), V4_IDENT))
    }

    /// An IPv4 fragment (more fragments follow, or a non-zero offset).
    /// Always false for IPv6: its fragments are extension headers.
    #[inline]
    pub fn is_fragment(&self) -> bool {
        self.v4 && be16(self.buffer.as_ref(), V4_FLAGS_FRAG) & V4_FRAGMENT != 0
    }

    /// The IPv4 fragment offset in 8-byte units (0 for the first fragment,
    /// for an unfragmented packet and always for IPv6).
    #[inline]
    pub fn fragment_offset(&self) -> u16 {
        if self.v4 {
            be16(self.buffer.as_ref(), V4_FLAGS_FRAG) & V4_FRAG_OFFSET
        } else {
            0
        }
    }

    /// TTL or hop limit.
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        let b = self.buffer.as_ref();
        if self.v4 {
            b[V4_TTL]
        } else {
            b[V6_HOP_LIMIT]
        }
    }

    /// Source then destination address, as bytes (8 or 32 of them).
    #[inline]
    pub fn addrs(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        if self.v4 {
            &b[V4_SRC.start..V4_DST.end]
        } else {
            &b[V6_SRC.start..V6_DST.end]
        }
    }

    /// Same version, addresses, type of service or traffic class and flow
    /// label, hop limit and (IPv4) don't-fragment bit: what the kernel's
    /// GRO (`inet_gro_receive`, `ipv6_gro_receive`) demands of two packets
    /// of one flow. Compared as header bytes, one version test.
    #[inline]
    pub fn same_flow<U: AsRef<[u8]>>(&self, other: &IpPacket<U>) -> bool {
        let (a, b) = (self.buffer.as_ref(), other.buffer.as_ref());
        if self.v4 != other.v4 {
            return false;
        }
        if self.v4 {
            let df = (V4_DONT_FRAG >> 8) as u8;
            a[V4_TOS] == b[V4_TOS]
                && a[V4_TTL] == b[V4_TTL]
                && a[V4_FLAGS_FRAG.start] & df == b[V4_FLAGS_FRAG.start] & df
                && a[V4_SRC.start..V4_DST.end] == b[V4_SRC.start..V4_DST.end]
        } else {
            a[V6_VER_CLASS_FLOW] == b[V6_VER_CLASS_FLOW]
                && a[V6_HOP_LIMIT] == b[V6_HOP_LIMIT]
                && a[V6_SRC.start..V6_DST.end] == b[V6_SRC.start..V6_DST.end]
        }
    }

    /// The bytes after the IP header in the buffer.
    #[inline]
    pub fn payload_len(&self) -> usize {
        self.buffer.as_ref().len() - self.header_len
    }

    /// The sum (see [`checksum::sum`]) of the pseudo-header a TCP or UDP
    /// checksum covers (RFC 9293 3.1, RFC 8200 8.1), for a transport header
    /// and payload of `l4_len` bytes.
    #[inline]
    pub fn pseudo_header_sum(&self, proto: u8, l4_len: usize) -> u64 {
        checksum::sum(self.addrs(), proto as u64 + l4_len as u64)
    }

    /// True when the IPv4 header checksum is right (always for IPv6).
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        !self.v4 || checksum::checksum(&self.buffer.as_ref()[..self.header_len], 0) == 0
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> IpPacket<&'a T> {
    /// Everything after the IP header (up to the end of the buffer, not to
    /// the declared length), for as long as the buffer lives.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[self.header_len..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IpPacket<T> {
    /// Writes the length field for a packet of `total` bytes (the total
    /// length for IPv4, the payload length for IPv6).
    #[inline]
    pub fn set_total_len(&mut self, total: usize) {
        let (field, len) = if self.v4 {
            (V4_TOTAL_LEN, total)
        } else {
            (V6_PAYLOAD_LEN, total.saturating_sub(V6_HEADER))
        };
        put16(self.buffer.as_mut(), field, len as u16)
    }

    /// Sets the IPv4 identification; nothing for IPv6.
    #[inline]
    pub fn set_ident(&mut self, id: u16) {
        if self.v4 {
            put16(self.buffer.as_mut(), V4_IDENT, id)
        }
    }

    /// Recomputes the IPv4 header checksum; nothing for IPv6, which has none.
    #[inline]
    pub fn fill_checksum(&mut self) {
        if self.v4 {
            let len = self.header_len;
            let b = self.buffer.as_mut();
            put16(b, V4_CHECKSUM, 0);
            let c = checksum::checksum(&b[..len], 0);
            put16(b, V4_CHECKSUM, c)
        }
    }

    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.header_len;
        &mut self.buffer.as_mut()[len..]
    }
}

fn check_len(declared: usize, actual: usize) -> Result<(), IpError> {
    if declared > actual || declared < V4_MIN_HEADER {
        return Err(IpError::Length { declared, actual });
    }
    Ok(())
}

fn addr4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    a
}

fn addr16(b: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4], len: u16) -> Vec<u8> {
        let mut p = vec![0u8; len as usize];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn parses_v4_and_v6() {
        let h = IpHeader::new_checked(&v4([10, 0, 0, 1], [10, 0, 0, 2], 28)).unwrap();
        assert_eq!(h.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(h.total_len, 28);
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[5] = 8;
        p[23] = 1;
        p[39] = 2;
        let h = IpHeader::new_checked(&p).unwrap();
        assert_eq!(h.src, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "::2".parse::<IpAddr>().unwrap());
        assert_eq!(h.total_len, 48);
    }

    #[test]
    fn rejects_every_truncation_without_panicking() {
        let p = v4([1, 2, 3, 4], [5, 6, 7, 8], 60);
        for n in 0..p.len() {
            assert!(IpHeader::new_checked(&p[..n]).is_err(), "length {n}");
        }
        assert_eq!(IpHeader::new_checked(&[0x55]), Err(IpError::Version(5)));
        let mut lying = v4([1, 2, 3, 4], [5, 6, 7, 8], 40);
        lying[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert!(matches!(
            IpHeader::new_checked(&lying),
            Err(IpError::Length { .. })
        ));
    }

    #[test]
    fn packet_view_reads_v4_with_options_and_v6() {
        let mut p = v4([10, 0, 0, 1], [10, 0, 0, 2], 40);
        p[0] = 0x46; // 24-byte header
        p[1] = 0xb8;
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        let mut ip = IpPacket::new_checked(&mut p[..]).unwrap();
        assert!(ip.is_v4());
        assert_eq!(
            (ip.header_len(), ip.protocol(), ip.declared_len()),
            (24, 6, 40)
        );
        assert_eq!((ip.ident(), ip.hop_limit()), (Some(0x1234), 64));
        assert!(!ip.is_fragment());
        assert_eq!(ip.addrs(), &[10, 0, 0, 1, 10, 0, 0, 2]);
        assert_eq!(ip.payload_len(), 16);
        ip.set_total_len(30);
        ip.set_ident(7);
        ip.fill_checksum();
        assert!(ip.verify_checksum());
        assert_eq!((ip.declared_len(), ip.ident()), (30, Some(7)));
        ip.payload_mut()[0] = 1;
        assert_eq!(p[24], 1);
        p[7] = 1; // a fragment offset
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        assert!(ip.is_fragment());
        assert_eq!(ip.fragment_offset(), 1);
        assert_eq!(ip.payload(), &p[24..]);

        let mut p = [0u8; 44];
        p[..4].copy_from_slice(&[0x6a, 0xbc, 0xde, 0xf0]);
        p[6] = PROTO_UDP;
        p[7] = 9;
        p[23] = 1;
        p[39] = 2;
        let mut ip = IpPacket::new_checked(&mut p[..]).unwrap();
        assert!(!ip.is_v4() && !ip.is_fragment());
        assert_eq!(
            (ip.header_len(), ip.protocol(), ip.hop_limit()),
            (40, 17, 9)
        );
        assert_eq!(ip.ident(), None);
        assert_eq!(ip.addrs().len(), 32);
        ip.set_total_len(44);
        ip.set_ident(7); // no such field: nothing written
        ip.fill_checksum();
        assert_eq!(ip.declared_len(), 44);
        assert_eq!(&p[4..6], &[0, 4]);
        assert_eq!(&p[..4], &[0x6a, 0xbc, 0xde, 0xf0]);
    }

    /// Each field GRO compares, changed alone, makes another flow; the
    /// identification, length and checksum do not.
    #[test]
    fn same_flow_compares_what_gro_compares() {
        let mut base4 = v4([10, 0, 0, 1], [10, 0, 0, 2], 40);
        base4[6] = 0x40; // DF
        let mut base6 = vec![0u8; 48];
        base6[..4].copy_from_slice(&[0x6a, 0xbc, 0xde, 0xf0]);
        base6[7] = 64;
        base6[23] = 1;
        let same = |a: &[u8], b: &[u8]| {
            IpPacket::new_checked(a)
                .unwrap()
                .same_flow(&IpPacket::new_checked(b).unwrap())
        };
        for (base, flow_bytes, other_bytes) in [
            (&base4, &[1, 6, 8, 12, 19][..], &[2, 4, 5, 10][..]),
            (&base6, &[1, 3, 7, 8, 39][..], &[4, 5, 6][..]),
        ] {
            assert!(same(base, base));
            for &i in flow_bytes {
                let mut b = base.clone();
                b[i] ^= if i == 6 && base[0] >> 4 == 4 { 0x40 } else { 1 };
                assert!(!same(base, &b), "byte {i} of v{}", base[0] >> 4);
            }
            for &i in other_bytes {
                let mut b = base.clone();
                b[i] ^= 1;
                assert!(same(base, &b), "byte {i} of v{}", base[0] >> 4);
            }
        }
        assert!(!same(&base4, &base6));
    }

    #[test]
    fn packet_view_pseudo_header_sum_covers_addresses_protocol_and_length() {
        let p = v4([1, 2, 3, 4], [5, 6, 7, 8], 20);
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        let words = 0x0102 + 0x0304 + 0x0506 + 0x0708;
        assert_eq!(
            checksum::fold(ip.pseudo_header_sum(PROTO_UDP, 9)),
            words + 17 + 9
        );
    }

    #[test]
    fn packet_view_rejects_every_truncation_and_short_ihl() {
        let mut p = v4([1, 2, 3, 4], [5, 6, 7, 8], 60);
        p[0] = 0x4f; // 60-byte header
        for n in 0..60 {
            assert!(IpPacket::new_checked(&p[..n]).is_err(), "v4 length {n}");
        }
        assert!(IpPacket::new_checked(&p[..]).is_ok());
        for ihl in 0..5 {
            p[0] = 0x40 | ihl;
            assert_eq!(
                IpPacket::new_checked(&p[..]),
                Err(IpError::HeaderLength(ihl as usize * 4))
            );
        }
        let mut p = [0u8; 40];
        p[0] = 0x60;
        for n in 0..40 {
            assert!(IpPacket::new_checked(&p[..n]).is_err(), "v6 length {n}");
        }
        p[0] = 0x50;
        assert_eq!(IpPacket::new_checked(&p[..]), Err(IpError::Version(5)));
    }
}
