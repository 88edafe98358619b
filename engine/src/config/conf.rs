//! The wg-quick `.conf` format: parse and emit.
//!
//! Keys the engine uses are validated; wg-quick-only keys (DNS, Table,
//! PreUp/PostUp/PreDown/PostDown, SaveConfig) are accepted and ignored. An
//! unknown key or a malformed value is an error that names the line and key.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};

use super::{Config, InterfaceConfig, PeerConfig, PresharedKey, PrivateKey, PublicKey};
use crate::router::IpPrefix;

/// A `.conf` file that cannot be used, with the 1-based line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {key}: {message}")]
pub struct ConfError {
    pub line: usize,
    pub key: String,
    pub message: String,
}

const WG_QUICK_ONLY: &[&str] = &[
    "dns",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
];

#[derive(PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// Parses a wg-quick configuration. `resolve` turns `host:port` endpoints
/// that are not literal addresses into a socket address (the runtime passes
/// the system resolver; tests pass their own).
pub fn parse_wg_quick(text: &str) -> Result<Config, ConfError> {
    parse_wg_quick_with(text, &mut |host| {
        host.to_socket_addrs().ok().and_then(|mut a| a.next())
    })
}

pub fn parse_wg_quick_with(
    text: &str,
    resolve: &mut dyn FnMut(&str) -> Option<SocketAddr>,
) -> Result<Config, ConfError> {
    let mut cfg = Config::default();
    let mut section = Section::None;
    let mut seen_interface = false;
    let mut peer_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |key: &str, message: String| ConfError {
            line: line_no,
            key: key.to_string(),
            message,
        };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            let name = line.trim_start_matches('[').trim_end_matches(']').trim();
            finish_peer(&cfg, section == Section::Peer, peer_line)?;
            section = match name.to_ascii_lowercase().as_str() {
                "interface" if !seen_interface => {
                    seen_interface = true;
                    Section::Interface
                }
                "interface" => return Err(err(name, "a second [Interface] section".into())),
                "peer" => {
                    peer_line = line_no;
                    cfg.peers
                        .push(PeerConfig::new(PublicKey::from_bytes([0; 32])));
                    Section::Peer
                }
                _ => {
                    return Err(err(
                        name,
                        "unknown section (expected [Interface] or [Peer])".into(),
                    ))
                }
            };
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| err(line, "expected `Key = Value`".into()))?;
        let lower = key.to_ascii_lowercase();
        match section {
            Section::None => {
                return Err(err(
                    key,
                    "appears before any [Interface] or [Peer] section".into(),
                ))
            }
            Section::Interface => {
                parse_interface_key(&mut cfg.interface, &lower, value).map_err(|m| err(key, m))?
            }
            Section::Peer => {
                let peer = cfg
                    .peers
                    .last_mut()
                    .expect("a [Peer] section pushed a peer");
                parse_peer_key(peer, &lower, value, resolve).map_err(|m| err(key, m))?
            }
        }
    }
    finish_peer(&cfg, section == Section::Peer, peer_line)?;
    Ok(cfg)
}

fn finish_peer(cfg: &Config, in_peer: bool, line: usize) -> Result<(), ConfError> {
    if in_peer {
        let p = cfg.peers.last().expect("in a peer section");
        if p.public_key.as_bytes() == &[0u8; 32] {
            return Err(ConfError {
                line,
                key: "Peer".into(),
                message: "section has no PublicKey".into(),
            });
        }
    }
    Ok(())
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_interface_key(i: &mut InterfaceConfig, key: &str, value: &str) -> Result<(), String> {
    match key {
        "privatekey" => {
            i.private_key = Some(PrivateKey::from_base64(value).map_err(|e| e.reason())?)
        }
        "listenport" => {
            i.listen_port = Some(
                value
                    .parse()
                    .map_err(|_| format!("`{value}` is not a port (0-65535)"))?,
            )
        }
        "address" => {
            for a in list(value) {
                i.addresses
                    .push(a.parse::<IpPrefix>().map_err(|e| e.to_string())?);
            }
        }
        "mtu" => {
            let mtu: u16 = value
                .parse()
                .map_err(|_| format!("`{value}` is not an MTU"))?;
            if !(576..=65535).contains(&mtu) {
                return Err(format!("MTU {mtu} is below the minimum of 576"));
            }
            i.mtu = Some(mtu)
        }
        "fwmark" => {
            i.fwmark = if value == "off" {
                None
            } else if let Some(hex) = value.strip_prefix("0x") {
                Some(
                    u32::from_str_radix(hex, 16)
                        .map_err(|_| format!("`{value}` is not a fwmark"))?,
                )
            } else {
                Some(
                    value
                        .parse()
                        .map_err(|_| format!("`{value}` is not a fwmark"))?,
                )
            }
        }
        k if WG_QUICK_ONLY.contains(&k) => {}
        _ => return Err("unknown key in [Interface]".into()),
    }
    Ok(())
}

fn parse_peer_key(
    p: &mut PeerConfig,
    key: &str,
    value: &str,
    resolve: &mut dyn FnMut(&str) -> Option<SocketAddr>,
) -> Result<(), String> {
    match key {
        "publickey" => p.public_key = PublicKey::from_base64(value).map_err(|e| e.reason())?,
        "presharedkey" => {
            p.preshared_key = Some(PresharedKey::from_base64(value).map_err(|e| e.reason())?)
        }
        "allowedips" => {
            for a in list(value) {
                p.allowed_ips
                    .push(a.parse::<IpPrefix>().map_err(|e| e.to_string())?);
            }
        }
        "endpoint" => p.endpoint = Some(parse_endpoint(value, resolve)?),
        "persistentkeepalive" => {
            p.persistent_keepalive = if value == "off" {
                None
            } else {
                let s: u16 = value.parse().map_err(|_| {
                    format!("`{value}` is not a number of seconds (0-65535) or `off`")
                })?;
                (s != 0).then_some(s)
            }
        }
        _ => return Err("unknown key in [Peer]".into()),
    }
    Ok(())
}

/// `1.2.3.4:51820`, `[fd00::1]:51820` or `host.example:51820`.
pub(crate) fn parse_endpoint(
    value: &str,
    resolve: &mut dyn FnMut(&str) -> Option<SocketAddr>,
) -> Result<SocketAddr, String> {
    if let Ok(a) = value.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("`{value}` is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("`{value}` is not host:port"));
    }
    resolve(value).ok_or_else(|| format!("cannot resolve `{host}`"))
}

/// Emits a configuration as wg-quick text. Private and preshared keys are
/// written: the output is a secret and belongs in a file only its owner reads.
pub fn emit_wg_quick(cfg: &Config) -> String {
    let mut s = String::from("[Interface]\n");
    let i = &cfg.interface;
    if let Some(k) = &i.private_key {
        let _ = writeln!(s, "PrivateKey = {}", k.to_base64());
    }
    if let Some(p) = i.listen_port {
        let _ = writeln!(s, "ListenPort = {p}");
    }
    if !i.addresses.is_empty() {
        let _ = writeln!(s, "Address = {}", join(&i.addresses));
    }
    if let Some(m) = i.mtu {
        let _ = writeln!(s, "MTU = {m}");
    }
    if let Some(f) = i.fwmark {
        let _ = writeln!(s, "FwMark = {f}");
    }
    for p in &cfg.peers {
        let _ = writeln!(s, "\n[Peer]\nPublicKey = {}", p.public_key.to_base64());
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(s, "PresharedKey = {}", k.to_base64());
        }
        if !p.allowed_ips.is_empty() {
            let _ = writeln!(s, "AllowedIPs = {}", join(&p.allowed_ips));
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "Endpoint = {e}");
        }
        if let Some(k) = p.persistent_keepalive {
            let _ = writeln!(s, "PersistentKeepalive = {k}");
        }
    }
    s
}

