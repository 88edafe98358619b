//! Syscalls: UDP sockets, TUN devices, unix sockets.
//!
//! `unsafe` (denied crate-wide) is allowed only on the items that make raw
//! syscalls: `tun` (ioctl, fcntl), `unix` (umask), `eventfd` and [`poll`]; every block
//! says why it is sound. `udp` goes through socket2 and quinn-udp, `accept`
//! and `dial` through std, and `offload` is pure logic over the `wire` views.

pub mod accept;
pub mod dial;
#[allow(unsafe_code)]
pub mod eventfd;
pub mod offload;
#[allow(unsafe_code)]
pub mod tun;
pub mod udp;
#[allow(unsafe_code)]
pub mod unix;

/// True for the errors a read with a timeout returns when nothing came
/// (or a signal cut it short): retry, they are not failures.
pub fn is_retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// poll(2) one fd for `events` with a timeout; true when ready.
#[allow(unsafe_code)]
pub fn poll(
    fd: std::os::fd::RawFd,
    events: libc::c_short,
    timeout: std::time::Duration,
) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid, initialised pollfd and a count of 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if rc > 0
        && pfd.revents & events == 0
        && pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "descriptor closed or in error",
        ));
    }
    Ok(rc > 0)
}
