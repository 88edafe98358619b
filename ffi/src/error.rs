//! `meshvpn_result`: every exported function's return value, and the
//! messages that go with it.
//!
//! The numbers are part of the ABI. A number, once published, keeps its
//! meaning forever and is never reused, even if its variant is retired.
//! Ranges leave room per layer:
//!
//! | range   | layer                                   |
//! |---------|-----------------------------------------|
//! | 0-99    | the ABI itself (handles, pointers, buffers, panics) |
//! | 100-199 | configuration: keys, prefixes, endpoints, wg-quick text |
//! | 200-299 | the engine and the packet API            |
//! | 300-399 | the UAPI text protocol                   |
//! | 400-499 | the userspace TCP/IP stack               |
//! | 500-599 | the websocket tunnel                     |
//!
//! A failing call also records a detailed message (which field, which line,
//! which value) for the calling thread; `meshvpn_last_error_message` reads
//! it back, `meshvpn_result_message` gives the fixed text of any code.

use std::cell::RefCell;
use std::ffi::c_char;

use ::meshvpn_engine::config::{ConfError, KeyError};
use ::meshvpn_engine::{EngineError, SendError};

use crate::ptr;

/// The outcome of a call. `MESHVPN_OK` is success; anything else is an
/// error whose detail `meshvpn_last_error_message` reads back on the same
/// thread.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum meshvpn_result {
    /// Success.
    MESHVPN_OK = 0,
    /// A Rust panic was caught at the boundary. The library is still
    /// usable; the object the call was working on may be in any state its
    /// other calls accept.
    MESHVPN_PANIC = 1,
    /// A pointer that must not be NULL was NULL.
    MESHVPN_NULL_PARAMETER = 2,
    /// A handle that was never issued, was freed already, or is of another
    /// type.
    MESHVPN_INVALID_HANDLE = 3,
    /// An argument is out of its range (a length, a count, a flag, text
    /// that is not UTF-8).
    MESHVPN_INVALID_ARGUMENT = 4,
    /// An output buffer is too small; nothing was written.
    MESHVPN_BUFFER_TOO_SMALL = 5,
    /// Nothing happened within the timeout.
    MESHVPN_TIMEOUT = 6,
    /// The call would wait on itself: an engine cannot be stopped or freed
    /// from inside one of its own callbacks.
    MESHVPN_WOULD_DEADLOCK = 7,
    /// The platform lacks what the call needs (e.g. eventfd off Linux).
    MESHVPN_UNSUPPORTED = 8,
    /// Another tracing subscriber owns the process's global default, so the
    /// log callback cannot be installed.
    MESHVPN_LOG_UNAVAILABLE = 9,

    /// A key is not valid base64/hex or not 32 bytes.
    MESHVPN_KEY_INVALID = 100,
    /// A peer's public key is a low-order point: no handshake is possible.
    MESHVPN_KEY_LOW_ORDER = 101,
    /// A peer's public key is the engine's own.
    MESHVPN_KEY_OWN = 102,
    /// The engine has no private key yet.
    MESHVPN_KEY_MISSING = 103,
    /// wg-quick text that cannot be used (the message names line and key).
    MESHVPN_CONFIG_INVALID = 110,
    /// Not an IP prefix (`10.0.0.0/24`, `fd00::/64`).
    MESHVPN_PREFIX_INVALID = 111,
    /// Not an endpoint (`192.0.2.1:51820`, `[2001:db8::1]:51820`,
    /// `host:51820`) or a name that does not resolve.
    MESHVPN_ENDPOINT_INVALID = 112,

    /// The UDP port cannot be bound.
    MESHVPN_BIND_FAILED = 200,
    /// An engine thread cannot be started.
    MESHVPN_THREAD_FAILED = 201,
    /// No peer with that public key.
    MESHVPN_NO_SUCH_PEER = 202,
    /// The engine is stopped (`meshvpn_engine_stop`); start it again or
    /// free it.
    MESHVPN_ENGINE_STOPPED = 203,
    /// A packet handed to the engine is not an IPv4/IPv6 packet.
    MESHVPN_PACKET_MALFORMED = 210,
    /// No peer's AllowedIPs covers the packet's destination.
    MESHVPN_NO_ROUTE = 211,
    /// The packet was routed to a peer but dropped (no endpoint yet, session
    /// expired, ...); the peer's stats count why.
    MESHVPN_PACKET_DROPPED = 212,
    /// The UDP send failed.
    MESHVPN_NETWORK_ERROR = 213,

    /// A UAPI `set` request is malformed: a line that is not `key=value`,
    /// an unknown key, a bad value, too large. Nothing was changed.
    MESHVPN_UAPI_INVALID = 300,
    /// A valid UAPI `set` request that the engine could not carry out (a
    /// port in use, a refused key); the lines before it were applied.
    MESHVPN_UAPI_REJECTED = 301,

    /// The connection, listener or socket was closed (also while the call
    /// waited: a close from another thread wakes it with this), or its
    /// netstack or engine closed.
    MESHVPN_CLOSED = 400,
    /// The remote answered with a reset: nothing listens on that port.
    MESHVPN_CONNECTION_REFUSED = 401,
    /// No peer's AllowedIPs cover the address, or that peer has no endpoint.
    MESHVPN_UNREACHABLE = 402,
    /// The remote reset an established connection, or it timed out.
    MESHVPN_CONNECTION_RESET = 403,
    /// The netstack's socket limit (`max_sockets`) is reached.
    MESHVPN_SOCKET_LIMIT = 404,
    /// The port is taken.
    MESHVPN_ADDRESS_IN_USE = 405,
    /// The local address is not one of the netstack's.
    MESHVPN_ADDRESS_NOT_AVAILABLE = 406,
    /// A datagram larger than the MTU allows.
    MESHVPN_MESSAGE_TOO_LARGE = 407,
    /// The netstack has no address of the destination's family (IPv4/IPv6).
    MESHVPN_NO_ADDRESS = 408,
    /// A blocked call was woken by `meshvpn_conn_interrupt`,
    /// `meshvpn_udp_interrupt`, `meshvpn_tunnel_stream_interrupt` or
    /// `meshvpn_interrupter_interrupt` before its timeout.
    MESHVPN_INTERRUPTED = 409,
    /// The connection is not dialed yet.
    MESHVPN_NOT_CONNECTED = 410,

    /// No tunnel session for that client key (the agent is not connected),
    /// or the session ended.
    MESHVPN_TUNNEL_NO_SESSION = 500,
    /// The agent refused the target: its policy does not allow it, or the
    /// target refused the connection.
    MESHVPN_TUNNEL_REFUSED = 501,
    /// The stream was closed on this side (`meshvpn_tunnel_stream_close`).
    MESHVPN_TUNNEL_CLOSED = 502,
    /// The far side ended the stream with an error, or the tunnel under it
    /// went down; the message has the far side's text.
    MESHVPN_TUNNEL_RESET = 503,
    /// TLS settings that cannot be used (bad PEM, a key that does not match
    /// its certificate) or a failed TLS handshake.
    MESHVPN_TUNNEL_TLS = 504,
    /// The server did not accept the agent's credentials (HTTP 401/403).
    MESHVPN_TUNNEL_AUTH = 505,
    /// The websocket upgrade failed otherwise (wrong path, not a tunnel
    /// server).
    MESHVPN_TUNNEL_HANDSHAKE = 506,
    /// The server cannot listen on its address.
    MESHVPN_TUNNEL_LISTEN_FAILED = 507,
    /// The agent cannot reach the server (TCP connect failed).
    MESHVPN_TUNNEL_CONNECT_FAILED = 508,
    /// The session already carries as many streams as its limit allows.
    MESHVPN_TUNNEL_LIMIT = 509,
    /// The server or agent is not started.
    MESHVPN_TUNNEL_NOT_RUNNING = 510,
    /// The engine has no relay (`meshvpn_engine_relay_start` was not
    /// called, or the relay was stopped), or the tunnel server serves none.
    MESHVPN_RELAY_NOT_RUNNING = 520,
    /// The control server refused the join key: malformed or unknown.
    MESHVPN_JOIN_KEY_INVALID = 530,
    /// The join key expired.
    MESHVPN_JOIN_KEY_EXPIRED = 531,
    /// The join key was revoked.
    MESHVPN_JOIN_KEY_REVOKED = 532,
    /// The single-use join key was used by another node already.
    MESHVPN_JOIN_KEY_REUSED = 533,
    /// The control server refused the node for another reason that
    /// retrying cannot fix (removed, a tag its key does not grant, unknown
    /// without a join key); the message says which.
    MESHVPN_JOIN_REFUSED = 534,

    // The control server (`meshvpn_control_server`).
    /// The control database cannot be opened, read or written (the
    /// message says why: a missing directory, a full disk, a lock held
    /// too long by another process).
    MESHVPN_CONTROL_STORE = 620,
    /// A policy that does not load; the message names the line and column.
    /// Nothing was stored.
    MESHVPN_CONTROL_POLICY_INVALID = 621,
    /// No such node or join key.
    MESHVPN_CONTROL_NOT_FOUND = 622,
    /// A route that cannot be approved: the node does not advertise it, or
    /// it overlaps an approved route of another cluster (named).
    MESHVPN_CONTROL_ROUTE_REFUSED = 623,
}

