//! A ceiling on the bytes of packets the engine holds in queues (packets
//! waiting behind a handshake, decrypted packets waiting for the host):
//! past it new packets are dropped and counted, so a peer that never
//! answers or a host that never reads cannot grow the process without
//! bound.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// The ceiling a new engine starts with.
pub const DEFAULT_BUFFER_LIMIT: usize = 32 << 20;

#[derive(Debug)]
pub struct BufferBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
    drops: AtomicU64,
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget::new(DEFAULT_BUFFER_LIMIT)
    }
}

impl BufferBudget {
    pub fn new(limit: usize) -> BufferBudget {
        BufferBudget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
            drops: AtomicU64::new(0),
        }
    }

    /// Reserves `bytes`; false (and a drop counted) when that would pass
    /// the ceiling.
    pub fn try_take(&self, bytes: usize) -> bool {
        let limit = self.limit.load(Relaxed);
        let ok = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= limit)
            })
            .is_ok();
        if !ok {
            self.drops.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Reserves `bytes` even past the ceiling, for the few that must be
    /// queued whatever else is (a protocol answer); later
    /// [`BufferBudget::try_take`]s see them.
    pub fn take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Relaxed);
    }

    /// Returns bytes reserved by [`BufferBudget::try_take`] or [`BufferBudget::take`].
    pub fn give_back(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(bytes)));
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Packets dropped because the ceiling was reached.
    pub fn drops(&self) -> u64 {
        self.drops.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_up_to_the_limit_and_counts_refusals() {
        let b = BufferBudget::new(1000);
        assert!(b.try_take(600));
        assert!(!b.try_take(500));
        assert_eq!(b.drops(), 1);
        assert!(b.try_take(400));
        assert_eq!(b.used(), 1000);
        b.give_back(600);
        assert!(b.try_take(500));
        b.set_limit(0);
        assert!(!b.try_take(1));
        b.give_back(usize::MAX);
        assert_eq!(b.used(), 0);
        assert_eq!(b.drops(), 2);
        // Past the ceiling when it must; try_take then sees it.
        b.set_limit(100);
        b.take(150);
        assert_eq!(b.used(), 150);
        assert!(!b.try_take(1));
        b.give_back(150);
        assert!(b.try_take(100));
    }
}
