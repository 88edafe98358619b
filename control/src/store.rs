//! The control server's state: nodes, join keys, routes and the policy.
//!
//! [`Store`] is the interface the server (and the `meshvpn control` CLI)
//! use; [`SqliteStore`] is the one implementation today: one SQLite file,
//! SQLite compiled into the binary (rusqlite's `bundled`).
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, so a
//! transaction's commit has reached the disk (fsync of the WAL) when it
//! returns. Every change is one transaction committed before the method
//! returns, and the server acknowledges a change only after the method
//! returned: whatever was acknowledged survives SIGKILL (tested in
//! `tests/crash.rs`) and, with FULL, a power loss.
//!
//! Concurrency: several processes may open the same file (the server and
//! `meshvpn control ...` run by an operator). SQLite's file locks serialise
//! writers; each write transaction is `BEGIN IMMEDIATE`, so it takes the
//! write lock before it reads what it decides on (a join key's use count,
//! free addresses), and a second writer waits up to [`BUSY_TIMEOUT`] for it.
//! Readers never block in WAL mode. This is what makes redeeming a
//! single-use key race-free across processes as well as threads.
//!
//! Schema: versioned with `PRAGMA user_version`; [`MIGRATIONS`] holds one
//! SQL batch per version and an older file is brought forward in order, each
//! step in its own transaction, on open. A file from a newer meshvpn is
//! refused rather than misread. `PRAGMA application_id` marks the file as
//! ours, so pointing `--db` at some other SQLite file fails clearly.
//!
//! High availability, later: the choice would be the datastore k3s itself
//! uses for HA, embedded etcd (k3s's `--cluster-init`), as a second
//! [`Store`] implementation over etcd's v3 API, with the control server's
//! records under their own key prefix. The control server runs inside the
//! k3s server process, so it would ride on the quorum the cluster already
//! has instead of adding a second consensus group to operate; etcd's
//! transactions (compare a key's revision, then write) give the same
//! single-use guarantee as `BEGIN IMMEDIATE` here. k3s itself replaced
//! dqlite with embedded etcd as its embedded HA datastore (k3s PR #1770),
//! and kine's SQLite backend, like this one, is single-instance only. For a control server run alone,
//! rqlite (Raft-replicated SQLite over HTTP) would keep this schema and SQL
//! nearly unchanged; it is the fallback when no etcd is at hand.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshvpn_engine::{IpPrefix, PublicKey};
use ring::rand::SecureRandom;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::keys::{JoinError, JoinKeyRecord};
use crate::node::{node_name, unique_name, AddressPlan, NodeRecord, NodeRequest, PlanError};
use crate::routes::{Approver, Conflict, RouteChange, RouteError, RouteStatus, RouteTable};

/// `SELECT` of the node columns in the order [`SqliteStore::node_row`]
/// reads them, then `$rest` (what follows `FROM nodes`).
macro_rules! select_nodes {
    ($rest:literal) => {
        concat!(
            "SELECT id, public_key, name, ipv4, ipv6, tags, ephemeral, cluster, join_key, ",
            "created, updated, offline_since FROM nodes",
            $rest
        )
    };
}

/// How long a write waits for another process's or thread's write
/// transaction to finish before it fails with "database is locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The most routes one node may advertise. A node's advertisement comes
/// from the network; this caps what one node can make the store (and every
/// node's network map) hold. A k3s node advertises one pod CIDR, a subnet
/// router a handful.
pub const MAX_ROUTES_PER_NODE: usize = 256;

/// `PRAGMA application_id` of a meshvpn control database ("mvpc").
pub const APPLICATION_ID: i32 = 0x6d76_7063;

/// One SQL batch per schema version: `MIGRATIONS[n]` takes a database from
/// version n to n+1. Append only; never edit a released step.
pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE meta (
         k TEXT PRIMARY KEY,
         v TEXT NOT NULL
     ) STRICT;
     CREATE TABLE join_keys (
         id TEXT PRIMARY KEY,
         hash BLOB NOT NULL CHECK (length(hash) = 32),
         created INTEGER NOT NULL,
         expires INTEGER,
         reusable INTEGER NOT NULL,
         ephemeral INTEGER NOT NULL,
         tags TEXT NOT NULL,
         revoked INTEGER,
         uses INTEGER NOT NULL DEFAULT 0,
         last_used INTEGER
     ) STRICT;
     CREATE TABLE nodes (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         public_key BLOB NOT NULL UNIQUE CHECK (length(public_key) = 32),
         name TEXT NOT NULL UNIQUE,
         ipv4 INTEGER NOT NULL UNIQUE,
         ipv6 BLOB NOT NULL UNIQUE,
         tags TEXT NOT NULL,
         ephemeral INTEGER NOT NULL,
         join_key TEXT,
         created INTEGER NOT NULL,
         updated INTEGER NOT NULL,
         offline_since INTEGER
     ) STRICT;
     CREATE TABLE routes (
         node_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
         prefix TEXT NOT NULL,
         approved INTEGER NOT NULL,
         PRIMARY KEY (node_id, prefix)
     ) STRICT;
     CREATE TABLE policy (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         text TEXT NOT NULL,
         version INTEGER NOT NULL,
         updated INTEGER NOT NULL
     ) STRICT;",
    // 2: the cluster label, set on a join key and copied to its nodes.
    "ALTER TABLE join_keys ADD COLUMN cluster TEXT;
     ALTER TABLE nodes ADD COLUMN cluster TEXT;",
    // 3: route decisions (crate::routes): status, who approved, and for a
    // refused route the other side. `approved` stays, kept equal to
    // status = 'approved'. Approvals made before were the operator's.
    "ALTER TABLE routes ADD COLUMN status TEXT NOT NULL DEFAULT 'pending'
         CHECK (status IN ('pending', 'approved', 'refused'));
     ALTER TABLE routes ADD COLUMN approved_by TEXT
         CHECK (approved_by IN ('policy', 'operator'));
     ALTER TABLE routes ADD COLUMN conflict_prefix TEXT;
     ALTER TABLE routes ADD COLUMN conflict_node TEXT;
     ALTER TABLE routes ADD COLUMN conflict_cluster TEXT;
     ALTER TABLE routes ADD COLUMN updated INTEGER NOT NULL DEFAULT 0;
     UPDATE routes SET status = 'approved', approved_by = 'operator' WHERE approved = 1;",
    // 4: each route's network as an ordered key (`net_key`) and its length,
    // indexed, so a pass reads the routes overlapping a prefix (its
    // ancestors by exact lookup, what it holds by a key range) instead of
    // every route. Existing rows are filled in by `fill_route_keys`.
    "ALTER TABLE routes ADD COLUMN net BLOB;
     ALTER TABLE routes ADD COLUMN len INTEGER;
     CREATE INDEX routes_net ON routes (net, len);",
    // 5: the primary router of a prefix several nodes of one cluster
    // advertise (`crate::routes::elect`): the one route of the prefix the
    // network map gives. Existing rows start as standby; the server's
    // first election picks one per prefix.
    "ALTER TABLE routes ADD COLUMN is_primary INTEGER NOT NULL DEFAULT 0;",
];

