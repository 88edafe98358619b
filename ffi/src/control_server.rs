//! `meshvpn_control_server`: the mesh's control server (join keys, nodes,
//! routes, policy; see docs/control.md), embeddable in a host program such
//! as a k3s server.
//!
//! ```text
//!   new(config) ──┬─ attach(tunnel_server) ─ tunnel_server_start: one port serves
//!                 │                           the k3s tunnel, the relay and /v1-meshvpn/control
//!                 └─ config.listen: its own HTTPS listener
//!   admin: create_key (text shown once) / keys / revoke_key, nodes / remove_node,
//!          routes / approve_route, set_policy / get_policy
//!   close / free
//! ```
//!
//! Every change goes through `meshvpn_control::admin` or the store, as
//! `meshvpn control` does, then wakes the server so connected nodes get it
//! at once rather than at the next store poll. Listings are JSON (the
//! buffer protocol of `meshvpn_result_message`). A join key's text is
//! written once, to the caller's buffer, and wiped from the library's
//! memory; it is never logged.

use std::ffi::c_char;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::meshvpn_control::admin::{self, AdminError};
use ::meshvpn_control::keys::{self, CreateError, KeyOptions};
use ::meshvpn_control::routes::{cluster_name, Approver, RouteStatus};
use ::meshvpn_control::server::{ControlServer, ControlServerConfig};
use ::meshvpn_control::store::{SqliteStore, Store, StoreConfig, StoreError};
use ::meshvpn_control::{Policy, RouteError};
use ::meshvpn_engine::supervisor::{ServerAuth, ServerConfig, TunnelServer, K3S_PATH};
use ::meshvpn_engine::ws::tls;
use ::meshvpn_engine::IpPrefix;
use parking_lot::Mutex;
use serde_json::json;

use crate::error::{meshvpn_result, Error, Result};
use crate::handle::{tag, HandleTable, Handled};
use crate::ptr::{self, Out};
use crate::tunnel::server::meshvpn_tunnel_server;
use crate::tunnel::tls_error;

use meshvpn_result::*;

/// A control server. Opaque: created by `meshvpn_control_server_new`,
/// released by `meshvpn_control_server_free`. A handle, never dereferenced.
pub struct meshvpn_control_server {
    _private: [u8; 0],
}

/// The bytes a buffer for `meshvpn_control_server_create_key` needs: the
/// key's text (`mvpn-key-<16 hex>-<64 hex>`) and its NUL.
pub const MESHVPN_JOIN_KEY_LEN: usize = 91;

/// How a control server keeps its state and whom it serves. Strings are
/// NUL-terminated and only read during `meshvpn_control_server_new`.
#[repr(C)]
pub struct meshvpn_control_server_config {
    /// The database file (SQLite), created 0600 when missing. Required.
    /// Several processes may open it at once (`meshvpn control ... --db`).
    pub db_path: *const c_char,
    /// The prefix new nodes get their IPv4 address from; NULL means
    /// `100.64.0.0/10`. Registered nodes keep theirs when it changes.
    pub ipv4_prefix: *const c_char,
    /// A policy (JSON, see docs/control.md) to set at creation when it
    /// differs from the stored one; NULL keeps the stored policy (none:
    /// allow-all). An invalid one fails the call, naming its line.
    pub policy: *const c_char,
    /// A file to read that policy from instead; at most one of `policy`
    /// and `policy_file`.
    pub policy_file: *const c_char,
    /// Milliseconds an ephemeral node stays after it disconnects; 0 means
    /// 30 minutes (headscale's default).
    pub ephemeral_timeout_ms: u32,
    /// Control sessions at once (one per node, each a thread and three
    /// open files); 0 means 4096. More are answered 503.
    pub max_sessions: u32,
    /// Control sessions at once from one source address; 0 means 64.
    pub max_sessions_per_source: u32,
    /// The relay nodes may use (`wss://HOST:PORT/v1-meshvpn/relay`), sent
    /// in every network map; NULL: none.
    pub relay_url: *const c_char,
    /// `"ADDRESS:PORT"` for a listener of its own (HTTPS, started by `new`,
    /// port 0 picks a free one; see `meshvpn_control_server_local_addr`);
    /// NULL: none, serve it through `meshvpn_control_server_attach`.
    pub listen: *const c_char,
    /// PEM: that listener's certificate chain and key; required with
    /// `listen`, ignored without.
    pub cert_pem: *const c_char,
    pub key_pem: *const c_char,
    /// That listener also serves the WireGuard relay (`/v1-meshvpn/relay`).
    pub relay: bool,
}

