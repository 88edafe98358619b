//! Route decisions over a real store: auto-approval by the policy, pending
//! without it, operator approval, conflicts between clusters (overlap, not
//! only equality) named on both sides, the policy changing under approved
//! routes, refused routes freed when the other side goes, and two
//! clusters racing for one prefix.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use meshvpn_control::keys::{self, KeyOptions};
use meshvpn_control::routes::{
    self, plan, Approver, Conflict, RouteChange, RouteError, RouteStatus, RouteTable, Target,
};
use meshvpn_control::store::{RouteRecord, SqliteStore, Store, StoreConfig};
use meshvpn_control::{NodeRecord, NodeRequest, Policy};
use meshvpn_engine::{IpPrefix, PrivateKey};
use ring::rand::SystemRandom;

const NOW: u64 = 1_800_000_000;

const POLICY: &str = r#"{
  "tagOwners": {"tag:k3s": []},
  "autoApprovers": {"routes": {
    "10.42.0.0/16": ["tag:k3s"],
    "10.43.0.0/16": ["tag:k3s"],
  }},
}"#;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "meshvpn-control-routes-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn db(&self) -> PathBuf {
        self.0.join("control.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, &StoreConfig::default()).unwrap()
}

fn p(s: &str) -> IpPrefix {
    s.parse().unwrap()
}

/// A node registered with a key of `cluster` carrying tag:k3s.
fn join(store: &dyn Store, host: &str, cluster: Option<&str>) -> NodeRecord {
    let key = keys::create(
        store,
        &KeyOptions {
            tags: vec!["tag:k3s".into()],
            cluster: cluster.map(str::to_string),
            ..Default::default()
        },
        NOW,
        &SystemRandom::new(),
    )
    .unwrap();
    let req = NodeRequest {
        public_key: PrivateKey::generate().public_key(),
        hostname: host.into(),
    };
    keys::redeem(store, &key.text, &req, NOW).unwrap()
}

fn status_of(store: &dyn Store, node: &NodeRecord, prefix: &str) -> RouteRecord {
    store
        .list_routes()
        .unwrap()
        .into_iter()
        .find(|r| r.node_id == node.id && r.prefix == p(prefix))
        .unwrap_or_else(|| panic!("no route {prefix} of {}", node.name))
}

fn refused(status: &RouteStatus) -> &Conflict {
    match status {
        RouteStatus::Refused(c) => c,
        other => panic!("expected refused, got {other}"),
    }
}

#[test]
fn second_cluster_on_the_same_pod_cidr_is_refused_naming_both_sides() {
    let dir = TempDir::new("clusters");
    let store = open(&dir.db());
    let policy = Policy::parse(POLICY).unwrap();
    let pol = Some(&policy);

    // Cluster east: per-node pod CIDRs inside 10.42.0.0/16, auto-approved,
    // no conflict between them.
    let e1 = join(&store, "east-1", Some("east"));
    let e2 = join(&store, "east-2", Some("east"));
    let got = routes::decide(&store, pol, &e1, &[p("10.42.0.0/24")], NOW).unwrap();
    assert_eq!(got, [(p("10.42.0.0/24"), RouteStatus::Approved)]);
    let got = routes::decide(&store, pol, &e2, &[p("10.42.1.0/24")], NOW).unwrap();
    assert_eq!(got, [(p("10.42.1.0/24"), RouteStatus::Approved)]);
    assert_eq!(
        status_of(&store, &e2, "10.42.1.0/24").approved_by,
        Some(Approver::Policy)
    );

    // Cluster west, the k3s default pod CIDR again: the /16 overlaps east's
    // /24s (overlap, not equality), a /24 overlaps the same /24.
    let w1 = join(&store, "west-1", Some("west"));
    let w2 = join(&store, "west-2", Some("west"));
    let got = routes::decide(&store, pol, &w1, &[p("10.42.0.0/16")], NOW).unwrap();
    let c = refused(&got[0].1);
    assert_eq!(
        (c.prefix, c.other_node.as_str(), c.other_cluster.as_deref()),
        (p("10.42.0.0/24"), "east-1", Some("east"))
    );
    assert_eq!(c.cluster.as_deref(), Some("west"));
    let reason = got[0].1.to_string();
    for needle in [
        "refused",
        "10.42.0.0/24",
        "east-1",
        "cluster east",
        "cluster west",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in {reason}");
    }
    let got = routes::decide(&store, pol, &w2, &[p("10.42.1.0/24")], NOW).unwrap();
    assert_eq!(refused(&got[0].1).other_node, "east-2");

    // Stored, with the reason, for `routes list` and the map; east keeps
    // its routes.
    let r = status_of(&store, &w1, "10.42.0.0/16");
    assert!(!r.approved);
    assert_eq!(refused(&r.status).other_node, "east-1");
    assert!(status_of(&store, &e1, "10.42.0.0/24").approved);

    // West moves to 10.43.0.0/16: approved, and the refused rows are gone.
    let got = routes::decide(&store, pol, &w1, &[p("10.43.0.0/24")], NOW).unwrap();
    assert_eq!(got, [(p("10.43.0.0/24"), RouteStatus::Approved)]);
    let got = routes::decide(&store, pol, &w2, &[p("10.43.1.0/24")], NOW).unwrap();
    assert_eq!(got, [(p("10.43.1.0/24"), RouteStatus::Approved)]);
    let all = store.list_routes().unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.approved), "{all:?}");

    // The reverse overlap: a /24 inside another cluster's approved /16.
    let n1 = join(&store, "north-1", Some("north"));
    let got = routes::decide(&store, pol, &n1, &[p("10.43.1.128/25")], NOW).unwrap();
    assert_eq!(refused(&got[0].1).other_node, "west-2");
    store.integrity_check().unwrap();
}

