//! The I/O loop both ends of a relay websocket run: binary messages in to a
//! callback, binary messages out from a bounded queue that other threads
//! fill through an [`Outbox`].
//!
//! ```text
//!   socket ──ws.read──► on_frame (forward by key / hand to the engine)
//!   Outbox::push ──bounded channel──wake──► ws.write ──► socket
//! ```
//!
//! One thread per websocket. It sleeps in `mio::Poll` only when the socket
//! said WouldBlock for reading and nothing can be written; a push wakes it
//! (one eventfd write per sleep, not per message).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use mio::{Events, Poll, Waker};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::driver::{is_would_block, read_one, session_poll, write_queued, Received};
use super::transport::Transport;
use super::TunnelError;
use crate::tunnel::relay::{EXPORTER_LABEL, EXPORTER_LEN, MAX_FRAME};

/// Messages read before the loop turns to writing.
const READ_BATCH: usize = 256;

/// Websocket limits of a relay connection: one message is one frame of at
/// most [`MAX_FRAME`] bytes; anything larger ends the session before it is
/// buffered.
pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
        .write_buffer_size(64 << 10)
        .max_write_buffer_size(1 << 20)
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

/// The sending side of a pump, for other threads.
pub(crate) struct Outbox {
    tx: Sender<Bytes>,
    waker: Waker,
    sleeping: AtomicBool,
    stop: AtomicBool,
}

impl Outbox {
    /// Queues one message; false when the queue is full (the caller counts).
    pub(crate) fn push(&self, message: Bytes) -> bool {
        match self.tx.try_send(message) {
            Ok(()) => {
                if self.sleeping.swap(false, Ordering::SeqCst) {
                    let _ = self.waker.wake();
                }
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Ends the pump soon (its `run` returns `reason`-less "stopped").
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// What a pump does besides moving frames.
pub(crate) struct PumpTimers {
    /// Send a websocket Ping this often (the client side).
    pub(crate) ping_every: Option<Duration>,
    /// End the session after this long without any message from the peer.
    pub(crate) idle: Duration,
}

pub(crate) struct Pump {
    poll: Poll,
    rx: Receiver<Bytes>,
    outbox: Arc<Outbox>,
}

impl Pump {
    /// Switches the websocket's socket to non-blocking session mode and
    /// makes a pump with a send queue of `capacity` messages.
    pub(crate) fn new(ws: &mut WebSocket<Transport>, capacity: usize) -> io::Result<Pump> {
        let (poll, waker) = session_poll(ws)?;
        let (tx, rx) = bounded(capacity);
        Ok(Pump {
            poll,
            rx,
            outbox: Arc::new(Outbox {
                tx,
                waker,
                sleeping: AtomicBool::new(false),
                stop: AtomicBool::new(false),
            }),
        })
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
        let _ = ws.close(None);
        let _ = ws.flush();
        let _ = ws.get_ref().sock.tcp.shutdown(std::net::Shutdown::Both);
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
        loop {
            if self.outbox.stop.load(Ordering::SeqCst) {
                return "stopped".into();
            }
            let mut read_blocked = false;
            for _ in 0..READ_BATCH {
                match read_one(ws) {
                    Ok(Received::Binary(b)) => {
                        last_rx = Instant::now();
                        on_frame(b);
                    }
                    Ok(Received::Keepalive) => last_rx = Instant::now(),
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
            if let (Some(at), Some(every)) = (next_ping, timers.ping_every) {
                if now >= at && stalled.is_none() {
                    stalled = Some(Message::Ping(Bytes::new()));
                    next_ping = Some(now + every);
                }
            }
            let wrote = match write_queued(ws, &mut stalled, || {
                self.rx.try_recv().ok().map(Message::Binary)
            }) {
                Ok(w) => w,
                Err(e) => return e,
            };
            let write_blocked = match ws.flush() {
                Ok(()) => false,
                Err(e) if is_would_block(&e) => true,
                Err(e) => return format!("websocket flush: {e}"),
            };
            if !read_blocked || (wrote && !write_blocked) {
                continue;
            }

            // Sleep until the socket, a push, the next ping or the idle limit.
            self.outbox.sleeping.store(true, Ordering::SeqCst);
            let more = !write_blocked && (stalled.is_some() || !self.rx.is_empty());
            if more || self.outbox.stop.load(Ordering::SeqCst) {
                self.outbox.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            let mut wake_at = last_rx + timers.idle;
            if let Some(at) = next_ping {
                wake_at = wake_at.min(at);
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
