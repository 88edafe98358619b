//! The I/O loop both ends of a relay websocket run: binary messages in to a
//! callback, binary messages out from a bounded queue that other threads
//! fill through an [`Outbox`].
//!
//! ```text
//!   socket ──ws.read──► on_frame (forward by key / hand to the engine)
//!   Outbox::push ──queue bounded in bytes──wake──► ws.write ──► socket
//! ```
//!
//! One thread per websocket. It sleeps in `mio::Poll` only when the socket
//! said WouldBlock for reading and nothing can be written; a push wakes it
//! (one eventfd write per sleep, not per message).
//!
//! What a session holds is bounded: its queue by [`QueueLimits`] (bytes,
//! messages, and a budget shared with other sessions), tungstenite's write
//! buffer by [`websocket_config`], TLS by rustls's buffer limit. A queued
//! message is charged to the limits until the pump takes it to write, or
//! the session ends and the queue is dropped.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::{Events, Poll, Waker};
use parking_lot::Mutex;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::peer::BufferBudget;
use crate::relay::liveness::{Liveness, Next, PONG_TIMEOUT};
use crate::relay::protocol::{EXPORTER_LABEL, EXPORTER_LEN, MAX_FRAME};
use crate::ws::poll::{is_would_block, read_one, session_poll, write_queued, Received};
use crate::ws::transport::Transport;
use crate::ws::TunnelError;

/// Messages read before the loop turns to writing.
const READ_BATCH: usize = 256;

/// What one queued message costs beyond its length (its `Bytes` handle, its
/// queue slot, the allocator's header), charged like its bytes so that a
/// flood of tiny frames is bounded by the same byte limits (the kernel
/// charges a socket buffer an skb's truesize, not its payload, the same way).
pub const MESSAGE_OVERHEAD: usize = 64;

/// The most tungstenite holds in its write buffer for one websocket when
/// the socket does not take more: a few of the largest frames. It is
/// outside the queue limits, so it is kept small (it is per session).
pub const WRITE_BUFFER_MAX: usize = 256 << 10;

/// While output waits, a pump must get at least this many bytes into the
/// socket per write timeout: a peer that reads a trickle (a byte now and
/// then) is as stuck as one that reads nothing. One largest frame, as DERP
/// gives each frame's write its own deadline.
const WRITE_PROGRESS: u64 = MAX_FRAME as u64;

/// Websocket limits of a relay connection: one message is one frame of at
/// most [`MAX_FRAME`] bytes; anything larger ends the session before it is
/// buffered.
pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
        .write_buffer_size(64 << 10)
        .max_write_buffer_size(WRITE_BUFFER_MAX)
}

/// The TLS exporter value the key proof is bound to; zeros on a plain
/// (test-only) connection, which has no session to bind to.
pub(crate) fn exporter(transport: &Transport) -> Result<[u8; EXPORTER_LEN], TunnelError> {
    match &transport.tls {
        Some(tls) => tls
            .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
            .map_err(|e| TunnelError::Tls(e.to_string())),
        None => Ok([0u8; EXPORTER_LEN]),
    }
}

/// The next binary message during the (blocking, deadline-bound) relay
/// handshake; pings and pongs are skipped.
pub(crate) fn read_binary(ws: &mut WebSocket<Transport>) -> Result<Bytes, TunnelError> {
    // A handful of control frames at most before the answer.
    for _ in 0..16 {
        match ws.read() {
            Ok(Message::Binary(b)) => return Ok(b),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Ok(Message::Close(_)) => {
                return Err(TunnelError::Handshake("relay closed the websocket".into()))
            }
            Ok(Message::Text(_)) => return Err(TunnelError::Handshake("text message".into())),
            Err(e) => return Err(TunnelError::Handshake(e.to_string())),
        }
    }
    Err(TunnelError::Handshake("no relay handshake message".into()))
}

/// How much an [`Outbox`] may hold.
pub(crate) struct QueueLimits {
    /// Messages queued at once.
    pub(crate) messages: usize,
    /// Bytes queued at once (each message charged its length plus
    /// [`MESSAGE_OVERHEAD`]).
    pub(crate) bytes: usize,
    /// A budget shared with other queues, charged the same bytes.
    pub(crate) budget: Option<Arc<BufferBudget>>,
}

/// Why [`Outbox::push`] did not queue a message (the caller counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue's own message or byte limit.
    Full,
    /// The shared budget.
    Budget,
    /// The session ended.
    Closed,
}

