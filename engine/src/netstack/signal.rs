//! How a blocked caller sleeps until smoltcp changes its socket.
//!
//! A [`Signal`] is a generation counter under a mutex plus a condvar; its
//! [`Waker`] bumps the counter. The caller registers the waker with the
//! socket and reads the generation while holding the stack lock, then waits
//! for the generation to move. smoltcp only wakes under that same lock, so a
//! wake between the check and the wait cannot be missed.

use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub(crate) struct Signal {
    generation: Mutex<u64>,
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
        *self.generation.lock()
    }

    pub fn notify(&self) {
        *self.generation.lock() += 1;
        self.changed.notify_all();
    }

    /// Sleeps until the generation differs from `seen`. False when
    /// `deadline` passed first.
    pub fn wait(&self, seen: u64, deadline: Option<Instant>) -> bool {
        let mut g = self.generation.lock();
        while *g == seen {
            match deadline {
                Some(d) => {
                    if self.changed.wait_until(&mut g, d).timed_out() {
                        return *g != seen;
                    }
                }
                None => self.changed.wait(&mut g),
            }
        }
        true
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
