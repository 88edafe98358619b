//! The UDP underlay: one IPv4 and one IPv6 socket on the same port, as
//! wireguard-go does, so each family can be missing without the other
//! failing.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// How long a receive blocks before the receive loop checks for shutdown.
pub const RECV_POLL: Duration = Duration::from_millis(200);

/// Socket buffer size asked of the kernel; bursts of a fast peer would
/// otherwise overflow the default 208 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

pub struct UdpTransport {
    pub v4: Option<UdpSocket>,
    pub v6: Option<UdpSocket>,
    port: u16,
}

fn socket(domain: Domain, fwmark: Option<u32>) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        s.set_only_v6(true)?;
    }
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    if let Some(mark) = fwmark.filter(|&m| m != 0) {
        s.set_mark(mark)?;
    }
    s.set_read_timeout(Some(RECV_POLL))?;
    Ok(s)
}

fn bind(domain: Domain, port: u16, fwmark: Option<u32>) -> io::Result<UdpSocket> {
    let s = socket(domain, fwmark)?;
    let addr: SocketAddr = if domain == Domain::IPV4 {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into()
    };
    s.bind(&addr.into())?;
    Ok(s.into())
}

impl UdpTransport {
    /// Binds both families on `port` (0: a free port, the same for both).
    /// Fails only when neither family can be bound.
    pub fn bind(port: u16, fwmark: Option<u32>) -> io::Result<UdpTransport> {
        let mut last_err = None;
        for _attempt in 0..8 {
            let v4 = bind(Domain::IPV4, port, fwmark);
            let chosen = match &v4 {
                Ok(s) => s.local_addr()?.port(),
                Err(_) => port,
            };
            let v6 = bind(Domain::IPV6, chosen, fwmark);
            match (v4, v6) {
                (Ok(a), Ok(b)) => {
                    return Ok(UdpTransport {
                        v4: Some(a),
                        v6: Some(b),
                        port: chosen,
                    })
                }
                // The random v4 port is taken on v6: try another pair.
                (Ok(_), Err(e)) if port == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                    last_err = Some(e)
                }
                (Ok(a), Err(_)) => {
                    return Ok(UdpTransport {
                        v4: Some(a),
                        v6: None,
                        port: chosen,
                    })
                }
                (Err(_), Ok(b)) => {
                    let chosen = b.local_addr()?.port();
                    return Ok(UdpTransport {
                        v4: None,
                        v6: Some(b),
                        port: chosen,
                    });
                }
                (Err(e), Err(_)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free UDP port")))
    }

    /// Sets (or with `None` clears) SO_MARK on the bound sockets in place.
    pub fn set_mark(&self, fwmark: Option<u32>) -> io::Result<()> {
        for s in self.v4.iter().chain(self.v6.iter()) {
            socket2::SockRef::from(s).set_mark(fwmark.unwrap_or(0))?;
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_for(&self, to: &SocketAddr) -> Option<&UdpSocket> {
        match to {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = normalize(to);
        let sock = self.socket_for(&to).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no socket of that address family",
            )
        })?;
        sock.send_to(datagram, to).map(|_| ())
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
