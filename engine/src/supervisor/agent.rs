//! The agent role: keeps a websocket open to the server (reconnecting with
//! exponential backoff and jitter) and dials the targets the server asks for,
//! when its policy allows them.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;

use super::driver::{self, Incoming, SessionHooks, SessionShared};
use super::target::{pump, ConnectPolicy, TargetDialer};
use super::TunnelStream;
use super::{Limits, Role};
use crate::ws::transport::{Socket, Transport};
use crate::ws::TunnelError;

/// How an agent connects and what it allows.
pub struct AgentConfig {
    /// `wss://host:port/path` (or `ws://` for tests), e.g.
    /// `wss://server:6443/v1-k3s/connect`.
    pub url: String,
    /// Required for `wss://`: the trusted CA and the optional client identity.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Sent as `Authorization: Bearer ...`. Never logged.
    pub token: Option<String>,
    /// Extra request headers (e.g. `X-Tunnel-ID`).
    pub headers: Vec<(String, String)>,
    pub policy: Arc<dyn ConnectPolicy>,
    pub dialer: Arc<dyn TargetDialer>,
    pub limits: Limits,
    pub handshake_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Called on the agent's threads as sessions come and go; must not
    /// block for long and must not stop the agent.
    pub on_event: Option<AgentEventHook>,
}

/// What an agent reports to its `on_event` hook.
#[derive(Debug)]
pub enum AgentEvent<'a> {
    /// A session is up.
    Connected,
    /// The session ended, for this reason; the agent reconnects unless stopped.
    Disconnected(&'a str),
    /// An attempt to connect failed; the agent retries after a backoff.
    ConnectFailed(&'a TunnelError),
}

/// See [`AgentConfig::on_event`].
pub type AgentEventHook = Arc<dyn Fn(AgentEvent<'_>) + Send + Sync>;

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    pub fn new(
        url: impl Into<String>,
        policy: Arc<dyn ConnectPolicy>,
        dialer: Arc<dyn TargetDialer>,
    ) -> Self {
        Self {
            url: url.into(),
            tls: None,
            token: None,
            headers: Vec::new(),
            policy,
            dialer,
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            on_event: None,
        }
    }
}

/// What an agent is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub connected: bool,
    /// Sessions established so far.
    pub sessions: u64,
    /// Why the last session or attempt ended.
    pub last_error: Option<String>,
    /// Streams being dialed or pumped to targets now (two threads each).
    pub streams_active: usize,
    /// Connects refused because `Limits::max_agent_streams` streams were active.
    pub streams_refused_at_cap: u64,
}

struct AgentShared {
    config: AgentConfig,
    stop: AtomicBool,
    sessions: AtomicU64,
    status: Mutex<AgentStatus>,
    changed: Condvar,
    current: Mutex<Option<Arc<SessionShared>>>,
    /// Streams holding threads now; see `Limits::max_agent_streams`.
    streams_active: AtomicUsize,
    streams_refused_at_cap: AtomicU64,
}

/// One stream's claim on `AgentShared::streams_active`, given back when its
/// threads are done (or could not start).
struct StreamSlot(Arc<AgentShared>);

