//! Compiled filter rules: who may start a flow to whom, on which protocol
//! and ports. Plain data, built by the policy compiler (`meshvpn-control`)
//! or by hand; no policy syntax here.

use std::net::IpAddr;

use crate::router::IpPrefix;
use crate::wire::icmp::types;
use crate::wire::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// An inclusive range of destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Every port: what a rule for a protocol without ports must carry.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn new(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    #[inline]
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    pub fn is_all(&self) -> bool {
        *self == PortRange::ALL
    }
}

/// A set of byte values (IP protocol numbers, ICMP types) as a bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ByteSet([u64; 4]);

impl ByteSet {
    pub const EMPTY: ByteSet = ByteSet([0; 4]);
    pub const ALL: ByteSet = ByteSet([u64::MAX; 4]);

    pub fn of(values: &[u8]) -> ByteSet {
        let mut s = ByteSet::EMPTY;
        for &v in values {
            s.insert(v);
        }
        s
    }

    pub fn insert(&mut self, v: u8) {
        self.0[(v >> 6) as usize] |= 1 << (v & 63);
    }

    #[inline]
    pub fn contains(&self, v: u8) -> bool {
        self.0[(v >> 6) as usize] & (1 << (v & 63)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
}

/// The protocols a policy gives when it names none: TCP, UDP, ICMP and
/// ICMPv6 (as Tailscale's `acls` default).
pub fn default_protocols() -> ByteSet {
    ByteSet::of(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6])
}

/// The ICMP types that may start a flow when a rule names none: echo
/// requests (v4 and v6). Echo replies pass only on a tracked request;
/// errors always pass (see the module doc).
pub fn default_icmp_types() -> ByteSet {
    ByteSet::of(&[types::V4_ECHO_REQUEST, types::V6_ECHO_REQUEST])
}

/// One accept rule: a flow whose initiator is in `srcs` and whose
/// responder is in one of `dsts` (with its destination port in that
/// entry's range, for TCP and UDP) may start, on a protocol in `protos`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub srcs: Vec<IpPrefix>,
    pub dsts: Vec<(IpPrefix, PortRange)>,
    pub protos: ByteSet,
    /// ICMP/ICMPv6 types that may start a flow (see [`default_icmp_types`]).
    pub icmp_types: ByteSet,
}

impl Rule {
    /// Everything from anywhere to anywhere.
    pub fn allow_all() -> Rule {
        let any = |s: &str| s.parse::<IpPrefix>().expect("a literal prefix");
        Rule {
            srcs: vec![any("0.0.0.0/0"), any("::/0")],
            dsts: vec![
                (any("0.0.0.0/0"), PortRange::ALL),
                (any("::/0"), PortRange::ALL),
            ],
            protos: ByteSet::ALL,
            icmp_types: ByteSet::ALL,
        }
    }
}

/// What a rule is checked against: the start of a flow, in the direction
/// it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowStart {
    pub proto: u8,
    /// The initiator.
    pub src: IpAddr,
    /// The responder.
    pub dst: IpAddr,
    /// The responder's port (TCP, UDP); `None` otherwise.
    pub port: Option<u16>,
    /// The ICMP type, for ICMP and ICMPv6; `None` otherwise.
    pub icmp_type: Option<u8>,
}

/// A compiled filter for one node: which flows peers may start to it
/// (`inbound`) and which flows it may start to peers (`outbound`, checked
/// on what the host sends so that a flow the far side would refuse fails
/// here at once). Rules only accept; a flow no rule accepts is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterRules {
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
}

impl FilterRules {
    /// Whether some inbound rule accepts the flow start (compiles the
    /// rules for the call: for tests and tools, not for the data path).
    pub fn allows_inbound(&self, f: &FlowStart) -> bool {
        let s = FastStart::from(f);
        self.inbound.iter().any(|r| FastRule::new(r).allows(&s))
    }

