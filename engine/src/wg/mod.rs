//! The running engine: threads, UDP sockets, packet sinks and the peer
//! table, over the pure layers below.
//!
//! ```text
//!   send:  host/TUN/netstack --send_packet--> router --> Peer::encapsulate --> UDP or relay
//!   recv:  UDP --rx thread--> framing --> Peer::decapsulate --> source check
//!          --> RxBurst (one receive call's packets) --> InnerSink::deliver_burst
//!          relay --relay thread--^   (engine/relay_path.rs; see engine/docs/relay.md)
//!   timer thread: Peer::update_timers every TIMER_TICK, rate limiter reset every second
//!   UAPI: Engine::uapi_get / uapi_set, and UapiServer on /var/run/wireguard/IFNAME.sock
//!   STUN: stun::StunServer (a thread answering Binding requests), stun::probe
//!         (discovery on a socket of its own; see engine/docs/nat.md)
//! ```

mod engine;
mod pool;
mod sink;
mod uapi;

pub use crate::peer::{BufferBudget, DEFAULT_BUFFER_LIMIT};
pub use engine::{Engine, EngineError, EngineStats, PeerUpdate, SendError};
pub use pool::{BufferPool, PacketBuf};
pub use sink::{HostQueue, InnerBurst, InnerSink};
pub use uapi::{
    UapiServer, MAX_CONNECTIONS, MAX_REQUEST_BYTES, UAPI_CLOSE_WITHIN, UAPI_DIR, UAPI_WRITE_TIMEOUT,
};
pub mod stun;
