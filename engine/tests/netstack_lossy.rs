//! TCP through the userspace stack across a link that drops 5% of the
//! encrypted datagrams, duplicates and reorders others: the streams arrive
//! intact.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::lossy_relay::{LinkProfile, LossyRelay};
use common::stacks::{bulk_bytes, stack_mesh, transfer_both_ways};
use meshvpn_engine::NetstackConfig;

#[test]
fn bulk_transfer_across_a_lossy_reordering_link_arrives_intact() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let relay = LossyRelay::between(
        &a.node.engine,
        a.node.key.public_key(),
        &b.node.engine,
        b.node.key.public_key(),
        LinkProfile {
            drop: env_f("LOSSY_DROP", 0.05),
            duplicate: env_f("LOSSY_DUP", 0.02),
            reorder: env_f("LOSSY_REORDER", 0.02),
            seed: 0x5EED_0001,
        },
    );
    let bytes = bulk_bytes();
    let t = Instant::now();
    transfer_both_ways(a, b, false, bytes, Duration::from_secs(240));
    let s = &relay.stats;
    eprintln!(
        "{} MiB each way in {:.1} s; relay forwarded {} dropped {} duplicated {} reordered {}",
        bytes >> 20,
        t.elapsed().as_secs_f64(),
        s.forwarded.load(Relaxed),
        s.dropped.load(Relaxed),
        s.duplicated.load(Relaxed),
        s.reordered.load(Relaxed)
    );
    // The link really was bad.
    assert!(s.dropped.load(Relaxed) > 0);
    assert!(s.duplicated.load(Relaxed) > 0);
    assert!(s.reordered.load(Relaxed) > 0);
}

fn env_f(k: &str, d: f64) -> f64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}
