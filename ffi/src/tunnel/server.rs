//! `meshvpn_tunnel_server`: accepts agents (and, with `relay`, WireGuard
//! relay clients) over HTTPS and dials through them.

use std::ffi::c_char;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::meshvpn_engine::relay::RelayServerConfig;
use ::meshvpn_engine::supervisor::upgrade::UpgradeRoute;
use ::meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer, K3S_PATH};
use ::meshvpn_engine::ws::tls;
use parking_lot::Mutex;

use super::stream::{meshvpn_tunnel_stream, StreamHandle, STREAMS};
use super::{tls_error, SESSION_WAIT_SLICE};
use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::key::meshvpn_key;
use crate::ptr::{self, Out};
use crate::timeout::{deadline, meshvpn_timeout_ms};

use meshvpn_result::*;

/// A tunnel server. Opaque: created by `meshvpn_tunnel_server_new`,
/// released by `meshvpn_tunnel_server_free`. A handle, never dereferenced.
pub struct meshvpn_tunnel_server {
    _private: [u8; 0],
}

/// A bearer token and the client key an agent presenting it gets.
#[repr(C)]
pub struct meshvpn_tunnel_token {
    pub token: *const c_char,
    pub client_key: *const c_char,
}

/// How a server listens and whom it accepts. Strings are NUL-terminated
/// and only read during `meshvpn_tunnel_server_new`.
#[repr(C)]
pub struct meshvpn_tunnel_server_config {
    /// `"ADDRESS:PORT"` to listen on, e.g. `"127.0.0.1:0"` (port 0 picks a
    /// free one, kept across stop and start). Required.
    pub listen: *const c_char,
    /// The upgrade path; NULL means `/v1-k3s/connect`.
    pub path: *const c_char,
    /// PEM: the server's certificate chain. Required (HTTPS only).
    pub cert_pem: *const c_char,
    /// PEM: its private key. Required.
    pub key_pem: *const c_char,
    /// PEM: the CA that signs agents' client certificates; a verified
    /// certificate's subject CN becomes the client key (k3s:
    /// `system:node:NAME`). NULL accepts no certificates.
    pub client_ca_pem: *const c_char,
    /// `tokens_len` bearer tokens; may be NULL when `tokens_len` is 0. At
    /// least one of `client_ca_pem` and a token is required.
    pub tokens: *const meshvpn_tunnel_token,
    pub tokens_len: usize,
    /// Also serve the WireGuard relay on the same listener, for engines
    /// that call `meshvpn_engine_relay_start` (see engine/docs/relay.md).
    /// The relay forwards encrypted datagrams by public key and never sees
    /// plaintext; a client proves it owns the key it registers. With the
    /// relay on and `relay_require_auth` false, tokens and `client_ca_pem`
    /// may both be absent (then only the relay is usable).
    pub relay: bool,
    /// The relay's upgrade path; NULL means `/v1-meshvpn/relay`.
    pub relay_path: *const c_char,
    /// `relay_keys_len` public keys that alone may register with the relay;
    /// may be NULL when `relay_keys_len` is 0, which admits any key whose
    /// owner proves possession.
    pub relay_keys: *const meshvpn_key,
    pub relay_keys_len: usize,
    /// Relay clients must also present the tunnel's credentials (a token
    /// or a client certificate) before the key proof.
    pub relay_require_auth: bool,
    /// TLS and HTTP handshakes in progress at once from all sources; more
    /// connections are closed at once. 0 means the default, 256.
    pub max_handshakes: u32,
    /// Handshakes in progress at once from one source address (nginx
    /// `limit_conn` style); more from it are closed at once while other
    /// sources are served. 0 means the default, 16.
    pub max_handshakes_per_source: u32,
    /// Relay sessions at once from all sources (each one thread and three
    /// open files); more registrations are answered 503. 0 means the
    /// default, 1024. Needs `relay`.
    pub relay_max_sessions: u32,
    /// Relay sessions at once from one source address; more from it are
    /// answered 503. 0 means the default, 32. Needs `relay`.
    pub relay_max_sessions_per_source: u32,
    /// Bytes the relay queues toward one client before new frames to it
    /// are dropped (`dropped_full`); 0 means 1 MiB. At least 65631 (one
    /// largest frame and its bookkeeping).
    pub relay_queue_bytes: usize,
    /// Bytes the relay queues toward all clients together before new
    /// frames to any are dropped (`dropped_budget`); 0 means 64 MiB. At
    /// least the queue bytes.
    pub relay_budget_bytes: usize,
    /// Milliseconds a relay client's writes may make no progress (it does
    /// not read) before its session is closed and its queue freed
    /// (`closed_slow`); 0 means 10000.
    pub relay_write_timeout_ms: u32,
}

