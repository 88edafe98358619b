//! The byte pipe under the websocket: a TCP socket, optionally wrapped in TLS.
//!
//! During the handshakes (TLS, then HTTP upgrade) the socket is blocking with
//! an overall deadline, so a client that never finishes costs one bounded wait.
//! Afterwards it is non-blocking and driven by the session's I/O thread.
//! Reading and writing TLS are kept independent (a write that cannot proceed
//! never stops a read), which a plain `rustls::StreamOwned` does not promise.

use std::io::{self, Cursor, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The stream socket under a transport: TCP, or a connection a host
/// program accepted itself (its own HTTPS router, TLS ended there) and
/// handed over as one end of a socketpair, or as its TCP socket
/// ([`crate::supervisor::upgrade::HostedRoute`]).
#[derive(Debug)]
pub enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.set_read_timeout(t),
            HostStream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.set_write_timeout(t),
            HostStream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.set_nonblocking(on),
            HostStream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// A second handle on the same socket (a `dup`), e.g. to shut it down
    /// from another thread.
    pub(crate) fn try_clone(&self) -> io::Result<HostStream> {
        Ok(match self {
            HostStream::Tcp(s) => HostStream::Tcp(s.try_clone()?),
            HostStream::Unix(s) => HostStream::Unix(s.try_clone()?),
        })
    }

    /// Ends both directions (best effort: callers ignore the result).
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.shutdown(Shutdown::Both),
            HostStream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// The TCP peer's address; a socketpair has none (the host program
    /// says whom it serves).
    pub(crate) fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            HostStream::Tcp(s) => s.peer_addr(),
            HostStream::Unix(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a host program's socket has no peer address",
            )),
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream socket with an optional deadline for every blocking read and
/// write.
#[derive(Debug)]
pub(crate) struct Socket {
    pub(crate) tcp: HostStream,
    deadline: Option<Instant>,
    /// Bytes the kernel took so far: a session's write progress.
    written: u64,
    /// A request head the host program read already: reads return it
    /// first, and nothing after it until [`Socket::end_head`] (a head cut
    /// short must fail the handshake, not wait on the socket).
    head: Option<Cursor<Vec<u8>>>,
}

impl Socket {
    pub(crate) fn with_deadline(tcp: TcpStream, deadline: Instant) -> Self {
        Self {
            tcp: HostStream::Tcp(tcp),
            deadline: Some(deadline),
            written: 0,
            head: None,
        }
    }

    /// A host program's connection whose request head it read already.
    pub(crate) fn hosted(stream: HostStream, deadline: Instant, head: Vec<u8>) -> Self {
        Self {
            tcp: stream,
            deadline: Some(deadline),
            written: 0,
            head: Some(Cursor::new(head)),
        }
    }

    /// The host's request head was read: reads come from the socket now.
    pub(crate) fn end_head(&mut self) {
        self.head = None;
    }

    /// Bytes written to the socket so far.
    pub(crate) fn bytes_written(&self) -> u64 {
        self.written
    }

    fn remaining(&self) -> io::Result<Option<std::time::Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake deadline passed",
                    ))
                } else {
                    Ok(Some(left))
                }
            }
        }
    }

    /// Leaves handshake mode: non-blocking, no deadline.
    pub(crate) fn enter_session_mode(&mut self) -> io::Result<()> {
        self.deadline = None;
        self.tcp.set_read_timeout(None)?;
        self.tcp.set_write_timeout(None)?;
        self.tcp.set_nonblocking(true)
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.tcp.raw_fd()
    }
}

fn deadline_error(e: io::Error, had_deadline: bool) -> io::Error {
    // SO_RCVTIMEO expiry shows up as EAGAIN; in handshake mode that is the deadline.
    if had_deadline
        && matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    {
        io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed")
    } else {
        e
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(head) = &mut self.head {
            let n = head.read(buf)?;
            if n == 0 && !buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the request head ended before its blank line",
                ));
            }
            return Ok(n);
        }
        let left = self.remaining()?;
        if left.is_some() {
            self.tcp.set_read_timeout(left)?;
        }
        self.tcp
            .read(buf)
            .map_err(|e| deadline_error(e, left.is_some()))
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        if left.is_some() {
            self.tcp.set_write_timeout(left)?;
        }
        let n = self
            .tcp
            .write(buf)
            .map_err(|e| deadline_error(e, left.is_some()))?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// TCP, or TLS over TCP.
#[derive(Debug)]
pub(crate) struct Transport {
    pub(crate) sock: Socket,
    pub(crate) tls: Option<rustls::Connection>,
}

impl Transport {
    pub(crate) fn plain(sock: Socket) -> Self {
        Self { sock, tls: None }
    }

    /// Runs the TLS handshake to completion (blocking, bounded by the socket's deadline).
    pub(crate) fn tls(mut sock: Socket, mut conn: rustls::Connection) -> io::Result<Self> {
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        Ok(Self {
            sock,
            tls: Some(conn),
        })
    }

    /// The leaf certificate the peer presented (server side: the client certificate).
    pub(crate) fn peer_leaf_certificate(&self) -> Option<&[u8]> {
        let certs = self.tls.as_ref()?.peer_certificates()?;
        certs.first().map(|c| c.as_ref())
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.sock.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let n = tls.read_tls(&mut self.sock)?;
            tls.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if n == 0 {
                return match tls.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed TCP without TLS close_notify",
                    )),
                    other => other,
                };
            }
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.sock.write(buf);
        };
        // Ciphertext already made goes first, so what TLS holds stays bounded
        // by its buffer limit.
        while tls.wants_write() {
            tls.write_tls(&mut self.sock)?;
        }
        let n = tls.writer().write(buf)?;
        while tls.wants_write() {
            match tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                tls.write_tls(&mut self.sock)?;
            }
        }
        Ok(())
    }
}
