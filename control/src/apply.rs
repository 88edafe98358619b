//! From the node's network map to the engine's peers, sans-IO.
//!
//! [`plan`] turns the map a node holds ([`NodeState`]) into the WireGuard
//! peer set it should have: per peer the public key, the allowed IPs (its
//! mesh addresses, plus its approved routes when the node accepts routes),
//! the endpoint to start from and whether the relay can reach it. [`diff`]
//! compares two plans and says what to add, change and remove, so a map
//! delta touches only the peers it changed: a peer whose endpoint the
//! engine learned by roaming keeps it until the map itself says something
//! new about where the peer is (the map's endpoint is where to start, the
//! engine's roaming knows better afterwards, as in wireguard-go).
//! [`route_diff`] does the same for the kernel routes of the TUN.
//!
//! Nothing here touches the engine or the kernel; `meshvpn up`
//! (cli/src/up.rs) carries the changes out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use meshvpn_engine::relay::protocol::MAX_CANDIDATES;
use meshvpn_engine::{IpPrefix, PublicKey};

use crate::client::NodeState;

/// Persistent keepalive for mesh peers: keeps NAT mappings open both ways
/// (wg-quick's usual 25 s, what Tailscale's peers do behind NAT too).
pub const MESH_KEEPALIVE: u16 = 25;

/// How the node turns its map into peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanOptions {
    /// Route the peers' approved routes (e.g. other nodes' pod CIDRs)
    /// through the mesh (`--accept-routes`, Tailscale's flag of that name).
    pub accept_routes: bool,
}

/// One engine peer the map asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPeer {
    pub node_id: i64,
    pub name: String,
    pub public_key: PublicKey,
    /// Sorted, no duplicates.
    pub allowed_ips: Vec<IpPrefix>,
    /// The first endpoint candidate (what the peer reported first, else
    /// the address the server saw) outside every prefix this plan routes
    /// into the mesh and outside the peer's own routes.
    pub endpoint: Option<SocketAddr>,
    /// Every usable endpoint the map lists for the peer outside the same
    /// prefixes as `endpoint`, in its order, no duplicates, at most
    /// [`MAX_CANDIDATES`]: the engine's NAT-traversal
    /// probe targets (`Engine::set_peer_candidates`), as if the peer had
    /// sent them through the relay.
    pub candidates: Vec<SocketAddr>,
    /// The map carries a relay and the peer holds a session with the
    /// server, so the relay can reach it when UDP does not.
    pub relay: bool,
    /// Approved routes of the peer this node does not route to it: not
    /// accepted, or given to another peer (see [`Plan::conflicts`]).
    pub routes_not_used: Vec<IpPrefix>,
}

/// The peer set for one map, by public key (base64).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub peers: BTreeMap<String, PlannedPeer>,
    /// Prefixes more than one peer carries: the lowest node id gets it
    /// (deterministic on every node), the others are listed here. The
    /// server is meant to refuse such overlaps; this keeps a node sane if
    /// it did not.
    pub conflicts: Vec<(IpPrefix, Vec<i64>)>,
}

/// What to do to the engine to go from one plan to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(PlannedPeer),
    Update {
        public_key: PublicKey,
        /// New allowed IPs (replacing the old), when they changed.
        allowed_ips: Option<Vec<IpPrefix>>,
        /// A new endpoint, when the map's choice changed.
        endpoint: Option<SocketAddr>,
        /// The new candidate list, when it changed.
        candidates: Option<Vec<SocketAddr>>,
    },
    Remove(PublicKey),
}

fn usable(e: &SocketAddr) -> bool {
    e.port() != 0 && !e.ip().is_unspecified() && !e.ip().is_multicast()
}

/// The map's endpoints as probe targets: usable, distinct, bounded.
fn candidates(endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for e in endpoints.iter().filter(|e| usable(e)) {
        if out.len() == MAX_CANDIDATES {
            break;
        }
        if !out.contains(e) {
            out.push(*e);
        }
    }
    out
}

