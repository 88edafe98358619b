//! `meshvpn_node`: this program as a node of a mesh run by a control
//! server (`meshvpn control serve`, or one embedded elsewhere): the
//! library's `meshvpn_control::join::Node`, the same code `meshvpn up`
//! runs. The node has its own engine (reach it with `meshvpn_node_engine`)
//! and, in userspace mode, a netstack (`meshvpn_node_netstack`); the map
//! from the server becomes the engine's peers and packet filter.
//!
//! Status and events are JSON text, following the buffer protocol of
//! `meshvpn_result_message`. Events wait in a bounded queue (256; past it
//! the oldest is dropped and counted in the status' `events_dropped`), read
//! with `meshvpn_node_next_event`, or are pushed to a callback
//! (`meshvpn_node_set_event_callback`) from a thread of the node's own: a
//! slow callback only fills that queue, it never holds up the node's
//! control loop.

use std::ffi::{c_char, c_void, CString};
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use ::meshvpn_control::client::ClientError;
use ::meshvpn_control::join::{Event, JoinConfig, JoinError, Node, NodeStatus};
use ::meshvpn_control::proto::ErrorCode;
use ::meshvpn_engine::{IpPrefix, NetstackConfig, PrivateKey};
use zeroize::Zeroizing;

use crate::callback::{self, Inside, Userdata};
use crate::engine::meshvpn_engine;
use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::interrupter::{self, meshvpn_interrupter};
use crate::key::meshvpn_key;
use crate::netstack::meshvpn_netstack;
use crate::ptr::{self, Out};
use crate::timeout::{self, meshvpn_timeout_ms};

/// A node of a mesh. Opaque: created by `meshvpn_join`, released by
/// `meshvpn_node_free`. The value is a handle, not a pointer to memory.
pub struct meshvpn_node {
    _private: [u8; 0],
}

/// How to join. Strings are NUL-terminated and only read during the call;
/// lists are comma-separated. Zero-initialise it and fill what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct meshvpn_join_config {
    /// `wss://host:port/v1-meshvpn/control` (`ws://` on a test network).
    /// Required.
    pub control_url: *const c_char,
    /// The join key (`meshvpn control keys create`); NULL to rejoin a
    /// server that knows `private_key` already. Never logged.
    pub join_key: *const c_char,
    /// The node's WireGuard key, its identity to the server: keep it to
    /// rejoin as the same node (same addresses). NULL: a new one.
    pub private_key: *const meshvpn_key,
    /// The name to register with; NULL: "node".
    pub hostname: *const c_char,
    /// Routes this node carries (e.g. its pod CIDR): "10.42.1.0/24,...".
    pub advertise_routes: *const c_char,
    /// Tags to register with, each granted by the join key: "tag:k3s,...".
    pub tags: *const c_char,
    /// The CA (PEM text) of the control server's certificate; required for
    /// `wss://`.
    pub ca_pem: *const c_char,
    /// IP addresses to report as this node's UDP endpoints (with the
    /// engine's port): "192.0.2.7,...". NULL: none (peers use the address
    /// the server sees).
    pub endpoint_ips: *const c_char,
    /// The engine's UDP port; 0: any free one.
    pub listen_port: u16,
    /// Route the peers' approved routes (their pod CIDRs) through the mesh.
    pub accept_routes: bool,
    /// Attach a userspace stack (`meshvpn_node_netstack`) on the node's
    /// mesh addresses.
    pub userspace: bool,
}

/// Receives one node event: `event_json` is a NUL-terminated JSON object
/// (the same text `meshvpn_node_next_event` writes), `len` its length
/// without the NUL. Both are borrowed for the call only: copy what you keep.
///
/// Called on the node's event thread (one per node, started by the first
/// `meshvpn_node_set_event_callback`), one event at a time and in order.
/// It must return quickly (queue the text, signal a condition): while it
/// runs, further events wait in the node's bounded queue, and past 256 the
/// oldest are dropped (counted in the status' `events_dropped`). It must
/// not call `meshvpn_node_close` or `meshvpn_node_free` on any node (they
/// return `MESHVPN_WOULD_DEADLOCK`); every other function may be called,
/// including `meshvpn_node_set_event_callback` to replace or clear itself.
pub type meshvpn_node_event_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, event_json: *const c_char, len: usize)>;

type EventCallback = (
    unsafe extern "C" fn(*mut c_void, *const c_char, usize),
    Userdata,
);

/// How long the event thread waits for an event before it looks at its
/// state again; `close` and a cleared callback wake it sooner.
const EVENT_POLL: Duration = Duration::from_secs(1);

struct NodeHandle {
    node: Arc<Node>,
    push: Arc<Push>,
}

/// The push side of a node's events: the callback, and the thread that
/// takes events from the node's queue and calls it.
#[derive(Default)]
struct Push {
    state: Mutex<PushState>,
    changed: Condvar,
}

#[derive(Default)]
struct PushState {
    callback: Option<EventCallback>,
    /// A call of the callback is under way.
    running: bool,
    /// Set by close: the thread calls nothing more and ends.
    closing: bool,
    thread: Option<JoinHandle<()>>,
    /// The thread has started and not yet ended.
    alive: bool,
}

