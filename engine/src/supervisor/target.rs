//! What an agent lets the server reach, how it reaches it, and the copy loop
//! between a tunnel stream and the target.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use super::TunnelStream;

/// Decides whether a Connect for `proto/address` may be dialed.
pub trait ConnectPolicy: Send + Sync {
    fn allows(&self, proto: &str, address: &str) -> bool;
}

impl<F: Fn(&str, &str) -> bool + Send + Sync> ConnectPolicy for F {
    fn allows(&self, proto: &str, address: &str) -> bool {
        self(proto, address)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Net { addr: IpAddr, prefix: u8 },
    Name(String),
}

/// One allowed target: `PROTO/HOST:PORT` where HOST is `*`, an IP address,
/// a CIDR (`10.42.0.0/16`, `[fd00::]/8`) or a host name, and PORT is `*`,
/// a number or a range `LOW-HIGH`. Examples: `tcp/127.0.0.1:10250`,
/// `tcp/10.42.0.0/16:*`, `tcp/[::1]:8000-9000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPattern {
    proto: String,
    host: HostPattern,
    ports: (u16, u16),
}

fn split_host_port(s: &str) -> Option<(&str, &str)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .map_or(Some(host), |h| h.strip_suffix(']'))?;
    Some((host, port))
}

fn prefix_matches(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

impl std::str::FromStr for TargetPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("bad target pattern {s:?} (want PROTO/HOST:PORT, e.g. tcp/127.0.0.1:10250)");
        let (proto, rest) = s.split_once('/').ok_or_else(bad)?;
        // A CIDR has its own '/', before the ':PORT'.
        let (host, port) = if let Some((net, tail)) = rest.split_once('/') {
            let (bits, port) = tail.split_once(':').ok_or_else(bad)?;
            (format!("{net}/{bits}"), port)
        } else {
            let (h, p) = split_host_port(rest).ok_or_else(bad)?;
            (h.to_owned(), p)
        };
        let ports = if port == "*" {
            (0, u16::MAX)
        } else if let Some((lo, hi)) = port.split_once('-') {
            (
                lo.parse().map_err(|_| bad())?,
                hi.parse().map_err(|_| bad())?,
            )
        } else {
            let p = port.parse().map_err(|_| bad())?;
            (p, p)
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some((net, bits)) = host.split_once('/') {
            let net = net.trim_start_matches('[').trim_end_matches(']');
            let addr: IpAddr = net.parse().map_err(|_| bad())?;
            let prefix: u8 = bits.parse().map_err(|_| bad())?;
            if prefix > if addr.is_ipv4() { 32 } else { 128 } {
                return Err(bad());
            }
            HostPattern::Net { addr, prefix }
        } else if let Ok(addr) = host.parse::<IpAddr>() {
            HostPattern::Net {
                addr,
                prefix: if addr.is_ipv4() { 32 } else { 128 },
            }
        } else if !host.is_empty() {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad());
        };
        if proto.is_empty() || ports.0 > ports.1 {
            return Err(bad());
        }
        Ok(Self {
            proto: proto.to_owned(),
            host,
            ports,
        })
    }
}

impl TargetPattern {
    pub fn matches(&self, proto: &str, address: &str) -> bool {
        if proto != self.proto {
            return false;
        }
        let Some((host, port)) = split_host_port(address) else {
            return false;
        };
        let Ok(port) = port.parse::<u16>() else {
            return false;
        };
        if port < self.ports.0 || port > self.ports.1 {
            return false;
        }
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Net { addr, prefix } => host
                .parse()
                .is_ok_and(|ip| prefix_matches(*addr, *prefix, ip)),
            HostPattern::Name(name) => host.eq_ignore_ascii_case(name),
        }
    }
}

/// A list of allowed targets; anything else is refused.
#[derive(Debug, Clone, Default)]
pub struct AllowList(pub Vec<TargetPattern>);

impl AllowList {
    /// What a k3s agent allows: the kubelet (10250) and the container stream
    /// server (10010) on loopback.
    pub fn k3s_default() -> Self {
        let patterns = [
            "tcp/127.0.0.1:10250",
            "tcp/127.0.0.1:10010",
            "tcp/[::1]:10250",
            "tcp/[::1]:10010",
        ];
        Self(
            patterns
                .iter()
                .map(|p| p.parse().expect("valid built-in pattern"))
                .collect(),
        )
    }
}

impl ConnectPolicy for AllowList {
    fn allows(&self, proto: &str, address: &str) -> bool {
        self.0.iter().any(|p| p.matches(proto, address))
    }
}

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

const COPY_BUF: usize = 32 << 10;
const PUMP_STACK: usize = 256 << 10;

/// Copies both ways between `stream` and `target` until either side ends;
/// then ends both (the protocol has no half-close). Blocks the calling
/// thread; uses one more thread for the other direction.
pub fn pump(stream: TunnelStream, target: DialedTarget) {
    let stream = Arc::new(stream);
    let DialedTarget {
        mut reader,
        mut writer,
        shutdown,
    } = target;
    let shutdown: Arc<dyn Fn() + Send + Sync> = Arc::from(shutdown);
    let up_stream = stream.clone();
    let up_shutdown = shutdown.clone();
    let up = std::thread::Builder::new()
        .name("tunnel-pump".into())
        .stack_size(PUMP_STACK)
        .spawn(move || {
            let mut buf = vec![0u8; COPY_BUF];
            let error = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => {
                        if (&*up_stream).write_all(&buf[..n]).is_err() {
                            break None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e.to_string()),
                }
            };
            up_stream.close_with(error.as_deref());
            up_shutdown();
        });
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = writer.flush();
    stream.close();
    shutdown();
    if let Ok(handle) = up {
        let _ = handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(patterns: &[&str]) -> AllowList {
        AllowList(patterns.iter().map(|p| p.parse().unwrap()).collect())
    }

    #[test]
    fn default_allows_only_kubelet_and_stream_ports_on_loopback() {
        let k3s = AllowList::k3s_default();
        assert!(k3s.allows("tcp", "127.0.0.1:10250"));
        assert!(k3s.allows("tcp", "127.0.0.1:10010"));
        assert!(k3s.allows("tcp", "[::1]:10250"));
        assert!(!k3s.allows("tcp", "127.0.0.1:22"));
        assert!(!k3s.allows("tcp", "10.0.0.1:10250"));
        assert!(!k3s.allows("udp", "127.0.0.1:10250"));
        assert!(!k3s.allows("tcp", "127.0.0.1:10250x"));
        assert!(!k3s.allows("tcp", "localhost:10250"));
    }

    #[test]
    fn patterns() {
        let list = allow(&[
            "tcp/10.42.0.0/16:*",
            "tcp/[fd00::]/8:80-90",
            "tcp/api.internal:443",
            "tcp/*:7",
        ]);
        assert!(list.allows("tcp", "10.42.3.4:1"));
        assert!(!list.allows("tcp", "10.43.0.1:1"));
        assert!(list.allows("tcp", "[fd12::1]:85"));
        assert!(!list.allows("tcp", "[fd12::1]:91"));
        assert!(list.allows("tcp", "API.internal:443"));
        assert!(list.allows("tcp", "anything:7"));
        for bad in [
            "tcp",
            "tcp/1.2.3.4",
            "/1.2.3.4:1",
            "tcp/1.2.3.4:x",
            "tcp/1.2.3.4/33:1",
            "tcp/1.2.3.4:9-1",
        ] {
            assert!(bad.parse::<TargetPattern>().is_err(), "{bad}");
        }
    }
}
