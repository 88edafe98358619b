//! The stack's place in the engine's receive path: it wraps the sink that
//! was there before, takes packets addressed to the stack and passes the
//! rest on untouched.
//!
//! Packets reach the stack thread a receive batch at a time, one channel
//! message (so at most one wake) per batch, not one per packet. When the
//! stack wants it ([`RunOnReceive`]: its connections are spliced and have
//! nothing to send) and is free, the receive thread runs the stack for its
//! batch itself instead, with no hand-off at all. A batch
//! with much for the stack hands over the receive thread's whole decryption
//! buffer ([`InnerBurst::replace_buf`]): the stack reads its packets where
//! they were decrypted and the receive thread goes on with an idle buffer
//! of the pool. A batch with little for the stack copies its packets into
//! one small buffer instead, so a trickle of packets does not hold half a
//! MiB each. Every buffer comes from one [`RxPool`], bounded in bytes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use crossbeam_channel::{Sender, TrySendError};
use parking_lot::Mutex;

use crate::wg::{InnerBurst, InnerSink};
use crate::wire::IpHeader;

/// Bytes of a copy buffer (at most the pool's byte ceiling): a batch with
/// less than this for the stack is copied into one, a larger one hands
/// its whole decryption buffer over when the pool has one to give back.
const COPY_BUF: usize = 64 << 10;

/// The idle list [`RxPool::charge_or_reclaim`] frees buffers from when the
/// ceiling is reached: the copy buffers (`Small`) or the batch-sized ones
/// (`Big`).
#[derive(Clone, Copy)]
enum IdleList {
    Small,
    Big,
}

/// The buffers packets wait in between the receive threads and the stack
/// thread, and the count of packets waiting. Both are bounded: packets by
/// `NetstackConfig::rx_queue_packets`, the bytes the pool ever allocated
/// (idle or in use, whole buffers counted) by `rx_queue_packets * mtu`,
/// the ceiling `NetstackConfig` documents. Past either, packets are
/// dropped and counted in `NetstackStats::rx_dropped`.
pub(crate) struct RxPool {
    max_packets: usize,
    max_bytes: usize,
    copy_len: usize,
    queued: AtomicUsize,
    allocated: AtomicUsize,
    /// Idle decryption-sized buffers, for `replace_buf`.
    big: Mutex<Vec<Vec<u8>>>,
    /// Idle copy buffers (capacity `copy_len`, length 0).
    small: Mutex<Vec<Vec<u8>>>,
    /// Idle span lists, so a warm pool allocates nothing per batch.
    spans: Mutex<Vec<Vec<(u32, u32)>>>,
}

impl RxPool {
    pub fn new(max_packets: usize, mtu: usize) -> Arc<RxPool> {
        let max_bytes = max_packets.saturating_mul(mtu);
        Arc::new(RxPool {
            max_packets,
            max_bytes,
            copy_len: COPY_BUF.min(max_bytes).max(mtu),
            queued: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
            big: Mutex::new(Vec::new()),
            small: Mutex::new(Vec::new()),
            spans: Mutex::new(Vec::new()),
        })
    }

    /// Reserves room for up to `want` packets; returns how many it got.
    fn reserve(&self, want: usize) -> usize {
        let mut cur = self.queued.load(Relaxed);
        loop {
            let got = want.min(self.max_packets.saturating_sub(cur));
            if got == 0 {
                return 0;
            }
            match self
                .queued
                .compare_exchange_weak(cur, cur + got, Relaxed, Relaxed)
            {
                Ok(_) => return got,
                Err(now) => cur = now,
            }
        }
    }

    fn unreserve(&self, n: usize) {
        self.queued.fetch_sub(n, Relaxed);
    }

