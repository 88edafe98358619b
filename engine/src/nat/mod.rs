//! NAT traversal logic, sans-IO: STUN discovery of this node's
//! server-reflexive address ([`Discovery`]), and the per-source limit of a
//! STUN server ([`SourceLimiter`]). Nothing here opens a socket or reads a
//! clock: callers pass `now` and datagrams in and send what comes out. The
//! wire format is `crate::wire::stun`; the server's socket loop is
//! `crate::wg::stun`. See engine/docs/nat.md.

mod discovery;
mod limit;

pub use discovery::{
    random_transaction_id, Discovered, Discovery, DiscoveryConfig, DiscoveryStats, Dropped,
    Mapping, Output, MAX_SERVERS, REQUEST_LEN, STUN_FINAL_WAIT_FACTOR, STUN_MAX_TRANSMITS,
    STUN_RTO,
};
pub use limit::{
    SourceLimiter, Verdict, DEFAULT_STUN_PER_SOURCE, DEFAULT_STUN_TOTAL, STUN_MAX_SOURCES,
};
