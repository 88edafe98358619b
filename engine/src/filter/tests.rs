use std::time::Duration;

use super::*;
use crate::wire::tcp::flags::{ACK, FIN, RST, SYN};

const LOCAL: [u8; 4] = [100, 64, 0, 1];
const PEER: [u8; 4] = [100, 64, 0, 2];
const OTHER: [u8; 4] = [100, 64, 0, 3];

fn prefix(s: &str) -> crate::router::IpPrefix {
    s.parse().unwrap()
}

fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let len = 20 + l4.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(l4);
    p
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, fl: u8) -> Vec<u8> {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = fl;
    v4(src, dst, PROTO_TCP, &t)
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut u = [0u8; 12];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&12u16.to_be_bytes());
    v4(src, dst, PROTO_UDP, &u)
}

fn icmp(src: [u8; 4], dst: [u8; 4], ty: u8, id: u16) -> Vec<u8> {
    let mut i = [0u8; 8];
    i[0] = ty;
    i[4..6].copy_from_slice(&id.to_be_bytes());
    v4(src, dst, PROTO_ICMP, &i)
}

/// Peers in 100.64.0.2/32 may reach this node (100.64.0.1) on TCP 22 and
/// 8000-8099, UDP 53 and ICMP echo; the host may start anything.
fn rules() -> Arc<FilterRules> {
    let me = prefix("100.64.0.1/32");
    Arc::new(FilterRules {
        inbound: vec![
            Rule {
                srcs: vec![prefix("100.64.0.2/32")],
                dsts: vec![
                    (me, PortRange::single(22)),
                    (me, PortRange::new(8000, 8099)),
                ],
                protos: ByteSet::of(&[PROTO_TCP]),
                icmp_types: ByteSet::EMPTY,
            },
            Rule {
                srcs: vec![prefix("100.64.0.2/32")],
                dsts: vec![(me, PortRange::single(53))],
                protos: ByteSet::of(&[PROTO_UDP, PROTO_ICMP]),
                icmp_types: default_icmp_types(),
            },
        ],
        outbound: vec![Rule::allow_all()],
    })
}

fn filter(limits: ConntrackLimits) -> Filter {
    let mut f = Filter::new(limits);
    f.set_rules(Some(rules()));
    f
}

fn t0() -> Instant {
    Instant::now()
}

#[test]
fn no_rules_allows_everything_untracked() {
    let mut f = Filter::default();
    let now = t0();
    assert!(f
        .inbound(&tcp(OTHER, 1, LOCAL, 9999, SYN), 1, now)
        .is_accept());
    assert!(f.inbound(b"not ip", 1, now).is_accept());
    assert_eq!(f.stats().flows, 0);
    assert_eq!(f.stats().accepted_untracked, 2);
}

#[test]
fn allowed_and_denied_ports() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    for port in [22, 8000, 8050, 8099] {
        assert!(
            f.inbound(&tcp(PEER, 40000, LOCAL, port, SYN), 1, now)
                .is_accept(),
            "{port}"
        );
    }
    for port in [21, 23, 7999, 8100, 53] {
        assert_eq!(
            f.inbound(&tcp(PEER, 40000, LOCAL, port, SYN), 1, now),
            Verdict::Drop(FilterDrop::NotAllowed),
            "{port}"
        );
    }
    // UDP 53 is allowed, UDP 22 is not; another source gets nothing.
    assert!(f.inbound(&udp(PEER, 5000, LOCAL, 53), 1, now).is_accept());
    assert!(!f.inbound(&udp(PEER, 5000, LOCAL, 22), 1, now).is_accept());
    assert!(!f
        .inbound(&tcp(OTHER, 40000, LOCAL, 22, SYN), 2, now)
        .is_accept());
    assert_eq!(f.drops(FilterDrop::NotAllowed), 7);
    assert_eq!(f.stats().accepted_new, 5);
}

