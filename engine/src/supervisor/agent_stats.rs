//! What an agent counts: sessions, the streams the server asked for (dialed,
//! refused, failed) and the bytes relayed to and from targets.
//!
//! The agent counts for itself, so the Rust API, the C ABI, Go and the
//! `meshvpn tunnel connect` metrics all read the same numbers. The counters
//! live in an [`AgentCounters`] the configuration holds
//! ([`super::AgentConfig::counters`]): an owner that stops and starts its
//! agent again passes the same one and keeps counting across restarts.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::target::DialedTarget;
use crate::stats::stats_struct;

stats_struct! {
    /// A snapshot of an agent's counters ([`super::Agent::stats`],
    /// [`AgentCounters::snapshot`]).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AgentStats {
        /// A session with the server is up now.
        pub connected: bool,
        /// Sessions established since the counters were created.
        pub sessions: u64,
        /// Sessions after the first one: how often the agent reconnected.
        pub reconnects: u64,
        /// Streams being dialed or relayed to targets now (two threads each).
        pub streams_active: u64,
        /// Streams whose target the agent dialed successfully.
        pub streams_total: u64,
        /// Targets the policy refused.
        pub streams_refused: u64,
        /// Bytes written to targets (from the server).
        pub bytes_to_targets: u64,
        /// Bytes read from targets (to the server).
        pub bytes_from_targets: u64,
        /// Targets refused because `max_agent_streams` streams were active.
        pub streams_refused_at_cap: u64,
        /// Allowed targets whose dial failed (refused, unreachable, timed out).
        pub dials_failed: u64,
    }
}

/// The live counters behind [`AgentStats`]; shared by the agent's threads.
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub(super) connected: AtomicBool,
    pub(super) sessions: AtomicU64,
    /// Also the count `Limits::max_agent_streams` caps (see `StreamSlot`).
    pub(super) streams_active: AtomicUsize,
    pub(super) streams_total: AtomicU64,
    pub(super) streams_refused: AtomicU64,
    pub(super) streams_refused_at_cap: AtomicU64,
    pub(super) dials_failed: AtomicU64,
    pub(super) bytes_to_targets: AtomicU64,
    pub(super) bytes_from_targets: AtomicU64,
}

impl AgentCounters {
    /// The counters now, read one by one (not an atomic snapshot).
    pub fn snapshot(&self) -> AgentStats {
        let sessions = self.sessions.load(Ordering::SeqCst);
        AgentStats {
            connected: self.connected.load(Ordering::SeqCst),
            sessions,
            reconnects: sessions.saturating_sub(1),
            streams_active: self.streams_active.load(Ordering::SeqCst) as u64,
            streams_total: self.streams_total.load(Ordering::Relaxed),
            streams_refused: self.streams_refused.load(Ordering::Relaxed),
            bytes_to_targets: self.bytes_to_targets.load(Ordering::Relaxed),
            bytes_from_targets: self.bytes_from_targets.load(Ordering::Relaxed),
            streams_refused_at_cap: self.streams_refused_at_cap.load(Ordering::Relaxed),
            dials_failed: self.dials_failed.load(Ordering::Relaxed),
        }
    }

    pub(super) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `target`, dialed: counted, and its halves count the bytes through them.
    pub(super) fn dialed(self: &Arc<Self>, target: DialedTarget) -> DialedTarget {
        Self::count(&self.streams_total);
        DialedTarget {
            reader: Box::new(Counted {
                inner: target.reader,
                bytes: self.clone(),
                to_target: false,
            }),
            writer: Box::new(Counted {
                inner: target.writer,
                bytes: self.clone(),
                to_target: true,
            }),
            shutdown: target.shutdown,
        }
    }
}

/// One half of a target that counts the bytes through it.
struct Counted<T> {
    inner: T,
    bytes: Arc<AgentCounters>,
    to_target: bool,
}

impl<T> Counted<T> {
    fn add(&self, n: usize) {
        let counter = if self.to_target {
            &self.bytes.bytes_to_targets
        } else {
            &self.bytes.bytes_from_targets
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.add(n);
        Ok(n)
    }
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.add(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialed_targets_count_streams_and_bytes() {
        let counters = Arc::new(AgentCounters::default());
        let target = DialedTarget {
            reader: Box::new(io::Cursor::new(vec![7u8; 5])),
            writer: Box::new(Vec::new()),
            shutdown: Box::new(|| {}),
        };
        let mut t = counters.dialed(target);
        let mut buf = [0u8; 16];
        assert_eq!(t.reader.read(&mut buf).unwrap(), 5);
        t.writer.write_all(b"abc").unwrap();
        counters.sessions.store(3, Ordering::SeqCst);
        let s = counters.snapshot();
        assert_eq!(
            (s.streams_total, s.bytes_from_targets, s.bytes_to_targets),
            (1, 5, 3)
        );
        assert_eq!((s.sessions, s.reconnects), (3, 2));
    }
}
