//! The control store through its public interface: every join-key error
//! class, expiry with an injected clock, racing redeems (threads with their
//! own connections, as separate processes would have), address stability,
//! removal, routes, policy versions, and opening missing, damaged, foreign
//! and too-new files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use meshvpn_control::keys::{self, JoinError, KeyOptions};
use meshvpn_control::store::{
    schema_version, RedeemError, SqliteStore, Store, StoreConfig, StoreError, MAX_ROUTES_PER_NODE,
};
use meshvpn_control::NodeRequest;
use meshvpn_engine::{IpPrefix, PrivateKey};
use ring::rand::SystemRandom;

const NOW: u64 = 1_800_000_000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("meshvpn-control-{name}-{}", std::process::id()));
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

fn node(host: &str) -> NodeRequest {
    NodeRequest {
        public_key: PrivateKey::generate().public_key(),
        hostname: host.into(),
    }
}

fn create(store: &dyn Store, opts: KeyOptions) -> String {
    keys::create(store, &opts, NOW, &SystemRandom::new())
        .unwrap()
        .text
        .to_string()
}

fn join_err(r: Result<meshvpn_control::NodeRecord, RedeemError>) -> JoinError {
    match r {
        Err(RedeemError::Join(e)) => e,
        other => panic!("expected a join error, got {other:?}"),
    }
}

#[test]
fn every_join_key_error_class_is_distinct() {
    let dir = TempDir::new("classes");
    let store = open(&dir.db());
    let single = create(&store, KeyOptions::default());
    let expiring = create(
        &store,
        KeyOptions {
            expiry: Some(Duration::from_secs(86_400)),
            ..Default::default()
        },
    );
    let revoked = create(
        &store,
        KeyOptions {
            reusable: true,
            ..Default::default()
        },
    );

    // Good key.
    let n = keys::redeem(&store, &single, &node("a"), NOW).unwrap();
    assert_eq!(n.name, "a");
    // Reused single-use key.
    assert_eq!(
        join_err(keys::redeem(&store, &single, &node("b"), NOW + 1)),
        JoinError::AlreadyUsed
    );
    // Expired, by the injected clock only: a second earlier it works.
    assert_eq!(
        join_err(keys::redeem(&store, &expiring, &node("c"), NOW + 86_400)),
        JoinError::Expired(NOW + 86_400)
    );
    keys::redeem(&store, &expiring, &node("c"), NOW + 86_399).unwrap();
    // Revoked.
    assert!(store
        .revoke_key(&keys::parse(&revoked).unwrap().id, NOW)
        .unwrap());
    assert_eq!(
        join_err(keys::redeem(&store, &revoked, &node("d"), NOW)),
        JoinError::Revoked
    );
    // Malformed.
    assert_eq!(
        join_err(keys::redeem(&store, "tskey-auth-xyz", &node("e"), NOW)),
        JoinError::Malformed
    );
    // Unknown: well-formed, never created here.
    let other = TempDir::new("classes-other");
    let elsewhere = create(&open(&other.db()), KeyOptions::default());
    assert_eq!(
        join_err(keys::redeem(&store, &elsewhere, &node("f"), NOW)),
        JoinError::Unknown
    );
    // Five distinct messages.
    let mut msgs: Vec<String> = [
        JoinError::AlreadyUsed,
        JoinError::Expired(NOW),
        JoinError::Revoked,
        JoinError::Malformed,
        JoinError::Unknown,
    ]
    .iter()
    .map(|e| e.to_string())
    .collect();
    msgs.sort();
    msgs.dedup();
    assert_eq!(msgs.len(), 5);
    // A refused redeem registered nothing and counted no use.
    assert_eq!(store.list_nodes().unwrap().len(), 2);
    let rec = store
        .key(&keys::parse(&single).unwrap().id)
        .unwrap()
        .unwrap();
    assert_eq!(rec.uses, 1);
    assert_eq!(rec.last_used, Some(NOW));
}

#[test]
fn keys_are_stored_hashed_and_listed_and_revoked_once() {
    let dir = TempDir::new("hashed");
    let store = open(&dir.db());
    let text = create(
        &store,
        KeyOptions {
            reusable: true,
            ephemeral: true,
            tags: vec!["tag:k3s".into(), "tag:a".into()],
            ..Default::default()
        },
    );
    drop(store);
    let raw = std::fs::read(dir.db()).unwrap();
    let wal = std::fs::read(dir.0.join("control.db-wal")).unwrap_or_default();
    let secret = text.rsplit('-').next().unwrap();
    for bytes in [&raw, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret in the file"
        );
    }
    let store = open(&dir.db());
    let keys = store.list_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].tags, vec!["tag:a", "tag:k3s"]);
    assert!(keys[0].reusable && keys[0].ephemeral);
    assert!(store.revoke_key(&keys[0].id, NOW + 5).unwrap());
    assert!(store.revoke_key(&keys[0].id, NOW + 9).unwrap());
    assert_eq!(
        store.key(&keys[0].id).unwrap().unwrap().revoked,
        Some(NOW + 5)
    );
    assert!(!store.revoke_key("0123456789abcdef", NOW).unwrap());
}