/// `value`, or `default` for 0.
fn or_default(value: u32, default: usize) -> usize {
    if value == 0 {
        default
    } else {
        value as usize
    }
}

struct ServerHandle {
    /// Read at each start; services above the engine (the control server)
    /// add their upgrade routes to it between starts.
    config: Mutex<ServerConfig>,
    /// The address to bind; after the first start, the bound one.
    listen: Mutex<SocketAddr>,
    running: Mutex<Option<Arc<TunnelServer>>>,
}

static SERVERS: HandleTable<meshvpn_tunnel_server, ServerHandle> =
    HandleTable::new(tag::TUNNEL_SERVER);

impl Handled for ServerHandle {
    const NAME: &'static str = "meshvpn_tunnel_server";

    fn close(&self) {
        self.stop();
    }
}

fn lookup_server(handle: *const meshvpn_tunnel_server) -> Result<Arc<ServerHandle>> {
    SERVERS.lookup(handle)
}

impl ServerHandle {
    fn running(&self) -> Result<Arc<TunnelServer>> {
        self.running.lock().clone().ok_or_else(|| {
            Error::new(
                MESHVPN_TUNNEL_NOT_RUNNING,
                "start the server with meshvpn_tunnel_server_start",
            )
        })
    }

    fn stop(&self) {
        // The last reference stops the listener and ends every session; a
        // dial in progress holds one for at most SESSION_WAIT_SLICE.
        drop(self.running.lock().take());
    }
}

/// Adds `route` to the stopped server `server`'s upgrade paths, served
/// from its next start (`meshvpn_control_server_attach`).
pub(crate) fn add_route(server: *mut meshvpn_tunnel_server, route: UpgradeRoute) -> Result<()> {
    let s = lookup_server(server)?;
    // Held across the check and the push, so a start cannot slip between.
    let running = s.running.lock();
    if running.is_some() {
        return Err(Error::invalid(
            "the tunnel server is running: attach before meshvpn_tunnel_server_start (or stop it first)",
        ));
    }
    let mut config = s.config.lock();
    if config.extra.iter().any(|r| r.path == route.path) {
        return Err(Error::invalid(format!(
            "the tunnel server serves {} already",
            route.path
        )));
    }
    config.extra.push(route);
    Ok(())
}

/// Reads the server configuration.
///
/// # Safety
/// The pointers in `c` are valid as `meshvpn_tunnel_server_config` documents.
unsafe fn read_server_config(
    c: &meshvpn_tunnel_server_config,
) -> Result<(SocketAddr, ServerConfig)> {
    // SAFETY: the caller's promise about `c`'s strings (all of this block).
    let (listen, path, cert, key, client_ca) = unsafe {
        (
            ptr::try_str(c.listen, "config->listen")?,
            ptr::try_opt_str(c.path, "config->path")?,
            ptr::try_str(c.cert_pem, "config->cert_pem")?,
            ptr::try_str(c.key_pem, "config->key_pem")?,
            ptr::try_opt_str(c.client_ca_pem, "config->client_ca_pem")?,
        )
    };
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| Error::invalid(format!("listen {listen:?} is not ADDRESS:PORT")))?;
    let path = path.unwrap_or(K3S_PATH);
    if !path.starts_with('/') {
        return Err(Error::invalid(format!("path {path:?} must start with '/'")));
    }
    // SAFETY: the caller's promise about `tokens`.
    let entries = unsafe { ptr::try_slice(c.tokens, c.tokens_len, "config->tokens") }?;
    let mut tokens = Vec::with_capacity(entries.len());
    for e in entries {
        // SAFETY: the caller's promise about each entry's strings.
        let (token, key) = unsafe {
            (
                ptr::try_str(e.token, "config->tokens[i].token")?,
                ptr::try_str(e.client_key, "config->tokens[i].client_key")?,
            )
        };
        if token.is_empty() || key.is_empty() {
            return Err(Error::invalid(
                "a token and its client key must not be empty",
            ));
        }
        tokens.push((token.to_owned(), key.to_owned()));
    }
    // SAFETY: the caller's promise about the relay fields.
    let relay = unsafe { read_relay_server_config(c) }?;
    if tokens.is_empty() && client_ca.is_none() && relay.as_ref().is_none_or(|r| r.require_auth) {
        return Err(Error::invalid(
            "no way to authenticate agents: give client_ca_pem or tokens",
        ));
    }
    let tls = tls::server_config(
        cert.as_bytes(),
        key.as_bytes(),
        client_ca.map(str::as_bytes),
        false,
    )
    .map_err(tls_error)?;
    let auth = ServerAuth {
        tokens,
        client_cert_cn: client_ca.is_some(),
    };
    let mut config = ServerConfig::new(path, Some(tls), auth);
    config.relay = relay;
    config.max_handshakes = or_default(c.max_handshakes, config.max_handshakes);
    config.max_handshakes_per_source = or_default(
        c.max_handshakes_per_source,
        config.max_handshakes_per_source,
    );
    Ok((listen, config))
}

