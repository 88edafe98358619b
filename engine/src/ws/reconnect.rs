//! One reconnecting websocket client, shared by the tunnel agent and the
//! relay client: dial (TCP, TLS, HTTP upgrade with the token and headers,
//! all within one handshake deadline), hand the websocket to the protocol,
//! wait, again, until stopped.
//!
//! - [`Backoff`]: the delays between attempts, sans-IO. It is told when a
//!   session came up and when an attempt or a session ended, with the time,
//!   and answers how long to wait; it never reads a clock or sleeps.
//! - [`Reconnecting`]: the thread that runs the loop and sleeps (a stop or a
//!   reconnect request wakes it at once); [`Protocol`] is what the agent and
//!   the relay client do on a connected websocket.
//!
//! What each client does differently on purpose stays in its [`Protocol`]:
//! the agent runs the remotedialer session and counts a session as up once
//! its driver starts; the relay client needs its owner's key before it can
//! dial ([`Protocol::ticket`]), proves it after the upgrade and counts a
//! session as up only once the relay accepted the proof, rewords a missing
//! client certificate ([`Protocol::connect_error`]), and registers again at
//! once after a key change ([`Reconnecting::reconnect`]).

use std::cell::Cell;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::WebSocket;

use super::transport::{Socket, Transport};
use super::TunnelError;

/// The first wait after a failure (agent and relay client).
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// The longest wait between attempts (agent and relay client).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long TCP connect, TLS, the upgrade (and the relay's key proof) may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that stayed up this long was a success: the next wait starts
/// again from the initial one. A shorter one (a server that accepts and
/// drops at once) keeps growing the backoff, so it cannot cause a storm of
/// reconnects every initial wait.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How often an attempt that cannot start yet ([`Protocol::ticket`] is
/// `None`) is tried again; not a failure, so the backoff does not grow.
const NOT_READY_POLL: Duration = Duration::from_millis(200);
/// The shortest first wait, so that a zero setting cannot spin.
const MIN_BACKOFF: Duration = Duration::from_millis(1);

/// Exponential backoff with jitter between connection attempts, sans-IO.
///
/// Shaped after Tailscale's `logtail/backoff` (used by its DERP client
/// loop): the wait grows with each failure up to a cap, is randomized so
/// that many clients dropped at once (a server restart) do not come back
/// in step, and a success starts it over. remotedialer's `ClientConnect`
/// dials once and leaves retrying to its caller, so it has nothing to
/// follow here. Where this differs from Tailscale, on purpose:
/// - the step doubles (0.5 s, 1 s, 2 s, ... 30 s) rather than growing as
///   n² × 10 ms, the defaults this library always had;
/// - the jitter factor is in [0.5, 1), not [0.5, 1.5), so the cap is a
///   real upper bound;
/// - "success" is a session that stayed up [`STABLE_SESSION`], not any
///   session that came up (see there why). The time is measured from the
///   moment the session came up: a slow failing attempt (several addresses,
///   each timing out) is not a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The wait before the next attempt, before jitter.
    step: Duration,
    /// When the current session came up, if one is up.
    connected_at: Option<Instant>,
    /// When the next attempt may start; `None`: at once.
    retry_at: Option<Instant>,
    stopped: bool,
    rng: u64,
}

