//! The supervisor tunnel (the websocket protocol of rancher/remotedialer,
//! which k3s uses): `meshvpn_tunnel_agent`, `meshvpn_tunnel_server` and
//! `meshvpn_tunnel_stream`.
//!
//! ```text
//!   server: new -> start (HTTPS listener) -> dial(client_key, "tcp", addr) -> stream
//!   agent:  new -> start (connects, reconnects) -> dials what the server asks, if allowed
//!   stream: read / write (per-call timeouts) -> shutdown_write / close -> free
//! ```
//!
//! Each handle refers to an object in a generational table (`handle`), so a
//! freed or stale handle is refused. Objects are reference counted: a call
//! racing with `_free` on another thread finishes on an object that is
//! being shut down (and fails with `MESHVPN_TUNNEL_CLOSED`,
//! `MESHVPN_TUNNEL_NOT_RUNNING` or `MESHVPN_INVALID_HANDLE`), never on freed
//! memory. Every blocking call has a timeout and is woken by closing or
//! freeing its handle.

use std::ffi::{c_char, c_void, CString};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::meshvpn_engine::netstack::MeshDialer;
use ::meshvpn_engine::relay::RelayServerConfig;
use ::meshvpn_engine::supervisor::DialError;
use ::meshvpn_engine::supervisor::{
    Agent, AgentConfig, AgentEvent, AllowList, ConnectPolicy, DialedTarget, OsDialer, ServerAuth,
    ServerConfig, TargetDialer, TargetPattern, TunnelServer, TunnelStream,
};
use ::meshvpn_engine::ws::{tls, TunnelError};
use parking_lot::Mutex;

use crate::callback::{self, Inside, Userdata};
use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::key::meshvpn_key;
use crate::netstack::meshvpn_netstack;
use crate::ptr::{self, Out};
use crate::timeout::{deadline, meshvpn_timeout_ms};

use meshvpn_result::*;

/// The path k3s mounts the tunnel on; the default of both roles.
const K3S_PATH: &str = "/v1-k3s/connect";
/// How long one wait for an agent's session holds on to the server, so that
/// `meshvpn_tunnel_server_stop` never waits long for a dial in progress.
pub(crate) const SESSION_WAIT_SLICE: Duration = Duration::from_millis(50);

// ------------------------------------------------------------------ errors

fn tls_error(e: TunnelError) -> Error {
    Error::new(MESHVPN_TUNNEL_TLS, e.to_string())
}

/// The code for an error of the tunnel runtime.
fn tunnel_code(e: &TunnelError) -> meshvpn_result {
    match e {
        TunnelError::Io(_) => MESHVPN_TUNNEL_CONNECT_FAILED,
        TunnelError::Tls(_) | TunnelError::ClientCertificateRequired => MESHVPN_TUNNEL_TLS,
        TunnelError::Rejected(status) if matches!(status.as_u16(), 401 | 403) => {
            MESHVPN_TUNNEL_AUTH
        }
        TunnelError::Rejected(_) | TunnelError::Handshake(_) => MESHVPN_TUNNEL_HANDSHAKE,
        TunnelError::Config(_) => MESHVPN_INVALID_ARGUMENT,
        TunnelError::NoSession(_) | TunnelError::Dial(DialError::SessionClosed) => {
            MESHVPN_TUNNEL_NO_SESSION
        }
        TunnelError::Dial(DialError::TooManyConnections(_)) => MESHVPN_TUNNEL_LIMIT,
        TunnelError::Dial(_) => MESHVPN_INVALID_ARGUMENT,
    }
}

impl From<TunnelError> for Error {
    fn from(e: TunnelError) -> Error {
        Error::new(tunnel_code(&e), e.to_string())
    }
}

/// The code for a failed read or write on a stream. The protocol carries
/// the far side's error as text; a refusal by the agent's policy reads
/// `connect not allowed` (this library) and a refused dial `... connection
/// refused` (this library and the Go one).
fn stream_code(e: &io::Error) -> meshvpn_result {
    match e.kind() {
        io::ErrorKind::TimedOut => MESHVPN_TIMEOUT,
        io::ErrorKind::Interrupted => MESHVPN_INTERRUPTED,
        io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected => MESHVPN_TUNNEL_CLOSED,
        _ => {
            let text = e.to_string().to_ascii_lowercase();
            if text.contains("connect not allowed") || text.contains("connection refused") {
                MESHVPN_TUNNEL_REFUSED
            } else {
                MESHVPN_TUNNEL_RESET
            }
        }
    }
}

