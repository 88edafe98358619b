//! `meshvpn tunnel serve|connect`: the k3s-compatible supervisor tunnel
//! (rancher/remotedialer wire format) as a stand-alone server and agent.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use meshvpn_engine::io::accept::{accept_with_backoff, AcceptBackoff};
use meshvpn_engine::nat::{DEFAULT_STUN_PER_SOURCE, DEFAULT_STUN_TOTAL};
use meshvpn_engine::relay::{
    RelayServerConfig, DEFAULT_BUDGET_BYTES, DEFAULT_QUEUE_BYTES, DEFAULT_RELAY_MAX_SESSIONS,
    DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE, DEFAULT_WRITE_TIMEOUT, RELAY_PATH,
};
use meshvpn_engine::supervisor::limits::MAX_AGENT_STREAMS;
use meshvpn_engine::supervisor::{
    pump, url_with_path, Agent, AgentConfig, AllowList, DialedTarget, OsDialer, ServerAuth,
    ServerConfig, TargetPattern, TunnelServer, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE, K3S_PATH,
};
use meshvpn_engine::wg::stun::{StunServer, StunServerConfig};
use meshvpn_engine::ws::tls;
use meshvpn_engine::PublicKey;

/// Websocket supervisor tunnel, wire-compatible with k3s (rancher/remotedialer).
#[derive(Debug, Args)]
pub struct TunnelArgs {
    #[command(subcommand)]
    pub command: TunnelCommand,
}

#[derive(Debug, Subcommand)]
pub enum TunnelCommand {
    /// Accept agents over HTTPS and dial through them.
    ///
    /// Example: meshvpn tunnel serve --listen 0.0.0.0:6443 --cert server.pem --key server.key
    ///   --client-ca ca.pem --forward 127.0.0.1:10250=system:node:worker-1/tcp/127.0.0.1:10250
    Serve(ServeArgs),
    /// Connect to a tunnel server as an agent and serve its dials.
    ///
    /// Example: meshvpn tunnel connect --url wss://server:6443/v1-k3s/connect --ca ca.pem
    ///   --cert node.pem --key node.key
    Connect(ConnectArgs),
}

