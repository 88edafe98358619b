//! The stack's side of the mesh, as a smoltcp `Device`: a queue of received
//! batches of inner packets filled by the netstack thread from the engine's
//! sink, each packet read in place where the receive thread left it, and a
//! list of packets to send that the thread hands to `Engine::send_packet`
//! after releasing the stack lock. Buffers are recycled, so a warm stack
//! allocates nothing per packet.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::sink::RxBatch;

/// Packets one poll may produce before smoltcp is told the device is busy
/// (the thread sends them and polls again).
const TX_BATCH: usize = 512;

pub(crate) struct MeshDevice {
    /// Received batches; the front one may be read through already (it is
    /// dropped, and its buffer goes back to the pool, by the next receive
    /// or [`MeshDevice::pop`], or at the end of the poll).
    rx: VecDeque<RxBatch>,
    /// Packets in `rx` not read yet.
    rx_pending: usize,
    pub tx: Vec<Vec<u8>>,
    /// Empty buffers from earlier batches, reused for `tx`.
    pub free: Vec<Vec<u8>>,
    mtu: usize,
}

impl MeshDevice {
    pub fn new(mtu: usize) -> MeshDevice {
        MeshDevice {
            rx: VecDeque::new(),
            rx_pending: 0,
            tx: Vec::new(),
            free: Vec::new(),
            mtu,
        }
    }
}

impl MeshDevice {
    pub fn push(&mut self, batch: RxBatch) {
        self.rx_pending += batch.remaining();
        self.rx.push_back(batch);
    }

    /// Packets received and not yet read by smoltcp.
    pub fn pending(&self) -> usize {
        self.rx_pending
    }

    /// Drops the batches read through, so their buffers go back.
    pub fn drop_read(&mut self) {
        while self.rx.front().is_some_and(|b| b.remaining() == 0) {
            self.rx.pop_front();
        }
    }

    /// The next packet smoltcp will read.
    pub fn peek(&self) -> Option<&[u8]> {
        self.rx.iter().find_map(RxBatch::peek)
    }

    /// Skips the next packet.
    pub fn pop(&mut self) {
        self.drop_read();
        if let Some(b) = self.rx.front_mut() {
            if b.advance().is_some() {
                self.rx_pending -= 1;
            }
        }
        self.drop_read();
    }
}

pub(crate) struct RxToken<'a>(&'a [u8]);

pub(crate) struct TxToken<'a> {
    tx: &'a mut Vec<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push(buf);
        r
    }
}

impl phy::Device for MeshDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // The batch stays until the packet is read: its buffer is dropped
        // by the next peek or pop.
        self.drop_read();
        let batch = self.rx.front_mut()?;
        let span = batch.advance()?;
        self.rx_pending -= 1;
        let batch = self.rx.front()?;
        Some((
            RxToken(batch.packet_at(span)),
            TxToken {
                tx: &mut self.tx,
                free: &mut self.free,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.len() >= TX_BATCH {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            free: &mut self.free,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Every packet reaching the stack was decrypted by the engine, whose
        // AEAD (ChaCha20-Poly1305) already authenticated every byte of it:
        // verifying IP/TCP/UDP/ICMP checksums again on receive catches
        // nothing and costs a pass over each payload. Checksums are still
        // computed on transmit, since the peer may be a kernel (TUN) that
        // verifies them.
        caps.checksum = ChecksumCapabilities::ignored();
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Tx;
        caps.checksum.icmpv6 = Checksum::Tx;
        caps
    }
}
