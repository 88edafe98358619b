//! An IP prefix (`10.0.0.0/24`, `fd00::/64`) as used in AllowedIPs and Address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address with a prefix length. `addr` keeps the host bits as given
/// (an interface `Address = 10.0.0.1/24` needs them); [`IpPrefix::network`]
/// masks them off.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("`{0}` is not an IP address")]
    Address(String),
    #[error("`{0}` is not a prefix length (0-32 for IPv4, 0-128 for IPv6)")]
    Length(String),
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        if len > max_len(addr) {
            return Err(PrefixError::Length(len.to_string()));
        }
        Ok(IpPrefix { addr, len })
    }
    /// The single-address prefix (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        IpPrefix {
            addr,
            len: max_len(addr),
        }
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    #[allow(clippy::len_without_is_empty)] // a prefix length, not a size
    pub fn len(&self) -> u8 {
        self.len
    }
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
    /// The prefix with its host bits cleared.
    pub fn network(&self) -> IpPrefix {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.len))),
        };
        IpPrefix {
            addr,
            len: self.len,
        }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)) & mask32(self.len) == 0,
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                (u128::from(a) ^ u128::from(b)) & mask128(self.len) == 0
            }
            _ => false,
        }
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - len as u32).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - len as u32).unwrap_or(0)
}

impl FromStr for IpPrefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| PrefixError::Address(addr.to_string()))?;
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .map_err(|_| PrefixError::Length(l.to_string()))?,
            None => max_len(addr),
        };
        IpPrefix::new(addr, len)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let p: IpPrefix = "10.1.2.3/24".parse().unwrap();
        assert_eq!(p.to_string(), "10.1.2.3/24");
        assert_eq!(p.network().to_string(), "10.1.2.0/24");
        assert_eq!("fd00::1".parse::<IpPrefix>().unwrap().len(), 128);
        assert_eq!("0.0.0.0/0".parse::<IpPrefix>().unwrap().network().len(), 0);
        assert!(matches!(
            "10.0.0.0/33".parse::<IpPrefix>(),
            Err(PrefixError::Length(_))
        ));
        assert!(matches!(
            "10.0.0/8".parse::<IpPrefix>(),
            Err(PrefixError::Address(_))
        ));
        assert!(matches!(
            "::/129".parse::<IpPrefix>(),
            Err(PrefixError::Length(_))
        ));
    }

    #[test]
    fn contains() {
        let p: IpPrefix = "10.0.0.0/8".parse().unwrap();
        assert!(p.contains("10.255.0.1".parse().unwrap()));
        assert!(!p.contains("11.0.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let all: IpPrefix = "::/0".parse().unwrap();
        assert!(all.contains("fd00::5".parse().unwrap()));
    }
}