#[test]
fn replies_of_allowed_flows_pass_both_ways() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    // Inbound-started: the host's answer and the rest of the flow pass.
    assert!(f
        .inbound(&tcp(PEER, 40000, LOCAL, 22, SYN), 1, now)
        .is_accept());
    assert!(f
        .outbound(&tcp(LOCAL, 22, PEER, 40000, SYN | ACK), 1, now)
        .is_accept());
    assert!(f
        .inbound(&tcp(PEER, 40000, LOCAL, 22, ACK), 1, now)
        .is_accept());
    // Outbound-started, to a port no inbound rule opens: replies pass.
    assert!(f
        .outbound(&tcp(LOCAL, 50000, OTHER, 443, SYN), 2, now)
        .is_accept());
    assert!(f
        .inbound(&tcp(OTHER, 443, LOCAL, 50000, SYN | ACK), 2, now)
        .is_accept());
    assert!(f
        .outbound(&udp(LOCAL, 6000, OTHER, 9999), 2, now)
        .is_accept());
    assert!(f
        .inbound(&udp(OTHER, 9999, LOCAL, 6000), 2, now)
        .is_accept());
    assert_eq!(f.stats().accepted_new, 3);
    assert_eq!(f.stats().accepted_tracked, 4);
    assert_eq!(f.stats().flows, 3);
}

#[test]
fn unsolicited_reply_is_denied() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    // A SYN-ACK and a bare ACK for flows nobody started.
    for fl in [SYN | ACK, ACK, ACK | FIN, ACK | RST] {
        assert_eq!(
            f.inbound(&tcp(OTHER, 443, LOCAL, 50000, fl), 2, now),
            Verdict::Drop(FilterDrop::NoState),
            "flags {fl:#x}"
        );
    }
    // A UDP "reply" from the wrong port of a tracked peer.
    assert!(f
        .outbound(&udp(LOCAL, 6000, OTHER, 9999), 2, now)
        .is_accept());
    assert_eq!(
        f.inbound(&udp(OTHER, 9998, LOCAL, 6000), 2, now),
        Verdict::Drop(FilterDrop::NotAllowed)
    );
    assert_eq!(f.drops(FilterDrop::NoState), 4);
    assert_eq!(f.stats().flows, 1);
}

#[test]
fn icmp_echo_reply_only_after_request() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    assert_eq!(
        f.inbound(&icmp(OTHER, LOCAL, 0, 7), 2, now),
        Verdict::Drop(FilterDrop::NoState)
    );
    assert!(f.outbound(&icmp(LOCAL, OTHER, 8, 7), 2, now).is_accept());
    assert!(f.inbound(&icmp(OTHER, LOCAL, 0, 7), 2, now).is_accept());
    // Another identifier is another flow.
    assert!(!f.inbound(&icmp(OTHER, LOCAL, 0, 8), 2, now).is_accept());
    // OTHER may not ping us; PEER may, and our reply passes.
    assert!(!f.inbound(&icmp(OTHER, LOCAL, 8, 9), 2, now).is_accept());
    assert!(f.inbound(&icmp(PEER, LOCAL, 8, 9), 1, now).is_accept());
    assert!(f.outbound(&icmp(LOCAL, PEER, 0, 9), 1, now).is_accept());
    // A reply the host never got a request for does not leave either.
    assert!(!f.outbound(&icmp(LOCAL, PEER, 0, 10), 1, now).is_accept());
    // Errors pass (path MTU discovery), as in Tailscale.
    assert!(f.inbound(&icmp(OTHER, LOCAL, 3, 0), 2, now).is_accept());
}

#[test]
fn flows_expire_by_the_time_passed_in() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    assert!(f
        .outbound(&udp(LOCAL, 6000, OTHER, 9999), 2, now)
        .is_accept());
    let before = now + UDP_UNREPLIED_TIMEOUT - Duration::from_millis(1);
    assert!(f
        .inbound(&udp(OTHER, 9999, LOCAL, 6000), 2, before)
        .is_accept());
    // Replied: the longer timeout counts from the last packet.
    let late = before + UDP_REPLIED_TIMEOUT;
    assert_eq!(
        f.inbound(&udp(OTHER, 9999, LOCAL, 6000), 2, late),
        Verdict::Drop(FilterDrop::NotAllowed)
    );
    assert_eq!(f.stats().flows, 0);
    // A closed TCP flow goes after the closing timeout, not 5 days.
    assert!(f
        .outbound(&tcp(LOCAL, 50000, OTHER, 443, SYN), 2, now)
        .is_accept());
    assert!(f
        .inbound(&tcp(OTHER, 443, LOCAL, 50000, SYN | ACK), 2, now)
        .is_accept());
    assert!(f
        .outbound(&tcp(LOCAL, 50000, OTHER, 443, FIN | ACK), 2, now)
        .is_accept());
    assert_eq!(f.expire(now + TCP_CLOSING_TIMEOUT), 1);
    assert_eq!(f.stats().flows, 0);
}