// ------------------------------------------------------------------ agent

/// A tunnel agent. Opaque: created by `meshvpn_tunnel_agent_new`, released
/// by `meshvpn_tunnel_agent_free`. The value is a handle, not a pointer to
/// memory: never dereference it.
pub struct meshvpn_tunnel_agent {
    _private: [u8; 0],
}

/// Decides whether the agent may dial `network`/`address` for the server
/// (e.g. `"tcp"`, `"127.0.0.1:10250"`); both are NUL-terminated and valid
/// only during the call. Return true to dial, false to refuse (the server
/// reads `MESHVPN_TUNNEL_REFUSED` on that stream; the tunnel stays up).
///
/// Called on the agent's session thread with the session locked: it must
/// return quickly and must not call `meshvpn_tunnel_agent_stop` or
/// `meshvpn_tunnel_agent_free` (they return `MESHVPN_WOULD_DEADLOCK`).
pub type meshvpn_tunnel_allow_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        network: *const c_char,
        address: *const c_char,
    ) -> bool,
>;

/// What happened to an agent.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum meshvpn_tunnel_event_kind {
    /// A session with the server is up.
    MESHVPN_TUNNEL_EVENT_CONNECTED = 1,
    /// The session ended; the agent reconnects unless stopped.
    MESHVPN_TUNNEL_EVENT_DISCONNECTED = 2,
    /// A connection attempt failed; the agent retries after a backoff.
    MESHVPN_TUNNEL_EVENT_ERROR = 3,
}

/// One agent event, valid only during the callback.
#[repr(C)]
pub struct meshvpn_tunnel_event {
    pub kind: meshvpn_tunnel_event_kind,
    /// For `MESHVPN_TUNNEL_EVENT_ERROR`: why, as a code
    /// (`MESHVPN_TUNNEL_TLS`, `MESHVPN_TUNNEL_AUTH`,
    /// `MESHVPN_TUNNEL_HANDSHAKE`, `MESHVPN_TUNNEL_CONNECT_FAILED`);
    /// `MESHVPN_OK` otherwise.
    pub result: meshvpn_result,
    /// NUL-terminated UTF-8: the reason for a disconnect or error, empty on
    /// connect. Never contains the token or a private key.
    pub message: *const c_char,
}

/// Receives agent events. Called on the agent's thread, one at a time;
/// must not call `meshvpn_tunnel_agent_stop` or `meshvpn_tunnel_agent_free`
/// (they return `MESHVPN_WOULD_DEADLOCK`).
pub type meshvpn_tunnel_event_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, event: *const meshvpn_tunnel_event)>;

/// How an agent connects and what it allows. Strings are NUL-terminated
/// and only read during `meshvpn_tunnel_agent_new`; optional ones may be NULL.
#[repr(C)]
pub struct meshvpn_tunnel_agent_config {
    /// `wss://host:port` or a full `wss://host:port/path` (`ws://` is plain
    /// HTTP, for tests). Required.
    pub url: *const c_char,
    /// The upgrade path, replacing the URL's path; NULL keeps the URL's
    /// path, or `/v1-k3s/connect` when the URL has none.
    pub path: *const c_char,
    /// PEM: the CA the server's certificate must chain to. Required for
    /// `wss://`; there is no mode that skips verification.
    pub ca_pem: *const c_char,
    /// PEM: the agent's client certificate chain (k3s: CN
    /// `system:node:NAME`), with `client_key_pem`; both or neither.
    pub client_cert_pem: *const c_char,
    /// PEM: the private key of `client_cert_pem`.
    pub client_key_pem: *const c_char,
    /// Sent as `Authorization: Bearer TOKEN`; optional. Never logged.
    pub token: *const c_char,
    /// Sent as the `X-Tunnel-ID` header (remotedialer's example servers
    /// take the client key from it); optional.
    pub client_id: *const c_char,
    /// `allow_len` target patterns `NETWORK/HOST:PORT`, where HOST is `*`,
    /// an address, a CIDR (`10.42.0.0/16`) or a name and PORT is `*`, a
    /// number or `LOW-HIGH`. With none and no `allow_callback`: what k3s
    /// allows, the kubelet (10250) and stream server (10010) on loopback.
    pub allow: *const *const c_char,
    pub allow_len: usize,
    /// Decides instead of `allow` (then `allow_len` must be 0); may be NULL.
    pub allow_callback: meshvpn_tunnel_allow_callback,
    pub allow_userdata: *mut c_void,
    /// Receives events; may be NULL.
    pub event_callback: meshvpn_tunnel_event_callback,
    pub event_userdata: *mut c_void,
    /// A userspace stack (`meshvpn_netstack_new`) through which allowed
    /// targets inside a peer's AllowedIPs are dialed over the mesh; other
    /// targets (the kubelet on loopback) go through the OS. NULL: every
    /// target through the OS. Freeing the stack fails later mesh dials.
    pub netstack: *const meshvpn_netstack,
}