use meshvpn_result::*;

impl meshvpn_result {
    /// Every code, for tests and the message function.
    pub(crate) const ALL: [meshvpn_result; 59] = [
        MESHVPN_OK,
        MESHVPN_PANIC,
        MESHVPN_NULL_PARAMETER,
        MESHVPN_INVALID_HANDLE,
        MESHVPN_INVALID_ARGUMENT,
        MESHVPN_BUFFER_TOO_SMALL,
        MESHVPN_TIMEOUT,
        MESHVPN_WOULD_DEADLOCK,
        MESHVPN_UNSUPPORTED,
        MESHVPN_LOG_UNAVAILABLE,
        MESHVPN_KEY_INVALID,
        MESHVPN_KEY_LOW_ORDER,
        MESHVPN_KEY_OWN,
        MESHVPN_KEY_MISSING,
        MESHVPN_CONFIG_INVALID,
        MESHVPN_PREFIX_INVALID,
        MESHVPN_ENDPOINT_INVALID,
        MESHVPN_BIND_FAILED,
        MESHVPN_THREAD_FAILED,
        MESHVPN_NO_SUCH_PEER,
        MESHVPN_ENGINE_STOPPED,
        MESHVPN_PACKET_MALFORMED,
        MESHVPN_NO_ROUTE,
        MESHVPN_PACKET_DROPPED,
        MESHVPN_NETWORK_ERROR,
        MESHVPN_UAPI_INVALID,
        MESHVPN_UAPI_REJECTED,
        MESHVPN_CLOSED,
        MESHVPN_CONNECTION_REFUSED,
        MESHVPN_UNREACHABLE,
        MESHVPN_CONNECTION_RESET,
        MESHVPN_SOCKET_LIMIT,
        MESHVPN_ADDRESS_IN_USE,
        MESHVPN_ADDRESS_NOT_AVAILABLE,
        MESHVPN_MESSAGE_TOO_LARGE,
        MESHVPN_NO_ADDRESS,
        MESHVPN_INTERRUPTED,
        MESHVPN_NOT_CONNECTED,
        MESHVPN_TUNNEL_NO_SESSION,
        MESHVPN_TUNNEL_REFUSED,
        MESHVPN_TUNNEL_CLOSED,
        MESHVPN_TUNNEL_RESET,
        MESHVPN_TUNNEL_TLS,
        MESHVPN_TUNNEL_AUTH,
        MESHVPN_TUNNEL_HANDSHAKE,
        MESHVPN_TUNNEL_LISTEN_FAILED,
        MESHVPN_TUNNEL_CONNECT_FAILED,
        MESHVPN_TUNNEL_LIMIT,
        MESHVPN_TUNNEL_NOT_RUNNING,
        MESHVPN_RELAY_NOT_RUNNING,
        MESHVPN_JOIN_KEY_INVALID,
        MESHVPN_JOIN_KEY_EXPIRED,
        MESHVPN_JOIN_KEY_REVOKED,
        MESHVPN_JOIN_KEY_REUSED,
        MESHVPN_JOIN_REFUSED,
        MESHVPN_CONTROL_STORE,
        MESHVPN_CONTROL_POLICY_INVALID,
        MESHVPN_CONTROL_NOT_FOUND,
        MESHVPN_CONTROL_ROUTE_REFUSED,
    ];

