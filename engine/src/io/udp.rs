//! The UDP underlay: one IPv4 and one IPv6 socket on the same port, as
//! wireguard-go does, so each family can be missing without the other
//! failing.
//!
//! I/O is batched: receives take up to [`RECV_BATCH`] datagrams per syscall
//! (recvmmsg) and, where the kernel has UDP GRO, each of those may be a
//! train of equal-sized datagrams; sends of a run of equal-sized datagrams
//! to one destination go out in one syscall with UDP GSO. quinn-udp does the
//! control-message work and falls back to one datagram per call where the
//! kernel lacks an offload.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// How long a receive waits before the receive loop checks for shutdown.
pub const RECV_POLL: Duration = Duration::from_millis(200);

/// Datagrams (or GRO trains) per receive syscall.
pub const RECV_BATCH: usize = 32;

/// Largest UDP payload; a GRO train is at most this long too.
pub const MAX_DATAGRAM: usize = 65535;

/// The most UDP payload one send may carry to `to`, a GSO run's segments
/// together: what the IP length field leaves. IPv4's total length counts
/// its own 20-byte header and UDP's 8; IPv6's payload length counts only
/// UDP's. Past it the kernel refuses the whole run (EMSGSIZE).
fn max_send_payload(to: &SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => 65535 - 20 - 8,
        SocketAddr::V6(_) => 65535 - 8,
    }
}

/// Socket buffer size asked of the kernel; bursts of a fast peer would
/// otherwise overflow the default 208 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

/// How long, in all, a send waits for room in a full socket buffer before
/// its datagrams are dropped (IP semantics: the sender's TCP retransmits;
/// the engine counts them in `EngineStats::udp_send_dropped`).
///
/// wireguard-go's sends block until the socket is writable; the bound keeps
/// a socket that never drains from holding the sending thread for good. It
/// is well under the userspace stack's 200 ms minimum RTO: a GSO run of a
/// few dozen segments dropped because the receiving thread was descheduled
/// for a few milliseconds (5 ms before) cost the stack a retransmission
/// timeout and a lost tail.
pub const SEND_WAIT: Duration = Duration::from_millis(100);

/// One bound socket and its offload state.
pub struct BoundSocket {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl BoundSocket {
    fn bind(domain: Domain, port: u16, fwmark: Option<u32>) -> io::Result<BoundSocket> {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if domain == Domain::IPV6 {
            s.set_only_v6(true)?;
        }
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        if let Some(mark) = fwmark.filter(|&m| m != 0) {
            s.set_mark(mark)?;
        }
        let addr: SocketAddr = if domain == Domain::IPV4 {
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()
        } else {
            SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into()
        };
        s.bind(&addr.into())?;
        let socket: UdpSocket = s.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        Ok(BoundSocket { socket, state })
    }

    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Sends `contents` to `to`, as one datagram, or with `segment_size` as
    /// datagrams of that size (the last may be shorter) in as few syscalls
    /// as the kernel allows: each GSO send at most its segment count and
    /// `max_send_payload` bytes.
    pub fn send(
        &self,
        contents: &[u8],
        segment_size: Option<usize>,
        to: SocketAddr,
    ) -> io::Result<()> {
        match segment_size {
            Some(seg) if contents.len() > seg => {
                let max = self
                    .state
                    .max_gso_segments()
                    .min(max_send_payload(&to) / seg)
                    .max(1);
                for chunk in contents.chunks(seg * max) {
                    let seg = if chunk.len() > seg { Some(seg) } else { None };
                    self.send_one(chunk, seg, to)?;
                }
                Ok(())
            }
            _ => self.send_one(contents, None, to),
        }
    }

    fn send_one(
        &self,
        contents: &[u8],
        segment_size: Option<usize>,
        to: SocketAddr,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        retry_while_blocked(
            SEND_WAIT,
            || self.state.try_send(UdpSockRef::from(&self.socket), &t),
            |left| super::poll(self.socket.as_raw_fd(), libc::POLLOUT, left).map(drop),
        )
    }

