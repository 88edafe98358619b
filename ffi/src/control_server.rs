//! `meshvpn_control_server`: the mesh's control server (join keys, nodes,
//! routes, policy; see docs/control.md), embeddable in a host program such
//! as a k3s server.
//!
//! ```text
//!   new(config) ──┬─ attach(tunnel_server) ─ tunnel_server_start: one port serves
//!                 │                           the k3s tunnel, the relay and /v1-meshvpn/control
//!                 └─ config.listen: its own HTTPS listener
//!                 └─ serve_conn(fd, head, remote, exporter): a connection the host's own
//!                    HTTPS router accepted and hijacked (Go: ControlServer.Handler)
//!   admin: create_key (text shown once) / keys / revoke_key, nodes / remove_node,
//!          routes / approve_route, set_policy / get_policy
//!   close / free
//! ```
//!
//! Every change goes through `meshvpn_control::admin` or the store, as
//! `meshvpn control` does, then wakes the server so connected nodes get it
//! at once rather than at the next store poll. Listings are JSON (the
//! buffer protocol of `meshvpn_result_message`). A join key's text is
//! written once, to the caller's buffer, and wiped from the library's
//! memory; it is never logged.

use std::ffi::{c_char, c_int};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::meshvpn_control::admin::{self, AdminError};
use ::meshvpn_control::keys::{self, CreateError, KeyOptions};
use ::meshvpn_control::proto::EXPORTER_LABEL;
use ::meshvpn_control::routes::{cluster_name, Approver, RouteStatus};
use ::meshvpn_control::server::{ControlServer, ControlServerConfig};
use ::meshvpn_control::store::{SqliteStore, Store, StoreConfig, StoreError};
use ::meshvpn_control::{Policy, RouteError};
use ::meshvpn_engine::supervisor::upgrade::{HostStream, HostTls, HostedError, HostedRoute};
use ::meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer, K3S_PATH};
use ::meshvpn_engine::ws::tls;
use ::meshvpn_engine::IpPrefix;
use parking_lot::Mutex;
use serde_json::json;

use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::ptr::{self, Out};
use crate::tunnel::server::meshvpn_tunnel_server;
use crate::tunnel::tls_error;

use meshvpn_result::*;

/// A control server. Opaque: created by `meshvpn_control_server_new`,
/// released by `meshvpn_control_server_free`. A handle, never dereferenced.
pub struct meshvpn_control_server {
    _private: [u8; 0],
}

/// The bytes a buffer for `meshvpn_control_server_create_key` needs: the
/// key's text (`mvpn-key-<16 hex>-<64 hex>`) and its NUL.
pub const MESHVPN_JOIN_KEY_LEN: usize = 91;

/// How a control server keeps its state and whom it serves. Strings are
/// NUL-terminated and only read during `meshvpn_control_server_new`.
#[repr(C)]
pub struct meshvpn_control_server_config {
    /// The database file (SQLite), created 0600 when missing. Required.
    /// Several processes may open it at once (`meshvpn control ... --db`).
    pub db_path: *const c_char,
    /// The prefix new nodes get their IPv4 address from; NULL means
    /// `100.64.0.0/10`. Registered nodes keep theirs when it changes.
    pub ipv4_prefix: *const c_char,
    /// A policy (JSON, see docs/control.md) to set at creation when it
    /// differs from the stored one; NULL keeps the stored policy (none:
    /// allow-all). An invalid one fails the call, naming its line.
    pub policy: *const c_char,
    /// A file to read that policy from instead; at most one of `policy`
    /// and `policy_file`.
    pub policy_file: *const c_char,
    /// Milliseconds an ephemeral node stays after it disconnects; 0 means
    /// 30 minutes (headscale's default).
    pub ephemeral_timeout_ms: u32,
    /// Control sessions at once (one per node, each a thread and three
    /// open files); 0 means 4096. More are answered 503.
    pub max_sessions: u32,
    /// Control sessions at once from one source address; 0 means 64.
    pub max_sessions_per_source: u32,
    /// The relay nodes may use (`wss://HOST:PORT/v1-meshvpn/relay`), sent
    /// in every network map; NULL: none.
    pub relay_url: *const c_char,
    /// `"ADDRESS:PORT"` for a listener of its own (HTTPS, started by `new`,
    /// port 0 picks a free one; see `meshvpn_control_server_local_addr`);
    /// NULL: none, serve it through `meshvpn_control_server_attach`.
    pub listen: *const c_char,
    /// PEM: that listener's certificate chain and key; required with
    /// `listen`, ignored without.
    pub cert_pem: *const c_char,
    pub key_pem: *const c_char,
    /// That listener also serves the WireGuard relay (`/v1-meshvpn/relay`).
    pub relay: bool,
}

/// What `meshvpn_control_server_create_key` makes. Strings are
/// NUL-terminated and only read during the call.
#[repr(C)]
pub struct meshvpn_join_key_options {
    /// Usable by any number of nodes; otherwise single-use.
    pub reusable: bool,
    /// Nodes that join with it are removed after the ephemeral timeout
    /// once they disconnect.
    pub ephemeral: bool,
    /// Seconds it works for; 0: it never expires. At most 10 years.
    pub expiry_seconds: u64,
    /// Comma-separated tags for the nodes that join with it
    /// (`"tag:k3s,tag:east"`); NULL or empty: none.
    pub tags: *const c_char,
    /// The cluster of the nodes that join with it (`"k3s-east"`): routes of
    /// different clusters must not overlap. NULL: the unlabelled cluster.
    pub cluster: *const c_char,
}

struct Running {
    /// Connections the host program's own router hands over
    /// (`meshvpn_control_server_serve_conn`); dropped first, ending them.
    hosted: HostedRoute,
    store: Arc<SqliteStore>,
    control: ControlServer,
    /// Its own listener, with `config.listen`.
    listener: Option<TunnelServer>,
}