    fn from_u32(n: u32) -> Option<meshvpn_result> {
        Self::ALL.iter().copied().find(|r| *r as u32 == n)
    }

    /// The fixed text of a code.
    pub fn text(self) -> &'static str {
        match self {
            MESHVPN_OK => "success",
            MESHVPN_PANIC => "a panic inside libmeshvpn was caught",
            MESHVPN_NULL_PARAMETER => "a required pointer was NULL",
            MESHVPN_INVALID_HANDLE => "invalid handle (freed, stale, or of another type)",
            MESHVPN_INVALID_ARGUMENT => "invalid argument",
            MESHVPN_BUFFER_TOO_SMALL => "output buffer too small",
            MESHVPN_TIMEOUT => "timed out",
            MESHVPN_WOULD_DEADLOCK => "an engine cannot be stopped or freed from its own callback",
            MESHVPN_UNSUPPORTED => "not supported on this platform",
            MESHVPN_LOG_UNAVAILABLE => "another tracing subscriber is the global default",
            MESHVPN_KEY_INVALID => "invalid key",
            MESHVPN_KEY_LOW_ORDER => "public key is a low-order point",
            MESHVPN_KEY_OWN => "public key is the engine's own",
            MESHVPN_KEY_MISSING => "the engine has no private key",
            MESHVPN_CONFIG_INVALID => "invalid configuration",
            MESHVPN_PREFIX_INVALID => "invalid IP prefix",
            MESHVPN_ENDPOINT_INVALID => "invalid endpoint",
            MESHVPN_BIND_FAILED => "cannot bind the UDP port",
            MESHVPN_THREAD_FAILED => "cannot start an engine thread",
            MESHVPN_NO_SUCH_PEER => "no such peer",
            MESHVPN_ENGINE_STOPPED => "the engine is stopped",
            MESHVPN_PACKET_MALFORMED => "not an IP packet",
            MESHVPN_NO_ROUTE => "no route: no peer's AllowedIPs covers the destination",
            MESHVPN_PACKET_DROPPED => "packet dropped",
            MESHVPN_NETWORK_ERROR => "UDP send failed",
            MESHVPN_UAPI_INVALID => "malformed UAPI request",
            MESHVPN_UAPI_REJECTED => "UAPI request rejected by the engine",
            MESHVPN_CLOSED => "closed",
            MESHVPN_CONNECTION_REFUSED => "connection refused",
            MESHVPN_UNREACHABLE => "no route to the address",
            MESHVPN_CONNECTION_RESET => "connection reset",
            MESHVPN_SOCKET_LIMIT => "the netstack's socket limit is reached",
            MESHVPN_ADDRESS_IN_USE => "address in use",
            MESHVPN_ADDRESS_NOT_AVAILABLE => "address not available",
            MESHVPN_MESSAGE_TOO_LARGE => "datagram too large",
            MESHVPN_NO_ADDRESS => "the netstack has no address of that family",
            MESHVPN_INTERRUPTED => "interrupted",
            MESHVPN_NOT_CONNECTED => "not connected",
            MESHVPN_TUNNEL_NO_SESSION => "no tunnel session for that client",
            MESHVPN_TUNNEL_REFUSED => "the tunnel agent refused the target",
            MESHVPN_TUNNEL_CLOSED => "the tunnel stream is closed",
            MESHVPN_TUNNEL_RESET => "the tunnel stream was reset",
            MESHVPN_TUNNEL_TLS => "tunnel TLS failure",
            MESHVPN_TUNNEL_AUTH => "the tunnel server refused the credentials",
            MESHVPN_TUNNEL_HANDSHAKE => "tunnel websocket upgrade failed",
            MESHVPN_TUNNEL_LISTEN_FAILED => "the tunnel server cannot listen",
            MESHVPN_TUNNEL_CONNECT_FAILED => "cannot connect to the tunnel server",
            MESHVPN_TUNNEL_LIMIT => "the tunnel session is at its stream limit",
            MESHVPN_TUNNEL_NOT_RUNNING => "the tunnel server or agent is not started",
            MESHVPN_RELAY_NOT_RUNNING => "no relay is running",
            MESHVPN_JOIN_KEY_INVALID => "the join key is malformed or unknown",
            MESHVPN_JOIN_KEY_EXPIRED => "the join key expired",
            MESHVPN_JOIN_KEY_REVOKED => "the join key was revoked",
            MESHVPN_JOIN_KEY_REUSED => "the single-use join key was used already",
            MESHVPN_JOIN_REFUSED => "the control server refused the node",
            MESHVPN_CONTROL_STORE => "the control database failed",
            MESHVPN_CONTROL_POLICY_INVALID => "invalid policy",
            MESHVPN_CONTROL_NOT_FOUND => "no such node or join key",
            MESHVPN_CONTROL_ROUTE_REFUSED => "the route cannot be approved",
        }
    }
}

