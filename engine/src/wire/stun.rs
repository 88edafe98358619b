//! STUN (RFC 8489) Binding messages: the checked view of a datagram, the
//! encoders for a Binding request and its success and error responses, and
//! [`is_stun`], the demultiplexing test that lets STUN share the WireGuard
//! UDP socket.
//!
//! It lives in `wire` with WireGuard's framing because it is the same kind
//! of code: stateless, allocation-free parsing of untrusted bytes, and the
//! receive path will ask `is_stun` before `WireMessage::new_checked`. The
//! client state (transactions, retransmission) is in `crate::nat`, the
//! server's socket loop in `crate::wg::stun`.
//!
//! Parsing never panics: every length is checked before it is used, and a
//! message is only handed out after its attribute list was walked once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

pub const HEADER_LEN: usize = 20;
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// The XOR of a FINGERPRINT's CRC-32 (RFC 8489 section 14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Sixteen bits of message length in the header, so this is the most any
/// STUN message can hold after its header.
pub const MAX_BODY_LEN: usize = u16::MAX as usize & !3;

pub const METHOD_BINDING: u16 = 0x001;

pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
pub const ATTR_USERNAME: u16 = 0x0006;
pub const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ATTR_ERROR_CODE: u16 = 0x0009;
pub const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const ATTR_REALM: u16 = 0x0014;
pub const ATTR_NONCE: u16 = 0x0015;
pub const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const ATTR_PASSWORD_ALGORITHM: u16 = 0x001D;
pub const ATTR_USERHASH: u16 = 0x001E;
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const ATTR_SOFTWARE: u16 = 0x8022;
pub const ATTR_FINGERPRINT: u16 = 0x8028;

/// Comprehension-required attributes (type below 0x8000) of RFC 8489
/// section 18.3.1 that this codec knows. Knowing one does not mean acting
/// on it: authentication attributes are never checked here, since our
/// Binding exchanges use no credentials (as Tailscale's and coturn's
/// unauthenticated Binding), so a response carrying them is read for its
/// address only.
const KNOWN_REQUIRED: [u16; 11] = [
    ATTR_MAPPED_ADDRESS,
    ATTR_USERNAME,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_ERROR_CODE,
    ATTR_UNKNOWN_ATTRIBUTES,
    ATTR_REALM,
    ATTR_NONCE,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_PASSWORD_ALGORITHM,
    ATTR_USERHASH,
    ATTR_XOR_MAPPED_ADDRESS,
];

const TYPE: Range<usize> = 0..2;
const LENGTH: Range<usize> = 2..4;
const COOKIE: Range<usize> = 4..8;
const TRANSACTION: Range<usize> = 8..20;

pub type TransactionId = [u8; 12];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

/// The 16-bit message type: two class bits interleaved with the 12 method
/// bits (RFC 8489 section 5, figure 3).
fn message_type(class: Class, method: u16) -> u16 {
    let m = method & 0x0fff;
    ((m & 0x0f80) << 2) | ((m & 0x0070) << 1) | (m & 0x000f) | class.bits()
}

fn split_type(t: u16) -> (Class, u16) {
    let class = match t & 0x0110 {
        0x000 => Class::Request,
        0x010 => Class::Indication,
        0x100 => Class::Success,
        _ => Class::Error,
    };
    let method = ((t & 0x3e00) >> 2) | ((t & 0x00e0) >> 1) | (t & 0x000f);
    (class, method)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("STUN attribute list overruns the message")]
    Truncated,
    #[error("STUN FINGERPRINT does not match")]
    BadFingerprint,
    #[error("STUN FINGERPRINT is not the last attribute")]
    FingerprintNotLast,
    #[error("unknown comprehension-required STUN attribute {0:#06x}")]
    UnknownRequired(u16),
    #[error("malformed STUN attribute {0:#06x}")]
    BadAttribute(u16),
    #[error("output buffer too small for the STUN message")]
    BufferTooSmall,
}

