use std::net::IpAddr;
use std::time::Instant;

use meshvpn_engine::filter::{Filter, FilterDrop, Verdict};

use super::*;

/// The example of docs/control.md: two k3s clusters with their own pod
/// CIDRs; each cluster talks to itself freely, cluster b reaches cluster
/// a's pods only on 80 and 443, ICMP everywhere inside the mesh.
const TWO_CLUSTERS: &str = r#"{
  // Who may give nodes these tags.
  "tagOwners": {
    "tag:k3s-a": ["group:ops"],
    "tag:k3s-b": ["group:ops"],
  },
  "groups": {
    "group:ops": ["tag:k3s-a"],
  },
  "hosts": {
    "pods-a": "10.42.0.0/16",
    "pods-b": "10.43.0.0/16",
  },
  "acls": [
    {"action": "accept", "src": ["tag:k3s-a", "pods-a"], "dst": ["tag:k3s-a:*", "pods-a:*"]},
    {"action": "accept", "src": ["tag:k3s-b", "pods-b"], "dst": ["tag:k3s-b:*", "pods-b:*"]},
    {"action": "accept", "src": ["pods-b"], "dst": ["pods-a:80,443"], "proto": "tcp"},
  ],
  "autoApprovers": {
    "routes": {
      "10.42.0.0/16": ["tag:k3s-a"],
      "10.43.0.0/16": ["tag:k3s-b"],
    },
  },
}"#;

fn node(name: &str, addr: &str, tag: &str, route: &str) -> MeshNode {
    MeshNode {
        name: name.into(),
        addresses: vec![addr.parse().unwrap()],
        tags: vec![tag.into()],
        routes: vec![route.parse().unwrap()],
    }
}

fn mesh() -> Vec<MeshNode> {
    vec![
        node("a1", "100.64.0.1", "tag:k3s-a", "10.42.1.0/24"),
        node("a2", "100.64.0.2", "tag:k3s-a", "10.42.2.0/24"),
        node("b1", "100.64.0.3", "tag:k3s-b", "10.43.1.0/24"),
    ]
}

fn load_err(text: &str) -> PolicyError {
    Policy::parse(text).expect_err(text)
}

#[test]
fn the_documented_example_loads() {
    let p = Policy::parse(TWO_CLUSTERS).unwrap();
    assert_eq!(p.acls.len(), 3);
    assert_eq!(p.hosts["pods-a"], "10.42.0.0/16".parse().unwrap());
    assert_eq!(
        p.groups["group:ops"],
        vec![Selector::Tag("tag:k3s-a".into())]
    );
    assert_eq!(
        p.acls[2].dsts[0].1,
        vec![PortRange::single(80), PortRange::single(443)]
    );
    assert_eq!(p.acls[2].pos.line, 17);
}

