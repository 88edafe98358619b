//! `meshvpn up --control URL --join-key-file F`: joins this host to a mesh
//! run by a control server (`meshvpn control serve`) and keeps it there.
//!
//! ```text
//!   state dir: node.key (WireGuard key) ─┐
//!              node.json (registered) ───┼─► ControlClient (reconnects, backoff)
//!   join key file (first join only) ─────┘        │ NodeState: full map, then deltas
//!                                                 ▼
//!   main loop: plan (meshvpn_control::apply) ─ diff ─► engine peers (add/update/remove)
//!                                            └─ route diff ─► `ip route` on the TUN
//!              status file ◄── engine per-peer stats + the map
//! ```
//!
//! The WireGuard key lives in the state directory, so a restart registers
//! as the same node (the server keeps its id, name and addresses) without
//! the join key: once `node.json` records the registration, the node key's
//! proof is the credential, as a Tailscale node key is, and a single-use
//! join key is not needed again.
//!
//! The data plane does not depend on the control server: while it is away
//! the engine keeps every peer it has, the client reconnects with backoff
//! and the first full map after it returns is diffed against what is
//! applied, so only what changed meanwhile is touched. A refusal retrying
//! cannot fix (a bad join key, the node removed) ends `meshvpn up` with the
//! server's reason and status 1.
//!
//! Runs in the foreground (for systemd, a container, or `&`); `meshvpn up
//! --status` prints what the running one wrote to STATE_DIR/status.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use meshvpn_control::apply::{self, Change, Plan, PlanOptions, MESH_KEEPALIVE};
use meshvpn_control::client::{
    ClientError, ClientStatus, ControlClient, ControlClientConfig, JoinRequest, NodeState,
};
use meshvpn_control::proto::ErrorCode;
use meshvpn_engine::config::DEFAULT_MTU;
use meshvpn_engine::filter::FilterRules;
use meshvpn_engine::relay::RelayConfig;
use meshvpn_engine::ws::tls;
use meshvpn_engine::{
    Config, Engine, InterfaceConfig, IpPrefix, PeerConfig, PeerUpdate, PrivateKey, UapiServer,
};
use nix::sys::signal::{SigSet, Signal};
use zeroize::Zeroizing;

use crate::persist::{ip, write_atomic, DEFAULT_STATE_DIR};
use crate::CliResult;

/// The node's WireGuard private key (base64, mode 0600) in the state dir.
pub const KEY_FILE: &str = "node.key";
/// The registration this node holds (node id, name, addresses, server).
pub const NODE_FILE: &str = "node.json";
/// What `meshvpn up --status` prints, rewritten by the running node.
pub const STATUS_FILE: &str = "status";
/// The TUN interface's default name.
pub const DEFAULT_INTERFACE: &str = "meshvpn0";
/// How often the main loop looks at the map, the engine and the host's
/// addresses when nothing wakes it sooner.
const TICK: Duration = Duration::from_millis(200);
/// How often the host's addresses are re-read for the endpoints reported.
const ENDPOINTS_EVERY: Duration = Duration::from_secs(5);

#[derive(Args)]
#[command(
    long_about = "Join this host to a mesh run by a control server and stay in it.\n\n\
        The first run needs a join key (`meshvpn control keys create` on the server); it is \
        used once: the node's WireGuard key, kept in --state-dir, identifies it afterwards, so \
        a restart rejoins as the same node with the same addresses. Creates the TUN interface, \
        puts the node's mesh addresses on it and a route per peer (and per accepted route). \
        Keeps running when the control server is down: existing peers keep working. \
        Runs in the foreground."
)]
pub struct UpArgs {
    /// The control server, e.g. wss://server:8443/v1-meshvpn/control (ws:// on a test network).
    #[arg(long, value_name = "URL", required_unless_present = "status")]
    control: Option<String>,
    /// File holding the join key (needed for the first join only).
    #[arg(long, value_name = "FILE")]
    join_key_file: Option<PathBuf>,
    /// Routes this node carries traffic for, e.g. its pod CIDR: 10.42.1.0/24,...
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    advertise_routes: Vec<IpPrefix>,
    /// Route other nodes' approved routes through the mesh.
    #[arg(long)]
    accept_routes: bool,
    /// Tags to register with (each must be granted by the join key): tag:k3s,...
    #[arg(long, value_name = "TAGS", value_delimiter = ',')]
    tags: Vec<String>,
    /// CA (PEM) that signed the control server's certificate (required for wss://).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Where the node's key, registration and status live.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The TUN interface to create.
    #[arg(long, value_name = "IFNAME", default_value = DEFAULT_INTERFACE)]
    interface: String,
    /// UDP port for WireGuard (0: any free port).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    port: u16,
    /// The name to register with [default: the host name].
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Print the running node's status (from --state-dir) and exit.
    #[arg(long)]
    status: bool,
}

