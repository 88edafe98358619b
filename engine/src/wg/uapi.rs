//! The UAPI on a running engine: a parsed `set` applied with wireguard-go's
//! meaning, a `get` produced from the live state, and the unix-socket
//! server that `wg` and `wg-quick` talk to.
//!
//! ```text
//!   wg --connect--> /var/run/wireguard/IFNAME.sock (0600)
//!        accept thread (polls a stop flag) --> one thread per connection,
//!        at most MAX_CONNECTIONS, each request at most MAX_REQUEST_BYTES
//!          "get=1\n\n"         -> Engine::uapi_get -> "<lines>errno=0\n\n"
//!          "set=1\n<lines>\n"  -> Engine::uapi_set -> "errno=N\n\n"
//!          "get=meshvpn-paths\n\n" -> Engine::uapi_paths (each peer's path
//!                              and NAT candidates, for `meshvpn status`)
//!        every read and write waits at most POLL at a time, so a stop is
//!        seen within POLL; a reply the client does not take within
//!        UAPI_WRITE_TIMEOUT ends its connection
//! ```
//!
//! A `set` is parsed whole before anything changes, so a malformed request
//! changes nothing; a request that fails while being applied (a port in
//! use) keeps the changes before the failing line, as in wireguard-go.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::{Engine, EngineError, PeerUpdate};
use crate::config::uapi::{
    errno, parse_set, GetReply, InterfaceChange, PeerChange, PeerReply, PeerSet, SetRequest,
    UapiError,
};
use crate::config::PublicKey;

/// Where wireguard-go and `wg` put and look for interface sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";
/// Largest `set` accepted on the socket: a million allowed IPs fit.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Longest single line; a key line is under 80 bytes.
const MAX_LINE_BYTES: usize = 4096;
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection silent for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// A reply the client has not read within this long ends its connection,
/// so a client that asks and stops reading holds a connection slot (and
/// the reply's memory, about 120 bytes a peer) no longer than this.
/// wireguard-go ends a connection on a failed write too; it needs no
/// deadline because it never waits for its connection handlers, where
/// [`UapiServer::close`] joins ours.
pub const UAPI_WRITE_TIMEOUT: Duration = IDLE_TIMEOUT;
/// How long [`UapiServer::close`] takes at most, whatever the clients do
/// (a client that stops reading a reply included): every thread looks at
/// the stop flag at least every 200 ms, between and within reads and
/// writes. The one wait it does not cut short is a `set` already being
/// applied, which finishes so that no request is left half done.
pub const UAPI_CLOSE_WITHIN: Duration = Duration::from_secs(1);

impl Engine {
    /// The `get=1` reply: `key=value` lines, without the closing `errno=0`
    /// line. Carries the private key: never log it.
    pub fn uapi_get(&self) -> String {
        let _tx = self.uapi_lock();
        let peers = self
            .peer_snapshot()
            .into_iter()
            .map(|(cfg, stats)| PeerReply {
                public_key: cfg.public_key,
                preshared_key: cfg.preshared_key,
                endpoint: cfg.endpoint,
                last_handshake: stats
                    .last_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok()),
                tx_bytes: stats.tx_bytes,
                rx_bytes: stats.rx_bytes,
                persistent_keepalive: cfg.persistent_keepalive.unwrap_or(0),
                allowed_ips: cfg.allowed_ips,
            })
            .collect();
        GetReply {
            private_key: self.private_key(),
            listen_port: self.listen_port(),
            fwmark: self.fwmark().unwrap_or(0),
            peers,
        }
        .to_text()
    }

    /// Applies a `set=1` request: its `key=value` lines, optionally
    /// preceded by the `set=1` line and followed by the blank line.
    pub fn uapi_set(&self, text: &str) -> Result<(), UapiError> {
        let request = parse_set(text)?;
        self.uapi_apply(&request)
    }

    /// Applies a parsed `set` request, in order.
    pub fn uapi_apply(&self, request: &SetRequest) -> Result<(), UapiError> {
        let _tx = self.uapi_lock();
        if self.is_closed() {
            return Err(UapiError::Closed);
        }
        for (line, change) in &request.interface {
            let (line, result) = match change {
                InterfaceChange::PrivateKey(k) => {
                    self.set_private_key(k.clone());
                    (*line, Ok(()))
                }
                InterfaceChange::ListenPort(p) => (*line, self.set_listen_port(*p).map(|_| ())),
                InterfaceChange::Fwmark(m) => (*line, self.set_fwmark(Some(*m))),
                InterfaceChange::ReplacePeers => {
                    self.clear_peers();
                    (*line, Ok(()))
                }
            };
            result.map_err(|e| rejected(line, interface_key(change), e))?;
        }
        let own = self.public_key();
        for peer in &request.peers {
            self.apply_peer(peer, own.as_ref())?;
        }
        Ok(())
    }

    fn apply_peer(&self, set: &PeerSet, own: Option<&PublicKey>) -> Result<(), UapiError> {
        // A block for our own key is parsed and ignored (wireguard-go's
        // "dummy" peer), as is one for a missing peer under update_only
        // and anything after `remove`.
        let mut ignored = own == Some(&set.public_key);
        let exists = self.peer_stats(&set.public_key).is_some();
        let mut update = PeerUpdate::default();
        for (_, change) in &set.changes {
            match change {
                PeerChange::UpdateOnly => ignored |= !exists,
                PeerChange::Remove => {
                    if !ignored {
                        self.remove_peer(&set.public_key);
                    }
                    ignored = true;
                }
                PeerChange::PresharedKey(k) => update.preshared_key = Some(k.clone()),
                PeerChange::Endpoint(e) => update.endpoint = Some(*e),
                PeerChange::PersistentKeepalive(k) => update.persistent_keepalive = Some(Some(*k)),
                PeerChange::ReplaceAllowedIps => {
                    update.replace_allowed_ips = true;
                    update.allowed_ips.clear();
                }
                PeerChange::AllowedIp(p) => update.allowed_ips.push(*p),
                PeerChange::ProtocolVersion => {}
            }
        }
        if ignored {
            return Ok(());
        }
        self.update_peer(&set.public_key, &update, true)
            .map_err(|e| rejected(set.line, "public_key", e))
    }
}