impl Backoff {
    /// `seed` feeds the jitter; give each client its own.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        let initial = initial.max(MIN_BACKOFF);
        Backoff {
            initial,
            max: max.max(initial),
            step: initial,
            connected_at: None,
            retry_at: None,
            stopped: false,
            rng: seed,
        }
    }

    /// A session came up at `now`.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The attempt failed, or the session ended, at `now`: schedules the
    /// next attempt and returns the wait chosen.
    pub fn on_failed(&mut self, now: Instant) -> Duration {
        if let Some(up) = self.connected_at.take() {
            if now.saturating_duration_since(up) >= STABLE_SESSION {
                self.step = self.initial;
            }
        }
        let delay = self.step.mul_f64(0.5 + self.jitter() / 2.0);
        self.step = (self.step * 2).min(self.max);
        self.retry_at = Some(now + delay);
        delay
    }

    /// The next attempt starts at once (the relay after a key change); the
    /// backoff keeps its step.
    pub fn retry_now(&mut self) {
        self.retry_at = None;
    }

    /// No more attempts.
    pub fn shutdown(&mut self) {
        self.stopped = true;
    }

    /// How long to wait from `now` before the next attempt (zero: start it
    /// now); `None` once shut down.
    pub fn next_delay(&self, now: Instant) -> Option<Duration> {
        if self.stopped {
            return None;
        }
        Some(
            self.retry_at
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
        )
    }

    /// A fraction in [0, 1) (splitmix64).
    fn jitter(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed for [`Backoff`]: the clock's nanoseconds and the address of a
/// fresh allocation, so two clients started together still differ.
fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let marker = Box::new(0u8);
    nanos ^ (&*marker as *const u8 as u64).rotate_left(32)
}

/// Where a client websocket goes and how it authenticates.
pub(crate) struct WebsocketTarget<'a> {
    pub(crate) url: &'a str,
    pub(crate) tls: Option<&'a Arc<rustls::ClientConfig>>,
    pub(crate) token: Option<&'a str>,
    pub(crate) headers: &'a [(String, String)],
    pub(crate) timeout: Duration,
}

/// What one protocol does with the shared client.
pub(crate) trait Protocol: Send + Sync + 'static {
    /// Names the client in logs ("tunnel", "relay").
    const NAME: &'static str;
    /// What an attempt needs before it may dial (the relay: its owner's key).
    type Ticket;

    fn target(&self) -> WebsocketTarget<'_>;
    fn websocket_config(&self) -> WebSocketConfig;
    /// `None` while an attempt cannot start; asked again shortly, without
    /// counting a failure.
    fn ticket(&self) -> Option<Self::Ticket>;
    /// Rewords a failure to connect (e.g. where to give a missing
    /// client certificate).
    fn connect_error(&self, e: TunnelError) -> TunnelError {
        e
    }
    /// Runs one session on a websocket just upgraded (its socket still
    /// blocking, under the handshake deadline) and returns why it ended.
    /// Calls [`Up::connected`] once the session counts as up; an error
    /// before that counts as a failed attempt.
    fn run(
        this: &Arc<Self>,
        ws: WebSocket<Transport>,
        ticket: Self::Ticket,
        up: &Up<'_>,
    ) -> Result<String, TunnelError>;
    /// Ends the running session soon, from another thread (stop, reconnect).
    fn interrupt(&self);
    /// The session is up; runs before waiters of [`Reconnecting::wait_connected`] wake.
    fn on_connected(&self) {}
    /// The session that was up ended, for `reason`.
    fn on_disconnected(&self, _reason: &str) {}
    /// An attempt failed before its session was up.
    fn on_connect_failed(&self, _error: &TunnelError) {}
}

/// The client's state as its users see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LinkStatus {
    pub(crate) connected: bool,
    /// Sessions that came up so far.
    pub(crate) sessions: u64,
    /// Why the last session or attempt ended.
    pub(crate) last_error: Option<String>,
}

/// What the handle and the loop's thread share.
struct Link {
    stop: AtomicBool,
    retry_now: AtomicBool,
    status: Mutex<LinkStatus>,
    changed: Condvar,
}

impl Link {
    /// Sets a flag and wakes the loop. The flag is set before the lock is
    /// taken, and the loop checks it with the lock held before it waits, so
    /// the wake-up cannot fall between its check and its wait.
    fn raise(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
        drop(self.status.lock());
        self.changed.notify_all();
    }

    /// Sleeps up to `delay`, less if a stop or a reconnect is asked for.
    fn sleep(&self, delay: Duration) {
        let deadline = Instant::now() + delay;
        let mut status = self.status.lock();
        if !self.stop.load(Ordering::SeqCst) && !self.retry_now.load(Ordering::SeqCst) {
            self.changed.wait_until(&mut status, deadline);
        }
    }
}

