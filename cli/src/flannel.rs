//! `meshvpn flannel pre-startup|post-startup|subnet-add|subnet-remove`:
//! meshvpn as the WireGuard of flannel's `extension` backend (and so of
//! k3s, whose `--flannel-conf` can name that backend). docs/k3s.md tells
//! the whole story; the facts this relies on, from flannel v0.28.10's
//! pkg/backend/extension:
//!
//! - each command line is split on spaces and run without a shell, `$VAR`
//!   expanded from flanneld's environment plus the variables below; its
//!   stdout AND stderr are captured together, so pre-startup prints the
//!   backend-data and nothing else;
//! - pre-startup's output becomes this node's backend-data (the
//!   `flannel.alpha.coreos.com/backend-data` annotation under k3s);
//! - post-startup runs once the lease is held, with NETWORK, SUBNET,
//!   IPV6SUBNET, PUBLIC_IP, PUBLIC_IPV6;
//! - subnet-add / subnet-remove run per remote lease with SUBNET and
//!   PUBLIC_IP only (v0.28.10 sets no IPV6SUBNET for them; taken when
//!   present) and the remote's backend-data on stdin;
//! - a restarted flanneld runs them all again (so each is idempotent), and
//!   there is no shutdown command.
//!
//! Every command talks to the `meshvpn IFNAME` daemon through its UAPI
//! socket, as `wg` does; pre-startup starts the daemon when it is not
//! running, with `--state-dir`, so a restarted daemon comes back with its
//! key, peers and routes and flannel need not run anything again.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use meshvpn_engine::config::uapi::{parse_get, GetReply, PeerReply};
use meshvpn_engine::{IpPrefix, PrivateKey, PublicKey, UapiServer};
use serde_json::{json, Value};

use crate::persist::{ip, write_atomic, DEFAULT_STATE_DIR};
use crate::CliResult;

/// Version of the backend-data this meshvpn writes and reads; a node whose
/// backend-data has another `v` is refused with a message, not guessed at.
pub const BACKEND_DATA_VERSION: u64 = 1;
/// The interface when neither `-i` nor MESHVPN_FLANNEL_INTERFACE says.
pub const DEFAULT_INTERFACE: &str = "flannel-wg";
/// flannel's own wireguard backend listens on 51820.
pub const DEFAULT_PORT: u16 = 51820;
/// As flannel's wireguard backend (and k3s's wireguard-native) sets it:
/// keeps NAT mappings open, and lets a node behind NAT be found.
pub const PERSISTENT_KEEPALIVE: u16 = 25;
/// A peer whose last handshake is younger than this has a working path
/// (WireGuard's Reject-After-Time: a session older than it is dead), and
/// subnet-add leaves its endpoint alone: flannel's PUBLIC_IP is a hint.
pub const WORKING_PATH_AGE: Duration = Duration::from_secs(180);
/// How long after post-startup a peer may go without a subnet-add from the
/// restarted flanneld before it is taken as a lease that went away while
/// flanneld was down, and removed.
pub const STALE_PEER_GRACE: Duration = Duration::from_secs(30);
/// The most of stdin (the remote's backend-data) read.
const MAX_BACKEND_DATA: u64 = 4096;

#[derive(Args)]
pub struct FlannelArgs {
    #[command(subcommand)]
    command: FlannelCommand,
}

#[derive(Args, Clone)]
pub struct Common {
    /// The meshvpn interface.
    #[arg(short, long, env = "MESHVPN_FLANNEL_INTERFACE", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// Where the daemon saves its configuration and these commands their
    /// bookkeeping.
    #[arg(long, env = "MESHVPN_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Subcommand)]
enum FlannelCommand {
    /// flannel's PreStartupCommand: start the daemon if it is not running,
    /// make sure it has a key and its port, print this node's backend-data.
    PreStartup(PreStartup),
    /// flannel's PostStartupCommand: the node's address (SUBNET's network
    /// address /32, as flannel's wireguard backend) on the interface, up.
    PostStartup(PostStartup),
    /// flannel's SubnetAddCommand: the remote node as a peer (AllowedIPs
    /// SUBNET, endpoint hint PUBLIC_IP:port, keepalive) and the route.
    SubnetAdd(Common),
    /// flannel's SubnetRemoveCommand: the peer's SUBNET and its route away.
    SubnetRemove(Common),
    /// Removes peers no subnet-add confirmed since post-startup number
    /// EPOCH (started by post-startup itself, detached).
    #[command(hide = true)]
    Prune {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        epoch: u64,
        #[arg(long, default_value_t = STALE_PEER_GRACE.as_secs())]
        after: u64,
    },
}

#[derive(Args)]
struct PostStartup {
    #[command(flatten)]
    common: Common,
    /// Seconds after which peers that the restarted flanneld did not
    /// re-add are removed (leases that went away while it was down).
    #[arg(long, env = "MESHVPN_FLANNEL_PRUNE_AFTER", default_value_t = STALE_PEER_GRACE.as_secs())]
    prune_after: u64,
}

#[derive(Args)]
struct PreStartup {
    #[command(flatten)]
    common: Common,
    /// UDP port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// The relay every node uses when UDP between two nodes fails; passed
    /// to the daemon it starts and published in the backend-data.
    #[arg(long, value_name = "URL")]
    relay_url: Option<String>,
    #[arg(long, value_name = "FILE", requires = "relay_url")]
    relay_ca: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "relay_url")]
    relay_token_file: Option<PathBuf>,
    /// Passed to the daemon it starts (Prometheus text on ADDR).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// The started daemon's log (default STATE_DIR/IFNAME.log).
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

