//! The server role: an HTTPS (or plain, for tests) listener that upgrades
//! agents on one path, authenticates them, keeps one session per client key
//! and dials through them.
//!
//! Each accepted socket gets a thread with a hard deadline for the TLS and
//! HTTP handshakes, and at most `max_handshakes` run at once, at most
//! `max_handshakes_per_source` of them from one address (nginx
//! `limit_conn`, see [`super::admission`]): a client that never finishes,
//! or sends a huge header (tungstenite stops at 64 KiB), costs one bounded
//! wait and never blocks the listener, and one address cannot take the
//! slots every other agent needs. Relay sessions are capped the same way
//! ([`RelayServerConfig::max_sessions`]).
//!
//! Stopping: the stop flag lives under the registry lock that admission
//! takes, and stop waits for upgrades already agreed to register, so after
//! [`TunnelServer::shutdown`] returns no 101 is sent and no session starts;
//! sessions that did start are ended and waited for (bounded).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use subtle::ConstantTimeEq;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;

use super::driver::{self, Incoming, SessionHooks, SessionShared};
use super::upgrade::{route_refusal, Conn, Routes, UpgradeRoute};
use super::TunnelStream;
use super::{Limits, Role};
use crate::io::accept::{accept_with_backoff, AcceptBackoff};
use crate::relay::pump as relay_pump;
use crate::relay::server::{Relay, RelayServerConfig, RelayServerStats};
use crate::stats::stats_struct;
use crate::ws::admission::{Admission, Refused, Slot};
use crate::ws::tls::certificate_common_name;
use crate::ws::transport::{Socket, Transport};
use crate::ws::TunnelError;

/// How a connecting agent proves who it is.
#[derive(Clone, Default)]
pub struct ServerAuth {
    /// Bearer tokens and the client key each stands for. Never logged.
    pub tokens: Vec<(String, String)>,
    /// Accept a verified TLS client certificate; its subject CN is the client key.
    pub client_cert_cn: bool,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuth")
            .field("tokens", &self.tokens.len())
            .field("client_cert_cn", &self.client_cert_cn)
            .finish()
    }
}

impl ServerAuth {
    fn client_key(&self, request: &Request, cert_cn: Option<&str>) -> Option<String> {
        let presented = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(presented) = presented {
            // Compare SHA-256 digests, so every comparison is of 32 bytes:
            // subtle's slice comparison returns at once when the lengths
            // differ, which would tell a client how long a token is. Every
            // token is checked; there is no early return.
            let presented = token_digest(presented);
            let mut found = None;
            for (token, key) in &self.tokens {
                if bool::from(token_digest(token).ct_eq(&presented)) {
                    found = Some(key.clone());
                }
            }
            if found.is_some() {
                return found;
            }
        }
        if self.client_cert_cn {
            return cert_cn.map(str::to_owned);
        }
        None
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Handshakes (TLS, HTTP upgrade, a relay client's key proof) in progress
/// at once, from all sources: each is one thread and one socket.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// Handshakes in progress at once from one source address. An agent or a
/// relay client runs one handshake at a time, so 16 lets 16 nodes behind
/// one NAT reconnect at the same instant, while one address can hold at
/// most a sixteenth of [`DEFAULT_MAX_HANDSHAKES`]: the rest stay free for
/// every other source.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// How long stop waits for ended sessions' threads to finish.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The upgrade path, e.g. `/v1-k3s/connect`.
    pub path: String,
    /// TLS settings; `None` serves plain HTTP (tests only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: ServerAuth,
    pub limits: Limits,
    /// TLS + HTTP upgrade must finish within this.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; more connections are closed at once
    /// (counted in [`ServerStats::refused_handshakes`]).
    pub max_handshakes: usize,
    /// Also serve the WireGuard relay (on its own path).
    pub relay: Option<RelayServerConfig>,
    /// Handshakes in progress at once from one source address; more from
    /// it are closed at once (counted in
    /// [`ServerStats::refused_handshakes_per_source`]) while other sources
    /// are served. Default [`DEFAULT_MAX_HANDSHAKES_PER_SOURCE`].
    pub max_handshakes_per_source: usize,
    /// More services on their own paths of this listener (e.g. the control
    /// server's `/v1-meshvpn/control`), under the same handshake deadline,
    /// handshake caps and shutdown; each with its own session caps.
    pub extra: Vec<UpgradeRoute>,
}

impl ServerConfig {
    pub fn new(
        path: impl Into<String>,
        tls: Option<Arc<rustls::ServerConfig>>,
        auth: ServerAuth,
    ) -> Self {
        Self {
            path: path.into(),
            tls,
            auth,
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            relay: None,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            extra: Vec::new(),
        }
    }
}

stats_struct! {
    /// Counters of a server, since it started.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct ServerStats {
        /// Agents with a tunnel session now.
        pub sessions: usize,
        /// Handshakes in progress now.
        pub handshakes: usize,
        /// Connections closed at once: `max_handshakes` were in progress.
        pub refused_handshakes: u64,
        /// Connections closed at once: their source had
        /// `max_handshakes_per_source` in progress.
        pub refused_handshakes_per_source: u64,
        /// Relay sessions now (from the upgrade, key proof included).
        pub relay_sessions: usize,
        /// Relay upgrades answered 503: the relay had `max_sessions`.
        pub refused_relay_sessions: u64,
        /// Relay upgrades answered 503: their source had
        /// `max_sessions_per_source`.
        pub refused_relay_sessions_per_source: u64,
    }
}

/// Counters of one extra upgrade path ([`ServerConfig::extra`]), for the
/// service that owns it (not part of the C ABI's server stats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraRouteStats {
    /// Sessions now (from the upgrade to the end).
    pub sessions: usize,
    /// Upgrades answered 503: the path had `max_sessions`.
    pub refused_sessions: u64,
    /// Upgrades answered 503: their source had `max_sessions_per_source`.
    pub refused_sessions_per_source: u64,
}