#[derive(Debug, Args)]
#[command(mut_group(crate::control::CONTROL_SERVER_ARGS, |g| g.requires("control_db")))]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:6443")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long, required_unless_present = "plain")]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, required_unless_present = "plain")]
    pub key: Option<PathBuf>,
    /// CA (PEM) for client certificates; a verified certificate's subject CN
    /// becomes the client key (k3s: system:node:NAME). Without --tokens
    /// every client must present one, relay clients included (`meshvpn
    /// IFNAME --relay-cert --relay-key`).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// File of bearer tokens, one "CLIENTKEY TOKEN" per line ('#' comments).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Websocket upgrade path.
    #[arg(long, default_value = K3S_PATH)]
    pub path: String,
    /// Serve plain HTTP without TLS (tests on loopback only).
    #[arg(long)]
    pub plain: bool,
    /// Listen on LOCAL and dial every connection through agent CLIENTKEY to
    /// PROTO/TARGET: LOCAL=CLIENTKEY/PROTO/TARGET, e.g.
    /// 127.0.0.1:9000=system:node:a/tcp/127.0.0.1:10250. Repeatable.
    #[arg(long, value_name = "LOCAL=CLIENTKEY/PROTO/TARGET")]
    pub forward: Vec<String>,
    /// Also relay WireGuard datagrams between `meshvpn` engines that cannot
    /// reach each other over UDP (clients prove they own their WireGuard
    /// key; the relay never sees plaintext).
    #[arg(long)]
    pub relay: bool,
    /// Websocket upgrade path of the relay.
    #[arg(long, default_value = RELAY_PATH, requires = "relay")]
    pub relay_path: String,
    /// Only these WireGuard public keys (base64, one per line, '#'
    /// comments) may register with the relay. Default: any key whose owner
    /// proves it.
    #[arg(long, value_name = "FILE", requires = "relay")]
    pub relay_keys: Option<PathBuf>,
    /// Relay clients must also present a token from --tokens (or a client
    /// certificate from --client-ca), as agents do.
    #[arg(long, requires = "relay")]
    pub relay_require_auth: bool,
    /// TLS and HTTP handshakes in progress at once, from all sources; more
    /// connections are closed at once. Each is one thread and one socket.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address (nginx
    /// limit_conn style): more from it are closed at once while other
    /// sources are served.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES_PER_SOURCE)]
    pub max_handshakes_per_source: usize,
    /// Relay sessions at once, from all sources (each is one thread and
    /// three open files); more registrations are answered 503.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RELAY_MAX_SESSIONS, requires = "relay")]
    pub relay_max_sessions: usize,
    /// Relay sessions at once from one source address (one per node; raise
    /// it for more nodes behind one NAT); more from it are answered 503.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RELAY_MAX_SESSIONS_PER_SOURCE, requires = "relay")]
    pub relay_max_sessions_per_source: usize,
    /// Bytes the relay queues toward one client before it drops new frames
    /// to it (K, M, G suffixes: KiB, MiB, GiB). At least 64 KiB + 95.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, requires = "relay",
          default_value_t = DEFAULT_QUEUE_BYTES)]
    pub relay_queue_bytes: usize,
    /// Bytes the relay queues toward all clients together before it drops
    /// new frames to any (K, M, G suffixes). At least --relay-queue-bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, requires = "relay",
          default_value_t = DEFAULT_BUDGET_BYTES)]
    pub relay_budget_bytes: usize,
    /// Seconds a relay client's writes may make no progress (it does not
    /// read) before the relay closes its session and frees its queue.
    #[arg(long, value_name = "SECONDS", requires = "relay",
          value_parser = clap::value_parser!(u64).range(1..),
          default_value_t = DEFAULT_WRITE_TIMEOUT.as_secs())]
    pub relay_write_timeout: u64,
    /// UDP address of the STUN server (RFC 8489 Binding, which nodes use to
    /// learn their public address), or "off". Default: the --listen
    /// address, so the same port number as HTTPS, over UDP (a warning, not
    /// an error, if that UDP port is taken).
    #[arg(long, value_name = "ADDR|off")]
    pub stun_listen: Option<String>,
    /// STUN answers per second to one source (IPv4 address or IPv6 /64);
    /// more requests from it are dropped.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STUN_PER_SOURCE)]
    pub stun_per_source: u32,
    /// STUN answers per second from all sources together (bounds what a
    /// spoofed flood can reflect); more requests are dropped.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STUN_TOTAL)]
    pub stun_total: u32,
    /// Also be the mesh's control server on this port
    /// (`/v1-meshvpn/control`, next to the tunnel and the relay), keeping
    /// its state in this SQLite file (created when missing); `meshvpn
    /// control keys|nodes|routes|policy --db PATH` work on the same file
    /// while it runs. --relay is not needed: nodes reach each other over
    /// UDP; add it (and --map-relay-url) for nodes that cannot. Nodes
    /// present no client certificate, so with --client-ca give --tokens too.
    #[arg(long, value_name = "PATH", help_heading = "Control server")]
    pub control_db: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Control server (with --control-db)")]
    pub control: Box<crate::control::ControlServerArgs>,
}

/// What `--stun-listen` asks for.
enum StunListen {
    /// Not given: the HTTPS listener's address, port included (its actual
    /// port when --listen says 0); if that UDP port is taken, a warning.
    Default,
    Off,
    At(SocketAddr),
}

fn stun_listen(a: &ServeArgs) -> Result<StunListen, String> {
    match a.stun_listen.as_deref() {
        None => Ok(StunListen::Default),
        Some("off") => Ok(StunListen::Off),
        Some(s) => s
            .parse()
            .map(StunListen::At)
            .map_err(|_| format!("bad --stun-listen {s:?}: want IP:PORT or off")),
    }
}

