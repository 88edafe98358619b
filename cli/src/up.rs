//! `meshvpn up --control URL --join-key-file F`: joins this host to a mesh
//! run by a control server (`meshvpn control serve`) and keeps it there.
//!
//! ```text
//!   state dir: node.key (WireGuard key) ─┐
//!              node.json (registered) ───┼─► meshvpn_control::join::Node
//!   join key file (first join only) ─────┘     (map ─► engine peers, filter, routes)
//!                                                 │ Host: CliHost
//!   TUN addresses + `ip route` (none with --userspace) ◄┘
//!   status file ◄── Node::status() every 200 ms
//! ```
//!
//! The node logic (applying the map, reconnecting, events) is the
//! library's (`control/src/join.rs`), shared with C and Go; this file
//! keeps what belongs to a host command: the state dir, the TUN, kernel
//! routes, signals and the status file.
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

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use meshvpn_control::client::{ClientError, NodeInfo};
use meshvpn_control::join::{new_engine, Host, JoinConfig, Node, NodeStatus};
use meshvpn_control::proto::ErrorCode;
use meshvpn_engine::ws::tls;
use meshvpn_engine::{IpPrefix, NetstackConfig, PrivateKey, UapiServer};
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
/// How often the status file is refreshed and signals looked at.
const TICK: Duration = Duration::from_millis(200);

#[derive(Args)]
#[command(
    long_about = "Join this host to a mesh run by a control server and stay in it.\n\n\
        The first run needs a join key (`meshvpn control keys create` on the server); it is \
        used once: the node's WireGuard key, kept in --state-dir, identifies it afterwards, so \
        a restart rejoins as the same node with the same addresses. Creates the TUN interface, \
        puts the node's mesh addresses on it and a route per peer (and per accepted route). \
        Keeps running when the control server is down: existing peers keep working. \
        With --userspace there is no TUN and no root is needed: the node is reached through \
        the userspace network stack (it answers pings) and the policy's packet filter still \
        applies. Runs in the foreground."
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
    /// No TUN and no root: the mesh is reached through the userspace
    /// network stack (it answers pings; other nodes' routes are not put in
    /// the kernel). The policy's packet filter is still enforced.
    #[arg(long)]
    userspace: bool,
    /// With --userspace: accept on a local address and forward into the
    /// mesh, as `meshvpn forward --local` (ADDR=MESHADDR[/udp], e.g.
    /// 127.0.0.1:8080=100.64.0.2:80). Repeatable.
    #[arg(long, value_name = "ADDR=MESHADDR[/udp]", requires = "userspace")]
    local: Vec<crate::forward::Forward>,
    /// With --userspace: listen on this node's mesh addresses and forward
    /// to a local service, as `meshvpn forward --remote` (0.0.0.0:PORT: the
    /// node's mesh IPv4, whatever the server gives it), e.g.
    /// 0.0.0.0:2222=127.0.0.1:22. Repeatable.
    #[arg(long, value_name = "MESHADDR=ADDR[/udp]", requires = "userspace")]
    remote: Vec<crate::forward::Forward>,
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

/// The host side of `meshvpn up`: the TUN's addresses and kernel routes
/// (none in userspace mode), the host's addresses as endpoints, and the
/// registration kept in the state dir.
struct CliHost {
    /// The TUN; `None` in userspace mode.
    tun: Option<String>,
    /// Excluded from the endpoints reported.
    ifname: String,
    url: String,
    node_file: PathBuf,
    wrote_node: bool,
}

