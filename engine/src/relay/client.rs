//! The client end of the WireGuard relay: one websocket to a relay, kept
//! open (reconnecting with backoff), registered under the owner's
//! WireGuard public key.
//!
//! ```text
//!   owner.send(dst key, datagram) ──Frame::encode──► Outbox ──► relay
//!   relay ──[src key][datagram]──► pump thread ──► RelayOwner::deliver
//! ```
//!
//! The owner (the engine) supplies its static key for the registration
//! proof and takes delivered datagrams; it is held weakly by the engine's
//! side, so a client never keeps an engine alive.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tungstenite::Message;

use super::pump::{
    self as relay_pump, exporter, read_binary, Outbox, Pump, PumpTimers, QueueLimits,
};
use crate::relay::protocol::{check_accepted, prove, Frame, KEY_LEN};
use crate::stats::stats_struct;
use crate::supervisor::agent::{check_url, open_websocket, Backoff, WebsocketTarget};
use crate::ws::TunnelError;

/// How to reach a relay.
pub struct RelayConfig {
    /// `wss://host:port/v1-meshvpn/relay` (`ws://` for tests).
    pub url: String,
    /// Required for `wss://`: trusts exactly the given CA, and presents a
    /// client certificate when built with one (see
    /// [`super::tls::client_config`]); a server with a client CA and no
    /// tokens demands one.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Sent as `Authorization: Bearer ...` when set. Never logged.
    pub token: Option<String>,
    pub handshake_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Messages waiting to be written before new ones are dropped.
    pub queue: usize,
    /// How often a peer that moved to the relay is probed over UDP.
    pub probe_interval: Duration,
}

