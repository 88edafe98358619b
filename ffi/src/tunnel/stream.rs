//! `meshvpn_tunnel_stream`: one connection through a tunnel session, from
//! `meshvpn_tunnel_server_dial`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::meshvpn_engine::supervisor::TunnelStream;

use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::ptr::{self, Out};
use crate::timeout::{deadline, meshvpn_timeout_ms};

use meshvpn_result::*;

/// A stream through a tunnel, from `meshvpn_tunnel_server_dial`. Opaque:
/// released by `meshvpn_tunnel_stream_free`. A handle, never dereferenced.
pub struct meshvpn_tunnel_stream {
    _private: [u8; 0],
}

pub(super) struct StreamHandle {
    pub(super) stream: TunnelStream,
    /// Closed by `meshvpn_tunnel_stream_close` (or free): reads report
    /// `MESHVPN_TUNNEL_CLOSED` instead of end of stream.
    pub(super) closed: AtomicBool,
}

impl StreamHandle {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stream.close();
    }

    fn io_error(&self, e: &io::Error) -> Error {
        let code = if self.closed.load(Ordering::SeqCst) {
            MESHVPN_TUNNEL_CLOSED
        } else {
            stream_code(e)
        };
        Error::new(code, e.to_string())
    }
}

pub(super) static STREAMS: HandleTable<meshvpn_tunnel_stream, StreamHandle> =
    HandleTable::new(tag::TUNNEL_STREAM);

impl Handled for StreamHandle {
    const NAME: &'static str = "meshvpn_tunnel_stream";

    fn close(&self) {
        StreamHandle::close(self);
    }
}

fn lookup_stream(handle: *const meshvpn_tunnel_stream) -> Result<Arc<StreamHandle>> {
    STREAMS.lookup(handle)
}

/// A stream for reading or writing: not closed on this side.
fn lookup_open_stream(handle: *const meshvpn_tunnel_stream) -> Result<Arc<StreamHandle>> {
    let s = lookup_stream(handle)?;
    if s.closed.load(Ordering::SeqCst) {
        return Err(Error::new(MESHVPN_TUNNEL_CLOSED, "the stream was closed"));
    }
    Ok(s)
}

/// Reads up to `len` bytes into `buf`, waiting up to `timeout_ms` for data
/// (0: do not wait; `MESHVPN_WAIT_FOREVER`: no deadline). On success
/// `*out_n` receives the count; 0 means the far side closed the stream
/// cleanly (end of stream), or `len` was 0.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (impossible `len`), `MESHVPN_TIMEOUT`,
/// `MESHVPN_INTERRUPTED` (`meshvpn_tunnel_stream_interrupt`),
/// `MESHVPN_TUNNEL_CLOSED` (closed on this side, also while waiting),
/// `MESHVPN_TUNNEL_REFUSED` (the agent refused the target),
/// `MESHVPN_TUNNEL_RESET` (the far side failed it or the tunnel went down).
///
/// Thread safety: safe to call from any thread; one reader and one writer
/// may run at once, and close or free from a third thread wakes both.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_stream_read(
    stream: *mut meshvpn_tunnel_stream,
    buf: *mut u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_n, "out_n")?;
        // SAFETY: the caller promises `buf` has `len` writable bytes.
        let buf = unsafe { ptr::try_slice_mut(buf, len, "buf") }?;
        let s = lookup_open_stream(stream)?;
        let n = s.stream.read_until(buf, deadline(timeout_ms)).map_err(|e| s.io_error(&e))?;
        if n == 0 && !buf.is_empty() && s.closed.load(Ordering::SeqCst) {
            return Err(Error::new(MESHVPN_TUNNEL_CLOSED, "the stream was closed while reading"));
        }
        out.write(n);
        Ok(())
    }}
}