fn got_status(store: &dyn Store, n: &NodeRecord, prefix: &str) -> RouteStatus {
    status_of(store, n, prefix).status
}

#[test]
fn without_policy_routes_wait_for_the_operator_who_cannot_approve_a_conflict() {
    let dir = TempDir::new("pending");
    let store = open(&dir.db());
    let a = join(&store, "a-1", Some("a"));
    let b = join(&store, "b-1", Some("b"));
    let unlabelled = join(&store, "plain", None);
    let got = routes::decide(&store, None, &a, &[p("10.42.0.0/16")], NOW).unwrap();
    assert_eq!(got, [(p("10.42.0.0/16"), RouteStatus::Pending)]);
    // Pending routes do not block anyone: only approved ones do.
    let got = routes::decide(&store, None, &b, &[p("10.42.7.0/24")], NOW).unwrap();
    assert_eq!(got, [(p("10.42.7.0/24"), RouteStatus::Pending)]);

    let r = routes::approve(&store, None, a.id, p("10.42.0.0/16"), NOW + 1).unwrap();
    assert_eq!(
        (r.status, r.approved_by, r.updated),
        (RouteStatus::Approved, Some(Approver::Operator), NOW + 1)
    );
    // b's pending /24 is now refused (re-examined in the same pass) ...
    assert_eq!(
        refused(&got_status(&store, &b, "10.42.7.0/24")).other_node,
        "a-1"
    );
    // ... and the operator cannot approve it: a clear error, nothing stored.
    let before = store.list_routes().unwrap();
    match routes::approve(&store, None, b.id, p("10.42.7.0/24"), NOW + 2) {
        Err(e @ RouteError::Conflict { .. }) => {
            let msg = e.to_string();
            for needle in ["10.42.7.0/24", "b-1", "a-1", "cluster a", "cluster b"] {
                assert!(msg.contains(needle), "{needle:?} not in {msg}");
            }
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.list_routes().unwrap(), before);
    match routes::approve(&store, None, a.id, p("10.99.0.0/16"), NOW) {
        Err(RouteError::NotAdvertised { node, .. }) => assert_eq!(node, "a-1"),
        other => panic!("{other:?}"),
    }
    // Unlabelled nodes are a cluster of their own: in conflict with a too.
    let got = routes::decide(&store, None, &unlabelled, &[p("10.42.0.0/24")], NOW).unwrap();
    let c = refused(&got[0].1);
    assert_eq!(
        (c.other_cluster.as_deref(), c.cluster.as_deref()),
        (Some("a"), None)
    );
    assert!(got[0].1.to_string().contains("cluster (none)"));
}

#[test]
fn a_policy_change_approves_pending_routes_and_takes_no_approval_back() {
    let dir = TempDir::new("policy");
    let store = open(&dir.db());
    let n = join(&store, "k3s-1", Some("east"));
    let m = join(&store, "k3s-2", Some("east"));
    routes::decide(&store, None, &n, &[p("10.42.0.0/24")], NOW).unwrap();
    routes::decide(&store, None, &m, &[p("10.42.1.0/24")], NOW).unwrap();
    routes::approve(&store, None, m.id, p("10.42.1.0/24"), NOW).unwrap();

    let policy = Policy::parse(POLICY).unwrap();
    let changes = routes::reevaluate(&store, Some(&policy), NOW + 5).unwrap();
    assert_eq!(
        changes.len(),
        1,
        "only the pending route changes: {changes:?}"
    );
    let r = status_of(&store, &n, "10.42.0.0/24");
    assert_eq!(
        (r.status, r.approved_by),
        (RouteStatus::Approved, Some(Approver::Policy))
    );

    // The autoApprover goes: approvals stay (headscale's behaviour), and
    // a route advertised afterwards waits.
    let narrower = Policy::parse(r#"{"tagOwners": {"tag:k3s": []}}"#).unwrap();
    assert!(routes::reevaluate(&store, Some(&narrower), NOW + 6)
        .unwrap()
        .is_empty());
    assert!(status_of(&store, &n, "10.42.0.0/24").approved);
    assert!(status_of(&store, &m, "10.42.1.0/24").approved);
    let got = routes::decide(
        &store,
        Some(&narrower),
        &n,
        &[p("10.42.0.0/24"), p("192.168.9.0/24")],
        NOW + 7,
    )
    .unwrap();
    assert_eq!(
        got,
        [
            (p("10.42.0.0/24"), RouteStatus::Approved),
            (p("192.168.9.0/24"), RouteStatus::Pending)
        ]
    );
    // Withdrawn and advertised again: decided afresh (pending now).
    routes::decide(&store, Some(&narrower), &n, &[], NOW + 8).unwrap();
    let got = routes::decide(&store, Some(&narrower), &n, &[p("10.42.0.0/24")], NOW + 9).unwrap();
    assert_eq!(got, [(p("10.42.0.0/24"), RouteStatus::Pending)]);
}

#[test]
fn a_refused_route_is_freed_when_the_other_node_goes() {
    let dir = TempDir::new("freed");
    let store = open(&dir.db());
    let policy = Policy::parse(POLICY).unwrap();
    let a = join(&store, "a-1", Some("a"));
    let b = join(&store, "b-1", Some("b"));
    routes::decide(&store, Some(&policy), &a, &[p("10.42.0.0/16")], NOW).unwrap();
    let got = routes::decide(&store, Some(&policy), &b, &[p("10.42.0.0/16")], NOW).unwrap();
    assert_eq!(refused(&got[0].1).other_node, "a-1");
    // a withdraws: b's route is re-examined in the same pass, and the
    // pass reports both rows for the map.
    let pass = routes::advertise(&store, Some(&policy), &a, &[], NOW + 1).unwrap();
    assert_eq!(pass.changes.len(), 2, "{:?}", pass.changes);
    assert!(pass.changes.iter().any(|c| matches!(c,
        RouteChange::Set(r) if r.node_id == b.id && r.status == RouteStatus::Approved)));
    assert!(pass.changes.iter().any(|c| matches!(c,
        RouteChange::Remove { node_id, .. } if *node_id == a.id)));
    assert_eq!(
        got_status(&store, &b, "10.42.0.0/16"),
        RouteStatus::Approved
    );
    // a comes back on the same CIDR: now a is refused, b keeps it.
    let got = routes::decide(&store, Some(&policy), &a, &[p("10.42.0.0/16")], NOW + 2).unwrap();
    assert_eq!(refused(&got[0].1).other_node, "b-1");
    // b is removed: after the re-examination a has it.
    store.remove_node(b.id).unwrap();
    let changes = routes::reevaluate(&store, Some(&policy), NOW + 3).unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        got_status(&store, &a, "10.42.0.0/16"),
        RouteStatus::Approved
    );
}

/// Two clusters' nodes advertise 10.42.0.0/16 at the same moment, from
/// threads with their own connections (as two server processes would):
/// one is approved, the other refused, never both.
#[test]
fn racing_clusters_never_both_get_one_prefix() {
    const ROUNDS: usize = 10;
    let dir = TempDir::new("race");
    let path = dir.db();
    let policy = Arc::new(Policy::parse(POLICY).unwrap());
    let setup = open(&path);
    for round in 0..ROUNDS {
        let prefix = p(&format!("10.42.{round}.0/24"));
        let x = join(&setup, &format!("x-{round}"), Some("x"));
        let y = join(&setup, &format!("y-{round}"), Some("y"));
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [x, y]
            .into_iter()
            .map(|n| {
                let (path, barrier, policy) = (path.clone(), barrier.clone(), policy.clone());
                std::thread::spawn(move || {
                    let store = open(&path);
                    barrier.wait();
                    routes::decide(&store, Some(&policy), &n, &[prefix], NOW).unwrap()
                })
            })
            .collect();
        let results: Vec<RouteStatus> = threads
            .into_iter()
            .map(|t| t.join().unwrap().remove(0).1)
            .collect();
        let approved = results
            .iter()
            .filter(|s| **s == RouteStatus::Approved)
            .count();
        assert_eq!(approved, 1, "round {round}: {results:?}");
    }
    let stored = setup.list_routes().unwrap();
    assert_eq!(stored.iter().filter(|r| r.approved).count(), ROUNDS);
    setup.integrity_check().unwrap();
}

/// The pass itself (sans-IO) on a 1000-node mesh, one pod CIDR each, two
/// clusters: how long one decision takes. Prints the figure; bounded by
/// count.
#[test]
fn a_pass_over_a_thousand_nodes_is_fast() {
    const NODES: usize = 1000;
    let policy = Policy::parse(POLICY).unwrap();
    let mut table = RouteTable::default();
    for i in 0..NODES {
        let cluster = if i % 2 == 0 { "even" } else { "odd" };
        let ipv4 = std::net::Ipv4Addr::from(0x6440_0001 + i as u32);
        table.nodes.push(NodeRecord {
            id: i as i64 + 1,
            public_key: PrivateKey::generate().public_key(),
            name: format!("n{i}"),
            ipv4,
            ipv6: std::net::Ipv6Addr::from(
                0xfd00_0000_0000_0000_0000_0000_0000_0000u128 | i as u128,
            ),
            tags: vec!["tag:k3s".into()],
            ephemeral: false,
            cluster: Some(cluster.into()),
            join_key: None,
            created: NOW,
            updated: NOW,
            offline_since: None,
        });
    }
    // Every node advertises its /25: even nodes in 10.42/16, odd in 10.43/16.
    for i in 0..NODES {
        let second = if i % 2 == 0 { 42 } else { 43 };
        let k = i / 2;
        let prefix = p(&format!("10.{second}.{}.{}/25", k / 2, k % 2 * 128));
        let planned = plan(
            &table,
            Some(&policy),
            Target::Advertise {
                node_id: i as i64 + 1,
                prefixes: &[prefix],
            },
            NOW,
        )
        .unwrap();
        table.routes = planned.routes;
    }
    assert!(table.routes.iter().all(|r| r.approved));
    let started = Instant::now();
    let planned = plan(
        &table,
        Some(&policy),
        Target::Advertise {
            node_id: 2,
            prefixes: &[p("10.42.7.0/24")],
        },
        NOW,
    )
    .unwrap();
    let took = started.elapsed();
    println!("one decision over {NODES} nodes and routes: {took:?}");
    let r = planned.routes.iter().find(|r| r.node_id == 2).unwrap();
    // 10.42.7.0/24 holds the /25s of even nodes 28 and 30: the first wins.
    assert_eq!(refused(&r.status).other_node, "n28");
    assert_eq!(
        planned.changes.len(),
        2,
        "remove the old /25, refuse the new"
    );
}

/// An advertisement over the per-node cap is refused whole: the node's
/// routes stay as they were.
#[test]
fn an_advertisement_over_the_cap_changes_nothing() {
    let dir = TempDir::new("cap");
    let store = open(&dir.db());
    let n = join(&store, "many", Some("east"));
    routes::decide(&store, None, &n, &[p("10.42.0.0/24")], NOW).unwrap();
    let before = store.list_routes().unwrap();
    let many: Vec<IpPrefix> = (0..=meshvpn_control::store::MAX_ROUTES_PER_NODE)
        .map(|i| p(&format!("10.{}.{}.0/24", 100 + i / 256, i % 256)))
        .collect();
    match routes::decide(&store, None, &n, &many, NOW) {
        Err(RouteError::Store(e)) => assert!(e.to_string().contains("more than the 256"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.list_routes().unwrap(), before);
}

/// CPU time of the calling thread (ns), from the scheduler's accounting.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one registration costs the store (the key redeemed, the node
/// registered, its pod CIDR decided: the two write transactions the
/// server runs per joining node) as the mesh grows to 1000, 2000 and 4000
/// nodes, two clusters, one /25 each. Prints the mean wall and CPU time
/// per registration over the last 200 before each mark. Bounded by count
/// (4000 registrations) and by time (fails past 600 s).
///
/// `cargo test --release -p meshvpn-control --test routes -- --ignored --nocapture registration_cost`
#[test]
#[ignore = "measurement: prints the per-registration cost at 1000, 2000, 4000 nodes"]
fn registration_cost_at_1000_2000_4000_nodes() {
    const MARKS: [usize; 3] = [1000, 2000, 4000];
    const WINDOW: usize = 200;
    let limit = std::time::Duration::from_secs(600);
    let dir = TempDir::new("regcost");
    let store = open(&dir.db());
    let policy = Policy::parse(POLICY).unwrap();
    let keys: Vec<_> = ["even", "odd"]
        .iter()
        .map(|c| {
            keys::create(
                &store,
                &KeyOptions {
                    tags: vec!["tag:k3s".into()],
                    cluster: Some(c.to_string()),
                    reusable: true,
                    ..Default::default()
                },
                NOW,
                &SystemRandom::new(),
            )
            .unwrap()
            .text
        })
        .collect();
    let started = Instant::now();
    let (mut wall, mut cpu) = (std::time::Duration::ZERO, 0u64);
    for i in 0..MARKS[MARKS.len() - 1] {
        assert!(started.elapsed() < limit, "over {limit:?} at node {i}");
        let second = 42 + i % 2;
        let k = i / 2;
        let prefix = p(&format!("10.{second}.{}.{}/25", k / 2 % 256, k % 2 * 128));
        let req = NodeRequest {
            public_key: PrivateKey::generate().public_key(),
            hostname: format!("n{i}"),
        };
        let (t, c) = (Instant::now(), thread_cpu_ns());
        let node = keys::redeem(&store, &keys[i % 2], &req, NOW).unwrap();
        let got = routes::decide(&store, Some(&policy), &node, &[prefix], NOW).unwrap();
        let (t, c) = (t.elapsed(), thread_cpu_ns() - c);
        assert_eq!(got.len(), 1);
        if i + WINDOW >= MARKS.iter().copied().find(|m| *m > i).unwrap() {
            wall += t;
            cpu += c;
        }
        if MARKS.contains(&(i + 1)) {
            println!(
                "{} nodes: per registration {:.3} ms wall, {:.3} ms CPU (mean of the last {WINDOW})",
                i + 1,
                wall.as_secs_f64() * 1e3 / WINDOW as f64,
                cpu as f64 / 1e6 / WINDOW as f64,
            );
            (wall, cpu) = (std::time::Duration::ZERO, 0);
        }
    }
    assert_eq!(store.list_nodes().unwrap().len(), MARKS[MARKS.len() - 1]);
}

/// One pass over the whole table, as the store ran every pass before
/// incremental passes: the reference the incremental path must equal.
fn full_pass(
    store: &dyn Store,
    policy: Option<&Policy>,
    target: Target<'_>,
    now: u64,
) -> Result<Vec<RouteChange>, RouteError> {
    let mut out = Vec::new();
    store.change_routes(&mut |table| {
        out = plan(table, policy, target, now)?.changes;
        Ok(out.clone())
    })?;
    Ok(out)
}

/// Changes as comparable text, in a fixed order.
fn sorted_changes(r: &Result<Vec<RouteChange>, RouteError>) -> Result<Vec<String>, String> {
    match r {
        Ok(c) => {
            let mut v: Vec<String> = c.iter().map(|c| format!("{c:?}")).collect();
            v.sort();
            Ok(v)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Random sequences of registrations (new nodes, and nodes registering
/// again with another cluster's or tag's key), advertisements, operator
/// approvals, removals and policy changes, applied to two stores: one
/// decides every change with a pass over the whole table (`plan` in
/// `Store::change_routes`, as before), the other through the server's and
/// CLI's own entry points (`routes::advertise`, `approve`, `withdrawn`
/// after a removal: incremental passes; `reevaluate` for the policy).
/// After every step both route tables (status, conflict named, who
/// approved, when it changed) and the rows each step reported changed are
/// identical. Prefixes come from a small pool of nested IPv4 and IPv6
/// networks so overlaps across clusters are frequent. Bounded: 64
/// sequences of 40 steps, and no new sequence after 60 s.
#[test]
fn incremental_passes_equal_full_passes_on_random_sequences() {
    const SEQUENCES: u64 = 64;
    const STEPS: usize = 40;
    let budget = std::time::Duration::from_secs(60);
    let pool: Vec<IpPrefix> = [
        "10.0.0.0/8",
        "10.42.0.0/16",
        "10.42.0.0/23",
        "10.42.2.0/23",
        "10.42.0.0/24",
        "10.42.1.0/24",
        "10.42.2.0/24",
        "10.42.3.0/24",
        "10.42.1.128/25",
        "10.43.0.0/16",
        "10.43.0.0/24",
        "10.43.1.0/24",
        "fd42::/48",
        "fd42::/64",
        "fd42:0:0:1::/64",
    ]
    .iter()
    .map(|s| p(s))
    .collect();
    let policies: Vec<Option<Policy>> = vec![
        None,
        Some(Policy::parse(POLICY).unwrap()),
        Some(
            Policy::parse(
                r#"{"tagOwners": {"tag:k3s": []},
                    "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:k3s"], "fd42::/48": ["tag:k3s"]}}}"#,
            )
            .unwrap(),
        ),
        Some(Policy::parse("{}").unwrap()),
    ];
    let clusters = [None, Some("a"), Some("b"), Some("c")];
    // Faster on a tmpfs: the test is about decisions, not fsync.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let started = Instant::now();
    let mut steps_done = 0;
    let mut kinds = [0usize; 6];
    let (mut refused_seen, mut failed_approvals) = (0, 0);
    for seq in 0..SEQUENCES {
        if started.elapsed() > budget {
            break;
        }
        let dir = base.join(format!("meshvpn-routes-prop-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let full = open(&dir.join("full.db"));
        let inc = open(&dir.join("inc.db"));
        let mut seed = 0x2545_f491_4f6c_dd1d ^ (seq + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        // One reusable key per (cluster, tagged) in each store.
        let keys_of = |store: &dyn Store| -> Vec<String> {
            let mut out = Vec::new();
            for c in clusters {
                for tagged in [false, true] {
                    let k = keys::create(
                        store,
                        &KeyOptions {
                            reusable: true,
                            tags: if tagged {
                                vec!["tag:k3s".into()]
                            } else {
                                vec![]
                            },
                            cluster: c.map(str::to_string),
                            ..Default::default()
                        },
                        NOW,
                        &SystemRandom::new(),
                    )
                    .unwrap();
                    out.push(k.text.to_string());
                }
            }
            out
        };
        let (full_keys, inc_keys) = (keys_of(&full), keys_of(&inc));
        let mut policy = policies[rand(policies.len())].clone();
        let mut nodes: Vec<(NodeRequest, i64)> = Vec::new();
        for step in 0..STEPS {
            let now = NOW + step as u64;
            let pol = policy.as_ref();
            let pick = |rand: &mut dyn FnMut(usize) -> usize| -> Vec<IpPrefix> {
                (0..rand(4)).map(|_| pool[rand(pool.len())]).collect()
            };
            let kind = if nodes.is_empty() { 0 } else { rand(10) };
            let (what, a, b) = match kind {
                // A node registers (new, or again with another key) and
                // advertises, as the server runs it.
                0..=3 => {
                    let k = rand(full_keys.len());
                    let req = if kind == 0 || rand(3) > 0 {
                        NodeRequest {
                            public_key: PrivateKey::generate().public_key(),
                            hostname: format!("h{step}"),
                        }
                    } else {
                        nodes[rand(nodes.len())].0.clone()
                    };
                    let na = keys::redeem(&full, &full_keys[k], &req, now).unwrap();
                    let nb = keys::redeem(&inc, &inc_keys[k], &req, now).unwrap();
                    assert_eq!(na.id, nb.id);
                    if !nodes.iter().any(|(_, id)| *id == na.id) {
                        nodes.push((req, na.id));
                    }
                    let prefixes = pick(&mut rand);
                    let target = Target::Advertise {
                        node_id: na.id,
                        prefixes: &prefixes,
                    };
                    kinds[0] += 1;
                    (
                        format!(
                            "register {} ({:?}) advertising {prefixes:?}",
                            na.name, na.cluster
                        ),
                        full_pass(&full, pol, target, now),
                        routes::advertise(&inc, pol, &nb, &prefixes, now).map(|p| p.changes),
                    )
                }
                // A registered node changes what it advertises.
                4..=5 => {
                    let id = nodes[rand(nodes.len())].1;
                    let prefixes = pick(&mut rand);
                    let node = inc
                        .list_nodes()
                        .unwrap()
                        .into_iter()
                        .find(|n| n.id == id)
                        .unwrap();
                    kinds[1] += 1;
                    (
                        format!("node {id} advertises {prefixes:?}"),
                        full_pass(
                            &full,
                            pol,
                            Target::Advertise {
                                node_id: id,
                                prefixes: &prefixes,
                            },
                            now,
                        ),
                        routes::advertise(&inc, pol, &node, &prefixes, now).map(|p| p.changes),
                    )
                }
                // The operator approves a prefix (advertised or not).
                6..=7 => {
                    let id = nodes[rand(nodes.len())].1;
                    let own: Vec<IpPrefix> = inc
                        .list_routes()
                        .unwrap()
                        .into_iter()
                        .filter(|r| r.node_id == id)
                        .map(|r| r.prefix)
                        .collect();
                    let prefix = if !own.is_empty() && rand(4) > 0 {
                        own[rand(own.len())]
                    } else {
                        pool[rand(pool.len())]
                    };
                    kinds[2] += 1;
                    let b = routes::approve(&inc, pol, id, prefix, now);
                    let a = full_pass(
                        &full,
                        pol,
                        Target::Approve {
                            node_id: id,
                            prefix,
                        },
                        now,
                    );
                    // `approve` returns the record, not the rows: compare
                    // the outcome (and the error's text).
                    let b = b.map(|_| Vec::new());
                    let a = a.map(|_| Vec::new());
                    (format!("approve {prefix} of node {id}"), a, b)
                }
                // A node is removed (`nodes remove`).
                8 => {
                    let i = rand(nodes.len());
                    let id = nodes.swap_remove(i).1;
                    assert!(full.remove_node(id).unwrap().is_some());
                    let gone = inc.remove_node_with_routes(id).unwrap().unwrap();
                    kinds[3] += 1;
                    (
                        format!("remove node {id}"),
                        full_pass(&full, pol, Target::None, now),
                        routes::withdrawn(&inc, pol, &gone.routes, now),
                    )
                }
                // The policy changes.
                _ => {
                    let i = rand(policies.len());
                    policy = policies[i].clone();
                    let pol = policy.as_ref();
                    kinds[4] += 1;
                    (
                        format!("policy {i}"),
                        full_pass(&full, pol, Target::None, now),
                        routes::reevaluate(&inc, pol, now),
                    )
                }
            };
            let (ta, tb) = (full.list_routes().unwrap(), inc.list_routes().unwrap());
            if ta != tb {
                let show = |t: &[RouteRecord]| {
                    t.iter()
                        .map(|r| {
                            format!(
                                "  {} {} {:?} {} by {:?} @{}",
                                r.node_id, r.prefix, r.cluster, r.status, r.approved_by, r.updated
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                panic!(
                    "seq {seq} step {step} ({what}): the route tables differ\nfull:\n{}\nincremental:\n{}",
                    show(&ta),
                    show(&tb)
                );
            }
            assert_eq!(
                sorted_changes(&a),
                sorted_changes(&b),
                "seq {seq} step {step} ({what}): the reported changes differ"
            );
            steps_done += 1;
            refused_seen += usize::from(
                tb.iter()
                    .any(|r| matches!(r.status, RouteStatus::Refused(_))),
            );
            failed_approvals += usize::from(what.starts_with("approve") && a.is_err());
        }
        full.integrity_check().unwrap();
        inc.integrity_check().unwrap();
        drop((full, inc));
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "{steps_done} steps compared in {:?}: {} registrations, {} advertisements, {} approvals \
         ({failed_approvals} refused), {} removals, {} policy changes; a refused route in the table \
         after {refused_seen} steps",
        started.elapsed(),
        kinds[0],
        kinds[1],
        kinds[2],
        kinds[3],
        kinds[4]
    );
    assert!(
        steps_done >= 3 * STEPS,
        "only {steps_done} steps in {budget:?}"
    );
    // The sequences reach what the incremental path must get right.
    assert!(refused_seen > steps_done / 10 && failed_approvals > 0);
}