impl Push {
    /// Sets, replaces or clears (None) the callback; starts the event
    /// thread the first time one is set. Unless called from inside an event
    /// callback, returns only once no call of the old callback is running,
    /// so the caller may release what the old `userdata` points to.
    fn set(self: &Arc<Self>, node: &Arc<Node>, callback: Option<EventCallback>) -> Result<()> {
        let mut s = self.state.lock();
        if s.closing {
            return match callback {
                None => Ok(()),
                Some(_) => Err(Error::new(
                    meshvpn_result::MESHVPN_CLOSED,
                    "the node is closed",
                )),
            };
        }
        if callback.is_some() && !s.alive {
            let (push, node) = (self.clone(), node.clone());
            let t = std::thread::Builder::new()
                .name("meshvpn-node-events".into())
                .spawn(move || push.run(&node))
                .map_err(|e| Error::invalid(format!("no thread for the event callback: {e}")))?;
            s.thread = Some(t);
            s.alive = true;
        }
        s.callback = callback;
        self.changed.notify_all();
        // The event thread's own call (or another node's) must not wait for
        // itself; a call from there returns at once and the old callback's
        // running call ends when it returns.
        if callback::inside() != Some(Inside::Node) {
            while s.running {
                self.changed.wait(&mut s);
            }
        }
        Ok(())
    }

    /// The event thread: waits for a callback, then hands it each event.
    fn run(&self, node: &Node) {
        loop {
            {
                let mut s = self.state.lock();
                while s.callback.is_none() && !s.closing {
                    self.changed.wait(&mut s);
                }
                if s.closing {
                    break;
                }
            }
            let Some(event) = node.next_event(EVENT_POLL) else {
                continue;
            };
            let callback = {
                let mut s = self.state.lock();
                match s.callback {
                    Some(c) if !s.closing => {
                        s.running = true;
                        c
                    }
                    // Cleared (or closing) while the event was taken: it
                    // goes back in front, for polling.
                    _ => {
                        drop(s);
                        node.requeue_event(event);
                        continue;
                    }
                }
            };
            // Nothing unwinds out of here: a panic would end the thread
            // with `running` set and leave close waiting for ever. (The C
            // callback itself cannot unwind: an unwinding `extern "C"`
            // function aborts.)
            let _ = catch_unwind(AssertUnwindSafe(|| deliver(callback, &event)));
            self.state.lock().running = false;
            self.changed.notify_all();
        }
        let mut s = self.state.lock();
        s.alive = false;
        self.changed.notify_all();
    }

    /// Tells the event thread to call nothing more and end.
    fn stop(&self) {
        let mut s = self.state.lock();
        s.closing = true;
        s.callback = None;
        self.changed.notify_all();
    }

    /// Waits until the event thread has ended, so no callback runs once
    /// this returns. Never called on the event thread itself
    /// (`meshvpn_node_close` and `_free` refuse from inside a callback).
    fn wait_stopped(&self) {
        let mut s = self.state.lock();
        while s.alive {
            self.changed.wait(&mut s);
        }
        let thread = s.thread.take();
        drop(s);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn deliver((f, userdata): EventCallback, event: &Event) {
    // serde_json escapes a NUL inside a string, so the text has none.
    let text = CString::new(event_json(event)).unwrap_or_default();
    let _guard = callback::Guard::enter(Inside::Node);
    // SAFETY: the caller registered `f` with `userdata` and promised both
    // may be used from the node's event thread until replaced or the node
    // is closed (close and set wait for this call to return); `text` lives
    // across the call.
    unsafe { f(userdata.0, text.as_ptr(), text.as_bytes().len()) };
}

static NODES: HandleTable<meshvpn_node, NodeHandle> = HandleTable::new(tag::NODE);

impl Handled for NodeHandle {
    const NAME: &'static str = "meshvpn_node";
    /// Closing waits for a running event callback, so from inside one it
    /// would wait for itself.
    const FREE_REFUSED_INSIDE: &'static [Inside] = &[Inside::Log, Inside::Node];

    fn close(&self) {
        // In this order: the event thread learns it must stop before the
        // node's close wakes it out of its wait for an event (else it would
        // go back to waiting for one), and no callback runs after this.
        self.push.stop();
        self.node.close();
        self.push.wait_stopped();
    }
}

fn list<T>(text: Option<&str>, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>> {
    text.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).ok_or_else(|| Error::invalid(format!("{what}: `{s}` does not parse"))))
        .collect()
}

impl From<JoinError> for Error {
    fn from(e: JoinError) -> Error {
        use meshvpn_result::*;
        let code = match &e {
            JoinError::Refused(ClientError::Refused { code, .. }) => match code {
                ErrorCode::KeyMalformed | ErrorCode::KeyUnknown => MESHVPN_JOIN_KEY_INVALID,
                ErrorCode::KeyExpired => MESHVPN_JOIN_KEY_EXPIRED,
                ErrorCode::KeyRevoked => MESHVPN_JOIN_KEY_REVOKED,
                ErrorCode::KeyReused => MESHVPN_JOIN_KEY_REUSED,
                _ => MESHVPN_JOIN_REFUSED,
            },
            JoinError::Refused(_) => MESHVPN_JOIN_REFUSED,
            JoinError::TimedOut(..) => MESHVPN_TIMEOUT,
            JoinError::Setup(_) => MESHVPN_INVALID_ARGUMENT,
            JoinError::Interrupted => MESHVPN_INTERRUPTED,
        };
        Error::new(code, e.to_string())
    }
}

/// Joins the mesh: starts an engine, registers with the control server and
/// waits up to `timeout_ms` for the registration (the mesh addresses; the
/// netstack attached in userspace mode). The node then stays in the mesh
/// in the background: it applies every map change to its engine and
/// reconnects with backoff when the server goes away (the data plane keeps
/// running meanwhile).
///
/// On success `*out_node` receives a handle the caller owns and must
/// release with `meshvpn_node_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_ARGUMENT` (a list or
/// the CA does not parse, no UDP port), `MESHVPN_JOIN_KEY_INVALID`,
/// `MESHVPN_JOIN_KEY_EXPIRED`, `MESHVPN_JOIN_KEY_REVOKED`,
/// `MESHVPN_JOIN_KEY_REUSED`, `MESHVPN_JOIN_REFUSED` (each with the
/// server's reason as the message), `MESHVPN_TIMEOUT` (no registration in
/// time: the server unreachable; the message has the last error),
/// `MESHVPN_INTERRUPTED` (`interrupter` was interrupted: the node was
/// closed, nothing is left running), `MESHVPN_INVALID_HANDLE` (a dead
/// `interrupter`).
///
/// `interrupter` (may be NULL) cancels the join from another thread:
/// `meshvpn_interrupter_interrupt` makes it return `MESHVPN_INTERRUPTED`
/// within about 20 ms (Go's `Join` does this when its ctx is cancelled).
///
/// Thread safety: safe from any thread; blocks up to `timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_join(
    config: *const meshvpn_join_config,
    timeout_ms: meshvpn_timeout_ms,
    interrupter: *const meshvpn_interrupter,
    out_node: *mut *mut meshvpn_node,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_node, "out_node")?;
        let interrupter = interrupter::lookup_optional(interrupter)?;
        // SAFETY: the caller's promise: a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
        let url = unsafe { ptr::try_str(c.control_url, "control_url") }?;
        let mut jc = JoinConfig::new(url);
        // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
        jc.join_key = unsafe { ptr::try_opt_str(c.join_key, "join_key") }?
            .map(|k| Zeroizing::new(k.trim().to_owned()));
        // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
        if let Some(h) = unsafe { ptr::try_opt_str(c.hostname, "hostname") }? {
            jc.hostname = h.to_owned();
        }
        jc.advertise_routes = list(
            // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
            unsafe { ptr::try_opt_str(c.advertise_routes, "advertise_routes") }?,
            "advertise_routes",
            |s| s.parse::<IpPrefix>().ok(),
        )?;
        // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
        jc.tags = list(unsafe { ptr::try_opt_str(c.tags, "tags") }?, "tags", |s| {
            Some(s.to_owned())
        })?;
        let endpoint_ips = list(
            // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
            unsafe { ptr::try_opt_str(c.endpoint_ips, "endpoint_ips") }?,
            "endpoint_ips",
            |s| s.parse::<IpAddr>().ok(),
        )?;
        // SAFETY: NULL or a NUL-terminated string, per the struct's contract.
        if let Some(pem) = unsafe { ptr::try_opt_str(c.ca_pem, "ca_pem") }? {
            jc.tls = Some(
                ::meshvpn_engine::ws::tls::client_config(pem.as_bytes(), None)
                    .map_err(|e| Error::invalid(format!("ca_pem: {e}")))?,
            );
        } else if url.starts_with("wss://") {
            return Err(Error::invalid("ca_pem is required for a wss:// control server"));
        }
        jc.accept_routes = c.accept_routes;
        jc.netstack = c.userspace.then(NetstackConfig::default);
        // SAFETY: NULL or a valid key, per the struct's contract.
        let key = match unsafe { c.private_key.as_ref() } {
            Some(k) => k.private(),
            None => PrivateKey::generate(),
        };
        let limit = timeout::limit(timeout_ms).unwrap_or(Duration::MAX);
        let cancelled = interrupter.poll();
        let node = Node::join_until(jc, key, c.listen_port, endpoint_ips, limit, &cancelled)?;
        out.write(NODES.insert(Arc::new(NodeHandle {
            node: Arc::new(node),
            push: Arc::default(),
        }))?);
        Ok(())
    }}
}