    /// Waits up to `timeout` for datagrams and receives a batch into
    /// `batch`; returns how many entries of `batch.meta` are filled.
    pub fn recv(&self, batch: &mut RecvBatch, timeout: Duration) -> io::Result<usize> {
        if !super::poll(self.socket.as_raw_fd(), libc::POLLIN, timeout)? {
            return Ok(0);
        }
        let mut bufs = batch.bufs.iter_mut();
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(bufs.next().expect("RECV_BATCH buffers")));
        match self
            .state
            .recv(UdpSockRef::from(&self.socket), &mut slices, &mut batch.meta)
        {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// How many segments one GSO send may carry here (1: no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }
}

/// Calls `send` until it does not report `WouldBlock`, waiting with `wait`
/// (for the socket to become writable, at most the time given) in between,
/// for `budget` in all; then the last `WouldBlock` is returned.
fn retry_while_blocked(
    budget: Duration,
    mut send: impl FnMut() -> io::Result<()>,
    mut wait: impl FnMut(Duration) -> io::Result<()>,
) -> io::Result<()> {
    let deadline = Instant::now() + budget;
    loop {
        match send() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Wait for the socket, not a fixed time: poll wakes as soon
                // as the kernel has room again, and a run is retried as
                // often as it takes within the budget.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                wait(left)?;
            }
            r => return r,
        }
    }
}

/// Receive buffers for one thread, reused across calls.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    meta: Vec<RecvMeta>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: (0..RECV_BATCH)
                .map(|_| vec![0u8; MAX_DATAGRAM].into_boxed_slice())
                .collect(),
            meta: vec![RecvMeta::default(); RECV_BATCH],
        }
    }
}

impl RecvBatch {
    /// The datagrams of the first `n` entries, GRO trains split: calls `f`
    /// with (source, datagram) for each.
    pub fn for_each(&self, n: usize, mut f: impl FnMut(SocketAddr, &[u8])) {
        for (meta, buf) in self.meta.iter().zip(&self.bufs).take(n) {
            let data = &buf[..meta.len.min(buf.len())];
            if data.is_empty() {
                // A zero-length datagram is still a datagram (to be counted).
                f(meta.addr, data);
                continue;
            }
            let stride = if meta.stride == 0 {
                data.len()
            } else {
                meta.stride
            };
            for d in data.chunks(stride) {
                f(meta.addr, d);
            }
        }
    }
}

/// The host has no such address family: the only bind failure that leaves
/// a family out instead of failing the transport.
fn family_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

pub struct UdpTransport {
    pub v4: Option<BoundSocket>,
    pub v6: Option<BoundSocket>,
    port: u16,
}

impl UdpTransport {
    /// Binds both families on `port` (0: a free port, the same for both).
    /// A family the host does not have (IPv6 disabled at boot) is left
    /// out; any other failure fails the whole bind, as wireguard-go's
    /// `StdNetBind.Open` does. A port held on one family by another socket
    /// (a daemon killed a moment ago, whose sockets the kernel is still
    /// closing) would otherwise come up on the other family alone, with
    /// the first family's UDP silently dead while a relay hid it.
    pub fn bind(port: u16, fwmark: Option<u32>) -> io::Result<UdpTransport> {
        let mut last_err = None;
        for _attempt in 0..8 {
            let v4 = match BoundSocket::bind(Domain::IPV4, port, fwmark) {
                Ok(s) => Some(s),
                Err(e) if family_missing(&e) => None,
                Err(e) => return Err(e),
            };
            let chosen = match &v4 {
                Some(s) => s.local_port()?,
                None => port,
            };
            let v6 = match BoundSocket::bind(Domain::IPV6, chosen, fwmark) {
                Ok(s) => Some(s),
                Err(e) if family_missing(&e) => None,
                // The random v4 port is taken on v6: try another pair.
                Err(e) if port == 0 && v4.is_some() && e.kind() == io::ErrorKind::AddrInUse => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let port = match (&v4, &v6) {
                (Some(_), _) => chosen,
                (None, Some(b)) => b.local_port()?,
                (None, None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "neither IPv4 nor IPv6 is available",
                    ))
                }
            };
            return Ok(UdpTransport { v4, v6, port });
        }
        Err(last_err
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free UDP port")))
    }