/// An agent's counters, from `meshvpn_tunnel_agent_get_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_tunnel_agent_status {
    /// A session with the server is up now.
    pub connected: bool,
    /// Sessions established since the agent was created.
    pub sessions: u64,
    /// Sessions after the first one: how often the agent reconnected.
    pub reconnects: u64,
    /// Streams the agent is relaying to targets now.
    pub streams_active: u64,
    /// Streams the agent has dialed since it was created.
    pub streams_total: u64,
    /// Targets the policy refused.
    pub streams_refused: u64,
    /// Bytes written to targets (from the server).
    pub bytes_to_targets: u64,
    /// Bytes read from targets (to the server).
    pub bytes_from_targets: u64,
}

#[derive(Default)]
struct AgentCounters {
    connected: AtomicBool,
    sessions: AtomicU64,
    streams_active: AtomicU64,
    streams_total: AtomicU64,
    streams_refused: AtomicU64,
    bytes_to_targets: AtomicU64,
    bytes_from_targets: AtomicU64,
}

/// Counts the policy's refusals.
struct CountingPolicy {
    inner: Box<dyn ConnectPolicy>,
    counters: Arc<AgentCounters>,
}

impl ConnectPolicy for CountingPolicy {
    fn allows(&self, proto: &str, address: &str) -> bool {
        let yes = self.inner.allows(proto, address);
        if !yes {
            self.counters
                .streams_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        yes
    }
}

/// The C allow callback as a policy.
struct CallbackPolicy {
    callback: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> bool,
    userdata: Userdata,
}

impl ConnectPolicy for CallbackPolicy {
    fn allows(&self, proto: &str, address: &str) -> bool {
        // Text with a NUL inside cannot be shown to C faithfully: refuse it.
        let (Ok(proto), Ok(address)) = (CString::new(proto), CString::new(address)) else {
            return false;
        };
        let _guard = callback::Guard::enter(Inside::Tunnel);
        // SAFETY: the caller registered this callback for this userdata and
        // promised it may run on library threads; both strings live across
        // the call.
        unsafe { (self.callback)(self.userdata.0, proto.as_ptr(), address.as_ptr()) }
    }
}

/// One live relay to a target; counts down `streams_active` when both
/// halves are gone.
struct LiveStream(Arc<AgentCounters>);

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A target half that counts the bytes through it.
struct Counted<T> {
    inner: T,
    _live: Arc<LiveStream>,
    counters: Arc<AgentCounters>,
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counters
            .bytes_from_targets
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.counters
            .bytes_to_targets
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Dials through the OS (or the mesh) and counts streams and bytes.
struct CountingDialer {
    inner: Arc<dyn TargetDialer>,
    counters: Arc<AgentCounters>,
}

impl TargetDialer for CountingDialer {
    fn dial(&self, proto: &str, address: &str) -> io::Result<DialedTarget> {
        let target = self.inner.dial(proto, address)?;
        let c = &self.counters;
        c.streams_total.fetch_add(1, Ordering::Relaxed);
        c.streams_active.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(LiveStream(c.clone()));
        Ok(DialedTarget {
            reader: Box::new(Counted {
                inner: target.reader,
                _live: live.clone(),
                counters: c.clone(),
            }),
            writer: Box::new(Counted {
                inner: target.writer,
                _live: live,
                counters: c.clone(),
            }),
            shutdown: target.shutdown,
        })
    }
}

type EventCallback = (
    unsafe extern "C" fn(*mut c_void, *const meshvpn_tunnel_event),
    Userdata,
);

/// What `meshvpn_tunnel_agent_start` builds an `Agent` from, each time.
struct AgentSettings {
    /// A fresh configuration (the settings' TLS, token, policy and dialer).
    config: Box<dyn Fn() -> AgentConfig + Send + Sync>,
    event: Option<EventCallback>,
}

struct AgentHandle {
    settings: AgentSettings,
    counters: Arc<AgentCounters>,
    agent: Mutex<Option<Agent>>,
}

static AGENTS: HandleTable<meshvpn_tunnel_agent, AgentHandle> = HandleTable::new(tag::TUNNEL_AGENT);

/// `url` with its path replaced by `path`, or given `/v1-k3s/connect` if it has none.
fn url_with_path(url: &str, path: Option<&str>) -> Result<String> {
    let scheme_end = url
        .find("://")
        .ok_or_else(|| Error::invalid(format!("url {url:?} has no scheme (wss://...)")))?;
    let authority_start = scheme_end + 3;
    let path_start = url[authority_start..]
        .find('/')
        .map_or(url.len(), |i| authority_start + i);
    let base = &url[..path_start];
    match path {
        Some(p) if !p.starts_with('/') => {
            Err(Error::invalid(format!("path {p:?} must start with '/'")))
        }
        Some(p) => Ok(format!("{base}{p}")),
        None if path_start == url.len() => Ok(format!("{base}{K3S_PATH}")),
        None => Ok(url.to_owned()),
    }
}

fn emit(settings: &AgentSettings, counters: &AgentCounters, event: &AgentEvent<'_>) {
    let (kind, result, message) = match event {
        AgentEvent::Connected => {
            counters.connected.store(true, Ordering::SeqCst);
            counters.sessions.fetch_add(1, Ordering::SeqCst);
            (
                meshvpn_tunnel_event_kind::MESHVPN_TUNNEL_EVENT_CONNECTED,
                MESHVPN_OK,
                String::new(),
            )
        }
        AgentEvent::Disconnected(reason) => {
            counters.connected.store(false, Ordering::SeqCst);
            (
                meshvpn_tunnel_event_kind::MESHVPN_TUNNEL_EVENT_DISCONNECTED,
                MESHVPN_OK,
                (*reason).to_owned(),
            )
        }
        AgentEvent::ConnectFailed(e) => (
            meshvpn_tunnel_event_kind::MESHVPN_TUNNEL_EVENT_ERROR,
            tunnel_code(e),
            e.to_string(),
        ),
    };
    let Some((callback, userdata)) = settings.event else {
        return;
    };
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let event = meshvpn_tunnel_event {
        kind,
        result,
        message: message.as_ptr(),
    };
    let _guard = callback::Guard::enter(Inside::Tunnel);
    // SAFETY: the caller registered this callback for this userdata and
    // promised it may run on the agent's thread; `event` and its message
    // live across the call.
    unsafe { callback(userdata.0, &event) };
}

/// Reads the agent configuration; every string is copied.
///
/// # Safety
/// The pointers in `c` are valid as `meshvpn_tunnel_agent_config` documents.
unsafe fn read_agent_config(
    c: &meshvpn_tunnel_agent_config,
    counters: &Arc<AgentCounters>,
) -> Result<AgentSettings> {
    // SAFETY: the caller's promise about `c`'s strings (all of this block).
    let (url, path, ca, cert, key, token, client_id) = unsafe {
        (
            ptr::try_str(c.url, "config->url")?,
            ptr::try_opt_str(c.path, "config->path")?,
            ptr::try_opt_str(c.ca_pem, "config->ca_pem")?,
            ptr::try_opt_str(c.client_cert_pem, "config->client_cert_pem")?,
            ptr::try_opt_str(c.client_key_pem, "config->client_key_pem")?,
            ptr::try_opt_str(c.token, "config->token")?,
            ptr::try_opt_str(c.client_id, "config->client_id")?,
        )
    };
    let url = url_with_path(url, path)?;
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c.as_bytes(), k.as_bytes())),
        (None, None) => None,
        _ => {
            return Err(Error::invalid(
                "client_cert_pem and client_key_pem go together",
            ))
        }
    };
    let tls = match ca {
        Some(ca) => Some(tls::client_config(ca.as_bytes(), identity).map_err(tls_error)?),
        None if url.starts_with("wss://") => {
            return Err(Error::invalid(
                "wss:// needs ca_pem, the CA that signed the server's certificate",
            ))
        }
        None if identity.is_some() => {
            return Err(Error::invalid(
                "a client certificate needs ca_pem and wss://",
            ))
        }
        None => None,
    };
    // SAFETY: the caller's promise about `allow`.
    let patterns = unsafe { ptr::try_slice(c.allow, c.allow_len, "config->allow") }?;
    let inner: Box<dyn ConnectPolicy> = match c.allow_callback {
        Some(_) if !patterns.is_empty() => {
            return Err(Error::invalid(
                "give allow patterns or an allow_callback, not both",
            ))
        }
        Some(callback) => Box::new(CallbackPolicy {
            callback,
            userdata: Userdata(c.allow_userdata),
        }),
        None if patterns.is_empty() => Box::new(AllowList::k3s_default()),
        None => {
            let mut list = Vec::with_capacity(patterns.len());
            for (i, &p) in patterns.iter().enumerate() {
                // SAFETY: the caller's promise about each pattern.
                let p = unsafe { ptr::try_str(p, "config->allow[i]") }?;
                let pattern: TargetPattern = p
                    .parse()
                    .map_err(|e: String| Error::invalid(format!("allow[{i}]: {e}")))?;
                list.push(pattern);
            }
            Box::new(AllowList(list))
        }
    };
    let mut headers = Vec::new();
    if let Some(id) = client_id {
        headers.push(("X-Tunnel-ID".to_owned(), id.to_owned()));
    }
    let token = token.map(str::to_owned);
    let policy: Arc<dyn ConnectPolicy> = Arc::new(CountingPolicy {
        inner,
        counters: counters.clone(),
    });
    let through: Arc<dyn TargetDialer> = if c.netstack.is_null() {
        Arc::new(OsDialer::default())
    } else {
        let ns = crate::netstack::lookup(c.netstack)?;
        Arc::new(MeshDialer::new(ns.stack.clone()))
    };
    let dialer: Arc<dyn TargetDialer> = Arc::new(CountingDialer {
        inner: through,
        counters: counters.clone(),
    });
    let config = move || {
        let mut config = AgentConfig::new(url.clone(), policy.clone(), dialer.clone());
        config.tls = tls.clone();
        config.token = token.clone();
        config.headers = headers.clone();
        config
    };
    Ok(AgentSettings {
        config: Box::new(config),
        event: c.event_callback.map(|cb| (cb, Userdata(c.event_userdata))),
    })
}