/// The step of [`MIGRATIONS`] that adds `routes.net` and `routes.len`;
/// [`migrate`] fills them in for the rows already there.
const ROUTE_KEYS_STEP: usize = 3;

/// A prefix's network address as a key that sorts by address inside its
/// family and never between families: 4 or 6, then the address bytes.
pub(crate) fn net_key(addr: std::net::IpAddr) -> Vec<u8> {
    match addr {
        std::net::IpAddr::V4(a) => {
            let mut k = vec![4];
            k.extend_from_slice(&a.octets());
            k
        }
        std::net::IpAddr::V6(a) => {
            let mut k = vec![6];
            k.extend_from_slice(&a.octets());
            k
        }
    }
}

/// What a node advertises as a set: each prefix as its network, sorted,
/// without repeats, at most [`MAX_ROUTES_PER_NODE`] of them (else the
/// error, and the caller changes nothing).
pub(crate) fn advertised_set(
    node_id: i64,
    routes: &[IpPrefix],
) -> Result<Vec<IpPrefix>, StoreError> {
    let mut wanted: Vec<IpPrefix> = routes.iter().map(|p| p.network()).collect();
    wanted.sort();
    wanted.dedup();
    if wanted.len() > MAX_ROUTES_PER_NODE {
        return Err(StoreError::TooManyRoutes {
            node: node_id,
            count: wanted.len(),
            max: MAX_ROUTES_PER_NODE,
        });
    }
    Ok(wanted)
}

/// The schema version this build writes.
pub fn schema_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// A route a node advertises and where it stands (see [`crate::routes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRecord {
    pub node_id: i64,
    /// The node's name and cluster, as stored now.
    pub node_name: String,
    pub cluster: Option<String>,
    pub prefix: IpPrefix,
    /// `status == RouteStatus::Approved`.
    pub approved: bool,
    pub status: RouteStatus,
    /// Who approved it, when it is approved.
    pub approved_by: Option<Approver>,
    /// When its status last changed (Unix seconds; 0 before schema 3).
    pub updated: u64,
    /// The approved route of its prefix the network map gives (one per
    /// prefix; the others of the prefix stand by): see
    /// [`crate::routes::elect`]. Always false when not approved.
    pub primary: bool,
}

/// A node removed, with the routes that went with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedNode {
    pub node: NodeRecord,
    pub routes: Vec<RouteRecord>,
}

/// The policy's text as last set, and its version (1, 2, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRecord {
    pub text: String,
    pub version: u64,
    pub updated: u64,
}

/// A store's failures. The text says what to do next where there is
/// something to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no control database at {0} (the first `meshvpn control keys create` or the server creates it; or pass --db / --state-dir)")]
    Missing(PathBuf),
    #[error("{path} is damaged or not a database ({detail}): restore it from a backup")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{0} is an SQLite database but not a meshvpn control database")]
    Foreign(PathBuf),
    #[error("{path} has schema version {found}, newer than this meshvpn knows ({known}): use the meshvpn that wrote it or a newer one")]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("every address of {0} is taken")]
    AddressesExhausted(IpPrefix),
    #[error("node {node} advertises {count} routes, more than the {max} one node may")]
    TooManyRoutes { node: i64, count: usize, max: usize },
    #[error("{0} stayed locked by another process's write past the busy timeout: is a process stuck holding it?")]
    Busy(PathBuf),
    #[error("no node with id {0}")]
    NoSuchNode(i64),
    #[error("{path}: the transaction was not committed: {detail}")]
    NotCommitted { path: PathBuf, detail: String },
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: a stored {what} is invalid: {detail}")]
    BadRow {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
}

/// Why registering with a join key failed: the key (the node's problem) or
/// the store (the server's).
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The control server's state. Every method that changes something has
/// committed it durably when it returns `Ok`.
pub trait Store: Send + Sync {
    fn insert_key(&self, key: &JoinKeyRecord) -> Result<(), StoreError>;
    fn list_keys(&self) -> Result<Vec<JoinKeyRecord>, StoreError>;
    fn key(&self, id: &str) -> Result<Option<JoinKeyRecord>, StoreError>;
    /// False when there is no such key. Revoking twice keeps the first time.
    fn revoke_key(&self, id: &str, now: u64) -> Result<bool, StoreError>;

    /// In ONE transaction: loads key `key_id`, lets `check` accept or refuse
    /// it, counts the use, and registers the node (a node already known by
    /// its public key keeps its id, name and addresses; it takes the key's
    /// tags, ephemeral flag and cluster). Unknown id: [`JoinError::Unknown`].
    fn redeem_and_register(
        &self,
        key_id: &str,
        check: &mut dyn FnMut(&JoinKeyRecord) -> Result<(), JoinError>,
        node: &NodeRequest,
        now: u64,
    ) -> Result<NodeRecord, RedeemError>;

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    fn node_by_public_key(&self, key: &PublicKey) -> Result<Option<NodeRecord>, StoreError>;
    /// Removes the node and its routes; `None` when there is no such node.
    fn remove_node(&self, id: i64) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self.remove_node_with_routes(id)?.map(|r| r.node))
    }
    /// [`Store::remove_node`], returning the routes removed with it (what
    /// [`crate::routes::withdrawn`] re-examines the neighbours of).
    fn remove_node_with_routes(&self, id: i64) -> Result<Option<RemovedNode>, StoreError>;

    /// Records that the node connected (`offline_since` cleared) or
    /// disconnected (`offline_since = now`). False when there is no such node.
    fn set_node_online(&self, id: i64, online: bool, now: u64) -> Result<bool, StoreError>;
    /// Removes the ephemeral nodes offline since before `cutoff` (and their
    /// routes) and returns them with their routes: the server's periodic
    /// clean-up.
    fn remove_ephemeral_offline_before(&self, cutoff: u64) -> Result<Vec<RemovedNode>, StoreError>;

    /// In ONE write transaction: hands `plan` every node and every route,
    /// writes the changes it returns and commits. Route decisions
    /// ([`crate::routes::decide`], `approve`, `reevaluate`) go through
    /// here, so two decisions never interleave; `Err` from `plan` writes
    /// nothing.
    fn change_routes(
        &self,
        plan: &mut dyn FnMut(&RouteTable) -> Result<Vec<RouteChange>, RouteError>,
    ) -> Result<(), RouteError>;
    /// In ONE write transaction, as [`Store::change_routes`], but `plan`
    /// reads only the rows it asks for ([`RouteRows`]): a pass that
    /// re-examines what one node's change can affect.
    fn change_routes_near(&self, plan: &mut NearPlan<'_>) -> Result<(), RouteError>;
    /// Replaces what the node advertises with no decision: a route it
    /// still advertises keeps its status, a new one starts pending. At
    /// most [`MAX_ROUTES_PER_NODE`] distinct prefixes, else nothing
    /// changes. The server uses [`crate::routes::decide`] instead.
    fn set_advertised_routes(&self, node_id: i64, routes: &[IpPrefix]) -> Result<(), StoreError>;
    /// Sets the status to approved (by the operator) or pending with no
    /// conflict check; `meshvpn control routes approve` uses
    /// [`crate::routes::approve`], which checks. False when the node does
    /// not advertise `prefix`.
    fn set_route_approved(
        &self,
        node_id: i64,
        prefix: IpPrefix,
        approved: bool,
    ) -> Result<bool, StoreError>;
    fn list_routes(&self) -> Result<Vec<RouteRecord>, StoreError>;

    /// Stores the policy text (validated by the caller) and returns its new
    /// version.
    fn set_policy(&self, text: &str, now: u64) -> Result<u64, StoreError>;
    fn policy(&self) -> Result<Option<PolicyRecord>, StoreError>;

    /// Where this mesh's addresses come from.
    fn address_plan(&self) -> AddressPlan;
}

