//! TCP throughput through the userspace stack: two engines in this process
//! over real loopback UDP (WireGuard encryption included), one connection,
//! a writer thread on one side and a reader on the other.
//!
//! `cargo bench -p meshvpn-benches --bench netstack_tcp`; criterion reports
//! bytes/s, and each sample also prints Gbit/s.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshvpn_benches::engine_pair;
use meshvpn_engine::{Netstack, NetstackConfig};

/// Bytes moved per iteration.
const CHUNK: u64 = 64 << 20;

fn tcp_throughput(c: &mut Criterion) {
    let [(ea, _), (eb, addr_b)] = engine_pair();
    let a = Netstack::attach(&ea, NetstackConfig::default()).expect("stack a");
    let b = Netstack::attach(&eb, NetstackConfig::default()).expect("stack b");
    let remote = SocketAddr::new(addr_b, 5201);
    let listener = b.tcp_listen(remote, 1).expect("listen");
    let tx = a
        .tcp_connect(remote, Some(Duration::from_secs(10)))
        .expect("connect");
    let (rx, _) = listener
        .accept_timeout(Some(Duration::from_secs(10)))
        .expect("accept");
    tx.set_write_timeout(Some(Duration::from_secs(30)));
    rx.set_read_timeout(Some(Duration::from_secs(30)));

    let mut group = c.benchmark_group("netstack");
    group.throughput(Throughput::Bytes(CHUNK));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("tcp_one_stream_loopback", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let buf = vec![0x5Au8; 256 << 10];
                        let mut left = CHUNK;
                        while left > 0 {
                            let n = left.min(buf.len() as u64) as usize;
                            (&tx).write_all(&buf[..n]).expect("write");
                            left -= n as u64;
                        }
                    });
                    let mut buf = vec![0u8; 256 << 10];
                    let mut got = 0u64;
                    while got < CHUNK {
                        let n = (&rx).read(&mut buf).expect("read");
                        assert!(n > 0, "stream ended early");
                        got += n as u64;
                    }
                });
                let dt = t.elapsed();
                eprintln!(
                    "  {} MiB in {:.3} s = {:.2} Gbit/s",
                    CHUNK >> 20,
                    dt.as_secs_f64(),
                    (CHUNK * 8) as f64 / dt.as_secs_f64() / 1e9
                );
                total += dt;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, tcp_throughput);
criterion_main!(benches);
