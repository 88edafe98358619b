//! Unix-domain sockets for local control (the UAPI socket).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Private directories tried before giving up (another process may hold a
/// name we picked).
const PRIVATE_DIR_ATTEMPTS: u32 = 16;

/// Binds a listening socket at `path` (mode 0600) that only its owner can
/// connect to, not even for a moment between bind and chmod, without
/// touching the process-wide umask: safe to call from any thread, at any
/// time, concurrently. Fails with `AddrInUse` when anything already exists
/// at `path`, as bind(2) does; an existing file is never replaced.
///
/// How: the socket is bound inside a fresh 0700 directory next to `path`,
/// where no one else can reach it, set to 0600, hard-linked to `path`
/// (link(2) fails rather than replace what is there, unlike rename(2)),
/// and the directory removed. The listener's own address
/// (`local_addr`) therefore names the removed directory; clients connect
/// at `path`.
///
/// Why not the umask: wireguard-go narrows it to 077 around listen in
/// `ipc.UAPIOpen`, which is sound only because it runs once at startup
/// before anything else creates files; in a library the umask is shared
/// with every thread of the host process, and two binds at once can leave
/// it at 077 for good. Why not fchmod(2) before bind(2): Linux does apply
/// the socket inode's mode to the new path (unix_bind masks it with the
/// umask), but that is kernel behaviour no man page promises, whereas the
/// private directory relies only on path permission checks.
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = private_dir(parent)?;
    let result = bind_in(&private, path);
    let _ = std::fs::remove_dir(&private);
    result
}

fn bind_in(private: &Path, path: &Path) -> io::Result<UnixListener> {
    let inner = private.join("s");
    let listener = UnixListener::bind(&inner)?;
    let linked = std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::hard_link(&inner, path));
    let _ = std::fs::remove_file(&inner);
    match linked {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
        }
        Err(e) => Err(e),
    }
}

/// A new directory in `parent` that only we can enter (mode 0700; a umask
/// can only narrow it).
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut last = None;
    for _ in 0..PRIVATE_DIR_ATTEMPTS {
        // Short, so that the socket path inside still fits sun_path
        // wherever `path` itself does.
        let dir = parent.join(format!(
            ".{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()))
}