struct ControlHandle {
    running: Mutex<Option<Arc<Running>>>,
}

static CONTROLS: HandleTable<meshvpn_control_server, ControlHandle> =
    HandleTable::new(tag::CONTROL_SERVER);

impl Handled for ControlHandle {
    const NAME: &'static str = "meshvpn_control_server";

    fn close(&self) {
        // The last reference (a call in progress may hold one) stops the
        // listener, the watcher and every session.
        drop(self.running.lock().take());
    }
}

fn lookup(handle: *const meshvpn_control_server) -> Result<Arc<Running>> {
    CONTROLS
        .lookup(handle)?
        .running
        .lock()
        .clone()
        .ok_or_else(|| Error::new(MESHVPN_CLOSED, "the control server was closed"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn store_error(e: StoreError) -> Error {
    Error::new(MESHVPN_CONTROL_STORE, e.to_string())
}

fn admin_error(e: AdminError) -> Error {
    let code = match &e {
        AdminError::NoSuchNode(_) | AdminError::RemovedMeanwhile(_) => MESHVPN_CONTROL_NOT_FOUND,
        AdminError::BadPrefix(..) => MESHVPN_PREFIX_INVALID,
        AdminError::Policy(_) => MESHVPN_CONTROL_POLICY_INVALID,
        AdminError::Route(RouteError::Store(_)) | AdminError::Store(_) => MESHVPN_CONTROL_STORE,
        AdminError::Route(RouteError::StoredPolicy { .. }) => MESHVPN_CONTROL_POLICY_INVALID,
        AdminError::Route(_) => MESHVPN_CONTROL_ROUTE_REFUSED,
    };
    Error::new(code, e.to_string())
}

/// Reads the configuration, opens the store and sets the given policy.
///
/// # Safety
/// The pointers in `c` are valid as `meshvpn_control_server_config`
/// documents.
unsafe fn open(c: &meshvpn_control_server_config) -> Result<Running> {
    // SAFETY: the caller's promise about `c`'s strings (all of this block).
    let (db, prefix, policy, policy_file, relay_url, listen) = unsafe {
        (
            ptr::try_str(c.db_path, "config->db_path")?,
            ptr::try_opt_str(c.ipv4_prefix, "config->ipv4_prefix")?,
            ptr::try_opt_str(c.policy, "config->policy")?,
            ptr::try_opt_str(c.policy_file, "config->policy_file")?,
            ptr::try_opt_str(c.relay_url, "config->relay_url")?,
            ptr::try_opt_str(c.listen, "config->listen")?,
        )
    };
    let mut store_config = StoreConfig {
        create: true,
        ..Default::default()
    };
    if let Some(p) = prefix {
        store_config.ipv4_prefix = p
            .parse::<IpPrefix>()
            .map_err(|e| Error::new(MESHVPN_PREFIX_INVALID, format!("ipv4_prefix {p:?}: {e}")))?;
    }
    let policy = match (policy, policy_file) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid("give policy or policy_file, not both"));
        }
        (Some(text), None) => Some(text.to_owned()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| Error::invalid(format!("cannot read {file}: {e}")))?,
        ),
        (None, None) => None,
    };
    // Refused before the database is touched, naming the line.
    if let Some(text) = &policy {
        Policy::parse(text).map_err(|e| {
            Error::new(
                MESHVPN_CONTROL_POLICY_INVALID,
                format!("policy: {e}; nothing was stored"),
            )
        })?;
    }
    let listener = match listen {
        None => None,
        Some(addr) => {
            // SAFETY: the caller's promise about the PEM strings.
            let (cert, key) = unsafe {
                (
                    ptr::try_str(c.cert_pem, "config->cert_pem")?,
                    ptr::try_str(c.key_pem, "config->key_pem")?,
                )
            };
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| Error::invalid(format!("listen {addr:?} is not ADDRESS:PORT")))?;
            let tls = tls::server_config(cert.as_bytes(), key.as_bytes(), None, false)
                .map_err(tls_error)?;
            Some((addr, tls))
        }
    };
    let store = Arc::new(SqliteStore::open(Path::new(db), &store_config).map_err(store_error)?);
    if let Some(text) = policy {
        let stored = store.policy().map_err(store_error)?;
        if stored.is_none_or(|p| p.text != text) {
            admin::set_policy(&*store, &text, unix_now()).map_err(admin_error)?;
        }
    }
    let mut config = ControlServerConfig {
        relay_url: relay_url.map(str::to_owned),
        ..Default::default()
    };
    if c.ephemeral_timeout_ms != 0 {
        config.ephemeral_timeout = Duration::from_millis(c.ephemeral_timeout_ms.into());
    }
    if c.max_sessions != 0 {
        config.max_sessions = c.max_sessions as usize;
    }
    if c.max_sessions_per_source != 0 {
        config.max_sessions_per_source = c.max_sessions_per_source as usize;
    }
    let control = ControlServer::start(store.clone(), config)
        .map_err(|e| Error::new(MESHVPN_THREAD_FAILED, e.to_string()))?;
    let listener =
        match listener {
            None => None,
            Some((addr, tls)) => {
                // No agent credentials: the k3s path refuses everyone; this
                // port serves the control protocol (and the relay), as
                // `meshvpn control serve` does.
                let mut sc = ServerConfig::new(K3S_PATH, Some(tls), ServerAuth::default());
                sc.extra.push(control.route());
                if c.relay {
                    sc.relay = Some(Default::default());
                }
                Some(TunnelServer::bind(addr, sc).map_err(|e| {
                    Error::new(MESHVPN_TUNNEL_LISTEN_FAILED, format!("{addr}: {e}"))
                })?)
            }
        };
    Ok(Running {
        hosted: HostedRoute::new(control.route()),
        store,
        control,
        listener,
    })
}

