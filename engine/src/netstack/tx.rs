//! The stack's output, encrypted and sent off the stack thread.
//!
//! After each poll the stack thread hands the packets smoltcp produced to
//! one sender thread and goes back to smoltcp; the sender encrypts them
//! with [`Engine::send_packets_reporting`] (the same batch path the TUN
//! reader uses: consecutive packets to one peer leave in one GSO send) while
//! the stack thread already works on the next batch. Without it the stack
//! thread ran smoltcp, ChaCha20-Poly1305 and `sendmsg` in turn, while on the
//! receive side decryption already ran on the receive threads in parallel
//! with smoltcp.
//!
//! Order: there is one sender thread and it takes batches in the order they
//! were handed over, so every peer's packets are encrypted (their counters
//! assigned) in the order smoltcp produced them, as the TUN reader keeps
//! the order of what it reads.
//!
//! Bound: the packets handed over and not yet sent are at most
//! [`TX_QUEUE_BYTES`]; a poll's output that would go past it waits until
//! the sender catches up (the stack thread is then held back, as a full
//! socket holds back a writer), except that a batch always goes when
//! nothing is queued, so one larger batch never blocks forever.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::peer::DropReason;
use crate::wg::{Engine, SendError};
use crate::wire::IpHeader;

/// Bytes of the stack's output handed to the sender thread and not yet
/// sent: one poll's output can be sealed while the next one is made.
pub(crate) const TX_QUEUE_BYTES: usize = 1 << 20;

/// A poll's output smaller than this, with the sender idle, is sent on the
/// stack thread itself: sealing it costs less than waking the sender.
pub(crate) const TX_INLINE_BYTES: usize = 64 << 10;

#[derive(Default)]
struct State {
    /// Packets handed over, in order, not yet taken by the sender.
    pending: Vec<Vec<u8>>,
    /// Bytes of packets handed over and not yet sent (pending and the
    /// batch the sender is working on).
    bytes: usize,
    /// Emptied buffers, back to the stack thread for its next output.
    free: Vec<Vec<u8>>,
    /// Destinations the engine had no peer or endpoint for, since the
    /// stack thread last looked.
    unreachable: Vec<IpAddr>,
    closed: bool,
}

/// The hand-off between the stack thread and its sender thread.
#[derive(Default)]
pub(crate) struct TxQueue {
    state: Mutex<State>,
    /// The sender waits on it for packets, the stack thread for room.
    work: Condvar,
    room: Condvar,
}

impl TxQueue {
    /// Hands `out` to the sender (leaving it empty), waiting while the
    /// queue holds [`TX_QUEUE_BYTES`]. False once the sender is gone: the
    /// packets are dropped and the stack should stop.
    pub fn push(&self, out: &mut Vec<Vec<u8>>) -> bool {
        if out.is_empty() {
            return true;
        }
        let n: usize = out.iter().map(Vec::len).sum();
        let mut st = self.state.lock();
        while !st.closed && st.bytes > 0 && st.bytes + n > TX_QUEUE_BYTES {
            self.room.wait(&mut st);
        }
        if st.closed {
            st.free.append(out);
            return false;
        }
        st.bytes += n;
        st.pending.append(out);
        self.work.notify_one();
        true
    }

    /// True when the sender holds nothing: a batch sent on the stack
    /// thread now cannot overtake one handed over before.
    pub fn idle(&self) -> bool {
        self.state.lock().bytes == 0
    }

    /// Moves the emptied buffers into `free` and the destinations found
    /// unreachable into `unreachable`.
    pub fn take(&self, free: &mut Vec<Vec<u8>>, unreachable: &mut Vec<IpAddr>) {
        let mut st = self.state.lock();
        free.append(&mut st.free);
        unreachable.append(&mut st.unreachable);
    }

