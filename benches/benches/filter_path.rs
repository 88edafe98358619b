//! Single-flow throughput through the device core's data path (the part of
//! the engine every packet takes: route, outbound filter, encrypt; then
//! framing, decrypt, source check, inbound filter) with no filter and with
//! a 100-rule filter on both ends. Two `Device`s in one thread, no
//! sockets: the figure is the CPU cost per packet, which is what the
//! filter adds to (loopback UDP would bury it in noise on a shared
//! machine). Prints the filter's cost as a share of the unfiltered path.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use meshvpn_benches::median_ns;
use meshvpn_engine::device::{Device, DeviceIo, Encapsulated, Endpoint, PeerUpdate, Received};
use meshvpn_engine::filter::{
    default_icmp_types, ByteSet, ConntrackLimits, Direction, Filter, FilterRules, PortRange, Rule,
    ShardedFilter,
};
use meshvpn_engine::peer::{output_buffer_len, BufferBudget};
use meshvpn_engine::{IpPrefix, PrivateKey};

const GROUP: &str = "filter_path";
const RULES: usize = 100;
const SIZE: usize = 1420;

const A_IP: [u8; 4] = [100, 64, 1, 100]; // the last rule's source
const B_IP: [u8; 4] = [100, 64, 0, 1];

fn p(s: String) -> IpPrefix {
    s.parse().unwrap()
}

/// 100 rules as a policy compiles them, the flow's own rule last (every
/// rule is scanned when a flow starts).
fn rules(inbound: bool) -> Arc<FilterRules> {
    let list = (0..RULES)
        .map(|i| Rule {
            srcs: vec![
                p(format!("100.64.1.{}/32", i + 1)),
                p(format!("10.43.{i}.0/24")),
            ],
            dsts: vec![
                (p("100.64.0.1/32".into()), PortRange::single(22)),
                (p("10.42.1.0/24".into()), PortRange::new(8000, 8099)),
                (p("100.64.0.1/32".into()), PortRange::single(443)),
            ],
            protos: ByteSet::of(&[6, 17]),
            icmp_types: default_icmp_types(),
        })
        .collect::<Vec<_>>();
    // A rule names the direction a flow starts in: the sender A checks
    // the list as its outbound rules, the receiver B as its inbound ones.
    Arc::new(if inbound {
        FilterRules {
            inbound: list,
            outbound: vec![],
        }
    } else {
        FilterRules {
            inbound: vec![],
            outbound: list,
        }
    })
}

/// An established TCP segment (ACK) of 1420 bytes, A -> B:443.
fn segment() -> Vec<u8> {
    let mut p = vec![0u8; SIZE];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(SIZE as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&A_IP);
    p[16..20].copy_from_slice(&B_IP);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&443u16.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p
}

#[derive(Default)]
struct Outbox(Vec<Vec<u8>>);

impl DeviceIo for Outbox {
    fn send(&mut self, datagram: &[u8], _to: &Endpoint) {
        self.0.push(datagram.to_vec());
    }
}

struct Pair {
    a: Device,
    b: Device,
    from_a: Endpoint,
}

impl Pair {
    fn established() -> Pair {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let addr_a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let addr_b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let a = Device::new(Some(ka.clone()), 1500, Arc::new(BufferBudget::default()));
        let b = Device::new(Some(kb.clone()), 1500, Arc::new(BufferBudget::default()));
        let peer = |endpoint, ip: [u8; 4]| PeerUpdate {
            preshared_key: Some(None),
            endpoint: Some(endpoint),
            persistent_keepalive: Some(None),
            replace_allowed_ips: true,
            allowed_ips: vec![p(format!("{}.{}.{}.{}/32", ip[0], ip[1], ip[2], ip[3]))],
        };
        a.update_peer(&kb.public_key(), &peer(addr_b, B_IP), true)
            .unwrap();
        b.update_peer(&ka.public_key(), &peer(addr_a, A_IP), true)
            .unwrap();
        let (from_a, from_b) = (Endpoint::Udp(addr_a), Endpoint::Udp(addr_b));
        let now = Instant::now();
        let mut out = vec![0u8; output_buffer_len(65535)];
        let mut io = Outbox::default();
        a.initiate_handshake(now, &kb.public_key(), &mut out, &mut io)
            .unwrap();
        // Ping-pong until nobody has anything to say.
        let mut to_b = std::mem::take(&mut io.0);
        for _ in 0..8 {
            let mut to_a = Outbox::default();
            for d in to_b.drain(..) {
                b.handle_datagram(now, from_a, &d, &mut out, &mut to_a);
            }
            let mut back = Outbox::default();
            for d in to_a.0 {
                a.handle_datagram(now, from_b, &d, &mut out, &mut back);
            }
            to_b = back.0;
        }
        Pair { a, b, from_a }
    }

    /// One packet A -> B through both devices; the decrypted length.
    #[inline]
    fn round(&self, now: Instant, packet: &[u8], wire: &mut [u8], inner: &mut [u8]) -> usize {
        let Ok(Encapsulated::Datagram { len, .. }) = self.a.encapsulate(now, packet, wire) else {
            panic!("encapsulate failed");
        };
        let mut io = Outbox::default();
        match self
            .b
            .handle_datagram(now, self.from_a, &wire[..len], inner, &mut io)
        {
            Received::Packet { len, .. } => len,
            _ => panic!("not delivered"),
        }
    }
}

