//! Opening connections to targets: what the supervisor tunnel's agent
//! dials for its server, through the operating system ([`OsDialer`]) or
//! through the userspace stack (`netstack::MeshDialer`).
//!
//! Here, below both the stack and the tunnel runtime, so that either can
//! implement or use a dialer without knowing the other.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A connected target, as two halves and a way to end both.
pub struct DialedTarget {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Ends both directions; must wake a reader blocked in `reader`.
    pub shutdown: Box<dyn Fn() + Send + Sync>,
}

/// Opens connections to allowed targets: [`OsDialer`] by default;
/// `netstack::MeshDialer` sends mesh addresses through the userspace stack.
pub trait TargetDialer: Send + Sync {
    fn dial(&self, proto: &str, address: &str) -> io::Result<DialedTarget>;
}

/// Dials TCP through the operating system.
#[derive(Debug, Clone)]
pub struct OsDialer {
    /// Per address tried (Go uses one minute for the whole dial).
    pub timeout: Duration,
}

impl Default for OsDialer {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
        }
    }
}

impl DialedTarget {
    /// Wraps a connected TCP stream.
    pub fn from_tcp(stream: TcpStream) -> io::Result<Self> {
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Ok(Self {
            reader: Box::new(reader),
            writer: Box::new(stream),
            shutdown: Box::new(move || {
                let _ = closer.shutdown(Shutdown::Both);
            }),
        })
    }
}

impl TargetDialer for OsDialer {
    fn dial(&self, proto: &str, address: &str) -> io::Result<DialedTarget> {
        if !matches!(proto, "tcp" | "tcp4" | "tcp6") {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("unsupported network {proto}"),
            ));
        }
        let addrs: Vec<SocketAddr> = address
            .to_socket_addrs()?
            .filter(|a| match proto {
                "tcp4" => a.is_ipv4(),
                "tcp6" => a.is_ipv6(),
                _ => true,
            })
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("no address for {address}"));
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(s) => return DialedTarget::from_tcp(s),
                Err(e) => last = io::Error::new(e.kind(), format!("dial {proto} {address}: {e}")),
            }
        }
        Err(last)
    }
}
