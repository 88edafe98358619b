//! `meshvpn stun probe`: asks STUN servers (RFC 8489 Binding) which
//! address and port they see this host at, and whether they agree (one
//! mapping for every destination) or not (a symmetric NAT).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use clap::{Args, Subcommand};
use meshvpn_engine::nat::{DiscoveryConfig, Mapping, MAX_SERVERS, STUN_MAX_TRANSMITS};
use meshvpn_engine::wg::stun::probe;

/// The IANA port of STUN over UDP.
const STUN_PORT: u16 = 3478;

#[derive(Debug, Args)]
pub struct StunArgs {
    #[command(subcommand)]
    pub command: StunCommand,
}

#[derive(Debug, Subcommand)]
pub enum StunCommand {
    /// Print the address each STUN server sees this host at.
    ///
    /// Example: meshvpn stun probe relay.example.net:6443 stun.example.org
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// STUN servers, HOST[:PORT] (port 3478 when not given; a `meshvpn
    /// tunnel serve` answers on its HTTPS port number). Up to 8.
    #[arg(required = true, value_name = "SERVER[:PORT]")]
    pub servers: Vec<String>,
    /// Local address to send from, e.g. 0.0.0.0:51820 to learn the mapping
    /// of that port. Default: any address, a port the system picks.
    #[arg(long, value_name = "ADDR")]
    pub from: Option<SocketAddr>,
    /// Transmissions of each request (RFC 8489's Rc); the wait doubles
    /// from 500 ms after each, and 8 s after the last.
    #[arg(long, value_name = "N", default_value_t = STUN_MAX_TRANSMITS,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub transmits: u32,
}

fn resolve(spec: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = spec.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = spec.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, STUN_PORT));
    }
    let with_port = match spec.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => spec.to_owned(),
        _ => format!("{spec}:{STUN_PORT}"),
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("{spec}: {e}"))?
        .next()
        .ok_or_else(|| format!("{spec}: no address"))
}

pub fn run(args: StunArgs) -> crate::CliResult {
    match args.command {
        StunCommand::Probe(a) => probe_cmd(a),
    }
}

fn probe_cmd(a: ProbeArgs) -> crate::CliResult {
    if a.servers.len() > MAX_SERVERS {
        return Err(format!("at most {MAX_SERVERS} servers").into());
    }
    let servers = a
        .servers
        .iter()
        .map(|s| resolve(s))
        .collect::<Result<Vec<_>, _>>()?;
    let from = a.from.unwrap_or_else(|| {
        if servers.iter().all(SocketAddr::is_ipv4) {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        }
    });
    // Its own socket for now: once the engine's device core has typed
    // endpoints, the engine sends these from the WireGuard socket (the
    // mapping that matters is that socket's); --from PORT approximates it.
    let socket = UdpSocket::bind(from).map_err(|e| format!("--from {from}: {e}"))?;
    let config = DiscoveryConfig {
        max_transmits: a.transmits,
        ..Default::default()
    };
    let d = probe(&socket, &servers, config)?;
    let local = socket.local_addr()?;
    let mut answered = 0;
    for ((addr, seen), spec) in d.results().zip(&a.servers) {
        let name = if *spec == addr.to_string() {
            String::new()
        } else {
            format!(" ({spec})")
        };
        match seen {
            Some(r) => {
                answered += 1;
                println!("{addr} reflexive {r}{name}");
            }
            None => println!("{addr} no answer{name}"),
        }
    }
    println!("local: {local}");
    match d.mapping() {
        Mapping::EndpointIndependent(r) => {
            println!("mapping: endpoint-independent (every server saw {r})")
        }
        Mapping::EndpointDependent => println!(
            "mapping: endpoint-dependent (symmetric NAT: each server saw another address; \
             peers cannot reach this node at a discovered address)"
        ),
        Mapping::Unknown => println!("mapping: unknown (fewer than two servers answered)"),
    }
    let s = d.stats();
    let dropped = s.not_stun + s.malformed + s.unknown_source + s.unknown_transaction;
    if dropped > 0 {
        println!("dropped: {dropped} datagrams that were not an answer to this probe");
    }
    if answered == 0 {
        return Err("no STUN server answered".into());
    }
    Ok(())
}