/// The rows a route pass reads inside its write transaction
/// ([`Store::change_routes_near`]): only what it asks for, each through an
/// index, or the whole table when it must re-examine every route.
pub trait RouteRows {
    /// The node `id`, if it exists.
    fn node(&mut self, id: i64) -> Result<Option<NodeRecord>, StoreError>;
    /// The routes node `id` advertises, by prefix.
    fn routes_of(&mut self, node_id: i64) -> Result<Vec<RouteRecord>, StoreError>;
    /// Every route (any node, any status) that overlaps `prefix`: holds it
    /// or is held by it.
    fn overlapping(&mut self, prefix: IpPrefix) -> Result<Vec<RouteRecord>, StoreError>;
    /// Every node and every route, as [`Store::change_routes`] reads them.
    fn all(&mut self) -> Result<RouteTable, StoreError>;
}

/// What [`Store::change_routes_near`] runs: reads what it needs, returns
/// the rows to write.
pub type NearPlan<'a> = dyn FnMut(&mut dyn RouteRows) -> Result<Vec<RouteChange>, RouteError> + 'a;

/// [`RouteRows`] of a [`SqliteStore`]'s open write transaction.
struct TxRows<'a> {
    store: &'a SqliteStore,
    tx: &'a Connection,
}

impl RouteRows for TxRows<'_> {
    fn node(&mut self, id: i64) -> Result<Option<NodeRecord>, StoreError> {
        self.tx
            .prepare_cached(select_nodes!(" WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id], |r| self.store.node_row(r)).optional())
            .map_err(|e| self.store.err(e))
    }

    fn routes_of(&mut self, node_id: i64) -> Result<Vec<RouteRecord>, StoreError> {
        self.store
            .routes_where(self.tx, "WHERE r.node_id = ?1", [node_id])
    }

    fn overlapping(&mut self, prefix: IpPrefix) -> Result<Vec<RouteRecord>, StoreError> {
        let net = prefix.network();
        let mut out = Vec::new();
        // The prefix itself and its ancestors: one exact lookup per length.
        for len in 0..=net.len() {
            let a = IpPrefix::new(net.addr(), len)
                .map_err(|e| StoreError::BadRow {
                    path: self.store.path.clone(),
                    what: "route prefix",
                    detail: format!("{net}: {e}"),
                })?
                .network();
            out.extend(self.store.routes_where(
                self.tx,
                "WHERE r.net = ?1 AND r.len = ?2",
                params![net_key(a.addr()), len],
            )?);
        }
        // What it holds: longer prefixes whose network lies inside it.
        out.extend(self.store.routes_where(
            self.tx,
            "WHERE r.net BETWEEN ?1 AND ?2 AND r.len > ?3",
            params![
                net_key(net.addr()),
                net_key(crate::routes::last_addr(net)),
                net.len()
            ],
        )?);
        Ok(out)
    }

    fn all(&mut self) -> Result<RouteTable, StoreError> {
        let nodes: Vec<NodeRecord> = self
            .tx
            .prepare(select_nodes!(" ORDER BY id"))
            .and_then(|mut s| s.query_map([], |r| self.store.node_row(r))?.collect())
            .map_err(|e| self.store.err(e))?;
        let routes = self.store.routes_in(self.tx)?;
        Ok(RouteTable { nodes, routes })
    }
}

/// How to open a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Create the file when it is missing (the server, `keys create`);
    /// otherwise a missing file is [`StoreError::Missing`].
    pub create: bool,
    /// The prefix new nodes get IPv4 addresses from. Changing it later
    /// leaves registered nodes their addresses.
    pub ipv4_prefix: IpPrefix,
    /// How long a write waits for another writer; default [`BUSY_TIMEOUT`].
    pub busy_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            create: true,
            ipv4_prefix: crate::node::DEFAULT_IPV4_PREFIX
                .parse()
                .expect("valid prefix"),
            busy_timeout: BUSY_TIMEOUT,
        }
    }
}

/// Writes committed together at most: a batch is committed once it holds
/// this many, even while more writers are waiting.
pub const GROUP_COMMIT_MAX_WRITES: usize = 256;
/// A batch is committed once it has been open this long, even while more
/// writers are waiting, so a steady stream of writers cannot hold one
/// writer's commit back.
pub const GROUP_COMMIT_MAX_DELAY: Duration = Duration::from_millis(20);

/// [`Store`] in one SQLite file: one connection for writes and one for
/// reads (WAL: readers see only committed transactions and never wait for
/// the writer), each behind a mutex.
///
/// Group commit: concurrent writes share one transaction and one fsync
/// (the classic group commit of PostgreSQL's `commit_delay` and InnoDB's
/// binlog group commit). Each write runs in its own `SAVEPOINT` inside
/// the open batch (a failed write rolls back only itself), then waits:
/// the last writer in (no other writer waiting for the connection), or
/// the first once the batch holds [`GROUP_COMMIT_MAX_WRITES`] or is
/// [`GROUP_COMMIT_MAX_DELAY`] old, commits the batch, and every write of
/// it returns only after that commit (or its failure), so a write is still
/// committed before its method returns. A lone writer commits at once.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Writer>,
    /// Signalled when a batch ends, or a writer left the connection.
    batch_done: Condvar,
    /// Writers waiting to take `writer`.
    wanting: AtomicUsize,
    reader: Mutex<Connection>,
    plan: AddressPlan,
}

