//! Encapsulate + decapsulate through two `Peer`s (boringtun plus our peer
//! layer), next to the raw bound: ring's ChaCha20-Poly1305 seal + open of
//! the same bytes. Prints peer/raw throughput ratios at the end.

use criterion::{criterion_group, Criterion, Throughput};
use meshvpn_benches::{buffers, ipv4_packet, median_ns, PeerPair};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const SIZES: [usize; 4] = [64, 512, 1420, 8192];
const GROUP: &str = "encap_decap";

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group(GROUP);
    let pair = PeerPair::established();
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let packet = ipv4_packet(size);
        let (mut wire, mut inner) = buffers(size);
        g.bench_function(format!("peer/{size}"), |b| {
            b.iter(|| pair.round(std::hint::black_box(&packet), &mut wire, &mut inner))
        });
        let mut buf = packet.clone();
        buf.extend_from_slice(&[0u8; 16]);
        let mut counter = 0u64;
        g.bench_function(format!("ring_aead/{size}"), |b| {
            b.iter(|| {
                counter += 1;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&counter.to_le_bytes());
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::empty(),
                        &mut buf[..size],
                    )
                    .unwrap();
                buf[size..].copy_from_slice(tag.as_ref());
                let out = key
                    .open_in_place(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf)
                    .unwrap();
                std::hint::black_box(out.len())
            })
        });
    }
    g.finish();
}

fn report() {
    println!("\nencap+decap vs raw AEAD seal+open (median; ratio = raw time / peer time):");
    for size in SIZES {
        let (Some(p), Some(r)) = (
            median_ns(GROUP, &format!("peer_{size}")),
            median_ns(GROUP, &format!("ring_aead_{size}")),
        ) else {
            continue;
        };
        let gbps = |ns: f64| size as f64 * 8.0 / ns;
        println!(
            "  {size:>5} B: peer {p:>9.0} ns ({:.2} Gbit/s), raw {r:>9.0} ns ({:.2} Gbit/s), ratio {:.2}",
            gbps(p),
            gbps(r),
            r / p
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report();
}