#[test]
fn full_table_drops_and_counts_without_growing() {
    let limits = ConntrackLimits {
        capacity: 8,
        per_source: 8,
    };
    let mut f = filter(limits);
    let now = t0();
    for port in 0..8 {
        assert!(f
            .outbound(&udp(LOCAL, 1000 + port, OTHER, 53), 2, now)
            .is_accept());
    }
    // No live flow is evicted for a new one: the newcomer is dropped.
    for i in 0..100 {
        assert_eq!(
            f.inbound(&tcp(PEER, 40000 + i, LOCAL, 22, SYN), 1, now),
            Verdict::Drop(FilterDrop::TableFull)
        );
        assert_eq!(f.stats().flows, 8);
    }
    assert_eq!(f.drops(FilterDrop::TableFull), 100);
    // Tracked flows still pass while full.
    assert!(f.inbound(&udp(OTHER, 53, LOCAL, 1000), 2, now).is_accept());
    // Once the unreplied ones expire, room comes back.
    let later = now + UDP_UNREPLIED_TIMEOUT;
    assert!(f
        .inbound(&tcp(PEER, 40000, LOCAL, 22, SYN), 1, later)
        .is_accept());
    assert_eq!(f.stats().flows, 2);
}

#[test]
fn one_source_cannot_take_more_than_its_share() {
    let limits = ConntrackLimits {
        capacity: 64,
        per_source: 16,
    };
    let mut f = filter(limits);
    let now = t0();
    // The attacker (source 1) floods new flows on an allowed port.
    let mut admitted = 0;
    for i in 0..1000u16 {
        if f.inbound(&tcp(PEER, 1024 + i, LOCAL, 8000, SYN), 1, now)
            .is_accept()
        {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 16);
    assert_eq!(f.drops(FilterDrop::SourceShare), 1000 - 16);
    assert_eq!(f.stats().flows, 16);
    // Another source, and the host, still get in.
    for i in 0..16u16 {
        assert!(f
            .outbound(&tcp(LOCAL, 2000 + i, OTHER, 443, SYN), 2, now)
            .is_accept());
    }
    assert_eq!(f.stats().flows, 32);
}

#[test]
fn new_rules_apply_to_new_flows_and_keep_tracked_ones() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    assert!(f
        .inbound(&tcp(PEER, 40000, LOCAL, 22, SYN), 1, now)
        .is_accept());
    assert!(f
        .outbound(&tcp(LOCAL, 22, PEER, 40000, SYN | ACK), 1, now)
        .is_accept());
    // The new policy allows nothing inbound.
    f.set_rules(Some(Arc::new(FilterRules {
        inbound: vec![],
        outbound: vec![Rule::allow_all()],
    })));
    assert!(!f
        .inbound(&tcp(PEER, 40001, LOCAL, 22, SYN), 1, now)
        .is_accept());
    // The established flow continues (Tailscale keeps state across swaps).
    assert!(f
        .inbound(&tcp(PEER, 40000, LOCAL, 22, ACK), 1, now)
        .is_accept());
    // No rules at all: allow-all and the table is emptied.
    f.set_rules(None);
    assert_eq!(f.stats().flows, 0);
    assert!(f.inbound(&tcp(OTHER, 1, LOCAL, 2, SYN), 2, now).is_accept());
}

#[test]
fn outbound_denied_fails_fast() {
    let mut f = Filter::default();
    f.set_rules(Some(Arc::new(FilterRules {
        inbound: vec![],
        outbound: vec![Rule {
            srcs: vec![prefix("100.64.0.1/32")],
            dsts: vec![(prefix("100.64.0.2/32"), PortRange::single(443))],
            protos: ByteSet::of(&[PROTO_TCP]),
            icmp_types: ByteSet::EMPTY,
        }],
    })));
    let now = t0();
    assert!(f
        .outbound(&tcp(LOCAL, 5000, PEER, 443, SYN), 1, now)
        .is_accept());
    assert_eq!(
        f.outbound(&tcp(LOCAL, 5000, PEER, 80, SYN), 1, now),
        Verdict::Drop(FilterDrop::OutboundDenied)
    );
    assert_eq!(
        f.outbound(&tcp(LOCAL, 5000, OTHER, 443, SYN), 2, now),
        Verdict::Drop(FilterDrop::OutboundDenied)
    );
}