fn status_json(s: &NodeStatus) -> String {
    let node = s.node.as_ref().map(|n| {
        serde_json::json!({
            "id": n.node_id, "name": n.name, "ipv4": n.ipv4.to_string(),
            "ipv6": n.ipv6.to_string(), "tags": n.tags,
        })
    });
    let routes: Vec<_> = s
        .routes
        .iter()
        .map(|r| {
            serde_json::json!({"prefix": r.prefix, "approved": r.approved,
                "status": r.status, "role": r.role, "reason": r.reason})
        })
        .collect();
    let peers: Vec<_> = s
        .peers
        .iter()
        .map(|p| {
            let st = p.stats.as_ref();
            serde_json::json!({
                "id": p.planned.node_id,
                "name": p.planned.name,
                "public_key": p.planned.public_key.to_base64(),
                "allowed_ips": p.planned.allowed_ips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "endpoint": st.and_then(|s| s.endpoint).map(|e| e.to_string()),
                "path": st.map(|s| s.path.name()),
                "tx_bytes": st.map_or(0, |s| s.tx_bytes),
                "rx_bytes": st.map_or(0, |s| s.rx_bytes),
            })
        })
        .collect();
    serde_json::json!({
        "control_url": s.control_url,
        "node": node,
        "connected": s.connected,
        "sessions": s.sessions,
        "map_updates": s.map_updates,
        "last_error": s.last_error,
        "stopped": s.fatal.as_ref().map(|e| e.to_string()),
        "policy_version": s.policy_version,
        "filter_rules": s.filter_rules.map(|(i, o)| i + o),
        "routes": routes,
        "peers": peers,
        "listen_port": s.listen_port,
        "events_dropped": s.events_dropped,
    })
    .to_string()
}

fn event_json(e: &Event) -> String {
    use serde_json::json;
    match e {
        Event::Joined(n) => json!({"type": "joined", "id": n.node_id, "name": n.name,
            "ipv4": n.ipv4.to_string(), "ipv6": n.ipv6.to_string()}),
        Event::MapApplied {
            peers,
            policy_version,
        } => json!({"type": "map_applied", "peers": peers, "policy_version": policy_version}),
        Event::PolicyChanged { version } => json!({"type": "policy_changed", "version": version}),
        Event::Route {
            prefix,
            status,
            reason,
        } => json!({"type": "route", "prefix": prefix, "status": status, "reason": reason}),
        Event::Disconnected { error } => json!({"type": "disconnected", "error": error}),
        Event::Reconnected => json!({"type": "reconnected"}),
        Event::Stopped { code, message } => json!({"type": "stopped",
            "code": code.map(|c| serde_json::to_value(c).unwrap_or_default()),
            "message": message}),
    }
    .to_string()
}