/// The relay settings of a server configuration; `None` with the relay off.
///
/// # Safety
/// The relay pointers in `c` are valid as `meshvpn_tunnel_server_config`
/// documents.
unsafe fn read_relay_server_config(
    c: &meshvpn_tunnel_server_config,
) -> Result<Option<RelayServerConfig>> {
    if !c.relay {
        if !c.relay_path.is_null()
            || c.relay_keys_len != 0
            || c.relay_require_auth
            || c.relay_max_sessions != 0
            || c.relay_max_sessions_per_source != 0
            || c.relay_queue_bytes != 0
            || c.relay_budget_bytes != 0
            || c.relay_write_timeout_ms != 0
        {
            return Err(Error::invalid(
                "relay_path, relay_keys, relay_require_auth and the relay limits need relay = true",
            ));
        }
        return Ok(None);
    }
    // SAFETY: the caller's promise about `relay_path` and `relay_keys`.
    let (path, keys) = unsafe {
        (
            ptr::try_opt_str(c.relay_path, "config->relay_path")?,
            ptr::try_slice(c.relay_keys, c.relay_keys_len, "config->relay_keys")?,
        )
    };
    let mut relay = RelayServerConfig {
        require_auth: c.relay_require_auth,
        ..Default::default()
    };
    relay.max_sessions = or_default(c.relay_max_sessions, relay.max_sessions);
    relay.max_sessions_per_source = or_default(
        c.relay_max_sessions_per_source,
        relay.max_sessions_per_source,
    );
    if let Some(p) = path {
        if !p.starts_with('/') {
            return Err(Error::invalid(format!(
                "relay_path {p:?} must start with '/'"
            )));
        }
        relay.path = p.to_owned();
    }
    if !keys.is_empty() {
        relay.allowed_keys = Some(keys.iter().map(meshvpn_key::public).collect());
    }
    if c.relay_queue_bytes != 0 {
        relay.queue_bytes = c.relay_queue_bytes;
    }
    if c.relay_budget_bytes != 0 {
        relay.budget_bytes = c.relay_budget_bytes;
    }
    if c.relay_write_timeout_ms != 0 {
        relay.write_timeout = Duration::from_millis(c.relay_write_timeout_ms.into());
    }
    relay.check().map_err(Error::invalid)?;
    Ok(Some(relay))
}

/// Creates a server from `config` without listening yet. On success
/// `*out_server` receives a handle the caller owns and must release with
/// `meshvpn_tunnel_server_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_ARGUMENT` (a bad
/// listen address or path, no way to authenticate agents, empty tokens,
/// relay options with `relay` false, relay limits out of range),
/// `MESHVPN_TUNNEL_TLS` (a PEM that does not parse, a key that does not
/// fit its certificate).
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_server_new(
    config: *const meshvpn_tunnel_server_config,
    out_server: *mut *mut meshvpn_tunnel_server,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        let out = Out::new(out_server, "out_server")?;
        // SAFETY: the config's pointers are valid as its doc says.
        let (listen, config) = unsafe { read_server_config(c) }?;
        let handle = Arc::new(ServerHandle {
            config: Mutex::new(config),
            listen: Mutex::new(listen),
            running: Mutex::new(None),
        });
        out.write(SERVERS.insert(handle)?);
        Ok(())
    }}
}