/// Whether a datagram is a STUN message and not a WireGuard one: at least a
/// header, the two top bits zero, the magic cookie at bytes 4..8, and a
/// length field that is a multiple of 4 and equals the bytes after the
/// header.
///
/// No WireGuard message ever matches. Its first four bytes are the type
/// 1..4 as a little-endian u32, so bytes 2..4 (STUN's length field) are
/// zero: a STUN message with that header is exactly 20 bytes long, and
/// the shortest WireGuard message (a keepalive) is 32. The cookie alone
/// would not do: bytes 4..8 of an initiation are its random sender index.
pub fn is_stun(datagram: &[u8]) -> bool {
    let Some(header) = datagram.get(..HEADER_LEN) else {
        return false;
    };
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    header[0] & 0xc0 == 0
        && header[COOKIE] == MAGIC_COOKIE.to_be_bytes()
        && len % 4 == 0
        && datagram.len() == HEADER_LEN + len
}

/// A checked STUN message: header valid, attributes walked, FINGERPRINT
/// (when present) last and correct, no unknown comprehension-required
/// attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunMessage<'a> {
    pub class: Class,
    pub method: u16,
    pub transaction_id: TransactionId,
    /// Whether the message carried a FINGERPRINT (checked, and correct).
    pub has_fingerprint: bool,
    attrs: &'a [u8],
}

impl<'a> StunMessage<'a> {
    pub fn new_checked(datagram: &'a [u8]) -> Result<StunMessage<'a>, StunError> {
        if !is_stun(datagram) {
            return Err(StunError::NotStun);
        }
        let (class, method) = split_type(u16::from_be_bytes([datagram[0], datagram[1]]));
        let mut transaction_id = [0u8; 12];
        transaction_id.copy_from_slice(&datagram[TRANSACTION]);
        let attrs = &datagram[HEADER_LEN..];
        let mut has_fingerprint = false;
        let mut offset = 0;
        for item in Attributes::new(attrs) {
            let (ty, value) = item?;
            let start = offset;
            offset += 4 + padded(value.len());
            if has_fingerprint {
                return Err(StunError::FingerprintNotLast);
            }
            match ty {
                ATTR_FINGERPRINT => {
                    let v: [u8; 4] = value.try_into().map_err(|_| StunError::BadAttribute(ty))?;
                    // The CRC covers the message up to the attribute, with
                    // the header's length already counting it.
                    let want = crc32(&datagram[..HEADER_LEN + start]) ^ FINGERPRINT_XOR;
                    if u32::from_be_bytes(v) != want {
                        return Err(StunError::BadFingerprint);
                    }
                    has_fingerprint = true;
                }
                t if t < 0x8000 && !KNOWN_REQUIRED.contains(&t) => {
                    return Err(StunError::UnknownRequired(t));
                }
                _ => {}
            }
        }
        Ok(StunMessage {
            class,
            method,
            transaction_id,
            has_fingerprint,
            attrs,
        })
    }

    pub fn attributes(&self) -> Attributes<'a> {
        Attributes::new(self.attrs)
    }

    fn find(&self, ty: u16) -> Option<&'a [u8]> {
        self.attributes()
            .filter_map(Result::ok)
            .find(|(t, _)| *t == ty)
            .map(|(_, v)| v)
    }

    /// The reflexive address: XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from a
    /// server that only knows RFC 3489 (`None` if neither is present).
    pub fn mapped_address(&self) -> Result<Option<SocketAddr>, StunError> {
        if let Some(v) = self.find(ATTR_XOR_MAPPED_ADDRESS) {
            return decode_address(v, Some(&self.transaction_id))
                .map(Some)
                .ok_or(StunError::BadAttribute(ATTR_XOR_MAPPED_ADDRESS));
        }
        match self.find(ATTR_MAPPED_ADDRESS) {
            Some(v) => decode_address(v, None)
                .map(Some)
                .ok_or(StunError::BadAttribute(ATTR_MAPPED_ADDRESS)),
            None => Ok(None),
        }
    }

    pub fn software(&self) -> Option<&'a str> {
        self.find(ATTR_SOFTWARE)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// ERROR-CODE: the number (300..699) and its reason phrase.
    pub fn error_code(&self) -> Option<(u16, &'a str)> {
        let v = self.find(ATTR_ERROR_CODE)?;
        if v.len() < 4 {
            return None;
        }
        let code = u16::from(v[2] & 0x07) * 100 + u16::from(v[3]);
        Some((code, std::str::from_utf8(&v[4..]).unwrap_or("")))
    }
}

