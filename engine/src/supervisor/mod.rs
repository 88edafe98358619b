//! The websocket supervisor tunnel, wire-compatible with k3s's
//! `github.com/rancher/remotedialer` (see `engine/docs/remotedialer.md`):
//! the protocol and its I/O side by side.
//!
//! Sans-IO (they never open sockets, spawn threads or read the clock; bytes
//! and time go in, frames and events come out), and below every I/O module
//! in the table in `lib.rs`: `error`, `limits`, `message`, `session`,
//! `varint`. [`TunnelSession::handle_message`] and
//! [`TunnelSession::handle_timeout`] take input,
//! [`TunnelSession::poll_transmit`] and [`TunnelSession::poll_event`] give
//! output.
//!
//! ```text
//!  websocket binary message ──► message::decode ──► TunnelSession ──► Event (Incoming, Readable, ...)
//!  stream send()/close()    ──► per-connection queues ──► poll_transmit ──► websocket message
//! ```
//!
//! Memory is bounded by [`Limits`]: every length read from the wire is capped,
//! every queue has a ceiling, and a peer that ignores Pause gets that
//! connection reset rather than growing a buffer.
//!
//! I/O: websocket (tungstenite) over TLS (rustls, ring provider) or plain
//! TCP, on blocking std threads, through [`crate::ws`]: `agent`, `driver`,
//! `server`, `stream`, `target`.
//!
//! - [`Agent`]: opens the websocket to a server, reconnects with backoff,
//!   dials the targets its [`ConnectPolicy`] allows through a [`TargetDialer`].
//! - [`TunnelServer`]: accepts agents on one path, authenticates them
//!   (token or client certificate CN), and [`TunnelServer::dial`]s through them.
//!   Its HTTPS listener also serves relay clients on the same port
//!   ([`crate::relay`]), which is why this module sits above the relay.
//! - [`TunnelStream`]: one connection through a session, `Read + Write`.
//!
//! Threads: one per session (see `driver`), one per handshake in progress
//! (bounded in total and per source), one per relay session (bounded the
//! same way), one listener, and two per stream an agent pumps to a target
//! (at most `Limits::max_agent_streams` streams per agent).
//! Nothing in the I/O files parses tunnel messages.

pub mod error;
pub mod limits;
pub mod message;
pub mod session;
pub mod varint;

pub(crate) mod agent;
mod agent_stats;
mod driver;
mod server;
mod stream;
mod target;
mod url;

pub use error::{DialError, SessionError, StreamError};
pub use limits::Limits;
pub use session::{ConnId, Event, Role, SessionStats, Transmit, TunnelSession};

pub use agent::{Agent, AgentConfig, AgentEvent, AgentEventHook, AgentStatus};
pub use agent_stats::{AgentCounters, AgentStats};
pub mod upgrade;

pub use server::{
    ExtraRouteStats, ServerAuth, ServerConfig, ServerStats, TunnelServer, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
};
pub use stream::TunnelStream;
pub use target::{
    pump, AllowList, ConnectPolicy, DialedTarget, OsDialer, TargetDialer, TargetPattern,
};
pub use url::{url_with_path, K3S_PATH};