/// Writes the node's status as one JSON object (`node`: id, name, ipv4,
/// ipv6, tags; `connected`, `sessions`, `policy_version`, `filter_rules`,
/// `routes` with `status`, `role` (`primary` or `standby` when approved)
/// and a refusal's `reason`, `peers` with their
/// path and bytes, `stopped`: why the node left, or null), following the
/// buffer protocol of `meshvpn_result_message`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_BUFFER_TOO_SMALL` (`*out_len` holds the size needed).
///
/// Thread safety: safe from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_status(
    node: *const meshvpn_node,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let n = NODES.lookup(node)?;
        // SAFETY: the caller's promise: NULL or buf_len writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &status_json(&n.node.status())) }
    }}
}

/// Waits up to `timeout_ms` for the node's next event and writes it as one
/// JSON object with a `type`: `joined`, `map_applied` (`peers`,
/// `policy_version`), `policy_changed` (`version`), `route` (`prefix`,
/// `status`: approved/pending/refused, `reason`), `disconnected`
/// (`error`), `reconnected`, `stopped` (`code`, `message`: the node left
/// the mesh). Buffer protocol of `meshvpn_result_message`; after a size
/// query (`buf` NULL, `buf_len` 0) or into a buffer too small, the event
/// stays queued for the next call.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_TIMEOUT` (none in time), `MESHVPN_CLOSED` (the node was
/// closed and no event is left), `MESHVPN_BUFFER_TOO_SMALL`.
///
/// Thread safety: safe from any thread; blocks up to `timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_next_event(
    node: *const meshvpn_node,
    timeout_ms: meshvpn_timeout_ms,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let n = NODES.lookup(node)?;
        let limit = timeout::limit(timeout_ms).unwrap_or(Duration::MAX);
        let Some(e) = n.node.next_event(limit) else {
            if n.node.stopped() {
                return Err(Error::new(meshvpn_result::MESHVPN_CLOSED, "the node is closed"));
            }
            return Err(Error::new(meshvpn_result::MESHVPN_TIMEOUT, "no event"));
        };
        let text = event_json(&e);
        // SAFETY: the caller's promise: NULL or buf_len writable bytes.
        let r = unsafe { ptr::write_text(buf, buf_len, out_len, &text) };
        // A size query (NULL, 0) or a short buffer leaves it queued.
        if r.is_err() || buf.is_null() {
            n.node.requeue_event(e);
        }
        r
    }}
}

/// Pushes the node's events to `callback` (see
/// `meshvpn_node_event_callback` for the thread it runs on and what it may
/// do) with `userdata`, replacing any previous callback; NULL clears it.
///
/// While a callback is set it receives every event, including those queued
/// before it was set, and the polling queue stays empty: do not also call
/// `meshvpn_node_next_event` then (the two would share the events). Once it
/// is cleared, events queue again for `meshvpn_node_next_event`.
///
/// When this returns, no call of the previous callback is running and none
/// will start (unless it was called from inside an event callback, where it
/// returns at once: that callback's own call ends when it returns), so the
/// previous `userdata` may be released. `userdata` must stay valid, and
/// usable from the node's event thread, until the callback is replaced or
/// cleared or the node is closed.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_CLOSED` (setting one on a
/// closed node; clearing is always fine).
///
/// Thread safety: safe from any thread at any time, while events flow,
/// and from inside the callback itself.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_set_event_callback(
    node: *mut meshvpn_node,
    callback: meshvpn_node_event_callback,
    userdata: *mut c_void,
) -> meshvpn_result {
    ffi_boundary! {{
        let n = NODES.lookup(node)?;
        n.push.set(&n.node, callback.map(|f| (f, Userdata(userdata))))
    }}
}

/// A new handle on the node's engine (peers, stats, the packet API),
/// which the caller owns and releases with `meshvpn_engine_free`.
/// Stopping or freeing it closes the node's engine (the data plane) as
/// with any engine handle: free it when done with the node, before or
/// after `meshvpn_node_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_engine(
    node: *const meshvpn_node,
    out_engine: *mut *mut meshvpn_engine,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_engine, "out_engine")?;
        let n = NODES.lookup(node)?;
        crate::engine::insert_running(n.node.engine().clone(), out)
    }}
}

