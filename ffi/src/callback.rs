//! What the library needs to call back into C safely: a `Send` wrapper for
//! the caller's `void *userdata`, and a per-thread record of "this thread
//! is inside a callback", which lets calls that would deadlock from there
//! fail with `MESHVPN_WOULD_DEADLOCK` instead.

use std::cell::Cell;
use std::ffi::c_void;

use crate::error::{meshvpn_result, Error, Result};

/// The caller's `void *userdata`, passed back untouched. Every function
/// that takes one documents that the callback runs on library threads, so
/// the caller promises that the pointer may be used from them.
#[derive(Clone, Copy)]
pub(crate) struct Userdata(pub *mut c_void);

// SAFETY: the library never dereferences the pointer; it only hands it
// back to the caller's callback, on threads the caller agreed to (see the
// doc comments of meshvpn_set_log_callback,
// meshvpn_engine_set_recv_callback and meshvpn_node_set_event_callback).
unsafe impl Send for Userdata {}
// SAFETY: as above; shared access only copies the pointer value.
unsafe impl Sync for Userdata {}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inside {
    /// The log callback: engine locks may be held, so no engine call is safe.
    Log,
    /// An engine's receive callback, on that engine's receive thread:
    /// stopping or freeing the engine would join the calling thread.
    Recv,
    /// A tunnel agent's event or allow callback, on the agent's thread:
    /// stopping or freeing the agent would join the calling thread.
    Tunnel,
    /// A node's event callback, on the node's event thread: closing or
    /// freeing a node waits for a running callback to return.
    Node,
}

thread_local! {
    static INSIDE: Cell<Option<Inside>> = const { Cell::new(None) };
}

/// Marks the current thread as inside a callback until dropped.
pub(crate) struct Guard(Option<Inside>);

impl Guard {
    pub fn enter(kind: Inside) -> Guard {
        Guard(INSIDE.replace(Some(kind)))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        INSIDE.set(self.0);
    }
}

pub(crate) fn inside() -> Option<Inside> {
    INSIDE.get()
}

/// Refuses the call if the thread is inside one of the `kinds` of callback.
pub(crate) fn refuse_inside(kinds: &[Inside], what: &str) -> Result<()> {
    match inside() {
        Some(k) if kinds.contains(&k) => Err(Error::new(
            meshvpn_result::MESHVPN_WOULD_DEADLOCK,
            format!("{what} called from inside a libmeshvpn callback"),
        )),
        _ => Ok(()),
    }
}