impl AgentHandle {
    fn start(self: &Arc<Self>) -> Result<()> {
        let mut slot = self.agent.lock();
        if slot.is_some() {
            return Ok(());
        }
        let mut config = (self.settings.config)();
        // A weak reference: the agent's thread must not keep its own handle alive.
        let me = Arc::downgrade(self);
        config.on_event = Some(Arc::new(move |event| {
            if let Some(me) = me.upgrade() {
                emit(&me.settings, &me.counters, &event);
            }
        }));
        *slot = Some(Agent::start(config)?);
        Ok(())
    }

    fn stop(&self) {
        let agent = self.agent.lock().take();
        // Outside the lock: stopping joins the agent's thread, whose event
        // callback may be calling meshvpn_tunnel_agent_get_status.
        if let Some(agent) = agent {
            agent.stop();
        }
        self.counters.connected.store(false, Ordering::SeqCst);
    }
}

impl Handled for AgentHandle {
    const NAME: &'static str = "meshvpn_tunnel_agent";
    // Freeing from the agent's callbacks would join the thread they run on.
    const FREE_REFUSED_INSIDE: &'static [Inside] = &[Inside::Log, Inside::Tunnel];

    fn close(&self) {
        self.stop();
    }
}

fn lookup_agent(handle: *const meshvpn_tunnel_agent) -> Result<Arc<AgentHandle>> {
    AGENTS.lookup(handle)
}

