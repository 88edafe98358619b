//! `meshvpn_engine`: a WireGuard engine — its lifecycle (new, start, stop,
//! free), keys, peers and configuration read-back. Stats are in `stats`,
//! the packet API in `packet`.
//!
//! A handle refers to an `EngineHandle`, which is either running (an
//! `Engine` with its threads and UDP sockets) or stopped (the configuration
//! it had, so `meshvpn_engine_start` brings it back as it was).
//!
//! Thread safety, for every function here: an engine may be used from any
//! number of threads at once, including `meshvpn_engine_free` racing with
//! other calls on the same handle (those calls then fail with
//! `MESHVPN_ENGINE_STOPPED` or `MESHVPN_INVALID_HANDLE`; none touches freed
//! memory).

use std::ffi::c_char;
use std::sync::Arc;

use ::meshvpn_engine::config::{emit_wg_quick, parse_wg_quick};
use ::meshvpn_engine::filter::FilterRules;
use ::meshvpn_engine::{Config, Engine};
use parking_lot::RwLock;

use crate::callback::{self, Inside};
use crate::config::{self, meshvpn_config, meshvpn_peer_config, meshvpn_peer_update};
use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::key::meshvpn_key;
use crate::packet::Wakeup;
use crate::ptr::{self, Out};

/// A WireGuard engine. Opaque: created by `meshvpn_engine_new` or
/// `meshvpn_engine_new_wg_quick`, released by `meshvpn_engine_free`.
/// The value is a handle, not a pointer to memory: never dereference it.
pub struct meshvpn_engine {
    _private: [u8; 0],
}

enum State {
    Running(Arc<Engine>),
    Stopped(Box<Config>),
}

pub(crate) struct EngineHandle {
    state: RwLock<State>,
    pub(crate) wakeup: Arc<Wakeup>,
}

static ENGINES: HandleTable<meshvpn_engine, EngineHandle> = HandleTable::new(tag::ENGINE);

impl EngineHandle {
    fn start(config: &Config) -> Result<EngineHandle> {
        let wakeup = Arc::new(Wakeup::default());
        let engine = Engine::new(config)?;
        wakeup.attach(&engine);
        Ok(EngineHandle {
            state: RwLock::new(State::Running(Arc::new(engine))),
            wakeup,
        })
    }

    /// The running engine, or `MESHVPN_ENGINE_STOPPED`.
    pub(crate) fn running(&self) -> Result<Arc<Engine>> {
        match &*self.state.read() {
            State::Running(e) if !e.is_closed() => Ok(e.clone()),
            _ => Err(Error::new(
                meshvpn_result::MESHVPN_ENGINE_STOPPED,
                "start it with meshvpn_engine_start",
            )),
        }
    }

    fn stop(&self) {
        let engine = {
            let mut state = self.state.write();
            let State::Running(e) = &*state else {
                return;
            };
            let e = e.clone();
            *state = State::Stopped(Box::new(e.config()));
            e
        };
        // Outside the lock: closing joins the engine's threads, and a log
        // callback on one of them may be waiting for the lock.
        engine.close();
    }

    fn restart(&self) -> Result<()> {
        let mut state = self.state.write();
        let State::Stopped(cfg) = &*state else {
            return Ok(());
        };
        let engine = Engine::new(cfg)?;
        self.wakeup.attach(&engine);
        *state = State::Running(Arc::new(engine));
        Ok(())
    }
}

impl Handled for EngineHandle {
    const NAME: &'static str = "meshvpn_engine";
    // Freeing from the receive callback would join the thread it runs on.
    const FREE_REFUSED_INSIDE: &'static [Inside] = &[Inside::Log, Inside::Recv];

    fn close(&self) {
        self.stop();
    }
}

/// The live engine behind a C handle. Every engine function starts here.
pub(crate) fn lookup(engine: *const meshvpn_engine) -> Result<Arc<EngineHandle>> {
    ENGINES.lookup(engine)
}

/// A new handle on an engine something else started (a mesh node's,
/// `meshvpn_node_engine`).
pub(crate) fn insert_running(engine: Arc<Engine>, out: Out<*mut meshvpn_engine>) -> Result<()> {
    let wakeup = Arc::new(Wakeup::default());
    wakeup.attach(&engine);
    let h = ENGINES.insert(Arc::new(EngineHandle {
        state: RwLock::new(State::Running(engine)),
        wakeup,
    }))?;
    out.write(h);
    Ok(())
}

fn insert(handle: EngineHandle, out: Out<*mut meshvpn_engine>) -> Result<()> {
    let handle = Arc::new(handle);
    match ENGINES.insert(handle.clone()) {
        Ok(h) => {
            out.write(h);
            Ok(())
        }
        Err(e) => {
            handle.stop();
            Err(e)
        }
    }
}

