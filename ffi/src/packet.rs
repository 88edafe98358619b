//! The packet API: the host sends inner IP packets into the mesh and
//! receives the decrypted packets addressed to it, in batches, through
//! buffers the caller owns.
//!
//! ```text
//!   meshvpn_engine_send_packets --> router --> peer encrypt --> UDP
//!   UDP --> engine rx thread --> decrypt --> host queue --(wakeup: eventfd / callback)
//!       --> meshvpn_engine_recv_packets (copies into the caller's buffers)
//! ```
//!
//! Wakeups are edge-triggered and re-armed by every receive call: after a
//! call to `meshvpn_engine_recv_packets` (or from the start), the next
//! packet to arrive signals the eventfd and calls the callback once; a
//! receive call that leaves packets queued signals again at once, so a
//! caller that receives one batch per wakeup never strands packets. Wakeups
//! can be spurious (a receive with timeout 0 then returns
//! `MESHVPN_TIMEOUT`).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ::meshvpn_engine::io::eventfd::EventFd;
use ::meshvpn_engine::Engine;
use parking_lot::Mutex;

use crate::callback::{self, Inside, Userdata};
use crate::engine::{lookup, meshvpn_engine};
use crate::error::{meshvpn_result, Error, Result};
use crate::ptr::{self, Out};
use crate::timeout::{self, meshvpn_timeout_ms};

/// Most packets one send or receive call takes.
pub const MESHVPN_MAX_BATCH: usize = 1024;
/// Largest packet `meshvpn_engine_send_packets` accepts (an IP packet's
/// length field is 16 bits).
pub const MESHVPN_MAX_PACKET: usize = 65535;
/// How often a blocked receive checks whether its engine was stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

/// One packet in a caller-owned buffer.
///
/// Sending: `data` points to `len` bytes of an IPv4 or IPv6 packet (read
/// only); `capacity` is ignored. Receiving: `data` points to a buffer of
/// `capacity` bytes; on success the packet's length is written to `len`.
/// An array of these can be reused from call to call unchanged.
#[repr(C)]
pub struct meshvpn_packet {
    pub data: *mut u8,
    pub len: usize,
    pub capacity: usize,
}

/// Called when packets are waiting (see `meshvpn_engine_set_recv_callback`).
pub type meshvpn_recv_callback = Option<unsafe extern "C" fn(userdata: *mut std::ffi::c_void)>;

/// Per-engine wakeup state; survives stop/start.
#[derive(Default)]
pub(crate) struct Wakeup {
    /// True when the next packet must signal.
    armed: AtomicBool,
    eventfd: OnceLock<EventFd>,
    callback: Mutex<Option<(unsafe extern "C" fn(*mut std::ffi::c_void), Userdata)>>,
}

impl Wakeup {
    /// Hooks this wakeup into a (new) engine's host queue.
    pub fn attach(self: &std::sync::Arc<Self>, engine: &Engine) {
        self.armed.store(true, Ordering::SeqCst);
        let me = self.clone();
        engine
            .host_queue()
            .set_notify(Some(Box::new(move || me.packet_queued())));
    }

    fn packet_queued(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.signal();
        }
    }

    /// A wakeup that starts being watched now must not miss packets that
    /// arrived before: re-arm, and fire at once if any are waiting.
    fn rearm(&self, engine: Option<&Engine>) {
        self.armed.store(true, Ordering::SeqCst);
        if engine.is_some_and(|e| !e.host_queue().is_empty()) {
            self.packet_queued();
        }
    }

    fn signal(&self) {
        if let Some(fd) = self.eventfd.get() {
            fd.signal();
        }
        // Copied out so the callback may replace itself without deadlock.
        let cb = *self.callback.lock();
        if let Some((f, userdata)) = cb {
            let _guard = callback::Guard::enter(Inside::Recv);
            // SAFETY: the caller registered `f` with `userdata` and promised
            // both stay valid until replaced or the engine is freed.
            unsafe { f(userdata.0) };
        }
    }

    fn eventfd(&self) -> Result<i32> {
        if let Some(fd) = self.eventfd.get() {
            return Ok(fd.as_raw_fd());
        }
        let fd = EventFd::new().map_err(Error::eventfd)?;
        // A racing call may have set one first; ours is then closed.
        Ok(self.eventfd.get_or_init(|| fd).as_raw_fd())
    }
}

