//! Per-packet cost of the packet filter with a 100-rule policy: a packet
//! of an established (tracked) flow, a new flow accepted by the last rule
//! (every rule scanned, one table insert), a new flow no rule accepts (a
//! flood's cost) and no rules at all. Prints each next to the per-packet
//! time of the single-flow data path (`encap_decap/peer/1420` of the
//! data_path bench, when it has run) as a share of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use meshvpn_benches::median_ns;
use meshvpn_engine::filter::{
    default_icmp_types, ByteSet, ConntrackLimits, Filter, FilterRules, PortRange, Rule,
};
use meshvpn_engine::IpPrefix;

const GROUP: &str = "filter";
const RULES: usize = 100;

/// 100 accept rules as a policy compiles them for one node: each from one
/// peer's address and a pod /24 to this node's address and pod /24, on a
/// few port ranges.
fn rules() -> Arc<FilterRules> {
    let p = |s: String| s.parse::<IpPrefix>().unwrap();
    let inbound = (0..RULES)
        .map(|i| Rule {
            srcs: vec![
                p(format!("100.64.1.{}/32", i + 1)),
                p(format!("10.43.{i}.0/24")),
            ],
            dsts: vec![
                (p("100.64.0.1/32".into()), PortRange::single(22)),
                (p("10.42.1.0/24".into()), PortRange::new(8000, 8099)),
                (p("10.42.1.0/24".into()), PortRange::single(443)),
            ],
            protos: ByteSet::of(&[6, 17]),
            icmp_types: default_icmp_types(),
        })
        .collect();
    Arc::new(FilterRules {
        inbound,
        outbound: vec![Rule::allow_all()],
    })
}

/// A 1420-byte TCP segment, as the data_path bench's size.
fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 1420];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1420u16.to_be_bytes());
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p
}

const PEER: [u8; 4] = [100, 64, 1, 100]; // the last rule's source
const POD: [u8; 4] = [10, 42, 1, 7];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group(GROUP);
    let now = Instant::now();

    let mut f = Filter::default();
    f.set_rules(Some(rules()));
    let first = tcp(PEER, 40000, POD, 443, 0x02);
    assert!(f.inbound(&first, 1, now).is_accept());
    let next = tcp(PEER, 40000, POD, 443, 0x10);
    g.bench_function("established", |b| {
        b.iter(|| f.inbound(std::hint::black_box(&next), 1, now))
    });

    // New flows: a fresh table every 50,000 (its growth included).
    g.bench_function("new_flow", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            let mut pkt = tcp(PEER, 0, POD, 8050, 0x02);
            while left > 0 {
                let n = left.min(50_000);
                let mut f = Filter::new(ConntrackLimits {
                    capacity: 65_536,
                    per_source: 65_536,
                });
                f.set_rules(Some(rules()));
                let t = Instant::now();
                for i in 0..n {
                    pkt[20..22].copy_from_slice(&(i as u16).to_be_bytes());
                    assert!(f.inbound(std::hint::black_box(&pkt), 1, now).is_accept());
                }
                total += t.elapsed();
                left -= n;
            }
            total
        })
    });

    let denied = tcp([100, 64, 9, 9], 40000, POD, 443, 0x02);
    g.bench_function("denied", |b| {
        b.iter(|| f.inbound(std::hint::black_box(&denied), 1, now))
    });

    let mut open = Filter::default();
    g.bench_function("no_rules", |b| {
        b.iter(|| open.inbound(std::hint::black_box(&next), 1, now))
    });
    g.finish();
}

fn report() {
    let path = median_ns("encap_decap", "peer_1420");
    println!("\nfilter per packet with {RULES} rules (median), against the single-flow data path:");
    match path {
        Some(p) => println!("  encap+decap of a 1420-byte packet: {p:.0} ns"),
        None => println!(
            "  (run `cargo bench -p meshvpn-benches --bench data_path` for the comparison)"
        ),
    }
    for id in ["established", "new_flow", "denied", "no_rules"] {
        if let Some(ns) = median_ns(GROUP, id) {
            match path {
                Some(p) => println!(
                    "  {id:>12}: {ns:>7.1} ns = {:.2}% of the data path",
                    100.0 * ns / p
                ),
                None => println!("  {id:>12}: {ns:>7.1} ns"),
            }
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report();
}
