//! One thread per websocket drives a [`TunnelSession`]: it reads websocket
//! messages into the session, writes the session's frames out, and runs its
//! timers. Stream handles on other threads call into the same session under
//! its mutex and wake this thread through a `mio::Waker` when they queued
//! something to send.
//!
//! ```text
//!   socket ──read──► ws.read ──► core.handle_message ──► events ──► stream condvars / incoming
//!   stream.write ──► core.send ──wake──► core.poll_transmit ──► ws.write ──► socket
//! ```
//!
//! The loop only sleeps when the socket said WouldBlock for reading (or
//! reading is paused, below) and either nothing is left to write or the
//! socket said WouldBlock for writing (mio is edge-triggered), or until the
//! session's next timer.
//!
//! Backpressure: the loop reads no more messages than the session's
//! [`TunnelSession::read_budget`] allows and stops reading while it is 0,
//! until writes drain the control queue. A peer that sends and never reads
//! then fills its own socket instead of this process's memory, as with Go's
//! remotedialer, which writes each reply before it reads the next message.
//! Closing instead would also bound memory, but would end a slow yet honest
//! peer's session along with every stream on it; stopping only delays it,
//! and the read deadline still ends a peer that stays stuck.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::{Events, Poll, Waker};
use parking_lot::{Condvar, Mutex, MutexGuard};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::{ConnId, Event, Limits, Role, Transmit, TunnelSession};
use crate::ws::poll::{is_would_block, read_one, session_poll, write_queued, Received};
use crate::ws::transport::Transport;

/// Messages read per lock of the session.
const READ_BATCH: usize = 64;

/// Websocket limits: a message is one tunnel message; Data payloads from Go
/// are at most the size of one `Write` (32 KiB from io.Copy), so 1 MiB is a
/// generous ceiling that still bounds what one frame can make us allocate.
pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
        .write_buffer_size(64 << 10)
        .max_write_buffer_size(1 << 20)
}

pub(crate) struct Inner {
    pub(crate) core: TunnelSession,
    pub(crate) signals: HashMap<ConnId, Arc<Condvar>>,
    io_sleeping: bool,
    stop: Option<String>,
    pub(crate) ended: bool,
}

/// What stream handles and the registry share with the I/O thread.
pub(crate) struct SessionShared {
    pub(crate) inner: Mutex<Inner>,
    waker: Waker,
    pub(crate) client_key: String,
}

impl SessionShared {
    /// Call after any operation on `core` from outside the I/O thread:
    /// delivers events and wakes the I/O thread when frames wait.
    pub(crate) fn after_op(&self, inner: &mut Inner) {
        deliver(inner, &mut Vec::new());
        if inner.io_sleeping && inner.core.has_transmit() {
            inner.io_sleeping = false;
            let _ = self.waker.wake();
        }
    }

    /// Ends the session (e.g. replaced by a newer one for the same client).
    pub(crate) fn stop(&self, reason: &str) {
        let mut inner = self.inner.lock();
        if inner.stop.is_none() {
            inner.stop = Some(reason.to_owned());
        }
        drop(inner);
        let _ = self.waker.wake();
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }
}

pub(crate) struct Incoming {
    pub(crate) conn: ConnId,
    pub(crate) proto: String,
    pub(crate) address: String,
}

fn deliver(inner: &mut Inner, incoming: &mut Vec<Incoming>) {
    while let Some(event) = inner.core.poll_event() {
        match event {
            Event::Readable(id) | Event::Writable(id) | Event::Closed(id) => {
                if let Some(signal) = inner.signals.get(&id) {
                    signal.notify_all();
                }
            }
            Event::Incoming {
                conn,
                proto,
                address,
            } => incoming.push(Incoming {
                conn,
                proto,
                address,
            }),
        }
    }
}

/// Hooks of the role running a session.
pub(crate) trait SessionHooks {
    /// The session is up; stream handles may be made from `shared` now.
    fn started(&self, shared: &Arc<SessionShared>);
    /// The peer asks to open a connection (agents). Must answer it through
    /// `shared` (accept or refuse) without blocking for long.
    fn incoming(&self, shared: &Arc<SessionShared>, incoming: Incoming);
}

/// Runs a session over an upgraded websocket until it ends; returns why it ended.
pub(crate) fn run(
    mut ws: WebSocket<Transport>,
    role: Role,
    limits: Limits,
    client_key: String,
    hooks: &dyn SessionHooks,
) -> String {
    let reason = match drive(&mut ws, role, limits, client_key, hooks) {
        Ok(reason) => reason,
        Err(e) => e.to_string(),
    };
    // Best effort: tell the peer, without waiting.
    let _ = ws.close(None);
    let _ = ws.flush();
    let _ = ws.get_ref().sock.tcp.shutdown();
    reason
}