impl Host for CliHost {
    fn set_addresses(&mut self, n: &NodeInfo) -> Result<(), String> {
        if let Some(ifname) = &self.tun {
            ip(&["addr", "replace", &format!("{}/32", n.ipv4), "dev", ifname])?;
            // IPv6 may be off on the host; the IPv4 mesh still works.
            if let Err(e) = ip(&[
                "-6",
                "addr",
                "replace",
                &format!("{}/128", n.ipv6),
                "dev",
                ifname,
                "nodad",
            ]) {
                tracing::warn!("no IPv6 mesh address: {e}");
            }
        }
        println!(
            "joined the mesh at {} as {} (node {}): {} {}{}",
            self.url,
            n.name,
            n.node_id,
            n.ipv4,
            n.ipv6,
            if self.tun.is_none() {
                " (userspace)"
            } else {
                ""
            }
        );
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        Ok(())
    }

    fn add_route(&mut self, r: IpPrefix) -> Result<(), String> {
        match &self.tun {
            Some(ifname) => ip(&["route", "replace", &r.to_string(), "dev", ifname]),
            None => Ok(()),
        }
    }

    fn del_route(&mut self, r: IpPrefix) -> Result<(), String> {
        match &self.tun {
            Some(ifname) => ip(&["route", "del", &r.to_string(), "dev", ifname]),
            None => Ok(()),
        }
    }

    fn endpoints(&mut self, port: u16) -> Vec<SocketAddr> {
        host_endpoints(&self.ifname, port)
    }

    fn registered(&mut self, n: &NodeInfo) -> Result<(), String> {
        if self.wrote_node {
            return Ok(());
        }
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
        Ok(())
    }
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
    let engine = Arc::new(new_engine(key, args.port)?);
    if !args.userspace {
        let tun = crate::daemon::create_tun(name)?;
        engine
            .attach_tun(tun)
            .map_err(|e| format!("cannot start the TUN reader: {e}"))?;
        ip(&["link", "set", name, "up"])?;
    }
    // `wg show` and `meshvpn status -i IFNAME` read peers and paths here.
    // Userspace mode runs without root, where the socket directory is
    // usually not writable: the node then runs without it, and
    // `meshvpn up --status` still reads its status file.
    let uapi = match UapiServer::start(engine.clone(), name) {
        Ok(uapi) => Some(uapi),
        Err(e) if args.userspace => {
            tracing::warn!(
                "no UAPI socket at {} ({e}): `wg show` and `meshvpn status -i {name}` will not see this node; `meshvpn up --status` will",
                UapiServer::socket_path(name).display()
            );
            None
        }
        Err(e) => {
            return Err(format!(
                "cannot listen on {}: {e}",
                UapiServer::socket_path(name).display()
            )
            .into())
        }
    };

    let mut config = JoinConfig::new(url.clone());
    config.join_key = join_key;
    config.hostname = hostname(&args);
    config.advertise_routes = args.advertise_routes.clone();
    config.tags = args.tags.clone();
    config.accept_routes = args.accept_routes;
    config.tls = tls;
    config.netstack = args.userspace.then(NetstackConfig::default);
    let host = CliHost {
        tun: (!args.userspace).then(|| name.to_owned()),
        ifname: name.to_owned(),
        url: url.clone(),
        node_file: node_file.clone(),
        wrote_node: registered.is_some(),
    };
    let node = Node::start(config, engine.clone(), Box::new(host), registered.is_some())
        .map_err(|e| e.to_string())?;

