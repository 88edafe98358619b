//! The `meshvpn` command as a user runs it: key tools (checked against
//! `wg` from wireguard-tools when it is installed), help and errors. The
//! daemon itself needs root and a network namespace: cli/tests/netns/run.sh.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn meshvpn(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshvpn"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshvpn runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn genkey_then_pubkey_matches_wg() {
    let key = meshvpn(&["genkey"], b"");
    assert!(key.status.success());
    let key = stdout(&key);
    assert_eq!(key.trim().len(), 44, "{key:?}");
    assert!(key.ends_with('\n'));
    let public = meshvpn(&["pubkey"], key.as_bytes());
    assert!(public.status.success());
    let public = stdout(&public);
    assert_eq!(public.trim().len(), 44);
    assert_ne!(public, key);

    // A fixed vector, independent of any installed tool.
    let vector = meshvpn(
        &["pubkey"],
        b"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n",
    );
    assert_eq!(
        stdout(&vector),
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\n"
    );

    match Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(mut wg) => {
            wg.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
            let out = wg.wait_with_output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), public);
        }
        Err(_) => eprintln!("wg not installed: compared against the fixed vector only"),
    }
}

#[test]
fn genpsk_gives_fresh_keys() {
    let a = stdout(&meshvpn(&["genpsk"], b""));
    let b = stdout(&meshvpn(&["genpsk"], b""));
    assert_eq!(a.trim().len(), 44);
    assert_ne!(a, b);
}

