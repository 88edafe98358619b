//! What every view shares: big-endian field access over ranges a
//! `new_checked` has covered, and the error of a header that does not fit.
//! A leaf: it imports nothing from the views.

use std::ops::Range;

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
pub(super) fn be16(b: &[u8], at: Range<usize>) -> u16 {
    u16::from_be_bytes([b[at.start], b[at.start + 1]])
}

/// A big-endian `u32` at `at` (a four-byte field a `new_checked` covered).
#[inline]
pub(super) fn be32(b: &[u8], at: Range<usize>) -> u32 {
    u32::from_be_bytes([
        b[at.start],
        b[at.start + 1],
        b[at.start + 2],
        b[at.start + 3],
    ])
}

#[inline]
pub(super) fn put16(b: &mut [u8], at: Range<usize>, v: u16) {
    b[at].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(super) fn put32(b: &mut [u8], at: Range<usize>, v: u32) {
    b[at].copy_from_slice(&v.to_be_bytes());
}
