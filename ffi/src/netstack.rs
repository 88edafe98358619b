//! `meshvpn_netstack`: a userspace TCP/IP stack attached to an engine, so a
//! program can dial, listen, send datagrams and ping over the mesh with no
//! TUN device and no root. Its sockets are `meshvpn_conn` (TCP streams,
//! `conn`), `meshvpn_listener` (`listener`) and `meshvpn_udp` (`udp`).
//!
//! Blocking calls take a `meshvpn_timeout_ms` (0: do not wait;
//! `MESHVPN_WAIT_FOREVER`: no limit) and every one of them can be woken
//! from another thread: closing or
//! freeing its handle wakes it with `MESHVPN_CLOSED`, and so do freeing
//! the netstack and stopping or freeing its engine (within about 100 ms).
//!
//! A caller that waits in its own event loop instead of blocking a thread
//! per call (epoll, Go's netpoller) asks a conn for its two wait
//! descriptors (`meshvpn_conn_wait_fds`) or a UDP socket for its one
//! (`meshvpn_udp_wait_fd`), calls with timeout 0, and polls the
//! descriptor of the call's direction when the call returns
//! `MESHVPN_TIMEOUT`.
//!
//! Addresses are text: `"10.0.0.2:80"`, `"[fd00::2]:80"` (an IP literal and
//! a port; names are not resolved). Outputs of addresses follow the buffer
//! protocol of `meshvpn_result_message`; `MESHVPN_ADDR_MAX` bytes always
//! suffice.

use std::ffi::c_char;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::meshvpn_engine::netstack::{Netstack, NetstackConfig, NetstackError};

use crate::engine::{lookup as engine_lookup, meshvpn_engine};
use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::interrupter::{self, meshvpn_interrupter};
use crate::ptr::{self, Out};
use crate::timeout::{self, meshvpn_timeout_ms};

/// Bytes that hold any address this library writes, NUL included
/// (`"[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535"`).
pub const MESHVPN_ADDR_MAX: usize = 64;

/// A userspace TCP/IP stack on an engine. Opaque: created by
/// `meshvpn_netstack_new`, released by `meshvpn_netstack_free`. The value
/// is a handle, not a pointer to memory: never dereference it.
pub struct meshvpn_netstack {
    _private: [u8; 0],
}

/// Sizes and limits of a stack. Fill it with
/// `meshvpn_netstack_options_default` and change what you need. Memory is
/// bounded by about `max_sockets * (tcp_rx_buffer + tcp_tx_buffer) +
/// rx_queue_packets * MTU`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct meshvpn_netstack_options {
    /// Sockets of every kind (listening and closing ones included); past
    /// it, dial and bind fail with `MESHVPN_SOCKET_LIMIT`. At least 1.
    pub max_sockets: u32,
    /// Receive buffer per TCP connection, bytes (1 .. 1 GiB).
    pub tcp_rx_buffer: u32,
    /// Send buffer per TCP connection, bytes (at least 1).
    pub tcp_tx_buffer: u32,
    /// Payload buffer per UDP socket and direction, bytes.
    pub udp_buffer: u32,
    /// Decrypted packets queued for the stack before new ones are dropped.
    /// At least 1.
    pub rx_queue_packets: u32,
    /// Disable Nagle's algorithm on new connections.
    pub tcp_nodelay: bool,
    /// Abort a connection whose peer stays silent this long while data
    /// waits to be acknowledged; 0: never.
    pub tcp_timeout_ms: u32,
    /// How long a closed connection may take to deliver its last bytes.
    pub close_linger_ms: u32,
}

impl From<&NetstackConfig> for meshvpn_netstack_options {
    fn from(c: &NetstackConfig) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        meshvpn_netstack_options {
            max_sockets: clamp(c.max_sockets),
            tcp_rx_buffer: clamp(c.tcp_rx_buffer),
            tcp_tx_buffer: clamp(c.tcp_tx_buffer),
            udp_buffer: clamp(c.udp_buffer),
            rx_queue_packets: clamp(c.rx_queue_packets),
            tcp_nodelay: c.tcp_nodelay,
            tcp_timeout_ms: c.tcp_timeout.map_or(0, ms),
            close_linger_ms: ms(c.close_linger),
        }
    }
}

