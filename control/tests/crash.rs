//! Crash safety: a child process writes to the store (join keys, node
//! registrations in two clusters, route decisions, policy versions) and prints each write once the
//! store call has returned, i.e. once it would be acknowledged. The test
//! SIGKILLs it at random points, reopens the database, and checks that
//! every acknowledged write is there and the file is consistent
//! (`PRAGMA integrity_check`, foreign keys). Bounded: [`ROUNDS`] kills and
//! [`DEADLINE`] in all.
//!
//! The child is this test binary itself, run with `MESHVPN_CRASH_DB` set
//! and filtered to [`crash_writer_child`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshvpn_control::keys::{self, KeyOptions};
use meshvpn_control::routes::{self, RouteStatus};
use meshvpn_control::store::{SqliteStore, Store, StoreConfig};
use meshvpn_control::{NodeRequest, Policy};
use meshvpn_engine::{IpPrefix, PrivateKey, PublicKey};
use ring::rand::SystemRandom;

const ROUNDS: usize = 15;
const DEADLINE: Duration = Duration::from_secs(90);
/// The child stops by itself after this many writes or this long.
const CHILD_MAX_WRITES: usize = 5_000;
const CHILD_MAX_TIME: Duration = Duration::from_secs(30);
const ENV_DB: &str = "MESHVPN_CRASH_DB";
/// Threads writing beside the main writer.
const CHILD_EXTRA_WRITERS: usize = 3;

