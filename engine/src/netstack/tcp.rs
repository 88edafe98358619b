//! TCP over the stack: [`TcpStream`] (a `Read + Write` byte stream, also
//! through `&TcpStream` so one thread can read while another writes or
//! closes) and [`TcpListener`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smoltcp::socket::tcp;

use super::signal::{Direction, Interrupter, Signal};
use super::splice::{Splice, Waiter};
use super::stack::{smol_timeout, Binding, Inner, Kind, Listener, SockRef, Stack};
use super::NetstackError;

fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

/// A TCP connection through the userspace stack. Closing it (or dropping
/// it) sends FIN after the bytes already written; a thread blocked on it
/// wakes with [`NetstackError::Closed`].
pub struct TcpStream {
    inner: Arc<Inner>,
    sock: SockRef,
    signal: Arc<Signal>,
    waker: Waker,
    local: SocketAddr,
    peer: SocketAddr,
    nonblocking: AtomicBool,
    write_shut: AtomicBool,
    closed: AtomicBool,
    read_limit: Mutex<Option<Duration>>,
    write_limit: Mutex<Option<Duration>>,
}

impl TcpStream {
    fn new(inner: &Arc<Inner>, sock: SockRef, signal: Arc<Signal>, peer: SocketAddr) -> TcpStream {
        TcpStream {
            inner: inner.clone(),
            sock,
            waker: signal.waker(),
            signal,
            local: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
            peer,
            nonblocking: AtomicBool::new(false),
            write_shut: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            read_limit: Mutex::new(None),
            write_limit: Mutex::new(None),
        }
    }

