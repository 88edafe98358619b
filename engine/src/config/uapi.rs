//! The WireGuard cross-platform UAPI text protocol
//! (<https://www.wireguard.com/xplatform/>), as `wg` and wireguard-go speak it.
//!
//! ```text
//!   client: get=1\n\n                 server: private_key=<hex>\n ... errno=0\n\n
//!   client: set=1\n<key>=<value>\n...\n   server: errno=0\n\n   (or errno=22, ...)
//! ```
//!
//! Keys are 64 hex digits; a `set` lists interface keys first, then one
//! block per peer opened by `public_key=`. This module only turns text into
//! [`SetRequest`] / [`GetReply`] values and back: it never touches an
//! engine (the runtime applies a request) and never logs, since the text
//! carries private keys.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, KeyError, PresharedKey, PrivateKey, PublicKey};
use crate::router::IpPrefix;

/// errno values the protocol replies with (Linux numbering, as wireguard-go
/// uses on every platform).
pub mod errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EPROTO: i32 = 71;
    pub const EMSGSIZE: i32 = 90;
    pub const EADDRINUSE: i32 = 98;
}

/// Why a UAPI request failed. Every variant that stems from the request's
/// text names its 1-based line (line 1 is `set=1` when the request starts
/// with it). Messages never include key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("line {line}: not a key=value line")]
    Syntax { line: usize },
    #[error("line {line}: unknown {} key `{key}`", if *.in_peer { "peer" } else { "interface" })]
    UnknownKey {
        line: usize,
        key: String,
        in_peer: bool,
    },
    #[error("line {line}: {key}: {message}")]
    InvalidValue {
        line: usize,
        key: String,
        message: String,
    },
    #[error("line {line}: text after the blank line that ends the request")]
    TrailingText { line: usize },
    #[error("the request is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The request was valid but the engine could not carry it out (a port
    /// already in use, a key it refuses).
    #[error("line {line}: {key}: {message}")]
    Rejected {
        line: usize,
        key: String,
        message: String,
        errno: i32,
    },
    #[error("the engine is closed")]
    Closed,
}

impl UapiError {
    /// The number to send back as `errno=N`.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Syntax { .. } | UapiError::TrailingText { .. } => errno::EPROTO,
            UapiError::UnknownKey { .. } | UapiError::InvalidValue { .. } => errno::EINVAL,
            UapiError::TooLarge { .. } => errno::EMSGSIZE,
            UapiError::Rejected { errno, .. } => *errno,
            UapiError::Closed => errno::EIO,
        }
    }

    /// The line the error is about, when it is about one.
    pub fn line(&self) -> Option<usize> {
        match self {
            UapiError::Syntax { line }
            | UapiError::TrailingText { line }
            | UapiError::UnknownKey { line, .. }
            | UapiError::InvalidValue { line, .. }
            | UapiError::Rejected { line, .. } => Some(*line),
            UapiError::TooLarge { .. } | UapiError::Closed => None,
        }
    }
}

/// One interface-level change, in the order the request gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceChange {
    /// `None`: the all-zero key, which removes the private key.
    PrivateKey(Option<PrivateKey>),
    /// 0 picks a free port.
    ListenPort(u16),
    /// 0 removes the mark.
    Fwmark(u32),
    /// Remove every peer before the peer blocks that follow.
    ReplacePeers,
}

/// One change inside a peer block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Change the peer only if it exists already; never create it.
    UpdateOnly,
    /// Remove the peer; the rest of its block is ignored.
    Remove,
    /// `None`: the all-zero key, which removes the preshared key.
    PresharedKey(Option<PresharedKey>),
    Endpoint(SocketAddr),
    /// Seconds; 0 disables keepalives.
    PersistentKeepalive(u16),
    /// Drop the peer's AllowedIPs before the `AllowedIp`s that follow.
    ReplaceAllowedIps,
    AllowedIp(IpPrefix),
    /// Only version 1 exists; the parser rejects any other.
    ProtocolVersion,
}