/// Creates a control server from `config`: opens (or creates) its
/// database, sets the given policy, and starts watching the store; with
/// `config->listen` it also listens. On success `*out_server` receives a
/// handle the caller owns and must release with
/// `meshvpn_control_server_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_ARGUMENT` (a bad
/// listen address, both `policy` and `policy_file`, an unreadable policy
/// file), `MESHVPN_PREFIX_INVALID`, `MESHVPN_CONTROL_POLICY_INVALID` (the
/// message names the line and column), `MESHVPN_CONTROL_STORE` (the
/// database cannot be opened or written), `MESHVPN_TUNNEL_TLS`,
/// `MESHVPN_TUNNEL_LISTEN_FAILED`, `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_new(
    config: *const meshvpn_control_server_config,
    out_server: *mut *mut meshvpn_control_server,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        let out = Out::new(out_server, "out_server")?;
        // SAFETY: the config's pointers are valid as its doc says.
        let running = unsafe { open(c) }?;
        let handle = Arc::new(ControlHandle {
            running: Mutex::new(Some(Arc::new(running))),
        });
        out.write(CONTROLS.insert(handle)?);
        Ok(())
    }}
}

/// Serves the control protocol (`/v1-meshvpn/control`) on `tunnel`'s
/// listener from its next `meshvpn_tunnel_server_start` on, next to the
/// k3s tunnel and the relay, under the listener's handshake caps. Call it
/// before starting the tunnel server (or stop it first). The tunnel server
/// keeps serving the path after the control server is closed, refusing
/// every node, until it is stopped.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_CLOSED`,
/// `MESHVPN_INVALID_ARGUMENT` (the tunnel server is running, or serves a
/// control server already).
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_control_server_attach(
    server: *mut meshvpn_control_server,
    tunnel: *mut meshvpn_tunnel_server,
) -> meshvpn_result {
    ffi_boundary! {{
        let r = lookup(server)?;
        crate::tunnel::server::add_route(tunnel, r.control.route())
    }}
}

/// The bytes of the TLS exporter value `meshvpn_control_server_serve_conn`
/// takes.
pub const MESHVPN_CONTROL_EXPORTER_LEN: usize = 32;

/// Takes `fd` as the library's own: an open stream socket (a socketpair
/// end, or a TCP socket). Anything else is refused, and an open `fd` is
/// closed all the same.
fn own_stream_socket(fd: c_int) -> Result<HostStream> {
    if fd < 0 {
        return Err(Error::invalid(format!("fd {fd} is not a descriptor")));
    }
    // SAFETY: F_GETFD reads the descriptor's flags and touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::invalid(format!("fd {fd} is not open")));
    }
    // SAFETY: `fd` is open (checked above) and the caller hands it over
    // (the function's contract): from here it has one owner, this value.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let option = |name: c_int| -> Option<c_int> {
        let mut value: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live locals of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    if option(libc::SO_TYPE) != Some(libc::SOCK_STREAM) {
        return Err(Error::invalid(format!("fd {fd} is not a stream socket")));
    }
    match option(libc::SO_DOMAIN) {
        Some(libc::AF_UNIX) => Ok(HostStream::Unix(UnixStream::from(owned))),
        Some(libc::AF_INET | libc::AF_INET6) => Ok(HostStream::Tcp(TcpStream::from(owned))),
        _ => Err(Error::invalid(format!(
            "fd {fd} is neither a Unix nor a TCP socket"
        ))),
    }
}

/// Serves one control connection that the host program's own HTTPS router
/// accepted (k3s serves its tunnel on its own router; see docs/control.md,
/// "Embedding in k3s"): the host ended TLS, read the request head and
/// hijacked the connection; it hands over `fd`, one end of a socketpair
/// (`AF_UNIX`, `SOCK_STREAM`; a TCP socket works too), copies bytes
/// between the other end and the client's connection (first any bytes it
/// read past the head), and closes both when either side ends.
///
/// - `fd`: owned by the library from this call on, on every path: closed
///   at once on an error, when the session ends otherwise.
/// - `request_head`, `request_head_len`: the request line and headers
///   through the blank line (`\r\n\r\n`, nothing after it), at most 64 KiB:
///   a websocket upgrade (`GET /v1-meshvpn/control HTTP/1.1`, with
///   `Upgrade`, `Connection`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version`).
/// - `remote_addr`: the client's `"ADDRESS:PORT"` as the host saw it (Go's
///   `r.RemoteAddr`): the session caps count it as the source, and the
///   server offers it to the other nodes as an endpoint of the node.
/// - `tls_exporter`: `MESHVPN_CONTROL_EXPORTER_LEN` bytes, the client's TLS
///   session's exporter value (RFC 8446 section 7.5; Go's
///   `ConnectionState.ExportKeyingMaterial`) for the label
///   `EXPORTER-meshvpn-control-v1` with no context: nodes bind their key
///   proof to the TLS session they see, which the host ended.
///
/// The websocket handshake runs on the calling thread (it does not wait on
/// the client: the head is complete), then the session runs on a thread
/// of its own, exactly as on the library's own listener, under the same
/// caps (`max_sessions`, `max_sessions_per_source`, and the listener's
/// handshake caps); the call returns at once. Every refusal is answered
/// on `fd` (503 over a cap or after close, 404 on another path) before it
/// is closed, so the host only relays it; a head the websocket handshake
/// cannot read is closed without an answer.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_INVALID_ARGUMENT` (a bad descriptor, not a
/// stream socket, a bad `remote_addr`), `MESHVPN_TUNNEL_HANDSHAKE` (not a
/// websocket upgrade for `/v1-meshvpn/control`, or a head cut short or too
/// long), `MESHVPN_TUNNEL_LIMIT` (over a cap), `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread, concurrently.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_serve_conn(
    server: *mut meshvpn_control_server,
    fd: c_int,
    request_head: *const u8,
    request_head_len: usize,
    remote_addr: *const c_char,
    tls_exporter: *const u8,
) -> meshvpn_result {
    ffi_boundary! {{
        // First, so that every later error closes it.
        let stream = own_stream_socket(fd)?;
        // SAFETY: the caller passes `request_head_len` readable bytes, a
        // NUL-terminated string and `MESHVPN_CONTROL_EXPORTER_LEN`
        // readable bytes (or NULLs, refused here).
        let (head, remote, exporter) = unsafe {
            (
                ptr::try_slice(request_head, request_head_len, "request_head")?,
                ptr::try_str(remote_addr, "remote_addr")?,
                ptr::try_slice(tls_exporter, MESHVPN_CONTROL_EXPORTER_LEN, "tls_exporter")?,
            )
        };
        if head.is_empty() {
            return Err(Error::null("request_head"));
        }
        let peer: SocketAddr = remote.parse().map_err(|_| {
            Error::invalid(format!("remote_addr {remote:?} is not ADDRESS:PORT"))
        })?;
        let mut value = [0u8; MESHVPN_CONTROL_EXPORTER_LEN];
        value.copy_from_slice(exporter);
        let tls = HostTls {
            label: EXPORTER_LABEL.to_vec(),
            exporter: value,
        };
        let r = lookup(server)?;
        r.hosted
            .serve(stream, head.to_vec(), peer, tls)
            .map_err(|e| match e {
                HostedError::Busy(_) => Error::new(MESHVPN_TUNNEL_LIMIT, e.to_string()),
                HostedError::BadRequest(_) => Error::new(MESHVPN_TUNNEL_HANDSHAKE, e.to_string()),
                HostedError::Stopped => Error::new(MESHVPN_CLOSED, e.to_string()),
                HostedError::Io(_) => Error::new(MESHVPN_THREAD_FAILED, e.to_string()),
            })
    }}
}