fn drive(
    ws: &mut WebSocket<Transport>,
    role: Role,
    limits: Limits,
    client_key: String,
    hooks: &dyn SessionHooks,
) -> io::Result<String> {
    let (mut poll, waker) = session_poll(ws)?;
    let shared = Arc::new(SessionShared {
        inner: Mutex::new(Inner {
            core: TunnelSession::new(role, limits, Instant::now()),
            signals: HashMap::new(),
            io_sleeping: false,
            stop: None,
            ended: false,
        }),
        waker,
        client_key,
    });
    hooks.started(&shared);
    let reason = pump_websocket(ws, &shared, &mut poll, hooks);
    let mut inner = shared.lock();
    inner.core.close_all("tunnel disconnect");
    inner.ended = true;
    deliver(&mut inner, &mut Vec::new());
    for signal in inner.signals.values() {
        signal.notify_all();
    }
    Ok(reason)
}

fn pump_websocket(
    ws: &mut WebSocket<Transport>,
    shared: &Arc<SessionShared>,
    poll: &mut Poll,
    hooks: &dyn SessionHooks,
) -> String {
    let mut events = Events::with_capacity(8);
    let mut batch: Vec<Bytes> = Vec::with_capacity(READ_BATCH);
    let mut incoming = Vec::new();
    let mut stalled: Option<Message> = None;
    loop {
        // Read what the socket has, within the session's budget.
        let mut read_blocked = false;
        let mut read_any = false;
        let mut batches = 0;
        let mut budget = shared.lock().core.read_budget();
        // A bounded number of batches, so a busy reader never starves writes (Pause, pongs).
        while !read_blocked && batches < 8 && budget > 0 {
            batches += 1;
            batch.clear();
            let mut keepalives = 0usize;
            let limit = READ_BATCH.min(budget);
            while batch.len() < limit {
                match read_one(ws) {
                    Ok(Received::Binary(b)) => batch.push(b),
                    Ok(Received::Keepalive) => keepalives += 1,
                    Ok(Received::Other) => {}
                    Ok(Received::Blocked) => {
                        read_blocked = true;
                        break;
                    }
                    Err(reason) => return reason,
                }
            }
            if batch.is_empty() && keepalives == 0 {
                break;
            }
            read_any = true;
            let now = Instant::now();
            let mut inner = shared.lock();
            if keepalives > 0 {
                inner.core.handle_keepalive(now);
            }
            for frame in batch.drain(..) {
                if let Err(e) = inner.core.handle_message(now, frame) {
                    return e.to_string();
                }
            }
            deliver(&mut inner, &mut incoming);
            drop(inner);
            for inc in incoming.drain(..) {
                hooks.incoming(shared, inc);
            }
            budget = shared.lock().core.read_budget();
        }
        // Stopped for the budget with data maybe still in the socket: no
        // readable edge will come for it, so read again as soon as writes
        // made room (the write path below wakes the loop on writable).
        let read_paused = !read_blocked && budget == 0;

        // Timers, stop requests, and everything queued to send.
        let wrote_any = {
            let mut inner = shared.lock();
            if let Some(reason) = inner.stop.take() {
                return reason;
            }
            if let Err(e) = inner.core.handle_timeout(Instant::now()) {
                return e.to_string();
            }
            let next = || match inner.core.poll_transmit() {
                Some(Transmit::Message(m)) => Some(Message::Binary(Bytes::from(m))),
                Some(Transmit::Ping) => Some(Message::Ping(Bytes::new())),
                None => None,
            };
            let wrote = match write_queued(ws, &mut stalled, next) {
                Ok(w) => w,
                Err(e) => return e,
            };
            deliver(&mut inner, &mut incoming);
            wrote
        };
        let write_blocked = match ws.flush() {
            Ok(()) => false,
            Err(e) if is_would_block(&e) => true,
            Err(e) => return format!("websocket flush: {e}"),
        };
        if (read_any && !read_paused) || (wrote_any && !write_blocked) {
            continue;
        }

        // Sleep until the socket, a stream or a timer needs us.
        let timeout = {
            let mut inner = shared.lock();
            if inner.stop.is_some() || (!write_blocked && inner.core.has_transmit()) {
                continue;
            }
            if read_paused && inner.core.read_budget() > 0 {
                // Writes made room since: read what is left in the socket
                // (each pass consumes messages, so this does not spin).
                continue;
            }
            inner.io_sleeping = !write_blocked;
            inner
                .core
                .poll_timeout()
                .saturating_duration_since(Instant::now())
        };
        let timeout = timeout.max(Duration::from_millis(1));
        let result = poll.poll(&mut events, Some(timeout));
        shared.lock().io_sleeping = false;
        if let Err(e) = result {
            if e.kind() != io::ErrorKind::Interrupted {
                return format!("poll: {e}");
            }
        }
    }
}
