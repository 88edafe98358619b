//! `meshvpn control keys create|list|revoke`, `nodes list|remove`,
//! `routes list|approve` and `policy set|get`: the control server's join
//! keys, nodes, routes and policy, read and changed in its database file
//! directly (`--db PATH`, or `control.db` in `--state-dir`); `meshvpn
//! control serve`: the control server itself.
//!
//! The server serves the same file while an operator runs these: SQLite's
//! file locks let several processes share it (each change is one write
//! transaction that waits for the others, see meshvpn_control::store), so
//! there is no "stop the server first".
//!
//! A join key's text is printed once, on stdout alone (so `> key-file`
//! captures just the key); the database keeps only its hash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use meshvpn_control::admin;
use meshvpn_control::keys::{self, KeyOptions};
use meshvpn_control::routes::{cluster_name, Approver, RouteChange, RouteStatus};
use meshvpn_control::server::{self, ControlServer, ControlServerConfig};
use meshvpn_control::store::{SqliteStore, Store, StoreConfig};
use meshvpn_control::Policy;
use meshvpn_engine::supervisor::{ServerConfig, TunnelServer};

use crate::persist::DEFAULT_STATE_DIR;
use crate::CliResult;

/// The database's file name inside `--state-dir`.
pub const DB_FILE: &str = "control.db";

#[derive(Args)]
#[command(
    long_about = "The control server's join keys, nodes, routes and policy, changed in its database directly.\n\n\
        Safe while the control server runs on the same database: SQLite's locking serialises \
        the writes of every process that has the file open."
)]
pub struct ControlArgs {
    /// The control database file [default: STATE_DIR/control.db].
    #[arg(long, value_name = "PATH", global = true, env = "MESHVPN_CONTROL_DB")]
    db: Option<PathBuf>,
    /// The directory that holds control.db.
    #[arg(long, value_name = "DIR", global = true, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: ControlCommand,
}

#[derive(Subcommand)]
enum ControlCommand {
    /// Join keys: what a node presents the first time it joins.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Registered nodes and their mesh addresses.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Routes the nodes advertise (pod CIDRs, subnets): approved, pending or refused.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// The ACL policy (JSON, Tailscale's shape): tagOwners, acls, autoApprovers.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the control server: nodes register over the control protocol
    /// (`/v1-meshvpn/control`) and get the network map; with --relay the
    /// same port also relays WireGuard between nodes.
    Serve(ServeArgs),
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// List routes: node, cluster, prefix, status, and why.
    List,
    /// Approve a route a node advertises; refused when it overlaps an
    /// approved route of another cluster.
    Approve {
        /// The node: id, name or public key.
        #[arg(value_name = "NODE")]
        node: String,
        /// The prefix as the node advertises it (10.42.1.0/24).
        #[arg(value_name = "PREFIX")]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate FILE and make it the policy (a new version); on an error
    /// nothing is stored. Routes are re-examined for auto-approval.
    Set {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the policy as set (its version on stderr).
    Get,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTPS), e.g. 0.0.0.0:8443.
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// PEM certificate chain of the server.
    #[arg(long, value_name = "FILE", required_unless_present = "plain")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the server.
    #[arg(long, value_name = "FILE", required_unless_present = "plain")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP without TLS (tests on loopback only: a node's key
    /// proof is then not bound to a TLS session).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    plain: bool,
    /// Also serve the WireGuard relay on this port (`/v1-meshvpn/relay`).
    #[arg(long)]
    relay: bool,
    /// TLS and HTTP handshakes in progress at once from one source address.
    #[arg(long, value_name = "N", default_value_t = meshvpn_engine::supervisor::DEFAULT_MAX_HANDSHAKES_PER_SOURCE)]
    max_handshakes_per_source: usize,
    #[command(flatten)]
    control: ControlServerArgs,
}

/// The control server's own options, the same flags in `meshvpn control
/// serve` and `meshvpn tunnel serve --control-db` (where clap requires
/// `--control-db` with any of them): one definition, one builder
/// ([`ControlServerArgs::start`]).
#[derive(Args, Debug)]
#[group(id = CONTROL_SERVER_ARGS, multiple = true)]
pub struct ControlServerArgs {
    /// The prefix new nodes get their IPv4 address from (registered nodes
    /// keep theirs when it changes).
    #[arg(long, value_name = "PREFIX", default_value = meshvpn_control::node::DEFAULT_IPV4_PREFIX)]
    ipv4_prefix: meshvpn_engine::IpPrefix,
    /// An ACL policy file (JSON, see `meshvpn control policy set`) made the
    /// policy at start when it differs from the stored one; checked first:
    /// an error names its line and nothing is stored. Without it the stored
    /// policy stays (none: every node may reach every other).
    #[arg(long, value_name = "FILE")]
    policy_file: Option<PathBuf>,
    /// The relay URL sent to nodes in their network map, for peers they
    /// cannot reach over UDP, e.g. wss://server:6443/v1-meshvpn/relay (this
    /// server's own with --relay). Without it nodes use UDP only.
    #[arg(long, value_name = "URL")]
    map_relay_url: Option<String>,
    /// Control sessions at once (one per node; each a thread and three
    /// open files); more are answered 503.
    #[arg(long, value_name = "N", default_value_t = server::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Control sessions at once from one source address (nodes behind one
    /// NAT); more from it are answered 503.
    #[arg(long, value_name = "N", default_value_t = server::DEFAULT_MAX_SESSIONS_PER_SOURCE)]
    max_sessions_per_source: usize,
    /// How long an ephemeral node stays after it disconnects: 90s, 30m, 24h.
    #[arg(long, value_name = "DURATION", value_parser = keys::parse_duration,
          default_value = "30m")]
    ephemeral_timeout: Duration,
}

