//! When a relay client decides its session is dead (sans-IO: every call
//! takes `now`; the pump moves the bytes).
//!
//! A TCP connection whose NAT mapping or middlebox state is gone does not
//! fail: writes still land in the kernel's buffer and nothing arrives, so
//! a client relying on its keepalive pings ([`KEEPALIVE_EVERY`]) and the
//! idle timeout noticed only after tens of seconds. DERP clients do not
//! wait for that: Tailscale's magicsock pings its DERP connections with a
//! 3 s deadline when the network changes (`maybeCloseDERPsOnRebind`,
//! "rebind-ping-fail") and reconnects when the pong does not come. The
//! rules here:
//!
//! - **Sent, nothing back:** once the client has written something on the
//!   session and nothing at all (a frame, a ping, a pong) has arrived for
//!   [`QUIET`], it sends one ping.
//! - **A check:** the owner asks ([`Liveness::check`]) when the network
//!   may have changed under the session (a rediscovery: a direct path was
//!   given up, the UDP port was rebound, the host's network changed): one
//!   ping at once.
//! - **The deadline:** a ping (those two, and the keepalive pings) that
//!   has nothing at all arrive within [`PONG_TIMEOUT`] of being written
//!   ends the session; the client reconnects at once.
//!
//! An idle session sends nothing beyond its keepalive pings; a busy one
//! with answers coming sends nothing extra. The cost is at most one ping
//! per [`QUIET`] while the client sends and nothing comes back (its peer
//! is gone, say).

use std::time::{Duration, Instant};

/// Sent on the session and nothing received for this long: one ping.
/// Below the time WireGuard waits for a handshake answer (5 s), so a
/// handshake sent into a dead session is retried on a new one.
pub const QUIET: Duration = Duration::from_secs(2);
/// A ping with nothing at all received this long after it was written ends
/// the session (Tailscale's deadline for its DERP ping after a rebind).
pub const PONG_TIMEOUT: Duration = Duration::from_secs(3);
/// The client's keepalive ping, sent whatever the traffic; it has the same
/// deadline. The relay ends sessions silent for 60 s.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// What the pump should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Write a ping now (then call [`Liveness::ping_written`]).
    Ping,
    /// The session is dead: end it.
    Dead,
    /// Nothing until then (`None`: until something is sent or asked).
    Wait(Option<Instant>),
}

/// One session's liveness state.
#[derive(Debug, Clone)]
pub struct Liveness {
    quiet: Duration,
    timeout: Duration,
    /// The first write since the last thing received.
    unanswered_since: Option<Instant>,
    /// A ping written and not answered yet: its deadline.
    deadline: Option<Instant>,
    /// A ping was decided on and is not written yet.
    ping_due: bool,
    /// A check was asked for.
    check: bool,
}

impl Liveness {
    /// With [`QUIET`] and [`PONG_TIMEOUT`].
    pub fn new() -> Liveness {
        Liveness::with(QUIET, PONG_TIMEOUT)
    }

    pub fn with(quiet: Duration, timeout: Duration) -> Liveness {
        Liveness {
            quiet,
            timeout,
            unanswered_since: None,
            deadline: None,
            ping_due: false,
            check: false,
        }
    }

    /// Something was written on the session (a frame).
    pub fn sent(&mut self, now: Instant) {
        self.unanswered_since.get_or_insert(now);
    }

    /// A ping (ours, of any kind) was written: its deadline starts.
    pub fn ping_written(&mut self, now: Instant) {
        self.ping_due = false;
        self.unanswered_since.get_or_insert(now);
        self.deadline.get_or_insert(now + self.timeout);
    }

    /// Anything arrived: the session is alive.
    pub fn received(&mut self) {
        self.unanswered_since = None;
        self.deadline = None;
    }

    /// While output waited, the socket took more bytes: the far end
    /// acknowledged data, so the connection is alive but slow (our ping
    /// may sit behind a full buffer); a ping's deadline starts over.
    pub fn progress(&mut self, now: Instant) {
        if let Some(deadline) = self.deadline.as_mut() {
            *deadline = now + self.timeout;
        }
    }

