//! Route decisions: which advertised routes (a k3s node's pod CIDR, a
//! subnet router's LAN) are approved, pending an operator, or refused
//! because they overlap another cluster's.
//!
//! Sans-IO: [`plan`] is a pure function of the route table (every node and
//! route, as the store holds them), the policy and what changed. The store
//! runs it inside ONE write transaction ([`Store::change_routes`], or
//! [`Store::change_routes_near`] for [`plan_near`], the same `plan` over
//! only the rows a change can affect), so two nodes of different clusters
//! registering the same prefix at the same moment cannot both be approved,
//! whichever process or thread they reach.
//!
//! The rules, applied to every route in the order of its node's id (older
//! nodes first) and prefix:
//!
//! 1. **Conflict:** a route that overlaps (either holds the other:
//!    10.42.0.0/16 and 10.42.1.0/24 overlap) an *approved* route of a node
//!    in another cluster is refused, and the reason names both sides.
//!    Nodes without a cluster label form one cluster of their own. Inside
//!    a cluster routes may overlap (two subnet routers for one LAN, as
//!    Tailscale's and headscale's high-availability routes); per-node pod
//!    CIDRs (10.42.0.0/24, 10.42.1.0/24) do not overlap anyway.
//! 2. **Approved stays approved** while advertised and not in conflict,
//!    whoever approved it. In particular a policy change never takes an
//!    approval back: a route approved by an `autoApprovers` entry that is
//!    later removed stays approved until the node stops advertising it or
//!    the node is removed. This is what headscale does: on a policy reload
//!    (`State.autoApproveNodes`) `policy.ApproveRoutesWithPolicy` returns
//!    the node's current approved routes plus those the new policy can
//!    approve, never fewer (hscontrol/policy/policy.go).
//! 3. **Auto-approval:** a route the policy's `autoApprovers.routes` covers
//!    for the node (by tag, or by the node's address) is approved.
//! 4. Otherwise it is **pending** until `meshvpn control routes approve`.
//!
//! A pass sweeps the rules over its routes until a sweep changes nothing,
//! so every rule holds in what it writes (one sweep could leave an older
//! node's route pending beside a newer node's route of another cluster
//! that it auto-approved later in the same sweep). A refused route is
//! re-examined by the pass that withdraws or removes the route it
//! conflicted with: it becomes pending or approved. When two routes of
//! different clusters become approvable in the same pass, the older
//! node's wins.
//!
//! Cost: registrations, advertisements, approvals and removals run
//! [`plan_near`], whose cost is the routes overlapping the changed ones
//! (indexed queries), not the mesh's size; policy changes and the server's
//! start run [`plan`] over every route (`reevaluate`). A pass looks each
//! route up in an index of the approved ones (ancestors by exact lookup,
//! contained prefixes by an ordered range), so it is O(routes x prefix
//! length x log routes); both are measured in `tests/routes.rs`
//! (`a_pass_over_a_thousand_nodes_is_fast`,
//! `registration_cost_at_1000_2000_4000_nodes`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshvpn_engine::IpPrefix;

use crate::node::NodeRecord;
use crate::policy::{overlap, MeshNode, Policy, PolicyError};
use crate::store::{RouteRecord, RouteRows, Store, StoreError};

/// Where a route stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteStatus {
    /// In the network map: peers route the prefix to the node.
    Approved,
    /// Waiting for `meshvpn control routes approve` (or a policy that
    /// auto-approves it).
    Pending,
    /// Overlaps an approved route of another cluster.
    Refused(Conflict),
}

/// Who approved a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approver {
    /// The policy's `autoApprovers`.
    Policy,
    /// `meshvpn control routes approve`.
    Operator,
}

/// The other side of a refused route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The approved route it overlaps.
    pub prefix: IpPrefix,
    /// The node that route belongs to (its name).
    pub other_node: String,
    /// That node's cluster (`None`: unlabelled).
    pub other_cluster: Option<String>,
    /// The refused route's own node's cluster, so the reason names both.
    pub cluster: Option<String>,
}

/// A cluster as shown to people.
pub fn cluster_name(c: Option<&str>) -> &str {
    c.unwrap_or("(none)")
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "overlaps {} approved for node {} of cluster {} (this node is in cluster {}): \
             clusters on one mesh need distinct pod CIDRs",
            self.prefix,
            self.other_node,
            cluster_name(self.other_cluster.as_deref()),
            cluster_name(self.cluster.as_deref()),
        )
    }
}

impl fmt::Display for RouteStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteStatus::Approved => f.write_str("approved"),
            RouteStatus::Pending => f.write_str("pending"),
            RouteStatus::Refused(c) => write!(f, "refused: {c}"),
        }
    }
}

impl RouteStatus {
    /// The one-word form (`approved`, `pending`, `refused`).
    pub fn word(&self) -> &'static str {
        match self {
            RouteStatus::Approved => "approved",
            RouteStatus::Pending => "pending",
            RouteStatus::Refused(_) => "refused",
        }
    }
}

