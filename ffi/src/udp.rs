//! `meshvpn_udp`: a UDP socket on a `meshvpn_netstack`.
//!
//! Thread safety, for every function here: a socket may be used from any
//! number of threads at once; `meshvpn_udp_close` and `meshvpn_udp_free`
//! wake blocked calls with `MESHVPN_CLOSED`.

use std::ffi::c_char;
use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::time::Instant;

use ::meshvpn_engine::netstack::{Direction, UdpSocket};

use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::netstack::{self, lookup as netstack_lookup, meshvpn_netstack, timed, MESHVPN_ADDR_MAX};
use crate::ptr::{self, Out};
use crate::timeout::{self, meshvpn_timeout_ms};

/// A UDP socket, unconnected (`meshvpn_udp_send_to`, `meshvpn_udp_recv_from`)
/// or connected to one remote (`meshvpn_udp_connect`, then
/// `meshvpn_udp_send` and `meshvpn_udp_recv`, which also report ICMP
/// errors). Opaque: created by `meshvpn_udp_bind`, released by
/// `meshvpn_udp_free`. The value is a handle, not a pointer to memory:
/// never dereference it.
pub struct meshvpn_udp {
    _private: [u8; 0],
}

static UDPS: HandleTable<meshvpn_udp, UdpSocket> = HandleTable::new(tag::UDP);

fn lookup(udp: *const meshvpn_udp) -> Result<Arc<UdpSocket>> {
    UDPS.lookup(udp)
}

/// The socket's connected remote, or `MESHVPN_NOT_CONNECTED`.
fn remote(s: &UdpSocket) -> Result<std::net::SocketAddr> {
    s.peer_addr().ok_or_else(|| {
        Error::new(
            meshvpn_result::MESHVPN_NOT_CONNECTED,
            "the socket is not connected (meshvpn_udp_connect)",
        )
    })
}

impl Handled for UdpSocket {
    const NAME: &'static str = "meshvpn_udp";

    fn close(&self) {
        UdpSocket::close(self);
    }
}

/// Binds a UDP socket to `addr` (`"0.0.0.0:53"` for every address of the
/// stack, or one of its addresses; port 0 picks a free one). On success
/// `*out_udp` receives a handle the caller owns and must release with
/// `meshvpn_udp_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_ADDRESS_IN_USE`,
/// `MESHVPN_ADDRESS_NOT_AVAILABLE`, `MESHVPN_SOCKET_LIMIT`,
/// `MESHVPN_CLOSED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_bind(
    netstack: *mut meshvpn_netstack,
    addr: *const c_char,
    out_udp: *mut *mut meshvpn_udp,
) -> meshvpn_result {
    ffi_boundary! {{
        let ns = netstack_lookup(netstack)?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let local = unsafe { netstack::socket_addr(addr, "addr") }?;
        let out = Out::new(out_udp, "out_udp")?;
        let s = ns.stack.udp_bind(local)?;
        out.write(UDPS.insert(Arc::new(s))?);
        Ok(())
    }}
}

/// Sends `len` bytes of `buf` as one datagram to `addr`, waiting for room
/// in the socket's buffer if needed. `len` may be 0; at most the MTU less
/// the IP and UDP headers.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_MESSAGE_TOO_LARGE`,
/// `MESHVPN_UNREACHABLE`, `MESHVPN_NO_ADDRESS`, `MESHVPN_INTERRUPTED`,
/// `MESHVPN_CLOSED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_send_to(
    udp: *mut meshvpn_udp,
    buf: *const u8,
    len: usize,
    addr: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup(udp)?;
        // SAFETY: the caller promises `len` readable bytes at `buf`.
        let buf = unsafe { ptr::try_slice(buf, len, "buf") }?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let dst = unsafe { netstack::socket_addr(addr, "addr") }?;
        timed(Instant::now(), None, s.send_to(buf, dst))?;
        Ok(())
    }}
}