/// What `meshvpn_control_server_create_key` makes. Strings are
/// NUL-terminated and only read during the call.
#[repr(C)]
pub struct meshvpn_join_key_options {
    /// Usable by any number of nodes; otherwise single-use.
    pub reusable: bool,
    /// Nodes that join with it are removed after the ephemeral timeout
    /// once they disconnect.
    pub ephemeral: bool,
    /// Seconds it works for; 0: it never expires. At most 10 years.
    pub expiry_seconds: u64,
    /// Comma-separated tags for the nodes that join with it
    /// (`"tag:k3s,tag:east"`); NULL or empty: none.
    pub tags: *const c_char,
    /// The cluster of the nodes that join with it (`"k3s-east"`): routes of
    /// different clusters must not overlap. NULL: the unlabelled cluster.
    pub cluster: *const c_char,
}

struct Running {
    store: Arc<SqliteStore>,
    control: ControlServer,
    /// Its own listener, with `config.listen`.
    listener: Option<TunnelServer>,
}

struct ControlHandle {
    running: Mutex<Option<Arc<Running>>>,
}

static CONTROLS: HandleTable<meshvpn_control_server, ControlHandle> =
    HandleTable::new(tag::CONTROL_SERVER);

impl Handled for ControlHandle {
    const NAME: &'static str = "meshvpn_control_server";

    fn close(&self) {
        // The last reference (a call in progress may hold one) stops the
        // listener, the watcher and every session.
        drop(self.running.lock().take());
    }
}

