//! meshvpn-engine: a userspace WireGuard engine with a userspace TCP/IP stack
//! and a websocket supervisor tunnel, as a safe Rust API.
//!
//! Layers, top to bottom (no layer reaches up):
//!
//! | module    | owns                                                        | I/O |
//! |-----------|-------------------------------------------------------------|-----|
//! | `config`  | keys, peer specs, wg-quick `.conf`, the UAPI text protocol  | no  |
//! | `wire`    | checked views: IP/TCP/UDP, virtio-net, WireGuard framing    | no  |
//! | `router`  | AllowedIPs longest-prefix match                             | no  |
//! | `peer`    | one boringtun `Tunn` per peer, typed endpoint, stats, keepalive | no |
//! | `device`  | sans-IO core: peer table, routing, dispatch, cookies, source check | no |
//! | `netstack`| smoltcp TCP/UDP/ICMP for the host over the mesh (no root)  | no  |
//! | `runtime` | the `Engine`: threads, queues, packet sinks                 | yes |
//! | `io`      | syscalls: UDP sockets, TUN devices, unix sockets            | yes |
//! | `stats`   | `stats_struct!`: each exported counter set declared once    | no  |
//!
//! `unsafe` is denied here and allowed only on the `io` items that make raw
//! syscalls (`io::tun`, `io::unix`, `io::poll`); every block has a
//! `// SAFETY:` comment (clippy's `undocumented_unsafe_blocks` checks it).
#![deny(unsafe_code)]

pub mod config;
pub mod device;
pub mod io;
pub mod netstack;
pub mod peer;
pub mod router;
pub mod runtime;
pub mod stats;
pub mod tunnel;
pub mod wire;

pub use config::uapi::UapiError;
pub use config::{Config, InterfaceConfig, PeerConfig, PresharedKey, PrivateKey, PublicKey};
pub use netstack::{Netstack, NetstackConfig, NetstackError};
pub use router::IpPrefix;
pub use runtime::{Engine, EngineError, PeerUpdate, SendError, UapiServer};