/// Waits up to `timeout_ms` (`MESHVPN_WAIT_FOREVER`: no limit; 0: only
/// what has arrived) for the next datagram, copies it into `buf` (a longer one is truncated
/// to `len`), writes its sender (`"10.0.0.2:53"`) into `from_buf` unless
/// that is NULL, and the number of bytes copied into `*out_n`. A non-NULL
/// `from_buf` must have `from_buf_len >= MESHVPN_ADDR_MAX`, checked before
/// anything is received.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_BUFFER_TOO_SMALL` (`from_buf_len`),
/// `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED`, `MESHVPN_CLOSED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_recv_from(
    udp: *mut meshvpn_udp,
    buf: *mut u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    from_buf: *mut c_char,
    from_buf_len: usize,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup(udp)?;
        let out = Out::new(out_n, "out_n")?;
        if !from_buf.is_null() && from_buf_len < MESHVPN_ADDR_MAX {
            return Err(Error::new(
                meshvpn_result::MESHVPN_BUFFER_TOO_SMALL,
                format!("from_buf needs MESHVPN_ADDR_MAX ({MESHVPN_ADDR_MAX}) bytes, it has {from_buf_len}"),
            ));
        }
        // SAFETY: the caller promises `len` writable bytes at `buf`.
        let buf = unsafe { ptr::try_slice_mut(buf, len, "buf") }?;
        let limit = timeout::limit(timeout_ms);
        let (n, from) = timed(Instant::now(), limit, s.recv_from_timeout(buf, limit))?;
        if !from_buf.is_null() {
            // SAFETY: `from_buf` has `from_buf_len` writable bytes, at
            // least MESHVPN_ADDR_MAX, which any address text fits.
            unsafe { ptr::copy_text(from_buf, from_buf_len, &from.to_string()) }?;
        }
        out.write(n);
        Ok(())
    }}
}

/// Connects the socket to `addr` (`"10.0.0.2:53"`), as `connect(2)` on a
/// UDP socket: from then on it receives only `addr`'s datagrams,
/// `meshvpn_udp_send` sends there, and an ICMP destination unreachable
/// about one of its datagrams (a closed port, or a packet filter's
/// administratively prohibited answer such as the engine's own for a
/// datagram its policy refuses) fails the next `meshvpn_udp_send` or
/// `meshvpn_udp_recv` once: `MESHVPN_CONNECTION_REFUSED` for port
/// unreachable or administratively prohibited, `MESHVPN_UNREACHABLE` for
/// net or host unreachable. Connecting again replaces the remote. An
/// unconnected socket ignores ICMP errors, as on Linux without
/// `IP_RECVERR`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (port 0), `MESHVPN_UNREACHABLE` (no peer
/// routes the address), `MESHVPN_ADDRESS_IN_USE` (another socket on the
/// same port is connected to `addr`), `MESHVPN_CLOSED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_connect(
    udp: *mut meshvpn_udp,
    addr: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup(udp)?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let remote = unsafe { netstack::socket_addr(addr, "addr") }?;
        s.connect(remote)?;
        Ok(())
    }}
}

/// Sends `len` bytes of `buf` as one datagram to the connected remote
/// (`meshvpn_udp_connect`), waiting for room in the socket's buffer if
/// needed. Limits as `meshvpn_udp_send_to`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_NOT_CONNECTED`, `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_MESSAGE_TOO_LARGE`,
/// `MESHVPN_CONNECTION_REFUSED` and `MESHVPN_UNREACHABLE` (an ICMP error
/// about an earlier datagram, see `meshvpn_udp_connect`; also no route),
/// `MESHVPN_NO_ADDRESS`, `MESHVPN_INTERRUPTED`, `MESHVPN_CLOSED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_send(
    udp: *mut meshvpn_udp,
    buf: *const u8,
    len: usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup(udp)?;
        // SAFETY: the caller promises `len` readable bytes at `buf`.
        let buf = unsafe { ptr::try_slice(buf, len, "buf") }?;
        remote(&s)?;
        timed(Instant::now(), None, s.send(buf))?;
        Ok(())
    }}
}

