//! The stateful packet filter: compiled accept rules ([`FilterRules`])
//! plus connection tracking, evaluated on decrypted inbound packets and on
//! the packets the host sends. Sans-IO: bytes and the caller's `now` in, a
//! [`Verdict`] out.
//!
//! Semantics:
//! - No rules installed: everything passes and nothing is tracked
//!   (a mesh without a policy is allow-all between nodes, as Tailscale).
//! - A packet of a tracked flow passes in both directions (replies to an
//!   allowed flow pass: TCP, UDP, ICMP echo). An ICMP echo reply passes
//!   only against a tracked request in the other direction.
//! - Any other packet starts a flow if a rule of its direction accepts it
//!   (`inbound` for what peers send, `outbound` for what the host sends),
//!   and the flow is tracked; otherwise it is dropped with a reason. A TCP
//!   segment without SYN may start a flow too when a rule accepts it (the
//!   Linux conntrack's "loose" pickup), so a flow survives the loss of
//!   its entry (expiry, or rules installed over allow-all) on the side
//!   that was allowed to start it.
//! - ICMP errors (unreachable, time exceeded, parameter problem, packet
//!   too big) and IPv4 fragments after the first pass untracked, as in
//!   Tailscale's `wgengine/filter`: errors carry path MTU discovery, and a
//!   later fragment is useless without its first, which was filtered. An
//!   IPv4 TCP fragment at offset 1 (the overlap attack of RFC 1858) is
//!   dropped.
//! - Protocols other than TCP, UDP and ICMP are not tracked: they pass
//!   when a rule of their direction names the protocol with all ports.
//!   IPv6 extension headers are not walked: such a packet's protocol is
//!   its first next-header value.
//! - What a refused flow sees: a peer's refused packet is dropped without
//!   an answer. A refused host packet fails at the sender, and the caller
//!   that holds the host's sink hands it the answer [`reject::answer`]
//!   makes, as nftables `reject` does: a RST for a SYN, an ICMP
//!   destination unreachable, administratively prohibited, for UDP, echo
//!   requests and other protocols; nothing for ICMP errors, later
//!   fragments, broadcast or multicast. At most
//!   [`REJECT_ANSWERS_PER_SEC`] answers of both kinds together.
//!
//! A new rule set ([`Filter::set_rules`]) applies to the next packet: new
//! flows by the new rules. Tracked flows are kept, as Tailscale keeps them
//! (`filter.New(..., shareStateWith)`; its issue #859 is the request to
//! cut them): a flow established under the old rules continues until it
//! ends or expires. Removing every rule (`None`) clears the table.

mod conntrack;
pub mod reject;
mod rules;
mod sharded;
pub mod text;

#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use conntrack::{Conntrack, Entry, FlowKey, Refused};
pub use conntrack::{
    ConntrackLimits, DEFAULT_CONNTRACK_CAPACITY, DEFAULT_CONNTRACK_PER_SOURCE, ICMP_TIMEOUT,
    SWEEP_INTERVAL, TCP_CLOSING_TIMEOUT, TCP_ESTABLISHED_TIMEOUT, TCP_UNREPLIED_TIMEOUT,
    UDP_REPLIED_TIMEOUT, UDP_UNREPLIED_TIMEOUT,
};
pub use reject::{RejectLimiter, REJECT_ANSWERS_PER_SEC, REJECT_ANSWER_MAX};
pub use rules::{
    default_icmp_types, default_protocols, ByteSet, FilterRules, FlowStart, PortRange, Rule,
};
use rules::{FastRules, FastStart};
pub use sharded::{ShardedFilter, FILTER_SHARDS};
pub use text::RulesTextError;

use crate::stats::{stats_reasons, stats_struct};
use crate::wire::icmp::IcmpPacket;
use crate::wire::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::wire::tcp::flags;
use crate::wire::{IpPacket, TcpPacket, UdpPacket};

stats_reasons! {
    /// Why the packet filter dropped a packet.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum FilterDrop {
        /// Not an IP packet, or its TCP, UDP or ICMP header is cut short.
        Malformed = "filter_malformed",
        /// An IPv4 TCP fragment at offset 1 (RFC 1858 overlap).
        Fragment = "filter_fragment",
        /// A peer's packet that starts a flow no inbound rule accepts.
        NotAllowed = "filter_not_allowed",
        /// A peer's packet that looks like a reply (TCP ACK without SYN, a
        /// SYN-ACK, an ICMP echo reply) with no tracked flow and no rule
        /// accepting it.
        NoState = "filter_no_state",
        /// A host packet that starts a flow no outbound rule accepts.
        OutboundDenied = "filter_outbound_denied",
        /// An accepted new flow found the tracking table full.
        TableFull = "filter_table_full",
        /// An accepted new flow's source already holds its share of the
        /// table.
        SourceShare = "filter_source_share",
    }
}