/// Given to [`Protocol::run`] for one attempt.
pub(crate) struct Up<'a> {
    link: &'a Link,
    name: &'static str,
    url: &'a str,
    on_connected: &'a (dyn Fn() + 'a),
    connected_at: Cell<Option<Instant>>,
}

impl Up<'_> {
    /// The session is up: reported, counted, waiters woken. `false` when a
    /// stop or a reconnect was asked for meanwhile (the relay's key changed
    /// after this attempt took the old one): the caller ends the session at
    /// once. (A protocol makes its session reachable by
    /// [`Protocol::interrupt`] before it calls this, so either the request
    /// sees the session or this sees the request.)
    pub(crate) fn connected(&self) -> bool {
        self.connected_at.set(Some(Instant::now()));
        {
            let mut status = self.link.status.lock();
            status.connected = true;
            status.sessions += 1;
        }
        tracing::info!(url = %self.url, "{}: connected", self.name);
        // Before waking waiters, so that one woken by the connect sees its event too.
        (self.on_connected)();
        self.link.changed.notify_all();
        !self.link.stop.load(Ordering::SeqCst) && !self.link.retry_now.load(Ordering::SeqCst)
    }
}

/// A running reconnecting client. Dropping it stops it.
pub(crate) struct Reconnecting<P: Protocol> {
    link: Arc<Link>,
    protocol: Arc<P>,
    thread: Option<JoinHandle<()>>,
}