#[test]
fn every_error_class_names_line_column_and_value() {
    let cases: &[(&str, u32, u32, &str)] = &[
        // Syntax.
        ("{\n  \"acls\": [,]\n}", 2, 12, "unexpected character ','"),
        // Wrong types.
        ("[]", 1, 1, "the policy must be an object"),
        ("{\"acls\": {}}", 1, 10, "acls must be an array"),
        ("{\"hosts\": {\"h\": 1}}", 1, 17, "a hosts value must be a string"),
        // Unknown keys, at each level.
        ("{\n\"ssh\": []}", 2, 1, "unknown key \"ssh\""),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"users\": []}]}", 1, 62, "unknown key \"users\""),
        ("{\"autoApprovers\": {\"exitNode\": []}}", 1, 20, "unknown key \"exitNode\""),
        // Actions and missing fields.
        ("{\"acls\": [{\"action\": \"deny\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}", 1, 22, "action \"deny\""),
        ("{\"acls\": [{\"src\": [\"*\"], \"dst\": [\"*:*\"]}]}", 1, 11, "without \"action\""),
        ("{\"acls\": [{\"action\": \"accept\", \"dst\": [\"*:*\"]}]}", 1, 11, "without \"src\""),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"]}]}", 1, 11, "without \"dst\""),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [], \"dst\": [\"*:*\"]}]}", 1, 11, "empty"),
        // Ports.
        (
            "{\"tagOwners\": {\"tag:k3s\": []},\n \"acls\": [{\"action\": \"accept\", \"src\": [\"*\"],\n  \"dst\": [\"tag:k3s:80-x\"]}]}",
            3, 11, "dst \"tag:k3s:80-x\": bad port range \"80-x\"",
        ),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:90-80\"]}]}", 1, 54, "bad port range \"90-80\""),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:65536\"]}]}", 1, 54, "bad port range \"65536\""),
        ("{\"tagOwners\": {\"tag:x\": []}, \"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:x\"]}]}", 1, 82, "no \":ports\""),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:80\"], \"proto\": \"icmp\"}]}", 1, 54, "ports need proto tcp, udp or sctp"),
        // Protocols.
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": \"tcpp\"}]}", 1, 71, "proto \"tcpp\""),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": \"256\"}]}", 1, 71, "proto \"256\""),
        // Selectors.
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"tag:nope\"], \"dst\": [\"*:*\"]}]}", 1, 40, "\"tag:nope\": tag not in tagOwners"),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}]}", 1, 40, "group not in groups"),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"db\"], \"dst\": [\"*:*\"]}]}", 1, 40, "\"db\": unknown host"),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"10.0.0.0/33\"], \"dst\": [\"*:*\"]}]}", 1, 40, "bad address or CIDR"),
        ("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"10.1.2.300:*\"]}]}", 1, 54, "bad address or CIDR"),
        // Definitions.
        ("{\"tagOwners\": {\"k3s\": []}}", 1, 16, "a name must be tag:"),
        ("{\"tagOwners\": {\"tag:a\": [\"group:x\"]}}", 1, 26, "owner \"group:x\" is not defined"),
        ("{\"groups\": {\"group:a\": [\"group:a\"]}}", 1, 25, "groups cannot contain groups"),
        ("{\"groups\": {\"ops\": []}}", 1, 13, "a name must be group:"),
        ("{\"hosts\": {\"1db\": \"10.0.0.1\"}}", 1, 12, "host name \"1db\""),
        ("{\"hosts\": {\"db\": \"10.0.0.x\"}}", 1, 18, "host \"db\": \"10.0.0.x\" is not an address"),
        ("{\"autoApprovers\": {\"routes\": {\"10.42.0.0\": [\"tag:x\"]}}}", 1, 45, "tag not in tagOwners"),
        ("{\"autoApprovers\": {\"routes\": {\"pods\": []}}}", 1, 31, "route \"pods\" is not a CIDR"),
    ];
    for (text, line, column, what) in cases {
        let e = load_err(text);
        let shown = e.to_string();
        assert!(shown.contains(what), "{text}\n  gave: {shown}");
        assert_eq!(
            (e.pos.line, e.pos.column),
            (*line, *column),
            "{text}\n  gave: {shown}"
        );
        assert!(
            shown.starts_with(&format!("line {line}, column {column}: ")),
            "{shown}"
        );
    }
    let big = format!(
        "{{\"hosts\": {{}}, \"acls\": [{}]}}",
        " ".repeat(MAX_POLICY_BYTES)
    );
    assert!(load_err(&big).message.contains("more than"));
}

#[test]
fn no_policy_is_allow_all() {
    let m = mesh();
    assert_eq!(compile(None, &m[0], &m), None);
    // An empty policy is a policy: nothing is allowed.
    let p = Policy::parse("{}").unwrap();
    let r = compile(Some(&p), &m[0], &m).unwrap();
    assert!(r.inbound.is_empty() && r.outbound.is_empty());
}

