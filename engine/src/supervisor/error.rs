//! Errors of the tunnel layer.

use super::message::DecodeError;

/// Why a whole session ended (the websocket should be closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("malformed tunnel message: {0}")]
    Decode(#[from] DecodeError),
    #[error("no frame from the peer within the read deadline")]
    ReadTimeout,
}

/// Why an operation on one connection did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Nothing to read yet / no room to write yet: wait for an event.
    #[error("operation would block")]
    WouldBlock,
    /// The peer closed the connection with this error text (never `EOF`:
    /// a clean close reads as end of stream).
    #[error("connection closed by peer: {0}")]
    Reset(String),
    /// This side closed the connection.
    #[error("connection closed")]
    Closed,
    /// No such connection in this session.
    #[error("unknown connection")]
    Unknown,
}

/// Why a dial could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    #[error("only the server side of a session dials")]
    NotServer,
    #[error("session has {0} connections, the limit")]
    TooManyConnections(usize),
    #[error("target does not fit in a Connect message (266 bytes)")]
    TargetTooLong,
    #[error("session is closed")]
    SessionClosed,
}
