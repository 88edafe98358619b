//! A plain-text form of [`FilterRules`], for callers without the policy
//! compiler (the C ABI's `meshvpn_engine_set_filter`, the Go binding's
//! `SetFilter`). One rule per line; `#` starts a comment:
//!
//! ```text
//! # peers in 100.64.0.2/32 may reach SSH and a port range here
//! in  from 100.64.0.2/32,10.43.0.0/16 to 100.64.0.1/32:22,10.42.1.0/24:8000-8099 proto tcp
//! in  from 100.64.0.0/10 to 100.64.0.1/32 proto icmp
//! # this node may start anything
//! out from 0.0.0.0/0,::/0 to 0.0.0.0/0,::/0
//! ```
//!
//! `in` rules say which flows peers may start to this node, `out` rules
//! which flows the host may start (see [`FilterRules`]). A destination is
//! `PREFIX` (every port) or `PREFIX:PORTS` with `PORTS` one of `N`, `N-M`
//! or `*`; an IPv6 destination with ports needs its `/len`
//! (`fd00::/64:443`). `proto` lists `tcp`, `udp`, `icmp`, `icmpv6`, IP
//! protocol numbers or `*` (default: TCP, UDP, ICMP and ICMPv6, as a
//! policy without `proto`); `icmp` lists the ICMP types that may start a
//! flow, numbers or `*` (default: echo requests). Errors name the line.

use super::rules::{default_icmp_types, default_protocols, ByteSet, FilterRules, PortRange, Rule};
use crate::router::IpPrefix;
use crate::wire::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Why a rules text was refused: the 1-based line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RulesTextError {
    pub line: usize,
    pub message: String,
}

impl FilterRules {
    /// Parses the text form described in [`crate::filter::text`].
    pub fn from_text(text: &str) -> Result<FilterRules, RulesTextError> {
        let mut rules = FilterRules::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |message: String| RulesTextError {
                line: i + 1,
                message,
            };
            let (inbound, rule) = parse_rule(line).map_err(err)?;
            if inbound {
                rules.inbound.push(rule);
            } else {
                rules.outbound.push(rule);
            }
        }
        Ok(rules)
    }
}

fn parse_rule(line: &str) -> Result<(bool, Rule), String> {
    let mut words = line.split_whitespace();
    let inbound = match words.next() {
        Some("in") => true,
        Some("out") => false,
        Some(w) => return Err(format!("a rule starts with `in` or `out`, not `{w}`")),
        None => unreachable!("empty lines are skipped"),
    };
    let (mut srcs, mut dsts, mut protos, mut icmp) = (None, None, None, None);
    while let Some(key) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("`{key}` needs a value"))?;
        let slot_taken = match key {
            "from" => srcs.replace(list(value, prefix)?).is_some(),
            "to" => dsts.replace(list(value, destination)?).is_some(),
            "proto" => protos.replace(bytes(value, protocol)?).is_some(),
            "icmp" => icmp
                .replace(bytes(value, |s| number(s, "ICMP type"))?)
                .is_some(),
            _ => return Err(format!("unknown key `{key}` (from, to, proto, icmp)")),
        };
        if slot_taken {
            return Err(format!("`{key}` given twice"));
        }
    }
    let srcs = srcs.ok_or("a rule needs `from`")?;
    let dsts = dsts.ok_or("a rule needs `to`")?;
    Ok((
        inbound,
        Rule {
            srcs,
            dsts,
            protos: protos.unwrap_or_else(default_protocols),
            icmp_types: icmp.unwrap_or_else(default_icmp_types),
        },
    ))
}

fn list<T>(value: &str, item: fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    value.split(',').map(item).collect()
}

fn bytes(value: &str, item: fn(&str) -> Result<u8, String>) -> Result<ByteSet, String> {
    if value == "*" {
        return Ok(ByteSet::ALL);
    }
    let mut set = ByteSet::EMPTY;
    for v in value.split(',') {
        set.insert(item(v)?);
    }
    Ok(set)
}

fn prefix(s: &str) -> Result<IpPrefix, String> {
    s.parse::<IpPrefix>()
        .map_err(|e| format!("`{s}` is not an address or prefix: {e}"))
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a valid {what}"))
}

