//! Parsing untrusted bytes: inner IP, TCP and UDP headers, checksums,
//! virtio-net offload headers and WireGuard message framing.
//!
//! Every accessor here is total: a view is made only through a `new_checked`
//! that validates lengths first, after which no accessor can panic. Field
//! offsets are named `Range` constants, as in smoltcp's `wire` module.
//! Nothing here allocates, does I/O or keeps state.

pub mod checksum;
mod field;
pub mod icmp;
pub mod ip;
pub mod message;
pub mod tcp;
pub mod udp;
pub mod virtio;

pub use field::HeaderError;
pub use icmp::IcmpPacket;
pub use ip::{IpHeader, IpPacket};
pub use message::{MessageKind, WireMessage};
pub use tcp::TcpPacket;
pub use udp::UdpPacket;
pub use virtio::VirtioNetHdr;