    /// Stops the sender once it has sent what was handed over.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.work.notify_all();
        self.room.notify_all();
    }

    /// The sender's loop: takes everything handed over so far, hands it to
    /// `send` as one batch (which notes destinations it found unreachable),
    /// returns the buffers. `kick` wakes the stack thread when a destination
    /// turned out unreachable.
    fn run(&self, mut send: impl FnMut(&[Vec<u8>], &mut Vec<IpAddr>), kick: impl Fn()) {
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut unreachable: Vec<IpAddr> = Vec::new();
        loop {
            {
                let mut st = self.state.lock();
                while st.pending.is_empty() && !st.closed {
                    self.work.wait(&mut st);
                }
                if st.pending.is_empty() {
                    return;
                }
                std::mem::swap(&mut batch, &mut st.pending);
            }
            let n: usize = batch.iter().map(Vec::len).sum();
            send(&batch, &mut unreachable);
            let report = !unreachable.is_empty();
            {
                let mut st = self.state.lock();
                st.bytes -= n;
                st.free.append(&mut batch);
                for dst in unreachable.drain(..) {
                    if !st.unreachable.contains(&dst) {
                        st.unreachable.push(dst);
                    }
                }
            }
            self.room.notify_one();
            if report {
                kick();
            }
        }
    }
}

/// What the sender does with a batch: the engine's batch send, counting
/// packets it had no peer (or endpoint) for in `unroutable` and noting
/// their destinations. Nothing is sent once the engine is gone or closed.
pub(crate) fn engine_sender(
    engine: Weak<Engine>,
    unroutable: Arc<AtomicU64>,
) -> impl FnMut(&[Vec<u8>], &mut Vec<IpAddr>) + Send + 'static {
    move |batch, unreachable| {
        let Some(engine) = engine.upgrade().filter(|e| !e.is_closed()) else {
            return;
        };
        // Consecutive packets to a peer leave in one GSO send.
        engine.send_packets_reporting(batch.iter().map(Vec::as_slice), |p, e| {
            if let SendError::NoRoute | SendError::Dropped(DropReason::NoEndpoint) = e {
                unroutable.fetch_add(1, Relaxed);
                if let Ok(h) = IpHeader::new_checked(p) {
                    if !unreachable.contains(&h.dst) {
                        unreachable.push(h.dst);
                    }
                }
            }
        });
    }
}

