//! The daemon's configuration on disk (`meshvpn IFNAME --state-dir DIR`):
//! the private key, listen port, peers, and the addresses and IPv4 routes
//! on the interface, in `DIR/IFNAME.json`. A restarted daemon (crash,
//! SIGKILL, upgrade) puts them all back before it serves, so whoever
//! configured it (flannel's extension commands, `wg`, `ip`) does not have
//! to run again.
//!
//! The file is written only when what it would hold changes (checked every
//! [`SAVE_EVERY`]), atomically (a temporary file in the same directory,
//! fsync, rename) and mode 0600: it holds the private key. Neither the
//! file's text nor any key is ever logged.
//!
//! A peer on the relay is saved with its last UDP endpoint: the reserved
//! relay endpoint means nothing to a new process, which moves to the relay
//! again by itself when UDP still fails.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshvpn_engine::peer::PeerPath;
use meshvpn_engine::{Engine, IpPrefix, PeerConfig, PresharedKey, PrivateKey, PublicKey};
use serde_json::{json, Value};

/// Format version of the state file; a file with another `v` is refused
/// rather than half-read.
pub const STATE_VERSION: u64 = 1;
/// Where `--state-dir` points by default when a command (such as `meshvpn
/// flannel pre-startup`) starts a persistent daemon.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshvpn";
/// How often the daemon compares its configuration with the saved one.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

pub fn state_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.json"))
}

/// What is saved: everything a restarted daemon needs to carry the same
/// traffic.
#[derive(Debug, Default, PartialEq)]
pub struct State {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub peers: Vec<PeerConfig>,
    pub addresses: Vec<IpPrefix>,
    pub routes: Vec<IpPrefix>,
    pub up: bool,
}

impl State {
    /// The running configuration of `engine` and of the interface `ifname`
    /// in this network namespace.
    /// `None` while the interface does not exist (being deleted): then
    /// there is nothing true to save.
    pub fn capture(engine: &Engine, ifname: &str) -> Option<State> {
        let peers = engine
            .peer_snapshot()
            .into_iter()
            .map(|(cfg, _)| cfg)
            .collect();
        let (addresses, up) = interface_addresses(ifname)?;
        Some(State {
            private_key: engine.private_key(),
            listen_port: engine.listen_port(),
            peers,
            addresses,
            routes: ipv4_routes(ifname),
            up,
        })
    }