/// Creates an engine from `config` and starts it: the UDP port is bound
/// and the engine's threads run when this returns. On success
/// `*out_engine` receives the handle, which the caller owns and must
/// release with `meshvpn_engine_free`.
///
/// `config` and everything it points to are only read during the call.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_ARGUMENT` (impossible
/// lengths, text that is not UTF-8), `MESHVPN_PREFIX_INVALID`,
/// `MESHVPN_ENDPOINT_INVALID`, `MESHVPN_KEY_LOW_ORDER`, `MESHVPN_KEY_OWN`,
/// `MESHVPN_BIND_FAILED`, `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_new(
    config: *const meshvpn_config,
    out_engine: *mut *mut meshvpn_engine,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        let out = Out::new(out_engine, "out_engine")?;
        // SAFETY: the config's pointers are valid as its doc says.
        let cfg = unsafe { config::read_config(c) }?;
        insert(EngineHandle::start(&cfg)?, out)
    }}
}

/// Creates and starts an engine from wg-quick text (the contents of a
/// `wg0.conf`: `[Interface]` with PrivateKey, ListenPort, Address, MTU,
/// FwMark; `[Peer]` sections with PublicKey, PresharedKey, AllowedIPs,
/// Endpoint, PersistentKeepalive; wg-quick-only keys such as DNS or PostUp
/// are ignored). `text` is NUL-terminated and only read during the call.
/// Endpoint host names are resolved during the call.
///
/// On success `*out_engine` receives a handle the caller owns and must
/// release with `meshvpn_engine_free`.
///
/// Errors: as `meshvpn_engine_new`, plus `MESHVPN_CONFIG_INVALID` whose
/// message names the line and key.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_new_wg_quick(
    text: *const c_char,
    out_engine: *mut *mut meshvpn_engine,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(text, "text") }?;
        let out = Out::new(out_engine, "out_engine")?;
        let cfg = parse_wg_quick(text)?;
        insert(EngineHandle::start(&cfg)?, out)
    }}
}

/// Stops the engine (if running) and releases it. The handle, and every
/// copy of it, is dead afterwards: passing it to any function returns
/// `MESHVPN_INVALID_HANDLE`, so a double free is reported, not undefined.
/// Freeing NULL is a no-op that returns `MESHVPN_OK`.
///
/// When this returns, the engine's threads have ended: its receive
/// callback will not be called again. Calls racing on other threads
/// return `MESHVPN_ENGINE_STOPPED`; blocked `meshvpn_engine_recv_packets`
/// calls wake up with it.
///
/// Errors: `MESHVPN_INVALID_HANDLE`; `MESHVPN_WOULD_DEADLOCK` from inside
/// one of the library's callbacks (the engine is not freed then).
///
/// Thread safety: safe to call from any thread except the library's
/// callbacks.
#[no_mangle]
pub extern "C" fn meshvpn_engine_free(engine: *mut meshvpn_engine) -> meshvpn_result {
    ffi_boundary! {{
        ENGINES.free(engine)
    }}
}

/// Starts a stopped engine again with the configuration it had when it was
/// stopped (keys, peers, the same UDP port). Starting a running engine is
/// a no-op that returns `MESHVPN_OK`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BIND_FAILED` (the port was taken meanwhile; the engine stays
/// stopped), `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread, concurrently with any
/// other call.
#[no_mangle]
pub extern "C" fn meshvpn_engine_start(engine: *mut meshvpn_engine) -> meshvpn_result {
    ffi_boundary! {{
        lookup(engine)?.restart()
    }}
}

/// Stops a running engine: its threads end, its UDP sockets close, blocked
/// calls wake up, and calls other than start/stop/free/is_running return
/// `MESHVPN_ENGINE_STOPPED`. The handle stays valid and keeps the
/// configuration for `meshvpn_engine_start`. Stopping a stopped engine is a
/// no-op that returns `MESHVPN_OK`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_WOULD_DEADLOCK` from inside the library's callbacks.
///
/// Thread safety: safe to call from any thread except the library's
/// callbacks, concurrently with any other call.
#[no_mangle]
pub extern "C" fn meshvpn_engine_stop(engine: *mut meshvpn_engine) -> meshvpn_result {
    ffi_boundary! {{
        callback::refuse_inside(&[Inside::Recv], "meshvpn_engine_stop")?;
        lookup(engine)?.stop();
        Ok(())
    }}
}

/// Writes whether the engine is running into `*out_running`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_is_running(
    engine: *const meshvpn_engine,
    out_running: *mut bool,
) -> meshvpn_result {
    ffi_boundary! {{
        let handle = lookup(engine)?;
        let out = Out::new(out_running, "out_running")?;
        out.write(handle.running().is_ok());
        Ok(())
    }}
}