    pub(crate) fn connect(
        inner: &Arc<Inner>,
        remote: SocketAddr,
        timeout: Option<Duration>,
        signal: Arc<Signal>,
    ) -> Result<TcpStream, NetstackError> {
        if remote.port() == 0 {
            return Err(NetstackError::InvalidInput("port 0"));
        }
        inner.check_route(remote.ip())?;
        let deadline = deadline(timeout);
        let sock = {
            let mut st = inner.stack.lock();
            st.check_capacity(inner.config.max_sockets)?;
            let local = st.take_port(Binding::ephemeral(Kind::Tcp))?;
            let mut s = Stack::new_tcp_socket(&inner.config);
            if s.connect(st.iface.context(), remote, local.port).is_err() {
                st.free_port(local);
                return Err(NetstackError::InvalidInput("remote address"));
            }
            let r = st.add(s, Some(local), signal.clone());
            if let Ok(e) = st.entry(r) {
                e.connecting = true;
            }
            r
        };
        inner.kick();
        // From here on, dropping `stream` on an error closes the socket.
        let mut stream = TcpStream::new(inner, sock, signal, remote);
        let waker = stream.waker.clone();
        let timeout_after = inner.config.tcp_timeout;
        stream.local = inner.wait(&stream.signal, Direction::Write, deadline, false, |st| {
            let unreachable = match st.entry(sock) {
                Ok(e) => e.unreachable,
                Err(e) => return Some(Err(e)),
            };
            let s = st.tcp(sock.handle);
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_recv_waker(&waker);
                    None
                }
                tcp::State::Closed if unreachable => Some(Err(NetstackError::Unreachable)),
                tcp::State::Closed => Some(Err(NetstackError::Refused)),
                _ => {
                    s.set_timeout(smol_timeout(timeout_after));
                    let local = s.local_endpoint().map(SocketAddr::from);
                    if let Ok(e) = st.entry(sock) {
                        e.connecting = false;
                    }
                    Some(local.ok_or(NetstackError::Reset))
                }
            }
        })?;
        Ok(stream)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Wakes a blocked read or write early (see [`Interrupter`]).
    pub fn interrupter(&self) -> Interrupter {
        Interrupter {
            signal: self.signal.clone(),
        }
    }

    /// A new descriptor of an eventfd, owned by the caller, that becomes
    /// readable when a read or write in `dir` that found nothing to do
    /// (timed out or would block) may now succeed, and when the stream
    /// closes. For a
    /// caller that sleeps in its own event loop (epoll, Go's netpoller)
    /// instead of blocking a thread: call with a zero timeout, and on
    /// `TimedOut` poll the descriptor for readability, then call again.
    /// Never read it: the next call that finds nothing resets it. Wakeups
    /// may be spurious. Two per stream at most, made on first use.
    pub fn ready_fd(&self, dir: Direction) -> io::Result<OwnedFd> {
        self.signal.ready_fd(dir)
    }

    /// Makes `read`/`write` return `WouldBlock` instead of sleeping.
    pub fn set_nonblocking(&self, nonblocking: bool) {
        self.nonblocking.store(nonblocking, Relaxed);
    }

    /// Timeout of `Read::read` (`None`: none).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        *self.read_limit.lock() = timeout;
    }

    /// Timeout of `Write::write` (`None`: none).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) {
        *self.write_limit.lock() = timeout;
    }

    /// Disables (true) or enables Nagle's algorithm.
    pub fn set_nodelay(&self, nodelay: bool) -> Result<(), NetstackError> {
        let mut st = self.inner.stack.lock();
        st.entry(self.sock)?;
        st.tcp(self.sock.handle).set_nagle_enabled(!nodelay);
        Ok(())
    }

    fn check_open(&self) -> Result<(), NetstackError> {
        if self.closed.load(Relaxed) {
            return Err(NetstackError::Closed);
        }
        Ok(())
    }

    /// Reads what has arrived, waiting up to `timeout` for something
    /// (`None`: no limit). `Ok(0)` is the end of the stream.
    pub fn read_timeout(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, NetstackError> {
        self.check_open()?;
        if buf.is_empty() {
            return Ok(0);
        }
        let sock = self.sock;
        let mut kick = false;
        let r = self.inner.wait(
            &self.signal,
            Direction::Read,
            deadline(timeout),
            self.nonblocking.load(Relaxed),
            |st| {
                if let Err(e) = st.entry(sock) {
                    return Some(Err(e));
                }
                let s = st.tcp(sock.handle);
                // Reading from a more than half full buffer reopens a
                // window the sender may be waiting on: poll soon.
                kick = s.recv_queue() * 2 >= s.recv_capacity();
                match s.recv_slice(buf) {
                    Ok(0) => {
                        s.register_recv_waker(&self.waker);
                        None
                    }
                    Ok(n) => Some(Ok(n)),
                    Err(tcp::RecvError::Finished) => Some(Ok(0)),
                    Err(tcp::RecvError::InvalidState) => Some(Err(NetstackError::Reset)),
                }
            },
        );
        if kick && matches!(r, Ok(n) if n > 0) {
            self.inner.kick();
        }
        r
    }

    /// Queues bytes to send, waiting up to `timeout` for room (`None`: no
    /// limit). Returns how many were queued (at least one).
    pub fn write_timeout(
        &self,
        buf: &[u8],
        timeout: Option<Duration>,
    ) -> Result<usize, NetstackError> {
        self.check_open()?;
        if self.write_shut.load(Relaxed) {
            return Err(NetstackError::Closed);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let sock = self.sock;
        let r = self.inner.wait(
            &self.signal,
            Direction::Write,
            deadline(timeout),
            self.nonblocking.load(Relaxed),
            |st| {
                if let Err(e) = st.entry(sock) {
                    return Some(Err(e));
                }
                let s = st.tcp(sock.handle);
                match s.send_slice(buf) {
                    Ok(0) => {
                        s.register_send_waker(&self.waker);
                        None
                    }
                    Ok(n) => Some(Ok(n)),
                    Err(tcp::SendError::InvalidState) => Some(Err(NetstackError::Reset)),
                }
            },
        );
        if r.is_ok() {
            self.inner.kick();
        }
        r
    }

    /// Hands this connection and the kernel TCP socket `kernel` to the
    /// stack's thread, which moves bytes between them both ways with no
    /// thread of the caller's: an end of stream on either side is passed on
    /// as a half-close, and the splice ends once both sides have ended, or
    /// at once when either fails (a reset, an error, the stack closing),
    /// closing both. See [`Splice`] for how to learn the end. `kernel` is
    /// made non-blocking; the connection's buffers are all that is queued
    /// on our side.
    pub fn splice(self, kernel: std::net::TcpStream) -> Result<Splice, NetstackError> {
        self.check_open()?;
        if self.write_shut.load(Relaxed) {
            return Err(NetstackError::InvalidInput(
                "the connection's write side is shut",
            ));
        }
        let waiter = match self.inner.waiter.get() {
            Some(w) => w,
            None => {
                let stack = Arc::downgrade(&self.inner);
                let kick = move || stack.upgrade().map(|s| s.kick()).is_some();
                let w = Waiter::start(kick).map_err(|_| NetstackError::Thread)?;
                self.inner.waiter.get_or_init(|| w)
            }
        };
        let (pipe, handle) = waiter
            .pipe(kernel)
            .map_err(|_| NetstackError::InvalidInput("the kernel socket cannot be polled"))?;
        {
            let mut st = self.inner.stack.lock();
            if let Err(e) = st.entry(self.sock) {
                drop(st);
                pipe.finish(false);
                return Err(e);
            }
            st.splices.push((self.sock, pipe));
        }
        // The stack's thread owns the socket now: dropping this handle
        // must not close it.
        self.closed.store(true, Relaxed);
        self.inner.kick();
        Ok(handle)
    }

    /// Sends FIN once the queued bytes are out; reading goes on.
    pub fn shutdown_write(&self) -> Result<(), NetstackError> {
        self.check_open()?;
        if self.write_shut.swap(true, Relaxed) {
            return Ok(());
        }
        {
            let mut st = self.inner.stack.lock();
            st.entry(self.sock)?;
            st.tcp(self.sock.handle).close();
        }
        self.inner.kick();
        Ok(())
    }

    /// Closes the stream: queued bytes and FIN still go out (for at most
    /// the configured linger), blocked calls on it wake with `Closed`.
    /// Idempotent; also done on drop.
    pub fn close(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        self.inner
            .stack
            .lock()
            .close_tcp(self.sock, self.inner.config.close_linger);
        self.signal.notify();
        self.inner.kick();
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.close();
    }
}

impl io::Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = *self.read_limit.lock();
        Ok(self.read_timeout(buf, t)?)
    }
}

