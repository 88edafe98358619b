//! `meshvpn_key`: a 32-byte WireGuard key (private, public or preshared) as
//! a plain value, with generation and base64/hex conversion.
//!
//! Keys are values, not handles: C copies them freely. Temporary copies
//! of secrets made here are zeroed before they are released.

use std::ffi::c_char;

use ::meshvpn_engine::{PresharedKey, PrivateKey, PublicKey};
use zeroize::Zeroize;

use crate::error::meshvpn_result;
use crate::ptr::{self, Out};

/// Bytes in a key.
pub const MESHVPN_KEY_LEN: usize = 32;
/// Buffer size for a key in base64, NUL included (44 characters + NUL).
pub const MESHVPN_KEY_BASE64_LEN: usize = 45;
/// Buffer size for a key in hex, NUL included (64 digits + NUL).
pub const MESHVPN_KEY_HEX_LEN: usize = 65;

/// A WireGuard key: 32 raw bytes. Which kind (private, public, preshared)
/// is given by where it is used. The caller owns it; treat private and
/// preshared keys as secrets (zero them when done).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct meshvpn_key {
    pub bytes: [u8; MESHVPN_KEY_LEN],
}

impl meshvpn_key {
    pub(crate) fn public(&self) -> PublicKey {
        PublicKey::from_bytes(self.bytes)
    }
    pub(crate) fn private(&self) -> PrivateKey {
        PrivateKey::from_bytes(self.bytes)
    }
    pub(crate) fn preshared(&self) -> PresharedKey {
        PresharedKey::from_bytes(self.bytes)
    }
    pub(crate) fn from_public(k: &PublicKey) -> meshvpn_key {
        meshvpn_key {
            bytes: *k.as_bytes(),
        }
    }
}

/// Generates a new private key (random, clamped as `wg genkey` does) into
/// `*out_private`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_generate(out_private: *mut meshvpn_key) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_private, "out_private")?;
        out.write(meshvpn_key { bytes: *PrivateKey::generate().as_bytes() });
        Ok(())
    }}
}

/// Generates a new random preshared key (`wg genpsk`) into `*out_key`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_generate_preshared(
    out_key: *mut meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_key, "out_key")?;
        out.write(meshvpn_key { bytes: *PresharedKey::generate().as_bytes() });
        Ok(())
    }}
}

/// Derives the public key of `private_key` (`wg pubkey`) into
/// `*out_public`. `private_key` and `out_public` may point to the same key.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_public(
    private_key: *const meshvpn_key,
    out_public: *mut meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid key or NULL.
        let private = unsafe { ptr::try_ref(private_key, "private_key") }?.private();
        let out = Out::new(out_public, "out_public")?;
        out.write(meshvpn_key::from_public(&private.public_key()));
        Ok(())
    }}
}

/// Parses a key in standard base64 (44 characters, as `wg` prints them)
/// from the NUL-terminated `text` into `*out_key`. Surrounding whitespace
/// is ignored.
///
/// Errors: `MESHVPN_KEY_INVALID` for anything but 32 bytes of base64.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_from_base64(
    text: *const c_char,
    out_key: *mut meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(text, "text") }?;
        let out = Out::new(out_key, "out_key")?;
        // PrivateKey is just the 32 bytes, zeroed on drop.
        let key = PrivateKey::from_base64(text).map_err(|_| key_error("base64", text.len()))?;
        out.write(meshvpn_key { bytes: *key.as_bytes() });
        Ok(())
    }}
}

/// Parses a key in hex (64 digits, as the UAPI writes them) from the
/// NUL-terminated `text` into `*out_key`.
///
/// Errors: `MESHVPN_KEY_INVALID` for anything but 64 hex digits.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_from_hex(
    text: *const c_char,
    out_key: *mut meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(text, "text") }?;
        let out = Out::new(out_key, "out_key")?;
        let key = PrivateKey::from_hex(text).map_err(|_| key_error("hex", text.len()))?;
        out.write(meshvpn_key { bytes: *key.as_bytes() });
        Ok(())
    }}
}

/// The engine's key errors quote no input: the text may be a secret.
fn key_error(format: &str, len: usize) -> crate::error::Error {
    crate::error::Error::new(
        meshvpn_result::MESHVPN_KEY_INVALID,
        format!("not a 32-byte key in {format} ({len} characters given)"),
    )
}