/// Writes the address of the server's own listener (`config->listen`) into
/// `buf`, following the buffer protocol of `meshvpn_result_message`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`,
/// `MESHVPN_TUNNEL_NOT_RUNNING` (created without `listen`).
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_local_addr(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let l = r.listener.as_ref().ok_or_else(|| {
            Error::new(MESHVPN_TUNNEL_NOT_RUNNING, "created without config->listen")
        })?;
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &l.local_addr().to_string()) }
    }}
}

/// Creates a join key and writes its text (`mvpn-key-...`) into `buf`,
/// which must hold `MESHVPN_JOIN_KEY_LEN` bytes: the text is shown only
/// now (the database keeps its hash), so the size is checked before the key
/// is made. `*out_len` receives the text's length.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL` (nothing created),
/// `MESHVPN_INVALID_ARGUMENT` (a bad tag or cluster name, an expiry over
/// 10 years), `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_create_key(
    server: *mut meshvpn_control_server,
    options: *const meshvpn_join_key_options,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes valid options or NULL.
        let o = unsafe { ptr::try_ref(options, "options") }?;
        let out_len = Out::new(out_len, "out_len")?;
        if buf.is_null() {
            return Err(Error::null("buf"));
        }
        if buf_len < MESHVPN_JOIN_KEY_LEN {
            return Err(Error::new(
                MESHVPN_BUFFER_TOO_SMALL,
                format!("a join key needs {MESHVPN_JOIN_KEY_LEN} bytes, the buffer has {buf_len}; no key was created"),
            ));
        }
        // SAFETY: the caller's promise about the options' strings.
        let (tags, cluster) = unsafe {
            (
                ptr::try_opt_str(o.tags, "options->tags")?,
                ptr::try_opt_str(o.cluster, "options->cluster")?,
            )
        };
        let opts = KeyOptions {
            reusable: o.reusable,
            ephemeral: o.ephemeral,
            expiry: (o.expiry_seconds != 0).then(|| Duration::from_secs(o.expiry_seconds)),
            tags: tags
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            cluster: cluster.map(str::to_owned),
        };
        let r = lookup(server)?;
        let key = keys::create(&*r.store, &opts, unix_now(), &ring::rand::SystemRandom::new())
            .map_err(|e| match e {
                CreateError::Store(e) => store_error(e),
                CreateError::Random => Error::new(MESHVPN_THREAD_FAILED, e.to_string()),
                e => Error::invalid(e.to_string()),
            })?;
        // `key.text` is wiped when it drops; only the caller gets a copy.
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, key.text.as_str()) }
    }}
}

/// Writes the join keys as a JSON array into `buf` (the buffer protocol of
/// `meshvpn_result_message`): each `{"id", "state"` (`valid`, `expired`,
/// `revoked`, `used`)`, "uses", "created", "expires"` (Unix seconds or
/// null)`, "reusable", "ephemeral", "tags", "cluster"}`. No secrets: the
/// database has none.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_keys(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let now = unix_now();
        let list: Vec<_> = r
            .store
            .list_keys()
            .map_err(store_error)?
            .into_iter()
            .map(|k| {
                json!({
                    "id": k.id,
                    "state": k.state(now).to_string(),
                    "uses": k.uses,
                    "created": k.created,
                    "expires": k.expires,
                    "revoked": k.revoked,
                    "reusable": k.reusable,
                    "ephemeral": k.ephemeral,
                    "tags": k.tags,
                    "cluster": k.cluster,
                })
            })
            .collect();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &serde_json::Value::from(list).to_string()) }
    }}
}

