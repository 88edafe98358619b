//! The node side of a mesh as a library: [`Node::start`] joins an engine
//! to the mesh a control server runs and keeps it there, for `meshvpn up`,
//! the C ABI (`meshvpn_join`) and Go (`meshvpn.Join`).
//!
//! ```text
//!   JoinConfig ──► ControlClient (reconnects, backoff) ── NodeState: full map, then deltas
//!                                                            │
//!   node thread: plan (crate::apply) ─ diff ─► engine peers, the map's packet filter
//!                                      └─ route diff ─► Host (kernel routes, or nothing)
//!                └─► events (bounded queue) and Node::status()
//! ```
//!
//! What depends on the operating system (addresses on a TUN, kernel
//! routes, the host's own addresses for the endpoints it reports) is
//! behind [`Host`], so the same loop runs `meshvpn up` with a TUN and a
//! userspace node (the engine's netstack, no TUN, no root) in a process.
//!
//! The data plane does not depend on the control server: while it is away
//! the engine keeps every peer it has, the client reconnects with backoff
//! and the first full map after it returns is diffed against what is
//! applied, so only what changed meanwhile is touched. A refusal retrying
//! cannot fix (a bad join key, the node removed) stops the node's loop; the
//! engine stays until [`Node::close`].

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshvpn_engine::filter::FilterRules;
use meshvpn_engine::netstack::{Netstack, NetstackConfig};
use meshvpn_engine::relay::RelayConfig;
use meshvpn_engine::{
    Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PeerUpdate, PrivateKey,
};
use parking_lot::{Condvar, Mutex};
use zeroize::Zeroizing;

use crate::apply::{self, Change, Plan, PlanOptions, MESH_KEEPALIVE};
use crate::client::{
    ClientError, ClientStatus, ControlClient, ControlClientConfig, JoinRequest, NodeInfo, NodeState,
};
use crate::proto::{ErrorCode, RouteState, MAX_ENDPOINTS};

/// How often the node's loop looks at the map and the engine when nothing
/// wakes it sooner.
const TICK: Duration = Duration::from_millis(200);
/// How often the host's addresses are re-read for the endpoints reported.
const ENDPOINTS_EVERY: Duration = Duration::from_secs(5);
/// Events kept for a consumer that does not read them; past it the oldest
/// is dropped and counted ([`NodeStatus::events_dropped`]).
pub const EVENT_QUEUE: usize = 256;

/// What the operating system side does for a node. Every method has a
/// default that does nothing, which is the userspace node's host.
pub trait Host: Send {
    /// The node's mesh addresses, once known (e.g. put them on the TUN).
    fn set_addresses(&mut self, _node: &NodeInfo) -> Result<(), String> {
        Ok(())
    }
    /// Route `prefix` into the mesh (a kernel route on the TUN).
    fn add_route(&mut self, _prefix: IpPrefix) -> Result<(), String> {
        Ok(())
    }
    fn del_route(&mut self, _prefix: IpPrefix) -> Result<(), String> {
        Ok(())
    }
    /// Where peers may reach this node over UDP on `port`; checked every
    /// few seconds and sent to the server when it changes.
    fn endpoints(&mut self, _port: u16) -> Vec<SocketAddr> {
        Vec::new()
    }
    /// The server accepted this node (first time in this run): e.g. record
    /// the registration so a restart rejoins without the join key.
    fn registered(&mut self, _node: &NodeInfo) -> Result<(), String> {
        Ok(())
    }
}

/// A host that does nothing: the userspace node's, with fixed endpoints.
#[derive(Debug, Clone, Default)]
pub struct UserspaceHost {
    /// Addresses (IP only) to report with the engine's UDP port.
    pub endpoint_ips: Vec<IpAddr>,
}

impl Host for UserspaceHost {
    fn endpoints(&mut self, port: u16) -> Vec<SocketAddr> {
        self.endpoint_ips
            .iter()
            .take(MAX_ENDPOINTS - 1)
            .map(|ip| SocketAddr::new(*ip, port))
            .collect()
    }
}

