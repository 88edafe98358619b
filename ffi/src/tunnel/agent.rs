//! `meshvpn_tunnel_agent`: keeps a tunnel open to a server and dials the
//! targets it allows for the server. The agent counts for itself
//! (`meshvpn_engine::supervisor::AgentStats`); this module only adapts
//! its configuration, callbacks and counters to C.

use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;
use std::time::Instant;

use ::meshvpn_engine::netstack::MeshDialer;
use ::meshvpn_engine::supervisor::limits::MAX_AGENT_STREAMS;
use ::meshvpn_engine::supervisor::{
    url_with_path, Agent, AgentConfig, AgentCounters, AgentEvent, AllowList, ConnectPolicy,
    OsDialer, TargetDialer, TargetPattern,
};
use ::meshvpn_engine::ws::tls;
use parking_lot::Mutex;

use super::{tls_error, tunnel_code, SESSION_WAIT_SLICE};
use crate::callback::{self, Inside, Userdata};
use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::netstack::meshvpn_netstack;
use crate::ptr::{self, Out};
use crate::timeout::{deadline, meshvpn_timeout_ms};

use meshvpn_result::*;

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
    /// Streams the server may have the agent dial and relay at once (two
    /// threads each); more are refused ("too many streams", counted in
    /// `streams_refused_at_cap`). 0 means the default, 1024.
    pub max_streams: u32,
}

// The default `max_streams` documents.
const _: () = assert!(MAX_AGENT_STREAMS == 1024);

/// An agent's counters since `meshvpn_tunnel_agent_new` (across stops
/// and starts), from `meshvpn_tunnel_agent_get_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_tunnel_agent_status {
    /// A session with the server is up now.
    pub connected: bool,
    /// Sessions established since the agent was created.
    pub sessions: u64,
    /// Sessions after the first one: how often the agent reconnected.
    pub reconnects: u64,
    /// Streams being dialed or relayed to targets now.
    pub streams_active: u64,
    /// Streams whose target the agent dialed successfully.
    pub streams_total: u64,
    /// Targets the policy refused.
    pub streams_refused: u64,
    /// Bytes written to targets (from the server).
    pub bytes_to_targets: u64,
    /// Bytes read from targets (to the server).
    pub bytes_from_targets: u64,
    /// Targets refused because the agent's stream limit was reached.
    pub streams_refused_at_cap: u64,
    /// Allowed targets whose dial failed (refused, unreachable, timed out).
    pub dials_failed: u64,
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
    /// Handed to every `Agent` this handle starts: the counts run on
    /// across a stop and start.
    counters: Arc<AgentCounters>,
    agent: Mutex<Option<Agent>>,
}

static AGENTS: HandleTable<meshvpn_tunnel_agent, AgentHandle> = HandleTable::new(tag::TUNNEL_AGENT);

fn emit(settings: &AgentSettings, event: &AgentEvent<'_>) {
    let (kind, result, message) = match event {
        AgentEvent::Connected => (
            meshvpn_tunnel_event_kind::MESHVPN_TUNNEL_EVENT_CONNECTED,
            MESHVPN_OK,
            String::new(),
        ),
        AgentEvent::Disconnected(reason) => (
            meshvpn_tunnel_event_kind::MESHVPN_TUNNEL_EVENT_DISCONNECTED,
            MESHVPN_OK,
            (*reason).to_owned(),
        ),
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
unsafe fn read_agent_config(c: &meshvpn_tunnel_agent_config) -> Result<AgentSettings> {
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
    let policy: Arc<dyn ConnectPolicy> = match c.allow_callback {
        Some(_) if !patterns.is_empty() => {
            return Err(Error::invalid(
                "give allow patterns or an allow_callback, not both",
            ))
        }
        Some(callback) => Arc::new(CallbackPolicy {
            callback,
            userdata: Userdata(c.allow_userdata),
        }),
        None if patterns.is_empty() => Arc::new(AllowList::k3s_default()),
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
            Arc::new(AllowList(list))
        }
    };
    let mut headers = Vec::new();
    if let Some(id) = client_id {
        headers.push(("X-Tunnel-ID".to_owned(), id.to_owned()));
    }
    let token = token.map(str::to_owned);
    let dialer: Arc<dyn TargetDialer> = if c.netstack.is_null() {
        Arc::new(OsDialer::default())
    } else {
        let ns = crate::netstack::lookup(c.netstack)?;
        Arc::new(MeshDialer::new(ns.stack.clone()))
    };
    let max_streams = c.max_streams;
    let config = move || {
        let mut config = AgentConfig::new(url.clone(), policy.clone(), dialer.clone());
        if max_streams != 0 {
            config.limits.max_agent_streams = max_streams as usize;
        }
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
        config.counters = self.counters.clone();
        // A weak reference: the agent's thread must not keep its own handle alive.
        let me = Arc::downgrade(self);
        config.on_event = Some(Arc::new(move |event| {
            if let Some(me) = me.upgrade() {
                emit(&me.settings, &event);
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
        // SAFETY: the config's pointers are valid as its doc says.
        let settings = unsafe { read_agent_config(c) }?;
        let handle = Arc::new(AgentHandle {
            settings,
            counters: Arc::default(),
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
        out.write(lookup_agent(agent)?.counters.snapshot().into());
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