/// Sends one inner IP packet into the mesh: it is routed by destination
/// to the peer whose AllowedIPs cover it, encrypted and sent over UDP on
/// the calling thread. A packet for a peer without a session is queued
/// behind the handshake it starts. `data` is only read during the call.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT` (longer than
/// `MESHVPN_MAX_PACKET`), `MESHVPN_PACKET_MALFORMED` (not IPv4/IPv6, or
/// empty), `MESHVPN_NO_ROUTE`, `MESHVPN_PACKET_DROPPED`,
/// `MESHVPN_NETWORK_ERROR`.
///
/// Thread safety: safe to call from any number of threads at once; each
/// encrypts on its own thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_send_packet(
    engine: *mut meshvpn_engine,
    data: *const u8,
    len: usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        // SAFETY: the caller promises `len` readable bytes at `data`.
        let p = unsafe { packet_bytes(data, len, "data") }?;
        e.send_packet(p)?;
        Ok(())
    }}
}

/// # Safety
/// `data` has `len` readable bytes (when `len` <= MESHVPN_MAX_PACKET).
unsafe fn packet_bytes<'a>(data: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len > MESHVPN_MAX_PACKET {
        return Err(Error::invalid(format!(
            "{what}: {len} bytes is longer than any IP packet ({MESHVPN_MAX_PACKET})"
        )));
    }
    // SAFETY: forwarded promise; `len` is bounded above. An empty packet
    // may come with a NULL pointer (and is then malformed, not NULL).
    unsafe { ptr::try_slice(data, len, what) }
}

/// Sends a batch of packets, in order, like `sendmmsg`: it stops at the
/// first packet that fails. If at least one was sent, it returns
/// `MESHVPN_OK` and writes how many to `*out_sent`; when that is fewer than
/// `count`, `meshvpn_last_error()` and `meshvpn_last_error_message()` on
/// the calling thread tell why packet `*out_sent` failed (it was not sent
/// and is counted once in the stats). If the first packet fails, that
/// packet's error is returned and nothing is written. `count` 0 sends nothing and writes 0. The packets and their
/// data are only read during the call.
///
/// Errors: as `meshvpn_engine_send_packet`, plus `MESHVPN_INVALID_ARGUMENT`
/// for `count` above `MESHVPN_MAX_BATCH`.
///
/// Thread safety: as `meshvpn_engine_send_packet`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_send_packets(
    engine: *mut meshvpn_engine,
    packets: *const meshvpn_packet,
    count: usize,
    out_sent: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let e = lookup(engine)?.running()?;
        let out_sent = Out::new(out_sent, "out_sent")?;
        check_batch(count)?;
        // SAFETY: the caller promises `count` packets at `packets`.
        let packets = unsafe { ptr::try_slice(packets, count, "packets") }?;
        let mut sent = 0;
        for (i, p) in packets.iter().enumerate() {
            // SAFETY: the caller promises each packet's `len` bytes at `data`.
            let result = unsafe { packet_bytes(p.data, p.len, &format!("packets[{i}]")) }
                .and_then(|bytes| e.send_packet(bytes).map_err(Error::from));
            match result {
                Ok(()) => sent += 1,
                Err(err) if sent == 0 => return Err(err),
                Err(err) => {
                    // Success overall; why the batch stopped is this
                    // thread's last error.
                    crate::error::record(err);
                    break;
                }
            }
        }
        out_sent.write(sent);
        Ok(())
    }}
}

fn check_batch(count: usize) -> Result<()> {
    if count > MESHVPN_MAX_BATCH {
        return Err(Error::invalid(format!(
            "count: {count} is above MESHVPN_MAX_BATCH ({MESHVPN_MAX_BATCH})"
        )));
    }
    Ok(())
}

