//! `meshvpn [-f] IFNAME`: what wireguard-go does. Creates the TUN
//! interface and its UAPI socket, then serves until SIGTERM/SIGINT or until
//! the interface is deleted (`ip link del`, `wg-quick down`).
//!
//! ```text
//!   parent ──fork──> child: setsid, TUN, engine, UAPI socket ──"ok"──> parent exits 0
//!                    │ (or the error text ──> parent prints it, exits 1)
//!                    └─ serves; stdio on /dev/null unless logs were asked for
//! ```
//!
//! The fork happens before any thread exists; signals are blocked before
//! the engine starts its threads and taken by one thread with sigwait, so
//! no signal handler runs anywhere.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::Args;
use meshvpn_engine::config::DEFAULT_MTU;
use meshvpn_engine::io::tun::Tun;
use meshvpn_engine::relay::RelayConfig;
use meshvpn_engine::ws::tls;
use meshvpn_engine::{Config, Engine, InterfaceConfig, UapiServer};
use nix::sys::signal::{SigSet, Signal};

use crate::CliResult;

#[derive(Args)]
pub struct InterfaceArgs {
    /// Stay in the foreground instead of daemonizing (also when
    /// WG_PROCESS_FOREGROUND=1, as for wireguard-go).
    #[arg(short, long)]
    pub foreground: bool,

    /// The interface to create, e.g. wg0 (at most 15 bytes).
    #[arg(value_name = "IFNAME")]
    pub ifname: Option<String>,

    /// A WireGuard relay (`meshvpn tunnel serve --relay`), e.g.
    /// wss://server:6443/v1-meshvpn/relay. Peers whose UDP handshakes go
    /// unanswered move to it, and back when UDP answers again; `wg show`
    /// shows such a peer's endpoint as [100::N]:0.
    #[arg(long, value_name = "URL")]
    pub relay_url: Option<String>,

    /// CA (PEM) that signed the relay's certificate (required for wss://;
    /// the relay is always verified).
    #[arg(long, value_name = "FILE", requires = "relay_url")]
    pub relay_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM, signed by the relay server's --client-ca)
    /// to present to the relay; a `tunnel serve --client-ca --relay`
    /// without --tokens demands one. Goes with --relay-key.
    #[arg(long, value_name = "FILE", requires_all = ["relay_key", "relay_ca"])]
    pub relay_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --relay-cert.
    #[arg(long, value_name = "FILE", requires = "relay_cert")]
    pub relay_key: Option<std::path::PathBuf>,

    /// File holding a bearer token for the relay, if it asks for one.
    #[arg(long, value_name = "FILE", requires = "relay_url")]
    pub relay_token_file: Option<std::path::PathBuf>,

    /// Seconds between UDP probes of a peer on the relay.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, requires = "relay_url",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub relay_probe: u64,

    /// A STUN server (host:port, e.g. the relay's host and HTTPS port
    /// number, or coturn's 3478) to learn this node's public address
    /// from, asked from the WireGuard socket itself; repeat for several
    /// (at most 8). With --relay-url, the addresses found are sent to the
    /// peers through the relay and probed for a direct path (NAT
    /// traversal, engine/docs/nat.md).
    #[arg(long = "stun-server", value_name = "ADDR", requires = "relay_url")]
    pub stun_servers: Vec<std::net::SocketAddr>,

    /// Save the configuration (keys, peers, the interface's addresses and
    /// routes) in DIR/IFNAME.json whenever it changes, and restore it from
    /// there at start (off by default: a wireguard-go drop-in starts
    /// empty). `meshvpn flannel pre-startup` uses /var/lib/meshvpn.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Serve Prometheus metrics (per-peer bytes, handshakes, path, drops;
    /// engine counters) over HTTP on ADDR, e.g. 127.0.0.1:9586 (off by
    /// default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What the child tells the parent once it serves.
const READY: &[u8] = b"ok\n";
/// How often the main thread checks whether the interface still exists.
const DEVICE_POLL: Duration = Duration::from_millis(200);

pub fn run(args: &InterfaceArgs, keep_stdio: bool) -> CliResult {
    let name = args
        .ifname
        .as_deref()
        .ok_or("no interface name; run `meshvpn wg0` or see `meshvpn --help`")?;
    check_name(name)?;
    let foreground =
        args.foreground || std::env::var("WG_PROCESS_FOREGROUND").is_ok_and(|v| v == "1");
    if foreground {
        return serve(name, args, None, true);
    }
    let (mut from_child, to_child) = UnixStream::pair()?;
    // SAFETY: nothing in this process has started a thread yet (the log
    // subscriber starts none), so the child is a complete copy of a
    // single-threaded process and may do anything afterwards.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(to_child);
            let mut status = Vec::new();
            from_child.read_to_end(&mut status)?;
            if status == READY {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&status);
            if text.is_empty() {
                Err(format!(
                    "the daemon (pid {child}) exited before it was ready; \
                     run `meshvpn -f {name}` to see why"
                )
                .into())
            } else {
                Err(text.into_owned().into())
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(from_child);
            // A session of its own: no controlling terminal, and the
            // caller's Ctrl-C or hangup does not reach the daemon.
            nix::unistd::setsid()?;
            let _ = std::env::set_current_dir("/");
            serve(name, args, Some(to_child), keep_stdio)
        }
    }
}