pub fn run(args: FlannelArgs) -> CliResult {
    match args.command {
        FlannelCommand::PreStartup(a) => pre_startup(&a),
        FlannelCommand::PostStartup(a) => post_startup(&a.common, a.prune_after),
        FlannelCommand::SubnetAdd(c) => subnet_add(&c),
        FlannelCommand::SubnetRemove(c) => subnet_remove(&c),
        FlannelCommand::Prune {
            common,
            epoch,
            after,
        } => prune(&common, epoch, Duration::from_secs(after)),
    }
}

// --- the UAPI, as a client ------------------------------------------------

fn connect(ifname: &str) -> Result<UnixStream, String> {
    let path = UapiServer::socket_path(ifname);
    let s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "the meshvpn daemon for {ifname} is not running ({}: {e}); \
             `meshvpn flannel pre-startup` starts it",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Reads a reply up to its blank line.
fn read_reply(s: &UnixStream) -> Result<String, String> {
    let mut r = BufReader::new(s);
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .map_err(|e| format!("reading the daemon's reply: {e}"))?;
        if n == 0 || line == "\n" {
            return Ok(text);
        }
        text.push_str(&line);
    }
}

pub fn uapi_get(ifname: &str) -> Result<GetReply, String> {
    let mut s = connect(ifname)?;
    s.write_all(b"get=1\n\n").map_err(|e| e.to_string())?;
    let text = read_reply(&s)?;
    parse_get(&text).map_err(|e| format!("the daemon's reply: {e}"))
}

/// The daemon's `get=meshvpn-paths` reply (each peer's path and NAT
/// candidates; `Engine::uapi_paths`), without its `errno` line. Empty
/// from a daemon that predates the request (it closes the connection).
pub fn uapi_paths(ifname: &str) -> Result<String, String> {
    let mut s = connect(ifname)?;
    s.write_all(b"get=meshvpn-paths\n\n")
        .map_err(|e| e.to_string())?;
    let text = read_reply(&s)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with("errno="))
        .map(|l| format!("{l}\n"))
        .collect())
}

/// Sends `lines` (UAPI set keys, carrying keys: never logged).
fn uapi_set(ifname: &str, lines: &str) -> Result<(), String> {
    let mut s = connect(ifname)?;
    s.write_all(format!("set=1\n{lines}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let reply = read_reply(&s)?;
    match reply.trim() {
        "errno=0" => Ok(()),
        other => Err(format!(
            "the daemon refused the change ({other}); see its log"
        )),
    }
}

// --- inputs ----------------------------------------------------------------

fn env_var(name: &str) -> Result<String, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => Err(format!(
            "{name} is not set: run this as flannel's extension command (flannel sets it)"
        )),
    }
}

fn env_prefix(name: &str) -> Result<IpPrefix, String> {
    let v = env_var(name)?;
    v.parse::<IpPrefix>()
        .map_err(|_| format!("{name}={v} is not an address prefix such as 10.42.1.0/24"))
}

/// flannel writes an unset IPv6 subnet as "", "<nil>" or "::/0" (its zero
/// value, seen from v0.28.10's post-startup): all mean none.
fn env_prefix_opt(name: &str) -> Result<Option<IpPrefix>, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() && v.trim() != "<nil>" => {
            let p: IpPrefix = v
                .trim()
                .parse()
                .map_err(|_| format!("{name}={v} is not an address prefix"))?;
            Ok((p.len() > 0 && !p.addr().is_unspecified()).then_some(p))
        }
        _ => Ok(None),
    }
}