/// Why a route change was not made. Nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node {node} does not advertise {prefix} (see `meshvpn control routes list`)")]
    NotAdvertised { node: String, prefix: IpPrefix },
    #[error("{prefix} of node {node} cannot be approved: it {conflict}")]
    Conflict {
        node: String,
        prefix: IpPrefix,
        conflict: Box<Conflict>,
    },
    #[error("the stored policy (version {version}) no longer loads: {error}; set a valid one with `meshvpn control policy set`")]
    StoredPolicy { version: u64, error: PolicyError },
}

/// What a pass reads: every node and every route, as stored.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub nodes: Vec<NodeRecord>,
    /// Ordered by node id, then prefix.
    pub routes: Vec<RouteRecord>,
}

/// One row to write: a route's new state, or its removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteChange {
    Set(RouteRecord),
    Remove { node_id: i64, prefix: IpPrefix },
}

/// What a pass does besides re-examining every route.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// Only re-examine (after a policy change, a node's removal).
    None,
    /// The node now advertises exactly these prefixes (normalised to their
    /// networks, repeats dropped).
    Advertise {
        node_id: i64,
        prefixes: &'a [IpPrefix],
    },
    /// The operator approves the node's advertised prefix.
    Approve { node_id: i64, prefix: IpPrefix },
}

/// The result of a pass: the rows to write and the table after it (the
/// whole table for [`plan`], the rows examined for [`plan_near`]).
#[derive(Clone, Debug, Default)]
pub struct Planned {
    pub changes: Vec<RouteChange>,
    pub routes: Vec<RouteRecord>,
}

/// What the policy compiler and the approvers know of a node.
pub fn mesh_node(n: &NodeRecord) -> MeshNode {
    MeshNode {
        name: n.name.clone(),
        addresses: vec![IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)],
        tags: n.tags.clone(),
        routes: Vec::new(),
    }
}

/// The approved routes of a pass by prefix (ordered by address, then
/// length), each with its positions in the pass's table: the overlapping
/// ones are the prefix's ancestors (one lookup per shorter length) and the
/// keys between its first and last address, so a lookup costs the prefix
/// length plus the matches instead of a scan of every route.
#[derive(Default)]
struct ApprovedIndex {
    by_prefix: BTreeMap<IpPrefix, Vec<usize>>,
}

impl ApprovedIndex {
    fn insert(&mut self, p: IpPrefix, i: usize) {
        self.by_prefix.entry(p).or_default().push(i);
    }

    fn remove(&mut self, p: IpPrefix, i: usize) {
        if let Some(v) = self.by_prefix.get_mut(&p) {
            v.retain(|&x| x != i);
            if v.is_empty() {
                self.by_prefix.remove(&p);
            }
        }
    }

    /// The first (in pass order: the oldest node's) approved route of
    /// another cluster that `table[i]` overlaps.
    fn conflict(&self, i: usize, table: &[RouteRecord]) -> Option<Conflict> {
        let r = &table[i];
        let net = r.prefix.network();
        let mut found: Option<usize> = None;
        let mut consider = |v: &Vec<usize>| {
            for &j in v {
                let o = &table[j];
                if o.node_id != r.node_id && o.cluster != r.cluster && found.is_none_or(|f| j < f) {
                    found = Some(j);
                }
            }
        };
        // Ancestors and the prefix itself.
        for len in 0..net.len() {
            if let Ok(a) = IpPrefix::new(net.addr(), len) {
                if let Some(v) = self.by_prefix.get(&a.network()) {
                    consider(v);
                }
            }
        }
        // Everything from its first to its last address: the prefix itself
        // and what it holds.
        let last = last_addr(net);
        let max = if net.addr().is_ipv4() { 32 } else { 128 };
        if let (Ok(lo), Ok(hi)) = (
            IpPrefix::new(net.addr(), net.len()),
            IpPrefix::new(last, max),
        ) {
            for (_, v) in self.by_prefix.range(lo..=hi) {
                consider(v);
            }
        }
        found.map(|j| {
            let o = &table[j];
            debug_assert!(overlap(o.prefix, r.prefix).is_some());
            Conflict {
                prefix: o.prefix,
                other_node: o.node_name.clone(),
                other_cluster: o.cluster.clone(),
                cluster: r.cluster.clone(),
            }
        })
    }
}

/// The last address of a prefix.
pub(crate) fn last_addr(p: IpPrefix) -> IpAddr {
    match p.network().addr() {
        IpAddr::V4(a) => {
            let host = u32::MAX.checked_shr(u32::from(p.len())).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
        }
        IpAddr::V6(a) => {
            let host = u128::MAX.checked_shr(u32::from(p.len())).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
        }
    }
}

