//! The relay service of a tunnel server: WireGuard datagrams between clients
//! that cannot reach each other over UDP, forwarded by public key, never
//! decrypted (the relay has no key that could).
//!
//! A client upgrades on the relay path of the same HTTPS listener, proves it
//! owns the private key of the public key it registers
//! ([`crate::relay::protocol`]), and then sends `[destination key][datagram]`
//! messages; each is re-tagged `[source key][datagram]` and queued to the
//! destination's session. A frame to a key with no session, or to a session
//! whose queue is full, is dropped and counted. A newer registration of a
//! key replaces (and ends) the older session.
//!
//! Memory is bounded the way DERP bounds it (tailscale's `derp_server.go`:
//! a send queue per client, a full queue drops and counts, and a client
//! whose writes stall past a deadline is closed): each session's queue is
//! bounded in bytes ([`RelayServerConfig::queue_bytes`]), all sessions of a
//! server share one byte budget ([`RelayServerConfig::budget_bytes`]), and a
//! session whose writes make no progress for
//! [`RelayServerConfig::write_timeout`] is closed and its queue freed. A
//! frame past a limit is dropped at once: the sender's reader never waits
//! for a slow destination. (DERP drops the oldest queued packet first; this
//! relay drops the new one, which keeps a push O(1) under the queue lock.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use ring::rand::SecureRandom;
use tungstenite::{Message, WebSocket};

use super::pump::{
    exporter, read_binary, Outbox, Pump, PumpTimers, QueueLimits, Refused, MESSAGE_OVERHEAD,
};
use crate::config::PublicKey;
use crate::peer::BufferBudget;
use crate::relay::protocol::{
    Frame, ObservedAddress, ServerHandshake, ACCEPTED, KEY_LEN, MAX_FRAME,
};
use crate::stats::stats_struct;
use crate::ws::transport::Transport;
use crate::ws::TunnelError;

/// The default upgrade path of the relay.
pub const RELAY_PATH: &str = "/v1-meshvpn/relay";

/// Relay sessions at once, from all sources. Each is one thread and three
/// files (socket, epoll, eventfd), so 1024 bound the relay to 1024 threads
/// and 3072 files, within the open-file limit `meshvpn` raises itself to
/// (and k3s's 1048576); a cluster's relay serves one session per node.
pub const DEFAULT_RELAY_MAX_SESSIONS: usize = 1024;

/// Relay sessions at once from one source address. A node holds one; 32
/// serves 32 nodes behind one NAT, while one address can take at most a
/// thirty-second of [`DEFAULT_RELAY_MAX_SESSIONS`].
pub const DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE: usize = 32;
/// Default [`RelayServerConfig::queue_bytes`]: 1 MiB toward one client,
/// about 700 full-size WireGuard packets (80 ms at 100 Mbit/s).
pub const DEFAULT_QUEUE_BYTES: usize = 1 << 20;
/// Default [`RelayServerConfig::budget_bytes`]: 64 MiB for all the
/// relay's queues together (64 clients with full queues).
pub const DEFAULT_BUDGET_BYTES: usize = 64 << 20;
/// Default [`RelayServerConfig::write_timeout`] (DERP uses 2 s per frame;
/// this is per stall, and generous for a node on a slow link).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The smallest [`RelayServerConfig::queue_bytes`]: one largest frame, so
/// every valid frame fits an empty queue.
pub const MIN_QUEUE_BYTES: usize = MAX_FRAME + MESSAGE_OVERHEAD;

