//! Two engines in one process over loopback UDP, through the packet API:
//! `send_packet` on one, `recv_packet` on the other, in bursts of 64
//! packets of 1420 bytes (the default inner MTU).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshvpn_benches::engine_pair;

const BURST: usize = 64;
const SIZE: usize = 1420;

fn bench(c: &mut Criterion) {
    let [(a, _), (b, _)] = engine_pair();
    let packet = meshvpn_benches::ipv4_packet(SIZE);
    a.send_packet(&packet).unwrap();
    assert!(
        b.recv_packet(Duration::from_secs(5)).is_some(),
        "no handshake"
    );
    let mut g = c.benchmark_group("two_engines_loopback");
    g.throughput(Throughput::Bytes((BURST * SIZE) as u64));
    let mut lost = 0u64;
    g.bench_function(format!("burst{BURST}x{SIZE}"), |bench| {
        bench.iter(|| {
            for _ in 0..BURST {
                a.send_packet(&packet).unwrap();
            }
            for _ in 0..BURST {
                if b.recv_packet(Duration::from_millis(200)).is_none() {
                    lost += 1;
                    break;
                }
            }
        })
    });
    g.finish();
    if lost > 0 {
        println!("two_engines_loopback: {lost} bursts lost packets (loopback UDP overflow)");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
