//! Parsing untrusted bytes: inner IP headers and WireGuard message framing.
//!
//! Every accessor here is total: a view is made only through a `new_checked`
//! that validates lengths first, after which no accessor can panic. Nothing
//! here allocates, does I/O or keeps state.

pub mod ip;
pub mod message;

pub use ip::IpHeader;
pub use message::{MessageKind, WireMessage};
