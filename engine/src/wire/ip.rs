//! The few fields of an inner IPv4/IPv6 header that routing needs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

const V4_MIN_HEADER: usize = 20;
const V4_TOTAL_LEN: Range<usize> = 2..4;
const V4_SRC: Range<usize> = 12..16;
const V4_DST: Range<usize> = 16..20;
const V6_HEADER: usize = 40;
const V6_PAYLOAD_LEN: Range<usize> = 4..6;
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
    pub fn new_checked(packet: &[u8]) -> Result<IpHeader, IpError> {
        let first = *packet.first().ok_or(IpError::Empty)?;
        match first >> 4 {
            4 => {
                if packet.len() < V4_MIN_HEADER {
                    return Err(IpError::Truncated);
                }
                let total_len = be16(&packet[V4_TOTAL_LEN]);
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
                let total_len = V6_HEADER + be16(&packet[V6_PAYLOAD_LEN]);
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

fn check_len(declared: usize, actual: usize) -> Result<(), IpError> {
    if declared > actual || declared < V4_MIN_HEADER {
        return Err(IpError::Length { declared, actual });
    }
    Ok(())
}

fn be16(b: &[u8]) -> usize {
    u16::from_be_bytes([b[0], b[1]]) as usize
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
}