    /// Check the session now: one ping, unless one is already out.
    pub fn check(&mut self) {
        self.check = true;
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Next {
        if let Some(deadline) = self.deadline {
            // A ping is out: a check or more silence adds nothing to it.
            self.check = false;
            return if now >= deadline {
                Next::Dead
            } else {
                Next::Wait(Some(deadline))
            };
        }
        if self.ping_due {
            return Next::Ping;
        }
        let quiet_until = self.unanswered_since.map(|t| t + self.quiet);
        if std::mem::take(&mut self.check) || quiet_until.is_some_and(|t| now >= t) {
            self.ping_due = true;
            return Next::Ping;
        }
        Next::Wait(quiet_until)
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_idle_session_asks_for_nothing() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        for i in 0..1000 {
            assert_eq!(l.poll(t0 + i * S), Next::Wait(None));
        }
    }

    #[test]
    fn answers_keep_a_busy_session_quiet() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        for i in 0..1000 {
            let now = t0 + i * S;
            l.sent(now);
            l.received();
            assert_eq!(l.poll(now), Next::Wait(None));
        }
    }

    #[test]
    fn sent_with_nothing_back_pings_then_dies_at_the_deadline() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        l.sent(t0);
        l.sent(t0 + S);
        // The quiet time counts from the first unanswered write.
        assert_eq!(l.poll(t0 + S), Next::Wait(Some(t0 + QUIET)));
        assert_eq!(l.poll(t0 + QUIET), Next::Ping);
        // Not written yet (the socket is full): still due, no deadline.
        assert_eq!(l.poll(t0 + QUIET + 10 * S), Next::Ping);
        let written = t0 + QUIET + 10 * S;
        l.ping_written(written);
        assert_eq!(
            l.poll(written + S),
            Next::Wait(Some(written + PONG_TIMEOUT))
        );
        assert_eq!(l.poll(written + PONG_TIMEOUT), Next::Dead);
    }

    #[test]
    fn anything_received_before_the_deadline_clears_it() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        l.sent(t0);
        assert_eq!(l.poll(t0 + QUIET), Next::Ping);
        l.ping_written(t0 + QUIET);
        l.received();
        assert_eq!(l.poll(t0 + QUIET + PONG_TIMEOUT), Next::Wait(None));
        // A new unanswered write starts a new quiet time.
        let t1 = t0 + 10 * S;
        l.sent(t1);
        assert_eq!(l.poll(t1), Next::Wait(Some(t1 + QUIET)));
    }

    #[test]
    fn a_check_pings_at_once_and_merges_with_one_already_out() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        l.check();
        assert_eq!(l.poll(t0), Next::Ping);
        l.ping_written(t0);
        // Checks while the ping is out add no ping and keep its deadline.
        for i in 1..3 {
            l.check();
            assert_eq!(l.poll(t0 + i * S), Next::Wait(Some(t0 + PONG_TIMEOUT)));
        }
        l.received();
        assert_eq!(l.poll(t0 + 4 * S), Next::Wait(None));
    }

    #[test]
    fn a_keepalive_ping_has_the_deadline_too() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        l.ping_written(t0);
        assert_eq!(
            l.poll(t0 + PONG_TIMEOUT - S),
            Next::Wait(Some(t0 + PONG_TIMEOUT))
        );
        assert_eq!(l.poll(t0 + PONG_TIMEOUT), Next::Dead);
    }

    #[test]
    fn a_full_socket_that_takes_bytes_extends_the_deadline() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        l.ping_written(t0);
        l.progress(t0 + 2 * S);
        assert_eq!(
            l.poll(t0 + PONG_TIMEOUT),
            Next::Wait(Some(t0 + 2 * S + PONG_TIMEOUT))
        );
        assert_eq!(l.poll(t0 + 2 * S + PONG_TIMEOUT), Next::Dead);
        // Progress with no ping out changes nothing.
        let mut l = Liveness::new();
        l.progress(t0);
        assert_eq!(l.poll(t0), Next::Wait(None));
    }
}
