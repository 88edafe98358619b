//! The first four bytes of an ICMP or ICMPv6 message (RFC 792, RFC 4443)
//! and the echo identifier, as a checked view.

use super::field::{be16, HeaderError};

/// Type, code and checksum.
pub const HEADER_LEN: usize = 4;
/// An echo request or reply: the header, identifier and sequence number.
pub const ECHO_LEN: usize = 8;
const ECHO_IDENT: std::ops::Range<usize> = 4..6;

/// Message types the packet filter tells apart.
pub mod types {
    pub const V4_ECHO_REPLY: u8 = 0;
    pub const V4_DEST_UNREACHABLE: u8 = 3;
    pub const V4_ECHO_REQUEST: u8 = 8;
    pub const V4_TIME_EXCEEDED: u8 = 11;
    pub const V4_PARAMETER_PROBLEM: u8 = 12;
    pub const V6_DEST_UNREACHABLE: u8 = 1;
    pub const V6_PACKET_TOO_BIG: u8 = 2;
    pub const V6_TIME_EXCEEDED: u8 = 3;
    pub const V6_PARAMETER_PROBLEM: u8 = 4;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_ECHO_REPLY: u8 = 129;
}

/// An ICMP message whose type and code lie inside the buffer; an echo
/// message also has its identifier inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
    v4: bool,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// `v4`: ICMP (over IPv4) rather than ICMPv6; the type numbers differ.
    /// An echo request or reply shorter than [`ECHO_LEN`] is refused.
    #[inline]
    pub fn new_checked(buffer: T, v4: bool) -> Result<IcmpPacket<T>, HeaderError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Truncated("ICMP"));
        }
        let p = IcmpPacket { buffer, v4 };
        if p.is_echo() && p.buffer.as_ref().len() < ECHO_LEN {
            return Err(HeaderError::Truncated("ICMP"));
        }
        Ok(p)
    }

    #[inline]
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    #[inline]
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    #[inline]
    pub fn is_echo_request(&self) -> bool {
        let t = self.msg_type();
        if self.v4 {
            t == types::V4_ECHO_REQUEST
        } else {
            t == types::V6_ECHO_REQUEST
        }
    }

    #[inline]
    pub fn is_echo_reply(&self) -> bool {
        let t = self.msg_type();
        if self.v4 {
            t == types::V4_ECHO_REPLY
        } else {
            t == types::V6_ECHO_REPLY
        }
    }

    #[inline]
    pub fn is_echo(&self) -> bool {
        self.is_echo_request() || self.is_echo_reply()
    }

    /// Destination unreachable, time exceeded, parameter problem and (v6)
    /// packet too big: the errors about another packet.
    #[inline]
    pub fn is_error(&self) -> bool {
        let t = self.msg_type();
        if self.v4 {
            matches!(
                t,
                types::V4_DEST_UNREACHABLE | types::V4_TIME_EXCEEDED | types::V4_PARAMETER_PROBLEM
            )
        } else {
            matches!(
                t,
                types::V6_DEST_UNREACHABLE
                    | types::V6_PACKET_TOO_BIG
                    | types::V6_TIME_EXCEEDED
                    | types::V6_PARAMETER_PROBLEM
            )
        }
    }

    /// The echo identifier (0 for other messages).
    #[inline]
    pub fn echo_ident(&self) -> u16 {
        if self.is_echo() {
            be16(self.buffer.as_ref(), ECHO_IDENT)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_echo_and_errors_and_refuses_truncation() {
        let echo = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        let p = IcmpPacket::new_checked(&echo[..], true).unwrap();
        assert!(p.is_echo_request() && !p.is_echo_reply() && !p.is_error());
        assert_eq!(p.echo_ident(), 0x1234);
        for n in 0..ECHO_LEN {
            assert!(IcmpPacket::new_checked(&echo[..n], true).is_err(), "{n}");
        }
        // Type 8 is not an echo in ICMPv6: four bytes are enough.
        assert!(IcmpPacket::new_checked(&echo[..4], false).is_ok());
        let v6 = [129u8, 0, 0, 0, 0, 7, 0, 0];
        let p = IcmpPacket::new_checked(&v6[..], false).unwrap();
        assert!(p.is_echo_reply() && p.echo_ident() == 7);
        let too_big = [2u8, 0, 0, 0];
        let p = IcmpPacket::new_checked(&too_big[..], false).unwrap();
        assert!(p.is_error() && p.echo_ident() == 0 && p.code() == 0);
        assert!(!IcmpPacket::new_checked(&too_big[..], true)
            .unwrap()
            .is_error());
    }
}
