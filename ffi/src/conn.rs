//! `meshvpn_conn`: a TCP connection through a `meshvpn_netstack`.
//!
//! A conn is created unconnected (`meshvpn_conn_new`) and then dialed
//! (`meshvpn_conn_dial`), like `socket()` and `connect()`, so that another
//! thread holding the handle can abandon a dial in progress by closing it;
//! `meshvpn_listener_accept` hands out connected ones.
//!
//! Thread safety, for every function here: a conn may be used from any
//! number of threads at once (one reading while another writes, a third
//! closing); `meshvpn_conn_close` and `meshvpn_conn_free` wake the others'
//! blocked calls with `MESHVPN_CLOSED`. Reads from two threads at once
//! each get some of the bytes, in no defined split.

use std::ffi::c_char;
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::meshvpn_engine::netstack::{Direction, Interrupter, NetstackError, TcpStream};
use parking_lot::Mutex;

use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::netstack::{self, lookup as netstack_lookup, meshvpn_netstack, timed, NetstackHandle};
use crate::ptr::{self, Out};
use crate::timeout::{self, meshvpn_timeout_ms};

/// A TCP connection. Opaque: created by `meshvpn_conn_new` or
/// `meshvpn_listener_accept`, released by `meshvpn_conn_free`. The value
/// is a handle, not a pointer to memory: never dereference it.
pub struct meshvpn_conn {
    _private: [u8; 0],
}

pub(crate) struct Conn {
    netstack: Option<Arc<NetstackHandle>>,
    interrupter: Interrupter,
    stream: Mutex<Option<Arc<TcpStream>>>,
    dialing: AtomicBool,
    closed: AtomicBool,
}

static CONNS: HandleTable<meshvpn_conn, Conn> = HandleTable::new(tag::CONN);

fn lookup(conn: *const meshvpn_conn) -> Result<Arc<Conn>> {
    CONNS.lookup(conn)
}

impl Handled for Conn {
    const NAME: &'static str = "meshvpn_conn";

    fn close(&self) {
        Conn::close(self);
    }
}

fn closed() -> Error {
    Error::new(meshvpn_result::MESHVPN_CLOSED, "the connection was closed")
}

impl Conn {
    /// The connected stream, or why there is none.
    fn stream(&self) -> Result<Arc<TcpStream>> {
        if self.closed.load(SeqCst) {
            return Err(closed());
        }
        self.stream.lock().clone().ok_or_else(|| {
            Error::new(
                meshvpn_result::MESHVPN_NOT_CONNECTED,
                "dial the connection first",
            )
        })
    }

    fn close(&self) {
        self.closed.store(true, SeqCst);
        if let Some(s) = self.stream.lock().as_ref() {
            s.close();
        }
        // Wakes a dial in progress.
        self.interrupter.interrupt();
    }

    /// Runs a read or write on the stream with `timeout_ms`. A call that a
    /// close woke reports `MESHVPN_CLOSED`, whatever the stream said.
    fn transfer(
        &self,
        timeout_ms: meshvpn_timeout_ms,
        f: impl FnOnce(&TcpStream, Option<Duration>) -> std::result::Result<usize, NetstackError>,
    ) -> Result<usize> {
        let stream = self.stream()?;
        let limit = timeout::limit(timeout_ms);
        timed(Instant::now(), limit, f(&stream, limit)).map_err(|e| {
            if self.closed.load(SeqCst) {
                closed()
            } else {
                e
            }
        })
    }

    fn dial(&self, remote: SocketAddr, timeout_ms: meshvpn_timeout_ms) -> Result<()> {
        let ns = self
            .netstack
            .as_ref()
            .ok_or_else(|| Error::invalid("an accepted connection is connected already"))?;
        if self.closed.load(SeqCst) {
            return Err(closed());
        }
        if self.stream.lock().is_some() || self.dialing.swap(true, SeqCst) {
            return Err(Error::invalid(
                "the connection is connected or dialing already",
            ));
        }
        let start = Instant::now();
        let limit = timeout::limit(timeout_ms);
        let r = ns.stack.tcp_connect_with(remote, limit, &self.interrupter);
        self.dialing.store(false, SeqCst);
        if self.closed.load(SeqCst) {
            return Err(closed());
        }
        let stream = timed(start, limit, r)?;
        let mut slot = self.stream.lock();
        // `close` sets the flag before it takes the slot's lock.
        if self.closed.load(SeqCst) {
            stream.close();
            return Err(closed());
        }
        *slot = Some(Arc::new(stream));
        Ok(())
    }
}

