//! Splicing: the stack's own thread moves bytes between a connection of the
//! stack and a kernel TCP socket, with no caller thread in between (what
//! `meshvpn forward` does for each connection).
//!
//! Each turn of the stack's thread pumps every pipe before it polls (so
//! bytes the kernel socket holds leave in this poll) and again after it
//! (bytes that arrived go to the kernel socket; acknowledged room is filled
//! again). A pump reads the kernel socket straight into the connection's
//! send buffer and writes the kernel socket straight from its receive
//! buffer: no buffer of ours in between, and no thread handoff per chunk.
//!
//! The kernel sockets are non-blocking and registered (edge-triggered) with
//! one small thread's epoll. An event sets the pipe's readiness bits and
//! kicks the stack; a pump reads a kernel socket only while it is marked
//! readable and writes it only while marked writable, and clears the mark
//! on `EAGAIN`. An idle pipe so costs no system call per turn.
//!
//! Nothing is queued beyond the two buffers a connection already has and
//! the kernel socket's own: a side that stops reading stops the other.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use smoltcp::socket::tcp;

/// Readiness bits the epoll thread sets on a pipe.
const READABLE: u8 = 1;
const WRITABLE: u8 = 2;

/// Bytes one pump moves at most each way on one pipe: bounds how long the
/// stack lock is held for one pipe while others (and other callers) wait.
const PUMP_BUDGET: usize = 1 << 20;

/// How long the epoll thread sleeps at most before it looks whether the
/// stack is gone.
const WAITER_TICK: Duration = Duration::from_millis(200);

/// One spliced pair's kernel side and progress, kept by the stack beside
/// its connection.
pub(crate) struct Pipe {
    kernel: std::net::TcpStream,
    token: usize,
    /// Set by the epoll thread.
    events: Arc<AtomicU8>,
    /// The kernel socket may have bytes (or its end of stream) to read.
    readable: bool,
    /// The kernel socket may take bytes.
    writable: bool,
    /// The kernel side ended and FIN is queued on the connection.
    up_done: bool,
    /// The connection's FIN was passed on (the kernel socket's write side
    /// is shut).
    down_done: bool,
    failed: bool,
    state: Arc<SpliceState>,
    registered: Arc<Registered>,
}

/// The pipes' readiness bits by token, shared with the epoll thread.
type Registered = Mutex<HashMap<usize, Arc<AtomicU8>>>;

/// What a [`Splice`] handle sees of its pipe.
#[derive(Default)]
struct SpliceState {
    up: AtomicU64,
    down: AtomicU64,
    /// `Some(clean)` once the pipe ended.
    finished: Mutex<Option<bool>>,
    changed: Condvar,
}

/// A splice in progress ([`super::TcpStream::splice`]). Dropping it does
/// not stop the splice.
pub struct Splice {
    state: Arc<SpliceState>,
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceResult {
    /// Bytes from the kernel socket to the connection.
    pub up: u64,
    /// Bytes from the connection to the kernel socket.
    pub down: u64,
    /// Both sides ended with FIN; false after a reset, an error on either
    /// side, or the stack closing (both sides are then closed).
    pub clean: bool,
}

impl Splice {
    /// Bytes moved so far: (kernel to connection, connection to kernel).
    pub fn moved(&self) -> (u64, u64) {
        (self.state.up.load(SeqCst), self.state.down.load(SeqCst))
    }

    /// Waits until the splice ended, up to `timeout` (`None`: no limit);
    /// `None` when the timeout passed first.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<SpliceResult> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut f = self.state.finished.lock();
        while f.is_none() {
            match deadline {
                Some(d) => {
                    if self.state.changed.wait_until(&mut f, d).timed_out() && f.is_none() {
                        return None;
                    }
                }
                None => self.state.changed.wait(&mut f),
            }
        }
        let (up, down) = self.moved();
        Some(SpliceResult {
            up,
            down,
            clean: f.unwrap_or(false),
        })
    }
}

/// The epoll thread: turns readiness of the kernel sockets into readiness
/// bits and kicks of the stack.
pub(crate) struct Waiter {
    registry: mio::Registry,
    registered: Arc<Registered>,
    next_token: AtomicUsize,
    stop: Arc<AtomicBool>,
}

impl Waiter {
    /// Starts the thread; `kick` wakes the stack's thread and returns
    /// false once the stack is gone (the thread then ends).
    pub fn start(kick: impl Fn() -> bool + Send + 'static) -> io::Result<Waiter> {
        let mut poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let registered: Arc<Registered> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (reg, halt) = (registered.clone(), stop.clone());
        std::thread::Builder::new()
            .name("meshvpn-splice".into())
            .spawn(move || {
                let mut events = mio::Events::with_capacity(256);
                while !halt.load(SeqCst) {
                    if let Err(e) = poll.poll(&mut events, Some(WAITER_TICK)) {
                        if e.kind() != io::ErrorKind::Interrupted {
                            tracing::warn!(error = %e, "netstack: splice epoll failed");
                            std::thread::sleep(WAITER_TICK);
                        }
                        continue;
                    }
                    if events.is_empty() {
                        continue;
                    }
                    {
                        let reg = reg.lock();
                        for e in &events {
                            let mut bits = 0;
                            if e.is_readable() || e.is_read_closed() || e.is_error() {
                                bits |= READABLE;
                            }
                            if e.is_writable() || e.is_write_closed() || e.is_error() {
                                bits |= WRITABLE;
                            }
                            if let Some(flags) = reg.get(&e.token().0) {
                                flags.fetch_or(bits, SeqCst);
                            }
                        }
                    }
                    if !kick() {
                        break;
                    }
                }
            })?;
        Ok(Waiter {
            registry,
            registered,
            next_token: AtomicUsize::new(0),
            stop,
        })
    }