/// The registration kept in the state dir.
struct Registered {
    control: String,
    node_id: i64,
}

fn read_registered(path: &Path) -> Option<Registered> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(Registered {
        control: v.get("control")?.as_str()?.to_owned(),
        node_id: v.get("node_id")?.as_i64()?,
    })
}

/// The node key from the state dir, made (mode 0600) on the first run.
fn node_key(dir: &Path) -> Result<PrivateKey, String> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            PrivateKey::from_base64(text.trim())
                .map_err(|e| format!("{}: not a WireGuard private key: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            let text = Zeroizing::new(key.to_base64());
            write_atomic(&path, text.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn hostname(args: &UpArgs) -> String {
    args.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".into())
    })
}

/// Where peers may reach this node over UDP: every address of the host but
/// loopback, link-local and the mesh interface's own, with the engine's port.
fn host_endpoints(ifname: &str, port: u16) -> Vec<SocketAddr> {
    let mut out = crate::netwatch::host_addresses(ifname);
    // IPv4 first: what most underlays route.
    out.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    out.truncate(meshvpn_control::proto::MAX_ENDPOINTS - 1);
    out.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Why the server's refusal ended the node, with what to do next.
fn fatal_message(e: &ClientError, url: &str, state_dir: &Path) -> String {
    let hint = match e {
        ClientError::Refused {
            code: ErrorCode::Removed | ErrorCode::NodeUnknown,
            ..
        } => format!(
            " (the registration in {} was dropped: run again with a new --join-key-file to rejoin)",
            state_dir.join(NODE_FILE).display()
        ),
        _ => String::new(),
    };
    let what = match e {
        ClientError::Refused {
            code: ErrorCode::Removed,
            ..
        } => "left the mesh at",
        _ => "cannot join the mesh at",
    };
    format!("{what} {url}: {e}{hint}")
}

pub fn run(args: UpArgs) -> CliResult {
    if args.status {
        let path = args.state_dir.join(STATUS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "no status at {} ({e}): is `meshvpn up --state-dir {}` running?",
                path.display(),
                args.state_dir.display()
            )
        })?;
        print!("{text}");
        return Ok(());
    }
    let url = args.control.clone().ok_or("--control URL is required")?;
    crate::daemon::check_name(&args.interface)?;
    std::fs::create_dir_all(&args.state_dir).map_err(|e| {
        format!(
            "cannot create the state directory {}: {e}",
            args.state_dir.display()
        )
    })?;
    let node_file = args.state_dir.join(NODE_FILE);
    let registered = read_registered(&node_file).filter(|r| r.control == url);
    let join_key = match (&registered, &args.join_key_file) {
        (Some(_), _) => None,
        (None, Some(f)) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("--join-key-file {}: {e}", f.display()))?,
            );
            // A malformed key is refused here, without asking the server.
            meshvpn_control::keys::parse(&text)
                .map_err(|e| format!("cannot join the mesh at {url}: {e}"))?;
            Some(Zeroizing::new(text.trim().to_owned()))
        }
        (None, None) => {
            return Err(format!(
                "this node has not joined {url} yet: give it a join key with --join-key-file \
                 (create one with `meshvpn control keys create`)"
            )
            .into())
        }
    };
    let tls = match &args.ca {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
            Some(tls::client_config(&pem, None).map_err(|e| format!("--ca: {e}"))?)
        }
        None if url.starts_with("wss://") => {
            return Err(
                "--ca is required for a wss:// control server (it is always verified)".into(),
            )
        }
        None => None,
    };
    let key = node_key(&args.state_dir)?;
    if let Some(r) = &registered {
        println!("rejoining {url} as node {} (registered before)", r.node_id);
    }

    // Blocked before any thread starts, so only the sigwait thread gets them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block()?;

    let name = args.interface.as_str();
    let tun = crate::daemon::create_tun(name)?;
    let config = Config {
        interface: InterfaceConfig {
            private_key: Some(key.clone()),
            listen_port: Some(args.port),
            mtu: Some(DEFAULT_MTU),
            ..Default::default()
        },
        peers: Vec::new(),
    };
    let engine = Arc::new(Engine::new(&config).map_err(|e| format!("cannot start: {e}"))?);
    engine
        .attach_tun(tun)
        .map_err(|e| format!("cannot start the TUN reader: {e}"))?;
    ip(&["link", "set", name, "up"])?;
    // `wg show` and `meshvpn status -i IFNAME` read peers and paths here.
    let uapi = UapiServer::start(engine.clone(), name).map_err(|e| {
        format!(
            "cannot listen on {}: {e}",
            UapiServer::socket_path(name).display()
        )
    })?;

    let mut endpoints = host_endpoints(name, engine.listen_port());
    let request = JoinRequest {
        join_key,
        hostname: hostname(&args),
        routes: args.advertise_routes.clone(),
        tags: args.tags.clone(),
        endpoints: endpoints.clone(),
    };
    let mut client_config = ControlClientConfig::new(url.clone(), request);
    client_config.tls = tls.clone();
    let secret = engine
        .relay_inbox()
        .static_secret()
        .ok_or("the engine has no private key")?;
    let mut client = ControlClient::start(client_config.clone(), secret.clone())?;
    // A reused single-use key may be this node's own: a run that ended
    // after the server registered it but before node.json was written.
    // The server knows its node key then, so the proof alone rejoins it.
    let mut refused_key: Option<ClientError> = None;

    let (sig_tx, sig_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("meshvpn-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = sig_tx.send(sig);
            }
        })?;

    let mut node = Node {
        engine: engine.clone(),
        ifname: name.to_owned(),
        url: url.clone(),
        options: PlanOptions {
            accept_routes: args.accept_routes,
        },
        applied: Plan::default(),
        routes: BTreeSet::new(),
        addressed: false,
        seen_map: None,
        filter: None,
        seen_sessions: 0,
        relay_started: false,
        relay_config: Box::new(move |url| RelayConfig::new(url, tls.clone())),
        status_path: args.state_dir.join(STATUS_FILE),
        node_file: node_file.clone(),
        wrote_node: registered.is_some(),
        last_status: String::new(),
    };
    let mut next_endpoints = Instant::now() + ENDPOINTS_EVERY;
    let result = loop {
        if let Ok(sig) = sig_rx.try_recv() {
            tracing::info!("shutting down: got {sig}");
            break Ok(());
        }
        if engine.device_gone() {
            break Err(format!("the interface {name} was deleted"));
        }
        let (state, status) = (client.state(), client.status());
        if let Some(e) = &status.fatal {
            let reused = matches!(
                e,
                ClientError::Refused {
                    code: ErrorCode::KeyReused,
                    ..
                }
            );
            if reused && !node.wrote_node && refused_key.is_none() {
                refused_key = Some(e.clone());
                let mut retry = client_config.clone();
                retry.request.join_key = None;
                client = ControlClient::start(retry, secret.clone())?;
                continue;
            }
            // Not known by its key either: the key's refusal is the answer.
            let e = match (&refused_key, e) {
                (
                    Some(first),
                    ClientError::Refused {
                        code: ErrorCode::NodeUnknown,
                        ..
                    },
                ) => first,
                _ => e,
            };
            if matches!(
                e,
                ClientError::Refused {
                    code: ErrorCode::Removed | ErrorCode::NodeUnknown,
                    ..
                }
            ) {
                let _ = std::fs::remove_file(&node_file);
            }
            break Err(fatal_message(e, &url, &args.state_dir));
        }
        if let Err(e) = node.step(&state, status.sessions) {
            tracing::warn!("applying the map: {e}");
        }
        if status.connected
            && status.sessions != node.seen_sessions
            // A new session registered with the endpoints of the start;
            // tell it what they are now.
            && client.update_endpoints(endpoints.clone())
        {
            node.seen_sessions = status.sessions;
        }
        if Instant::now() >= next_endpoints {
            next_endpoints = Instant::now() + ENDPOINTS_EVERY;
            let now = host_endpoints(name, engine.listen_port());
            if now != endpoints && client.update_endpoints(now.clone()) {
                endpoints = now;
            }
        }
        node.write_status(&state, &status);
        let updates = state.updates;
        let sessions = status.sessions;
        client.wait(TICK, |s, st| {
            s.updates != updates || st.sessions != sessions || st.fatal.is_some()
        });
    };
    drop(client);
    drop(uapi);
    engine.close();
    let _ = std::fs::remove_file(args.state_dir.join(STATUS_FILE));
    result.map_err(Into::into)
}