/// The first approved route of another cluster that `table[i]` overlaps.
fn conflict_for(i: usize, table: &[RouteRecord]) -> Option<Conflict> {
    let mut index = ApprovedIndex::default();
    for (j, r) in table.iter().enumerate() {
        if r.status == RouteStatus::Approved {
            index.insert(r.prefix, j);
        }
    }
    index.conflict(i, table)
}

/// One pass over the table (sans-IO): applies `target`, then re-examines
/// every route by the rules in the module docs. `Err` leaves nothing to
/// write.
pub fn plan(
    table: &RouteTable,
    policy: Option<&Policy>,
    target: Target<'_>,
    now: u64,
) -> Result<Planned, RouteError> {
    let node = |id: i64| {
        table
            .nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or(StoreError::NoSuchNode(id))
    };
    let mut work = table.routes.clone();
    match target {
        Target::None => {}
        Target::Advertise { node_id, prefixes } => {
            let n = node(node_id)?;
            let wanted = crate::store::advertised_set(node_id, prefixes)?;
            work.retain(|r| r.node_id != node_id || wanted.contains(&r.prefix));
            for p in wanted {
                if !work.iter().any(|r| r.node_id == node_id && r.prefix == p) {
                    work.push(RouteRecord::new(n, p, RouteStatus::Pending, None, now));
                }
            }
        }
        Target::Approve { node_id, prefix } => {
            let n = node(node_id)?;
            let prefix = prefix.network();
            let i = work
                .iter()
                .position(|r| r.node_id == node_id && r.prefix == prefix)
                .ok_or_else(|| RouteError::NotAdvertised {
                    node: n.name.clone(),
                    prefix,
                })?;
            if let Some(conflict) = conflict_for(i, &work) {
                return Err(RouteError::Conflict {
                    node: n.name.clone(),
                    prefix,
                    conflict: Box::new(conflict),
                });
            }
            if work[i].status != RouteStatus::Approved {
                work[i].set(RouteStatus::Approved, Some(Approver::Operator), now);
            }
        }
    }
    work.sort_by_key(|r| (r.node_id, r.prefix));
    settle(&table.nodes, &mut work, policy, now);
    if let Target::Approve { node_id, prefix } = target {
        let prefix = prefix.network();
        let r = work
            .iter()
            .find(|r| r.node_id == node_id && r.prefix == prefix)
            .expect("checked above");
        // An older node's route of another cluster that this pass approved
        // first (a policy change not yet re-examined) wins.
        if let RouteStatus::Refused(conflict) = &r.status {
            return Err(RouteError::Conflict {
                node: r.node_name.clone(),
                prefix,
                conflict: Box::new(conflict.clone()),
            });
        }
    }
    let before: HashMap<(i64, IpPrefix), &RouteRecord> = table
        .routes
        .iter()
        .map(|r| ((r.node_id, r.prefix), r))
        .collect();
    let after: HashSet<(i64, IpPrefix)> = work.iter().map(|r| (r.node_id, r.prefix)).collect();
    let mut changes = Vec::new();
    for old in &table.routes {
        if !after.contains(&(old.node_id, old.prefix)) {
            changes.push(RouteChange::Remove {
                node_id: old.node_id,
                prefix: old.prefix,
            });
        }
    }
    for r in &work {
        if before.get(&(r.node_id, r.prefix)) != Some(&r) {
            changes.push(RouteChange::Set(r.clone()));
        }
    }
    Ok(Planned {
        changes,
        routes: work,
    })
}

/// Sweeps at most: a sweep that approves nothing new only refuses pending
/// routes or names an older conflict, so the third sweep after any input
/// changes nothing (the bound only guards against a mistake in that
/// reasoning).
const MAX_SWEEPS: usize = 8;

/// Applies the rules to `work` (ordered by node id, then prefix) until a
/// sweep changes nothing, so what a pass writes holds every rule at once:
/// a route left pending by one sweep because a newer node's route of
/// another cluster was auto-approved after it is refused by the next
/// (one sweep alone left it pending until some later pass).
fn settle(nodes: &[NodeRecord], work: &mut [RouteRecord], policy: Option<&Policy>, now: u64) {
    let nodes: HashMap<i64, &NodeRecord> = nodes.iter().map(|n| (n.id, n)).collect();
    let mut approved = ApprovedIndex::default();
    for (i, r) in work.iter().enumerate() {
        if r.status == RouteStatus::Approved {
            approved.insert(r.prefix, i);
        }
    }
    for _ in 0..MAX_SWEEPS {
        if !sweep(&nodes, work, &mut approved, policy, now) {
            return;
        }
    }
    debug_assert!(
        false,
        "route decisions did not settle in {MAX_SWEEPS} sweeps"
    );
}

