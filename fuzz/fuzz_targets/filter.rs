//! The packet filter on a script of packets, both directions, from a few
//! sources, with the clock stepping: raw bytes or well-formed TCP, UDP and
//! ICMP with fuzzer-chosen fields. Never a panic; the table never passes
//! its capacity; and a packet passes only if a model allows it: a rule of
//! its direction accepts it, or its flow passed before (either way), or
//! it is an ICMP error or a later IPv4 fragment. The model has no table
//! limits and no expiry, so it may allow more than the filter, never less.
#![no_main]

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::filter::{
    default_icmp_types, ByteSet, ConntrackLimits, Direction, Filter, FilterRules, FlowStart,
    PortRange, Rule,
};
use meshvpn_engine::IpPrefix;

const LIMITS: ConntrackLimits = ConntrackLimits {
    capacity: 16,
    per_source: 6,
};

#[derive(Arbitrary, Debug)]
enum Body {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Icmp { ty: u8, id: u16 },
    Other { proto: u8 },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Op {
    outbound: bool,
    v6: bool,
    /// Index into the addresses below, for each end.
    local: u8,
    remote: u8,
    source: u8,
    frag: u16,
    body: Body,
    /// Seconds the clock moves before this packet.
    step: u8,
}

fn p(s: &str) -> IpPrefix {
    s.parse().unwrap()
}

fn rules() -> FilterRules {
    FilterRules {
        inbound: vec![
            Rule {
                srcs: vec![p("100.64.0.2/32"), p("fd7a::2/128")],
                dsts: vec![(p("100.64.0.1/32"), PortRange::new(20, 25)), (p("fd7a::1/128"), PortRange::single(80))],
                protos: ByteSet::of(&[6, 17, 1, 58]),
                icmp_types: default_icmp_types(),
            },
            Rule {
                srcs: vec![p("10.43.0.0/16")],
                dsts: vec![(p("10.42.1.0/24"), PortRange::ALL)],
                protos: ByteSet::of(&[6, 47]),
                icmp_types: ByteSet::EMPTY,
            },
        ],
        outbound: vec![Rule {
            srcs: vec![p("100.64.0.1/32"), p("fd7a::1/128")],
            dsts: vec![(p("100.64.0.3/32"), PortRange::new(1000, 2000)), (p("fd7a::3/128"), PortRange::ALL)],
            protos: ByteSet::of(&[6, 17, 1, 58]),
            icmp_types: default_icmp_types(),
        }],
    }
}

const V4: [[u8; 4]; 5] = [[100, 64, 0, 1], [100, 64, 0, 2], [100, 64, 0, 3], [10, 43, 0, 9], [10, 42, 1, 5]];

fn addr(v6: bool, i: u8) -> Vec<u8> {
    let a = V4[i as usize % V4.len()];
    if v6 {
        let mut b = vec![0u8; 16];
        b[0] = 0xfd;
        b[1] = 0x7a;
        b[15] = a[3];
        b
    } else {
        a.to_vec()
    }
}

fn build(op: &Op) -> Vec<u8> {
    let (l4, proto): (Vec<u8>, u8) = match &op.body {
        Body::Raw(b) => return b.clone(),
        Body::Tcp { sport, dport, flags } => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = *flags;
            (t, 6)
        }
        Body::Udp { sport, dport } => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            (u, 17)
        }
        Body::Icmp { ty, id } => {
            let mut i = vec![0u8; 8];
            i[0] = *ty;
            i[4..6].copy_from_slice(&id.to_be_bytes());
            (i, if op.v6 { 58 } else { 1 })
        }
        Body::Other { proto } => (vec![0u8; 8], *proto),
    };
    let (src, dst) = if op.outbound {
        (addr(op.v6, op.local), addr(op.v6, op.remote))
    } else {
        (addr(op.v6, op.remote), addr(op.v6, op.local))
    };
    let mut pkt;
    if op.v6 {
        pkt = vec![0u8; 40];
        pkt[0] = 0x60;
        pkt[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        pkt[6] = proto;
        pkt[8..24].copy_from_slice(&src);
        pkt[24..40].copy_from_slice(&dst);
    } else {
        pkt = vec![0u8; 20];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        pkt[6..8].copy_from_slice(&(op.frag & 0x3fff).to_be_bytes());
        pkt[9] = proto;
        pkt[12..16].copy_from_slice(&src);
        pkt[16..20].copy_from_slice(&dst);
    }
    pkt.extend_from_slice(&l4);
    pkt
}