/// An error on its way to C: a code and the detailed message that
/// `meshvpn_last_error_message` will return.
#[derive(Debug)]
pub(crate) struct Error {
    pub code: meshvpn_result,
    pub message: String,
}

impl Error {
    pub fn new(code: meshvpn_result, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Error {
        Error::new(MESHVPN_NULL_PARAMETER, format!("{what} is NULL"))
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(MESHVPN_INVALID_ARGUMENT, message)
    }

    /// An eventfd that could not be made: `MESHVPN_UNSUPPORTED` off Linux,
    /// else `MESHVPN_INVALID_ARGUMENT` with the reason.
    pub fn eventfd(e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::Unsupported {
            Error::new(MESHVPN_UNSUPPORTED, e.to_string())
        } else {
            Error::invalid(format!("eventfd: {e}"))
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
        let code = match &e {
            EngineError::Bind { .. } => MESHVPN_BIND_FAILED,
            EngineError::LowOrderKey(_) => MESHVPN_KEY_LOW_ORDER,
            EngineError::OwnKey(_) => MESHVPN_KEY_OWN,
            EngineError::NoSuchPeer(_) => MESHVPN_NO_SUCH_PEER,
            EngineError::Closed => MESHVPN_ENGINE_STOPPED,
            EngineError::Thread(_) => MESHVPN_THREAD_FAILED,
        };
        Error::new(code, e.to_string())
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        let code = match e {
            SendError::Malformed => MESHVPN_PACKET_MALFORMED,
            SendError::NoRoute => MESHVPN_NO_ROUTE,
            SendError::Dropped(_) | SendError::Filtered(_) => MESHVPN_PACKET_DROPPED,
            SendError::Network => MESHVPN_NETWORK_ERROR,
            SendError::Closed => MESHVPN_ENGINE_STOPPED,
        };
        Error::new(code, e.to_string())
    }
}

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Error {
        Error::new(MESHVPN_KEY_INVALID, e.to_string())
    }
}

impl From<ConfError> for Error {
    fn from(e: ConfError) -> Error {
        Error::new(MESHVPN_CONFIG_INVALID, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<(meshvpn_result, String)>> = const { RefCell::new(None) };
}

/// Records `e` as this thread's last error and returns its code. The
/// message leads with the code's text, once: a message that already starts
/// with it ("connection refused" for `MESHVPN_CONNECTION_REFUSED`) is kept
/// as it is.
pub(crate) fn record(e: Error) -> meshvpn_result {
    let code = e.code;
    let text = code.text();
    let message = if e.message.is_empty() {
        text.to_owned()
    } else if e.message.starts_with(text) {
        e.message
    } else {
        format!("{text}: {}", e.message)
    };
    LAST_ERROR.with_borrow_mut(|last| *last = Some((code, message)));
    code
}

#[cfg(test)]
pub(crate) fn last_error_for_tests() -> String {
    LAST_ERROR.with_borrow(|l| l.as_ref().map(|l| l.1.clone()).unwrap_or_default())
}

/// Writes the fixed text of `result` into `buf` as a NUL-terminated string
/// and its length (without the NUL) into `*out_len`.
///
/// `result` is a plain integer so that a number this version does not know
/// is not undefined behaviour: it gets `MESHVPN_INVALID_ARGUMENT`.
///
/// Buffer protocol (shared by every function that fills a caller's
/// buffer): if `buf` is NULL and `buf_len` is 0, nothing is copied and
/// `*out_len` receives the length the text needs *including* its NUL; if
/// the buffer is too small, `MESHVPN_BUFFER_TOO_SMALL` is returned and
/// nothing is written.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_result_message(
    result: u32,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = ptr::Out::new(out_len, "out_len")?;
        let code = meshvpn_result::from_u32(result)
            .ok_or_else(|| Error::invalid(format!("{result} is not a meshvpn_result")))?;
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        let n = unsafe { ptr::copy_text(buf, buf_len, code.text()) }?;
        out_len.write(n);
        Ok(())
    }}
}

