//! Websocket services from above the engine on the tunnel server's one
//! listener, and the matching client connection.
//!
//! The engine must not know the services built on it (the control server
//! lives in `meshvpn-control`, which depends on the engine), so the
//! [`super::TunnelServer`] takes extra upgrade paths as
//! [`UpgradeRoute`]s: the path, a handler, and the route's session caps. An
//! upgrade on such a path gets the same treatment as the relay's: the TLS
//! and HTTP handshakes under the server's handshake deadline and caps, then
//! a session slot from the route's own [`Admission`] (nginx `limit_conn`:
//! answered 503 over the total or the per-source cap), then the handler
//! runs on the session thread with a [`Conn`].
//!
//! A [`Conn`] starts in handshake mode (blocking, still under the handshake
//! deadline and holding a handshake slot) for the service's own exchange
//! (e.g. a key proof, bound to the TLS session with [`Conn::exporter`]);
//! [`Conn::into_session`] switches it to the relay's pump: one thread,
//! mio, a send queue bounded in messages and bytes ([`Outbox`]), pings, an
//! idle limit and a write-progress deadline for peers that do not read.
//! The server's shutdown stops every such session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::relay::pump::{Outbox, Pump, PumpTimers, QueueLimits, Refused};
use std::time::Instant;

use tungstenite::handshake::server::{Request, Response};
use tungstenite::http::StatusCode;

use crate::ws::admission::{self, Admission, Slot};
use crate::ws::reconnect::{open_websocket, WebsocketTarget};
use crate::ws::transport::{Socket, Transport};
pub use crate::ws::HostStream;
use crate::ws::TunnelError;

/// A service on its own upgrade path of the tunnel server's listener.
///
/// Its clients send websocket frames only after they have read the 101
/// answer (as every websocket client does; frames pipelined before it
/// would be lost, see [`Conn`]'s construction).
pub trait UpgradeHandler: Send + Sync + 'static {
    /// Serves one upgraded connection to its end, on its own thread.
    fn serve(&self, conn: Conn);
}

/// One extra upgrade path and its session caps.
#[derive(Clone)]
pub struct UpgradeRoute {
    /// e.g. `/v1-meshvpn/control`.
    pub path: String,
    pub handler: Arc<dyn UpgradeHandler>,
    /// Websocket messages larger than this end the connection before they
    /// are buffered.
    pub max_message: usize,
    /// Sessions at once on this path; more upgrades are answered 503.
    pub max_sessions: usize,
    /// Sessions at once from one source address on this path; more from it
    /// are answered 503 while other sources are served.
    pub max_sessions_per_source: usize,
}

impl std::fmt::Debug for UpgradeRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeRoute")
            .field("path", &self.path)
            .field("max_message", &self.max_message)
            .field("max_sessions", &self.max_sessions)
            .field("max_sessions_per_source", &self.max_sessions_per_source)
            .finish_non_exhaustive()
    }
}

/// Websocket limits of an upgraded connection whose messages are at most
/// `max_message` bytes.
pub(crate) fn websocket_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        // Small buffers: a service may hold thousands of these (the control
        // server one per node), and a buffer keeps the size it grew to.
        .read_buffer_size(16 << 10)
        .write_buffer_size(16 << 10)
        .max_write_buffer_size(max_message.max(64 << 10) + (64 << 10))
}

/// The live sessions of all extra routes, so that the server's shutdown
/// ends them.
#[derive(Default)]
pub(crate) struct Sessions {
    live: Mutex<(bool, HashMap<u64, Arc<Outbox>>)>,
    next: AtomicU64,
}

impl Sessions {
    fn is_stopped(&self) -> bool {
        self.live.lock().0
    }

    pub(crate) fn stop_all(&self) {
        let mut live = self.live.lock();
        live.0 = true;
        for outbox in live.1.values() {
            outbox.stop();
        }
    }