/// Creates an agent from `config` without starting it. On success
/// `*out_agent` receives a handle the caller owns and must release with
/// `meshvpn_tunnel_agent_free`. `config` and its strings are only read
/// during the call (the callbacks and userdata pointers are kept).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_ARGUMENT` (no scheme,
/// `wss://` without `ca_pem`, a bad allow pattern, both patterns and a
/// callback, text that is not UTF-8), `MESHVPN_TUNNEL_TLS` (a PEM that does
/// not parse, a key that does not fit its certificate).
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_agent_new(
    config: *const meshvpn_tunnel_agent_config,
    out_agent: *mut *mut meshvpn_tunnel_agent,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        let out = Out::new(out_agent, "out_agent")?;
        let counters = Arc::new(AgentCounters::default());
        // SAFETY: the config's pointers are valid as its doc says.
        let settings = unsafe { read_agent_config(c, &counters) }?;
        let handle = Arc::new(AgentHandle {
            settings,
            counters,
            agent: Mutex::new(None),
        });
        out.write(AGENTS.insert(handle)?);
        Ok(())
    }}
}

/// Starts the agent: it connects in the background and reconnects with
/// exponential backoff (0.5 s up to 30 s, with jitter) whenever the session
/// ends, until stopped. Returns at once; connection failures arrive as
/// events (and in the status), not here. Starting a started agent does
/// nothing.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_agent_start(agent: *mut meshvpn_tunnel_agent) -> meshvpn_result {
    ffi_boundary! {{
        lookup_agent(agent)?.start()
    }}
}