impl io::Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = *self.write_limit.lock();
        Ok(self.write_timeout(buf, t)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl io::Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TCP listening port on the stack's addresses.
pub struct TcpListener {
    inner: Arc<Inner>,
    key: Binding,
    id: u64,
    local: SocketAddr,
    signal: Arc<Signal>,
    nonblocking: AtomicBool,
    closed: AtomicBool,
}

impl TcpListener {
    pub(crate) fn bind(
        inner: &Arc<Inner>,
        local: SocketAddr,
        backlog: usize,
    ) -> Result<TcpListener, NetstackError> {
        if backlog == 0 {
            return Err(NetstackError::InvalidInput("backlog 0"));
        }
        if inner.is_closed() {
            return Err(NetstackError::Closed);
        }
        inner.check_local(local.ip())?;
        let signal = Signal::new();
        let (key, id) = {
            let mut st = inner.stack.lock();
            let key = st.take_port(Binding::new(Kind::Tcp, local))?;
            let id = st.next_id();
            st.listeners.insert(
                key,
                Listener {
                    id,
                    backlog,
                    waker: signal.waker(),
                    signal: signal.clone(),
                    idle: None,
                    pending: Default::default(),
                },
            );
            (key, id)
        };
        Ok(TcpListener {
            inner: inner.clone(),
            key,
            id,
            local: SocketAddr::new(local.ip(), key.port),
            signal,
            nonblocking: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn set_nonblocking(&self, nonblocking: bool) {
        self.nonblocking.store(nonblocking, Relaxed);
    }

    /// The next established connection, waiting up to `timeout` (`None`:
    /// no limit).
    pub fn accept_timeout(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(TcpStream, SocketAddr), NetstackError> {
        if self.closed.load(Relaxed) {
            return Err(NetstackError::Closed);
        }
        let (key, id) = (self.key, self.id);
        let tcp_timeout = self.inner.config.tcp_timeout;
        let (sock, signal, local, peer) = self.inner.wait(
            &self.signal,
            Direction::Read,
            deadline(timeout),
            self.nonblocking.load(Relaxed),
            |st| {
                let Some(l) = st.listeners.get_mut(&key).filter(|l| l.id == id) else {
                    return Some(Err(NetstackError::Closed));
                };
                let mut found = None;
                let mut dead = Vec::new();
                for (i, h) in l.pending.iter().enumerate() {
                    let s = st.sockets.get_mut::<tcp::Socket>(*h);
                    match s.state() {
                        tcp::State::SynReceived | tcp::State::Listen => {
                            s.register_recv_waker(&l.waker);
                        }
                        tcp::State::Closed | tcp::State::TimeWait => dead.push(*h),
                        _ => {
                            found = Some(i);
                            break;
                        }
                    }
                }
                let taken = found.and_then(|i| l.pending.remove(i));
                l.pending.retain(|h| !dead.contains(h));
                for h in dead {
                    st.release(h);
                }
                let h = taken?;
                let s = st.tcp(h);
                s.set_timeout(smol_timeout(tcp_timeout));
                let (local, peer) = match (s.local_endpoint(), s.remote_endpoint()) {
                    (Some(l), Some(r)) => (SocketAddr::from(l), SocketAddr::from(r)),
                    _ => {
                        st.release(h);
                        return None;
                    }
                };
                let signal = Signal::new();
                let e = st.entries.get_mut(&h)?;
                e.signal = signal.clone();
                Some(Ok((
                    SockRef {
                        handle: h,
                        id: e.id,
                    },
                    signal,
                    local,
                    peer,
                )))
            },
        )?;
        let mut stream = TcpStream::new(&self.inner, sock, signal, peer);
        stream.local = local;
        Ok((stream, peer))
    }

    /// Stops listening; connections not yet accepted are reset, blocked
    /// `accept` calls wake with `Closed`. Idempotent; also done on drop.
    pub fn close(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        self.inner.stack.lock().close_listener(self.key, self.id);
        self.signal.notify();
        self.inner.kick();
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.close();
    }
}