    fn add(&self, outbox: Arc<Outbox>) -> Option<u64> {
        let mut live = self.live.lock();
        if live.0 {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        live.1.insert(id, outbox);
        Some(id)
    }

    fn remove(&self, id: u64) {
        self.live.lock().1.remove(&id);
    }
}

/// The routes' session admission, built once per server.
pub(crate) struct Routes {
    pub(crate) routes: Vec<(UpgradeRoute, Arc<Admission>)>,
    pub(crate) sessions: Arc<Sessions>,
}

impl Routes {
    pub(crate) fn new(routes: &[UpgradeRoute]) -> Routes {
        Routes {
            routes: routes
                .iter()
                .map(|r| {
                    (
                        r.clone(),
                        Admission::new(r.max_sessions, r.max_sessions_per_source),
                    )
                })
                .collect(),
            sessions: Arc::new(Sessions::default()),
        }
    }

    pub(crate) fn find(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|(r, _)| r.path == path)
    }
}

/// An upgraded websocket handed to a service (server side) or opened by
/// [`connect`] (client side).
pub struct Conn {
    ws: WebSocket<Transport>,
    peer: SocketAddr,
    /// On a host program's connection: the exporter value its TLS session
    /// gave for one label.
    host_tls: Option<HostTls>,
    /// Held until the service's own handshake is done.
    handshake: Option<Slot>,
    _session: Option<Slot>,
    sessions: Option<Arc<Sessions>>,
}

impl Conn {
    pub(crate) fn server(
        ws: WebSocket<Transport>,
        peer: SocketAddr,
        host_tls: Option<HostTls>,
        max_message: usize,
        handshake: Slot,
        session: Slot,
        sessions: Arc<Sessions>,
    ) -> Conn {
        // The upgrade was read with the listener's websocket settings,
        // whose 128 KiB read buffer tungstenite fills (zeroes) whole on the
        // first read: a service with thousands of sessions would hold that
        // per session. A client sends frames only after it read the 101,
        // which was written after the request was read, so nothing is
        // buffered yet and the websocket can be rebuilt with this route's
        // small buffers.
        let ws = WebSocket::from_raw_socket(
            ws.into_inner(),
            tungstenite::protocol::Role::Server,
            Some(websocket_config(max_message)),
        );
        Conn {
            ws,
            peer,
            host_tls,
            handshake: Some(handshake),
            _session: Some(session),
            sessions: Some(sessions),
        }
    }

    /// The other end's address as this side sees it (behind NAT: the
    /// public address).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The TLS exporter value (RFC 8446 section 7.5) for `label`, to bind a
    /// proof to this TLS session; on a host program's connection the value
    /// its TLS session gave (for that label only); zeros on a plain
    /// (test-only) connection.
    pub fn exporter(&self, label: &[u8]) -> Result<[u8; 32], TunnelError> {
        if let Some(host) = &self.host_tls {
            return if host.label == label {
                Ok(host.exporter)
            } else {
                Err(TunnelError::Tls(format!(
                    "the host program exported {:?}, not {:?}",
                    String::from_utf8_lossy(&host.label),
                    String::from_utf8_lossy(label)
                )))
            };
        }
        match &self.ws.get_ref().tls {
            Some(tls) => tls
                .export_keying_material([0u8; 32], label, None)
                .map_err(|e| TunnelError::Tls(e.to_string())),
            None => Ok([0u8; 32]),
        }
    }

    /// Sends one binary message (handshake mode: blocking, under the
    /// handshake deadline).
    pub fn send(&mut self, message: &[u8]) -> Result<(), TunnelError> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(message)))
            .map_err(|e| TunnelError::Handshake(e.to_string()))
    }

    /// The next binary message (handshake mode: blocking, under the
    /// handshake deadline); pings and pongs are skipped.
    pub fn recv(&mut self) -> Result<Bytes, TunnelError> {
        crate::relay::pump::read_binary(&mut self.ws)
    }

    /// The service's handshake is over: the handshake slot is freed.
    pub fn handshake_done(&mut self) {
        self.handshake = None;
    }

    /// Closes the websocket (best effort), e.g. after a refusal was sent.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }

    /// Switches to session mode with a send queue bounded by `limits`.
    pub fn into_session(mut self, limits: SessionLimits) -> Result<ConnSession, TunnelError> {
        self.handshake = None;
        let pump = Pump::new(
            &mut self.ws,
            QueueLimits {
                messages: limits.queue_messages,
                bytes: limits.queue_bytes,
                budget: None,
            },
        )?;
        let registered = match &self.sessions {
            Some(s) => Some(
                s.add(pump.outbox())
                    .ok_or_else(|| TunnelError::Handshake("server shutting down".into()))?,
            ),
            None => None,
        };
        Ok(ConnSession {
            conn: self,
            pump,
            registered,
            timers: PumpTimers {
                ping_every: limits.ping_every,
                idle: limits.idle,
                write_timeout: limits.write_timeout,
                liveness: false,
            },
        })
    }
}

