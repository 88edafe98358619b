//! Cryptokey routing: AllowedIPs as a longest-prefix-match table, IPv4 and
//! IPv6, mapping an inner address to the peer that owns it.
//!
//! Used in both directions: on send, the destination picks the peer; on
//! receive, the decrypted packet's source must map back to the peer that sent
//! it. This layer knows nothing of sockets, threads or peers' internals: the
//! value stored per prefix is the caller's (a peer id).

mod prefix;
mod trie;

pub use prefix::{IpPrefix, PrefixError};
pub use trie::AllowedIps;