    /// Makes `kernel` non-blocking, registers it, and returns the pipe and
    /// its handle.
    pub fn pipe(&self, kernel: std::net::TcpStream) -> io::Result<(Pipe, Splice)> {
        kernel.set_nonblocking(true)?;
        let token = self.next_token.fetch_add(1, SeqCst);
        let events = Arc::new(AtomicU8::new(0));
        self.registered.lock().insert(token, events.clone());
        let fd = kernel.as_raw_fd();
        if let Err(e) = self.registry.register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(token),
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        ) {
            self.registered.lock().remove(&token);
            return Err(e);
        }
        let state = Arc::new(SpliceState::default());
        let pipe = Pipe {
            kernel,
            token,
            events,
            readable: true,
            writable: true,
            up_done: false,
            down_done: false,
            failed: false,
            state: state.clone(),
            registered: self.registered.clone(),
        };
        Ok((pipe, Splice { state }))
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

impl Pipe {
    /// Ends the pipe: the kernel socket is shut both ways (and closed when
    /// the pipe drops), and the handle learns how it ended.
    pub fn finish(self, clean: bool) {
        self.registered.lock().remove(&self.token);
        let _ = self.kernel.shutdown(Shutdown::Both);
        *self.state.finished.lock() = Some(clean);
        self.state.changed.notify_all();
    }
}

/// What one read or write of a pump did.
enum Step {
    Moved(usize),
    /// The connection's buffer is full (up) or empty (down).
    Stop,
    Eof,
    WouldBlock,
    Failed,
}

/// One kernel read or write's outcome as a [`Step`].
fn step(r: io::Result<usize>, eof_on_zero: bool) -> Step {
    match r {
        Ok(0) if eof_on_zero => Step::Eof,
        Ok(n) => Step::Moved(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::WouldBlock,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Moved(0),
        Err(_) => Step::Failed,
    }
}

/// What one [`pump`] did.
pub(crate) struct Pumped {
    /// Bytes moved, or a FIN was queued: the stack should poll again at
    /// once.
    pub moved: bool,
    /// The pipe ended, cleanly (both ends of stream passed on) or not (the
    /// connection must then be aborted); the caller closes the connection
    /// and calls [`Pipe::finish`].
    pub ended: Option<bool>,
}

/// Moves what can move between `p`'s kernel socket and its connection `s`.
pub(crate) fn pump(p: &mut Pipe, s: &mut tcp::Socket<'_>) -> Pumped {
    let mut moved = false;
    let events = p.events.swap(0, SeqCst);
    p.readable |= events & READABLE != 0;
    p.writable |= events & WRITABLE != 0;
    let mut budget = PUMP_BUDGET;
    while p.readable && !p.up_done && !p.failed && budget > 0 {
        let kernel = &p.kernel;
        let st = s
            .send(|free| match free.is_empty() {
                true => (0, Step::Stop),
                false => {
                    let room = budget.min(free.len());
                    match step((&*kernel).read(&mut free[..room]), true) {
                        Step::Moved(n) => (n, Step::Moved(n)),
                        other => (0, other),
                    }
                }
            })
            .unwrap_or(Step::Failed);
        match st {
            Step::Moved(n) => {
                moved |= n > 0;
                budget -= n;
                p.state.up.fetch_add(n as u64, SeqCst);
            }
            Step::Eof => {
                s.close();
                p.up_done = true;
                moved = true;
            }
            Step::WouldBlock => p.readable = false,
            Step::Stop => break,
            Step::Failed => p.failed = true,
        }
    }
    let mut budget = PUMP_BUDGET;
    while p.writable && !p.down_done && !p.failed && budget > 0 {
        let kernel = &p.kernel;
        let st = match s.recv(|data| match data.is_empty() {
            true => (0, Step::Stop),
            false => match step((&*kernel).write(&data[..budget.min(data.len())]), false) {
                Step::Moved(n) => (n, Step::Moved(n)),
                other => (0, other),
            },
        }) {
            Ok(st) => st,
            Err(tcp::RecvError::Finished) => Step::Eof,
            Err(tcp::RecvError::InvalidState) => Step::Failed,
        };
        match st {
            Step::Moved(n) => {
                moved |= n > 0;
                budget -= n;
                p.state.down.fetch_add(n as u64, SeqCst);
            }
            Step::Eof => {
                let _ = p.kernel.shutdown(Shutdown::Write);
                p.down_done = true;
            }
            Step::WouldBlock => p.writable = false,
            Step::Stop => break,
            Step::Failed => p.failed = true,
        }
    }
    // A reset or a timeout of the connection shows only in its state
    // while neither side has bytes to move.
    if s.state() == tcp::State::Closed && s.recv_queue() == 0 && !(p.up_done && p.down_done) {
        p.failed = true;
    }
    let ended = (p.failed || (p.up_done && p.down_done)).then_some(!p.failed);
    Pumped { moved, ended }
}