/// Wraps an accepted stream in a new handle.
pub(crate) fn insert_accepted(stream: TcpStream) -> Result<*mut meshvpn_conn> {
    let conn = Conn {
        netstack: None,
        interrupter: stream.interrupter(),
        stream: Mutex::new(Some(Arc::new(stream))),
        dialing: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    };
    CONNS.insert(Arc::new(conn))
}

/// Creates an unconnected TCP connection on `netstack`; connect it with
/// `meshvpn_conn_dial`. On success `*out_conn` receives a handle the
/// caller owns and must release with `meshvpn_conn_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_new(
    netstack: *mut meshvpn_netstack,
    out_conn: *mut *mut meshvpn_conn,
) -> meshvpn_result {
    ffi_boundary! {{
        let ns = netstack_lookup(netstack)?;
        let out = Out::new(out_conn, "out_conn")?;
        let conn = Conn {
            netstack: Some(ns),
            interrupter: Interrupter::new(),
            stream: Mutex::new(None),
            dialing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        };
        out.write(CONNS.insert(Arc::new(conn))?);
        Ok(())
    }}
}

/// Connects to `addr` (`"10.0.0.2:80"`, `"[fd00::2]:80"`), waiting up to
/// `timeout_ms` (`MESHVPN_WAIT_FOREVER`: no limit) for the handshake. A conn is dialed
/// once.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (bad address, port 0, dialed already),
/// `MESHVPN_CONNECTION_REFUSED` (nothing listens there),
/// `MESHVPN_UNREACHABLE` (no peer routes the address, or it has no
/// endpoint), `MESHVPN_NO_ADDRESS` (the stack has no address of that
/// family), `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED` (woken by
/// `meshvpn_conn_interrupt`), `MESHVPN_CLOSED` (closed from another
/// thread, or the stack or engine closed), `MESHVPN_SOCKET_LIMIT`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_dial(
    conn: *mut meshvpn_conn,
    addr: *const c_char,
    timeout_ms: meshvpn_timeout_ms,
) -> meshvpn_result {
    ffi_boundary! {{
        let c = lookup(conn)?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let remote = unsafe { netstack::socket_addr(addr, "addr") }?;
        c.dial(remote, timeout_ms)
    }}
}

/// Reads up to `len` bytes into `buf`, waiting up to `timeout_ms`
/// (`MESHVPN_WAIT_FOREVER`: no limit; 0: only what has arrived) for at
/// least one, and writes how many into `*out_n`. `*out_n == 0` with `MESHVPN_OK` is the
/// end of the stream (the peer sent FIN).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (`len` 0 or impossible), `MESHVPN_TIMEOUT`,
/// `MESHVPN_INTERRUPTED`, `MESHVPN_CLOSED`, `MESHVPN_CONNECTION_RESET`,
/// `MESHVPN_NOT_CONNECTED`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_read(
    conn: *mut meshvpn_conn,
    buf: *mut u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let c = lookup(conn)?;
        let out = Out::new(out_n, "out_n")?;
        if len == 0 {
            return Err(Error::invalid("len 0: a read of nothing cannot tell the end of the stream"));
        }
        // SAFETY: the caller promises `len` writable bytes at `buf`.
        let buf = unsafe { ptr::try_slice_mut(buf, len, "buf") }?;
        let n = c.transfer(timeout_ms, |s, limit| s.read_timeout(buf, limit))?;
        out.write(n);
        Ok(())
    }}
}

/// Queues up to `len` bytes of `buf` to send, waiting up to `timeout_ms`
/// for room in the send buffer, and writes how many were queued (at least
/// one, unless `len` is 0) into `*out_n`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED`,
/// `MESHVPN_CLOSED` (also after `meshvpn_conn_shutdown_write`),
/// `MESHVPN_CONNECTION_RESET`, `MESHVPN_NOT_CONNECTED`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_write(
    conn: *mut meshvpn_conn,
    buf: *const u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let c = lookup(conn)?;
        let out = Out::new(out_n, "out_n")?;
        // SAFETY: the caller promises `len` readable bytes at `buf`.
        let buf = unsafe { ptr::try_slice(buf, len, "buf") }?;
        let n = c.transfer(timeout_ms, |s, limit| s.write_timeout(buf, limit))?;
        out.write(n);
        Ok(())
    }}
}

