//! `meshvpn_config`, `meshvpn_peer_config` and `meshvpn_peer_update`: the
//! plain C structs that describe an engine and its peers, and their
//! translation into the engine's `Config`.
//!
//! The structs only borrow: every pointer in them is read during the call
//! that takes them and never kept, so the caller may free or reuse them
//! as soon as that call returns. Addresses, AllowedIPs and endpoints are
//! text (`"10.0.0.0/24"`, `"192.0.2.1:51820"`), parsed here; an error names
//! the field and index (`peers[1].allowed_ips[0]`).

use std::ffi::c_char;
use std::net::{SocketAddr, ToSocketAddrs};

use ::meshvpn_engine::{Config, InterfaceConfig, IpPrefix, PeerConfig, PeerUpdate};

use crate::error::{meshvpn_result, Error, Result};
use crate::key::meshvpn_key;
use crate::ptr;

/// One peer, as a `[Peer]` section of a wg-quick file.
#[repr(C)]
pub struct meshvpn_peer_config {
    /// The peer's public key. Required.
    pub public_key: meshvpn_key,
    /// A preshared key, or NULL for none.
    pub preshared_key: *const meshvpn_key,
    /// `allowed_ips_len` NUL-terminated prefixes such as `"10.42.1.0/24"`;
    /// may be NULL when `allowed_ips_len` is 0.
    pub allowed_ips: *const *const c_char,
    pub allowed_ips_len: usize,
    /// `"192.0.2.1:51820"`, `"[2001:db8::1]:51820"` or `"host:51820"`
    /// (resolved once, during the call, with the system resolver), or NULL
    /// for none (the peer's endpoint is learnt when it connects).
    pub endpoint: *const c_char,
    /// Seconds between keepalives; 0 disables them.
    pub persistent_keepalive: u16,
}

/// A whole engine, as a wg-quick file.
#[repr(C)]
pub struct meshvpn_config {
    /// The engine's private key, or NULL to start without one (set it later
    /// with `meshvpn_engine_set_private_key`).
    pub private_key: *const meshvpn_key,
    /// UDP port to listen on; 0 picks a free one.
    pub listen_port: u16,
    /// The host's own mesh addresses (`"10.42.0.1/24"`), for the userspace
    /// stack; may be NULL when `addresses_len` is 0.
    pub addresses: *const *const c_char,
    pub addresses_len: usize,
    /// Inner MTU; 0 means the default (1420).
    pub mtu: u16,
    /// SO_MARK for the UDP sockets; 0 means none.
    pub fwmark: u32,
    /// `peers_len` peers; may be NULL when `peers_len` is 0.
    pub peers: *const meshvpn_peer_config,
    pub peers_len: usize,
}

/// `meshvpn_peer_update.flags`: set the endpoint from `endpoint`.
pub const MESHVPN_PEER_UPDATE_ENDPOINT: u32 = 1;
/// `meshvpn_peer_update.flags`: set the keepalive from
/// `persistent_keepalive` (0 disables it).
pub const MESHVPN_PEER_UPDATE_KEEPALIVE: u32 = 1 << 1;
/// `meshvpn_peer_update.flags`: set the preshared key from
/// `preshared_key` (NULL removes it).
pub const MESHVPN_PEER_UPDATE_PRESHARED_KEY: u32 = 1 << 2;
/// `meshvpn_peer_update.flags`: drop the peer's AllowedIPs before adding
/// `allowed_ips` (without it, `allowed_ips` are added to the existing ones).
pub const MESHVPN_PEER_UPDATE_REPLACE_ALLOWED_IPS: u32 = 1 << 3;
/// `meshvpn_peer_update.flags`: create the peer if it does not exist
/// (without it, updating an unknown peer is `MESHVPN_NO_SUCH_PEER`).
pub const MESHVPN_PEER_UPDATE_CREATE: u32 = 1 << 4;
const ALL_UPDATE_FLAGS: u32 = (1 << 5) - 1;

/// A partial change to one peer, as the UAPI's `set` expresses it: only
/// the fields whose flag is set are changed.
#[repr(C)]
pub struct meshvpn_peer_update {
    /// Which peer.
    pub public_key: meshvpn_key,
    /// `MESHVPN_PEER_UPDATE_*` bits.
    pub flags: u32,
    /// With `MESHVPN_PEER_UPDATE_ENDPOINT`: the new endpoint (not NULL).
    pub endpoint: *const c_char,
    /// With `MESHVPN_PEER_UPDATE_KEEPALIVE`: seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// With `MESHVPN_PEER_UPDATE_PRESHARED_KEY`: the key, or NULL to remove it.
    pub preshared_key: *const meshvpn_key,
    /// Prefixes to add (always applied; may be NULL when the length is 0).
    pub allowed_ips: *const *const c_char,
    pub allowed_ips_len: usize,
}

