//! The ACL policy language: a JSON document in the shape of Tailscale's
//! policy file (`tagOwners`, `groups`, `hosts`, `acls`, `autoApprovers`),
//! HuJSON comments and trailing commas accepted, validated on load with
//! errors that name the line and column of the offending value, and
//! compiled per node ([`compile`]) into the engine's packet filter rules.
//!
//! Reference and semantics: `docs/control.md`.

mod compile;
pub mod json;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use meshvpn_engine::filter::{default_protocols, ByteSet, PortRange};
use meshvpn_engine::IpPrefix;

pub(crate) use compile::overlap;
pub use compile::{compile, MeshNode};
use json::{Json, Pos, Value};

/// The largest policy document accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// A policy that failed to load: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct PolicyError {
    pub pos: Pos,
    pub message: String,
}

fn err<T>(pos: Pos, message: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError {
        pos,
        message: message.into(),
    })
}

/// Who a rule, a group or an approver names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `*`: every address.
    Any,
    /// `tag:NAME`: the nodes carrying the tag (their mesh addresses, not
    /// their routes, as in Tailscale).
    Tag(String),
    /// `group:NAME`, expanded at load.
    Group(String),
    /// An address, a CIDR or a `hosts` alias.
    Prefix(IpPrefix),
}

/// One `acls` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub srcs: Vec<Selector>,
    /// Each destination with its port ranges.
    pub dsts: Vec<(Selector, Vec<PortRange>)>,
    /// The IP protocols (TCP, UDP, ICMP and ICMPv6 when `proto` is absent).
    pub protos: ByteSet,
    /// Where the entry starts, for reports.
    pub pos: Pos,
}

/// A validated policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Each tag with who may assign it (names as written).
    pub tag_owners: BTreeMap<String, Vec<String>>,
    /// Each group with its members (tags, hosts, addresses).
    pub groups: BTreeMap<String, Vec<Selector>>,
    pub hosts: BTreeMap<String, IpPrefix>,
    pub acls: Vec<Acl>,
    /// `autoApprovers.routes`: a route inside the prefix advertised by a
    /// node one of the selectors names is approved without an operator.
    pub route_approvers: Vec<(IpPrefix, Vec<Selector>)>,
}

const TOP_KEYS: &[&str] = &["tagOwners", "groups", "hosts", "acls", "autoApprovers"];
const ACL_KEYS: &[&str] = &["action", "src", "dst", "proto"];
const APPROVER_KEYS: &[&str] = &["routes"];

/// IP protocol names a policy may use (Tailscale's set), with numbers.
const PROTO_NAMES: &[(&str, u8)] = &[
    ("tcp", 6),
    ("udp", 17),
    ("icmp", 1),
    ("ipv6-icmp", 58),
    ("sctp", 132),
    ("igmp", 2),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
];

