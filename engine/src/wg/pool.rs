//! Packet buffers that return to their pool when dropped, so the data path
//! allocates nothing per packet once warm.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};

pub struct BufferPool {
    free_tx: Sender<Vec<u8>>,
    free_rx: Receiver<Vec<u8>>,
    buf_len: usize,
}

impl BufferPool {
    /// A pool keeping up to `keep` idle buffers of `buf_len` bytes.
    pub fn new(keep: usize, buf_len: usize) -> Arc<BufferPool> {
        let (free_tx, free_rx) = bounded(keep);
        Arc::new(BufferPool {
            free_tx,
            free_rx,
            buf_len,
        })
    }

    /// A buffer holding a copy of `data`; `None` when `data` is longer than
    /// the buffers. Never a cut copy: a packet missing its tail is a
    /// different packet, and whoever charged `data.len()` for it must get
    /// exactly that back. The engine drops longer packets before any sink
    /// (`DropReason::Oversized`), so `None` means a caller broke that rule.
    pub fn take_copy(self: &Arc<Self>, data: &[u8]) -> Option<PacketBuf> {
        if data.len() > self.buf_len {
            return None;
        }
        let mut buf = self
            .free_rx
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; self.buf_len]);
        buf[..data.len()].copy_from_slice(data);
        Some(PacketBuf {
            buf,
            len: data.len(),
            pool: Some(self.clone()),
        })
    }

    /// The longest packet a buffer holds.
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    pub fn idle(&self) -> usize {
        self.free_rx.len()
    }
}

/// One packet in a pooled buffer; derefs to the packet bytes.
pub struct PacketBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufferPool>>,
}

impl PacketBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for PacketBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl DerefMut for PacketBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PacketBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let _ = pool.free_tx.try_send(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let pool = BufferPool::new(4, 2048);
        let a = pool.take_copy(b"hello").unwrap();
        assert_eq!(&*a, b"hello");
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(pool.idle(), 1);
        let b = pool.take_copy(b"again").unwrap();
        assert_eq!(b.as_ptr(), ptr, "the same allocation came back");
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_packet_longer_than_the_buffers_is_refused_not_cut() {
        let pool = BufferPool::new(4, 8);
        assert_eq!(pool.take_copy(&[7u8; 8]).map(|p| p.len()), Some(8));
        assert!(pool.take_copy(&[7u8; 9]).is_none());
    }
}