/// What the main loop has applied to the engine and the kernel.
struct Node {
    engine: Arc<Engine>,
    ifname: String,
    url: String,
    options: PlanOptions,
    applied: Plan,
    routes: BTreeSet<IpPrefix>,
    addressed: bool,
    /// (session, map messages) last applied: the count restarts with each
    /// session.
    seen_map: Option<(u64, u64)>,
    /// The packet filter installed in the engine (the map's, compiled by
    /// the server from the policy for this node); `None`: allow all.
    filter: Option<FilterRules>,
    seen_sessions: u64,
    relay_started: bool,
    /// The relay's settings for the URL the map names (the control
    /// server's TLS trust).
    relay_config: Box<dyn Fn(String) -> RelayConfig>,
    status_path: PathBuf,
    node_file: PathBuf,
    wrote_node: bool,
    last_status: String,
}

impl Node {
    /// Applies what changed in the map since the last step.
    fn step(&mut self, state: &NodeState, session: u64) -> Result<(), String> {
        if let Some(n) = &state.node {
            if !self.wrote_node {
                let text = serde_json::json!({
                    "control": self.url,
                    "node_id": n.node_id,
                    "name": n.name,
                    "ipv4": n.ipv4.to_string(),
                    "ipv6": n.ipv6.to_string(),
                })
                .to_string();
                write_atomic(&self.node_file, text.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", self.node_file.display()))?;
                self.wrote_node = true;
            }
            if !self.addressed {
                ip(&[
                    "addr",
                    "replace",
                    &format!("{}/32", n.ipv4),
                    "dev",
                    &self.ifname,
                ])?;
                // IPv6 may be off on the host; the IPv4 mesh still works.
                if let Err(e) = ip(&[
                    "-6",
                    "addr",
                    "replace",
                    &format!("{}/128", n.ipv6),
                    "dev",
                    &self.ifname,
                    "nodad",
                ]) {
                    tracing::warn!("no IPv6 mesh address: {e}");
                }
                self.engine.set_addresses(vec![
                    IpPrefix::host(IpAddr::V4(n.ipv4)),
                    IpPrefix::host(IpAddr::V6(n.ipv6)),
                ]);
                self.addressed = true;
                println!(
                    "joined the mesh at {} as {} (node {}): {} {}",
                    self.url, n.name, n.node_id, n.ipv4, n.ipv6
                );
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
            }
        }
        if let (Some(relay), false) = (&state.relay_url, self.relay_started) {
            // Peers whose UDP handshakes go unanswered move to it.
            match self.engine.start_relay((self.relay_config)(relay.clone())) {
                Ok(()) => self.relay_started = true,
                Err(e) => tracing::warn!("relay {relay}: {e}"),
            }
        }
        // Not before this session's full map is complete (it comes in
        // parts): until then the engine keeps what it has.
        if !state.has_map() || self.seen_map == Some((session, state.updates)) {
            return Ok(());
        }
        self.seen_map = Some((session, state.updates));
        let plan = apply::plan(state, self.options);
        for change in apply::diff(&self.applied, &plan) {
            match change {
                Change::Add(p) => {
                    let mut cfg = PeerConfig::new(p.public_key);
                    cfg.allowed_ips = p.allowed_ips;
                    cfg.endpoint = p.endpoint;
                    cfg.persistent_keepalive = Some(MESH_KEEPALIVE);
                    tracing::info!(peer = %p.name, "peer added");
                    self.engine
                        .add_peer(&cfg)
                        .map_err(|e| format!("peer {}: {e}", p.name))?;
                    if !p.candidates.is_empty() {
                        self.engine
                            .set_peer_candidates(&p.public_key, &p.candidates);
                    }
                }
                Change::Update {
                    public_key,
                    allowed_ips,
                    endpoint,
                    candidates,
                } => {
                    if let Some(c) = candidates {
                        self.engine.set_peer_candidates(&public_key, &c);
                    }
                    let update = PeerUpdate {
                        preshared_key: None,
                        endpoint,
                        persistent_keepalive: None,
                        replace_allowed_ips: allowed_ips.is_some(),
                        allowed_ips: allowed_ips.unwrap_or_default(),
                    };
                    self.engine
                        .update_peer(&public_key, &update, false)
                        .map_err(|e| format!("peer {}: {e}", public_key.to_base64()))?;
                }
                Change::Remove(k) => {
                    tracing::info!(peer = %k.to_base64(), "peer removed");
                    self.engine.remove_peer(&k);
                }
            }
        }
        self.applied = plan;
        // The policy's filter, after the peers it names exist: a denied
        // flow is dropped (and counted) by the engine from now on, tracked
        // flows of rules still allowed go on.
        if state.filter != self.filter {
            tracing::info!(
                policy_version = state.policy_version,
                rules = state
                    .filter
                    .as_ref()
                    .map(|f| f.inbound.len() + f.outbound.len()),
                "packet filter installed"
            );
            self.engine.set_filter(state.filter.clone().map(Arc::new));
            self.filter = state.filter.clone();
        }
        let want = apply::routes(&self.applied);
        let (add, del) = apply::route_diff(&self.routes, &want);
        for r in del {
            // Gone already when the kernel dropped it with an address.
            if let Err(e) = ip(&["route", "del", &r.to_string(), "dev", &self.ifname]) {
                tracing::debug!("{e}");
            }
            self.routes.remove(&r);
        }
        for r in add {
            match ip(&["route", "replace", &r.to_string(), "dev", &self.ifname]) {
                Ok(()) => {
                    self.routes.insert(r);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(())
    }

    /// Rewrites the status file when what it says changed.
    fn write_status(&mut self, state: &NodeState, status: &ClientStatus) {
        let mut t = String::new();
        match &state.node {
            Some(n) => {
                let _ = writeln!(
                    t,
                    "node {} (id {}): {} {}, interface {}, port {}, tags {}",
                    n.name,
                    n.node_id,
                    n.ipv4,
                    n.ipv6,
                    self.ifname,
                    self.engine.listen_port(),
                    if n.tags.is_empty() {
                        "-".into()
                    } else {
                        n.tags.join(",")
                    }
                );
            }
            None => {
                let _ = writeln!(t, "node: not registered yet");
            }
        }
        let _ = writeln!(
            t,
            "control {}: {}, sessions {}, map updates {}{}",
            self.url,
            if status.connected {
                "connected"
            } else {
                "disconnected"
            },
            status.sessions,
            state.updates,
            status
                .last_error
                .as_ref()
                .filter(|_| !status.connected)
                .map_or(String::new(), |e| format!(", last error: {e}"))
        );
        let _ = writeln!(
            t,
            "policy version {}: {}",
            state.policy_version,
            match &state.filter {
                None => "no policy (allow all between nodes)".to_string(),
                Some(f) => format!(
                    "{} inbound and {} outbound rules, enforced by the engine",
                    f.inbound.len(),
                    f.outbound.len()
                ),
            }
        );
        let routes: Vec<String> = state
            .routes
            .iter()
            .map(|r| match (&r.reason, r.approved) {
                (Some(why), _) => format!("{} refused ({why})", r.prefix),
                (None, true) => format!("{} approved", r.prefix),
                (None, false) => format!("{} pending approval", r.prefix),
            })
            .collect();
        let _ = writeln!(
            t,
            "routes advertised: {}; accepting routes: {}",
            if routes.is_empty() {
                "none".into()
            } else {
                routes.join(", ")
            },
            if self.options.accept_routes {
                "yes"
            } else {
                "no"
            }
        );
        for (prefix, ids) in &self.applied.conflicts {
            let _ = writeln!(
                t,
                "route conflict: {prefix} is carried by nodes {ids:?}; routed to node {}",
                ids[0]
            );
        }
        let stats = self.engine.all_peer_stats();
        let _ = writeln!(t, "{} peers", self.applied.peers.len());
        for p in self.applied.peers.values() {
            let s = stats.iter().find(|s| s.public_key == p.public_key);
            let allowed: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                t,
                "peer {} (id {}) {}\n  allowed {}  endpoint {}  path {}{}\n  handshake {}, sent {} B, received {} B{}",
                p.name,
                p.node_id,
                p.public_key.to_base64(),
                allowed.join(","),
                s.and_then(|s| s.endpoint)
                    .map_or("(none)".into(), |e| e.to_string()),
                s.map_or("-", |s| s.path.name()),
                if p.relay { ", relay available" } else { "" },
                s.and_then(|s| s.last_handshake)
                    .and_then(|h| SystemTime::now().duration_since(h).ok())
                    .map_or("never".into(), |d| format!("{} s ago", d.as_secs())),
                s.map_or(0, |s| s.tx_bytes),
                s.map_or(0, |s| s.rx_bytes),
                if p.routes_not_used.is_empty() {
                    String::new()
                } else {
                    let r: Vec<String> = p.routes_not_used.iter().map(|r| r.to_string()).collect();
                    format!("\n  routes not used: {}", r.join(","))
                }
            );
        }
        if self.last_status == t {
            return;
        }
        // Renamed over the old one so a reader sees one version; not
        // fsynced: it describes this run only and is removed at its end.
        let tmp = self.status_path.with_extension("tmp");
        match std::fs::write(&tmp, t.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &self.status_path))
        {
            Ok(()) => self.last_status = t,
            Err(e) => tracing::debug!("status {}: {e}", self.status_path.display()),
        }
    }
}