/// Binds the listen address and serves agents in the background. After a
/// stop it binds the address it had (a port chosen by the system included).
/// Starting a started server does nothing.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_TUNNEL_LISTEN_FAILED`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_server_start(
    server: *mut meshvpn_tunnel_server,
) -> meshvpn_result {
    ffi_boundary! {{
        let s = lookup_server(server)?;
        let mut running = s.running.lock();
        if running.is_some() {
            return Ok(());
        }
        let addr = *s.listen.lock();
        let bound = TunnelServer::bind(addr, s.config.lock().clone()).map_err(|e| {
            Error::new(MESHVPN_TUNNEL_LISTEN_FAILED, format!("{addr}: {e}"))
        })?;
        *s.listen.lock() = bound.local_addr();
        *running = Some(Arc::new(bound));
        Ok(())
    }}
}

/// Stops listening and ends every session (their streams fail with
/// `MESHVPN_TUNNEL_RESET`; agents reconnect when it starts again).
/// Stopping a stopped server does nothing.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_server_stop(server: *mut meshvpn_tunnel_server) -> meshvpn_result {
    ffi_boundary! {{
        lookup_server(server)?.stop();
        Ok(())
    }}
}

/// Writes the address the server listens on (e.g. `"127.0.0.1:41234"`)
/// into `buf`, NUL-terminated, following the buffer protocol of
/// `meshvpn_result_message`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_TUNNEL_NOT_RUNNING`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_server_local_addr(
    server: *mut meshvpn_tunnel_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let addr = lookup_server(server)?.running()?.local_addr().to_string();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &addr) }
    }}
}

/// Writes the client keys that have a session now, sorted, one per line
/// (`"key1\nkey2"`; empty with none), into `buf` following the buffer
/// protocol of `meshvpn_result_message`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_TUNNEL_NOT_RUNNING`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_server_sessions(
    server: *mut meshvpn_tunnel_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let keys = lookup_server(server)?.running()?.clients().join("\n");
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &keys) }
    }}
}

/// A server's sessions, handshakes and refusals since it started, from
/// `meshvpn_tunnel_server_get_stats`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_tunnel_server_stats {
    /// Agents with a tunnel session now.
    pub sessions: u64,
    /// Handshakes in progress now.
    pub handshakes: u64,
    /// Connections closed at once: `max_handshakes` were in progress.
    pub refused_handshakes: u64,
    /// Connections closed at once: their source had
    /// `max_handshakes_per_source` in progress.
    pub refused_handshakes_per_source: u64,
    /// Relay sessions now (key proof included); 0 without the relay.
    pub relay_sessions: u64,
    /// Relay registrations answered 503: `relay_max_sessions` reached.
    pub refused_relay_sessions: u64,
    /// Relay registrations answered 503: their source had
    /// `relay_max_sessions_per_source`.
    pub refused_relay_sessions_per_source: u64,
}

/// Writes the server's counters into `*out_stats`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_TUNNEL_NOT_RUNNING`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_server_get_stats(
    server: *mut meshvpn_tunnel_server,
    out_stats: *mut meshvpn_tunnel_server_stats,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_stats, "out_stats")?;
        out.write(lookup_server(server)?.running()?.stats().into());
        Ok(())
    }}
}

/// A relay's counters since its server started, from
/// `meshvpn_tunnel_server_relay_stats`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_relay_server_stats {
    /// Keys registered now.
    pub clients: u64,
    /// Registrations so far.
    pub registrations: u64,
    /// Registrations that replaced a live session of the same key.
    pub replaced: u64,
    /// Failed key proofs, and keys outside `relay_keys`.
    pub refused: u64,
    /// Datagrams forwarded.
    pub forwarded: u64,
    /// Datagrams to a key without a session.
    pub dropped_unknown: u64,
    /// Datagrams to a session whose queue was full.
    pub dropped_full: u64,
    /// Frames too short to hold a key and a datagram.
    pub dropped_malformed: u64,
    /// Datagrams dropped because all queues together held the budget bytes.
    pub dropped_budget: u64,
    /// Sessions closed because their writes made no progress for the
    /// write timeout (clients that do not read).
    pub closed_slow: u64,
    /// Bytes queued toward all clients now; 0 once every session ended.
    pub queued_bytes: u64,
    /// The most `queued_bytes` has been.
    pub queued_bytes_peak: u64,
    /// The most one client's queue has held.
    pub session_queued_bytes_peak: u64,
}

