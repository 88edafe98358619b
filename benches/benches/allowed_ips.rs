//! AllowedIPs longest-prefix lookups with 10 and 10,000 IPv4 prefixes
//! (lengths /8 to /32 inside 10.0.0.0/8, as a mesh of nodes and pod
//! ranges looks), over a fixed set of 1024 addresses.

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshvpn_engine::router::{AllowedIps, IpPrefix};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

fn table(n: usize, rng: &mut Lcg) -> AllowedIps<u32> {
    let mut t = AllowedIps::new();
    let mut i = 0;
    while t.len() < n {
        let addr = Ipv4Addr::from(0x0a00_0000 | (rng.next() & 0x00ff_ffff));
        let len = 8 + (rng.next() % 25) as u8;
        t.insert(IpPrefix::new(IpAddr::V4(addr), len).unwrap(), i);
        i += 1;
    }
    t
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("allowed_ips_lookup");
    let mut rng = Lcg(42);
    let addrs: Vec<IpAddr> = (0..1024)
        .map(|_| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (rng.next() & 0x00ff_ffff))))
        .collect();
    for n in [10usize, 10_000] {
        let t = table(n, &mut rng);
        g.throughput(Throughput::Elements(addrs.len() as u64));
        g.bench_function(format!("{n}_prefixes"), |b| {
            b.iter(|| {
                let mut hits = 0u32;
                for a in &addrs {
                    hits += t.lookup(std::hint::black_box(*a)).is_some() as u32;
                }
                hits
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
