//! Where decrypted packets go: the TUN device, the userspace stack, or the
//! host through the packet API. The engine holds one [`InnerSink`]; sinks
//! can wrap one another (the userspace stack takes packets for its own
//! addresses and passes the rest on).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use super::pool::{BufferPool, PacketBuf};
use crate::peer::BufferBudget;

/// A consumer of decrypted, source-checked inner IP packets. The engine
/// hands a sink no packet longer than its MTU (larger ones are dropped as
/// `DropReason::Oversized` before any sink), so sinks size their buffers
/// to the MTU and need no check of their own.
pub trait InnerSink: Send + Sync {
    /// Takes one packet. Returns false when the sink is full and the packet
    /// was dropped (the engine counts it).
    fn deliver(&self, packet: &[u8]) -> bool;

    /// Takes every packet of one receive batch, in order, and marks each
    /// delivered or not. A sink that gains from seeing the batch whole (the
    /// TUN device joins a flow's segments into one write) overrides it.
    fn deliver_burst(&self, burst: &mut InnerBurst) {
        for i in 0..burst.len() {
            let ok = self.deliver(burst.packet(i));
            burst.set_delivered(i, ok);
        }
    }

    /// For a sink that wraps another (takes some packets and passes the
    /// rest on): a copy of itself whose innermost sink is `end` instead.
    /// An end sink (host queue, TUN) returns `None`. Attaching a TUN
    /// device uses it, so a userspace stack attached before stays in
    /// front: the order of attaching does not matter.
    fn rewrap(&self, end: Arc<dyn InnerSink>) -> Option<Arc<dyn InnerSink>> {
        let _ = end;
        None
    }
}

/// Decrypted packets of one receive batch, written by the decryption
/// straight into one reused buffer.
pub struct InnerBurst {
    buf: Vec<u8>,
    used: usize,
    spans: Vec<(usize, usize)>,
    delivered: Vec<bool>,
    /// The buffer went to a sink ([`InnerBurst::replace_buf`]): the
    /// packets' bytes are gone, their lengths and marks stay.
    moved: bool,
}

impl InnerBurst {
    /// Room for `bytes` of packets, `packets` of them at most.
    pub fn new(bytes: usize, packets: usize) -> InnerBurst {
        InnerBurst {
            buf: vec![0u8; bytes],
            used: 0,
            spans: Vec::with_capacity(packets),
            delivered: Vec::with_capacity(packets),
            moved: false,
        }
    }

    /// The free part of the buffer, to decrypt the next packet into.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// True when a packet of up to `len` bytes no longer fits.
    pub fn is_full(&self, len: usize) -> bool {
        self.buf.len() - self.used < len || self.spans.len() == self.spans.capacity()
    }

    /// Keeps the first `len` bytes of [`InnerBurst::spare`] as a packet.
    pub fn commit(&mut self, len: usize) {
        self.spans.push((self.used, len));
        self.delivered.push(false);
        self.used += len;
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Packet `i`'s bytes; empty once the buffer was replaced.
    pub fn packet(&self, i: usize) -> &[u8] {
        if self.moved {
            return &[];
        }
        let (at, len) = self.spans[i];
        &self.buf[at..at + len]
    }

    /// Where packet `i` starts in the buffer, and its length.
    pub fn span(&self, i: usize) -> (usize, usize) {
        self.spans[i]
    }

    pub fn packet_len(&self, i: usize) -> usize {
        self.spans[i].1
    }

    /// The length of the buffer (what [`InnerBurst::replace_buf`] wants).
    pub fn buf_len(&self) -> usize {
        self.buf.len()
    }

    /// Hands the whole buffer, packets and all, to a sink that keeps it
    /// (the userspace stack reads its packets in place instead of copying
    /// them), and goes on with `with`, of the same length, for the next
    /// batch. Afterwards the packets' bytes are gone ([`InnerBurst::packet`]
    /// is empty) but their lengths and delivered marks stay, for the
    /// engine's counters. `Err(with)` when the lengths differ.
    pub fn replace_buf(&mut self, with: Vec<u8>) -> Result<Vec<u8>, Vec<u8>> {
        if with.len() != self.buf.len() || self.moved {
            return Err(with);
        }
        self.moved = true;
        Ok(std::mem::replace(&mut self.buf, with))
    }

    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let moved = self.moved;
        self.spans.iter().map(move |&(at, len)| {
            if moved {
                &[][..]
            } else {
                &self.buf[at..at + len]
            }
        })
    }

    /// The packets and their delivered marks, to fill in together.
    pub fn parts(&mut self) -> (impl Iterator<Item = &[u8]>, &mut [bool]) {
        let (buf, spans, moved) = (&self.buf, &self.spans, self.moved);
        let packets = spans
            .iter()
            .map(move |&(at, len)| if moved { &[][..] } else { &buf[at..at + len] });
        (packets, &mut self.delivered[..])
    }

    pub fn set_delivered(&mut self, i: usize, ok: bool) {
        if let Some(d) = self.delivered.get_mut(i) {
            *d = ok;
        }
    }

    pub fn delivered(&self, i: usize) -> bool {
        self.delivered.get(i).copied().unwrap_or(false)
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.spans.clear();
        self.delivered.clear();
        self.moved = false;
    }
}

type Notify = Box<dyn Fn() + Send + Sync>;

/// The packet API's receive side: a bounded queue the host drains.
pub struct HostQueue {
    tx: Sender<PacketBuf>,
    rx: Receiver<PacketBuf>,
    pool: Arc<BufferPool>,
    notify: Mutex<Option<Notify>>,
    /// Queued packets count against the engine's buffer ceiling.
    budget: Arc<BufferBudget>,
}

impl HostQueue {
    pub fn new(capacity: usize, packet_len: usize, budget: Arc<BufferBudget>) -> Arc<HostQueue> {
        let (tx, rx) = bounded(capacity);
        Arc::new(HostQueue {
            tx,
            rx,
            pool: BufferPool::new(capacity, packet_len),
            notify: Mutex::new(None),
            budget,
        })
    }

    /// The next packet, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<PacketBuf> {
        self.taken(self.rx.recv_timeout(timeout).ok())
    }

    pub fn try_recv(&self) -> Option<PacketBuf> {
        self.taken(self.rx.try_recv().ok())
    }

    /// A packet left the queue: its bytes no longer count. A queued
    /// packet's length is what [`InnerSink::deliver`] charged for it (the
    /// pool never cuts a copy), so the budget gets back exactly that.
    fn taken(&self, p: Option<PacketBuf>) -> Option<PacketBuf> {
        if let Some(p) = &p {
            self.budget.give_back(p.len());
        }
        p
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
        if !self.budget.try_take(packet.len()) {
            return false;
        }
        let Some(copy) = self.pool.take_copy(packet) else {
            self.budget.give_back(packet.len());
            return false;
        };
        match self.tx.try_send(copy) {
            Ok(()) => {
                if let Some(n) = self.notify.lock().as_ref() {
                    n();
                }
                true
            }
            Err(TrySendError::Full(p) | TrySendError::Disconnected(p)) => {
                self.budget.give_back(p.len());
                false
            }
        }
    }
}
