//! The node's side of the control protocol: a sans-IO state machine
//! ([`NodeState`]: answer the challenge, take the registration, apply the
//! full map and then the deltas to the current peer set) and a thin
//! blocking driver ([`ControlClient`]: one thread, one websocket, reconnect
//! with the engine's [`Backoff`]).
//!
//! The first registration uses the join key; later connections prove the
//! node key alone (the server knows it), as a Tailscale node does, so a
//! single-use key is not needed again. A refusal of the key (malformed,
//! unknown, expired, revoked, reused) or of the node (removed) is final:
//! retrying cannot help, so the driver stops and reports it
//! ([`ClientStatus::fatal`]); anything else (server down, a dropped session)
//! is retried with backoff, and the data plane keeps what it has meanwhile.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use bytes::Bytes;
use meshvpn_engine::filter::FilterRules;
use meshvpn_engine::relay::protocol::{prove, CHALLENGE_LEN};
use meshvpn_engine::supervisor::upgrade::{self, ConnOutbox, SessionLimits};
use meshvpn_engine::ws::{
    Backoff, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX, DEFAULT_HANDSHAKE_TIMEOUT,
};
use meshvpn_engine::IpPrefix;
use parking_lot::{Condvar, Mutex};
use zeroize::Zeroizing;

use crate::proto::{
    filter_from_wire, hex, unhex, ErrorCode, MapUpdate, NodeBody, Peer, ProtoError, RouteState,
    ServerBody, EXPORTER_LABEL, MAX_MESSAGE,
};

/// Websocket pings from the node; the server ends silent sessions after
/// [`crate::server::SESSION_IDLE`].
pub const PING_EVERY: Duration = Duration::from_secs(15);
/// A session with nothing from the server (it answers pings) this long ends.
const IDLE: Duration = Duration::from_secs(60);

/// What the node asks for when it registers.
#[derive(Clone, Default)]
pub struct JoinRequest {
    /// Needed the first time; never logged.
    pub join_key: Option<Zeroizing<String>>,
    pub hostname: String,
    /// Routes it advertises (e.g. its pod CIDR).
    pub routes: Vec<IpPrefix>,
    /// Tags it expects; each must be one its join key grants.
    pub tags: Vec<String>,
    /// Where it can be reached over UDP, as it knows.
    pub endpoints: Vec<SocketAddr>,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("join_key", &self.join_key.as_ref().map(|_| "<redacted>"))
            .field("hostname", &self.hostname)
            .field("routes", &self.routes)
            .field("tags", &self.tags)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// What the server gave the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: i64,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub tags: Vec<String>,
}

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server refused: the text says why and what to do.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("control protocol: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// Whether retrying can help (the server down: yes; a bad key: no).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ClientError::Refused {
                code: ErrorCode::KeyMalformed
                    | ErrorCode::KeyUnknown
                    | ErrorCode::KeyExpired
                    | ErrorCode::KeyRevoked
                    | ErrorCode::KeyReused
                    | ErrorCode::NodeUnknown
                    | ErrorCode::TagNotPermitted
                    | ErrorCode::Removed,
                ..
            }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Challenge,
    Registered,
    Map,
}

/// What one server message did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this to the server.
    Reply(Vec<u8>),
    /// The registration was accepted.
    Registered,
    /// The map changed.
    Map,
}

/// The node's view of the mesh, sans-IO.
#[derive(Debug, Clone)]
pub struct NodeState {
    phase: Phase,
    pub node: Option<NodeInfo>,
    /// Every other node, by id.
    pub peers: BTreeMap<i64, Peer>,
    /// The node's own advertised routes and their approval.
    pub routes: Vec<RouteState>,
    pub policy_version: u64,
    /// The compiled filter; `None`: no policy (allow all between nodes).
    pub filter: Option<FilterRules>,
    pub relay_url: Option<String>,
    /// Map messages applied (full maps and deltas).
    pub updates: u64,
    /// Parts of a full map are still to come.
    partial: bool,
}

impl Default for NodeState {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeState {
    pub fn new() -> Self {
        Self {
            phase: Phase::Challenge,
            node: None,
            peers: BTreeMap::new(),
            routes: Vec::new(),
            policy_version: 0,
            filter: None,
            relay_url: None,
            updates: 0,
            partial: false,
        }
    }

    /// A new connection: the server's challenge comes first. The map is
    /// kept until the next full map replaces it (the data plane keeps its
    /// peers while the server is away).
    pub fn reconnecting(&mut self) {
        self.phase = Phase::Challenge;
        self.updates = 0;
    }

