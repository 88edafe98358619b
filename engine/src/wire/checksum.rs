//! The Internet checksum (RFC 1071), as IPv4, TCP and UDP use it.

/// Ones' complement sum of `data` added to `initial` (not yet folded), in
/// 32-bit steps: the carries land above bit 16 and [`fold`] adds them back.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let mut pairs = chunks.remainder().chunks_exact(2);
    for p in &mut pairs {
        acc += u16::from_be_bytes([p[0], p[1]]) as u64;
    }
    if let [last] = pairs.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

/// Folds a [`sum`] to 16 bits (not inverted: a partial checksum, as the
/// kernel's `CHECKSUM_PARTIAL` expects it in the checksum field).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum of `data` with `initial` (a pseudo-header sum, or 0) folded
/// in. Zero over data that holds its own valid checksum.
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum(data, initial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_and_odd_lengths() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let words = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&words, 0)), 0xddf2);
        assert_eq!(checksum(&words, 0), !0xddf2);
        // An odd byte counts as the high byte of a zero-padded word.
        assert_eq!(fold(sum(&[0xab], 0)), 0xab00);
        assert_eq!(
            fold(sum(&[1, 2, 3, 4, 5, 6, 7], 0)),
            0x0102 + 0x0304 + 0x0506 + 0x0700
        );
        assert_eq!(fold(sum(&[], 0x1_0001)), 2);
    }

    #[test]
    fn a_valid_checksum_sums_to_zero() {
        let data: Vec<u8> = (0..101u8).map(|i| i.wrapping_mul(37)).collect();
        let c = checksum(&data, 1234);
        // The checksum word in front, the data after it (still 16-bit
        // aligned): the whole sums to 0xffff, its checksum to zero.
        let mut whole = c.to_be_bytes().to_vec();
        whole.extend_from_slice(&data);
        assert_eq!(checksum(&whole, 1234), 0);
        assert_ne!(checksum(&whole, 1235), 0);
    }
}