/// Starts the sender thread of one stack.
pub(crate) fn spawn(
    queue: Arc<TxQueue>,
    send: impl FnMut(&[Vec<u8>], &mut Vec<IpAddr>) + Send + 'static,
    kick: impl Fn() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("meshvpn-nstx".into())
        .spawn(move || {
            // However it ends (a panic included), the stack thread must not
            // wait for room forever.
            struct Closed<'a>(&'a TxQueue);
            impl Drop for Closed<'_> {
                fn drop(&mut self) {
                    self.0.close();
                }
            }
            let _closed = Closed(&queue);
            queue.run(send, kick);
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::{Duration, Instant};

    impl TxQueue {
        fn queued_bytes(&self) -> usize {
            self.state.lock().bytes
        }
    }

    /// `count` packets of `len` bytes; the first 8 bytes number them.
    fn batch(first: u64, count: usize, len: usize) -> Vec<Vec<u8>> {
        (0..count as u64)
            .map(|i| {
                let mut p = vec![0u8; len];
                p[..8].copy_from_slice(&(first + i).to_le_bytes());
                p
            })
            .collect()
    }

    fn number(p: &[u8]) -> u64 {
        u64::from_le_bytes(p[..8].try_into().unwrap())
    }

    #[test]
    fn a_stack_faster_than_its_sender_is_held_at_the_byte_cap_and_order_is_kept() {
        let q = Arc::new(TxQueue::default());
        let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
        let peak = Arc::new(AtomicUsize::new(0));
        let sender = {
            let (q2, seen, peak) = (q.clone(), seen.clone(), peak.clone());
            spawn(
                q.clone(),
                move |b: &[Vec<u8>], _: &mut Vec<IpAddr>| {
                    peak.fetch_max(q2.queued_bytes(), Relaxed);
                    seen.lock().extend(b.iter().map(|p| number(p)));
                    // A slow sender: the stack outruns it.
                    std::thread::sleep(Duration::from_micros(200));
                },
                || {},
            )
            .unwrap()
        };
        // Polls of 300 packets of 1420 bytes (426 KB each, so three do
        // not fit under the cap), as fast as the hand-off takes them.
        let (polls, per_poll) = (200u64, 300usize);
        let start = Instant::now();
        let mut out = Vec::new();
        for i in 0..polls {
            assert!(start.elapsed() < Duration::from_secs(60), "bounded in time");
            out.extend(batch(i * per_poll as u64, per_poll, 1420));
            assert!(q.push(&mut out));
            assert!(out.is_empty());
            assert!(q.queued_bytes() <= TX_QUEUE_BYTES);
        }
        q.close();
        sender.join().unwrap();
        let peak = peak.load(Relaxed);
        assert!(peak <= TX_QUEUE_BYTES, "{peak} bytes queued");
        assert!(peak > 300 * 1420, "the stack ran ahead: {peak}");
        let seen = seen.lock();
        assert_eq!(
            seen.len() as u64,
            polls * per_poll as u64,
            "every packet sent"
        );
        assert!(
            seen.iter().enumerate().all(|(i, n)| *n == i as u64),
            "in the order handed over"
        );
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn a_batch_larger_than_the_cap_goes_when_nothing_is_queued() {
        let q = Arc::new(TxQueue::default());
        let sent = Arc::new(AtomicUsize::new(0));
        let sender = {
            let sent = sent.clone();
            spawn(
                q.clone(),
                move |b: &[Vec<u8>], _: &mut Vec<IpAddr>| {
                    sent.fetch_add(b.len(), Relaxed);
                },
                || {},
            )
            .unwrap()
        };
        let count = TX_QUEUE_BYTES / 1000 + 10;
        for round in 0..3 {
            let mut out = batch(0, count, 1500);
            assert!(q.push(&mut out), "round {round}");
        }
        q.close();
        sender.join().unwrap();
        assert_eq!(sent.load(Relaxed), 3 * count);
        // The buffers come back for the next polls.
        let (mut free, mut unreachable) = (Vec::new(), Vec::new());
        q.take(&mut free, &mut unreachable);
        assert_eq!(free.len(), 3 * count);
        assert!(unreachable.is_empty());
    }

    #[test]
    fn unreachable_destinations_reach_the_stack_once_with_a_kick() {
        let q = Arc::new(TxQueue::default());
        let kicks = Arc::new(AtomicUsize::new(0));
        let dst: IpAddr = [10, 9, 9, 9].into();
        let sender = {
            let kicks = kicks.clone();
            spawn(
                q.clone(),
                move |b: &[Vec<u8>], unreachable: &mut Vec<IpAddr>| {
                    if b.len() == 2 {
                        unreachable.push(dst);
                    }
                },
                move || {
                    kicks.fetch_add(1, Relaxed);
                },
            )
            .unwrap()
        };
        let mut out = batch(0, 2, 100);
        assert!(q.push(&mut out));
        q.close();
        sender.join().unwrap();
        assert_eq!(kicks.load(Relaxed), 1);
        let (mut free, mut unreachable) = (Vec::new(), Vec::new());
        q.take(&mut free, &mut unreachable);
        assert_eq!(unreachable, vec![dst]);
        q.take(&mut free, &mut unreachable);
        assert_eq!(unreachable, vec![dst], "taken once");
    }

    #[test]
    fn a_stack_waiting_for_room_is_released_when_the_sender_dies() {
        let q = Arc::new(TxQueue::default());
        let release = Arc::new(AtomicBool::new(false));
        let sender = {
            let release = release.clone();
            spawn(
                q.clone(),
                move |_: &[Vec<u8>], _: &mut Vec<IpAddr>| {
                    let start = Instant::now();
                    while !release.load(Relaxed) && start.elapsed() < Duration::from_secs(30) {
                        std::thread::yield_now();
                    }
                    panic!("sender failed");
                },
                || {},
            )
            .unwrap()
        };
        let mut full = batch(0, TX_QUEUE_BYTES / 1000, 1000);
        assert!(q.push(&mut full));
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut more = batch(0, 10, 1000);
                let ok = q.push(&mut more);
                (ok, more.is_empty())
            })
        };
        release.store(true, Relaxed);
        assert!(sender.join().is_err(), "the sender panicked");
        let (ok, emptied) = pusher.join().unwrap();
        // The queue never had room for it: it learnt the sender is gone.
        assert!(!ok && emptied);
        let mut again = batch(0, 1, 100);
        assert!(!q.push(&mut again), "a dead sender takes nothing");
    }
}