#[test]
fn ephemeral_flag_and_tags_reach_the_node() {
    let dir = TempDir::new("ephemeral");
    let store = open(&dir.db());
    let k = create(
        &store,
        KeyOptions {
            ephemeral: true,
            tags: vec!["tag:ci".into()],
            ..Default::default()
        },
    );
    let n = keys::redeem(&store, &k, &node("runner"), NOW).unwrap();
    assert!(n.ephemeral);
    assert_eq!(n.tags, vec!["tag:ci"]);
    let plain = create(&store, KeyOptions::default());
    assert!(
        !keys::redeem(&store, &plain, &node("server"), NOW)
            .unwrap()
            .ephemeral
    );
}

#[test]
fn racing_redeems_of_one_single_use_key_register_one_node() {
    const THREADS: usize = 8;
    let dir = TempDir::new("race");
    let text = create(&open(&dir.db()), KeyOptions::default());
    for round in 0..5 {
        let text = if round == 0 {
            text.clone()
        } else {
            create(&open(&dir.db()), KeyOptions::default())
        };
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (db, text, barrier) = (dir.db(), text.clone(), barrier.clone());
                std::thread::spawn(move || {
                    // Its own connection, as another server process would have.
                    let store = open(&db);
                    barrier.wait();
                    keys::redeem(&store, &text, &node(&format!("racer-{round}-{i}")), NOW)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        for r in results.into_iter().filter(|r| r.is_err()) {
            assert_eq!(join_err(r), JoinError::AlreadyUsed);
        }
    }
    assert_eq!(open(&dir.db()).list_nodes().unwrap().len(), 5);
}

#[test]
fn concurrent_registrations_get_distinct_addresses() {
    const THREADS: usize = 4;
    const EACH: usize = 25;
    let dir = TempDir::new("distinct");
    let text = create(
        &open(&dir.db()),
        KeyOptions {
            reusable: true,
            ..Default::default()
        },
    );
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (db, text) = (dir.db(), text.clone());
            std::thread::spawn(move || {
                let store = open(&db);
                for i in 0..EACH {
                    keys::redeem(&store, &text, &node(&format!("n{t}x{i}")), NOW).unwrap();
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    let store = open(&dir.db());
    let nodes = store.list_nodes().unwrap();
    assert_eq!(nodes.len(), THREADS * EACH);
    let mut v4: Vec<_> = nodes.iter().map(|n| n.ipv4).collect();
    let mut v6: Vec<_> = nodes.iter().map(|n| n.ipv6).collect();
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    assert_eq!((v4.len(), v6.len()), (THREADS * EACH, THREADS * EACH));
    assert_eq!(
        store
            .key(&keys::parse(&text).unwrap().id)
            .unwrap()
            .unwrap()
            .uses,
        (THREADS * EACH) as u64
    );
    store.integrity_check().unwrap();
}

#[test]
fn re_registration_keeps_addresses_and_removal_frees_without_reuse() {
    let dir = TempDir::new("stable");
    let store = open(&dir.db());
    let plan = store.address_plan();
    let reusable = create(
        &store,
        KeyOptions {
            reusable: true,
            ..Default::default()
        },
    );
    let me = node("web");
    let first = keys::redeem(&store, &reusable, &me, NOW).unwrap();
    assert!(plan.ipv4_prefix().contains(first.ipv4.into()));
    assert!(plan.ula_prefix().contains(first.ipv6.into()));
    assert_eq!(first.ipv6, plan.ipv6_for(first.ipv4));
    let other = keys::redeem(&store, &reusable, &node("web"), NOW).unwrap();
    assert_eq!(other.name, "web-2");

    // Same WireGuard key again, with the same key and with a fresh tagged
    // one, and after a reopen with another address prefix: same identity.
    let again = keys::redeem(&store, &reusable, &me, NOW + 10).unwrap();
    let tagged = create(
        &store,
        KeyOptions {
            tags: vec!["tag:k3s".into()],
            ..Default::default()
        },
    );
    drop(store);
    let cfg = StoreConfig {
        ipv4_prefix: "10.77.0.0/16".parse().unwrap(),
        ..Default::default()
    };
    let store = SqliteStore::open(&dir.db(), &cfg).unwrap();
    assert_eq!(
        store.address_plan().ula_prefix(),
        plan.ula_prefix(),
        "the mesh's ULA survives a reopen"
    );
    let third = keys::redeem(&store, &tagged, &me, NOW + 20).unwrap();
    for n in [&again, &third] {
        assert_eq!(
            (n.id, &n.name, n.ipv4, n.ipv6),
            (first.id, &first.name, first.ipv4, first.ipv6)
        );
    }
    assert_eq!(third.tags, vec!["tag:k3s"]);
    assert_eq!(third.updated, NOW + 20);
    assert_eq!(store.list_nodes().unwrap().len(), 2);
    let newcomer = keys::redeem(&store, &reusable, &node("db"), NOW).unwrap();
    assert!(
        IpPrefix::new(std::net::Ipv4Addr::new(10, 77, 0, 0).into(), 16)
            .unwrap()
            .contains(newcomer.ipv4.into())
    );

    // Removal, then new nodes: the removed address and id are not handed out.
    let removed = store.remove_node(first.id).unwrap().unwrap();
    assert_eq!(removed.public_key, me.public_key);
    assert!(store.remove_node(first.id).unwrap().is_none());
    assert!(store.node_by_public_key(&me.public_key).unwrap().is_none());
    let later = keys::redeem(&store, &reusable, &node("x"), NOW).unwrap();
    assert!(later.id > newcomer.id);
    assert_ne!(later.ipv4, removed.ipv4);
    // The removed node may come back, as a new node with a new address.
    let back = keys::redeem(&store, &reusable, &me, NOW).unwrap();
    assert_ne!(back.id, first.id);
    assert_ne!(back.ipv4, removed.ipv4);
}

#[test]
fn a_full_prefix_is_reported_and_never_double_allocates() {
    let dir = TempDir::new("full");
    let cfg = StoreConfig {
        ipv4_prefix: "10.99.0.0/29".parse().unwrap(),
        ..Default::default()
    };
    let store = SqliteStore::open(&dir.db(), &cfg).unwrap();
    let k = create(
        &store,
        KeyOptions {
            reusable: true,
            ..Default::default()
        },
    );
    let nodes: Vec<_> = (0..6)
        .map(|i| keys::redeem(&store, &k, &node(&format!("n{i}")), NOW).unwrap())
        .collect();
    match keys::redeem(&store, &k, &node("extra"), NOW) {
        Err(RedeemError::Store(StoreError::AddressesExhausted(p))) => {
            assert_eq!(p.to_string(), "10.99.0.0/29")
        }
        other => panic!("{other:?}"),
    }
    // The failed registration counted no use.
    assert_eq!(
        store
            .key(&keys::parse(&k).unwrap().id)
            .unwrap()
            .unwrap()
            .uses,
        6
    );
    // Free one: the next node gets exactly that one, no live one twice.
    store.remove_node(nodes[2].id).unwrap();
    let n = keys::redeem(&store, &k, &node("extra"), NOW).unwrap();
    assert_eq!(n.ipv4, nodes[2].ipv4);
}

#[test]
fn routes_keep_approval_while_advertised_and_go_with_the_node() {
    let dir = TempDir::new("routes");
    let store = open(&dir.db());
    let k = create(&store, KeyOptions::default());
    let n = keys::redeem(&store, &k, &node("k3s-1"), NOW).unwrap();
    let a: IpPrefix = "10.42.1.0/24".parse().unwrap();
    let b: IpPrefix = "10.42.2.7/24".parse().unwrap(); // stored as its network
    store.set_advertised_routes(n.id, &[a, b]).unwrap();
    assert!(store.set_route_approved(n.id, a, true).unwrap());
    assert!(!store
        .set_route_approved(n.id, "10.9.0.0/16".parse().unwrap(), true)
        .unwrap());
    store.set_advertised_routes(n.id, &[a]).unwrap();
    let routes = store.list_routes().unwrap();
    assert_eq!(routes.len(), 1);
    assert!(routes[0].approved && routes[0].prefix == a);
    store.set_advertised_routes(n.id, &[a, b]).unwrap();
    let routes = store.list_routes().unwrap();
    assert_eq!(
        routes
            .iter()
            .map(|r| (r.prefix.to_string(), r.approved))
            .collect::<Vec<_>>(),
        [
            ("10.42.1.0/24".to_string(), true),
            ("10.42.2.0/24".to_string(), false)
        ]
    );
    assert!(matches!(
        store.set_advertised_routes(999, &[a]),
        Err(StoreError::NoSuchNode(999))
    ));
    store.remove_node(n.id).unwrap();
    assert!(store.list_routes().unwrap().is_empty());
    store.integrity_check().unwrap();
}

#[test]
fn policy_versions_count_up_and_persist() {
    let dir = TempDir::new("policy");
    let store = open(&dir.db());
    assert!(store.policy().unwrap().is_none());
    assert_eq!(store.set_policy("{\"acls\": []}", NOW).unwrap(), 1);
    assert_eq!(store.set_policy("{\"acls\": [1]}", NOW + 1).unwrap(), 2);
    drop(store);
    let p = open(&dir.db()).policy().unwrap().unwrap();
    assert_eq!(
        (p.text.as_str(), p.version, p.updated),
        ("{\"acls\": [1]}", 2, NOW + 1)
    );
}

#[test]
fn opening_missing_damaged_foreign_and_newer_files_fails_clearly() {
    let dir = TempDir::new("open");
    let no_create = StoreConfig {
        create: false,
        ..Default::default()
    };
    let missing = dir.0.join("nope.db");
    let e = SqliteStore::open(&missing, &no_create).unwrap_err();
    assert!(matches!(e, StoreError::Missing(_)), "{e}");
    assert!(e.to_string().contains("no control database at"), "{e}");
    assert!(!missing.exists(), "a failed open must not create the file");

    let garbage = dir.0.join("garbage.db");
    std::fs::write(&garbage, vec![0x5au8; 8192]).unwrap();
    let e = SqliteStore::open(&garbage, &no_create).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("damaged or not a database"), "{e}");

    let foreign = dir.0.join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let e = SqliteStore::open(&foreign, &no_create).unwrap_err();
    assert!(matches!(e, StoreError::Foreign(_)), "{e}");

    let newer = dir.db();
    drop(open(&newer));
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute_batch(&format!("PRAGMA user_version = {}", schema_version() + 1))
        .unwrap();
    let e = SqliteStore::open(&newer, &no_create).unwrap_err();
    assert!(matches!(e, StoreError::TooNew { .. }), "{e}");
}

#[test]
fn an_empty_file_is_migrated_and_reopening_is_idempotent() {
    let dir = TempDir::new("migrate");
    std::fs::write(dir.db(), b"").unwrap();
    let no_create = StoreConfig {
        create: false,
        ..Default::default()
    };
    let store = SqliteStore::open(&dir.db(), &no_create).unwrap();
    let plan = store.address_plan();
    drop(store);
    let store = SqliteStore::open(&dir.db(), &no_create).unwrap();
    assert_eq!(store.address_plan(), plan);
    store.integrity_check().unwrap();
    let c = rusqlite::Connection::open(dir.db()).unwrap();
    let v: u32 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!((v, mode.as_str()), (schema_version(), "wal"));
    use std::os::unix::fs::PermissionsExt;
    let created = dir.0.join("fresh.db");
    drop(open(&created));
    assert_eq!(
        std::fs::metadata(&created).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// Four connections open one new file at once, over many fresh files: each
/// open succeeds (SQLite answers the switch to WAL with an immediate "busy",
/// without its busy handler, while another connection holds the file) and
/// all agree on the address plan the one migration wrote.
#[test]
fn racing_first_opens_of_a_new_file_migrate_once() {
    const ROUNDS: usize = 40;
    let dir = TempDir::new("first-open");
    for round in 0..ROUNDS {
        let db = dir.0.join(format!("round-{round}.db"));
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (db, barrier) = (db.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SqliteStore::open(&db, &StoreConfig::default()).map(|s| s.address_plan())
                })
            })
            .collect();
        let plans: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("round {round}: {e}"))
            })
            .collect();
        assert!(plans.windows(2).all(|w| w[0] == w[1]), "{plans:?}");
    }
}