/// Writes the message of the last call that failed on this thread (for
/// example `"invalid configuration: line 3: PublicKey: not valid base64"`)
/// into `buf`, NUL-terminated, and its length without the NUL into
/// `*out_len`. Follows the buffer protocol of `meshvpn_result_message`.
///
/// Successful calls do not clear the message, so read it right after the
/// failing call, on the same thread (in Go: with the OS thread locked).
/// With no failure yet on this thread, the message is empty.
/// Messages never contain private or preshared keys.
///
/// Thread safety: safe to call from any thread; each thread has its own
/// last error.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_last_error_message(
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = ptr::Out::new(out_len, "out_len")?;
        let message = LAST_ERROR.with_borrow(|l| l.as_ref().map(|l| l.1.clone()).unwrap_or_default());
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        let n = unsafe { ptr::copy_text(buf, buf_len, &message) }?;
        out_len.write(n);
        Ok(())
    }}
}

/// The code of the last call that failed on this thread, or `MESHVPN_OK`
/// if none has.
///
/// Thread safety: safe to call from any thread; each thread has its own
/// last error.
#[no_mangle]
pub extern "C" fn meshvpn_last_error() -> meshvpn_result {
    // Not `ffi_boundary!`: that would record the returned code as a new
    // error and overwrite the message.
    crate::panic::catch_value(MESHVPN_PANIC, || {
        LAST_ERROR.with_borrow(|l| l.as_ref().map_or(MESHVPN_OK, |l| l.0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_texts_are_not_empty() {
        let mut seen = std::collections::HashSet::new();
        for r in &meshvpn_result::ALL {
            assert!(seen.insert(*r as u32), "{r:?} reuses a number");
            assert!(!r.text().is_empty());
            assert_eq!(meshvpn_result::from_u32(*r as u32), Some(*r));
        }
        assert_eq!(meshvpn_result::from_u32(99), None);
    }

    #[test]
    fn recorded_message_names_the_code_once() {
        record(Error::new(MESHVPN_CONNECTION_REFUSED, "connection refused"));
        assert_eq!(last_error_for_tests(), "connection refused");
        record(Error::new(
            MESHVPN_UNREACHABLE,
            "no route to the address: no peer's AllowedIPs cover it",
        ));
        assert_eq!(
            last_error_for_tests(),
            "no route to the address: no peer's AllowedIPs cover it"
        );
        record(Error::new(MESHVPN_INVALID_ARGUMENT, "port 0"));
        assert_eq!(
            last_error_for_tests(),
            format!("{}: port 0", MESHVPN_INVALID_ARGUMENT.text())
        );
        record(Error::new(MESHVPN_CLOSED, String::new()));
        assert_eq!(last_error_for_tests(), "closed");
    }

    #[test]
    fn message_buffer_protocol() {
        let mut needed = 0usize;
        // SAFETY: NULL buffer with length 0 is the size query.
        let r = unsafe {
            meshvpn_result_message(
                MESHVPN_NO_ROUTE as u32,
                std::ptr::null_mut(),
                0,
                &mut needed,
            )
        };
        assert_eq!(r, MESHVPN_OK);
        assert_eq!(needed, MESHVPN_NO_ROUTE.text().len() + 1);
        let mut small = [0x55 as c_char; 4];
        let mut n = 777usize;
        // SAFETY: `small` has 4 writable bytes.
        let r = unsafe {
            meshvpn_result_message(MESHVPN_NO_ROUTE as u32, small.as_mut_ptr(), 4, &mut n)
        };
        assert_eq!(r, MESHVPN_BUFFER_TOO_SMALL);
        assert_eq!(n, 777, "out_len untouched on failure");
        assert!(
            small.iter().all(|&c| c == 0x55),
            "buffer untouched on failure"
        );
        let mut buf = vec![0 as c_char; needed];
        // SAFETY: `buf` has `needed` writable bytes.
        let r = unsafe {
            meshvpn_result_message(MESHVPN_NO_ROUTE as u32, buf.as_mut_ptr(), needed, &mut n)
        };
        assert_eq!(r, MESHVPN_OK);
        assert_eq!(n, needed - 1);
        // SAFETY: written NUL-terminated above.
        let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), MESHVPN_NO_ROUTE.text());
        // SAFETY: as above; 12345 is not a code.
        let r = unsafe { meshvpn_result_message(12345, buf.as_mut_ptr(), needed, &mut n) };
        assert_eq!(r, MESHVPN_INVALID_ARGUMENT);
        assert_eq!(meshvpn_last_error(), MESHVPN_INVALID_ARGUMENT);
        assert!(last_error_for_tests().contains("12345"));
    }
}