/// How to join.
#[derive(Clone)]
pub struct JoinConfig {
    /// `wss://host:port/v1-meshvpn/control` (`ws://` for tests).
    pub control_url: String,
    /// Needed for the first join only; never logged.
    pub join_key: Option<Zeroizing<String>>,
    pub hostname: String,
    /// Routes this node carries traffic for (e.g. its pod CIDR).
    pub advertise_routes: Vec<IpPrefix>,
    /// Tags to register with; each must be granted by the join key.
    pub tags: Vec<String>,
    /// Route the peers' approved routes through the mesh.
    pub accept_routes: bool,
    /// The control server's trust (required for `wss://`); also the
    /// relay's.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Attach a userspace stack once the mesh addresses are known.
    pub netstack: Option<NetstackConfig>,
    /// Reconnection backoff.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl JoinConfig {
    pub fn new(control_url: impl Into<String>) -> Self {
        let defaults = ControlClientConfig::new("", JoinRequest::default());
        Self {
            control_url: control_url.into(),
            join_key: None,
            hostname: "node".into(),
            advertise_routes: Vec::new(),
            tags: Vec::new(),
            accept_routes: false,
            tls: None,
            netstack: None,
            backoff_initial: defaults.backoff_initial,
            backoff_max: defaults.backoff_max,
        }
    }
}

/// Why a join did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    /// A refusal retrying cannot fix; [`ClientError::Refused`] carries its
    /// code (expired, revoked, reused, malformed key, removed, ...).
    #[error(transparent)]
    Refused(ClientError),
    #[error("no registration within {0:?}: {1}")]
    TimedOut(Duration, String),
    #[error("{0}")]
    Setup(String),
    /// The caller cancelled the join while it waited.
    #[error("the join was interrupted")]
    Interrupted,
}

impl JoinError {
    /// The server's refusal code, when it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            JoinError::Refused(ClientError::Refused { code, .. }) => Some(*code),
            _ => None,
        }
    }
}

/// A change a node's user may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Registered (first time in this run): its id, name and addresses.
    Joined(NodeInfo),
    /// A map (full or delta) was applied to the engine.
    MapApplied { peers: usize, policy_version: u64 },
    /// The policy (and so the packet filter) changed.
    PolicyChanged { version: u64 },
    /// One of this node's advertised routes changed status
    /// (`approved`, `pending`, `refused`), with the reason of a refusal.
    Route {
        prefix: String,
        status: String,
        reason: Option<String>,
    },
    /// The control session ended; the data plane keeps running.
    Disconnected { error: Option<String> },
    /// A new control session (after a disconnection).
    Reconnected,
    /// A refusal retrying cannot fix (removed, bad key): the node's loop
    /// has stopped.
    Stopped {
        code: Option<ErrorCode>,
        message: String,
    },
}

/// One peer in [`NodeStatus`].
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub planned: apply::PlannedPeer,
    pub stats: Option<meshvpn_engine::peer::PeerStats>,
}

/// The node now.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub control_url: String,
    pub node: Option<NodeInfo>,
    pub connected: bool,
    pub sessions: u64,
    pub map_updates: u64,
    pub last_error: Option<String>,
    /// Set when the loop stopped on a final refusal.
    pub fatal: Option<ClientError>,
    pub policy_version: u64,
    /// (inbound, outbound) rules; `None`: no policy, allow all.
    pub filter_rules: Option<(usize, usize)>,
    pub routes: Vec<RouteState>,
    pub accept_routes: bool,
    pub conflicts: Vec<(IpPrefix, Vec<i64>)>,
    pub peers: Vec<PeerStatus>,
    pub listen_port: u16,
    pub events_dropped: u64,
}

struct Events {
    queue: Mutex<VecDeque<Event>>,
    ready: Condvar,
    dropped: AtomicU64,
}

