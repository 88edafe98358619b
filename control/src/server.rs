//! The control server: registers nodes that prove their WireGuard key and
//! keeps each connected node's network map current.
//!
//! It is a service on the tunnel server's listener
//! ([`meshvpn_engine::supervisor::upgrade`]): [`ControlServer::route`] is the
//! [`UpgradeRoute`] for [`crate::proto::CONTROL_PATH`], so one port serves
//! the k3s tunnel, the relay and the control protocol, under the listener's
//! handshake deadline and caps, with this route's own session caps (nginx
//! `limit_conn`, as the relay's).
//!
//! ```text
//!   session thread (one per node) ── register ── Store ◄── meshvpn control (CLI)
//!          │  pump: bounded send queue                │
//!          ▼                                          ▼ every poll_interval, or at once
//!   node ◄── full map, then deltas ◄──────────── watcher thread: snapshot, diff, push
//! ```
//!
//! Changes: the store is shared with the `meshvpn control` CLI, another
//! process, so the watcher re-reads it (nodes, routes, policy) every
//! [`ControlServerConfig::poll_interval`] and at once after a change made
//! here (a registration, a node's update, a session's end); it diffs the
//! peers against the last snapshot and pushes one encoded delta, shared by
//! every session, plus each node's own part (its route states, its
//! compiled filter) when that changed. A full map is pushed to a session
//! under the same lock the watcher pushes deltas under, so a node sees the
//! map at one snapshot and then every change after it, in order.
//!
//! Bounds: each session's send queue is bounded in messages and bytes; a
//! node whose queue is full, or whose socket takes nothing for
//! [`ControlServerConfig::write_timeout`], is dropped (DERP closes a slow
//! client the same way) and counted; it reconnects and gets a fresh full
//! map. A removed node's session gets an error and is closed, and it can
//! no longer register with its key alone. Ephemeral nodes are removed
//! [`ControlServerConfig::ephemeral_timeout`] after their last session
//! ended (headscale's `ephemeral_node_inactivity_timeout`, 30 min).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshvpn_engine::filter::FilterRules;
use meshvpn_engine::relay::protocol::{ServerHandshake, PROOF_LEN};
use meshvpn_engine::supervisor::upgrade::{
    Conn, ConnOutbox, SessionLimits, UpgradeHandler, UpgradeRoute,
};
use meshvpn_engine::{IpPrefix, PublicKey};
use parking_lot::{Condvar, Mutex};
use ring::rand::SecureRandom;

use crate::keys::{self, JoinError};
use crate::node::{NodeRecord, NodeRequest};
use crate::policy::{compile, MeshNode, Policy};
use crate::proto::{
    filter_to_wire, hex, parse_routes, unhex, ErrorCode, MapUpdate, NodeBody, Peer, RouteState,
    ServerBody, CONTROL_PATH, EXPORTER_LABEL, FULL_MAP_PART, MAX_ENDPOINTS, MAX_MESSAGE,
};
use crate::routes;
use crate::store::{RedeemError, Store};

/// Control sessions at once, from all sources: one per node, each a thread
/// and three files (as the relay's sessions).
pub const DEFAULT_MAX_SESSIONS: usize = 4096;
/// Control sessions at once from one source address: 64 nodes behind one
/// NAT, at most a sixty-fourth of [`DEFAULT_MAX_SESSIONS`].
pub const DEFAULT_MAX_SESSIONS_PER_SOURCE: usize = 64;
/// Bytes queued toward one node before it is dropped as too slow: two of
/// the largest messages (a full map).
pub const DEFAULT_QUEUE_BYTES: usize = 2 * MAX_MESSAGE;
/// Messages queued toward one node before it is dropped as too slow.
pub const DEFAULT_QUEUE_MESSAGES: usize = 1024;
/// How often the store is re-read for changes made by other processes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long an ephemeral node stays after its last session ended.
pub const DEFAULT_EPHEMERAL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A node whose socket takes nothing for this long while output waits is
/// dropped.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session with nothing from the node (nodes ping every
/// [`crate::client::PING_EVERY`]) for this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(90);

