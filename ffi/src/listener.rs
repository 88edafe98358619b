//! `meshvpn_listener`: a TCP listening port on a `meshvpn_netstack`.
//!
//! Thread safety, for every function here: a listener may be used from any
//! number of threads at once; `meshvpn_listener_close` and
//! `meshvpn_listener_free` wake blocked accepts with `MESHVPN_CLOSED`.

use std::ffi::c_char;
use std::sync::Arc;
use std::time::Instant;

use ::meshvpn_engine::netstack::TcpListener;

use crate::conn::{insert_accepted, meshvpn_conn};
use crate::error::{meshvpn_result, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::netstack::{self, lookup as netstack_lookup, meshvpn_netstack, timed};
use crate::ptr::Out;
use crate::timeout::{self, meshvpn_timeout_ms};

/// A TCP listener. Opaque: created by `meshvpn_listener_new`, released by
/// `meshvpn_listener_free`. The value is a handle, not a pointer to
/// memory: never dereference it.
pub struct meshvpn_listener {
    _private: [u8; 0],
}

static LISTENERS: HandleTable<meshvpn_listener, TcpListener> = HandleTable::new(tag::LISTENER);

fn lookup(listener: *const meshvpn_listener) -> Result<Arc<TcpListener>> {
    LISTENERS.lookup(listener)
}

impl Handled for TcpListener {
    const NAME: &'static str = "meshvpn_listener";

    fn close(&self) {
        TcpListener::close(self);
    }
}

/// Listens on `addr` (`"0.0.0.0:80"` or `"[::]:80"` for every address of
/// the stack, or one of its addresses; port 0 picks a free one, see
/// `meshvpn_listener_local_addr`). At most `backlog` (at least 1)
/// connections wait to be accepted; further SYNs are ignored and their
/// dialers retry. On success `*out_listener` receives a handle the caller
/// owns and must release with `meshvpn_listener_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (bad address, backlog 0),
/// `MESHVPN_ADDRESS_IN_USE`, `MESHVPN_ADDRESS_NOT_AVAILABLE` (not an
/// address of the stack), `MESHVPN_CLOSED` (the stack closed).
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_listener_new(
    netstack: *mut meshvpn_netstack,
    addr: *const c_char,
    backlog: u32,
    out_listener: *mut *mut meshvpn_listener,
) -> meshvpn_result {
    ffi_boundary! {{
        let ns = netstack_lookup(netstack)?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let local = unsafe { netstack::socket_addr(addr, "addr") }?;
        let out = Out::new(out_listener, "out_listener")?;
        let l = ns.stack.tcp_listen(local, backlog as usize)?;
        out.write(LISTENERS.insert(Arc::new(l))?);
        Ok(())
    }}
}

/// Waits up to `timeout_ms` (`MESHVPN_WAIT_FOREVER`: no limit; 0: only a
/// connection that is ready) for the next established connection; on success
/// `*out_conn` receives a connected `meshvpn_conn` the caller owns and
/// must release with `meshvpn_conn_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_TIMEOUT`, `MESHVPN_CLOSED` (the listener, its stack or its
/// engine closed, also while waiting).
///
/// Thread safety: safe from any thread; accepts may run concurrently, each
/// connection goes to one of them.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_listener_accept(
    listener: *mut meshvpn_listener,
    timeout_ms: meshvpn_timeout_ms,
    out_conn: *mut *mut meshvpn_conn,
) -> meshvpn_result {
    ffi_boundary! {{
        let l = lookup(listener)?;
        let out = Out::new(out_conn, "out_conn")?;
        let limit = timeout::limit(timeout_ms);
        let (stream, _) = timed(Instant::now(), limit, l.accept_timeout(limit))?;
        out.write(insert_accepted(stream)?);
        Ok(())
    }}
}

/// Writes the listening address into `buf` (buffer protocol of
/// `meshvpn_result_message`; `MESHVPN_ADDR_MAX` bytes suffice).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_listener_local_addr(
    listener: *const meshvpn_listener,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let addr = lookup(listener)?.local_addr();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { netstack::write_addr(addr, buf, buf_len, out_len) }
    }}
}

/// Stops listening: connections not yet accepted are reset, blocked
/// accepts wake with `MESHVPN_CLOSED`, later ones fail with it. The handle
/// stays valid until `meshvpn_listener_free`. Idempotent.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread, concurrently with accepts.
#[no_mangle]
pub extern "C" fn meshvpn_listener_close(listener: *mut meshvpn_listener) -> meshvpn_result {
    ffi_boundary! {{
        LISTENERS.close(listener)
    }}
}

/// Closes the listener (as `meshvpn_listener_close`) and releases the
/// handle; copies of it are dead afterwards (`MESHVPN_INVALID_HANDLE`).
/// Accepted connections live on. Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (from the log
/// callback).
///
/// Thread safety: safe from any thread, concurrently with accepts.
#[no_mangle]
pub extern "C" fn meshvpn_listener_free(listener: *mut meshvpn_listener) -> meshvpn_result {
    ffi_boundary! {{
        LISTENERS.free(listener)
    }}
}