fn lookup(handle: *const meshvpn_control_server) -> Result<Arc<Running>> {
    CONTROLS
        .lookup(handle)?
        .running
        .lock()
        .clone()
        .ok_or_else(|| Error::new(MESHVPN_CLOSED, "the control server was closed"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn store_error(e: StoreError) -> Error {
    Error::new(MESHVPN_CONTROL_STORE, e.to_string())
}

fn admin_error(e: AdminError) -> Error {
    let code = match &e {
        AdminError::NoSuchNode(_) | AdminError::RemovedMeanwhile(_) => MESHVPN_CONTROL_NOT_FOUND,
        AdminError::BadPrefix(..) => MESHVPN_PREFIX_INVALID,
        AdminError::Policy(_) => MESHVPN_CONTROL_POLICY_INVALID,
        AdminError::Route(RouteError::Store(_)) | AdminError::Store(_) => MESHVPN_CONTROL_STORE,
        AdminError::Route(RouteError::StoredPolicy { .. }) => MESHVPN_CONTROL_POLICY_INVALID,
        AdminError::Route(_) => MESHVPN_CONTROL_ROUTE_REFUSED,
    };
    Error::new(code, e.to_string())
}

/// Reads the configuration, opens the store and sets the given policy.
///
/// # Safety
/// The pointers in `c` are valid as `meshvpn_control_server_config`
/// documents.
unsafe fn open(c: &meshvpn_control_server_config) -> Result<Running> {
    // SAFETY: the caller's promise about `c`'s strings (all of this block).
    let (db, prefix, policy, policy_file, relay_url, listen) = unsafe {
        (
            ptr::try_str(c.db_path, "config->db_path")?,
            ptr::try_opt_str(c.ipv4_prefix, "config->ipv4_prefix")?,
            ptr::try_opt_str(c.policy, "config->policy")?,
            ptr::try_opt_str(c.policy_file, "config->policy_file")?,
            ptr::try_opt_str(c.relay_url, "config->relay_url")?,
            ptr::try_opt_str(c.listen, "config->listen")?,
        )
    };
    let mut store_config = StoreConfig {
        create: true,
        ..Default::default()
    };
    if let Some(p) = prefix {
        store_config.ipv4_prefix = p
            .parse::<IpPrefix>()
            .map_err(|e| Error::new(MESHVPN_PREFIX_INVALID, format!("ipv4_prefix {p:?}: {e}")))?;
    }
    let policy = match (policy, policy_file) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid("give policy or policy_file, not both"));
        }
        (Some(text), None) => Some(text.to_owned()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| Error::invalid(format!("cannot read {file}: {e}")))?,
        ),
        (None, None) => None,
    };
    // Refused before the database is touched, naming the line.
    if let Some(text) = &policy {
        Policy::parse(text).map_err(|e| {
            Error::new(
                MESHVPN_CONTROL_POLICY_INVALID,
                format!("policy: {e}; nothing was stored"),
            )
        })?;
    }
    let listener = match listen {
        None => None,
        Some(addr) => {
            // SAFETY: the caller's promise about the PEM strings.
            let (cert, key) = unsafe {
                (
                    ptr::try_str(c.cert_pem, "config->cert_pem")?,
                    ptr::try_str(c.key_pem, "config->key_pem")?,
                )
            };
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| Error::invalid(format!("listen {addr:?} is not ADDRESS:PORT")))?;
            let tls = tls::server_config(cert.as_bytes(), key.as_bytes(), None, false)
                .map_err(tls_error)?;
            Some((addr, tls))
        }
    };
    let store = Arc::new(SqliteStore::open(Path::new(db), &store_config).map_err(store_error)?);
    if let Some(text) = policy {
        let stored = store.policy().map_err(store_error)?;
        if stored.is_none_or(|p| p.text != text) {
            admin::set_policy(&*store, &text, unix_now()).map_err(admin_error)?;
        }
    }
    let mut config = ControlServerConfig {
        relay_url: relay_url.map(str::to_owned),
        ..Default::default()
    };
    if c.ephemeral_timeout_ms != 0 {
        config.ephemeral_timeout = Duration::from_millis(c.ephemeral_timeout_ms.into());
    }
    if c.max_sessions != 0 {
        config.max_sessions = c.max_sessions as usize;
    }
    if c.max_sessions_per_source != 0 {
        config.max_sessions_per_source = c.max_sessions_per_source as usize;
    }
    let control = ControlServer::start(store.clone(), config)
        .map_err(|e| Error::new(MESHVPN_THREAD_FAILED, e.to_string()))?;
    let listener =
        match listener {
            None => None,
            Some((addr, tls)) => {
                // No agent credentials: the k3s path refuses everyone; this
                // port serves the control protocol (and the relay), as
                // `meshvpn control serve` does.
                let mut sc = ServerConfig::new(K3S_PATH, Some(tls), ServerAuth::default());
                sc.extra.push(control.route());
                if c.relay {
                    sc.relay = Some(Default::default());
                }
                Some(TunnelServer::bind(addr, sc).map_err(|e| {
                    Error::new(MESHVPN_TUNNEL_LISTEN_FAILED, format!("{addr}: {e}"))
                })?)
            }
        };
    Ok(Running {
        store,
        control,
        listener,
    })
}

/// Creates a control server from `config`: opens (or creates) its
/// database, sets the given policy, and starts watching the store; with
/// `config->listen` it also listens. On success `*out_server` receives a
/// handle the caller owns and must release with
/// `meshvpn_control_server_free`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_ARGUMENT` (a bad
/// listen address, both `policy` and `policy_file`, an unreadable policy
/// file), `MESHVPN_PREFIX_INVALID`, `MESHVPN_CONTROL_POLICY_INVALID` (the
/// message names the line and column), `MESHVPN_CONTROL_STORE` (the
/// database cannot be opened or written), `MESHVPN_TUNNEL_TLS`,
/// `MESHVPN_TUNNEL_LISTEN_FAILED`, `MESHVPN_THREAD_FAILED`.
///
/// Thread safety: safe to call from any thread at any time.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_new(
    config: *const meshvpn_control_server_config,
    out_server: *mut *mut meshvpn_control_server,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a valid config or NULL.
        let c = unsafe { ptr::try_ref(config, "config") }?;
        let out = Out::new(out_server, "out_server")?;
        // SAFETY: the config's pointers are valid as its doc says.
        let running = unsafe { open(c) }?;
        let handle = Arc::new(ControlHandle {
            running: Mutex::new(Some(Arc::new(running))),
        });
        out.write(CONTROLS.insert(handle)?);
        Ok(())
    }}
}