/// Relay settings of a [`super::TunnelServer`].
#[derive(Debug, Clone)]
pub struct RelayServerConfig {
    /// The upgrade path (next to the tunnel's own on the same listener).
    pub path: String,
    /// Only these keys may register; `None` admits any key whose owner
    /// proves possession.
    pub allowed_keys: Option<Vec<PublicKey>>,
    /// Messages queued toward one client before new ones are dropped (and
    /// counted in `dropped_full`); [`RelayServerConfig::queue_bytes`] bounds
    /// the same queue in bytes.
    pub queue: usize,
    /// A session with no message (clients ping every 15 s) for this long ends.
    pub idle: Duration,
    /// Also require the tunnel's own credentials (a bearer token or a client
    /// certificate, as for agents) before the key proof.
    pub require_auth: bool,
    /// Sessions at once (from the upgrade to the end); more upgrades are
    /// answered 503. Default [`DEFAULT_RELAY_MAX_SESSIONS`].
    pub max_sessions: usize,
    /// Sessions at once from one source address; more from it are answered
    /// 503 while other sources register. Default
    /// [`DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE`].
    pub max_sessions_per_source: usize,
    /// Bytes queued toward one client (each frame charged its length plus
    /// 64 bytes of bookkeeping) before new frames to it are dropped and
    /// counted in `dropped_full`. At least [`MIN_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// Bytes queued toward all clients together before new frames to any
    /// are dropped and counted in `dropped_budget`. At least `queue_bytes`.
    /// Beyond the queues, a session holds at most tungstenite's write buffer
    /// (256 KiB) and TLS's (64 KiB): see engine/docs/relay.md.
    pub budget_bytes: usize,
    /// A session whose writes make no progress (under 64 KiB taken by the
    /// socket) for this long, with output waiting, is closed, its queue
    /// freed, and counted in `closed_slow`.
    pub write_timeout: Duration,
}

impl RelayServerConfig {
    /// Checks the limits; the text says which one is wrong and why.
    pub fn check(&self) -> Result<(), String> {
        if self.queue == 0 {
            return Err("relay queue must hold at least one message".into());
        }
        if self.queue_bytes < MIN_QUEUE_BYTES {
            return Err(format!(
                "relay queue bytes {} is below one largest frame ({MIN_QUEUE_BYTES} bytes)",
                self.queue_bytes
            ));
        }
        if self.budget_bytes < self.queue_bytes {
            return Err(format!(
                "relay budget bytes {} is below the queue bytes of one client ({})",
                self.budget_bytes, self.queue_bytes
            ));
        }
        if self.write_timeout.is_zero() {
            return Err("relay write timeout must be above zero".into());
        }
        Ok(())
    }
}

