//! Shared pieces of the hostile suite: the real `meshvpn` binary as a child
//! process, its resource use read from `/proc`, a throwaway PKI, and the
//! legitimate clients that must keep getting through.

#![allow(dead_code)] // each case module uses a different part

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use meshvpn_engine::relay::{RelayClient, RelayConfig, RelayOwner};
use meshvpn_engine::supervisor::{Agent, AgentConfig, AllowList, OsDialer};
use meshvpn_engine::ws::tls;

/// The binary under attack, built by cargo for this test.
pub const BIN: &str = env!("CARGO_BIN_EXE_meshvpn");

/// The legitimate agent's client key and bearer token (in the server's
/// `--tokens` file).
pub const AGENT_KEY: &str = "system:node:legit";
pub const AGENT_TOKEN: &str = "hostile-suite-legit-agent-token";

/// A private directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "meshvpn-hostile-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory.
    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate for `system:node:NODE`, as PEM text and as files.
pub struct Pki {
    pub ca: String,
    pub node_cert: String,
    pub node_key: String,
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub node_cert_file: PathBuf,
    pub node_key_file: PathBuf,
}

pub fn pki(dir: &TempDir, node: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "meshvpn hostile suite CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let server_key = KeyPair::generate().expect("server key");
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    sp.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let server_cert = sp
        .signed_by(&server_key, &ca_cert, &ca_key)
        .expect("server cert");
    let node_key = KeyPair::generate().expect("node key");
    let mut np = CertificateParams::new(Vec::new()).expect("node params");
    np.distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    np.distinguished_name
        .push(DnType::CommonName, format!("system:node:{node}"));
    let node_cert = np
        .signed_by(&node_key, &ca_cert, &ca_key)
        .expect("node cert");
    Pki {
        ca_file: dir.file("ca.pem", ca_cert.pem()),
        server_cert_file: dir.file("server.pem", server_cert.pem()),
        server_key_file: dir.file("server.key", server_key.serialize_pem()),
        node_cert_file: dir.file("node.pem", node_cert.pem()),
        node_key_file: dir.file("node.key", node_key.serialize_pem()),
        ca: ca_cert.pem(),
        node_cert: node_cert.pem(),
        node_key: node_key.serialize_pem(),
    }
}

/// What a process holds, from `/proc/PID/status` and `/proc/PID/fd`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

impl Usage {
    /// `None` once the process is gone.
    pub fn of(pid: u32) -> Option<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        Some(Usage {
            rss_kib: field("VmRSS:"),
            threads: field("Threads:"),
            fds,
        })
    }

    pub fn max(self, other: Usage) -> Usage {
        Usage {
            rss_kib: self.rss_kib.max(other.rss_kib),
            threads: self.threads.max(other.threads),
            fds: self.fds.max(other.fds),
        }
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rss {:.1} MiB, {} threads, {} fds",
            self.rss_kib as f64 / 1024.0,
            self.threads,
            self.fds
        )
    }
}

/// The most a case lets the process hold at any sample.
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    pub rss_mib: u64,
    pub threads: u64,
    pub fds: u64,
}

impl Ceilings {
    /// Panics, naming the case and the resource, when `peak` is over.
    pub fn check(&self, case: &str, before: Usage, peak: Usage) {
        println!(
            "hostile {case}: before {before}; peak {peak}; ceilings rss {} MiB, {} threads, {} fds",
            self.rss_mib, self.threads, self.fds
        );
        assert!(
            peak.rss_kib <= self.rss_mib * 1024,
            "{case}: peak RSS {:.1} MiB over the ceiling of {} MiB",
            peak.rss_kib as f64 / 1024.0,
            self.rss_mib
        );
        assert!(
            peak.threads <= self.threads,
            "{case}: peak of {} threads over the ceiling of {}",
            peak.threads,
            self.threads
        );
        assert!(
            peak.fds <= self.fds,
            "{case}: peak of {} open files over the ceiling of {}",
            peak.fds,
            self.fds
        );
    }
}

/// Samples a process's usage every 20 ms in the background and keeps the
/// peak of each figure.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Usage>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = Usage::default();
            while !flag.load(Ordering::Relaxed) {
                if let Some(u) = Usage::of(pid) {
                    peak = peak.max(u);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(u) = Usage::of(pid) {
                peak = peak.max(u);
            }
            peak
        });
        Sampler { stop, thread }
    }

    /// Stops sampling and returns the peak.
    pub fn finish(self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler thread")
    }
}