    /// Whether the node has its full map (and then deltas) on this
    /// connection.
    pub fn has_map(&self) -> bool {
        self.phase == Phase::Map && self.updates > 0 && !self.partial
    }

    /// Handles one message from the server. `exporter` is the TLS
    /// exporter value for [`EXPORTER_LABEL`] on this connection.
    pub fn handle(
        &mut self,
        message: &[u8],
        secret: &StaticSecret,
        exporter: &[u8; 32],
        request: &JoinRequest,
    ) -> Result<Step, ClientError> {
        let body = ServerBody::decode(message)?;
        match (self.phase, body) {
            (_, ServerBody::Error { code, message }) => Err(ClientError::Refused { code, message }),
            (Phase::Challenge, ServerBody::Challenge { challenge }) => {
                let challenge = unhex::<CHALLENGE_LEN>(&challenge)?;
                let proof = prove(&challenge, secret, exporter)
                    .map_err(|e| ClientError::Unexpected(format!("challenge: {e}")))?;
                self.phase = Phase::Registered;
                Ok(Step::Reply(
                    NodeBody::Register {
                        join_key: request.join_key.as_ref().map(|k| k.to_string()),
                        proof: hex(&proof),
                        hostname: request.hostname.clone(),
                        routes: request.routes.iter().map(|r| r.to_string()).collect(),
                        tags: request.tags.clone(),
                        endpoints: request.endpoints.clone(),
                    }
                    .encode(),
                ))
            }
            (
                Phase::Registered,
                ServerBody::Registered {
                    node_id,
                    name,
                    ipv4,
                    ipv6,
                    tags,
                },
            ) => {
                self.node = Some(NodeInfo {
                    node_id,
                    name,
                    ipv4,
                    ipv6,
                    tags,
                });
                self.phase = Phase::Map;
                Ok(Step::Registered)
            }
            (Phase::Map, ServerBody::Map(m)) => {
                self.apply(m)?;
                Ok(Step::Map)
            }
            (phase, body) => Err(ClientError::Unexpected(format!(
                "{} while waiting for {}",
                match body {
                    ServerBody::Challenge { .. } => "a challenge",
                    ServerBody::Registered { .. } => "a registration",
                    ServerBody::Map(_) => "a map",
                    ServerBody::Error { .. } => "an error",
                },
                match phase {
                    Phase::Challenge => "the challenge",
                    Phase::Registered => "the registration",
                    Phase::Map => "the map",
                }
            ))),
        }
    }

