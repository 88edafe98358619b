//! Answers for host packets the filter refuses, so a denied flow fails at
//! once on the host instead of by its own timeout, as the kernel's
//! nftables `reject` does: a TCP RST for a refused SYN (`reject with tcp
//! reset`), and for UDP, ICMP echo requests and other protocols an ICMP
//! destination unreachable, administratively prohibited (`reject with
//! icmp type admin-prohibited`: IPv4 type 3 code 13, RFC 1812 5.2.7.1;
//! IPv6 type 1 code 1, RFC 4443 3.1). Sans-IO: the caller hands the
//! refused packet and `now`, and delivers the answer to the host (TUN or
//! userspace stack). Only outbound packets get an answer: a refused peer
//! packet is dropped silently, so peers learn nothing of the policy.
//!
//! No answer (RFC 1812 4.3.2.7, RFC 4443 2.4 (e), and Linux's
//! `icmp_send` / `nf_send_reset`): to an ICMP error or any ICMP message
//! other than an echo request, to a fragment that is not the first, to a
//! packet for a broadcast or multicast address, or from an address that is
//! not one host's (unspecified, multicast, broadcast, loopback, IPv4
//! class E); to a TCP segment that is not a bare SYN. Every answer comes
//! from the refused packet's destination, as if that host refused it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::wire::checksum;
use crate::wire::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP};
use crate::wire::tcp::flags;
use crate::wire::{IcmpPacket, IpPacket, TcpPacket};

/// At most this many answers per second leave for the host (a token
/// bucket with as many tokens), however many refused packets it sends;
/// RSTs and ICMP errors share the one bucket, the rest are only counted. Linux rate-limits its ICMP errors the same
/// way (`net.ipv4.icmp_ratelimit`, 1000/s by default); the host is local,
/// so a smaller budget is plenty for connects to fail fast.
pub const REJECT_ANSWERS_PER_SEC: u32 = 100;

/// The longest answer: an IPv6 ICMP error, which carries as much of the
/// refused packet as fits in the IPv6 minimum MTU (RFC 4443 2.4 (c)).
pub const REJECT_ANSWER_MAX: usize = ICMP6_ANSWER_MAX;

/// An IPv4 ICMP error is at most 576 bytes, the datagram every host must
/// accept (RFC 1812 4.3.2.3).
const ICMP4_ANSWER_MAX: usize = 576;
/// An ICMPv6 error is at most the IPv6 minimum MTU (RFC 4443 2.4 (c)).
const ICMP6_ANSWER_MAX: usize = 1280;
/// IPv4 destination unreachable, "communication administratively
/// prohibited" (RFC 1812 5.2.7.1).
const ICMP4_UNREACHABLE: u8 = 3;
const ICMP4_ADMIN_PROHIBITED: u8 = 13;
/// ICMPv6 destination unreachable, "communication with destination
/// administratively prohibited" (RFC 4443 3.1).
const ICMP6_UNREACHABLE: u8 = 1;
const ICMP6_ADMIN_PROHIBITED: u8 = 1;
/// IPv6 fragment header (RFC 8200 4.5).
const V6_FRAGMENT_HEADER: u8 = 44;
/// ICMP type, code, checksum and the four unused bytes before the
/// offending packet.
const ICMP_ERROR_HEADER: usize = 8;

/// The answer to a host packet the filter refused, written into `out`:
/// a RST for a TCP SYN ([`tcp_reset`]), no answer for other TCP segments,
/// an ICMP admin-prohibited error for the rest ([`icmp_prohibited`]).
/// Returns its length, or `None` when the packet gets no answer.
pub fn answer(packet: &[u8], out: &mut [u8; REJECT_ANSWER_MAX]) -> Option<usize> {
    let ip = IpPacket::new_checked(packet).ok()?;
    if ip.protocol() == PROTO_TCP {
        tcp_reset(packet, out)
    } else {
        icmp_prohibited(packet, out)
    }
}

/// Whether `ip`'s addresses are one host's each, so an answer may go back
/// (RFC 1812 4.3.2.7, RFC 4443 2.4 (e)): the destination neither
/// broadcast nor multicast, the source neither unspecified, multicast,
/// broadcast, loopback nor (IPv4) class E. A subnet's directed broadcast
/// is not known here; mesh addresses are host routes.
fn unicast_pair<T: AsRef<[u8]>>(ip: &IpPacket<T>) -> bool {
    let a = ip.addrs();
    if ip.is_v4() {
        let src = Ipv4Addr::from(<[u8; 4]>::try_from(&a[..4]).expect("8 address bytes"));
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&a[4..]).expect("8 address bytes"));
        // 240.0.0.0/4 holds the limited broadcast and class E.
        let group = |x: Ipv4Addr| x.is_multicast() || x.octets()[0] >= 240;
        !(group(dst) || group(src) || src.is_unspecified() || src.is_loopback())
    } else {
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&a[..16]).expect("32 address bytes"));
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&a[16..]).expect("32 address bytes"));
        !(dst.is_multicast() || src.is_multicast() || src.is_unspecified() || src.is_loopback())
    }
}