/// Stops the agent: the session ends (streams through it fail on the
/// server with `MESHVPN_TUNNEL_RESET`) and its threads are joined before
/// this returns; no event callback runs afterwards. Stopping a stopped
/// agent does nothing; `meshvpn_tunnel_agent_start` starts it again.
///
/// Errors: `MESHVPN_INVALID_HANDLE`; `MESHVPN_WOULD_DEADLOCK` from inside
/// the agent's own callbacks.
///
/// Thread safety: safe to call from any thread except the agent's callbacks.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_agent_stop(agent: *mut meshvpn_tunnel_agent) -> meshvpn_result {
    ffi_boundary! {{
        callback::refuse_inside(&[Inside::Tunnel], "meshvpn_tunnel_agent_stop")?;
        lookup_agent(agent)?.stop();
        Ok(())
    }}
}

/// Waits until the agent has a session with the server (`MESHVPN_OK`) or
/// `timeout_ms` passes (`MESHVPN_TIMEOUT`; `MESHVPN_WAIT_FOREVER` waits
/// without a deadline).
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_TIMEOUT`,
/// `MESHVPN_TUNNEL_NOT_RUNNING` (not started, or stopped while waiting).
///
/// Thread safety: safe to call from any thread; do not call it from the
/// agent's callbacks (it would wait for the thread it runs on).
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_agent_wait_connected(
    agent: *mut meshvpn_tunnel_agent,
    timeout_ms: meshvpn_timeout_ms,
) -> meshvpn_result {
    ffi_boundary! {{
        callback::refuse_inside(&[Inside::Tunnel], "meshvpn_tunnel_agent_wait_connected")?;
        let a = lookup_agent(agent)?;
        let until = deadline(timeout_ms);
        loop {
            let slice = until.map_or(SESSION_WAIT_SLICE, |d| {
                d.saturating_duration_since(Instant::now()).min(SESSION_WAIT_SLICE)
            });
            {
                let running = a.agent.lock();
                let Some(running) = running.as_ref() else {
                    return Err(Error::new(MESHVPN_TUNNEL_NOT_RUNNING, "start the agent first"));
                };
                if running.status().connected {
                    return Ok(());
                }
            }
            if until.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::new(
                    MESHVPN_TIMEOUT,
                    format!("not connected within {timeout_ms} ms"),
                ));
            }
            std::thread::sleep(slice);
        }
    }}
}

/// Writes the agent's counters into `*out_status`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread, including the agent's
/// callbacks.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_agent_get_status(
    agent: *mut meshvpn_tunnel_agent,
    out_status: *mut meshvpn_tunnel_agent_status,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_status, "out_status")?;
        let a = lookup_agent(agent)?;
        let c = &a.counters;
        let sessions = c.sessions.load(Ordering::SeqCst);
        out.write(meshvpn_tunnel_agent_status {
            connected: c.connected.load(Ordering::SeqCst),
            sessions,
            reconnects: sessions.saturating_sub(1),
            streams_active: c.streams_active.load(Ordering::Relaxed),
            streams_total: c.streams_total.load(Ordering::Relaxed),
            streams_refused: c.streams_refused.load(Ordering::Relaxed),
            bytes_to_targets: c.bytes_to_targets.load(Ordering::Relaxed),
            bytes_from_targets: c.bytes_from_targets.load(Ordering::Relaxed),
        });
        Ok(())
    }}
}

/// Stops the agent (as `meshvpn_tunnel_agent_stop`) and releases it. The
/// handle and its copies are dead afterwards (`MESHVPN_INVALID_HANDLE`).
/// Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`; `MESHVPN_WOULD_DEADLOCK` from inside
/// the agent's callbacks (nothing is freed then).
///
/// Thread safety: safe to call from any thread except the agent's callbacks.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_agent_free(agent: *mut meshvpn_tunnel_agent) -> meshvpn_result {
    ffi_boundary! {{
        AGENTS.free(agent)
    }}
}