impl Default for RelayServerConfig {
    fn default() -> Self {
        RelayServerConfig {
            path: RELAY_PATH.into(),
            allowed_keys: None,
            queue: 1024,
            idle: Duration::from_secs(60),
            require_auth: false,
            max_sessions: DEFAULT_RELAY_MAX_SESSIONS,
            max_sessions_per_source: DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            budget_bytes: DEFAULT_BUDGET_BYTES,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

stats_struct! {
    /// Counters of a relay, since it started.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct RelayServerStats {
        /// Keys with a live session.
        pub clients: usize,
        /// Registrations so far.
        pub registrations: u64,
        /// Registrations that replaced a live session of the same key.
        pub replaced: u64,
        /// Proofs that failed, and keys outside `allowed_keys`.
        pub refused: u64,
        /// Frames forwarded to their destination's session.
        pub forwarded: u64,
        /// Frames to a key without a session.
        pub dropped_unknown: u64,
        /// Frames to a session whose queue was full (`queue` messages or
        /// `queue_bytes`).
        pub dropped_full: u64,
        /// Frames too short to hold a key and a datagram.
        pub dropped_malformed: u64,
        /// Frames dropped because all queues together held `budget_bytes`.
        pub dropped_budget: u64,
        /// Sessions closed because their writes made no progress for
        /// `write_timeout` (clients that do not read).
        pub closed_slow: u64,
        /// Bytes queued toward all clients now (charged as for the limits);
        /// 0 once every session has ended.
        pub queued_bytes: usize,
        /// The most `queued_bytes` has been.
        pub queued_bytes_peak: usize,
        /// The most one session's queue has held.
        pub session_queued_bytes_peak: usize,
    }
}

struct Client {
    session: u64,
    outbox: Arc<Outbox>,
}

#[derive(Default)]
struct Counters {
    registrations: AtomicU64,
    replaced: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    dropped_unknown: AtomicU64,
    dropped_full: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_budget: AtomicU64,
    closed_slow: AtomicU64,
    sessions: AtomicU64,
    queued_peak: AtomicUsize,
    session_queued_peak: AtomicUsize,
}

/// The registry of relay clients, shared by the server's session threads.
pub(crate) struct Relay {
    pub(crate) config: RelayServerConfig,
    clients: RwLock<HashMap<[u8; KEY_LEN], Client>>,
    counters: Counters,
    /// Set under the `clients` lock by `stop_all`: nothing registers after.
    stopped: AtomicBool,
    /// Every session's queue charges this (`budget_bytes`).
    budget: Arc<BufferBudget>,
}

impl Relay {
    pub(crate) fn new(config: RelayServerConfig) -> Result<Relay, TunnelError> {
        config.check().map_err(TunnelError::Config)?;
        Ok(Relay {
            budget: Arc::new(BufferBudget::new(config.budget_bytes)),
            config,
            clients: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            stopped: AtomicBool::new(false),
        })
    }

    pub(crate) fn stats(&self) -> RelayServerStats {
        let c = &self.counters;
        RelayServerStats {
            clients: self.clients.read().len(),
            registrations: c.registrations.load(Relaxed),
            replaced: c.replaced.load(Relaxed),
            refused: c.refused.load(Relaxed),
            forwarded: c.forwarded.load(Relaxed),
            dropped_unknown: c.dropped_unknown.load(Relaxed),
            dropped_full: c.dropped_full.load(Relaxed),
            dropped_malformed: c.dropped_malformed.load(Relaxed),
            dropped_budget: c.dropped_budget.load(Relaxed),
            closed_slow: c.closed_slow.load(Relaxed),
            queued_bytes: self.budget.used(),
            queued_bytes_peak: c.queued_peak.load(Relaxed),
            session_queued_bytes_peak: c.session_queued_peak.load(Relaxed),
        }
    }

    /// Ends every session (server shutdown).
    pub(crate) fn stop_all(&self) {
        let clients = self.clients.write();
        self.stopped.store(true, Relaxed);
        for c in clients.values() {
            c.outbox.stop();
        }
    }

    /// Serves one upgraded websocket: the key proof (still within the
    /// handshake deadline), then frames until the session ends.
    /// `registered` runs once the proof is settled, either way. `peer`: the
    /// TCP peer's address, told to the client after the acceptance.
    pub(crate) fn serve(
        &self,
        mut ws: WebSocket<Transport>,
        peer: Option<std::net::SocketAddr>,
        registered: &mut dyn FnMut(),
    ) -> Result<String, TunnelError> {
        let proof = self.authenticate(&mut ws);
        registered();
        let key = match proof {
            Ok(k) => k,
            Err(e) => {
                self.counters.refused.fetch_add(1, Relaxed);
                let _ = ws.close(None);
                let _ = ws.flush();
                return Err(e);
            }
        };
        let mut pump = Pump::new(
            &mut ws,
            QueueLimits {
                messages: self.config.queue,
                bytes: self.config.queue_bytes,
                budget: Some(self.budget.clone()),
            },
        )?;
        // The acceptance goes first in the client's queue, and the client is
        // in the registry before it can read it: once told it is registered,
        // datagrams for it are delivered.
        pump.outbox().push_unlimited(Bytes::from_static(&ACCEPTED));
        // Then where we see the client from: its NAT's public address, which
        // it compares with the last session's (DERP's server tells its
        // clients their public IP likewise). One short message per session.
        if let Some(peer) = peer {
            pump.outbox()
                .push_unlimited(Bytes::from(ObservedAddress(peer).encode()));
        }
        let session = self.counters.sessions.fetch_add(1, Relaxed);
        let mut clients = self.clients.write();
        if self.stopped.load(Relaxed) {
            drop(clients);
            let _ = ws.close(None);
            let _ = ws.flush();
            return Err(TunnelError::Handshake("relay: server shutting down".into()));
        }
        let old = clients.insert(
            key,
            Client {
                session,
                outbox: pump.outbox(),
            },
        );
        drop(clients);
        self.counters.registrations.fetch_add(1, Relaxed);
        if let Some(old) = old {
            self.counters.replaced.fetch_add(1, Relaxed);
            old.outbox.stop();
        }
        let who = PublicKey::from_bytes(key);
        tracing::info!(key = %who, "relay: client registered");
        let timers = PumpTimers {
            ping_every: None,
            idle: self.config.idle,
            write_timeout: Some(self.config.write_timeout),
            liveness: false,
        };
        // `run` frees the queue before the session leaves the registry; a
        // frame pushed in between is refused as for a key without a session.
        let reason = pump.run(&mut ws, &timers, &mut |m| self.forward(&key, m));
        if pump.write_timed_out() {
            self.counters.closed_slow.fetch_add(1, Relaxed);
        }
        let mut clients = self.clients.write();
        if clients.get(&key).is_some_and(|c| c.session == session) {
            clients.remove(&key);
        }
        drop(clients);
        tracing::info!(key = %who, %reason, "relay: client gone");
        Ok(reason)
    }

    /// Challenges the client and checks its proof of a WireGuard key (and
    /// the key list); the acceptance is sent by [`Relay::serve`]
    /// once the client is registered.
    fn authenticate(&self, ws: &mut WebSocket<Transport>) -> Result<[u8; KEY_LEN], TunnelError> {
        let mut random = [0u8; 64];
        ring::rand::SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| TunnelError::Config("no system randomness".into()))?;
        let hs = ServerHandshake::new(random);
        ws.send(Message::Binary(Bytes::copy_from_slice(&hs.challenge())))
            .map_err(|e| TunnelError::Handshake(e.to_string()))?;
        let proof = read_binary(ws)?;
        let key = hs
            .verify(&proof, &exporter(ws.get_ref())?)
            .map_err(|e| TunnelError::Handshake(format!("relay registration: {e}")))?;
        if let Some(allowed) = &self.config.allowed_keys {
            if !allowed.iter().any(|k| k.as_bytes() == &key) {
                return Err(TunnelError::Handshake(format!(
                    "relay registration: key {} is not allowed",
                    PublicKey::from_bytes(key)
                )));
            }
        }
        Ok(key)
    }

    fn forward(&self, source: &[u8; KEY_LEN], message: Bytes) {
        let mut message = Vec::from(message);
        let destination = match Frame::decode(&message) {
            Ok(f) => *f.key,
            Err(_) => {
                self.counters.dropped_malformed.fetch_add(1, Relaxed);
                return;
            }
        };
        message[..KEY_LEN].copy_from_slice(source);
        let clients = self.clients.read();
        let Some(to) = clients.get(&destination) else {
            self.counters.dropped_unknown.fetch_add(1, Relaxed);
            return;
        };
        let c = &self.counters;
        match to.outbox.push(Bytes::from(message)) {
            Ok(queued) => {
                c.forwarded.fetch_add(1, Relaxed);
                c.session_queued_peak.fetch_max(queued, Relaxed);
                c.queued_peak.fetch_max(self.budget.used(), Relaxed);
            }
            Err(Refused::Full) => {
                c.dropped_full.fetch_add(1, Relaxed);
            }
            Err(Refused::Budget) => {
                c.dropped_budget.fetch_add(1, Relaxed);
            }
            Err(Refused::Closed) => {
                c.dropped_unknown.fetch_add(1, Relaxed);
            }
        }
    }
}