pub(crate) fn check_name(name: &str) -> CliResult {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) || name == "." {
        return Err(format!(
            "`{name}` is not an interface name: use 1 to 15 characters without '/' or spaces, e.g. wg0"
        )
        .into());
    }
    Ok(())
}

/// The running interface. Dropped in field order: the socket goes first,
/// so `wg` stops seeing the interface before the engine stops.
struct Interface {
    uapi: UapiServer,
    engine: Arc<Engine>,
    saver: Option<crate::persist::Saver>,
    addresses: crate::netwatch::AddressWatch,
    _metrics: Option<crate::metrics::MetricsServer>,
}

/// The relay settings from the command line, read before the engine starts.
fn relay_config(args: &InterfaceArgs) -> Result<Option<RelayConfig>, String> {
    let Some(url) = &args.relay_url else {
        return Ok(None);
    };
    let read =
        |p: &std::path::PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let identity = match (&args.relay_cert, &args.relay_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    let tls = match &args.relay_ca {
        Some(ca) => Some(
            tls::client_config(
                &read(ca)?,
                identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
            )
            .map_err(|e| format!("--relay-ca/--relay-cert/--relay-key: {e}"))?,
        ),
        None if url.starts_with("wss://") => {
            return Err(
                "--relay-ca is required for a wss:// relay (the relay is always verified)".into(),
            )
        }
        None => None,
    };
    let mut config = RelayConfig::new(url.clone(), tls);
    config.probe_interval = Duration::from_secs(args.relay_probe);
    if let Some(p) = &args.relay_token_file {
        config.token = Some(String::from_utf8_lossy(&read(p)?).trim().to_owned());
    }
    Ok(Some(config))
}

/// The TUN interface `name` with the default MTU; the error says what to
/// do next where there is something to do (`meshvpn IFNAME` and `meshvpn up`).
pub(crate) fn create_tun(name: &str) -> Result<Tun, String> {
    let tun = Tun::create(name).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => "; run as root or with CAP_NET_ADMIN",
            Some(libc::ENOENT) | Some(libc::ENODEV) => {
                "; /dev/net/tun is missing: load the tun module (modprobe tun)"
            }
            Some(libc::EBUSY) => "; another process already runs this interface",
            Some(libc::EINVAL) => "; an interface of another type has this name",
            _ => "",
        };
        format!("cannot create TUN interface {name}: {e}{hint}")
    })?;
    tun.set_mtu(DEFAULT_MTU)
        .map_err(|e| format!("cannot set the MTU of {name}: {e}"))?;
    Ok(tun)
}

fn bring_up(name: &str, args: &InterfaceArgs) -> Result<Interface, String> {
    let relay = relay_config(args)?;
    let tun = create_tun(name)?;
    let config = Config {
        interface: InterfaceConfig {
            listen_port: Some(0),
            mtu: Some(DEFAULT_MTU),
            ..Default::default()
        },
        peers: Vec::new(),
    };
    let engine = Arc::new(Engine::new(&config).map_err(|e| format!("cannot start: {e}"))?);
    let (saver, restored) = match &args.state_dir {
        Some(dir) => {
            let (saver, state) = crate::persist::Saver::open(dir, name, &engine)?;
            (Some(saver), state)
        }
        None => (None, None),
    };
    engine
        .attach_tun(tun)
        .map_err(|e| format!("cannot start the TUN reader: {e}"))?;
    if let Some(state) = &restored {
        state.restore_interface(name)?;
    }
    if let Some(relay) = relay {
        let url = relay.url.clone();
        engine
            .start_relay(relay)
            .map_err(|e| format!("--relay-url {url}: {e}"))?;
    }
    if !args.stun_servers.is_empty() {
        engine
            .set_stun_servers(&args.stun_servers)
            .map_err(|e| format!("--stun-server: {e}"))?;
    }
    let uapi = UapiServer::start(engine.clone(), name).map_err(|e| {
        format!(
            "cannot listen on {}: {e}",
            UapiServer::socket_path(name).display()
        )
    })?;
    let metrics = match args.metrics_listen {
        Some(addr) => Some(
            crate::metrics::MetricsServer::start(addr, engine.clone(), name)
                .map_err(|e| format!("--metrics-listen {addr}: {e}"))?,
        ),
        None => None,
    };
    Ok(Interface {
        uapi,
        engine,
        saver,
        addresses: crate::netwatch::AddressWatch::new(name),
        _metrics: metrics,
    })
}