/// Writes `key` in base64 (44 characters) plus a NUL into `buf`, and 44
/// into `*out_len`. `buf` needs `MESHVPN_KEY_BASE64_LEN` bytes; otherwise
/// the buffer protocol of `meshvpn_result_message` applies.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_to_base64(
    key: *const meshvpn_key,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid key or NULL.
        let key = unsafe { ptr::try_ref(key, "key") }?.private();
        let out_len = Out::new(out_len, "out_len")?;
        let mut text = key.to_base64();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        let n = unsafe { ptr::copy_text(buf, buf_len, &text) };
        text.zeroize();
        out_len.write(n?);
        Ok(())
    }}
}

/// Writes `key` in lowercase hex (64 digits) plus a NUL into `buf`, and 64
/// into `*out_len`. `buf` needs `MESHVPN_KEY_HEX_LEN` bytes; otherwise the
/// buffer protocol of `meshvpn_result_message` applies.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_key_to_hex(
    key: *const meshvpn_key,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid key or NULL.
        let key = unsafe { ptr::try_ref(key, "key") }?.private();
        let out_len = Out::new(out_len, "out_len")?;
        let mut text = key.to_hex();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        let n = unsafe { ptr::copy_text(buf, buf_len, &text) };
        text.zeroize();
        out_len.write(n?);
        Ok(())
    }}
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshvpn_result::*;

    // `echo <priv> | wg pubkey` (wireguard-tools).
    const PRIV: &std::ffi::CStr = c"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    #[test]
    fn base64_round_trip_and_public_key() {
        let mut k = meshvpn_key { bytes: [0; 32] };
        // SAFETY: valid pointers throughout.
        unsafe {
            assert_eq!(meshvpn_key_from_base64(PRIV.as_ptr(), &mut k), MESHVPN_OK);
            let mut p = k;
            assert_eq!(meshvpn_key_public(&k, &mut p), MESHVPN_OK);
            let mut buf = [0 as c_char; MESHVPN_KEY_BASE64_LEN];
            let mut n = 0;
            assert_eq!(
                meshvpn_key_to_base64(&p, buf.as_mut_ptr(), buf.len(), &mut n),
                MESHVPN_OK
            );
            assert_eq!(n, 44);
            assert_eq!(
                std::ffi::CStr::from_ptr(buf.as_ptr()).to_str().unwrap(),
                PUB
            );
            let mut hex = [0 as c_char; MESHVPN_KEY_HEX_LEN];
            assert_eq!(
                meshvpn_key_to_hex(&p, hex.as_mut_ptr(), hex.len(), &mut n),
                MESHVPN_OK
            );
            let mut back = meshvpn_key { bytes: [0; 32] };
            assert_eq!(meshvpn_key_from_hex(hex.as_ptr(), &mut back), MESHVPN_OK);
            assert_eq!(back.bytes, p.bytes);
            // One byte short of room.
            assert_eq!(
                meshvpn_key_to_base64(&p, buf.as_mut_ptr(), 44, &mut n),
                MESHVPN_BUFFER_TOO_SMALL
            );
        }
    }

    #[test]
    fn bad_keys_do_not_leak_into_messages() {
        let secret = c"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0=";
        let mut k = meshvpn_key { bytes: [9; 32] };
        // SAFETY: valid pointers.
        let r = unsafe { meshvpn_key_from_base64(secret.as_ptr(), &mut k) };
        assert_eq!(r, MESHVPN_KEY_INVALID);
        assert_eq!(k.bytes, [9; 32], "output untouched on failure");
        let msg = crate::error::last_error_for_tests();
        assert!(!msg.contains("c2VjcmV0"), "{msg}");
    }

    #[test]
    fn generated_keys_differ() {
        let mut a = meshvpn_key { bytes: [0; 32] };
        let mut b = a;
        // SAFETY: valid pointers.
        unsafe {
            assert_eq!(meshvpn_key_generate(&mut a), MESHVPN_OK);
            assert_eq!(meshvpn_key_generate_preshared(&mut b), MESHVPN_OK);
            assert_eq!(
                meshvpn_key_generate(std::ptr::null_mut()),
                MESHVPN_NULL_PARAMETER
            );
        }
        assert_ne!(a.bytes, b.bytes);
        assert_eq!(a.bytes[0] & 7, 0);
    }
}
