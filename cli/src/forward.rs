//! `meshvpn forward`: port forwarding through the userspace stack, with no
//! root and no TUN device.
//!
//! ```text
//!   --local  127.0.0.1:8080=10.0.0.2:80       local TCP listener --> mesh dial (what onetun does)
//!   --local  127.0.0.1:5353=10.0.0.2:53/udp   local UDP socket  --> mesh datagrams
//!   --remote 10.0.0.1:2222=127.0.0.1:22       mesh listener     --> local dial
//!   --remote 10.0.0.1:5353=127.0.0.1:53/udp   mesh UDP socket   --> local datagrams
//! ```
//!
//! Each TCP connection gets two threads (one per direction); each UDP
//! client gets a session (its own socket on the far side) that ends after
//! [`UDP_IDLE`] without traffic. Connections log at debug, counts at info.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshvpn_engine::netstack::{Splice, TcpStream as MeshStream, UdpSocket as MeshUdp};
use meshvpn_engine::{Engine, Netstack, NetstackConfig, NetstackError};

/// A UDP session without traffic this long ends.
const UDP_IDLE: Duration = Duration::from_secs(120);
/// UDP sessions per forward at most; new clients beyond are dropped.
const UDP_SESSIONS: usize = 1024;
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often blocking loops look at the stop flag.
const TICK: Duration = Duration::from_millis(200);
/// Default of `--tcp-buffer`: each mesh TCP connection's receive buffer.
/// It is the window the far end may have in flight, so it caps a download
/// at about buffer / RTT: the stack's 256 KiB default held `meshvpn
/// forward` to about 1 Gbit/s at the 1-2 ms a loaded host shows, below TUN
/// mode, whose kernel TCP grows its window to several MiB (Linux's
/// `tcp_rmem` maximum is 6 MiB). The buffers are allocated per connection
/// but only touched as data flows.
pub const TCP_BUFFER: usize = 1 << 20;
/// Default of `--tcp-send-buffer`: each mesh TCP connection's send buffer,
/// which bounds what an upload has in flight (sent and not yet
/// acknowledged) the same way. 4 MiB is Linux's `tcp_wmem` maximum; with
/// 1 MiB an upload through `forward` stayed at 0.8x TUN mode against a
/// peer that was not the limit.
pub const TCP_SEND_BUFFER: usize = 4 << 20;

/// Arguments of `meshvpn forward`.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// wg-quick configuration; its `Address =` lines are the stack's addresses.
    #[arg(short = 'c', long = "config")]
    pub config: PathBuf,
    /// Accept on a local address and forward into the mesh.
    #[arg(long = "local", value_name = "ADDR=MESHADDR[/udp]")]
    pub local: Vec<Forward>,
    /// Listen on a mesh address of this engine and forward to a local service.
    #[arg(long = "remote", value_name = "MESHADDR=ADDR[/udp]")]
    pub remote: Vec<Forward>,
    /// Receive buffer of each mesh TCP connection, in bytes (it is the
    /// window: a connection receives at most about this much per round
    /// trip).
    #[arg(long = "tcp-buffer", value_name = "BYTES", default_value_t = TCP_BUFFER)]
    pub tcp_buffer: usize,
    /// Send buffer of each mesh TCP connection, in bytes (a connection
    /// sends at most about this much per round trip).
    #[arg(long = "tcp-send-buffer", value_name = "BYTES", default_value_t = TCP_SEND_BUFFER)]
    pub tcp_send_buffer: usize,
}

/// One `FROM=TO[/udp]` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub udp: bool,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Forward, String> {
        let (rule, udp) = match s.strip_suffix("/udp") {
            Some(r) => (r, true),
            None => (s.strip_suffix("/tcp").unwrap_or(s), false),
        };
        let (from, to) = rule
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected FROM=TO, e.g. 127.0.0.1:8080=10.0.0.2:80"))?;
        let parse = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("`{a}` is not an IP:port ([v6]:port for IPv6)"))
        };
        Ok(Forward {
            from: parse(from)?,
            to: parse(to)?,
            udp,
        })
    }
}

/// A running set of forwards. Dropping it stops them.
pub struct Forwarder {
    pub engine: Arc<Engine>,
    pub stack: Arc<Netstack>,
    /// Local addresses actually bound by `--local` rules, in order (port 0
    /// in a rule picks one).
    pub local_addrs: Vec<SocketAddr>,
    _rules: Rules,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self._rules.stop.store(true, Relaxed);
        self.stack.close();
        self.engine.close();
    }
}