impl StreamSlot {
    fn claim(shared: &Arc<AgentShared>) -> Option<StreamSlot> {
        let cap = shared.config.limits.max_agent_streams;
        shared
            .streams_active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(shared.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AgentShared {
    fn event(&self, event: AgentEvent<'_>) {
        if let Some(hook) = &self.config.on_event {
            hook(event);
        }
    }
}

/// A running agent. Dropping it stops it.
pub struct Agent {
    shared: Arc<AgentShared>,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    /// Starts connecting in the background.
    pub fn start(config: AgentConfig) -> Result<Self, TunnelError> {
        check_url(&config.url, config.tls.is_some())?;
        let shared = Arc::new(AgentShared {
            config,
            stop: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            status: Mutex::new(AgentStatus::default()),
            changed: Condvar::new(),
            current: Mutex::new(None),
            streams_active: AtomicUsize::new(0),
            streams_refused_at_cap: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tunnel-agent".into())
            .spawn(move || connect_loop(&worker))
            .map_err(TunnelError::Io)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> AgentStatus {
        let mut status = self.shared.status.lock().clone();
        status.streams_active = self.shared.streams_active.load(Ordering::SeqCst);
        status.streams_refused_at_cap = self.shared.streams_refused_at_cap.load(Ordering::SeqCst);
        status
    }

    /// Waits until a session is up (`true`) or `timeout` passes.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        crate::ws::wait_for(&self.shared.status, &self.shared.changed, timeout, |s| {
            s.connected
        })
    }

    /// Stops and waits for the background thread; open streams fail.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.shared.current.lock().as_ref() {
            s.stop("agent stopped");
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Cheap jitter without a random source: the clock's nanoseconds, mixed.
/// Exponential backoff with jitter between reconnect attempts.
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt: the full backoff times a factor
    /// in [0.5, 1.0), doubling up to the maximum; a session that lasted
    /// over 30 s starts again from the initial value.
    pub(crate) fn next(&mut self, session_lasted: Duration) -> Duration {
        if session_lasted > Duration::from_secs(30) {
            self.next = self.initial;
        }
        let delay = self.next.mul_f64(0.5 + jitter_fraction() / 2.0);
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % 1000) as f64 / 1000.0
}

fn connect_loop(shared: &Arc<AgentShared>) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    while !shared.stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = connect_once(config).map(|ws| {
            shared.sessions.fetch_add(1, Ordering::SeqCst);
            tracing::info!(url = %config.url, "tunnel: connected");
            let hooks = AgentHooks {
                shared: shared.clone(),
            };
            driver::run(
                ws,
                Role::Agent,
                config.limits.clone(),
                "server".into(),
                &hooks,
            )
        });
        *shared.current.lock() = None;
        let error = match result {
            Ok(reason) => {
                // Ending because we were told to stop is no news.
                if shared.stop.load(Ordering::SeqCst) {
                    tracing::debug!(url = %config.url, %reason, "tunnel: session ended");
                } else {
                    tracing::warn!(url = %config.url, %reason, "tunnel: session ended");
                }
                shared.event(AgentEvent::Disconnected(&reason));
                reason
            }
            Err(e) => {
                tracing::warn!(url = %config.url, error = %e, "tunnel: connect failed");
                shared.event(AgentEvent::ConnectFailed(&e));
                e.to_string()
            }
        };
        {
            let mut status = shared.status.lock();
            status.connected = false;
            status.last_error = Some(error);
        }
        shared.changed.notify_all();
        let delay = backoff.next(started.elapsed());
        let deadline = Instant::now() + delay;
        let mut status = shared.status.lock();
        while !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            shared.changed.wait_until(&mut status, deadline);
        }
    }
}

fn connect_once(config: &AgentConfig) -> Result<tungstenite::WebSocket<Transport>, TunnelError> {
    open_websocket(
        &WebsocketTarget {
            url: &config.url,
            tls: config.tls.as_ref(),
            token: config.token.as_deref(),
            headers: &config.headers,
            timeout: config.handshake_timeout,
        },
        driver::websocket_config(),
    )
}

/// Where a client websocket goes and how it authenticates.
pub(crate) struct WebsocketTarget<'a> {
    pub(crate) url: &'a str,
    pub(crate) tls: Option<&'a Arc<rustls::ClientConfig>>,
    pub(crate) token: Option<&'a str>,
    pub(crate) headers: &'a [(String, String)],
    pub(crate) timeout: Duration,
}

/// Checks a client URL: `wss://` with TLS settings, or `ws://` (tests).
pub(crate) fn check_url(url: &str, has_tls: bool) -> Result<(), TunnelError> {
    let request = url
        .into_client_request()
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let scheme = request.uri().scheme_str().unwrap_or("");
    if scheme == "wss" && !has_tls {
        return Err(TunnelError::Config(
            "wss:// needs a TLS configuration with the server's CA".into(),
        ));
    }
    if scheme != "wss" && scheme != "ws" {
        return Err(TunnelError::Config(format!(
            "unsupported URL scheme {scheme:?}: use wss:// (or ws:// for tests)"
        )));
    }
    Ok(())
}

