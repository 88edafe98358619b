//! One websocket on a non-blocking socket under mio, as both the supervisor
//! session driver and the relay pump run it: register the socket and a
//! waker, read one message, write what is queued until the socket or
//! tungstenite's buffer is full.

use std::io;

use bytes::Bytes;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Token, Waker};
use tungstenite::{Message, WebSocket};

use super::transport::Transport;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

/// Switches the websocket's socket to non-blocking session mode and
/// registers it (token `SOCKET`, edge-triggered, both directions) with a
/// new poll, plus a waker (token `WAKER`) for other threads.
pub(crate) fn session_poll(ws: &mut WebSocket<Transport>) -> io::Result<(Poll, Waker)> {
    ws.get_mut().sock.enter_session_mode()?;
    let poll = Poll::new()?;
    let fd = ws.get_ref().sock.raw_fd();
    poll.registry().register(
        &mut SourceFd(&fd),
        SOCKET,
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    Ok((poll, waker))
}

/// What one read from a session's websocket gave.
pub(crate) enum Received {
    Binary(Bytes),
    /// A ping or pong (tungstenite queues the pong for a ping itself).
    Keepalive,
    /// A partial frame or nothing of interest.
    Other,
    /// The socket would block.
    Blocked,
}

/// Reads one message; `Err` is why the session ends (text messages, close,
/// errors).
pub(crate) fn read_one(ws: &mut WebSocket<Transport>) -> Result<Received, String> {
    match ws.read() {
        Ok(Message::Binary(b)) => Ok(Received::Binary(b)),
        Ok(Message::Ping(_) | Message::Pong(_)) => Ok(Received::Keepalive),
        Ok(Message::Frame(_)) => Ok(Received::Other),
        Ok(Message::Text(_)) => Err("peer sent a text message".into()),
        Ok(Message::Close(_)) => Err("peer closed the websocket".into()),
        Err(e) if is_would_block(&e) => Ok(Received::Blocked),
        Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
            Err("websocket closed".into())
        }
        Err(e) => Err(format!("websocket read: {e}")),
    }
}

/// Writes `stalled`, then what `next` yields, until tungstenite's buffer is
/// full (the message that did not fit goes back to `stalled`; flush, then
/// call again) or the socket would block (the frame is buffered; the flush
/// says whether the socket is full). Returns whether anything was written.
pub(crate) fn write_queued(
    ws: &mut WebSocket<Transport>,
    stalled: &mut Option<Message>,
    mut next: impl FnMut() -> Option<Message>,
) -> Result<bool, String> {
    let mut wrote = false;
    while let Some(msg) = stalled.take().or_else(&mut next) {
        wrote = true;
        match ws.write(msg) {
            Ok(()) => {}
            Err(tungstenite::Error::WriteBufferFull(m)) => {
                *stalled = Some(*m);
                break;
            }
            Err(e) if is_would_block(&e) => break,
            Err(e) => return Err(format!("websocket write: {e}")),
        }
    }
    Ok(wrote)
}

pub(crate) fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}