/// A peer block: `public_key=` and the changes under it, each with its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub line: usize,
    pub public_key: PublicKey,
    pub changes: Vec<(usize, PeerChange)>,
}

/// A parsed `set=1` request. Applying it in order (interface changes, then
/// each peer block) gives wireguard-go's meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub interface: Vec<(usize, InterfaceChange)>,
    pub peers: Vec<PeerSet>,
}

/// The state a `get=1` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GetReply {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerReply>,
}

/// One peer in a `get=1` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReply {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Time since the Unix epoch of the last handshake; `None` for never
    /// (sent as 0 and 0, as wireguard-go does).
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpPrefix>,
}

impl PeerReply {
    pub fn new(public_key: PublicKey) -> PeerReply {
        PeerReply {
            public_key,
            preshared_key: None,
            endpoint: None,
            last_handshake: None,
            tx_bytes: 0,
            rx_bytes: 0,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }
}

/// Splits a request into numbered `(key, value)` lines. A first line that
/// is exactly `first` (`set=1` / a `get` reply has none) is skipped; a blank
/// line ends the request and only blank lines may follow it; an `errno=`
/// line ends a reply.
struct Lines<'a> {
    iter: std::iter::Enumerate<std::str::Lines<'a>>,
    ended: bool,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Lines<'a> {
        Lines {
            iter: text.lines().enumerate(),
            ended: false,
        }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<(usize, &'a str, &'a str), UapiError>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (i, line) = self.iter.next()?;
            let line_no = i + 1;
            if self.ended {
                if line.is_empty() {
                    continue;
                }
                return Some(Err(UapiError::TrailingText { line: line_no }));
            }
            if line.is_empty() {
                self.ended = true;
                continue;
            }
            return Some(match line.split_once('=') {
                Some((k, v)) => Ok((line_no, k, v)),
                None => Err(UapiError::Syntax { line: line_no }),
            });
        }
    }
}

fn invalid(line: usize, key: &str, message: impl Into<String>) -> UapiError {
    UapiError::InvalidValue {
        line,
        key: key.to_string(),
        message: message.into(),
    }
}

fn key_error(line: usize, key: &str, e: KeyError) -> UapiError {
    // The UAPI key names the field; the error adds only its reason.
    invalid(line, key, e.reason())
}

fn parse_true(line: usize, key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(invalid(
            line,
            key,
            format!("the only value is `true`, got `{value}`"),
        ))
    }
}

fn parse_number<T: std::str::FromStr>(line: usize, key: &str, value: &str) -> Result<T, UapiError> {
    // `str::parse` accepts a leading '+'; the protocol's numbers are bare digits.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = value.parse() {
            return Ok(n);
        }
    }
    Err(invalid(
        line,
        key,
        format!("`{value}` is not a number in range"),
    ))
}

fn parse_endpoint(line: usize, value: &str) -> Result<SocketAddr, UapiError> {
    // Only literal addresses: `wg` resolves names before it sends.
    value.parse().map_err(|_| {
        invalid(
            line,
            "endpoint",
            format!("`{value}` is not an address:port or [v6 address]:port"),
        )
    })
}

fn parse_prefix(line: usize, key: &str, value: &str) -> Result<IpPrefix, UapiError> {
    if !value.contains('/') {
        return Err(invalid(
            line,
            key,
            format!("`{value}` has no prefix length (write {value}/32 or {value}/128)"),
        ));
    }
    value
        .parse()
        .map_err(|e: crate::router::PrefixError| invalid(line, key, e.to_string()))
}

fn maybe_zero_private(line: usize, value: &str) -> Result<Option<PrivateKey>, UapiError> {
    let k = PrivateKey::from_hex(value).map_err(|e| key_error(line, "private_key", e))?;
    Ok((k.as_bytes() != &[0u8; 32]).then_some(k))
}

fn maybe_zero_psk(line: usize, value: &str) -> Result<Option<PresharedKey>, UapiError> {
    let k = PresharedKey::from_hex(value).map_err(|e| key_error(line, "preshared_key", e))?;
    Ok((!k.is_zero()).then_some(k))
}