/// Live sessions and the admission state stop coordinates with.
struct Registry {
    sessions: HashMap<String, Arc<SessionShared>>,
    /// Set by stop: no upgrade is agreed to from then on.
    stopping: bool,
    /// Upgrades agreed to (their 101 is on its way) and not yet registered.
    admitting: usize,
}

struct ServerShared {
    config: ServerConfig,
    local_addr: SocketAddr,
    /// Ends the accept loop.
    stop: AtomicBool,
    handshakes: Arc<Admission>,
    /// With the relay on.
    relay_sessions: Option<Arc<Admission>>,
    registry: Mutex<Registry>,
    changed: Condvar,
    relay: Option<Relay>,
    extra: Routes,
}

/// An agreed upgrade on its way to a session; stop waits for these.
struct Admitting(Arc<ServerShared>);

impl ServerShared {
    /// `None` once stop began: the upgrade must be refused.
    fn begin_admitting(self: &Arc<Self>) -> Option<Admitting> {
        let mut registry = self.registry.lock();
        if registry.stopping {
            return None;
        }
        registry.admitting += 1;
        Some(Admitting(self.clone()))
    }
}

impl Drop for Admitting {
    fn drop(&mut self) {
        self.0.registry.lock().admitting -= 1;
        self.0.changed.notify_all();
    }
}

/// A running tunnel server. Dropping it stops listening and ends its sessions.
pub struct TunnelServer {
    shared: Arc<ServerShared>,
    accept: Option<JoinHandle<()>>,
}

