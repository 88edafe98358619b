//! Answers for host packets the filter refuses, so a denied flow fails at
//! once on the host instead of by its own timeout: a TCP RST for a refused
//! SYN, as the kernel's nftables `reject with tcp reset` does. Sans-IO:
//! the caller hands the refused packet and `now`, and delivers the answer
//! to the host (TUN or userspace stack). Only outbound packets get an
//! answer: a refused peer packet is dropped silently, so peers learn
//! nothing of the policy.

use std::time::{Duration, Instant};

use crate::wire::checksum;
use crate::wire::ip::PROTO_TCP;
use crate::wire::tcp::flags;
use crate::wire::{IpPacket, TcpPacket};

/// At most this many answers per second leave for the host (a token
/// bucket with as many tokens), however many refused packets it sends;
/// the rest are only counted. Linux rate-limits its ICMP errors the same
/// way (`net.ipv4.icmp_ratelimit`, 1000/s by default); the host is local,
/// so a smaller budget is plenty for connects to fail fast.
pub const REJECT_ANSWERS_PER_SEC: u32 = 100;

/// The longest answer: an IPv6 header and a bare TCP header.
pub const REJECT_ANSWER_MAX: usize = 40 + 20;

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
    if ip.protocol() != PROTO_TCP || ip.fragment_offset() != 0 {
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
    if ip.is_v4() {
        buf[0] = 0x45;
        buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        buf[6] = 0x40; // don't fragment
        buf[8] = 64;
        buf[9] = PROTO_TCP;
        buf[12..16].copy_from_slice(src);
        buf[16..20].copy_from_slice(dst);
        let c = checksum::checksum(&buf[..20], 0);
        buf[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        buf[0] = 0x60;
        buf[4..6].copy_from_slice(&20u16.to_be_bytes());
        buf[6] = PROTO_TCP;
        buf[7] = 64;
        buf[8..24].copy_from_slice(src);
        buf[24..40].copy_from_slice(dst);
    }
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
