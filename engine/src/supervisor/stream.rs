//! A connection through the tunnel as a blocking byte stream.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, MutexGuard};

use super::driver::SessionShared;
use super::{ConnId, StreamError};

/// One connection through a tunnel session: `Read` + `Write` (also through
/// `&TunnelStream`, so one thread can read while another writes) and `close`.
///
/// Reads block until data arrives; `Ok(0)` means the peer closed cleanly
/// (or this side closed). Writes block while the peer has paused the
/// connection or its send queue is full. If the tunnel ends, both fail with
/// `ConnectionReset` and the reason. Dropping the stream closes it.
pub struct TunnelStream {
    session: Arc<SessionShared>,
    id: ConnId,
    signal: Arc<Condvar>,
    /// Interrupts so far, and one that no call starting after it has seen
    /// yet. Both change only under the session lock, which every wait
    /// holds while it checks them, so an interrupt cannot be lost.
    interrupts: AtomicU64,
    interrupt_pending: AtomicBool,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("client", &self.session.client_key)
            .field("conn", &self.id)
            .finish()
    }
}

fn to_io(e: StreamError) -> io::Error {
    match e {
        StreamError::Reset(text) => io::Error::new(io::ErrorKind::ConnectionReset, text),
        StreamError::Closed => io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"),
        StreamError::Unknown => {
            io::Error::new(io::ErrorKind::NotConnected, "tunnel stream unknown")
        }
        StreamError::WouldBlock => io::ErrorKind::WouldBlock.into(),
    }
}

impl TunnelStream {
    /// Registers a handle for `id`; the caller holds the session lock.
    pub(crate) fn register(
        session: &Arc<SessionShared>,
        inner: &mut super::driver::Inner,
        id: ConnId,
    ) -> Self {
        let signal = Arc::new(Condvar::new());
        inner.signals.insert(id, signal.clone());
        Self {
            session: session.clone(),
            id,
            signal,
            interrupts: AtomicU64::new(0),
            interrupt_pending: AtomicBool::new(false),
        }
    }

    /// The connection id on the wire.
    pub fn id(&self) -> i64 {
        self.id.0
    }

    /// The client key of the session this stream runs over.
    pub fn client_key(&self) -> &str {
        &self.session.client_key
    }

    /// Closes both directions. Data already written still reaches the peer,
    /// then it reads end of stream (`error: None`) or an error with that text.
    pub fn close_with(&self, error: Option<&str>) {
        let mut inner = self.session.lock();
        inner.core.close(self.id, error);
        self.signal.notify_all();
        self.session.after_op(&mut inner);
    }

    /// Closes both directions cleanly (the peer reads EOF).
    pub fn close(&self) {
        self.close_with(None);
    }

    /// Wakes the reads and writes blocked on the stream without closing
    /// it: they fail with `ErrorKind::Interrupted`, and so does the next one
    /// that has to wait (once; it may be spurious: treat it as "look at the
    /// deadline again"). For callers whose deadline changed while a call
    /// waited, like Go's `SetDeadline`; the same contract as the userspace
    /// stack's `Interrupter`.
    pub fn interrupt(&self) {
        let _inner = self.session.lock();
        self.interrupts.fetch_add(1, SeqCst);
        self.interrupt_pending.store(true, SeqCst);
        self.signal.notify_all();
    }

    /// Sleeps until this stream's signal or `deadline` (`None`: no
    /// deadline), or an interrupt later than `seen` (what `interrupts`
    /// read when the call began) or still pending.
    fn wait(
        &self,
        inner: &mut MutexGuard<'_, super::driver::Inner>,
        deadline: Option<Instant>,
        seen: u64,
    ) -> io::Result<()> {
        if self.interrupts.load(SeqCst) != seen || self.interrupt_pending.swap(false, SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "tunnel stream call interrupted",
            ));
        }
        match deadline {
            None => self.signal.wait(inner),
            Some(d) => {
                if Instant::now() >= d || self.signal.wait_until(inner, d).timed_out() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "tunnel stream deadline passed",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `Read::read` that fails with `TimedOut` once `deadline` passes with
    /// nothing to read (`None` waits as long as it takes).
    pub fn read_until(&self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        self.read_inner(buf, deadline)
    }

    /// `Write::write` that fails with `TimedOut` once `deadline` passes
    /// without room to write (`None` waits as long as it takes).
    pub fn write_until(&self, buf: &[u8], deadline: Option<Instant>) -> io::Result<usize> {
        self.write_inner(buf, deadline)
    }

    fn read_inner(&self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut inner = self.session.lock();
        let seen = self.interrupts.load(SeqCst);
        loop {
            match inner.core.recv(self.id, buf) {
                Ok(n) => {
                    self.session.after_op(&mut inner);
                    return Ok(n);
                }
                Err(StreamError::WouldBlock) => self.wait(&mut inner, deadline, seen)?,
                // Closed here: reading after our own close is end of stream.
                Err(StreamError::Closed) => return Ok(0),
                Err(e) => return Err(to_io(e)),
            }
        }
    }

    fn write_inner(&self, buf: &[u8], deadline: Option<Instant>) -> io::Result<usize> {
        let mut inner = self.session.lock();
        let seen = self.interrupts.load(SeqCst);
        loop {
            match inner.core.send(self.id, buf) {
                Ok(n) => {
                    self.session.after_op(&mut inner);
                    return Ok(n);
                }
                Err(StreamError::WouldBlock) => self.wait(&mut inner, deadline, seen)?,
                Err(e) => return Err(to_io(e)),
            }
        }
    }
}

impl Read for &TunnelStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf, None)
    }
}

impl Write for &TunnelStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf, None)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for TunnelStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf, None)
    }
}

impl Write for TunnelStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf, None)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let mut inner = self.session.lock();
        inner.signals.remove(&self.id);
        inner.core.release(self.id);
        self.session.after_op(&mut inner);
    }
}