/// Settings of a [`ControlServer`].
#[derive(Debug, Clone)]
pub struct ControlServerConfig {
    pub max_sessions: usize,
    pub max_sessions_per_source: usize,
    /// Bytes queued toward one node (each message charged its length plus
    /// 64) before the node is dropped; at least one largest message.
    pub queue_bytes: usize,
    pub queue_messages: usize,
    pub poll_interval: Duration,
    pub ephemeral_timeout: Duration,
    pub write_timeout: Duration,
    /// The relay nodes may use (`wss://.../v1-meshvpn/relay`), sent in
    /// every full map; `None`: no relay.
    pub relay_url: Option<String>,
}

impl Default for ControlServerConfig {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_source: DEFAULT_MAX_SESSIONS_PER_SOURCE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            queue_messages: DEFAULT_QUEUE_MESSAGES,
            poll_interval: DEFAULT_POLL_INTERVAL,
            ephemeral_timeout: DEFAULT_EPHEMERAL_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            relay_url: None,
        }
    }
}

/// Counters of a control server since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlStats {
    /// Nodes with a session now.
    pub sessions: usize,
    /// Registrations accepted.
    pub registrations: u64,
    /// Registrations refused (bad key, bad proof, unknown node, ...).
    pub refused: u64,
    /// Sessions dropped because their send queue was full.
    pub dropped_slow: u64,
    /// Sessions closed because their node was removed.
    pub closed_removed: u64,
    /// Deltas pushed (one per session per change).
    pub deltas: u64,
    /// Ephemeral nodes removed after their timeout.
    pub ephemeral_removed: u64,
    /// Store failures while watching (each retried at the next poll).
    pub store_errors: u64,
}

#[derive(Default)]
struct Counters {
    registrations: AtomicU64,
    refused: AtomicU64,
    dropped_slow: AtomicU64,
    closed_removed: AtomicU64,
    deltas: AtomicU64,
    ephemeral_removed: AtomicU64,
    store_errors: AtomicU64,
}

/// One node's live session.
struct Session {
    generation: u64,
    public_key: PublicKey,
    outbox: ConnOutbox,
    /// What the node reported, and where its connection comes from.
    endpoints: Vec<SocketAddr>,
    seen: SocketAddr,
    /// The node's own part as last sent (`None`: not yet).
    sent_routes: Option<Vec<RouteState>>,
    sent_filter: Option<(u64, Option<FilterRules>)>,
}

/// The mesh as last read from the store.
#[derive(Default)]
struct Snapshot {
    nodes: BTreeMap<i64, NodeRecord>,
    routes: HashMap<i64, Vec<RouteState>>,
    policy: Option<(u64, Policy)>,
    /// Peers as last sent (with session data merged in).
    peers: BTreeMap<i64, Peer>,
    /// The full map of `peers` in parts, encoded once for every new
    /// session.
    full: Option<Arc<Vec<Bytes>>>,
}

/// The shortest time between two reads of the store.
const MIN_REFRESH: Duration = Duration::from_millis(50);

/// How long a removed node's session may stay to read the error it was
/// sent before it is closed.
const REMOVED_GRACE: Duration = Duration::from_secs(1);

struct Live {
    sessions: HashMap<i64, Session>,
    /// When each node's last session ended (since the server started;
    /// a node not here and without a session counts as disconnected at
    /// the start): what decides whether a primary router is still up
    /// ([`routes::PRIMARY_GRACE`]).
    disconnected: HashMap<i64, Instant>,
    /// Sessions of removed nodes, told why and closed at the instant.
    closing: Vec<(Instant, ConnOutbox)>,
    snapshot: Snapshot,
    next_generation: u64,
}

struct Shared {
    config: ControlServerConfig,
    store: Arc<dyn Store>,
    live: Mutex<Live>,
    /// Set when something changed here; the watcher runs at once.
    dirty: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    counters: Counters,
    started: Instant,
}