/// Revokes the join key `key` (its id, or its whole text); nodes that
/// joined with it stay.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_CONTROL_NOT_FOUND`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_revoke_key(
    server: *mut meshvpn_control_server,
    key: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let key = unsafe { ptr::try_str(key, "key") }?;
        // Only the id is kept (and named in messages), never the secret.
        let id = match keys::parse(key) {
            Ok(parsed) => parsed.id,
            Err(_) => key.trim().to_string(),
        };
        let r = lookup(server)?;
        if !r.store.revoke_key(&id, unix_now()).map_err(store_error)? {
            return Err(Error::new(MESHVPN_CONTROL_NOT_FOUND, format!("no join key {id}")));
        }
        r.control.poke();
        Ok(())
    }}
}

/// Writes the nodes as a JSON array into `buf` (the buffer protocol of
/// `meshvpn_result_message`): each `{"id", "name", "ipv4", "ipv6",
/// "public_key"` (base64)`, "tags", "cluster", "ephemeral", "online"`
/// (a session with this server now)`, "offline_since"` (Unix seconds or
/// null)`, "seen"` (`"ADDRESS:PORT"` its session comes from, as the listener
/// or the host program saw it, offered to the other nodes as an endpoint;
/// null when offline)`, "endpoints"` (the UDP endpoints it reported)`}`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_nodes(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let online = r.control.connected();
        let seen = r.control.seen();
        let list: Vec<_> = r
            .store
            .list_nodes()
            .map_err(store_error)?
            .into_iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "name": n.name,
                    "ipv4": n.ipv4.to_string(),
                    "ipv6": n.ipv6.to_string(),
                    "public_key": n.public_key.to_base64(),
                    "tags": n.tags,
                    "cluster": n.cluster,
                    "ephemeral": n.ephemeral,
                    "online": online.binary_search(&n.id).is_ok(),
                    "offline_since": n.offline_since,
                    "seen": seen.get(&n.id).map(|(s, _)| s.to_string()),
                    "endpoints": seen
                        .get(&n.id)
                        .map(|(_, e)| e.iter().map(ToString::to_string).collect::<Vec<_>>())
                        .unwrap_or_default(),
                })
            })
            .collect();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &serde_json::Value::from(list).to_string()) }
    }}
}

/// Removes the node `node` (its id, name or base64 public key) with its
/// routes: its session is told and closed, its key is refused from now
/// on, and connected nodes drop it as a peer. Routes it blocked in other
/// clusters are re-examined.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_CONTROL_NOT_FOUND`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_remove_node(
    server: *mut meshvpn_control_server,
    node: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let node = unsafe { ptr::try_str(node, "node") }?;
        let r = lookup(server)?;
        let removed = admin::remove_node(&*r.store, node, unix_now()).map_err(admin_error)?;
        if let Err(e) = removed.freed {
            // The removal stands; the server's next pass catches up.
            tracing::warn!(error = %e, "control: routes not re-examined after a removal");
        }
        r.control.poke();
        Ok(())
    }}
}

/// Writes the advertised routes as a JSON array into `buf` (the buffer
/// protocol of `meshvpn_result_message`): each `{"node_id", "node",
/// "cluster", "prefix", "status"` (`approved`, `pending`, `refused`)`,
/// "approved_by"` (`policy`, `operator` or null)`, "role"` (an approved
/// route's part in its prefix: `primary`, the one the network map gives
/// the prefix to, or `standby`; empty when not approved)`, "reason"}`; a
/// refused route's reason names the conflicting node and both clusters.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_routes(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let list: Vec<_> = r
            .store
            .list_routes()
            .map_err(store_error)?
            .into_iter()
            .map(|rt| {
                let approved_by = match (&rt.status, rt.approved_by) {
                    (RouteStatus::Approved, Some(Approver::Policy)) => Some("policy"),
                    (RouteStatus::Approved, _) => Some("operator"),
                    _ => None,
                };
                let reason = match &rt.status {
                    RouteStatus::Refused(c) => c.to_string(),
                    _ => String::new(),
                };
                json!({
                    "node_id": rt.node_id,
                    "node": rt.node_name,
                    "cluster": cluster_name(rt.cluster.as_deref()),
                    "prefix": rt.prefix.to_string(),
                    "status": rt.status.word(),
                    "approved_by": approved_by,
                    "role": rt.role(),
                    "reason": reason,
                })
            })
            .collect();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &serde_json::Value::from(list).to_string()) }
    }}
}

/// Approves the route `prefix` (`"10.42.1.0/24"`) that node `node` (id,
/// name or public key) advertises.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_PREFIX_INVALID`, `MESHVPN_CONTROL_NOT_FOUND`,
/// `MESHVPN_CONTROL_ROUTE_REFUSED` (not advertised by the node, or it
/// overlaps an approved route of another cluster: the message names it),
/// `MESHVPN_CONTROL_POLICY_INVALID` (the stored policy no longer loads),
/// `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_approve_route(
    server: *mut meshvpn_control_server,
    node: *const c_char,
    prefix: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes NUL-terminated strings or NULL.
        let (node, prefix) = unsafe {
            (ptr::try_str(node, "node")?, ptr::try_str(prefix, "prefix")?)
        };
        let r = lookup(server)?;
        admin::approve_route(&*r.store, node, prefix, unix_now()).map_err(admin_error)?;
        r.control.poke();
        Ok(())
    }}
}

/// Validates `policy` (JSON: `tagOwners`, `acls`, `autoApprovers`; see
/// docs/control.md) and makes it the policy, as a new version written to
/// `*out_version` (may be NULL); routes are re-examined for
/// auto-approval and connected nodes get their new packet filter at once.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_CONTROL_POLICY_INVALID` (the message names
/// the line and column; nothing was stored), `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_set_policy(
    server: *mut meshvpn_control_server,
    policy: *const c_char,
    out_version: *mut u64,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(policy, "policy") }?;
        let r = lookup(server)?;
        let (version, _) = admin::set_policy(&*r.store, text, unix_now()).map_err(admin_error)?;
        r.control.poke();
        if !out_version.is_null() {
            Out::new(out_version, "out_version")?.write(version);
        }
        Ok(())
    }}
}

