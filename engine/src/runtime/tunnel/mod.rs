//! The I/O side of the supervisor tunnel: websocket (tungstenite) over TLS
//! (rustls, ring provider) or plain TCP, on blocking std threads.
//!
//! - [`Agent`]: opens the websocket to a server, reconnects with backoff,
//!   dials the targets its [`ConnectPolicy`] allows through a [`TargetDialer`].
//! - [`TunnelServer`]: accepts agents on one path, authenticates them
//!   (token or client certificate CN), and [`TunnelServer::dial`]s through them.
//! - [`TunnelStream`]: one connection through a session, `Read + Write`.
//!
//! Threads: one per session (see `driver`), one per handshake in progress
//! (bounded in total and per source), one per relay session (bounded the
//! same way), one listener, and two per stream an agent pumps to a target
//! (at most `Limits::max_agent_streams` streams per agent).
//! The protocol itself lives in [`crate::tunnel`]; nothing here parses
//! tunnel messages.

mod admission;
mod agent;
mod agent_stats;
mod driver;
mod relay_client;
mod relay_pump;
mod relay_server;
mod server;
mod stream;
mod target;
pub mod tls;
mod transport;
mod url;

pub use agent::{Agent, AgentConfig, AgentEvent, AgentEventHook, AgentStatus};
pub use agent_stats::{AgentCounters, AgentStats};
pub use relay_client::{RelayClient, RelayConfig, RelayOwner, RelayStatus};
pub use relay_pump::{MESSAGE_OVERHEAD, WRITE_BUFFER_MAX};
pub use relay_server::{
    RelayServerConfig, RelayServerStats, DEFAULT_BUDGET_BYTES, DEFAULT_QUEUE_BYTES,
    DEFAULT_RELAY_MAX_SESSIONS, DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE, DEFAULT_WRITE_TIMEOUT,
    MIN_QUEUE_BYTES, RELAY_PATH,
};
pub use server::{
    ServerAuth, ServerConfig, ServerStats, TunnelServer, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
};
pub use stream::TunnelStream;
pub use target::{
    pump, AllowList, ConnectPolicy, DialedTarget, OsDialer, TargetDialer, TargetPattern,
};
pub use url::{url_with_path, K3S_PATH};

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::tunnel::DialError;

/// Waits on `changed` until `done` holds for the value behind `lock`
/// (`true`) or `timeout` passes (`false`, unless it holds by then).
pub(crate) fn wait_for<T>(
    lock: &Mutex<T>,
    changed: &Condvar,
    timeout: Duration,
    done: impl Fn(&T) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut value = lock.lock();
    while !done(&value) {
        if changed.wait_until(&mut value, deadline).timed_out() {
            return done(&value);
        }
    }
    true
}

/// Errors of the tunnel runtime.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    /// The server ended the TLS handshake with `certificate_required`: it
    /// demands a client certificate and none was configured.
    #[error("TLS: the server requires a client certificate and none was given")]
    ClientCertificateRequired,
    #[error("websocket handshake: {0}")]
    Handshake(String),
    /// The server refused the upgrade (401: authentication failed).
    #[error("websocket handshake: server answered HTTP {0}")]
    Rejected(tungstenite::http::StatusCode),
    #[error("configuration: {0}")]
    Config(String),
    #[error("no tunnel session for client {0:?}")]
    NoSession(String),
    #[error("dial: {0}")]
    Dial(#[from] DialError),
}
