//! Parsing untrusted bytes: inner IP, TCP and UDP headers, checksums,
//! virtio-net offload headers and WireGuard message framing.
//!
//! Every accessor here is total: a view is made only through a `new_checked`
//! that validates lengths first, after which no accessor can panic. Field
//! offsets are named `Range` constants, as in smoltcp's `wire` module.
//! Nothing here allocates, does I/O or keeps state.

pub mod checksum;
pub mod ip;
pub mod message;
pub mod tcp;
pub mod udp;
pub mod virtio;

pub use ip::{IpHeader, IpPacket};
pub use message::{MessageKind, WireMessage};
pub use tcp::TcpPacket;
pub use udp::UdpPacket;
pub use virtio::VirtioNetHdr;

/// Why bytes are not the transport or offload header they should start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} header truncated")]
    Truncated(&'static str),
    #[error("{0} header length field out of range")]
    BadLength(&'static str),
}

/// A big-endian `u16` at `at` (a two-byte field a `new_checked` covered).
#[inline]
fn be16(b: &[u8], at: std::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([b[at.start], b[at.start + 1]])
}

/// A big-endian `u32` at `at` (a four-byte field a `new_checked` covered).
#[inline]
fn be32(b: &[u8], at: std::ops::Range<usize>) -> u32 {
    u32::from_be_bytes([
        b[at.start],
        b[at.start + 1],
        b[at.start + 2],
        b[at.start + 3],
    ])
}

#[inline]
fn put16(b: &mut [u8], at: std::ops::Range<usize>, v: u16) {
    b[at].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn put32(b: &mut [u8], at: std::ops::Range<usize>, v: u32) {
    b[at].copy_from_slice(&v.to_be_bytes());
}