/// The writer. Does nothing in a normal test run (no `MESHVPN_CRASH_DB`).
#[test]
fn crash_writer_child() {
    let Some(db) = std::env::var_os(ENV_DB) else {
        return;
    };
    let store = std::sync::Arc::new(
        SqliteStore::open(&PathBuf::from(db), &StoreConfig::default()).unwrap(),
    );
    let rng = SystemRandom::new();
    // Writers on other threads, so the kill also lands inside batches of
    // the store's group commit: each acknowledges a key only after its
    // write returned.
    for _ in 0..CHILD_EXTRA_WRITERS {
        let store = store.clone();
        std::thread::spawn(move || {
            let rng = SystemRandom::new();
            let start = Instant::now();
            for i in 0..CHILD_MAX_WRITES {
                if start.elapsed() > CHILD_MAX_TIME {
                    break;
                }
                let now = 1_800_000_000 + i as u64;
                let key = keys::create(&*store, &KeyOptions::default(), now, &rng).unwrap();
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK key {}", key.record.id).unwrap();
                out.flush().unwrap();
            }
        });
    }
    let store = &*store;
    let policy = Policy::parse(
        r#"{"tagOwners": {"tag:k3s": []}, "autoApprovers": {"routes": {"10.42.0.0/16": ["tag:k3s"]}}}"#,
    )
    .unwrap();
    let start = Instant::now();
    for i in 0..CHILD_MAX_WRITES {
        if start.elapsed() > CHILD_MAX_TIME {
            break;
        }
        let mut out = std::io::stdout().lock();
        let now = 1_800_000_000 + i as u64;
        // Two clusters taking turns; nodes 6k and 6k+3 (one of each)
        // advertise the same pod CIDR, so half the decisions are conflicts.
        let opts = KeyOptions {
            tags: vec!["tag:k3s".into()],
            cluster: Some(if i % 2 == 0 { "a" } else { "b" }.into()),
            ..Default::default()
        };
        let key = keys::create(store, &opts, now, &rng).unwrap();
        writeln!(out, "ACK key {}", key.record.id).unwrap();
        let pk = PrivateKey::generate().public_key();
        let req = NodeRequest {
            public_key: pk,
            hostname: format!("n{i}"),
        };
        let node = keys::redeem(store, &key.text, &req, now).unwrap();
        writeln!(out, "ACK node {} {} {}", pk.to_base64(), node.id, node.ipv4).unwrap();
        if i % 3 == 0 {
            let route: IpPrefix = format!("10.42.{}.0/24", (i / 6) % 256).parse().unwrap();
            let got = routes::decide(store, Some(&policy), &node, &[route], now).unwrap();
            writeln!(out, "ACK route {} {route} {}", node.id, got[0].1.word()).unwrap();
        }
        if i % 7 == 0 {
            let v = store
                .set_policy(&format!("{{\"acls\": [], \"n\": {i}}}"), now)
                .unwrap();
            writeln!(out, "ACK policy {v}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[derive(Default)]
struct Acked {
    keys: Vec<String>,
    nodes: HashMap<String, (i64, String)>,
    routes: Vec<(i64, String, String)>,
    policy: u64,
    policies: usize,
}

impl Acked {
    fn add(&mut self, line: &str) {
        let f: Vec<&str> = line.split(' ').collect();
        match f[..] {
            ["ACK", "key", id] => self.keys.push(id.into()),
            ["ACK", "node", pk, id, ip] => {
                self.nodes
                    .insert(pk.into(), (id.parse().unwrap(), ip.into()));
            }
            ["ACK", "route", id, p, status] => {
                self.routes
                    .push((id.parse().unwrap(), p.into(), status.into()))
            }
            ["ACK", "policy", v] => {
                self.policy = self.policy.max(v.parse().unwrap());
                self.policies += 1;
            }
            _ => panic!("unexpected line {line:?}"),
        }
    }
    fn count(&self) -> usize {
        self.keys.len() + self.nodes.len() + self.routes.len() + self.policies
    }
}

/// xorshift64*: enough to spread the kill points; the seed is printed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[test]
fn sigkill_during_acknowledged_writes_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("meshvpn-control-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("control.db");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    println!("kill-point seed {seed}");
    let started = Instant::now();
    let mut acked = Acked::default();
    let mut rounds = 0;
    let mut mid_write_kills = 0;
    while rounds < ROUNDS && started.elapsed() < DEADLINE {
        rounds += 1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_DB, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            // Only whole lines: a line cut by the kill was never acknowledged.
            // libtest may print `test crash_writer_child ... ` before the first.
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            while matches!(stdout.read_line(&mut line), Ok(n) if n > 0) {
                if let (Some(at), true) = (line.find("ACK "), line.ends_with('\n')) {
                    if tx.send(line[at..].trim_end().to_string()).is_err() {
                        break;
                    }
                }
                line.clear();
            }
        });
        // Most rounds: kill a random while after the first acknowledged write
        // (mid-stream). Some rounds: kill soon after start (during open or
        // the first migration, on the first round).
        let mut first = None;
        if rounds % 4 != 1 {
            first = rx.recv_timeout(Duration::from_secs(20)).ok();
            mid_write_kills += 1;
            std::thread::sleep(Duration::from_micros(rng.below(200_000)));
        } else {
            std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        reader.join().unwrap();
        let before = acked.count();
        for line in first.into_iter().chain(rx.try_iter()) {
            acked.add(&line);
        }
        assert!(
            status.code().is_none(),
            "the writer was killed, not finished: {status:?}"
        );
        verify(&db, &acked, rounds);
        println!(
            "round {rounds}: {} new acknowledged writes, {} in all",
            acked.count() - before,
            acked.count()
        );
    }
    assert!(mid_write_kills >= ROUNDS / 2 || started.elapsed() >= DEADLINE);
    assert!(
        acked.count() > 0,
        "the writer acknowledged nothing: the test proved nothing"
    );
    println!(
        "{rounds} SIGKILLs, {} acknowledged writes ({} keys, {} nodes, {} route decisions of which {} refused, policy v{}), all present, integrity ok, {:?}",
        acked.count(),
        acked.keys.len(),
        acked.nodes.len(),
        acked.routes.len(),
        acked.routes.iter().filter(|r| r.2 == "refused").count(),
        acked.policy,
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn verify(db: &std::path::Path, acked: &Acked, round: usize) {
    if !db.exists() {
        assert_eq!(
            acked.count(),
            0,
            "round {round}: acknowledged writes but no database"
        );
        return;
    }
    let store = SqliteStore::open(
        db,
        &StoreConfig {
            create: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
    store
        .integrity_check()
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
    for id in &acked.keys {
        assert!(
            store.key(id).unwrap().is_some(),
            "round {round}: acknowledged key {id} lost"
        );
    }
    let nodes = store.list_nodes().unwrap();
    for (pk, (id, ip)) in &acked.nodes {
        let pk = PublicKey::from_base64(pk).unwrap();
        let n = nodes
            .iter()
            .find(|n| n.public_key == pk)
            .unwrap_or_else(|| panic!("round {round}: acknowledged node {id} lost"));
        assert_eq!(
            (n.id, n.ipv4.to_string()),
            (*id, ip.clone()),
            "round {round}"
        );
        let key = store.key(n.join_key.as_deref().unwrap()).unwrap().unwrap();
        assert_eq!(key.uses, 1, "round {round}: node {id}'s key");
    }
    let routes = store.list_routes().unwrap();
    for (id, p, status) in &acked.routes {
        // Routes are never withdrawn here, so an acknowledged decision
        // stands: an approved route blocks for good, and only approved
        // routes block.
        let r = routes
            .iter()
            .find(|r| r.node_id == *id && r.prefix.to_string() == *p)
            .unwrap_or_else(|| panic!("round {round}: acknowledged route {p} of node {id} lost"));
        assert_eq!(
            r.status.word(),
            status,
            "round {round}: route {p} of node {id}"
        );
    }
    // Never two clusters on one prefix, whatever was killed where.
    let approved: Vec<_> = routes
        .iter()
        .filter(|r| r.status == RouteStatus::Approved)
        .collect();
    for a in &approved {
        for b in &approved {
            assert!(
                a.cluster == b.cluster || a.prefix != b.prefix,
                "round {round}: {} approved for {} and {}",
                a.prefix,
                a.node_name,
                b.node_name
            );
        }
    }
    let v = store.policy().unwrap().map_or(0, |p| p.version);
    assert!(
        v >= acked.policy,
        "round {round}: policy v{} acknowledged, v{v} stored",
        acked.policy
    );
}
