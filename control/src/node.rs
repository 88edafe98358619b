//! Node registration records and their mesh addresses.
//!
//! Every node gets one IPv4 address from a configurable prefix (default
//! [`DEFAULT_IPV4_PREFIX`], the shared address space Tailscale also uses)
//! and one IPv6 address in a unique local prefix of its mesh (RFC 4193: `fd`
//! and 40 random bits chosen when the database is created, so two meshes
//! never share one). The IPv6 address carries the IPv4 address in its last
//! 32 bits, as Tailscale's `fd7a:115c:a1e0::/48` addresses do, so the two
//! are unique together and a reader can tell one from the other.
//!
//! Allocation is next-fit: a cursor stored with the mesh moves forward past
//! each address handed out and wraps at the end of the prefix. A removed
//! node's address is therefore not handed out again until the whole prefix
//! has been used once, so peers that still hold a stale map entry or ACL for
//! it do not meet a new node under the old address. A live node's address
//! is never handed out (the store also has a UNIQUE constraint on it).
//!
//! This file is sans-IO: the store asks it for candidates and answers
//! whether one is in use.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshvpn_engine::{IpPrefix, PublicKey};

/// The IPv4 prefix nodes get their addresses from unless configured
/// otherwise (RFC 6598 shared address space, as Tailscale and headscale).
pub const DEFAULT_IPV4_PREFIX: &str = "100.64.0.0/10";

/// The longest name a node gets: one DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// A registered node, as stored: enough to build its entry in the network
/// map (key, addresses, name, tags) and to decide its fate (ephemeral).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// Never reused, even after removal (SQLite AUTOINCREMENT).
    pub id: i64,
    pub public_key: PublicKey,
    /// A DNS label, unique in the mesh.
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// From the join key the node last registered with.
    pub tags: Vec<String>,
    /// Removed some time after it disconnects (the server's job).
    pub ephemeral: bool,
    /// The cluster it belongs to, from the join key it last registered
    /// with; `None`: the unlabelled cluster. Routes of nodes in different
    /// clusters must not overlap (see `crate::routes`).
    pub cluster: Option<String>,
    /// The join key it last registered with.
    pub join_key: Option<String>,
    pub created: u64,
    pub updated: u64,
    /// Since when it has had no connection to the server (set at
    /// registration, cleared while connected); ephemeral nodes offline
    /// long enough are removed.
    pub offline_since: Option<u64>,
}

/// What a node asks for when it registers. Its proof of holding the private
/// key is checked by the protocol layer before this reaches the store.
#[derive(Clone, Debug)]
pub struct NodeRequest {
    pub public_key: PublicKey,
    /// The node's host name; it becomes a DNS label (see [`node_name`]).
    pub hostname: String,
}

/// Where a mesh's addresses come from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AddressPlan {
    ipv4_base: u32,
    ipv4_len: u8,
    /// `fd` and the mesh's 40-bit global ID: the /48.
    ula: [u8; 6],
}

impl fmt::Debug for AddressPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {}/48",
            self.ipv4_prefix().addr(),
            self.ipv4_len,
            self.ula_prefix()
        )
    }
}

/// Why an IPv4 prefix cannot hold nodes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the node address prefix must be IPv4, got {0}")]
    NotIpv4(String),
    #[error("the node address prefix {0} is too small: use /30 or shorter")]
    TooSmall(String),
}

impl AddressPlan {
    /// `ipv4` is normalised to its network; it must leave at least two
    /// usable addresses besides the network and last ones (/30 or shorter).
    pub fn new(ipv4: IpPrefix, ula_global_id: [u8; 5]) -> Result<Self, PlanError> {
        let IpAddr::V4(v4) = ipv4.network().addr() else {
            return Err(PlanError::NotIpv4(ipv4.to_string()));
        };
        if ipv4.len() > 30 {
            return Err(PlanError::TooSmall(ipv4.to_string()));
        }
        let mut ula = [0u8; 6];
        ula[0] = 0xfd;
        ula[1..].copy_from_slice(&ula_global_id);
        Ok(Self {
            ipv4_base: u32::from(v4),
            ipv4_len: ipv4.len(),
            ula,
        })
    }

    pub fn ipv4_prefix(&self) -> IpPrefix {
        IpPrefix::new(IpAddr::V4(Ipv4Addr::from(self.ipv4_base)), self.ipv4_len)
            .expect("length checked in new")
    }

    /// The mesh's IPv6 /48.
    pub fn ula_prefix(&self) -> IpPrefix {
        IpPrefix::new(IpAddr::V6(self.ipv6_for(Ipv4Addr::UNSPECIFIED)), 48)
            .expect("48 is a valid IPv6 length")
    }

