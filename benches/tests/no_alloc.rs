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
