//! The websocket supervisor tunnel, wire-compatible with k3s's
//! `github.com/rancher/remotedialer` (see `engine/docs/remotedialer.md`).
//!
//! This layer is sans-IO: it never opens sockets, spawns threads or reads
//! the clock. Bytes and time go in ([`TunnelSession::handle_message`],
//! [`TunnelSession::handle_timeout`]), frames and events come out
//! ([`TunnelSession::poll_transmit`], [`TunnelSession::poll_event`]).
//! The websocket, TLS and threads live in `runtime::tunnel`.
//!
//! ```text
//!  websocket binary message ──► message::decode ──► TunnelSession ──► Event (Incoming, Readable, ...)
//!  stream send()/close()    ──► per-connection queues ──► poll_transmit ──► websocket message
//! ```
//!
//! Memory is bounded by [`Limits`]: every length read from the wire is capped,
//! every queue has a ceiling, and a peer that ignores Pause gets that
//! connection reset rather than growing a buffer.

pub mod error;
pub mod limits;
pub mod message;
pub mod relay;
pub mod session;
pub mod varint;

pub use error::{DialError, SessionError, StreamError};
pub use limits::Limits;
pub use session::{ConnId, Event, Role, SessionStats, Transmit, TunnelSession};