    /// The node's IPv6 address: the mesh's /48, subnet 0, and the IPv4
    /// address in the last 32 bits.
    pub fn ipv6_for(&self, v4: Ipv4Addr) -> Ipv6Addr {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.ula);
        b[12..].copy_from_slice(&v4.octets());
        Ipv6Addr::from(b)
    }

    /// Offsets 1 ..= size-2 inside the prefix: the network and the last
    /// address are never given to a node.
    fn usable(&self) -> (u32, u32) {
        let size = 1u64 << (32 - self.ipv4_len);
        (1, (size - 2) as u32)
    }

    /// Next-fit allocation: the first address from `cursor` on (wrapping)
    /// for which `in_use` says no. `cursor` is an offset inside the prefix
    /// as returned with the previous address. Returns the address and the
    /// cursor to store for the next call, or `None` when every address is
    /// taken.
    pub fn allocate<E>(
        &self,
        cursor: u32,
        mut in_use: impl FnMut(Ipv4Addr) -> Result<bool, E>,
    ) -> Result<Option<(Ipv4Addr, u32)>, E> {
        let (first, last) = self.usable();
        let count = last - first + 1;
        let start = if (first..=last).contains(&cursor) {
            cursor
        } else {
            first
        };
        for i in 0..count {
            let offset = first + (start - first + i) % count;
            let addr = Ipv4Addr::from(self.ipv4_base + offset);
            if !in_use(addr)? {
                let next = if offset == last { first } else { offset + 1 };
                return Ok(Some((addr, next)));
            }
        }
        Ok(None)
    }
}

/// A host name made into one lowercase DNS label: letters, digits and
/// dashes, at most [`MAX_NAME_LEN`], never empty (`node`).
pub fn node_name(hostname: &str) -> String {
    let first_label = hostname.split('.').next().unwrap_or("");
    let mut name: String = first_label
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(MAX_NAME_LEN)
        .collect();
    while name.ends_with('-') {
        name.pop();
    }
    while name.starts_with('-') {
        name.remove(0);
    }
    if name.is_empty() {
        name.push_str("node");
    }
    name
}

/// `base` if it is free, else `base-2`, `base-3`, ... (shortening `base`
/// so the result stays one label), as headscale dedupes given names.
pub fn unique_name<E>(
    base: &str,
    mut taken: impl FnMut(&str) -> Result<bool, E>,
) -> Result<String, E> {
    if !taken(base)? {
        return Ok(base.to_string());
    }
    let mut n: u64 = 2;
    loop {
        let suffix = format!("-{n}");
        let keep = MAX_NAME_LEN.saturating_sub(suffix.len()).min(base.len());
        let candidate = format!("{}{suffix}", &base[..keep]);
        if !taken(&candidate)? {
            return Ok(candidate);
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::convert::Infallible;

    fn plan(prefix: &str) -> AddressPlan {
        AddressPlan::new(prefix.parse().unwrap(), [0x12, 0x34, 0x56, 0x78, 0x9a]).unwrap()
    }

    #[test]
    fn ipv6_embeds_ipv4_under_the_mesh_ula() {
        let p = plan(DEFAULT_IPV4_PREFIX);
        let v6 = p.ipv6_for(Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(v6, "fd12:3456:789a::6440:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.ula_prefix().to_string(), "fd12:3456:789a::/48");
    }

    #[test]
    fn allocation_skips_network_last_and_used_and_wraps() {
        let p = plan("10.9.0.0/29"); // usable .1 - .6
        let mut used: HashSet<Ipv4Addr> = HashSet::new();
        let mut cursor = 0;
        let mut got = vec![];
        while let Some((a, next)) = p
            .allocate(cursor, |a| Ok::<_, Infallible>(used.contains(&a)))
            .unwrap()
        {
            used.insert(a);
            got.push(a.octets()[3]);
            cursor = next;
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
        // Free .2: next-fit wraps round to it.
        used.remove(&Ipv4Addr::new(10, 9, 0, 2));
        let (a, _) = p
            .allocate(cursor, |a| Ok::<_, Infallible>(used.contains(&a)))
            .unwrap()
            .unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn a_removed_address_is_not_reused_before_the_prefix_wraps() {
        let p = plan("10.9.0.0/24");
        let (a, cursor) = p
            .allocate(0, |_| Ok::<_, Infallible>(false))
            .unwrap()
            .unwrap();
        // `a` is removed (no longer in use): the next allocation still moves on.
        let (b, _) = p
            .allocate(cursor, |_| Ok::<_, Infallible>(false))
            .unwrap()
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn plan_rejects_ipv6_and_tiny_prefixes() {
        let z = [0; 5];
        assert!(matches!(
            AddressPlan::new("fd00::/64".parse().unwrap(), z),
            Err(PlanError::NotIpv4(_))
        ));
        assert!(matches!(
            AddressPlan::new("10.0.0.0/31".parse().unwrap(), z),
            Err(PlanError::TooSmall(_))
        ));
    }

    #[test]
    fn names_are_dns_labels_and_unique() {
        assert_eq!(node_name("Web_Server.example.com"), "web-server");
        assert_eq!(node_name("..."), "node");
        assert_eq!(node_name(&"x".repeat(100)).len(), MAX_NAME_LEN);
        let taken = ["db".to_string(), "db-2".to_string()];
        let n = unique_name("db", |c| Ok::<_, Infallible>(taken.iter().any(|t| t == c))).unwrap();
        assert_eq!(n, "db-3");
        let long = "y".repeat(MAX_NAME_LEN);
        let n = unique_name(&long, |c| Ok::<_, Infallible>(c == long)).unwrap();
        assert_eq!(n.len(), MAX_NAME_LEN);
        assert!(n.ends_with("-2"));
    }
}
