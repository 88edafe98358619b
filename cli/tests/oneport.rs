//! One port from the command line: a single `meshvpn tunnel serve --relay
//! --control-db DB` (TLS, on 127.0.0.1) serves a k3s agent's tunnel, a
//! relay client and the control protocol; two `meshvpn up --userspace`
//! nodes join through that port and carry TCP to each other over the
//! mesh; `meshvpn control nodes list|policy get --db DB` read the same
//! database while the server runs.
//!
//! Needs root, as `meshvpn up` does for its UAPI socket in
//! /var/run/wireguard (the CI runs as root). Traffic stays on loopback.
//! About 3 s.

#[path = "hostile/common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    free_port, legit_agent_connects, legit_relay_client_registers, Daemon, Server, TempDir, BIN,
};

/// How long any one step may take on a loaded machine.
const STEP: Duration = Duration::from_secs(20);

fn control(db: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("control")
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("MESHVPN_CONTROL_DB")
        .output()
        .expect("meshvpn control runs");
    assert!(
        out.status.success(),
        "meshvpn control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Waits until `node`'s output says it joined; returns its mesh IPv4.
/// On failure the node's status file says what it last got.
fn joined(node: &mut Daemon, state_dir: &Path) -> String {
    let t = Instant::now();
    loop {
        let log = node.log_text();
        // "joined the mesh at URL as NAME (node ID): IPV4 IPV6 (userspace)"
        if let Some(line) = log.lines().find(|l| l.starts_with("joined the mesh at")) {
            let (_, addrs) = line.split_once("): ").expect("addresses");
            return addrs.split(' ').next().expect("IPv4").to_string();
        }
        assert!(
            node.alive() && t.elapsed() < STEP,
            "the node did not join within {STEP:?}:\n{log}\nstatus: {}",
            std::fs::read_to_string(state_dir.join("status")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP service on loopback that answers each line with "echo: LINE".
fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 256];
                let _ = conn.set_read_timeout(Some(STEP));
                if let Ok(n) = conn.read(&mut buf) {
                    let mut reply = b"echo: ".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = conn.write_all(&reply);
                }
            });
        }
    });
    addr
}

/// Sends `msg` through the forward at `local` and returns the answer; the
/// forward accepts before the mesh is up, so a connection that closes
/// without an answer is retried until `STEP` runs out.
fn exchange(local: SocketAddr, msg: &[u8]) -> Result<Vec<u8>, String> {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < STEP {
        match TcpStream::connect_timeout(&local, Duration::from_secs(2)) {
            Ok(mut c) => {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                if let Err(e) = c.write_all(msg) {
                    last = format!("write: {e}");
                } else {
                    let mut got = Vec::new();
                    match c.read_to_end(&mut got) {
                        Ok(_) if !got.is_empty() => return Ok(got),
                        Ok(_) => last = "closed without an answer".into(),
                        Err(e) => last = format!("read: {e}"),
                    }
                }
            }
            Err(e) => last = format!("connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no answer through {local} within {STEP:?}: {last}"))
}

#[test]
fn tunnel_relay_and_control_share_one_port_from_the_cli() {
    let dir = TempDir::new("oneport");
    let db = dir.path().join("control.db");
    // Only TCP to port 7000 between nodes: the server sets it at start.
    let policy = dir.file(
        "policy.json",
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:7000"], "proto": "tcp"}]}"#,
    );
    let db_arg = db.display().to_string();
    let policy_arg = policy.display().to_string();
    // The relay URL comes from the port the harness picks, so the map's
    // relay URL is checked only as text: the nodes reach each other by UDP.
    let server = Server::start(&[
        "--relay",
        "--control-db",
        &db_arg,
        "--policy-file",
        &policy_arg,
        "--map-relay-url",
        "wss://relay.example:6443/v1-meshvpn/relay",
        "--stun-listen",
        "off",
    ]);
    let took = legit_agent_connects(&server, STEP).expect("a k3s agent on the shared port");
    println!("agent connected in {took:?}");
    let took = legit_relay_client_registers(&server, None, STEP)
        .expect("a relay client on the shared port");
    println!("relay client registered in {took:?}");

    let key = control(&db, &["keys", "create", "--reusable"]);
    let key_file = dir.file("join.key", key.trim());
    let url = format!("wss://{}/v1-meshvpn/control", server.addr);
    let echo = echo_service();
    // Interface names (for the UAPI socket) unique to this run, <= 15 bytes.
    let tag = std::process::id() % 100_000;
    let node = |name: &str, extra: &[String]| {
        let state = dir.path().join(name);
        let mut args: Vec<String> = [
            "up",
            "--userspace",
            "--control",
            &url,
            "--ca",
            &server.pki.ca_file.display().to_string(),
            "--join-key-file",
            &key_file.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--interface",
            &format!("op{tag}{name}"),
            "--hostname",
            &format!("oneport-{name}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        Daemon::spawn(&args, dir.path().join(format!("{name}.log")))
    };

    let t = Instant::now();
    // a serves the echo service on its mesh address, port 7000.
    let mut a = node("a", &["--remote".into(), format!("0.0.0.0:7000={echo}")]);
    let ip_a = joined(&mut a, &dir.path().join("a"));
    // b forwards a local port to a's mesh address.
    let local: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut b = node("b", &["--local".into(), format!("{local}={ip_a}:7000")]);
    let ip_b = joined(&mut b, &dir.path().join("b"));
    println!("a {ip_a} and b {ip_b} joined in {:?}", t.elapsed());

    let answer = exchange(local, b"hello over the mesh")
        .unwrap_or_else(|e| panic!("{e}\na:\n{}\nb:\n{}", a.log_text(), b.log_text()));
    assert_eq!(answer, b"echo: hello over the mesh");
    println!(
        "b -> a over the mesh: TCP answered {:?} after joining",
        t.elapsed()
    );

    // The operator's commands read the database the server serves.
    let nodes = control(&db, &["nodes", "list"]);
    for (name, ip) in [("oneport-a", &ip_a), ("oneport-b", &ip_b)] {
        let line = nodes
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not in `nodes list`:\n{nodes}"));
        assert!(line.contains(ip.as_str()), "{line}");
        assert!(line.contains(" yes "), "{name} is not connected: {line}");
    }
    let out = Command::new(BIN)
        .args(["control", "--db", &db_arg, "policy", "get"])
        .output()
        .expect("policy get");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("policy version 1"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("*:7000"));
    // The node got the policy and the relay URL in its map.
    let status = Command::new(BIN)
        .args(["up", "--status", "--state-dir"])
        .arg(dir.path().join("b"))
        .output()
        .expect("up --status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("policy version 1"), "{status}");
    assert!(status.contains("relay available"), "{status}");

    // And the port still takes agents with both nodes in session.
    legit_agent_connects(&server, STEP).expect("an agent after the nodes joined");
    assert!(a.alive() && b.alive());
}
