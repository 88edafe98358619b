//! `meshvpn_interrupter`: a token that wakes a blocking call from another
//! thread without closing anything. Calls that have no handle of their
//! own to interrupt (`meshvpn_netstack_ping`) take one, so a caller can
//! cancel them: Go's `Netstack.Ping` makes one per call and interrupts it
//! when the call's `ctx` is cancelled.
//!
//! Its semantics are those of `meshvpn_conn_interrupt`: every call
//! blocked on the token returns `MESHVPN_INTERRUPTED`, and so does the
//! next call that starts after the interrupt (once), so an interrupt that
//! lands just before the call begins is not lost.
//!
//! Thread safety, for every function here: safe from any thread at any
//! time, concurrently with the calls using the token.

use std::sync::Arc;

use ::meshvpn_engine::netstack::Interrupter;

use crate::error::{meshvpn_result, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::ptr::Out;

/// An interrupt token. Opaque: created by `meshvpn_interrupter_new`,
/// released by `meshvpn_interrupter_free`. The value is a handle, not a
/// pointer to memory: never dereference it.
pub struct meshvpn_interrupter {
    _private: [u8; 0],
}

impl Handled for Interrupter {
    const NAME: &'static str = "meshvpn_interrupter";

    /// Freeing a token wakes the calls still using it: nothing can
    /// interrupt them any more.
    fn close(&self) {
        self.interrupt();
    }
}

static INTERRUPTERS: HandleTable<meshvpn_interrupter, Interrupter> =
    HandleTable::new(tag::INTERRUPTER);

/// The token behind a handle, or a fresh one nobody interrupts for NULL.
pub(crate) fn lookup_optional(handle: *const meshvpn_interrupter) -> Result<Interrupter> {
    if handle.is_null() {
        return Ok(Interrupter::new());
    }
    Ok((*INTERRUPTERS.lookup(handle)?).clone())
}

/// Creates a token. On success `*out_interrupter` receives a handle the
/// caller owns and must release with `meshvpn_interrupter_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_interrupter_new(
    out_interrupter: *mut *mut meshvpn_interrupter,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_interrupter, "out_interrupter")?;
        out.write(INTERRUPTERS.insert(Arc::new(Interrupter::new()))?);
        Ok(())
    }}
}

/// Wakes every call blocked on the token with `MESHVPN_INTERRUPTED`, and
/// the next call that starts with it (once).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn meshvpn_interrupter_interrupt(
    interrupter: *mut meshvpn_interrupter,
) -> meshvpn_result {
    ffi_boundary! {{
        INTERRUPTERS.lookup(interrupter)?.interrupt();
        Ok(())
    }}
}

/// Interrupts (as `meshvpn_interrupter_interrupt`) and releases the
/// token; copies of the handle are dead afterwards
/// (`MESHVPN_INVALID_HANDLE`). Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (from the
/// log callback).
#[no_mangle]
pub extern "C" fn meshvpn_interrupter_free(
    interrupter: *mut meshvpn_interrupter,
) -> meshvpn_result {
    ffi_boundary! {{
        INTERRUPTERS.free(interrupter)
    }}
}