/// Reads the C config.
///
/// # Safety
/// Every pointer in `c` is NULL or valid as its field's doc says.
pub(crate) unsafe fn read_config(c: &meshvpn_config) -> Result<Config> {
    // SAFETY: forwarded promises about the struct's pointers.
    let private_key = unsafe { c.private_key.as_ref() }.map(meshvpn_key::private);
    // SAFETY: as above.
    let addresses = unsafe { read_prefixes(c.addresses, c.addresses_len, "addresses") }?;
    // SAFETY: as above.
    let peers_c = unsafe { ptr::try_slice(c.peers, c.peers_len, "peers") }?;
    let mut peers = Vec::with_capacity(peers_c.len());
    for (i, p) in peers_c.iter().enumerate() {
        // SAFETY: as above, for each peer.
        peers.push(unsafe { read_peer(p, &format!("peers[{i}]")) }?);
    }
    Ok(Config {
        interface: InterfaceConfig {
            private_key,
            listen_port: Some(c.listen_port),
            addresses,
            mtu: (c.mtu != 0).then_some(c.mtu),
            fwmark: (c.fwmark != 0).then_some(c.fwmark),
        },
        peers,
    })
}

/// Reads one C peer; `field` names it in errors.
///
/// # Safety
/// As `read_config`.
pub(crate) unsafe fn read_peer(p: &meshvpn_peer_config, field: &str) -> Result<PeerConfig> {
    let mut cfg = PeerConfig::new(p.public_key.public());
    // SAFETY: forwarded promises.
    cfg.preshared_key = unsafe { p.preshared_key.as_ref() }.map(meshvpn_key::preshared);
    // SAFETY: as above.
    cfg.allowed_ips = unsafe {
        read_prefixes(
            p.allowed_ips,
            p.allowed_ips_len,
            &format!("{field}.allowed_ips"),
        )
    }?;
    // SAFETY: as above.
    if let Some(e) = unsafe { ptr::try_opt_str(p.endpoint, &format!("{field}.endpoint")) }? {
        cfg.endpoint = Some(parse_endpoint(e, &format!("{field}.endpoint"))?);
    }
    cfg.persistent_keepalive = (p.persistent_keepalive != 0).then_some(p.persistent_keepalive);
    Ok(cfg)
}

/// Reads a C peer update into the public key and the engine's update.
///
/// # Safety
/// As `read_config`.
pub(crate) unsafe fn read_update(
    u: &meshvpn_peer_update,
) -> Result<(::meshvpn_engine::PublicKey, PeerUpdate, bool)> {
    if u.flags & !ALL_UPDATE_FLAGS != 0 {
        return Err(Error::invalid(format!(
            "flags: {:#x} has bits no MESHVPN_PEER_UPDATE_* defines",
            u.flags
        )));
    }
    let has = |f: u32| u.flags & f != 0;
    let mut update = PeerUpdate {
        replace_allowed_ips: has(MESHVPN_PEER_UPDATE_REPLACE_ALLOWED_IPS),
        ..Default::default()
    };
    // SAFETY: forwarded promises.
    update.allowed_ips = unsafe { read_prefixes(u.allowed_ips, u.allowed_ips_len, "allowed_ips") }?;
    if has(MESHVPN_PEER_UPDATE_ENDPOINT) {
        // SAFETY: as above.
        let e = unsafe { ptr::try_str(u.endpoint, "endpoint") }?;
        update.endpoint = Some(parse_endpoint(e, "endpoint")?);
    }
    if has(MESHVPN_PEER_UPDATE_KEEPALIVE) {
        update.persistent_keepalive =
            Some((u.persistent_keepalive != 0).then_some(u.persistent_keepalive));
    }
    if has(MESHVPN_PEER_UPDATE_PRESHARED_KEY) {
        // SAFETY: as above.
        update.preshared_key =
            Some(unsafe { u.preshared_key.as_ref() }.map(meshvpn_key::preshared));
    }
    Ok((
        u.public_key.public(),
        update,
        has(MESHVPN_PEER_UPDATE_CREATE),
    ))
}

/// # Safety
/// `list` is NULL or points to `len` NUL-terminated strings.
unsafe fn read_prefixes(
    list: *const *const c_char,
    len: usize,
    field: &str,
) -> Result<Vec<IpPrefix>> {
    // SAFETY: forwarded promise.
    let items = unsafe { ptr::try_slice(list, len, field) }?;
    items
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let what = format!("{field}[{i}]");
            // SAFETY: forwarded promise, per element.
            let text = unsafe { ptr::try_str(s, &what) }?;
            text.trim().parse::<IpPrefix>().map_err(|e| {
                Error::new(
                    meshvpn_result::MESHVPN_PREFIX_INVALID,
                    format!("{what}: {e}"),
                )
            })
        })
        .collect()
}

