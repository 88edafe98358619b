//! The packet filter's text rules (`FilterRules::from_text`, what the C
//! ABI's `meshvpn_engine_set_filter` and Go's `SetFilter` hand in) on
//! arbitrary text. Never a panic. What parses has one rule per line that
//! is not blank or a comment, no backwards port range, and comes back
//! unchanged when written out in the documented format and parsed again;
//! the rules then install into a `Filter` and judge packets. What fails
//! names a line that exists, every line before it parses, and that line
//! alone fails with the same message (errors are local to their line).
#![no_main]

use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use meshvpn_engine::filter::{ByteSet, ConntrackLimits, Direction, Filter, FilterRules, Rule};

fn meaningful(line: &str) -> bool {
    !line.split('#').next().unwrap_or("").trim().is_empty()
}

fn bytes(set: &ByteSet) -> String {
    if *set == ByteSet::ALL {
        return "*".into();
    }
    let v: Vec<String> = (0..=255u8)
        .filter(|b| set.contains(*b))
        .map(|b| b.to_string())
        .collect();
    assert!(!v.is_empty(), "the text form cannot express an empty set");
    v.join(",")
}

fn render(dir: &str, r: &Rule, out: &mut String) {
    let srcs: Vec<String> = r.srcs.iter().map(|p| p.to_string()).collect();
    let dsts: Vec<String> = r
        .dsts
        .iter()
        .map(|(p, ports)| {
            if ports.is_all() {
                format!("{p}:*")
            } else {
                format!("{p}:{}-{}", ports.first, ports.last)
            }
        })
        .collect();
    writeln!(
        out,
        "{dir} from {} to {} proto {} icmp {}",
        srcs.join(","),
        dsts.join(","),
        bytes(&r.protos),
        bytes(&r.icmp_types)
    )
    .unwrap();
}

fn v4_tcp(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x02; // SYN
    p
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match FilterRules::from_text(text) {
        Ok(rules) => {
            let lines = text.lines().filter(|l| meaningful(l)).count();
            assert_eq!(
                rules.inbound.len() + rules.outbound.len(),
                lines,
                "one rule per line"
            );
            let mut again = String::new();
            for r in &rules.inbound {
                assert!(!r.srcs.is_empty() && !r.dsts.is_empty());
                render("in", r, &mut again);
            }
            for r in &rules.outbound {
                assert!(!r.srcs.is_empty() && !r.dsts.is_empty());
                render("out", r, &mut again);
            }
            for r in rules.inbound.iter().chain(&rules.outbound) {
                for (_, ports) in &r.dsts {
                    assert!(ports.first <= ports.last, "backwards range {ports:?}");
                }
            }
            let reparsed = FilterRules::from_text(&again)
                .unwrap_or_else(|e| panic!("written-out rules do not parse: {e}\n{again}"));
            assert_eq!(
                rules, reparsed,
                "write -> parse changed the rules:\n{again}"
            );
            let mut f = Filter::new(ConntrackLimits {
                capacity: 8,
                per_source: 4,
            });
            f.set_rules(Some(Arc::new(rules)));
            let now = Instant::now();
            for port in [22, 443] {
                let pkt = v4_tcp([100, 64, 0, 2], [100, 64, 0, 1], port);
                let _ = f.check(Direction::Inbound, &pkt, 1, now);
                let _ = f.check(Direction::Outbound, &pkt, 0, now);
            }
        }
        Err(e) => {
            let all: Vec<&str> = text.lines().collect();
            assert!(
                e.line >= 1 && e.line <= all.len(),
                "line {} of {}",
                e.line,
                all.len()
            );
            let before = all[..e.line - 1].join("\n");
            if let Err(b) = FilterRules::from_text(&before) {
                panic!(
                    "line {} reported, but line {} already fails: {b}",
                    e.line, b.line
                );
            }
            let alone = FilterRules::from_text(all[e.line - 1])
                .expect_err("the reported line parses on its own");
            assert_eq!(alone.line, 1);
            assert_eq!(alone.message, e.message, "the error depends on other lines");
        }
    }
});
