//! The WireGuard relay of an engine: `meshvpn_engine_relay_*`.
//!
//! ```text
//!   meshvpn_engine_relay_start(engine, config)   connect (in the background) and register
//!   meshvpn_engine_relay_status / _last_error    counters, why the last session ended
//!   meshvpn_engine_relay_wait_connected          until registered, or a timeout
//!   meshvpn_engine_relay_stop(engine)            peers on the relay go back to UDP
//! ```
//!
//! Peers whose UDP handshakes go unanswered move to the relay by
//! themselves and move back when a UDP probe is answered; a peer on the
//! relay shows `on_relay` (and the endpoint `[100::N]:0`) in its stats.
//! The relay is a property of the running engine: `meshvpn_engine_stop`
//! ends it, and a restarted engine has none until started again.
//!
//! Thread safety, for every function here: safe to call from any thread,
//! concurrently with each other and with every other engine function.

use std::ffi::c_char;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::meshvpn_engine::relay::{RelayConfig, RelayStatus};
use ::meshvpn_engine::ws::tls;
use ::meshvpn_engine::Engine;

use crate::engine::{self, meshvpn_engine};
use crate::error::{meshvpn_result, Error, Result};
use crate::ptr::{self, Out};
use crate::timeout::{deadline, meshvpn_timeout_ms};
use crate::tunnel::SESSION_WAIT_SLICE;

use meshvpn_result::*;

/// Where and how an engine reaches a relay (a `meshvpn tunnel serve
/// --relay`, or a `meshvpn_tunnel_server` with `relay` set). Only read
/// during `meshvpn_engine_relay_start`.
#[repr(C)]
pub struct meshvpn_relay_config {
    /// NUL-terminated: `wss://host:port/v1-meshvpn/relay` (`ws://` is plain
    /// HTTP, for tests). Required.
    pub url: *const c_char,
    /// PEM: the CA that signed the relay's certificate, `ca_pem_len` bytes
    /// (no NUL needed). Required for `wss://`: the relay is always verified.
    pub ca_pem: *const u8,
    pub ca_pem_len: usize,
    /// NUL-terminated: sent as `Authorization: Bearer TOKEN` when the relay
    /// asks for the tunnel's credentials; may be NULL. A secret: never
    /// logged, never in an error message.
    pub token: *const c_char,
    /// Milliseconds between UDP probes of a peer on the relay (an answered
    /// probe moves it back to UDP); 0 means the default, 5000.
    pub probe_interval_ms: u32,
    /// PEM: a client certificate (chain) to present to the relay,
    /// `client_cert_pem_len` bytes, and its private key, `client_key_pem_len`
    /// bytes; both or neither (NULL and 0), and only with `ca_pem`. A relay
    /// whose server has a client CA and no tokens (`meshvpn tunnel serve
    /// --client-ca --relay`) demands one signed by that CA. The key is a
    /// secret: never logged, never in an error message.
    pub client_cert_pem: *const u8,
    pub client_cert_pem_len: usize,
    pub client_key_pem: *const u8,
    pub client_key_pem_len: usize,
}

/// The engine's relay client, from `meshvpn_engine_relay_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct meshvpn_relay_status {
    /// Registered with the relay now.
    pub connected: bool,
    /// Registrations since `meshvpn_engine_relay_start`.
    pub sessions: u64,
    /// WireGuard datagrams sent to and received from the relay.
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Datagrams not sent: no session, or the send queue was full.
    pub frames_dropped: u64,
}

impl From<&RelayStatus> for meshvpn_relay_status {
    fn from(s: &RelayStatus) -> Self {
        // Exhaustive, as in stats.rs: a new field must be handled here.
        let RelayStatus {
            connected,
            sessions,
            // Text: read by `meshvpn_engine_relay_last_error`.
            last_error: _,
            frames_sent,
            frames_received,
            frames_dropped,
        } = *s;
        meshvpn_relay_status {
            connected,
            sessions,
            frames_sent,
            frames_received,
            frames_dropped,
        }
    }
}

/// Reads the relay configuration; everything is copied. The URL itself is
/// checked by the engine when the relay starts.
///
/// # Safety
/// The pointers in `c` are valid as `meshvpn_relay_config` documents.
unsafe fn read_relay_config(c: &meshvpn_relay_config) -> Result<RelayConfig> {
    // SAFETY: the caller's promise about `c`'s pointers.
    let (url, ca, token, cert, key) = unsafe {
        (
            ptr::try_str(c.url, "config->url")?,
            ptr::try_slice(c.ca_pem, c.ca_pem_len, "config->ca_pem")?,
            ptr::try_opt_str(c.token, "config->token")?,
            ptr::try_slice(
                c.client_cert_pem,
                c.client_cert_pem_len,
                "config->client_cert_pem",
            )?,
            ptr::try_slice(
                c.client_key_pem,
                c.client_key_pem_len,
                "config->client_key_pem",
            )?,
        )
    };
    let identity = match (cert, key) {
        ([], []) => None,
        ([], _) | (_, []) => {
            return Err(Error::invalid(
                "client_cert_pem and client_key_pem go together: give both or neither",
            ))
        }
        (cert, key) => Some((cert, key)),
    };
    let tls = match ca {
        [] if url.starts_with("wss://") => {
            return Err(Error::invalid(
                "a wss:// relay needs ca_pem, the CA that signed its certificate \
                 (the relay is always verified)",
            ))
        }
        [] if identity.is_some() => {
            return Err(Error::invalid(
                "a client certificate is for a wss:// relay: give ca_pem too",
            ))
        }
        [] => None,
        ca => Some(tls::client_config(ca, identity).map_err(|e| {
            let what = if identity.is_some() {
                "ca_pem or client certificate"
            } else {
                "ca_pem"
            };
            Error::new(MESHVPN_TUNNEL_TLS, format!("{what}: {e}"))
        })?),
    };
    let mut config = RelayConfig::new(url, tls);
    config.token = token.map(str::to_owned);
    if c.probe_interval_ms != 0 {
        config.probe_interval = Duration::from_millis(c.probe_interval_ms.into());
    }
    Ok(config)
}