/// Writes the policy's text as set into `buf` (the buffer protocol of
/// `meshvpn_result_message`) and its version into `*out_version` (may be
/// NULL); with no policy set (allow-all) the text is empty and the
/// version 0.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_get_policy(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
    out_version: *mut u64,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let (text, version) = r
            .store
            .policy()
            .map_err(store_error)?
            .map_or((String::new(), 0), |p| (p.text, p.version));
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &text) }?;
        if !out_version.is_null() {
            Out::new(out_version, "out_version")?.write(version);
        }
        Ok(())
    }}
}

/// Stops the server: its own listener, its watcher and every node's
/// session (nodes keep their data plane and reconnect when a server
/// serves the database again); later calls fail with `MESHVPN_CLOSED`.
/// The handle stays valid until freed.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_control_server_close(
    server: *mut meshvpn_control_server,
) -> meshvpn_result {
    ffi_boundary! {{
        CONTROLS.close(server)
    }}
}

/// Closes the server (as `meshvpn_control_server_close`) and releases it.
/// Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_control_server_free(
    server: *mut meshvpn_control_server,
) -> meshvpn_result {
    ffi_boundary! {{
        CONTROLS.free(server)
    }}
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::Read;
    use std::net::{Shutdown, TcpListener};
    use std::os::fd::IntoRawFd;
    use std::sync::mpsc;
    use std::time::Instant;

    use ::boringtun::x25519::StaticSecret;
    use ::meshvpn_control::client::{ControlClient, ControlClientConfig, JoinRequest};
    use ::meshvpn_control::proto::CONTROL_PATH;
    use ::meshvpn_engine::PrivateKey;

    use super::*;

    const WAIT: Duration = Duration::from_secs(15);

    struct Server(*mut meshvpn_control_server, std::path::PathBuf);

    impl Server {
        fn new(name: &str, per_source: u32) -> Server {
            let dir = std::env::temp_dir()
                .join(format!("meshvpn-ffi-hosted-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let db = CString::new(dir.join("control.db").to_str().unwrap()).unwrap();
            let config = meshvpn_control_server_config {
                db_path: db.as_ptr(),
                ipv4_prefix: std::ptr::null(),
                policy: std::ptr::null(),
                policy_file: std::ptr::null(),
                ephemeral_timeout_ms: 0,
                max_sessions: 0,
                max_sessions_per_source: per_source,
                relay_url: std::ptr::null(),
                listen: std::ptr::null(),
                cert_pem: std::ptr::null(),
                key_pem: std::ptr::null(),
                relay: false,
            };
            let mut handle = std::ptr::null_mut();
            // SAFETY: a valid config whose strings outlive the call.
            let rc = unsafe { meshvpn_control_server_new(&config, &mut handle) };
            assert_eq!(rc, MESHVPN_OK, "{}", crate::error::last_error_for_tests());
            Server(handle, dir)
        }

        fn key(&self) -> String {
            let options = meshvpn_join_key_options {
                reusable: true,
                ephemeral: false,
                expiry_seconds: 0,
                tags: std::ptr::null(),
                cluster: std::ptr::null(),
            };
            let mut buf = [0u8; MESHVPN_JOIN_KEY_LEN];
            let mut len = 0;
            // SAFETY: valid options and a buffer of the length given.
            let rc = unsafe {
                meshvpn_control_server_create_key(
                    self.0,
                    &options,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut len,
                )
            };
            assert_eq!(rc, MESHVPN_OK);
            String::from_utf8(buf[..len].to_vec()).unwrap()
        }

        fn nodes(&self) -> Vec<serde_json::Value> {
            let mut buf = vec![0u8; 16384];
            let mut len = 0;
            // SAFETY: a buffer of the length given.
            let rc = unsafe {
                meshvpn_control_server_nodes(self.0, buf.as_mut_ptr().cast(), buf.len(), &mut len)
            };
            assert_eq!(rc, MESHVPN_OK);
            serde_json::from_slice(&buf[..len]).unwrap()
        }

        fn serve(&self, fd: c_int, head: &[u8], remote: &str) -> meshvpn_result {
            serve_fd(self.0, fd, head, remote)
        }
    }

    /// Hands `fd` over as a host program would.
    fn serve_fd(
        server: *mut meshvpn_control_server,
        fd: c_int,
        head: &[u8],
        remote: &str,
    ) -> meshvpn_result {
        let remote = CString::new(remote).unwrap();
        let exporter = [0u8; MESHVPN_CONTROL_EXPORTER_LEN];
        // SAFETY: pointers to live buffers of the lengths given.
        unsafe {
            meshvpn_control_server_serve_conn(
                server,
                fd,
                head.as_ptr(),
                head.len(),
                remote.as_ptr(),
                exporter.as_ptr(),
            )
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            meshvpn_control_server_free(self.0);
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }

    fn upgrade_head(path: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes()
    }

    /// What the library wrote on its end of a socketpair before closing it.
    fn answer(mut ours: UnixStream) -> String {
        ours.set_read_timeout(Some(WAIT)).unwrap();
        let mut text = String::new();
        ours.read_to_string(&mut text).unwrap();
        text
    }

    /// Bad descriptors, missing pointers, heads that are not a complete
    /// websocket upgrade for the control path and bad addresses each get
    /// their code; the library closes a descriptor it was given on every
    /// error; after close the call is refused.
    #[test]
    fn serve_conn_refuses_bad_arguments_with_codes() {
        let server = Server::new("args", 0);
        let head = upgrade_head(CONTROL_PATH);
        let remote = CString::new("192.0.2.1:1000").unwrap();
        let exporter = [0u8; 32];
        let pair = || UnixStream::pair().unwrap();

        assert_eq!(
            server.serve(-1, &head, "192.0.2.1:1"),
            MESHVPN_INVALID_ARGUMENT
        );
        // A descriptor number nothing has open.
        let closed = {
            let (a, _b) = pair();
            a.into_raw_fd()
        };
        // SAFETY: `closed` is ours (just made), closed once here.
        unsafe { libc::close(closed) };
        assert_eq!(
            server.serve(closed, &head, "192.0.2.1:1"),
            MESHVPN_INVALID_ARGUMENT
        );
        // Not a stream socket: a file, a UDP socket, a datagram pair.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            server.serve(file.into_raw_fd(), &head, "192.0.2.1:1"),
            MESHVPN_INVALID_ARGUMENT
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            server.serve(udp.into_raw_fd(), &head, "192.0.2.1:1"),
            MESHVPN_INVALID_ARGUMENT
        );
        let (dgram, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert_eq!(
            server.serve(dgram.into_raw_fd(), &head, "192.0.2.1:1"),
            MESHVPN_INVALID_ARGUMENT
        );

        // NULLs: each refused, and the descriptor closed (the other end
        // reads end-of-file at once).
        type Call<'a> = Box<dyn Fn(c_int) -> meshvpn_result + 'a>;
        let calls: Vec<(&str, Call)> = vec![
            (
                "server",
                Box::new(|fd| unsafe {
                    // SAFETY: valid buffers; the handle is NULL on purpose.
                    meshvpn_control_server_serve_conn(
                        std::ptr::null_mut(),
                        fd,
                        head.as_ptr(),
                        head.len(),
                        remote.as_ptr(),
                        exporter.as_ptr(),
                    )
                }),
            ),
            (
                "head",
                Box::new(|fd| unsafe {
                    // SAFETY: as above, the head NULL on purpose.
                    meshvpn_control_server_serve_conn(
                        server.0,
                        fd,
                        std::ptr::null(),
                        10,
                        remote.as_ptr(),
                        exporter.as_ptr(),
                    )
                }),
            ),
            (
                "empty head",
                Box::new(|fd| unsafe {
                    // SAFETY: as above, with a length of 0.
                    meshvpn_control_server_serve_conn(
                        server.0,
                        fd,
                        head.as_ptr(),
                        0,
                        remote.as_ptr(),
                        exporter.as_ptr(),
                    )
                }),
            ),
            (
                "remote",
                Box::new(|fd| unsafe {
                    // SAFETY: as above, the address NULL on purpose.
                    meshvpn_control_server_serve_conn(
                        server.0,
                        fd,
                        head.as_ptr(),
                        head.len(),
                        std::ptr::null(),
                        exporter.as_ptr(),
                    )
                }),
            ),
            (
                "exporter",
                Box::new(|fd| unsafe {
                    // SAFETY: as above, the exporter NULL on purpose.
                    meshvpn_control_server_serve_conn(
                        server.0,
                        fd,
                        head.as_ptr(),
                        head.len(),
                        remote.as_ptr(),
                        std::ptr::null(),
                    )
                }),
            ),
        ];
        for (what, call) in calls {
            let (theirs, ours) = pair();
            let rc = call(theirs.into_raw_fd());
            assert_eq!(rc, MESHVPN_NULL_PARAMETER, "NULL {what}");
            assert_eq!(answer(ours), "", "NULL {what}: closed without a word");
        }

        // Heads: garbage, cut short, more than the head, too long, another
        // path, a plain GET; a bad address.
        let mut long = b"GET /v1-meshvpn/control HTTP/1.1\r\nX: ".to_vec();
        long.resize(70 << 10, b'a');
        long.extend_from_slice(b"\r\n\r\n");
        let mut trailing = head.clone();
        trailing.extend_from_slice(b"\x82\x00");
        let cases: Vec<(&str, Vec<u8>, &str, meshvpn_result, &str)> = vec![
            (
                "garbage",
                b"\x00\xffhello\r\n\r\n".to_vec(),
                "192.0.2.1:1",
                MESHVPN_TUNNEL_HANDSHAKE,
                "",
            ),
            (
                "cut short",
                head[..head.len() - 2].to_vec(),
                "192.0.2.1:1",
                MESHVPN_TUNNEL_HANDSHAKE,
                "400",
            ),
            (
                "bytes after the head",
                trailing,
                "192.0.2.1:1",
                MESHVPN_TUNNEL_HANDSHAKE,
                "400",
            ),
            (
                "too long",
                long,
                "192.0.2.1:1",
                MESHVPN_TUNNEL_HANDSHAKE,
                "400",
            ),
            (
                "another path",
                upgrade_head("/v1-k3s/connect"),
                "192.0.2.1:1",
                MESHVPN_TUNNEL_HANDSHAKE,
                "404",
            ),
            (
                "no upgrade",
                b"GET /v1-meshvpn/control HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                "192.0.2.1:1",
                MESHVPN_TUNNEL_HANDSHAKE,
                "",
            ),
            (
                "bad address",
                head.clone(),
                "nowhere",
                MESHVPN_INVALID_ARGUMENT,
                "",
            ),
        ];
        for (what, head, remote, want, status) in cases {
            let (theirs, ours) = pair();
            let rc = server.serve(theirs.into_raw_fd(), &head, remote);
            assert_eq!(rc, want, "{what}: {}", crate::error::last_error_for_tests());
            let text = answer(ours);
            if status.is_empty() {
                assert!(!text.contains("101"), "{what}: {text}");
            } else {
                assert!(
                    text.starts_with(&format!("HTTP/1.1 {status}")),
                    "{what}: {text:?}"
                );
            }
        }
        assert!(server.nodes().is_empty());

        // A good upgrade gets its 101 and the server's challenge; close
        // ends it while it waits for the node's proof (at once, not at the
        // 10 s handshake deadline).
        let (theirs, mut ours) = pair();
        assert_eq!(
            server.serve(theirs.into_raw_fd(), &head, "192.0.2.1:1"),
            MESHVPN_OK
        );
        ours.set_read_timeout(Some(WAIT)).unwrap();
        let mut first = [0u8; 12];
        ours.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 101");
        let started = Instant::now();
        assert_eq!(meshvpn_control_server_close(server.0), MESHVPN_OK);
        let mut rest = Vec::new();
        ours.read_to_end(&mut rest).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a connection in its handshake ended {:?} after close",
            started.elapsed()
        );

        // After close: refused; the library has nothing to serve with, so it
        // closes the descriptor (Go's handler answers 503 itself).
        let (theirs, ours) = pair();
        assert_eq!(
            server.serve(
                theirs.into_raw_fd(),
                &upgrade_head(CONTROL_PATH),
                "192.0.2.1:1"
            ),
            MESHVPN_CLOSED
        );
        assert_eq!(answer(ours), "");
    }

    /// A host program's router in miniature: accepts TCP, reads the request
    /// head, and hands a socketpair end over with the head and the address
    /// it says the client has, copying bytes both ways.
    struct Router {
        url: String,
        results: mpsc::Receiver<meshvpn_result>,
    }

    fn route(server: &Arc<ServerRef>, remote: &'static str) -> Router {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}{CONTROL_PATH}", listener.local_addr().unwrap());
        let (tx, results) = mpsc::channel();
        let server = server.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    if tcp.read(&mut byte).unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let (theirs, ours) = UnixStream::pair().unwrap();
                let rc = server.serve(theirs.into_raw_fd(), &head, remote);
                let (mut a, mut b) = (tcp.try_clone().unwrap(), ours.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(Shutdown::Both);
                });
                let (mut a, mut b) = (ours, tcp);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(Shutdown::Both);
                });
                if tx.send(rc).is_err() {
                    return;
                }
            }
        });
        Router { url, results }
    }

    /// The handle, shared with the router's thread.
    struct ServerRef(*mut meshvpn_control_server);
    // SAFETY: a handle is a number the library looks up, usable from any
    // thread (every function says so).
    unsafe impl Send for ServerRef {}
    // SAFETY: as above.
    unsafe impl Sync for ServerRef {}

    impl ServerRef {
        fn serve(&self, fd: c_int, head: &[u8], remote: &str) -> meshvpn_result {
            serve_fd(self.0, fd, head, remote)
        }
    }

    fn node(url: &str, key: &str, name: &str) -> ControlClient {
        let request = JoinRequest {
            join_key: Some(key.to_string().into()),
            hostname: name.into(),
            endpoints: vec!["192.0.2.50:51820".parse().unwrap()],
            ..Default::default()
        };
        let mut config = ControlClientConfig::new(url, request);
        config.backoff_initial = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(200);
        let secret = StaticSecret::from(*PrivateKey::generate().as_bytes());
        ControlClient::start(config, secret).unwrap()
    }

    /// Nodes register through a host program's router: the seen address is
    /// the one the host gave (not the socketpair's, which has none), the
    /// per-source cap counts by it (the excess is answered 503 through the
    /// host, and the call says `MESHVPN_TUNNEL_LIMIT`) while another source
    /// is served, and closing the control server ends the sessions.
    #[test]
    fn nodes_register_through_a_host_router_counted_by_its_address() {
        let server = Server::new("router", 2);
        let key = server.key();
        let shared = Arc::new(ServerRef(server.0));
        let nat = route(&shared, "203.0.113.9:4242");
        let other = route(&shared, "198.51.100.7:999");
        let a = node(&nat.url, &key, "a");
        let b = node(&nat.url, &key, "b");
        for n in [&a, &b] {
            assert!(n.wait(WAIT, |s, _| s.has_map()), "{:?}", n.status());
        }
        for _ in 0..2 {
            assert_eq!(nat.results.recv_timeout(WAIT).unwrap(), MESHVPN_OK);
        }
        let c = node(&nat.url, &key, "c");
        assert!(c.wait(WAIT, |_, st| st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("503"))));
        assert_eq!(
            nat.results.recv_timeout(WAIT).unwrap(),
            MESHVPN_TUNNEL_LIMIT
        );
        drop(c);
        let d = node(&other.url, &key, "d");
        assert!(d.wait(WAIT, |s, _| s.has_map()), "{:?}", d.status());
        let nodes = server.nodes();
        let seen = |name: &str| {
            nodes
                .iter()
                .find(|n| n["name"] == name)
                .map(|n| n["seen"].clone())
                .unwrap()
        };
        assert_eq!(seen("a"), "203.0.113.9:4242");
        assert_eq!(seen("b"), "203.0.113.9:4242");
        assert_eq!(seen("d"), "198.51.100.7:999");
        // The other nodes are offered the seen address as an endpoint. A
        // node's first map is the server's last snapshot; nodes that
        // joined just before it arrive in the next change (within
        // MIN_REFRESH), so wait for it.
        let offered = |s: &::meshvpn_control::client::NodeState| {
            s.peers.values().any(|p| {
                p.name == "a" && p.endpoints.contains(&"203.0.113.9:4242".parse().unwrap())
            })
        };
        assert!(
            d.wait(WAIT, |s, _| offered(s)),
            "{:?}",
            d.state()
                .peers
                .values()
                .map(|p| (p.name.clone(), p.endpoints.clone()))
                .collect::<Vec<_>>()
        );

        let started = Instant::now();
        assert_eq!(meshvpn_control_server_close(server.0), MESHVPN_OK);
        for n in [&a, &b, &d] {
            assert!(n.wait(WAIT, |_, st| !st.connected), "{:?}", n.status());
        }
        eprintln!("sessions ended {:?} after close", started.elapsed());
    }
}