/// A `meshvpn` child process, killed on drop; its stdout and stderr go to
/// a log file.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(args: &[String], log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).expect("daemon log");
        let err = out.try_clone().expect("daemon log");
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start meshvpn");
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn usage(&self) -> Usage {
        Usage::of(self.pid()).unwrap_or_default()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits up to `within` for the process to exit;
    /// `Some(elapsed)` when it did.
    pub fn signal_and_wait(&mut self, signal: i32, within: Duration) -> Option<Duration> {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running `meshvpn tunnel serve` with TLS on 127.0.0.1, a client CA, and
/// a token file admitting [`AGENT_KEY`] with [`AGENT_TOKEN`].
pub struct Server {
    pub daemon: Daemon,
    pub addr: SocketAddr,
    pub pki: Pki,
    pub dir: TempDir,
}

impl Server {
    /// Starts the server with `extra` arguments (e.g. `--relay`) and waits
    /// until it accepts TCP connections.
    pub fn start(extra: &[&str]) -> Server {
        let dir = TempDir::new("serve");
        let pki = pki(&dir, "legit-cert");
        let tokens = dir.file("tokens", format!("{AGENT_KEY} {AGENT_TOKEN}\n"));
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let mut args: Vec<String> = vec![
                "tunnel".into(),
                "serve".into(),
                "--listen".into(),
                addr.to_string(),
                "--cert".into(),
                pki.server_cert_file.display().to_string(),
                "--key".into(),
                pki.server_key_file.display().to_string(),
                "--client-ca".into(),
                pki.ca_file.display().to_string(),
                "--tokens".into(),
                tokens.display().to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut daemon = Daemon::spawn(&args, dir.path().join("serve.log"));
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) && daemon.alive() {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Server {
                        daemon,
                        addr,
                        pki,
                        dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Lost the port to someone else, or failed: try another port.
            eprintln!("tunnel serve did not come up: {}", daemon.log_text());
        }
        panic!("meshvpn tunnel serve did not start");
    }

    pub fn tunnel_url(&self) -> String {
        format!("wss://{}/v1-k3s/connect", self.addr)
    }

    pub fn relay_url(&self) -> String {
        format!("wss://{}/v1-meshvpn/relay", self.addr)
    }

    /// A client TLS config trusting the test CA, with the node certificate
    /// when `with_cert`.
    pub fn client_tls(&self, with_cert: bool) -> Arc<rustls::ClientConfig> {
        let cert =
            with_cert.then_some((self.pki.node_cert.as_bytes(), self.pki.node_key.as_bytes()));
        tls::client_config(self.pki.ca.as_bytes(), cert).expect("client TLS config")
    }
}

/// A legitimate agent (bearer token) connects to `server` within `within`;
/// returns how long it took, or the agent's last error.
pub fn legit_agent_connects(server: &Server, within: Duration) -> Result<Duration, String> {
    let mut cfg = AgentConfig::new(
        server.tunnel_url(),
        Arc::new(AllowList(Vec::new())),
        Arc::new(OsDialer::default()),
    );
    cfg.tls = Some(server.client_tls(false));
    cfg.token = Some(AGENT_TOKEN.into());
    cfg.backoff_initial = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(500);
    let t = Instant::now();
    let agent = Agent::start(cfg).map_err(|e| e.to_string())?;
    let ok = agent.wait_connected(within);
    let took = t.elapsed();
    let status = agent.status();
    agent.stop();
    if ok {
        Ok(took)
    } else {
        Err(format!(
            "legitimate agent not connected after {within:?}: {:?}",
            status.last_error
        ))
    }
}

/// The WireGuard key of a test relay client; it drops what it receives.
struct KeyOwner(StaticSecret);

impl RelayOwner for KeyOwner {
    fn static_secret(&self) -> Option<StaticSecret> {
        Some(self.0.clone())
    }
    fn deliver(&self, _source: &[u8; 32], _datagram: &[u8]) {}
}

/// A legitimate relay client (a fresh WireGuard key, the server's token
/// when `token` is set) registers with `server`'s relay within `within`.
pub fn legit_relay_client_registers(
    server: &Server,
    token: Option<&str>,
    within: Duration,
) -> Result<Duration, String> {
    let secret = StaticSecret::from(*meshvpn_engine::PrivateKey::generate().as_bytes());
    let mut cfg = RelayConfig::new(server.relay_url(), Some(server.client_tls(false)));
    cfg.token = token.map(str::to_owned);
    cfg.backoff_initial = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(500);
    let t = Instant::now();
    let client = RelayClient::start(cfg, Arc::new(KeyOwner(secret))).map_err(|e| e.to_string())?;
    let ok = client.wait_connected(within);
    let took = t.elapsed();
    let status = client.status();
    drop(client);
    if ok {
        Ok(took)
    } else {
        Err(format!(
            "legitimate relay client not registered after {within:?}: {:?}",
            status.last_error
        ))
    }
}