    /// Whether some outbound rule accepts the flow start (as
    /// [`FilterRules::allows_inbound`]).
    pub fn allows_outbound(&self, f: &FlowStart) -> bool {
        let s = FastStart::from(f);
        self.outbound.iter().any(|r| FastRule::new(r).allows(&s))
    }

    /// Rules in both directions.
    pub fn rule_count(&self) -> usize {
        self.inbound.len() + self.outbound.len()
    }
}

/// An address as the filter matches it: IPv4 mapped into IPv6
/// (`::ffff:a.b.c.d`), so one 128-bit compare serves both families.
#[inline]
pub(crate) fn mapped(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(v.to_ipv6_mapped()),
        IpAddr::V6(v) => u128::from(v),
    }
}

/// A prefix over mapped addresses: network, mask and family (so that
/// `::/0` does not hold the IPv4-mapped range).
#[derive(Debug, Clone, Copy)]
struct Masked {
    net: u128,
    mask: u128,
    v4: bool,
}

impl Masked {
    fn new(p: &IpPrefix) -> Masked {
        let v4 = p.is_ipv4();
        let len = if v4 {
            96 + p.len() as u32
        } else {
            p.len() as u32
        };
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        Masked {
            net: mapped(p.addr()) & mask,
            mask,
            v4,
        }
    }

    #[inline]
    fn contains(&self, addr: u128, v4: bool) -> bool {
        self.v4 == v4 && addr & self.mask == self.net
    }
}

/// A [`Rule`] in the form the data path scans: masks precomputed, one
/// integer compare per prefix.
#[derive(Debug, Clone)]
pub(crate) struct FastRule {
    srcs: Vec<Masked>,
    dsts: Vec<(Masked, PortRange)>,
    protos: ByteSet,
    icmp_types: ByteSet,
}

/// What a [`FastRule`] is checked against (addresses mapped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastStart {
    pub v4: bool,
    pub proto: u8,
    pub src: u128,
    pub dst: u128,
    pub port: Option<u16>,
    pub icmp_type: Option<u8>,
}

impl From<&FlowStart> for FastStart {
    fn from(f: &FlowStart) -> FastStart {
        FastStart {
            v4: f.src.is_ipv4(),
            proto: f.proto,
            src: mapped(f.src),
            dst: mapped(f.dst),
            port: f.port,
            icmp_type: f.icmp_type,
        }
    }
}

impl FastRule {
    pub fn new(r: &Rule) -> FastRule {
        FastRule {
            srcs: r.srcs.iter().map(Masked::new).collect(),
            dsts: r
                .dsts
                .iter()
                .map(|(p, ports)| (Masked::new(p), *ports))
                .collect(),
            protos: r.protos,
            icmp_types: r.icmp_types,
        }
    }

    /// Whether this rule lets the flow start: its protocol is listed,
    /// its ICMP type too (for ICMP), its initiator is in a source and its
    /// responder in a destination whose ports hold its port. A protocol
    /// without ports needs an all-ports destination.
    #[inline]
    pub fn allows(&self, f: &FastStart) -> bool {
        if !self.protos.contains(f.proto) {
            return false;
        }
        if let Some(t) = f.icmp_type {
            if !self.icmp_types.contains(t) {
                return false;
            }
        }
        if !self.srcs.iter().any(|p| p.contains(f.src, f.v4)) {
            return false;
        }
        self.dsts.iter().any(|(p, ports)| {
            p.contains(f.dst, f.v4)
                && match f.port {
                    Some(port) => ports.contains(port),
                    None if f.icmp_type.is_some() => true,
                    None => ports.is_all(),
                }
        })
    }
}

/// [`FilterRules`] compiled for scanning.
#[derive(Debug, Clone)]
pub(crate) struct FastRules {
    pub inbound: Vec<FastRule>,
    pub outbound: Vec<FastRule>,
}

impl FastRules {
    pub fn new(r: &FilterRules) -> FastRules {
        FastRules {
            inbound: r.inbound.iter().map(FastRule::new).collect(),
            outbound: r.outbound.iter().map(FastRule::new).collect(),
        }
    }
}
