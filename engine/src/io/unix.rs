//! Unix-domain sockets for local control (the UAPI socket).

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a listening socket at `path` that only its owner can connect to.
/// The umask is narrowed around bind(2), as wireguard-go does, so the
/// socket is never connectable by others, not even between bind and a
/// later chmod. The umask is process-wide: this briefly narrows it for
/// files other threads create at the same moment too (never widens it).
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask(2) only swaps a process attribute and cannot fail.
    let old = unsafe { libc::umask(0o077) };
    let result = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    result
}
