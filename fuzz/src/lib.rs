//! Shared pieces of the fuzz targets: fixed keys, so every input reaches
//! the same protocol state, and the independent reference initiator that
//! the engine's tests use too (one file, included here by path).

#[path = "../../engine/tests/common/initiator.rs"]
pub mod initiator;

use std::sync::Arc;

use boringtun::noise::rate_limiter::RateLimiter;
use meshvpn_engine::peer::Peer;
use meshvpn_engine::{PeerConfig, PrivateKey};

/// A fixed private key: the `n`th of a small deterministic set.
pub fn key(n: u8) -> PrivateKey {
    let mut b = [n; 32];
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    PrivateKey::from_bytes(b)
}

/// A rate limiter that never asks for cookies, or always does (`limit` 0).
pub fn limiter(own: &PrivateKey, limit: u64) -> Arc<RateLimiter> {
    let public = boringtun::x25519::PublicKey::from(*own.public_key().as_bytes());
    Arc::new(RateLimiter::new(&public, limit))
}

/// `own`'s view of the peer `other`, reachable at `endpoint`.
pub fn peer(own: &PrivateKey, other: &PrivateKey, index: u32, limit: u64) -> Peer {
    let mut cfg = PeerConfig::new(other.public_key());
    cfg.endpoint = Some("192.0.2.1:51820".parse().unwrap());
    Peer::new(own, &cfg, index, limiter(own, limit))
}

/// A minimal IPv4 packet of `len` bytes (at least 20) from `src` to
/// 10.0.0.2, its payload filled from `seed`.
pub fn ipv4_packet(src: [u8; 4], len: usize, seed: u32) -> Vec<u8> {
    let len = len.clamp(20, 65535);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = (seed as usize).wrapping_add(i.wrapping_mul(31)) as u8;
    }
    p
}