#[test]
fn a_node_cannot_advertise_more_than_the_route_cap() {
    let dir = TempDir::new("route-cap");
    let store = open(&dir.db());
    let k = create(&store, KeyOptions::default());
    let n = keys::redeem(&store, &k, &node("greedy"), NOW).unwrap();
    let many: Vec<IpPrefix> = (0..=MAX_ROUTES_PER_NODE as u32)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
        .collect();
    store.set_advertised_routes(n.id, &many[..2]).unwrap();
    match store.set_advertised_routes(n.id, &many) {
        Err(StoreError::TooManyRoutes { count, max, .. }) => {
            assert_eq!((count, max), (MAX_ROUTES_PER_NODE + 1, MAX_ROUTES_PER_NODE))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.list_routes().unwrap().len(),
        2,
        "a refused advertisement changes nothing"
    );
    // Duplicates count once: exactly the cap is fine.
    let mut at_cap = many[..MAX_ROUTES_PER_NODE].to_vec();
    at_cap.extend_from_slice(&many[..10]);
    store.set_advertised_routes(n.id, &at_cap).unwrap();
    assert_eq!(store.list_routes().unwrap().len(), MAX_ROUTES_PER_NODE);
}

#[test]
fn ephemeral_nodes_offline_past_the_cutoff_are_removed_and_others_stay() {
    let dir = TempDir::new("ephemeral-gc");
    let store = open(&dir.db());
    let eph = create(
        &store,
        KeyOptions {
            ephemeral: true,
            reusable: true,
            ..Default::default()
        },
    );
    let plain = create(&store, KeyOptions::default());
    let gone = keys::redeem(&store, &eph, &node("ci-1"), NOW).unwrap();
    let online = keys::redeem(&store, &eph, &node("ci-2"), NOW).unwrap();
    let recent = keys::redeem(&store, &eph, &node("ci-3"), NOW).unwrap();
    let durable = keys::redeem(&store, &plain, &node("server"), NOW).unwrap();
    assert_eq!(gone.offline_since, Some(NOW), "offline until it connects");
    assert!(store.set_node_online(online.id, true, NOW + 1).unwrap());
    assert!(store.set_node_online(recent.id, true, NOW + 1).unwrap());
    assert!(store.set_node_online(recent.id, false, NOW + 500).unwrap());
    assert!(store.set_node_online(durable.id, false, NOW).unwrap());
    assert!(!store.set_node_online(9999, true, NOW).unwrap());
    store
        .set_advertised_routes(gone.id, &["10.42.9.0/24".parse().unwrap()])
        .unwrap();
    let removed = store.remove_ephemeral_offline_before(NOW + 300).unwrap();
    assert_eq!(
        removed.iter().map(|n| n.node.id).collect::<Vec<_>>(),
        vec![gone.id]
    );
    let left: Vec<i64> = store.list_nodes().unwrap().iter().map(|n| n.id).collect();
    assert_eq!(left, vec![online.id, recent.id, durable.id]);
    assert!(store.list_routes().unwrap().is_empty());
    assert_eq!(
        store
            .node_by_public_key(&online.public_key)
            .unwrap()
            .unwrap()
            .offline_since,
        None
    );
}

/// Group commit: writers sharing one store (one write connection) are
/// batched into shared transactions; each write still stands or falls
/// alone, is committed when its method returns (another connection sees
/// it), and a single-use key still registers one node even when its
/// racing redeems land in one batch.
#[test]
fn grouped_writes_on_one_store_each_commit_before_returning() {
    const THREADS: usize = 16;
    let dir = TempDir::new("group");
    let store = Arc::new(open(&dir.db()));
    let single = create(&*store, KeyOptions::default());
    let reusable = create(
        &*store,
        KeyOptions {
            reusable: true,
            ..Default::default()
        },
    );
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            let (single, reusable) = (single.clone(), reusable.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let text = if i % 2 == 0 { &single } else { &reusable };
                let got = keys::redeem(&*store, text, &node(&format!("g{i}")), NOW);
                // A failing write in the middle of the burst.
                let bad = store.set_advertised_routes(10_000 + i as i64, &[]);
                assert!(matches!(bad, Err(StoreError::NoSuchNode(_))), "{bad:?}");
                // Committed now: a separate connection sees it.
                if let Ok(n) = &got {
                    let other = open(store.path());
                    assert_eq!(
                        other
                            .node_by_public_key(&n.public_key)
                            .unwrap()
                            .map(|o| o.id),
                        Some(n.id)
                    );
                }
                (i, got)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let single_ok = results
        .iter()
        .filter(|(i, r)| i % 2 == 0 && r.is_ok())
        .count();
    assert_eq!(single_ok, 1, "{results:?}");
    for (i, r) in results.iter() {
        if i % 2 == 1 {
            assert!(r.is_ok(), "{i}: {r:?}");
        }
    }
    let nodes = open(&dir.db()).list_nodes().unwrap();
    assert_eq!(nodes.len(), 1 + THREADS / 2);
    let mut v4: Vec<_> = nodes.iter().map(|n| n.ipv4).collect();
    v4.sort();
    v4.dedup();
    assert_eq!(v4.len(), nodes.len());
    open(&dir.db()).integrity_check().unwrap();
}
