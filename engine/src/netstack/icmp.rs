//! ICMP echo ("ping") from the stack. Echo requests to the stack's own
//! addresses are answered by smoltcp itself.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::phy::Device;
use smoltcp::socket::icmp;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress};

use super::signal::{Direction, Signal};
use super::stack::{Binding, Inner, Kind};
use super::NetstackError;

const ECHO_PAYLOAD: usize = 16;
const SEQ_NO: u16 = 1;

fn buffer() -> icmp::PacketBuffer<'static> {
    icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 1024])
}

/// Sends one echo request to `addr` and waits up to `timeout` (`None`: no
/// limit) for the reply that carries the same identifier, sequence number
/// and payload; an interrupt of `signal` ends the wait early.
pub(crate) fn ping(
    inner: &Arc<Inner>,
    addr: IpAddr,
    timeout: Option<Duration>,
    signal: Arc<Signal>,
) -> Result<Duration, NetstackError> {
    inner.check_route(addr)?;
    let payload: [u8; ECHO_PAYLOAD] = {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        nanos.to_be_bytes()
    };
    let waker = signal.waker();
    let deadline = timeout.map(|t| Instant::now() + t);
    let (sock, ident, sent) = {
        let mut st = inner.stack.lock();
        st.check_capacity(inner.config.max_sockets)?;
        let bound = st.take_port(Binding::ephemeral(Kind::Icmp))?;
        let ident = bound.port;
        let mut s = icmp::Socket::new(buffer(), buffer());
        if s.bind(icmp::Endpoint::Ident(ident)).is_err() {
            st.free_port(bound);
            return Err(NetstackError::InvalidInput("ICMP identifier"));
        }
        let caps = st.device.capabilities();
        let dst = IpAddress::from(addr);
        let sent = match addr {
            IpAddr::V4(_) => {
                let repr = Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no: SEQ_NO,
                    data: &payload,
                };
                let buf = s
                    .send(repr.buffer_len(), dst)
                    .map_err(|_| NetstackError::InvalidInput("destination"))?;
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps.checksum);
                Instant::now()
            }
            IpAddr::V6(v6) => {
                let src = st.iface.get_source_address_ipv6(&v6);
                let repr = Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no: SEQ_NO,
                    data: &payload,
                };
                let buf = s
                    .send(repr.buffer_len(), dst)
                    .map_err(|_| NetstackError::InvalidInput("destination"))?;
                repr.emit(
                    &src,
                    &v6,
                    &mut Icmpv6Packet::new_unchecked(buf),
                    &caps.checksum,
                );
                Instant::now()
            }
        };
        s.register_recv_waker(&waker);
        (st.add(s, Some(bound), signal.clone()), ident, sent)
    };
    inner.kick();
    let r = inner.wait(&signal, Direction::Read, deadline, false, |st| {
        if let Err(e) = st.entry(sock) {
            return Some(Err(e));
        }
        let caps = st.device.capabilities();
        let our_v6 = match addr {
            IpAddr::V6(v6) => Some(st.iface.get_source_address_ipv6(&v6)),
            IpAddr::V4(_) => None,
        };
        let s = st.sockets.get_mut::<icmp::Socket>(sock.handle);
        while let Ok((data, from)) = s.recv() {
            if IpAddr::from(from) != addr {
                continue;
            }
            let matches = match (addr, our_v6) {
                (IpAddr::V4(_), _) => Icmpv4Packet::new_checked(data)
                    .and_then(|p| Icmpv4Repr::parse(&p, &caps.checksum))
                    .is_ok_and(|r| {
                        matches!(r, Icmpv4Repr::EchoReply { ident: i, seq_no, data }
                            if i == ident && seq_no == SEQ_NO && data == payload)
                    }),
                (IpAddr::V6(v6), Some(ours)) => Icmpv6Packet::new_checked(data)
                    .and_then(|p| Icmpv6Repr::parse(&v6, &ours, &p, &caps.checksum))
                    .is_ok_and(|r| {
                        matches!(r, Icmpv6Repr::EchoReply { ident: i, seq_no, data }
                            if i == ident && seq_no == SEQ_NO && data == payload)
                    }),
                _ => false,
            };
            if matches {
                return Some(Ok(sent.elapsed()));
            }
        }
        s.register_recv_waker(&waker);
        None
    });
    inner.stack.lock().close_now(sock);
    r
}