    /// Counts `len` more bytes allocated, if the ceiling allows.
    fn charge(&self, len: usize) -> bool {
        let mut cur = self.allocated.load(Relaxed);
        loop {
            if cur + len > self.max_bytes {
                return false;
            }
            match self
                .allocated
                .compare_exchange_weak(cur, cur + len, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Counts `len` more bytes allocated, freeing idle buffers of the
    /// other kind (`from`) if the ceiling needs it: after a bulk transfer
    /// filled it with idle batch-sized buffers, a trickle of small batches
    /// must still get a copy buffer, and the other way round.
    fn charge_or_reclaim(&self, len: usize, from: IdleList) -> bool {
        loop {
            if self.charge(len) {
                return true;
            }
            let idle = match from {
                IdleList::Small => self.small.lock().pop().map(|_| self.copy_len),
                IdleList::Big => self.big.lock().pop().map(|b| b.len()),
            };
            match idle {
                Some(freed) => {
                    self.allocated.fetch_sub(freed, Relaxed);
                }
                None => return false,
            }
        }
    }

    /// An idle buffer of exactly `len` bytes, or a new one within the
    /// ceiling.
    fn take_big(&self, len: usize) -> Option<Vec<u8>> {
        {
            let mut big = self.big.lock();
            while let Some(b) = big.pop() {
                if b.len() == len {
                    return Some(b);
                }
                // From a receive thread with another batch size: free it.
                self.allocated.fetch_sub(b.len(), Relaxed);
            }
        }
        self.charge_or_reclaim(len, IdleList::Small)
            .then(|| vec![0u8; len])
    }

    fn take_small(&self) -> Option<Vec<u8>> {
        if let Some(b) = self.small.lock().pop() {
            return Some(b);
        }
        self.charge_or_reclaim(self.copy_len, IdleList::Big)
            .then(|| Vec::with_capacity(self.copy_len))
    }

    fn take_spans(&self) -> Vec<(u32, u32)> {
        self.spans.lock().pop().unwrap_or_default()
    }

    /// Takes back a batch's buffer and span list once the stack is done.
    fn give_back(&self, mut buf: Vec<u8>, mut spans: Vec<(u32, u32)>, small: bool) {
        self.unreserve(spans.len());
        spans.clear();
        self.spans.lock().push(spans);
        if small {
            buf.clear();
            self.small.lock().push(buf);
        } else {
            self.big.lock().push(buf);
        }
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.allocated.load(Relaxed)
    }
}

/// Packets of one receive batch for the stack, read in place; its buffer
/// goes back to the pool when dropped.
pub(crate) struct RxBatch {
    buf: Vec<u8>,
    spans: Vec<(u32, u32)>,
    next: usize,
    small: bool,
    pool: Arc<RxPool>,
}

impl RxBatch {
    /// Packets not read yet.
    pub fn remaining(&self) -> usize {
        self.spans.len() - self.next
    }

    /// The next packet, without taking it.
    pub fn peek(&self) -> Option<&[u8]> {
        let &(at, len) = self.spans.get(self.next)?;
        Some(&self.buf[at as usize..(at + len) as usize])
    }

    /// Takes the next packet: where it is in [`RxBatch::packet_at`].
    pub fn advance(&mut self) -> Option<(u32, u32)> {
        let s = *self.spans.get(self.next)?;
        self.next += 1;
        Some(s)
    }

    pub fn packet_at(&self, (at, len): (u32, u32)) -> &[u8] {
        &self.buf[at as usize..(at + len) as usize]
    }

    fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.spans[self.next..]
            .iter()
            .map(|&(at, len)| &self.buf[at as usize..(at + len) as usize])
    }
}

impl Drop for RxBatch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let spans = std::mem::take(&mut self.spans);
        self.pool.give_back(buf, spans, self.small);
    }
}

/// A stack that a receive thread may run itself for its batch, instead of
/// queueing the batch for the stack's thread.
pub(crate) trait RunOnReceive: Send + Sync {
    /// Runs the stack for `batch` on this thread; gives the batch back
    /// when the stack is busy or closed.
    fn run(&self, batch: RxBatch) -> Result<(), RxBatch>;
}

pub(crate) struct NetstackSink {
    /// The stack, for batches a receive thread runs itself while
    /// `run_on_receive` is set. A flag of its own, not a call on the stack:
    /// a stack that never wants it costs one load per batch.
    pub stack: Weak<dyn RunOnReceive>,
    pub run_on_receive: Arc<AtomicBool>,
    pub addresses: Vec<IpAddr>,
    pub queue: Sender<RxBatch>,
    pub pool: Arc<RxPool>,
    pub next: Arc<dyn InnerSink>,
    /// Set when the stack stops: every packet goes to `next` from then on.
    pub detached: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
}

impl NetstackSink {
    /// The length of `packet` if it is for the stack (IP total length; the
    /// rest of the buffer is not the packet's).
    fn ours(&self, packet: &[u8]) -> Option<usize> {
        let h = IpHeader::new_checked(packet).ok()?;
        self.addresses.contains(&h.dst).then_some(h.total_len)
    }

    /// Hands a batch to the stack: run on this thread when the stack wants
    /// it and is free, else queued for the stack thread. True when it went.
    fn send(&self, batch: RxBatch) -> bool {
        // Run here when the stack wants it, nothing is queued before this
        // batch, and the stack is free.
        let stack = if self.run_on_receive.load(Relaxed) && self.queue.is_empty() {
            self.stack.upgrade()
        } else {
            None
        };
        let batch = match stack {
            Some(stack) => match stack.run(batch) {
                Ok(()) => return true,
                Err(b) => b,
            },
            None => batch,
        };
        match self.queue.try_send(batch) {
            Ok(()) => true,
            // The queue holds at most as many batches as packets may wait
            // (each batch has one at least), so only a stopped stack
            // refuses: its packets go on to the next sink.
            Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => {
                for p in b.packets() {
                    self.next.deliver(p);
                }
                false
            }
        }
    }

