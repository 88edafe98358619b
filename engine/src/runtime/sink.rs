//! Where decrypted packets go: the TUN device, the userspace stack, or the
//! host through the packet API. The engine holds one [`InnerSink`]; sinks
//! can wrap one another (the userspace stack takes packets for its own
//! addresses and passes the rest on).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use super::pool::{BufferPool, PacketBuf};

/// A consumer of decrypted, source-checked inner IP packets.
pub trait InnerSink: Send + Sync {
    /// Takes one packet. Returns false when the sink is full and the packet
    /// was dropped (the engine counts it).
    fn deliver(&self, packet: &[u8]) -> bool;
}

type Notify = Box<dyn Fn() + Send + Sync>;

/// The packet API's receive side: a bounded queue the host drains.
pub struct HostQueue {
    tx: Sender<PacketBuf>,
    rx: Receiver<PacketBuf>,
    pool: Arc<BufferPool>,
    notify: Mutex<Option<Notify>>,
}

impl HostQueue {
    pub fn new(capacity: usize, packet_len: usize) -> Arc<HostQueue> {
        let (tx, rx) = bounded(capacity);
        Arc::new(HostQueue {
            tx,
            rx,
            pool: BufferPool::new(capacity, packet_len),
            notify: Mutex::new(None),
        })
    }

    /// The next packet, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<PacketBuf> {
        self.rx.recv_timeout(timeout).ok()
    }

    pub fn try_recv(&self) -> Option<PacketBuf> {
        self.rx.try_recv().ok()
    }

    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Calls `f` (from an engine thread) whenever a packet is queued; the
    /// C ABI uses it to signal an eventfd or call back into the host.
    pub fn set_notify(&self, f: Option<Notify>) {
        *self.notify.lock() = f;
    }
}

impl InnerSink for HostQueue {
    fn deliver(&self, packet: &[u8]) -> bool {
        match self.tx.try_send(self.pool.take_copy(packet)) {
            Ok(()) => {
                if let Some(n) = self.notify.lock().as_ref() {
                    n();
                }
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}
