//! `vmwatch-agent snapshot`: what the guest says about itself through /proc,
//! as JSON. Tests compare vmwatch's outside view with this ground truth; no
//! monitor ever reads it.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

#[derive(Serialize)]
pub struct Snapshot {
    /// The pid of the snapshot process itself (tests leave it out).
    pub self_pid: i32,
    pub processes: Vec<ProcEntry>,
    pub sockets: Vec<NetEntry>,
    pub modules: Vec<ModuleEntry>,
}

#[derive(Serialize)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub uid: u32,
    pub euid: u32,
    /// `readlink /proc/PID/exe`; None for kernel threads.
    pub exe: Option<String>,
    /// (fd, `readlink /proc/PID/fd/FD`)
    pub fds: Vec<(u32, String)>,
}

#[derive(Serialize)]
pub struct NetEntry {
    /// "tcp", "tcp6", "udp", "udp6"
    pub table: String,
    pub local: String,
    pub remote: String,
    pub state: u8,
    pub inode: u64,
}

#[derive(Serialize)]
pub struct ModuleEntry {
    pub name: String,
    pub size: u64,
    pub state: String,
    pub base: u64,
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim()))
}

fn read_process(pid: i32) -> Option<ProcEntry> {
    let dir = format!("/proc/{pid}");
    let status = fs::read_to_string(format!("{dir}/status")).ok()?;
    // Only thread-group leaders are processes.
    if status_field(&status, "Tgid:")?.parse::<i32>().ok()? != pid {
        return None;
    }
    let ppid = status_field(&status, "PPid:")?.parse().ok()?;
    let mut uids = status_field(&status, "Uid:")?.split_whitespace();
    let uid = uids.next()?.parse().ok()?;
    let euid = uids.next()?.parse().ok()?;
    let comm = fs::read_to_string(format!("{dir}/comm"))
        .ok()?
        .trim_end_matches('\n')
        .to_string();
    let exe = fs::read_link(format!("{dir}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let mut fds = Vec::new();
    if let Ok(entries) = fs::read_dir(format!("{dir}/fd")) {
        for e in entries.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(link) = fs::read_link(e.path()) {
                fds.push((fd, link.to_string_lossy().into_owned()));
            }
        }
    }
    fds.sort();
    Some(ProcEntry {
        pid,
        ppid,
        comm,
        uid,
        euid,
        exe,
        fds,
    })
}

/// Parses "0100007F:1F90" (IPv4) or the 32-hex-digit IPv6 form of /proc/net/*.
fn parse_addr(s: &str) -> Option<String> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    })
}

fn read_net(table: &str, out: &mut Vec<NetEntry>) {
    let Ok(text) = fs::read_to_string(format!("/proc/net/{table}")) else {
        return;
    };
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let (Some(local), Some(remote)) = (parse_addr(cols[1]), parse_addr(cols[2])) else {
            continue;
        };
        out.push(NetEntry {
            table: table.to_string(),
            local,
            remote,
            state: u8::from_str_radix(cols[3], 16).unwrap_or(0),
            inode: cols[9].parse().unwrap_or(0),
        });
    }
}

fn read_modules() -> Vec<ModuleEntry> {
    let text = fs::read_to_string("/proc/modules").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            // name size refcount deps state address [taint]
            let c: Vec<&str> = l.split_whitespace().collect();
            Some(ModuleEntry {
                name: c.first()?.to_string(),
                size: c.get(1)?.parse().ok()?,
                state: c.get(4)?.to_string(),
                base: u64::from_str_radix(c.get(5)?.trim_start_matches("0x"), 16).ok()?,
            })
        })
        .collect()
}

/// Reads the whole snapshot.
pub fn take() -> Snapshot {
    let mut processes: Vec<ProcEntry> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(read_process)
                .collect()
        })
        .unwrap_or_default();
    processes.sort_by_key(|p| p.pid);
    let mut sockets = Vec::new();
    for t in ["tcp", "tcp6", "udp", "udp6"] {
        read_net(t, &mut sockets);
    }
    Snapshot {
        self_pid: std::process::id() as i32,
        processes,
        sockets,
        modules: read_modules(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_addr;

    #[test]
    fn proc_net_addresses() {
        assert_eq!(parse_addr("0100007F:1F90").unwrap(), "127.0.0.1:8080");
        assert_eq!(
            parse_addr("00000000000000000000000000000000:1F90").unwrap(),
            "[::]:8080"
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0016").unwrap(),
            "[::1]:22"
        );
    }
}
