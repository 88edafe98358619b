//! The supervisor tunnel (the websocket protocol of rancher/remotedialer,
//! which k3s uses): `meshvpn_tunnel_agent`, `meshvpn_tunnel_server` and
//! `meshvpn_tunnel_stream`.
//!
//! ```text
//!   server: new -> start (HTTPS listener) -> dial(client_key, "tcp", addr) -> stream
//!   agent:  new -> start (connects, reconnects) -> dials what the server asks, if allowed
//!   stream: read / write (per-call timeouts) -> shutdown_write / close -> free
//! ```
//!
//! Each handle refers to an object in a generational table (`handle`), so a
//! freed or stale handle is refused. Objects are reference counted: a call
//! racing with `_free` on another thread finishes on an object that is
//! being shut down (and fails with `MESHVPN_TUNNEL_CLOSED`,
//! `MESHVPN_TUNNEL_NOT_RUNNING` or `MESHVPN_INVALID_HANDLE`), never on freed
//! memory. Every blocking call has a timeout and is woken by closing or
//! freeing its handle.
//!
//! One module per C type: [`agent`], [`server`], [`stream`]; this one holds
//! what they share (the error codes of the tunnel runtime).

pub mod agent;
pub mod server;
pub mod stream;

use std::time::Duration;

use ::meshvpn_engine::supervisor::DialError;
use ::meshvpn_engine::ws::TunnelError;

use crate::error::{meshvpn_result, Error};

use meshvpn_result::*;

/// How long one wait for a session (an agent's, or one on the server)
/// holds on to its object, so that a stop never waits long for it.
pub(crate) const SESSION_WAIT_SLICE: Duration = Duration::from_millis(50);

pub(crate) fn tls_error(e: TunnelError) -> Error {
    Error::new(MESHVPN_TUNNEL_TLS, e.to_string())
}

/// The code for an error of the tunnel runtime.
pub(crate) fn tunnel_code(e: &TunnelError) -> meshvpn_result {
    match e {
        TunnelError::Io(_) => MESHVPN_TUNNEL_CONNECT_FAILED,
        TunnelError::Tls(_) | TunnelError::ClientCertificateRequired => MESHVPN_TUNNEL_TLS,
        TunnelError::Rejected(status) if matches!(status.as_u16(), 401 | 403) => {
            MESHVPN_TUNNEL_AUTH
        }
        TunnelError::Rejected(_) | TunnelError::Handshake(_) => MESHVPN_TUNNEL_HANDSHAKE,
        TunnelError::Config(_) => MESHVPN_INVALID_ARGUMENT,
        TunnelError::NoSession(_) | TunnelError::Dial(DialError::SessionClosed) => {
            MESHVPN_TUNNEL_NO_SESSION
        }
        TunnelError::Dial(DialError::TooManyConnections(_)) => MESHVPN_TUNNEL_LIMIT,
        TunnelError::Dial(_) => MESHVPN_INVALID_ARGUMENT,
    }
}

impl From<TunnelError> for Error {
    fn from(e: TunnelError) -> Error {
        Error::new(tunnel_code(&e), e.to_string())
    }
}