// ------------------------------------------------------------------ server

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
    config: ServerConfig,
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
            config,
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
        let bound = TunnelServer::bind(addr, s.config.clone()).map_err(|e| {
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
        out_len.write(unsafe { ptr::copy_text(buf, buf_len, &addr) }?);
        Ok(())
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
        out_len.write(unsafe { ptr::copy_text(buf, buf_len, &keys) }?);
        Ok(())
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

// ------------------------------------------------------------------ stream

/// A stream through a tunnel, from `meshvpn_tunnel_server_dial`. Opaque:
/// released by `meshvpn_tunnel_stream_free`. A handle, never dereferenced.
pub struct meshvpn_tunnel_stream {
    _private: [u8; 0],
}

struct StreamHandle {
    stream: TunnelStream,
    /// Closed by `meshvpn_tunnel_stream_close` (or free): reads report
    /// `MESHVPN_TUNNEL_CLOSED` instead of end of stream.
    closed: AtomicBool,
}

impl StreamHandle {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stream.close();
    }

    fn io_error(&self, e: &io::Error) -> Error {
        let code = if self.closed.load(Ordering::SeqCst) {
            MESHVPN_TUNNEL_CLOSED
        } else {
            stream_code(e)
        };
        Error::new(code, e.to_string())
    }
}

static STREAMS: HandleTable<meshvpn_tunnel_stream, StreamHandle> =
    HandleTable::new(tag::TUNNEL_STREAM);

impl Handled for StreamHandle {
    const NAME: &'static str = "meshvpn_tunnel_stream";

    fn close(&self) {
        StreamHandle::close(self);
    }
}

fn lookup_stream(handle: *const meshvpn_tunnel_stream) -> Result<Arc<StreamHandle>> {
    STREAMS.lookup(handle)
}

/// A stream for reading or writing: not closed on this side.
fn lookup_open_stream(handle: *const meshvpn_tunnel_stream) -> Result<Arc<StreamHandle>> {
    let s = lookup_stream(handle)?;
    if s.closed.load(Ordering::SeqCst) {
        return Err(Error::new(MESHVPN_TUNNEL_CLOSED, "the stream was closed"));
    }
    Ok(s)
}

/// Reads up to `len` bytes into `buf`, waiting up to `timeout_ms` for data
/// (0: do not wait; `MESHVPN_WAIT_FOREVER`: no deadline). On success
/// `*out_n` receives the count; 0 means the far side closed the stream
/// cleanly (end of stream), or `len` was 0.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT` (impossible `len`), `MESHVPN_TIMEOUT`,
/// `MESHVPN_INTERRUPTED` (`meshvpn_tunnel_stream_interrupt`),
/// `MESHVPN_TUNNEL_CLOSED` (closed on this side, also while waiting),
/// `MESHVPN_TUNNEL_REFUSED` (the agent refused the target),
/// `MESHVPN_TUNNEL_RESET` (the far side failed it or the tunnel went down).
///
/// Thread safety: safe to call from any thread; one reader and one writer
/// may run at once, and close or free from a third thread wakes both.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_stream_read(
    stream: *mut meshvpn_tunnel_stream,
    buf: *mut u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_n, "out_n")?;
        // SAFETY: the caller promises `buf` has `len` writable bytes.
        let buf = unsafe { ptr::try_slice_mut(buf, len, "buf") }?;
        let s = lookup_open_stream(stream)?;
        let n = s.stream.read_until(buf, deadline(timeout_ms)).map_err(|e| s.io_error(&e))?;
        if n == 0 && !buf.is_empty() && s.closed.load(Ordering::SeqCst) {
            return Err(Error::new(MESHVPN_TUNNEL_CLOSED, "the stream was closed while reading"));
        }
        out.write(n);
        Ok(())
    }}
}

