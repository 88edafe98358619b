//! Scale of the control server: N simulated nodes (the real node client,
//! in this process) join one `meshvpn control serve` (its own process, so
//! its memory is measured alone): the time until every node holds the
//! converged map (all N-1 peers, each online), the server's peak RSS, and
//! then the time one change (a node removed from the CLI's store handle)
//! takes to reach every node.
//!
//! `cargo test --release -p meshvpn-cli --test control_scale -- --ignored --nocapture`
//! (CI suite `control_scale`); MESHVPN_SCALE_NODES changes N (default 1000).
//! MESHVPN_SCALE_BIN runs another build's `meshvpn` as the server, to
//! compare builds on one machine at one load; that build's own CLI then
//! creates the join key and removes the node, so the database keeps the
//! schema it knows.
//! Targets: converged within 10 s, server RSS under 256 MiB.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::x25519::StaticSecret;
use meshvpn_control::client::{ControlClient, ControlClientConfig, JoinRequest};
use meshvpn_control::keys::{self, KeyOptions};
use meshvpn_control::proto::CONTROL_PATH;
use meshvpn_control::store::{SqliteStore, Store, StoreConfig};
use meshvpn_engine::PrivateKey;

/// Every node converged within this, or the test fails (the target is
/// 10 s; the bound leaves room for a loaded CI machine).
const CONVERGE_LIMIT: Duration = Duration::from_secs(40);
const TARGET: Duration = Duration::from_secs(10);
const RSS_LIMIT_KIB: u64 = 256 << 10;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[test]
#[ignore = "scale: run by `.ci/test-all` suite control_scale"]
fn a_thousand_nodes_join_one_control_server() {
    let n: usize = std::env::var("MESHVPN_SCALE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    raise_open_file_limit();
    let dir: PathBuf = std::env::temp_dir().join(format!("meshvpn-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("control.db");
    let other_bin = std::env::var_os("MESHVPN_SCALE_BIN").map(PathBuf::from);
    let bin = other_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshvpn")));
    let control = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(["control", "--db"])
            .arg(&db)
            .args(args)
            .output()
            .expect("meshvpn runs");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let cli = match other_bin {
        Some(_) => None,
        None => Some(SqliteStore::open(&db, &StoreConfig::default()).unwrap()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = match &cli {
        Some(cli) => {
            keys::create(
                cli,
                &KeyOptions {
                    reusable: true,
                    ..Default::default()
                },
                now,
                &ring::rand::SystemRandom::new(),
            )
            .unwrap()
            .text
        }
        None => zeroize::Zeroizing::new(
            control(&["keys", "create", "--reusable"])
                .lines()
                .next()
                .unwrap()
                .trim()
                .to_string(),
        ),
    };

    let limit = (n + 16).to_string();
    let mut child = Command::new(&bin)
        .args(["control", "--db"])
        .arg(&db)
        .args(["serve", "--plain", "--listen", "127.0.0.1:0"])
        .args([
            "--max-sessions",
            &limit,
            "--max-sessions-per-source",
            &limit,
        ])
        .args(["--max-handshakes-per-source", "256"])
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("meshvpn runs");
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("server said {line:?}"))
        .to_string();
    let pid = server.0.id();
    let idle = rss_kib(pid).0;

    let url = format!("ws://{addr}{CONTROL_PATH}");
    let start = Instant::now();
    let clients: Vec<ControlClient> = (0..n)
        .map(|i| {
            let request = JoinRequest {
                join_key: Some(key.clone()),
                hostname: format!("node{i}"),
                routes: vec![format!("10.{}.{}.0/24", 42 + i / 256, i % 256)
                    .parse()
                    .unwrap()],
                endpoints: vec![format!("192.0.2.{}:{}", i % 250 + 1, 40000 + i)
                    .parse()
                    .unwrap()],
                ..Default::default()
            };
            let mut config = ControlClientConfig::new(url.clone(), request);
            config.backoff_initial = Duration::from_millis(100);
            config.backoff_max = Duration::from_secs(1);
            let secret = StaticSecret::from(*PrivateKey::generate().as_bytes());
            ControlClient::start(config, secret).unwrap()
        })
        .collect();
    let started = start.elapsed();
    let mut peak = 0;
    for (i, c) in clients.iter().enumerate() {
        let left = CONVERGE_LIMIT.saturating_sub(start.elapsed());
        let ok = c.wait(left, |s, _| {
            s.peers.len() == n - 1 && s.peers.values().all(|p| p.online)
        });
        peak = peak.max(rss_kib(pid).1);
        assert!(
            ok,
            "node {i} not converged after {:?}: {} of {} peers, {:?}",
            start.elapsed(),
            c.state().peers.len(),
            n - 1,
            c.status()
        );
    }
    let converged = start.elapsed();
    let (rss, hwm) = rss_kib(pid);
    peak = peak.max(hwm);
    println!(
        "{n} nodes: clients started in {started:?}; converged map on every node after {converged:?} (target {TARGET:?})"
    );
    println!(
        "control server CPU until convergence: {:.1} s",
        cpu_secs(pid)
    );
    println!(
        "control server RSS: idle {} MiB, after convergence {} MiB, peak {} MiB (target {} MiB)",
        idle >> 10,
        rss >> 10,
        peak >> 10,
        RSS_LIMIT_KIB >> 10
    );

    // One change from the operator's side reaches every node.
    let victim = clients[n - 1].state().node.unwrap().node_id;
    let t = Instant::now();
    match &cli {
        Some(cli) => assert!(cli.remove_node(victim).unwrap().is_some()),
        None => {
            control(&["nodes", "remove", &victim.to_string()]);
        }
    }
    for (i, c) in clients[..n - 1].iter().enumerate() {
        let left = Duration::from_secs(5).saturating_sub(t.elapsed());
        assert!(
            c.wait(left, |s, _| !s.peers.contains_key(&victim)),
            "node {i} still has the removed peer after {:?}",
            t.elapsed()
        );
    }
    let delivered = t.elapsed();
    println!("a removal reached all {} nodes after {delivered:?}", n - 1);

    drop(clients);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(converged <= CONVERGE_LIMIT);
    assert!(
        peak <= RSS_LIMIT_KIB,
        "server peak RSS {} MiB over {} MiB",
        peak >> 10,
        RSS_LIMIT_KIB >> 10
    );
    assert!(delivered < Duration::from_secs(5));
}