/// Parses the body of a `set=1` request. The text may start with the
/// `set=1` line itself and may end with the blank line that terminates it.
/// Nothing is applied here, so a request with an error anywhere changes
/// nothing when the caller applies only parsed requests.
pub fn parse_set(text: &str) -> Result<SetRequest, UapiError> {
    // Line numbers stay those of the caller's text.
    match text.strip_prefix("set=1\n") {
        Some(body) => parse_set_lines(body, 1),
        None => parse_set_lines(text, 0),
    }
}

/// [`parse_set`] for a body whose first line is line `first_line + 1`.
fn parse_set_lines(text: &str, first_line: usize) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for item in Lines::new(text) {
        let (line, key, value) = item.map_err(|e| renumber(e, first_line))?;
        let line = line + first_line;
        if key == "public_key" {
            let public_key =
                PublicKey::from_hex(value).map_err(|e| key_error(line, "public_key", e))?;
            req.peers.push(PeerSet {
                line,
                public_key,
                changes: Vec::new(),
            });
            continue;
        }
        match req.peers.last_mut() {
            None => {
                let change = match key {
                    "private_key" => InterfaceChange::PrivateKey(maybe_zero_private(line, value)?),
                    "listen_port" => InterfaceChange::ListenPort(parse_number(line, key, value)?),
                    "fwmark" => InterfaceChange::Fwmark(parse_number(line, key, value)?),
                    "replace_peers" => {
                        parse_true(line, key, value)?;
                        InterfaceChange::ReplacePeers
                    }
                    _ => {
                        return Err(UapiError::UnknownKey {
                            line,
                            key: key.to_string(),
                            in_peer: false,
                        })
                    }
                };
                req.interface.push((line, change));
            }
            Some(peer) => {
                let change = match key {
                    "update_only" => {
                        parse_true(line, key, value)?;
                        PeerChange::UpdateOnly
                    }
                    "remove" => {
                        parse_true(line, key, value)?;
                        PeerChange::Remove
                    }
                    "preshared_key" => PeerChange::PresharedKey(maybe_zero_psk(line, value)?),
                    "endpoint" => PeerChange::Endpoint(parse_endpoint(line, value)?),
                    "persistent_keepalive_interval" => {
                        PeerChange::PersistentKeepalive(parse_number(line, key, value)?)
                    }
                    "replace_allowed_ips" => {
                        parse_true(line, key, value)?;
                        PeerChange::ReplaceAllowedIps
                    }
                    "allowed_ip" => PeerChange::AllowedIp(parse_prefix(line, key, value)?),
                    "protocol_version" => {
                        if value != "1" {
                            return Err(invalid(
                                line,
                                key,
                                format!("only protocol version 1 exists, got `{value}`"),
                            ));
                        }
                        PeerChange::ProtocolVersion
                    }
                    _ => {
                        return Err(UapiError::UnknownKey {
                            line,
                            key: key.to_string(),
                            in_peer: true,
                        })
                    }
                };
                peer.changes.push((line, change));
            }
        }
    }
    Ok(req)
}

fn renumber(e: UapiError, by: usize) -> UapiError {
    match e {
        UapiError::Syntax { line } => UapiError::Syntax { line: line + by },
        UapiError::TrailingText { line } => UapiError::TrailingText { line: line + by },
        other => other,
    }
}

fn push_line(out: &mut String, key: &str, value: impl std::fmt::Display) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "{key}={value}");
}