/// The running engine behind `engine`.
fn running(engine: *const meshvpn_engine) -> Result<Arc<Engine>> {
    engine::lookup(engine)?.running()
}

/// The relay's status, or `MESHVPN_RELAY_NOT_RUNNING`.
fn status(engine: *const meshvpn_engine) -> Result<RelayStatus> {
    running(engine)?.relay_status().ok_or_else(|| {
        Error::new(
            MESHVPN_RELAY_NOT_RUNNING,
            "start it with meshvpn_engine_relay_start",
        )
    })
}

/// Connects the engine to a relay, replacing a relay it has: the client
/// connects in the background (reconnecting with backoff) and registers
/// the engine's public key once it has a private key. From then on peers
/// whose UDP handshakes go unanswered (two initiations, about 5 s) move to
/// the relay, and back when a UDP probe is answered. Returns before the
/// connection is up: see `meshvpn_engine_relay_wait_connected`; connection
/// failures show in `meshvpn_engine_relay_last_error`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT` (a URL that is not
/// `wss://` or `ws://`, `wss://` without `ca_pem`, text that is not UTF-8,
/// only one of `client_cert_pem` and `client_key_pem`, either without
/// `ca_pem`), `MESHVPN_TUNNEL_TLS` (`ca_pem` holds no certificate, the
/// client certificate or key is not PEM or they do not match),
/// `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_relay_start(
    engine: *mut meshvpn_engine,
    config: *const meshvpn_relay_config,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        // SAFETY: the config's pointers are valid as its doc says.
        let config = unsafe { read_relay_config(c) }?;
        let e = running(engine)?;
        e.start_relay(config).map_err(|err| match err {
            ::meshvpn_engine::ws::TunnelError::Io(io) => {
                Error::new(MESHVPN_THREAD_FAILED, io.to_string())
            }
            other => other.into(),
        })
    }}
}

/// Disconnects the engine from its relay; peers on the relay go back to
/// their last UDP endpoint. Stopping without a relay does nothing.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_engine_relay_stop(engine: *mut meshvpn_engine) -> meshvpn_result {
    ffi_boundary! {{
        running(engine)?.stop_relay();
        Ok(())
    }}
}

/// Writes the relay client's counters into `*out_status`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_RELAY_NOT_RUNNING`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_engine_relay_status(
    engine: *mut meshvpn_engine,
    out_status: *mut meshvpn_relay_status,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_status, "out_status")?;
        out.write((&status(engine)?).into());
        Ok(())
    }}
}

/// Writes why the relay's last session or connection attempt ended (e.g.
/// a refused registration, a TLS failure, or a relay that requires a
/// client certificate, which names `client_cert_pem`; empty when nothing
/// failed yet) into `buf`, following the buffer protocol of
/// `meshvpn_result_message`. Never contains the token.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_RELAY_NOT_RUNNING`,
/// `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_relay_last_error(
    engine: *mut meshvpn_engine,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let text = status(engine)?.last_error.unwrap_or_default();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &text) }
    }}
}

/// Waits until the engine is registered with its relay (`MESHVPN_OK`) or
/// `timeout_ms` passes (`MESHVPN_TIMEOUT`; `MESHVPN_WAIT_FOREVER` waits
/// without a deadline). Stopping the relay or the engine (or freeing it)
/// from another thread ends the wait within 50 ms with its error.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_ENGINE_STOPPED`,
/// `MESHVPN_RELAY_NOT_RUNNING` (none, or stopped while waiting),
/// `MESHVPN_TIMEOUT`.
///
/// Thread safety: safe to call from any thread except the log callback.
#[no_mangle]
pub extern "C" fn meshvpn_engine_relay_wait_connected(
    engine: *mut meshvpn_engine,
    timeout_ms: meshvpn_timeout_ms,
) -> meshvpn_result {
    ffi_boundary! {{
        let until = deadline(timeout_ms);
        loop {
            // In slices, re-reading the relay each time, so that stopping
            // the relay or the engine ends the wait.
            status(engine)?;
            let slice = until.map_or(SESSION_WAIT_SLICE, |d| {
                d.saturating_duration_since(Instant::now()).min(SESSION_WAIT_SLICE)
            });
            if running(engine)?.wait_relay_connected(slice) {
                return Ok(());
            }
            if until.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::new(
                    MESHVPN_TIMEOUT,
                    format!("not registered with the relay within {timeout_ms} ms"),
                ));
            }
        }
    }}
}