stats_struct! {
    /// The packet filter's counters.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct FilterStats {
        /// Packets of tracked flows that passed.
        pub accepted_tracked: u64,
        /// Packets that started a tracked flow.
        pub accepted_new: u64,
        /// Packets that passed untracked: no rules installed, ICMP errors,
        /// later fragments, untracked protocols.
        pub accepted_untracked: u64,
        /// Flows tracked now.
        pub flows: u64,
    }
}

/// The filter's decision on one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop(FilterDrop),
}

impl Verdict {
    pub fn is_accept(self) -> bool {
        self == Verdict::Accept
    }
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Decrypted, from a peer to this node.
    Inbound,
    /// From the host, to a peer.
    Outbound,
}

/// What the filter reads of a packet, parsed once.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    v4: bool,
    proto: u8,
    /// Addresses as 128-bit integers, IPv4 mapped (`::ffff:a.b.c.d`).
    src: u128,
    dst: u128,
    src_port: u16,
    dst_port: u16,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp {
        flags: u8,
    },
    Udp,
    EchoRequest {
        ty: u8,
    },
    EchoReply {
        ty: u8,
    },
    IcmpError,
    IcmpOther {
        ty: u8,
    },
    /// An untracked protocol.
    Other,
    /// An IPv4 fragment after the first.
    LaterFragment,
}

fn parse(packet: &[u8]) -> Result<Parsed, FilterDrop> {
    let ip = IpPacket::new_checked(packet).map_err(|_| FilterDrop::Malformed)?;
    let v4 = ip.is_v4();
    let a = ip.addrs();
    let (src, dst) = if v4 {
        let s: [u8; 4] = a[0..4].try_into().expect("8 address bytes");
        let d: [u8; 4] = a[4..8].try_into().expect("8 address bytes");
        (
            u128::from(Ipv4Addr::from(s).to_ipv6_mapped()),
            u128::from(Ipv4Addr::from(d).to_ipv6_mapped()),
        )
    } else {
        let s: [u8; 16] = a[0..16].try_into().expect("32 address bytes");
        let d: [u8; 16] = a[16..32].try_into().expect("32 address bytes");
        (u128::from_be_bytes(s), u128::from_be_bytes(d))
    };
    let proto = ip.protocol();
    let mut p = Parsed {
        v4,
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        kind: Kind::Other,
    };
    match ip.fragment_offset() {
        0 => {}
        1 if proto == PROTO_TCP => return Err(FilterDrop::Fragment),
        _ => {
            p.kind = Kind::LaterFragment;
            return Ok(p);
        }
    }
    let l4 = ip.payload();
    match proto {
        PROTO_TCP => {
            let t = TcpPacket::new_checked(l4).map_err(|_| FilterDrop::Malformed)?;
            (p.src_port, p.dst_port) = (t.src_port(), t.dst_port());
            p.kind = Kind::Tcp { flags: t.flags() };
        }
        PROTO_UDP => {
            let u = UdpPacket::new_checked(l4).map_err(|_| FilterDrop::Malformed)?;
            (p.src_port, p.dst_port) = (u.src_port(), u.dst_port());
            p.kind = Kind::Udp;
        }
        PROTO_ICMP | PROTO_ICMPV6 if (proto == PROTO_ICMP) == v4 => {
            let i = IcmpPacket::new_checked(l4, v4).map_err(|_| FilterDrop::Malformed)?;
            let ty = i.msg_type();
            p.kind = if i.is_echo_request() {
                Kind::EchoRequest { ty }
            } else if i.is_echo_reply() {
                Kind::EchoReply { ty }
            } else if i.is_error() {
                Kind::IcmpError
            } else {
                Kind::IcmpOther { ty }
            };
            (p.src_port, p.dst_port) = (i.echo_ident(), i.echo_ident());
        }
        _ => {}
    }
    Ok(p)
}

