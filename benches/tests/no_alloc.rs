//! The steady-state data path allocates nothing per packet: a counting
//! global allocator watches encapsulate + decapsulate between two peers
//! with a session up, and the engine's `send_packet` on the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshvpn_benches::{buffers, ipv4_packet, PeerPair};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Only allocations made by a thread that armed the counter count, so
    /// the test harness and engine threads do not disturb the numbers.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.try_with(|a| a.get()).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.try_with(|a| a.get()).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `realloc` on the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn peer_encapsulate_and_decapsulate_allocate_nothing_per_packet() {
    let pair = PeerPair::established();
    for size in [64, 1420, 8192] {
        let packet = ipv4_packet(size);
        let (mut wire, mut inner) = buffers(size);
        // Warm up: first use of locks, thread-locals and the like.
        for _ in 0..100 {
            pair.round(&packet, &mut wire, &mut inner);
        }
        let n = allocations_in(|| {
            for _ in 0..10_000 {
                assert_eq!(pair.round(&packet, &mut wire, &mut inner), size);
            }
        });
        assert_eq!(n, 0, "{n} allocations for 10,000 packets of {size} bytes");
    }
    // The counter works: a Vec allocates.
    assert_eq!(
        allocations_in(|| drop(std::hint::black_box(vec![1u8; 10]))),
        1
    );
}

#[test]
fn engine_send_packet_allocates_nothing_on_the_callers_thread() {
    let [(a, _), (b, _)] = meshvpn_benches::engine_pair();
    let packet = ipv4_packet(1420);
    a.send_packet(&packet).unwrap();
    assert!(b.recv_packet(Duration::from_secs(5)).is_some());
    for _ in 0..100 {
        a.send_packet(&packet).unwrap();
    }
    let n = allocations_in(|| {
        for _ in 0..1000 {
            a.send_packet(&packet).unwrap();
        }
    });
    assert_eq!(n, 0, "{n} allocations for 1000 send_packet calls");
}

/// An IPv4 TCP segment (ACK) of `size` bytes with sequence number `seq`.
fn tcp_segment(seq: u32, size: usize) -> Vec<u8> {
    let mut p = ipv4_packet(size);
    p[6] = 0x40; // DF, not a fragment
    p[7] = 0;
    p[9] = 6;
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p
}

#[test]
fn tun_offload_split_and_coalesce_allocate_nothing() {
    use meshvpn_engine::io::offload::{split, Coalescer};
    use meshvpn_engine::wire::virtio::{VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4};
    const MSS: usize = 1380;
    let big = tcp_segment(1, 40 + 46 * MSS);
    let hdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut out = vec![0u8; 128 * 1024];
    let mut co = Coalescer::default();
    let round = |out: &mut [u8], co: &mut Coalescer| {
        let mut spans = [(0usize, 0usize); 64];
        let mut n = 0;
        split(&hdr, &big, out, |r| {
            spans[n] = (r.start, r.end);
            n += 1;
        })
        .unwrap();
        for &(s, e) in &spans[..n] {
            assert!(co.push(&out[s..e]));
        }
        let mut writes = (0, 0);
        co.drain(|bytes, segments| writes = (bytes.len(), segments));
        assert_eq!(writes, (10 + big.len(), 46), "one aggregate of all 46");
    };
    for _ in 0..10 {
        round(&mut out, &mut co);
    }
    let n = allocations_in(|| {
        for _ in 0..1000 {
            round(&mut out, &mut co);
        }
    });
    assert_eq!(n, 0, "{n} allocations for 1000 split + coalesce rounds");
}
