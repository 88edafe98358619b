//! The WireGuard relay: WireGuard datagrams between peers that cannot reach
//! each other over UDP, carried over websockets through a server both can
//! reach (DERP's role in Tailscale); see `engine/docs/relay.md`.
//!
//! - `protocol` (sans-IO, below every I/O module in the table in `lib.rs`):
//!   the key-ownership proof that registers a client, and the data frames.
//! - `client`: [`RelayClient`], one registration for the local key,
//!   reconnecting with backoff; its [`RelayOwner`] (the engine) gets the
//!   datagrams.
//! - `liveness` (sans-IO): when the client pings and when it gives a
//!   silent session up (seconds, not the 60 s idle timeout).
//! - `pump`: the non-blocking websocket loop both ends run, with byte-bounded
//!   queues.
//! - `engine`: plugs the client into the WireGuard engine from above, as
//!   one of its `RelayTransport`s (`Engine::start_relay`).
//! - `server`: the relay sessions the supervisor's HTTPS listener
//!   (`crate::supervisor::TunnelServer`) hands over on [`RELAY_PATH`].
//!
//! The websocket, TLS and [`crate::ws::TunnelError`] come from `crate::ws`.

mod client;
mod engine;
pub mod liveness;
pub mod protocol;
pub(crate) mod pump;
pub(crate) mod server;

pub use client::{RelayClient, RelayConfig, RelayOwner, RelayStatus};
pub use pump::{MESSAGE_OVERHEAD, WRITE_BUFFER_MAX};
pub use server::{
    RelayServerConfig, RelayServerStats, DEFAULT_BUDGET_BYTES, DEFAULT_QUEUE_BYTES,
    DEFAULT_RELAY_MAX_SESSIONS, DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE, DEFAULT_WRITE_TIMEOUT,
    MIN_QUEUE_BYTES, RELAY_PATH,
};