fn serve(
    name: &str,
    args: &InterfaceArgs,
    mut ready: Option<UnixStream>,
    keep_stdio: bool,
) -> CliResult {
    // Blocked here, before the engine starts threads, so every thread
    // inherits the mask and only the sigwait thread below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block()?;

    let mut iface = match bring_up(name, args) {
        Ok(i) => i,
        Err(e) => {
            if let Some(mut parent) = ready.take() {
                // The parent prints it; the daemon just ends.
                let _ = parent.write_all(e.as_bytes());
                std::process::exit(1);
            }
            return Err(e.into());
        }
    };
    tracing::info!(
        interface = name,
        port = iface.engine.listen_port(),
        socket = %iface.uapi.path().display(),
        "interface up"
    );
    let (sig_tx, sig_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("meshvpn-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = sig_tx.send(sig);
            }
        })?;
    if let Some(mut parent) = ready.take() {
        parent.write_all(READY)?;
        drop(parent);
        if !keep_stdio {
            detach_stdio()?;
        }
    }
    let reason = loop {
        match sig_rx.recv_timeout(DEVICE_POLL) {
            Ok(sig) => break format!("got {sig}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break "signal thread ended".into(),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if iface.engine.device_gone() {
            break "the interface was deleted".to_string();
        }
        if let Some(saver) = &mut iface.saver {
            saver.tick(&iface.engine);
        }
        iface.addresses.tick(&iface.engine);
    };
    tracing::info!(interface = name, "shutting down: {reason}");
    // Not saved on the way out: the interface (and its routes) may already
    // be gone, and the last tick saved everything that mattered.
    let Interface { uapi, engine, .. } = iface;
    drop(uapi);
    engine.close();
    Ok(())
}

/// Points stdin, stdout and stderr at /dev/null, so the daemon holds no
/// terminal or pipe of whoever started it (a caller reading our output
/// would otherwise wait for it forever).
fn detach_stdio() -> CliResult {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        interface: InterfaceArgs,
    }

    fn parse(args: &[&str]) -> Result<InterfaceArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("meshvpn").chain(args.iter().copied()))
            .map(|c| c.interface)
    }

    #[test]
    fn relay_cert_and_key_reach_the_relay_tls_config() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("meshvpn-daemon-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let node_key = KeyPair::generate().unwrap();
        let node = CertificateParams::new(Vec::new())
            .unwrap()
            .signed_by(&node_key, &ca_cert, &ca_key)
            .unwrap();
        let file = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let (ca, cert, key) = (
            file("ca.pem", ca_cert.pem()),
            file("node.pem", node.pem()),
            file("node.key", node_key.serialize_pem()),
        );
        let url = "wss://127.0.0.1:1/v1-meshvpn/relay";
        let base = ["wg0", "--relay-url", url, "--relay-ca", ca.as_str()];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());

        // The two go together, and need the CA.
        assert!(with(&["--relay-cert", &cert]).is_err());
        assert!(with(&["--relay-key", &key]).is_err());
        assert!(parse(&[
            "wg0",
            "--relay-url",
            url,
            "--relay-cert",
            &cert,
            "--relay-key",
            &key
        ])
        .is_err());

        let presents = |args: &InterfaceArgs| {
            relay_config(args)
                .unwrap()
                .unwrap()
                .tls
                .unwrap()
                .client_auth_cert_resolver
                .has_certs()
        };
        assert!(!presents(&with(&[]).unwrap()));
        assert!(presents(
            &with(&["--relay-cert", &cert, "--relay-key", &key]).unwrap()
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
