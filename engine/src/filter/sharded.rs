//! The filter as the data path holds it: one [`Filter`] per shard, each
//! behind its own lock, so receive threads and senders working on
//! different flows do not queue on one table lock.
//!
//! A packet is parsed once, outside any lock; its flow key (the same for
//! both directions of a flow) picks the shard through a hash keyed per
//! filter, so both directions of a flow meet in one shard and a peer
//! cannot aim its flows at one shard without knowing the key. Each shard
//! holds a [`FILTER_SHARDS`]th of the table's capacity and of each
//! source's share (per shard, a source still holds at most a sixteenth of
//! the shard's entries by default: the same ratio as one table, so
//! sixteen colluding peers are needed to fill a shard).
//!
//! Without rules the data path does not call in at all
//! ([`ShardedFilter::is_active`] is one atomic load): no lock, no parse.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::{
    parse, ConntrackLimits, FastRules, Filter, FilterDrop, FilterRules, FilterStats, Verdict,
};
use crate::filter::Direction;

/// Shards of the tracking table (a power of two). Sixteen keeps the chance
/// that two of a handful of busy threads meet on one lock small.
pub const FILTER_SHARDS: usize = 16;

pub struct ShardedFilter {
    active: AtomicBool,
    shards: Box<[Mutex<Filter>]>,
    seed: u64,
    limits: ConntrackLimits,
}

impl ShardedFilter {
    /// An inactive filter (allow all) whose whole table holds `limits`;
    /// `seed` keys the shard hash (pass a random value).
    pub fn new(limits: ConntrackLimits, seed: u64) -> ShardedFilter {
        let per_shard = ConntrackLimits {
            capacity: limits.capacity.div_ceil(FILTER_SHARDS),
            per_source: limits.per_source.div_ceil(FILTER_SHARDS),
        };
        ShardedFilter {
            active: AtomicBool::new(false),
            shards: (0..FILTER_SHARDS)
                .map(|_| Mutex::new(Filter::new(per_shard)))
                .collect(),
            seed: seed | 1,
            limits,
        }
    }

    /// The bounds of the whole table.
    pub fn limits(&self) -> ConntrackLimits {
        self.limits
    }

    /// True when rules are installed: only then must packets be checked.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Installs a rule set (`None`: allow all, and the table is cleared).
    /// The rules are compiled once and shared by the shards; each shard
    /// switches under its lock, so every packet is judged by one rule set
    /// or the other, whole.
    pub fn set_rules(&self, rules: Option<Arc<FilterRules>>) {
        let fast = rules.as_deref().map(|r| Arc::new(FastRules::new(r)));
        if rules.is_none() {
            self.active.store(false, Ordering::Release);
        }
        for s in self.shards.iter() {
            s.lock().set_compiled(rules.clone(), fast.clone());
        }
        if rules.is_some() {
            self.active.store(true, Ordering::Release);
        }
    }

    pub fn rules(&self) -> Option<Arc<FilterRules>> {
        self.shards[0].lock().rules().cloned()
    }

    /// Judges one packet (see [`Filter::check`]); `source` names the peer
    /// it comes from or goes to.
    pub fn check(&self, dir: Direction, packet: &[u8], source: u64, now: Instant) -> Verdict {
        let p = match parse(packet) {
            Ok(p) => p,
            Err(r) => {
                self.shards[0].lock().drops[r as usize] += 1;
                return Verdict::Drop(r);
            }
        };
        let k = p.key(dir);
        // A keyed multiply-fold over the flow key: the high bits pick the
        // shard. Symmetric by construction (the key names local and remote
        // ends, not source and destination).
        let mut h = self.seed;
        for w in [
            k.local as u64,
            (k.local >> 64) as u64,
            k.remote as u64,
            (k.remote >> 64) as u64,
            u64::from(k.local_port) << 24 | u64::from(k.remote_port) << 8 | u64::from(k.proto),
        ] {
            h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        let shard = (h >> 32) as usize & (FILTER_SHARDS - 1);
        self.shards[shard].lock().check_parsed(dir, &p, source, now)
    }

    /// Removes expired flows from every shard; returns how many went.
    pub fn expire(&self, now: Instant) -> usize {
        self.shards.iter().map(|s| s.lock().expire(now)).sum()
    }

    /// The counters of every shard, summed.
    pub fn stats(&self) -> FilterStats {
        let mut t = FilterStats::default();
        for s in self.shards.iter() {
            let s = s.lock().stats();
            t.accepted_tracked += s.accepted_tracked;
            t.accepted_new += s.accepted_new;
            t.accepted_untracked += s.accepted_untracked;
            t.flows += s.flows;
        }
        t
    }

    /// Drops for each reason, summed over the shards (indexed as
    /// [`FilterDrop::ALL`]).
    pub fn drops(&self) -> [u64; FilterDrop::ALL.len()] {
        let mut t = [0u64; FilterDrop::ALL.len()];
        for s in self.shards.iter() {
            let s = s.lock();
            for (a, b) in t.iter_mut().zip(s.drops.iter()) {
                *a += b;
            }
        }
        t
    }
}