/// A remote node's backend-data, as pre-startup printed it there.
#[derive(Debug, PartialEq)]
pub struct BackendData {
    pub public_key: PublicKey,
    pub port: u16,
    pub relay_url: Option<String>,
}

impl BackendData {
    pub fn to_json(&self) -> String {
        let mut v = json!({
            "v": BACKEND_DATA_VERSION,
            "publicKey": self.public_key.to_base64(),
            "port": self.port,
        });
        if let Some(u) = &self.relay_url {
            v["relayURL"] = json!(u);
        }
        v.to_string()
    }

    pub fn parse(text: &str) -> Result<BackendData, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(
                "no backend-data on stdin: the remote node's PreStartupCommand printed \
                        nothing (is it running meshvpn?)"
                    .into(),
            );
        }
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("backend-data is not JSON ({e}): {:.80}", text))?;
        match v["v"].as_u64() {
            Some(BACKEND_DATA_VERSION) => {}
            Some(n) => {
                return Err(format!(
                    "backend-data version {n}: this meshvpn reads version {BACKEND_DATA_VERSION}; \
                     upgrade meshvpn on this node"
                ))
            }
            None => return Err("backend-data has no version (\"v\"): not meshvpn's".into()),
        }
        let public_key = v["publicKey"]
            .as_str()
            .and_then(|k| PublicKey::from_base64(k).ok())
            .ok_or("backend-data: publicKey is missing or not a base64 key")?;
        let port = v["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or("backend-data: port is missing or not 1-65535")?;
        let relay_url = match &v["relayURL"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => return Err("backend-data: relayURL is not a string".into()),
        };
        Ok(BackendData {
            public_key,
            port,
            relay_url,
        })
    }

    fn from_stdin() -> Result<BackendData, String> {
        let mut text = String::new();
        std::io::stdin()
            .lock()
            .take(MAX_BACKEND_DATA)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading backend-data from stdin: {e}"))?;
        BackendData::parse(&text)
    }
}

// --- bookkeeping: which post-startup each peer was confirmed after ----------

/// `STATE_DIR/IFNAME.flannel.json`: the post-startup count ("epoch") and
/// the epoch of each peer's last subnet-add, under an flock so the
/// detached prune and the commands do not interleave.
struct Book {
    path: PathBuf,
    epoch: u64,
    peers: HashMap<String, u64>,
    _lock: nix::fcntl::Flock<File>,
}