impl<P: Protocol> Reconnecting<P> {
    /// Checks the URL and starts connecting on a thread named `thread_name`.
    pub(crate) fn start(
        thread_name: &str,
        protocol: Arc<P>,
        backoff_initial: Duration,
        backoff_max: Duration,
    ) -> Result<Self, TunnelError> {
        {
            let target = protocol.target();
            check_url(target.url, target.tls.is_some())?;
        }
        let link = Arc::new(Link {
            stop: AtomicBool::new(false),
            retry_now: AtomicBool::new(false),
            status: Mutex::new(LinkStatus::default()),
            changed: Condvar::new(),
        });
        let backoff = Backoff::new(backoff_initial, backoff_max, jitter_seed());
        let (worker_link, worker) = (link.clone(), protocol.clone());
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || run_loop(&worker_link, &worker, backoff))?;
        Ok(Reconnecting {
            link,
            protocol,
            thread: Some(thread),
        })
    }

    pub(crate) fn protocol(&self) -> &Arc<P> {
        &self.protocol
    }

    pub(crate) fn status(&self) -> LinkStatus {
        self.link.status.lock().clone()
    }

    /// Waits until a session is up (`true`) or `timeout` passes.
    pub(crate) fn wait_connected(&self, timeout: Duration) -> bool {
        super::wait_for(&self.link.status, &self.link.changed, timeout, |s| {
            s.connected
        })
    }

    /// Ends the current session (or the wait for the next attempt): the
    /// next attempt starts at once.
    pub(crate) fn reconnect(&self) {
        self.link.raise(&self.link.retry_now);
        self.protocol.interrupt();
    }

    /// Stops: wakes a waiting backoff at once, ends the session, and waits
    /// for the thread (an attempt being dialed finishes within its
    /// handshake deadline first).
    pub(crate) fn stop(&mut self) {
        self.link.raise(&self.link.stop);
        self.protocol.interrupt();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<P: Protocol> Drop for Reconnecting<P> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_loop<P: Protocol>(link: &Link, protocol: &Arc<P>, mut backoff: Backoff) {
    loop {
        if link.stop.load(Ordering::SeqCst) {
            backoff.shutdown();
        }
        if link.retry_now.swap(false, Ordering::SeqCst) {
            backoff.retry_now();
        }
        let Some(delay) = backoff.next_delay(Instant::now()) else {
            break;
        };
        if !delay.is_zero() {
            link.sleep(delay);
            continue;
        }
        let Some(ticket) = protocol.ticket() else {
            link.sleep(NOT_READY_POLL);
            continue;
        };
        attempt(link, protocol, ticket, &mut backoff);
    }
    link.status.lock().connected = false;
    link.changed.notify_all();
}

/// One attempt and the session it may bring up; schedules the next one.
fn attempt<P: Protocol>(link: &Link, protocol: &Arc<P>, ticket: P::Ticket, backoff: &mut Backoff) {
    let target = protocol.target();
    let url = target.url;
    let on_connected = || protocol.on_connected();
    let up = Up {
        link,
        name: P::NAME,
        url,
        on_connected: &on_connected,
        connected_at: Cell::new(None),
    };
    let result = open_websocket(&target, protocol.websocket_config())
        .map_err(|e| protocol.connect_error(e))
        .and_then(|ws| P::run(protocol, ws, ticket, &up));
    if let Some(at) = up.connected_at.get() {
        backoff.on_connected(at);
    }
    let retry_in = backoff.on_failed(Instant::now());
    // Ending because we were told to stop is no news.
    let stopping = link.stop.load(Ordering::SeqCst);
    let reason = match (up.connected_at.get().is_some(), result) {
        (true, result) => {
            let reason = result.unwrap_or_else(|e| e.to_string());
            if stopping {
                tracing::debug!(%url, %reason, "{}: session ended", P::NAME);
            } else {
                tracing::warn!(%url, %reason, ?retry_in, "{}: session ended", P::NAME);
            }
            protocol.on_disconnected(&reason);
            reason
        }
        (false, result) => {
            let error = match result {
                Ok(reason) => TunnelError::Handshake(reason),
                Err(e) => e,
            };
            if stopping {
                tracing::debug!(%url, %error, "{}: connect failed", P::NAME);
            } else {
                tracing::warn!(%url, %error, ?retry_in, "{}: connect failed", P::NAME);
            }
            protocol.on_connect_failed(&error);
            error.to_string()
        }
    };
    {
        let mut status = link.status.lock();
        status.connected = false;
        status.last_error = Some(reason);
    }
    link.changed.notify_all();
}

/// Checks a client URL: `wss://` with TLS settings, or `ws://` (tests).
pub(crate) fn check_url(url: &str, has_tls: bool) -> Result<(), TunnelError> {
    let request = url
        .into_client_request()
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let scheme = request.uri().scheme_str().unwrap_or("");
    if scheme == "wss" && !has_tls {
        return Err(TunnelError::Config(
            "wss:// needs a TLS configuration with the server's CA".into(),
        ));
    }
    if scheme != "wss" && scheme != "ws" {
        return Err(TunnelError::Config(format!(
            "unsupported URL scheme {scheme:?}: use wss:// (or ws:// for tests)"
        )));
    }
    Ok(())
}

/// Connects, runs TLS and the HTTP upgrade. The socket stays in handshake
/// mode (blocking, with the deadline `target.timeout` from now) so the
/// caller can finish its own exchange within the same deadline.
pub(crate) fn open_websocket(
    target: &WebsocketTarget<'_>,
    ws_config: WebSocketConfig,
) -> Result<WebSocket<Transport>, TunnelError> {
    let mut request = target
        .url
        .into_client_request()
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let uri = request.uri().clone();
    let secure = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| TunnelError::Config("URL has no host".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    if let Some(token) = target.token {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| TunnelError::Config("token is not a valid header value".into()))?;
        value.set_sensitive(true);
        request.headers_mut().insert("Authorization", value);
    }
    for (name, value) in target.headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| TunnelError::Config(format!("bad header name {name}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| TunnelError::Config("bad header value".into()))?;
        request.headers_mut().insert(name, value);
    }
    let deadline = Instant::now() + target.timeout;
    let mut last = None;
    let mut tcp = None;
    for addr in (host.as_str(), port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, target.timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = match (tcp, last) {
        (Some(t), _) => t,
        (None, Some(e)) => return Err(TunnelError::Io(e)),
        (None, None) => return Err(TunnelError::Config(format!("{host} has no address"))),
    };
    tcp.set_nodelay(true)?;
    let sock = Socket::with_deadline(tcp, deadline);
    let transport = if secure {
        let tls = target
            .tls
            .cloned()
            .ok_or_else(|| TunnelError::Config("wss:// needs TLS settings".into()))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| TunnelError::Config(format!("bad server name {host}")))?;
        let conn = rustls::ClientConnection::new(tls, name)
            .map_err(|e| TunnelError::Tls(e.to_string()))?;
        Transport::tls(sock, conn.into()).map_err(|e| tls_failure(&e))?
    } else {
        Transport::plain(sock)
    };
    let (ws, _response) =
        tungstenite::client::client_with_config(request, transport, Some(ws_config)).map_err(
            |e| match e {
                tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
                    TunnelError::Rejected(resp.status())
                }
                // TLS 1.3 sends the certificate_required alert after the
                // client's Finished: it arrives with the HTTP response.
                tungstenite::HandshakeError::Failure(tungstenite::Error::Io(e))
                    if certificate_required(&e) =>
                {
                    TunnelError::ClientCertificateRequired
                }
                other => TunnelError::Handshake(other.to_string()),
            },
        )?;
    Ok(ws)
}

/// A failed TLS handshake as a tunnel error.
fn tls_failure(e: &std::io::Error) -> TunnelError {
    if certificate_required(e) {
        TunnelError::ClientCertificateRequired
    } else {
        TunnelError::Tls(e.to_string())
    }
}

/// Whether `e` is the server's `certificate_required` alert (TLS 1.3; a
/// TLS 1.2 server says only `handshake_failure`, which has other causes).
fn certificate_required(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
            )
        })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff(seed: u64) -> Backoff {
        Backoff::new(DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX, seed)
    }

    /// Fails at `now`, checks the wait is `step` times a factor in [0.5, 1)
    /// and that the next attempt is due exactly then; returns the time it is due.
    fn fail_expecting(b: &mut Backoff, now: Instant, step: Duration) -> Instant {
        let delay = b.on_failed(now);
        assert!(
            delay >= step / 2 && delay < step,
            "wait {delay:?} not in [{:?}, {step:?})",
            step / 2
        );
        assert_eq!(b.next_delay(now), Some(delay));
        assert_eq!(b.next_delay(now + delay), Some(Duration::ZERO));
        now + delay
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_there() {
        let mut b = backoff(1);
        let mut now = Instant::now();
        assert_eq!(
            b.next_delay(now),
            Some(Duration::ZERO),
            "first attempt at once"
        );
        let steps = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
        for step in steps {
            now = fail_expecting(&mut b, now, step * MS);
        }
    }

    #[test]
    fn backoff_starts_over_only_after_a_stable_session() {
        let mut b = backoff(2);
        let mut now = Instant::now();
        for _ in 0..8 {
            now += b.on_failed(now);
        }
        // A session that lasted less than STABLE_SESSION: still at the cap.
        b.on_connected(now);
        now += STABLE_SESSION - MS;
        now = fail_expecting(&mut b, now, DEFAULT_BACKOFF_MAX);
        // An attempt that failed slowly is no success either.
        now += 2 * STABLE_SESSION;
        now = fail_expecting(&mut b, now, DEFAULT_BACKOFF_MAX);
        // A stable session: from the initial wait again, then doubling.
        b.on_connected(now);
        now += STABLE_SESSION;
        now = fail_expecting(&mut b, now, DEFAULT_BACKOFF_INITIAL);
        fail_expecting(&mut b, now, 2 * DEFAULT_BACKOFF_INITIAL);
    }

    #[test]
    fn backoff_jitter_stays_in_bounds_and_spreads_clients() {
        let now = Instant::now();
        let mut firsts = std::collections::BTreeSet::new();
        for seed in 0..1000u64 {
            let mut b = backoff(jitter_seed() ^ seed);
            let delay = b.on_failed(now);
            assert!(delay >= DEFAULT_BACKOFF_INITIAL / 2 && delay < DEFAULT_BACKOFF_INITIAL);
            firsts.insert(delay.as_millis());
        }
        // 1000 clients restarted together spread over the 250 ms window.
        assert!(firsts.len() > 150, "only {} distinct waits", firsts.len());
        let lowest = *firsts.first().unwrap();
        let highest = *firsts.last().unwrap();
        assert!(lowest < 275 && highest >= 475, "{lowest}..{highest} ms");
    }

    #[test]
    fn backoff_shutdown_during_a_wait_ends_it_at_once() {
        let mut b = backoff(3);
        let now = Instant::now();
        let delay = b.on_failed(now);
        assert!(b.next_delay(now + delay / 2).unwrap() > Duration::ZERO);
        b.shutdown();
        assert_eq!(b.next_delay(now + delay / 2), None);
        assert_eq!(b.next_delay(now + delay), None);
    }

    #[test]
    fn backoff_retry_now_skips_the_wait_but_keeps_the_step() {
        let mut b = backoff(4);
        let mut now = Instant::now();
        now = fail_expecting(&mut b, now, DEFAULT_BACKOFF_INITIAL);
        b.on_failed(now);
        b.retry_now();
        assert_eq!(b.next_delay(now), Some(Duration::ZERO));
        fail_expecting(&mut b, now, 4 * DEFAULT_BACKOFF_INITIAL);
    }

    #[test]
    fn backoff_zero_settings_cannot_spin() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, 5);
        let now = Instant::now();
        assert!(b.next_delay(now).unwrap().is_zero());
        b.on_failed(now);
        assert!(b.next_delay(now).unwrap() > Duration::ZERO);
    }

    /// Dials a port nobody listens on and counts its attempts.
    struct Refused {
        url: String,
        attempts: AtomicUsize,
    }

    impl Protocol for Refused {
        const NAME: &'static str = "test";
        type Ticket = ();
        fn target(&self) -> WebsocketTarget<'_> {
            WebsocketTarget {
                url: &self.url,
                tls: None,
                token: None,
                headers: &[],
                timeout: Duration::from_secs(5),
            }
        }
        fn websocket_config(&self) -> WebSocketConfig {
            WebSocketConfig::default()
        }
        fn ticket(&self) -> Option<()> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            Some(())
        }
        fn run(
            _: &Arc<Self>,
            _: WebSocket<Transport>,
            (): (),
            _: &Up<'_>,
        ) -> Result<String, TunnelError> {
            unreachable!("nothing listens there")
        }
        fn interrupt(&self) {}
    }

    fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !done() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(10 * MS);
        }
        true
    }

    /// A client waiting out a long backoff: `reconnect` starts an attempt
    /// at once, and stopping returns at once.
    #[test]
    fn waiting_client_reconnects_and_stops_at_once() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let backoff = Duration::from_secs(600);
        let protocol = Arc::new(Refused {
            url: format!("ws://{closed}/"),
            attempts: AtomicUsize::new(0),
        });
        let mut client =
            Reconnecting::start("test-client", protocol.clone(), backoff, backoff).unwrap();
        let failed = |n| {
            let attempts = protocol.attempts.load(Ordering::SeqCst);
            attempts == n && client.status().last_error.is_some()
        };
        assert!(wait_until(Duration::from_secs(20), || failed(1)));
        let error = client.status().last_error.unwrap();
        assert!(error.contains("refused"), "{error}");
        assert!(!client.status().connected);

        // Now in a wait of at least 300 s.
        client.reconnect();
        assert!(
            wait_until(Duration::from_secs(20), || protocol
                .attempts
                .load(Ordering::SeqCst)
                == 2),
            "reconnect did not end the wait"
        );
        let started = Instant::now();
        client.stop();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(20), "stop took {took:?}");
        assert_eq!(protocol.attempts.load(Ordering::SeqCst), 2);
    }
}