impl Policy {
    /// Parses and validates a policy document.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return err(
                Pos::default(),
                format!(
                    "policy is {} bytes, more than {MAX_POLICY_BYTES}",
                    text.len()
                ),
            );
        }
        let root = json::parse(text).map_err(|e| PolicyError {
            pos: e.pos,
            message: e.message,
        })?;
        let fields = object(&root, "the policy")?;
        let mut top: BTreeMap<&str, &Value> = BTreeMap::new();
        for (k, pos, v) in fields {
            if !TOP_KEYS.contains(&k.as_str()) {
                return err(*pos, unknown_key(k, TOP_KEYS));
            }
            top.insert(k, v);
        }
        let mut p = Policy::default();
        // Definitions first, whatever their order in the document: rules
        // refer to them.
        if let Some(v) = top.get("hosts") {
            for (name, pos, v) in object(v, "hosts")? {
                check_host_name(name, *pos)?;
                let s = string(v, "a hosts value")?;
                let prefix = parse_prefix(s).ok_or_else(|| {
                    perr(
                        v.pos,
                        format!("host {name:?}: {s:?} is not an address or CIDR"),
                    )
                })?;
                p.hosts.insert(name.clone(), prefix);
            }
        }
        if let Some(v) = top.get("tagOwners") {
            for (tag, pos, _) in object(v, "tagOwners")? {
                check_tag(tag, *pos)?;
                p.tag_owners.insert(tag.clone(), Vec::new());
            }
        }
        if let Some(v) = top.get("groups") {
            for (name, pos, _) in object(v, "groups")? {
                check_prefixed(name, "group:", *pos)?;
                p.groups.insert(name.clone(), Vec::new());
            }
            for (name, _, members) in object(v, "groups")? {
                let mut list = Vec::new();
                for m in array(members, "a group's members")? {
                    let s = string(m, "a group member")?;
                    if s.starts_with("group:") {
                        return err(
                            m.pos,
                            format!("group {name:?}: member {s:?}: groups cannot contain groups"),
                        );
                    }
                    list.push(p.selector(s, m.pos, &format!("group {name:?}: member"))?);
                }
                p.groups.insert(name.clone(), list);
            }
        }
        if let Some(v) = top.get("tagOwners") {
            for (tag, _, owners) in object(v, "tagOwners")? {
                let mut list = Vec::new();
                for o in array(owners, "a tag's owners")? {
                    let s = string(o, "a tag owner")?;
                    if (s.starts_with("tag:") && !p.tag_owners.contains_key(s))
                        || (s.starts_with("group:") && !p.groups.contains_key(s))
                    {
                        return err(
                            o.pos,
                            format!("tagOwners {tag:?}: owner {s:?} is not defined"),
                        );
                    }
                    list.push(s.to_string());
                }
                p.tag_owners.insert(tag.clone(), list);
            }
        }
        if let Some(v) = top.get("acls") {
            for entry in array(v, "acls")? {
                p.acls.push(p.acl(entry)?);
            }
        }
        if let Some(v) = top.get("autoApprovers") {
            for (k, pos, v) in object(v, "autoApprovers")? {
                if !APPROVER_KEYS.contains(&k.as_str()) {
                    return err(*pos, unknown_key(k, APPROVER_KEYS));
                }
                for (route, pos, approvers) in object(v, "autoApprovers.routes")? {
                    let prefix = parse_prefix(route).ok_or_else(|| {
                        perr(*pos, format!("autoApprovers route {route:?} is not a CIDR"))
                    })?;
                    let mut list = Vec::new();
                    for a in array(approvers, "a route's approvers")? {
                        let s = string(a, "an approver")?;
                        list.push(p.selector(s, a.pos, &format!("route {route:?}: approver"))?);
                    }
                    p.route_approvers.push((prefix, list));
                }
            }
        }
        Ok(p)
    }

    fn acl(&self, entry: &Value) -> Result<Acl, PolicyError> {
        let fields = object(entry, "an acls entry")?;
        let get = |name: &str| fields.iter().find(|(k, _, _)| k == name).map(|(_, _, v)| v);
        for (k, pos, _) in fields {
            if !ACL_KEYS.contains(&k.as_str()) {
                return err(*pos, unknown_key(k, ACL_KEYS));
            }
        }
        match get("action") {
            None => return err(entry.pos, "acls entry without \"action\""),
            Some(v) => {
                let a = string(v, "action")?;
                if a != "accept" {
                    return err(v.pos, format!("action {a:?}: only \"accept\" exists"));
                }
            }
        }
        let protos = match get("proto") {
            None => None,
            Some(v) => Some(parse_proto(string(v, "proto")?, v.pos)?),
        };
        let Some(src) = get("src") else {
            return err(entry.pos, "acls entry without \"src\"");
        };
        let Some(dst) = get("dst") else {
            return err(entry.pos, "acls entry without \"dst\"");
        };
        let mut srcs = Vec::new();
        for s in array(src, "src")? {
            let text = string(s, "a src entry")?;
            srcs.push(self.selector(text, s.pos, "src")?);
        }
        let mut dsts = Vec::new();
        for d in array(dst, "dst")? {
            let text = string(d, "a dst entry")?;
            let split = text
                .rsplit_once(':')
                .filter(|(sel, _)| !matches!(*sel, "tag" | "group" | "autogroup"));
            let Some((sel, ports)) = split else {
                return err(
                    d.pos,
                    format!("dst {text:?}: no \":ports\" (\"{text}:*\" for all)"),
                );
            };
            let ranges = parse_ports(ports)
                .ok_or_else(|| perr(d.pos, format!("dst {text:?}: bad port range {ports:?}")))?;
            let portless = !ranges.iter().all(|r| r.is_all());
            if let (true, Some(p)) = (portless, protos) {
                if ![6u8, 17, 132].iter().any(|&n| p.contains(n)) {
                    return err(
                        d.pos,
                        format!("dst {text:?}: ports need proto tcp, udp or sctp"),
                    );
                }
            }
            dsts.push((
                self.selector(sel, d.pos, &format!("dst {text:?}:"))?,
                ranges,
            ));
        }
        if srcs.is_empty() || dsts.is_empty() {
            return err(entry.pos, "acls entry with an empty \"src\" or \"dst\"");
        }
        Ok(Acl {
            srcs,
            dsts,
            protos: protos.unwrap_or_else(default_protocols),
            pos: entry.pos,
        })
    }

    /// A selector as written in `src`, `dst`, a group or an approver.
    fn selector(&self, s: &str, pos: Pos, what: &str) -> Result<Selector, PolicyError> {
        if s == "*" {
            return Ok(Selector::Any);
        }
        if s.starts_with("tag:") {
            if !self.tag_owners.contains_key(s) {
                return err(pos, format!("{what} {s:?}: tag not in tagOwners"));
            }
            return Ok(Selector::Tag(s.to_string()));
        }
        if s.starts_with("group:") {
            if !self.groups.contains_key(s) {
                return err(pos, format!("{what} {s:?}: group not in groups"));
            }
            return Ok(Selector::Group(s.to_string()));
        }
        if let Some(p) = self.hosts.get(s) {
            return Ok(Selector::Prefix(*p));
        }
        if let Some(p) = parse_prefix(s) {
            return Ok(Selector::Prefix(p));
        }
        let looks_numeric = s.contains(['.', ':'])
            && s.chars()
                .all(|c| c.is_ascii_hexdigit() || c == '.' || c == ':');
        if s.contains('/') || looks_numeric {
            return err(pos, format!("{what} {s:?}: bad address or CIDR"));
        }
        err(
            pos,
            format!("{what} {s:?}: unknown host (not in hosts, not an address)"),
        )
    }

    /// The selectors of group `name` (empty when there is none).
    pub(crate) fn group(&self, name: &str) -> &[Selector] {
        self.groups.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn perr(pos: Pos, message: String) -> PolicyError {
    PolicyError { pos, message }
}

fn unknown_key(k: &str, known: &[&str]) -> String {
    format!("unknown key {k:?} (known: {})", known.join(", "))
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a [(String, Pos, Value)], PolicyError> {
    match &v.json {
        Json::Object(f) => Ok(f),
        _ => err(
            v.pos,
            format!("{what} must be an object, found {}", v.kind()),
        ),
    }
}

fn array<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], PolicyError> {
    match &v.json {
        Json::Array(a) => Ok(a),
        _ => err(
            v.pos,
            format!("{what} must be an array, found {}", v.kind()),
        ),
    }
}

fn string<'a>(v: &'a Value, what: &str) -> Result<&'a str, PolicyError> {
    match &v.json {
        Json::Str(s) => Ok(s),
        _ => err(
            v.pos,
            format!("{what} must be a string, found {}", v.kind()),
        ),
    }
}

