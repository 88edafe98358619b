//! The STUN server's answer budget: per source and in total, per second.
//!
//! A STUN server answers unauthenticated UDP, so a spoofed source turns it
//! into a reflector. The design follows the kernel WireGuard's
//! ratelimiter.c (per source IP, IPv6 by its /64, a bounded table cleared
//! by time): sources are counted in one-second windows, each may get
//! [`DEFAULT_STUN_PER_SOURCE`] answers per window, all together
//! [`DEFAULT_STUN_TOTAL`], and at most [`STUN_MAX_SOURCES`] sources are
//! tracked per window; beyond any of these the request is dropped and
//! counted. The table is cleared when a window ends, so its memory is
//! bounded by `STUN_MAX_SOURCES` entries whatever the traffic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Answers per second to one source (IPv4 address or IPv6 /64). A client
/// needs one per server per round, seven with every retransmission.
pub const DEFAULT_STUN_PER_SOURCE: u32 = 20;
/// Answers per second in total: at most 52 bytes each (IPv6 with
/// FINGERPRINT), so a spoofed flood reflects at most ~260 KB/s whatever
/// the number of sources.
pub const DEFAULT_STUN_TOTAL: u32 = 5000;
/// Sources tracked per one-second window (about 40 bytes each); requests
/// from further sources in that window are dropped.
pub const STUN_MAX_SOURCES: usize = 4096;

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// This source used its answers for this window.
    SourceLimited,
    /// All sources together used the answers of this window.
    TotalLimited,
    /// The window already tracks `STUN_MAX_SOURCES` other sources.
    TableFull,
}

#[derive(Debug)]
pub struct SourceLimiter {
    per_source: u32,
    total: u32,
    max_sources: usize,
    window_start: Option<Instant>,
    answered: u32,
    counts: HashMap<[u8; 8], u32>,
}

/// The key a source is counted under: an IPv4 address, or the /64 of an
/// IPv6 one (a host usually holds a whole /64, as the kernel's limiter
/// assumes). An IPv4-mapped IPv6 address counts as its IPv4 address.
fn key(ip: IpAddr) -> [u8; 8] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            [4, 0, 0, 0, o[0], o[1], o[2], o[3]]
        }
        IpAddr::V6(v6) => {
            let mut k = [0u8; 8];
            k.copy_from_slice(&v6.octets()[..8]);
            k
        }
    }
}

impl SourceLimiter {
    pub fn new(per_source: u32, total: u32, max_sources: usize) -> Self {
        SourceLimiter {
            per_source,
            total,
            max_sources,
            window_start: None,
            answered: 0,
            counts: HashMap::with_capacity(max_sources.min(STUN_MAX_SOURCES)),
        }
    }

    /// Whether one more answer to `source` fits at `now`; counts it if so.
    pub fn check(&mut self, now: Instant, source: IpAddr) -> Verdict {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.answered = 0;
                self.counts.clear();
            }
        }
        if self.answered >= self.total {
            return Verdict::TotalLimited;
        }
        let k = key(source);
        let full = self.counts.len() >= self.max_sources;
        let count = match self.counts.get_mut(&k) {
            Some(c) => c,
            None if full => return Verdict::TableFull,
            None => self.counts.entry(k).or_insert(0),
        };
        if *count >= self.per_source {
            return Verdict::SourceLimited;
        }
        *count += 1;
        self.answered += 1;
        Verdict::Allow
    }

    /// Sources tracked in the current window.
    pub fn tracked(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flooding_source_is_capped_others_are_served() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(20, 5000, 4096);
        let allowed = (0..10_000)
            .filter(|_| l.check(t0, ip("192.0.2.1")) == Verdict::Allow)
            .count();
        assert_eq!(allowed, 20);
        assert_eq!(l.check(t0, ip("192.0.2.1")), Verdict::SourceLimited);
        assert_eq!(l.check(t0, ip("192.0.2.2")), Verdict::Allow);
        // The same host under its IPv4-mapped form is the same source.
        assert_eq!(l.check(t0, ip("::ffff:192.0.2.1")), Verdict::SourceLimited);
        // IPv6: one /64 is one source.
        for i in 0..20 {
            assert_eq!(l.check(t0, ip(&format!("2001:db8::{i:x}"))), Verdict::Allow);
        }
        assert_eq!(l.check(t0, ip("2001:db8::ffff")), Verdict::SourceLimited);
        assert_eq!(l.check(t0, ip("2001:db8:0:1::1")), Verdict::Allow);
        // A new window forgives.
        let t1 = t0 + WINDOW;
        assert_eq!(l.check(t1, ip("192.0.2.1")), Verdict::Allow);
    }

    #[test]
    fn many_sources_hit_the_total_and_the_table_bound() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(20, 100, 4096);
        let allowed = (0..1000u32)
            .filter(|i| l.check(t0, IpAddr::from(i.to_be_bytes())) == Verdict::Allow)
            .count();
        assert_eq!(allowed, 100);
        let mut l = SourceLimiter::new(20, 1_000_000, 64);
        let verdicts: Vec<Verdict> = (0..10_000u32)
            .map(|i| l.check(t0, IpAddr::from(i.to_be_bytes())))
            .collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Allow).count(),
            64
        );
        assert_eq!(l.tracked(), 64);
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| **v == Verdict::TableFull)
                .count(),
            10_000 - 64
        );
        // Tracked sources keep their budget; the next window starts empty.
        assert_eq!(
            l.check(t0, IpAddr::from(1u32.to_be_bytes())),
            Verdict::Allow
        );
        l.check(t0 + WINDOW, ip("192.0.2.1"));
        assert_eq!(l.tracked(), 1);
    }
}
