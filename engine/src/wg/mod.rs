//! The running engine: threads, UDP sockets, packet sinks and the peer
//! table, over the pure layers below.
//!
//! ```text
//!   send:  host/TUN/netstack --send_packet--> Device::encapsulate --> GSO batch --> Transport
//!          (transport.rs: UDP or the relay, by the endpoint's kind)
//!   recv:  UDP --rx thread--> Device::handle_datagram --> RxBurst (one receive
//!          call's packets) --> InnerSink::deliver_burst
//!          relay --RelayInbox--^   (engine/relay_path.rs, relay/engine.rs; engine/docs/relay.md)
//!   timer thread: Device::poll_timers every TIMER_TICK
//!   The protocol logic is in `crate::device` (sans-IO); this layer moves bytes.
//!   UAPI: Engine::uapi_get / uapi_set, and UapiServer on /var/run/wireguard/IFNAME.sock
//!   STUN: stun::StunServer (a thread answering Binding requests), stun::probe
//!         (discovery on a socket of its own; see engine/docs/nat.md)
//! ```

mod engine;
mod pool;
mod sink;
mod transport;
mod uapi;

pub use crate::peer::{BufferBudget, DEFAULT_BUFFER_LIMIT};
pub use engine::{
    Engine, EngineError, EngineStats, PeerUpdate, RelayInbox, RelayTransport, SendError,
};
pub use engine::{NatStats, NatStatus, ANNOUNCE_INTERVAL, ANSWER_GAP, REDISCOVER_INTERVAL};
pub use pool::{BufferPool, PacketBuf};
pub use sink::{HostQueue, InnerBurst, InnerSink};
pub use transport::{Transport, Unsent};
pub use uapi::{
    UapiServer, MAX_CONNECTIONS, MAX_REQUEST_BYTES, UAPI_CLOSE_WITHIN, UAPI_DIR, UAPI_WRITE_TIMEOUT,
};
pub mod stun;
