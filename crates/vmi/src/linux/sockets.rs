//! Sockets held by processes: from each socket fd, `file->private_data` is the
//! `struct socket`, whose `sk` holds addresses, ports and state.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{is_kernel_pointer, limits, FileKind, LinuxGuest, Listing, Warning};
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

/// Where one socket hash table hangs off its global (offsets from BTF).
struct HashTable {
    /// Offset of the bucket-array pointer in the global.
    array: u64,
    /// Offset of the `u32` mask (buckets - 1) in the global.
    mask: u64,
    bucket_size: u64,
    /// Offset of the chain head in a bucket.
    head: u64,
    /// `hlist_nulls` chains (end marked by bit 0) rather than NULL-terminated.
    nulls: bool,
}

/// TCP states whose `sock_common` is not a full `struct sock`.
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;
const TCP_SYN_RECV: u8 = 3;

impl LinuxGuest {
    /// Every socket: the kernel's TCP and UDP hash tables (so sockets no
    /// process holds, like TIME_WAIT, are included) plus every socket some
    /// process holds open (unix, netlink, raw, ...), once per socket, with
    /// the processes holding it.
    pub fn sockets(&self) -> Listing<Socket> {
        let files = self.open_files(None);
        let mut warnings = files.warnings;
        let mut by_sock: BTreeMap<u64, Socket> = BTreeMap::new();
        for f in files
            .items
            .into_iter()
            .filter(|f| f.kind == FileKind::Socket)
        {
            let sk = match self.sock_of_file(f.file) {
                Ok(sk) => sk,
                Err(e) => {
                    warnings.push(Warning {
                        message: format!("pid {} fd {} socket:[{}]: {e}", f.pid, f.fd, f.inode),
                    });
                    continue;
                }
            };
            if let Some(s) = by_sock.get_mut(&sk.0) {
                s.owners.push((f.pid, f.comm, f.fd));
                continue;
            }
            match self.read_sock(sk.0, Some(sk.1), f.inode) {
                Ok(mut s) => {
                    s.owners.push((f.pid, f.comm, f.fd));
                    by_sock.insert(sk.0, s);
                }
                Err(e) => warnings.push(Warning {
                    message: format!("pid {} fd {} socket:[{}]: {e}", f.pid, f.fd, f.inode),
                }),
            }
        }
        let mut hashed = self.hashed_sockets();
        warnings.append(&mut hashed.warnings);
        for s in hashed.items {
            by_sock.entry(s.sock).or_insert(s);
        }
        let mut items: Vec<Socket> = by_sock.into_values().collect();
        items.sort_by(|a, b| {
            (a.family, &a.protocol, a.local, a.inode).cmp(&(
                b.family,
                &b.protocol,
                b.local,
                b.inode,
            ))
        });
        Listing { items, warnings }
    }

    /// `(struct sock *, socket type)` of a socket file.
    fn sock_of_file(&self, file: u64) -> Result<(u64, u16), PagingError> {
        let l = self.layout();
        let socket = self.read_ptr(file.wrapping_add(l.file_private_data))?;
        let sock_type = self
            .kernel_space()
            .read_u16(socket.wrapping_add(l.socket_type))?;
        Ok((self.read_ptr(socket.wrapping_add(l.socket_sk))?, sock_type))
    }

    /// TCP (established, time-wait, listening) and UDP sockets from the
    /// kernel's hash tables (`tcp_hashinfo`, `udp_table`), bounded.
    pub fn hashed_sockets(&self) -> Listing<Socket> {
        let mut out = Listing {
            items: Vec::new(),
            warnings: Vec::new(),
        };
        let Some(h) = self.layout().hash_tables.clone() else {
            out.warnings.push(Warning {
                message: "this kernel's BTF does not describe the socket hash tables; listing only sockets processes hold".into(),
            });
            return out;
        };
        let k = self.kernel_space();
        let mut seen = std::collections::HashSet::new();
        // (global, table, protocol): TCP's established and listening tables
        // (hlist_nulls chains), then UDP's (plain hlists).
        let tables = [
            (
                "tcp_hashinfo",
                HashTable {
                    array: h.ehash,
                    mask: h.ehash_mask,
                    bucket_size: h.ehash_bucket_size,
                    head: 0,
                    nulls: true,
                },
                "tcp",
            ),
            (
                "tcp_hashinfo",
                HashTable {
                    array: h.lhash2,
                    mask: h.lhash2_mask,
                    bucket_size: h.lhash2_bucket_size,
                    head: h.lhash2_head,
                    nulls: true,
                },
                "tcp",
            ),
            (
                "udp_table",
                HashTable {
                    array: h.udp_hash,
                    mask: h.udp_mask,
                    bucket_size: h.udp_slot_size,
                    head: h.udp_slot_head,
                    nulls: false,
                },
                "udp",
            ),
        ];
        for (global, table, protocol) in tables {
            let located = self
                .symbol(global)
                .map_err(|e| e.to_string())
                .and_then(|g| {
                    let array = self.read_ptr(g.wrapping_add(table.array));
                    let mask = k.read_u32(g.wrapping_add(table.mask));
                    array
                        .and_then(|a| mask.map(|m| (a, m)))
                        .map_err(|e| format!("{global}: {e}"))
                });
            match located {
                Ok((array, mask)) => {
                    self.walk_hash(array, mask, &table, protocol, &mut seen, &mut out)
                }
                Err(message) => out.warnings.push(Warning { message }),
            }
        }
        out
    }