impl Book {
    fn open(c: &Common) -> Result<Book, String> {
        std::fs::create_dir_all(&c.state_dir)
            .map_err(|e| format!("{}: {e}", c.state_dir.display()))?;
        let lock_path = c.state_dir.join(format!("{}.flannel.lock", c.interface));
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("{}: {e}", lock_path.display()))?;
        let path = c.state_dir.join(format!("{}.flannel.json", c.interface));
        let v: Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let peers = v["peers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, e)| Some((k.clone(), e.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Book {
            path,
            epoch: v["epoch"].as_u64().unwrap_or(0),
            peers,
            _lock: lock,
        })
    }

    fn save(&self) -> Result<(), String> {
        let v = json!({ "v": 1, "epoch": self.epoch, "peers": self.peers });
        write_atomic(&self.path, v.to_string().as_bytes())
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

// --- the commands ----------------------------------------------------------

fn pre_startup(a: &PreStartup) -> CliResult {
    let ifname = &a.common.interface;
    crate::daemon::check_name(ifname)?;
    if connect(ifname).is_err() {
        start_daemon(a)?;
    }
    let reply = uapi_get(ifname)?;
    let public_key = match &reply.private_key {
        Some(k) => {
            if reply.listen_port != a.port {
                uapi_set(ifname, &format!("listen_port={}\n", a.port))?;
            }
            k.public_key()
        }
        None => {
            let key = PrivateKey::generate();
            uapi_set(
                ifname,
                &format!("private_key={}\nlisten_port={}\n", key.to_hex(), a.port),
            )?;
            key.public_key()
        }
    };
    let data = BackendData {
        public_key,
        port: a.port,
        relay_url: a.relay_url.clone(),
    };
    // flannel captures stdout and stderr together as the backend-data: this
    // line is all the command may print.
    println!("{}", data.to_json());
    Ok(())
}

fn start_daemon(a: &PreStartup) -> Result<(), String> {
    let c = &a.common;
    std::fs::create_dir_all(&c.state_dir)
        .map_err(|e| format!("--state-dir {}: {e}", c.state_dir.display()))?;
    let log = a
        .log
        .clone()
        .unwrap_or_else(|| c.state_dir.join(format!("{}.log", c.interface)));
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find meshvpn itself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("-v")
        .arg("--state-dir")
        .arg(&c.state_dir)
        .arg(&c.interface);
    if let Some(u) = &a.relay_url {
        cmd.arg("--relay-url").arg(u);
    }
    if let Some(p) = &a.relay_ca {
        cmd.arg("--relay-ca").arg(p);
    }
    if let Some(p) = &a.relay_token_file {
        cmd.arg("--relay-token-file").arg(p);
    }
    if let Some(m) = a.metrics_listen {
        cmd.arg("--metrics-listen").arg(m.to_string());
    }
    // The daemon's output goes to its log, never to flannel's pipe: flannel
    // waits for that pipe to close, and takes what is in it for backend-data.
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .status()
        .map_err(|e| format!("cannot start the meshvpn daemon: {e}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let last = text.lines().rev().find(|l| l.contains("meshvpn:"));
        return Err(format!(
            "the meshvpn daemon for {} did not start: {} (log: {})",
            c.interface,
            last.unwrap_or("see the log"),
            log.display()
        ));
    }
    Ok(())
}

/// The address flannel's wireguard backend gives its device: the lease's
/// network address, /32 (or /128).
fn node_address(subnet: &IpPrefix) -> IpPrefix {
    IpPrefix::host(subnet.network().addr())
}

fn post_startup(c: &Common, prune_after: u64) -> CliResult {
    let _network = env_prefix("NETWORK")?;
    let subnet = env_prefix("SUBNET")?;
    let subnet6 = env_prefix_opt("IPV6SUBNET")?;
    connect(&c.interface)?;
    for s in std::iter::once(subnet).chain(subnet6) {
        ip(&[
            "addr",
            "replace",
            &node_address(&s).to_string(),
            "dev",
            &c.interface,
        ])?;
    }
    ip(&["link", "set", &c.interface, "up"])?;
    let mut book = Book::open(c)?;
    book.epoch += 1;
    book.save()?;
    let epoch = book.epoch;
    drop(book);
    // flanneld runs subnet-add for every lease it finds right after this;
    // peers it no longer finds (leases removed while it was down) get no
    // subnet-remove, so a detached prune removes them after the grace.
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .args(["flannel", "prune", "--epoch", &epoch.to_string()])
        .args(["--after", &prune_after.to_string()])
        .arg("--interface")
        .arg(&c.interface)
        .arg("--state-dir")
        .arg(&c.state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the stale-peer prune: {e}"))?;
    println!(
        "{}: node address {} up (subnet {subnet})",
        c.interface,
        node_address(&subnet)
    );
    Ok(())
}

fn recent(p: &PeerReply) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    p.last_handshake
        .is_some_and(|t| t.as_secs() > 0 && now.saturating_sub(t) < WORKING_PATH_AGE)
}

fn subnet_add(c: &Common) -> CliResult {
    let subnet = env_prefix("SUBNET")?;
    let subnet6 = env_prefix_opt("IPV6SUBNET")?;
    let public_ip: IpAddr = env_var("PUBLIC_IP")?
        .parse()
        .map_err(|_| "PUBLIC_IP is not an IP address")?;
    let data = BackendData::from_stdin()?;
    let reply = uapi_get(&c.interface)?;
    if reply.private_key.as_ref().map(|k| k.public_key()) == Some(data.public_key) {
        return Err("backend-data holds this node's own key: not a remote node".into());
    }
    let mine: Vec<IpPrefix> = std::iter::once(subnet).chain(subnet6).collect();
    let hint = SocketAddr::new(public_ip, data.port);
    let existing = reply.peers.iter().find(|p| p.public_key == data.public_key);
    let keep_path = existing.is_some_and(recent);
    let mut set = String::new();
    // A key that no longer holds anything but this subnet is the same node
    // under an old key (its state was lost): replaced, not kept beside it.
    for p in &reply.peers {
        if p.public_key != data.public_key
            && !p.allowed_ips.is_empty()
            && p.allowed_ips.iter().all(|a| mine.contains(a))
        {
            set.push_str(&format!(
                "public_key={}\nremove=true\n",
                p.public_key.to_hex()
            ));
        }
    }
    set.push_str(&format!("public_key={}\n", data.public_key.to_hex()));
    if !keep_path {
        set.push_str(&format!("endpoint={hint}\n"));
    }
    set.push_str(&format!(
        "persistent_keepalive_interval={PERSISTENT_KEEPALIVE}\nreplace_allowed_ips=true\n"
    ));
    for a in &mine {
        set.push_str(&format!("allowed_ip={a}\n"));
    }
    uapi_set(&c.interface, &set)?;
    for a in &mine {
        ip(&["route", "replace", &a.to_string(), "dev", &c.interface])?;
    }
    let mut book = Book::open(c)?;
    let epoch = book.epoch;
    book.peers.insert(data.public_key.to_base64(), epoch);
    book.save()?;
    let endpoint = match (keep_path, existing.and_then(|p| p.endpoint)) {
        (true, Some(e)) => format!("{e} (working path kept; hint {hint})"),
        _ => hint.to_string(),
    };
    println!("peer {}: {subnet} via {endpoint}", data.public_key);
    Ok(())
}

fn subnet_remove(c: &Common) -> CliResult {
    let subnet = env_prefix("SUBNET")?;
    let subnet6 = env_prefix_opt("IPV6SUBNET")?;
    let data = BackendData::from_stdin()?;
    let gone: Vec<IpPrefix> = std::iter::once(subnet).chain(subnet6).collect();
    let reply = uapi_get(&c.interface)?;
    if let Some(p) = reply.peers.iter().find(|p| p.public_key == data.public_key) {
        let rest: Vec<&IpPrefix> = p.allowed_ips.iter().filter(|a| !gone.contains(a)).collect();
        let key = p.public_key.to_hex();
        let set = if rest.is_empty() {
            format!("public_key={key}\nremove=true\n")
        } else {
            // The node holds a newer lease too: only this one goes.
            let mut s = format!("public_key={key}\nreplace_allowed_ips=true\n");
            for a in rest {
                s.push_str(&format!("allowed_ip={a}\n"));
            }
            s
        };
        uapi_set(&c.interface, &set)?;
    }
    // The route stays while another peer (the same node under a new key)
    // holds the subnet.
    for a in &gone {
        let held = reply
            .peers
            .iter()
            .any(|p| p.public_key != data.public_key && p.allowed_ips.contains(a));
        if !held {
            remove_route(a, &c.interface)?;
        }
    }
    if let Ok(mut book) = Book::open(c) {
        if book.peers.remove(&data.public_key.to_base64()).is_some() {
            book.save()?;
        }
    }
    println!("peer {}: {subnet} removed", data.public_key);
    Ok(())
}

/// `ip route del`, where "no such route" is success (idempotence).
fn remove_route(a: &IpPrefix, ifname: &str) -> Result<(), String> {
    match ip(&["route", "del", &a.to_string(), "dev", ifname]) {
        Ok(()) => Ok(()),
        Err(e) if e.contains("No such process") || e.contains("Cannot find device") => Ok(()),
        Err(e) => Err(e),
    }
}

fn prune(c: &Common, epoch: u64, after: Duration) -> CliResult {
    std::thread::sleep(after);
    let book = Book::open(c)?;
    if book.epoch != epoch {
        return Ok(()); // a later post-startup's prune decides
    }
    let reply = uapi_get(&c.interface)?;
    for p in &reply.peers {
        let confirmed = book
            .peers
            .get(&p.public_key.to_base64())
            .is_some_and(|&e| e >= epoch);
        if !confirmed {
            uapi_set(
                &c.interface,
                &format!("public_key={}\nremove=true\n", p.public_key.to_hex()),
            )?;
            for a in &p.allowed_ips {
                remove_route(a, &c.interface)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_data_round_trips() {
        let d = BackendData {
            public_key: PrivateKey::generate().public_key(),
            port: 51820,
            relay_url: Some("wss://relay:6443/v1-meshvpn/relay".into()),
        };
        assert_eq!(BackendData::parse(&d.to_json()).unwrap(), d);
    }

    #[test]
    fn bad_backend_data_is_refused_with_a_reason() {
        let key = PrivateKey::generate().public_key().to_base64();
        for (text, why) in [
            ("", "no backend-data"),
            ("{", "not JSON"),
            ("\"a string\"", "no version"),
            (
                &format!(r#"{{"v":2,"publicKey":"{key}","port":1}}"#) as &str,
                "version 2",
            ),
            (r#"{"v":1,"publicKey":"AAAA","port":51820}"#, "publicKey"),
            (
                &format!(r#"{{"v":1,"publicKey":"{key}","port":0}}"#),
                "port",
            ),
            (
                &format!(r#"{{"v":1,"publicKey":"{key}","port":70000}}"#),
                "port",
            ),
            (
                &format!(r#"{{"v":1,"publicKey":"{key}","port":1,"relayURL":5}}"#),
                "relayURL",
            ),
        ] {
            let e = BackendData::parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