/// Writes the relay's counters into `*out_stats`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_TUNNEL_NOT_RUNNING`, `MESHVPN_RELAY_NOT_RUNNING` (the server
/// was created without `relay`).
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_server_relay_stats(
    server: *mut meshvpn_tunnel_server,
    out_stats: *mut meshvpn_relay_server_stats,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_stats, "out_stats")?;
        let s = lookup_server(server)?.running()?.relay_stats().ok_or_else(|| {
            Error::new(MESHVPN_RELAY_NOT_RUNNING, "the server was created without relay")
        })?;
        out.write(s.into());
        Ok(())
    }}
}

/// Waits until the agent `client_key` has a session, for at most
/// `timeout_ms` (`MESHVPN_WAIT_FOREVER`: no deadline). Returns at once
/// when the session is up already.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_TUNNEL_NO_SESSION` (none within the timeout),
/// `MESHVPN_TUNNEL_NOT_RUNNING` (not started, or stopped while waiting).
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_server_wait_session(
    server: *mut meshvpn_tunnel_server,
    client_key: *const c_char,
    timeout_ms: meshvpn_timeout_ms,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let key = unsafe { ptr::try_str(client_key, "client_key") }?;
        let s = lookup_server(server)?;
        wait_session(&s, key, timeout_ms).map(drop)
    }}
}

/// Waits for `key`'s session in short slices, so that a concurrent stop
/// is never held up; returns the running server.
fn wait_session(
    s: &ServerHandle,
    key: &str,
    timeout_ms: meshvpn_timeout_ms,
) -> Result<Arc<TunnelServer>> {
    let until = deadline(timeout_ms);
    loop {
        let slice = until.map_or(SESSION_WAIT_SLICE, |d| {
            d.saturating_duration_since(Instant::now())
                .min(SESSION_WAIT_SLICE)
        });
        let running = s.running()?;
        if running.wait_for_client(key, slice) {
            return Ok(running);
        }
        if until.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::new(
                MESHVPN_TUNNEL_NO_SESSION,
                format!("no session for client {key:?} within {timeout_ms} ms"),
            ));
        }
    }
}

/// Opens a stream to `address` (e.g. `"127.0.0.1:10250"`) over `network`
/// (`"tcp"`) as seen from the agent `client_key`, waiting up to
/// `timeout_ms` for that agent's session (0: fail at once without one;
/// `MESHVPN_WAIT_FOREVER`: no deadline). The protocol has no
/// acknowledgement: this returns as soon as the request is queued, and a
/// target the agent refuses shows as `MESHVPN_TUNNEL_REFUSED` on the
/// stream's first read or write.
///
/// On success `*out_stream` receives a handle the caller owns and must
/// release with `meshvpn_tunnel_stream_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (`network/address` longer than the
/// protocol's 266 bytes, or a `/` in `network`), `MESHVPN_TUNNEL_NO_SESSION`,
/// `MESHVPN_TUNNEL_LIMIT`, `MESHVPN_TUNNEL_NOT_RUNNING`.
///
/// Thread safety: safe to call from any thread, any number at once.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_server_dial(
    server: *mut meshvpn_tunnel_server,
    client_key: *const c_char,
    network: *const c_char,
    address: *const c_char,
    timeout_ms: meshvpn_timeout_ms,
    out_stream: *mut *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes NUL-terminated strings or NULL.
        let (key, network, address) = unsafe {
            (
                ptr::try_str(client_key, "client_key")?,
                ptr::try_str(network, "network")?,
                ptr::try_str(address, "address")?,
            )
        };
        let out = Out::new(out_stream, "out_stream")?;
        if network.is_empty() || address.is_empty() {
            return Err(Error::invalid("network and address must not be empty"));
        }
        let s = lookup_server(server)?;
        let running = wait_session(&s, key, timeout_ms)?;
        let stream = running.dial(key, network, address)?;
        drop(running);
        let handle = Arc::new(StreamHandle {
            stream,
            closed: AtomicBool::new(false),
        });
        out.write(STREAMS.insert(handle)?);
        Ok(())
    }}
}

/// Stops the server (as `meshvpn_tunnel_server_stop`) and releases it. The
/// handle and its copies are dead afterwards; streams dialed through it
/// stay valid handles (their calls fail) until freed. Freeing NULL is a
/// no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_server_free(server: *mut meshvpn_tunnel_server) -> meshvpn_result {
    ffi_boundary! {{
        SERVERS.free(server)
    }}
}
