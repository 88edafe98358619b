//! Two peers over the in-memory lossy link (tests/common/link.rs): loss,
//! duplication, delay, reordering and a partition. Whatever the link does,
//! every packet that comes out is one that went in, unchanged, at most
//! once; duplicates are caught by the replay window and counted; traffic
//! resumes when the partition heals. Seeded: a failure prints the seed,
//! and `MESHVPN_LINK_SEED=<seed>` replays it.

mod common;

use std::collections::HashMap;

use common::link::{seed, Impairments, Pair, Side};
use meshvpn_engine::peer::DropReason;

fn numbered(n: u32) -> Vec<u8> {
    let len = 24 + (n as usize * 37) % 1300;
    let mut p = vec![(n % 251) as u8; len];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p[20..24].copy_from_slice(&n.to_be_bytes());
    p
}

#[test]
fn lossy_reordering_duplicating_partitioned_link_delivers_only_what_was_sent_once() {
    let seed = seed(0x5eed_0001);
    let mut pair = Pair::new(seed, Impairments::CLEAN);
    assert!(pair.establish(10), "handshake on a clean link");
    let handshake_datagrams = pair.link.stats.delivered;
    pair.link.impairments = Impairments {
        loss: 100,
        duplicate: 100,
        reorder: 200,
        reorder_ticks: 20,
        delay_ticks: 2,
    };
    let mut sent: HashMap<u32, Vec<u8>> = HashMap::new();
    for n in 0..3000u32 {
        // A partition from packet 1000 to 1500.
        pair.link.set_partitioned((1000..1500).contains(&n));
        let p = numbered(n);
        pair.send(Side::A, &p);
        sent.insert(n, p);
        pair.step();
    }
    pair.link.set_partitioned(false);
    pair.settle(100);
    let mut seen = HashMap::new();
    for p in &pair.received_b {
        let n = u32::from_be_bytes(p[20..24].try_into().unwrap());
        assert_eq!(
            sent.get(&n),
            Some(p),
            "seed {seed}: packet {n} altered or invented"
        );
        assert!(
            seen.insert(n, ()).is_none(),
            "seed {seed}: packet {n} twice"
        );
    }
    let got = pair.received_b.len() as u64;
    let stats = pair.b.stats();
    let link = pair.link.stats;
    eprintln!(
        "seed {seed}: link {link:?}, delivered {got}, b drops {:?}",
        stats.drops
    );
    assert!(
        pair.received_b
            .iter()
            .any(|p| p[20..24] >= 1500u32.to_be_bytes()[..]),
        "seed {seed}: nothing after the partition healed"
    );
    assert!(!pair.received_b.iter().any(|p| {
        let n = u32::from_be_bytes(p[20..24].try_into().unwrap());
        (1000..1500).contains(&n)
    }));
    assert_eq!(stats.rx_packets, got);
    // Every datagram that arrived was either delivered or dropped as a
    // replay (duplicates), or was out of the window; nothing else.
    let dropped = stats.total_drops();
    assert_eq!(
        dropped,
        stats.drops(DropReason::Replay),
        "seed {seed}: {:?}",
        stats.drops
    );
    assert_eq!(
        got + dropped,
        link.delivered - handshake_datagrams,
        "seed {seed}"
    );
}
