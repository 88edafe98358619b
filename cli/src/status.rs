//! `meshvpn status [-i IFNAME] [--metrics ADDR]`: per peer, the node subnet
//! (its AllowedIPs), endpoint, path (udp or relay), last handshake, bytes;
//! with `--metrics` (the daemon's `--metrics-listen` address) also the
//! handshake round trip and drops. Reads the UAPI, as `wg show` does.

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

fn ago(t: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if t.is_zero() {
        return "never".into();
    }
    format!("{} s ago", now.saturating_sub(t).as_secs())
}

pub fn run(a: StatusArgs) -> CliResult {
    let reply = crate::flannel::uapi_get(&a.interface)?;
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
    for p in &reply.peers {
        let key = p.public_key.to_base64();
        let subnets: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
        let mut extra = String::new();
        if let Some(m) = &metrics {
            let rtt = metric(m, "meshvpn_peer_handshake_rtt_seconds", &key).unwrap_or(0.0);
            let drops = metric(m, "meshvpn_peer_drops_total", &key).unwrap_or(0.0);
            extra = format!(", rtt {:.1} ms, drops {drops}", rtt * 1000.0);
        }
        println!(
            "peer {key}\n  subnet {}  endpoint {}  path {}\n  handshake {}, sent {} B, received {} B{extra}",
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