impl SetRequest {
    /// The request `wg setconf` would send for `config`: the interface's
    /// key, port and mark, and every peer with `replace_allowed_ips`.
    /// `replace_peers` drops peers the config does not list.
    pub fn from_config(config: &Config, replace_peers: bool) -> SetRequest {
        let iface = &config.interface;
        let mut interface = Vec::new();
        if let Some(k) = &iface.private_key {
            interface.push((0, InterfaceChange::PrivateKey(Some(k.clone()))));
        }
        if let Some(p) = iface.listen_port {
            interface.push((0, InterfaceChange::ListenPort(p)));
        }
        if let Some(m) = iface.fwmark {
            interface.push((0, InterfaceChange::Fwmark(m)));
        }
        if replace_peers {
            interface.push((0, InterfaceChange::ReplacePeers));
        }
        let peers = config
            .peers
            .iter()
            .map(|p| {
                let mut changes = Vec::new();
                if let Some(k) = &p.preshared_key {
                    changes.push((0, PeerChange::PresharedKey(Some(k.clone()))));
                }
                if let Some(e) = p.endpoint {
                    changes.push((0, PeerChange::Endpoint(e)));
                }
                if let Some(k) = p.persistent_keepalive {
                    changes.push((0, PeerChange::PersistentKeepalive(k)));
                }
                changes.push((0, PeerChange::ReplaceAllowedIps));
                for a in &p.allowed_ips {
                    changes.push((0, PeerChange::AllowedIp(*a)));
                }
                PeerSet {
                    line: 0,
                    public_key: p.public_key,
                    changes,
                }
            })
            .collect();
        SetRequest { interface, peers }
    }

    /// The request as protocol text, without the `set=1` line and without
    /// the terminating blank line. Carries keys: never log it.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (_, c) in &self.interface {
            match c {
                InterfaceChange::PrivateKey(k) => push_line(
                    &mut out,
                    "private_key",
                    k.as_ref().map_or_else(|| "0".repeat(64), |k| k.to_hex()),
                ),
                InterfaceChange::ListenPort(p) => push_line(&mut out, "listen_port", p),
                InterfaceChange::Fwmark(m) => push_line(&mut out, "fwmark", m),
                InterfaceChange::ReplacePeers => push_line(&mut out, "replace_peers", "true"),
            }
        }
        for p in &self.peers {
            push_line(&mut out, "public_key", p.public_key.to_hex());
            for (_, c) in &p.changes {
                match c {
                    PeerChange::UpdateOnly => push_line(&mut out, "update_only", "true"),
                    PeerChange::Remove => push_line(&mut out, "remove", "true"),
                    PeerChange::PresharedKey(k) => push_line(
                        &mut out,
                        "preshared_key",
                        k.as_ref().map_or_else(|| "0".repeat(64), |k| k.to_hex()),
                    ),
                    PeerChange::Endpoint(e) => push_line(&mut out, "endpoint", e),
                    PeerChange::PersistentKeepalive(k) => {
                        push_line(&mut out, "persistent_keepalive_interval", k)
                    }
                    PeerChange::ReplaceAllowedIps => {
                        push_line(&mut out, "replace_allowed_ips", "true")
                    }
                    PeerChange::AllowedIp(a) => push_line(&mut out, "allowed_ip", a),
                    PeerChange::ProtocolVersion => push_line(&mut out, "protocol_version", 1),
                }
            }
        }
        out
    }
}

impl GetReply {
    /// The reply as protocol text, in wireguard-go's order, without the
    /// closing `errno=0` line. Carries keys: never log it.
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(128 + self.peers.len() * 256);
        if let Some(k) = &self.private_key {
            push_line(&mut out, "private_key", k.to_hex());
        }
        if self.listen_port != 0 {
            push_line(&mut out, "listen_port", self.listen_port);
        }
        if self.fwmark != 0 {
            push_line(&mut out, "fwmark", self.fwmark);
        }
        for p in &self.peers {
            push_line(&mut out, "public_key", p.public_key.to_hex());
            push_line(
                &mut out,
                "preshared_key",
                p.preshared_key
                    .as_ref()
                    .map_or_else(|| "0".repeat(64), |k| k.to_hex()),
            );
            push_line(&mut out, "protocol_version", 1);
            if let Some(e) = p.endpoint {
                push_line(&mut out, "endpoint", e);
            }
            let t = p.last_handshake.unwrap_or_default();
            push_line(&mut out, "last_handshake_time_sec", t.as_secs());
            push_line(&mut out, "last_handshake_time_nsec", t.subsec_nanos());
            push_line(&mut out, "tx_bytes", p.tx_bytes);
            push_line(&mut out, "rx_bytes", p.rx_bytes);
            push_line(
                &mut out,
                "persistent_keepalive_interval",
                p.persistent_keepalive,
            );
            for a in &p.allowed_ips {
                push_line(&mut out, "allowed_ip", a);
            }
        }
        out
    }
}