/// The write connection and its open batch.
struct Writer {
    conn: Connection,
    /// Id of the batch open in `conn` (a `BEGIN IMMEDIATE` not yet
    /// committed), if any.
    open: Option<u64>,
    next: u64,
    /// Writes done in the open batch, and when it was opened.
    writes: usize,
    opened: Instant,
    /// Every batch up to this id has ended.
    ended: u64,
    /// The last batches that failed to commit, with why.
    failed: VecDeque<(u64, String)>,
    /// A write's closure is running (still set after it panicked).
    in_write: bool,
}

/// Failed batches remembered for their waiters.
const FAILED_KEPT: usize = 64;

impl Writer {
    /// Ends the open batch: `COMMIT`, or on failure `ROLLBACK` and a
    /// record of why for its waiters.
    fn end_batch(&mut self, commit: bool) {
        let Some(id) = self.open.take() else {
            return;
        };
        let result = if commit {
            self.conn.execute_batch("COMMIT").map_err(|e| e.to_string())
        } else {
            Err("an earlier write of the same batch failed".to_string())
        };
        if let Err(why) = result {
            let _ = self.conn.execute_batch("ROLLBACK");
            if self.failed.len() >= FAILED_KEPT {
                self.failed.pop_front();
            }
            self.failed.push_back((id, why));
        }
        self.ended = id;
        self.writes = 0;
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("plan", &self.plan)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (or with `config.create`, creates) the database and brings its
    /// schema up to date.
    pub fn open(path: &Path, config: &StoreConfig) -> Result<Self, StoreError> {
        let exists = path.try_exists().unwrap_or(false);
        if !exists {
            if !config.create {
                return Err(StoreError::Missing(path.to_path_buf()));
            }
            // Created 0600 before SQLite opens it (its -wal and -shm files
            // take the same mode): it holds node keys and key hashes.
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|source| StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let err = |e| classify(path, e);
        let mut conn = Connection::open_with_flags(path, flags).map_err(err)?;
        conn.busy_timeout(config.busy_timeout).map_err(err)?;
        // The first statement that reads the file: a non-database fails here.
        // On a file not yet in WAL mode the switch takes an exclusive lock,
        // and SQLite answers "busy" at once, without the busy handler, while
        // another connection holds the file (several processes opening a new
        // file together); so the switch is retried here for the same
        // busy timeout.
        let deadline = Instant::now() + config.busy_timeout;
        let mode: String = loop {
            match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
                Err(e)
                    if matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy))
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                r => break r.map_err(err)?,
            }
        };
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("cannot use WAL mode (got {mode})"),
            });
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(err)?;
        migrate(path, &mut conn, MIGRATIONS)?;
        let ula = ula_global_id(path, &conn)?;
        let plan = AddressPlan::new(config.ipv4_prefix, ula)?;
        let reader = Connection::open_with_flags(path, flags).map_err(err)?;
        reader.busy_timeout(config.busy_timeout).map_err(err)?;
        reader
            .execute_batch("PRAGMA foreign_keys=ON;")
            .map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Mutex::new(Writer {
                conn,
                open: None,
                next: 0,
                writes: 0,
                opened: Instant::now(),
                ended: 0,
                failed: VecDeque::new(),
                in_write: false,
            }),
            batch_done: Condvar::new(),
            wanting: AtomicUsize::new(0),
            reader: Mutex::new(reader),
            plan,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PRAGMA integrity_check` plus the foreign keys: `Ok(())` or what is
    /// wrong.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let conn = self.lock_reader();
        let report: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        if report != ["ok"] {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: report.join("; "),
            });
        }
        let fk: i64 = conn
            .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        if fk != 0 {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("{fk} dangling references"),
            });
        }
        Ok(())
    }

    fn lock_reader(&self) -> MutexGuard<'_, Connection> {
        // Reads hold no transaction open between calls: a panic during one
        // leaves the connection usable.
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The write connection; a batch left half-done by a write that
    /// panicked is rolled back, and its other writes fail.
    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.recover(&mut w);
        w
    }

    fn recover(&self, w: &mut Writer) {
        if w.in_write {
            w.in_write = false;
            w.end_batch(false);
            self.batch_done.notify_all();
        }
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        classify(&self.path, e)
    }

    /// `f` inside the write lock (`BEGIN IMMEDIATE`) as part of a group
    /// commit (see [`SqliteStore`]): committed before this returns `Ok`;
    /// when `f` fails, what it wrote is rolled back and the batch's other
    /// writes stand.
    fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        self.wanting.fetch_add(1, Ordering::SeqCst);
        let mut w = self.lock_writer();
        self.wanting.fetch_sub(1, Ordering::SeqCst);
        if w.open.is_none() {
            if let Err(e) = w.conn.execute_batch("BEGIN IMMEDIATE") {
                self.batch_done.notify_all();
                return Err(self.err(e).into());
            }
            w.next += 1;
            w.open = Some(w.next);
            w.writes = 0;
            w.opened = Instant::now();
        }
        let id = w.next;
        let savepoint = w.conn.execute_batch("SAVEPOINT write");
        let out = match savepoint {
            Err(e) => Err(E::from(self.err(e))),
            Ok(()) => {
                w.in_write = true;
                let out = f(&w.conn);
                w.in_write = false;
                let end = if out.is_ok() {
                    "RELEASE write"
                } else {
                    "ROLLBACK TO write; RELEASE write"
                };
                match w.conn.execute_batch(end) {
                    Ok(()) => out,
                    Err(e) => {
                        // The batch is in an unknown state: none of it
                        // stands.
                        w.end_batch(false);
                        self.batch_done.notify_all();
                        return Err(self.err(e).into());
                    }
                }
            }
        };
        let out = match out {
            Ok(v) => v,
            Err(e) => {
                // Nothing of this write is in the batch: no need to wait,
                // but an empty batch nobody else will use is closed.
                if w.writes == 0 && self.wanting.load(Ordering::SeqCst) == 0 {
                    w.end_batch(false);
                }
                self.batch_done.notify_all();
                return Err(e);
            }
        };
        w.writes += 1;
        loop {
            if w.ended >= id {
                return match w.failed.iter().find(|(f, _)| *f == id) {
                    None => Ok(out),
                    Some((_, why)) => Err(StoreError::NotCommitted {
                        path: self.path.clone(),
                        detail: why.clone(),
                    }
                    .into()),
                };
            }
            if w.open == Some(id)
                && (self.wanting.load(Ordering::SeqCst) == 0
                    || w.writes >= GROUP_COMMIT_MAX_WRITES
                    || w.opened.elapsed() >= GROUP_COMMIT_MAX_DELAY)
            {
                w.end_batch(true);
                self.batch_done.notify_all();
                continue;
            }
            // Another writer adds to the batch and commits it, or leaves
            // and wakes this one to.
            w = self
                .batch_done
                .wait_timeout(w, Duration::from_millis(2))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            self.recover(&mut w);
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.lock_reader();
        f(&conn).map_err(|e| self.err(e))
    }

    /// One row of `select_nodes!`, by column position: a lookup by name
    /// scans the statement's column names for every field of every row,
    /// which showed in profiles of 1000 nodes joining (every registration
    /// reads the node table).
    fn node_row(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
        let key: Vec<u8> = r.get(1)?;
        let ipv4: i64 = r.get(3)?;
        let ipv6: Vec<u8> = r.get(4)?;
        let bad = |what: &str| {
            rusqlite::Error::InvalidColumnType(0, what.to_string(), rusqlite::types::Type::Blob)
        };
        let key: [u8; 32] = key.try_into().map_err(|_| bad("public_key"))?;
        let ipv6: [u8; 16] = ipv6.try_into().map_err(|_| bad("ipv6"))?;
        let ipv4 = u32::try_from(ipv4).map_err(|_| bad("ipv4"))?;
        Ok(NodeRecord {
            id: r.get(0)?,
            public_key: PublicKey::from_bytes(key),
            name: r.get(2)?,
            ipv4: Ipv4Addr::from(ipv4),
            ipv6: Ipv6Addr::from(ipv6),
            tags: split_tags(&r.get::<_, String>(5)?),
            ephemeral: r.get(6)?,
            cluster: r.get(7)?,
            join_key: r.get(8)?,
            created: r.get::<_, i64>(9)? as u64,
            updated: r.get::<_, i64>(10)? as u64,
            offline_since: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        })
    }

    /// Every route with its node's name and cluster, by node id and prefix.
    fn routes_in(&self, c: &Connection) -> Result<Vec<RouteRecord>, StoreError> {
        self.routes_where(c, "", [])
    }

    /// The routes `filter` (a `WHERE` clause on `r`, the routes, or empty)
    /// selects, with their nodes' names and clusters, by node id and prefix.
    fn routes_where(
        &self,
        c: &Connection,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<RouteRecord>, StoreError> {
        type Row = (
            i64,
            String,
            Option<String>,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            bool,
        );
        let sql = format!(
            "SELECT r.node_id, n.name, n.cluster, r.prefix, r.status, r.approved_by,
                    r.conflict_prefix, r.conflict_node, r.conflict_cluster, r.updated,
                    r.is_primary
             FROM routes r JOIN nodes n ON n.id = r.node_id {filter}
             ORDER BY r.node_id, r.prefix"
        );
        let rows: Vec<Row> = c
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(args, |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                    ))
                })?
                .collect()
            })
            .map_err(|e| self.err(e))?;
        let bad = |detail: String| StoreError::BadRow {
            path: self.path.clone(),
            what: "route",
            detail,
        };
        let prefix = |s: &str| -> Result<IpPrefix, StoreError> {
            s.parse().map_err(|e| bad(format!("{s}: {e}")))
        };
        rows.into_iter()
            .map(
                |(node_id, node_name, cluster, p, status, by, cp, cn, cc, updated, primary)| {
                    let status = match (status.as_str(), cp, cn) {
                        ("approved", _, _) => RouteStatus::Approved,
                        ("pending", _, _) => RouteStatus::Pending,
                        ("refused", Some(cp), Some(cn)) => RouteStatus::Refused(Conflict {
                            prefix: prefix(&cp)?,
                            other_node: cn,
                            other_cluster: cc,
                            cluster: cluster.clone(),
                        }),
                        (other, _, _) => return Err(bad(format!("{p}: status {other}"))),
                    };
                    let approved_by = match by.as_deref() {
                        None => None,
                        Some("policy") => Some(Approver::Policy),
                        Some("operator") => Some(Approver::Operator),
                        Some(other) => return Err(bad(format!("{p}: approved by {other}"))),
                    };
                    let status_approved = status == RouteStatus::Approved;
                    Ok(RouteRecord {
                        node_id,
                        node_name,
                        cluster,
                        prefix: prefix(&p)?,
                        approved: status == RouteStatus::Approved,
                        status,
                        approved_by,
                        updated: updated as u64,
                        primary: primary && status_approved,
                    })
                },
            )
            .collect()
    }

    /// Writes a pass's rows in the open transaction.
    fn write_route_changes(
        &self,
        tx: &Connection,
        changes: Vec<RouteChange>,
    ) -> Result<(), RouteError> {
        let e = |e| self.err(e);
        for c in changes {
            match c {
                RouteChange::Remove { node_id, prefix } => {
                    tx.execute(
                        "DELETE FROM routes WHERE node_id = ?1 AND prefix = ?2",
                        params![node_id, prefix.to_string()],
                    )
                    .map_err(e)?;
                }
                RouteChange::Set(r) => {
                    let conflict = match &r.status {
                        RouteStatus::Refused(c) => Some(c),
                        _ => None,
                    };
                    tx.execute(
                        "INSERT INTO routes (node_id, prefix, approved, status, approved_by,
                             conflict_prefix, conflict_node, conflict_cluster, updated,
                             net, len, is_primary)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                         ON CONFLICT (node_id, prefix) DO UPDATE SET
                             approved = excluded.approved, status = excluded.status,
                             approved_by = excluded.approved_by,
                             conflict_prefix = excluded.conflict_prefix,
                             conflict_node = excluded.conflict_node,
                             conflict_cluster = excluded.conflict_cluster,
                             updated = excluded.updated,
                             is_primary = excluded.is_primary",
                        params![
                            r.node_id,
                            r.prefix.network().to_string(),
                            r.approved,
                            r.status.word(),
                            r.approved_by.map(approver_word),
                            conflict.map(|c| c.prefix.to_string()),
                            conflict.map(|c| c.other_node.clone()),
                            conflict.and_then(|c| c.other_cluster.clone()),
                            r.updated as i64,
                            net_key(r.prefix.network().addr()),
                            r.prefix.len(),
                            r.primary && r.approved,
                        ],
                    )
                    .map_err(e)?;
                }
            }
        }
        Ok(())
    }

    fn register(
        &self,
        tx: &Connection,
        key: &JoinKeyRecord,
        req: &NodeRequest,
        now: u64,
    ) -> Result<NodeRecord, StoreError> {
        let e = |e| classify(&self.path, e);
        let pk = &req.public_key.as_bytes()[..];
        let tags = key.tags.join(",");
        let existing: Option<i64> = tx
            .query_row("SELECT id FROM nodes WHERE public_key = ?1", [pk], |r| {
                r.get(0)
            })
            .optional()
            .map_err(e)?;
        let id = match existing {
            Some(id) => {
                tx.execute(
                    "UPDATE nodes SET tags = ?2, ephemeral = ?3, join_key = ?4, updated = ?5, cluster = ?6 WHERE id = ?1",
                    params![id, tags, key.ephemeral, key.id, now as i64, key.cluster],
                )
                .map_err(e)?;
                id
            }
            None => {
                let cursor: u32 = tx
                    .query_row("SELECT v FROM meta WHERE k = 'ipv4_cursor'", [], |r| {
                        r.get::<_, String>(0)
                    })
                    .optional()
                    .map_err(e)?
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut used = tx
                    .prepare_cached("SELECT 1 FROM nodes WHERE ipv4 = ?1")
                    .map_err(e)?;
                let (ipv4, next) = self
                    .plan
                    .allocate(cursor, |a| used.exists([i64::from(u32::from(a))]))
                    .map_err(e)?
                    .ok_or(StoreError::AddressesExhausted(self.plan.ipv4_prefix()))?;
                drop(used);
                let mut taken = tx
                    .prepare_cached("SELECT 1 FROM nodes WHERE name = ?1")
                    .map_err(e)?;
                let name =
                    unique_name(&node_name(&req.hostname), |n| taken.exists([n])).map_err(e)?;
                drop(taken);
                tx.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES ('ipv4_cursor', ?1)",
                    [next.to_string()],
                )
                .map_err(e)?;
                tx.execute(
                    "INSERT INTO nodes (public_key, name, ipv4, ipv6, tags, ephemeral, join_key, created, updated, offline_since, cluster)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8, ?9)",
                    params![
                        pk,
                        name,
                        i64::from(u32::from(ipv4)),
                        &self.plan.ipv6_for(ipv4).octets()[..],
                        tags,
                        key.ephemeral,
                        key.id,
                        now as i64,
                        key.cluster,
                    ],
                )
                .map_err(e)?;
                tx.last_insert_rowid()
            }
        };
        tx.query_row(select_nodes!(" WHERE id = ?1"), [id], |r| self.node_row(r))
            .map_err(e)
    }
}

impl Store for SqliteStore {
    fn insert_key(&self, key: &JoinKeyRecord) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO join_keys (id, hash, created, expires, reusable, ephemeral, tags, revoked, uses, last_used, cluster)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    key.id,
                    &key.hash[..],
                    key.created as i64,
                    key.expires.map(|v| v as i64),
                    key.reusable,
                    key.ephemeral,
                    key.tags.join(","),
                    key.revoked.map(|v| v as i64),
                    key.uses as i64,
                    key.last_used.map(|v| v as i64),
                    key.cluster,
                ],
            )
            .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn list_keys(&self) -> Result<Vec<JoinKeyRecord>, StoreError> {
        self.read(|c| {
            c.prepare("SELECT * FROM join_keys ORDER BY created, id")?
                .query_map([], key_row)?
                .collect()
        })
    }

    fn key(&self, id: &str) -> Result<Option<JoinKeyRecord>, StoreError> {
        self.read(|c| {
            c.query_row("SELECT * FROM join_keys WHERE id = ?1", [id], key_row)
                .optional()
        })
    }

    fn revoke_key(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE join_keys SET revoked = coalesce(revoked, ?2) WHERE id = ?1",
                    params![id, now as i64],
                )
                .map_err(|e| self.err(e))?;
            Ok(n == 1)
        })
    }

    fn redeem_and_register(
        &self,
        key_id: &str,
        check: &mut dyn FnMut(&JoinKeyRecord) -> Result<(), JoinError>,
        node: &NodeRequest,
        now: u64,
    ) -> Result<NodeRecord, RedeemError> {
        self.write(|tx| {
            let key = tx
                .query_row("SELECT * FROM join_keys WHERE id = ?1", [key_id], key_row)
                .optional()
                .map_err(|e| self.err(e))?
                .ok_or(JoinError::Unknown)?;
            check(&key)?;
            tx.execute(
                "UPDATE join_keys SET uses = uses + 1, last_used = ?2 WHERE id = ?1",
                params![key_id, now as i64],
            )
            .map_err(|e| self.err(e))?;
            Ok(self.register(tx, &key, node, now)?)
        })
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.read(|c| {
            c.prepare(select_nodes!(" ORDER BY id"))?
                .query_map([], |r| self.node_row(r))?
                .collect()
        })
    }

    fn node_by_public_key(&self, key: &PublicKey) -> Result<Option<NodeRecord>, StoreError> {
        self.read(|c| {
            c.query_row(
                select_nodes!(" WHERE public_key = ?1"),
                [&key.as_bytes()[..]],
                |r| self.node_row(r),
            )
            .optional()
        })
    }

    fn remove_node_with_routes(&self, id: i64) -> Result<Option<RemovedNode>, StoreError> {
        self.write(|tx| {
            let node = tx
                .query_row(select_nodes!(" WHERE id = ?1"), [id], |r| self.node_row(r))
                .optional()
                .map_err(|e| self.err(e))?;
            let Some(node) = node else {
                return Ok(None);
            };
            let routes = self.routes_where(tx, "WHERE r.node_id = ?1", [id])?;
            // Routes go with it (ON DELETE CASCADE).
            tx.execute("DELETE FROM nodes WHERE id = ?1", [id])
                .map_err(|e| self.err(e))?;
            Ok(Some(RemovedNode { node, routes }))
        })
    }

    fn set_node_online(&self, id: i64, online: bool, now: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let since = (!online).then_some(now as i64);
            let n = tx
                .execute(
                    "UPDATE nodes SET offline_since = ?2 WHERE id = ?1",
                    params![id, since],
                )
                .map_err(|e| self.err(e))?;
            Ok(n == 1)
        })
    }

    fn remove_ephemeral_offline_before(&self, cutoff: u64) -> Result<Vec<RemovedNode>, StoreError> {
        self.write(|tx| {
            let e = |e| self.err(e);
            let gone: Vec<NodeRecord> = tx
                .prepare(select_nodes!(
                    " WHERE ephemeral = 1 AND offline_since < ?1 ORDER BY id"
                ))
                .and_then(|mut st| {
                    st.query_map([cutoff as i64], |r| self.node_row(r))?
                        .collect()
                })
                .map_err(e)?;
            let mut removed = Vec::with_capacity(gone.len());
            for node in gone {
                let routes = self.routes_where(tx, "WHERE r.node_id = ?1", [node.id])?;
                tx.execute("DELETE FROM nodes WHERE id = ?1", [node.id])
                    .map_err(e)?;
                removed.push(RemovedNode { node, routes });
            }
            Ok(removed)
        })
    }

    fn set_advertised_routes(&self, node_id: i64, routes: &[IpPrefix]) -> Result<(), StoreError> {
        self.write(|tx| {
            let e = |e| self.err(e);
            let known: bool = tx
                .prepare("SELECT 1 FROM nodes WHERE id = ?1")
                .and_then(|mut s| s.exists([node_id]))
                .map_err(e)?;
            if !known {
                return Err(StoreError::NoSuchNode(node_id));
            }
            let wanted_prefixes = advertised_set(node_id, routes)?;
            let wanted: Vec<String> = wanted_prefixes.iter().map(|p| p.to_string()).collect();
            let current: Vec<String> = tx
                .prepare("SELECT prefix FROM routes WHERE node_id = ?1")
                .and_then(|mut s| s.query_map([node_id], |r| r.get(0))?.collect())
                .map_err(e)?;
            for gone in current.iter().filter(|p| !wanted.contains(p)) {
                tx.execute(
                    "DELETE FROM routes WHERE node_id = ?1 AND prefix = ?2",
                    params![node_id, gone],
                )
                .map_err(e)?;
            }
            for (p, text) in wanted_prefixes.iter().zip(&wanted) {
                tx.execute(
                    "INSERT OR IGNORE INTO routes (node_id, prefix, approved, net, len)
                     VALUES (?1, ?2, 0, ?3, ?4)",
                    params![node_id, text, net_key(p.addr()), p.len()],
                )
                .map_err(e)?;
            }
            Ok(())
        })
    }

    fn set_route_approved(
        &self,
        node_id: i64,
        prefix: IpPrefix,
        approved: bool,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE routes SET approved = ?3,
                         status = CASE ?3 WHEN 1 THEN 'approved' ELSE 'pending' END,
                         approved_by = CASE ?3 WHEN 1 THEN 'operator' END,
                         is_primary = CASE ?3 WHEN 1 THEN is_primary ELSE 0 END,
                         conflict_prefix = NULL, conflict_node = NULL, conflict_cluster = NULL
                     WHERE node_id = ?1 AND prefix = ?2",
                    params![node_id, prefix.network().to_string(), approved],
                )
                .map_err(|e| self.err(e))?;
            Ok(n == 1)
        })
    }

    fn list_routes(&self) -> Result<Vec<RouteRecord>, StoreError> {
        let conn = self.lock_reader();
        self.routes_in(&conn)
    }

    fn change_routes(
        &self,
        plan: &mut dyn FnMut(&RouteTable) -> Result<Vec<RouteChange>, RouteError>,
    ) -> Result<(), RouteError> {
        self.write(|tx| {
            let e = |e| self.err(e);
            let nodes: Vec<NodeRecord> = tx
                .prepare(select_nodes!(" ORDER BY id"))
                .and_then(|mut s| s.query_map([], |r| self.node_row(r))?.collect())
                .map_err(e)?;
            let routes = self.routes_in(tx)?;
            let changes = plan(&RouteTable { nodes, routes })?;
            self.write_route_changes(tx, changes)
        })
    }

    fn change_routes_near(&self, plan: &mut NearPlan<'_>) -> Result<(), RouteError> {
        self.write(|tx| {
            let changes = plan(&mut TxRows { store: self, tx })?;
            self.write_route_changes(tx, changes)
        })
    }

    fn set_policy(&self, text: &str, now: u64) -> Result<u64, StoreError> {
        self.write(|tx| {
            tx.query_row(
                "INSERT INTO policy (id, text, version, updated) VALUES (1, ?1, 1, ?2)
                 ON CONFLICT (id) DO UPDATE SET text = excluded.text, version = version + 1, updated = excluded.updated
                 RETURNING version",
                params![text, now as i64],
                |r| get_u64(r, "version"),
            )
            .map_err(|e| self.err(e))
        })
    }

    fn policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT text, version, updated FROM policy WHERE id = 1",
                [],
                |r| {
                    Ok(PolicyRecord {
                        text: r.get("text")?,
                        version: get_u64(r, "version")?,
                        updated: get_u64(r, "updated")?,
                    })
                },
            )
            .optional()
        })
    }

    fn address_plan(&self) -> AddressPlan {
        self.plan
    }
}

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JoinKeyRecord> {
    let hash: Vec<u8> = r.get("hash")?;
    let hash: [u8; 32] = hash.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob)
    })?;
    let opt = |name: &str| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(name)?.map(|v| v as u64))
    };
    Ok(JoinKeyRecord {
        id: r.get("id")?,
        hash,
        created: get_u64(r, "created")?,
        expires: opt("expires")?,
        reusable: r.get("reusable")?,
        ephemeral: r.get("ephemeral")?,
        tags: split_tags(&r.get::<_, String>("tags")?),
        cluster: r.get("cluster")?,
        revoked: opt("revoked")?,
        uses: get_u64(r, "uses")?,
        last_used: opt("last_used")?,
    })
}

fn approver_word(a: Approver) -> &'static str {
    match a {
        Approver::Policy => "policy",
        Approver::Operator => "operator",
    }
}

fn get_u64(r: &rusqlite::Row<'_>, name: &str) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(name)? as u64)
}

fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Damage and non-databases get their own error; the rest keeps SQLite's.
fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Busy(path.to_path_buf())
        }
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Sqlite {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

/// Brings the schema to [`schema_version`]; each step is one transaction
/// that re-reads the version under the write lock, so two processes opening
/// a new file at once do not both run a step.
fn migrate(path: &Path, conn: &mut Connection, steps: &[&str]) -> Result<(), StoreError> {
    let err = |e| classify(path, e);
    let known = steps.len() as u32;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let app: i32 = tx
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(err)?;
        let version: u32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if app != APPLICATION_ID {
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(err)?;
            if app != 0 || version != 0 || tables != 0 {
                return Err(StoreError::Foreign(path.to_path_buf()));
            }
        }
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        if version == known {
            return Ok(());
        }
        tx.execute_batch(steps[version as usize]).map_err(err)?;
        if version as usize == ROUTE_KEYS_STEP {
            fill_route_keys(path, &tx)?;
        }
        if version == 0 {
            // The mesh's ULA /48: 40 random bits (RFC 4193 section 3.2).
            let mut id = [0u8; 5];
            ring::rand::SystemRandom::new()
                .fill(&mut id)
                .map_err(|_| StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: "the system random generator failed".into(),
                })?;
            tx.execute(
                "INSERT INTO meta (k, v) VALUES ('ula_global_id', ?1)",
                [hex5(&id)],
            )
            .map_err(err)?;
            tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}"))
                .map_err(err)?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
}

/// Sets `net` and `len` of the routes stored before they existed.
fn fill_route_keys(path: &Path, tx: &Connection) -> Result<(), StoreError> {
    let err = |e| classify(path, e);
    let rows: Vec<(i64, String)> = tx
        .prepare("SELECT node_id, prefix FROM routes WHERE net IS NULL")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(err)?;
    for (node_id, text) in rows {
        let prefix: IpPrefix = text.parse().map_err(|e| StoreError::BadRow {
            path: path.to_path_buf(),
            what: "route",
            detail: format!("{text}: {e}"),
        })?;
        tx.execute(
            "UPDATE routes SET net = ?3, len = ?4 WHERE node_id = ?1 AND prefix = ?2",
            params![
                node_id,
                text,
                net_key(prefix.network().addr()),
                prefix.len()
            ],
        )
        .map_err(err)?;
    }
    Ok(())
}

fn hex5(b: &[u8; 5]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ula_global_id(path: &Path, conn: &Connection) -> Result<[u8; 5], StoreError> {
    let v: String = conn
        .query_row("SELECT v FROM meta WHERE k = 'ula_global_id'", [], |r| {
            r.get(0)
        })
        .map_err(|e| classify(path, e))?;
    let bad = || StoreError::BadRow {
        path: path.to_path_buf(),
        what: "ULA global id",
        detail: v.clone(),
    };
    if v.len() != 10 {
        return Err(bad());
    }
    let mut out = [0u8; 5];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("meshvpn-store-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The migration path: a file at the current version with data, opened
    /// by a build that knows one more step, is brought forward and keeps its
    /// data; the build that does not know that step then refuses it.
    #[test]
    fn a_later_step_migrates_an_existing_file_and_keeps_its_data() {
        let dir = temp("migrate");
        let path = dir.join("c.db");
        let store = SqliteStore::open(&path, &StoreConfig::default()).unwrap();
        assert_eq!(store.set_policy("p1", 5).unwrap(), 1);
        drop(store);
        let mut next = MIGRATIONS.to_vec();
        next.push("ALTER TABLE policy ADD COLUMN author TEXT NOT NULL DEFAULT 'unknown';");
        let mut conn = Connection::open(&path).unwrap();
        migrate(&path, &mut conn, &next).unwrap();
        migrate(&path, &mut conn, &next).unwrap(); // idempotent
        let (text, author, version): (String, String, u32) = conn
            .query_row(
                "SELECT text, author, (SELECT user_version FROM pragma_user_version) FROM policy",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let known = schema_version();
        assert_eq!(
            (text.as_str(), author.as_str(), version),
            ("p1", "unknown", known + 1)
        );
        drop(conn);
        match SqliteStore::open(&path, &StoreConfig::default()) {
            Err(StoreError::TooNew {
                found, known: k, ..
            }) if found == known + 1 && k == known => {}
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database written by the first schema (before clusters): a key, a
    /// node with an approved route and a policy, written with that
    /// schema's own SQL. Opening it migrates it; everything is kept, the
    /// old key and node have no cluster, and a key with a cluster then
    /// labels the nodes it registers.
    #[test]
    fn a_version_1_database_gains_clusters_and_route_status_and_keeps_its_data() {
        let dir = temp("v1");
        let path = dir.join("c.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate(&path, &mut conn, &MIGRATIONS[..1]).unwrap();
        conn.execute_batch(
            "INSERT INTO join_keys (id, hash, created, expires, reusable, ephemeral, tags, revoked, uses, last_used)
             VALUES ('00000000000000aa', zeroblob(32), 10, NULL, 1, 0, 'tag:k3s', NULL, 1, 11);
             INSERT INTO nodes (public_key, name, ipv4, ipv6, tags, ephemeral, join_key, created, updated, offline_since)
             VALUES (zeroblob(32), 'old-node', 1681915905, zeroblob(16), 'tag:k3s', 0, '00000000000000aa', 11, 11, NULL);
             INSERT INTO routes (node_id, prefix, approved) VALUES (1, '10.42.0.0/24', 1);
             INSERT INTO policy (id, text, version, updated) VALUES (1, '{}', 3, 12);",
        )
        .unwrap();
        let v: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1);
        drop(conn);

        let store = SqliteStore::open(&path, &StoreConfig::default()).unwrap();
        let keys = store.list_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            (
                keys[0].id.as_str(),
                keys[0].uses,
                keys[0].cluster.as_deref()
            ),
            ("00000000000000aa", 1, None)
        );
        let nodes = store.list_nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            (nodes[0].name.as_str(), nodes[0].cluster.as_deref()),
            ("old-node", None)
        );
        assert_eq!(nodes[0].tags, ["tag:k3s"]);
        let routes = store.list_routes().unwrap();
        assert_eq!(routes.len(), 1);
        assert!(routes[0].approved);
        assert_eq!(
            (
                &routes[0].status,
                routes[0].approved_by,
                routes[0].node_name.as_str()
            ),
            (&RouteStatus::Approved, Some(Approver::Operator), "old-node")
        );
        assert_eq!(store.policy().unwrap().unwrap().version, 3);
        store.integrity_check().unwrap();
        // The route got its overlap key (schema 4) from its text.
        let (net, len): (Vec<u8>, u8) = Connection::open(&path)
            .unwrap()
            .query_row("SELECT net, len FROM routes", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((net, len), (vec![4, 10, 42, 0, 0], 24));
        // Schema 5: the approved route stands by until an election makes
        // it primary; the flag is written and read back.
        assert_eq!(routes[0].role(), crate::routes::STANDBY);
        store
            .change_routes(&mut |t| Ok(crate::routes::elect(&t.routes, &|_| true)))
            .unwrap();
        assert_eq!(
            store.list_routes().unwrap()[0].role(),
            crate::routes::PRIMARY
        );

        let key = crate::keys::create(
            &store,
            &crate::keys::KeyOptions {
                cluster: Some("k3s-west".into()),
                ..Default::default()
            },
            20,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let req = NodeRequest {
            public_key: meshvpn_engine::PrivateKey::generate().public_key(),
            hostname: "new-node".into(),
        };
        let n = crate::keys::redeem(&store, &key.text, &req, 21).unwrap();
        assert_eq!(n.cluster.as_deref(), Some("k3s-west"));
        assert_eq!(
            store
                .key(&key.record.id)
                .unwrap()
                .unwrap()
                .cluster
                .as_deref(),
            Some("k3s-west")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_writer_blocked_past_the_busy_timeout_gets_a_clear_error() {
        let dir = temp("busy");
        let path = dir.join("c.db");
        let config = StoreConfig {
            busy_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        let store = SqliteStore::open(&path, &config).unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let e = store.set_policy("x", 1).unwrap_err();
        assert!(matches!(e, StoreError::Busy(_)), "{e}");
        assert!(e.to_string().contains("stayed locked"), "{e}");
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(store.set_policy("x", 1).unwrap(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