/// A byte count: digits with an optional K, M or G (KiB, MiB, GiB) suffix.
fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count (digits, optionally K, M or G)"))?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Server URL, e.g. wss://server:6443/v1-k3s/connect (ws:// for tests);
    /// a URL without a path gets /v1-k3s/connect.
    #[arg(long)]
    pub url: String,
    /// CA (PEM) that signed the server's certificate. Required for wss://;
    /// there is no option to skip verification.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), k3s style authentication.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// File holding a bearer token (or set MESHVPN_TUNNEL_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Targets the server may dial, PROTO/HOST:PORT with HOST an IP, CIDR,
    /// name or '*', PORT a number, LOW-HIGH or '*'. Repeatable. Default: the
    /// kubelet and stream ports on loopback, as k3s (tcp/127.0.0.1:10250,
    /// tcp/127.0.0.1:10010 and the same on [::1]).
    #[arg(long, value_name = "PATTERN")]
    pub allow: Vec<String>,
    /// Extra request header NAME=VALUE (e.g. X-Tunnel-ID=node1). Repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    pub header: Vec<String>,
    /// Streams the server may have this agent dial and copy at once (two
    /// threads each); Connects beyond it are refused with "too many streams".
    #[arg(long, value_name = "N", default_value_t = MAX_AGENT_STREAMS)]
    pub max_streams: usize,
    /// Serve the agent's counters (sessions, streams dialed, refused and
    /// failed, bytes) as Prometheus text on http://ADDR/metrics. Listen on
    /// loopback or a private address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `meshvpn tunnel ...`; returns only on error.
pub fn run(args: TunnelArgs) -> Result<(), String> {
    match args.command {
        TunnelCommand::Serve(a) => serve(a),
        TunnelCommand::Connect(a) => connect(a),
    }
}

fn parse_tokens(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, token) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("tokens file line {}: want \"CLIENTKEY TOKEN\"", n + 1))?;
        tokens.push((token.trim().to_owned(), key.to_owned()));
    }
    Ok(tokens)
}

fn parse_keys(text: &str) -> Result<Vec<PublicKey>, String> {
    text.lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(n, l)| {
            PublicKey::from_base64(l).map_err(|e| format!("relay keys file line {}: {e}", n + 1))
        })
        .collect()
}

struct Forward {
    local: SocketAddr,
    client_key: String,
    proto: String,
    target: String,
}