impl Events {
    fn push(&self, e: Event) {
        let mut q = self.queue.lock();
        if q.len() >= EVENT_QUEUE {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
        self.ready.notify_all();
    }
}

struct Shared {
    engine: Arc<Engine>,
    url: String,
    accept_routes: bool,
    /// What the loop applied, for status.
    view: Mutex<View>,
    joined: Condvar,
    events: Events,
    netstack: Mutex<Option<Arc<Netstack>>>,
    stop: AtomicBool,
}

#[derive(Default)]
struct View {
    state: NodeState,
    status: ClientStatus,
    applied: Plan,
    /// The mesh addresses are on the engine (and the netstack attached
    /// when asked for).
    applied_addr: bool,
    /// Set when the loop ended (stopped or closed).
    done: bool,
}

/// A node in a mesh. [`Node::close`] (or dropping it) leaves: the control
/// session ends and the engine closes.
pub struct Node {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Makes an engine with `key` on UDP `port` (0: any) and joins it,
    /// with a host that only reports `endpoint_ips`; waits up to `timeout`
    /// for the registration (a refusal returns at once). The userspace
    /// node: set [`JoinConfig::netstack`] to reach the mesh with no TUN.
    pub fn join(
        config: JoinConfig,
        key: PrivateKey,
        port: u16,
        endpoint_ips: Vec<IpAddr>,
        timeout: Duration,
    ) -> Result<Node, JoinError> {
        Node::join_until(config, key, port, endpoint_ips, timeout, &|| false)
    }

