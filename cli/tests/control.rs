//! `meshvpn control keys|nodes|routes|policy ...` as an operator runs them, against a database that the library (standing in for the
//! control server) uses at the same time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshvpn_control::keys::{self, JoinError};
use meshvpn_control::routes::{self, RouteStatus};
use meshvpn_control::store::{SqliteStore, Store, StoreConfig};
use meshvpn_control::{NodeRequest, RedeemError};
use meshvpn_engine::{IpPrefix, PrivateKey};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("meshvpn-cli-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn control(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshvpn"))
        .arg("control")
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("MESHVPN_CONTROL_DB")
        .output()
        .expect("meshvpn runs")
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fails(o: Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stderr).unwrap()
}

fn server(db: &Path) -> SqliteStore {
    SqliteStore::open(
        db,
        &StoreConfig {
            create: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn node(host: &str) -> NodeRequest {
    NodeRequest {
        public_key: PrivateKey::generate().public_key(),
        hostname: host.into(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn key_line<'a>(list: &'a str, id: &str) -> &'a str {
    list.lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not in\n{list}"))
}

#[test]
fn keys_create_list_revoke_and_what_a_node_then_gets() {
    let dir = TempDir::new("keys");
    let db = dir.0.join("control.db");
    let created = control(
        &db,
        &[
            "keys",
            "create",
            "--expiry",
            "24h",
            "--tags",
            "tag:k3s,tag:cluster-a",
            "--cluster",
            "k3s-east",
        ],
    );
    let stderr = String::from_utf8_lossy(&created.stderr).to_string();
    let text = ok(created);
    let text = text.trim();
    assert!(
        text.starts_with("mvpn-key-") && !text.contains('\n'),
        "stdout is the key alone: {text:?}"
    );
    let id = keys::parse(text).unwrap().id;
    assert!(
        stderr.contains("single-use") && stderr.contains("shown only now"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&text[text.len() - 64..]),
        "the secret is on stdout only"
    );

    let list = ok(control(&db, &["keys", "list"]));
    let line = key_line(&list, &id);
    assert!(
        line.contains("valid")
            && line.contains("tag:cluster-a,tag:k3s")
            && line.contains("k3s-east"),
        "{line}"
    );
    assert!(stderr.contains("cluster k3s-east"), "{stderr}");
    assert!(
        !list.contains(&text[text.len() - 64..]),
        "list shows no secret"
    );

    // The server redeems it while the CLI has the file: once only.
    let store = server(&db);
    let n = keys::redeem(&store, text, &node("k3s-server-1"), now()).unwrap();
    assert_eq!(n.tags, vec!["tag:cluster-a", "tag:k3s"]);
    assert_eq!(n.cluster.as_deref(), Some("k3s-east"));
    let nodes = ok(control(&db, &["nodes", "list"]));
    assert!(
        nodes
            .lines()
            .any(|l| l.contains("k3s-server-1") && l.contains("k3s-east")),
        "{nodes}"
    );
    match keys::redeem(&store, text, &node("other"), now()) {
        Err(RedeemError::Join(JoinError::AlreadyUsed)) => {}
        other => panic!("{other:?}"),
    }
    assert!(key_line(&ok(control(&db, &["keys", "list"])), &id).contains("used"));

    let reusable = ok(control(
        &db,
        &["keys", "create", "--reusable", "--ephemeral"],
    ));
    let reusable = reusable.trim();
    let rid = keys::parse(reusable).unwrap().id;
    // Revoke by the full text: only the id is used.
    assert!(ok(control(&db, &["keys", "revoke", reusable])).contains(&rid));
    assert!(key_line(&ok(control(&db, &["keys", "list"])), &rid).contains("revoked"));
    match keys::redeem(&store, reusable, &node("late"), now()) {
        Err(RedeemError::Join(JoinError::Revoked)) => {}
        other => panic!("{other:?}"),
    }
    assert!(fails(control(&db, &["keys", "revoke", "00000000deadbeef"]))
        .contains("no join key 00000000deadbeef"));
    assert!(fails(control(&db, &["keys", "create", "--tags", "k3s"])).contains("is not a tag"));
    assert!(
        fails(control(&db, &["keys", "create", "--cluster", "East Coast"]))
            .contains("is not a cluster name")
    );
    let bad_expiry = control(&db, &["keys", "create", "--expiry", "tomorrow"]);
    assert!(!bad_expiry.status.success());
    assert!(String::from_utf8_lossy(&bad_expiry.stderr).contains("is not a duration"));
}

#[test]
fn nodes_list_and_remove_by_id_name_or_key() {
    let dir = TempDir::new("nodes");
    let db = dir.0.join("control.db");
    let key = ok(control(&db, &["keys", "create", "--reusable"]));
    let store = server(&db);
    let a = keys::redeem(&store, key.trim(), &node("alpha"), now()).unwrap();
    let b = keys::redeem(&store, key.trim(), &node("beta"), now()).unwrap();
    let c = keys::redeem(&store, key.trim(), &node("gamma"), now()).unwrap();
    let list = ok(control(&db, &["nodes", "list"]));
    for n in [&a, &b, &c] {
        let line = list
            .lines()
            .find(|l| l.contains(&n.name))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(
            line.contains(&n.ipv4.to_string()) && line.contains(&n.ipv6.to_string()),
            "{line}"
        );
        assert!(line.contains(&n.public_key.to_base64()), "{line}");
        assert!(line.contains("no, since "), "not connected yet: {line}");
    }
    assert!(ok(control(&db, &["nodes", "remove", "beta"])).contains(&b.ipv4.to_string()));
    assert!(ok(control(&db, &["nodes", "remove", &a.id.to_string()])).contains("alpha"));
    assert!(ok(control(
        &db,
        &["nodes", "remove", &c.public_key.to_base64()]
    ))
    .contains("gamma"));
    assert!(
        store.list_nodes().unwrap().is_empty(),
        "the server sees the removals"
    );
    assert!(fails(control(&db, &["nodes", "remove", "beta"])).contains("no node beta"));
}

#[test]
fn missing_and_damaged_databases_fail_clearly() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("missing.db");
    for args in [
        &["keys", "list"][..],
        &["nodes", "list"],
        &["keys", "revoke", "x"],
        &["nodes", "remove", "1"],
    ] {
        let e = fails(control(&missing, args));
        assert!(
            e.contains("no control database at") && e.contains("missing.db"),
            "{args:?}: {e}"
        );
    }
    assert!(!missing.exists(), "only `keys create` creates the database");
    let damaged = dir.0.join("damaged.db");
    std::fs::write(&damaged, vec![0xa5u8; 16384]).unwrap();
    for args in [&["keys", "list"][..], &["keys", "create"]] {
        let e = fails(control(&damaged, args));
        assert!(e.contains("damaged or not a database"), "{e}");
    }
    // --state-dir: control.db inside it, created by `keys create`.
    let state = dir.0.join("state");
    let o = Command::new(env!("CARGO_BIN_EXE_meshvpn"))
        .args(["control", "--state-dir"])
        .arg(&state)
        .args(["keys", "create"])
        .env_remove("MESHVPN_CONTROL_DB")
        .output()
        .unwrap();
    ok(o);
    assert!(state.join("control.db").exists());
}

#[test]
fn parallel_cli_writers_share_the_database() {
    const PROCS: usize = 8;
    let dir = TempDir::new("parallel");
    let db = dir.0.join("control.db");
    // The first create makes the file; the others race on it.
    ok(control(&db, &["keys", "create"]));
    let children: Vec<_> = (0..PROCS)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_meshvpn"))
                .arg("control")
                .arg("--db")
                .arg(&db)
                .args(["keys", "create", "--reusable"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let store = server(&db);
    let k = keys::create(
        &store,
        &Default::default(),
        now(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    keys::redeem(&store, &k.text, &node("during"), now()).unwrap();
    for c in children {
        ok(c.wait_with_output().unwrap());
    }
    assert_eq!(store.list_keys().unwrap().len(), PROCS + 2);
    store.integrity_check().unwrap();
}

/// `meshvpn control keys create` processes, four at a time, SIGKILLed at
/// random points (one takes about 40 ms); every one that printed its key
/// (acknowledged it) must find it in the database afterwards, and the file
/// must stay consistent. Bounded: [`BATCHES`] batches, 60 s.
#[test]
fn sigkilled_cli_writers_lose_no_printed_key() {
    const BATCHES: usize = 12;
    const PER_BATCH: usize = 4;
    let dir = TempDir::new("sigkill");
    let db = dir.0.join("control.db");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill-point seed {seed}");
    let mut rand_below = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let started = std::time::Instant::now();
    let (mut acked, mut killed) = (Vec::new(), 0);
    for _ in 0..BATCHES {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            break;
        }
        let mut children: Vec<_> = (0..PER_BATCH)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_meshvpn"))
                    .arg("control")
                    .arg("--db")
                    .arg(&db)
                    .args(["keys", "create"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(rand_below(80)));
        for c in &mut children {
            let _ = c.kill(); // SIGKILL; an error means it had already exited
        }
        for c in children {
            let out = c.wait_with_output().unwrap();
            match out.status.code() {
                Some(0) => {
                    let text = String::from_utf8(out.stdout).unwrap();
                    acked.push(keys::parse(&text).expect("a whole key was printed").id);
                }
                None => killed += 1,
                Some(code) => panic!(
                    "keys create failed with {code}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        if db.exists() {
            let store = server(&db);
            store.integrity_check().unwrap();
            for id in &acked {
                assert!(store.key(id).unwrap().is_some(), "printed key {id} lost");
            }
        }
    }
    println!(
        "{} keys printed, {killed} processes killed, all printed keys present",
        acked.len()
    );
    // After all the kills the database still takes writes.
    let last = ok(control(&db, &["keys", "create"]));
    assert!(server(&db)
        .key(&keys::parse(&last).unwrap().id)
        .unwrap()
        .is_some());
}

const AUTO_APPROVE: &str = r#"{
  "tagOwners": {"tag:k3s": []},
  "acls": [{"action": "accept", "src": ["tag:k3s"], "dst": ["tag:k3s:*"]}],
  "autoApprovers": {"routes": {"10.42.0.0/16": ["tag:k3s"]}},
}
"#;

fn line_of<'a>(list: &'a str, node: &str, prefix: &str) -> &'a str {
    list.lines()
        .find(|l| l.contains(node) && l.contains(prefix))
        .unwrap_or_else(|| panic!("no {node} {prefix} in\n{list}"))
}

/// Two k3s clusters on one mesh, as an operator sees them: routes pending
/// without a policy, auto-approved once `policy set` gives autoApprovers,
/// the second cluster's 10.42.0.0/16 refused with both sides named, an
/// operator approval that would conflict refused, one that would not
/// accepted.
#[test]
fn routes_list_approve_and_cluster_conflicts() {
    let dir = TempDir::new("routes");
    let db = dir.0.join("control.db");
    let east_key = ok(control(
        &db,
        &[
            "keys",
            "create",
            "--reusable",
            "--tags",
            "tag:k3s",
            "--cluster",
            "east",
        ],
    ));
    let west_key = ok(control(
        &db,
        &[
            "keys",
            "create",
            "--reusable",
            "--tags",
            "tag:k3s",
            "--cluster",
            "west",
        ],
    ));
    let store = server(&db);
    let e1 = keys::redeem(&store, east_key.trim(), &node("east-1"), now()).unwrap();
    let e2 = keys::redeem(&store, east_key.trim(), &node("east-2"), now()).unwrap();
    let w1 = keys::redeem(&store, west_key.trim(), &node("west-1"), now()).unwrap();
    let p = |s: &str| s.parse::<IpPrefix>().unwrap();
    // What the server does when the nodes advertise their pod CIDRs.
    routes::decide(&store, None, &e1, &[p("10.42.0.0/24")], now()).unwrap();
    routes::decide(&store, None, &e2, &[p("10.42.1.0/24")], now()).unwrap();

    let list = ok(control(&db, &["routes", "list"]));
    let line = line_of(&list, "east-1", "10.42.0.0/24");
    assert!(
        line.contains("pending")
            && line.contains("east")
            && line.contains("meshvpn control routes approve east-1 10.42.0.0/24"),
        "{line}"
    );

    let file = dir.0.join("policy.hujson");
    std::fs::write(&file, AUTO_APPROVE).unwrap();
    let out = ok(control(&db, &["policy", "set", file.to_str().unwrap()]));
    assert!(out.contains("policy version 1"), "{out}");
    assert!(
        out.contains("route 10.42.0.0/24 of node east-1 is now approved"),
        "{out}"
    );
    let list = ok(control(&db, &["routes", "list"]));
    for (n, pre) in [("east-1", "10.42.0.0/24"), ("east-2", "10.42.1.0/24")] {
        let line = line_of(&list, n, pre);
        assert!(
            line.contains("approved") && line.contains("autoApprovers"),
            "{line}"
        );
    }

    // The west cluster comes up on the k3s default pod CIDR.
    let got = routes::decide(
        &store,
        routes::stored_policy(&store).unwrap().as_ref(),
        &w1,
        &[p("10.42.0.0/16"), p("192.168.5.0/24")],
        now(),
    )
    .unwrap();
    assert!(matches!(got[0].1, RouteStatus::Refused(_)), "{got:?}");
    let list = ok(control(&db, &["routes", "list"]));
    let line = line_of(&list, "west-1", "10.42.0.0/16");
    for needle in [
        "refused",
        "east-1",
        "cluster east",
        "cluster west",
        "10.42.0.0/24",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    assert!(line_of(&list, "west-1", "192.168.5.0/24").contains("pending"));

    let before = store.list_routes().unwrap();
    let e = fails(control(
        &db,
        &["routes", "approve", "west-1", "10.42.0.0/16"],
    ));
    for needle in [
        "cannot be approved",
        "east-1",
        "cluster east",
        "cluster west",
    ] {
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }
    assert_eq!(store.list_routes().unwrap(), before, "nothing stored");

    let out = ok(control(
        &db,
        &["routes", "approve", &w1.id.to_string(), "192.168.5.0/24"],
    ));
    assert!(
        out.contains("approved 192.168.5.0/24 for node west-1 (cluster west)"),
        "{out}"
    );
    let list = ok(control(&db, &["routes", "list"]));
    assert!(line_of(&list, "west-1", "192.168.5.0/24").contains("approved by the operator"));

    assert!(fails(control(
        &db,
        &["routes", "approve", "west-1", "10.99.0.0/16"]
    ))
    .contains("does not advertise 10.99.0.0/16"));
    assert!(fails(control(
        &db,
        &["routes", "approve", "west-1", "10.42.0.0/99"]
    ))
    .contains("is not a prefix"));
    assert!(fails(control(
        &db,
        &["routes", "approve", "nobody", "10.42.0.0/16"]
    ))
    .contains("no node nobody"));

    // East's node 1 is removed: west's /16 still overlaps east-2's /24;
    // east-2 removed too: the /16 is free and auto-approved.
    ok(control(&db, &["nodes", "remove", "east-1"]));
    let line_after = ok(control(&db, &["routes", "list"]));
    assert!(line_of(&line_after, "west-1", "10.42.0.0/16").contains("east-2"));
    let out = ok(control(&db, &["nodes", "remove", "east-2"]));
    assert!(
        out.contains("route 10.42.0.0/16 of node west-1 is now approved"),
        "{out}"
    );
    store.integrity_check().unwrap();
}

/// `policy set` with bad input: each error names the file, line and
/// column, and nothing is stored (the version and text stay); `policy
/// get` prints what was set, byte for byte.
#[test]
fn policy_set_validates_first_and_bad_input_loses_nothing() {
    let dir = TempDir::new("policy");
    let db = dir.0.join("control.db");
    let bad = dir.0.join("bad.hujson");
    // On a missing database a bad policy creates nothing.
    std::fs::write(&bad, "{\n  \"acls\": [,]\n}\n").unwrap();
    let e = fails(control(&db, &["policy", "set", bad.to_str().unwrap()]));
    assert!(
        e.contains("bad.hujson: line 2, column") && e.contains("nothing was stored"),
        "{e}"
    );
    assert!(!db.exists(), "a refused policy creates no database");
    let none = control(&db, &["keys", "create"]);
    ok(none);
    let got = control(&db, &["policy", "get"]);
    assert!(String::from_utf8_lossy(&got.stderr).contains("no policy set"));
    assert_eq!(ok(got), "");

    let good = dir.0.join("good.hujson");
    std::fs::write(&good, AUTO_APPROVE).unwrap();
    assert!(ok(control(&db, &["policy", "set", good.to_str().unwrap()])).contains("version 1"));

    let cases: &[(&str, &str)] = &[
        // An undefined tag in src, at the string's opening quote.
        (
            "{\n  \"tagOwners\": {\"tag:k3s\": []},\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"tag:nope\"], \"dst\": [\"*:*\"]},\n  ],\n}\n",
            "line 4, column 34",
        ),
        // A syntax error: a missing comma between members.
        ("{\n  \"tagOwners\": {}\n  \"acls\": []\n}\n", "line 3, column 3"),
        // Not a CIDR in autoApprovers.
        (
            "{\"tagOwners\": {\"tag:k3s\": []},\n \"autoApprovers\": {\"routes\": {\"10.42.0.0/99\": [\"tag:k3s\"]}}}",
            "line 2, column 31",
        ),
    ];
    for (text, at) in cases {
        std::fs::write(&bad, text).unwrap();
        let e = fails(control(&db, &["policy", "set", bad.to_str().unwrap()]));
        assert!(e.contains(&format!("bad.hujson: {at}")), "want {at}: {e}");
        assert!(e.contains("nothing was stored"), "{e}");
    }
    let e = fails(control(&db, &["policy", "set", "/nonexistent/policy.json"]));
    assert!(e.contains("cannot read /nonexistent/policy.json"), "{e}");

    let got = control(&db, &["policy", "get"]);
    assert!(String::from_utf8_lossy(&got.stderr).contains("policy version 1"));
    assert_eq!(ok(got), AUTO_APPROVE, "the good policy is intact");
    assert_eq!(server(&db).policy().unwrap().unwrap().version, 1);

    let v2 = "{\"tagOwners\": {\"tag:k3s\": []}}";
    std::fs::write(&good, v2).unwrap();
    assert!(ok(control(&db, &["policy", "set", good.to_str().unwrap()])).contains("version 2"));
    assert_eq!(ok(control(&db, &["policy", "get"])), v2);
}