/// A running control server (its watcher thread); the sessions run on the
/// tunnel server's threads through [`ControlServer::route`].
pub struct ControlServer {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ControlServer {
    pub fn start(store: Arc<dyn Store>, config: ControlServerConfig) -> std::io::Result<Self> {
        if config.queue_bytes < MAX_MESSAGE + meshvpn_engine::relay::MESSAGE_OVERHEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("control queue bytes must hold one largest message ({MAX_MESSAGE} bytes)"),
            ));
        }
        let shared = Arc::new(Shared {
            config,
            store,
            live: Mutex::new(Live {
                sessions: HashMap::new(),
                disconnected: HashMap::new(),
                closing: Vec::new(),
                snapshot: Snapshot::default(),
                next_generation: 0,
            }),
            dirty: Mutex::new(true),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            started: Instant::now(),
        });
        // Routes decided under an older policy or blocked by a node removed
        // while the server was down are re-examined once, as `policy set`
        // and `nodes remove` do.
        match routes::stored_policy(&*shared.store)
            .and_then(|p| routes::reevaluate(&*shared.store, p.as_ref(), now_secs()))
        {
            Ok(changes) if !changes.is_empty() => {
                tracing::info!(
                    changed = changes.len(),
                    "control: routes re-examined at start"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "control: routes not re-examined at start"),
        }
        // The first snapshot before any session can start.
        shared.refresh();
        let worker = shared.clone();
        let watcher = std::thread::Builder::new()
            .name("control-watch".into())
            .spawn(move || worker.watch())?;
        Ok(Self {
            shared,
            watcher: Some(watcher),
        })
    }

    /// The upgrade route to put in the tunnel server's
    /// [`meshvpn_engine::supervisor::ServerConfig::extra`].
    pub fn route(&self) -> UpgradeRoute {
        UpgradeRoute {
            path: CONTROL_PATH.into(),
            handler: Arc::new(Handler(self.shared.clone())),
            max_message: MAX_MESSAGE,
            max_sessions: self.shared.config.max_sessions,
            max_sessions_per_source: self.shared.config.max_sessions_per_source,
        }
    }

    pub fn stats(&self) -> ControlStats {
        let c = &self.shared.counters;
        ControlStats {
            sessions: self.shared.live.lock().sessions.len(),
            registrations: c.registrations.load(Relaxed),
            refused: c.refused.load(Relaxed),
            dropped_slow: c.dropped_slow.load(Relaxed),
            closed_removed: c.closed_removed.load(Relaxed),
            deltas: c.deltas.load(Relaxed),
            ephemeral_removed: c.ephemeral_removed.load(Relaxed),
            store_errors: c.store_errors.load(Relaxed),
        }
    }

    /// Node ids with a session now.
    pub fn connected(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.shared.live.lock().sessions.keys().copied().collect();
        v.sort();
        v
    }

    /// Where each connected node's session comes from (the address the
    /// listener, or the host program that handed the connection over,
    /// saw) and the endpoints it reported, by node id.
    pub fn seen(&self) -> BTreeMap<i64, (SocketAddr, Vec<SocketAddr>)> {
        self.shared
            .live
            .lock()
            .sessions
            .iter()
            .map(|(id, s)| (*id, (s.seen, s.endpoints.clone())))
            .collect()
    }

    /// Re-reads the store and pushes what changed now, without waiting for
    /// the next poll.
    pub fn poke(&self) {
        self.shared.poke();
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        self.shared.poke();
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
        let live = self.shared.live.lock();
        for s in live.sessions.values() {
            s.outbox.stop();
        }
        for (_, outbox) in &live.closing {
            outbox.stop();
        }
    }
}

struct Handler(Arc<Shared>);

impl UpgradeHandler for Handler {
    fn serve(&self, conn: Conn) {
        let peer = conn.peer_addr();
        // The route outlives a stopped server when a host program keeps
        // its listener (the C/Go bindings): with no watcher left, a
        // session would get a map that never changes.
        if self.0.stop.load(Relaxed) {
            conn.close();
            tracing::info!(?peer, "control: session refused, the server is stopped");
            return;
        }
        if let Err(e) = self.0.serve(conn) {
            tracing::info!(?peer, error = %e, "control: session refused");
        }
    }
}

/// A refusal: the code and text the node gets.
struct Refusal(ErrorCode, String);

