//! The server role: an HTTPS (or plain, for tests) listener that upgrades
//! agents on one path, authenticates them, keeps one session per client key
//! and dials through them.
//!
//! Each accepted socket gets a thread with a hard deadline for the TLS and
//! HTTP handshakes, and at most `max_handshakes` run at once: a client that
//! never finishes, or sends a huge header (tungstenite stops at 64 KiB),
//! costs one bounded wait and never blocks the listener.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use subtle::ConstantTimeEq;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;

use super::driver::{self, Incoming, SessionHooks, SessionShared};
use super::relay_pump;
use super::relay_server::{Relay, RelayServerConfig, RelayServerStats};
use super::tls::certificate_common_name;
use super::transport::{Socket, Transport};
use super::{TunnelError, TunnelStream};
use crate::tunnel::{Limits, Role};

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
            // Compare against every token, in constant time per token.
            let mut found = None;
            for (token, key) in &self.tokens {
                if bool::from(token.as_bytes().ct_eq(presented.as_bytes())) {
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
    /// Handshakes in progress at once; more connections are closed at once.
    pub max_handshakes: usize,
    /// Also serve the WireGuard relay (on its own path).
    pub relay: Option<RelayServerConfig>,
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
            max_handshakes: 256,
            relay: None,
        }
    }
}

struct ServerShared {
    config: ServerConfig,
    local_addr: SocketAddr,
    stop: AtomicBool,
    handshakes: AtomicUsize,
    sessions: Mutex<HashMap<String, Arc<SessionShared>>>,
    changed: Condvar,
    relay: Option<Relay>,
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
            config,
            stop: AtomicBool::new(false),
            handshakes: AtomicUsize::new(0),
            sessions: Mutex::new(HashMap::new()),
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
        let mut keys: Vec<String> = self.shared.sessions.lock().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The relay's counters, when it serves one.
    pub fn relay_stats(&self) -> Option<RelayServerStats> {
        self.shared.relay.as_ref().map(Relay::stats)
    }

    /// Waits until `client_key` has a session (`true`) or `timeout` passes.
    pub fn wait_for_client(&self, client_key: &str, timeout: Duration) -> bool {
        super::wait_for(&self.shared.sessions, &self.shared.changed, timeout, |s| {
            s.contains_key(client_key)
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
            .sessions
            .lock()
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
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.shared.local_addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for session in self.shared.sessions.lock().values() {
            session.stop("server shutting down");
        }
        if let Some(relay) = &self.shared.relay {
            relay.stop_all();
        }
    }
}

impl Drop for TunnelServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<ServerShared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel: accept failed");
                // EMFILE and friends: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.handshakes.fetch_add(1, Ordering::SeqCst) >= shared.config.max_handshakes {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!("tunnel: too many handshakes in progress, dropping a connection");
            continue;
        }
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("tunnel-session".into())
            .spawn(move || {
                let peer = tcp.peer_addr().ok();
                match handshake(&worker.config, tcp) {
                    Ok((ws, Upgraded::Tunnel(client_key))) => {
                        worker.handshakes.fetch_sub(1, Ordering::SeqCst);
                        serve_session(&worker, ws, client_key);
                    }
                    Ok((ws, Upgraded::Relay)) => {
                        // The key proof still counts as handshake (deadline and slot).
                        serve_relay(&worker, ws);
                    }
                    Err(e) => {
                        worker.handshakes.fetch_sub(1, Ordering::SeqCst);
                        tracing::debug!(?peer, error = %e, "tunnel: handshake failed");
                    }
                }
            });
        if spawned.is_err() {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn reject(status: StatusCode, text: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(text.to_owned()));
    *response.status_mut() = status;
    response
}

/// What a connection upgraded to.
enum Upgraded {
    /// A tunnel agent, authenticated as this client key.
    Tunnel(String),
    /// A relay client; it proves its key next.
    Relay,
}

// tungstenite's callback returns its `ErrorResponse` (an http::Response) by value.
#[allow(clippy::result_large_err)]
fn handshake(
    config: &ServerConfig,
    tcp: TcpStream,
) -> Result<(tungstenite::WebSocket<Transport>, Upgraded), TunnelError> {
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
    let mut relay = false;
    let callback = |request: &Request, response: Response| {
        if let Some(r) = config
            .relay
            .as_ref()
            .filter(|r| request.uri().path() == r.path)
        {
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
            relay = true;
            return Ok(response);
        }
        if request.uri().path() != config.path {
            return Err(reject(StatusCode::NOT_FOUND, "not found"));
        }
        match config.auth.client_key(request, cert_cn.as_deref()) {
            Some(key) => {
                client_key = Some(key);
                Ok(response)
            }
            None => Err(reject(StatusCode::UNAUTHORIZED, "failed authentication")),
        }
    };
    let mut ws =
        tungstenite::accept_hdr_with_config(transport, callback, Some(driver::websocket_config()))
            .map_err(|e| TunnelError::Handshake(e.to_string()))?;
    if relay {
        ws.set_config(|c| *c = relay_pump::websocket_config());
        return Ok((ws, Upgraded::Relay));
    }
    let client_key = client_key.ok_or_else(|| TunnelError::Handshake("no client key".into()))?;
    Ok((ws, Upgraded::Tunnel(client_key)))
}

fn serve_relay(shared: &Arc<ServerShared>, ws: tungstenite::WebSocket<Transport>) {
    let Some(relay) = &shared.relay else {
        shared.handshakes.fetch_sub(1, Ordering::SeqCst);
        return;
    };
    let peer = ws.get_ref().sock.tcp.peer_addr().ok();
    let mut counted = true;
    let result = relay.serve(ws, &mut || {
        if std::mem::take(&mut counted) {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
        }
    });
    if counted {
        shared.handshakes.fetch_sub(1, Ordering::SeqCst);
    }
    if let Err(e) = result {
        tracing::info!(?peer, error = %e, "relay: registration refused");
    }
}

struct ServerHooks {
    shared: Arc<ServerShared>,
}

impl SessionHooks for ServerHooks {
    fn started(&self, session: &Arc<SessionShared>) {
        let old = self
            .shared
            .sessions
            .lock()
            .insert(session.client_key.clone(), session.clone());
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
) {
    let hooks = ServerHooks {
        shared: shared.clone(),
    };
    let reason = driver::run(
        ws,
        Role::Server,
        shared.config.limits.clone(),
        client_key.clone(),
        &hooks,
    );
    let mut sessions = shared.sessions.lock();
    let ours = sessions.get(&client_key).is_some_and(|s| s.lock().ended);
    if ours {
        sessions.remove(&client_key);
    }
    drop(sessions);
    shared.changed.notify_all();
    tracing::info!(client = %client_key, %reason, "tunnel: session ended");
}