/// Writes into `*out_read_fd` and `*out_write_fd` two new file
/// descriptors (close-on-exec, non-blocking eventfds) that the caller owns
/// and must close, for waiting on the connection in an event loop instead
/// of in a blocking call. Call `meshvpn_conn_read` or `meshvpn_conn_write`
/// with timeout 0; when it returns `MESHVPN_TIMEOUT`, poll that
/// direction's descriptor for `POLLIN`, then call again. Never read the
/// descriptors: the next call that finds nothing to do resets its
/// direction's. A descriptor becomes readable only after such a call, when
/// the connection may have changed (bytes arrived, room to send, the peer
/// closed, an error, a close or interrupt); wakeups may be spurious. Each
/// call returns new descriptors of the same two eventfds, which live until
/// the last one is closed.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_NOT_CONNECTED`, `MESHVPN_UNSUPPORTED` (not
/// Linux), `MESHVPN_INVALID_ARGUMENT` (an eventfd could not be made, for
/// instance no file descriptors left; the message says why).
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_wait_fds(
    conn: *mut meshvpn_conn,
    out_read_fd: *mut i32,
    out_write_fd: *mut i32,
) -> meshvpn_result {
    ffi_boundary! {{
        let stream = lookup(conn)?.stream()?;
        let out_read = Out::new(out_read_fd, "out_read_fd")?;
        let out_write = Out::new(out_write_fd, "out_write_fd")?;
        // Neither is written unless both were made.
        let read = stream.ready_fd(Direction::Read).map_err(Error::eventfd)?;
        let write = stream.ready_fd(Direction::Write).map_err(Error::eventfd)?;
        out_read.write(read.into_raw_fd());
        out_write.write(write.into_raw_fd());
        Ok(())
    }}
}

/// Sends FIN after the bytes already written; reading goes on until the
/// peer's FIN. Idempotent.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_NOT_CONNECTED`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub extern "C" fn meshvpn_conn_shutdown_write(conn: *mut meshvpn_conn) -> meshvpn_result {
    ffi_boundary! {{
        Ok(lookup(conn)?.stream()?.shutdown_write()?)
    }}
}

/// Wakes the calls blocked on the conn (dial, read, write) without
/// closing it: they return `MESHVPN_INTERRUPTED`, and so does the next
/// call that starts after it (once; it may be spurious: treat it as "look
/// at the deadline again"). For callers whose deadline changed while a
/// call waited, like Go's `SetDeadline`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub extern "C" fn meshvpn_conn_interrupt(conn: *mut meshvpn_conn) -> meshvpn_result {
    ffi_boundary! {{
        lookup(conn)?.interrupter.interrupt();
        Ok(())
    }}
}

/// Closes the connection: bytes already written and a FIN still go out
/// (for at most the stack's `close_linger_ms`), calls blocked on it wake
/// with `MESHVPN_CLOSED`, and later calls fail with `MESHVPN_CLOSED`. The
/// handle stays valid until `meshvpn_conn_free`. Idempotent.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub extern "C" fn meshvpn_conn_close(conn: *mut meshvpn_conn) -> meshvpn_result {
    ffi_boundary! {{
        CONNS.close(conn)
    }}
}

/// Closes the connection (as `meshvpn_conn_close`) and releases the
/// handle; every copy of it is dead afterwards (`MESHVPN_INVALID_HANDLE`,
/// so a double free is reported). Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (from the log
/// callback).
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub extern "C" fn meshvpn_conn_free(conn: *mut meshvpn_conn) -> meshvpn_result {
    ffi_boundary! {{
        CONNS.free(conn)
    }}
}

/// One of the stream's addresses, as text, for C.
///
/// # Safety
/// A non-NULL `buf` has `buf_len` writable bytes.
unsafe fn conn_addr(
    conn: *const meshvpn_conn,
    which: fn(&TcpStream) -> SocketAddr,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let addr = which(&*lookup(conn)?.stream()?);
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { netstack::write_addr(addr, buf, buf_len, out_len) }
    }}
}

/// Writes the local address (`"10.0.0.1:49153"`) into `buf`, following the
/// buffer protocol of `meshvpn_result_message` (`MESHVPN_ADDR_MAX` bytes
/// suffice).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CLOSED`, `MESHVPN_NOT_CONNECTED`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_local_addr(
    conn: *const meshvpn_conn,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    // SAFETY: forwarded promise.
    unsafe { conn_addr(conn, TcpStream::local_addr, buf, buf_len, out_len) }
}

/// Writes the remote address into `buf`; as `meshvpn_conn_local_addr`.
///
/// Errors: as `meshvpn_conn_local_addr`.
///
/// Thread safety: safe from any thread at any time, concurrently with
/// any other call on the same conn (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_conn_peer_addr(
    conn: *const meshvpn_conn,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    // SAFETY: forwarded promise.
    unsafe { conn_addr(conn, TcpStream::peer_addr, buf, buf_len, out_len) }
}