    /// The file's text. Holds the private key: never log it.
    pub fn to_json(&self) -> String {
        let peers: Vec<Value> = self
            .peers
            .iter()
            .map(|p| {
                json!({
                    "public_key": p.public_key.to_base64(),
                    "preshared_key": p.preshared_key.as_ref().map(|k| k.to_base64()),
                    "endpoint": p.endpoint.map(|e| e.to_string()),
                    "persistent_keepalive": p.persistent_keepalive.unwrap_or(0),
                    "allowed_ips": p.allowed_ips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = json!({
            "v": STATE_VERSION,
            "private_key": self.private_key.as_ref().map(|k| k.to_base64()),
            "listen_port": self.listen_port,
            "peers": peers,
            "addresses": self.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "routes": self.routes.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "up": self.up,
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<State, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if v["v"].as_u64() != Some(STATE_VERSION) {
            return Err(format!(
                "format version {} (this meshvpn reads {STATE_VERSION})",
                v["v"]
            ));
        }
        let str_list = |v: &Value, what: &str| -> Result<Vec<IpPrefix>, String> {
            v.as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|x| {
                    x.as_str()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("bad {what} entry {x}"))
                })
                .collect()
        };
        let private_key = match v["private_key"].as_str() {
            Some(s) => Some(PrivateKey::from_base64(s).map_err(|_| "bad private_key")?),
            None => None,
        };
        let mut peers = Vec::new();
        for p in v["peers"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
        {
            let key = p["public_key"]
                .as_str()
                .and_then(|s| PublicKey::from_base64(s).ok())
                .ok_or("bad peer public_key")?;
            let mut cfg = PeerConfig::new(key);
            if let Some(s) = p["preshared_key"].as_str() {
                cfg.preshared_key =
                    Some(PresharedKey::from_base64(s).map_err(|_| "bad peer preshared_key")?);
            }
            if let Some(s) = p["endpoint"].as_str() {
                cfg.endpoint = Some(
                    s.parse::<SocketAddr>()
                        .map_err(|_| format!("bad peer endpoint {s}"))?,
                );
            }
            cfg.persistent_keepalive = p["persistent_keepalive"]
                .as_u64()
                .and_then(|k| u16::try_from(k).ok())
                .filter(|&k| k > 0);
            cfg.allowed_ips = str_list(&p["allowed_ips"], "allowed_ips")?;
            peers.push(cfg);
        }
        Ok(State {
            private_key,
            listen_port: v["listen_port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
            peers,
            addresses: str_list(&v["addresses"], "addresses")?,
            routes: str_list(&v["routes"], "routes")?,
            up: v["up"].as_bool().unwrap_or(false),
        })
    }

    /// Puts the engine's part back (key, port, peers), before the daemon
    /// serves.
    pub fn restore_engine(&self, engine: &Engine) -> Result<(), String> {
        engine.set_private_key(self.private_key.clone());
        if self.listen_port != 0 {
            bind_when_released(engine, self.listen_port)
                .map_err(|e| format!("listen port {}: {e}", self.listen_port))?;
        }
        for p in &self.peers {
            engine
                .add_peer(p)
                .map_err(|e| format!("peer {}: {e}", p.public_key))?;
        }
        Ok(())
    }

    /// Puts the interface's part back: addresses, link up, routes. Uses
    /// `ip` (iproute2), as wg-quick does.
    pub fn restore_interface(&self, ifname: &str) -> Result<(), String> {
        for a in &self.addresses {
            ip(&["addr", "replace", &a.to_string(), "dev", ifname])?;
        }
        if self.up {
            ip(&["link", "set", ifname, "up"])?;
        }
        for r in &self.routes {
            ip(&["route", "replace", &r.to_string(), "dev", ifname])?;
        }
        Ok(())
    }
}

/// Runs `ip ARGS`; its stderr becomes the error.
/// How long a restarted daemon waits for its saved port. A predecessor
/// killed a moment ago (`kill -9`, then systemd or flannel starting the
/// same command) still holds its sockets while the kernel closes its files
/// one by one; its TUN interface is gone before its UDP sockets are.
pub const PORT_RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Binds `port`, retrying while it is in use, for [`PORT_RELEASE_WAIT`]
/// at most.
fn bind_when_released(engine: &Engine, port: u16) -> Result<u16, meshvpn_engine::EngineError> {
    let start = Instant::now();
    let mut waited = false;
    loop {
        match engine.set_listen_port(port) {
            Err(meshvpn_engine::EngineError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && start.elapsed() < PORT_RELEASE_WAIT =>
            {
                if !waited {
                    tracing::info!(port, "listen port still in use: waiting for its release");
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            r => {
                if waited && r.is_ok() {
                    tracing::info!(
                        port,
                        waited_ms = start.elapsed().as_millis() as u64,
                        "listen port bound"
                    );
                }
                return r;
            }
        }
    }
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The addresses on `ifname` and whether it is up; `None` if it does not
/// exist.
fn interface_addresses(ifname: &str) -> Option<(Vec<IpPrefix>, bool)> {
    let mut out = Vec::new();
    let mut up = false;
    let mut found = false;
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs.filter(|a| a.interface_name == ifname) {
        found = true;
        up |= a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let (ip, len) = if let (Some(s), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            (IpAddr::V4(s.ip()), u32::from(m.ip()).count_ones())
        } else if let (Some(s), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            if s.ip().segments()[0] & 0xffc0 == 0xfe80 {
                continue; // link-local: the kernel makes it
            }
            (IpAddr::V6(s.ip()), u128::from(m.ip()).count_ones())
        } else {
            continue;
        };
        if let Ok(p) = IpPrefix::new(ip, len as u8) {
            out.push(p);
        }
    }
    found.then_some((out, up))
}

/// The IPv4 routes of the main table through `ifname`, from
/// /proc/net/route (of this network namespace).
fn ipv4_routes(ifname: &str) -> Vec<IpPrefix> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    parse_proc_route(&text, ifname)
}

fn parse_proc_route(text: &str, ifname: &str) -> Vec<IpPrefix> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != ifname {
            continue;
        }
        // Destination and Mask are the address bytes in host order, hex.
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
        else {
            continue;
        };
        let dst = Ipv4Addr::from(dst.to_ne_bytes());
        let len = mask.count_ones() as u8;
        if let Ok(p) = IpPrefix::new(IpAddr::V4(dst), len) {
            out.push(p);
        }
    }
    out.sort_by_key(|p| p.to_string());
    out
}

/// Keeps `DIR/IFNAME.json` equal to the running configuration.
pub struct Saver {
    path: PathBuf,
    ifname: String,
    last: String,
    next: Instant,
    /// The last UDP endpoint of each peer, saved in place of the relay's
    /// reserved endpoint while a peer is on the relay.
    udp_endpoints: HashMap<PublicKey, SocketAddr>,
}

impl Saver {
    /// Restores the saved state into `engine` (if there is one) and returns
    /// the saver, and the state whose interface part must be applied once
    /// the TUN device exists.
    pub fn open(
        dir: &Path,
        ifname: &str,
        engine: &Engine,
    ) -> Result<(Saver, Option<State>), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("--state-dir {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let path = state_path(dir, ifname);
        let state = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let s = State::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                s.restore_engine(engine)
                    .map_err(|e| format!("restoring {}: {e}", path.display()))?;
                tracing::info!(
                    interface = ifname,
                    peers = s.peers.len(),
                    routes = s.routes.len(),
                    "configuration restored from {}",
                    path.display()
                );
                Some(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let udp_endpoints = state
            .iter()
            .flat_map(|s| &s.peers)
            .filter_map(|p| Some((p.public_key, p.endpoint?)))
            .collect();
        let saver = Saver {
            path,
            ifname: ifname.to_owned(),
            last: String::new(),
            next: Instant::now(),
            udp_endpoints,
        };
        Ok((saver, state))
    }

    /// Saves when [`SAVE_EVERY`] has passed and the configuration changed.
    pub fn tick(&mut self, engine: &Engine) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + SAVE_EVERY;
        self.save(engine);
    }

    pub fn save(&mut self, engine: &Engine) {
        let Some(mut state) = State::capture(engine, &self.ifname) else {
            return;
        };
        for p in &mut state.peers {
            match (PeerPath::of(p.endpoint), p.endpoint) {
                (PeerPath::Relay, _) => p.endpoint = self.udp_endpoints.get(&p.public_key).copied(),
                (PeerPath::Udp, Some(e)) => {
                    self.udp_endpoints.insert(p.public_key, e);
                }
                (PeerPath::Udp, None) => {}
            }
        }
        self.udp_endpoints
            .retain(|k, _| state.peers.iter().any(|p| p.public_key == *k));
        let text = state.to_json();
        if text == self.last {
            return;
        }
        match write_atomic(&self.path, text.as_bytes()) {
            Ok(()) => self.last = text,
            Err(e) => tracing::warn!("cannot save {}: {e}", self.path.display()),
        }
    }
}

/// Writes `path` through a 0600 temporary file in the same directory,
/// fsynced, then renamed over it: a crash leaves the old or the new file,
/// never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_route_lines_become_prefixes() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    fw1\t00023A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    eth0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
                    fw1\t00033A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r: Vec<String> = parse_proc_route(text, "fw1")
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(r, ["10.58.2.0/24", "10.58.3.0/24"]);
    }

    /// The restart after `kill -9`: the port is still held when the new
    /// daemon restores it, and freed a moment later. The engine must end
    /// up serving it on IPv4 (a datagram sent there is seen), not on one
    /// family only or not at all.
    #[test]
    fn a_restored_port_is_bound_once_the_killed_predecessor_releases_it() {
        let holder = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let engine = Engine::new(&meshvpn_engine::Config {
            interface: meshvpn_engine::InterfaceConfig {
                listen_port: Some(0),
                ..Default::default()
            },
            peers: Vec::new(),
        })
        .unwrap();
        let state = State {
            private_key: Some(PrivateKey::generate()),
            listen_port: port,
            ..Default::default()
        };
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(holder);
        });
        let restored = state.restore_engine(&engine);
        release.join().unwrap();
        restored.unwrap();
        assert_eq!(engine.listen_port(), port);
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while engine.stats().rx_malformed == 0 && Instant::now() < deadline {
            probe
                .send_to(b"not wireguard", ("127.0.0.1", port))
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            engine.stats().rx_malformed > 0,
            "nothing sent to 127.0.0.1:{port} reached the engine: IPv4 UDP is not served"
        );
        engine.close();
    }

    #[test]
    fn state_round_trips_and_other_versions_are_refused() {
        let mut peer = PeerConfig::new(PrivateKey::generate().public_key());
        peer.endpoint = Some("10.0.0.2:51820".parse().unwrap());
        peer.persistent_keepalive = Some(25);
        peer.allowed_ips = vec!["10.58.2.0/24".parse().unwrap()];
        peer.preshared_key = Some(PresharedKey::generate());
        let s = State {
            private_key: Some(PrivateKey::generate()),
            listen_port: 51820,
            peers: vec![peer],
            addresses: vec!["10.58.1.0/32".parse().unwrap()],
            routes: vec!["10.58.2.0/24".parse().unwrap()],
            up: true,
        };
        let text = s.to_json();
        assert_eq!(State::from_json(&text).unwrap(), s);
        let other = text.replacen("\"v\": 1", "\"v\": 2", 1);
        assert!(State::from_json(&other).unwrap_err().contains("version 2"));
    }
}
