//! The control protocol between a node and the control server, sans-IO:
//! message types, their encoding, and the checks every parsed message
//! passes. The websocket and threads are in `server.rs` / `client.rs`; the
//! description with an example exchange is in `docs/control.md`.
//!
//! ```text
//!   server ──Challenge {relay key-proof challenge}──────────────────────► node
//!   node   ──Register {join key?, proof (public key + MAC), hostname,
//!                      routes, tags, endpoints}──────────────────────────► server
//!   server ──Registered {node id, name, IPv4, IPv6, tags} | Error────────► node
//!   server ──Map {full: true, peers, own routes, policy version, filter}─► node
//!   server ──Map {full: false, upserts, removed, ...} (each change)──────► node
//!   node   ──Update {endpoints?, routes?} (when they change)─────────────► server
//! ```
//!
//! The key proof is the relay's (`meshvpn_engine::relay::protocol`): the
//! server's nonce and ephemeral X25519 key, the node's HMAC keyed with the
//! X25519 of its static key and the ephemeral one, over a transcript bound
//! to this TLS session by an exporter value ([`EXPORTER_LABEL`], its own
//! label so a control proof is never a relay proof). No new cryptography.
//!
//! Encoding: one JSON object per websocket binary message, with `"v"` the
//! protocol version and `"type"`. JSON because the map is small next to the
//! data it steers (a full map of 1000 peers is a few hundred KiB, sent once
//! per connection; changes are deltas), it is readable in a packet capture
//! and a log, unknown fields are ignored so fields can be added without a
//! new version (as Tailscale's JSON map responses grow), and serde_json is
//! already in the tree. Binary values (keys, proofs) are base64/hex text.
//!
//! Bounds: a message longer than [`MAX_MESSAGE`] is refused before it is
//! parsed (the websocket refuses it before it is buffered, too), and every
//! list has its own cap ([`MAX_PEERS`], [`MAX_ENDPOINTS`],
//! [`crate::store::MAX_ROUTES_PER_NODE`], [`MAX_TAGS`], [`MAX_RULES`]),
//! checked by [`ServerMessage::decode`] / [`NodeMessage::decode`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use meshvpn_engine::filter::{ByteSet, FilterRules, PortRange, Rule};
use meshvpn_engine::relay::protocol::{CHALLENGE_LEN, PROOF_LEN};
use meshvpn_engine::{IpPrefix, PublicKey};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The upgrade path on the tunnel server's listener.
pub const CONTROL_PATH: &str = "/v1-meshvpn/control";
/// TLS exporter label of the control key proof.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshvpn-control-v1";
/// The largest message either side accepts: a full map of [`MAX_PEERS`]
/// peers with a few routes and endpoints each fits with room to spare.
pub const MAX_MESSAGE: usize = 8 << 20;
/// Peers in one map message.
pub const MAX_PEERS: usize = 16_384;
/// Peers in one part of a full map (about 16 KiB of JSON).
pub const FULL_MAP_PART: usize = 64;
/// Endpoint candidates of one node (its reported addresses plus the one
/// the server sees).
pub const MAX_ENDPOINTS: usize = 16;
/// Tags of one node.
pub const MAX_TAGS: usize = 64;
/// Filter rules on each side of a compiled policy, and prefixes in one rule.
pub const MAX_RULES: usize = 65_536;
/// The longest hostname, name, tag or error text.
pub const MAX_TEXT: usize = 1024;

/// A message that cannot be used; the text says which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("control message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("control message is not valid: {0}")]
    Syntax(String),
    #[error("control protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
    #[error("control message: {what} has {count} entries, over the limit of {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("control message: {0}")]
    Invalid(String),
}

/// Why a registration was refused: each join-key problem has its own code
/// so the node can say exactly what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    KeyMalformed,
    KeyUnknown,
    KeyExpired,
    KeyRevoked,
    KeyReused,
    /// The key proof did not verify.
    BadProof,
    /// A reconnect without a join key from a node the server does not know
    /// (removed, or never registered).
    NodeUnknown,
    /// The node asked for a tag its join key does not carry.
    TagNotPermitted,
    /// The node was removed by the operator.
    Removed,
    /// Something off in the request (too many routes, bad text).
    BadRequest,
    /// The server's own failure (its store); try again later.
    Server,
}

