//! `meshvpn IFNAME --metrics-listen ADDR`: the daemon's counters as
//! Prometheus text (exposition format 0.0.4) on `GET /metrics`.
//!
//! Per-peer series follow the names of the WireGuard exporters operators
//! already scrape (prometheus_wireguard_exporter: `wireguard_sent_bytes_total`,
//! `wireguard_received_bytes_total`, `wireguard_latest_handshake_seconds`,
//! labels `interface`, `public_key`, `allowed_ips`), so their dashboards
//! work unchanged; the byte counts are exactly what `wg show` calls
//! transfer. meshvpn's own series (`meshvpn_*`) add the path (UDP or relay),
//! the handshake round trip and drops by reason, and the engine's counters.
//!
//! `meshvpn tunnel connect --metrics-listen ADDR` serves the agent's
//! counters the same way ([`render_agent`], `meshvpn_tunnel_agent_*`).
//!
//! The server is deliberately small: one thread, one connection at a time,
//! a bounded request ([`MAX_REQUEST_BYTES`]) with a read deadline
//! ([`REQUEST_TIMEOUT`]), so a slow or hostile scraper costs one thread and
//! a few KiB and nothing more. Listen on loopback or a private address: the
//! page names public keys and endpoints (never a private key).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use meshvpn_engine::peer::{DropReason, PeerPath};
use meshvpn_engine::supervisor::AgentStats;
use meshvpn_engine::Engine;

/// The most of a request read before answering (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long one scraper may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves the daemon's page: the engine's and its peers' counters.
    pub fn start(addr: SocketAddr, engine: Arc<Engine>, ifname: &str) -> std::io::Result<Self> {
        let ifname = ifname.to_owned();
        Self::start_page(addr, move || render(&engine, &ifname))
    }

    /// Serves the page `render` writes, afresh for each scrape.
    pub fn start_page(
        addr: SocketAddr,
        render: impl Fn() -> String + Send + 'static,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meshvpn-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(c) = conn {
                        let _ = serve(c, &render);
                    }
                }
            })?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
