//! `struct virtio_net_hdr` (`include/uapi/linux/virtio_net.h`): what a TUN
//! opened with `IFF_VNET_HDR` puts in front of every packet, in the host's
//! byte order (the TUN default, not the virtio 1.0 little-endian one).

use std::ops::Range;

use super::checksum;
use super::field::HeaderError;

/// Field offsets inside the header.
pub mod field {
    use std::ops::Range;

    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
}

/// Size of `struct virtio_net_hdr`.
pub const HEADER_LEN: usize = field::CSUM_OFFSET.end;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds only the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// The header's fields, decoded. Ten bytes: a value, not a view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// The length of the headers before the payload: only a hint, the
    /// kernel does not check it.
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Decodes the header at the start of `b` (what follows is the packet).
    pub fn new_checked(b: &[u8]) -> Result<VirtioNetHdr, HeaderError> {
        let b = b
            .get(..HEADER_LEN)
            .ok_or(HeaderError::Truncated("virtio-net"))?;
        let u = |r: Range<usize>| u16::from_ne_bytes([b[r.start], b[r.start + 1]]);
        Ok(VirtioNetHdr {
            flags: b[field::FLAGS],
            gso_type: b[field::GSO_TYPE],
            hdr_len: u(field::HDR_LEN),
            gso_size: u(field::GSO_SIZE),
            csum_start: u(field::CSUM_START),
            csum_offset: u(field::CSUM_OFFSET),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[field::FLAGS] = self.flags;
        out[field::GSO_TYPE] = self.gso_type;
        out[field::HDR_LEN].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[field::GSO_SIZE].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[field::CSUM_START].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[field::CSUM_OFFSET].copy_from_slice(&self.csum_offset.to_ne_bytes());
        out
    }

    /// Where the checksum to complete lies in the packet, when it does.
    fn checksum_field(&self, packet_len: usize) -> Option<Range<usize>> {
        let at = self.csum_start as usize + self.csum_offset as usize;
        (at + 2 <= packet_len).then_some(at..at + 2)
    }

    /// Completes a checksum the kernel left partial (`F_NEEDS_CSUM`): the
    /// field holds the pseudo-header sum; the checksum covers everything
    /// from `csum_start` to the end of `packet`.
    pub fn complete_checksum(&self, packet: &mut [u8]) -> Result<(), HeaderError> {
        let at = self
            .checksum_field(packet.len())
            .ok_or(HeaderError::BadLength("virtio-net checksum offset"))?;
        let initial = u16::from_be_bytes([packet[at.start], packet[at.start + 1]]) as u64;
        packet[at.clone()].fill(0);
        let c = checksum::checksum(&packet[self.csum_start as usize..], initial);
        packet[at].copy_from_slice(&c.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_short_input() {
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 60,
            gso_size: 1380,
            csum_start: 40,
            csum_offset: 16,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(&[0x60; 40]);
        assert_eq!(VirtioNetHdr::new_checked(&bytes), Ok(h));
        for n in 0..HEADER_LEN {
            assert_eq!(
                VirtioNetHdr::new_checked(&bytes[..n]),
                Err(HeaderError::Truncated("virtio-net"))
            );
        }
    }

    #[test]
    fn completes_a_partial_checksum_and_refuses_offsets_past_the_end() {
        // Four bytes of "header", then a checksum field holding a partial
        // sum of 0x1234 and two data bytes.
        let mut p = [9, 9, 9, 9, 0x12, 0x34, 0xab, 0xcd];
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 4,
            csum_offset: 0,
            ..Default::default()
        };
        h.complete_checksum(&mut p).unwrap();
        assert_eq!(checksum::checksum(&p[4..], 0x1234), 0);
        for (start, offset) in [(4, 3), (7, 0), (u16::MAX, u16::MAX), (0, 7)] {
            let h = VirtioNetHdr {
                csum_start: start,
                csum_offset: offset,
                ..h
            };
            let before = p;
            assert!(h.complete_checksum(&mut p).is_err(), "{start}+{offset}");
            assert_eq!(p, before, "nothing written on error");
        }
    }
}
