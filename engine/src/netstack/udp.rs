//! UDP over the stack.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smoltcp::socket::udp;

use super::signal::{Direction, Interrupter, Signal};
use super::stack::{Binding, Inner, Kind, SockRef};
use super::NetstackError;

/// Datagrams a UDP socket's buffer describes, per 64 KiB of payload room.
const DATAGRAMS_PER_64K: usize = 64;

const UDP_HEADER: usize = 8;

/// The largest IP header the stack sends for `ip`'s family.
pub(crate) fn ip_header_len(ip: IpAddr) -> usize {
    if ip.is_ipv4() {
        20
    } else {
        40
    }
}

/// A UDP socket on the stack's addresses.
pub struct UdpSocket {
    inner: Arc<Inner>,
    sock: SockRef,
    signal: Arc<Signal>,
    waker: Waker,
    local: SocketAddr,
    nonblocking: AtomicBool,
    closed: AtomicBool,
    read_limit: Mutex<Option<Duration>>,
    /// The remote of [`UdpSocket::connect`].
    peer: Mutex<Option<SocketAddr>>,
    /// For a socket bound to the unspecified address, the source address
    /// the stack picks for the connected remote (what `local_addr` shows
    /// once connected, as `getsockname(2)` does on Linux).
    source: Mutex<Option<IpAddr>>,
}

fn packet_buffer(bytes: usize) -> udp::PacketBuffer<'static> {
    let datagrams = (bytes * DATAGRAMS_PER_64K / 65536).max(8);
    udp::PacketBuffer::new(
        vec![udp::PacketMetadata::EMPTY; datagrams],
        vec![0u8; bytes],
    )
}

impl UdpSocket {
    pub(crate) fn bind(inner: &Arc<Inner>, local: SocketAddr) -> Result<UdpSocket, NetstackError> {
        if inner.is_closed() {
            return Err(NetstackError::Closed);
        }
        inner.check_local(local.ip())?;
        let signal = Signal::new();
        let (sock, port) = {
            let mut st = inner.stack.lock();
            st.check_capacity(inner.config.max_sockets)?;
            let bound = st.take_port(Binding::new(Kind::Udp, local))?;
            let mut s = udp::Socket::new(
                packet_buffer(inner.config.udp_buffer),
                packet_buffer(inner.config.udp_buffer),
            );
            if s.bind(bound.endpoint()).is_err() {
                st.free_port(bound);
                return Err(NetstackError::InvalidInput("local address"));
            }
            (st.add(s, Some(bound), signal.clone()), bound.port)
        };
        Ok(UdpSocket {
            inner: inner.clone(),
            sock,
            waker: signal.waker(),
            signal,
            local: SocketAddr::new(local.ip(), port),
            nonblocking: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            read_limit: Mutex::new(None),
            peer: Mutex::new(None),
            source: Mutex::new(None),
        })
    }

    /// The bound address; once connected, a socket bound to the
    /// unspecified address shows the source address its datagrams carry.
    pub fn local_addr(&self) -> SocketAddr {
        match *self.source.lock() {
            Some(ip) => SocketAddr::new(ip, self.local.port()),
            None => self.local,
        }
    }

    /// Wakes a blocked send or receive early (see [`Interrupter`]).
    pub fn interrupter(&self) -> Interrupter {
        Interrupter {
            signal: self.signal.clone(),
        }
    }

    /// As [`super::TcpStream::ready_fd`], for receives (`Read`) and sends
    /// (`Write`) that found nothing to do.
    pub fn ready_fd(&self, dir: Direction) -> io::Result<OwnedFd> {
        self.signal.ready_fd(dir)
    }

    pub fn set_nonblocking(&self, nonblocking: bool) {
        self.nonblocking.store(nonblocking, Relaxed);
    }