/// One sweep of the rules over every route of `work`, in order; true when
/// it changed a route.
fn sweep(
    nodes: &HashMap<i64, &NodeRecord>,
    work: &mut [RouteRecord],
    approved: &mut ApprovedIndex,
    policy: Option<&Policy>,
    now: u64,
) -> bool {
    let mut changed = false;
    for i in 0..work.len() {
        let (status, by) = match approved.conflict(i, work) {
            Some(c) => (RouteStatus::Refused(c), None),
            None if work[i].status == RouteStatus::Approved => {
                (RouteStatus::Approved, work[i].approved_by)
            }
            None => {
                let auto = policy.is_some_and(|p| {
                    nodes
                        .get(&work[i].node_id)
                        .is_some_and(|n| p.auto_approves(&mesh_node(n), work[i].prefix))
                });
                if auto {
                    (RouteStatus::Approved, Some(Approver::Policy))
                } else {
                    (RouteStatus::Pending, None)
                }
            }
        };
        let was = work[i].status == RouteStatus::Approved;
        let is = status == RouteStatus::Approved;
        if was && !is {
            approved.remove(work[i].prefix, i);
        } else if is && !was {
            approved.insert(work[i].prefix, i);
        }
        if work[i].status != status || work[i].approved_by != by {
            work[i].set(status, by, now);
            changed = true;
        }
    }
    changed
}

/// The rows an incremental pass examines, keyed as a pass orders them.
#[derive(Default)]
struct Near {
    routes: BTreeMap<(i64, IpPrefix), RouteRecord>,
    nodes: BTreeMap<i64, NodeRecord>,
    /// Non-approved routes whose approved neighbours have been read.
    with_context: HashSet<(i64, IpPrefix)>,
    /// Routes the pass approved whose neighbours have been read.
    grown: HashSet<(i64, IpPrefix)>,
}

impl Near {
    /// Adds `r`; false when it was there.
    fn add(&mut self, r: RouteRecord) -> bool {
        let key = (r.node_id, r.prefix);
        if self.routes.contains_key(&key) {
            return false;
        }
        self.routes.insert(key, r);
        true
    }

    /// Two approved routes of different clusters overlap: only a node that
    /// changed cluster (registered again with another cluster's key), or
    /// rows written without a pass, leave that; approvals may then be
    /// taken back and free routes anywhere, so the whole table is planned.
    fn approved_conflict(&self) -> bool {
        let table: Vec<RouteRecord> = self.routes.values().cloned().collect();
        let mut index = ApprovedIndex::default();
        for (i, r) in table.iter().enumerate() {
            if r.status == RouteStatus::Approved {
                index.insert(r.prefix, i);
            }
        }
        (0..table.len()).any(|i| {
            table[i].status == RouteStatus::Approved && index.conflict(i, &table).is_some()
        })
    }

    fn table(&self) -> RouteTable {
        RouteTable {
            nodes: self.nodes.values().cloned().collect(),
            routes: self.routes.values().cloned().collect(),
        }
    }
}

/// The incremental pass: [`plan`] (the same rules, the same code) over only
/// the rows `target` and the `withdrawn` prefixes can affect, read through
/// [`RouteRows`]' indexed queries; the result equals [`plan`] over the
/// whole table when the table was left by passes (every rule holds in
/// it), which `tests/routes.rs` checks on random sequences. What it reads:
///
/// - the target node's routes, and every route overlapping one of its
///   prefixes before or after, or a withdrawn prefix (the refused routes
///   waiting on one, the approved ones that conflict with it);
/// - for each of those not approved, the approved routes overlapping it
///   (what decides whether it is refused, and by which);
/// - for each route the pass newly approves, the routes overlapping it,
///   then it plans again (a pending route there is now refused); a newly
///   approved route never takes an approval back, so this stops.
///
/// When two approved routes of different clusters overlap among them (the
/// target node changed cluster) it plans the whole table instead.
/// [`Planned::routes`] holds the rows it examined, not the whole table.
pub fn plan_near(
    rows: &mut dyn RouteRows,
    policy: Option<&Policy>,
    target: Target<'_>,
    withdrawn: &[IpPrefix],
    now: u64,
) -> Result<Planned, RouteError> {
    let mut near = Near::default();
    let mut seeds: BTreeSet<IpPrefix> = withdrawn.iter().map(|p| p.network()).collect();
    let target_node = match target {
        Target::None => None,
        Target::Advertise { node_id, .. } | Target::Approve { node_id, .. } => Some(node_id),
    };
    if let Some(id) = target_node {
        // The same errors as `plan`, in its order.
        let Some(n) = rows.node(id)? else {
            return Err(StoreError::NoSuchNode(id).into());
        };
        near.nodes.insert(id, n);
        match target {
            Target::Advertise { node_id, prefixes } => {
                seeds.extend(crate::store::advertised_set(node_id, prefixes)?);
            }
            Target::Approve { prefix, .. } => {
                seeds.insert(prefix.network());
            }
            Target::None => {}
        }
        for r in rows.routes_of(id)? {
            seeds.insert(r.prefix);
            near.add(r);
        }
    }
    for s in &seeds {
        for r in rows.overlapping(*s)? {
            near.add(r);
        }
    }
    loop {
        // The approved neighbours of every route not approved.
        let open: Vec<(i64, IpPrefix)> = near
            .routes
            .iter()
            .filter(|(k, r)| r.status != RouteStatus::Approved && !near.with_context.contains(k))
            .map(|(k, _)| *k)
            .collect();
        for key in open {
            near.with_context.insert(key);
            for r in rows.overlapping(key.1)? {
                if r.status == RouteStatus::Approved {
                    near.add(r);
                }
            }
        }
        let missing: Vec<i64> = near
            .routes
            .keys()
            .map(|k| k.0)
            .filter(|id| !near.nodes.contains_key(id))
            .collect();
        for id in missing {
            if let Some(n) = rows.node(id)? {
                near.nodes.insert(id, n);
            }
        }
        if near.approved_conflict() {
            return plan(&rows.all()?, policy, target, now);
        }
        let planned = plan(&near.table(), policy, target, now)?;
        let approved_now: Vec<(i64, IpPrefix)> = planned
            .routes
            .iter()
            .filter(|r| r.status == RouteStatus::Approved)
            .map(|r| (r.node_id, r.prefix))
            .filter(|k| {
                near.routes
                    .get(k)
                    .is_none_or(|r| r.status != RouteStatus::Approved)
                    && !near.grown.contains(k)
            })
            .collect();
        let mut added = false;
        for key in approved_now {
            near.grown.insert(key);
            for r in rows.overlapping(key.1)? {
                added |= near.add(r);
            }
        }
        if !added {
            return Ok(planned);
        }
    }
}