impl From<JoinError> for Refusal {
    fn from(e: JoinError) -> Self {
        let code = match e {
            JoinError::Malformed => ErrorCode::KeyMalformed,
            JoinError::Unknown => ErrorCode::KeyUnknown,
            JoinError::Expired(_) => ErrorCode::KeyExpired,
            JoinError::Revoked => ErrorCode::KeyRevoked,
            JoinError::AlreadyUsed => ErrorCode::KeyReused,
        };
        Refusal(code, e.to_string())
    }
}

fn server_failure(e: impl std::fmt::Display) -> Refusal {
    tracing::warn!(error = %e, "control: store failure during registration");
    Refusal(
        ErrorCode::Server,
        "the control server could not record the registration; try again later".into(),
    )
}

impl Shared {
    fn poke(&self) {
        *self.dirty.lock() = true;
        self.wake.notify_all();
    }

    fn serve(self: &Arc<Self>, mut conn: Conn) -> Result<(), String> {
        let mut random = [0u8; 64];
        ring::rand::SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| "no system randomness".to_string())?;
        let hs = ServerHandshake::new(random);
        let challenge = ServerBody::Challenge {
            challenge: hex(&hs.challenge()),
        };
        conn.send(&challenge.encode()).map_err(|e| e.to_string())?;
        let first = conn.recv().map_err(|e| e.to_string())?;
        let exporter = conn.exporter(EXPORTER_LABEL).map_err(|e| e.to_string())?;
        let seen = conn.peer_addr();
        let node = match self.register(&hs, &first, &exporter) {
            Ok(r) => r,
            Err(Refusal(code, message)) => {
                self.counters.refused.fetch_add(1, Relaxed);
                let _ = conn.send(
                    &ServerBody::Error {
                        code,
                        message: message.clone(),
                    }
                    .encode(),
                );
                conn.close();
                return Err(format!("{code:?}: {message}"));
            }
        };
        let (record, endpoints) = node;
        self.counters.registrations.fetch_add(1, Relaxed);
        let registered = ServerBody::Registered {
            node_id: record.id,
            name: record.name.clone(),
            ipv4: record.ipv4,
            ipv6: record.ipv6,
            tags: record.tags.clone(),
        };
        conn.send(&registered.encode()).map_err(|e| e.to_string())?;
        let session = conn
            .into_session(SessionLimits {
                queue_messages: self.config.queue_messages,
                queue_bytes: self.config.queue_bytes,
                ping_every: None,
                idle: SESSION_IDLE,
                write_timeout: Some(self.config.write_timeout),
            })
            .map_err(|e| e.to_string())?;
        let outbox = session.outbox();
        let generation;
        {
            let mut live = self.live.lock();
            generation = live.next_generation;
            live.next_generation += 1;
            // The map at the last snapshot; every later change comes as a
            // delta from the watcher, which pushes under this lock.
            for part in live.snapshot.full_map(&self.config).iter() {
                if outbox.push(part.clone()).is_err() {
                    return Err("the full map did not fit the send queue".into());
                }
            }
            let old = live.sessions.insert(
                record.id,
                Session {
                    generation,
                    public_key: record.public_key,
                    outbox: outbox.clone(),
                    endpoints,
                    seen,
                    sent_routes: None,
                    sent_filter: None,
                },
            );
            if let Some(old) = old {
                old.outbox.stop();
            }
            live.disconnected.remove(&record.id);
        }
        if let Err(e) = self.store.set_node_online(record.id, true, now_secs()) {
            tracing::warn!(error = %e, "control: could not record a node online");
        }
        self.poke();
        tracing::info!(node = record.id, name = %record.name, "control: node connected");
        let id = record.id;
        let end = session.run(&mut |m| self.on_message(id, generation, &m));
        {
            let mut live = self.live.lock();
            if live
                .sessions
                .get(&id)
                .is_some_and(|s| s.generation == generation)
            {
                live.sessions.remove(&id);
                live.disconnected.insert(id, Instant::now());
            }
        }
        if end.write_timed_out {
            self.counters.dropped_slow.fetch_add(1, Relaxed);
        }
        // A removed node is gone from the store; this is then a no-op.
        if let Err(e) = self.store.set_node_online(id, false, now_secs()) {
            tracing::warn!(error = %e, "control: could not record a node offline");
        }
        self.poke();
        tracing::info!(node = id, reason = %end.reason, "control: node disconnected");
        Ok(())
    }

    /// Checks the proof and registers (or recognises) the node.
    fn register(
        &self,
        hs: &ServerHandshake,
        message: &[u8],
        exporter: &[u8; 32],
    ) -> Result<(NodeRecord, Vec<SocketAddr>), Refusal> {
        let body =
            NodeBody::decode(message).map_err(|e| Refusal(ErrorCode::BadRequest, e.to_string()))?;
        let NodeBody::Register {
            join_key,
            proof,
            hostname,
            routes,
            tags,
            endpoints,
        } = body
        else {
            return Err(Refusal(
                ErrorCode::BadRequest,
                "the first message must be a registration".into(),
            ));
        };
        let proof = unhex::<PROOF_LEN>(&proof)
            .map_err(|e| Refusal(ErrorCode::BadRequest, e.to_string()))?;
        let key = hs
            .verify(&proof, exporter)
            .map_err(|e| Refusal(ErrorCode::BadProof, format!("key proof: {e}")))?;
        let public_key = PublicKey::from_bytes(key);
        let routes =
            parse_routes(&routes).map_err(|e| Refusal(ErrorCode::BadRequest, e.to_string()))?;
        let now = now_secs();
        let record = match join_key {
            Some(text) => {
                let parsed = keys::parse(&text)?;
                let request = NodeRequest {
                    public_key,
                    hostname,
                };
                let mut refused_tag = None;
                let result = self.store.redeem_and_register(
                    &parsed.id,
                    &mut |record| {
                        keys::check(record, &parsed, now)?;
                        // Tags come from the key; asking for others is
                        // refused before the key is used up.
                        if let Some(t) = tags.iter().find(|t| !record.tags.contains(t)) {
                            refused_tag = Some(t.clone());
                            return Err(JoinError::Unknown);
                        }
                        Ok(())
                    },
                    &request,
                    now,
                );
                if let Some(t) = refused_tag {
                    return Err(tag_refused(&t));
                }
                result.map_err(|e| match e {
                    RedeemError::Join(j) => Refusal::from(j),
                    RedeemError::Store(s) => server_failure(s),
                })?
            }
            None => self
                .store
                .node_by_public_key(&public_key)
                .map_err(server_failure)?
                .ok_or_else(|| {
                    Refusal(
                        ErrorCode::NodeUnknown,
                        "this node is not registered (removed, or never joined): join with a join key".into(),
                    )
                })?,
        };
        if let Some(t) = tags.iter().find(|t| !record.tags.contains(t)) {
            return Err(tag_refused(t));
        }
        self.advertise(&record, &routes)?;
        let mut endpoints = endpoints;
        endpoints.truncate(MAX_ENDPOINTS - 1);
        Ok((record, endpoints))
    }

    /// The one place route decisions are made when a node advertises:
    /// `routes::advertise` records what it advertises and decides each
    /// route in one transaction (auto-approval by the stored policy, a
    /// refusal on overlap with another cluster's approved route); the
    /// statuses reach every node with the next snapshot.
    fn advertise(&self, node: &NodeRecord, advertised: &[IpPrefix]) -> Result<(), Refusal> {
        let refuse = |e: routes::RouteError| Refusal(ErrorCode::BadRequest, e.to_string());
        let policy = routes::stored_policy(&*self.store).map_err(refuse)?;
        routes::advertise(&*self.store, policy.as_ref(), node, advertised, now_secs())
            .map_err(refuse)?;
        Ok(())
    }

    fn on_message(&self, id: i64, generation: u64, message: &[u8]) {
        let update = match NodeBody::decode(message) {
            Ok(NodeBody::Update { endpoints, routes }) => (endpoints, routes),
            Ok(NodeBody::Register { .. }) | Err(_) => {
                tracing::debug!(node = id, "control: bad message from a node, ignored");
                return;
            }
        };
        if let Some(mut e) = update.0 {
            e.truncate(MAX_ENDPOINTS - 1);
            let mut live = self.live.lock();
            if let Some(s) = live.sessions.get_mut(&id) {
                if s.generation == generation {
                    s.endpoints = e;
                }
            }
        }
        if let Some(routes) = update.1 {
            let Ok(routes) = parse_routes(&routes) else {
                return;
            };
            let node = self.live.lock().snapshot.nodes.get(&id).cloned();
            if let Some(node) = node {
                if let Err(Refusal(_, m)) = self.advertise(&node, &routes) {
                    tracing::info!(node = id, error = %m, "control: routes refused");
                }
            }
        }
        self.poke();
    }

    fn watch(self: &Arc<Self>) {
        let mut last_ephemeral = Instant::now();
        loop {
            // Changes that come in a burst (nodes joining together) are
            // read and sent together: at most one refresh per
            // MIN_REFRESH, well inside the 1 s promise.
            std::thread::sleep(MIN_REFRESH);
            {
                let mut dirty = self.dirty.lock();
                if !*dirty {
                    self.wake.wait_for(&mut dirty, self.config.poll_interval);
                }
                *dirty = false;
            }
            if self.stop.load(Relaxed) {
                return;
            }
            if last_ephemeral.elapsed()
                >= (self.config.ephemeral_timeout / 4).min(Duration::from_secs(10))
            {
                last_ephemeral = Instant::now();
                let cutoff = now_secs().saturating_sub(self.config.ephemeral_timeout.as_secs());
                match self.store.remove_ephemeral_offline_before(cutoff) {
                    Ok(gone) => {
                        self.counters
                            .ephemeral_removed
                            .fetch_add(gone.len() as u64, Relaxed);
                        // Routes the removed nodes blocked in other
                        // clusters are freed now, as `nodes remove` does.
                        let routes: Vec<_> = gone.into_iter().flat_map(|g| g.routes).collect();
                        if let Err(e) = routes::stored_policy(&*self.store).and_then(|p| {
                            routes::withdrawn(&*self.store, p.as_ref(), &routes, now_secs())
                        }) {
                            self.counters.store_errors.fetch_add(1, Relaxed);
                            tracing::warn!(error = %e, "control: routes of removed ephemeral nodes not re-examined");
                        }
                    }
                    Err(e) => {
                        self.counters.store_errors.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "control: ephemeral clean-up failed");
                    }
                }
            }
            self.refresh();
        }
    }

    /// Elects the primary router of each approved prefix
    /// ([`routes::elect`]) from the sessions now, records a change in the
    /// store (in one transaction over the table as it is then, so a
    /// concurrent route decision is not overwritten) and applies it to
    /// `routes`, the table this refresh builds the map from.
    fn elect(&self, routes: &mut [crate::store::RouteRecord]) {
        let (connected, disconnected) = {
            let live = self.live.lock();
            let connected: std::collections::HashSet<i64> = live.sessions.keys().copied().collect();
            (connected, live.disconnected.clone())
        };
        let up = |id: i64| {
            connected.contains(&id)
                || disconnected.get(&id).unwrap_or(&self.started).elapsed() < routes::PRIMARY_GRACE
        };
        let changes = routes::elect(routes, &up);
        if changes.is_empty() {
            return;
        }
        if let Err(e) = self
            .store
            .change_routes(&mut |table| Ok(routes::elect(&table.routes, &up)))
        {
            self.counters.store_errors.fetch_add(1, Relaxed);
            tracing::warn!(error = %e, "control: primary routes not recorded");
        }
        for c in changes {
            if let routes::RouteChange::Set(new) = c {
                if let Some(r) = routes
                    .iter_mut()
                    .find(|r| r.node_id == new.node_id && r.prefix == new.prefix)
                {
                    tracing::info!(node = %r.node_name, prefix = %r.prefix, primary = new.primary, "control: primary route changed");
                    r.primary = new.primary;
                }
            }
        }
    }

    /// Reads the store, diffs, and pushes the changes to every session.
    fn refresh(&self) {
        let read = (|| {
            Ok::<_, crate::store::StoreError>((
                self.store.list_nodes()?,
                self.store.list_routes()?,
                self.store.policy()?,
            ))
        })();
        let (nodes, mut routes, policy) = match read {
            Ok(r) => r,
            Err(e) => {
                self.counters.store_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "control: reading the store failed");
                return;
            }
        };
        self.elect(&mut routes);
        let mut live = self.live.lock();
        let live = &mut *live;
        let now = Instant::now();
        live.closing.retain(|(at, outbox)| {
            let keep = *at > now;
            if !keep {
                outbox.stop();
            }
            keep
        });
        let snap = &mut live.snapshot;
        snap.nodes = nodes.into_iter().map(|n| (n.id, n)).collect();
        // Removed nodes' disconnection times go with them: the map holds at
        // most one entry per node in the store.
        live.disconnected
            .retain(|id, _| snap.nodes.contains_key(id));
        snap.routes.clear();
        for r in routes {
            let reason = match &r.status {
                routes::RouteStatus::Refused(c) => Some(c.to_string()),
                _ => None,
            };
            snap.routes.entry(r.node_id).or_default().push(RouteState {
                prefix: r.prefix.to_string(),
                approved: r.approved,
                status: r.status.word().to_string(),
                role: r.role().to_string(),
                reason,
            });
        }
        let policy_version = policy.as_ref().map(|p| p.version).unwrap_or(0);
        if snap.policy.as_ref().map(|p| p.0).unwrap_or(0) != policy_version {
            snap.policy = match policy {
                None => None,
                Some(p) => match Policy::parse(&p.text) {
                    Ok(parsed) => Some((p.version, parsed)),
                    Err(e) => {
                        // Policies are validated before they are stored;
                        // keep the last good one rather than open up.
                        tracing::warn!(error = %e, version = p.version, "control: stored policy does not parse, keeping the last one");
                        snap.policy.take()
                    }
                },
            };
        }
        // Sessions of removed nodes end. A node missing from this read may
        // also have registered just after it: the store decides.
        let gone: Vec<i64> = live
            .sessions
            .iter()
            .filter(|(id, _)| !snap.nodes.contains_key(id))
            .filter(
                |(id, s)| match self.store.node_by_public_key(&s.public_key) {
                    Ok(n) => n.is_none_or(|n| n.id != **id),
                    Err(_) => false,
                },
            )
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(s) = live.sessions.remove(&id) {
                let removed = ServerBody::Error {
                    code: ErrorCode::Removed,
                    message: "this node was removed from the mesh by the operator".into(),
                };
                // The error goes out first; the node ends the session on
                // it, and the server closes it after a grace either way.
                let _ = s.outbox.push(Bytes::from(removed.encode()));
                live.closing
                    .push((Instant::now() + REMOVED_GRACE, s.outbox));
                self.counters.closed_removed.fetch_add(1, Relaxed);
            }
        }
        // The peers as every node should see them now.
        let mut peers = BTreeMap::new();
        for (id, n) in &snap.nodes {
            let session = live.sessions.get(id);
            let mut endpoints = session.map(|s| s.endpoints.clone()).unwrap_or_default();
            if let Some(s) = session {
                if !endpoints.contains(&s.seen) {
                    endpoints.push(s.seen);
                }
            }
            // A prefix several routers carry goes to its primary only.
            let approved = snap
                .routes
                .get(id)
                .map(|r| {
                    r.iter()
                        .filter(|r| r.role == routes::PRIMARY)
                        .map(|r| r.prefix.clone())
                        .collect()
                })
                .unwrap_or_default();
            peers.insert(
                *id,
                Peer {
                    id: *id,
                    key: n.public_key.to_base64(),
                    name: n.name.clone(),
                    ipv4: n.ipv4,
                    ipv6: n.ipv6,
                    tags: n.tags.clone(),
                    routes: approved,
                    endpoints,
                    online: session.is_some(),
                },
            );
        }
        let upserts: Vec<Peer> = peers
            .iter()
            .filter(|(id, p)| snap.peers.get(id) != Some(p))
            .map(|(_, p)| p.clone())
            .collect();
        let removed: Vec<i64> = snap
            .peers
            .keys()
            .filter(|id| !peers.contains_key(id))
            .copied()
            .collect();
        // The filter depends on the mesh's addresses, tags and routes and
        // on the policy, not on endpoints or presence.
        let mesh_changed = upserts.iter().any(|p| {
            snap.peers.get(&p.id).is_none_or(|old| {
                old.tags != p.tags || old.routes != p.routes || old.ipv4 != p.ipv4
            })
        }) || !removed.is_empty();
        snap.peers = peers;
        if !upserts.is_empty() || !removed.is_empty() {
            snap.full = None;
        }
        let delta = (!upserts.is_empty() || !removed.is_empty()).then(|| {
            Bytes::from(
                ServerBody::Map(MapUpdate {
                    full: false,
                    upserts,
                    removed,
                    policy_version,
                    ..Default::default()
                })
                .encode(),
            )
        });
        let mesh: Vec<MeshNode> = if snap.policy.is_some() {
            snap.nodes.values().map(|n| mesh_node(n, snap)).collect()
        } else {
            Vec::new()
        };
        let mut slow = Vec::new();
        for (id, s) in live.sessions.iter_mut() {
            let mut push = |m: Bytes| {
                if s.outbox.push(m).is_err() {
                    slow.push(*id);
                }
            };
            if let Some(d) = &delta {
                push(d.clone());
                self.counters.deltas.fetch_add(1, Relaxed);
            }
            let own_routes = snap.routes.get(id).cloned().unwrap_or_default();
            let routes_changed = s.sent_routes.as_ref() != Some(&own_routes);
            let filter_stale = s
                .sent_filter
                .as_ref()
                .is_none_or(|(v, _)| *v != policy_version)
                || (mesh_changed && snap.policy.is_some());
            let mut own = MapUpdate {
                policy_version,
                ..Default::default()
            };
            let mut send = false;
            if routes_changed {
                own.routes = Some(own_routes.clone());
                s.sent_routes = Some(own_routes);
                send = true;
            }
            if filter_stale {
                let filter = match (&snap.policy, snap.nodes.get(id)) {
                    (Some((_, p)), Some(n)) => compile(Some(p), &mesh_node(n, snap), &mesh),
                    _ => None,
                };
                if s.sent_filter.as_ref() != Some(&(policy_version, filter.clone())) {
                    own.filter = filter.as_ref().map(filter_to_wire);
                    own.filter_set = true;
                    s.sent_filter = Some((policy_version, filter));
                    send = true;
                }
            }
            if send {
                push(Bytes::from(ServerBody::Map(own).encode()));
            }
        }
        for id in slow {
            if let Some(s) = live.sessions.remove(&id) {
                s.outbox.stop();
                self.counters.dropped_slow.fetch_add(1, Relaxed);
                tracing::info!(node = id, "control: node dropped: its send queue is full");
            }
        }
    }
}

