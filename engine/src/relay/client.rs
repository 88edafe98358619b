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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::StaticSecret;
use bytes::Bytes;
use parking_lot::RwLock;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::pump::{
    self as relay_pump, exporter, read_binary, Outbox, Pump, PumpTimers, QueueLimits,
};
use crate::relay::liveness::KEEPALIVE_EVERY;
use crate::relay::protocol::{check_accepted, prove, Control, Frame, KEY_LEN};
use crate::stats::stats_struct;
use crate::ws::reconnect::{
    Protocol, Reconnecting, Up, WebsocketTarget, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX,
    DEFAULT_HANDSHAKE_TIMEOUT,
};
use crate::ws::transport::Transport;
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
    /// TCP connect, TLS, the upgrade and the key proof together
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// The first wait after a failure ([`DEFAULT_BACKOFF_INITIAL`]); see
    /// [`crate::ws::STABLE_SESSION`] for when it starts over.
    pub backoff_initial: Duration,
    /// The longest wait between attempts ([`DEFAULT_BACKOFF_MAX`]).
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
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
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
    /// The address the relay sees this session come from (the NAT's public
    /// address), told once per session by a relay that knows the message.
    fn observed(&self, _address: std::net::SocketAddr) {}
}

struct ClientShared {
    config: RelayConfig,
    owner: Arc<dyn RelayOwner>,
    current: RwLock<Option<Arc<Outbox>>>,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
}

/// A running relay client. Dropping it disconnects.
pub struct RelayClient {
    client: Reconnecting<ClientShared>,
}

impl RelayClient {
    /// Starts connecting in the background.
    pub fn start(config: RelayConfig, owner: Arc<dyn RelayOwner>) -> Result<Self, TunnelError> {
        let (initial, max) = (config.backoff_initial, config.backoff_max);
        let shared = Arc::new(ClientShared {
            config,
            owner,
            current: RwLock::new(None),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        Ok(RelayClient {
            client: Reconnecting::start("meshvpn-relay", shared, initial, max)?,
        })
    }

    pub fn config(&self) -> &RelayConfig {
        &self.client.protocol().config
    }

    /// Sends one datagram to the client registered as `destination`;
    /// false (and counted) when there is no session or its queue is full.
    pub fn send(&self, destination: &[u8; KEY_LEN], datagram: &[u8]) -> bool {
        let shared = self.client.protocol();
        let sent = match (
            shared.current.read().as_ref(),
            Frame::encode(destination, datagram),
        ) {
            (Some(outbox), Ok(m)) => outbox.push(Bytes::from(m)).is_ok(),
            _ => false,
        };
        let counter = if sent { &shared.sent } else { &shared.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        sent
    }

    pub fn status(&self) -> RelayStatus {
        let link = self.client.status();
        let shared = self.client.protocol();
        RelayStatus {
            connected: link.connected,
            sessions: link.sessions,
            last_error: link.last_error,
            frames_sent: shared.sent.load(Ordering::Relaxed),
            frames_received: shared.received.load(Ordering::Relaxed),
            frames_dropped: shared.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits until registered (`true`) or `timeout` passes.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        self.client.wait_connected(timeout)
    }

    /// Checks the session now: one ping, and a new session at once if
    /// nothing at all arrives within [`crate::relay::liveness::PONG_TIMEOUT`]
    /// (call it when the network may have changed under the connection).
    /// Nothing without a session.
    pub fn check(&self) {
        if let Some(outbox) = self.client.protocol().current.read().as_ref() {
            outbox.check();
        }
    }

    /// Ends the current session; the client registers again at once (with
    /// the owner's key of that moment: call after a key change).
    pub fn reconnect(&self) {
        self.client.reconnect();
    }
}

/// The last error when the relay demands a client certificate: every
/// place one can be given.
const CLIENT_CERTIFICATE_REQUIRED: &str =
    "the relay server requires a client certificate (signed by its --client-ca): \
     pass --relay-cert and --relay-key (C: meshvpn_relay_config.client_cert_pem and \
     client_key_pem; Go: RelayConfig.ClientCertPEM and ClientKeyPEM)";

/// The session ends after this long with nothing from the relay; the
/// liveness pings ([`crate::relay::liveness`]) notice a dead one long before.
const IDLE: Duration = Duration::from_secs(60);

impl Protocol for ClientShared {
    const NAME: &'static str = "relay";
    /// The owner's key of the moment: the proof is made with it.
    type Ticket = StaticSecret;

    fn target(&self) -> WebsocketTarget<'_> {
        WebsocketTarget {
            url: &self.config.url,
            tls: self.config.tls.as_ref(),
            token: self.config.token.as_deref(),
            headers: &[],
            timeout: self.config.handshake_timeout,
        }
    }

    fn websocket_config(&self) -> WebSocketConfig {
        relay_pump::websocket_config()
    }

    fn ticket(&self) -> Option<StaticSecret> {
        self.owner.static_secret()
    }

    fn connect_error(&self, e: TunnelError) -> TunnelError {
        match e {
            TunnelError::ClientCertificateRequired => {
                TunnelError::Tls(CLIENT_CERTIFICATE_REQUIRED.into())
            }
            other => other,
        }
    }

    fn run(
        this: &Arc<Self>,
        ws: WebSocket<Transport>,
        secret: StaticSecret,
        up: &Up<'_>,
    ) -> Result<String, TunnelError> {
        session(this, ws, &secret, up)
    }

    fn interrupt(&self) {
        if let Some(outbox) = self.current.read().as_ref() {
            outbox.stop();
        }
    }
}

fn session(
    shared: &ClientShared,
    mut ws: WebSocket<Transport>,
    secret: &StaticSecret,
    up: &Up<'_>,
) -> Result<String, TunnelError> {
    let config = &shared.config;
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
    if !up.connected() {
        pump.outbox().stop();
    }
    let timers = PumpTimers {
        ping_every: Some(KEEPALIVE_EVERY),
        idle: IDLE,
        write_timeout: None,
        liveness: true,
    };
    let reason = pump.run(&mut ws, &timers, &mut |m| match Frame::decode(&m) {
        // Too short for a frame: the server's control message.
        Err(_) if Control::is_control(&m) => match Control::decode(&m) {
            Ok(Control::Observed(a)) => shared.owner.observed(a.0),
            Ok(Control::Unknown) => {}
            Err(_) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        },
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