    fn apply(&mut self, m: MapUpdate) -> Result<(), ClientError> {
        // Checked in full before anything changes.
        let filter = match (&m.filter, m.filter_set) {
            (Some(f), _) => Some(Some(filter_from_wire(f)?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let own = self.node.as_ref().map(|n| n.node_id);
        if m.full {
            self.peers.clear();
            self.relay_url = m.relay_url;
        }
        self.partial = m.more;
        for id in m.removed {
            self.peers.remove(&id);
        }
        for p in m.upserts {
            if Some(p.id) != own {
                self.peers.insert(p.id, p);
            }
        }
        if let Some(r) = m.routes {
            self.routes = r;
        }
        if let Some(f) = filter {
            self.filter = f;
        }
        self.policy_version = m.policy_version;
        self.updates += 1;
        Ok(())
    }
}

/// How to reach the control server, and what to register as.
#[derive(Clone)]
pub struct ControlClientConfig {
    /// `wss://host:port/v1-meshvpn/control` (`ws://` for tests).
    pub url: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub request: JoinRequest,
    /// TCP, TLS, the upgrade, the proof and the registration together.
    pub handshake_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl ControlClientConfig {
    pub fn new(url: impl Into<String>, request: JoinRequest) -> Self {
        Self {
            url: url.into(),
            tls: None,
            request,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// The driver's state, for status and waiting.
#[derive(Debug, Clone, Default)]
pub struct ClientStatus {
    pub connected: bool,
    /// Sessions (registrations) so far.
    pub sessions: u64,
    pub last_error: Option<String>,
    /// A refusal retrying cannot fix; the driver stopped.
    pub fatal: Option<ClientError>,
}

struct Shared {
    config: ControlClientConfig,
    secret: StaticSecret,
    state: Mutex<(NodeState, ClientStatus)>,
    changed: Condvar,
    stop: AtomicBool,
    current: Mutex<Option<ConnOutbox>>,
}

/// A node's running control connection. Dropping it disconnects.
pub struct ControlClient {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ControlClient {
    /// Connects in the background with the node's WireGuard key.
    pub fn start(config: ControlClientConfig, secret: StaticSecret) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            config,
            secret,
            state: Mutex::new((NodeState::new(), ClientStatus::default())),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            current: Mutex::new(None),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The node's view now.
    pub fn state(&self) -> NodeState {
        self.shared.state.lock().0.clone()
    }

    pub fn status(&self) -> ClientStatus {
        self.shared.state.lock().1.clone()
    }

    /// Waits until `done` holds (`true`) or `timeout` passes; it is checked
    /// after every change.
    pub fn wait(
        &self,
        timeout: Duration,
        done: impl Fn(&NodeState, &ClientStatus) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state.lock();
        while !done(&s.0, &s.1) {
            if self.shared.changed.wait_until(&mut s, deadline).timed_out() {
                return done(&s.0, &s.1);
            }
        }
        true
    }

    /// Tells the server new endpoints (e.g. after a STUN answer); false
    /// when there is no session or its queue is full.
    pub fn update_endpoints(&self, endpoints: Vec<SocketAddr>) -> bool {
        let m = NodeBody::Update {
            endpoints: Some(endpoints),
            routes: None,
        };
        self.shared
            .current
            .lock()
            .as_ref()
            .is_some_and(|o| o.push(Bytes::from(m.encode())).is_ok())
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(o) = self.shared.current.lock().as_ref() {
            o.stop();
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run(self: &Arc<Self>) {
        let seed = u64::from_le_bytes(self.secret.to_bytes()[..8].try_into().unwrap_or([0; 8]));
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max, seed);
        let mut request = self.config.request.clone();
        while !self.stop.load(Ordering::SeqCst) {
            let result = self.session(&mut request, &mut backoff);
            let now = Instant::now();
            {
                let mut s = self.state.lock();
                s.1.connected = false;
                match result {
                    Err(e) if e.is_final() => {
                        tracing::warn!(error = %e, "control: refused, not retrying");
                        s.1.last_error = Some(e.to_string());
                        s.1.fatal = Some(e);
                        self.changed.notify_all();
                        return;
                    }
                    Err(e) => s.1.last_error = Some(e.to_string()),
                    Ok(reason) => s.1.last_error = Some(reason),
                }
                self.changed.notify_all();
            }
            backoff.on_failed(now);
            // Sleep until the next attempt; a stop ends the wait.
            let mut s = self.state.lock();
            while let Some(d) = backoff.next_delay(Instant::now()) {
                if d.is_zero() || self.stop.load(Ordering::SeqCst) {
                    break;
                }
                self.changed.wait_for(&mut s, d);
            }
        }
    }

    fn session(
        &self,
        request: &mut JoinRequest,
        backoff: &mut Backoff,
    ) -> Result<String, ClientError> {
        let io = |e: meshvpn_engine::ws::TunnelError| ClientError::Unexpected(e.to_string());
        let mut conn = upgrade::connect(
            &self.config.url,
            self.config.tls.as_ref(),
            None,
            self.config.handshake_timeout,
            MAX_MESSAGE,
        )
        .map_err(io)?;
        let exporter = conn.exporter(EXPORTER_LABEL).map_err(io)?;
        self.state.lock().0.reconnecting();
        // Challenge, then the registration's answer, within the deadline.
        for _ in 0..2 {
            let m = conn.recv().map_err(io)?;
            let step = self
                .state
                .lock()
                .0
                .handle(&m, &self.secret, &exporter, request)?;
            if let Step::Reply(r) = step {
                conn.send(&r).map_err(io)?;
            }
        }
        // Registered: from now on the node key is the credential.
        request.join_key = None;
        let session = conn
            .into_session(SessionLimits {
                queue_messages: 64,
                queue_bytes: 1 << 20,
                ping_every: Some(PING_EVERY),
                idle: IDLE,
                write_timeout: Some(Duration::from_secs(30)),
            })
            .map_err(io)?;
        *self.current.lock() = Some(session.outbox());
        if self.stop.load(Ordering::SeqCst) {
            session.outbox().stop();
        }
        backoff.on_connected(Instant::now());
        {
            let mut s = self.state.lock();
            s.1.connected = true;
            s.1.sessions += 1;
            self.changed.notify_all();
        }
        let mut failure = None;
        let outbox = session.outbox();
        let end = session.run(&mut |m| {
            let mut s = self.state.lock();
            match s.0.handle(&m, &self.secret, &exporter, request) {
                Ok(_) => {}
                Err(e) => {
                    failure = Some(e);
                    outbox.stop();
                }
            }
            drop(s);
            self.changed.notify_all();
        });
        *self.current.lock() = None;
        match failure {
            Some(e) => Err(e),
            None => Ok(end.reason),
        }
    }
}