impl TunnelServer {
    /// Listens on `addr` and serves in the background.
    pub fn bind(addr: SocketAddr, config: ServerConfig) -> Result<Self, TunnelError> {
        let relay = config.relay.clone().map(Relay::new).transpose()?;
        let listener = TcpListener::bind(addr)?;
        let shared = Arc::new(ServerShared {
            local_addr: listener.local_addr()?,
            relay,
            extra: Routes::new(&config.extra),
            handshakes: Admission::new(config.max_handshakes, config.max_handshakes_per_source),
            relay_sessions: config
                .relay
                .as_ref()
                .map(|r| Admission::new(r.max_sessions, r.max_sessions_per_source)),
            config,
            stop: AtomicBool::new(false),
            registry: Mutex::new(Registry {
                sessions: HashMap::new(),
                stopping: false,
                admitting: 0,
            }),
            changed: Condvar::new(),
        });
        let worker = shared.clone();
        let accept = std::thread::Builder::new()
            .name("tunnel-listen".into())
            .spawn(move || accept_loop(&worker, listener))?;
        Ok(Self {
            shared,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Client keys with a live session.
    pub fn clients(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .shared
            .registry
            .lock()
            .sessions
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Sessions, handshakes and refusals.
    pub fn stats(&self) -> ServerStats {
        let (refused_handshakes, refused_handshakes_per_source) = self.shared.handshakes.refused();
        let (relay_sessions, (refused_relay_sessions, refused_relay_sessions_per_source)) = self
            .shared
            .relay_sessions
            .as_ref()
            .map(|a| (a.held(), a.refused()))
            .unwrap_or_default();
        ServerStats {
            sessions: self.shared.registry.lock().sessions.len(),
            handshakes: self.shared.handshakes.held(),
            refused_handshakes,
            refused_handshakes_per_source,
            relay_sessions,
            refused_relay_sessions,
            refused_relay_sessions_per_source,
        }
    }

    /// The counters of the extra upgrade path `path`, when there is one.
    pub fn extra_stats(&self, path: &str) -> Option<ExtraRouteStats> {
        let i = self.shared.extra.find(path)?;
        let a = &self.shared.extra.routes[i].1;
        let (refused_sessions, refused_sessions_per_source) = a.refused();
        Some(ExtraRouteStats {
            sessions: a.held(),
            refused_sessions,
            refused_sessions_per_source,
        })
    }

    /// The relay's counters, when it serves one.
    pub fn relay_stats(&self) -> Option<RelayServerStats> {
        self.shared.relay.as_ref().map(Relay::stats)
    }

    /// Waits until `client_key` has a session (`true`) or `timeout` passes.
    pub fn wait_for_client(&self, client_key: &str, timeout: Duration) -> bool {
        crate::ws::wait_for(&self.shared.registry, &self.shared.changed, timeout, |r| {
            r.sessions.contains_key(client_key)
        })
    }

    /// Opens a connection to `proto/address` as seen from the agent `client_key`.
    /// Returns at once (no round trip); a refused or failed dial shows as an
    /// error on the first read.
    pub fn dial(
        &self,
        client_key: &str,
        proto: &str,
        address: &str,
    ) -> Result<TunnelStream, TunnelError> {
        let session = self
            .shared
            .registry
            .lock()
            .sessions
            .get(client_key)
            .cloned()
            .ok_or_else(|| TunnelError::NoSession(client_key.to_owned()))?;
        let mut inner = session.lock();
        if inner.ended {
            return Err(TunnelError::NoSession(client_key.to_owned()));
        }
        let id = inner.core.dial(Instant::now(), proto, address)?;
        let stream = TunnelStream::register(&session, &mut inner, id);
        session.after_op(&mut inner);
        Ok(stream)
    }

    /// Stops listening and ends every session.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let shared = &self.shared;
        {
            let mut registry = shared.registry.lock();
            if registry.stopping {
                return;
            }
            // From here every upgrade is refused (`begin_admitting`).
            registry.stopping = true;
        }
        shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&shared.local_addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // Upgrades agreed before the flag register (or fail) within the
        // handshake deadline their 101 is written under; then every
        // session that exists is one this loop ends.
        let limit = shared.config.handshake_timeout + Duration::from_secs(1);
        if !crate::ws::wait_for(&shared.registry, &shared.changed, limit, |r| {
            r.admitting == 0
        }) {
            tracing::warn!("tunnel: an upgrade was still being admitted at stop");
        }
        for session in shared.registry.lock().sessions.values() {
            session.stop("server shutting down");
        }
        if let Some(relay) = &shared.relay {
            relay.stop_all();
        }
        shared.extra.sessions.stop_all();
        crate::ws::wait_for(&shared.registry, &shared.changed, STOP_WAIT, |r| {
            r.sessions.is_empty()
        });
    }
}

impl Drop for TunnelServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<ServerShared>, listener: TcpListener) {
    let mut backoff = AcceptBackoff::new();
    while let Some((tcp, peer)) = accept_with_backoff(&listener, &mut backoff, || {
        shared.stop.load(Ordering::SeqCst)
    }) {
        // nginx limit_conn: over a cap the connection is closed at once
        // (dropping `tcp`) and counted; other sources keep being served.
        let slot = match shared.handshakes.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(source = %peer.ip(), ?why, "tunnel: handshake refused");
                continue;
            }
        };
        let worker = shared.clone();
        // On failure the closure, slot and socket included, is dropped.
        let _ = std::thread::Builder::new()
            .name("tunnel-session".into())
            .spawn(move || match handshake(&worker, tcp, peer.ip()) {
                Ok((ws, Upgraded::Tunnel(client_key, admitting))) => {
                    drop(slot);
                    serve_session(&worker, ws, client_key, admitting);
                }
                Ok((ws, Upgraded::Relay(session))) => {
                    // The key proof still holds the handshake slot (and
                    // deadline); the relay session slot is held to the end.
                    serve_relay(&worker, ws, slot, session);
                }
                Ok((ws, Upgraded::Extra(route, session))) => {
                    // The service's own handshake still holds the handshake
                    // slot (and deadline) until it calls `handshake_done`.
                    let (r, _) = &worker.extra.routes[route];
                    let conn = Conn::server(
                        ws,
                        peer,
                        None,
                        r.max_message,
                        slot,
                        session,
                        worker.extra.sessions.clone(),
                    );
                    r.handler.serve(conn);
                }
                Err(e) => {
                    drop(slot);
                    tracing::debug!(?peer, error = %e, "tunnel: handshake failed");
                }
            });
    }
}