/// A new handle on the node's userspace stack (dial, listen, ping over the
/// mesh), which the caller owns and releases with `meshvpn_netstack_free`
/// (that ends the stack for the node too).
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_NO_ADDRESS` (the node was not joined with `userspace`).
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_netstack(
    node: *const meshvpn_node,
    out_netstack: *mut *mut meshvpn_netstack,
) -> meshvpn_result {
    ffi_boundary! {{
        let out = Out::new(out_netstack, "out_netstack")?;
        let n = NODES.lookup(node)?;
        let stack = n.node.netstack().ok_or_else(|| {
            Error::new(
                meshvpn_result::MESHVPN_NO_ADDRESS,
                "the node has no netstack: join with userspace set",
            )
        })?;
        crate::netstack::insert_attached(stack, out)
    }}
}

/// Leaves the mesh: ends the control session, the netstack and the engine,
/// and wakes a blocked `meshvpn_node_next_event`. Waits for a running
/// event callback to return; none is called afterwards (events not yet
/// delivered stay readable with `meshvpn_node_next_event`). The handle
/// stays valid until `meshvpn_node_free`. Idempotent.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (called from
/// inside a node's event callback).
///
/// Thread safety: safe from any thread except inside an event callback.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_close(node: *mut meshvpn_node) -> meshvpn_result {
    ffi_boundary! {{
        callback::refuse_inside(&[Inside::Node], "meshvpn_node_close")?;
        NODES.close(node)
    }}
}

/// Closes the node (as `meshvpn_node_close`, waiting for a running event
/// callback) and releases its handle.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_WOULD_DEADLOCK` (called from
/// inside a node's event callback; nothing is freed then).
///
/// Thread safety: safe from any thread except inside an event callback.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_node_free(node: *mut meshvpn_node) -> meshvpn_result {
    ffi_boundary! {{
        NODES.free(node)
    }}
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::time::{SystemTime, UNIX_EPOCH};

    use ::meshvpn_control::keys::{self, KeyOptions};
    use ::meshvpn_control::proto::CONTROL_PATH;
    use ::meshvpn_control::server::{ControlServer, ControlServerConfig};
    use ::meshvpn_control::store::{SqliteStore, StoreConfig};
    use ::meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer};

    use super::*;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn text(f: impl Fn(*mut c_char, usize, *mut usize) -> meshvpn_result) -> String {
        let mut buf = vec![0u8; 8192];
        let mut len = 0usize;
        assert_eq!(
            f(buf.as_mut_ptr().cast(), buf.len(), &mut len),
            meshvpn_result::MESHVPN_OK,
            "{}",
            crate::error::last_error_for_tests()
        );
        String::from_utf8(buf[..len].to_vec()).unwrap()
    }

    /// A join config for `url` and `key`, nothing else set.
    fn join_config(url: &CString, key: &CString, userspace: bool) -> meshvpn_join_config {
        meshvpn_join_config {
            control_url: url.as_ptr(),
            join_key: key.as_ptr(),
            private_key: std::ptr::null(),
            hostname: std::ptr::null(),
            advertise_routes: std::ptr::null(),
            tags: std::ptr::null(),
            ca_pem: std::ptr::null(),
            endpoint_ips: std::ptr::null(),
            listen_port: 0,
            accept_routes: false,
            userspace,
        }
    }

    /// A control server on a tunnel server's port, with a reusable key.
    struct Mesh {
        dir: std::path::PathBuf,
        store: Arc<SqliteStore>,
        url: CString,
        key: CString,
        tunnel: Option<TunnelServer>,
        control: Option<ControlServer>,
    }

    impl Mesh {
        fn start(name: &str) -> Mesh {
            let dir =
                std::env::temp_dir().join(format!("meshvpn-ffi-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let db = dir.join("control.db");
            let store = Arc::new(SqliteStore::open(&db, &StoreConfig::default()).unwrap());
            let control =
                ControlServer::start(store.clone(), ControlServerConfig::default()).unwrap();
            let mut tc = ServerConfig::new("/v1-k3s/connect", None, ServerAuth::default());
            tc.extra.push(control.route());
            let tunnel = TunnelServer::bind("127.0.0.1:0".parse().unwrap(), tc).unwrap();
            let url = CString::new(format!("ws://{}{CONTROL_PATH}", tunnel.local_addr())).unwrap();
            let reusable = KeyOptions {
                reusable: true,
                ..Default::default()
            };
            let rng = ring::rand::SystemRandom::new();
            let key = keys::create(&*store, &reusable, now(), &rng).unwrap();
            let key = CString::new(key.text.as_str()).unwrap();
            Mesh {
                dir,
                store,
                url,
                key,
                tunnel: Some(tunnel),
                control: Some(control),
            }
        }
    }

    impl Drop for Mesh {
        fn drop(&mut self) {
            drop(self.tunnel.take());
            drop(self.control.take());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Two userspace nodes through the C functions: a good key joins (the
    /// status names the node and its peer, the netstack handle dials the
    /// other node), an expired key gets its own code, and a node's events
    /// arrive as JSON.
    #[test]
    fn join_status_events_and_a_refused_key_through_the_c_abi() {
        let mesh = Mesh::start("join");
        let (store, url, good) = (&mesh.store, &mesh.url, &mesh.key);
        let rng = ring::rand::SystemRandom::new();
        let expired = CString::new(
            keys::create(
                &**store,
                &KeyOptions {
                    expiry: Some(Duration::from_secs(60)),
                    ..Default::default()
                },
                now() - 3600,
                &rng,
            )
            .unwrap()
            .text
            .as_str(),
        )
        .unwrap();
        let lo = CString::new("127.0.0.1").unwrap();
        let config = |key: &CString| meshvpn_join_config {
            endpoint_ips: lo.as_ptr(),
            ..join_config(url, key, true)
        };
        let join = |key: &CString| {
            let mut node = std::ptr::null_mut();
            // SAFETY: a valid config whose strings outlive the call.
            let r = unsafe { meshvpn_join(&config(key), 15_000, std::ptr::null(), &mut node) };
            (r, node)
        };

        let (r, _) = join(&expired);
        assert_eq!(r, meshvpn_result::MESHVPN_JOIN_KEY_EXPIRED);
        let msg = crate::error::last_error_for_tests();
        assert!(msg.contains("expired"), "{msg}");

        let (r, a) = join(good);
        assert_eq!(
            r,
            meshvpn_result::MESHVPN_OK,
            "{}",
            crate::error::last_error_for_tests()
        );
        let (r, b) = join(good);
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        // SAFETY: a valid node handle and a buffer of the length given.
        let joined = text(|p, n, l| unsafe { meshvpn_node_next_event(a, 5000, p, n, l) });
        assert!(joined.contains(r#""type":"joined""#), "{joined}");
        let b_status: serde_json::Value =
            // SAFETY: a valid node handle and a buffer of the length given.
            serde_json::from_str(&text(|p, n, l| unsafe { meshvpn_node_status(b, p, n, l) }))
                .unwrap();
        let b_ip: IpAddr = b_status["node"]["ipv4"].as_str().unwrap().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            // SAFETY: a valid node handle and a buffer of the length given.
            let s = text(|p, n, l| unsafe { meshvpn_node_status(a, p, n, l) });
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            if v["peers"].as_array().is_some_and(|p| p.len() == 1) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "a never got b: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }

        let mut bs = std::ptr::null_mut();
        let mut as_ = std::ptr::null_mut();
        // SAFETY: valid handles and out pointers.
        unsafe {
            assert_eq!(
                meshvpn_node_netstack(b, &mut bs),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(
                meshvpn_node_netstack(a, &mut as_),
                meshvpn_result::MESHVPN_OK
            );
        }
        let b_stack = crate::netstack::lookup(bs).unwrap().stack.clone();
        let a_stack = crate::netstack::lookup(as_).unwrap().stack.clone();
        let l = b_stack
            .tcp_listen(std::net::SocketAddr::new(b_ip, 7000), 4)
            .unwrap();
        let conn = a_stack
            .tcp_connect(
                std::net::SocketAddr::new(b_ip, 7000),
                Some(Duration::from_secs(15)),
            )
            .expect("a dials b over the mesh");
        let (_, from) = l.accept_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(from.ip(), a_stack.addresses()[0]);
        drop(conn);

        let mut engine = std::ptr::null_mut();
        // SAFETY: valid handles and out pointers.
        unsafe {
            assert_eq!(
                meshvpn_node_engine(a, &mut engine),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(
                crate::engine::meshvpn_engine_free(engine),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(
                crate::netstack::meshvpn_netstack_free(as_),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(
                crate::netstack::meshvpn_netstack_free(bs),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(meshvpn_node_free(a), meshvpn_result::MESHVPN_OK);
            assert_eq!(meshvpn_node_free(b), meshvpn_result::MESHVPN_OK);
            assert_eq!(meshvpn_node_free(a), meshvpn_result::MESHVPN_INVALID_HANDLE);
        }
        drop(mesh);
    }

    /// A join to a server that accepts and never answers ends when its
    /// interrupter is interrupted, long before its timeout.
    #[test]
    fn an_interrupter_ends_a_join_to_a_silent_server() {
        use crate::interrupter::{
            meshvpn_interrupter_free, meshvpn_interrupter_interrupt, meshvpn_interrupter_new,
        };
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = CString::new(format!(
            "ws://{}{CONTROL_PATH}",
            silent.local_addr().unwrap()
        ))
        .unwrap();
        let held = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept() {
                conns.push(c);
                if conns.len() > 16 {
                    break;
                }
            }
        });
        let key = CString::new("mvk-x").unwrap();
        let config = join_config(&url, &key, true);
        let mut token = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        let made = unsafe { meshvpn_interrupter_new(&mut token) };
        assert_eq!(made, meshvpn_result::MESHVPN_OK);
        let addr = token as usize;
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            meshvpn_interrupter_interrupt(addr as *mut meshvpn_interrupter)
        });
        let start = std::time::Instant::now();
        let mut node = std::ptr::null_mut();
        // SAFETY: a valid config whose strings outlive the call.
        let r = unsafe { meshvpn_join(&config, 20_000, token, &mut node) };
        let took = start.elapsed();
        assert_eq!(r, meshvpn_result::MESHVPN_INTERRUPTED);
        assert!(node.is_null());
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(waker.join().unwrap(), meshvpn_result::MESHVPN_OK);
        assert_eq!(meshvpn_interrupter_free(token), meshvpn_result::MESHVPN_OK);
        drop(held);
    }

    /// What an event callback saw; its `userdata`.
    #[derive(Default)]
    struct Seen {
        events: parking_lot::Mutex<Vec<String>>,
        arrived: parking_lot::Condvar,
        /// How long each call takes.
        delay: Duration,
        entered: std::sync::atomic::AtomicUsize,
        left: std::sync::atomic::AtomicUsize,
        /// When set: the node whose callback this is, for calls back into
        /// the library from inside it, and what they returned.
        node: std::sync::atomic::AtomicUsize,
        inside_rcs: parking_lot::Mutex<Vec<meshvpn_result>>,
    }

    impl Seen {
        /// Waits (bounded) for an event containing `needle`.
        fn wait_for(&self, needle: &str) -> String {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let mut events = self.events.lock();
            loop {
                if let Some(e) = events.iter().find(|e| e.contains(needle)) {
                    return e.clone();
                }
                let timed_out = self.arrived.wait_until(&mut events, deadline).timed_out();
                assert!(!timed_out, "no event with {needle}: {:?}", *events);
            }
        }
    }

    unsafe extern "C" fn record(userdata: *mut c_void, json: *const c_char, len: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        // SAFETY: the tests pass a `Seen` that outlives the callback.
        let seen = unsafe { &*userdata.cast::<Seen>() };
        seen.entered.fetch_add(1, SeqCst);
        // SAFETY: the library passes `len` bytes followed by a NUL.
        let text = unsafe { std::ffi::CStr::from_ptr(json) }
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(text.len(), len);
        std::thread::sleep(seen.delay);
        let node = seen.node.load(SeqCst) as *mut meshvpn_node;
        if !node.is_null() {
            // SAFETY: a live node handle.
            let rcs = unsafe {
                [
                    meshvpn_node_close(node),
                    meshvpn_node_free(node),
                    meshvpn_node_set_event_callback(node, None, std::ptr::null_mut()),
                ]
            };
            seen.inside_rcs.lock().extend(rcs);
        }
        seen.events.lock().push(text);
        seen.arrived.notify_all();
        seen.left.fetch_add(1, SeqCst);
    }

    fn userdata(seen: &Seen) -> *mut c_void {
        (seen as *const Seen).cast_mut().cast()
    }

    /// The event callback through the C functions: events queued before it
    /// was set and later ones arrive by callback (and not by polling);
    /// cleared, they queue for polling again; close and free are refused
    /// from inside it while clearing itself works; and `_close` waits for a
    /// running call, after which none runs, so `userdata` may be freed.
    #[test]
    fn an_event_callback_gets_the_events_until_cleared_and_close_waits_for_it() {
        use std::sync::atomic::Ordering::SeqCst;
        let mesh = Mesh::start("events");
        let join = || {
            let config = join_config(&mesh.url, &mesh.key, false);
            let mut node = std::ptr::null_mut();
            // SAFETY: a valid config whose strings outlive the call.
            let r = unsafe { meshvpn_join(&config, 15_000, std::ptr::null(), &mut node) };
            assert_eq!(
                r,
                meshvpn_result::MESHVPN_OK,
                "{}",
                crate::error::last_error_for_tests()
            );
            node
        };
        let poll = |node, ms| {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // SAFETY: a node handle and a buffer of the length given.
            let r = unsafe {
                meshvpn_node_next_event(node, ms, buf.as_mut_ptr().cast(), buf.len(), &mut len)
            };
            (r, String::from_utf8_lossy(&buf[..len]).into_owned())
        };

        let a = join();
        let seen = Seen::default();
        // SAFETY: a live node; `seen` outlives the callback (cleared below).
        let r = unsafe { meshvpn_node_set_event_callback(a, Some(record), userdata(&seen)) };
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        // Queued before the callback was set.
        seen.wait_for(r#""type":"joined""#);
        let b = join();
        // After it was set.
        seen.wait_for(r#""peers":1"#);

        // Cleared: the next change queues for polling, the callback sees nothing.
        // SAFETY: a live node.
        let r = unsafe { meshvpn_node_set_event_callback(a, None, std::ptr::null_mut()) };
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        let calls = seen.entered.load(SeqCst);
        assert_eq!(
            seen.left.load(SeqCst),
            calls,
            "a call still running after clear"
        );
        let c = join();
        let (r, polled) = poll(a, 10_000);
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        assert!(polled.contains(r#""type":"map_applied""#), "{polled}");
        assert_eq!(seen.entered.load(SeqCst), calls);

        // From inside: close and free refused, clearing itself works.
        let inside = Seen::default();
        inside.node.store(c as usize, SeqCst);
        // SAFETY: a live node; `inside` outlives the callback.
        let r = unsafe { meshvpn_node_set_event_callback(c, Some(record), userdata(&inside)) };
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        inside.wait_for(r#""type":"joined""#);
        assert_eq!(
            *inside.inside_rcs.lock(),
            [
                meshvpn_result::MESHVPN_WOULD_DEADLOCK,
                meshvpn_result::MESHVPN_WOULD_DEADLOCK,
                meshvpn_result::MESHVPN_OK
            ]
        );
        assert_eq!(
            inside.entered.load(SeqCst),
            1,
            "cleared from inside its first call"
        );

        // A slow call under way when b is closed: close waits for it.
        let slow = Box::new(Seen {
            delay: Duration::from_millis(300),
            ..Default::default()
        });
        // SAFETY: a live node; `slow` lives until the node is freed.
        let r = unsafe { meshvpn_node_set_event_callback(b, Some(record), userdata(&slow)) };
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while slow.entered.load(SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the slow callback never ran"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: a live node.
        assert_eq!(unsafe { meshvpn_node_close(b) }, meshvpn_result::MESHVPN_OK);
        let (entered, left) = (slow.entered.load(SeqCst), slow.left.load(SeqCst));
        assert_eq!(entered, left, "close returned while the callback ran");
        // Closed: setting is refused, clearing is fine.
        // SAFETY: a live (closed) node.
        unsafe {
            assert_eq!(
                meshvpn_node_set_event_callback(b, Some(record), userdata(&slow)),
                meshvpn_result::MESHVPN_CLOSED
            );
            assert_eq!(
                meshvpn_node_set_event_callback(b, None, std::ptr::null_mut()),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(meshvpn_node_free(b), meshvpn_result::MESHVPN_OK);
        }
        drop(slow);

        // Freed while a callback is set and events may flow.
        let late = Seen::default();
        // SAFETY: live nodes; `late` outlives them.
        unsafe {
            assert_eq!(
                meshvpn_node_set_event_callback(a, Some(record), userdata(&late)),
                meshvpn_result::MESHVPN_OK
            );
            assert_eq!(meshvpn_node_free(c), meshvpn_result::MESHVPN_OK);
            assert_eq!(meshvpn_node_free(a), meshvpn_result::MESHVPN_OK);
        }
        let after = late.entered.load(SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(late.entered.load(SeqCst), after, "called after free");
        assert_eq!(late.left.load(SeqCst), after);
        drop(mesh);
    }

    /// A connected UDP socket through the C functions, between two
    /// userspace nodes over loopback: it echoes with b, names its remote,
    /// and once the policy refuses the port, a's engine answers the
    /// datagram with an ICMP admin-prohibited that fails the socket's next
    /// receive with `MESHVPN_CONNECTION_REFUSED` (long before its timeout);
    /// an unconnected socket's send and receive get `MESHVPN_NOT_CONNECTED`.
    #[test]
    fn a_connected_udp_socket_echoes_and_reports_a_refusal_through_the_c_abi() {
        use crate::netstack::meshvpn_netstack_free;
        use crate::udp::*;
        let mesh = Mesh::start("udpconnect");
        let lo = CString::new("127.0.0.1").unwrap();
        let join = || {
            let config = meshvpn_join_config {
                endpoint_ips: lo.as_ptr(),
                ..join_config(&mesh.url, &mesh.key, true)
            };
            let mut node = std::ptr::null_mut();
            // SAFETY: a valid config whose strings outlive the call.
            let r = unsafe { meshvpn_join(&config, 15_000, std::ptr::null(), &mut node) };
            assert_eq!(
                r,
                meshvpn_result::MESHVPN_OK,
                "{}",
                crate::error::last_error_for_tests()
            );
            node
        };
        let status = |node| -> serde_json::Value {
            // SAFETY: a valid node handle and a buffer of the length given.
            serde_json::from_str(&text(|p, n, l| unsafe {
                meshvpn_node_status(node, p, n, l)
            }))
            .unwrap()
        };
        let (a, b) = (join(), join());
        let b_ip: IpAddr = status(b)["node"]["ipv4"].as_str().unwrap().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while status(a)["peers"].as_array().is_none_or(|p| p.is_empty()) {
            assert!(
                std::time::Instant::now() < deadline,
                "a never got b as a peer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // b echoes on 8080 and 9090.
        let b_stack = NODES.lookup(b).unwrap().node.netstack().unwrap();
        let servers: Vec<_> = [8080u16, 9090]
            .into_iter()
            .map(|port| {
                let s = Arc::new(
                    b_stack
                        .udp_bind(std::net::SocketAddr::new(b_ip, port))
                        .unwrap(),
                );
                let echo = s.clone();
                let t = std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = echo.recv_from_timeout(&mut buf, None) {
                        let _ = echo.send_to(&buf[..n], from);
                    }
                });
                (s, t)
            })
            .collect();

        let mut ns = std::ptr::null_mut();
        // SAFETY: a live node and an out pointer.
        let r = unsafe { meshvpn_node_netstack(a, &mut ns) };
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        let any = CString::new("0.0.0.0:0").unwrap();
        let mut udp = std::ptr::null_mut();
        // SAFETY: live handles, a NUL-terminated address, an out pointer.
        let r = unsafe { meshvpn_udp_bind(ns, any.as_ptr(), &mut udp) };
        assert_eq!(r, meshvpn_result::MESHVPN_OK);
        let mut buf = [0u8; 64];
        let mut n = 0usize;
        // Not connected yet.
        // SAFETY: a live socket and buffers of the lengths given.
        unsafe {
            assert_eq!(
                meshvpn_udp_send(udp, b"x".as_ptr(), 1),
                meshvpn_result::MESHVPN_NOT_CONNECTED
            );
            assert_eq!(
                meshvpn_udp_recv(udp, buf.as_mut_ptr(), buf.len(), 0, &mut n),
                meshvpn_result::MESHVPN_NOT_CONNECTED
            );
            assert_eq!(
                meshvpn_udp_peer_addr(udp, std::ptr::null_mut(), 0, &mut n),
                meshvpn_result::MESHVPN_NOT_CONNECTED
            );
        }
        let connect = |port: u16| {
            let to = CString::new(format!("{b_ip}:{port}")).unwrap();
            // SAFETY: a live socket and a NUL-terminated address.
            let r = unsafe { meshvpn_udp_connect(udp, to.as_ptr()) };
            assert_eq!(
                r,
                meshvpn_result::MESHVPN_OK,
                "{}",
                crate::error::last_error_for_tests()
            );
        };
        // One datagram out and its answer back, or the error on the way.
        let exchange = |timeout_ms: u32| {
            let mut buf = [0u8; 64];
            let mut n = 0usize;
            // SAFETY: a live socket and buffers of the lengths given.
            let r = unsafe { meshvpn_udp_send(udp, b"ping".as_ptr(), 4) };
            if r != meshvpn_result::MESHVPN_OK {
                return (r, Vec::new());
            }
            // SAFETY: as above.
            let r =
                unsafe { meshvpn_udp_recv(udp, buf.as_mut_ptr(), buf.len(), timeout_ms, &mut n) };
            (r, buf[..n].to_vec())
        };
        connect(9090);
        assert_eq!(
            // SAFETY: a live socket and a buffer of the length given.
            text(|p, l, o| unsafe { meshvpn_udp_peer_addr(udp, p, l, o) }),
            format!("{b_ip}:9090")
        );
        // The first datagrams may go before the handshake is done.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (r, got) = exchange(500);
            if r == meshvpn_result::MESHVPN_OK {
                assert_eq!(got, b"ping");
                break;
            }
            assert_eq!(r, meshvpn_result::MESHVPN_TIMEOUT);
            assert!(
                std::time::Instant::now() < deadline,
                "no echo over the mesh"
            );
        }

        // Only 8080 allowed: a's engine refuses the datagram to 9090 and
        // answers it, and the socket's receive fails at once.
        let cli = SqliteStore::open(&mesh.dir.join("control.db"), &StoreConfig::default()).unwrap();
        let (version, _) = ::meshvpn_control::admin::set_policy(
            &cli,
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:8080"]}]}"#,
            now(),
        )
        .unwrap();
        let want = format!(r#""policy_version":{version}"#);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !status(a).to_string().contains(&want) {
            assert!(
                std::time::Instant::now() < deadline,
                "a never applied the policy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = std::time::Instant::now();
        let (r, _) = exchange(2000);
        let took = t.elapsed();
        println!("refused datagram: {r:?} after {took:?}");
        assert_eq!(
            r,
            meshvpn_result::MESHVPN_CONNECTION_REFUSED,
            "after {took:?}"
        );
        assert!(
            took < Duration::from_millis(1000),
            "the refusal took {took:?}"
        );
        // Reported once; connected to the allowed port the socket echoes again.
        connect(8080);
        assert_eq!(
            exchange(5000),
            (meshvpn_result::MESHVPN_OK, b"ping".to_vec())
        );

        assert_eq!(meshvpn_udp_free(udp), meshvpn_result::MESHVPN_OK);
        assert_eq!(meshvpn_netstack_free(ns), meshvpn_result::MESHVPN_OK);
        for (s, t) in servers {
            s.close();
            t.join().unwrap();
        }
        // SAFETY: live nodes, each freed once.
        unsafe {
            assert_eq!(meshvpn_node_free(a), meshvpn_result::MESHVPN_OK);
            assert_eq!(meshvpn_node_free(b), meshvpn_result::MESHVPN_OK);
        }
        drop(mesh);
    }
}