    /// [`Node::join`] that also gives up once `cancelled` says so
    /// ([`JoinError::Interrupted`]); it is asked every 20 ms while waiting
    /// (the C ABI's `meshvpn_interrupter`). The engine is closed before
    /// returning; the control thread ends in the background once its
    /// connection attempt does (at most the handshake timeout).
    pub fn join_until(
        config: JoinConfig,
        key: PrivateKey,
        port: u16,
        endpoint_ips: Vec<IpAddr>,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Node, JoinError> {
        if cancelled() {
            return Err(JoinError::Interrupted);
        }
        let engine = Arc::new(new_engine(key, port).map_err(JoinError::Setup)?);
        let node = Node::start(
            config,
            engine,
            Box::new(UserspaceHost { endpoint_ips }),
            false,
        )?;
        match node.wait_joined_until(timeout, cancelled) {
            Ok(_) => Ok(node),
            Err(JoinError::Interrupted) => {
                // The caller wants out now; a connection attempt still in
                // its handshake ends within the handshake timeout, so the
                // node is closed (the engine at once, the control thread
                // when that attempt ends) off the caller's thread.
                node.shared.stop.store(true, Ordering::Release);
                node.shared.engine.close();
                let _ = std::thread::Builder::new()
                    .name("meshvpn-node-close".into())
                    .spawn(move || node.close());
                Err(JoinError::Interrupted)
            }
            Err(e) => {
                node.close();
                Err(e)
            }
        }
    }

    /// Joins `engine` (its private key is the node's identity) and returns
    /// at once; the node connects in the background. `registered_before`:
    /// the server knows this key already (a reused single-use key is then
    /// this node's own from an earlier run, and the key proof alone
    /// rejoins it).
    pub fn start(
        config: JoinConfig,
        engine: Arc<Engine>,
        mut host: Box<dyn Host>,
        registered_before: bool,
    ) -> Result<Node, JoinError> {
        let secret = engine
            .relay_inbox()
            .static_secret()
            .ok_or_else(|| JoinError::Setup("the engine has no private key".into()))?;
        let endpoints = host.endpoints(engine.listen_port());
        let request = JoinRequest {
            join_key: config.join_key.clone(),
            hostname: config.hostname.clone(),
            routes: config.advertise_routes.clone(),
            tags: config.tags.clone(),
            endpoints: endpoints.clone(),
        };
        let mut client_config = ControlClientConfig::new(config.control_url.clone(), request);
        client_config.tls = config.tls.clone();
        client_config.backoff_initial = config.backoff_initial;
        client_config.backoff_max = config.backoff_max;
        let client = ControlClient::start(client_config.clone(), secret.clone())
            .map_err(|e| JoinError::Setup(format!("cannot start the control client: {e}")))?;
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            url: config.control_url.clone(),
            accept_routes: config.accept_routes,
            view: Mutex::new(View::default()),
            joined: Condvar::new(),
            events: Events {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                dropped: AtomicU64::new(0),
            },
            netstack: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let tls = config.tls.clone();
        let mut run = Loop {
            shared: shared.clone(),
            host,
            client,
            client_config,
            secret,
            retried_without_key: None,
            registered_before,
            netstack: config.netstack.clone(),
            applied: Plan::default(),
            routes: BTreeSet::new(),
            addressed: false,
            seen_map: None,
            filter: None,
            seen_sessions: 0,
            connected: false,
            route_status: Vec::new(),
            policy_version: None,
            relay_started: false,
            relay_config: Box::new(move |url| RelayConfig::new(url, tls.clone())),
            endpoints,
        };
        let thread = std::thread::Builder::new()
            .name("meshvpn-node".into())
            .spawn(move || run.run())
            .map_err(|e| JoinError::Setup(format!("cannot start the node thread: {e}")))?;
        Ok(Node {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits until the server registered this node (its addresses are
    /// known, and the netstack attached when asked for), a final refusal,
    /// or `timeout`.
    pub fn wait_joined(&self, timeout: Duration) -> Result<NodeInfo, JoinError> {
        self.wait_joined_until(timeout, &|| false)
    }

    fn wait_joined_until(
        &self,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<NodeInfo, JoinError> {
        const POLL: Duration = Duration::from_millis(20);
        let deadline = Instant::now().checked_add(timeout);
        let mut v = self.shared.view.lock();
        loop {
            if let Some(e) = &v.status.fatal {
                return Err(JoinError::Refused(e.clone()));
            }
            if let (Some(n), true) = (&v.state.node, v.applied_addresses()) {
                return Ok(n.clone());
            }
            if v.done {
                return Err(JoinError::Setup("the node was closed".into()));
            }
            if cancelled() {
                return Err(JoinError::Interrupted);
            }
            let now = Instant::now();
            let slice = match deadline {
                Some(d) => d.min(now + POLL),
                None => now + POLL,
            };
            if self.shared.joined.wait_until(&mut v, slice).timed_out()
                && deadline.is_some_and(|d| Instant::now() >= d)
            {
                let why = v
                    .status
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no answer from the control server".into());
                return Err(JoinError::TimedOut(timeout, why));
            }
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// The userspace stack, once attached (after the registration, when
    /// [`JoinConfig::netstack`] asked for one).
    pub fn netstack(&self) -> Option<Arc<Netstack>> {
        self.shared.netstack.lock().clone()
    }

    /// The next event, waiting up to `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.events.queue.lock();
        loop {
            if let Some(e) = q.pop_front() {
                return Some(e);
            }
            if self.shared.stop.load(Ordering::Acquire)
                || self
                    .shared
                    .events
                    .ready
                    .wait_until(&mut q, deadline)
                    .timed_out()
            {
                return q.pop_front();
            }
        }
    }

    /// Puts an event taken by [`Node::next_event`] back in front (a C
    /// caller's buffer was too small for it).
    pub fn requeue_event(&self, e: Event) {
        let mut q = self.shared.events.queue.lock();
        if q.len() < EVENT_QUEUE {
            q.push_front(e);
        }
    }

    /// Whether the loop has stopped (a final refusal, or closed).
    pub fn stopped(&self) -> bool {
        self.shared.view.lock().done
    }

    pub fn status(&self) -> NodeStatus {
        let v = self.shared.view.lock();
        let stats = self.shared.engine.all_peer_stats();
        NodeStatus {
            control_url: self.shared.url.clone(),
            node: v.state.node.clone(),
            connected: v.status.connected,
            sessions: v.status.sessions,
            map_updates: v.state.updates,
            last_error: v.status.last_error.clone(),
            fatal: v.status.fatal.clone(),
            policy_version: v.state.policy_version,
            filter_rules: v
                .state
                .filter
                .as_ref()
                .map(|f| (f.inbound.len(), f.outbound.len())),
            routes: v.state.routes.clone(),
            accept_routes: self.shared.accept_routes,
            conflicts: v.applied.conflicts.clone(),
            peers: v
                .applied
                .peers
                .values()
                .map(|p| PeerStatus {
                    planned: p.clone(),
                    stats: stats.iter().find(|s| s.public_key == p.public_key).cloned(),
                })
                .collect(),
            listen_port: self.shared.engine.listen_port(),
            events_dropped: self.shared.events.dropped.load(Ordering::Relaxed),
        }
    }

    /// Leaves: ends the control session, the netstack and the engine.
    /// Idempotent.
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.joined.notify_all();
        self.shared.events.ready.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if let Some(ns) = self.shared.netstack.lock().take() {
            ns.close();
        }
        self.shared.engine.close();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.close();
    }
}

impl View {
    fn applied_addresses(&self) -> bool {
        // Set by the loop together with the netstack (see Loop::step).
        self.applied_addr
    }
}

/// A node's engine with nothing but its key and port.
pub fn new_engine(key: PrivateKey, port: u16) -> Result<Engine, String> {
    let config = Config {
        interface: InterfaceConfig {
            private_key: Some(key),
            listen_port: Some(port),
            mtu: Some(meshvpn_engine::config::DEFAULT_MTU),
            ..Default::default()
        },
        peers: Vec::new(),
    };
    Engine::new(&config).map_err(|e| format!("cannot start the engine: {e}"))
}

/// The node's thread: applies the map, reports, reconnects.
struct Loop {
    shared: Arc<Shared>,
    host: Box<dyn Host>,
    client: ControlClient,
    client_config: ControlClientConfig,
    secret: boringtun::x25519::StaticSecret,
    /// The key's refusal when it was refused as reused and the node
    /// retried with its key proof alone.
    retried_without_key: Option<ClientError>,
    registered_before: bool,
    netstack: Option<NetstackConfig>,
    applied: Plan,
    routes: BTreeSet<IpPrefix>,
    addressed: bool,
    /// (session, map messages) last applied: the count restarts with each
    /// session.
    seen_map: Option<(u64, u64)>,
    /// The packet filter installed in the engine (the map's, compiled by
    /// the server from the policy for this node); `None`: allow all.
    filter: Option<FilterRules>,
    seen_sessions: u64,
    connected: bool,
    /// The route statuses last reported as events.
    route_status: Vec<RouteState>,
    policy_version: Option<u64>,
    relay_started: bool,
    /// The relay's settings for the URL the map names (the control
    /// server's TLS trust).
    relay_config: Box<dyn Fn(String) -> RelayConfig + Send>,
    endpoints: Vec<SocketAddr>,
}

impl Loop {
    fn run(&mut self) {
        let mut next_endpoints = Instant::now() + ENDPOINTS_EVERY;
        while !self.shared.stop.load(Ordering::Acquire) {
            let (state, status) = (self.client.state(), self.client.status());
            if let Some(e) = &status.fatal {
                if let Some(e) = self.fatal(e) {
                    let code = match &e {
                        ClientError::Refused { code, .. } => Some(*code),
                        _ => None,
                    };
                    self.shared.events.push(Event::Stopped {
                        code,
                        message: e.to_string(),
                    });
                    let mut v = self.shared.view.lock();
                    v.status = status;
                    v.status.fatal = Some(e);
                    break;
                }
                continue;
            }
            if let Err(e) = self.step(&state, status.sessions) {
                tracing::warn!("applying the map: {e}");
            }
            self.report(&state, &status);
            if status.connected
                && status.sessions != self.seen_sessions
                // A new session registered with the endpoints of the
                // start; tell it what they are now.
                && self.client.update_endpoints(self.endpoints.clone())
            {
                self.seen_sessions = status.sessions;
            }
            if Instant::now() >= next_endpoints {
                next_endpoints = Instant::now() + ENDPOINTS_EVERY;
                let now = self.host.endpoints(self.shared.engine.listen_port());
                if now != self.endpoints && self.client.update_endpoints(now.clone()) {
                    self.endpoints = now;
                }
            }
            {
                let mut v = self.shared.view.lock();
                v.state = state.clone();
                v.status = status.clone();
                v.applied = self.applied.clone();
                v.applied_addr = self.addressed;
            }
            self.shared.joined.notify_all();
            let updates = state.updates;
            let sessions = status.sessions;
            let connected = status.connected;
            let stop = &self.shared.stop;
            self.client.wait(TICK, |s, st| {
                s.updates != updates
                    || st.sessions != sessions
                    || st.connected != connected
                    || st.fatal.is_some()
                    || stop.load(Ordering::Acquire)
            });
        }
        self.shared.view.lock().done = true;
        self.shared.joined.notify_all();
        self.shared.events.ready.notify_all();
    }

    /// A final refusal: `None` when the node retries (a reused single-use
    /// key may be this node's own, from a run that ended after the server
    /// registered it but before that was recorded: the server knows its
    /// node key then, so the proof alone rejoins it); else the refusal
    /// that ends the node.
    fn fatal(&mut self, e: &ClientError) -> Option<ClientError> {
        let reused = matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::KeyReused,
                ..
            }
        );
        if reused && !self.registered_before && self.retried_without_key.is_none() {
            let mut retry = self.client_config.clone();
            retry.request.join_key = None;
            match ControlClient::start(retry, self.secret.clone()) {
                Ok(c) => {
                    self.retried_without_key = Some(e.clone());
                    self.client = c;
                    return None;
                }
                Err(_) => return Some(e.clone()),
            }
        }
        // Not known by its key either: the key's refusal is the answer.
        Some(match (&self.retried_without_key, e) {
            (
                Some(first),
                ClientError::Refused {
                    code: ErrorCode::NodeUnknown,
                    ..
                },
            ) => first.clone(),
            _ => e.clone(),
        })
    }

    /// Events for what changed since the last look.
    fn report(&mut self, state: &NodeState, status: &ClientStatus) {
        let ev = &self.shared.events;
        if status.connected != self.connected {
            if status.connected {
                if status.sessions > 1 {
                    ev.push(Event::Reconnected);
                }
            } else {
                ev.push(Event::Disconnected {
                    error: status.last_error.clone(),
                });
            }
            self.connected = status.connected;
        }
        if state.has_map() && self.policy_version != Some(state.policy_version) {
            if self.policy_version.is_some() {
                ev.push(Event::PolicyChanged {
                    version: state.policy_version,
                });
            }
            self.policy_version = Some(state.policy_version);
        }
        if state.node.is_some() && state.routes != self.route_status {
            for r in &state.routes {
                let old = self.route_status.iter().find(|o| o.prefix == r.prefix);
                if old.map(|o| (&o.status, o.approved, &o.reason))
                    != Some((&r.status, r.approved, &r.reason))
                {
                    let status = if !r.status.is_empty() {
                        r.status.clone()
                    } else if r.reason.is_some() {
                        "refused".into()
                    } else if r.approved {
                        "approved".into()
                    } else {
                        "pending".into()
                    };
                    ev.push(Event::Route {
                        prefix: r.prefix.clone(),
                        status,
                        reason: r.reason.clone(),
                    });
                }
            }
            self.route_status = state.routes.clone();
        }
    }

    /// Applies what changed in the map since the last step.
    fn step(&mut self, state: &NodeState, session: u64) -> Result<(), String> {
        if let Some(n) = &state.node {
            if !self.addressed {
                self.host.registered(n)?;
                self.host.set_addresses(n)?;
                self.shared.engine.set_addresses(vec![
                    IpPrefix::host(IpAddr::V4(n.ipv4)),
                    IpPrefix::host(IpAddr::V6(n.ipv6)),
                ]);
                if let Some(config) = self.netstack.take() {
                    let ns = Netstack::attach(&self.shared.engine, config)
                        .map_err(|e| format!("cannot start the netstack: {e}"))?;
                    *self.shared.netstack.lock() = Some(Arc::new(ns));
                }
                self.addressed = true;
                self.shared.events.push(Event::Joined(n.clone()));
            }
        }
        if let (Some(relay), false) = (&state.relay_url, self.relay_started) {
            // Peers whose UDP handshakes go unanswered move to it.
            match self
                .shared
                .engine
                .start_relay((self.relay_config)(relay.clone()))
            {
                Ok(()) => self.relay_started = true,
                Err(e) => tracing::warn!("relay {relay}: {e}"),
            }
        }
        // Not before this session's full map is complete (it comes in
        // parts): until then the engine keeps what it has.
        if !state.has_map() || self.seen_map == Some((session, state.updates)) {
            return Ok(());
        }
        self.seen_map = Some((session, state.updates));
        let options = PlanOptions {
            accept_routes: self.shared.accept_routes,
        };
        let plan = apply::plan(state, options);
        let engine = &self.shared.engine;
        for change in apply::diff(&self.applied, &plan) {
            match change {
                Change::Add(p) => {
                    let mut cfg = PeerConfig::new(p.public_key);
                    cfg.allowed_ips = p.allowed_ips;
                    cfg.endpoint = p.endpoint;
                    cfg.persistent_keepalive = Some(MESH_KEEPALIVE);
                    tracing::info!(peer = %p.name, "peer added");
                    engine
                        .add_peer(&cfg)
                        .map_err(|e| format!("peer {}: {e}", p.name))?;
                    if !p.candidates.is_empty() {
                        engine.set_peer_candidates(&p.public_key, &p.candidates);
                    }
                }
                Change::Update {
                    public_key,
                    allowed_ips,
                    endpoint,
                    candidates,
                } => {
                    if let Some(c) = candidates {
                        engine.set_peer_candidates(&public_key, &c);
                    }
                    let update = PeerUpdate {
                        preshared_key: None,
                        endpoint,
                        persistent_keepalive: None,
                        replace_allowed_ips: allowed_ips.is_some(),
                        allowed_ips: allowed_ips.unwrap_or_default(),
                    };
                    engine
                        .update_peer(&public_key, &update, false)
                        .map_err(|e| format!("peer {}: {e}", public_key.to_base64()))?;
                }
                Change::Remove(k) => {
                    tracing::info!(peer = %k.to_base64(), "peer removed");
                    engine.remove_peer(&k);
                }
            }
        }
        self.applied = plan;
        // The policy's filter, after the peers it names exist: a denied
        // flow is dropped (and counted) by the engine from now on, tracked
        // flows of rules still allowed go on.
        if state.filter != self.filter {
            tracing::info!(
                policy_version = state.policy_version,
                rules = state
                    .filter
                    .as_ref()
                    .map(|f| f.inbound.len() + f.outbound.len()),
                "packet filter installed"
            );
            engine.set_filter(state.filter.clone().map(Arc::new));
            self.filter = state.filter.clone();
        }
        let want = apply::routes(&self.applied);
        let (add, del) = apply::route_diff(&self.routes, &want);
        for r in del {
            // Gone already when the kernel dropped it with an address.
            if let Err(e) = self.host.del_route(r) {
                tracing::debug!("{e}");
            }
            self.routes.remove(&r);
        }
        for r in add {
            match self.host.add_route(r) {
                Ok(()) => {
                    self.routes.insert(r);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        self.shared.events.push(Event::MapApplied {
            peers: self.applied.peers.len(),
            policy_version: state.policy_version,
        });
        Ok(())
    }
}
