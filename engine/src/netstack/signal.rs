//! How a blocked caller sleeps until smoltcp changes its socket.
//!
//! A [`Signal`] is a generation counter under a mutex plus a condvar; its
//! [`Waker`] bumps the counter. The caller registers the waker with the
//! socket and reads the generation while holding the stack lock, then waits
//! for the generation to move. smoltcp only wakes under that same lock, so a
//! wake between the check and the wait cannot be missed.
//!
//! [`Signal::interrupt`] is the one wake that does not come from the stack:
//! every wait whose snapshot predates it gives up as if its deadline had
//! passed, and so does the next wait that starts after it (a caller that
//! was between two waits when it came). Both live under the same mutex as
//! the generation, so an interrupt cannot be lost; a caller may see one
//! spurious interrupt, which it treats as "look at your deadline again".
//!
//! A caller that sleeps in an event loop instead of on the condvar (the Go
//! binding, in Go's netpoller) asks for the signal's two eventfds, one per
//! [`Direction`]: a call that found nothing to do arms its direction's
//! eventfd under the stack lock, and the next notify writes every armed
//! one. An armed eventfd is drained when it is armed again, so the caller
//! only polls it and never reads it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::task::{Wake, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::io::eventfd::EventFd;

/// Which way a call moves data, and so which eventfd its wait arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reads, receives, accepts, pings.
    Read = 0,
    /// Writes, sends, dials.
    Write = 1,
}

/// One direction's eventfd.
struct ReadyFd {
    fd: EventFd,
    /// A call found nothing to do since the last write: the next notify
    /// writes.
    armed: AtomicBool,
    /// Written since the last drain.
    written: AtomicBool,
}

#[derive(Default)]
struct State {
    generation: u64,
    /// The generation the last interrupt made.
    interrupted_at: u64,
    /// An interrupt that no wait starting after it has seen yet.
    pending: bool,
}

#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<State>,
    changed: Condvar,
    /// Made on the first [`Signal::ready_fd`], indexed by [`Direction`].
    ready: [OnceLock<ReadyFd>; 2],
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
        self.fire();
    }

    /// A new descriptor (the caller owns it) of `dir`'s eventfd, made on
    /// first use; see the module doc.
    pub fn ready_fd(&self, dir: Direction) -> std::io::Result<OwnedFd> {
        let slot = &self.ready[dir as usize];
        if let Some(r) = slot.get() {
            return r.fd.try_clone_fd();
        }
        let fresh = ReadyFd {
            fd: EventFd::new()?,
            armed: AtomicBool::new(false),
            written: AtomicBool::new(false),
        };
        // A racing call may have set one first; ours is then closed.
        slot.get_or_init(|| fresh).fd.try_clone_fd()
    }

    /// A call in `dir` found nothing to do: the next notify writes `dir`'s
    /// eventfd, if there is one. Called under the stack lock, so a change
    /// smoltcp wakes for after the call looked cannot come before it.
    pub fn arm(&self, dir: Direction) {
        if let Some(r) = self.ready[dir as usize].get() {
            if r.written.swap(false, SeqCst) {
                r.fd.drain();
            }
            r.armed.store(true, SeqCst);
        }
    }

    /// Writes every armed eventfd.
    fn fire(&self) {
        for r in self.ready.iter().filter_map(OnceLock::get) {
            if r.armed.swap(false, SeqCst) {
                r.written.store(true, SeqCst);
                r.fd.signal();
            }
        }
    }

    /// Makes the waiting [`Signal::wait`]s, and the next one, return false.
    pub fn interrupt(&self) {
        let mut s = self.state.lock();
        s.generation += 1;
        s.interrupted_at = s.generation;
        s.pending = true;
        self.changed.notify_all();
        drop(s);
        self.fire();
    }

    /// Sleeps until the generation differs from `seen`. False when
    /// `deadline` passed first or the wait was interrupted.
    pub fn wait(&self, seen: u64, deadline: Option<Instant>) -> bool {
        let mut s = self.state.lock();
        loop {
            if s.interrupted_at > seen {
                return false;
            }
            if std::mem::take(&mut s.pending) {
                return false;
            }
            if s.generation != seen {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.changed.wait_until(&mut s, d).timed_out() {
                        return s.interrupted_at <= seen
                            && !std::mem::take(&mut s.pending)
                            && s.generation != seen;
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
/// stack (or on a dial or a ping in progress) without closing it: the blocked call
/// returns [`super::NetstackError::TimedOut`] early, so its caller can look
/// again at a deadline that changed (what Go's `SetDeadline` needs). Every
/// call blocked at that moment returns, and so does the next call that
/// starts after it (once; it may be spurious, so treat it as "look
/// again"). Cloning is cheap; every method is safe from any thread.
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

    /// For a call that polls the token instead of sleeping on it (a join
    /// waiting on another condition): the returned check is true once an
    /// interrupt came after this call, or if one was pending before it
    /// (consumed here, as a wait starting then would).
    pub fn poll(&self) -> impl Fn() -> bool + Send + Sync + '_ {
        let (seen, pending) = {
            let mut s = self.signal.state.lock();
            (s.generation, std::mem::take(&mut s.pending))
        };
        move || pending || self.signal.state.lock().interrupted_at > seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_ends_earlier_waits_and_the_next_one() {
        let s = Signal::new();
        let before = s.generation();
        s.interrupt();
        // Two callers that looked before the interrupt both see it.
        assert!(!s.wait(before, None));
        assert!(!s.wait(before, None));
        // So does the first that looks after it, once.
        let after = s.generation();
        assert!(!s.wait(after, None));
        let seen = s.generation();
        s.notify();
        assert!(s.wait(seen, None), "a plain notify is not an interrupt");
    }

    #[test]
    fn poll_sees_an_interrupt_pending_before_or_coming_after() {
        let i = Interrupter::new();
        assert!(!(i.poll())());
        i.interrupt();
        let before = i.poll();
        assert!(before(), "the pending interrupt counts once");
        assert!(!(i.poll())(), "and is consumed");
        let check = i.poll();
        assert!(!check());
        i.interrupt();
        assert!(check());
    }

    #[test]
    fn an_interrupt_wakes_every_blocked_wait() {
        let s = Signal::new();
        let seen = s.generation();
        std::thread::scope(|t| {
            let a = t.spawn(|| s.wait(seen, None));
            let b = t.spawn(|| s.wait(seen, None));
            s.interrupt();
            assert!(!a.join().unwrap());
            assert!(!b.join().unwrap());
        });
    }
}