impl Parsed {
    /// The flow seen from this node.
    #[inline]
    fn key(&self, dir: Direction) -> FlowKey {
        let ((l, lp), (r, rp)) = match dir {
            Direction::Inbound => ((self.dst, self.dst_port), (self.src, self.src_port)),
            Direction::Outbound => ((self.src, self.src_port), (self.dst, self.dst_port)),
        };
        FlowKey {
            local: l,
            remote: r,
            local_port: lp,
            remote_port: rp,
            proto: self.proto,
            v4: self.v4,
        }
    }

    fn flow_start(&self) -> FastStart {
        let (port, icmp_type) = match self.kind {
            Kind::Tcp { .. } | Kind::Udp => (Some(self.dst_port), None),
            Kind::EchoRequest { ty } | Kind::EchoReply { ty } | Kind::IcmpOther { ty } => {
                (None, Some(ty))
            }
            _ => (None, None),
        };
        FastStart {
            v4: self.v4,
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            port,
            icmp_type,
        }
    }

    /// A packet that only makes sense inside a flow the other side began.
    fn looks_like_reply(&self) -> bool {
        match self.kind {
            // A SYN-ACK, an RST-ACK, or an ACK without SYN.
            Kind::Tcp { flags: f } => {
                (f & flags::ACK != 0 && f & (flags::SYN | flags::RST) != 0)
                    || f & (flags::SYN | flags::ACK) == flags::ACK
            }
            Kind::EchoReply { .. } => true,
            _ => false,
        }
    }
}

/// The packet filter of one node. Not internally locked: the data path
/// holds it behind its own lock, so a rule swap is atomic with respect to
/// packets (the next packet sees the new rules).
pub struct Filter {
    rules: Option<Arc<FilterRules>>,
    fast: Option<Arc<FastRules>>,
    table: Conntrack,
    stats: FilterStats,
    drops: [u64; FilterDrop::ALL.len()],
}

impl Default for Filter {
    fn default() -> Self {
        Filter::new(ConntrackLimits::default())
    }
}

impl Filter {
    /// An allow-all filter (no rules) with a table of these bounds.
    pub fn new(limits: ConntrackLimits) -> Filter {
        Filter {
            rules: None,
            fast: None,
            table: Conntrack::new(limits),
            stats: FilterStats::default(),
            drops: [0; FilterDrop::ALL.len()],
        }
    }

    /// Installs a rule set (`None`: allow all). See the module doc for
    /// what happens to tracked flows.
    pub fn set_rules(&mut self, rules: Option<Arc<FilterRules>>) {
        if rules.is_none() {
            self.table.clear();
        }
        self.fast = rules.as_deref().map(|r| Arc::new(FastRules::new(r)));
        self.rules = rules;
    }

    /// [`Filter::set_rules`] with the rules compiled already (shared by
    /// the shards of a [`ShardedFilter`]).
    fn set_compiled(&mut self, rules: Option<Arc<FilterRules>>, fast: Option<Arc<FastRules>>) {
        if rules.is_none() {
            self.table.clear();
        }
        self.fast = fast;
        self.rules = rules;
    }

    pub fn rules(&self) -> Option<&Arc<FilterRules>> {
        self.rules.as_ref()
    }

    pub fn limits(&self) -> ConntrackLimits {
        self.table.limits()
    }

    /// A packet a peer sent, decrypted. `source` names that peer (the data
    /// path's peer index): the table's per-source share is counted by it.
    #[inline]
    pub fn inbound(&mut self, packet: &[u8], source: u64, now: Instant) -> Verdict {
        self.check(Direction::Inbound, packet, source, now)
    }

    /// A packet the host sends, to the peer `source` names (the peer the
    /// route picked).
    #[inline]
    pub fn outbound(&mut self, packet: &[u8], source: u64, now: Instant) -> Verdict {
        self.check(Direction::Outbound, packet, source, now)
    }