fn interface_key(change: &InterfaceChange) -> &'static str {
    match change {
        InterfaceChange::PrivateKey(_) => "private_key",
        InterfaceChange::ListenPort(_) => "listen_port",
        InterfaceChange::Fwmark(_) => "fwmark",
        InterfaceChange::ReplacePeers => "replace_peers",
    }
}

fn rejected(line: usize, key: &str, e: EngineError) -> UapiError {
    let errno = match &e {
        EngineError::Closed => return UapiError::Closed,
        EngineError::Bind { .. } => errno::EADDRINUSE,
        EngineError::LowOrderKey(_) | EngineError::OwnKey(_) | EngineError::NoSuchPeer(_) => {
            errno::EINVAL
        }
        EngineError::Thread(_) => errno::EIO,
    };
    UapiError::Rejected {
        line,
        key: key.to_string(),
        message: e.to_string(),
        errno,
    }
}

/// The UAPI socket of one engine. Dropping it stops its threads and
/// removes the socket file.
pub struct UapiServer {
    path: PathBuf,
    /// (device, inode) of the socket we bound, so that we never remove a
    /// socket a later process put at the same path.
    file_id: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UapiServer {
    /// `/var/run/wireguard/IFNAME.sock`.
    pub fn socket_path(ifname: &str) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{ifname}.sock"))
    }

    /// Serves `engine` at [`UapiServer::socket_path`] of `ifname`.
    pub fn start(engine: Arc<Engine>, ifname: &str) -> io::Result<UapiServer> {
        UapiServer::start_at(engine, &UapiServer::socket_path(ifname))
    }