/// How a [`ConnSession`] is bounded.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Messages waiting to be written before [`ConnOutbox::push`] refuses.
    pub queue_messages: usize,
    /// Bytes waiting (each message charged its length plus
    /// [`crate::relay::MESSAGE_OVERHEAD`]) before [`ConnOutbox::push`] refuses.
    pub queue_bytes: usize,
    /// Send a websocket ping this often.
    pub ping_every: Option<Duration>,
    /// End the session after this long without a message from the peer.
    pub idle: Duration,
    /// End the session when output waits this long without progress (a
    /// peer that does not read).
    pub write_timeout: Option<Duration>,
}

/// A connection in session mode.
pub struct ConnSession {
    conn: Conn,
    pump: Pump,
    registered: Option<u64>,
    timers: PumpTimers,
}

/// Why [`ConnOutbox::push`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushRefused {
    /// The queue holds its limit of messages or bytes.
    Full,
    /// The session ended.
    Closed,
}

/// The send queue of a [`ConnSession`], for other threads.
#[derive(Clone)]
pub struct ConnOutbox(Arc<Outbox>);

impl ConnOutbox {
    /// Queues one binary message; returns the bytes the queue holds then.
    pub fn push(&self, message: Bytes) -> Result<usize, PushRefused> {
        self.0.push(message).map_err(|e| match e {
            Refused::Full | Refused::Budget => PushRefused::Full,
            Refused::Closed => PushRefused::Closed,
        })
    }

    /// Ends the session (its `run` returns soon).
    pub fn stop(&self) {
        self.0.stop();
    }
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub reason: String,
    /// Its writes made no progress for the write timeout.
    pub write_timed_out: bool,
}

impl ConnSession {
    pub fn outbox(&self) -> ConnOutbox {
        ConnOutbox(self.pump.outbox())
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.conn.peer
    }

    /// Moves messages until the peer leaves, the outbox is stopped, the
    /// peer is idle or does not read; `on_message` gets every binary
    /// message.
    pub fn run(mut self, on_message: &mut dyn FnMut(Bytes)) -> SessionEnd {
        let reason = self.pump.run(&mut self.conn.ws, &self.timers, on_message);
        if let (Some(sessions), Some(id)) = (&self.conn.sessions, self.registered) {
            sessions.remove(id);
        }
        SessionEnd {
            reason,
            write_timed_out: self.pump.write_timed_out(),
        }
    }
}

/// The answer to an upgrade its route's [`Admission`] refused (nginx
/// `limit_conn` answers 503).
pub(crate) fn route_refusal(why: admission::Refused) -> &'static str {
    match why {
        admission::Refused::PerSource => "too many sessions from this address",
        admission::Refused::Total => "too many sessions",
    }
}

/// What a host program's TLS session exported for the service's proof
/// binding: the value for `label` (RFC 8446 section 7.5, no context),
/// which [`Conn::exporter`] gives for that label only.
#[derive(Clone)]
pub struct HostTls {
    pub label: Vec<u8>,
    pub exporter: [u8; 32],
}

impl std::fmt::Debug for HostTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The exporter value is a session secret's derivative: never logged.
        f.debug_struct("HostTls")
            .field("label", &String::from_utf8_lossy(&self.label))
            .finish_non_exhaustive()
    }
}