/// Parses a `get=1` reply (what a client such as `wg` reads). An `errno=`
/// line ends it; a non-zero errno is returned as [`UapiError::Rejected`].
pub fn parse_get(text: &str) -> Result<GetReply, UapiError> {
    let mut reply = GetReply::default();
    let mut handshake_sec = 0u64;
    for item in Lines::new(text) {
        let (line, key, value) = item?;
        if key == "errno" {
            let n: i32 = parse_number(line, key, value)?;
            if n != 0 {
                return Err(UapiError::Rejected {
                    line,
                    key: key.into(),
                    message: format!("the server replied errno={n}"),
                    errno: n,
                });
            }
            break;
        }
        if key == "public_key" {
            let k = PublicKey::from_hex(value).map_err(|e| key_error(line, key, e))?;
            reply.peers.push(PeerReply::new(k));
            continue;
        }
        let Some(peer) = reply.peers.last_mut() else {
            match key {
                "private_key" => reply.private_key = maybe_zero_private(line, value)?,
                "listen_port" => reply.listen_port = parse_number(line, key, value)?,
                "fwmark" => reply.fwmark = parse_number(line, key, value)?,
                _ => {
                    return Err(UapiError::UnknownKey {
                        line,
                        key: key.into(),
                        in_peer: false,
                    })
                }
            }
            continue;
        };
        match key {
            "preshared_key" => peer.preshared_key = maybe_zero_psk(line, value)?,
            "protocol_version" if value == "1" => {}
            "endpoint" => peer.endpoint = Some(parse_endpoint(line, value)?),
            "last_handshake_time_sec" => handshake_sec = parse_number(line, key, value)?,
            "last_handshake_time_nsec" => {
                let nsec: u32 = parse_number(line, key, value)?;
                if nsec >= 1_000_000_000 {
                    return Err(invalid(line, key, "nanoseconds must be below 10^9"));
                }
                peer.last_handshake =
                    (handshake_sec != 0 || nsec != 0).then(|| Duration::new(handshake_sec, nsec));
            }
            "tx_bytes" => peer.tx_bytes = parse_number(line, key, value)?,
            "rx_bytes" => peer.rx_bytes = parse_number(line, key, value)?,
            "persistent_keepalive_interval" => {
                peer.persistent_keepalive = parse_number(line, key, value)?
            }
            "allowed_ip" => peer.allowed_ips.push(parse_prefix(line, key, value)?),
            _ => {
                return Err(UapiError::UnknownKey {
                    line,
                    key: key.into(),
                    in_peer: true,
                })
            }
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_key(byte: u8) -> String {
        format!("{byte:02x}").repeat(32)
    }

    /// What `wg set wg0 private-key ... peer ... ` sends (wireguard-tools
    /// ipc-uapi.h), one peer updated, one removed.
    fn wg_set_text() -> String {
        format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=[fd00::2]:51821\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.2/32\nallowed_ip=fd00:1::/64\nprotocol_version=1\n\
             public_key={}\nremove=true\n\n",
            hex_key(0x48),
            hex_key(0x11),
            hex_key(0x22),
            hex_key(0x33)
        )
    }

    #[test]
    fn parses_what_wg_sends() {
        let req = parse_set(&wg_set_text()).unwrap();
        assert_eq!(req.interface.len(), 4);
        assert_eq!(
            req.interface[0],
            (
                2,
                InterfaceChange::PrivateKey(Some(PrivateKey::from_hex(&hex_key(0x48)).unwrap()))
            )
        );
        assert_eq!(req.interface[1], (3, InterfaceChange::ListenPort(51820)));
        assert_eq!(req.interface[2], (4, InterfaceChange::Fwmark(0)));
        assert_eq!(req.interface[3], (5, InterfaceChange::ReplacePeers));
        assert_eq!(req.peers.len(), 2);
        let p = &req.peers[0];
        assert_eq!(p.line, 6);
        assert_eq!(p.public_key, PublicKey::from_hex(&hex_key(0x11)).unwrap());
        let changes: Vec<PeerChange> = p.changes.iter().map(|(_, c)| c.clone()).collect();
        assert_eq!(
            changes,
            vec![
                PeerChange::PresharedKey(Some(PresharedKey::from_hex(&hex_key(0x22)).unwrap())),
                PeerChange::Endpoint("[fd00::2]:51821".parse().unwrap()),
                PeerChange::PersistentKeepalive(25),
                PeerChange::ReplaceAllowedIps,
                PeerChange::AllowedIp("10.0.0.2/32".parse().unwrap()),
                PeerChange::AllowedIp("fd00:1::/64".parse().unwrap()),
                PeerChange::ProtocolVersion,
            ]
        );
        assert_eq!(req.peers[1].changes, vec![(15, PeerChange::Remove)]);
    }

    #[test]
    fn zero_keys_mean_none() {
        let zero = "0".repeat(64);
        let text = format!(
            "private_key={zero}\npublic_key={}\npreshared_key={zero}\n",
            hex_key(1)
        );
        let req = parse_set(&text).unwrap();
        assert_eq!(req.interface[0].1, InterfaceChange::PrivateKey(None));
        assert_eq!(req.peers[0].changes[0].1, PeerChange::PresharedKey(None));
    }

    #[test]
    fn set_text_round_trips() {
        let req = parse_set(&wg_set_text()).unwrap();
        let again = parse_set(&format!("set=1\n{}\n", req.to_text())).unwrap();
        assert_eq!(again, req);
        // Without the set=1 line, numbering starts at the body.
        let body = parse_set(&req.to_text()).unwrap();
        assert_eq!(body.peers[0].line, 5);
    }

    fn err(text: &str) -> UapiError {
        parse_set(text).unwrap_err()
    }

    #[test]
    fn bad_requests_name_the_line() {
        let pk = hex_key(0x11);
        let e = err("set=1\nlisten_port=1\nnonsense\n");
        assert_eq!(e, UapiError::Syntax { line: 3 });
        assert_eq!(e.errno(), errno::EPROTO);

        let e = err("listen_port=70000\n");
        assert_eq!(e.line(), Some(1));
        assert_eq!(e.errno(), errno::EINVAL);
        assert!(e.to_string().contains("listen_port"), "{e}");
        assert!(matches!(
            err("listen_port=+5\n"),
            UapiError::InvalidValue { .. }
        ));
        assert!(matches!(err("fwmark=-1\n"), UapiError::InvalidValue { .. }));

        let e = err("set=1\nmtu=1420\n");
        assert_eq!(
            e,
            UapiError::UnknownKey {
                line: 2,
                key: "mtu".into(),
                in_peer: false
            }
        );
        assert!(e.to_string().contains("unknown interface key `mtu`"), "{e}");
        // Peer keys before any public_key are interface keys, and unknown.
        assert!(matches!(
            err("endpoint=1.2.3.4:5\n"),
            UapiError::UnknownKey { in_peer: false, .. }
        ));
        let e = err(&format!("public_key={pk}\nlisten_port=5\n"));
        assert!(matches!(
            e,
            UapiError::UnknownKey {
                line: 2,
                in_peer: true,
                ..
            }
        ));

        assert!(matches!(
            err("replace_peers=false\n"),
            UapiError::InvalidValue { line: 1, .. }
        ));
        let e = err(&format!("public_key={pk}\nprotocol_version=2\n"));
        assert_eq!(e.line(), Some(2));
        let e = err(&format!("public_key={pk}\nallowed_ip=10.0.0.1\n"));
        assert!(e.to_string().contains("10.0.0.1/32"), "{e}");
        let e = err(&format!("public_key={pk}\nallowed_ip=10.0.0.0/33\n"));
        assert_eq!(e.line(), Some(2));
        let e = err(&format!("public_key={pk}\nendpoint=example.com:51820\n"));
        assert_eq!(e.line(), Some(2));
        let e = err(&format!(
            "public_key={pk}\npersistent_keepalive_interval=65536\n"
        ));
        assert_eq!(e.line(), Some(2));
        let e = err(&format!("public_key={pk}\nupdate_only=1\n"));
        assert_eq!(e.line(), Some(2));
        let e = err(&format!("listen_port=1\n\npublic_key={pk}\n"));
        assert_eq!(e, UapiError::TrailingText { line: 3 });
        let e = err("set=1\nlisten_port=1\n\n\nfoo\n");
        assert_eq!(e, UapiError::TrailingText { line: 5 });
    }

    #[test]
    fn key_errors_never_echo_the_key() {
        let secret = "ab".repeat(31) + "zz";
        let e = err(&format!("private_key={secret}\n"));
        assert_eq!(e.line(), Some(1));
        assert!(!e.to_string().contains(&secret[..20]), "{e}");
        let e = err(&format!("private_key={}\n", "ab".repeat(31)));
        assert!(e.to_string().contains("31"), "{e}");
        let e = err(&format!("public_key={}\npreshared_key=xyz\n", hex_key(1)));
        assert!(matches!(e, UapiError::InvalidValue { line: 2, .. }));
        let e = err("public_key=00\n");
        assert!(matches!(e, UapiError::InvalidValue { line: 1, .. }));
    }

    fn sample_reply() -> GetReply {
        let mut a = PeerReply::new(PublicKey::from_hex(&hex_key(0x11)).unwrap());
        a.preshared_key = Some(PresharedKey::from_hex(&hex_key(0x22)).unwrap());
        a.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        a.last_handshake = Some(Duration::new(1_700_000_000, 123_456_789));
        a.tx_bytes = 1234;
        a.rx_bytes = 5678;
        a.persistent_keepalive = 25;
        a.allowed_ips = vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let b = PeerReply::new(PublicKey::from_hex(&hex_key(0x33)).unwrap());
        GetReply {
            private_key: Some(PrivateKey::from_hex(&hex_key(0x48)).unwrap()),
            listen_port: 51820,
            fwmark: 7,
            peers: vec![a, b],
        }
    }

    #[test]
    fn get_reply_in_wireguard_go_order() {
        let text = sample_reply().to_text();
        let keys: Vec<&str> = text.lines().map(|l| l.split('=').next().unwrap()).collect();
        assert_eq!(
            keys[..14],
            [
                "private_key",
                "listen_port",
                "fwmark",
                "public_key",
                "preshared_key",
                "protocol_version",
                "endpoint",
                "last_handshake_time_sec",
                "last_handshake_time_nsec",
                "tx_bytes",
                "rx_bytes",
                "persistent_keepalive_interval",
                "allowed_ip",
                "allowed_ip",
            ]
        );
        assert!(text.contains("last_handshake_time_nsec=123456789\n"));
        // A peer that never shook hands: zeros, no endpoint, a zero psk.
        let tail: Vec<&str> = text.lines().skip(14).collect();
        assert_eq!(tail[1], format!("preshared_key={}", "0".repeat(64)));
        assert!(tail.contains(&"last_handshake_time_sec=0"));
        assert!(!tail.iter().any(|l| l.starts_with("endpoint=")));
    }

    #[test]
    fn get_reply_round_trips() {
        let r = sample_reply();
        let text = format!("{}errno=0\n\n", r.to_text());
        assert_eq!(parse_get(&text).unwrap(), r);
        let e = parse_get("errno=22\n\n").unwrap_err();
        assert_eq!(e.errno(), 22);
        let e = parse_get("listen_port=1\nbogus=1\n").unwrap_err();
        assert_eq!(e.line(), Some(2));
    }
}