/// Runs one incremental pass ([`plan_near`]) in one store transaction.
fn run_near(
    store: &dyn Store,
    policy: Option<&Policy>,
    target: Target<'_>,
    withdrawn: &[IpPrefix],
    now: u64,
) -> Result<Planned, RouteError> {
    let mut out = Planned::default();
    store.change_routes_near(&mut |rows| {
        out = plan_near(rows, policy, target, withdrawn, now)?;
        Ok(out.changes.clone())
    })?;
    Ok(out)
}

/// Runs one pass in one store transaction and returns it.
fn run(
    store: &dyn Store,
    policy: Option<&Policy>,
    target: Target<'_>,
    now: u64,
) -> Result<Planned, RouteError> {
    let mut out = Planned::default();
    store.change_routes(&mut |table| {
        out = plan(table, policy, target, now)?;
        Ok(out.changes.clone())
    })?;
    Ok(out)
}

/// The node now advertises `advertised`: records it and decides each
/// route (the server calls this at registration and when a node changes
/// what it advertises). Returns the node's prefixes with their status.
/// Other nodes' routes may change in the same pass (a withdrawn route
/// frees one it blocked); [`advertise`] returns those changes too.
pub fn decide(
    store: &dyn Store,
    policy: Option<&Policy>,
    node: &NodeRecord,
    advertised: &[IpPrefix],
    now: u64,
) -> Result<Vec<(IpPrefix, RouteStatus)>, RouteError> {
    let done = advertise(store, policy, node, advertised, now)?;
    Ok(done
        .routes
        .into_iter()
        .filter(|r| r.node_id == node.id)
        .map(|r| (r.prefix, r.status))
        .collect())
}

/// [`decide`], returning the whole pass: every row it changed (of any
/// node: what the server sends in network-map updates) and the rows it
/// examined after it (an incremental pass, [`plan_near`]: the node's
/// routes and their neighbours, not the whole table).
pub fn advertise(
    store: &dyn Store,
    policy: Option<&Policy>,
    node: &NodeRecord,
    advertised: &[IpPrefix],
    now: u64,
) -> Result<Planned, RouteError> {
    let target = Target::Advertise {
        node_id: node.id,
        prefixes: advertised,
    };
    run_near(store, policy, target, &[], now)
}

/// Re-examines what the routes of removed nodes blocked or conflicted
/// with (the routes overlapping `removed`; see [`plan_near`]): after
/// [`Store::remove_node_with_routes`] and the ephemeral clean-up.
/// Returns what changed.
pub fn withdrawn(
    store: &dyn Store,
    policy: Option<&Policy>,
    removed: &[RouteRecord],
    now: u64,
) -> Result<Vec<RouteChange>, RouteError> {
    if removed.is_empty() {
        return Ok(Vec::new());
    }
    let prefixes: Vec<IpPrefix> = removed.iter().map(|r| r.prefix).collect();
    Ok(run_near(store, policy, Target::None, &prefixes, now)?.changes)
}

/// The operator approves a route; refused (nothing stored) when it
/// overlaps an approved route of another cluster, or is not advertised.
pub fn approve(
    store: &dyn Store,
    policy: Option<&Policy>,
    node_id: i64,
    prefix: IpPrefix,
    now: u64,
) -> Result<RouteRecord, RouteError> {
    let done = run_near(store, policy, Target::Approve { node_id, prefix }, &[], now)?;
    let prefix = prefix.network();
    Ok(done
        .routes
        .into_iter()
        .find(|r| r.node_id == node_id && r.prefix == prefix)
        .expect("plan keeps the approved route"))
}