fn parse_forward(spec: &str) -> Result<Forward, String> {
    let bad = || format!("bad --forward {spec:?}: want LOCAL=CLIENTKEY/PROTO/TARGET");
    let (local, rest) = spec.split_once('=').ok_or_else(bad)?;
    let local = local.parse().map_err(|_| bad())?;
    // Client keys may contain ':' but not '/'.
    let (client_key, rest) = rest.split_once('/').ok_or_else(bad)?;
    let (proto, target) = rest.split_once('/').ok_or_else(bad)?;
    if client_key.is_empty() || proto.is_empty() || target.is_empty() {
        return Err(bad());
    }
    Ok(Forward {
        local,
        client_key: client_key.into(),
        proto: proto.into(),
        target: target.into(),
    })
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let stun_addr = stun_listen(&a)?;
    if a.control_db.is_some() && a.client_ca.is_some() && a.tokens.is_none() && !a.plain {
        // The client CA alone makes TLS demand a certificate of every
        // client, and `meshvpn up` has none: nodes would fail the handshake.
        return Err(
            "--control-db with --client-ca alone would refuse every node at the TLS \
                    handshake (nodes present no client certificate): give --tokens too, \
                    so that a client certificate is optional"
                .into(),
        );
    }
    if a.control_db.is_some() && a.relay && a.relay_require_auth {
        return Err(
            "--control-db with --relay-require-auth: nodes joined through the control \
                    server hold no token nor client certificate for the relay; drop \
                    --relay-require-auth (the relay still checks each node's WireGuard key)"
                .into(),
        );
    }
    let tls = if a.plain {
        None
    } else {
        let (cert, key) = (
            a.cert.as_ref().ok_or("--cert is required")?,
            a.key.as_ref().ok_or("--key is required")?,
        );
        let client_ca = a.client_ca.as_ref().map(read).transpose()?;
        let require = a.tokens.is_none() && client_ca.is_some();
        Some(
            tls::server_config(&read(cert)?, &read(key)?, client_ca.as_deref(), require)
                .map_err(|e| e.to_string())?,
        )
    };
    let tokens = match &a.tokens {
        Some(p) => parse_tokens(&String::from_utf8_lossy(&read(p)?))?,
        None => Vec::new(),
    };
    if a.relay && a.client_ca.is_some() && a.tokens.is_none() {
        // The TLS handshake cannot carry this to the client (it gets a
        // certificate_required alert, which its own error explains).
        tracing::info!(
            "relay: --client-ca without --tokens: relay clients must present a certificate \
             signed by the client CA (meshvpn IFNAME --relay-cert/--relay-key, \
             C meshvpn_relay_config.client_cert_pem, Go RelayConfig.ClientCertPEM)"
        );
    }
    if tokens.is_empty() && a.client_ca.is_none() && (!a.relay || a.relay_require_auth) {
        return Err(if a.control_db.is_some() {
            "no way to authenticate agents: give --client-ca and/or --tokens (for a control \
             server without agents, run `meshvpn control serve`)"
        } else {
            "no way to authenticate agents: give --client-ca and/or --tokens"
        }
        .into());
    }
    // Before the listener: a bad database or policy file fails the start.
    let control = match &a.control_db {
        Some(path) => Some(a.control.start(path)?),
        None => None,
    };
    let relay = if a.relay {
        let allowed_keys = match &a.relay_keys {
            Some(p) => Some(parse_keys(&String::from_utf8_lossy(&read(p)?))?),
            None => None,
        };
        let relay = RelayServerConfig {
            path: a.relay_path.clone(),
            allowed_keys,
            require_auth: a.relay_require_auth,
            max_sessions: a.relay_max_sessions,
            max_sessions_per_source: a.relay_max_sessions_per_source,
            queue_bytes: a.relay_queue_bytes,
            budget_bytes: a.relay_budget_bytes,
            write_timeout: Duration::from_secs(a.relay_write_timeout),
            ..Default::default()
        };
        relay.check().map_err(|e| {
            format!("--relay-queue-bytes/--relay-budget-bytes/--relay-write-timeout: {e}")
        })?;
        Some(relay)
    } else {
        None
    };
    let auth = ServerAuth {
        tokens,
        client_cert_cn: a.client_ca.is_some(),
    };
    let forwards = a
        .forward
        .iter()
        .map(|f| parse_forward(f))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = ServerConfig::new(a.path, tls, auth);
    config.relay = relay;
    config.max_handshakes = a.max_handshakes;
    config.max_handshakes_per_source = a.max_handshakes_per_source;
    if let Some(control) = &control {
        config.extra.push(control.route());
    }
    let server = Arc::new(TunnelServer::bind(a.listen, config).map_err(|e| e.to_string())?);
    tracing::info!(addr = %server.local_addr(), relay = a.relay, control = control.is_some(), "tunnel server listening");
    crate::control::print_listening(server.local_addr());
    let stun_config = StunServerConfig {
        per_source: a.stun_per_source,
        total: a.stun_total,
        ..Default::default()
    };
    // Lives as long as this function, which serves until the process ends.
    let _stun = match stun_addr {
        StunListen::Off => None,
        StunListen::At(addr) => Some(
            StunServer::bind(addr, stun_config)
                .map_err(|e| format!("--stun-listen {addr}: {e}"))?,
        ),
        StunListen::Default => {
            let addr = server.local_addr();
            match StunServer::bind(addr, stun_config) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "no STUN server (UDP port taken?): give --stun-listen ADDR or off");
                    None
                }
            }
        }
    };
    if let Some(stun) = &_stun {
        tracing::info!(addr = %stun.local_addr(), "STUN server listening (UDP)");
    }
    for f in forwards {
        let listener =
            TcpListener::bind(f.local).map_err(|e| format!("--forward {}: {e}", f.local))?;
        tracing::info!(local = %f.local, client = %f.client_key, target = %format!("{}/{}", f.proto, f.target), "forwarding");
        let server = server.clone();
        std::thread::spawn(move || {
            // Backs off on accept errors (EMFILE) instead of spinning.
            let mut backoff = AcceptBackoff::new();
            while let Some((conn, _)) = accept_with_backoff(&listener, &mut backoff, || false) {
                let stream = match server.dial(&f.client_key, &f.proto, &f.target) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "forward: dial failed");
                        continue;
                    }
                };
                let Ok(target) = DialedTarget::from_tcp(conn) else {
                    continue;
                };
                let _ = std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn(move || pump(stream, target));
            }
        });
    }
    // The control server lives as long as the listener that serves it: a
    // route whose server is gone refuses every node.
    let _control = control;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn connect(a: ConnectArgs) -> Result<(), String> {
    let policy = if a.allow.is_empty() {
        AllowList::k3s_default()
    } else {
        AllowList(
            a.allow
                .iter()
                .map(|p| p.parse::<TargetPattern>())
                .collect::<Result<_, _>>()?,
        )
    };
    let url = url_with_path(&a.url, None).map_err(|e| format!("--url: {e}"))?;
    let mut config = AgentConfig::new(url.clone(), Arc::new(policy), Arc::new(OsDialer::default()));
    if url.starts_with("wss://") {
        let ca =
            a.ca.as_ref()
                .ok_or("--ca is required for wss:// (the server is always verified)")?;
        let identity = match (&a.cert, &a.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let identity_ref = identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        config.tls = Some(tls::client_config(&read(ca)?, identity_ref).map_err(|e| e.to_string())?);
    }
    config.token = match &a.token_file {
        Some(p) => Some(String::from_utf8_lossy(&read(p)?).trim().to_owned()),
        None => std::env::var("MESHVPN_TUNNEL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    for h in &a.header {
        let (name, value) = h
            .split_once('=')
            .ok_or_else(|| format!("bad --header {h:?}: want NAME=VALUE"))?;
        config.headers.push((name.to_owned(), value.to_owned()));
    }
    if a.max_streams == 0 {
        return Err("--max-streams must be at least 1".into());
    }
    config.limits.max_agent_streams = a.max_streams;
    let counters = config.counters.clone();
    let _metrics = match a.metrics_listen {
        Some(addr) => Some(
            crate::metrics::MetricsServer::start_page(addr, move || {
                crate::metrics::render_agent(&counters.snapshot(), &url)
            })
            .map_err(|e| format!("--metrics-listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let agent = Agent::start(config).map_err(|e| e.to_string())?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        let _ = agent.status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_spec() {
        let f = parse_forward("127.0.0.1:9000=system:node:a/tcp/127.0.0.1:10250").unwrap();
        assert_eq!(
            (f.client_key.as_str(), f.proto.as_str(), f.target.as_str()),
            ("system:node:a", "tcp", "127.0.0.1:10250")
        );
        assert!(parse_forward("127.0.0.1:9000=a/tcp").is_err());
        assert!(parse_forward("nope=a/tcp/x:1").is_err());
    }

    #[test]
    fn tokens_file() {
        let t = parse_tokens("# comment\nnode1 abc\n\nnode2   def \n").unwrap();
        assert_eq!(
            t,
            vec![
                ("abc".into(), "node1".into()),
                ("def".into(), "node2".into())
            ]
        );
        assert!(parse_tokens("lonely").is_err());
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("65631"), Ok(65631));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("1.5M").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes(&format!("{}G", usize::MAX)).is_err());
    }

    #[test]
    fn relay_keys_file() {
        let k = meshvpn_engine::PrivateKey::generate().public_key();
        let keys = parse_keys(&format!("# nodes\n{}\n\n", k.to_base64())).unwrap();
        assert_eq!(keys, vec![k]);
        let err = parse_keys("# x\nnot-a-key\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
