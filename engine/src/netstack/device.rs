//! The stack's side of the mesh, as a smoltcp `Device`: a queue of received
//! inner packets filled by the netstack thread from the engine's sink, and a
//! list of packets to send that the thread hands to `Engine::send_packet`
//! after releasing the stack lock. Buffers are recycled, so a warm stack
//! allocates nothing per packet.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::wg::PacketBuf;

/// Packets one poll may produce before smoltcp is told the device is busy
/// (the thread sends them and polls again).
const TX_BATCH: usize = 512;

pub(crate) struct MeshDevice {
    pub rx: VecDeque<PacketBuf>,
    pub tx: Vec<Vec<u8>>,
    /// Empty buffers from earlier batches, reused for `tx`.
    pub free: Vec<Vec<u8>>,
    mtu: usize,
}

impl MeshDevice {
    pub fn new(mtu: usize) -> MeshDevice {
        MeshDevice {
            rx: VecDeque::new(),
            tx: Vec::new(),
            free: Vec::new(),
            mtu,
        }
    }
}

pub(crate) struct RxToken(PacketBuf);

pub(crate) struct TxToken<'a> {
    tx: &'a mut Vec<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
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
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((
            RxToken(p),
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