fn tag_refused(tag: &str) -> Refusal {
    Refusal(
        ErrorCode::TagNotPermitted,
        format!("tag {tag} is not one the node's join key grants"),
    )
}

fn mesh_node(n: &NodeRecord, snap: &Snapshot) -> MeshNode {
    MeshNode {
        name: n.name.clone(),
        addresses: vec![IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)],
        tags: n.tags.clone(),
        routes: snap
            .routes
            .get(&n.id)
            .map(|r| {
                r.iter()
                    .filter(|r| r.approved)
                    .filter_map(|r| r.prefix.parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

impl Snapshot {
    /// The full map (every peer, the receiving node included: it skips
    /// itself), encoded once per snapshot.
    fn full_map(&mut self, config: &ControlServerConfig) -> Arc<Vec<Bytes>> {
        if let Some(f) = &self.full {
            return f.clone();
        }
        let peers: Vec<&Peer> = self.peers.values().collect();
        let mut chunks: Vec<&[&Peer]> = peers.chunks(FULL_MAP_PART).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        let parts: Vec<Bytes> = chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let m = ServerBody::Map(MapUpdate {
                    full: i == 0,
                    upserts: chunk.iter().map(|p| (*p).clone()).collect(),
                    relay_url: config.relay_url.clone().filter(|_| i == 0),
                    policy_version: self.policy.as_ref().map(|p| p.0).unwrap_or(0),
                    more: i != last,
                    ..Default::default()
                });
                Bytes::from(m.encode())
            })
            .collect();
        let parts = Arc::new(parts);
        self.full = Some(parts.clone());
        parts
    }
}
