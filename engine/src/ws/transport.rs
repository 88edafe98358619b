//! The byte pipe under the websocket: a TCP socket, optionally wrapped in TLS.
//!
//! During the handshakes (TLS, then HTTP upgrade) the socket is blocking with
//! an overall deadline, so a client that never finishes costs one bounded wait.
//! Afterwards it is non-blocking and driven by the session's I/O thread.
//! Reading and writing TLS are kept independent (a write that cannot proceed
//! never stops a read), which a plain `rustls::StreamOwned` does not promise.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Instant;

/// A TCP stream with an optional deadline for every blocking read and write.
#[derive(Debug)]
pub(crate) struct Socket {
    pub(crate) tcp: TcpStream,
    deadline: Option<Instant>,
    /// Bytes the kernel took so far: a session's write progress.
    written: u64,
}

impl Socket {
    pub(crate) fn with_deadline(tcp: TcpStream, deadline: Instant) -> Self {
        Self {
            tcp,
            deadline: Some(deadline),
            written: 0,
        }
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
        self.tcp.as_raw_fd()
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
