//! The agent role: keeps a websocket open to the server (reconnecting with
//! exponential backoff and jitter) and dials the targets the server asks for,
//! when its policy allows them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::WebSocket;

use super::driver::{self, Incoming, SessionHooks, SessionShared};
use super::target::{pump, ConnectPolicy, TargetDialer};
use super::TunnelStream;
use super::{Limits, Role};
use crate::ws::reconnect::{
    Protocol, Reconnecting, Up, WebsocketTarget, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX,
    DEFAULT_HANDSHAKE_TIMEOUT,
};
use crate::ws::transport::Transport;
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
    /// TCP connect, TLS and the upgrade together ([`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// The first wait after a failure ([`DEFAULT_BACKOFF_INITIAL`]); see
    /// [`crate::ws::STABLE_SESSION`] for when it starts over.
    pub backoff_initial: Duration,
    /// The longest wait between attempts ([`DEFAULT_BACKOFF_MAX`]).
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
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
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
    client: Reconnecting<AgentShared>,
}

impl Agent {
    /// Starts connecting in the background.
    pub fn start(config: AgentConfig) -> Result<Self, TunnelError> {
        let (initial, max) = (config.backoff_initial, config.backoff_max);
        let shared = Arc::new(AgentShared {
            config,
            current: Mutex::new(None),
            streams_active: AtomicUsize::new(0),
            streams_refused_at_cap: AtomicU64::new(0),
        });
        Ok(Self {
            client: Reconnecting::start("tunnel-agent", shared, initial, max)?,
        })
    }

    pub fn status(&self) -> AgentStatus {
        let link = self.client.status();
        let shared = self.client.protocol();
        AgentStatus {
            connected: link.connected,
            sessions: link.sessions,
            last_error: link.last_error,
            streams_active: shared.streams_active.load(Ordering::SeqCst),
            streams_refused_at_cap: shared.streams_refused_at_cap.load(Ordering::SeqCst),
        }
    }

    /// Waits until a session is up (`true`) or `timeout` passes.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        self.client.wait_connected(timeout)
    }

    /// Stops and waits for the background thread; open streams fail.
    pub fn stop(mut self) {
        self.client.stop();
    }
}

impl Protocol for AgentShared {
    const NAME: &'static str = "tunnel";
    type Ticket = ();

    fn target(&self) -> WebsocketTarget<'_> {
        WebsocketTarget {
            url: &self.config.url,
            tls: self.config.tls.as_ref(),
            token: self.config.token.as_deref(),
            headers: &self.config.headers,
            timeout: self.config.handshake_timeout,
        }
    }

    fn websocket_config(&self) -> WebSocketConfig {
        driver::websocket_config()
    }

    fn ticket(&self) -> Option<()> {
        Some(())
    }

    fn run(
        this: &Arc<Self>,
        ws: WebSocket<Transport>,
        (): (),
        up: &Up<'_>,
    ) -> Result<String, TunnelError> {
        let hooks = AgentHooks {
            shared: this.clone(),
            up,
        };
        let reason = driver::run(
            ws,
            Role::Agent,
            this.config.limits.clone(),
            "server".into(),
            &hooks,
        );
        *this.current.lock() = None;
        Ok(reason)
    }

    fn interrupt(&self) {
        if let Some(s) = self.current.lock().as_ref() {
            s.stop("agent stopped");
        }
    }

    fn on_connected(&self) {
        self.event(AgentEvent::Connected);
    }

    fn on_disconnected(&self, reason: &str) {
        self.event(AgentEvent::Disconnected(reason));
    }

    fn on_connect_failed(&self, error: &TunnelError) {
        self.event(AgentEvent::ConnectFailed(error));
    }
}

struct AgentHooks<'a> {
    shared: Arc<AgentShared>,
    up: &'a Up<'a>,
}

impl SessionHooks for AgentHooks<'_> {
    fn started(&self, session: &Arc<SessionShared>) {
        *self.shared.current.lock() = Some(session.clone());
        if !self.up.connected() {
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
