//! The TCP header (RFC 9293 section 3.1) as a checked view.

use super::checksum;
use super::field::{be16, be32, put16, put32, HeaderError};

/// Field offsets inside the TCP header.
pub mod field {
    use std::ops::Range;

    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const SEQ_NUM: Range<usize> = 4..8;
    pub const ACK_NUM: Range<usize> = 8..12;
    /// Data offset in the high nibble, in 32-bit words.
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WIN_SIZE: Range<usize> = 14..16;
    pub const CHECKSUM: Range<usize> = 16..18;
    pub const URGENT: Range<usize> = 18..20;
}

/// The header without options.
pub const HEADER_LEN: usize = field::URGENT.end;

/// Bits of the flags byte.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// A TCP segment whose header (options included) lies inside the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Checks that the fixed header fits, that the data offset is at least
    /// the fixed header and that the options it declares fit too.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<TcpPacket<T>, HeaderError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Truncated("TCP"));
        }
        let header_len = (b[field::DATA_OFF] >> 4) as usize * 4;
        if header_len < HEADER_LEN {
            return Err(HeaderError::BadLength("TCP"));
        }
        if b.len() < header_len {
            return Err(HeaderError::Truncated("TCP"));
        }
        Ok(TcpPacket { buffer })
    }

    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    #[inline]
    pub fn seq_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ_NUM)
    }

    #[inline]
    pub fn ack_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::ACK_NUM)
    }

    /// The header length, options included.
    #[inline]
    pub fn header_len(&self) -> usize {
        (self.buffer.as_ref()[field::DATA_OFF] >> 4) as usize * 4
    }

    /// The flags byte (see [`flags`]).
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    #[inline]
    pub fn window_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WIN_SIZE)
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// True when the checksum is right for this segment, given the sum of
    /// its IP pseudo-header ([`super::IpPacket::pseudo_header_sum`]).
    #[inline]
    pub fn verify_checksum(&self, pseudo: u64) -> bool {
        checksum::checksum(self.buffer.as_ref(), pseudo) == 0
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> TcpPacket<&'a T> {
    /// The options, timestamps included (empty without).
    #[inline]
    pub fn options(&self) -> &'a [u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    #[inline]
    pub fn set_seq_number(&mut self, seq: u32) {
        put32(self.buffer.as_mut(), field::SEQ_NUM, seq)
    }

    #[inline]
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags
    }

    #[inline]
    pub fn set_window_len(&mut self, window: u16) {
        put16(self.buffer.as_mut(), field::WIN_SIZE, window)
    }

    #[inline]
    pub fn set_checksum(&mut self, checksum: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, checksum)
    }

    /// Computes the checksum over the whole segment with `pseudo`, the sum
    /// of its IP pseudo-header, and writes it.
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: u64) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buffer.as_ref(), pseudo);
        self.set_checksum(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(data_off_words: u8, len: usize) -> Vec<u8> {
        let mut s = vec![0u8; len];
        s[field::DATA_OFF] = data_off_words << 4;
        s
    }

    #[test]
    fn reads_and_writes_every_field() {
        let mut s = segment(6, 24 + 3);
        s[..20].copy_from_slice(&[
            0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 7, 0x60, 0x18, 2, 0, 0xab, 0xcd, 0, 0,
        ]);
        s[20..24].copy_from_slice(&[1, 1, 8, 10]);
        let mut t = TcpPacket::new_checked(&mut s[..]).unwrap();
        assert_eq!((t.src_port(), t.dst_port()), (40000, 5201));
        assert_eq!((t.seq_number(), t.ack_number()), (1, 7));
        assert_eq!((t.header_len(), t.flags()), (24, flags::ACK | flags::PSH));
        assert_eq!((t.window_len(), t.checksum()), (512, 0xabcd));
        t.set_seq_number(u32::MAX);
        t.set_flags(flags::FIN);
        t.set_window_len(9);
        t.fill_checksum(77);
        assert_eq!(t.seq_number(), u32::MAX);
        assert_eq!((t.flags(), t.window_len()), (flags::FIN, 9));
        assert!(t.verify_checksum(77));
        assert!(!t.verify_checksum(78));
        let t = TcpPacket::new_checked(&s[..]).unwrap();
        assert_eq!((t.options(), t.payload().len()), (&[1, 1, 8, 10][..], 3));
    }

    #[test]
    fn truncation_and_bad_offsets_are_errors_never_panics() {
        let s = segment(8, 32);
        for n in 0..32 {
            assert!(TcpPacket::new_checked(&s[..n]).is_err(), "length {n}");
        }
        assert!(TcpPacket::new_checked(&s[..]).is_ok());
        for words in 0..5 {
            assert_eq!(
                TcpPacket::new_checked(&segment(words, 60)[..]),
                Err(HeaderError::BadLength("TCP"))
            );
        }
        // The largest data offset (60 bytes) one byte short.
        assert_eq!(
            TcpPacket::new_checked(&segment(15, 59)[..]),
            Err(HeaderError::Truncated("TCP"))
        );
    }
}