/// The ICMP destination unreachable, administratively prohibited, that
/// answers a refused non-TCP `packet` (IPv4 type 3 code 13, IPv6 type 1
/// code 1): as much of `packet` as fits in 576 bytes (IPv4) or 1280
/// (IPv6) after the headers, written into `out` from `packet`'s
/// destination back to its source. `None` for a packet that gets no
/// answer (see the module doc).
pub fn icmp_prohibited(packet: &[u8], out: &mut [u8; REJECT_ANSWER_MAX]) -> Option<usize> {
    let len = crate::wire::IpHeader::new_checked(packet).ok()?.total_len;
    let packet = &packet[..len];
    let ip = IpPacket::new_checked(packet).ok()?;
    if ip.fragment_offset() != 0 || !unicast_pair(&ip) {
        return None;
    }
    let v4 = ip.is_v4();
    let icmp = if v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    // Only an echo request among ICMP messages: never an error (no error
    // about an error), nor neighbour discovery or the like.
    if ip.protocol() == icmp
        && !IcmpPacket::new_checked(ip.payload(), v4)
            .ok()?
            .is_echo_request()
    {
        return None;
    }
    // A fragment header right after the IPv6 header: only the first
    // fragment (offset 0) is answered.
    if !v4 && ip.protocol() == V6_FRAGMENT_HEADER {
        let frag = ip.payload().get(2..4)?;
        if u16::from_be_bytes([frag[0], frag[1]]) >> 3 != 0 {
            return None;
        }
    }
    let (ip_len, max) = if v4 {
        (20, ICMP4_ANSWER_MAX)
    } else {
        (40, ICMP6_ANSWER_MAX)
    };
    let quoted = packet.len().min(max - ip_len - ICMP_ERROR_HEADER);
    let icmp_len = ICMP_ERROR_HEADER + quoted;
    let total = ip_len + icmp_len;
    let a = ip.addrs();
    let half = a.len() / 2;
    let (src, dst) = (&a[half..], &a[..half]);
    let buf = &mut out[..total];
    buf[..ip_len + ICMP_ERROR_HEADER].fill(0);
    // Internetwork control precedence, as Linux's ICMP errors.
    write_ip_header(buf, src, dst, icmp, icmp_len, 0xc0, false);
    let (ty, code) = if v4 {
        (ICMP4_UNREACHABLE, ICMP4_ADMIN_PROHIBITED)
    } else {
        (ICMP6_UNREACHABLE, ICMP6_ADMIN_PROHIBITED)
    };
    buf[ip_len] = ty;
    buf[ip_len + 1] = code;
    buf[ip_len + ICMP_ERROR_HEADER..].copy_from_slice(&packet[..quoted]);
    // ICMPv4 sums the message alone; ICMPv6 adds the pseudo-header
    // (RFC 4443 2.3).
    let initial = if v4 {
        0
    } else {
        IpPacket::new_checked(&buf[..])
            .ok()?
            .pseudo_header_sum(icmp, icmp_len)
    };
    let c = checksum::checksum(&buf[ip_len..], initial);
    buf[ip_len + 2..ip_len + 4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// A token bucket of [`REJECT_ANSWERS_PER_SEC`]: fixed size, whatever
/// the flood.
#[derive(Debug)]
pub struct RejectLimiter {
    tokens: u32,
    refilled: Option<Instant>,
    /// Answers made.
    pub sent: u64,
    /// Refused packets left without an answer by the rate limit.
    pub limited: u64,
}

impl Default for RejectLimiter {
    fn default() -> Self {
        RejectLimiter {
            tokens: REJECT_ANSWERS_PER_SEC,
            refilled: None,
            sent: 0,
            limited: 0,
        }
    }
}

impl RejectLimiter {
    /// Whether one more answer may leave at `now` (takes a token).
    pub fn allow(&mut self, now: Instant) -> bool {
        let last = *self.refilled.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last);
        let per = Duration::from_secs(1) / REJECT_ANSWERS_PER_SEC;
        let fresh = (elapsed.as_nanos() / per.as_nanos()).min(u128::from(REJECT_ANSWERS_PER_SEC));
        if fresh > 0 {
            self.tokens = (self.tokens + fresh as u32).min(REJECT_ANSWERS_PER_SEC);
            self.refilled = Some(last + per * fresh as u32);
            if self.tokens == REJECT_ANSWERS_PER_SEC {
                self.refilled = Some(now);
            }
        }
        if self.tokens == 0 {
            self.limited += 1;
            return false;
        }
        self.tokens -= 1;
        self.sent += 1;
        true
    }
}

/// The TCP RST that answers `packet` when it is a SYN without ACK (RFC 9293
/// 3.10.7.1: `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`), written into
/// `out` from the destination back to the source. Returns its length, or
/// `None` for any other packet.
pub fn tcp_reset(packet: &[u8], out: &mut [u8; REJECT_ANSWER_MAX]) -> Option<usize> {
    let len = crate::wire::IpHeader::new_checked(packet).ok()?.total_len;
    let ip = IpPacket::new_checked(&packet[..len]).ok()?;
    if ip.protocol() != PROTO_TCP || ip.fragment_offset() != 0 || !unicast_pair(&ip) {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    if tcp.flags() & (flags::SYN | flags::ACK | flags::RST) != flags::SYN {
        return None;
    }
    let seg_len = 1 + tcp.payload().len() as u32 + u32::from(tcp.flags() & flags::FIN != 0);
    let ack = tcp.seq_number().wrapping_add(seg_len);
    let a = ip.addrs();
    let (ip_len, half) = if ip.is_v4() { (20, 4) } else { (40, 16) };
    let (src, dst) = (&a[half..2 * half], &a[..half]);
    let total = ip_len + 20;
    let buf = &mut out[..total];
    buf.fill(0);
    write_ip_header(buf, src, dst, PROTO_TCP, 20, 0, true);
    let t = &mut buf[ip_len..];
    t[0..2].copy_from_slice(&tcp.dst_port().to_be_bytes());
    t[2..4].copy_from_slice(&tcp.src_port().to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags::RST | flags::ACK;
    let pseudo = {
        let ip = IpPacket::new_checked(&buf[..]).ok()?;
        ip.pseudo_header_sum(PROTO_TCP, 20)
    };
    TcpPacket::new_checked(&mut buf[ip_len..])
        .ok()?
        .fill_checksum(pseudo);
    Some(total)
}

/// The IP header of an answer from `src` to `dst` (4 bytes each for IPv4,
/// 16 for IPv6) carrying `payload_len` bytes of `proto`, written into the
/// start of `buf`, which the caller zeroed. `tos` and `dont_fragment`
/// apply to IPv4 only; the hop limit is 64 either way.
fn write_ip_header(
    buf: &mut [u8],
    src: &[u8],
    dst: &[u8],
    proto: u8,
    payload_len: usize,
    tos: u8,
    dont_fragment: bool,
) {
    if src.len() == 4 {
        buf[0] = 0x45;
        buf[1] = tos;
        buf[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        if dont_fragment {
            buf[6] = 0x40;
        }
        buf[8] = 64;
        buf[9] = proto;
        buf[12..16].copy_from_slice(src);
        buf[16..20].copy_from_slice(dst);
        let c = checksum::checksum(&buf[..20], 0);
        buf[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        buf[0] = 0x60;
        buf[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
        buf[6] = proto;
        buf[7] = 64;
        buf[8..24].copy_from_slice(src);
        buf[24..40].copy_from_slice(dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_syn_gets_a_checksummed_rst_back() {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&20u16.to_be_bytes());
        p[6] = PROTO_TCP;
        p[8..10].copy_from_slice(&[0xfd, 0x7a]);
        p[23] = 1;
        p[24..26].copy_from_slice(&[0xfd, 0x7a]);
        p[39] = 2;
        p[40..42].copy_from_slice(&5000u16.to_be_bytes());
        p[42..44].copy_from_slice(&443u16.to_be_bytes());
        p[44..48].copy_from_slice(&u32::MAX.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags::SYN;
        let mut out = [0u8; REJECT_ANSWER_MAX];
        let len = tcp_reset(&p, &mut out).expect("a RST");
        assert_eq!(len, 60);
        let ip = IpPacket::new_checked(&out[..len]).unwrap();
        assert!(!ip.is_v4());
        assert_eq!(&ip.addrs()[..16], &p[24..40]);
        assert_eq!(&ip.addrs()[16..], &p[8..24]);
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.verify_checksum(ip.pseudo_header_sum(PROTO_TCP, 20)));
        assert_eq!((t.src_port(), t.dst_port()), (443, 5000));
        assert_eq!(t.flags(), flags::RST | flags::ACK);
        assert_eq!(t.ack_number(), 0, "SEQ+1 wraps");
        // A RST or a SYN-ACK is never answered (no RST storms).
        p[53] = flags::SYN | flags::ACK;
        assert_eq!(tcp_reset(&p, &mut out), None);
        p[53] = flags::RST;
        assert_eq!(tcp_reset(&p, &mut out), None);
    }
}