/// Receives decrypted packets addressed to the host: waits up to
/// `timeout_ms` milliseconds (0: do not wait; `MESHVPN_WAIT_FOREVER`: no
/// deadline) for the first packet, then takes as many more as are already
/// queued, up to `count`. Packet `i` is copied into `packets[i].data` and
/// its length written to `packets[i].len`; the number received goes to
/// `*out_received`. Nothing else is written.
///
/// Every buffer's `capacity` must be at least the engine's MTU (`meshvpn_engine_mtu`), the
/// largest packet it delivers; this is checked before anything is taken
/// from the queue, so no packet is ever truncated or lost to a small
/// buffer.
///
/// Stopping or freeing the engine from another thread wakes a blocked call
/// within about 20 ms with `MESHVPN_ENGINE_STOPPED`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_ENGINE_STOPPED`, `MESHVPN_INVALID_ARGUMENT` (`count` 0 or above
/// `MESHVPN_MAX_BATCH`), `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_TIMEOUT`
/// (nothing arrived; nothing written).
///
/// Thread safety: safe to call from any number of threads at once; each
/// packet goes to exactly one caller.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_recv_packets(
    engine: *mut meshvpn_engine,
    packets: *mut meshvpn_packet,
    count: usize,
    timeout_ms: meshvpn_timeout_ms,
    out_received: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let handle = lookup(engine)?;
        let e = handle.running()?;
        let out_received = Out::new(out_received, "out_received")?;
        if count == 0 {
            return Err(Error::invalid("count: 0 packets asked for"));
        }
        check_batch(count)?;
        // SAFETY: the caller promises `count` packets at `packets`, not
        // used elsewhere during the call.
        let packets = unsafe { ptr::try_slice_mut(packets, count, "packets") }?;
        let mtu = e.mtu() as usize;
        for (i, p) in packets.iter().enumerate() {
            if p.data.is_null() {
                return Err(Error::null(&format!("packets[{i}].data")));
            }
            if p.capacity < mtu {
                return Err(Error::new(
                    meshvpn_result::MESHVPN_BUFFER_TOO_SMALL,
                    format!("packets[{i}]: capacity {}, the engine's MTU is {mtu}", p.capacity),
                ));
            }
        }
        handle.wakeup.armed.store(true, Ordering::SeqCst);
        let queue = e.host_queue();
        let deadline = timeout::deadline(timeout_ms);
        let first = loop {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(STOP_POLL),
                None => STOP_POLL,
            };
            if let Some(p) = queue.recv_timeout(wait) {
                break p;
            }
            if e.is_closed() {
                return Err(Error::new(meshvpn_result::MESHVPN_ENGINE_STOPPED, "stopped while waiting"));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::new(
                    meshvpn_result::MESHVPN_TIMEOUT,
                    format!("no packet within {timeout_ms} ms"),
                ));
            }
        };
        // From here on packets are taken from the queue: nothing may fail.
        let mut n = 0;
        let mut next = Some(first);
        while let Some(p) = next {
            let slot = &mut packets[n];
            // SAFETY: the caller promised `slot.capacity` (>= MTU >= p.len())
            // writable bytes at `slot.data`.
            unsafe { ptr::copy_bytes(slot.data, &p) };
            slot.len = p.len();
            n += 1;
            next = if n < count { queue.try_recv() } else { None };
        }
        if !queue.is_empty() && handle.wakeup.armed.swap(false, Ordering::SeqCst) {
            handle.wakeup.signal();
        }
        out_received.write(n);
        Ok(())
    }}
}

/// Writes into `*out_fd` an eventfd that becomes readable when packets
/// wait: poll it for `POLLIN`, read 8 bytes from it to reset it, then call
/// `meshvpn_engine_recv_packets`.
///
/// Wakeup rules (the eventfd and the receive callback alike): every
/// receive call re-arms the wakeup, and the next packet to arrive fires it
/// once; a receive call that leaves packets queued fires it again at once,
/// so receiving one batch per wakeup never strands packets. A wakeup that
/// is registered while packets wait fires at once. Wakeups can be spurious
/// (a receive with timeout 0 then returns `MESHVPN_TIMEOUT`).
///
/// The engine owns the fd (the same one on every call, across stop/start);
/// it is closed by `meshvpn_engine_free`, so stop polling it before
/// freeing. Do not close it.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_UNSUPPORTED` (not Linux), `MESHVPN_INVALID_ARGUMENT` (the
/// eventfd could not be created; the message says why).
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_recv_fd(
    engine: *mut meshvpn_engine,
    out_fd: *mut i32,
) -> meshvpn_result {
    ffi_boundary! {{
        let handle = lookup(engine)?;
        let out = Out::new(out_fd, "out_fd")?;
        let fd = handle.wakeup.eventfd()?;
        handle.wakeup.rearm(handle.running().ok().as_deref());
        out.write(fd);
        Ok(())
    }}
}

/// Registers `callback` to be called with `userdata` when packets wait
/// (under the wakeup rules of `meshvpn_engine_recv_fd`), or removes it
/// when `callback` is NULL.
/// It replaces any previous callback. If packets are already waiting, it is
/// called at once, on the calling thread, before this returns.
///
/// The callback runs on the engine's receive thread while that thread
/// cannot receive more: it should only note the event (signal a
/// condition, write to a pipe) or receive packets with timeout 0. It must
/// not stop or free this engine (those calls return
/// `MESHVPN_WOULD_DEADLOCK`). `userdata` must stay valid, and usable from
/// that thread, until the callback is replaced or the engine is freed;
/// after `meshvpn_engine_free` returns it is never called again.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread at any time, including from
/// the callback itself.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_engine_set_recv_callback(
    engine: *mut meshvpn_engine,
    callback: meshvpn_recv_callback,
    userdata: *mut std::ffi::c_void,
) -> meshvpn_result {
    ffi_boundary! {{
        let handle = lookup(engine)?;
        *handle.wakeup.callback.lock() = callback.map(|f| (f, Userdata(userdata)));
        handle.wakeup.rearm(handle.running().ok().as_deref());
        Ok(())
    }}
}