fn join(v: &[IpPrefix]) -> String {
    v.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const B_PUB: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn sample() -> String {
        format!(
            "# a comment\n[Interface]\nPrivateKey = {A_PRIV}\nListenPort = 51820\n\
             Address = 10.0.0.1/24, fd00::1/64\nMTU = 1380\nDNS = 1.1.1.1\nPostUp = echo hi\n\n\
             [Peer]\nPublicKey = {B_PUB}\nAllowedIPs = 10.0.0.2/32, fd00::2/128\n\
             Endpoint = [::1]:51821\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn parses_a_full_config() {
        let c = parse_wg_quick(&sample()).unwrap();
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.interface.mtu, Some(1380));
        assert_eq!(c.peers.len(), 1);
        let p = &c.peers[0];
        assert_eq!(p.public_key.to_base64(), B_PUB);
        assert_eq!(p.allowed_ips[1].to_string(), "fd00::2/128");
        assert_eq!(p.endpoint, Some("[::1]:51821".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
    }

    #[test]
    fn emit_then_parse_is_identity() {
        let c = parse_wg_quick(&sample()).unwrap();
        let again = parse_wg_quick(&emit_wg_quick(&c)).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad = sample().replace("ListenPort = 51820", "ListenPort = 70000");
        let e = parse_wg_quick(&bad).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (4, "ListenPort"));
        let e = parse_wg_quick(&sample().replace("MTU", "Mtux")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "Mtux"));
        assert!(e.to_string().contains("unknown key"));
        let e = parse_wg_quick(&sample().replace("fd00::2/128", "fd00::2/200")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (12, "AllowedIPs"));
        let e = parse_wg_quick("[Interface]\n[Peer]\nAllowedIPs = 10.0.0.0/8\n").unwrap_err();
        assert!(e.message.contains("no PublicKey"), "{e}");
        let e = parse_wg_quick("PrivateKey = x\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_wg_quick("[Interface]\nPrivateKey = short\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "PrivateKey"));
        // The field is named once, by the line prefix.
        assert_eq!(
            e.to_string(),
            "line 2: PrivateKey: not valid base64 (a WireGuard key is 44 base64 characters)"
        );
    }

    #[test]
    fn endpoints_resolve_names_through_the_resolver() {
        let text = format!("[Peer]\nPublicKey = {B_PUB}\nEndpoint = node-b.example:51820\n");
        let mut calls = Vec::new();
        let c = parse_wg_quick_with(&text, &mut |h| {
            calls.push(h.to_string());
            Some("192.0.2.7:51820".parse().unwrap())
        })
        .unwrap();
        assert_eq!(calls, vec!["node-b.example:51820"]);
        assert_eq!(
            c.peers[0].endpoint,
            Some("192.0.2.7:51820".parse().unwrap())
        );
        let e = parse_wg_quick_with(&text, &mut |_| None).unwrap_err();
        assert!(e.message.contains("cannot resolve"), "{e}");
        let e = parse_wg_quick_with(&text.replace(":51820", ""), &mut |_| None).unwrap_err();
        assert!(e.message.contains("host:port"), "{e}");
    }
}
