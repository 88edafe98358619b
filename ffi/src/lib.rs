//! The C ABI of libmeshvpn (see `include/meshvpn.h`, generated from this
//! crate by cbindgen).
//!
//! One module per C type, as in rustls-ffi:
//!
//! | module   | C names                                   |
//! |----------|-------------------------------------------|
//! | `error`  | `meshvpn_result`, the message functions     |
//! | `key`    | `meshvpn_key`, generation and conversion    |
//! | `config` | `meshvpn_config`, `meshvpn_peer_config`, `meshvpn_peer_update` |
//! | `engine` | `meshvpn_engine`: lifecycle, keys, peers, configuration |
//! | `stats`  | `meshvpn_stats`, `meshvpn_peer_stats`, `meshvpn_nat_stats` |
//! | `nat`    | `meshvpn_engine_nat_status`: NAT traversal state as JSON |
//! | `packet` | `meshvpn_packet`: batched send/receive, eventfd and callback wakeups |
//! | `log`    | `meshvpn_set_log_callback`                  |
//! | `uapi`   | `meshvpn_engine_uapi_get/set`: the WireGuard UAPI as calls |
//! | `netstack` | `meshvpn_netstack`: the userspace stack, options, ping |
//! | `conn`   | `meshvpn_conn`: TCP dial/read/write/shutdown/close |
//! | `listener` | `meshvpn_listener`: TCP listen/accept       |
//! | `udp`    | `meshvpn_udp`: UDP bind/send_to/recv_from   |
//! | `tunnel::agent` | `meshvpn_tunnel_agent`: the supervisor tunnel's agent and its counters |
//! | `tunnel::server` | `meshvpn_tunnel_server`: accepts agents (and relay clients), dials through them |
//! | `tunnel::stream` | `meshvpn_tunnel_stream`: one connection through a tunnel |
//! | `timeout` | `meshvpn_timeout_ms`, `MESHVPN_WAIT_FOREVER`: every blocking call's timeout |
//! | `control_server` | `meshvpn_control_server`: the mesh's control server, its own listener or a tunnel server's; join keys, nodes, routes, policy |
//! | `join`   | `meshvpn_node`, `meshvpn_join`: a node of a mesh run by a control server |
//! | `interrupter` | `meshvpn_interrupter`: cancels a call that has no handle of its own (ping) |
//!
//! Rules every exported function follows:
//!
//! - It returns a `meshvpn_result` (a handful of infallible getters such as
//!   `meshvpn_version` excepted), and its body runs inside a panic boundary
//!   (`panic::ffi_boundary`): a Rust panic becomes `MESHVPN_PANIC`, never an
//!   unwind into C.
//! - Outputs come last and are written only when it returns `MESHVPN_OK`.
//! - Handles are not pointers to memory but entries of a generational table
//!   (`handle`): a freed or stale handle is refused with
//!   `MESHVPN_INVALID_HANDLE` instead of touching freed memory.
//! - Raw pointers are turned into references only through the typed helpers
//!   in `ptr`, which check for NULL and impossible lengths.
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_camel_case_types)]
// Every exported function's doc comment is its C contract (which pointers
// may be NULL, how much memory they cover, how long they are read); the
// header carries it verbatim, so a Rust-only `# Safety` heading would say
// it twice.
#![allow(clippy::missing_safety_doc)]

#[macro_use]
mod panic;

mod callback;
pub mod config;
pub mod engine;
pub mod error;
mod handle;
pub mod key;
pub mod log;
pub mod nat;
pub mod packet;
#[cfg(test)]
mod parity;
mod ptr;
pub mod stats;
pub mod timeout;
// The UAPI and the userspace stack.
pub mod conn;
pub mod interrupter;
pub mod listener;
pub mod netstack;
pub mod uapi;
pub mod udp;
// The supervisor tunnel.
pub mod relay;
pub mod tunnel;
// The mesh's coordination.
pub mod control_server;
// A node of a mesh run by a control server.
pub mod join;

use std::ffi::c_char;

pub use error::meshvpn_result;

/// The library's major version. Changes when the ABI breaks.
pub const MESHVPN_VERSION_MAJOR: u32 = 0;
/// The library's minor version.
pub const MESHVPN_VERSION_MINOR: u32 = 1;
/// The library's patch version.
pub const MESHVPN_VERSION_PATCH: u32 = 0;
/// The version as a single number: `major * 10000 + minor * 100 + patch`,
/// for `#if MESHVPN_VERSION_NUMBER >= ...` checks.
pub const MESHVPN_VERSION_NUMBER: u32 =
    MESHVPN_VERSION_MAJOR * 10000 + MESHVPN_VERSION_MINOR * 100 + MESHVPN_VERSION_PATCH;

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The version of the library actually linked, as `"MAJOR.MINOR.PATCH"`.
///
/// Compare with the `MESHVPN_VERSION_*` macros of the header the program
/// was compiled against. The string is static: do not free it.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub extern "C" fn meshvpn_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// Panics inside the library, on purpose, and returns what the panic
/// boundary makes of it: always `MESHVPN_PANIC`.
///
/// For tests only: it proves that a panic is caught and turned into a
/// result code instead of unwinding into (and aborting) the host program.
/// The last error message of the calling thread becomes the panic message.
/// Nothing else changes; the library stays usable.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub extern "C" fn meshvpn_test_panic() -> meshvpn_result {
    ffi_boundary! {{
        panic!("meshvpn_test_panic: a panic forced by a test");
    }}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_macros_match_the_crate_version() {
        let expected =
            format!("{MESHVPN_VERSION_MAJOR}.{MESHVPN_VERSION_MINOR}.{MESHVPN_VERSION_PATCH}");
        assert_eq!(expected, env!("CARGO_PKG_VERSION"));
        // SAFETY: meshvpn_version returns a pointer to a static NUL-terminated string.
        let linked = unsafe { std::ffi::CStr::from_ptr(meshvpn_version()) };
        assert_eq!(linked.to_str().unwrap(), expected);
    }

    #[test]
    fn a_forced_panic_becomes_a_result_code() {
        assert_eq!(meshvpn_test_panic(), meshvpn_result::MESHVPN_PANIC);
        let msg = error::last_error_for_tests();
        assert!(msg.contains("forced by a test"), "{msg}");
        // The library still works afterwards.
        assert_eq!(meshvpn_test_panic(), meshvpn_result::MESHVPN_PANIC);
    }
}