/// Waits up to `timeout_ms` (`MESHVPN_WAIT_FOREVER`: no limit; 0: only
/// what has arrived) for the next datagram from the connected remote
/// (`meshvpn_udp_connect`), copies it into `buf` (a longer one is
/// truncated to `len`) and writes the number of bytes copied into
/// `*out_n`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_NOT_CONNECTED`, `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_CONNECTION_REFUSED`
/// and `MESHVPN_UNREACHABLE` (an ICMP error about a datagram sent, see
/// `meshvpn_udp_connect`), `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED`,
/// `MESHVPN_CLOSED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_recv(
    udp: *mut meshvpn_udp,
    buf: *mut u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup(udp)?;
        let out = Out::new(out_n, "out_n")?;
        // SAFETY: the caller promises `len` writable bytes at `buf`.
        let buf = unsafe { ptr::try_slice_mut(buf, len, "buf") }?;
        remote(&s)?;
        let limit = timeout::limit(timeout_ms);
        let n = timed(Instant::now(), limit, s.recv_timeout(buf, limit))?;
        out.write(n);
        Ok(())
    }}
}

/// Writes the connected remote (`meshvpn_udp_connect`) into `buf` (buffer
/// protocol of `meshvpn_result_message`; `MESHVPN_ADDR_MAX` bytes
/// suffice).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_NOT_CONNECTED` (never connected), `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_peer_addr(
    udp: *const meshvpn_udp,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let addr = remote(&*lookup(udp)?)?;
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { netstack::write_addr(addr, buf, buf_len, out_len) }
    }}
}

/// Writes into `*out_fd` a new file descriptor (a close-on-exec,
/// non-blocking eventfd) that the caller owns and must close, for waiting
/// for datagrams in an event loop instead of in a blocking call: call
/// `meshvpn_udp_recv_from` (or `meshvpn_udp_recv`) with timeout 0, and when
/// it returns `MESHVPN_TIMEOUT`, poll the descriptor for `POLLIN`, then
/// call again. The rules are those of `meshvpn_conn_wait_fds`' read
/// descriptor.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_UNSUPPORTED` (not Linux),
/// `MESHVPN_INVALID_ARGUMENT` (an eventfd could not be made, for instance
/// no file descriptors left; the message says why).
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_wait_fd(
    udp: *mut meshvpn_udp,
    out_fd: *mut i32,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup(udp)?;
        let out = Out::new(out_fd, "out_fd")?;
        if s.is_closed() {
            return Err(Error::new(meshvpn_result::MESHVPN_CLOSED, "the socket was closed"));
        }
        let fd = s.ready_fd(Direction::Read).map_err(Error::eventfd)?;
        out.write(fd.into_raw_fd());
        Ok(())
    }}
}

/// Wakes the calls blocked on the socket without closing it: they return
/// `MESHVPN_INTERRUPTED`, and so does the next call that starts
/// after it (once; it may be spurious: treat it as "look at the deadline
/// again").
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub extern "C" fn meshvpn_udp_interrupt(udp: *mut meshvpn_udp) -> meshvpn_result {
    ffi_boundary! {{
        lookup(udp)?.interrupter().interrupt();
        Ok(())
    }}
}

/// Writes the bound address into `buf` (buffer protocol of
/// `meshvpn_result_message`; `MESHVPN_ADDR_MAX` bytes suffice). Once
/// connected, a socket bound to the unspecified address shows the source
/// address its datagrams carry, as `getsockname(2)` does on Linux.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_udp_local_addr(
    udp: *const meshvpn_udp,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let addr = lookup(udp)?.local_addr();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { netstack::write_addr(addr, buf, buf_len, out_len) }
    }}
}

/// Closes the socket: blocked calls wake with `MESHVPN_CLOSED`, later
/// calls fail with it; the port is free again. The handle stays valid
/// until `meshvpn_udp_free`. Idempotent.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread, concurrently with other calls.
#[no_mangle]
pub extern "C" fn meshvpn_udp_close(udp: *mut meshvpn_udp) -> meshvpn_result {
    ffi_boundary! {{
        UDPS.close(udp)
    }}
}

/// Closes the socket (as `meshvpn_udp_close`) and releases the handle;
/// copies of it are dead afterwards (`MESHVPN_INVALID_HANDLE`). Freeing
/// NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (from the log
/// callback).
///
/// Thread safety: safe from any thread, concurrently with other calls.
#[no_mangle]
pub extern "C" fn meshvpn_udp_free(udp: *mut meshvpn_udp) -> meshvpn_result {
    ffi_boundary! {{
        UDPS.free(udp)
    }}
}