#[test]
fn compiles_what_may_reach_each_node() {
    let p = Policy::parse(TWO_CLUSTERS).unwrap();
    let m = mesh();
    let a1 = compile(Some(&p), &m[0], &m).unwrap();
    // Inbound on a1: cluster a (all ports) on a1's address and its pod
    // /24 (10.42.0.0/16 narrowed); pods-b on its pod /24, TCP 80 and 443.
    assert_eq!(a1.inbound.len(), 2);
    let own = &a1.inbound[0];
    let p32 = |s: &str| s.parse::<IpPrefix>().unwrap();
    assert_eq!(
        own.srcs,
        vec![
            p32("100.64.0.1/32"),
            p32("100.64.0.2/32"),
            p32("10.42.0.0/16")
        ]
    );
    assert_eq!(
        own.dsts,
        vec![
            (p32("100.64.0.1/32"), PortRange::ALL),
            (p32("10.42.1.0/24"), PortRange::ALL)
        ]
    );
    let cross = &a1.inbound[1];
    assert_eq!(cross.srcs, vec![p32("10.43.0.0/16")]);
    assert_eq!(
        cross.dsts,
        vec![
            (p32("10.42.1.0/24"), PortRange::single(80)),
            (p32("10.42.1.0/24"), PortRange::single(443))
        ]
    );
    assert!(cross.protos.contains(6) && !cross.protos.contains(17));
    // Outbound from a1: only its own cluster (it is no source of rule 3).
    assert_eq!(a1.outbound.len(), 1);
    // b1: rule 1 gives it nothing inbound; rule 3 lets it start flows to
    // pods-a from its pod range.
    let b1 = compile(Some(&p), &m[2], &m).unwrap();
    assert_eq!(b1.inbound.len(), 1);
    assert_eq!(b1.outbound.len(), 2);
    assert_eq!(b1.outbound[1].srcs, vec![p32("10.43.1.0/24")]);
}

#[test]
fn compiled_filter_enforces_the_policy() {
    let p = Policy::parse(TWO_CLUSTERS).unwrap();
    let m = mesh();
    let mut f = Filter::default();
    f.set_rules(compile(Some(&p), &m[0], &m).map(std::sync::Arc::new));
    let now = Instant::now();
    let syn = |src: [u8; 4], dst: [u8; 4], port: u16| {
        let mut pkt = vec![0u8; 40];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
        pkt[9] = 6;
        pkt[12..16].copy_from_slice(&src);
        pkt[16..20].copy_from_slice(&dst);
        pkt[22..24].copy_from_slice(&port.to_be_bytes());
        pkt[32] = 5 << 4;
        pkt[33] = 0x02;
        pkt
    };
    // A pod of cluster b reaches a pod on a1 on 443, not on 22.
    assert!(f
        .inbound(&syn([10, 43, 1, 5], [10, 42, 1, 7], 443), 3, now)
        .is_accept());
    assert_eq!(
        f.inbound(&syn([10, 43, 1, 5], [10, 42, 1, 7], 22), 3, now),
        Verdict::Drop(FilterDrop::NotAllowed)
    );
    // Node b1 itself is not pods-b: nothing on a1.
    assert!(!f
        .inbound(&syn([100, 64, 0, 3], [100, 64, 0, 1], 443), 3, now)
        .is_accept());
    // Cluster a's other node reaches anything on a1.
    assert!(f
        .inbound(&syn([100, 64, 0, 2], [100, 64, 0, 1], 6443), 2, now)
        .is_accept());
    // a1's host may not start flows to cluster b.
    assert_eq!(
        f.outbound(&syn([100, 64, 0, 1], [100, 64, 0, 3], 443), 3, now),
        Verdict::Drop(FilterDrop::OutboundDenied)
    );
}

#[test]
fn auto_approvers_approve_by_tag_inside_the_prefix() {
    let p = Policy::parse(TWO_CLUSTERS).unwrap();
    let m = mesh();
    let r = |s: &str| s.parse::<IpPrefix>().unwrap();
    assert!(p.auto_approves(&m[0], r("10.42.1.0/24")));
    assert!(p.auto_approves(&m[0], r("10.42.0.0/16")));
    // Wider than the approved prefix, or another cluster's range.
    assert!(!p.auto_approves(&m[0], r("10.40.0.0/13")));
    assert!(!p.auto_approves(&m[0], r("10.43.1.0/24")));
    assert!(p.auto_approves(&m[2], r("10.43.1.0/24")));
    let untagged = MeshNode {
        addresses: vec!["100.64.0.9".parse::<IpAddr>().unwrap()],
        ..MeshNode::default()
    };
    assert!(!p.auto_approves(&untagged, r("10.42.9.0/24")));
}
