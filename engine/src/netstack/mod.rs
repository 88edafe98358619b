//! The userspace TCP/IP stack: smoltcp over the mesh, so a host can dial,
//! listen, send datagrams and ping over WireGuard with no TUN device and no
//! root (what tsnet and wireguard-go's `tun/netstack` do).
//!
//! ```text
//!   engine rx thread --InnerSink--> NetstackSink --(ours?)--> bounded queue --> netstack thread
//!                     (one message per receive batch; a large one in the buffer it was
//!                      decrypted into, a small one copied into one pooled buffer)
//!                                        \--(not ours)--> previous sink (host queue, TUN)
//!   netstack thread: drain a batch --> Interface ingress + egress --> Engine::send_packet
//!   TcpStream / TcpListener / UdpSocket / ping: lock the stack, move bytes in or
//!   out of a socket buffer, kick the netstack thread, sleep on the socket's signal
//!   TcpStream::splice: the polling thread itself moves bytes between the
//!   connection's buffers and a kernel socket, around each poll (splice.rs)
//!   spliced, nothing to send: the engine rx thread polls for its own batch
//!   when the stack is free (no queue, no wake), else queues it as above
//! ```
//!
//! One lock guards the smoltcp `Interface` and `SocketSet`. The netstack
//! thread takes it once per batch of packets (not per packet) and on socket
//! deadlines (`poll_delay`); it encrypts and sends the batch's output after
//! releasing it. A second lock, taken first and held until the output is
//! sent, keeps one poll's output ahead of the next one's when a receive
//! thread polls. Callers' threads take the stack lock only to copy bytes.
//! smoltcp wakes a socket's [`signal::Signal`] while the lock is held, and a
//! caller reads the signal's generation while still holding it, so no
//! wake-up is lost.
//!
//! Memory is bounded by [`NetstackConfig`]: at most `max_sockets` sockets,
//! each with fixed buffers, and at most `rx_queue_packets` queued packets
//! in buffers of at most `rx_queue_packets * mtu` bytes in all.
//!
//! This layer opens no OS socket and reads no device: packets come from the
//! engine's sink and leave through [`Engine::send_packet`]. The only
//! sockets it touches are the kernel TCP sockets a caller splices.

mod device;
mod dialer;
mod error;
mod icmp;
mod signal;
mod sink;
mod splice;
mod stack;
mod tcp;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use dialer::MeshDialer;
pub use error::NetstackError;
pub use signal::{Direction, Interrupter};
pub use splice::{Splice, SpliceResult};
pub use stack::NetstackStats;
pub use tcp::{TcpListener, TcpStream};
pub use udp::UdpSocket;

use crate::router::IpPrefix;
use crate::wg::Engine;
use stack::Inner;

/// Sizes and limits of one stack. The memory ceiling is about
/// `max_sockets * (tcp_rx_buffer + tcp_tx_buffer) + rx_queue_packets * mtu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetstackConfig {
    /// The addresses the stack owns; `None` takes the engine's `Address =`.
    pub addresses: Option<Vec<IpPrefix>>,
    /// Sockets of every kind (including listening and closing ones); past
    /// it, dial/bind fail with [`NetstackError::SocketLimit`] and new
    /// connections to listeners are not accepted.
    pub max_sockets: usize,
    /// Bytes of receive buffer per TCP socket; above 64 KiB the window is
    /// scaled (RFC 7323).
    pub tcp_rx_buffer: usize,
    /// Bytes of send buffer per TCP socket.
    pub tcp_tx_buffer: usize,
    /// Bytes of payload buffer per UDP socket, each direction.
    pub udp_buffer: usize,
    /// Decrypted packets queued for the stack before new ones are dropped.
    /// The buffers they wait in (whole receive batches, handed over
    /// uncopied, or pooled copy buffers) total at most this times the MTU
    /// in bytes; past either bound packets are dropped and counted in
    /// [`NetstackStats::rx_dropped`].
    pub rx_queue_packets: usize,
    /// Disable Nagle's algorithm on new TCP sockets (Go's default too).
    pub tcp_nodelay: bool,
    /// Abort an established connection when the peer stays silent this long
    /// while data waits to be acknowledged.
    pub tcp_timeout: Option<Duration>,
    /// How long a closed connection may take to deliver its last bytes and
    /// FIN before it is reset.
    pub close_linger: Duration,
}