/// Writes the engine's public key into `*out_key`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_KEY_MISSING` (no private key set).
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_public_key(
    engine: *const meshvpn_engine,
    out_key: *mut meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        let out = Out::new(out_key, "out_key")?;
        let key = e
            .public_key()
            .ok_or_else(|| Error::new(meshvpn_result::MESHVPN_KEY_MISSING, "no private key set"))?;
        out.write(meshvpn_key::from_public(&key));
        Ok(())
    }}
}

/// Replaces the engine's private key while it runs: every session is
/// dropped and handshakes restart with the new key. A peer whose public
/// key is the new public key is removed. `private_key` is copied.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_set_private_key(
    engine: *mut meshvpn_engine,
    private_key: *const meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a valid key or NULL.
        let key = unsafe { ptr::try_ref(private_key, "private_key") }?.private();
        e.set_private_key(Some(key));
        Ok(())
    }}
}

/// Writes the UDP port the engine listens on (the one picked, when the
/// configuration asked for 0) into `*out_port`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_listen_port(
    engine: *const meshvpn_engine,
    out_port: *mut u16,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        Out::new(out_port, "out_port")?.write(e.listen_port());
        Ok(())
    }}
}

/// Writes the engine's inner MTU into `*out_mtu`: the largest packet
/// `meshvpn_engine_recv_packets` delivers, and so the smallest receive
/// buffer it accepts.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_mtu(
    engine: *const meshvpn_engine,
    out_mtu: *mut u16,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        Out::new(out_mtu, "out_mtu")?.write(e.mtu());
        Ok(())
    }}
}

/// Adds a peer, or replaces an existing peer's settings and AllowedIPs
/// (a `[Peer]` section). AllowedIPs another peer had move to this one.
/// `peer` and what it points to are only read during the call.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT`,
/// `MESHVPN_PREFIX_INVALID`, `MESHVPN_ENDPOINT_INVALID`,
/// `MESHVPN_KEY_LOW_ORDER`, `MESHVPN_KEY_OWN`.
///
/// Thread safety: safe to call from any thread while traffic flows.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_add_peer(
    engine: *mut meshvpn_engine,
    peer: *const meshvpn_peer_config,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a valid peer or NULL.
        let p = unsafe { ptr::try_ref(peer, "peer") }?;
        // SAFETY: the peer's pointers are valid as its doc says.
        let cfg = unsafe { config::read_peer(p, "peer") }?;
        e.add_peer(&cfg)?;
        Ok(())
    }}
}

/// Changes some settings of a peer (see `meshvpn_peer_update`), creating
/// it first if `MESHVPN_PEER_UPDATE_CREATE` is set. The endpoint can
/// change at any time (a node whose public IP changed).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT` (unknown flag
/// bits), `MESHVPN_NO_SUCH_PEER` (without `MESHVPN_PEER_UPDATE_CREATE`),
/// `MESHVPN_PREFIX_INVALID`, `MESHVPN_ENDPOINT_INVALID`,
/// `MESHVPN_KEY_LOW_ORDER`, `MESHVPN_KEY_OWN`.
///
/// Thread safety: safe to call from any thread while traffic flows.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_update_peer(
    engine: *mut meshvpn_engine,
    update: *const meshvpn_peer_update,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a valid update or NULL.
        let u = unsafe { ptr::try_ref(update, "update") }?;
        // SAFETY: the update's pointers are valid as its doc says.
        let (key, upd, create) = unsafe { config::read_update(u) }?;
        if !create && e.peer_config(&key).is_none() {
            return Err(Error::new(meshvpn_result::MESHVPN_NO_SUCH_PEER, format!("no peer {key}")));
        }
        e.update_peer(&key, &upd, create)?;
        Ok(())
    }}
}

/// Removes the peer with `public_key`: its sessions end and its AllowedIPs
/// route nowhere.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_NO_SUCH_PEER`.
///
/// Thread safety: safe to call from any thread while traffic flows.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_remove_peer(
    engine: *mut meshvpn_engine,
    public_key: *const meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a valid key or NULL.
        let key = unsafe { ptr::try_ref(public_key, "public_key") }?.public();
        if e.remove_peer(&key) {
            Ok(())
        } else {
            Err(Error::new(meshvpn_result::MESHVPN_NO_SUCH_PEER, format!("no peer {key}")))
        }
    }}
}

/// Starts a handshake with a peer now, without waiting for traffic.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_NO_SUCH_PEER`.
///
/// Thread safety: safe to call from any thread while traffic flows.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_initiate_handshake(
    engine: *mut meshvpn_engine,
    public_key: *const meshvpn_key,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller passes a valid key or NULL.
        let key = unsafe { ptr::try_ref(public_key, "public_key") }?.public();
        e.initiate_handshake(&key)?;
        Ok(())
    }}
}