/// One peer in the network map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub id: i64,
    /// WireGuard public key, base64.
    pub key: String,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Approved routes (e.g. a pod CIDR) the peer carries traffic for.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Where the peer may be reached over UDP: what it reported, then the
    /// address the server saw its connection come from.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Whether the peer holds a session with the control server now, so is
    /// reachable through the relay the server serves next to it.
    #[serde(default)]
    pub online: bool,
}

/// One route the node advertises and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    pub prefix: String,
    pub approved: bool,
    /// `approved`, `pending` or `refused` (absent from older servers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// An approved route's part in its prefix: `primary` (the map gives
    /// the prefix to this node) or `standby` (another router of the
    /// cluster carries it; this one takes over when that one goes away).
    /// Absent when not approved, and from older servers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// Why a route was refused: the overlapping route, its node and
    /// cluster, as `meshvpn control routes list` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A compiled filter rule on the wire (`meshvpn_engine::filter::Rule`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRule {
    pub srcs: Vec<String>,
    /// `(prefix, first port, last port)`.
    pub dsts: Vec<(String, u16, u16)>,
    pub protos: Vec<u8>,
    pub icmp_types: Vec<u8>,
}

/// A node's compiled filter on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFilter {
    pub inbound: Vec<WireRule>,
    pub outbound: Vec<WireRule>,
}

/// The network map or a change to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapUpdate {
    /// The whole map: `upserts` replaces every peer the node knew.
    pub full: bool,
    /// Peers added or changed (all peers when `full`).
    #[serde(default)]
    pub upserts: Vec<Peer>,
    /// Node ids of peers gone.
    #[serde(default)]
    pub removed: Vec<i64>,
    /// The node's own advertised routes and their state, when changed.
    #[serde(default)]
    pub routes: Option<Vec<RouteState>>,
    /// The policy version the filter comes from (0: no policy).
    pub policy_version: u64,
    /// The node's compiled filter when it changed; with `filter_set` and
    /// no filter, the policy was removed (allow all between nodes).
    #[serde(default)]
    pub filter: Option<WireFilter>,
    #[serde(default)]
    pub filter_set: bool,
    /// The relay nodes may use when UDP fails (full maps only).
    #[serde(default)]
    pub relay_url: Option<String>,
    /// More messages of this full map follow (a full map is sent in parts
    /// of at most [`FULL_MAP_PART`] peers, so no one message, and no
    /// websocket buffer, grows with the mesh).
    #[serde(default)]
    pub more: bool,
}

/// What the server says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerBody {
    /// The relay protocol's challenge, hex.
    Challenge {
        challenge: String,
    },
    Registered {
        node_id: i64,
        name: String,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
        tags: Vec<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Map(MapUpdate),
}

/// What a node says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeBody {
    Register {
        /// Absent when a registered node reconnects (its key proof is its
        /// credential, as a Tailscale node key is).
        #[serde(default)]
        join_key: Option<String>,
        /// The relay protocol's proof, hex: version, public key, MAC.
        proof: String,
        hostname: String,
        #[serde(default)]
        routes: Vec<String>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        endpoints: Vec<SocketAddr>,
    },
    Update {
        #[serde(default)]
        endpoints: Option<Vec<SocketAddr>>,
        #[serde(default)]
        routes: Option<Vec<String>>,
    },
}

#[derive(Serialize)]
struct Envelope<B> {
    v: u32,
    #[serde(flatten)]
    body: B,
}

fn encode<B: Serialize>(body: &B) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: VERSION, body }).expect("plain data serializes")
}

/// The envelope's version alone, read when a message does not parse, so a
/// peer speaking another version gets [`ProtoError::Version`] rather than
/// a syntax error about a field it laid out differently.
fn check_version(bytes: &[u8], error: serde_json::Error) -> ProtoError {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    match serde_json::from_slice::<Version>(bytes) {
        Ok(v) if v.v != VERSION => ProtoError::Version(v.v),
        _ => ProtoError::Syntax(error.to_string()),
    }
}