fn destination(s: &str) -> Result<(IpPrefix, PortRange), String> {
    // Ports follow the last `:` when what precedes it is an IPv4 address
    // or a prefix with its length (a bare IPv6 address is all colons).
    if let Some((p, ports)) = s.rsplit_once(':') {
        let has_ports = !ports.is_empty()
            && (ports == "*" || ports.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
            && (p.contains('/') || p.contains('.'));
        if has_ports {
            return Ok((prefix(p)?, port_range(ports)?));
        }
    }
    Ok((prefix(s)?, PortRange::ALL))
}

fn port_range(s: &str) -> Result<PortRange, String> {
    if s == "*" {
        return Ok(PortRange::ALL);
    }
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (number(a, "port")?, number(b, "port")?),
        None => {
            let p = number(s, "port")?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("port range `{s}` is backwards"));
    }
    Ok(PortRange::new(first, last))
}

fn protocol(s: &str) -> Result<u8, String> {
    Ok(match s {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "icmp" => PROTO_ICMP,
        "icmpv6" => PROTO_ICMPV6,
        _ => number(s, "protocol (tcp, udp, icmp, icmpv6, a number or *)")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn the_documented_example_parses_to_these_rules() {
        let text = "# peers
in  from 100.64.0.2/32,10.43.0.0/16 to 100.64.0.1/32:22,10.42.1.0/24:8000-8099 proto tcp
in  from 100.64.0.0/10 to 100.64.0.1/32 proto icmp   # pings
out from 0.0.0.0/0,::/0 to 0.0.0.0/0,fd00::/64:443,fd00::1 proto * icmp *
";
        let r = FilterRules::from_text(text).unwrap();
        assert_eq!(r.inbound.len(), 2);
        assert_eq!(r.outbound.len(), 1);
        let a = &r.inbound[0];
        assert_eq!(a.srcs, vec![p("100.64.0.2/32"), p("10.43.0.0/16")]);
        assert_eq!(
            a.dsts,
            vec![
                (p("100.64.0.1/32"), PortRange::single(22)),
                (p("10.42.1.0/24"), PortRange::new(8000, 8099)),
            ]
        );
        assert_eq!(a.protos, ByteSet::of(&[PROTO_TCP]));
        assert_eq!(a.icmp_types, default_icmp_types());
        assert_eq!(
            r.inbound[1].dsts,
            vec![(p("100.64.0.1/32"), PortRange::ALL)]
        );
        let o = &r.outbound[0];
        assert_eq!(
            o.dsts,
            vec![
                (p("0.0.0.0/0"), PortRange::ALL),
                (p("fd00::/64"), PortRange::single(443)),
                (p("fd00::1/128"), PortRange::ALL),
            ]
        );
        assert_eq!(o.protos, ByteSet::ALL);
        assert_eq!(o.icmp_types, ByteSet::ALL);
        assert_eq!(
            FilterRules::from_text("# nothing\n\n")
                .unwrap()
                .rule_count(),
            0
        );
    }

    #[test]
    fn errors_name_the_line_and_the_fault() {
        for (text, want) in [
            ("in from 1.2.3.4 to", "line 1: `to` needs a value"),
            (
                "\nallow from 1.2.3.4",
                "line 2: a rule starts with `in` or `out`",
            ),
            ("in to 1.2.3.4", "line 1: a rule needs `from`"),
            ("in from 1.2.3.4", "line 1: a rule needs `to`"),
            (
                "in from 1.2.3.4 to 1.2.3.4:80-20",
                "line 1: port range `80-20` is backwards",
            ),
            (
                "in from 1.2.3.4 to 1.2.3.4:99999",
                "line 1: `99999` is not a valid port",
            ),
            (
                "in from 1.2.3/8 to 1.2.3.4",
                "line 1: `1.2.3/8` is not an address",
            ),
            (
                "in from 1.2.3.4 to 1.2.3.4 proto sctp",
                "line 1: `sctp` is not a valid protocol",
            ),
            (
                "in from 1.2.3.4 to 1.2.3.4 from 1.1.1.1",
                "line 1: `from` given twice",
            ),
            (
                "in from 1.2.3.4 to 1.2.3.4 port 22",
                "line 1: unknown key `port`",
            ),
        ] {
            let e = FilterRules::from_text(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }

    /// Parsed rules filter as the same rules built by hand.
    #[test]
    fn parsed_rules_filter_packets() {
        use crate::filter::FlowStart;
        let r = FilterRules::from_text("in from 100.64.0.2 to 100.64.0.1:22 proto tcp").unwrap();
        let start = |port| FlowStart {
            proto: PROTO_TCP,
            src: "100.64.0.2".parse().unwrap(),
            dst: "100.64.0.1".parse().unwrap(),
            port: Some(port),
            icmp_type: None,
        };
        assert!(r.allows_inbound(&start(22)));
        assert!(!r.allows_inbound(&start(23)));
        assert!(!r.allows_outbound(&start(22)));
    }
}