    /// Sets (or with `None` clears) SO_MARK on the bound sockets in place.
    pub fn set_mark(&self, fwmark: Option<u32>) -> io::Result<()> {
        for s in self.v4.iter().chain(self.v6.iter()) {
            socket2::SockRef::from(&s.socket).set_mark(fwmark.unwrap_or(0))?;
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_for(&self, to: &SocketAddr) -> Option<&BoundSocket> {
        match to {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    /// Sends one datagram, or a run of `segment_size` datagrams.
    pub fn send(
        &self,
        contents: &[u8],
        segment_size: Option<usize>,
        to: SocketAddr,
    ) -> io::Result<()> {
        let to = normalize(to);
        let sock = self.socket_for(&to).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no socket of that address family",
            )
        })?;
        sock.send(contents, segment_size, to)
    }

    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.send(datagram, None, to)
    }
}

/// `[::ffff:a.b.c.d]:p` becomes `a.b.c.d:p`, so it goes out the v4 socket.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked() -> io::Error {
        io::Error::from(io::ErrorKind::WouldBlock)
    }

    #[test]
    fn a_send_that_would_block_is_retried_until_the_socket_takes_it() {
        // The socket stays full for several wake-ups (a descheduled
        // receiver): the run must still leave, not be dropped after one
        // retry.
        let mut attempts = 0;
        let mut waits = 0;
        let r = retry_while_blocked(
            Duration::from_secs(5),
            || {
                attempts += 1;
                if attempts <= 4 {
                    Err(blocked())
                } else {
                    Ok(())
                }
            },
            |left| {
                assert!(left <= Duration::from_secs(5));
                waits += 1;
                Ok(())
            },
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((attempts, waits), (5, 4));
    }

    #[test]
    fn a_send_blocked_past_the_budget_fails_as_would_block() {
        let mut attempts = 0u32;
        let r = retry_while_blocked(
            Duration::from_millis(30),
            || {
                attempts += 1;
                Err(blocked())
            },
            |left| {
                std::thread::sleep(left.min(Duration::from_millis(5)));
                Ok(())
            },
        );
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // Bounded: a handful of attempts, then the error.
        assert!((2..=10).contains(&attempts), "{attempts}");
    }

    /// A run whose datagrams add up to more than one IP packet can carry
    /// (64 KiB less the headers), but less than 64 KiB: every datagram
    /// arrives. One GSO send of it fails with EMSGSIZE, which dropped the
    /// whole run (45 full WireGuard datagrams and a short one, about once
    /// per GiB of a bulk transfer).
    #[test]
    fn a_run_longer_than_one_ip_packet_arrives_whole() {
        const SEG: usize = 1452;
        for (bind, rx_addr) in [(Domain::IPV4, "127.0.0.1:0"), (Domain::IPV6, "[::1]:0")] {
            let Ok(rx) = UdpSocket::bind(rx_addr) else {
                continue; // no IPv6 loopback here
            };
            rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let to = rx.local_addr().unwrap();
            let tx = BoundSocket::bind(bind, 0, None).unwrap();
            // 45 full segments and a last one that takes the run past the
            // family's limit but not past 65535.
            let last = max_send_payload(&to) - 45 * SEG + 3;
            let mut run: Vec<u8> = (0..45).flat_map(|i| [i as u8; SEG]).collect();
            run.extend(vec![45u8; last]);
            assert!(run.len() > max_send_payload(&to) && run.len() <= MAX_DATAGRAM);
            tx.send(&run, Some(SEG), to).unwrap();
            let mut buf = vec![0u8; MAX_DATAGRAM];
            for i in 0..46 {
                let n = rx.recv(&mut buf).unwrap();
                assert_eq!(n, if i < 45 { SEG } else { last }, "datagram {i} to {to}");
                assert!(
                    buf[..n].iter().all(|&b| b == i as u8),
                    "datagram {i} to {to}"
                );
            }
        }
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut attempts = 0;
        let r = retry_while_blocked(
            Duration::from_secs(5),
            || {
                attempts += 1;
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            },
            |_| panic!("no wait for an error other than WouldBlock"),
        );
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(attempts, 1);
    }
}