/// The two pairs of the comparison, each with its flow started.
fn pairs(packet: &[u8], wire: &mut [u8], inner: &mut [u8]) -> [(&'static str, Pair); 2] {
    ["no_filter", "rules_100"].map(|id| {
        let pair = Pair::established();
        let filtered = id == "rules_100";
        if filtered {
            pair.a.set_filter(Some(rules(false)));
            pair.b.set_filter(Some(rules(true)));
        }
        // The flow starts (and is tracked on both ends) before timing.
        assert_eq!(pair.round(Instant::now(), packet, wire, inner), SIZE);
        if filtered {
            assert_eq!(pair.a.filter_stats().0.flows, 1);
            assert_eq!(pair.b.filter_stats().0.flows, 1);
        }
        (id, pair)
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group(GROUP);
    g.throughput(Throughput::Bytes(SIZE as u64));
    let packet = segment();
    let mut wire = vec![0u8; output_buffer_len(SIZE)];
    let mut inner = vec![0u8; output_buffer_len(SIZE)];
    for (id, pair) in pairs(&packet, &mut wire, &mut inner) {
        g.bench_function(id, |bench| {
            bench.iter(|| {
                // One clock read per packet, as the device's callers do
                // per batch at most.
                let now = Instant::now();
                pair.round(now, black_box(&packet), &mut wire, &mut inner)
            })
        });
    }
    g.finish();
}

/// Blocks of packets through each pair in turn, so that load from other
/// processes falls on both alike (the criterion runs above are minutes
/// apart on a shared machine). Returns the median ns per packet of each.
fn interleaved(blocks: usize, per_block: u32) -> [f64; 2] {
    let packet = segment();
    let mut wire = vec![0u8; output_buffer_len(SIZE)];
    let mut inner = vec![0u8; output_buffer_len(SIZE)];
    let pairs = pairs(&packet, &mut wire, &mut inner);
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..blocks {
        for (k, (_, pair)) in pairs.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..per_block {
                let now = Instant::now();
                black_box(pair.round(now, black_box(&packet), &mut wire, &mut inner));
            }
            times[k].push(t.elapsed().as_nanos() as f64 / f64::from(per_block));
        }
    }
    times.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    })
}

fn report() {
    if let (Some(open), Some(filtered)) =
        (median_ns(GROUP, "no_filter"), median_ns(GROUP, "rules_100"))
    {
        println!(
            "\ncriterion medians, single flow of {SIZE}-byte packets through two devices: \
             no filter {open:.0} ns, {RULES}-rule filter on both ends {filtered:.0} ns: {:+.2}%",
            100.0 * (filtered - open) / open,
        );
    }
    let [open, filtered] = interleaved(400, 2000);
    println!(
        "interleaved (400 blocks of 2000 packets each, median): no filter {open:.0} ns, \
         {RULES}-rule filter on both ends {filtered:.0} ns: {:+.2}% ({:.2} vs {:.2} Gbit/s)",
        100.0 * (filtered - open) / open,
        SIZE as f64 * 8.0 / open,
        SIZE as f64 * 8.0 / filtered,
    );
}

/// Receive threads on different flows: the data path's sharded table
/// against one table behind one lock (what a single `Mutex<Filter>`
/// would be). Each of `threads` threads checks `n` packets of its own
/// established flow; returns wall-clock ns per check, both ways.
fn contention(threads: usize, n: usize) -> (f64, f64) {
    let now = Instant::now();
    let flow = |t: usize, flags: u8| {
        let mut p = segment();
        p[20..22].copy_from_slice(&(41000 + t as u16).to_be_bytes());
        p[33] = flags;
        p
    };
    let sharded = ShardedFilter::new(ConntrackLimits::default(), 0x5eed);
    sharded.set_rules(Some(rules(true)));
    let one = Mutex::new(Filter::default());
    one.lock().unwrap().set_rules(Some(rules(true)));
    for t in 0..threads {
        let syn = flow(t, 0x02);
        assert!(sharded
            .check(Direction::Inbound, &syn, t as u64, now)
            .is_accept());
        assert!(one.lock().unwrap().inbound(&syn, t as u64, now).is_accept());
    }
    let run = |check: &(dyn Fn(&[u8], u64) -> bool + Sync)| {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let packet = flow(t, 0x10);
                s.spawn(move || {
                    for _ in 0..n {
                        assert!(check(black_box(&packet), t as u64));
                    }
                });
            }
        });
        t0.elapsed().as_nanos() as f64 / (threads * n) as f64
    };
    let a = run(&|p, src| sharded.check(Direction::Inbound, p, src, now).is_accept());
    let b = run(&|p, src| one.lock().unwrap().inbound(p, src, now).is_accept());
    (a, b)
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report();
    for threads in [1, 2, 4] {
        let (sharded, one) = contention(threads, 1_000_000);
        println!(
            "filter only, {threads} thread(s) on their own flows: sharded table {sharded:.1} ns \
             per check, one locked table {one:.1} ns per check"
        );
    }
}
