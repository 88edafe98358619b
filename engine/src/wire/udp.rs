//! The UDP header (RFC 768) as a checked view.

use super::checksum;
use super::field::{be16, put16, HeaderError};

/// Field offsets inside the UDP header.
pub mod field {
    use std::ops::Range;

    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: Range<usize> = 6..8;
}

pub const HEADER_LEN: usize = field::CHECKSUM.end;

/// A UDP datagram whose header lies inside the buffer. The length field is
/// not trusted: accessors never index by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    #[inline]
    pub fn new_checked(buffer: T) -> Result<UdpPacket<T>, HeaderError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(HeaderError::Truncated("UDP"));
        }
        Ok(UdpPacket { buffer })
    }

    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// The length field (header and payload), as the sender wrote it.
    #[inline]
    pub fn length(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// True when the checksum is right, given the pseudo-header sum (zero,
    /// "no checksum", is right only over IPv4; the caller decides).
    #[inline]
    pub fn verify_checksum(&self, pseudo: u64) -> bool {
        checksum::checksum(self.buffer.as_ref(), pseudo) == 0
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> UdpPacket<&'a T> {
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    #[inline]
    pub fn set_length(&mut self, len: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, len)
    }

    #[inline]
    pub fn set_checksum(&mut self, checksum: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, checksum)
    }

    /// Computes and writes the checksum over the whole datagram with
    /// `pseudo`, the sum of its IP pseudo-header. A computed zero is sent
    /// as 0xffff: zero on the wire means "no checksum" (RFC 768).
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let c = match checksum::checksum(self.buffer.as_ref(), pseudo) {
            0 => 0xffff,
            c => c,
        };
        self.set_checksum(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_checksum_and_truncation() {
        let mut d = vec![0x9c, 0x40, 0x14, 0x51, 0, 11, 0, 0, 1, 2, 3];
        for n in 0..HEADER_LEN {
            assert_eq!(
                UdpPacket::new_checked(&d[..n]),
                Err(HeaderError::Truncated("UDP"))
            );
        }
        let u = UdpPacket::new_checked(&d[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.length()), (40000, 5201, 11));
        assert_eq!(u.payload(), &[1, 2, 3]);
        let mut u = UdpPacket::new_checked(&mut d[..]).unwrap();
        u.set_length(10);
        u.fill_checksum(5);
        assert_eq!(u.length(), 10);
        assert!(u.verify_checksum(5));
        // A lying length field changes nothing about what can be read.
        u.set_length(u16::MAX);
        assert_eq!(UdpPacket::new_checked(&d[..]).unwrap().payload().len(), 3);
    }

    #[test]
    fn a_zero_checksum_is_sent_as_all_ones() {
        // A datagram whose checksum computes to zero: all-ones everywhere
        // but the checksum field sums to 0xffff.
        let mut d = [0xff, 0xff, 0, 0, 0, 0, 0, 0];
        let mut u = UdpPacket::new_checked(&mut d[..]).unwrap();
        u.fill_checksum(0);
        assert_eq!(u.checksum(), 0xffff);
    }
}