impl MetricsServer {
    /// Where it listens (the port, when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut c: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    c.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        if n == 0 || req.len() + n > MAX_REQUEST_BYTES {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
        ("200 OK", render())
    } else {
        ("404 Not Found", "try /metrics\n".to_owned())
    };
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A label value, escaped as the text format asks.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole page.
pub fn render(engine: &Engine, ifname: &str) -> String {
    let snapshot = engine.peer_snapshot();
    let mut out = String::with_capacity(1024 + snapshot.len() * 1024);
    let iface = esc(ifname);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };

    type Field = fn(&meshvpn_engine::peer::PeerStats) -> f64;
    let per_peer: [(&str, &str, &str, Field); 4] = [
        (
            "wireguard_sent_bytes_total",
            "counter",
            "Bytes sent to the peer (WireGuard datagrams; wg show transfer).",
            |s| s.tx_bytes as f64,
        ),
        (
            "wireguard_received_bytes_total",
            "counter",
            "Bytes received from the peer (WireGuard datagrams; wg show transfer).",
            |s| s.rx_bytes as f64,
        ),
        (
            "wireguard_latest_handshake_seconds",
            "gauge",
            "UNIX time of the last completed handshake, 0 if none.",
            |s| {
                s.last_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs() as f64)
            },
        ),
        (
            "meshvpn_peer_handshake_rtt_seconds",
            "gauge",
            "Round trip of the last handshake this side initiated, 0 if none.",
            |s| s.handshake_rtt_ms.map_or(0.0, |ms| f64::from(ms) / 1000.0),
        ),
    ];
    for (name, kind, help, field) in per_peer {
        family(&mut out, name, kind, help);
        for (cfg, stats) in &snapshot {
            let allowed: Vec<String> = cfg.allowed_ips.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                out,
                "{name}{{interface=\"{iface}\",public_key=\"{}\",allowed_ips=\"{}\"}} {}",
                esc(&cfg.public_key.to_base64()),
                esc(&allowed.join(",")),
                field(stats)
            );
        }
    }
    family(
        &mut out,
        "meshvpn_peer_path",
        "gauge",
        "1 for the path the peer's datagrams take now (udp or relay).",
    );
    for (cfg, _) in &snapshot {
        let now = PeerPath::of(cfg.endpoint);
        for path in [PeerPath::Udp, PeerPath::Relay] {
            let _ = writeln!(
                out,
                "meshvpn_peer_path{{interface=\"{iface}\",public_key=\"{}\",path=\"{}\"}} {}",
                esc(&cfg.public_key.to_base64()),
                path.name(),
                u8::from(now == path)
            );
        }
    }
    family(
        &mut out,
        "meshvpn_peer_drops_total",
        "counter",
        "Packets of the peer dropped, by reason.",
    );
    for (cfg, stats) in &snapshot {
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "meshvpn_peer_drops_total{{interface=\"{iface}\",public_key=\"{}\",reason=\"{}\"}} {}",
                esc(&cfg.public_key.to_base64()),
                reason.name(),
                stats.drops(reason)
            );
        }
    }
    let e = engine.stats();
    let engine_counters: [(&str, u64, &str); 9] = [
        (
            "rx_malformed",
            e.rx_malformed,
            "Datagrams that were not WireGuard messages.",
        ),
        (
            "rx_unknown_index",
            e.rx_unknown_index,
            "Messages for a session index nobody holds.",
        ),
        (
            "rx_unknown_peer",
            e.rx_unknown_peer,
            "Handshakes from keys that are not peers.",
        ),
        (
            "rx_invalid_mac",
            e.rx_invalid_mac,
            "Handshakes whose MAC did not verify.",
        ),
        (
            "cookie_replies_sent",
            e.cookie_replies_sent,
            "Cookie replies sent under load.",
        ),
        (
            "tx_malformed",
            e.tx_malformed,
            "Packets from the host that were not IP.",
        ),
        (
            "tx_no_route",
            e.tx_no_route,
            "Packets from the host to no peer's AllowedIPs.",
        ),
        (
            "udp_send_errors",
            e.udp_send_errors,
            "UDP sends that failed.",
        ),
        (
            "buffer_limit_drops",
            e.buffer_limit_drops,
            "Packets dropped at the buffer ceiling.",
        ),
    ];
    for (name, value, help) in engine_counters {
        let name = format!("meshvpn_engine_{name}_total");
        family(&mut out, &name, "counter", help);
        let _ = writeln!(out, "{name}{{interface=\"{iface}\"}} {value}");
    }
    // Every NAT counter, named and explained by its one declaration
    // (`NatStats`, which C and Go export too).
    let n = engine.nat_stats();
    for (field, value) in meshvpn_engine::wg::NatStats::FIELDS
        .iter()
        .zip(n.counters())
    {
        let name = format!("meshvpn_nat_{}_total", field.name);
        let help: Vec<&str> = field.doc.lines().map(str::trim).collect();
        family(&mut out, &name, "counter", &help.join(" "));
        let _ = writeln!(out, "{name}{{interface=\"{iface}\"}} {value}");
    }
    let status = engine.nat_status();
    family(
        &mut out,
        "meshvpn_nat_candidate",
        "gauge",
        "1 per NAT traversal candidate: ours (peer=\"self\") and each peer's as last received.",
    );
    let mut cands: Vec<(String, std::net::SocketAddr)> = status
        .candidates
        .iter()
        .map(|a| ("self".to_owned(), *a))
        .collect();
    for (key, list) in &status.peer_candidates {
        cands.extend(list.iter().map(|a| (key.to_base64(), *a)));
    }
    for (who, addr) in cands {
        let _ = writeln!(
            out,
            "meshvpn_nat_candidate{{interface=\"{iface}\",peer=\"{}\",address=\"{}\"}} 1",
            esc(&who),
            esc(&addr.to_string())
        );
    }
    if let Some(a) = status.relay_observed {
        family(
            &mut out,
            "meshvpn_nat_relay_observed",
            "gauge",
            "1 for the address the relay sees this node's session come from (its NAT's public address).",
        );
        let _ = writeln!(
            out,
            "meshvpn_nat_relay_observed{{interface=\"{iface}\",address=\"{}\"}} 1",
            esc(&a.to_string())
        );
    }
    let path_label = |e: &meshvpn_engine::device::Endpoint| match e {
        meshvpn_engine::device::Endpoint::Relay(_) => "relay".to_owned(),
        meshvpn_engine::device::Endpoint::Udp(a) => a.to_string(),
    };
    /// A per-peer counter family: name, help, and how to read it.
    type PeerCounter = (
        &'static str,
        &'static str,
        fn(&meshvpn_engine::device::PathSummary) -> u64,
    );
    let per_peer: [PeerCounter; 3] = [
        (
            "meshvpn_nat_peer_probes_total",
            "Probe datagrams sent to a peer's paths (probing rounds and round-trip measurements).",
            |s| s.probes_sent,
        ),
        (
            "meshvpn_nat_peer_measurements_total",
            "Round-trip measurements of a peer's paths.",
            |s| s.measures_sent,
        ),
        (
            "meshvpn_nat_peer_rtt_switches_total",
            "Times a peer was moved to a path with a lower round trip.",
            |s| s.rtt_switches,
        ),
    ];
    for (name, help, get) in per_peer {
        family(&mut out, name, "counter", help);
        for (key, s) in &status.peer_paths {
            let _ = writeln!(
                out,
                "{name}{{interface=\"{iface}\",peer=\"{}\"}} {}",
                esc(&key.to_base64()),
                get(s)
            );
        }
    }
    family(
        &mut out,
        "meshvpn_nat_path_rtt_seconds",
        "gauge",
        "The last round trip measured per peer and path (a path whose measurement went unanswered is left out).",
    );
    for (key, s) in &status.peer_paths {
        for (path, rtt) in &s.rtts {
            if let Some(rtt) = rtt {
                let _ = writeln!(
                    out,
                    "meshvpn_nat_path_rtt_seconds{{interface=\"{iface}\",peer=\"{}\",path=\"{}\"}} {}",
                    esc(&key.to_base64()),
                    esc(&path_label(path)),
                    rtt.as_secs_f64()
                );
            }
        }
    }
    family(
        &mut out,
        "meshvpn_nat_path_chosen",
        "gauge",
        "1 for the path the policy chose per peer.",
    );
    for (key, s) in &status.peer_paths {
        if let Some(c) = &s.chosen {
            let _ = writeln!(
                out,
                "meshvpn_nat_path_chosen{{interface=\"{iface}\",peer=\"{}\",path=\"{}\"}} 1",
                esc(&key.to_base64()),
                esc(&path_label(c))
            );
        }
    }
    family(
        &mut out,
        "meshvpn_nat_peer_path_bytes_total",
        "counter",
        "WireGuard datagram bytes per peer, path kind (direct UDP or the relay) and direction.",
    );
    for (key, t) in &status.peer_traffic {
        for (path, u) in [("direct", &t.udp), ("relay", &t.relay)] {
            for (dir, v) in [("tx", u.tx_bytes), ("rx", u.rx_bytes)] {
                let _ = writeln!(
                    out,
                    "meshvpn_nat_peer_path_bytes_total{{interface=\"{iface}\",peer=\"{}\",path=\"{path}\",dir=\"{dir}\"}} {v}",
                    esc(&key.to_base64()),
                );
            }
        }
    }
    family(
        &mut out,
        "meshvpn_nat_peer_path_seconds_total",
        "counter",
        "Time per peer on each path kind (direct UDP or the relay), the current stretch included.",
    );
    for (key, t) in &status.peer_traffic {
        for (path, u) in [("direct", &t.udp), ("relay", &t.relay)] {
            let _ = writeln!(
                out,
                "meshvpn_nat_peer_path_seconds_total{{interface=\"{iface}\",peer=\"{}\",path=\"{path}\"}} {}",
                esc(&key.to_base64()),
                u.time.as_secs_f64()
            );
        }
    }
    if let Some(d) = status.since_discovery {
        family(
            &mut out,
            "meshvpn_nat_discovery_age_seconds",
            "gauge",
            "Time since the last STUN discovery round started.",
        );
        let _ = writeln!(
            out,
            "meshvpn_nat_discovery_age_seconds{{interface=\"{iface}\"}} {}",
            d.as_secs_f64()
        );
    }
    family(&mut out, "meshvpn_peers", "gauge", "Peers configured.");
    let _ = writeln!(
        out,
        "meshvpn_peers{{interface=\"{iface}\"}} {}",
        snapshot.len()
    );
    out
}