/// Copies the public keys of the engine's peers, in the order they were
/// added, into `out_keys` (room for `capacity` keys) and their number into
/// `*out_len`. With `out_keys` NULL and `capacity` 0, only the number is
/// written. With too little room: `MESHVPN_BUFFER_TOO_SMALL`, nothing
/// written (peers may be added between the two calls: retry).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT`,
/// `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_peer_keys(
    engine: *const meshvpn_engine,
    out_keys: *mut meshvpn_key,
    capacity: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        let out_len = Out::new(out_len, "out_len")?;
        let keys = e.peer_keys();
        if out_keys.is_null() && capacity == 0 {
            out_len.write(keys.len());
            return Ok(());
        }
        if keys.len() > capacity {
            return Err(Error::new(
                meshvpn_result::MESHVPN_BUFFER_TOO_SMALL,
                format!("{} peers, room for {capacity}", keys.len()),
            ));
        }
        // SAFETY: the caller promises room for `capacity` keys at `out_keys`.
        let out = unsafe { ptr::try_slice_mut(out_keys, keys.len(), "out_keys") }?;
        for (slot, k) in out.iter_mut().zip(&keys) {
            *slot = meshvpn_key::from_public(k);
        }
        out_len.write(keys.len());
        Ok(())
    }}
}

/// Writes the engine's running configuration as wg-quick text (what
/// `wg showconf` prints, plus Address and MTU) into `buf`, NUL-terminated,
/// and its length without the NUL into `*out_len`. Follows the buffer
/// protocol of `meshvpn_result_message` (`buf` NULL and `buf_len` 0 asks
/// for the size). The text contains the private and preshared keys: it is
/// a secret.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_config_text(
    engine: *const meshvpn_engine,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        let out_len = Out::new(out_len, "out_len")?;
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_secret_text(buf, buf_len, out_len, emit_wg_quick(&e.config())) }
    }}
}

/// The buffer ceiling a new engine starts with
/// (`meshvpn_engine_set_buffer_limit`), in bytes.
pub const MESHVPN_DEFAULT_BUFFER_LIMIT: usize = 32 << 20;
// A literal, so cbindgen can write it; the engine's default is the one place.
const _: () = assert!(MESHVPN_DEFAULT_BUFFER_LIMIT == ::meshvpn_engine::wg::DEFAULT_BUFFER_LIMIT);

/// Sets the ceiling on bytes of packets the engine holds in queues
/// (packets waiting behind a handshake, decrypted packets waiting for
/// `meshvpn_engine_recv_packets`). Past it new packets are dropped
/// (`MESHVPN_PACKET_DROPPED` from the send functions) and counted in
/// `meshvpn_stats.buffer_limit_drops` and as `MESHVPN_DROP_SINK_FULL` on
/// their peer. A new engine starts at `MESHVPN_DEFAULT_BUFFER_LIMIT`;
/// lowering the ceiling below what is held now drops nothing already
/// queued.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub extern "C" fn meshvpn_engine_set_buffer_limit(
    engine: *const meshvpn_engine,
    bytes: usize,
) -> meshvpn_result {
    ffi_boundary! {{
        lookup(engine)?.running()?.set_buffer_limit(bytes);
        Ok(())
    }}
}

/// Installs the engine's packet filter from its text form, one rule per
/// line (`in|out from PREFIX,... to PREFIX[:PORTS],... [proto LIST]
/// [icmp LIST]`, `#` comments; the full grammar is in the engine's
/// `filter::text` documentation). `in` rules say which flows peers may
/// start to this node, `out` rules which flows the host may start; replies
/// to an allowed flow pass both ways. NULL removes the filter (allow all,
/// the default); an empty text installs no rule at all, so every new flow
/// is refused. New rules apply to the next packet; tracked flows go on.
/// Refused packets are counted in `meshvpn_stats.filter_*`; a refused
/// send returns `MESHVPN_PACKET_DROPPED`.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_ENGINE_STOPPED`,
/// `MESHVPN_INVALID_ARGUMENT` (not UTF-8, or a rule that does not parse:
/// the last error names its line).
///
/// # Safety
/// A non-NULL `rules` is a NUL-terminated string.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_set_filter(
    engine: *const meshvpn_engine,
    rules: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller promises a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_opt_str(rules, "rules") }?;
        let rules = match text {
            Some(t) => Some(Arc::new(
                FilterRules::from_text(t).map_err(|e| Error::invalid(e.to_string()))?,
            )),
            None => None,
        };
        lookup(engine)?.running()?.set_filter(rules);
        Ok(())
    }}
}

/// Writes the engine's buffer ceiling (`meshvpn_engine_set_buffer_limit`)
/// into `*out_bytes`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_buffer_limit(
    engine: *const meshvpn_engine,
    out_bytes: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        Out::new(out_bytes, "out_bytes")?.write(e.buffer_limit());
        Ok(())
    }}
}