    /// Walks `mask + 1` buckets of `table.bucket_size` bytes at `array`, each
    /// holding a chain head at `table.head`: an `hlist_nulls_head` (end marked
    /// by bit 0) or an `hlist_head` (NULL-terminated).
    fn walk_hash(
        &self,
        array: u64,
        mask: u32,
        table: &HashTable,
        protocol: &'static str,
        seen: &mut std::collections::HashSet<u64>,
        out: &mut Listing<Socket>,
    ) {
        let l = self.layout();
        let buckets = (u64::from(mask) + 1).min(limits::MAX_HASH_BUCKETS);
        let (bucket_size, head_off) = (table.bucket_size, table.head);
        let is_end = |p: u64| if table.nulls { p & 1 == 1 } else { p == 0 };
        for i in 0..buckets {
            let mut node = match self.read_ptr(
                array
                    .wrapping_add(i.wrapping_mul(bucket_size))
                    .wrapping_add(head_off),
            ) {
                Ok(p) => p,
                Err(e) => {
                    out.warnings.push(Warning {
                        message: format!(
                            "{protocol} hash bucket {i} at {:#x}: {e}",
                            array.wrapping_add(i.wrapping_mul(bucket_size))
                        ),
                    });
                    return;
                }
            };
            while !is_end(node) {
                if out.items.len() >= limits::MAX_HASHED_SOCKETS {
                    out.warnings.push(Warning {
                        message: format!(
                            "more than {} hashed sockets; listing stops there",
                            limits::MAX_HASHED_SOCKETS
                        ),
                    });
                    return;
                }
                let sk = node.wrapping_sub(l.sk_node);
                if !is_kernel_pointer(self.kernel_space(), node) || !seen.insert(sk) {
                    out.warnings.push(Warning {
                        message: format!(
                            "{protocol} hash bucket {i}: bad or looping chain pointer {node:#x}"
                        ),
                    });
                    break;
                }
                match self.read_hashed_sock(sk, protocol) {
                    Ok(s) => out.items.push(s),
                    Err(e) => out.warnings.push(Warning {
                        message: format!("{protocol} socket at {sk:#x}: {e}"),
                    }),
                }
                node = match self.read_ptr(node) {
                    Ok(n) => n,
                    Err(e) => {
                        out.warnings.push(Warning {
                            message: format!("{protocol} hash bucket {i}: {e}"),
                        });
                        break;
                    }
                };
            }
        }
    }

    fn read_hashed_sock(&self, sk: u64, protocol: &'static str) -> Result<Socket, PagingError> {
        let l = self.layout();
        let state = self.kernel_space().read_u8(sk.wrapping_add(l.sk_state))?;
        // Time-wait and request socks are smaller than `struct sock`: only
        // their `sock_common` may be read, and no process holds them.
        let inode = if protocol == "tcp" && (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV) {
            0
        } else {
            match self.read_ptr(sk.wrapping_add(l.sk_socket))? {
                0 => 0,
                socket => {
                    let inode = socket
                        .wrapping_sub(l.socket_alloc_socket)
                        .wrapping_add(l.socket_alloc_inode);
                    self.kernel_space()
                        .read_u64(inode.wrapping_add(l.inode_ino))?
                }
            }
        };
        let sock_type = if protocol == "tcp" {
            SOCK_STREAM
        } else {
            SOCK_DGRAM
        };
        self.read_sock(sk, Some(sock_type), inode)
    }

    /// Reads the `sock_common` part of a socket.
    fn read_sock(
        &self,
        sk: u64,
        sock_type: Option<u16>,
        inode: u64,
    ) -> Result<Socket, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let family = k.read_u16(sk.wrapping_add(l.sk_family))?;
        let mut state = k.read_u8(sk.wrapping_add(l.sk_state))?;
        let family = match family {
            AF_UNIX => SocketFamily::Unix,
            AF_INET => SocketFamily::Inet,
            AF_INET6 => SocketFamily::Inet6,
            AF_NETLINK => SocketFamily::Netlink,
            AF_PACKET => SocketFamily::Packet,
            other => SocketFamily::Other(other),
        };
        let protocol = match (family, sock_type.unwrap_or(0)) {
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
                let src =
                    Ipv4Addr::from(k.read_u32(sk.wrapping_add(l.sk_rcv_saddr))?.to_le_bytes());
                let dst = Ipv4Addr::from(k.read_u32(sk.wrapping_add(l.sk_daddr))?.to_le_bytes());
                self.ports(sk, IpAddr::V4(src), IpAddr::V4(dst))?
            }
            SocketFamily::Inet6 => match (l.sk_v6_rcv_saddr, l.sk_v6_daddr) {
                (Some(so), Some(do_)) => {
                    let mut a = [0u8; 16];
                    let mut b = [0u8; 16];
                    k.read(sk.wrapping_add(so), &mut a)?;
                    k.read(sk.wrapping_add(do_), &mut b)?;
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
        if protocol == "tcp" && state == TCP_NEW_SYN_RECV {
            // /proc/net/tcp shows request socks as SYN_RECV.
            state = TCP_SYN_RECV;
        }
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
        let sport = k.read_u16(sk.wrapping_add(l.sk_num))?; // host order
        let dport = u16::from_be(k.read_u16(sk.wrapping_add(l.sk_dport))?); // network order
        Ok((Some((src, sport)), Some((dst, dport))))
    }
}
