//! One accept loop step with a backoff on errors, for every TCP listener
//! that hands connections to threads.
//!
//! An accept that fails (EMFILE/ENFILE when the process is out of file
//! descriptors, ENOBUFS, ECONNABORTED) fails again at once while the cause
//! lasts: a loop that retries immediately burns a core and starves the
//! threads that would free the descriptors. As Go's `net/http`
//! `Server.Serve` does, the wait after a failure starts at 5 ms, doubles up
//! to 1 s, and resets after a success.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// The wait after the first failed accept (Go: 5 ms).
pub const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(5);
/// The longest wait between failed accepts (Go: 1 s).
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The growing wait between failed accepts of one listener.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
}

impl AcceptBackoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// The wait after one more failure: 5 ms, 10 ms, ... up to 1 s.
    pub fn next_delay(&mut self) -> Duration {
        let delay = match self.delay {
            None => ACCEPT_BACKOFF_INITIAL,
            Some(d) => (d * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.delay = Some(delay);
        delay
    }

    /// An accept succeeded: the next failure waits the initial delay again.
    pub fn reset(&mut self) {
        self.delay = None;
    }
}

/// Accepts the next connection from a blocking `listener`, sleeping with
/// `backoff` after each failure; `None` once `stop()` is true (checked
/// after every accept, successful or not). `WouldBlock` counts as a failure
/// too, so a listener left non-blocking cannot spin either.
pub fn accept_with_backoff(
    listener: &TcpListener,
    backoff: &mut AcceptBackoff,
    stop: impl Fn() -> bool,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let result = listener.accept();
        if stop() {
            return None;
        }
        match result {
            Ok(conn) => {
                backoff.reset();
                return Some(conn);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "accept failed; retrying after a pause");
                std::thread::sleep(delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn delays_double_up_to_the_max_and_reset_after_a_success() {
        let mut b = AcceptBackoff::new();
        let delays: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), ACCEPT_BACKOFF_INITIAL);
    }

    /// A listener whose accept fails every time (non-blocking, nobody
    /// connecting: the same immediate failure as EMFILE) is retried a
    /// handful of times in 300 ms, not spun on.
    #[test]
    fn failing_accepts_are_not_spun_on() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let attempts = std::cell::Cell::new(0u32);
        let started = Instant::now();
        let mut backoff = AcceptBackoff::new();
        let got = accept_with_backoff(&listener, &mut backoff, || {
            attempts.set(attempts.get() + 1);
            started.elapsed() >= Duration::from_millis(300)
        });
        assert!(got.is_none());
        // 5 + 10 + 20 + 40 + 80 + 160 ms: about 7 attempts in 300 ms.
        assert!(attempts.get() <= 10, "{} accepts in 300 ms", attempts.get());
        // A connection is still taken once one arrives, and resets the backoff.
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let got = accept_with_backoff(&listener, &mut backoff, || false);
        assert!(got.is_some());
        assert_eq!(backoff.next_delay(), ACCEPT_BACKOFF_INITIAL);
    }
}