#[test]
fn pubkey_of_garbage_says_what_to_do() {
    let o = meshvpn(&["pubkey"], b"not a key\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("meshvpn genkey | meshvpn pubkey"), "{err}");
}

#[test]
fn help_version_and_bad_names() {
    let o = meshvpn(&["--help"], b"");
    assert!(o.status.success());
    let help = stdout(&o);
    for want in [
        "IFNAME",
        "--foreground",
        "genkey",
        "pubkey",
        "WG_QUICK_USERSPACE_IMPLEMENTATION",
    ] {
        assert!(help.contains(want), "--help lacks {want}");
    }
    let o = meshvpn(&["--version"], b"");
    assert_eq!(
        stdout(&o),
        format!("meshvpn {}\n", env!("CARGO_PKG_VERSION"))
    );
    // No arguments: usage, not a silent start.
    let o = meshvpn(&[], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Usage"));
    // Refused before anything is created.
    let o = meshvpn(&["-f", "much-too-long-name0"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an interface name"));
}

#[test]
fn relay_limit_flags_refuse_bad_values_before_listening() {
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "tunnel",
            "serve",
            "--plain",
            "--listen",
            "127.0.0.1:0",
            "--relay",
        ];
        args.extend_from_slice(extra);
        let o = meshvpn(&args, b"");
        assert_ne!(o.status.code(), Some(0), "{extra:?} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = serve(&["--relay-queue-bytes", "1000"]);
    assert!(e.contains("below one largest frame"), "{e}");
    let e = serve(&["--relay-queue-bytes", "4M", "--relay-budget-bytes", "1M"]);
    assert!(e.contains("below the queue bytes"), "{e}");
    let e = serve(&["--relay-budget-bytes", "lots"]);
    assert!(e.contains("not a byte count"), "{e}");
    let e = serve(&["--relay-write-timeout", "0"]);
    assert!(e.contains("--relay-write-timeout"), "{e}");
    // The limits belong to the relay.
    let o = meshvpn(
        &[
            "tunnel",
            "serve",
            "--plain",
            "--tokens",
            "/dev/null",
            "--relay-queue-bytes",
            "1M",
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(2));
}

/// flannel's extension commands, as flannel runs them (environment, stdin),
/// refuse bad input with a message and a non-zero exit before touching
/// anything; the whole flow with the real flanneld is
/// cli/tests/netns/flannel.sh.
#[test]
fn flannel_commands_refuse_bad_input() {
    let run = |args: &[&str], env: &[(&str, &str)], stdin: &[u8]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshvpn"));
        cmd.args(args)
            .env_remove("SUBNET")
            .env_remove("PUBLIC_IP")
            .env_remove("NETWORK")
            .env_remove("IPV6SUBNET")
            // An interface no daemon runs, so nothing real is reached.
            .env("MESHVPN_FLANNEL_INTERFACE", "mvnodaemon0")
            .env(
                "MESHVPN_STATE_DIR",
                std::env::temp_dir().join("meshvpn-cli-test"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("meshvpn runs");
        // A command that refuses its environment exits before reading.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let o = child.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let key = "3ZyGHtoi/cjh5cZT2G2jCZ9DoRfLFM6Rz9RGKXnPdXU=";
    let good = format!(r#"{{"v":1,"publicKey":"{key}","port":51820}}"#);
    let env = [("SUBNET", "10.42.3.0/24"), ("PUBLIC_IP", "10.0.0.3")];
    for (args, env, stdin, want) in [
        (
            &["flannel", "subnet-add"][..],
            &env[1..],
            good.as_str(),
            "SUBNET is not set",
        ),
        (
            &["flannel", "subnet-add"],
            &env[..1],
            &good,
            "PUBLIC_IP is not set",
        ),
        (
            &["flannel", "subnet-add"],
            &[("SUBNET", "10.42.3/99"), env[1]][..],
            &good,
            "not an address prefix",
        ),
        (&["flannel", "subnet-add"], &env, "{\"v\":1,", "not JSON"),
        (&["flannel", "subnet-add"], &env, "{\"v\":7}", "version 7"),
        (&["flannel", "subnet-add"], &env, "", "no backend-data"),
        (&["flannel", "subnet-add"], &env, &good, "not running"),
        (
            &["flannel", "subnet-remove"],
            &env,
            r#"{"v":1,"publicKey":"x","port":1}"#,
            "publicKey",
        ),
        (&["flannel", "subnet-remove"], &env, &good, "not running"),
        (&["flannel", "post-startup"], &env, "", "NETWORK is not set"),
        // Only the first 4 KiB of stdin are read: a flood is cut, not parsed.
        (
            &["flannel", "subnet-add"],
            &env,
            &format!("{good}{}", " ".repeat(1 << 20)),
            "not running",
        ),
        (
            &["flannel", "subnet-add"],
            &env,
            &format!("{}{good}", " ".repeat(1 << 20)),
            "no backend-data",
        ),
        (
            &["flannel", "pre-startup", "-i", "bad/name"],
            &[],
            "",
            "not an interface name",
        ),
    ] {
        let (code, err) = run(args, env, stdin.as_bytes());
        assert_eq!(code, Some(1), "{args:?} {env:?} {stdin:?}: {err}");
        assert!(
            err.contains(want),
            "{args:?} {env:?} {stdin:?}: {err} lacks {want}"
        );
    }
}

/// `meshvpn tunnel serve` answers STUN where `--stun-listen` says, and
/// `meshvpn stun probe` prints the address it was seen at; a bad
/// `--stun-listen` is refused before anything listens.
#[test]
fn stun_probe_against_tunnel_serve() {
    let e = meshvpn(
        &[
            "tunnel",
            "serve",
            "--plain",
            "--tokens",
            "/dev/null",
            "--listen",
            "127.0.0.1:0",
            "--stun-listen",
            "somewhere",
        ],
        b"",
    );
    assert_eq!(e.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&e.stderr).contains("bad --stun-listen"));

    let tokens = std::env::temp_dir().join(format!("meshvpn-stun-tokens-{}", std::process::id()));
    std::fs::write(&tokens, "k token\n").unwrap();
    // A free UDP port (released just before the server takes it).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stun = format!("127.0.0.1:{port}");
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_meshvpn"))
        .args([
            "tunnel",
            "serve",
            "--plain",
            "--listen",
            "127.0.0.1:0",
            "--stun-listen",
            &stun,
        ])
        .arg("--tokens")
        .arg(&tokens)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Retransmissions at 0, 0.5, 1.5 and 3.5 s cover the server's start.
    let o = meshvpn(
        &[
            "stun",
            "probe",
            &stun,
            "--from",
            "127.0.0.2:0",
            "--transmits",
            "5",
        ],
        b"",
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(&tokens);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("{stun} reflexive 127.0.0.2:")),
        "{out}"
    );
    assert!(out.contains("mapping: unknown"), "{out}");
}

/// A child killed when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_meshvpn"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("meshvpn runs"),
    )
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` from `addr`, or None while it does not answer.
fn scrape(addr: &str) -> Option<String> {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    c.read_to_string(&mut page).ok()?;
    Some(page)
}

/// `meshvpn tunnel connect --metrics-listen` shows the agent's own counts:
/// a target its policy refuses and an allowed target that refuses the
/// connection each move their series, through the real server.
#[test]
fn tunnel_connect_serves_the_agents_counters() {
    use std::time::{Duration, Instant};
    let dir =
        std::env::temp_dir().join(format!("meshvpn-cli-agent-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    let token = dir.join("token");
    std::fs::write(&tokens, "node1 s3cret-token\n").unwrap();
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let (server, dead, refused_fwd, dead_fwd, metrics) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let server_addr = format!("127.0.0.1:{server}");
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let _serve = spawn(&[
        "tunnel",
        "serve",
        "--plain",
        "--listen",
        &server_addr,
        "--tokens",
        tokens.to_str().unwrap(),
        "--forward",
        &format!("127.0.0.1:{refused_fwd}=node1/tcp/127.0.0.1:22"),
        "--forward",
        &format!("127.0.0.1:{dead_fwd}=node1/tcp/127.0.0.1:{dead}"),
    ]);
    let _agent = spawn(&[
        "tunnel",
        "connect",
        // No path: the agent adds /v1-k3s/connect.
        "--url",
        &format!("ws://{server_addr}"),
        "--token-file",
        token.to_str().unwrap(),
        "--allow",
        &format!("tcp/127.0.0.1:{dead}"),
        "--metrics-listen",
        &metrics_addr,
    ]);
    let series = |page: &str, name: &str| -> Option<u64> {
        let prefix =
            format!("meshvpn_tunnel_agent_{name}{{server=\"ws://{server_addr}/v1-k3s/connect\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let wait_for = |what: &str, ok: &dyn Fn(&str) -> bool| -> String {
        loop {
            if let Some(page) = scrape(&metrics_addr) {
                if ok(&page) {
                    return page;
                }
                assert!(Instant::now() < deadline, "{what}:\n{page}");
            }
            assert!(Instant::now() < deadline, "{what}: no metrics page");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let page = wait_for("connected", &|p| series(p, "connected") == Some(1));
    assert_eq!(series(&page, "sessions_total"), Some(1), "{page}");
    assert_eq!(series(&page, "streams_refused_total"), Some(0), "{page}");
    assert!(page.contains("# TYPE meshvpn_tunnel_agent_dials_failed_total counter"));
    assert!(!page.contains("s3cret"), "the token leaked into the page");

    // Through the forwards: the server dials through the agent.
    let poke = |port: u16| {
        use std::io::Read;
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.write_all(b"x");
            let _ = c.read(&mut [0u8; 16]);
        }
    };
    poke(refused_fwd);
    wait_for("a refused target", &|p| {
        series(p, "streams_refused_total") == Some(1)
    });
    poke(dead_fwd);
    let page = wait_for("a failed dial", &|p| {
        series(p, "dials_failed_total") == Some(1)
    });
    assert_eq!(series(&page, "streams_refused_total"), Some(1), "{page}");
    assert_eq!(series(&page, "streams_total"), Some(0), "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}
