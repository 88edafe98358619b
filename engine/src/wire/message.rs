//! WireGuard message framing: type and receiver index, enough to route a
//! datagram to the peer that can decrypt it. Cryptographic checks are
//! boringtun's.

use std::ops::Range;

pub const HANDSHAKE_INITIATION_LEN: usize = 148;
pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// Header (16) plus Poly1305 tag (16): an empty data message is a keepalive.
pub const DATA_OVERHEAD: usize = 32;

/// Data messages with a counter at or above this are refused: the paper's
/// Reject-After-Messages, 2^64 - 2^13 - 1 (WireGuard paper, section 6.4;
/// the kernel's `REJECT_AFTER_MESSAGES`). It also keeps `counter + window`
/// from overflowing in boringtun's replay check.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

const TYPE: Range<usize> = 0..4;
const DATA_COUNTER: Range<usize> = 8..16;
const RESPONSE_RECEIVER: Range<usize> = 8..12;
const COOKIE_OR_DATA_RECEIVER: Range<usize> = 4..8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    HandshakeInitiation,
    HandshakeResponse,
    CookieReply,
    Data,
}

/// A datagram whose framing is valid: known type with reserved bytes zero,
/// and the exact (or minimum, for data) length of that type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireMessage {
    pub kind: MessageKind,
    /// The receiver index for responses, cookie replies and data; `None`
    /// for initiations, which are matched to a peer by their static key.
    pub receiver_index: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("datagram of {0} bytes is not a WireGuard message")]
    Malformed(usize),
}

impl WireMessage {
    pub fn new_checked(datagram: &[u8]) -> Result<WireMessage, MessageError> {
        let bad = MessageError::Malformed(datagram.len());
        if datagram.len() < 4 {
            return Err(bad);
        }
        let ty = u32::from_le_bytes(le4(&datagram[TYPE]));
        let (kind, index) = match (ty, datagram.len()) {
            (1, HANDSHAKE_INITIATION_LEN) => (MessageKind::HandshakeInitiation, None),
            (2, HANDSHAKE_RESPONSE_LEN) => {
                (MessageKind::HandshakeResponse, Some(RESPONSE_RECEIVER))
            }
            (3, COOKIE_REPLY_LEN) => (MessageKind::CookieReply, Some(COOKIE_OR_DATA_RECEIVER)),
            (4, n) if n >= DATA_OVERHEAD => (MessageKind::Data, Some(COOKIE_OR_DATA_RECEIVER)),
            _ => return Err(bad),
        };
        Ok(WireMessage {
            kind,
            receiver_index: index.map(|r| u32::from_le_bytes(le4(&datagram[r]))),
        })
    }
}

/// The counter of a data message (`None` for anything shorter than one).
pub fn data_counter(datagram: &[u8]) -> Option<u64> {
    let b = datagram.get(DATA_COUNTER)?;
    Some(u64::from_le_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ]))
}

fn le4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_type_and_exact_length() {
        let mut init = vec![0u8; HANDSHAKE_INITIATION_LEN];
        init[0] = 1;
        assert_eq!(
            WireMessage::new_checked(&init).unwrap().kind,
            MessageKind::HandshakeInitiation
        );
        assert!(WireMessage::new_checked(&init[..147]).is_err());
        let mut data = vec![0u8; 48];
        data[0] = 4;
        data[4..8].copy_from_slice(&0x1234_5600u32.to_le_bytes());
        let m = WireMessage::new_checked(&data).unwrap();
        assert_eq!(
            (m.kind, m.receiver_index),
            (MessageKind::Data, Some(0x1234_5600))
        );
        data[1] = 1; // reserved bytes must be zero
        assert!(WireMessage::new_checked(&data).is_err());
    }

    #[test]
    fn every_short_length_is_an_error() {
        for len in 0..DATA_OVERHEAD {
            for ty in 0..6u8 {
                let mut d = vec![0u8; len];
                if len > 0 {
                    d[0] = ty;
                }
                let r = WireMessage::new_checked(&d);
                assert!(r.is_err(), "type {ty} len {len}");
            }
        }
    }
}