/// Re-examines every route: after the policy changed (new auto-approvals;
/// nothing approved is taken back), after nodes were removed by a process
/// that did not run [`withdrawn`], and when the server starts. Returns
/// what changed.
pub fn reevaluate(
    store: &dyn Store,
    policy: Option<&Policy>,
    now: u64,
) -> Result<Vec<RouteChange>, RouteError> {
    Ok(run(store, policy, Target::None, now)?.changes)
}

/// The stored policy, parsed; `None` when none was set (allow-all, no
/// auto-approval).
pub fn stored_policy(store: &dyn Store) -> Result<Option<Policy>, RouteError> {
    match store.policy()? {
        None => Ok(None),
        Some(rec) => Policy::parse(&rec.text)
            .map(Some)
            .map_err(|error| RouteError::StoredPolicy {
                version: rec.version,
                error,
            }),
    }
}

/// How long the node of a primary route may be without a control session
/// before its prefixes move to a standby router of the same prefix. Long
/// enough that a control session that drops and reconnects at once (the
/// client's first retry) keeps its primaries; short enough that traffic
/// through a router that died moves within a few seconds. The server
/// counts its own start as every node's disconnection, so nodes
/// reconnecting after a server restart keep their primaries too.
pub const PRIMARY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// [`RouteRecord::role`] of the route the map gives its prefix to.
pub const PRIMARY: &str = "primary";
/// [`RouteRecord::role`] of an approved route whose prefix another router
/// carries.
pub const STANDBY: &str = "standby";

/// Elects the primary router of every approved prefix (sans-IO): of the
/// approved routes with one prefix (several subnet routers of one cluster
/// for one LAN, as Tailscale's and headscale's high-availability routes;
/// approved routes of different clusters never overlap), exactly one is
/// primary and goes in the network map, the others stand by. Per prefix:
///
/// 1. the primary stays while its node is `up` (has a control session,
///    or lost it less than [`PRIMARY_GRACE`] ago): a router that joins,
///    or a former primary that comes back, takes nothing over;
/// 2. else the first `up` route in approval order (its `updated`, then
///    the lowest node id) becomes primary;
/// 3. with no router `up`, the primary stays (there is nothing better),
///    or, when it was withdrawn or its node removed, the first route in
///    approval order becomes primary.
///
/// Longer or shorter overlapping prefixes are other prefixes: each gets
/// its own primary and the most specific route wins in the data plane.
/// `routes` must hold every route of each prefix it holds (the whole
/// table, as the server reads it). Returns the routes whose `primary`
/// flag changes, with the new flag, for [`Store::change_routes`]. The cost
/// is one sort of the approved routes: O(routes x log routes).
pub fn elect(routes: &[RouteRecord], up: &dyn Fn(i64) -> bool) -> Vec<RouteChange> {
    let mut groups: BTreeMap<IpPrefix, Vec<&RouteRecord>> = BTreeMap::new();
    let mut changes = Vec::new();
    for r in routes {
        if r.status == RouteStatus::Approved {
            groups.entry(r.prefix.network()).or_default().push(r);
        } else if r.primary {
            let mut r = r.clone();
            r.primary = false;
            changes.push(RouteChange::Set(r));
        }
    }
    for group in groups.values_mut() {
        group.sort_by_key(|r| (r.updated, r.node_id));
        let current = group.iter().copied().filter(|r| r.primary);
        let chosen = current
            .clone()
            .find(|r| up(r.node_id))
            .or_else(|| group.iter().copied().find(|r| up(r.node_id)))
            .or_else(|| current.clone().next())
            .unwrap_or(group[0]);
        for r in group.iter() {
            let want = std::ptr::eq(*r, chosen);
            if r.primary != want {
                let mut r = (*r).clone();
                r.primary = want;
                changes.push(RouteChange::Set(r));
            }
        }
    }
    changes
}

