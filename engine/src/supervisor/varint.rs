//! Signed varints exactly as Go's `encoding/binary` writes and reads them
//! (`PutVarint` / `ReadVarint`): zig-zag, then little-endian base-128 (LEB128).
//!
//! The reader takes at most [`MAX_VARINT_LEN`] bytes and rejects the same
//! overflowing encodings Go rejects, so both sides agree on every input.

/// Longest encoding of a 64-bit varint (Go's `binary.MaxVarintLen64`).
pub const MAX_VARINT_LEN: usize = 10;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    /// The input ended inside the varint.
    #[error("truncated varint")]
    Truncated,
    /// More than 64 bits of value, or more than ten bytes.
    #[error("varint overflows a 64-bit integer")]
    Overflow,
}

/// Appends `value` as a zig-zag signed varint.
pub fn put_varint(out: &mut Vec<u8>, value: i64) {
    // Zig-zag: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ...
    let mut ux = (value as u64) << 1;
    if value < 0 {
        ux = !ux;
    }
    put_uvarint(out, ux);
}

/// Appends `value` as an unsigned LEB128 varint.
pub fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a zig-zag signed varint from the front of `input`; returns the value
/// and how many bytes it took.
pub fn read_varint(input: &[u8]) -> Result<(i64, usize), VarintError> {
    let (ux, n) = read_uvarint(input)?;
    let mut x = (ux >> 1) as i64;
    if ux & 1 != 0 {
        x = !x;
    }
    Ok((x, n))
}

/// Reads an unsigned LEB128 varint from the front of `input`.
pub fn read_uvarint(input: &[u8]) -> Result<(u64, usize), VarintError> {
    let mut x: u64 = 0;
    let mut shift: u32 = 0;
    for i in 0..MAX_VARINT_LEN {
        let Some(&byte) = input.get(i) else {
            return Err(VarintError::Truncated);
        };
        if byte < 0x80 {
            if i == MAX_VARINT_LEN - 1 && byte > 1 {
                return Err(VarintError::Overflow);
            }
            return Ok((x | (u64::from(byte) << shift), i + 1));
        }
        x |= u64::from(byte & 0x7f) << shift;
        shift += 7;
    }
    Err(VarintError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        out
    }

    #[test]
    fn matches_go_encodings() {
        // Values and bytes from Go's binary.PutVarint.
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(-1), [0x01]);
        assert_eq!(enc(1), [0x02]);
        assert_eq!(enc(2), [0x04]);
        assert_eq!(enc(-64), [0x7f]);
        assert_eq!(enc(64), [0x80, 0x01]);
        assert_eq!(enc(15000), [0xb0, 0xea, 0x01]);
        assert_eq!(
            enc(i64::MAX),
            [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
        assert_eq!(
            enc(i64::MIN),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn round_trips_edges_and_a_sweep() {
        let mut values = vec![
            0,
            1,
            -1,
            63,
            -64,
            64,
            -65,
            i64::MAX,
            i64::MIN,
            i64::MAX - 1,
            i64::MIN + 1,
        ];
        // A deterministic sweep over all magnitudes (xorshift), no external RNG.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let shift = (s % 64) as u32;
            values.push((s >> shift) as i64);
            values.push(-((s >> shift) as i64));
        }
        for v in values {
            let bytes = enc(v);
            assert!(bytes.len() <= MAX_VARINT_LEN);
            assert_eq!(read_varint(&bytes), Ok((v, bytes.len())), "value {v}");
            // Every strict prefix is truncated, never misread.
            for cut in 0..bytes.len() {
                assert_eq!(read_varint(&bytes[..cut]), Err(VarintError::Truncated));
            }
        }
    }

    #[test]
    fn rejects_overflow_like_go() {
        // Ten bytes whose last carries more than one bit.
        let mut bad = vec![0xff; 9];
        bad.push(0x02);
        assert_eq!(read_uvarint(&bad), Err(VarintError::Overflow));
        // Eleven continuation bytes.
        assert_eq!(read_uvarint(&[0x80; 11]), Err(VarintError::Overflow));
        // Ten continuation bytes and nothing after: overflow, as Go says.
        assert_eq!(read_uvarint(&[0x80; 10]), Err(VarintError::Overflow));
        assert_eq!(read_uvarint(&[]), Err(VarintError::Truncated));
    }
}
