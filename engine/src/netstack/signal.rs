//! How a blocked caller sleeps until smoltcp changes its socket.
//!
//! A [`Signal`] is a generation counter under a mutex plus a condvar; its
//! [`Waker`] bumps the counter. The caller registers the waker with the
//! socket and reads the generation while holding the stack lock, then waits
//! for the generation to move. smoltcp only wakes under that same lock, so a
//! wake between the check and the wait cannot be missed.
//!
//! [`Signal::interrupt`] is the one wake that does not come from the stack:
//! it makes the current (or, if none is waiting, the next) wait give up as
//! if its deadline had passed. The flag lives under the same mutex as the
//! generation and stays set until a wait consumes it, so it cannot be lost.

use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
struct State {
    generation: u64,
    interrupted: bool,
}

#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<State>,
    changed: Condvar,
}

impl Signal {
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    pub fn waker(self: &Arc<Self>) -> Waker {
        Waker::from(self.clone())
    }

    pub fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    pub fn notify(&self) {
        self.state.lock().generation += 1;
        self.changed.notify_all();
    }

    /// Makes the waiting (or next) [`Signal::wait`] return false.
    pub fn interrupt(&self) {
        let mut s = self.state.lock();
        s.interrupted = true;
        s.generation += 1;
        self.changed.notify_all();
    }

    /// Sleeps until the generation differs from `seen`. False when
    /// `deadline` passed first or the wait was interrupted.
    pub fn wait(&self, seen: u64, deadline: Option<Instant>) -> bool {
        let mut s = self.state.lock();
        loop {
            if std::mem::take(&mut s.interrupted) {
                return false;
            }
            if s.generation != seen {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.changed.wait_until(&mut s, d).timed_out() {
                        return !std::mem::take(&mut s.interrupted) && s.generation != seen;
                    }
                }
                None => self.changed.wait(&mut s),
            }
        }
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.notify();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

/// A handle that wakes a thread blocked on one connection or socket of the
/// stack (or on a dial in progress) without closing it: the blocked call
/// returns [`super::NetstackError::TimedOut`] early, so its caller can look
/// again at a deadline that changed (what Go's `SetDeadline` needs). If no
/// call is blocked, the next one returns at once. Cloning is cheap; every
/// method is safe from any thread.
#[derive(Clone, Default)]
pub struct Interrupter {
    pub(crate) signal: Arc<Signal>,
}

impl Interrupter {
    /// A fresh interrupter, for [`super::Netstack::tcp_connect_with`].
    pub fn new() -> Interrupter {
        Interrupter::default()
    }

    pub fn interrupt(&self) {
        self.signal.interrupt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_is_consumed_by_exactly_one_wait() {
        let s = Signal::new();
        let seen = s.generation();
        s.interrupt();
        assert!(!s.wait(seen, None), "interrupt set before the wait");
        let seen = s.generation();
        s.notify();
        assert!(s.wait(seen, None), "a plain notify is not an interrupt");
    }

    #[test]
    fn an_interrupt_wakes_a_blocked_wait() {
        let s = Signal::new();
        let seen = s.generation();
        std::thread::scope(|t| {
            let h = t.spawn(|| s.wait(seen, None));
            s.interrupt();
            assert!(!h.join().unwrap());
        });
    }
}
