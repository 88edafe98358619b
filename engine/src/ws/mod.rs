//! The websocket plumbing the supervisor tunnel and the relay share, below
//! both: TLS settings ([`tls`]), one TCP or TLS stream ([`transport`]), a
//! non-blocking websocket under mio ([`poll`]), the handshake admission
//! caps of the HTTPS listener ([`admission`]), the reconnecting websocket
//! client the agent and the relay client share (`reconnect`), and
//! [`TunnelError`].
//!
//! `TunnelError::Dial` wraps the supervisor protocol's `DialError`: that
//! file is sans-IO and sits below this module (see the table in `lib.rs`).

pub(crate) mod admission;
pub(crate) mod poll;
pub(crate) mod reconnect;
pub mod tls;
pub(crate) mod transport;

pub use transport::HostStream;

pub use reconnect::{
    Backoff, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX, DEFAULT_HANDSHAKE_TIMEOUT,
    STABLE_SESSION,
};

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::supervisor::error::DialError;

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

/// Errors of the websocket tunnels (the supervisor tunnel and the relay).
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