    /// Removes expired flows (also done lazily; call it from a periodic
    /// timer to return memory). Returns how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.table.expire(now)
    }

    pub fn stats(&self) -> FilterStats {
        FilterStats {
            flows: self.table.len() as u64,
            ..self.stats.clone()
        }
    }

    /// Packets dropped for `reason` so far.
    pub fn drops(&self, reason: FilterDrop) -> u64 {
        self.drops[reason as usize]
    }

    pub fn check(&mut self, dir: Direction, packet: &[u8], source: u64, now: Instant) -> Verdict {
        let v = self.decide(dir, packet, source, now);
        if let Verdict::Drop(r) = v {
            self.drops[r as usize] += 1;
        }
        v
    }

    fn decide(&mut self, dir: Direction, packet: &[u8], source: u64, now: Instant) -> Verdict {
        if self.fast.is_none() {
            self.stats.accepted_untracked += 1;
            return Verdict::Accept;
        }
        match parse(packet) {
            Ok(p) => self.decide_parsed(dir, &p, source, now),
            Err(r) => Verdict::Drop(r),
        }
    }

    /// [`Filter::check`] on a packet parsed already (the sharded filter
    /// parses once to pick the shard).
    fn check_parsed(&mut self, dir: Direction, p: &Parsed, source: u64, now: Instant) -> Verdict {
        let v = self.decide_parsed(dir, p, source, now);
        if let Verdict::Drop(r) = v {
            self.drops[r as usize] += 1;
        }
        v
    }

    fn decide_parsed(&mut self, dir: Direction, p: &Parsed, source: u64, now: Instant) -> Verdict {
        let Filter {
            fast, table, stats, ..
        } = self;
        let Some(rules) = fast.as_ref() else {
            stats.accepted_untracked += 1;
            return Verdict::Accept;
        };
        let start = p.flow_start();
        let allowed = |rules: &FastRules| {
            let list = match dir {
                Direction::Inbound => &rules.inbound,
                Direction::Outbound => &rules.outbound,
            };
            list.iter().any(|r| r.allows(&start))
        };
        let denied = || match dir {
            Direction::Outbound => FilterDrop::OutboundDenied,
            Direction::Inbound if p.looks_like_reply() => FilterDrop::NoState,
            Direction::Inbound => FilterDrop::NotAllowed,
        };
        match p.kind {
            Kind::IcmpError | Kind::LaterFragment => {
                stats.accepted_untracked += 1;
                return Verdict::Accept;
            }
            Kind::Other | Kind::IcmpOther { .. } => {
                if allowed(rules) {
                    stats.accepted_untracked += 1;
                    return Verdict::Accept;
                }
                return Verdict::Drop(denied());
            }
            _ => {}
        }
        let key = p.key(dir);
        let local_side = dir == Direction::Outbound;
        if let Some(e) = table.get(&key, now) {
            // `original`: the packet goes the way the flow began.
            let original = e.local_initiated == local_side;
            let fits = match p.kind {
                Kind::EchoRequest { .. } => original,
                Kind::EchoReply { .. } => !original,
                _ => true,
            };
            if fits {
                if !original {
                    e.replied = true;
                }
                if let Kind::Tcp { flags: f } = p.kind {
                    if f & (flags::FIN | flags::RST) != 0 {
                        e.closing = true;
                    }
                }
                e.expires = now + timeout(p.proto, e);
                stats.accepted_tracked += 1;
                return Verdict::Accept;
            }
            // An echo the wrong way round for this flow: judged by the
            // rules alone, not tracked.
            if allowed(rules) {
                stats.accepted_untracked += 1;
                return Verdict::Accept;
            }
            return Verdict::Drop(denied());
        }
        if matches!(p.kind, Kind::EchoReply { .. }) || !allowed(rules) {
            return Verdict::Drop(denied());
        }
        let mut entry = Entry {
            source,
            expires: now,
            local_initiated: local_side,
            replied: false,
            closing: matches!(p.kind, Kind::Tcp { flags: f } if f & (flags::FIN | flags::RST) != 0),
        };
        entry.expires = now + timeout(p.proto, &entry);
        match table.insert(key, entry, now) {
            Ok(()) => {
                stats.accepted_new += 1;
                Verdict::Accept
            }
            Err(Refused::Full) => Verdict::Drop(FilterDrop::TableFull),
            Err(Refused::SourceShare) => Verdict::Drop(FilterDrop::SourceShare),
        }
    }
}

fn timeout(proto: u8, e: &Entry) -> std::time::Duration {
    match proto {
        PROTO_TCP if e.closing => TCP_CLOSING_TIMEOUT,
        PROTO_TCP if e.replied => TCP_ESTABLISHED_TIMEOUT,
        PROTO_TCP => TCP_UNREPLIED_TIMEOUT,
        PROTO_UDP if e.replied => UDP_REPLIED_TIMEOUT,
        PROTO_UDP => UDP_UNREPLIED_TIMEOUT,
        _ => ICMP_TIMEOUT,
    }
}
