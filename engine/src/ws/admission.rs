//! Admission by source address: at most `per_source` slots held at once by
//! one IP address and `total` in all; a slot is held until its guard drops.
//!
//! This is nginx's `limit_conn` (a `limit_conn_zone` keyed by
//! `$binary_remote_addr` plus a server-wide zone): over either limit the
//! new connection is refused at once and counted, and every other source
//! keeps being served, so one address cannot take the slots all the others
//! need. The tunnel server uses one [`Admission`] for TLS/HTTP handshakes
//! in progress and one for relay sessions.
//!
//! Sources are whole addresses, as nginx keys them (an IPv4-mapped IPv6
//! address counts as its IPv4 address). The map holds only sources with a
//! slot, so it never has more than `total` entries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every slot is taken.
    Total,
    /// This source holds its share already.
    PerSource,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

pub(crate) struct Admission {
    total: usize,
    per_source: usize,
    held: Mutex<Held>,
    refused_total: AtomicU64,
    refused_per_source: AtomicU64,
}

/// A held slot; dropping it frees the slot.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    /// A limit of 0 means none may be admitted.
    pub(crate) fn new(total: usize, per_source: usize) -> Arc<Admission> {
        Arc::new(Admission {
            total,
            per_source,
            held: Mutex::new(Held::default()),
            refused_total: AtomicU64::new(0),
            refused_per_source: AtomicU64::new(0),
        })
    }

    /// Takes a slot for `source`, or counts the refusal.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refused> {
        let source = source.to_canonical();
        let mut held = self.held.lock();
        let mine = held.by_source.get(&source).copied().unwrap_or(0);
        let refused = if mine >= self.per_source {
            Some((Refused::PerSource, &self.refused_per_source))
        } else if held.total >= self.total {
            Some((Refused::Total, &self.refused_total))
        } else {
            None
        };
        if let Some((why, counter)) = refused {
            counter.fetch_add(1, Relaxed);
            return Err(why);
        }
        held.total += 1;
        *held.by_source.entry(source).or_insert(0) += 1;
        Ok(Slot {
            admission: self.clone(),
            source,
        })
    }

    /// Slots held now.
    pub(crate) fn held(&self) -> usize {
        self.held.lock().total
    }

    /// Refusals so far: (every slot taken, the source's share taken).
    pub(crate) fn refused(&self) -> (u64, u64) {
        (
            self.refused_total.load(Relaxed),
            self.refused_per_source.load(Relaxed),
        )
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.admission.held.lock();
        held.total -= 1;
        if let Some(n) = held.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_source_and_in_total_and_frees_on_drop() {
        let a = Admission::new(3, 2);
        let one = a.admit(ip("10.0.0.1")).unwrap();
        let two = a.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1")).err(),
            Some(Refused::PerSource),
            "an IPv4-mapped address is the same source"
        );
        let three = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refused::Total));
        assert_eq!(a.refused(), (1, 1));
        assert_eq!(a.held(), 3);
        drop(one);
        let again = a.admit(ip("10.0.0.1")).unwrap();
        drop((two, three, again));
        assert_eq!(a.held(), 0);
        assert!(
            a.held.lock().by_source.is_empty(),
            "no entry outlives its slots"
        );
    }
}
