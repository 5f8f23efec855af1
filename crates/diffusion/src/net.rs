//! Socket addresses as the plugin captured them (raw `struct sockaddr_*`
//! bytes from guest memory: untrusted, any length).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Most bytes of a unix socket path kept (`sun_path` is 108 bytes).
const MAX_UNIX_PATH: usize = 108;
const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A peer or local address of a socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetAddr {
    /// IPv4 or IPv6 (v4-mapped v6 addresses are stored as v4).
    Inet(SocketAddr),
    /// A unix socket path; abstract names start with `@`; empty when unnamed.
    Unix(String),
}

impl NetAddr {
    /// Decodes a captured `struct sockaddr`; `None` for families that carry
    /// no content between processes we can follow (netlink, packet) or junk.
    pub fn parse(bytes: &[u8]) -> Option<NetAddr> {
        let family = u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]);
        match family {
            AF_UNIX => {
                let path = bytes.get(2..).unwrap_or(&[]);
                let path = &path[..path.len().min(MAX_UNIX_PATH)];
                let name = if path.first() == Some(&0) {
                    // Abstract: the name is every byte after the leading NUL.
                    let rest = &path[1..];
                    let end = rest.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
                    format!("@{}", String::from_utf8_lossy(&rest[..end]))
                } else {
                    let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                    String::from_utf8_lossy(&path[..end]).into_owned()
                };
                Some(NetAddr::Unix(name))
            }
            AF_INET => {
                let b = bytes.get(..8)?;
                let port = u16::from_be_bytes([b[2], b[3]]);
                let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
                Some(NetAddr::Inet(SocketAddr::new(IpAddr::V4(ip), port)))
            }
            AF_INET6 => {
                let b = bytes.get(..24)?;
                let port = u16::from_be_bytes([b[2], b[3]]);
                let mut a = [0u8; 16];
                a.copy_from_slice(&b[8..24]);
                let ip = canonical(IpAddr::V6(Ipv6Addr::from(a)));
                Some(NetAddr::Inet(SocketAddr::new(ip, port)))
            }
            _ => None,
        }
    }

    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            NetAddr::Inet(sa) => Some(*sa),
            NetAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for NetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetAddr::Inet(sa) => write!(f, "{sa}"),
            NetAddr::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

/// v4-mapped IPv6 (`::ffff:a.b.c.d`) as IPv4, so both spellings compare equal.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Loopback or unspecified (`0.0.0.0`, `::`: a connect to it reaches this host).
pub fn is_host_local(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    ip.is_loopback() || ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_family_and_rejects_junk() {
        assert_eq!(
            NetAddr::parse(&[2, 0, 0x1f, 0x90, 10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0]),
            Some(NetAddr::Inet("10.0.2.2:8080".parse().unwrap()))
        );
        let mut v6 = vec![10, 0, 0, 80, 0, 0, 0, 0];
        v6.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 3, 2]);
        assert_eq!(
            NetAddr::parse(&v6),
            Some(NetAddr::Inet("10.0.3.2:80".parse().unwrap()))
        );
        assert_eq!(
            NetAddr::parse(b"\x01\x00/run/x\x00junk"),
            Some(NetAddr::Unix("/run/x".into()))
        );
        assert_eq!(
            NetAddr::parse(b"\x01\x00\x00name\x00\x00"),
            Some(NetAddr::Unix("@name".into()))
        );
        assert_eq!(NetAddr::parse(&[1, 0]), Some(NetAddr::Unix(String::new())));
        assert_eq!(NetAddr::parse(&[2, 0, 1]), None);
        assert_eq!(NetAddr::parse(&[16, 0, 0, 0]), None);
        assert_eq!(NetAddr::parse(&[]), None);
        assert!(is_host_local("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_host_local("0.0.0.0".parse().unwrap()));
        assert!(!is_host_local("10.0.2.2".parse().unwrap()));
    }
}