/// The forwards of some rules on a stack someone else owns (`meshvpn up
/// --userspace`); dropping it stops the local listeners. Mesh listeners
/// end with their stack.
pub struct Rules {
    /// Local addresses bound by the `local` rules, in order.
    pub local_addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
}

impl Drop for Rules {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

#[derive(Default)]
struct Counts {
    active: AtomicU64,
    total: AtomicU64,
    failed: AtomicU64,
}

/// Runs until killed.
pub fn run(args: ForwardArgs) -> Result<(), String> {
    let fw = start(&args)?;
    tracing::info!(local = ?fw.local_addrs, remote = args.remote.len(), "forward: running");
    let mut last = (u64::MAX, u64::MAX);
    loop {
        std::thread::sleep(Duration::from_secs(30));
        let s = fw.stack.stats();
        let now = (s.sockets as u64, s.rx_dropped);
        if now != last {
            tracing::info!(
                sockets = s.sockets,
                rx_dropped = s.rx_dropped,
                "forward: stack"
            );
            last = now;
        }
    }
}

/// Starts the engine, its stack and every forward.
pub fn start(args: &ForwardArgs) -> Result<Forwarder, String> {
    if args.local.is_empty() && args.remote.is_empty() {
        return Err("nothing to forward: give --local and/or --remote".into());
    }
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| format!("{}: {e}", args.config.display()))?;
    let config = meshvpn_engine::config::parse_wg_quick(&text)
        .map_err(|e| format!("{}: {e}", args.config.display()))?;
    if config.interface.addresses.is_empty() {
        return Err(format!(
            "{}: forward needs `Address =` in [Interface] (the mesh addresses to use)",
            args.config.display()
        ));
    }
    let engine = Arc::new(Engine::new(&config).map_err(|e| e.to_string())?);
    let stack_config = NetstackConfig {
        tcp_rx_buffer: args.tcp_buffer,
        tcp_tx_buffer: args.tcp_send_buffer,
        ..NetstackConfig::default()
    };
    let stack = Arc::new(Netstack::attach(&engine, stack_config).map_err(|e| e.to_string())?);
    let rules = start_rules(&stack, &args.local, &args.remote)?;
    Ok(Forwarder {
        engine,
        stack,
        local_addrs: rules.local_addrs.clone(),
        _rules: rules,
    })
}

/// Starts `local` (local listener to mesh dial) and `remote` (mesh
/// listener to local dial) forwards on `stack`.
pub fn start_rules(
    stack: &Arc<Netstack>,
    local: &[Forward],
    remote: &[Forward],
) -> Result<Rules, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut local_addrs = Vec::new();
    for &f in local {
        let bound = if f.udp {
            let sock = std::net::UdpSocket::bind(f.from).map_err(|e| format!("{}: {e}", f.from))?;
            let _ = sock.set_read_timeout(Some(TICK));
            let at = sock.local_addr().map_err(|e| e.to_string())?;
            let stack = stack.clone();
            let new_back = move || {
                let any = if f.to.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                stack
                    .udp_bind(any.parse().unwrap())
                    .map_err(io::Error::from)
            };
            spawn_udp(Arc::new(sock), f.to, new_back, stop.clone(), counts.clone());
            at
        } else {
            let listener =
                std::net::TcpListener::bind(f.from).map_err(|e| format!("{}: {e}", f.from))?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let at = listener.local_addr().map_err(|e| e.to_string())?;
            let (stack, stop, counts, to) = (stack.clone(), stop.clone(), counts.clone(), f.to);
            std::thread::spawn(move || {
                let accept = || loop {
                    if stop.load(Relaxed) {
                        return None;
                    }
                    match listener.accept() {
                        // The splice makes it non-blocking.
                        Ok(accepted) => return Some(accepted),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "forward: local accept");
                            std::thread::sleep(TICK);
                        }
                    }
                };
                let dial = move || stack.tcp_connect(to, Some(DIAL_TIMEOUT));
                serve_tcp(accept, dial, to, counts)
            });
            at
        };
        tracing::info!(local = %bound, mesh = %f.to, udp = f.udp, "forward: local -> mesh");
        local_addrs.push(bound);
    }
    for &f in remote {
        if f.udp {
            let sock = stack
                .udp_bind(f.from)
                .map_err(|e| format!("{}: {e}", f.from))?;
            sock.set_read_timeout(Some(TICK));
            let to = f.to;
            let new_back = move || {
                let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                let s = std::net::UdpSocket::bind(any)?;
                s.set_read_timeout(Some(TICK))?;
                Ok(s)
            };
            spawn_udp(Arc::new(sock), f.to, new_back, stop.clone(), counts.clone());
        } else {
            let listener = stack
                .tcp_listen(f.from, 128)
                .map_err(|e| format!("{}: {e}", f.from))?;
            let (to, counts) = (f.to, counts.clone());
            std::thread::spawn(move || {
                let accept = || listener.accept_timeout(None).ok();
                let dial = move || std::net::TcpStream::connect_timeout(&to, DIAL_TIMEOUT);
                serve_tcp(accept, dial, to, counts)
            });
        }
        tracing::info!(mesh = %f.from, local = %f.to, udp = f.udp, "forward: mesh -> local");
    }
    Ok(Rules { local_addrs, stop })
}