/// Connects, runs TLS and the HTTP upgrade. The socket stays in handshake
/// mode (blocking, with the deadline `target.timeout` from now) so the
/// caller can finish its own exchange within the same deadline.
pub(crate) fn open_websocket(
    target: &WebsocketTarget<'_>,
    ws_config: tungstenite::protocol::WebSocketConfig,
) -> Result<tungstenite::WebSocket<Transport>, TunnelError> {
    let mut request = target
        .url
        .into_client_request()
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let uri = request.uri().clone();
    let secure = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| TunnelError::Config("URL has no host".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    if let Some(token) = target.token {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| TunnelError::Config("token is not a valid header value".into()))?;
        value.set_sensitive(true);
        request.headers_mut().insert("Authorization", value);
    }
    for (name, value) in target.headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| TunnelError::Config(format!("bad header name {name}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| TunnelError::Config("bad header value".into()))?;
        request.headers_mut().insert(name, value);
    }
    let deadline = Instant::now() + target.timeout;
    let mut last = None;
    let mut tcp = None;
    for addr in (host.as_str(), port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, target.timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = match (tcp, last) {
        (Some(t), _) => t,
        (None, Some(e)) => return Err(TunnelError::Io(e)),
        (None, None) => return Err(TunnelError::Config(format!("{host} has no address"))),
    };
    tcp.set_nodelay(true)?;
    let sock = Socket::with_deadline(tcp, deadline);
    let transport = if secure {
        let tls = target
            .tls
            .cloned()
            .ok_or_else(|| TunnelError::Config("wss:// needs TLS settings".into()))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| TunnelError::Config(format!("bad server name {host}")))?;
        let conn = rustls::ClientConnection::new(tls, name)
            .map_err(|e| TunnelError::Tls(e.to_string()))?;
        Transport::tls(sock, conn.into()).map_err(|e| tls_failure(&e))?
    } else {
        Transport::plain(sock)
    };
    let (ws, _response) =
        tungstenite::client::client_with_config(request, transport, Some(ws_config)).map_err(
            |e| match e {
                tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
                    TunnelError::Rejected(resp.status())
                }
                // TLS 1.3 sends the certificate_required alert after the
                // client's Finished: it arrives with the HTTP response.
                tungstenite::HandshakeError::Failure(tungstenite::Error::Io(e))
                    if certificate_required(&e) =>
                {
                    TunnelError::ClientCertificateRequired
                }
                other => TunnelError::Handshake(other.to_string()),
            },
        )?;
    Ok(ws)
}

/// A failed TLS handshake as a tunnel error.
fn tls_failure(e: &std::io::Error) -> TunnelError {
    if certificate_required(e) {
        TunnelError::ClientCertificateRequired
    } else {
        TunnelError::Tls(e.to_string())
    }
}

/// Whether `e` is the server's `certificate_required` alert (TLS 1.3; a
/// TLS 1.2 server says only `handshake_failure`, which has other causes).
fn certificate_required(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
            )
        })
}

struct AgentHooks {
    shared: Arc<AgentShared>,
}

impl SessionHooks for AgentHooks {
    fn started(&self, session: &Arc<SessionShared>) {
        *self.shared.current.lock() = Some(session.clone());
        let mut status = self.shared.status.lock();
        status.connected = true;
        status.sessions = self.shared.sessions.load(Ordering::SeqCst);
        drop(status);
        // Before waking waiters, so that one woken by the connect sees its event too.
        self.shared.event(AgentEvent::Connected);
        self.shared.changed.notify_all();
        if self.shared.stop.load(Ordering::SeqCst) {
            session.stop("agent stopped");
        }
    }

    fn incoming(&self, session: &Arc<SessionShared>, incoming: Incoming) {
        let Incoming {
            conn,
            proto,
            address,
        } = incoming;
        let mut inner = session.lock();
        if !self.shared.config.policy.allows(&proto, &address) {
            tracing::info!(conn = conn.0, %proto, %address, "tunnel: refused connect");
            inner.core.refuse(conn, "connect not allowed");
            session.after_op(&mut inner);
            return;
        }
        let Some(slot) = StreamSlot::claim(&self.shared) else {
            self.shared
                .streams_refused_at_cap
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = conn.0, "tunnel: refused connect, too many streams");
            inner.core.refuse(conn, "too many streams");
            session.after_op(&mut inner);
            return;
        };
        if inner.core.accept(conn).is_err() {
            return;
        }
        let stream = TunnelStream::register(session, &mut inner, conn);
        session.after_op(&mut inner);
        drop(inner);
        tracing::debug!(conn = conn.0, %proto, %address, "tunnel: dialing");
        let dialer = self.shared.config.dialer.clone();
        let spawned = std::thread::Builder::new()
            .name("tunnel-dial".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                match dialer.dial(&proto, &address) {
                    Ok(target) => pump(stream, target),
                    Err(e) => {
                        tracing::debug!(conn = conn.0, error = %e, "tunnel: dial failed");
                        stream.close_with(Some(&e.to_string()));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "tunnel: cannot start a dial thread");
        }
    }
}