/// Serves the control protocol (`/v1-meshvpn/control`) on `tunnel`'s
/// listener from its next `meshvpn_tunnel_server_start` on, next to the
/// k3s tunnel and the relay, under the listener's handshake caps. Call it
/// before starting the tunnel server (or stop it first). The tunnel server
/// keeps serving the path after the control server is closed, refusing
/// every node, until it is stopped.
///
/// Errors: `MESHVPN_INVALID_HANDLE`, `MESHVPN_CLOSED`,
/// `MESHVPN_INVALID_ARGUMENT` (the tunnel server is running, or serves a
/// control server already).
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_control_server_attach(
    server: *mut meshvpn_control_server,
    tunnel: *mut meshvpn_tunnel_server,
) -> meshvpn_result {
    ffi_boundary! {{
        let r = lookup(server)?;
        crate::tunnel::server::add_route(tunnel, r.control.route())
    }}
}

/// Writes the address of the server's own listener (`config->listen`) into
/// `buf`, following the buffer protocol of `meshvpn_result_message`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`,
/// `MESHVPN_TUNNEL_NOT_RUNNING` (created without `listen`).
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_local_addr(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let l = r.listener.as_ref().ok_or_else(|| {
            Error::new(MESHVPN_TUNNEL_NOT_RUNNING, "created without config->listen")
        })?;
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &l.local_addr().to_string()) }
    }}
}

/// Creates a join key and writes its text (`mvpn-key-...`) into `buf`,
/// which must hold `MESHVPN_JOIN_KEY_LEN` bytes: the text is shown only
/// now (the database keeps its hash), so the size is checked before the key
/// is made. `*out_len` receives the text's length.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL` (nothing created),
/// `MESHVPN_INVALID_ARGUMENT` (a bad tag or cluster name, an expiry over
/// 10 years), `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_create_key(
    server: *mut meshvpn_control_server,
    options: *const meshvpn_join_key_options,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes valid options or NULL.
        let o = unsafe { ptr::try_ref(options, "options") }?;
        let out_len = Out::new(out_len, "out_len")?;
        if buf.is_null() {
            return Err(Error::null("buf"));
        }
        if buf_len < MESHVPN_JOIN_KEY_LEN {
            return Err(Error::new(
                MESHVPN_BUFFER_TOO_SMALL,
                format!("a join key needs {MESHVPN_JOIN_KEY_LEN} bytes, the buffer has {buf_len}; no key was created"),
            ));
        }
        // SAFETY: the caller's promise about the options' strings.
        let (tags, cluster) = unsafe {
            (
                ptr::try_opt_str(o.tags, "options->tags")?,
                ptr::try_opt_str(o.cluster, "options->cluster")?,
            )
        };
        let opts = KeyOptions {
            reusable: o.reusable,
            ephemeral: o.ephemeral,
            expiry: (o.expiry_seconds != 0).then(|| Duration::from_secs(o.expiry_seconds)),
            tags: tags
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            cluster: cluster.map(str::to_owned),
        };
        let r = lookup(server)?;
        let key = keys::create(&*r.store, &opts, unix_now(), &ring::rand::SystemRandom::new())
            .map_err(|e| match e {
                CreateError::Store(e) => store_error(e),
                CreateError::Random => Error::new(MESHVPN_THREAD_FAILED, e.to_string()),
                e => Error::invalid(e.to_string()),
            })?;
        // `key.text` is wiped when it drops; only the caller gets a copy.
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, key.text.as_str()) }
    }}
}

/// Writes the join keys as a JSON array into `buf` (the buffer protocol of
/// `meshvpn_result_message`): each `{"id", "state"` (`valid`, `expired`,
/// `revoked`, `used`)`, "uses", "created", "expires"` (Unix seconds or
/// null)`, "reusable", "ephemeral", "tags", "cluster"}`. No secrets: the
/// database has none.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_keys(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let now = unix_now();
        let list: Vec<_> = r
            .store
            .list_keys()
            .map_err(store_error)?
            .into_iter()
            .map(|k| {
                json!({
                    "id": k.id,
                    "state": k.state(now).to_string(),
                    "uses": k.uses,
                    "created": k.created,
                    "expires": k.expires,
                    "revoked": k.revoked,
                    "reusable": k.reusable,
                    "ephemeral": k.ephemeral,
                    "tags": k.tags,
                    "cluster": k.cluster,
                })
            })
            .collect();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &serde_json::Value::from(list).to_string()) }
    }}
}