/// The attributes of a message body, in order: `(type, value)` without
/// padding; an `Err` (and then nothing) if one overruns the body.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Attributes<'a> {
    fn new(body: &'a [u8]) -> Self {
        Attributes { rest: body }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), StunError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let fail = |s: &mut Self| {
            s.rest = &[];
            Some(Err(StunError::Truncated))
        };
        let Some(h) = self.rest.get(..4) else {
            return fail(self);
        };
        let ty = u16::from_be_bytes([h[0], h[1]]);
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let Some(value) = self.rest.get(4..4 + len) else {
            return fail(self);
        };
        // The last attribute's padding must be there too: the header
        // length is a multiple of 4.
        let Some(rest) = self.rest.get(4 + padded(len)..) else {
            return fail(self);
        };
        self.rest = rest;
        Some(Ok((ty, value)))
    }
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

fn xor_key(id: &TransactionId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    k[4..].copy_from_slice(id);
    k
}

/// (XOR-)MAPPED-ADDRESS value: reserved byte, family 1 (IPv4, 8 bytes) or
/// 2 (IPv6, 20 bytes), port, address; XORed with the cookie (and the
/// transaction ID for IPv6) when `xor` holds the transaction ID.
fn decode_address(v: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let key = xor.map(xor_key).unwrap_or([0; 16]);
    let port = u16::from_be_bytes([*v.get(2)? ^ key[0], *v.get(3)? ^ key[1]]);
    let ip = match (v.get(1)?, v.len()) {
        (1, 8) => {
            let mut a = [0u8; 4];
            for (i, b) in a.iter_mut().enumerate() {
                *b = v[4 + i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(a))
        }
        (2, 20) => {
            let mut a = [0u8; 16];
            for (i, b) in a.iter_mut().enumerate() {
                *b = v[4 + i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Writes one message into a caller's buffer; the header's length is kept
/// current so a FINGERPRINT can be computed at the end.
struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    fn new(
        out: &'a mut [u8],
        class: Class,
        method: u16,
        id: &TransactionId,
    ) -> Result<Self, StunError> {
        let h = out.get_mut(..HEADER_LEN).ok_or(StunError::BufferTooSmall)?;
        h[TYPE].copy_from_slice(&message_type(class, method).to_be_bytes());
        h[LENGTH].copy_from_slice(&[0, 0]);
        h[COOKIE].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        h[TRANSACTION].copy_from_slice(id);
        Ok(Writer {
            out,
            len: HEADER_LEN,
        })
    }

    fn attr(&mut self, ty: u16, parts: &[&[u8]]) -> Result<(), StunError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let end = self.len + 4 + padded(len);
        if len > usize::from(u16::MAX) || end - HEADER_LEN > MAX_BODY_LEN {
            return Err(StunError::BufferTooSmall);
        }
        let dst = self
            .out
            .get_mut(self.len..end)
            .ok_or(StunError::BufferTooSmall)?;
        dst[..2].copy_from_slice(&ty.to_be_bytes());
        dst[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let mut at = 4;
        for p in parts {
            dst[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        dst[at..].fill(0);
        self.len = end;
        let body = (self.len - HEADER_LEN) as u16;
        self.out[LENGTH].copy_from_slice(&body.to_be_bytes());
        Ok(())
    }

    fn address(&mut self, ty: u16, addr: SocketAddr, id: &TransactionId) -> Result<(), StunError> {
        let key = if ty == ATTR_XOR_MAPPED_ADDRESS {
            xor_key(id)
        } else {
            [0; 16]
        };
        let port = addr.port().to_be_bytes();
        let port = [port[0] ^ key[0], port[1] ^ key[1]];
        match addr.ip() {
            IpAddr::V4(ip) => {
                let mut a = ip.octets();
                a.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
                self.attr(ty, &[&[0, 1], &port, &a])
            }
            IpAddr::V6(ip) => {
                let mut a = ip.octets();
                a.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
                self.attr(ty, &[&[0, 2], &port, &a])
            }
        }
    }

    fn finish(mut self, fingerprint: bool) -> Result<usize, StunError> {
        if fingerprint {
            // Reserve the attribute first so the length covers it.
            self.attr(ATTR_FINGERPRINT, &[&[0; 4]])?;
            let crc = crc32(&self.out[..self.len - 8]) ^ FINGERPRINT_XOR;
            self.out[self.len - 4..self.len].copy_from_slice(&crc.to_be_bytes());
        }
        Ok(self.len)
    }
}

/// A Binding request into `out`; returns its length (20 bytes, 28 with a
/// FINGERPRINT, more with SOFTWARE).
pub fn encode_binding_request(
    id: &TransactionId,
    software: Option<&str>,
    fingerprint: bool,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut w = Writer::new(out, Class::Request, METHOD_BINDING, id)?;
    if let Some(s) = software {
        w.attr(ATTR_SOFTWARE, &[s.as_bytes()])?;
    }
    w.finish(fingerprint)
}

/// A Binding success response carrying `mapped` in XOR-MAPPED-ADDRESS.
pub fn encode_binding_success(
    id: &TransactionId,
    mapped: SocketAddr,
    software: Option<&str>,
    fingerprint: bool,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut w = Writer::new(out, Class::Success, METHOD_BINDING, id)?;
    w.address(ATTR_XOR_MAPPED_ADDRESS, mapped, id)?;
    if let Some(s) = software {
        w.attr(ATTR_SOFTWARE, &[s.as_bytes()])?;
    }
    w.finish(fingerprint)
}

/// A Binding success response with the RFC 3489 MAPPED-ADDRESS only (what
/// an old server sends; for tests of the client's fallback).
pub fn encode_binding_success_legacy(
    id: &TransactionId,
    mapped: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut w = Writer::new(out, Class::Success, METHOD_BINDING, id)?;
    w.address(ATTR_MAPPED_ADDRESS, mapped, id)?;
    w.finish(false)
}

/// A Binding error response: ERROR-CODE `code` (300..699) with `reason`,
/// and UNKNOWN-ATTRIBUTES when `unknown` is not empty (420).
pub fn encode_binding_error(
    id: &TransactionId,
    code: u16,
    reason: &str,
    unknown: &[u16],
    fingerprint: bool,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut w = Writer::new(out, Class::Error, METHOD_BINDING, id)?;
    let head = [0, 0, ((code / 100) & 0x07) as u8, (code % 100) as u8];
    w.attr(ATTR_ERROR_CODE, &[&head, reason.as_bytes()])?;
    if !unknown.is_empty() {
        let mut types = [0u8; 2 * 8];
        let n = unknown.len().min(8);
        for (i, t) in unknown[..n].iter().enumerate() {
            types[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        w.attr(ATTR_UNKNOWN_ATTRIBUTES, &[&types[..2 * n]])?;
    }
    w.finish(fingerprint)
}

/// What a server sends back to a datagram from `from`, written into `out`:
/// `Ok(Some(len))` for a Binding request (success with the source address,
/// or 420 for an unknown comprehension-required attribute), `Ok(None)`
/// for a well-formed message that gets no answer (indications, responses,
/// other methods), `Err` for bytes that are not a valid STUN message.
///
/// The answer carries nothing the client did not need: no SOFTWARE, and a
/// FINGERPRINT only when the request had one, and a 420 with an empty
/// reason phrase: a success is 12 bytes (IPv6: 24) larger than the
/// shortest request, a 420 is 36 bytes against a request of at least 24.
/// The rest of the amplification argument is the server's rate limit
/// (engine/docs/nat.md).
pub fn answer_binding(
    request: &[u8],
    from: SocketAddr,
    out: &mut [u8],
) -> Result<Option<usize>, StunError> {
    // On a dual-stack socket an IPv4 client arrives as ::ffff:a.b.c.d; it
    // gets its address back as IPv4, the family it sent from.
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    match StunMessage::new_checked(request) {
        Ok(m) if m.class == Class::Request && m.method == METHOD_BINDING => {
            encode_binding_success(&m.transaction_id, from, None, m.has_fingerprint, out).map(Some)
        }
        Ok(_) => Ok(None),
        Err(StunError::UnknownRequired(t)) if is_stun(request) => {
            let (class, method) = split_type(u16::from_be_bytes([request[0], request[1]]));
            if class != Class::Request || method != METHOD_BINDING {
                return Ok(None);
            }
            let mut id = [0u8; 12];
            id.copy_from_slice(&request[TRANSACTION]);
            encode_binding_error(&id, 420, "", &[t], false, out).map(Some)
        }
        Err(e) => Err(e),
    }
}

/// CRC-32 (ISO-HDLC, as zlib), what FINGERPRINT uses.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::{WireMessage, COOKIE_REPLY_LEN, DATA_OVERHEAD};

    const ID: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 section 2.2: an IPv4 Binding success response with
    /// XOR-MAPPED-ADDRESS 192.0.2.1:32853, SOFTWARE, MESSAGE-INTEGRITY and
    /// FINGERPRINT (a server nobody here wrote).
    const RFC5769_V4: &[u8] = &[
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 section 2.3: the same over IPv6,
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    const RFC5769_V6: &[u8] = &[
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    #[test]
    fn rfc5769_vectors_parse() {
        let m = StunMessage::new_checked(RFC5769_V4).unwrap();
        assert_eq!((m.class, m.method), (Class::Success, METHOD_BINDING));
        assert_eq!(m.transaction_id, ID);
        assert!(m.has_fingerprint);
        assert_eq!(m.software(), Some("test vector"));
        assert_eq!(
            m.mapped_address().unwrap(),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        let m = StunMessage::new_checked(RFC5769_V6).unwrap();
        assert!(m.has_fingerprint);
        assert_eq!(
            m.mapped_address().unwrap(),
            Some(
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .unwrap()
            )
        );
    }

    #[test]
    fn a_wrong_fingerprint_is_refused() {
        let mut v = RFC5769_V4.to_vec();
        let n = v.len();
        v[n - 1] ^= 1;
        assert_eq!(StunMessage::new_checked(&v), Err(StunError::BadFingerprint));
        // A flipped bit in the body breaks it too.
        let mut v = RFC5769_V4.to_vec();
        v[30] ^= 0x20;
        assert_eq!(StunMessage::new_checked(&v), Err(StunError::BadFingerprint));
    }

    #[test]
    fn encode_parse_roundtrip() {
        let mut buf = [0u8; 128];
        for mapped in ["198.51.100.7:1", "[2001:db8::1]:65535"] {
            let mapped: SocketAddr = mapped.parse().unwrap();
            for fp in [false, true] {
                let n = encode_binding_success(&ID, mapped, Some("x"), fp, &mut buf).unwrap();
                let m = StunMessage::new_checked(&buf[..n]).unwrap();
                assert_eq!((m.class, m.has_fingerprint), (Class::Success, fp));
                assert_eq!(m.mapped_address().unwrap(), Some(mapped));
                assert_eq!(m.software(), Some("x"));
                let n = encode_binding_success_legacy(&ID, mapped, &mut buf).unwrap();
                let m = StunMessage::new_checked(&buf[..n]).unwrap();
                assert_eq!(m.mapped_address().unwrap(), Some(mapped));
            }
        }
        let n = encode_binding_request(&ID, None, true, &mut buf).unwrap();
        assert_eq!(n, 28);
        let m = StunMessage::new_checked(&buf[..n]).unwrap();
        assert_eq!(
            (m.class, m.method, m.transaction_id),
            (Class::Request, 1, ID)
        );
        let n = encode_binding_error(&ID, 420, "Unknown", &[0x7777], true, &mut buf).unwrap();
        let m = StunMessage::new_checked(&buf[..n]).unwrap();
        assert_eq!(m.class, Class::Error);
        assert_eq!(m.error_code(), Some((420, "Unknown")));
        // The request in the RFC's layout: type 0x0001, cookie, ID.
        let n = encode_binding_request(&ID, None, false, &mut buf).unwrap();
        assert_eq!(&buf[..8], &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(n, 20);
        assert_eq!(
            encode_binding_request(&ID, None, true, &mut buf[..27]),
            Err(StunError::BufferTooSmall)
        );
    }

    #[test]
    fn message_types_interleave_class_bits() {
        assert_eq!(message_type(Class::Request, 1), 0x0001);
        assert_eq!(message_type(Class::Success, 1), 0x0101);
        assert_eq!(message_type(Class::Error, 1), 0x0111);
        assert_eq!(message_type(Class::Indication, 1), 0x0011);
        for t in [0x0001u16, 0x0101, 0x0111, 0x0011, 0x3eef] {
            let (c, m) = split_type(t);
            assert_eq!(message_type(c, m), t);
        }
    }

    fn with_attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut buf = [0u8; 128];
        let mut w = Writer::new(&mut buf, Class::Success, METHOD_BINDING, &ID).unwrap();
        w.address(ATTR_XOR_MAPPED_ADDRESS, "192.0.2.1:7".parse().unwrap(), &ID)
            .unwrap();
        w.attr(ty, &[value]).unwrap();
        let n = w.finish(true).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn unknown_optional_attributes_are_skipped_required_refused() {
        let m = with_attr(0xC0DE, b"abcde").clone();
        let m = StunMessage::new_checked(&m).unwrap();
        assert_eq!(
            m.mapped_address().unwrap(),
            Some("192.0.2.1:7".parse().unwrap())
        );
        assert_eq!(
            StunMessage::new_checked(&with_attr(0x7001, b"x")),
            Err(StunError::UnknownRequired(0x7001))
        );
        // Known but unused (no credentials here): read past.
        assert!(StunMessage::new_checked(&with_attr(ATTR_USERNAME, b"u")).is_ok());
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let good = with_attr(0xC0DE, b"abcde");
        for cut in 0..good.len() {
            assert!(StunMessage::new_checked(&good[..cut]).is_err());
        }
        // An attribute length running past the body.
        let mut v = good.clone();
        v[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(StunMessage::new_checked(&v), Err(StunError::Truncated));
        // FINGERPRINT not last.
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf, Class::Success, 1, &ID).unwrap();
        w.attr(ATTR_FINGERPRINT, &[&[0; 4]]).unwrap();
        w.attr(0x8001, &[b"z"]).unwrap();
        let n = w.len;
        let e = StunMessage::new_checked(&buf[..n]).unwrap_err();
        assert!(matches!(
            e,
            StunError::BadFingerprint | StunError::FingerprintNotLast
        ));
        // Bad address families and lengths.
        let m = with_attr(0x8001, b"");
        let mut v = m.clone();
        v[HEADER_LEN + 5] = 3; // family
        let v = StunMessage::new_checked(&v);
        assert!(matches!(v, Err(StunError::BadFingerprint)));
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf, Class::Success, 1, &ID).unwrap();
        w.attr(ATTR_XOR_MAPPED_ADDRESS, &[&[0, 3, 0, 0, 1, 2, 3, 4]])
            .unwrap();
        let n = w.finish(false).unwrap();
        let m = StunMessage::new_checked(&buf[..n]).unwrap();
        assert_eq!(
            m.mapped_address(),
            Err(StunError::BadAttribute(ATTR_XOR_MAPPED_ADDRESS))
        );
    }

    #[test]
    fn is_stun_demux() {
        let mut buf = [0u8; 64];
        let n = encode_binding_request(&ID, None, true, &mut buf).unwrap();
        assert!(is_stun(&buf[..n]));
        assert!(!is_stun(&buf[..n - 1]));
        let mut v = buf[..n].to_vec();
        v[0] |= 0x40;
        assert!(!is_stun(&v));
        let mut v = buf[..n].to_vec();
        v[4] ^= 1;
        assert!(!is_stun(&v));
        let mut v = buf[..n].to_vec();
        v.extend_from_slice(&[0, 0]);
        v[3] += 2; // length 10: not a multiple of 4
        assert!(!is_stun(&v));
    }

    /// Every WireGuard message type, with the cookie planted at bytes 4..8
    /// (where an initiation's random sender index may put it), at every
    /// length WireGuard uses: never STUN, while still WireGuard.
    #[test]
    fn wireguard_messages_never_look_like_stun() {
        for (ty, lens) in [
            (1u8, vec![148]),
            (2, vec![92]),
            (3, vec![COOKIE_REPLY_LEN]),
            (4, (DATA_OVERHEAD..DATA_OVERHEAD + 1500).collect()),
        ] {
            for len in lens {
                let mut d = vec![0u8; len];
                d[0] = ty;
                d[COOKIE].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                assert!(WireMessage::new_checked(&d).is_ok());
                assert!(!is_stun(&d), "type {ty} len {len}");
            }
        }
    }

    #[test]
    fn server_answers_binding_requests_only() {
        let from: SocketAddr = "203.0.113.9:4242".parse().unwrap();
        let (mut req, mut out) = ([0u8; 64], [0u8; 128]);
        for fp in [false, true] {
            let n = encode_binding_request(&ID, Some("client"), fp, &mut req).unwrap();
            let a = answer_binding(&req[..n], from, &mut out).unwrap().unwrap();
            let m = StunMessage::new_checked(&out[..a]).unwrap();
            assert_eq!((m.class, m.transaction_id), (Class::Success, ID));
            assert_eq!(m.mapped_address().unwrap(), Some(from));
            assert_eq!(m.has_fingerprint, fp);
            assert_eq!(m.software(), None);
            assert!(a <= 40);
        }
        let n = encode_binding_request(&ID, None, false, &mut req).unwrap();
        let mapped: SocketAddr = "[::ffff:203.0.113.9]:4242".parse().unwrap();
        let a = answer_binding(&req[..n], mapped, &mut out)
            .unwrap()
            .unwrap();
        let m = StunMessage::new_checked(&out[..a]).unwrap();
        assert_eq!(m.mapped_address().unwrap(), Some(from));
        assert_eq!(a, 32);
        // A response is not answered; neither is garbage.
        let n = encode_binding_success(&ID, from, None, false, &mut req).unwrap();
        assert_eq!(answer_binding(&req[..n], from, &mut out), Ok(None));
        assert!(answer_binding(&[0u8; 19], from, &mut out).is_err());
        // An unknown comprehension-required attribute gets a 420.
        let mut w = Writer::new(&mut req, Class::Request, 1, &ID).unwrap();
        w.attr(0x0777, &[b"?"]).unwrap();
        let n = w.finish(false).unwrap();
        let a = answer_binding(&req[..n], from, &mut out).unwrap().unwrap();
        let m = StunMessage::new_checked(&out[..a]).unwrap();
        assert_eq!(m.error_code().map(|e| e.0), Some(420));
        assert_eq!(a, 36);
        let unknown: Vec<_> = m.attributes().filter_map(Result::ok).collect();
        assert!(unknown.contains(&(ATTR_UNKNOWN_ATTRIBUTES, &[0x07, 0x77][..])));
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
