//! meshvpn-engine: a userspace WireGuard engine with a userspace TCP/IP stack
//! and a websocket supervisor tunnel, as a safe Rust API.
//!
//! Layers, bottom to top: a module may use its own row and the rows listed
//! before it, never a later one. `tests/layers.rs` reads this table and
//! holds the code to it: every file in a row, no path to a later row (one
//! known one is listed there with the change that removes it), and no
//! sockets, threads, files or clock reads in a row whose I/O column says
//! `no`. The supervisor and the relay keep their sans-IO protocol files next
//! to their I/O; those files are rows of their own, early in the table.
//! `relay` comes after `wg`: the engine only knows a `RelayTransport`,
//! and the relay client plugs itself in from above (`relay/engine.rs`); the
//! supervisor comes last because its HTTPS listener also serves relay
//! clients.
//!
//! | module                                             | owns                                                          | I/O |
//! |----------------------------------------------------|---------------------------------------------------------------|-----|
//! | `stats`                                            | `stats_struct!`: each exported counter set declared once      | no  |
//! | `wire`                                             | checked views: IP/TCP/UDP, virtio-net, WireGuard framing      | no  |
//! | `nat`                                              | STUN discovery client, the STUN server's per-source limit     | no  |
//! | `router`                                           | AllowedIPs longest-prefix match                               | no  |
//! | `filter`                                           | stateful packet filter: compiled ACL rules and conntrack      | no  |
//! | `config`                                           | keys, peer specs, wg-quick `.conf`, the UAPI text protocol    | resolver (hostnames in `.conf`, replaceable) |
//! | `supervisor::{error, limits, message, session, varint}` | the remotedialer protocol: messages, session, limits     | no  |
//! | `relay::{protocol, liveness}`                      | the relay's registration proof and frames; when a session is dead | no  |
//! | `io`                                               | syscalls: UDP sockets, TUN devices, unix sockets, accept, dial| yes |
//! | `peer`                                             | one boringtun `Tunn` per peer, typed endpoint, stats, keepalive (takes `now`) | wall clock (stats' last handshake) |
//! | `device`                                           | sans-IO device core: identity, peer table, routing, dispatch, cookies, source check, path policy | no |
//! | `ws`                                               | websocket/TLS plumbing both tunnels use, `TunnelError`        | yes |
//! | `wg`                                               | the WireGuard `Engine`: threads, sockets, batching, sinks, UAPI over `device` | yes |
//! | `relay`                                            | the WireGuard relay: client, pump, server sessions; plugs into `wg` | yes |
//! | `netstack`                                         | smoltcp TCP/UDP/ICMP for the host over the mesh (no root)     | threads, clock |
//! | `supervisor`                                       | agent, server (one HTTPS listener for agents and relay clients), streams | yes |
//!
//! `unsafe` is denied here and allowed only on the `io` items that make raw
//! syscalls (`io::tun`, `io::unix`, `io::poll`); every block has a
//! `// SAFETY:` comment (clippy's `undocumented_unsafe_blocks` checks it).
#![deny(unsafe_code)]

pub mod config;
pub mod device;
pub mod filter;
pub mod io;
pub mod nat;
pub mod netstack;
pub mod peer;
pub mod relay;
pub mod router;
pub mod stats;
pub mod supervisor;
pub mod wg;
pub mod wire;
pub mod ws;

pub use config::uapi::UapiError;
pub use config::{Config, InterfaceConfig, PeerConfig, PresharedKey, PrivateKey, PublicKey};
pub use netstack::{Netstack, NetstackConfig, NetstackError};
pub use router::IpPrefix;
pub use wg::{Engine, EngineError, PeerUpdate, SendError, UapiServer};
