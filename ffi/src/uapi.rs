//! The WireGuard UAPI text protocol as calls on a `meshvpn_engine`: what
//! `wg` sends over `/var/run/wireguard/IFNAME.sock`, without the socket.
//!
//! Thread safety, for both functions: safe from any thread, concurrently
//! with any other call on the engine (requests are applied one at a time).

use std::ffi::c_char;

use ::meshvpn_engine::UapiError;

use crate::engine::{lookup, meshvpn_engine};
use crate::error::{meshvpn_result, Error};
use crate::ptr::{self, Out};

impl From<UapiError> for Error {
    fn from(e: UapiError) -> Error {
        let code = match e {
            UapiError::Rejected { .. } => meshvpn_result::MESHVPN_UAPI_REJECTED,
            UapiError::Closed => meshvpn_result::MESHVPN_ENGINE_STOPPED,
            _ => meshvpn_result::MESHVPN_UAPI_INVALID,
        };
        Error::new(code, e.to_string())
    }
}

/// Writes the engine's `get=1` reply (`private_key=...`, `listen_port=...`,
/// `public_key=...` lines, as wireguard-go sends them, without the closing
/// `errno=0` line) into `buf`, NUL-terminated, and its length without the
/// NUL into `*out_len`. Follows the buffer protocol of
/// `meshvpn_result_message`: `buf` NULL and `buf_len` 0 writes the size
/// needed (NUL included) into `*out_len`; a buffer too small gets
/// `MESHVPN_BUFFER_TOO_SMALL` and nothing is written. The size changes
/// between two calls (handshake times and byte counters change length, peers
/// come and go): retry with the new size on `MESHVPN_BUFFER_TOO_SMALL`, or
/// leave room.
///
/// The text holds the private and preshared keys: a secret; wipe it.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_uapi_get(
    engine: *const meshvpn_engine,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        let out_len = Out::new(out_len, "out_len")?;
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_secret_text(buf, buf_len, out_len, e.uapi_get()) }
    }}
}

/// Applies a `set=1` request: NUL-terminated `key=value` lines, with or
/// without the leading `set=1` line and the closing blank line, with
/// wireguard-go's meaning (`replace_peers=true`, `public_key=` starting a
/// peer, `remove=true`, `allowed_ip=`, ...). The request is parsed whole
/// first: malformed text changes nothing. A request that fails while
/// being applied keeps the changes before the failing line, as in
/// wireguard-go. `text` is only read during the call.
///
/// `out_errno` may be NULL. Otherwise it receives the number a UAPI socket
/// would answer with `errno=`: 0 on `MESHVPN_OK`, the error's errno
/// (`EPROTO`, `EINVAL`, `EMSGSIZE`, `EADDRINUSE`, ...) on
/// `MESHVPN_UAPI_INVALID` and `MESHVPN_UAPI_REJECTED`. It is the one
/// output written on failure; on other errors it is left untouched.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (not UTF-8), `MESHVPN_ENGINE_STOPPED`,
/// `MESHVPN_UAPI_INVALID` (the message names the line and key),
/// `MESHVPN_UAPI_REJECTED`.
///
/// Thread safety: safe from any thread at any time, while traffic flows.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_uapi_set(
    engine: *mut meshvpn_engine,
    text: *const c_char,
    out_errno: *mut i32,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(text, "text") }?;
        let errno = match e.uapi_set(text) {
            Ok(()) => 0,
            Err(err) => {
                if !out_errno.is_null() && !matches!(err, UapiError::Closed) {
                    Out::new(out_errno, "out_errno")?.write(err.errno());
                }
                return Err(err.into());
            }
        };
        if !out_errno.is_null() {
            Out::new(out_errno, "out_errno")?.write(errno);
        }
        Ok(())
    }}
}