impl meshvpn_netstack_options {
    fn config(&self) -> NetstackConfig {
        let ms = |n: u32| Duration::from_millis(u64::from(n));
        NetstackConfig {
            addresses: None,
            max_sockets: self.max_sockets as usize,
            tcp_rx_buffer: self.tcp_rx_buffer as usize,
            tcp_tx_buffer: self.tcp_tx_buffer as usize,
            udp_buffer: self.udp_buffer as usize,
            rx_queue_packets: self.rx_queue_packets as usize,
            tcp_nodelay: self.tcp_nodelay,
            tcp_timeout: (self.tcp_timeout_ms != 0).then(|| ms(self.tcp_timeout_ms)),
            close_linger: ms(self.close_linger_ms),
        }
    }
}

impl From<NetstackError> for Error {
    fn from(e: NetstackError) -> Error {
        use meshvpn_result::*;
        let code = match e {
            NetstackError::Closed => MESHVPN_CLOSED,
            NetstackError::Refused => MESHVPN_CONNECTION_REFUSED,
            NetstackError::Unreachable => MESHVPN_UNREACHABLE,
            NetstackError::TimedOut | NetstackError::WouldBlock => MESHVPN_TIMEOUT,
            NetstackError::Reset => MESHVPN_CONNECTION_RESET,
            NetstackError::SocketLimit(_) => MESHVPN_SOCKET_LIMIT,
            NetstackError::AddrInUse => MESHVPN_ADDRESS_IN_USE,
            NetstackError::AddrNotAvailable => MESHVPN_ADDRESS_NOT_AVAILABLE,
            NetstackError::MessageTooLarge { .. } => MESHVPN_MESSAGE_TOO_LARGE,
            NetstackError::NoAddress => MESHVPN_NO_ADDRESS,
            NetstackError::InvalidInput(_) => MESHVPN_INVALID_ARGUMENT,
            NetstackError::Thread => MESHVPN_THREAD_FAILED,
        };
        Error::new(code, e.to_string())
    }
}

pub(crate) struct NetstackHandle {
    /// Shared with the tunnel agents that dial mesh targets through it.
    pub(crate) stack: Arc<Netstack>,
}

static NETSTACKS: HandleTable<meshvpn_netstack, NetstackHandle> = HandleTable::new(tag::NETSTACK);

impl Handled for NetstackHandle {
    const NAME: &'static str = "meshvpn_netstack";

    fn close(&self) {
        self.stack.close();
    }
}

/// A new handle on a stack something else attached (a mesh node's,
/// `meshvpn_node_netstack`).
pub(crate) fn insert_attached(stack: Arc<Netstack>, out: Out<*mut meshvpn_netstack>) -> Result<()> {
    out.write(NETSTACKS.insert(Arc::new(NetstackHandle { stack }))?);
    Ok(())
}

pub(crate) fn lookup(netstack: *const meshvpn_netstack) -> Result<Arc<NetstackHandle>> {
    NETSTACKS.lookup(netstack)
}

/// Maps a `TimedOut` that came before the deadline (an interrupt) to
/// `MESHVPN_INTERRUPTED`.
pub(crate) fn timed<T>(
    start: Instant,
    limit: Option<Duration>,
    r: std::result::Result<T, NetstackError>,
) -> Result<T> {
    match r {
        Err(NetstackError::TimedOut) if limit.is_none_or(|l| start.elapsed() < l) => {
            Err(Error::new(
                meshvpn_result::MESHVPN_INTERRUPTED,
                "woken by an interrupt before the timeout",
            ))
        }
        r => Ok(r?),
    }
}

/// Parses `"ip:port"`.
///
/// # Safety
/// A non-NULL `p` is a NUL-terminated string.
pub(crate) unsafe fn socket_addr(p: *const c_char, what: &str) -> Result<SocketAddr> {
    // SAFETY: forwarded promise.
    let s = unsafe { ptr::try_str(p, what) }?;
    s.parse()
        .map_err(|_| Error::invalid(format!("{what}: `{s}` is not IP:PORT")))
}

/// Writes `addr` as text, following the buffer protocol.
///
/// # Safety
/// A non-NULL `buf` has `buf_len` writable bytes.
pub(crate) unsafe fn write_addr(
    addr: SocketAddr,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> Result<()> {
    let out_len = Out::new(out_len, "out_len")?;
    // SAFETY: forwarded promise.
    unsafe { ptr::write_text(buf, buf_len, out_len, &addr.to_string()) }
}

/// Writes the default options (those `meshvpn_netstack_new` uses for a
/// NULL `options`) into `*out_options`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_netstack_options_default(
    out_options: *mut meshvpn_netstack_options,
) -> meshvpn_result {
    ffi_boundary! {{
        Out::new(out_options, "out_options")?.write((&NetstackConfig::default()).into());
        Ok(())
    }}
}

