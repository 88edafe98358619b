//! AllowedIPs against a naive model: a list of (prefix, value) scanned for
//! the longest containing prefix. Any difference in a lookup, in the
//! listing, or in what an insert displaced is a bug.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::router::{AllowedIps, IpPrefix};

#[derive(Arbitrary, Debug)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
    /// Near the previous address, so prefixes overlap often.
    V4Near(u8),
    V6Near(u8),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Insert { addr: Addr, len: u8, value: u8 },
    RemoveValue(u8),
    Lookup(Addr),
}

fn addr(a: &Addr) -> IpAddr {
    match a {
        Addr::V4(b) => IpAddr::from(*b),
        Addr::V6(b) => IpAddr::from(*b),
        Addr::V4Near(x) => IpAddr::from([10, 0, x & 0x0f, *x]),
        Addr::V6Near(x) => {
            let mut b = [0u8; 16];
            b[0] = 0xfd;
            b[14] = x & 0x0f;
            b[15] = *x;
            IpAddr::from(b)
        }
    }
}

fn naive(model: &[(IpPrefix, u8)], a: IpAddr) -> Option<u8> {
    model
        .iter()
        .filter(|(p, _)| p.contains(a))
        .max_by_key(|(p, _)| p.len())
        .map(|&(_, v)| v)
}

fuzz_target!(|ops: Vec<Op>| {
    let mut t = AllowedIps::new();
    let mut model: Vec<(IpPrefix, u8)> = Vec::new();
    for op in ops.iter().take(512) {
        match op {
            Op::Insert {
                addr: a,
                len,
                value,
            } => {
                let a = addr(a);
                let max = if a.is_ipv4() { 33 } else { 129 };
                let Ok(p) = IpPrefix::new(a, len % max) else {
                    panic!("valid length refused");
                };
                let p = p.network();
                let before = model.iter().find(|(q, _)| *q == p).map(|&(_, v)| v);
                assert_eq!(t.insert(p, *value), before, "insert {p}");
                model.retain(|(q, _)| *q != p);
                model.push((p, *value));
            }
            Op::RemoveValue(v) => {
                let n = model.iter().filter(|(_, w)| w == v).count();
                assert_eq!(t.remove_value(v), n);
                model.retain(|(_, w)| w != v);
            }
            Op::Lookup(a) => {
                let a = addr(a);
                assert_eq!(t.lookup(a).copied(), naive(&model, a), "lookup {a}");
            }
        }
        assert_eq!(t.len(), model.len());
    }
    let mut got = t.iter();
    got.sort();
    model.sort();
    assert_eq!(got, model);
});