/// Revokes the join key `key` (its id, or its whole text); nodes that
/// joined with it stay.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_CONTROL_NOT_FOUND`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_revoke_key(
    server: *mut meshvpn_control_server,
    key: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let key = unsafe { ptr::try_str(key, "key") }?;
        // Only the id is kept (and named in messages), never the secret.
        let id = match keys::parse(key) {
            Ok(parsed) => parsed.id,
            Err(_) => key.trim().to_string(),
        };
        let r = lookup(server)?;
        if !r.store.revoke_key(&id, unix_now()).map_err(store_error)? {
            return Err(Error::new(MESHVPN_CONTROL_NOT_FOUND, format!("no join key {id}")));
        }
        r.control.poke();
        Ok(())
    }}
}

/// Writes the nodes as a JSON array into `buf` (the buffer protocol of
/// `meshvpn_result_message`): each `{"id", "name", "ipv4", "ipv6",
/// "public_key"` (base64)`, "tags", "cluster", "ephemeral", "online"`
/// (a session with this server now)`, "offline_since"` (Unix seconds or
/// null)`}`.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_nodes(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let online = r.control.connected();
        let list: Vec<_> = r
            .store
            .list_nodes()
            .map_err(store_error)?
            .into_iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "name": n.name,
                    "ipv4": n.ipv4.to_string(),
                    "ipv6": n.ipv6.to_string(),
                    "public_key": n.public_key.to_base64(),
                    "tags": n.tags,
                    "cluster": n.cluster,
                    "ephemeral": n.ephemeral,
                    "online": online.binary_search(&n.id).is_ok(),
                    "offline_since": n.offline_since,
                })
            })
            .collect();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &serde_json::Value::from(list).to_string()) }
    }}
}

/// Removes the node `node` (its id, name or base64 public key) with its
/// routes: its session is told and closed, its key is refused from now
/// on, and connected nodes drop it as a peer. Routes it blocked in other
/// clusters are re-examined.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_CONTROL_NOT_FOUND`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_remove_node(
    server: *mut meshvpn_control_server,
    node: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let node = unsafe { ptr::try_str(node, "node") }?;
        let r = lookup(server)?;
        let removed = admin::remove_node(&*r.store, node, unix_now()).map_err(admin_error)?;
        if let Err(e) = removed.freed {
            // The removal stands; the server's next pass catches up.
            tracing::warn!(error = %e, "control: routes not re-examined after a removal");
        }
        r.control.poke();
        Ok(())
    }}
}

/// Writes the advertised routes as a JSON array into `buf` (the buffer
/// protocol of `meshvpn_result_message`): each `{"node_id", "node",
/// "cluster", "prefix", "status"` (`approved`, `pending`, `refused`)`,
/// "approved_by"` (`policy`, `operator` or null)`, "reason"}`; a refused
/// route's reason names the conflicting node and both clusters.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_routes(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let list: Vec<_> = r
            .store
            .list_routes()
            .map_err(store_error)?
            .into_iter()
            .map(|rt| {
                let approved_by = match (&rt.status, rt.approved_by) {
                    (RouteStatus::Approved, Some(Approver::Policy)) => Some("policy"),
                    (RouteStatus::Approved, _) => Some("operator"),
                    _ => None,
                };
                let reason = match &rt.status {
                    RouteStatus::Refused(c) => c.to_string(),
                    _ => String::new(),
                };
                json!({
                    "node_id": rt.node_id,
                    "node": rt.node_name,
                    "cluster": cluster_name(rt.cluster.as_deref()),
                    "prefix": rt.prefix.to_string(),
                    "status": rt.status.word(),
                    "approved_by": approved_by,
                    "reason": reason,
                })
            })
            .collect();
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &serde_json::Value::from(list).to_string()) }
    }}
}