    /// Serves `engine` at `path`, creating its directory (mode 0755) if
    /// needed. A stale socket left by a dead process is replaced; a live
    /// one is an `AddrInUse` error.
    pub fn start_at(engine: Arc<Engine>, path: &Path) -> io::Result<UapiServer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        let listener = match crate::io::unix::bind_owner_only(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is in use: another process serves this interface",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path)?;
                crate::io::unix::bind_owner_only(path)?
            }
            Err(e) => return Err(e),
        };
        let meta = std::fs::metadata(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("meshvpn-uapi".into())
                .spawn(move || accept_loop(listener, engine, stop))?
        };
        Ok(UapiServer {
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends open connections (a reply being written is
    /// cut off) and removes the socket file; returns within
    /// [`UAPI_CLOSE_WITHIN`], plus the time to finish a `set` already being
    /// applied. Idempotent.
    pub fn close(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(listener: UnixListener, engine: Arc<Engine>, stop: Arc<AtomicBool>) {
    use std::os::fd::AsRawFd;
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Relaxed) {
        match crate::io::poll(listener.as_raw_fd(), libc::POLLIN, POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(error = %e, "UAPI socket failed; no longer serving");
                break;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "UAPI accept failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        connections.retain(|t| !t.is_finished());
        if connections.len() >= MAX_CONNECTIONS {
            tracing::warn!("UAPI: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        }
        let engine = engine.clone();
        let stop = stop.clone();
        match std::thread::Builder::new()
            .name("meshvpn-uapi-conn".into())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, &engine, &stop) {
                    tracing::debug!(error = %e, "UAPI connection closed");
                }
            }) {
            Ok(t) => connections.push(t),
            Err(e) => tracing::warn!(error = %e, "UAPI: cannot start a connection thread"),
        }
    }
    for t in connections {
        let _ = t.join();
    }
}

/// Serves requests on one connection until the client closes it, goes
/// quiet, or sends something that is not a request.
fn serve_connection(stream: UnixStream, engine: &Engine, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(POLL))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        if !read_line(&mut reader, &mut line, MAX_LINE_BYTES, stop)? {
            return Ok(());
        }
        match line.as_slice() {
            b"get=1\n" => {
                line.clear();
                read_line(&mut reader, &mut line, MAX_LINE_BYTES, stop)?;
                if line != b"\n" {
                    write_reply(&mut writer, &format!("errno={}\n\n", errno::EPROTO), stop)?;
                    return Ok(());
                }
                let mut reply = engine.uapi_get();
                reply.push_str("errno=0\n\n");
                write_reply(&mut writer, &reply, stop)?;
            }
            b"get=meshvpn-paths\n" => {
                line.clear();
                read_line(&mut reader, &mut line, MAX_LINE_BYTES, stop)?;
                if line != b"\n" {
                    write_reply(&mut writer, &format!("errno={}\n\n", errno::EPROTO), stop)?;
                    return Ok(());
                }
                let mut reply = engine.uapi_paths();
                reply.push_str("errno=0\n\n");
                write_reply(&mut writer, &reply, stop)?;
            }
            b"set=1\n" => {
                let mut request = std::mem::take(&mut line);
                let result = loop {
                    let start = request.len();
                    let more = read_line(&mut reader, &mut request, MAX_LINE_BYTES, stop)?;
                    if !more || &request[start..] == b"\n" {
                        break Ok(());
                    }
                    if request.len() > MAX_REQUEST_BYTES {
                        break Err(UapiError::TooLarge {
                            limit: MAX_REQUEST_BYTES,
                        });
                    }
                };
                let result = result.and_then(|()| match std::str::from_utf8(&request) {
                    Ok(text) => engine.uapi_set(text),
                    Err(e) => {
                        let good = &request[..e.valid_up_to()];
                        let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
                        Err(UapiError::Syntax { line })
                    }
                });
                let code = match &result {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI set refused");
                        e.errno()
                    }
                };
                write_reply(&mut writer, &format!("errno={code}\n\n"), stop)?;
                if matches!(result, Err(UapiError::TooLarge { .. })) {
                    // The rest of the request is still unread: no way to resync.
                    return Ok(());
                }
            }
            _ => {
                tracing::warn!("UAPI: not a get=1 or set=1 request; closing the connection");
                return Ok(());
            }
        }
    }
}

/// Writes all of `reply`; fails, which closes the connection, when the
/// client has not taken it within [`UAPI_WRITE_TIMEOUT`] or when `stop` is
/// raised (seen within one poll interval: each write waits at most that).
fn write_reply(w: &mut UnixStream, reply: &str, stop: &AtomicBool) -> io::Result<()> {
    let deadline = Instant::now() + UAPI_WRITE_TIMEOUT;
    let mut rest = reply.as_bytes();
    while !rest.is_empty() {
        if stop.load(Relaxed) || Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read its reply in time, or the server is stopping",
            ));
        }
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if crate::io::is_retryable(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends one line (through its `\n`) to `buf`. Returns false at end of
/// stream before any byte; fails on a line over `max`, on silence longer
/// than [`IDLE_TIMEOUT`], or when `stop` is raised.
fn read_line(
    r: &mut BufReader<UnixStream>,
    buf: &mut Vec<u8>,
    max: usize,
    stop: &AtomicBool,
) -> io::Result<bool> {
    let start = buf.len();
    let mut idle = Duration::ZERO;
    loop {
        let available = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if crate::io::is_retryable(&e) => {
                idle += POLL;
                if stop.load(Relaxed) || idle >= IDLE_TIMEOUT {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle or stopping"));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(buf.len() > start);
        }
        idle = Duration::ZERO;
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        buf.extend_from_slice(&available[..take]);
        r.consume(take);
        if buf.len() - start > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        if done {
            return Ok(true);
        }
    }
}
