//! The bounded connection-tracking table of the packet filter.
//!
//! Limits: at most [`ConntrackLimits::capacity`] flows, and at most
//! [`ConntrackLimits::per_source`] of them keyed to one source (the peer
//! the caller names, not an address: a peer that routes a /16 could
//! otherwise spread a flood over 65536 addresses).
//!
//! Eviction policy: a live flow is never evicted to make room for a new
//! one. When the table (or a source's share) is full, expired entries are
//! swept (at most once per [`SWEEP_INTERVAL`] of the caller's clock, so a
//! flood cannot make every packet pay for a full sweep) and, if there is
//! still no room, the new flow is dropped and counted. This is what the
//! Linux conntrack does when its table is full and early drop finds
//! nothing ("nf_conntrack: table full, dropping packet"); established
//! connections outlive a flood of new ones, and the flood's own entries,
//! never replied to, expire after the short unreplied timeouts below.
//!
//! Expiry uses only the `now` the caller passes: no clock reads.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// Flows tracked at once, by default (about 90 bytes each with the hash
/// table's overhead: 6 MiB full).
pub const DEFAULT_CONNTRACK_CAPACITY: usize = 65_536;
/// Flows one source may hold at once, by default: a sixteenth of the
/// table, so sixteen colluding peers are needed to fill it.
pub const DEFAULT_CONNTRACK_PER_SOURCE: usize = 4_096;

// Timeouts after the last packet of a flow, after the Linux conntrack
// defaults (nf_conntrack_tcp_timeout_*, nf_conntrack_udp_timeout*,
// nf_conntrack_icmp_timeout).
/// A TCP flow not yet answered (Linux: syn_recv 60 s).
pub const TCP_UNREPLIED_TIMEOUT: Duration = Duration::from_secs(60);
/// A TCP flow answered both ways (Linux: established, 5 days).
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(5 * 24 * 3600);
/// A TCP flow after a FIN or RST (Linux: time_wait, 120 s).
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(120);
/// A UDP flow not yet answered (Linux: udp_timeout, 30 s).
pub const UDP_UNREPLIED_TIMEOUT: Duration = Duration::from_secs(30);
/// A UDP flow answered (Linux: udp_timeout_stream, 120 s).
pub const UDP_REPLIED_TIMEOUT: Duration = Duration::from_secs(120);
/// An ICMP echo exchange (Linux: icmp_timeout, 30 s).
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time between two sweeps of expired entries forced by a full
/// table.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The table's bounds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackLimits {
    pub capacity: usize,
    pub per_source: usize,
}

impl Default for ConntrackLimits {
    fn default() -> Self {
        ConntrackLimits {
            capacity: DEFAULT_CONNTRACK_CAPACITY,
            per_source: DEFAULT_CONNTRACK_PER_SOURCE,
        }
    }
}

/// A flow as seen from this node: local and remote ends, whatever the
/// direction of the packet, so both directions find one entry. For an ICMP
/// echo both ports hold the identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowKey {
    /// Addresses IPv4-mapped (see `rules::mapped`).
    pub local: u128,
    pub remote: u128,
    pub local_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub v4: bool,
}

impl Hash for FlowKey {
    /// Three word writes: SipHash (std's `RandomState`, kept for its
    /// resistance to chosen-collision floods) pays per write and per block.
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u128(self.local);
        h.write_u128(self.remote);
        h.write_u64(
            (self.local_port as u64) << 32
                | (self.remote_port as u64) << 16
                | (self.proto as u64) << 8
                | self.v4 as u64,
        );
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub source: u64,
    pub expires: Instant,
    /// The host started the flow (else a peer did).
    pub local_initiated: bool,
    pub replied: bool,
    pub closing: bool,
}

/// Why an allowed new flow got no entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Full,
    SourceShare,
}

pub(crate) struct Conntrack {
    map: HashMap<FlowKey, Entry>,
    per_source: HashMap<u64, u32>,
    limits: ConntrackLimits,
    next_sweep: Option<Instant>,
}

impl Conntrack {
    pub fn new(limits: ConntrackLimits) -> Conntrack {
        Conntrack {
            map: HashMap::new(),
            per_source: HashMap::new(),
            limits,
            next_sweep: None,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn limits(&self) -> ConntrackLimits {
        self.limits
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.per_source.clear();
    }

    /// The live entry of `key`; an expired one is removed on the way.
    #[inline]
    pub fn get(&mut self, key: &FlowKey, now: Instant) -> Option<&mut Entry> {
        // One hash, hit or miss (`entry` rather than a get and a get_mut).
        match self.map.entry(*key) {
            MapEntry::Occupied(o) if now < o.get().expires => Some(o.into_mut()),
            MapEntry::Occupied(o) => {
                release(&mut self.per_source, o.remove().source);
                None
            }
            MapEntry::Vacant(_) => None,
        }
    }

    pub fn insert(&mut self, key: FlowKey, entry: Entry, now: Instant) -> Result<(), Refused> {
        if self.refusal(entry.source).is_some() && self.next_sweep.is_none_or(|t| now >= t) {
            self.expire(now);
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
        if let Some(r) = self.refusal(entry.source) {
            return Err(r);
        }
        *self.per_source.entry(entry.source).or_insert(0) += 1;
        if let Some(old) = self.map.insert(key, entry) {
            // The caller inserts only after `get` found nothing live; an
            // entry still here was expired and is replaced.
            release(&mut self.per_source, old.source);
        }
        Ok(())
    }

    fn refusal(&self, source: u64) -> Option<Refused> {
        let held = self.per_source.get(&source).copied().unwrap_or(0) as usize;
        if held >= self.limits.per_source {
            Some(Refused::SourceShare)
        } else if self.map.len() >= self.limits.capacity {
            Some(Refused::Full)
        } else {
            None
        }
    }

    /// Removes every expired entry; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        let per_source = &mut self.per_source;
        self.map.retain(|_, e| {
            let live = now < e.expires;
            if !live {
                release(per_source, e.source);
            }
            live
        });
        before - self.map.len()
    }
}

fn release(per_source: &mut HashMap<u64, u32>, source: u64) {
    if let Some(n) = per_source.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            per_source.remove(&source);
        }
    }
}