/// Approves the route `prefix` (`"10.42.1.0/24"`) that node `node` (id,
/// name or public key) advertises.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_PREFIX_INVALID`, `MESHVPN_CONTROL_NOT_FOUND`,
/// `MESHVPN_CONTROL_ROUTE_REFUSED` (not advertised by the node, or it
/// overlaps an approved route of another cluster: the message names it),
/// `MESHVPN_CONTROL_POLICY_INVALID` (the stored policy no longer loads),
/// `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_approve_route(
    server: *mut meshvpn_control_server,
    node: *const c_char,
    prefix: *const c_char,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes NUL-terminated strings or NULL.
        let (node, prefix) = unsafe {
            (ptr::try_str(node, "node")?, ptr::try_str(prefix, "prefix")?)
        };
        let r = lookup(server)?;
        admin::approve_route(&*r.store, node, prefix, unix_now()).map_err(admin_error)?;
        r.control.poke();
        Ok(())
    }}
}

/// Validates `policy` (JSON: `tagOwners`, `acls`, `autoApprovers`; see
/// docs/control.md) and makes it the policy, as a new version written to
/// `*out_version` (may be NULL); routes are re-examined for
/// auto-approval and connected nodes get their new packet filter at once.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_CONTROL_POLICY_INVALID` (the message names
/// the line and column; nothing was stored), `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_set_policy(
    server: *mut meshvpn_control_server,
    policy: *const c_char,
    out_version: *mut u64,
) -> meshvpn_result {
    ffi_boundary! {{
        // SAFETY: the caller passes a NUL-terminated string or NULL.
        let text = unsafe { ptr::try_str(policy, "policy") }?;
        let r = lookup(server)?;
        let (version, _) = admin::set_policy(&*r.store, text, unix_now()).map_err(admin_error)?;
        r.control.poke();
        if !out_version.is_null() {
            Out::new(out_version, "out_version")?.write(version);
        }
        Ok(())
    }}
}

/// Writes the policy's text as set into `buf` (the buffer protocol of
/// `meshvpn_result_message`) and its version into `*out_version` (may be
/// NULL); with no policy set (allow-all) the text is empty and the
/// version 0.
///
/// Errors: `MESHVPN_NULL_PARAMETER`, `MESHVPN_INVALID_HANDLE`,
/// `MESHVPN_CLOSED`, `MESHVPN_BUFFER_TOO_SMALL`, `MESHVPN_CONTROL_STORE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub unsafe extern "C" fn meshvpn_control_server_get_policy(
    server: *mut meshvpn_control_server,
    buf: *mut c_char,
    buf_len: usize,
    out_len: *mut usize,
    out_version: *mut u64,
) -> meshvpn_result {
    ffi_boundary! {{
        let out_len = Out::new(out_len, "out_len")?;
        let r = lookup(server)?;
        let (text, version) = r
            .store
            .policy()
            .map_err(store_error)?
            .map_or((String::new(), 0), |p| (p.text, p.version));
        // SAFETY: the caller promises `buf` has `buf_len` writable bytes.
        unsafe { ptr::write_text(buf, buf_len, out_len, &text) }?;
        if !out_version.is_null() {
            Out::new(out_version, "out_version")?.write(version);
        }
        Ok(())
    }}
}

/// Stops the server: its own listener, its watcher and every node's
/// session (nodes keep their data plane and reconnect when a server
/// serves the database again); later calls fail with `MESHVPN_CLOSED`.
/// The handle stays valid until freed.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_control_server_close(
    server: *mut meshvpn_control_server,
) -> meshvpn_result {
    ffi_boundary! {{
        CONTROLS.close(server)
    }}
}

/// Closes the server (as `meshvpn_control_server_close`) and releases it.
/// Freeing NULL is a no-op.
///
/// Errors: `MESHVPN_INVALID_HANDLE`.
///
/// Thread safety: safe to call from any thread.
#[no_mangle]
pub extern "C" fn meshvpn_control_server_free(
    server: *mut meshvpn_control_server,
) -> meshvpn_result {
    ffi_boundary! {{
        CONTROLS.free(server)
    }}
}