impl RelayConfig {
    pub fn new(url: impl Into<String>, tls: Option<Arc<rustls::ClientConfig>>) -> RelayConfig {
        RelayConfig {
            url: url.into(),
            tls,
            token: None,
            handshake_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            queue: 1024,
            probe_interval: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

stats_struct! {
    /// What a relay client is doing.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct RelayStatus {
        /// Registered with the relay now.
        pub connected: bool,
        /// Registrations so far.
        pub sessions: u64,
        /// Why the last session or attempt ended.
        pub last_error: Option<String>,
        /// WireGuard datagrams sent through the relay.
        pub frames_sent: u64,
        /// WireGuard datagrams received from the relay.
        pub frames_received: u64,
        /// Frames not sent: no session, or the send queue was full.
        pub frames_dropped: u64,
    }
}

/// The side that owns the WireGuard key and consumes what arrives.
pub trait RelayOwner: Send + Sync {
    /// The current static private key; `None` while there is none (the
    /// client waits).
    fn static_secret(&self) -> Option<StaticSecret>;
    /// A datagram the relay delivered from the peer with public key `source`.
    fn deliver(&self, source: &[u8; KEY_LEN], datagram: &[u8]);
}

struct ClientShared {
    config: RelayConfig,
    owner: Arc<dyn RelayOwner>,
    stop: AtomicBool,
    reconnect: AtomicBool,
    status: Mutex<RelayStatus>,
    changed: Condvar,
    current: RwLock<Option<Arc<Outbox>>>,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
}

/// A running relay client. Dropping it disconnects.
pub struct RelayClient {
    shared: Arc<ClientShared>,
    thread: Option<JoinHandle<()>>,
}

impl RelayClient {
    /// Starts connecting in the background.
    pub fn start(config: RelayConfig, owner: Arc<dyn RelayOwner>) -> Result<Self, TunnelError> {
        check_url(&config.url, config.tls.is_some())?;
        let shared = Arc::new(ClientShared {
            config,
            owner,
            stop: AtomicBool::new(false),
            reconnect: AtomicBool::new(false),
            status: Mutex::new(RelayStatus::default()),
            changed: Condvar::new(),
            current: RwLock::new(None),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("meshvpn-relay".into())
            .spawn(move || connect_loop(&worker))?;
        Ok(RelayClient {
            shared,
            thread: Some(thread),
        })
    }

    pub fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// Sends one datagram to the client registered as `destination`;
    /// false (and counted) when there is no session or its queue is full.
    pub fn send(&self, destination: &[u8; KEY_LEN], datagram: &[u8]) -> bool {
        let sent = match (
            self.shared.current.read().as_ref(),
            Frame::encode(destination, datagram),
        ) {
            (Some(outbox), Ok(m)) => outbox.push(Bytes::from(m)).is_ok(),
            _ => false,
        };
        let counter = if sent {
            &self.shared.sent
        } else {
            &self.shared.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        sent
    }

    pub fn status(&self) -> RelayStatus {
        let mut s = self.shared.status.lock().clone();
        s.frames_sent = self.shared.sent.load(Ordering::Relaxed);
        s.frames_received = self.shared.received.load(Ordering::Relaxed);
        s.frames_dropped = self.shared.dropped.load(Ordering::Relaxed);
        s
    }

    /// Waits until registered (`true`) or `timeout` passes.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        crate::ws::wait_for(&self.shared.status, &self.shared.changed, timeout, |s| {
            s.connected
        })
    }

    /// Ends the current session; the client registers again at once (with
    /// the owner's key of that moment: call after a key change).
    pub fn reconnect(&self) {
        self.shared.reconnect.store(true, Ordering::SeqCst);
        if let Some(outbox) = self.shared.current.read().as_ref() {
            outbox.stop();
        }
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(outbox) = self.shared.current.read().as_ref() {
            outbox.stop();
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The last error when the relay demands a client certificate: every
/// place one can be given.
const CLIENT_CERTIFICATE_REQUIRED: &str =
    "the relay server requires a client certificate (signed by its --client-ca): \
     pass --relay-cert and --relay-key (C: meshvpn_relay_config.client_cert_pem and \
     client_key_pem; Go: RelayConfig.ClientCertPEM and ClientKeyPEM)";

/// How long to wait for the owner to have a key before asking again.
const KEY_POLL: Duration = Duration::from_millis(200);
/// Websocket pings from the client; the relay ends silent sessions after 60 s.
const PING_EVERY: Duration = Duration::from_secs(15);
const IDLE: Duration = Duration::from_secs(60);

fn connect_loop(shared: &Arc<ClientShared>) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    while !shared.stop.load(Ordering::SeqCst) {
        let Some(secret) = shared.owner.static_secret() else {
            wait(shared, KEY_POLL);
            continue;
        };
        let started = Instant::now();
        let reason = match session(shared, &secret) {
            Ok(reason) => reason,
            Err(e) => e.to_string(),
        };
        drop(secret);
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        tracing::warn!(url = %config.url, %reason, "relay: disconnected");
        {
            let mut status = shared.status.lock();
            status.connected = false;
            status.last_error = Some(reason);
        }
        shared.changed.notify_all();
        // A session ended for a key change registers again at once.
        if shared.reconnect.swap(false, Ordering::SeqCst) {
            continue;
        }
        wait(shared, backoff.next(started.elapsed()));
    }
    shared.status.lock().connected = false;
    shared.changed.notify_all();
}

fn wait(shared: &ClientShared, delay: Duration) {
    let deadline = Instant::now() + delay;
    let mut status = shared.status.lock();
    while !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        shared.changed.wait_until(&mut status, deadline);
    }
}

fn session(shared: &Arc<ClientShared>, secret: &StaticSecret) -> Result<String, TunnelError> {
    let config = &shared.config;
    let mut ws = open_websocket(
        &WebsocketTarget {
            url: &config.url,
            tls: config.tls.as_ref(),
            token: config.token.as_deref(),
            headers: &[],
            timeout: config.handshake_timeout,
        },
        relay_pump::websocket_config(),
    )
    .map_err(|e| match e {
        TunnelError::ClientCertificateRequired => {
            TunnelError::Tls(CLIENT_CERTIFICATE_REQUIRED.into())
        }
        other => other,
    })?;
    // The key proof, still within the handshake deadline.
    let challenge = read_binary(&mut ws)?;
    let proof = prove(&challenge, secret, &exporter(ws.get_ref())?)
        .map_err(|e| TunnelError::Handshake(format!("relay challenge: {e}")))?;
    ws.send(Message::Binary(Bytes::copy_from_slice(&proof)))
        .map_err(|e| TunnelError::Handshake(e.to_string()))?;
    check_accepted(&read_binary(&mut ws)?)
        .map_err(|e| TunnelError::Handshake(format!("relay registration: {e}")))?;

    // The engine's own datagrams, bounded by count as before; the relay
    // bounds what it holds for this client in bytes.
    let mut pump = Pump::new(
        &mut ws,
        QueueLimits {
            messages: config.queue,
            bytes: usize::MAX,
            budget: None,
        },
    )?;
    *shared.current.write() = Some(pump.outbox());
    {
        let mut status = shared.status.lock();
        status.connected = true;
        status.sessions += 1;
    }
    shared.changed.notify_all();
    tracing::info!(url = %config.url, "relay: registered");
    if shared.stop.load(Ordering::SeqCst) {
        pump.outbox().stop();
    }
    let timers = PumpTimers {
        ping_every: Some(PING_EVERY),
        idle: IDLE,
        write_timeout: None,
    };
    let reason = pump.run(&mut ws, &timers, &mut |m| match Frame::decode(&m) {
        Ok(f) => {
            shared.received.fetch_add(1, Ordering::Relaxed);
            shared.owner.deliver(f.key, f.datagram);
        }
        Err(_) => {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    });
    *shared.current.write() = None;
    Ok(reason)
}