/// The clap group id of [`ControlServerArgs`]' flags.
pub const CONTROL_SERVER_ARGS: &str = "control_server_args";

impl ControlServerArgs {
    /// Opens the database at `path` (created 0600 when missing), sets
    /// `--policy-file` if it differs from the stored policy, and starts the
    /// control server; serve it by putting [`ControlServer::route`] in a
    /// tunnel server's `extra` routes.
    pub fn start(&self, path: &Path) -> Result<ControlServer, String> {
        // A policy that does not load is refused before the database is
        // touched, as `policy set` does.
        let policy = match &self.policy_file {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("--policy-file {}: {e}", file.display()))?;
                Policy::parse(&text).map_err(|e| {
                    format!("--policy-file {}: {e}; nothing was stored", file.display())
                })?;
                Some(text)
            }
            None => None,
        };
        let store = SqliteStore::open(
            path,
            &StoreConfig {
                create: true,
                ipv4_prefix: self.ipv4_prefix,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        if let Some(text) = policy {
            // Only a change makes a new version: restarting with the same
            // file does not bump it (nor wake every node).
            if store
                .policy()
                .map_err(|e| e.to_string())?
                .is_none_or(|p| p.text != text)
            {
                let (version, changes) =
                    admin::set_policy(&store, &text, unix_now()).map_err(|e| e.to_string())?;
                let file = self.policy_file.as_ref().map(|f| f.display().to_string());
                tracing::info!(version, file, "policy set from --policy-file");
                for c in &changes {
                    tracing::info!("{}", change_text(c));
                }
            }
        }
        ControlServer::start(
            Arc::new(store),
            ControlServerConfig {
                max_sessions: self.max_sessions,
                max_sessions_per_source: self.max_sessions_per_source,
                ephemeral_timeout: self.ephemeral_timeout,
                relay_url: self.map_relay_url.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| format!("cannot start the control server: {e}"))
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a join key and print it (once: only its hash is stored).
    Create {
        /// Usable by any number of nodes (default: single-use).
        #[arg(long)]
        reusable: bool,
        /// Nodes that join with it are removed some time after they disconnect.
        #[arg(long)]
        ephemeral: bool,
        /// Stops working after this long: 90s, 30m, 24h, 7d (default: never).
        #[arg(long, value_name = "DURATION", value_parser = keys::parse_duration)]
        expiry: Option<Duration>,
        /// Tags given to the nodes that join with it: tag:k3s,tag:cluster-a.
        #[arg(long, value_name = "TAGS", value_delimiter = ',')]
        tags: Vec<String>,
        /// The cluster the nodes that join with it belong to (k3s-east): routes
        /// of nodes in different clusters must not overlap.
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
    /// List join keys: id, state, uses, expiry, flags, tags.
    List,
    /// Revoke a join key (by its id or its full text); nodes already joined stay.
    Revoke {
        #[arg(value_name = "ID")]
        key: String,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// List nodes: id, name, addresses, tags, public key.
    List,
    /// Remove a node (by id, name or public key), with its routes.
    Remove {
        #[arg(value_name = "NODE")]
        node: String,
    },
}

pub fn run(args: ControlArgs) -> CliResult {
    let path = args
        .db
        .clone()
        .unwrap_or_else(|| args.state_dir.join(DB_FILE));
    // The commands an operator may run on a new mesh make the database.
    let create = matches!(
        args.command,
        ControlCommand::Keys(KeysCommand::Create { .. })
            | ControlCommand::Policy(PolicyCommand::Set { .. })
            | ControlCommand::Serve(_)
    );
    // A policy that does not load is refused before the database is
    // touched: nothing stored, nothing created.
    let new_policy = match &args.command {
        ControlCommand::Policy(PolicyCommand::Set { file }) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            Policy::parse(&text)
                .map_err(|e| format!("{}: {e}; nothing was stored", file.display()))?;
            Some(text)
        }
        _ => None,
    };
    if create && args.db.is_none() {
        std::fs::create_dir_all(&args.state_dir).map_err(|e| {
            format!(
                "cannot create the state directory {}: {e}",
                args.state_dir.display()
            )
        })?;
    }
    if let ControlCommand::Serve(a) = args.command {
        return serve(&path, a);
    }
    let config = StoreConfig {
        create,
        ..Default::default()
    };
    let store = SqliteStore::open(&path, &config)?;
    let now = unix_now();
    match args.command {
        ControlCommand::Serve(_) => unreachable!("served above"),
        ControlCommand::Keys(KeysCommand::Create {
            reusable,
            ephemeral,
            expiry,
            tags,
            cluster,
        }) => {
            let opts = KeyOptions {
                reusable,
                ephemeral,
                expiry,
                tags,
                cluster,
            };
            let key = keys::create(&store, &opts, now, &ring::rand::SystemRandom::new())?;
            let r = &key.record;
            eprintln!(
                "created join key {} ({}, {}{}{}{}); it is shown only now:",
                r.id,
                if r.reusable { "reusable" } else { "single-use" },
                r.expires.map_or("never expires".to_string(), |e| format!(
                    "expires {}",
                    keys::format_time(e)
                )),
                if r.ephemeral { ", ephemeral nodes" } else { "" },
                if r.tags.is_empty() {
                    String::new()
                } else {
                    format!(", tags {}", r.tags.join(","))
                },
                r.cluster
                    .as_ref()
                    .map_or(String::new(), |c| format!(", cluster {c}")),
            );
            println!("{}", key.text.as_str());
        }
        ControlCommand::Keys(KeysCommand::List) => {
            let list = store.list_keys()?;
            println!(
                "{:<16}  {:<7}  {:>4}  {:<20}  {:<20}  {:<19}  {:<16}  TAGS",
                "ID", "STATE", "USES", "CREATED", "EXPIRES", "FLAGS", "CLUSTER"
            );
            for k in list {
                let mut flags = vec![if k.reusable { "reusable" } else { "single-use" }];
                if k.ephemeral {
                    flags.push("ephemeral");
                }
                println!(
                    "{:<16}  {:<7}  {:>4}  {:<20}  {:<20}  {:<19}  {:<16}  {}",
                    k.id,
                    k.state(now).to_string(),
                    k.uses,
                    keys::format_time(k.created),
                    k.expires.map_or("never".to_string(), keys::format_time),
                    flags.join(","),
                    k.cluster.as_deref().unwrap_or("-"),
                    if k.tags.is_empty() {
                        "-".to_string()
                    } else {
                        k.tags.join(",")
                    },
                );
            }
        }
        ControlCommand::Keys(KeysCommand::Revoke { key }) => {
            // The full text is accepted too (someone pasting the key they
            // found in a log); only its id is used.
            let id = match keys::parse(&key) {
                Ok(parsed) => parsed.id,
                Err(_) => key.trim().to_string(),
            };
            if !store.revoke_key(&id, now)? {
                return Err(format!(
                    "no join key {id} in {} (see `meshvpn control keys list`)",
                    path.display()
                )
                .into());
            }
            println!("revoked join key {id}");
        }
        ControlCommand::Nodes(NodesCommand::List) => {
            let nodes = store.list_nodes()?;
            println!(
                "{:>4}  {:<20}  {:<15}  {:<28}  {:<9}  {:<44}  {:<28}  {:<16}  TAGS",
                "ID", "NAME", "IPV4", "IPV6", "EPHEMERAL", "PUBLIC KEY", "CONNECTED", "CLUSTER"
            );
            for n in nodes {
                println!(
                    "{:>4}  {:<20}  {:<15}  {:<28}  {:<9}  {:<44}  {:<28}  {:<16}  {}",
                    n.id,
                    n.name,
                    n.ipv4.to_string(),
                    n.ipv6.to_string(),
                    if n.ephemeral { "yes" } else { "no" },
                    n.public_key.to_base64(),
                    n.offline_since.map_or("yes".to_string(), |t| format!(
                        "no, since {}",
                        keys::format_time(t)
                    )),
                    n.cluster.as_deref().unwrap_or("-"),
                    if n.tags.is_empty() {
                        "-".to_string()
                    } else {
                        n.tags.join(",")
                    },
                );
            }
        }
        ControlCommand::Nodes(NodesCommand::Remove { node }) => {
            let removed = admin::remove_node(&store, &node, now)
                .map_err(|e| format!("{e} in {}", path.display()))?;
            let n = &removed.node;
            println!("removed node {} ({}, {}, {})", n.id, n.name, n.ipv4, n.ipv6);
            match removed.freed {
                Ok(changes) => report_changes(&changes),
                Err(e) => eprintln!("warning: routes were not re-examined: {e}"),
            }
        }
        ControlCommand::Routes(RoutesCommand::List) => {
            let list = store.list_routes()?;
            println!(
                "{:>4}  {:<20}  {:<16}  {:<18}  {:<8}  {:<7}  REASON",
                "ID", "NODE", "CLUSTER", "PREFIX", "STATUS", "ROLE"
            );
            for r in list {
                let reason = match (&r.status, r.approved_by) {
                    (RouteStatus::Approved, Some(Approver::Policy)) => {
                        "auto-approved by the policy's autoApprovers".to_string()
                    }
                    (RouteStatus::Approved, _) => "approved by the operator".to_string(),
                    (RouteStatus::Pending, _) => format!(
                        "waiting for `meshvpn control routes approve {} {}`",
                        r.node_name, r.prefix
                    ),
                    (RouteStatus::Refused(c), _) => c.to_string(),
                };
                let role = match r.role() {
                    "" => "-",
                    role => role,
                };
                println!(
                    "{:>4}  {:<20}  {:<16}  {:<18}  {:<8}  {:<7}  {}",
                    r.node_id,
                    r.node_name,
                    cluster_name(r.cluster.as_deref()),
                    r.prefix.to_string(),
                    r.status.word(),
                    role,
                    reason,
                );
            }
        }
        ControlCommand::Routes(RoutesCommand::Approve { node, prefix }) => {
            let r = admin::approve_route(&store, &node, &prefix, now).map_err(|e| match e {
                admin::AdminError::NoSuchNode(_) => format!("{e} in {}", path.display()),
                e => e.to_string(),
            })?;
            println!(
                "approved {} for node {} (cluster {})",
                r.prefix,
                r.node_name,
                cluster_name(r.cluster.as_deref())
            );
        }
        ControlCommand::Policy(PolicyCommand::Set { file }) => {
            let text = new_policy.expect("read above");
            let (version, changes) = admin::set_policy(&store, &text, now)?;
            println!("policy version {version} set from {}", file.display());
            report_changes(&changes);
        }
        ControlCommand::Policy(PolicyCommand::Get) => match store.policy()? {
            Some(p) => {
                eprintln!(
                    "policy version {}, set {}",
                    p.version,
                    keys::format_time(p.updated)
                );
                print!("{}", p.text);
            }
            None => eprintln!("no policy set: every node may reach every other (allow-all)"),
        },
    }
    Ok(())
}

/// Routes whose status a re-examination changed, one line each.
fn report_changes(changes: &[RouteChange]) {
    for c in changes {
        println!("{}", change_text(c));
    }
}

fn change_text(c: &RouteChange) -> String {
    match c {
        RouteChange::Set(r) => format!(
            "route {} of node {} is now {}",
            r.prefix, r.node_name, r.status
        ),
        RouteChange::Remove { node_id, prefix } => {
            format!("route {prefix} of node {node_id} was removed")
        }
    }
}

/// Serves until the process ends.
fn serve(path: &Path, a: ServeArgs) -> CliResult {
    let tls = if a.plain {
        None
    } else {
        let read = |p: &Option<PathBuf>| {
            let p = p.as_ref().ok_or("--tls-cert and --tls-key are required")?;
            std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
        };
        Some(
            meshvpn_engine::ws::tls::server_config(
                &read(&a.tls_cert)?,
                &read(&a.tls_key)?,
                None,
                false,
            )
            .map_err(|e| e.to_string())?,
        )
    };
    let control = a.control.start(path)?;
    // No agent credentials: the tunnel path refuses everyone; this port
    // serves the control protocol (and the relay with --relay).
    let mut config = ServerConfig::new(
        meshvpn_engine::supervisor::K3S_PATH,
        tls,
        meshvpn_engine::supervisor::ServerAuth::default(),
    );
    config.max_handshakes_per_source = a.max_handshakes_per_source;
    config.extra.push(control.route());
    if a.relay {
        config.relay = Some(meshvpn_engine::relay::RelayServerConfig::default());
    }
    let server = TunnelServer::bind(a.listen, config).map_err(|e| e.to_string())?;
    tracing::info!(addr = %server.local_addr(), relay = a.relay, "control server listening");
    print_listening(server.local_addr());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `listening on ADDR` on stdout, flushed: for scripts and tests that
/// asked for port 0.
pub fn print_listening(addr: std::net::SocketAddr) {
    use std::io::Write as _;
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