    /// Timeout of [`UdpSocket::recv_from`] (`None`: none).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        *self.read_limit.lock() = timeout;
    }

    /// The largest datagram payload to `dst` that fits the MTU.
    pub fn max_payload(&self, dst: IpAddr) -> usize {
        self.inner.mtu - ip_header_len(dst) - UDP_HEADER
    }

    fn check_open(&self) -> Result<(), NetstackError> {
        if self.closed.load(Relaxed) {
            return Err(NetstackError::Closed);
        }
        Ok(())
    }

    /// Connects the socket to `remote`, as `connect(2)` on a UDP socket:
    /// from now on it receives only `remote`'s datagrams, [`UdpSocket::send`]
    /// sends there, and an ICMP destination unreachable about a datagram
    /// to `remote` fails the next send or receive once: `Refused` for port
    /// unreachable or administratively prohibited (a filter's `reject`,
    /// such as the engine's answer to a datagram its policy refuses),
    /// `Unreachable` for net or host unreachable. An unconnected socket
    /// ignores ICMP errors, as on Linux without `IP_RECVERR`.
    pub fn connect(&self, remote: SocketAddr) -> Result<(), NetstackError> {
        self.check_open()?;
        if remote.port() == 0 {
            return Err(NetstackError::InvalidInput("port 0"));
        }
        self.inner.check_route(remote.ip())?;
        let mut peer = self.peer.lock();
        let mut st = self.inner.stack.lock();
        st.connect_udp(self.sock, self.local.port(), remote)?;
        if self.local.ip().is_unspecified() {
            // The address smoltcp puts on a datagram from an unbound socket.
            *self.source.lock() = st
                .iface
                .get_source_address(&remote.ip().into())
                .map(IpAddr::from);
        }
        *peer = Some(remote);
        Ok(())
    }

    /// The remote of [`UdpSocket::connect`], if connected.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        *self.peer.lock()
    }

    /// Sends one datagram to the connected remote ([`UdpSocket::connect`]).
    pub fn send(&self, buf: &[u8]) -> Result<usize, NetstackError> {
        let remote = self
            .peer_addr()
            .ok_or(NetstackError::InvalidInput("not connected"))?;
        self.send_to(buf, remote)
    }

    /// The next datagram from the connected remote, waiting up to the read
    /// timeout; an ICMP error about the remote ends it (see
    /// [`UdpSocket::connect`]).
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, NetstackError> {
        let t = *self.read_limit.lock();
        self.recv_timeout(buf, t)
    }

    /// As [`UdpSocket::recv`], waiting up to `timeout` (`None`: no limit).
    pub fn recv_timeout(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, NetstackError> {
        if self.peer_addr().is_none() {
            return Err(NetstackError::InvalidInput("not connected"));
        }
        self.recv_from_timeout(buf, timeout).map(|(n, _)| n)
    }

    /// Sends one datagram (at most the MTU less headers); waits for room in
    /// the socket's buffer unless non-blocking.
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> Result<usize, NetstackError> {
        self.check_open()?;
        let max = self.max_payload(dst.ip());
        if buf.len() > max {
            return Err(NetstackError::MessageTooLarge {
                len: buf.len(),
                max,
            });
        }
        if dst.port() == 0 {
            return Err(NetstackError::InvalidInput("port 0"));
        }
        self.inner.check_route(dst.ip())?;
        let sock = self.sock;
        let r = self.inner.wait(
            &self.signal,
            Direction::Write,
            None,
            self.nonblocking.load(Relaxed),
            |st| {
                match st.entry(sock) {
                    Err(e) => return Some(Err(e)),
                    Ok(e) => {
                        if let Some(err) = e.error.take() {
                            return Some(Err(err));
                        }
                    }
                }
                let s = st.sockets.get_mut::<udp::Socket>(sock.handle);
                match s.send_slice(buf, dst) {
                    Ok(()) => Some(Ok(buf.len())),
                    Err(udp::SendError::BufferFull) => {
                        s.register_send_waker(&self.waker);
                        None
                    }
                    Err(udp::SendError::Unaddressable) => {
                        Some(Err(NetstackError::InvalidInput("destination")))
                    }
                }
            },
        );
        if r.is_ok() {
            self.inner.kick();
        }
        r
    }

    /// The next datagram and its sender, waiting up to the read timeout. A
    /// datagram longer than `buf` is truncated.
    pub fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), NetstackError> {
        let t = *self.read_limit.lock();
        self.recv_from_timeout(buf, t)
    }

    /// The next datagram and its sender, waiting up to `timeout` (`None`:
    /// no limit).
    pub fn recv_from_timeout(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<(usize, SocketAddr), NetstackError> {
        self.check_open()?;
        let sock = self.sock;
        self.inner.wait(
            &self.signal,
            Direction::Read,
            timeout.map(|t| Instant::now() + t),
            self.nonblocking.load(Relaxed),
            |st| {
                let peer = match st.entry(sock) {
                    Err(e) => return Some(Err(e)),
                    Ok(e) => {
                        if let Some(err) = e.error.take() {
                            return Some(Err(err));
                        }
                        e.udp_peer
                    }
                };
                let s = st.sockets.get_mut::<udp::Socket>(sock.handle);
                loop {
                    match s.recv() {
                        Ok((data, meta)) => {
                            let from = SocketAddr::from(meta.endpoint);
                            // A connected socket drops other sources'
                            // datagrams, as connect(2) does.
                            if peer.is_some_and(|p| p != from) {
                                continue;
                            }
                            let n = data.len().min(buf.len());
                            buf[..n].copy_from_slice(&data[..n]);
                            return Some(Ok((n, from)));
                        }
                        Err(_) => {
                            s.register_recv_waker(&self.waker);
                            return None;
                        }
                    }
                }
            },
        )
    }

    /// Closes the socket; blocked calls wake with `Closed`. Idempotent; also
    /// done on drop.
    pub fn close(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        self.inner.stack.lock().close_now(self.sock);
        self.signal.notify();
    }

    /// True once [`UdpSocket::close`] ran.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        self.close();
    }
}
