//! The only place raw pointers from C become Rust references: small typed
//! helpers that check for NULL and for lengths no real object can have,
//! so the rest of the crate works with `&T`, `&[T]` and `&str`.
//!
//! What cannot be checked (a non-NULL pointer to too little memory, a
//! string without its NUL) is the caller's promise, stated in the doc
//! comment of every exported function.

use std::ffi::{c_char, CStr};
use std::mem::size_of;

use crate::error::{Error, Result};

/// `&*p`, refusing NULL.
///
/// # Safety
/// A non-NULL `p` points to a valid `T` that outlives `'a` and is not
/// written to meanwhile.
pub(crate) unsafe fn try_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: the caller's promise; NULL is turned into an error.
    unsafe { p.as_ref() }.ok_or_else(|| Error::null(what))
}

/// A slice of `len` elements at `p`. `len == 0` gives an empty slice
/// whatever `p` is (NULL included); a length whose byte size exceeds
/// `isize::MAX` is refused before anything is read.
///
/// # Safety
/// For `len > 0`, `p` points to `len` valid, initialized `T`s that outlive
/// `'a` and are not written to meanwhile.
pub(crate) unsafe fn try_slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_len::<T>(len, what)?;
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: non-NULL, length checked against isize::MAX above; validity
    // and lifetime are the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Like `try_slice`, mutable.
///
/// # Safety
/// As `try_slice`, and nothing else accesses the elements during `'a`.
pub(crate) unsafe fn try_slice_mut<'a, T>(
    p: *mut T,
    len: usize,
    what: &str,
) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_len::<T>(len, what)?;
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: as in `try_slice`; exclusivity is the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

fn check_len<T>(len: usize, what: &str) -> Result<()> {
    match len.checked_mul(size_of::<T>().max(1)) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => Err(Error::invalid(format!(
            "{what}: length {len} is impossible"
        ))),
    }
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// A non-NULL `p` points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn try_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: non-NULL; NUL termination and lifetime are the caller's promise.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}

/// Like `try_str`, but NULL means "absent".
///
/// # Safety
/// As `try_str`.
pub(crate) unsafe fn try_opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded promise.
    unsafe { try_str(p, what) }.map(Some)
}

/// An output parameter, checked for NULL up front (before the call does
/// anything with side effects) and written once on success.
pub(crate) struct Out<T>(*mut T);

impl<T> Out<T> {
    pub fn new(p: *mut T, what: &str) -> Result<Out<T>> {
        if p.is_null() {
            Err(Error::null(what))
        } else {
            Ok(Out(p))
        }
    }

    /// Writes without reading or dropping the old contents (C memory may
    /// be uninitialized).
    pub fn write(self, value: T) {
        // SAFETY: non-NULL (checked in `new`); the exported function's doc
        // makes the caller promise it points to writable memory for a `T`.
        unsafe { self.0.write_unaligned(value) }
    }
}

/// Copies `text` and a NUL into `buf`, following the buffer protocol
/// documented on `meshvpn_result_message`: `(NULL, 0)` asks for the size
/// (returned, NUL included, nothing written); a buffer shorter than
/// `text.len() + 1` is refused untouched. Returns the number of bytes the
/// caller should see: the text length without the NUL after a copy, the
/// needed size for a query.
///
/// # Safety
/// A non-NULL `buf` has `buf_len` writable bytes.
pub(crate) unsafe fn copy_text(buf: *mut c_char, buf_len: usize, text: &str) -> Result<usize> {
    let needed = text.len() + 1;
    if buf.is_null() {
        return if buf_len == 0 {
            Ok(needed)
        } else {
            Err(Error::null("buf"))
        };
    }
    if buf_len < needed {
        return Err(Error::new(
            crate::meshvpn_result::MESHVPN_BUFFER_TOO_SMALL,
            format!("{needed} bytes needed, the buffer has {buf_len}"),
        ));
    }
    // SAFETY: `buf` has at least `needed` writable bytes (checked against
    // the caller's `buf_len`); `text` cannot overlap a buffer C owns.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        buf.add(text.len()).write(0);
    }
    Ok(text.len())
}

/// `copy_text`, then the length the caller should see into `out_len`.
///
/// # Safety
/// As `copy_text`.
pub(crate) unsafe fn write_text(
    buf: *mut c_char,
    buf_len: usize,
    out_len: Out<usize>,
    text: &str,
) -> Result<()> {
    // SAFETY: forwarded promise.
    let n = unsafe { copy_text(buf, buf_len, text) }?;
    out_len.write(n);
    Ok(())
}

/// `write_text` for text that holds keys: it is wiped whether or not it
/// fit.
///
/// # Safety
/// As `copy_text`.
pub(crate) unsafe fn write_secret_text(
    buf: *mut c_char,
    buf_len: usize,
    out_len: Out<usize>,
    mut text: String,
) -> Result<()> {
    // SAFETY: forwarded promise.
    let r = unsafe { write_text(buf, buf_len, out_len, &text) };
    zeroize::Zeroize::zeroize(&mut text);
    r
}

/// Copies `src` to the caller's `dst` (which has at least `src.len()`
/// bytes, checked by the caller against its declared capacity).
///
/// # Safety
/// `dst` has `src.len()` writable bytes.
pub(crate) unsafe fn copy_bytes(dst: *mut u8, src: &[u8]) {
    // SAFETY: the caller's promise; C memory cannot overlap Rust's packet buffer.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshvpn_result::*;

    #[test]
    fn impossible_lengths_are_refused_before_reading() {
        let p = std::ptr::dangling::<u64>(); // never dereferenced
                                             // SAFETY: the length check fails before the pointer is used.
        let e = unsafe { try_slice(p, usize::MAX, "packets") }.unwrap_err();
        assert_eq!(e.code, MESHVPN_INVALID_ARGUMENT);
        // SAFETY: as above.
        let e = unsafe { try_slice(p, isize::MAX as usize / 8 + 1, "packets") }.unwrap_err();
        assert_eq!(e.code, MESHVPN_INVALID_ARGUMENT);
        // SAFETY: zero length never reads.
        assert!(unsafe { try_slice::<u64>(std::ptr::null(), 0, "x") }
            .unwrap()
            .is_empty());
        // SAFETY: NULL is refused.
        let e = unsafe { try_slice::<u64>(std::ptr::null(), 1, "x") }.unwrap_err();
        assert_eq!(e.code, MESHVPN_NULL_PARAMETER);
    }

    #[test]
    fn text_copy_protocol() {
        // SAFETY: NULL with 0 is the size query.
        let size = unsafe { copy_text(std::ptr::null_mut(), 0, "abc") };
        assert_eq!(size.unwrap(), 4);
        // SAFETY: NULL with a length is refused.
        let refused = unsafe { copy_text(std::ptr::null_mut(), 9, "abc") };
        assert_eq!(refused.unwrap_err().code, MESHVPN_NULL_PARAMETER);
        let mut b = [1 as c_char; 3];
        // SAFETY: `b` has 3 bytes.
        let e = unsafe { copy_text(b.as_mut_ptr(), 3, "abc") }.unwrap_err();
        assert_eq!(e.code, MESHVPN_BUFFER_TOO_SMALL);
        assert_eq!(b, [1; 3]);
        let mut b = [1 as c_char; 4];
        // SAFETY: `b` has 4 bytes.
        assert_eq!(unsafe { copy_text(b.as_mut_ptr(), 4, "abc") }.unwrap(), 3);
        assert_eq!(b, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
    }
}