/// Writes up to `len` bytes of `buf`, waiting up to `timeout_ms` while the
/// far side has paused the stream or its queue is full; on success `*out_n`
/// receives how many were taken (at least 1 unless `len` is 0; call again
/// for the rest).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED`,
/// `MESHVPN_TUNNEL_CLOSED` (closed or shut down for writing on this
/// side), `MESHVPN_TUNNEL_REFUSED`, `MESHVPN_TUNNEL_RESET`.
///
/// Thread safety: as `meshvpn_tunnel_stream_read`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_tunnel_stream_write(
    stream: *mut meshvpn_tunnel_stream,
    buf: *const u8,
    len: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_n: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_n, "out_n")?;
        // SAFETY: the caller promises `buf` has `len` readable bytes.
        let buf = unsafe { ptr::try_slice(buf, len, "buf") }?;
        let s = lookup_open_stream(stream)?;
        let n = s.stream.write_until(buf, deadline(timeout_ms)).map_err(|e| s.io_error(&e))?;
        out.write(n);
        Ok(())
    }}
}

/// Ends writing: data already written still goes out, then the far side
/// reads end of stream. The remotedialer protocol has no half-close, so
/// this ends the stream in both directions: later reads return end of
/// stream (`*out_n` 0), later writes `MESHVPN_TUNNEL_CLOSED`.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_shutdown_write(
    stream: *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        lookup_stream(stream)?.stream.close();
        Ok(())
    }}
}

/// Wakes the reads and writes blocked on the stream without closing it:
/// they return `MESHVPN_INTERRUPTED`, and so does the next one that has to
/// wait (once; it may be spurious: treat it as "look at the deadline
/// again"). For callers whose deadline changed while a call waited, like
/// Go's `SetDeadline`; the same contract as `meshvpn_conn_interrupt`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread, concurrently with reads
/// and writes on the same stream.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_interrupt(
    stream: *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        lookup_stream(stream)?.stream.interrupt();
        Ok(())
    }}
}

/// Closes the stream (the far side reads end of stream after the data
/// already written) and wakes every read and write blocked on it, which
/// return `MESHVPN_TUNNEL_CLOSED`, as do later calls. The handle stays
/// valid until `meshvpn_tunnel_stream_free`. Closing twice does nothing.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread, concurrently with reads
/// and writes on the same stream.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_close(
    stream: *mut meshvpn_tunnel_stream,
) -> meshvpn_result {
    ffi_boundary! {{
        STREAMS.close(stream)
    }}
}

/// Closes the stream (as `meshvpn_tunnel_stream_close`) and releases it.
/// The handle and its copies are dead afterwards; calls blocked on it on
/// other threads return `MESHVPN_TUNNEL_CLOSED`. Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_tunnel_stream_free(stream: *mut meshvpn_tunnel_stream) -> meshvpn_result {
    ffi_boundary! {{
        STREAMS.free(stream)
    }}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_path_rules() {
        assert_eq!(
            url_with_path("wss://h:6443", None).unwrap(),
            "wss://h:6443/v1-k3s/connect"
        );
        assert_eq!(
            url_with_path("wss://h:6443/x", None).unwrap(),
            "wss://h:6443/x"
        );
        assert_eq!(
            url_with_path("wss://h:6443/x", Some("/y")).unwrap(),
            "wss://h:6443/y"
        );
        assert!(url_with_path("h:6443", None).is_err());
        assert!(url_with_path("wss://h", Some("y")).is_err());
    }

    #[test]
    fn stream_errors_are_classified() {
        let reset = |t: &str| io::Error::new(io::ErrorKind::ConnectionReset, t.to_owned());
        assert_eq!(
            stream_code(&reset("connect not allowed")),
            MESHVPN_TUNNEL_REFUSED
        );
        assert_eq!(
            stream_code(&reset("dial tcp 127.0.0.1:1: connect: connection refused")),
            MESHVPN_TUNNEL_REFUSED
        );
        assert_eq!(
            stream_code(&reset("tunnel disconnect")),
            MESHVPN_TUNNEL_RESET
        );
        assert_eq!(
            stream_code(&io::ErrorKind::TimedOut.into()),
            MESHVPN_TIMEOUT
        );
        assert_eq!(
            stream_code(&io::ErrorKind::Interrupted.into()),
            MESHVPN_INTERRUPTED
        );
        assert_eq!(
            stream_code(&io::ErrorKind::BrokenPipe.into()),
            MESHVPN_TUNNEL_CLOSED
        );
    }
}