/// Writes up to `len` bytes of `buf`, waiting up to `timeout_ms` while the
/// far side has paused the stream or its queue is full; on success `*out_n`
/// receives how many were taken (at least 1 unless `len` is 0; call again
/// for the rest).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED`,
/// `MESHVPN_TUNNEL_CLOSED` (closed or shut down for writing on this
/// side), `MESHVPN_TUNNEL_REFUSED`, `MESHVPN_TUNNEL_RESET`.
///
/// Thread safety: as `meshvpn_tunnel_stream_read`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_stream_write(
    stream: *mut meshvpn_tunnel_stream,
    buf: *const u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_n, "out_n")?;
        // SAFETY: the caller promises `buf` has `len` readable bytes.
        let buf = unsafe { ptr::try_slice(buf, len, "buf") }?;
        let s = lookup_open_stream(stream)?;
        let n = s.stream.write_until(buf, deadline(timeout_ms)).map_err(|e| s.io_error(&e))?;
        out.write(n);
        Ok(())
    }}
}

/// Ends writing: data already written still goes out, then the far side
/// reads end of stream. The remotedialer protocol has no half-close, so
/// this ends the stream in both directions: later reads return end of
/// stream (`*out_n` 0), later writes `MESHVPN_TUNNEL_CLOSED`.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_shutdown_write(
    stream: *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        lookup_stream(stream)?.stream.close();
        Ok(())
    }}
}

/// Wakes the reads and writes blocked on the stream without closing it:
/// they return `MESHVPN_INTERRUPTED`, and so does the next one that has to
/// wait (once; it may be spurious: treat it as "look at the deadline
/// again"). For callers whose deadline changed while a call waited, like
/// Go's `SetDeadline`; the same contract as `meshvpn_conn_interrupt`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread, concurrently with reads
/// and writes on the same stream.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_interrupt(
    stream: *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        lookup_stream(stream)?.stream.interrupt();
        Ok(())
    }}
}

/// Closes the stream (the far side reads end of stream after the data
/// already written) and wakes every read and write blocked on it, which
/// return `MESHVPN_TUNNEL_CLOSED`, as do later calls. The handle stays
/// valid until `meshvpn_tunnel_stream_free`. Closing twice does nothing.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread, concurrently with reads
/// and writes on the same stream.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_close(
    stream: *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        STREAMS.close(stream)
    }}
}

/// Closes the stream (as `meshvpn_tunnel_stream_close`) and releases it.
/// The handle and its copies are dead afterwards; calls blocked on it on
/// other threads return `MESHVPN_TUNNEL_CLOSED`. Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_free(stream: *mut meshvpn_tunnel_stream) -> meshvpn_result {
    ffi_boundary! {{
        STREAMS.free(stream)
    }}
}

/// The code for a failed read or write on a stream. The protocol carries
/// the far side's error as text; a refusal by the agent's policy reads
/// `connect not allowed` (this library) and a refused dial `... connection
/// refused` (this library and the Go one).
fn stream_code(e: &io::Error) -> meshvpn_result {
    match e.kind() {
        io::ErrorKind::TimedOut => MESHVPN_TIMEOUT,
        io::ErrorKind::Interrupted => MESHVPN_INTERRUPTED,
        io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected => MESHVPN_TUNNEL_CLOSED,
        _ => {
            let text = e.to_string().to_ascii_lowercase();
            if text.contains("connect not allowed") || text.contains("connection refused") {
                MESHVPN_TUNNEL_REFUSED
            } else {
                MESHVPN_TUNNEL_RESET
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_errors_are_classified() {
        let reset = |t: &str| io::Error::new(io::ErrorKind::ConnectionReset, t.to_owned());
        assert_eq!(
            stream_code(&reset("connect not allowed")),
            MESHVPN_TUNNEL_REFUSED
        );
        assert_eq!(
            stream_code(&reset("dial tcp 127.0.0.1:1: connect: connection refused")),
            MESHVPN_TUNNEL_REFUSED
        );
        assert_eq!(
            stream_code(&reset("tunnel disconnect")),
            MESHVPN_TUNNEL_RESET
        );
        assert_eq!(
            stream_code(&io::ErrorKind::TimedOut.into()),
            MESHVPN_TIMEOUT
        );
        assert_eq!(
            stream_code(&io::ErrorKind::Interrupted.into()),
            MESHVPN_INTERRUPTED
        );
        assert_eq!(
            stream_code(&io::ErrorKind::BrokenPipe.into()),
            MESHVPN_TUNNEL_CLOSED
        );
    }
}
