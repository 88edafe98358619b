//! The log callback: `tracing` events from the engine and from boringtun
//! are formatted and handed to one process-wide C callback.
//!
//! The bridge is a minimal `tracing::Subscriber` installed as the global
//! default the first time a callback is set (so a Rust program that has
//! its own subscriber keeps it, and gets `MESHVPN_LOG_UNAVAILABLE`). Spans
//! are not tracked; events carry their message and fields as
//! `message key=value ...`. Field values whose names suggest secrets
//! (private, secret, preshared, psk, chaining) are replaced with
//! `<redacted>`; the engine itself never puts keys other than public keys
//! into events.

use std::ffi::{c_char, c_void, CString};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::RwLock;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use crate::callback::{self, Inside, Userdata};
use crate::error::{meshvpn_result, Error};

/// Severity of a log record; also the most verbose level to pass on.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum meshvpn_log_level {
    /// Nothing (as a filter).
    MESHVPN_LOG_OFF = 0,
    MESHVPN_LOG_ERROR = 1,
    MESHVPN_LOG_WARN = 2,
    MESHVPN_LOG_INFO = 3,
    MESHVPN_LOG_DEBUG = 4,
    MESHVPN_LOG_TRACE = 5,
}

use meshvpn_log_level::*;

impl meshvpn_log_level {
    fn of(level: &Level) -> meshvpn_log_level {
        match *level {
            Level::ERROR => MESHVPN_LOG_ERROR,
            Level::WARN => MESHVPN_LOG_WARN,
            Level::INFO => MESHVPN_LOG_INFO,
            Level::DEBUG => MESHVPN_LOG_DEBUG,
            Level::TRACE => MESHVPN_LOG_TRACE,
        }
    }
}

/// One log record, valid only during the callback.
#[repr(C)]
pub struct meshvpn_log_record {
    pub level: meshvpn_log_level,
    /// Where it comes from: a Rust module path such as
    /// `"meshvpn_engine::wg::engine"` or `"boringtun::noise"`.
    /// NUL-terminated.
    pub target: *const c_char,
    /// The message and its fields, NUL-terminated UTF-8.
    pub message: *const c_char,
}

/// Receives log records. Called on whatever thread logged, possibly many
/// at once.
pub type meshvpn_log_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, record: *const meshvpn_log_record)>;

type Sink = (
    unsafe extern "C" fn(*mut c_void, *const meshvpn_log_record),
    Userdata,
);

static SINK: RwLock<Option<Sink>> = RwLock::new(None);
static MAX_LEVEL: AtomicU32 = AtomicU32::new(MESHVPN_LOG_OFF as u32);
static INSTALLED: OnceLock<bool> = OnceLock::new();

struct Bridge;

const SECRET_FIELD_HINTS: &[&str] = &["private", "secret", "preshared", "psk", "chaining"];

struct Format(String);

impl Format {
    fn add(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        if name == "message" {
            let _ = write!(self.0, "{value:?}");
            return;
        }
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let lower = name.to_ascii_lowercase();
        if SECRET_FIELD_HINTS.iter().any(|h| lower.contains(h)) {
            let _ = write!(self.0, "{name}=<redacted>");
        } else {
            let _ = write!(self.0, "{name}={value:?}");
        }
    }
}

impl Visit for Format {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.add(field, value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        // Strings print without Debug's quotes.
        self.add(field, &format_args!("{value}"));
    }
}

fn enabled_for(level: &Level) -> bool {
    meshvpn_log_level::of(level) as u32 <= MAX_LEVEL.load(Ordering::Relaxed)
}

impl Subscriber for Bridge {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // The level can change at any time: ask `enabled` every time.
        Interest::sometimes()
    }
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && enabled_for(metadata.level())
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        use tracing::level_filters::LevelFilter;
        Some(match MAX_LEVEL.load(Ordering::Relaxed) {
            0 => LevelFilter::OFF,
            1 => LevelFilter::ERROR,
            2 => LevelFilter::WARN,
            3 => LevelFilter::INFO,
            4 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Id::from_u64(NEXT.fetch_add(1, Ordering::Relaxed))
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        // No recursion: a callback that logs through us again is dropped.
        if callback::inside() == Some(Inside::Log) {
            return;
        }
        let Some((f, userdata)) = *SINK.read() else {
            return;
        };
        let meta = event.metadata();
        let mut text = Format(String::new());
        event.record(&mut text);
        let message = CString::new(text.0.replace('\0', "\\0")).unwrap_or_default();
        let target = CString::new(meta.target().replace('\0', "")).unwrap_or_default();
        let record = meshvpn_log_record {
            level: meshvpn_log_level::of(meta.level()),
            target: target.as_ptr(),
            message: message.as_ptr(),
        };
        let _guard = callback::Guard::enter(Inside::Log);
        // SAFETY: the caller registered `f` with `userdata` and promised
        // both stay valid until replaced; `record` and its strings live
        // until the call returns.
        unsafe { f(userdata.0, &record) };
    }
}

/// Sets the process-wide log callback, which receives every record at
/// `max_level` or more severe from all engines (and from boringtun), or
/// removes it when `callback` is NULL or `max_level` is
/// `MESHVPN_LOG_OFF`. Replaces any previous callback.
///
/// The callback may run on any thread, on several at once, and while the
/// library holds internal locks: it must be thread-safe and quick, and it
/// must not call functions that take a `meshvpn_engine` (they return
/// `MESHVPN_WOULD_DEADLOCK`). Records contain public keys but never
/// private, preshared or session keys. `userdata` must stay valid, and
/// usable from any thread, until the callback is replaced; a call already
/// under way when it is replaced may still finish with the old one.
///
/// `max_level` is a plain integer so that an unknown value is an error
/// (`MESHVPN_INVALID_ARGUMENT`), not undefined behaviour.
///
/// Errors: `MESHVPN_INVALID_ARGUMENT`, `MESHVPN_LOG_UNAVAILABLE` (another
/// `tracing` subscriber is the process's global default: only possible
/// when Rust code in the same process installed one).
///
/// Thread safety: safe to call from any thread at any time (but not from
/// inside the log callback: `MESHVPN_WOULD_DEADLOCK`).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_set_log_callback(
    callback: meshvpn_log_callback,
    userdata: *mut c_void,
    max_level: u32,
) -> meshvpn_result {
    ffi_boundary! {{
        callback::refuse_inside(&[Inside::Log], "meshvpn_set_log_callback")?;
        if max_level > MESHVPN_LOG_TRACE as u32 {
            return Err(Error::invalid(format!("max_level: {max_level} is not a meshvpn_log_level")));
        }
        let installed = *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(Bridge).is_ok());
        if !installed {
            return Err(Error::new(
                meshvpn_result::MESHVPN_LOG_UNAVAILABLE,
                "a tracing subscriber was already set as the global default",
            ));
        }
        let level = if callback.is_some() { max_level } else { MESHVPN_LOG_OFF as u32 };
        *SINK.write() = callback.map(|f| (f, Userdata(userdata)));
        MAX_LEVEL.store(level, Ordering::Relaxed);
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    }}
}
