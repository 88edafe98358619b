//! The stack's place in the engine's receive path: it wraps the sink that
//! was there before, takes packets addressed to the stack and passes the
//! rest on untouched.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};

use crate::wg::{BufferPool, InnerSink, PacketBuf};
use crate::wire::IpHeader;

pub(crate) struct NetstackSink {
    pub addresses: Vec<IpAddr>,
    pub queue: Sender<PacketBuf>,
    pub pool: Arc<BufferPool>,
    pub next: Arc<dyn InnerSink>,
    /// Set when the stack stops: every packet goes to `next` from then on.
    pub detached: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
}

impl InnerSink for NetstackSink {
    fn deliver(&self, packet: &[u8]) -> bool {
        if !self.detached.load(Relaxed) {
            if let Ok(h) = IpHeader::new_checked(packet) {
                if self.addresses.contains(&h.dst) {
                    let packet = &packet[..h.total_len];
                    // The engine let no packet past the MTU through (the
                    // pool's buffer size); a refused copy is a dropped one.
                    let Some(copy) = self.pool.take_copy(packet) else {
                        self.dropped.fetch_add(1, Relaxed);
                        return false;
                    };
                    return match self.queue.try_send(copy) {
                        Ok(()) => true,
                        Err(TrySendError::Full(_)) => {
                            self.dropped.fetch_add(1, Relaxed);
                            false
                        }
                        Err(TrySendError::Disconnected(_)) => self.next.deliver(packet),
                    };
                }
            }
        }
        self.next.deliver(packet)
    }

    fn rewrap(&self, end: Arc<dyn InnerSink>) -> Option<Arc<dyn InnerSink>> {
        let next = self.next.rewrap(end.clone()).unwrap_or(end);
        Some(Arc::new(NetstackSink {
            addresses: self.addresses.clone(),
            queue: self.queue.clone(),
            pool: self.pool.clone(),
            next,
            detached: self.detached.clone(),
            dropped: self.dropped.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::BufferBudget;
    use crate::wg::HostQueue;

    fn packet_to(dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&dst);
        p
    }

    /// Attaching an end sink (a TUN device) after the stack keeps the
    /// stack in front: before, `attach_tun` replaced the whole chain and
    /// the stack got nothing once a TUN device came after it.
    #[test]
    fn a_new_end_sink_goes_behind_the_stack() {
        let budget = Arc::new(BufferBudget::default());
        let first = HostQueue::new(8, 1500, budget.clone());
        let later = HostQueue::new(8, 1500, budget);
        let (tx, rx) = crossbeam_channel::bounded(8);
        let stack = NetstackSink {
            addresses: vec![IpAddr::from([10, 0, 0, 1])],
            queue: tx,
            pool: BufferPool::new(8, 1500),
            next: first.clone(),
            detached: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let rewrapped = stack.rewrap(later.clone()).expect("the stack wraps");
        assert!(rewrapped.deliver(&packet_to([10, 0, 0, 1])));
        assert_eq!(rx.len(), 1, "the stack lost its own packet");
        assert!(rewrapped.deliver(&packet_to([10, 0, 0, 9])));
        assert_eq!(later.len(), 1, "the rest did not reach the new end sink");
        assert_eq!(first.len(), 0);
        assert!(first.rewrap(later).is_none(), "an end sink wraps nothing");
    }
}