/// Why [`HostedRoute::serve`] did not start a session. Every refusal was
/// answered to the client on the stream (an HTTP status and its reason)
/// before the stream was closed, so the host program only relays it.
#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    /// Over a cap (handshakes or sessions, in total or from this source),
    /// or stopping: answered 503.
    #[error("{0}")]
    Busy(&'static str),
    /// Not a websocket upgrade for this route's path: answered 400 or 404.
    #[error("{0}")]
    BadRequest(String),
    /// The route was stopped: answered 503.
    #[error("the service was stopped")]
    Stopped,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The longest request head a host program may hand over (tungstenite's
/// own limit on the listener).
pub const MAX_HOSTED_HEAD: usize = 64 << 10;

/// An [`UpgradeRoute`] served on connections a host program accepted on
/// its own HTTPS router (k3s serves its remotedialer tunnel from its own Go
/// router on 6443): the host ends TLS, reads the request head, hijacks the
/// connection and hands over a stream socket (one end of a socketpair, the
/// host copying bytes between the other end and its connection), the head,
/// the client's address as it saw it, and its TLS session's exporter value.
///
/// From there it is the listener's path: the route's session caps
/// ([`Admission`], counted by the address the host gave), the websocket
/// server handshake (the 101, or a 503 / 400 / 404 written back on the
/// stream), then [`UpgradeHandler::serve`] on its own thread with a
/// [`Conn`], under the same handshake deadline and handshake caps
/// ([`super::DEFAULT_MAX_HANDSHAKES`], [`super::DEFAULT_MAX_HANDSHAKES_PER_SOURCE`])
/// as on the listener. [`HostedRoute::stop`] (and drop) ends every session.
pub struct HostedRoute {
    route: UpgradeRoute,
    admission: Arc<Admission>,
    handshakes: Arc<Admission>,
    sessions: Arc<Sessions>,
    handshake_timeout: Duration,
    /// A second handle on every connection being served, from the 101 to
    /// its end, so that stop also ends one still in the service's own
    /// handshake (not yet a session `Sessions` can stop).
    served: Arc<Mutex<HashMap<u64, HostStream>>>,
    next: AtomicU64,
}

impl HostedRoute {
    pub fn new(route: UpgradeRoute) -> HostedRoute {
        HostedRoute {
            admission: Admission::new(route.max_sessions, route.max_sessions_per_source),
            handshakes: Admission::new(
                super::DEFAULT_MAX_HANDSHAKES,
                super::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            ),
            route,
            sessions: Arc::new(Sessions::default()),
            handshake_timeout: crate::ws::DEFAULT_HANDSHAKE_TIMEOUT,
            served: Arc::default(),
            next: AtomicU64::new(0),
        }
    }

    /// Serves one connection: the websocket handshake on `stream` from
    /// `head` (the request line and headers through the blank line, which
    /// the host read already), then the route's handler on a thread of its
    /// own. Returns once the session started (`Ok`) or was refused; the
    /// stream is closed on every path but `Ok`'s.
    pub fn serve(
        &self,
        mut stream: HostStream,
        head: Vec<u8>,
        peer: SocketAddr,
        tls: HostTls,
    ) -> Result<(), HostedError> {
        // The handshake blocks under deadlines, whatever mode the host
        // created its socketpair in.
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(self.handshake_timeout))?;
        let answer = |stream: &mut HostStream, status: StatusCode, text: &str| {
            let _ = write_status(stream, status, text);
        };
        let handshake = match self.handshakes.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                let text = match why {
                    admission::Refused::PerSource => "too many handshakes from this address",
                    admission::Refused::Total => "too many handshakes",
                };
                answer(&mut stream, StatusCode::SERVICE_UNAVAILABLE, text);
                return Err(HostedError::Busy(text));
            }
        };
        if self.sessions.is_stopped() {
            answer(
                &mut stream,
                StatusCode::SERVICE_UNAVAILABLE,
                "server shutting down",
            );
            return Err(HostedError::Stopped);
        }
        // Only the head, and all of it: bytes after the blank line would be
        // frames read before the 101 and lost (see `Conn::server`).
        let end = head.windows(4).position(|w| w == b"\r\n\r\n");
        if head.len() > MAX_HOSTED_HEAD || end.map(|e| e + 4) != Some(head.len()) {
            let text = "the request head must end at its blank line and be at most 64 KiB";
            answer(&mut stream, StatusCode::BAD_REQUEST, text);
            return Err(HostedError::BadRequest(text.into()));
        }
        let sock = Socket::hosted(stream, Instant::now() + self.handshake_timeout, head);
        let mut session = None;
        let mut refusal = None;
        // tungstenite's callback returns its `ErrorResponse` (an
        // http::Response) by value.
        #[allow(clippy::result_large_err)]
        let callback = |request: &Request, response: Response| {
            if request.uri().path() != self.route.path {
                refusal = Some(HostedError::BadRequest(format!(
                    "not found: this service is on {}",
                    self.route.path
                )));
                return Err(super::server::reject(StatusCode::NOT_FOUND, "not found"));
            }
            match self.admission.admit(peer.ip()) {
                Ok(slot) => {
                    session = Some(slot);
                    Ok(response)
                }
                Err(why) => {
                    let text = route_refusal(why);
                    refusal = Some(HostedError::Busy(text));
                    Err(super::server::reject(StatusCode::SERVICE_UNAVAILABLE, text))
                }
            }
        };
        let ws = tungstenite::accept_hdr_with_config(
            Transport::plain(sock),
            callback,
            Some(websocket_config(self.route.max_message)),
        );
        let mut ws = match ws {
            Ok(ws) => ws,
            Err(e) => {
                // A refusal was answered (its status and reason); a request
                // tungstenite cannot read is closed without an answer.
                let text = e.to_string();
                drop(e);
                return Err(refusal.unwrap_or(HostedError::BadRequest(text)));
            }
        };
        let session = session.ok_or(HostedError::Stopped)?;
        ws.get_mut().sock.end_head();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            // Checked under the lock stop takes: after stop, nothing is
            // added that it would miss.
            let mut served = self.served.lock();
            if self.sessions.is_stopped() {
                return Err(HostedError::Stopped);
            }
            served.insert(id, ws.get_ref().sock.tcp.try_clone()?);
        }
        let served = self.served.clone();
        let handler = self.route.handler.clone();
        let conn = Conn::server(
            ws,
            peer,
            Some(tls),
            self.route.max_message,
            handshake,
            session,
            self.sessions.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("hosted-session".into())
            .spawn(move || {
                handler.serve(conn);
                served.lock().remove(&id);
            });
        if let Err(e) = spawned {
            self.served.lock().remove(&id);
            return Err(e.into());
        }
        Ok(())
    }

    /// Sessions now and refusals by the route's caps (as the listener's
    /// [`super::ExtraRouteStats`]).
    pub fn stats(&self) -> super::ExtraRouteStats {
        let (refused_sessions, refused_sessions_per_source) = self.admission.refused();
        super::ExtraRouteStats {
            sessions: self.admission.held(),
            refused_sessions,
            refused_sessions_per_source,
        }
    }

    /// Ends every session, and every connection still in the service's
    /// handshake, and refuses new ones.
    pub fn stop(&self) {
        let served = self.served.lock();
        self.sessions.stop_all();
        for stream in served.values() {
            let _ = stream.shutdown();
        }
    }
}

impl Drop for HostedRoute {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP answer on a stream no websocket took over.
fn write_status(
    out: &mut impl std::io::Write,
    status: StatusCode,
    text: &str,
) -> std::io::Result<()> {
    let body = format!("{text}\n");
    write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
}

/// Opens a websocket to `url` (`wss://`, or `ws://` for tests) within
/// `timeout`; the connection stays in handshake mode (blocking, with that
/// deadline) for the service's own exchange.
pub fn connect(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    token: Option<&str>,
    timeout: Duration,
    max_message: usize,
) -> Result<Conn, TunnelError> {
    crate::ws::reconnect::check_url(url, tls.is_some())?;
    let target = WebsocketTarget {
        url,
        tls,
        token,
        headers: &[],
        timeout,
    };
    let ws = open_websocket(&target, websocket_config(max_message))?;
    let peer = ws.get_ref().sock.tcp.peer_addr()?;
    Ok(Conn {
        ws,
        peer,
        host_tls: None,
        handshake: None,
        _session: None,
        sessions: None,
    })
}