fn check_prefixed(name: &str, prefix: &str, pos: Pos) -> Result<(), PolicyError> {
    let rest = name.strip_prefix(prefix).unwrap_or("");
    let ok = rest.starts_with(|c: char| c.is_ascii_alphabetic())
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return err(
            pos,
            format!("{name:?}: a name must be {prefix}<letter><letters, digits, - or _>"),
        );
    }
    Ok(())
}

fn check_tag(tag: &str, pos: Pos) -> Result<(), PolicyError> {
    check_prefixed(tag, "tag:", pos)
}

fn check_host_name(name: &str, pos: Pos) -> Result<(), PolicyError> {
    let ok = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return err(
            pos,
            format!("host name {name:?}: letters, digits, '-', '_' and '.', from a letter"),
        );
    }
    Ok(())
}

/// An address (a host prefix) or a CIDR, host bits cleared.
fn parse_prefix(s: &str) -> Option<IpPrefix> {
    if !s.contains('/') {
        return s.parse::<IpAddr>().ok().map(IpPrefix::host);
    }
    s.parse::<IpPrefix>().ok().map(|p| p.network())
}

/// `*`, or a comma list of `N` and `N-M`.
fn parse_ports(s: &str) -> Option<Vec<PortRange>> {
    if s == "*" {
        return Some(vec![PortRange::ALL]);
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |t: &str| {
            if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                None
            } else {
                t.parse::<u16>().ok()
            }
        };
        let (first, last) = (num(a)?, num(b)?);
        if first > last {
            return None;
        }
        out.push(PortRange::new(first, last));
    }
    Some(out)
}

fn parse_proto(s: &str, pos: Pos) -> Result<ByteSet, PolicyError> {
    if let Some((_, n)) = PROTO_NAMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
    {
        return Ok(ByteSet::of(&[*n]));
    }
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        if let Ok(n) = s.parse::<u8>() {
            return Ok(ByteSet::of(&[n]));
        }
    }
    let names: Vec<_> = PROTO_NAMES.iter().map(|(n, _)| *n).collect();
    err(
        pos,
        format!(
            "proto {s:?}: not a protocol ({} or 0-255)",
            names.join(", ")
        ),
    )
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Tag(t) | Selector::Group(t) => f.write_str(t),
            Selector::Prefix(p) => write!(f, "{p}"),
        }
    }
}
