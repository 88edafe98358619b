//! An eventfd: a counter the kernel reports readable while it is not zero,
//! so that a thread or an event loop (epoll, Go's netpoller) can sleep on
//! something that is not a socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One eventfd, close-on-exec and non-blocking.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    #[cfg(target_os = "linux")]
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn new() -> io::Result<EventFd> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "eventfd exists only on Linux",
        ))
    }

    /// Makes it readable (adds one to the counter). A full counter
    /// (`EAGAIN`) is readable already, so errors are ignored.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Makes it unreadable again (reads the counter back to zero); a
    /// counter already at zero (`EAGAIN`) is fine.
    pub fn drain(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from a descriptor
        // we own.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }

    /// A second descriptor of the same eventfd (close-on-exec), for a
    /// caller that owns and closes its copy.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn readable(fd: RawFd) -> bool {
        super::super::poll(fd, libc::POLLIN, Duration::ZERO).unwrap()
    }

    #[test]
    fn signal_makes_it_readable_and_drain_clears_it_for_every_copy() {
        let e = EventFd::new().unwrap();
        let copy = e.try_clone_fd().unwrap();
        assert!(!readable(e.as_raw_fd()));
        e.signal();
        e.signal();
        assert!(readable(e.as_raw_fd()));
        assert!(readable(copy.as_raw_fd()), "the copy is the same eventfd");
        e.drain();
        assert!(!readable(copy.as_raw_fd()), "one drain clears every signal");
        e.drain();
        assert!(!readable(e.as_raw_fd()));
        drop(e);
        assert!(
            !readable(copy.as_raw_fd()),
            "the copy outlives the original"
        );
    }
}