/// The two ends of a forwarded TCP connection, in either order: a kernel
/// socket and a mesh connection, which the stack's thread splices.
trait SplicePair<B>: Sized {
    fn splice(self, b: B) -> Result<Splice, NetstackError>;
}

impl SplicePair<MeshStream> for std::net::TcpStream {
    fn splice(self, mesh: MeshStream) -> Result<Splice, NetstackError> {
        mesh.splice(self)
    }
}

impl SplicePair<std::net::TcpStream> for MeshStream {
    fn splice(self, kernel: std::net::TcpStream) -> Result<Splice, NetstackError> {
        MeshStream::splice(self, kernel)
    }
}

/// Accepts connections from `accept` (until it returns `None`) and splices
/// each to a connection from `dial`. The stack's thread moves the bytes;
/// one thread per connection only dials and then waits for the end, to
/// log it.
fn serve_tcp<A, B, E>(
    accept: impl Fn() -> Option<(A, SocketAddr)>,
    dial: impl Fn() -> Result<B, E> + Send + Sync + 'static,
    to: SocketAddr,
    counts: Arc<Counts>,
) where
    A: SplicePair<B> + Send + 'static,
    B: Send + 'static,
    E: std::fmt::Display,
{
    let dial = Arc::new(dial);
    while let Some((conn, from)) = accept() {
        let (dial, counts) = (dial.clone(), counts.clone());
        std::thread::spawn(move || {
            let back = match dial() {
                Ok(b) => b,
                Err(e) => {
                    counts.failed.fetch_add(1, Relaxed);
                    tracing::info!(%from, %to, error = %e, "forward: dial failed");
                    return;
                }
            };
            let splice = match conn.splice(back) {
                Ok(s) => s,
                Err(e) => {
                    counts.failed.fetch_add(1, Relaxed);
                    tracing::info!(%from, %to, error = %e, "forward: splice failed");
                    return;
                }
            };
            let active = counts.active.fetch_add(1, Relaxed) + 1;
            let total = counts.total.fetch_add(1, Relaxed) + 1;
            tracing::debug!(%from, %to, active, total, "forward: connection open");
            let t = Instant::now();
            let end = splice.wait(None);
            let (up, down) = splice.moved();
            let active = counts.active.fetch_sub(1, Relaxed) - 1;
            tracing::debug!(
                %from, %to, up, down,
                clean = end.is_some_and(|r| r.clean),
                secs = t.elapsed().as_secs_f64(),
                "forward: connection closed"
            );
            tracing::info!(
                active,
                total = counts.total.load(Relaxed),
                failed = counts.failed.load(Relaxed),
                "forward: connections"
            );
        });
    }
}

/// A datagram socket the forwarder can relay: a kernel UDP socket or a
/// mesh one. `recv` gives `None` when its read timeout passes.
trait Datagrams: Send + Sync + 'static {
    fn send(&self, buf: &[u8], to: SocketAddr) -> io::Result<()>;
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>>;
}