impl Default for NetstackConfig {
    fn default() -> Self {
        NetstackConfig {
            addresses: None,
            max_sockets: 1024,
            tcp_rx_buffer: 256 << 10,
            tcp_tx_buffer: 256 << 10,
            udp_buffer: 64 << 10,
            rx_queue_packets: 4096,
            tcp_nodelay: true,
            tcp_timeout: Some(Duration::from_secs(120)),
            close_linger: Duration::from_secs(30),
        }
    }
}

/// A userspace stack attached to an engine. Dropping it (or
/// [`Netstack::close`]) stops the stack: every blocking call returns
/// [`NetstackError::Closed`] and packets for its addresses go to the
/// engine's previous sink again.
pub struct Netstack {
    inner: Arc<Inner>,
}

impl Netstack {
    /// Attaches a stack to `engine`: packets for the stack's addresses go to
    /// it, everything else to the sink that was there before. The stack
    /// holds the engine weakly and shuts down when the engine closes.
    pub fn attach(engine: &Arc<Engine>, config: NetstackConfig) -> Result<Netstack, NetstackError> {
        Ok(Netstack {
            inner: Inner::start(engine, config)?,
        })
    }

    /// The addresses the stack answers on.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.inner.addresses().to_vec()
    }

    /// True when a connection to `ip` would cross the mesh: a peer's
    /// AllowedIPs cover it and the stack has an address of its family.
    pub fn reaches(&self, ip: IpAddr) -> bool {
        self.inner.check_route(ip).is_ok()
    }

    /// Opens a TCP connection to `remote`, waiting up to `timeout` (`None`:
    /// until it succeeds, fails, or the stack closes).
    pub fn tcp_connect(
        &self,
        remote: SocketAddr,
        timeout: Option<Duration>,
    ) -> Result<TcpStream, NetstackError> {
        TcpStream::connect(&self.inner, remote, timeout, signal::Signal::new())
    }

    /// Like [`Netstack::tcp_connect`], but `interrupter` can end the dial
    /// early from another thread (it then fails with
    /// [`NetstackError::TimedOut`]) and stays tied to the connection: it
    /// also wakes the stream's blocked reads and writes later.
    pub fn tcp_connect_with(
        &self,
        remote: SocketAddr,
        timeout: Option<Duration>,
        interrupter: &Interrupter,
    ) -> Result<TcpStream, NetstackError> {
        TcpStream::connect(&self.inner, remote, timeout, interrupter.signal.clone())
    }

    /// Listens for TCP connections on `local` (an unspecified IP listens on
    /// every address of the stack; port 0 picks one). At most `backlog`
    /// connections wait to be accepted; beyond that new SYNs are ignored
    /// and the dialer retries, as with a full Linux backlog.
    pub fn tcp_listen(
        &self,
        local: SocketAddr,
        backlog: usize,
    ) -> Result<TcpListener, NetstackError> {
        TcpListener::bind(&self.inner, local, backlog)
    }

    /// Binds a UDP socket on `local` (unspecified IP: every address; port 0
    /// picks one).
    pub fn udp_bind(&self, local: SocketAddr) -> Result<UdpSocket, NetstackError> {
        UdpSocket::bind(&self.inner, local)
    }

    /// Sends one ICMP echo request to `addr` and returns the round-trip time
    /// of its reply.
    pub fn ping(&self, addr: IpAddr, timeout: Duration) -> Result<Duration, NetstackError> {
        icmp::ping(&self.inner, addr, Some(timeout), signal::Signal::new())
    }

    /// Like [`Netstack::ping`], waiting up to `timeout` (`None`: until a
    /// reply or the stack closes), and `interrupter` can end the wait
    /// early from another thread (it then fails with
    /// [`NetstackError::TimedOut`]), so a cancelled caller leaves no ping
    /// running.
    pub fn ping_with(
        &self,
        addr: IpAddr,
        timeout: Option<Duration>,
        interrupter: &Interrupter,
    ) -> Result<Duration, NetstackError> {
        icmp::ping(&self.inner, addr, timeout, interrupter.signal.clone())
    }

    pub fn stats(&self) -> NetstackStats {
        self.inner.stats()
    }

    /// Stops the stack and wakes every blocked call. Idempotent; also done
    /// on drop.
    pub fn close(&self) {
        self.inner.shutdown();
    }
}

impl Drop for Netstack {
    fn drop(&mut self) {
        self.close();
    }
}