/// The peer set the node's map asks for. Peers whose key or routes do not
/// parse are left out (the protocol's decoder already refused those).
pub fn plan(state: &NodeState, options: PlanOptions) -> Plan {
    let own_routes: BTreeSet<IpPrefix> = state
        .routes
        .iter()
        .filter_map(|r| r.prefix.parse().ok())
        .collect();
    let own_id = state.node.as_ref().map(|n| n.node_id);
    let relay_in_map = state.relay_url.is_some();
    // Who carries each accepted route: the lowest node id (the map is
    // iterated in id order, so the first claimant).
    let mut owner: BTreeMap<IpPrefix, i64> = BTreeMap::new();
    let mut claims: BTreeMap<IpPrefix, Vec<i64>> = BTreeMap::new();
    if options.accept_routes {
        for (id, p) in &state.peers {
            for r in p.routes.iter().filter_map(|r| r.parse::<IpPrefix>().ok()) {
                let r = r.network();
                if own_routes.contains(&r) {
                    continue;
                }
                owner.entry(r).or_insert(*id);
                claims.entry(r).or_default().push(*id);
            }
        }
    }
    let mut out = Plan::default();
    for (id, p) in &state.peers {
        if Some(*id) == own_id {
            continue;
        }
        let Ok(public_key) = PublicKey::from_base64(&p.key) else {
            continue;
        };
        let mut allowed: BTreeSet<IpPrefix> = [IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)]
            .into_iter()
            .map(IpPrefix::host)
            .collect();
        let mut not_used = Vec::new();
        for r in p.routes.iter().filter_map(|r| r.parse::<IpPrefix>().ok()) {
            let r = r.network();
            if owner.get(&r) == Some(id) {
                allowed.insert(r);
            } else {
                not_used.push(r);
            }
        }
        not_used.sort();
        not_used.dedup();
        out.peers.insert(
            p.key.clone(),
            PlannedPeer {
                node_id: *id,
                name: p.name.clone(),
                public_key,
                allowed_ips: allowed.into_iter().collect(),
                endpoint: None,
                candidates: Vec::new(),
                relay: relay_in_map && p.online,
                routes_not_used: not_used,
            },
        );
    }
    // An endpoint inside a prefix this node routes into the mesh (another
    // peer's mesh address, an accepted pod CIDR whose bridge address the
    // peer reported) would carry the peer's encrypted packets into the
    // tunnel itself: a loop no handshake gets out of. wg-quick keeps
    // endpoints out of the tunnel's routes with its fwmark rule for the
    // same reason. An address inside the peer's own approved routes (its
    // pod bridge, 10.42.1.1) is behind the peer, so never a way to it,
    // accepted or not. Such candidates are skipped for the next one.
    let meshed = routes(&out);
    for (id, p) in &state.peers {
        let Some(planned) = out.peers.get_mut(&p.key) else {
            continue;
        };
        if planned.node_id != *id {
            continue;
        }
        let behind: Vec<IpPrefix> = p.routes.iter().filter_map(|r| r.parse().ok()).collect();
        let outside: Vec<SocketAddr> = p
            .endpoints
            .iter()
            .copied()
            .filter(|e| !meshed.iter().chain(&behind).any(|r| r.contains(e.ip())))
            .collect();
        planned.endpoint = outside.iter().copied().find(usable);
        planned.candidates = candidates(&outside);
    }
    out.conflicts = claims
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    out
}

/// The changes from `old` (what was applied) to `new`: removals first
/// (so a prefix moving between peers is free before it is added), then
/// additions and updates, each in key order.
pub fn diff(old: &Plan, new: &Plan) -> Vec<Change> {
    let mut out: Vec<Change> = old
        .peers
        .iter()
        .filter(|(k, _)| !new.peers.contains_key(*k))
        .map(|(_, p)| Change::Remove(p.public_key))
        .collect();
    for (k, p) in &new.peers {
        match old.peers.get(k) {
            None => out.push(Change::Add(p.clone())),
            Some(was) => {
                let allowed_ips = (was.allowed_ips != p.allowed_ips).then(|| p.allowed_ips.clone());
                let endpoint = if was.endpoint != p.endpoint {
                    p.endpoint
                } else {
                    None
                };
                // As the endpoint: an empty list keeps what the engine has.
                let candidates = (was.candidates != p.candidates && !p.candidates.is_empty())
                    .then(|| p.candidates.clone());
                if allowed_ips.is_some() || endpoint.is_some() || candidates.is_some() {
                    out.push(Change::Update {
                        public_key: p.public_key,
                        allowed_ips,
                        endpoint,
                        candidates,
                    });
                }
            }
        }
    }
    out
}