/// Attaches a userspace stack to a running engine. The stack answers on the
/// engine's `Address =` addresses: packets to them go to the stack, all
/// other decrypted packets where they went before (the packet API).
/// `options` may be NULL (defaults) and is only read during the call.
///
/// On success `*out_netstack` receives a handle the caller owns and must
/// release with `meshvpn_netstack_free`. The stack ends when its engine is
/// stopped or freed (calls then fail with `MESHVPN_CLOSED`); a restarted
/// engine needs a new stack.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT` (a zero size),
/// `MESHVPN_NO_ADDRESS` (the engine has no address), `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_netstack_new(
    engine: *mut meshvpn_engine,
    options: *const meshvpn_netstack_options,
    out_netstack: *mut *mut meshvpn_netstack,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = engine_lookup(engine)?.running()?;
        let out = Out::new(out_netstack, "out_netstack")?;
        let config = if options.is_null() {
            NetstackConfig::default()
        } else {
            // SAFETY: non-NULL; the caller passes a valid options struct.
            unsafe { ptr::try_ref(options, "options") }?.config()
        };
        let stack = Netstack::attach(&e, config)?;
        let handle = NETSTACKS.insert(Arc::new(NetstackHandle { stack: Arc::new(stack) }))?;
        out.write(handle);
        Ok(())
    }}
}

/// Stops the stack and releases it: every blocked call on its connections,
/// listeners and UDP sockets wakes with `MESHVPN_CLOSED`, and later calls on
/// them fail with `MESHVPN_CLOSED` (their handles stay valid until freed).
/// Packets for the stack's addresses go to the packet API again. The
/// handle is dead afterwards (`MESHVPN_INVALID_HANDLE`, so a double free is
/// reported). Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (from the log
/// callback).
///
/// Thread safety: safe from any thread, concurrently with any call on the
/// stack and its sockets.
#[no_mangle]
pub extern "C" fn meshvpn_netstack_free(netstack: *mut meshvpn_netstack) -> meshvpn_result {
    ffi_boundary! {{
        NETSTACKS.free(netstack)
    }}
}

/// Sends one ICMP echo request to `addr` (an IP literal, no port) and
/// writes the round-trip time of its reply, in microseconds, into
/// `*out_rtt_us`. Waits at most `timeout_ms` (0: only sends and looks
/// once; `MESHVPN_WAIT_FOREVER`: until a reply, an interrupt or a close).
///
/// `interrupter` (may be NULL) cancels the ping from another thread:
/// `meshvpn_interrupter_interrupt` makes it return `MESHVPN_INTERRUPTED`
/// at once (also when the interrupt came just before the call started).
/// This is how a caller with a cancellable context (Go's `ctx`) ends the
/// call instead of leaving it running.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE` (`netstack`
/// or a non-NULL `interrupter`), `MESHVPN_INVALID_ARGUMENT`,
/// `MESHVPN_UNREACHABLE` (no peer routes the address), `MESHVPN_NO_ADDRESS`,
/// `MESHVPN_TIMEOUT`, `MESHVPN_INTERRUPTED`, `MESHVPN_CLOSED` (the stack
/// or its engine closed meanwhile), `MESHVPN_SOCKET_LIMIT`.
///
/// Thread safety: safe from any thread; pings may run concurrently, with
/// one interrupter each or sharing one (an interrupt then ends them all).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_netstack_ping(
    netstack: *mut meshvpn_netstack,
    addr: *const c_char,
    timeout_ms: meshvpn_timeout_ms,
    interrupter: *const meshvpn_interrupter,
    out_rtt_us: *mut u64,
) -> meshvpn_result {
    ffi_boundary! {{
        let ns = lookup(netstack)?;
        let interrupter = interrupter::lookup_optional(interrupter)?;
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(addr, "addr") }?;
        let out = Out::new(out_rtt_us, "out_rtt_us")?;
        let ip: IpAddr = text
            .parse()
            .map_err(|_| Error::invalid(format!("addr: `{text}` is not an IP address")))?;
        let limit = timeout::limit(timeout_ms);
        let rtt = timed(Instant::now(), limit, ns.stack.ping_with(ip, limit, &interrupter))?;
        out.write(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX));
        Ok(())
    }}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_through_the_c_struct() {
        let d = NetstackConfig::default();
        assert_eq!(meshvpn_netstack_options::from(&d).config(), d);
    }
}