impl Datagrams for std::net::UdpSocket {
    fn send(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        self.send_to(buf, to).map(|_| ())
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        match self.recv_from(buf) {
            Ok(r) => Ok(Some(r)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Datagrams for MeshUdp {
    fn send(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        self.send_to(buf, to).map(|_| ()).map_err(io::Error::from)
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        match self.recv_from(buf) {
            Ok(r) => Ok(Some(r)),
            Err(NetstackError::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

type Sessions<B> = Arc<Mutex<HashMap<SocketAddr, Arc<B>>>>;

fn table<B>(sessions: &Sessions<B>) -> MutexGuard<'_, HashMap<SocketAddr, Arc<B>>> {
    sessions.lock().unwrap_or_else(|e| e.into_inner())
}

/// Relays datagrams arriving on `front` to `to`, each client through its
/// own socket from `new_back` so replies find their way back.
fn spawn_udp<F: Datagrams, B: Datagrams>(
    front: Arc<F>,
    to: SocketAddr,
    new_back: impl Fn() -> io::Result<B> + Send + 'static,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    std::thread::spawn(move || {
        let sessions: Sessions<B> = Arc::default();
        let mut buf = vec![0u8; 65535];
        while !stop.load(Relaxed) {
            let (n, client) = match front.recv(&mut buf) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(_) => return,
            };
            let existing = table(&sessions).get(&client).cloned();
            let back = match existing {
                Some(b) => b,
                None => {
                    if table(&sessions).len() >= UDP_SESSIONS {
                        continue;
                    }
                    let Ok(b) = new_back() else {
                        counts.failed.fetch_add(1, Relaxed);
                        continue;
                    };
                    let b = Arc::new(b);
                    table(&sessions).insert(client, b.clone());
                    counts.total.fetch_add(1, Relaxed);
                    tracing::debug!(%client, %to, "forward: UDP session open");
                    spawn_udp_replies(
                        front.clone(),
                        b.clone(),
                        client,
                        sessions.clone(),
                        stop.clone(),
                    );
                    b
                }
            };
            if let Err(e) = back.send(&buf[..n], to) {
                tracing::debug!(%client, %to, error = %e, "forward: UDP send failed");
            }
        }
    });
}

/// Carries replies from one session's socket back to its client until the
/// session idles out.
fn spawn_udp_replies<F: Datagrams, B: Datagrams>(
    front: Arc<F>,
    back: Arc<B>,
    client: SocketAddr,
    sessions: Sessions<B>,
    stop: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65535];
        let mut last = Instant::now();
        while !stop.load(Relaxed) && last.elapsed() < UDP_IDLE {
            match back.recv(&mut buf) {
                Ok(Some((n, _))) => {
                    last = Instant::now();
                    let _ = front.send(&buf[..n], client);
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
        table(&sessions).remove(&client);
        tracing::debug!(%client, "forward: UDP session closed");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshvpn_engine::{Config, InterfaceConfig, IpPrefix, PeerConfig, PrivateKey};
    use std::io::{Read, Write};

    #[test]
    fn rules_parse() {
        let f: Forward = "127.0.0.1:8080=10.0.0.2:80".parse().unwrap();
        assert_eq!(f.from, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(f.to, "10.0.0.2:80".parse().unwrap());
        assert!(!f.udp);
        let f: Forward = "[::1]:53=[fd00::2]:53/udp".parse().unwrap();
        assert!(f.udp);
        assert_eq!(f.to, "[fd00::2]:53".parse().unwrap());
        assert!("127.0.0.1:8080".parse::<Forward>().is_err());
        assert!("127.0.0.1=10.0.0.2:80".parse::<Forward>().is_err());
    }

    /// `forward` on one engine (from a config file), a second engine with
    /// its own stack as the far side: TCP and UDP both ways.
    /// `--tcp-buffer` and `--tcp-send-buffer` reach the stack: a size it
    /// refuses fails the start.
    #[test]
    fn the_tcp_buffer_flag_reaches_the_stack() {
        let dir = std::env::temp_dir().join(format!("meshvpn-forward-buf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("a.conf");
        std::fs::write(
            &conf,
            format!(
                "[Interface]\nPrivateKey = {}\nAddress = 10.9.0.1/32\n",
                PrivateKey::generate().to_base64()
            ),
        )
        .unwrap();
        let args = |tcp_buffer, tcp_send_buffer| ForwardArgs {
            config: conf.clone(),
            local: vec![],
            // A mesh listener only: nothing dials out.
            remote: vec!["10.9.0.1:7000=127.0.0.1:9".parse().unwrap()],
            tcp_buffer,
            tcp_send_buffer,
        };
        let err = start(&args(0, TCP_SEND_BUFFER))
            .err()
            .expect("a zero receive buffer is refused");
        assert!(err.contains("TCP buffers"), "{err}");
        let err = start(&args(TCP_BUFFER, 0))
            .err()
            .expect("a zero send buffer is refused");
        assert!(err.contains("TCP buffers"), "{err}");
        assert!(start(&args(TCP_BUFFER, TCP_SEND_BUFFER)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn forwards_tcp_and_udp_both_ways() {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let (addr_a, addr_b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.55.0.1".parse().unwrap(), "10.55.0.2".parse().unwrap());
        let b = Arc::new(
            Engine::new(&Config {
                interface: InterfaceConfig {
                    private_key: Some(kb.clone()),
                    listen_port: Some(0),
                    addresses: vec![IpPrefix::host(addr_b)],
                    ..Default::default()
                },
                peers: vec![],
            })
            .unwrap(),
        );
        let stack_b = Netstack::attach(&b, NetstackConfig::default()).unwrap();
        // a's side: a config file, as a user would write it.
        let dir = std::env::temp_dir().join(format!("meshvpn-forward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("a.conf");
        let port_a = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        std::fs::write(
            &conf,
            format!(
                "[Interface]\nPrivateKey = {}\nListenPort = {port_a}\nAddress = {addr_a}/32\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = {addr_b}/32\nEndpoint = 127.0.0.1:{}\n",
                ka.to_base64(),
                kb.public_key(),
                b.listen_port()
            ),
        )
        .unwrap();
        let mut p = PeerConfig::new(ka.public_key());
        p.allowed_ips = vec![IpPrefix::host(addr_a)];
        p.endpoint = Some(SocketAddr::from(([127, 0, 0, 1], port_a)));
        b.add_peer(&p).unwrap();

        // Services: an echo on b's stack (for --local), a kernel echo on
        // loopback (for --remote).
        let mesh_echo = stack_b.tcp_listen(SocketAddr::new(addr_b, 80), 8).unwrap();
        let mesh_udp = stack_b.udp_bind(SocketAddr::new(addr_b, 53)).unwrap();
        let local_echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let args = ForwardArgs {
            config: conf,
            local: vec![
                format!("127.0.0.1:0={addr_b}:80").parse().unwrap(),
                format!("127.0.0.1:0={addr_b}:53/udp").parse().unwrap(),
            ],
            remote: vec![
                format!("{addr_a}:2222={}", local_echo.local_addr().unwrap())
                    .parse()
                    .unwrap(),
                format!("{addr_a}:5353={}/udp", local_udp.local_addr().unwrap())
                    .parse()
                    .unwrap(),
            ],
            tcp_buffer: TCP_BUFFER,
            tcp_send_buffer: TCP_SEND_BUFFER,
        };
        let fw = start(&args).unwrap();
        let t = Some(Duration::from_secs(5));
        std::thread::scope(|s| {
            s.spawn(|| {
                let (c, _) = mesh_echo.accept_timeout(t).unwrap();
                let mut buf = [0u8; 5];
                c.set_read_timeout(t);
                (&c).read_exact(&mut buf).unwrap();
                (&c).write_all(&buf).unwrap();
            });
            s.spawn(|| {
                let mut buf = [0u8; 64];
                let (n, from) = mesh_udp.recv_from_timeout(&mut buf, t).unwrap();
                mesh_udp.send_to(&buf[..n], from).unwrap();
            });
            s.spawn(|| {
                let (mut c, _) = local_echo.accept().unwrap();
                let mut buf = [0u8; 5];
                c.read_exact(&mut buf).unwrap();
                c.write_all(&buf).unwrap();
            });
            s.spawn(|| {
                local_udp.set_read_timeout(t).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = local_udp.recv_from(&mut buf).unwrap();
                local_udp.send_to(&buf[..n], from).unwrap();
            });
            // --local TCP: a kernel client reaches b's stack.
            let mut c = std::net::TcpStream::connect(fw.local_addrs[0]).unwrap();
            c.set_read_timeout(t).unwrap();
            c.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            // --local UDP.
            let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            u.set_read_timeout(t).unwrap();
            u.send_to(b"query", fw.local_addrs[1]).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = u.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"query"[..], fw.local_addrs[1]));
            // --remote TCP: b's stack reaches the kernel service through a.
            let c = stack_b
                .tcp_connect(SocketAddr::new(addr_a, 2222), t)
                .unwrap();
            (&c).write_all(b"world").unwrap();
            let mut buf = [0u8; 5];
            c.set_read_timeout(t);
            (&c).read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"world");
            // --remote UDP.
            let u = stack_b.udp_bind("0.0.0.0:0".parse().unwrap()).unwrap();
            u.send_to(b"dgram", SocketAddr::new(addr_a, 5353)).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = u.recv_from_timeout(&mut buf, t).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&b"dgram"[..], SocketAddr::new(addr_a, 5353))
            );
        });
        drop(fw);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