impl RouteRecord {
    /// Its part in its prefix: `primary` (the map gives the prefix to its
    /// node) or `standby` when approved, empty otherwise.
    pub fn role(&self) -> &'static str {
        match (self.status == RouteStatus::Approved, self.primary) {
            (true, true) => PRIMARY,
            (true, false) => STANDBY,
            (false, _) => "",
        }
    }

    fn new(
        node: &NodeRecord,
        prefix: IpPrefix,
        status: RouteStatus,
        approved_by: Option<Approver>,
        now: u64,
    ) -> Self {
        RouteRecord {
            node_id: node.id,
            node_name: node.name.clone(),
            cluster: node.cluster.clone(),
            prefix,
            approved: status == RouteStatus::Approved,
            status,
            approved_by,
            updated: now,
            primary: false,
        }
    }

    fn set(&mut self, status: RouteStatus, approved_by: Option<Approver>, now: u64) {
        self.approved = status == RouteStatus::Approved;
        // A route that stops being approved gives up its prefix; the next
        // election (`elect`) picks another primary.
        self.primary &= self.approved;
        self.status = status;
        self.approved_by = approved_by;
        self.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node_id: i64, cluster: &str, prefix: IpPrefix, approved: bool) -> RouteRecord {
        RouteRecord {
            node_id,
            node_name: format!("n{node_id}"),
            cluster: Some(cluster.to_string()),
            prefix,
            approved,
            status: if approved {
                RouteStatus::Approved
            } else {
                RouteStatus::Pending
            },
            approved_by: None,
            updated: 0,
            primary: false,
        }
    }

    /// The index finds exactly what a scan of every route finds, on
    /// random IPv4 and IPv6 prefixes of every length (seeded, bounded).
    #[test]
    fn the_index_agrees_with_a_scan() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50 {
            let mut table = Vec::new();
            for i in 0..200 {
                let prefix = if rand() % 4 == 0 {
                    let a = Ipv6Addr::from(u128::from(rand()) << 64 | 0xfd00);
                    IpPrefix::new(IpAddr::V6(a), (rand() % 129) as u8).unwrap()
                } else {
                    // Few distinct high bits, so overlaps are common.
                    let a = Ipv4Addr::from(0x0a00_0000 | (rand() as u32 & 0x00ff_ff00));
                    IpPrefix::new(IpAddr::V4(a), (rand() % 33) as u8).unwrap()
                }
                .network();
                let cluster = ["a", "b", "c"][(rand() % 3) as usize];
                table.push(record(i, cluster, prefix, rand() % 2 == 0));
            }
            let mut index = ApprovedIndex::default();
            for (j, r) in table.iter().enumerate() {
                if r.approved {
                    index.insert(r.prefix, j);
                }
            }
            for i in 0..table.len() {
                let r = &table[i];
                let scan = table
                    .iter()
                    .find(|o| {
                        o.approved
                            && o.node_id != r.node_id
                            && o.cluster != r.cluster
                            && overlap(o.prefix, r.prefix).is_some()
                    })
                    .map(|o| o.node_name.clone());
                let got = index.conflict(i, &table).map(|c| c.other_node);
                assert_eq!(got, scan, "{}", r.prefix);
            }
        }
    }

    fn approved(node_id: i64, prefix: &str, updated: u64) -> RouteRecord {
        let mut r = record(node_id, "lan", prefix.parse().unwrap(), true);
        r.updated = updated;
        r
    }

    /// Applies an election's changes to the table.
    fn apply(table: &mut [RouteRecord], up: &dyn Fn(i64) -> bool) {
        for c in elect(table, up) {
            let RouteChange::Set(new) = c else {
                panic!("an election only sets flags")
            };
            let r = table
                .iter_mut()
                .find(|r| r.node_id == new.node_id && r.prefix == new.prefix)
                .unwrap();
            assert_eq!((r.status.clone(), r.updated), (new.status, new.updated));
            r.primary = new.primary;
        }
        assert!(elect(table, up).is_empty(), "an election is stable");
    }

    fn primaries(table: &[RouteRecord], prefix: &str) -> Vec<i64> {
        let p: IpPrefix = prefix.parse().unwrap();
        table
            .iter()
            .filter(|r| r.prefix == p && r.primary)
            .map(|r| r.node_id)
            .collect()
    }

    const ALL_UP: &dyn Fn(i64) -> bool = &|_| true;

    #[test]
    fn the_earliest_approved_router_becomes_primary_then_the_lowest_id() {
        let mut t = vec![
            approved(3, "192.168.1.0/24", 10),
            approved(5, "192.168.1.0/24", 7),
            approved(4, "192.168.1.0/24", 7),
        ];
        apply(&mut t, ALL_UP);
        assert_eq!(primaries(&t, "192.168.1.0/24"), [4]);
        assert_eq!(t[0].role(), STANDBY);
        assert_eq!(t[2].role(), PRIMARY);
        // The same table in another order elects the same router.
        let mut u = vec![t[2].clone(), t[0].clone(), t[1].clone()];
        for r in &mut u {
            r.primary = false;
        }
        apply(&mut u, ALL_UP);
        assert_eq!(primaries(&u, "192.168.1.0/24"), [4]);
    }

    #[test]
    fn a_single_router_is_primary_and_other_prefixes_get_their_own() {
        let mut t = vec![
            approved(1, "192.168.1.0/24", 1),
            approved(2, "192.168.0.0/16", 1),
            approved(3, "192.168.1.0/25", 1),
            record(4, "lan", "192.168.1.0/24".parse().unwrap(), false),
        ];
        apply(&mut t, ALL_UP);
        assert_eq!(primaries(&t, "192.168.1.0/24"), [1]);
        assert_eq!(primaries(&t, "192.168.0.0/16"), [2]);
        assert_eq!(primaries(&t, "192.168.1.0/25"), [3]);
        assert_eq!(t[3].role(), "", "a pending route has no part");
    }

    #[test]
    fn the_primary_stays_while_up_when_routers_join_or_come_back() {
        let mut t = vec![approved(7, "10.0.0.0/24", 50)];
        apply(&mut t, ALL_UP);
        // A router approved earlier by the clock, and one with a lower id,
        // join: neither takes over.
        t.push(approved(2, "10.0.0.0/24", 1));
        t.push(approved(1, "10.0.0.0/24", 60));
        apply(&mut t, ALL_UP);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [7]);
        // 7 goes away: the earliest approved of the others takes over.
        apply(&mut t, &|id| id != 7);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [2]);
        // 7 comes back: 2 keeps it (no flapping back).
        apply(&mut t, ALL_UP);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [2]);
        // 2 and 1 go away, 7 is up: 7 again.
        apply(&mut t, &|id| id == 7);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [7]);
    }

    #[test]
    fn with_no_router_up_the_primary_stays() {
        let mut t = vec![approved(1, "10.0.0.0/24", 1), approved(2, "10.0.0.0/24", 2)];
        apply(&mut t, &|id| id == 2);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [2]);
        apply(&mut t, &|_| false);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [2]);
    }

    #[test]
    fn a_removed_or_withdrawn_primary_is_replaced() {
        let mut t = vec![
            approved(1, "10.0.0.0/24", 1),
            approved(2, "10.0.0.0/24", 2),
            approved(3, "10.0.0.0/24", 3),
        ];
        apply(&mut t, ALL_UP);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [1]);
        // Node 1 removed: its routes are gone from the table.
        t.remove(0);
        apply(&mut t, ALL_UP);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [2]);
        // Node 2's route no longer approved (a pass's `set` drops the
        // flag): 3 takes over, even with every node down.
        t[0].set(RouteStatus::Pending, None, 9);
        assert!(!t[0].primary);
        apply(&mut t, &|_| false);
        assert_eq!(primaries(&t, "10.0.0.0/24"), [3]);
    }

    /// Random sequences of joins, approvals, withdrawals, removals and
    /// nodes going up and down (seeded, bounded): after every election
    /// each approved prefix has exactly one primary, no route that is not
    /// approved is primary, and a primary whose node stayed up kept it.
    #[test]
    fn exactly_one_primary_per_approved_prefix_and_it_sticks_while_up() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let prefixes = ["10.0.0.0/24", "10.0.0.0/25", "10.1.0.0/16", "fd00::/64"];
        for _ in 0..200 {
            let mut t: Vec<RouteRecord> = Vec::new();
            let mut down: HashSet<i64> = HashSet::new();
            for step in 0..60u64 {
                let node = rand(8) as i64;
                let prefix: IpPrefix = prefixes[rand(4) as usize].parse().unwrap();
                let at = t
                    .iter()
                    .position(|r| r.node_id == node && r.prefix == prefix);
                match (rand(6), at) {
                    (0 | 1, None) => t.push(record(node, "lan", prefix, false)),
                    (0 | 1, Some(i)) => t[i].set(RouteStatus::Approved, None, step),
                    (2, Some(i)) => {
                        t.remove(i);
                    }
                    (3, _) => t.retain(|r| r.node_id != node),
                    (4, Some(i)) => t[i].set(RouteStatus::Pending, None, step),
                    _ => {
                        if !down.remove(&node) {
                            down.insert(node);
                        }
                    }
                }
                let before: Vec<RouteRecord> = t.clone();
                apply(&mut t, &|id| !down.contains(&id));
                let mut by_prefix: BTreeMap<IpPrefix, Vec<&RouteRecord>> = BTreeMap::new();
                for r in &t {
                    assert!(r.approved || !r.primary, "{r:?}");
                    if r.approved {
                        by_prefix.entry(r.prefix).or_default().push(r);
                    }
                }
                for (p, rs) in by_prefix {
                    assert_eq!(rs.iter().filter(|r| r.primary).count(), 1, "{p}: {rs:?}");
                }
                for r in before
                    .iter()
                    .filter(|r| r.primary && !down.contains(&r.node_id))
                {
                    assert!(
                        t.iter()
                            .any(|n| n.node_id == r.node_id && n.prefix == r.prefix && n.primary),
                        "{r:?} lost its prefix while up"
                    );
                }
            }
        }
    }

    #[test]
    fn last_addresses() {
        let p = |s: &str| s.parse::<IpPrefix>().unwrap();
        assert_eq!(last_addr(p("10.42.0.0/16")).to_string(), "10.42.255.255");
        assert_eq!(last_addr(p("0.0.0.0/0")).to_string(), "255.255.255.255");
        assert_eq!(last_addr(p("10.1.2.3/32")).to_string(), "10.1.2.3");
        assert_eq!(last_addr(p("fd00::/120")).to_string(), "fd00::ff");
    }
}