pub(crate) fn reject(status: StatusCode, text: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(text.to_owned()));
    *response.status_mut() = status;
    response
}

/// What a connection upgraded to.
enum Upgraded {
    /// A tunnel agent, authenticated as this client key, still to be
    /// registered.
    Tunnel(String, Admitting),
    /// A relay client holding a relay session slot; it proves its key next.
    Relay(Slot),
    /// A connection on `config.extra[.0]`, holding its session slot.
    Extra(usize, Slot),
}

// tungstenite's callback returns its `ErrorResponse` (an http::Response) by value.
#[allow(clippy::result_large_err)]
fn handshake(
    shared: &Arc<ServerShared>,
    tcp: TcpStream,
    source: IpAddr,
) -> Result<(tungstenite::WebSocket<Transport>, Upgraded), TunnelError> {
    let config = &shared.config;
    tcp.set_nodelay(true)?;
    let sock = Socket::with_deadline(tcp, Instant::now() + config.handshake_timeout);
    let transport = match &config.tls {
        Some(tls) => {
            let conn = rustls::ServerConnection::new(tls.clone())
                .map_err(|e| TunnelError::Tls(e.to_string()))?;
            Transport::tls(sock, conn.into()).map_err(|e| TunnelError::Tls(e.to_string()))?
        }
        None => Transport::plain(sock),
    };
    let cert_cn = transport
        .peer_leaf_certificate()
        .and_then(certificate_common_name);
    let mut client_key = None;
    let mut relay_session = None;
    let mut extra_session = None;
    // Held until the 101 is written (relay) or the session registered
    // (tunnel), so that stop can wait for it.
    let mut admitting = None;
    let callback = |request: &Request, response: Response| {
        if let Some(i) = shared.extra.find(request.uri().path()) {
            // The service authenticates its clients itself (after the
            // upgrade); the route caps its sessions as the relay's are.
            extra_session = match shared.extra.routes[i].1.admit(source) {
                Ok(slot) => Some((i, slot)),
                Err(why) => {
                    return Err(reject(StatusCode::SERVICE_UNAVAILABLE, route_refusal(why)))
                }
            };
            admitting = shared.begin_admitting();
            if admitting.is_none() {
                return Err(reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server shutting down",
                ));
            }
            return Ok(response);
        }
        let relay = config
            .relay
            .as_ref()
            .filter(|r| request.uri().path() == r.path);
        if relay.is_none() && request.uri().path() != config.path {
            return Err(reject(StatusCode::NOT_FOUND, "not found"));
        }
        if let Some(r) = relay {
            // Relay clients prove their WireGuard key next; the tunnel's
            // credentials only when asked for.
            if r.require_auth
                && config
                    .auth
                    .client_key(request, cert_cn.as_deref())
                    .is_none()
            {
                return Err(reject(StatusCode::UNAUTHORIZED, "failed authentication"));
            }
            // nginx limit_conn answers 503 over its limits.
            let sessions = shared.relay_sessions.as_ref().map(|a| a.admit(source));
            relay_session = match sessions {
                Some(Ok(slot)) => Some(slot),
                Some(Err(Refused::PerSource)) => {
                    return Err(reject(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many relay sessions from this address",
                    ))
                }
                Some(Err(Refused::Total)) | None => {
                    return Err(reject(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many relay sessions",
                    ))
                }
            };
        } else {
            match config.auth.client_key(request, cert_cn.as_deref()) {
                Some(key) => client_key = Some(key),
                None => return Err(reject(StatusCode::UNAUTHORIZED, "failed authentication")),
            }
        }
        admitting = shared.begin_admitting();
        if admitting.is_none() {
            return Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "server shutting down",
            ));
        }
        Ok(response)
    };
    let mut ws =
        tungstenite::accept_hdr_with_config(transport, callback, Some(driver::websocket_config()))
            .map_err(|e| TunnelError::Handshake(e.to_string()))?;
    let admitting =
        admitting.ok_or_else(|| TunnelError::Handshake("upgrade not admitted".into()))?;
    if let Some((route, slot)) = extra_session {
        // Registered in the session list before the 101 counts as agreed:
        // stop ends it from there on (`Sessions::stop_all`).
        drop(admitting);
        return Ok((ws, Upgraded::Extra(route, slot)));
    }
    if let Some(slot) = relay_session {
        ws.set_config(|c| *c = relay_pump::websocket_config());
        // The 101 is out: the relay refuses to register once stopped.
        drop(admitting);
        return Ok((ws, Upgraded::Relay(slot)));
    }
    let client_key = client_key.ok_or_else(|| TunnelError::Handshake("no client key".into()))?;
    Ok((ws, Upgraded::Tunnel(client_key, admitting)))
}

