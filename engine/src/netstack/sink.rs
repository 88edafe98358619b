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
}
