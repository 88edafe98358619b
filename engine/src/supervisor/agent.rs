//! The agent role: keeps a websocket open to the server (reconnecting with
//! exponential backoff and jitter) and dials the targets the server asks for,
//! when its policy allows them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::WebSocket;

use super::agent_stats::{AgentCounters, AgentStats};
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
    /// Where the agent counts (see [`AgentStats`]); fresh by default. Pass
    /// the same counters to the next `Agent::start` to count across a
    /// stop and start.
    pub counters: Arc<AgentCounters>,
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
            counters: Arc::default(),
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
}

/// One stream's claim on `AgentCounters::streams_active` (what
/// `Limits::max_agent_streams` caps), given back when its threads are done
/// (or could not start).
struct StreamSlot(Arc<AgentCounters>);

impl StreamSlot {
    fn claim(shared: &AgentShared) -> Option<StreamSlot> {
        let cap = shared.config.limits.max_agent_streams;
        let counters = &shared.config.counters;
        counters
            .streams_active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(counters.clone()))
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
        });
        Ok(Self {
            client: Reconnecting::start("tunnel-agent", shared, initial, max)?,
        })
    }

    pub fn status(&self) -> AgentStatus {
        let link = self.client.status();
        let stats = self.stats();
        AgentStatus {
            connected: link.connected,
            // Counted across stops and starts that share `counters`.
            sessions: stats.sessions,
            last_error: link.last_error,
            streams_active: stats.streams_active as usize,
            streams_refused_at_cap: stats.streams_refused_at_cap,
        }
    }

    /// The agent's counters (those of [`AgentConfig::counters`]).
    pub fn stats(&self) -> AgentStats {
        self.client.protocol().config.counters.snapshot()
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
        let counters = &self.config.counters;
        counters.connected.store(true, Ordering::SeqCst);
        counters.sessions.fetch_add(1, Ordering::SeqCst);
        self.event(AgentEvent::Connected);
    }

    fn on_disconnected(&self, reason: &str) {
        self.config
            .counters
            .connected
            .store(false, Ordering::SeqCst);
        self.event(AgentEvent::Disconnected(reason));
    }

    fn on_connect_failed(&self, error: &TunnelError) {
        self.config
            .counters
            .connected
            .store(false, Ordering::SeqCst);
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
        let counters = &self.shared.config.counters;
        if !self.shared.config.policy.allows(&proto, &address) {
            AgentCounters::count(&counters.streams_refused);
            tracing::info!(conn = conn.0, %proto, %address, "tunnel: refused connect");
            inner.core.refuse(conn, "connect not allowed");
            session.after_op(&mut inner);
            return;
        }
        let Some(slot) = StreamSlot::claim(&self.shared) else {
            AgentCounters::count(&counters.streams_refused_at_cap);
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
        let counters = counters.clone();
        let spawned = std::thread::Builder::new()
            .name("tunnel-dial".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                match dialer.dial(&proto, &address) {
                    Ok(target) => pump(stream, counters.dialed(target)),
                    Err(e) => {
                        AgentCounters::count(&counters.dials_failed);
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