/// The model's own reading of a packet: (proto, src, dst, sport, dport,
/// icmp type, untracked-pass).
struct Seen {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    icmp: Option<u8>,
    always: bool,
}

fn read(b: &[u8]) -> Option<Seen> {
    let v = b.first()? >> 4;
    let (proto, src, dst, l4, frag_off): (u8, IpAddr, IpAddr, &[u8], u16) = match v {
        4 if b.len() >= 20 && (b[0] & 15) >= 5 && b.len() >= (b[0] & 15) as usize * 4 => {
            let ihl = (b[0] & 15) as usize * 4;
            let s: [u8; 4] = b[12..16].try_into().ok()?;
            let d: [u8; 4] = b[16..20].try_into().ok()?;
            (b[9], s.into(), d.into(), &b[ihl..], u16::from_be_bytes([b[6], b[7]]) & 0x1fff)
        }
        6 if b.len() >= 40 => {
            let s: [u8; 16] = b[8..24].try_into().ok()?;
            let d: [u8; 16] = b[24..40].try_into().ok()?;
            (b[6], s.into(), d.into(), &b[40..], 0)
        }
        _ => return None,
    };
    let mut s = Seen { proto, src, dst, sport: 0, dport: 0, icmp: None, always: false };
    if frag_off > 1 || (frag_off == 1 && proto != 6) {
        s.always = true;
        return Some(s);
    }
    let icmp = (proto == 1 && v == 4) || (proto == 58 && v == 6);
    if (proto == 6 || proto == 17) && l4.len() >= 4 {
        s.sport = u16::from_be_bytes([l4[0], l4[1]]);
        s.dport = u16::from_be_bytes([l4[2], l4[3]]);
    } else if icmp && l4.len() >= 4 {
        let ty = l4[0];
        s.icmp = Some(ty);
        let error = if v == 4 { matches!(ty, 3 | 11 | 12) } else { matches!(ty, 1..=4) };
        s.always = error;
        if l4.len() >= 6 {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (s.sport, s.dport) = (id, id);
        }
    }
    Some(s)
}

fuzz_target!(|ops: Vec<Op>| {
    let rules = Arc::new(rules());
    let mut f = Filter::new(LIMITS);
    f.set_rules(Some(rules.clone()));
    let mut now = Instant::now();
    // Flows that passed, as (proto, local, remote, local port, remote port).
    let mut passed: HashSet<(u8, IpAddr, IpAddr, u16, u16)> = HashSet::new();
    for op in ops.iter().take(256) {
        now += Duration::from_secs(op.step as u64);
        let pkt = build(op);
        let dir = if op.outbound { Direction::Outbound } else { Direction::Inbound };
        let verdict = f.check(dir, &pkt, op.source as u64 % 4, now);
        assert!(f.stats().flows <= LIMITS.capacity as u64);
        if !verdict.is_accept() {
            continue;
        }
        let s = read(&pkt).expect("an accepted packet is IP");
        let (local, remote, lp, rp) = if op.outbound {
            (s.src, s.dst, s.sport, s.dport)
        } else {
            (s.dst, s.src, s.dport, s.sport)
        };
        let key = (s.proto, local, remote, lp, rp);
        let start = FlowStart {
            proto: s.proto,
            src: s.src,
            dst: s.dst,
            port: (s.proto == 6 || s.proto == 17).then_some(s.dport),
            icmp_type: s.icmp,
        };
        let by_rule = if op.outbound { rules.allows_outbound(&start) } else { rules.allows_inbound(&start) };
        assert!(
            s.always || by_rule || passed.contains(&key),
            "passed without a rule or a flow: {op:?}"
        );
        passed.insert(key);
    }
});
