//! A STUN server on one UDP socket and one thread: answers Binding
//! requests with the source address they came from (the protocol is
//! `wire::stun::answer_binding`), within the per-source and total budget
//! of `nat::SourceLimiter`. `meshvpn tunnel serve` runs one next to its
//! HTTPS listener; see engine/docs/nat.md.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nat::{
    SourceLimiter, Verdict, DEFAULT_STUN_PER_SOURCE, DEFAULT_STUN_TOTAL, STUN_MAX_SOURCES,
};
use crate::wire::stun::{answer_binding, is_stun};

/// How often the thread looks at its stop flag when no datagram arrives.
const STOP_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunServerConfig {
    /// Answers per second to one source (IPv4 address or IPv6 /64).
    pub per_source: u32,
    /// Answers per second in total.
    pub total: u32,
    /// Sources tracked per second; more are dropped.
    pub max_sources: usize,
}

impl Default for StunServerConfig {
    fn default() -> Self {
        StunServerConfig {
            per_source: DEFAULT_STUN_PER_SOURCE,
            total: DEFAULT_STUN_TOTAL,
            max_sources: STUN_MAX_SOURCES,
        }
    }
}

/// Counters of a running server (every datagram lands in exactly one).
#[derive(Debug, Default)]
pub struct StunServerStats {
    pub answered: AtomicU64,
    /// Not STUN, or STUN that does not parse.
    pub malformed: AtomicU64,
    /// Valid STUN that gets no answer (responses, indications, other methods).
    pub ignored: AtomicU64,
    /// Over the per-source, total or source-table limit.
    pub rate_limited: AtomicU64,
    pub send_errors: AtomicU64,
}

pub struct StunServer {
    local: SocketAddr,
    stats: Arc<StunServerStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StunServer {
    pub fn bind(addr: SocketAddr, config: StunServerConfig) -> io::Result<StunServer> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(STOP_POLL))?;
        let local = socket.local_addr()?;
        let stats = Arc::new(StunServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("stun-server".into())
            .stack_size(256 << 10)
            .spawn(move || serve(socket, config, &s, &st))?;
        Ok(StunServer {
            local,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> &StunServerStats {
        &self.stats
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: UdpSocket, config: StunServerConfig, stats: &StunServerStats, stop: &AtomicBool) {
    let mut limiter = SourceLimiter::new(config.per_source, config.total, config.max_sources);
    // A request larger than this is not a Binding request we would answer
    // anyway (it is truncated and then fails its length check).
    let mut buf = [0u8; 1500];
    let mut out = [0u8; 128];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux;
                // they say nothing about the next datagram.
                tracing::debug!(error = %e, "stun: receive error");
                continue;
            }
        };
        let request = &buf[..n];
        if !is_stun(request) {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // The limit is checked before any work on the message, and counts
        // every answered request, errors included.
        match limiter.check(Instant::now(), from.ip()) {
            Verdict::Allow => {}
            _ => {
                stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        match answer_binding(request, from, &mut out) {
            Ok(Some(len)) => match socket.send_to(&out[..len], from) {
                Ok(_) => {
                    stats.answered.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            Ok(None) => {
                stats.ignored.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One discovery round from `socket` (blocking): a Binding request to
/// every server, retransmitted per RFC 8489, until each has answered or
/// timed out. Returns the finished [`Discovery`] (its results, mapping and
/// counters). Datagrams from elsewhere are dropped and counted by it.
///
/// This is the stand-alone form, on a socket of its own. Once the engine's
/// device core has typed endpoints, the engine sends these requests from
/// the WireGuard socket itself and feeds it the datagrams that
/// `wire::stun::is_stun` picks out, so the mapping found is the tunnel's.
pub fn probe(
    socket: &UdpSocket,
    servers: &[SocketAddr],
    config: crate::nat::DiscoveryConfig,
) -> io::Result<crate::nat::Discovery> {
    use crate::nat::{random_transaction_id, Discovery, Output};
    let mut d = Discovery::new(servers, config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    d.start(Instant::now(), &mut random_transaction_id);
    let mut out = [0u8; 64];
    let mut buf = [0u8; 1500];
    loop {
        let deadline = match d.poll(Instant::now(), &mut out) {
            Output::Transmit { to, len } => {
                // A send error (no route) is a lost request: retransmission
                // and the timeout deal with it like any other loss.
                if let Err(e) = socket.send_to(&out[..len], to) {
                    tracing::debug!(server = %to, error = %e, "stun: send failed");
                }
                continue;
            }
            Output::TimedOut { .. } => continue,
            Output::Wait(None) => return Ok(d),
            Output::Wait(Some(at)) => at,
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            continue;
        }
        socket.set_read_timeout(Some(wait))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = d.handle(from, &buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // ICMP port unreachable from a server that is down: its
            // transaction runs to its timeout.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
}