fn serve_relay(
    shared: &Arc<ServerShared>,
    ws: tungstenite::WebSocket<Transport>,
    handshake: Slot,
    _session: Slot,
) {
    let Some(relay) = &shared.relay else {
        return;
    };
    let peer = ws.get_ref().sock.tcp.peer_addr().ok();
    let mut handshake = Some(handshake);
    let result = relay.serve(ws, peer, &mut || drop(handshake.take()));
    if let Err(e) = result {
        tracing::info!(?peer, error = %e, "relay: registration refused");
    }
}

struct ServerHooks {
    shared: Arc<ServerShared>,
    admitting: Mutex<Option<Admitting>>,
}

impl SessionHooks for ServerHooks {
    fn started(&self, session: &Arc<SessionShared>) {
        let admitting = self.admitting.lock().take();
        let mut registry = self.shared.registry.lock();
        if registry.stopping {
            // Stop waits for `admitting`; this session is ended, not kept.
            drop(registry);
            session.stop("server shutting down");
            drop(admitting);
            return;
        }
        let old = registry
            .sessions
            .insert(session.client_key.clone(), session.clone());
        drop(registry);
        drop(admitting);
        if let Some(old) = &old {
            old.stop("replaced by a new session for the same client");
        }
        self.shared.changed.notify_all();
        tracing::info!(client = %session.client_key, replaced = old.is_some(), "tunnel: session up");
    }

    fn incoming(&self, _session: &Arc<SessionShared>, _incoming: Incoming) {
        // The session core refuses Connects on the server side already.
    }
}

fn serve_session(
    shared: &Arc<ServerShared>,
    ws: tungstenite::WebSocket<Transport>,
    client_key: String,
    admitting: Admitting,
) {
    let hooks = ServerHooks {
        shared: shared.clone(),
        admitting: Mutex::new(Some(admitting)),
    };
    let reason = driver::run(
        ws,
        Role::Server,
        shared.config.limits.clone(),
        client_key.clone(),
        &hooks,
    );
    drop(hooks);
    let mut registry = shared.registry.lock();
    let ours = registry
        .sessions
        .get(&client_key)
        .is_some_and(|s| s.lock().ended);
    if ours {
        registry.sessions.remove(&client_key);
    }
    drop(registry);
    shared.changed.notify_all();
    tracing::info!(client = %client_key, %reason, "tunnel: session ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>) -> Request {
        let mut r = Request::builder().uri("/v1-k3s/connect");
        if let Some(a) = authorization {
            r = r.header("authorization", a);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn bearer_tokens_match_whole_and_only_whole() {
        let auth = ServerAuth {
            tokens: vec![
                ("short".into(), "system:node:a".into()),
                ("secret-token-b".into(), "system:node:b".into()),
            ],
            client_cert_cn: false,
        };
        let key = |a: Option<&str>| auth.client_key(&request(a), Some("cn"));
        assert_eq!(
            key(Some("Bearer secret-token-b")).as_deref(),
            Some("system:node:b")
        );
        assert_eq!(key(Some("Bearer short")).as_deref(), Some("system:node:a"));
        for wrong in [
            "Bearer secret-token",    // a prefix
            "Bearer secret-token-bb", // longer, same prefix
            "Bearer shor",            // shorter
            "Bearer ",                // empty
            "Bearer secret-token-c",  // same length
            "secret-token-b",         // no scheme
            "Bearer  secret-token-b", // not the same bytes
        ] {
            assert_eq!(key(Some(wrong)), None, "{wrong:?} was accepted");
        }
        assert_eq!(
            key(None),
            None,
            "the certificate CN counts only when enabled"
        );
        let cert = ServerAuth {
            client_cert_cn: true,
            ..auth.clone()
        };
        assert_eq!(
            cert.client_key(&request(Some("Bearer wrong")), Some("system:node:c"))
                .as_deref(),
            Some("system:node:c")
        );
    }

    #[test]
    fn every_comparison_is_between_equal_length_digests() {
        // subtle's slice comparison returns at once on a length mismatch;
        // digests make every comparison 32 bytes against 32 bytes.
        for t in ["", "a", "a much longer bearer token than the others"] {
            assert_eq!(token_digest(t).len(), 32);
        }
        assert_ne!(token_digest("a"), token_digest("b"));
    }
}