    /// Copies `packets` (each for the stack, `n` reserved) into small
    /// buffers, as many batches as they need. Returns how many went; the
    /// rest were dropped for want of a buffer (their reservation freed).
    fn send_copies<'a>(&self, packets: impl Iterator<Item = &'a [u8]>, n: usize) -> usize {
        let mut sent = 0;
        let mut batch: Option<RxBatch> = None;
        let mut left = n;
        for p in packets.take(n) {
            if batch
                .as_ref()
                .is_some_and(|b| b.buf.len() + p.len() > self.pool.copy_len)
            {
                if let Some(b) = batch.take() {
                    let count = b.spans.len();
                    // The reservation of every packet still unsent moves
                    // with the next batch.
                    if self.send(b) {
                        sent += count;
                    }
                }
            }
            if batch.is_none() {
                let Some(buf) = self.pool.take_small() else {
                    break;
                };
                batch = Some(RxBatch {
                    buf,
                    spans: self.pool.take_spans(),
                    next: 0,
                    small: true,
                    pool: self.pool.clone(),
                });
            }
            let Some(b) = batch.as_mut() else { break };
            b.spans.push((b.buf.len() as u32, p.len() as u32));
            b.buf.extend_from_slice(p);
            left -= 1;
        }
        if let Some(b) = batch {
            let count = b.spans.len();
            if self.send(b) {
                sent += count;
            }
        }
        // Packets without a buffer never joined a batch: free their room.
        self.pool.unreserve(left);
        sent
    }
}

impl InnerSink for NetstackSink {
    fn deliver(&self, packet: &[u8]) -> bool {
        if !self.detached.load(Relaxed) {
            if let Some(len) = self.ours(packet) {
                let packet = &packet[..len];
                if self.pool.reserve(1) == 1 && self.send_copies(std::iter::once(packet), 1) == 1 {
                    return true;
                }
                self.dropped.fetch_add(1, Relaxed);
                return false;
            }
        }
        self.next.deliver(packet)
    }

