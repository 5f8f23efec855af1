//! Sockets held by processes: from each socket fd, `file->private_data` is the
//! `struct socket`, whose `sk` holds addresses, ports and state.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{FileKind, LinuxGuest, Listing, Warning};
use crate::paging::PagingError;

/// Address families (include/linux/socket.h; ABI).
const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AF_NETLINK: u16 = 16;
const AF_PACKET: u16 = 17;
/// Socket types (ABI).
const SOCK_STREAM: u16 = 1;
const SOCK_DGRAM: u16 = 2;
const SOCK_RAW: u16 = 3;

/// The socket's address family, as users know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketFamily {
    Unix,
    Inet,
    Inet6,
    Netlink,
    Packet,
    Other(u16),
}

/// One socket and the processes holding it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Socket {
    /// Socket inode (the N in `socket:[N]`).
    pub inode: u64,
    pub family: SocketFamily,
    /// "tcp", "udp", "raw", "stream", "dgram", ...
    pub protocol: String,
    pub local: Option<(IpAddr, u16)>,
    pub remote: Option<(IpAddr, u16)>,
    /// Kernel `sk_state` (TCP: 1 ESTABLISHED .. 10 LISTEN, as in /proc/net/tcp).
    pub state: u8,
    pub state_name: &'static str,
    /// (pid, comm, fd) of every holder.
    pub owners: Vec<(i32, String, u32)>,
    /// Address of the `struct sock`.
    pub sock: u64,
}

/// TCP state names (include/net/tcp_states.h).
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

impl LinuxGuest {
    /// Every socket some process holds open, once per socket.
    pub fn sockets(&self) -> Listing<Socket> {
        let files = self.open_files(None);
        let mut warnings = files.warnings;
        let mut by_inode: BTreeMap<u64, Socket> = BTreeMap::new();
        for f in files
            .items
            .into_iter()
            .filter(|f| f.kind == FileKind::Socket)
        {
            if let Some(s) = by_inode.get_mut(&f.inode) {
                s.owners.push((f.pid, f.comm, f.fd));
                continue;
            }
            match self.read_socket(f.file, f.inode) {
                Ok(mut s) => {
                    s.owners.push((f.pid, f.comm, f.fd));
                    by_inode.insert(f.inode, s);
                }
                Err(e) => warnings.push(Warning {
                    message: format!("pid {} fd {} socket:[{}]: {e}", f.pid, f.fd, f.inode),
                }),
            }
        }
        Listing {
            items: by_inode.into_values().collect(),
            warnings,
        }
    }

    fn read_socket(&self, file: u64, inode: u64) -> Result<Socket, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let socket = self.read_ptr(file + l.file_private_data)?;
        let sock_type = k.read_u16(socket + l.socket_type)?;
        let sk = self.read_ptr(socket + l.socket_sk)?;
        let family = k.read_u16(sk + l.sk_family)?;
        let state = k.read_u8(sk + l.sk_state)?;
        let family = match family {
            AF_UNIX => SocketFamily::Unix,
            AF_INET => SocketFamily::Inet,
            AF_INET6 => SocketFamily::Inet6,
            AF_NETLINK => SocketFamily::Netlink,
            AF_PACKET => SocketFamily::Packet,
            other => SocketFamily::Other(other),
        };
        let protocol = match (family, sock_type) {
            (SocketFamily::Inet | SocketFamily::Inet6, SOCK_STREAM) => "tcp",
            (SocketFamily::Inet | SocketFamily::Inet6, SOCK_DGRAM) => "udp",
            (_, SOCK_RAW) => "raw",
            (_, SOCK_STREAM) => "stream",
            (_, SOCK_DGRAM) => "dgram",
            _ => "other",
        }
        .to_string();
        let (local, remote) = match family {
            SocketFamily::Inet => {
                let src = Ipv4Addr::from(k.read_u32(sk + l.sk_rcv_saddr)?.to_le_bytes());
                let dst = Ipv4Addr::from(k.read_u32(sk + l.sk_daddr)?.to_le_bytes());
                self.ports(sk, IpAddr::V4(src), IpAddr::V4(dst))?
            }
            SocketFamily::Inet6 => match (l.sk_v6_rcv_saddr, l.sk_v6_daddr) {
                (Some(so), Some(do_)) => {
                    let mut a = [0u8; 16];
                    let mut b = [0u8; 16];
                    k.read(sk + so, &mut a)?;
                    k.read(sk + do_, &mut b)?;
                    self.ports(
                        sk,
                        IpAddr::V6(Ipv6Addr::from(a)),
                        IpAddr::V6(Ipv6Addr::from(b)),
                    )?
                }
                _ => (None, None),
            },
            _ => (None, None),
        };
        let state_name = if protocol == "tcp" {
            tcp_state_name(state)
        } else {
            match state {
                1 => "ESTABLISHED",
                7 => "CLOSE",
                _ => "-",
            }
        };
        Ok(Socket {
            inode,
            family,
            protocol,
            local,
            remote,
            state,
            state_name,
            owners: Vec::new(),
            sock: sk,
        })
    }

    #[allow(clippy::type_complexity)]
    fn ports(
        &self,
        sk: u64,
        src: IpAddr,
        dst: IpAddr,
    ) -> Result<(Option<(IpAddr, u16)>, Option<(IpAddr, u16)>), PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let sport = k.read_u16(sk + l.sk_num)?; // host order
        let dport = u16::from_be(k.read_u16(sk + l.sk_dport)?); // network order
        Ok((Some((src, sport)), Some((dst, dport))))
    }
}