#[test]
fn malformed_and_fragments() {
    let mut f = filter(ConntrackLimits::default());
    let now = t0();
    let mut short = tcp(PEER, 40000, LOCAL, 22, SYN);
    short.truncate(30);
    short[2..4].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(
        f.inbound(&short, 1, now),
        Verdict::Drop(FilterDrop::Malformed)
    );
    assert_eq!(
        f.inbound(&[0x45], 1, now),
        Verdict::Drop(FilterDrop::Malformed)
    );
    // A later fragment passes; an offset-1 TCP fragment does not.
    let mut frag = tcp(OTHER, 1, LOCAL, 9, ACK);
    frag[7] = 2;
    assert!(f.inbound(&frag, 2, now).is_accept());
    frag[7] = 1;
    assert_eq!(
        f.inbound(&frag, 2, now),
        Verdict::Drop(FilterDrop::Fragment)
    );
    // Untracked protocols need an all-ports rule: none here.
    assert_eq!(
        f.inbound(&v4(PEER, LOCAL, 47, &[0; 8]), 1, now),
        Verdict::Drop(FilterDrop::NotAllowed)
    );
}

#[test]
fn ipv6_flows_are_tracked() {
    let me = prefix("fd7a::1/128");
    let mut f = Filter::default();
    f.set_rules(Some(Arc::new(FilterRules {
        inbound: vec![Rule {
            srcs: vec![prefix("fd7a::/64")],
            dsts: vec![(me, PortRange::single(80))],
            protos: ByteSet::of(&[PROTO_TCP]),
            icmp_types: ByteSet::EMPTY,
        }],
        outbound: vec![],
    })));
    let pkt = |src: u8, dst: u8, sport: u16, dport: u16, fl: u8| {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&20u16.to_be_bytes());
        p[6] = PROTO_TCP;
        p[8..10].copy_from_slice(&[0xfd, 0x7a]);
        p[23] = src;
        p[24..26].copy_from_slice(&[0xfd, 0x7a]);
        p[39] = dst;
        p[40..42].copy_from_slice(&sport.to_be_bytes());
        p[42..44].copy_from_slice(&dport.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = fl;
        p
    };
    let now = t0();
    assert!(f.inbound(&pkt(2, 1, 4000, 80, SYN), 1, now).is_accept());
    assert!(f
        .outbound(&pkt(1, 2, 80, 4000, SYN | ACK), 1, now)
        .is_accept());
    assert!(!f.inbound(&pkt(2, 1, 4000, 81, SYN), 1, now).is_accept());
    // The host may start nothing here (no outbound rule).
    assert_eq!(
        f.outbound(&pkt(1, 2, 5000, 80, SYN), 1, now),
        Verdict::Drop(FilterDrop::OutboundDenied)
    );
}

#[test]
fn prefixes_match_their_own_family_only() {
    let rule = |src: &str| Rule {
        srcs: vec![prefix(src)],
        dsts: vec![
            (prefix("0.0.0.0/0"), PortRange::ALL),
            (prefix("::/0"), PortRange::ALL),
        ],
        protos: ByteSet::ALL,
        icmp_types: ByteSet::ALL,
    };
    let start = |src: &str, dst: &str| FlowStart {
        proto: PROTO_TCP,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        port: Some(1),
        icmp_type: None,
    };
    let v6_any = FilterRules {
        inbound: vec![rule("::/0")],
        outbound: vec![],
    };
    // IPv4 is mapped into ::ffff:0:0/96 inside the filter: ::/0 must not
    // hold it, nor 0.0.0.0/0 an IPv6 address.
    assert!(!v6_any.allows_inbound(&start("100.64.0.2", "100.64.0.1")));
    assert!(v6_any.allows_inbound(&start("fd7a::2", "fd7a::1")));
    let v4_any = FilterRules {
        inbound: vec![rule("0.0.0.0/0")],
        outbound: vec![],
    };
    assert!(v4_any.allows_inbound(&start("100.64.0.2", "100.64.0.1")));
    assert!(!v4_any.allows_inbound(&start("::ffff:100.64.0.2", "fd7a::1")));
    assert!(!v4_any.allows_inbound(&start("fd7a::2", "fd7a::1")));
    let narrow = FilterRules {
        inbound: vec![rule("10.42.1.0/24")],
        outbound: vec![],
    };
    assert!(narrow.allows_inbound(&start("10.42.1.255", "100.64.0.1")));
    assert!(!narrow.allows_inbound(&start("10.42.2.0", "100.64.0.1")));
}
