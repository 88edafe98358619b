//! The panic boundary: every exported body runs inside `catch_unwind`, so a
//! Rust panic becomes `MESHVPN_PANIC` (with the panic message as the
//! thread's last error) and never unwinds into C, which would be undefined
//! behaviour, or aborts the host.
//!
//! With `panic = "abort"` nothing could be caught, so the crate refuses to
//! build that way.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{self, meshvpn_result, Error};

#[cfg(panic = "abort")]
compile_error!("libmeshvpn's panic boundary needs panic = \"unwind\"");

/// Runs an exported body that reports through `Result`: `Ok` becomes
/// `MESHVPN_OK`, `Err` records its message and returns its code, and a
/// panic becomes `MESHVPN_PANIC`.
///
/// `AssertUnwindSafe`: after a caught panic, the objects the body touched
/// may be half-updated. They are all behind locks that do not poison
/// (parking_lot) or atomics, so later calls see a consistent, if possibly
/// unexpected, state; none of them can cause memory unsafety.
pub(crate) fn catch(f: impl FnOnce() -> Result<(), Error>) -> meshvpn_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => meshvpn_result::MESHVPN_OK,
        Ok(Err(e)) => error::record(e),
        Err(payload) => error::record(Error::new(
            meshvpn_result::MESHVPN_PANIC,
            panic_message(payload.as_ref()),
        )),
    }
}

/// Runs an exported body that returns a plain value; a panic yields
/// `on_panic`.
pub(crate) fn catch_value<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// `ffi_boundary! {{ body }}`: the body of every exported function that
/// returns `meshvpn_result`. The body evaluates to `Result<(), Error>` and
/// may use `?`.
macro_rules! ffi_boundary {
    ($($body:tt)*) => {
        $crate::panic::catch(move || -> ::std::result::Result<(), $crate::error::Error> {
            $($body)*
        })
    };
}