    let (sig_tx, sig_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("meshvpn-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = sig_tx.send(sig);
            }
        })?;

    let status_path = args.state_dir.join(STATUS_FILE);
    let mut last_status = String::new();
    // Started once the node joined: its stack exists from then on.
    let mut forwards = None;
    let result = loop {
        match sig_rx.recv_timeout(TICK) {
            Ok(sig) => {
                tracing::info!("shutting down: got {sig}");
                break Ok(());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        }
        if !args.userspace && engine.device_gone() {
            break Err(format!("the interface {name} was deleted"));
        }
        if forwards.is_none() && !(args.local.is_empty() && args.remote.is_empty()) {
            if let Some(stack) = node.netstack() {
                match crate::forward::start_rules(&stack, &args.local, &args.remote) {
                    Ok(rules) => {
                        tracing::info!(local = ?rules.local_addrs, remote = args.remote.len(), "forwards started");
                        forwards = Some(rules);
                    }
                    Err(e) => break Err(format!("cannot start the forwards: {e}")),
                }
            }
        }
        let status = node.status();
        if let Some(e) = &status.fatal {
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
        let text = status_text(&status, name, args.userspace);
        if text != last_status {
            // Renamed over the old one so a reader sees one version; not
            // fsynced: it describes this run only and is removed at its end.
            let tmp = status_path.with_extension("tmp");
            match std::fs::write(&tmp, text.as_bytes())
                .and_then(|()| std::fs::rename(&tmp, &status_path))
            {
                Ok(()) => last_status = text,
                Err(e) => tracing::debug!("status {}: {e}", status_path.display()),
            }
        }
    };
    drop(forwards);
    node.close();
    drop(uapi);
    let _ = std::fs::remove_file(&status_path);
    result.map_err(Into::into)
}

/// What `meshvpn up --status` prints.
fn status_text(s: &NodeStatus, ifname: &str, userspace: bool) -> String {
    let mut t = String::new();
    match &s.node {
        Some(n) => {
            let _ = writeln!(
                t,
                "node {} (id {}): {} {}, {}, port {}, tags {}",
                n.name,
                n.node_id,
                n.ipv4,
                n.ipv6,
                if userspace {
                    "userspace (netstack, no TUN)".to_string()
                } else {
                    format!("interface {ifname}")
                },
                s.listen_port,
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
        s.control_url,
        if s.connected {
            "connected"
        } else {
            "disconnected"
        },
        s.sessions,
        s.map_updates,
        s.last_error
            .as_ref()
            .filter(|_| !s.connected)
            .map_or(String::new(), |e| format!(", last error: {e}"))
    );
    let _ = writeln!(
        t,
        "policy version {}: {}",
        s.policy_version,
        match s.filter_rules {
            None => "no policy (allow all between nodes)".to_string(),
            Some((i, o)) => format!("{i} inbound and {o} outbound rules, enforced by the engine"),
        }
    );
    let routes: Vec<String> = s
        .routes
        .iter()
        .map(|r| match (&r.reason, r.approved) {
            (Some(why), _) => format!("{} refused ({why})", r.prefix),
            (None, true) if r.role == meshvpn_control::routes::STANDBY => format!(
                "{} approved, standby (another router of the cluster carries it)",
                r.prefix
            ),
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
        if s.accept_routes { "yes" } else { "no" }
    );
    for (prefix, ids) in &s.conflicts {
        let _ = writeln!(
            t,
            "route conflict: {prefix} is carried by nodes {ids:?}; routed to node {}",
            ids[0]
        );
    }
    let _ = writeln!(t, "{} peers", s.peers.len());
    for peer in &s.peers {
        let (p, st) = (&peer.planned, peer.stats.as_ref());
        let allowed: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            t,
            "peer {} (id {}) {}\n  allowed {}  endpoint {}  path {}{}\n  handshake {}, sent {} B, received {} B{}",
            p.name,
            p.node_id,
            p.public_key.to_base64(),
            allowed.join(","),
            st.and_then(|s| s.endpoint)
                .map_or("(none)".into(), |e| e.to_string()),
            st.map_or("-", |s| s.path.name()),
            if p.relay { ", relay available" } else { "" },
            st.and_then(|s| s.last_handshake)
                .and_then(|h| SystemTime::now().duration_since(h).ok())
                .map_or("never".into(), |d| format!("{} s ago", d.as_secs())),
            st.map_or(0, |s| s.tx_bytes),
            st.map_or(0, |s| s.rx_bytes),
            if p.routes_not_used.is_empty() {
                String::new()
            } else {
                let r: Vec<String> = p.routes_not_used.iter().map(|r| r.to_string()).collect();
                format!("\n  routes not used: {}", r.join(","))
            }
        );
    }
    t
}