/// Every prefix the plan routes into the mesh: the kernel routes the TUN
/// needs.
pub fn routes(plan: &Plan) -> BTreeSet<IpPrefix> {
    plan.peers
        .values()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect()
}

/// Kernel routes to add and to delete to go from `old` to `new`.
pub fn route_diff(
    old: &BTreeSet<IpPrefix>,
    new: &BTreeSet<IpPrefix>,
) -> (Vec<IpPrefix>, Vec<IpPrefix>) {
    (
        new.difference(old).copied().collect(),
        old.difference(new).copied().collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::client::NodeInfo;
    use crate::proto::{Peer, RouteState};

    fn key(id: i64) -> PublicKey {
        PublicKey::from_bytes([id as u8; 32])
    }

    fn peer(id: i64, routes: &[&str], endpoints: &[&str]) -> Peer {
        Peer {
            id,
            key: key(id).to_base64(),
            name: format!("n{id}"),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: format!("fd00::{id}").parse().unwrap(),
            tags: vec![],
            routes: routes.iter().map(|r| r.to_string()).collect(),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            online: true,
        }
    }

    fn state(own: i64, peers: Vec<Peer>) -> NodeState {
        let mut s = NodeState::new();
        s.node = Some(NodeInfo {
            node_id: own,
            name: format!("n{own}"),
            ipv4: Ipv4Addr::new(100, 64, 0, own as u8),
            ipv6: format!("fd00::{own}").parse().unwrap(),
            tags: vec![],
        });
        s.peers = peers.into_iter().map(|p| (p.id, p)).collect();
        s
    }

    fn prefixes(list: &[&str]) -> Vec<IpPrefix> {
        let mut v: Vec<IpPrefix> = list.iter().map(|p| p.parse().unwrap()).collect();
        v.sort();
        v
    }

    const ACCEPT: PlanOptions = PlanOptions {
        accept_routes: true,
    };

    #[test]
    fn peers_get_their_mesh_addresses_and_routes_only_when_accepted() {
        let s = state(
            1,
            vec![
                peer(
                    2,
                    &["10.42.2.0/24"],
                    &["192.0.2.2:51820", "198.51.100.2:4000"],
                ),
                peer(3, &[], &[]),
            ],
        );
        let without = plan(&s, PlanOptions::default());
        let p2 = &without.peers[&key(2).to_base64()];
        assert_eq!(p2.allowed_ips, prefixes(&["100.64.0.2/32", "fd00::2/128"]));
        assert_eq!(p2.routes_not_used, prefixes(&["10.42.2.0/24"]));
        assert_eq!(p2.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(p2.public_key, key(2));
        assert!(!p2.relay, "no relay in the map");
        assert_eq!(without.peers[&key(3).to_base64()].endpoint, None);

        let with = plan(&s, ACCEPT);
        let p2 = &with.peers[&key(2).to_base64()];
        assert_eq!(
            p2.allowed_ips,
            prefixes(&["100.64.0.2/32", "fd00::2/128", "10.42.2.0/24"])
        );
        assert!(p2.routes_not_used.is_empty());
        assert_eq!(
            routes(&with),
            prefixes(&[
                "100.64.0.2/32",
                "fd00::2/128",
                "10.42.2.0/24",
                "100.64.0.3/32",
                "fd00::3/128"
            ])
            .into_iter()
            .collect()
        );
    }

    #[test]
    fn the_node_itself_is_never_a_peer_and_unusable_endpoints_are_skipped() {
        let mut s = state(
            1,
            vec![peer(2, &[], &["0.0.0.0:5", "192.0.2.9:0", "192.0.2.2:7"])],
        );
        s.peers.insert(1, peer(1, &[], &["192.0.2.1:1"]));
        let p = plan(&s, ACCEPT);
        assert_eq!(p.peers.len(), 1);
        assert_eq!(
            p.peers[&key(2).to_base64()].endpoint,
            Some("192.0.2.2:7".parse().unwrap())
        );
    }

    /// A k3s node reports every host address, its pod bridge's (10.42.1.1)
    /// among them; a node that routes that pod CIDR into the mesh would
    /// send the peer's encrypted packets into its own tunnel and never
    /// complete a handshake (seen in cli/tests/netns/control_k3s.sh).
    #[test]
    fn endpoints_inside_what_the_mesh_routes_are_skipped() {
        let s = state(
            1,
            vec![
                peer(
                    2,
                    &["10.42.1.0/24"],
                    &["10.42.1.1:51820", "100.64.0.3:51820", "192.0.2.2:51820"],
                ),
                peer(3, &[], &["100.64.0.2:7", "10.42.1.9:7"]),
            ],
        );
        let p = plan(&s, ACCEPT);
        assert_eq!(
            p.peers[&key(2).to_base64()].endpoint,
            Some("192.0.2.2:51820".parse().unwrap()),
            "the pod bridge and another peer's mesh address are not endpoints"
        );
        assert_eq!(
            p.peers[&key(3).to_base64()].endpoint,
            None,
            "no candidate outside the mesh's routes: none (the relay's case)"
        );
        // Not accepting routes either: an address inside the peer's own
        // approved route is behind the peer (its pod bridge), never a way
        // to it; a node that skipped it only on accepting routes sent its
        // handshakes there until the peer's own handshake roamed it.
        let p = plan(&s, PlanOptions::default());
        assert_eq!(
            p.peers[&key(2).to_base64()].endpoint,
            Some("192.0.2.2:51820".parse().unwrap()),
            "the peer's own route is skipped without accepted routes too"
        );
    }

    #[test]
    fn relay_availability_needs_a_relay_and_an_online_peer() {
        let mut off = peer(3, &[], &[]);
        off.online = false;
        let mut s = state(1, vec![peer(2, &[], &[]), off]);
        s.relay_url = Some("wss://server/v1-meshvpn/relay".into());
        let p = plan(&s, ACCEPT);
        assert!(p.peers[&key(2).to_base64()].relay);
        assert!(!p.peers[&key(3).to_base64()].relay);
    }

    #[test]
    fn a_route_two_peers_claim_goes_to_the_lower_id_and_is_reported() {
        let s = state(
            1,
            vec![
                peer(5, &["10.42.0.0/16"], &[]),
                peer(4, &["10.42.0.0/16", "10.43.0.0/16"], &[]),
            ],
        );
        let p = plan(&s, ACCEPT);
        assert!(p.peers[&key(4).to_base64()]
            .allowed_ips
            .contains(&"10.42.0.0/16".parse().unwrap()));
        assert!(!p.peers[&key(5).to_base64()]
            .allowed_ips
            .contains(&"10.42.0.0/16".parse().unwrap()));
        assert_eq!(
            p.peers[&key(5).to_base64()].routes_not_used,
            prefixes(&["10.42.0.0/16"])
        );
        assert_eq!(
            p.conflicts,
            vec![("10.42.0.0/16".parse().unwrap(), vec![4, 5])]
        );
    }

    #[test]
    fn a_route_the_node_advertises_itself_is_not_routed_to_a_peer() {
        let mut s = state(1, vec![peer(2, &["10.42.1.0/24", "10.42.2.0/24"], &[])]);
        s.routes = vec![RouteState {
            prefix: "10.42.1.0/24".into(),
            approved: true,
            status: "approved".into(),
            role: "standby".into(),
            reason: None,
        }];
        let p = plan(&s, ACCEPT);
        let p2 = &p.peers[&key(2).to_base64()];
        assert!(p2.allowed_ips.contains(&"10.42.2.0/24".parse().unwrap()));
        assert!(!p2.allowed_ips.contains(&"10.42.1.0/24".parse().unwrap()));
    }

    #[test]
    fn diff_adds_updates_and_removes_only_what_changed() {
        let before = plan(
            &state(
                1,
                vec![
                    peer(2, &["10.42.2.0/24"], &["192.0.2.2:1"]),
                    peer(3, &[], &["192.0.2.3:1"]),
                    peer(4, &[], &["192.0.2.4:1"]),
                ],
            ),
            ACCEPT,
        );
        assert_eq!(
            diff(&Plan::default(), &before)
                .iter()
                .filter(|c| matches!(c, Change::Add(_)))
                .count(),
            3
        );
        assert!(
            diff(&before, &before).is_empty(),
            "nothing changed, nothing done"
        );
        let after = plan(
            &state(
                1,
                vec![
                    // New route, same endpoint.
                    peer(2, &["10.42.2.0/24", "10.42.9.0/24"], &["192.0.2.2:1"]),
                    // New endpoint only.
                    peer(3, &[], &["192.0.2.33:1"]),
                    // 4 gone, 6 new.
                    peer(6, &[], &[]),
                ],
            ),
            ACCEPT,
        );
        let changes = diff(&before, &after);
        assert_eq!(changes[0], Change::Remove(key(4)), "removals come first");
        assert_eq!(
            changes[1..],
            [
                Change::Update {
                    public_key: key(2),
                    allowed_ips: Some(prefixes(&[
                        "100.64.0.2/32",
                        "fd00::2/128",
                        "10.42.2.0/24",
                        "10.42.9.0/24"
                    ])),
                    endpoint: None,
                    candidates: None,
                },
                Change::Update {
                    public_key: key(3),
                    allowed_ips: None,
                    endpoint: Some("192.0.2.33:1".parse().unwrap()),
                    candidates: Some(vec!["192.0.2.33:1".parse().unwrap()]),
                },
                Change::Add(after.peers[&key(6).to_base64()].clone()),
            ]
        );
        // The peer's endpoint disappearing from the map keeps the engine's.
        let gone = plan(&state(1, vec![peer(3, &[], &[])]), ACCEPT);
        let from = plan(&state(1, vec![peer(3, &[], &["192.0.2.3:1"])]), ACCEPT);
        assert!(diff(&from, &gone).is_empty());
    }

    #[test]
    fn every_usable_endpoint_is_a_candidate_bounded_and_distinct() {
        let many: Vec<String> = ["0.0.0.0:1", "192.0.2.9:0", "192.0.2.1:1", "192.0.2.1:1"]
            .into_iter()
            .map(String::from)
            .chain((2..=20).map(|i| format!("192.0.2.{i}:51820")))
            .collect();
        let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        let p = plan(&state(1, vec![peer(2, &[], &refs)]), ACCEPT);
        let c = &p.peers[&key(2).to_base64()].candidates;
        assert_eq!(c.len(), MAX_CANDIDATES, "{c:?}");
        assert_eq!(c[0], "192.0.2.1:1".parse::<SocketAddr>().unwrap());
        assert_eq!(c[1], "192.0.2.2:51820".parse::<SocketAddr>().unwrap());
        assert!(!c[1..].contains(&c[0]), "a duplicate kept: {c:?}");
        // A peer reporting a second address: an update with both.
        let one = plan(&state(1, vec![peer(2, &[], &["192.0.2.1:1"])]), ACCEPT);
        let two = plan(
            &state(
                1,
                vec![peer(2, &[], &["192.0.2.1:1", "198.51.100.7:41641"])],
            ),
            ACCEPT,
        );
        assert_eq!(
            diff(&one, &two),
            [Change::Update {
                public_key: key(2),
                allowed_ips: None,
                endpoint: None,
                candidates: Some(vec![
                    "192.0.2.1:1".parse().unwrap(),
                    "198.51.100.7:41641".parse().unwrap()
                ]),
            }]
        );
    }

    #[test]
    fn route_diff_adds_and_deletes() {
        let a: BTreeSet<IpPrefix> = prefixes(&["10.0.0.0/8", "100.64.0.2/32"])
            .into_iter()
            .collect();
        let b: BTreeSet<IpPrefix> = prefixes(&["100.64.0.2/32", "100.64.0.3/32"])
            .into_iter()
            .collect();
        assert_eq!(
            route_diff(&a, &b),
            (prefixes(&["100.64.0.3/32"]), prefixes(&["10.0.0.0/8"]))
        );
    }
}
