//! The operator's changes that are more than one store call: finding a
//! node by what an operator types, removing it (and freeing the routes it
//! blocked), approving a route, setting the policy (validated first, routes
//! re-examined after). `meshvpn control` and the C/Go bindings
//! (`meshvpn_control_server_*`, `ControlServer`) both go through these, so
//! the rules live in one place.

use crate::node::NodeRecord;
use crate::policy::{Policy, PolicyError};
use crate::routes::{self, RouteChange, RouteError};
use crate::store::{RouteRecord, Store, StoreError};
use meshvpn_engine::IpPrefix;

/// Why an operator's change was refused; the text says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no node {0} (see `meshvpn control nodes list`)")]
    NoSuchNode(String),
    #[error("node {0} was removed meanwhile")]
    RemovedMeanwhile(String),
    #[error("`{0}` is not a prefix (10.42.1.0/24): {1}")]
    BadPrefix(String, String),
    /// The policy does not load; the text names the line and column.
    #[error("{0}; nothing was stored")]
    Policy(PolicyError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// By id, then name, then public key (base64).
pub fn find_node(nodes: &[NodeRecord], which: &str) -> Option<NodeRecord> {
    let by_id = which.parse::<i64>().ok();
    nodes
        .iter()
        .find(|n| Some(n.id) == by_id)
        .or_else(|| nodes.iter().find(|n| n.name == which))
        .or_else(|| nodes.iter().find(|n| n.public_key.to_base64() == which))
        .cloned()
}

/// A node removed, and what its removal did to other nodes' routes.
pub struct Removed {
    pub node: NodeRecord,
    /// Routes it blocked in other clusters, freed. The removal stands even
    /// when this re-examination fails; the server's next one catches up.
    pub freed: Result<Vec<RouteChange>, RouteError>,
}

/// Removes the node `which` (id, name or public key) with its routes.
pub fn remove_node(store: &dyn Store, which: &str, now: u64) -> Result<Removed, AdminError> {
    let found = find_node(&store.list_nodes()?, which)
        .ok_or_else(|| AdminError::NoSuchNode(which.to_string()))?;
    let removed = store
        .remove_node_with_routes(found.id)?
        .ok_or_else(|| AdminError::RemovedMeanwhile(which.to_string()))?;
    let freed = routes::stored_policy(store)
        .and_then(|policy| routes::withdrawn(store, policy.as_ref(), &removed.routes, now));
    Ok(Removed {
        node: removed.node,
        freed,
    })
}

/// Approves the route `prefix` that node `which` advertises; refused when
/// it overlaps an approved route of another cluster.
pub fn approve_route(
    store: &dyn Store,
    which: &str,
    prefix: &str,
    now: u64,
) -> Result<RouteRecord, AdminError> {
    let parsed: IpPrefix = prefix
        .parse()
        .map_err(|e| AdminError::BadPrefix(prefix.to_string(), format!("{e}")))?;
    let found = find_node(&store.list_nodes()?, which)
        .ok_or_else(|| AdminError::NoSuchNode(which.to_string()))?;
    let policy = routes::stored_policy(store)?;
    Ok(routes::approve(
        store,
        policy.as_ref(),
        found.id,
        parsed,
        now,
    )?)
}

/// Validates `text` as a policy (refused with the line and column of the
/// first error, nothing stored), stores it as a new version and
/// re-examines the routes for auto-approval. Returns the version and what
/// changed.
pub fn set_policy(
    store: &dyn Store,
    text: &str,
    now: u64,
) -> Result<(u64, Vec<RouteChange>), AdminError> {
    let policy = Policy::parse(text).map_err(AdminError::Policy)?;
    let version = store.set_policy(text, now)?;
    let changes = routes::reevaluate(store, Some(&policy), now)?;
    Ok((version, changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SqliteStore, StoreConfig};

    fn store() -> (tempdir::Dir, SqliteStore) {
        let dir = tempdir::Dir::new();
        let s = SqliteStore::open(
            &dir.0.join("c.db"),
            &StoreConfig {
                create: true,
                ..Default::default()
            },
        )
        .unwrap();
        (dir, s)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "meshvpn-admin-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_bad_policy_names_its_line_and_is_not_stored() {
        let (_d, s) = store();
        let (v, _) = set_policy(&s, "{\"acls\": []}", 1).unwrap();
        assert_eq!(v, 1);
        let e = set_policy(
            &s,
            "{\n  \"acls\": [\n    {\"action\": \"jump\"}\n  ]\n}",
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.ends_with("nothing was stored"), "{e}");
        assert_eq!(s.policy().unwrap().unwrap().version, 1);
        let (v, _) = set_policy(&s, "{}", 3).unwrap();
        assert_eq!(v, 2);
    }

    #[test]
    fn unknown_nodes_and_bad_prefixes_are_named() {
        let (_d, s) = store();
        let e = remove_node(&s, "ghost", 1).err().unwrap().to_string();
        assert!(e.contains("no node ghost"), "{e}");
        let e = approve_route(&s, "ghost", "10.42.0.0/99", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.42.0.0/99"), "{e}");
    }
}
