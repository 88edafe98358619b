//! The stack's side of the mesh, as a smoltcp `Device`: a queue of received
//! batches of inner packets filled by the netstack thread from the engine's
//! sink, each packet read in place where the receive thread left it, and a
//! list of packets to send that the thread hands to `Engine::send_packet`
//! after releasing the stack lock. Buffers are recycled, so a warm stack
//! allocates nothing per packet.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpOption, TcpPacket};

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

/// Connections one [`coalesce_acks`] pass tracks; a batch with more keeps
/// every ACK of the others.
const ACK_FLOWS: usize = 64;

/// A bare cumulative ACK: its connection (source, destination, ports) and
/// its acknowledgment number. None for anything else: data, SYN, FIN, RST,
/// an ACK with SACK blocks (each says something of its own about holes),
/// a packet that is not TCP.
fn bare_ack(packet: &[u8]) -> Option<((IpAddress, IpAddress, u16, u16), u32)> {
    let (src, dst, segment) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
                ip.payload(),
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (
                IpAddress::Ipv6(ip.src_addr()),
                IpAddress::Ipv6(ip.dst_addr()),
                ip.payload(),
            )
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(segment).ok()?;
    if !tcp.ack() || tcp.syn() || tcp.fin() || tcp.rst() || !tcp.payload().is_empty() {
        return None;
    }
    let mut options = tcp.options();
    while !options.is_empty() {
        let (rest, option) = TcpOption::parse(options).ok()?;
        match option {
            TcpOption::SackRange(_) => return None,
            TcpOption::EndOfList => break,
            _ => options = rest,
        }
    }
    let key = (src, dst, tcp.src_port(), tcp.dst_port());
    Some((key, tcp.ack_number().0 as u32))
}

/// Drops every bare cumulative ACK of `tx` that a later bare cumulative
/// ACK of the same connection in `tx` acknowledges more than (their
/// buffers go to `free`). smoltcp ACKs every second segment as it reads a
/// batch, but the whole batch's output leaves together after the poll, so
/// all but the last of those ACKs only cost a seal, a send and an open
/// each. Duplicate ACKs (the same number) and ACKs with SACK blocks all
/// stay: loss recovery counts and reads them. The sender's slow start
/// counts the bytes an ACK covers, so fewer ACKs do not slow it.
pub(crate) fn coalesce_acks(tx: &mut Vec<Vec<u8>>, free: &mut Vec<Vec<u8>>) {
    // The latest ACK number of each connection, walking back from the end.
    let mut latest: Vec<((IpAddress, IpAddress, u16, u16), u32)> = Vec::new();
    let mut drop = vec![false; tx.len()];
    let mut any = false;
    for (i, packet) in tx.iter().enumerate().rev() {
        let Some((key, ack)) = bare_ack(packet) else {
            continue;
        };
        match latest.iter().find(|(k, _)| *k == key) {
            // Sequence order: the later ACK is ahead of this one.
            Some(&(_, later)) if (later.wrapping_sub(ack) as i32) > 0 => {
                drop[i] = true;
                any = true;
            }
            Some(_) => {}
            None if latest.len() < ACK_FLOWS => latest.push((key, ack)),
            None => {}
        }
    }
    if !any {
        return;
    }
    let mut i = 0;
    tx.retain_mut(|p| {
        let keep = !drop[i];
        i += 1;
        if !keep {
            free.push(std::mem::take(p));
        }
        keep
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;

    /// An IPv4 TCP segment 10.0.0.1:`sport` -> 10.0.0.2:80 with these ACK
    /// number, flags and payload length, and a SACK block if `sack`.
    fn seg(sport: u16, ack: u32, flags: u8, payload: usize, sack: bool) -> Vec<u8> {
        let opts: &[u8] = if sack {
            &[1, 1, 5, 10, 0, 0, 0, 100, 0, 0, 0, 200]
        } else {
            &[]
        };
        let tcp_len = 20 + opts.len();
        let total = 20 + tcp_len + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = ((tcp_len / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&1000u16.to_be_bytes());
        t[20..20 + opts.len()].copy_from_slice(opts);
        p
    }

    fn acks_of(tx: &[Vec<u8>]) -> Vec<(u16, u32)> {
        tx.iter()
            .map(|p| {
                let t = TcpPacket::new_checked(&p[20..]).unwrap();
                (t.src_port(), t.ack_number().0 as u32)
            })
            .collect()
    }

    #[test]
    fn only_the_last_cumulative_ack_of_a_connection_is_left() {
        let mut tx = vec![
            seg(1, 100, ACK, 0, false),
            seg(2, 100, ACK, 0, false),
            seg(1, 200, ACK, 0, false),
            seg(1, 300, ACK, 0, false),
            seg(2, 150, ACK, 0, false),
        ];
        let mut free = Vec::new();
        coalesce_acks(&mut tx, &mut free);
        assert_eq!(acks_of(&tx), [(1, 300), (2, 150)], "order kept");
        assert_eq!(free.len(), 3, "the dropped buffers are recycled");
    }

    #[test]
    fn what_loss_recovery_reads_stays() {
        let mut tx = vec![
            // SACK blocks describe holes.
            seg(1, 150, ACK, 0, true),
            // Data, and a FIN, are not bare ACKs.
            seg(1, 160, ACK, 10, false),
            seg(1, 170, ACK | FIN, 0, false),
            // Duplicate ACKs: the sender counts them.
            seg(1, 180, ACK, 0, false),
            seg(1, 180, ACK, 0, false),
            seg(1, 200, ACK, 0, true),
        ];
        let before = acks_of(&tx);
        coalesce_acks(&mut tx, &mut Vec::new());
        assert_eq!(acks_of(&tx), before);
    }

    #[test]
    fn sequence_numbers_compare_across_the_wrap() {
        let mut tx = vec![seg(1, u32::MAX - 10, ACK, 0, false), seg(1, 5, ACK, 0, false)];
        coalesce_acks(&mut tx, &mut Vec::new());
        assert_eq!(acks_of(&tx), [(1, 5)]);
        // A later ACK behind an earlier one (reordered by nothing here, but
        // never assume): both stay.
        let mut tx = vec![seg(1, 5, ACK, 0, false), seg(1, u32::MAX - 10, ACK, 0, false)];
        coalesce_acks(&mut tx, &mut Vec::new());
        assert_eq!(tx.len(), 2);
    }

    #[test]
    fn connections_past_the_limit_keep_their_acks() {
        let mut tx = Vec::new();
        for port in 0..ACK_FLOWS as u16 + 1 {
            tx.push(seg(port, 100, ACK, 0, false));
        }
        for port in 0..ACK_FLOWS as u16 + 1 {
            tx.push(seg(port, 200, ACK, 0, false));
        }
        coalesce_acks(&mut tx, &mut Vec::new());
        // Walking back, the last ACK_FLOWS connections are tracked; the
        // first one (port 0) is not.
        assert_eq!(tx.len(), ACK_FLOWS as usize + 2);
        assert_eq!(acks_of(&tx[..2]), [(0, 100), (0, 200)]);
    }
}
