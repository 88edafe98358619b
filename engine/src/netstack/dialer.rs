//! Tunnel targets on the mesh: the supervisor tunnel's agent dials
//! addresses the engine routes to a peer through this userspace stack (no
//! TUN device, no root), and everything else through the operating system
//! (k3s's kubelet and stream server on loopback).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Netstack, TcpStream};
use crate::supervisor::{DialedTarget, OsDialer, TargetDialer};

/// A [`TargetDialer`] for [`crate::supervisor::AgentConfig::dialer`]:
/// `tcp` targets whose address is an IP literal inside some peer's
/// AllowedIPs go through `stack`; the rest through [`OsDialer`].
pub struct MeshDialer {
    stack: Arc<Netstack>,
    os: OsDialer,
    /// How long a dial over the mesh may take (handshake included).
    pub timeout: Duration,
}

impl MeshDialer {
    pub fn new(stack: Arc<Netstack>) -> MeshDialer {
        MeshDialer {
            stack,
            os: OsDialer::default(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The mesh address `address` names, if it is one.
    fn mesh_target(&self, proto: &str, address: &str) -> Option<SocketAddr> {
        let addr: SocketAddr = address.parse().ok()?;
        let family_ok = match proto {
            "tcp" => true,
            "tcp4" => addr.is_ipv4(),
            "tcp6" => addr.is_ipv6(),
            _ => false,
        };
        (family_ok && self.stack.reaches(addr.ip())).then_some(addr)
    }
}

impl TargetDialer for MeshDialer {
    fn dial(&self, proto: &str, address: &str) -> io::Result<DialedTarget> {
        let Some(addr) = self.mesh_target(proto, address) else {
            return self.os.dial(proto, address);
        };
        let stream = Arc::new(
            self.stack
                .tcp_connect(addr, Some(self.timeout))
                .map_err(|e| {
                    let kind = io::Error::from(e).kind();
                    io::Error::new(kind, format!("dial {proto} {address} over the mesh: {e}"))
                })?,
        );
        let closer = stream.clone();
        Ok(DialedTarget {
            reader: Box::new(MeshHalf(stream.clone())),
            writer: Box::new(MeshHalf(stream)),
            shutdown: Box::new(move || closer.close()),
        })
    }
}

/// One direction of a shared mesh connection.
struct MeshHalf(Arc<TcpStream>);

impl Read for MeshHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for MeshHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}