/// Parses one message in one pass. The envelope is `{"v", "type", the
/// body's fields}` (what [`encode`] writes with `#[serde(flatten)]` and an
/// internally tagged enum); deriving the decoder the same way makes serde
/// buffer every value of the message as an owned `Content` tree and parse
/// it twice, which is most of a node's CPU when a mesh of 1000 joins (every
/// node decodes every other node's entry at least once). So each side
/// reads a flat struct of every field of every message type (`W`), then
/// takes the variant's fields from it (`into_body`); unknown fields are
/// still ignored, so the wire format is unchanged.
fn decode<W, B>(
    bytes: &[u8],
    into_body: impl FnOnce(W) -> Result<B, ProtoError>,
) -> Result<B, ProtoError>
where
    W: for<'de> Deserialize<'de> + Versioned,
{
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtoError::TooLarge(bytes.len()));
    }
    let wire: W = serde_json::from_slice(bytes).map_err(|e| check_version(bytes, e))?;
    if wire.version() != VERSION {
        return Err(ProtoError::Version(wire.version()));
    }
    into_body(wire)
}

trait Versioned {
    fn version(&self) -> u32;
}

fn missing(field: &str) -> ProtoError {
    ProtoError::Syntax(format!("missing field `{field}`"))
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ServerKind {
    Challenge,
    Registered,
    Error,
    Map,
}

/// Every field of every [`ServerBody`] variant (see [`decode`]).
#[derive(Deserialize)]
struct ServerWire {
    v: u32,
    #[serde(rename = "type")]
    kind: ServerKind,
    challenge: Option<String>,
    node_id: Option<i64>,
    name: Option<String>,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    tags: Option<Vec<String>>,
    code: Option<ErrorCode>,
    message: Option<String>,
    full: Option<bool>,
    #[serde(default)]
    upserts: Vec<Peer>,
    #[serde(default)]
    removed: Vec<i64>,
    #[serde(default)]
    routes: Option<Vec<RouteState>>,
    policy_version: Option<u64>,
    #[serde(default)]
    filter: Option<WireFilter>,
    #[serde(default)]
    filter_set: bool,
    #[serde(default)]
    relay_url: Option<String>,
    #[serde(default)]
    more: bool,
}

impl Versioned for ServerWire {
    fn version(&self) -> u32 {
        self.v
    }
}

impl ServerWire {
    fn into_body(self) -> Result<ServerBody, ProtoError> {
        Ok(match self.kind {
            ServerKind::Challenge => ServerBody::Challenge {
                challenge: self.challenge.ok_or_else(|| missing("challenge"))?,
            },
            ServerKind::Registered => ServerBody::Registered {
                node_id: self.node_id.ok_or_else(|| missing("node_id"))?,
                name: self.name.ok_or_else(|| missing("name"))?,
                ipv4: self.ipv4.ok_or_else(|| missing("ipv4"))?,
                ipv6: self.ipv6.ok_or_else(|| missing("ipv6"))?,
                tags: self.tags.ok_or_else(|| missing("tags"))?,
            },
            ServerKind::Error => ServerBody::Error {
                code: self.code.ok_or_else(|| missing("code"))?,
                message: self.message.ok_or_else(|| missing("message"))?,
            },
            ServerKind::Map => ServerBody::Map(MapUpdate {
                full: self.full.ok_or_else(|| missing("full"))?,
                upserts: self.upserts,
                removed: self.removed,
                routes: self.routes,
                policy_version: self
                    .policy_version
                    .ok_or_else(|| missing("policy_version"))?,
                filter: self.filter,
                filter_set: self.filter_set,
                relay_url: self.relay_url,
                more: self.more,
            }),
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum NodeKind {
    Register,
    Update,
}

/// Every field of every [`NodeBody`] variant (see [`decode`]).
#[derive(Deserialize)]
struct NodeWire {
    v: u32,
    #[serde(rename = "type")]
    kind: NodeKind,
    #[serde(default)]
    join_key: Option<String>,
    proof: Option<String>,
    hostname: Option<String>,
    #[serde(default)]
    routes: Option<Vec<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    endpoints: Option<Vec<SocketAddr>>,
}

impl Versioned for NodeWire {
    fn version(&self) -> u32 {
        self.v
    }
}

impl NodeWire {
    fn into_body(self) -> Result<NodeBody, ProtoError> {
        Ok(match self.kind {
            NodeKind::Register => NodeBody::Register {
                join_key: self.join_key,
                proof: self.proof.ok_or_else(|| missing("proof"))?,
                hostname: self.hostname.ok_or_else(|| missing("hostname"))?,
                routes: self.routes.unwrap_or_default(),
                tags: self.tags.unwrap_or_default(),
                endpoints: self.endpoints.unwrap_or_default(),
            },
            NodeKind::Update => NodeBody::Update {
                endpoints: self.endpoints,
                routes: self.routes,
            },
        })
    }
}

fn cap(what: &'static str, count: usize, max: usize) -> Result<(), ProtoError> {
    if count > max {
        return Err(ProtoError::TooMany { what, count, max });
    }
    Ok(())
}

fn text(what: &str, s: &str) -> Result<(), ProtoError> {
    if s.len() > MAX_TEXT {
        return Err(ProtoError::Invalid(format!(
            "{what} of {} bytes is over {MAX_TEXT}",
            s.len()
        )));
    }
    Ok(())
}

/// Parses route prefixes, capped at [`crate::store::MAX_ROUTES_PER_NODE`].
pub fn parse_routes(routes: &[String]) -> Result<Vec<IpPrefix>, ProtoError> {
    cap("routes", routes.len(), crate::store::MAX_ROUTES_PER_NODE)?;
    routes
        .iter()
        .map(|r| {
            r.parse::<IpPrefix>()
                .map_err(|e| ProtoError::Invalid(format!("route {r:?}: {e}")))
        })
        .collect()
}

/// [`parse_routes`]'s checks without collecting the prefixes.
fn check_routes(routes: &[String]) -> Result<(), ProtoError> {
    cap("routes", routes.len(), crate::store::MAX_ROUTES_PER_NODE)?;
    routes.iter().try_for_each(|r| {
        r.parse::<IpPrefix>()
            .map(|_| ())
            .map_err(|e| ProtoError::Invalid(format!("route {r:?}: {e}")))
    })
}

fn check_tags(tags: &[String]) -> Result<(), ProtoError> {
    cap("tags", tags.len(), MAX_TAGS)?;
    tags.iter().try_for_each(|t| text("tag", t))
}

fn check_peer(p: &Peer) -> Result<(), ProtoError> {
    PublicKey::from_base64(&p.key)
        .map_err(|e| ProtoError::Invalid(format!("peer {}: key: {}", p.id, e.reason())))?;
    text("peer name", &p.name)?;
    check_tags(&p.tags)?;
    check_routes(&p.routes)?;
    cap("endpoints", p.endpoints.len(), MAX_ENDPOINTS)
}

impl ServerBody {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Parses and checks a server message (the node's side).
    pub fn decode(bytes: &[u8]) -> Result<ServerBody, ProtoError> {
        let body = decode(bytes, ServerWire::into_body)?;
        match &body {
            ServerBody::Challenge { challenge } => {
                if challenge.len() != CHALLENGE_LEN * 2 {
                    return Err(ProtoError::Invalid("challenge has the wrong length".into()));
                }
            }
            ServerBody::Registered { name, tags, .. } => {
                text("name", name)?;
                check_tags(tags)?;
            }
            ServerBody::Error { message, .. } => text("error", message)?,
            ServerBody::Map(m) => {
                cap("peers", m.upserts.len(), MAX_PEERS)?;
                cap("removed peers", m.removed.len(), MAX_PEERS)?;
                m.upserts.iter().try_for_each(check_peer)?;
                if let Some(r) = &m.routes {
                    cap("routes", r.len(), crate::store::MAX_ROUTES_PER_NODE)?;
                }
                if let Some(u) = &m.relay_url {
                    text("relay URL", u)?;
                }
                if let Some(f) = &m.filter {
                    filter_from_wire(f)?;
                }
            }
        }
        Ok(body)
    }
}

impl NodeBody {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Parses and checks a node message (the server's side).
    pub fn decode(bytes: &[u8]) -> Result<NodeBody, ProtoError> {
        let body = decode(bytes, NodeWire::into_body)?;
        match &body {
            NodeBody::Register {
                join_key,
                proof,
                hostname,
                routes,
                tags,
                endpoints,
            } => {
                if proof.len() != PROOF_LEN * 2 {
                    return Err(ProtoError::Invalid("proof has the wrong length".into()));
                }
                if let Some(k) = join_key {
                    text("join key", k)?;
                }
                text("hostname", hostname)?;
                parse_routes(routes)?;
                check_tags(tags)?;
                cap("endpoints", endpoints.len(), MAX_ENDPOINTS)?;
            }
            NodeBody::Update { endpoints, routes } => {
                if let Some(e) = endpoints {
                    cap("endpoints", e.len(), MAX_ENDPOINTS)?;
                }
                if let Some(r) = routes {
                    parse_routes(r)?;
                }
            }
        }
        Ok(body)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of hex text of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Result<[u8; N], ProtoError> {
    let bad = || ProtoError::Invalid(format!("expected {N} bytes of hex"));
    if s.len() != N * 2 {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn set_to_wire(set: &ByteSet) -> Vec<u8> {
    (0..=255u8).filter(|b| set.contains(*b)).collect()
}

fn rule_to_wire(r: &Rule) -> WireRule {
    WireRule {
        srcs: r.srcs.iter().map(|p| p.to_string()).collect(),
        dsts: r
            .dsts
            .iter()
            .map(|(p, ports)| (p.to_string(), ports.first, ports.last))
            .collect(),
        protos: set_to_wire(&r.protos),
        icmp_types: set_to_wire(&r.icmp_types),
    }
}

/// The engine's filter rules in their wire form.
pub fn filter_to_wire(rules: &FilterRules) -> WireFilter {
    WireFilter {
        inbound: rules.inbound.iter().map(rule_to_wire).collect(),
        outbound: rules.outbound.iter().map(rule_to_wire).collect(),
    }
}

fn prefix(s: &str) -> Result<IpPrefix, ProtoError> {
    s.parse()
        .map_err(|e| ProtoError::Invalid(format!("filter prefix {s:?}: {e}")))
}

fn rule_from_wire(r: &WireRule) -> Result<Rule, ProtoError> {
    cap("rule sources", r.srcs.len(), MAX_RULES)?;
    cap("rule destinations", r.dsts.len(), MAX_RULES)?;
    cap("rule protocols", r.protos.len(), 256)?;
    cap("rule ICMP types", r.icmp_types.len(), 256)?;
    let dsts = r
        .dsts
        .iter()
        .map(|(p, first, last)| {
            if first > last {
                return Err(ProtoError::Invalid(format!(
                    "filter port range {first}-{last} is backwards"
                )));
            }
            Ok((prefix(p)?, PortRange::new(*first, *last)))
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        srcs: r.srcs.iter().map(|s| prefix(s)).collect::<Result<_, _>>()?,
        dsts,
        protos: ByteSet::of(&r.protos),
        icmp_types: ByteSet::of(&r.icmp_types),
    })
}

/// The wire filter as the engine's rules (checked: caps, prefixes, ports).
pub fn filter_from_wire(f: &WireFilter) -> Result<FilterRules, ProtoError> {
    cap("inbound rules", f.inbound.len(), MAX_RULES)?;
    cap("outbound rules", f.outbound.len(), MAX_RULES)?;
    Ok(FilterRules {
        inbound: f
            .inbound
            .iter()
            .map(rule_from_wire)
            .collect::<Result<_, _>>()?,
        outbound: f
            .outbound
            .iter()
            .map(rule_from_wire)
            .collect::<Result<_, _>>()?,
    })
}

/// The addresses of a peer, for building engine peers and filters.
pub fn peer_addresses(p: &Peer) -> [IpAddr; 2] {
    [IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: i64) -> Peer {
        Peer {
            id,
            key: PublicKey::from_bytes([id as u8 + 1; 32]).to_base64(),
            name: format!("n{id}"),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: "fd00::1".parse().unwrap(),
            tags: vec!["tag:k3s".into()],
            routes: vec!["10.42.1.0/24".into()],
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            online: true,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let rules = FilterRules {
            inbound: vec![Rule::allow_all()],
            outbound: vec![],
        };
        let server = [
            ServerBody::Challenge {
                challenge: hex(&[1u8; CHALLENGE_LEN]),
            },
            ServerBody::Registered {
                node_id: 3,
                name: "a".into(),
                ipv4: Ipv4Addr::new(100, 64, 0, 3),
                ipv6: "fd00::3".parse().unwrap(),
                tags: vec![],
            },
            ServerBody::Error {
                code: ErrorCode::KeyReused,
                message: "used".into(),
            },
            ServerBody::Map(MapUpdate {
                full: true,
                upserts: vec![peer(1), peer(2)],
                removed: vec![7],
                routes: Some(vec![RouteState {
                    prefix: "10.42.0.0/24".into(),
                    approved: false,
                    status: "refused".into(),
                    role: String::new(),
                    reason: Some("overlaps 10.42.0.0/16 of node a in cluster one".into()),
                }]),
                policy_version: 4,
                filter: Some(filter_to_wire(&rules)),
                filter_set: true,
                relay_url: Some("wss://example:6443/v1-meshvpn/relay".into()),
                more: true,
            }),
        ];
        for m in server {
            assert_eq!(ServerBody::decode(&m.encode()).unwrap(), m);
        }
        let node = [
            NodeBody::Register {
                join_key: Some("k".into()),
                proof: hex(&[2u8; PROOF_LEN]),
                hostname: "h".into(),
                routes: vec!["10.42.0.0/24".into()],
                tags: vec![],
                endpoints: vec![],
            },
            NodeBody::Update {
                endpoints: Some(vec!["[2001:db8::1]:5".parse().unwrap()]),
                routes: None,
            },
        ];
        for m in node {
            assert_eq!(NodeBody::decode(&m.encode()).unwrap(), m);
        }
        let back = filter_from_wire(&filter_to_wire(&rules)).unwrap();
        assert_eq!(back, rules);
    }

    #[test]
    fn bad_messages_get_clear_errors() {
        assert_eq!(
            NodeBody::decode(&vec![b' '; MAX_MESSAGE + 1]),
            Err(ProtoError::TooLarge(MAX_MESSAGE + 1))
        );
        assert_eq!(
            NodeBody::decode(br#"{"v":2,"type":"update"}"#),
            Err(ProtoError::Version(2))
        );
        assert!(matches!(
            NodeBody::decode(b"{\"v\":1,"),
            Err(ProtoError::Syntax(_))
        ));
        assert!(matches!(
            NodeBody::decode(br#"{"v":1,"type":"register","proof":"00","hostname":"h"}"#),
            Err(ProtoError::Invalid(m)) if m.contains("proof")
        ));
        let routes: Vec<String> = (0..300).map(|i| format!("10.{i}.0.0/16")).collect();
        let many = NodeBody::Update {
            endpoints: None,
            routes: Some(routes),
        };
        assert!(matches!(
            NodeBody::decode(&many.encode()),
            Err(ProtoError::TooMany { what: "routes", .. })
        ));
        let mut p = peer(1);
        p.key = "not a key".into();
        let m = ServerBody::Map(MapUpdate {
            upserts: vec![p],
            ..Default::default()
        });
        assert!(matches!(
            ServerBody::decode(&m.encode()),
            Err(ProtoError::Invalid(m)) if m.contains("key")
        ));
        let mut f = filter_to_wire(&FilterRules {
            inbound: vec![Rule::allow_all()],
            outbound: vec![],
        });
        f.inbound[0].dsts[0] = ("10.0.0.0/8".into(), 9, 1);
        assert!(filter_from_wire(&f).is_err());
    }
}