    fn deliver_burst(&self, burst: &mut InnerBurst) {
        if self.detached.load(Relaxed) {
            return self.next.deliver_burst(burst);
        }
        // Packets for the stack, by index and length; the rest go on now,
        // while the buffer is still the burst's.
        let mut mine: Vec<(usize, usize)> = Vec::new();
        let mut bytes = 0;
        for i in 0..burst.len() {
            match self.ours(burst.packet(i)) {
                Some(len) => {
                    mine.push((i, len));
                    bytes += len;
                }
                None => {
                    let ok = self.next.deliver(burst.packet(i));
                    burst.set_delivered(i, ok);
                }
            }
        }
        if mine.is_empty() {
            return;
        }
        let n = self.pool.reserve(mine.len());
        let dropped = (mine.len() - n) as u64;
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Relaxed);
            bytes = mine[..n].iter().map(|m| m.1).sum();
        }
        let mine = &mine[..n];
        // Much for the stack: hand over the buffer itself.
        if bytes >= self.pool.copy_len {
            if let Some(spare) = self.pool.take_big(burst.buf_len()) {
                let mut spans = self.pool.take_spans();
                spans.extend(
                    mine.iter()
                        .map(|&(i, len)| (burst.span(i).0 as u32, len as u32)),
                );
                match burst.replace_buf(spare) {
                    Ok(buf) => {
                        let batch = RxBatch {
                            buf,
                            spans,
                            next: 0,
                            small: false,
                            pool: self.pool.clone(),
                        };
                        let ok = self.send(batch);
                        for &(i, _) in mine {
                            burst.set_delivered(i, ok);
                        }
                        return;
                    }
                    Err(spare) => {
                        // Cannot happen (the pool gave the burst's own
                        // length): keep the buffer idle and copy instead.
                        self.pool.big.lock().push(spare);
                        spans.clear();
                        self.pool.spans.lock().push(spans);
                    }
                }
            }
        }
        let sent = self.send_copies(
            mine.iter().map(|&(i, len)| &burst.packet(i)[..len]),
            mine.len(),
        );
        for (k, &(i, _)) in mine.iter().enumerate() {
            burst.set_delivered(i, k < sent);
        }
        if sent < mine.len() {
            self.dropped.fetch_add((mine.len() - sent) as u64, Relaxed);
        }
    }

    fn rewrap(&self, end: Arc<dyn InnerSink>) -> Option<Arc<dyn InnerSink>> {
        let next = self.next.rewrap(end.clone()).unwrap_or(end);
        Some(Arc::new(NetstackSink {
            stack: self.stack.clone(),
            run_on_receive: self.run_on_receive.clone(),
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

    fn packet_to(dst: [u8; 4], len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&dst);
        p
    }

    const US: [u8; 4] = [10, 0, 0, 1];

    struct NoStack;

    impl RunOnReceive for NoStack {
        fn run(&self, batch: RxBatch) -> Result<(), RxBatch> {
            Err(batch)
        }
    }

    fn sink(
        rx_queue_packets: usize,
        next: Arc<dyn InnerSink>,
    ) -> (NetstackSink, crossbeam_channel::Receiver<RxBatch>) {
        let (tx, rx) = crossbeam_channel::bounded(rx_queue_packets);
        let s = NetstackSink {
            // No stack: every batch is queued, as for a stack thread.
            stack: Weak::<NoStack>::new(),
            run_on_receive: Arc::new(AtomicBool::new(false)),
            addresses: vec![IpAddr::from(US)],
            queue: tx,
            pool: RxPool::new(rx_queue_packets, 1500),
            next,
            detached: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (s, rx)
    }

    fn host_queue() -> Arc<HostQueue> {
        HostQueue::new(64, 1500, Arc::new(BufferBudget::default()))
    }

    /// A burst of `n` packets of `len` bytes; every `other`-th (if not 0)
    /// is not for the stack. Each packet's byte 20 is its index.
    fn burst(n: usize, len: usize, other: usize) -> InnerBurst {
        let mut b = InnerBurst::new(512 << 10, 1024);
        for i in 0..n {
            let dst = if other != 0 && i % other == 0 {
                [10, 0, 0, 9]
            } else {
                US
            };
            let mut p = packet_to(dst, len);
            p[20] = i as u8;
            b.spare()[..len].copy_from_slice(&p);
            b.commit(len);
        }
        b
    }

    /// Attaching an end sink (a TUN device) after the stack keeps the
    /// stack in front: before, `attach_tun` replaced the whole chain and
    /// the stack got nothing once a TUN device came after it.
    #[test]
    fn a_new_end_sink_goes_behind_the_stack() {
        let (first, later) = (host_queue(), host_queue());
        let (stack, rx) = sink(8, first.clone());
        let rewrapped = stack.rewrap(later.clone()).expect("the stack wraps");
        assert!(rewrapped.deliver(&packet_to(US, 28)));
        assert_eq!(rx.len(), 1, "the stack lost its own packet");
        assert!(rewrapped.deliver(&packet_to([10, 0, 0, 9], 28)));
        assert_eq!(later.len(), 1, "the rest did not reach the new end sink");
        assert_eq!(first.len(), 0);
        assert!(first.rewrap(later).is_none(), "an end sink wraps nothing");
    }

    /// A batch with much for the stack reaches it in one message, in the
    /// buffer it was decrypted into (no copy), and the receive thread goes
    /// on with another buffer; the rest went to the next sink first.
    #[test]
    fn a_large_batch_hands_its_buffer_over_in_one_message() {
        let next = host_queue();
        let (s, rx) = sink(4096, next.clone());
        let mut b = burst(100, 1400, 10);
        let before = b.spare().as_ptr() as usize - 100 * 1400;
        s.deliver_burst(&mut b);
        assert_eq!(rx.len(), 1, "one message for the whole batch");
        assert_eq!(next.len(), 10, "the others went on");
        assert!((0..100).all(|i| b.delivered(i)));
        let mut batch = rx.try_recv().unwrap();
        assert_eq!(
            batch.buf.as_ptr() as usize,
            before,
            "the burst's own buffer"
        );
        assert!(!batch.small);
        let mut seen = Vec::new();
        while let Some(span) = batch.advance() {
            let p = batch.packet_at(span);
            assert_eq!(p.len(), 1400);
            seen.push(p[20] as usize);
        }
        let want: Vec<usize> = (0..100).filter(|i| i % 10 != 0).collect();
        assert_eq!(seen, want, "in order, only the stack's");
        assert_eq!(s.pool.queued(), 90);
        drop(batch);
        assert_eq!(s.pool.queued(), 0, "a dropped batch frees its packets");
        // The receive thread's next buffer is the pool's; lengths survive
        // for the engine's counters, the bytes are gone.
        assert_eq!(b.packet_len(1), 1400);
        assert!(b.packet(1).is_empty());
        b.clear();
        assert_eq!(b.buf_len(), 512 << 10);
    }

    /// A small batch is copied into one small buffer, also one message.
    #[test]
    fn a_small_batch_is_copied_into_one_message() {
        let (s, rx) = sink(4096, host_queue());
        let mut b = burst(5, 200, 0);
        s.deliver_burst(&mut b);
        assert_eq!(rx.len(), 1);
        let batch = rx.try_recv().unwrap();
        assert!(batch.small);
        assert_eq!(batch.remaining(), 5);
        assert_eq!(batch.peek().map(|p| p[20]), Some(0));
        assert_eq!(b.packet(4)[20], 4, "the burst keeps its buffer");
    }

    /// The packet limit (`rx_queue_packets`) holds across batches the
    /// stack has not read: beyond it packets are dropped and counted, and
    /// reading makes room again.
    #[test]
    fn packets_beyond_the_queue_limit_are_dropped_and_counted() {
        let (s, rx) = sink(150, host_queue());
        let mut b = burst(100, 100, 0);
        s.deliver_burst(&mut b);
        b.clear();
        let mut b = burst(100, 100, 0);
        s.deliver_burst(&mut b);
        assert_eq!(s.pool.queued(), 150);
        assert_eq!(s.dropped.load(Relaxed), 50);
        assert_eq!((0..100).filter(|&i| b.delivered(i)).count(), 50);
        let queued: usize = rx.try_iter().map(|b| b.remaining()).sum();
        assert_eq!(queued, 150);
        assert_eq!(s.pool.queued(), 0);
        let mut b = burst(100, 100, 0);
        s.deliver_burst(&mut b);
        assert_eq!(s.pool.queued(), 100, "room again once read");
    }

    /// An attack on the byte ceiling: a stack that never reads, fed
    /// batches of every size. The pool never allocates past
    /// `rx_queue_packets * mtu`, whole buffers counted, and the stack
    /// still gets packets once it reads again.
    #[test]
    fn the_pool_never_allocates_past_its_byte_ceiling() {
        let limit = 1000;
        let (s, rx) = sink(limit, host_queue());
        let ceiling = limit * 1500;
        let mut held = Vec::new();
        for round in 0..200 {
            let (n, len) = [(300, 1400), (3, 100), (1, 1500), (60, 1200)][round % 4];
            let mut b = burst(n, len, 0);
            s.deliver_burst(&mut b);
            assert!(
                s.pool.allocated() <= ceiling,
                "{} > {ceiling}",
                s.pool.allocated()
            );
            held.extend(rx.try_iter());
        }
        assert!(
            s.dropped.load(Relaxed) > 0,
            "the attack never reached the limit"
        );
        drop(held);
        let before = s.dropped.load(Relaxed);
        let mut b = burst(300, 1400, 0);
        s.deliver_burst(&mut b);
        assert_eq!(s.dropped.load(Relaxed), before, "room again once read");
        assert!(s.pool.allocated() <= ceiling);
        rx.try_iter().for_each(drop);
    }

    /// Idle buffers of one kind do not starve the other: after a bulk
    /// transfer left the ceiling full of idle batch-sized buffers, small
    /// batches still get copy buffers (and the other way round).
    #[test]
    fn idle_buffers_of_one_kind_make_room_for_the_other() {
        let (s, rx) = sink(700, host_queue());
        // Room for two batch-sized buffers and not a copy buffer more.
        let ceiling = 700 * 1500;
        // Batch-sized buffers until the ceiling refuses one more, all idle.
        let mut held = Vec::new();
        while s.pool.allocated() + (512 << 10) <= ceiling {
            let mut b = burst(100, 1400, 0);
            s.deliver_burst(&mut b);
            held.extend(rx.try_iter());
        }
        drop(held);
        for _ in 0..20 {
            let mut b = burst(3, 100, 0);
            s.deliver_burst(&mut b);
            rx.try_iter().for_each(drop);
        }
        assert_eq!(s.dropped.load(Relaxed), 0, "small batches were refused");
        // And copy buffers filling the ceiling give way to a large batch.
        let mut held = Vec::new();
        for _ in 0..40 {
            let mut b = burst(40, 1400, 0);
            s.deliver_burst(&mut b);
            held.extend(rx.try_iter());
        }
        drop(held);
        let mut b = burst(100, 1400, 0);
        s.deliver_burst(&mut b);
        assert!(
            !rx.try_recv().unwrap().small,
            "no room for the buffer hand-over"
        );
        assert!(s.pool.allocated() <= ceiling);
    }
}
