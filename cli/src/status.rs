//! `meshvpn status [-i IFNAME] [--metrics ADDR]`: per peer, the node subnet
//! (its AllowedIPs), endpoint, path (udp or relay), last handshake, bytes;
//! with `--metrics` (the daemon's `--metrics-listen` address) also the
//! handshake round trip and drops. Reads the UAPI, as `wg show` does, and
//! the daemon's `get=meshvpn-paths` for the peers' NAT candidates and the
//! time since the last STUN discovery round.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use meshvpn_engine::peer::PeerPath;

use crate::CliResult;

#[derive(Args)]
pub struct StatusArgs {
    /// The interface.
    #[arg(short, long, env = "MESHVPN_FLANNEL_INTERFACE", default_value = crate::flannel::DEFAULT_INTERFACE)]
    interface: String,
    /// The daemon's --metrics-listen address, for RTT and drops.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("--metrics {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.take(64 << 20)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// The value of the series `name` whose labels include `public_key="key"`
/// and, for drops, summed over reasons.
fn metric(text: &str, name: &str, key: &str) -> Option<f64> {
    let label = format!("public_key=\"{key}\"");
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with(name) && line[name.len()..].starts_with('{') && line.contains(&label) {
            let v: f64 = line.rsplit(' ').next()?.parse().ok()?;
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// The label `want` and value of each series `name` whose `peer` label
/// is `key` (the NAT series label the peer as `peer`, not `public_key`).
fn labels_values(text: &str, name: &str, key: &str, want: &str) -> Vec<(String, f64)> {
    let peer = format!("peer=\"{key}\"");
    let start = format!("{want}=\"");
    let mut out = Vec::new();
    for line in text.lines() {
        if !(line.starts_with(name) && line[name.len()..].starts_with('{') && line.contains(&peer))
        {
            continue;
        }
        let Some(i) = line.find(&start) else { continue };
        let rest = &line[i + start.len()..];
        let Some(end) = rest.find('"') else { continue };
        let v = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        out.push((rest[..end].to_owned(), v));
    }
    out
}

fn labels(text: &str, name: &str, key: &str, want: &str) -> Vec<String> {
    labels_values(text, name, key, want)
        .into_iter()
        .map(|(l, _)| l)
        .collect()
}

/// The value of `name` for peer `key`, `path` and `dir` (0 when absent).
fn path_dir_value(text: &str, name: &str, key: &str, path: &str, dir: &str) -> f64 {
    let (peer, path, dir) = (
        format!("peer=\"{key}\""),
        format!("path=\"{path}\""),
        format!("dir=\"{dir}\""),
    );
    text.lines()
        .find(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with('{')
                && l.contains(&peer)
                && l.contains(&path)
                && l.contains(&dir)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn metric_peer(text: &str, name: &str, key: &str) -> Option<f64> {
    let peer = format!("peer=\"{key}\"");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(&peer))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn ago(t: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if t.is_zero() {
        return "never".into();
    }
    format!("{} s ago", now.saturating_sub(t).as_secs())
}

/// What `get=meshvpn-paths` says: the time since the last discovery
/// round, and per peer (hex key) its candidates. Unknown keys are
/// skipped, as `wg` skips them.
#[derive(Debug, Default, PartialEq)]
struct Paths {
    last_discovery_ms: Option<u64>,
    /// The address the relay sees us come from, and how often its IP changed.
    relay_observed: Option<String>,
    relay_ip_changes: Option<u64>,
    peers: Vec<(String, Vec<String>)>,
}

fn parse_paths(text: &str) -> Paths {
    let mut p = Paths::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match (k, p.peers.last_mut()) {
            ("last_discovery_ms", _) => p.last_discovery_ms = v.parse().ok(),
            ("relay_observed", None) => p.relay_observed = Some(v.to_owned()),
            ("relay_ip_changes", None) => p.relay_ip_changes = v.parse().ok(),
            ("public_key", _) => p.peers.push((v.to_owned(), Vec::new())),
            ("candidate", Some(peer)) => peer.1.push(v.to_owned()),
            _ => {}
        }
    }
    p
}

pub fn run(a: StatusArgs) -> CliResult {
    let reply = crate::flannel::uapi_get(&a.interface)?;
    // An older daemon does not know the request: no candidates shown.
    let paths = parse_paths(&crate::flannel::uapi_paths(&a.interface).unwrap_or_default());
    let metrics = a.metrics.map(scrape).transpose()?;
    println!(
        "interface {}: public key {}, port {}, {} peers",
        a.interface,
        reply
            .private_key
            .as_ref()
            .map_or("(none)".into(), |k| k.public_key().to_base64()),
        reply.listen_port,
        reply.peers.len()
    );
    if let Some(ms) = paths.last_discovery_ms {
        println!("  last STUN discovery round {} s ago", ms / 1000);
    } else if let Some(age) = metrics.as_deref().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("meshvpn_nat_discovery_age_seconds{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    }) {
        println!("  last STUN discovery round {age:.0} s ago");
    }
    if let Some(a) = &paths.relay_observed {
        println!(
            "  the relay sees us at {a} (public IP changed {} times)",
            paths.relay_ip_changes.unwrap_or(0)
        );
    }
    for p in &reply.peers {
        let key = p.public_key.to_base64();
        let subnets: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
        let mut extra = String::new();
        // The peer's NAT candidates from the daemon itself (no --metrics
        // needed); the metrics page's are shown only without them.
        let hex = p.public_key.to_hex();
        let own = paths.peers.iter().find(|q| q.0 == hex).map(|q| &q.1);
        if let Some(m) = &metrics {
            let rtt = metric(m, "meshvpn_peer_handshake_rtt_seconds", &key).unwrap_or(0.0);
            let drops = metric(m, "meshvpn_peer_drops_total", &key).unwrap_or(0.0);
            extra = format!(", rtt {:.1} ms, drops {drops}", rtt * 1000.0);
            // NAT traversal: the peer's candidates, probes, and the path
            // the policy chose with each path's round trip.
            let cands = labels(m, "meshvpn_nat_candidate", &key, "address");
            if !cands.is_empty() {
                let probes = metric_peer(m, "meshvpn_nat_peer_probes_total", &key).unwrap_or(0.0);
                let switches =
                    metric_peer(m, "meshvpn_nat_peer_rtt_switches_total", &key).unwrap_or(0.0);
                let chosen = labels(m, "meshvpn_nat_path_chosen", &key, "path");
                let rtts: Vec<String> =
                    labels_values(m, "meshvpn_nat_path_rtt_seconds", &key, "path")
                        .into_iter()
                        .map(|(p, v)| format!("{p} {:.1} ms", v * 1000.0))
                        .collect();
                if own.is_none() {
                    extra.push_str(&format!("\n  candidates {}", cands.join(",")));
                }
                extra.push_str(&format!(
                    "\n  chosen {}, probes {probes}, switches for round trip {switches}{}",
                    chosen.first().map_or("(none)", |s| s.as_str()),
                    if rtts.is_empty() {
                        String::new()
                    } else {
                        format!(", rtt {}", rtts.join(", "))
                    }
                ));
            }
            // Bytes and time per path kind (direct UDP, relay).
            let secs = labels_values(m, "meshvpn_nat_peer_path_seconds_total", &key, "path");
            if !secs.is_empty() {
                let per_path: Vec<String> = ["direct", "relay"]
                    .iter()
                    .map(|path| {
                        let dir = |d: &str| {
                            path_dir_value(m, "meshvpn_nat_peer_path_bytes_total", &key, path, d)
                        };
                        let t = secs.iter().find(|(p, _)| p == path).map_or(0.0, |v| v.1);
                        format!(
                            "{path} sent {} B received {} B for {t:.0} s",
                            dir("tx"),
                            dir("rx")
                        )
                    })
                    .collect();
                extra.push_str(&format!("\n  {}", per_path.join("; ")));
            }
        }
        let cands = match own {
            Some(c) if c.is_empty() => "\n  candidates (none)".to_owned(),
            Some(c) => format!("\n  candidates {}", c.join(",")),
            None => String::new(),
        };
        println!(
            "peer {key}\n  subnet {}  endpoint {}  path {}\n  handshake {}, sent {} B, received {} B{extra}{cands}",
            if subnets.is_empty() { "(none)".into() } else { subnets.join(",") },
            p.endpoint.map_or("(none)".into(), |e| e.to_string()),
            PeerPath::of(p.endpoint).name(),
            ago(p.last_handshake.unwrap_or_default()),
            p.tx_bytes,
            p.rx_bytes,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_series_of_one_peer_are_read_by_their_peer_label() {
        let page = "\
meshvpn_nat_candidate{interface=\"m0\",peer=\"self\",address=\"192.0.2.9:1\"} 1
meshvpn_nat_candidate{interface=\"m0\",peer=\"K1\",address=\"192.0.2.1:51820\"} 1
meshvpn_nat_candidate{interface=\"m0\",peer=\"K1\",address=\"203.0.113.1:40000\"} 1
meshvpn_nat_candidate{interface=\"m0\",peer=\"K2\",address=\"198.51.100.2:1\"} 1
meshvpn_nat_peer_probes_total{interface=\"m0\",peer=\"K1\"} 17
meshvpn_nat_path_rtt_seconds{interface=\"m0\",peer=\"K1\",path=\"relay\"} 0.122
";
        assert_eq!(
            labels(page, "meshvpn_nat_candidate", "K1", "address"),
            ["192.0.2.1:51820", "203.0.113.1:40000"]
        );
        assert_eq!(
            metric_peer(page, "meshvpn_nat_peer_probes_total", "K1"),
            Some(17.0)
        );
        assert_eq!(
            metric_peer(page, "meshvpn_nat_peer_probes_total", "K2"),
            None
        );
        assert_eq!(
            labels_values(page, "meshvpn_nat_path_rtt_seconds", "K1", "path"),
            [("relay".to_owned(), 0.122)]
        );
        let page = "\
meshvpn_nat_peer_path_bytes_total{interface=\"m0\",peer=\"K1\",path=\"direct\",dir=\"tx\"} 10
meshvpn_nat_peer_path_bytes_total{interface=\"m0\",peer=\"K1\",path=\"direct\",dir=\"rx\"} 20
meshvpn_nat_peer_path_bytes_total{interface=\"m0\",peer=\"K1\",path=\"relay\",dir=\"tx\"} 30
meshvpn_nat_peer_path_bytes_total{interface=\"m0\",peer=\"K2\",path=\"relay\",dir=\"rx\"} 40
";
        let p = parse_paths(
            "last_discovery_ms=2500\npublic_key=aa\npath=relay\ncandidate=192.0.2.1:51820\n\
             candidate=203.0.113.1:4000\nsome_future_key=1\npublic_key=bb\npath=udp\n",
        );
        assert_eq!(p.last_discovery_ms, Some(2500));
        assert_eq!((p.relay_observed, p.relay_ip_changes), (None, None));
        let p = parse_paths(
            "last_discovery_ms=2500\nrelay_observed=203.0.113.9:40002\nrelay_ip_changes=3\n\
             public_key=aa\ncandidate=192.0.2.1:51820\n",
        );
        assert_eq!(p.relay_observed.as_deref(), Some("203.0.113.9:40002"));
        assert_eq!(p.relay_ip_changes, Some(3));
        assert_eq!(p.peers[0].1, ["192.0.2.1:51820"]);
        let p = parse_paths(
            "last_discovery_ms=2500\npublic_key=aa\npath=relay\ncandidate=192.0.2.1:51820\n\
             candidate=203.0.113.1:4000\nsome_future_key=1\npublic_key=bb\npath=udp\n",
        );
        assert_eq!(
            p.peers,
            [
                (
                    "aa".to_owned(),
                    vec!["192.0.2.1:51820".to_owned(), "203.0.113.1:4000".to_owned()]
                ),
                ("bb".to_owned(), vec![])
            ]
        );
        let v = |k, p, d| path_dir_value(page, "meshvpn_nat_peer_path_bytes_total", k, p, d);
        assert_eq!(
            (
                v("K1", "direct", "tx"),
                v("K1", "direct", "rx"),
                v("K1", "relay", "tx")
            ),
            (10.0, 20.0, 30.0)
        );
        assert_eq!(
            (v("K1", "relay", "rx"), v("K2", "relay", "rx")),
            (0.0, 40.0)
        );
    }
}