pub(crate) fn parse_endpoint(text: &str, field: &str) -> Result<SocketAddr> {
    let text = text.trim();
    let bad = |why: &str| {
        Error::new(
            meshvpn_result::MESHVPN_ENDPOINT_INVALID,
            format!("{field}: `{text}` {why}"),
        )
    };
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => text
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| bad("does not resolve")),
        _ => Err(bad("is not host:port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshvpn_result::*;

    fn key(b: u8) -> meshvpn_key {
        meshvpn_key { bytes: [b; 32] }
    }

    #[test]
    fn reads_a_full_config_and_names_bad_fields() {
        let ips = [c"10.0.0.2/32".as_ptr(), c"fd00::2/128".as_ptr()];
        let psk = key(3);
        let peers = [meshvpn_peer_config {
            public_key: key(2),
            preshared_key: &psk,
            allowed_ips: ips.as_ptr(),
            allowed_ips_len: 2,
            endpoint: c"127.0.0.1:51820".as_ptr(),
            persistent_keepalive: 25,
        }];
        let pk = key(1);
        let addr = [c"10.0.0.1/24".as_ptr()];
        let mut c = meshvpn_config {
            private_key: &pk,
            listen_port: 0,
            addresses: addr.as_ptr(),
            addresses_len: 1,
            mtu: 0,
            fwmark: 0,
            peers: peers.as_ptr(),
            peers_len: 1,
        };
        // SAFETY: every pointer above is valid.
        let cfg = unsafe { read_config(&c) }.unwrap();
        assert_eq!(cfg.peers[0].allowed_ips.len(), 2);
        assert_eq!(cfg.peers[0].persistent_keepalive, Some(25));
        assert_eq!(cfg.interface.mtu, None);
        assert!(cfg.peers[0].preshared_key.is_some());

        let bad = [c"10.0.0.0/24".as_ptr(), c"10.0.0.0/33".as_ptr()];
        let peers2 = [meshvpn_peer_config {
            allowed_ips: bad.as_ptr(),
            ..peers[0]
        }];
        c.peers = peers2.as_ptr();
        // SAFETY: as above.
        let e = unsafe { read_config(&c) }.unwrap_err();
        assert_eq!(e.code, MESHVPN_PREFIX_INVALID);
        assert!(
            e.message.starts_with("peers[0].allowed_ips[1]"),
            "{}",
            e.message
        );

        let peers3 = [meshvpn_peer_config {
            endpoint: c"nonsense".as_ptr(),
            ..peers[0]
        }];
        c.peers = peers3.as_ptr();
        // SAFETY: as above.
        let e = unsafe { read_config(&c) }.unwrap_err();
        assert_eq!(e.code, MESHVPN_ENDPOINT_INVALID);

        c.peers_len = usize::MAX;
        // SAFETY: the impossible length is refused before reading.
        let e = unsafe { read_config(&c) }.unwrap_err();
        assert_eq!(e.code, MESHVPN_INVALID_ARGUMENT);
    }

    #[test]
    fn update_flags_are_checked() {
        let u = meshvpn_peer_update {
            public_key: key(2),
            flags: 1 << 20,
            endpoint: std::ptr::null(),
            persistent_keepalive: 0,
            preshared_key: std::ptr::null(),
            allowed_ips: std::ptr::null(),
            allowed_ips_len: 0,
        };
        // SAFETY: no pointer is read.
        let r = unsafe { read_update(&u) };
        assert_eq!(r.unwrap_err().code, MESHVPN_INVALID_ARGUMENT);
        let u = meshvpn_peer_update {
            flags: MESHVPN_PEER_UPDATE_ENDPOINT,
            ..u
        };
        // SAFETY: NULL endpoint is refused.
        let r = unsafe { read_update(&u) };
        assert_eq!(r.unwrap_err().code, MESHVPN_NULL_PARAMETER);
        let u = meshvpn_peer_update {
            flags: MESHVPN_PEER_UPDATE_PRESHARED_KEY | MESHVPN_PEER_UPDATE_KEEPALIVE,
            ..u
        };
        // SAFETY: NULL preshared key means removal.
        let (_, upd, create) = unsafe { read_update(&u) }.unwrap();
        assert!(matches!(upd.preshared_key, Some(None)));
        assert!(matches!(upd.persistent_keepalive, Some(None)));
        assert!(!create);
    }
}