struct Queue {
    messages: VecDeque<Bytes>,
    /// Charged for what `messages` holds.
    bytes: usize,
    closed: bool,
}

fn charge(message: &Bytes) -> usize {
    message.len() + MESSAGE_OVERHEAD
}

/// The sending side of a pump, for other threads. Never blocks: a message
/// past a limit is refused at once, so the thread that pushes (another
/// session's reader, the engine) keeps going.
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    limits: QueueLimits,
    waker: Waker,
    sleeping: AtomicBool,
    stop: AtomicBool,
    /// A liveness check was asked for (see [`Outbox::check`]).
    check: AtomicBool,
}

impl Outbox {
    fn new(limits: QueueLimits, waker: Waker) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                messages: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            limits,
            waker,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            check: AtomicBool::new(false),
        }
    }

    /// Queues one message; on success, the bytes the queue holds now.
    pub(crate) fn push(&self, message: Bytes) -> Result<usize, Refused> {
        self.enqueue(message, true)
    }

    /// Queues one message past the limits, still charged for it: the
    /// relay's acceptance, which the client must get whatever else waits.
    pub(crate) fn push_unlimited(&self, message: Bytes) {
        let _ = self.enqueue(message, false);
    }

    fn enqueue(&self, message: Bytes, limited: bool) -> Result<usize, Refused> {
        let cost = charge(&message);
        let mut q = self.queue.lock();
        if q.closed {
            return Err(Refused::Closed);
        }
        if limited
            && (q.messages.len() >= self.limits.messages
                || q.bytes.saturating_add(cost) > self.limits.bytes)
        {
            return Err(Refused::Full);
        }
        if let Some(budget) = &self.limits.budget {
            if !limited {
                budget.take(cost);
            } else if !budget.try_take(cost) {
                return Err(Refused::Budget);
            }
        }
        q.bytes += cost;
        q.messages.push_back(message);
        let queued = q.bytes;
        drop(q);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
        Ok(queued)
    }

    /// The next message to write; its bytes leave the limits now.
    fn pop(&self) -> Option<Bytes> {
        let mut q = self.queue.lock();
        let message = q.messages.pop_front()?;
        let cost = charge(&message);
        q.bytes -= cost;
        drop(q);
        if let Some(budget) = &self.limits.budget {
            budget.give_back(cost);
        }
        Some(message)
    }

    fn is_empty(&self) -> bool {
        self.queue.lock().messages.is_empty()
    }

    /// Refuses every later push and frees what is queued (the session
    /// ended: nothing will write it).
    fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        let freed = std::mem::take(&mut q.bytes);
        let messages = std::mem::take(&mut q.messages);
        drop(q);
        drop(messages);
        if let Some(budget) = &self.limits.budget {
            budget.give_back(freed);
        }
    }

    /// Ends the pump soon (its `run` returns `reason`-less "stopped").
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Asks a pump that checks liveness ([`PumpTimers::liveness`]) to ping
    /// now and end the session if nothing answers within its deadline;
    /// ignored by one that does not.
    pub(crate) fn check(&self) {
        self.check.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// What a pump does besides moving frames.
pub(crate) struct PumpTimers {
    /// Send a websocket Ping this often (the client side).
    pub(crate) ping_every: Option<Duration>,
    /// End the session after this long without any message from the peer.
    pub(crate) idle: Duration,
    /// End the session when output waits this long without
    /// [`WRITE_PROGRESS`] bytes getting into the socket (a peer that does
    /// not read). DERP closes such a client the same way, with a write
    /// deadline on every frame it sends.
    pub(crate) write_timeout: Option<Duration>,
    /// End the session when a ping goes unanswered (the client side): see
    /// [`crate::relay::liveness`] for when it pings.
    pub(crate) liveness: bool,
}

pub(crate) struct Pump {
    poll: Poll,
    outbox: Arc<Outbox>,
    write_timed_out: bool,
}

impl Pump {
    /// Switches the websocket's socket to non-blocking session mode and
    /// makes a pump with a send queue bounded by `limits`.
    pub(crate) fn new(ws: &mut WebSocket<Transport>, limits: QueueLimits) -> io::Result<Pump> {
        let (poll, waker) = session_poll(ws)?;
        Ok(Pump {
            poll,
            outbox: Arc::new(Outbox::new(limits, waker)),
            write_timed_out: false,
        })
    }

    /// Whether `run` ended because writes made no progress.
    pub(crate) fn write_timed_out(&self) -> bool {
        self.write_timed_out
    }

    pub(crate) fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// Moves messages until the websocket ends, the outbox is stopped or
    /// the peer is idle too long; returns why it ended and closes the
    /// websocket (best effort).
    pub(crate) fn run(
        &mut self,
        ws: &mut WebSocket<Transport>,
        timers: &PumpTimers,
        on_frame: &mut dyn FnMut(Bytes),
    ) -> String {
        let reason = self.pump(ws, timers, on_frame);
        self.outbox.close();
        let _ = ws.close(None);
        let _ = ws.flush();
        let _ = ws.get_ref().sock.tcp.shutdown();
        reason
    }

    fn pump(
        &mut self,
        ws: &mut WebSocket<Transport>,
        timers: &PumpTimers,
        on_frame: &mut dyn FnMut(Bytes),
    ) -> String {
        let mut events = Events::with_capacity(8);
        let mut last_rx = Instant::now();
        let mut next_ping = timers.ping_every.map(|p| Instant::now() + p);
        let mut stalled: Option<Message> = None;
        // Since when output has waited, and the socket's byte count then.
        let mut waiting: Option<(Instant, u64)> = None;
        let mut live = timers.liveness.then(Liveness::new);
        // A ping to write as soon as nothing else waits in `stalled`, and
        // one put there and not yet taken by the websocket.
        let mut ping_wanted = false;
        let mut ping_queued = false;
        // The socket's byte count when the last flush found it full.
        let mut blocked_at: Option<u64> = None;
        loop {
            if self.outbox.stop.load(Ordering::SeqCst) {
                return "stopped".into();
            }
            let mut read_blocked = false;
            for _ in 0..READ_BATCH {
                match read_one(ws) {
                    Ok(Received::Binary(b)) => {
                        last_rx = Instant::now();
                        if let Some(l) = live.as_mut() {
                            l.received();
                        }
                        on_frame(b);
                    }
                    Ok(Received::Keepalive) => {
                        last_rx = Instant::now();
                        if let Some(l) = live.as_mut() {
                            l.received();
                        }
                    }
                    Ok(Received::Other) => {}
                    Ok(Received::Blocked) => {
                        read_blocked = true;
                        break;
                    }
                    Err(reason) => return reason,
                }
            }

            let now = Instant::now();
            if now.duration_since(last_rx) > timers.idle {
                return format!("nothing from the peer for {:?}", timers.idle);
            }
            if let Some(l) = live.as_mut() {
                if self.outbox.check.swap(false, Ordering::SeqCst) {
                    l.check();
                }
                match l.poll(now) {
                    Next::Dead => {
                        return format!(
                            "no answer to a ping within {PONG_TIMEOUT:?} (the connection is dead)"
                        )
                    }
                    Next::Ping => ping_wanted = true,
                    Next::Wait(_) => {}
                }
            }
            if let (Some(at), Some(every)) = (next_ping, timers.ping_every) {
                if now >= at {
                    ping_wanted = true;
                    next_ping = Some(now + every);
                }
            }
            // One ping at a time covers the keepalive and the check.
            ping_wanted &= !ping_queued;
            if ping_wanted && stalled.is_none() {
                stalled = Some(Message::Ping(Bytes::new()));
                ping_wanted = false;
                ping_queued = true;
            }
            let wrote =
                match write_queued(ws, &mut stalled, || self.outbox.pop().map(Message::Binary)) {
                    Ok(w) => w,
                    Err(e) => return e,
                };
            if let Some(l) = live.as_mut() {
                if wrote {
                    l.sent(now);
                }
                if ping_queued && !matches!(stalled, Some(Message::Ping(_))) {
                    ping_queued = false;
                    l.ping_written(now);
                }
            }
            let write_blocked = match ws.flush() {
                Ok(()) => false,
                Err(e) if is_would_block(&e) => true,
                Err(e) => return format!("websocket flush: {e}"),
            };
            let written = ws.get_ref().sock.bytes_written();
            if let (Some(mark), Some(l)) = (blocked_at, live.as_mut()) {
                // A full socket took more: the far end acknowledged data.
                if written > mark {
                    l.progress(now);
                }
            }
            blocked_at = write_blocked.then_some(written);
            if let Some(limit) = timers.write_timeout {
                if !write_blocked {
                    waiting = None;
                } else {
                    let (since, mark) = *waiting.get_or_insert((now, written));
                    if written.saturating_sub(mark) >= WRITE_PROGRESS {
                        waiting = Some((now, written));
                    } else if now.duration_since(since) >= limit {
                        self.write_timed_out = true;
                        return format!("no write progress for {limit:?} (the peer does not read)");
                    }
                }
            }
            if !read_blocked || (wrote && !write_blocked) {
                continue;
            }

            // Sleep until the socket, a push, the next ping, the idle limit
            // or a liveness deadline.
            self.outbox.sleeping.store(true, Ordering::SeqCst);
            let more = !write_blocked && (stalled.is_some() || !self.outbox.is_empty());
            let checked = live.is_some() && self.outbox.check.load(Ordering::SeqCst);
            if more || checked || self.outbox.stop.load(Ordering::SeqCst) {
                self.outbox.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            let mut wake_at = last_rx + timers.idle;
            if let Some(at) = next_ping {
                wake_at = wake_at.min(at);
            }
            if let (Some((since, _)), Some(limit)) = (waiting, timers.write_timeout) {
                wake_at = wake_at.min(since + limit);
            }
            if let Some(l) = live.as_mut() {
                match l.poll(Instant::now()) {
                    Next::Wait(Some(at)) => wake_at = wake_at.min(at),
                    Next::Wait(None) => {}
                    // A ping that waits for the socket sleeps with it.
                    Next::Ping if ping_wanted || ping_queued => {}
                    Next::Ping | Next::Dead => {
                        self.outbox.sleeping.store(false, Ordering::SeqCst);
                        continue;
                    }
                }
            }
            let timeout = wake_at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let result = self.poll.poll(&mut events, Some(timeout));
            self.outbox.sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = result {
                if e.kind() != io::ErrorKind::Interrupted {
                    return format!("poll: {e}");
                }
            }
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        // A pump that never ran still gives its queue's bytes back.
        self.outbox.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(messages: usize, bytes: usize, budget: &Arc<BufferBudget>) -> (Poll, Outbox) {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let limits = QueueLimits {
            messages,
            bytes,
            budget: Some(budget.clone()),
        };
        (poll, Outbox::new(limits, waker))
    }

    fn msg(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    #[test]
    fn queue_and_budget_charge_bytes_and_give_back_exactly() {
        let cost = 1000 + MESSAGE_OVERHEAD;
        let budget = Arc::new(BufferBudget::new(5 * cost));
        let (_p1, a) = outbox(100, 3 * cost, &budget);
        let (_p2, b) = outbox(100, 3 * cost, &budget);
        assert_eq!(a.push(msg(1000)), Ok(cost));
        assert_eq!(a.push(msg(1000)), Ok(2 * cost));
        assert_eq!(a.push(msg(1000)), Ok(3 * cost));
        // The session's own cap, then the shared budget.
        assert_eq!(a.push(msg(1000)), Err(Refused::Full));
        assert_eq!(b.push(msg(1000)), Ok(cost));
        assert_eq!(b.push(msg(1000)), Ok(2 * cost));
        assert_eq!(b.push(msg(1000)), Err(Refused::Budget));
        assert_eq!(budget.used(), 5 * cost);
        // Taken to write: the bytes leave both limits.
        assert_eq!(a.pop().map(|m| m.len()), Some(1000));
        assert_eq!(budget.used(), 4 * cost);
        assert_eq!(b.push(msg(1000)), Ok(3 * cost));
        // The acceptance goes in past the limits, still charged.
        b.push_unlimited(msg(2));
        assert_eq!(budget.used(), 6 * cost - 1000 + 2);
        // A session's end frees its queue; later pushes are refused.
        b.close();
        assert_eq!(b.push(msg(1)), Err(Refused::Closed));
        assert_eq!(budget.used(), 2 * cost);
        while a.pop().is_some() {}
        assert_eq!(budget.used(), 0);
        a.close();
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn tiny_messages_are_bounded_by_their_overhead_and_count() {
        let budget = Arc::new(BufferBudget::new(usize::MAX));
        let (_p, q) = outbox(usize::MAX, 10 * (1 + MESSAGE_OVERHEAD), &budget);
        for _ in 0..10 {
            q.push(msg(1)).unwrap();
        }
        assert_eq!(q.push(msg(1)), Err(Refused::Full));
        let (_p, q) = outbox(3, usize::MAX, &budget);
        for _ in 0..3 {
            q.push(msg(1)).unwrap();
        }
        assert_eq!(q.push(msg(1)), Err(Refused::Full));
    }
}