/// The page of `meshvpn tunnel connect`: the agent's counters, one series
/// per [`AgentStats`] field (its rustdoc is the help text), labelled with
/// the server's URL.
pub fn render_agent(stats: &AgentStats, server_url: &str) -> String {
    // Exhaustive: a field added to AgentStats does not compile until it
    // has a series here.
    let AgentStats {
        connected,
        sessions,
        reconnects,
        streams_active,
        streams_total,
        streams_refused,
        bytes_to_targets,
        bytes_from_targets,
        streams_refused_at_cap,
        dials_failed,
    } = *stats;
    let series: [(&str, &str, u64); 10] = [
        ("connected", "gauge", u64::from(connected)),
        ("sessions", "counter", sessions),
        ("reconnects", "counter", reconnects),
        ("streams_active", "gauge", streams_active),
        ("streams_total", "counter", streams_total),
        ("streams_refused", "counter", streams_refused),
        ("streams_refused_at_cap", "counter", streams_refused_at_cap),
        ("dials_failed", "counter", dials_failed),
        ("bytes_to_targets", "counter", bytes_to_targets),
        ("bytes_from_targets", "counter", bytes_from_targets),
    ];
    let server = esc(server_url);
    let mut out = String::with_capacity(2048);
    for (field, kind, value) in series {
        let help = AgentStats::FIELDS
            .iter()
            .find(|f| f.name == field)
            .map(|f| f.doc.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let name = if kind == "counter" && !field.ends_with("_total") {
            format!("meshvpn_tunnel_agent_{field}_total")
        } else {
            format!("meshvpn_tunnel_agent_{field}")
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{server=\"{server}\"}} {value}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshvpn_engine::{Config, InterfaceConfig, PeerConfig, PrivateKey};
    use std::time::Instant;

    fn engine_with_a_peer() -> (Arc<Engine>, String) {
        let cfg = Config {
            interface: InterfaceConfig {
                private_key: Some(PrivateKey::generate()),
                listen_port: Some(0),
                ..Default::default()
            },
            peers: Vec::new(),
        };
        let engine = Arc::new(Engine::new(&cfg).unwrap());
        let key = PrivateKey::generate().public_key();
        let mut peer = PeerConfig::new(key);
        peer.allowed_ips = vec!["10.42.7.0/24".parse().unwrap()];
        engine.add_peer(&peer).unwrap();
        (engine, key.to_base64())
    }

    fn get(addr: SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn the_agents_page_has_one_series_per_counter() {
        let stats = AgentStats {
            connected: true,
            sessions: 3,
            reconnects: 2,
            dials_failed: 7,
            streams_total: 5,
            ..Default::default()
        };
        let page = render_agent(&stats, "wss://h:6443/v1-k3s/connect");
        let label = "{server=\"wss://h:6443/v1-k3s/connect\"}";
        for line in [
            format!("meshvpn_tunnel_agent_connected{label} 1"),
            format!("meshvpn_tunnel_agent_sessions_total{label} 3"),
            format!("meshvpn_tunnel_agent_reconnects_total{label} 2"),
            format!("meshvpn_tunnel_agent_dials_failed_total{label} 7"),
            format!("meshvpn_tunnel_agent_streams_total{label} 5"),
            "# TYPE meshvpn_tunnel_agent_streams_active gauge".to_owned(),
            "# HELP meshvpn_tunnel_agent_dials_failed_total Allowed targets whose dial failed (refused, unreachable, timed out).".to_owned(),
        ] {
            assert!(page.lines().any(|l| l == line), "{line} not in\n{page}");
        }
        let samples = page.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, AgentStats::FIELDS.len(), "{page}");
    }

    #[test]
    fn serves_the_page_and_bounds_hostile_scrapers() {
        let (engine, key) = engine_with_a_peer();
        let server =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), engine.clone(), "fw0").unwrap();
        let addr = server.local_addr();
        let page = get(addr);
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        let want = format!(
            "wireguard_sent_bytes_total{{interface=\"fw0\",public_key=\"{key}\",allowed_ips=\"10.42.7.0/24\"}} 0"
        );
        assert!(page.contains(&want), "{page}");
        assert!(page.contains("# TYPE meshvpn_peer_drops_total counter"));
        assert!(page.contains("meshvpn_nat_probes_sent_total{interface=\"fw0\"} 0"));
        assert!(page.contains("# TYPE meshvpn_nat_candidate gauge"));
        assert!(page.contains("# TYPE meshvpn_nat_peer_probes_total counter"));
        assert!(page.contains("# TYPE meshvpn_nat_path_rtt_seconds gauge"));
        assert!(page.contains("# TYPE meshvpn_nat_peer_path_bytes_total counter"));
        assert!(page.contains("# TYPE meshvpn_nat_peer_path_seconds_total counter"));
        // Every NAT counter, from its one declaration, with its doc as help.
        for f in meshvpn_engine::wg::NatStats::FIELDS {
            let line = format!("meshvpn_nat_{}_total{{interface=\"fw0\"}} 0", f.name);
            assert!(page.contains(&line), "{line} not in\n{page}");
        }
        assert!(page.contains(
            "# HELP meshvpn_nat_relay_ip_changes_total Times the IP the relay sees our session come from changed between sessions (our NAT's public address moved; each started a STUN round).\n"
        ), "{page}");
        // The address the relay sees us come from, once a relay told one.
        assert!(!page.contains("meshvpn_nat_relay_observed{"), "{page}");
        engine
            .relay_inbox()
            .observed("203.0.113.9:40002".parse().unwrap());
        let page = get(addr);
        assert!(
            page.contains(
                "meshvpn_nat_relay_observed{interface=\"fw0\",address=\"203.0.113.9:40002\"} 1"
            ),
            "{page}"
        );

        // A request past MAX_REQUEST_BYTES without its blank line is cut
        // off unanswered.
        let mut big = TcpStream::connect(addr).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let junk = vec![b'a'; MAX_REQUEST_BYTES + 1024];
        let _ = big.write_all(&junk);
        let mut reply = Vec::new();
        let _ = big.read_to_end(&mut reply);
        assert!(reply.is_empty(), "answered an oversized request");

        // A client that connects and says nothing holds the server at most
        // REQUEST_TIMEOUT: a scrape behind it still completes.
        let _silent = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        assert!(get(addr).starts_with("HTTP/1.1 200 OK"));
        assert!(
            t.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        drop(server);
        engine.close();
    }
}
