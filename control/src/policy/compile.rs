//! A policy compiled for one node: the engine filter rules saying what may
//! reach the node (inbound) and what the node may start (outbound).

use std::collections::HashSet;
use std::hash::Hash;
use std::net::IpAddr;

use meshvpn_engine::filter::{default_icmp_types, FilterRules, PortRange, Rule};
use meshvpn_engine::IpPrefix;

use super::{Policy, Selector};

/// What the compiler knows of a node: its mesh addresses, tags and
/// approved routes (the subnets, e.g. a pod CIDR, it carries traffic for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshNode {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub tags: Vec<String>,
    pub routes: Vec<IpPrefix>,
}

impl MeshNode {
    /// The prefixes traffic to this node can be for: its addresses and
    /// its approved routes.
    fn local(&self) -> Vec<IpPrefix> {
        let mut v: Vec<IpPrefix> = self.addresses.iter().map(|a| IpPrefix::host(*a)).collect();
        v.extend(self.routes.iter().map(|r| r.network()));
        v
    }
}

/// The filter rules for `node` in a mesh of `mesh` (which may include
/// `node`). `None` when there is no policy: allow all between nodes, as
/// Tailscale does without an ACL.
///
/// Inbound, each ACL keeps the destinations that fall on the node (its
/// addresses and approved routes, a CIDR narrowed to the overlap), from
/// every source the ACL names. Outbound, each ACL whose sources cover the
/// node (narrowed the same way) keeps all its destinations. An ACL with
/// nothing left on a side is left out of that side.
pub fn compile(policy: Option<&Policy>, node: &MeshNode, mesh: &[MeshNode]) -> Option<FilterRules> {
    let policy = policy?;
    let local = node.local();
    let mut rules = FilterRules::default();
    for acl in &policy.acls {
        let srcs = resolve_all(policy, acl.srcs.iter(), mesh);
        let dsts: Vec<(IpPrefix, PortRange)> = acl
            .dsts
            .iter()
            .flat_map(|(sel, ports)| {
                resolve(policy, sel, mesh)
                    .into_iter()
                    .flat_map(move |p| ports.iter().map(move |r| (p, *r)))
            })
            .collect();
        let inbound_dsts: Vec<(IpPrefix, PortRange)> = dsts
            .iter()
            .flat_map(|(p, r)| {
                local
                    .iter()
                    .filter_map(move |l| overlap(*p, *l).map(|o| (o, *r)))
            })
            .collect();
        if !srcs.is_empty() && !inbound_dsts.is_empty() {
            rules.inbound.push(Rule {
                srcs: srcs.clone(),
                dsts: dedup(inbound_dsts),
                protos: acl.protos,
                icmp_types: default_icmp_types(),
            });
        }
        let own_srcs: Vec<IpPrefix> = srcs
            .iter()
            .flat_map(|s| local.iter().filter_map(move |l| overlap(*s, *l)))
            .collect();
        if !own_srcs.is_empty() && !dsts.is_empty() {
            rules.outbound.push(Rule {
                srcs: dedup(own_srcs),
                dsts: dedup(dsts),
                protos: acl.protos,
                icmp_types: default_icmp_types(),
            });
        }
    }
    Some(rules)
}

/// Drops repeats, keeping first occurrences in order (a set: groups of
/// thousands of members must not make this quadratic).
fn dedup<T: Hash + Eq + Copy>(v: Vec<T>) -> Vec<T> {
    let mut seen = HashSet::with_capacity(v.len());
    v.into_iter().filter(|x| seen.insert(*x)).collect()
}

fn resolve_all<'a>(
    policy: &Policy,
    sels: impl Iterator<Item = &'a Selector>,
    mesh: &[MeshNode],
) -> Vec<IpPrefix> {
    dedup(sels.flat_map(|s| resolve(policy, s, mesh)).collect())
}

/// The prefixes a selector stands for in this mesh.
fn resolve(policy: &Policy, sel: &Selector, mesh: &[MeshNode]) -> Vec<IpPrefix> {
    let any = |s: &str| s.parse::<IpPrefix>().expect("a literal prefix");
    match sel {
        Selector::Any => vec![any("0.0.0.0/0"), any("::/0")],
        Selector::Prefix(p) => vec![*p],
        Selector::Tag(t) => mesh
            .iter()
            .filter(|n| n.tags.iter().any(|x| x == t))
            .flat_map(|n| n.addresses.iter().map(|a| IpPrefix::host(*a)))
            .collect(),
        // Groups hold no groups (checked at load): one level.
        Selector::Group(g) => policy
            .group(g)
            .iter()
            .flat_map(|s| resolve(policy, s, mesh))
            .collect(),
    }
}

/// Whether `sel` names `node` (a tag it carries, or one of its addresses).
pub(crate) fn names_node(policy: &Policy, sel: &Selector, node: &MeshNode) -> bool {
    match sel {
        Selector::Any => true,
        Selector::Tag(t) => node.tags.iter().any(|x| x == t),
        Selector::Prefix(p) => node.addresses.iter().any(|a| p.contains(*a)),
        Selector::Group(g) => policy.group(g).iter().any(|s| names_node(policy, s, node)),
    }
}

/// The smaller of two prefixes when one holds the other.
pub(crate) fn overlap(a: IpPrefix, b: IpPrefix) -> Option<IpPrefix> {
    let (a, b) = (a.network(), b.network());
    if a.len() <= b.len() && a.contains(b.addr()) {
        Some(b)
    } else if b.len() <= a.len() && b.contains(a.addr()) {
        Some(a)
    } else {
        None
    }
}

impl Policy {
    /// Whether `autoApprovers.routes` approves `route` advertised by
    /// `node`: some entry's prefix holds the route and one of its
    /// approvers names the node.
    pub fn auto_approves(&self, node: &MeshNode, route: IpPrefix) -> bool {
        let route = route.network();
        self.route_approvers.iter().any(|(p, approvers)| {
            overlap(*p, route) == Some(route) && approvers.iter().any(|s| names_node(self, s, node))
        })
    }
}
